//! `dptrain-optim`: optimizers, schedules and clipping.
//!
//! Optimizers update the parameter store's flat buffer in **one fused in-place pass** over all
//! parameters. Per-parameter learning-rate and weight-decay multipliers (`ParamScales`, indexed
//! by `ParamId`: torch's parameter groups, μP's per-layer rates) are read once per parameter.
//! Per-element state (moments, momentum) lives where the parameters do: on a GPU it is made
//! there at the first step and the host never holds a copy (a host buffer is allocated only by
//! a CPU step or a restore, and freed once uploaded). Each step gets a `StepCtx`: the step number,
//! the schedule's learning rate and the optimizer's own communicator, for optimizers whose
//! update needs other ranks (preconditioners split across ranks). State is kept in flat buffers
//! with the store's layout, and saved/loaded as named tensors keyed by parameter name
//! (`exp_avg.<param>`), so it survives a change of process count.

pub mod adamw;
pub mod clip;
pub mod lamb;
pub mod lars;
pub mod scales;
pub mod schedule;
pub mod sgd;
pub mod soap;
mod trust;

pub use adamw::{AdamW, AdamWConfig, DecayMode};
pub use clip::{clip_grad_norm, clip_to_norm, grad_norm};
pub use lamb::{Lamb, LambConfig};
pub use lars::{Lars, LarsConfig};
pub use scales::ParamScales;
pub use schedule::{Schedule, ScheduleKind};
pub use sgd::{Sgd, SgdConfig};
pub use soap::{Distribute, Soap, SoapConfig};

use dptrain_core::comm::Communicator;
use dptrain_core::{GradStore, ParamStore, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error(transparent)]
    Core(#[from] dptrain_core::Error),
    #[error("optimizer state: {0}")]
    State(String),
}

pub type Result<T> = std::result::Result<T, OptimError>;

/// What one optimizer step may use besides the parameters and their (averaged) gradients.
pub struct StepCtx<'a> {
    /// The trainer's 1-based number of this step.
    pub step: u64,
    /// The schedule's learning rate for this step (each parameter's is this × its
    /// `ParamScales::lr` multiplier).
    pub lr: f64,
    /// The optimizer's own communicator over all ranks: its collectives never interleave with
    /// the gradient buckets (those have theirs). A world of one when training alone.
    pub comm: &'a mut dyn Communicator,
}

/// An optimizer over a `ParamStore`'s flat buffers. Boxable; state keyed by parameter.
pub trait Optimizer: Send {
    /// One update; every rank calls it with the same gradients.
    fn step(&mut self, params: &mut ParamStore, grads: &GradStore, ctx: &mut StepCtx) -> Result<()>;
    /// Named state tensors (e.g. `exp_avg.transformer.wte.weight`) plus scalar state as JSON.
    fn state(&self, params: &ParamStore) -> Result<(Vec<(String, Tensor)>, serde_json::Value)>;
    /// Restores what `state` produced; names and shapes must match.
    fn load_state(
        &mut self,
        params: &ParamStore,
        tensors: &std::collections::HashMap<String, Tensor>,
        scalars: &serde_json::Value,
    ) -> Result<()>;
    fn name(&self) -> &'static str;
    /// [`step`](Self::step) with gradients the caller has already found finite (the trainer
    /// skips a step whose gradient norm is not): an optimizer that checks them itself may skip
    /// its check — on a GPU a pass over the gradients and a wait for the device.
    fn step_finite(&mut self, params: &mut ParamStore, grads: &GradStore, ctx: &mut StepCtx) -> Result<()> {
        self.step(params, grads, ctx)
    }
    /// A step whose update the device decides, without a host wait: from the step's record
    /// (the gradient's Σg²), skipped when the gradient norm is not finite, the gradient clipped
    /// to `max_norm` (0: not clipped) — the numbers `step` gives after the host's own check and
    /// clipping. `Ok(false)`, having done nothing, where the optimizer cannot (on the CPU, or
    /// not implemented): the trainer then reads the record and takes the waiting path.
    fn step_on_device(
        &mut self,
        params: &mut ParamStore,
        grads: &GradStore,
        ctx: &mut StepCtx,
        rec: &dptrain_core::ops::flat::StepRecord,
        max_norm: f64,
    ) -> Result<bool> {
        let _ = (params, grads, ctx, rec, max_norm);
        Ok(false)
    }
    /// Whether `step_on_device` would decide the next step (what a CUDA graph of the step may
    /// hold): on a GPU for AdamW, SGD, LAMB and LARS; for SOAP every step but its first and
    /// its basis refreshes, which the host computes.
    fn decides_next_step_on_device(&self, params: &ParamStore) -> bool {
        let _ = params;
        false
    }
    /// Before a replay of a captured step that `step_on_device` decided (a CUDA graph: its
    /// kernel arguments are the capture's): puts this step's learning rate where the device
    /// step reads it. Nothing to do for an optimizer without a device step.
    fn stage_device_lr(&mut self, lr: f64) {
        let _ = lr;
    }
    /// After a replay of a captured step that `step_on_device` decided (the graph ran it; this
    /// object saw no call): what the optimizer counts on the host per such step (SOAP: the
    /// steps since the host last knew the count, which say when the next refresh is).
    fn replayed(&mut self) {}
    /// Adam-family optimizers: their moments, for the training probes (the fraction of √v̂
    /// below ε, the unscaled update's size). `None` for the others, and before a first step.
    fn adam_view(&self) -> Result<Option<AdamView>> {
        Ok(None)
    }
}

