//! The CUDA side of the tensor: one [`CudaDev`] per device ordinal (context, one compute stream,
//! every kernel file compiled once with NVRTC for the device's architecture, a cuBLAS handle on
//! that stream, cuBLASLt for GEMMs with a fused epilogue (`cublaslt.rs`), and the caching
//! allocator), and [`CudaStorage`], a device buffer that returns to the cache when the last
//! tensor holding it is dropped.
//!
//! Device memory is handled as raw `CUdeviceptr`s (cudarc's result-level API) rather than
//! `CudaSlice`, because tensors are views at element offsets into shared buffers of several
//! dtypes, and because cudarc's per-slice event tracking is not needed when every kernel of a
//! device runs in order on one stream (the communication stream of NCCL synchronises with it
//! through explicit events in `dptrain-comm`).
//!
//! Only reached after `device::cuda_status()` found a device, so cudarc's loader never panics.

use super::cache::{size_class, CacheStats, SizeCache};
use super::DType;
use crate::error::{Error, Result};
pub use crate::kernels::cuda::KernelLoad;
use crate::kernels::cuda::{load_all, Image, KernelCache};
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{result as drv, CudaContext, CudaFunction, CudaModule, CudaStream, DeviceRepr, LaunchConfig};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

mod graph;
pub use graph::{GraphInputs, HostScalars, StepGraph};

pub(crate) fn derr(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Device(format!("{what}: {e:?}"))
}

/// A CUDA device as the engine uses it — or, in test builds with the `cuda-emu` feature and
/// `DPTRAIN_CUDA_EMULATOR=1`, the CPU emulator standing in for one (host memory as device memory,
/// the kernels compiled as C++, a reference GEMM with cuBLAS's argument conventions).
pub struct CudaDev {
    pub ordinal: usize,
    pub name: String,
    /// e.g. `sm_90`: what the kernels were compiled for.
    pub arch: String,
    /// How the kernels were had at start (the emulator compiles none).
    pub kernels: KernelLoad,
    real: Option<Real>,
    cache: Mutex<SizeCache<u64>>,
    /// A buffer of f32 ones for reductions done as GEMMs (grown on demand, never shrunk).
    ones: Mutex<Option<(DevBuf, usize)>>,
    /// The same in bf16 (column sums of bf16 matrices, as a bf16-input GEMM).
    ones16: Mutex<Option<(DevBuf, usize)>>,
    /// Times the host waited for the stream (syncs and device-to-host reads; counted on the
    /// emulator too, so tests can hold a step to none).
    waits: std::sync::atomic::AtomicU64,
    /// Per-launch timings while a profile is running (see [`CudaDev::profile_start`]), and
    /// whether one is (checked on every launch without taking the lock).
    profile: Mutex<Option<Vec<Timed>>>,
    profiling: std::sync::atomic::AtomicBool,
    /// Which fused paths run ([`Fusions`] as bits).
    fusions: std::sync::atomic::AtomicU16,
    /// A CUDA graph capture in progress (`graph.rs`), and whether one is (checked on every
    /// operation without taking the lock).
    capture: Mutex<Option<graph::CaptureState>>,
    capturing: std::sync::atomic::AtomicBool,
}

/// Which fused paths a device takes — all where supported, by default. `DPTRAIN_FLASH=0`,
/// `DPTRAIN_FLASH_ROWS=64`, `DPTRAIN_EPILOGUE=0` and `DPTRAIN_GELU_EPILOGUE=0` turn one off for
/// a process; gpu-check turns
/// each off in turn for its before/after lines and its unfused check rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fusions {
    /// Flash attention (`kernels/cuda/flash.cu`) where the head size and device allow.
    pub flash: bool,
    /// The flash forward on 128-row query tiles (FlashAttention-2's for head size 64: each K
    /// and V fragment serves two 16-row slices per warp); off, on 64-row tiles
    /// (`DPTRAIN_FLASH_ROWS=64`).
    pub flash_wide: bool,
    /// A linear's bias (and bias gradient) in the GEMM's cuBLASLt epilogue.
    pub epilogue: bool,
    /// The tanh GELU of a transformer MLP in its GEMMs' cuBLASLt epilogues
    /// (`Var::layer_norm_mlp`): the first writes the pre-activation and the activation, the
    /// output projection's input-gradient GEMM applies GELU's derivative. Needs `epilogue`.
    pub gelu_epilogue: bool,
    /// The classifier and its loss as one op with bf16 logits (`Var::linear_cross_entropy`).
    pub classifier: bool,
    /// GELU and layer norm writing the next GEMM's bf16 operand (`Var::gelu_linear`,
    /// `Var::layer_norm_linear`).
    pub operands: bool,
    /// bf16 activations: a `Var::linear_half` output (and what reads it: flash attention, GELU)
    /// stored in bf16, its gradient too. Off, they are stored in f32 (the ablation's before-line;
    /// the CPU engine models them on).
    pub activations: bool,
    /// Training steps decided on the device without a host wait (`Optimizer::step_on_device`);
    /// off (`DPTRAIN_STEP_SYNC=1`), the trainer reads the loss and norm every step.
    pub device_step: bool,
    /// Weight-gradient GEMMs writing straight into the flat gradient buffer
    /// (`autograd::take_grad_sink`).
    pub grad_sink: bool,
    /// The optimizer's bf16 copy of the parameters read by bf16 GEMMs (`ParamStore::half`).
    pub weight_copy: bool,
    /// The residual add riding on the GEMM of the linear before it (`Var::linear_add`: cuBLASLt
    /// reads C from the residual stream and writes the sum).
    pub residual: bool,
    /// An op adding its contribution to an intermediate's gradient into the gradient already
    /// there (a layer norm's dx into the residual stream's), instead of a new tensor the tape
    /// adds in a pass of its own (`autograd::GradSink`).
    pub accumulate: bool,
    /// Memory-bound kernels reading and writing 16 bytes per access where the addresses allow
    /// (GELU on bf16 activations, layer norm — its forward with a warp per row — and the
    /// cross-entropy rows); off (`DPTRAIN_WIDE_LOADS=0`), one element per access.
    pub wide_loads: bool,
    /// Dense linear algebra (`ops::linalg`: SOAP's eigendecompositions and QR) on the device
    /// through cuSOLVER; off (`DPTRAIN_SOLVER=0`), or without libcusolver, on the host.
    pub solver: bool,
}

impl Fusions {
    pub const ALL: Fusions = Fusions {
        flash: true,
        flash_wide: true,
        epilogue: true,
        classifier: true,
        operands: true,
        activations: true,
        device_step: true,
        grad_sink: true,
        weight_copy: true,
        residual: true,
        accumulate: true,
        wide_loads: true,
        gelu_epilogue: true,
        solver: true,
    };

    fn bits(self) -> u16 {
        [
            self.flash,
            self.epilogue,
            self.classifier,
            self.operands,
            self.activations,
            self.device_step,
            self.grad_sink,
            self.weight_copy,
            self.accumulate,
            self.residual,
            self.flash_wide,
            self.wide_loads,
            self.gelu_epilogue,
            self.solver,
        ]
        .iter()
        .enumerate()
        .fold(0, |b, (i, &on)| b | (on as u16) << i)
    }

    fn of(b: u16) -> Fusions {
        let on = |i: u32| b & (1 << i) != 0;
        Fusions {
            flash: on(0),
            epilogue: on(1),
            classifier: on(2),
            operands: on(3),
            activations: on(4),
            device_step: on(5),
            grad_sink: on(6),
            weight_copy: on(7),
            accumulate: on(8),
            residual: on(9),
            flash_wide: on(10),
            wide_loads: on(11),
            gelu_epilogue: on(12),
            solver: on(13),
        }
    }

    /// The process default: all, less what the environment turns off.
    fn from_env() -> Fusions {
        let e = crate::env::env();
        Fusions {
            flash: e.flash,
            flash_wide: e.flash_rows != 64,
            wide_loads: e.wide_loads,
            epilogue: e.epilogue,
            gelu_epilogue: e.gelu_epilogue,
            device_step: !e.step_sync,
            solver: e.solver,
            ..Fusions::ALL
        }
    }
}

/// One timed launch: (file, kernel) and its time — a pair of events on the stream, or the host
/// time the emulator took.
struct Timed {
    file: &'static str,
    name: &'static str,
    at: TimedAt,
}

enum TimedAt {
    Events(cudarc::driver::CudaEvent, cudarc::driver::CudaEvent),
    Host(f64),
}

