//! SGD with momentum and Nesterov, matching `torch.optim.SGD` exactly: g ← g + λθ;
//! b ← μb + (1 − dampening)g (b = g on the first step); g ← g + μb (Nesterov) or b; θ ← θ − lr·g.
//! Per-parameter multipliers (`ParamScales`) scale each parameter's λ and lr, as torch's
//! parameter groups would. On a GPU the step is decided on the device (`step_on_device`: the
//! non-finite check, clipping and whether the momentum buffer starts there), so a step that
//! logs nothing does not wait for the GPU and can be replayed in a CUDA graph — the large-batch
//! image recipes (SGD with momentum) get what AdamW has.

use crate::{host_state, join_state, saved_state, split_state, upload_state, Optimizer, ParamScales, Result, StepCtx};
use dptrain_core::ops::flat::{DeviceLr, DeviceSegments, DeviceStepCount, Segment, SgdGate, SgdStep, StepRecord};
use dptrain_core::{GradStore, ParamStore, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConfig {
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    /// Decay biases and norm gains too (`Sgd::new`; `with_scales` takes explicit multipliers).
    pub decay_vectors: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig { momentum: 0.9, dampening: 0.0, nesterov: false, weight_decay: 0.0, decay_vectors: true }
    }
}

pub struct Sgd {
    pub cfg: SgdConfig,
    /// The momentum buffer on the host: empty until a CPU step or a restore needs it, and again
    /// once uploaded to the parameters' GPU.
    buf: Vec<f32>,
    /// Each parameter's decay and learning-rate multipliers (`None`: all 1).
    decay_scale: Vec<f32>,
    lr_scale: Option<Vec<f32>>,
    /// Applied steps (only whether any was matters: the momentum buffer starts at the first).
    t: u64,
    /// The count on the device while steps are decided there (`step_on_device`).
    t_dev: Option<DeviceStepCount>,
    /// The learning rate as the device step reads it.
    lr_dev: DeviceLr,
    /// The parameters' places in the flat buffer, in order (the multipliers are per segment).
    segs: Vec<Segment>,
    /// (momentum buffer, the segments with their multipliers) on the parameters' GPU once a
    /// step ran there.
    dev: Option<(Tensor, DeviceSegments)>,
}

impl Sgd {
    /// SGD with the standard grouping (`ParamScales::standard` with `cfg.decay_vectors`).
    pub fn new(cfg: SgdConfig, params: &ParamStore) -> Sgd {
        Sgd::with_scales(cfg, params, &ParamScales::standard(params, cfg.decay_vectors)).expect("standard scales are valid")
    }
    /// SGD with explicit per-parameter multipliers (`cfg.decay_vectors` is then unused).
    pub fn with_scales(cfg: SgdConfig, params: &ParamStore, scales: &ParamScales) -> Result<Sgd> {
        scales.validate(params)?;
        Ok(Sgd {
            cfg,
            buf: vec![],
            decay_scale: scales.per_param(|i| scales.wd[i]),
            lr_scale: scales.lr_per_param(),
            segs: crate::trust::segments(params),
            t: 0,
            t_dev: None,
            lr_dev: DeviceLr::default(),
            dev: None,
        })
    }

    /// Applied steps (read from the device while steps are decided there).
    fn steps(&self) -> Result<u64> {
        match &self.t_dev {
            Some(t) => Ok(t.get()?),
            None => Ok(self.t),
        }
    }

    /// The momentum buffer and multipliers on the parameters' GPU (made there at the first GPU
    /// step, or uploaded from a restore).
    fn dev_state(&mut self, flat: &Tensor) -> Result<&mut (Tensor, DeviceSegments)> {
        if self.dev.is_none() {
            let buf = upload_state(&mut self.buf, flat.numel(), flat.device())?;
            let segs = DeviceSegments::with_scales(&self.segs, &self.decay_scale, self.lr_scale.as_deref(), &buf)?;
            self.dev = Some((buf, segs));
        }
        Ok(self.dev.as_mut().expect("just set"))
    }

