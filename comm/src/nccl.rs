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

use crate::bucket::{Bucket, BucketSchedule};
use crate::reducer::ReduceStats;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};
use cudarc::nccl::result as nc;
use cudarc::nccl::safe::{Comm, Id, ReduceOp};
use cudarc::nccl::sys as ns;
use dptrain_core::comm::Communicator;
use dptrain_core::tensor::cuda::{CudaDev, DevBuf, DevRegion};
use dptrain_core::{DType, Error, GradStore, ParamId, ParamStore, Result, Tape, Var};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn nerr(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Device(format!("NCCL {what}: {e:?}"))
}

/// One rank's NCCL communicator on its device, with its own communication stream — or, on the
/// CPU emulator of the CUDA kernels (tests), a host communicator standing in for NCCL (the
/// emulated device memory is host memory), so the reducer's logic runs in CI under mpirun.
pub struct NcclComm {
    backend: Backend,
    rank: usize,
    world: usize,
    dev: Arc<CudaDev>,
    /// Collectives issued (for error messages).
    seq: u64,
}

enum Backend {
    Nccl { comm: ns::ncclComm_t, stream: Arc<CudaStream> },
    Emulated(Box<dyn Communicator>),
}

// SAFETY: an ncclComm_t may be used from any thread as long as calls on it are not concurrent;
// NcclComm is only reached through `&mut self`, so they never are. The emulated backend's
// communicator is Send.
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// Joins the NCCL world of `mpi`'s ranks on device `dev` (every rank calls this). On the
    /// emulated device, `host` (a communicator of the same ranks) carries the reductions.
    pub fn bootstrap(mpi: &mut dyn Communicator, dev: Arc<CudaDev>, host: Option<Box<dyn Communicator>>) -> Result<NcclComm> {
        let (rank, world) = (mpi.rank(), mpi.world_size());
        if dev.is_emulated() {
            let host = host.ok_or_else(|| Error::Device("the emulated NCCL needs a host communicator".into()))?;
            return Ok(NcclComm { backend: Backend::Emulated(host), rank, world, dev, seq: 0 });
        }
        if !nccl_present() {
            return Err(Error::Device("NCCL (libnccl.so) is not loadable; see DPTRAIN_NCCL_LIB in the README".into()));
        }
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
        Ok(NcclComm { backend: Backend::Nccl { comm, stream }, rank, world, dev, seq: 0 })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Makes the communication stream wait for `ev` (recorded on the compute stream).
    fn wait_for(&self, ev: Option<&CudaEvent>) -> Result<()> {
        match (&self.backend, ev) {
            (Backend::Nccl { stream, .. }, Some(ev)) => stream.wait(ev).map_err(|e| nerr("stream wait", e)),
            _ => Ok(()),
        }
    }

    /// An event on the compute stream (none on the emulator, where everything is in order).
    fn compute_event(&self) -> Result<Option<CudaEvent>> {
        match &self.backend {
            Backend::Nccl { .. } => self.dev.stream()?.record_event(None).map(Some).map_err(|e| nerr("event", e)),
            Backend::Emulated(_) => Ok(None),
        }
    }

    /// f32 ↔ bf16 cast between two regions of the same length, on the communication stream.
    fn cast(&self, src: DevRegion, dst: DevRegion) -> Result<()> {
        let stream = match &self.backend {
            Backend::Nccl { stream, .. } => Some(stream.as_ref()),
            Backend::Emulated(_) => None,
        };
        dptrain_core::ops::flat::cast_region(&self.dev, src, dst, stream)
    }

    /// Queues an in-place average of a region (f32 or bf16) on the communication stream.
    fn all_reduce_avg(&mut self, r: DevRegion) -> Result<()> {
        let (ptr, n) = (r.ptr, r.len);
        let bf16 = match r.dtype {
            DType::F32 => false,
            DType::BF16 => true,
            other => return Err(Error::Msg(format!("all-reduce of {other} gradients: expected f32 or bf16"))),
        };
        self.seq += 1;
        let world = self.world;
        match &mut self.backend {
            Backend::Nccl { comm, stream } => {
                let dt = if bf16 { ns::ncclDataType_t::ncclBfloat16 } else { ns::ncclDataType_t::ncclFloat32 };
                // SAFETY: ptr addresses n live elements of the given type on this
                // communicator's device (the reducer's bucket regions); in place (send ==
                // recv) is allowed by NCCL.
                unsafe {
                    nc::all_reduce(
                        ptr as *const _,
                        ptr as *mut _,
                        n,
                        dt,
                        ns::ncclRedOp_t::ncclAvg,
                        *comm,
                        stream.cu_stream() as ns::cudaStream_t,
                    )
                }
                .map(|_| ())
                .map_err(|e| nerr(&format!("all_reduce #{}", self.seq), e))
            }
            Backend::Emulated(host) => {
                // SAFETY: on the emulator device memory is host memory; ptr addresses n live
                // elements of the given type (the reducer's bucket or its bf16 staging).
                if bf16 {
                    let v = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u16, n) };
                    host.all_reduce_bf16_sum(v)?;
                    let inv = 1.0 / world as f32;
                    v.iter_mut().for_each(|b| *b = half::bf16::from_f32(half::bf16::from_bits(*b).to_f32() * inv).to_bits());
                    Ok(())
                } else {
                    let v = unsafe { std::slice::from_raw_parts_mut(ptr as *mut f32, n) };
                    host.all_reduce(v, dptrain_core::comm::ReduceOp::Avg)
                }
            }
        }
    }

    /// An event after everything queued on the communication stream.
    fn record_done(&self) -> Result<Option<CudaEvent>> {
        match &self.backend {
            Backend::Nccl { stream, .. } => stream.record_event(None).map(Some).map_err(|e| nerr("event", e)),
            Backend::Emulated(_) => Ok(None),
        }
    }

    /// NCCL's asynchronous error state (a failed peer or network shows up here).
    fn async_error(&self) -> Option<String> {
        let Backend::Nccl { comm, .. } = &self.backend else { return None };
        let mut r = ns::ncclResult_t::ncclSuccess;
        // SAFETY: a live communicator and a valid out-pointer.
        let st = unsafe { ns::ncclCommGetAsyncError(*comm, &mut r) };
        match (st, r) {
            (ns::ncclResult_t::ncclSuccess, ns::ncclResult_t::ncclSuccess) => None,
            (ns::ncclResult_t::ncclSuccess, ns::ncclResult_t::ncclInProgress) => None,
            (s, r) => Some(format!("{s:?} / {r:?}")),
        }
    }

    fn abort(&self) {
        if let Backend::Nccl { comm, .. } = &self.backend {
            // SAFETY: aborting a live communicator; the job is ending.
            unsafe {
                let _ = nc::comm_abort(*comm);
            }
        }
    }

    fn group(&self, start: bool) -> Result<()> {
        if let Backend::Nccl { .. } = &self.backend {
            let r = if start { nc::group_start() } else { nc::group_end() };
            r.map_err(|e| nerr("group", e))?;
        }
        Ok(())
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if let Backend::Nccl { comm, stream } = &self.backend {
            // SAFETY: destroyed once; pending work on the stream is finished first.
            let _ = stream.synchronize();
            unsafe {
                let _ = nc::comm_destroy(*comm);
            }
        }
    }
}

