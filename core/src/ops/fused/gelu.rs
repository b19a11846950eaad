//! GELU, exact (erf) and tanh-approximated forms, matching `torch.nn.functional.gelu` with
//! `approximate='none'` / `'tanh'`. The f32 erf is a vectorisable rational fit. Also
//! `gelu_linear`, GELU feeding a linear layer (a transformer MLP's second half), where under
//! bf16 on a GPU GELU writes the GEMM's bf16 operand itself.

use crate::autograd::Var;
use crate::error::Result;
use crate::kernels::cpu;
use crate::tensor::{Elem, Tensor};
use crate::{on_cuda, with_float};

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const INV_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

#[inline(always)]
fn fwd<T: Elem>(x: T, tanh: bool) -> T {
    let half = T::of(0.5);
    if tanh {
        let u = T::of(SQRT_2_OVER_PI) * (x + T::of(0.044715) * x * x * x);
        half * x * (T::one() + u.tanh())
    } else {
        half * x * (T::one() + (x * T::of(INV_SQRT_2)).erf())
    }
}

#[inline(always)]
fn dfwd<T: Elem>(x: T, tanh: bool) -> T {
    let half = T::of(0.5);
    if tanh {
        let u = T::of(SQRT_2_OVER_PI) * (x + T::of(0.044715) * x * x * x);
        let t = u.tanh();
        half * (T::one() + t) + half * x * (T::one() - t * t) * T::of(SQRT_2_OVER_PI) * (T::one() + T::of(3.0 * 0.044715) * x * x)
    } else {
        half * (T::one() + (x * T::of(INV_SQRT_2)).erf()) + x * (-half * x * x).exp() * T::of(INV_SQRT_2PI)
    }
}

/// The tanh-form GELU of one f32 value: the emulator's model of cuBLASLt's GELU epilogue.
#[cfg(feature = "cuda")]
pub(crate) fn tanh_gelu(x: f32) -> f32 {
    fwd(x, true)
}

/// The tanh-form GELU's derivative at one f32 value (the emulator's cuBLASLt `DGELU`).
#[cfg(feature = "cuda")]
pub(crate) fn tanh_gelu_slope(x: f32) -> f32 {
    dfwd(x, true)
}

/// GELU of a tensor, in its dtype (the op without the tape).
pub fn forward(x: &Tensor, tanh: bool) -> Result<Tensor> {
    on_cuda!(x => gpu::gelu(x, tanh));
    with_float!(x.dtype(), "gelu", T => cpu::map::<T>(x, move |v| fwd(v, tanh)))
}

/// GELU's input gradient for output gradient `g` at input `x`.
pub fn backward(g: &Tensor, x: &Tensor, tanh: bool) -> Result<Tensor> {
    on_cuda!(g => gpu::gelu_bwd(g, x, tanh));
    with_float!(g.dtype(), "gelu", T => cpu::zip::<T>(g, x, move |g, x| g * dfwd(x, tanh)))
}

