//! The VM test runner: boots QEMU with a virtio-pmem device — this project's vhost-user
//! daemon or QEMU's built-in device — runs the guest test binary inside, answers its host-link
//! requests, and judges the run from the guest's TAP, the daemon's metrics, faultfs's counts
//! and the host image.
//!
//! The path of a run: `cli` (arguments → a typed [`spec::RunSpec`]) → `run` (faultfs, the
//! daemon through `pmem_frontend::daemon`, QEMU from `qemu`, the watch loop, `hostlink`) →
//! `tap`, `hostcheck`, `checks` → the report (`result.txt`, `junit.xml`, the closing line).

pub mod boot_loop;
pub mod checks;
pub mod children;
pub mod cli;
pub mod console;
pub mod cpu;
pub mod flush_checks;
pub mod hostcheck;
pub mod hostlink;
pub mod junit;
pub mod libvirt;
pub mod one_daemon;
pub mod qemu;
pub mod report;
pub mod run;
pub mod shared_image;
pub mod soak;
pub mod spec;
pub mod tap;
