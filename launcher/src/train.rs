//! `dptrain train`: the training loop, written out top to bottom.
//!
//! Setup validates everything the user gave (config, data files, a checkpoint to resume) before
//! anything is written, so bad input never leaves a half-made run directory. The loop is the
//! architecture's training step: micro-steps with backward (the data-parallel issue plugs its
//! gradient reducer into the backward callback and a communicator into `world`), clipping, a
//! finiteness check, the optimizer step, metrics, evaluation and checkpoints.

use crate::checkpoint::{self, State};
use crate::config::{check_model_keys, Raw};
use crate::error::{input_err, LaunchError, Result};
use dptrain_comm::{GradReducer, GradSync};
use dptrain_core::comm::{Communicator, ReduceOp};
use dptrain_core::data::files::{load_npy_images, load_text, load_tokens_u16};
use dptrain_core::data::synthetic::{synthetic_images, MarkovSource};
use dptrain_core::data::{BatchStream, Dataset, DistributedSampler, ImageSet, StreamState, TokenWindows};
use dptrain_core::model::Model;
use dptrain_core::probe::{Probes, Reduce};
use dptrain_core::rng::key_of;
use dptrain_core::{DType, Device, GradStore, ParamBuilder, ParamStore, Precision, Tape};
use dptrain_models::{Gpt, GptConfig, Mlp, MlpConfig, ResNet, ResNetConfig};
use dptrain_optim::{clip_grad_norm, AdamW, AdamWConfig, DecayMode, Optimizer, Schedule, ScheduleKind, Sgd, SgdConfig};
use serde_json::{json, Map, Value};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Stream numbers of the counter-based draws keyed per micro-step (see `key_of` in the loop).
const WINDOW_STREAM: u64 = 1;
const DROPOUT_STREAM: u64 = 2;

/// Validation samples per evaluation when `train.eval_samples` is absent (fewer if the split is
/// smaller).
const DEFAULT_EVAL_SAMPLES: usize = 512;

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

/// The run's data.
pub struct Data {
    pub train: Box<dyn Dataset>,
    pub val: Box<dyn Dataset>,
    /// Best achievable loss (nats per token), when the source is known exactly.
    pub floor: Option<f64>,
    pub vocab: Option<usize>,
    pub image_shape: Option<[usize; 3]>,
    pub classes: Option<usize>,
    pub describe: String,
}

/// Everything the loop needs, built and validated before any file is written.
pub struct Run {
    pub raw: Raw,
    pub model: Box<dyn Model>,
    pub params: ParamStore,
    pub opt: Box<dyn Optimizer>,
    pub schedule: Schedule,
    pub data: Data,
    pub steps: u64,
    pub global_batch: usize,
    pub micro_batch: usize,
    pub accum: usize,
    pub clip: f64,
    pub seed: u64,
    pub log_every: u64,
    pub eval_every: u64,
    /// Validation samples per evaluation (the first ones of the split).
    pub eval_samples: usize,
    /// Training windows at random offsets (`data.windows = "random"`), else the sampler's.
    pub random_windows: bool,
    /// Lines printed (by rank 0) before training: settings that are valid but likely unintended.
    pub warnings: Vec<String>,
    /// Tests: a rank to fail at a step.
    pub fault: Option<crate::fault::Fault>,
    pub checkpoint_every: u64,
    pub keep_last: usize,
    pub threads: usize,
    pub start_step: u64,
    pub stream: StreamState,
    pub run_dir: PathBuf,
    pub resumed_from: Option<PathBuf>,
    pub config_toml: String,
    pub device: Device,
    pub precision: Precision,
    pub comm_bf16: bool,
}

fn nonneg_f(raw: &Raw, key: &str) -> Result<f64> {
    let v = raw.float(key);
    if !(v.is_finite() && v >= 0.0) {
        return Err(input_err!("{key}: must be a finite number ≥ 0, got {v}"));
    }
    Ok(v)
}

fn dropout_p(raw: &Raw) -> Result<f64> {
    let p = raw.float("model.dropout");
    if !(0.0..1.0).contains(&p) {
        return Err(input_err!("model.dropout: must be a probability in [0, 1), got {p}"));
    }
    Ok(p)
}

fn data_path(raw: &Raw, key: &str) -> Result<PathBuf> {
    let p = raw.str(key);
    if p.is_empty() {
        return Err(input_err!("{key}: required for data.kind = \"{}\"", raw.str("data.kind")));
    }
    Ok(PathBuf::from(p))
}

fn val_fraction(raw: &Raw) -> Result<f64> {
    let vf = raw.float("data.val_fraction");
    if !(0.0..1.0).contains(&vf) {
        return Err(input_err!("data.val_fraction: must be in [0, 1), got {vf}"));
    }
    Ok(vf)
}

/// Splits a token stream at `1 - val_fraction`.
fn split_tokens(t: Vec<u32>, raw: &Raw, context: usize, path: &Path) -> Result<(TokenWindows, TokenWindows)> {
    let vf = val_fraction(raw)?;
    let cut = ((t.len() as f64) * (1.0 - vf)) as usize;
    let (tr, va) = (t[..cut].to_vec(), t[cut.saturating_sub(1)..].to_vec());
    if tr.len() <= context || va.len() <= context {
        return Err(input_err!(
            "{}: {} tokens is too short for model.context = {context} with data.val_fraction = {vf}",
            path.display(),
            t.len()
        ));
    }
    Ok((TokenWindows::new(tr, context), TokenWindows::new(va, context)))
}

