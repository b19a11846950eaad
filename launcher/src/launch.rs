//! `dptrain launch -n N [--hosts h1:4,h2:4] [--mpirun-args "..."] [--no-prefix] -- train CFG ...`:
//! single-node (or small multi-node) dev runs through the system's `mpirun`, the way `torchrun`
//! is used — but the processes are ordinary MPI ranks, so what runs here runs under `mpirun`
//! or Slurm unchanged. It adds what the MPI implementation needs (Open MPI as root:
//! `--allow-run-as-root`; fewer cores than ranks: `--oversubscribe`, said aloud; `--bind-to none`
//! because each rank sizes its own thread pool), prints the exact command, prefixes each output
//! line with its rank (`[r3] ...`, from Open MPI's `--tag-output` or MPICH's `-prepend-rank`),
//! forwards SIGINT/SIGTERM/SIGUSR1 to the job — to Open MPI's mpirun as SIGUSR1, which it
//! passes to every rank as is, so the ranks stop at their step's end with a checkpoint (its own
//! SIGTERM kills them within about a second) — and escalates to SIGKILL of every process under
//! it after a grace period (and of any process still holding mpirun's output pipes once it has
//! gone), and exits with the first failing rank's code, saying which rank it was.
//!
//! Supervision is plain std: a thread per output pipe and a polling wait, no async runtime.

use crate::error::{input_err, LaunchError, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What `dptrain launch` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct LaunchArgs {
    pub n: usize,
    pub hosts: Option<String>,
    pub mpirun_args: Option<String>,
    pub no_prefix: bool,
    /// The dptrain command line after `--` (`train CFG --set ...`).
    pub cmd: Vec<String>,
    /// Seconds between forwarding a signal and killing what is left.
    pub grace_s: f64,
}

/// Which `mpirun` this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mpi {
    OpenMpi,
    Mpich,
}

/// The subcommands a rank can run.
const RANK_COMMANDS: &[&str] = &["train"];

/// Ranks per core beyond which a local launch is refused as a typo: `-n 100000` on two cores
/// had mpirun forking for minutes (and leaving a fork behind when stopped). Oversubscribing a
/// few times over, to try an 8-GPU config's logic on a laptop, stays well inside it.
const MAX_RANKS_PER_CORE: usize = 16;

/// `h1:4,h2:4` → [(h1, 4), (h2, 4)]; a host without `:slots` has one slot.
pub fn parse_hosts(s: &str) -> Result<Vec<(String, usize)>> {
    let bad = |why: &str| input_err!("--hosts {s}: {why}; expected host:slots,host:slots (e.g. node1:4,node2:4)");
    let mut out = vec![];
    for part in s.split(',') {
        let (h, n) = match part.split_once(':') {
            Some((h, n)) => (h, n.parse::<usize>().map_err(|_| bad(&format!("`{n}` is not a slot count")))?),
            None => (part, 1),
        };
        if h.is_empty() || h.contains(char::is_whitespace) {
            return Err(bad("an empty or malformed host name"));
        }
        if n == 0 {
            return Err(bad(&format!("{h} has 0 slots")));
        }
        out.push((h.to_string(), n));
    }
    Ok(out)
}

/// Finds `mpirun` on the PATH.
fn find_mpirun() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join("mpirun")).find(|p| p.is_file()).ok_or_else(|| {
        LaunchError::Runtime(
            "mpirun not found on PATH: dptrain launch starts ranks through MPI — install Open MPI (Debian/Ubuntu: apt-get install openmpi-bin libopenmpi-dev) or MPICH (apt-get install mpich), or run one process with `dptrain train`".into(),
        )
    })
}

fn detect(mpirun: &PathBuf) -> Mpi {
    let out = Command::new(mpirun)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr));
    match out {
        Ok(t) if t.contains("Open MPI") || t.contains("OpenRTE") => Mpi::OpenMpi,
        _ => Mpi::Mpich,
    }
}

