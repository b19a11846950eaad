//! The optimizers' GPU paths on the CPU emulator of the CUDA kernels (feature `cuda-emu`): the
//! fused AdamW and SGD (their multipliers read per parameter chunk; AdamW also over a store
//! large enough for its parallel CPU pieces), LAMB and SOAP (both decay forms each) and SGD
//! kernels, with and without learning-rate multipliers,
//! and SOAP's device path (projections as engine GEMMs, its moment/ratio/update kernels, the
//! statistics on the device, the eigh/QR refresh on the device through `ops::linalg` — or on
//! the host with the solver off — and v re-sorted on the device, no moments on the host) must
//! follow the CPU optimizers
//! step for step; and the steps AdamW, SGD, LAMB and LARS decide on the device must be the
//! host-decided steps, bit for bit.
#![cfg(feature = "cuda-emu")]

use dptrain_core::rng::Rng;
use dptrain_core::{DType, Device, GradStore, Init, ParamBuilder, ParamStore, Role, Tensor};
use dptrain_optim::*;

fn stores(n: usize) -> (ParamStore, Vec<Vec<f32>>) {
    stores_with(n, 3)
}

/// A `[n, k]` matrix and an `[n]` vector with random values, and four random gradients.
fn stores_with(n: usize, k: usize) -> (ParamStore, Vec<Vec<f32>>) {
    let mut b = ParamBuilder::new();
    b.add("w", &[n, k], Role::Hidden, k, n, Init::Normal { std: 0.5 });
    b.add("bias", &[n], Role::Vector, 1, 1, Init::Normal { std: 0.5 });
    let ps = b.build(7, DType::F32).unwrap();
    let mut rng = Rng::new(11);
    let grads = (0..4).map(|_| (0..ps.numel()).map(|_| rng.normal() as f32).collect()).collect();
    (ps, grads)
}

fn run(opt: &mut dyn Optimizer, ps: &mut ParamStore, grads: &[Vec<f32>], device: Device) -> Vec<f32> {
    ps.to_device(device).unwrap();
    let mut g = GradStore::try_new(ps).unwrap();
    let mut solo = dptrain_comm::LocalComm::new();
    for (i, gr) in grads.iter().enumerate() {
        let t = Tensor::from_slice(gr, &[gr.len()]).unwrap().to_device(device).unwrap();
        *g.flat_tensor_mut() = t;
        opt.step(ps, &g, &mut StepCtx { step: i as u64 + 1, lr: 0.05 / (i + 1) as f64, comm: &mut solo }).unwrap();
    }
    ps.flat().to_vec::<f32>().unwrap()
}

