//! The causal self-attention core, fused: from the packed projection `qkv [B, T, 3C]` (as
//! `nn.Linear(C, 3C)` produces it) to `y [B, T, C]`, with heads split by strides (no permute
//! copies), scale 1/√d, causal masking done by index (no T×T mask tensor), a row softmax, and
//! P·V. Saves the probabilities P for backward. Reports the largest pre-softmax logit over
//! unmasked positions, the "max attention logit" probe of Wortsman et al. (2023).
//!
//! Attention dropout (nanoGPT's `attn_dropout`) is fused in: P·V reads the dropped, rescaled
//! probabilities, whose mask is drawn per element of `[B, H, T, T]` from the mask's key and
//! regenerated in backward (see `ops::dropout`); P itself is what is saved.
//!
//! On a GPU under bf16 precision (head size 32 or 64, sm_80 or newer) the core runs as flash
//! attention instead (`kernels/cuda/flash.cu`, see [`gpu_uses_flash`]): the same function and
//! dropout mask, no T × T tensor, only the log-sum-exp of each row saved.

use crate::autograd::Var;
use crate::error::{Error, Result};
use crate::kernels::cpu::matmul::{gemm_into, MatRef};
use crate::ops::dropout::Dropout;
use crate::probe::ProbeValue;
use crate::tensor::{Elem, Tensor};
use crate::with_float;
use gemm::Parallelism;
use rayon::prelude::*;

/// Output of [`Var::causal_attention`].
pub struct AttnOut<'t> {
    pub y: Var<'t>,
    /// max over batch, heads and unmasked (i, j) of q·k/√d; on a GPU it stays there (the
    /// per-row maxima, combined by max when read).
    pub max_logit: ProbeValue,
}

#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    h: usize,
    d: usize,
    /// The score scale: 1/√d (standard) or as given (μP: 1/d).
    scale: f64,
}

impl Dims {
    fn c(&self) -> usize {
        self.h * self.d
    }
    /// Offset of head `h`'s q (part 0), k (1) or v (2) block in batch `b` of qkv.
    fn qkv_off(&self, b: usize, part: usize, h: usize) -> usize {
        b * self.t * 3 * self.c() + part * self.c() + h * self.d
    }
}

/// Applies the dropout mask of (b, h) block `bh` of `[B·H, T, T]` to `x` in place.
fn mask_in_place<T: Elem>(x: &mut [T], bh: usize, t: usize, d: Dropout) {
    let base = (bh * t * t) as u64;
    let s = T::of(d.scale() as f64);
    for (k, v) in x.iter_mut().enumerate() {
        *v = if d.keep(base + k as u64) { *v * s } else { T::zero() };
    }
}

/// The dropped, rescaled copy of block `bh` of P, for P·V and dV.
fn dropped<T: Elem>(p: &[T], bh: usize, t: usize, d: Dropout, out: &mut [T]) {
    out.copy_from_slice(p);
    mask_in_place(out, bh, t, d);
}

fn forward<T: Elem>(qkv: &[T], dm: Dims, scale: T, drop: Option<Dropout>, probs: &mut [T], ohd: &mut [T]) -> f64 {
    let (t, d) = (dm.t, dm.d);
    let rs = (3 * dm.c()) as isize;
    probs
        .par_chunks_mut(t * t)
        .zip(ohd.par_chunks_mut(t * d))
        .enumerate()
        .map(|(bh, (p, o))| {
            let (b, h) = (bh / dm.h, bh % dm.h);
            // S = scale · Q Kᵀ (Kᵀ read through strides).
            gemm_into(
                t,
                t,
                d,
                p,
                t,
                MatRef { data: qkv, off: dm.qkv_off(b, 0, h), rs, cs: 1 },
                MatRef { data: qkv, off: dm.qkv_off(b, 1, h), rs: 1, cs: rs },
                false,
                scale,
                Parallelism::None,
            );
            let mut mx = f64::NEG_INFINITY;
            for i in 0..t {
                let row = &mut p[i * t..(i + 1) * t];
                let m = row[..=i].iter().copied().fold(T::neg_infinity(), T::max);
                mx = mx.max(m.f64());
                let mut s = T::zero();
                for v in &mut row[..=i] {
                    *v = (*v - m).exp();
                    s += *v;
                }
                let inv = T::one() / s;
                for v in &mut row[..=i] {
                    *v *= inv;
                }
                row[i + 1..].fill(T::zero());
            }
            let mut pd = drop.map(|dr| {
                let mut pd = T::pool().take(t * t);
                dropped(p, bh, t, dr, &mut pd);
                pd
            });
            // O = P V (P dropped when dropout is on)
            gemm_into(
                t,
                d,
                t,
                o,
                d,
                MatRef { data: pd.as_deref().unwrap_or(p), off: 0, rs: t as isize, cs: 1 },
                MatRef { data: qkv, off: dm.qkv_off(b, 2, h), rs, cs: 1 },
                false,
                T::one(),
                Parallelism::None,
            );
            if let Some(pd) = pd.take() {
                T::pool().give(pd);
            }
            mx
        })
        .reduce(|| f64::NEG_INFINITY, f64::max)
}

