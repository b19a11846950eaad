//! `DistributedSampler` with `torch.utils.data.DistributedSampler` semantics: each epoch a
//! permutation from a generator seeded with `seed + epoch` (or the identity without shuffle);
//! `drop_last` truncates to a multiple of the world size, otherwise the list is padded by
//! repeating its head; rank r takes `indices[r::world]`. Every rank sees the same number of
//! samples, so collectives never go uneven.
//!
//! `BatchStream` draws a rank's micro-batches from consecutive epochs; its position
//! (epoch, offset) is the whole sampler state a checkpoint needs.

use crate::rng::Rng;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistributedSampler {
    pub len: usize,
    pub world: usize,
    pub rank: usize,
    pub seed: u64,
    pub shuffle: bool,
    pub drop_last: bool,
}

impl DistributedSampler {
    /// Samples per rank per epoch.
    pub fn num_samples(&self) -> usize {
        if self.drop_last {
            self.len / self.world
        } else {
            self.len.div_ceil(self.world)
        }
    }

    /// The epoch's full index list (after padding/truncation), before rank striding.
    pub fn global_indices(&self, epoch: u64) -> Vec<usize> {
        let mut idx = if self.shuffle { Rng::new(self.seed.wrapping_add(epoch)).permutation(self.len) } else { (0..self.len).collect() };
        let total = self.num_samples() * self.world;
        if total <= idx.len() {
            idx.truncate(total);
        } else if !idx.is_empty() {
            let mut k = 0;
            while idx.len() < total {
                idx.push(idx[k]);
                k += 1;
            }
        }
        idx
    }

    /// This rank's indices for `epoch`.
    pub fn indices(&self, epoch: u64) -> Vec<usize> {
        self.global_indices(epoch).into_iter().skip(self.rank).step_by(self.world).collect()
    }
}

/// Position of a `BatchStream`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StreamState {
    pub epoch: u64,
    pub offset: usize,
}

pub struct BatchStream {
    sampler: DistributedSampler,
    state: StreamState,
    current: Vec<usize>,
}

impl BatchStream {
    pub fn new(sampler: DistributedSampler, state: StreamState) -> BatchStream {
        let current = sampler.indices(state.epoch);
        BatchStream { sampler, state, current }
    }
    pub fn state(&self) -> StreamState {
        self.state
    }
    /// The next `n` indices, continuing into the next epoch when this one runs out.
    pub fn next_indices(&mut self, n: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if self.state.offset >= self.current.len() {
                if self.current.is_empty() {
                    break;
                }
                self.state = StreamState { epoch: self.state.epoch + 1, offset: 0 };
                self.current = self.sampler.indices(self.state.epoch);
                continue;
            }
            let take = (n - out.len()).min(self.current.len() - self.state.offset);
            out.extend_from_slice(&self.current[self.state.offset..self.state.offset + take]);
            self.state.offset += take;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(len: usize, world: usize, rank: usize, drop_last: bool) -> DistributedSampler {
        DistributedSampler { len, world, rank, seed: 7, shuffle: true, drop_last }
    }

    #[test]
    fn shards_partition_the_epoch_permutation() {
        for world in [1, 2, 3, 4, 8] {
            let len = 29;
            let mut all: Vec<usize> = (0..world).flat_map(|r| s(len, world, r, true).indices(3)).collect();
            assert_eq!(all.len(), (len / world) * world);
            let perm = s(len, world, 0, true).global_indices(3);
            all.sort();
            let mut want = perm[..(len / world) * world].to_vec();
            want.sort();
            assert_eq!(all, want, "drop_last union for world {world}");
            all.dedup();
            assert_eq!(all.len(), (len / world) * world, "no overlap for world {world}");
        }
    }

    #[test]
    fn padding_repeats_the_head() {
        let world = 4;
        let g = s(10, world, 0, false).global_indices(0);
        assert_eq!(g.len(), 12);
        assert_eq!(&g[10..], &g[..2]);
        let shards: Vec<Vec<usize>> = (0..world).map(|r| s(10, world, r, false).indices(0)).collect();
        assert!(shards.iter().all(|x| x.len() == 3));
        for r in 0..world {
            assert_eq!(shards[r], g.iter().copied().skip(r).step_by(world).collect::<Vec<_>>());
        }
        // more ranks than samples: padding wraps more than once
        let g = s(2, 5, 0, false).global_indices(0);
        assert_eq!(g.len(), 5);
    }

    #[test]
    fn epochs_reshuffle_deterministically() {
        let a = s(50, 2, 1, true);
        assert_eq!(a.indices(0), a.indices(0));
        assert_ne!(a.indices(0), a.indices(1));
        let plain = DistributedSampler { shuffle: false, ..a.clone() };
        assert_eq!(plain.indices(0)[..3], [1, 3, 5]);
    }

    #[test]
    fn stream_crosses_epochs_and_resumes() {
        let sm = s(10, 2, 0, true);
        let mut a = BatchStream::new(sm.clone(), StreamState { epoch: 0, offset: 0 });
        let first = a.next_indices(4);
        let st = a.state();
        let second = a.next_indices(4); // crosses into epoch 1 (5 samples per epoch)
        assert_eq!(a.state(), StreamState { epoch: 1, offset: 3 });
        assert_eq!(first[..], sm.indices(0)[..4]);
        assert_eq!(second[0], sm.indices(0)[4]);
        assert_eq!(second[1..], sm.indices(1)[..3]);
        let mut b = BatchStream::new(sm, st);
        assert_eq!(b.next_indices(4), second);
    }
}
