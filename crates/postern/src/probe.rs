//! Whether this process may make and use an io_uring, asked before any core starts.
//!
//! The module's unsafe code is the system calls (`io_uring_setup`, `io_uring_register`,
//! `io_uring_enter`, `close`, `uname`), which the standard library does not offer.

#![allow(unsafe_code)]

use std::ffi::c_int;

/// The size of the kernel's `struct io_uring_params` (Linux 5.4 and later).
const PARAMS_SIZE: usize = 120;

/// `IORING_REGISTER_PROBE` (Linux 5.6): which operations the kernel's io_uring knows.
const REGISTER_PROBE: u32 = 8;
/// Room for this many operations in the probe's answer.
const PROBE_OPS: usize = 64;
/// The oldest kernel glommio runs on.
const OLDEST: (u32, u32) = (5, 8);

/// Whether this process may make and use an io_uring: one small ring is made, asked what it
/// supports (`io_uring_register`), entered once with nothing to do (`io_uring_enter`), and
/// closed. Without this look, a kernel or a sandbox without io_uring, or a seccomp profile
/// that allows making a ring but not using it, would make glommio fail (panic) inside each
/// core's thread. A kernel older than glommio needs is refused by its version first.
pub(crate) fn io_uring() -> std::io::Result<()> {
    if let Some(release) = kernel_release() {
        if !at_least(&release, OLDEST) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                format!("Linux {release}"),
            ));
        }
    }
    let mut params = [0u8; PARAMS_SIZE];
    // SAFETY: io_uring_setup reads and writes the struct io_uring_params it is given, which
    // is PARAMS_SIZE bytes, the size of `params`.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let used = use_ring(fd as c_int);
    // SAFETY: `fd` is the ring just made, owned by nothing else.
    unsafe { libc::close(fd as c_int) };
    used
}

/// The calls glommio makes on a ring beside its making.
fn use_ring(fd: c_int) -> std::io::Result<()> {
    // struct io_uring_probe: 16 bytes, then 8 for each operation.
    let mut probe = [0u8; 16 + 8 * PROBE_OPS];
    // SAFETY: IORING_REGISTER_PROBE writes a struct io_uring_probe with room for `nr_args`
    // operations into the buffer it is given, which has that room.
    let r = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            fd,
            REGISTER_PROBE,
            probe.as_mut_ptr(),
            PROBE_OPS as u32,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: nothing to submit and nothing to wait for; no signal mask is passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_io_uring_enter,
            fd,
            0u32,
            0u32,
            0u32,
            std::ptr::null::<libc::sigset_t>(),
            0usize,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel's release, as `uname -r` gives it.
fn kernel_release() -> Option<String> {
    // SAFETY: uname fills the struct it is given; a zeroed one is a valid start.
    let mut names: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `names` is a utsname the call may write.
    if unsafe { libc::uname(&mut names) } != 0 {
        return None;
    }
    // SAFETY: uname leaves NUL-terminated strings in its fields.
    let release = unsafe { std::ffi::CStr::from_ptr(names.release.as_ptr()) };
    Some(release.to_string_lossy().into_owned())
}

/// Whether a release such as `6.1.0-13-amd64` or `5.15.0` is at least `major.minor`. One that
/// cannot be read is given the benefit of the doubt.
fn at_least(release: &str, (major, minor): (u32, u32)) -> bool {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let number = |p: Option<&str>| p.and_then(|p| p.parse::<u32>().ok());
    match (number(parts.next()), number(parts.next())) {
        (Some(ma), Some(mi)) => (ma, mi) >= (major, minor),
        _ => true,
    }
}

/// Whether a seccomp filter confines this process (`Seccomp: 2` in `/proc/self/status`), as
/// container runtimes do by default.
fn seccomp_filtered() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .any(|line| line.strip_prefix("Seccomp:").map(str::trim) == Some("2"))
    })
}

/// What to do when [`io_uring`] fails with `e`.
pub(crate) fn advice(e: &std::io::Error) -> String {
    advice_under(e, seccomp_filtered())
}

