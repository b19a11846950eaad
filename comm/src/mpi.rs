//! `MpiComm`: collectives over the system MPI through rsmpi, each under a watchdog.
//!
//! Every collective is issued non-blocking (`MPI_Iallreduce`, `MPI_Ibcast`, ...) and polled
//! with `MPI_Test` against a deadline; each carries a sequence number. If one does not complete
//! within the timeout, the rank prints which collective and sequence number it was stuck in and
//! calls `MPI_Abort`, which ends the whole job — never a silent hang (PyTorch's NCCL watchdog
//! behaves the same way). MPI cannot tell which peer is missing; the message says so.
//!
//! MPI is initialised with `MPI_THREAD_MULTIPLE` (required: the gradient reducer's
//! communication thread uses its own duplicated communicator concurrently with the training
//! thread's).

use dptrain_core::comm::{hostname, Communicator, ReduceOp, WorldInfo};
use dptrain_core::{Error, Result};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::request::{Request, Scope};
use mpi::topology::{Communicator as _, SimpleCommunicator};
use mpi::traits::*;
use mpi::Threading;
use std::time::{Duration, Instant};

/// The initialised MPI environment. Dropping it finalises MPI, so it must outlive every
/// `MpiComm` (the trainer drops communicators first).
pub struct MpiEnv {
    universe: Universe,
    pub info: WorldInfo,
}

impl MpiEnv {
    /// Initialises MPI (thread-multiple) and resolves rank, world size, local rank and local
    /// size (`MPI_Comm_split_type(SHARED)`); cross-checks the launcher's environment so a binary
    /// started by another MPI's `mpirun` (which would silently run N worlds of one) is caught.
    pub fn init() -> Result<MpiEnv> {
        let (universe, level) =
            mpi::initialize_with_threading(Threading::Multiple).ok_or_else(|| Error::Msg("MPI was already initialised".into()))?;
        if level != Threading::Multiple {
            return Err(Error::Msg(format!("the MPI library grants thread level {level:?}; dptrain needs MPI_THREAD_MULTIPLE")));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if let Some((_, env_size, _)) = crate::world::env_world() {
            if env_size != size {
                return Err(Error::Msg(format!(
                    "the launcher started {env_size} processes but MPI reports a world of {size}: dptrain was built against a different MPI than the mpirun that started it"
                )));
            }
        }
        let local = world.split_shared(rank as i32);
        let info =
            WorldInfo { rank, world_size: size, local_rank: local.rank() as usize, local_size: local.size() as usize, host: hostname() };
        Ok(MpiEnv { universe, info })
    }

    /// A new communicator over all ranks (its own MPI context, so collectives on different
    /// communicators never match each other).
    pub fn comm(&self, timeout: Duration, name: &'static str) -> MpiComm {
        MpiComm { comm: self.universe.world().duplicate(), info: self.info.clone(), seq: 0, timeout, name }
    }
}

pub struct MpiComm {
    comm: SimpleCommunicator,
    info: WorldInfo,
    seq: u64,
    timeout: Duration,
    name: &'static str,
}

// SAFETY: MPI is initialised with MPI_THREAD_MULTIPLE (checked in `MpiEnv::init`, which is the
// only way to make an MpiComm), so MPI calls may come from any thread. An MpiComm is a handle to
// its own duplicated communicator and every collective takes `&mut self`, so it is used by one
// thread at a time; moving it to another thread (the reducer's communication thread) is sound.
unsafe impl Send for MpiComm {}

impl MpiComm {
    /// Polls `req` until it completes or the watchdog fires (then aborts the job).
    fn finish<'a, D: ?Sized, S: Scope<'a>>(&self, what: &str, count: usize, mut req: Request<'a, D, S>) {
        let start = Instant::now();
        loop {
            match req.test() {
                Ok(_) => return,
                Err(r) => req = r,
            }
            // MPI progresses a non-blocking collective only inside MPI calls, so test
            // continuously while it is young; a collective still open after 100 ms is waiting
            // for a late rank, and is then polled gently until the watchdog deadline.
            if start.elapsed() < Duration::from_millis(100) {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
            if start.elapsed() > self.timeout {
                eprintln!(
                    "dptrain: rank {} on {}: watchdog: collective {what} #{} ({count} elements, communicator '{}') did not complete within {:.0} s; \
                     some rank did not join (it died, hangs, or runs a different config); MPI does not say which — aborting the job",
                    self.info.rank,
                    self.info.host,
                    self.seq,
                    self.name,
                    self.timeout.as_secs_f64()
                );
                self.comm.abort(3);
            }
        }
    }

    /// Blocking `MPI_Allreduce` with no watchdog: the raw baseline for the all-reduce benchmark.
    pub fn raw_all_reduce_sum(&self, send: &[f32], recv: &mut [f32]) {
        self.comm.all_reduce_into(send, recv, SystemOperation::sum());
    }
}

impl Communicator for MpiComm {
    fn world(&self) -> &WorldInfo {
        &self.info
    }
    fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        // rsmpi has no MPI_IN_PLACE: reduce from a copy.
        let send = buf.to_vec();
        self.all_reduce_into(&send, buf, op)
    }
    fn all_reduce_into(&mut self, send: &[f32], recv: &mut [f32], op: ReduceOp) -> Result<()> {
        if send.len() != recv.len() {
            return Err(Error::Msg(format!("all_reduce: send {} and receive {} lengths differ", send.len(), recv.len())));
        }
        self.seq += 1;
        let n = recv.len();
        mpi::request::scope(|scope| {
            let req = match op {
                ReduceOp::Max => self.comm.immediate_all_reduce_into(scope, send, &mut *recv, SystemOperation::max()),
                _ => self.comm.immediate_all_reduce_into(scope, send, &mut *recv, SystemOperation::sum()),
            };
            self.finish("all_reduce", n, req);
        });
        if op == ReduceOp::Avg {
            let inv = 1.0 / self.info.world_size as f32;
            recv.iter_mut().for_each(|x| *x *= inv);
        }
        Ok(())
    }
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        self.seq += 1;
        let n = buf.len();
        let rootp = self.comm.process_at_rank(root as i32);
        mpi::request::scope(|scope| {
            let req = rootp.immediate_broadcast_into(scope, &mut *buf);
            self.finish("broadcast", n, req);
        });
        Ok(())
    }
    fn broadcast_bytes(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        // Length first, then the bytes.
        self.seq += 1;
        let mut len = [buf.len() as u64];
        let rootp = self.comm.process_at_rank(root as i32);
        mpi::request::scope(|scope| {
            let req = rootp.immediate_broadcast_into(scope, &mut len);
            self.finish("broadcast_bytes(len)", 1, req);
        });
        buf.resize(len[0] as usize, 0);
        let n = buf.len();
        let rootp = self.comm.process_at_rank(root as i32);
        mpi::request::scope(|scope| {
            let req = rootp.immediate_broadcast_into(scope, &mut buf[..]);
            self.finish("broadcast_bytes", n, req);
        });
        Ok(())
    }
    fn all_gather(&mut self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        if recv.len() != send.len() * self.info.world_size {
            return Err(Error::Msg(format!(
                "all_gather: receive buffer of {} for {} × {} ranks",
                recv.len(),
                send.len(),
                self.info.world_size
            )));
        }
        self.seq += 1;
        let n = send.len();
        mpi::request::scope(|scope| {
            let req = self.comm.immediate_all_gather_into(scope, send, &mut *recv);
            self.finish("all_gather", n, req);
        });
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        self.seq += 1;
        let req = self.comm.immediate_barrier();
        self.finish("barrier", 0, req);
        Ok(())
    }
}
