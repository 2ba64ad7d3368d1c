//! The flush engine: answers flush requests with fdatasyncs of the backing file, in worker
//! threads so that a slow disk never stalls the vring event loop.
//!
//! Three ways to do it ([`FlushMode`]):
//! - `group` (default): group commit. A request that finds no fdatasync running and none
//!   queued is answered on the thread that submits it (the vring thread), which saves the two
//!   thread wakeups a handover costs. One that arrives while an fdatasync runs waits on the
//!   queue; when that fdatasync ends, one worker takes every request waiting, starts one
//!   fdatasync, and answers all of them with its result. One fdatasync runs at a time.
//! - `serial`: one worker, one fdatasync per request, one at a time (Cloud Hypervisor, crosvm).
//! - `parallel`: [`PARALLEL_THREADS`] workers, each taking one request and making its own
//!   fdatasync, so that up to that many run at once (QEMU's built-in virtio-pmem).
//!
//! All three share one queue and differ only in how many workers take from it and how much each
//! takes. In every mode a request is answered only by an fdatasync that started after the
//! request was taken off the virtqueue: a worker takes requests from the queue before it starts
//! the fdatasync that answers them, and a request is on the queue only once it has been popped;
//! an inline fdatasync starts inside the submit of requests already popped.
//! The engine checks this for every request anyway and counts breaches in
//! [`Stats::order_violations`].
//!
//! With `--flush-rate-limit` a token bucket ([`TokenBucket`]) meters the fdatasyncs of every
//! mode: a worker takes its requests off the queue only once the bucket lets the next fdatasync
//! start, and waits (the queue lock released) until it does. Requests that arrive meanwhile stay
//! on the queue, so in group mode they join the delayed fdatasync; the ordering rule holds as
//! before, since the requests are still taken before the fdatasync starts. One worker waits for
//! the token at a time, with a timeout; the others sleep as usual, and a device with nothing
//! queued has no waiter at all.
//! An inline fdatasync takes a token too; when there is none, the requests go to the worker
//! rather than hold the vring thread until the token is due.
//!
//! The engine is generic over the sync ([`Syncer`]) and the request ([`Job`]) so that unit
//! tests can drive it with a sync whose timing they control.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{debug, error, log_enabled, warn, Level};
use vm_memory::GuestAddress;

use crate::backing::{BackingFile, FlushFailure};
use crate::flush_limit::{FlushRateLimit, TokenBucket};
use crate::modes::{FlushMode, PARALLEL_THREADS};
use crate::queue::{complete, notify, AfterAnswer, AnswerTicket, MemGuard, Vring};
use crate::stats::{PerConnection, Stats};
use crate::sync::{lock, unpoison};
use crate::virtio::{RESP_ERR, RESP_OK};

/// Worker threads of `mode`.
fn workers(mode: FlushMode) -> usize {
    match mode {
        FlushMode::Group | FlushMode::Serial => 1,
        FlushMode::Parallel => PARALLEL_THREADS,
    }
}

/// Most requests one fdatasync of `mode` answers.
fn batch_limit(mode: FlushMode) -> usize {
    match mode {
        FlushMode::Group => usize::MAX,
        FlushMode::Serial | FlushMode::Parallel => 1,
    }
}

/// Makes everything written to the device so far durable.
pub trait Syncer: Send + Sync + 'static {
    fn sync(&self) -> Result<(), FlushFailure>;
}

impl Syncer for BackingFile {
    fn sync(&self) -> Result<(), FlushFailure> {
        BackingFile::sync(self)
    }
}

/// A request waiting for its answer.
pub trait Job: Send + 'static {
    /// Writes the status and puts the request on the used ring, without notifying the guest.
    fn complete(&self, code: u32);
    /// Tells the guest about what [`Self::complete`] put on the ring.
    fn notify(&self);
    /// The connection the request came from (each has its own queue): one notification per
    /// connection ends a batch, and the per-connection counts go to it.
    fn conn_id(&self) -> u64;
}

/// A flush request taken off the virtqueue and waiting for its fdatasync.
pub struct FlushJob {
    pub vring: Vring,
    /// The connection whose vring this is (see [`Job::conn_id`]).
    pub conn_id: u64,
    pub mem: MemGuard,
    pub head: u16,
    pub status: GuestAddress,
    /// Whether the ring may still take the answer once the fdatasync ends.
    pub ticket: AnswerTicket,
    /// Run once the answer is notified (`--poll-us`), if set.
    pub after_answer: Option<AfterAnswer>,
}

impl Job for FlushJob {
    fn complete(&self, code: u32) {
        let written = self
            .ticket
            .answer(|| complete(&self.vring, &self.mem, self.head, Some(self.status), code));
        if written.is_none() {
            debug!(
                "connection {}: answer to chain {} dropped, its ring was reset or is gone",
                self.conn_id, self.head
            );
        }
    }

    fn notify(&self) {
        let notified = self.ticket.answer(|| notify(&self.vring));
        // A connection that has ended is not polled.
        if let (Some(()), Some(then)) = (notified, &self.after_answer) {
            then();
        }
    }

    fn conn_id(&self) -> u64 {
        self.conn_id
    }
}

struct Entry<J> {
    job: J,
    /// When the request was taken off the virtqueue.
    popped: Instant,
}

