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
//! the communication stream and returns: the host does not wait for the reductions (only on a
//! step that measures them, a logging step, which waits anyway). A watchdog thread
//! ([`nccl_watchdog`](crate::nccl_watchdog)) watches each pass's completion event and NCCL's
//! asynchronous error state (a dead peer, a network failure) and ends the rank naming the
//! collective after `comm.timeout_s`: the watchdog of the CPU path, for NCCL. With
//! `comm.dtype = "bf16"` a bucket is cast to bf16 on the communication stream, averaged as bf16
//! (half the bytes), and cast back.
//!
//! **Inside a CUDA graph.** Nothing here waits for the device, so a captured training step can
//! hold the reductions: the event waits between the compute and the communication stream are
//! the fork and join that bring the communication stream into the capture, and NCCL's kernels
//! are captured as any others (NCCL supports stream capture). Events recorded inside a capture
//! cannot be queried, so none goes to the watchdog then; after each launch of the graph the
//! trainer calls [`NcclReducer::after_replay`], which hands it one event after the graph. On
//! the emulator the host collective standing in for NCCL is recorded as an operation of the
//! stream (`CudaDev::emulated_host_op`) and runs at each replay, in order with the kernels.
//!
//! Also here: the single-rank all-reduce that `dptrain gpu-check` runs.

use crate::bucket::{Bucket, BucketSchedule};
use crate::nccl_watchdog::{Polling, Watchdog};
use crate::reducer::ReduceStats;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};
use cudarc::nccl::result as nc;
use cudarc::nccl::safe::{Comm, Id, ReduceOp};
use cudarc::nccl::sys as ns;
use dptrain_core::comm::Communicator;
use dptrain_core::tensor::cuda::{CudaDev, DevBuf, DevRegion};
use dptrain_core::{DType, Error, GradStore, ParamId, ParamStore, Result, Tape, Var};
use std::sync::{Arc, Mutex};
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
    /// Watches the queued reductions (NCCL only; made by `start_watchdog`).
    watchdog: Option<Watchdog>,
}

/// The host communicator standing in for NCCL on the emulator, shared with the operations a
/// capture records, and the first error one of them met (reported by the next call).
#[derive(Clone)]
struct EmulatedNccl {
    host: Arc<Mutex<Box<dyn Communicator>>>,
    failed: Arc<Mutex<Option<Error>>>,
}

enum Backend {
    Nccl { comm: ns::ncclComm_t, stream: Arc<CudaStream> },
    Emulated(EmulatedNccl),
}

/// A communicator handle the watchdog thread reads NCCL's error state through.
struct CommHandle(ns::ncclComm_t);
// SAFETY: ncclCommGetAsyncError may be called from another thread while the communicator is in
// use (NCCL's documented way to watch for errors, what PyTorch's watchdog does); the handle
// outlives the thread (NcclComm's Drop stops the watchdog before destroying the communicator).
unsafe impl Send for CommHandle {}

