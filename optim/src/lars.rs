//! LARS (You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional Networks"): SGD
//! whose step for each weight matrix is rescaled by a layer-wise trust ratio, the rule behind
//! ResNet-50 at batch 32k.
//!
//! For parameters with more than one dimension: trust = tc·‖w‖/(‖g‖ + λ‖w‖) (1 when ‖w‖ or the
//! denominator is 0), d = trust·(g + λw); biases and norm gains (1-D) take plain d = g — no
//! decay, no adaptation — as in the reference, PyPI `pytorch-optimizer`'s `LARS`. Then momentum
//! b ← μb + (1 − dampening)·d (the buffer starts at zero, unlike torch's SGD), d = d + μb
//! (Nesterov) or b, and w ← w − lr·d. Per-parameter multipliers scale λ and lr.
//!
//! On a GPU the step is decided on the device (`step_on_device`: the non-finite check and
//! clipping there, the trust ratios from the clipped gradient's norms), so the large-batch
//! image recipes that use LARS do not wait for the GPU on steps that log nothing and can be
//! replayed in a CUDA graph.

use crate::trust::{norm, segments};
use crate::{host_state, join_state, saved_state, split_state, upload_state, Optimizer, ParamScales, Result, StepCtx};
use dptrain_core::ops::flat::{DeviceLr, DeviceSegments, LarsGate, LarsStep, Segment, StepRecord};
use dptrain_core::{GradStore, ParamStore, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LarsConfig {
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    /// tc: the fraction of ‖w‖ a step moves a layer by (before the learning rate).
    pub trust_coefficient: f64,
}

impl Default for LarsConfig {
    fn default() -> Self {
        LarsConfig { momentum: 0.9, dampening: 0.0, nesterov: false, weight_decay: 0.0, trust_coefficient: 1e-3 }
    }
}

pub struct Lars {
    pub cfg: LarsConfig,
    /// The momentum buffer on the host: empty until a CPU step or a restore needs it, and again
    /// once uploaded to the parameters' GPU.
    buf: Vec<f32>,
    /// Each parameter's multipliers of λ and lr (`None`: all 1).
    decay_scale: Vec<f32>,
    lr_scale: Option<Vec<f32>>,
    segs: Vec<Segment>,
    /// The learning rate as the device step reads it.
    lr_dev: DeviceLr,
    dev: Option<DevState>,
}

struct DevState {
    buf: Tensor,
    /// The segment table with each parameter's decay and learning-rate multipliers.
    segs: DeviceSegments,
}

impl Lars {
    /// LARS with per-parameter multipliers of λ and lr.
    pub fn with_scales(cfg: LarsConfig, params: &ParamStore, scales: &ParamScales) -> Result<Lars> {
        scales.validate(params)?;
        Ok(Lars {
            cfg,
            buf: vec![],
            decay_scale: scales.per_param(|i| scales.wd[i]),
            lr_scale: scales.lr_per_param(),
            segs: segments(params),
            lr_dev: DeviceLr::default(),
            dev: None,
        })
    }

    fn lars_step(&self, lr: f64) -> LarsStep {
        let c = self.cfg;
        LarsStep {
            lr: lr as f32,
            weight_decay: c.weight_decay as f32,
            momentum: c.momentum as f32,
            dampening: c.dampening as f32,
            trust_coefficient: c.trust_coefficient as f32,
            nesterov: c.nesterov,
        }
    }

    /// The momentum buffer, multipliers and segment table on the parameters' GPU (made there
    /// at the first GPU step, or uploaded from a restore).
    fn dev_state(&mut self, like: &Tensor) -> Result<&mut DevState> {
        if self.dev.is_none() {
            self.dev = Some(DevState {
                buf: upload_state(&mut self.buf, like.numel(), like.device())?,
                segs: DeviceSegments::with_scales(&self.segs, &self.decay_scale, self.lr_scale.as_deref(), like)?,
            });
        }
        Ok(self.dev.as_mut().expect("just set"))
    }
}

impl Optimizer for Lars {
    fn step(&mut self, params: &mut ParamStore, grads: &GradStore, ctx: &mut StepCtx) -> Result<()> {
        let s = self.lars_step(ctx.lr);
        if params.flat().is_cuda() {
            let d = self.dev_state(params.flat())?;
            // The parameters' bf16 copy (what bf16 GEMMs read) is written in the same pass.
            let (p, p16) = params.flat_and_half_mut()?;
            dptrain_core::ops::flat::lars_cuda(p, grads.flat(), &mut d.buf, &d.segs, s, None, p16)?;
            return Ok(());
        }
        let g = grads.flat().data::<f32>()?;
        let p = params.flat_mut::<f32>()?;
        let buf = host_state(&mut self.buf, p.len());
        for (k, seg) in self.segs.iter().enumerate() {
            let range = seg.offset..seg.offset + seg.len;
            let (p, g, b) = (&mut p[range.clone()], &g[range.clone()], &mut buf[range]);
            let ds = self.decay_scale[k];
            let lr = self.lr_scale.as_ref().map_or(s.lr, |l| s.lr * l[k]);
            let (pn, gn) = (norm(p), norm(g));
            for i in 0..p.len() {
                let mut d = g[i];
                if seg.matrix {
                    let wd = s.weight_decay * ds;
                    let den = gn + wd * pn;
                    let trust = if pn > 0.0 && den > 0.0 { s.trust_coefficient * pn / den } else { 1.0 };
                    d = (d + wd * p[i]) * trust;
                }
                if s.momentum != 0.0 {
                    let bi = s.momentum * b[i] + (1.0 - s.dampening) * d;
                    b[i] = bi;
                    d = if s.nesterov { d + s.momentum * bi } else { bi };
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
        // The learning rate comes from the staged cell.
        let s = self.lars_step(ctx.lr);
        self.lr_dev.stage(ctx.lr, 0.0);
        self.dev_state(params.flat())?;
        let d = self.dev.as_mut().expect("just set");
        let gate = LarsGate { rec, max_norm, lr: &self.lr_dev };
        let (p, p16) = params.flat_and_half_mut()?;
        dptrain_core::ops::flat::lars_cuda(p, grads.flat(), &mut d.buf, &d.segs, s, Some(gate), p16)?;
        Ok(true)
    }
    fn decides_next_step_on_device(&self, params: &ParamStore) -> bool {
        dptrain_core::ops::flat::decides_steps_on_device(params.flat())
    }
    fn stage_device_lr(&mut self, lr: f64) {
        self.lr_dev.stage(lr, 0.0);
    }
    fn state(&self, params: &ParamStore) -> Result<(Vec<(String, Tensor)>, serde_json::Value)> {
        let buf = saved_state(&self.buf, self.dev.as_ref().map(|d| &d.buf), params.numel())?;
        Ok((split_state("momentum_buffer", &buf, params), serde_json::json!({})))
    }
    fn load_state(&mut self, params: &ParamStore, t: &std::collections::HashMap<String, Tensor>, _s: &serde_json::Value) -> Result<()> {
        self.dev = None;
        join_state("momentum_buffer", host_state(&mut self.buf, params.numel()), params, t)
    }
    fn name(&self) -> &'static str {
        "lars"
    }
}
