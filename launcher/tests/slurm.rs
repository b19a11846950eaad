//! A real Slurm: the test brings up a single-node cluster on this machine (munge, slurmctld and
//! slurmd with a slurm.conf written under a temp dir, stopped by pid at the end), submits the
//! script `dptrain slurm` generated (one node, two tasks, CPU, `srun --mpi=pmix`), waits for it,
//! and checks that the run it produced equals a `mpirun -np 2` run of the same config, record
//! for record. Slurm that cannot start fails the test, loudly: `bash scripts/setup.sh --tests`
//! installs slurm-wlm and munge (Debian), as CI does.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dptrain-slurm-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(c: &mut Command) -> Output {
    c.output().unwrap_or_else(|e| panic!("cannot run {c:?} ({e}): install Slurm with `bash scripts/setup.sh --tests`"))
}

/// The daemons this test started (killed by pid on drop, also when the test fails).
struct Cluster {
    dir: PathBuf,
    pids: Vec<(String, PathBuf)>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (what, pidfile) in &self.pids {
            if let Some(pid) = std::fs::read_to_string(pidfile).ok().and_then(|p| p.trim().parse::<i32>().ok()) {
                // SAFETY: kill(2) on a daemon this test started.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                eprintln!("stopped {what} (pid {pid})");
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn munge_running() -> bool {
    Command::new("sh").args(["-c", "munge -n | unmunge >/dev/null 2>&1"]).status().is_ok_and(|s| s.success())
}

/// Brings up munge (unless it runs), slurmctld and slurmd; waits for the node to be idle.
fn start(dir: &Path) -> Cluster {
    std::fs::create_dir_all(dir).unwrap();
    let mut cluster = Cluster { dir: dir.to_path_buf(), pids: vec![] };
    if !munge_running() {
        let key = Path::new("/etc/munge/munge.key");
        assert!(key.exists(), "no /etc/munge/munge.key: install munge with `bash scripts/setup.sh --tests`");
        for d in ["/run/munge", "/var/lib/munge", "/var/log/munge"] {
            let _ = std::fs::create_dir_all(d);
        }
        let s = run(Command::new("sh")
            .args(["-c", "chown -R munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge && chmod 400 /etc/munge/munge.key"]));
        assert!(s.status.success(), "munge directories: {}", String::from_utf8_lossy(&s.stderr));
        let s = run(Command::new("su").args(["-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"]));
        assert!(s.status.success(), "munged did not start: {}", String::from_utf8_lossy(&s.stderr));
        cluster.pids.push(("munged".into(), PathBuf::from("/run/munge/munged.pid")));
        let t0 = Instant::now();
        while !munge_running() {
            assert!(t0.elapsed() < Duration::from_secs(10), "munge does not answer (munge -n | unmunge)");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let host = String::from_utf8_lossy(&run(&mut Command::new("hostname")).stdout).trim().to_string();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let p = |n: &str| dir.join(n).display().to_string();
    std::fs::create_dir_all(dir.join("state")).unwrap();
    std::fs::create_dir_all(dir.join("spool")).unwrap();
    let conf = format!(
        "ClusterName=dptrain-test\nSlurmctldHost={host}\nAuthType=auth/munge\nSlurmUser=root\nSlurmdUser=root\n\
         StateSaveLocation={}\nSlurmdSpoolDir={}\nSlurmctldLogFile={}\nSlurmdLogFile={}\nSlurmctldPidFile={}\nSlurmdPidFile={}\n\
         ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nSchedulerType=sched/builtin\nSelectType=select/cons_tres\n\
         SelectTypeParameters=CR_Core\nMpiDefault=none\nReturnToService=2\nSlurmctldPort=16817\nSlurmdPort=16818\n\
         NodeName={host} CPUs={cpus} RealMemory=4000 State=UNKNOWN\n\
         PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES\n",
        p("state"),
        p("spool"),
        p("ctld.log"),
        p("d.log"),
        p("ctld.pid"),
        p("d.pid")
    );
    std::fs::write(dir.join("slurm.conf"), conf).unwrap();
    // slurmd loads the cgroup configuration beside slurm.conf; a plugin that loads is needed.
    std::fs::write(dir.join("cgroup.conf"), "CgroupPlugin=cgroup/v1\nIgnoreSystemd=yes\n").unwrap();
    let conf = dir.join("slurm.conf");
    for (daemon, pid, extra) in [("/usr/sbin/slurmctld", "ctld.pid", vec!["-c"]), ("/usr/sbin/slurmd", "d.pid", vec![])] {
        let o = run(Command::new(daemon).arg("-f").arg(&conf).args(extra).env("SLURM_CONF", &conf));
        assert!(o.status.success(), "{daemon} did not start: {}", String::from_utf8_lossy(&o.stderr));
        cluster.pids.push((daemon.into(), dir.join(pid)));
    }
    let t0 = Instant::now();
    loop {
        let o = run(Command::new("sinfo").args(["-h", "-o", "%T"]).env("SLURM_CONF", &conf));
        let state = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if state == "idle" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the Slurm node is not idle after 60 s (sinfo: `{state}`); slurmctld log:\n{}\nslurmd log:\n{}",
            std::fs::read_to_string(dir.join("ctld.log")).unwrap_or_default(),
            std::fs::read_to_string(dir.join("d.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    cluster
}

fn values(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_else(|e| panic!("{}: {e}", run_dir.display()))
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            for k in ["elapsed_s", "samples_per_s", "comm_s", "comm_hidden"] {
                v.as_object_mut().unwrap().remove(k);
            }
            v
        })
        .collect()
}

const SETS: &[&str] = &[
    "run.name=\"slurm-test\"",
    "model.d_model=32",
    "model.n_layers=1",
    "model.context=16",
    "data.vocab=16",
    "data.train_tokens=20000",
    "data.val_tokens=4000",
    "train.steps=12",
    "train.global_batch=16",
    "train.eval_every=6",
    "run.log_every=2",
    "run.threads=1",
];

#[test]
fn a_generated_sbatch_script_runs_on_a_real_slurm_as_mpirun_does() {
    let d = tmp("cluster");
    let cluster = start(&d.join("slurm"));
    let conf = cluster.dir.join("slurm.conf");
    let job = d.join("job");
    std::fs::create_dir_all(&job).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_dptrain"));
    c.current_dir(&job).args(["slurm", "--nodes", "1", "--ntasks-per-node", "2", "--mpi", "pmix", "--script", "job.sbatch"]);
    for s in SETS {
        c.arg("--set").arg(s);
    }
    let o = run(&mut c);
    assert!(o.status.success(), "dptrain slurm: {}", String::from_utf8_lossy(&o.stderr));
    let o = run(Command::new("sbatch").arg("--parsable").arg("job.sbatch").current_dir(&job).env("SLURM_CONF", &conf));
    assert!(o.status.success(), "sbatch: {}", String::from_utf8_lossy(&o.stderr));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let t0 = Instant::now();
    loop {
        let q = run(Command::new("squeue").args(["-h", "-j", &id]).env("SLURM_CONF", &conf));
        if String::from_utf8_lossy(&q.stdout).trim().is_empty() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(180), "job {id} still queued or running after 180 s");
        std::thread::sleep(Duration::from_millis(500));
    }
    let log = std::fs::read_to_string(job.join(format!("runs/slurm-test-{id}.out"))).unwrap_or_default();
    let run_dir = job.join("runs/slurm-test");
    assert!(run_dir.join("summary.json").is_file(), "the job did not finish its run; its log:\n{log}");
    assert!(log.contains("world of 2 ranks"), "not 2 ranks under srun:\n{log}");

    // The same config under mpirun.
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", "2", env!("CARGO_BIN_EXE_dptrain"), "train"]);
    c.arg(job.join("slurm-test.toml")).arg("--run-dir").arg(d.join("mpirun"));
    let o = run(&mut c);
    assert!(o.status.success(), "mpirun: {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(values(&run_dir), values(&d.join("mpirun")), "the Slurm run differs from mpirun's");
    drop(cluster);
    std::fs::remove_dir_all(&d).ok();
}
