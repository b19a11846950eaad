//! A size-binned buffer cache for CPU storage.
//!
//! Every op allocates its output; without reuse the steady-state training step would ask the OS
//! allocator for (and page-fault in) the same large buffers every step — candle spent ~35 % of a
//! GPT step there (see `shared/notes/why-our-own-engine.md`). Buffers are binned by exact length:
//! a training step repeats the same shapes, so after the first step every request is a hit.
//! Counters make that measurable (`PoolStats`), and a test asserts zero misses in steady state.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Buffers below this many elements come from the system allocator directly: binning them costs
/// more than it saves.
const MIN_POOLED: usize = 1024;
/// At most this many idle buffers are kept per length.
const MAX_PER_BIN: usize = 64;

/// `DPTRAIN_POOL=0` turns reuse off (every buffer from the system allocator), so the
/// benchmark can measure what the pool saves.
fn enabled() -> bool {
    crate::env::env().pool
}

pub struct Pool<T> {
    bins: Mutex<HashMap<usize, Vec<Vec<T>>>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// Counters of pooled requests since start (or the last reset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    pub hits: u64,
    pub misses: u64,
}

impl<T: Copy + Default> Pool<T> {
    pub fn new() -> Self {
        Pool { bins: Mutex::new(HashMap::new()), hits: AtomicU64::new(0), misses: AtomicU64::new(0) }
    }

    /// A buffer of exactly `len` elements with unspecified contents: callers must overwrite all.
    pub fn take(&self, len: usize) -> Vec<T> {
        if len >= MIN_POOLED && enabled() {
            let reused = self.bins.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&len).and_then(|b| b.pop());
            if let Some(v) = reused {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return v;
            }
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
        vec![T::default(); len]
    }

    pub fn give(&self, v: Vec<T>) {
        let len = v.len();
        if len < MIN_POOLED || v.capacity() != len || !enabled() {
            return;
        }
        let mut bins = self.bins.lock().unwrap_or_else(|e| e.into_inner());
        let bin = bins.entry(len).or_default();
        if bin.len() < MAX_PER_BIN {
            bin.push(v);
        }
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats { hits: self.hits.load(Ordering::Relaxed), misses: self.misses.load(Ordering::Relaxed) }
    }

    /// Drops every idle buffer (returns memory to the OS allocator).
    pub fn clear(&self) {
        self.bins.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

impl<T: Copy + Default> Default for Pool<T> {
    fn default() -> Self {
        Self::new()
    }
}
