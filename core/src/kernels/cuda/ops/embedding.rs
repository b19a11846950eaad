//! Embedding lookup and its backward: positions sorted by id on the device, each row summed in
//! position order (no atomics: the CPU's bits), into the gradient slot the tape offers.

use super::*;

pub(super) fn upload_ids(d: &Arc<CudaDev>, ids: &[u32]) -> Result<DevBuf> {
    d.upload_input(ids)
}

/// Rows `ids` of `w [vocab, dim]`, and the ids on the device (for backward).
pub fn embedding(w: &Tensor, ids: &[u32], shape: &[usize]) -> Result<(Tensor, DevBuf)> {
    let d = dev_of(w)?;
    let w = contiguous(w)?;
    let dim = w.shape()[1];
    let idb = upload_ids(&d, ids)?;
    let out = empty(&d, shape)?;
    let n = ids.len();
    // embedding_fwd_f32(const float* w, const unsigned int* ids, float* out, i64 n, i64 dim)
    launch!(d, "embedding", "embedding_fwd_f32", grid(n * dim); ptr(&w)?, idb.ptr, ptr(&out)?, n as i64, dim as i64)?;
    Ok((out, idb))
}

/// The table's gradient from `g [n, dim]` and the `n` ids forward left on the device: a new
/// `[vocab, dim]` tensor, or with `sink` (the table's slot in the flat gradient buffer, see
/// `autograd::take_grad_sink`) added there — zeroed first when nothing is there yet — and `None`
/// returned: no table-sized temporary and no pass adding it in (GPT-124M's is 154 MB).
pub fn embedding_bwd(
    g: &Tensor,
    idb: &DevBuf,
    n: usize,
    vocab: usize,
    dim: usize,
    sink: Option<crate::autograd::GradSink>,
) -> Result<Option<Tensor>> {
    let d = dev_of(g)?;
    let g = contiguous(g)?;
    f32_only(&g, "embedding")?;
    // The ids are u32: 4 bytes each, as f32 elements (checks the buffer holds n of them).
    idb.region(crate::tensor::DType::F32, n)?;
    let (out, gw) = match sink {
        Some(sk) if sk.len != vocab * dim => {
            return Err(Error::shape("embedding", format!("a gradient slot of {} elements for [{vocab}, {dim}]", sk.len)))
        }
        Some(sk) => {
            if !sk.accumulate {
                fill_raw(&d, sk.ptr, sk.len, 0.0)?;
            }
            (None, sk.ptr)
        }
        None => {
            let t = zeros(&d, &[vocab, dim])?;
            let p = ptr(&t)?;
            (Some(t), p)
        }
    };
    // The positions sorted by id (then position): each row then sums its own, in order, and adds
    // the sum to what the row holds.
    let order = sort_positions(&d, idb, n, vocab)?;
    // embedding_bwd_f32(const float* g, const unsigned int* ids, const int* order, float* gw, i64 n, i64 dim)
    launch!(d, "embedding", "embedding_bwd_f32", grid(n * dim); ptr(&g)?, idb.ptr, order.ptr, gw, n as i64, dim as i64)?;
    Ok(out)
}

/// Positions per block of the sort (`EMB_CHUNK` in embedding.cu).
const SORT_CHUNK: usize = 1024;

/// The `n` positions of `ids` (each below `vocab`) stably sorted by id, on the device: a radix
/// sort, 8 bits of the id a pass (see embedding.cu).
fn sort_positions(d: &Arc<CudaDev>, ids: &DevBuf, n: usize, vocab: usize) -> Result<DevBuf> {
    let bits = usize::BITS - vocab.saturating_sub(1).leading_zeros();
    let passes = bits.div_ceil(8).max(1);
    let chunks = n.div_ceil(SORT_CHUNK);
    let per_chunk = LaunchConfig { grid_dim: (chunks.clamp(1, 65535) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let one_block = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
    let count = d.alloc(4 * 256 * chunks.max(1))?;
    let bufs = [d.alloc(4 * n.max(1))?, d.alloc(4 * n.max(1))?];
    let mut src: Option<&DevBuf> = None; // the first pass reads the positions in order
    for p in 0..passes {
        let dst = &bufs[p as usize % 2];
        let src_ptr = src.map_or(0, |b| b.ptr);
        // embedding_digit_counts(const unsigned int* ids, const int* src, unsigned int* count, i64 n, int shift)
        launch!(d, "embedding", "embedding_digit_counts", per_chunk; ids.ptr, src_ptr, count.ptr, n as i64, (8 * p) as i32)?;
        // embedding_digit_offsets(unsigned int* count, i64 m)
        launch!(d, "embedding", "embedding_digit_offsets", one_block; count.ptr, (256 * chunks) as i64)?;
        // embedding_digit_scatter(const unsigned int* ids, const int* src, const unsigned int* offset, int* dst, i64 n, int shift)
        launch!(d, "embedding", "embedding_digit_scatter", per_chunk; ids.ptr, src_ptr, count.ptr, dst.ptr, n as i64, (8 * p) as i32)?;
        src = Some(dst);
    }
    let [even, odd] = bufs;
    Ok(if passes % 2 == 1 { even } else { odd })
}