impl CommHandle {
    /// NCCL's asynchronous error state (a failed peer or network shows up here).
    fn async_error(&self) -> Option<String> {
        let mut r = ns::ncclResult_t::ncclSuccess;
        // SAFETY: a live communicator (see above) and a valid out-pointer.
        let st = unsafe { ns::ncclCommGetAsyncError(self.0, &mut r) };
        match (st, r) {
            (ns::ncclResult_t::ncclSuccess, ns::ncclResult_t::ncclSuccess) => None,
            (ns::ncclResult_t::ncclSuccess, ns::ncclResult_t::ncclInProgress) => None,
            (s, r) => Some(format!("{s:?} / {r:?}")),
        }
    }
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
            let em = EmulatedNccl { host: Arc::new(Mutex::new(host)), failed: Arc::default() };
            return Ok(NcclComm { backend: Backend::Emulated(em), rank, world, dev, seq: 0, watchdog: None });
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
        Ok(NcclComm { backend: Backend::Nccl { comm, stream }, rank, world, dev, seq: 0, watchdog: None })
    }

    /// The watchdog thread over this communicator: a stuck or failed reduction ends the rank
    /// with one line (exit code 3, as the MPI watchdog's).
    fn start_watchdog(&mut self, timeout: Duration) -> Result<()> {
        let Backend::Nccl { comm, .. } = &self.backend else { return Ok(()) };
        let handle = CommHandle(*comm);
        let dog = Watchdog::start(
            self.rank,
            timeout,
            Polling::default(),
            Box::new(move || handle.async_error()),
            Box::new(|line| {
                eprintln!("{line}");
                std::process::exit(3);
            }),
        )
        .map_err(|e| Error::Msg(format!("NCCL watchdog thread: {e}")))?;
        self.watchdog = Some(dog);
        Ok(())
    }

    /// Has the watchdog watch `done` (an event after the work `what` names).
    fn watch(&self, what: String, done: Arc<CudaEvent>) {
        if let Some(w) = &self.watchdog {
            w.watch(
                what,
                Box::new(move || {
                    done.context().bind_to_thread().map_err(|e| format!("{e:?}"))?;
                    done.try_is_complete().map_err(|e| format!("{e:?}"))
                }),
            );
        }
    }

    /// The first error an emulated collective recorded in a capture met at a replay.
    fn emulated_failure(&self) -> Result<()> {
        if let Backend::Emulated(em) = &self.backend {
            if let Some(e) = em.failed.lock().map_err(|_| Error::Device("emulated NCCL poisoned".into()))?.take() {
                return Err(e);
            }
        }
        Ok(())
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
            Backend::Emulated(em) => {
                // An operation of the emulated stream: run now, or recorded by a capture and
                // run by its replays (its error then reported by the next call that checks).
                let (em, ptr) = (em.clone(), ptr as usize);
                let em_op = em.clone();
                self.dev.emulated_host_op(move || {
                    if let Err(e) = emulated_avg(&em_op.host, ptr, n, bf16, world) {
                        if let Ok(mut f) = em_op.failed.lock() {
                            f.get_or_insert(e);
                        }
                    }
                })?;
                if self.dev.is_capturing() {
                    return Ok(());
                }
                let failed = em.failed.lock().map_err(|_| Error::Device("emulated NCCL poisoned".into()))?.take();
                failed.map_or(Ok(()), Err)
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

    fn group(&self, start: bool) -> Result<()> {
        if let Backend::Nccl { .. } = &self.backend {
            let r = if start { nc::group_start() } else { nc::group_end() };
            r.map_err(|e| nerr("group", e))?;
        }
        Ok(())
    }
}

/// The emulator's NCCL average: the host communicator's sum or average of the region.
fn emulated_avg(host: &Mutex<Box<dyn Communicator>>, ptr: usize, n: usize, bf16: bool, world: usize) -> Result<()> {
    let mut host = host.lock().map_err(|_| Error::Device("emulated NCCL poisoned".into()))?;
    // SAFETY: on the emulator device memory is host memory; ptr addresses n live elements of
    // the given type (the reducer's bucket or its bf16 staging; a graph that recorded this
    // keeps both alive: the gradients outlive it, the staging is the reducer's for the run).
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

impl Drop for NcclComm {
    fn drop(&mut self) {
        if let Backend::Nccl { comm, stream } = &self.backend {
            // Pending work on the stream is finished first, under the watchdog (a peer that
            // hangs now still ends the rank); then the watchdog stops, then the communicator
            // it reads goes.
            let _ = stream.synchronize();
            self.watchdog = None;
            // SAFETY: destroyed once, after the last user (the watchdog) stopped.
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
    launched_at: Option<Instant>,
    /// The next pass is measured: its end waited for on the host (see `measure_next`).
    measure: bool,
    /// The communicator's collective count when the pass began (for the watchdog's names).
    seq_at_begin: u64,
}

impl NcclReducer {
    /// `timeout`: how long the watchdog lets a reduction run before it ends the rank.
    pub fn new(
        mut comm: NcclComm,
        params: &ParamStore,
        bucket_mb: f64,
        overlap: bool,
        bf16: bool,
        timeout: Duration,
    ) -> Result<NcclReducer> {
        let sched = BucketSchedule::new(params.infos(), bucket_mb);
        let largest = sched.buckets().iter().map(Bucket::len).max().unwrap_or(1);
        let scratch = if bf16 { Some(comm.dev.alloc(largest * 2)?) } else { None };
        comm.start_watchdog(timeout)?;
        Ok(NcclReducer { sched, overlap, active: false, scratch, comm, launched_at: None, measure: true, seq_at_begin: 0 })
    }

    /// Whether the next synchronising pass is measured: `wait_all` then waits on the host for
    /// the reductions and reports how long they ran and how long the host waited (a logging
    /// step's numbers; that step waits for the device anyway). Otherwise it returns at once and
    /// the watchdog alone sees the reductions finish. Never waits inside a capture.
    pub fn measure_next(&mut self, on: bool) {
        self.measure = on;
    }

    /// After each launch of a CUDA graph that captured this reducer's passes: the watchdog
    /// watches the graph's reductions through one event after it (on the emulator: the first
    /// error of the replayed host collectives, if any).
    pub fn after_replay(&mut self) -> Result<()> {
        self.comm.emulated_failure()?;
        if let Some(ev) = self.comm.compute_event()? {
            self.comm.watch("all-reduces of a replayed CUDA graph of the training step".into(), Arc::new(ev));
        }
        Ok(())
    }

    pub fn buckets(&self) -> &[Bucket] {
        self.sched.buckets()
    }

    /// Starts a backward pass; `sync` is true on the last micro-step of a step.
    pub fn begin(&mut self, sync: bool) {
        self.active = sync;
        self.launched_at = None;
        self.seq_at_begin = self.comm.seq;
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
    /// compute stream wait for the averages and hands their end to the watchdog; waits for
    /// them only when the pass is measured (`measure_next`).
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
            // The join: later work on the compute stream (the optimizer) runs after the averages.
            self.comm.dev.stream()?.wait(&done).map_err(|e| nerr("stream wait", e))?;
            // Inside a capture the event cannot be queried: the replays are watched instead.
            if !self.comm.dev.is_capturing() {
                let done = Arc::new(done);
                let what = format!("all_reduce #{}–#{} (rank {}'s gradient buckets)", self.seq_at_begin + 1, self.comm.seq, self.comm.rank);
                self.comm.watch(what, done.clone());
                if self.measure {
                    // A measured pass: wait here, watched (a hang ends the rank from the watchdog).
                    done.synchronize().map_err(|e| nerr("waiting for the all-reduce", e))?;
                }
            }
        }
        self.comm.emulated_failure()?;
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
    fn measure_next(&mut self, on: bool) {
        NcclReducer::measure_next(self, on)
    }
    fn after_replay(&mut self) -> Result<()> {
        NcclReducer::after_replay(self)
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

/// gpu-check's NCCL-in-a-graph row: the reducer's whole pass (bf16 staging casts and 4
/// buckets' all-reduces on the communication stream, forked from and joined to the compute
/// stream) captured on a 1-rank communicator after a kernel that doubles the gradients, then
/// the graph replayed on three new gradients, each replay watched by the watchdog. Returns the
/// largest absolute difference from the expected averages (2g rounded to bf16; 0 when the
/// capture holds the pass in order).
pub fn single_rank_reducer_in_graph(ordinal: usize) -> std::result::Result<f64, String> {
    use dptrain_core::params::{Init, ParamBuilder, Role};
    use dptrain_core::tensor::cuda::GraphInputs;
    struct NoInputs;
    impl GraphInputs for NoInputs {
        fn host_ranges(&self) -> Vec<(usize, usize)> {
            vec![]
        }
    }
    let s = |e: Error| e.to_string();
    let dev = dptrain_core::tensor::cuda::dev(ordinal).map_err(s)?;
    let device = dptrain_core::Device::Cuda(ordinal);
    let mut b = ParamBuilder::new();
    for i in 0..4 {
        b.add(&format!("w{i}"), &[256, 1024], Role::Hidden, 1024, 256, Init::Normal { std: 0.02 });
    }
    let mut params = b.build(1, DType::F32).map_err(s)?;
    params.to_device(device).map_err(s)?;
    let mut grads = GradStore::try_new(&params).map_err(s)?;
    // On the emulator (gpu-check's CI run) a host communicator stands in for NCCL.
    let host = dev.is_emulated().then(|| Box::new(crate::LocalComm::new()) as Box<dyn Communicator>);
    let comm = NcclComm::bootstrap(&mut crate::LocalComm::new(), dev.clone(), host).map_err(s)?;
    // 1 MiB buckets: one per parameter.
    let mut red = NcclReducer::new(comm, &params, 1.0, true, true, Duration::from_secs(60)).map_err(s)?;
    let n = params.numel();
    let values = |round: usize| (0..n).map(|i| (((i * 7919 + round * 104729) % 2001) as f32 - 1000.0) * 1e-3).collect::<Vec<f32>>();
    let set = |grads: &mut GradStore, v: &[f32]| -> Result<()> {
        let src = dptrain_core::Tensor::from_slice(v, &[v.len()])?.to_device(device)?;
        dptrain_core::ops::flat::copy_into_cuda(grads.flat(), &src)
    };
    set(&mut grads, &values(0)).map_err(s)?;
    let (graph, ()) = dev
        .capture(NoInputs, |_| {
            dptrain_core::ops::flat::scale_in_place(grads.flat_tensor_mut(), 2.0)?;
            crate::GradSync::reduce_all(&mut red, &mut grads).map(|_| ())
        })
        .map_err(s)?;
    let mut worst = 0f64;
    for round in 1..=3 {
        let v = values(round);
        set(&mut grads, &v).map_err(s)?;
        graph.replay().map_err(s)?;
        red.after_replay().map_err(s)?;
        let got = grads.flat().to_vec::<f32>().map_err(s)?;
        for (g, x) in got.iter().zip(&v) {
            worst = worst.max((g - half::bf16::from_f32(2.0 * x).to_f32()).abs() as f64);
        }
    }
    Ok(worst)
}

/// True when cudarc can load NCCL (`libnccl.so` on the library path).
pub fn nccl_present() -> bool {
    // SAFETY: only tries to load the library.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}
