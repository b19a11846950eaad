//! Softmax cross-entropy over the last dim with an optional z-loss term `coef · log²Z`
//! (PaLM; Wortsman et al. 2023), averaged over rows. Saves log Z per row; backward recomputes
//! the softmax from the saved logits in one pass. Reports the mean logit and mean log Z, the
//! output-logit-divergence probes, the z-loss term on its own (so the cross-entropy can be
//! logged without it) and the top-1 accuracy (the target is the first largest logit, as
//! `argmax` picks it). On a GPU the loss and these statistics stay on the device (probe values
//! read on a logging step with the others), and backward reads the upstream gradient there: the
//! op never waits for the device.

use crate::autograd::Var;
use crate::error::{Error, Result};
use crate::probe::ProbeValue;
use crate::tensor::Tensor;
use crate::with_float;
use rayon::prelude::*;

/// The loss and the statistics beside it, each a probe value (on a GPU still on the device).
pub struct CeOut<'t> {
    pub loss: Var<'t>,
    /// Mean over rows of log Z = logsumexp(logits).
    pub log_z_mean: ProbeValue,
    /// Largest log Z of a row.
    pub log_z_max: ProbeValue,
    /// Mean over all logits.
    pub logit_mean: ProbeValue,
    /// The z-loss part of `loss`: `z_coef · mean(log²Z)` (0 without z-loss).
    pub z_loss: ProbeValue,
    /// Fraction of rows whose first largest logit is the target.
    pub accuracy: ProbeValue,
}

/// The cross-entropy statistics reported beside the loss (see [`CeOut`]).
struct Stats {
    log_z_mean: ProbeValue,
    log_z_max: ProbeValue,
    logit_mean: ProbeValue,
    z_loss: ProbeValue,
    accuracy: ProbeValue,
}

/// The targets as backward needs them: on the host, or uploaded once to the logits' GPU.
enum Targets {
    Host(Vec<u32>),
    #[cfg(feature = "cuda")]
    Device(crate::tensor::cuda::DevBuf),
}

/// Forward on the logits' device: (loss scalar, per-row log Z, the saved targets, statistics).
fn device_forward(x: &Tensor, targets: &[u32], z_coef: f64, n: usize, v: usize) -> Result<(Tensor, Tensor, Targets, Stats)> {
    #[cfg(feature = "cuda")]
    if x.is_cuda() {
        use crate::kernels::cuda::ops as gpu;
        use crate::probe::Reduce;
        let (lse, tg, st) = gpu::cross_entropy(x, targets, z_coef)?;
        let at = |i: usize| -> Result<ProbeValue> { Ok(ProbeValue::Device(st.narrow(0, i, 1)?, Reduce::Mean)) };
        let stats = Stats { log_z_mean: at(1)?, log_z_max: at(2)?, logit_mean: at(3)?, z_loss: at(4)?, accuracy: at(5)? };
        return Ok((st.narrow(0, 0, 1)?.reshape(&[])?, lse, Targets::Device(tg), stats));
    }
    with_float!(x.dtype(), "cross_entropy", T => {
        let xd = x.data::<T>()?;
        let rows: Vec<(T, T, T, bool)> = xd.par_chunks(v).zip(targets.par_iter()).map(|(r, &t)| {
            let m = r.iter().copied().fold(T::neg_infinity(), T::max);
            let s: T = r.iter().map(|&a| (a - m).exp()).sum();
            let lse = m + s.ln();
            let xt = r[t as usize];
            let l = lse - xt + T::of(z_coef) * lse * lse;
            let correct = r[..t as usize].iter().all(|&a| a < xt) && r[t as usize + 1..].iter().all(|&a| a <= xt);
            (l, lse, crate::kernels::cpu::reduce::sum_slice(r), correct)
        }).collect();
        let inv = 1.0 / n as f64;
        let loss: f64 = rows.iter().map(|r| r.0.f64()).sum::<f64>() * inv;
        let lz: f64 = rows.iter().map(|r| r.1.f64()).sum::<f64>() * inv;
        let lzmax = rows.iter().map(|r| r.1.f64()).fold(f64::NEG_INFINITY, f64::max);
        let lz2: f64 = rows.iter().map(|r| r.1.f64() * r.1.f64()).sum::<f64>() * inv;
        let lm: f64 = rows.iter().map(|r| r.2.f64()).sum::<f64>() * inv / v as f64;
        let acc = rows.iter().filter(|r| r.3).count() as f64 * inv;
        let lse: Vec<T> = rows.iter().map(|r| r.1).collect();
        let h = ProbeValue::Host;
        let stats = Stats { log_z_mean: h(lz), log_z_max: h(lzmax), logit_mean: h(lm), z_loss: h(z_coef * lz2), accuracy: h(acc) };
        Ok((Tensor::from_vec(vec![T::of(loss)], &[])?, Tensor::from_vec(lse, &[n])?, Targets::Host(targets.to_vec()), stats))
    })
}

