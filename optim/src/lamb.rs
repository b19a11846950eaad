//! LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76
//! minutes"): Adam's direction rescaled per parameter tensor by a trust ratio, so every layer
//! moves by about the same fraction of its norm whatever its gradient scale — what lets the
//! batch grow to tens of thousands.
//!
//! Per tensor: m ← β1·m + (1−β1)·g, v ← β2·v + (1−β2)·g², r = m̂/(√v̂ + ε) + λ·w,
//! trust = min(‖w‖, clamp)/(‖r‖ + ε) (1 when either norm is 0), w ← w − lr·trust·r. Without
//! `correct_bias` (the default) m̂ = m and v̂ = v: the reference parity settings, PyPI
//! `pytorch-optimizer`'s `Lamb(weight_decouple=False, adam_debias=True)` (= `torch-optimizer`'s
//! `Lamb(debias=False)`). The decay is coupled into r, before the norm, as there. Per-parameter
//! multipliers scale λ and lr (`ParamScales`).
//!
//! On a GPU the step is decided on the device (`step_on_device`: the non-finite check, clipping,
//! the step count and bias corrections there; the trust ratios were always computed there), so
//! a step that logs nothing does not wait for the GPU and can be replayed in a CUDA graph.

use crate::adamw::powi;
use crate::trust::{norm, segments};
use crate::DecayMode;
use crate::{host_state, load_moments, moments_state, saved_state, upload_state, Optimizer, ParamScales, Result, StepCtx};
use dptrain_core::ops::flat::{DeviceLr, DeviceSegments, DeviceStepCount, LambGate, LambGateScalars, LambStep, Segment, StepRecord};
use dptrain_core::{GradStore, ParamStore, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LambConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Adam's bias correction of both moments (the paper's m̂, v̂); off in the reference.
    pub correct_bias: bool,
    /// φ: the weight norm in the trust ratio is clamped to at most this (reference: 10).
    pub clamp: f64,
    /// `Coupled` (the reference): λ·p is part of the direction the trust ratio scales.
    /// `Independent` (Wortsman et al.): p ← p·(1 − s_t·λ) − lr·trust·r with r without decay and
    /// s_t = lr / `peak_lr`, the schedule's multiplier, so λ does not move with the peak LR.
    pub decay_mode: DecayMode,
    pub peak_lr: f64,
}

impl Default for LambConfig {
    fn default() -> Self {
        LambConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-6,
            weight_decay: 0.0,
            correct_bias: false,
            clamp: 10.0,
            decay_mode: DecayMode::Coupled,
            peak_lr: 1e-3,
        }
    }
}

pub struct Lamb {
    pub cfg: LambConfig,
    /// The moments on the host: empty until a CPU step or a restore needs them, and again once
    /// uploaded to the parameters' GPU.
    m: Vec<f32>,
    v: Vec<f32>,
    /// The direction r, kept between the two passes (its norm is needed before the update).
    r: Vec<f32>,
    /// Each parameter's multipliers of λ and lr (`None`: all 1).
    decay_scale: Vec<f32>,
    lr_scale: Option<Vec<f32>>,
    segs: Vec<Segment>,
    t: u64,
    /// The step count on the GPU while steps are decided there; `t` is then stale.
    t_dev: Option<DeviceStepCount>,
    /// The learning rate and independent decay as the device step reads them.
    lr_dev: DeviceLr,
    dev: Option<DevState>,
}

struct DevState {
    m: Tensor,
    v: Tensor,
    r: Tensor,
    /// The segment table with each parameter's decay and learning-rate multipliers.
    segs: DeviceSegments,
}

impl Lamb {
    /// LAMB with per-parameter multipliers of λ and lr.
    pub fn with_scales(cfg: LambConfig, params: &ParamStore, scales: &ParamScales) -> Result<Lamb> {
        scales.validate(params)?;
        Ok(Lamb {
            cfg,
            m: vec![],
            v: vec![],
            r: vec![],
            decay_scale: scales.per_param(|i| scales.wd[i]),
            lr_scale: scales.lr_per_param(),
            segs: segments(params),
            t: 0,
            t_dev: None,
            lr_dev: DeviceLr::default(),
            dev: None,
        })
    }

    /// Steps taken (read from the device while steps are decided there).
    fn steps(&self) -> Result<u64> {
        match &self.t_dev {
            Some(t) => Ok(t.get()?),
            None => Ok(self.t),
        }
    }

    /// s_t·λ of an independent decay at learning rate `lr` (0 when the decay is coupled).
    fn indep_decay(&self, lr: f64) -> f32 {
        let c = self.cfg;
        if c.decay_mode == DecayMode::Independent {
            (lr / c.peak_lr * c.weight_decay) as f32
        } else {
            0.0
        }
    }

    /// The moments and multipliers on the parameters' GPU (made there at the first GPU step,
    /// or uploaded from a restore).
    fn dev_state(&mut self, like: &Tensor) -> Result<&mut DevState> {
        if self.dev.is_none() {
            let (n, device) = (like.numel(), like.device());
            self.dev = Some(DevState {
                m: upload_state(&mut self.m, n, device)?,
                v: upload_state(&mut self.v, n, device)?,
                r: upload_state(&mut self.r, n, device)?,
                segs: DeviceSegments::with_scales(&self.segs, &self.decay_scale, self.lr_scale.as_deref(), like)?,
            });
        }
        Ok(self.dev.as_mut().expect("just set"))
    }

