//! AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019), matching
//! `torch.optim.AdamW` (bias-corrected moments, ε added after the square root).
//!
//! Two decay forms: `Coupled` is torch's — θ ← θ·(1 − lr·λ) — so decay scales with the LR;
//! `Independent` is the paper's/"independent" form θ ← θ − s_t(ηΔ + λθ) with s_t = lr_t/η the
//! schedule multiplier, so λ does not change when the peak LR is swept (Wortsman et al. 2023).
//! Per-parameter multipliers (`ParamScales`) act as torch's parameter groups would: a
//! parameter's learning rate is lr·scale, and in the coupled form its decay follows its own
//! learning rate. The update is a single fused pass over the flat buffers.

use crate::{host_state, load_moments, moments_state, saved_state, upload_state, Optimizer, ParamScales, Result, StepCtx};
use dptrain_core::ops::flat::{AdamWGate, AdamWStep, DeviceGate, DeviceLr, DeviceSegments, DeviceStepCount, Segment, StepRecord};
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
    /// Decay biases and norm gains too (`AdamW::new`; `with_scales` takes explicit multipliers).
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
    /// The moments on the host: empty until a CPU step or a restore needs them (`host_state`),
    /// and again once uploaded to the parameters' GPU.
    m: Vec<f32>,
    v: Vec<f32>,
    /// Each parameter's decay multiplier (the coupled form's includes its learning-rate
    /// multiplier).
    decay_scale: Vec<f32>,
    /// Each parameter's learning-rate multiplier; `None` when all are 1.
    lr_scale: Option<Vec<f32>>,
    /// The parameters' places in the flat buffer, in order (the multipliers are per segment).
    segs: Vec<Segment>,
    t: u64,
    /// The buffers on the parameters' GPU once a step ran there (the host then has none).
    dev: Option<DevState>,
    /// The step count on the GPU while steps are decided there (`step_on_device`); `t` is then
    /// stale until read back.
    t_dev: Option<DeviceStepCount>,
    /// The learning rate and decay as the device step reads them.
    lr_dev: DeviceLr,
}

struct DevState {
    m: Tensor,
    v: Tensor,
    /// The parameters' segments with their decay and learning-rate multipliers (what the
    /// kernel reads).
    segs: DeviceSegments,
}

impl AdamW {
    /// AdamW with the standard grouping (`ParamScales::standard` with `cfg.decay_vectors`).
    pub fn new(cfg: AdamWConfig, params: &ParamStore) -> AdamW {
        AdamW::with_scales(cfg, params, &ParamScales::standard(params, cfg.decay_vectors)).expect("standard scales are valid")
    }
    /// AdamW with explicit per-parameter multipliers (`cfg.decay_vectors` is then unused).
    pub fn with_scales(cfg: AdamWConfig, params: &ParamStore, scales: &ParamScales) -> Result<AdamW> {
        scales.validate(params)?;
        let decay_scale = match cfg.decay_mode {
            DecayMode::Coupled => scales.per_param(|i| scales.wd[i] * scales.lr[i]),
            DecayMode::Independent => scales.per_param(|i| scales.wd[i]),
        };
        Ok(AdamW {
            cfg,
            m: vec![],
            v: vec![],
            decay_scale,
            lr_scale: scales.lr_per_param(),
            segs: crate::trust::segments(params),
            t: 0,
            dev: None,
            t_dev: None,
            lr_dev: DeviceLr::default(),
        })
    }
    /// Steps taken (read from the device while steps are decided there).
    pub fn steps(&self) -> Result<u64> {
        match &self.t_dev {
            Some(t) => Ok(t.get()?),
            None => Ok(self.t),
        }
    }

    /// The decay factor of a step at learning rate `lr` (before per-element multipliers).
    fn decay(&self, lr: f64) -> f32 {
        let c = &self.cfg;
        (match c.decay_mode {
            DecayMode::Coupled => lr * c.weight_decay,
            DecayMode::Independent => (lr / c.peak_lr) * c.weight_decay,
        }) as f32
    }

