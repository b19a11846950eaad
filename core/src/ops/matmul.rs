//! Matrix products: `matmul` (with batching; transposed operands are strided views, never
//! copies) and `linear` (y = x Wᵀ + b with PyTorch's [out, in] weight layout), whose backward
//! writes dW directly in [out, in] order and the bias gradient as a threaded column sum (on a
//! GPU: both in one cuBLASLt GEMM, as the forward adds the bias in its epilogue). Both honour
//! the tape's GEMM precision (bf16 inputs, f32 accumulation; under bf16 a linear's upstream
//! gradient is rounded once, for all three of its gradients) on either device. Under bf16 a
//! linear may also write a bf16 activation (`linear_half`, autocast's rule) and take one, whose
//! gradient it then writes in bf16.

use crate::autograd::Var;
use crate::error::{Error, Result};
use crate::kernels::cpu::matmul::{gemm_into, matmul as mm, parallelism, MatRef};
use crate::kernels::cpu::reduce::sum_to_shape;
use crate::tensor::Precision;
use crate::tensor::{DType, Elem, Storage, Tensor};
use crate::{on_cuda, with_float};

/// `a @ b` on the operands' device, with GEMM inputs at precision `prec`.
pub fn matmul_t(a: &Tensor, b: &Tensor, prec: Precision) -> Result<Tensor> {
    on_cuda!(a => gpu::matmul(a, b, prec));
    let (a, b) = (round_for(a, prec)?, round_for(b, prec)?);
    with_float!(a.dtype(), "matmul", T => mm::<T>(&a, &b))
}

/// The CPU side of `Precision::Bf16`: the operand rounded to bf16 (kept in f32), so the f32
/// GEMM that follows computes what a bf16-input, f32-accumulate GEMM does.
pub(crate) fn round_for(t: &Tensor, prec: Precision) -> Result<Tensor> {
    match (prec, t.dtype()) {
        (Precision::Bf16, DType::F32) => crate::kernels::cpu::map::<f32>(t, |x| half::bf16::from_f32(x).to_f32()),
        _ => Ok(t.clone()),
    }
}

fn raw<T: Elem>(t: &Tensor) -> &[T] {
    // Irrefutable in a build without CUDA.
    #[allow(irrefutable_let_patterns)]
    let Storage::Cpu(c) = t.storage() else {
        unreachable!("CPU kernel reached with a CUDA tensor: ops dispatch on the device first")
    };
    T::slice(c).expect("dtype checked")
}

/// `gᵀ @ x` for g [rows, n], x [rows, k] → [n, k]: the weight gradient of `linear`.
fn grad_weight<T: Elem>(g: &Tensor, x: &Tensor, rows: usize, n: usize, k: usize) -> Result<Tensor> {
    let (g, x) = (g.contiguous(), x.contiguous());
    let (gd, xd) = (g.data::<T>()?, x.data::<T>()?);
    Ok(Tensor::build::<T>(&[n, k], |o| {
        gemm_into(
            n,
            k,
            rows,
            o,
            k,
            MatRef { data: gd, off: 0, rs: 1, cs: n as isize },
            MatRef { data: xd, off: 0, rs: k as isize, cs: 1 },
            false,
            T::one(),
            parallelism(),
        )
    }))
}

/// `g @ w` for g [rows, n], w [n, k] → [rows, k].
fn grad_input<T: Elem>(g: &Tensor, w: &Tensor, rows: usize, n: usize, k: usize, out_shape: &[usize]) -> Result<Tensor> {
    let g = g.contiguous();
    let gd = g.data::<T>()?;
    let wd = raw::<T>(w);
    let (wrs, wcs) = (w.strides()[0] as isize, w.strides()[1] as isize);
    let woff = w.offset();
    Ok(Tensor::build::<T>(out_shape, |o| {
        gemm_into(
            rows,
            k,
            n,
            o,
            k,
            MatRef { data: gd, off: 0, rs: n as isize, cs: 1 },
            MatRef { data: wd, off: woff, rs: wrs, cs: wcs },
            false,
            T::one(),
            parallelism(),
        )
    }))
}

