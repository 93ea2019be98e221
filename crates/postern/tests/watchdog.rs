//! The cores' watchdog: a core whose timers stop firing is noticed within about a second,
//! logged, counted, and sent the signal that ends its wait in the kernel; the server goes on.
//!
//! A lost wake-up cannot be made to order, so the test stops one core thread of the real
//! server with ptrace (only that thread: the watchdog's own thread keeps running), which
//! looks the same from outside: a core whose heartbeat does not move.
#![allow(clippy::unwrap_used, clippy::expect_used, unsafe_code)]

mod common;

use std::time::{Duration, Instant};

use common::Server;

const SYS_IO_URING_ENTER: &str = "426";

/// The kernel thread IDs of the server's core threads waiting in `io_uring_enter` (the
/// executors; the cores' blocking-pool threads wait on a futex).
fn core_threads(pid: u32) -> Vec<i32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut found = Vec::new();
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let dir = task.unwrap().path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            let syscall = std::fs::read_to_string(dir.join("syscall")).unwrap_or_default();
            if comm.starts_with("postern-core-")
                && syscall.split_whitespace().next() == Some(SYS_IO_URING_ENTER)
            {
                found.push(dir.file_name().unwrap().to_str().unwrap().parse().unwrap());
            }
        }
        if !found.is_empty() || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The signal mask of `field` (`SigCgt`, `SigPnd`...) in a /proc status file.
fn mask(status_path: &str, field: &str) -> u64 {
    let text = std::fs::read_to_string(status_path).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap();
    u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
}

fn bit(sig: i32) -> u64 {
    1 << (sig - 1)
}

/// One thread of the server held stopped by ptrace, and let go when dropped: also when an
/// assertion fails, or the server could not be reaped (a traced thread waits for its tracer).
struct Stopped(i32);

impl Stopped {
    fn seize(tid: i32) -> Stopped {
        // SAFETY: ptrace on a thread of our own child.
        let seized = unsafe {
            libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0) == 0
                && libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) == 0
        };
        assert!(seized, "ptrace: {}", std::io::Error::last_os_error());
        let stopped = Stopped(tid);
        let mut status = 0;
        // SAFETY: waits for the ptrace stop of the thread seized above.
        let waited = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
        assert_eq!(waited, tid);
        stopped
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: detaches the thread seized in `seize`; it runs on and takes its pending
        // signals.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, self.0, 0, 0) };
    }
}

#[test]
fn a_core_whose_timers_stop_is_logged_counted_and_interrupted_and_the_server_goes_on() {
    let mut server = Server::start(&["--cores", "2", "--metrics", "127.0.0.1:0"]);
    let pid = server.child.id();
    // The wake-up signal has a handler: sent to a core, it ends the wait instead of being
    // ignored (SIGURG's default) or killing the process.
    assert_ne!(
        mask(&format!("/proc/{pid}/status"), "SigCgt") & bit(libc::SIGURG),
        0,
        "no handler for the watchdog's signal"
    );
    let body = server.metrics_until(|m| m.contains("postern_core_stalls_total 0"));
    assert!(body.contains("postern_core_stalls_total 0"), "{body}");

    let threads = core_threads(pid);
    assert!(
        !threads.is_empty(),
        "no core thread found waiting in io_uring_enter"
    );
    let tid = threads[0];
    let task_status = format!("/proc/{pid}/task/{tid}/status");
    let stopped = Stopped::seize(tid);
    let stopped_at = Instant::now();
    // The watchdog's signal reaches the stopped thread and waits there, pending.
    let deadline = Instant::now() + Duration::from_secs(10);
    while mask(&task_status, "SigPnd") & bit(libc::SIGURG) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let noticed = stopped_at.elapsed();
    let pending = mask(&task_status, "SigPnd");
    drop(stopped);
    assert_ne!(
        pending & bit(libc::SIGURG),
        0,
        "no SIGURG sent to the stalled core"
    );
    assert!(
        noticed >= Duration::from_millis(900),
        "interrupted after only {noticed:?}"
    );
    let line = server.log_until(|l| l.contains("ran no timer"));
    assert!(line.contains("interrupting its wait"), "{line}");

    let body = server.metrics_until(|m| m.contains("postern_core_stalls_total 1"));
    assert!(body.contains("postern_core_stalls_total 1"), "{body}");
    let per_core = |m: &str| -> Vec<u64> {
        m.lines()
            .filter(|l| l.starts_with("postern_core_connections_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect()
    };
    let before = per_core(&body);
    assert_eq!(before.len(), 2, "{body}");
    // Both cores serve mail again: enough connections that the kernel gives each core some
    // (the chance that 32 all go to one is one in two thousand million), as the per-core
    // counts then show.
    for n in 0..32 {
        let mut c = server.connect();
        assert!(c.line().starts_with("220 "));
        c.send(b"EHLO after.test\r\n");
        assert!(c.reply().last().unwrap().starts_with("250 "));
        assert!(c.cmd("MAIL FROM:<a@after.test>").starts_with("250"));
        assert!(c.cmd("RCPT TO:<r@dest.test>").starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        let reply = c.cmd(&format!("Subject: {n}\r\n\r\nafter the stall\r\n."));
        assert!(reply.starts_with("250 2.0.0"), "{reply}");
    }
    server.metrics_until(|m| {
        let now = per_core(m);
        now.len() == 2 && now.iter().zip(&before).all(|(n, b)| n > b)
    });
    let exit = server.terminate();
    assert!(exit.success(), "{exit:?}");
}
