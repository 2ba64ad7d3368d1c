//! pmem-guest-tests: the guest half of the vhost-user-pmem test suite. It runs as the only
//! program of a small initramfs guest and reports on stdout as one TAP stream.

mod args;
mod cases;
mod crash;
mod error;
mod fiemap;
mod flush_timer;
mod isolate;
mod kmsg;
mod meminfo;
mod mounts;
mod nd;
mod pattern;
mod precond;
mod sha256;
mod stats;
mod sync;
mod sys;
mod tap;
mod tools;
mod trace;

use args::Command;

fn main() {
    let args = match args::parse(std::env::args().skip(1)) {
        Ok(Command::Run(a)) => *a,
        Ok(Command::Help) => {
            print!("{}", args::usage());
            return;
        }
        Err(e) => {
            // On stdout too, as TAP: in the guest, the console is all the runner sees.
            println!("Bail out! pmem-guest-tests: bad arguments: {e}");
            eprintln!("pmem-guest-tests: error: {e}\n\n{}", args::usage());
            std::process::exit(2);
        }
    };
    crash::install();
    let mut ctx = cases::Ctx::new(&args);
    ctx.diag(&format!(
        "pmem-guest-tests {} on Linux {}; dev={} mnt={} fs={} suites={}",
        env!("CARGO_PKG_VERSION"),
        sys::kernel_release(),
        args.dev.display(),
        args.mnt.display(),
        args.fs.name(),
        args.suites
            .iter()
            .map(|s| s.name)
            .collect::<Vec<_>>()
            .join(",")
    ));
    for suite in &args.suites {
        cases::run_suite(&mut ctx, suite);
    }
    if args.crash_at_end {
        ctx.crash_now();
    }
    std::process::exit(ctx.finish());
}
