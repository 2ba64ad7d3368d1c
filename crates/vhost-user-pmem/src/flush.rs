//! The flush engine: answers flush requests with fdatasyncs of the backing file, in a worker
//! thread so that a slow disk never stalls the vring event loop.
//!
//! Requests are served by group commit. The worker takes every request that is waiting, starts
//! one fdatasync, and answers all of them with its result. A request that arrives while an
//! fdatasync runs waits for the next one, so no request is ever answered by an fdatasync that
//! started before the request was taken off the queue.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, error, warn};
use vm_memory::GuestAddress;

use crate::backing::BackingFile;
use crate::device::{RESP_ERR, RESP_OK};
use crate::queue::{complete, notify, MemGuard, Vring};
use crate::stats::Stats;

/// A flush request taken off the queue and waiting for its fdatasync.
pub struct FlushJob {
    pub vring: Vring,
    /// Identifies the vring, so that one notification per vring ends a batch.
    pub vring_id: u64,
    pub mem: MemGuard,
    pub head: u16,
    pub status: GuestAddress,
}

/// Counts requests handed to the worker and not yet answered, so that the device can be
/// stopped only once every accepted request has its answer.
#[derive(Default)]
struct Inflight {
    count: Mutex<usize>,
    idle: Condvar,
}

pub struct FlushEngine {
    tx: Mutex<Sender<FlushJob>>,
    inflight: Arc<Inflight>,
    stats: Arc<Stats>,
}

impl FlushEngine {
    pub fn new(backing: Arc<BackingFile>, stats: Arc<Stats>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let inflight = Arc::new(Inflight::default());
        let worker = Worker {
            rx,
            backing,
            inflight: inflight.clone(),
            stats: stats.clone(),
        };
        thread::Builder::new()
            .name("pmem-flush".into())
            .spawn(move || worker.run())?;
        Ok(FlushEngine {
            tx: Mutex::new(tx),
            inflight,
            stats,
        })
    }

    pub fn submit(&self, job: FlushJob) {
        Stats::add(&self.stats.requests, 1);
        *lock(&self.inflight.count) += 1;
        if let Err(mpsc::SendError(job)) = lock(&self.tx).send(job) {
            // Only happens if the worker died, which it does not do by design; still, the guest
            // must get an answer rather than wait forever.
            error!("flush worker is gone; failing request {}", job.head);
            complete(&job.vring, &job.mem, job.head, Some(job.status), RESP_ERR);
            notify(&job.vring);
            finish(&self.inflight, 1);
        }
    }

    /// Blocks until every submitted request has been answered.
    pub fn wait_idle(&self) {
        let mut count = lock(&self.inflight.count);
        let start = Instant::now();
        while *count > 0 {
            let (c, timeout) = self
                .inflight
                .idle
                .wait_timeout(count, Duration::from_secs(5))
                .unwrap_or_else(|e| e.into_inner());
            count = c;
            if timeout.timed_out() && *count > 0 {
                warn!(
                    "device stop is waiting for {} flush(es) still in progress ({:.0?} so far)",
                    *count,
                    start.elapsed()
                );
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn finish(inflight: &Inflight, n: usize) {
    let mut count = lock(&inflight.count);
    *count = count.saturating_sub(n);
    if *count == 0 {
        inflight.idle.notify_all();
    }
}

struct Worker {
    rx: Receiver<FlushJob>,
    backing: Arc<BackingFile>,
    inflight: Arc<Inflight>,
    stats: Arc<Stats>,
}

impl Worker {
    fn run(self) {
        let mut batch = Vec::new();
        while let Ok(first) = self.rx.recv() {
            batch.push(first);
            batch.extend(self.rx.try_iter());
            self.serve(&mut batch);
        }
    }

    fn serve(&self, batch: &mut Vec<FlushJob>) {
        let start = Instant::now();
        let result = self.backing.sync();
        let took = start.elapsed();
        Stats::add(&self.stats.fdatasyncs, 1);
        Stats::add(&self.stats.coalesced, batch.len() as u64 - 1);
        let code = match &result {
            Ok(()) => RESP_OK,
            Err(_) => {
                Stats::add(&self.stats.errors, batch.len() as u64);
                RESP_ERR
            }
        };
        debug!(
            "fdatasync answered {} request(s) in {} us: {}",
            batch.len(),
            took.as_micros(),
            if result.is_ok() { "ok" } else { "failed" }
        );
        if let Err(f) = &result {
            log_refused(&f.0, batch.len());
        }

        let mut last_vring = None;
        for job in batch.iter() {
            complete(&job.vring, &job.mem, job.head, Some(job.status), code);
            if last_vring.is_some_and(|(id, _)| id != job.vring_id) {
                if let Some((_, v)) = last_vring.take() {
                    notify(v);
                }
            }
            last_vring = Some((job.vring_id, &job.vring));
        }
        if let Some((_, v)) = last_vring {
            notify(v);
        }
        let n = batch.len();
        batch.clear();
        finish(&self.inflight, n);
    }
}

static REFUSED: AtomicU64 = AtomicU64::new(0);

/// Every refused flush is an error the operator must see, but a guest retrying in a loop must not
/// fill the disk with the same line.
fn log_refused(reason: &str, n: usize) {
    static LIMIT: crate::ratelimit::RateLimit =
        crate::ratelimit::RateLimit::new(Duration::from_secs(10), 3);
    let total = REFUSED.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
    if let Some(suppressed) = LIMIT.check() {
        error!(
            "answered {n} flush request(s) with an error ({total} in all, {suppressed} messages \
             suppressed): {reason}"
        );
    }
}
