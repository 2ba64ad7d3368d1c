//! Bounded resources: nothing a frontend does with the queue makes the daemon's memory,
//! threads or descriptors grow without bound.
//!
//! - a flood of flush requests that keeps a 1024-entry queue full for 100,000 requests;
//! - frontends that fill the queue and then never look at the used ring again and never kick
//!   again, one after another, one of them held open while the daemon sits on a full used ring.
//!
//! Each test prints its figures (`--nocapture`). The bounds are fixed numbers, not timings: RSS
//! may grow while allocators warm up, so the flood compares RSS after 10,000 requests with RSS
//! after 100,000, where a per-request leak of even 40 bytes would show.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{Daemon, Env, MIB, TIMEOUT};
use pmem_frontend::{Frontend, Options, USED_RING_ADDR};

/// Largest queue the harness (and QEMU's `vq_size`) allows; two descriptors per flush.
const QUEUE: u16 = 1024;
const DEPTH: usize = QUEUE as usize / 2;
/// RSS may grow by at most this much between the 10,000th and the 100,000th request.
const RSS_GROWTH_LIMIT_KIB: u64 = 2048;
/// ... and by at most this much over twenty stalled connections after the first.
const RSS_STALL_LIMIT_KIB: u64 = 2048;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Usage {
    rss_kib: u64,
    threads: u64,
    fds: usize,
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RSS {} KiB, {} threads, {} fds",
            self.rss_kib, self.threads, self.fds
        )
    }
}

/// The daemon's VmRSS, Threads (from /proc/PID/status) and open descriptors.
fn usage(pid: i32) -> Usage {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or_else(|e| panic!("read /proc/{pid}/fd: {e}"));
    Usage {
        rss_kib: field("VmRSS:"),
        threads: field("Threads:"),
        fds,
    }
}

fn full_queue_options() -> Options {
    Options {
        queue_size: QUEUE,
        ..Options::default()
    }
}

fn start_daemon(env: &Env) -> Daemon {
    env.create_file(2 * MIB);
    env.start(&[])
}

