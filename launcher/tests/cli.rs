//! `dptrain train` end to end, as a user runs it: real processes, real files, exit codes.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dptrain"));
    c.env("DPTRAIN_LOG", "error");
    c
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dptrain-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A small, fast GPT run on the synthetic source.
const SMALL_GPT: &[&str] = &["model.d_model=32", "model.n_layers=1", "model.context=16"];
const SMALL: &[&str] =
    &["data.vocab=16", "data.train_tokens=20000", "data.val_tokens=4000", "train.global_batch=8", "run.log_every=1", "run.threads=1"];

fn train(run_dir: &Path, sets: &[&str], extra: &[&str]) -> Output {
    let mut c = bin();
    c.arg("train").arg("--run-dir").arg(run_dir);
    let gpt = !sets.iter().any(|s| s.starts_with("model.kind="));
    for s in SMALL.iter().chain(if gpt { SMALL_GPT } else { &[] }).chain(sets) {
        c.arg("--set").arg(s);
    }
    c.args(extra);
    c.output().unwrap()
}

fn ok(o: &Output) {
    assert!(o.status.success(), "dptrain failed: {}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
}

fn records(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Metric records without the wall-clock fields.
fn values(recs: &[Value], from_step: u64) -> Vec<Value> {
    recs.iter()
        .filter(|r| r["step"].as_u64().unwrap() > from_step)
        .map(|r| {
            let mut r = r.clone();
            let o = r.as_object_mut().unwrap();
            o.remove("elapsed_s");
            o.remove("samples_per_s");
            r
        })
        .collect()
}

#[test]
fn a_run_writes_its_directory_and_learns() {
    let d = tmp("learn");
    let run = d.join("r");
    let o = train(&run, &["train.steps=60", "train.eval_every=30", "train.checkpoint_every=20", "checkpoint.keep_last=2"], &[]);
    ok(&o);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("entropy floor"), "{stdout}");
    for f in ["config.toml", "metrics.jsonl", "summary.json"] {
        assert!(run.join(f).is_file(), "missing {f}");
    }
    let ck: Vec<String> =
        std::fs::read_dir(run.join("checkpoints")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    let mut ck = ck;
    ck.sort();
    assert_eq!(ck, ["step_0000040", "step_0000060"], "keep_last = 2");
    for f in ["model.safetensors", "optimizer.safetensors", "state.json", "config.toml"] {
        assert!(run.join("checkpoints/step_0000060").join(f).is_file());
    }
    let recs = records(&run);
    let train: Vec<&Value> = recs.iter().filter(|r| r.get("loss").is_some()).collect();
    assert_eq!(train.len(), 60);
    for key in ["step", "loss", "lr", "grad_norm", "samples_per_s", "elapsed_s"] {
        assert!(train[0].get(key).is_some(), "record lacks {key}: {}", train[0]);
    }
    // Probes on probe steps (every probes.interval = 10 steps) only.
    assert!(train[0].get("attn_logit_max/0").is_none(), "{}", train[0]);
    for key in ["attn_logit_max/0", "log_z", "resid_rms/0", "grad_rms/lm_head.weight", "dist_init"] {
        assert!(train[9].get(key).is_some(), "step 10's record lacks {key}: {}", train[9]);
    }
    let first = train[..5].iter().map(|r| r["loss"].as_f64().unwrap()).sum::<f64>() / 5.0;
    let last = train[55..].iter().map(|r| r["loss"].as_f64().unwrap()).sum::<f64>() / 5.0;
    assert!(last < first - 0.5, "loss did not fall: {first} -> {last}");
    let evals: Vec<&Value> = recs.iter().filter(|r| r.get("val_loss").is_some()).collect();
    assert_eq!(evals.iter().map(|r| r["step"].as_u64().unwrap()).collect::<Vec<_>>(), [30, 60]);
    let s: Value = serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert!(s["entropy_floor"].as_f64().unwrap() > 0.0 && s["gap_to_floor"].as_f64().is_some());
    // The resolved config records derived values and is itself a valid config for a new run.
    let cfg = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(cfg.contains("accum_steps = 1") && cfg.contains("vocab_size = 16"), "{cfg}");
    // A second run with the same name does not overwrite the first.
    std::fs::remove_dir_all(&d).ok();
}

/// `train.precision = "bf16"` trains (GEMM inputs rounded to bf16) and stays close to f32.
#[test]
fn bf16_precision_trains_close_to_f32() {
    let d = tmp("bf16");
    let sets = ["train.steps=30", "run.log_every=1", "train.eval_every=0"];
    ok(&train(&d.join("f32"), &sets, &[]));
    let mut s2 = sets.to_vec();
    s2.push("train.precision=\"bf16\"");
    ok(&train(&d.join("bf16"), &s2, &[]));
    let loss = |r: &[Value]| r.iter().filter_map(|v| v["loss"].as_f64()).collect::<Vec<f64>>();
    let (a, b) = (loss(&records(&d.join("f32"))), loss(&records(&d.join("bf16"))));
    assert_eq!(a.len(), 30);
    assert!(a != b, "bf16 should change the numbers");
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 2e-2 * x, "{x} vs {y}");
    }
    assert!(b[29] < b[0] - 0.5, "bf16 run did not learn: {} -> {}", b[0], b[29]);
    assert!(std::fs::read_to_string(d.join("bf16/config.toml")).unwrap().contains("precision = \"bf16\""));
}

/// The GPU path of the trainer — parameters, gradients and optimizer state on the device, every
/// op dispatched to the CUDA kernels, AdamW/SGD kernels, clipping, batch-norm buffers,
/// checkpoints written from the device and resumed onto it — run on the CPU emulator of the
/// kernels (test builds with `cuda-emu`), against the CPU engine. The emulator runs each
/// launch's blocks and threads in an order of its own (`DPTRAIN_CUDA_EMULATOR_SCHEDULE`), other
/// for each run: a GPU run is the same bits whatever the order (no float atomics), so a run
/// repeated, or resumed, under another order gives the same parameters.
#[cfg(feature = "cuda-emu")]
#[test]
fn the_gpu_path_of_the_trainer_matches_the_cpu_on_the_emulator() {
    let d = tmp("emu");
    let schedules = std::cell::Cell::new(0u64);
    let emu = |dir: &Path, sets: &[&str], extra: &[&str]| {
        let mut c = bin();
        schedules.set(schedules.get() + 1);
        c.env("DPTRAIN_CUDA_EMULATOR", "1").env("DPTRAIN_CUDA_EMULATOR_SCHEDULE", schedules.get().to_string());
        c.arg("train").arg("--run-dir").arg(dir);
        let gpt = !sets.iter().any(|s| s.starts_with("model.kind="));
        for s in SMALL.iter().chain(if gpt { SMALL_GPT } else { &[] }).chain(sets).chain(&["run.device=\"cuda\""]) {
            c.arg("--set").arg(s);
        }
        c.args(extra);
        c.output().unwrap()
    };
    let loss = |dir: &Path| records(dir).iter().filter_map(|v| v["loss"].as_f64()).collect::<Vec<f64>>();
    let close = |name: &str, a: &[f64], b: &[f64], tol: f64| {
        assert_eq!(a.len(), b.len(), "{name}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol * x.abs(), "{name}: {x} (cpu) vs {y} (emulated gpu)");
        }
    };
    for (name, sets) in [
        ("gpt-adamw", vec!["train.steps=8", "train.checkpoint_every=4", "checkpoint.keep_last=5", "train.eval_every=4"]),
        (
            "mlp-bn-sgd",
            vec![
                "model.kind=\"mlp\"",
                "data.kind=\"synthetic-images\"",
                "model.norm=\"batch\"",
                "model.widths=[16]",
                "optim.kind=\"sgd\"",
                "optim.lr=0.05",
                "train.steps=8",
                "train.checkpoint_every=4",
                "train.eval_every=4",
            ],
        ),
        ("resnet", vec!["model.kind=\"resnet\"", "data.kind=\"synthetic-images\"", "model.width=4", "train.steps=3", "train.eval_every=0"]),
        // One head of 32: attention runs as flash attention (bf16, no dropout, d_head 32).
        ("gpt-bf16", vec!["train.steps=4", "train.precision=\"bf16\"", "model.n_heads=1", "train.eval_every=0"]),
        // GPT-2's tanh GELU under bf16: in the MLP's GEMM epilogues on the GPU, the same numbers
        // on the CPU; the sparsity probe (steps 2 and 4) reads the activation the MLP made.
        (
            "gpt-bf16-tanh",
            vec!["train.steps=4", "train.precision=\"bf16\"", "model.gelu_tanh=true", "probes.interval=2", "train.eval_every=0"],
        ),
        // Every probe family on probe steps: the activation statistics are device reductions.
        ("gpt-probes", vec!["train.steps=4", "probes.interval=2", "model.qk_norm=true", "train.eval_every=0"]),
        // The CUDA kernels draw the same dropout masks as the CPU, and random windows are the
        // same on both devices.
        ("gpt-dropout", vec!["train.steps=6", "model.dropout=0.2", "data.windows=\"random\"", "train.eval_every=3"]),
        (
            "mlp-dropout",
            vec![
                "model.kind=\"mlp\"",
                "data.kind=\"synthetic-images\"",
                "model.widths=[16, 16]",
                "model.dropout=0.3",
                "train.steps=6",
                "train.eval_every=3",
            ],
        ),
    ] {
        // The emulator runs kernels on one core: validation reads 16 samples, not the default.
        let sets: Vec<&str> = sets.into_iter().chain(["train.eval_samples=16"]).collect();
        let (c, g) = (d.join(format!("{name}-cpu")), d.join(format!("{name}-gpu")));
        ok(&train(&c, &sets, &[]));
        let o = emu(&g, &sets, &[]);
        ok(&o);
        assert!(std::fs::read_to_string(g.join("config.toml")).unwrap().contains("device = \"cuda\""));
        close(name, &loss(&c), &loss(&g), 1e-4);
        let vals = |dir: &Path| records(dir).iter().filter_map(|v| v["val_loss"].as_f64()).collect::<Vec<f64>>();
        close(&format!("{name} validation"), &vals(&c), &vals(&g), 1e-4);
        if ["gpt-bf16", "gpt-bf16-tanh", "resnet"].contains(&name) {
            // Again, in another order: the same parameters, bit for bit.
            let again = d.join(format!("{name}-gpu-again"));
            ok(&emu(&again, &sets, &[]));
            let last = |dir: &Path| {
                let mut cks: Vec<_> = std::fs::read_dir(dir.join("checkpoints")).unwrap().flatten().map(|e| e.path()).collect();
                cks.sort();
                std::fs::read(cks.last().unwrap().join("model.safetensors")).unwrap()
            };
            assert!(last(&g) == last(&again), "{name}: the GPU run's parameters changed with the order its kernels ran in");
        }
        if name == "gpt-probes" {
            // The activation probes: the same numbers from the device reductions as from the
            // host's (up to the activations' own GEMM rounding), the same top-1 positions.
            let acts = |dir: &Path| -> Vec<(String, f64)> {
                let families = ["massive_", "mlp_sparsity/", "q_norm_max/", "k_norm_max/"];
                let mut out = vec![];
                for r in records(dir) {
                    for (k, v) in r.as_object().unwrap() {
                        if families.iter().any(|f| k.starts_with(f)) {
                            out.push((format!("step {} {k}", r["step"]), v.as_f64().unwrap()));
                        }
                    }
                }
                out
            };
            let (ca, ga) = (acts(&c), acts(&g));
            assert!(ca.len() >= 2 * 12, "{ca:?}");
            assert_eq!(ca.iter().map(|x| &x.0).collect::<Vec<_>>(), ga.iter().map(|x| &x.0).collect::<Vec<_>>());
            for ((k, x), (_, y)) in ca.iter().zip(&ga) {
                let tol = if k.contains('@') { 0.0 } else { 1e-3 * x.abs().max(1e-3) };
                assert!((x - y).abs() <= tol, "{k}: {x} (cpu) vs {y} (emulated gpu)");
            }
        }
    }
    // Resume on the (emulated) GPU from a checkpoint the GPU run wrote: the same metrics as the
    // uninterrupted GPU run from there on.
    let g = d.join("gpt-adamw-gpu");
    let r = d.join("gpt-resumed");
    let mut c = bin();
    c.env("DPTRAIN_CUDA_EMULATOR", "1").env("DPTRAIN_CUDA_EMULATOR_SCHEDULE", "99");
    c.arg("train").arg("--resume").arg(g.join("checkpoints/step_0000004")).arg("--run-dir").arg(&r);
    ok(&c.output().unwrap());
    assert_eq!(values(&records(&g), 4), values(&records(&r), 4));
    let ck = |dir: &Path| std::fs::read(dir.join("checkpoints/step_0000008/model.safetensors")).unwrap();
    assert!(ck(&g) == ck(&r), "the resumed GPU run's parameters differ from the uninterrupted run's");
    std::fs::remove_dir_all(&d).ok();
}

/// `dptrain train` of the small GPT in bf16 with one head of 32 (flash attention) on the
/// emulated GPU, with `sets` on top, environment `env` and extra arguments `extra`.
#[cfg(all(feature = "cuda-emu", feature = "fault-injection"))]
fn emulated_bf16_gpt(dir: &Path, sets: &[&str], env: &[(&str, &str)], extra: &[&str]) -> Output {
    let mut c = bin();
    c.env("DPTRAIN_CUDA_EMULATOR", "1").envs(env.iter().copied()).arg("train").arg("--run-dir").arg(dir);
    let gpu = ["run.device=\"cuda\"", "train.precision=\"bf16\"", "model.n_heads=1"];
    for s in SMALL.iter().chain(SMALL_GPT).chain(&gpu).chain(sets) {
        c.arg("--set").arg(s);
    }
    c.args(extra);
    c.output().unwrap()
}

/// Trains the emulated bf16 GPT for 9 steps (clipping at 0.05, a NaN injected at `nan_step`,
/// logging every 4 steps) with `sets` twice — steps decided on the device, then on the waiting
/// path (`DPTRAIN_STEP_SYNC=1`) — and checks the two give the same step-9 checkpoint
/// (parameters, optimizer state and scalars), records and events byte for byte. Returns the
/// runs' directory and the device-decided run's.
#[cfg(all(feature = "cuda-emu", feature = "fault-injection"))]
fn device_steps_match_the_waiting_path(tag: &str, sets: &[&str], nan_step: u32) -> (PathBuf, PathBuf) {
    let mut all = vec!["train.steps=9", "run.log_every=4", "optim.clip=0.05"];
    all.extend_from_slice(sets);
    let (d, _) = runs_by_mode(tag, &all, nan_step, &["device", "sync"]);
    let (dev, sync) = (d.join("device"), d.join("sync"));
    assert_same_run(&dev, &sync, 9);
    let ev = |r: &Path| std::fs::read_to_string(r.join("events.jsonl")).unwrap();
    assert_eq!(ev(&dev), ev(&sync), "{tag}");
    (d, dev)
}

