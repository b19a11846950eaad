//! Device discovery and selection, with one clear error when CUDA is asked for and absent.
//! cudarc panics when a CUDA library is missing, so presence is checked first
//! (`is_culib_present`), and nothing CUDA is touched on the CPU path.

use crate::error::{Error, Result};
use crate::tensor::Device;

/// What this machine offers for `run.device = "cuda"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CudaStatus {
    /// Built without the `cuda` feature.
    NotBuilt,
    /// libcuda could not be loaded (no NVIDIA driver).
    NoDriver,
    /// The driver loaded but reported an error or no device.
    NoDevice(String),
    /// Devices present.
    Devices(usize),
}

/// Probes the CUDA driver without panicking.
pub fn cuda_status() -> CudaStatus {
    #[cfg(feature = "cuda")]
    {
        if crate::tensor::cuda::emulated() {
            return CudaStatus::Devices(1);
        }
        if !crate::kernels::cuda::driver_available() {
            return CudaStatus::NoDriver;
        }
        use cudarc::driver::result as drv;
        if let Err(e) = drv::init() {
            return CudaStatus::NoDevice(format!("{e:?}"));
        }
        match drv::device::get_count() {
            Ok(0) => CudaStatus::NoDevice("the driver reports no device".into()),
            Ok(n) => CudaStatus::Devices(n as usize),
            Err(e) => CudaStatus::NoDevice(format!("{e:?}")),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        CudaStatus::NotBuilt
    }
}

/// Whether NVRTC (libnvrtc, which compiles the CUDA kernels at run time) can be loaded.
#[cfg(feature = "cuda")]
pub fn nvrtc_available() -> bool {
    crate::kernels::cuda::nvrtc_available()
}

/// Whether cuBLAS (and cuBLASLt) can be loaded.
#[cfg(feature = "cuda")]
pub fn cublas_available() -> bool {
    crate::kernels::cuda::cublas_available()
}

/// Resolves `run.device` for a process with local rank `local_rank` of `local_size`: one
/// visible device → 0; as many devices as local ranks → the local rank; otherwise an error.
pub fn select(name: &str, local_rank: usize, local_size: usize) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => match cuda_status() {
            CudaStatus::NotBuilt => Err(Error::Device("this dptrain was built without the `cuda` feature".into())),
            CudaStatus::NoDriver => Err(Error::Device("no CUDA driver (libcuda.so.1) on this machine; use run.device = \"cpu\"".into())),
            CudaStatus::NoDevice(why) => Err(Error::Device(format!("no usable CUDA device ({why}); use run.device = \"cpu\""))),
            CudaStatus::Devices(1) => Ok(Device::Cuda(0)),
            CudaStatus::Devices(n) if n >= local_size => Ok(Device::Cuda(local_rank)),
            CudaStatus::Devices(n) => Err(Error::Device(format!(
                "{n} visible CUDA devices for {local_size} processes on this node: expected 1 (set CUDA_VISIBLE_DEVICES per rank) or at least {local_size}"
            ))),
        },
        other => Err(Error::Device(format!("unknown device \"{other}\"; expected cpu or cuda"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_always_works_and_cuda_fails_cleanly_without_a_driver() {
        assert_eq!(select("cpu", 0, 1).unwrap(), Device::Cpu);
        assert!(select("tpu", 0, 1).is_err());
        if matches!(cuda_status(), CudaStatus::NoDriver | CudaStatus::NotBuilt) {
            let e = select("cuda", 0, 1).unwrap_err().to_string();
            assert!(e.contains("cuda") || e.contains("CUDA"), "{e}");
        }
    }
}
