//! `dptrain gpu-check`: the one-shot device check for a machine with a GPU. Prints the device,
//! the build's commit, and a table of every checked op's agreement with the CPU engine; exits 2
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
