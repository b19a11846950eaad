//! CUDA graphs: a steady-state training step captured once and replayed as one launch, so a
//! small model is not bound by the host's per-kernel launch cost (the "GPU busy %"
//! tells when that is the case).
//!
//! What capture needs from the engine, and where it is done:
//! - **Stable memory.** A graph bakes in every address it touches. While capturing, the caching
//!   allocator serves the step from a private pool ([`GraphPool`]): blocks it takes from the
//!   device's cache stay the graph's until the graph and every tensor from the pool are gone,
//!   so nothing outside the step can be handed a block the replays write (PyTorch's
//!   `torch.cuda.graph` keeps a private pool for the same reason). A block from before the
//!   capture that the step frees joins the pool too: the replays still use it. One that the
//!   step only reads or writes (parameters, gradients, optimizer state) must outlive the graph
//!   and stay where it is: the caller's part, as with PyTorch's static tensors.
//! - **Inputs in place.** A host-to-device copy from pageable memory cannot be captured, and the
//!   host code that made a batch does not run at replay. The step's token ids are uploaded with
//!   [`CudaDev::upload_input`]; inside a capture that binds a device buffer to the host range,
//!   and each replay copies the range again from the inputs the graph owns (which the caller
//!   refills through [`StepGraph::inputs_mut`]) before launching the graph. Those copies land
//!   before anything of the step runs, so a bound buffer is a block no earlier operation of the
//!   capture used (never a freed block of the pool, which an earlier kernel would overwrite).
//!   Any other upload, download or wait inside a capture is an error naming it.
//! - **Scalars on the device.** Kernel arguments are baked in too, so what changes between steps
//!   must be read by the kernels from device memory: AdamW's step count and bias corrections
//!   come from its gate, its learning rate and decay from a [`HostScalars`] cell uploaded with
//!   [`CudaDev::upload_scalars`] (bound like an input: the graph uploads the cell's current
//!   values before each replay), and so do the micro-steps' dropout keys
//!   (`ops::dropout::StepKeys`): the kernels derive each mask's key from them.
//! - **Warm-up first.** State made lazily on a first step (optimizer moments, the bf16 weight
//!   copy, the ones vector of reductions) must exist before capture, or its initialisation would
//!   be replayed every step; growing the ones vector inside a capture is an error.
//!
//! On the CPU emulator a capture records each operation — kernel launches with their
//! arguments' values (their sizes come from the kernels' signatures), GEMMs, copies, memsets —
//! instead of running it, and a replay runs the record: as on a GPU, nothing of the step runs
//! at capture, so a host step that needs a result of the device inside the step fails there too.

use super::{derr, CudaDev, DevBuf};
use crate::error::{Error, Result};
use crate::tensor::cache::SizeCache;
use std::sync::{Arc, Mutex};

/// What a capture is recording into.
pub(super) struct CaptureState {
    pub(super) pool: Arc<GraphPool>,
    /// The emulator's record (empty on a GPU, where the driver records).
    pub(super) ops: Vec<EmuOp>,
    pub(super) bindings: Vec<Binding>,
}

/// One operation the emulator recorded.
pub(super) enum EmuOp {
    /// A kernel launch: the kernel, grid and block, and each argument's bytes (8-aligned).
    #[cfg_attr(not(feature = "cuda-emu"), allow(dead_code))]
    Launch { f: super::emu::Launch, grid: u32, block: u32, args: Vec<Vec<u64>> },
    /// Anything else the emulator does on the host (GEMMs, copies, memsets).
    Host(Box<dyn Fn() + Send + Sync>),
}

impl EmuOp {
    fn run(&self) {
        match self {
            EmuOp::Launch { f, grid, block, args } => {
                // The emulator's built-ins (threadIdx, blockIdx, its block scheduler) are
                // process globals: one launch at a time, from whichever host thread (in-process
                // ranks sharing the emulated device), as the launches of one stream would run.
                static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
                let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
                let mut ptrs: Vec<*mut std::ffi::c_void> = args.iter().map(|a| a.as_ptr() as *mut std::ffi::c_void).collect();
                // SAFETY: the values were copied from a launch whose arguments matched the
                // kernel's signature, at the sizes the signature declares; the buffers they
                // point to belong to the graph's pool or outlive it (the capture's contract).
                unsafe { f(*grid, *block, ptrs.as_mut_ptr()) }
            }
            EmuOp::Host(f) => f(),
        }
    }
}

/// A device buffer refilled from host memory before each replay: a range of the graph's inputs,
/// or a cell of scalars the graph keeps alive.
pub(super) enum Binding {
    Input { host: usize, bytes: usize, dev: u64 },
    Scalars { cell: HostScalars, bytes: usize, dev: u64 },
}

