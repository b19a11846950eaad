//! Fused layer norm, forward and backward.

use super::*;

/// Layer norm over the last dim of packed `x [rows, c]`: (y, mean, rstd).
pub fn layer_norm(x: &Tensor, w: Option<&Tensor>, b: Option<&Tensor>, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    layer_norm_to(x, w, b, eps, DType::F32)
}

/// [`layer_norm`] with y written in `out` (f32, or bf16 as the next GEMM's operand).
pub fn layer_norm_to(x: &Tensor, w: Option<&Tensor>, b: Option<&Tensor>, eps: f64, out: DType) -> Result<(Tensor, Tensor, Tensor)> {
    f32_only(x, "layer_norm")?;
    let d = dev_of(x)?;
    let x = contiguous(x)?;
    let c = *x.shape().last().unwrap_or(&1);
    let rows = x.numel() / c.max(1);
    let (w, b) = (w.map(contiguous).transpose()?, b.map(contiguous).transpose()?);
    let opt = |t: &Option<Tensor>| t.as_ref().map(ptr).transpose().map(|p| p.unwrap_or(0));
    let (mean, rstd) = (empty(&d, &[rows])?, empty(&d, &[rows])?);
    let y = if out == DType::BF16 {
        let y = wrap(d.alloc(x.numel() * 2)?, DType::BF16, x.shape());
        // layer_norm_fwd_bf16(x, w, b, bf16 y, mean, rstd, i64 rows, i64 c, float eps)
        launch!(d, "layer_norm", "layer_norm_fwd_bf16", per_row(rows);
            ptr(&x)?, opt(&w)?, opt(&b)?, ptr(&y)?, ptr(&mean)?, ptr(&rstd)?, rows as i64, c as i64, eps as f32)?;
        y
    } else {
        let y = empty(&d, x.shape())?;
        // layer_norm_fwd_f32(x, w, b, y, mean, rstd, i64 rows, i64 c, float eps)
        launch!(d, "layer_norm", "layer_norm_fwd_f32", per_row(rows);
            ptr(&x)?, opt(&w)?, opt(&b)?, ptr(&y)?, ptr(&mean)?, ptr(&rstd)?, rows as i64, c as i64, eps as f32)?;
        y
    };
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

/// qk-layernorm over packed `qkv [N, 3·h·c]` (rows of one head's `c` values; value rows copied):
/// (y, mean, rstd), with gain / bias `[2, c]` (query, key) when given.
pub fn qk_norm(x: &Tensor, w: Option<&Tensor>, b: Option<&Tensor>, h: usize, c: usize, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    f32_only(x, "qk_norm")?;
    let d = dev_of(x)?;
    let x = contiguous(x)?;
    let rows = x.numel() / c.max(1);
    let (w, b) = (w.map(contiguous).transpose()?, b.map(contiguous).transpose()?);
    let opt = |t: &Option<Tensor>| t.as_ref().map(ptr).transpose().map(|p| p.unwrap_or(0));
    let y = empty(&d, x.shape())?;
    let (mean, rstd) = (empty(&d, &[rows])?, empty(&d, &[rows])?);
    // qk_norm_fwd_f32(x, w, b, y, mean, rstd, i64 rows, i64 h, i64 c, float eps)
    launch!(d, "layer_norm", "qk_norm_fwd_f32", per_row(rows);
        ptr(&x)?, opt(&w)?, opt(&b)?, ptr(&y)?, ptr(&mean)?, ptr(&rstd)?, rows as i64, h as i64, c as i64, eps as f32)?;
    Ok((y, mean, rstd))
}

/// qk-layernorm backward: (dx, Σ g·x̂ per slot `[2, c]`, Σ g per slot `[2, c]`).
pub fn qk_norm_bwd(
    x: &Tensor,
    g: &Tensor,
    w: Option<&Tensor>,
    mean: &Tensor,
    rstd: &Tensor,
    h: usize,
    c: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let d = dev_of(x)?;
    let (x, g) = (contiguous(x)?, contiguous(g)?);
    let rows = x.numel() / c.max(1);
    let w = w.map(contiguous).transpose()?;
    let gx = empty(&d, x.shape())?;
    let (gxhat, gmask) = (empty(&d, &[rows, c])?, empty(&d, &[rows, c])?);
    let wp = w.as_ref().map(ptr).transpose()?.unwrap_or(0);
    // qk_norm_bwd_f32(x, g, w, mean, rstd, gx, gxhat, gmask, i64 rows, i64 h, i64 c)
    launch!(d, "layer_norm", "qk_norm_bwd_f32", per_row(rows);
        ptr(&x)?, ptr(&g)?, wp, ptr(mean)?, ptr(rstd)?, ptr(&gx)?, ptr(&gxhat)?, ptr(&gmask)?, rows as i64, h as i64, c as i64)?;
    Ok((gx, per_slot(&gxhat, rows, h, c)?, per_slot(&gmask, rows, h, c)?))
}

/// `[rows = N·3·h, c]` → the sums over tokens and heads of the query and key slots, `[2, c]`.
fn per_slot(t: &Tensor, rows: usize, h: usize, c: usize) -> Result<Tensor> {
    let n = rows / (3 * h);
    let over_tokens = sum_rows(&t.reshape(&[n, 3 * h * c])?)?;
    let by_head = contiguous(&over_tokens.reshape(&[3, h, c])?.permute(&[1, 0, 2])?)?;
    let over_heads = sum_rows(&by_head.reshape(&[h, 3 * c])?)?;
    contiguous(&over_heads.narrow(0, 0, 2 * c)?.reshape(&[2, c])?)
}
