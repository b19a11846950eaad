//! Launches of `probe.cu`: activation statistics reduced on the device, so a probe step
//! downloads a few numbers per tensor (see `ops::stats`, which checks the arguments and
//! dispatches here).

use super::*;

/// Elements per chunk of the chunked reductions (`STATS_CHUNK` in probe.cu).
const CHUNK: usize = 65536;

/// The largest |x| and the lowest index holding it (`(-inf, 0)` when every entry is NaN).
pub fn abs_argmax(x: &Tensor) -> Result<(f32, usize)> {
    let d = dev_of(x)?;
    let x = contiguous(x)?;
    let n = x.numel();
    let nchunks = n.div_ceil(CHUNK).max(1);
    let best = empty(&d, &[nchunks])?;
    // i64 per chunk: two f32 slots.
    let at = empty(&d, &[2 * nchunks])?;
    // abs_argmax_f32(const float* x, i64 n, i64 nchunks, float* best, i64* at)
    launch!(d, "probe", "abs_argmax_f32", per_row(nchunks); ptr(&x)?, n as i64, nchunks as i64, ptr(&best)?, ptr(&at)?)?;
    let best: Vec<f32> = d.download(ptr(&best)?, nchunks)?;
    let at: Vec<i64> = d.download(ptr(&at)?, nchunks)?;
    // Chunks in index order: the first one holding the maximum has its lowest index.
    let mut out = (f32::NEG_INFINITY, 0);
    for (b, a) in best.into_iter().zip(at) {
        if b > out.0 {
            out = (b, a as usize);
        }
    }
    Ok(out)
}

/// How many entries are ≤ `threshold`.
pub fn count_at_most(x: &Tensor, threshold: f64) -> Result<usize> {
    let d = dev_of(x)?;
    let x = contiguous(x)?;
    let n = x.numel();
    let nchunks = n.div_ceil(CHUNK).max(1);
    let count = empty(&d, &[nchunks])?;
    // count_at_most_f32(const float* x, i64 n, i64 nchunks, double threshold, float* count)
    launch!(d, "probe", "count_at_most_f32", per_row(nchunks); ptr(&x)?, n as i64, nchunks as i64, threshold, ptr(&count)?)?;
    Ok(d.download::<f32>(ptr(&count)?, nchunks)?.into_iter().map(|c| c as usize).sum())
}

/// The k-th smallest |x| (0-based, k < n; `total_cmp` order, NaN last): a radix select over the
/// bit patterns, 8 bits a pass, each pass one histogram launch and a 1 KiB download.
pub fn abs_kth_smallest(x: &Tensor, k: usize) -> Result<f32> {
    let d = dev_of(x)?;
    let x = contiguous(x)?;
    let n = x.numel();
    let (mut prefix, mut mask, mut rank) = (0u32, 0u32, k as u64);
    for shift in [24i32, 16, 8, 0] {
        let hist = zeros(&d, &[256])?;
        // abs_radix_hist_f32(const float* x, i64 n, unsigned prefix, unsigned mask, int shift, unsigned* hist)
        launch!(d, "probe", "abs_radix_hist_f32", grid(n); ptr(&x)?, n as i64, prefix, mask, shift, ptr(&hist)?)?;
        let hist: Vec<u32> = d.download(ptr(&hist)?, 256)?;
        let mut digit = 0u32;
        for (b, &c) in hist.iter().enumerate() {
            if rank < c as u64 {
                digit = b as u32;
                break;
            }
            rank -= c as u64;
        }
        prefix |= digit << shift;
        mask |= 0xff << shift;
    }
    Ok(f32::from_bits(prefix))
}

/// For `x` as rows of `row_len` values: the largest L2 norm over the rows of each of the first
/// `nseg` segments of `seg_len` values (sums of squares in f64, in order).
pub fn segment_norm_max(x: &Tensor, row_len: usize, seg_len: usize, nseg: usize) -> Result<Vec<f64>> {
    let d = dev_of(x)?;
    let x = contiguous(x)?;
    let rows = x.numel() / row_len;
    // u64 per segment: two f32 slots.
    let out = zeros(&d, &[2 * nseg.max(1)])?;
    // segment_norm_max_f32(const float* x, i64 rows, int row_len, int seg_len, int nseg, unsigned long long* out)
    launch!(d, "probe", "segment_norm_max_f32", grid(rows * nseg);
        ptr(&x)?, rows as i64, row_len as i32, seg_len as i32, nseg as i32, ptr(&out)?)?;
    Ok(d.download::<u64>(ptr(&out)?, nseg)?.into_iter().map(f64::from_bits).collect())
}
