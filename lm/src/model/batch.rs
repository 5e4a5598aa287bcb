//! Continuous batching at step granularity: concurrent sequences (sessions on their own
//! threads) hand their forwards (single-position steps; on the CPU prompt chunks too) to one
//! queue, and whoever finds no batch running takes the waiting jobs, oldest first, and runs
//! them as one forward. A step costs about as much as its weight reads, so a batch of `b`
//! rows reads the weights once instead of `b` times; the others wait for their rows meanwhile
//! (leader and followers, no extra thread). The GPU's fused path and the CPU path share this
//! queue; only the batched work differs.

use crate::error::{LmError, Result};
use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Waiting jobs `J`, finished results `O`, and whether a batch is running.
pub(crate) struct StepQueue<J, O> {
    state: Mutex<State<J, O>>,
    batch_done: Condvar,
    /// The most rows a batch takes (a job of more rows runs alone).
    max_batch: usize,
    /// How long a leader may wait for the rest of the last batch's sequences to come back.
    gather: Duration,
    stats: [AtomicU64; 2],
}

/// Batches run and the jobs (forwards) they held since load: their ratio is the mean batch
/// size in jobs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepStats {
    pub batches: u64,
    pub steps: u64,
}

struct State<J, O> {
    /// Ticket, job and its rows.
    waiting: VecDeque<(u64, J, usize)>,
    done: HashMap<u64, Result<O>>,
    running: bool,
    next_ticket: u64,
    /// Jobs in the last batch: how many sequences are stepping together right now.
    last_batch: usize,
}

impl<J, O> State<J, O> {
    /// How many of the oldest waiting jobs fit in `max_rows` rows (at least one).
    fn fitting(&self, max_rows: usize) -> usize {
        let mut rows = 0;
        let n = self
            .waiting
            .iter()
            .take_while(|(_, _, r)| {
                rows += r;
                rows <= max_rows
            })
            .count();
        n.max(1).min(self.waiting.len())
    }
}

impl<J, O> std::fmt::Debug for StepQueue<J, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "StepQueue(max_batch {}, {:?})",
            self.max_batch,
            self.stats()
        )
    }
}

impl<J, O> StepQueue<J, O> {
    /// A queue whose batches hold at most `max_batch` rows (at least one job). A leader that
    /// finds fewer jobs waiting than the last batch held waits up to `gather` for the others:
    /// on a CPU the sequences come back from their own per-step work (sampling, the next
    /// input) one by one, and a batch taken at the first arrival would run nearly alone.
    pub(crate) fn new(max_batch: usize, gather: Duration) -> Self {
        Self {
            state: Mutex::new(State {
                waiting: VecDeque::new(),
                done: HashMap::new(),
                running: false,
                next_ticket: 0,
                last_batch: 0,
            }),
            batch_done: Condvar::new(),
            max_batch: max_batch.max(1),
            gather,
            stats: Default::default(),
        }
    }

