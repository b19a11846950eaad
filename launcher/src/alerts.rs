//! Alerts: a warning line on the terminal and a record in the run's `events.jsonl` (rank 0)
//! when a run shows a known sign of instability — a max attention logit above
//! `probes.max_logit_warn` (Wortsman et al. 2023: runs above ~1e4 diverged), a loss spike beyond
//! `probes.spike_sigma` running deviations, non-finite loss or gradients (what happens next is
//! `train.on_nonfinite`), massive activations (Sun et al. 2024: top-1 |h| > 100 and ≥ 1000× the
//! median). Every record has the `step`, a `kind`, the numbers that tripped it and a message.
//!
//! The loss-spike detector's running mean and deviation (debiased EMAs) and the count of
//! skipped steps are part of the checkpoint (`Detectors`), so a resumed run alerts exactly where
//! the uninterrupted one would.

use crate::error::{LaunchError, Result};
use crate::probes::Ema;
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;

/// EMA factor of the loss-spike detector, and the steps it watches before it may alert.
const SPIKE_BETA: f64 = 0.98;
const SPIKE_WARMUP: u64 = 20;

/// Massive activations (Sun et al. 2024).
const MASSIVE_TOP1: f64 = 100.0;
const MASSIVE_RATIO: f64 = 1000.0;

/// The detectors' running state, saved in checkpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Detectors {
    pub loss_mean: Ema,
    pub loss_sq: Ema,
    /// Steps skipped for non-finite loss or gradients (`train.on_nonfinite = "skip"`).
    pub skipped: u64,
    pub cbs: crate::probes::CriticalBatch,
}

impl Detectors {
    /// Checks `loss` against the running statistics, then folds it in (finite losses only).
    /// Returns the alert when it spiked.
    pub fn loss_spike(&mut self, step: u64, loss: f64, sigma: f64) -> Option<Value> {
        if !loss.is_finite() {
            return None;
        }
        let mut alert = None;
        if self.loss_mean.count >= SPIKE_WARMUP {
            let mean = self.loss_mean.get(SPIKE_BETA);
            let sd = (self.loss_sq.get(SPIKE_BETA) - mean * mean).max(0.0).sqrt();
            if loss - mean > sigma * sd && sd > 0.0 {
                alert = Some(json!({
                    "step": step, "kind": "loss_spike", "loss": loss, "running_mean": mean, "running_sd": sd,
                    "message": format!("loss {loss:.4} is {:.1} running deviations above its running mean {mean:.4}", (loss - mean) / sd),
                }));
            }
        }
        self.loss_mean.update(loss, SPIKE_BETA);
        self.loss_sq.update(loss * loss, SPIKE_BETA);
        alert
    }
}

/// The alerts a probe step's (cross-rank reduced) probes raise.
pub fn probe_alerts(step: u64, probes: &[(String, dptrain_core::probe::Reduce, f64)], max_logit_warn: f64) -> Vec<Value> {
    let get = |k: &str| probes.iter().find(|p| p.0 == k).map(|p| p.2);
    let mut out = vec![];
    for (k, _, v) in probes {
        if let Some(layer) = k.strip_prefix("attn_logit_max/") {
            if *v > max_logit_warn {
                out.push(json!({
                    "step": step, "kind": "max_logit", "layer": layer, "value": v, "threshold": max_logit_warn,
                    "message": format!("max attention logit of layer {layer} is {v:.1} (> probes.max_logit_warn = {max_logit_warn})"),
                }));
            }
        }
        if let Some(layer) = k.strip_prefix("massive_top1/").filter(|l| !l.contains('@')) {
            let ratio = get(&format!("massive_ratio/{layer}")).unwrap_or(0.0);
            if *v > MASSIVE_TOP1 && ratio >= MASSIVE_RATIO {
                let at = |w: &str| get(&format!("massive_top1/{layer}@{w}")).map_or(-1, |x| x as i64);
                out.push(json!({
                    "step": step, "kind": "massive_activation", "layer": layer, "top1": v, "ratio": ratio,
                    "token": at("token"), "channel": at("channel"),
                    "message": format!("massive activation after block {layer}: |h| {v:.1}, {ratio:.0}× the median, at token {} channel {}", at("token"), at("channel")),
                }));
            }
        }
    }
    out
}