/// Backward on the logits' device, for an upstream gradient `g` (one element) of the mean loss.
fn device_backward(x: &Tensor, lse: &Tensor, targets: &Targets, z_coef: f64, g: &Tensor, n: usize, v: usize) -> Result<Tensor> {
    let targets = match targets {
        Targets::Host(t) => t,
        #[cfg(feature = "cuda")]
        Targets::Device(tg) => return crate::kernels::cuda::ops::cross_entropy_bwd(x, tg, lse, z_coef, g),
    };
    let go = g.item()?;
    let shape = x.shape();
    with_float!(x.dtype(), "cross_entropy", T => {
        let (xd, ld) = (x.data::<T>()?, lse.data::<T>()?);
        let scale = T::of(go / n as f64);
        let gx = Tensor::build::<T>(shape, |o| {
            o.par_chunks_mut(v).zip(xd.par_chunks(v)).zip(ld.par_iter().zip(targets.par_iter())).for_each(|((o, r), (&lse, &t))| {
                // d/dx [lse - x_t + z·lse²] = softmax·(1 + 2z·lse) - onehot
                let f = scale * (T::one() + T::of(2.0 * z_coef) * lse);
                for (o, &a) in o.iter_mut().zip(r) {
                    *o = (a - lse).exp() * f;
                }
                o[t as usize] -= scale;
            })
        });
        Ok(gx)
    })
}