#[test]
fn fused_optimizer_kernels_with_per_parameter_scales_match_the_cpu() {
    // SAFETY (of set_var): this test binary has one test, so no other thread reads the
    // environment concurrently.
    unsafe { std::env::set_var("DPTRAIN_CUDA_EMULATOR", "1") };
    type Make = fn(&ParamStore, &ParamScales) -> Box<dyn Optimizer>;
    let makers: [(&str, Make); 3] = [
        ("adamw coupled", |ps, s| Box::new(AdamW::with_scales(AdamWConfig { weight_decay: 0.1, ..Default::default() }, ps, s).unwrap())),
        ("adamw independent", |ps, s| {
            let c = AdamWConfig { weight_decay: 0.1, decay_mode: DecayMode::Independent, peak_lr: 0.05, ..Default::default() };
            Box::new(AdamW::with_scales(c, ps, s).unwrap())
        }),
        ("sgd nesterov", |ps, s| {
            let c = SgdConfig { momentum: 0.9, nesterov: true, weight_decay: 0.01, ..Default::default() };
            Box::new(Sgd::with_scales(c, ps, s).unwrap())
        }),
    ];
    for (name, make) in makers {
        for with_lr in [false, true] {
            let (mut cpu, grads) = stores(5);
            let (mut gpu, _) = stores(5);
            let s = ParamScales { lr: if with_lr { vec![1.0, 0.25] } else { vec![1.0; 2] }, wd: vec![0.5, 0.0] };
            let want = run(make(&cpu, &s).as_mut(), &mut cpu, &grads, Device::Cpu);
            let got = run(make(&gpu, &s).as_mut(), &mut gpu, &grads, Device::Cuda(0));
            for (x, y) in got.iter().zip(&want) {
                assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{name} (lr scales {with_lr}): emulated GPU {got:?}\nvs CPU {want:?}");
            }
        }
    }
    // LAMB and LARS: a 100×100 matrix spans two chunks of the segmented norm (8192 elements
    // each), so the per-tensor norms combine partials across blocks; the vector takes LARS's
    // unadapted path. AdamW and SGD read each chunk's multipliers from the same table: the
    // matrix's in two chunks, the vector's in a third.
    let makers: [(&str, Make); 6] = [
        ("sgd, two-chunk matrix", |ps, s| {
            let c = SgdConfig { momentum: 0.9, weight_decay: 0.01, ..Default::default() };
            Box::new(Sgd::with_scales(c, ps, s).unwrap())
        }),
        ("adamw coupled, two-chunk matrix", |ps, s| {
            Box::new(AdamW::with_scales(AdamWConfig { weight_decay: 0.1, ..Default::default() }, ps, s).unwrap())
        }),
        ("adamw independent, two-chunk matrix", |ps, s| {
            let c = AdamWConfig { weight_decay: 0.1, decay_mode: DecayMode::Independent, peak_lr: 0.05, ..Default::default() };
            Box::new(AdamW::with_scales(c, ps, s).unwrap())
        }),
        ("lamb", |ps, s| {
            let c = LambConfig { weight_decay: 0.1, correct_bias: true, ..Default::default() };
            Box::new(Lamb::with_scales(c, ps, s).unwrap())
        }),
        ("lamb independent decay", |ps, s| {
            let c = LambConfig { weight_decay: 0.1, decay_mode: DecayMode::Independent, peak_lr: 0.05, ..Default::default() };
            Box::new(Lamb::with_scales(c, ps, s).unwrap())
        }),
        ("lars", |ps, s| {
            let c = LarsConfig { weight_decay: 0.01, nesterov: true, trust_coefficient: 0.05, ..Default::default() };
            Box::new(Lars::with_scales(c, ps, s).unwrap())
        }),
    ];
    for (name, make) in makers {
        for with_lr in [false, true] {
            let (mut cpu, grads) = stores_with(100, 100);
            let (mut gpu, _) = stores_with(100, 100);
            let s = ParamScales { lr: if with_lr { vec![1.0, 0.25] } else { vec![1.0; 2] }, wd: vec![0.5, 1.0] };
            let want = run(make(&cpu, &s).as_mut(), &mut cpu, &grads, Device::Cpu);
            let got = run(make(&gpu, &s).as_mut(), &mut gpu, &grads, Device::Cuda(0));
            let start = stores_with(100, 100).0.flat().to_vec::<f32>().unwrap();
            let moved = want.iter().zip(&start).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(moved > 1e-3, "{name} barely moved the parameters ({moved})");
            for (i, (x, y)) in got.iter().zip(&want).enumerate() {
                assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{name} (lr scales {with_lr}): element {i}: emulated GPU {x} vs CPU {y}");
            }
        }
    }
    // AdamW's CPU update over more than 4 × 16,384 elements runs in parallel pieces, each
    // within one parameter and reading its multipliers as constants: a 300×250 matrix is five
    // pieces (the last short), the vector a sixth. Four threads, so the pieces run in parallel
    // on any machine.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
    for (name, mode) in [("coupled", DecayMode::Coupled), ("independent", DecayMode::Independent)] {
        let (mut cpu, grads) = stores_with(300, 250);
        let (mut gpu, _) = stores_with(300, 250);
        let s = ParamScales { lr: vec![0.25, 2.0], wd: vec![0.5, 1.0] };
        let c = AdamWConfig { weight_decay: 0.1, decay_mode: mode, peak_lr: 0.05, ..Default::default() };
        let want = pool.install(|| run(&mut AdamW::with_scales(c, &cpu, &s).unwrap(), &mut cpu, &grads, Device::Cpu));
        let got = run(&mut AdamW::with_scales(c, &gpu, &s).unwrap(), &mut gpu, &grads, Device::Cuda(0));
        for (i, (x, y)) in got.iter().zip(&want).enumerate() {
            assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "adamw {name}, parallel pieces: element {i}: emulated GPU {x} vs CPU {y}");
        }
    }
    // SOAP, with basis refreshes inside the four steps, with and without normalisation, the
    // refreshes computed on the device (`ops::linalg`) and on the host. The matrix is square so
    // both factors have full rank: a rank-deficient factor's null-space basis is whatever eigh
    // returns, and the device's statistics (GEMM rounding) pick another.
    let dev = dptrain_core::tensor::cuda::dev(0).unwrap();
    let all = dptrain_core::tensor::cuda::Fusions::ALL;
    for (name, soap, solver) in [true, false].into_iter().flat_map(|solver| {
        [
            ("soap", SoapConfig { precondition_frequency: 2, weight_decay: 0.1, ..Default::default() }),
            ("soap normalize", SoapConfig { precondition_frequency: 1, normalize_grads: true, ..Default::default() }),
            (
                "soap independent decay",
                SoapConfig {
                    precondition_frequency: 2,
                    weight_decay: 0.1,
                    decay_mode: DecayMode::Independent,
                    peak_lr: 0.05,
                    ..Default::default()
                },
            ),
        ]
        .map(|(n, c)| (n, c, solver))
    }) {
        dev.set_fusions(dptrain_core::tensor::cuda::Fusions { solver, ..all });
        let name = &format!("{name} (refresh on the {})", if solver { "device" } else { "host" });
        let (mut cpu, grads) = stores_with(5, 5);
        let (mut gpu, _) = stores_with(5, 5);
        let mut on_gpu = Soap::new(soap, &gpu);
        let mut on_cpu = Soap::new(soap, &cpu);
        let want = run(&mut on_cpu, &mut cpu, &grads, Device::Cpu);
        let got = run(&mut on_gpu, &mut gpu, &grads, Device::Cuda(0));
        for (x, y) in got.iter().zip(&want) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{name}: emulated GPU {got:?}\nvs CPU {want:?}");
        }
        assert!(got != stores_with(5, 5).0.flat().to_vec::<f32>().unwrap(), "{name} did not move the parameters");
        // The moments live on the device alone (re-sorted there at each refresh: v agrees
        // below); the host keeps the factors only where it refreshes the bases.
        let host_factors = if solver { on_cpu.host_state_bytes() - 8 * cpu.numel() } else { 0 };
        assert_eq!(
            on_cpu.host_state_bytes() - on_gpu.host_state_bytes(),
            8 * cpu.numel() + host_factors,
            "{name}: host state on a GPU run"
        );
        // The state read back from the device has every factor and basis.
        let (tensors, scalars) = on_gpu.state(&gpu).unwrap();
        assert!(tensors.iter().any(|(k, _)| k == "Q0.w") && tensors.iter().any(|(k, _)| k == "GG1.w"), "{name}");
        assert_eq!(scalars["step"], 3);
        // m both ways (original space, turned back on the device; eigenbasis, as kept) and v
        // agree with the CPU's.
        let (cpu_tensors, _) = on_cpu.state(&cpu).unwrap();
        for key in ["exp_avg.w", "exp_avg_eig.w", "exp_avg_sq.w"] {
            let get = |ts: &[(String, dptrain_core::Tensor)]| ts.iter().find(|(k, _)| k == key).unwrap().1.to_vec::<f32>().unwrap();
            let (x, y) = (get(&tensors), get(&cpu_tensors));
            assert!(y.iter().any(|&a| a != 0.0), "{name}: {key} is all zero");
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{name}: {key}: emulated GPU {x:?}\nvs CPU {y:?}");
            }
        }
        // Restored from that state (onto the host, then up at its first step) it steps on the
        // device as the optimizer that never stopped, refresh included: the same bits.
        let mut resumed = Soap::new(soap, &gpu);
        resumed.load_state(&gpu, &tensors.into_iter().collect(), &scalars).unwrap();
        let (mut gpu2, _) = stores_with(5, 5);
        gpu2.flat_mut::<f32>().unwrap().copy_from_slice(&got);
        let more = &grads[..2];
        let (a, b) = (run(&mut on_gpu, &mut gpu, more, Device::Cuda(0)), run(&mut resumed, &mut gpu2, more, Device::Cuda(0)));
        assert!(a == b && a != got, "{name}: resumed on the device {b:?}\nvs uninterrupted {a:?}");
    }
    dev.set_fusions(all);
    device_decided_steps_are_the_hosts_and_keep_the_bf16_copy();
    soap_owner_mode_on_the_device_shares_the_host_work();
    soap_trusts_gradients_the_trainer_found_finite();
    soap_decides_all_but_first_and_refresh_steps_on_the_device();
    soap_projects_matrices_without_copies();
}

