//! Whether a model can fit in this machine's memory, asked before a single parameter is
//! declared. A config with `d_model = 100000000` or a billion layers used to reach the
//! allocator and abort the process ("memory allocation of … bytes failed"), or to loop for
//! minutes declaring layers, or to be killed by the kernel's OOM killer after swapping the
//! machine: now it is a config error, exit 2, naming the model's keys and both sizes.
//!
//! The check only refuses what cannot fit: it counts the parameters exactly (each model
//! config's `param_count`) but only the memory that certainly scales with them — values,
//! gradients and the optimizer's per-element state — not activations, so a model it lets
//! through may still be too large to train at the chosen batch.

use crate::config::{DataKind, DeviceKind, OptimKind, RunConfig};
use crate::error::{input_err, Result};

/// Bytes a process may use on this machine: physical memory, or the cgroup's limit when that
/// is lower (a Slurm job or a container); `None` when neither can be read.
pub fn host_memory() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| meminfo_total(&s));
    let cgroup = ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .filter_map(|s| s.trim().parse::<u64>().ok())
        .min();
    match (total, cgroup) {
        (Some(t), Some(c)) => Some(t.min(c)),
        (t, c) => t.or(c),
    }
}

/// `MemTotal` from /proc/meminfo's text, in bytes.
fn meminfo_total(s: &str) -> Option<u64> {
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut it = line.split_whitespace().skip(1);
    let kib: u64 = it.next()?.parse().ok()?;
    (it.next() == Some("kB")).then_some(kib * 1024)
}

/// Host bytes per parameter that certainly scale with the model: on the CPU its f32 value,
/// gradient and the optimizer's f32 per-element vectors (moments, momentum, the decay
/// multipliers, LAMB's update); on a GPU only the f32 values the host initialises before
/// uploading them (the rest lives on the device).
fn host_bytes_per_param(cfg: &RunConfig) -> f64 {
    if cfg.run.device != DeviceKind::Cpu {
        return 4.0;
    }
    let state = match cfg.optim.kind {
        OptimKind::Adamw => 3.0,
        OptimKind::Lamb => 4.0,
        OptimKind::Sgd | OptimKind::Lars => 2.0,
        OptimKind::Soap => 2.0,
    };
    4.0 * (2.0 + state)
}

/// A count as an integer while f64 holds it exactly, in scientific notation beyond.
fn count(n: f64) -> String {
    if n < 9e15 {
        format!("{n:.0}")
    } else {
        format!("{n:.3e}")
    }
}

/// `1.5 GiB`, `3.2 TiB`: binary units, three significant figures.
pub fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.3} {}", UNITS[u])
    }
}

/// Refuses a model of `params` parameters (`what` names it: its kind and size keys) that
/// cannot fit in `memory` bytes shared by `procs` processes of this node (each holds its own
/// copy). `memory` None (unreadable) lets everything through.
pub fn check_model_fits(cfg: &RunConfig, params: f64, what: &str, memory: Option<u64>, procs: usize) -> Result<()> {
    let on = if cfg.run.device == DeviceKind::Cpu {
        format!("for their values, gradients and {} state", optim_name(cfg.optim.kind))
    } else {
        "of host memory to initialise them".to_string()
    };
    refuse_beyond(params * host_bytes_per_param(cfg), memory, procs, |need| {
        format!("model: {what} has {} parameters, which need at least {need} {on}", count(params))
    })
}

/// Refuses synthetic data (generated in memory: its size is the config's) that cannot fit, as
/// [`check_model_fits`] a model. Files are as large as they are and are not checked here.
pub fn check_data_fits(cfg: &RunConfig, memory: Option<u64>, procs: usize) -> Result<()> {
    let d = &cfg.data;
    match d.kind {
        // u32 token ids.
        DataKind::SyntheticLm => {
            let n = d.train_tokens as f64 + d.val_tokens as f64;
            refuse_beyond(4.0 * n, memory, procs, |need| {
                format!("data.train_tokens / data.val_tokens: {} tokens need at least {need}", count(n))
            })
        }
        // f32 pixels and a label per sample.
        DataKind::SyntheticImages => {
            let n = d.samples as f64 + d.val_samples as f64;
            let per = 4.0 * (d.channels as f64 * d.image_size as f64 * d.image_size as f64 + 1.0);
            refuse_beyond(n * per, memory, procs, |need| {
                format!(
                    "data.samples / data.val_samples / data.image_size / data.channels: {} images of {}×{}×{} need at least {need}",
                    count(n),
                    d.channels,
                    d.image_size,
                    d.image_size
                )
            })
        }
        DataKind::Text | DataKind::Tokens | DataKind::Npy => Ok(()),
    }
}