/// The non-finite alert.
pub fn nonfinite(step: u64, loss: f64, grad_norm: f64, skip: bool) -> Value {
    let what = if skip { "step skipped (train.on_nonfinite = \"skip\")" } else { "aborting (train.on_nonfinite = \"abort\")" };
    json!({
        "step": step, "kind": "nonfinite", "loss": finite_or_str(loss), "grad_norm": finite_or_str(grad_norm), "skipped": skip,
        "message": format!("loss {loss}, gradient norm {grad_norm}: {what}"),
    })
}

/// JSON has no NaN or infinity: those are written as strings.
fn finite_or_str(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        json!(x.to_string())
    }
}

/// `events.jsonl` of a run (rank 0), appended to; a resumed run first drops the records after
/// its checkpoint's step, as `metrics.jsonl`.
pub struct Events {
    file: Option<std::fs::File>,
}

impl Events {
    pub fn open(dir: &Path, rank0: bool, resumed_at: Option<u64>) -> Result<Events> {
        if !rank0 {
            return Ok(Events { file: None });
        }
        let path = dir.join("events.jsonl");
        if let Some(step) = resumed_at {
            crate::metrics::truncate_records(&path, step)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| LaunchError::Runtime(format!("{}: {e}", path.display())))?;
        Ok(Events { file: Some(file) })
    }

    /// Prints the warning and appends the record (rank 0; other ranks do nothing).
    pub fn emit(&mut self, ev: &Value) -> Result<()> {
        let Some(f) = self.file.as_mut() else { return Ok(()) };
        crate::say(&format!("dptrain: warning: step {}: {}", ev["step"], ev["message"].as_str().unwrap_or("")));
        writeln!(f, "{ev}").map_err(|e| LaunchError::Runtime(format!("events.jsonl: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dptrain_core::probe::Reduce;

    #[test]
    fn a_loss_spike_alerts_after_the_warmup_and_only_when_it_spikes() {
        let mut d = Detectors::default();
        let mut alerts = 0;
        for i in 0..40u64 {
            // A noisy plateau: 1.0 ± 0.01.
            let loss = 1.0 + if i % 2 == 0 { 0.01 } else { -0.01 };
            alerts += d.loss_spike(i + 1, loss, 6.0).is_some() as usize;
        }
        assert_eq!(alerts, 0);
        // Within 6 deviations: quiet; far beyond: an alert with the numbers.
        assert!(d.loss_spike(41, 1.05, 6.0).is_none());
        let ev = d.loss_spike(42, 1.5, 6.0).expect("a spike");
        assert_eq!(ev["kind"], "loss_spike");
        assert_eq!(ev["step"], 42);
        // Too early to judge: a spike in the first steps is not reported.
        let mut fresh = Detectors::default();
        assert!((0..5).all(|i| fresh.loss_spike(i + 1, if i == 4 { 100.0 } else { 1.0 }, 6.0).is_none()));
        // Non-finite losses are left to the non-finite check and do not poison the statistics.
        assert!(d.loss_spike(43, f64::NAN, 6.0).is_none());
        assert!(d.loss_mean.value.is_finite());
    }

    #[test]
    fn probe_alerts_for_logits_and_massive_activations() {
        let p = |k: &str, r: Reduce, v: f64| (k.to_string(), r, v);
        let probes = vec![
            p("attn_logit_max/0", Reduce::Max, 50.0),
            p("attn_logit_max/1", Reduce::Max, 2e4),
            p("massive_top1/0", Reduce::Max, 500.0),
            p("massive_ratio/0", Reduce::Max, 2000.0),
            p("massive_top1/0@token", Reduce::At, 0.0),
            p("massive_top1/0@channel", Reduce::At, 17.0),
            p("massive_top1/1", Reduce::Max, 500.0),
            p("massive_ratio/1", Reduce::Max, 20.0),
        ];
        let ev = probe_alerts(7, &probes, 1e3);
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert_eq!((ev[0]["kind"].as_str(), ev[0]["layer"].as_str()), (Some("max_logit"), Some("1")));
        assert_eq!((ev[1]["kind"].as_str(), ev[1]["channel"].as_i64()), (Some("massive_activation"), Some(17)));
    }
}
