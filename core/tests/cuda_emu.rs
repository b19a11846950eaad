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
    assert_eq!(rows.len(), 71);
    // Ghost BN's kernels (one launch for all ghost batches, the sequential running-statistics
    // update) against the same PyTorch fixtures as the CPU engine.
    assert_eq!(ghost_bn::check(dptrain_core::Device::Cuda(0)), 3);
    segment_sums_match_the_cpu();
    the_embeddings_gradient_is_the_cpus_bit_for_bit();
    activation_statistics_match_the_cpu();
    strided_copies_match_the_cpu();
    row_gathers_match_the_cpu();
    flash_attention_probe_matches_the_cpu();
    cross_entropy_statistics_match_the_cpu();
    bf16_casts_match_the_cpu();
    sixteen_byte_gelu_kernels_match_the_scalar_ones();
    linear_bias_is_fused_where_it_can_be();
    the_mlps_gelu_runs_in_the_gemm_epilogues();
    weight_gradients_go_straight_into_the_gradient_buffer();
    residual_gradients_accumulate_in_the_layer_norms_backward();
    layer_norm_gain_and_bias_gradients_are_one_gemm();
    the_residual_add_rides_on_the_projections_gemm();
    dropout_and_the_residual_add_are_one_pass();
    the_optimizers_bf16_weight_copy_replaces_the_casts();
    a_captured_step_replays_with_new_inputs();
    a_replayed_step_draws_each_steps_dropout_masks();
    fresh_device_memory_reads_as_nan();
    linear_algebra_without_the_solver_goes_through_the_host();
}

/// With the device's solver switched off (`DPTRAIN_SOLVER=0`; on a GPU also without
/// libcusolver) `ops::linalg` on a device tensor computes on the host, one matrix at a time, and
/// returns its result on the device: the CPU's bits, where the solver's path is the emulator's
/// column-major round trip.
fn linear_algebra_without_the_solver_goes_through_the_host() {
    use dptrain_core::ops::linalg;
    use dptrain_core::tensor::cuda::Fusions;
    use dptrain_core::{Device, Tensor};
    let d = dptrain_core::tensor::cuda::dev(0).unwrap();
    let n = 12;
    let x: Vec<f32> = (0..n * n).map(|k| ((k * 37 % 23) as f32 - 11.0) / 7.0).collect();
    let sym: Vec<f32> = (0..n * n).map(|k| x[k] + x[(k % n) * n + k / n]).collect();
    let (a, b) = (Tensor::from_vec(sym, &[n, n]).unwrap(), Tensor::from_vec(x, &[n, n]).unwrap());
    let cols: Vec<usize> = (0..n).rev().collect();
    let want = (
        linalg::eigh_desc(&a, 0.0).unwrap().to_vec::<f32>().unwrap(),
        linalg::qr_q_of_columns(&b, &cols).unwrap().to_vec::<f32>().unwrap(),
    );
    let before = d.set_fusions(Fusions { solver: false, ..Fusions::ALL });
    let (ga, gb) = (a.to_device(Device::Cuda(0)).unwrap(), b.to_device(Device::Cuda(0)).unwrap());
    assert!(!linalg::solver_on(&ga));
    let (e, q) = (linalg::eigh_desc(&ga, 0.0).unwrap(), linalg::qr_q_of_columns(&gb, &cols).unwrap());
    d.set_fusions(before);
    assert!(e.is_cuda() && q.is_cuda());
    assert_eq!((e.to_vec::<f32>().unwrap(), q.to_vec::<f32>().unwrap()), want);
    assert!(linalg::solver_on(&ga));
}

/// The emulator hands out device memory filled with 0xFF bytes — NaN as f32 — even a block the
/// cache had before with values in it: a kernel that reads what nothing wrote gets NaN (every
/// check above passes with that), where a GPU's stale contents could look plausible.
fn fresh_device_memory_reads_as_nan() {
    let d = dptrain_core::tensor::cuda::dev(0).unwrap();
    let b = d.upload(&[1.5f32; 10]).unwrap();
    assert_eq!(d.download::<f32>(b.ptr, 10).unwrap(), vec![1.5; 10]);
    drop(b);
    // The same size class: the block just freed comes back from the cache.
    let again = d.alloc(40).unwrap();
    let v = d.download::<f32>(again.ptr, 10).unwrap();
    assert!(v.iter().all(|x| x.is_nan()), "{v:?}");
    assert!(d.download::<u32>(again.ptr, 10).unwrap().iter().all(|&w| w == u32::MAX));
}

/// Dropout in a step replayed as a CUDA graph: the kernels read the micro-step's tape key from
/// device memory (`StepKeys`, staged for each step and uploaded by the graph before each
/// replay), so each replay draws the masks an eager step with that key draws — the element-wise
/// dropout, the fused dropout + residual add and flash attention's dropout, forward and backward.
fn a_replayed_step_draws_each_steps_dropout_masks() {
    use dptrain_core::autograd::Tape;
    use dptrain_core::model::Batch;
    use dptrain_core::ops::dropout::StepKeys;
    use dptrain_core::tensor::Precision;
    use dptrain_core::{DType, Device, GradStore, Init, ParamBuilder, Role};
    let d = dptrain_core::tensor::cuda::dev(0).unwrap();
    let mut pb = ParamBuilder::new();
    // Packed qkv of one sequence of 16 positions, one head of 32: flash attention under bf16.
    let qkv = pb.add("qkv", &[1, 16, 96], Role::Hidden, 96, 96, Init::Normal { std: 1.0 });
    let res = pb.add("res", &[1, 16, 32], Role::Hidden, 32, 32, Init::Normal { std: 1.0 });
    let mut ps = pb.build(3, DType::F32).unwrap();
    ps.to_device(Device::Cuda(0)).unwrap();
    let mut grads = GradStore::try_new(&ps).unwrap();
    let keys = StepKeys::default();
    let step = |grads: &mut GradStore, key: u64, on_device: bool| -> dptrain_core::Result<()> {
        grads.zero_grad();
        let tape = Tape::new();
        tape.set_precision(Precision::Bf16);
        tape.set_rng_key(key);
        let staged = if on_device { keys.upload(Device::Cuda(0))? } else { vec![] };
        tape.set_device_rng_key(staged.first().cloned());
        let att = tape.param(&ps, qkv).causal_attention_dropout(1, tape.dropout(0.3, 1)?)?;
        let y = att.y.dropout(tape.dropout(0.2, 2)?)?.dropout_add(tape.dropout(0.4, 3)?, tape.param(&ps, res))?;
        let loss = y.mul(y)?.sum_all()?;
        tape.backward(loss, grads, |_, _| {}).map(drop)
    };
    let step_keys = [101u64, 202, 303, 404];
    let eager: Vec<Vec<f32>> = step_keys
        .iter()
        .map(|&k| {
            step(&mut grads, k, false).unwrap();
            grads.flat().to_vec::<f32>().unwrap()
        })
        .collect();
    assert!(eager.windows(2).all(|w| w[0] != w[1]), "the keys drew the same masks");
    keys.stage(&[step_keys[0]]);
    let (g, ()) = d.capture(Vec::<Batch>::new(), |_| step(&mut grads, step_keys[0], true)).unwrap();
    for (i, &k) in step_keys.iter().enumerate().rev() {
        keys.stage(&[k]);
        g.replay().unwrap();
        assert_eq!(grads.flat().to_vec::<f32>().unwrap(), eager[i], "replay with the key of step {i}");
    }
}

