//! Multi-process data parallelism for real: `mpirun -np 2 dptrain train ...` (Open MPI).
//! Needs `mpirun` on PATH (scripts/test.sh installs Open MPI); set DPTRAIN_SKIP_MPI_TESTS=1 to
//! skip on a machine without it.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const SMALL: &[&str] = &[
    "model.d_model=32",
    "model.n_layers=1",
    "model.context=16",
    "data.vocab=16",
    "data.train_tokens=20000",
    "data.val_tokens=4000",
    "train.eval_samples=16",
    "run.log_every=1",
    "run.threads=1",
    "train.eval_every=0",
    // No biases: the key bias of attention gets an exactly-zero gradient (softmax ignores it),
    // so AdamW would amplify pure rounding noise there and no two reduction orders agree.
    "model.bias=false",
];

fn skip() -> bool {
    if std::env::var("DPTRAIN_SKIP_MPI_TESTS").as_deref() == Ok("1") {
        eprintln!("skipping MPI tests (DPTRAIN_SKIP_MPI_TESTS=1)");
        return true;
    }
    false
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dptrain-mpi-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn args(run_dir: &Path, sets: &[&str]) -> Vec<String> {
    let mut a = vec!["train".to_string(), "--run-dir".into(), run_dir.display().to_string()];
    for s in SMALL.iter().chain(sets) {
        a.push("--set".into());
        a.push(s.to_string());
    }
    a
}

fn mpirun(np: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "--bind-to", "none", "-np", &np.to_string()])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("DPTRAIN_LOG", "error");
    c
}

fn single(run_dir: &Path, sets: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dptrain")).args(args(run_dir, sets)).env("DPTRAIN_LOG", "error").output().unwrap()
}

fn multi(np: usize, run_dir: &Path, sets: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = mpirun(np);
    c.arg(env!("CARGO_BIN_EXE_dptrain")).args(args(run_dir, sets));
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("mpirun (install Open MPI: apt-get install openmpi-bin libopenmpi-dev)")
}

/// `multi` with extra command-line arguments (the fault-injection flag of test builds).
#[cfg(feature = "fault-injection")]
fn multi_args(np: usize, run_dir: &Path, sets: &[&str], extra: &[&str]) -> Output {
    let mut c = mpirun(np);
    c.arg(env!("CARGO_BIN_EXE_dptrain")).args(args(run_dir, sets)).args(extra);
    c.output().expect("mpirun (install Open MPI: apt-get install openmpi-bin libopenmpi-dev)")
}

fn ok(o: &Output) {
    assert!(o.status.success(), "failed: {}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
}

fn losses(run_dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["loss"].as_f64())
        .collect()
}

fn params(run_dir: &Path, step: u64) -> std::collections::HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(run_dir.join(format!("checkpoints/step_{step:07}/model.safetensors"))).unwrap();
    dptrain_core::checkpoint::tensors_from_bytes(&bytes).unwrap().into_iter().map(|(k, v)| (k, v.to_vec::<f32>().unwrap())).collect()
}

fn assert_equivalent(name: &str, a: &Path, b: &Path, steps: u64) {
    let (la, lb) = (losses(a), losses(b));
    assert_eq!(la.len(), steps as usize);
    for (i, (x, y)) in la.iter().zip(&lb).enumerate() {
        assert!((x - y).abs() <= 1e-4 * (1.0 + x.abs()), "{name}: loss at step {} differs: {x} vs {y}", i + 1);
    }
    let (pa, pb) = (params(a, steps), params(b, steps));
    for (k, va) in &pa {
        let vb = &pb[k];
        let diff: f64 = va.iter().zip(vb).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = va.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        assert!(diff <= 1e-5 * norm.max(1e-6), "{name}: {k}: relative difference {:e}", diff / norm);
    }
}

