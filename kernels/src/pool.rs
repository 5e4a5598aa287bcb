//! A small persistent thread pool for the quantized products (llama.cpp style).
//!
//! * `run(n_chunks, f)` executes `f(0..n_chunks)`; chunks are claimed dynamically from one
//!   atomic word, and the calling thread claims chunks too. A worker that is descheduled
//!   (oversubscribed machine) therefore never delays the caller by more than the chunk it
//!   has actually claimed: unclaimed chunks are simply taken by the caller.
//! * Idle workers spin on the job word (with `spin_loop` hints, then `yield_now`) for
//!   `spin` (default 200 µs), then park: an idle pool costs no CPU.
//! * Concurrent or nested calls (a second caller while a job runs, or `run` called from inside
//!   a chunk) run inline on the calling thread instead of blocking.
//! * A panic in a chunk is caught, the job completes, and the panic is resumed on the caller.

use std::any::Any;
use std::cell::UnsafeCell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

/// Job word: `gen:16 | n_chunks:24 | next:24`.
const IDX_BITS: u32 = 24;
const IDX_MASK: u64 = (1 << IDX_BITS) - 1;
/// Maximum chunks per job.
pub const MAX_CHUNKS: usize = IDX_MASK as usize;

#[inline]
fn pack(gen: u64, n: u64, next: u64) -> u64 {
    ((gen & 0xFFFF) << (2 * IDX_BITS)) | (n << IDX_BITS) | next
}
#[inline]
fn unpack(s: u64) -> (u64, u64, u64) {
    (
        s >> (2 * IDX_BITS),
        (s >> IDX_BITS) & IDX_MASK,
        s & IDX_MASK,
    )
}
#[inline]
fn has_work(s: u64) -> bool {
    let (_, n, next) = unpack(s);
    next < n
}

#[repr(align(128))]
struct Padded<T>(T);

struct JobDesc {
    call: unsafe fn(*const (), usize),
    data: *const (),
}

unsafe fn noop(_: *const (), _: usize) {}

unsafe fn trampoline<F: Fn(usize) + Sync>(data: *const (), i: usize) {
    (*(data as *const F))(i)
}

struct Shared {
    state: Padded<AtomicU64>,
    done: Padded<AtomicUsize>,
    /// Written only by the (single, lock-holding) caller while no chunk of any job is claimed.
    job: UnsafeCell<JobDesc>,
    sleeping: Box<[Padded<AtomicBool>]>,
    stop: AtomicBool,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    spin: Duration,
}

// SAFETY: `job` is written by the caller holding `call_lock` before the Release/SeqCst store
// that publishes the job, and read by workers only after a successful Acquire CAS claiming a
// chunk of that job; the caller does not return (or write `job` again) before every claimed
// chunk is done.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

impl Shared {
    /// Claim one chunk of the current job, if any.
    #[inline]
    fn claim(&self) -> Option<usize> {
        let mut s = self.state.0.load(Ordering::Acquire);
        loop {
            let (g, n, next) = unpack(s);
            if next >= n {
                return None;
            }
            match self.state.0.compare_exchange_weak(
                s,
                pack(g, n, next + 1),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(next as usize),
                Err(cur) => s = cur,
            }
        }
    }

    /// Claim and run chunks until none is left.
    fn work(&self) {
        while let Some(i) = self.claim() {
            // SAFETY: see `unsafe impl Sync for Shared`.
            let (call, data) = unsafe {
                let j = &*self.job.get();
                (j.call, j.data)
            };
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| unsafe { call(data, i) })) {
                let mut slot = self.panic.lock().unwrap_or_else(|e| e.into_inner());
                slot.get_or_insert(p);
            }
            self.done.0.fetch_add(1, Ordering::Release);
        }
    }
}

