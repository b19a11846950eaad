//! Datasets and sampling. Every source is deterministic from the seed; every file format is
//! validated on open with an error that names the file and what was expected.
//!
//! A dataset is a list of samples addressable by index (an LM window of `context + 1` tokens,
//! or an image with its label); the `DistributedSampler` decides which indices each rank reads,
//! with `torch.utils.data.DistributedSampler` semantics; `BatchStream` walks epochs and is
//! checkpointable as two integers.
//!
//! Token streams can instead be read as nanoGPT's `get_batch` reads them: windows starting at
//! uniformly random offsets ([`Dataset::random_windows`]), each offset a counter-based draw
//! keyed by the caller (the trainer: seed, step, rank, micro-step), so there is no sampler
//! state to checkpoint and every rank draws its own windows.

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
    /// `n` samples at uniformly random positions drawn from stream `key` (token data only:
    /// `None` for datasets without positions finer than their samples).
    fn random_windows(&self, _key: u64, _n: usize) -> Option<Batch> {
        None
    }
}

/// `n` offsets uniform in `[0, positions)`: the `k`-th is the `k`-th draw of stream `key`.
pub fn random_offsets(key: u64, n: usize, positions: usize) -> Vec<usize> {
    (0..n as u64).map(|k| crate::rng::below_from(crate::rng::draw(key, k), positions as u64) as usize).collect()
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
    /// Where a window of `context + 1` tokens can start.
    pub fn positions(&self) -> usize {
        self.tokens.len().saturating_sub(self.context)
    }
    /// The batch of windows starting at token `offsets`.
    pub fn batch_at(&self, offsets: &[usize]) -> Batch {
        let c = self.context;
        let mut inputs = Vec::with_capacity(offsets.len() * c);
        let mut targets = Vec::with_capacity(offsets.len() * c);
        for &o in offsets {
            let w = &self.tokens[o..o + c + 1];
            inputs.extend_from_slice(&w[..c]);
            targets.extend_from_slice(&w[1..]);
        }
        Batch::Tokens { inputs, targets, batch: offsets.len(), context: c }
    }
}

impl Dataset for TokenWindows {
    fn len(&self) -> usize {
        self.tokens.len().saturating_sub(1) / self.context
    }
    fn batch(&self, indices: &[usize]) -> Batch {
        let offsets: Vec<usize> = indices.iter().map(|&i| i * self.context).collect();
        self.batch_at(&offsets)
    }
    fn random_windows(&self, key: u64, n: usize) -> Option<Batch> {
        Some(self.batch_at(&random_offsets(key, n, self.positions())))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_windows_cover_every_offset_uniformly_and_read_the_right_tokens() {
        let tokens: Vec<u32> = (0..40).collect();
        let w = TokenWindows::new(tokens, 7);
        assert_eq!(w.positions(), 33); // the last window starts at 32 and ends at token 39
        let mut counts = vec![0usize; w.positions()];
        for key in 0..2000u64 {
            for o in random_offsets(crate::rng::key_of(&[key]), 16, w.positions()) {
                counts[o] += 1;
            }
        }
        // 32000 draws over 33 offsets: ~970 each, binomial std ~31.
        let mean = 32000.0 / 33.0;
        assert!(counts.iter().all(|&c| (c as f64 - mean).abs() < 6.0 * mean.sqrt()), "{counts:?}");
        let Some(Batch::Tokens { inputs, targets, batch, context }) = w.random_windows(5, 3) else { panic!() };
        assert_eq!((batch, context), (3, 7));
        for b in 0..3 {
            let x = &inputs[b * 7..(b + 1) * 7];
            let y = &targets[b * 7..(b + 1) * 7];
            assert!(x.windows(2).all(|p| p[1] == p[0] + 1), "a window is a contiguous run of the stream");
            assert_eq!(y[0], x[0] + 1, "targets are the inputs shifted by one");
        }
        // A function of the key alone.
        assert_eq!(random_offsets(9, 8, 33), random_offsets(9, 8, 33));
        assert_ne!(random_offsets(9, 8, 33), random_offsets(10, 8, 33));
    }

    #[test]
    fn fixed_windows_are_unchanged() {
        let w = TokenWindows::new((0..20).collect(), 4);
        assert_eq!(w.len(), 4);
        let Batch::Tokens { inputs, targets, .. } = w.batch(&[1, 3]) else { panic!() };
        assert_eq!(inputs, vec![4, 5, 6, 7, 12, 13, 14, 15]);
        assert_eq!(targets, vec![5, 6, 7, 8, 13, 14, 15, 16]);
    }
}
