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
    let y = if out == DType::BF16 { wrap(d.alloc(x.numel() * 2)?, DType::BF16, x.shape()) } else { empty(&d, x.shape())? };
    let (xp, wp, bp, yp) = (ptr(&x)?, opt(&w)?, opt(&b)?, ptr(&y)?);
    // A warp per row, 16 bytes a load and store, where the row's width and every address allow
    // (an absent w or b is address 0: aligned); else a block per row, one element at a time.
    let per = 16 / out.size_in_bytes();
    let name = match (d.fusions().wide_loads && c.is_multiple_of(per) && aligned16(&[xp, wp, bp, yp]), out == DType::BF16) {
        (true, true) => "layer_norm_fwd_warp_bf16",
        (true, false) => "layer_norm_fwd_warp_f32",
        (false, true) => "layer_norm_fwd_bf16",
        (false, false) => "layer_norm_fwd_f32",
    };
    let cfg = if name.contains("warp") {
        LaunchConfig {
            grid_dim: (rows.div_ceil(LN_WARP_ROWS).clamp(1, 65535) as u32, 1, 1),
            block_dim: (32 * LN_WARP_ROWS as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    } else {
        per_row(rows)
    };
    // layer_norm_fwd[_warp]_{f32,bf16}(x, w, b, y (f32 or bf16), mean, rstd, i64 rows, i64 c, float eps)
    launch!(d, "layer_norm", name, cfg; xp, wp, bp, yp, ptr(&mean)?, ptr(&rstd)?, rows as i64, c as i64, eps as f32)?;
    Ok((y, mean, rstd))
}

/// Rows per block of the warp-per-row forward: one per warp (the kernel reads its warps per
/// block from the block size).
const LN_WARP_ROWS: usize = 8;

/// Blocks of the layer-norm backward when it sums parameter gradients: each sums its rows'
/// share into one row of partials (1024 rows fill an H100/H200 in one wave; the partials are
/// 8·c KB, against 4·rows·c bytes for a g·x̂ matrix per row).
const LN_PARTS: usize = 1024;

/// Where a layer norm's backward writes, each gradient optional: the input's (`x`: added into
/// an existing gradient — the residual stream's other use), the gain's and the bias's (their
/// slots in the flat gradient buffer). See `autograd::take_grad_sink`.
#[derive(Debug, Clone, Copy, Default)]
pub struct LnSinks {
    pub x: Option<crate::autograd::GradSink>,
    pub w: Option<crate::autograd::GradSink>,
    pub b: Option<crate::autograd::GradSink>,
}

/// Layer norm backward: (dx, dw, db) — dw, db only when wanted; each `None` too when written
/// into its sink instead.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_bwd(
    x: &Tensor,
    g: &Tensor,
    w: Option<&Tensor>,
    mean: &Tensor,
    rstd: &Tensor,
    want_w: bool,
    want_b: bool,
    sinks: LnSinks,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let d = dev_of(x)?;
    let (x, g) = (contiguous(x)?, contiguous(g)?);
    let c = *x.shape().last().unwrap_or(&1);
    let rows = x.numel() / c.max(1);
    let w = w.map(contiguous).transpose()?;
    let (gx, gx_ptr, acc) = match sinks.x {
        Some(sk) if sk.len != rows * c => {
            return Err(Error::shape("layer_norm backward", format!("a gradient of {} elements for {:?}", sk.len, x.shape())))
        }
        Some(sk) => (None, sk.ptr, sk.accumulate as i32),
        None => {
            let t = empty(&d, x.shape())?;
            let p = ptr(&t)?;
            (Some(t), p, 0)
        }
    };
    let parts = rows.clamp(1, LN_PARTS);
    let wp = w.as_ref().map(ptr).transpose()?.unwrap_or(0);
    let (xp, gp) = (ptr(&x)?, ptr(&g)?);
    // 16 bytes a load where the width and addresses allow. Either kernel writes or zeroes all
    // of `part` itself: no clearing pass.
    let wide = d.fusions().wide_loads && c.is_multiple_of(4) && aligned16(&[xp, gp, wp, gx_ptr]);
    let part = if want_w || want_b { Some(empty(&d, &[2, parts, c])?) } else { None };
    let pp = part.as_ref().map(ptr).transpose()?.unwrap_or(0);
    let cfg = LaunchConfig { grid_dim: (parts as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    let name = if wide { "layer_norm_bwd_x4_f32" } else { "layer_norm_bwd_f32" };
    // layer_norm_bwd[_x4]_f32(x, g, w, mean, rstd, gx, int acc, part, i64 parts, i64 rows, i64 c)
    launch!(d, "layer_norm", name, cfg;
        xp, gp, wp, ptr(mean)?, ptr(rstd)?, gx_ptr, acc, pp, parts as i64, rows as i64, c as i64)?;
    // Gain and bias slots side by side in the flat gradient buffer (a layer norm's parameters
    // are registered one after the other), both overwritten or both added to: one batched GEMM
    // sums both blocks of partials (the same products as two; one launch per layer norm fewer).
    if let (Some(part), true, true, Some(sw), Some(sb)) = (part.as_ref(), want_w, want_b, sinks.w, sinks.b) {
        if sw.len == c && sb.len == c && sb.ptr == sw.ptr + (c * 4) as u64 && sw.accumulate == sb.accumulate {
            sum_rows_batched_into(&d, ptr(part)?, 2, parts, c, sw.ptr, if sw.accumulate { 1.0 } else { 0.0 }, DType::F32)?;
            return Ok((gx, None, None));
        }
    }
    // Else each parameter gradient: the column sums of its block of partials, into its slot or
    // a new tensor.
    let sum = |want: bool, at: usize, sink: Option<crate::autograd::GradSink>| -> Result<Option<Tensor>> {
        let Some(part) = part.as_ref().filter(|_| want) else { return Ok(None) };
        let (t, out, beta) = weight_grad_dest(&d, sink, 1, c)?;
        sum_rows_into(&d, ptr(part)? + (at * parts * c * 4) as u64, parts, c, out, beta, DType::F32)?;
        t.map(|t| t.reshape(&[c])).transpose()
    };
    Ok((gx, sum(want_w, 0, sinks.w)?, sum(want_b, 1, sinks.b)?))
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
