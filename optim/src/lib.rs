//! `dptrain-optim`: optimizers, schedules and clipping.
//!
//! Optimizers update the parameter store's flat buffer in **one fused in-place pass** over all
//! parameters (per-parameter options come from a per-parameter table indexed by `ParamId`).
//! State is kept in flat buffers with the store's layout, and saved/loaded as named tensors
//! keyed by parameter name (`exp_avg.<param>`), so it survives a change of process count.

pub mod adamw;
pub mod clip;
pub mod schedule;
pub mod sgd;

pub use adamw::{AdamW, AdamWConfig, DecayMode};
pub use clip::{clip_grad_norm, grad_norm};
pub use schedule::{Schedule, ScheduleKind};
pub use sgd::{Sgd, SgdConfig};

use dptrain_core::{GradStore, ParamStore, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error(transparent)]
    Core(#[from] dptrain_core::Error),
    #[error("optimizer state: {0}")]
    State(String),
}

pub type Result<T> = std::result::Result<T, OptimError>;

/// An optimizer over a `ParamStore`'s flat buffers. Boxable; state keyed by parameter.
pub trait Optimizer: Send {
    /// One update with learning rate `lr` (the schedule's value for this step).
    fn step(&mut self, params: &mut ParamStore, grads: &GradStore, lr: f64) -> Result<()>;
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

/// Per-parameter weight-decay factor (1 or 0): biases and norm gains (μP role `Vector`) are
/// exempt when `decay_vectors` is false, as in nanoGPT and most large-batch recipes.
pub fn decay_mask(params: &ParamStore, decay_vectors: bool) -> Vec<f32> {
    let mut m = vec![1.0f32; params.numel()];
    for p in params.infos() {
        if !decay_vectors && p.role == dptrain_core::Role::Vector {
            m[p.offset..p.offset + p.numel].fill(0.0);
        }
    }
    m
}
