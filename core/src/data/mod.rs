//! Datasets and sampling. Every source is deterministic from the seed; every file format is
//! validated on open with an error that names the file and what was expected.
//!
//! A dataset is a list of samples addressable by index (an LM window of `context + 1` tokens,
//! or an image with its label); the `DistributedSampler` decides which indices each rank reads,
//! with `torch.utils.data.DistributedSampler` semantics; `BatchStream` walks epochs and is
//! checkpointable as two integers.

pub mod files;
pub mod sampler;
pub mod synthetic;

pub use sampler::{BatchStream, DistributedSampler, StreamState};

use crate::model::Batch;

/// Samples addressable by index.
pub trait Dataset: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The batch made of samples `indices`, in that order.
    fn batch(&self, indices: &[usize]) -> Batch;
}

/// A token stream cut into non-overlapping windows of `context + 1` tokens (inputs and
/// next-token targets), as nanoGPT-style LM training reads it.
pub struct TokenWindows {
    tokens: std::sync::Arc<Vec<u32>>,
    context: usize,
}

impl TokenWindows {
    pub fn new(tokens: Vec<u32>, context: usize) -> TokenWindows {
        TokenWindows { tokens: std::sync::Arc::new(tokens), context }
    }
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    pub fn max_token(&self) -> u32 {
        self.tokens.iter().copied().max().unwrap_or(0)
    }
}

impl Dataset for TokenWindows {
    fn len(&self) -> usize {
        self.tokens.len().saturating_sub(1) / self.context
    }
    fn batch(&self, indices: &[usize]) -> Batch {
        let c = self.context;
        let mut inputs = Vec::with_capacity(indices.len() * c);
        let mut targets = Vec::with_capacity(indices.len() * c);
        for &i in indices {
            let w = &self.tokens[i * c..i * c + c + 1];
            inputs.extend_from_slice(&w[..c]);
            targets.extend_from_slice(&w[1..]);
        }
        Batch::Tokens { inputs, targets, batch: indices.len(), context: c }
    }
}

/// Images `[N, C, H, W]` (f32) with labels.
#[derive(Debug, Clone)]
pub struct ImageSet {
    pub pixels: Vec<f32>,
    pub labels: Vec<u32>,
    pub shape: [usize; 3],
}

impl ImageSet {
    pub fn num_classes(&self) -> usize {
        self.labels.iter().copied().max().map(|m| m as usize + 1).unwrap_or(0)
    }
    /// Splits off the last `n_val` samples.
    pub fn split(mut self, n_val: usize) -> (ImageSet, ImageSet) {
        let n = self.labels.len();
        let cut = n - n_val.min(n);
        let per: usize = self.shape.iter().product();
        let val = ImageSet { pixels: self.pixels.split_off(cut * per), labels: self.labels.split_off(cut), shape: self.shape };
        (self, val)
    }
}

impl Dataset for ImageSet {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn batch(&self, indices: &[usize]) -> Batch {
        let per: usize = self.shape.iter().product();
        let mut pixels = Vec::with_capacity(indices.len() * per);
        for &i in indices {
            pixels.extend_from_slice(&self.pixels[i * per..(i + 1) * per]);
        }
        Batch::Images { pixels, labels: indices.iter().map(|&i| self.labels[i]).collect(), batch: indices.len(), shape: self.shape }
    }
}
