//! CUDA kernel sources and their run-time compilation.
//!
//! Kernels are CUDA C (`*.cu` beside this file), embedded in the binary and compiled at run time
//! with NVRTC for the device's architecture, so no CUDA toolkit is needed to build and the
//! binary starts on machines without CUDA. Compilation goes through NVRTC's low-level API
//! so the program log is kept: a warning is as much a failure as an error (the CI test compiles
//! every source for sm_90 with NVRTC 13.0 — PTX newer than the GPU machines' driver would not
//! load). The device loads NVRTC's machine code (CUBIN), not its PTX, so the driver does not
//! compile it again, and keeps it on disk between runs (`kernel_cache`): a machine compiles
//! each source once, not each process. Each file is one NVRTC program except flash.cu, which
//! is one per entry point (`programs`), and the programs compile in parallel, so a first start
//! waits about as long as the slowest single kernel file rather than for flash attention's.

use cudarc::nvrtc::result as nvrtc;
use std::ffi::{CStr, CString};

/// Helpers prepended to every source.
pub const COMMON: &str = include_str!("common.cuh");

/// (name, source) of every kernel file.
pub const SOURCES: &[(&str, &str)] = &[
    ("elementwise", include_str!("elementwise.cu")),
    ("reduce", include_str!("reduce.cu")),
    ("layer_norm", include_str!("layer_norm.cu")),
    ("cross_entropy", include_str!("cross_entropy.cu")),
    ("attention", include_str!("attention.cu")),
    ("optim", include_str!("optim.cu")),
    ("embedding", include_str!("embedding.cu")),
    ("conv", include_str!("conv.cu")),
    ("batch_norm", include_str!("batch_norm.cu")),
    ("probe", include_str!("probe.cu")),
    ("linalg", include_str!("linalg.cu")),
    ("flash", include_str!("flash.cu")),
];

/// One NVRTC program: a kernel file, or one entry point of flash.cu.
#[derive(Debug)]
pub struct Program {
    /// The kernel file (`SOURCES`' name) its kernels are launched by.
    pub file: &'static str,
    /// The program's own name (the file's, or the flash kernel's): the kernel cache's and the
    /// error messages'.
    pub name: String,
    /// The source NVRTC compiles (after `COMMON`).
    pub source: String,
}

/// Every NVRTC program, flash attention's (the longest to compile) first. flash.cu is one program per entry point
/// (`FA_PART`, see the end of flash.cu): ptxas takes 0.4–1 s for each of its kernels (2 cores),
/// so as one program it took 9–12 s, more than all the other files together, and a device's
/// first start waited for it even with the files compiled in parallel.
pub fn programs() -> &'static [Program] {
    static PROGRAMS: std::sync::OnceLock<Vec<Program>> = std::sync::OnceLock::new();
    PROGRAMS.get_or_init(|| {
        let flash = SOURCES.iter().find(|(f, _)| *f == "flash").expect("flash.cu is a kernel file").1;
        let part = |name: String, define: String| Program { file: "flash", name, source: format!("{define}\n{flash}") };
        let mut all = vec![];
        for kind in ["bwd_dkv", "bwd_dq", "fwd128", "fwd"] {
            for (d, suf, e) in [(64, "_bf16", "bf16_t"), (64, "", "float"), (32, "_bf16", "bf16_t"), (32, "", "float")] {
                let name = format!("flash_{kind}_d{d}{suf}");
                all.push(part(name, format!("#define FA_PART FA_{}({d}, {suf}, {e})", kind.to_uppercase())));
            }
        }
        all.push(part("flash_bwd_dot".into(), "#define FA_PART\n#define FA_DOT".into()));
        let rest = SOURCES.iter().filter(|(f, _)| *f != "flash");
        all.extend(rest.map(|&(file, src)| Program { file, name: file.to_string(), source: src.to_string() }));
        all
    })
}

