//! Gradient buckets, as PyTorch DDP's Reducer forms them: parameters are taken in reverse
//! store order (≈ the order backward finishes them); a bucket closes once it holds at least its
//! cap — 1 MiB for the first (so communication starts early), `cap_bytes` after. Because the
//! store lays parameters out contiguously, each bucket is one contiguous slice of the flat
//! gradient buffer. Assignment is a pure function of the layout, identical on every rank.

use dptrain_core::params::ParamInfo;
use dptrain_core::ParamId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    /// Element range [start, end) in the flat gradient buffer.
    pub start: usize,
    pub end: usize,
    /// Parameters in the bucket, in the order they were added (reverse store order).
    pub params: Vec<ParamId>,
}

impl Bucket {
    pub fn len(&self) -> usize {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// Assigns parameters to buckets; `elem_bytes` is the gradient element size.
pub fn assign_buckets(params: &[ParamInfo], first_cap_bytes: usize, cap_bytes: usize, elem_bytes: usize) -> Vec<Bucket> {
    let mut out = vec![];
    let mut cur: Option<Bucket> = None;
    for p in params.iter().rev() {
        let b = cur.get_or_insert(Bucket { start: p.offset, end: p.offset + p.numel, params: vec![] });
        b.start = p.offset;
        b.params.push(p.id);
        let cap = if out.is_empty() { first_cap_bytes } else { cap_bytes };
        if b.len() * elem_bytes >= cap {
            out.push(cur.take().expect("set above"));
        }
    }
    out.extend(cur);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use dptrain_core::{Init, Role};

    fn infos(sizes: &[usize]) -> Vec<ParamInfo> {
        let mut off = 0;
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let p = ParamInfo {
                    id: ParamId(i),
                    name: format!("p{i}"),
                    shape: vec![n],
                    offset: off,
                    numel: n,
                    role: Role::Hidden,
                    fan_in: 1,
                    fan_out: 1,
                    init: Init::Const(0.0),
                    owner: None,
                    base_shape: None,
                };
                off += n;
                p
            })
            .collect()
    }

    #[test]
    fn first_bucket_small_then_capped_in_reverse_order() {
        // sizes in floats; caps in bytes (4 bytes per float): first 40 B = 10 floats, then 100 B = 25 floats
        let b = assign_buckets(&infos(&[5, 20, 10, 4, 8, 6]), 40, 100, 4);
        let ids: Vec<Vec<usize>> = b.iter().map(|b| b.params.iter().map(|p| p.0).collect()).collect();
        assert_eq!(ids, vec![vec![5, 4], vec![3, 2, 1], vec![0]]);
        assert_eq!((b[0].start, b[0].end), (39, 53));
        assert_eq!((b[1].start, b[1].end), (5, 39));
        assert_eq!((b[2].start, b[2].end), (0, 5));
        // buckets tile the buffer exactly
        let total: usize = b.iter().map(Bucket::len).sum();
        assert_eq!(total, 53);
    }

    #[test]
    fn one_bucket_when_everything_fits_and_big_params_alone() {
        assert_eq!(assign_buckets(&infos(&[1, 2, 3]), 1 << 20, 25 << 20, 4).len(), 1);
        let b = assign_buckets(&infos(&[100, 100]), 40, 40, 4);
        assert_eq!(b.len(), 2);
        assert!(assign_buckets(&[], 40, 40, 4).is_empty());
    }
}

/// Which buckets may be launched, in the order every rank must launch them: a bucket is ready
/// when all its parameters' gradients are final, and buckets go out strictly in index order
/// (so ranks issue the same collectives in the same sequence even if backward finishes them in
/// a different order). Shared by the MPI and the NCCL reducers.
#[derive(Debug, Clone)]
pub struct BucketSchedule {
    buckets: Vec<Bucket>,
    bucket_of: Vec<usize>,
    pending: Vec<usize>,
    ready: Vec<bool>,
    next: usize,
}

impl BucketSchedule {
    /// Buckets for `params` (first 1 MiB or less, then `bucket_mb`), f32 gradients.
    pub fn new(params: &[ParamInfo], bucket_mb: f64) -> BucketSchedule {
        let cap = ((bucket_mb * 1024.0 * 1024.0) as usize).max(4);
        let buckets = assign_buckets(params, (1 << 20).min(cap), cap, 4);
        let mut bucket_of = vec![0; params.len()];
        for (b, bk) in buckets.iter().enumerate() {
            for p in &bk.params {
                bucket_of[p.0] = b;
            }
        }
        let n = buckets.len();
        let mut s = BucketSchedule { pending: vec![0; n], buckets, bucket_of, ready: vec![false; n], next: 0 };
        s.begin();
        s
    }

    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    /// Starts a backward pass: nothing final, nothing launched.
    pub fn begin(&mut self) {
        self.next = 0;
        self.ready.fill(false);
        for (p, b) in self.pending.iter_mut().zip(&self.buckets) {
            *p = b.params.len();
        }
    }

    /// Records that parameter `id`'s gradient is final.
    pub fn finish(&mut self, id: ParamId) {
        let b = self.bucket_of[id.0];
        self.pending[b] -= 1;
        if self.pending[b] == 0 {
            self.ready[b] = true;
        }
    }

    /// The next bucket to launch, if it is ready (call until `None`).
    pub fn next_ready(&mut self) -> Option<usize> {
        self.next_any().filter(|&b| self.ready[b]).inspect(|_| self.next += 1)
    }

    /// The next bucket not launched yet, ready or not (after backward, everything is).
    pub fn next_unlaunched(&mut self) -> Option<usize> {
        self.next_any().inspect(|_| self.next += 1)
    }

    fn next_any(&self) -> Option<usize> {
        (self.next < self.buckets.len()).then_some(self.next)
    }

    /// True when some bucket has not been launched.
    pub fn unlaunched(&self) -> bool {
        self.next < self.buckets.len()
    }
}

#[cfg(test)]
mod schedule_tests {
    use super::*;
    use dptrain_core::{DType, Init, ParamBuilder, Role};

    #[test]
    fn buckets_launch_in_index_order_once_complete() {
        let mut b = ParamBuilder::new();
        for i in 0..4 {
            b.add(&format!("p{i}"), &[8], Role::Vector, 1, 8, Init::Const(0.0));
        }
        let ps = b.build(1, DType::F32).unwrap();
        // 8 floats = 32 bytes per parameter; a 32-byte cap makes one bucket per parameter,
        // in reverse store order: bucket 0 = p3, 1 = p2, 2 = p1, 3 = p0.
        let mut s = BucketSchedule::new(ps.infos(), 32.0 / (1024.0 * 1024.0));
        assert_eq!(s.buckets().len(), 4);
        assert_eq!(s.buckets()[0].params, vec![ParamId(3)]);
        // p2 finishes first: bucket 1 is ready but bucket 0 is not, so nothing may launch.
        s.finish(ParamId(2));
        assert_eq!(s.next_ready(), None);
        s.finish(ParamId(3));
        assert_eq!((s.next_ready(), s.next_ready(), s.next_ready()), (Some(0), Some(1), None));
        assert!(s.unlaunched());
        assert_eq!((s.next_unlaunched(), s.next_unlaunched(), s.next_unlaunched()), (Some(2), Some(3), None));
        assert!(!s.unlaunched());
        // A new pass starts over.
        s.begin();
        assert_eq!(s.next_ready(), None);
        for i in 0..4 {
            s.finish(ParamId(i));
        }
        assert_eq!((0..4).map(|_| s.next_ready()).collect::<Vec<_>>(), vec![Some(0), Some(1), Some(2), Some(3)]);
    }
}
