//! Device kernels. Private to the engine: callers use tensor ops in `crate::ops`, which dispatch
//! on the tensor's device to the matching kernel here.

pub mod cpu;
