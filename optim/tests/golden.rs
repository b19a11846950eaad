//! Optimizers against `torch.optim` over five steps with varying LR (fixtures from
//! `tools/reference/make_fixtures.py`), plus exact schedule sequences and clipping.

use dptrain_core::{DType, GradStore, Init, ParamBuilder, ParamStore, Role};
use dptrain_optim::*;
use serde_json::Value;

fn fixtures() -> Value {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/optim.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// One optimizer step in a world of one.
fn step<O: Optimizer + ?Sized>(opt: &mut O, ps: &mut ParamStore, g: &GradStore, lr: f64) {
    opt.step(ps, g, &mut StepCtx { step: 0, lr, comm: &mut dptrain_comm::LocalComm::new() }).unwrap();
}

fn vals(v: &Value) -> Vec<f32> {
    v["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn store(p0: &[f32]) -> ParamStore {
    let mut b = ParamBuilder::new();
    b.add("p", &[p0.len()], Role::Hidden, 1, 1, Init::Const(0.0));
    let mut ps = b.build(0, DType::F32).unwrap();
    ps.flat_mut::<f32>().unwrap().copy_from_slice(p0);
    ps
}

fn run(f: &Value, make: impl Fn(&ParamStore) -> Box<dyn Optimizer>) -> Vec<f32> {
    let mut ps = store(&vals(&f["p0"]));
    let mut opt = make(&ps);
    let mut grads = GradStore::new(&ps);
    for (g, lr) in f["grads"].as_array().unwrap().iter().zip(f["lrs"].as_array().unwrap()) {
        grads.flat_mut::<f32>().unwrap().copy_from_slice(&vals(g));
        step(opt.as_mut(), &mut ps, &grads, lr.as_f64().unwrap());
    }
    ps.flat().to_vec::<f32>().unwrap()
}

fn assert_close(name: &str, got: &[f32], want: &[f32]) {
    for (a, b) in got.iter().zip(want) {
        assert!((a - b).abs() <= 2e-6 * (1.0 + b.abs()), "{name}: {got:?}\nvs torch {want:?}");
    }
}

#[test]
fn sgd_matches_torch() {
    let f = fixtures();
    let sgd = |c: SgdConfig| move |ps: &ParamStore| Box::new(Sgd::new(c, ps)) as Box<dyn Optimizer>;
    assert_close(
        "sgd momentum+wd",
        &run(&f, sgd(SgdConfig { momentum: 0.9, weight_decay: 0.01, ..Default::default() })),
        &vals(&f["sgd_momentum_wd"]),
    );
    assert_close(
        "sgd nesterov",
        &run(&f, sgd(SgdConfig { momentum: 0.8, nesterov: true, ..Default::default() })),
        &vals(&f["sgd_nesterov"]),
    );
    assert_close("sgd plain", &run(&f, sgd(SgdConfig { momentum: 0.0, ..Default::default() })), &vals(&f["sgd_plain"]));
}

#[test]
fn adamw_matches_torch() {
    let f = fixtures();
    let adam = |c: AdamWConfig| move |ps: &ParamStore| Box::new(AdamW::new(c, ps)) as Box<dyn Optimizer>;
    let c = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, ..Default::default() };
    assert_close("adamw", &run(&f, adam(c)), &vals(&f["adamw"]));
    let c = AdamWConfig { beta1: 0.8, beta2: 0.99, eps: 1e-3, weight_decay: 0.0, ..Default::default() };
    assert_close("adamw eps", &run(&f, adam(c)), &vals(&f["adamw_eps"]));
}

#[test]
fn independent_decay_is_lr_free() {
    // With zero gradients Adam's update is 0, so only decay acts: θ_T = θ_0 · Π(1 − s_t·λ),
    // s_t = lr_t/η, independent of η itself.
    let p0 = [1.0f32, -2.0];
    for peak in [0.1, 1.0] {
        let mut ps = store(&p0);
        let mut opt =
            AdamW::new(AdamWConfig { weight_decay: 0.01, decay_mode: DecayMode::Independent, peak_lr: peak, ..Default::default() }, &ps);
        let g = GradStore::new(&ps);
        for s in [1.0, 0.5] {
            step(&mut opt, &mut ps, &g, s * peak);
        }
        let want = (1.0 - 0.01) * (1.0 - 0.005);
        let got = ps.flat().to_vec::<f32>().unwrap();
        assert!((got[0] as f64 - want).abs() < 1e-6 && (got[1] as f64 + 2.0 * want).abs() < 1e-6, "{got:?}");
    }
}

#[test]
fn vectors_can_be_exempt_from_decay() {
    let mut b = ParamBuilder::new();
    b.add("w", &[2], Role::Hidden, 1, 1, Init::Const(1.0));
    b.add("bias", &[2], Role::Vector, 1, 1, Init::Const(1.0));
    let mut ps = b.build(0, DType::F32).unwrap();
    let mut opt = Sgd::new(SgdConfig { momentum: 0.0, weight_decay: 0.5, decay_vectors: false, ..Default::default() }, &ps);
    let g = GradStore::new(&ps);
    step(&mut opt, &mut ps, &g, 1.0);
    assert_eq!(ps.flat().to_vec::<f32>().unwrap(), vec![0.5, 0.5, 1.0, 1.0]);
}

#[test]
fn schedules_follow_exact_sequences() {
    let s = Schedule { kind: ScheduleKind::Cosine, peak_lr: 1.0, final_lr: 0.1, warmup_steps: 4, total_steps: 12 };
    let got: Vec<f64> = (0..14).map(|i| s.lr(i)).collect();
    let mut want = vec![0.25, 0.5, 0.75, 1.0];
    want.extend((0..8).map(|k| 0.1 + 0.45 * (1.0 + (std::f64::consts::PI * k as f64 / 8.0).cos())));
    want.extend([0.1, 0.1]);
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() < 1e-12, "{got:?} vs {want:?}");
    }
    let l = Schedule { kind: ScheduleKind::Linear, peak_lr: 2.0, final_lr: 0.0, warmup_steps: 0, total_steps: 4 };
    assert_eq!((0..5).map(|i| l.lr(i)).collect::<Vec<_>>(), vec![2.0, 1.5, 1.0, 0.5, 0.0]);
    let c = Schedule { kind: ScheduleKind::Constant, peak_lr: 0.3, final_lr: 0.0, warmup_steps: 2, total_steps: 10 };
    assert_eq!((0..4).map(|i| c.lr(i)).collect::<Vec<_>>(), vec![0.15, 0.3, 0.3, 0.3]);
}

