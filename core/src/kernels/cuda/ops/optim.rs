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

/// SOAP's moment updates on one parameter's buffers (see optim.cu).
pub fn soap_moments(g: &Tensor, gp: &Tensor, m: &Tensor, v: &Tensor, w1: f32, w2: f32) -> Result<()> {
    let d = dev_of(m)?;
    let n = m.numel();
    let (g, gp) = (contiguous(g)?, contiguous(gp)?);
    // soap_moments_f32(const float* g, const float* gp, float* m, float* v, i64 n, float w1, float w2)
    launch!(d, "optim", "soap_moments_f32", grid(n); ptr(&g)?, ptr(&gp)?, ptr(m)?, ptr(v)?, n as i64, w1, w2)
}

/// `mp / (√v + eps)`, a new tensor of `mp`'s shape.
pub fn soap_ratio(mp: &Tensor, v: &Tensor, eps: f32) -> Result<Tensor> {
    let d = dev_of(mp)?;
    let mp = contiguous(mp)?;
    let out = empty(&d, mp.shape())?;
    let n = mp.numel();
    // soap_ratio_f32(const float* mp, const float* v, float* out, i64 n, float eps)
    launch!(d, "optim", "soap_ratio_f32", grid(n); ptr(&mp)?, ptr(v)?, ptr(&out)?, n as i64, eps)?;
    Ok(out)
}

/// `p ← (p − step·u)·keep` in place.
pub fn soap_apply(p: &Tensor, u: &Tensor, step: f32, keep: f32) -> Result<()> {
    let d = dev_of(p)?;
    let n = p.numel();
    let u = contiguous(u)?;
    // soap_apply_f32(float* p, const float* u, i64 n, float step, float keep)
    launch!(d, "optim", "soap_apply_f32", grid(n); ptr(p)?, ptr(&u)?, n as i64, step, keep)
}
