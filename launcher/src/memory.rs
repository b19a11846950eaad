//! Whether a model can fit in this machine's memory, asked before a single parameter is
//! declared. A config with `d_model = 100000000` or a billion layers used to reach the
//! allocator and abort the process ("memory allocation of … bytes failed"), or to loop for
//! minutes declaring layers, or to be killed by the kernel's OOM killer after swapping the
//! machine: now it is a config error, exit 2, naming the model's keys and both sizes.
//!
//! The check only refuses what cannot fit: it counts the parameters exactly (each model
//! config's `param_count`) but only the memory that certainly scales with them — values,
//! gradients and the optimizer's per-element state — not activations, so a model it lets
//! through may still be too large to train at the chosen batch. The data likewise: synthetic
//! data by its config, data files by their size (each is read whole and converted).

use crate::config::{DataKind, DeviceKind, OptimKind, RunConfig};
use crate::error::{input_err, Result};

/// What the size checks compare against: the memory a process of this node may use, and how
/// many processes of this run share it (each holds its own copy of the model and data).
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Bytes; `None` when they could not be read (then nothing is refused).
    pub memory: Option<u64>,
    pub procs: usize,
}

impl Budget {
    /// This machine's memory ([`host_memory`]), shared by `procs` processes.
    pub fn this_node(procs: usize) -> Budget {
        Budget { memory: host_memory(), procs: procs.max(1) }
    }
}

/// Bytes a process may use on this machine: physical memory, or its cgroup's memory limit
/// when that is lower (a Slurm job's, a container's); `None` when neither can be read.
pub fn host_memory() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| meminfo_total(&s));
    let cgroup = match (std::fs::read_to_string("/proc/self/mountinfo"), std::fs::read_to_string("/proc/self/cgroup")) {
        (Ok(mounts), Ok(cgroups)) => cgroup_limit(&mounts, &cgroups, |p| std::fs::read_to_string(p).ok()),
        _ => None,
    };
    match (total, cgroup) {
        (Some(t), Some(c)) => Some(t.min(c)),
        (t, c) => t.or(c),
    }
}

/// The tightest memory limit on this process's cgroup and its ancestors, from the texts of
/// /proc/self/mountinfo and /proc/self/cgroup, reading limit files through `read`. Both
/// hierarchies count: v2 (`0::<path>`, `memory.max` in the cgroup2 mount) and v1's memory
/// controller (`N:memory:<path>`, `memory.limit_in_bytes`; an unlimited one reads as about
/// 2^63). A job's limit sits on its own cgroup (Slurm: `.../job_<id>/step_<n>/...`), not at
/// the mount's root: every level from the process's cgroup up to the mount's is read.
fn cgroup_limit(mountinfo: &str, cgroups: &str, read: impl Fn(&std::path::Path) -> Option<String>) -> Option<u64> {
    use std::path::Path;
    // (mount point, the cgroup path at that mount's root) of the v2 and the v1 memory mounts.
    let mut v2 = None;
    let mut v1 = None;
    for line in mountinfo.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(dash) = f.iter().position(|&x| x == "-") else { continue };
        let (Some(root), Some(point), Some(fstype), Some(opts)) = (f.get(3), f.get(4), f.get(dash + 1), f.get(dash + 3)) else {
            continue;
        };
        match *fstype {
            "cgroup2" => v2 = Some((point.to_string(), root.to_string())),
            "cgroup" if opts.split(',').any(|o| o == "memory") => v1 = Some((point.to_string(), root.to_string())),
            _ => {}
        }
    }
    let mut limit: Option<u64> = None;
    for line in cgroups.lines() {
        let mut it = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (it.next(), it.next(), it.next()) else { continue };
        let (mount, file) = if id == "0" && ctrls.is_empty() {
            (v2.as_ref(), "memory.max")
        } else if ctrls.split(',').any(|c| c == "memory") {
            (v1.as_ref(), "memory.limit_in_bytes")
        } else {
            continue;
        };
        let Some((point, root)) = mount else { continue };
        // The process's cgroup as a directory under the mount: its path below the mount's root.
        let Ok(rel) = Path::new(path).strip_prefix(root) else { continue };
        for dir in rel.ancestors() {
            if let Some(v) = read(&Path::new(point).join(dir).join(file)).and_then(|s| s.trim().parse::<u64>().ok()) {
                limit = Some(limit.map_or(v, |l| l.min(v)));
            }
        }
    }
    limit
}

