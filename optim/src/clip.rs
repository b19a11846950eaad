//! Global-norm gradient clipping over the flat gradient buffer, as
//! `torch.nn.utils.clip_grad_norm_`: coef = max_norm / (‖g‖ + 1e-6), applied only when < 1.

use crate::Result;
use dptrain_core::GradStore;

/// ‖g‖₂ over all parameters (accumulated in f64).
pub fn grad_norm(grads: &GradStore) -> Result<f64> {
    Ok(dptrain_core::ops::flat::sum_squares(grads.flat())?.sqrt())
}

/// Clips in place when `max_norm > 0`; returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads)?;
    clip_to_norm(grads, max_norm, norm)?;
    Ok(norm)
}

/// Clipping for gradients whose norm `norm` is already known (the trainer reads it from the
/// device together with the loss).
pub fn clip_to_norm(grads: &mut GradStore, max_norm: f64, norm: f64) -> Result<()> {
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            let c = coef as f32;
            dptrain_core::ops::flat::scale_in_place(grads.flat_tensor_mut(), c)?;
        }
    }
    Ok(())
}
