//! Reductions of an activation to a few host numbers, for the training probes (massive
//! activations, MLP sparsity, per-head query/key norms; `dptrain-models::probes`): the largest
//! |x| and where it is, the k-th smallest |x| (a median), a count under a threshold, and the
//! largest per-segment L2 norm over rows. On a GPU they run as reductions on the device (only
//! the results come down, not the activation), and give the host's numbers exactly: maxima,
//! integer counts, a radix select, and sums of squares in f64 in the same order.

use crate::error::{Error, Result};
use crate::on_cuda;
use crate::tensor::{DType, Tensor};
use rayon::prelude::*;

/// The tensor's values on the host (CPU path; a CUDA tensor that is not f32 comes down too).
fn host(t: &Tensor) -> Result<Vec<f32>> {
    t.contiguous().to_vec::<f32>()
}

/// On the device when the tensor is an f32 CUDA tensor.
fn on_device(t: &Tensor) -> bool {
    t.is_cuda() && t.dtype() == DType::F32
}

/// A bf16 CUDA activation (a `linear_half` output) widened to f32 on its device, where the
/// reductions run; anything else as it is.
fn widened(t: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if t.is_cuda() && t.dtype() == DType::BF16 {
        return crate::kernels::cuda::ops::cast(t, DType::F32);
    }
    Ok(t.clone())
}

/// The largest |x| and the lowest flat index holding it; NaN never wins (`(-inf, 0)` when
/// every entry is NaN or there are none).
pub fn abs_top1(t: &Tensor) -> Result<(f32, usize)> {
    let t = &widened(t)?;
    if on_device(t) {
        on_cuda!(t => gpu::abs_argmax(t));
    }
    let v = host(t)?;
    // The first largest entry (ties to the lowest index, whatever the thread split).
    let (at, top) = v
        .par_iter()
        .map(|x| x.abs())
        .enumerate()
        .reduce(|| (0, f32::NEG_INFINITY), |p, q| if q.1 > p.1 || (q.1 == p.1 && q.0 < p.0) { q } else { p });
    Ok((top, at))
}

/// The k-th smallest |x| (0-based, in `total_cmp` order: NaN above +inf).
pub fn abs_kth_smallest(t: &Tensor, k: usize) -> Result<f32> {
    let n = t.numel();
    if k >= n {
        return Err(Error::shape("abs_kth_smallest", format!("rank {k} of {n} elements")));
    }
    let t = &widened(t)?;
    if on_device(t) {
        on_cuda!(t => gpu::abs_kth_smallest(t, k));
    }
    let mut a: Vec<f32> = host(t)?.into_par_iter().map(f32::abs).collect();
    Ok(*a.select_nth_unstable_by(k, |p, q| p.total_cmp(q)).1)
}

/// How many entries are ≤ `threshold` (compared in f64).
pub fn count_at_most(t: &Tensor, threshold: f64) -> Result<usize> {
    let t = &widened(t)?;
    if on_device(t) {
        on_cuda!(t => gpu::count_at_most(t, threshold));
    }
    Ok(host(t)?.par_iter().filter(|&&x| (x as f64) <= threshold).count())
}

/// `t` read as rows of `row_len` values whose first `nseg` segments of `seg_len` values are
/// looked at: every such segment's largest L2 norm over the rows (sums of squares in f64, in
/// order; NaN norms ignored; 0 for no rows).
pub fn segment_norm_max(t: &Tensor, row_len: usize, seg_len: usize, nseg: usize) -> Result<Vec<f64>> {
    let n = t.numel();
    if row_len == 0 || seg_len == 0 || nseg * seg_len > row_len || !n.is_multiple_of(row_len) {
        return Err(Error::shape("segment_norm_max", format!("{n} elements as rows of {row_len}, {nseg} segments of {seg_len}")));
    }
    let t = &widened(t)?;
    if on_device(t) {
        on_cuda!(t => gpu::segment_norm_max(t, row_len, seg_len, nseg));
    }
    let v = host(t)?;
    Ok(v.par_chunks(row_len)
        .fold(
            || vec![0.0f64; nseg],
            |mut max, row| {
                for (k, m) in max.iter_mut().enumerate() {
                    let n = row[k * seg_len..(k + 1) * seg_len].iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
                    *m = m.max(n);
                }
                max
            },
        )
        .reduce(|| vec![0.0f64; nseg], |a, b| a.iter().zip(&b).map(|(x, y)| x.max(*y)).collect()))
}
