//! `GradReducer`: averages gradients over ranks bucket by bucket, overlapping communication
//! with backward as PyTorch DDP does.
//!
//! The engine's "parameter gradient final" events drive it: when every parameter of a bucket is
//! final, the bucket's slice is handed to a communication thread (which owns its own
//! communicator) for an averaging all-reduce while backward goes on. Buckets are launched in
//! index order so every rank issues the same collectives in the same sequence. `wait_all`
//! collects the results into the flat gradient buffer before the optimizer runs. On non-final
//! micro-steps of gradient accumulation (`begin(false)`) nothing is communicated (DDP's
//! `no_sync`). With `overlap = false` all buckets are reduced after backward instead.

use crate::bucket::{Bucket, BucketSchedule};
use dptrain_core::comm::{Communicator, ReduceOp};
use dptrain_core::{Error, GradStore, ParamId, ParamStore, Result, Tape, Var};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::Instant;

/// A finished bucket's region of the flat gradient buffer, all-reduced in place by the
/// communication thread (no copies).
struct Region {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: a Region is created only by `GradReducer::launch` for a bucket whose parameters'
// gradients are final; the caller of `on_ready` guarantees (see its safety contract) that the
// GradStore outlives the reduction and that nothing reads or writes the region until
// `wait_all` has received this job back. The engine touches gradients through per-parameter
// regions only (`Tensor::region_mut`), so no other reference to this region exists while the
// communication thread holds it.
unsafe impl Send for Region {}

struct Job {
    idx: usize,
    region: Region,
}

struct Done {
    job: Job,
    result: Result<()>,
    busy_s: f64,
}

/// Timing of one reduction (for the overlap benchmark and logs).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ReduceStats {
    /// Seconds the communication thread spent inside all-reduce.
    pub comm_s: f64,
    /// Seconds the training thread waited in `wait_all`.
    pub wait_s: f64,
}

impl ReduceStats {
    /// Fraction of communication time hidden behind backward.
    pub fn hidden_fraction(&self) -> f64 {
        if self.comm_s <= 0.0 {
            return 0.0;
        }
        (1.0 - self.wait_s / self.comm_s).clamp(0.0, 1.0)
    }
}

pub struct GradReducer {
    sched: BucketSchedule,
    in_flight: usize,
    overlap: bool,
    active: bool,
    tx: Option<Sender<Job>>,
    rx: Receiver<Done>,
    thread: Option<JoinHandle<()>>,
    comm_s: f64,
    /// 1 / world size: the average is applied while copying results back.
    scale: f32,
}

impl GradReducer {
    /// Buckets from the store's layout (first 1 MiB, then `bucket_mb`); `comm` moves to the
    /// communication thread.
    pub fn new(comm: Box<dyn Communicator>, params: &ParamStore, bucket_mb: f64, overlap: bool) -> GradReducer {
        Self::with_dtype(comm, params, bucket_mb, overlap, false)
    }

    /// As [`GradReducer::new`], communicating bf16 values when `bf16` (`comm.dtype`): each
    /// bucket is rounded to bf16, summed over ranks in bf16, and widened back.
    pub fn with_dtype(comm: Box<dyn Communicator>, params: &ParamStore, bucket_mb: f64, overlap: bool, bf16: bool) -> GradReducer {
        let sched = BucketSchedule::new(params.infos(), bucket_mb);
        let scale = 1.0 / comm.world_size() as f32;
        let (tx, jobs) = channel::<Job>();
        let (done, rx) = channel::<Done>();
        let thread = std::thread::Builder::new()
            .name("dptrain-comm".into())
            .spawn(move || {
                let mut comm = comm;
                for job in jobs {
                    let t = Instant::now();
                    // SAFETY: see `Region`: the region is live and exclusively ours until
                    // this job is returned through `done`.
                    let buf = unsafe { std::slice::from_raw_parts_mut(job.region.ptr, job.region.len) };
                    let result = if bf16 {
                        let mut h: Vec<u16> = buf.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
                        comm.all_reduce_bf16_sum(&mut h).map(|()| {
                            for (x, b) in buf.iter_mut().zip(&h) {
                                *x = half::bf16::from_bits(*b).to_f32();
                            }
                        })
                    } else {
                        comm.all_reduce(buf, ReduceOp::Sum)
                    };
                    let busy_s = t.elapsed().as_secs_f64();
                    if done.send(Done { job, result, busy_s }).is_err() {
                        break;
                    }
                }
            })
            .expect("spawn communication thread");
        GradReducer { sched, in_flight: 0, overlap, active: false, tx: Some(tx), rx, thread: Some(thread), comm_s: 0.0, scale }
    }