/// Time spent in one kernel (or in cuBLAS GEMMs) over a profile.
#[derive(Debug, Clone)]
pub struct KernelTime {
    /// The kernel file (`"cublas"` for GEMMs).
    pub file: &'static str,
    pub name: &'static str,
    pub ms: f64,
    pub launches: usize,
}

struct Real {
    ctx: Arc<CudaContext>,
    /// The compute stream: every kernel, copy and GEMM of this device, in order.
    stream: Arc<CudaStream>,
    /// The modules of each kernel file (flash.cu's: one per entry point, see `programs`).
    modules: Modules,
    funcs: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
    blas: CudaBlas,
    /// `None` when libcublasLt cannot be loaded.
    lt: Option<super::cublaslt::Lt>,
    /// cuSOLVER, loaded on first use (`None` inside when it cannot be).
    solver: std::sync::OnceLock<Option<Mutex<super::cusolver::Solver>>>,
}

static DEVS: Mutex<Vec<Arc<CudaDev>>> = Mutex::new(Vec::new());

/// True when this process runs CUDA ops on the CPU emulator (test builds only).
pub fn emulated() -> bool {
    cfg!(feature = "cuda-emu") && crate::env::env().cuda_emulator
}

/// The engine's handle to device `ordinal`, created (and its kernels compiled) on first use.
pub fn dev(ordinal: usize) -> Result<Arc<CudaDev>> {
    let mut devs = DEVS.lock().map_err(|_| Error::Device("device table poisoned".into()))?;
    if let Some(d) = devs.iter().find(|d| d.ordinal == ordinal) {
        return Ok(d.clone());
    }
    match crate::device::cuda_status() {
        crate::device::CudaStatus::Devices(n) if ordinal < n => {}
        other => return Err(Error::Device(format!("cuda:{ordinal} is not available ({other:?})"))),
    }
    let d = Arc::new(if emulated() { CudaDev::emulator(ordinal) } else { CudaDev::open(ordinal)? });
    devs.push(d.clone());
    Ok(d)
}

/// A device's loaded kernel programs, by kernel file.
type Modules = HashMap<&'static str, Vec<Arc<CudaModule>>>;

/// Every kernel program compiled (or taken from the kernel cache) and loaded into `ctx`
/// ([`crate::kernels::cuda::load_all`]).
fn load_kernels(ctx: &Arc<CudaContext>, arch: &str) -> Result<(Modules, KernelLoad)> {
    let cache = crate::env::env().kernel_cache.as_ref().map(KernelCache::new);
    let (modules, load) = load_all(arch, cache.as_ref(), |_, image| {
        let code = match image {
            Image::Cubin(bin) => Ptx::from_binary(bin),
            Image::Ptx(text) => Ptx::from_src(text),
        };
        ctx.load_module(code).map_err(|e| format!("{e:?}"))
    })
    .map_err(Error::Device)?;
    tracing::info!("{load}");
    let mut by_file = Modules::new();
    for (file, m) in modules {
        by_file.entry(file).or_default().push(m);
    }
    Ok((by_file, load))
}

fn no_real() -> Error {
    Error::Device("the CUDA emulator has no driver context or streams".into())
}

