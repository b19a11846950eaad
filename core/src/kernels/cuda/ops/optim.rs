//! The optimizers' fused update kernels over flat buffers.

use super::*;

// SAFETY: plain-old-data with the C layouts of `struct AdamWStep` / `struct SgdStep` in optim.cu.
unsafe impl DeviceRepr for crate::ops::flat::AdamWStep {}

unsafe impl DeviceRepr for crate::ops::flat::SgdStep {}

/// A device pointer, or null for an absent optional buffer.
pub(super) fn ptr_or_null(t: Option<&Tensor>) -> Result<u64> {
    t.map_or(Ok(0), ptr)
}

/// Fused AdamW over flat buffers.
pub fn adamw(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    scales: crate::ops::flat::StepScales,
    s: crate::ops::flat::AdamWStep,
) -> Result<()> {
    let d = dev_of(p)?;
    let n = p.numel();
    // adamw_f32(p, g, m, v, const float* decay_scale, const float* lr_scale, i64 n, AdamWStep s)
    launch!(d, "optim", "adamw_f32", grid(n);
        ptr(p)?, ptr(g)?, ptr(m)?, ptr(v)?, ptr(scales.decay)?, ptr_or_null(scales.lr)?, n as i64, s)
}

/// Fused SGD (momentum, Nesterov, decay) over flat buffers.
pub fn sgd(p: &Tensor, g: &Tensor, buf: &Tensor, scales: crate::ops::flat::StepScales, s: crate::ops::flat::SgdStep) -> Result<()> {
    let d = dev_of(p)?;
    let n = p.numel();
    // sgd_f32(p, g, buf, const float* decay_scale, const float* lr_scale, i64 n, SgdStep s)
    launch!(d, "optim", "sgd_f32", grid(n);
        ptr(p)?, ptr(g)?, ptr(buf)?, ptr(scales.decay)?, ptr_or_null(scales.lr)?, n as i64, s)
}