/// True when the NVRTC library can be loaded (checked without letting cudarc panic).
pub fn nvrtc_available() -> bool {
    // SAFETY: is_culib_present only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// True when cuBLAS can be loaded.
pub fn cublas_available() -> bool {
    // SAFETY: is_culib_present only tries to dlopen the library.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

/// True when cuSOLVER can be loaded (dense linear algebra on the device, `ops::linalg`).
pub fn cusolver_available() -> bool {
    // SAFETY: is_culib_present only tries to dlopen the library.
    unsafe { cudarc::cusolver::sys::is_culib_present() }
}

/// True when the CUDA driver library (libcuda) can be loaded.
pub fn driver_available() -> bool {
    // SAFETY: is_culib_present only tries to dlopen the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// A compiled kernel file. (`name` and `log` are read by the NVRTC tests; the device loads
/// `cubin`, or `ptx` should the driver refuse it.)
#[derive(Debug, Clone)]
#[cfg_attr(not(test), allow(dead_code))]
pub struct Compiled {
    pub name: &'static str,
    pub ptx: String,
    /// The machine code for a real architecture (`sm_XY`; empty for a virtual `compute_XY`).
    /// NVRTC runs ptxas for a real architecture anyway: loading its output spares the driver
    /// compiling the PTX a second time (ptxas is over half of NVRTC's time here; flash
    /// attention's kernels take it seconds).
    pub cubin: Vec<u8>,
    /// NVRTC's program log (warnings); empty on a clean compile.
    pub log: String,
    /// How long NVRTC took (a start waits for the slowest program).
    pub seconds: f64,
}

/// NVRTC's options for `arch` (before any a caller adds).
fn options(arch: &str) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}"), "--std=c++17".into(), "-default-device".into()]
}

/// NVRTC's version and options, as the kernel cache's key has them.
pub fn compiler_id(arch: &str) -> String {
    let (major, minor) = nvrtc_version().unwrap_or((0, 0));
    format!("nvrtc {major}.{minor} {}", options(arch).join(" "))
}

/// The machine code of kernel file `name` for `arch` (a real one, `sm_XY`): from `cache` when
/// it holds exactly this source compiled by this NVRTC, else compiled (and kept there; a cache
/// that cannot be written is only logged). True when it came from the cache.
pub fn cubin(name: &'static str, src: &str, arch: &str, cache: Option<&KernelCache>) -> Result<(Vec<u8>, bool), String> {
    if !nvrtc_available() {
        return Err("the NVRTC library (libnvrtc.so.13) was not found; put its directory on LD_LIBRARY_PATH".into());
    }
    let full = format!("{COMMON}\n{src}");
    let compiler = compiler_id(arch);
    let key = kernel_cache::Key { name, arch, compiler: &compiler, source: &full };
    if let Some(bin) = cache.and_then(|c| c.get(&key)) {
        return Ok((bin, true));
    }
    let c = compile(name, src, arch)?;
    if c.cubin.is_empty() {
        return Err(format!("{name}: NVRTC gave no machine code for {arch}"));
    }
    if let Some(cache) = cache {
        if let Err(e) = cache.put(&key, &c.cubin) {
            // Once per process, not once per kernel file.
            static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!("kernel cache: {e}; the kernels are compiled again next run (DPTRAIN_KERNEL_CACHE sets another directory, 0 turns it off)");
            }
        }
    }
    Ok((c.cubin, false))
}

fn log_of(prog: cudarc::nvrtc::sys::nvrtcProgram) -> String {
    // SAFETY: `prog` is a live program; NVRTC returns a NUL-terminated log.
    unsafe { nvrtc::get_program_log(prog) }
        .map(|v| unsafe { CStr::from_ptr(v.as_ptr()) }.to_string_lossy().trim().to_string())
        .unwrap_or_default()
}

/// Compiles one kernel file for `arch` (e.g. "sm_90"). Errors carry NVRTC's log.
pub fn compile(name: &'static str, src: &str, arch: &str) -> Result<Compiled, String> {
    compile_with(name, src, arch, &[])
}

/// [`compile`] with more NVRTC options (the tests ask ptxas for its resource report).
fn compile_with(name: &'static str, src: &str, arch: &str, extra: &[&str]) -> Result<Compiled, String> {
    if !nvrtc_available() {
        return Err("the NVRTC library (libnvrtc.so.13) was not found; put its directory on LD_LIBRARY_PATH".into());
    }
    let full = CString::new(format!("{COMMON}\n{src}")).map_err(|_| format!("{name}: source contains a NUL byte"))?;
    let cname = CString::new(format!("{name}.cu")).expect("no NUL in names");
    let prog = nvrtc::create_program(&full, Some(&cname)).map_err(|e| format!("{name}: {e:?}"))?;
    let mut opts = options(arch);
    opts.extend(extra.iter().map(|o| o.to_string()));
    let t0 = std::time::Instant::now();
    // SAFETY: `prog` was just created and is destroyed below; options are valid C strings.
    let res = unsafe { nvrtc::compile_program(prog, &opts) };
    let seconds = t0.elapsed().as_secs_f64();
    let log = log_of(prog);
    let out = match res {
        Err(e) => Err(format!("{name}: NVRTC error {e:?}\n{log}")),
        Ok(()) => {
            // SAFETY: compilation succeeded, so the PTX is available; it is NUL-terminated.
            let ptx = unsafe { nvrtc::get_ptx(prog) }.map_err(|e| format!("{name}: {e:?}"))?;
            let ptx = unsafe { CStr::from_ptr(ptx.as_ptr()) }.to_string_lossy().to_string();
            let cubin = if arch.starts_with("sm_") { cubin_of(prog).map_err(|e| format!("{name}: {e}"))? } else { vec![] };
            Ok(Compiled { name, ptx, cubin, log, seconds })
        }
    };
    // SAFETY: destroyed exactly once, after its last use.
    let _ = unsafe { nvrtc::destroy_program(prog) };
    out
}

