//! Engine behaviour beyond op numerics: parameter-gradient-final events, in-place accumulation,
//! loud failures, buffer reuse, views, erf accuracy and parameter-store I/O.

use dptrain_core::rng::Rng;
use dptrain_core::tensor::{pool_stats, storage::erf_f32, storage::erf_f64};
use dptrain_core::{DType, GradStore, Init, ParamBuilder, ParamId, Role, Tape, Tensor};

fn store() -> dptrain_core::ParamStore {
    let mut b = ParamBuilder::new();
    b.scope("l0", |b| {
        b.add("weight", &[4, 3], Role::Input, 3, 4, Init::Normal { std: 0.5 });
        b.add("bias", &[4], Role::Vector, 1, 4, Init::Const(0.1));
    });
    b.scope("l1", |b| {
        b.add("weight", &[2, 4], Role::Output, 4, 2, Init::Uniform { bound: 0.5 });
    });
    b.add("unused", &[3], Role::Vector, 1, 3, Init::Const(1.0));
    b.build(7, DType::F32).unwrap()
}

#[test]
fn grad_final_events_fire_once_in_backward_order() {
    let ps = store();
    assert_eq!(ps.infos().iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["l0.weight", "l0.bias", "l1.weight", "unused"]);
    let mut grads = GradStore::new(&ps);
    let tape = Tape::new();
    let x = tape.constant(Tensor::from_vec(vec![0.3f32, -0.2, 0.5, 1.0, 0.1, -0.7], &[2, 3]).unwrap());
    let w0 = tape.param(&ps, ParamId(0));
    let b0 = tape.param(&ps, ParamId(1));
    let w1 = tape.param(&ps, ParamId(2));
    let _unused_on_tape = tape.param(&ps, ParamId(3));
    // w0 is used twice: it must fire only after its second (earlier-in-forward) use.
    let h = x.linear(w0, Some(b0)).unwrap().tanh().unwrap();
    let h2 = x.linear(w0, None).unwrap().add(h).unwrap();
    let loss = h2.linear(w1, None).unwrap().square().unwrap().mean_all().unwrap();
    let mut order = vec![];
    tape.backward(loss, &mut grads, |p, g| {
        // The gradient must be complete when the event fires: check w0's against the end value later.
        order.push((p, g.get(p).to_vec()));
    })
    .unwrap();
    let ids: Vec<usize> = order.iter().map(|(p, _)| p.0).collect();
    assert_eq!(ids, vec![2, 0, 1, 3], "backward order: l1.weight, then l0.* (w0 after its last use), unused last");
    for (p, g) in &order {
        assert_eq!(g, &grads.get(*p).to_vec(), "gradient of {p:?} changed after its final event");
    }
    assert!(grads.get(ParamId(3)).iter().all(|&v| v == 0.0));
    assert!(grads.get(ParamId(0)).iter().any(|&v| v != 0.0));
}

#[test]
fn gradients_accumulate_until_zero_grad() {
    let ps = store();
    let mut grads = GradStore::new(&ps);
    let run = |grads: &mut GradStore| {
        let tape = Tape::new();
        let x = tape.constant(Tensor::from_vec(vec![1.0f32, 2.0, 3.0], &[1, 3]).unwrap());
        let loss = x.linear(tape.param(&ps, ParamId(0)), None).unwrap().sum_all().unwrap();
        tape.backward(loss, grads, |_, _| {}).unwrap();
    };
    grads.zero_grad();
    run(&mut grads);
    let once = grads.get(ParamId(0)).to_vec();
    assert_eq!(&once[..3], &[1.0, 2.0, 3.0]);
    run(&mut grads);
    let twice = grads.get(ParamId(0)).to_vec();
    assert!(once.iter().zip(&twice).all(|(a, b)| (2.0 * a - b).abs() < 1e-6));
    grads.zero_grad();
    run(&mut grads);
    assert_eq!(grads.get(ParamId(0)).to_vec(), once);
}

