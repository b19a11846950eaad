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

/// NVRTC's version and the architectures it compiles for ("13.0; compiles for sm_75 to
/// sm_121"), when it loads.
#[cfg(feature = "cuda")]
pub fn nvrtc_description() -> Option<String> {
    let (major, minor) = crate::kernels::cuda::nvrtc_version()?;
    let archs = crate::kernels::cuda::supported_archs();
    Some(match (archs.first(), archs.last()) {
        (Some(a), Some(b)) => format!("{major}.{minor}; compiles for sm_{a} to sm_{b}"),
        _ => format!("{major}.{minor}"),
    })
}

/// Whether cuBLAS (and cuBLASLt) can be loaded.
#[cfg(feature = "cuda")]
pub fn cublas_available() -> bool {
    crate::kernels::cuda::cublas_available()
}

/// Whether cuSOLVER can be loaded (SOAP's eigenbases on the GPU; without it, on the host).
#[cfg(feature = "cuda")]
pub fn cusolver_available() -> bool {
    crate::kernels::cuda::cusolver_available()
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
            // One visible device for several processes on this node: each rank was given its
            // own through CUDA_VISIBLE_DEVICES (Slurm's --gpus-per-task, a wrapper), or they
            // would all share GPU 0 — which NCCL refuses, and which halves every rank's speed.
            // (The CPU emulator of the kernels has no device to share: tests run ranks on it.)
            CudaStatus::Devices(1)
                if local_size > 1 && std::env::var_os("CUDA_VISIBLE_DEVICES").is_none() && !emulated() =>
            {
                Err(Error::Device(format!(
                "{local_size} processes on this node and 1 visible CUDA device: they would share it; run one process per GPU, or give each rank its own with CUDA_VISIBLE_DEVICES"
                )))
            }
            CudaStatus::Devices(1) => Ok(Device::Cuda(0)),
            CudaStatus::Devices(n) if n >= local_size => Ok(Device::Cuda(local_rank)),
            CudaStatus::Devices(n) => Err(Error::Device(format!(
                "{n} visible CUDA devices for {local_size} processes on this node: expected 1 (set CUDA_VISIBLE_DEVICES per rank) or at least {local_size}"
            ))),
        },
        other => Err(Error::Device(format!("unknown device \"{other}\"; expected cpu or cuda"))),
    }
}

/// Whether the CUDA ops run on the CPU emulator (tests).
fn emulated() -> bool {
    #[cfg(feature = "cuda")]
    {
        crate::tensor::cuda::emulated()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

/// One line for the placement log: `cpu`, or `cuda:0 (NVIDIA H200, PCI 0000:1b:00.0)`.
pub fn describe(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(o) => {
            #[cfg(feature = "cuda")]
            if !crate::tensor::cuda::emulated() && crate::kernels::cuda::driver_available() {
                use cudarc::driver::{result as drv, sys};
                if let Ok(dev) = drv::device::get(o as i32) {
                    let name = drv::device::get_name(dev).unwrap_or_else(|_| "?".into());
                    // SAFETY: `dev` came from device::get.
                    let attr = |a| unsafe { drv::device::get_attribute(dev, a) }.unwrap_or(-1);
                    let (dom, bus, slot) = (
                        attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID),
                        attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID),
                        attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID),
                    );
                    return format!("cuda:{o} ({name}, PCI {dom:04x}:{bus:02x}:{slot:02x}.0)");
                }
            }
            format!("cuda:{o}")
        }
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