fn load_data(raw: &Raw, kind: &str, model_kind: &str, seed: u64) -> Result<Data> {
    let lm = model_kind == "gpt";
    let context = raw.positive("model.context")?;
    let need = |is_lm_data: bool| -> Result<()> {
        if is_lm_data != lm {
            return Err(input_err!("data.kind: \"{kind}\" does not fit model.kind = \"{model_kind}\" (gpt takes synthetic-lm, text or tokens; mlp/resnet take synthetic-images or npy)"));
        }
        Ok(())
    };
    let tokens = |tr: TokenWindows, va: TokenWindows, floor, vocab, describe| Data {
        train: Box::new(tr),
        val: Box::new(va),
        floor,
        vocab: Some(vocab),
        image_shape: None,
        classes: None,
        describe,
    };
    let images = |tr: ImageSet, va: ImageSet, describe: String| {
        let (shape, classes) = (tr.shape, tr.num_classes().max(va.num_classes()));
        Data {
            train: Box::new(tr),
            val: Box::new(va),
            floor: None,
            vocab: None,
            image_shape: Some(shape),
            classes: Some(classes),
            describe,
        }
    };
    match kind {
        "synthetic-lm" => {
            need(true)?;
            let (v, order, br) = (raw.positive("data.vocab")?, raw.positive("data.order")?, raw.positive("data.branching")?);
            if (v as f64).powi(order as i32) > 4e6 {
                return Err(input_err!("data.order: vocab^order = {v}^{order} states is too many (limit 4e6)"));
            }
            let src = MarkovSource::new(v, order, br.min(v), seed);
            let (ntr, nva) = (raw.positive("data.train_tokens")?, raw.positive("data.val_tokens")?);
            if ntr <= context || nva <= context {
                return Err(input_err!("data.train_tokens / data.val_tokens: must exceed model.context = {context}"));
            }
            let floor = src.entropy_rate();
            let d = format!("synthetic-lm (order-{order} Markov, vocab {v}, {br} successors, entropy {floor:.4} nats/token)");
            Ok(tokens(
                TokenWindows::new(src.sample(ntr, seed), context),
                TokenWindows::new(src.sample(nva, seed ^ 0x5eed), context),
                Some(floor),
                v,
                d,
            ))
        }
        "text" => {
            need(true)?;
            let p = data_path(raw, "data.path")?;
            let t = load_text(&p)?;
            let (tr, va) = split_tokens(t, raw, context, &p)?;
            Ok(tokens(tr, va, None, 256, format!("text {} (byte tokens)", p.display())))
        }
        "tokens" => {
            need(true)?;
            let p = data_path(raw, "data.path")?;
            let t = load_tokens_u16(&p)?;
            let (tr, va) = split_tokens(t, raw, context, &p)?;
            let vocab = tr.max_token().max(va.max_token()) as usize + 1;
            Ok(tokens(tr, va, None, vocab, format!("tokens {} (uint16)", p.display())))
        }
        "synthetic-images" => {
            need(false)?;
            let (s, c, k) = (raw.positive("data.image_size")?, raw.positive("data.channels")?, raw.positive("data.classes")?);
            let (n, nv) = (raw.positive("data.samples")?, raw.positive("data.val_samples")?);
            let noise = nonneg_f(raw, "data.noise")?;
            let all = synthetic_images(n + nv, [c, s, s], k, noise, seed);
            let (tr, va) = all.split(nv);
            Ok(images(tr, va, format!("synthetic-images ({n} train / {nv} val, {c}x{s}x{s}, {k} classes, noise {noise})")))
        }
        "npy" => {
            need(false)?;
            let (p, l) = (data_path(raw, "data.path")?, data_path(raw, "data.labels")?);
            let set = load_npy_images(&p, &l)?;
            let vf = val_fraction(raw)?;
            let n = set.labels.len();
            let nv = ((n as f64 * vf).round() as usize).clamp(1, n.saturating_sub(1).max(1));
            if n < 2 {
                return Err(input_err!("{}: needs at least 2 samples (train and validation)", p.display()));
            }
            let (tr, va) = set.split(nv);
            Ok(images(tr, va, format!("npy {} ({} train / {} val)", p.display(), n - nv, nv)))
        }
        _ => unreachable!("checked by choice()"),
    }
}

