//! Whole-buffer operations on the flat parameter, gradient and optimizer-state tensors, for
//! the crates outside the engine (optimizers, clipping, the trainer): each runs where the
//! buffer lives. The CPU optimizers keep their own tuned loops; these are their GPU halves and
//! the device-neutral reductions.

use crate::error::Result;
use crate::tensor::Tensor;

/// Σx² of an f32 buffer, accumulated in f64 (waits for the device on a GPU).
pub fn sum_squares(t: &Tensor) -> Result<f64> {
    crate::on_cuda!(t => gpu::sum_squares_host(t));
    let d = t.data::<f32>()?;
    Ok(d.chunks(4096).map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()).sum())
}

/// `t *= s` in place (t must be the only handle to its storage).
pub fn scale_in_place(t: &mut Tensor, s: f32) -> Result<()> {
    #[cfg(feature = "cuda")]
    if t.is_cuda() {
        use crate::kernels::cuda::ops as gpu;
        return gpu::scale_raw(&*gpu::dev_of(t)?, gpu::ptr(t)?, t.numel(), s);
    }
    t.data_mut::<f32>()?.iter_mut().for_each(|x| *x *= s);
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn no_cuda() -> crate::error::Error {
    crate::error::Error::Device("this dptrain was built without the `cuda` feature".into())
}

/// One fused AdamW step on device buffers (the arithmetic of dptrain-optim's CPU loop).
#[allow(clippy::too_many_arguments)]
pub fn adamw_cuda(p: &mut Tensor, g: &Tensor, m: &mut Tensor, v: &mut Tensor, mask: &Tensor, c: [f32; 6]) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        let [b1, b2, eps, step, inv_sqrt_bc2, decay] = c;
        crate::kernels::cuda::ops::adamw(p, g, m, v, mask, b1, b2, eps, step, inv_sqrt_bc2, decay)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (p, g, m, v, mask, c);
        Err(no_cuda())
    }
}

/// One fused SGD step on device buffers: `c = [lr, wd, momentum, dampening]`.
pub fn sgd_cuda(p: &mut Tensor, g: &Tensor, buf: &mut Tensor, mask: &Tensor, c: [f32; 4], nesterov: bool, first: bool) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        let [lr, wd, mu, damp] = c;
        crate::kernels::cuda::ops::sgd(p, g, buf, mask, lr, wd, mu, damp, nesterov, first)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (p, g, buf, mask, c, nesterov, first);
        Err(no_cuda())
    }
}
