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