#[test]
fn a_gradient_reaching_an_op_without_backward_is_an_error() {
    let tape = Tape::new();
    let x = tape.leaf(Tensor::ones(&[3], DType::F32));
    let y = tape.record_no_backward("argmax_like", Tensor::ones(&[3], DType::F32), &[x]);
    let loss = y.sum_all().unwrap();
    let ps = ParamBuilder::new().build(0, DType::F32).unwrap();
    let err = tape.backward(loss, &mut GradStore::new(&ps), |_, _| {}).err().expect("must fail");
    assert!(err.to_string().contains("argmax_like"), "{err}");
    // And a second backward on the same tape is refused.
    assert!(tape.backward(loss, &mut GradStore::new(&ps), |_, _| {}).is_err());
}

#[test]
fn optimizer_cannot_write_params_while_a_tape_holds_them() {
    let mut ps = store();
    {
        let tape = Tape::new();
        let _w = tape.param(&ps, ParamId(0));
        // ps is borrowed by the tape here; the flat buffer is shared
        assert!(ps.flat().numel() > 0);
    }
    assert!(ps.flat_mut::<f32>().is_ok());
}

#[test]
fn steady_state_step_reuses_buffers() {
    // A linear + tanh + cross-entropy step on 64×256 activations: after two warm-up steps,
    // no pooled request may miss.
    let mut b = ParamBuilder::new();
    let w = b.add("w", &[256, 256], Role::Hidden, 256, 256, Init::Normal { std: 0.05 });
    let ps = b.build(1, DType::F32).unwrap();
    let mut grads = GradStore::new(&ps);
    let mut rng = Rng::new(3);
    let x: Vec<f32> = (0..64 * 256).map(|_| rng.normal() as f32).collect();
    let targets: Vec<u32> = (0..64).map(|i| i % 256).collect();
    let step = |grads: &mut GradStore| {
        let tape = Tape::new();
        let xv = tape.constant(Tensor::from_slice(&x, &[64, 256]).unwrap());
        let y = xv.linear(tape.param(&ps, w), None).unwrap().gelu(false).unwrap();
        let loss = y.cross_entropy(&targets, 0.0).unwrap().loss;
        grads.zero_grad();
        tape.backward(loss, grads, |_, _| {}).unwrap();
    };
    step(&mut grads);
    step(&mut grads);
    let before = pool_stats();
    for _ in 0..3 {
        step(&mut grads);
    }
    let after = pool_stats();
    // Other tests run in parallel threads and share the pool, so only this test's own traffic
    // is bounded from below; misses must not grow with steps.
    assert!(after.hits - before.hits >= 3 * 5, "expected pooled reuse, got {before:?} -> {after:?}");
    assert!(after.misses - before.misses <= 2, "steady state allocated: {before:?} -> {after:?}");
}

#[test]
fn views_do_not_copy_and_contiguous_copies_only_when_needed() {
    let t = Tensor::from_vec((0..24).map(|x| x as f32).collect(), &[2, 3, 4]).unwrap();
    let tr = t.transpose(1, 2).unwrap();
    assert!(tr.same_storage(&t) && !tr.is_contiguous());
    let c = tr.contiguous();
    assert!(!c.same_storage(&t));
    assert_eq!(c.to_vec::<f32>().unwrap()[..4], [0.0, 4.0, 8.0, 1.0]);
    assert!(t.contiguous().same_storage(&t));
    let n = t.narrow(2, 1, 2).unwrap();
    assert_eq!(n.to_vec::<f32>().unwrap()[..4], [1.0, 2.0, 5.0, 6.0]);
    assert!(t.reshape(&[6, 4]).unwrap().same_storage(&t));
}

