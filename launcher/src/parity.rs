//! `dptrain parity optim`: replays an optimizer on given gradients, so its trajectory can be
//! compared with a reference implementation's step by step (README, "Parity replay").
//!
//! HP.toml is a flat table of `[optim]` keys (`kind` and the hyperparameters, by the same names
//! as in a run's config). IN.safetensors holds `param.<name>` (initial values) and
//! `grad.<t>.<name>` for t = 0..T−1; the replay applies T steps at the constant `lr` — no
//! schedule, no clipping, every tensor decayed — and writes `param.<t>.<name>` after each step.
//! `--state-in/--state-out` carry the optimizer's state in the names its checkpoints use
//! (`exp_avg.<name>`, `exp_avg_sq.<name>`, `momentum_buffer.<name>`, `GG<k>.<name>`,
//! `Q<k>.<name>`) plus `scalar.step` (updates applied) and `scalar.started` (0/1).

use crate::build::build_optimizer;
use crate::config::{parse_file, Raw};
use crate::error::{input_err, LaunchError, Result};
use dptrain_core::checkpoint::{atomic_write, tensors_from_bytes, tensors_to_bytes};
use dptrain_core::{DType, GradStore, Init, ParamBuilder, Role, Tensor};
use dptrain_optim::StepCtx;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// What `dptrain parity optim` was asked to do.
#[derive(Debug, Clone)]
pub struct ParityArgs {
    pub config: PathBuf,
    pub input: PathBuf,
    pub output: PathBuf,
    pub state_in: Option<PathBuf>,
    pub state_out: Option<PathBuf>,
}

fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| input_err!("{}: cannot read ({e})", path.display()))?;
    tensors_from_bytes(&bytes).map_err(|e| input_err!("{}: {e}", path.display()))
}

pub fn optim(args: &ParityArgs) -> Result<()> {
    // Hyperparameters: the flat file is the [optim] table of a config, checked by the schema.
    let hp = parse_file(&args.config)?;
    let mut table = toml::Table::new();
    table.insert("optim".into(), toml::Value::Table(hp));
    let raw = Raw::new(table).map_err(|e| input_err!("{}: {e}", args.config.display()))?;
    let cfg = raw.typed()?;
    for key in ["lr_scaling", "base_batch"] {
        if raw.is_set(&format!("optim.{key}")) {
            return Err(input_err!("{}: {key}: a replay applies lr as given (no batch-size rules)", args.config.display()));
        }
    }

    let input = read_tensors(&args.input)?;
    let inp = args.input.display();
    let mut params: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut grads: BTreeMap<(usize, String), Tensor> = BTreeMap::new();
    for (k, t) in &input {
        if let Some(name) = k.strip_prefix("param.") {
            params.insert(name.to_string(), t.clone());
        } else if let Some(rest) = k.strip_prefix("grad.") {
            let (step, name) = rest
                .split_once('.')
                .and_then(|(s, n)| s.parse::<usize>().ok().map(|s| (s, n)))
                .ok_or_else(|| input_err!("{inp}: {k}: expected grad.<step>.<name>"))?;
            grads.insert((step, name.to_string()), t.clone());
        } else {
            return Err(input_err!("{inp}: {k}: unexpected tensor (expected param.<name> or grad.<step>.<name>)"));
        }
    }
    if params.is_empty() {
        return Err(input_err!("{inp}: no param.<name> tensors"));
    }
    let steps = grads.keys().map(|(s, _)| s + 1).max().unwrap_or(0);
    for ((s, name), g) in &grads {
        let p = params.get(name).ok_or_else(|| input_err!("{inp}: grad.{s}.{name}: no param.{name}"))?;
        if g.shape() != p.shape() {
            return Err(input_err!("{inp}: grad.{s}.{name}: shape {:?}, expected {:?} (param.{name})", g.shape(), p.shape()));
        }
    }
    for s in 0..steps {
        if let Some(name) = params.keys().find(|n| !grads.contains_key(&(s, n.to_string()))) {
            return Err(input_err!("{inp}: grad.{s}.{name}: missing (every step 0..{} needs a gradient for every parameter)", steps - 1));
        }
    }

    // Every tensor is a plain matrix (no role-based exclusion from decay).
    let mut b = ParamBuilder::new();
    for (name, t) in &params {
        b.add(name, t.shape(), Role::Hidden, 1, 1, Init::Const(0.0));
    }
    let mut store = b.build(0, DType::F32)?;
    for (info, t) in store.infos().to_vec().iter().zip(params.values()) {
        let v = t.to_vec::<f32>().map_err(|e| input_err!("{inp}: param.{}: {e}", info.name))?;
        store.flat_mut::<f32>()?[info.offset..info.offset + info.numel].copy_from_slice(&v);
    }
    let mut opt = build_optimizer(&cfg, &store, 1)?;
    if let Some(path) = &args.state_in {
        let mut tensors = read_tensors(path)?;
        let mut scalars = serde_json::Map::new();
        for key in tensors.keys().filter(|k| k.starts_with("scalar.")).cloned().collect::<Vec<_>>() {
            let v = tensors.remove(&key).expect("listed").to_vec::<f32>()?.first().copied().unwrap_or(0.0);
            let name = key.trim_start_matches("scalar.");
            scalars.insert(name.into(), if name == "started" { serde_json::json!(v != 0.0) } else { serde_json::json!(v as u64) });
        }
        opt.load_state(&store, &tensors, &serde_json::Value::Object(scalars)).map_err(|e| input_err!("{}: {e}", path.display()))?;
    }

    let mut grad_store = GradStore::new(&store);
    let mut solo = dptrain_comm::LocalComm::new();
    let mut out = vec![];
    for s in 0..steps {
        for info in store.infos().to_vec() {
            let g = grads[&(s, info.name.clone())].to_vec::<f32>()?;
            grad_store.flat_mut::<f32>()?[info.offset..info.offset + info.numel].copy_from_slice(&g);
        }
        opt.step(&mut store, &grad_store, &mut StepCtx { step: s as u64 + 1, lr: cfg.optim.lr, comm: &mut solo })?;
        for info in store.infos() {
            let v = &store.flat().data::<f32>()?[info.offset..info.offset + info.numel];
            out.push((format!("param.{s}.{}", info.name), Tensor::from_slice(v, &info.shape)?));
        }
    }
    let write = |path: &Path, named: &[(String, Tensor)]| -> Result<()> {
        atomic_write(path, &tensors_to_bytes(named)?).map_err(|e| LaunchError::Runtime(format!("{}: {e}", path.display())))
    };
    write(&args.output, &out)?;
    if let Some(path) = &args.state_out {
        let (mut tensors, scalars) = opt.state(&store)?;
        if let Some(obj) = scalars.as_object() {
            for (k, v) in obj {
                let x = v.as_f64().or_else(|| v.as_bool().map(|b| b as u8 as f64)).unwrap_or(0.0);
                tensors.push((format!("scalar.{k}"), Tensor::from_slice(&[x as f32], &[1])?));
            }
        }
        write(path, &tensors)?;
    }
    println!("dptrain parity: {} step(s) of {} on {} parameter tensor(s) → {}", steps, opt.name(), params.len(), args.output.display());
    Ok(())
}
