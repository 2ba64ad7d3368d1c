//! A frontend must not be able to kill the daemon through the guest memory it shares. The
//! daemon maps the frontend's memory files (SET_MEM_TABLE) to read the rings; if the frontend
//! then truncates one, the next access to the cut-off part raises SIGBUS, which by default
//! kills the process. The handler here catches a SIGBUS whose address lies in the current
//! guest memory table, maps a private zero page over the faulting page, and lets the access
//! run again: it reads zeros (a ring that says nothing, or descriptors the request parser
//! refuses) and a write goes nowhere. The fault is counted; the vring thread logs it and the
//! metrics show it (`counters.memory_faults`). Any other SIGBUS keeps its default action.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Regions of one memory table; vhost-user allows 8 (QEMU sends at most 8 and the protocol
/// feature for more is not offered), with room to spare.
const SLOTS: usize = 64;
const PAGE: usize = 4096;

/// The table the handler reads: `COUNT` valid `(start, len)` pairs. Written only by
/// [`set_regions`], which zeroes `COUNT` first, so the handler never reads a half-written pair.
static COUNT: AtomicUsize = AtomicUsize::new(0);
static STARTS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static LENS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static FAULTS: AtomicU64 = AtomicU64::new(0);

/// Installs the handler, once, before the sandbox (sigaction is not on its allow-list).
pub fn install() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid starting point; every field used is set below.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigbus as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: sa_mask is a plain sigset_t owned by `sa`.
    unsafe { libc::sigemptyset(&mut sa.sa_mask) };
    // SAFETY: a valid sigaction for SIGBUS, whose handler is async-signal-safe (atomics and
    // mmap only).
    if unsafe { libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The guest memory the daemon has mapped now, as host `(address, length)` pairs; replaces
/// the previous table. More than [`SLOTS`] regions: the rest stay unguarded.
pub fn set_regions(regions: impl IntoIterator<Item = (usize, usize)>) {
    COUNT.store(0, Ordering::SeqCst);
    let mut n = 0;
    for (start, len) in regions.into_iter().take(SLOTS) {
        STARTS[n].store(start, Ordering::SeqCst);
        LENS[n].store(len, Ordering::SeqCst);
        n += 1;
    }
    COUNT.store(n, Ordering::SeqCst);
}

/// SIGBUS faults in guest memory survived since the daemon started.
pub fn faults() -> u64 {
    FAULTS.load(Ordering::Relaxed)
}

fn in_guest_memory(addr: usize) -> bool {
    let n = COUNT.load(Ordering::SeqCst);
    (0..n).any(|i| {
        let start = STARTS[i].load(Ordering::SeqCst);
        let len = LENS[i].load(Ordering::SeqCst);
        addr >= start && addr - start < len
    })
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    if in_guest_memory(addr) {
        let page = addr & !(PAGE - 1);
        // SAFETY: the page lies in a mapping of the frontend's memory that the daemon made;
        // replacing it with an anonymous private page leaves no Rust reference dangling (the
        // daemon accesses guest memory through raw volatile accesses only).
        let r = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if r != libc::MAP_FAILED {
            FAULTS.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    // Not guest memory (or the page could not be replaced): the default action, which the
    // faulting access meets again as soon as this returns.
    // SAFETY: restoring the default disposition of SIGBUS; signal(2) is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_table_counts_as_guest_memory() {
        set_regions([(0x10000, 0x2000), (0x40000, 0x1000)]);
        assert!(in_guest_memory(0x10000));
        assert!(in_guest_memory(0x11fff));
        assert!(!in_guest_memory(0x12000));
        assert!(in_guest_memory(0x40800));
        assert!(!in_guest_memory(0xffff));
        set_regions([]);
        assert!(!in_guest_memory(0x10000));
    }
}