    /// The moments and multipliers on the parameters' GPU (made there at the first GPU step,
    /// or uploaded from a restore).
    fn dev_state(&mut self, flat: &Tensor) -> Result<&mut DevState> {
        if self.dev.is_none() {
            let (n, device) = (flat.numel(), flat.device());
            let (m, v) = (upload_state(&mut self.m, n, device)?, upload_state(&mut self.v, n, device)?);
            let segs = DeviceSegments::with_scales(&self.segs, &self.decay_scale, self.lr_scale.as_deref(), &m)?;
            self.dev = Some(DevState { m, v, segs });
        }
        Ok(self.dev.as_mut().expect("just set"))
    }
}

/// `a`ᵗ by repeated squaring — the same products, in the same order, as the GPU's step gate
/// (`adamw_powi` in optim.cu) and compiler-rt's `powi`, so the bias corrections agree bit for
/// bit whichever side computes them.
pub(crate) fn powi(mut a: f64, mut t: u64) -> f64 {
    let mut r = 1.0;
    loop {
        if t & 1 == 1 {
            r *= a;
        }
        t /= 2;
        if t == 0 {
            return r;
        }
        a *= a;
    }
}

const CHUNK: usize = 1 << 14;

impl Optimizer for AdamW {
    fn step(&mut self, params: &mut ParamStore, grads: &GradStore, ctx: &mut StepCtx) -> Result<()> {
        let lr = ctx.lr;
        // After steps decided on the device, the count comes back from there, and this step's
        // goes back: the device count stays where it is (a CUDA graph of the device step reads
        // it there).
        if let Some(t) = &self.t_dev {
            self.t = t.get()? + 1;
            t.set(self.t)?;
        } else {
            self.t += 1;
        }
        let c = self.cfg;
        let bc1 = 1.0 - powi(c.beta1, self.t);
        let bc2 = 1.0 - powi(c.beta2, self.t);
        // θ ← θ·(1 − decay·decay_scale) − step·lr_scale·m/(√v/√bc2 + ε)
        let decay = self.decay(lr);
        let step = (lr / bc1) as f32;
        let inv_sqrt_bc2 = (1.0 / bc2.sqrt()) as f32;
        let (b1, b2, eps) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32);
        if params.flat().is_cuda() {
            let d = self.dev_state(params.flat())?;
            let s = AdamWStep { beta1: b1, beta2: b2, eps, step_size: step, inv_sqrt_bc2, decay };
            // The parameters' bf16 copy (what bf16 GEMMs read) is written in the same pass.
            let (p, p16) = params.flat_and_half_mut()?;
            dptrain_core::ops::flat::adamw_cuda(p, grads.flat(), &mut d.m, &mut d.v, &d.segs, s, None, p16)?;
            return Ok(());
        }
        let g = grads.flat().data::<f32>()?;
        let p = params.flat_mut::<f32>()?;
        let n = p.len();
        let (m, v) = (host_state(&mut self.m, n), host_state(&mut self.v, n));
        // Pieces of at most CHUNK elements within one parameter, so each reads its two
        // multipliers as constants (the segments tile the buffer in order, as the store lays
        // out its parameters).
        let mut pieces = Vec::with_capacity(n / CHUNK + self.segs.len());
        let (mut p, mut g, mut m, mut v) = (p, g, m, v);
        for (k, seg) in self.segs.iter().enumerate() {
            let (ds, ls) = (self.decay_scale[k], self.lr_scale.as_ref().map_or(1.0, |l| l[k]));
            let mut left = seg.len;
            while left > 0 {
                let len = left.min(CHUNK);
                let (p0, p1) = std::mem::take(&mut p).split_at_mut(len);
                let (m0, m1) = std::mem::take(&mut m).split_at_mut(len);
                let (v0, v1) = std::mem::take(&mut v).split_at_mut(len);
                let (g0, g1) = g.split_at(len);
                (p, m, v, g) = (p1, m1, v1, g1);
                pieces.push((p0, g0, m0, v0, ds, ls));
                left -= len;
            }
        }
        let body = |(p, g, m, v, ds, ls): (&mut [f32], &[f32], &mut [f32], &mut [f32], f32, f32)| {
            let step = step * ls;
            for i in 0..p.len() {
                let gi = g[i];
                let mi = b1 * m[i] + (1.0 - b1) * gi;
                let vi = b2 * v[i] + (1.0 - b2) * gi * gi;
                m[i] = mi;
                v[i] = vi;
                let pi = p[i] * (1.0 - decay * ds);
                p[i] = pi - step * mi / (vi.sqrt() * inv_sqrt_bc2 + eps);
            }
        };
        if n >= 4 * CHUNK && rayon::current_num_threads() > 1 {
            pieces.into_par_iter().for_each(body);
        } else {
            pieces.into_iter().for_each(body);
        }
        Ok(())
    }
    fn step_on_device(
        &mut self,
        params: &mut ParamStore,
        grads: &GradStore,
        ctx: &mut StepCtx,
        rec: &StepRecord,
        max_norm: f64,
    ) -> Result<bool> {
        if !dptrain_core::ops::flat::decides_steps_on_device(params.flat()) {
            return Ok(false);
        }
        if self.t_dev.is_none() {
            self.t_dev = Some(DeviceStepCount::new(params.flat(), self.t)?);
        }
        let c = self.cfg;
        let decay = self.decay(ctx.lr);
        // step_size and inv_sqrt_bc2 come from the gate.
        let s = AdamWStep { beta1: c.beta1 as f32, beta2: c.beta2 as f32, eps: c.eps as f32, step_size: 0.0, inv_sqrt_bc2: 0.0, decay };
        let gate = AdamWGate { max_norm, beta1: c.beta1, beta2: c.beta2 };
        self.dev_state(params.flat())?;
        let (d, t) = (self.dev.as_mut().expect("just set"), self.t_dev.as_ref().expect("just set"));
        let (p, p16) = params.flat_and_half_mut()?;
        self.lr_dev.stage(ctx.lr, decay);
        let gate = Some(DeviceGate { rec, gate, t, lr: &self.lr_dev });
        dptrain_core::ops::flat::adamw_cuda(p, grads.flat(), &mut d.m, &mut d.v, &d.segs, s, gate, p16)?;
        Ok(true)
    }
    fn state(&self, params: &ParamStore) -> Result<(Vec<(String, Tensor)>, serde_json::Value)> {
        // On a GPU the moments are read back (once per checkpoint).
        let n = params.numel();
        let m = saved_state(&self.m, self.dev.as_ref().map(|d| &d.m), n)?;
        let v = saved_state(&self.v, self.dev.as_ref().map(|d| &d.v), n)?;
        Ok(moments_state(&m, &v, self.steps()?, params))
    }
    fn load_state(&mut self, params: &ParamStore, t: &std::collections::HashMap<String, Tensor>, s: &serde_json::Value) -> Result<()> {
        self.dev = None;
        self.t_dev = None;
        let n = params.numel();
        host_state(&mut self.m, n);
        host_state(&mut self.v, n);
        self.t = load_moments(&mut self.m, &mut self.v, params, t, s)?;
        Ok(())
    }
    fn name(&self) -> &'static str {
        "adamw"
    }
    fn decides_next_step_on_device(&self, params: &ParamStore) -> bool {
        dptrain_core::ops::flat::decides_steps_on_device(params.flat())
    }
    fn stage_device_lr(&mut self, lr: f64) {
        self.lr_dev.stage(lr, self.decay(lr));
    }
    fn adam_view(&self) -> Result<Option<crate::AdamView>> {
        let (c, t) = (&self.cfg, self.steps()?);
        let corr = (1.0 / (1.0 - powi(c.beta1, t)), 1.0 / (1.0 - powi(c.beta2, t)), c.eps);
        crate::AdamView::of(Some(&self.m), &self.v, self.dev.as_ref().map(|d| (Some(&d.m), &d.v)), corr, t)
    }
}