/// SOAP's step on a GPU projects a matrix's gradient into its eigenbasis and the update back,
/// and takes the two Gram matrices, as GEMMs that read their operands where they are (Q and the
/// gradient read transposed in place): no strided copy runs, where the mode-1 products used to
/// copy a transposed matrix in and out (five copies of the matrix a step: in and out of each
/// mode-1 product, and one for the Gram). At a basis refresh, turning m from the old bases to
/// the new copies nothing either; re-sorting v along the last dim still does (once a refresh).
fn soap_projects_matrices_without_copies() {
    let dev = dptrain_core::tensor::cuda::dev(0).unwrap();
    let (mut ps, grads) = stores_with(6, 4);
    ps.to_device(Device::Cuda(0)).unwrap();
    let mut soap = Soap::new(SoapConfig { precondition_frequency: 2, ..Default::default() }, &ps);
    let mut g = GradStore::try_new(&ps).unwrap();
    let mut solo = dptrain_comm::LocalComm::new();
    for (i, gr) in grads.iter().enumerate() {
        *g.flat_tensor_mut() = Tensor::from_slice(gr, &[gr.len()]).unwrap().to_device(Device::Cuda(0)).unwrap();
        dev.profile_start();
        soap.step(&mut ps, &g, &mut StepCtx { step: i as u64 + 1, lr: 0.05, comm: &mut solo }).unwrap();
        let prof = dev.profile_stop().unwrap();
        let names: Vec<(&str, usize)> = prof.iter().map(|k| (k.name, k.launches)).collect();
        // Steps 2–4 update (two products each way and two Grams: 6 GEMMs; 3 also refreshes and
        // turns m: 4 more); step 1 only builds the statistics and bases.
        let gemms: usize = names.iter().filter(|(n, _)| n.starts_with("gemm")).map(|(_, l)| l).sum();
        assert!(gemms >= if i == 0 { 2 } else { 6 }, "step {}: {names:?}", i + 1);
        // At a refresh (step 3) re-sorting v along the last dim gathers the columns through a
        // transposed copy in and out; nothing else copies.
        let copies: usize = names.iter().filter(|(n, _)| n.starts_with("strided")).map(|(_, l)| l).sum();
        assert!(copies <= if i == 2 { 2 } else { 0 }, "step {}: {copies} copies ran: {names:?}", i + 1);
    }
}

