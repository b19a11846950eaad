//! Rank agreement: the checks that make N processes one job. Every rank learns whether every
//! rank's setup succeeded (so none waits in a collective for a rank that already exited), all
//! start from rank 0's parameters after their configs and layouts are compared (the first
//! difference named), and a periodic checksum catches replicas that drift apart.

use crate::error::{input_err, LaunchError, Result};
use crate::setup::Run;
use dptrain_core::comm::{Communicator, ReduceOp};
use dptrain_core::ParamStore;

/// Every rank gets the same outcome: its own `res` when all ranks succeeded, else the failing
/// rank's message (the launcher may show any rank's output, so each carries the whole line).
pub fn agree_on_setup<T>(comm: &mut dyn Communicator, res: crate::error::Result<T>) -> Result<T> {
    if comm.world_size() == 1 {
        return res;
    }
    let mut flag = [if res.is_ok() { 0.0f32 } else { comm.rank() as f32 + 1.0 }];
    comm.all_reduce(&mut flag, ReduceOp::Max)?;
    if flag[0] > 0.0 {
        let culprit = flag[0] as usize - 1;
        let mut msg = res.as_ref().err().map(|e| e.to_string()).unwrap_or_default().into_bytes();
        comm.broadcast_bytes(&mut msg, culprit)?;
        let msg = String::from_utf8_lossy(&msg).to_string();
        return Err(match res {
            Err(LaunchError::Runtime(_)) => LaunchError::Runtime(format!("rank {culprit}: {msg}")),
            _ => input_err!("rank {culprit}: {msg}"),
        });
    }
    res
}

/// Same start on every rank: identical resolved configs and parameter layouts (checked, with
/// the first difference named), then parameters and buffers broadcast from rank 0.
pub fn sync_start(run: &mut Run, comm: &mut dyn Communicator) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    let rank = comm.rank();
    // Compared without the [derived] table: derived values follow from the rest, and the
    // first difference is then the key the user actually set differently.
    let strip = |s: &str| {
        let mut in_derived = false;
        s.lines()
            .filter(|l| {
                if l.starts_with('[') {
                    in_derived = l.trim() == "[derived]";
                }
                !in_derived
            })
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    for (what, mine) in [("config", run.config_toml.clone()), ("parameter layout", run.params.layout_fingerprint().replace(';', "\n"))] {
        let mut root = mine.clone().into_bytes();
        comm.broadcast_bytes(&mut root, 0)?;
        let root = String::from_utf8_lossy(&root).to_string();
        let (a, b) = (strip(&root), strip(&mine));
        let diff = a.iter().zip(&b).position(|(x, y)| x != y).or((a.len() != b.len()).then(|| a.len().min(b.len())));
        let mut flag = [if diff.is_some() { rank as f32 + 1.0 } else { 0.0 }];
        comm.all_reduce(&mut flag, ReduceOp::Max)?;
        if flag[0] > 0.0 {
            // The (highest) differing rank tells everyone what differs, so whichever process
            // the launcher reports first carries the whole message.
            let culprit = flag[0] as usize - 1;
            let mut msg = diff
                .map(|i| {
                    format!(
                        "rank {rank}: {what} differs from rank 0's: `{}` here, `{}` on rank 0 — every rank must run the same config",
                        b.get(i).map(String::as_str).unwrap_or("(end)"),
                        a.get(i).map(String::as_str).unwrap_or("(end)")
                    )
                })
                .unwrap_or_default()
                .into_bytes();
            comm.broadcast_bytes(&mut msg, culprit)?;
            return Err(input_err!("{}", String::from_utf8_lossy(&msg)));
        }
    }
    comm.broadcast(run.params.flat_mut::<f32>()?, 0)?;
    for (_, b) in run.params.buffers() {
        let mut t = b.lock().unwrap_or_else(|e| e.into_inner());
        let mut v = t.to_vec::<f32>()?;
        comm.broadcast(&mut v, 0)?;
        let shape = t.shape().to_vec();
        *t = dptrain_core::Tensor::from_vec(v, &shape)?;
    }
    Ok(())
}

/// A 64-bit FNV-1a hash of the parameter bits, as four exactly-representable 16-bit integers.
fn param_checksum(params: &ParamStore) -> Result<[f32; 4]> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let host;
    let vals: &[f32] = if params.flat().is_cuda() {
        host = params.flat().to_vec::<f32>()?;
        &host
    } else {
        params.flat().data::<f32>()?
    };
    for x in vals {
        h ^= x.to_bits() as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    Ok([(h & 0xffff) as f32, ((h >> 16) & 0xffff) as f32, ((h >> 32) & 0xffff) as f32, (h >> 48) as f32])
}

/// Fails naming the ranks whose parameters differ from rank 0's.
pub fn check_no_drift(comm: &mut dyn Communicator, params: &ParamStore, step: u64) -> Result<()> {
    let mine = param_checksum(params)?;
    let mut all = vec![0f32; 4 * comm.world_size()];
    comm.all_gather(&mine, &mut all)?;
    let bad: Vec<usize> = (1..comm.world_size()).filter(|&r| all[4 * r..4 * r + 4] != all[..4]).collect();
    if !bad.is_empty() {
        return Err(LaunchError::Runtime(format!(
            "step {step}: parameters of ranks {bad:?} differ from rank 0's — the replicas drifted apart; aborting"
        )));
    }
    Ok(())
}

/// Replaces every rank's buffers (batch-norm running statistics) by their average over the
/// ranks. Each rank updates its running statistics from its own batches, so they drift apart;
/// evaluation and checkpoints must see one set — the ranks' average, not rank 0's alone. One
/// all-reduce for all buffers; a no-op alone.
pub fn average_buffers(comm: &mut dyn Communicator, params: &ParamStore, step: u64) -> Result<()> {
    let ws = comm.world_size();
    if ws == 1 || params.buffers().next().is_none() {
        return Ok(());
    }
    let mut all = vec![];
    let mut mine = vec![];
    for (name, b) in params.buffers() {
        let t = b.lock().unwrap_or_else(|e| e.into_inner()).to_device(dptrain_core::Device::Cpu)?;
        all.extend(t.to_vec::<f32>()?);
        mine.push((name.to_string(), t));
    }
    // Test builds: each rank's own statistics before averaging, so a test can check the saved
    // ones are their average.
    #[cfg(feature = "fault-injection")]
    if let Some(dir) = &dptrain_core::env::env().test_dump_buffers {
        let path = dir.join(format!("rank{}-step{step}.safetensors", comm.rank()));
        std::fs::write(&path, dptrain_core::checkpoint::tensors_to_bytes(&mine)?)
            .map_err(|e| LaunchError::Runtime(format!("{}: {e}", path.display())))?;
    }
    let _ = (step, mine);
    comm.all_reduce(&mut all, ReduceOp::Sum)?;
    let mut at = 0;
    for (_, b) in params.buffers() {
        let mut t = b.lock().unwrap_or_else(|e| e.into_inner());
        let (shape, device) = (t.shape().to_vec(), t.device());
        let n = t.numel();
        let avg: Vec<f32> = all[at..at + n].iter().map(|x| x / ws as f32).collect();
        at += n;
        *t = dptrain_core::Tensor::from_vec(avg, &shape)?.to_device(device)?;
    }
    Ok(())
}