/// An Adam-family optimizer's moments in the parameters' flat layout, on their device.
pub struct AdamView {
    /// The first moment, where the update is m̂/(√v̂ + ε) element by element (AdamW, LAMB);
    /// `None` when it lives in another basis than `v` (SOAP keeps m in the parameters' space
    /// and v in the eigenbasis).
    pub m: Option<Tensor>,
    pub v: Tensor,
    /// Bias corrections 1/(1 − β1ᵗ) and 1/(1 − β2ᵗ) (1 when the optimizer does not correct).
    pub c1: f64,
    pub c2: f64,
    pub eps: f64,
}

impl AdamView {
    /// The view of moments kept on the host (`m`, `v`) or on a device (`dev`).
    pub(crate) fn of(
        m: Option<&[f32]>,
        v: &[f32],
        dev: Option<(Option<&Tensor>, &Tensor)>,
        c: (f64, f64, f64),
        t: u64,
    ) -> Result<Option<AdamView>> {
        if t == 0 {
            return Ok(None);
        }
        let (m, v) = match dev {
            Some((dm, dv)) => (dm.cloned(), dv.clone()),
            None => (m.map(|m| Tensor::from_slice(m, &[m.len()])).transpose()?, Tensor::from_slice(v, &[v.len()])?),
        };
        Ok(Some(AdamView { m, v, c1: c.0, c2: c.1, eps: c.2 }))
    }
}

/// Adam-style state (AdamW, LAMB): the moments as `exp_avg.<param>` / `exp_avg_sq.<param>`
/// (torch's names) and the step count.
pub(crate) fn moments_state(m: &[f32], v: &[f32], step: u64, params: &ParamStore) -> (Vec<(String, Tensor)>, serde_json::Value) {
    let mut out = split_state("exp_avg", m, params);
    out.extend(split_state("exp_avg_sq", v, params));
    (out, serde_json::json!({ "step": step }))
}

/// Restores what [`moments_state`] saved into `m` and `v`; returns the step count.
pub(crate) fn load_moments(
    m: &mut [f32],
    v: &mut [f32],
    params: &ParamStore,
    tensors: &std::collections::HashMap<String, Tensor>,
    scalars: &serde_json::Value,
) -> Result<u64> {
    join_state("exp_avg", m, params, tensors)?;
    join_state("exp_avg_sq", v, params, tensors)?;
    scalars.get("step").and_then(|x| x.as_u64()).ok_or_else(|| OptimError::State("missing `step`".into()))
}

/// A per-element state vector on the host, allocated (zeros) at its first use: a run on a GPU
/// never makes one, so the host holds no state the size of the model.
pub(crate) fn host_state(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() != n {
        *v = vec![0.0; n];
    }
    v
}

/// A state vector of `n` elements moved to `device`: the host's values where it has them (a
/// restore, CPU steps), zeros made there otherwise. The host copy is freed: from now on the
/// device's is the state.
pub(crate) fn upload_state(v: &mut Vec<f32>, n: usize, device: dptrain_core::Device) -> Result<Tensor> {
    let t = if v.len() == n {
        Tensor::from_slice(v, &[n])?.to_device(device)?
    } else {
        Tensor::zeros_on(&[n], dptrain_core::DType::F32, device)?
    };
    *v = Vec::new();
    Ok(t)
}

/// The state to save: read back from the device, or the host's, or zeros before any step.
pub(crate) fn saved_state(host: &[f32], dev: Option<&Tensor>, n: usize) -> Result<Vec<f32>> {
    Ok(match dev {
        Some(d) => d.to_vec::<f32>()?,
        None if host.len() == n => host.to_vec(),
        None => vec![0.0; n],
    })
}

/// Flat state buffer → named per-parameter tensors.
pub(crate) fn split_state(prefix: &str, flat: &[f32], params: &ParamStore) -> Vec<(String, Tensor)> {
    params
        .infos()
        .iter()
        .map(|p| (format!("{prefix}.{}", p.name), Tensor::from_slice(&flat[p.offset..p.offset + p.numel], &p.shape).expect("layout")))
        .collect()
}

/// Named per-parameter tensors → flat state buffer.
pub(crate) fn join_state(
    prefix: &str,
    flat: &mut [f32],
    params: &ParamStore,
    tensors: &std::collections::HashMap<String, Tensor>,
) -> Result<()> {
    for p in params.infos() {
        let key = format!("{prefix}.{}", p.name);
        let t = tensors.get(&key).ok_or_else(|| OptimError::State(format!("missing `{key}`")))?;
        if t.shape() != p.shape.as_slice() {
            return Err(OptimError::State(format!("`{key}` has shape {:?}, expected {:?}", t.shape(), p.shape)));
        }
        flat[p.offset..p.offset + p.numel].copy_from_slice(&t.to_vec::<f32>()?);
    }
    Ok(())
}
