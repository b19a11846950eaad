//! Every CUDA kernel source compiles with NVRTC for sm_90 with no error and no warning, to PTX
//! that the GPU machines' driver (CUDA 13.0) can load. Needs libnvrtc.so.13 on
//! LD_LIBRARY_PATH (scripts/test.sh installs `nvidia-cuda-nvrtc==13.0.*` from PyPI into a venv
//! and sets DPTRAIN_REQUIRE_NVRTC=1, so CI fails rather than skips when it is missing).
#![cfg(feature = "cuda")]

use dptrain_core::kernels::cuda::{compile_all, nvrtc_available, SOURCES};

#[test]
fn every_kernel_compiles_cleanly_for_sm_90() {
    if !nvrtc_available() {
        assert!(std::env::var("DPTRAIN_REQUIRE_NVRTC").as_deref() != Ok("1"), "DPTRAIN_REQUIRE_NVRTC=1 but libnvrtc.so.13 is not loadable");
        eprintln!("skipping: NVRTC not found (set LD_LIBRARY_PATH to nvidia/cu13/lib of the nvidia-cuda-nvrtc wheel)");
        return;
    }
    let compiled = compile_all("sm_90").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(compiled.len(), SOURCES.len());
    for c in &compiled {
        assert!(c.log.is_empty(), "{}: NVRTC warnings:\n{}", c.name, c.log);
        assert!(c.ptx.contains(".target sm_90"), "{}: PTX not for sm_90", c.name);
        // PTX ISA 9.0 is CUDA 13.0's; anything newer would not load on a CUDA 13.0 driver.
        let version = c.ptx.lines().find_map(|l| l.trim().strip_prefix(".version ")).expect("PTX has a .version line");
        let (maj, min): (u32, u32) = {
            let mut it = version.split('.').map(|x| x.trim().parse().unwrap());
            (it.next().unwrap(), it.next().unwrap())
        };
        assert!((maj, min) <= (9, 0), "{}: PTX ISA {maj}.{min} is newer than CUDA 13.0's 9.0", c.name);
        assert!(c.ptx.contains(".entry"), "{}: no kernels", c.name);
    }
}

#[test]
fn a_broken_kernel_is_reported_with_its_log() {
    if !nvrtc_available() {
        return;
    }
    let e = dptrain_core::kernels::cuda::compile("broken", "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }", "sm_90")
        .unwrap_err();
    assert!(e.contains("undefined_name"), "{e}");
    let w =
        dptrain_core::kernels::cuda::compile("warn", "extern \"C\" __global__ void k(float* x) { int unused = 3; x[0] = 1.0f; }", "sm_90")
            .unwrap();
    assert!(!w.log.is_empty(), "an unused variable should warn");
}