/// A step captured as a CUDA graph (`CudaDev::capture`): nothing of it runs at capture; each
/// replay runs it on the batch refilled into the graph's inputs, with the gradients an eager
/// step gets from that batch, bit for bit; tensors allocated after the capture are not handed
/// blocks the replays write (the graph's private pool); a capture refuses a host wait, a
/// download or a plain upload, naming it, and inputs moved since the capture are refused too.
fn a_captured_step_replays_with_new_inputs() {
    use dptrain_core::autograd::Tape;
    use dptrain_core::model::Batch;
    use dptrain_core::tensor::Precision;
    use dptrain_core::{rng::Rng, DType, Device, GradStore, Init, ParamBuilder, Role, Tensor};
    let d = dptrain_core::tensor::cuda::dev(0).unwrap();
    let mut pb = ParamBuilder::new();
    let emb = pb.add("emb", &[16, 32], Role::Input, 1, 32, Init::Normal { std: 0.5 });
    let w = pb.add("w", &[32, 32], Role::Hidden, 32, 32, Init::Normal { std: 0.2 });
    let b = pb.add("b", &[32], Role::Vector, 1, 32, Init::Normal { std: 0.1 });
    let head = pb.add("head", &[16, 32], Role::Output, 32, 16, Init::Normal { std: 0.2 });
    let mut ps = pb.build(9, DType::F32).unwrap();
    ps.to_device(Device::Cuda(0)).unwrap();
    let mut grads = GradStore::try_new(&ps).unwrap();
    let mut rng = Rng::new(5);
    let mut ids = |n: usize| -> Vec<u32> { (0..n).map(|_| (rng.uniform() * 16.0) as u32 % 16).collect() };
    let batches: Vec<Batch> = (0..4).map(|_| Batch::Tokens { inputs: ids(12), targets: ids(12), batch: 3, context: 4 }).collect();
    // Two micro-steps, each on half the batch: the second's ids go up after the first's
    // tensors were freed, so a bound buffer that reused one of their blocks would be
    // overwritten, at replay, after its ids were copied in.
    let step = |grads: &mut GradStore, batch: &Batch| -> dptrain_core::Result<()> {
        let Batch::Tokens { inputs, targets, .. } = batch else { unreachable!() };
        grads.zero_grad();
        for half in [0..6, 6..12] {
            let tape = Tape::new();
            tape.set_precision(Precision::Bf16);
            let x = tape.param(&ps, emb).embedding(&inputs[half.clone()], &[6])?;
            let h = x.layer_norm_linear(None, None, 1e-5, tape.param(&ps, w), Some(tape.param(&ps, b)), false)?.gelu(true)?;
            let loss = h.linear_cross_entropy(tape.param(&ps, head), &targets[half], 0.0)?.loss;
            tape.backward(loss, grads, |_, _| {})?;
        }
        Ok(())
    };
    let mut eager = vec![];
    for batch in &batches {
        step(&mut grads, batch).unwrap();
        eager.push(grads.flat().to_vec::<f32>().unwrap());
    }
    // Captured after the eager steps (the warm-up): the record only, the gradients untouched.
    let (mut g, ()) = d.capture(batches[0].clone(), |b| step(&mut grads, b)).unwrap();
    assert!(g.nodes().unwrap() > 10, "{} operations recorded", g.nodes().unwrap());
    assert_eq!(grads.flat().to_vec::<f32>().unwrap(), eager[3], "the capture ran part of the step");
    // Tensors made between replays, of the step's sizes, must not share a block with it.
    let keep: Vec<Tensor> = [6 * 32, 6 * 16, 16 * 32, 32 * 32, 6, 1]
        .iter()
        .flat_map(|&n| (0..8).map(move |_| Tensor::from_vec(vec![7.0f32; n], &[n]).unwrap().to_device(Device::Cuda(0)).unwrap()))
        .collect();
    for (i, batch) in batches.iter().enumerate().rev() {
        g.inputs_mut().refill(batch).unwrap();
        g.replay().unwrap();
        assert_eq!(grads.flat().to_vec::<f32>().unwrap(), eager[i], "replay with batch {i}");
    }
    assert!(keep.iter().all(|t| t.to_vec::<f32>().unwrap().iter().all(|&v| v == 7.0)), "a replay wrote a tensor made outside the graph");
    // Inputs shortened since the capture: refused, not read out of bounds.
    if let Batch::Tokens { inputs, .. } = g.inputs_mut() {
        inputs.truncate(6);
    }
    let err = g.replay().unwrap_err().to_string();
    assert!(err.contains("inputs were moved or shortened"), "{err}");
    drop(g);
    // What a capture cannot hold, each named; a failed capture leaves none running.
    let t = Tensor::from_vec(vec![1.0f32; 4], &[4]).unwrap().to_device(Device::Cuda(0)).unwrap();
    let host = vec![2.0f32; 4];
    let refused: [(&str, Box<dyn Fn() -> dptrain_core::Result<()>>); 3] = [
        ("a device-to-host copy", Box::new(|| t.to_vec::<f32>().map(drop))),
        ("a host-to-device copy of 16 bytes", Box::new(|| Tensor::from_slice(&host, &[4])?.to_device(Device::Cuda(0)).map(drop))),
        ("a wait for the device", Box::new(|| d.sync())),
    ];
    for (what, f) in refused {
        let err = d.capture(Vec::<Batch>::new(), |_| f()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains(what) && err.contains("inside a CUDA graph capture"), "{what}: {err}");
    }
    // Buffers made before the capture (parameters, optimizer state) are written in place by
    // every replay, and only by replays.
    let mut doubled = t.clone();
    let (g, ()) = d.capture(Vec::<Batch>::new(), |_| dptrain_core::ops::flat::scale_in_place(&mut doubled, 2.0)).unwrap();
    assert_eq!(t.to_vec::<f32>().unwrap(), vec![1.0; 4]);
    g.replay().unwrap();
    g.replay().unwrap();
    assert_eq!(t.to_vec::<f32>().unwrap(), vec![4.0; 4]);
    // A tensor from before the capture that the step frees is still read by every replay: its
    // block stays the graph's, not handed to a tensor made between replays.
    let on_gpu = |v: f32| Tensor::from_vec(vec![v; 64], &[64]).unwrap().to_device(Device::Cuda(0)).unwrap();
    let (src, dst) = (on_gpu(3.0), on_gpu(0.0));
    let into = &dst;
    let (g, ()) = d
        .capture(Vec::<Batch>::new(), move |_| {
            let r = dptrain_core::ops::flat::copy_into_cuda(into, &src);
            drop(src);
            r
        })
        .unwrap();
    let others: Vec<Tensor> = (0..8).map(|_| on_gpu(9.0)).collect();
    g.replay().unwrap();
    assert_eq!(dst.to_vec::<f32>().unwrap(), vec![3.0; 64], "a replay read a block handed out again");
    drop(others);
}

/// After a bf16 forward asked for parameters, `ParamStore::flat_and_half_mut` keeps a bf16 copy
/// of them (made by one cast; an optimizer's fused pass writes it with the values). A bf16
/// linear then reads its weight from the copy — one cast fewer per weight — with the same
/// numbers; anything that takes the values alone (`flat_tensor_mut`) drops the copy.
fn the_optimizers_bf16_weight_copy_replaces_the_casts() {
    use dptrain_core::autograd::Tape;
    use dptrain_core::tensor::Precision;
    use dptrain_core::{rng::Rng, DType, Device, GradStore, Init, ParamBuilder, Role, Tensor};
    let d = dptrain_core::tensor::cuda::dev(0).unwrap();
    let mut pb = ParamBuilder::new();
    let w = pb.add("w", &[24, 40], Role::Hidden, 40, 24, Init::Normal { std: 0.2 });
    let b = pb.add("b", &[24], Role::Vector, 1, 24, Init::Normal { std: 0.2 });
    let mut ps = pb.build(5, DType::F32).unwrap();
    ps.to_device(Device::Cuda(0)).unwrap();
    let mut rng = Rng::new(4);
    let x: Vec<f32> = (0..6 * 40).map(|_| rng.normal() as f32).collect();
    let step = |ps: &dptrain_core::ParamStore| {
        d.profile_start();
        let tape = Tape::new();
        tape.set_precision(Precision::Bf16);
        let xv = tape.leaf(Tensor::from_slice(&x, &[6, 40]).unwrap().to_device(Device::Cuda(0)).unwrap());
        let (wv, bv) = (tape.param(ps, w), tape.param(ps, b));
        let twin = wv.half_twin().is_some() && bv.half_twin().is_some();
        // A product with an f32 output, and one with a bf16 output and its bias added in bf16.
        let y = xv.linear(wv, None).unwrap().add(xv.linear_half(wv, Some(bv)).unwrap().to_f32().unwrap()).unwrap();
        let loss = y.square().unwrap().sum_all().unwrap();
        let mut grads = GradStore::try_new(ps).unwrap();
        tape.backward(loss, &mut grads, |_, _| {}).unwrap();
        let casts: usize = d.profile_stop().unwrap().iter().filter(|k| k.name.starts_with("f32_to_bf16")).map(|k| k.launches).sum();
        (y.value().to_vec::<f32>().unwrap(), grads.flat().to_vec::<f32>().unwrap(), casts, twin)
    };
    let (y0, g0, casts0, twin0) = step(&ps);
    assert!(!twin0 && ps.half(w).is_none() && ps.half(b).is_none());
    // The first optimizer step makes the copy (one cast of the whole flat buffer).
    let (_, half) = ps.flat_and_half_mut().unwrap();
    let half = half.expect("a bf16 forward asked for the copy").to_vec::<f32>().unwrap();
    let vals = ps.flat().to_vec::<f32>().unwrap();
    assert!(half.iter().zip(&vals).all(|(h, v)| *h == half::bf16::from_f32(*v).to_f32()));
    let (y1, g1, casts1, twin1) = step(&ps);
    assert!(twin1);
    assert_eq!((y0, g0), (y1, g1), "the copy gives the cast's numbers");
    assert_eq!(casts1 + 3, casts0, "the weight's casts (one per product) and the bias's are gone");
    ps.flat_tensor_mut().unwrap();
    assert!(ps.half(w).is_none(), "values changed behind the copy's back must drop it");
}

