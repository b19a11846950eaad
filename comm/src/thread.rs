//! `ThreadComm`: N ranks as threads of one process, exchanging through shared memory. Each
//! collective is one exchange round (every rank deposits its contribution, all read all of
//! them, reduced in rank order so results are identical on every rank), with the same
//! watchdog semantics as MPI: a round that does not fill within the timeout fails naming the
//! collective, its sequence number and the ranks that never arrived.

use dptrain_core::comm::{hostname, Communicator, ReduceOp, WorldInfo};
use dptrain_core::{Error, Result};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone)]
enum Payload {
    F32(Vec<f32>),
    Bytes(Vec<u8>),
}

struct Round {
    gen: u64,
    slots: Vec<Option<Payload>>,
    arrived: usize,
    taken: usize,
    result: Option<Arc<Vec<Payload>>>,
}

struct Shared {
    n: usize,
    m: Mutex<Round>,
    cv: Condvar,
}

pub struct ThreadComm {
    shared: Arc<Shared>,
    world: WorldInfo,
    seq: u64,
    timeout: Duration,
}

impl ThreadComm {
    /// `n` connected communicators, one per rank (move each to its thread).
    pub fn group(n: usize, timeout: Duration) -> Vec<ThreadComm> {
        let shared = Arc::new(Shared {
            n,
            m: Mutex::new(Round { gen: 0, slots: vec![None; n], arrived: 0, taken: 0, result: None }),
            cv: Condvar::new(),
        });
        let host = hostname();
        (0..n)
            .map(|rank| ThreadComm {
                shared: shared.clone(),
                world: WorldInfo { rank, world_size: n, local_rank: rank, local_size: n, host: host.clone() },
                seq: 0,
                timeout,
            })
            .collect()
    }

    fn exchange(&mut self, what: &str, p: Payload) -> Result<Arc<Vec<Payload>>> {
        self.seq += 1;
        let sh = &self.shared;
        let deadline = Instant::now() + self.timeout;
        let mut g = sh.m.lock().unwrap_or_else(|e| e.into_inner());
        // Wait for the previous round to be fully read.
        while g.result.is_some() {
            g = self.wait(g, deadline, what)?;
        }
        let gen = g.gen;
        g.slots[self.world.rank] = Some(p);
        g.arrived += 1;
        if g.arrived == sh.n {
            let all: Vec<Payload> = g.slots.iter_mut().map(|s| s.take().expect("every rank arrived")).collect();
            g.result = Some(Arc::new(all));
            sh.cv.notify_all();
        }
        while !(g.gen == gen && g.result.is_some()) {
            g = self.wait(g, deadline, what)?;
        }
        let r = g.result.clone().expect("checked");
        g.taken += 1;
        if g.taken == sh.n {
            g.result = None;
            g.arrived = 0;
            g.taken = 0;
            g.gen += 1;
            sh.cv.notify_all();
        }
        Ok(r)
    }

    fn wait<'a>(&self, g: std::sync::MutexGuard<'a, Round>, deadline: Instant, what: &str) -> Result<std::sync::MutexGuard<'a, Round>> {
        let now = Instant::now();
        if now >= deadline {
            let missing: Vec<usize> = g.slots.iter().enumerate().filter(|(_, s)| s.is_none()).map(|(r, _)| r).collect();
            return Err(Error::Msg(format!(
                "watchdog: rank {}: collective {what} #{} did not complete within {:.1} s; ranks that did not join: {missing:?}",
                self.world.rank,
                self.seq,
                self.timeout.as_secs_f64()
            )));
        }
        Ok(self.shared.cv.wait_timeout(g, deadline - now).unwrap_or_else(|e| e.into_inner()).0)
    }
}

