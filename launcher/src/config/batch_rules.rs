//! Batch-size rules: how the learning rate, the number of steps and the warmup follow the global
//! batch B when the run was tuned at another batch B0 (`optim.base_batch`).
//!
//! - `optim.lr_scaling`: linear (Goyal et al. 2017, "Accurate, Large Minibatch SGD": B×k ⇒
//!   LR×k) or sqrt (Hoffer et al. 2017, "Train longer, generalize better"), applied to the peak
//!   and the final learning rate alike, so the schedule keeps its shape.
//! - `schedule.warmup_samples`: the warmup as a number of samples (Goyal's "5 epochs" is a data
//!   amount, not a step count), turned into steps at this batch.
//! - `train.regime_adaptation` (Hoffer et al.): k× the batch for k× the epochs — `train.steps`
//!   and the warmup multiplied by B/B0, so the number of updates matches the base run's.
//!
//! The rules rewrite the typed config once, after it is read and before anything is built, so
//! every consumer sees the resolved values; the saved config keeps what was given (a resume
//! applies the same rules again) and the resolved values go to its `[derived]` table.

use super::{LrScaling, Raw, RunConfig};
use crate::error::{input_err, Result};

/// What the rules changed, for the start-up line.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub summary: String,
}

/// Resolves the learning rates, steps and warmup of `cfg` in place; `Some` with a one-line
/// summary when a rule applied.
pub fn apply(raw: &Raw, cfg: &mut RunConfig) -> Result<Option<Applied>> {
    let b = cfg.train.global_batch;
    let regime = cfg.train.regime_adaptation;
    let scaling = cfg.optim.lr_scaling;
    let needs_base = match (scaling, regime) {
        (LrScaling::None, false) => None,
        (LrScaling::None, true) => Some("train.regime_adaptation = true".to_string()),
        (s, _) => Some(format!("optim.lr_scaling = \"{}\"", format!("{s:?}").to_lowercase())),
    };
    let base = match (needs_base, cfg.optim.base_batch) {
        (Some(by), None) => {
            return Err(input_err!("optim.base_batch: needed by {by} (the global batch at which optim.lr and train.steps were set)"))
        }
        (_, b0) => b0,
    };
    if cfg.schedule.warmup_samples.is_some() && raw.is_set("schedule.warmup_steps") {
        return Err(input_err!("schedule.warmup_samples: give either it or schedule.warmup_steps, not both"));
    }
    let mut parts = vec![];
    let warmup_given = match cfg.schedule.warmup_samples {
        Some(s) => {
            let steps = s.div_ceil(b as u64);
            parts.push(format!("warmup {s} samples = {steps} steps of {b}"));
            steps
        }
        None => cfg.schedule.warmup_steps,
    };
    cfg.schedule.warmup_steps = warmup_given;
    let Some(b0) = base else {
        return Ok((!parts.is_empty()).then(|| Applied { summary: parts.join("; ") }));
    };
    let ratio = b as f64 / b0 as f64;
    let lr_factor = match scaling {
        LrScaling::None => 1.0,
        LrScaling::Linear => ratio,
        LrScaling::Sqrt => ratio.sqrt(),
    };
    if scaling != LrScaling::None {
        let (lr, fin) = (cfg.optim.lr * lr_factor, cfg.schedule.final_lr * lr_factor);
        parts.push(format!(
            "lr {:e} → {lr:e}, final_lr {:e} → {fin:e} ({} scaling, B/B0 = {b}/{b0})",
            cfg.optim.lr,
            cfg.schedule.final_lr,
            format!("{scaling:?}").to_lowercase()
        ));
        cfg.optim.lr = lr;
        cfg.schedule.final_lr = fin;
    }
    if regime {
        let scale = |n: u64| ((n as f64) * ratio).round() as u64;
        let (steps, warmup) = (scale(cfg.train.steps).max(1), scale(warmup_given));
        parts
            .push(format!("regime adaptation ×{ratio}: train.steps {} → {steps}, warmup {warmup_given} → {warmup} steps", cfg.train.steps));
        cfg.train.steps = steps;
        cfg.schedule.warmup_steps = warmup;
    }
    Ok((!parts.is_empty()).then(|| Applied { summary: parts.join("; ") }))
}