/// `MemTotal` from /proc/meminfo's text, in bytes.
fn meminfo_total(s: &str) -> Option<u64> {
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut it = line.split_whitespace().skip(1);
    let kib: u64 = it.next()?.parse().ok()?;
    (it.next() == Some("kB")).then_some(kib * 1024)
}

/// Host bytes per parameter that certainly scale with the model: on the CPU its f32 value,
/// gradient and the optimizer's f32 per-element vectors (moments, momentum, LAMB's update); on
/// a GPU only the f32 values the host initialises before uploading them (the optimizers make
/// their state on the device and hold no host copy: optim/tests/host_state.rs).
fn host_bytes_per_param(cfg: &RunConfig) -> f64 {
    if cfg.run.device != DeviceKind::Cpu {
        return 4.0;
    }
    let state = match cfg.optim.kind {
        OptimKind::Adamw => 2.0,
        OptimKind::Lamb => 3.0,
        OptimKind::Sgd | OptimKind::Lars => 1.0,
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
/// cannot fit in the budget.
pub fn check_model_fits(cfg: &RunConfig, params: f64, what: &str, budget: Budget) -> Result<()> {
    let on = if cfg.run.device == DeviceKind::Cpu {
        format!("for their values, gradients and {} state", optim_name(cfg.optim.kind))
    } else {
        "of host memory to initialise them".to_string()
    };
    refuse_beyond(params * host_bytes_per_param(cfg), budget, |need| {
        format!("model: {what} has {} parameters, which need at least {need} {on}", count(params))
    })
}

/// Refuses synthetic data (generated in memory: its size is the config's) that cannot fit, as
/// [`check_model_fits`] a model, and data files by their size: each is read whole and
/// converted (a text file's bytes to u32 tokens), so a file beyond memory used to end in the
/// kernel's OOM killer after minutes of swapping.
pub fn check_data_fits(cfg: &RunConfig, budget: Budget) -> Result<()> {
    let d = &cfg.data;
    match d.kind {
        // u32 token ids.
        DataKind::SyntheticLm => {
            let n = d.train_tokens as f64 + d.val_tokens as f64;
            refuse_beyond(4.0 * n, budget, |need| format!("data.train_tokens / data.val_tokens: {} tokens need at least {need}", count(n)))
        }
        // f32 pixels and a label per sample.
        DataKind::SyntheticImages => {
            let n = d.samples as f64 + d.val_samples as f64;
            let per = 4.0 * (d.channels as f64 * d.image_size as f64 * d.image_size as f64 + 1.0);
            refuse_beyond(n * per, budget, |need| {
                format!(
                    "data.samples / data.val_samples / data.image_size / data.channels: {} images of {}×{}×{} need at least {need}",
                    count(n),
                    d.channels,
                    d.image_size,
                    d.image_size
                )
            })
        }
        // The file's bytes, then a u32 per byte.
        DataKind::Text => file_fits("data.path", &d.path, 5.0, "read and held as u32 byte tokens", budget),
        // The file's bytes, then a u32 per 2 bytes.
        DataKind::Tokens => file_fits("data.path", &d.path, 3.0, "read and held as u32 tokens", budget),
        // The file's bytes, then an f64 per element of at most 8 bytes (and f32 pixels after).
        DataKind::Npy => {
            file_fits("data.path", &d.path, 2.0, "read and held as f64 values", budget)?;
            file_fits("data.labels", &d.labels, 2.0, "read and held as f64 values", budget)
        }
    }
}

/// Refuses a data file that, at `per_byte` bytes of memory per byte of it (a lower bound of
/// what its loader holds), cannot fit. A file that cannot be read or is not a regular file is
/// left to the loader, whose error names it.
fn file_fits(key: &str, path: &str, per_byte: f64, held: &str, budget: Budget) -> Result<()> {
    let Ok(meta) = std::fs::metadata(path) else { return Ok(()) };
    if !meta.is_file() {
        return Ok(());
    }
    let len = meta.len() as f64;
    refuse_beyond(len * per_byte, budget, |need| format!("{key}: {path} is {}, which needs at least {need} {held}", human_bytes(len)))
}

/// Ok when the budget's processes' copies of `bytes` fit in its memory (or that is unknown);
/// else the input error `says(the bytes needed, human-readable)`, with the node's share and
/// the machine's memory.
fn refuse_beyond(bytes: f64, budget: Budget, says: impl FnOnce(String) -> String) -> Result<()> {
    let Some(mem) = budget.memory else { return Ok(()) };
    let procs = budget.procs.max(1);
    let need = bytes * procs as f64;
    if need <= mem as f64 {
        return Ok(());
    }
    let each = if procs > 1 { format!(" ({procs} processes on this node, a copy each)") } else { String::new() };
    Err(input_err!(
        "{}{each}; this machine gives a process {} (its memory, or the cgroup's limit if lower)",
        says(human_bytes(need)),
        human_bytes(mem as f64)
    ))
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

    /// Limits are read at every level from the process's cgroup up to the mount's root (the
    /// tightest wins), below the mount's own root, in both hierarchies; "max" is no limit.
    #[test]
    fn cgroup_limits_are_read_up_the_process_cgroup() {
        use std::collections::HashMap;
        let files: HashMap<&str, &str> = [
            // v2, as under Slurm: the job's limit, tighter than its parent's, looser than none.
            ("/sys/fs/cgroup/system.slice/slurmstepd.scope/job_7/memory.max", "8589934592\n"),
            ("/sys/fs/cgroup/system.slice/slurmstepd.scope/job_7/step_0/memory.max", "max\n"),
            ("/sys/fs/cgroup/system.slice/memory.max", "17179869184\n"),
            // v1 (this machine's layout): unlimited reads as about 2^63.
            ("/sys/fs/cgroup/memory/process_api/abc/memory.limit_in_bytes", "9223372036854771712\n"),
            ("/sys/fs/cgroup/memory/process_api/memory.limit_in_bytes", "4294967296\n"),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n"),
        ]
        .into_iter()
        .collect();
        let read = |p: &std::path::Path| files.get(p.to_str().unwrap()).map(|s| s.to_string());
        let v2_mount = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let slurm = "0::/system.slice/slurmstepd.scope/job_7/step_0/user/task_0\n";
        assert_eq!(cgroup_limit(v2_mount, slurm, read), Some(8 << 30));
        assert_eq!(cgroup_limit(v2_mount, "0::/user.slice\n", read), None);
        let v1_mounts = "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                         35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                         41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        let v1 = "9:name=systemd:/\n4:memory:/process_api/abc\n1:cpu:/\n0::/\n";
        assert_eq!(cgroup_limit(v1_mounts, v1, read), Some(4 << 30));
        // A container's cgroup namespace: the mount's root is the process's cgroup itself.
        let ns = "35 31 0:32 /process_api /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        // (A directory named like the cgroup under the mount is another cgroup: not this one's.)
        let files_ns: HashMap<&str, &str> = [
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "1073741824"),
            ("/sys/fs/cgroup/memory/process_api/memory.limit_in_bytes", "536870912"),
        ]
        .into_iter()
        .collect();
        let read_ns = |p: &std::path::Path| files_ns.get(p.to_str().unwrap()).map(|s| s.to_string());
        assert_eq!(cgroup_limit(ns, "4:memory:/process_api\n", read_ns), Some(1 << 30));
        // No cgroup mount, or nothing readable: no limit known.
        assert_eq!(cgroup_limit("", slurm, read), None);
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
        // AdamW on the CPU: 4 bytes each for value, gradient and two moments: 16 bytes a
        // parameter.
        assert!(check_model_fits(&cfg, 65e6, "gpt", Budget { memory: Some(gib), procs: 1 }).is_ok());
        let e = check_model_fits(&cfg, 70e6, "gpt", Budget { memory: Some(gib), procs: 1 }).unwrap_err().to_string();
        assert!(e.starts_with("model: gpt has 70000000 parameters, which need at least 1.043 GiB for their values, gradients and AdamW state; this machine gives a process 1.000 GiB"), "{e}");
        // Two processes on the node each hold a copy.
        let e = check_model_fits(&cfg, 35e6, "gpt", Budget { memory: Some(gib), procs: 2 }).unwrap_err().to_string();
        assert!(e.contains("(2 processes on this node, a copy each)"), "{e}");
        // On a GPU the host only initialises the f32 values.
        cfg.run.device = DeviceKind::Cuda;
        assert!(check_model_fits(&cfg, 250e6, "gpt", Budget { memory: Some(gib), procs: 1 }).is_ok());
        let e = check_model_fits(&cfg, 300e6, "gpt", Budget { memory: Some(gib), procs: 1 }).unwrap_err().to_string();
        assert!(e.contains("of host memory to initialise them"), "{e}");
        // Unknown memory: no verdict.
        assert!(check_model_fits(&cfg, 1e30, "gpt", Budget { memory: None, procs: 1 }).is_ok());
        assert!(check_model_fits(&cfg, f64::INFINITY, "gpt", Budget { memory: Some(gib), procs: 1 }).is_err());
    }

    #[test]
    fn refuses_synthetic_data_that_cannot_fit() {
        let mut cfg = crate::config::Raw::new(toml::Table::new()).unwrap().typed().unwrap();
        let gib = 1u64 << 30;
        assert!(check_data_fits(&cfg, Budget { memory: Some(gib), procs: 1 }).is_ok());
        cfg.data.train_tokens = 300 << 20;
        let e = check_data_fits(&cfg, Budget { memory: Some(gib), procs: 1 }).unwrap_err().to_string();
        assert!(
            e.starts_with(
                "data.train_tokens / data.val_tokens: 314612800 tokens need at least 1.172 GiB; this machine gives a process 1.000 GiB"
            ),
            "{e}"
        );
        cfg.data.kind = DataKind::SyntheticImages;
        cfg.data.samples = 1 << 18;
        cfg.data.image_size = 32;
        cfg.data.channels = 3;
        assert!(check_data_fits(&cfg, Budget { memory: Some(1 << 32), procs: 1 }).is_ok());
        let e = check_data_fits(&cfg, Budget { memory: Some(1 << 32), procs: 2 }).unwrap_err().to_string();
        assert!(e.contains("images of 3×32×32 need at least") && e.contains("(2 processes on this node"), "{e}");
        // Files by their size: a sparse 3 GiB file (no disk used) is refused at 1 GiB by each
        // loader's lower bound; a missing one is left to the loader.
        let dir = std::env::temp_dir().join(format!("dptrain-memory-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let big = dir.join("big.bin");
        std::fs::File::create(&big).unwrap().set_len(3 << 30).unwrap();
        cfg.data.path = big.display().to_string();
        cfg.data.labels = dir.join("missing.npy").display().to_string();
        let one = Budget { memory: Some(gib), procs: 1 };
        for (kind, need) in [
            (DataKind::Text, "15.000 GiB read and held as u32 byte tokens"),
            (DataKind::Tokens, "9.000 GiB read and held as u32 tokens"),
            (DataKind::Npy, "6.000 GiB read and held as f64 values"),
        ] {
            cfg.data.kind = kind;
            let e = check_data_fits(&cfg, one).unwrap_err().to_string();
            assert_eq!(e, format!("data.path: {} is 3.000 GiB, which needs at least {need}; this machine gives a process 1.000 GiB (its memory, or the cgroup's limit if lower)", big.display()));
            assert!(check_data_fits(&cfg, Budget { memory: Some(16 * gib), procs: 1 }).is_ok());
        }
        cfg.data.path = "/nonexistent/x.bin".into();
        assert!(check_data_fits(&cfg, Budget { memory: Some(1), procs: 1 }).is_ok());
        std::fs::remove_dir_all(&dir).ok();
    }
}