/// Bucketed in-place gradient averaging over NCCL, overlapping backward (see the module doc).
pub struct NcclReducer {
    comm: NcclComm,
    sched: BucketSchedule,
    overlap: bool,
    active: bool,
    /// bf16 staging for the largest bucket (kept for the run: the communication stream uses it).
    scratch: Option<DevBuf>,
    timeout: Duration,
    launched_at: Option<Instant>,
}

impl NcclReducer {
    pub fn new(comm: NcclComm, params: &ParamStore, bucket_mb: f64, overlap: bool, bf16: bool, timeout: Duration) -> Result<NcclReducer> {
        let sched = BucketSchedule::new(params.infos(), bucket_mb);
        let largest = sched.buckets().iter().map(Bucket::len).max().unwrap_or(1);
        let scratch = if bf16 { Some(comm.dev.alloc(largest * 2)?) } else { None };
        Ok(NcclReducer { sched, overlap, active: false, scratch, comm, timeout, launched_at: None })
    }

    pub fn buckets(&self) -> &[Bucket] {
        self.sched.buckets()
    }

    /// Starts a backward pass; `sync` is true on the last micro-step of a step.
    pub fn begin(&mut self, sync: bool) {
        self.active = sync;
        self.launched_at = None;
        self.sched.begin();
    }