impl CudaDev {
    fn open(ordinal: usize) -> Result<CudaDev> {
        let ctx = CudaContext::new(ordinal).map_err(|e| derr("creating the CUDA context", e))?;
        // SAFETY: event tracking only guards CudaSlice use across streams; the engine uses raw
        // pointers on one compute stream and synchronises the communication stream itself.
        unsafe { ctx.disable_event_tracking() };
        let (maj, min) = ctx.compute_capability().map_err(|e| derr("compute capability", e))?;
        let arch = format!("sm_{maj}{min}");
        let name = ctx.name().map_err(|e| derr("device name", e))?;
        let stream = ctx.new_stream().map_err(|e| derr("creating the compute stream", e))?;
        let (modules, kernels) = load_kernels(&ctx, &arch)?;
        // SAFETY: only tries to load the library.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::Device("cuBLAS (libcublas.so) was not found; put its directory on LD_LIBRARY_PATH".into()));
        }
        let blas = CudaBlas::new(stream.clone()).map_err(|e| derr("creating the cuBLAS handle", e))?;
        ctx.bind_to_thread().map_err(|e| derr("binding the CUDA context", e))?;
        let lt = super::cublaslt::Lt::open();
        if let Some(lt) = &lt {
            // cuBLAS gets cuBLASLt's workspace (PyTorch shares one too): both run on the compute
            // stream, one GEMM at a time, so one buffer serves both. Without a workspace of its
            // own cuBLAS allocates one inside each CUDA graph capture (PyTorch #83461), and its
            // default one is memory the allocator's numbers do not show.
            // SAFETY: a live handle, and a device buffer of WORKSPACE_BYTES that outlives it
            // (`Real` drops `blas` before `lt`).
            let st = unsafe { blas_sys::cublasSetWorkspace_v2(*blas.handle(), lt.workspace() as *mut _, super::cublaslt::WORKSPACE_BYTES) };
            if st != blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                tracing::warn!("cuBLAS workspace: {st:?}; cuBLAS keeps its own");
            }
        }
        Ok(CudaDev {
            ordinal,
            name,
            arch,
            kernels,
            real: Some(Real { ctx, stream, modules, funcs: Mutex::new(HashMap::new()), blas, lt, solver: Default::default() }),
            cache: Mutex::new(SizeCache::default()),
            ones: Mutex::new(None),
            ones16: Mutex::new(None),
            waits: Default::default(),
            profile: Mutex::new(None),
            profiling: Default::default(),
            fusions: Fusions::from_env().bits().into(),
            capture: Mutex::new(None),
            capturing: Default::default(),
        })
    }

    fn emulator(ordinal: usize) -> CudaDev {
        emu::set_schedule(crate::env::env().cuda_emulator_schedule);
        CudaDev {
            ordinal,
            name: "CPU emulator of the CUDA kernels (tests)".into(),
            arch: "emulated".into(),
            kernels: KernelLoad::default(),
            real: None,
            cache: Mutex::new(SizeCache::default()),
            ones: Mutex::new(None),
            ones16: Mutex::new(None),
            waits: Default::default(),
            profile: Mutex::new(None),
            profiling: Default::default(),
            fusions: Fusions::from_env().bits().into(),
            capture: Mutex::new(None),
            capturing: Default::default(),
        }
    }

    /// The fused paths this device takes now.
    pub fn fusions(&self) -> Fusions {
        Fusions::of(self.fusions.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Sets which fused paths this device takes; returns the previous setting.
    pub fn set_fusions(&self, f: Fusions) -> Fusions {
        Fusions::of(self.fusions.swap(f.bits(), std::sync::atomic::Ordering::Relaxed))
    }

    /// Starts timing every kernel launch and GEMM on this device (events around each, so the
    /// stream is not otherwise disturbed; meant for a window of a few steps, as gpu-check's
    /// profile of one training step).
    pub fn profile_start(&self) {
        if let Ok(mut p) = self.profile.lock() {
            *p = Some(Vec::new());
            self.profiling.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Stops the profile and returns the time per kernel, longest first (waits for the device).
    pub fn profile_stop(&self) -> Result<Vec<KernelTime>> {
        self.profiling.store(false, std::sync::atomic::Ordering::Relaxed);
        let timed = self.profile.lock().map_err(|_| Error::Device("profile poisoned".into()))?.take().unwrap_or_default();
        self.sync()?;
        let mut by: HashMap<(&'static str, &'static str), (f64, usize)> = HashMap::new();
        for t in timed {
            let ms = match &t.at {
                TimedAt::Events(a, b) => a.elapsed_ms(b).map_err(|e| derr("reading a profile event", e))? as f64,
                TimedAt::Host(ms) => *ms,
            };
            let e = by.entry((t.file, t.name)).or_default();
            e.0 += ms;
            e.1 += 1;
        }
        let mut out: Vec<KernelTime> =
            by.into_iter().map(|((file, name), (ms, launches))| KernelTime { file, name, ms, launches }).collect();
        out.sort_by(|a, b| b.ms.total_cmp(&a.ms).then(a.name.cmp(b.name)));
        Ok(out)
    }

    /// Runs `f` (one launch), timed when a profile is running.
    fn timed(&self, file: &'static str, name: &'static str, f: impl FnOnce() -> Result<()>) -> Result<()> {
        self.timed_if(file, name, || f().map(|()| true)).map(|_| ())
    }

    /// Runs `f`, which returns whether it launched anything, and times it when a profile is
    /// running and it did (a fused GEMM that fell back to the plain one is not a launch).
    fn timed_if(&self, file: &'static str, name: &'static str, f: impl FnOnce() -> Result<bool>) -> Result<bool> {
        if !self.profiling.load(std::sync::atomic::Ordering::Relaxed) {
            return f();
        }
        let at = match &self.real {
            Some(r) => {
                let ev = || {
                    r.stream
                        .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                        .map_err(|e| derr("recording a profile event", e))
                };
                let a = ev()?;
                if !f()? {
                    return Ok(false);
                }
                TimedAt::Events(a, ev()?)
            }
            None => {
                let t0 = std::time::Instant::now();
                if !f()? {
                    return Ok(false);
                }
                TimedAt::Host(t0.elapsed().as_secs_f64() * 1e3)
            }
        };
        if let Ok(mut p) = self.profile.lock() {
            if let Some(v) = p.as_mut() {
                v.push(Timed { file, name, at });
            }
        }
        Ok(true)
    }

    /// How many times the host has waited for this device so far (see `waits`).
    pub fn host_waits(&self) -> u64 {
        self.waits.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn is_emulated(&self) -> bool {
        self.real.is_none()
    }

    /// The driver context (not on the emulator).
    pub fn ctx(&self) -> Result<&Arc<CudaContext>> {
        self.real.as_ref().map(|r| &r.ctx).ok_or_else(no_real)
    }

    /// The compute stream (not on the emulator).
    pub fn stream(&self) -> Result<&Arc<CudaStream>> {
        self.real.as_ref().map(|r| &r.stream).ok_or_else(no_real)
    }

    /// Makes this device's context current on the calling thread (cheap when it already is).
    pub fn bind(&self) -> Result<()> {
        match &self.real {
            Some(r) => r.ctx.bind_to_thread().map_err(|e| derr("binding the CUDA context", e)),
            None => Ok(()),
        }
    }

    /// Kernel `name` from kernel file `file` (a real device's).
    pub fn func(&self, file: &'static str, name: &'static str) -> Result<CudaFunction> {
        let r = self.real.as_ref().ok_or_else(no_real)?;
        let mut f = r.funcs.lock().map_err(|_| Error::Device("kernel table poisoned".into()))?;
        if let Some(k) = f.get(&(file, name)) {
            return Ok(k.clone());
        }
        let ms = r.modules.get(file).ok_or_else(|| Error::Device(format!("no kernel file {file}")))?;
        // A file of several programs (flash.cu) has each kernel in one of them.
        let k = ms
            .iter()
            .find_map(|m| m.load_function(name).ok())
            .ok_or_else(|| Error::Device(format!("kernel {file}.{name} is in none of its {} loaded programs", ms.len())))?;
        f.insert((file, name), k.clone());
        Ok(k)
    }

    /// Launches kernel `file.name` with `params` (pointers to each argument's value, in order),
    /// on the compute stream (or the emulator).
    ///
    /// # Safety
    /// The arguments must match the kernel's parameter list in type and order, and every device
    /// pointer among them must address enough live memory for the kernel's indexing.
    pub unsafe fn launch_raw(
        &self,
        file: &'static str,
        name: &'static str,
        cfg: LaunchConfig,
        params: &mut [*mut std::ffi::c_void],
    ) -> Result<()> {
        self.timed(file, name, || match &self.real {
            Some(r) => {
                let f = self.func(file, name)?;
                self.bind()?;
                // SAFETY: forwarded contract; the stream belongs to this device's context.
                unsafe {
                    drv::launch_kernel(f.cu_function(), cfg.grid_dim, cfg.block_dim, cfg.shared_mem_bytes, r.stream.cu_stream(), params)
                }
                .map_err(|e| derr(&format!("launching {file}.{name}"), e))
            }
            None => self.emu_do(emu::launch(file, name, cfg, params)?),
        })
    }

    /// The block size a request of `bytes` gets: its cache size class on a GPU; on the emulator
    /// the request itself, to 16 bytes, so the guard page after each block is right behind the
    /// last byte a kernel may touch (see `emu::alloc`).
    pub(crate) fn class_of(&self, bytes: usize) -> usize {
        if self.real.is_some() {
            size_class(bytes)
        } else {
            emu::class(bytes)
        }
    }

    /// `bytes` of uninitialised device memory from the cache (from the graph's private pool
    /// while a capture runs). On the emulator every byte of it is 0xFF — NaN as f32 and bf16,
    /// −1 as an integer — in stream order (a capture records the fill, so each replay refills):
    /// a kernel that reads memory nothing wrote gets NaN there, where a GPU's stale contents
    /// would give plausible numbers on one run and not on the next.
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<DevBuf> {
        let b = match self.capture_pool() {
            Some(pool) => {
                let class = self.class_of(bytes);
                let ptr = pool.take(class)?;
                DevBuf { ptr, class, dev: self.clone(), pool: Some(pool) }
            }
            None => self.alloc_cached(bytes)?,
        };
        if self.real.is_none() {
            let (p, n) = (b.ptr, b.class);
            // SAFETY: the emulator's blocks are host memory of `class` bytes.
            self.emu_host(move || unsafe { std::ptr::write_bytes(p as *mut u8, 0xFF, n) })?;
        }
        Ok(b)
    }

    /// [`CudaDev::alloc`] from the device's cache, never a graph's pool.
    fn alloc_cached(self: &Arc<Self>, bytes: usize) -> Result<DevBuf> {
        self.bind()?;
        let class = self.class_of(bytes);
        let mut cache = self.cache.lock().map_err(|_| Error::Device("allocator poisoned".into()))?;
        let real = self.real.as_ref().map(|r| r.stream.clone());
        let ptr = cache
            .take(
                class,
                |c| match &real {
                    // SAFETY: plain device allocation on the bound context.
                    Some(_) => unsafe { drv::malloc_sync(c) }.map_err(|e| format!("{e:?}")),
                    None => emu::alloc(c),
                },
                |p, c| match &real {
                    Some(stream) => {
                        // SAFETY: cached blocks are unused once the stream has drained.
                        let _ = stream.synchronize();
                        let _ = unsafe { drv::free_sync(p) };
                    }
                    None => emu::free(p, c),
                },
            )
            .map_err(|e| {
                Error::Device(format!("out of memory on cuda:{} allocating {} MiB ({e}); lower the batch size", self.ordinal, bytes >> 20))
            })?;
        Ok(DevBuf { ptr, class, dev: self.clone(), pool: None })
    }

    /// `bytes` of zeroed device memory.
    pub fn alloc_zeros(self: &Arc<Self>, bytes: usize) -> Result<DevBuf> {
        let b = self.alloc(bytes)?;
        match &self.real {
            // SAFETY: the block holds at least `bytes` bytes; the memset is ordered on the stream.
            Some(r) => unsafe { drv::memset_d8_async(b.ptr, 0, bytes, r.stream.cu_stream()) }.map_err(|e| derr("memset", e))?,
            None => {
                let p = b.ptr;
                // SAFETY: the emulator's blocks are host memory of at least `bytes` bytes.
                self.emu_host(move || unsafe { std::ptr::write_bytes(p as *mut u8, 0, bytes) })?
            }
        }
        Ok(b)
    }

    /// Returns every cached free block to the driver (as `torch.cuda.empty_cache`), after the
    /// stream has drained: what the cache then reserves is what live tensors hold, so a
    /// measurement that follows reports its own peak (gpu-check measures several models).
    pub fn empty_cache(&self) -> Result<()> {
        self.refuse_in_capture("emptying the allocator's cache")?;
        self.sync()?;
        self.bind()?;
        let mut cache = self.cache.lock().map_err(|_| Error::Device("allocator poisoned".into()))?;
        let real = self.real.is_some();
        cache.empty(&mut |p, c| {
            if real {
                // SAFETY: a cached block is unused once the stream has drained (synced above).
                let _ = unsafe { drv::free_sync(p) };
            } else {
                emu::free(p, c);
            }
        });
        Ok(())
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.cache.lock().map(|c| c.stats()).unwrap_or_default()
    }

    /// Device memory dptrain holds on this device: the caching allocator's blocks (which it
    /// keeps, so this is also their peak) plus cuBLASLt's workspace when it is open.
    pub fn reserved_bytes(&self) -> usize {
        let lt = self.real.as_ref().is_some_and(|r| r.lt.is_some());
        self.cache_stats().reserved_bytes + if lt { super::cublaslt::WORKSPACE_BYTES } else { 0 }
    }

    /// Copies host data into a new device buffer.
    pub fn upload<T: DeviceRepr>(self: &Arc<Self>, src: &[T]) -> Result<DevBuf> {
        self.refuse_in_capture(&format!("a host-to-device copy of {} bytes", std::mem::size_of_val(src)))?;
        let b = self.alloc(std::mem::size_of_val(src))?;
        self.write(b.ptr, src)?;
        Ok(b)
    }

    /// Copies host data to device address `dst` (a live buffer of at least its size), queued on
    /// the stream.
    pub fn write<T: DeviceRepr>(&self, dst: u64, src: &[T]) -> Result<()> {
        self.refuse_in_capture(&format!("a host-to-device copy of {} bytes", std::mem::size_of_val(src)))?;
        self.bind()?;
        match &self.real {
            // SAFETY: the caller passes a buffer of at least the bytes of `src`; pageable sources
            // are staged by the driver before this returns, so `src` may be dropped afterwards.
            Some(r) => unsafe { drv::memcpy_htod_async(dst, src, r.stream.cu_stream()) }.map_err(|e| derr("host-to-device copy", e)),
            None => {
                // SAFETY: as above, in host memory.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr() as *const u8, dst as *mut u8, std::mem::size_of_val(src)) };
                Ok(())
            }
        }
    }

    /// Copies `n` elements at device address `ptr` to the host (waits for the stream).
    pub fn download<T: DeviceRepr + Default + Clone>(&self, ptr: u64, n: usize) -> Result<Vec<T>> {
        self.refuse_in_capture("a device-to-host copy")?;
        self.bind()?;
        let mut v = vec![T::default(); n];
        match &self.real {
            Some(r) => {
                // SAFETY: the caller passes a pointer to at least n elements of T on this device.
                unsafe { drv::memcpy_dtoh_async(&mut v[..], ptr, r.stream.cu_stream()) }.map_err(|e| derr("device-to-host copy", e))?;
                self.sync()?;
            }
            // SAFETY: as above, in host memory.
            None => {
                unsafe { std::ptr::copy_nonoverlapping(ptr as *const T, v.as_mut_ptr(), n) };
                self.sync()?;
            }
        }
        Ok(v)
    }

    pub fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        match &self.real {
            // SAFETY: both ranges lie in live device buffers (callers' invariant).
            Some(r) => unsafe { drv::memcpy_dtod_async(dst, src, bytes, r.stream.cu_stream()) }.map_err(|e| derr("device copy", e)),
            // SAFETY: as above, in host memory.
            None => self.emu_host(move || unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) }),
        }
    }

    /// Waits for everything queued on the compute stream; surfaces asynchronous kernel errors.
    pub fn sync(&self) -> Result<()> {
        self.refuse_in_capture("a wait for the device")?;
        self.waits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match &self.real {
            Some(r) => r.stream.synchronize().map_err(|e| derr(&format!("cuda:{} (a kernel failed)", self.ordinal), e)),
            None => Ok(()),
        }
    }

    /// A device buffer of at least `n` f32 ones.
    pub fn ones(self: &Arc<Self>, n: usize) -> Result<u64> {
        let mut g = self.ones.lock().map_err(|_| Error::Device("ones poisoned".into()))?;
        if let Some((b, len)) = g.as_ref() {
            if *len >= n {
                return Ok(b.ptr);
            }
        }
        // A device constant made inside a capture would be filled only by the graph's replays.
        self.refuse_in_capture("growing the device's ones vector (run a step before capturing)")?;
        let len = n.next_power_of_two().max(1024);
        let b = self.alloc(len * 4)?;
        crate::kernels::cuda::ops::fill_raw(self, b.ptr, len, 1.0)?;
        let p = b.ptr;
        *g = Some((b, len));
        Ok(p)
    }

    /// A device buffer of at least `n` bf16 ones.
    pub fn ones_bf16(self: &Arc<Self>, n: usize) -> Result<u64> {
        let mut g = self.ones16.lock().map_err(|_| Error::Device("ones poisoned".into()))?;
        if let Some((b, len)) = g.as_ref() {
            if *len >= n {
                return Ok(b.ptr);
            }
        }
        self.refuse_in_capture("growing the device's bf16 ones vector (run a step before capturing)")?;
        let len = n.next_power_of_two().max(1024);
        let src = self.ones(len)?;
        let b = self.alloc(len * 2)?;
        crate::kernels::cuda::ops::cast_raw(self, src, b.ptr, len, true)?;
        let p = b.ptr;
        *g = Some((b, len));
        Ok(p)
    }

    /// Row-major strided-batched GEMM `C[b] = alpha·A[b]·B[b] + beta·C[b]` with A `[m, k]`,
    /// B `[k, n]` described by [`MatArg`]s, C packed `[m, n]`; inputs f32 or bf16 (`in_dtype`),
    /// output f32, accumulation f32 (no TF32: results follow the CPU path within 1e-5).
    pub fn gemm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: MatArg,
        b: MatArg,
        c: u64,
        batch: usize,
        alpha: f32,
        beta: f32,
        in_dtype: DType,
    ) -> Result<()> {
        self.gemm_to(m, n, k, a, b, c, batch, alpha, beta, in_dtype, DType::F32)
    }

    /// [`CudaDev::gemm`] with C of dtype `out` (f32, or bf16 — rounded to nearest even from the
    /// f32 accumulator — for bf16 inputs).
    pub fn gemm_to(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: MatArg,
        b: MatArg,
        c: u64,
        batch: usize,
        alpha: f32,
        beta: f32,
        in_dtype: DType,
        out: DType,
    ) -> Result<()> {
        if in_dtype == DType::F64 || out == DType::F64 || (out == DType::BF16 && in_dtype != DType::BF16) {
            return Err(Error::Device(format!("a {in_dtype} → {out} GEMM is not supported on CUDA")));
        }
        // Column-major view: Cᵀ[n, m] = Bᵀ · Aᵀ (see MatArg for how a row-major operand maps).
        let g = ColGemm {
            trans_a: b.trans,
            trans_b: a.trans,
            m: n,
            n: m,
            k,
            a: b.ptr,
            lda: b.ld,
            stride_a: b.batch_stride,
            b: a.ptr,
            ldb: a.ld,
            stride_b: a.batch_stride,
            c,
            ldc: n,
            stride_c: m * n,
            batch,
            alpha,
            beta,
            bf16: in_dtype == DType::BF16,
            out_bf16: out == DType::BF16,
        };
        let name = match (g.bf16, g.out_bf16) {
            (true, true) => "gemm (bf16 inputs and output)",
            (true, false) => "gemm (bf16 inputs)",
            _ => "gemm (f32)",
        };
        self.timed("cublas", name, || match &self.real {
            Some(r) => {
                self.bind()?;
                g.cublas(&r.blas)
            }
            // SAFETY: the emulator's pointers are host memory of the sizes the GEMM implies.
            None => self.emu_host(move || unsafe { g.reference() }),
        })
    }

    /// [`CudaDev::gemm`] (one matrix, not batched) with a fused epilogue through cuBLASLt, C
    /// of dtype `out` (f32, or bf16 for bf16 inputs: then a bias is bf16 too, cuBLASLt's
    /// default for a bf16 output, and the f32 sum is rounded once). `c_in`: where beta·C is
    /// read from when not from `c` itself (packed like it, f32: a residual added as the product
    /// is written; the sum is `(alpha·A·B + beta·C) + bias`). GELU's epilogues take bf16
    /// operands and write bf16.
    /// Returns `Ok(false)`, having launched nothing, when it cannot fuse here — no cuBLASLt,
    /// epilogues switched off, a bias pointer not 16-byte aligned, or no cuBLASLt algorithm for
    /// the shape — and the caller then runs the plain GEMM and its own bias pass. The emulator
    /// fuses with a reference of cuBLASLt's epilogue semantics.
    pub fn gemm_epilogue(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: MatArg,
        b: MatArg,
        c: u64,
        alpha: f32,
        beta: f32,
        in_dtype: DType,
        out: DType,
        ep: Epilogue,
        c_in: Option<u64>,
    ) -> Result<bool> {
        let out_bf16 = out == DType::BF16;
        let types_ok = match in_dtype {
            DType::F32 => out == DType::F32,
            DType::BF16 => out != DType::F64,
            DType::F64 => false,
        };
        // Every vector and matrix the epilogue reads or writes 16-byte aligned; GELU's only with
        // bf16 operands and output, its auxiliary matrix's leading dimension (C's n) a multiple
        // of 8 as cuBLASLt requires.
        let a16 = |p: u64| p.is_multiple_of(16);
        let gelu_ok = self.fusions().gelu_epilogue && out_bf16 && in_dtype == DType::BF16 && n.is_multiple_of(8);
        let (ptrs_ok, ep_ok) = match ep {
            Epilogue::Bias(p) => (a16(p), true),
            // A bias gradient is always written in f32 (only f32-output weight gradients sum one).
            Epilogue::RowSumsA(p) => (a16(p), !out_bf16),
            Epilogue::Gelu { bias, aux } => (bias.is_none_or(a16) && a16(aux), gelu_ok),
            Epilogue::GeluGrad { aux } => (a16(aux), gelu_ok),
            Epilogue::None => (true, true),
        };
        if !self.fusions().epilogue || !ptrs_ok || !ep_ok || !types_ok {
            return Ok(false);
        }
        // A separate C only for an f32 output (a residual stream is f32; whether to read one is
        // the op's choice, `Fusions::residual`); no epilogue at all only with one.
        if (c_in.is_some() && out_bf16) || (ep == Epilogue::None && c_in.is_none()) {
            return Ok(false);
        }
        // The same column-major mapping as `gemm` (Cᵀ = Bᵀ·Aᵀ): the row-major bias over C's
        // columns is a bias over Cᵀ's rows; row sums of A are sums of Aᵀ = op(B) over k; the
        // auxiliary matrix is laid out as C.
        let col = match ep {
            Epilogue::Bias(p) => super::cublaslt::ColEpilogue::Bias(p),
            Epilogue::RowSumsA(p) => super::cublaslt::ColEpilogue::GradB(p),
            Epilogue::Gelu { bias, aux } => super::cublaslt::ColEpilogue::GeluAux { bias, aux },
            Epilogue::GeluGrad { aux } => super::cublaslt::ColEpilogue::DGelu(aux),
            Epilogue::None => super::cublaslt::ColEpilogue::None,
        };
        let g = super::cublaslt::LtGemm {
            trans_a: b.trans,
            trans_b: a.trans,
            m: n,
            n: m,
            k,
            a: b.ptr,
            lda: b.ld,
            b: a.ptr,
            ldb: a.ld,
            c,
            c_in: c_in.unwrap_or(c),
            ldc: n,
            alpha,
            beta,
            bf16: in_dtype == DType::BF16,
            out_bf16,
        };
        let name = match (ep, out_bf16, c_in.is_some()) {
            (Epilogue::Bias(_), _, true) => "gemm + residual + bias (cuBLASLt)",
            (_, _, true) => "gemm + residual (cuBLASLt)",
            (Epilogue::Bias(_), false, _) => "gemm + bias (cuBLASLt)",
            (Epilogue::Bias(_), true, _) => "gemm + bias, bf16 output (cuBLASLt)",
            (Epilogue::RowSumsA(_), ..) => "gemm + bias gradient (cuBLASLt)",
            (Epilogue::Gelu { bias: Some(_), .. }, ..) => "gemm + bias + GELU, bf16 output (cuBLASLt)",
            (Epilogue::Gelu { bias: None, .. }, ..) => "gemm + GELU, bf16 output (cuBLASLt)",
            (Epilogue::GeluGrad { .. }, ..) => "gemm + GELU gradient, bf16 output (cuBLASLt)",
            (Epilogue::None, ..) => "gemm (cuBLASLt)",
        };
        self.timed_if("cublas", name, || match &self.real {
            Some(r) => match &r.lt {
                Some(lt) => {
                    self.bind()?;
                    lt.run(&g, col, r.stream.cu_stream() as _)
                }
                None => Ok(false),
            },
            None => {
                // SAFETY: the emulator's pointers are host memory of the sizes the GEMM and its
                // epilogue imply.
                self.emu_host(move || unsafe { col_reference(&g, col) })?;
                Ok(true)
            }
        })
    }
}

