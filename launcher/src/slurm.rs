//! `dptrain slurm CFG --nodes N [--gpus-per-node G | --ntasks-per-node T] ...`: a commented
//! sbatch script that runs `srun --mpi=<plugin> --kill-on-bad-exit=1 dptrain train` with one
//! task per GPU (or the given tasks per node on CPU), named and logged after the run, with the
//! config (the file plus the `--set` overrides, checked) copied next to it so the job runs what
//! was generated even if the original changes. `--submit` hands it to `sbatch` and prints the
//! job id. `dptrain sweep --slurm` uses the array form: one array task per sweep point.
//!
//! Slurm's own environment (SLURM_PROCID, SLURM_LOCALID, PMIx/PMI2) gives each task its rank;
//! dptrain's world discovery reads it, so nothing here sets ranks.

use crate::error::{input_err, LaunchError, Result};
use std::path::{Path, PathBuf};

/// What `dptrain slurm` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct SlurmArgs {
    pub config: Option<PathBuf>,
    pub sets: Vec<String>,
    pub nodes: usize,
    pub gpus_per_node: Option<usize>,
    pub ntasks_per_node: Option<usize>,
    pub time: Option<String>,
    pub partition: Option<String>,
    pub account: Option<String>,
    pub cpus_per_task: Option<usize>,
    /// `pmix` or `pmi2`.
    pub mpi: String,
    pub script: Option<PathBuf>,
    pub submit: bool,
}

/// One array task: its `--set`s and run directory (a sweep point).
#[derive(Debug, Clone)]
pub struct ArrayTask {
    pub sets: Vec<String>,
    pub run_dir: PathBuf,
}

/// A word for the shell: single-quoted unless it is plainly safe.
pub fn sh_quote(w: &str) -> String {
    if !w.is_empty() && w.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

fn check(a: &SlurmArgs) -> Result<()> {
    if a.nodes < 1 {
        return Err(input_err!("--nodes {}: at least 1", a.nodes));
    }
    match (a.gpus_per_node, a.ntasks_per_node) {
        (Some(_), Some(_)) => return Err(input_err!("--gpus-per-node and --ntasks-per-node: give one (GPU runs have one task per GPU)")),
        (Some(0), _) | (_, Some(0)) => return Err(input_err!("--gpus-per-node / --ntasks-per-node: at least 1")),
        _ => {}
    }
    if a.mpi != "pmix" && a.mpi != "pmi2" {
        return Err(input_err!(
            "--mpi {}: expected pmix or pmi2 (the srun MPI plugin; `srun --mpi=list` shows what the cluster has)",
            a.mpi
        ));
    }
    if let Some(t) = &a.time {
        // Slurm's forms: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
        let ok = t.split(['-', ':']).all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit())) && t.split(':').count() <= 3;
        if !ok {
            return Err(input_err!("--time {t}: expected a Slurm time such as 04:00:00, 90 or 1-12:00:00"));
        }
    }
    for (k, v) in [("--partition", &a.partition), ("--account", &a.account)] {
        if let Some(v) = v {
            if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return Err(input_err!("{k} {v}: expected a Slurm name (letters, digits, - _ .)"));
            }
        }
    }
    Ok(())
}

/// The checked config (file + `--set`s; a GPU job runs on `cuda`) as TOML, and its run name.
pub(crate) fn job_config(a: &SlurmArgs) -> Result<(String, String)> {
    let mut table = match &a.config {
        Some(p) => crate::config::parse_file(p)?,
        None => toml::Table::new(),
    };
    let mut sets = a.sets.clone();
    if a.gpus_per_node.is_some() && !sets.iter().any(|s| s.starts_with("run.device=")) {
        sets.push("run.device=\"cuda\"".into());
    }
    crate::config::apply_sets(&mut table, &sets)?;
    let raw = crate::config::Raw::new(table)?;
    let cfg = raw.typed()?;
    Ok((toml::to_string(raw.table()).map_err(|e| LaunchError::Runtime(e.to_string()))?, cfg.run.name))
}

