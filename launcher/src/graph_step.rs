//! `train.cuda_graph`: the training step captured once as a CUDA graph and replayed, so a small
//! model's step is one launch instead of hundreds (`core/src/tensor/cuda/graph.rs` has the
//! mechanism: private pool, inputs bound to host buffers the graph owns, nothing run at
//! capture).
//!
//! The trainer hands each step that may be replayed here — one without probes, logging, a
//! critical-batch measurement or an injected fault, that the optimizer will decide on the device
//! (`Optimizer::decides_next_step_on_device`: any step for AdamW, SGD, LAMB and LARS; all but
//! the first and the basis refreshes for SOAP) — with its micro-batches and the step itself as
//! a closure. The first such step runs eagerly (it makes what a step makes once: the
//! optimizer's moments, the bf16 weight copy), the second is captured and replayed, the later
//! ones refill the graph's batches and replay it; the optimizer has staged the step's learning
//! rate where the graph's update reads it, and the trainer the micro-steps' dropout keys where
//! its kernels read them. Each replay's record (Σg², the micro-step losses, whether the update
//! was applied) is copied out of the graph, so the logging step that reads it later finds this
//! step's numbers. Steps in between (probes, logging, SOAP's refreshes) run eagerly on the same
//! parameters, gradients and optimizer state, whose buffers the graph writes in place — AdamW
//! keeps its moments and device step count where they are across host-decided steps for this,
//! SOAP writes new bases over the old ones — and after a replay the trainer tells the optimizer,
//! which did not see the step (`Optimizer::replayed`). If the parameters, their bf16 copy or
//! the gradients moved (the bf16 copy dropped and made again), the graph is dropped and the
//! next step captures again.

use crate::error::Result;
use dptrain_core::model::Batch;
use dptrain_core::ops::flat::StepRecord;
use dptrain_core::{Device, GradStore, ParamStore};

/// The trainer's CUDA graph of its step (see the module docs).
#[derive(Default)]
pub struct GraphStep {
    enabled: bool,
    /// An eager step has run since the last capture was dropped (or ever).
    #[cfg(feature = "cuda")]
    warm: bool,
    #[cfg(feature = "cuda")]
    graph: Option<Captured>,
}

#[cfg(feature = "cuda")]
struct Captured {
    graph: dptrain_core::tensor::cuda::StepGraph<Vec<Batch>>,
    /// The record the graph writes (in its pool).
    rec: StepRecord,
    /// Addresses the graph baked in that the trainer's state could move: the parameters, their
    /// bf16 copy and the gradients.
    at: Vec<u64>,
}

/// Device addresses of the buffers a captured step writes in place (what [`GraphStep::step`]
/// checks before replaying).
pub fn addresses(params: &ParamStore, grads: &GradStore) -> Vec<u64> {
    let at = |t: &dptrain_core::Tensor| t.device_region(0, 1).map(|r| r.ptr).unwrap_or(0);
    vec![at(params.flat()), params.half_flat().map_or(0, at), at(grads.flat())]
}

impl GraphStep {
    pub fn new(enabled: bool) -> GraphStep {
        // The other fields exist in CUDA builds only.
        #[allow(clippy::needless_update)]
        GraphStep { enabled, ..Default::default() }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Runs one training step over `batches` — eagerly, by capturing it, or by replaying the
    /// graph — and returns its record, the capture's note, and whether the graph was launched
    /// (the gradient synchroniser then watches the reductions inside). `step` does the whole
    /// step (zero the gradients, forward and backward of each micro-batch with the gradients'
    /// all-reduce on the last, the record, the optimizer's device step) and must not read
    /// anything back from the device.
    pub fn step(
        &mut self,
        device: Device,
        at: Vec<u64>,
        batches: Vec<Batch>,
        mut step: impl FnMut(&[Batch]) -> Result<StepRecord>,
    ) -> Result<(StepRecord, Option<String>, bool)> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(ordinal) = device {
            if self.graph.as_ref().is_some_and(|c| c.at != at) {
                self.graph = None;
                self.warm = false;
            }
            if let Some(c) = &mut self.graph {
                let same = c.graph.inputs().len() == batches.len()
                    && c.graph.inputs_mut().iter_mut().zip(&batches).all(|(m, b)| m.refill(b).is_ok());
                if same {
                    c.graph.replay()?;
                    return Ok((c.rec.copy()?, None, true));
                }
                // A batch of another shape (a short last batch): this step runs eagerly.
                return Ok((step(&batches)?, None, false));
            }
            if self.warm {
                let dev = dptrain_core::tensor::cuda::dev(ordinal)?;
                let (graph, rec) = dev.capture(batches, |b| step(b).map_err(|e| dptrain_core::Error::Device(e.to_string())))?;
                graph.replay()?;
                let out = rec.copy()?;
                let note = format!("the training step runs as a CUDA graph ({} nodes, captured at this step)", graph.nodes()?);
                self.graph = Some(Captured { graph, rec, at });
                return Ok((out, Some(note), true));
            }
            self.warm = true;
        }
        let _ = (device, at);
        Ok((step(&batches)?, None, false))
    }
}