impl CudaDev {
    /// Whether `ops::linalg`'s factorisations run on this device: switched on
    /// (`Fusions::solver`) and cuSOLVER loaded (tried on the first call). Always on the emulator,
    /// whose cuSOLVER is the host's code.
    pub fn has_solver(&self) -> bool {
        self.fusions().solver && self.real.as_ref().is_none_or(|r| self.real_solver(r).is_some())
    }

    fn real_solver<'a>(&self, r: &'a Real) -> Option<&'a Mutex<super::cusolver::Solver>> {
        r.solver.get_or_init(|| self.bind().ok().and_then(|()| super::cusolver::Solver::open(&r.stream)).map(Mutex::new)).as_ref()
    }

    /// Runs `f` with this device's cuSOLVER handle (locked), its context current.
    fn with_solver(&self, r: &Real, f: impl FnOnce(&super::cusolver::Solver) -> Result<()>) -> Result<()> {
        let s = self.real_solver(r).ok_or_else(|| Error::Device("cuSOLVER is not available".into()))?;
        let s = s.lock().map_err(|_| Error::Device("cuSOLVER handle poisoned".into()))?;
        self.bind()?;
        f(&s)
    }

    /// LAPACK's `syevd` on the device (see `cusolver.rs`): the column-major f64 `n × n` at `a`
    /// (lower triangle read) becomes its eigenvectors by ascending eigenvalue, the eigenvalues
    /// go to `w`, the status (0: converged) to the i32 at `info`. The emulator runs the host's
    /// eigendecomposition (`ops::linalg::sym_eigen`) on the same buffers.
    ///
    /// # Safety
    /// `a` (`n²` f64), `w` (`n` f64) and `info` (one i32) must be live buffers of this device.
    pub(crate) unsafe fn sym_eigen_f64(self: &Arc<Self>, a: u64, n: usize, w: u64, info: u64) -> Result<()> {
        self.refuse_in_capture("an eigendecomposition")?;
        self.timed("cusolver", "syevd (cuSOLVER, f64)", || match &self.real {
            // SAFETY: the caller's contract.
            Some(r) => self.with_solver(r, |s| unsafe { s.syevd(self, a, n, w, info) }),
            None => self.emu_host(move || {
                // SAFETY: the emulator's buffers are host memory of the sizes the caller promised.
                let (m, wv, st) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(a as *mut f64, n * n),
                        std::slice::from_raw_parts_mut(w as *mut f64, n),
                        &mut *(info as *mut i32),
                    )
                };
                match crate::ops::linalg::sym_eigen(faer::MatRef::from_column_major_slice(m, n, n)) {
                    Ok((u, vals)) => {
                        write_col_major(m, u.as_ref());
                        wv.copy_from_slice(&vals);
                        *st = 0;
                    }
                    Err(_) => *st = 1,
                }
            }),
        })
    }

    /// The Q of the QR factorisation of the column-major f64 `n × n` at `a`, in place, on the
    /// device (LAPACK's `geqrf` then `orgqr`, see `cusolver.rs`; `tau` their `n` scalars, the
    /// status to the i32 at `info`). The emulator runs the host's QR (`ops::linalg::qr_q`).
    ///
    /// # Safety
    /// `a` (`n²` f64), `tau` (`n` f64) and `info` (one i32) must be live buffers of this device.
    pub(crate) unsafe fn qr_q_f64(self: &Arc<Self>, a: u64, n: usize, tau: u64, info: u64) -> Result<()> {
        self.refuse_in_capture("a QR factorisation")?;
        self.timed("cusolver", "geqrf + orgqr (cuSOLVER, f64)", || match &self.real {
            // SAFETY: the caller's contract.
            Some(r) => self.with_solver(r, |s| unsafe { s.qr_q(self, a, n, tau, info) }),
            None => self.emu_host(move || {
                // SAFETY: the emulator's buffers are host memory of the sizes the caller promised.
                let (m, st) = unsafe { (std::slice::from_raw_parts_mut(a as *mut f64, n * n), &mut *(info as *mut i32)) };
                let q = crate::ops::linalg::qr_q(faer::MatRef::from_column_major_slice(m, n, n).to_owned());
                write_col_major(m, q.as_ref());
                *st = 0;
            }),
        })
    }
}

