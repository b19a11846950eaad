//! What the trust-ratio optimizers (LAMB, LARS) share: each parameter's place in the flat
//! buffer, and its norm on the host. A trust ratio is a per-tensor quantity, so these
//! optimizers cannot be one element-wise pass like AdamW: they need one norm per parameter
//! first. On a GPU that is one segmented reduction over the whole buffer
//! (`dptrain_core::ops::flat::DeviceSegments`), not a loop of launches. AdamW and SGD walk the
//! same segments on a GPU for their per-parameter decay and learning-rate multipliers.

use dptrain_core::ops::flat::Segment;
use dptrain_core::ParamStore;

/// The parameters' segments in buffer order (`matrix`: more than one dimension).
pub(crate) fn segments(params: &ParamStore) -> Vec<Segment> {
    params.infos().iter().map(|p| Segment { offset: p.offset, len: p.numel, matrix: p.shape.len() > 1 }).collect()
}

/// ‖x‖ accumulated in f64 and rounded to f32 (what the device's segmented reduction returns,
/// up to summation order).
pub(crate) fn norm(x: &[f32]) -> f32 {
    x.iter().map(|&a| (a as f64) * (a as f64)).sum::<f64>().sqrt() as f32
}