    fn sgd_step(&self, lr: f64, first: bool) -> SgdStep {
        let c = self.cfg;
        SgdStep {
            lr: lr as f32,
            weight_decay: c.weight_decay as f32,
            momentum: c.momentum as f32,
            dampening: c.dampening as f32,
            nesterov: c.nesterov,
            first,
        }
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, params: &mut ParamStore, grads: &GradStore, ctx: &mut StepCtx) -> Result<()> {
        let c = self.cfg;
        let (wd, mu, damp, lr) = (c.weight_decay as f32, c.momentum as f32, c.dampening as f32, ctx.lr as f32);
        // After steps decided on the device the count comes from there, and this step's goes
        // back, in place (a CUDA graph of the device step reads it there).
        let done = self.steps()?;
        let first = done == 0;
        self.t = done + 1;
        if let Some(t) = &self.t_dev {
            t.set(self.t)?;
        }
        if params.flat().is_cuda() {
            let s = self.sgd_step(ctx.lr, first);
            let (buf, segs) = self.dev_state(params.flat())?;
            // The parameters' bf16 copy (what bf16 GEMMs read) is written in the same pass.
            let (p, p16) = params.flat_and_half_mut()?;
            dptrain_core::ops::flat::sgd_cuda(p, grads.flat(), buf, segs, s, None, p16)?;
            return Ok(());
        }
        let g = grads.flat().data::<f32>()?;
        let p = params.flat_mut::<f32>()?;
        let buf = host_state(&mut self.buf, p.len());
        for (k, seg) in self.segs.iter().enumerate() {
            let range = seg.offset..seg.offset + seg.len;
            let (p, g, buf) = (&mut p[range.clone()], &g[range.clone()], &mut buf[range]);
            let ds = self.decay_scale[k];
            let lr = self.lr_scale.as_ref().map_or(lr, |l| lr * l[k]);
            for i in 0..p.len() {
                let mut d = g[i] + wd * ds * p[i];
                if mu != 0.0 {
                    let b = if first { d } else { mu * buf[i] + (1.0 - damp) * d };
                    buf[i] = b;
                    d = if c.nesterov { d + mu * b } else { b };
                }
                p[i] -= lr * d;
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
        // lr and first come from the device.
        let s = self.sgd_step(0.0, false);
        self.lr_dev.stage(ctx.lr, 0.0);
        self.dev_state(params.flat())?;
        let ((buf, segs), t) = (self.dev.as_mut().expect("just set"), self.t_dev.as_ref().expect("just set"));
        let gate = SgdGate { rec, max_norm, t, lr: &self.lr_dev };
        let (p, p16) = params.flat_and_half_mut()?;
        dptrain_core::ops::flat::sgd_cuda(p, grads.flat(), buf, segs, s, Some(gate), p16)?;
        Ok(true)
    }
    fn decides_next_step_on_device(&self, params: &ParamStore) -> bool {
        dptrain_core::ops::flat::decides_steps_on_device(params.flat())
    }
    fn stage_device_lr(&mut self, lr: f64) {
        self.lr_dev.stage(lr, 0.0);
    }
    fn state(&self, params: &ParamStore) -> Result<(Vec<(String, Tensor)>, serde_json::Value)> {
        let buf = saved_state(&self.buf, self.dev.as_ref().map(|(b, _)| b), params.numel())?;
        Ok((split_state("momentum_buffer", &buf, params), serde_json::json!({ "started": self.steps()? > 0 })))
    }
    fn load_state(&mut self, params: &ParamStore, t: &std::collections::HashMap<String, Tensor>, s: &serde_json::Value) -> Result<()> {
        self.dev = None;
        self.t_dev = None;
        join_state("momentum_buffer", host_state(&mut self.buf, params.numel()), params, t)?;
        let started = s.get("started").and_then(|x| x.as_bool()).ok_or_else(|| crate::OptimError::State("missing `started`".into()))?;
        self.t = started as u64;
        Ok(())
    }
    fn name(&self) -> &'static str {
        "sgd"
    }
}