/// Writes `x` into `m` column by column (the emulator's cuSOLVER results, column-major as
/// cuSOLVER's).
fn write_col_major(m: &mut [f64], x: faer::MatRef<'_, f64>) {
    let n = x.nrows();
    for j in 0..x.ncols() {
        for i in 0..n {
            m[j * n + i] = x[(i, j)];
        }
    }
}

/// What a fused GEMM also does, in the row-major terms of [`CudaDev::gemm`] (`C[m, n] =
/// alpha·A[m, k]·B[k, n] + beta·C`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    /// Adds `bias[n]` to every row of C (a linear's bias): f32, or bf16 when C is bf16.
    Bias(u64),
    /// Writes f32 `out[m]` = Σ_l A[i, l], the row sums of A (with A = gᵀ for a weight gradient
    /// gᵀ·x, the bias gradient).
    RowSumsA(u64),
    /// With z = A·B (+ bf16 `bias[n]` on every row): writes z to `aux` and GELU(z) (tanh form)
    /// to C, both bf16 `[m, n]` — a transformer MLP's pre-activation, kept for backward, and
    /// its activation from one GEMM (cuBLASLt's `GELU_AUX_BIAS`).
    Gelu { bias: Option<u64>, aux: u64 },
    /// C = (A·B) ⊙ GELU'(aux), bf16, with `aux` the bf16 `[m, n]` pre-activation `Gelu` kept:
    /// the gradient through GELU of the product that is its output's gradient (`DGELU`).
    GeluGrad { aux: u64 },
    /// Nothing more (a GEMM that reads C from another buffer than it writes).
    None,
}