/// A parameter's weight gradient is written by its GEMM straight into the flat gradient buffer
/// — beta 0 on the first contribution, 1 after (micro-steps accumulating) — for a linear, the
/// fused layer-norm → linear and the fused classifier: the CPU's gradients, and no
/// accumulation pass of their own on the GPU. A weight used twice by one op (a product with
/// itself) takes the ordinary path.
fn weight_gradients_go_straight_into_the_gradient_buffer() {
    use dptrain_core::autograd::Tape;
    use dptrain_core::tensor::Precision;
    use dptrain_core::{rng::Rng, DType, Device, GradStore, Init, ParamBuilder, Role, Tensor};
    let d = dptrain_core::tensor::cuda::dev(0).unwrap();
    let builder = || {
        let mut pb = ParamBuilder::new();
        let w = pb.add("w", &[24, 40], Role::Hidden, 40, 24, Init::Normal { std: 0.2 });
        let g = pb.add("ln", &[40], Role::Vector, 1, 40, Init::Const(1.0));
        let head = pb.add("head", &[50, 24], Role::Output, 24, 50, Init::Normal { std: 0.2 });
        let sq = pb.add("sq", &[40, 40], Role::Hidden, 40, 40, Init::Normal { std: 0.1 });
        (pb, [w, g, head, sq])
    };
    let [w, g, head, sq] = builder().1;
    let mut rng = Rng::new(21);
    let xs: Vec<Vec<f32>> = (0..2).map(|_| (0..6 * 40).map(|_| rng.normal() as f32).collect()).collect();
    let targets: Vec<u32> = (0..6u32).map(|i| (i * 7) % 50).collect();
    let run = |device: Device, prec: Precision| {
        let mut ps = builder().0.build(3, DType::F32).unwrap();
        ps.to_device(device).unwrap();
        let mut grads = GradStore::try_new(&ps).unwrap();
        grads.zero_grad();
        let mut adds = 0;
        for x in &xs {
            d.profile_start();
            let tape = Tape::new();
            tape.set_precision(prec);
            let xv = tape.leaf(Tensor::from_slice(x, &[6, 40]).unwrap().to_device(device).unwrap());
            let h = xv.layer_norm_linear(Some(tape.param(&ps, g)), None, 1e-5, tape.param(&ps, w), None, false).unwrap();
            let ce = h.linear_cross_entropy(tape.param(&ps, head), &targets, 0.0).unwrap().loss;
            let s = tape.param(&ps, sq);
            let tied = xv.linear(s, None).unwrap().matmul(s).unwrap().square().unwrap().mean_all().unwrap();
            let loss = ce.add(tied).unwrap();
            tape.backward(loss, &mut grads, |_, _| {}).unwrap();
            adds += d.profile_stop().unwrap().iter().filter(|k| k.name == "add_assign_f32").map(|k| k.launches).sum::<usize>();
        }
        (grads.flat().to_vec::<f32>().unwrap(), adds)
    };
    for prec in [Precision::F32, Precision::Bf16] {
        let (cpu, _) = run(Device::Cpu, prec);
        let (gpu, adds) = run(Device::Cuda(0), prec);
        let e = check::rel_err(&gpu, &cpu);
        assert!(e < 1e-4, "{prec:?}: gradients differ from the CPU's by {e:.2e}");
        // Accumulation passes over the two micro-steps: one, `sq` as the matmul's input (an
        // ordinary gradient) in the second. The weight, the classifier and `sq`'s linear write
        // theirs from their GEMMs, the layer norm its gain's from its partial sums, and adds its
        // dx into x's gradient from the other use (8 passes with none of that).
        assert_eq!(adds, 1, "{prec:?}");
    }
}

/// A residual stream as GPT's blocks make it (x + f(layer_norm(x)), twice; the plain layer
/// norm and the fused layer norm → linear): each layer norm's backward adds its dx into the
/// gradient the residual add gave x — no accumulation pass — with the numbers of the pass
/// (bit for bit) and of the CPU; a gradient something else still holds is not written into.
/// The width 1100 takes the layer norm's partial sums past the columns a thread keeps in
/// registers (16 per thread; the emulator runs 64).
fn residual_gradients_accumulate_in_the_layer_norms_backward() {
    use dptrain_core::autograd::Tape;
    use dptrain_core::tensor::cuda::Fusions;
    use dptrain_core::tensor::Precision;
    use dptrain_core::{rng::Rng, DType, Device, GradStore, Init, ParamBuilder, Role, Tensor};
    let d = dptrain_core::tensor::cuda::dev(0).unwrap();
    for c in [40, 1100] {
        let builder = || {
            let mut pb = ParamBuilder::new();
            let ln = [0, 1].map(|i| pb.add(&format!("ln{i}.w"), &[c], Role::Vector, 1, c, Init::Normal { std: 0.5 }));
            let lb = [0, 1].map(|i| pb.add(&format!("ln{i}.b"), &[c], Role::Vector, 1, c, Init::Normal { std: 0.5 }));
            let w = [0, 1].map(|i| pb.add(&format!("w{i}"), &[c, c], Role::Hidden, c, c, Init::Normal { std: 0.1 }));
            (pb, ln, lb, w)
        };
        let (_, ln, lb, w) = builder();
        let mut rng = Rng::new(33);
        let x: Vec<f32> = (0..6 * c).map(|_| rng.normal() as f32).collect();
        let run = |device: Device, accumulate: bool| {
            let before = d.set_fusions(Fusions { accumulate, ..Fusions::ALL });
            let mut ps = builder().0.build(8, DType::F32).unwrap();
            ps.to_device(device).unwrap();
            let mut grads = GradStore::try_new(&ps).unwrap();
            grads.zero_grad();
            d.profile_start();
            let tape = Tape::new();
            tape.set_precision(Precision::F32);
            let p = |id| tape.param(&ps, id);
            let xv = tape.leaf(Tensor::from_slice(&x, &[6, c]).unwrap().to_device(device).unwrap());
            let a = xv.layer_norm_linear(Some(p(ln[0])), Some(p(lb[0])), 1e-5, p(w[0]), None, false).unwrap().gelu(true).unwrap();
            let x2 = xv.add(a).unwrap();
            let b = x2.layer_norm(Some(p(ln[1])), Some(p(lb[1])), 1e-5).unwrap().linear(p(w[1]), None).unwrap().gelu(true).unwrap();
            let loss = x2.add(b).unwrap().square().unwrap().mean_all().unwrap();
            let lg = tape.backward(loss, &mut grads, |_, _| {}).unwrap();
            let adds = d
                .profile_stop()
                .unwrap()
                .iter()
                .filter(|k| k.name == "add_assign_f32" || k.name == "add_f32")
                .map(|k| k.launches)
                .sum::<usize>();
            d.set_fusions(before);
            let mut out = grads.flat().to_vec::<f32>().unwrap();
            out.extend(lg.get(xv).unwrap().to_vec::<f32>().unwrap());
            (out, adds)
        };
        let (cpu, _) = run(Device::Cpu, true);
        let (fused, adds) = run(Device::Cuda(0), true);
        let (plain, plain_adds) = run(Device::Cuda(0), false);
        let same = fused.iter().zip(&plain).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "c {c}: adding in the layer norm's backward differs from the pass by {:.2e}", check::rel_err(&fused, &plain));
        let e = check::rel_err(&fused, &cpu);
        assert!(e < 1e-4, "c {c}: gradients differ from the CPU's by {e:.2e}");
        // Forward's two residual adds stay; backward's two accumulations are gone.
        assert_eq!((adds, plain_adds), (2, 4), "c {c}");
    }
}