/// The `mpirun` command line (without the program): flags by implementation.
pub fn mpirun_flags(mpi: Mpi, a: &LaunchArgs, root: bool, cores: usize) -> Result<(Vec<String>, Vec<String>)> {
    let mut f = vec!["-np".to_string(), a.n.to_string()];
    let mut notes = vec![];
    let hosts = a.hosts.as_deref().map(parse_hosts).transpose()?;
    if hosts.is_none() && a.n > MAX_RANKS_PER_CORE * cores {
        return Err(input_err!(
            "-n {}: more than {MAX_RANKS_PER_CORE} ranks per core of this machine ({cores} cores, so {} at most): every rank is a whole process here; spread them with --hosts",
            a.n,
            MAX_RANKS_PER_CORE * cores
        ));
    }
    match mpi {
        Mpi::OpenMpi => {
            if root {
                f.push("--allow-run-as-root".into());
            }
            f.extend(["--bind-to".into(), "none".into()]);
            match &hosts {
                Some(h) => {
                    f.push("--host".into());
                    f.push(h.iter().map(|(h, n)| format!("{h}:{n}")).collect::<Vec<_>>().join(","));
                }
                None if a.n > cores => {
                    f.push("--oversubscribe".into());
                    notes.push(format!("{} ranks on {cores} cores: added --oversubscribe (ranks share cores; expect it slower)", a.n));
                }
                None => {}
            }
            if !a.no_prefix {
                f.push("--tag-output".into());
            }
        }
        Mpi::Mpich => {
            if let Some(h) = &hosts {
                f.push("-hosts".into());
                f.push(h.iter().map(|(h, n)| format!("{h}:{n}")).collect::<Vec<_>>().join(","));
            } else if a.n > cores {
                notes.push(format!("{} ranks on {cores} cores: ranks share cores; expect it slower", a.n));
            }
            if !a.no_prefix {
                f.push("-prepend-rank".into());
            }
        }
    }
    if let Some(h) = &hosts {
        let slots: usize = h.iter().map(|x| x.1).sum();
        if slots < a.n {
            return Err(input_err!("--hosts {}: {slots} slots for -n {}", a.hosts.as_deref().unwrap_or(""), a.n));
        }
    }
    if let Some(extra) = &a.mpirun_args {
        // Split as the shell the user typed it in would: `-x NCCL_DEBUG='INFO'` or a quoted
        // value with spaces is what mpirun gets, not the quotes themselves.
        let words = shlex::split(extra).ok_or_else(|| {
            input_err!("--mpirun-args {extra}: a quote left open or a trailing backslash; expected flags as a shell would split them")
        })?;
        f.extend(words);
    }
    Ok((f, notes))
}

/// A rank's output line with its tag rewritten to `[rN] `, and whether it was the job's stderr;
/// `None` for lines that are not a rank's (mpirun's own).
pub fn retag(line: &str) -> Option<(usize, bool, String)> {
    // Open MPI: "[1,3]<stdout>:text" / "[1,3]<stderr>:text".
    if let Some(rest) = line.strip_prefix('[') {
        if let Some((ids, tail)) = rest.split_once(']') {
            if let Some((_, rank)) = ids.split_once(',') {
                if let Ok(r) = rank.parse::<usize>() {
                    for (tag, err) in [("<stdout>:", false), ("<stderr>:", true)] {
                        if let Some(text) = tail.strip_prefix(tag) {
                            // Open MPI tags each chunk it reads: a line written in several
                            // pieces carries the tag again inside it.
                            return Some((r, err, text.replace(&format!("[{ids}]{tag}"), "")));
                        }
                    }
                }
            }
            // MPICH: "[3] text".
            if let (Ok(r), Some(text)) = (ids.parse::<usize>(), tail.strip_prefix(' ')) {
                return Some((r, false, text.to_string()));
            }
        }
    }
    None
}

