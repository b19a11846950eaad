//! NCCL through cudarc (feature `nccl`): the GPU path of data parallelism.
//!
//! [`NcclComm`] is bootstrapped over the MPI communicator as PyTorch and the NCCL docs do:
//! rank 0 creates the 128-byte unique id, MPI broadcasts it, a barrier, then every rank joins
//! with `ncclCommInitRank` on its own device. [`NcclReducer`] is the GPU twin of
//! [`GradReducer`](crate::GradReducer): buckets of the flat gradient buffer (same assignment) are
//! averaged in place with `ncclAvg` on a communication stream of their own, each launched as soon
//! as its last parameter's gradient is final — the communication stream first waits on an event
//! recorded on the compute stream, so the bucket is complete on the device — while backward
//! keeps queueing kernels on the compute stream. `wait_all` makes the compute stream wait for
//! the communication stream and polls NCCL for asynchronous errors (a dead peer, a network
//! failure) until the reductions finish or `comm.timeout_s` passes, then aborts the communicator
//! and fails naming the collective: the watchdog of the CPU path, for NCCL. With
//! `comm.dtype = "bf16"` a bucket is cast to bf16 on the communication stream, averaged as bf16
//! (half the bytes), and cast back.
//!
//! Also here: the single-rank all-reduce that `dptrain gpu-check` runs.

use crate::bucket::{assign_buckets, Bucket};
use crate::reducer::ReduceStats;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};
use cudarc::nccl::result as nc;
use cudarc::nccl::safe::{Comm, Id, ReduceOp};
use cudarc::nccl::sys as ns;
use dptrain_core::comm::Communicator;
use dptrain_core::kernels::cuda::ops as gpu;
use dptrain_core::tensor::cuda::{CudaDev, DevBuf};
use dptrain_core::{Error, GradStore, ParamId, ParamStore, Result};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn nerr(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Device(format!("NCCL {what}: {e:?}"))
}

/// One rank's NCCL communicator on its device, with its own communication stream.
pub struct NcclComm {
    comm: ns::ncclComm_t,
    rank: usize,
    world: usize,
    dev: Arc<CudaDev>,
    stream: Arc<CudaStream>,
    /// Collectives issued (for error messages).
    seq: u64,
}

// SAFETY: an ncclComm_t may be used from any thread as long as calls on it are not concurrent;
// NcclComm is only reached through `&mut self`, so they never are.
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// Joins the NCCL world of `mpi`'s ranks on device `dev` (every rank calls this).
    pub fn bootstrap(mpi: &mut dyn Communicator, dev: Arc<CudaDev>) -> Result<NcclComm> {
        if !nccl_present() {
            return Err(Error::Device("NCCL (libnccl.so) is not loadable; see DPTRAIN_NCCL_LIB in the README".into()));
        }
        let (rank, world) = (mpi.rank(), mpi.world_size());
        let mut id_bytes = if rank == 0 {
            let id = nc::get_uniqueid().map_err(|e| nerr("unique id", e))?;
            id.internal.iter().map(|&c| c as u8).collect::<Vec<u8>>()
        } else {
            vec![0u8; 128]
        };
        mpi.broadcast_bytes(&mut id_bytes, 0)?;
        if id_bytes.len() != 128 {
            return Err(Error::Device(format!("NCCL unique id of {} bytes from rank 0", id_bytes.len())));
        }
        let mut id = ns::ncclUniqueId { internal: [0; 128] };
        for (d, s) in id.internal.iter_mut().zip(&id_bytes) {
            *d = *s as std::ffi::c_char;
        }
        mpi.barrier()?;
        dev.bind()?;
        let stream = dev.ctx()?.new_stream().map_err(|e| nerr("communication stream", e))?;
        let mut comm = std::ptr::null_mut();
        // SAFETY: `comm` receives the new communicator; every rank passes the same id and its
        // own rank; the device's context is current on this thread.
        unsafe { nc::comm_init_rank(&mut comm, world as i32, id, rank as i32) }.map_err(|e| nerr("init", e))?;
        Ok(NcclComm { comm, rank, world, dev, stream, seq: 0 })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Queues an in-place average of `n` elements (f32, or bf16 when `bf16`) at `ptr` on the
    /// communication stream.
    fn all_reduce_avg(&mut self, ptr: u64, n: usize, bf16: bool) -> Result<()> {
        self.seq += 1;
        let dt = if bf16 { ns::ncclDataType_t::ncclBfloat16 } else { ns::ncclDataType_t::ncclFloat32 };
        // SAFETY: ptr addresses n live elements of the given type on this communicator's
        // device (the reducer's bucket regions); in place (send == recv) is allowed by NCCL.
        unsafe {
            nc::all_reduce(
                ptr as *const _,
                ptr as *mut _,
                n,
                dt,
                ns::ncclRedOp_t::ncclAvg,
                self.comm,
                self.stream.cu_stream() as ns::cudaStream_t,
            )
        }
        .map(|_| ())
        .map_err(|e| nerr(&format!("all_reduce #{}", self.seq), e))
    }

    /// NCCL's asynchronous error state (a failed peer or network shows up here).
    fn async_error(&self) -> Option<String> {
        let mut r = ns::ncclResult_t::ncclSuccess;
        // SAFETY: a live communicator and a valid out-pointer.
        let st = unsafe { ns::ncclCommGetAsyncError(self.comm, &mut r) };
        match (st, r) {
            (ns::ncclResult_t::ncclSuccess, ns::ncclResult_t::ncclSuccess) => None,
            (ns::ncclResult_t::ncclSuccess, ns::ncclResult_t::ncclInProgress) => None,
            (s, r) => Some(format!("{s:?} / {r:?}")),
        }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: destroyed once; pending work on the stream is finished first.
        let _ = self.stream.synchronize();
        unsafe {
            let _ = nc::comm_destroy(self.comm);
        }
    }
}