/// A layer norm whose gain and bias gradients sit side by side in the flat gradient buffer (as
/// `LayerNorm::new` registers them) gets both column sums of its partials from one batched
/// GEMM, over two micro-steps (overwritten, then added to); one whose slots are apart, or that
/// has no bias, takes a GEMM per parameter. The CPU's gradients either way, for a width within
/// a thread's registers and one past them.
fn layer_norm_gain_and_bias_gradients_are_one_gemm() {
    use dptrain_core::autograd::Tape;
    use dptrain_core::tensor::Precision;
    use dptrain_core::{rng::Rng, DType, Device, GradStore, Init, ParamBuilder, Role, Tensor};
    let d = dptrain_core::tensor::cuda::dev(0).unwrap();
    for c in [40, 1100] {
        // ln0's gain and bias adjacent; ln1's split by ln2's gain; ln2 without a bias.
        let builder = || {
            let mut pb = ParamBuilder::new();
            let init = Init::Normal { std: 0.5 };
            let w0 = pb.add("ln0.w", &[c], Role::Vector, 1, c, init);
            let b0 = pb.add("ln0.b", &[c], Role::Vector, 1, c, init);
            let w1 = pb.add("ln1.w", &[c], Role::Vector, 1, c, init);
            let w2 = pb.add("ln2.w", &[c], Role::Vector, 1, c, init);
            let b1 = pb.add("ln1.b", &[c], Role::Vector, 1, c, init);
            (pb, [w0, b0, w1, b1, w2])
        };
        let [w0, b0, w1, b1, w2] = builder().1;
        let mut rng = Rng::new(5);
        let xs: Vec<Vec<f32>> = (0..2).map(|_| (0..6 * c).map(|_| rng.normal() as f32).collect()).collect();
        let run = |device: Device| {
            let mut ps = builder().0.build(8, DType::F32).unwrap();
            ps.to_device(device).unwrap();
            let mut grads = GradStore::try_new(&ps).unwrap();
            grads.zero_grad();
            let mut sums = vec![];
            for x in &xs {
                d.profile_start();
                let tape = Tape::new();
                tape.set_precision(Precision::F32);
                let p = |id| tape.param(&ps, id);
                let xv = tape.leaf(Tensor::from_slice(x, &[6, c]).unwrap().to_device(device).unwrap());
                let a = xv.layer_norm(Some(p(w0)), Some(p(b0)), 1e-5).unwrap().square().unwrap();
                let b = a.layer_norm(Some(p(w1)), Some(p(b1)), 1e-5).unwrap().square().unwrap();
                let y = b.layer_norm(Some(p(w2)), None, 1e-5).unwrap();
                let loss = y.mul(y.tanh().unwrap()).unwrap().mean_all().unwrap();
                tape.backward(loss, &mut grads, |_, _| {}).unwrap();
                let prof = d.profile_stop().unwrap();
                sums.push(prof.iter().filter(|k| k.name == "gemm (f32)").map(|k| k.launches).sum::<usize>());
            }
            (grads.flat().to_vec::<f32>().unwrap(), sums)
        };
        let (cpu, _) = run(Device::Cpu);
        let (gpu, gemms) = run(Device::Cuda(0));
        let e = check::rel_err(&gpu, &cpu);
        assert!(e < 1e-4, "c {c}: gradients differ from the CPU's by {e:.2e}");
        // ln0: one; ln1: two; ln2: one; and the loss's sum (`sum_all` is a GEMM) — in each
        // micro-step (6 with ln0's sums apart).
        assert_eq!(gemms, [5, 5], "c {c}");
    }
}

/// `linear_add` and `gelu_linear_add` (a GPT block's two projections and residual adds): one
/// cuBLASLt GEMM reads the residual as C and writes the sum — no add pass — in f32 and from bf16
/// operands; with the fusion off (`Fusions::residual`: linear, then add) and without cuBLASLt
/// (`epilogue` off: the residual copied into the output, the product added with beta 1) the
/// same numbers up to the order of the three terms; the gradients the CPU's.
fn the_residual_add_rides_on_the_projections_gemm() {
    use dptrain_core::autograd::Tape;
    use dptrain_core::tensor::cuda::Fusions;
    use dptrain_core::tensor::Precision;
    use dptrain_core::{rng::Rng, Device, Tensor};
    let d = dptrain_core::tensor::cuda::dev(0).unwrap();
    let mut rng = Rng::new(41);
    let mut r = |n: usize| (0..n).map(|_| rng.normal() as f32).collect::<Vec<f32>>();
    let (x, w, b, res) = (r(6 * 40), r(24 * 40), r(24), r(6 * 24));
    let run = |device: Device, prec: Precision, f: Fusions, gelu: bool| {
        let before = d.set_fusions(f);
        d.profile_start();
        let tape = Tape::new();
        tape.set_precision(prec);
        let leaf = |v: &[f32], s: &[usize]| tape.leaf(Tensor::from_slice(v, s).unwrap().to_device(device).unwrap());
        let (xv, wv, bv, rv) = (leaf(&x, &[6, 40]), leaf(&w, &[24, 40]), leaf(&b, &[24]), leaf(&res, &[6, 24]));
        let y = if gelu { xv.gelu_linear_add(true, wv, Some(bv), rv) } else { xv.linear_add(wv, Some(bv), rv) }.unwrap();
        // The residual used again after (as the stream is): its gradient has two parts.
        let loss = y.square().unwrap().sum_all().unwrap().add(rv.sum_all().unwrap()).unwrap();
        let mut gs = dptrain_core::GradStore::empty();
        let lg = tape.backward(loss, &mut gs, |_, _| {}).unwrap();
        let mut out = y.value().to_vec::<f32>().unwrap();
        for v in [xv, wv, bv, rv] {
            out.extend(lg.get(v).unwrap().to_vec::<f32>().unwrap());
        }
        let prof = if device != Device::Cpu { d.profile_stop().unwrap() } else { vec![] };
        d.set_fusions(before);
        let adds: usize = prof.iter().filter(|k| k.name == "add_f32").map(|k| k.launches).sum();
        (out, prof.iter().map(|k| k.name).collect::<Vec<&str>>(), adds)
    };
    for (prec, gelu) in [(Precision::F32, false), (Precision::Bf16, false), (Precision::Bf16, true)] {
        let (cpu, ..) = run(Device::Cpu, prec, Fusions::ALL, gelu);
        let (fused, names, adds) = run(Device::Cuda(0), prec, Fusions::ALL, gelu);
        assert!(names.contains(&"gemm + residual + bias (cuBLASLt)"), "{prec:?} gelu {gelu}: {names:?}");
        let e = check::rel_err(&fused, &cpu);
        assert!(e < 1e-3, "{prec:?} gelu {gelu}: differs from the CPU's by {e:.2e}");
        for f in [Fusions { residual: false, ..Fusions::ALL }, Fusions { epilogue: false, ..Fusions::ALL }] {
            let (plain, plain_names, plain_adds) = run(Device::Cuda(0), prec, f, gelu);
            assert!(!plain_names.iter().any(|n| n.contains("residual")), "{prec:?} {f:?}: {plain_names:?}");
            if !f.residual {
                // The residual's own add pass (the loss's scalar add is in both).
                assert_eq!(plain_adds, adds + 1, "{prec:?} gelu {gelu}: {names:?} vs {plain_names:?}");
            }
            let e = check::rel_err(&plain, &fused);
            assert!(e < 1e-5, "{prec:?} gelu {gelu} {f:?}: the fused and unfused sums differ by {e:.2e}");
        }
    }
}