struct State<J> {
    queue: VecDeque<Entry<J>>,
    /// Requests submitted whose answer is not yet written and notified: what a device stop
    /// must wait for before the ring's memory may go.
    unfinished: usize,
    closed: bool,
    /// `--flush-rate-limit`, if given.
    bucket: Option<TokenBucket>,
    /// A worker is in a timed wait for the bucket's next token; the others, finding it empty
    /// too, sleep untimed rather than all wake when the token is due.
    token_waiter: bool,
    /// Group mode: an fdatasync runs, inline or on the worker. The worker takes nothing while
    /// it is set, so that one fdatasync runs at a time and the next one takes every request
    /// that arrived during this one.
    syncing: bool,
}

struct Shared<J> {
    state: Mutex<State<J>>,
    /// Requests submitted whose answer is not yet decided: counted out before the answer is
    /// written, so a frontend that has seen its answer and then reads the metrics never finds
    /// the request still in flight. (`State::unfinished` counts it out only after the notify.)
    in_flight: AtomicUsize,
    /// Workers wait here for requests.
    work: Condvar,
    /// [`FlushEngine::wait_idle`] waits here for `unfinished` to reach 0.
    idle: Condvar,
}

pub struct FlushEngine<S: Syncer = BackingFile, J: Job = FlushJob> {
    mode: FlushMode,
    limit: Option<FlushRateLimit>,
    shared: Arc<Shared<J>>,
    workers: Vec<JoinHandle<()>>,
    stats: Arc<Stats>,
    /// Serves group mode's inline fdatasyncs on the submitting thread.
    inline: Worker<S, J>,
}

impl<S: Syncer, J: Job> FlushEngine<S, J> {
    /// Starts the workers of `mode`, their fdatasyncs held to `limit` if one is given. They
    /// sleep on a condition variable until a request arrives, so an idle device costs no
    /// wakeups.
    pub fn new(
        mode: FlushMode,
        limit: Option<FlushRateLimit>,
        syncer: Arc<S>,
        stats: Arc<Stats>,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                unfinished: 0,
                closed: false,
                bucket: limit.map(TokenBucket::new),
                token_waiter: false,
                syncing: false,
            }),
            in_flight: AtomicUsize::new(0),
            work: Condvar::new(),
            idle: Condvar::new(),
        });
        let inline = Worker {
            mode,
            shared: shared.clone(),
            syncer,
            stats: stats.clone(),
            seq: Arc::new(AtomicU64::new(0)),
        };
        let mut engine = FlushEngine {
            mode,
            limit,
            shared,
            workers: Vec::new(),
            stats,
            inline,
        };
        for i in 0..workers(mode) {
            let worker = engine.inline.clone();
            let name = match mode {
                FlushMode::Parallel => format!("pmem-flush-{i}"),
                _ => "pmem-flush".to_string(),
            };
            // On failure, dropping `engine` stops the workers already started.
            let handle = thread::Builder::new()
                .name(name)
                .spawn(move || worker.run())?;
            engine.workers.push(handle);
        }
        Ok(engine)
    }

    pub fn mode(&self) -> FlushMode {
        self.mode
    }

    pub fn rate_limit(&self) -> Option<FlushRateLimit> {
        self.limit
    }

    /// Hands a request to the engine. `popped` is when it was taken off the virtqueue; the
    /// fdatasync that answers it will start after that.
    pub fn submit(&self, job: J, popped: Instant) {
        self.submit_all(std::iter::once(job), popped);
    }

    /// Hands over every request taken off the virtqueue in one pass, at once: a worker that
    /// wakes up for the first of them then finds all of them, and in group mode one fdatasync
    /// answers them together instead of the first alone and the rest one fdatasync later.
    ///
    /// In group mode, when no fdatasync runs, none is queued and the rate limit has a token,
    /// the requests are answered here, on the caller's thread, before this returns.
    pub fn submit_all(&self, jobs: impl IntoIterator<Item = J>, popped: Instant) {
        let mut batch: Vec<Entry<J>> = jobs.into_iter().map(|job| Entry { job, popped }).collect();
        let n = batch.len();
        if n == 0 {
            return;
        }
        let mut state = lock(&self.shared.state);
        state.unfinished += n;
        self.shared.in_flight.fetch_add(n, Ordering::Relaxed);
        // Counted before any answer can be written, so no answer precedes its count.
        Stats::add(&self.stats.requests, n as u64);
        self.stats.add_for_each(
            batch.iter().map(|e| e.job.conn_id()),
            PerConnection::Requests,
        );
        if self.mode == FlushMode::Group && !state.syncing && state.queue.is_empty() {
            // Without a token the worker waits for one, not the vring thread: a guest held
            // to its rate must not also stop the ring from being served.
            let now = Instant::now();
            if state.bucket.as_mut().is_none_or(|b| b.take(now).is_ok()) {
                state.syncing = true;
                drop(state);
                // The requests were popped before `serve` starts its fdatasync, as the rule
                // asks; `serve` checks it all the same.
                self.inline.serve(&mut batch);
                return;
            }
        }
        state.queue.extend(batch);
        let syncing = state.syncing;
        drop(state);
        if self.mode == FlushMode::Group && syncing {
            // The fdatasync running wakes the worker when it ends.
            return;
        }
        // One worker per request, as far as there are workers; waking more would only have
        // them find the queue empty.
        for _ in 0..n.min(self.workers.len()) {
            self.shared.work.notify_one();
        }
    }

    /// Requests submitted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Acquire)
    }

    /// Blocks until every submitted request has been answered.
    pub fn wait_idle(&self) {
        let mut state = lock(&self.shared.state);
        let start = Instant::now();
        while state.unfinished > 0 {
            let (s, timeout) =
                unpoison(self.shared.idle.wait_timeout(state, Duration::from_secs(5)));
            state = s;
            if timeout.timed_out() && state.unfinished > 0 {
                warn!(
                    "device stop is waiting for {} flush(es) still in progress ({:.0?} so far)",
                    state.unfinished,
                    start.elapsed()
                );
            }
        }
    }
}

