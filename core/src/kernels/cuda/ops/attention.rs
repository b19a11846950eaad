//! The fused causal attention core (optionally with dropout on the probabilities), forward and backward.

use super::*;

/// What the attention forward keeps for backward.
pub struct AttnSaved {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    p: Tensor,
}

/// The probabilities `p` with dropout `drop` applied, as a new tensor (`None` without dropout).
pub(super) fn dropped_probs(d: &Arc<CudaDev>, p: &Tensor, drop: Option<crate::ops::dropout::Dropout>) -> Result<Option<Tensor>> {
    drop.map(|dr| {
        let pd = empty(d, p.shape())?;
        dropout_raw(d, ptr(p)?, ptr(&pd)?, p.numel(), dr)?;
        Ok(pd)
    })
    .transpose()
}

/// Causal attention over packed qkv `[b, t, 3c]`: (y `[b, t, c]`, saved, the maximum logit of
/// each row `[b·h·t]`, left on the device).
/// `scale` multiplies the scores; `drop`: dropout on the probabilities before P·V (the mask
/// regenerated in backward).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    qkv: &Tensor,
    b: usize,
    t: usize,
    h: usize,
    dh: usize,
    scale: f64,
    prec: Prec,
    drop: Option<crate::ops::dropout::Dropout>,
) -> Result<(Tensor, AttnSaved, Tensor)> {
    // A bf16 activation (a `linear_half` projection) is read in f32 here: this path's kernels
    // are f32. y is then given back in bf16 as flash attention's is (its gradient is widened
    // in backward; qkv's comes back in f32 and the tape rounds it to qkv's dtype).
    let in_dt = qkv.dtype();
    let qkv = &cast(qkv, DType::F32)?;
    let d = dev_of(qkv)?;
    let qkv = contiguous(qkv)?;
    let bh = b * h;
    let (q, k, v) = (empty(&d, &[bh, t, dh])?, empty(&d, &[bh, t, dh])?, empty(&d, &[bh, t, dh])?);
    let n = b * t * h * dh;
    let (bi, ti, hi, di) = (b as i64, t as i64, h as i64, dh as i64);
    // split_heads_f32(const float* qkv, float* q, float* k, float* v, i64 b, i64 t, i64 h, i64 d)
    launch!(d, "attention", "split_heads_f32", grid(n); ptr(&qkv)?, ptr(&q)?, ptr(&k)?, ptr(&v)?, bi, ti, hi, di)?;
    let p = empty(&d, &[bh, t, t])?;
    let td = t * dh;
    let row = |x: &Tensor| -> Result<MatArg> { Ok(MatArg { ptr: ptr(x)?, trans: false, ld: dh, batch_stride: td }) };
    let tr = |x: &Tensor| -> Result<MatArg> { Ok(MatArg { ptr: ptr(x)?, trans: true, ld: dh, batch_stride: td }) };
    // S = Q·Kᵀ·scale
    gemm_prec(&d, t, t, dh, (&q, row(&q)?), (&k, tr(&k)?), ptr(&p)?, bh, scale as f32, 0.0, prec)?;
    let row_max = empty(&d, &[bh * t])?;
    // causal_softmax_fwd_f32(float* s, float* row_max, i64 rows, i64 t)
    launch!(d, "attention", "causal_softmax_fwd_f32", per_row(bh * t); ptr(&p)?, ptr(&row_max)?, (bh * t) as i64, ti)?;
    let o = empty(&d, &[bh, t, dh])?;
    // P·V reads the dropped probabilities; P itself is saved for the softmax backward.
    let pd = dropped_probs(&d, &p, drop)?;
    let pv = pd.as_ref().unwrap_or(&p);
    let pm = MatArg { ptr: ptr(pv)?, trans: false, ld: t, batch_stride: t * t };
    gemm_prec(&d, t, dh, t, (pv, pm), (&v, row(&v)?), ptr(&o)?, bh, 1.0, 0.0, prec)?;
    let y = empty(&d, &[b, t, h * dh])?;
    // merge_heads_f32(const float* o, float* y, i64 b, i64 t, i64 h, i64 d)
    launch!(d, "attention", "merge_heads_f32", grid(n); ptr(&o)?, ptr(&y)?, bi, ti, hi, di)?;
    Ok((cast(&y, in_dt)?, AttnSaved { q, k, v, p }, row_max))
}

