//! The throughput cost of the probes: the same training run with every probe family on at
//! `probes.interval = 10` (the default) and with every family off, alternated in one
//! invocation, through the real trainer (`dptrain train` in-process, so the probes' actual
//! code path — activation statistics, per-tensor reductions, the critical batch's unoverlapped
//! all-reduce — is what is timed). Time per step is read from the runs' own metrics records
//! between step 10 and the last step, so start-up, the final evaluation and the checkpoint are
//! outside the window, and each window holds the same number of probe steps.
//!
//! `cargo bench -p dptrain-benches --bench probes` — CPU; `DPTRAIN_BENCH_DEVICE=cuda` runs on
//! the GPU. `DPTRAIN_BENCH_STEPS` sets the steps per run (default 200).

use dptrain_launcher::train::{train, TrainArgs};
use serde_json::Value;
use std::path::Path;

const FAMILIES: &[&str] = &["attention", "logits", "residual", "massive", "sparsity", "grads", "optimizer", "distance", "critical_batch"];

/// Seconds per step between the step-10 record and the last one.
fn step_seconds(run: &Path) -> f64 {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics");
    let recs: Vec<(u64, f64)> = text
        .lines()
        .filter_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            Some((v["step"].as_u64()?, v.get("elapsed_s")?.as_f64()?))
        })
        .collect();
    let first = recs.iter().find(|r| r.0 == 10).expect("a record at step 10");
    let last = recs.last().expect("records");
    (last.1 - first.1) / (last.0 - first.0) as f64
}

fn run(dir: &Path, base: &[String], on: bool) -> f64 {
    let _ = std::fs::remove_dir_all(dir);
    let mut sets = base.to_vec();
    if !on {
        sets.extend(FAMILIES.iter().map(|f| format!("probes.{f}=false")));
    }
    let args = TrainArgs { sets, run_dir: Some(dir.to_path_buf()), ..Default::default() };
    train(&args).expect("training run");
    let s = step_seconds(dir);
    let _ = std::fs::remove_dir_all(dir);
    s
}

fn main() {
    let steps = dptrain_core::env::env().bench_steps.unwrap_or(200);
    let device = dptrain_core::env::env().bench_device.clone();
    let tmp = std::env::temp_dir().join(format!("dptrain-bench-probes-{}", std::process::id()));
    let common = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec![
            format!("train.steps={steps}"),
            "train.eval_every=0".into(),
            "train.checkpoint_every=0".into(),
            "run.log_every=10".into(),
            format!("run.device=\"{device}\""),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let configs: Vec<(&str, Vec<String>)> = vec![
        ("default GPT (d 64, 2 layers, context 64, batch 32)", common(&[])),
        (
            "GPT-mini (d 128, 4 layers, context 128, batch 16)",
            common(&["model.d_model=128", "model.n_layers=4", "model.context=128", "train.global_batch=16", "data.vocab=256"]),
        ),
        ("default GPT, 4-step accumulation (critical batch from micro-batches)", common(&["train.micro_batch=8"])),
    ];
    let mut rows = vec![];
    for (name, base) in &configs {
        // Alternate off/on three times; keep each side's fastest (least disturbed) run.
        let (mut off, mut on) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..3 {
            off = off.min(run(&tmp.join("off"), base, false));
            on = on.min(run(&tmp.join("on"), base, true));
        }
        rows.push((name.to_string(), off, on));
    }
    let _ = std::fs::remove_dir_all(&tmp);
    println!("\nProbe cost: every family at probes.interval = 10 vs all off, {device}, {steps} steps per run, best of 3 (ms/step)");
    println!("| run | probes off | probes on | cost |");
    println!("|---|---|---|---|");
    for (name, off, on) in rows {
        println!("| {name} | {:.2} | {:.2} | {:+.1}% |", off * 1e3, on * 1e3, 100.0 * (on / off - 1.0));
    }
}
