//! The host halves of the guest-test catalogue's section E (flush), decided from the daemon's
//! metrics and faultfs's counts: the numbers both sides promise, not their log text.

use crate::hostlink::{ActionResult, Host};

fn label_and_number<'a>(args: &[&'a str], usage: &str) -> Result<(&'a str, u64), String> {
    match args {
        [label, n] => n
            .parse()
            .map(|n| (*label, n))
            .map_err(|_| format!("bad count '{n}' ({usage})")),
        _ => Err(format!("usage: {usage}")),
    }
}

/// E16 `flush_reaches_host`: every guest flush that returned between the snapshot `LABEL`
/// and now reached the daemon and was answered after an fdatasync of its own, which
/// faultfs (when the image is on it) saw pass underneath the daemon.
pub fn check_flushes(host: &mut Host, args: &[&str]) -> ActionResult {
    let (label, n) = label_and_number(args, "check-flushes LABEL N")?;
    let before = host.earlier(label)?;
    let after = host.snapshot(&format!("{label}-after"))?.clone();
    let (a, b) = (before.metrics.counters, after.metrics.counters);
    let req = b.requests - a.requests;
    let fds = b.fdatasyncs - a.fdatasyncs;
    let err = b.errors - a.errors;
    let ov = b.order_violations;
    let mut why = Vec::new();
    if req < n {
        why.push(format!(
            "the daemon took {req} flush requests in the window, fewer than the {n} guest flushes that returned"
        ));
    }
    if fds < n {
        why.push(format!(
            "the daemon made {fds} fdatasyncs in the window, fewer than the {n} sequential guest flushes"
        ));
    }
    if err != 0 {
        why.push(format!("{err} requests answered with an error"));
    }
    if ov != 0 {
        why.push(format!("order_violations={ov}"));
    }
    let mut figures =
        format!("requests=+{req} fdatasyncs=+{fds} errors=+{err} order_violations={ov}");
    if let (Some(fa), Some(fb)) = (before.faultfs, after.faultfs) {
        let passed = fb.passed - fa.passed;
        if passed < n {
            why.push(format!(
                "faultfs passed {passed} fdatasyncs of the image in the window, fewer than {n}"
            ));
        }
        figures.push_str(&format!(" faultfs_fdatasyncs=+{passed}"));
    }
    if why.is_empty() {
        Ok(figures)
    } else {
        Err(format!("{} ({figures})", why.join("; ")))
    }
}

/// E18 `flush_queue_full`: no request since the snapshot was answered with an error; the
/// largest batch one fdatasync answered is reported against what a full ring holds.
pub fn check_queue(host: &mut Host, args: &[&str]) -> ActionResult {
    let (label, cap) = label_and_number(args, "check-queue LABEL CAP")?;
    let before = host.earlier(label)?;
    let after = host.snapshot(&format!("{label}-after"))?.clone();
    let (a, b) = (before.metrics.counters, after.metrics.counters);
    let req = b.requests - a.requests;
    let err = b.errors - a.errors;
    // The largest batch since the daemon started: a batch before the window can only have
    // been smaller than the window's flood, which is the case's most concurrent phase.
    let most = after.metrics.largest_batch;
    let mut figures = format!("requests=+{req} errors=+{err} largest batch {most}");
    if err != 0 {
        return Err(format!("{err} requests answered with an error ({figures})"));
    }
    if most >= cap {
        figures.push_str(&format!(" (a full ring: {cap})"));
    } else {
        figures.push_str(&format!(" (a full ring holds {cap}; it never filled)"));
    }
    Ok(figures)
}

/// E17 `flush_error_eio`: after the fault was lifted the daemon made no fdatasync that passed
/// (the failure is sticky), faultfs did inject at least one EIO, and the daemon reports the
/// failure in its metrics and logged it at error level.
pub fn check_sticky(host: &mut Host, args: &[&str]) -> ActionResult {
    if !args.is_empty() {
        return Err("usage: check-sticky".into());
    }
    let f = host.faultfs.ok_or("needs --faultfs")?;
    let mark = host
        .state
        .ok_mark
        .ok_or("faultfs was never set back to ok")?;
    let now = host.faultfs_counts(f)?;
    let m = host.snapshot("sticky")?.metrics.clone();
    let mut why = Vec::new();
    if now.injected == 0 {
        why.push("faultfs never injected EIO into an fdatasync of the image".to_string());
    }
    let passed_since = now.passed - mark.passed;
    if passed_since != 0 {
        why.push(format!(
            "the daemon called fdatasync {passed_since} time(s) after the failure and it passed: the failure is not sticky"
        ));
    }
    if m.flush_failure.is_none() {
        why.push("the daemon's metrics report no flush failure".into());
    }
    if m.counters.log_errors == 0 {
        why.push("the daemon logged nothing at error level".into());
    }
    if why.is_empty() {
        Ok(format!(
            "faultfs injected EIO {} time(s), passed 0 fdatasyncs since it recovered; daemon: flush_failure set, errors={}, log_errors={}",
            now.injected, m.counters.errors, m.counters.log_errors
        ))
    } else {
        Err(why.join("; "))
    }
}
