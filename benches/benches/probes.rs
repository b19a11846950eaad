//! The throughput cost of the probes through the real trainer (`dptrain train` in-process, so
//! the probes' actual code path — activation statistics, per-tensor reductions, the critical
//! batch's unoverlapped all-reduce or micro-batch copies — is what is timed). Each run logs
//! every step; the time of a step is the difference of consecutive records' `elapsed_s`, and
//! a run's step time is the median of those (this 2-vCPU machine has bursts of ±20 % that a
//! mean over a run does not survive). Two runs per model: every family on at
//! `probes.interval = 1` (every step a probe step) and every family off; the cost at the
//! default interval of 10 is (probe step − plain step) / (10 × plain step).
//!
//! `cargo bench -p dptrain-benches --bench probes` — CPU; `DPTRAIN_BENCH_DEVICE=cuda` runs on
//! the GPU. `DPTRAIN_BENCH_STEPS` sets the steps per run (default 100).

use dptrain_launcher::train::{train, TrainArgs};
use serde_json::Value;
use std::path::Path;

const FAMILIES: &[&str] = &["attention", "logits", "residual", "massive", "sparsity", "grads", "optimizer", "distance", "critical_batch"];

/// The median of the per-step times after the first 5 steps.
fn step_seconds(run: &Path) -> f64 {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics");
    let t: Vec<f64> = text
        .lines()
        .filter_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            v.get("loss")?;
            v.get("elapsed_s")?.as_f64()
        })
        .collect();
    let mut d: Vec<f64> = t.windows(2).skip(5).map(|w| w[1] - w[0]).collect();
    d.sort_by(f64::total_cmp);
    d[d.len() / 2]
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
    let steps = dptrain_core::env::env().bench_steps.unwrap_or(100);
    let device = dptrain_core::env::env().bench_device.clone();
    let tmp = std::env::temp_dir().join(format!("dptrain-bench-probes-{}", std::process::id()));
    let common = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec![
            format!("train.steps={steps}"),
            "train.eval_every=0".into(),
            "train.checkpoint_every=0".into(),
            "run.log_every=1".into(),
            "probes.interval=1".into(),
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
        let off = run(&tmp.join("off"), base, false);
        let on = run(&tmp.join("on"), base, true);
        rows.push((name.to_string(), off, on));
    }
    let _ = std::fs::remove_dir_all(&tmp);
    println!("\nProbe cost, {device}, {steps} steps per run, median step (ms): a step with every probe family vs none");
    println!("| run | plain step | probe step | cost at probes.interval = 10 |");
    println!("|---|---|---|---|");
    for (name, off, on) in rows {
        println!("| {name} | {:.2} | {:.2} | {:+.1}% |", off * 1e3, on * 1e3, 100.0 * (on - off) / (10.0 * off));
    }
}