/// SOAP's steps as the trainer takes them on a GPU: decided on the device where SOAP can
/// (`step_on_device`), else read and decided on the host (`step_finite` after the host's
/// check and clipping). Every step but the first and the basis refreshes is decided on the
/// device, without a wait, and the parameters after each step, the state and the count are
/// bitwise those of host-decided steps — with a non-finite step skipped on the device, which
/// moves the next refresh one step later, and clipped steps; with `normalize_grads` too (each
/// update's RMS taken on the device).
fn soap_decides_all_but_first_and_refresh_steps_on_the_device() {
    let dev = dptrain_core::tensor::cuda::dev(0).unwrap();
    let scales = |_: &ParamStore| ParamScales { lr: vec![1.0, 0.5], wd: vec![1.0, 0.0] };
    // ‖g‖ ≈ 10 for the raw gradients: factor 1 is clipped to 5, NaN is skipped.
    let max_norm = 5.0;
    let factors = [0.1, 0.2, 1.0, 0.1, f32::NAN, 0.3, 0.1, 1.0, 0.2, 0.1, 0.1, 0.2];
    // A refresh on every third update (the first step only initialises).
    let cfg = SoapConfig { precondition_frequency: 3, weight_decay: 0.1, ..Default::default() };
    for normalize in [false, true] {
        let cfg = SoapConfig { normalize_grads: normalize, ..cfg };
        let mut results = vec![];
        let mut decided = vec![];
        for trainer in [false, true] {
            let (mut ps, raw) = stores_with(12, 10);
            ps.to_device(Device::Cuda(0)).unwrap();
            let mut soap = Soap::with_scales(cfg, &ps, &scales(&ps)).unwrap();
            let mut g = GradStore::try_new(&ps).unwrap();
            let mut solo = dptrain_comm::LocalComm::new();
            let mut seen = vec![];
            for (i, f) in factors.iter().enumerate() {
                let scaled: Vec<f32> = raw[i % raw.len()].iter().map(|x| x * f).collect();
                *g.flat_tensor_mut() = Tensor::from_slice(&scaled, &[scaled.len()]).unwrap().to_device(Device::Cuda(0)).unwrap();
                let ctx = &mut StepCtx { step: i as u64 + 1, lr: 0.05 / (i + 1) as f64, comm: &mut solo };
                let rec = dptrain_core::ops::flat::sum_squares_and_record(g.flat(), &[]).unwrap();
                let waits = dev.host_waits();
                // What a CUDA graph of the step asks first (`decides_next_step_on_device`) is
                // what `step_on_device` then does.
                let predicted = soap.decides_next_step_on_device(&ps);
                if trainer && soap.step_on_device(&mut ps, &g, ctx, &rec, max_norm).unwrap() {
                    assert!(predicted, "step {}: decided on the device, predicted for the host", i + 1);
                    assert_eq!(dev.host_waits(), waits, "step {}: a device-decided step waited", i + 1);
                    decided.push(i + 1);
                } else {
                    assert!(!trainer || !predicted, "step {}: predicted for the device, left to the host", i + 1);
                    let norm = rec.read().unwrap().0.sqrt();
                    if norm.is_finite() {
                        clip_to_norm(&mut g, max_norm, norm).unwrap();
                        soap.step_finite(&mut ps, &g, ctx).unwrap();
                    }
                }
                seen.push(ps.flat().to_vec::<f32>().unwrap());
            }
            let (state, scalars) = soap.state(&ps).unwrap();
            let state: Vec<(String, Vec<f32>)> = state.into_iter().map(|(k, t)| (k, t.to_vec::<f32>().unwrap())).collect();
            results.push((seen, state, scalars));
        }
        let (host, dev_decided) = (&results[0], &results[1]);
        for (i, (a, b)) in host.0.iter().zip(&dev_decided.0).enumerate() {
            assert!(a == b, "normalize {normalize}: parameters after step {} differ (host- vs device-decided)", i + 1);
        }
        assert!(host.0[4] == host.0[3] && host.0[5] != host.0[4], "the NaN step moved the parameters, or the next did not");
        assert!(host.1 == dev_decided.1, "normalize {normalize}: state differs");
        assert_eq!(host.2, dev_decided.2);
        // 10 updates: steps 2–4 are updates 1–3, step 5 is skipped, steps 6–12 are 4–10; steps
        // 4, 8 and 11 refresh (updates 3, 6, 9). Step 7 goes to the host too: had step 5 been
        // applied, it would have been update 6.
        assert_eq!(host.2["step"], 10);
        assert_eq!(decided, [2, 3, 5, 6, 9, 10, 12], "normalize {normalize}: the steps decided on the device");
    }
}