impl<'t> Var<'t> {
    /// `self [..., m, k] @ b [k, n]` or batched `[B..., m, k] @ [B..., k, n]`.
    pub fn matmul(self, b: Var<'t>) -> Result<Var<'t>> {
        let (av, bv) = (self.value(), b.value());
        let prec = self.tape().precision();
        let out = matmul_t(&av, &bv, prec)?;
        Ok(self.tape().record("matmul", out, &[self, b], move |g| {
            let (ra, rb) = (av.rank(), bv.rank());
            let ga = matmul_t(g, &bv.transpose(rb - 2, rb - 1)?, prec)?;
            let gb = if rb == 2 {
                let k = av.shape()[ra - 1];
                let n = bv.shape()[1];
                let a2 = av.reshape(&[usize::MAX, k])?;
                let g2 = g.reshape(&[usize::MAX, n])?;
                matmul_t(&a2.transpose(0, 1)?, &g2, prec)?
            } else {
                matmul_t(&av.transpose(ra - 2, ra - 1)?, g, prec)?
            };
            Ok(vec![Some(ga), Some(gb)])
        }))
    }

    /// `x [..., in] @ wᵀ + b` with `w [out, in]`, `b [out]`.
    pub fn linear(self, w: Var<'t>, b: Option<Var<'t>>) -> Result<Var<'t>> {
        self.linear_as(w, b, false)
    }

    /// [`linear`](Self::linear) whose output is a bf16 activation under bf16 precision, as
    /// autocast's linear output is: stored in bf16 on a GPU (half the bytes to write and for
    /// its consumer to read; its bias added in bf16), rounded to bf16 on the CPU (the same
    /// numbers). For consumers that read bf16: flash attention, GELU, `gelu_linear`. Under f32
    /// precision it is `linear`.
    pub fn linear_half(self, w: Var<'t>, b: Option<Var<'t>>) -> Result<Var<'t>> {
        self.linear_as(w, b, true)
    }

    /// `residual + self.linear(w, b)` as one op, for a residual stream (f32): on a GPU the
    /// GEMM reads the residual as its C and writes the sum (cuBLASLt; `Fusions::residual`), so
    /// the stream is not read and written again by an add of its own; backward hands the
    /// residual the output's gradient as it is. Elsewhere it is those two ops, whose numbers
    /// these are (up to the order of the three terms of each sum).
    pub fn linear_add(self, w: Var<'t>, b: Option<Var<'t>>, residual: Var<'t>) -> Result<Var<'t>> {
        if !fuses_residual(&self.value(), w, residual)? {
            return self.linear(w, b)?.add(residual);
        }
        let xv = self.value();
        let half = HalfIo { y: false, gx: xv.dtype() == DType::BF16 };
        let prec = self.tape().precision();
        let (out, backward) = linear_value(
            &xv,
            (w.value(), w.half_twin()),
            b.map(|b| (b.value(), b.half_twin())),
            prec,
            half,
            1,
            Some(&residual.value()),
            None,
        )?;
        let mut inputs = vec![self, w];
        inputs.extend(b);
        inputs.push(residual);
        Ok(self.tape().record("linear_add", out, &inputs, move |g| {
            let mut v = backward(g)?;
            v.push(Some(g.clone()));
            Ok(v)
        }))
    }

    fn linear_as(self, w: Var<'t>, b: Option<Var<'t>>, half_y: bool) -> Result<Var<'t>> {
        let xv = self.value();
        // A bf16 activation's gradient is bf16 (written so by the GEMM, not cast after).
        let half = HalfIo { y: half_y, gx: xv.dtype() == DType::BF16 };
        let prec = self.tape().precision();
        let (out, backward) =
            linear_value(&xv, (w.value(), w.half_twin()), b.map(|b| (b.value(), b.half_twin())), prec, half, 1, None, None)?;
        let mut inputs = vec![self, w];
        inputs.extend(b);
        let y = self.tape().record("linear", out, &inputs, backward);
        Ok(if half_y && prec == Precision::Bf16 { y.mark_half() } else { y })
    }
}

/// Whether a linear of `xv` by `w` can take `residual` into its GEMM (`Var::linear_add`): on a
/// GPU with the fusion on, an f32 residual of the output's shape.
pub(crate) fn fuses_residual(xv: &Tensor, w: Var<'_>, residual: Var<'_>) -> Result<bool> {
    #[cfg(feature = "cuda")]
    if xv.is_cuda() && crate::kernels::cuda::ops::dev_of(xv)?.fusions().residual {
        let mut out_shape = xv.shape().to_vec();
        let ws = w.shape();
        if let (Some(last), &[n, _]) = (out_shape.last_mut(), &ws[..]) {
            *last = n;
            return Ok(residual.dtype() == DType::F32 && residual.shape() == out_shape && residual.value().is_cuda());
        }
    }
    let _ = (xv, w, residual);
    Ok(false)
}