/// The first failing rank and its exit code, from mpirun's closing report.
pub fn first_failure(stderr: &[String]) -> Option<(usize, Option<i32>)> {
    // Open MPI: "  Process name: [[1535,1],1]" then "  Exit code:    4" (or "Signal: Killed").
    let mut rank = None;
    for l in stderr {
        let t = l.trim();
        if let Some(p) = t.strip_prefix("Process name: [[") {
            rank = p.split("],").nth(1).and_then(|r| r.trim_end_matches(']').parse::<usize>().ok());
        }
        if let (Some(r), Some(code)) = (rank, t.strip_prefix("Exit code:")) {
            return Some((r, code.trim().parse().ok()));
        }
        // MPICH: "=   RANK 1 PID 123 RUNNING AT host" then "=   EXIT STATUS: 4".
        if let Some(p) = t.trim_start_matches('=').trim().strip_prefix("RANK ") {
            rank = p.split_whitespace().next().and_then(|r| r.parse().ok());
        }
        if let (Some(r), Some(code)) = (rank, t.trim_start_matches('=').trim().strip_prefix("EXIT STATUS:")) {
            return Some((r, code.trim().parse().ok()));
        }
    }
    rank.map(|r| (r, None))
}

/// The signal that asked us to stop (0: none).
static SIGNALLED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNALLED.store(sig, Ordering::SeqCst);
}

/// A process's start time (clock ticks since boot, /proc/<pid>/stat field 22): with the pid, it
/// names one process, not whichever reuses the number later.
fn start_time(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// What /proc shows for one of this process's pipe ends (`pipe:[inode]`), so that every other
/// process holding the same pipe can be found.
fn pipe_name(fd: std::os::fd::RawFd) -> Option<String> {
    let l = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?.to_string_lossy().into_owned();
    l.starts_with("pipe:").then_some(l)
}

/// Every process other than this one that holds one of `pipes` open, from /proc/<pid>/fd.
/// mpirun's output pipes are held by nothing but the job: a process still holding one after
/// mpirun has gone is a fork it left behind — Open MPI's mpirun, stopped while it was still
/// starting ranks, left one reparented to init, which kept the output threads (and so launch)
/// waiting forever. Such a fork is no longer below mpirun, and it may have been born after
/// the last scan of the tree, so the pipe is what finds it.
pub fn pipe_holders(pipes: &[String]) -> Vec<u32> {
    let me = std::process::id();
    let mut out = vec![];
    let Ok(rd) = std::fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else { continue };
        if fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| pipes.iter().any(|p| l.as_os_str() == p.as_str()))) {
            out.push(pid);
        }
    }
    out
}

/// Every process below `root` (children, their children, ...), from /proc.
pub fn descendants(root: u32) -> Vec<u32> {
    let mut parent = std::collections::HashMap::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
            // /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces: split after ')'.
            if let Some(ppid) = std::fs::read_to_string(e.path().join("stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok())))
            {
                parent.insert(pid, ppid);
            }
        }
    }
    let mut out = vec![];
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (&c, &pp) in &parent {
            if pp == p && !out.contains(&c) {
                out.push(c);
                frontier.push(c);
            }
        }
    }
    out
}

/// Sends on drop: an output thread's end, however it ends.
struct Closed(std::sync::mpsc::Sender<()>);