    fn scalars(&self, lr: f64) -> LambStep {
        let c = self.cfg;
        let t = self.t;
        let independent = c.decay_mode == DecayMode::Independent;
        // The powers as the device gate computes them (lamb_gate in optim.cu).
        let (c1, inv_sqrt_bc2) =
            if c.correct_bias { (1.0 / (1.0 - powi(c.beta1, t)), (1.0 / (1.0 - powi(c.beta2, t))).sqrt()) } else { (1.0, 1.0) };
        LambStep {
            beta1: c.beta1 as f32,
            beta2: c.beta2 as f32,
            eps: c.eps as f32,
            c1: c1 as f32,
            inv_sqrt_bc2: inv_sqrt_bc2 as f32,
            weight_decay: if independent { 0.0 } else { c.weight_decay as f32 },
            lr: lr as f32,
            clamp: c.clamp as f32,
            indep_decay: self.indep_decay(lr),
        }
    }
}

impl Optimizer for Lamb {
    fn step(&mut self, params: &mut ParamStore, grads: &GradStore, ctx: &mut StepCtx) -> Result<()> {
        // After steps decided on the device the count comes from there, and this step's goes
        // back, in place (a CUDA graph of the device step reads it there).
        self.t = self.steps()? + 1;
        if let Some(t) = &self.t_dev {
            t.set(self.t)?;
        }
        let s = self.scalars(ctx.lr);
        if params.flat().is_cuda() {
            let d = self.dev_state(params.flat())?;
            // The parameters' bf16 copy (what bf16 GEMMs read) is written in the same pass.
            let (p, p16) = params.flat_and_half_mut()?;
            dptrain_core::ops::flat::lamb_cuda(p, grads.flat(), &mut d.m, &mut d.v, &mut d.r, &d.segs, s, None, p16)?;
            return Ok(());
        }
        let g = grads.flat().data::<f32>()?;
        let p = params.flat_mut::<f32>()?;
        let n = p.len();
        let (m, v, r) = (host_state(&mut self.m, n), host_state(&mut self.v, n), host_state(&mut self.r, n));
        for (k, seg) in self.segs.iter().enumerate() {
            let range = seg.offset..seg.offset + seg.len;
            let (p, g) = (&mut p[range.clone()], &g[range.clone()]);
            let (m, v, r) = (&mut m[range.clone()], &mut v[range.clone()], &mut r[range.clone()]);
            let ds = self.decay_scale[k];
            for i in 0..p.len() {
                let gi = g[i];
                let mi = s.beta1 * m[i] + (1.0 - s.beta1) * gi;
                let vi = s.beta2 * v[i] + (1.0 - s.beta2) * gi * gi;
                m[i] = mi;
                v[i] = vi;
                r[i] = mi * s.c1 / (vi.sqrt() * s.inv_sqrt_bc2 + s.eps) + s.weight_decay * ds * p[i];
            }
            let (wn, rn) = (norm(p).min(s.clamp), norm(r));
            let trust = if wn == 0.0 || rn == 0.0 { 1.0 } else { wn / (rn + s.eps) };
            let lr = self.lr_scale.as_ref().map_or(s.lr, |l| s.lr * l[k]);
            for i in 0..p.len() {
                p[i] = p[i] * (1.0 - s.indep_decay * ds) - lr * trust * r[i];
            }
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
        // The bias corrections, lr and decay come from the gate and the staged cell.
        let s = self.scalars(ctx.lr);
        self.lr_dev.stage(ctx.lr, self.indep_decay(ctx.lr));
        let gate = LambGateScalars { max_norm, beta1: c.beta1, beta2: c.beta2, correct_bias: c.correct_bias };
        self.dev_state(params.flat())?;
        let (d, t) = (self.dev.as_mut().expect("just set"), self.t_dev.as_ref().expect("just set"));
        let gate = LambGate { rec, gate, t, lr: &self.lr_dev };
        let (p, p16) = params.flat_and_half_mut()?;
        dptrain_core::ops::flat::lamb_cuda(p, grads.flat(), &mut d.m, &mut d.v, &mut d.r, &d.segs, s, Some(gate), p16)?;
        Ok(true)
    }
    fn decides_next_step_on_device(&self, params: &ParamStore) -> bool {
        dptrain_core::ops::flat::decides_steps_on_device(params.flat())
    }
    fn stage_device_lr(&mut self, lr: f64) {
        self.lr_dev.stage(lr, self.indep_decay(lr));
    }
    fn state(&self, params: &ParamStore) -> Result<(Vec<(String, Tensor)>, serde_json::Value)> {
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
        "lamb"
    }
    fn adam_view(&self) -> Result<Option<crate::AdamView>> {
        let (c, t) = (&self.cfg, self.steps()?);
        let corr = if c.correct_bias { (1.0 / (1.0 - powi(c.beta1, t)), 1.0 / (1.0 - powi(c.beta2, t))) } else { (1.0, 1.0) };
        crate::AdamView::of(Some(&self.m), &self.v, self.dev.as_ref().map(|d| (Some(&d.m), &d.v)), (corr.0, corr.1, c.eps), t)
    }
}
