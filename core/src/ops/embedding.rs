//! Embedding lookup (row gather) with a scatter-add backward.

use crate::autograd::Var;
use crate::error::{Error, Result};
use crate::tensor::{Elem, Tensor};
use crate::{on_cuda, with_float};

fn gather<T: Elem>(w: &Tensor, ids: &[u32], dim: usize, out_shape: &[usize]) -> Result<Tensor> {
    let w = w.contiguous();
    let wd = w.data::<T>()?;
    Ok(Tensor::build::<T>(out_shape, |o| {
        for (row, &id) in o.chunks_mut(dim).zip(ids) {
            let id = id as usize;
            row.copy_from_slice(&wd[id * dim..(id + 1) * dim]);
        }
    }))
}

fn forward(w: &Tensor, ids: &[u32], dim: usize, shape: &[usize]) -> Result<Tensor> {
    on_cuda!(w => gpu::embedding(w, ids, shape));
    with_float!(w.dtype(), "embedding", T => gather::<T>(w, ids, dim, shape))
}

impl<'t> Var<'t> {
    /// Rows `ids` of the table `self [vocab, dim]`, shaped `out_shape ++ [dim]`.
    pub fn embedding(self, ids: &[u32], out_shape: &[usize]) -> Result<Var<'t>> {
        let w = self.value();
        if w.rank() != 2 {
            return Err(Error::shape("embedding", format!("table of shape {:?}", w.shape())));
        }
        let (vocab, dim) = (w.shape()[0], w.shape()[1]);
        if out_shape.iter().product::<usize>() != ids.len() {
            return Err(Error::shape("embedding", format!("{} ids for shape {:?}", ids.len(), out_shape)));
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(Error::shape("embedding", format!("id {bad} out of range for vocabulary {vocab}")));
        }
        let mut shape = out_shape.to_vec();
        shape.push(dim);
        let out = forward(&w, ids, dim, &shape)?;
        let ids = ids.to_vec();
        Ok(self.tape().record("embedding", out, &[self], move |g| {
            on_cuda!(g => Ok(vec![Some(gpu::embedding_bwd(g, &ids, vocab, dim)?)]));
            let gw = with_float!(g.dtype(), "embedding", T => {
                let g = g.contiguous();
                let gd = g.data::<T>()?;
                Ok(Tensor::build::<T>(&[vocab, dim], |o| {
                    o.fill(T::zero());
                    for (row, &id) in gd.chunks(dim).zip(&ids) {
                        let dst = &mut o[id as usize * dim..(id as usize + 1) * dim];
                        for (d, &x) in dst.iter_mut().zip(row) {
                            *d += x;
                        }
                    }
                }))
            })?;
            Ok(vec![Some(gw)])
        }))
    }
}
