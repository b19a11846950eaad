//! Every environment variable dptrain itself reads, in one place: its name, what it does, and its
//! typed value, read once per process. Variables that belong to other programs (MPI's and Slurm's
//! rank variables, `LD_LIBRARY_PATH`, `PATH`, `HOME`) are read where they are used; these are
//! dptrain's own switches, none of them needed for normal use.

use std::path::PathBuf;
use std::sync::OnceLock;

/// (name, what it does), for documentation; every entry is a field of [`Env`].
pub const VARS: &[(&str, &str)] = &[
    ("DPTRAIN_LOG", "log filter for tracing (e.g. `info`, `dptrain_comm=debug`); default `warn`"),
    ("DPTRAIN_POOL", "`0` turns the CPU buffer pool off (for measuring it)"),
    ("DPTRAIN_FLASH", "`0` runs attention on a GPU unfused (cuBLAS products around a softmax kernel) where flash attention would run (for measuring it)"),
    ("DPTRAIN_FLASH_ROWS", "`64` runs the flash attention forward on 64-row query tiles instead of 128 (for measuring it)"),
    ("DPTRAIN_WIDE_LOADS", "`0` makes GELU on bf16 activations, layer norm and the cross-entropy rows read and write one element per access instead of 16 bytes (for measuring it)"),
    ("DPTRAIN_EPILOGUE", "`0` makes a GPU linear add its bias (and sum its bias gradient) in a pass of its own instead of in the cuBLASLt GEMM (for measuring it)"),
    ("DPTRAIN_GELU_EPILOGUE", "`0` runs a GPT MLP's tanh GELU on a GPU in kernels of its own (the two ops `layer_norm_linear` and `gelu_linear`) instead of in its GEMMs' cuBLASLt epilogues (for measuring it)"),
    ("DPTRAIN_STEP_SYNC", "`1` makes every GPU training step wait for the device (read the loss and gradient norm, then decide the update on the host) instead of deciding it there and reading the record on logging steps (for measuring it)"),
    ("DPTRAIN_SOLVER", "`0` computes SOAP's eigenbases (eigendecompositions, QR) on the host instead of on the GPU with cuSOLVER (for measuring it)"),
    ("DPTRAIN_CUDA_EMULATOR", "`1` runs the CUDA kernels on the CPU emulator (test builds with the `cuda-emu` feature)"),
    (
        "DPTRAIN_CUDA_EMULATOR_SCHEDULE",
        "tests: a number that makes the CUDA emulator run each launch's blocks, and a block's threads between barriers, in a pseudo-random order of its own (0, the default: in index order); a result that changes with it depends on the order (float atomics, races)",
    ),
    (
        "DPTRAIN_CUDA_EMULATOR_GUARD",
        "tests: `front` puts the CUDA emulator's inaccessible guard page right before each device buffer instead of right after it, so an access before a buffer's start (a negative index) faults instead of one past its end (scripts/test.sh runs the kernel tests both ways)",
    ),
    ("DPTRAIN_GPU_CHECK_TINY", "`1` shrinks gpu-check's GPT-124M and trainer parts to tiny models (tests on the emulator)"),
    ("DPTRAIN_TORCH_PYTHON", "the python that runs gpu-check's PyTorch side (default `python3`)"),
    ("DPTRAIN_TORCH_SCRIPT", "gpu-check's PyTorch script (default `benches/gpt124m_torch.py`)"),
    (
        "DPTRAIN_KERNEL_CACHE",
        "where compiled CUDA kernels are kept between runs (default `$XDG_CACHE_HOME/dptrain/kernels`, else `~/.cache/dptrain/kernels`); `0` compiles them every run and keeps nothing",
    ),
    ("DPTRAIN_NCCL_LIB", "a specific libnccl.so.2 (or its directory) to use"),
    ("DPTRAIN_NCCL_REEXEC", "set by dptrain on its one re-execution with the CUDA libraries on the library path"),
    ("DPTRAIN_INSTALL_TORCH", "benches: `1` installs torch into a venv under /tmp when no DPTRAIN_TORCH_PYTHON is given"),
    ("DPTRAIN_BENCH_STEPS", "benches: timed steps per model (default 10)"),
    ("DPTRAIN_BENCH_DEVICE", "benches: `cuda` runs the probe-cost benchmark on the GPU (default `cpu`)"),
    (
        "DPTRAIN_REQUIRE_NVRTC",
        "tests: `1` makes the NVRTC tests fail instead of skipping when libnvrtc.so.13 cannot be loaded (scripts/test.sh sets it)",
    ),
    (
        "DPTRAIN_TEST_DUMP_BUFFERS",
        "tests: a directory where each rank writes its own batch-norm running statistics before they are averaged over ranks (builds with the `fault-injection` feature only)",
    ),
];

