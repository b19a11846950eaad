//! Dropout with masks that are never stored: element `i` of a tensor is kept when the `i`-th
//! counter-based draw of the mask's key clears the threshold `p·2³²`, and kept values are scaled
//! by 1/(1−p) (inverted dropout, as `torch.nn.Dropout`). Backward regenerates the same mask from
//! the key, so no mask tensor lives between forward and backward, and the CUDA kernel draws
//! bit-for-bit the mask the CPU draws (integer arithmetic only; `dpt_keep` in
//! `kernels/cuda/common.cuh`).
//!
//! Keys come from the tape ([`Tape::dropout`](crate::autograd::Tape::dropout)): the trainer keys
//! each micro-step's tape by (seed, step, rank, micro-step) and each dropout site adds its own
//! number (layer, position in the block), so a run's masks are a function of its config and a
//! resumed run draws the same ones. The fused attention applies the same rule to its
//! probabilities (`ops::fused::attention`).
//!
//! A training step replayed as a CUDA graph keeps the kernel arguments of its capture, keys
//! included. For it the micro-steps' tape keys live in device memory ([`StepKeys`], staged by
//! the trainer for each step and uploaded by the graph before each replay), a tape set to read
//! them ([`Tape::set_device_rng_key`](crate::autograd::Tape::set_device_rng_key)) hands its
//! masks their address and site, and the kernels derive each mask's key from them — the key
//! [`Dropout::site`] computes on the host, so eager and replayed steps draw the same masks.

use crate::autograd::Var;
use crate::error::{Error, Result};
use crate::rng::{draw, key_of};
use crate::tensor::Tensor;
use crate::{on_cuda, with_float};
use rayon::prelude::*;

/// One dropout mask: probability and key (and the threshold that follows from p, computed once:
/// `keep` runs per element).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    pub(crate) p: f64,
    pub(crate) key: u64,
    thr: u32,
    /// On a GPU, where the kernels read the key from: (device address of the micro-step's tape
    /// key, site), whose `key_of` is `key` (see [`StepKeys`]).
    on_device: Option<(u64, u64)>,
}

impl Dropout {
    /// A mask dropping with probability `p` ∈ [0, 1); `None` when `p` is 0 (nothing to do).
    pub fn new(p: f64, key: u64) -> Result<Option<Dropout>> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::Config { key: "dropout".into(), msg: format!("probability must be in [0, 1), got {p}") });
        }
        let thr = ((p * 4_294_967_296.0).round() as u64).min(u32::MAX as u64) as u32;
        Ok((p > 0.0).then_some(Dropout { p, key, thr, on_device: None }))
    }
    /// The same probability under a sub-key (one per dropout site).
    pub fn site(self, site: u64) -> Dropout {
        Dropout { key: key_of(&[self.key, site]), on_device: None, ..self }
    }
    /// Site `site` of a tape key that is also at device address `at` (a [`DeviceKey`]): the
    /// kernels compute the mask's key from the device's copy.
    pub(crate) fn site_on_device(self, site: u64, at: u64) -> Dropout {
        Dropout { on_device: Some((at, site)), ..self.site(site) }
    }
    /// The key as the CUDA kernels take it (`dpt_mask_key`): (address of the tape key in device
    /// memory, 0 for none; the site with an address, else the key).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn kernel_key(&self) -> (u64, i64) {
        match self.on_device {
            Some((at, site)) => (at, site as i64),
            None => (0, self.key as i64),
        }
    }
    /// Draws below this (the top 32 bits of the 64-bit draw) drop.
    pub fn threshold(&self) -> u32 {
        self.thr
    }
    /// 1/(1−p), in f32 on every device and dtype so CPU and GPU scale identically.
    pub fn scale(&self) -> f32 {
        (1.0 / (1.0 - self.p)) as f32
    }
    /// Whether element `i` is kept.
    #[inline]
    pub fn keep(&self, i: u64) -> bool {
        (draw(self.key, i) >> 32) as u32 >= self.thr
    }
}

/// The tape keys of a training step's micro-steps, as its dropout kernels read them on a GPU: the
/// trainer [`stage`](Self::stage)s each step's and the step [`upload`](Self::upload)s them —
/// inside a CUDA graph's capture that binds them to this cell, which the graph uploads again
/// before each replay (as AdamW's learning rate). Clones share the cell.
#[derive(Clone, Default)]
pub struct StepKeys {
    #[cfg(feature = "cuda")]
    cell: crate::tensor::cuda::HostScalars,
}

/// One micro-step's tape key in device memory (for
/// [`Tape::set_device_rng_key`](crate::autograd::Tape::set_device_rng_key)); holds its buffer.
#[derive(Clone)]
pub struct DeviceKey {
    #[cfg(feature = "cuda")]
    _buf: std::sync::Arc<crate::tensor::cuda::DevBuf>,
    pub(crate) at: u64,
}

impl StepKeys {
    /// This step's tape keys, one per micro-step.
    pub fn stage(&self, keys: &[u64]) {
        #[cfg(feature = "cuda")]
        self.cell.set_words(keys);
        #[cfg(not(feature = "cuda"))]
        let _ = keys;
    }

    /// The staged keys in `device`'s memory, one per key (none off a GPU, whose tapes use the
    /// host's keys).
    pub fn upload(&self, device: crate::Device) -> Result<Vec<DeviceKey>> {
        match device {
            #[cfg(feature = "cuda")]
            crate::Device::Cuda(ordinal) => {
                let n = self.cell.words().len();
                if n == 0 {
                    return Ok(vec![]);
                }
                let buf = std::sync::Arc::new(crate::tensor::cuda::dev(ordinal)?.upload_scalars(&self.cell)?);
                Ok((0..n as u64).map(|i| DeviceKey { at: buf.ptr + 8 * i, _buf: buf.clone() }).collect())
            }
            _ => Ok(vec![]),
        }
    }
}

