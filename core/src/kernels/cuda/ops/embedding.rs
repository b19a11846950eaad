//! Embedding lookup and its scatter-add backward.

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

/// The table's gradient from `g [n, dim]` and the `n` ids forward left on the device.
pub fn embedding_bwd(g: &Tensor, idb: &DevBuf, n: usize, vocab: usize, dim: usize) -> Result<Tensor> {
    let d = dev_of(g)?;
    let g = contiguous(g)?;
    // The ids are u32: 4 bytes each, as f32 elements (checks the buffer holds n of them).
    idb.region(crate::tensor::DType::F32, n)?;
    let out = zeros(&d, &[vocab, dim])?;
    // The positions sorted by id (then position): each row then sums its own, in order.
    let order = d.alloc(4 * n.max(1))?;
    // embedding_order(const unsigned int* ids, int* order, i64 n)
    launch!(d, "embedding", "embedding_order", grid(n); idb.ptr, order.ptr, n as i64)?;
    // embedding_bwd_f32(const float* g, const unsigned int* ids, const int* order, float* gw, i64 n, i64 dim)
    launch!(d, "embedding", "embedding_bwd_f32", grid(n * dim); ptr(&g)?, idb.ptr, order.ptr, ptr(&out)?, n as i64, dim as i64)?;
    Ok(out)
}