/// On a GPU a training step is decided on the device — AdamW's gate does the non-finite check,
/// the clipping and the step count there — and the host reads each step's record (Σg², the
/// losses) on the next logging step. On the emulator that gives, bit for bit, what the waiting
/// path (`DPTRAIN_STEP_SYNC=1`) gives: parameters, optimizer state, logged numbers; a
/// non-finite step between logging steps is skipped on the device and reported at its own step.
#[cfg(all(feature = "cuda-emu", feature = "fault-injection"))]
#[test]
fn gpu_steps_decided_on_the_device_match_the_waiting_path_on_the_emulator() {
    let (d, dev) = device_steps_match_the_waiting_path("devstep", &[], 2);
    // The clip was active (gradient norms above 0.05) and steps 4, 8, 9 were logged.
    let recs = values(&records(&dev), 0);
    let logged: Vec<u64> = recs.iter().filter(|r| r.get("loss").is_some()).map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(logged, [4, 8, 9]);
    assert!(recs.iter().filter_map(|r| r["grad_norm"].as_f64()).all(|g| g > 0.05), "{recs:?}");
    let ev = std::fs::read_to_string(dev.join("events.jsonl")).unwrap();
    assert!(ev.lines().count() == 1 && ev.contains("\"kind\":\"nonfinite\"") && ev.contains("\"step\":2"), "{ev}");
    let skipped = |r: &Path| {
        serde_json::from_str::<Value>(&std::fs::read_to_string(r.join("summary.json")).unwrap()).unwrap()["skipped_steps"].clone()
    };
    assert_eq!((skipped(&dev), skipped(&d.join("sync"))), (Value::from(1), Value::from(1)));
    std::fs::remove_dir_all(&d).ok();
}

/// SOAP decides on the device every step but its first and its basis refreshes; a run so gives,
/// bit for bit, the waiting path's parameters, moments, statistics, bases, step count and
/// logged numbers — with a NaN injected at step 3 (skipped on the device, so the refreshes
/// after it come one step later) and the run's last step, whose checkpoint reads the count
/// back from the device, decided there.
#[cfg(all(feature = "cuda-emu", feature = "fault-injection"))]
#[test]
fn soap_steps_decided_on_the_device_match_the_waiting_path_on_the_emulator() {
    let (d, dev) = device_steps_match_the_waiting_path("soap-devstep", &["optim.kind=\"soap\"", "optim.precondition_frequency=3"], 3);
    let state = serde_json::from_slice::<Value>(&std::fs::read(dev.join("checkpoints/step_0000009/state.json")).unwrap()).unwrap();
    // Steps 2–9 less the NaN step: 7 updates.
    assert_eq!(state["optimizer_scalars"]["step"], 7, "{state}");
    let ev = std::fs::read_to_string(dev.join("events.jsonl")).unwrap();
    assert!(ev.contains("\"kind\":\"nonfinite\"") && ev.contains("\"step\":3"), "{ev}");
    std::fs::remove_dir_all(&d).ok();
}

/// SOAP under `train.cuda_graph`: its device-decided steps are captured and replayed, its first
/// step and its basis refreshes (eigh/QR on the host) run eagerly between replays and write the
/// new bases over the old ones, where the graph reads them. Refresh every 3 updates, a NaN at
/// step 3 (skipped on the device, which moves the refreshes), warmup (the learning rate and
/// the decay factors change every step), clipping, `normalize_grads`, two micro-steps, logging
/// at 5, 10, 12: step 6 is captured, 7 and 9 replay it (5, 8 and 11 refresh), and the parameters,
/// moments, statistics, bases, count and logged numbers are those of the waiting path bit for
/// bit. (Bases replaced rather than overwritten at a refresh leave step 9 on the old ones; a
/// replay not counted on the host puts the refresh on the wrong step.)
#[cfg(all(feature = "cuda-emu", feature = "fault-injection"))]
#[test]
fn soap_steps_replayed_as_a_cuda_graph_match_the_waiting_path_on_the_emulator() {
    let sets = [
        "optim.kind=\"soap\"",
        "optim.precondition_frequency=3",
        "optim.normalize_grads=true",
        "optim.weight_decay=0.1",
        "optim.clip=0.05",
        "schedule.warmup_steps=20",
        "train.steps=12",
        "train.micro_batch=4",
        "run.log_every=5",
    ];
    let (d, err) = runs_by_mode("soap-graph", &sets, 3, &["sync", "graph"]);
    assert_eq!(err[1].matches("the training step runs as a CUDA graph (").count(), 1, "{}", err[1]);
    assert!(err[1].contains("dptrain: step 6: the training step runs as a CUDA graph ("), "{}", err[1]);
    let (sync, graph) = (d.join("sync"), d.join("graph"));
    assert_same_run(&graph, &sync, 12);
    let state = serde_json::from_slice::<Value>(&std::fs::read(graph.join("checkpoints/step_0000012/state.json")).unwrap()).unwrap();
    // Steps 2–12 less the NaN step: 10 updates.
    assert_eq!(state["optimizer_scalars"]["step"], 10, "{state}");
    let ev = |r: &Path| std::fs::read_to_string(r.join("events.jsonl")).unwrap();
    assert!(ev(&graph).contains("\"kind\":\"nonfinite\"") && ev(&graph).contains("\"step\":3"), "{}", ev(&graph));
    assert_eq!(ev(&graph), ev(&sync));
    std::fs::remove_dir_all(&d).ok();
}

/// Trains the emulated bf16 GPT with `sets` (skipping non-finite steps, no evaluation) and a NaN
/// injected at `nan_step` once per mode — `sync` (the waiting path, `DPTRAIN_STEP_SYNC=1`),
/// `device` (steps decided on the device), `graph` (those replayed as a CUDA graph) — each into
/// its own directory under the returned one; returns it and each run's stderr.
#[cfg(all(feature = "cuda-emu", feature = "fault-injection"))]
fn runs_by_mode(tag: &str, sets: &[&str], nan_step: u32, modes: &[&str]) -> (PathBuf, Vec<String>) {
    let d = tmp(tag);
    let errs = modes
        .iter()
        .map(|&mode| {
            let mut all = sets.to_vec();
            all.extend(["train.on_nonfinite=\"skip\"", "train.eval_every=0", "train.eval_samples=16"]);
            all.push(if mode == "graph" { "train.cuda_graph=true" } else { "train.cuda_graph=false" });
            let env: &[(&str, &str)] = if mode == "sync" { &[("DPTRAIN_STEP_SYNC", "1")] } else { &[] };
            let o = emulated_bf16_gpt(&d.join(mode), &all, env, &["--fault", &format!("nan:0:{nan_step}")]);
            ok(&o);
            String::from_utf8_lossy(&o.stderr).to_string()
        })
        .collect();
    (d, errs)
}

/// The run in `other` ended where the one in `base` did: the checkpoint of `step` (parameters,
/// optimizer state, state.json) byte for byte, and the same logged numbers.
#[cfg(all(feature = "cuda-emu", feature = "fault-injection"))]
fn assert_same_run(other: &Path, base: &Path, step: u64) {
    let ck = |r: &Path, f: &str| std::fs::read(r.join(format!("checkpoints/step_{step:07}/{f}"))).unwrap();
    assert!(ck(other, "model.safetensors") == ck(base, "model.safetensors"), "{other:?}: parameters differ");
    assert!(ck(other, "optimizer.safetensors") == ck(base, "optimizer.safetensors"), "{other:?}: optimizer state differs");
    assert_eq!(ck(other, "state.json"), ck(base, "state.json"), "{other:?}");
    assert_eq!(values(&records(other), 0), values(&records(base), 0), "{other:?}");
}

/// SGD (Nesterov momentum, weight decay, clipping, warmup) decides its step on the device as
/// AdamW does — the gate kernel's non-finite check, clipping and first-step flag — and so can
/// be replayed in a CUDA graph: with a NaN injected at step 1 (skipped there), probe steps the
/// host decides in between (3, 6, 9) and two micro-steps, the device-decided run and the one
/// replaying its steps give, bit for bit, the waiting path's parameters, momentum, state and
/// logged numbers.
#[cfg(all(feature = "cuda-emu", feature = "fault-injection"))]
#[test]
fn sgd_steps_decided_on_the_device_and_replayed_match_the_waiting_path_on_the_emulator() {
    let sets = [
        "optim.kind=\"sgd\"",
        "optim.lr=0.05",
        "optim.nesterov=true",
        "optim.weight_decay=0.01",
        "optim.clip=0.05",
        "schedule.warmup_steps=20",
        "train.steps=9",
        "train.micro_batch=4",
        "run.log_every=4",
        "probes.interval=3",
    ];
    let (d, err) = runs_by_mode("sgd-devstep", &sets, 1, &["sync", "device", "graph"]);
    // Step 1 (poisoned) runs eagerly, step 2 warms up, step 5 is captured, step 7 replays it.
    assert!(err[2].contains("dptrain: step 5: the training step runs as a CUDA graph ("), "{}", err[2]);
    let (sync, dev, graph) = (d.join("sync"), d.join("device"), d.join("graph"));
    for other in [&dev, &graph] {
        assert_same_run(other, &sync, 9);
    }
    let recs = values(&records(&dev), 0);
    assert!(recs.iter().filter_map(|r| r["grad_norm"].as_f64()).all(|g| g > 0.05), "the clip was active: {recs:?}");
    let ev = std::fs::read_to_string(dev.join("events.jsonl")).unwrap();
    assert!(ev.contains("\"kind\":\"nonfinite\"") && ev.contains("\"step\":1"), "{ev}");
    std::fs::remove_dir_all(&d).ok();
}

/// `train.cuda_graph` for image models: the batch's pixels and labels are the graph's inputs,
/// batch norm's running statistics are updated in place by each replay (and read by the
/// evaluation at the end), the optimizer decides the step on the device. ResNet with batch norm
/// under SGD and under LARS (the large-batch recipe: trust ratios from the clipped gradient's
/// per-layer norms), and an MLP with Ghost Batch Normalization and dropout under LAMB (bias
/// correction, independent decay), two micro-steps each: the replayed run's checkpoint
/// (parameters and running statistics) and metrics are the eager run's, byte for byte.
#[cfg(feature = "cuda-emu")]
#[test]
fn image_models_replay_their_step_as_a_cuda_graph_on_the_emulator() {
    let d = tmp("graph-images");
    let models: [(&str, &[&str]); 3] = [
        ("resnet", &["model.kind=\"resnet\"", "model.width=4", "optim.kind=\"sgd\"", "optim.lr=0.05", "train.steps=5"]),
        (
            "resnet-lars",
            &[
                "model.kind=\"resnet\"",
                "model.width=4",
                "optim.kind=\"lars\"",
                "optim.lr=2.0",
                "optim.nesterov=true",
                "optim.weight_decay=0.001",
                "optim.clip=0.5",
                "train.steps=5",
            ],
        ),
        (
            "mlp-ghost-lamb",
            &[
                "model.kind=\"mlp\"",
                "model.widths=[16, 16]",
                "model.norm=\"ghost\"",
                "model.ghost_batch=2",
                "model.dropout=0.2",
                "optim.kind=\"lamb\"",
                "optim.correct_bias=true",
                "optim.decay=\"independent\"",
                "optim.weight_decay=0.1",
                "train.steps=7",
            ],
        ),
    ];
    for (name, sets) in models {
        let run = |graph: bool| {
            let dir = d.join(format!("{name}-{graph}"));
            let mut c = bin();
            c.env("DPTRAIN_CUDA_EMULATOR", "1").arg("train").arg("--run-dir").arg(&dir);
            let common = [
                "data.kind=\"synthetic-images\"",
                "run.device=\"cuda\"",
                "train.micro_batch=4",
                "run.log_every=100",
                "train.eval_every=0",
                "train.eval_samples=16",
            ];
            let g = if graph { "train.cuda_graph=true" } else { "train.cuda_graph=false" };
            for s in SMALL.iter().chain(&common).chain(sets).chain(&[g]) {
                c.arg("--set").arg(s);
            }
            let o = c.output().unwrap();
            ok(&o);
            (dir, String::from_utf8_lossy(&o.stderr).to_string())
        };
        let ((graph, err), (eager, _)) = (run(true), run(false));
        assert!(err.contains("dptrain: step 2: the training step runs as a CUDA graph ("), "{name}: {err}");
        let last = std::fs::read_dir(graph.join("checkpoints")).unwrap().map(|e| e.unwrap().file_name()).max().unwrap();
        let ck = |r: &Path, f: &str| std::fs::read(r.join("checkpoints").join(&last).join(f)).unwrap();
        assert!(ck(&graph, "model.safetensors") == ck(&eager, "model.safetensors"), "{name}: parameters or running statistics differ");
        assert!(ck(&graph, "optimizer.safetensors") == ck(&eager, "optimizer.safetensors"), "{name}: optimizer state differs");
        let recs = values(&records(&graph), 0);
        assert!(recs.iter().any(|r| r.get("val_loss").is_some()), "{name}: {recs:?}");
        assert_eq!(recs, values(&records(&eager), 0), "{name}");
    }
    std::fs::remove_dir_all(&d).ok();
}