#[test]
fn two_ranks_match_one_rank_sgd_and_adamw() {
    if skip() {
        return;
    }
    for opt in ["sgd", "adamw"] {
        let d = tmp(&format!("eq-{opt}"));
        let kind = format!("optim.kind=\"{opt}\"");
        let sets = ["train.steps=20", "train.global_batch=16", "optim.lr=0.01", kind.as_str()];
        ok(&single(&d.join("one"), &sets));
        let o = multi(2, &d.join("two"), &sets, &[]);
        ok(&o);
        assert!(String::from_utf8_lossy(&o.stdout).contains("world of 2 ranks"), "{}", String::from_utf8_lossy(&o.stdout));
        assert_equivalent(opt, &d.join("one"), &d.join("two"), 20);
        // Overlap off gives the same result as overlap on.
        let mut s2 = sets.to_vec();
        s2.push("comm.overlap=false");
        ok(&multi(2, &d.join("two-no-overlap"), &s2, &[]));
        assert_equivalent("overlap off", &d.join("two"), &d.join("two-no-overlap"), 20);
        std::fs::remove_dir_all(&d).ok();
    }
}

/// `comm.dtype = "bf16"`: gradients cross the wire as bf16 (summed by an MPI user operation),
/// so two ranks track one f32 rank to bf16 precision — close, but not bit-equal.
#[test]
fn bf16_gradient_all_reduce_tracks_f32() {
    if skip() {
        return;
    }
    let d = tmp("bf16-comm");
    let sets = ["train.steps=20", "train.global_batch=16", "optim.kind=\"sgd\"", "optim.lr=0.01"];
    ok(&single(&d.join("one"), &sets));
    let mut s2 = sets.to_vec();
    s2.push("comm.dtype=\"bf16\"");
    ok(&multi(2, &d.join("two"), &s2, &[]));
    let (la, lb) = (losses(&d.join("one")), losses(&d.join("two")));
    assert_eq!(la.len(), 20);
    for (x, y) in la.iter().zip(&lb) {
        assert!((x - y).abs() <= 1e-2 * x.abs(), "loss {x} (f32) vs {y} (bf16 all-reduce)");
    }
    let (pa, pb) = (params(&d.join("one"), 20), params(&d.join("two"), 20));
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (k, va) in &pa {
        for (x, y) in va.iter().zip(&pb[k]) {
            diff += ((x - y) as f64).powi(2);
            norm += (*x as f64).powi(2);
        }
    }
    let rel = (diff / norm).sqrt();
    assert!(rel > 1e-7 && rel < 1e-2, "relative parameter difference {rel:e}: bf16 communication should perturb, slightly");
    std::fs::remove_dir_all(&d).ok();
}

/// Two ranks on (emulated) GPUs: the NCCL reducer's bucket logic, bf16 staging and the
/// trainer's multi-GPU wiring, with the emulator's host collectives standing in for NCCL
/// (test builds with `cuda-emu`). Same trajectory as one CPU rank with the whole batch.
#[cfg(feature = "cuda-emu")]
#[test]
fn two_emulated_gpus_match_one_cpu_rank() {
    if skip() {
        return;
    }
    let d = tmp("emu-gpus");
    let sets = ["train.steps=6", "train.global_batch=16", "optim.lr=0.01", "comm.bucket_mb=0.01"];
    ok(&single(&d.join("one"), &sets));
    let env = [("DPTRAIN_CUDA_EMULATOR", "1")];
    let mut s2 = sets.to_vec();
    s2.push("run.device=\"cuda\"");
    ok(&multi(2, &d.join("two"), &s2, &env));
    assert_equivalent("emulated gpus", &d.join("one"), &d.join("two"), 6);
    s2.push("comm.overlap=false");
    ok(&multi(2, &d.join("two-no-overlap"), &s2, &env));
    assert_equivalent("emulated gpus, overlap off", &d.join("one"), &d.join("two-no-overlap"), 6);
    s2.pop();
    s2.push("comm.dtype=\"bf16\"");
    ok(&multi(2, &d.join("two-bf16"), &s2, &env));
    for (x, y) in losses(&d.join("one")).iter().zip(&losses(&d.join("two-bf16"))) {
        assert!((x - y).abs() <= 1e-2 * x.abs(), "{x} vs {y} with bf16 gradients");
    }
    std::fs::remove_dir_all(&d).ok();
}

