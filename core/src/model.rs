//! The `Model` interface: a model declares its parameters into a `ParamBuilder` when built and
//! computes a scalar loss on a batch with an autograd tape, reporting probes into a sink.

use crate::autograd::{Tape, Var};
use crate::error::Result;
use crate::params::ParamStore;
use crate::probe::ProbeSink;

/// One batch of training data.
#[derive(Debug, Clone)]
pub enum Batch {
    /// Token ids `[batch, context]` and next-token targets of the same shape.
    Tokens { inputs: Vec<u32>, targets: Vec<u32>, batch: usize, context: usize },
    /// Images `[batch, channels, height, width]` (row-major f32) and class labels.
    Images { pixels: Vec<f32>, labels: Vec<u32>, batch: usize, shape: [usize; 3] },
}

impl Batch {
    pub fn len(&self) -> usize {
        match self {
            Batch::Tokens { batch, .. } | Batch::Images { batch, .. } => *batch,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Overwrites this batch's contents with `other`'s in place (the buffers keep their
    /// addresses: a step captured as a CUDA graph reads its inputs from them). Both must have
    /// the same kind and shape.
    pub fn refill(&mut self, other: &Batch) -> Result<()> {
        match (self, other) {
            (Batch::Tokens { inputs, targets, .. }, Batch::Tokens { inputs: i2, targets: t2, .. })
                if inputs.len() == i2.len() && targets.len() == t2.len() =>
            {
                inputs.copy_from_slice(i2);
                targets.copy_from_slice(t2);
                Ok(())
            }
            (Batch::Images { pixels, labels, .. }, Batch::Images { pixels: p2, labels: l2, .. })
                if pixels.len() == p2.len() && labels.len() == l2.len() =>
            {
                pixels.copy_from_slice(p2);
                labels.copy_from_slice(l2);
                Ok(())
            }
            _ => Err(crate::error::Error::shape("Batch::refill", "a batch of another kind or shape".to_string())),
        }
    }
}

/// A step captured as a CUDA graph uploads its token ids and targets, or its pixels
/// (`Tensor::input_f32`) and labels, again from the batch it owns before each replay.
#[cfg(feature = "cuda")]
impl crate::tensor::cuda::GraphInputs for Batch {
    fn host_ranges(&self) -> Vec<(usize, usize)> {
        let r = |v: &[u32]| (v.as_ptr() as usize, std::mem::size_of_val(v));
        match self {
            Batch::Tokens { inputs, targets, .. } => vec![r(inputs), r(targets)],
            Batch::Images { pixels, labels, .. } => vec![(pixels.as_ptr() as usize, std::mem::size_of_val(&pixels[..])), r(labels)],
        }
    }
}

pub trait Model: Send + Sync {
    /// Mean loss over the batch. `train` selects training behaviour (batch statistics).
    fn loss<'t>(&self, tape: &'t Tape, params: &ParamStore, batch: &Batch, train: bool, probes: &mut dyn ProbeSink) -> Result<Var<'t>>;
    /// A short description (kind and shape) for logs.
    fn describe(&self) -> String;
}
