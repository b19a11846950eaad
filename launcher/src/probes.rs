//! The trainer's own probes — what only the training loop can see, next to the models'
//! activation probes (`dptrain_models::probes`): per parameter tensor the gradient RMS, the
//! update-to-parameter RMS ratio, Adam's fraction of √v̂ below ε and its unscaled update RMS,
//! the distance from initialisation; and the critical batch size B_simple (McCandlish et al.
//! 2018) from the ranks' gradients before and after the all-reduce.
//!
//! They run on probe steps only (`probes.interval`), each a per-segment reduction over the flat
//! buffers on their device (`ops::flat::segment_sums`: one launch pair and one small download on
//! a GPU). Their values are the same on every rank (they read averaged gradients and identical
//! parameters), so they join the records after the cross-rank reduction of the model probes.
//! The estimator's running state is part of the checkpoint, so a resumed run logs what the
//! uninterrupted one would.

use crate::config::ProbesSection;
use crate::error::Result;
use dptrain_core::ops::flat::{copy_of, segment_sums, DeviceSegments, SegSum, Segment};
use dptrain_core::probe::Reduce;
use dptrain_core::{GradStore, ParamStore, Tensor};
use dptrain_optim::Optimizer;

/// A probe value ready for the record (name, reduction, value).
pub type Value = (String, Reduce, f64);

/// A debiased exponential moving average.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Ema {
    pub value: f64,
    pub count: u64,
}

impl Ema {
    pub fn update(&mut self, x: f64, beta: f64) {
        self.value = beta * self.value + (1.0 - beta) * x;
        self.count += 1;
    }
    pub fn get(&self, beta: f64) -> f64 {
        self.value / (1.0 - beta.powi(self.count.min(i32::MAX as u64) as i32))
    }
}

/// McCandlish et al.'s B_simple from gradient norms at two batch sizes: the unbiased
/// estimates of |G|² and of the noise trace S from |G_small|² (batch `b_small`) and |G_big|²
/// (batch `b_big`), each averaged by its own debiased EMA, B_simple = EMA(S) / EMA(|G|²).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CriticalBatch {
    pub g2: Ema,
    pub s: Ema,
}

impl CriticalBatch {
    /// Folds one measurement in (`beta` per measurement); returns the values to log.
    pub fn update(&mut self, g2_small: f64, b_small: f64, g2_big: f64, b_big: f64, beta: f64) -> Vec<Value> {
        let g2_est = (b_big * g2_big - b_small * g2_small) / (b_big - b_small);
        let s_est = (g2_small - g2_big) / (1.0 / b_small - 1.0 / b_big);
        self.g2.update(g2_est, beta);
        self.s.update(s_est, beta);
        let (g2, s) = (self.g2.get(beta), self.s.get(beta));
        vec![
            ("cbs_g2_small".into(), Reduce::Mean, g2_small),
            ("cbs_g2_big".into(), Reduce::Mean, g2_big),
            ("cbs_g2_ema".into(), Reduce::Mean, g2),
            ("cbs_s_ema".into(), Reduce::Mean, s),
            ("cbs_b_simple".into(), Reduce::Mean, s / g2),
        ]
    }
}

/// The per-tensor probes' fixed parts: the parameters' segments (host and device tables),
/// names, the initial parameters and the snapshot taken before an optimizer step.
pub struct TrainProbes {
    pub cfg: ProbesSection,
    segs: Vec<Segment>,
    names: Vec<String>,
    dev: Option<DeviceSegments>,
    /// w₀ on the parameters' device (`probes.distance`), rebuilt from the seed at setup.
    init: Option<Tensor>,
    /// The parameters before this probe step's optimizer step (`probes.optimizer`).
    before: Option<Tensor>,
    pub cbs: CriticalBatch,
}

impl TrainProbes {
    /// `init`: the parameters as built from the seed (host), when the distance probe is on.
    pub fn new(cfg: &ProbesSection, params: &ParamStore, init: Option<Tensor>) -> Result<TrainProbes> {
        let segs: Vec<Segment> =
            params.infos().iter().map(|p| Segment { offset: p.offset, len: p.numel, matrix: p.shape.len() > 1 }).collect();
        let flat = params.flat();
        let dev = if flat.is_cuda() { Some(DeviceSegments::new(&segs, flat)?) } else { None };
        let init = match init {
            Some(t) if cfg.distance => Some(t.to_device(flat.device())?),
            _ => None,
        };
        Ok(TrainProbes {
            cfg: cfg.clone(),
            segs,
            names: params.infos().iter().map(|p| p.name.clone()).collect(),
            dev,
            init,
            before: None,
            cbs: CriticalBatch::default(),
        })
    }

    /// Whether step `done` (1-based) of `steps` computes probes.
    pub fn is_probe_step(&self, done: u64, steps: u64) -> bool {
        done.is_multiple_of(self.cfg.interval) || done == steps
    }

    fn sums(&self, a: &Tensor, b: &Tensor, what: SegSum) -> Result<Vec<[f64; 2]>> {
        Ok(segment_sums(a, b, &self.segs, self.dev.as_ref(), what)?)
    }

    /// Σ over all tensors of ‖a − b‖² (a micro-step's own gradient from two accumulations).
    pub fn total_diff_sq(&self, a: &Tensor, b: &Tensor) -> Result<f64> {
        Ok(self.sums(a, b, SegSum::Diff)?.iter().map(|s| s[0]).sum())
    }

