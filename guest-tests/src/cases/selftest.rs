//! The `selftest` suite: proves in the guest that the case runner catches what it is
//! meant to catch. Each selftest runs an inner case through the real machinery (fork,
//! watchdog, kernel log check) and passes only if that inner case fails the expected
//! way; the inner result is shown as the TAP line it would have been.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::fs_state::{catalogue_setup, NEEDS_DAX};
use super::suites::SuiteDef;
use super::{Ctx, Verdict};
use crate::error::{describe, fail, Context, Result};
use crate::isolate;
use crate::tap::{self, Outcome};

/// ioctl numbers from linux/fs.h: _IOWR('X', 119, int) and _IOWR('X', 120, int).
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// Run `inner` as case `name` without printing its result; show the line it would have
/// printed, and pass iff it failed with a reason containing every one of `want`.
fn expect_failure<F>(ctx: &mut Ctx, name: &str, want: &[&str], inner: F) -> Result<Verdict>
where
    F: FnOnce(&mut Ctx) -> Result<Verdict>,
{
    let outcome = ctx.outcome_of(name, inner);
    ctx.diag(&format!(
        "inner case: {}",
        tap::format_result(0, name, &outcome)
    ));
    match outcome {
        Outcome::Fail(why) if want.iter().all(|w| why.contains(w)) => Ok(Verdict::Pass),
        Outcome::Fail(why) => fail!("inner case failed, but not with {want:?}: {why}"),
        o => fail!("inner case did not fail: {o:?}"),
    }
}

fn freeze(mnt: &File, on: bool) -> std::io::Result<()> {
    let mut arg: libc::c_int = 0;
    let req = if on { FIFREEZE } else { FITHAW };
    // SAFETY: FIFREEZE/FITHAW take an int argument (ignored) on a directory fd we own.
    if unsafe { libc::ioctl(mnt.as_raw_fd(), req, &mut arg) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

pub fn suite(ctx: &mut Ctx) {
    catalogue_setup(ctx);

    // A child that never finishes: killed at its deadline and reported hung.
    ctx.case("selftest_hang", NEEDS_DAX, |ctx| {
        expect_failure(ctx, "selftest_hang_inner", &["hung after 3."], |ctx| {
            Ok(ctx.isolated(Duration::from_secs(3), |_, _| loop {
                std::thread::sleep(Duration::from_secs(1000));
            }))
        })
    });

    // A child stuck in the kernel (state D): a write to a frozen filesystem. SIGKILL
    // cannot end it; the runner describes it and moves on. Thawing lets it die, and it
    // must then be reaped.
    ctx.case("selftest_dstate", NEEDS_DAX, |ctx| {
        let mnt = File::open(ctx.mnt()).ctx("open mount point")?;
        freeze(&mnt, true).ctx("FIFREEZE")?;
        let r = expect_failure(
            ctx,
            "selftest_dstate_inner",
            &["hung after 3.", "state D"],
            |ctx| {
                Ok(ctx.isolated(Duration::from_secs(3), |_, env| {
                    std::fs::write(env.mnt.join("selftest_frozen.dat"), b"x")
                        .ctx("write to the frozen filesystem")?;
                    Ok(Verdict::Pass)
                }))
            },
        );
        let thawed = freeze(&mnt, false);
        let t = Instant::now();
        let mut left = isolate::reap_left_behind();
        while !left.is_empty() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
            left = isolate::reap_left_behind();
        }
        if let Err(e) = thawed {
            fail!("FITHAW: {}", describe(&e));
        }
        if !left.is_empty() {
            fail!("after the thaw, pids {left:?} were still not reaped");
        }
        ctx.diag(&format!(
            "thawed; the stuck child died and was reaped {:.1} s later",
            t.elapsed().as_secs_f64()
        ));
        let _ = std::fs::remove_file(ctx.mnt().join("selftest_frozen.dat"));
        r
    });

    // A fatal signal in the child fails only that case.
    ctx.case("selftest_signal", NEEDS_DAX, |ctx| {
        expect_failure(ctx, "selftest_signal_inner", &["killed by SIGBUS"], |ctx| {
            Ok(ctx.isolated(Duration::from_secs(30), |_, _| {
                // SAFETY: raising a signal at ourselves; its default action ends the
                // child, which is the point.
                unsafe { libc::raise(libc::SIGBUS) };
                Ok(Verdict::Pass)
            }))
        })
    });

    // A kernel log line with "WARNING:" during a case fails it. Written at debug level,
    // so it stays in the log buffer and off the console (whose loglevel hides it), and
    // without a space after the colon: the host runner greps the console, where this
    // suite echoes the line, for "WARNING: " and would count it as a real warning.
    ctx.case("selftest_kmsg", NEEDS_DAX, |ctx| {
        expect_failure(
            ctx,
            "selftest_kmsg_inner",
            &["kernel log:", "selftest-injected"],
            |_| {
                std::fs::write(
                    "/dev/kmsg",
                    "<7>pmem-guest-tests: WARNING:selftest-injected line, not a kernel problem\n",
                )
                .ctx("write /dev/kmsg")?;
                Ok(Verdict::Pass)
            },
        )
    });
}

pub const SUITE: SuiteDef = SuiteDef {
    name: "selftest",
    help: &[
        "proves the case runner in the guest: a hung case, a case stuck in D state",
        "(a write to a frozen filesystem, thawed after), a fatal signal and a",
        "kernel WARNING line must each fail the case they happen in",
    ],
    run: suite,
};