/// Which of a linear's values are bf16 activations under `Precision::Bf16` (ignored under f32).
/// `y`: the output — stored in bf16 on a GPU, rounded to bf16 (kept in f32) on the CPU, so both
/// engines compute the same numbers. `gx`: the input gradient is stored in bf16 on a GPU (for an
/// input that is a bf16 tensor; on the CPU the tape rounds a marked value's gradient itself).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct HalfIo {
    pub y: bool,
    pub gx: bool,
}

/// `linear` of the value `xv` at precision `prec` — shape checks, the product — and its
/// backward (gradients of x, w and b when given), recording nothing: [`Var::linear`] records it,
/// and `gelu_linear` hands it GELU's bf16 output in place of its own recorded input. `w_at`: the
/// weight's position among the recording op's inputs — on a GPU, when it is a parameter, its
/// gradient is written by the GEMM straight into the flat gradient buffer
/// ([`take_grad_sink`](crate::autograd::take_grad_sink)) and backward returns `None` for it.
/// The weight and the bias come with their bf16 copies when the optimizer keeps one
/// (`Var::half_twin`).
/// `residual`: an f32 tensor of the output's shape added to it (`Var::linear_add`; f32 output).
/// `gelu_pre`: x is the tanh GELU of this bf16 pre-activation (`Var::layer_norm_mlp`), and
/// backward returns the pre-activation's gradient in x's place: GELU's derivative applied to
/// x's f32 gradient before it is rounded (on a GPU by the input-gradient GEMM's epilogue where
/// it can: see `kernels::cuda::ops::linear_grads`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_value(
    xv: &Tensor,
    (wv, w16): (Tensor, Option<Tensor>),
    b: Option<(Tensor, Option<Tensor>)>,
    prec: Precision,
    half: HalfIo,
    w_at: usize,
    residual: Option<&Tensor>,
    gelu_pre: Option<Tensor>,
) -> Result<(Tensor, impl FnOnce(&Tensor) -> Result<Vec<Option<Tensor>>> + 'static)> {
    let (x2, out_shape) = linear_shapes(xv, &wv, b.as_ref().map(|b| &b.0))?;
    let (bv, b16) = b.unzip();
    let b16 = b16.flatten();
    let has_b = bv.is_some();
    let in_shape = xv.shape().to_vec();
    let half = if prec == Precision::Bf16 { half } else { HalfIo::default() };
    if residual.is_some() && half.y {
        return Err(Error::shape("linear", "a residual added to a bf16 output"));
    }
    let (out, saved) = linear_forward(x2, (wv, w16), (bv.as_ref(), b16), &out_shape, prec, half, residual)?;
    Ok((out, move |g: &Tensor| linear_backward(g, &saved, &in_shape, has_b, prec, w_at, gelu_pre.as_ref())))
}

/// A linear's input as `[rows, k]` and its output's shape, after checking x, the weight `[n, k]`
/// and the bias `[n]` agree.
fn linear_shapes(xv: &Tensor, wv: &Tensor, bv: Option<&Tensor>) -> Result<(Tensor, Vec<usize>)> {
    if wv.rank() != 2 || xv.rank() < 1 || xv.shape()[xv.rank() - 1] != wv.shape()[1] {
        return Err(Error::shape("linear", format!("x {:?} with weight {:?}", xv.shape(), wv.shape())));
    }
    let (n, k) = (wv.shape()[0], wv.shape()[1]);
    if let Some(bv) = bv {
        if bv.shape() != [n] {
            return Err(Error::shape("linear", format!("bias {:?} for {n} outputs", bv.shape())));
        }
    }
    let mut out_shape = xv.shape().to_vec();
    *out_shape.last_mut().expect("rank ≥ 1") = n;
    Ok((xv.reshape(&[usize::MAX, k])?, out_shape))
}

