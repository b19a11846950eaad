//! `dptrain gpu-check`: the one-shot device check for a machine with a GPU. Prints the device,
//! the build's commit and one table: (a) every op of the engine, forward and backward, GPU vs
//! CPU on random inputs; (b) the default GPT trained 20 steps by the real trainer on each
//! device with each optimizer, per-step losses compared, and training steps replayed as a CUDA
//! graph against the same steps run eagerly (AdamW, and SOAP through the trainer with its
//! refreshes between replays); (d) a 1-rank NCCL all-reduce, and
//! the NCCL reducer's pass captured in a CUDA graph and replayed; then (c) tokens/s of a
//! GPT-124M-shaped model in bf16 against PyTorch eager on the same GPU, with model FLOPs
//! utilisation. Exits 2 when there is no usable GPU (one line saying why) and 1 when a check
//! fails (throughput is reported, not judged).

use crate::error::{LaunchError, Result};
use dptrain_core::device::{cuda_status, CudaStatus};

pub fn run(device: usize, profile_out: Option<&std::path::Path>) -> Result<()> {
    let n = match cuda_status() {
        CudaStatus::Devices(n) => n,
        CudaStatus::NotBuilt => return Err(LaunchError::Input("gpu-check: this dptrain was built without the `cuda` feature".into())),
        CudaStatus::NoDriver => return Err(LaunchError::Input("gpu-check: no CUDA driver (libcuda.so.1) on this machine".into())),
        CudaStatus::NoDevice(why) => return Err(LaunchError::Input(format!("gpu-check: no usable CUDA device ({why})"))),
    };
    if device >= n {
        return Err(LaunchError::Input(format!("gpu-check: --device {device}, but this machine has {n} CUDA device(s)")));
    }
    #[cfg(feature = "cuda")]
    {
        if !dptrain_core::tensor::cuda::emulated() && !dptrain_core::device::nvrtc_available() {
            return Err(LaunchError::Input(
                "gpu-check: NVRTC (libnvrtc.so) not found; put pip's nvidia/cu13/lib (or cuda_nvrtc/lib) on LD_LIBRARY_PATH (scripts/gpu-check.sh does)"
                    .into(),
            ));
        }
        cuda_check(device, profile_out)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = profile_out;
        unreachable!("cuda_status() is NotBuilt without the cuda feature")
    }
}

#[cfg(feature = "cuda")]
fn cuda_check(device: usize, profile_out: Option<&std::path::Path>) -> Result<()> {
    use dptrain_core::diagnostics::gpu_ops::{self as check, CheckRow};
    use std::io::Write;
    let t0 = std::time::Instant::now();
    if let Some(d) = profile_out {
        std::fs::create_dir_all(d).map_err(|e| LaunchError::Input(format!("gpu-check: --profile-out {}: {e}", d.display())))?;
    }
    let info = check::device_info(device).map_err(|e| LaunchError::Runtime(format!("gpu-check: {e}")))?;
    println!(
        "dptrain gpu-check — {} (compute capability {}.{}, kernels compiled for {}), commit {}",
        info.name,
        info.compute_capability.0,
        info.compute_capability.1,
        info.arch,
        option_env!("DPTRAIN_COMMIT").unwrap_or("unknown")
    );
    println!("kernels: {}", info.kernels);
    // Rows are printed as they complete: device time is scarce, and a crash halfway must still
    // leave every finished row on the screen.
    println!("| check | max rel. error vs CPU | bound | ok |");
    println!("|---|---|---|---|");
    let print = |r: &CheckRow| {
        println!("| {} | {:.2e} | {:.0e} | {} |", r.op, r.max_rel_err, r.bound, if r.ok() { "yes" } else { "NO" });
        let _ = std::io::stdout().flush();
    };
    // (a) every op, forward and backward, GPU vs CPU.
    let mut rows = check::run_each(device, &mut |r| print(r));
    let fail = |op: &str, e: String| CheckRow { op: format!("{op} — FAILED: {e}"), max_rel_err: f64::INFINITY, bound: 0.0 };
    // (d) NCCL: a 1-rank all-reduce (average) on the device must return its input.
    let row = if dptrain_core::tensor::cuda::emulated() {
        CheckRow { op: "nccl all_reduce — not run on the CPU emulator".into(), max_rel_err: 0.0, bound: 0.0 }
    } else {
        match dptrain_comm::nccl::single_rank_all_reduce(device, 1 << 20) {
            Ok(diff) => CheckRow { op: "nccl all_reduce avg, 1 rank, 4 MiB".into(), max_rel_err: diff, bound: 0.0 },
            Err(e) => fail("nccl all_reduce", e),
        }
    };
    print(&row);
    rows.push(row);
    // The reducer's pass captured in a CUDA graph (what `train.cuda_graph` does on several GPUs).
    let row = match dptrain_comm::nccl::single_rank_reducer_in_graph(device) {
        Ok(diff) => CheckRow {
            op: "nccl reducer pass (bf16 buckets) inside a CUDA graph, 1 rank, 3 replays: vs the doubled gradients in bf16".into(),
            max_rel_err: diff,
            bound: 0.0,
        },
        Err(e) => fail("nccl reducer pass inside a CUDA graph", e),
    };
    print(&row);
    rows.push(row);
    // (b) the default GPT trained 20 steps by the real trainer on each device, with each
    // optimizer: their device paths (fused updates, device-decided steps, SOAP's device
    // projections and its refresh through cuSOLVER) on the real GPU, not the emulator alone.
    // SOAP's bound is looser: its early updates are sign-like in bases that turn with last-bit
    // changes of the statistics (two ranks against one drift ~1e-3 in loss within 30 steps,
    // README "SOAP"), and a rank-deficient factor's null-space basis is whatever the
    // eigensolver (cuSOLVER or faer) returns.
    for (label, sets, bound) in OPTIMIZER_RUNS {
        let row = match trainer_agreement(device, sets) {
            Ok((d, steps)) => {
                CheckRow { op: format!("GPT-mini, {steps} training steps: loss GPU vs CPU (trainer, {label})"), max_rel_err: d, bound }
            }
            Err(e) => fail(&format!("GPT-mini training steps GPU vs CPU ({label})"), e),
        };
        print(&row);
        rows.push(row);
    }
    // The training step captured as a CUDA graph and replayed with new batches, against eager.
    // And the same eager steps run twice: a GPU run is the same bits run to run (no float
    // atomics in dptrain's kernels; cuBLAS and cuBLASLt must be deterministic too).
    let (graph_row, repeat_row) = match graph_agreement(device) {
        Ok((d, again, steps)) => (
            CheckRow {
                op: format!(
                    "GPT training step as a CUDA graph, {steps} steps (replays with new batches and dropout masks) vs eager: parameters"
                ),
                max_rel_err: d,
                bound: 1e-6,
            },
            CheckRow {
                op: format!("the same {steps} eager steps run twice: parameters (reproducible run to run)"),
                max_rel_err: again,
                bound: 0.0,
            },
        ),
        Err(e) => (fail("GPT training step as a CUDA graph vs eager", e.clone()), fail("the same eager steps run twice", e)),
    };
    // SOAP's device-decided steps replayed by the trainer, its refreshes run eagerly between
    // the replays and written over the bases the graph reads.
    let soap_row = match trainer_graph_agreement(device, SOAP_GRAPH_RUN) {
        Ok((d, steps, replayed)) => CheckRow {
            op: format!(
                "GPT-mini, SOAP (refresh every 3 updates), {steps} steps with {replayed} run as the CUDA graph vs eager (trainer): parameters"
            ),
            max_rel_err: d,
            bound: 1e-6,
        },
        Err(e) => fail("GPT-mini, SOAP training steps as a CUDA graph vs eager (trainer)", e),
    };
    for row in [graph_row, repeat_row, soap_row] {
        print(&row);
        rows.push(row);
    }
    // (c) throughput against PyTorch on the same GPU: GPT-124M, then the 10.9 M byte-level GPT.
    for preset in [Preset::gpt124m(), Preset::shakespeare_char()] {
        if let Err(e) = throughput(device, &preset, profile_out) {
            let row = fail(&format!("{} bf16 throughput", preset.label), e);
            print(&row);
            rows.push(row);
        }
    }
    soap_refresh_times(device);
    println!("gpu-check took {:.0} s", t0.elapsed().as_secs_f64());
    if rows.iter().any(|r| !r.ok()) {
        return Err(LaunchError::Runtime("gpu-check: some checks failed (see the table)".into()));
    }
    Ok(())
}

