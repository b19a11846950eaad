//! The NCCL path's watchdog: a thread that watches the device work a rank has queued — each
//! step's gradient all-reduces, or a replayed CUDA graph that holds them — and NCCL's
//! asynchronous error state, so the training thread never waits for the device to find out
//! whether a collective is stuck.
//!
//! Why a thread: the alternative, the training thread polling at the end of every backward
//! until the reductions are done, is a host synchronisation per step — the host cannot queue
//! the optimizer and the next forward while NCCL runs, and a captured step cannot wait at all.
//! PyTorch's `ProcessGroupNCCL` keeps such a watchdog thread for the same reasons. What it
//! watches is a queue of completion checks (a CUDA event's query, in practice), oldest first;
//! the oldest that has been the oldest for longer than `comm.timeout_s`, a failed query, or an
//! asynchronous NCCL error (a dead peer, a network failure) ends the rank: one line naming the
//! collective, then exit code 3, as the MPI watchdog does — `mpirun` or `dptrain launch` then
//! ends the others. Ending the process is the only way out that always works: the training
//! thread may itself be blocked on the device behind the stuck collective.
//!
//! Generic over the checks (plain closures, no CUDA here), so the logic is tested without a GPU.

use std::collections::VecDeque;
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Whether watched work is done: `Ok(true)` done, `Ok(false)` not yet, `Err` the device failed.
pub(crate) type Check = Box<dyn FnMut() -> Result<bool, String> + Send>;
/// NCCL's asynchronous error state: `Some` names the error.
pub(crate) type AsyncError = Box<dyn FnMut() -> Option<String> + Send>;
/// What ends the rank (in production: print the line, exit 3).
pub(crate) type OnFailure = Box<dyn FnOnce(String) + Send>;

/// The watchdog thread (see the module doc); stopped when dropped.
pub(crate) struct Watchdog {
    tx: Option<Sender<(String, Check)>>,
    thread: Option<JoinHandle<()>>,
}

/// How the watchdog polls: between checks while something is queued, and while idle (NCCL's
/// error state only).
pub(crate) struct Polling {
    pub busy: Duration,
    pub idle: Duration,
}

impl Default for Polling {
    fn default() -> Polling {
        Polling { busy: Duration::from_millis(5), idle: Duration::from_millis(100) }
    }
}