/// The typed values of [`VARS`].
#[derive(Debug, Clone)]
pub struct Env {
    pub log: Option<String>,
    pub pool: bool,
    pub flash: bool,
    pub flash_rows: usize,
    pub wide_loads: bool,
    pub epilogue: bool,
    pub gelu_epilogue: bool,
    pub step_sync: bool,
    pub solver: bool,
    pub cuda_emulator: bool,
    pub cuda_emulator_schedule: u64,
    pub cuda_emulator_guard_front: bool,
    pub gpu_check_tiny: bool,
    pub torch_python: Option<String>,
    pub torch_script: String,
    /// None when `DPTRAIN_KERNEL_CACHE=0`.
    pub kernel_cache: Option<PathBuf>,
    pub nccl_lib: Option<PathBuf>,
    pub nccl_reexec: bool,
    pub install_torch: bool,
    pub bench_steps: Option<usize>,
    pub bench_device: String,
    pub require_nvrtc: bool,
    pub test_dump_buffers: Option<PathBuf>,
}

impl Env {
    /// Reads the variables from the process environment.
    pub fn from_process() -> Env {
        let var = |k: &str| std::env::var(k).ok();
        let flag = |k: &str| var(k).as_deref() == Some("1");
        Env {
            log: var("DPTRAIN_LOG"),
            pool: var("DPTRAIN_POOL").as_deref() != Some("0"),
            flash: var("DPTRAIN_FLASH").as_deref() != Some("0"),
            flash_rows: var("DPTRAIN_FLASH_ROWS").and_then(|s| s.parse().ok()).unwrap_or(128),
            wide_loads: var("DPTRAIN_WIDE_LOADS").as_deref() != Some("0"),
            epilogue: var("DPTRAIN_EPILOGUE").as_deref() != Some("0"),
            gelu_epilogue: var("DPTRAIN_GELU_EPILOGUE").as_deref() != Some("0"),
            step_sync: flag("DPTRAIN_STEP_SYNC"),
            solver: var("DPTRAIN_SOLVER").as_deref() != Some("0"),
            cuda_emulator: flag("DPTRAIN_CUDA_EMULATOR"),
            cuda_emulator_schedule: var("DPTRAIN_CUDA_EMULATOR_SCHEDULE").and_then(|s| s.parse().ok()).unwrap_or(0),
            cuda_emulator_guard_front: var("DPTRAIN_CUDA_EMULATOR_GUARD").as_deref() == Some("front"),
            gpu_check_tiny: flag("DPTRAIN_GPU_CHECK_TINY"),
            torch_python: var("DPTRAIN_TORCH_PYTHON"),
            torch_script: var("DPTRAIN_TORCH_SCRIPT").unwrap_or_else(|| "benches/gpt124m_torch.py".into()),
            kernel_cache: match std::env::var_os("DPTRAIN_KERNEL_CACHE") {
                Some(v) if v == "0" => None,
                Some(v) if !v.is_empty() => Some(PathBuf::from(v)),
                _ => Some(user_cache_dir().join("dptrain").join("kernels")),
            },
            nccl_lib: std::env::var_os("DPTRAIN_NCCL_LIB").map(PathBuf::from),
            nccl_reexec: std::env::var_os("DPTRAIN_NCCL_REEXEC").is_some(),
            install_torch: flag("DPTRAIN_INSTALL_TORCH"),
            bench_steps: var("DPTRAIN_BENCH_STEPS").and_then(|s| s.parse().ok()),
            bench_device: var("DPTRAIN_BENCH_DEVICE").unwrap_or_else(|| "cpu".into()),
            require_nvrtc: flag("DPTRAIN_REQUIRE_NVRTC"),
            test_dump_buffers: std::env::var_os("DPTRAIN_TEST_DUMP_BUFFERS").map(PathBuf::from),
        }
    }
}

/// The user's cache directory: `$XDG_CACHE_HOME`, else `~/.cache`, else the temporary directory.
pub fn user_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
}

/// The process's values, read on first use.
pub fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(Env::from_process)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No other source file of the workspace reads a `DPTRAIN_*` variable itself.
    #[test]
    fn dptrain_variables_are_read_here_only() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut stack = vec![root.clone()];
        let mut offenders = vec![];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap().flatten() {
                let p = e.path();
                let name = e.file_name().to_string_lossy().to_string();
                if p.is_dir() && !name.starts_with('.') && name != "target" && name != "tests" {
                    stack.push(p);
                } else if name.ends_with(".rs") && !p.ends_with("core/src/env.rs") {
                    let text = std::fs::read_to_string(&p).unwrap();
                    for pat in ["var(\"DPTRAIN_", "var_os(\"DPTRAIN_", "from_env(\"DPTRAIN_"] {
                        if text.contains(pat) {
                            offenders.push(p.strip_prefix(&root).unwrap_or(&p).display().to_string());
                        }
                    }
                }
            }
        }
        assert!(offenders.is_empty(), "read DPTRAIN_* through dptrain_core::env instead: {offenders:?}");
    }

    #[test]
    fn every_variable_read_is_documented() {
        let src = include_str!("env.rs");
        let body = &src[src.find("fn from_process").unwrap()..src.find("/// The process's values").unwrap()];
        let read: Vec<&str> = body.split('"').filter(|s| s.starts_with("DPTRAIN_")).collect();
        assert_eq!(read.len(), VARS.len());
        for name in read {
            assert!(VARS.iter().any(|(v, _)| *v == name), "{name} is read but not in VARS");
        }
    }
}
