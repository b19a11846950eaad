//! Fused cross-entropy with z-loss and accuracy, forward and backward; nothing here waits for
//! the device.

use super::*;

/// Cross-entropy rows over packed logits `[rows, v]`: lse per row, the targets on the device, and
/// the batch statistics `[6]` on the device — mean loss, mean log Z, max log Z, mean logit, the
/// z-loss term, accuracy (the loss is element 0, a view of it is the loss scalar).
pub fn cross_entropy(x: &Tensor, targets: &[u32], z: f64) -> Result<(Tensor, DevBuf, Tensor)> {
    f32_only(x, "cross_entropy")?;
    let d = dev_of(x)?;
    let x = contiguous(x)?;
    let v = *x.shape().last().unwrap_or(&1);
    let rows = targets.len();
    let tg = upload_ids(&d, targets)?;
    let (loss, lse, rsum, correct) = (empty(&d, &[rows])?, empty(&d, &[rows])?, empty(&d, &[rows])?, empty(&d, &[rows])?);
    // xent_fwd_f32(x, targets, loss, lse, row_sum, correct, i64 rows, i64 v, float z)
    launch!(d, "cross_entropy", "xent_fwd_f32", per_row(rows);
        ptr(&x)?, tg.ptr, ptr(&loss)?, ptr(&lse)?, ptr(&rsum)?, ptr(&correct)?, rows as i64, v as i64, z as f32)?;
    let stats = empty(&d, &[6])?;
    let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    // xent_stats_f32(loss, lse, row_sum, correct, out, i64 rows, i64 v, float z)
    launch!(d, "cross_entropy", "xent_stats_f32", one;
        ptr(&loss)?, ptr(&lse)?, ptr(&rsum)?, ptr(&correct)?, ptr(&stats)?, rows as i64, v as i64, z as f32)?;
    Ok((lse, tg, stats))
}

/// The logits' gradient for the upstream gradient `go` (a one-element device tensor) of the mean
/// loss over `rows`.
pub fn cross_entropy_bwd(x: &Tensor, targets: &DevBuf, lse: &Tensor, z: f64, go: &Tensor) -> Result<Tensor> {
    let d = dev_of(x)?;
    let x = contiguous(x)?;
    let go = contiguous(go)?;
    let v = *x.shape().last().unwrap_or(&1);
    let rows = lse.numel();
    let gx = empty(&d, x.shape())?;
    let scale = 1.0 / rows.max(1) as f64;
    // xent_bwd_f32(x, targets, lse, gx, i64 rows, i64 v, float z, const float* go, float scale)
    launch!(d, "cross_entropy", "xent_bwd_f32", per_row(rows);
        ptr(&x)?, targets.ptr, ptr(lse)?, ptr(&gx)?, rows as i64, v as i64, z as f32, ptr(&go)?, scale as f32)?;
    Ok(gx)
}