/// Per (b, h): dQ, dK, dV into `dhd [B, H, 3, T, D]`.
fn backward<T: Elem>(qkv: &[T], g: &[T], probs: &[T], dm: Dims, scale: T, drop: Option<Dropout>, dhd: &mut [T]) {
    let (t, d, c) = (dm.t, dm.d, dm.c());
    let rs = (3 * c) as isize;
    dhd.par_chunks_mut(3 * t * d).enumerate().for_each(|(bh, out)| {
        let (b, h) = (bh / dm.h, bh % dm.h);
        let p = &probs[bh * t * t..(bh + 1) * t * t];
        let go = MatRef { data: g, off: b * t * c + h * d, rs: c as isize, cs: 1 };
        let (dq, rest) = out.split_at_mut(t * d);
        let (dk, dv) = rest.split_at_mut(t * d);
        let pd = drop.map(|dr| {
            let mut pd = T::pool().take(t * t);
            dropped(p, bh, t, dr, &mut pd);
            pd
        });
        // dV = Pᵀ dO (the dropped P that forward multiplied V by)
        let pv = pd.as_deref().unwrap_or(p);
        gemm_into(t, d, t, dv, d, MatRef { data: pv, off: 0, rs: 1, cs: t as isize }, go, false, T::one(), Parallelism::None);
        if let Some(pd) = pd {
            T::pool().give(pd);
        }
        // dP = dO Vᵀ
        let mut ds = T::pool().take(t * t);
        gemm_into(
            t,
            t,
            d,
            &mut ds,
            t,
            go,
            MatRef { data: qkv, off: dm.qkv_off(b, 2, h), rs: 1, cs: rs },
            false,
            T::one(),
            Parallelism::None,
        );
        // Through dropout: dP = dP_dropped ⊙ mask · 1/(1−p).
        if let Some(dr) = drop {
            mask_in_place(&mut ds, bh, t, dr);
        }
        // dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale (zero where masked since P = 0 there)
        for i in 0..t {
            let (pr, dr) = (&p[i * t..(i + 1) * t], &mut ds[i * t..(i + 1) * t]);
            let dot = crate::kernels::cpu::reduce::dot(&pr[..=i], &dr[..=i]);
            for j in 0..=i {
                dr[j] = pr[j] * (dr[j] - dot) * scale;
            }
            dr[i + 1..].fill(T::zero());
        }
        // dQ = dS K ; dK = dSᵀ Q
        gemm_into(
            t,
            d,
            t,
            dq,
            d,
            MatRef { data: &ds, off: 0, rs: t as isize, cs: 1 },
            MatRef { data: qkv, off: dm.qkv_off(b, 1, h), rs, cs: 1 },
            false,
            T::one(),
            Parallelism::None,
        );
        gemm_into(
            t,
            d,
            t,
            dk,
            d,
            MatRef { data: &ds, off: 0, rs: 1, cs: t as isize },
            MatRef { data: qkv, off: dm.qkv_off(b, 0, h), rs, cs: 1 },
            false,
            T::one(),
            Parallelism::None,
        );
        T::pool().give(ds);
    });
}

