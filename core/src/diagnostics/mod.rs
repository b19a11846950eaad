//! Diagnostics that exercise the engine from outside, as a user of it: they build ops on tapes
//! and compare devices, so they sit above the kernel layer (which they only reach through the
//! ops' public dispatch) instead of inside it.
//!
//! - [`gpu_ops`]: part (a) of `dptrain gpu-check` — every op forward and backward on a GPU
//!   against the CPU engine (also run on the CUDA emulator in CI).

#[cfg(feature = "cuda")]
pub mod gpu_ops;