/// Bucketed in-place gradient averaging over NCCL, overlapping backward (see the module doc).
pub struct NcclReducer {
    comm: NcclComm,
    buckets: Vec<Bucket>,
    bucket_of: Vec<usize>,
    pending: Vec<usize>,
    ready: Vec<bool>,
    next_launch: usize,
    overlap: bool,
    active: bool,
    /// bf16 staging for the largest bucket (kept for the run: the communication stream uses it).
    scratch: Option<DevBuf>,
    timeout: Duration,
    launched_at: Option<Instant>,
}

impl NcclReducer {
    pub fn new(comm: NcclComm, params: &ParamStore, bucket_mb: f64, overlap: bool, bf16: bool, timeout: Duration) -> Result<NcclReducer> {
        let cap = ((bucket_mb * 1024.0 * 1024.0) as usize).max(4);
        let buckets = assign_buckets(params.infos(), (1 << 20).min(cap), cap, 4);
        let mut bucket_of = vec![0; params.len()];
        for (b, bk) in buckets.iter().enumerate() {
            for p in &bk.params {
                bucket_of[p.0] = b;
            }
        }
        let scratch = if bf16 { Some(comm.dev.alloc(buckets.iter().map(Bucket::len).max().unwrap_or(1) * 2)?) } else { None };
        let n = buckets.len();
        Ok(NcclReducer {
            pending: buckets.iter().map(|b| b.params.len()).collect(),
            buckets,
            bucket_of,
            ready: vec![false; n],
            next_launch: 0,
            overlap,
            active: false,
            scratch,
            comm,
            timeout,
            launched_at: None,
        })
    }

    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    /// Starts a backward pass; `sync` is true on the last micro-step of a step.
    pub fn begin(&mut self, sync: bool) {
        self.active = sync;
        self.next_launch = 0;
        self.launched_at = None;
        self.ready.fill(false);
        for (p, b) in self.pending.iter_mut().zip(&self.buckets) {
            *p = b.params.len();
        }
    }

    fn launch(&mut self, b: usize, grads: &GradStore, after: &CudaEvent) -> Result<()> {
        let bk = &self.buckets[b];
        if grads.flat().numel() < bk.end {
            return Err(Error::Msg("gradient store does not match the reducer's layout".into()));
        }
        self.comm.stream.wait(after).map_err(|e| nerr("stream wait", e))?;
        let region = gpu::ptr(grads.flat())? + (bk.start * 4) as u64;
        let (n, dev, stream) = (bk.len(), self.comm.dev.clone(), self.comm.stream.clone());
        match &self.scratch {
            Some(s) => {
                let sp = s.ptr;
                gpu::cast_raw_on(&dev, &stream, region, sp, n, true)?;
                self.comm.all_reduce_avg(sp, n, true)?;
                gpu::cast_raw_on(&dev, &stream, sp, region, n, false)?;
            }
            None => self.comm.all_reduce_avg(region, n, false)?,
        }
        self.launched_at.get_or_insert_with(Instant::now);
        Ok(())
    }

