//! The threads a provider's blocking calls run on: one pool per provider, sized by its
//! `max_concurrency`, instead of tokio's shared blocking pool.
//!
//! A provider call is a synchronous call into plugin code (or a worker's socket) that may take
//! a microsecond or hang for ever, so it never runs on an async worker. Handing it to another
//! thread and back costs two wake-ups; on this machine's kind that is most of a fast call's
//! cost. So both sides wait a little before sleeping: a pool thread that finished a call looks
//! for the next one for [`SPIN`] before it parks (one thread at a time; the others park at
//! once), and the caller ([`Pending`]) yields to its runtime for up to [`SPIN`] before it waits
//! to be woken — calls in a row then cost no system call at all, and a caller never holds its
//! worker thread.
//!
//! Invariants: a call's thread is its own until the call returns (a call that overran its
//! deadline keeps its thread, and the caller's `max_concurrency` permit bounds how many can
//! be held); a panic that escapes a call is caught and reported as a lost answer, and the
//! thread goes on; threads that stay idle for [`IDLE`] exit.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// How long each side looks for the other before sleeping.
pub const SPIN: Duration = Duration::from_micros(50);
/// How long a thread with nothing to do stays.
pub const IDLE: Duration = Duration::from_secs(30);

type Job = Box<dyn FnOnce() + Send + 'static>;

struct Shared {
    name: String,
    jobs: Mutex<VecDeque<Job>>,
    /// Jobs queued (read without the lock by spinning threads).
    queued: AtomicUsize,
    wake: Condvar,
    /// Threads parked on `wake`.
    parked: AtomicUsize,
    /// Threads alive.
    threads: AtomicUsize,
    /// Threads not running a job.
    idle: AtomicUsize,
    /// A thread is looking for the next call: the others park at once (on two cores, many
    /// spinning threads take the CPU the calls' own work needs).
    spinning: AtomicBool,
}

/// A provider's call threads.
#[derive(Clone)]
pub struct CallPool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CallPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallPool")
            .field("name", &self.shared.name)
            .field("threads", &self.shared.threads.load(Ordering::Relaxed))
            .finish()
    }
}

impl CallPool {
    /// A pool whose threads are named `payhost-call-<name>`; threads start on demand.
    pub fn new(name: &str) -> CallPool {
        CallPool {
            shared: Arc::new(Shared {
                name: name.to_owned(),
                jobs: Mutex::new(VecDeque::new()),
                queued: AtomicUsize::new(0),
                wake: Condvar::new(),
                parked: AtomicUsize::new(0),
                threads: AtomicUsize::new(0),
                idle: AtomicUsize::new(0),
                spinning: AtomicBool::new(false),
            }),
        }
    }

    /// Runs `f` on a pool thread; its result arrives through the returned [`Pending`].
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Pending<T> {
        let slot = Arc::new(Slot::default());
        let filled = slot.clone();
        let job: Job = Box::new(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            filled.fill(result.ok());
        });
        let s = &self.shared;
        s.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(job);
        s.queued.fetch_add(1, Ordering::SeqCst);
        if s.parked.load(Ordering::SeqCst) > 0 {
            s.wake.notify_one();
        }
        // More calls waiting than threads free to take them: one more thread. A provider's
        // permits bound how many calls are queued or running, so the pool never grows past
        // its max_concurrency by more than a race.
        if s.queued.load(Ordering::SeqCst) > s.idle.load(Ordering::SeqCst) {
            self.spawn();
        }
        Pending {
            slot,
            spin_until: None,
        }
    }

    fn spawn(&self) {
        let shared = self.shared.clone();
        shared.threads.fetch_add(1, Ordering::SeqCst);
        shared.idle.fetch_add(1, Ordering::SeqCst);
        let spawned = std::thread::Builder::new()
            .name(format!("payhost-call-{}", shared.name))
            .spawn(move || work(&shared));
        if spawned.is_err() {
            // The queued job runs on an existing thread when one is free.
            self.shared.threads.fetch_sub(1, Ordering::SeqCst);
            self.shared.idle.fetch_sub(1, Ordering::SeqCst);
            tracing::error!(provider = %self.shared.name, "cannot start a provider call thread");
        }
    }
}

fn take(s: &Shared) -> Option<Job> {
    if s.queued.load(Ordering::SeqCst) == 0 {
        return None;
    }
    let job = s.jobs.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
    if job.is_some() {
        s.queued.fetch_sub(1, Ordering::SeqCst);
    }
    job
}

