//! `dptrain train`: the training loop, read top to bottom as nanoGPT's is — batch →
//! forward/backward with gradient sync → clip → optimizer step → log → eval → checkpoint →
//! stop if a signal asked for it (`stop`).
//!
//! What surrounds it lives beside it: the config read and the run built in `setup` (through the
//! factories in `build`), rank agreement in `agree`, metrics and the progress bar in `metrics`,
//! checkpoint files in `checkpoint`. The gradient synchroniser (`GradSync`: MPI buckets on the
//! host or NCCL on the GPU) plugs into backward's "gradient final" events.

use crate::agree::{agree_on_setup, average_buffers, check_no_drift, sync_start};
use crate::alerts::{self, Events};
use crate::checkpoint::{self, State};
use crate::config::{CommDtype, OnNonFinite};
use crate::error::{LaunchError, Result};
use crate::metrics::{Eval, MetricSink, StepLog};
use crate::setup::{load_config, setup, Run};
use dptrain_comm::{GradReducer, GradSync, ReduceStats};
use dptrain_core::comm::{Communicator, ReduceOp};
use dptrain_core::data::{BatchStream, DistributedSampler};
use dptrain_core::model::Batch;
use dptrain_core::ops::flat::{copy_of, sum_squares, sum_squares_and, sum_squares_and_record, StepRecord};
use dptrain_core::probe::{anchor_of, ProbeSet, ProbeSink, Probes, Reduce};
use dptrain_core::rng::key_of;
use dptrain_core::{GradStore, Tape};
use dptrain_optim::{clip_to_norm, StepCtx};
use std::path::PathBuf;

/// Stream numbers of the counter-based draws keyed per micro-step (see `key_of`).
const WINDOW_STREAM: u64 = 1;
const DROPOUT_STREAM: u64 = 2;

/// What `dptrain train` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct TrainArgs {
    pub config: Option<PathBuf>,
    pub sets: Vec<String>,
    pub run_dir: Option<PathBuf>,
    pub resume: Option<PathBuf>,
    /// Tests: a rank to fail at a step (see `fault`).
    pub fault: Option<crate::fault::Fault>,
}

/// Summary of a finished run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub run_dir: PathBuf,
    pub steps: u64,
    pub final_loss: f64,
    pub final_val_loss: Option<f64>,
    pub final_val_acc: Option<f64>,
    pub entropy_floor: Option<f64>,
    pub gap_to_floor: Option<f64>,
    pub elapsed_s: f64,
    pub samples_per_s: f64,
    pub parameters: usize,
    pub model: String,
    /// Steps skipped for non-finite loss or gradients (`train.on_nonfinite = "skip"`).
    pub skipped_steps: u64,
    /// Steps run as a launch of the captured CUDA graph (`train.cuda_graph`; the step that was
    /// captured included).
    pub graph_steps: u64,
}

pub fn train(args: &TrainArgs) -> Result<Summary> {
    let (raw, cfg, ckpt) = load_config(args)?;
    let mut world = crate::world::discover(std::time::Duration::from_secs_f64(cfg.comm.timeout_s))?;
    let res = setup(args, &raw, cfg, ckpt, world.main.as_ref());
    let mut run = agree_on_setup(world.main.as_mut(), res)?;
    // Sets the compute thread pool once per process.
    let _ = rayon::ThreadPoolBuilder::new().num_threads(run.threads).build_global();
    sync_start(&mut run, world.main.as_mut())?;
    // Same values on every rank first (broadcast on the host), then onto the GPU.
    run.params.to_device(run.device)?;
    let mut grads = GradStore::try_new(&run.params)?;
    let c = &run.cfg.comm;
    let (bucket_mb, overlap, bf16) = (c.bucket_mb, c.overlap, c.dtype == CommDtype::Bf16);
    // The gradient synchroniser: MPI on the host, or NCCL on the GPU.
    let mut reducer: Option<Box<dyn GradSync>> = match (world.grads.take(), run.device) {
        (_, _) if world.info().world_size == 1 => None,
        #[cfg(feature = "cuda")]
        (host, dptrain_core::Device::Cuda(o)) => {
            use dptrain_comm::nccl::{NcclComm, NcclReducer};
            let dev = dptrain_core::tensor::cuda::dev(o)?;
            let comm = NcclComm::bootstrap(world.main.as_mut(), dev, host)?;
            let t = std::time::Duration::from_secs_f64(c.timeout_s);
            Some(Box::new(NcclReducer::new(comm, &run.params, bucket_mb, overlap, bf16, t)?))
        }
        (Some(c), _) => Some(Box::new(GradReducer::with_dtype(c, &run.params, bucket_mb, overlap, bf16))),
        (None, _) => None,
    };
    let out = train_loop(&mut run, &mut grads, world.main.as_mut(), world.optim.as_mut(), reducer.as_deref_mut());
    // The reducer (its communication thread, NCCL communicator) goes before the gradients.
    drop(reducer);
    drop(grads);
    out
}

