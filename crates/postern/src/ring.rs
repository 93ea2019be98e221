//! io_uring set-up flags that glommio does not expose.
//!
//! By default the kernel interrupts a thread that is running in user space whenever one of its
//! io_uring operations completes (an inter-processor interrupt to the core running it), so
//! that the completion is posted at once. A postern core is rarely idle under load and enters
//! the kernel on every `recv` and `send` anyway, where pending completions are posted without
//! an interrupt; with one interrupt per socket readiness, the interrupts cost the peer that
//! wrote to the socket (which sends them) and the core (which takes them) more than the
//! messages themselves on a busy machine. `IORING_SETUP_COOP_TASKRUN` (Linux 5.19) turns them
//! off: completions are posted at the core's next entry into the kernel, and a sleeping core
//! is still woken at once.
//!
//! glommio makes its rings through liburing's `io_uring_queue_init_params`, which the build
//! script routes here (`--wrap`): the flag is added to the parameters and the real function
//! called; on a kernel that does not know the flag the ring is made as before.

#![allow(unsafe_code)]

use std::ffi::{c_int, c_uint, c_void};

/// `IORING_SETUP_IOPOLL`: a ring polled for block completions (left as glommio asks).
const SETUP_IOPOLL: u32 = 1 << 0;
/// `IORING_SETUP_COOP_TASKRUN`.
const SETUP_COOP_TASKRUN: u32 = 1 << 8;
/// `EINVAL`: a flag the kernel does not know.
const EINVAL: c_int = 22;

/// The start of the kernel's `struct io_uring_params`; only `flags` is read or written here.
#[repr(C)]
pub(crate) struct ParamsHead {
    sq_entries: u32,
    cq_entries: u32,
    flags: u32,
}

extern "C" {
    /// liburing's own function, under the name `--wrap` gives it.
    fn __real_io_uring_queue_init_params(
        entries: c_uint,
        ring: *mut c_void,
        params: *mut ParamsHead,
    ) -> c_int;
}

/// What glommio's calls to `io_uring_queue_init_params` reach: the same function with
/// cooperative task running asked for. Returns what liburing returns (`-errno` on failure).
///
/// # Safety
/// The contract of liburing's function: `ring` and `params` point to valid, writable
/// `struct io_uring` and `struct io_uring_params`.
#[no_mangle]
pub(crate) unsafe extern "C" fn __wrap_io_uring_queue_init_params(
    entries: c_uint,
    ring: *mut c_void,
    params: *mut ParamsHead,
) -> c_int {
    if params.is_null() {
        // SAFETY: passed through unchanged; liburing handles its own arguments.
        return unsafe { __real_io_uring_queue_init_params(entries, ring, params) };
    }
    // SAFETY: `params` is non-null and, by the caller's contract, a valid io_uring_params,
    // whose third u32 is `flags`.
    let asked = unsafe { (*params).flags };
    if asked & SETUP_IOPOLL == 0 {
        // SAFETY: as above.
        unsafe { (*params).flags = asked | SETUP_COOP_TASKRUN };
        // SAFETY: the caller's arguments, with one more flag set.
        let made = unsafe { __real_io_uring_queue_init_params(entries, ring, params) };
        if made != -EINVAL {
            return made;
        }
        // SAFETY: as above; the kernel rejected the flag (before Linux 5.19): ask as glommio did.
        unsafe { (*params).flags = asked };
    }
    // SAFETY: the caller's arguments, unchanged.
    unsafe { __real_io_uring_queue_init_params(entries, ring, params) }
}
