//! Fused layer norm, forward and backward.

use super::*;

/// Layer norm over the last dim of packed `x [rows, c]`: (y, mean, rstd).
pub fn layer_norm(x: &Tensor, w: Option<&Tensor>, b: Option<&Tensor>, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    f32_only(x, "layer_norm")?;
    let d = dev_of(x)?;
    let x = contiguous(x)?;
    let c = *x.shape().last().unwrap_or(&1);
    let rows = x.numel() / c.max(1);
    let (w, b) = (w.map(contiguous).transpose()?, b.map(contiguous).transpose()?);
    let opt = |t: &Option<Tensor>| t.as_ref().map(ptr).transpose().map(|p| p.unwrap_or(0));
    let y = empty(&d, x.shape())?;
    let (mean, rstd) = (empty(&d, &[rows])?, empty(&d, &[rows])?);
    // layer_norm_fwd_f32(x, w, b, y, mean, rstd, i64 rows, i64 c, float eps)
    launch!(d, "layer_norm", "layer_norm_fwd_f32", per_row(rows);
        ptr(&x)?, opt(&w)?, opt(&b)?, ptr(&y)?, ptr(&mean)?, ptr(&rstd)?, rows as i64, c as i64, eps as f32)?;
    Ok((y, mean, rstd))
}

/// Layer norm backward: (dx, dw, db) — dw, db only when `affine`.
pub fn layer_norm_bwd(
    x: &Tensor,
    g: &Tensor,
    w: Option<&Tensor>,
    mean: &Tensor,
    rstd: &Tensor,
    want_w: bool,
    want_b: bool,
) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
    let d = dev_of(x)?;
    let (x, g) = (contiguous(x)?, contiguous(g)?);
    let c = *x.shape().last().unwrap_or(&1);
    let rows = x.numel() / c.max(1);
    let w = w.map(contiguous).transpose()?;
    let gx = empty(&d, x.shape())?;
    let gxhat = if want_w { Some(empty(&d, &[rows, c])?) } else { None };
    let wp = w.as_ref().map(ptr).transpose()?.unwrap_or(0);
    let gxp = gxhat.as_ref().map(ptr).transpose()?.unwrap_or(0);
    // layer_norm_bwd_f32(x, g, w, mean, rstd, gx, gxhat, i64 rows, i64 c)
    launch!(d, "layer_norm", "layer_norm_bwd_f32", per_row(rows);
        ptr(&x)?, ptr(&g)?, wp, ptr(mean)?, ptr(rstd)?, ptr(&gx)?, gxp, rows as i64, c as i64)?;
    let gw = gxhat.map(|t| sum_rows(&t)).transpose()?;
    let gb = if want_b { Some(sum_rows(&g.reshape(&[rows, c])?)?) } else { None };
    Ok((gx, gw, gb))
}
