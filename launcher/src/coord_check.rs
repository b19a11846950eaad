//! `dptrain coord-check`: the μP coordinate check (Yang et al., Tensor Programs V, §D; PyPI
//! `mup`'s `get_coord_data`). The configured model is trained at several widths for a few
//! steps on one fixed batch with a deliberately large learning rate, over several seeds; the
//! mean |x| of every module's output is recorded at each step (through the probe sink's
//! `coord/<module>` probes). Under a correct μP the curves of log2(mean |x|) against log2(width)
//! are flat; under the standard parametrization the hidden and output activations grow with
//! width once training moves them. The check fits the slope of each curve per module and step,
//! prints a table, writes a JSON of the numbers and a log-log plot (PNG), and fails (exit 1)
//! when any |slope| reaches `--max-slope`.

use crate::build::{build_model, build_optimizer, load_data};
use crate::config::{apply_sets, parse_file, ModelKind, Raw, RunConfig};
use crate::error::{input_err, LaunchError, Result};
use crate::memory::Budget;
use dptrain_core::probe::Probes;
use dptrain_core::{DType, GradStore, ParamBuilder, Tape};
use dptrain_optim::StepCtx;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What `dptrain coord-check` was asked to do.
#[derive(Debug, Clone)]
pub struct CoordArgs {
    pub config: Option<PathBuf>,
    pub sets: Vec<String>,
    pub widths: Vec<usize>,
    pub max_slope: f64,
    pub seeds: u64,
    pub steps: u64,
    /// Overrides optim.lr (the check wants a large one).
    pub lr: f64,
    pub out: PathBuf,
}

/// One module's curve: mean |x| per step (rows) and width (columns), averaged over seeds, and
/// the fitted slope per step (`None` when the values are not all positive — e.g. a readout
/// initialised at zero reads exactly 0 at step 1 — unless they are all zero, a flat line).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Curve {
    pub mean_abs: Vec<Vec<f64>>,
    pub slope: Vec<Option<f64>>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub widths: Vec<usize>,
    pub seeds: u64,
    pub steps: u64,
    pub lr: f64,
    pub max_slope: f64,
    pub modules: BTreeMap<String, Curve>,
    /// Modules (with the step, 1-based) whose |slope| reaches max_slope.
    pub failures: Vec<(String, u64, f64)>,
}

/// The keys that set the width `w` of the configured model kind.
fn width_sets(cfg: &RunConfig, w: usize) -> Result<Vec<String>> {
    Ok(match cfg.model.kind {
        ModelKind::Gpt => {
            if !w.is_multiple_of(cfg.model.n_heads) {
                return Err(input_err!("--widths: {w} is not divisible by model.n_heads = {}", cfg.model.n_heads));
            }
            vec![format!("model.d_model={w}")]
        }
        ModelKind::Mlp => {
            let w0 = cfg.model.widths.first().copied().unwrap_or(1);
            let scaled: Vec<String> = cfg.model.widths.iter().map(|&x| (x * w / w0).max(1).to_string()).collect();
            vec![format!("model.widths=[{}]", scaled.join(", "))]
        }
        ModelKind::Resnet => vec![format!("model.width={w}")],
    })
}

fn typed(table: &toml::Table, sets: &[String]) -> Result<RunConfig> {
    let mut t = table.clone();
    apply_sets(&mut t, sets)?;
    let raw = Raw::new(t)?;
    let cfg = raw.typed()?;
    crate::config::check_model_keys(&raw, cfg.model.kind)?;
    Ok(cfg)
}

/// Least-squares slope of y on x.
fn slope(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let sxy: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let sxx: f64 = x.iter().map(|a| (a - mx) * (a - mx)).sum();
    sxy / sxx
}