/// The optimizers part (b) trains with: label, `--set`s, bound on the loss difference.
#[cfg(feature = "cuda")]
const OPTIMIZER_RUNS: [(&str, &[&str], f64); 5] = [
    ("AdamW", &[], 1e-3),
    ("SGD, Nesterov momentum", &["optim.kind=sgd", "optim.lr=0.1", "optim.momentum=0.9", "optim.nesterov=true"], 1e-3),
    ("LAMB", &["optim.kind=lamb", "optim.lr=1e-2"], 1e-3),
    ("LARS", &["optim.kind=lars", "optim.lr=0.1", "optim.momentum=0.9"], 1e-3),
    ("SOAP, refresh every 4 steps", &["optim.kind=soap", "optim.precondition_frequency=4"], 1e-2),
];

/// Trains the built-in default config (with `optim`'s `--set`s) for 20 steps on the CPU and on
/// the GPU with the real trainer (config, device placement, the optimizer, clipping,
/// checkpoint) and returns the largest relative difference of the logged per-step losses. The
/// tiny test model (the emulator, ~2 s a step) takes 8 steps: one SOAP refresh still falls in.
#[cfg(feature = "cuda")]
fn trainer_agreement(device: usize, optim: &[&str]) -> std::result::Result<(f64, usize), String> {
    let dir = std::env::temp_dir().join(format!("dptrain-gpu-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let losses = |dev: &str| -> std::result::Result<Vec<f64>, String> {
        let run_dir = dir.join(dev);
        let tiny = dptrain_core::env::env().gpu_check_tiny;
        let steps = if tiny { 8 } else { 20 };
        let mut sets: Vec<String> = [
            &format!("train.steps={steps}"),
            "run.log_every=1",
            "train.eval_every=0",
            "train.eval_samples=32",
            &format!("run.device={dev}"),
        ]
        .map(String::from)
        .to_vec();
        sets.extend(optim.iter().map(|s| s.to_string()));
        if tiny {
            sets.extend(TINY_GPT_MINI.map(String::from));
        }
        let args = crate::train::TrainArgs { sets, run_dir: Some(run_dir.clone()), ..Default::default() };
        if dev == "cuda" && device != 0 {
            return Err("the trainer check uses device 0 (set CUDA_VISIBLE_DEVICES to pick another)".into());
        }
        crate::train::train(&args).map_err(|e| format!("{dev}: {e}"))?;
        let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).map_err(|e| e.to_string())?;
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v.get("loss").and_then(|x| x.as_f64()))
            .collect())
    };
    let (c, g) = (losses("cpu")?, losses("cuda")?);
    let _ = std::fs::remove_dir_all(&dir);
    if c.len() != g.len() || c.is_empty() {
        return Err(format!("{} CPU and {} GPU loss records", c.len(), g.len()));
    }
    Ok((c.iter().zip(&g).map(|(a, b)| (a - b).abs() / a.abs().max(1e-12)).fold(0.0, f64::max), c.len()))
}

