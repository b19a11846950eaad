//! Everything before the first step: the config read (file or checkpoint, then `--set`), the
//! values that follow from the data and the world (micro-batch, accumulation, threads,
//! evaluation size), the model, parameters and optimizer built (`build`), a checkpoint loaded,
//! and the resolved config that is saved with the run. Nothing is written here, so bad input
//! never leaves a half-made run directory.

use crate::build::{build_model, build_optimizer, load_data, Data};
use crate::checkpoint;
use crate::config::{check_model_keys, DataKind, ModelKind, Raw, RunConfig, Windows};
use crate::error::{input_err, Result};
use crate::train::TrainArgs;
use dptrain_core::comm::Communicator;
use dptrain_core::data::StreamState;
use dptrain_core::model::Model;
use dptrain_core::{DType, Device, ParamBuilder, ParamStore};
use dptrain_models::NormKind;
use dptrain_optim::{Optimizer, Schedule};
use std::path::{Path, PathBuf};

/// Validation samples per evaluation when `train.eval_samples` is absent (fewer if the split is
/// smaller).
const DEFAULT_EVAL_SAMPLES: usize = 512;

/// Everything the loop needs, built and validated before any file is written.
pub struct Run {
    pub cfg: RunConfig,
    pub model: Box<dyn Model>,
    pub params: ParamStore,
    pub opt: Box<dyn Optimizer>,
    pub schedule: Schedule,
    pub data: Data,
    /// Samples per rank per micro-step, and micro-steps per optimizer step.
    pub micro_batch: usize,
    pub accum: usize,
    /// Validation samples per evaluation (the first ones of the split).
    pub eval_samples: usize,
    /// Training windows at random offsets (`data.windows = "random"`), else the sampler's.
    pub random_windows: bool,
    pub threads: usize,
    /// Lines printed (by rank 0) before training: settings that are valid but likely unintended.
    pub warnings: Vec<String>,
    /// Lines printed (by rank 0) before training: what derived settings resolved to.
    pub notes: Vec<String>,
    /// Tests: a rank to fail at a step.
    pub fault: Option<crate::fault::Fault>,
    pub start_step: u64,
    pub stream: StreamState,
    pub run_dir: PathBuf,
    pub resumed_from: Option<PathBuf>,
    /// The resolved config (every key, derived values, a `[derived]` table), as saved.
    pub config_toml: String,
    pub device: Device,
    /// The parameters as built from the seed, before any checkpoint was loaded (the
    /// distance-from-initialisation probe's w₀), when that probe is on.
    pub init_params: Option<dptrain_core::Tensor>,
    /// The alert detectors' running state (from the checkpoint on resume).
    pub detectors: crate::alerts::Detectors,
}

/// A fresh run directory: `dir` itself when it is absent or empty, else `dir-1`, `dir-2`, ...
/// (an earlier run's files are never overwritten).
fn fresh_dir(dir: &Path) -> PathBuf {
    let empty = |p: &Path| std::fs::read_dir(p).map(|mut r| r.next().is_none()).unwrap_or(true);
    if empty(dir) {
        return dir.to_path_buf();
    }
    (1..).map(|i| PathBuf::from(format!("{}-{i}", dir.display()))).find(|p| empty(p)).expect("some suffix is free")
}

/// A checkpoint's resolved config from before `data.windows`, `train.eval_samples` and
/// `model.norm` existed resumes as it ran: fixed windows (the only kind then), its
/// `train.eval_batches` dropped for the default number of evaluation samples, and
/// `model.batch_norm` as the `model.norm` it meant.
fn upgrade_checkpoint_config(t: &mut toml::Table) {
    if let Some(toml::Value::Table(model)) = t.get_mut("model") {
        if let Some(bn) = model.remove("batch_norm") {
            model.insert("norm".into(), if bn.as_bool() == Some(true) { "batch" } else { "none" }.into());
        }
    }
    if let Some(toml::Value::Table(train)) = t.get_mut("train") {
        train.remove("eval_batches");
    }
    if let Some(toml::Value::Table(data)) = t.get_mut("data") {
        let token_data = matches!(data.get("kind").and_then(|k| k.as_str()), Some("text" | "tokens" | "synthetic-lm"));
        if token_data && !data.contains_key("windows") {
            data.insert("windows".into(), "fixed".into());
        }
    }
}