    pub fn buckets(&self) -> &[Bucket] {
        self.sched.buckets()
    }

    /// Starts a backward pass; `sync` is true on the last micro-step of a step.
    pub fn begin(&mut self, sync: bool) {
        self.active = sync;
        self.in_flight = 0;
        self.comm_s = 0.0;
        self.sched.begin();
    }

    fn launch(&mut self, b: usize, grads: &GradStore) -> Result<()> {
        let bk = &self.sched.buckets()[b];
        if grads.flat().numel() < bk.end {
            return Err(Error::Msg("gradient store does not match the reducer's layout".into()));
        }
        // SAFETY: bk.start < bk.end ≤ numel (checked), so the pointer stays in the buffer. The
        // write access it grants is covered by `on_ready`'s contract (see `Region`).
        let region = Region { ptr: unsafe { grads.flat().data_ptr::<f32>()?.add(bk.start) as *mut f32 }, len: bk.len() };
        self.tx.as_ref().expect("alive").send(Job { idx: b, region }).map_err(|_| Error::Msg("communication thread exited".into()))?;
        self.in_flight += 1;
        Ok(())
    }

    /// The engine's "parameter gradient final" event.
    ///
    /// # Safety
    /// When this launches a bucket, the communication thread reads the bucket's region of
    /// `grads` in place until `wait_all` returns. The caller must keep `grads` alive and must
    /// not write the finished parameters' gradients until then, and must call `wait_all` with
    /// the same `grads` (or drop the reducer, which waits for in-flight buckets) before `grads`
    /// is dropped. The autograd tape satisfies the write rule: after a parameter's final event
    /// it never touches that parameter's gradient again in the same pass.
    pub unsafe fn on_ready(&mut self, id: ParamId, grads: &GradStore) -> Result<()> {
        if !self.active {
            return Ok(());
        }
        self.sched.finish(id);
        if self.overlap {
            while let Some(b) = self.sched.next_ready() {
                self.launch(b, grads)?;
            }
        }
        Ok(())
    }

    /// Completes every bucket's all-reduce and writes the averaged gradients back.
    pub fn wait_all(&mut self, grads: &mut GradStore) -> Result<ReduceStats> {
        if !self.active {
            return Ok(ReduceStats::default());
        }
        let t = Instant::now();
        while let Some(b) = self.sched.next_unlaunched() {
            self.launch(b, grads)?;
        }
        // Every job is received back even after a failed one, so no region stays with the
        // communication thread once this returns (if the thread itself is gone, so are its jobs).
        let mut first_err = None;
        while self.in_flight > 0 {
            let Ok(d) = self.rx.recv() else {
                first_err.get_or_insert(Error::Msg("communication thread exited".into()));
                break;
            };
            self.in_flight -= 1;
            if let Err(e) = d.result {
                first_err.get_or_insert(e);
                continue;
            }
            let bk = &self.sched.buckets()[d.job.idx];
            // Sum → mean, on this bucket's region only: others may still be in flight.
            for g in grads.region_mut(bk.start, bk.len())? {
                *g *= self.scale;
            }
            self.comm_s += d.busy_s;
        }
        self.active = false;
        if let Some(e) = first_err {
            return Err(e);
        }
        Ok(ReduceStats { comm_s: self.comm_s, wait_s: t.elapsed().as_secs_f64() })
    }
}