#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(
    g: &Tensor,
    s: &AttnSaved,
    b: usize,
    t: usize,
    h: usize,
    dh: usize,
    scale: f64,
    prec: Prec,
    drop: Option<crate::ops::dropout::Dropout>,
) -> Result<Tensor> {
    let d = dev_of(g)?;
    let g = contiguous(&cast(g, DType::F32)?)?;
    let bh = b * h;
    let n = b * t * h * dh;
    let (bi, ti, hi, di) = (b as i64, t as i64, h as i64, dh as i64);
    let go = empty(&d, &[bh, t, dh])?;
    // unmerge_heads_f32(const float* y, float* o, i64 b, i64 t, i64 h, i64 d)
    launch!(d, "attention", "unmerge_heads_f32", grid(n); ptr(&g)?, ptr(&go)?, bi, ti, hi, di)?;
    let td = t * dh;
    let row = |x: &Tensor| -> Result<MatArg> { Ok(MatArg { ptr: ptr(x)?, trans: false, ld: dh, batch_stride: td }) };
    let tr = |x: &Tensor| -> Result<MatArg> { Ok(MatArg { ptr: ptr(x)?, trans: true, ld: dh, batch_stride: td }) };
    let sq = |x: &Tensor, trans: bool| -> Result<MatArg> { Ok(MatArg { ptr: ptr(x)?, trans, ld: t, batch_stride: t * t }) };
    // dV = Pᵀ·dO, with the dropped P forward used (regenerated from the mask's key)
    let dv = empty(&d, &[bh, t, dh])?;
    let pd = dropped_probs(&d, &s.p, drop)?;
    let pv = pd.as_ref().unwrap_or(&s.p);
    gemm_prec(&d, t, dh, t, (pv, sq(pv, true)?), (&go, row(&go)?), ptr(&dv)?, bh, 1.0, 0.0, prec)?;
    std::mem::drop(pd);
    // dP = dO·Vᵀ (through the dropout mask), then dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale in place
    let dp = empty(&d, &[bh, t, t])?;
    gemm_prec(&d, t, t, dh, (&go, row(&go)?), (&s.v, tr(&s.v)?), ptr(&dp)?, bh, 1.0, 0.0, prec)?;
    if let Some(dr) = drop {
        dropout_raw(&d, ptr(&dp)?, ptr(&dp)?, bh * t * t, dr)?;
    }
    let scale = scale as f32;
    // causal_softmax_bwd_f32(const float* p, float* dp, i64 rows, i64 t, float scale)
    launch!(d, "attention", "causal_softmax_bwd_f32", per_row(bh * t); ptr(&s.p)?, ptr(&dp)?, (bh * t) as i64, ti, scale)?;
    // dQ = dS·K, dK = dSᵀ·Q
    let (dq, dk) = (empty(&d, &[bh, t, dh])?, empty(&d, &[bh, t, dh])?);
    gemm_prec(&d, t, dh, t, (&dp, sq(&dp, false)?), (&s.k, row(&s.k)?), ptr(&dq)?, bh, 1.0, 0.0, prec)?;
    gemm_prec(&d, t, dh, t, (&dp, sq(&dp, true)?), (&s.q, row(&s.q)?), ptr(&dk)?, bh, 1.0, 0.0, prec)?;
    let gx = empty(&d, &[b, t, 3 * h * dh])?;
    // join_heads_f32(const float* dq, const float* dk, const float* dv, float* dqkv, i64 b, i64 t, i64 h, i64 d)
    launch!(d, "attention", "join_heads_f32", grid(n); ptr(&dq)?, ptr(&dk)?, ptr(&dv)?, ptr(&gx)?, bi, ti, hi, di)?;
    Ok(gx)
}

/// Head sizes the flash kernels are built for (their register tiles are sized at compile time).
pub const FLASH_HEAD_DIMS: &[usize] = &[32, 64];