/// GPT-mini shrunk for the emulator (`DPTRAIN_GPU_CHECK_TINY`), in the trainer rows of part (b).
const TINY_GPT_MINI: [&str; 5] = ["model.d_model=32", "model.n_layers=1", "model.context=16", "data.vocab=16", "train.global_batch=8"];

/// gpu-check's SOAP run under `train.cuda_graph`: steps 1 (the bases' initialisation), 4, 7 and
/// 10 (refreshes) are the host's, 12 logs; 3 is captured, 5, 6, 8, 9 and 11 replay it.
const SOAP_GRAPH_RUN: &[&str] =
    &["optim.kind=soap", "optim.precondition_frequency=3", "train.precision=bf16", "train.steps=12", "run.log_every=12"];

/// The trainer on the GPU with `sets`, with and without `train.cuda_graph`: the largest
/// difference of the final parameters relative to their largest magnitude (0 expected: the
/// same kernels on the same values), the steps, and how many of them the graph ran (an error
/// if none).
fn trainer_graph_agreement(device: usize, sets: &[&str]) -> std::result::Result<(f64, u64, u64), String> {
    if device != 0 {
        return Err("the trainer check uses device 0 (set CUDA_VISIBLE_DEVICES to pick another)".into());
    }
    let dir = std::env::temp_dir().join(format!("dptrain-gpu-check-graph-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = |graph: bool| -> std::result::Result<(Vec<f32>, crate::train::Summary), String> {
        let run_dir = dir.join(if graph { "graph" } else { "eager" });
        let mut all: Vec<String> = ["run.device=cuda", "train.eval_every=0", "train.eval_samples=32", &format!("train.cuda_graph={graph}")]
            .map(String::from)
            .to_vec();
        all.extend(sets.iter().map(|s| s.to_string()));
        if dptrain_core::env::env().gpu_check_tiny {
            all.extend(TINY_GPT_MINI.map(String::from));
        }
        let args = crate::train::TrainArgs { sets: all, run_dir: Some(run_dir.clone()), ..Default::default() };
        let summary = crate::train::train(&args).map_err(|e| format!("graph {graph}: {e}"))?;
        let file = crate::checkpoint::step_dir(&run_dir, summary.steps).join("model.safetensors");
        let bytes = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        let mut named: Vec<_> = dptrain_core::checkpoint::tensors_from_bytes(&bytes).map_err(|e| e.to_string())?.into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let mut values = vec![];
        for (_, t) in named {
            values.extend(t.to_vec::<f32>().map_err(|e| e.to_string())?);
        }
        Ok((values, summary))
    };
    let outcome = run(false).and_then(|eager| run(true).map(|graph| (eager, graph)));
    let _ = std::fs::remove_dir_all(&dir);
    let ((eager, summary), (replayed, graph)) = outcome?;
    if graph.graph_steps == 0 || eager.len() != replayed.len() {
        return Err(format!("{} steps run as the graph, {} and {} parameters", graph.graph_steps, eager.len(), replayed.len()));
    }
    let scale = eager.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    let d = eager.iter().zip(&replayed).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
    Ok((d as f64, summary.steps, graph.graph_steps))
}

/// A small GPT's bf16 training step with dropout and the tanh GELU (AdamW and clipping decided
/// on the device) run eagerly for five batches, and again with the second step captured as a
/// CUDA graph that is replayed for the second to fifth batches, each refilled into the graph's
/// inputs with its step's dropout key staged: the largest difference of the parameters after
/// the five steps, relative to their largest magnitude. The graph runs the same kernels on the same values, so
/// it should be 0. Also the largest difference between two eager runs of the five steps.
#[cfg(feature = "cuda")]
fn graph_agreement(device: usize) -> std::result::Result<(f64, f64, usize), String> {
    use dptrain_core::model::Batch;
    use dptrain_core::{DType, Device, GradStore, ParamBuilder};
    let e = |x: dptrain_core::Error| x.to_string();
    // Head size 32: flash attention on a GPU; biases and the tanh GELU: the cuBLASLt epilogues
    // (bias, residual, GELU and its derivative), their pointers captured in the graph.
    let cfg = dptrain_models::GptConfig {
        vocab_size: 64,
        context: 16,
        d_model: 64,
        n_layers: 2,
        n_heads: 2,
        bias: true,
        gelu_tanh: true,
        dropout: 0.1,
        ..Default::default()
    };
    let (b, t, steps) = (2usize, 16usize, 5usize);
    let mut rng = dptrain_core::rng::Rng::new(11);
    let mut ids = || -> Vec<u32> { (0..b * t).map(|_| (rng.uniform() * 64.0) as u32 % 64).collect() };
    let batches: Vec<Batch> = (0..steps).map(|_| Batch::Tokens { inputs: ids(), targets: ids(), batch: b, context: t }).collect();
    let dev = dptrain_core::tensor::cuda::dev(device).map_err(e)?;
    let train = |graph: bool| -> std::result::Result<Vec<f32>, String> {
        let mut pb = ParamBuilder::new();
        let model = dptrain_models::Gpt::new(cfg.clone(), &mut pb).map_err(e)?;
        let mut params = pb.build(3, DType::F32).map_err(e)?;
        let mut opt = dptrain_optim::AdamW::new(dptrain_optim::AdamWConfig { weight_decay: 0.1, ..Default::default() }, &params);
        params.to_device(Device::Cuda(device)).map_err(e)?;
        let mut grads = GradStore::try_new(&params).map_err(e)?;
        let mut solo = dptrain_comm::LocalComm::new();
        // Step i's dropout key is i. With the graph it is staged where the kernels read it; the
        // eager runs pass it as a kernel argument, so the check compares the two as well.
        let keys = graph.then(dptrain_core::ops::dropout::StepKeys::default);
        let stage = |i: u64| keys.iter().for_each(|k| k.stage(&[i]));
        let mut step = |i: u64, batch: &Batch| -> dptrain_core::Result<()> {
            let ctx = &mut dptrain_optim::StepCtx { step: 0, lr: 1e-3, comm: &mut solo };
            match bf16_device_step(&model, &mut params, &mut grads, &mut opt, batch, (i, keys.as_ref()), ctx)? {
                (_, true) => Ok(()),
                (_, false) => Err(dptrain_core::Error::Device("AdamW did not decide the step on the device".into())),
            }
        };
        stage(0);
        step(0, &batches[0]).map_err(e)?;
        if graph {
            stage(1);
            let (mut g, ()) = dev.capture(batches[1].clone(), |b| step(1, b)).map_err(e)?;
            for (i, batch) in batches.iter().enumerate().skip(1) {
                if i > 1 {
                    g.inputs_mut().refill(batch).map_err(e)?;
                }
                stage(i as u64);
                g.replay().map_err(e)?;
            }
        } else {
            for (i, batch) in batches.iter().enumerate().skip(1) {
                step(i as u64, batch).map_err(e)?;
            }
        }
        params.flat().to_vec::<f32>().map_err(e)
    };
    let (eager, replayed, again) = (train(false)?, train(true)?, train(false)?);
    let scale = eager.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    let diff = |other: &[f32]| (eager.iter().zip(other).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale) as f64;
    Ok((diff(&replayed), diff(&again), steps))
}

/// One bf16 training step of `model` on `batch`, as the trainer runs a step that logs nothing:
/// forward and backward (dropout keyed by `rng_key`: the key, and with a cell — for a step
/// captured as a CUDA graph — where the caller staged it and the kernels read it), the record
/// (Σg², the loss) and AdamW's step decided on the device. Returns the record and whether the
/// device decided the step (not with `Fusions::device_step` off: the caller then takes the
/// waiting path).
#[cfg(feature = "cuda")]
fn bf16_device_step(
    model: &dptrain_models::Gpt,
    params: &mut dptrain_core::ParamStore,
    grads: &mut dptrain_core::GradStore,
    opt: &mut dptrain_optim::AdamW,
    batch: &dptrain_core::model::Batch,
    rng_key: (u64, Option<&dptrain_core::ops::dropout::StepKeys>),
    ctx: &mut dptrain_optim::StepCtx,
) -> dptrain_core::Result<(dptrain_core::ops::flat::StepRecord, bool)> {
    use dptrain_core::model::Model;
    use dptrain_optim::Optimizer;
    grads.zero_grad();
    let tape = dptrain_core::Tape::new();
    tape.set_precision(dptrain_core::Precision::Bf16);
    tape.set_rng_key(rng_key.0);
    if let Some(keys) = rng_key.1 {
        tape.set_device_rng_key(keys.upload(params.device())?.first().cloned());
    }
    let loss = model.loss(&tape, params, batch, true, &mut dptrain_core::probe::NoProbes)?;
    let value = loss.value();
    tape.backward(loss, grads, |_, _| {})?;
    drop(tape);
    let rec = dptrain_core::ops::flat::sum_squares_and_record(grads.flat(), std::slice::from_ref(&value))?;
    let decided = opt.step_on_device(params, grads, ctx, &rec, 1.0).map_err(|x| dptrain_core::Error::Device(x.to_string()))?;
    Ok((rec, decided))
}

#[cfg(feature = "cuda")]
struct Perf {
    model: String,
    batch: usize,
    context: usize,
    tokens_per_s: f64,
    step_ms: f64,
    mfu: f64,
    peak: f64,
    raw_allocs_in_timed_steps: u64,
    /// Bytes the caching allocator holds at the end (live tensors and its free lists: what it
    /// took from the driver, as torch.cuda.max_memory_reserved counts PyTorch's), in MiB.
    reserved_mib: f64,
    /// Which attention ran ("flash attention" or "unfused attention").
    attention: &'static str,
    /// Causal attention's forward FLOPs per step as FlashAttention-2 counts them: QKᵀ and PV
    /// over the visible half, 4·B·T²·C·L / 2 (backward: 2.5× that).
    attn_fwd_flops: f64,
    /// Times per timed step the host waited for the device.
    host_waits_per_step: f64,
    /// Every kernel's time in one profiled step.
    profile: Vec<dptrain_core::tensor::cuda::KernelTime>,
    /// Nodes of the step's CUDA graph when it was measured as one.
    graph_nodes: Option<usize>,
}

/// The class a kernel's time is reported under in gpu-check's profile of a training step.
#[cfg(feature = "cuda")]
fn kernel_class(file: &str, name: &str) -> &'static str {
    match file {
        "cublas" if name.contains("cuBLASLt") => "GEMMs with an epilogue (cuBLASLt: bias, residual, GELU)",
        "cublas" => "GEMMs (cuBLAS)",
        "flash" => "flash attention",
        "attention" => "attention, unfused (softmax, head copies)",
        "cross_entropy" => "cross-entropy",
        "layer_norm" => "layer norm",
        "optim" => "optimizer",
        "elementwise" if name.contains("bf16") => "f32 ↔ bf16 casts",
        "elementwise" if name.starts_with("strided") || name.starts_with("expand") => "strided copies (views)",
        "reduce" => "reductions (norms, sums)",
        _ => "other (element-wise, GELU, embedding, …)",
    }
}