/// Ok when `procs` copies of `bytes` fit in `memory` (or it is unknown); else the input error
/// `says(the bytes needed, human-readable)`, with the node's share and the machine's memory.
fn refuse_beyond(bytes: f64, memory: Option<u64>, procs: usize, says: impl FnOnce(String) -> String) -> Result<()> {
    let Some(mem) = memory else { return Ok(()) };
    let procs = procs.max(1);
    let need = bytes * procs as f64;
    if need <= mem as f64 {
        return Ok(());
    }
    let each = if procs > 1 { format!(" ({procs} processes on this node, a copy each)") } else { String::new() };
    Err(input_err!("{}{each}; this machine has {}", says(human_bytes(need)), human_bytes(mem as f64)))
}

fn optim_name(k: OptimKind) -> &'static str {
    match k {
        OptimKind::Sgd => "SGD",
        OptimKind::Adamw => "AdamW",
        OptimKind::Soap => "SOAP",
        OptimKind::Lamb => "LAMB",
        OptimKind::Lars => "LARS",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_total_reads_kib() {
        let s = "MemTotal:       24554948 kB\nMemFree:         1234 kB\n";
        assert_eq!(meminfo_total(s), Some(24554948 * 1024));
        assert_eq!(meminfo_total("MemFree: 12 kB\n"), None);
        assert_eq!(meminfo_total("MemTotal: lots\n"), None);
    }

    #[test]
    fn human_bytes_picks_the_unit() {
        assert_eq!(human_bytes(512.0), "512 B");
        assert_eq!(human_bytes(1536.0), "1.500 KiB");
        assert_eq!(human_bytes(24.0 * 1024f64.powi(3)), "24.000 GiB");
        assert_eq!(human_bytes(1e30), format!("{:.3} EiB", 1e30 / 1024f64.powi(6)));
    }

    #[test]
    fn refuses_only_what_cannot_fit() {
        let mut cfg = crate::config::Raw::new(toml::Table::new()).unwrap().typed().unwrap();
        cfg.optim.kind = OptimKind::Adamw;
        let gib = 1u64 << 30;
        // AdamW on the CPU: 4 bytes each for value, gradient, two moments and the decay
        // multipliers: 20 bytes a parameter.
        assert!(check_model_fits(&cfg, 50e6, "gpt", Some(gib), 1).is_ok());
        let e = check_model_fits(&cfg, 60e6, "gpt", Some(gib), 1).unwrap_err().to_string();
        assert!(e.starts_with("model: gpt has 60000000 parameters, which need at least 1.118 GiB for their values, gradients and AdamW state; this machine has 1.000 GiB"), "{e}");
        // Two processes on the node each hold a copy.
        let e = check_model_fits(&cfg, 30e6, "gpt", Some(gib), 2).unwrap_err().to_string();
        assert!(e.contains("(2 processes on this node, a copy each)"), "{e}");
        // On a GPU the host only initialises the f32 values.
        cfg.run.device = DeviceKind::Cuda;
        assert!(check_model_fits(&cfg, 250e6, "gpt", Some(gib), 1).is_ok());
        let e = check_model_fits(&cfg, 300e6, "gpt", Some(gib), 1).unwrap_err().to_string();
        assert!(e.contains("of host memory to initialise them"), "{e}");
        // Unknown memory: no verdict.
        assert!(check_model_fits(&cfg, 1e30, "gpt", None, 1).is_ok());
        assert!(check_model_fits(&cfg, f64::INFINITY, "gpt", Some(gib), 1).is_err());
    }

    #[test]
    fn refuses_synthetic_data_that_cannot_fit() {
        let mut cfg = crate::config::Raw::new(toml::Table::new()).unwrap().typed().unwrap();
        let gib = 1u64 << 30;
        assert!(check_data_fits(&cfg, Some(gib), 1).is_ok());
        cfg.data.train_tokens = 300 << 20;
        let e = check_data_fits(&cfg, Some(gib), 1).unwrap_err().to_string();
        assert!(
            e.starts_with("data.train_tokens / data.val_tokens: 314612800 tokens need at least 1.172 GiB; this machine has 1.000 GiB"),
            "{e}"
        );
        cfg.data.kind = DataKind::SyntheticImages;
        cfg.data.samples = 1 << 18;
        cfg.data.image_size = 32;
        cfg.data.channels = 3;
        assert!(check_data_fits(&cfg, Some(1 << 32), 1).is_ok());
        let e = check_data_fits(&cfg, Some(1 << 32), 2).unwrap_err().to_string();
        assert!(e.contains("images of 3×32×32 need at least") && e.contains("(2 processes on this node"), "{e}");
        // Files are not judged by the config.
        cfg.data.kind = DataKind::Text;
        assert!(check_data_fits(&cfg, Some(1), 1).is_ok());
    }
}
