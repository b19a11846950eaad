//! `MetricSink`: where a run's numbers go. On rank 0 it owns the run directory's first files
//! (the resolved `config.toml`, `metrics.jsonl` — one JSON record per logged step and per
//! evaluation, continued on resume) and the terminal: a progress bar when stdout is a terminal,
//! else one line per logged step. On every rank it keeps the throughput clock, so the summary
//! and each record report samples per second over the same windows.

use crate::error::{input_err, LaunchError, Result};
use crate::setup::Run;
use dptrain_comm::ReduceStats;
use dptrain_core::probe::Reduce;
use serde_json::{json, Map, Value};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Instant;

/// One evaluation's results.
pub struct Eval {
    /// Mean cross-entropy (without the z-loss term).
    pub loss: f64,
    /// Mean z-loss term, when the model has one.
    pub z_loss: Option<f64>,
    /// Top-1 accuracy, for classifiers.
    pub acc: Option<f64>,
}

/// What one logged training step reports.
pub struct StepLog<'a> {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub comm: Option<ReduceStats>,
    /// Probes already combined over micro-steps and ranks.
    pub probes: &'a [(String, Reduce, f64)],
}

pub struct MetricSink {
    /// `metrics.jsonl` (rank 0 only).
    file: Option<std::fs::File>,
    bar: Option<indicatif::ProgressBar>,
    steps: u64,
    t0: Instant,
    window_start: Instant,
    window_samples: usize,
    samples_done: usize,
}

impl MetricSink {
    /// Creates the run directory and its files on rank 0 — only now, after every check passed —
    /// and starts the clock.
    pub fn open(run: &Run, rank0: bool) -> Result<MetricSink> {
        let mut file = None;
        if rank0 {
            let dir = &run.run_dir;
            std::fs::create_dir_all(dir).map_err(|e| input_err!("{}: cannot create run directory ({e})", dir.display()))?;
            let metrics_path = dir.join("metrics.jsonl");
            if run.resumed_from.is_some() {
                truncate_records(&metrics_path, run.start_step)?;
            }
            dptrain_core::checkpoint::atomic_write(&dir.join("config.toml"), run.config_toml.as_bytes())?;
            file = Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&metrics_path)
                    .map_err(|e| LaunchError::Runtime(format!("{}: {e}", metrics_path.display())))?,
            );
        }
        let steps = run.cfg.train.steps;
        // The bar draws on stderr: under Open MPI stdout is a pty but stderr a pipe, and the bar
        // would vanish — then plain lines.
        let bar = (rank0 && std::io::stdout().is_terminal() && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new(steps);
            b.set_style(
                indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]").expect("template"),
            );
            b.set_position(run.start_step);
            b
        });
        let now = Instant::now();
        Ok(MetricSink { file, bar, steps, t0: now, window_start: now, window_samples: 0, samples_done: 0 })
    }

    fn write(&mut self, rec: &Value) -> Result<()> {
        match self.file.as_mut() {
            Some(f) => writeln!(f, "{rec}").map_err(|e| LaunchError::Runtime(format!("metrics.jsonl: {e}"))),
            None => Ok(()),
        }
    }

    fn say(&self, line: String) {
        match &self.bar {
            Some(b) => b.println(line),
            None => println!("{line}"),
        }
    }

    /// Counts a finished optimizer step of `samples` samples (over all ranks).
    pub fn step_done(&mut self, step: u64, samples: usize) {
        self.samples_done += samples;
        self.window_samples += samples;
        if let Some(b) = &self.bar {
            b.set_position(step);
        }
    }

    /// A training record; samples per second over the steps since the previous one.
    pub fn log_step(&mut self, s: StepLog) -> Result<()> {
        let sps = self.window_samples as f64 / self.window_start.elapsed().as_secs_f64().max(1e-9);
        let mut rec = Map::new();
        rec.insert("step".into(), json!(s.step));
        rec.insert("loss".into(), json!(s.loss));
        rec.insert("lr".into(), json!(s.lr));
        rec.insert("grad_norm".into(), json!(s.grad_norm));
        rec.insert("samples_per_s".into(), json!(sps));
        rec.insert("elapsed_s".into(), json!(self.t0.elapsed().as_secs_f64()));
        if let Some(cs) = s.comm {
            rec.insert("comm_s".into(), json!(cs.comm_s));
            rec.insert("comm_hidden".into(), json!(cs.hidden_fraction()));
        }
        for (k, _, v) in s.probes {
            if k == "z_loss" {
                // `loss` is what is minimised; with the z-loss on, its two parts beside it.
                rec.insert("ce_loss".into(), json!(s.loss - v));
            }
            // The batch's accuracy is logged as train_acc beside evaluation's val_acc.
            rec.insert(if k == "acc" { "train_acc".into() } else { k.clone() }, json!(v));
        }
        if self.file.is_some() {
            self.write(&Value::Object(rec))?;
            let msg = format!("loss {:.4} lr {:.2e} gnorm {:.3} {sps:.0} samples/s", s.loss, s.lr, s.grad_norm);
            match &self.bar {
                Some(b) => b.set_message(msg),
                None => println!("step {}/{} {msg}", s.step, self.steps),
            }
        }
        self.window_start = Instant::now();
        self.window_samples = 0;
        Ok(())
    }

    /// An evaluation record (with the gap to the entropy floor when the data has one).
    pub fn log_eval(&mut self, step: u64, ev: &Eval, floor: Option<f64>) -> Result<()> {
        if self.file.is_none() {
            return Ok(());
        }
        let mut rec = json!({ "step": step, "val_loss": ev.loss });
        let mut line = format!("step {step}: val loss {:.4}", ev.loss);
        if let Some(z) = ev.z_loss {
            rec["val_z_loss"] = json!(z);
        }
        if let Some(a) = ev.acc {
            rec["val_acc"] = json!(a);
            line.push_str(&format!(" acc {:.4}", a));
        }
        if let Some(f) = floor {
            rec["entropy_floor"] = json!(f);
            rec["val_gap"] = json!(ev.loss - f);
            line.push_str(&format!(" (entropy floor {f:.4}, gap {:.4})", ev.loss - f));
        }
        self.write(&rec)?;
        self.say(line);
        Ok(())
    }

    /// Ends the progress bar; returns (seconds since open, samples per second over the run).
    pub fn finish(self) -> (f64, f64) {
        if let Some(b) = self.bar {
            b.finish();
            eprintln!(); // the bar (on stderr) leaves the cursor on its line
        }
        let elapsed = self.t0.elapsed().as_secs_f64();
        (elapsed, self.samples_done as f64 / elapsed.max(1e-9))
    }
}

/// Keeps the records up to `step` of an existing JSONL file (`metrics.jsonl`, `events.jsonl`:
/// a resumed run continues it).
pub(crate) fn truncate_records(path: &Path, step: u64) -> Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let kept: String = text
        .lines()
        .filter(|l| serde_json::from_str::<Value>(l).ok().and_then(|v| v["step"].as_u64()).is_some_and(|s| s <= step))
        .map(|l| format!("{l}\n"))
        .collect();
    dptrain_core::checkpoint::atomic_write(path, kept.as_bytes())?;
    Ok(())
}
