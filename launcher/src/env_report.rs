//! `dptrain env`: what a user debugging a cluster job needs to see in one place — the MPI
//! library this binary uses (or that it was built without), the launcher variables in the
//! environment and the world they resolve to, the CUDA driver and its devices, whether NVRTC,
//! cuBLAS and NCCL load (with the directories searched), the threads a rank would use and the
//! memory the size checks compare against (`crate::memory`).
//! It reads the same functions the trainer does, so what it says is what a run would get.

use std::fmt::Write;

/// The report, one `key: value` line per item.
pub fn report() -> String {
    let mut o = String::new();
    let w = &mut o;
    let _ = writeln!(w, "dptrain {} ({})", env!("CARGO_PKG_VERSION"), features());
    #[cfg(feature = "mpi")]
    let _ = writeln!(w, "MPI: {}", dptrain_comm::mpi::library_version().lines().next().unwrap_or("").trim());
    #[cfg(not(feature = "mpi"))]
    let _ = writeln!(w, "MPI: built without MPI (--no-default-features): every run is a world of one");
    let vars: Vec<String> = [
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "PMI_RANK",
        "PMI_SIZE",
        "PMIX_RANK",
        "MPI_LOCALRANKID",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_LOCALID",
        "SLURM_JOB_ID",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "CUDA_VISIBLE_DEVICES",
    ]
    .iter()
    .filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v}")))
    .collect();
    let _ = writeln!(w, "launcher variables: {}", if vars.is_empty() { "none".to_string() } else { vars.join(" ") });
    let world = match dptrain_comm::world::env_world() {
        Some((r, s, l)) => format!("rank {r} of {s}, local rank {}", l.map_or("unknown (MPI computes it)".into(), |l| l.to_string())),
        None => "a world of one (no launcher)".into(),
    };
    let mpi_init = if dptrain_comm::world::under_mpi_launcher() { "MPI will be initialised" } else { "MPI will not be initialised" };
    let _ = writeln!(w, "world: {world}; {mpi_init}");
    cuda(w);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let _ = writeln!(w, "threads: {cores} cores available to this process; run.threads = 0 divides them by the ranks on this node");
    let mem = crate::memory::host_memory().map_or("unknown (neither /proc/meminfo nor a cgroup limit could be read)".to_string(), |b| {
        format!("{} (the smaller of physical memory and this cgroup's limit); a model or synthetic data that cannot fit in it, shared by the ranks on this node, is refused before it is built", crate::memory::human_bytes(b as f64))
    });
    let _ = writeln!(w, "memory: {mem}");
    o
}

fn features() -> String {
    let mut f = vec![];
    if cfg!(feature = "mpi") {
        f.push("mpi");
    }
    if cfg!(feature = "cuda") {
        f.push("cuda");
    }
    if f.is_empty() {
        "no optional features".into()
    } else {
        format!("features: {}", f.join(", "))
    }
}

#[cfg(feature = "cuda")]
fn cuda(w: &mut String) {
    use dptrain_core::device::{cuda_status, describe, CudaStatus};
    let devices = match cuda_status() {
        CudaStatus::Devices(n) => (0..n).map(|i| describe(dptrain_core::Device::Cuda(i))).collect::<Vec<_>>().join("; "),
        CudaStatus::NoDriver => "no driver (libcuda.so.1 not loadable)".into(),
        CudaStatus::NoDevice(why) => format!("driver loaded, no usable device ({why})"),
        CudaStatus::NotBuilt => "built without CUDA".into(),
    };
    let dirs = dptrain_comm::nccl_lib::search_dirs();
    let shown =
        if dirs.is_empty() { "none".to_string() } else { dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(":") };
    let _ = writeln!(w, "CUDA: {devices}");
    let _ = writeln!(w, "CUDA library directories searched besides the library path: {shown}");
    let found = |ok: bool, names: &[&str]| -> String {
        if ok {
            "loads".into()
        } else {
            match dptrain_comm::nccl_lib::dir_with(&dirs, names) {
                Some(d) => format!("not on the library path; found in {} (dptrain train adds it)", d.display()),
                None => format!("not found ({})", names.join(", ")),
            }
        }
    };
    let nvrtc = match dptrain_core::device::nvrtc_description() {
        Some(d) => format!("loads ({d})"),
        None => found(dptrain_core::device::nvrtc_available(), &["libnvrtc.so.13", "libnvrtc.so.12"]),
    };
    let _ = writeln!(w, "NVRTC: {nvrtc}");
    let _ = writeln!(w, "cuBLAS: {}", found(dptrain_core::device::cublas_available(), &["libcublas.so.13", "libcublas.so.12"]));
    let solver = found(dptrain_core::device::cusolver_available(), &["libcusolver.so.12", "libcusolver.so.11"]);
    let _ = writeln!(w, "cuSOLVER: {solver} (SOAP's eigenbases on the GPU; without it on the host)");
    let _ = writeln!(w, "NCCL: {}", found(dptrain_comm::nccl::nccl_present(), &["libnccl.so.2", "libnccl.so"]));
    let cache = match &dptrain_core::env::env().kernel_cache {
        None => "off (DPTRAIN_KERNEL_CACHE=0: the kernels are compiled every run)".to_string(),
        Some(d) => {
            let n = std::fs::read_dir(d).map(|r| r.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "cubin")).count());
            match n {
                Ok(n) => format!("{} ({n} entries)", d.display()),
                Err(_) => format!("{} (empty: the first run on a GPU fills it)", d.display()),
            }
        }
    };
    let _ = writeln!(w, "kernel cache: {cache}");
}

#[cfg(not(feature = "cuda"))]
fn cuda(w: &mut String) {
    let _ = writeln!(w, "CUDA: built without the `cuda` feature");
}
