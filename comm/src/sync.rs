//! `GradSync`: what the training loop needs from a gradient synchroniser, whichever transport
//! carries the buckets — MPI on a communication thread ([`GradReducer`](crate::GradReducer)) or
//! NCCL on a communication stream (`nccl::NcclReducer`). The trainer holds one
//! `Box<dyn GradSync>` and drives it the same way for both: `begin` each backward pass, feed it
//! the tape's "parameter gradient final" events, `wait_all` before clipping.

use crate::bucket::Bucket;
use crate::ReduceStats;
use dptrain_core::{GradStore, ParamId, Result};

pub trait GradSync: Send {
    /// The bucket layout (the same on every rank).
    fn buckets(&self) -> &[Bucket];
    /// Starts a backward pass; `sync` is true on the last micro-step of a step (the others
    /// communicate nothing, as DDP's `no_sync`).
    fn begin(&mut self, sync: bool);
    /// The engine's "parameter gradient final" event: starts every bucket that became complete.
    ///
    /// # Safety
    /// A started bucket's region of `grads` is read (and written, with the average) in place
    /// until `wait_all` returns: the caller keeps `grads` alive, does not write the finished
    /// parameters' gradients until then, and calls `wait_all` with the same `grads` (or drops
    /// the synchroniser, which waits for in-flight buckets) before dropping `grads`. The autograd
    /// tape never touches a parameter's gradient after its final event in the same pass.
    unsafe fn on_ready(&mut self, id: ParamId, grads: &GradStore) -> Result<()>;
    /// Completes every bucket; `grads` then holds the average over ranks.
    fn wait_all(&mut self, grads: &mut GradStore) -> Result<ReduceStats>;
}