/// Whether `d` can run the flash kernels: bf16 tensor cores (`mma.sync` bf16) need sm_80 or
/// newer; the emulator models them.
pub fn flash_supported(d: &CudaDev) -> bool {
    d.is_emulated() || d.arch.strip_prefix("sm_").and_then(|v| v.parse::<u32>().ok()).is_some_and(|v| v >= 80)
}

/// What the flash forward keeps for backward: qkv and y as they were, and the log-sum-exp of
/// each score row (`[B·H·T]`) — O(T) instead of the T × T probabilities.
pub struct FlashSaved {
    qkv: Tensor,
    y: Tensor,
    lse: Tensor,
}

/// One block of 128 threads per work item (a head and a query or key tile of `rows`), up to the
/// grid limit (the kernels loop over the rest).
fn flash_launch(b: usize, t: usize, h: usize, rows: usize) -> LaunchConfig {
    let work = b * h * t.div_ceil(rows);
    LaunchConfig { grid_dim: (work.clamp(1, 65535) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }
}

/// The flash kernel for `stem` (fwd, fwd128: the forward on 128-row query tiles, dq, dkv), head
/// size `dh`, and element type (bf16 tensors, or f32).
fn flash_kernel(stem: &str, dh: usize, bf16: bool) -> Result<&'static str> {
    Ok(match (stem, dh, bf16) {
        ("fwd128", 32, false) => "flash_fwd128_d32",
        ("fwd128", 64, false) => "flash_fwd128_d64",
        ("fwd128", 32, true) => "flash_fwd128_d32_bf16",
        ("fwd128", 64, true) => "flash_fwd128_d64_bf16",
        ("fwd", 32, false) => "flash_fwd_d32",
        ("fwd", 64, false) => "flash_fwd_d64",
        ("dq", 32, false) => "flash_bwd_dq_d32",
        ("dq", 64, false) => "flash_bwd_dq_d64",
        ("dkv", 32, false) => "flash_bwd_dkv_d32",
        ("dkv", 64, false) => "flash_bwd_dkv_d64",
        ("fwd", 32, true) => "flash_fwd_d32_bf16",
        ("fwd", 64, true) => "flash_fwd_d64_bf16",
        ("dq", 32, true) => "flash_bwd_dq_d32_bf16",
        ("dq", 64, true) => "flash_bwd_dq_d64_bf16",
        ("dkv", 32, true) => "flash_bwd_dkv_d32_bf16",
        ("dkv", 64, true) => "flash_bwd_dkv_d64_bf16",
        _ => return Err(Error::shape("flash_attention", format!("head size {dh} (built for {FLASH_HEAD_DIMS:?})"))),
    })
}

/// (step key address, key, threshold, 1/(1 − p)) of attention dropout for the flash kernels
/// (see `dpt_mask_key`); threshold 0: none.
fn flash_dropout(drop: Option<crate::ops::dropout::Dropout>) -> (u64, i64, i64, f32) {
    drop.map(|dr| {
        let (at, key) = dr.kernel_key();
        (at, key, dr.threshold() as i64, dr.scale())
    })
    .unwrap_or((0, 0, 0, 1.0))
}

