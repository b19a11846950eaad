//! `dptrain-launcher`: the composition root. The only crate that knows the models,
//! optimizers and communicators; it turns a config into a run and drives the training loop.

pub mod agree;
pub mod alerts;
pub mod build;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod coord_check;
#[cfg(feature = "cuda")]
pub mod cuda_libs;
pub mod env_report;
pub mod error;
pub mod fault;
pub mod gpu_check;
pub mod graph_step;
pub mod launch;
pub mod memory;
pub mod metrics;
pub mod parity;
pub mod plot;
pub mod probes;
pub mod report;
pub mod setup;
pub mod slurm;
pub mod stop;
pub mod sweep;
pub mod train;
pub mod world;

/// Writes `line` and its newline to stderr in one write. `eprintln!` writes its pieces one by
/// one (stderr is unbuffered), and under mpirun another process's output can land between them
/// — "dptrain: " on one line, the message on a later one — which whoever reads the job's log
/// (and the stop test, which once failed on it) would miss.
pub fn say(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().lock().write_all(format!("{line}\n").as_bytes());
}
