//! LAMB and LARS against PyPI pytorch-optimizer (`Lamb(weight_decouple=False,
//! adam_debias=True)`, `LARS`), 20 steps per case on several tensors at once (the trust ratio is
//! per tensor; LARS leaves 1-D tensors unadapted), every tensor compared after every step
//! (|Δp| ≤ 1e-5, relative beyond 1: the Nesterov case's biases take plain SGD steps at lr 5 and
//! grow to ~100). Fixtures from `tools/reference/make_trust_fixtures.py`.

use dptrain_core::{DType, GradStore, Init, ParamBuilder, Role};
use dptrain_optim::*;
use serde_json::Value;

fn vals(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

#[test]
fn lamb_and_lars_match_pytorch_optimizer_step_by_step() {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/trust.json");
    let f: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let mut checked = 0;
    for case in f["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let hp = &case["hp"];
        let h = |k: &str| hp[k].as_f64().unwrap();
        let shapes = case["shapes"].as_object().unwrap();
        let mut b = ParamBuilder::new();
        for (n, s) in shapes {
            let s: Vec<usize> = s.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            b.add(n, &s, Role::Hidden, 1, 1, Init::Const(0.0));
        }
        let mut ps = b.build(0, DType::F32).unwrap();
        let infos = ps.infos().to_vec();
        for i in &infos {
            ps.flat_mut::<f32>().unwrap()[i.offset..i.offset + i.numel].copy_from_slice(&vals(&case["p0"][&i.name]));
        }
        // Every tensor decayed, as the reference (LARS itself skips 1-D tensors).
        let scales = ParamScales::ones(&ps);
        let mut opt: Box<dyn Optimizer> = match case["kind"].as_str().unwrap() {
            "lamb" => {
                let betas = vals(&hp["betas"]);
                let c = LambConfig {
                    beta1: betas[0] as f64,
                    beta2: betas[1] as f64,
                    eps: h("eps"),
                    weight_decay: h("weight_decay"),
                    correct_bias: hp["correct_bias"].as_bool().unwrap(),
                    clamp: 10.0,
                    ..Default::default()
                };
                Box::new(Lamb::with_scales(c, &ps, &scales).unwrap())
            }
            _ => {
                let c = LarsConfig {
                    momentum: h("momentum"),
                    dampening: 0.0,
                    nesterov: hp["nesterov"].as_bool().unwrap(),
                    weight_decay: h("weight_decay"),
                    trust_coefficient: h("trust_coefficient"),
                };
                Box::new(Lars::with_scales(c, &ps, &scales).unwrap())
            }
        };
        let mut g = GradStore::new(&ps);
        let mut solo = dptrain_comm::LocalComm::new();
        let mut moved = 0.0f32;
        for (t, (gr, want)) in case["grads"].as_array().unwrap().iter().zip(case["after"].as_array().unwrap()).enumerate() {
            for i in &infos {
                g.flat_mut::<f32>().unwrap()[i.offset..i.offset + i.numel].copy_from_slice(&vals(&gr[&i.name]));
            }
            opt.step(&mut ps, &g, &mut StepCtx { step: t as u64 + 1, lr: h("lr"), comm: &mut solo }).unwrap();
            for i in &infos {
                let got = &ps.flat().data::<f32>().unwrap()[i.offset..i.offset + i.numel];
                let want = vals(&want[&i.name]);
                let p0 = vals(&case["p0"][&i.name]);
                for (k, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{name}: step {t}, {}[{k}]: {a} vs reference {b}", i.name);
                    moved = moved.max((b - p0[k]).abs());
                }
            }
        }
        // The comparison means something only if the reference moved well beyond the tolerance.
        assert!(moved > 1e-3, "{name}: the reference moved at most {moved}");
        checked += 1;
    }
    assert_eq!(checked, 6);
}