/// Prints the profiled step: time per kernel class with its share, then the five longest kernels.
#[cfg(feature = "cuda")]
fn print_profile(profile: &[dptrain_core::tensor::cuda::KernelTime], step_ms: f64, attn_fwd_flops: f64, sdpa: Option<(f64, f64)>) {
    let total: f64 = profile.iter().map(|k| k.ms).sum();
    let mut classes: Vec<(&str, f64, usize)> = vec![];
    for k in profile {
        let c = kernel_class(k.file, k.name);
        match classes.iter_mut().find(|x| x.0 == c) {
            Some(x) => {
                x.1 += k.ms;
                x.2 += k.launches;
            }
            None => classes.push((c, k.ms, k.launches)),
        }
    }
    classes.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!();
    println!("| one training step, by kernel class (CUDA events around each launch) | ms | share | launches |");
    println!("|---|---|---|---|");
    for (c, ms, n) in &classes {
        println!("| {c} | {ms:.2} | {:.1} % | {n} |", 100.0 * ms / total.max(1e-12));
    }
    println!("| total | {total:.2} | 100 % | {} |", profile.iter().map(|k| k.launches).sum::<usize>());
    let top: Vec<String> = profile.iter().take(5).map(|k| format!("{}.{} {:.2} ms ×{}", k.file, k.name, k.ms, k.launches)).collect();
    println!("longest kernels: {}", top.join(", "));
    // How near the flash kernels run to the tensor cores, in the unit flash benchmarks use, and
    // to PyTorch's SDPA on the same shapes.
    let flash_ms = |prefix: &str| profile.iter().filter(|k| k.file == "flash" && k.name.starts_with(prefix)).map(|k| k.ms).sum::<f64>();
    let (fwd, bwd) = (flash_ms("flash_fwd"), flash_ms("flash_bwd"));
    let rate = |fwd: f64, bwd: f64| {
        format!(
            "forward {fwd:.2} ms = {:.0} TFLOP/s, backward {bwd:.2} ms = {:.0} TFLOP/s",
            attn_fwd_flops / (fwd * 1e-3) / 1e12,
            2.5 * attn_fwd_flops / (bwd * 1e-3) / 1e12
        )
    };
    if fwd > 0.0 && bwd > 0.0 {
        println!(
            "flash attention: {} (causal FLOPs as FlashAttention-2 counts them: 2·B·T²·C·L forward, 2.5× that backward)",
            rate(fwd, bwd)
        );
    }
    if let Some((sf, sb)) = sdpa.filter(|s| s.0 > 0.0 && s.1 > 0.0) {
        let vs = if fwd > 0.0 && bwd > 0.0 {
            format!(": dptrain's flash takes {:.2}× its forward time, {:.2}× its backward time", fwd / sf, bwd / sb)
        } else {
            String::new()
        };
        println!("PyTorch SDPA alone on the same shapes (all layers, CUDA events): {}{vs}", rate(sf, sb));
    }
    // Below 100 % the GPU waits for the host (launches, syncs) for the rest of the step.
    println!(
        "kernel time {total:.2} ms per step of {step_ms:.2} ms timed: the GPU is busy {:.0} % of the step",
        100.0 * total / step_ms.max(1e-12)
    );
}

