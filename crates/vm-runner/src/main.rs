//! `vmrun`: one guest run (see `vmrun --help`), a boot loop (`vmrun boot-loop --help`) or a
//! soak (`vmrun soak --help`).

use clap::Parser;

use vm_runner::cli::{Cli, Command, Defaults};
use vm_runner::{boot_loop, children, hostlink, run, shared_image, soak};

fn main() {
    let cli = Cli::parse();
    if cli.list_actions {
        print!("{}", hostlink::list_actions());
        return;
    }
    if let Err(e) = children::install_signal_handlers() {
        eprintln!("vmrun: error: cannot install signal handlers: {e}");
        std::process::exit(1);
    }
    let defaults = Defaults::from_env();
    let code = match cli.command {
        Some(Command::BootLoop(args)) => boot_loop::main(args, &defaults),
        Some(Command::Soak(args)) => soak::main(args, &defaults),
        Some(Command::SharedImage(args)) => shared_image::main(args, &defaults),
        Some(Command::Metrics { file }) => match pmem_metrics::Metrics::read(&file) {
            Ok(m) => {
                print!("{}", vm_runner::report::flatten(&m));
                0
            }
            Err(e) => {
                eprintln!("vmrun: error: {e}");
                1
            }
        },
        None => {
            let spec = match cli.run.spec(&defaults) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("vmrun: error: {e}");
                    std::process::exit(2);
                }
            };
            match run::run(&spec) {
                Ok(outcome) => {
                    println!("{}", outcome.summary_line());
                    i32::from(!outcome.ok())
                }
                Err(run::RunError::Interrupted(sig)) => {
                    eprintln!("vmrun: interrupted by signal {sig}; every child stopped");
                    128 + sig
                }
                Err(e) => {
                    eprintln!("vmrun: error: {e}");
                    println!("{}: 0 passed, 1 failed", spec.device_name());
                    1
                }
            }
        }
    };
    std::process::exit(code);
}