/// `dropout_add` (a residual add under dropout) is one kernel on a GPU, with the numbers of
/// dropout then add bit for bit (the fusion off), and the CPU's.
fn dropout_and_the_residual_add_are_one_pass() {
    use dptrain_core::autograd::Tape;
    use dptrain_core::ops::dropout::Dropout;
    use dptrain_core::tensor::cuda::Fusions;
    use dptrain_core::{rng::Rng, Device, Tensor};
    let d = dptrain_core::tensor::cuda::dev(0).unwrap();
    let mut rng = Rng::new(43);
    let mut r = |n: usize| (0..n).map(|_| rng.normal() as f32).collect::<Vec<f32>>();
    let (x, res) = (r(5 * 300), r(5 * 300));
    let drop = Dropout::new(0.2, 77).unwrap();
    let run = |device: Device, f: Fusions| {
        let before = d.set_fusions(f);
        d.profile_start();
        let tape = Tape::new();
        let leaf = |v: &[f32]| tape.leaf(Tensor::from_slice(v, &[5, 300]).unwrap().to_device(device).unwrap());
        let (xv, rv) = (leaf(&x), leaf(&res));
        let y = xv.dropout_add(drop, rv).unwrap();
        let loss = y.square().unwrap().sum_all().unwrap();
        let lg = tape.backward(loss, &mut dptrain_core::GradStore::empty(), |_, _| {}).unwrap();
        let mut out = y.value().to_vec::<f32>().unwrap();
        out.extend(lg.get(xv).unwrap().to_vec::<f32>().unwrap());
        out.extend(lg.get(rv).unwrap().to_vec::<f32>().unwrap());
        let prof = if device != Device::Cpu { d.profile_stop().unwrap() } else { vec![] };
        d.set_fusions(before);
        (out, prof.iter().map(|k| (k.name, k.launches)).collect::<Vec<_>>())
    };
    let (cpu, _) = run(Device::Cpu, Fusions::ALL);
    let (fused, launches) = run(Device::Cuda(0), Fusions::ALL);
    let (plain, plain_launches) = run(Device::Cuda(0), Fusions { residual: false, ..Fusions::ALL });
    assert!(launches.contains(&("dropout_add_f32", 1)) && !launches.iter().any(|l| l.0 == "add_f32"), "{launches:?}");
    assert!(plain_launches.iter().any(|l| l.0 == "add_f32"), "{plain_launches:?}");
    let same = |a: &[f32], b: &[f32]| a.len() == b.len() && a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(
        same(&fused, &plain) && same(&fused, &cpu),
        "fused {:.2e} from the two ops, {:.2e} from the CPU",
        check::rel_err(&fused, &plain),
        check::rel_err(&fused, &cpu)
    );
}

/// A linear's bias and bias gradient ride on the GEMMs (the cuBLASLt epilogues, emulated) —
/// no bias pass of its own in either direction — and fall back to their own passes, with the
/// same numbers, where fusing is off or the bias is not 16-byte aligned (a view one element
/// into a buffer).
fn linear_bias_is_fused_where_it_can_be() {
    use dptrain_core::autograd::Tape;
    use dptrain_core::tensor::Precision;
    use dptrain_core::{rng::Rng, Device, Tensor};
    let d = dptrain_core::tensor::cuda::dev(0).unwrap();
    let mut rng = Rng::new(9);
    let mut r = |n: usize| (0..n).map(|_| rng.normal() as f32).collect::<Vec<f32>>();
    let (x, w, b) = (r(6 * 40), r(24 * 40), r(25));
    let run = |prec: Precision, fuse: bool, off: usize| {
        let before = d.set_fusions(dptrain_core::tensor::cuda::Fusions { epilogue: fuse, ..d.fusions() });
        d.profile_start();
        let tape = Tape::new();
        tape.set_precision(prec);
        let leaf = |v: &[f32], s: &[usize]| tape.leaf(Tensor::from_slice(v, s).unwrap().to_device(Device::Cuda(0)).unwrap());
        let (xv, wv, bb) = (leaf(&x, &[6, 40]), leaf(&w, &[24, 40]), leaf(&b, &[25]));
        let bv = bb.narrow(0, off, 24).unwrap();
        let y = xv.linear(wv, Some(bv)).unwrap();
        let loss = y.square().unwrap().sum_all().unwrap();
        let mut gs = dptrain_core::GradStore::empty();
        let lg = tape.backward(loss, &mut gs, |_, _| {}).unwrap();
        let mut out = y.value().to_vec::<f32>().unwrap();
        for v in [xv, wv, bb] {
            out.extend(lg.get(v).unwrap().to_vec::<f32>().unwrap());
        }
        let names: Vec<&str> = d.profile_stop().unwrap().iter().map(|k| k.name).collect();
        d.set_fusions(before);
        (out, names)
    };
    for prec in [Precision::F32, Precision::Bf16] {
        let (fused, names) = run(prec, true, 0);
        assert!(names.contains(&"gemm + bias (cuBLASLt)") && names.contains(&"gemm + bias gradient (cuBLASLt)"), "{prec:?}: {names:?}");
        assert!(!names.contains(&"add_f32"), "{prec:?}: a bias pass ran beside the fused GEMM: {names:?}");
        for (fuse, off) in [(false, 0), (true, 1)] {
            let (plain, names) = run(prec, fuse, off);
            assert!(
                names.contains(&"add_f32") && !names.contains(&"gemm + bias (cuBLASLt)"),
                "{prec:?} fuse {fuse} offset {off}: {names:?}"
            );
            if off == 0 {
                let e = check::rel_err(&plain, &fused);
                assert!(e < 1e-6, "{prec:?}: fused and unfused differ by {e:.2e}");
            }
        }
    }
}

