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
    segment_sums_match_the_cpu();
}

/// The training probes' per-tensor sums (`seg_probe_f32`, every mode) against the CPU loop,
/// over segments that span several chunks and one that is a single element.
fn segment_sums_match_the_cpu() {
    use dptrain_core::ops::flat::{segment_sums, DeviceSegments, SegSum, Segment};
    use dptrain_core::{rng::Rng, Device, Tensor};
    let lens = [20_000usize, 1, 300, 9_000];
    let mut segs = vec![];
    let mut at = 0;
    for (i, &len) in lens.iter().enumerate() {
        segs.push(Segment { offset: at, len, matrix: i % 2 == 0 });
        at += len;
    }
    let mut rng = Rng::new(5);
    let a: Vec<f32> = (0..at).map(|_| rng.normal() as f32).collect();
    // A second-moment-like buffer: positive, spread over decades, so some √v̂ fall below ε.
    let b: Vec<f32> = (0..at).map(|_| (10f64.powf(-8.0 * rng.uniform())) as f32).collect();
    let (ha, hb) = (Tensor::from_slice(&a, &[at]).unwrap(), Tensor::from_slice(&b, &[at]).unwrap());
    let (da, db) = (ha.to_device(Device::Cuda(0)).unwrap(), hb.to_device(Device::Cuda(0)).unwrap());
    let table = DeviceSegments::new(&segs, &da).unwrap();
    for what in [SegSum::Squares, SegSum::Diff, SegSum::Adam { c1: 1.5, c2: 2.0, eps: 1e-3 }] {
        let cpu = segment_sums(&ha, &hb, &segs, None, what).unwrap();
        let gpu = segment_sums(&da, &db, &segs, Some(&table), what).unwrap();
        for (s, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
            for k in 0..2 {
                assert!((c[k] - g[k]).abs() <= 1e-5 * c[k].abs().max(1.0), "{what:?} segment {s} part {k}: cpu {} gpu {}", c[k], g[k]);
            }
        }
        if let SegSum::Adam { .. } = what {
            // Some but not all of the big segment's entries are below ε.
            assert!(cpu[0][0] > 0.0 && cpu[0][0] < lens[0] as f64, "{cpu:?}");
        }
    }
}

#[path = "common/ghost_bn.rs"]
mod ghost_bn;