    fn launch(&mut self, b: usize, grads: &GradStore, after: Option<&CudaEvent>) -> Result<()> {
        let bk = &self.sched.buckets()[b];
        if grads.flat().numel() < bk.end {
            return Err(Error::Msg("gradient store does not match the reducer's layout".into()));
        }
        self.comm.wait_for(after)?;
        let region = grads.flat().device_region(bk.start, bk.len())?;
        match &self.scratch {
            Some(s) => {
                let staged = s.region(DType::BF16, region.len)?;
                self.comm.cast(region, staged)?;
                self.comm.all_reduce_avg(staged)?;
                self.comm.cast(staged, region)?;
            }
            None => self.comm.all_reduce_avg(region)?,
        }
        self.launched_at.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// The engine's "parameter gradient final" event: queues every bucket that became complete
    /// (in bucket order, the same on every rank).
    pub fn on_ready(&mut self, id: ParamId, grads: &GradStore) -> Result<()> {
        if !self.active {
            return Ok(());
        }
        self.sched.finish(id);
        if self.overlap {
            // One event on the compute stream covers every bucket launched now.
            let mut ev = None;
            while let Some(b) = self.sched.next_ready() {
                if ev.is_none() {
                    ev = Some(self.comm.compute_event()?);
                }
                self.launch(b, grads, ev.as_ref().and_then(|e| e.as_ref()))?;
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
        if self.sched.unlaunched() {
            let ev = self.comm.compute_event()?;
            let grouped = !self.overlap && self.scratch.is_none();
            if grouped {
                self.comm.group(true)?;
            }
            let mut res = Ok(());
            while let Some(b) = self.sched.next_unlaunched() {
                res = self.launch(b, grads, ev.as_ref());
                if res.is_err() {
                    break;
                }
            }
            if grouped {
                self.comm.group(false)?;
            }
            res?;
        }
        if let Some(done) = self.comm.record_done()? {
            // Watchdog: poll the event and NCCL's async error state.
            loop {
                match done.try_is_complete() {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(e) => return Err(nerr("waiting for the all-reduce", e)),
                }
                if let Some(e) = self.comm.async_error() {
                    self.comm.abort();
                    return Err(Error::Device(format!("NCCL all_reduce #{} failed on rank {}: {e}", self.comm.seq, self.comm.rank)));
                }
                if t.elapsed() > self.timeout {
                    self.comm.abort();
                    return Err(Error::Device(format!(
                        "rank {}: NCCL all_reduce #{} did not complete within {:.0} s (a peer died or hangs); aborting",
                        self.comm.rank,
                        self.comm.seq,
                        self.timeout.as_secs_f64()
                    )));
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            self.comm.dev.stream()?.wait(&done).map_err(|e| nerr("stream wait", e))?;
        }
        self.active = false;
        let comm_s = self.launched_at.map(|l| l.elapsed().as_secs_f64()).unwrap_or(0.0);
        Ok(ReduceStats { comm_s, wait_s: t.elapsed().as_secs_f64() })
    }
}

impl crate::sync::BucketSync for NcclReducer {
    fn begin(&mut self, sync: bool) {
        NcclReducer::begin(self, sync)
    }
    unsafe fn on_ready(&mut self, id: ParamId, grads: &GradStore) -> Result<()> {
        NcclReducer::on_ready(self, id, grads)
    }
    fn wait_all(&mut self, grads: &mut GradStore) -> Result<ReduceStats> {
        NcclReducer::wait_all(self, grads)
    }
}

impl crate::GradSync for NcclReducer {
    fn buckets(&self) -> &[Bucket] {
        NcclReducer::buckets(self)
    }
    fn backward(&mut self, tape: &Tape, loss: Var<'_>, grads: &mut GradStore, sync: bool) -> Result<Option<ReduceStats>> {
        crate::sync::backward_with(self, tape, loss, grads, sync)
    }
    fn reduce_all(&mut self, grads: &mut GradStore) -> Result<ReduceStats> {
        crate::sync::reduce_all_with(self, grads)
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