/// `layer_norm_mlp` under bf16 with the tanh GELU: its first GEMM writes the pre-activation and
/// the activation (cuBLASLt `GELU_AUX_BIAS`), the projection's input-gradient GEMM applies
/// GELU's derivative (`DGELU`), and GELU's kernels do not run. Without cuBLASLt's epilogues
/// (the path where it cannot fuse) GELU's kernels compute the same numbers from f32 products;
/// with `Fusions::gelu_epilogue` off the two ops run as before (GELU of the rounded
/// pre-activation: different roundings, and no GELU epilogue). The fused path is the same bits
/// run to run.
fn the_mlps_gelu_runs_in_the_gemm_epilogues() {
    use dptrain_core::autograd::Tape;
    use dptrain_core::tensor::cuda::Fusions;
    use dptrain_core::tensor::Precision;
    use dptrain_core::{rng::Rng, Device, Tensor};
    let d = dptrain_core::tensor::cuda::dev(0).unwrap();
    let mut rng = Rng::new(23);
    let mut r = |n: usize, k: f64| (0..n).map(|_| (rng.normal() * k) as f32).collect::<Vec<f32>>();
    let (c, f) = (48, 192);
    let vals = [r(2 * 16 * c, 1.0), r(c, 1.0), r(c, 0.5), r(f * c, 0.15), r(f, 0.5), r(c * f, 0.1), r(c, 0.5)];
    let shapes: [&[usize]; 7] = [&[2, 16, c], &[c], &[c], &[f, c], &[f], &[c, f], &[c]];
    // With `observe`, a probe reads the activation (as MLP sparsity does on probe steps).
    let run_observed = |fusions: Fusions, observe: bool| {
        let before = d.set_fusions(fusions);
        d.profile_start();
        let tape = Tape::new();
        tape.set_precision(Precision::Bf16);
        let v: Vec<_> = vals
            .iter()
            .zip(shapes)
            .map(|(v, s)| tape.leaf(Tensor::from_slice(v, s).unwrap().to_device(Device::Cuda(0)).unwrap()))
            .collect();
        let mut seen = 0;
        let mut probe = |a: &Tensor| {
            seen += a.numel();
            Ok(())
        };
        let observer: Option<&mut dyn FnMut(&Tensor) -> dptrain_core::Result<()>> = if observe { Some(&mut probe) } else { None };
        let y = v[0]
            .layer_norm_mlp((Some(v[1]), Some(v[2]), 1e-5), (v[3], Some(v[4])), true, (v[5], Some(v[6])), Some(v[0]), observer)
            .unwrap();
        assert_eq!(seen, if observe { 2 * 16 * f } else { 0 });
        let loss = y.square().unwrap().sum_all().unwrap();
        let mut gs = dptrain_core::GradStore::empty();
        let lg = tape.backward(loss, &mut gs, |_, _| {}).unwrap();
        let mut out = y.value().to_vec::<f32>().unwrap();
        for x in &v {
            out.extend(lg.get(*x).unwrap().to_vec::<f32>().unwrap());
        }
        let names: Vec<&str> = d.profile_stop().unwrap().iter().map(|k| k.name).collect();
        d.set_fusions(before);
        (out, names)
    };
    let run = |fusions: Fusions| run_observed(fusions, false);
    let all = d.fusions();
    let (fused, names) = run(all);
    for gemm in ["gemm + bias + GELU, bf16 output (cuBLASLt)", "gemm + GELU gradient, bf16 output (cuBLASLt)"] {
        assert!(names.contains(&gemm), "{gemm} did not run: {names:?}");
    }
    assert!(!names.iter().any(|n| n.starts_with("gelu")), "a GELU kernel ran beside the epilogues: {names:?}");
    assert_eq!(run(all).0, fused, "the fused MLP is not the same bits run to run");
    assert_eq!(run_observed(all, true).0, fused, "a probe reading the activation changed the step");
    let (kernels, names) = run(Fusions { epilogue: false, ..all });
    assert!(names.contains(&"gelu_f32_bf16") && names.contains(&"gelu_bwd_f32") && !names.iter().any(|n| n.contains("GELU")), "{names:?}");
    let e = check::rel_err(&fused, &kernels);
    eprintln!("GELU in the epilogues vs in kernels: {e:.2e}");
    assert!(e < 1e-3, "the GELU epilogues and the kernels standing in for them differ by {e:.2e}");
    let (_, names) = run(Fusions { gelu_epilogue: false, ..all });
    assert!(
        names.contains(&"gelu_bf16_bf16_x8") && names.contains(&"gelu_bwd_bf16_x8") && !names.iter().any(|n| n.contains("GELU")),
        "{names:?}"
    );
}

/// f32 → bf16 on the device rounds as the CPU does (nearest even; infinities, NaN), by the
/// four-wide kernel (aligned, with a tail of 3) and the one-by-one kernel (a source one element
/// off 16-byte alignment).
fn bf16_casts_match_the_cpu() {
    use dptrain_core::{rng::Rng, DType, Device, Tensor};
    let mut rng = Rng::new(17);
    let mut x: Vec<f32> = (0..4_004).map(|_| (rng.normal() * 100.0) as f32).collect();
    // Exact ties between two bf16 values (round to even both ways), ±inf, NaN.
    x[1] = f32::from_bits(0x3f80_8000);
    x[2] = f32::from_bits(0x3f81_8000);
    x[3] = f32::INFINITY;
    x[4] = f32::NEG_INFINITY;
    x[5] = f32::NAN;
    x[4_002] = f32::from_bits(0x3f80_8001);
    let h = Tensor::from_slice(&x, &[x.len()]).unwrap();
    let d = h.to_device(Device::Cuda(0)).unwrap();
    for (off, n) in [(0, 4_003), (1, 4_003), (0, 2)] {
        let want = h.narrow(0, off, n).unwrap().to_dtype(DType::BF16).to_dtype(DType::F32).to_vec::<f32>().unwrap();
        let got = d.narrow(0, off, n).unwrap().to_dtype(DType::BF16).to_dtype(DType::F32).to_vec::<f32>().unwrap();
        for (i, (a, b)) in want.iter().zip(&got).enumerate() {
            assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "offset {off}, element {i}: cpu {a} gpu {b}");
        }
    }
}

/// GELU forward and backward on bf16 activations read and write eight elements per 16-byte
/// access when every address is aligned (`_x8` kernels, the last n % 8 elements one by one): the
/// scalar kernels' bits, which an unaligned view of the same values still runs. Lengths below
/// eight, multiples of it and with a tail; both GELU forms.
fn sixteen_byte_gelu_kernels_match_the_scalar_ones() {
    use dptrain_core::ops::fused::gelu::{backward as gelu_bwd, forward as gelu_bf16};
    use dptrain_core::{rng::Rng, DType, Device, Tensor};
    let mut rng = Rng::new(29);
    for n in [3usize, 8, 13, 4096, 4101] {
        let x: Vec<f32> = (0..n + 1).map(|_| (rng.normal() * 3.0) as f32).collect();
        let g: Vec<f32> = (0..n + 1).map(|_| rng.normal() as f32).collect();
        // The same values at an aligned start (the allocator's) and one element in (2 bytes).
        let on_device = |v: &[f32], start: usize| {
            let mut buf = vec![0.0f32; start];
            buf.extend_from_slice(&v[..n]);
            let t = Tensor::from_slice(&buf, &[buf.len()]).unwrap().to_device(Device::Cuda(0)).unwrap().to_dtype(DType::BF16);
            t.narrow(0, start, n).unwrap()
        };
        let bits = |t: &Tensor| t.to_dtype(DType::F32).to_vec::<f32>().unwrap().iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
        for tanh in [false, true] {
            let (xa, ga, xu, gu) = (on_device(&x, 0), on_device(&g, 0), on_device(&x, 1), on_device(&g, 1));
            assert_eq!(bits(&gelu_bf16(&xa, tanh).unwrap()), bits(&gelu_bf16(&xu, tanh).unwrap()), "forward, n {n}, tanh {tanh}");
            assert_eq!(bits(&gelu_bwd(&ga, &xa, tanh).unwrap()), bits(&gelu_bwd(&gu, &xu, tanh).unwrap()), "backward, n {n}, tanh {tanh}");
            // And the values are GELU's: the CPU's f32 GELU of the bf16 inputs, rounded once
            // (to within one bf16 step where erf or tanh differ in their last bit).
            let xs = xa.to_dtype(DType::F32).to_vec::<f32>().unwrap();
            let got = gelu_bf16(&xa, tanh).unwrap().to_dtype(DType::F32).to_vec::<f32>().unwrap();
            let tape = dptrain_core::autograd::Tape::new();
            let want = tape.leaf(Tensor::from_slice(&xs, &[n]).unwrap()).gelu(tanh).unwrap().value().to_vec::<f32>().unwrap();
            for (i, (gi, wi)) in got.iter().zip(&want).enumerate() {
                assert!((gi - wi).abs() <= 8e-3 * wi.abs().max(1e-3), "forward, n {n}, element {i}: {gi} vs {wi}");
            }
        }
    }
}

