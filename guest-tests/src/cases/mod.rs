//! The guest suites. `suites` holds the table of them; each case file holds its cases and
//! the suite(s) made of them; `runner` runs one case and keeps the TAP stream; `fs_state`
//! is what the run has done to the filesystem, with the set-up steps suites share.

mod alloc;
pub(crate) mod common;
mod dax;
mod device;
mod dio;
mod fault_latency;
mod faults;
mod fill;
mod flush;
mod flush_latency;
mod fs_state;
mod fsync_loop;
mod hostlink;
mod map_sync;
mod paired;
mod persist;
mod pmd;
mod readonly;
mod rebind;
mod runner;
mod selftest;
mod soak;
pub mod suites;
mod truncate;

pub use runner::{Ctx, Env, Verdict};
pub use suites::run_suite;