/// Writes one measurement's profiled step, every kernel (longest first), to
/// `<dir>/profile-<model>[-without-<fusion>].tsv` when `--profile-out` gave a directory: the
/// table prints classes and the five longest, the file has what a comparison needs.
#[cfg(feature = "cuda")]
fn write_profile(dir: Option<&std::path::Path>, model: &str, off: &str, p: &Perf) -> std::result::Result<(), String> {
    let Some(dir) = dir else { return Ok(()) };
    let total: f64 = p.profile.iter().map(|k| k.ms).sum();
    let mut text = format!(
        "# {} bf16, batch {}x{}: step {:.3} ms timed, {:.3} ms of kernel time profiled{}\nfile\tkernel\tlaunches\tms\tshare\n",
        p.model,
        p.batch,
        p.context,
        p.step_ms,
        total,
        if off.is_empty() { String::new() } else { format!(", without {off}") }
    );
    for k in &p.profile {
        text.push_str(&format!("{}\t{}\t{}\t{:.4}\t{:.4}\n", k.file, k.name, k.launches, k.ms, k.ms / total.max(1e-12)));
    }
    let name = if off.is_empty() { format!("profile-{model}.tsv") } else { format!("profile-{model}-without-{off}.tsv") };
    let path = dir.join(name);
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// One PyTorch measurement.
#[cfg(feature = "cuda")]
struct TorchPerf {
    tokens_per_s: f64,
    step_ms: f64,
    peak_mib: f64,
    /// SDPA alone on the step's attention shapes, all layers: (forward, backward) ms (eager
    /// runs only).
    sdpa_ms: Option<(f64, f64)>,
}

/// Dense bf16 tensor-core peak of the card, from its name (FLOP/s).
#[cfg(feature = "cuda")]
fn peak_bf16(name: &str) -> f64 {
    let n = name.to_ascii_uppercase();
    if n.contains("H100") && n.contains("PCIE") {
        756e12
    } else if n.contains("H100") || n.contains("H200") || n.contains("H800") {
        989e12
    } else if n.contains("A100") {
        312e12
    } else {
        // Unknown card: MFU against the H100 SXM figure, said in the table.
        989e12
    }
}

/// A model gpu-check measures: its shapes, batch and optimizer, as dptrain and as
/// benches/gpt124m_torch.py (`torch_args`) build it.
#[cfg(feature = "cuda")]
struct Preset {
    label: String,
    cfg: dptrain_models::GptConfig,
    batch: usize,
    betas: (f64, f64),
    torch_args: &'static [&'static str],
    /// The model in file names (`--profile-out`).
    slug: &'static str,
    /// Also against torch.compile (its compilation takes minutes of scarce device time; the
    /// small model's target is eager's).
    compile: bool,
}