#[test]
fn clipping_scales_to_max_norm() {
    let ps = store(&[0.0; 4]);
    let mut g = GradStore::new(&ps);
    g.flat_mut::<f32>().unwrap().copy_from_slice(&[3.0, 4.0, 0.0, 0.0]);
    assert!((clip_grad_norm(&mut g, 10.0).unwrap() - 5.0).abs() < 1e-9);
    assert_eq!(g.flat().to_vec::<f32>().unwrap()[..2], [3.0, 4.0]);
    assert!((clip_grad_norm(&mut g, 1.0).unwrap() - 5.0).abs() < 1e-9);
    assert!((grad_norm(&g).unwrap() - 1.0).abs() < 1e-5);
}

#[test]
fn state_roundtrips_by_param_name() {
    let f = fixtures();
    let mut ps = store(&vals(&f["p0"]));
    let mut a = AdamW::new(AdamWConfig::default(), &ps);
    let mut g = GradStore::new(&ps);
    g.flat_mut::<f32>().unwrap().copy_from_slice(&vals(&f["grads"][0]));
    step(&mut a, &mut ps, &g, 0.1);
    let (tensors, scalars) = a.state(&ps).unwrap();
    assert!(tensors.iter().any(|(n, _)| n == "exp_avg.p"));
    let map = tensors.into_iter().collect();
    let mut b = AdamW::new(AdamWConfig::default(), &ps);
    b.load_state(&ps, &map, &scalars).unwrap();
    let mut ps2 = store(&ps.flat().to_vec::<f32>().unwrap());
    step(&mut a, &mut ps, &g, 0.1);
    step(&mut b, &mut ps2, &g, 0.1);
    assert_eq!(ps.flat().to_vec::<f32>().unwrap(), ps2.flat().to_vec::<f32>().unwrap());
    assert!(b.load_state(&ps, &Default::default(), &scalars).is_err());
}