    fn compute_event(&self) -> Result<CudaEvent> {
        self.comm.dev.stream()?.record_event(None).map_err(|e| nerr("event", e))
    }

    /// The engine's "parameter gradient final" event: queues every bucket that became complete
    /// (in bucket order, the same on every rank).
    pub fn on_ready(&mut self, id: ParamId, grads: &GradStore) -> Result<()> {
        if !self.active {
            return Ok(());
        }
        let b = self.bucket_of[id.0];
        self.pending[b] -= 1;
        if self.pending[b] == 0 {
            self.ready[b] = true;
            if self.overlap && self.ready.get(self.next_launch).copied().unwrap_or(false) {
                let ev = self.compute_event()?;
                while self.next_launch < self.buckets.len() && self.ready[self.next_launch] {
                    self.launch(self.next_launch, grads, &ev)?;
                    self.next_launch += 1;
                }
            }
        }
        Ok(())
    }

    /// Queues the remaining buckets (all of them in one NCCL group without overlap), makes the
    /// compute stream wait for the averages, and watches for NCCL errors until they are done.
    pub fn wait_all(&mut self, grads: &mut GradStore) -> Result<ReduceStats> {
        if !self.active {
            return Ok(ReduceStats::default());
        }
        let t = Instant::now();
        if self.next_launch < self.buckets.len() {
            let ev = self.compute_event()?;
            let grouped = !self.overlap && self.scratch.is_none();
            if grouped {
                nc::group_start().map_err(|e| nerr("group start", e))?;
            }
            let mut res = Ok(());
            while self.next_launch < self.buckets.len() && res.is_ok() {
                res = self.launch(self.next_launch, grads, &ev);
                self.next_launch += 1;
            }
            if grouped {
                nc::group_end().map_err(|e| nerr("group end", e))?;
            }
            res?;
        }
        let done = self.comm.stream.record_event(None).map_err(|e| nerr("event", e))?;
        // Watchdog: poll the event and NCCL's async error state.
        loop {
            match done.try_is_complete() {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => return Err(nerr("waiting for the all-reduce", e)),
            }
            if let Some(e) = self.comm.async_error() {
                // SAFETY: aborting a communicator that reported an error, once.
                unsafe {
                    let _ = nc::comm_abort(self.comm.comm);
                }
                return Err(Error::Device(format!("NCCL all_reduce #{} failed on rank {}: {e}", self.comm.seq, self.comm.rank)));
            }
            if t.elapsed() > self.timeout {
                let seq = self.comm.seq;
                // SAFETY: as above; the job is ending.
                unsafe {
                    let _ = nc::comm_abort(self.comm.comm);
                }
                return Err(Error::Device(format!(
                    "rank {}: NCCL all_reduce #{seq} did not complete within {:.0} s (a peer died or hangs); aborting",
                    self.comm.rank,
                    self.timeout.as_secs_f64()
                )));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        self.comm.dev.stream()?.wait(&done).map_err(|e| nerr("stream wait", e))?;
        self.active = false;
        let comm_s = self.launched_at.map(|l| l.elapsed().as_secs_f64()).unwrap_or(0.0);
        Ok(ReduceStats { comm_s, wait_s: t.elapsed().as_secs_f64() })
    }
}

/// Averages a random buffer over a 1-rank NCCL communicator on device `ordinal`; returns the
/// largest absolute difference from the input (0 when NCCL works).
pub fn single_rank_all_reduce(ordinal: usize, n: usize) -> std::result::Result<f64, String> {
    if !nccl_present() {
        return Err("NCCL (libnccl.so) not loadable; see DPTRAIN_NCCL_LIB".into());
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| format!("{e:?}"))?;
    let stream = ctx.default_stream();
    let host: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0).collect();
    let send = stream.clone_htod(&host).map_err(|e| format!("{e:?}"))?;
    let mut recv = stream.alloc_zeros::<f32>(n).map_err(|e| format!("{e:?}"))?;
    let id = Id::new().map_err(|e| format!("{e:?}"))?;
    let comm = Comm::from_rank(stream.clone(), 0, 1, id).map_err(|e| format!("{e:?}"))?;
    comm.all_reduce(&send, &mut recv, &ReduceOp::Avg).map_err(|e| format!("{e:?}"))?;
    let out = stream.clone_dtoh(&recv).map_err(|e| format!("{e:?}"))?;
    Ok(out.iter().zip(&host).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max))
}

/// True when cudarc can load NCCL (`libnccl.so` on the library path).
pub fn nccl_present() -> bool {
    // SAFETY: only tries to load the library.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}
