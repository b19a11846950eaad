//! Matrix products on cuBLAS(Lt): batched and transposed operands, bf16 inputs with f32 accumulation, `linear` and its gradients.

use super::*;
use crate::tensor::cuda::Epilogue;

/// A GEMM operand for the logical `[.., rows, cols]` view `t` (its last two dims), packing it
/// when cuBLAS cannot read the strides, with the batch stride `bs`. Returns the tensor that
/// owns the data.
pub(super) fn operand_2d(t: &Tensor, bs: usize) -> Result<(Tensor, MatArg)> {
    let r = t.rank();
    let (rows, cols, rs, cs) = (t.shape()[r - 2], t.shape()[r - 1], t.strides()[r - 2], t.strides()[r - 1]);
    if let Some((trans, ld)) = mat_layout(rows, cols, rs, cs) {
        return Ok((t.clone(), MatArg { ptr: ptr(t)?, trans, ld, batch_stride: bs }));
    }
    let c = contiguous(t)?;
    let bs = if bs == 0 { 0 } else { rows * cols };
    Ok((c.clone(), MatArg { ptr: ptr(&c)?, trans: false, ld: cols, batch_stride: bs }))
}

/// bf16 copy of the span a GEMM operand reads (`extent` elements from its pointer, layout
/// kept), for `Prec::Bf16`.
pub(super) fn to_bf16_operand(owner: &Tensor, m: MatArg, extent: usize) -> Result<(Tensor, MatArg)> {
    let d = dev_of(owner)?;
    let n = extent;
    let out = wrap(d.alloc(n * 2)?, DType::BF16, &[n]);
    cast_raw(&d, m.ptr, ptr(&out)?, n, true)?;
    let p = ptr(&out)?;
    Ok((out, MatArg { ptr: p, ..m }))
}

/// Batched product `[.., m, k] @ [.., k, n]` (or `@ [k, n]`) into a new packed f32 tensor.
pub fn matmul(a: &Tensor, b: &Tensor, prec: Prec) -> Result<Tensor> {
    f32_only(a, "matmul")?;
    f32_only(b, "matmul")?;
    let d = dev_of(a)?;
    let (ra, rb) = (a.rank(), b.rank());
    if ra < 2 || rb < 2 || a.shape()[ra - 1] != b.shape()[rb - 2] || (rb > 2 && a.shape()[..ra - 2] != b.shape()[..rb - 2]) {
        return Err(Error::shape("matmul", format!("{:?} @ {:?}", a.shape(), b.shape())));
    }
    let (m, k, n) = (a.shape()[ra - 2], a.shape()[ra - 1], b.shape()[rb - 1]);
    let batch: usize = a.shape()[..ra - 2].iter().product();
    // Batch dims must collapse to one stride; otherwise pack the operand.
    let collapse = |t: &Tensor| -> Result<Tensor> {
        let r = t.rank();
        if merge_dims(&t.shape()[..r - 2], &t.strides()[..r - 2]).len() <= 1 {
            Ok(t.clone())
        } else {
            contiguous(t)
        }
    };
    let (a, b) = (collapse(a)?, collapse(b)?);
    let bs = |t: &Tensor| {
        let r = t.rank();
        merge_dims(&t.shape()[..r - 2], &t.strides()[..r - 2]).first().map(|d| d.1).unwrap_or(0)
    };
    let (ao, am) = operand_2d(&a, bs(&a))?;
    let (bo, bm) = operand_2d(&b, bs(&b))?;
    let mut shape = a.shape()[..ra - 2].to_vec();
    shape.extend([m, n]);
    let out = empty(&d, &shape)?;
    gemm_prec(&d, m, n, k, (&ao, am), (&bo, bm), ptr(&out)?, batch.max(1), 1.0, 0.0, prec)?;
    Ok(out)
}