/// Causal attention over packed qkv `[b, t, 3c]` with bf16 tensor-core products and no T × T
/// tensor: (y `[b, t, c]`, saved, the maximum scaled logit of each row `[b·h·t]`). `drop`:
/// dropout on the probabilities (the same mask as the unfused path's). qkv f32 or bf16; y (and
/// in backward dO and dqkv) in qkv's dtype.
pub fn flash_attention(
    qkv: &Tensor,
    b: usize,
    t: usize,
    h: usize,
    dh: usize,
    scale: f64,
    drop: Option<crate::ops::dropout::Dropout>,
) -> Result<(Tensor, FlashSaved, Tensor)> {
    let bf16 = qkv.dtype() == DType::BF16;
    let qkv = if bf16 {
        if !qkv.is_contiguous() {
            return Err(Error::shape("causal_attention", "a strided bf16 qkv on CUDA"));
        }
        qkv.clone()
    } else {
        f32_only(qkv, "causal_attention")?;
        contiguous(qkv)?
    };
    let d = dev_of(&qkv)?;
    let rows = if d.fusions().flash_wide { 128 } else { 64 };
    let kernel = flash_kernel(if rows == 128 { "fwd128" } else { "fwd" }, dh, bf16)?;
    let y = empty_as(&d, &[b, t, h * dh], qkv.dtype())?;
    let (lse, row_max) = (empty(&d, &[b * h * t])?, empty(&d, &[b * h * t])?);
    let (step_key, key, threshold, dscale) = flash_dropout(drop);
    // flash_fwd_d*(const float* qkv, float* y, float* lse, float* row_max, i64 b, i64 t, i64 h, float scale, const u64_t* step_key,
    //              i64 key, i64 threshold, float dscale)
    launch!(d, "flash", kernel, flash_launch(b, t, h, rows);
        ptr(&qkv)?, ptr(&y)?, ptr(&lse)?, ptr(&row_max)?, b as i64, t as i64, h as i64, scale as f32, step_key, key, threshold, dscale)?;
    Ok((y.clone(), FlashSaved { qkv, y, lse }, row_max))
}

/// Backward of [`flash_attention`] (the same `drop`): the gradient of qkv `[b, t, 3c]`.
#[allow(clippy::too_many_arguments)]
pub fn flash_attention_bwd(
    g: &Tensor,
    s: &FlashSaved,
    b: usize,
    t: usize,
    h: usize,
    dh: usize,
    scale: f64,
    drop: Option<crate::ops::dropout::Dropout>,
) -> Result<Tensor> {
    let d = dev_of(g)?;
    let dt = s.qkv.dtype();
    let bf16 = dt == DType::BF16;
    // dO in the kernels' element type (the tape gives y's gradient in y's dtype already).
    let g = if g.dtype() != dt {
        cast(g, dt)?
    } else if bf16 {
        g.clone()
    } else {
        contiguous(g)?
    };
    if !g.is_contiguous() {
        return Err(Error::shape("causal_attention", "a strided bf16 output gradient on CUDA"));
    }
    let (bi, ti, hi) = (b as i64, t as i64, h as i64);
    let dvec = empty(&d, &[b * h * t])?;
    if bf16 {
        // flash_bwd_dot_bf16(const bf16_t* go, const bf16_t* y, float* dvec, i64 b, i64 t, i64 h, i64 d)
        launch!(d, "flash", "flash_bwd_dot_bf16", grid(8 * b * h * t); ptr(&g)?, ptr(&s.y)?, ptr(&dvec)?, bi, ti, hi, dh as i64)?;
    } else {
        // flash_bwd_dot_f32(const float* go, const float* y, float* dvec, i64 b, i64 t, i64 h, i64 d)
        launch!(d, "flash", "flash_bwd_dot_f32", grid(8 * b * h * t); ptr(&g)?, ptr(&s.y)?, ptr(&dvec)?, bi, ti, hi, dh as i64)?;
    }
    let gx = empty_as(&d, &[b, t, 3 * h * dh], dt)?;
    let (step_key, key, threshold, dscale) = flash_dropout(drop);
    // flash_bwd_{dq,dkv}_d*[_bf16](const E* qkv, const E* go, const float* lse, const float* dvec, E* dqkv, i64 b, i64 t, i64 h,
    //                             float scale, const u64_t* step_key, i64 key, i64 threshold, float dscale)
    launch!(d, "flash", flash_kernel("dq", dh, bf16)?, flash_launch(b, t, h, 64);
        ptr(&s.qkv)?, ptr(&g)?, ptr(&s.lse)?, ptr(&dvec)?, ptr(&gx)?, bi, ti, hi, scale as f32, step_key, key, threshold, dscale)?;
    launch!(d, "flash", flash_kernel("dkv", dh, bf16)?, flash_launch(b, t, h, 64);
        ptr(&s.qkv)?, ptr(&g)?, ptr(&s.lse)?, ptr(&dvec)?, ptr(&gx)?, bi, ti, hi, scale as f32, step_key, key, threshold, dscale)?;
    Ok(gx)
}