/// `x` with the mask applied (contiguous result): `x[i]·scale` where kept, else 0. Also the
/// backward (the same mask on the gradient).
pub fn apply(x: &Tensor, d: Dropout) -> Result<Tensor> {
    on_cuda!(x => gpu::dropout(x, d));
    let x = x.contiguous();
    with_float!(x.dtype(), "dropout", T => {
        let xd = x.data::<T>()?;
        let scale = T::of(d.scale() as f64);
        Ok(Tensor::build::<T>(x.shape(), |y| {
            y.par_chunks_mut(1 << 14).zip(xd.par_chunks(1 << 14)).enumerate().for_each(|(c, (y, x))| {
                let base = (c as u64) << 14;
                for (k, (y, &x)) in y.iter_mut().zip(x).enumerate() {
                    *y = if d.keep(base + k as u64) { x * scale } else { T::zero() };
                }
            })
        }))
    })
}

/// `res + apply(x, d)` (same shapes): one pass on a GPU with `Fusions::residual` on, else the
/// two ops — the same numbers either way.
fn apply_add(x: &Tensor, res: &Tensor, d: Dropout) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.is_cuda() && crate::kernels::cuda::ops::dev_of(x)?.fusions().residual {
        return crate::kernels::cuda::ops::dropout_add(x, res, d);
    }
    crate::ops::elementwise::t::add(res, &apply(x, d)?)
}

impl<'t> Var<'t> {
    /// Dropout with mask `d`; the identity for `None` (evaluation, or p = 0).
    pub fn dropout(self, d: Option<Dropout>) -> Result<Var<'t>> {
        let Some(d) = d else { return Ok(self) };
        let y = apply(&self.value(), d)?;
        Ok(self.tape().record("dropout", y, &[self], move |g| Ok(vec![Some(apply(g, d)?)])))
    }

    /// `residual + self.dropout(d)` as one op, for a residual stream: on a GPU (with
    /// `Fusions::residual` on) one pass over the three tensors instead of a dropout pass and an
    /// add; the same numbers everywhere. Backward hands the residual the output's gradient as it is.
    pub fn dropout_add(self, d: Option<Dropout>, residual: Var<'t>) -> Result<Var<'t>> {
        let Some(d) = d else { return residual.add(self) };
        if self.shape() != residual.shape() || self.dtype() != residual.dtype() {
            return residual.add(self.dropout(Some(d))?);
        }
        let y = apply_add(&self.value(), &residual.value(), d)?;
        Ok(self.tape().record("dropout_add", y, &[self, residual], move |g| Ok(vec![Some(apply(g, d)?), Some(g.clone())])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_the_expected_fraction_and_scales_the_rest() {
        for p in [0.1, 0.2, 0.5, 0.9] {
            let d = Dropout::new(p, 42).unwrap().unwrap();
            let n = 200_000;
            let x = Tensor::from_vec(vec![1.0f32; n], &[n]).unwrap();
            let y = apply(&x, d).unwrap().to_vec::<f32>().unwrap();
            let dropped = y.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
            // Binomial std at n = 2e5 is ≤ 0.0012: 5 sigma.
            assert!((dropped - p).abs() < 0.006, "p {p}: dropped {dropped}");
            let want = (1.0 / (1.0 - p)) as f32;
            assert!(y.iter().all(|&v| v == 0.0 || v == want), "p {p}: kept values must be x/(1-p)");
            // The mean is preserved in expectation.
            let mean = y.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            assert!((mean - 1.0).abs() < 0.03, "p {p}: mean {mean}");
        }
    }

    #[test]
    fn masks_are_a_function_of_the_key_and_sites_differ() {
        let x = Tensor::from_vec((0..4096).map(|i| i as f32).collect::<Vec<_>>(), &[64, 64]).unwrap();
        let d = Dropout::new(0.5, 7).unwrap().unwrap();
        let a = apply(&x, d).unwrap().to_vec::<f32>().unwrap();
        assert_eq!(a, apply(&x, d).unwrap().to_vec::<f32>().unwrap());
        assert_ne!(a, apply(&x, d.site(1)).unwrap().to_vec::<f32>().unwrap());
        assert_ne!(a, apply(&x, Dropout { key: 8, ..d }).unwrap().to_vec::<f32>().unwrap());
        assert!(Dropout::new(0.0, 1).unwrap().is_none());
        assert!(Dropout::new(1.0, 1).is_err() && Dropout::new(-0.1, 1).is_err());
    }

    #[test]
    fn backward_applies_the_forward_mask() {
        let tape = crate::autograd::Tape::new();
        let x = tape.leaf(Tensor::from_vec(vec![2.0f32; 1000], &[1000]).unwrap());
        let d = Dropout::new(0.3, 99).unwrap();
        let y = x.dropout(d).unwrap();
        let fwd = y.value().to_vec::<f32>().unwrap();
        let loss = y.sum_all().unwrap();
        let g = tape.backward(loss, &mut crate::params::GradStore::empty(), |_, _| {}).unwrap();
        let gx = g.get(x).unwrap().to_vec::<f32>().unwrap();
        for (f, g) in fwd.iter().zip(&gx) {
            // y = 2·m·s, so dy/dx = m·s = y/2.
            assert_eq!(*g, f / 2.0);
        }
    }
}