/// `train.cuda_graph`: the step captured once as a CUDA graph and replayed on the steps that
/// log nothing, eager steps (logging, probes, an injected NaN) in between, the learning rate
/// changing every step (warmup), two micro-steps per step, evaluation and checkpoints between
/// replays — on the emulator, bit for bit what the same run without the graph gives:
/// parameters, optimizer state, logged numbers, events. One capture, at the second step.
#[cfg(all(feature = "cuda-emu", feature = "fault-injection"))]
#[test]
fn the_training_step_as_a_cuda_graph_matches_eager_steps_on_the_emulator() {
    let d = tmp("graph");
    let run = |dir: &Path, graph: bool| {
        let sets = [
            "train.steps=12",
            "train.micro_batch=4",
            "run.log_every=5",
            "probes.interval=6",
            "schedule.warmup_steps=20",
            "optim.clip=0.05",
            "train.on_nonfinite=\"skip\"",
            "train.eval_every=8",
            "train.eval_samples=16",
            "train.checkpoint_every=6",
            "checkpoint.keep_last=5",
            if graph { "train.cuda_graph=true" } else { "train.cuda_graph=false" },
        ];
        emulated_bf16_gpt(dir, &sets, &[], &["--fault", "nan:0:3"])
    };
    let (graph, eager) = (d.join("graph"), d.join("eager"));
    let o = run(&graph, true);
    ok(&o);
    ok(&run(&eager, false));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.matches("the training step runs as a CUDA graph (").count(), 1, "{err}");
    assert!(err.contains("dptrain: step 2: the training step runs as a CUDA graph ("), "{err}");
    for step in ["step_0000006", "step_0000012"] {
        let ck = |r: &Path, f: &str| std::fs::read(r.join(format!("checkpoints/{step}/{f}"))).unwrap();
        assert!(ck(&graph, "model.safetensors") == ck(&eager, "model.safetensors"), "{step}: parameters differ");
        assert!(ck(&graph, "optimizer.safetensors") == ck(&eager, "optimizer.safetensors"), "{step}: optimizer state differs");
        assert_eq!(ck(&graph, "state.json"), ck(&eager, "state.json"), "{step}");
    }
    let recs = values(&records(&graph), 0);
    assert_eq!(recs, values(&records(&eager), 0));
    let logged: Vec<u64> = recs.iter().filter(|r| r.get("loss").is_some()).map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(logged, [5, 6, 10, 12]);
    assert!(recs.iter().filter(|r| r.get("val_loss").is_some()).count() == 2, "{recs:?}");
    let ev = |r: &Path| std::fs::read_to_string(r.join("events.jsonl")).unwrap();
    assert!(ev(&graph).contains("\"kind\":\"nonfinite\"") && ev(&graph).contains("\"step\":3"), "{}", ev(&graph));
    assert_eq!(ev(&graph), ev(&eager));
    std::fs::remove_dir_all(&d).ok();
}

/// `train.cuda_graph` under dropout (nanoGPT's character model has 0.2), with random windows
/// and two micro-steps: the kernels read each micro-step's dropout key from device memory,
/// staged for every replay, so the replayed steps draw their own masks — the parameters after
/// 7 steps (five of them replays) are the eager run's bit for bit. (A graph replaying its
/// capture's masks gives other parameters.)
#[cfg(all(feature = "cuda-emu", feature = "fault-injection"))]
#[test]
fn a_cuda_graph_of_the_step_draws_each_steps_dropout_masks_on_the_emulator() {
    let d = tmp("graph-dropout");
    let run = |dir: &Path, graph: bool| {
        let sets = [
            "train.steps=7",
            "train.micro_batch=4",
            "run.log_every=7",
            "model.dropout=0.2",
            "data.windows=\"random\"",
            "train.eval_every=0",
            "train.eval_samples=16",
            if graph { "train.cuda_graph=true" } else { "train.cuda_graph=false" },
        ];
        emulated_bf16_gpt(dir, &sets, &[], &[])
    };
    let (graph, eager) = (d.join("graph"), d.join("eager"));
    let o = run(&graph, true);
    ok(&o);
    ok(&run(&eager, false));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("dptrain: step 2: the training step runs as a CUDA graph ("), "{err}");
    let ck = |r: &Path, f: &str| std::fs::read(r.join(format!("checkpoints/step_0000007/{f}"))).unwrap();
    assert!(ck(&graph, "model.safetensors") == ck(&eager, "model.safetensors"), "parameters differ");
    assert!(ck(&graph, "optimizer.safetensors") == ck(&eager, "optimizer.safetensors"), "optimizer state differs");
    assert_eq!(values(&records(&graph), 0), values(&records(&eager), 0));
    std::fs::remove_dir_all(&d).ok();
}

/// `dptrain gpu-check` itself, end to end on the CPU emulator (test builds with `cuda-emu`):
/// the command a GPU session runs first must print its whole table and pass. Part (c) runs a
/// tiny model here (DPTRAIN_GPU_CHECK_TINY). PyTorch's side is a stand-in script printing what
/// `benches/gpt124m_torch.py` prints (its output parsed and compared as a real run's), and for
/// the small model failing as a machine without torch does, which gpu-check must say.
#[cfg(feature = "cuda-emu")]
#[test]
fn gpu_check_runs_end_to_end_on_the_emulator() {
    let prof = std::env::temp_dir().join(format!("dptrain-gpu-check-profile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&prof);
    let torch = std::env::temp_dir().join(format!("dptrain-gpu-check-torch-{}.sh", std::process::id()));
    std::fs::write(
        &torch,
        r#"case " $* " in
  *" --small "*) echo "ModuleNotFoundError: No module named 'torch'" >&2; exit 1 ;;
  *" --compile "*) echo "tokens_per_s=2000.0 step_ms=40.00 peak_mib=300" ;;
  *) echo "tokens_per_s=1000.0 step_ms=80.00 peak_mib=200 sdpa_fwd_ms=0.500 sdpa_bwd_ms=1.250" ;;
esac
"#,
    )
    .unwrap();
    let o = bin()
        .arg("gpu-check")
        .arg("--profile-out")
        .arg(&prof)
        .env("DPTRAIN_CUDA_EMULATOR", "1")
        .env("DPTRAIN_GPU_CHECK_TINY", "1")
        .env("DPTRAIN_TORCH_PYTHON", "sh")
        .env("DPTRAIN_TORCH_SCRIPT", &torch)
        .output()
        .unwrap();
    std::fs::remove_file(&torch).ok();
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("CPU emulator"), "{out}");
    // how the kernels were had (on a GPU: programs, seconds, how many from the kernel cache)
    assert!(out.contains("\nkernels: none compiled (the CPU emulator runs them as C++)\n"), "{out}");
    let rows = out.lines().filter(|l| l.starts_with("| ") && l.ends_with("| yes |")).count();
    assert_eq!(rows, 71 + 10, "{out}");
    // The trainer on each device with each optimizer (their device paths on the real GPU).
    for opt in ["AdamW", "SGD, Nesterov momentum", "LAMB", "LARS", "SOAP, refresh every 4 steps"] {
        assert!(out.contains(&format!("| GPT-mini, 8 training steps: loss GPU vs CPU (trainer, {opt}) |")), "{opt}:\n{out}");
    }
    assert!(
        out.contains(
            "| nccl reducer pass (bf16 buckets) inside a CUDA graph, 1 rank, 3 replays: vs the doubled gradients in bf16 | 0.00e0 |"
        ),
        "{out}"
    );
    assert!(
        out.contains(
            "| GPT training step as a CUDA graph, 5 steps (replays with new batches and dropout masks) vs eager: parameters | 0.00e0 |"
        ),
        "{out}"
    );
    assert!(out.contains("| the same 5 eager steps run twice: parameters (reproducible run to run) | 0.00e0 |"), "{out}");
    // SOAP's steps through the trainer with the graph: its host steps between replays.
    assert!(
        out.contains(
            "| GPT-mini, SOAP (refresh every 3 updates), 12 steps with 6 run as the CUDA graph vs eager (trainer): parameters | 0.00e0 |"
        ),
        "{out}"
    );
    // SOAP's refresh of one factor, timed on the device (the emulator's stand-in for
    // cuSOLVER) and on the host.
    for row in ["| d 48, GPU (cuSOLVER, f64) | ", "| d 16, host (faer, f64, one core) | "] {
        assert!(out.contains(row), "{row} missing:\n{out}");
    }
    // Both models of part (c), each against PyTorch (absent here), each with its before/after
    // lines (one fusion off at a time) and the share of the step the GPU is busy.
    for model in ["| GPT-124M (as a tiny test model", "| GPT 10.9M (examples/shakespeare-char.toml) (as a tiny test model"] {
        assert!(out.lines().any(|l| l.starts_with(model)), "{model} missing:\n{out}");
    }
    // The tiny model has one head of 32, as GPT-124M's heads (64) a size with a flash kernel.
    assert_eq!(out.matches("| dptrain (flash attention) |").count(), 2, "{out}");
    // PyTorch's numbers as its script printed them, and the ratios; torch.compile for GPT-124M
    // only (its compilation costs minutes of device time).
    assert!(out.contains("| PyTorch eager (autocast bf16, SDPA, fused AdamW) | 1000 | 80.0 | "), "{out}");
    assert!(out.contains("| PyTorch torch.compile (same) | 2000 | 40.0 | "), "{out}");
    assert_eq!(out.matches("| ratio dptrain / eager | ").count(), 1, "{out}");
    assert_eq!(out.matches("| ratio dptrain / torch.compile | ").count(), 1, "{out}");
    assert_eq!(out.matches("torch.compile (same) |").count(), 1, "{out}");
    // A machine without torch: said, and the rest runs.
    assert_eq!(out.matches("fused AdamW) | not run: ").count(), 1, "{out}");
    assert!(out.contains("No module named 'torch'"), "{out}");
    // SDPA alone on the same shapes (eager's run), beside the flash kernels' own times.
    let sdpa: Vec<&str> = out.lines().filter(|l| l.starts_with("PyTorch SDPA alone on the same shapes")).collect();
    assert_eq!(sdpa.len(), 1, "{out}");
    assert!(sdpa[0].contains(": forward 0.50 ms = ") && sdpa[0].contains(", backward 1.25 ms = "), "{}", sdpa[0]);
    assert!(sdpa[0].contains("dptrain's flash takes "), "{}", sdpa[0]);
    for line in [
        "| dptrain without the flash attention (unfused attention): ",
        "| dptrain without the flash forward's 128-row query tiles (64-row ones instead) (flash attention, 64-row forward tiles): ",
        "| dptrain without the bias epilogue (flash attention): ",
        "| dptrain without the tanh GELU in the MLP's GEMM epilogues (GELU's kernels instead; no-op for the exact form) (flash attention): ",
        "| dptrain without the fused classifier (flash attention): ",
        "| dptrain without the bf16 operands from GELU and layer norm (flash attention): ",
        "| dptrain without the bf16 activations (qkv, attention output, MLP pre-activation) (flash attention): ",
        "| dptrain without the step decided on the device (a wait every step) (flash attention): ",
        "| dptrain without the weight gradients written into the gradient buffer (flash attention): ",
        "| dptrain without the optimizer's bf16 weight copy (flash attention): ",
        "| dptrain without the gradient added in place by its op (layer norm's dx into the residual stream's) (flash attention): ",
        "| dptrain without the residual add in the projections' GEMMs (flash attention): ",
        "| dptrain without the 16-byte loads in GELU, layer norm and the cross-entropy rows (one element per access instead) (flash attention): ",
    ] {
        assert_eq!(out.matches(line).count(), 2, "{line}:\n{out}");
    }
    // And the step captured as one CUDA graph, replayed (the small model's with its dropout).
    assert_eq!(out.matches("| dptrain with the step as one CUDA graph (").count(), 2, "{out}");
    assert_eq!(out.matches("the GPU is busy").count(), 2, "{out}");
    // The flash kernels' rate, from the profiled step's flash_fwd and flash_bwd kernels.
    assert_eq!(out.lines().filter(|l| l.starts_with("flash attention: forward ") && l.contains(" TFLOP/s, backward ")).count(), 2, "{out}");
    assert!(!out.contains("| NO |"), "{out}");
    // Every kernel of each profiled step, in a file per model and per fusion switched off.
    let full = std::fs::read_to_string(prof.join("profile-gpt124m.tsv")).unwrap();
    let kernels: Vec<&str> = full.lines().skip(2).collect();
    assert!(kernels.iter().any(|l| l.starts_with("flash\t")), "{full}");
    assert!(kernels.iter().any(|l| l.starts_with("optim\tadamw_f32\t1\t")), "{full}");
    let launches: usize = kernels.iter().map(|l| l.split('\t').nth(2).unwrap().parse::<usize>().unwrap()).sum();
    let printed = out.lines().find(|l| l.starts_with("| total |")).unwrap();
    assert!(printed.ends_with(&format!("| {launches} |")), "{printed} vs {launches} launches in the file");
    let files = std::fs::read_dir(&prof).unwrap().count();
    assert_eq!(files, 2 * 14, "one profile per model and fusion setting");
    assert!(prof.join("profile-gpt-10.9m-without-flash.tsv").exists());
    // GPT-124M's tanh GELU runs in its MLP's GEMM epilogues, GELU's kernels not at all; with
    // that switched off, the kernels run and the GELU epilogues do not.
    let kernels_gelu = std::fs::read_to_string(prof.join("profile-gpt124m-without-gelu_epilogue.tsv")).unwrap();
    for (file, on) in [(&full, true), (&kernels_gelu, false)] {
        for gemm in ["cublas\tgemm + bias + GELU, bf16 output (cuBLASLt)\t", "cublas\tgemm + GELU gradient, bf16 output (cuBLASLt)\t"] {
            assert_eq!(file.lines().any(|l| l.starts_with(gemm)), on, "{gemm}:\n{file}");
        }
        assert_eq!(file.lines().any(|l| l.starts_with("elementwise\tgelu")), !on, "{file}");
    }
    // GELU (the small model's exact form) and layer norm on 16-byte loads, and one element per
    // access with them switched off.
    let small = std::fs::read_to_string(prof.join("profile-gpt-10.9m.tsv")).unwrap();
    let narrow = std::fs::read_to_string(prof.join("profile-gpt-10.9m-without-wide_loads.tsv")).unwrap();
    for (file, on) in [(&small, true), (&narrow, false)] {
        for (wide, narrow) in [
            ("elementwise\tgelu_bf16_bf16_x8\t", "elementwise\tgelu_bf16_bf16\t"),
            ("layer_norm\tlayer_norm_fwd_warp_bf16\t", "layer_norm\tlayer_norm_fwd_bf16\t"),
            ("layer_norm\tlayer_norm_bwd_x4_f32\t", "layer_norm\tlayer_norm_bwd_f32\t"),
        ] {
            let (w, n) = (file.lines().any(|l| l.starts_with(wide)), file.lines().any(|l| l.starts_with(narrow)));
            assert_eq!((w, n), (on, !on), "{wide}:\n{file}");
        }
    }
    std::fs::remove_dir_all(&prof).ok();
    // A training step that logs nothing never waits for the device: the step is decided there
    // and the model's forward and backward (cross-entropy included) never wait.
    assert_eq!(out.matches("waited for the device 0 times per step").count(), 2, "{out}");
    // The profiled step: time per kernel class (emulator times mean nothing, the rows do).
    for row in [
        "| flash attention |",
        "| GEMMs (cuBLAS) |",
        "| GEMMs with an epilogue (cuBLASLt: bias, residual, GELU) |",
        "| cross-entropy |",
        "| optimizer |",
        "| total |",
    ] {
        assert!(out.lines().any(|l| l.starts_with(row)), "{row} missing:\n{out}");
    }
}

