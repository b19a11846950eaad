//! `dptrain-core`: the tensor engine (tensor, autograd tape, CPU kernels, CUDA kernels compiled
//! at run time with NVRTC plus cuBLAS GEMMs behind the `cuda` feature, fused training ops), the
//! parameter store with its flat value/gradient buffers, checkpoint I/O, and the interfaces the
//! other crates implement (`Communicator`, `Model`, `ProbeSink`). Every op dispatches on its
//! inputs' device; test builds can run the CUDA kernels on a CPU emulator (`cuda-emu`).
//!
//! Core knows no implementation of its traits: MPI and NCCL live in `dptrain-comm`, models in
//! `dptrain-models`, optimizers in `dptrain-optim`. The engine is ours rather than candle's for
//! the measured reasons in `shared/notes/why-our-own-engine.md` (backward speed, gradients cut
//! silently by fused ops, a CUDA build that cannot start without libcuda).

pub mod autograd;
pub mod checkpoint;
pub mod comm;
pub mod data;
pub mod device;
pub mod diagnostics;
pub mod env;
pub mod error;
pub(crate) mod kernels;
pub mod model;
pub mod ops;
pub mod params;
pub mod probe;
pub mod rng;
pub mod tensor;

#[doc(hidden)]
pub use num_traits;

pub use autograd::{Tape, Var};
pub use error::{Error, Result};
pub use params::{GradStore, Init, ParamBuilder, ParamId, ParamStore, Role};
pub use tensor::{DType, Device, Precision, Tensor};
