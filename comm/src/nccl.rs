//! NCCL through cudarc (feature `nccl`). Today: the single-rank all-reduce that `dptrain
//! gpu-check` runs to prove NCCL loads and reduces on the device; `NcclComm` (bootstrap over
//! MPI, bucket all-reduce with `ReduceOp::Avg` inside one group) comes with the GPU backend.

use cudarc::driver::CudaContext;
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

/// Averages a random buffer over a 1-rank NCCL communicator on device `ordinal`; returns the
/// largest absolute difference from the input (0 when NCCL works).
pub fn single_rank_all_reduce(ordinal: usize, n: usize) -> Result<f64, String> {
    // SAFETY: only tries to load the library.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
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
