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
}

pub trait Model: Send + Sync {
    /// Mean loss over the batch. `train` selects training behaviour (batch statistics).
    fn loss<'t>(&self, tape: &'t Tape, params: &ParamStore, batch: &Batch, train: bool, probes: &mut dyn ProbeSink) -> Result<Var<'t>>;
    /// A short description (kind and shape) for logs.
    fn describe(&self) -> String;
}