#[cfg(feature = "cuda")]
impl Preset {
    /// GPT-124M (GPT-2 small shapes, vocabulary 50304), batch 8 × 1024.
    fn gpt124m() -> Preset {
        let cfg = dptrain_models::GptConfig {
            vocab_size: 50304,
            context: 1024,
            d_model: 768,
            n_layers: 12,
            n_heads: 12,
            mlp_ratio: 4,
            bias: true,
            z_loss: 0.0,
            gelu_tanh: true,
            dropout: 0.0,
            ..Default::default()
        };
        Preset { label: "GPT-124M".into(), cfg, batch: 8, betas: (0.9, 0.95), torch_args: &[], slug: "gpt124m", compile: true }
    }

    /// examples/shakespeare-char.toml's model (nanoGPT's character-level one on bytes: 6 layers
    /// of 384, 6 heads, context 256, no biases, dropout 0.2, exact GELU), batch 64.
    fn shakespeare_char() -> Preset {
        let cfg = dptrain_models::GptConfig {
            vocab_size: 256,
            context: 256,
            d_model: 384,
            n_layers: 6,
            n_heads: 6,
            mlp_ratio: 4,
            bias: false,
            z_loss: 0.0,
            gelu_tanh: false,
            dropout: 0.2,
            ..Default::default()
        };
        Preset {
            label: "GPT 10.9M (examples/shakespeare-char.toml)".into(),
            cfg,
            batch: 64,
            betas: (0.9, 0.99),
            torch_args: &["--small"],
            slug: "gpt-10.9m",
            compile: false,
        }
    }
}

/// Part (c) for one model: dptrain against PyTorch eager and torch.compile, then dptrain with
/// each fusion off in turn (the before/after lines), then one step's profile.
#[cfg(feature = "cuda")]
fn throughput(device: usize, preset: &Preset, profile_out: Option<&std::path::Path>) -> std::result::Result<(), String> {
    use dptrain_core::tensor::cuda::Fusions;
    use std::io::Write;
    let p = measure(device, preset, Fusions::ALL, false)?;
    write_profile(profile_out, preset.slug, "", &p)?;
    println!();
    println!("| {}, bf16, batch {}×{}, 1 GPU | tokens/s | step ms | MFU | device memory MiB |", p.model, p.batch, p.context);
    println!("|---|---|---|---|---|");
    println!(
        "| dptrain ({}) | {:.0} | {:.1} | {:.1} % of {:.0} TFLOP/s | {:.0} |",
        p.attention,
        p.tokens_per_s,
        p.step_ms,
        100.0 * p.mfu,
        p.peak / 1e12,
        p.reserved_mib
    );
    let _ = std::io::stdout().flush();
    let runs = [("PyTorch eager (autocast bf16, SDPA, fused AdamW)", false), ("PyTorch torch.compile (same)", true)];
    let mut sdpa = None;
    for (label, compile) in runs.into_iter().filter(|r| preset.compile || !r.1) {
        match torch_tokens_per_s(preset.torch_args, compile) {
            Ok(r) => {
                sdpa = sdpa.or(r.sdpa_ms);
                println!(
                    "| {label} | {:.0} | {:.1} | {:.1} % | {:.0} |",
                    r.tokens_per_s,
                    r.step_ms,
                    100.0 * p.mfu * r.tokens_per_s / p.tokens_per_s,
                    r.peak_mib
                );
                println!(
                    "| ratio dptrain / {} | {:.2} | | | {:.2} |",
                    if compile { "torch.compile" } else { "eager" },
                    p.tokens_per_s / r.tokens_per_s,
                    p.reserved_mib / r.peak_mib
                );
            }
            Err(e) => println!("| {label} | not run: {e} | | | |"),
        }
        let _ = std::io::stdout().flush();
    }
    // Before/after: each fused path off in turn (the rest on), same model and batch.
    let offs = [
        ("flash attention", "flash", Fusions { flash: false, ..Fusions::ALL }),
        ("flash forward's 128-row query tiles (64-row ones instead)", "flash_wide", Fusions { flash_wide: false, ..Fusions::ALL }),
        ("bias epilogue", "epilogue", Fusions { epilogue: false, ..Fusions::ALL }),
        (
            "tanh GELU in the MLP's GEMM epilogues (GELU's kernels instead; no-op for the exact form)",
            "gelu_epilogue",
            Fusions { gelu_epilogue: false, ..Fusions::ALL },
        ),
        ("fused classifier", "classifier", Fusions { classifier: false, ..Fusions::ALL }),
        ("bf16 operands from GELU and layer norm", "operands", Fusions { operands: false, ..Fusions::ALL }),
        ("bf16 activations (qkv, attention output, MLP pre-activation)", "activations", Fusions { activations: false, ..Fusions::ALL }),
        ("step decided on the device (a wait every step)", "device_step", Fusions { device_step: false, ..Fusions::ALL }),
        ("weight gradients written into the gradient buffer", "grad_sink", Fusions { grad_sink: false, ..Fusions::ALL }),
        ("optimizer's bf16 weight copy", "weight_copy", Fusions { weight_copy: false, ..Fusions::ALL }),
        (
            "gradient added in place by its op (layer norm's dx into the residual stream's)",
            "accumulate",
            Fusions { accumulate: false, ..Fusions::ALL },
        ),
        ("residual add in the projections' GEMMs", "residual", Fusions { residual: false, ..Fusions::ALL }),
        (
            "16-byte loads in GELU, layer norm and the cross-entropy rows (one element per access instead)",
            "wide_loads",
            Fusions { wide_loads: false, ..Fusions::ALL },
        ),
    ];
    for (what, off, f) in offs {
        let q = measure(device, preset, f, false).and_then(|q| write_profile(profile_out, preset.slug, off, &q).map(|()| q));
        print_against(&p, q, |q| match q {
            Some(q) => format!("dptrain without the {what} ({})", q.attention),
            None => format!("dptrain without the {what}"),
        });
    }
    // After: the same step captured once as a CUDA graph and replayed (one launch per step).
    print_against(&p, measure(device, preset, Fusions::ALL, true), |q| match q {
        Some(q) => format!("dptrain with the step as one CUDA graph ({} nodes, replayed)", q.graph_nodes.unwrap_or(0)),
        None => "dptrain with the step as one CUDA graph".into(),
    });
    print_profile(&p.profile, p.step_ms, p.attn_fwd_flops, sdpa);
    println!(
        "allocator: {} device allocations in the timed steps (0 = steady state served from the cache); the host waited for the device {} times per step (the trainer decides a step on the device and reads its loss and gradient norm on logging steps: 0 on the others; 1 with DPTRAIN_STEP_SYNC=1)",
        p.raw_allocs_in_timed_steps, p.host_waits_per_step
    );
    Ok(())
}