/// Host values a step uploads that change between replays (a learning rate, dropout keys): a
/// graph that captured their upload keeps the cell and uploads its current values before each
/// replay. Values are 8-byte words: f64 ([`set`](Self::set)) or u64 ([`set_words`](Self::set_words)).
#[derive(Clone, Default)]
pub struct HostScalars(Arc<Mutex<Vec<u64>>>);

impl HostScalars {
    pub fn set(&self, v: &[f64]) {
        self.set_words(&v.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
    }

    pub fn set_words(&self, v: &[u64]) {
        if let Ok(mut c) = self.0.lock() {
            c.clear();
            c.extend_from_slice(v);
        }
    }

    pub fn words(&self) -> Vec<u64> {
        self.0.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

/// The private pool of a graph: blocks taken from the device's cache during capture, free
/// ones reused by later allocations of the same capture, all returned to the cache when the
/// graph and the last tensor allocated from the pool are dropped.
pub(super) struct GraphPool {
    dev: Arc<CudaDev>,
    free: Mutex<SizeCache<u64>>,
    owned: Mutex<Vec<(usize, u64)>>,
}

impl GraphPool {
    /// A block of `class` bytes that no earlier operation of the capture has used, from the
    /// device's cache: a bound input's buffer (written before the replay runs anything, so a
    /// block an earlier operation writes would be overwritten under it).
    fn take_fresh(&self, class: usize) -> Result<u64> {
        let b = self.dev.alloc_cached(class)?;
        let p = b.ptr;
        std::mem::forget(b);
        self.owned.lock().map_err(|_| Error::Device("graph pool poisoned".into()))?.push((class, p));
        Ok(p)
    }

    /// A block of `class` bytes: a free one of the pool, else one from the device's cache.
    pub(super) fn take(&self, class: usize) -> Result<u64> {
        let mut free = self.free.lock().map_err(|_| Error::Device("graph pool poisoned".into()))?;
        let mut fresh = false;
        let ptr = free.take(
            class,
            |c| {
                fresh = true;
                self.dev.alloc_cached(c).map(|b| {
                    let p = b.ptr;
                    // The block is the pool's now: it goes back to the cache with the pool.
                    std::mem::forget(b);
                    p
                })
            },
            |_, _| {},
        )?;
        if fresh {
            self.owned.lock().map_err(|_| Error::Device("graph pool poisoned".into()))?.push((class, ptr));
        }
        Ok(ptr)
    }

    /// Takes over a block of the device's cache that was in use before the capture (returned
    /// to the cache with the pool).
    pub(super) fn adopt(&self, class: usize, ptr: u64) {
        if let Ok(mut o) = self.owned.lock() {
            o.push((class, ptr));
        }
        self.give(class, ptr);
    }

    pub(super) fn give(&self, class: usize, ptr: u64) {
        if let Ok(mut f) = self.free.lock() {
            f.give(class, ptr);
        }
    }
}

impl Drop for GraphPool {
    fn drop(&mut self) {
        if let (Ok(mut cache), Ok(owned)) = (self.dev.cache.lock(), self.owned.lock()) {
            for &(class, ptr) in owned.iter() {
                cache.give(class, ptr);
            }
        }
    }
}

/// The host data a step uploads with [`CudaDev::upload_input`], owned by its graph: each
/// replay copies the bound ranges again, so the ranges must still be where they were at capture
/// (refill them in place; [`StepGraph::replay`] checks).
pub trait GraphInputs {
    /// (address, bytes) of every host buffer the step may upload from.
    fn host_ranges(&self) -> Vec<(usize, usize)>;
}

/// Several micro-steps' inputs.
impl<T: GraphInputs> GraphInputs for Vec<T> {
    fn host_ranges(&self) -> Vec<(usize, usize)> {
        self.iter().flat_map(GraphInputs::host_ranges).collect()
    }
}

/// A captured step: replay it with [`StepGraph::replay`] after refilling its inputs.
pub struct StepGraph<I> {
    dev: Arc<CudaDev>,
    inputs: Box<I>,
    bindings: Vec<Binding>,
    ops: Vec<EmuOp>,
    real: Option<cudarc::driver::CudaGraph>,
    // Dropped after the graph, which is the last user of its blocks.
    _pool: Arc<GraphPool>,
}

impl<I: GraphInputs> StepGraph<I> {
    /// The inputs the step reads: refill them in place (same lengths) before the next replay.
    pub fn inputs_mut(&mut self) -> &mut I {
        &mut self.inputs
    }

    pub fn inputs(&self) -> &I {
        &self.inputs
    }

    /// Launches the step: its inputs copied to the device, then the graph (one launch on a GPU;
    /// the record on the emulator). Does not wait for the device.
    pub fn replay(&self) -> Result<()> {
        if !bound_within(&self.bindings, self.inputs.as_ref()) {
            return Err(Error::Device("a CUDA graph's inputs were moved or shortened since its capture; capture the step again".into()));
        }
        for b in &self.bindings {
            match b {
                Binding::Input { host, bytes, dev } => {
                    // SAFETY: the range lies inside a live buffer of the inputs (checked above).
                    let src = unsafe { std::slice::from_raw_parts(*host as *const u8, *bytes) };
                    self.dev.write(*dev, src)?;
                }
                Binding::Scalars { cell, bytes, dev } => {
                    let values = cell.words();
                    if values.len() * 8 != *bytes {
                        return Err(Error::Device("a CUDA graph's scalars changed in number since its capture".into()));
                    }
                    self.dev.write(*dev, &values)?;
                }
            }
        }
        match &self.real {
            Some(g) => g.launch().map_err(|e| derr("launching a CUDA graph", e)),
            None => {
                self.ops.iter().for_each(EmuOp::run);
                Ok(())
            }
        }
    }

    /// Kernel launches, GEMMs, copies and memsets in the graph (the emulator's count; on a GPU
    /// the driver's node count).
    pub fn nodes(&self) -> Result<usize> {
        match &self.real {
            Some(g) => {
                let mut n = 0usize;
                // SAFETY: a null node array asks for the count only.
                unsafe { cudarc::driver::sys::cuGraphGetNodes(g.cu_graph(), std::ptr::null_mut(), &mut n) }
                    .result()
                    .map_err(|e| derr("counting a CUDA graph's nodes", e))?;
                Ok(n)
            }
            None => Ok(self.ops.len()),
        }
    }
}

/// Whether every bound input range lies inside one of the inputs' buffers as they are now.
fn bound_within<I: GraphInputs>(bindings: &[Binding], inputs: &I) -> bool {
    let ranges = inputs.host_ranges();
    bindings.iter().all(|b| match b {
        Binding::Input { host, bytes, .. } => ranges.iter().any(|&(p, n)| *host >= p && host + bytes <= p + n),
        Binding::Scalars { .. } => true,
    })
}

impl CudaDev {
    /// Whether a capture is running on this device (checked by every operation).
    pub(super) fn capturing(&self) -> bool {
        self.capturing.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether a CUDA graph capture is running on this device: what another crate's stream
    /// work (NCCL's) needs to know, since an event recorded inside a capture cannot be queried.
    pub fn is_capturing(&self) -> bool {
        self.capturing()
    }

    /// On the emulator, `f` as an operation of the device's stream: run now, or recorded and
    /// run by each replay while a capture is running — what the emulated NCCL's host
    /// collectives need to sit inside a captured step as NCCL's kernels do on a GPU. Errors
    /// on a real device, where only the driver's operations can be captured.
    pub fn emulated_host_op(&self, f: impl Fn() + Send + Sync + 'static) -> Result<()> {
        if !self.is_emulated() {
            return Err(Error::Device("a host operation in the device's stream exists only on the emulator".into()));
        }
        self.emu_host(f)
    }

    /// Runs `f` once, recording everything it queues on this device into a graph instead of
    /// running it, with `inputs` the host data it uploads (through
    /// [`CudaDev::upload_input`]). Nothing of the step runs until [`StepGraph::replay`]. Run at
    /// least one step eagerly first (see the module docs).
    pub fn capture<I: GraphInputs, R>(self: &Arc<Self>, inputs: I, f: impl FnOnce(&I) -> Result<R>) -> Result<(StepGraph<I>, R)> {
        if self.profiling.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::Device("cannot capture a CUDA graph while a profile is running".into()));
        }
        let pool = Arc::new(GraphPool { dev: self.clone(), free: Mutex::new(SizeCache::default()), owned: Mutex::new(vec![]) });
        {
            let mut c = self.capture.lock().map_err(|_| Error::Device("capture state poisoned".into()))?;
            if c.is_some() {
                return Err(Error::Device("a CUDA graph capture is already running".into()));
            }
            *c = Some(CaptureState { pool: pool.clone(), ops: vec![], bindings: vec![] });
        }
        self.bind()?;
        if let Some(r) = &self.real {
            // Relaxed: the allocator may still call cuMemAlloc for the pool (as PyTorch's does
            // under capture); nothing else of the engine calls an unsafe API while capturing.
            if let Err(e) = r.stream.begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED) {
                self.end_capture_state();
                return Err(derr("beginning a CUDA graph capture", e));
            }
        }
        self.capturing.store(true, std::sync::atomic::Ordering::Relaxed);
        let inputs = Box::new(inputs);
        let out = f(&inputs);
        self.capturing.store(false, std::sync::atomic::Ordering::Relaxed);
        let real = match &self.real {
            Some(r) => {
                let g = r.stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
                match (&out, g) {
                    (Ok(_), Ok(Some(g))) => {
                        if let Err(e) = g.upload() {
                            self.end_capture_state();
                            return Err(derr("uploading a CUDA graph", e));
                        }
                        Some(g)
                    }
                    (Ok(_), Ok(None)) => {
                        self.end_capture_state();
                        return Err(Error::Device("the CUDA graph capture recorded nothing".into()));
                    }
                    (Ok(_), Err(e)) => {
                        self.end_capture_state();
                        return Err(derr("ending a CUDA graph capture", e));
                    }
                    (Err(_), _) => None,
                }
            }
            None => None,
        };
        let state = self.end_capture_state();
        let out = out?;
        let state = state.ok_or_else(|| Error::Device("capture state lost".into()))?;
        if !bound_within(&state.bindings, inputs.as_ref()) {
            return Err(Error::Device(
                "the captured step uploaded host data its graph does not own (pass it in the graph's inputs)".into(),
            ));
        }
        let graph = StepGraph { dev: self.clone(), inputs, bindings: state.bindings, ops: state.ops, real, _pool: pool };
        Ok((graph, out))
    }

    fn end_capture_state(&self) -> Option<CaptureState> {
        self.capturing.store(false, std::sync::atomic::Ordering::Relaxed);
        self.capture.lock().ok().and_then(|mut c| c.take())
    }

    /// The pool allocations come from while capturing.
    pub(super) fn capture_pool(&self) -> Option<Arc<GraphPool>> {
        if !self.capturing() {
            return None;
        }
        self.capture.lock().ok().and_then(|c| c.as_ref().map(|s| s.pool.clone()))
    }

    /// The emulator's operation `op`: run now, or recorded while capturing.
    pub(super) fn emu_do(&self, op: EmuOp) -> Result<()> {
        if self.capturing() {
            let mut c = self.capture.lock().map_err(|_| Error::Device("capture state poisoned".into()))?;
            if let Some(s) = c.as_mut() {
                s.ops.push(op);
                return Ok(());
            }
        }
        op.run();
        Ok(())
    }

    /// The emulator's host-side operation `f` (a GEMM, copy or memset): run now, or recorded.
    pub(super) fn emu_host(&self, f: impl Fn() + Send + Sync + 'static) -> Result<()> {
        self.emu_do(EmuOp::Host(Box::new(f)))
    }

    /// An error for an operation a capture cannot hold (a host wait, a copy from or to host
    /// memory other than a bound input).
    pub(super) fn refuse_in_capture(&self, what: &str) -> Result<()> {
        if self.capturing() {
            return Err(Error::Device(format!(
                "{what} inside a CUDA graph capture (the step must not wait for the device or move host data other than its bound inputs)"
            )));
        }
        Ok(())
    }

    /// A buffer of the capture's pool for a bound input: a fresh block (see
    /// [`GraphPool::take_fresh`]), the pool's once freed.
    fn bound_buffer(self: &Arc<Self>, bytes: usize) -> Result<DevBuf> {
        let pool = self.capture_pool().ok_or_else(|| Error::Device("no capture is running".into()))?;
        let class = self.class_of(bytes);
        let ptr = pool.take_fresh(class)?;
        Ok(DevBuf { ptr, class, dev: self.clone(), pool: Some(pool) })
    }

    /// Uploads token ids (or any step input) like [`CudaDev::upload`]; inside a capture, binds a
    /// buffer of the graph's pool to `src`, copied again before each replay (see
    /// [`GraphInputs`]).
    pub fn upload_input<T: cudarc::driver::DeviceRepr>(self: &Arc<Self>, src: &[T]) -> Result<DevBuf> {
        if !self.capturing() {
            return self.upload(src);
        }
        let bytes = std::mem::size_of_val(src);
        let b = self.bound_buffer(bytes)?;
        let mut c = self.capture.lock().map_err(|_| Error::Device("capture state poisoned".into()))?;
        if let Some(s) = c.as_mut() {
            s.bindings.push(Binding::Input { host: src.as_ptr() as usize, bytes, dev: b.ptr });
        }
        Ok(b)
    }

    /// Uploads `cell`'s values (8-byte words); inside a capture, binds a buffer of the graph's pool to the
    /// cell, whose values then are uploaded before each replay.
    pub fn upload_scalars(self: &Arc<Self>, cell: &HostScalars) -> Result<DevBuf> {
        let values = cell.words();
        if !self.capturing() {
            return self.upload(&values);
        }
        let b = self.bound_buffer(values.len() * 8)?;
        let mut c = self.capture.lock().map_err(|_| Error::Device("capture state poisoned".into()))?;
        if let Some(s) = c.as_mut() {
            s.bindings.push(Binding::Scalars { cell: cell.clone(), bytes: values.len() * 8, dev: b.ptr });
        }
        Ok(b)
    }
}
