//! AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019), matching
//! `torch.optim.AdamW` (bias-corrected moments, ε added after the square root).
//!
//! Two decay forms: `Coupled` is torch's — θ ← θ·(1 − lr·λ) — so decay scales with the LR;
//! `Independent` is the paper's/"independent" form θ ← θ − s_t(ηΔ + λθ) with s_t = lr_t/η the
//! schedule multiplier, so λ does not change when the peak LR is swept (Wortsman et al. 2023).
//! The update is a single fused pass over the flat buffers.

use crate::{decay_mask, join_state, split_state, Optimizer, Result};
use dptrain_core::{GradStore, ParamStore, Tensor};
use rayon::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecayMode {
    Coupled,
    Independent,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub decay_mode: DecayMode,
    /// Peak LR η (for the independent decay form's schedule multiplier).
    pub peak_lr: f64,
    pub decay_vectors: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            decay_mode: DecayMode::Coupled,
            peak_lr: 1e-3,
            decay_vectors: true,
        }
    }
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    m: Vec<f32>,
    v: Vec<f32>,
    mask: Vec<f32>,
    t: u64,
    /// (m, v, mask) on the parameters' GPU once a step ran there; the host vectors are then
    /// stale until `state` copies these back.
    dev: Option<[Tensor; 3]>,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, params: &ParamStore) -> AdamW {
        let n = params.numel();
        AdamW { cfg, m: vec![0.0; n], v: vec![0.0; n], mask: decay_mask(params, cfg.decay_vectors), t: 0, dev: None }
    }
    pub fn steps(&self) -> u64 {
        self.t
    }
}

const CHUNK: usize = 1 << 14;

impl Optimizer for AdamW {
    fn step(&mut self, params: &mut ParamStore, grads: &GradStore, lr: f64) -> Result<()> {
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        // θ ← θ·(1 − decay·mask) − step·m/(√v/√bc2 + ε)
        let decay = match c.decay_mode {
            DecayMode::Coupled => lr * c.weight_decay,
            DecayMode::Independent => (lr / c.peak_lr) * c.weight_decay,
        } as f32;
        let step = (lr / bc1) as f32;
        let inv_sqrt_bc2 = (1.0 / bc2.sqrt()) as f32;
        let (b1, b2, eps) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32);
        if params.flat().is_cuda() {
            let device = params.flat().device();
            if self.dev.is_none() {
                let up = |v: &[f32]| Tensor::from_slice(v, &[v.len()]).and_then(|t| t.to_device(device));
                self.dev = Some([up(&self.m)?, up(&self.v)?, up(&self.mask)?]);
            }
            let [m, v, mask] = self.dev.as_mut().expect("just set");
            dptrain_core::ops::flat::adamw_cuda(
                params.flat_tensor_mut()?,
                grads.flat(),
                m,
                v,
                mask,
                [b1, b2, eps, step, inv_sqrt_bc2, decay],
            )?;
            return Ok(());
        }
        let g = grads.flat().data::<f32>()?;
        let p = params.flat_mut::<f32>()?;
        let body = |(((p, g), (m, v)), mask): (((&mut [f32], &[f32]), (&mut [f32], &mut [f32])), &[f32])| {
            for i in 0..p.len() {
                let gi = g[i];
                let mi = b1 * m[i] + (1.0 - b1) * gi;
                let vi = b2 * v[i] + (1.0 - b2) * gi * gi;
                m[i] = mi;
                v[i] = vi;
                let pi = p[i] * (1.0 - decay * mask[i]);
                p[i] = pi - step * mi / (vi.sqrt() * inv_sqrt_bc2 + eps);
            }
        };
        if p.len() >= 4 * CHUNK && rayon::current_num_threads() > 1 {
            p.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(self.m.par_chunks_mut(CHUNK).zip(self.v.par_chunks_mut(CHUNK)))
                .zip(self.mask.par_chunks(CHUNK))
                .for_each(body);
        } else {
            body((((p, g), (&mut self.m[..], &mut self.v[..])), &self.mask[..]));
        }
        Ok(())
    }
    fn state(&self, params: &ParamStore) -> Result<(Vec<(String, Tensor)>, serde_json::Value)> {
        // On a GPU the moments are read back (once per checkpoint).
        let (m, v) = match &self.dev {
            Some([m, v, _]) => (m.to_vec::<f32>()?, v.to_vec::<f32>()?),
            None => (self.m.clone(), self.v.clone()),
        };
        let mut v_ = split_state("exp_avg", &m, params);
        v_.extend(split_state("exp_avg_sq", &v, params));
        let v = v_;
        Ok((v, serde_json::json!({ "step": self.t })))
    }
    fn load_state(&mut self, params: &ParamStore, t: &std::collections::HashMap<String, Tensor>, s: &serde_json::Value) -> Result<()> {
        self.dev = None;
        join_state("exp_avg", &mut self.m, params, t)?;
        join_state("exp_avg_sq", &mut self.v, params, t)?;
        self.t = s.get("step").and_then(|x| x.as_u64()).ok_or_else(|| crate::OptimError::State("missing `step`".into()))?;
        Ok(())
    }
    fn name(&self) -> &'static str {
        "adamw"
    }
}
