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

/// Where backward finds the ids: on a GPU the buffer forward uploaded (uploaded once per step,
/// and inside a CUDA graph capture the one bound to the step's inputs), else the host copy.
enum Ids {
    Host(Vec<u32>),
    #[cfg(feature = "cuda")]
    Device(crate::tensor::cuda::DevBuf),
}

fn forward(w: &Tensor, ids: &[u32], dim: usize, shape: &[usize]) -> Result<(Tensor, Ids)> {
    on_cuda!(w => gpu::embedding(w, ids, shape).map(|(out, b)| (out, Ids::Device(b))));
    with_float!(w.dtype(), "embedding", T => gather::<T>(w, ids, dim, shape)).map(|out| (out, Ids::Host(ids.to_vec())))
}

/// Rows `ids` of `table [rows, dim]` as a new `[ids.len(), dim]` tensor, off the tape (an
/// `index_select` along dim 0): what reorders state on the device, as SOAP's second moment when
/// a basis refresh re-sorts its eigenvectors, without a round trip through the host.
pub fn rows(table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    if table.rank() != 2 {
        return Err(Error::shape("rows", format!("table of shape {:?}", table.shape())));
    }
    let (n, dim) = (table.shape()[0], table.shape()[1]);
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= n) {
        return Err(Error::shape("rows", format!("row {bad} of a table of {n} rows")));
    }
    if table.is_cuda() && table.dtype() != crate::tensor::DType::F32 {
        // The device gather is the embedding kernel, which reads f32.
        return Err(Error::shape("rows", format!("a {:?} table on a GPU (f32 only)", table.dtype())));
    }
    forward(table, ids, dim, &[ids.len(), dim]).map(|(out, _)| out)
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
        let (out, saved) = forward(&w, ids, dim, &shape)?;
        let n = ids.len();
        Ok(self.tape().record("embedding", out, &[self], move |g| {
            let ids = match &saved {
                Ids::Host(ids) => ids,
                #[cfg(feature = "cuda")]
                Ids::Device(b) => {
                    use crate::kernels::cuda::ops as gpu;
                    // Into the table's gradient slot when the tape offers it.
                    return Ok(vec![gpu::embedding_bwd(g, b, n, vocab, dim, crate::autograd::take_grad_sink(0))?]);
                }
            };
            let gw = with_float!(g.dtype(), "embedding", T => {
                let g = g.contiguous();
                let gd = g.data::<T>()?;
                Ok(Tensor::build::<T>(&[vocab, dim], |o| {
                    o.fill(T::zero());
                    for (row, &id) in gd.chunks(dim).zip(ids.iter().take(n)) {
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
