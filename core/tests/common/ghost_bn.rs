//! Ghost Batch Normalization against PyTorch (`tests/fixtures/ghost_bn.json`, made by
//! `tools/reference/make_ghost_bn_fixtures.py`: one BatchNorm module over each ghost batch in
//! turn): output, input/weight/bias gradients and running statistics after every training step,
//! then the eval output — on the given device (the CPU engine, or the CUDA kernels).

use dptrain_core::ops::fused::batch_norm::RunningStats;
use dptrain_core::{Device, Tape, Tensor};
use serde_json::Value;
use std::sync::Mutex;

fn vals(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn close(what: &str, got: &Tensor, want: &Value, tol: f32) {
    let (g, w) = (got.to_vec::<f32>().unwrap(), vals(want));
    assert_eq!(g.len(), w.len(), "{what}: length");
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{what}[{i}]: {a} vs torch {b}");
    }
}

/// Runs every case on `dev`; returns how many were checked.
pub fn check(dev: Device) -> usize {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/ghost_bn.json");
    let f: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let up = |v: &[f32], s: &[usize]| Tensor::from_vec(v.to_vec(), s).unwrap().to_device(dev).unwrap();
    let mut n = 0;
    for case in f["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let shape: Vec<usize> = case["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        let c = shape[1];
        let ghost = case["ghost"].as_u64().unwrap() as usize;
        let (w0, b0) = (up(&vals(&case["weight"]), &[c]), up(&vals(&case["bias"]), &[c]));
        let mean = Mutex::new(up(&vec![0.0; c], &[c]));
        let var = Mutex::new(up(&vec![1.0; c], &[c]));
        for (t, st) in case["steps"].as_array().unwrap().iter().enumerate() {
            let tape = Tape::new();
            let x = tape.leaf(up(&vals(&st["x"]), &shape));
            let (w, b) = (tape.leaf(w0.clone()), tape.leaf(b0.clone()));
            let y = x.ghost_batch_norm(w, b, RunningStats { mean: &mean, var: &var, momentum: 0.1 }, true, 1e-5, ghost).unwrap();
            close(&format!("{name}: step {t}: y"), &y.value(), &st["y"], 1e-5);
            let dy = tape.constant(up(&vals(&st["dy"]), &shape));
            let loss = y.mul(dy).unwrap().sum_all().unwrap();
            let store = dptrain_core::ParamBuilder::new().build(0, dptrain_core::DType::F32).unwrap();
            let mut gs = dptrain_core::GradStore::new(&store);
            let grads = tape.backward(loss, &mut gs, |_, _| {}).unwrap();
            close(&format!("{name}: step {t}: dx"), grads.get(x).unwrap(), &st["dx"], 1e-4);
            close(&format!("{name}: step {t}: dw"), grads.get(w).unwrap(), &st["dw"], 1e-4);
            close(&format!("{name}: step {t}: db"), grads.get(b).unwrap(), &st["db"], 1e-5);
            close(&format!("{name}: step {t}: running_mean"), &mean.lock().unwrap(), &st["running_mean"], 1e-6);
            close(&format!("{name}: step {t}: running_var"), &var.lock().unwrap(), &st["running_var"], 1e-6);
        }
        let tape = Tape::new();
        let (w, b) = (tape.leaf(w0.clone()), tape.leaf(b0.clone()));
        let xe = tape.constant(up(&vals(&case["x_eval"]), &shape));
        let ye = xe.ghost_batch_norm(w, b, RunningStats { mean: &mean, var: &var, momentum: 0.1 }, false, 1e-5, ghost).unwrap();
        close(&format!("{name}: eval y"), &ye.value(), &case["y_eval"], 1e-5);
        n += 1;
    }
    n
}
