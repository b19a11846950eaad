//! `dptrain sweep`: an LR sweep over a grid of variants, each point a `dptrain train` child
//! process with its own run directory (one after another here), and the **LR sensitivity** of
//! each variant as Wortsman et al. 2023 define it:
//! E over the LR grid of [min(L(η), L0) − L*], L* = the best final loss over the grid, L0 the
//! loss at initialisation (every point evaluates once before its first step; a run that
//! diverges counts at L0). Writes `sweep.json`, `sweep.png` (log10 LR against final loss, a curve
//! per variant) and prints a table.
//!
//! On a cluster, `--slurm` writes an array job instead (`sweep.sbatch`, one array task per
//! point, each the same `dptrain train` with its own `--set`s and run directory, through
//! `slurm::render`); when it has run, `--collect` reads the points' run directories and writes
//! the same `sweep.json`, plot and table without training anything.

use crate::error::{input_err, LaunchError, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What `dptrain sweep` was asked to do.
#[derive(Debug, Clone)]
pub struct SweepArgs {
    pub config: Option<PathBuf>,
    pub sets: Vec<String>,
    pub lrs: Vec<f64>,
    /// `key=v1|v2|...`, each a grid axis.
    pub grid: Vec<String>,
    pub out: PathBuf,
    pub mode: Mode,
}

/// Train the points here, write a Slurm array job for them, or collect what one produced.
#[derive(Debug, Clone, Default)]
pub enum Mode {
    #[default]
    Run,
    Slurm(Box<crate::slurm::SlurmArgs>),
    Collect,
}

/// One run of the sweep.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Point {
    pub variant: String,
    pub lr: f64,
    pub run_dir: PathBuf,
    /// The validation loss at initialisation.
    pub init_loss: Option<f64>,
    /// The final validation loss; `None` when the run diverged or failed.
    pub final_loss: Option<f64>,
    pub diverged: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Variant {
    pub name: String,
    pub sets: Vec<String>,
    /// E_η[min(L(η), L0) − L*] over the grid.
    pub lr_sensitivity: Option<f64>,
    pub best_lr: Option<f64>,
    pub best_loss: Option<f64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Sweep {
    pub lrs: Vec<f64>,
    pub variants: Vec<Variant>,
    pub points: Vec<Point>,
}

/// LR sensitivity from (final loss or `None` for a diverged run) per LR and the loss at
/// initialisation: the mean over the grid of min(L, L0) − L*, L* the best of min(L, L0).
pub fn lr_sensitivity(finals: &[Option<f64>], l0: f64) -> f64 {
    let capped: Vec<f64> = finals.iter().map(|l| l.filter(|v| v.is_finite()).map_or(l0, |v| v.min(l0))).collect();
    let best = capped.iter().copied().fold(f64::INFINITY, f64::min);
    capped.iter().map(|l| l - best).sum::<f64>() / capped.len().max(1) as f64
}

/// The grid's variants: every combination of one value per axis, as (name, `--set`s).
fn variants(grid: &[String]) -> Result<Vec<(String, Vec<String>)>> {
    let mut out = vec![(String::new(), vec![])];
    for axis in grid {
        let (key, vals) = axis.split_once('=').ok_or_else(|| input_err!("--grid {axis}: expected key=v1|v2|..."))?;
        let vals: Vec<&str> = vals.split('|').collect();
        // An empty value (`a||b`, a trailing `|`) is a typo, not a variant to drop quietly.
        if key.is_empty() || vals.iter().any(|v| v.trim().is_empty()) {
            return Err(input_err!("--grid {axis}: expected key=v1|v2|... (no empty value)"));
        }
        out = out
            .into_iter()
            .flat_map(|(name, sets)| {
                vals.iter().map(move |v| {
                    let n = if name.is_empty() { format!("{key}={v}") } else { format!("{name},{key}={v}") };
                    let mut s = sets.clone();
                    s.push(format!("{key}={v}"));
                    (n, s)
                })
            })
            .collect();
    }
    Ok(out)
}

fn dir_name(s: &str) -> String {
    let n: String = s.chars().map(|c| if c.is_ascii_alphanumeric() || "._-=".contains(c) { c } else { '_' }).collect();
    if n.is_empty() {
        "base".into()
    } else {
        n
    }
}

/// The validation losses a finished (or failed) run recorded: (at step 0, last).
fn losses(run_dir: &Path) -> (Option<f64>, Option<f64>) {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap_or_default();
    let evals: Vec<(u64, f64)> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|r| Some((r.get("step")?.as_u64()?, r.get("val_loss")?.as_f64()?)))
        .collect();
    (evals.iter().find(|(s, _)| *s == 0).map(|e| e.1), evals.iter().rev().find(|(s, _)| *s > 0).map(|e| e.1))
}

/// The `--set`s of one point beyond the sweep's own: its variant's, its learning rate, and the
/// step-0 evaluation the sensitivity needs.
fn point_sets(vsets: &[String], lr: f64) -> Vec<String> {
    vsets.iter().cloned().chain([format!("optim.lr={lr}"), "train.eval_at_start=true".into()]).collect()
}

/// `--slurm`: the array job script and its config in `--out`; returns the script's path.
pub fn write_slurm(args: &SweepArgs, job: &crate::slurm::SlurmArgs) -> Result<PathBuf> {
    let variants = checked_variants(args)?;
    let exe = std::env::current_exe().map_err(|e| LaunchError::Runtime(format!("cannot find the dptrain binary: {e}")))?;
    std::fs::create_dir_all(&args.out).map_err(|e| input_err!("--out {}: {e}", args.out.display()))?;
    let out = std::path::absolute(&args.out).unwrap_or_else(|_| args.out.clone());
    let mut tasks = vec![];
    for (name, vsets) in variants {
        for &lr in &args.lrs {
            tasks.push(crate::slurm::ArrayTask {
                sets: point_sets(&vsets, lr),
                run_dir: out.join(dir_name(&name)).join(format!("lr_{lr:e}")),
            });
        }
    }
    let job = crate::slurm::SlurmArgs { config: args.config.clone(), sets: args.sets.clone(), ..job.clone() };
    let (config_toml, name) = crate::slurm::job_config(&job)?;
    let config_path = out.join("sweep-config.toml");
    let script = out.join("sweep.sbatch");
    let text = crate::slurm::render(&job, &format!("{name}-sweep"), &exe, &config_path, &out, Some(&tasks))?;
    dptrain_core::checkpoint::atomic_write(&config_path, config_toml.as_bytes())?;
    dptrain_core::checkpoint::atomic_write(&script, text.as_bytes())?;
    Ok(script)
}

/// The grid's variants, every point's config checked first as `dptrain train` will check it
/// (the file, the sweep's `--set`s, the variant's and the learning rate): a value one variant
/// gets wrong is an error before any point runs or any script is written, not after the
/// points before it trained.
fn checked_variants(args: &SweepArgs) -> Result<Vec<(String, Vec<String>)>> {
    check_lrs(&args.lrs)?;
    let vs = variants(&args.grid)?;
    for (_, vsets) in &vs {
        for &lr in &args.lrs {
            let sets = args.sets.iter().cloned().chain(point_sets(vsets, lr)).collect();
            crate::setup::load_config(&crate::train::TrainArgs { config: args.config.clone(), sets, ..Default::default() })?;
        }
    }
    Ok(vs)
}

fn check_lrs(lrs: &[f64]) -> Result<()> {
    if lrs.is_empty() || lrs.iter().any(|l| !(*l > 0.0 && l.is_finite())) {
        return Err(input_err!("--lr: a comma-separated list of positive learning rates"));
    }
    Ok(())
}

/// Runs the sweep (children one after another) — or, with `Mode::Collect`, reads what the
/// points' runs wrote — and writes sweep.json and sweep.png.
pub fn run(args: &SweepArgs) -> Result<Sweep> {
    let collect = matches!(args.mode, Mode::Collect);
    let variants = if collect {
        check_lrs(&args.lrs)?;
        variants(&args.grid)?
    } else {
        checked_variants(args)?
    };
    let exe = std::env::current_exe().map_err(|e| LaunchError::Runtime(format!("cannot find the dptrain binary: {e}")))?;
    std::fs::create_dir_all(&args.out).map_err(|e| input_err!("--out {}: {e}", args.out.display()))?;
    let mut points = vec![];
    let mut out_variants = vec![];
    for (name, vsets) in variants {
        let mut finals = vec![];
        let mut l0s = vec![];
        for &lr in &args.lrs {
            let run_dir = args.out.join(dir_name(&name)).join(format!("lr_{lr:e}"));
            if collect {
                if !run_dir.join("metrics.jsonl").is_file() {
                    return Err(input_err!("--collect: {} has no metrics.jsonl (has the array job run?)", run_dir.display()));
                }
                let (l0, last) = losses(&run_dir);
                // Finished means summary.json; a run that stopped early (diverged) has none.
                let diverged = !run_dir.join("summary.json").is_file() || last.is_none_or(|l| !l.is_finite());
                let final_loss = if diverged { None } else { last };
                finals.push(final_loss);
                l0s.extend(l0);
                points.push(Point { variant: name.clone(), lr, run_dir, init_loss: l0, final_loss, diverged });
                continue;
            }
            let mut c = Command::new(&exe);
            c.arg("train");
            if let Some(cfg) = &args.config {
                c.arg(cfg);
            }
            c.arg("--run-dir").arg(&run_dir);
            for s in args.sets.iter().cloned().chain(point_sets(&vsets, lr)) {
                c.arg("--set").arg(s);
            }
            println!("sweep: {} lr {lr:e} → {}", if name.is_empty() { "(base)" } else { &name }, run_dir.display());
            let o = c.output().map_err(|e| LaunchError::Runtime(format!("cannot run {}: {e}", exe.display())))?;
            let log = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            std::fs::write(run_dir.with_extension("log"), &log).ok();
            let (l0, last) = losses(&run_dir);
            if o.status.code() == Some(2) {
                // Bad input the config check could not see (the data, say): the same for every
                // point, so stop at the first, with the child's own line.
                let line = log.lines().rev().find(|l| l.contains("error")).unwrap_or("a sweep point's config is invalid").trim();
                return Err(input_err!("{}", line.strip_prefix("dptrain: error: ").unwrap_or(line)));
            }
            let diverged = !o.status.success();
            let final_loss = if diverged { None } else { last };
            finals.push(final_loss);
            l0s.extend(l0);
            points.push(Point { variant: name.clone(), lr, run_dir, init_loss: l0, final_loss, diverged });
        }
        let l0 = l0s.first().copied();
        let best = args.lrs.iter().zip(&finals).filter_map(|(lr, l)| l.map(|l| (*lr, l))).min_by(|a, b| a.1.total_cmp(&b.1));
        out_variants.push(Variant {
            name: if name.is_empty() { "base".into() } else { name },
            sets: vsets,
            lr_sensitivity: l0.map(|l0| lr_sensitivity(&finals, l0)),
            best_lr: best.map(|b| b.0),
            best_loss: best.map(|b| b.1),
        });
    }
    let sweep = Sweep { lrs: args.lrs.clone(), variants: out_variants, points };
    let json = serde_json::to_string_pretty(&sweep).map_err(|e| LaunchError::Runtime(e.to_string()))?;
    dptrain_core::checkpoint::atomic_write(&args.out.join("sweep.json"), json.as_bytes())?;
    let series: Vec<(String, Vec<(f64, f64)>)> = sweep
        .variants
        .iter()
        .map(|v| {
            let pts = sweep
                .points
                .iter()
                .filter(|p| (if v.name == "base" { "" } else { &v.name }) == p.variant)
                .map(|p| (p.lr.log10(), p.final_loss.or(p.init_loss).unwrap_or(f64::NAN)))
                .collect();
            (v.name.clone(), pts)
        })
        .collect();
    crate::plot::chart_xy(
        &args.out.join("sweep.png"),
        "LR sweep (diverged runs at the loss at init)",
        "log10 lr",
        "final val loss",
        &series,
        false,
    )?;
    Ok(sweep)
}

/// The table: final loss per (variant, LR), then each variant's sensitivity.
pub fn table(s: &Sweep) -> String {
    let mut t = format!("{:<28}", "variant \\ lr");
    for lr in &s.lrs {
        t.push_str(&format!(" {:>9}", format!("{lr:.0e}")));
    }
    t.push_str("  sensitivity  best lr\n");
    for v in &s.variants {
        t.push_str(&format!("{:<28}", v.name));
        for p in s.points.iter().filter(|p| (if v.name == "base" { "" } else { &v.name }) == p.variant) {
            t.push_str(&match p.final_loss {
                Some(l) => format!(" {l:>9.4}"),
                None => format!(" {:>9}", "diverged"),
            });
        }
        t.push_str(&format!(
            "  {:>11}  {}\n",
            v.lr_sensitivity.map_or("—".into(), |x| format!("{x:.4}")),
            v.best_lr.map_or("—".into(), |x| format!("{x:.0e}"))
        ));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The notes' definition by hand: L0 = 4, losses over a 4-point grid 3.0, 2.0, 2.5 and a
    /// diverged run; capped at L0 they are 3, 2, 2.5, 4; L* = 2; sensitivity = (1 + 0 + 0.5 + 2)/4.
    #[test]
    fn sensitivity_matches_a_hand_computed_example() {
        let s = lr_sensitivity(&[Some(3.0), Some(2.0), Some(2.5), None], 4.0);
        assert!((s - 0.875).abs() < 1e-12, "{s}");
        // A loss above the loss at init counts at L0, as a non-finite one does.
        assert!((lr_sensitivity(&[Some(5.0), Some(f64::NAN), Some(1.0)], 4.0) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn the_grid_is_the_product_of_its_axes() {
        let v = variants(&["model.qk_norm=true|false".into(), "optim.kind=\"adamw\"|\"lamb\"".into()]).unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(v[1].0, "model.qk_norm=true,optim.kind=\"lamb\"");
        assert!(variants(&["nokey".into()]).is_err());
        for typo in ["optim.kind=\"adamw\"|", "model.qk_norm=true||false", "model.qk_norm=", "=1|2"] {
            let e = variants(&[typo.into()]).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--grid {typo}: expected key=v1|v2|...")), "{e}");
        }
    }

    /// A point's learning rate reaches its config as the number swept, however large or small
    /// (1e20, written as 21 digits, was an integer TOML refused).
    #[test]
    fn a_points_learning_rate_reads_back_as_swept() {
        for lr in [1e20, 1e-30, 0.05, 3.0, 2.5e-4] {
            let mut t = toml::Table::new();
            crate::config::apply_sets(&mut t, &point_sets(&[], lr)).unwrap();
            let cfg = crate::config::Raw::new(t).unwrap().typed().unwrap();
            assert_eq!(cfg.optim.lr, lr);
        }
    }
}
