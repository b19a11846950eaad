//! Dropout masks regenerated from the counter-based key (see `crate::ops::dropout`).

use super::*;

/// Dropout with mask `dr` (see `ops::dropout`); `out` may be `x` itself (in place).
pub(crate) fn dropout_raw(d: &CudaDev, x: u64, out: u64, n: usize, dr: crate::ops::dropout::Dropout) -> Result<()> {
    let (step_key, key) = dr.kernel_key();
    // dropout_f32(const float* in, float* out, i64 n, const u64_t* step_key, i64 key, i64 threshold, float scale); scale() is f32
    launch!(d, "elementwise", "dropout_f32", grid(n); x, out, n as i64, step_key, key, dr.threshold() as i64, dr.scale())
}

pub fn dropout(x: &Tensor, dr: crate::ops::dropout::Dropout) -> Result<Tensor> {
    f32_only(x, "dropout")?;
    let d = dev_of(x)?;
    let c = contiguous(x)?;
    let out = empty(&d, x.shape())?;
    dropout_raw(&d, ptr(&c)?, ptr(&out)?, out.numel(), dr)?;
    Ok(out)
}

/// `res + dropout(x)` in one pass (same shapes; the mask of [`dropout`]).
pub fn dropout_add(x: &Tensor, res: &Tensor, dr: crate::ops::dropout::Dropout) -> Result<Tensor> {
    f32_only(x, "dropout_add")?;
    f32_only(res, "dropout_add")?;
    let d = dev_of(x)?;
    let (c, r) = (contiguous(x)?, contiguous(res)?);
    let out = empty(&d, x.shape())?;
    let n = out.numel();
    let (step_key, key) = dr.kernel_key();
    // dropout_add_f32(const float* x, const float* res, float* out, i64 n, const u64_t* step_key, i64 key, i64 threshold, float scale)
    launch!(d, "elementwise", "dropout_add_f32", grid(n);
        ptr(&c)?, ptr(&r)?, ptr(&out)?, n as i64, step_key, key, dr.threshold() as i64, dr.scale())?;
    Ok(out)
}