/// An op's value, a second output beside it, and the value's backward (see
/// [`linear_gelu_value`]).
pub(crate) type LinearGelu<P = Tensor> = (Tensor, P, Box<dyn FnOnce(&Tensor) -> Result<Vec<Option<Tensor>>>>);

/// A bf16 linear followed by the tanh GELU as a transformer MLP's first half takes it on a
/// GPU, where cuBLASLt's epilogue computes both from one GEMM (`kernels::cuda::ops::linear_gelu`):
/// z = x·Wᵀ + b in f32 (bf16 operands, the bias as bf16 holds it), the pre-activation
/// `round(z)` kept for backward and the activation `round(gelu(z))` — GELU of the f32 sum, not
/// of its rounding. Returns (activation, pre-activation, backward of the pre-activation: x's
/// gradient in f32, `w_at` as [`linear_value`]'s). Where the epilogue cannot run, and on the
/// CPU, the same numbers come from an f32 product, a cast and GELU's kernel.
pub(crate) fn linear_gelu_value(
    xv: &Tensor,
    (wv, w16): (Tensor, Option<Tensor>),
    b: Option<(Tensor, Option<Tensor>)>,
    w_at: usize,
) -> Result<LinearGelu> {
    #[cfg(feature = "cuda")]
    if xv.is_cuda() {
        let (x2, out_shape) = linear_shapes(xv, &wv, b.as_ref().map(|b| &b.0))?;
        let (has_b, in_shape) = (b.is_some(), xv.shape().to_vec());
        let (bv, b16) = b.clone().unzip();
        let fused = crate::kernels::cuda::ops::linear_gelu(
            &x2,
            (&wv, w16.as_ref()),
            (bv.as_ref(), b16.flatten().as_ref()),
            &out_shape,
            DType::F32,
        )?;
        if let Some((act, pre, saved)) = fused {
            let saved = LinearSaved::Device(saved);
            return Ok((act, pre, Box::new(move |g: &Tensor| linear_backward(g, &saved, &in_shape, has_b, Precision::Bf16, w_at, None))));
        }
    }
    let b = b.map(|(b, _)| Ok::<_, Error>((bf16_values(&b)?, None))).transpose()?;
    let (z, bwd) = linear_value(xv, (wv, w16), b, Precision::Bf16, HalfIo::default(), w_at, None, None)?;
    #[cfg(feature = "cuda")]
    if z.is_cuda() {
        use crate::kernels::cuda::ops as gpu;
        return Ok((gpu::gelu_bf16(&z, true)?, gpu::cast(&z, DType::BF16)?, Box::new(bwd)));
    }
    let act = round_for(&crate::ops::fused::gelu::forward(&z, true)?, Precision::Bf16)?;
    Ok((act, round_for(&z, Precision::Bf16)?, Box::new(bwd)))
}

/// f32 `t`'s values rounded to bf16, kept in f32, on its device.
fn bf16_values(t: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if t.is_cuda() {
        use crate::kernels::cuda::ops as gpu;
        return gpu::cast(&gpu::cast(t, DType::BF16)?, DType::F32);
    }
    round_for(t, Precision::Bf16)
}

/// The operands `linear`'s backward reads, as the forward product read them.
enum LinearSaved {
    /// x `[rows, k]` and w `[n, k]`, rounded under bf16 precision.
    Host { x2: Tensor, wv: Tensor },
    #[cfg(feature = "cuda")]
    Device(crate::kernels::cuda::ops::LinearSaved),
}