/// One GEMM with operands given as (owner, layout), casting them to bf16 first under
/// `Prec::Bf16`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_prec(
    d: &Arc<CudaDev>,
    m: usize,
    n: usize,
    k: usize,
    a: (&Tensor, MatArg),
    b: (&Tensor, MatArg),
    c: u64,
    batch: usize,
    alpha: f32,
    beta: f32,
    prec: Prec,
) -> Result<()> {
    match prec {
        Prec::F32 => d.gemm(m, n, k, a.1, b.1, c, batch, alpha, beta, DType::F32),
        Prec::Bf16 => {
            let (_ka, a16) = to_bf16_operand(a.0, a.1, operand_extent(m, k, &a.1, batch))?;
            let (_kb, b16) = to_bf16_operand(b.0, b.1, operand_extent(k, n, &b.1, batch))?;
            d.gemm(m, n, k, a16, b16, c, batch, alpha, beta, DType::BF16)
        }
    }
}

pub(super) fn packed(t: &Tensor) -> Result<(Tensor, MatArg)> {
    let c = contiguous(t)?;
    let cols = *c.shape().last().unwrap_or(&1);
    let p = ptr(&c)?;
    Ok((c, MatArg { ptr: p, trans: false, ld: cols.max(1), batch_stride: 0 }))
}

/// What `linear`'s backward reads: its operands as the forward product read them. Under
/// `Prec::Bf16` these are the bf16 copies the forward made (x packed `[rows, k]`, w `[n, k]`),
/// so each operand is rounded once per step, not again for each backward product, and the f32
/// input need not outlive the forward; under f32 the tensors themselves.
pub struct LinearSaved {
    x: Tensor,
    w: Tensor,
    /// The input gradient's dtype (bf16 for an input that was a bf16 activation).
    gx: DType,
}

/// A packed bf16 copy of `t` (same shape).
fn bf16_copy(t: &Tensor) -> Result<Tensor> {
    cast(t, DType::BF16)
}

/// A parameter's bf16 copy kept by the optimizer (`ParamStore::half`, a weight's or a bias's),
/// checked to be one.
pub(super) fn half_twin(p: &Tensor, h: &Tensor) -> Result<Tensor> {
    if h.dtype() != DType::BF16 || h.shape() != p.shape() || !h.is_contiguous() {
        return Err(Error::shape(
            "linear",
            format!("a bf16 parameter copy {:?} ({}) for a parameter {:?}", h.shape(), h.dtype(), p.shape()),
        ));
    }
    Ok(h.clone())
}

/// A bf16 tensor as a packed GEMM operand (bf16 views are not packed on the device).
fn contiguous_bf16(t: &Tensor) -> Result<Tensor> {
    if !t.is_contiguous() {
        return Err(Error::shape("linear", "a strided bf16 input on CUDA"));
    }
    Ok(t.clone())
}

/// Row-major `[rows, cols]` at `t`'s first element, read as is or transposed.
fn rowmajor(t: &Tensor, cols: usize, trans: bool) -> Result<MatArg> {
    Ok(MatArg { ptr: ptr(t)?, trans, ld: cols.max(1), batch_stride: 0 })
}

/// How a GPU `linear` stores what it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearDtypes {
    /// The output y: f32, or (under `Prec::Bf16`) bf16 — autocast's linear output, for a
    /// consumer that reads bf16 (flash attention, GELU); its bias is then added in bf16.
    pub y: DType,
    /// The input gradient: f32, or (under `Prec::Bf16`) bf16 — for an input that was a bf16
    /// activation, whose gradient is bf16 as autocast's is.
    pub gx: DType,
}

impl LinearDtypes {
    pub const F32: LinearDtypes = LinearDtypes { y: DType::F32, gx: DType::F32 };
}

