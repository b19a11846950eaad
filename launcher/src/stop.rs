//! Stopping a run early, with a checkpoint. Slurm sends SIGTERM to every task at a job's time
//! limit or on preemption, and SIGKILL `KillWait` seconds later (30 by default); `#SBATCH
//! --signal=USR1@120` (in the scripts `dptrain slurm` writes) sends SIGUSR1 two minutes ahead; Open MPI's mpirun forwards SIGUSR1 to
//! every rank as it is (its own SIGTERM kills the ranks within about a second), and `dptrain
//! launch` turns the SIGTERM it gets into that SIGUSR1. (A Ctrl-C in the terminal sends SIGINT
//! to every process of the job, which ends them at once, as before.) Either signal asks
//! `dptrain train` to stop at the end
//! of the step it is in: the ranks agree on that step (a signal may reach them at different
//! steps, or reach only some), a checkpoint is written there, and every rank exits with 128 +
//! the signal, so the run continues with `dptrain train --resume RUN_DIR`. A second signal
//! ends the process at once, as the default action would have.

use dptrain_core::comm::{Communicator, ReduceOp};
use std::sync::atomic::{AtomicI32, Ordering};

/// The signal that asked this process to stop (0: none yet).
static PENDING: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    if PENDING.swap(sig, Ordering::SeqCst) != 0 {
        // SAFETY: _exit is async-signal-safe; a second signal means "now".
        unsafe { libc::_exit(128 + sig) };
    }
}

/// Catches SIGTERM and SIGUSR1 from now on: the `dptrain train` command calls it; the other
/// commands, gpu-check's in-process runs among them, keep the default action.
pub fn install() {
    for sig in [libc::SIGTERM, libc::SIGUSR1] {
        // SAFETY: the handler only swaps an atomic and may call _exit, both async-signal-safe;
        // SA_RESTART keeps the blocking calls it interrupts (MPI's, file I/O) going.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Whether to stop after this step, the same answer on every rank: the signal one of them got
/// (the largest number if several), or `None`. One all-reduce of a number per step when there
/// are several ranks (microseconds beside a step), none alone.
pub fn agreed(comm: &mut dyn Communicator) -> dptrain_core::Result<Option<i32>> {
    let mut sig = [PENDING.load(Ordering::SeqCst) as f32];
    if comm.world_size() > 1 {
        comm.all_reduce(&mut sig, ReduceOp::Max)?;
    }
    Ok((sig[0] > 0.0).then_some(sig[0] as i32))
}

/// A signal's name for messages ("SIGTERM"), or its number.
pub fn name(sig: i32) -> String {
    match sig {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGUSR1 => "SIGUSR1".into(),
        libc::SIGINT => "SIGINT".into(),
        s => format!("signal {s}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A raised SIGUSR1 is caught, not fatal, and alone a world of one agrees to stop on it.
    /// (Across ranks, with the signal sent to one rank only: launcher/tests/mpi.rs.)
    #[test]
    fn a_caught_signal_is_the_agreed_stop() {
        install();
        let mut solo = dptrain_comm::LocalComm::new();
        assert_eq!(agreed(&mut solo).unwrap(), None);
        // SAFETY: raise(3) to this test process, whose handler was just installed.
        unsafe { libc::raise(libc::SIGUSR1) };
        assert_eq!(agreed(&mut solo).unwrap(), Some(libc::SIGUSR1));
        assert_eq!(name(libc::SIGUSR1), "SIGUSR1");
        PENDING.store(0, Ordering::SeqCst);
    }
}
