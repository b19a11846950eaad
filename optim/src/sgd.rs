//! SGD with momentum and Nesterov, matching `torch.optim.SGD` exactly: g ← g + λθ;
//! b ← μb + (1 − dampening)g (b = g on the first step); g ← g + μb (Nesterov) or b; θ ← θ − lr·g.
//! Per-parameter multipliers (`ParamScales`) scale each parameter's λ and lr, as torch's
//! parameter groups would.

use crate::{join_state, split_state, Optimizer, ParamScales, Result, StepCtx};
use dptrain_core::ops::flat::{SgdStep, StepScales};
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
    buf: Vec<f32>,
    /// Per-element decay and learning-rate multipliers (`None`: all 1).
    decay_scale: Vec<f32>,
    lr_scale: Option<Vec<f32>>,
    started: bool,
    /// (momentum buffer, decay scale, lr scale) on the parameters' GPU once a step ran there.
    dev: Option<(Tensor, Tensor, Option<Tensor>)>,
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
            buf: vec![0.0; params.numel()],
            decay_scale: scales.expand(params, |i| scales.wd[i]),
            lr_scale: scales.lr_elems(params),
            started: false,
            dev: None,
        })
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, params: &mut ParamStore, grads: &GradStore, ctx: &mut StepCtx) -> Result<()> {
        let c = self.cfg;
        let (wd, mu, damp, lr) = (c.weight_decay as f32, c.momentum as f32, c.dampening as f32, ctx.lr as f32);
        let first = !self.started;
        if params.flat().is_cuda() {
            let device = params.flat().device();
            if self.dev.is_none() {
                let up = |v: &[f32]| Tensor::from_slice(v, &[v.len()]).and_then(|t| t.to_device(device));
                self.dev = Some((up(&self.buf)?, up(&self.decay_scale)?, self.lr_scale.as_deref().map(up).transpose()?));
            }
            let (buf, decay_scale, lr_scale) = self.dev.as_mut().expect("just set");
            let scales = StepScales { decay: decay_scale, lr: lr_scale.as_ref() };
            let s = SgdStep { lr, weight_decay: wd, momentum: mu, dampening: damp, nesterov: c.nesterov, first };
            dptrain_core::ops::flat::sgd_cuda(params.flat_tensor_mut()?, grads.flat(), buf, scales, s)?;
            self.started = true;
            return Ok(());
        }
        let g = grads.flat().data::<f32>()?;
        let p = params.flat_mut::<f32>()?;
        let lr_scale = self.lr_scale.as_deref();
        for i in 0..p.len() {
            let mut d = g[i] + wd * self.decay_scale[i] * p[i];
            if mu != 0.0 {
                let b = if first { d } else { mu * self.buf[i] + (1.0 - damp) * d };
                self.buf[i] = b;
                d = if c.nesterov { d + mu * b } else { b };
            }
            p[i] -= lr_scale.map_or(lr, |l| lr * l[i]) * d;
        }
        self.started = true;
        Ok(())
    }
    fn state(&self, params: &ParamStore) -> Result<(Vec<(String, Tensor)>, serde_json::Value)> {
        let buf = match &self.dev {
            Some((b, _, _)) => b.to_vec::<f32>()?,
            None => self.buf.clone(),
        };
        Ok((split_state("momentum_buffer", &buf, params), serde_json::json!({ "started": self.started })))
    }
    fn load_state(&mut self, params: &ParamStore, t: &std::collections::HashMap<String, Tensor>, s: &serde_json::Value) -> Result<()> {
        self.dev = None;
        join_state("momentum_buffer", &mut self.buf, params, t)?;
        self.started = s.get("started").and_then(|x| x.as_bool()).ok_or_else(|| crate::OptimError::State("missing `started`".into()))?;
        Ok(())
    }
    fn name(&self) -> &'static str {
        "sgd"
    }
}