/// `y = x2 @ wᵀ (+ b)` for packed x2 `[rows, k]`, w `[n, k]`; and what backward reads. The bias
/// is added by the GEMM's epilogue (cuBLASLt), or where that cannot run by one pass over y.
/// Under `Prec::Bf16`, x2 may already be bf16 (a producer wrote the operand: `gelu_linear`, or
/// a bf16 activation), and `dt` may ask for bf16 y and input gradient; under f32 both are f32.
/// `w16`: the weight's bf16 copy kept by the optimizer, read instead of casting w under bf16;
/// `b16` the bias's, read instead of casting b for a bf16 output (when 16-byte aligned, as
/// cuBLASLt's epilogue wants it).
/// `residual`: an f32 tensor of y's shape added to it (`y = residual + x2 @ wᵀ + b`, y in f32):
/// read by cuBLASLt as the GEMM's C where it can, else copied into y for the GEMM to add to.
#[allow(clippy::too_many_arguments)]
pub fn linear(
    x2: &Tensor,
    (w, w16): (&Tensor, Option<&Tensor>),
    (b, b16): (Option<&Tensor>, Option<&Tensor>),
    out_shape: &[usize],
    prec: Prec,
    dt: LinearDtypes,
    residual: Option<&Tensor>,
) -> Result<(Tensor, LinearSaved)> {
    if !(prec == Prec::Bf16 && x2.dtype() == DType::BF16) {
        f32_only(x2, "linear")?;
    }
    let dt = if prec == Prec::Bf16 { dt } else { LinearDtypes::F32 };
    let d = dev_of(x2)?;
    let (rows, k, n) = (x2.shape()[0], x2.shape()[1], w.shape()[0]);
    let out = empty_as(&d, out_shape, dt.y)?;
    // `_wo` owns the weight operand's memory (a packed copy when cuBLAS cannot read w's
    // strides) until the products are queued.
    let (xa, (_wo, wa), in_dt, saved) = match prec {
        Prec::F32 => {
            let (xo, xm) = packed(x2)?;
            // wᵀ [k, n]: a transposed view of w (no copy).
            (xm, operand_2d(&w.transpose(0, 1)?, 0)?, DType::F32, LinearSaved { x: xo, w: w.clone(), gx: DType::F32 })
        }
        Prec::Bf16 => {
            let (xa, wa, saved) = bf16_operands(x2, w, w16, dt.gx)?;
            (xa, wa, DType::BF16, saved)
        }
    };
    // A bf16 output takes its bias in bf16 (as autocast's does).
    let bias = match b {
        Some(b) if dt.y == DType::BF16 => Some(bf16_bias(b, b16)?),
        Some(b) => Some(contiguous(b)?),
        None => None,
    };
    if let Some(r) = residual {
        if dt.y != DType::F32 || r.dtype() != DType::F32 || r.shape() != out_shape {
            return Err(Error::shape("linear", format!("a residual {:?} {} for an output {out_shape:?} {}", r.shape(), r.dtype(), dt.y)));
        }
        let r = contiguous(r)?;
        let y = ptr(&out)?;
        let ep = match &bias {
            Some(bc) => Epilogue::Bias(ptr(bc)?),
            None => Epilogue::None,
        };
        if !d.gemm_epilogue(rows, n, k, xa, wa, y, 1.0, 1.0, in_dt, DType::F32, ep, Some(ptr(&r)?))? {
            // The same sum without cuBLASLt: the residual in y, the product added (beta 1),
            // then the bias.
            d.copy(y, ptr(&r)?, rows * n * 4)?;
            d.gemm(rows, n, k, xa, wa, y, 1, 1.0, 1.0, in_dt)?;
            if let Some(bc) = &bias {
                add_bias_in_place(&d, y, bc, rows * n, n)?;
            }
        }
        return Ok((out, saved));
    }
    let fused = match &bias {
        Some(bc) => d.gemm_epilogue(rows, n, k, xa, wa, ptr(&out)?, 1.0, 0.0, in_dt, dt.y, Epilogue::Bias(ptr(bc)?), None)?,
        None => false,
    };
    if !fused {
        let y = ptr(&out)?;
        let total = rows * n;
        match (&bias, dt.y) {
            (Some(bc), DType::BF16) => {
                // The epilogue's numbers without it: the f32 product, plus the bf16 bias,
                // rounded once.
                let tmp = empty(&d, &[rows, n])?;
                d.gemm(rows, n, k, xa, wa, ptr(&tmp)?, 1, 1.0, 0.0, in_dt)?;
                // add_bias_bf16(const float* x, const bf16_t* bias, bf16_t* out, i64 total, i64 n)
                launch!(d, "elementwise", "add_bias_bf16", grid(total); ptr(&tmp)?, ptr(bc)?, y, total as i64, n as i64)?;
            }
            (Some(bc), _) => {
                d.gemm(rows, n, k, xa, wa, y, 1, 1.0, 0.0, in_dt)?;
                add_bias_in_place(&d, y, bc, total, n)?;
            }
            (None, out_dt) => d.gemm_to(rows, n, k, xa, wa, y, 1, 1.0, 0.0, in_dt, out_dt)?,
        }
    }
    Ok((out, saved))
}

