//! Notification suppression (EVENT_IDX) and `--poll-us` against the real daemon: a request
//! whose call the driver did not ask for is still answered, kicks the device says it does not
//! need can be left out, polling keeps the ordering rule (no answer before an fdatasync that
//! started after the pop), and a polling daemon still sleeps when idle.

mod common;

use std::time::{Duration, Instant};

use common::{context_switches, keep_flushing, Daemon, Env, MIB, TIMEOUT};
use pmem_frontend::{Frontend, Options};

fn started(env: &Env, extra: &[&str], opts: Options) -> (Daemon, Frontend) {
    env.create_file(2 * MIB);
    let d = env.start_with_metrics(extra);
    let mut fe = d.connect_with(opts);
    fe.start().unwrap();
    (d, fe)
}

/// Polls the used ring (never waiting on the call eventfd) until an entry shows up.
fn poll_used(fe: &mut Frontend) -> pmem_frontend::Used {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(used) = fe.try_used().unwrap() {
            return used;
        }
        assert!(Instant::now() < deadline, "no answer within {TIMEOUT:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn answered_without_a_call(extra: &[&str]) {
    let env = Env::new();
    let (d, mut fe) = started(&env, extra, Options::default());
    // A waited-for flush: the harness sets used_event to the entry it waits for, so this one
    // is signalled.
    assert_eq!(fe.flush().unwrap(), 0);
    let before = fe.notify_counts().unwrap();
    assert!(
        before.calls >= 1,
        "{extra:?}: the waited-for answer was not signalled"
    );
    // used_event still names the entry already taken: the driver has not asked to hear about
    // these, so the device must answer them without a call.
    for _ in 0..5 {
        let head = fe.submit_request(0).unwrap();
        let used = poll_used(&mut fe);
        assert_eq!(used.id, u32::from(head));
        assert_eq!(used.len, 4);
        assert_eq!(fe.request_status(head).unwrap(), 0);
    }
    let after = fe.notify_counts().unwrap();
    assert_eq!(
        after.calls, before.calls,
        "{extra:?}: the device signalled answers the driver did not ask about"
    );
    // And the next one the driver does ask about is signalled again.
    assert_eq!(fe.flush().unwrap(), 0);
    assert!(fe.notify_counts().unwrap().calls > after.calls);
    let m = d.report(&env.metrics_path());
    assert_eq!(m.counters.requests, 7);
    assert_eq!(m.counters.order_violations, 0);
}

#[test]
fn a_request_whose_call_is_suppressed_is_still_answered() {
    answered_without_a_call(&[]);
    answered_without_a_call(&["--poll-us", "200"]);
}

#[test]
fn kicks_the_device_does_not_need_can_be_left_out() {
    for extra in [&[][..], &["--poll-us", "100"][..]] {
        let env = Env::new();
        let opts = Options {
            skip_unneeded_kicks: true,
            ..Options::default()
        };
        let (d, mut fe) = started(&env, extra, opts);
        for depth in [1, 16, 64] {
            let done = keep_flushing(&mut fe, depth, |n| n < 300);
            assert_eq!(done, 300, "{extra:?} depth {depth}");
        }
        let counts = fe.notify_counts().unwrap();
        assert_eq!(
            counts.kicks + counts.kicks_skipped,
            900,
            "{extra:?}: one kick decision per request"
        );
        let m = d.report(&env.metrics_path());
        assert_eq!(m.counters.requests, 900);
        assert_eq!(m.counters.errors, 0);
        assert_eq!(m.counters.order_violations, 0);
    }
}

/// The ordering rule with the longest poll: whether the worker or the vring thread takes a
/// request off the ring, no answer comes from an fdatasync that started before that, in every
/// mode and at every depth (the engine counts each breach in `order_violations`).
#[test]
fn polling_never_answers_before_the_fdatasync() {
    for mode in ["group", "serial", "parallel"] {
        for event_idx in [true, false] {
            let env = Env::new();
            let opts = Options {
                ack_event_idx: event_idx,
                skip_unneeded_kicks: event_idx,
                ..Options::default()
            };
            let (d, mut fe) = started(&env, &["--flush-mode", mode, "--poll-us", "1000"], opts);
            let mut total = 0;
            for depth in [1, 4, 32] {
                total += keep_flushing(&mut fe, depth, |n| n < 150);
            }
            let m = d.report(&env.metrics_path());
            let what = format!("{mode}, EVENT_IDX {event_idx}");
            assert_eq!(m.counters.requests, total as u64, "{what}");
            assert_eq!(m.counters.errors, 0, "{what}");
            assert_eq!(m.counters.order_violations, 0, "{what}");
            assert!(m.counters.fdatasyncs >= 1, "{what}");
            // A device stop still waits for every request taken off the ring, polled or not.
            fe.stop().unwrap();
            assert_eq!(d.report(&env.metrics_path()).in_flight, 0, "{what}");
        }
    }
}

#[test]
fn a_polling_daemon_does_not_wake_up_when_idle() {
    let env = Env::new();
    let (d, mut fe) = started(&env, &["--poll-us", "1000"], Options::default());
    for _ in 0..20 {
        assert_eq!(fe.flush().unwrap(), 0);
    }
    // The last poll ends a millisecond after the last answer.
    std::thread::sleep(Duration::from_millis(200));
    let before = context_switches(d.pid());
    std::thread::sleep(Duration::from_secs(1));
    let woke = context_switches(d.pid()) - before;
    assert_eq!(woke, 0, "{woke} context switches in 1 s of idling");
}