/// The sbatch script for the job, with `dptrain` at `exe`, the config at `config_path`; an
/// array job when `array` is given (each task's `--set`s and run directory).
pub fn render(a: &SlurmArgs, name: &str, exe: &Path, config_path: &Path, log_dir: &Path, array: Option<&[ArrayTask]>) -> Result<String> {
    check(a)?;
    let tasks = a.gpus_per_node.or(a.ntasks_per_node).unwrap_or(1);
    let mut s = String::from("#!/bin/bash\n");
    s.push_str("# Written by `dptrain slurm`. Submit with: sbatch THIS_FILE\n");
    match (a.gpus_per_node, array) {
        (Some(g), _) => s.push_str(&format!("# {} node(s) × {g} GPU(s), one task (one dptrain rank) per GPU.\n", a.nodes)),
        (None, _) => s.push_str(&format!("# {} node(s) × {tasks} task(s) on CPU, one dptrain rank per task.\n", a.nodes)),
    }
    if let Some(arr) = array {
        s.push_str(&format!("# An array of {} jobs: one per sweep point (SLURM_ARRAY_TASK_ID picks it).\n", arr.len()));
    }
    s.push_str(&format!("#SBATCH --job-name={}\n", sh_quote(name)));
    s.push_str(&format!("#SBATCH --nodes={}\n", a.nodes));
    s.push_str(&format!("#SBATCH --ntasks-per-node={tasks}\n"));
    if let Some(g) = a.gpus_per_node {
        s.push_str(&format!("#SBATCH --gpus-per-node={g}\n"));
    }
    if let Some(c) = a.cpus_per_task {
        s.push_str(&format!("#SBATCH --cpus-per-task={c}\n"));
    }
    if let Some(t) = &a.time {
        s.push_str(&format!("#SBATCH --time={t}\n"));
    }
    if let Some(p) = &a.partition {
        s.push_str(&format!("#SBATCH --partition={p}\n"));
    }
    if let Some(acc) = &a.account {
        s.push_str(&format!("#SBATCH --account={acc}\n"));
    }
    // Slurm's SIGTERM at the limit leaves only KillWait (30 s by default) before SIGKILL; two
    // minutes' notice lets a large model finish its step and write its checkpoint (`stop`).
    s.push_str("# SIGUSR1 to every rank 2 minutes before the time limit: dptrain stops at the end of its step\n");
    s.push_str("# with a checkpoint (continue with `dptrain train --resume RUN_DIR`).\n");
    s.push_str("#SBATCH --signal=USR1@120\n");
    let log = |pat: &str| log_dir.join(pat).display().to_string();
    match array {
        Some(arr) => {
            s.push_str(&format!("#SBATCH --array=0-{}\n", arr.len().saturating_sub(1)));
            s.push_str(&format!("#SBATCH --output={}\n", sh_quote(&log(&format!("{name}-%A_%a.out")))));
        }
        None => s.push_str(&format!("#SBATCH --output={}\n", sh_quote(&log(&format!("{name}-%j.out"))))),
    }
    s.push_str("set -euo pipefail\n\n");
    s.push_str(&format!("DPTRAIN={}\n", sh_quote(&exe.display().to_string())));
    s.push_str("# The config as generated (the file plus its --set overrides, checked).\n");
    s.push_str(&format!("CONFIG={}\n", sh_quote(&config_path.display().to_string())));
    if let Some(arr) = array {
        s.push_str("# This array task's point: its run directory and overrides.\ncase \"$SLURM_ARRAY_TASK_ID\" in\n");
        for (i, t) in arr.iter().enumerate() {
            let mut words = vec!["--run-dir".to_string(), sh_quote(&t.run_dir.display().to_string())];
            for set in &t.sets {
                words.push("--set".into());
                words.push(sh_quote(set));
            }
            s.push_str(&format!("  {i}) set -- {} ;;\n", words.join(" ")));
        }
        s.push_str("  *) echo \"no sweep point $SLURM_ARRAY_TASK_ID\" >&2; exit 2 ;;\nesac\n\n");
    } else {
        s.push_str("# Arguments after the script's name on sbatch's command line reach dptrain train\n# (e.g. `sbatch THIS_FILE --set train.steps=100`).\n\n");
    }
    if a.cpus_per_task.is_some() {
        s.push_str(
            "# Each rank's compute threads: the cores Slurm gives its task.\nset -- \"$@\" --set \"run.threads=$SLURM_CPUS_PER_TASK\"\n\n",
        );
    }
    s.push_str("# One rank per task; a rank that fails ends the whole step (--kill-on-bad-exit).\n");
    s.push_str(&format!("srun --mpi={} --kill-on-bad-exit=1 \"$DPTRAIN\" train \"$CONFIG\" \"$@\"\n", a.mpi));
    Ok(s)
}

