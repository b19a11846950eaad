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
        /// Continue a run from its newest checkpoint (a run directory, its checkpoints directory, or one checkpoint directory).
        #[arg(long)]
        resume: Option<PathBuf>,
        /// Tests: make rank RANK fail at step STEP (kill:RANK:STEP or hang:RANK:STEP).
        #[cfg(feature = "fault-injection")]
        #[arg(long, hide = true, value_name = "KIND:RANK:STEP")]
        fault: Option<crate::fault::Fault>,
    },
    /// Start N ranks of a dptrain command through the system's mpirun (single-node dev runs,
    /// as torchrun): prints the mpirun command, prefixes each line with its rank, forwards
    /// Ctrl-C/SIGTERM, exits with the first failing rank's code.
    Launch {
        /// Number of ranks.
        #[arg(short = 'n', long = "np", value_name = "N")]
        n: usize,
        /// Hosts and slots, e.g. node1:4,node2:4 (default: this machine).
        #[arg(long)]
        hosts: Option<String>,
        /// Extra mpirun arguments, as one string.
        #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
        mpirun_args: Option<String>,
        /// Leave the ranks' output lines as they are (no [rN] prefix).
        #[arg(long)]
        no_prefix: bool,
        /// Seconds between forwarding Ctrl-C/SIGTERM and killing what is left.
        #[arg(long, default_value_t = 10.0)]
        grace: f64,
        /// The dptrain command each rank runs, after `--`: train [CONFIG] [--set ...].
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// Check the GPU backend on this machine: compile every CUDA kernel for the device with
    /// NVRTC, run them against the CPU engine, print a table (exit 1 if any op disagrees).
    GpuCheck {
        /// CUDA device ordinal.
        #[arg(long, default_value_t = 0)]
        device: usize,
        /// Also write every kernel of each profiled training step to DIR/profile-*.tsv (the
        /// table shows kernel classes and the five longest).
        #[arg(long, value_name = "DIR")]
        profile_out: Option<PathBuf>,
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
        /// Write a Slurm array job (one task per point, OUT/sweep.sbatch) instead of running;
        /// the `dptrain slurm` options below shape it. Collect afterwards with --collect.
        #[arg(long)]
        slurm: bool,
        /// Do not train: read the points' run directories (after a --slurm array job) and write
        /// sweep.json, sweep.png and the table.
        #[arg(long, conflicts_with = "slurm")]
        collect: bool,
        #[command(flatten)]
        job: SlurmOpts,
    },
    /// Write an sbatch script that runs `dptrain train CONFIG` with one rank per GPU (or per
    /// task on CPU) under srun; the config (with --set applied) is copied next to it.
    Slurm {
        /// A TOML config file (default: the built-in default run).
        config: Option<PathBuf>,
        /// Override a config key (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        #[command(flatten)]
        job: SlurmOpts,
        /// Where to write the script (default: stdout; with --submit, <run.name>.sbatch).
        #[arg(long)]
        script: Option<PathBuf>,
        /// Submit it with sbatch and print the job id.
        #[arg(long)]
        submit: bool,
    },
    /// Plot a run (loss, validation loss, learning rate, gradient norm, every probe family) as
    /// PNGs in its directory and write report.md with the final numbers and alerts.
    Report {
        /// The run directory (with metrics.jsonl).
        run_dir: PathBuf,
    },
    /// What this machine and job look like to dptrain: MPI library, launcher variables and the
    /// world they give, CUDA driver and devices, NVRTC/cuBLAS/NCCL, threads.
    Env,
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

/// The job shape `dptrain slurm` and `dptrain sweep --slurm` share.
#[derive(Debug, Clone, clap::Args)]
pub struct SlurmOpts {
    /// Nodes.
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// GPUs per node: one task (one rank) per GPU, run.device = "cuda".
    #[arg(long)]
    pub gpus_per_node: Option<usize>,
    /// Tasks (ranks) per node, for CPU jobs.
    #[arg(long)]
    pub ntasks_per_node: Option<usize>,
    /// Time limit (Slurm's forms: 04:00:00, 90, 1-12:00:00).
    #[arg(long)]
    pub time: Option<String>,
    #[arg(long)]
    pub partition: Option<String>,
    #[arg(long)]
    pub account: Option<String>,
    /// Cores per task (each rank's threads).
    #[arg(long)]
    pub cpus_per_task: Option<usize>,
    /// srun's MPI plugin: pmix or pmi2.
    #[arg(long, default_value = "pmix")]
    pub mpi: String,
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
