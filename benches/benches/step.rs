//! Training-step benchmark: GPT-mini (vocab 256, context 128, d_model 128, 4 layers, 4 heads,
//! batch 16) and MLP 784-1024-1024-10 (batch 256), AdamW, f32, 1 thread — dptrain and PyTorch
//! eager (`benches/torch_step.py`) in one invocation. Prints median step time, the
//! forward/backward/optimizer split and the ratio dptrain / PyTorch.
//!
//! `cargo bench -p dptrain-benches --bench step` — PyTorch side runs when
//! `DPTRAIN_TORCH_PYTHON` names a python with torch, or with `DPTRAIN_INSTALL_TORCH=1` (installs
//! into /tmp). `DPTRAIN_BENCH_STEPS` sets the timed steps (default 10).

use dptrain_benches::{median, torch_python};
use dptrain_core::model::{Batch, Model};
use dptrain_core::probe::Probes;
use dptrain_core::rng::Rng;
use dptrain_core::{DType, GradStore, ParamBuilder, Tape};
use dptrain_models::{Gpt, GptConfig, Mlp, MlpConfig};
use dptrain_optim::{AdamW, AdamWConfig, Optimizer, StepCtx};
use std::time::Instant;

struct Row {
    model: String,
    step: f64,
    fwd: f64,
    bwd: f64,
    opt: f64,
}

fn bench(name: &str, model: &dyn Model, mut pb_store: dptrain_core::ParamStore, batch: &Batch, steps: usize) -> Row {
    let mut opt = AdamW::new(AdamWConfig { weight_decay: 0.01, ..Default::default() }, &pb_store);
    let mut grads = GradStore::new(&pb_store);
    let mut solo = dptrain_comm::LocalComm::new();
    let (mut f, mut b, mut o, mut tot) = (vec![], vec![], vec![], vec![]);
    let mut last = 0.0;
    for i in 0..steps + 2 {
        let t0 = Instant::now();
        let tape = Tape::new();
        let loss = model.loss(&tape, &pb_store, batch, true, &mut Probes::default()).expect("forward");
        let t1 = Instant::now();
        grads.zero_grad();
        tape.backward(loss, &mut grads, |_, _| {}).expect("backward");
        last = loss.item().unwrap();
        drop(tape);
        let t2 = Instant::now();
        opt.step(&mut pb_store, &grads, &mut StepCtx { step: i as u64 + 1, lr: 1e-3, comm: &mut solo }).expect("step");
        let t3 = Instant::now();
        if i >= 2 {
            f.push((t1 - t0).as_secs_f64() * 1e3);
            b.push((t2 - t1).as_secs_f64() * 1e3);
            o.push((t3 - t2).as_secs_f64() * 1e3);
            tot.push((t3 - t0).as_secs_f64() * 1e3);
        }
    }
    eprintln!("{name}: final loss {last:.4}");
    Row { model: name.into(), step: median(&tot), fwd: median(&f), bwd: median(&b), opt: median(&o) }
}

fn main() {
    let steps: usize = dptrain_core::env::env().bench_steps.unwrap_or(10);
    rayon::ThreadPoolBuilder::new().num_threads(1).build_global().expect("rayon pool");
    let mut rng = Rng::new(0);
    let mut rows = vec![];

    let mut pb = ParamBuilder::new();
    let gpt = Gpt::new(GptConfig::default(), &mut pb).unwrap();
    let ps = pb.build(0, DType::F32).unwrap();
    let ids: Vec<u32> = (0..16 * 128).map(|_| rng.below(256) as u32).collect();
    let tg: Vec<u32> = (0..16 * 128).map(|_| rng.below(256) as u32).collect();
    rows.push(bench("gpt-mini", &gpt, ps, &Batch::Tokens { inputs: ids, targets: tg, batch: 16, context: 128 }, steps));

    let mut pb = ParamBuilder::new();
    let mlp = Mlp::new(MlpConfig::default(), &mut pb).unwrap();
    let ps = pb.build(0, DType::F32).unwrap();
    let px: Vec<f32> = (0..256 * 784).map(|_| rng.normal() as f32).collect();
    let lb: Vec<u32> = (0..256).map(|_| rng.below(10) as u32).collect();
    rows.push(bench("mlp", &mlp, ps, &Batch::Images { pixels: px, labels: lb, batch: 256, shape: [1, 28, 28] }, steps));

    let mut torch: Vec<serde_json::Value> = vec![];
    if let Some(py) = torch_python() {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/torch_step.py");
        match std::process::Command::new(&py).arg(script).arg(steps.to_string()).env("OMP_NUM_THREADS", "1").output() {
            Ok(out) if out.status.success() => {
                torch = String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
            }
            Ok(out) => eprintln!("torch side failed: {}", String::from_utf8_lossy(&out.stderr)),
            Err(e) => eprintln!("cannot run {}: {e}", py.display()),
        }
    } else {
        eprintln!("no PyTorch (set DPTRAIN_TORCH_PYTHON or DPTRAIN_INSTALL_TORCH=1): dptrain columns only");
    }

    println!("\nstep benchmark, f32, 1 thread, AdamW, median of {steps} steps (ms)");
    println!("| model | dptrain step | fwd | bwd | opt | PyTorch step | fwd | bwd | opt | ratio |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let t = torch.iter().find(|t| t["model"] == r.model.as_str());
        let g = |k: &str| t.and_then(|t| t[k].as_f64());
        let fmt = |x: Option<f64>| x.map(|v| format!("{v:.1}")).unwrap_or_else(|| "–".into());
        let ratio = g("step_ms").map(|ts| format!("{:.2}×", r.step / ts)).unwrap_or_else(|| "–".into());
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} | {} |",
            r.model,
            r.step,
            r.fwd,
            r.bwd,
            r.opt,
            fmt(g("step_ms")),
            fmt(g("fwd_ms")),
            fmt(g("bwd_ms")),
            fmt(g("opt_ms")),
            ratio
        );
    }
}
