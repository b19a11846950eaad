//! Fault injection for tests: one rank fails at one step, for real — SIGKILL, or a hang — so the
//! watchdog and the job teardown under `mpirun` can be tested; or its loss and gradients turn
//! NaN at one step, so `train.on_nonfinite` can be tested on an otherwise healthy run. The trainer receives a `Fault`
//! explicitly (`TrainArgs::fault`); the command line accepts `--fault` only in builds with the
//! `fault-injection` feature (the test builds), so a production binary cannot be told to fail.

use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The process sends itself SIGKILL.
    Kill,
    /// The process stops making progress (sleeps for an hour).
    Hang,
    /// The step's loss and gradients on this rank become NaN.
    Nan,
    /// The process exits with status 4 (a distinctive code for launchers to pass on).
    Exit,
}

/// `KIND:RANK:STEP`, e.g. `kill:1:5`: rank RANK does KIND when step STEP begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    pub rank: usize,
    pub step: u64,
}

impl FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Fault, String> {
        let bad = || format!("--fault {s}: expected kill|hang|nan|exit:RANK:STEP");
        let mut p = s.split(':');
        let kind = match p.next() {
            Some("kill") => FaultKind::Kill,
            Some("hang") => FaultKind::Hang,
            Some("nan") => FaultKind::Nan,
            Some("exit") => FaultKind::Exit,
            _ => return Err(bad()),
        };
        let rank = p.next().and_then(|x| x.parse().ok()).ok_or_else(bad)?;
        let step = p.next().and_then(|x| x.parse().ok()).ok_or_else(bad)?;
        if p.next().is_some() {
            return Err(bad());
        }
        Ok(Fault { kind, rank, step })
    }
}

impl Fault {
    /// Fails now when this is the fault's rank and step.
    pub fn fire_if(&self, rank: usize, step: u64) {
        if (self.rank, self.step) != (rank, step) || self.kind == FaultKind::Nan {
            return;
        }
        if self.kind == FaultKind::Exit {
            eprintln!("dptrain: fault injection: rank {rank} exits with status 4 at step {step}");
            std::process::exit(4);
        }
        if self.kind == FaultKind::Kill {
            let _ = std::process::Command::new("kill").args(["-9", &std::process::id().to_string()]).status();
        }
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

impl Fault {
    /// Whether this rank's loss and gradients are to be NaN at this step.
    pub fn poisons(&self, rank: usize, step: u64) -> bool {
        self.kind == FaultKind::Nan && (self.rank, self.step) == (rank, step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_spec() {
        assert_eq!("kill:1:5".parse(), Ok(Fault { kind: FaultKind::Kill, rank: 1, step: 5 }));
        assert_eq!("hang:0:12".parse(), Ok(Fault { kind: FaultKind::Hang, rank: 0, step: 12 }));
        assert_eq!("nan:0:3".parse(), Ok(Fault { kind: FaultKind::Nan, rank: 0, step: 3 }));
        for bad in ["", "kill", "kill:1", "stop:1:5", "kill:x:5", "kill:1:5:6"] {
            assert!(bad.parse::<Fault>().is_err(), "{bad}");
        }
    }
}