/// Runs the check; `Ok(report)` whether it passes or not (see `report.failures`).
pub fn run(args: &CoordArgs) -> Result<Report> {
    if args.widths.len() < 2 {
        return Err(input_err!("--widths: at least two widths are needed to fit a slope"));
    }
    if args.steps == 0 || args.seeds == 0 {
        return Err(input_err!("--steps and --seeds must be positive"));
    }
    if !(args.lr > 0.0 && args.lr.is_finite()) {
        return Err(input_err!("--lr: must be a positive number, got {}", args.lr));
    }
    let table = match &args.config {
        Some(p) => parse_file(p)?,
        None => toml::Table::new(),
    };
    // A constant, large learning rate from the first step, no clipping and no dropout: the
    // check looks at what the parametrization does to updates, nothing else.
    let mut fixed = args.sets.clone();
    fixed.extend([
        format!("optim.lr={}", args.lr),
        "optim.clip=0.0".into(),
        "schedule.kind=\"constant\"".into(),
        "schedule.warmup_steps=0".into(),
    ]);
    let first = typed(&table, &fixed)?;
    if matches!(first.model.kind, ModelKind::Gpt | ModelKind::Mlp) {
        fixed.push("model.dropout=0.0".into());
    }
    // One process: the machine's memory is all the model at each width may use.
    let budget = Budget::this_node(1);
    let data = load_data(&first, budget)?;
    let batch = data.train.batch(&(0..first.train.global_batch.min(data.train.len())).collect::<Vec<_>>());
    // Every width's config and model are checked (declared, not built) before the first one
    // trains: a width the heads do not divide, or one too large for memory, is an error now
    // rather than after the smaller widths ran.
    let width_cfgs = args
        .widths
        .iter()
        .map(|&w| {
            let mut sets = fixed.clone();
            sets.extend(width_sets(&first, w)?);
            let cfg = typed(&table, &sets)?;
            build_model(&cfg, &data, &mut ParamBuilder::new(), budget)?;
            Ok(cfg)
        })
        .collect::<Result<Vec<_>>>()?;
    // samples[module][step][width index][seed]
    let mut samples: BTreeMap<String, Vec<Vec<Vec<f64>>>> = BTreeMap::new();
    let nw = args.widths.len();
    for (wi, &w) in args.widths.iter().enumerate() {
        for seed in 0..args.seeds {
            let mut cfg = width_cfgs[wi].clone();
            cfg.run.seed = first.run.seed + seed;
            let mut pb = ParamBuilder::new();
            let (model, _) = build_model(&cfg, &data, &mut pb, budget)?;
            let mut params = pb.build(cfg.run.seed, DType::F32)?;
            let mut opt = build_optimizer(&cfg, &params, 1)?;
            let mut grads = GradStore::try_new(&params)?;
            let mut solo = dptrain_comm::LocalComm::new();
            for step in 0..args.steps {
                let mut probes = Probes::with_coords();
                grads.zero_grad();
                {
                    let tape = Tape::new();
                    let loss = model.loss(&tape, &params, &batch, true, &mut probes)?;
                    if !loss.item()?.is_finite() {
                        return Err(LaunchError::Runtime(format!("width {w}, seed {seed}, step {}: the loss is not finite", step + 1)));
                    }
                    tape.backward(loss, &mut grads, |_, _| {})?;
                }
                opt.step(&mut params, &grads, &mut StepCtx { step: step + 1, lr: args.lr, comm: &mut solo })?;
                for (name, _, v) in probes.values.iter().filter(|(n, _, _)| n.starts_with("coord/")) {
                    let m = samples
                        .entry(name.trim_start_matches("coord/").to_string())
                        .or_insert_with(|| vec![vec![vec![]; nw]; args.steps as usize]);
                    m[step as usize][wi].push(*v);
                }
            }
        }
    }
    let lx: Vec<f64> = args.widths.iter().map(|&w| (w as f64).log2()).collect();
    let mut modules = BTreeMap::new();
    let mut failures = vec![];
    for (name, per_step) in samples {
        let mean_abs: Vec<Vec<f64>> =
            per_step.iter().map(|ws| ws.iter().map(|s| s.iter().sum::<f64>() / s.len().max(1) as f64).collect()).collect();
        let slopes: Vec<Option<f64>> = mean_abs
            .iter()
            .map(|ys| {
                if ys.iter().all(|&y| y == 0.0) {
                    Some(0.0)
                } else if ys.iter().all(|&y| y > 0.0 && y.is_finite()) {
                    Some(slope(&lx, &ys.iter().map(|y| y.log2()).collect::<Vec<_>>()))
                } else {
                    None
                }
            })
            .collect();
        for (t, s) in slopes.iter().enumerate() {
            match s {
                Some(s) if s.abs() >= args.max_slope => failures.push((name.clone(), t as u64 + 1, *s)),
                None => failures.push((name.clone(), t as u64 + 1, f64::NAN)),
                _ => {}
            }
        }
        modules.insert(name, Curve { mean_abs, slope: slopes });
    }
    Ok(Report {
        widths: args.widths.clone(),
        seeds: args.seeds,
        steps: args.steps,
        lr: args.lr,
        max_slope: args.max_slope,
        modules,
        failures,
    })
}

/// The table printed at the end: one row per module, the slope at every step.
pub fn table(r: &Report) -> String {
    let name_w = r.modules.keys().map(|k| k.len()).max().unwrap_or(6).max(6);
    let mut s = format!("coordinate check: widths {:?}, {} seeds, {} steps at lr {:e}\n", r.widths, r.seeds, r.steps, r.lr);
    s.push_str(&format!("{:<name_w$}", "module"));
    for t in 1..=r.steps {
        s.push_str(&format!("  slope t={t:<3}"));
    }
    s.push_str(&format!("  mean|x| at t={} (widest)\n", r.steps));
    for (name, c) in &r.modules {
        s.push_str(&format!("{name:<name_w$}"));
        for sl in &c.slope {
            let cell = match sl {
                Some(v) if v.abs() >= r.max_slope => format!("{v:+.3} !"),
                Some(v) => format!("{v:+.3}"),
                None => "n/a !".into(),
            };
            s.push_str(&format!("  {cell:>11}"));
        }
        s.push_str(&format!("  {:.3e}\n", c.mean_abs.last().and_then(|v| v.last()).copied().unwrap_or(f64::NAN)));
    }
    if r.failures.is_empty() {
        s.push_str(&format!("PASS: every |slope| < {}\n", r.max_slope));
    } else {
        s.push_str(&format!("FAIL: {} (module, step) curves with |slope| ≥ {} (marked !)\n", r.failures.len(), r.max_slope));
    }
    s
}

/// Writes `coord_check.json` and `coord_check.png` into `dir`.
pub fn write(r: &Report, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| input_err!("--out {}: {e}", dir.display()))?;
    let json = serde_json::to_string_pretty(r).map_err(|e| LaunchError::Runtime(e.to_string()))?;
    dptrain_core::checkpoint::atomic_write(&dir.join("coord_check.json"), json.as_bytes())?;
    crate::plot::coord_check_png(r, &dir.join("coord_check.png"))
}
