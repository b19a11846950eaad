//! Optimizers against `torch.optim` over five steps with varying LR (fixtures from
//! `tools/reference/make_fixtures.py`), plus exact schedule sequences and clipping.

use dptrain_core::{DType, GradStore, Init, ParamBuilder, ParamStore, Role};
use dptrain_optim::*;
use serde_json::Value;

fn fixtures() -> Value {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/optim.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
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
        opt.step(&mut ps, &grads, lr.as_f64().unwrap()).unwrap();
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
            opt.step(&mut ps, &g, s * peak).unwrap();
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
    opt.step(&mut ps, &g, 1.0).unwrap();
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
    a.step(&mut ps, &g, 0.1).unwrap();
    let (tensors, scalars) = a.state(&ps).unwrap();
    assert!(tensors.iter().any(|(n, _)| n == "exp_avg.p"));
    let map = tensors.into_iter().collect();
    let mut b = AdamW::new(AdamWConfig::default(), &ps);
    b.load_state(&ps, &map, &scalars).unwrap();
    let mut ps2 = store(&ps.flat().to_vec::<f32>().unwrap());
    a.step(&mut ps, &g, 0.1).unwrap();
    b.step(&mut ps2, &g, 0.1).unwrap();
    assert_eq!(ps.flat().to_vec::<f32>().unwrap(), ps2.flat().to_vec::<f32>().unwrap());
    assert!(b.load_state(&ps, &Default::default(), &scalars).is_err());
}
