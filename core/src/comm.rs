//! The collective-communication interface. Every collective in dptrain goes through
//! `Communicator`; implementations (world of one, in-process threads, MPI, NCCL) live in
//! `dptrain-comm`, so core, models and optimizers never depend on MPI or NCCL.

use crate::error::Result;

/// Where this process sits in the job.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorldInfo {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_size: usize,
    pub host: String,
}

impl WorldInfo {
    pub fn single() -> WorldInfo {
        WorldInfo { rank: 0, world_size: 1, local_rank: 0, local_size: 1, host: hostname() }
    }
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }
}

/// The machine's host name (from /proc or $HOSTNAME; "localhost" when neither is there).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Avg,
    Max,
}

/// Collectives on f32 host buffers. Every rank must call the same collectives in the same order.
pub trait Communicator: Send {
    fn world(&self) -> &WorldInfo;
    fn rank(&self) -> usize {
        self.world().rank
    }
    fn world_size(&self) -> usize {
        self.world().world_size
    }
    /// In-place all-reduce.
    fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<()>;
    /// All-reduce from `send` into `recv` (same length). Implementations with a native
    /// out-of-place collective (MPI) override this to save the copy.
    fn all_reduce_into(&mut self, send: &[f32], recv: &mut [f32], op: ReduceOp) -> Result<()> {
        recv.copy_from_slice(send);
        self.all_reduce(recv, op)
    }
    /// In-place sum of bf16 values (raw bits), for `comm.dtype = "bf16"`: each partial sum is
    /// rounded to bf16, as a reduction over a bf16 wire format does. The default widens to f32,
    /// sums, and rounds once (in-process communicators); MPI overrides it to send 2-byte values.
    fn all_reduce_bf16_sum(&mut self, buf: &mut [u16]) -> Result<()> {
        let mut wide: Vec<f32> = buf.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect();
        self.all_reduce(&mut wide, ReduceOp::Sum)?;
        for (b, w) in buf.iter_mut().zip(&wide) {
            *b = half::bf16::from_f32(*w).to_bits();
        }
        Ok(())
    }
    /// In-place broadcast from `root`.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Broadcast of bytes from `root` (configs, fingerprints, NCCL ids).
    fn broadcast_bytes(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<()>;
    /// Concatenation of every rank's `send` in rank order into `recv` (len = world × send.len()).
    fn all_gather(&mut self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    fn barrier(&mut self) -> Result<()>;
}