    pub(crate) fn stats(&self) -> StepStats {
        StepStats {
            batches: self.stats[0].load(Ordering::Relaxed),
            steps: self.stats[1].load(Ordering::Relaxed),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<J, O>> {
        // A panic is caught around the batch, so the state is never left half-updated.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `job` (`rows` rows) and returns its result once a batch has run it. The caller
    /// that finds no batch running runs the waiting jobs (first come, first served: FIFO, so
    /// no sequence starves) with `run`, which must return one result per job, in order.
    pub(crate) fn submit(
        &self,
        job: J,
        rows: usize,
        run: impl Fn(Vec<J>) -> Vec<Result<O>>,
    ) -> Result<O> {
        let mut q = self.lock();
        let ticket = q.next_ticket;
        q.next_ticket += 1;
        q.waiting.push_back((ticket, job, rows));
        // A leader may be gathering.
        self.batch_done.notify_all();
        loop {
            if let Some(result) = q.done.remove(&ticket) {
                return result;
            }
            if !q.running {
                q.running = true;
                let want = q.last_batch;
                let until = Instant::now() + self.gather;
                while q.waiting.len() < want && q.fitting(self.max_batch) == q.waiting.len() {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    q = self
                        .batch_done
                        .wait_timeout(q, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                let take = q.fitting(self.max_batch);
                q.last_batch = take;
                let (tickets, jobs): (Vec<u64>, Vec<J>) =
                    q.waiting.drain(..take).map(|(t, j, _)| (t, j)).unzip();
                drop(q);
                self.stats[0].fetch_add(1, Ordering::Relaxed);
                self.stats[1].fetch_add(jobs.len() as u64, Ordering::Relaxed);
                let results = match catch_unwind(AssertUnwindSafe(|| run(jobs))) {
                    Ok(r) if r.len() == tickets.len() => r,
                    Ok(r) => failed(
                        tickets.len(),
                        &format!("{} results for {} steps", r.len(), tickets.len()),
                    ),
                    Err(_) => failed(tickets.len(), "a batched step panicked"),
                };
                q = self.lock();
                q.running = false;
                q.done.extend(tickets.into_iter().zip(results));
                self.batch_done.notify_all();
                continue;
            }
            q = self.batch_done.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }
}

fn failed<O>(n: usize, why: &str) -> Vec<Result<O>> {
    (0..n)
        .map(|_| Err(LmError::Device(format!("a batched step failed: {why}"))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};

    #[test]
    fn every_job_gets_its_own_result_and_waiting_jobs_share_a_batch() {
        let q = Arc::new(StepQueue::<u32, u32>::new(8, Duration::from_micros(100)));
        let batches = Arc::new(AtomicUsize::new(0));
        let widest = Arc::new(AtomicUsize::new(0));
        let start = Arc::new(Barrier::new(6));
        let handles: Vec<_> = (0..6u32)
            .map(|i| {
                let (q, batches, widest, start) =
                    (q.clone(), batches.clone(), widest.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    (0..50u32)
                        .map(|k| {
                            q.submit(i * 1000 + k, 1, |jobs| {
                                batches.fetch_add(1, Ordering::SeqCst);
                                widest.fetch_max(jobs.len(), Ordering::SeqCst);
                                std::thread::sleep(std::time::Duration::from_micros(200));
                                jobs.into_iter().map(|j| Ok(j * 2)).collect()
                            })
                            .unwrap()
                        })
                        .collect::<Vec<u32>>()
                })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            let got = h.join().unwrap();
            let want: Vec<u32> = (0..50).map(|k| (i as u32 * 1000 + k) * 2).collect();
            assert_eq!(got, want, "thread {i} got another thread's results");
        }
        // 300 steps from 6 threads: had nothing been batched there would be 300 batches.
        assert!(batches.load(Ordering::SeqCst) < 300);
        assert!(widest.load(Ordering::SeqCst) > 1);
        assert!(widest.load(Ordering::SeqCst) <= 8);
        let s = q.stats();
        assert_eq!(s.steps, 300);
        assert_eq!(s.batches, batches.load(Ordering::SeqCst) as u64);
    }

    #[test]
    fn a_panicking_batch_fails_its_jobs_and_the_queue_goes_on() {
        let q = StepQueue::<u32, u32>::new(4, Duration::ZERO);
        let e = q.submit(1, 1, |_| panic!("boom")).unwrap_err().to_string();
        assert!(e.contains("panicked"), "{e}");
        let ok = |jobs: Vec<u32>| jobs.into_iter().map(Ok).collect();
        assert_eq!(q.submit(2, 1, ok).unwrap(), 2);
        // A job larger than a batch runs alone.
        assert_eq!(q.submit(4, 9, ok).unwrap(), 4);
        let e = q.submit(3, 1, |_| Vec::new()).unwrap_err().to_string();
        assert!(e.contains("0 results for 1 steps"), "{e}");
    }
}