/// Resume at step k gives bitwise the same metrics from k on as the uninterrupted run.
fn resume_matches(name: &str, sets: &[&str]) {
    let d = tmp(name);
    let (a, b) = (d.join("a"), d.join("b"));
    let mut all: Vec<&str> = vec!["train.steps=30", "train.checkpoint_every=10", "checkpoint.keep_last=5", "train.eval_every=10"];
    all.extend_from_slice(sets);
    ok(&train(&a, &all, &[]));
    // Interrupted copy: stop at 20 by running with steps=20 (same schedule needs steps=30, so
    // instead copy the full run's checkpoint at step 10 and resume from it).
    let out = bin().arg("train").arg("--resume").arg(a.join("checkpoints/step_0000010")).arg("--run-dir").arg(&b).output().unwrap();
    ok(&out);
    let (ra, rb) = (records(&a), records(&b));
    let (va, vb) = (values(&ra, 10), values(&rb, 10));
    assert_eq!(va.len(), vb.len());
    assert_eq!(va, vb, "{name}: resumed metrics differ from the uninterrupted run");
    // Resuming a run directory picks its newest checkpoint and continues its metrics file.
    let out = bin().args(["train", "--set", "train.steps=32", "--resume"]).arg(&a).output().unwrap();
    ok(&out);
    let ra2 = records(&a);
    assert_eq!(ra2.iter().filter(|r| r.get("loss").is_some()).count(), 32);
    std::fs::remove_dir_all(&d).ok();
}