impl<S: Syncer, J: Job> Drop for FlushEngine<S, J> {
    /// Lets the workers answer what is queued, then stops them. The daemon never drops its
    /// engine; tests do.
    fn drop(&mut self) {
        lock(&self.shared.state).closed = true;
        self.shared.work.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

struct Worker<S, J> {
    mode: FlushMode,
    shared: Arc<Shared<J>>,
    syncer: Arc<S>,
    stats: Arc<Stats>,
    /// Numbers the fdatasyncs of all workers, for the debug log.
    seq: Arc<AtomicU64>,
}

impl<S, J> Clone for Worker<S, J> {
    fn clone(&self) -> Self {
        Worker {
            mode: self.mode,
            shared: self.shared.clone(),
            syncer: self.syncer.clone(),
            stats: self.stats.clone(),
            seq: self.seq.clone(),
        }
    }
}

impl<S: Syncer, J: Job> Worker<S, J> {
    fn run(self) {
        let mut batch = Vec::new();
        while self.take(&mut batch) {
            self.serve(&mut batch);
        }
    }

    /// Waits for requests, and for the rate limit to let one more fdatasync start, then moves
    /// up to the mode's batch limit of them into `batch`. Returns false once the engine is
    /// closed and nothing is left.
    fn take(&self, batch: &mut Vec<Entry<J>>) -> bool {
        let mut state = lock(&self.shared.state);
        // When the limit first stopped this worker from starting a sync it had requests for:
        // the delay it counts is its own, not time it spent busy or asleep for other reasons.
        let mut refused_since: Option<Instant> = None;
        // Whether this worker is the one in `State::token_waiter`.
        let mut waiting = false;
        loop {
            if state.queue.is_empty() || state.syncing {
                refused_since = None;
                if std::mem::take(&mut waiting) {
                    // Another worker got a token and took what this one waited to serve.
                    state.token_waiter = false;
                }
                if state.closed && state.queue.is_empty() {
                    // Workers that went back to sleep behind the token's waiter missed the
                    // close; each one that leaves wakes the next.
                    self.shared.work.notify_one();
                    return false;
                }
                state = unpoison(self.shared.work.wait(state));
                continue;
            }
            let now = Instant::now();
            match state.bucket.as_mut().map_or(Ok(()), |b| b.take(now)) {
                Ok(()) => {
                    if waiting {
                        state.token_waiter = false;
                    }
                    let n = state.queue.len().min(batch_limit(self.mode));
                    batch.extend(state.queue.drain(..n));
                    state.syncing = self.mode == FlushMode::Group;
                    if state.bucket.is_some() && !state.queue.is_empty() {
                        // The rest need a worker to wait for the next token, and the others
                        // sleep until told.
                        self.shared.work.notify_one();
                    }
                    drop(state);
                    if let Some(since) = refused_since {
                        // A request popped during the wait was held back only from its pop.
                        let since = batch.first().map_or(since, |e| e.popped.max(since));
                        self.stats
                            .record_delay(n, now.saturating_duration_since(since));
                    }
                    return true;
                }
                // The timed wait ends when the token is due; requests that arrive meanwhile
                // are still on the queue then, and a group-mode batch takes them along.
                Err(wait) if waiting || !state.token_waiter => {
                    refused_since.get_or_insert(now);
                    waiting = true;
                    state.token_waiter = true;
                    state = unpoison(self.shared.work.wait_timeout(state, wait)).0;
                }
                Err(_) => {
                    refused_since.get_or_insert(now);
                    state = unpoison(self.shared.work.wait(state));
                }
            }
        }
    }

    fn serve(&self, batch: &mut Vec<Entry<J>>) {
        // Every request in `batch` was popped before it was queued and taken, so before this
        // instant; the check below makes that visible in the metrics.
        let start = Instant::now();
        let result = self.syncer.sync();
        let took = start.elapsed();
        let n = batch.len();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;

        let late = batch.iter().filter(|e| e.popped > start).count();
        if late > 0 {
            Stats::add(&self.stats.order_violations, late as u64);
            error!("BUG: fdatasync #{seq} started before {late} of the requests it answers were popped");
        }
        Stats::add(&self.stats.fdatasyncs, 1);
        Stats::add(&self.stats.coalesced, n as u64 - 1);
        self.stats.record_batch(n);
        self.stats.record_sync(took);
        let code = match &result {
            Ok(()) => RESP_OK,
            Err(_) => {
                Stats::add(&self.stats.errors, n as u64);
                self.stats
                    .add_for_each(batch.iter().map(|e| e.job.conn_id()), PerConnection::Errors);
                RESP_ERR
            }
        };
        if log_enabled!(Level::Debug) {
            // The ordering evidence: the start of each fdatasync against the pop times of the
            // requests it answers, all in microseconds since the daemon started.
            let oldest = batch.iter().map(|e| e.popped).min().unwrap_or(start);
            let newest = batch.iter().map(|e| e.popped).max().unwrap_or(start);
            debug!(
                "fdatasync #{seq} ({}) started at {} us, took {} us, answered {n} request(s) popped at {}..{} us: {}",
                self.mode,
                self.stats.since_epoch_us(start),
                took.as_micros(),
                self.stats.since_epoch_us(oldest),
                self.stats.since_epoch_us(newest),
                if result.is_ok() { "ok" } else { "failed" }
            );
        }
        if let Err(f) = &result {
            log_refused(&f.0, n);
        }

        // Recorded before the answers are visible, so that whoever sees an answer and then
        // asks for the metrics finds it counted.
        let answered = Instant::now();
        self.stats
            .record_requests(batch.iter().map(|e| answered.duration_since(e.popped)));
        self.shared.in_flight.fetch_sub(n, Ordering::Release);

        // Complete everything first and notify once per queue: the guest then takes the whole
        // batch with one interrupt.
        let mut last: Option<&J> = None;
        for e in batch.iter() {
            e.job.complete(code);
            if let Some(prev) = last.filter(|p| p.conn_id() != e.job.conn_id()) {
                prev.notify();
            }
            last = Some(&e.job);
        }
        if let Some(prev) = last {
            prev.notify();
        }
        batch.clear();

        let mut state = lock(&self.shared.state);
        state.unfinished = state.unfinished.saturating_sub(n);
        if state.unfinished == 0 {
            self.shared.idle.notify_all();
        }
        if std::mem::take(&mut state.syncing) && !state.queue.is_empty() {
            // Requests that arrived during this fdatasync: the worker's turn.
            self.shared.work.notify_one();
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::sync::mpsc::{self, Receiver, Sender};

    use crate::queue::AnswerGate;

    thread_local! {
        /// Start of the fdatasync this worker thread is serving (or last served); the fake job
        /// reads it when it is completed, which happens on the same thread right after.
        static CURRENT_SYNC: Cell<Option<(u64, Instant)>> = const { Cell::new(None) };
    }

    /// A sync whose timing the test controls: each call announces its start and then waits
    /// for the test to let it finish with the result the test chooses. Like
    /// `BackingFile::sync`, it latches the first failure: every later call returns it at once.
    struct GatedSync {
        seq: AtomicU64,
        started: Mutex<Sender<u64>>,
        release: Mutex<Receiver<Result<(), FlushFailure>>>,
        latched: Mutex<Option<FlushFailure>>,
    }

    impl Syncer for GatedSync {
        fn sync(&self) -> Result<(), FlushFailure> {
            let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
            CURRENT_SYNC.with(|c| c.set(Some((seq, Instant::now()))));
            if let Some(f) = lock(&self.latched).clone() {
                return Err(f);
            }
            lock(&self.started).send(seq).unwrap();
            let result = lock(&self.release).recv().unwrap();
            if let Err(f) = &result {
                *lock(&self.latched) = Some(f.clone());
            }
            result
        }
    }

    /// A sync that sleeps for a pseudo-random time; counts how many run at once.
    struct SleepySync {
        seq: AtomicU64,
        running: AtomicU64,
        max_running: AtomicU64,
    }

    impl Syncer for SleepySync {
        fn sync(&self) -> Result<(), FlushFailure> {
            let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
            CURRENT_SYNC.with(|c| c.set(Some((seq, Instant::now()))));
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_running.fetch_max(now, Ordering::SeqCst);
            thread::sleep(Duration::from_micros(200 + (seq * 7919) % 1500));
            self.running.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Answer {
        id: usize,
        code: u32,
        sync_seq: u64,
        sync_start: Instant,
        /// The thread that answered.
        thread: thread::ThreadId,
    }

    struct FakeJob {
        id: usize,
        answers: Sender<Answer>,
        /// Where the ring's gate is modelled; none means the ring always takes the answer.
        ticket: Option<AnswerTicket>,
    }

    impl FakeJob {
        fn new(id: usize, answers: &Sender<Answer>) -> FakeJob {
            FakeJob {
                id,
                answers: answers.clone(),
                ticket: None,
            }
        }
    }

    impl Job for FakeJob {
        fn complete(&self, code: u32) {
            let (sync_seq, sync_start) = CURRENT_SYNC.with(|c| c.get()).expect("inside a sync");
            let answer = Answer {
                id: self.id,
                code,
                sync_seq,
                sync_start,
                thread: thread::current().id(),
            };
            if self
                .ticket
                .as_ref()
                .is_none_or(|t| t.answer(|| ()).is_some())
            {
                self.answers.send(answer).unwrap();
            }
        }
        fn notify(&self) {}
        fn conn_id(&self) -> u64 {
            0
        }
    }

    struct Gated {
        // Dropped before the engine, so that a failed test cannot leave a worker waiting for
        // a release while the engine's drop waits for the worker.
        release: Sender<Result<(), FlushFailure>>,
        engine: Arc<FlushEngine<GatedSync, FakeJob>>,
        stats: Arc<Stats>,
        started: Receiver<u64>,
        answers: Receiver<Answer>,
        answers_tx: Sender<Answer>,
        popped: Vec<Instant>,
    }

    impl Gated {
        fn new(mode: FlushMode) -> Self {
            Gated::limited(mode, None)
        }

        fn limited(mode: FlushMode, limit: Option<FlushRateLimit>) -> Self {
            let (started_tx, started) = mpsc::channel();
            let (release, release_rx) = mpsc::channel();
            let (answers_tx, answers) = mpsc::channel();
            let sync = Arc::new(GatedSync {
                seq: AtomicU64::new(0),
                started: Mutex::new(started_tx),
                release: Mutex::new(release_rx),
                latched: Mutex::new(None),
            });
            let stats = Arc::new(Stats::default());
            Gated {
                engine: Arc::new(FlushEngine::new(mode, limit, sync, stats.clone()).unwrap()),
                stats,
                started,
                release,
                answers,
                answers_tx,
                popped: Vec::new(),
            }
        }

        /// Submits a request popped now; returns its id.
        fn submit(&mut self) -> usize {
            self.submit_with(None).0
        }

        /// Submits a request popped now, carrying `ticket`; returns its id and the thread that
        /// submitted it, which has returned from the submit once it is finished.
        fn submit_with(&mut self, ticket: Option<AnswerTicket>) -> (usize, JoinHandle<()>) {
            let id = self.popped.len();
            let popped = Instant::now();
            self.popped.push(popped);
            let mut job = FakeJob::new(id, &self.answers_tx);
            job.ticket = ticket;
            (id, self.submit_all(vec![job], popped))
        }

        /// Submits `jobs` as one pass from a thread of its own, standing in for the vring
        /// thread: in group mode an idle engine answers on it, the gated sync holding it.
        fn submit_all(&self, jobs: Vec<FakeJob>, popped: Instant) -> JoinHandle<()> {
            let engine = self.engine.clone();
            let vring = thread::spawn(move || engine.submit_all(jobs, popped));
            if self.engine.mode() != FlushMode::Group {
                // Queued (the workers never run a sync on the submitting thread) before the
                // next submit, so that requests queue in the order the test made them.
                while !vring.is_finished() {
                    thread::sleep(Duration::from_millis(1));
                }
            }
            vring
        }

        fn wait_started(&self) -> u64 {
            self.started
                .recv_timeout(Duration::from_secs(10))
                .expect("a sync should start")
        }

        fn finish_one(&self, result: Result<(), FlushFailure>) {
            self.release.send(result).unwrap();
        }

        fn answers(&self, n: usize) -> Vec<Answer> {
            let mut v: Vec<Answer> = (0..n)
                .map(|_| {
                    self.answers
                        .recv_timeout(Duration::from_secs(10))
                        .expect("an answer")
                })
                .collect();
            v.sort_by_key(|a| a.id);
            v
        }

        fn assert_nothing_answered(&self) {
            assert!(
                self.answers
                    .recv_timeout(Duration::from_millis(50))
                    .is_err(),
                "nothing may be answered before its sync finishes"
            );
        }

        fn check_order(&self, answers: &[Answer]) {
            for a in answers {
                assert!(
                    a.sync_start >= self.popped[a.id],
                    "request {} answered by sync #{} which started before it was popped",
                    a.id,
                    a.sync_seq
                );
            }
            assert_eq!(Stats::get(&self.stats.order_violations), 0);
        }
    }

    #[test]
    fn group_commit_takes_waiting_requests_and_never_acks_with_an_earlier_sync() {
        let mut g = Gated::new(FlushMode::Group);
        let a = g.submit();
        assert_eq!(g.wait_started(), 1);
        // These arrive while sync #1 runs: #1 must not answer them.
        let bcd = [g.submit(), g.submit(), g.submit()];
        g.assert_nothing_answered();
        g.finish_one(Ok(()));
        let first = g.answers(1);
        assert_eq!(first[0].id, a);
        assert_eq!(first[0].sync_seq, 1);

        // Sync #2 takes all three that waited; E arrives during it and waits for #3.
        assert_eq!(g.wait_started(), 2);
        let e = g.submit();
        g.finish_one(Ok(()));
        let second = g.answers(3);
        assert_eq!(second.iter().map(|x| x.id).collect::<Vec<_>>(), bcd);
        assert!(second.iter().all(|x| x.sync_seq == 2 && x.code == RESP_OK));

        assert_eq!(g.wait_started(), 3);
        g.finish_one(Ok(()));
        let third = g.answers(1);
        assert_eq!((third[0].id, third[0].sync_seq), (e, 3));

        g.check_order(&[first, second, third].concat());
        g.engine.wait_idle();
        let c = g.stats.counters();
        assert_eq!((c.requests, c.fdatasyncs, c.coalesced), (5, 3, 2));
        assert_eq!(g.stats.request_summary().count, 5);
        assert_eq!(g.stats.sync_summary().count, 3);
    }

    #[test]
    fn requests_popped_in_one_pass_share_the_first_sync() {
        let mut g = Gated::new(FlushMode::Group);
        let popped = Instant::now();
        let jobs: Vec<FakeJob> = (0..5)
            .map(|id| {
                g.popped.push(popped);
                FakeJob::new(id, &g.answers_tx)
            })
            .collect();
        g.submit_all(jobs, popped);
        assert_eq!(g.wait_started(), 1);
        g.finish_one(Ok(()));
        let a = g.answers(5);
        assert!(a.iter().all(|x| x.sync_seq == 1), "{a:?}");
        g.check_order(&a);
        g.engine.wait_idle();
        let c = g.stats.counters();
        assert_eq!((c.requests, c.fdatasyncs, c.coalesced), (5, 1, 4));
    }

    #[test]
    fn serial_makes_one_sync_per_request_one_at_a_time() {
        let mut g = Gated::new(FlushMode::Serial);
        let ids: Vec<usize> = (0..4).map(|_| g.submit()).collect();
        let mut all = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(g.wait_started(), i as u64 + 1);
            // No second sync starts while this one runs.
            assert!(g.started.recv_timeout(Duration::from_millis(30)).is_err());
            g.finish_one(Ok(()));
            let a = g.answers(1);
            assert_eq!((a[0].id, a[0].sync_seq), (*id, i as u64 + 1));
            all.extend(a);
        }
        g.check_order(&all);
        let c = g.stats.counters();
        assert_eq!((c.requests, c.fdatasyncs, c.coalesced), (4, 4, 0));
    }

    #[test]
    fn parallel_runs_syncs_concurrently_up_to_the_bound() {
        let mut g = Gated::new(FlushMode::Parallel);
        let n = PARALLEL_THREADS + 4;
        for _ in 0..n {
            g.submit();
        }
        // Exactly PARALLEL_THREADS start; the rest wait for a free worker.
        for _ in 0..PARALLEL_THREADS {
            g.wait_started();
        }
        assert!(g.started.recv_timeout(Duration::from_millis(50)).is_err());
        g.assert_nothing_answered();
        for _ in 0..n {
            g.finish_one(Ok(()));
        }
        for _ in PARALLEL_THREADS..n {
            g.wait_started();
        }
        let answers = g.answers(n);
        g.check_order(&answers);
        let mut seqs: Vec<u64> = answers.iter().map(|a| a.sync_seq).collect();
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(seqs.len(), n, "one sync per request");
        g.engine.wait_idle();
        assert_eq!(g.stats.counters().coalesced, 0);
    }

    #[test]
    fn a_failed_sync_fails_its_whole_batch() {
        let mut g = Gated::new(FlushMode::Group);
        g.submit();
        g.wait_started();
        g.submit();
        g.submit();
        g.finish_one(Ok(()));
        g.wait_started();
        g.finish_one(Err(FlushFailure("injected".into())));
        let a = g.answers(3);
        assert_eq!(a[0].code, RESP_OK);
        assert_eq!((a[1].code, a[2].code), (RESP_ERR, RESP_ERR));
        g.engine.wait_idle();
        assert_eq!(g.stats.counters().errors, 2);
    }

    #[test]
    fn wait_idle_waits_for_the_sync_in_progress() {
        for mode in [FlushMode::Group, FlushMode::Serial, FlushMode::Parallel] {
            let mut g = Gated::new(mode);
            g.submit();
            g.wait_started();
            let engine = &g.engine;
            let release = g.release.clone();
            thread::scope(|s| {
                let waiter = s.spawn(|| {
                    engine.wait_idle();
                    Instant::now()
                });
                thread::sleep(Duration::from_millis(50));
                assert!(!waiter.is_finished(), "{mode}: wait_idle returned early");
                let released = Instant::now();
                release.send(Ok(())).unwrap();
                assert!(waiter.join().unwrap() >= released, "{mode}");
            });
            assert_eq!(g.engine.in_flight(), 0);
        }
    }

    /// Requests keep arriving from several threads while slow syncs run; in every mode, every
    /// request is answered exactly once, by a sync that started after it was popped.
    #[test]
    fn ordering_holds_under_concurrent_arrivals() {
        for mode in [FlushMode::Group, FlushMode::Serial, FlushMode::Parallel] {
            let sync = Arc::new(SleepySync {
                seq: AtomicU64::new(0),
                running: AtomicU64::new(0),
                max_running: AtomicU64::new(0),
            });
            let stats = Arc::new(Stats::default());
            let engine: FlushEngine<SleepySync, FakeJob> =
                FlushEngine::new(mode, None, sync.clone(), stats.clone()).unwrap();
            let (tx, rx) = mpsc::channel();
            const THREADS: usize = 4;
            const PER_THREAD: usize = 50;
            let popped: Vec<Vec<Instant>> = thread::scope(|s| {
                let handles: Vec<_> = (0..THREADS)
                    .map(|t| {
                        let tx = tx.clone();
                        let engine = &engine;
                        s.spawn(move || {
                            (0..PER_THREAD)
                                .map(|i| {
                                    let p = Instant::now();
                                    engine.submit(FakeJob::new(t * PER_THREAD + i, &tx), p);
                                    thread::sleep(Duration::from_micros(
                                        ((t * 31 + i * 17) % 400) as u64,
                                    ));
                                    p
                                })
                                .collect()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let popped: Vec<Instant> = popped.concat();
            engine.wait_idle();
            let mut answers: Vec<Answer> = rx.try_iter().collect();
            answers.sort_by_key(|a| a.id);
            assert_eq!(answers.len(), THREADS * PER_THREAD, "{mode}");
            for (i, a) in answers.iter().enumerate() {
                assert_eq!(a.id, i, "{mode}: answered once");
                assert!(
                    a.sync_start >= popped[i],
                    "{mode}: request {i} acked by an older sync"
                );
            }
            let c = stats.counters();
            assert_eq!(c.order_violations, 0, "{mode}");
            assert_eq!(c.requests, (THREADS * PER_THREAD) as u64);
            match mode {
                FlushMode::Group => {
                    assert!(
                        c.coalesced > 0,
                        "group: arrivals during syncs should share one"
                    );
                    assert_eq!(sync.max_running.load(Ordering::SeqCst), 1);
                }
                FlushMode::Serial => {
                    assert_eq!(c.fdatasyncs, c.requests);
                    assert_eq!(sync.max_running.load(Ordering::SeqCst), 1);
                }
                FlushMode::Parallel => {
                    assert_eq!(c.fdatasyncs, c.requests);
                    assert!(
                        sync.max_running.load(Ordering::SeqCst) > 1,
                        "parallel ran serially"
                    );
                    assert!(sync.max_running.load(Ordering::SeqCst) <= PARALLEL_THREADS as u64);
                }
            }
        }
    }

    #[test]
    fn an_order_violation_is_counted() {
        // A request claiming to be popped in the future stands in for a bug that would let an
        // earlier fdatasync answer it.
        let mut g = Gated::new(FlushMode::Group);
        let job = FakeJob::new(0, &g.answers_tx);
        g.submit_all(vec![job], Instant::now() + Duration::from_secs(3600));
        g.popped.push(Instant::now());
        g.wait_started();
        g.finish_one(Ok(()));
        g.answers(1);
        g.engine.wait_idle();
        assert_eq!(Stats::get(&g.stats.order_violations), 1);
    }

    /// A sync that returns at once and notes when it started.
    #[derive(Default)]
    struct InstantSync {
        starts: Mutex<Vec<Instant>>,
    }

    impl Syncer for InstantSync {
        fn sync(&self) -> Result<(), FlushFailure> {
            let now = Instant::now();
            let mut starts = lock(&self.starts);
            starts.push(now);
            CURRENT_SYNC.with(|c| c.set(Some((starts.len() as u64, now))));
            Ok(())
        }
    }

    #[test]
    fn a_limited_group_sync_waits_for_its_token_and_takes_what_arrives_meanwhile() {
        let limit = FlushRateLimit {
            ops_per_sec: 10,
            burst: 1,
        };
        let mut g = Gated::limited(FlushMode::Group, Some(limit));
        let a = g.submit();
        assert_eq!(
            g.wait_started(),
            1,
            "the burst lets the first sync start at once"
        );
        g.finish_one(Ok(()));
        assert_eq!(g.answers(1)[0].id, a);

        // The next token is due 100 ms after sync #1 took the first.
        let b = g.submit();
        assert!(
            g.started.recv_timeout(Duration::from_millis(30)).is_err(),
            "sync #2 started before its token"
        );
        let cd = [g.submit(), g.submit()];
        assert_eq!(g.wait_started(), 2);
        g.finish_one(Ok(()));
        let second = g.answers(3);
        assert_eq!(
            second.iter().map(|x| x.id).collect::<Vec<_>>(),
            [b, cd[0], cd[1]],
            "requests that arrived during the delay join the delayed sync"
        );
        assert!(second.iter().all(|x| x.sync_seq == 2 && x.code == RESP_OK));
        g.check_order(&second);
        g.engine.wait_idle();
        let c = g.stats.counters();
        assert_eq!((c.requests, c.fdatasyncs, c.errors), (4, 2, 0));
        assert_eq!(c.flush_delayed, 3, "{c:?}");
        // B waited from its pop for the rest of the 100 ms (and whatever the wakeup's lateness
        // adds on a busy machine): one wait counted once, not once per request.
        assert!(
            (30_000..1_000_000).contains(&c.flush_delay_us),
            "{}",
            c.flush_delay_us
        );
    }

    /// An engine held to `limit`, with a sync that returns at once.
    struct Limited {
        // Declared first, so dropped first: its workers send on `rx`'s channel until they stop.
        engine: FlushEngine<InstantSync, FakeJob>,
        sync: Arc<InstantSync>,
        stats: Arc<Stats>,
        tx: Sender<Answer>,
        rx: Receiver<Answer>,
    }

    impl Limited {
        fn new(mode: FlushMode, ops_per_sec: u32, burst: u32) -> Limited {
            let limit = FlushRateLimit { ops_per_sec, burst };
            let sync = Arc::new(InstantSync::default());
            let stats = Arc::new(Stats::default());
            let (tx, rx) = mpsc::channel();
            Limited {
                engine: FlushEngine::new(mode, Some(limit), sync.clone(), stats.clone()).unwrap(),
                sync,
                stats,
                tx,
                rx,
            }
        }

        /// Submits request `id`, popped now.
        fn submit(&self, id: usize) {
            self.engine
                .submit(FakeJob::new(id, &self.tx), Instant::now());
        }
    }

    #[test]
    fn every_mode_spends_one_token_per_sync() {
        const INTERVAL: Duration = Duration::from_millis(100);
        for mode in [FlushMode::Group, FlushMode::Serial, FlushMode::Parallel] {
            let l = Limited::new(mode, 10, 2);
            let t0 = Instant::now();
            // Group mode takes everything queued at once: feed it one request per sync.
            let (rounds, per_round) = match mode {
                FlushMode::Group => (6, 1),
                _ => (1, 6),
            };
            for round in 0..rounds {
                for i in 0..per_round {
                    l.submit(round * per_round + i);
                }
                l.engine.wait_idle();
            }
            let answers: Vec<Answer> = l.rx.try_iter().collect();
            assert_eq!(answers.len(), 6, "{mode}");
            assert!(answers.iter().all(|a| a.code == RESP_OK), "{mode}");
            let mut starts = lock(&l.sync.starts).clone();
            starts.sort();
            assert_eq!(starts.len(), 6, "{mode}: one sync per request here");
            // The burst of 2 starts at once; sync k (from 0) waits for token k, due
            // (k - 1) intervals after the first was taken, which was after t0.
            for (k, start) in starts.iter().enumerate().skip(2) {
                let due = t0 + INTERVAL * (k as u32 - 1);
                assert!(*start >= due, "{mode}: sync {k} started before its token");
            }
            let c = l.stats.counters();
            assert_eq!(c.order_violations, 0, "{mode}");
            assert_eq!(c.flush_delayed, 4, "{mode}: {c:?}");
            assert!(c.flush_delay_us > 0, "{mode}");
        }
    }

    #[test]
    fn an_engine_with_a_limit_still_drains_when_dropped() {
        for mode in [FlushMode::Group, FlushMode::Serial, FlushMode::Parallel] {
            let Limited { engine, rx, tx, .. } = {
                let l = Limited::new(mode, 100, 1);
                (0..5).for_each(|id| l.submit(id));
                l
            };
            drop(engine);
            drop(tx);
            assert_eq!(
                rx.iter().count(),
                5,
                "{mode}: every queued request answered"
            );
        }
    }

    #[test]
    fn an_idle_group_engine_answers_on_the_submitting_thread() {
        let mut g = Gated::new(FlushMode::Group);
        let (a, vring) = g.submit_with(None);
        assert_eq!(g.wait_started(), 1);
        g.assert_nothing_answered();
        assert!(
            !vring.is_finished(),
            "the submit returns only with its answer"
        );
        g.finish_one(Ok(()));
        let vring_id = vring.thread().id();
        vring.join().unwrap();
        let first = g.answers(1);
        assert_eq!((first[0].id, first[0].thread), (a, vring_id));
        assert_eq!(g.engine.in_flight(), 0);
        g.check_order(&first);
    }

    /// Requests that arrive while an inline sync runs wait for the worker's next one, which
    /// takes all of them; once idle again, the next request is answered inline.
    #[test]
    fn requests_racing_an_inline_sync_wait_for_the_next_one() {
        let mut g = Gated::new(FlushMode::Group);
        let (a, vring) = g.submit_with(None);
        assert_eq!(g.wait_started(), 1);
        let bc = [g.submit(), g.submit()];
        g.assert_nothing_answered();
        assert_eq!(g.engine.in_flight(), 3);
        g.finish_one(Ok(()));
        let inline_thread = vring.thread().id();
        vring.join().unwrap();
        let first = g.answers(1);
        assert_eq!((first[0].id, first[0].sync_seq), (a, 1));

        assert_eq!(
            g.wait_started(),
            2,
            "the worker's sync for what arrived during #1"
        );
        let d = g.submit();
        g.finish_one(Ok(()));
        let second = g.answers(2);
        assert_eq!(second.iter().map(|x| x.id).collect::<Vec<_>>(), bc);
        assert!(second
            .iter()
            .all(|x| x.sync_seq == 2 && x.thread != inline_thread));

        assert_eq!(g.wait_started(), 3, "D arrived during #2");
        g.finish_one(Ok(()));
        let third = g.answers(1);
        assert_eq!((third[0].id, third[0].sync_seq), (d, 3));
        g.engine.wait_idle();

        let (e, vring) = g.submit_with(None);
        assert_eq!(g.wait_started(), 4);
        g.finish_one(Ok(()));
        let e_thread = vring.thread().id();
        vring.join().unwrap();
        let fourth = g.answers(1);
        assert_eq!(
            (fourth[0].id, fourth[0].thread),
            (e, e_thread),
            "idle again: inline"
        );

        g.check_order(&[first, second, third, fourth].concat());
        let c = g.stats.counters();
        assert_eq!((c.requests, c.fdatasyncs, c.coalesced), (5, 4, 1));
    }

    #[test]
    fn an_inline_sync_failure_reaches_every_waiting_request() {
        let mut g = Gated::new(FlushMode::Group);
        let (_, vring) = g.submit_with(None);
        g.wait_started();
        let _waiting = [g.submit(), g.submit(), g.submit()];
        g.finish_one(Err(FlushFailure("injected".into())));
        vring.join().unwrap();
        // The worker's sync returns the latched failure without reaching the gate again.
        let all = g.answers(4);
        assert!(all.iter().all(|x| x.code == RESP_ERR), "{all:?}");
        // And a request on an idle engine, inline, gets it too.
        g.submit_with(None).1.join().unwrap();
        assert_eq!(g.answers(1)[0].code, RESP_ERR);
        g.engine.wait_idle();
        let c = g.stats.counters();
        assert_eq!((c.requests, c.errors, c.order_violations), (5, 5, 0));
    }

    #[test]
    fn a_disconnect_during_an_inline_sync_drops_its_answer() {
        let mut g = Gated::new(FlushMode::Group);
        let gone = Arc::new(AnswerGate::default());
        let (_, vring) = g.submit_with(Some(gone.ticket()));
        g.wait_started();
        // The connection ends while its vring thread is in the fdatasync: closing the gate
        // must not wait for that.
        gone.close();
        assert_eq!(
            g.engine.in_flight(),
            1,
            "still in flight until the sync returns"
        );
        g.finish_one(Ok(()));
        vring.join().unwrap();
        g.assert_nothing_answered();
        assert_eq!(g.engine.in_flight(), 0);
        g.engine.wait_idle();

        // The next connection's request is answered, inline.
        let next = Arc::new(AnswerGate::default());
        let (b, vring) = g.submit_with(Some(next.ticket()));
        g.wait_started();
        g.finish_one(Ok(()));
        vring.join().unwrap();
        let a = g.answers(1);
        assert_eq!((a[0].id, a[0].code), (b, RESP_OK));
        assert_eq!(g.stats.counters().order_violations, 0);
    }

    #[test]
    fn a_request_without_a_token_goes_to_the_worker() {
        let l = Limited::new(FlushMode::Group, 10, 1);
        l.submit(0);
        let inline = l.rx.try_recv().expect("the burst's token: answered inline");
        assert_eq!(inline.thread, thread::current().id());
        let submitted = Instant::now();
        l.submit(1);
        assert!(
            submitted.elapsed() < Duration::from_millis(50),
            "the submitting thread waited for the token"
        );
        let handed = l.rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_ne!(handed.thread, thread::current().id());
        assert_eq!(l.stats.counters().flush_delayed, 1);
    }
}