/// Part (c)'s last table: SOAP's basis refresh of one factor at GPT-124M's sizes on the GPU
/// (cuSOLVER, f64: where a GPU run refreshes) and, at the smallest, on this host (faer, f64,
/// one core: where it refreshed before, and does with `DPTRAIN_SOLVER=0`), for scale.
#[cfg(feature = "cuda")]
fn soap_refresh_times(device: usize) {
    use dptrain_optim::soap::{basis_refresh_seconds, basis_refresh_seconds_on};
    use std::io::Write;
    let sizes: &[usize] = if dptrain_core::env::env().gpu_check_tiny { &[16, 48] } else { &[768, 1024, 2304, 3072] };
    let solver = dptrain_core::tensor::cuda::dev(device).is_ok_and(|d| d.has_solver());
    let on = if solver { "GPU (cuSOLVER, f64)" } else { "GPU without cuSOLVER: on the host" };
    println!();
    println!("| SOAP basis refresh of one d × d factor | eigh ms (first step) | power iteration + QR ms (each refresh) |");
    println!("|---|---|---|");
    let row = |what: String, r: std::result::Result<(f64, f64), String>| {
        match r {
            Ok((e, q)) => println!("| {what} | {:.1} | {:.1} |", e * 1e3, q * 1e3),
            Err(e) => println!("| {what} | not run: {e} | |"),
        }
        let _ = std::io::stdout().flush();
    };
    for &d in sizes {
        row(format!("d {d}, {on}"), basis_refresh_seconds_on(d, dptrain_core::Device::Cuda(device)).map_err(|e| e.to_string()));
    }
    row(format!("d {}, host (faer, f64, one core)", sizes[0]), basis_refresh_seconds(sizes[0]).map_err(|e| e.to_string()));
}

/// One line of part (c) comparing measurement `q` with the step `base` (before/after):
/// `label` names what differs (given `q` when it ran).
#[cfg(feature = "cuda")]
fn print_against(base: &Perf, q: std::result::Result<Perf, String>, label: impl Fn(Option<&Perf>) -> String) {
    use std::io::Write;
    match q {
        Ok(q) => println!(
            "| {}: {:.2}× the step time | {:.0} | {:.1} | {:.1} % | {:.0} |",
            label(Some(&q)),
            q.step_ms / base.step_ms,
            q.tokens_per_s,
            q.step_ms,
            100.0 * q.mfu,
            q.reserved_mib
        ),
        Err(e) => println!("| {} | not run: {e} | | | |", label(None)),
    }
    let _ = std::io::stdout().flush();
}