/// The emulator's cuBLASLt: the plain GEMM, then the epilogue as cuBLASLt defines it.
///
/// # Safety
/// Pointers must be host addresses of buffers as large as the dims imply.
unsafe fn col_reference(g: &super::cublaslt::LtGemm, ep: super::cublaslt::ColEpilogue) {
    use super::cublaslt::ColEpilogue;
    if g.c_in != g.c && g.beta != 0.0 {
        // C read from elsewhere: as if it had been copied into D first (same layout, f32).
        for j in 0..g.n {
            // SAFETY: both hold an m × n column-major f32 matrix at leading dimension ldc.
            unsafe { std::ptr::copy((g.c_in as *const f32).add(j * g.ldc), (g.c as *mut f32).add(j * g.ldc), g.m) };
        }
    }
    let plain = ColGemm {
        trans_a: g.trans_a,
        trans_b: g.trans_b,
        m: g.m,
        n: g.n,
        k: g.k,
        a: g.a,
        lda: g.lda,
        stride_a: 0,
        b: g.b,
        ldb: g.ldb,
        stride_b: 0,
        c: g.c,
        ldc: g.ldc,
        stride_c: 0,
        batch: 1,
        alpha: g.alpha,
        beta: g.beta,
        bf16: g.bf16,
        out_bf16: false,
    };
    if g.out_bf16 {
        // The f32 product, then the epilogue in f32 on each element, rounded once into the bf16
        // C (beta = 0: the only bf16-output epilogues callers use). A bias is bf16.
        let mut tmp = vec![0f32; g.m * g.n];
        let f32_plain = ColGemm { c: tmp.as_mut_ptr() as u64, ldc: g.m, beta: 0.0, ..plain };
        // SAFETY: forwarded contract; `tmp` holds the m × n product.
        unsafe { f32_plain.reference() };
        // SAFETY (the three closures): in bounds by the caller's contract.
        let bf = |p: u64, i: usize| unsafe { half::bf16::from_bits(*(p as *const u16).add(i)).to_f32() };
        let put = |p: u64, i: usize, v: f32| unsafe { *(p as *mut u16).add(i) = half::bf16::from_f32(v).to_bits() };
        let bias = |p: Option<u64>, i: usize| p.map_or(0.0, |p| bf(p, i));
        use crate::ops::fused::gelu::{tanh_gelu, tanh_gelu_slope};
        for j in 0..g.n {
            for i in 0..g.m {
                let (v, at) = (tmp[i + j * g.m], i + j * g.ldc);
                match ep {
                    ColEpilogue::Bias(p) => put(g.c, at, v + bf(p, i)),
                    ColEpilogue::GeluAux { bias: b, aux } => {
                        let z = v + bias(b, i);
                        put(aux, at, z);
                        put(g.c, at, tanh_gelu(z));
                    }
                    ColEpilogue::DGelu(aux) => put(g.c, at, v * tanh_gelu_slope(bf(aux, at))),
                    ColEpilogue::GradB(_) | ColEpilogue::None => unreachable!("gemm_epilogue refuses these with a bf16 output"),
                }
            }
        }
        return;
    }
    // SAFETY: forwarded contract.
    unsafe { plain.reference() };
    let rd = |p: u64, i: usize| -> f32 {
        // SAFETY: in bounds by the caller's contract.
        unsafe {
            if g.bf16 {
                half::bf16::from_bits(*(p as *const u16).add(i)).to_f32()
            } else {
                *(p as *const f32).add(i)
            }
        }
    };
    match ep {
        // D[i, j] += bias[i] for i < m (bias broadcast over D's columns).
        ColEpilogue::Bias(p) => {
            for j in 0..g.n {
                for i in 0..g.m {
                    // SAFETY: in bounds by the caller's contract.
                    unsafe { *(g.c as *mut f32).add(i + j * g.ldc) += *(p as *const f32).add(i) };
                }
            }
        }
        // grad[j] = Σ_l op(B)[l, j] for j < n: B's elements as stored (bf16 read as bf16).
        ColEpilogue::None => {}
        ColEpilogue::GeluAux { .. } | ColEpilogue::DGelu(_) => unreachable!("gemm_epilogue takes GELU only to a bf16 output"),
        ColEpilogue::GradB(p) => {
            for j in 0..g.n {
                let mut acc = 0.0f32;
                for l in 0..g.k {
                    acc += if g.trans_b { rd(g.b, j + l * g.ldb) } else { rd(g.b, l + j * g.ldb) };
                }
                // SAFETY: in bounds by the caller's contract.
                unsafe { *(p as *mut f32).add(j) = acc };
            }
        }
    }
}

/// A strided-batched GEMM in cuBLAS's column-major terms: `C = alpha·op(A)·op(B) + beta·C`, op
/// = transpose when `trans_*`; `m × n` output, inner dimension `k`.
#[derive(Debug, Clone, Copy)]
struct ColGemm {
    trans_a: bool,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    a: u64,
    lda: usize,
    stride_a: usize,
    b: u64,
    ldb: usize,
    stride_b: usize,
    c: u64,
    ldc: usize,
    stride_c: usize,
    batch: usize,
    alpha: f32,
    beta: f32,
    bf16: bool,
    /// C in bf16 (else f32).
    out_bf16: bool,
}

impl ColGemm {
    fn cublas(&self, blas: &CudaBlas) -> Result<()> {
        use blas_sys::{cublasComputeType_t as Ct, cublasGemmAlgo_t as Algo, cublasOperation_t as Op, cudaDataType as Dt};
        let op = |t: bool| if t { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N };
        let dt = if self.bf16 { Dt::CUDA_R_16BF } else { Dt::CUDA_R_32F };
        let i = |x: usize| x as i32;
        let (alpha, beta) = (self.alpha, self.beta);
        // SAFETY: pointers address live buffers of the sizes these dims and strides imply
        // (callers' invariant); alpha/beta are f32 as CUBLAS_COMPUTE_32F requires.
        unsafe {
            blas::gemm_strided_batched_ex(
                *blas.handle(),
                op(self.trans_a),
                op(self.trans_b),
                i(self.m),
                i(self.n),
                i(self.k),
                (&alpha) as *const f32 as *const _,
                self.a as *const _,
                dt,
                i(self.lda),
                self.stride_a as i64,
                self.b as *const _,
                dt,
                i(self.ldb),
                self.stride_b as i64,
                (&beta) as *const f32 as *const _,
                self.c as *mut _,
                if self.out_bf16 { Dt::CUDA_R_16BF } else { Dt::CUDA_R_32F },
                i(self.ldc),
                self.stride_c as i64,
                i(self.batch),
                Ct::CUBLAS_COMPUTE_32F,
                Algo::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| derr("cuBLAS GEMM", e))
    }

    /// The same GEMM on the CPU with cuBLAS's conventions (the emulator's cuBLAS): checks in
    /// tests that the row-major → column-major mapping above is right.
    ///
    /// # Safety
    /// Pointers must be host addresses of buffers as large as the dims and strides imply.
    unsafe fn reference(&self) {
        let rd = |p: u64, i: usize| -> f32 {
            // SAFETY: in bounds by the caller's contract.
            unsafe {
                if self.bf16 {
                    half::bf16::from_bits(*(p as *const u16).add(i)).to_f32()
                } else {
                    *(p as *const f32).add(i)
                }
            }
        };
        for bt in 0..self.batch {
            let (a0, b0, c0) = (bt * self.stride_a, bt * self.stride_b, bt * self.stride_c);
            for j in 0..self.n {
                for i in 0..self.m {
                    let mut acc = 0.0f32;
                    for l in 0..self.k {
                        let av = if self.trans_a { rd(self.a, a0 + l + i * self.lda) } else { rd(self.a, a0 + i + l * self.lda) };
                        let bv = if self.trans_b { rd(self.b, b0 + j + l * self.ldb) } else { rd(self.b, b0 + l + j * self.ldb) };
                        acc += av * bv;
                    }
                    let at = c0 + i + j * self.ldc;
                    // cuBLAS does not read C when beta is 0 (it may hold garbage or NaN).
                    // SAFETY: in bounds by the caller's contract.
                    unsafe {
                        if self.out_bf16 {
                            let cp = (self.c as *mut u16).add(at);
                            let prev = if self.beta == 0.0 { 0.0 } else { half::bf16::from_bits(*cp).to_f32() * self.beta };
                            *cp = half::bf16::from_f32(self.alpha * acc + prev).to_bits();
                        } else {
                            let cp = (self.c as *mut f32).add(at);
                            let prev = if self.beta == 0.0 { 0.0 } else { *cp * self.beta };
                            *cp = self.alpha * acc + prev;
                        }
                    }
                }
            }
        }
    }
}

/// The CPU emulator's device side (feature `cuda-emu`): host allocations and the C++-compiled
/// kernels. Without the feature the emulator cannot be selected and these are unreachable.
mod emu {
    use super::*;