/// The cross-entropy's statistics, computed and kept on the device (one read of the logits, the
/// means folded there), are the CPU's: loss, log Z mean and max, logit mean, z-loss term and
/// accuracy — with rows where the target ties the largest logit (argmax's first index wins),
/// at the row's ends and beside the target (within one 16-byte load), and rows longer than a
/// block's stride; rows of 700 f32 are read 16 bytes a load, rows of 701 one element a load.
fn cross_entropy_statistics_match_the_cpu() {
    use dptrain_core::autograd::Tape;
    use dptrain_core::{rng::Rng, Device, Tensor};
    for v in [700usize, 701] {
        let rows = 37;
        let mut rng = Rng::new(21);
        let mut x: Vec<f32> = (0..rows * v).map(|_| (rng.normal() * 3.0) as f32).collect();
        let targets: Vec<u32> = (0..rows as u32).map(|r| (r * 131) % v as u32).collect();
        for r in 0..8 {
            let t = targets[r] as usize;
            // Rows 0–2: the target is the largest; rows 3–7: tied with an earlier index (loses)
            // or a later one (wins), at the row's ends or next to the target.
            x[r * v + t] = 50.0;
            match r {
                3 => x[r * v] = 50.0,
                4 => x[r * v + v - 1] = 50.0,
                6 => x[r * v + t - 1] = 50.0,
                7 => x[r * v + t + 1] = 50.0,
                _ => {}
            }
        }
        let h = Tensor::from_slice(&x, &[rows, v]).unwrap();
        let stats = |dev: Device| -> Vec<f64> {
            let tape = Tape::new();
            let ce = tape.leaf(h.to_device(dev).unwrap()).cross_entropy(&targets, 1e-3).unwrap();
            let mut out = vec![ce.loss.item().unwrap()];
            for p in [&ce.log_z_mean, &ce.log_z_max, &ce.logit_mean, &ce.z_loss, &ce.accuracy] {
                out.push(p.to_host().unwrap());
            }
            out
        };
        let (c, g) = (stats(Device::Cpu), stats(Device::Cuda(0)));
        assert!(c[5] > 0.0 && c[5] < 1.0, "accuracy {}", c[5]);
        for (i, (a, b)) in c.iter().zip(&g).enumerate() {
            assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "rows of {v}: statistic {i}: cpu {a} gpu {b}");
        }
        assert_eq!((c[5] * rows as f64).round(), (g[5] * rows as f64).round(), "rows of {v}: accuracy counts the same rows");
    }
}

/// Flash attention's max-attention-logit probe (the row maxima kept by the forward kernel, no
/// extra pass) is the CPU's maximum over unmasked scores, for both head sizes; a large logit
/// planted in the last, partial tile must be found.
fn flash_attention_probe_matches_the_cpu() {
    use dptrain_core::autograd::Tape;
    use dptrain_core::tensor::Precision;
    use dptrain_core::{rng::Rng, Device, Tensor};
    for heads in [2, 4] {
        let (b, t, c) = (2, 130, 128);
        let mut rng = Rng::new(5 + heads as u64);
        let mut x: Vec<f32> = (0..b * t * 3 * c).map(|_| rng.normal() as f32).collect();
        // Query 129 of batch 1 lined up with key 128 in head 0: a logit far above the rest.
        let (row_q, row_k) = ((t + 129) * 3 * c, (t + 128) * 3 * c + c);
        for j in 0..c / heads {
            x[row_q + j] = 2.0;
            x[row_k + j] = 2.0;
        }
        let h = Tensor::from_slice(&x, &[b, t, 3 * c]).unwrap();
        let max_logit = |dev: Device| {
            let tape = Tape::new();
            tape.set_precision(Precision::Bf16);
            let v = tape.leaf(h.to_device(dev).unwrap());
            v.causal_attention(heads).unwrap().max_logit.to_host().unwrap()
        };
        let (cpu, gpu) = (max_logit(Device::Cpu), max_logit(Device::Cuda(0)));
        let planted = 4.0 * (c / heads) as f64 / ((c / heads) as f64).sqrt();
        assert!((cpu - planted).abs() < 1e-3 * planted, "{heads} heads: cpu {cpu}, planted {planted}");
        assert!((gpu - cpu).abs() <= 1e-5 * cpu.abs(), "{heads} heads: gpu {gpu} cpu {cpu}");
    }
}

/// Packing views on the device, by both copy kernels: row by row when the innermost dim is
/// contiguous (head permutes, column slices, a bias broadcast over rows), element by element
/// otherwise (transposes, short rows), up to the six dims the kernels take — each exactly the
/// CPU's packing.
fn strided_copies_match_the_cpu() {
    use dptrain_core::ops::elementwise::t as ew;
    use dptrain_core::{rng::Rng, Device, Tensor};
    let mut rng = Rng::new(3);
    let v: Vec<f32> = (0..2 * 3 * 5 * 40).map(|_| rng.normal() as f32).collect();
    let h = Tensor::from_slice(&v, &[2, 3, 5, 40]).unwrap();
    let d = h.to_device(Device::Cuda(0)).unwrap();
    type View = fn(&Tensor) -> Tensor;
    let views: [(&str, View); 6] = [
        ("head permute [B, H, T, D] -> [B, T, H, D]", |t| t.permute(&[0, 2, 1, 3]).unwrap()),
        ("column slice", |t| t.narrow(3, 3, 30).unwrap()),
        ("slice of a permute", |t| t.permute(&[1, 0, 2, 3]).unwrap().narrow(0, 1, 2).unwrap()),
        ("short rows (generic kernel)", |t| t.narrow(3, 1, 7).unwrap()),
        ("transpose (generic kernel)", |t| t.transpose(2, 3).unwrap()),
        ("every dim permuted", |t| t.permute(&[3, 1, 0, 2]).unwrap()),
    ];
    for (name, view) in views {
        let want = view(&h).contiguous().to_vec::<f32>().unwrap();
        let got = view(&d).try_contiguous().unwrap().to_vec::<f32>().unwrap();
        assert_eq!(got, want, "{name}");
    }
    // Views that keep all six dims of the kernels' shape table (none merge): every element of
    // `[2, 3, 5, 2, 4, 5]` reversed, and seven dims whose six outer ones are reversed over
    // 16-element contiguous rows.
    for (dims, perm) in [(vec![2, 3, 5, 2, 4, 5], vec![5, 4, 3, 2, 1, 0]), (vec![2, 3, 2, 2, 3, 2, 16], vec![5, 4, 3, 2, 1, 0, 6])] {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let h = Tensor::from_slice(&v, &dims).unwrap();
        let d = h.to_device(Device::Cuda(0)).unwrap();
        let want = h.permute(&perm).unwrap().contiguous().to_vec::<f32>().unwrap();
        let got = d.permute(&perm).unwrap().try_contiguous().unwrap().to_vec::<f32>().unwrap();
        assert_eq!(got, want, "rank {} permuted {perm:?}", dims.len());
    }
    // A bias broadcast over rows, as `linear` fills its output before the GEMM.
    let b: Vec<f32> = (0..48).map(|i| i as f32 - 7.5).collect();
    let hb = Tensor::from_slice(&b, &[48]).unwrap();
    let want = ew::broadcast_to(&hb, &[37, 48]).unwrap().to_vec::<f32>().unwrap();
    let got = ew::broadcast_to(&hb.to_device(Device::Cuda(0)).unwrap(), &[37, 48]).unwrap().to_vec::<f32>().unwrap();
    assert_eq!(got, want, "bias broadcast");
}

/// `ops::embedding::rows` (the tape-free row gather SOAP re-sorts its second moment with) on a
/// view that starts inside a larger buffer, as SOAP's per-parameter slices do: the CPU's rows,
/// and the same one-line errors for a row out of range and a bf16 table on the device.
fn row_gathers_match_the_cpu() {
    use dptrain_core::ops::embedding::rows;
    use dptrain_core::{DType, Device, Tensor};
    let v: Vec<f32> = (0..100).map(|i| i as f32 * 0.5 - 3.0).collect();
    let h = Tensor::from_slice(&v, &[100]).unwrap().narrow(0, 10, 42).unwrap().reshape(&[6, 7]).unwrap();
    let d =
        Tensor::from_slice(&v, &[100]).unwrap().to_device(Device::Cuda(0)).unwrap().narrow(0, 10, 42).unwrap().reshape(&[6, 7]).unwrap();
    let ids = [5u32, 0, 3, 3, 1];
    let want = rows(&h, &ids).unwrap();
    assert_eq!(want.shape(), [5, 7]);
    assert_eq!(want.to_vec::<f32>().unwrap()[..7], v[45..52]);
    assert_eq!(rows(&d, &ids).unwrap().to_vec::<f32>().unwrap(), want.to_vec::<f32>().unwrap());
    for t in [&h, &d] {
        assert!(rows(t, &[6]).unwrap_err().to_string().contains("row 6 of a table of 6 rows"));
    }
    let half = d.to_dtype(DType::BF16);
    assert!(rows(&half, &[0]).unwrap_err().to_string().contains("f32 only"));
}