/// Reads the config: the file (or, when resuming, the checkpoint's resolved config), then
/// `--set` overrides, checked and typed. Returns it with the checkpoint to resume from.
pub fn load_config(args: &TrainArgs) -> Result<(Raw, RunConfig, Option<PathBuf>)> {
    let ckpt = args.resume.as_deref().map(checkpoint::find).transpose()?;
    let mut table = match (&ckpt, &args.config) {
        (Some(c), None) => crate::config::parse_file(&c.join("config.toml"))?,
        (Some(_), Some(_)) => {
            return Err(input_err!("--resume takes its config from the checkpoint; pass changes with --set instead of a config file"))
        }
        (None, Some(p)) => crate::config::parse_file(p)?,
        (None, None) => toml::Table::new(),
    };
    table.remove("derived");
    if ckpt.is_some() {
        upgrade_checkpoint_config(&mut table);
    }
    crate::config::apply_sets(&mut table, &args.sets)?;
    let raw = Raw::new(table)?;
    let cfg = raw.typed()?;
    check_model_keys(&raw, cfg.model.kind)?;
    Ok((raw, cfg, ckpt))
}

/// Validates the whole run and builds it; writes nothing.
pub fn setup(args: &TrainArgs, raw: &Raw, mut cfg: RunConfig, ckpt: Option<PathBuf>, world: &dyn Communicator) -> Result<Run> {
    // The batch-size rules (optim.lr_scaling, schedule.warmup_samples, train.regime_adaptation)
    // rewrite the learning rates, steps and warmup before anything reads them.
    let mut notes = vec![];
    if let Some(a) = crate::config::batch_rules::apply(raw, &mut cfg)? {
        notes.push(format!("batch-size rules: {}", a.summary));
    }
    let w = world.world();
    let device_name = cfg.run.device.name();
    let device = dptrain_core::device::select(device_name, w.local_rank, w.local_size)
        .map_err(|e| input_err!("run.device: \"{device_name}\": {e}"))?;
    let (steps, global_batch, ws) = (cfg.train.steps, cfg.train.global_batch, w.world_size);
    let micro_batch = match cfg.train.micro_batch {
        0 => {
            if global_batch % ws != 0 {
                return Err(input_err!("train.global_batch: {global_batch} is not divisible by the {ws} ranks"));
            }
            global_batch / ws
        }
        m => m,
    };
    if global_batch % (micro_batch * ws) != 0 {
        return Err(input_err!("train.global_batch: {global_batch} is not divisible by train.micro_batch × ranks = {micro_batch} × {ws}"));
    }
    let accum = global_batch / (micro_batch * ws);
    // Every optimizer decides its steps on the device (SOAP all but its first and its basis
    // refreshes, which run eagerly between replays), every model's inputs are bound to its
    // batch, and several ranks are fine: NCCL's reductions are captured with the step.
    if cfg.train.cuda_graph && !matches!(device, Device::Cuda(_)) {
        return Err(input_err!("train.cuda_graph: true needs run.device = \"cuda\""));
    }
    if cfg.model.norm == NormKind::Ghost
        && matches!(cfg.model.kind, ModelKind::Mlp | ModelKind::Resnet)
        && micro_batch % cfg.model.ghost_batch != 0
    {
        return Err(input_err!(
            "model.ghost_batch: {} does not divide the micro-batch of {micro_batch} samples per rank (train.micro_batch, or train.global_batch / ranks)",
            cfg.model.ghost_batch
        ));
    }
    let schedule = Schedule {
        kind: cfg.schedule.kind,
        peak_lr: cfg.optim.lr,
        final_lr: cfg.schedule.final_lr,
        warmup_steps: cfg.schedule.warmup_steps,
        total_steps: steps,
    };
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = match cfg.run.threads {
        0 => (cores / w.local_size.max(1)).max(1),
        t if t > 4 * cores => {
            return Err(input_err!(
                "run.threads: {t} is more than 4 × the {cores} cores of this machine (at most {}; 0 = the cores divided by the processes on this node)",
                4 * cores
            ))
        }
        t => t,
    };
    let mut warnings = vec![];
    if schedule.warmup_steps > steps {
        warnings.push(format!(
            "schedule.warmup_steps = {} is more than train.steps = {steps}: the learning rate never reaches optim.lr = {:e}",
            schedule.warmup_steps, cfg.optim.lr
        ));
    }
    if cfg.train.cuda_graph && cfg.run.log_every == 1 {
        warnings.push(
            "train.cuda_graph: run.log_every = 1 logs every step, and logging steps run without the graph: no step is replayed".into(),
        );
    }
    let lm_data = cfg.data.kind.is_tokens();
    let random_windows = match cfg.data.windows {
        None => lm_data && cfg.data.kind != DataKind::SyntheticLm,
        Some(_) if !lm_data => return Err(input_err!("data.windows: only for token data (data.kind text, tokens or synthetic-lm)")),
        Some(w) => w == Windows::Random,
    };

    // This node's memory, shared by its ranks: what the data and the model must fit in.
    let budget = crate::memory::Budget::this_node(w.local_size);
    let data = load_data(&cfg, budget)?;
    if !random_windows && data.train.len() < micro_batch * ws {
        return Err(input_err!(
            "train.micro_batch: {micro_batch} × {ws} ranks exceeds the {} training samples of the data",
            data.train.len()
        ));
    }
    let n_val = data.val.len();
    let eval_samples = match cfg.train.eval_samples {
        None => DEFAULT_EVAL_SAMPLES.min(n_val),
        Some(0) => n_val,
        Some(n) if n > n_val => {
            return Err(input_err!("train.eval_samples: {n} is more than the {n_val} samples of the validation split (0 = all of them)"))
        }
        Some(n) => n,
    };
    let mut pb = ParamBuilder::new();
    let (model, model_table) = build_model(&cfg, &data, &mut pb, budget)?;
    let mut params = pb.build(cfg.run.seed, DType::F32)?;
    let mut opt = build_optimizer(&cfg, &params, ws)?;
    let init_params = if cfg.probes.distance { Some(dptrain_core::ops::flat::copy_of(params.flat())?) } else { None };
    let mut detectors = crate::alerts::Detectors::default();

    let (start_step, stream, run_dir, resumed_from) = match &ckpt {
        Some(c) => {
            let st = checkpoint::read_state(c)?;
            if st.step >= steps {
                return Err(input_err!(
                    "train.steps: the checkpoint is at step {} and train.steps is {steps}: nothing to do (continue with --set train.steps=N, N > {})",
                    st.step,
                    st.step
                ));
            }
            checkpoint::load(c, &st, &mut params, opt.as_mut())?;
            detectors = st.detectors;
            let run = c
                .parent()
                .and_then(Path::parent)
                .map(Path::to_path_buf)
                .ok_or_else(|| input_err!("{}: not inside a run directory", c.display()))?;
            // The sampler position is per rank; the global position is offset × ranks, so a
            // checkpoint resumes on a different number of ranks with the same global batch.
            let global = st.global_offset().expect("read_state checks the sampler position");
            if global % ws != 0 {
                return Err(input_err!(
                    "{}: the checkpoint's sampler position ({global} samples into epoch {}) does not divide over {ws} ranks",
                    c.display(),
                    st.stream.epoch
                ));
            }
            let stream = StreamState { epoch: st.stream.epoch, offset: global / ws };
            (st.step, stream, args.run_dir.clone().unwrap_or(run), Some(c.clone()))
        }
        None => {
            let name = &cfg.run.name;
            if name.is_empty() || name.contains('/') {
                return Err(input_err!("run.name: must be a non-empty name without '/', got \"{name}\""));
            }
            (
                0,
                StreamState { epoch: 0, offset: 0 },
                fresh_dir(&args.run_dir.clone().unwrap_or_else(|| PathBuf::from("runs").join(name))),
                None,
            )
        }
    };

    // The resolved config: every key with its value, the model's derived shape, and a
    // [derived] table; printed at start and saved with the run and each checkpoint.
    let mut resolved = raw.resolved_table(&["model"]);
    if cfg.schedule.warmup_samples.is_some() {
        // The warmup was given in samples: the default step count is not part of the config
        // (a resume must not read both).
        if let Some(toml::Value::Table(t)) = resolved.get_mut("schedule") {
            t.remove("warmup_steps");
        }
    }
    // Keys whose value follows from the data: written as resolved, so a resume reads them back.
    let mut set = |sec: &str, key: &str, v: toml::Value| {
        if let Some(toml::Value::Table(t)) = resolved.get_mut(sec) {
            t.insert(key.into(), v);
        }
    };
    if lm_data {
        set("data", "windows", if random_windows { "random" } else { "fixed" }.into());
    }
    set("train", "eval_samples", (eval_samples as i64).into());
    resolved.insert("model".into(), toml::Value::Table(model_table));
    let mut derived = toml::Table::new();
    derived.insert("micro_batch".into(), (micro_batch as i64).into());
    derived.insert("accum_steps".into(), (accum as i64).into());
    derived.insert("world_size".into(), (ws as i64).into());
    derived.insert("threads".into(), (threads as i64).into());
    derived.insert("parameters".into(), (params.numel() as i64).into());
    derived.insert("train_samples".into(), (data.train.len() as i64).into());
    // After the batch-size rules: what the schedule runs with.
    derived.insert("lr".into(), cfg.optim.lr.into());
    derived.insert("final_lr".into(), cfg.schedule.final_lr.into());
    derived.insert("steps".into(), (steps as i64).into());
    derived.insert("warmup_steps".into(), (cfg.schedule.warmup_steps as i64).into());
    if let Some(f) = data.floor {
        derived.insert("entropy_floor".into(), f.into());
    }
    resolved.insert("derived".into(), toml::Value::Table(derived));
    let config_toml = toml::to_string(&resolved)?;

    Ok(Run {
        cfg,
        model,
        params,
        opt,
        schedule,
        data,
        micro_batch,
        accum,
        eval_samples,
        random_windows,
        threads,
        warnings,
        notes,
        fault: args.fault,
        start_step,
        stream,
        run_dir,
        resumed_from,
        config_toml,
        device,
        init_params,
        detectors,
    })
}
