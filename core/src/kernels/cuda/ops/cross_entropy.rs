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
    let (lse, stats) = rows_and_stats(&d, &x, &tg, rows, v, z)?;
    Ok((lse, tg, stats))
}

/// The forward's rows over packed logits `x [rows, v]` (f32 or bf16), then the batch statistics
/// folded on the device: (lse per row, statistics `[6]`).
fn rows_and_stats(d: &Arc<CudaDev>, x: &Tensor, tg: &DevBuf, rows: usize, v: usize, z: f64) -> Result<(Tensor, Tensor)> {
    let (loss, lse, rsum, correct) = (empty(d, &[rows])?, empty(d, &[rows])?, empty(d, &[rows])?, empty(d, &[rows])?);
    let wide = d.fusions().wide_loads as i32;
    if x.dtype() == DType::BF16 {
        // xent_fwd_bf16(bf16 x, targets, loss, lse, row_sum, correct, i64 rows, i64 v, float z, int wide)
        launch!(d, "cross_entropy", "xent_fwd_bf16", per_row(rows);
            ptr(x)?, tg.ptr, ptr(&loss)?, ptr(&lse)?, ptr(&rsum)?, ptr(&correct)?, rows as i64, v as i64, z as f32, wide)?;
    } else {
        // xent_fwd_f32(x, targets, loss, lse, row_sum, correct, i64 rows, i64 v, float z, int wide)
        launch!(d, "cross_entropy", "xent_fwd_f32", per_row(rows);
            ptr(x)?, tg.ptr, ptr(&loss)?, ptr(&lse)?, ptr(&rsum)?, ptr(&correct)?, rows as i64, v as i64, z as f32, wide)?;
    }
    let stats = empty(d, &[6])?;
    let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    // xent_stats_f32(loss, lse, row_sum, correct, out, i64 rows, i64 v, float z)
    launch!(d, "cross_entropy", "xent_stats_f32", one;
        ptr(&loss)?, ptr(&lse)?, ptr(&rsum)?, ptr(&correct)?, ptr(&stats)?, rows as i64, v as i64, z as f32)?;
    Ok((lse, stats))
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
    // xent_bwd_f32(x, targets, lse, gx, i64 rows, i64 v, float z, const float* go, float scale, int wide)
    launch!(d, "cross_entropy", "xent_bwd_f32", per_row(rows);
        ptr(&x)?, targets.ptr, ptr(lse)?, ptr(&gx)?, rows as i64, v as i64, z as f32, ptr(&go)?, scale as f32,
        d.fusions().wide_loads as i32)?;
    Ok(gx)
}

/// What the fused classifier's backward reads: the bf16 logits (its gradient is written over
/// them), the bf16 operands of the forward product, log Z per row and the targets.
pub struct ClassifierSaved {
    logits: Tensor,
    x16: Tensor,
    w16: Tensor,
    lse: Tensor,
    targets: DevBuf,
}

/// The classifier under bf16, fused: logits = bf16(x2) · bf16(w)ᵀ for x2 `[rows, k]`, w `[v, k]`,
/// written by the GEMM in bf16 (half the bytes of f32 logits, never cast), then the
/// cross-entropy rows read them. Returns what backward needs and the statistics `[6]` (as
/// [`cross_entropy`]).
pub fn linear_cross_entropy(x2: &Tensor, w: &Tensor, w16: Option<&Tensor>, targets: &[u32], z: f64) -> Result<(ClassifierSaved, Tensor)> {
    f32_only(x2, "linear_cross_entropy")?;
    let d = dev_of(x2)?;
    let (rows, k, v) = (x2.shape()[0], x2.shape()[1], w.shape()[0]);
    let x16 = cast(&contiguous(x2)?, DType::BF16)?;
    let w16 = match w16 {
        Some(h) => super::matmul::half_twin(w, h)?,
        None => cast(&contiguous(w)?, DType::BF16)?,
    };
    let logits = empty_as(&d, &[rows, v], DType::BF16)?;
    let row = |t: &Tensor, trans: bool| -> Result<MatArg> { Ok(MatArg { ptr: ptr(t)?, trans, ld: k.max(1), batch_stride: 0 }) };
    d.gemm_to(rows, v, k, row(&x16, false)?, row(&w16, true)?, ptr(&logits)?, 1, 1.0, 0.0, DType::BF16, DType::BF16)?;
    let tg = upload_ids(&d, targets)?;
    let (lse, stats) = rows_and_stats(&d, &logits, &tg, rows, v, z)?;
    Ok((ClassifierSaved { logits, x16, w16, lse, targets: tg }, stats))
}

/// The fused classifier's gradients (x `[rows, k]`, w `[v, k]`) for the upstream gradient `go`
/// (one element, on the device) of the mean loss: the logits' gradient is written in bf16 over
/// the logits and read by both products as it is. With `sink` (the weight is a parameter) the
/// weight gradient is written straight into the flat gradient buffer and not returned.
pub fn linear_cross_entropy_bwd(
    s: ClassifierSaved,
    z: f64,
    go: &Tensor,
    sink: Option<crate::autograd::GradSink>,
) -> Result<(Tensor, Option<Tensor>)> {
    let d = dev_of(&s.logits)?;
    let (rows, v) = (s.logits.shape()[0], s.logits.shape()[1]);
    let k = s.x16.shape()[1];
    let go = contiguous(go)?;
    let scale = 1.0 / rows.max(1) as f64;
    let g = ptr(&s.logits)?;
    // xent_bwd_bf16_inplace(x, targets, lse, i64 rows, i64 v, float z, const float* go, float scale, int wide)
    launch!(d, "cross_entropy", "xent_bwd_bf16_inplace", per_row(rows);
        g, s.targets.ptr, ptr(&s.lse)?, rows as i64, v as i64, z as f32, ptr(&go)?, scale as f32,
        d.fusions().wide_loads as i32)?;
    let gx = empty(&d, &[rows, k])?;
    let (gw, gw_ptr, beta) = weight_grad_dest(&d, sink, v, k)?;
    let mat = |p: u64, trans: bool, ld: usize| MatArg { ptr: p, trans, ld: ld.max(1), batch_stride: 0 };
    // gx = g · w, gw = gᵀ · x, all operands bf16.
    d.gemm(rows, k, v, mat(g, false, v), mat(ptr(&s.w16)?, false, k), ptr(&gx)?, 1, 1.0, 0.0, DType::BF16)?;
    d.gemm(v, k, rows, mat(g, true, v), mat(ptr(&s.x16)?, false, k), gw_ptr, 1, 1.0, beta, DType::BF16)?;
    Ok((gx, gw))
}