    /// On a probe step, after the gradients are averaged and before clipping: `grad_rms/<p>`;
    /// then keeps the parameters for the update ratio.
    pub fn before_step(&mut self, params: &ParamStore, grads: &GradStore, out: &mut Vec<Value>) -> Result<()> {
        if self.cfg.grads {
            let g = grads.flat();
            for (s, (seg, name)) in self.sums(g, g, SegSum::Squares)?.iter().zip(self.segs.iter().zip(&self.names)) {
                out.push((format!("grad_rms/{name}"), Reduce::Mean, (s[0] / seg.len.max(1) as f64).sqrt()));
            }
        }
        if self.cfg.optimizer {
            self.before = Some(copy_of(params.flat())?);
        }
        Ok(())
    }

    /// On a probe step, after the optimizer step: `update_ratio/<p>` (RMS of the change over
    /// RMS of the parameter before it), Adam's `adam_eps_frac/<p>` and `adam_update_rms/<p>`,
    /// and `dist_init/<p>` with the total `dist_init`.
    pub fn after_step(&mut self, params: &ParamStore, opt: &dyn Optimizer, out: &mut Vec<Value>) -> Result<()> {
        let w = params.flat();
        if let Some(before) = self.before.take() {
            for (s, name) in self.sums(w, &before, SegSum::Diff)?.iter().zip(&self.names) {
                out.push((format!("update_ratio/{name}"), Reduce::Mean, (s[0] / s[1]).sqrt()));
            }
            if let Some(a) = opt.adam_view()? {
                let what = SegSum::Adam { c1: a.c1 as f32, c2: a.c2 as f32, eps: a.eps as f32 };
                let m = a.m.as_ref().unwrap_or(&a.v);
                for (s, (seg, name)) in self.sums(m, &a.v, what)?.iter().zip(self.segs.iter().zip(&self.names)) {
                    let n = seg.len.max(1) as f64;
                    out.push((format!("adam_eps_frac/{name}"), Reduce::Mean, s[0].round() / n));
                    if a.m.is_some() {
                        out.push((format!("adam_update_rms/{name}"), Reduce::Mean, (s[1] / n).sqrt()));
                    }
                }
            }
        }
        if let Some(w0) = &self.init {
            let sums = self.sums(w, w0, SegSum::Diff)?;
            for (s, name) in sums.iter().zip(&self.names) {
                out.push((format!("dist_init/{name}"), Reduce::Mean, s[0].sqrt()));
            }
            out.push(("dist_init".into(), Reduce::Mean, sums.iter().map(|s| s[0]).sum::<f64>().sqrt()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With gradient norms exactly as the model has them — |G_B|² = |G|² + S/B — the estimates
    /// recover |G|² and S, and B_simple = S / |G|²; the EMAs are debiased from the first value.
    #[test]
    fn critical_batch_recovers_the_noise_scale() {
        let (g2, s) = (0.25, 8.0);
        let at = |b: f64| g2 + s / b;
        let mut c = CriticalBatch::default();
        let v = c.update(at(8.0), 8.0, at(32.0), 32.0, 0.9);
        let get = |k: &str| v.iter().find(|x| x.0 == k).unwrap().2;
        assert!((get("cbs_g2_ema") - g2).abs() < 1e-12 && (get("cbs_s_ema") - s).abs() < 1e-12);
        assert!((get("cbs_b_simple") - 32.0).abs() < 1e-9);
        // A second measurement with another truth moves each EMA by (1 − β)/(1 − β²) of the way.
        let v = c.update(0.5 + 16.0 / 8.0, 8.0, 0.5 + 16.0 / 32.0, 32.0, 0.9);
        let g = v.iter().find(|x| x.0 == "cbs_g2_ema").unwrap().2;
        let want = (0.9 * 0.1 * 0.25 + 0.1 * 0.5) / (1.0 - 0.81);
        assert!((g - want).abs() < 1e-12, "{g} vs {want}");
    }

    /// A quadratic problem with Gaussian gradient noise: at a fixed point the true gradient is G
    /// (|G|² = 1) and each sample adds noise of covariance σ²I with trace S = 16, so the noise
    /// scale B_simple = S / |G|² = 16. Four ranks of 8 samples: from the ranks' own gradient
    /// norms and their average's, as the trainer measures them, the estimate lands within 10 %.
    #[test]
    fn critical_batch_recovers_the_noise_scale_of_a_noisy_quadratic() {
        let (dims, ranks, per_rank) = (64, 4, 8);
        let sigma = (16.0f64 / dims as f64).sqrt();
        let g: Vec<f64> = (0..dims).map(|i| if i == 0 { 1.0 } else { 0.0 }).collect();
        let mut rng = dptrain_core::rng::Rng::new(42);
        let mut c = CriticalBatch::default();
        let mut last = vec![];
        for _ in 0..3000 {
            let mut avg = vec![0.0; dims];
            let mut small = 0.0;
            for _ in 0..ranks {
                let mut local = g.clone();
                for _ in 0..per_rank {
                    for x in local.iter_mut() {
                        *x += sigma * rng.normal() / per_rank as f64;
                    }
                }
                small += local.iter().map(|x| x * x).sum::<f64>() / ranks as f64;
                for (a, x) in avg.iter_mut().zip(&local) {
                    *a += x / ranks as f64;
                }
            }
            let big = avg.iter().map(|x| x * x).sum::<f64>();
            last = c.update(small, per_rank as f64, big, (ranks * per_rank) as f64, 0.99);
        }
        let b = last.iter().find(|v| v.0 == "cbs_b_simple").unwrap().2;
        assert!((b - 16.0).abs() < 1.6, "B_simple {b}, the problem's noise scale 16");
    }
}