/// Builds the model from the config and the data's shape, returning it with the resolved model
/// table (derived values filled in).
fn build_model(raw: &Raw, kind: &str, data: &Data, pb: &mut ParamBuilder) -> Result<(Box<dyn Model>, toml::Table)> {
    let mut t = toml::Table::new();
    t.insert("kind".into(), kind.into());
    let derived = |key: &str, from_data: Option<usize>, what: &str| -> Result<usize> {
        raw.opt_positive(key)?.or(from_data).ok_or_else(|| input_err!("{key}: required ({what} cannot be derived from this data)"))
    };
    let model: Box<dyn Model> = match kind {
        "gpt" => {
            let cfg = GptConfig {
                vocab_size: derived("model.vocab_size", data.vocab, "the vocabulary")?,
                context: raw.positive("model.context")?,
                d_model: raw.positive("model.d_model")?,
                n_layers: raw.positive("model.n_layers")?,
                n_heads: raw.positive("model.n_heads")?,
                mlp_ratio: raw.positive("model.mlp_ratio")?,
                bias: raw.bool("model.bias"),
                z_loss: nonneg_f(raw, "model.z_loss")?,
                gelu_tanh: raw.bool("model.gelu_tanh"),
                dropout: dropout_p(raw)?,
            };
            cfg.validate().map_err(|(k, m)| input_err!("{k}: {m}"))?;
            if let Some(d) = data.vocab.filter(|&d| cfg.vocab_size < d) {
                return Err(input_err!("model.vocab_size: {} is smaller than the data's vocabulary ({d} token ids)", cfg.vocab_size));
            }
            t.extend(toml::Table::try_from(&cfg)?);
            Box::new(Gpt::new(cfg, pb)?)
        }
        "mlp" => {
            let shape = data.image_shape.unwrap_or([1, 1, 1]);
            let widths: Vec<usize> = raw
                .ints("model.widths")
                .into_iter()
                .map(|w| usize::try_from(w).ok().filter(|&w| w > 0))
                .collect::<Option<_>>()
                .ok_or_else(|| input_err!("model.widths: every width must be a positive integer"))?;
            let cfg = MlpConfig {
                input_dim: derived("model.input_dim", Some(shape.iter().product()), "input_dim")?,
                widths,
                classes: derived("model.classes", data.classes, "classes")?,
                batch_norm: raw.bool("model.batch_norm"),
                dropout: dropout_p(raw)?,
            };
            t.extend(toml::Table::try_from(&cfg)?);
            Box::new(Mlp::new(cfg, pb)?)
        }
        "resnet" => {
            let cfg = ResNetConfig {
                in_channels: derived("model.in_channels", data.image_shape.map(|s| s[0]), "in_channels")?,
                width: raw.positive("model.width")?,
                depth: raw.positive("model.depth")?,
                classes: derived("model.classes", data.classes, "classes")?,
            };
            t.extend(toml::Table::try_from(&cfg)?);
            Box::new(ResNet::new(cfg, pb)?)
        }
        _ => unreachable!("checked by choice()"),
    };
    if let Some(c) = data.classes {
        if let Some(Ok(k)) = t.get("classes").and_then(|v| v.as_integer()).map(usize::try_from) {
            if k < c {
                return Err(input_err!("model.classes: {k} is smaller than the labels in the data ({c} classes)"));
            }
        }
    }
    Ok((model, t))
}