impl Communicator for ThreadComm {
    fn world(&self) -> &WorldInfo {
        &self.world
    }
    fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        let all = self.exchange("all_reduce", Payload::F32(buf.to_vec()))?;
        let parts: Vec<&[f32]> = all.iter().map(|p| if let Payload::F32(v) = p { v.as_slice() } else { &[] }).collect();
        if parts.iter().any(|p| p.len() != buf.len()) {
            return Err(Error::Msg(format!("all_reduce #{}: ranks passed different lengths", self.seq)));
        }
        for (i, x) in buf.iter_mut().enumerate() {
            *x = match op {
                ReduceOp::Max => parts.iter().map(|p| p[i]).fold(f32::NEG_INFINITY, f32::max),
                _ => parts.iter().map(|p| p[i]).sum(),
            };
        }
        if op == ReduceOp::Avg {
            let inv = 1.0 / self.world.world_size as f32;
            buf.iter_mut().for_each(|x| *x *= inv);
        }
        Ok(())
    }
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        let all = self.exchange("broadcast", Payload::F32(buf.to_vec()))?;
        match all.get(root) {
            Some(Payload::F32(v)) if v.len() == buf.len() => buf.copy_from_slice(v),
            _ => return Err(Error::Msg(format!("broadcast #{}: bad root {root} or length", self.seq))),
        }
        Ok(())
    }
    fn broadcast_bytes(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        let all = self.exchange("broadcast_bytes", Payload::Bytes(buf.clone()))?;
        match all.get(root) {
            Some(Payload::Bytes(v)) => *buf = v.clone(),
            _ => return Err(Error::Msg(format!("broadcast_bytes #{}: bad root {root}", self.seq))),
        }
        Ok(())
    }
    fn all_gather(&mut self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let all = self.exchange("all_gather", Payload::F32(send.to_vec()))?;
        if recv.len() != send.len() * self.world.world_size {
            return Err(Error::Msg(format!(
                "all_gather #{}: receive buffer of {} for {} × {}",
                self.seq,
                recv.len(),
                send.len(),
                self.world.world_size
            )));
        }
        for (r, p) in all.iter().enumerate() {
            if let Payload::F32(v) = p {
                recv[r * send.len()..(r + 1) * send.len()].copy_from_slice(v);
            }
        }
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        self.exchange("barrier", Payload::Bytes(vec![])).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<R: Send + 'static>(n: usize, f: impl Fn(ThreadComm) -> R + Send + Sync + 'static) -> Vec<R> {
        let f = Arc::new(f);
        let hs: Vec<_> = ThreadComm::group(n, Duration::from_secs(10))
            .into_iter()
            .map(|c| {
                let f = f.clone();
                std::thread::spawn(move || f(c))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn collectives_agree_across_ranks() {
        let out = run(3, |mut c| {
            let r = c.rank() as f32;
            let mut s = vec![r, 1.0];
            c.all_reduce(&mut s, ReduceOp::Sum).unwrap();
            let mut a = vec![r];
            c.all_reduce(&mut a, ReduceOp::Avg).unwrap();
            let mut m = vec![r];
            c.all_reduce(&mut m, ReduceOp::Max).unwrap();
            let mut b = vec![r + 10.0];
            c.broadcast(&mut b, 2).unwrap();
            let mut g = vec![0.0; 3];
            c.all_gather(&[r * 2.0], &mut g).unwrap();
            let mut bytes = if c.rank() == 0 { b"hello".to_vec() } else { vec![] };
            c.broadcast_bytes(&mut bytes, 0).unwrap();
            c.barrier().unwrap();
            (s, a, m, b, g, bytes)
        });
        for o in out {
            assert_eq!(o.0, vec![3.0, 3.0]);
            assert_eq!(o.1, vec![1.0]);
            assert_eq!(o.2, vec![2.0]);
            assert_eq!(o.3, vec![12.0]);
            assert_eq!(o.4, vec![0.0, 2.0, 4.0]);
            assert_eq!(o.5, b"hello");
        }
    }

    #[test]
    fn watchdog_names_the_collective_and_missing_ranks() {
        let mut cs = ThreadComm::group(2, Duration::from_millis(200));
        let _idle = cs.pop();
        let mut c0 = cs.pop().unwrap();
        let mut b = vec![1.0];
        let e = c0.all_reduce(&mut b, ReduceOp::Sum).unwrap_err().to_string();
        assert!(e.contains("all_reduce") && e.contains("#1") && e.contains("[1]"), "{e}");
    }
}
