//! Whether this process may make an io_uring at all, asked before any core starts.
//!
//! The module's unsafe code is the two system calls (`io_uring_setup`, `close`), which the
//! standard library does not offer.

#![allow(unsafe_code)]

use std::ffi::c_int;

/// The size of the kernel's `struct io_uring_params` (Linux 5.4 and later).
const PARAMS_SIZE: usize = 120;

/// Whether this process may make an io_uring at all: one small ring is made and closed at
/// once. Without this look, a kernel or a sandbox without io_uring would make glommio fail
/// inside each core's thread.
pub(crate) fn io_uring() -> std::io::Result<()> {
    let mut params = [0u8; PARAMS_SIZE];
    // SAFETY: io_uring_setup reads and writes the struct io_uring_params it is given, which
    // is PARAMS_SIZE bytes, the size of `params`.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is the ring just made, owned by nothing else.
    unsafe { libc::close(fd as c_int) };
    Ok(())
}

/// What to do when [`io_uring`] fails with `e`.
pub(crate) fn advice(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => format!(
            "this kernel has no io_uring ({e}); postern needs Linux 5.8 or later with io_uring"
        ),
        Some(libc::EPERM) | Some(libc::EACCES) => format!(
            "io_uring is not allowed here ({e}): set the sysctl kernel.io_uring_disabled to 0, \
             and where a seccomp profile blocks it (a container runtime's default), allow \
             io_uring_setup, io_uring_enter and io_uring_register"
        ),
        Some(libc::ENOMEM) => format!(
            "cannot make an io_uring ({e}): raise the locked-memory limit with \
             `ulimit -l unlimited`, or LimitMEMLOCK=infinity in the systemd unit"
        ),
        _ => format!("cannot make an io_uring ({e}); postern needs io_uring (Linux 5.8 or later)"),
    }
}