#[test]
fn erf_is_accurate() {
    // erf_f64 against known values; erf_f32 against erf_f64.
    for (x, want) in [
        (0.5, 0.520_499_877_813_046_5),
        (1.0, 0.842_700_792_949_714_9),
        (-2.0, -0.995_322_265_018_952_7),
        (0.01, 0.011_283_415_555_849_618),
    ] {
        assert!((erf_f64(x) - want).abs() < 1e-15, "erf({x}) = {}", erf_f64(x));
    }
    let mut worst: f64 = 0.0;
    for i in -6000..=6000 {
        let x = i as f64 / 1000.0;
        worst = worst.max((erf_f32(x as f32) as f64 - erf_f64(x)).abs());
    }
    assert!(worst < 5e-7, "f32 erf max error {worst:e}");
}

#[test]
fn param_store_roundtrips_through_safetensors() {
    let ps = store();
    let dir = std::env::temp_dir().join(format!("dptrain-st-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("p.safetensors");
    ps.save_safetensors(&path).unwrap();
    let mut other = {
        let mut b = ParamBuilder::new();
        b.scope("l0", |b| {
            b.add("weight", &[4, 3], Role::Input, 3, 4, Init::Const(0.0));
            b.add("bias", &[4], Role::Vector, 1, 4, Init::Const(0.0));
        });
        b.scope("l1", |b| b.add("weight", &[2, 4], Role::Output, 4, 2, Init::Const(0.0)));
        b.add("unused", &[3], Role::Vector, 1, 3, Init::Const(0.0));
        b.build(0, DType::F32).unwrap()
    };
    other.load_safetensors(&path).unwrap();
    assert_eq!(other.flat().to_vec::<f32>().unwrap(), ps.flat().to_vec::<f32>().unwrap());
    assert_eq!(other.layout_fingerprint(), ps.layout_fingerprint());
    // A file with a missing tensor is rejected, naming it, and nothing is written.
    std::fs::write(&path, b"garbage").unwrap();
    let err = other.load_safetensors(&path).unwrap_err().to_string();
    assert!(err.contains("p.safetensors"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn init_is_deterministic_per_seed() {
    let a = store().flat().to_vec::<f32>().unwrap();
    let b = store().flat().to_vec::<f32>().unwrap();
    assert_eq!(a, b);
    assert_eq!(&a[12..16], &[0.1, 0.1, 0.1, 0.1]);
    let std: f64 = (a[..12].iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / 12.0).sqrt();
    assert!(std > 0.2 && std < 0.9, "std {std}");
}

/// An f32 store holds the f64 store's values rounded once (the draws are made in f64 either
/// way; the f32 store is written directly, with no f64 copy of the model on the way).
#[test]
fn f32_init_is_the_f64_init_rounded() {
    let build = |dtype| {
        let mut b = ParamBuilder::new();
        b.add("w", &[40, 30], Role::Hidden, 30, 40, Init::Normal { std: 0.02 });
        b.add("u", &[17], Role::Vector, 1, 17, Init::Uniform { bound: 0.3 });
        b.add("q", &[6, 5], Role::Hidden, 5, 6, Init::NormalZeroPrefix { std: 1.0, zeros: 7 });
        b.add("c", &[3], Role::Vector, 1, 3, Init::Const(0.1));
        b.build(11, dtype).unwrap()
    };
    let (a, b) = (build(DType::F32), build(DType::F64));
    let rounded: Vec<u32> = b.flat().data::<f64>().unwrap().iter().map(|&x| (x as f32).to_bits()).collect();
    let direct: Vec<u32> = a.flat().data::<f32>().unwrap().iter().map(|x| x.to_bits()).collect();
    assert_eq!(direct, rounded);
    assert!(direct[1200 + 17..1200 + 17 + 7].iter().all(|&x| x == 0) && direct[1200 + 17 + 7] != 0);
}

/// A parameter whose element count overflows the address space is an error of `build`, not a
/// wrapped size (the launcher refuses such models before; a library user gets this).
#[test]
fn a_parameter_too_large_to_address_is_an_error() {
    let mut b = ParamBuilder::new();
    b.add("ok", &[4], Role::Vector, 1, 4, Init::Const(0.0));
    b.scope("l", |b| b.add("w", &[1 << 40, 1 << 40], Role::Hidden, 1 << 40, 1 << 40, Init::Const(0.0)));
    let e = b.build(0, DType::F32).err().expect("too large").to_string();
    assert!(e.contains("l.w: shape [1099511627776, 1099511627776] has more elements than this machine can address"), "{e}");
    let mut b = ParamBuilder::new();
    b.add("a", &[usize::MAX / 2 + 1], Role::Vector, 1, 1, Init::Const(0.0));
    b.add("b", &[usize::MAX / 2 + 1], Role::Vector, 1, 1, Init::Const(0.0));
    let e = b.build(0, DType::F32).err().expect("total too large").to_string();
    assert!(e.contains("b: shape"), "{e}");
}

/// `Precision::Bf16` on the CPU: a GEMM op computes exactly what the f32 op computes on inputs
/// rounded to bf16 (forward and the input/weight/bias gradients), and differs from plain f32.
#[test]
fn bf16_precision_rounds_gemm_inputs_only() {
    use dptrain_core::Precision;
    let mut r = Rng::new(3);
    let mut rnd = |n: usize| (0..n).map(|_| r.normal() as f32).collect::<Vec<f32>>();
    let (x, w, b, g) = (rnd(6 * 10), rnd(5 * 10), rnd(5), rnd(6 * 5));
    let round = |v: &[f32]| v.iter().map(|&a| half::bf16::from_f32(a).to_f32()).collect::<Vec<f32>>();
    // Runs linear + a weighted sum; returns (y, dx, dw, db).
    let run = |prec: Precision, x: &[f32], w: &[f32], g: &[f32]| {
        let tape = Tape::new();
        tape.set_precision(prec);
        let xv = tape.leaf(Tensor::from_slice(x, &[6, 10]).unwrap());
        let wv = tape.leaf(Tensor::from_slice(w, &[5, 10]).unwrap());
        let bv = tape.leaf(Tensor::from_slice(&b, &[5]).unwrap());
        let y = xv.linear(wv, Some(bv)).unwrap();
        let loss = y.mul(tape.constant(Tensor::from_slice(g, &[6, 5]).unwrap())).unwrap().sum_all().unwrap();
        let lg = tape.backward(loss, &mut GradStore::empty(), |_, _| {}).unwrap();
        let get = |v| lg.get(v).unwrap().to_vec::<f32>().unwrap();
        (y.value().to_vec::<f32>().unwrap(), get(xv), get(wv), get(bv))
    };
    let bf = run(Precision::Bf16, &x, &w, &g);
    // Forward: bf16(x)·bf16(w)ᵀ + b. Backward: dx = bf16(g)·bf16(w), dw = bf16(g)ᵀ·bf16(x),
    // db = Σ bf16(g) (on a GPU the weight GEMM's epilogue sums its bf16 operand).
    let (fy, _, _, _) = run(Precision::F32, &round(&x), &round(&w), &g);
    let (_, fx, fw, fb) = run(Precision::F32, &round(&x), &round(&w), &round(&g));
    assert_eq!(bf.0, fy);
    assert_eq!(bf.1, fx);
    assert_eq!(bf.2, fw);
    assert_eq!(bf.3, fb);
    let f32run = run(Precision::F32, &x, &w, &g);
    assert_ne!(bf.0, f32run.0, "bf16 must change the numbers");
    let rel = bf.0.iter().zip(&f32run.0).map(|(a, b)| ((a - b).abs() / (1.0 + b.abs())) as f64).fold(0.0, f64::max);
    assert!(rel < 2e-2, "bf16 vs f32 relative difference {rel}");
}

/// qk_layer_norm is layer_norm applied to each head's query and key (with the query's and the
/// key's own affine), the values untouched — checked against the separately golden-tested
/// `layer_norm` on the split heads, forward and the gradients of everything.
#[test]
fn qk_layer_norm_is_layer_norm_on_each_heads_query_and_key() {
    let (b, t, h, d) = (2, 5, 3, 4);
    let c = h * d;
    let mut rng = Rng::new(11);
    let mut rnd = |n: usize| -> Vec<f64> { (0..n).map(|_| rng.normal() * 2.0 + 0.5).collect() };
    let (x, w, bias, up) = (rnd(b * t * 3 * c), rnd(2 * d), rnd(2 * d), rnd(b * t * 3 * c));
    let run = |fused: bool| -> (Vec<f64>, Vec<Vec<f64>>) {
        let tape = Tape::new();
        let xv = tape.leaf(Tensor::from_vec(x.clone(), &[b, t, 3 * c]).unwrap());
        let wv = tape.leaf(Tensor::from_vec(w.clone(), &[2, d]).unwrap());
        let bv = tape.leaf(Tensor::from_vec(bias.clone(), &[2, d]).unwrap());
        let y = if fused {
            xv.qk_layer_norm(h, Some(wv), Some(bv), 1e-5).unwrap()
        } else {
            let parts = xv.split(2, &[c, c, c]).unwrap();
            let mut normed = vec![];
            for k in 0..2 {
                let wk = wv.narrow(0, k, 1).unwrap().reshape(&[d]).unwrap();
                let bk = bv.narrow(0, k, 1).unwrap().reshape(&[d]).unwrap();
                normed.push(
                    parts[k].reshape(&[b, t, h, d]).unwrap().layer_norm(Some(wk), Some(bk), 1e-5).unwrap().reshape(&[b, t, c]).unwrap(),
                );
            }
            normed.push(parts[2]);
            dptrain_core::ops::shape::cat(&normed, 2).unwrap()
        };
        let loss = y.mul(tape.constant(Tensor::from_vec(up.clone(), &[b, t, 3 * c]).unwrap())).unwrap().sum_all().unwrap();
        let store = ParamBuilder::new().build(0, DType::F64).unwrap();
        let lg = tape.backward(loss, &mut GradStore::new(&store), |_, _| {}).unwrap();
        let grads = [xv, wv, bv].map(|v| lg.get(v).unwrap().to_vec::<f64>().unwrap());
        (y.value().to_vec::<f64>().unwrap(), grads.to_vec())
    };
    let ((y1, g1), (y2, g2)) = (run(true), run(false));
    let close = |a: &[f64], b: &[f64], what: &str| {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (p, q)) in a.iter().zip(b).enumerate() {
            assert!((p - q).abs() <= 1e-9 * (1.0 + q.abs()), "{what}[{i}]: {p} vs {q}");
        }
    };
    close(&y1, &y2, "y");
    for (k, what) in ["dx", "dw", "db"].iter().enumerate() {
        close(&g1[k], &g2[k], what);
    }
}

/// The probes the fused ops report, against hand computation: attention's max pre-softmax logit
/// over the causal pairs, and the cross-entropy's mean and max log Z.
#[test]
fn attention_max_logit_and_log_z_are_what_they_say() {
    // One head, d_head 2, three tokens: q_i, k_i, v_i.
    let (q, k) = ([[1.0, 0.0], [2.0, 1.0], [0.5, -3.0]], [[3.0, 1.0], [1.0, 4.0], [-2.0, 2.0]]);
    let mut qkv = vec![];
    for t in 0..3 {
        qkv.extend(q[t]);
        qkv.extend(k[t]);
        qkv.extend([0.1, 0.2]);
    }
    let tape = Tape::new();
    let x = tape.leaf(Tensor::from_vec(qkv, &[1, 3, 6]).unwrap());
    let att = x.causal_attention(1).unwrap();
    let mut want = f64::NEG_INFINITY;
    for i in 0..3 {
        for j in 0..=i {
            want = want.max((q[i][0] * k[j][0] + q[i][1] * k[j][1]) / 2f64.sqrt());
        }
    }
    // q_1·k_0 = 6 + 1 = 7 is the largest causal pair (q_0·k_1 = 3 and q_2·k_2 = −7 are not).
    assert!((want - 7.0 / 2f64.sqrt()).abs() < 1e-12);
    assert!((att.max_logit.to_host().unwrap() - want).abs() < 1e-12);

    let logits = [[1.0, 2.0, 3.0], [0.0, -1.0, 10.0]];
    let tape = Tape::new();
    let l = tape.leaf(Tensor::from_vec(logits.concat(), &[2, 3]).unwrap());
    let ce = l.cross_entropy(&[0, 2], 0.0).unwrap();
    let lse = |r: &[f64; 3]| r.iter().map(|x| x.exp()).sum::<f64>().ln();
    let (a, b) = (lse(&logits[0]), lse(&logits[1]));
    let (lz, lzmax) = (ce.log_z_mean.to_host().unwrap(), ce.log_z_max.to_host().unwrap());
    assert!((lz - (a + b) / 2.0).abs() < 1e-12 && (lzmax - b).abs() < 1e-12);
    assert!((ce.logit_mean.to_host().unwrap() - 15.0 / 6.0).abs() < 1e-12);
}

/// bf16 activations on the CPU: a `linear_half` output is rounded to bf16 and marked, ops of a
/// marked value (GELU, attention) are marked too, and the gradient reaching a marked value is
/// rounded to bf16 before its backward runs — what a GPU storing them in bf16 computes.
#[test]
fn bf16_activations_are_rounded_and_so_are_their_gradients() {
    use dptrain_core::tensor::Precision;
    let bf = |x: f32| half::bf16::from_f32(x).to_f32();
    let tape = Tape::new();
    tape.set_precision(Precision::Bf16);
    let x = tape.leaf(Tensor::from_vec(vec![0.3f32, -1.7, 2.9, 0.011], &[2, 2]).unwrap());
    let w = tape.leaf(Tensor::from_vec(vec![1.0f32 / 3.0, 0.7, -0.2, 1.3], &[2, 2]).unwrap());
    let y = x.linear_half(w, None).unwrap();
    assert!(y.is_half());
    let plain = x.linear(w, None).unwrap();
    assert!(!plain.is_half());
    let (yv, pv) = (y.value().to_vec::<f32>().unwrap(), plain.value().to_vec::<f32>().unwrap());
    for (a, b) in yv.iter().zip(&pv) {
        assert_eq!(*a, bf(*b), "the half output is the plain one rounded to bf16");
    }
    assert!(yv.iter().zip(&pv).any(|(a, b)| a != b), "the test values must need rounding");
    let g = y.gelu(true).unwrap();
    assert!(g.is_half());
    for v in g.value().to_vec::<f32>().unwrap() {
        assert_eq!(v, bf(v), "GELU of a bf16 activation is one");
    }
    // d(Σ c·h)/dh = c for h = to_half(x): rounded to bf16 at h; unmarked, exactly c.
    let c = 1.0f32 / 3.0;
    let tape = Tape::new();
    let a = tape.leaf(Tensor::from_vec(vec![1.0f32, 2.0], &[2]).unwrap());
    let b = tape.leaf(Tensor::from_vec(vec![1.0f32, 2.0], &[2]).unwrap());
    let h = a.to_half().unwrap();
    let loss = h.add(b).unwrap().scale(c as f64).unwrap().sum_all().unwrap();
    let mut grads = GradStore::empty();
    let lg = tape.backward(loss, &mut grads, |_, _| {}).unwrap();
    assert_eq!(lg.get(a).unwrap().to_vec::<f32>().unwrap(), vec![bf(c); 2]);
    assert_eq!(lg.get(b).unwrap().to_vec::<f32>().unwrap(), vec![c; 2]);
    assert_ne!(bf(c), c);
}