/// What to do when [`io_uring`] fails with `e`, `filtered` saying whether a seccomp filter
/// confines this process: a filter that refuses io_uring answers ENOSYS (the default profile
/// of Podman and CRI-O) or EPERM (Docker's, containerd's), which a kernel without io_uring
/// or with it disabled answers too. Any filter counts (systemd's `SystemCallFilter=` makes
/// one too), so the filter is given as the likely cause, not the sure one.
fn advice_under(e: &std::io::Error, filtered: bool) -> String {
    if e.kind() == std::io::ErrorKind::Unsupported && e.raw_os_error().is_none() {
        return format!(
            "this kernel ({e}) is older than Linux {}.{}, which postern needs for its io_uring",
            OLDEST.0, OLDEST.1
        );
    }
    match e.raw_os_error() {
        Some(libc::ENOSYS) if filtered => format!(
            "io_uring is refused by this process's seccomp filter ({e}), as a container \
             runtime's default profile does (unless this kernel was built without io_uring): \
             run with a profile that also allows io_uring_setup, io_uring_enter and \
             io_uring_register (deploy/seccomp.json)"
        ),
        Some(libc::ENOSYS) => format!(
            "this kernel has no io_uring ({e}): it was built without it (CONFIG_IO_URING); \
             postern needs Linux 5.8 or later with io_uring"
        ),
        Some(libc::EPERM) | Some(libc::EACCES) if filtered => format!(
            "io_uring is not allowed here ({e}): this process's seccomp filter refuses it, as a \
             container runtime's default profile does, unless the sysctl \
             kernel.io_uring_disabled does: run with a profile that also allows \
             io_uring_setup, io_uring_enter and io_uring_register (deploy/seccomp.json), and \
             where the host's kernel.io_uring_disabled is not 0, set it to 0 there"
        ),
        Some(libc::EPERM) | Some(libc::EACCES) => format!(
            "io_uring is not allowed here ({e}): set the sysctl kernel.io_uring_disabled to 0, \
             and where a seccomp profile blocks it (a container runtime's default), allow \
             io_uring_setup, io_uring_enter and io_uring_register"
        ),
        // A kernel whose io_uring predates what is asked of it (IORING_REGISTER_PROBE).
        Some(libc::EINVAL) => format!(
            "this kernel's io_uring is too old ({e}); postern needs Linux {}.{} or later",
            OLDEST.0, OLDEST.1
        ),
        Some(libc::ENOMEM) => format!(
            "cannot make an io_uring ({e}): the memlock limit here is {}; raise the \
             locked-memory limit with `ulimit -l unlimited`, or LimitMEMLOCK=infinity in the \
             systemd unit (or, where it is already unlimited, free memory)",
            postern_server::memlock_limit_text()
        ),
        _ => format!("cannot make an io_uring ({e}); postern needs io_uring (Linux 5.8 or later)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_are_compared_by_major_and_minor() {
        assert!(at_least("5.8.0", (5, 8)));
        assert!(at_least("6.18.44-fc-v1272", (5, 8)));
        assert!(at_least("5.10.0-28-amd64", (5, 8)));
        assert!(!at_least("5.4.0-150-generic", (5, 8)));
        assert!(!at_least("4.19.0-26-amd64", (5, 8)));
        assert!(!at_least("5.7", (5, 8)));
        // Unreadable: not refused on that ground.
        assert!(at_least("", (5, 8)));
        assert!(at_least("custom", (5, 8)));
    }

    #[test]
    fn an_old_kernel_is_advised_as_such() {
        let e = std::io::Error::new(std::io::ErrorKind::Unsupported, "Linux 5.4.0");
        assert_eq!(
            advice(&e),
            "this kernel (Linux 5.4.0) is older than Linux 5.8, which postern needs for its io_uring"
        );
        let e = std::io::Error::from_raw_os_error(libc::EINVAL);
        assert!(advice(&e).starts_with("this kernel's io_uring is too old"));
    }

    #[test]
    fn a_missing_io_uring_is_told_apart_from_one_a_seccomp_filter_refuses() {
        let e = std::io::Error::from_raw_os_error(libc::ENOSYS);
        let unfiltered = advice_under(&e, false);
        assert!(
            unfiltered.starts_with("this kernel has no io_uring"),
            "{unfiltered}"
        );
        let filtered = advice_under(&e, true);
        assert!(filtered.starts_with("io_uring is refused by this process's seccomp filter"));
        assert!(filtered.contains("deploy/seccomp.json"), "{filtered}");
        // Docker's and containerd's profiles answer EPERM.
        let e = std::io::Error::from_raw_os_error(libc::EPERM);
        let unfiltered = advice_under(&e, false);
        assert!(
            unfiltered.contains("kernel.io_uring_disabled"),
            "{unfiltered}"
        );
        assert!(!unfiltered.contains("deploy/seccomp.json"), "{unfiltered}");
        let filtered = advice_under(&e, true);
        assert!(filtered.contains("seccomp filter refuses it"), "{filtered}");
        assert!(filtered.contains("deploy/seccomp.json"), "{filtered}");
    }

    #[test]
    fn this_machine_may_make_and_use_a_ring() {
        // The tests run where postern runs (io_uring allowed): the probe finds no fault.
        io_uring().unwrap();
    }
}
