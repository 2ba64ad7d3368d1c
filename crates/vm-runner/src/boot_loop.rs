//! `vmrun boot-loop`: QEMU boots again and again on one image behind ONE daemon. Every boot
//! must find the mapped region — the file system mounts and holds what the previous boot
//! wrote and fsynced, and the bytes are in the host file where the guest's FIEMAP says — and
//! the daemon's metrics must count one connection per QEMU and one accepted SHMEM_MAP per
//! good boot. This is the evidence for QEMU pitfall 3 (docs/qemu.md): the map is sent from
//! another thread after SET_FEATURES, so a guest could otherwise see an unmapped region.

use std::time::{Duration, Instant};

use clap::Args;

use crate::cli::RunArgs;
use crate::one_daemon::{OneDaemon, OneDaemonArgs};
use crate::run;

#[derive(Args, Debug)]
pub struct BootLoopArgs {
    /// Number of boots.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub boots: u32,
    #[command(flatten)]
    pub common: OneDaemonArgs,
    /// Per-boot timeout in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

fn info(msg: impl AsRef<str>) {
    eprintln!("boot-loop: {}", msg.as_ref());
}

pub fn main(a: BootLoopArgs, d: &crate::cli::Defaults) -> i32 {
    crate::one_daemon::closing_line("boot-loop", boot_loop(a, d))
}

fn boot_loop(a: BootLoopArgs, d: &crate::cli::Defaults) -> Result<(usize, usize), String> {
    let mut one = OneDaemon::start(&a.common, d, "boot-loop")?;
    let (mut passed, mut failed, mut tried) = (0usize, 0usize, 0usize);
    let t0 = Instant::now();
    for b in 1..=a.boots {
        if let Some(sig) = crate::children::stop_requested() {
            return Err(format!("interrupted by signal {sig}"));
        }
        let args = if b == 1 {
            "--mkfs e2e".to_string()
        } else {
            format!("--expect-gen {} persist", b - 1)
        };
        let run_args = RunArgs {
            timeout: a.timeout,
            ..one.run_args(&a.common, &format!("boot{b}"), args)
        };
        let spec = run_args.spec(d).map_err(|e| e.to_string())?;
        tried += 1;
        match run::run(&spec) {
            Ok(o) if o.ok() => {
                passed += 1;
                info(format!("boot {b}/{}: ok ({})", a.boots, o.summary_line()));
            }
            Ok(o) => {
                failed += 1;
                info(format!(
                    "boot {b}/{}: FAILED ({})",
                    a.boots,
                    o.summary_line()
                ));
            }
            Err(e) => {
                failed += 1;
                info(format!("boot {b}/{}: FAILED: {e}", a.boots));
            }
        }
        if !one.daemon.is_running() {
            failed += (a.boots - b) as usize + 1;
            info("the daemon died");
            break;
        }
    }
    let elapsed = t0.elapsed().as_secs();
    match one.daemon.stop(Duration::from_secs(15)) {
        Ok(st) if st.success() => {}
        Ok(st) => {
            failed += 1;
            info(format!("the daemon exited with {st} after SIGTERM"));
        }
        Err(e) => {
            failed += 1;
            info(e.to_string());
        }
    }
    match one.daemon.metrics() {
        Ok(Some(m)) => {
            let c = m.counters;
            let l = m.map_latency_us;
            info(format!(
                "{tried} boots in {elapsed} s on one daemon: {} connections, {} SHMEM_MAPs \
                 (after SET_FEATURES: min {} us, median {} us, max {} us)",
                c.connections, c.maps, l.min, l.p50, l.max
            ));
            if (c.maps as usize) < passed {
                failed += 1;
                info(format!(
                    "fewer maps ({}) than good boots ({passed})",
                    c.maps
                ));
            }
            if c.connections as usize != tried {
                failed += 1;
                info(format!(
                    "the daemon counted {} connections for {tried} QEMU runs",
                    c.connections
                ));
            }
        }
        Ok(None) => {
            failed += 1;
            info("the daemon wrote no metrics at exit");
        }
        Err(e) => {
            failed += 1;
            info(e.to_string());
        }
    }
    Ok((passed, failed))
}
