//! Reports a fatal signal (a SIGBUS from a DAX fault on an unmapped region, say) as a
//! `not ok` line and a TAP `Bail out!` before the process dies, so the runner sees which
//! case died instead of a stream that just stops.

use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

static MESSAGE: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static MESSAGE_LEN: AtomicUsize = AtomicUsize::new(0);

/// Remember which case is running. The message is leaked on purpose: the handler may read
/// it at any time, and a few dozen cases leak a few KiB.
pub fn arm(number: usize, name: &str) {
    let text = format!("\nnot ok {number} - {name} # killed by a fatal signal\nBail out! fatal signal in case {name}: ");
    let leaked: &'static mut [u8] = Box::leak(text.into_bytes().into_boxed_slice());
    MESSAGE_LEN.store(0, Ordering::SeqCst);
    MESSAGE.store(leaked.as_mut_ptr(), Ordering::SeqCst);
    MESSAGE_LEN.store(leaked.len(), Ordering::SeqCst);
}

pub fn disarm() {
    MESSAGE_LEN.store(0, Ordering::SeqCst);
}

fn write_raw(bytes: &[u8]) {
    // SAFETY: write(2) is async-signal-safe and the buffer is valid for its length.
    unsafe {
        libc::write(1, bytes.as_ptr().cast(), bytes.len());
    }
}

extern "C" fn on_fatal(sig: libc::c_int) {
    let len = MESSAGE_LEN.load(Ordering::SeqCst);
    let ptr = MESSAGE.load(Ordering::SeqCst);
    if len > 0 && !ptr.is_null() {
        // SAFETY: ptr/len describe a leaked, never-freed buffer published by arm().
        write_raw(unsafe { std::slice::from_raw_parts(ptr, len) });
        let name: &[u8] = match sig {
            libc::SIGBUS => b"SIGBUS\n",
            libc::SIGSEGV => b"SIGSEGV\n",
            libc::SIGILL => b"SIGILL\n",
            _ => b"signal\n",
        };
        write_raw(name);
    }
    // SAFETY: restoring the default action and re-raising are async-signal-safe; the
    // process then dies with the original signal, which init reports as the exit status.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

pub fn install() {
    for sig in [libc::SIGBUS, libc::SIGSEGV, libc::SIGILL] {
        // SAFETY: on_fatal only uses async-signal-safe calls and atomics.
        unsafe {
            libc::signal(sig, on_fatal as *const () as libc::sighandler_t);
        }
    }
}