/// What the attention backward reads.
enum Saved {
    /// qkv (rounded as the GEMMs saw it) and the probabilities.
    Host { qkv: Tensor, probs: Tensor },
    #[cfg(feature = "cuda")]
    Device(crate::kernels::cuda::ops::AttnSaved),
    #[cfg(feature = "cuda")]
    Flash(crate::kernels::cuda::ops::FlashSaved),
}

/// Whether attention on GPU `dev` runs as flash attention: bf16 products (the kernels' tensor
/// cores take bf16), a head size the kernels are built for (32 or 64), a device with bf16 tensor
/// cores (sm_80 or newer), and not switched off (`DPTRAIN_FLASH=0`, or the device's
/// [`Fusions`](crate::tensor::cuda::Fusions)); attention dropout included.
/// Otherwise the unfused path: cuBLAS products around a softmax kernel.
#[cfg(feature = "cuda")]
pub fn gpu_uses_flash(dev: &crate::tensor::cuda::CudaDev, d_head: usize, prec: crate::tensor::Precision) -> bool {
    use crate::kernels::cuda::ops as gpu;
    gpu::FLASH_HEAD_DIMS.contains(&d_head) && prec == crate::tensor::Precision::Bf16 && dev.fusions().flash && gpu::flash_supported(dev)
}

/// Forward on qkv's device: (y `[B, T, C]`, what backward reads, the max logit as a probe value
/// — on a GPU the per-row maxima, left there).
fn device_forward(qkv: &Tensor, dm: Dims, prec: crate::tensor::Precision, drop: Option<Dropout>) -> Result<(Tensor, Saved, ProbeValue)> {
    #[cfg(feature = "cuda")]
    if qkv.is_cuda() {
        let dev = crate::kernels::cuda::ops::dev_of(qkv)?;
        if gpu_uses_flash(&dev, dm.d, prec) {
            let (y, saved, row_max) = crate::kernels::cuda::ops::flash_attention(qkv, dm.b, dm.t, dm.h, dm.d, dm.scale, drop)?;
            return Ok((y, Saved::Flash(saved), ProbeValue::Device(row_max, crate::probe::Reduce::Max)));
        }
        let (y, saved, row_max) = crate::kernels::cuda::ops::attention(qkv, dm.b, dm.t, dm.h, dm.d, dm.scale, prec, drop)?;
        return Ok((y, Saved::Device(saved), ProbeValue::Device(row_max, crate::probe::Reduce::Max)));
    }
    // Under bf16 GEMM precision the CPU rounds q, k, v (the GEMM inputs that come from
    // outside); the GPU also rounds the probabilities before P·V.
    let qkv = crate::ops::matmul::round_for(qkv, prec)?;
    let c = dm.c();
    let scale = dm.scale;
    let (out, probs, max_logit) = with_float!(qkv.dtype(), "causal_attention", T => {
        let xd = qkv.data::<T>()?;
        let mut probs = T::pool().take(dm.b * dm.h * dm.t * dm.t);
        let mut ohd = T::pool().take(dm.b * dm.h * dm.t * dm.d);
        let mx = forward(xd, dm, T::of(scale), drop, &mut probs, &mut ohd);
        // [B, H, T, D] → [B, T, H·D]
        let y = Tensor::build::<T>(&[dm.b, dm.t, c], |y| {
            y.par_chunks_mut(dm.t * c).enumerate().for_each(|(b, yb)| {
                for h in 0..dm.h {
                    let src = &ohd[(b * dm.h + h) * dm.t * dm.d..][..dm.t * dm.d];
                    for i in 0..dm.t {
                        yb[i * c + h * dm.d..][..dm.d].copy_from_slice(&src[i * dm.d..(i + 1) * dm.d]);
                    }
                }
            })
        });
        T::pool().give(ohd);
        Ok((y, Tensor::from_vec(probs, &[dm.b, dm.h, dm.t, dm.t])?, mx))
    })?;
    Ok((out, Saved::Host { qkv, probs }, ProbeValue::Host(max_logit)))
}

