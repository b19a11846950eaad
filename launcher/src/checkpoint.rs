//! Run checkpoints: `<run>/checkpoints/step_NNNNNNN/` holding `model.safetensors` (parameters
//! and buffers by PyTorch-style name), `optimizer.safetensors` (state by parameter name),
//! `state.json` (step, sampler position, optimizer scalars, layout fingerprint) and the
//! resolved `config.toml`. A checkpoint directory is built under a temporary name, every file
//! fsynced, then renamed into place, so a crash never leaves a half-written checkpoint.

use crate::error::{input_err, LaunchError, Result};
use dptrain_core::checkpoint::{atomic_write, tensors_from_bytes, tensors_to_bytes};
use dptrain_core::data::StreamState;
use dptrain_core::{ParamStore, Tensor};
use dptrain_optim::Optimizer;
use std::path::{Path, PathBuf};

pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct State {
    pub format: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// This rank's sampler position (every rank's is the same).
    pub stream: StreamState,
    /// Ranks of the run that wrote it (the global sampler position is offset × world_size).
    pub world_size: usize,
    pub optimizer: String,
    pub optimizer_scalars: serde_json::Value,
    pub fingerprint: String,
    pub seed: u64,
    /// The alert detectors' and the critical-batch estimator's running state (absent in
    /// checkpoints from before they existed: they start afresh).
    #[serde(default)]
    pub detectors: crate::alerts::Detectors,
}

impl State {
    /// The sampler position over all ranks: `stream.offset × world_size` samples into the
    /// epoch (a resume divides it over its own ranks). `None` when it is no position: no
    /// ranks, or more samples than a usize counts.
    pub fn global_offset(&self) -> Option<usize> {
        self.stream.offset.checked_mul(self.world_size).filter(|_| self.world_size > 0)
    }
}

fn rt(e: impl std::fmt::Display) -> LaunchError {
    LaunchError::Runtime(e.to_string())
}

pub fn step_dir(run: &Path, step: u64) -> PathBuf {
    run.join("checkpoints").join(format!("step_{step:07}"))
}

/// Writes a checkpoint for `step` and keeps only the newest `keep_last`.
pub fn save(
    run: &Path,
    step: u64,
    params: &ParamStore,
    opt_tensors: &[(String, Tensor)],
    state: &State,
    config_toml: &str,
    keep_last: usize,
) -> Result<PathBuf> {
    let root = run.join("checkpoints");
    std::fs::create_dir_all(&root).map_err(rt)?;
    let dst = step_dir(run, step);
    let tmp = root.join(format!(".step_{step:07}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(rt)?;
    atomic_write(&tmp.join("model.safetensors"), &tensors_to_bytes(&params.named_tensors()?)?)?;
    atomic_write(&tmp.join("optimizer.safetensors"), &tensors_to_bytes(opt_tensors)?)?;
    atomic_write(&tmp.join("state.json"), serde_json::to_string_pretty(state).map_err(rt)?.as_bytes())?;
    atomic_write(&tmp.join("config.toml"), config_toml.as_bytes())?;
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::rename(&tmp, &dst).map_err(rt)?;
    if let Ok(d) = std::fs::File::open(&root) {
        let _ = d.sync_all();
    }
    if keep_last > 0 {
        let all = list(run);
        for old in all.iter().take(all.len().saturating_sub(keep_last)) {
            let _ = std::fs::remove_dir_all(&old.1);
        }
    }
    Ok(dst)
}

/// Complete checkpoints of a run, oldest first.
pub fn list(run: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(run.join("checkpoints"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step_")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// Resolves `--resume DIR`: a run directory (newest checkpoint), its `checkpoints` directory
/// (the same), or one checkpoint's directory.
pub fn find(dir: &Path) -> Result<PathBuf> {
    if dir.join("state.json").is_file() {
        return Ok(dir.to_path_buf());
    }
    if !dir.is_dir() {
        return Err(input_err!("--resume {}: no such directory", dir.display()));
    }
    let run = match dir.parent() {
        Some(run) if dir.file_name().is_some_and(|n| n == "checkpoints") && list(dir).is_empty() => run,
        _ => dir,
    };
    list(run)
        .pop()
        .map(|(_, p)| p)
        .ok_or_else(|| input_err!("--resume {}: no checkpoint found (expected {}/checkpoints/step_*/)", dir.display(), run.display()))
}

pub fn read_state(ckpt: &Path) -> Result<State> {
    let p = ckpt.join("state.json");
    let text = std::fs::read_to_string(&p).map_err(|e| input_err!("{}: cannot read ({e})", p.display()))?;
    let st: State = serde_json::from_str(&text).map_err(|e| input_err!("{}: corrupt checkpoint state ({e})", p.display()))?;
    if st.format != FORMAT {
        return Err(input_err!("{}: checkpoint format {} is not supported (expected {FORMAT})", p.display(), st.format));
    }
    if st.global_offset().is_none() {
        let (offset, ranks) = (st.stream.offset, st.world_size);
        return Err(input_err!("{}: corrupt checkpoint state (sampler position {offset} on {ranks} ranks)", p.display()));
    }
    Ok(st)
}

/// Loads parameters, buffers and optimizer state into freshly built objects, after checking
/// the checkpoint matches them.
pub fn load(ckpt: &Path, st: &State, params: &mut ParamStore, opt: &mut dyn Optimizer) -> Result<()> {
    if st.fingerprint != params.layout_fingerprint() {
        return Err(input_err!(
            "{}: checkpoint was written for a different model (parameter layout differs from the config's)",
            ckpt.display()
        ));
    }
    if st.optimizer != opt.name() {
        return Err(input_err!("{}: checkpoint holds {} state but optim.kind is {}", ckpt.display(), st.optimizer, opt.name()));
    }
    let mp = ckpt.join("model.safetensors");
    params.load_safetensors(&mp).map_err(|e| input_err!("{e}"))?;
    let op = ckpt.join("optimizer.safetensors");
    let bytes = std::fs::read(&op).map_err(|e| input_err!("{}: cannot read ({e})", op.display()))?;
    let tensors = tensors_from_bytes(&bytes).map_err(|e| input_err!("{}: {e}", op.display()))?;
    opt.load_state(params, &tensors, &st.optimizer_scalars).map_err(|e| input_err!("{}: {e}", op.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::find;

    #[test]
    fn resume_takes_a_run_its_checkpoints_or_one_checkpoint() {
        let d = std::env::temp_dir().join(format!("dptrain-find-{}", std::process::id()));
        for s in ["step_0000010", "step_0000020"] {
            std::fs::create_dir_all(d.join("run/checkpoints").join(s)).unwrap();
            std::fs::write(d.join("run/checkpoints").join(s).join("state.json"), "{}").unwrap();
        }
        let newest = d.join("run/checkpoints/step_0000020");
        assert_eq!(find(&d.join("run")).unwrap(), newest);
        assert_eq!(find(&d.join("run/checkpoints")).unwrap(), newest);
        let older = d.join("run/checkpoints/step_0000010");
        assert_eq!(find(&older).unwrap(), older);
        std::fs::create_dir_all(d.join("empty/checkpoints")).unwrap();
        let e = find(&d.join("empty/checkpoints")).unwrap_err().to_string();
        assert!(e.contains("no checkpoint found"), "{e}");
        assert!(find(&d.join("nope")).unwrap_err().to_string().contains("no such directory"));
        std::fs::remove_dir_all(&d).ok();
    }
}