    #[cfg(feature = "cuda-emu")]
    mod table {
        include!(concat!(env!("OUT_DIR"), "/emu_table.rs"));
    }

    /// The emulator's block size for a request: whole 16-byte words (a float4 load's alignment),
    /// nothing more.
    pub fn class(bytes: usize) -> usize {
        bytes.max(1).div_ceil(16) * 16
    }

    #[cfg(feature = "cuda-emu")]
    const PAGE: usize = 4096;

    /// The pages holding a block of `bytes` (a multiple of 16) and the guard page after them.
    #[cfg(feature = "cuda-emu")]
    fn pages(bytes: usize) -> usize {
        bytes.div_ceil(PAGE) * PAGE + PAGE
    }

    /// A block of `bytes` (a [`class`]) of host memory standing for device memory, ending
    /// exactly where an inaccessible guard page starts: a kernel that reads or writes past the
    /// end of a buffer stops the process with SIGSEGV at that access (electric-fence style),
    /// where the GPU's rounded-up blocks would let it pass unseen or fault somewhere later.
    /// With `DPTRAIN_CUDA_EMULATOR_GUARD=front` the block starts right after the guard page
    /// instead, for accesses before a buffer's start.
    pub fn alloc(bytes: usize) -> std::result::Result<u64, String> {
        #[cfg(feature = "cuda-emu")]
        {
            alloc_guarded(bytes, crate::env::env().cuda_emulator_guard_front)
        }
        #[cfg(not(feature = "cuda-emu"))]
        {
            Err(format!("no CUDA emulator in this build to allocate {bytes} bytes"))
        }
    }

    /// Returns a block [`alloc`] made for `bytes` (the cache keys blocks by class).
    pub fn free(p: u64, bytes: usize) {
        #[cfg(feature = "cuda-emu")]
        free_guarded(p, bytes, crate::env::env().cuda_emulator_guard_front);
        #[cfg(not(feature = "cuda-emu"))]
        let _ = (p, bytes);
    }

    /// [`alloc`] with the guard page after the block, or before it (`front`).
    #[cfg(feature = "cuda-emu")]
    fn alloc_guarded(bytes: usize, front: bool) -> std::result::Result<u64, String> {
        let len = pages(bytes);
        // SAFETY: a fresh private anonymous mapping; one page of it is made inaccessible.
        unsafe {
            let base =
                libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
            if base == libc::MAP_FAILED {
                return Err(format!("host mapping of {bytes} bytes failed"));
            }
            let base = base as *mut u8;
            let guard = if front { base } else { base.add(len - PAGE) };
            if libc::mprotect(guard as *mut libc::c_void, PAGE, libc::PROT_NONE) != 0 {
                libc::munmap(base as *mut libc::c_void, len);
                return Err("guard page: mprotect failed".into());
            }
            Ok(if front { base.add(PAGE) as u64 } else { guard as u64 - bytes as u64 })
        }
    }

    #[cfg(feature = "cuda-emu")]
    fn free_guarded(p: u64, bytes: usize, front: bool) {
        let len = pages(bytes);
        let base = if front { p - PAGE as u64 } else { p + bytes as u64 + PAGE as u64 - len as u64 };
        // SAFETY: the whole mapping `alloc_guarded` made for this block.
        unsafe { libc::munmap(base as *mut libc::c_void, len) };
    }

    /// The order the emulator runs blocks and threads in (`DPTRAIN_CUDA_EMULATOR_SCHEDULE`).
    pub fn set_schedule(seed: u64) {
        #[cfg(feature = "cuda-emu")]
        {
            unsafe extern "C" {
                fn emu_set_schedule(seed: u64);
            }
            // SAFETY: sets two integers of the emulator's scheduler, which runs on this thread.
            unsafe { emu_set_schedule(seed) }
        }
        #[cfg(not(feature = "cuda-emu"))]
        let _ = seed;
    }

    #[cfg(feature = "cuda-emu")]
    pub(crate) use table::Launch;
    /// Without the emulator no launch can be recorded (the type only fills `EmuOp`).
    #[cfg(not(feature = "cuda-emu"))]
    pub(crate) type Launch = unsafe extern "C" fn(u32, u32, *mut *mut std::ffi::c_void);

    /// Kernel `file.name` as one emulator operation, its arguments' values copied (so it can
    /// run now or be recorded into a graph).
    pub fn launch(
        file: &'static str,
        name: &'static str,
        cfg: LaunchConfig,
        params: &mut [*mut std::ffi::c_void],
    ) -> Result<super::graph::EmuOp> {
        #[cfg(feature = "cuda-emu")]
        {
            let (f, z) = table::lookup(file, name).ok_or_else(|| Error::Device(format!("emulator: no kernel {file}.{name}")))?;
            let mut sizes = [0u32; 64];
            // SAFETY: writes at most 64 sizes (build.rs refuses kernels with more parameters).
            let n = unsafe { z(sizes.as_mut_ptr()) } as usize;
            if n != params.len() {
                return Err(Error::Device(format!("emulator: {file}.{name} takes {n} arguments, {} given", params.len())));
            }
            let args = params
                .iter()
                .zip(&sizes[..n])
                .map(|(&p, &sz)| {
                    let mut v = vec![0u64; (sz as usize).div_ceil(8)];
                    // SAFETY: the caller's pointer addresses an argument of the kernel's declared
                    // type (see `launch_raw`), `sz` bytes.
                    unsafe { std::ptr::copy_nonoverlapping(p as *const u8, v.as_mut_ptr() as *mut u8, sz as usize) };
                    v
                })
                .collect();
            Ok(super::graph::EmuOp::Launch { f, grid: cfg.grid_dim.0, block: cfg.block_dim.0, args })
        }
        #[cfg(not(feature = "cuda-emu"))]
        {
            let _ = (cfg, params);
            Err(Error::Device(format!("{file}.{name}: this build has no CUDA emulator")))
        }
    }

    #[cfg(all(test, feature = "cuda-emu"))]
    mod tests {
        /// Every block, whatever its size, is usable from its first to its last byte and borders
        /// an inaccessible page (read from /proc/self/maps): right after its end, or right
        /// before its start in `front` mode — one byte past (or before) any buffer is a fault.
        #[test]
        fn an_emulator_block_borders_its_guard_page() {
            let perms = |at: u64| {
                let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
                maps.lines().find_map(|l| {
                    let (range, rest) = l.split_once(' ')?;
                    let (a, b) = range.split_once('-')?;
                    let (a, b) = (u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?);
                    (a <= at && at < b).then(|| rest[..4].to_string())
                })
            };
            for front in [false, true] {
                for bytes in [1, 100, 4096, 5000, 1 << 20] {
                    let c = super::class(bytes);
                    let p = super::alloc_guarded(c, front).unwrap();
                    let end = p + c as u64;
                    assert!(p.is_multiple_of(16), "{bytes}: {p:#x}");
                    assert!(if front { p.is_multiple_of(4096) } else { end.is_multiple_of(4096) }, "{bytes}: {p:#x}..{end:#x}");
                    // SAFETY: the block is `c` bytes of writable memory.
                    unsafe { std::ptr::write_bytes(p as *mut u8, 7, c) };
                    let outside = if front { p - 1 } else { end };
                    assert_eq!(perms(outside).as_deref(), Some("---p"), "{bytes} (front {front}): the page beside the block");
                    super::free_guarded(p, c, front);
                }
            }
        }
    }
}

/// One GEMM operand: a row-major logical matrix at `ptr`, either stored row-major (`trans =
/// false`, leading dimension = row stride) or as the transpose of a row-major matrix (`trans =
/// true`, leading dimension = column stride). In cuBLAS's column-major terms the first is the
/// operand's transpose read with op N, the second the operand itself read with op T.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatArg {
    pub ptr: u64,
    pub trans: bool,
    pub ld: usize,
    pub batch_stride: usize,
}

