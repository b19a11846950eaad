//! `dptrain-comm`: implementations of `dptrain_core::comm::Communicator` and the gradient
//! reducer. All MPI code lives here (architecture principle 11):
//! - `LocalComm`: the world of one (no launcher);
//! - `ThreadComm`: N in-process ranks over shared memory, for fast multi-rank tests;
//! - `MpiComm` (feature `mpi`): rsmpi over the system MPI, every collective under a watchdog;
//! - `bucket` / `reducer`: DDP-style gradient buckets all-reduced on a communication thread
//!   while backward continues;
//! - `NcclComm` / `NcclReducer` (feature `nccl`): the same buckets averaged by NCCL on a
//!   communication stream of the GPU, bootstrapped over MPI, watched by `nccl_watchdog`'s
//!   thread so the training thread never waits for them;
//! - `GradSync`: the one interface the trainer drives both reducers through.

pub mod bucket;
pub mod local;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod nccl_lib;
#[cfg(any(feature = "nccl", test))]
mod nccl_watchdog;
pub mod reducer;
pub mod sync;
pub mod thread;
pub mod world;

pub use bucket::{assign_buckets, Bucket, BucketSchedule};
pub use local::LocalComm;
pub use reducer::{GradReducer, ReduceStats};
pub use sync::GradSync;
pub use thread::ThreadComm;
