//! Device kernels. Private to the engine: callers use tensor ops in `crate::ops`, which dispatch
//! on the tensor's device to the matching kernel here. The CUDA kernels are CUDA C sources,
//! compiled at run time with NVRTC (feature `cuda`), so building needs no CUDA toolkit.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