/// How a `[rows, cols]` view with element strides `(rs, cs)` can be handed to cuBLAS without a
/// copy: `Some((trans, ld))`, or `None` when it must be packed first.
pub fn mat_layout(rows: usize, cols: usize, rs: usize, cs: usize) -> Option<(bool, usize)> {
    if (cs == 1 || cols == 1) && rs >= cols.max(1) {
        Some((false, rs))
    } else if (rs == 1 || rows == 1) && cs >= rows.max(1) {
        Some((true, cs))
    } else if rows == 1 && cols == 1 {
        Some((false, 1))
    } else {
        None
    }
}

/// Dims of a view with size-1 dims dropped and neighbours merged where the outer stride is
/// the inner extent (`(size, stride)`, outermost first): the strided copy kernel walks at most
/// six, and GEMM batch dims must merge to one.
pub fn merge_dims(shape: &[usize], strides: &[usize]) -> Vec<(usize, usize)> {
    let mut dims: Vec<(usize, usize)> = shape.iter().zip(strides).filter(|(&n, _)| n != 1).map(|(&n, &s)| (n, s)).collect();
    let mut i = 1;
    while i < dims.len() {
        let ((n0, s0), (n1, s1)) = (dims[i - 1], dims[i]);
        if s0 == n1 * s1 {
            dims[i - 1] = (n0 * n1, s1);
            dims.remove(i);
        } else {
            i += 1;
        }
    }
    dims
}

/// Elements a GEMM operand of logical shape `[rows, cols]` reads from its pointer over `batch`
/// matrices: one past the largest offset.
pub fn operand_extent(rows: usize, cols: usize, m: &MatArg, batch: usize) -> usize {
    if rows == 0 || cols == 0 || batch == 0 {
        return 0;
    }
    let last = if m.trans { (rows - 1) + (cols - 1) * m.ld } else { (rows - 1) * m.ld + (cols - 1) };
    (batch - 1) * m.batch_stride + last + 1
}

/// A block of device memory from a device's cache; goes back to the cache on drop.
pub struct DevBuf {
    pub ptr: u64,
    class: usize,
    dev: Arc<CudaDev>,
    /// The CUDA graph pool the block came from (allocated during a capture), if any.
    pool: Option<Arc<graph::GraphPool>>,
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        match &self.pool {
            Some(p) => p.give(self.class, self.ptr),
            // A block from before a capture, freed during it: captured operations may still
            // use it at replay, so it is the graph's now (not the cache's, where work between
            // replays could be handed it).
            None => match self.dev.capture_pool() {
                Some(p) => p.adopt(self.class, self.ptr),
                None => {
                    if let Ok(mut c) = self.dev.cache.lock() {
                        c.give(self.class, self.ptr);
                    }
                }
            },
        }
    }
}

impl DevBuf {
    /// The device this block belongs to.
    pub fn dev(&self) -> &Arc<CudaDev> {
        &self.dev
    }
    /// The first `len` elements of type `dtype` of this block.
    pub fn region(&self, dtype: DType, len: usize) -> Result<DevRegion> {
        if len * dtype.size_in_bytes() > self.class {
            return Err(Error::Device(format!("{len} {dtype} elements do not fit a block of {} bytes", self.class)));
        }
        Ok(DevRegion { ptr: self.ptr, len, dtype })
    }
}

/// A run of elements of one device buffer: its address, length and element type. Raw kernel
/// launches and NCCL calls take these rather than addresses computed by hand, so an offset is
/// always scaled by the right element size and checked against the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevRegion {
    pub ptr: u64,
    pub len: usize,
    pub dtype: DType,
}

impl DevRegion {
    /// Bytes covered.
    pub fn bytes(&self) -> usize {
        self.len * self.dtype.size_in_bytes()
    }
}

/// Element-typed device storage (f32 or bf16).
pub struct CudaStorage {
    pub buf: DevBuf,
    pub dtype: DType,
    pub len: usize,
}

impl CudaStorage {
    pub fn dev(&self) -> &Arc<CudaDev> {
        &self.buf.dev
    }
    /// Device address of element `i`.
    pub fn ptr_at(&self, i: usize) -> u64 {
        self.buf.ptr + (i * self.dtype.size_in_bytes()) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::mat_layout;

    #[test]
    fn gemm_operand_layouts() {
        // Packed row-major [4, 3]: op N on its transpose, ld 3.
        assert_eq!(mat_layout(4, 3, 3, 1), Some((false, 3)));
        // Transposed view of a packed [3, 4] (strides (1, 4)): op T, ld 4.
        assert_eq!(mat_layout(4, 3, 1, 4), Some((true, 4)));
        // A narrowed view keeps its parent's row stride.
        assert_eq!(mat_layout(4, 3, 9, 1), Some((false, 9)));
        // Vectors: any stride of the unit dim is fine.
        assert_eq!(mat_layout(5, 1, 1, 0), Some((false, 1)));
        assert_eq!(mat_layout(1, 5, 0, 1), Some((true, 1)));
        // Neither dim unit-strided: must be packed.
        assert_eq!(mat_layout(4, 3, 6, 2), None);
    }

    /// The strided copy kernel's index walk over merged dims (a transcription of
    /// `strided_copy_f32` in elementwise.cu) gathers exactly what the CPU's strided copy does,
    /// for transposes, narrows, permutes and stride-0 broadcasts.
    #[test]
    fn merged_dims_address_the_same_elements() {
        use crate::tensor::Tensor;
        let base = Tensor::from_vec((0..720).map(|i| i as f32).collect::<Vec<f32>>(), &[4, 5, 6, 6]).unwrap();
        let views = [
            base.transpose(1, 3).unwrap(),
            base.narrow(2, 1, 3).unwrap().permute(&[3, 0, 2, 1]).unwrap(),
            base.narrow(0, 1, 2).unwrap(),
            base.reshape(&[20, 36]).unwrap().transpose(0, 1).unwrap(),
        ];
        for v in &views {
            let want = v.contiguous().to_vec::<f32>().unwrap();
            let dims = super::merge_dims(v.shape(), v.strides());
            assert!(dims.len() <= v.rank());
            let src = base.to_vec::<f32>().unwrap();
            let got: Vec<f32> = (0..v.numel())
                .map(|i| {
                    let (mut rem, mut at) = (i, v.offset());
                    for &(n, s) in dims.iter().rev() {
                        at += (rem % n) * s;
                        rem /= n;
                    }
                    src[at]
                })
                .collect();
            assert_eq!(got, want, "view {:?} strides {:?}", v.shape(), v.strides());
        }
        // Broadcast [3] -> [4, 3] (stride 0) and an all-unit shape.
        assert_eq!(super::merge_dims(&[4, 3], &[0, 1]), vec![(4, 0), (3, 1)]);
        assert_eq!(super::merge_dims(&[4, 5, 3], &[0, 0, 1]), vec![(20, 0), (3, 1)]);
        assert!(super::merge_dims(&[1, 1], &[7, 9]).is_empty());
        // Contiguous batch dims merge to one (a GEMM batch stride).
        assert_eq!(super::merge_dims(&[2, 3], &[3 * 20, 20]), vec![(6, 20)]);
    }

    #[test]
    fn operand_extent_covers_the_last_element() {
        use super::{operand_extent, MatArg};
        let m = |trans, ld, bs| MatArg { ptr: 0, trans, ld, batch_stride: bs };
        // packed [4, 3]: 12 elements; as a transposed view of packed [3, 4]: also 12.
        assert_eq!(operand_extent(4, 3, &m(false, 3, 0), 1), 12);
        assert_eq!(operand_extent(4, 3, &m(true, 4, 0), 1), 12);
        // a [4, 3] block at row stride 10 (a narrow): 3·10 + 3.
        assert_eq!(operand_extent(4, 3, &m(false, 10, 0), 1), 33);
        // 5 packed matrices of [4, 3].
        assert_eq!(operand_extent(4, 3, &m(false, 3, 12), 5), 60);
        // broadcast over the batch (stride 0): one matrix.
        assert_eq!(operand_extent(4, 3, &m(false, 3, 0), 5), 12);
    }
}