/// One model's bf16 training steps with fusions `fusions` (AdamW, clipping at 1): 3 warm-up
/// steps, then 10 timed, then one profiled.
#[cfg(feature = "cuda")]
fn measure(device: usize, preset: &Preset, fusions: dptrain_core::tensor::cuda::Fusions, graph: bool) -> std::result::Result<Perf, String> {
    use dptrain_core::model::Batch;
    use dptrain_core::Precision;
    use dptrain_core::{DType, Device, GradStore, ParamBuilder};
    use dptrain_models::Gpt;
    use dptrain_optim::Optimizer;
    let e = |x: dptrain_core::Error| x.to_string();
    let mut cfg = preset.cfg.clone();
    let (mut b, mut t) = (preset.batch, cfg.context);
    // Tests of this command on the CPU emulator shrink the model (the numbers then mean nothing).
    if dptrain_core::env::env().gpu_check_tiny {
        // One head of 32: flash attention runs (as at full size).
        cfg = dptrain_models::GptConfig { vocab_size: 96, context: 16, d_model: 32, n_layers: 1, n_heads: 1, ..cfg };
        (b, t) = (2, 16);
    }
    let mut pb = ParamBuilder::new();
    let model = Gpt::new(cfg.clone(), &mut pb).map_err(e)?;
    let mut params = pb.build(1, DType::F32).map_err(e)?;
    let ocfg = dptrain_optim::AdamWConfig { beta1: preset.betas.0, beta2: preset.betas.1, weight_decay: 0.1, ..Default::default() };
    let mut opt = dptrain_optim::AdamW::new(ocfg, &params);
    params.to_device(Device::Cuda(device)).map_err(e)?;
    let mut grads = GradStore::try_new(&params).map_err(e)?;
    let mut rng = dptrain_core::rng::Rng::new(7);
    let ids: Vec<u32> = (0..b * t).map(|_| (rng.uniform() * cfg.vocab_size as f64) as u32 % cfg.vocab_size as u32).collect();
    let tg: Vec<u32> = (0..b * t).map(|_| (rng.uniform() * cfg.vocab_size as f64) as u32 % cfg.vocab_size as u32).collect();
    let batch = Batch::Tokens { inputs: ids, targets: tg, batch: b, context: t };
    let dev = dptrain_core::tensor::cuda::dev(device).map_err(e)?;
    // What the previous measurement left cached would count as this one's memory.
    dev.empty_cache().map_err(e)?;
    let before = dev.set_fusions(fusions);
    let (warm, timed) = (3, 10);
    let mut t0 = std::time::Instant::now();
    let (mut allocs0, mut waits0) = (0, 0);
    let mut solo = dptrain_comm::LocalComm::new();
    // Each step's dropout key (i); with the graph also staged where the kernels read it.
    let keys = graph.then(dptrain_core::ops::dropout::StepKeys::default);
    let mut step = |i: usize, batch: &Batch| -> std::result::Result<(), String> {
        let ctx = &mut dptrain_optim::StepCtx { step: i as u64 + 1, lr: 3e-4, comm: &mut solo };
        // As the trainer on a step that logs nothing: the step decided on the device (its
        // record read on a logging step, not here) — or, with that off, the loss and the
        // gradient's norm read in one transfer, then clipping.
        let (rec, decided) =
            bf16_device_step(&model, &mut params, &mut grads, &mut opt, batch, (i as u64, keys.as_ref()), ctx).map_err(e)?;
        if decided {
            return Ok(());
        }
        let (sq, _, _) = rec.read().map_err(e)?;
        dptrain_optim::clip_to_norm(&mut grads, 1.0, sq.sqrt()).map_err(|x| x.to_string())?;
        opt.step(&mut params, &grads, ctx).map_err(|x| x.to_string())
    };
    let mut nodes = None;
    let mut run = || -> std::result::Result<(f64, u64, u64, Vec<dptrain_core::tensor::cuda::KernelTime>), String> {
        // With `graph`, the last warm-up step is captured (after eager ones: the optimizer's
        // state and the bf16 weights exist) and every later step is a replay of it.
        let mut captured = None;
        for i in 0..warm + timed {
            if i == warm {
                dev.sync().map_err(e)?;
                t0 = std::time::Instant::now();
                allocs0 = dev.cache_stats().raw_allocs;
                waits0 = dev.host_waits();
            }
            keys.iter().for_each(|k| k.stage(&[i as u64]));
            if graph && i == warm - 1 {
                let (g, ()) = dev.capture(batch.clone(), |b| step(i, b).map_err(dptrain_core::Error::Device)).map_err(e)?;
                nodes = Some(g.nodes().map_err(e)?);
                captured = Some(g);
            }
            match &captured {
                Some(g) => g.replay().map_err(e)?,
                None => step(i, &batch)?,
            }
        }
        let waits = dev.host_waits() - waits0;
        dev.sync().map_err(e)?;
        let dt = t0.elapsed().as_secs_f64() / timed as f64;
        let allocs = dev.cache_stats().raw_allocs - allocs0;
        if graph {
            // A replay launches no kernel of its own to time.
            return Ok((dt, allocs, waits, vec![]));
        }
        // One more step with every launch timed (events around each: a little slower than the
        // timed steps, so only the shares are reported).
        dev.profile_start();
        step(warm + timed, &batch)?;
        Ok((dt, allocs, waits, dev.profile_stop().map_err(e)?))
    };
    let r = run();
    let attention = if dptrain_core::ops::fused::attention::gpu_uses_flash(&dev, cfg.d_model / cfg.n_heads, Precision::Bf16) {
        if fusions.flash_wide {
            "flash attention"
        } else {
            "flash attention, 64-row forward tiles"
        }
    } else {
        "unfused attention"
    };
    dev.set_fusions(before);
    let (dt, allocs, waits, profile) = r?;
    let tokens_per_s = (b * t) as f64 / dt;
    // FLOPs per token as nanoGPT's estimate_mfu: 6N for the matmuls with parameters plus
    // 12·L·T·C for attention scores and values.
    let n = params.numel() as f64;
    let per_token = 6.0 * n + 12.0 * (cfg.n_layers * t * cfg.d_model) as f64;
    let peak = peak_bf16(&dev.name);
    Ok(Perf {
        model: if dptrain_core::env::env().gpu_check_tiny {
            format!("{} (as a tiny test model, {:.2}M parameters)", preset.label, n / 1e6)
        } else {
            preset.label.clone()
        },
        batch: b,
        context: t,
        tokens_per_s,
        step_ms: dt * 1e3,
        mfu: per_token * tokens_per_s / peak,
        peak,
        raw_allocs_in_timed_steps: allocs,
        reserved_mib: dev.reserved_bytes() as f64 / (1u64 << 20) as f64,
        host_waits_per_step: waits as f64 / timed as f64,
        profile,
        attention,
        attn_fwd_flops: 2.0 * (b * t * t * cfg.d_model * cfg.n_layers) as f64,
        graph_nodes: nodes,
    })
}

/// Runs benches/gpt124m_torch.py (python from DPTRAIN_TORCH_PYTHON, else python3) with `args`,
/// eager or under torch.compile.
#[cfg(feature = "cuda")]
fn torch_tokens_per_s(args: &[&str], compile: bool) -> std::result::Result<TorchPerf, String> {
    let env = dptrain_core::env::env();
    let py = env.torch_python.clone().unwrap_or_else(|| "python3".into());
    let script = env.torch_script.clone();
    let mut cmd = std::process::Command::new(&py);
    cmd.arg(&script).args(args);
    if compile {
        cmd.arg("--compile");
    }
    let out = cmd.output().map_err(|e| format!("{py} {script}: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |k: &str| text.split_whitespace().find_map(|w| w.strip_prefix(k)).and_then(|v| v.parse::<f64>().ok());
    let sdpa_ms = field("sdpa_fwd_ms=").zip(field("sdpa_bwd_ms="));
    match (field("tokens_per_s="), field("step_ms="), field("peak_mib=")) {
        (Some(tokens_per_s), Some(step_ms), Some(peak_mib)) => Ok(TorchPerf { tokens_per_s, step_ms, peak_mib, sdpa_ms }),
        _ => Err(format!("{script}: {}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("no output"))),
    }
}
