//! Finding the CUDA libraries dptrain loads at run time (NVRTC, cuBLAS, cuSOLVER, NCCL) on
//! machines where the dynamic linker cannot, and the one re-execution that puts them on
//! `LD_LIBRARY_PATH`. Both `dptrain train` and `dptrain gpu-check` call [`ensure_cuda_libs`]
//! before anything else (before MPI starts, since it may replace the process). The search
//! itself lives in `dptrain_comm::nccl_lib`, where it is unit-tested against fake library trees.

/// Makes the CUDA libraries dptrain loads at run time loadable for this process: NVRTC, cuBLAS
/// and cuSOLVER (with the libraries it loads) when the dynamic linker cannot find them but
/// pip's NVIDIA wheels (or a system CUDA) have them, and NCCL — cudarc asks for `libnccl.so`,
/// pip ships `libnccl.so.2` — through a private `libnccl.so` link (see `dptrain_comm::nccl_lib`). If anything was missing and found,
/// re-executes the binary once with those directories on `LD_LIBRARY_PATH` (the dynamic linker
/// reads it only at start). Returns normally when nothing needs doing or nothing was found (the
/// checks then report what is missing).
pub fn ensure_cuda_libs() {
    use dptrain_comm::nccl_lib;
    use std::os::unix::process::CommandExt;
    if dptrain_core::env::env().nccl_reexec {
        return;
    }
    let dirs = nccl_lib::search_dirs();
    let mut add: Vec<std::path::PathBuf> = vec![];
    if !dptrain_core::device::nvrtc_available() {
        add.extend(nccl_lib::dir_with(&dirs, &["libnvrtc.so.13", "libnvrtc.so.12"]));
    }
    if !dptrain_core::device::cublas_available() {
        add.extend(nccl_lib::dir_with(&dirs, &["libcublas.so.13", "libcublas.so.12"]));
    }
    if !dptrain_core::device::cusolver_available() {
        // cuSOLVER loads cuSPARSE and nvJitLink: one directory for CUDA 13's wheel, three for
        // CUDA 12's (nvidia/cusolver, nvidia/cusparse, nvidia/nvjitlink).
        add.extend(nccl_lib::dir_with(&dirs, &["libcusolver.so.12", "libcusolver.so.11"]));
        add.extend(nccl_lib::dir_with(&dirs, &["libcusparse.so.12", "libcusparse.so.11"]));
        add.extend(nccl_lib::dir_with(&dirs, &["libnvJitLink.so.13", "libnvJitLink.so.12"]));
    }
    if !dptrain_comm::nccl::nccl_present() {
        match nccl_lib::find(dptrain_core::env::env().nccl_lib.as_deref(), &dirs) {
            Ok(Some(lib)) => add.extend(nccl_lib::shim_dir(&lib, &nccl_lib::default_shim_dir()).ok()),
            Ok(None) => {}
            Err(e) => eprintln!("dptrain: {e}"),
        }
    }
    let mut seen = std::collections::HashSet::new();
    add.retain(|d| seen.insert(d.clone()));
    if add.is_empty() {
        return;
    }
    let mut path = std::env::join_paths(&add).unwrap_or_default();
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
    eprintln!("dptrain: re-executing with the CUDA libraries on LD_LIBRARY_PATH failed: {err}");
}