fn work(s: &Shared) {
    loop {
        let job = take(s).or_else(|| {
            // One thread at a time looks for the next call a moment before sleeping.
            if !s.spinning.swap(true, Ordering::AcqRel) {
                let found = spin_for_job(s);
                s.spinning.store(false, Ordering::Release);
                if found.is_some() {
                    return found;
                }
            }
            let mut jobs = s.jobs.lock().unwrap_or_else(|e| e.into_inner());
            s.parked.fetch_add(1, Ordering::SeqCst);
            let deadline = Instant::now() + IDLE;
            let job = loop {
                if let Some(job) = jobs.pop_front() {
                    s.queued.fetch_sub(1, Ordering::SeqCst);
                    break Some(job);
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break None;
                }
                jobs = s
                    .wake
                    .wait_timeout(jobs, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            };
            s.parked.fetch_sub(1, Ordering::SeqCst);
            job
        });
        let Some(job) = job else {
            // Idle for long: this thread goes (a new call starts another).
            s.idle.fetch_sub(1, Ordering::SeqCst);
            s.threads.fetch_sub(1, Ordering::SeqCst);
            // A call queued between the last look and now still gets a thread.
            if s.queued.load(Ordering::SeqCst) > s.idle.load(Ordering::SeqCst) {
                continue_elsewhere(s);
            }
            return;
        };
        s.idle.fetch_sub(1, Ordering::SeqCst);
        job();
        s.idle.fetch_add(1, Ordering::SeqCst);
    }
}

/// Looks for a queued call for [`SPIN`] (reading the clock every few looks: it costs more
/// than a look).
fn spin_for_job(s: &Shared) -> Option<Job> {
    let until = Instant::now() + SPIN;
    loop {
        for _ in 0..16 {
            if let Some(job) = take(s) {
                return Some(job);
            }
            std::hint::spin_loop();
        }
        if Instant::now() >= until {
            return None;
        }
    }
}

/// Runs what is queued on this thread after all, when it was about to exit with work left.
fn continue_elsewhere(s: &Shared) {
    s.threads.fetch_add(1, Ordering::SeqCst);
    s.idle.fetch_add(1, Ordering::SeqCst);
    work(s);
}

/// Where a call's result lands, and who to wake.
struct Slot<T> {
    state: Mutex<(Option<Option<T>>, Option<std::task::Waker>)>,
    ready: std::sync::atomic::AtomicBool,
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Slot {
            state: Mutex::new((None, None)),
            ready: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl<T> Slot<T> {
    /// `None`: the call panicked past every guard.
    fn fill(&self, value: Option<T>) {
        let waker = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.0 = Some(value);
            self.ready.store(true, Ordering::Release);
            state.1.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// A call running on a pool thread. Resolves to `None` if the call panicked past every guard.
/// Dropping it does not stop the call (nothing can): the result is dropped when it comes.
pub struct Pending<T> {
    slot: Arc<Slot<T>>,
    spin_until: Option<Instant>,
}

impl<T> Future for Pending<T> {
    type Output = Option<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let this = self.get_mut();
        if this.slot.ready.load(Ordering::Acquire) {
            let mut state = this.slot.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(value) = state.0.take() {
                return Poll::Ready(value);
            }
        }
        let until = *this.spin_until.get_or_insert_with(|| Instant::now() + SPIN);
        if Instant::now() < until {
            // Let the runtime run whatever else is ready, then look again: a fast call is
            // answered without this task ever sleeping.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let mut state = this.slot.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(value) = state.0.take() {
            return Poll::Ready(value);
        }
        state.1 = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::{CallPool, Duration, Instant};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_run_on_the_pool_and_a_panic_is_a_lost_answer() {
        let pool = CallPool::new("test");
        let name = pool
            .run(|| std::thread::current().name().map(str::to_owned))
            .await;
        assert_eq!(name, Some(Some("payhost-call-test".into())));
        let panicked: Option<()> = pool.run(|| panic!("in the call")).await;
        assert_eq!(panicked, None);
        // The thread survived the panic and goes on serving.
        assert_eq!(pool.run(|| 2 + 2).await, Some(4));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_call_holds_its_thread_and_others_get_theirs() {
        let pool = CallPool::new("slow");
        let slow = pool.run(|| std::thread::sleep(Duration::from_millis(300)));
        let started = Instant::now();
        let fast: Vec<_> = (0..8).map(|i| pool.run(move || i * 2)).collect();
        for (i, f) in fast.into_iter().enumerate() {
            assert_eq!(f.await, Some(i * 2));
        }
        assert!(
            started.elapsed() < Duration::from_millis(250),
            "not behind the slow one"
        );
        assert_eq!(slow.await, Some(()));
    }
}
