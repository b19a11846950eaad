//! `MpiComm`: collectives over the system MPI through rsmpi, each under a watchdog.
//!
//! Collectives are the blocking MPI calls (the MPI library's tuned algorithms; its non-blocking
//! ones were ~2× slower here). Each one registers itself — name, sequence number, size, start
//! time — in a slot that a watchdog thread scans every few milliseconds, as PyTorch's NCCL
//! watchdog does. If a collective does not complete within the timeout, the watchdog prints
//! which collective and sequence number the rank is stuck in and calls `MPI_Abort`, which ends
//! the whole job — never a silent hang. MPI cannot tell which peer is missing; the message says
//! so.
//!
//! MPI is initialised with `MPI_THREAD_MULTIPLE` (required: the gradient reducer's
//! communication thread uses its own duplicated communicator concurrently with the training
//! thread's, and the watchdog may call `MPI_Abort` from its own thread).

use dptrain_core::comm::{hostname, Communicator, ReduceOp, WorldInfo};
use dptrain_core::{Error, Result};
use mpi::collective::SystemOperation;
use mpi::datatype::Equivalence;
use mpi::environment::Universe;
use mpi::raw::AsRaw;
use mpi::topology::{Communicator as _, SimpleCommunicator};
use mpi::traits::*;
use mpi::Threading;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A collective in progress.
#[derive(Clone)]
struct InFlight {
    what: &'static str,
    seq: u64,
    count: usize,
    start: Instant,
}

type Slot = Arc<Mutex<Option<InFlight>>>;

struct Watched {
    slot: Slot,
    timeout: Duration,
    comm: &'static str,
}

/// Scans every communicator's in-flight collective; aborts the job on a timeout.
fn watchdog(list: Arc<Mutex<Vec<Watched>>>, info: WorldInfo) {
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let l = list.lock().unwrap_or_else(|e| e.into_inner());
        for w in l.iter() {
            let cur = w.slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(f) = cur {
                if f.start.elapsed() > w.timeout {
                    eprintln!(
                        "dptrain: rank {} on {}: watchdog: collective {} #{} ({} elements, communicator '{}') did not complete within {:.0} s; \
                         some rank did not join (it died, hangs, or runs a different config); MPI does not say which — aborting the job",
                        info.rank,
                        info.host,
                        f.what,
                        f.seq,
                        f.count,
                        w.comm,
                        w.timeout.as_secs_f64()
                    );
                    // SAFETY: MPI is initialised with MPI_THREAD_MULTIPLE, so MPI_Abort may be
                    // called from this thread; it does not return.
                    unsafe {
                        mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 3);
                    }
                    std::process::exit(3);
                }
            }
        }
    }
}

pub struct MpiEnv {
    universe: Universe,
    pub info: WorldInfo,
    watched: Arc<Mutex<Vec<Watched>>>,
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
        let watched = Arc::new(Mutex::new(Vec::new()));
        let (w, i) = (watched.clone(), info.clone());
        std::thread::Builder::new()
            .name("dptrain-watchdog".into())
            .spawn(move || watchdog(w, i))
            .map_err(|e| Error::Msg(format!("watchdog thread: {e}")))?;
        Ok(MpiEnv { universe, info, watched })
    }

    /// A new communicator over all ranks (its own MPI context, so collectives on different
    /// communicators never match each other).
    pub fn comm(&self, timeout: Duration, name: &'static str) -> MpiComm {
        let slot: Slot = Arc::new(Mutex::new(None));
        self.watched.lock().unwrap_or_else(|e| e.into_inner()).push(Watched { slot: slot.clone(), timeout, comm: name });
        MpiComm { comm: self.universe.world().duplicate(), info: self.info.clone(), seq: 0, slot, in_place: mpi_in_place() }
    }
}

pub struct MpiComm {
    comm: SimpleCommunicator,
    info: WorldInfo,
    seq: u64,
    slot: Slot,
    in_place: Option<usize>,
}

/// The MPI library's version string (`MPI_Get_library_version`, callable before MPI starts).
pub fn library_version() -> String {
    // Open MPI counts the C string's terminating NUL in the length rsmpi keeps: without the
    // trim, `dptrain env | grep MPI` calls the output a binary file.
    mpi::environment::library_version().map(|v| v.trim_end_matches('\0').to_string()).unwrap_or_else(|_| "unknown MPI library".into())
}

/// `MPI_IN_PLACE` is a macro in `mpi.h`, not a symbol, and rsmpi does not expose it. Its value
/// is part of each implementation's ABI: Open MPI `((void *) 1)`, MPICH and its derivatives
/// (Intel MPI, MVAPICH, Cray MPICH) `((void *) -1)`. Unknown libraries get `None` and reduce
/// from a copy instead.
fn mpi_in_place() -> Option<usize> {
    let v = mpi::environment::library_version().unwrap_or_default();
    if v.contains("Open MPI") {
        Some(1)
    } else if v.contains("MPICH") || v.contains("Intel(R) MPI") || v.contains("MVAPICH") {
        Some(usize::MAX)
    } else {
        None
    }
}