/// The trainer steps SOAP only with gradients it has found finite (`step_finite`): on the device
/// SOAP then skips its own check — one pass over the gradients and one wait for the device
/// fewer per step, refreshes included — and the steps are the same bits.
fn soap_trusts_gradients_the_trainer_found_finite() {
    let cfg = SoapConfig { precondition_frequency: 2, weight_decay: 0.1, ..Default::default() };
    let dev = dptrain_core::tensor::cuda::dev(0).unwrap();
    let mut solo = dptrain_comm::LocalComm::new();
    let mut steps = |finite: bool| {
        let (mut ps, grads) = stores_with(5, 5);
        let mut soap = Soap::new(cfg, &ps);
        ps.to_device(Device::Cuda(0)).unwrap();
        let mut g = GradStore::try_new(&ps).unwrap();
        let mut waits = 0;
        for (i, gr) in grads.iter().enumerate() {
            *g.flat_tensor_mut() = Tensor::from_slice(gr, &[gr.len()]).unwrap().to_device(Device::Cuda(0)).unwrap();
            let before = dev.host_waits();
            let ctx = &mut StepCtx { step: i as u64 + 1, lr: 0.05, comm: &mut solo };
            if finite { soap.step_finite(&mut ps, &g, ctx) } else { soap.step(&mut ps, &g, ctx) }.unwrap();
            waits += dev.host_waits() - before;
        }
        (ps.flat().to_vec::<f32>().unwrap(), waits)
    };
    let ((checked, checked_waits), (trusted, trusted_waits)) = (steps(false), steps(true));
    assert!(checked == trusted, "step_finite changed SOAP's steps:\n{trusted:?}\nvs {checked:?}");
    assert_eq!(checked_waits - trusted_waits, 4, "waits: {checked_waits} checking, {trusted_waits} trusting");
}