/// `linear`'s forward on the input's device: the output, and the operands backward reads (on
/// the CPU rounded as the GEMM saw them under bf16 precision).
#[allow(clippy::too_many_arguments)]
fn linear_forward(
    x2: Tensor,
    (wv, w16): (Tensor, Option<Tensor>),
    (bv, b16): (Option<&Tensor>, Option<Tensor>),
    out_shape: &[usize],
    prec: Precision,
    half: HalfIo,
    residual: Option<&Tensor>,
) -> Result<(Tensor, LinearSaved)> {
    #[cfg(feature = "cuda")]
    if x2.is_cuda() {
        use crate::kernels::cuda::ops::LinearDtypes;
        // With bf16 activations off (an ablation) the output is stored in f32; an input that is
        // bf16 anyway still gets its gradient in bf16.
        let half = HalfIo { y: half.y && crate::kernels::cuda::ops::dev_of(&x2)?.fusions().activations, gx: half.gx };
        let dt = |h: bool| if h { DType::BF16 } else { DType::F32 };
        let dts = LinearDtypes { y: dt(half.y), gx: dt(half.gx) };
        let (out, saved) = crate::kernels::cuda::ops::linear(&x2, (&wv, w16.as_ref()), (bv, b16.as_ref()), out_shape, prec, dts, residual)?;
        return Ok((out, LinearSaved::Device(saved)));
    }
    let _ = (w16, b16); // the CPU rounds the weight and bias itself
    let (rows, k) = (x2.shape()[0], x2.shape()[1]);
    let n = wv.shape()[0];
    let (x2, wv) = (round_for(&x2, prec)?, round_for(&wv, prec)?);
    // A bf16 output adds a bf16 bias and is rounded once (the GPU's cuBLASLt epilogue).
    let bv = if half.y { bv.map(|b| round_for(b, prec)).transpose()? } else { bv.cloned() };
    let bv = bv.as_ref();
    let out = with_float!(x2.dtype(), "linear", T => {
        let xd = x2.data::<T>()?;
        let wd = raw::<T>(&wv);
        let (woff, wrs, wcs) = (wv.offset(), wv.strides()[0] as isize, wv.strides()[1] as isize);
        let bias = bv.map(|b| b.contiguous());
        let bias_d = match &bias { Some(b) => Some(b.data::<T>()?), None => None };
        Ok(Tensor::build::<T>(out_shape, |o| {
            let acc = if let Some(bd) = bias_d {
                for row in o.chunks_mut(n) { row.copy_from_slice(bd); }
                true
            } else { false };
            // y = x @ wᵀ: wᵀ is w read with swapped strides.
            gemm_into(rows, n, k, o, n, MatRef { data: xd, off: 0, rs: k as isize, cs: 1 }, MatRef { data: wd, off: woff, rs: wcs, cs: wrs }, acc, T::one(), parallelism())
        }))
    })?;
    let out = if half.y { round_for(&out, prec)? } else { out };
    let out = match residual {
        Some(r) => crate::ops::elementwise::t::add(&out, r)?,
        None => out,
    };
    Ok((out, LinearSaved::Host { x2, wv }))
}

/// `linear`'s backward on the saved operands' device: gradients of (x, w, b when `has_b`); with
/// `gelu_pre`, of GELU's input in x's place.
fn linear_backward(
    g: &Tensor,
    saved: &LinearSaved,
    in_shape: &[usize],
    has_b: bool,
    prec: Precision,
    w_at: usize,
    gelu_pre: Option<&Tensor>,
) -> Result<Vec<Option<Tensor>>> {
    let n = *g.shape().last().ok_or_else(|| Error::shape("linear", "scalar gradient"))?;
    let g2 = g.reshape(&[usize::MAX, n])?;
    let _ = w_at; // the CPU path returns every gradient
    let (x2, wv) = match saved {
        LinearSaved::Host { x2, wv } => (x2, wv),
        #[cfg(feature = "cuda")]
        LinearSaved::Device(s) => {
            let sink = crate::autograd::take_grad_sink(w_at);
            let (gx, gw, gb) = crate::kernels::cuda::ops::linear_grads(&g2, s, in_shape, has_b, prec, sink, gelu_pre)?;
            let mut v = vec![Some(gx), gw];
            if has_b {
                v.push(gb);
            }
            return Ok(v);
        }
    };
    let (rows, k) = (x2.shape()[0], x2.shape()[1]);
    with_float!(g.dtype(), "linear", T => {
        let g2r = round_for(&g2, prec)?;
        let gx = grad_input::<T>(&g2r, wv, rows, n, k, in_shape)?;
        let gx = match gelu_pre {
            Some(pre) => crate::ops::fused::gelu::backward(&gx, pre, true)?,
            None => gx,
        };
        let gw = grad_weight::<T>(&g2r, x2, rows, n, k)?;
        let mut v = vec![Some(gx), Some(gw)];
        if has_b {
            // From the rounded gradient, as the GPU's bias gradient (summed by the weight
            // GEMM's epilogue from its bf16 operand) and autocast's are.
            v.push(Some(sum_to_shape::<T>(&g2r, &[n])?));
        }
        Ok(v)
    })
}