/// Waits for one completion and checks it is a successful flush of a head in flight.
fn complete_one(fe: &mut Frontend, d: &Daemon, in_flight: &mut HashSet<u16>, done: u64) {
    let used = fe
        .wait_used(TIMEOUT)
        .unwrap_or_else(|e| panic!("completion {done}: {e}; log tail:\n{}", tail(&d.log())));
    let head = u16::try_from(used.id).expect("head fits in u16");
    assert!(in_flight.remove(&head), "head {head} completed twice");
    assert_eq!(used.len, 4, "used len of head {head}");
    let status = fe.request_status(head).unwrap();
    assert_eq!(status, 0, "status of request {done} (head {head})");
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[test]
fn a_flood_of_flushes_keeps_memory_and_threads_flat() {
    const WARM: u64 = 10_000;
    const TOTAL: u64 = 100_000;
    let env = Env::new();
    let d = start_daemon(&env);
    let mut fe = d.connect_with(full_queue_options());
    let map = fe.start().unwrap();
    let idle = usage(d.pid());

    let started = Instant::now();
    let mut in_flight = HashSet::new();
    let (mut submitted, mut done) = (0u64, 0u64);
    let mut at_warm = None;
    while done < TOTAL {
        // Keep the queue full: every completion is replaced at once.
        while in_flight.len() < DEPTH && submitted < TOTAL {
            assert!(in_flight.insert(fe.submit_request(0).unwrap()));
            submitted += 1;
            // Dirty a page now and then, so the fdatasyncs have something to write.
            if submitted % 1000 == 0 {
                let page = (submitted / 1000 % 256) as usize * 4096;
                map.write(page, &submitted.to_le_bytes()).unwrap();
            }
        }
        complete_one(&mut fe, &d, &mut in_flight, done);
        done += 1;
        if done == WARM {
            at_warm = Some(usage(d.pid()));
        }
    }
    assert!(in_flight.is_empty());
    let elapsed = started.elapsed();
    let at_end = usage(d.pid());
    let at_warm = at_warm.unwrap();
    // The daemon is still well: one more flush, answered 0.
    assert_eq!(fe.flush().unwrap(), 0);

    let growth = at_end.rss_kib.saturating_sub(at_warm.rss_kib);
    println!(
        "flood: {TOTAL} flushes at depth {DEPTH} in {:.2} s ({:.0}/s)\n  idle:  {idle}\n  \
         after {WARM}: {at_warm}\n  after {TOTAL}: {at_end}\n  RSS growth {WARM}..{TOTAL}: {growth} KiB",
        elapsed.as_secs_f64(),
        TOTAL as f64 / elapsed.as_secs_f64()
    );
    assert!(
        growth <= RSS_GROWTH_LIMIT_KIB,
        "RSS grew by {growth} KiB between request {WARM} and {TOTAL} (limit {RSS_GROWTH_LIMIT_KIB} KiB)"
    );
    assert_eq!(
        at_end.threads, idle.threads,
        "thread count changed under load: idle {idle}, after the flood {at_end}"
    );
    assert_eq!(
        at_warm.threads, idle.threads,
        "threads at {WARM}: {at_warm}"
    );
    assert_eq!(
        at_end.fds, idle.fds,
        "descriptor count changed: idle {idle}, after the flood {at_end}"
    );
}

/// utime + stime of a process, from /proc/PID/stat.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/stat: {e}"));
    // The fields after the command name (which may hold spaces) start with the state.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .expect("/proc/PID/stat has a command name")
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// The used index the daemon has published, read from guest RAM as a driver would.
fn used_idx(fe: &Frontend) -> u16 {
    let b = fe.read_guest(USED_RING_ADDR + 2, 2).unwrap();
    u16::from_le_bytes([b[0], b[1]])
}

/// Fills the queue and never looks at the used ring or kicks again. Returns once the daemon
/// has answered everything (the used index, read from guest memory, says so).
fn fill_and_abandon(fe: &mut Frontend, d: &Daemon) {
    let before = used_idx(fe);
    for _ in 0..DEPTH {
        fe.submit_request(0).unwrap();
    }
    let deadline = Instant::now() + TIMEOUT;
    while used_idx(fe).wrapping_sub(before) != DEPTH as u16 {
        assert!(
            Instant::now() < deadline,
            "daemon answered {} of {DEPTH} abandoned requests; log tail:\n{}",
            used_idx(fe).wrapping_sub(before),
            tail(&d.log())
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn frontends_that_never_complete_anything_cost_nothing_lasting() {
    const CONNECTIONS: usize = 20;
    let env = Env::new();
    let d = start_daemon(&env);
    // Between connections the daemon waits for the next frontend; measure it there, once the
    // start-up probe's connection is gone.
    let idle = quiet(&d);

    // One frontend holds a full, unconsumed used ring open for a while: the daemon has nothing
    // left to do and must not spin, queue or spawn anything meanwhile.
    let mut held = d.connect_with(full_queue_options());
    held.start().unwrap();
    fill_and_abandon(&mut held, &d);
    let stalled_first = usage(d.pid());
    let cpu_before = cpu_time(d.pid());
    std::thread::sleep(Duration::from_millis(500));
    let cpu_used = cpu_time(d.pid()) - cpu_before;
    let stalled_later = usage(d.pid());
    // A thread spinning on the full ring would burn the whole half second.
    assert!(
        cpu_used < Duration::from_millis(100),
        "the daemon used {cpu_used:?} of CPU in 0.5 s with nothing to do"
    );
    assert_eq!(
        stalled_first.threads, stalled_later.threads,
        "threads changed while the used ring sat full"
    );
    assert_eq!(stalled_first.fds, stalled_later.fds);
    held.disconnect();

    // Then frontend after frontend does the same and goes away without reading anything.
    let mut after_first = None;
    for i in 0..CONNECTIONS {
        let mut fe = d.connect_with(full_queue_options());
        fe.start().unwrap();
        fill_and_abandon(&mut fe, &d);
        fe.disconnect();
        if i == 0 {
            after_first = Some(quiet(&d));
        }
    }
    let after_first = after_first.unwrap();
    let after_all = quiet(&d);
    // The daemon still serves a well-behaved frontend.
    let mut fe = d.connect();
    fe.start().unwrap();
    assert_eq!(fe.flush().unwrap(), 0);
    fe.disconnect();

    let growth = after_all.rss_kib.saturating_sub(after_first.rss_kib);
    println!(
        "stalled frontends: {} connections x {DEPTH} unconsumed flushes\n  idle:  {idle}\n  \
         one used ring full for 0.5 s: {stalled_first} -> {stalled_later}, CPU {cpu_used:?}\n  \
         after connection 1: {after_first}\n  after connection {}: {after_all}\n  \
         RSS growth over the last {}: {growth} KiB",
        CONNECTIONS + 1,
        CONNECTIONS + 1,
        CONNECTIONS - 1
    );
    assert!(
        growth <= RSS_STALL_LIMIT_KIB,
        "RSS grew by {growth} KiB over {} stalled connections (limit {RSS_STALL_LIMIT_KIB} KiB)",
        CONNECTIONS - 1
    );
    assert_eq!(
        after_all.threads, idle.threads,
        "threads after {CONNECTIONS} stalled connections: {after_all}, idle: {idle}"
    );
    assert_eq!(
        after_all.fds, idle.fds,
        "descriptors after {CONNECTIONS} stalled connections: {after_all}, idle: {idle}"
    );
}

/// Usage once the daemon has torn the last connection down: the same reading twice in a row,
/// 300 ms apart (or the last one after a deadline; the caller's assertions then say what).
fn quiet(d: &Daemon) -> Usage {
    let deadline = Instant::now() + TIMEOUT;
    let mut last = usage(d.pid());
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let u = usage(d.pid());
        if (u.threads == last.threads && u.fds == last.fds) || Instant::now() >= deadline {
            return u;
        }
        last = u;
    }
}
