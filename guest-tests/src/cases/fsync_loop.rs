//! An fsync loop that reports every result as it happens, for watching from the host what a
//! guest's fsync does when the daemon dies under it (vmrun
//! --kill-daemon-after-marker VUP-FSYNC-STEADY). One thread: pwrite 4 KiB, fsync, a line, 100 ms
//! pause. The main thread prints a line every 5 s while an fsync is outstanding, so a hang shows
//! as a growing `pending_ms`.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::fs_state::{ensure_dax_mount, NEEDS_DAX};
use super::suites::SuiteDef;
use super::{common, device, Ctx, Verdict};
use crate::error::{describe, fail, Result};
use crate::pattern;

/// After this many good fsyncs the loop prints the marker the host waits for.
const STEADY_AFTER: u64 = 20;
const PAUSE: Duration = Duration::from_millis(100);
const DEFAULT_SECS: u64 = 120;
/// Errors printed one by one; after that only counted.
const ERRORS_SHOWN: u64 = 10;

/// One line on stdout from any thread (the TAP writer belongs to the main thread's Ctx).
pub(super) fn line(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

pub fn fsync_loop(ctx: &mut Ctx) -> Result<Verdict> {
    let secs = ctx.args.stress_secs.unwrap_or(DEFAULT_SECS);
    let path = ctx.mnt().join("fsync_loop.dat");
    let f = common::create(&path)?;
    let origin = Instant::now();
    let ms = |t: Instant| t.duration_since(origin).as_millis() as u64;
    let (ok, errors) = (AtomicU64::new(0), AtomicU64::new(0));
    // Start of the fsync in flight, in ms since `origin` + 1 (0: none in flight).
    let pending_since = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    let until = origin + Duration::from_secs(secs);
    std::thread::scope(|s| {
        s.spawn(|| {
            let page = pattern::seeded(0x0046_5359_4e43, 4096);
            let mut n = 0u64;
            while Instant::now() < until {
                n += 1;
                if let Err(e) = f.write_all_at(&page, (n % 256) * 4096) {
                    line(&format!("VUP-FSYNC n={n} pwrite failed: {}", describe(&e)));
                }
                let start = Instant::now();
                pending_since.store(ms(start) + 1, Ordering::SeqCst);
                let r = f.sync_all();
                pending_since.store(0, Ordering::SeqCst);
                let took = start.elapsed().as_micros();
                match r {
                    Ok(()) => {
                        let good = ok.fetch_add(1, Ordering::SeqCst) + 1;
                        line(&format!("VUP-FSYNC n={n} ok {took}us t={}ms", ms(start)));
                        if good == STEADY_AFTER {
                            line("VUP-FSYNC-STEADY");
                        }
                    }
                    Err(e) => {
                        let bad = errors.fetch_add(1, Ordering::SeqCst) + 1;
                        if bad <= ERRORS_SHOWN {
                            line(&format!(
                                "VUP-FSYNC n={n} error {} after {took}us t={}ms",
                                describe(&e),
                                ms(start)
                            ));
                        }
                    }
                }
                std::thread::sleep(PAUSE);
            }
            done.store(true, Ordering::SeqCst);
        });
        let mut last_report = Instant::now();
        while !done.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
            let since = pending_since.load(Ordering::SeqCst);
            if since > 0 && last_report.elapsed() >= Duration::from_secs(5) {
                let pending = ms(Instant::now()).saturating_sub(since - 1);
                if pending >= 1000 {
                    line(&format!(
                        "VUP-FSYNC-WAIT pending_ms={pending} ok={} errors={}",
                        ok.load(Ordering::SeqCst),
                        errors.load(Ordering::SeqCst)
                    ));
                    last_report = Instant::now();
                }
            }
        }
    });
    let (ok, errors) = (ok.into_inner(), errors.into_inner());
    ctx.diag(&format!("{ok} fsyncs ok, {errors} failed in {secs} s"));
    if errors > 0 {
        fail!("{errors} fsync(s) failed");
    }
    Ok(Verdict::Pass)
}

pub const SUITE: SuiteDef = SuiteDef {
    name: "fsyncloop",
    help: &[
        "pwrite + fsync every 100 ms for --stress SECS (default 120), one line per",
        "result, VUP-FSYNC-STEADY after 20: for killing the daemon under it",
    ],
    run: suite,
};

fn suite(ctx: &mut Ctx) {
    ctx.case("pmem0_present", &[], device::pmem0_present);
    ensure_dax_mount(ctx);
    ctx.case("fsync_loop", NEEDS_DAX, fsync_loop);
}
