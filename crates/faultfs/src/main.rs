use clap::Parser;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    if let Err(e) = faultfs::run(faultfs::Args::parse()) {
        eprintln!("faultfs: error: {e}");
        std::process::exit(1);
    }
}