/// NVRTC's (major, minor) version, once it loads.
pub fn nvrtc_version() -> Option<(i32, i32)> {
    if !nvrtc_available() {
        return None;
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid out-pointers.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    (r == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS).then_some((major, minor))
}

/// The architectures NVRTC compiles for, as numbers (75 for sm_75), ascending.
pub fn supported_archs() -> Vec<i32> {
    use cudarc::nvrtc::sys::{self, nvrtcResult};
    if !nvrtc_available() {
        return vec![];
    }
    let mut n = 0;
    // SAFETY: a valid out-pointer.
    if unsafe { sys::nvrtcGetNumSupportedArchs(&mut n) } != nvrtcResult::NVRTC_SUCCESS || n <= 0 {
        return vec![];
    }
    let mut archs = vec![0; n as usize];
    // SAFETY: `archs` holds the `n` entries NVRTC said it writes.
    if unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) } != nvrtcResult::NVRTC_SUCCESS {
        return vec![];
    }
    archs.sort_unstable();
    archs
}

/// For a device architecture (`sm_XY`) newer than every one NVRTC knows, the virtual
/// architecture to hand the driver PTX for (`compute_` of the newest NVRTC knows); None when
/// NVRTC compiles for it (or cannot say). A device older than NVRTC's oldest is an error that
/// says so — NVRTC's own would only call the option invalid.
fn newer_than_nvrtc(arch: &str) -> Result<Option<String>, String> {
    let Some(n) = arch.strip_prefix("sm_").and_then(|d| d.parse::<i32>().ok()) else { return Ok(None) };
    let known = supported_archs();
    let (Some(&oldest), Some(&newest)) = (known.first(), known.last()) else { return Ok(None) };
    if n < oldest {
        let v = nvrtc_version().map(|(a, b)| format!(" {a}.{b}")).unwrap_or_default();
        return Err(format!(
            "this GPU is {arch}, and NVRTC{v} compiles for sm_{oldest} and newer: use a GPU of compute capability {}.{} or later",
            oldest / 10,
            oldest % 10
        ));
    }
    Ok((n > newest).then(|| format!("compute_{newest}")))
}

/// A kernel file's code as the driver takes it.
#[derive(Debug, Clone)]
pub enum Image {
    /// Machine code for the device's architecture: loaded as is.
    Cubin(Vec<u8>),
    /// PTX: the driver compiles it when loading.
    Ptx(String),
}

/// How a device got its kernels when it was opened.
#[derive(Debug, Clone, Default)]
pub struct KernelLoad {
    /// NVRTC programs loaded (one per module).
    pub programs: usize,
    /// Of those, how many came compiled from the kernel cache.
    pub from_cache: usize,
    /// How many the driver refused as machine code and took as PTX instead.
    pub as_ptx: usize,
    /// Wall time to have them all compiled and loaded.
    pub seconds: f64,
    /// The kernel cache's directory (None when `DPTRAIN_KERNEL_CACHE=0`).
    pub cache_dir: Option<std::path::PathBuf>,
    /// What NVRTC compiled for: the device's architecture, or `compute_XY` (PTX for the
    /// newest architecture it knows) for a GPU newer than this NVRTC.
    pub target: String,
}

impl std::fmt::Display for KernelLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.programs == 0 {
            return write!(f, "none compiled (the CPU emulator runs them as C++)");
        }
        write!(
            f,
            "{} programs from {} kernel files in {:.1} s, {} from the kernel cache",
            self.programs,
            SOURCES.len(),
            self.seconds,
            self.from_cache
        )?;
        match &self.cache_dir {
            Some(d) => write!(f, " ({})", d.display())?,
            None => write!(f, " (off)")?,
        }
        if self.target.starts_with("compute_") {
            write!(f, ", all as PTX for {} (newer than this NVRTC knows; the driver compiles them)", self.target)?;
        } else if self.as_ptx > 0 {
            write!(f, ", {} loaded as PTX (the driver refused their machine code)", self.as_ptx)?;
        }
        Ok(())
    }
}