impl Watchdog {
    pub(crate) fn start(
        rank: usize,
        timeout: Duration,
        polling: Polling,
        mut async_error: AsyncError,
        on_failure: OnFailure,
    ) -> std::io::Result<Watchdog> {
        let (tx, rx) = channel::<(String, Check)>();
        let thread = std::thread::Builder::new().name("dptrain-nccl-watchdog".into()).spawn(move || {
            let mut queue: VecDeque<(String, Check)> = VecDeque::new();
            // When the oldest item became the oldest: the timeout counts from there, so work
            // queued far ahead of the device is not timed while it waits its turn.
            let mut head_since = Instant::now();
            let fail = |msg: String| on_failure(format!("dptrain: rank {rank}: watchdog: {msg}; ending this rank"));
            loop {
                let wait = if queue.is_empty() { polling.idle } else { polling.busy };
                let mut push = |item: (String, Check), queue: &mut VecDeque<(String, Check)>| {
                    if queue.is_empty() {
                        head_since = Instant::now();
                    }
                    queue.push_back(item);
                };
                match rx.recv_timeout(wait) {
                    Ok(item) => push(item, &mut queue),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
                while let Ok(item) = rx.try_recv() {
                    push(item, &mut queue);
                }
                if let Some(e) = async_error() {
                    let during = queue.front().map_or("no collective in flight".to_string(), |(w, _)| format!("during NCCL {w}"));
                    return fail(format!("NCCL reports an asynchronous error ({e}) {during} (a peer died or the network failed)"));
                }
                while let Some((what, check)) = queue.front_mut() {
                    match check() {
                        Ok(true) => {
                            queue.pop_front();
                            head_since = Instant::now();
                        }
                        Ok(false) => {
                            if head_since.elapsed() > timeout {
                                let what = what.clone();
                                return fail(format!(
                                    "NCCL {what} did not complete within {:.0} s (comm.timeout_s; a peer died, hangs, or runs a different config)",
                                    timeout.as_secs_f64()
                                ));
                            }
                            break;
                        }
                        Err(e) => {
                            let what = what.clone();
                            return fail(format!("the device failed during NCCL {what}: {e}"));
                        }
                    }
                }
            }
        })?;
        Ok(Watchdog { tx: Some(tx), thread: Some(thread) })
    }

    /// Watches `what` (named in the failure's line) until `done` says it is complete.
    pub(crate) fn watch(&self, what: String, done: Check) {
        if let Some(tx) = &self.tx {
            // A send fails only when the thread has ended, i.e. is ending the rank.
            let _ = tx.send((what, done));
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    fn fast() -> Polling {
        Polling { busy: Duration::from_millis(1), idle: Duration::from_millis(2) }
    }

    type Failures = Arc<Mutex<Vec<String>>>;

    fn dog(timeout_ms: u64, async_error: AsyncError) -> (Watchdog, Failures) {
        let failures: Failures = Arc::default();
        let f = failures.clone();
        let on_failure: OnFailure = Box::new(move |m| f.lock().unwrap().push(m));
        (Watchdog::start(3, Duration::from_millis(timeout_ms), fast(), async_error, on_failure).unwrap(), failures)
    }

    fn wait_for(failures: &Failures, ms: u64) -> Vec<String> {
        let t = Instant::now();
        while failures.lock().unwrap().is_empty() && t.elapsed() < Duration::from_millis(ms) {
            std::thread::sleep(Duration::from_millis(1));
        }
        failures.lock().unwrap().clone()
    }

    #[test]
    fn completed_work_is_forgotten_and_nothing_fails() {
        let (w, failures) = dog(50, Box::new(|| None));
        let polls = Arc::new(AtomicUsize::new(0));
        for i in 0..5 {
            let p = polls.clone();
            // Done at its second poll.
            w.watch(format!("all_reduce #{i}"), Box::new(move || Ok(p.fetch_add(1, Ordering::SeqCst) % 2 == 1)));
        }
        std::thread::sleep(Duration::from_millis(150));
        drop(w);
        assert!(failures.lock().unwrap().is_empty(), "{:?}", failures.lock().unwrap());
        assert!(polls.load(Ordering::SeqCst) >= 10, "each item polled until done");
    }

    #[test]
    fn stuck_work_ends_the_rank_naming_the_collective_after_the_timeout() {
        let (w, failures) = dog(40, Box::new(|| None));
        let t = Instant::now();
        w.watch("all_reduce #1–#4".into(), Box::new(|| Ok(true)));
        w.watch("all_reduce #5–#8".into(), Box::new(|| Ok(false)));
        let f = wait_for(&failures, 2000);
        let dt = t.elapsed();
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].starts_with("dptrain: rank 3: watchdog: NCCL all_reduce #5–#8 did not complete within"), "{}", f[0]);
        assert!(f[0].contains("comm.timeout_s"), "{}", f[0]);
        assert!(dt >= Duration::from_millis(40), "failed before the timeout: {dt:?}");
    }

    #[test]
    fn the_timeout_counts_from_when_work_became_the_oldest() {
        // Both queued at once, 200 ms timeout: the first is done after 120 ms, the second
        // 120 ms later — 240 ms after it was queued, but only 120 ms after it became the oldest.
        let (w, failures) = dog(200, Box::new(|| None));
        let t0 = Instant::now();
        w.watch("first".into(), Box::new(move || Ok(t0.elapsed() > Duration::from_millis(120))));
        w.watch("second".into(), Box::new(move || Ok(t0.elapsed() > Duration::from_millis(240))));
        std::thread::sleep(Duration::from_millis(500));
        drop(w);
        assert!(failures.lock().unwrap().is_empty(), "{:?}", failures.lock().unwrap());
    }

    #[test]
    fn an_asynchronous_nccl_error_ends_the_rank_at_once() {
        let raised = Arc::new(AtomicBool::new(false));
        let r = raised.clone();
        let (w, failures) =
            dog(60_000, Box::new(move || r.load(Ordering::SeqCst).then(|| "ncclSystemError / ncclRemoteError".to_string())));
        w.watch("all_reduce #7".into(), Box::new(|| Ok(false)));
        std::thread::sleep(Duration::from_millis(20));
        assert!(failures.lock().unwrap().is_empty());
        raised.store(true, Ordering::SeqCst);
        let f = wait_for(&failures, 2000);
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].contains("asynchronous error (ncclSystemError / ncclRemoteError) during NCCL all_reduce #7"), "{}", f[0]);
    }

    #[test]
    fn a_failed_device_query_ends_the_rank() {
        let (w, failures) = dog(60_000, Box::new(|| None));
        w.watch("a replayed CUDA graph's all-reduces".into(), Box::new(|| Err("CUDA_ERROR_ILLEGAL_ADDRESS".into())));
        let f = wait_for(&failures, 2000);
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].contains("the device failed during NCCL a replayed CUDA graph's all-reduces: CUDA_ERROR_ILLEGAL_ADDRESS"), "{}", f[0]);
    }

    #[test]
    fn dropping_it_stops_the_thread_promptly() {
        let (w, _) = dog(60_000, Box::new(|| None));
        w.watch("never".into(), Box::new(|| Ok(false)));
        let t = Instant::now();
        drop(w);
        assert!(t.elapsed() < Duration::from_millis(500));
    }
}