thread_local! {
    static IN_POOL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn worker_loop(sh: Arc<Shared>, id: usize) {
    IN_POOL.with(|c| c.set(true));
    loop {
        sh.work();
        // Wait for the next job: spin, then yield, then park.
        let start = Instant::now();
        let mut iter = 0u32;
        loop {
            if sh.stop.load(Ordering::Acquire) {
                return;
            }
            if has_work(sh.state.0.load(Ordering::Acquire)) {
                break;
            }
            iter = iter.wrapping_add(1);
            if iter < 2048 {
                std::hint::spin_loop();
                continue;
            }
            if iter.is_multiple_of(64) && start.elapsed() >= sh.spin {
                let flag = &sh.sleeping[id].0;
                flag.store(true, Ordering::SeqCst);
                while !sh.stop.load(Ordering::SeqCst)
                    && !has_work(sh.state.0.load(Ordering::SeqCst))
                {
                    std::thread::park();
                }
                flag.store(false, Ordering::SeqCst);
                break;
            }
            if iter.is_multiple_of(16) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

pub struct KernelPool {
    shared: Arc<Shared>,
    threads: Vec<Thread>,
    handles: Vec<JoinHandle<()>>,
    call_lock: Mutex<u64>,
    n_threads: usize,
}

impl std::fmt::Debug for KernelPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelPool")
            .field("n_threads", &self.n_threads)
            .finish()
    }
}

impl KernelPool {
    /// `n_threads` including the calling thread (so `n_threads - 1` workers are spawned).
    pub fn new(n_threads: usize) -> Self {
        Self::with_spin(n_threads, Duration::from_micros(200))
    }

    /// As [`KernelPool::new`] with a custom idle spin time before workers park.
    pub fn with_spin(n_threads: usize, spin: Duration) -> Self {
        let n_threads = n_threads.max(1);
        let n_workers = n_threads - 1;
        let shared = Arc::new(Shared {
            state: Padded(AtomicU64::new(0)),
            done: Padded(AtomicUsize::new(0)),
            job: UnsafeCell::new(JobDesc {
                call: noop,
                data: std::ptr::null(),
            }),
            sleeping: (0..n_workers)
                .map(|_| Padded(AtomicBool::new(false)))
                .collect(),
            stop: AtomicBool::new(false),
            panic: Mutex::new(None),
            spin,
        });
        let handles: Vec<_> = (0..n_workers)
            .map(|id| {
                let sh = shared.clone();
                std::thread::Builder::new()
                    .name(format!("lm-kernel-{id}"))
                    .spawn(move || worker_loop(sh, id))
                    .expect("spawn kernel pool worker")
            })
            .collect();
        let threads = handles.iter().map(|h| h.thread().clone()).collect();
        Self {
            shared,
            threads,
            handles,
            call_lock: Mutex::new(0),
            n_threads,
        }
    }

    /// A process-wide pool sized by `LM_NUM_THREADS`, else `CANDLE_NUM_THREADS` (what
    /// `lm::threads::set_cpu_threads` sets), else the available parallelism.
    pub fn global() -> &'static KernelPool {
        static POOL: OnceLock<KernelPool> = OnceLock::new();
        POOL.get_or_init(|| {
            let env = |k: &str| {
                std::env::var(k)
                    .ok()
                    .and_then(|s| s.parse::<usize>().ok())
                    .filter(|&n| n > 0)
            };
            let n = env("LM_NUM_THREADS")
                .or_else(|| env("CANDLE_NUM_THREADS"))
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            KernelPool::new(n)
        })
    }

    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Run `f(i)` for every `i in 0..n_chunks`, on the pool and the calling thread.
    pub fn run<F: Fn(usize) + Sync>(&self, n_chunks: usize, f: F) {
        if n_chunks == 0 {
            return;
        }
        let inline = self.n_threads == 1 || n_chunks == 1 || IN_POOL.with(|c| c.get());
        let guard = if inline {
            None
        } else {
            match self.call_lock.try_lock() {
                Ok(g) => Some(g),
                Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => None,
            }
        };
        let Some(mut gen) = guard else {
            (0..n_chunks).for_each(f);
            return;
        };
        assert!(n_chunks <= MAX_CHUNKS, "too many chunks: {n_chunks}");
        let sh = &*self.shared;
        *gen = gen.wrapping_add(1);
        // SAFETY: the previous job is complete (every chunk claimed and done), so no worker reads
        // `job` until the store below publishes new claimable chunks.
        unsafe {
            *sh.job.get() = JobDesc {
                call: trampoline::<F>,
                data: &f as *const F as *const (),
            };
        }
        sh.done.0.store(0, Ordering::Relaxed);
        sh.state
            .0
            .store(pack(*gen, n_chunks as u64, 0), Ordering::SeqCst);
        for (flag, t) in sh.sleeping.iter().zip(&self.threads) {
            if flag.0.load(Ordering::SeqCst) {
                t.unpark();
            }
        }
        IN_POOL.with(|c| c.set(true));
        sh.work();
        IN_POOL.with(|c| c.set(false));
        // Wait for chunks claimed by workers.
        let mut iter = 0u32;
        while sh.done.0.load(Ordering::Acquire) < n_chunks {
            iter = iter.wrapping_add(1);
            if iter < 4096 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let p = sh.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(gen);
        if let Some(p) = p {
            resume_unwind(p);
        }
    }
}

impl Drop for KernelPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in &self.threads {
            t.unpark();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}
