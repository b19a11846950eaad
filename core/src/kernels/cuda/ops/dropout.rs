//! Dropout masks regenerated from the counter-based key (see `crate::ops::dropout`).

use super::*;

/// Dropout with mask `dr` (see `ops::dropout`); `out` may be `x` itself (in place).
pub(crate) fn dropout_raw(d: &CudaDev, x: u64, out: u64, n: usize, dr: crate::ops::dropout::Dropout) -> Result<()> {
    // dropout_f32(const float* in, float* out, i64 n, i64 key, i64 threshold, float scale); scale() is f32
    launch!(d, "elementwise", "dropout_f32", grid(n); x, out, n as i64, dr.key as i64, dr.threshold() as i64, dr.scale())
}

pub fn dropout(x: &Tensor, dr: crate::ops::dropout::Dropout) -> Result<Tensor> {
    f32_only(x, "dropout")?;
    let d = dev_of(x)?;
    let c = contiguous(x)?;
    let out = empty(&d, x.shape())?;
    dropout_raw(&d, ptr(&c)?, ptr(&out)?, out.numel(), dr)?;
    Ok(out)
}