fn train_loop(
    run: &mut Run,
    grads: &mut GradStore,
    comm: &mut dyn Communicator,
    optim_comm: &mut dyn Communicator,
    mut reducer: Option<&mut (dyn GradSync + 'static)>,
) -> Result<Summary> {
    let (rank, ws) = (comm.rank(), comm.world_size());
    let mut sink = MetricSink::open(run, rank == 0)?;
    announce(run, comm, reducer.as_deref());
    let cfg = run.cfg.clone();
    let (steps, log_every) = (cfg.train.steps, cfg.run.log_every);
    let sampler = DistributedSampler {
        len: run.data.train.len(),
        world: ws,
        rank,
        seed: cfg.run.seed,
        shuffle: cfg.data.shuffle,
        drop_last: cfg.data.drop_last,
    };
    let mut stream = BatchStream::new(sampler, run.stream);
    let (mut last_loss, mut last_val) = (f64::NAN, None);
    let mut tprobes = crate::probes::TrainProbes::new(&cfg.probes, &run.params, run.init_params.take())?;
    let mut events = Events::open(&run.run_dir, rank == 0, run.resumed_from.is_some().then_some(run.start_step))?;
    // Steps decided on the GPU whose records the host has not read yet, oldest first.
    let device_steps = run.params.flat().is_cuda();
    let mut pending: Vec<Pending> = vec![];
    // train.cuda_graph: steps that log and probe nothing replay one captured step.
    let mut graph = crate::graph_step::GraphStep::new(cfg.train.cuda_graph);
    let mut graph_steps = 0u64;
    // Its micro-steps' dropout keys, staged for each step where the graph's kernels read them.
    let step_keys = dptrain_core::ops::dropout::StepKeys::default();
    // The EMA factor per critical-batch measurement: 0.99 per step, measured every interval.
    let cbs_beta = 0.99f64.powf(cfg.probes.interval as f64);
    if cfg.train.eval_at_start && run.start_step == 0 {
        // The loss at initialisation (LR sweeps count a diverged run at it).
        let ev = evaluate(run, comm)?;
        sink.log_eval(0, &ev, run.data.floor)?;
    }

    for step in run.start_step..steps {
        let done = step + 1;
        if let Some(f) = &run.fault {
            f.fire_if(rank, done);
        }
        let lr = run.schedule.lr(step);
        // Probes are computed on probe steps; records are written on those and logging steps.
        let probe_step = tprobes.is_probe_step(done, steps);
        let log_step = done % log_every == 0 || done == steps || probe_step;
        // On a logging step that is not a probe step the sink takes only what is free (the
        // loss's parts, the batch's accuracy), no probe family.
        let mut probes = Probes::with_set(log_step, if probe_step { cfg.probes.model_set() } else { ProbeSet::NONE });
        // The critical batch needs a gradient at a smaller batch: each rank's own before the
        // all-reduce (which then runs after backward, not overlapped), or with one rank each
        // micro-batch's (the difference of successive accumulations).
        let cbs = probe_step && cfg.probes.critical_batch;
        let (cbs_ranks, cbs_micro) = (cbs && ws > 1, cbs && ws == 1 && run.accum > 1);
        let (mut micro_sq, mut prev_acc) = (0.0, None);
        let poisoned = run.fault.is_some_and(|f| f.poisons(rank, done));
        // Random windows and dropout masks: counter-based draws keyed by where they are used,
        // so a resumed run draws what the uninterrupted one did and ranks differ.
        let key = |micro: usize, stream: u64| key_of(&[cfg.run.seed, stream, step, rank as u64, micro as u64]);
        // Each micro-step's loss stays on the device until the one read after the reduction.
        let (mut losses, mut comm_stats, mut cbs_small) = (Vec::with_capacity(run.accum), None, None);
        // (SOAP's first step and its refreshes are the host's: they run eagerly between replays.)
        let graphed = graph.enabled() && run.opt.decides_next_step_on_device(&run.params) && !log_step && !poisoned;
        if graphed {
            // The whole step on the device, captured once and replayed (see graph_step); its
            // record read on the next step that needs the host, as below.
            let batches =
                (0..run.accum).map(|micro| next_batch(run, &mut stream, key(micro, WINDOW_STREAM))).collect::<Result<Vec<_>>>()?;
            run.opt.stage_device_lr(lr);
            step_keys.stage(&(0..run.accum).map(|micro| key(micro, DROPOUT_STREAM)).collect::<Vec<_>>());
            let (device, at) = (run.device, crate::graph_step::addresses(&run.params, grads));
            // Several GPUs: the reductions are part of the step (NCCL inside the graph); an
            // unmeasured pass never waits for the device.
            if let Some(r) = reducer.as_deref_mut() {
                r.measure_next(false);
            }
            // Whether the closure ran (eagerly or captured) or the graph replayed alone.
            let mut ran = false;
            let (rec, note, launched) = graph.step(device, at, batches, |batches| {
                ran = true;
                grads.zero_grad();
                // The kernels read the dropout keys from the device (a replay's staged ones).
                let on_device = step_keys.upload(device)?;
                let mut losses = Vec::with_capacity(batches.len());
                for (micro, batch) in batches.iter().enumerate() {
                    let no_probes = &mut Probes::with_set(false, ProbeSet::NONE);
                    let keys = (key(micro, DROPOUT_STREAM), on_device.get(micro).cloned());
                    let sync = micro + 1 == batches.len();
                    losses.push(forward_backward(run, grads, reducer.as_deref_mut(), batch, keys, sync, no_probes)?.0);
                }
                let rec = sum_squares_and_record(grads.flat(), &losses)?;
                let ctx = &mut StepCtx { step: done, lr, comm: optim_comm };
                if !run.opt.step_on_device(&mut run.params, grads, ctx, &rec, cfg.optim.clip)? {
                    return Err(LaunchError::Runtime("train.cuda_graph: the optimizer did not decide the step on the device".into()));
                }
                Ok(rec)
            })?;
            if let (true, Some(r)) = (launched, reducer.as_deref_mut()) {
                r.after_replay()?;
            }
            if !ran {
                run.opt.replayed();
            }
            graph_steps += u64::from(launched);
            if let (Some(note), 0) = (note, rank) {
                crate::say(&format!("dptrain: step {done}: {note}"));
            }
            pending.push(Pending { step: done, rec, poisoned: false, comm: None });
        } else {
            grads.zero_grad();
            // A logging step reports the reduction's timing (NCCL: the host waits for it then).
            if let Some(r) = reducer.as_deref_mut() {
                r.measure_next(log_step);
            }
            for micro in 0..run.accum {
                let batch = next_batch(run, &mut stream, key(micro, WINDOW_STREAM))?;
                // Gradients are communicated on the last micro-step only (DDP's no_sync).
                let sync = micro + 1 == run.accum && !cbs_ranks;
                let (loss, stats) =
                    forward_backward(run, grads, reducer.as_deref_mut(), &batch, (key(micro, DROPOUT_STREAM), None), sync, &mut probes)?;
                losses.push(loss);
                comm_stats = comm_stats.or(stats);
                if cbs_micro {
                    let acc = copy_of(grads.flat())?;
                    let own = match &prev_acc {
                        Some(p) => tprobes.total_diff_sq(&acc, p)?,
                        None => sum_squares(&acc)?,
                    };
                    // Each micro-step adds its mean-loss gradient / accum.
                    micro_sq += own * (run.accum * run.accum) as f64;
                    prev_acc = Some(acc);
                }
            }
            cbs_small = cbs_micro.then(|| (micro_sq / run.accum as f64, run.micro_batch as f64));
            if cbs_ranks {
                if let Some(r) = reducer.as_deref_mut() {
                    let local = sum_squares(grads.flat())?;
                    comm_stats = Some(r.reduce_all(grads)?);
                    cbs_small = Some((mean_over_ranks(comm, local)?, (run.micro_batch * run.accum) as f64));
                }
            }
            if poisoned {
                dptrain_core::ops::flat::scale_in_place(grads.flat_tensor_mut(), f32::NAN)?;
            }
        }
        let mut extra = vec![];
        let eval_now = (cfg.train.eval_every > 0 && done % cfg.train.eval_every == 0) || done == steps;
        let save_now = (cfg.train.checkpoint_every > 0 && done % cfg.train.checkpoint_every == 0) || done == steps;
        let drift_now = cfg.comm.check_every > 0 && ws > 1 && done % cfg.comm.check_every == 0;
        // On a GPU the step is decided there (the optimizer's gate: non-finite check, clipping)
        // and its record — Σg², the micro-step losses — read on the next step that needs the
        // host anyway (logging, evaluation, checkpoint): no wait for the device on the others.
        // Probe and critical-batch steps read the gradient on the host, as before.
        let mut record = None;
        if device_steps && !probe_step && !cbs && !graphed {
            let rec = sum_squares_and_record(grads.flat(), &losses)?;
            if run.opt.step_on_device(&mut run.params, grads, &mut StepCtx { step: done, lr, comm: optim_comm }, &rec, cfg.optim.clip)? {
                pending.push(Pending { step: done, rec, poisoned, comm: comm_stats.take() });
            } else {
                record = Some(rec);
            }
        }
        // (loss, gradient norm) of this step once known on the host.
        let mut now = None;
        if pending.last().is_none_or(|p| p.step != done) {
            // The waiting path: what is pending first, so events come in step order.
            settle(run, comm, &mut events, &mut pending, &mut last_loss)?;
            // The step's one wait for the device: the gradient's Σg² and the micro-step losses,
            // read together.
            let (grad_sq, micro_losses) = match record {
                Some(rec) => rec.read().map(|(sq, _, l)| (sq, l))?,
                None => sum_squares_and(grads.flat(), &losses)?,
            };
            let loss_sum = if poisoned { f64::NAN } else { micro_losses.iter().sum::<f64>() };
            let loss = mean_over_ranks(comm, loss_sum / run.accum as f64)?;
            // The trainer's own probes, the same on every rank: joined after the reduction.
            if probe_step {
                tprobes.before_step(&run.params, grads, &mut extra)?;
            }
            let grad_norm = grad_sq.sqrt();
            clip_to_norm(grads, cfg.optim.clip, grad_norm)?;
            if let Some(ev) = run.detectors.loss_spike(done, loss, cfg.probes.spike_sigma) {
                events.emit(&ev)?;
            }
            if loss.is_finite() && grad_norm.is_finite() {
                // A finite norm: every gradient is finite, which SOAP then need not check again.
                run.opt.step_finite(&mut run.params, grads, &mut StepCtx { step: done, lr, comm: optim_comm })?;
                last_loss = loss;
                if probe_step {
                    tprobes.after_step(&run.params, run.opt.as_ref(), &mut extra)?;
                }
                if let Some((g2_small, b_small)) = cbs_small {
                    let b_big = cfg.train.global_batch as f64;
                    extra.extend(run.detectors.cbs.update(g2_small, b_small, grad_norm * grad_norm, b_big, cbs_beta));
                }
            } else {
                nonfinite(run, &mut events, done, loss, grad_norm, true)?;
            }
            now = Some((loss, grad_norm, comm_stats.take()));
        }
        sink.step_done(done, cfg.train.global_batch);
        if log_step || eval_now || save_now || drift_now {
            if let Some(p) = settle(run, comm, &mut events, &mut pending, &mut last_loss)? {
                now = Some(p);
            }
        }

        if drift_now {
            check_no_drift(comm, &run.params, done)?;
        }
        if log_step {
            let (loss, grad_norm, comm_stats) = now.expect("a logging step's record is read");
            // Probes still on the device are read in one transfer, then combined over
            // micro-steps and over ranks, each by its own reduction.
            probes.resolve()?;
            probes.finish_mean(run.accum);
            reduce_probes(comm, &mut probes)?;
            for ev in alerts::probe_alerts(done, &probes.values, cfg.probes.max_logit_warn) {
                events.emit(&ev)?;
            }
            probes.values.extend(extra);
            sink.log_step(StepLog { step: done, loss, lr, grad_norm, comm: comm_stats, probes: &probes.values })?;
        }
        if eval_now || save_now {
            // Evaluation and checkpoints use the ranks' average running statistics.
            average_buffers(comm, &run.params, done)?;
        }
        if eval_now {
            let ev = evaluate(run, comm)?;
            sink.log_eval(done, &ev, run.data.floor)?;
            last_val = Some(ev);
        }
        if save_now {
            save_checkpoint(run, comm, done, &stream)?;
        }
        // A signal (a Slurm time limit or preemption, the SIGUSR1 `dptrain launch` forwards
        // when it is stopped) ends the run here, at the
        // same step on every rank, with a checkpoint (see `stop`). At the last step it is done.
        if let (Some(signal), false) = (crate::stop::agreed(comm)?, done == steps) {
            if !save_now {
                settle(run, comm, &mut events, &mut pending, &mut last_loss)?;
                average_buffers(comm, &run.params, done)?;
                save_checkpoint(run, comm, done, &stream)?;
            }
            sink.finish();
            let message = if rank == 0 {
                format!(
                    "stopped by {} after step {done} of {steps}: checkpoint {}; continue with `dptrain train --resume {}`",
                    crate::stop::name(signal),
                    checkpoint::step_dir(&run.run_dir, done).display(),
                    run.run_dir.display()
                )
            } else {
                String::new()
            };
            return Err(LaunchError::Stopped { signal, message });
        }
    }
    let (elapsed_s, samples_per_s) = sink.finish();
    let summary = Summary {
        run_dir: run.run_dir.clone(),
        steps,
        final_loss: last_loss,
        final_val_loss: last_val.as_ref().map(|e| e.loss),
        final_val_acc: last_val.as_ref().and_then(|e| e.acc),
        entropy_floor: run.data.floor,
        gap_to_floor: run.data.floor.zip(last_val.as_ref()).map(|(f, v)| v.loss - f),
        elapsed_s,
        samples_per_s,
        parameters: run.params.numel(),
        model: run.model.describe(),
        skipped_steps: run.detectors.skipped,
        graph_steps,
    };
    if rank == 0 {
        write_summary(&summary)?;
    }
    Ok(summary)
}

/// The next micro-batch: windows at random offsets (keyed draws), or the sampler's next indices.
fn next_batch(run: &Run, stream: &mut BatchStream, key: u64) -> Result<Batch> {
    if run.random_windows {
        run.data
            .train
            .random_windows(key, run.micro_batch)
            .ok_or_else(|| LaunchError::Runtime("data.windows = \"random\" needs token data".into()))
    } else {
        Ok(run.data.train.batch(&stream.next_indices(run.micro_batch)))
    }
}

/// A step decided on the GPU, its record not yet read.
struct Pending {
    step: u64,
    rec: StepRecord,
    /// The fault injector poisoned its gradient (its loss is reported as NaN, as on the
    /// waiting path).
    poisoned: bool,
    comm: Option<ReduceStats>,
}

/// Reads the records of the pending steps (in order) and does for each what the waiting path
/// does once its numbers are on the host: the loss averaged over ranks, the spike detector,
/// the non-finite alert (the device skipped the update when the gradient norm was not finite).
/// Returns the last one's (loss, gradient norm, reduction timing).
fn settle(
    run: &mut Run,
    comm: &mut dyn Communicator,
    events: &mut Events,
    pending: &mut Vec<Pending>,
    last_loss: &mut f64,
) -> Result<Option<(f64, f64, Option<ReduceStats>)>> {
    let mut last = None;
    for p in pending.drain(..) {
        let (grad_sq, applied, micro_losses) = p.rec.read()?;
        let loss_sum = if p.poisoned { f64::NAN } else { micro_losses.iter().sum::<f64>() };
        let loss = mean_over_ranks(comm, loss_sum / run.accum as f64)?;
        let grad_norm = grad_sq.sqrt();
        if let Some(ev) = run.detectors.loss_spike(p.step, loss, run.cfg.probes.spike_sigma) {
            events.emit(&ev)?;
        }
        if loss.is_finite() && applied {
            *last_loss = loss;
        } else {
            nonfinite(run, events, p.step, loss, grad_norm, !applied)?;
        }
        last = Some((loss, grad_norm, p.comm));
    }
    Ok(last)
}

/// A step with a non-finite loss or gradient norm: the alert, then the error
/// (`train.on_nonfinite = "error"`) or the count of skipped steps.
fn nonfinite(run: &mut Run, events: &mut Events, step: u64, loss: f64, grad_norm: f64, skipped: bool) -> Result<()> {
    let skip = run.cfg.train.on_nonfinite == OnNonFinite::Skip;
    events.emit(&alerts::nonfinite(step, loss, grad_norm, skip))?;
    if !skip {
        return Err(LaunchError::Runtime(format!(
            "step {step}: loss {loss}, gradient norm {grad_norm} — training diverged (lower optim.lr or set optim.clip; train.on_nonfinite = \"skip\" skips such steps)"
        )));
    }
    if skipped {
        run.detectors.skipped += 1;
    }
    Ok(())
}

/// One micro-step: forward, then backward through the gradient synchroniser (buckets are
/// all-reduced while backward goes on; on the last micro-step the gradients are the averages
/// over ranks when it returns), probes kept. Returns the micro-batch loss (a one-element tensor,
/// on a GPU still there) and, when it synchronised, the reduction's timing. `dropout_key`: the
/// tape's key, and the same in device memory for a step a CUDA graph replays.
fn forward_backward(
    run: &Run,
    grads: &mut GradStore,
    reducer: Option<&mut (dyn GradSync + 'static)>,
    batch: &Batch,
    dropout_key: (u64, Option<dptrain_core::ops::dropout::DeviceKey>),
    sync: bool,
    probes: &mut Probes,
) -> Result<(dptrain_core::Tensor, Option<ReduceStats>)> {
    let tape = Tape::new();
    tape.set_precision(run.cfg.train.precision);
    tape.set_rng_key(dropout_key.0);
    tape.set_device_rng_key(dropout_key.1);
    let mut mine = Probes::with_set(probes.enabled(), probes.set());
    let loss = run.model.loss(&tape, &run.params, batch, true, &mut mine)?;
    let value = loss.value();
    // Mean over micro-steps: scale each micro-step's gradient by 1/accum.
    let scaled = if run.accum > 1 { loss.scale(1.0 / run.accum as f64)? } else { loss };
    let stats = match reducer {
        Some(r) => r.backward(&tape, scaled, grads, sync)?,
        None => {
            tape.backward(scaled, grads, |_, _| {})?;
            None
        }
    };
    probes.accumulate(mine);
    Ok((value, stats))
}

/// Prints what is about to run (rank 0), and each rank's place in the world.
fn announce(run: &Run, comm: &dyn Communicator, reducer: Option<&(dyn GradSync + 'static)>) {
    let w = comm.world();
    let ws = w.world_size;
    tracing::info!(rank = w.rank, world = w.world_size, local_rank = w.local_rank, local_size = w.local_size, host = %w.host, "world");
    if ws > 1 {
        // Placement, one line per rank (printed whole: launchers tag each write).
        let line = format!(
            "dptrain: rank {}/{} local rank {}/{} on {}: {}, {} threads\n",
            w.rank,
            w.world_size,
            w.local_rank,
            w.local_size,
            w.host,
            dptrain_core::device::describe(run.device),
            run.threads
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    }
    if w.rank != 0 {
        return;
    }
    println!("dptrain: {} | {}", run.model.describe(), run.data.describe);
    println!(
        "dptrain: {} parameters, global batch {} = {} micro × {} accum × {} ranks, {} threads per rank, run dir {}",
        run.params.numel(),
        run.cfg.train.global_batch,
        run.micro_batch,
        run.accum,
        ws,
        run.threads,
        run.run_dir.display()
    );
    if let Some(r) = reducer {
        println!("dptrain: world of {ws} ranks; {} gradient buckets, overlap {}", r.buckets().len(), run.cfg.comm.overlap);
    }
    if let Some(c) = &run.resumed_from {
        println!("dptrain: resumed from {} at step {}", c.display(), run.start_step);
    }
    for n in &run.notes {
        println!("dptrain: {n}");
    }
    for w in &run.warnings {
        crate::say(&format!("dptrain: warning: {w}"));
    }
}

/// Rank 0 writes the checkpoint (no collective inside the rank-0 branch); everyone waits after.
fn save_checkpoint(run: &Run, comm: &mut dyn Communicator, done: u64, stream: &BatchStream) -> Result<()> {
    if comm.rank() == 0 {
        let (opt_tensors, scalars) = run.opt.state(&run.params)?;
        let st = State {
            format: checkpoint::FORMAT,
            step: done,
            stream: stream.state(),
            world_size: comm.world_size(),
            optimizer: run.opt.name().into(),
            optimizer_scalars: scalars,
            fingerprint: run.params.layout_fingerprint(),
            seed: run.cfg.run.seed,
            detectors: run.detectors,
        };
        checkpoint::save(&run.run_dir, done, &run.params, &opt_tensors, &st, &run.config_toml, run.cfg.checkpoint.keep_last)?;
    }
    comm.barrier()?;
    Ok(())
}

/// `summary.json` in the run directory, and the closing line.
fn write_summary(summary: &Summary) -> Result<()> {
    let text = serde_json::to_string_pretty(summary).map_err(|e| LaunchError::Runtime(e.to_string()))?;
    dptrain_core::checkpoint::atomic_write(&summary.run_dir.join("summary.json"), text.as_bytes())?;
    let elapsed = summary.elapsed_s;
    match (summary.final_val_loss, summary.entropy_floor) {
        (Some(v), Some(f)) => {
            // A deterministic source's floor is 0: no percentage of it.
            let pct = if f > 0.0 { format!(" ({:.1}% of the floor)", 100.0 * (v - f) / f) } else { String::new() };
            println!(
                "dptrain: done in {elapsed:.1} s — val loss {v:.4} vs entropy floor {f:.4}: {:.4} nats/token above the best achievable{pct}",
                v - f
            )
        }
        (Some(v), None) => {
            let acc = summary.final_val_acc.map(|a| format!(", val acc {a:.4}")).unwrap_or_default();
            println!("dptrain: done in {elapsed:.1} s — val loss {v:.4}{acc}")
        }
        _ => println!("dptrain: done in {elapsed:.1} s"),
    }
    Ok(())
}

/// Evaluates the first `eval_samples` validation samples — the same ones every time, whatever
/// the batch size or the number of ranks — split over the ranks and read in chunks of
/// `micro_batch`; every rank gets the means over all of them.
fn evaluate(run: &Run, comm: &mut dyn Communicator) -> Result<Eval> {
    let (rank, ws) = (comm.rank(), comm.world_size());
    let mine: Vec<usize> = (rank..run.eval_samples).step_by(ws).collect();
    // Sums over samples of: cross-entropy, z-loss, accuracy; then the sample count and whether
    // the model reported z-loss / accuracy (a rank with no samples cannot know on its own).
    let mut sums = [0.0f64; 6];
    for chunk in mine.chunks(run.micro_batch.max(1)) {
        let tape = Tape::inference();
        tape.set_precision(run.cfg.train.precision);
        // The statistics evaluation reports (z-loss, accuracy), none of the probe families.
        let mut probes = Probes::with_set(true, ProbeSet::NONE);
        let loss = run.model.loss(&tape, &run.params, &run.data.val.batch(chunk), false, &mut probes)?.item()?;
        let (z, acc, n) = (probes.get("z_loss"), probes.get("acc"), chunk.len() as f64);
        sums[0] += (loss - z.unwrap_or(0.0)) * n;
        sums[1] += z.unwrap_or(0.0) * n;
        sums[2] += acc.unwrap_or(0.0) * n;
        sums[3] += n;
        sums[4] = sums[4].max(z.is_some() as u8 as f64);
        sums[5] = sums[5].max(acc.is_some() as u8 as f64);
    }
    reduce_f64(comm, &mut sums, ReduceOp::Sum)?;
    let n = sums[3].max(1.0);
    Ok(Eval { loss: sums[0] / n, z_loss: (sums[4] > 0.0).then(|| sums[1] / n), acc: (sums[5] > 0.0).then(|| sums[2] / n) })
}

/// Combines probe values over ranks, each group of probes by its reduction (one collective per
/// reduction kind; every rank records the same probes, so every rank makes the same calls).
fn reduce_probes(comm: &mut dyn Communicator, probes: &mut Probes) -> Result<()> {
    // Each location's own anchor value on this rank, before the maxima are reduced.
    let local: Vec<Option<f64>> = probes.values.iter().filter(|p| p.1 == Reduce::At).map(|p| probes.get(anchor_of(&p.0))).collect();
    for (kind, op, sign) in [
        (Reduce::Mean, ReduceOp::Avg, 1.0),
        (Reduce::Max, ReduceOp::Max, 1.0),
        (Reduce::Min, ReduceOp::Max, -1.0),
        (Reduce::Sum, ReduceOp::Sum, 1.0),
    ] {
        // A minimum is the negated maximum of the negated values.
        let mut v: Vec<f64> = probes.values.iter().filter(|p| p.1 == kind).map(|p| sign * p.2).collect();
        reduce_f64(comm, &mut v, op)?;
        for (p, x) in probes.values.iter_mut().filter(|p| p.1 == kind).zip(v) {
            p.2 = sign * x;
        }
    }
    // A location comes from a rank whose anchor is the maximum over ranks (the largest such
    // location on a tie); the others offer −1. Compared in f32, the collectives' precision.
    let global: Vec<Option<f64>> = probes.values.iter().filter(|p| p.1 == Reduce::At).map(|p| probes.get(anchor_of(&p.0))).collect();
    let mut offer: Vec<f64> = probes
        .values
        .iter()
        .filter(|p| p.1 == Reduce::At)
        .zip(local.iter().zip(&global))
        .map(|(p, (l, g))| if l.map(|x| x as f32) == g.map(|x| x as f32) { p.2 } else { -1.0 })
        .collect();
    reduce_f64(comm, &mut offer, ReduceOp::Max)?;
    for (p, x) in probes.values.iter_mut().filter(|p| p.1 == Reduce::At).zip(offer) {
        p.2 = x;
    }
    Ok(())
}

/// The mean of a value over ranks (through the f32 collectives; exact in a world of one).
fn mean_over_ranks(comm: &mut dyn Communicator, x: f64) -> Result<f64> {
    let mut v = [x];
    reduce_f64(comm, &mut v, ReduceOp::Avg)?;
    Ok(v[0])
}

/// Reduces f64 values over ranks through the f32 collectives; exact in a world of one.
fn reduce_f64(comm: &mut dyn Communicator, v: &mut [f64], op: ReduceOp) -> Result<()> {
    if comm.world_size() == 1 || v.is_empty() {
        return Ok(());
    }
    let mut f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    comm.all_reduce(&mut f, op)?;
    for (a, b) in v.iter_mut().zip(f) {
        *a = b as f64;
    }
    Ok(())
}