/// MPI user reduction for bf16 bits carried as u16: `inout[i] = bf16(in[i] + inout[i])`.
unsafe extern "C" fn bf16_sum(
    invec: *mut std::ffi::c_void,
    inout: *mut std::ffi::c_void,
    len: *mut std::ffi::c_int,
    _dt: *mut mpi::ffi::MPI_Datatype,
) {
    // SAFETY: MPI passes two buffers of `*len` elements of the operation's datatype (u16).
    let n = unsafe { *len } as usize;
    let (a, b) = unsafe { (std::slice::from_raw_parts(invec as *const u16, n), std::slice::from_raw_parts_mut(inout as *mut u16, n)) };
    for (w, r) in b.iter_mut().zip(a) {
        let s = half::bf16::from_bits(*w).to_f32() + half::bf16::from_bits(*r).to_f32();
        *w = half::bf16::from_f32(s).to_bits();
    }
}

// SAFETY: MPI is initialised with MPI_THREAD_MULTIPLE (checked in `MpiEnv::init`, which is the
// only way to make an MpiComm), so MPI calls may come from any thread. An MpiComm is a handle to
// its own duplicated communicator and every collective takes `&mut self`, so it is used by one
// thread at a time; moving it to another thread (the reducer's communication thread) is sound.
unsafe impl Send for MpiComm {}

impl MpiComm {
    /// Runs one collective under the watchdog.
    fn watched<R>(&mut self, what: &'static str, count: usize, f: impl FnOnce(&SimpleCommunicator) -> R) -> R {
        self.seq += 1;
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(InFlight { what, seq: self.seq, count, start: Instant::now() });
        let r = f(&self.comm);
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = None;
        r
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
        let Some(ip) = self.in_place else {
            let send = buf.to_vec();
            return self.all_reduce_into(&send, buf, op);
        };
        let mop = match op {
            ReduceOp::Max => SystemOperation::max(),
            _ => SystemOperation::sum(),
        };
        let count =
            i32::try_from(buf.len()).map_err(|_| Error::Msg(format!("all_reduce of {} elements exceeds MPI's int count", buf.len())))?;
        let rc = self.watched("all_reduce", buf.len(), |c| {
            // SAFETY: `ip` is this library's MPI_IN_PLACE (see `mpi_in_place`); `buf` is a valid,
            // exclusively borrowed f32 buffer of `count` elements; the datatype, op and
            // communicator handles come from live rsmpi objects.
            unsafe {
                mpi::ffi::MPI_Allreduce(
                    ip as *const std::ffi::c_void,
                    buf.as_mut_ptr() as *mut std::ffi::c_void,
                    count,
                    f32::equivalent_datatype().as_raw(),
                    mop.as_raw(),
                    c.as_raw(),
                )
            }
        });
        if rc != 0 {
            return Err(Error::Msg(format!("MPI_Allreduce failed with error code {rc}")));
        }
        if op == ReduceOp::Avg {
            let inv = 1.0 / self.info.world_size as f32;
            buf.iter_mut().for_each(|x| *x *= inv);
        }
        Ok(())
    }
    fn all_reduce_bf16_sum(&mut self, buf: &mut [u16]) -> Result<()> {
        // bf16 on the wire as 16-bit integers, summed by a user operation that widens each pair
        // to f32, adds, and rounds back to bf16 (round to nearest even), as NCCL's bf16 sum does.
        // SAFETY: `bf16_sum` has the MPI_User_function signature and only reads/writes `len`
        // u16 values, the datatype this operation is used with below.
        let op = unsafe { mpi::collective::UnsafeUserOperation::commutative(bf16_sum) };
        let send = buf.to_vec();
        self.watched("all_reduce (bf16)", buf.len(), |c| c.all_reduce_into(&send[..], &mut *buf, &op));
        Ok(())
    }
    fn all_reduce_into(&mut self, send: &[f32], recv: &mut [f32], op: ReduceOp) -> Result<()> {
        if send.len() != recv.len() {
            return Err(Error::Msg(format!("all_reduce: send {} and receive {} lengths differ", send.len(), recv.len())));
        }
        self.watched("all_reduce", send.len(), |c| match op {
            ReduceOp::Max => c.all_reduce_into(send, &mut *recv, SystemOperation::max()),
            _ => c.all_reduce_into(send, &mut *recv, SystemOperation::sum()),
        });
        if op == ReduceOp::Avg {
            let inv = 1.0 / self.info.world_size as f32;
            recv.iter_mut().for_each(|x| *x *= inv);
        }
        Ok(())
    }
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        self.watched("broadcast", buf.len(), |c| c.process_at_rank(root as i32).broadcast_into(&mut *buf));
        Ok(())
    }
    fn broadcast_bytes(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        // Length first, then the bytes.
        let mut len = [buf.len() as u64];
        self.watched("broadcast_bytes(len)", 1, |c| c.process_at_rank(root as i32).broadcast_into(&mut len));
        buf.resize(len[0] as usize, 0);
        self.watched("broadcast_bytes", buf.len(), |c| c.process_at_rank(root as i32).broadcast_into(&mut buf[..]));
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
        self.watched("all_gather", send.len(), |c| c.all_gather_into(send, &mut *recv));
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        self.watched("barrier", 0, |c| c.barrier());
        Ok(())
    }
}