/// Every program's machine code for `arch`, from `cache` or compiled — in parallel, since
/// NVRTC takes seconds for them all — handed to `load` (the driver's module load on a GPU).
/// Should `load` refuse a program's machine code, its PTX is handed over instead, which the
/// driver compiles itself; a program neither loads is the error, naming it. Returns the loaded
/// modules with their kernel files, in `programs()` order, and how they were had.
pub fn load_all<M>(
    arch: &str,
    cache: Option<&KernelCache>,
    mut load: impl FnMut(&'static str, Image) -> Result<M, String>,
) -> Result<(Vec<(&'static str, M)>, KernelLoad), String> {
    let t0 = std::time::Instant::now();
    let programs = programs();
    let mut how = KernelLoad {
        programs: programs.len(),
        target: arch.to_string(),
        cache_dir: cache.map(|c| c.dir().to_path_buf()),
        ..Default::default()
    };
    let mut modules = Vec::with_capacity(programs.len());
    if let Some(virt) = newer_than_nvrtc(arch)? {
        // PTX is forward-compatible: the driver compiles it for the GPU it has.
        tracing::warn!(
            "NVRTC {} does not compile for {arch}, newer than it knows: the kernels go to the driver as PTX for {virt} (a newer NVRTC compiles them for {arch} directly)",
            nvrtc_version().map(|(a, b)| format!("{a}.{b}")).unwrap_or_default()
        );
        let texts = per_program(|p| compile(&p.name, &p.source, &virt).map(|c| c.ptx));
        for (p, text) in programs.iter().zip(texts) {
            modules.push((p.file, load(&p.name, Image::Ptx(text?)).map_err(|e| format!("loading kernels {}: {e}", p.name))?));
        }
        how.as_ptx = programs.len();
        how.target = virt;
        how.seconds = t0.elapsed().as_secs_f64();
        return Ok((modules, how));
    }
    let bins = per_program(|p| cubin(&p.name, &p.source, arch, cache));
    for (p, bin) in programs.iter().zip(bins) {
        let (bin, cached) = bin?;
        how.from_cache += cached as usize;
        let m = match load(&p.name, Image::Cubin(bin)) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("kernels {}: the driver refused NVRTC's machine code for {arch} ({e}); loading the PTX", p.name);
                let c = compile(&p.name, &p.source, arch)?;
                how.as_ptx += 1;
                load(&p.name, Image::Ptx(c.ptx)).map_err(|e| format!("loading kernels {}: {e}", p.name))?
            }
        };
        modules.push((p.file, m));
    }
    how.seconds = t0.elapsed().as_secs_f64();
    Ok((modules, how))
}

/// `f` of every program, in `programs()` order, run on as many threads as the machine has
/// cores (NVRTC compiles separate programs concurrently), each taking the next program in
/// order — so flash attention's start first.
fn per_program<T: Send>(f: impl Fn(&'static Program) -> Result<T, String> + Sync) -> Vec<Result<T, String>> {
    let programs = programs();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get()).min(programs.len());
    let out: Vec<Option<Result<T, String>>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut done = vec![];
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(p) = programs.get(i) else { return done };
                        done.push((i, f(p)));
                    }
                })
            })
            .collect();
        let mut out: Vec<Option<Result<T, String>>> = programs.iter().map(|_| None).collect();
        for w in workers {
            for (i, r) in w.join().unwrap_or_default() {
                out[i] = Some(r);
            }
        }
        out
    });
    out.into_iter().map(|r| r.unwrap_or_else(|| Err("a kernel compile thread panicked".into()))).collect()
}

/// The machine code of a program compiled for a real architecture.
fn cubin_of(prog: cudarc::nvrtc::sys::nvrtcProgram) -> Result<Vec<u8>, String> {
    use cudarc::nvrtc::sys::{self, nvrtcResult};
    let mut size = 0usize;
    // SAFETY: `prog` is a live, successfully compiled program; `size` is a valid out-pointer.
    let r = unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) };
    if r != nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcGetCUBINSize: {r:?}"));
    }
    let mut bin = vec![0u8; size];
    // SAFETY: `bin` holds the `size` bytes NVRTC reported.
    let r = unsafe { sys::nvrtcGetCUBIN(prog, bin.as_mut_ptr().cast()) };
    if r != nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcGetCUBIN: {r:?}"));
    }
    Ok(bin)
}

/// Compiles every program for `arch` (in parallel, as a device start does).
#[cfg(test)]
pub fn compile_all(arch: &str) -> Result<Vec<Compiled>, String> {
    per_program(|p| compile(&p.name, &p.source, arch)).into_iter().collect()
}

pub mod kernel_cache;
pub mod ops;

pub use kernel_cache::KernelCache;

#[cfg(test)]
mod nvrtc_tests;