/// SIGTERM (Slurm's time limit, preemption) stops a run at the end of its step with a
/// checkpoint there and exit code 143; resumed from it, the run continues bitwise as one never
/// stopped (a constant learning rate, so a shorter run is the same run up to its end).
#[test]
fn a_signal_stops_the_run_with_a_checkpoint_it_resumes_from() {
    let d = tmp("stop");
    let (a, b) = (d.join("a"), d.join("b"));
    let same = ["schedule.kind=\"constant\"", "schedule.warmup_steps=0", "run.log_every=1", "train.eval_every=0"];
    let mut c = bin();
    c.arg("train").arg("--run-dir").arg(&b);
    for s in SMALL.iter().chain(SMALL_GPT).chain(&same).chain(&["train.steps=1000000"]) {
        c.args(["--set", s]);
    }
    let child = c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(b.join("metrics.jsonl")).map_or(0, |m| m.lines().count()) < 3 {
        assert!(t0.elapsed().as_secs() < 60, "the run did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: kill(2) on this test's own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(143), "{err}");
    let line = err.lines().find(|l| l.starts_with("dptrain: stopped by SIGTERM after step ")).unwrap_or_else(|| panic!("{err}"));
    let n: u64 = line["dptrain: stopped by SIGTERM after step ".len()..].split(' ').next().unwrap().parse().unwrap();
    assert!(line.contains(&format!("of 1000000: checkpoint {}", b.join("checkpoints/step_").display())), "{line}");
    assert!(b.join(format!("checkpoints/step_{n:07}/state.json")).is_file(), "{line}");
    assert!(!b.join("summary.json").exists(), "a stopped run is not finished");
    assert_eq!(records(&b).last().unwrap()["step"], n);
    // The same run, never stopped, to n + 5; and the stopped one resumed to there.
    let to = format!("train.steps={}", n + 5);
    ok(&train(&a, &same.iter().copied().chain([to.as_str()]).collect::<Vec<_>>(), &[]));
    ok(&bin().args(["train", "--set", &to, "--resume"]).arg(&b).output().unwrap());
    let (va, vb) = (values(&records(&a), 0), values(&records(&b), 0));
    assert_eq!(vb.len(), n as usize + 5 + 1, "the resumed run's records");
    assert_eq!(va, vb, "the stopped and resumed run differs from the one never stopped");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn resume_is_bitwise_exact_gpt_adamw() {
    resume_matches("resume-gpt", &[]);
}

/// SOAP's state (moments, factors, eigenbases, step) round-trips through checkpoints: a run
/// resumed at step 10 continues bitwise as the uninterrupted one, across basis refreshes.
#[test]
fn resume_is_bitwise_exact_soap() {
    resume_matches("resume-soap", &["optim.kind=\"soap\"", "optim.precondition_frequency=4"]);
}

/// LAMB's moments and step count, LARS's momentum buffer round-trip through checkpoints.
#[test]
fn resume_is_bitwise_exact_lamb_and_lars() {
    resume_matches("resume-lamb", &["optim.kind=\"lamb\"", "optim.lr=1e-2"]);
    resume_matches("resume-lars", &["optim.kind=\"lars\"", "optim.lr=0.5", "optim.trust_coefficient=0.02"]);
}

#[test]
fn resume_is_bitwise_exact_mlp_batchnorm_sgd_accumulation() {
    resume_matches(
        "resume-mlp",
        &[
            "model.kind=\"mlp\"",
            "model.widths=[16]",
            "model.norm=\"batch\"",
            "data.kind=\"synthetic-images\"",
            "data.samples=256",
            "data.val_samples=32",
            "optim.kind=\"sgd\"",
            "optim.lr=0.05",
            "train.micro_batch=4",
        ],
    );
}

/// Bad input: exit code 2, one line naming the problem, no run directory left behind.
fn bad(name: &str, sets: &[&str], extra: &[&str], expect: &str) {
    let d = tmp(name);
    let run = d.join("run");
    let mut c = bin();
    c.arg("train").arg("--run-dir").arg(&run);
    for s in sets {
        c.arg("--set").arg(s);
    }
    c.args(extra);
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{name}: {err}");
    assert!(err.contains(expect), "{name}: expected `{expect}` in: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{name}: not one line: {err}");
    assert!(!err.contains("panicked"), "{name}: {err}");
    assert!(!run.exists(), "{name}: left a run directory behind");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn bad_config_values_are_one_line_errors() {
    bad("unknown", &["train.stepz=3"], &[], "train.stepz");
    bad("type", &["train.steps=\"many\""], &[], "train.steps: expected an integer");
    bad("batch0", &["train.global_batch=0"], &[], "train.global_batch: must be a positive integer");
    bad("lr", &["optim.lr=-1"], &[], "optim.lr: must be a positive number");
    bad("divisible", &["train.global_batch=10", "train.micro_batch=4"], &[], "train.global_batch: 10 is not divisible");
    bad("graph-cpu", &["train.cuda_graph=true"], &[], "train.cuda_graph: true needs run.device = \"cuda\"");
    bad("heads", &["model.n_heads=5"], &[], "model.n_heads");
    bad("kind", &["optim.kind=\"rmsprop\""], &[], "optim.kind: expected one of sgd | adamw");
    bad("cuda", &["run.device=\"cuda\""], &[], "run.device");
    bad("precision", &["train.precision=\"fp8\""], &[], "train.precision: expected one of f32 | bf16");
    bad("comm dtype", &["comm.dtype=\"f16\""], &[], "comm.dtype: expected one of f32 | bf16");
    bad("model key", &["model.widths=[3]"], &[], "model.widths: not a key of model.kind = \"gpt\"");
    bad("data mismatch", &["data.kind=\"synthetic-images\""], &[], "data.kind");
    let d = tmp("files");
    let cfg = d.join("bad.toml");
    std::fs::write(&cfg, "[train]\nsteps = 3\n[optim\nlr = 1").unwrap();
    bad("malformed", &[], &[cfg.to_str().unwrap()], "bad.toml: malformed TOML at line 3");
    bad("missing cfg", &[], &[d.join("nope.toml").to_str().unwrap()], "nope.toml");
    bad("cli", &[], &["--bogus"], "--bogus");
}

/// Sizes no machine holds: before, an aborted allocation (exit 134), a loop over 10¹¹ layers,
/// or a wrapped size; now refused before anything is declared, generated or written.
#[test]
fn models_and_data_larger_than_memory_are_one_line_errors() {
    bad("wide", &["model.d_model=100000000"], &[], "model: gpt (d_model = 100000000, n_layers = 2");
    bad("wrapping", &["model.d_model=4294967296", "model.n_heads=1"], &[], "parameters, which need at least");
    bad("deep", &["model.n_layers=100000000000"], &[], "n_layers = 100000000000");
    bad("mlp", &["model.kind=\"mlp\"", "data.kind=\"synthetic-images\"", "model.widths=[100000000000]"], &[], "model: mlp (");
    bad("resnet", &["model.kind=\"resnet\"", "data.kind=\"synthetic-images\"", "model.width=100000000"], &[], "model: resnet (");
    bad("tokens", &["data.train_tokens=100000000000000"], &[], "data.train_tokens / data.val_tokens: 100000000040000 tokens");
    bad("images", &["model.kind=\"mlp\"", "data.kind=\"synthetic-images\"", "data.samples=100000000000"], &[], "data.samples / ");
}

#[test]
fn bad_data_files_are_one_line_errors() {
    let d = tmp("data");
    let missing = d.join("missing.txt");
    bad("missing text", &["data.kind=\"text\"", &format!("data.path=\"{}\"", missing.display())], &[], "missing.txt");
    let odd = d.join("odd.bin");
    std::fs::write(&odd, vec![1u8; 1001]).unwrap();
    bad("truncated tokens", &["data.kind=\"tokens\"", &format!("data.path=\"{}\"", odd.display())], &[], "odd.bin: truncated");
    let bad_utf8 = d.join("latin1.txt");
    std::fs::write(&bad_utf8, [b'a', 0xe9, b'b']).unwrap();
    bad("utf8", &["data.kind=\"text\"", &format!("data.path=\"{}\"", bad_utf8.display())], &[], "latin1.txt: not valid UTF-8");
    let x = d.join("x.npy");
    std::fs::write(&x, b"\x93NUMPY junk").unwrap();
    bad(
        "npy",
        &[
            "model.kind=\"mlp\"",
            "data.kind=\"npy\"",
            &format!("data.path=\"{}\"", x.display()),
            &format!("data.labels=\"{}\"", x.display()),
        ],
        &[],
        "x.npy",
    );
    let (img, labels) = (d.join("img.npy"), d.join("labels.npy"));
    dptrain_core::data::files::write_npy(&img, &[4, 1, 2, 2], &[0.0; 16], false).unwrap();
    for (name, label, want) in [
        ("negative label", -1.0, "labels.npy: label -1 is not a class id (an integer from 0 to 4294967294)"),
        ("label too large", 2f64.powi(40), "labels.npy: label 1099511627776 is not a class id"),
        ("fractional label", 1.5, "labels.npy: label 1.5 is not a class id"),
    ] {
        dptrain_core::data::files::write_npy(&labels, &[4], &[0.0, 1.0, label, 0.0], label.fract() == 0.0).unwrap();
        let sets = ["model.kind=\"mlp\"", "data.kind=\"npy\""];
        let paths = [format!("data.path=\"{}\"", img.display()), format!("data.labels=\"{}\"", labels.display())];
        bad(name, &[sets[0], sets[1], &paths[0], &paths[1]], &[], want);
    }
    bad("no path", &["data.kind=\"text\""], &[], "data.path: required");
}

#[test]
fn corrupt_or_mismatched_checkpoints_are_rejected() {
    let d = tmp("ckpt");
    let run = d.join("r");
    ok(&train(&run, &["train.steps=4", "train.checkpoint_every=2", "checkpoint.keep_last=3"], &[]));
    let c2 = run.join("checkpoints/step_0000002");
    // mismatched model: a different width via --set
    bad("mismatch", &["model.d_model=48"], &["--resume", c2.to_str().unwrap()], "different model");
    // corrupt state and weights
    let c4 = run.join("checkpoints/step_0000004");
    std::fs::write(c4.join("model.safetensors"), b"not safetensors").unwrap();
    bad("corrupt weights", &["train.steps=6"], &["--resume", c4.to_str().unwrap()], "model.safetensors");
    // a sampler position that is no position: no ranks, or one that overflows on resume
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(c2.join("state.json")).unwrap()).unwrap();
    for (ranks, offset) in [(0u64, 64u64), (4, u64::MAX / 2)] {
        let mut st = state.clone();
        st["world_size"] = ranks.into();
        st["stream"]["offset"] = offset.into();
        std::fs::write(c2.join("state.json"), st.to_string()).unwrap();
        let want = format!("state.json: corrupt checkpoint state (sampler position {offset} on {ranks} ranks)");
        bad("bad sampler position", &[], &["--resume", c2.to_str().unwrap()], &want);
    }
    std::fs::write(c2.join("state.json"), b"{ half").unwrap();
    bad("corrupt state", &[], &["--resume", c2.to_str().unwrap()], "state.json: corrupt checkpoint");
    bad("no checkpoint", &[], &["--resume", d.to_str().unwrap()], "no checkpoint found");
    bad("finished", &[], &["--resume", c4.to_str().unwrap()], "nothing to do");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn every_data_format_trains() {
    let d = tmp("formats");
    // text
    let text = d.join("t.txt");
    std::fs::write(&text, "the quick brown fox jumps over the lazy dog. ".repeat(200)).unwrap();
    ok(&train(&d.join("text"), &["train.steps=3", "data.kind=\"text\"", &format!("data.path=\"{}\"", text.display())], &[]));
    let cfg = std::fs::read_to_string(d.join("text/config.toml")).unwrap();
    assert!(cfg.contains("vocab_size = 256"));
    // tokens (uint16)
    let toks = d.join("t.bin");
    let bytes: Vec<u8> = (0..6000u32).flat_map(|i| ((i * 7919 % 300) as u16).to_le_bytes()).collect();
    std::fs::write(&toks, bytes).unwrap();
    ok(&train(&d.join("tok"), &["train.steps=3", "data.kind=\"tokens\"", &format!("data.path=\"{}\"", toks.display())], &[]));
    assert!(std::fs::read_to_string(d.join("tok/config.toml")).unwrap().contains("vocab_size = 300"));
    // npy images + labels, into both image models
    let (x, y) = (d.join("x.npy"), d.join("y.npy"));
    let n = 64;
    let px: Vec<f64> = (0..n * 2 * 4 * 4).map(|i| ((i * 37) % 11) as f64 / 11.0).collect();
    dptrain_core::data::files::write_npy(&x, &[n, 2, 4, 4], &px, false).unwrap();
    dptrain_core::data::files::write_npy(&y, &[n], &(0..n).map(|i| (i % 3) as f64).collect::<Vec<_>>(), true).unwrap();
    let npy = [format!("data.path=\"{}\"", x.display()), format!("data.labels=\"{}\"", y.display())];
    for (m, extra) in [("mlp", "model.widths=[8]"), ("resnet", "model.width=4")] {
        let kind = format!("model.kind=\"{m}\"");
        ok(&train(&d.join(m), &["train.steps=3", &kind, extra, "data.kind=\"npy\"", &npy[0], &npy[1]], &[]));
        let cfg = std::fs::read_to_string(d.join(m).join("config.toml")).unwrap();
        assert!(cfg.contains("classes = 3"), "{cfg}");
    }
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn tinyshakespeare_trains_as_text() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data/tinyshakespeare.txt");
    let d = tmp("shakespeare");
    let o = train(&d.join("r"), &["train.steps=40", "optim.lr=1e-2", "data.kind=\"text\"", &format!("data.path=\"{}\"", p.display())], &[]);
    ok(&o);
    let recs = records(&d.join("r"));
    let losses: Vec<f64> = recs.iter().filter_map(|r| r["loss"].as_f64()).collect();
    assert!(losses[35..].iter().sum::<f64>() / 5.0 < losses[..5].iter().sum::<f64>() / 5.0 - 1.0, "{losses:?}");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn config_show_is_a_runnable_config() {
    let o = bin().args(["config", "show"]).output().unwrap();
    ok(&o);
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.lines().filter(|l| l.contains(" = ")).all(|_| true));
    let keys = text.lines().filter(|l| !l.starts_with('#') && l.contains(" = ")).count();
    let comments = text.lines().filter(|l| l.starts_with("# ")).count();
    assert!(comments >= keys, "every key has a comment");
    let d = tmp("show");
    let cfg = d.join("c.toml");
    std::fs::write(&cfg, text).unwrap();
    ok(&train(&d.join("r"), &["train.steps=2"], &[cfg.to_str().unwrap()]));
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn an_existing_run_directory_is_never_overwritten() {
    let d = tmp("fresh");
    let mut c = bin();
    c.current_dir(&d).args(["train", "--set", "train.steps=2", "--set", "run.name=x"]);
    for s in SMALL.iter().chain(SMALL_GPT) {
        c.arg("--set").arg(s);
    }
    ok(&c.output().unwrap());
    ok(&c.output().unwrap());
    assert!(d.join("runs/x/summary.json").is_file() && d.join("runs/x-1/summary.json").is_file());
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn several_ranks_without_an_mpi_launcher_is_refused() {
    let d = tmp("nompi");
    let o = bin()
        .args(["train", "--set", "train.steps=1", "--run-dir"])
        .arg(d.join("r"))
        .env("SLURM_PROCID", "1")
        .env("SLURM_NTASKS", "4")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("rank 1 of 4") && err.contains("srun --mpi=pmix"), "{err}");
    assert!(!d.join("r").exists());
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn gpu_check_without_a_gpu_is_one_clear_line() {
    let o = bin().arg("gpu-check").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    if dptrain_core::device::cuda_status() == dptrain_core::device::CudaStatus::NoDriver {
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains("gpu-check: no CUDA driver"), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1);
    }
}

/// A small text corpus with some structure (so a model learns something in a few steps).
fn corpus(d: &Path) -> PathBuf {
    let text = d.join("corpus.txt");
    let words = ["alpha ", "beta ", "gamma ", "delta ", "epsilon. ", "zeta\n"];
    let s: String = (0..4000usize).map(|i| words[(i * 7 + i / 5) % words.len()]).collect();
    std::fs::write(&text, s).unwrap();
    text
}

/// Random-offset windows and dropout are keyed by (seed, step, rank, micro-step): resuming
/// replays them exactly, so the metrics from the checkpoint on are bitwise those of the
/// uninterrupted run; and they do change the numbers.
#[test]
fn random_windows_and_dropout_resume_bitwise() {
    let d = tmp("random-windows");
    let path = format!("data.path=\"{}\"", corpus(&d).display());
    let common = [
        "data.kind=\"text\"",
        path.as_str(),
        "train.steps=20",
        "train.checkpoint_every=10",
        "checkpoint.keep_last=5",
        "train.eval_every=10",
        "train.micro_batch=4",
    ];
    let (a, b, f) = (d.join("a"), d.join("b"), d.join("fixed"));
    let mut sa = common.to_vec();
    sa.push("model.dropout=0.2");
    ok(&train(&a, &sa, &[]));
    let cfg = std::fs::read_to_string(a.join("config.toml")).unwrap();
    assert!(cfg.contains("windows = \"random\""), "text data defaults to random windows:\n{cfg}");
    assert!(cfg.contains("dropout = 0.2"), "{cfg}");
    let out = bin().arg("train").arg("--resume").arg(a.join("checkpoints/step_0000010")).arg("--run-dir").arg(&b).output().unwrap();
    ok(&out);
    assert_eq!(values(&records(&a), 10), values(&records(&b), 10), "resumed metrics differ from the uninterrupted run");
    // The same run with fixed windows and no dropout draws other numbers.
    let mut sf = common.to_vec();
    sf.push("data.windows=\"fixed\"");
    ok(&train(&f, &sf, &[]));
    let loss = |r: &Path| records(r).iter().filter_map(|v| v["loss"].as_f64()).collect::<Vec<f64>>();
    assert_ne!(loss(&a), loss(&f));
    // synthetic-lm keeps fixed windows by default.
    ok(&train(&d.join("synth"), &["train.steps=2"], &[]));
    assert!(std::fs::read_to_string(d.join("synth/config.toml")).unwrap().contains("windows = \"fixed\""));
    std::fs::remove_dir_all(&d).ok();
}

/// Validation reads `train.eval_samples` samples whatever the batch layout: the same global
/// batch as 1 × 16 or 4 × 4 micro-batches reaches the same parameters (up to rounding) and is
/// scored on the same 40 samples, so the validation losses agree.
#[test]
fn validation_does_not_depend_on_the_micro_batch() {
    let d = tmp("eval-samples");
    let val = |dir: &Path| records(dir).iter().filter_map(|v| v["val_loss"].as_f64()).collect::<Vec<f64>>();
    let base = ["train.global_batch=16", "train.steps=3", "train.eval_every=0", "train.eval_samples=40"];
    let mut runs = vec![];
    for micro in ["train.micro_batch=16", "train.micro_batch=4"] {
        let dir = d.join(micro.replace(['.', '='], "-"));
        let mut sets = base.to_vec();
        sets.push(micro);
        ok(&train(&dir, &sets, &[]));
        assert!(std::fs::read_to_string(dir.join("config.toml")).unwrap().contains("eval_samples = 40"));
        runs.push(val(&dir)[0]);
    }
    assert!((runs[0] - runs[1]).abs() < 1e-5, "val loss {} (micro 16) vs {} (micro 4)", runs[0], runs[1]);
    // All of the split with 0.
    ok(&train(&d.join("all"), &["train.steps=1", "train.eval_samples=0"], &[]));
    let cfg = std::fs::read_to_string(d.join("all/config.toml")).unwrap();
    assert!(cfg.contains("eval_samples = 249"), "4000 validation tokens / 16 = 249 windows:\n{cfg}");
    std::fs::remove_dir_all(&d).ok();
}

/// Classifiers log top-1 accuracy: `train_acc` on the training batch, `val_acc` at evaluation;
/// the z-loss is logged apart from the cross-entropy.
#[test]
fn accuracy_and_z_loss_are_logged() {
    let d = tmp("acc");
    let run = d.join("mlp");
    let sets = [
        "model.kind=\"mlp\"",
        "data.kind=\"synthetic-images\"",
        "model.widths=[32]",
        "train.steps=40",
        "train.eval_every=20",
        "optim.lr=1e-2",
    ];
    let o = train(&run, &sets, &[]);
    ok(&o);
    let recs = records(&run);
    let train_acc: Vec<f64> = recs.iter().filter_map(|r| r["train_acc"].as_f64()).collect();
    let val_acc: Vec<f64> = recs.iter().filter_map(|r| r["val_acc"].as_f64()).collect();
    assert_eq!(train_acc.len(), 40);
    assert_eq!(val_acc.len(), 2);
    assert!(train_acc.iter().chain(&val_acc).all(|a| (0.0..=1.0).contains(a)));
    // 10 well-separated classes: chance is 0.1.
    assert!(val_acc[1] > 0.5, "val_acc {val_acc:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("val acc"), "{}", String::from_utf8_lossy(&o.stdout));
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["final_val_acc"].as_f64(), Some(val_acc[1]));

    let z = d.join("z");
    ok(&train(&z, &["train.steps=4", "model.z_loss=1e-2", "train.eval_every=2"], &[]));
    for r in records(&z) {
        if let Some(loss) = r["loss"].as_f64() {
            let (ce, zl) = (r["ce_loss"].as_f64().unwrap(), r["z_loss"].as_f64().unwrap());
            assert!(zl > 0.0 && (ce + zl - loss).abs() < 1e-9 * loss, "{r}");
        }
        if let Some(v) = r["val_loss"].as_f64() {
            let vz = r["val_z_loss"].as_f64().unwrap();
            assert!(vz > 0.0 && v > 1.0, "{r}");
        }
    }
    // Without z-loss there is no z_loss or ce_loss column.
    assert!(records(&run).iter().all(|r| r.get("z_loss").is_none() && r.get("ce_loss").is_none()));
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn bad_values_of_the_new_keys_are_one_line_errors() {
    bad("dropout 1", &["model.dropout=1.0"], &[], "model.dropout: must be a probability in [0, 1), got 1");
    bad("dropout neg", &["model.dropout=-0.1"], &[], "model.dropout");
    bad("windows", &["data.windows=\"sliding\""], &[], "data.windows: expected one of random | fixed");
    bad(
        "windows images",
        &["model.kind=\"mlp\"", "data.kind=\"synthetic-images\"", "data.windows=\"random\""],
        &[],
        "data.windows: only for token data",
    );
    bad("eval samples", &["train.eval_samples=100000"], &[], "train.eval_samples: 100000 is more than the 624 samples");
    bad("eval batches", &["train.eval_batches=2"], &[], "train.eval_batches: replaced by train.eval_samples");
    bad("batch_norm key", &["model.kind=\"mlp\"", "model.batch_norm=true"], &[], "model.batch_norm: replaced by model.norm");
    let mlp = ["model.kind=\"mlp\"", "data.kind=\"synthetic-images\"", "model.norm=\"ghost\""];
    let ghost = [&mlp[..], &["model.ghost_batch=3"]].concat();
    bad("ghost divides", &ghost, &[], "model.ghost_batch: 3 does not divide the micro-batch of 32");
    bad("norm kind", &[&mlp[..2], &["model.norm=\"layer\""]].concat(), &[], "model.norm: expected one of none | batch | ghost");
    bad("norm on gpt", &["model.norm=\"batch\""], &[], "model.norm: not a key of model.kind = \"gpt\"");
    bad("threads", &["run.threads=100000"], &[], "run.threads: 100000 is more than 4 ×");
    bad("bucket 0", &["comm.bucket_mb=0"], &[], "comm.bucket_mb: must be a positive number");
    bad("bucket neg", &["comm.bucket_mb=-5"], &[], "comm.bucket_mb");
    bad(
        "soap distribute",
        &["optim.kind=\"soap\"", "optim.distribute=\"all\""],
        &[],
        "optim.distribute: expected one of replicated | owner",
    );
    bad("soap shampoo beta", &["optim.kind=\"soap\"", "optim.shampoo_beta=1.5"], &[], "optim.shampoo_beta: must be below 1");
    bad(
        "soap frequency",
        &["optim.kind=\"soap\"", "optim.precondition_frequency=0"],
        &[],
        "optim.precondition_frequency: must be a positive integer",
    );
}

/// A warmup longer than the run is allowed but said, once, before training.
#[test]
fn a_warmup_longer_than_the_run_is_a_warning() {
    let d = tmp("warmup");
    let o = train(&d.join("r"), &["train.steps=3", "schedule.warmup_steps=1000000"], &[]);
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("warning: schedule.warmup_steps = 1000000 is more than train.steps = 3: the learning rate never reaches optim.lr"),
        "{err}"
    );
    let o = train(&d.join("q"), &["train.steps=3", "schedule.warmup_steps=3"], &[]);
    assert!(!String::from_utf8_lossy(&o.stderr).contains("warning"));
    std::fs::remove_dir_all(&d).ok();
}

/// The shipped examples run as they are (from the repository root), here for a few steps.
#[test]
fn the_examples_run() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let d = tmp("examples");
    for (name, extra) in [("shakespeare-cpu", vec![]), ("shakespeare-char", vec!["--set", "run.device=\"cpu\""])] {
        let mut c = bin();
        c.current_dir(&root).arg("train").arg(format!("examples/{name}.toml")).arg("--run-dir").arg(d.join(name));
        c.args(["--set", "train.steps=2", "--set", "train.eval_samples=4", "--set", "run.threads=1"]).args(&extra);
        let o = c.output().unwrap();
        ok(&o);
        let cfg = std::fs::read_to_string(d.join(name).join("config.toml")).unwrap();
        assert!(cfg.contains("windows = \"random\""), "{cfg}");
    }
    // The large-batch examples, with the batch-size rules resolved as their comments say.
    for (name, lr, steps) in
        [("large-batch-resnet", 2.0, 2 * 4), ("large-batch-gpt-lamb", 2e-2, 2), ("mup-gpt", 3e-3, 2), ("lr-sweep-gpt", 3e-3, 2)]
    {
        let mut c = bin();
        c.current_dir(&root).arg("train").arg(format!("examples/{name}.toml")).arg("--run-dir").arg(d.join(name));
        c.args(["--set", "train.steps=2", "--set", "train.eval_samples=4", "--set", "run.threads=1"]);
        ok(&c.output().unwrap());
        let cfg: toml::Table = std::fs::read_to_string(d.join(name).join("config.toml")).unwrap().parse().unwrap();
        let dv = cfg["derived"].as_table().unwrap();
        assert!((dv["lr"].as_float().unwrap() - lr).abs() < 1e-12 && dv["steps"].as_integer() == Some(steps), "{name}: {dv:?}");
    }
    std::fs::remove_dir_all(&d).ok();
}

/// `dptrain parity optim` replays SOAP on the reference's gradients — from scratch, and from
/// the reference's state for a rank-deficient case — and matches its parameters after every
/// step; its state round-trips through --state-out/--state-in; bad files are one-line errors.
#[test]
fn parity_replay_matches_the_soap_reference() {
    use dptrain_core::checkpoint::{tensors_from_bytes, tensors_to_bytes};
    use dptrain_core::Tensor;
    let fx: Value =
        serde_json::from_str(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/soap.json")).unwrap())
            .unwrap();
    let vals = |v: &Value| -> Vec<f32> { v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect() };
    let d = tmp("parity");
    for case in
        fx["cases"].as_array().unwrap().iter().filter(|c| ["square f=3 wd", "rectangular (replay)"].contains(&c["name"].as_str().unwrap()))
    {
        let shape: Vec<usize> = case["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        // HP.toml: the [optim] keys, flat.
        let mut hp = String::from("kind = \"soap\"\n");
        for (k, v) in case["hp"].as_object().unwrap() {
            hp.push_str(&format!("{k} = {v}\n"));
        }
        std::fs::write(d.join("hp.toml"), &hp).unwrap();
        let start = case["state_at"].as_u64().unwrap_or(0) as usize;
        let mut input = vec![];
        let mut state_args = vec![];
        match case.get("state") {
            None => input.push(("param.w".to_string(), Tensor::from_vec(vals(&case["p0"]), &shape).unwrap())),
            Some(st) => {
                input.push(("param.w".to_string(), Tensor::from_vec(vals(&st["param"]), &shape).unwrap()));
                let mut s = vec![
                    ("exp_avg.w".to_string(), Tensor::from_vec(vals(&st["exp_avg"]), &shape).unwrap()),
                    ("exp_avg_sq.w".to_string(), Tensor::from_vec(vals(&st["exp_avg_sq"]), &shape).unwrap()),
                    ("scalar.step".to_string(), Tensor::from_vec(vec![st["step"].as_f64().unwrap() as f32], &[1]).unwrap()),
                    ("scalar.started".to_string(), Tensor::from_vec(vec![1.0f32], &[1]).unwrap()),
                ];
                for (k, (gg, q)) in st["GG"].as_array().unwrap().iter().zip(st["Q"].as_array().unwrap()).enumerate() {
                    if !gg.is_null() {
                        let n = (gg.as_array().unwrap().len() as f64).sqrt() as usize;
                        s.push((format!("GG{k}.w"), Tensor::from_vec(vals(gg), &[n, n]).unwrap()));
                        s.push((format!("Q{k}.w"), Tensor::from_vec(vals(q), &[n, n]).unwrap()));
                    }
                }
                std::fs::write(d.join("state-in.safetensors"), tensors_to_bytes(&s).unwrap()).unwrap();
                state_args = vec!["--state-in".to_string(), d.join("state-in.safetensors").display().to_string()];
            }
        }
        let grads = case["grads"].as_array().unwrap();
        for (t, g) in grads.iter().enumerate().skip(start) {
            input.push((format!("grad.{}.w", t - start), Tensor::from_vec(vals(g), &shape).unwrap()));
        }
        std::fs::write(d.join("in.safetensors"), tensors_to_bytes(&input).unwrap()).unwrap();
        let o = bin()
            .args(["parity", "optim", "--config"])
            .arg(d.join("hp.toml"))
            .arg("--input")
            .arg(d.join("in.safetensors"))
            .arg("--output")
            .arg(d.join("out.safetensors"))
            .arg("--state-out")
            .arg(d.join("state-out.safetensors"))
            .args(&state_args)
            .output()
            .unwrap();
        ok(&o);
        let out = tensors_from_bytes(&std::fs::read(d.join("out.safetensors")).unwrap()).unwrap();
        let after = case["after"].as_array().unwrap();
        for t in start..grads.len() {
            let got = out[&format!("param.{}.w", t - start)].to_vec::<f32>().unwrap();
            let want = vals(&after[t]);
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(worst <= 1e-5, "{}: step {}: max |Δp| {worst:e}", case["name"], t + 1);
        }
        let st = tensors_from_bytes(&std::fs::read(d.join("state-out.safetensors")).unwrap()).unwrap();
        assert!(st.contains_key("GG0.w") && st.contains_key("Q0.w") && st.contains_key("scalar.step"), "{:?}", st.keys());
    }
    // Bad input: one line, exit 2, naming the tensor or key.
    let run_bytes = |hp: &str, input: &[u8]| {
        std::fs::write(d.join("bad.toml"), hp).unwrap();
        std::fs::write(d.join("bad.safetensors"), input).unwrap();
        let o = bin()
            .args(["parity", "optim", "--config"])
            .arg(d.join("bad.toml"))
            .arg("--input")
            .arg(d.join("bad.safetensors"))
            .arg("--output")
            .arg(d.join("bad-out.safetensors"))
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(!d.join("bad-out.safetensors").exists());
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        err
    };
    let run = |hp: &str, tensors: Vec<(String, Tensor)>| run_bytes(hp, &tensors_to_bytes(&tensors).unwrap());
    let t = |v: &[f32], s: &[usize]| Tensor::from_vec(v.to_vec(), s).unwrap();
    let p = ("param.w".to_string(), t(&[1.0, 2.0], &[2]));
    let err =
        run("kind = \"soap\"\n", vec![p.clone(), ("grad.0.w".into(), t(&[1.0, 1.0], &[2])), ("grad.2.w".into(), t(&[1.0, 1.0], &[2]))]);
    assert!(err.contains("grad.1.w: missing"), "{err}");
    let err = run("kind = \"soap\"\n", vec![p.clone(), ("grad.0.w".into(), t(&[1.0, 1.0, 1.0], &[3]))]);
    assert!(err.contains("grad.0.w: shape [3], expected [2]"), "{err}");
    let err = run("kind = \"soap\"\nprecondition_frequncy = 3\n", vec![p, ("grad.0.w".into(), t(&[1.0, 1.0], &[2]))]);
    assert!(err.contains("optim.precondition_frequncy: unknown config key"), "{err}");
    // Not safetensors at all: the file named, once.
    let err = run_bytes("kind = \"soap\"\n", b"PK\x03\x04 not tensors");
    assert!(err.contains("bad.safetensors: not a valid safetensors file ("), "{err}");
    std::fs::remove_dir_all(&d).ok();
}

/// `dptrain parity optim` replays LAMB and LARS on the reference's gradients (several tensors
/// at once: the trust ratio is per tensor) and matches pytorch-optimizer after every step.
#[test]
fn parity_replay_matches_the_lamb_and_lars_references() {
    use dptrain_core::checkpoint::{tensors_from_bytes, tensors_to_bytes};
    use dptrain_core::Tensor;
    let fx: Value =
        serde_json::from_str(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/trust.json")).unwrap())
            .unwrap();
    let vals = |v: &Value| -> Vec<f32> { v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect() };
    let d = tmp("parity-trust");
    let mut kinds = vec![];
    for case in fx["cases"].as_array().unwrap().iter().filter(|c| ["lamb decay", "lars nesterov"].contains(&c["name"].as_str().unwrap())) {
        let kind = case["kind"].as_str().unwrap();
        kinds.push(kind);
        let mut hp = format!("kind = \"{kind}\"\n");
        for (k, v) in case["hp"].as_object().unwrap() {
            hp.push_str(&format!("{k} = {v}\n"));
        }
        std::fs::write(d.join("hp.toml"), &hp).unwrap();
        let shapes = case["shapes"].as_object().unwrap();
        let shape = |n: &str| -> Vec<usize> { shapes[n].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect() };
        let mut input = vec![];
        for n in shapes.keys() {
            input.push((format!("param.{n}"), Tensor::from_vec(vals(&case["p0"][n]), &shape(n)).unwrap()));
            for (t, g) in case["grads"].as_array().unwrap().iter().enumerate() {
                input.push((format!("grad.{t}.{n}"), Tensor::from_vec(vals(&g[n]), &shape(n)).unwrap()));
            }
        }
        std::fs::write(d.join("in.safetensors"), tensors_to_bytes(&input).unwrap()).unwrap();
        let o = bin()
            .args(["parity", "optim", "--config"])
            .arg(d.join("hp.toml"))
            .arg("--input")
            .arg(d.join("in.safetensors"))
            .arg("--output")
            .arg(d.join("out.safetensors"))
            .output()
            .unwrap();
        ok(&o);
        let out = tensors_from_bytes(&std::fs::read(d.join("out.safetensors")).unwrap()).unwrap();
        for (t, want) in case["after"].as_array().unwrap().iter().enumerate() {
            for n in shapes.keys() {
                let got = out[&format!("param.{t}.{n}")].to_vec::<f32>().unwrap();
                let worst = got.iter().zip(vals(&want[n])).map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0.0f32, f32::max);
                assert!(worst <= 1e-5, "{}: step {}: {n}: max |Δp| {worst:e}", case["name"], t + 1);
            }
        }
    }
    assert_eq!(kinds, ["lamb", "lars"]);
    std::fs::remove_dir_all(&d).ok();
}

/// The batch-size rules resolve the learning rates, steps and warmup from B/B0, print them,
/// save them in `[derived]`, and a resumed run applies them again to the same result.
#[test]
fn batch_size_rules_resolve_print_and_resume() {
    let d = tmp("batch-rules");
    let (a, b) = (d.join("a"), d.join("b"));
    // B = 8 (SMALL), B0 = 4: sqrt scaling ×√2; regime adaptation ×2 on 10 steps and on the
    // warmup of ceil(20 / 8) = 3 steps.
    let sets = [
        "optim.lr=1e-3",
        "schedule.final_lr=1e-4",
        "optim.lr_scaling=\"sqrt\"",
        "optim.base_batch=4",
        "train.regime_adaptation=true",
        "schedule.warmup_samples=20",
        "train.steps=10",
        "train.checkpoint_every=10",
        "train.eval_every=10",
    ];
    let o = train(&a, &sets, &[]);
    ok(&o);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("batch-size rules:") && out.contains("train.steps 10 → 20") && out.contains("warmup 3 → 6 steps"), "{out}");
    let cfg: toml::Table = std::fs::read_to_string(a.join("config.toml")).unwrap().parse().unwrap();
    let dv = cfg["derived"].as_table().unwrap();
    let lr = 1e-3 * 2f64.sqrt();
    assert!((dv["lr"].as_float().unwrap() - lr).abs() < 1e-15, "{dv:?}");
    assert!((dv["final_lr"].as_float().unwrap() - 1e-4 * 2f64.sqrt()).abs() < 1e-15, "{dv:?}");
    assert_eq!((dv["steps"].as_integer(), dv["warmup_steps"].as_integer()), (Some(20), Some(6)));
    // What was given is saved as given (a resume applies the rules again).
    assert_eq!(cfg["train"]["steps"].as_integer(), Some(10));
    assert!(cfg["schedule"].get("warmup_steps").is_none(), "warmup given in samples: no step count saved");
    let recs = records(&a);
    let train_recs: Vec<&Value> = recs.iter().filter(|r| r.get("loss").is_some()).collect();
    assert_eq!(train_recs.len(), 20);
    // Linear warmup reaches the scaled peak at step 6.
    let at = |s: u64| train_recs.iter().find(|r| r["step"] == s).unwrap()["lr"].as_f64().unwrap();
    assert!((at(6) - lr).abs() < 1e-9 && at(5) < lr && at(8) < lr, "lr at 5/6/8: {} {} {}", at(5), at(6), at(8));
    let o = bin().arg("train").arg("--resume").arg(a.join("checkpoints/step_0000010")).arg("--run-dir").arg(&b).output().unwrap();
    ok(&o);
    assert_eq!(values(&records(&a), 10), values(&records(&b), 10), "resumed run differs");
    bad("rules without base", &["optim.lr_scaling=\"linear\""], &[], "optim.base_batch: needed by optim.lr_scaling = \"linear\"");
    bad("regime without base", &["train.regime_adaptation=true"], &[], "optim.base_batch: needed by train.regime_adaptation");
    bad("two warmups", &["schedule.warmup_steps=5", "schedule.warmup_samples=40"], &[], "schedule.warmup_samples: give either");
    bad("scaling kind", &["optim.lr_scaling=\"cubic\""], &[], "optim.lr_scaling: expected one of none | linear | sqrt");
    std::fs::remove_dir_all(&d).ok();
}

/// A checkpoint written before `model.norm` existed (its config says `model.batch_norm = true`)
/// resumes as the batch-norm model it was, bitwise as the uninterrupted run.
#[test]
fn a_checkpoint_with_the_old_batch_norm_key_resumes() {
    let d = tmp("old-bn");
    let (a, b) = (d.join("a"), d.join("b"));
    let sets = [
        "model.kind=\"mlp\"",
        "model.widths=[16]",
        "model.norm=\"batch\"",
        "data.kind=\"synthetic-images\"",
        "data.samples=256",
        "data.val_samples=32",
        "optim.kind=\"sgd\"",
        "optim.lr=0.05",
        "train.steps=20",
        "train.checkpoint_every=10",
        "checkpoint.keep_last=5",
    ];
    ok(&train(&a, &sets, &[]));
    let ck = a.join("checkpoints/step_0000010/config.toml");
    let cfg = std::fs::read_to_string(&ck).unwrap();
    assert!(cfg.contains("norm = \"batch\"") && cfg.contains("ghost_batch = 128"), "{cfg}");
    let old: String = cfg
        .lines()
        .filter(|l| !l.starts_with("ghost_batch ="))
        .map(|l| if l == "norm = \"batch\"" { "batch_norm = true" } else { l })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&ck, old).unwrap();
    ok(&bin().arg("train").arg("--resume").arg(a.join("checkpoints/step_0000010")).arg("--run-dir").arg(&b).output().unwrap());
    assert_eq!(values(&records(&a), 10), values(&records(&b), 10));
    std::fs::remove_dir_all(&d).ok();
}

/// `dptrain coord-check`: μP's activations stay flat across widths (exit 0), the standard
/// parametrization's grow (exit 1, the readout among the failing modules), for gpt and mlp;
/// the table, the JSON and the PNG are written.
#[test]
fn coord_check_passes_for_mup_and_fails_for_the_standard_parametrization() {
    let d = tmp("coord");
    let mup = ["mup.enabled=true", "mup.base_width=64", "mup.zero_init_readout=true"];
    // The GPT at short context and batch: widths up to 1024 stay cheap, and the readout's first
    // Adam step is past the small-width regime where its noise still shrinks with width.
    let gpt = (["model.context=16", "train.global_batch=4", "mup.zero_init_query=true"], "128,256,512,1024", "lm_head");
    let mlp = (["model.kind=\"mlp\"", "data.kind=\"synthetic-images\"", "data.samples=256"], "64,128,256,512", "head");
    for (model, (sets, widths, readout)) in [("gpt", gpt), ("mlp", mlp)] {
        for with_mup in [true, false] {
            let out = d.join(format!("{model}-{with_mup}"));
            let mut c = bin();
            c.args(["coord-check", "--widths", widths, "--seeds", "2", "--out"]).arg(&out);
            for s in sets.iter().chain(if with_mup { &mup[..] } else { &[] }).filter(|s| with_mup || !s.starts_with("mup.")) {
                c.args(["--set", s]);
            }
            let o = c.output().unwrap();
            let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            let report: Value = serde_json::from_str(&std::fs::read_to_string(out.join("coord_check.json")).unwrap()).unwrap();
            assert_real_png(&out.join("coord_check.png"));
            let failing: Vec<&str> = report["failures"].as_array().unwrap().iter().map(|f| f[0].as_str().unwrap()).collect();
            if with_mup {
                assert!(o.status.success(), "{model} μP failed the check:\n{stdout}{stderr}");
                assert!(stdout.contains("PASS"), "{stdout}");
            } else {
                assert_eq!(o.status.code(), Some(1), "{model} SP passed the check:\n{stdout}{stderr}");
                assert!(failing.contains(&readout), "{model} SP: the readout {readout} is not among the failures {failing:?}");
                assert!(stderr.contains("coordinate check failed"), "{stderr}");
            }
        }
    }
    let o = bin().args(["coord-check", "--widths", "64"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--widths: at least two widths"));
    // Every width is checked before any trains. At --lr 1e30 the first width's loss is not
    // finite by its second step (the rate reaches the config as a float: it was written as 31
    // digits, an integer TOML refused); with a third width too large for memory, that width is
    // the error, at once, and nothing is written.
    let check = |widths: &str, out: &str, sets: &[&str]| {
        let mut c = bin();
        c.args(["coord-check", "--widths", widths, "--lr", "1e30", "--out"]).arg(d.join(out));
        for s in ["model.context=16", "train.global_batch=4"].iter().chain(sets) {
            c.args(["--set", s]);
        }
        let o = c.output().unwrap();
        (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned(), d.join(out).exists())
    };
    let (code, err, _) = check("64,128", "diverges", &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("width 64, seed 0, step 2: the loss is not finite"), "{err}");
    for (widths, sets, want) in [
        ("64,128,40000000", &[][..], "(d_model = 40000000, n_layers = 2"),
        ("64,128,130", &["model.n_heads=4"][..], "--widths: 130 is not divisible by model.n_heads = 4"),
    ] {
        let (code, err, written) = check(widths, "bad-width", sets);
        assert_eq!(code, Some(2), "{widths}: {err}");
        assert!(err.contains(want) && err.trim_end().lines().count() == 1, "{widths}: {err}");
        assert!(!written, "{widths}: wrote its output");
    }
    std::fs::remove_dir_all(&d).ok();
}

/// A PNG that decodes and is not blank: a fair share of non-white pixels, and data drawn —
/// coloured pixels (the series' palette), not only the grey mesh and black labels.
fn assert_real_png(p: &Path) {
    let img = image::open(p).unwrap_or_else(|e| panic!("{}: does not decode: {e}", p.display())).to_rgb8();
    let (w, h) = img.dimensions();
    assert!(w >= 300 && h >= 200, "{}: {w}×{h}", p.display());
    let non_white = img.pixels().filter(|px| px.0 != [255, 255, 255]).count();
    let colours: std::collections::HashSet<[u8; 3]> = img.pixels().map(|px| px.0).collect();
    assert!(
        non_white * 100 > (w * h) as usize && colours.len() > 8,
        "{}: looks blank ({non_white} non-white pixels, {} colours)",
        p.display(),
        colours.len()
    );
    let coloured = img.pixels().filter(|px| px.0.iter().max().unwrap() - px.0.iter().min().unwrap() > 60).count();
    assert!(coloured > 200, "{}: no data drawn ({coloured} coloured pixels)", p.display());
}

/// `dptrain report`: the run's curves and every probe family as PNGs that decode and are not
/// blank, and report.md with the final numbers; a directory without metrics is a one-line
/// exit-2 error.
#[test]
fn report_plots_a_run() {
    let d = tmp("report");
    let run = d.join("run");
    ok(&train(&run, &["train.steps=20", "train.eval_every=10"], &[]));
    let o = bin().arg("report").arg(&run).output().unwrap();
    ok(&o);
    for name in ["loss", "lr", "grad_norm", "probe_attn_logit_max", "probe_resid_rms", "probe_log_z", "probe_logit_mean"] {
        assert_real_png(&run.join(format!("{name}.png")));
    }
    let md = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(md.contains("final validation loss") && md.contains("`attn_logit_max/0`") && md.contains("![loss.png](loss.png)"), "{md}");
    // A run killed while writing a record (or one still running) leaves a last line without
    // its end: the report is of the records before it, and says so; a broken line elsewhere is
    // still an error.
    let metrics = run.join("metrics.jsonl");
    let whole = std::fs::read_to_string(&metrics).unwrap();
    std::fs::write(&metrics, format!("{whole}{{\"step\": 21, \"loss\": 4.1")).unwrap();
    let o = bin().arg("report").arg(&run).output().unwrap();
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    let n = whole.lines().count() + 1;
    assert!(err.contains(&format!("dptrain: warning: {}: line {n}: left out, cut off before its end", metrics.display())), "{err}");
    let md = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(md.contains("Last logged step: 20.") && md.contains(&format!("line {n}: left out")), "{md}");
    std::fs::write(&metrics, format!("{{\"step\": 1, \"loss\": 4.1\n{whole}")).unwrap();
    let o = bin().arg("report").arg(&run).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("metrics.jsonl: line 1: not JSON"));
    let o = bin().arg("report").arg(d.join("nope")).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("metrics.jsonl") && err.trim_end().lines().count() == 1, "{err}");
    std::fs::remove_dir_all(&d).ok();
}

/// `dptrain sweep`: every (variant, lr) point runs as its own child with its own run directory,
/// a diverged run counts at the loss at initialisation (every point evaluates at step 0), and
/// sweep.json's sensitivities follow the notes' definition from its own points.
#[test]
fn an_lr_sweep_runs_every_point_and_scores_sensitivity() {
    let d = tmp("sweep");
    let mut c = bin();
    c.args(["sweep", "--lr", "1e-2,1e-1,1e8", "--grid", "optim.momentum=0.0|0.9", "--out"]).arg(&d);
    for s in SMALL.iter().chain(SMALL_GPT).chain(&["optim.kind=\"sgd\"", "train.steps=12", "train.eval_every=6", "train.eval_samples=32"]) {
        c.args(["--set", s]);
    }
    let o = c.output().unwrap();
    ok(&o);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("sensitivity") && out.contains("diverged"), "{out}");
    let s: Value = serde_json::from_str(&std::fs::read_to_string(d.join("sweep.json")).unwrap()).unwrap();
    let points = s["points"].as_array().unwrap();
    assert_eq!(points.len(), 6);
    for p in points {
        assert!(Path::new(p["run_dir"].as_str().unwrap()).join("metrics.jsonl").exists());
        assert_eq!(p["diverged"].as_bool().unwrap(), p["lr"].as_f64().unwrap() > 1.0, "{p}");
        assert!(p["init_loss"].as_f64().unwrap() > 2.0, "{p}");
    }
    for v in s["variants"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        let mine: Vec<&Value> = points.iter().filter(|p| p["variant"] == name).collect();
        let l0 = mine[0]["init_loss"].as_f64().unwrap();
        let capped: Vec<f64> = mine.iter().map(|p| p["final_loss"].as_f64().map_or(l0, |l| l.min(l0))).collect();
        let best = capped.iter().copied().fold(f64::INFINITY, f64::min);
        let want = capped.iter().map(|l| l - best).sum::<f64>() / 3.0;
        assert!((v["lr_sensitivity"].as_f64().unwrap() - want).abs() < 1e-12, "{name}: {v}");
        assert!(want > 0.0);
    }
    assert_real_png(&d.join("sweep.png"));
    // --collect (after a --slurm array job) reads the same run directories back: the same
    // points, divergences and sensitivities, nothing trained.
    std::fs::remove_file(d.join("sweep.json")).unwrap();
    let mut c = bin();
    c.args(["sweep", "--lr", "1e-2,1e-1,1e8", "--grid", "optim.momentum=0.0|0.9", "--collect", "--out"]).arg(&d);
    let t0 = std::time::Instant::now();
    ok(&c.output().unwrap());
    assert!(t0.elapsed().as_secs_f64() < 5.0, "--collect trained something");
    let again: Value = serde_json::from_str(&std::fs::read_to_string(d.join("sweep.json")).unwrap()).unwrap();
    assert_eq!(again["variants"], s["variants"]);
    assert_eq!(again["points"], s["points"]);
    // A value only the grid's second variant gets wrong is the error before any point trains,
    // and nothing is written (the first variant's points used to run first); with --slurm, no
    // script either. Bad input only a point's run can see (more samples than the data has)
    // stops at the first point with the child's line, once.
    for slurm in [false, true] {
        let bad = d.join(format!("bad-grid-{slurm}"));
        let mut c = bin();
        c.args(["sweep", "--lr", "1e-2,1e-1", "--grid", "model.qk_norm=false|maybe", "--out"])
            .arg(&bad)
            .args(SMALL_GPT.iter().flat_map(|s| ["--set", s]));
        if slurm {
            c.arg("--slurm");
        }
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert_eq!(err.trim_end(), "dptrain: error: model.qk_norm: expected true or false, got \"maybe\"");
        assert!(!bad.exists(), "--slurm {slurm}: the sweep wrote {}", bad.display());
    }
    let o = bin()
        .args(["sweep", "--lr", "1e-2", "--set", "train.micro_batch=100000", "--set", "train.global_batch=100000", "--out"])
        .arg(d.join("too-few"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.starts_with("dptrain: error: train.micro_batch: 100000 × 1 ranks exceeds the") && err.trim_end().lines().count() == 1,
        "{err}"
    );
    std::fs::remove_dir_all(&d).ok();
}

fn probe(r: &Value, k: &str) -> f64 {
    r[k].as_f64().unwrap_or_else(|| panic!("no `{k}` in {r}"))
}

/// The probes: documented names, on probe steps only, each family behind its switch, and values
/// that agree with each other and with what one optimizer step must give.
#[test]
fn probes_are_logged_by_family_and_agree_with_each_other() {
    let d = tmp("probes");
    // One plain SGD step: every tensor moves by lr × its gradient, so its distance from the
    // initialisation is lr · grad_rms · √numel (d_model 32, 1 layer, 4 heads, vocab 16).
    let sgd = d.join("sgd");
    let base = ["train.steps=1", "optim.clip=0.0", "optim.weight_decay=0.0"];
    let mut sets = base.to_vec();
    sets.extend(["optim.kind=\"sgd\"", "optim.momentum=0.0", "optim.lr=0.1"]);
    ok(&train(&sgd, &sets, &[]));
    let r = records(&sgd).into_iter().find(|r| r.get("loss").is_some()).unwrap();
    let lr = probe(&r, "lr");
    let mut total = 0.0;
    for (name, numel) in [
        ("transformer.h.0.attn.c_attn.weight", 96 * 32),
        ("lm_head.weight", 16 * 32),
        ("transformer.wpe.weight", 16 * 32),
        ("transformer.ln_f.weight", 32),
    ] {
        let (dist, g) = (probe(&r, &format!("dist_init/{name}")), probe(&r, &format!("grad_rms/{name}")));
        let want = lr * g * (numel as f64).sqrt();
        // The change is taken in f32 from parameters of size up to 1 (norm gains): rounding of
        // up to half an ulp of 1 per element.
        let tol = 1e-5 * want + (numel as f64).sqrt() * 6e-8;
        assert!((dist - want).abs() <= tol, "{name}: distance {dist}, lr · grad_rms · √n = {want}");
        assert!(probe(&r, &format!("update_ratio/{name}")) > 0.0);
    }
    for (k, v) in r.as_object().unwrap() {
        if k.starts_with("dist_init/") {
            total += v.as_f64().unwrap().powi(2);
        }
    }
    assert!((probe(&r, "dist_init") - total.sqrt()).abs() <= 1e-9 * total.sqrt());
    // SGD has no Adam moments; one rank without accumulation has no second batch size.
    assert!(r.as_object().unwrap().keys().all(|k| !k.starts_with("adam_") && !k.starts_with("cbs_")), "{r}");
    for h in 0..4 {
        assert!(probe(&r, &format!("q_norm_max/0/{h}")) > 0.0 && probe(&r, &format!("k_norm_max/0/{h}")) > 0.0);
    }
    let (top, med) = (probe(&r, "massive_top1/0"), probe(&r, "massive_median/0"));
    assert!(top > med && (probe(&r, "massive_ratio/0") - top / med).abs() < 1e-9 * top / med);
    assert!((0.0..16.0).contains(&probe(&r, "massive_top1/0@token")) && (0.0..32.0).contains(&probe(&r, "massive_top1/0@channel")));
    assert!((0.0..=1.0).contains(&probe(&r, "mlp_sparsity/0")));
    assert!(probe(&r, "log_z_max") >= probe(&r, "log_z"));

    // One AdamW step: m̂ = g and v̂ = g², so the unscaled update is ±1 wherever g ≠ 0; nothing is
    // below ε = 1e-8 in a weight matrix, and everything is below ε = 10.
    let adam = d.join("adam");
    let mut sets = base.to_vec();
    sets.push("optim.kind=\"adamw\"");
    ok(&train(&adam, &sets, &[]));
    let r = records(&adam).into_iter().find(|r| r.get("loss").is_some()).unwrap();
    let w = "transformer.h.0.mlp.c_fc.weight";
    assert!((probe(&r, &format!("adam_update_rms/{w}")) - 1.0).abs() < 1e-3, "{r}");
    assert_eq!(probe(&r, &format!("adam_eps_frac/{w}")), 0.0);
    let big = d.join("adam-eps");
    let mut sets = base.to_vec();
    sets.extend(["optim.kind=\"adamw\"", "optim.eps=10.0"]);
    ok(&train(&big, &sets, &[]));
    let r = records(&big).into_iter().find(|r| r.get("loss").is_some()).unwrap();
    for (k, v) in r.as_object().unwrap() {
        if k.starts_with("adam_eps_frac/") {
            assert_eq!(v.as_f64(), Some(1.0), "{k}");
        }
    }

    // Every 2 steps (and the last), families off by switch; with accumulation the critical
    // batch from micro-batches.
    let some = d.join("some");
    ok(&train(
        &some,
        &[
            "train.steps=5",
            "train.micro_batch=4",
            "probes.interval=2",
            "probes.massive=false",
            "probes.grads=false",
            "probes.distance=false",
        ],
        &[],
    ));
    let recs: Vec<Value> = records(&some).into_iter().filter(|r| r.get("loss").is_some()).collect();
    assert_eq!(recs.len(), 5);
    for r in &recs {
        let step = r["step"].as_u64().unwrap();
        let keys: Vec<&String> = r.as_object().unwrap().keys().collect();
        let probed = step % 2 == 0 || step == 5;
        assert_eq!(r.get("attn_logit_max/0").is_some(), probed, "step {step}: {r}");
        assert_eq!(r.get("cbs_b_simple").is_some(), probed, "step {step}: {r}");
        assert!(keys.iter().all(|k| !k.starts_with("massive") && !k.starts_with("grad_rms") && !k.starts_with("dist_init")), "{r}");
        if probed {
            assert!(probe(r, "cbs_g2_small") > 0.0 && probe(r, "cbs_g2_big") > 0.0 && probe(r, "cbs_b_simple").is_finite());
        }
    }
    std::fs::remove_dir_all(&d).ok();
}

/// Alerts: a warning line and an `events.jsonl` record with the step; non-finite steps abort
/// (exit 1) or are skipped and counted, as `train.on_nonfinite` says; the report lists them.
#[test]
fn alerts_are_recorded_and_nonfinite_steps_abort_or_skip() {
    let d = tmp("alerts");
    let low = d.join("low");
    let o = train(&low, &["train.steps=4", "probes.interval=2", "probes.max_logit_warn=1e-6"], &[]);
    ok(&o);
    let events = |run: &Path| -> Vec<Value> {
        std::fs::read_to_string(run.join("events.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let ev = events(&low);
    assert_eq!(
        ev.iter().map(|e| (e["kind"].as_str().unwrap(), e["step"].as_u64().unwrap())).collect::<Vec<_>>(),
        [("max_logit", 2), ("max_logit", 4)]
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("warning: step 2: max attention logit of layer 0"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    ok(&bin().arg("report").arg(&low).output().unwrap());
    let md = std::fs::read_to_string(low.join("report.md")).unwrap();
    assert!(md.contains("\"kind\":\"max_logit\"") && md.contains("Distance from initialisation"), "{md}");

    // A learning rate that blows the run up: abort names the step; skip goes on and counts.
    let abort = d.join("abort");
    let o = train(&abort, &["train.steps=10", "optim.lr=1e8"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("training diverged") && err.contains("train.on_nonfinite"), "{err}");
    let last = events(&abort).pop().unwrap();
    assert_eq!((last["kind"].as_str(), last["skipped"].as_bool()), (Some("nonfinite"), Some(false)));
    let skip = d.join("skip");
    ok(&train(&skip, &["train.steps=10", "optim.lr=1e8", "train.on_nonfinite=\"skip\""], &[]));
    let skipped: Vec<Value> = events(&skip).into_iter().filter(|e| e["kind"] == "nonfinite").collect();
    assert!(!skipped.is_empty() && skipped.iter().all(|e| e["skipped"] == true));
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(skip.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["skipped_steps"].as_u64(), Some(skipped.len() as u64));
    std::fs::remove_dir_all(&d).ok();
}

/// qk-layernorm trains, its parameters are checkpointed, and a run with every probe family
/// on (probe steps between checkpoints, the critical-batch EMA and the spike detector carried
/// in the checkpoint) resumes bitwise.
#[test]
fn resume_is_bitwise_exact_gpt_qk_norm_with_every_probe() {
    resume_matches("resume-qk", &["model.qk_norm=true", "probes.interval=3", "train.micro_batch=4"]);
}

/// A skipped non-finite step leaves the parameters and the optimizer state untouched: the
/// checkpoints before and after it hold the same bytes, and training goes on from there.
/// Needs the `fault-injection` feature (scripts/test.sh turns it on): `--fault nan:0:4` turns
/// step 4's loss and gradients NaN.
#[cfg(feature = "fault-injection")]
#[test]
fn a_skipped_nonfinite_step_leaves_parameters_and_optimizer_state_untouched() {
    let d = tmp("skip-nan");
    let run = d.join("r");
    let sets = ["train.steps=6", "train.checkpoint_every=1", "checkpoint.keep_last=10", "train.on_nonfinite=\"skip\""];
    ok(&train(&run, &sets, &["--fault", "nan:0:4"]));
    let ck = |s: u64, f: &str| std::fs::read(run.join(format!("checkpoints/step_{s:07}/{f}"))).unwrap();
    assert!(ck(3, "model.safetensors") == ck(4, "model.safetensors"), "parameters changed on the skipped step");
    assert!(ck(3, "optimizer.safetensors") == ck(4, "optimizer.safetensors"), "optimizer state changed on the skipped step");
    let scalars = |s: u64| serde_json::from_slice::<Value>(&ck(s, "state.json")).unwrap()["optimizer_scalars"].clone();
    assert_eq!(scalars(3), scalars(4));
    assert!(ck(4, "model.safetensors") != ck(5, "model.safetensors"), "training did not go on");
    let recs: Vec<Value> = records(&run).into_iter().filter(|r| r.get("loss").is_some()).collect();
    assert!(recs[3]["loss"].is_null() && recs[4]["loss"].as_f64().unwrap().is_finite(), "{:?}", &recs[3..5]);
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["skipped_steps"], 1);
    let ev = std::fs::read_to_string(run.join("events.jsonl")).unwrap();
    assert!(ev.lines().count() == 1 && ev.contains("\"kind\":\"nonfinite\"") && ev.contains("\"step\":4"), "{ev}");
    std::fs::remove_dir_all(&d).ok();
}

/// A generated script with the machine-specific paths (the binary, the temp dir) as
/// placeholders, checked by shellcheck (scripts/setup.sh --tests installs it).
fn normalized_script(p: &Path, dir: &Path) -> String {
    let sc = Command::new("shellcheck").arg(p).output().expect("shellcheck is not installed: run `bash scripts/setup.sh --tests`");
    assert!(sc.status.success(), "shellcheck {}:\n{}", p.display(), String::from_utf8_lossy(&sc.stdout));
    std::fs::read_to_string(p).unwrap().replace(env!("CARGO_BIN_EXE_dptrain"), "@DPTRAIN@").replace(&dir.display().to_string(), "@DIR@")
}

fn golden(name: &str, got: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/slurm").join(name);
    let want = std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("missing fixture {}; the script was:\n{got}", path.display()));
    assert_eq!(got, want, "{name} differs from the fixture");
}

/// `dptrain slurm` and `dptrain sweep --slurm` write these scripts exactly (golden files), they
/// pass shellcheck, the config beside them is the checked config with the overrides, and bad
/// options are one-line errors with exit 2.
#[test]
fn slurm_scripts_match_their_golden_files() {
    let d = tmp("slurm");
    let o = bin()
        .current_dir(&d)
        .args(["slurm", "--nodes", "2", "--gpus-per-node", "8", "--time", "04:00:00", "--partition", "gpu", "--account", "proj"])
        .args(["--cpus-per-task", "12", "--script", "job/train.sbatch", "--set", "run.name=\"big\"", "--set", "optim.kind=\"lamb\""])
        .output()
        .unwrap();
    ok(&o);
    golden("gpu.sbatch", &normalized_script(&d.join("job/train.sbatch"), &d));
    let cfg = std::fs::read_to_string(d.join("job/big.toml")).unwrap();
    assert!(cfg.contains("kind = \"lamb\"") && cfg.contains("device = \"cuda\""), "{cfg}");
    assert!(d.join("runs").is_dir() && !d.join("runs/big").exists(), "the log directory must exist before sbatch; the run's must not");
    // To stdout, CPU tasks, PMI2.
    let o = bin().current_dir(&d).args(["slurm", "--ntasks-per-node", "2", "--mpi", "pmi2"]).output().unwrap();
    ok(&o);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("#SBATCH --ntasks-per-node=2") && text.contains("srun --mpi=pmi2 --kill-on-bad-exit=1") && !text.contains("gpus"),
        "{text}"
    );
    // The sweep's array job.
    let out = d.join("sweep");
    let o = bin()
        .args(["sweep", "--lr", "1e-3,1e-2", "--grid", "optim.kind=\"adamw\"|\"lamb\"", "--slurm", "--ntasks-per-node", "2", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    ok(&o);
    golden("sweep-cpu.sbatch", &normalized_script(&out.join("sweep.sbatch"), &d));
    for (args, want) in [
        (vec!["slurm", "--frobnicate"], "--frobnicate"),
        (vec!["slurm", "--mpi", "openmpi"], "--mpi openmpi"),
        (vec!["slurm", "--nodes", "0"], "--nodes 0"),
        (vec!["slurm", "--gpus-per-node", "8", "--ntasks-per-node", "2"], "give one"),
        (vec!["slurm", "--time", "4h"], "--time 4h"),
        (vec!["slurm", "--set", "optim.lr=-1"], "optim.lr"),
    ] {
        let o = bin().current_dir(&d).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want) && err.trim_end().lines().count() == 1, "{args:?}: {err}");
    }
    std::fs::remove_dir_all(&d).ok();
}

/// `dptrain launch`'s bad command lines: one line, exit 2, nothing started.
#[test]
fn launch_rejects_bad_command_lines() {
    for (args, want) in [
        (vec!["launch", "-n", "0", "--", "train"], "-n 0"),
        (vec!["launch", "-n", "2"], "no command after `--`"),
        (vec!["launch", "-n", "2", "--hosts", "a:x", "--", "train"], "--hosts a:x"),
        (vec!["launch", "-n", "9", "--hosts", "a:4,b:4", "--", "train"], "8 slots for -n 9"),
        (vec!["launch", "-n", "2", "--", "report", "x"], "`report` after `--`"),
        (vec!["launch", "-n", "100000", "--", "train"], "-n 100000: more than 16 ranks per core"),
    ] {
        let o = bin().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want) && err.trim_end().lines().count() == 1, "{args:?}: {err}");
    }
}

/// An mpirun stopped by launch's SIGTERM while it was still starting ranks (Open MPI's, at
/// `-n 100000`) left a fork of itself behind, reparented to init and holding the output pipes:
/// launch waited on them forever. A stand-in mpirun does the same here, on SIGTERM or on the
/// SIGUSR1 launch forwards to an Open MPI mpirun (its fork also ignores SIGTERM); launch must
/// exit with 128 + 15 within its grace period and take the fork with it.
/// The stand-in writes its fork's pid itself before it exits: the fork may be killed before it
/// runs a command of its own (it did, once, on a loaded machine).
#[test]
fn launch_stopped_ends_what_mpirun_left_holding_its_output() {
    let d = tmp("launch-fork");
    let fake = d.join("bin");
    std::fs::create_dir_all(&fake).unwrap();
    let script = "#!/bin/sh\n\
        if [ \"$1\" = \"--version\" ]; then echo 'mpirun (Open MPI) 4.1.4'; exit 0; fi\n\
        trap 'sh -c \"trap \\\"\\\" TERM; exec sleep 300\" & echo $! > $FORK_PID_FILE; exit 143' TERM USR1\n\
        echo started\n\
        while :; do sleep 1; done\n";
    let mpirun = fake.join("mpirun");
    std::fs::write(&mpirun, script).unwrap();
    std::fs::set_permissions(&mpirun, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let fork_file = d.join("fork.pid");
    let path = format!("{}:{}", fake.display(), std::env::var("PATH").unwrap_or_default());
    let mut child = bin()
        .args(["launch", "-n", "2", "--grace", "2", "--", "train"])
        .env("PATH", path)
        .env("FORK_PID_FILE", &fork_file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    // The command line, then the stand-in's first line: it is running and has set its trap.
    while !line.contains("started") {
        line.clear();
        assert!(std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0, "launch ended before mpirun started");
    }
    // SAFETY: kill(2) on this test's own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed().as_secs() > 30 {
            let _ = child.kill();
            let fork = std::fs::read_to_string(&fork_file).unwrap_or_default();
            if let Ok(p) = fork.trim().parse::<i32>() {
                // SAFETY: kill(2) on the stand-in's fork, so that a failing test leaves nothing.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            panic!("launch still waiting 30 s after SIGTERM");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(143));
    let fork: u32 = std::fs::read_to_string(&fork_file).unwrap().trim().parse().unwrap();
    // Gone, or a zombie waiting for init to reap it.
    let stat = std::fs::read_to_string(format!("/proc/{fork}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(')').map(|(_, r)| r.trim_start().chars().next().unwrap_or('Z')).unwrap_or('Z');
    assert_eq!(state, 'Z', "the fork {fork} is still alive: {stat}");
    std::fs::remove_dir_all(&d).ok();
}

/// `dptrain env` says what the trainer would find: the MPI library, the launcher's variables
/// and the world they resolve to, CUDA, the CUDA libraries, threads.
#[test]
fn env_reports_mpi_the_world_cuda_and_threads() {
    let o = bin().arg("env").env_remove("OMPI_COMM_WORLD_SIZE").output().unwrap();
    ok(&o);
    let out = String::from_utf8_lossy(&o.stdout);
    for want in ["MPI: Open MPI", "world: a world of one", "CUDA: ", "NVRTC: ", "cuBLAS: ", "cuSOLVER: ", "NCCL: ", "threads: ", "memory: "]
    {
        assert!(out.contains(want), "{want} not in:\n{out}");
    }
    // text a pipe into grep reads as text (the MPI library's version came with its C NUL)
    assert!(!o.stdout.iter().any(|&b| b == 0 || (b < 0x20 && b != b'\n')), "{:?}", out);
    // the kernel cache: where it is and what it holds, or that it is off
    let kc = std::env::temp_dir().join(format!("dptrain-env-kcache-{}", std::process::id()));
    let kernel_cache = |v: &std::path::Path| {
        let o = bin().arg("env").env("DPTRAIN_KERNEL_CACHE", v).output().unwrap();
        String::from_utf8_lossy(&o.stdout).lines().find(|l| l.starts_with("kernel cache: ")).unwrap_or("").to_string()
    };
    assert!(kernel_cache(&kc).ends_with("(empty: the first run on a GPU fills it)"));
    std::fs::create_dir_all(&kc).unwrap();
    for f in ["flash-sm_90-0123456789abcdef.cubin", "optim-sm_90-0123456789abcdef.cubin", ".optim-sm_90-0123456789abcdef.cubin.12.tmp"] {
        std::fs::write(kc.join(f), b"").unwrap();
    }
    assert_eq!(kernel_cache(&kc), format!("kernel cache: {} (2 entries)", kc.display()));
    assert!(kernel_cache(std::path::Path::new("0")).starts_with("kernel cache: off"));
    std::fs::remove_dir_all(&kc).unwrap();
    let o = bin()
        .arg("env")
        .env("OMPI_COMM_WORLD_RANK", "3")
        .env("OMPI_COMM_WORLD_SIZE", "8")
        .env("OMPI_COMM_WORLD_LOCAL_RANK", "1")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("OMPI_COMM_WORLD_RANK=3") && out.contains("world: rank 3 of 8, local rank 1; MPI will be initialised"), "{out}");
}