/// Backward on the saved tensors' device: the gradient of qkv.
fn device_backward(g: &Tensor, saved: &Saved, dm: Dims, prec: crate::tensor::Precision, drop: Option<Dropout>) -> Result<Tensor> {
    let (qkv, probs) = match saved {
        Saved::Host { qkv, probs } => (qkv, probs),
        #[cfg(feature = "cuda")]
        Saved::Device(s) => return crate::kernels::cuda::ops::attention_bwd(g, s, dm.b, dm.t, dm.h, dm.d, dm.scale, prec, drop),
        #[cfg(feature = "cuda")]
        Saved::Flash(s) => return crate::kernels::cuda::ops::flash_attention_bwd(g, s, dm.b, dm.t, dm.h, dm.d, dm.scale, drop),
    };
    let _ = prec; // the CPU backward reads the rounded qkv saved by forward
    let c = dm.c();
    let scale = dm.scale;
    with_float!(g.dtype(), "causal_attention", T => {
        let g = g.contiguous();
        let (xd, gd, pd) = (qkv.data::<T>()?, g.data::<T>()?, probs.data::<T>()?);
        let mut dhd = T::pool().take(dm.b * dm.h * 3 * dm.t * dm.d);
        backward(xd, gd, pd, dm, T::of(scale), drop, &mut dhd);
        // [B, H, 3, T, D] → [B, T, 3C]
        let gx = Tensor::build::<T>(&[dm.b, dm.t, 3 * c], |gx| {
            gx.par_chunks_mut(dm.t * 3 * c).enumerate().for_each(|(b, gb)| {
                for h in 0..dm.h {
                    for part in 0..3 {
                        let src = &dhd[((b * dm.h + h) * 3 + part) * dm.t * dm.d..][..dm.t * dm.d];
                        for i in 0..dm.t {
                            gb[i * 3 * c + part * c + h * dm.d..][..dm.d].copy_from_slice(&src[i * dm.d..(i + 1) * dm.d]);
                        }
                    }
                }
            })
        });
        T::pool().give(dhd);
        Ok(gx)
    })
}

impl<'t> Var<'t> {
    /// Causal multi-head self-attention core over packed `qkv [B, T, 3C]` with `n_heads` heads.
    pub fn causal_attention(self, n_heads: usize) -> Result<AttnOut<'t>> {
        self.causal_attention_dropout(n_heads, None)
    }

    /// [`causal_attention`](Self::causal_attention) with dropout `drop` on the probabilities.
    pub fn causal_attention_dropout(self, n_heads: usize, drop: Option<Dropout>) -> Result<AttnOut<'t>> {
        self.causal_attention_scaled(n_heads, drop, None)
    }

    /// Attention with the score scale given (`None`: 1/√d_head; μP uses 1/d_head, so that
    /// attention logits stay O(1) as the head dimension grows with width).
    pub fn causal_attention_scaled(self, n_heads: usize, drop: Option<Dropout>, scale: Option<f64>) -> Result<AttnOut<'t>> {
        let qkv = self.value().try_contiguous()?;
        let s = qkv.shape().to_vec();
        if s.len() != 3 || !s[2].is_multiple_of(3) || n_heads == 0 || !(s[2] / 3).is_multiple_of(n_heads) {
            return Err(Error::shape("causal_attention", format!("qkv {s:?} with {n_heads} heads")));
        }
        let d = s[2] / 3 / n_heads;
        let scale = scale.unwrap_or(1.0 / (d as f64).sqrt());
        if !(scale.is_finite() && scale > 0.0) {
            return Err(Error::shape("causal_attention", format!("score scale {scale}")));
        }
        let dm = Dims { b: s[0], t: s[1], h: n_heads, d, scale };
        let prec = self.tape().precision();
        let (out, saved, max_logit) = device_forward(&qkv, dm, prec, drop)?;
        // Attention of a bf16 activation is one too (as under autocast): bf16 on a GPU, rounded
        // on the CPU.
        let half = self.is_half();
        let out = if half && !out.is_cuda() { crate::ops::matmul::round_for(&out, prec)? } else { out };
        let y = self.tape().record("causal_attention", out, &[self], move |g| Ok(vec![Some(device_backward(g, &saved, dm, prec, drop)?)]));
        let y = if half { y.mark_half() } else { y };
        Ok(AttnOut { y, max_logit })
    }
}