/// `dptrain slurm`: writes the script (to `--script` or stdout) and the config beside it;
/// with `--submit`, runs sbatch. Returns the script's path when one was written.
pub fn slurm(a: &SlurmArgs) -> Result<Option<PathBuf>> {
    check(a)?;
    let (config_toml, name) = job_config(a)?;
    let exe = std::env::current_exe().map_err(|e| LaunchError::Runtime(format!("cannot find the dptrain binary: {e}")))?;
    let script_path = match (&a.script, a.submit) {
        (Some(p), _) => Some(p.clone()),
        (None, true) => Some(PathBuf::from(format!("{name}.sbatch"))),
        (None, false) => None,
    };
    let dir = script_path
        .as_deref()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let config_path = abs(&dir.join(format!("{name}.toml")));
    // Beside the run directory, not in it: a run never writes into a non-empty directory.
    let log_dir = abs(&PathBuf::from("runs"));
    let text = render(a, &name, &exe, &config_path, &log_dir, None)?;
    std::fs::create_dir_all(&dir).map_err(|e| input_err!("--script: cannot create {} ({e})", dir.display()))?;
    // Slurm opens the --output file before the job starts: its directory must exist.
    std::fs::create_dir_all(&log_dir).map_err(|e| LaunchError::Runtime(format!("{}: {e}", log_dir.display())))?;
    dptrain_core::checkpoint::atomic_write(&config_path, config_toml.as_bytes())?;
    match &script_path {
        Some(p) => {
            dptrain_core::checkpoint::atomic_write(p, text.as_bytes())?;
            println!("dptrain slurm: wrote {} and {}", p.display(), config_path.display());
        }
        None => print!("{text}"),
    }
    if a.submit {
        let p = script_path.as_deref().expect("set when submitting");
        println!("dptrain slurm: job {}", submit(p)?);
    }
    Ok(script_path)
}

/// Runs `sbatch --parsable SCRIPT`; returns the job id.
pub fn submit(script: &Path) -> Result<String> {
    let o = std::process::Command::new("sbatch").arg("--parsable").arg(script).output().map_err(|e| {
        LaunchError::Runtime(format!("cannot run sbatch ({e}): --submit needs Slurm's sbatch on PATH (a login node of the cluster)"))
    })?;
    if !o.status.success() {
        return Err(LaunchError::Runtime(format!("sbatch {}: {}", script.display(), String::from_utf8_lossy(&o.stderr).trim())));
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().split(';').next().unwrap_or("").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_keeps_words_whole() {
        assert_eq!(sh_quote("optim.lr=0.001"), "optim.lr=0.001");
        assert_eq!(sh_quote("optim.kind=\"lamb\""), "'optim.kind=\"lamb\"'");
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
        assert_eq!(sh_quote(""), "''");
    }

    #[test]
    fn bad_options_name_themselves() {
        let ok = SlurmArgs { nodes: 1, mpi: "pmix".into(), ..Default::default() };
        assert!(check(&ok).is_ok());
        for (a, want) in [
            (SlurmArgs { nodes: 0, ..ok.clone() }, "--nodes"),
            (SlurmArgs { gpus_per_node: Some(8), ntasks_per_node: Some(4), ..ok.clone() }, "give one"),
            (SlurmArgs { mpi: "openmpi".into(), ..ok.clone() }, "--mpi openmpi"),
            (SlurmArgs { time: Some("4h".into()), ..ok.clone() }, "--time 4h"),
            (SlurmArgs { partition: Some("a b".into()), ..ok.clone() }, "--partition"),
        ] {
            let e = check(&a).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        for t in ["04:00:00", "90", "1-12:00:00", "30:00"] {
            assert!(check(&SlurmArgs { time: Some(t.into()), ..ok.clone() }).is_ok(), "{t}");
        }
    }
}