fn build_optimizer(raw: &Raw, params: &ParamStore, lr: f64) -> Result<Box<dyn Optimizer>> {
    let kind = raw.choice("optim.kind", &["sgd", "adamw"])?;
    let wd = nonneg_f(raw, "optim.weight_decay")?;
    let decay_vectors = raw.bool("optim.decay_vectors");
    Ok(match kind.as_str() {
        "sgd" => {
            let momentum = nonneg_f(raw, "optim.momentum")?;
            if momentum >= 1.0 {
                return Err(input_err!("optim.momentum: must be in [0, 1), got {momentum}"));
            }
            Box::new(Sgd::new(
                SgdConfig { momentum, dampening: 0.0, nesterov: raw.bool("optim.nesterov"), weight_decay: wd, decay_vectors },
                params,
            ))
        }
        _ => {
            let betas = raw.floats("optim.betas");
            if betas.len() != 2 || betas.iter().any(|b| !(0.0..1.0).contains(b)) {
                return Err(input_err!("optim.betas: expected two numbers in [0, 1), got {betas:?}"));
            }
            let eps = raw.float("optim.eps");
            if !(eps > 0.0 && eps.is_finite()) {
                return Err(input_err!("optim.eps: must be a positive number, got {eps}"));
            }
            let decay_mode = match raw.choice("optim.decay", &["coupled", "independent"])?.as_str() {
                "independent" => DecayMode::Independent,
                _ => DecayMode::Coupled,
            };
            Box::new(AdamW::new(
                AdamWConfig { beta1: betas[0], beta2: betas[1], eps, weight_decay: wd, decay_mode, peak_lr: lr, decay_vectors },
                params,
            ))
        }
    })
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

/// A checkpoint's resolved config from before `data.windows` and `train.eval_samples` existed
/// resumes as it ran: fixed windows (the only kind then), and its `train.eval_batches` dropped
/// for the default number of evaluation samples.
fn upgrade_checkpoint_config(t: &mut toml::Table) {
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

/// Reads the raw config: the file (or, when resuming, the checkpoint's resolved config), then
/// `--set` overrides. Returns it with the checkpoint to resume from.
pub fn load_raw(args: &TrainArgs) -> Result<(Raw, Option<PathBuf>)> {
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
    Ok((Raw::new(table)?, ckpt))
}

/// Validates the whole run and builds it; writes nothing.
pub fn setup(args: &TrainArgs, raw: Raw, ckpt: Option<PathBuf>, world: &dyn Communicator) -> Result<Run> {
    let device_name = raw.choice("run.device", &["cpu", "cuda"])?;
    let w = world.world();
    let device = dptrain_core::device::select(&device_name, w.local_rank, w.local_size)
        .map_err(|e| input_err!("run.device: \"{device_name}\": {e}"))?;
    let precision = match raw.choice("train.precision", &["f32", "bf16"])?.as_str() {
        "bf16" => Precision::Bf16,
        _ => Precision::F32,
    };
    let comm_bf16 = raw.choice("comm.dtype", &["f32", "bf16"])? == "bf16";
    let seed = u64::try_from(raw.int("run.seed")).map_err(|_| input_err!("run.seed: must be ≥ 0"))?;
    let model_kind = raw.choice("model.kind", &["gpt", "mlp", "resnet"])?;
    check_model_keys(&raw, &model_kind)?;
    let data_kind = raw.choice("data.kind", &["synthetic-lm", "synthetic-images", "text", "tokens", "npy"])?;
    let steps = raw.positive("train.steps")? as u64;
    let global_batch = raw.positive("train.global_batch")?;
    let ws = world.world_size();
    let micro_batch = match raw.count("train.micro_batch")? {
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
    let lr = raw.float("optim.lr");
    if !(lr > 0.0 && lr.is_finite()) {
        return Err(input_err!("optim.lr: must be a positive number, got {lr}"));
    }
    let final_lr = nonneg_f(&raw, "schedule.final_lr")?;
    let schedule = Schedule {
        kind: match raw.choice("schedule.kind", &["cosine", "linear", "constant"])?.as_str() {
            "cosine" => ScheduleKind::Cosine,
            "linear" => ScheduleKind::Linear,
            _ => ScheduleKind::Constant,
        },
        peak_lr: lr,
        final_lr,
        warmup_steps: raw.count("schedule.warmup_steps")? as u64,
        total_steps: steps,
    };
    let clip = nonneg_f(&raw, "optim.clip")?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = match raw.count("run.threads")? {
        0 => (cores / world.world().local_size.max(1)).max(1),
        t if t > 4 * cores => {
            return Err(input_err!(
                "run.threads: {t} is more than 4 × the {cores} cores of this machine (at most {}; 0 = the cores divided by the processes on this node)",
                4 * cores
            ))
        }
        t => t,
    };
    let bucket_mb = raw.float("comm.bucket_mb");
    if !(bucket_mb > 0.0 && bucket_mb.is_finite()) {
        return Err(input_err!("comm.bucket_mb: must be a positive number of MiB, got {bucket_mb}"));
    }
    let mut warnings = vec![];
    if schedule.warmup_steps > steps {
        warnings.push(format!(
            "schedule.warmup_steps = {} is more than train.steps = {steps}: the learning rate never reaches optim.lr = {lr:e}",
            schedule.warmup_steps
        ));
    }
    let lm_data = matches!(data_kind.as_str(), "synthetic-lm" | "text" | "tokens");
    let random_windows = match raw.resolved("data.windows") {
        None => lm_data && data_kind != "synthetic-lm",
        Some(_) if !lm_data => return Err(input_err!("data.windows: only for token data (data.kind text, tokens or synthetic-lm)")),
        Some(_) => raw.choice("data.windows", &["random", "fixed"])? == "random",
    };

    let data = load_data(&raw, &data_kind, &model_kind, seed)?;
    if !random_windows && data.train.len() < micro_batch * ws {
        return Err(input_err!(
            "train.micro_batch: {micro_batch} × {ws} ranks exceeds the {} training samples of the data",
            data.train.len()
        ));
    }
    let n_val = data.val.len();
    let eval_samples = match raw.opt_int("train.eval_samples") {
        None => DEFAULT_EVAL_SAMPLES.min(n_val),
        Some(0) => n_val,
        Some(n) if n < 0 => return Err(input_err!("train.eval_samples: must be ≥ 0, got {n}")),
        Some(n) if n as usize > n_val => {
            return Err(input_err!("train.eval_samples: {n} is more than the {n_val} samples of the validation split (0 = all of them)"))
        }
        Some(n) => n as usize,
    };
    let mut pb = ParamBuilder::new();
    let (model, model_table) = build_model(&raw, &model_kind, &data, &mut pb)?;
    let mut params = pb.build(seed, DType::F32)?;
    let mut opt = build_optimizer(&raw, &params, lr)?;

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
            let run = c
                .parent()
                .and_then(Path::parent)
                .map(Path::to_path_buf)
                .ok_or_else(|| input_err!("{}: not inside a run directory", c.display()))?;
            // The sampler position is per rank; the global position is offset × ranks, so a
            // checkpoint resumes on a different number of ranks with the same global batch.
            let global = st.stream.offset * st.world_size;
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
            let name = raw.str("run.name");
            if name.is_empty() || name.contains('/') {
                return Err(input_err!("run.name: must be a non-empty name without '/', got \"{name}\""));
            }
            (
                0,
                StreamState { epoch: 0, offset: 0 },
                fresh_dir(&args.run_dir.clone().unwrap_or_else(|| PathBuf::from("runs").join(&name))),
                None,
            )
        }
    };

    // The resolved config: every key with its value, the model's derived shape, and a
    // [derived] table; printed at start and saved with the run and each checkpoint.
    let mut resolved = toml::Table::new();
    for d in crate::config::KEYS {
        let (sec, name) = d.key.split_once('.').expect("section.key");
        if sec == "model" {
            continue;
        }
        if let Some(v) = raw.resolved(d.key) {
            resolved
                .entry(sec.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .expect("table")
                .insert(name.into(), v);
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
    if let Some(f) = data.floor {
        derived.insert("entropy_floor".into(), f.into());
    }
    resolved.insert("derived".into(), toml::Value::Table(derived));
    let config_toml = toml::to_string(&resolved)?;

    Ok(Run {
        log_every: raw.positive("run.log_every")? as u64,
        eval_every: raw.count("train.eval_every")? as u64,
        eval_samples,
        random_windows,
        warnings,
        fault: args.fault,
        checkpoint_every: raw.count("train.checkpoint_every")? as u64,
        keep_last: raw.count("checkpoint.keep_last")?,
        raw,
        model,
        params,
        opt,
        schedule,
        data,
        steps,
        global_batch,
        micro_batch,
        accum,
        clip,
        seed,
        threads,
        start_step,
        stream,
        run_dir,
        resumed_from,
        config_toml,
        device,
        precision,
        comm_bf16,
    })
}

/// One evaluation's results.
struct Eval {
    /// Mean cross-entropy (without the z-loss term).
    loss: f64,
    /// Mean z-loss term, when the model has one.
    z_loss: Option<f64>,
    /// Top-1 accuracy, for classifiers.
    acc: Option<f64>,
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
        tape.set_precision(run.precision);
        let mut probes = Probes::default();
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

struct Metrics {
    file: std::fs::File,
}

impl Metrics {
    fn write(&mut self, rec: &Value) -> Result<()> {
        writeln!(self.file, "{rec}").map_err(|e| LaunchError::Runtime(format!("metrics.jsonl: {e}")))
    }
}

/// Keeps the records up to `step` of an existing metrics file (a resumed run continues it).
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let kept: String = text
        .lines()
        .filter(|l| serde_json::from_str::<Value>(l).ok().and_then(|v| v["step"].as_u64()).is_some_and(|s| s <= step))
        .map(|l| format!("{l}\n"))
        .collect();
    dptrain_core::checkpoint::atomic_write(path, kept.as_bytes())?;
    Ok(())
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
}

/// Sets the compute thread pool once per process.
fn init_threads(n: usize) {
    let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
}

/// A 64-bit FNV-1a hash of the parameter bits, as four exactly-representable 16-bit integers.
fn param_checksum(params: &ParamStore) -> Result<[f32; 4]> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let host;
    let vals: &[f32] = if params.flat().is_cuda() {
        host = params.flat().to_vec::<f32>()?;
        &host
    } else {
        params.flat().data::<f32>()?
    };
    for x in vals {
        h ^= x.to_bits() as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    Ok([(h & 0xffff) as f32, ((h >> 16) & 0xffff) as f32, ((h >> 32) & 0xffff) as f32, (h >> 48) as f32])
}

/// Ranks whose checksum differs from rank 0's.
fn drifted(comm: &mut dyn Communicator, params: &ParamStore) -> Result<Vec<usize>> {
    let mine = param_checksum(params)?;
    let mut all = vec![0f32; 4 * comm.world_size()];
    comm.all_gather(&mine, &mut all)?;
    Ok((1..comm.world_size()).filter(|&r| all[4 * r..4 * r + 4] != all[..4]).collect())
}

/// Same start on every rank: identical resolved configs and parameter layouts (checked, with
/// the first difference named), then parameters and buffers broadcast from rank 0.
fn sync_start(run: &mut Run, comm: &mut dyn Communicator) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    let rank = comm.rank();
    // Configs, minus values that may legitimately differ per rank.
    // Compared without the [derived] table: derived values follow from the rest, and the
    // first difference is then the key the user actually set differently.
    let strip = |s: &str| {
        let mut in_derived = false;
        s.lines()
            .filter(|l| {
                if l.starts_with('[') {
                    in_derived = l.trim() == "[derived]";
                }
                !in_derived
            })
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    for (what, mine) in [("config", run.config_toml.clone()), ("parameter layout", run.params.layout_fingerprint().replace(';', "\n"))] {
        let mut root = mine.clone().into_bytes();
        comm.broadcast_bytes(&mut root, 0)?;
        let root = String::from_utf8_lossy(&root).to_string();
        let (a, b) = (strip(&root), strip(&mine));
        let diff = a.iter().zip(&b).position(|(x, y)| x != y).or((a.len() != b.len()).then(|| a.len().min(b.len())));
        let mut flag = [if diff.is_some() { rank as f32 + 1.0 } else { 0.0 }];
        comm.all_reduce(&mut flag, ReduceOp::Max)?;
        if flag[0] > 0.0 {
            // The (highest) differing rank tells everyone what differs, so whichever process
            // the launcher reports first carries the whole message.
            let culprit = flag[0] as usize - 1;
            let mut msg = diff
                .map(|i| {
                    format!(
                        "rank {rank}: {what} differs from rank 0's: `{}` here, `{}` on rank 0 — every rank must run the same config",
                        b.get(i).map(String::as_str).unwrap_or("(end)"),
                        a.get(i).map(String::as_str).unwrap_or("(end)")
                    )
                })
                .unwrap_or_default()
                .into_bytes();
            comm.broadcast_bytes(&mut msg, culprit)?;
            return Err(input_err!("{}", String::from_utf8_lossy(&msg)));
        }
    }
    comm.broadcast(run.params.flat_mut::<f32>()?, 0)?;
    for (_, b) in run.params.buffers() {
        let mut t = b.lock().unwrap_or_else(|e| e.into_inner());
        let mut v = t.to_vec::<f32>()?;
        comm.broadcast(&mut v, 0)?;
        let shape = t.shape().to_vec();
        *t = dptrain_core::Tensor::from_vec(v, &shape)?;
    }
    Ok(())
}

pub fn train(args: &TrainArgs) -> Result<Summary> {
    let (raw, ckpt) = load_raw(args)?;
    let timeout = raw.float("comm.timeout_s");
    if !(timeout > 0.0 && timeout.is_finite()) {
        return Err(input_err!("comm.timeout_s: must be a positive number of seconds, got {timeout}"));
    }
    let mut world = crate::world::discover(std::time::Duration::from_secs_f64(timeout))?;
    let res = setup(args, raw, ckpt, world.main.as_ref());
    // Every rank learns whether every rank's input was valid, so none waits for a failed one,
    // and every rank reports the failing rank's message (the launcher may show any of them).
    let rank = world.info().rank;
    let mut flag = [if res.is_ok() { 0.0f32 } else { rank as f32 + 1.0 }];
    if world.info().world_size > 1 {
        world.main.all_reduce(&mut flag, ReduceOp::Max)?;
        if flag[0] > 0.0 {
            let culprit = flag[0] as usize - 1;
            let mut msg = res.as_ref().err().map(|e| e.to_string()).unwrap_or_default().into_bytes();
            world.main.broadcast_bytes(&mut msg, culprit)?;
            let msg = String::from_utf8_lossy(&msg).to_string();
            return Err(match res {
                Err(LaunchError::Runtime(_)) => LaunchError::Runtime(format!("rank {culprit}: {msg}")),
                _ => input_err!("rank {culprit}: {msg}"),
            });
        }
    }
    let mut run = res?;
    init_threads(run.threads);
    sync_start(&mut run, world.main.as_mut())?;
    // Same values on every rank first (broadcast on the host), then onto the GPU.
    run.params.to_device(run.device)?;
    let mut grads = GradStore::try_new(&run.params)?;
    let (bucket_mb, overlap) = (run.raw.float("comm.bucket_mb"), run.raw.bool("comm.overlap"));
    // The gradient synchroniser: MPI on the host, or NCCL on the GPU.
    let mut reducer: Option<Box<dyn GradSync>> = match (world.grads.take(), run.device) {
        (_, _) if world.info().world_size == 1 => None,
        #[cfg(feature = "cuda")]
        (host, Device::Cuda(o)) => {
            use dptrain_comm::nccl::{NcclComm, NcclReducer};
            let dev = dptrain_core::tensor::cuda::dev(o)?;
            let comm = NcclComm::bootstrap(world.main.as_mut(), dev, host)?;
            let t = std::time::Duration::from_secs_f64(timeout);
            Some(Box::new(NcclReducer::new(comm, &run.params, bucket_mb, overlap, run.comm_bf16, t)?))
        }
        (Some(c), _) => Some(Box::new(GradReducer::with_dtype(c, &run.params, bucket_mb, overlap, run.comm_bf16))),
        (None, _) => None,
    };
    let out = train_loop(&mut run, &mut grads, world.main.as_mut(), reducer.as_deref_mut());
    // The reducer goes first: dropping it waits for in-flight buckets, which read `grads`.
    drop(reducer);
    drop(grads);
    out
}

fn train_loop(
    run: &mut Run,
    grads: &mut GradStore,
    comm: &mut dyn Communicator,
    mut reducer: Option<&mut (dyn GradSync + 'static)>,
) -> Result<Summary> {
    let rank0 = comm.rank() == 0;
    let ws = comm.world_size();
    let check_every = run.raw.count("comm.check_every")? as u64;

    // Files: only now, after every check passed, and only on rank 0.
    let mut metrics = None;
    if rank0 {
        std::fs::create_dir_all(&run.run_dir).map_err(|e| input_err!("{}: cannot create run directory ({e})", run.run_dir.display()))?;
        let metrics_path = run.run_dir.join("metrics.jsonl");
        if run.resumed_from.is_some() {
            truncate_metrics(&metrics_path, run.start_step)?;
        }
        dptrain_core::checkpoint::atomic_write(&run.run_dir.join("config.toml"), run.config_toml.as_bytes())?;
        metrics = Some(Metrics {
            file: std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&metrics_path)
                .map_err(|e| LaunchError::Runtime(format!("{}: {e}", metrics_path.display())))?,
        });
    }
    let w = comm.world();
    tracing::info!(rank = w.rank, world = w.world_size, local_rank = w.local_rank, local_size = w.local_size, host = %w.host, "world");
    if ws > 1 {
        eprintln!("dptrain: rank {}/{} local rank {}/{} on {}", w.rank, w.world_size, w.local_rank, w.local_size, w.host);
    }
    if rank0 {
        println!("dptrain: {} | {}", run.model.describe(), run.data.describe);
        println!(
            "dptrain: {} parameters, global batch {} = {} micro × {} accum × {} ranks, {} threads per rank, run dir {}",
            run.params.numel(),
            run.global_batch,
            run.micro_batch,
            run.accum,
            ws,
            run.threads,
            run.run_dir.display()
        );
        if let Some(r) = &reducer {
            println!("dptrain: world of {ws} ranks; {} gradient buckets, overlap {}", r.buckets().len(), run.raw.bool("comm.overlap"));
        }
        if let Some(c) = &run.resumed_from {
            println!("dptrain: resumed from {} at step {}", c.display(), run.start_step);
        }
        for w in &run.warnings {
            eprintln!("dptrain: warning: {w}");
        }
    }

    let sampler = DistributedSampler {
        len: run.data.train.len(),
        world: ws,
        rank: comm.rank(),
        seed: run.seed,
        shuffle: run.raw.bool("data.shuffle"),
        drop_last: run.raw.bool("data.drop_last"),
    };
    let mut stream = BatchStream::new(sampler, run.stream);
    let tty = rank0 && std::io::stdout().is_terminal();
    let bar = tty.then(|| {
        let b = indicatif::ProgressBar::new(run.steps);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]").expect("template"),
        );
        b.set_position(run.start_step);
        b
    });
    let t0 = Instant::now();
    let mut window_start = Instant::now();
    let mut window_samples = 0usize;
    let mut last_loss = f64::NAN;
    let mut last_val: Option<Eval> = None;
    let mut samples_done = 0usize;

    for step in run.start_step..run.steps {
        if let Some(f) = &run.fault {
            f.fire_if(comm.rank(), step + 1);
        }
        let lr = run.schedule.lr(step);
        grads.zero_grad();
        let mut loss_sum = 0.0;
        let done = step + 1;
        // Probes are computed only on the steps that log them.
        let log_step = done % run.log_every == 0 || done == run.steps;
        let mut probe_acc = Probes::on_if(log_step);
        for micro in 0..run.accum {
            // Random windows and dropout masks: counter-based draws keyed by where they are
            // used, so a resumed run draws what the uninterrupted one did and ranks differ.
            let key = |stream: u64| key_of(&[run.seed, stream, step, comm.rank() as u64, micro as u64]);
            let batch = if run.random_windows {
                run.data
                    .train
                    .random_windows(key(WINDOW_STREAM), run.micro_batch)
                    .ok_or_else(|| LaunchError::Runtime("data.windows = \"random\" needs token data".into()))?
            } else {
                run.data.train.batch(&stream.next_indices(run.micro_batch))
            };
            let tape = Tape::new();
            tape.set_precision(run.precision);
            tape.set_rng_key(key(DROPOUT_STREAM));
            let mut probes = Probes::on_if(log_step);
            let loss = run.model.loss(&tape, &run.params, &batch, true, &mut probes)?;
            loss_sum += loss.item()?;
            // Mean over micro-steps: scale each micro-step's gradient by 1/accum.
            let scaled = if run.accum > 1 { loss.scale(1.0 / run.accum as f64)? } else { loss };
            // Gradients are communicated on the last micro-step only (DDP's no_sync).
            let mut reduce_err = None;
            match reducer.as_deref_mut() {
                Some(r) => {
                    r.begin(micro + 1 == run.accum);
                    tape.backward(scaled, grads, |p, g| {
                        // SAFETY: `grads` is owned by `train`, which drops the reducer (waiting
                        // for in-flight buckets) before it; `wait_all(grads)` follows below; the
                        // tape never writes a parameter's gradient after its final event.
                        if let Err(e) = unsafe { r.on_ready(p, g) } {
                            reduce_err.get_or_insert(e);
                        }
                    })?;
                }
                None => {
                    tape.backward(scaled, grads, |_, _| {})?;
                }
            }
            if let Some(e) = reduce_err {
                return Err(e.into());
            }
            probe_acc.accumulate(probes);
        }
        let comm_stats = match reducer.as_deref_mut() {
            Some(r) => Some(r.wait_all(grads)?),
            None => None,
        };
        let mut avg = vec![loss_sum / run.accum as f64];
        avg_f64(comm, &mut avg)?;
        let loss = avg[0];
        let grad_norm = clip_grad_norm(grads, run.clip)?;
        if !loss.is_finite() || !grad_norm.is_finite() {
            return Err(LaunchError::Runtime(format!(
                "step {}: loss {loss}, gradient norm {grad_norm} — training diverged (lower optim.lr or set optim.clip)",
                step + 1
            )));
        }
        run.opt.step(&mut run.params, grads, lr)?;
        samples_done += run.global_batch;
        window_samples += run.global_batch;
        last_loss = loss;

        if check_every > 0 && ws > 1 && done % check_every == 0 {
            let bad = drifted(comm, &run.params)?;
            if !bad.is_empty() {
                return Err(LaunchError::Runtime(format!(
                    "step {done}: parameters of ranks {bad:?} differ from rank 0's — the replicas drifted apart; aborting"
                )));
            }
        }

        if log_step {
            let dt = window_start.elapsed().as_secs_f64();
            let sps = window_samples as f64 / dt.max(1e-9);
            // Probes combined over micro-steps, then over ranks, each by its own reduction.
            probe_acc.finish_mean(run.accum);
            reduce_probes(comm, &mut probe_acc)?;
            let mut rec = Map::new();
            rec.insert("step".into(), json!(done));
            rec.insert("loss".into(), json!(loss));
            rec.insert("lr".into(), json!(lr));
            rec.insert("grad_norm".into(), json!(grad_norm));
            rec.insert("samples_per_s".into(), json!(sps));
            rec.insert("elapsed_s".into(), json!(t0.elapsed().as_secs_f64()));
            if let Some(cs) = comm_stats {
                rec.insert("comm_s".into(), json!(cs.comm_s));
                rec.insert("comm_hidden".into(), json!(cs.hidden_fraction()));
            }
            for (k, _, v) in probe_acc.values {
                if k == "z_loss" {
                    // `loss` is what is minimised; with the z-loss on, its two parts beside it.
                    rec.insert("ce_loss".into(), json!(loss - v));
                }
                // The batch's accuracy is logged as train_acc beside evaluation's val_acc.
                rec.insert(if k == "acc" { "train_acc".into() } else { k }, json!(v));
            }
            if let Some(m) = metrics.as_mut() {
                m.write(&Value::Object(rec))?;
                let msg = format!("loss {loss:.4} lr {lr:.2e} gnorm {grad_norm:.3} {sps:.0} samples/s");
                match &bar {
                    Some(b) => b.set_message(msg),
                    None => println!("step {done}/{} {msg}", run.steps),
                }
            }
            window_start = Instant::now();
            window_samples = 0;
        }
        if let Some(b) = &bar {
            b.set_position(done);
        }
        if (run.eval_every > 0 && done % run.eval_every == 0) || done == run.steps {
            let ev = evaluate(run, comm)?;
            if let Some(m) = metrics.as_mut() {
                let mut rec = json!({ "step": done, "val_loss": ev.loss });
                let mut line = format!("step {done}: val loss {:.4}", ev.loss);
                if let Some(z) = ev.z_loss {
                    rec["val_z_loss"] = json!(z);
                }
                if let Some(a) = ev.acc {
                    rec["val_acc"] = json!(a);
                    line.push_str(&format!(" acc {:.4}", a));
                }
                if let Some(f) = run.data.floor {
                    rec["entropy_floor"] = json!(f);
                    rec["val_gap"] = json!(ev.loss - f);
                    line.push_str(&format!(" (entropy floor {f:.4}, gap {:.4})", ev.loss - f));
                }
                m.write(&rec)?;
                match &bar {
                    Some(b) => b.println(line),
                    None => println!("{line}"),
                }
            }
            last_val = Some(ev);
        }
        if (run.checkpoint_every > 0 && done % run.checkpoint_every == 0) || done == run.steps {
            // Only rank 0 writes; no collective inside the rank-0 branch; everyone waits after.
            if rank0 {
                let (opt_tensors, scalars) = run.opt.state(&run.params)?;
                let st = State {
                    format: checkpoint::FORMAT,
                    step: done,
                    stream: stream.state(),
                    world_size: ws,
                    optimizer: run.opt.name().into(),
                    optimizer_scalars: scalars,
                    fingerprint: run.params.layout_fingerprint(),
                    seed: run.seed,
                };
                checkpoint::save(&run.run_dir, done, &run.params, &opt_tensors, &st, &run.config_toml, run.keep_last)?;
            }
            comm.barrier()?;
        }
    }
    if let Some(b) = bar {
        b.finish();
        eprintln!(); // the bar (on stderr) leaves the cursor on its line
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let summary = Summary {
        run_dir: run.run_dir.clone(),
        steps: run.steps,
        final_loss: last_loss,
        final_val_loss: last_val.as_ref().map(|e| e.loss),
        final_val_acc: last_val.as_ref().and_then(|e| e.acc),
        entropy_floor: run.data.floor,
        gap_to_floor: run.data.floor.zip(last_val.as_ref()).map(|(f, v)| v.loss - f),
        elapsed_s: elapsed,
        samples_per_s: samples_done as f64 / elapsed.max(1e-9),
        parameters: run.params.numel(),
        model: run.model.describe(),
    };
    if rank0 {
        let text = serde_json::to_string_pretty(&summary).map_err(|e| LaunchError::Runtime(e.to_string()))?;
        dptrain_core::checkpoint::atomic_write(&run.run_dir.join("summary.json"), text.as_bytes())?;
        match (summary.final_val_loss, summary.entropy_floor) {
            (Some(v), Some(f)) => println!(
                "dptrain: done in {elapsed:.1} s — val loss {v:.4} vs entropy floor {f:.4}: {:.4} nats/token above the best achievable ({:.1}% of the floor)",
                v - f,
                100.0 * (v - f) / f
            ),
            (Some(v), None) => {
                let acc = summary.final_val_acc.map(|a| format!(", val acc {a:.4}")).unwrap_or_default();
                println!("dptrain: done in {elapsed:.1} s — val loss {v:.4}{acc}")
            }
            _ => println!("dptrain: done in {elapsed:.1} s"),
        }
    }
    Ok(summary)
}

/// Combines probe values over ranks, each group of probes by its reduction (one collective per
/// reduction kind; every rank records the same probes, so every rank makes the same calls).
fn reduce_probes(comm: &mut dyn Communicator, probes: &mut Probes) -> Result<()> {
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
    Ok(())
}

/// Averages f64 values over ranks (through the f32 collectives; exact in a world of one).
fn avg_f64(comm: &mut dyn Communicator, v: &mut [f64]) -> Result<()> {
    reduce_f64(comm, v, ReduceOp::Avg)
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
