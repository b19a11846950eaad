//! Fused ops' forward values (and the cross-entropy gradient) against PyTorch fixtures made by
//! `tools/reference/make_fixtures.py` (committed under `tests/fixtures/`; CI never runs torch).

use dptrain_core::ops::fused::batch_norm::RunningStats;
use dptrain_core::{DType, Tape, Tensor};
use serde_json::Value;
use std::sync::Mutex;

fn fixtures() -> Value {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/fused_ops.json");
    serde_json::from_str(&std::fs::read_to_string(p).expect("fixture file")).expect("json")
}

fn tensor(v: &Value) -> Tensor {
    let shape: Vec<usize> = v["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    let data: Vec<f32> = v["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    Tensor::from_vec(data, &shape).unwrap()
}

fn assert_close(name: &str, got: &Tensor, want: &Value, tol: f64) {
    let want = tensor(want);
    assert_eq!(got.shape(), want.shape(), "{name}: shape");
    let (g, w) = (got.to_vec::<f64>().unwrap(), want.to_vec::<f64>().unwrap());
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{name}[{i}]: {a} vs torch {b}");
    }
}

#[test]
fn layer_norm_matches_torch() {
    let f = &fixtures()["layer_norm"];
    let tape = Tape::new();
    let y = tape
        .constant(tensor(&f["x"]))
        .layer_norm(Some(tape.constant(tensor(&f["w"]))), Some(tape.constant(tensor(&f["b"]))), 1e-5)
        .unwrap();
    assert_close("layer_norm", &y.value(), &f["y"], 2e-6);
}

#[test]
fn gelu_matches_torch() {
    let f = &fixtures()["gelu"];
    let tape = Tape::new();
    let x = tape.constant(tensor(&f["x"]));
    assert_close("gelu erf", &x.gelu(false).unwrap().value(), &f["erf"], 1e-6);
    assert_close("gelu tanh", &x.gelu(true).unwrap().value(), &f["tanh"], 1e-6);
}

#[test]
fn attention_matches_torch_sdpa() {
    let f = &fixtures()["attention"];
    let tape = Tape::new();
    let out = tape.constant(tensor(&f["qkv"])).causal_attention(f["heads"].as_u64().unwrap() as usize).unwrap();
    assert_close("attention", &out.y.value(), &f["y"], 2e-6);
    let want = f["max_logit"].as_f64().unwrap();
    // The max logit is a probe value (on a GPU it stays on the device until read).
    let max_logit = out.max_logit.to_host().unwrap();
    assert!((max_logit - want).abs() < 1e-5 * (1.0 + want.abs()), "max logit {max_logit} vs {want}");
}

#[test]
fn cross_entropy_with_z_loss_matches_torch() {
    let f = &fixtures()["cross_entropy"];
    let tape = Tape::new();
    let logits = tape.leaf(tensor(&f["logits"]));
    let targets: Vec<u32> = f["targets"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let ce = logits.cross_entropy(&targets, f["z_coef"].as_f64().unwrap()).unwrap();
    let want = f["loss"].as_f64().unwrap();
    assert!((ce.loss.item().unwrap() - want).abs() < 1e-5 * (1.0 + want.abs()), "loss {} vs {want}", ce.loss.item().unwrap());
    assert!((ce.log_z_mean.to_host().unwrap() - f["log_z_mean"].as_f64().unwrap()).abs() < 1e-5);
    let ps = dptrain_core::ParamBuilder::new().build(0, DType::F32).unwrap();
    let g = tape.backward(ce.loss, &mut dptrain_core::GradStore::new(&ps), |_, _| {}).unwrap();
    assert_close("cross_entropy grad", g.get(logits).unwrap(), &f["grad"], 1e-6);
}

#[test]
fn batch_norm_train_and_eval_match_torch() {
    let f = &fixtures()["batch_norm"];
    let (mean, var) = (Mutex::new(Tensor::zeros(&[4], DType::F32)), Mutex::new(Tensor::ones(&[4], DType::F32)));
    let tape = Tape::new();
    let (w, b) = (tape.constant(tensor(&f["w"])), tape.constant(tensor(&f["b"])));
    let y = tape.constant(tensor(&f["x"])).batch_norm(w, b, RunningStats { mean: &mean, var: &var, momentum: 0.1 }, true, 1e-5).unwrap();
    assert_close("bn train", &y.value(), &f["y_train"], 2e-6);
    assert_close("bn running_mean", &mean.lock().unwrap(), &f["running_mean"], 1e-6);
    assert_close("bn running_var", &var.lock().unwrap(), &f["running_var"], 1e-6);
    let y =
        tape.constant(tensor(&f["x_eval"])).batch_norm(w, b, RunningStats { mean: &mean, var: &var, momentum: 0.1 }, false, 1e-5).unwrap();
    assert_close("bn eval", &y.value(), &f["y_eval"], 2e-6);
}

#[path = "common/ghost_bn.rs"]
mod ghost_bn;

#[test]
fn ghost_batch_norm_matches_torch_over_several_steps() {
    assert_eq!(ghost_bn::check(dptrain_core::Device::Cpu), 3);
}