impl Drop for Closed {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// Runs the job; returns the exit code `dptrain launch` exits with.
pub fn launch(a: &LaunchArgs) -> Result<i32> {
    if a.n < 1 {
        return Err(input_err!("-n {}: at least 1 rank", a.n));
    }
    match a.cmd.first() {
        None => return Err(input_err!("no command after `--`: expected e.g. `dptrain launch -n 2 -- train [CONFIG] [--set ...]`")),
        Some(c) if !RANK_COMMANDS.contains(&c.as_str()) => {
            return Err(input_err!("`{c}` after `--`: expected a dptrain subcommand a rank runs ({})", RANK_COMMANDS.join(", ")))
        }
        _ => {}
    }
    let mpirun = find_mpirun()?;
    let mpi = detect(&mpirun);
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let (flags, notes) = mpirun_flags(mpi, a, root, cores)?;
    let exe = std::env::current_exe().map_err(|e| LaunchError::Runtime(format!("cannot find the dptrain binary: {e}")))?;
    let shown: Vec<String> = std::iter::once(mpirun.display().to_string())
        .chain(flags.iter().cloned())
        .chain(std::iter::once(exe.display().to_string()))
        .chain(a.cmd.iter().cloned())
        .map(|w| {
            if w.contains(|c: char| c.is_whitespace() || "\"'$|&;<>*?".contains(c)) {
                format!("'{}'", w.replace('\'', "'\\''"))
            } else {
                w
            }
        })
        .collect();
    for n in &notes {
        eprintln!("dptrain launch: note: {n}");
    }
    println!("dptrain launch: {}", shown.join(" "));
    let _ = std::io::stdout().flush();

    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGUSR1, on_signal as *const () as libc::sighandler_t);
    }
    let mut child = Command::new(&mpirun)
        .args(&flags)
        .arg(&exe)
        .args(&a.cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| LaunchError::Runtime(format!("cannot start {}: {e}", mpirun.display())))?;
    let pid = child.id();
    let pipes: Vec<String> = {
        use std::os::fd::AsRawFd;
        let (o, e) = (child.stdout.as_ref().expect("piped"), child.stderr.as_ref().expect("piped"));
        [pipe_name(o.as_raw_fd()), pipe_name(e.as_raw_fd())].into_iter().flatten().collect()
    };
    // mpirun's own stderr lines (not a rank's), kept for its closing report.
    let report: Arc<Mutex<Vec<String>>> = Arc::default();
    // Each output thread says when its pipe has closed (every writer gone).
    let (closed_tx, closed) = std::sync::mpsc::channel::<()>();
    let pump = |pipe: Box<dyn std::io::Read + Send>, is_err: bool, report: Arc<Mutex<Vec<String>>>| {
        let closed_tx = closed_tx.clone();
        std::thread::spawn(move || {
            let _closed = Closed(closed_tx);
            for line in BufReader::new(pipe).lines().map_while(|l| l.ok()) {
                match retag(&line) {
                    Some((r, err, text)) => {
                        let l = format!("[r{r}] {text}");
                        if err || is_err {
                            eprintln!("{l}");
                        } else {
                            println!("{l}");
                        }
                    }
                    None => {
                        if is_err {
                            eprintln!("{line}");
                            report.lock().expect("report lock").push(line);
                        } else {
                            println!("{line}");
                        }
                    }
                }
            }
        })
    };
    let out = pump(Box::new(child.stdout.take().expect("piped")), false, report.clone());
    let err = pump(Box::new(child.stderr.take().expect("piped")), true, report.clone());

    let mut forwarded_at: Option<Instant> = None;
    // Every process seen under mpirun, so that any it leaves behind (reparented, no longer under
    // it) can still be found and ended.
    let mut known: Vec<(u32, Option<u64>)> = vec![];
    let mut scanned = Instant::now() - Duration::from_secs(10);
    let status = loop {
        if scanned.elapsed() > Duration::from_millis(500) {
            for p in descendants(pid) {
                if !known.iter().any(|k| k.0 == p) {
                    known.push((p, start_time(p)));
                }
            }
            scanned = Instant::now();
        }
        if let Some(s) = child.try_wait().map_err(|e| LaunchError::Runtime(format!("waiting for mpirun: {e}")))? {
            break s;
        }
        let sig = SIGNALLED.load(Ordering::SeqCst);
        match forwarded_at {
            None if sig != 0 => {
                // Open MPI's mpirun forwards SIGUSR1 to the ranks untouched (`dptrain train`
                // checkpoints and stops on it); MPICH's gets SIGTERM, as before.
                let fwd = if mpi == Mpi::OpenMpi { libc::SIGUSR1 } else { libc::SIGTERM };
                eprintln!(
                    "dptrain launch: got {}: forwarding {} to the job, whose ranks stop at the end of their step with a checkpoint (SIGKILL in {} s)",
                    crate::stop::name(sig),
                    crate::stop::name(fwd),
                    a.grace_s
                );
                // SAFETY: kill(2) on our own child's pid.
                unsafe { libc::kill(pid as i32, fwd) };
                forwarded_at = Some(Instant::now());
            }
            Some(t) if t.elapsed().as_secs_f64() > a.grace_s => {
                eprintln!("dptrain launch: the job did not stop within {} s: SIGKILL to every process under it", a.grace_s);
                let below = descendants(pid).into_iter().chain(known.iter().filter(|k| start_time(k.0) == k.1).map(|k| k.0));
                for p in below.chain(pipe_holders(&pipes)) {
                    // SAFETY: kill(2) on processes that were below our child or hold its pipes.
                    unsafe { libc::kill(p as i32, libc::SIGKILL) };
                }
                // SAFETY: as above.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                forwarded_at = Some(Instant::now() + Duration::from_secs(3600));
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Whatever mpirun left behind (it should have taken its ranks with it) goes now, so that
    // no rank outlives the job and no pipe stays open: what was seen below it, and whatever
    // still holds its output pipes.
    for (p, started) in known {
        if start_time(p).is_some_and(|t| Some(t) == started) {
            // SAFETY: kill(2) on a leftover process that was below our (finished) child.
            unsafe { libc::kill(p as i32, libc::SIGKILL) };
        }
    }
    for p in pipe_holders(&pipes) {
        // SAFETY: kill(2) on a leftover of the job: it holds the output pipes of our (finished)
        // child, which nothing outside the job was given.
        unsafe { libc::kill(p as i32, libc::SIGKILL) };
    }
    // The pipes close as the killed processes go. One held by a process this user cannot kill
    // must not keep launch waiting: its last lines are lost, said aloud.
    drop(closed_tx);
    let deadline = Instant::now() + Duration::from_secs(10);
    if (0..2).all(|_| closed.recv_timeout(deadline.saturating_duration_since(Instant::now())).is_ok()) {
        let _ = out.join();
        let _ = err.join();
    } else {
        eprintln!("dptrain launch: mpirun's output is still held open by processes {:?}; not waiting for it", pipe_holders(&pipes));
    }
    let code = match status.code() {
        Some(c) => c,
        None => 128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(9),
    };
    let sig = SIGNALLED.load(Ordering::SeqCst);
    if sig != 0 {
        eprintln!("dptrain launch: stopped by signal {sig}");
        return Ok(128 + sig);
    }
    if code != 0 {
        match first_failure(&report.lock().expect("report lock")) {
            Some((r, Some(c))) => eprintln!("dptrain launch: rank {r} failed first (exit code {c})"),
            Some((r, None)) => eprintln!("dptrain launch: rank {r} failed first"),
            None => eprintln!("dptrain launch: mpirun exited with code {code}"),
        }
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_parse_or_name_the_problem() {
        assert_eq!(parse_hosts("a:4,b:2").unwrap(), vec![("a".to_string(), 4), ("b".to_string(), 2)]);
        assert_eq!(parse_hosts("a").unwrap(), vec![("a".to_string(), 1)]);
        for bad in ["a:x", "a:0", ":3", "a:4,", "a b:2"] {
            let e = parse_hosts(bad).unwrap_err().to_string();
            assert!(e.contains("--hosts") && e.contains("host:slots"), "{bad}: {e}");
        }
    }

    #[test]
    fn flags_follow_the_implementation() {
        let a = LaunchArgs { n: 4, ..Default::default() };
        let (f, notes) = mpirun_flags(Mpi::OpenMpi, &a, true, 2).unwrap();
        assert_eq!(f, ["-np", "4", "--allow-run-as-root", "--bind-to", "none", "--oversubscribe", "--tag-output"]);
        assert_eq!(notes.len(), 1);
        let (f, notes) = mpirun_flags(Mpi::OpenMpi, &LaunchArgs { n: 2, no_prefix: true, ..Default::default() }, false, 8).unwrap();
        assert_eq!(f, ["-np", "2", "--bind-to", "none"]);
        assert!(notes.is_empty());
        let h = LaunchArgs { n: 8, hosts: Some("a:4,b:4".into()), mpirun_args: Some("-x FOO".into()), ..Default::default() };
        let (f, _) = mpirun_flags(Mpi::Mpich, &h, true, 2).unwrap();
        assert_eq!(f, ["-np", "8", "-hosts", "a:4,b:4", "-prepend-rank", "-x", "FOO"]);
        // Quotes group and are removed, as the shell would; one left open is an input error.
        let quoted =
            LaunchArgs { n: 2, no_prefix: true, mpirun_args: Some("-x 'A=b c' --mca  btl \"self,tcp\"".into()), ..Default::default() };
        let (f, _) = mpirun_flags(Mpi::OpenMpi, &quoted, false, 2).unwrap();
        assert_eq!(f, ["-np", "2", "--bind-to", "none", "-x", "A=b c", "--mca", "btl", "self,tcp"]);
        for bad in ["'unterminated", "-x \"A=b", "trailing\\"] {
            let a = LaunchArgs { n: 2, mpirun_args: Some(bad.into()), ..Default::default() };
            let e = mpirun_flags(Mpi::OpenMpi, &a, false, 2).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--mpirun-args {bad}: a quote left open")), "{bad}: {e}");
        }
        let few = LaunchArgs { n: 9, hosts: Some("a:4,b:4".into()), ..Default::default() };
        assert!(mpirun_flags(Mpi::OpenMpi, &few, false, 2).unwrap_err().to_string().contains("8 slots for -n 9"));
        // 16 ranks a core here at most; across hosts their slots decide.
        assert!(mpirun_flags(Mpi::OpenMpi, &LaunchArgs { n: 32, ..Default::default() }, false, 2).is_ok());
        let e = mpirun_flags(Mpi::Mpich, &LaunchArgs { n: 33, ..Default::default() }, false, 2).unwrap_err().to_string();
        assert!(e.starts_with("-n 33: more than 16 ranks per core of this machine (2 cores, so 32 at most)"), "{e}");
        let spread = LaunchArgs { n: 64, hosts: Some("a:32,b:32".into()), ..Default::default() };
        assert!(mpirun_flags(Mpi::OpenMpi, &spread, false, 2).is_ok());
    }

    #[test]
    fn rank_tags_and_failure_reports_are_read() {
        assert_eq!(retag("[1,3]<stdout>:step 10"), Some((3, false, "step 10".into())));
        assert_eq!(retag("[1,0]<stderr>:dptrain: error: x"), Some((0, true, "dptrain: error: x".into())));
        assert_eq!(retag("[2] hello"), Some((2, false, "hello".into())));
        assert_eq!(retag("[1,1]<stderr>:rank [1,1]<stderr>:1[1,1]<stderr>:/2"), Some((1, true, "rank 1/2".into())));
        assert_eq!(retag("----"), None);
        assert_eq!(retag("[[1535,1],1]"), None);
        let ompi: Vec<String> = ["mpirun detected ...", "  Process name: [[1535,1],1]", "  Exit code:    4"].map(String::from).to_vec();
        assert_eq!(first_failure(&ompi), Some((1, Some(4))));
        let mpich: Vec<String> = ["=   RANK 2 PID 77 RUNNING AT h", "=   EXIT STATUS: 9"].map(String::from).to_vec();
        assert_eq!(first_failure(&mpich), Some((2, Some(9))));
    }
}