impl<'t> Var<'t> {
    /// `gelu(self).linear(w, b)` as one op. Under bf16 on a GPU the GELU kernel writes its output
    /// in bf16, straight as the GEMM's operand: the f32 activation — the largest of a GPT block,
    /// 4·C wide — is never written and read back for a cast. Backward applies GELU's derivative
    /// to the product's input gradient. The numbers are those of `gelu` then `linear` (which
    /// rounds its input to bf16 anyway); elsewhere, or with the fusion off, it is exactly that.
    pub fn gelu_linear(self, tanh: bool, w: Var<'t>, b: Option<Var<'t>>) -> Result<Var<'t>> {
        self.gelu_linear_with(tanh, w, b, None, None)
    }

    /// `residual + self.gelu_linear(tanh, w, b)`, the sum written by the GEMM where it can
    /// (see [`linear_add`](Self::linear_add)): a GPT block's MLP and its residual add.
    pub fn gelu_linear_add(self, tanh: bool, w: Var<'t>, b: Option<Var<'t>>, residual: Var<'t>) -> Result<Var<'t>> {
        self.gelu_linear_with(tanh, w, b, Some(residual), None)
    }

    /// `gelu_linear(_add)`; with `act`, the tanh GELU as a transformer MLP takes it, on any
    /// device (`Var::layer_norm_mlp`): `act` is the activation the GEMM that made `self`
    /// computed beside it (`ops::matmul::linear_gelu_value`), and backward applies GELU's
    /// derivative to this product's f32 input gradient before rounding it — on a GPU in the
    /// input-gradient GEMM's cuBLASLt epilogue (`DGELU`) where it can.
    pub(crate) fn gelu_linear_with(
        self,
        tanh: bool,
        w: Var<'t>,
        b: Option<Var<'t>>,
        residual: Option<Var<'t>>,
        act: Option<Tensor>,
    ) -> Result<Var<'t>> {
        let bf16 = self.tape().precision() == crate::tensor::Precision::Bf16;
        #[cfg(feature = "cuda")]
        let gpu = bf16 && self.value().is_cuda() && crate::kernels::cuda::ops::dev_of(&self.value())?.fusions().operands;
        #[cfg(not(feature = "cuda"))]
        let gpu = false;
        if gpu || (bf16 && act.is_some()) {
            let m = self.value();
            // GELU writes the product's operand: bf16 on a GPU.
            let (act, through_gelu) = match act {
                Some(a) => (a, true),
                #[cfg(feature = "cuda")]
                None => (crate::kernels::cuda::ops::gelu_bf16(&m, tanh)?, false),
                #[cfg(not(feature = "cuda"))]
                None => unreachable!("GELU writes a product's operand on a GPU only"),
            };
            // From a bf16 pre-activation (a `linear_half` output) backward is bf16 throughout:
            // the product writes the gradient it returns in bf16.
            let half = crate::ops::matmul::HalfIo { y: false, gx: m.dtype() == crate::tensor::DType::BF16 };
            // The residual rides on the GEMM where it can; otherwise it is added after.
            let fused_residual = match residual {
                Some(r) if crate::ops::matmul::fuses_residual(&act, w, r)? => Some(r),
                _ => None,
            };
            let (out, lin_bwd) = crate::ops::matmul::linear_value(
                &act,
                (w.value(), w.half_twin()),
                b.map(|b| (b.value(), b.half_twin())),
                crate::tensor::Precision::Bf16,
                half,
                1,
                fused_residual.map(|r| r.value()).as_ref(),
                through_gelu.then(|| m.clone()),
            )?;
            let mut inputs = vec![self, w];
            inputs.extend(b);
            inputs.extend(fused_residual);
            let with_residual = fused_residual.is_some();
            let y = self.tape().record("gelu_linear", out, &inputs, move |g| {
                let mut grads = lin_bwd(g)?;
                if !through_gelu {
                    let g_act = grads[0].take().ok_or_else(|| crate::Error::Autograd("linear gave no input gradient".into()))?;
                    grads[0] = Some(backward(&g_act, &m, tanh)?);
                }
                if with_residual {
                    grads.push(Some(g.clone()));
                }
                Ok(grads)
            });
            return match (residual, fused_residual) {
                (Some(r), None) => y.add(r),
                _ => Ok(y),
            };
        }
        match residual {
            Some(r) => self.gelu(tanh)?.linear_add(w, b, r),
            None => self.gelu(tanh)?.linear(w, b),
        }
    }

    /// GELU; `tanh = true` for the tanh approximation. Of a bf16 activation it is one too
    /// (autocast's rule): bf16 on a GPU, rounded on the CPU.
    pub fn gelu(self, tanh: bool) -> Result<Var<'t>> {
        let x = self.value();
        let out = forward(&x, tanh)?;
        let half = self.is_half();
        let out = if half && !out.is_cuda() { crate::ops::matmul::round_for(&out, crate::tensor::Precision::Bf16)? } else { out };
        let y = self.tape().record("gelu", out, &[self], move |g| Ok(vec![Some(backward(g, &x, tanh)?)]));
        Ok(if half { y.mark_half() } else { y })
    }
}
