//! The CUDA op layer on the CPU emulator of the kernels (feature `cuda-emu`; scripts/test.sh
//! turns it on): the whole of `dptrain gpu-check` part (a) — every op, forward and backward,
//! through the real dispatch (launch arguments, GEMM mapping onto cuBLAS's conventions,
//! strides, the caching allocator) — must agree with the CPU engine. Only what needs a real
//! GPU is left out: the driver and cuBLAS calls themselves, NVRTC loading, NCCL, streams.
#![cfg(feature = "cuda-emu")]

use dptrain_core::diagnostics::gpu_ops as check;

#[test]
fn gpu_check_ops_pass_on_the_emulator() {
    // SAFETY (of set_var): this test binary has one test, so no other thread reads the
    // environment concurrently.
    unsafe { std::env::set_var("DPTRAIN_CUDA_EMULATOR", "1") };
    let (info, rows) = check::run(0).unwrap();
    assert!(info.name.contains("emulator"));
    let bad: Vec<String> = rows.iter().filter(|r| !r.ok()).map(|r| format!("{}: {:.2e} > {:.0e}", r.op, r.max_rel_err, r.bound)).collect();
    for r in &rows {
        eprintln!("{:<45} {:.2e}", r.op, r.max_rel_err);
    }
    assert!(bad.is_empty(), "ops disagreeing with the CPU engine on the emulator:\n{}", bad.join("\n"));
    assert_eq!(rows.len(), 38);
    // Ghost BN's kernels (one launch for all ghost batches, the sequential running-statistics
    // update) against the same PyTorch fixtures as the CPU engine.
    assert_eq!(ghost_bn::check(dptrain_core::Device::Cuda(0)), 3);
}

#[path = "common/ghost_bn.rs"]
mod ghost_bn;
