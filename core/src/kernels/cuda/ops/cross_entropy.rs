//! Fused cross-entropy with z-loss and accuracy, forward and backward.

use super::*;

/// Host-side results of [`cross_entropy`] (means over rows).
pub struct CeStats {
    pub loss: f64,
    pub log_z_mean: f64,
    pub log_z_max: f64,
    pub logit_mean: f64,
    pub z_loss: f64,
    pub accuracy: f64,
}

/// Cross-entropy rows over packed logits `[rows, v]`: lse per row and the targets on the
/// device, and the means on the host. Waits for the device.
pub fn cross_entropy(x: &Tensor, targets: &[u32], z: f64) -> Result<(Tensor, DevBuf, CeStats)> {
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
    let get = |t: &Tensor| -> Result<Vec<f64>> { Ok(d.download::<f32>(ptr(t)?, rows)?.into_iter().map(f64::from).collect()) };
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / rows as f64;
    let lse_h = get(&lse)?;
    let st = CeStats {
        loss: mean(&get(&loss)?),
        log_z_mean: mean(&lse_h),
        log_z_max: lse_h.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        logit_mean: mean(&get(&rsum)?) / v as f64,
        z_loss: z * lse_h.iter().map(|l| l * l).sum::<f64>() / rows as f64,
        accuracy: mean(&get(&correct)?),
    };
    Ok((lse, tg, st))
}

pub fn cross_entropy_bwd(x: &Tensor, targets: &DevBuf, lse: &Tensor, z: f64, scale: f64) -> Result<Tensor> {
    let d = dev_of(x)?;
    let x = contiguous(x)?;
    let v = *x.shape().last().unwrap_or(&1);
    let rows = lse.numel();
    let gx = empty(&d, x.shape())?;
    // xent_bwd_f32(x, targets, lse, gx, i64 rows, i64 v, float z, float scale)
    launch!(d, "cross_entropy", "xent_bwd_f32", per_row(rows);
        ptr(&x)?, targets.ptr, ptr(lse)?, ptr(&gx)?, rows as i64, v as i64, z as f32, scale as f32)?;
    Ok(gx)
}