/// Two parameters with torch's fixture values, the second with its own learning-rate and decay
/// multipliers: each must follow the trajectory of an optimizer run on it alone with
/// lr·multiplier (and, for coupled AdamW and SGD, decay λ·wd-multiplier) — torch's parameter
/// groups.
#[test]
fn per_parameter_scales_act_as_parameter_groups() {
    let f = fixtures();
    let p0 = vals(&f["p0"]);
    let n = p0.len();
    let grads: Vec<Vec<f32>> = f["grads"].as_array().unwrap().iter().map(vals).collect();
    let lrs: Vec<f64> = f["lrs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    let (lr_b, wd_b) = (0.25, 0.5);
    type Make = Box<dyn Fn(&ParamStore, Option<&ParamScales>) -> Box<dyn Optimizer>>;
    let cases: Vec<(&str, Make)> = vec![
        (
            "adamw coupled",
            Box::new(|ps: &ParamStore, s: Option<&ParamScales>| {
                let c = AdamWConfig { weight_decay: 0.1, decay_vectors: true, ..Default::default() };
                match s {
                    Some(s) => Box::new(AdamW::with_scales(c, ps, s).unwrap()) as Box<dyn Optimizer>,
                    None => Box::new(AdamW::new(c, ps)),
                }
            }),
        ),
        (
            "sgd nesterov",
            Box::new(|ps: &ParamStore, s: Option<&ParamScales>| {
                let c = SgdConfig { momentum: 0.8, nesterov: true, weight_decay: 0.01, decay_vectors: true, ..Default::default() };
                match s {
                    Some(s) => Box::new(Sgd::with_scales(c, ps, s).unwrap()) as Box<dyn Optimizer>,
                    None => Box::new(Sgd::new(c, ps)),
                }
            }),
        ),
    ];
    for (name, make) in &cases {
        // Both parameters in one store, the second scaled.
        let mut b = ParamBuilder::new();
        b.add("a", &[n], Role::Hidden, 1, 1, Init::Const(0.0));
        b.add("b", &[n], Role::Hidden, 1, 1, Init::Const(0.0));
        let mut ps = b.build(0, DType::F32).unwrap();
        ps.flat_mut::<f32>().unwrap()[..n].copy_from_slice(&p0);
        ps.flat_mut::<f32>().unwrap()[n..].copy_from_slice(&p0);
        let scales = ParamScales { lr: vec![1.0, lr_b], wd: vec![1.0, wd_b] };
        let mut opt = make(&ps, Some(&scales));
        let mut g = GradStore::new(&ps);
        // Each alone: the first at lr, the second at lr·lr_b with its decay multiplier.
        let mut a_alone = store(&p0);
        let mut opt_a = make(&a_alone, None);
        let mut b_alone = store(&p0);
        let mut opt_b = make(&b_alone, Some(&ParamScales { lr: vec![1.0], wd: vec![wd_b] }));
        let mut ga = GradStore::new(&a_alone);
        for (gr, &lr) in grads.iter().zip(&lrs) {
            g.flat_mut::<f32>().unwrap()[..n].copy_from_slice(gr);
            g.flat_mut::<f32>().unwrap()[n..].copy_from_slice(gr);
            ga.flat_mut::<f32>().unwrap().copy_from_slice(gr);
            step(opt.as_mut(), &mut ps, &g, lr);
            step(opt_a.as_mut(), &mut a_alone, &ga, lr);
            step(opt_b.as_mut(), &mut b_alone, &ga, lr * lr_b);
        }
        let got = ps.flat().to_vec::<f32>().unwrap();
        assert_eq!(got[..n], a_alone.flat().to_vec::<f32>().unwrap()[..], "{name}: the unscaled parameter");
        let want_b = b_alone.flat().to_vec::<f32>().unwrap();
        for (x, y) in got[n..].iter().zip(&want_b) {
            assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{name}: scaled parameter {:?} vs alone at lr·{lr_b} {want_b:?}", &got[n..]);
        }
        // And the scaled parameter really moved differently from the unscaled one.
        assert!(got[n..] != got[..n], "{name}: the multipliers had no effect");
    }
    // Bad multipliers are refused.
    let ps = store(&p0);
    assert!(AdamW::with_scales(AdamWConfig::default(), &ps, &ParamScales { lr: vec![1.0, 1.0], wd: vec![1.0] }).is_err());
    assert!(Sgd::with_scales(SgdConfig::default(), &ps, &ParamScales { lr: vec![f64::NAN], wd: vec![1.0] }).is_err());
}