/// SOAP in owner mode on the device, two in-process ranks with the same gradients: the
/// parameters after a refresh every step are bitwise those of one rank computing every basis
/// itself — also when one rank owns nothing (it still takes part in the exchange) — with the
/// bases computed on the device (each rank computes its own parameters' and broadcasts them;
/// the host keeps nothing) and on the host (each rank brings down only the statistics of the
/// parameters it owns and keeps only their bases; the others' arrive by broadcast and go
/// straight up).
fn soap_owner_mode_on_the_device_shares_the_host_work() {
    use std::time::Duration;
    fn store(with_b: bool) -> ParamStore {
        let mut b = ParamBuilder::new();
        b.add("a", &[6, 6], Role::Hidden, 6, 6, Init::Normal { std: 0.5 });
        if with_b {
            b.add("b", &[5, 5], Role::Hidden, 5, 5, Init::Normal { std: 0.5 });
        }
        b.build(3, DType::F32).unwrap()
    }
    // Bytes of a parameter's two d×d factors with their bases.
    let factors = |d: usize| 4 * 2 * 2 * d * d;
    // The larger parameter to rank 0, the other (if any) to rank 1: each holds its own share
    // when the host refreshes, nothing when the device does.
    let dev = dptrain_core::tensor::cuda::dev(0).unwrap();
    let all = dptrain_core::tensor::cuda::Fusions::ALL;
    for (with_b, solver, per_rank) in
        [(true, false, (factors(6), factors(5))), (false, false, (factors(6), 0)), (true, true, (0, 0)), (false, true, (0, 0))]
    {
        dev.set_fusions(dptrain_core::tensor::cuda::Fusions { solver, ..all });
        let mut rng = Rng::new(17);
        let n = store(with_b).numel();
        let grads: Vec<Vec<f32>> = (0..5).map(|_| (0..n).map(|_| rng.normal() as f32).collect()).collect();
        let cfg = |distribute| SoapConfig { precondition_frequency: 1, distribute, ..Default::default() };
        let steps = |comm: &mut dyn dptrain_core::comm::Communicator, distribute| {
            let mut ps = store(with_b);
            ps.to_device(Device::Cuda(0)).unwrap();
            let mut g = GradStore::try_new(&ps).unwrap();
            let mut soap = Soap::new(cfg(distribute), &ps);
            for (i, gr) in grads.iter().enumerate() {
                *g.flat_tensor_mut() = Tensor::from_slice(gr, &[n]).unwrap().to_device(Device::Cuda(0)).unwrap();
                soap.step(&mut ps, &g, &mut StepCtx { step: i as u64 + 1, lr: 0.05, comm }).unwrap();
            }
            (ps.flat().to_vec::<f32>().unwrap(), soap.host_state_bytes())
        };
        let (want, all_bytes) = steps(&mut dptrain_comm::LocalComm::new(), Distribute::Replicated);
        assert_eq!(all_bytes, per_rank.0 + per_rank.1, "one rank computing every basis holds them all (solver {solver})");
        let ranks: Vec<(Vec<f32>, usize)> = std::thread::scope(|s| {
            let hs: Vec<_> = dptrain_comm::ThreadComm::group(2, Duration::from_secs(120))
                .into_iter()
                .map(|mut c| s.spawn(move || steps(&mut c, Distribute::Owner)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (r, (got, _)) in ranks.iter().enumerate() {
            assert!(
                got == &want,
                "owner mode (b: {with_b}, solver {solver}), rank {r}: {got:?}\nvs one rank computing every basis: {want:?}"
            );
        }
        assert_eq!((ranks[0].1, ranks[1].1), per_rank, "host bytes per rank (b: {with_b}, solver {solver})");
    }
    dev.set_fusions(all);
}

/// AdamW, SGD, LAMB and LARS decide a step on the device from its record (the gradient's Σg²):
/// a non-finite gradient skipped, one clipped, others not — the parameters and the optimizer
/// state after each step are, bit for bit, what the host's own check, clipping and `step` give.
/// Both paths write the parameters' bf16 copy in the update pass, so after a bf16 forward asked
/// for it the copy is the values' rounding after every step (a skipped one included).
fn device_decided_steps_are_the_hosts_and_keep_the_bf16_copy() {
    use dptrain_core::autograd::Tape;
    use dptrain_core::ops::flat::{sum_squares_and, sum_squares_and_record};
    use dptrain_core::tensor::Precision;
    type Make = fn(&ParamStore) -> Box<dyn Optimizer>;
    fn scales(_: &ParamStore) -> ParamScales {
        ParamScales { lr: vec![1.0, 0.5], wd: vec![1.0, 0.0] }
    }
    let makers: [(&str, Make); 5] = [
        ("adamw", |ps| Box::new(AdamW::with_scales(AdamWConfig { weight_decay: 0.1, ..Default::default() }, ps, &scales(ps)).unwrap())),
        ("sgd", |ps| {
            let c = SgdConfig { momentum: 0.9, nesterov: true, weight_decay: 0.01, ..Default::default() };
            Box::new(Sgd::with_scales(c, ps, &scales(ps)).unwrap())
        }),
        ("lamb bias-corrected, independent decay", |ps| {
            let c = LambConfig {
                weight_decay: 0.1,
                correct_bias: true,
                decay_mode: DecayMode::Independent,
                peak_lr: 0.05,
                ..Default::default()
            };
            Box::new(Lamb::with_scales(c, ps, &scales(ps)).unwrap())
        }),
        ("lamb", |ps| Box::new(Lamb::with_scales(LambConfig { weight_decay: 0.1, ..Default::default() }, ps, &scales(ps)).unwrap())),
        ("lars", |ps| {
            let c = LarsConfig { weight_decay: 0.01, nesterov: true, trust_coefficient: 0.05, ..Default::default() };
            Box::new(Lars::with_scales(c, ps, &scales(ps)).unwrap())
        }),
    ];
    // ‖g‖ ≈ 100 for the raw gradients: step 1 is not finite, step 3 is clipped to 5, the others
    // are below it.
    let max_norm = 5.0;
    let factors = [f32::NAN, 0.02, 1.0, 0.03];
    for (name, make) in makers {
        let mut results = vec![];
        for on_device in [false, true] {
            let (mut ps, raw) = stores_with(100, 100);
            ps.to_device(Device::Cuda(0)).unwrap();
            // A bf16 forward reading a parameter asks for the bf16 copy.
            let tape = Tape::new();
            tape.set_precision(Precision::Bf16);
            tape.param(&ps, ps.id("w").unwrap());
            drop(tape);
            let mut opt = make(&ps);
            let mut g = GradStore::try_new(&ps).unwrap();
            let mut solo = dptrain_comm::LocalComm::new();
            let mut seen = vec![];
            for (i, (gr, f)) in raw.iter().zip(factors).enumerate() {
                let scaled: Vec<f32> = gr.iter().map(|x| x * f).collect();
                *g.flat_tensor_mut() = Tensor::from_slice(&scaled, &[scaled.len()]).unwrap().to_device(Device::Cuda(0)).unwrap();
                let ctx = &mut StepCtx { step: i as u64 + 1, lr: 0.05 / (i + 1) as f64, comm: &mut solo };
                if on_device {
                    let rec = sum_squares_and_record(g.flat(), &[]).unwrap();
                    assert!(opt.step_on_device(&mut ps, &g, ctx, &rec, max_norm).unwrap(), "{name}: no device step");
                    let (_, applied, _) = rec.read().unwrap();
                    assert_eq!(applied, f.is_finite(), "{name}: step {}", i + 1);
                } else {
                    let norm = sum_squares_and(g.flat(), &[]).unwrap().0.sqrt();
                    if norm.is_finite() {
                        clip_to_norm(&mut g, max_norm, norm).unwrap();
                        opt.step(&mut ps, &g, ctx).unwrap();
                    }
                }
                let vals = ps.flat().to_vec::<f32>().unwrap();
                // The first update makes the copy (the host path has none before an applied step).
                match ps.half_flat() {
                    Some(h) => {
                        let half = h.to_vec::<f32>().unwrap();
                        assert!(
                            half.iter().zip(&vals).all(|(h, v)| *h == half::bf16::from_f32(*v).to_f32()),
                            "{name}: the bf16 copy is stale"
                        );
                    }
                    None => assert!(i == 0 && !on_device, "{name}: step {}: the update dropped the bf16 copy", i + 1),
                }
                seen.push(vals);
            }
            let (state, scalars) = opt.state(&ps).unwrap();
            let state: Vec<(String, Vec<f32>)> = state.into_iter().map(|(k, t)| (k, t.to_vec::<f32>().unwrap())).collect();
            results.push((seen, state, scalars));
        }
        let (host, dev) = (&results[0], &results[1]);
        assert!(host.0[0] == stores_with(100, 100).0.flat().to_vec::<f32>().unwrap(), "{name}: the non-finite step moved the parameters");
        assert!(host.0[2] != host.0[1], "{name}: the clipped step did not move the parameters");
        for (i, (a, b)) in host.0.iter().zip(&dev.0).enumerate() {
            assert!(a == b, "{name}: parameters after step {} differ (host- vs device-decided)", i + 1);
        }
        assert!(host.1 == dev.1, "{name}: optimizer state differs");
        assert_eq!(host.2, dev.2, "{name}");
    }
    // SOAP writes the bf16 copy in its per-parameter update passes: after the first step
    // (statistics only) and each update, it is the values' rounding.
    let (mut ps, raw) = stores_with(6, 4);
    ps.to_device(Device::Cuda(0)).unwrap();
    let tape = Tape::new();
    tape.set_precision(Precision::Bf16);
    tape.param(&ps, ps.id("w").unwrap());
    drop(tape);
    let mut soap = Soap::new(SoapConfig { precondition_frequency: 2, weight_decay: 0.1, ..Default::default() }, &ps);
    let mut g = GradStore::try_new(&ps).unwrap();
    let mut solo = dptrain_comm::LocalComm::new();
    let start = ps.flat().to_vec::<f32>().unwrap();
    for (i, gr) in raw.iter().enumerate() {
        *g.flat_tensor_mut() = Tensor::from_slice(gr, &[gr.len()]).unwrap().to_device(Device::Cuda(0)).unwrap();
        soap.step(&mut ps, &g, &mut StepCtx { step: i as u64 + 1, lr: 0.05, comm: &mut solo }).unwrap();
        let vals = ps.flat().to_vec::<f32>().unwrap();
        if let Some(h) = ps.half_flat() {
            let half = h.to_vec::<f32>().unwrap();
            assert!(
                half.iter().zip(&vals).all(|(h, v)| *h == half::bf16::from_f32(*v).to_f32()),
                "soap: step {}: the bf16 copy is stale",
                i + 1
            );
        } else {
            assert!(i == 0, "soap: step {}: the update dropped the bf16 copy", i + 1);
        }
    }
    assert!(ps.flat().to_vec::<f32>().unwrap() != start, "soap did not move the parameters");
}
