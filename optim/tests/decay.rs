//! Independent weight decay (Wortsman et al. 2023: θ ← θ − s_t(η·Δ + λθ), s_t = lr / peak lr)
//! for every Adam-family optimizer: the step is the decay-free step plus −s_t·λ·θ (LAMB: θ
//! before the step; SOAP: after it, as its coupled decay) — checked against each optimizer run
//! without decay from the same state, on the host (the emulator test checks the kernels).

use dptrain_core::rng::Rng;
use dptrain_core::{DType, GradStore, Init, ParamBuilder, ParamStore, Role, Tensor};
use dptrain_optim::*;

fn store() -> ParamStore {
    let mut b = ParamBuilder::new();
    b.add("w", &[6, 4], Role::Hidden, 4, 6, Init::Normal { std: 0.5 });
    b.add("bias", &[6], Role::Vector, 1, 1, Init::Normal { std: 0.5 });
    b.build(3, DType::F32).unwrap()
}

/// Parameters before and after each of 3 steps at lr = peak · (1, 0.5, 0.25).
fn trajectory(opt: &mut dyn Optimizer) -> Vec<Vec<f32>> {
    let mut ps = store();
    let mut g = GradStore::new(&ps);
    let mut rng = Rng::new(9);
    let mut solo = dptrain_comm::LocalComm::new();
    let mut out = vec![ps.flat().to_vec::<f32>().unwrap()];
    for i in 0..3 {
        let gr: Vec<f32> = (0..ps.numel()).map(|_| rng.normal() as f32).collect();
        *g.flat_tensor_mut() = Tensor::from_slice(&gr, &[gr.len()]).unwrap();
        opt.step(&mut ps, &g, &mut StepCtx { step: i + 1, lr: 0.1 / (1 << i) as f64, comm: &mut solo }).unwrap();
        out.push(ps.flat().to_vec::<f32>().unwrap());
    }
    out
}

/// LAMB decaying every tensor (unit scales).
fn lamb(c: LambConfig) -> Lamb {
    let ps = store();
    Lamb::with_scales(c, &ps, &ParamScales::ones(&ps)).unwrap()
}

const PEAK: f64 = 0.1;
const LAMBDA: f64 = 0.3;

/// One step at `lr` from the initial store: (parameters before, after).
fn one_step(opt: &mut dyn Optimizer, lr: f64) -> (Vec<f32>, Vec<f32>) {
    let mut ps = store();
    let mut g = GradStore::new(&ps);
    let mut rng = Rng::new(4);
    let gr: Vec<f32> = (0..ps.numel()).map(|_| rng.normal() as f32).collect();
    *g.flat_tensor_mut() = Tensor::from_slice(&gr, &[gr.len()]).unwrap();
    let before = ps.flat().to_vec::<f32>().unwrap();
    opt.step(&mut ps, &g, &mut StepCtx { step: 1, lr, comm: &mut dptrain_comm::LocalComm::new() }).unwrap();
    (before, ps.flat().to_vec::<f32>().unwrap())
}

#[test]
fn lamb_independent_decay_is_the_decay_free_step_minus_schedule_times_lambda_theta() {
    let ind = LambConfig { weight_decay: LAMBDA, decay_mode: DecayMode::Independent, peak_lr: PEAK, ..Default::default() };
    // Half-way down the schedule: s_t = 0.5.
    let lr = PEAK / 2.0;
    let (p0, with) = one_step(&mut lamb(ind), lr);
    let (_, free) = one_step(&mut lamb(LambConfig { weight_decay: 0.0, ..ind }), lr);
    for ((a, b), p) in with.iter().zip(&free).zip(&p0) {
        let want = b - (0.5 * LAMBDA) as f32 * p;
        assert!((a - want).abs() <= 1e-6, "{a} vs {want}");
    }
    // Coupled decay is part of the trust-scaled direction: another step.
    let (_, coupled) = one_step(&mut lamb(LambConfig { decay_mode: DecayMode::Coupled, ..ind }), lr);
    assert!(coupled.iter().zip(&with).any(|(a, b)| (a - b).abs() > 1e-4));
    // Over a few steps the decayed run stays smaller than the free one.
    let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>();
    let (a, b) = (trajectory(&mut lamb(ind)), trajectory(&mut lamb(LambConfig { weight_decay: 0.0, ..ind })));
    assert!(n(&a[3]) < n(&b[3]));
}

#[test]
fn soap_independent_decay_scales_by_the_schedule_not_the_learning_rate() {
    // SOAP's coupled decay is p·(1 − lr·λ) after the update; the independent one p·(1 − s_t·λ):
    // the same as coupled with λ / peak. Both runs share every step's update.
    let base = SoapConfig { precondition_frequency: 1, weight_decay: LAMBDA, peak_lr: PEAK, ..Default::default() };
    let ind = trajectory(&mut Soap::new(SoapConfig { decay_mode: DecayMode::Independent, ..base }, &store()));
    let coupled = trajectory(&mut Soap::new(SoapConfig { weight_decay: LAMBDA / PEAK, ..base }, &store()));
    for t in 0..4 {
        for (a, b) in ind[t].iter().zip(&coupled[t]) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "step {t}: {a} vs {b}");
        }
    }
    // And it does decay: against λ = 0 the parameters shrink.
    let free = trajectory(&mut Soap::new(SoapConfig { weight_decay: 0.0, ..base }, &store()));
    let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>();
    assert!(n(&ind[3]) < n(&free[3]));
}
