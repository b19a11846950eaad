//! Shape ops: reshape, transpose, permute, narrow, cat, split. Forward results are views where
//! possible; backward maps the gradient back through the inverse view.

use crate::autograd::Var;
use crate::error::{Error, Result};
use crate::tensor::{Elem, Tensor};
use crate::{on_cuda, with_float};

/// Writes `src` into dim `dim` of a zero tensor of `shape` at `start` (narrow's backward, and
/// cat's forward building block).
fn place<T: Elem>(out: &mut [T], shape: &[usize], dim: usize, start: usize, src: &Tensor) -> Result<()> {
    let src = src.contiguous();
    let s = src.data::<T>()?;
    let outer: usize = shape[..dim].iter().product();
    let inner: usize = shape[dim + 1..].iter().product();
    let len = src.shape()[dim];
    for o in 0..outer {
        let dst0 = (o * shape[dim] + start) * inner;
        out[dst0..dst0 + len * inner].copy_from_slice(&s[o * len * inner..(o + 1) * len * inner]);
    }
    Ok(())
}

/// A zero tensor of `shape` on `like`'s device with `src` written at `start` of dim `dim`.
fn placed(like: &Tensor, shape: &[usize], dim: usize, start: usize, src: &Tensor) -> Result<Tensor> {
    on_cuda!(like => {
        let z = gpu::zeros_like_dev(like, shape)?;
        gpu::place(&z, dim, start, src)?;
        Ok(z)
    });
    with_float!(like.dtype(), "narrow", T => {
        let mut v = T::pool().take(shape.iter().product());
        v.fill(T::zero());
        place::<T>(&mut v, shape, dim, start, src)?;
        Tensor::from_vec(v, shape)
    })
}

fn cat_tensors(ts: &[Tensor], dim: usize) -> Result<Tensor> {
    let first = ts.first().ok_or_else(|| Error::shape("cat", "no tensors"))?;
    let mut shape = first.shape().to_vec();
    if dim >= shape.len() {
        return Err(Error::shape("cat", format!("dim {dim} for rank {}", shape.len())));
    }
    shape[dim] = 0;
    for t in ts {
        let mut s = t.shape().to_vec();
        if s.len() != first.rank() {
            return Err(Error::shape("cat", "ranks differ"));
        }
        shape[dim] += s[dim];
        s[dim] = first.shape()[dim];
        if s != first.shape() {
            return Err(Error::shape("cat", format!("{:?} vs {:?} off dim {dim}", t.shape(), first.shape())));
        }
    }
    on_cuda!(first => {
        let z = gpu::zeros_like_dev(first, &shape)?;
        let mut start = 0;
        for t in ts {
            gpu::place(&z, dim, start, t)?;
            start += t.shape()[dim];
        }
        Ok(z)
    });
    with_float!(first.dtype(), "cat", T => {
        let mut v = T::pool().take(shape.iter().product());
        let mut start = 0;
        for t in ts {
            place::<T>(&mut v, &shape, dim, start, t)?;
            start += t.shape()[dim];
        }
        Tensor::from_vec(v, &shape)
    })
}

impl<'t> Var<'t> {
    pub fn reshape(self, shape: &[usize]) -> Result<Var<'t>> {
        let in_shape = self.shape();
        let out = self.value().reshape(shape)?;
        Ok(self.tape().record("reshape", out, &[self], move |g| Ok(vec![Some(g.reshape(&in_shape)?)])))
    }
    pub fn transpose(self, d0: usize, d1: usize) -> Result<Var<'t>> {
        let out = self.value().transpose(d0, d1)?;
        Ok(self.tape().record("transpose", out, &[self], move |g| Ok(vec![Some(g.transpose(d0, d1)?)])))
    }
    /// Transpose of the last two dims.
    pub fn t(self) -> Result<Var<'t>> {
        let r = self.shape().len();
        if r < 2 {
            return Err(Error::shape("t", "rank < 2"));
        }
        self.transpose(r - 2, r - 1)
    }
    pub fn permute(self, perm: &[usize]) -> Result<Var<'t>> {
        let out = self.value().permute(perm)?;
        let mut inv = vec![0; perm.len()];
        for (i, &p) in perm.iter().enumerate() {
            inv[p] = i;
        }
        Ok(self.tape().record("permute", out, &[self], move |g| Ok(vec![Some(g.permute(&inv)?)])))
    }
    pub fn narrow(self, dim: usize, start: usize, len: usize) -> Result<Var<'t>> {
        let in_shape = self.shape();
        let out = self.value().narrow(dim, start, len)?;
        Ok(self.tape().record("narrow", out, &[self], move |g| Ok(vec![Some(placed(g, &in_shape, dim, start, g)?)])))
    }
    /// Splits dim `dim` into pieces of the given sizes.
    pub fn split(self, dim: usize, sizes: &[usize]) -> Result<Vec<Var<'t>>> {
        let mut start = 0;
        let mut out = Vec::with_capacity(sizes.len());
        for &s in sizes {
            out.push(self.narrow(dim, start, s)?);
            start += s;
        }
        if start != self.shape()[dim] {
            return Err(Error::shape("split", format!("sizes {sizes:?} do not cover dim {dim} of {:?}", self.shape())));
        }
        Ok(out)
    }
}

/// Concatenates along `dim`.
pub fn cat<'t>(vars: &[Var<'t>], dim: usize) -> Result<Var<'t>> {
    let first = vars.first().ok_or_else(|| Error::shape("cat", "no tensors"))?;
    let vals: Vec<Tensor> = vars.iter().map(|v| v.value()).collect();
    let sizes: Vec<usize> = vals.iter().map(|v| v.shape()[dim.min(v.rank().saturating_sub(1))]).collect();
    let out = cat_tensors(&vals, dim)?;
    Ok(first.tape().record("cat", out, vars, move |g| {
        let mut start = 0;
        let mut gs = Vec::with_capacity(sizes.len());
        for &s in &sizes {
            gs.push(Some(g.narrow(dim, start, s)?.try_contiguous()?));
            start += s;
        }
        Ok(gs)
    }))
}
