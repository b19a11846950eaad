//! Fused ops with hand-written backward passes: one pass over memory each way instead of a
//! chain of elementwise ops, and statistics saved in forward (mean/rstd, log Z) instead of
//! recomputed. Each is checked against finite differences and against PyTorch fixtures.

pub mod attention;
pub mod batch_norm;
pub mod cross_entropy;
pub mod gelu;
pub mod layer_norm;
pub mod mlp;
pub mod qk_norm;

/// Splits `rows` rows into at most `threads` contiguous ranges of whole rows, each at least
/// `min_rows` long, for row-parallel fused kernels.
pub(crate) fn row_chunk(rows: usize, min_rows: usize) -> usize {
    let t = rayon::current_num_threads().max(1);
    rows.div_ceil(t).max(min_rows).max(1)
}
