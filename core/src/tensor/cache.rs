//! The size-class cache behind the CUDA caching allocator, kept free of CUDA so it is unit-tested
//! on any machine.
//!
//! Freed device blocks go back to a free list keyed by their size class and are handed out again
//! for the next request of that class — no `cuMemAlloc`/`cuMemFree` in a steady-state training
//! step, where the same shapes recur every step. Reuse is safe without events because every
//! kernel of a device runs on one compute stream, so a block's next user is ordered after its
//! last one (PyTorch's caching allocator relies on the same stream order). Blocks are returned
//! to the driver only when an allocation fails (then the cache is emptied and the allocation
//! retried once).

use std::collections::HashMap;

/// Smallest block handed out; also the rounding granule below 1 MiB (cuBLAS and vectorised
/// kernels want 256-byte alignment, and tiny tensors — scalars, norms — are common).
pub const GRANULE: usize = 512;

/// The size class of a request of `bytes`: a multiple of 512 B below 1 MiB, and above that the
/// next of four steps per power of two (1, 1.25, 1.5, 1.75 × 2^k), rounded to 512 B, so at most a
/// quarter of a large block is slack while a handful of classes covers every size.
pub fn size_class(bytes: usize) -> usize {
    let b = bytes.max(1);
    if b <= 1 << 20 {
        return b.div_ceil(GRANULE) * GRANULE;
    }
    let top = usize::BITS - 1 - b.leading_zeros(); // 2^top <= b < 2^(top+1)
    let quarter = 1usize << (top - 2);
    let c = b.div_ceil(quarter) * quarter;
    c.div_ceil(GRANULE) * GRANULE
}

/// Counters for tests and `gpu-check`: a steady-state step must not raise `raw_allocs`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Blocks obtained from the driver.
    pub raw_allocs: u64,
    /// Requests served from the free lists.
    pub hits: u64,
    /// Bytes currently held by live tensors plus the free lists.
    pub reserved_bytes: usize,
    /// Bytes sitting in the free lists.
    pub cached_bytes: usize,
}

/// Free lists of blocks `B` (a device pointer, or anything in tests) by size class.
pub struct SizeCache<B> {
    free: HashMap<usize, Vec<B>>,
    stats: CacheStats,
}

impl<B> Default for SizeCache<B> {
    fn default() -> Self {
        SizeCache { free: HashMap::new(), stats: CacheStats::default() }
    }
}

impl<B> SizeCache<B> {
    /// A block of `class` bytes: from the free list, else from `raw(class)`. When `raw` fails,
    /// every cached block is released through `release` and `raw` is tried once more.
    pub fn take<E>(&mut self, class: usize, mut raw: impl FnMut(usize) -> Result<B, E>, mut release: impl FnMut(B, usize)) -> Result<B, E> {
        if let Some(b) = self.free.get_mut(&class).and_then(Vec::pop) {
            self.stats.hits += 1;
            self.stats.cached_bytes -= class;
            return Ok(b);
        }
        let b = match raw(class) {
            Ok(b) => b,
            Err(_) => {
                self.empty(&mut release);
                raw(class)?
            }
        };
        self.stats.raw_allocs += 1;
        self.stats.reserved_bytes += class;
        Ok(b)
    }

    /// Returns a block of `class` bytes to its free list.
    pub fn give(&mut self, class: usize, b: B) {
        self.stats.cached_bytes += class;
        self.free.entry(class).or_default().push(b);
    }

    /// Hands every cached block to `release`.
    pub fn empty(&mut self, release: &mut impl FnMut(B, usize)) {
        for (class, v) in self.free.drain() {
            for b in v {
                self.stats.cached_bytes -= class;
                self.stats.reserved_bytes -= class;
                release(b, class);
            }
        }
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_requests_with_bounded_slack() {
        let mut last = 0;
        for bytes in (1..5000).chain((1 << 20) - 3..(1 << 20) + 3).chain([3 << 20, 77_777_777, 1 << 30]) {
            let c = size_class(bytes);
            assert!(c >= bytes && c.is_multiple_of(GRANULE), "{bytes} -> {c}");
            assert!(c >= last, "classes are monotone");
            last = c;
            if bytes > 1 << 20 {
                assert!((c - bytes) as f64 <= 0.25 * bytes as f64, "{bytes} -> {c}");
            }
        }
        assert_eq!(size_class(0), GRANULE);
        assert_eq!(size_class(4 << 20), 4 << 20);
        assert_eq!(size_class((4 << 20) + 1), 5 << 20);
    }

    #[test]
    fn steady_state_reuses_blocks_and_failure_empties_the_cache() {
        let mut cache: SizeCache<Vec<u8>> = SizeCache::default();
        let mut mallocs = 0;
        let mut raw = |n: usize| -> Result<Vec<u8>, ()> {
            mallocs += 1;
            Ok(vec![0; n])
        };
        // One "step": allocate three tensors, free them; the second step must not allocate.
        for _ in 0..3 {
            let sizes = [100usize, 4096, 3 << 20];
            let blocks: Vec<_> = sizes.iter().map(|&s| (size_class(s), cache.take(size_class(s), &mut raw, |_, _| ()).unwrap())).collect();
            for (c, b) in blocks {
                cache.give(c, b);
            }
        }
        assert_eq!(mallocs, 3);
        let s = cache.stats();
        assert_eq!((s.raw_allocs, s.hits), (3, 6));
        assert_eq!(s.cached_bytes, s.reserved_bytes);

        // A failing driver: the cache is emptied (every block released) and the request retried.
        let mut released = 0usize;
        let mut tries = 0;
        let r: Result<Vec<u8>, &str> = cache.take(
            size_class(1 << 30),
            |_| {
                tries += 1;
                if tries == 1 {
                    Err("out of memory")
                } else {
                    Ok(Vec::new())
                }
            },
            |_, c| released += c,
        );
        assert!(r.is_ok());
        assert_eq!(tries, 2);
        assert_eq!(released, size_class(100) + size_class(4096) + size_class(3 << 20));
        assert_eq!(cache.stats().cached_bytes, 0);
    }
}
