//! `GradSync`: what the training loop needs from a gradient synchroniser, whichever transport
//! carries the buckets — MPI on a communication thread ([`GradReducer`](crate::GradReducer)) or
//! NCCL on a communication stream (`nccl::NcclReducer`). The trainer holds one
//! `Box<dyn GradSync>` and calls `backward` once per micro-step: the synchroniser runs the
//! tape's backward itself, so the gradient buffer stays borrowed for as long as any bucket of
//! it is being reduced, and no caller handles raw regions or an `unsafe` contract.
//!
//! Inside, both reducers follow the same protocol (`BucketSync`): `begin` a pass, the tape's
//! "parameter gradient final" events start every bucket that became complete, `wait_all`
//! completes them. That protocol is `unsafe` (a started bucket's region is read and written by
//! another thread or stream while backward writes other parameters' gradients) and stays
//! inside this crate, where `backward_with` upholds it.

use crate::bucket::Bucket;
use crate::ReduceStats;
use dptrain_core::{GradStore, ParamId, Result, Tape, Var};

pub trait GradSync: Send {
    /// The bucket layout (the same on every rank).
    fn buckets(&self) -> &[Bucket];
    /// Backward of `loss` into `grads`. When `sync` (the last micro-step of an optimizer step)
    /// the gradients are averaged over ranks — bucket by bucket while backward goes on, when
    /// overlapping — and hold the averages when this returns, with the reduction's timing.
    /// Otherwise nothing is communicated (DDP's `no_sync`) and the result is `None`.
    fn backward(&mut self, tape: &Tape, loss: Var<'_>, grads: &mut GradStore, sync: bool) -> Result<Option<ReduceStats>>;
    /// Averages `grads` over ranks now, every bucket, after a backward that communicated nothing
    /// (the trainer reads each rank's own gradient in between: the critical-batch probe). The
    /// buckets and their reductions are the overlapped path's, so the averages are the same.
    fn reduce_all(&mut self, grads: &mut GradStore) -> Result<ReduceStats>;
    /// Whether the next synchronising pass is measured (its `ReduceStats` real numbers). The
    /// trainer asks on the steps it logs. A transport whose reductions run on the device
    /// (NCCL) waits on the host for a measured pass only, so the other steps never wait; the
    /// MPI reducer always measures (its wait is the step's anyway).
    fn measure_next(&mut self, _on: bool) {}
    /// Called after each launch of a CUDA graph that captured this synchroniser's passes (a
    /// replayed training step), so the reductions inside are watched as the eager ones are.
    fn after_replay(&mut self) -> Result<()> {
        Ok(())
    }
}

/// `GradSync::reduce_all` for any `BucketSync`.
pub(crate) fn reduce_all_with<S: BucketSync + ?Sized>(s: &mut S, grads: &mut GradStore) -> Result<ReduceStats> {
    s.begin(true);
    s.wait_all(grads)
}

/// The bucket protocol both reducers implement (see the module doc).
pub(crate) trait BucketSync {
    /// Starts a backward pass; `sync` false communicates nothing.
    fn begin(&mut self, sync: bool);
    /// The tape's "parameter gradient final" event: starts every bucket that became complete.
    ///
    /// # Safety
    /// A started bucket's region of `grads` is read and written in place until `wait_all`
    /// returns: `grads` must stay alive and unwritten in the finished parameters' regions until
    /// then, and `wait_all` must be called with the same `grads`.
    unsafe fn on_ready(&mut self, id: ParamId, grads: &GradStore) -> Result<()>;
    /// Starts the remaining buckets and completes all of them, even after a failed one (no
    /// region stays in use when this returns); `grads` then holds the averages.
    fn wait_all(&mut self, grads: &mut GradStore) -> Result<ReduceStats>;
}

/// `GradSync::backward` for any `BucketSync`: the one place that upholds its safety contract.
pub(crate) fn backward_with<S: BucketSync + ?Sized>(
    s: &mut S,
    tape: &Tape,
    loss: Var<'_>,
    grads: &mut GradStore,
    sync: bool,
) -> Result<Option<ReduceStats>> {
    s.begin(sync);
    let mut event_err = None;
    let res = tape.backward(loss, grads, |p, g| {
        // SAFETY: `grads` is borrowed mutably by this function until `wait_all` below has
        // completed every started bucket, also when backward fails; the tape never writes a
        // parameter's gradient after its final event in the same pass (core/tests/engine.rs).
        if let Err(e) = unsafe { s.on_ready(p, g) } {
            event_err.get_or_insert(e);
        }
    });
    let stats = s.wait_all(grads);
    res?;
    if let Some(e) = event_err {
        return Err(e);
    }
    let stats = stats?;
    Ok(sync.then_some(stats))
}