/// `train.cuda_graph` on two (emulated) GPUs: the gradient all-reduces are part of the captured
/// step (the emulator records its host collective as an operation of the stream, as a GPU's
/// capture records NCCL's kernels), and each replay averages that step's gradients. Two
/// micro-steps, dropout, a logging step between replays, small buckets launched during backward
/// and staged as bf16 (casts on the communication stream): the same checkpoints and metrics as
/// the run without the graph, byte for byte. (With the reductions left out of the graph, the
/// ranks' parameters drift apart and differ from the eager run's.) AdamW, and SOAP with its
/// refreshes split between the ranks (owner mode: each rank computes half the bases and
/// broadcasts them at the refresh steps, 4 and 7, which run eagerly between the replays of 5
/// and 6).
#[cfg(feature = "cuda-emu")]
#[test]
fn a_cuda_graph_of_the_step_holds_the_all_reduces_on_two_emulated_gpus() {
    if skip() {
        return;
    }
    let d = tmp("emu-graph");
    let env = [("DPTRAIN_CUDA_EMULATOR", "1")];
    let optimizers: [(&str, &[&str], u32); 2] = [
        ("adamw", &["optim.kind=\"adamw\"", "train.steps=6", "run.log_every=4"], 2),
        (
            "soap",
            &["optim.kind=\"soap\"", "optim.distribute=\"owner\"", "optim.precondition_frequency=3", "train.steps=8", "run.log_every=8"],
            3,
        ),
    ];
    for (name, opt, captured) in optimizers {
        let run = |graph: bool| {
            let dir = d.join(format!("{name}-graph-{graph}"));
            let common = [
                "run.device=\"cuda\"",
                "train.precision=\"bf16\"",
                "train.global_batch=16",
                "train.micro_batch=4",
                "model.dropout=0.1",
                "comm.bucket_mb=0.01",
                "comm.dtype=\"bf16\"",
                if graph { "train.cuda_graph=true" } else { "train.cuda_graph=false" },
            ];
            let sets: Vec<&str> = common.iter().chain(opt).copied().collect();
            let o = multi(2, &dir, &sets, &env);
            ok(&o);
            (dir, String::from_utf8_lossy(&o.stderr).to_string())
        };
        let ((graph, err), (eager, _)) = (run(true), run(false));
        assert_eq!(err.matches("the training step runs as a CUDA graph (").count(), 1, "{name}: {err}");
        assert!(err.contains(&format!("dptrain: step {captured}: the training step runs as a CUDA graph (")), "{name}: {err}");
        let last = std::fs::read_dir(graph.join("checkpoints")).unwrap().map(|e| e.unwrap().file_name()).max().unwrap();
        let ck = |r: &Path, f: &str| std::fs::read(r.join("checkpoints").join(&last).join(f)).unwrap();
        assert!(ck(&graph, "model.safetensors") == ck(&eager, "model.safetensors"), "{name}: parameters differ");
        assert!(ck(&graph, "optimizer.safetensors") == ck(&eager, "optimizer.safetensors"), "{name}: optimizer state differs");
        assert_eq!(losses(&graph), losses(&eager), "{name}");
    }
    assert_eq!(losses(&d.join("adamw-graph-true")).len(), 2, "steps 4 and 6 log");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn accumulation_two_ranks_by_two_matches_one_rank_by_four() {
    if skip() {
        return;
    }
    let d = tmp("accum");
    let sets = ["train.steps=12", "train.global_batch=16", "train.micro_batch=4", "optim.lr=0.01", "comm.bucket_mb=0.01"];
    ok(&single(&d.join("one"), &sets));
    let o = multi(2, &d.join("two"), &sets, &[]);
    ok(&o);
    let cfg = std::fs::read_to_string(d.join("two/config.toml")).unwrap();
    assert!(cfg.contains("accum_steps = 2") && cfg.contains("world_size = 2"), "{cfg}");
    assert!(std::fs::read_to_string(d.join("one/config.toml")).unwrap().contains("accum_steps = 4"));
    assert_equivalent("accumulation", &d.join("one"), &d.join("two"), 12);
    // The critical batch on probe steps (10 and the last): from each rank's own gradient
    // before the all-reduce (two ranks, B_small 8) or from micro-batches (one rank, B_small 4);
    // |G_big|² is the averaged gradient's, the logged norm before clipping.
    for run in ["one", "two"] {
        let recs: Vec<Value> = std::fs::read_to_string(d.join(run).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|r| r.get("cbs_b_simple").is_some())
            .collect();
        assert_eq!(recs.iter().map(|r| r["step"].as_u64().unwrap()).collect::<Vec<_>>(), [10, 12], "{run}");
        for r in &recs {
            let (big, gn, small) =
                (r["cbs_g2_big"].as_f64().unwrap(), r["grad_norm"].as_f64().unwrap(), r["cbs_g2_small"].as_f64().unwrap());
            assert!((big - gn * gn).abs() <= 1e-6 * big, "{run}: {r}");
            assert!(small > 0.0 && r["cbs_b_simple"].as_f64().unwrap().is_finite(), "{run}: {r}");
            // Where the largest activation is: a position and a channel of the model.
            let (tok, ch) = (r["massive_top1/0@token"].as_f64().unwrap(), r["massive_top1/0@channel"].as_f64().unwrap());
            assert!((0.0..16.0).contains(&tok) && (0.0..32.0).contains(&ch) && tok.fract() == 0.0, "{run}: {r}");
        }
    }
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn resume_on_two_ranks_is_exact() {
    if skip() {
        return;
    }
    let d = tmp("resume");
    let sets = ["train.steps=20", "train.global_batch=16", "train.checkpoint_every=10", "checkpoint.keep_last=5"];
    ok(&multi(2, &d.join("a"), &sets, &[]));
    let mut c = mpirun(2);
    c.arg(env!("CARGO_BIN_EXE_dptrain"))
        .args(["train", "--resume"])
        .arg(d.join("a/checkpoints/step_0000010"))
        .arg("--run-dir")
        .arg(d.join("b"));
    ok(&c.output().unwrap());
    let (la, lb) = (losses(&d.join("a")), losses(&d.join("b")));
    assert_eq!(la[10..], lb[..], "resumed 2-rank run differs");
    // A 2-rank checkpoint resumes on 1 rank (same global batch): same trajectory up to rounding.
    let o = Command::new(env!("CARGO_BIN_EXE_dptrain"))
        .args(["train", "--resume"])
        .arg(d.join("a/checkpoints/step_0000010"))
        .arg("--run-dir")
        .arg(d.join("c"))
        .output()
        .unwrap();
    ok(&o);
    let lc = losses(&d.join("c"));
    for (x, y) in la[10..].iter().zip(&lc) {
        assert!((x - y).abs() < 1e-4, "{x} vs {y}");
    }
    std::fs::remove_dir_all(&d).ok();
}

/// A signal that reaches one rank only (SIGUSR1, as `#SBATCH --signal` or Open MPI's mpirun
/// deliver it) stops both at the same step: one checkpoint there, said once, and the run
/// resumed from it on two ranks continues bitwise as one never stopped.
#[test]
fn a_signal_to_one_rank_stops_both_at_one_checkpoint() {
    if skip() {
        return;
    }
    let d = tmp("stop");
    let same = ["train.global_batch=16", "schedule.kind=\"constant\"", "schedule.warmup_steps=0"];
    let mut c = mpirun(2);
    c.arg(env!("CARGO_BIN_EXE_dptrain")).args(args(&d.join("b"), &same.iter().copied().chain(["train.steps=1000000"]).collect::<Vec<_>>()));
    let child = c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    let rank1 = loop {
        let ranks = dptrain_launcher::launch::descendants(child.id());
        let one = ranks.into_iter().find(|p| {
            std::fs::read(format!("/proc/{p}/environ")).is_ok_and(|e| e.split(|&b| b == 0).any(|v| v == b"OMPI_COMM_WORLD_RANK=1"))
        });
        let started = std::fs::read_to_string(d.join("b/metrics.jsonl")).is_ok_and(|m| m.lines().count() >= 3);
        if let (Some(p), true) = (one, started) {
            break p;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the ranks did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    // SAFETY: kill(2) on a rank of this test's own job.
    unsafe { libc::kill(rank1 as i32, libc::SIGUSR1) };
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    let said: Vec<&str> = err.lines().filter(|l| l.starts_with("dptrain: stopped by SIGUSR1 after step ")).collect();
    assert_eq!(said.len(), 1, "{err}");
    let n: u64 = said[0]["dptrain: stopped by SIGUSR1 after step ".len()..].split(' ').next().unwrap().parse().unwrap();
    let ckpts: Vec<_> = std::fs::read_dir(d.join("b/checkpoints")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(ckpts, [std::ffi::OsString::from(format!("step_{n:07}"))], "{err}");
    let to = format!("train.steps={}", n + 3);
    ok(&multi(2, &d.join("a"), &same.iter().copied().chain([to.as_str()]).collect::<Vec<_>>(), &[]));
    let mut c = mpirun(2);
    c.arg(env!("CARGO_BIN_EXE_dptrain")).args(["train", "--set", &to, "--resume"]).arg(d.join("b"));
    ok(&c.output().unwrap());
    let (a, b) = (values_of(&d.join("a")), values_of(&d.join("b")));
    assert_eq!(b.len(), n as usize + 3 + 1);
    assert!(a == b, "the stopped and resumed 2-rank run differs from the one never stopped");
    std::fs::remove_dir_all(&d).ok();
}

/// Random windows and dropout masks are keyed by rank as well as step: two ranks resume them
/// exactly, and evaluation split over the two ranks scores the same samples as one rank.
#[test]
fn random_windows_and_dropout_resume_exactly_on_two_ranks() {
    if skip() {
        return;
    }
    let d = tmp("random-windows");
    let sets = [
        "train.steps=12",
        "train.global_batch=16",
        "train.checkpoint_every=6",
        "checkpoint.keep_last=5",
        "data.windows=\"random\"",
        "model.dropout=0.1",
        "train.eval_every=6",
    ];
    ok(&multi(2, &d.join("a"), &sets, &[]));
    let mut c = mpirun(2);
    c.arg(env!("CARGO_BIN_EXE_dptrain"))
        .args(["train", "--resume"])
        .arg(d.join("a/checkpoints/step_0000006"))
        .arg("--run-dir")
        .arg(d.join("b"));
    ok(&c.output().unwrap());
    let (la, lb) = (losses(&d.join("a")), losses(&d.join("b")));
    assert_eq!(la[6..], lb[..], "resumed 2-rank run differs");
    // The step-6 checkpoint evaluated by one rank: the same validation loss up to the f32
    // all-reduce of the two ranks' sums.
    let val = |dir: &Path| -> Vec<f64> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["val_loss"].as_f64())
            .collect()
    };
    let one = d.join("one");
    let o = Command::new(env!("CARGO_BIN_EXE_dptrain"))
        .args(["train", "--set", "optim.lr=1e-30", "--set", "schedule.final_lr=0", "--set", "train.steps=7", "--resume"])
        .arg(d.join("a/checkpoints/step_0000006"))
        .arg("--run-dir")
        .arg(&one)
        .output()
        .unwrap();
    ok(&o);
    let (two_ranks, one_rank) = (val(&d.join("a"))[0], *val(&one).last().unwrap());
    assert!((two_ranks - one_rank).abs() < 1e-4, "2-rank val {two_ranks} vs 1-rank {one_rank}");
    std::fs::remove_dir_all(&d).ok();
}

/// Needs the `fault-injection` feature (scripts/test.sh turns it on).
#[cfg(feature = "fault-injection")]
#[test]
fn a_killed_rank_ends_the_job() {
    if skip() {
        return;
    }
    let d = tmp("kill");
    let t = Instant::now();
    let o = multi_args(2, &d.join("r"), &["train.steps=200", "comm.timeout_s=5"], &["--fault", "kill:1:5"]);
    let dt = t.elapsed();
    assert!(!o.status.success(), "job must fail when a rank is killed");
    assert!(dt < Duration::from_secs(5 + 15), "job took {dt:?} to end");
    std::fs::remove_dir_all(&d).ok();
}

/// Needs the `fault-injection` feature (scripts/test.sh turns it on).
#[cfg(feature = "fault-injection")]
#[test]
fn a_hung_rank_trips_the_watchdog_naming_the_collective() {
    if skip() {
        return;
    }
    let d = tmp("hang");
    let t = Instant::now();
    let o = multi_args(2, &d.join("r"), &["train.steps=200", "comm.timeout_s=3"], &["--fault", "hang:1:5"]);
    let dt = t.elapsed();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("watchdog: collective all_reduce #") && err.contains("rank 0"), "{err}");
    assert!(dt < Duration::from_secs(3 + 15), "job took {dt:?} to end");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn mismatched_config_across_ranks_is_a_clear_error_at_start() {
    if skip() {
        return;
    }
    let d = tmp("mismatch");
    let run = d.join("r");
    let mut c = mpirun(1);
    c.arg(env!("CARGO_BIN_EXE_dptrain")).args(args(&run, &["train.steps=5"]));
    c.args([":", "-np", "1"]).arg(env!("CARGO_BIN_EXE_dptrain")).args(args(&run, &["train.steps=5", "model.d_model=48"]));
    let t = Instant::now();
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("differs from rank 0's") && err.contains("d_model = 48") && err.contains("d_model = 32"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(30));
    assert!(!run.join("metrics.jsonl").exists(), "no training happened");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn an_input_error_on_one_rank_is_reported_by_all() {
    if skip() {
        return;
    }
    let d = tmp("one-bad");
    let run = d.join("r");
    let mut c = mpirun(1);
    c.arg(env!("CARGO_BIN_EXE_dptrain")).args(args(&run, &["train.steps=5", "train.global_batch=16"]));
    c.args([":", "-np", "1"]).arg(env!("CARGO_BIN_EXE_dptrain")).args(args(&run, &["train.steps=5", "train.global_batch=15"]));
    let t = Instant::now();
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("rank 1: train.global_batch: 15 is not divisible"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(30));
    std::fs::remove_dir_all(&d).ok();
}

/// SOAP with each parameter's eigenbasis computed by one rank and broadcast (`owner`, the
/// default on several ranks) gives bitwise the same run as every rank computing every basis
/// (`replicated`), and the parameter checksum, compared every 5 steps, stays quiet: the broadcast
/// bases keep the replicas identical. Against one rank at the same global batch the losses agree
/// to 5e-3 relative, not to 1e-5: SOAP's first updates are sign-like in an eigenbasis whose
/// clustered eigenvectors turn with last-bit changes of the gradient, so a 2-rank average (or one
/// rank accumulating 2 × 8 instead of 16 samples) drifts to ~1e-3 within 30 steps.
#[test]
fn soap_owner_mode_on_two_ranks_matches_replicated_and_tracks_one_rank() {
    if skip() {
        return;
    }
    let d = tmp("soap-owner");
    let sets = ["train.steps=30", "train.global_batch=16", "optim.kind=\"soap\"", "optim.precondition_frequency=3", "comm.check_every=5"];
    ok(&single(&d.join("one"), &sets));
    let o = multi(2, &d.join("owner"), &sets, &[]);
    ok(&o);
    let mut rep = sets.to_vec();
    rep.push("optim.distribute=\"replicated\"");
    ok(&multi(2, &d.join("replicated"), &rep, &[]));
    assert_eq!(losses(&d.join("owner")), losses(&d.join("replicated")), "owner and replicated losses differ");
    assert_eq!(params(&d.join("owner"), 30), params(&d.join("replicated"), 30), "owner and replicated parameters differ");
    let (l1, l2) = (losses(&d.join("one")), losses(&d.join("owner")));
    assert_eq!(l1.len(), 30);
    for (i, (x, y)) in l1.iter().zip(&l2).enumerate() {
        assert!((x - y).abs() <= 5e-3 * x.abs(), "step {}: loss {x} (1 rank) vs {y} (2 ranks, owner)", i + 1);
    }
    let cfg = std::fs::read_to_string(d.join("owner/config.toml")).unwrap();
    assert!(cfg.contains("kind = \"soap\"") && cfg.contains("betas = [0.95, 0.95]"), "{cfg}");
    std::fs::remove_dir_all(&d).ok();
}

/// `mpirun -np 2` trains a ResNet with Ghost BN, and the running statistics it evaluates with
/// and saves are the ranks' average: each rank's own statistics (written by test builds just
/// before averaging) differ, and every saved `running_mean` / `running_var` equals their mean.
/// Needs the `fault-injection` feature (the test hook).
#[cfg(feature = "fault-injection")]
#[test]
fn ghost_batch_norm_on_two_ranks_saves_the_ranks_average_statistics() {
    if skip() {
        return;
    }
    let d = tmp("ghost");
    let dumps = d.join("dumps");
    std::fs::create_dir_all(&dumps).unwrap();
    let run = d.join("run");
    let sets = [
        "model.kind=\"resnet\"",
        "model.width=4",
        "model.norm=\"ghost\"",
        "model.ghost_batch=4",
        "data.kind=\"synthetic-images\"",
        "data.samples=512",
        "data.val_samples=64",
        "train.global_batch=16",
        "train.steps=100",
        "train.eval_every=50",
        "train.checkpoint_every=50",
        "schedule.warmup_steps=5",
        "optim.kind=\"sgd\"",
        "optim.lr=0.1",
        "run.log_every=1",
        "run.threads=1",
    ];
    let mut c = mpirun(2);
    c.arg(env!("CARGO_BIN_EXE_dptrain")).arg("train").arg("--run-dir").arg(&run).env("DPTRAIN_TEST_DUMP_BUFFERS", &dumps);
    for s in sets {
        c.arg("--set").arg(s);
    }
    let o = c.output().unwrap();
    ok(&o);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("ghost batch norm of 4"), "{out}");
    assert_eq!(losses(&run).len(), 100);
    // Evaluated with the averaged statistics: well above chance (0.1) on 10 classes.
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    let acc = summary["final_val_acc"].as_f64().unwrap();
    assert!(acc > 0.5, "ghost-BN resnet did not learn: val acc {acc}");
    let read = |p: PathBuf| -> std::collections::HashMap<String, Vec<f32>> {
        let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        dptrain_core::checkpoint::tensors_from_bytes(&bytes).unwrap().into_iter().map(|(k, v)| (k, v.to_vec::<f32>().unwrap())).collect()
    };
    for step in [50u64, 100] {
        let (r0, r1) =
            (read(dumps.join(format!("rank0-step{step}.safetensors"))), read(dumps.join(format!("rank1-step{step}.safetensors"))));
        let saved = params(&run, step);
        assert!(r0.keys().any(|k| k.ends_with("running_mean")) && r0.len() == r1.len());
        let mut differ = 0;
        for (k, a) in &r0 {
            let b = &r1[k];
            differ += (a != b) as usize;
            let avg: Vec<f32> = a.iter().zip(b).map(|(x, y)| (x + y) / 2.0).collect();
            assert_eq!(saved[k], avg, "step {step}: saved {k} is not the ranks' average");
        }
        assert!(differ > 0, "step {step}: the ranks' statistics are identical, the test shows nothing");
    }
    std::fs::remove_dir_all(&d).ok();
}

fn launch_cmd(n: usize, run_dir: &Path, sets: &[&str], extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dptrain"));
    c.args(["launch", "-n", &n.to_string(), "--grace", "5", "--"]).args(args(run_dir, sets)).args(extra).env("DPTRAIN_LOG", "error");
    c
}

fn values_of(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            for k in ["elapsed_s", "samples_per_s", "comm_s", "comm_hidden"] {
                v.as_object_mut().unwrap().remove(k);
            }
            v
        })
        .collect()
}

/// `dptrain launch -n 2 -- train`: the same run as `mpirun -np 2`, bitwise; the exact mpirun
/// command printed; every line tagged with its rank; the loss logged by rank 0 only; one
/// placement line per rank.
#[test]
fn launch_runs_the_ranks_as_mpirun_does() {
    if skip() {
        return;
    }
    let d = tmp("launch");
    let sets = ["train.steps=12", "train.global_batch=16", "optim.lr=0.01", "run.log_every=4"];
    let o = launch_cmd(2, &d.join("launch"), &sets, &[]).output().unwrap();
    ok(&o);
    ok(&multi(2, &d.join("mpirun"), &sets, &[]));
    assert_eq!(values_of(&d.join("launch")), values_of(&d.join("mpirun")));
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let cmd = out.lines().next().unwrap();
    assert!(cmd.starts_with("dptrain launch: ") && cmd.contains("mpirun -np 2") && cmd.contains(" train --run-dir "), "{out}");
    // Logged steps 4, 8, 12 and the probe step 10.
    assert_eq!(out.lines().filter(|l| l.starts_with("[r0] step ") && l.contains("/12 loss")).count(), 4, "{out}");
    assert!(!out.contains("[r1] step"), "{out}");
    for r in 0..2 {
        let line = err
            .lines()
            .find(|l| l.starts_with(&format!("[r{r}] dptrain: rank {r}/2 local rank {r}/2 on ")))
            .unwrap_or_else(|| panic!("{err}"));
        assert!(line.ends_with(": cpu, 1 threads"), "{line}");
    }
    std::fs::remove_dir_all(&d).ok();
}

/// A rank that exits with status 4 makes launch exit 4, naming the rank.
#[cfg(feature = "fault-injection")]
#[test]
fn launch_exits_with_the_first_failing_ranks_code() {
    if skip() {
        return;
    }
    let d = tmp("launch-exit");
    let o = launch_cmd(2, &d.join("r"), &["train.steps=50"], &["--fault", "exit:1:3"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(err.contains("dptrain launch: rank 1 failed first (exit code 4)"), "{err}");
    std::fs::remove_dir_all(&d).ok();
}

/// SIGTERM to launch stops the job and leaves no process behind: every process under it, as
/// seen while the ranks were training, is gone when launch has exited.
#[test]
fn sigterm_to_launch_leaves_no_rank_behind() {
    if skip() {
        return;
    }
    let d = tmp("launch-term");
    let mut child = launch_cmd(2, &d.join("r"), &["train.steps=1000000", "train.eval_every=0", "train.checkpoint_every=0"], &[])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    // A failing assertion below must not leave a million-step job running.
    struct KillOnDrop(u32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            for p in dptrain_launcher::launch::descendants(self.0).into_iter().chain([self.0]) {
                // SAFETY: kill(2) on this test's own child and the processes under it.
                unsafe { libc::kill(p as i32, libc::SIGKILL) };
            }
        }
    }
    let guard = KillOnDrop(pid);
    let t0 = Instant::now();
    let ranks = loop {
        let below = dptrain_launcher::launch::descendants(pid);
        let ranks: Vec<u32> = below
            .iter()
            .copied()
            .filter(|p| std::fs::read_to_string(format!("/proc/{p}/cmdline")).is_ok_and(|c| c.split('\0').nth(1) == Some("train")))
            .collect();
        if ranks.len() >= 2 && d.join("r/metrics.jsonl").exists() {
            break below;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the ranks did not start");
        std::thread::sleep(Duration::from_millis(100));
    };
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let t1 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t1.elapsed() < Duration::from_secs(30), "launch did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(128 + 15));
    std::thread::sleep(Duration::from_millis(200));
    let alive: Vec<u32> = ranks.iter().copied().filter(|p| std::path::Path::new(&format!("/proc/{p}")).exists()).collect();
    // A zombie is gone as a process; only a live one counts.
    let alive: Vec<u32> = alive
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, r)| !r.trim_start().starts_with('Z')))
        })
        .collect();
    assert!(alive.is_empty(), "processes left behind: {alive:?}");
    // The ranks got SIGUSR1 through mpirun and stopped at a step's end with a checkpoint
    // (the run saves none of its own: train.checkpoint_every = 0).
    let ckpts = std::fs::read_dir(d.join("r/checkpoints")).map_or(0, |r| r.count());
    assert_eq!(ckpts, 1, "no checkpoint from the stop");
    // launch has exited and been waited for: its pid may already name another process.
    std::mem::forget(guard);
    std::fs::remove_dir_all(&d).ok();
}