/// The training probes' per-tensor sums (`seg_probe_f32`, every mode) against the CPU loop,
/// over segments that span several chunks and one that is a single element.
/// The embedding's backward on the device — positions sorted by (id, position), each row's
/// positions summed in order — is the CPU's scatter-add bit for bit, for runs of one id longer
/// than a block and a tile, ids that never occur, a single id and a single position, and for
/// sorts over several chunks of 1024 positions in one, two and three radix passes (vocabularies
/// below 2⁸, 2¹⁶ and 2²⁴). Ids a multiple of `step` apart agree in their low bits, so a pass
/// missing leaves them interleaved: each row's sum split into runs, its bits changed.
fn the_embeddings_gradient_is_the_cpus_bit_for_bit() {
    use dptrain_core::autograd::Tape;
    use dptrain_core::{rng::Rng, Device, GradStore, Tensor};
    let mut rng = Rng::new(8);
    let cases = [
        (1000usize, 3usize, 5usize, 1u64),
        (333, 400, 7, 1),
        (257, 1, 4, 1),
        (1, 9, 3, 1),
        (2500, 5, 2, 1),
        (2500, 300, 2, 1),
        (3000, 1000, 2, 256),
        (3000, 70000, 2, 1),
        (3000, 70000, 2, 65536),
    ];
    for (n, vocab, dim, step) in cases {
        let ids: Vec<u32> = (0..n).map(|_| (rng.below((vocab as u64).div_ceil(step)) * step) as u32).collect();
        let w: Vec<f32> = (0..vocab * dim).map(|_| rng.normal() as f32).collect();
        let g: Vec<f32> = (0..n * dim).map(|_| rng.normal() as f32).collect();
        let grad = |device: Device| {
            let tape = Tape::new();
            let wv = tape.leaf(Tensor::from_slice(&w, &[vocab, dim]).unwrap().to_device(device).unwrap());
            let up = tape.constant(Tensor::from_slice(&g, &[n, dim]).unwrap().to_device(device).unwrap());
            let loss = wv.embedding(&ids, &[n]).unwrap().mul(up).unwrap().sum_all().unwrap();
            let leaves = tape.backward(loss, &mut GradStore::empty(), |_, _| {}).unwrap();
            leaves.get(wv).unwrap().to_vec::<f32>().unwrap()
        };
        assert_eq!(grad(Device::Cpu), grad(Device::Cuda(0)), "n {n}, vocab {vocab}, ids {step} apart");
    }
    // A parameter's table: on the device its gradient goes into the flat gradient buffer's slot
    // (zeroed, then added to by a second micro-step) — still the CPU's bits, and no pass adding a
    // table-sized temporary in.
    use dptrain_core::{DType, Init, ParamBuilder, Role};
    let (n, vocab, dim) = (300usize, 7usize, 6usize);
    let batches: Vec<Vec<u32>> = (0..2).map(|_| (0..n).map(|_| rng.below(vocab as u64) as u32).collect()).collect();
    let up: Vec<f32> = (0..n * dim).map(|_| rng.normal() as f32).collect();
    let d = dptrain_core::tensor::cuda::dev(0).unwrap();
    let grads_on = |device: Device| {
        let mut pb = ParamBuilder::new();
        let wte = pb.add("wte", &[vocab, dim], Role::Input, 1, dim, Init::Normal { std: 1.0 });
        let mut ps = pb.build(4, DType::F32).unwrap();
        ps.to_device(device).unwrap();
        let mut grads = GradStore::try_new(&ps).unwrap();
        grads.zero_grad();
        let up = Tensor::from_slice(&up, &[n, dim]).unwrap().to_device(device).unwrap();
        d.profile_start();
        for ids in &batches {
            let tape = Tape::new();
            let x = tape.param(&ps, wte).embedding(ids, &[n]).unwrap();
            let loss = x.mul(tape.constant(up.clone())).unwrap().sum_all().unwrap();
            tape.backward(loss, &mut grads, |_, _| {}).unwrap();
        }
        let adds = d.profile_stop().unwrap().iter().filter(|k| k.name == "add_assign_f32").map(|k| k.launches).sum::<usize>();
        (grads.flat().to_vec::<f32>().unwrap(), adds)
    };
    let (cpu, (gpu, adds)) = (grads_on(Device::Cpu).0, grads_on(Device::Cuda(0)));
    assert_eq!(cpu, gpu, "a parameter's table, two micro-steps");
    assert_eq!(adds, 0, "the table's gradient was added in by a pass of its own");
}

fn segment_sums_match_the_cpu() {
    // Σx² of the gradient norm: block partials summed on the device in a fixed order, against
    // the CPU's f64 sum (the GPU squares in f32 within a thread), for 1, a few and many blocks.
    for n in [1usize, 700, 300_001] {
        let mut rng = dptrain_core::rng::Rng::new(n as u64);
        let x: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let t = dptrain_core::Tensor::from_slice(&x, &[n]).unwrap();
        let cpu = dptrain_core::ops::flat::sum_squares(&t).unwrap();
        let gpu = dptrain_core::ops::flat::sum_squares(&t.to_device(dptrain_core::Device::Cuda(0)).unwrap()).unwrap();
        assert!((cpu - gpu).abs() <= 1e-5 * cpu, "n {n}: Σx² cpu {cpu} gpu {gpu}");
    }
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

/// The activation probes' reductions (`ops::stats`, probe.cu) give the CPU's numbers exactly:
/// over several 65,536-element chunks, with ties for the largest |x| (the lowest index wins),
/// a NaN (never the largest; last in the median's order), -0.0 and repeated values at the
/// median, and whole rows of zeros for the segment norms.
fn activation_statistics_match_the_cpu() {
    use dptrain_core::ops::stats;
    use dptrain_core::{rng::Rng, Device, Tensor};
    let mut rng = Rng::new(11);
    let n = 3 * 65_536 + 1_234;
    let mut x: Vec<f32> = (0..n).map(|_| (rng.normal() * 2.0) as f32).collect();
    // Ties for the largest |x| within a chunk and across two (the earliest, negative, must win),
    // a NaN, -0.0,
    // and a run of one value so the median sits inside repeats.
    x[150_000] = 40.0;
    x[70_500] = 40.0;
    x[70_000] = -40.0;
    x[5] = f32::NAN;
    x[6] = -0.0;
    for v in x.iter_mut().skip(1_000).take(3_000) {
        *v = 0.5;
    }
    let h = Tensor::from_slice(&x, &[n]).unwrap();
    let d = h.to_device(Device::Cuda(0)).unwrap();
    assert_eq!(stats::abs_top1(&h).unwrap(), (40.0, 70_000));
    assert_eq!(stats::abs_top1(&d).unwrap(), stats::abs_top1(&h).unwrap());
    for k in [0, 1, n / 2, n - 2, n - 1] {
        let (c, g) = (stats::abs_kth_smallest(&h, k).unwrap(), stats::abs_kth_smallest(&d, k).unwrap());
        assert_eq!(c.to_bits(), g.to_bits(), "rank {k}: cpu {c} gpu {g}");
    }
    assert!(stats::abs_kth_smallest(&d, n - 1).unwrap().is_nan(), "NaN sorts last");
    for thr in [0.0, 0.5, -1.0, 3.0] {
        assert_eq!(stats::count_at_most(&d, thr).unwrap(), stats::count_at_most(&h, thr).unwrap(), "threshold {thr}");
    }
    // qkv-like rows: 96 values, 6 segments of 16 of which the first 4 are looked at.
    let rows = 700;
    let mut q: Vec<f32> = (0..rows * 96).map(|_| rng.normal() as f32).collect();
    q[3 * 96 + 20] = 9.0;
    q[10 * 96..11 * 96].iter_mut().for_each(|v| *v = 0.0);
    let hq = Tensor::from_slice(&q, &[rows, 96]).unwrap();
    let dq = hq.to_device(Device::Cuda(0)).unwrap();
    let (c, g) = (stats::segment_norm_max(&hq, 96, 16, 4).unwrap(), stats::segment_norm_max(&dq, 96, 16, 4).unwrap());
    assert_eq!(c.len(), 4);
    assert_eq!(c.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), g.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "cpu {c:?} gpu {g:?}");
    assert!(c[1] >= 9.0);
}

#[path = "common/ghost_bn.rs"]
mod ghost_bn;
