//! A pre-norm transformer MLP, `residual + gelu(ln(x) @ W_fcᵀ + b_fc) @ W_projᵀ + b_proj`, as
//! one call, so that on a GPU the tanh GELU can live in the two GEMMs' cuBLASLt epilogues (as
//! llm.c and Transformer Engine do on Hopper): the first GEMM writes the bf16 pre-activation
//! (kept for backward) and the activation the second reads, and the second's input-gradient
//! GEMM applies GELU's derivative as it writes the pre-activation's gradient. GELU's own kernels
//! — a read and a write of the MLP's widest activation each way — do not run.
//!
//! An epilogue works on the GEMM's f32 sums, so under bf16 the tanh form's numbers are defined
//! that way on every device: the activation is GELU of the f32 pre-activation (rounded once,
//! not GELU of its bf16 rounding), and GELU's derivative multiplies the f32 product that is the
//! activation's gradient before that is rounded. The CPU and a GPU where cuBLASLt cannot fuse
//! compute exactly that with their own kernels, so the devices agree up to summation order.

use crate::autograd::Var;
use crate::error::Result;
use crate::tensor::Tensor;

impl<'t> Var<'t> {
    /// `self.layer_norm_linear(ln, fc, half)?.gelu_linear_add(tanh, proj, residual)` (or
    /// `gelu_linear` without a residual), recorded as those two ops. Under bf16 the tanh form
    /// takes GELU of the f32 sums (see the module doc), on a GPU in the GEMMs' epilogues
    /// (`Fusions::gelu_epilogue`; off, it is the two ops' kernels and numbers, for measuring
    /// it). In f32, and for the exact form, it is exactly the two ops. `observe` is handed the
    /// activation (a probe reading it, as MLP sparsity does): the step's numbers stay the same.
    pub fn layer_norm_mlp(
        self,
        (ln_w, ln_b, eps): (Option<Var<'t>>, Option<Var<'t>>, f64),
        (fc_w, fc_b): (Var<'t>, Option<Var<'t>>),
        tanh: bool,
        (proj_w, proj_b): (Var<'t>, Option<Var<'t>>),
        residual: Option<Var<'t>>,
        observe: Option<&mut dyn FnMut(&Tensor) -> Result<()>>,
    ) -> Result<Var<'t>> {
        if tanh && self.tape().precision() == crate::tensor::Precision::Bf16 {
            #[cfg(feature = "cuda")]
            if self.value().is_cuda() {
                let f = crate::kernels::cuda::ops::dev_of(&self.value())?.fusions();
                // The pre-activation is bf16: with bf16 activations off (their ablation) the two
                // ops store it in f32.
                if f.operands && f.activations && f.gelu_epilogue {
                    let (m, act) = self.layer_norm_linear_gpu((ln_w, ln_b, eps), fc_w, fc_b, true, true)?;
                    if let (Some(f), Some(a)) = (observe, &act) {
                        f(a)?;
                    }
                    return m.gelu_linear_with(tanh, proj_w, proj_b, residual, act);
                }
            }
            if !self.value().is_cuda() {
                let h = self.layer_norm(ln_w, ln_b, eps)?;
                let (act, pre, bwd) =
                    crate::ops::matmul::linear_gelu_value(&h.value(), (fc_w.value(), None), fc_b.map(|b| (b.value(), None)), 1)?;
                let mut inputs = vec![h, fc_w];
                inputs.extend(fc_b);
                // A bf16 activation held in f32: its gradient is rounded as a GPU stores it.
                let m = self.tape().record("linear_gelu", pre, &inputs, bwd).mark_half();
                if let Some(f) = observe {
                    f(&act)?;
                }
                return m.gelu_linear_with(tanh, proj_w, proj_b, residual, Some(act));
            }
        }
        let m = self.layer_norm_linear(ln_w, ln_b, eps, fc_w, fc_b, true)?;
        match (observe, residual) {
            // The activation as a value of its own, for the probe (the same numbers).
            (Some(f), r) => {
                let act = m.gelu(tanh)?;
                f(&act.value())?;
                match r {
                    Some(r) => act.linear_add(proj_w, proj_b, r),
                    None => act.linear(proj_w, proj_b),
                }
            }
            (None, Some(r)) => m.gelu_linear_add(tanh, proj_w, proj_b, r),
            (None, None) => m.gelu_linear(tanh, proj_w, proj_b),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::autograd::{Tape, Var};
    use crate::error::Result;
    use crate::rng::Rng;
    use crate::tensor::{Precision, Tensor};

    /// x [2, 8, 24], the layer norm's gain and bias, W_fc [96, 24], b_fc, W_proj [24, 96], b_proj.
    fn inputs() -> Vec<Tensor> {
        let mut r = Rng::new(5);
        let mut t = |shape: &[usize], k: f64| {
            let n = shape.iter().product();
            Tensor::from_vec((0..n).map(|_| (r.normal() * k) as f32).collect::<Vec<f32>>(), shape).unwrap()
        };
        vec![t(&[2, 8, 24], 1.0), t(&[24], 1.0), t(&[24], 0.5), t(&[96, 24], 0.2), t(&[96], 0.5), t(&[24, 96], 0.1), t(&[24], 0.5)]
    }

    /// `f`'s output and the gradient of every input (of the output against a fixed weighting).
    fn run(prec: Precision, inputs: &[Tensor], mut f: impl for<'t> FnMut(&[Var<'t>]) -> Result<Var<'t>>) -> Vec<Vec<f32>> {
        let tape = Tape::new();
        tape.set_precision(prec);
        let v: Vec<Var> = inputs.iter().map(|t| tape.leaf(t.clone())).collect();
        let y = f(&v).unwrap();
        let n = y.value().numel();
        let weights = Tensor::from_vec((0..n).map(|i| ((i * 7 % 11) as f32 - 5.0) / 5.0).collect::<Vec<f32>>(), y.value().shape()).unwrap();
        let loss = y.mul(tape.leaf(weights)).unwrap().sum_all().unwrap();
        let grads = tape.backward(loss, &mut crate::GradStore::empty(), |_, _| {}).unwrap();
        let mut out = vec![y.value().to_vec::<f32>().unwrap()];
        out.extend(v.iter().map(|x| grads.get(*x).unwrap().to_vec::<f32>().unwrap()));
        out
    }

    fn mlp<'t>(x: &[Var<'t>], tanh: bool) -> Result<Var<'t>> {
        x[0].layer_norm_mlp((Some(x[1]), Some(x[2]), 1e-5), (x[3], Some(x[4])), tanh, (x[5], Some(x[6])), Some(x[0]), None)
    }

    fn two_ops<'t>(x: &[Var<'t>], tanh: bool) -> Result<Var<'t>> {
        x[0].layer_norm_linear(Some(x[1]), Some(x[2]), 1e-5, x[3], Some(x[4]), true)?.gelu_linear_add(tanh, x[5], Some(x[6]), x[0])
    }

    #[test]
    fn in_f32_and_for_the_exact_form_it_is_the_two_ops() {
        let x = inputs();
        for (prec, tanh) in [(Precision::F32, true), (Precision::F32, false), (Precision::Bf16, false)] {
            assert_eq!(run(prec, &x, |v| mlp(v, tanh)), run(prec, &x, |v| two_ops(v, tanh)), "{prec:?}, tanh {tanh}");
        }
    }

    /// A probe handed the activation sees GELU's output (in [-0.17, ∞), as wide as the MLP)
    /// and changes nothing about the step's numbers, on either path.
    #[test]
    fn observing_the_activation_changes_nothing() {
        let x = inputs();
        for tanh in [true, false] {
            let mut seen = vec![];
            let observed = run(Precision::Bf16, &x, |v| {
                let mut probe = |a: &Tensor| {
                    seen.push(a.to_vec::<f32>()?);
                    Ok(())
                };
                v[0].layer_norm_mlp(
                    (Some(v[1]), Some(v[2]), 1e-5),
                    (v[3], Some(v[4])),
                    tanh,
                    (v[5], Some(v[6])),
                    Some(v[0]),
                    Some(&mut probe),
                )
            });
            assert_eq!(observed, run(Precision::Bf16, &x, |v| mlp(v, tanh)), "tanh {tanh}");
            assert_eq!(seen.len(), 1);
            assert_eq!(seen[0].len(), 16 * 96);
            assert!(seen[0].iter().all(|&a| a >= -0.171) && seen[0].iter().any(|&a| a > 1.0), "tanh {tanh}");
        }
    }

    /// Under bf16 the tanh form is GELU of the f32 pre-activation, rounded once (as cuBLASLt's
    /// epilogue computes it), not GELU of the bf16 pre-activation; and backward applies GELU's
    /// derivative to the activation's f32 gradient before rounding (as `DGELU` does), not to its
    /// bf16 rounding: the fc bias's gradient, Σ over rows of round(g_act · GELU'(pre)), is
    /// rebuilt here from the values.
    #[test]
    fn under_bf16_the_tanh_form_takes_gelu_of_the_f32_sum() {
        let x = inputs();
        let bf16 = |t: &Tensor| crate::ops::matmul::round_for(t, Precision::Bf16).unwrap();
        // The bias as the epilogue adds it: rounded to bf16.
        let mut rounded = x.clone();
        rounded[4] = bf16(&x[4]);
        let reference = run(Precision::Bf16, &rounded, |v| {
            let z = v[0].layer_norm(Some(v[1]), Some(v[2]), 1e-5)?.linear(v[3], Some(v[4]))?;
            z.gelu(true)?.to_half()?.linear_add(v[5], Some(v[6]), v[0])
        });
        let fused = run(Precision::Bf16, &x, |v| mlp(v, true));
        assert_eq!(fused[0], reference[0], "forward");
        let unfused = run(Precision::Bf16, &x, |v| two_ops(v, true));
        assert_ne!(fused[0], unfused[0], "GELU of the rounded pre-activation gives other roundings");
        // The pre-activation z as the MLP computes it, and the activation's f32 gradient: the
        // (rounded) output weighting times the rounded W_proj.
        let tape = Tape::new();
        tape.set_precision(Precision::Bf16);
        let v: Vec<Var> = rounded.iter().map(|t| tape.leaf(t.clone())).collect();
        let z = v[0].layer_norm(Some(v[1]), Some(v[2]), 1e-5).unwrap().linear(v[3], Some(v[4])).unwrap().value();
        let (rows, c, f) = (16, 24, 96);
        let wp = bf16(&x[5]).to_vec::<f32>().unwrap();
        let g: Vec<f32> = (0..rows * c).map(|i| half::bf16::from_f32(((i * 7 % 11) as f32 - 5.0) / 5.0).to_f32()).collect();
        let g_act: Vec<f32> =
            (0..rows * f).map(|i| (0..c).map(|k| g[i / f * c + k] as f64 * wp[k * f + i % f] as f64).sum::<f64>() as f32).collect();
        let d_pre =
            super::super::gelu::backward(&Tensor::from_vec(g_act, &[rows, f]).unwrap(), &bf16(&z).reshape(&[rows, f]).unwrap(), true)
                .unwrap();
        let d_pre = bf16(&d_pre).to_vec::<f32>().unwrap();
        let expected: Vec<f32> = (0..f).map(|j| (0..rows).map(|r| d_pre[r * f + j]).sum()).collect();
        // Summation order may move a rare product across a rounding boundary; rounding g_act
        // first (the two ops' backward) moves about half of them.
        let close = expected.iter().zip(&fused[5]).filter(|(e, a)| (*e - *a).abs() <= 1e-5 * (1.0 + e.abs())).count();
        assert!(close >= f * 9 / 10, "{close} of {f} bias-gradient entries as expected:\n{expected:?}\n{:?}", fused[5]);
    }
}
