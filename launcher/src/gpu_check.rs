//! `dptrain gpu-check`: the one-shot device check for a machine with a GPU. Prints the device,
//! the build's commit, and a table of every checked op's agreement with the CPU engine plus a
//! 1-rank NCCL all-reduce; exits 2
//! when there is no usable GPU (one line saying why) and 1 when an op disagrees.

use crate::error::{LaunchError, Result};
use dptrain_core::device::{cuda_status, CudaStatus};

pub fn run(device: usize) -> Result<()> {
    let n = match cuda_status() {
        CudaStatus::Devices(n) => n,
        CudaStatus::NotBuilt => return Err(LaunchError::Input("gpu-check: this dptrain was built without the `cuda` feature".into())),
        CudaStatus::NoDriver => return Err(LaunchError::Input("gpu-check: no CUDA driver (libcuda.so.1) on this machine".into())),
        CudaStatus::NoDevice(why) => return Err(LaunchError::Input(format!("gpu-check: no usable CUDA device ({why})"))),
    };
    if device >= n {
        return Err(LaunchError::Input(format!("gpu-check: --device {device}, but this machine has {n} CUDA device(s)")));
    }
    #[cfg(feature = "cuda")]
    {
        if !dptrain_core::kernels::cuda::nvrtc_available() {
            return Err(LaunchError::Input(
                "gpu-check: NVRTC (libnvrtc.so.13) not found; put pip's nvidia/cu13/lib on LD_LIBRARY_PATH (scripts/gpu-check.sh does)"
                    .into(),
            ));
        }
        let (info, rows) = dptrain_core::kernels::cuda::check::run(device).map_err(|e| LaunchError::Runtime(format!("gpu-check: {e}")))?;
        println!(
            "dptrain gpu-check — {} (compute capability {}.{}, kernels compiled for {}), commit {}",
            info.name,
            info.compute_capability.0,
            info.compute_capability.1,
            info.arch,
            option_env!("DPTRAIN_COMMIT").unwrap_or("unknown")
        );
        let mut rows = rows;
        // (d) NCCL: a 1-rank all-reduce (average) on the device must return its input.
        match dptrain_comm::nccl::single_rank_all_reduce(device, 1 << 20) {
            Ok(diff) => rows.push(dptrain_core::kernels::cuda::check::CheckRow {
                op: "nccl all_reduce avg, 1 rank, 4 MiB".into(),
                max_rel_err: diff,
                bound: 0.0,
            }),
            Err(e) => {
                eprintln!("gpu-check: NCCL: {e}");
                rows.push(dptrain_core::kernels::cuda::check::CheckRow {
                    op: "nccl all_reduce (not loadable)".into(),
                    max_rel_err: f64::INFINITY,
                    bound: 0.0,
                });
            }
        }
        println!("| op | max rel. error vs CPU | bound | ok |");
        println!("|---|---|---|---|");
        for r in &rows {
            println!("| {} | {:.2e} | {:.0e} | {} |", r.op, r.max_rel_err, r.bound, if r.ok() { "yes" } else { "NO" });
        }
        if rows.iter().any(|r| !r.ok()) {
            return Err(LaunchError::Runtime("gpu-check: some ops disagree with the CPU engine".into()));
        }
        Ok(())
    }
    #[cfg(not(feature = "cuda"))]
    {
        unreachable!("cuda_status() is NotBuilt without the cuda feature")
    }
}

/// Makes NCCL loadable for this process: if cudarc cannot load `libnccl.so` but a
/// `libnccl.so.2` is found (see `dptrain_comm::nccl_lib`), links it into a private directory and
/// re-executes the binary once with that directory on `LD_LIBRARY_PATH`. Returns normally when
/// nothing needs doing (or nothing was found: the NCCL check then reports it).
#[cfg(feature = "cuda")]
pub fn ensure_nccl() {
    use dptrain_comm::nccl_lib;
    use std::os::unix::process::CommandExt;
    if std::env::var_os("DPTRAIN_NCCL_REEXEC").is_some() || dptrain_comm::nccl::nccl_present() {
        return;
    }
    let over = std::env::var_os("DPTRAIN_NCCL_LIB").map(std::path::PathBuf::from);
    let lib = match nccl_lib::find(over.as_deref(), &nccl_lib::search_dirs()) {
        Ok(Some(l)) => l,
        Ok(None) => return,
        Err(e) => {
            eprintln!("dptrain: {e}");
            return;
        }
    };
    let Ok(dir) = nccl_lib::shim_dir(&lib, &nccl_lib::default_shim_dir()) else { return };
    let mut path = std::ffi::OsString::from(dir.as_os_str());
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        path.push(":");
        path.push(old);
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("LD_LIBRARY_PATH", path)
        .env("DPTRAIN_NCCL_REEXEC", "1")
        .exec();
    eprintln!("dptrain: re-executing with NCCL on LD_LIBRARY_PATH failed: {err}");
}