/// Identity with its value rounded to bf16 (kept in f32) on the CPU: the classifier's logits
/// under bf16, as the GPU's GEMM writes them. The gradient passes through (the linear's backward
/// rounds it for its own products).
fn round_to_bf16(x: Var<'_>) -> Result<Var<'_>> {
    let v = crate::ops::matmul::round_for(&x.value(), crate::tensor::Precision::Bf16)?;
    Ok(x.tape().record("round_bf16", v, &[x], |g| Ok(vec![Some(g.clone())])))
}

impl<'t> Var<'t> {
    /// The classifier and its loss in one: the mean cross-entropy of the logits `self [N, C] @
    /// wᵀ` (w `[V, C]`, no bias) against `targets`, plus `z_coef · mean(log²Z)` — as [`Var::linear`]
    /// then [`Var::cross_entropy`]. Under bf16 precision the logits are bf16, as under PyTorch's
    /// autocast: on a GPU one node whose GEMM writes them in bf16 and whose backward writes their
    /// gradient over them (no f32 logits, no cast of their gradient: at a 50k vocabulary these
    /// are the largest tensors of a step); on the CPU rounded to bf16. In f32, exactly `linear`
    /// then `cross_entropy`.
    pub fn linear_cross_entropy(self, w: Var<'t>, targets: &[u32], z_coef: f64) -> Result<CeOut<'t>> {
        if self.tape().precision() == crate::tensor::Precision::F32 {
            return self.linear(w, None)?.cross_entropy(targets, z_coef);
        }
        #[cfg(feature = "cuda")]
        if self.value().is_cuda() {
            if crate::kernels::cuda::ops::dev_of(&self.value())?.fusions().classifier {
                return self.classifier_gpu(w, targets, z_coef);
            }
            // Switched off (gpu-check's before-line): what ran before the fusion, f32 logits.
            return self.linear(w, None)?.cross_entropy(targets, z_coef);
        }
        round_to_bf16(self.linear(w, None)?)?.cross_entropy(targets, z_coef)
    }

    /// [`Var::linear_cross_entropy`] under bf16 on a GPU: one node.
    #[cfg(feature = "cuda")]
    fn classifier_gpu(self, w: Var<'t>, targets: &[u32], z_coef: f64) -> Result<CeOut<'t>> {
        use crate::kernels::cuda::ops as gpu;
        use crate::probe::Reduce;
        let (x, wv) = (self.value(), w.value());
        if x.rank() != 2 || wv.rank() != 2 || x.shape()[1] != wv.shape()[1] {
            return Err(Error::shape("linear_cross_entropy", format!("x {:?} with weight {:?}", x.shape(), wv.shape())));
        }
        let (n, v) = (x.shape()[0], wv.shape()[0]);
        if targets.len() != n {
            return Err(Error::shape("linear_cross_entropy", format!("{} targets for {n} rows", targets.len())));
        }
        if let Some(&t) = targets.iter().find(|&&t| t as usize >= v) {
            return Err(Error::shape("linear_cross_entropy", format!("target {t} out of range for {v} classes")));
        }
        let (saved, st) = gpu::linear_cross_entropy(&x, &wv, w.half_twin().as_ref(), targets, z_coef)?;
        let at = |i: usize| -> Result<ProbeValue> { Ok(ProbeValue::Device(st.narrow(0, i, 1)?, Reduce::Mean)) };
        let loss = st.narrow(0, 0, 1)?.reshape(&[])?;
        let (log_z_mean, log_z_max, logit_mean, z_loss, accuracy) = (at(1)?, at(2)?, at(3)?, at(4)?, at(5)?);
        let loss = self.tape().record("linear_cross_entropy", loss, &[self, w], move |g| {
            let (gx, gw) = gpu::linear_cross_entropy_bwd(saved, z_coef, g, crate::autograd::take_grad_sink(1))?;
            Ok(vec![Some(gx), gw])
        });
        Ok(CeOut { loss, log_z_mean, log_z_max, logit_mean, z_loss, accuracy })
    }

    /// Mean cross-entropy of `self [N, V]` (or `[..., V]`) against `targets` (N class ids), plus
    /// `z_coef · mean(log²Z)`.
    pub fn cross_entropy(self, targets: &[u32], z_coef: f64) -> Result<CeOut<'t>> {
        let x = self.value().try_contiguous()?;
        let v = *x.shape().last().ok_or_else(|| Error::shape("cross_entropy", "scalar logits"))?;
        let n = x.numel() / v.max(1);
        if targets.len() != n {
            return Err(Error::shape("cross_entropy", format!("{} targets for {n} rows", targets.len())));
        }
        if let Some(&t) = targets.iter().find(|&&t| t as usize >= v) {
            return Err(Error::shape("cross_entropy", format!("target {t} out of range for {v} classes")));
        }
        let (loss, lse, saved, st) = device_forward(&x, targets, z_coef, n, v)?;
        let loss = self
            .tape()
            .record("cross_entropy", loss, &[self], move |g| Ok(vec![Some(device_backward(&x, &lse, &saved, z_coef, g, n, v)?)]));
        Ok(CeOut {
            loss,
            log_z_mean: st.log_z_mean,
            log_z_max: st.log_z_max,
            logit_mean: st.logit_mean,
            z_loss: st.z_loss,
            accuracy: st.accuracy,
        })
    }
}
