//! Sum and mean over dims (with `keepdim`), and sum/mean of all elements.

use crate::autograd::Var;
use crate::error::{Error, Result};
use crate::kernels::cpu::reduce::sum_dims;
use crate::ops::elementwise::t;
use crate::tensor::Tensor;
use crate::{on_cuda, with_float};

fn kept_sum(x: &Tensor, dims: &[usize]) -> Result<Tensor> {
    on_cuda!(x => gpu::sum_dims(x, dims));
    with_float!(x.dtype(), "sum", T => sum_dims::<T>(x, dims))
}

impl<'t> Var<'t> {
    /// Sum over `dims`; the dims are kept as size 1 when `keepdim`.
    pub fn sum_dims(self, dims: &[usize], keepdim: bool) -> Result<Var<'t>> {
        let x = self.value();
        if let Some(&d) = dims.iter().find(|&&d| d >= x.rank()) {
            return Err(Error::shape("sum", format!("dim {d} for shape {:?}", x.shape())));
        }
        let kept = kept_sum(&x, dims)?;
        let kept_shape = kept.shape().to_vec();
        let out = if keepdim {
            kept
        } else {
            let s: Vec<usize> = x.shape().iter().enumerate().filter(|(i, _)| !dims.contains(i)).map(|(_, &d)| d).collect();
            kept.reshape(&s)?
        };
        let in_shape = x.shape().to_vec();
        Ok(self.tape().record("sum", out, &[self], move |g| Ok(vec![Some(t::broadcast_to(&g.reshape(&kept_shape)?, &in_shape)?)])))
    }
    pub fn mean_dims(self, dims: &[usize], keepdim: bool) -> Result<Var<'t>> {
        let shape = self.shape();
        let n: usize = dims.iter().map(|&d| shape.get(d).copied().unwrap_or(1)).product();
        self.sum_dims(dims, keepdim)?.scale(1.0 / n as f64)
    }
    /// Sum of all elements (a scalar of shape `[]`).
    pub fn sum_all(self) -> Result<Var<'t>> {
        let dims: Vec<usize> = (0..self.shape().len()).collect();
        self.sum_dims(&dims, false)
    }
    pub fn mean_all(self) -> Result<Var<'t>> {
        let n: usize = self.shape().iter().product();
        self.sum_all()?.scale(1.0 / n as f64)
    }
}
