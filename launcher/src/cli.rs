//! Command-line definitions (clap derive). Parsing only; `main` dispatches.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "dptrain", version, about = "Data-parallel training for large-batch research")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Train a model. With no CONFIG, runs the built-in default (GPT on synthetic-lm).
    Train {
        /// A TOML config file (`dptrain config show` prints every key).
        config: Option<PathBuf>,
        /// Override a config key, e.g. --set train.steps=100 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Run directory (default runs/<run.name>, or a fresh runs/<run.name>-N if taken).
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// Continue a run from its newest checkpoint (a run directory or a checkpoint directory).
        #[arg(long)]
        resume: Option<PathBuf>,
        /// Tests: make rank RANK fail at step STEP (kill:RANK:STEP or hang:RANK:STEP).
        #[cfg(feature = "fault-injection")]
        #[arg(long, hide = true, value_name = "KIND:RANK:STEP")]
        fault: Option<crate::fault::Fault>,
    },
    /// Check the GPU backend on this machine: compile every CUDA kernel for the device with
    /// NVRTC, run them against the CPU engine, print a table (exit 1 if any op disagrees).
    GpuCheck {
        /// CUDA device ordinal.
        #[arg(long, default_value_t = 0)]
        device: usize,
    },
    /// μP coordinate check: train the configured model at several widths for a few steps on
    /// one batch, fit log2(mean |module output|) against log2(width); exit 1 when any |slope|
    /// reaches --max-slope. Writes coord_check.json and coord_check.png to --out.
    CoordCheck {
        /// A TOML config file (default: the built-in default run).
        config: Option<PathBuf>,
        /// Override a config key (repeatable), e.g. --set mup.enabled=true.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Widths to train at (gpt d_model, mlp widths[0] with the rest scaled, resnet width).
        #[arg(long, value_delimiter = ',', default_value = "64,128,256,512,1024")]
        widths: Vec<usize>,
        /// Fail when any module's |slope| reaches this.
        #[arg(long, default_value_t = 0.1)]
        max_slope: f64,
        /// Seeds averaged per width.
        #[arg(long, default_value_t = 3)]
        seeds: u64,
        /// Training steps recorded (t = 1..steps; t = 1 is at initialisation).
        #[arg(long, default_value_t = 3)]
        steps: u64,
        /// Learning rate (constant, no warmup or clipping): deliberately large.
        #[arg(long, default_value_t = 1e-2)]
        lr: f64,
        /// Directory for coord_check.json and coord_check.png.
        #[arg(long, default_value = "runs/coord-check")]
        out: PathBuf,
    },
    /// LR sweep: train the config at each --lr (and each --grid variant), one child process and
    /// run directory per point, then print final losses and each variant's LR sensitivity and
    /// write sweep.json and sweep.png to --out.
    Sweep {
        /// A TOML config file (default: the built-in default run).
        config: Option<PathBuf>,
        /// Override a config key for every point (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Peak learning rates, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        lr: Vec<f64>,
        /// A grid axis, key=v1|v2|... (repeatable; variants are every combination).
        #[arg(long, value_name = "KEY=V1|V2")]
        grid: Vec<String>,
        /// Directory for the runs, sweep.json and sweep.png.
        #[arg(long, default_value = "runs/sweep")]
        out: PathBuf,
    },
    /// Plot a run (loss, validation loss, learning rate, gradient norm, every probe family) as
    /// PNGs in its directory and write report.md with the final numbers and alerts.
    Report {
        /// The run directory (with metrics.jsonl).
        run_dir: PathBuf,
    },
    /// Inspect configuration.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Replay a component on given inputs, for comparison with a reference implementation.
    Parity {
        #[command(subcommand)]
        cmd: ParityCmd,
    },
}

#[derive(Debug, Subcommand)]
pub enum ParityCmd {
    /// Apply an optimizer to given gradients at a constant learning rate and write the
    /// parameters after every step (formats: README, "Parity replay").
    Optim {
        /// Flat TOML of [optim] keys: `kind` and the hyperparameters.
        #[arg(long)]
        config: PathBuf,
        /// safetensors with param.<name> and grad.<t>.<name> for t = 0..T-1.
        #[arg(long)]
        input: PathBuf,
        /// safetensors written with param.<t>.<name> after each step.
        #[arg(long)]
        output: PathBuf,
        /// Optimizer state to start from (as --state-out writes it).
        #[arg(long)]
        state_in: Option<PathBuf>,
        /// Where to write the optimizer state after the last step.
        #[arg(long)]
        state_out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Print the default config as TOML, with a comment on every key.
    Show,
}