/// `x2 @ wᵀ`'s bf16 operands as `linear` reads them — x2 as it is when a producer wrote it in
/// bf16, else a bf16 copy; the weight's bf16 copy kept by the optimizer (`w16`) or one made
/// here — and what backward reads (its input gradient in `gx`).
fn bf16_operands(x2: &Tensor, w: &Tensor, w16: Option<&Tensor>, gx: DType) -> Result<(MatArg, (Tensor, MatArg), LinearSaved)> {
    let k = x2.shape()[1];
    let x16 = if x2.dtype() == DType::BF16 { contiguous_bf16(x2)? } else { bf16_copy(x2)? };
    let w16 = match w16 {
        Some(h) => half_twin(w, h)?,
        None => bf16_copy(w)?,
    };
    Ok((rowmajor(&x16, k, false)?, (w16.clone(), rowmajor(&w16, k, true)?), LinearSaved { x: x16, w: w16, gx }))
}

/// A bias added to a bf16 output, in bf16: the optimizer's copy (`b16`) when it is 16-byte
/// aligned, as cuBLASLt's epilogue wants it, else a copy made here.
fn bf16_bias(b: &Tensor, b16: Option<&Tensor>) -> Result<Tensor> {
    match b16 {
        Some(h) if ptr(h)?.is_multiple_of(16) => half_twin(b, h),
        _ => bf16_copy(b),
    }
}

/// A transformer MLP's first product and its GELU (tanh form) from one cuBLASLt GEMM:
/// `pre = x2 @ wᵀ (+ b)` and `act = gelu(pre)`, both bf16 `[rows, n]` (`out_shape`), the
/// GELU taken of the f32 sum before it is rounded. Bf16 operands as `linear`'s under
/// `Prec::Bf16` (its input gradient in `gx`), and what backward reads. `None`, having launched
/// nothing, where the epilogue cannot run (`Fusions::gelu_epilogue` or `epilogue` off, no
/// cuBLASLt or no algorithm for the shape, n not a multiple of 8): the caller then computes
/// the same numbers from an f32 product (`ops::matmul::linear_gelu_value`).
pub fn linear_gelu(
    x2: &Tensor,
    (w, w16): (&Tensor, Option<&Tensor>),
    (b, b16): (Option<&Tensor>, Option<&Tensor>),
    out_shape: &[usize],
    gx: DType,
) -> Result<Option<(Tensor, Tensor, LinearSaved)>> {
    let d = dev_of(x2)?;
    if !(d.fusions().gelu_epilogue && d.fusions().epilogue) {
        return Ok(None);
    }
    if x2.dtype() != DType::BF16 {
        f32_only(x2, "linear")?;
    }
    let (rows, k, n) = (x2.shape()[0], x2.shape()[1], w.shape()[0]);
    let (xa, (_wo, wa), saved) = bf16_operands(x2, w, w16, gx)?;
    let bias = b.map(|b| bf16_bias(b, b16)).transpose()?;
    let (act, pre) = (empty_as(&d, out_shape, DType::BF16)?, empty_as(&d, out_shape, DType::BF16)?);
    let ep = Epilogue::Gelu { bias: bias.as_ref().map(ptr).transpose()?, aux: ptr(&pre)? };
    if !d.gemm_epilogue(rows, n, k, xa, wa, ptr(&act)?, 1.0, 0.0, DType::BF16, DType::BF16, ep, None)? {
        return Ok(None);
    }
    Ok(Some((act, pre, saved)))
}

/// `y[total] += bias[n]` repeating every n elements, in place (a linear's bias where no
/// epilogue adds it).
fn add_bias_in_place(d: &CudaDev, y: u64, bias: &Tensor, total: usize, n: usize) -> Result<()> {
    // add_f32(a, b, out, n, na, nb)
    launch!(d, "elementwise", "add_f32", grid(total); y, ptr(bias)?, y, total as i64, total as i64, n as i64)
}