impl crate::sync::BucketSync for GradReducer {
    fn begin(&mut self, sync: bool) {
        GradReducer::begin(self, sync)
    }
    unsafe fn on_ready(&mut self, id: ParamId, grads: &GradStore) -> Result<()> {
        // SAFETY: the trait's contract is this method's.
        unsafe { GradReducer::on_ready(self, id, grads) }
    }
    fn wait_all(&mut self, grads: &mut GradStore) -> Result<ReduceStats> {
        GradReducer::wait_all(self, grads)
    }
}

impl crate::GradSync for GradReducer {
    fn buckets(&self) -> &[Bucket] {
        GradReducer::buckets(self)
    }
    fn backward(&mut self, tape: &Tape, loss: Var<'_>, grads: &mut GradStore, sync: bool) -> Result<Option<ReduceStats>> {
        crate::sync::backward_with(self, tape, loss, grads, sync)
    }
    fn reduce_all(&mut self, grads: &mut GradStore) -> Result<ReduceStats> {
        crate::sync::reduce_all_with(self, grads)
    }
}

impl Drop for GradReducer {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GradSync;
    use crate::ThreadComm;
    use dptrain_core::{DType, Init, ParamBuilder, Role, Tensor};
    use std::time::Duration;

    /// Two ranks, each with its own data: after reduction both hold the mean gradient, with and
    /// without overlap, and it equals the gradient of the concatenated batch.
    #[test]
    fn reduced_gradients_are_the_mean_over_ranks() {
        let build = || {
            let mut b = ParamBuilder::new();
            b.add("w1", &[8, 4], Role::Hidden, 4, 8, Init::Normal { std: 0.5 });
            b.add("w2", &[3, 8], Role::Hidden, 8, 3, Init::Normal { std: 0.5 });
            b.build(3, DType::F32).unwrap()
        };
        let grad_of = |ps: &ParamStore, x: &[f32], rows: usize, red: Option<&mut GradReducer>| {
            let mut g = GradStore::new(ps);
            let tape = Tape::new();
            let xv = tape.constant(Tensor::from_slice(x, &[rows, 4]).unwrap());
            let h = xv.linear(tape.param(ps, ParamId(0)), None).unwrap().tanh().unwrap();
            let loss = h.linear(tape.param(ps, ParamId(1)), None).unwrap().square().unwrap().mean_all().unwrap();
            g.zero_grad();
            match red {
                Some(r) => {
                    r.backward(&tape, loss, &mut g, true).unwrap();
                }
                None => {
                    tape.backward(loss, &mut g, |_, _| {}).unwrap();
                }
            }
            g.flat().to_vec::<f32>().unwrap()
        };
        let x: Vec<f32> = (0..32).map(|i| ((i * 7) % 13) as f32 / 13.0 - 0.5).collect();
        let whole = grad_of(&build(), &x, 8, None);
        for overlap in [true, false] {
            let comms = ThreadComm::group(2, Duration::from_secs(10));
            let hs: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    std::thread::spawn(move || {
                        let ps = build();
                        // tiny buckets: one per parameter
                        let r = GradReducer::new(Box::new(c), &ps, 1e-6, overlap);
                        assert_eq!(r.buckets().len(), 2);
                        (ps, r)
                    })
                })
                .collect();
            let mut parts: Vec<(ParamStore, GradReducer)> = hs.into_iter().map(|h| h.join().unwrap()).collect();
            // Run both ranks' backward concurrently.
            let (a, b) = parts.split_at_mut(1);
            let (xa, xb) = (x[..16].to_vec(), x[16..].to_vec());
            let ga = std::thread::scope(|s| {
                let h = s.spawn(|| grad_of(&b[0].0, &xb, 4, Some(&mut b[0].1)));
                let ga = grad_of(&a[0].0, &xa, 4, Some(&mut a[0].1));
                let gb = h.join().unwrap();
                assert_eq!(ga, gb, "ranks disagree");
                ga
            });
            for (u, v) in ga.iter().zip(&whole) {
                assert!((u - v).abs() < 1e-6, "overlap {overlap}: {u} vs {v}");
            }
        }
    }
}