/// `linear`'s gradients for g `[rows, n]`: input (`g @ w` → `in_shape`, in the dtype the
/// forward was asked for), weight (`gᵀ @ x` → `[n, k]`, f32) and, when `with_bias`, bias (the
/// column sums of g, summed by the weight GEMM's epilogue where cuBLASLt can). Under bf16, g is
/// rounded once for all three (read as it is when already bf16), as a bf16 gradient under
/// PyTorch's autocast is. With `sink` (the weight is a parameter) the weight-gradient GEMM
/// writes into the flat gradient buffer itself and no weight gradient is returned.
/// `gelu_pre`: the input was GELU (tanh form) of this bf16 pre-activation, and the gradient
/// returned for the input is the pre-activation's: GELU's derivative applied to the f32
/// product before it is rounded, by the product's cuBLASLt epilogue (`DGELU`) where it can run,
/// else by GELU's backward kernel on an f32 product.
pub fn linear_grads(
    g2: &Tensor,
    s: &LinearSaved,
    in_shape: &[usize],
    with_bias: bool,
    prec: Prec,
    sink: Option<crate::autograd::GradSink>,
    gelu_pre: Option<&Tensor>,
) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
    let d = dev_of(g2)?;
    let (rows, n, k) = (g2.shape()[0], g2.shape()[1], s.w.shape()[1]);
    let (gw, gw_ptr, beta) = weight_grad_dest(&d, sink, n, k)?;
    let (gq, dt) = match prec {
        Prec::F32 => (contiguous(g2)?, DType::F32),
        Prec::Bf16 if g2.dtype() == DType::BF16 => (contiguous_bf16(g2)?, DType::BF16),
        Prec::Bf16 => (bf16_copy(g2)?, DType::BF16),
    };
    // `_wo` owns the weight operand's memory until the product is queued (see `linear`).
    let (_wo, wm) = match prec {
        Prec::F32 => operand_2d(&s.w, 0)?,
        Prec::Bf16 => (s.w.clone(), rowmajor(&s.w, k, false)?),
    };
    let ga = rowmajor(&gq, n, false)?;
    let gx = match gelu_pre {
        Some(pre) => {
            if pre.dtype() != DType::BF16 || pre.shape() != in_shape || s.gx != DType::BF16 || dt != DType::BF16 {
                return Err(Error::shape(
                    "linear",
                    format!("a GELU pre-activation {:?} {} for a bf16 input {in_shape:?}", pre.shape(), pre.dtype()),
                ));
            }
            let pre = contiguous_bf16(pre)?;
            let gx = empty_as(&d, in_shape, DType::BF16)?;
            if d.gemm_epilogue(rows, k, n, ga, wm, ptr(&gx)?, 1.0, 0.0, dt, DType::BF16, Epilogue::GeluGrad { aux: ptr(&pre)? }, None)? {
                gx
            } else {
                // The epilogue's numbers without it: GELU's derivative applied to the f32
                // product, rounded once.
                let g_act = empty(&d, in_shape)?;
                d.gemm_to(rows, k, n, ga, wm, ptr(&g_act)?, 1, 1.0, 0.0, dt, DType::F32)?;
                cast(&super::gelu_bwd(&g_act, &cast(&pre, DType::F32)?, true)?, DType::BF16)?
            }
        }
        None => {
            let gx = empty_as(&d, in_shape, s.gx)?;
            d.gemm_to(rows, k, n, ga, wm, ptr(&gx)?, 1, 1.0, 0.0, dt, s.gx)?;
            gx
        }
    };
    let (gt, xm) = (rowmajor(&gq, n, true)?, rowmajor(&s.x, k, false)?);
    let gb = if with_bias { Some(empty(&d, &[n])?) } else { None };
    let fused = match &gb {
        Some(gb) => d.gemm_epilogue(n, k, rows, gt, xm, gw_ptr, 1.0, beta, dt, DType::F32, Epilogue::RowSumsA(ptr(gb)?), None)?,
        None => false,
    };
    if !fused {
        d.gemm(n, k, rows, gt, xm, gw_ptr, 1, 1.0, beta, dt)?;
        if let Some(gb) = &gb {
            sum_rows_into(&d, ptr(&gq)?, rows, n, ptr(gb)?, 0.0, dt)?;
        }
    }
    Ok((gx, gw, gb))
}
