//! A watch on the cores' own timers. Each core ticks a heartbeat from a timer; a thread looks
//! at the heartbeats, and a core whose heartbeat has not moved for [`STALL_AFTER`] gets a
//! signal that interrupts its wait in the kernel.
//!
//! Why: a core sleeps in `io_uring_enter` on its main ring, and its timers fire in another
//! ring, whose completions reach the main ring through a poll on that ring's descriptor. Were
//! that wake-up ever lost, the core would sleep until some socket woke it: its timeouts, its
//! retries and a stop request would all wait, and an idle server would not stop on SIGTERM. A
//! signal ends the wait (`EINTR`: the kernel never restarts an `io_uring_enter` wait, even for
//! a handler installed with `SA_RESTART`); glommio then looks at every ring again and finds
//! the timer that fired. A core that is merely busy is not harmed by the signal: its empty
//! handler runs and returns. A core blocked in another system call that the kernel restarts
//! after a signal (`SA_RESTART`: a lock, a pipe, a socket, a network file system mounted
//! `intr`) goes on rather than failing with `EINTR`.
//!
//! Each stall is logged once, with the `postern_core_stalls_total` counter raised.
//!
//! The module's unsafe code is the three system calls this needs (`gettid`, `sigaction`,
//! `tgkill`), which the standard library does not offer.

#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// How often a core ticks its heartbeat.
pub(crate) const BEAT_EVERY: Duration = Duration::from_millis(100);

/// A heartbeat that has not moved for this long is a stalled core.
pub(crate) const STALL_AFTER: Duration = Duration::from_secs(1);

/// How often the watchdog looks.
const LOOK_EVERY: Duration = Duration::from_millis(250);

/// What one core shares with the watchdog.
#[derive(Debug, Default)]
pub(crate) struct Beat {
    /// The core thread's kernel thread ID (0 until the core runs).
    tid: AtomicI32,
    /// Ticks so far.
    beats: AtomicU64,
    /// The core has ended (or failed): nothing more to watch.
    done: AtomicBool,
    /// The core blocks on purpose (the stop's last sync, on its own thread): not a stall.
    blocking: AtomicBool,
}

impl Beat {
    /// Called on the core's own thread as it starts ticking.
    pub(crate) fn started(&self) {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        self.tid.store(tid, Ordering::Release);
    }

    /// One tick.
    pub(crate) fn beat(&self) {
        self.beats.fetch_add(1, Ordering::Release);
    }

    /// The core has ended.
    pub(crate) fn ended(&self) {
        self.done.store(true, Ordering::Release);
    }

    /// The core is about to block on purpose (true), or is done with it (false): the time in
    /// between is not taken for a stall.
    pub(crate) fn blocking(&self, on: bool) {
        self.blocking.store(on, Ordering::Release);
    }
}

/// Marks a core ended when dropped, so that a core that panics is not taken for a stalled one.
pub(crate) struct EndsBeat(pub(crate) Arc<Beat>);

impl Drop for EndsBeat {
    fn drop(&mut self) {
        self.0.ended();
    }
}

/// The signal that interrupts a stalled core's wait. SIGURG is ignored by default, so a
/// stray one is harmless, and nothing here asks for it otherwise (no `F_SETOWN`).
pub(crate) const WAKE_SIGNAL: libc::c_int = libc::SIGURG;

extern "C" fn on_wake_signal(_: libc::c_int) {}

/// Installs the empty handler for [`WAKE_SIGNAL`], with `SA_RESTART`, once per process.
pub(crate) fn install_handler() -> std::io::Result<()> {
    static INSTALLED: OnceLock<i32> = OnceLock::new();
    let errno = *INSTALLED.get_or_init(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler is
        // async-signal-safe (it does nothing).
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_wake_signal as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(WAKE_SIGNAL, &action, std::ptr::null_mut())
        };
        if rc == 0 {
            0
        } else {
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL)
        }
    });
    match errno {
        0 => Ok(()),
        errno => Err(std::io::Error::from_raw_os_error(errno)),
    }
}

/// What the watchdog knows of one core between looks.
struct Seen {
    beats: u64,
    since: Instant,
    stalled: bool,
}

/// The watchdog's state: which cores to interrupt at each look. Kept apart from the thread so
/// that its rules can be tried with chosen times.
pub(crate) struct Watch {
    cores: Vec<Arc<Beat>>,
    seen: Vec<Option<Seen>>,
    stalls: Arc<AtomicU64>,
}

impl Watch {
    pub(crate) fn new(cores: Vec<Arc<Beat>>, stalls: Arc<AtomicU64>) -> Self {
        let seen = cores.iter().map(|_| None).collect();
        Watch {
            cores,
            seen,
            stalls,
        }
    }

    /// Whether every core has ended.
    pub(crate) fn all_ended(&self) -> bool {
        self.cores.iter().all(|c| c.done.load(Ordering::Acquire))
    }

    /// One look at `now`: the (core, thread ID) of each stalled core, and whether its stall is
    /// new (to be logged).
    pub(crate) fn look(&mut self, now: Instant) -> Vec<(usize, i32, bool)> {
        let mut stalled = Vec::new();
        for (id, (core, seen)) in self.cores.iter().zip(self.seen.iter_mut()).enumerate() {
            let tid = core.tid.load(Ordering::Acquire);
            if tid == 0 || core.done.load(Ordering::Acquire) {
                continue;
            }
            if core.blocking.load(Ordering::Acquire) {
                // Watched afresh once it is over.
                *seen = None;
                continue;
            }
            let beats = core.beats.load(Ordering::Acquire);
            match seen {
                Some(s) if s.beats == beats => {
                    if now.duration_since(s.since) >= STALL_AFTER {
                        let new = !s.stalled;
                        if new {
                            s.stalled = true;
                            self.stalls.fetch_add(1, Ordering::Relaxed);
                        }
                        stalled.push((id, tid, new));
                    }
                }
                _ => {
                    *seen = Some(Seen {
                        beats,
                        since: now,
                        stalled: false,
                    })
                }
            }
        }
        stalled
    }
}

/// Starts the watchdog thread; it ends once every core has ended.
pub(crate) fn spawn(cores: Vec<Arc<Beat>>, stalls: Arc<AtomicU64>) -> std::io::Result<()> {
    install_handler()?;
    let mut watch = Watch::new(cores, stalls);
    std::thread::Builder::new()
        .name("postern-watchdog".into())
        .spawn(move || {
            // SAFETY: getpid has no preconditions.
            let pid = unsafe { libc::getpid() };
            while !watch.all_ended() {
                std::thread::sleep(LOOK_EVERY);
                for (core, tid, new) in watch.look(Instant::now()) {
                    if new {
                        tracing::warn!(
                            core,
                            "core {core} ran no timer for {} ms (a lost wake-up, a long \
                             blocking call on the core, or a stall of the machine itself); \
                             interrupting its wait",
                            STALL_AFTER.as_millis()
                        );
                    }
                    // SAFETY: tgkill only sends a signal; a thread that has just ended gives
                    // ESRCH, which is ignored.
                    unsafe {
                        libc::syscall(libc::SYS_tgkill, pid, tid, WAKE_SIGNAL);
                    }
                }
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(n: usize) -> (Watch, Vec<Arc<Beat>>, Arc<AtomicU64>) {
        let beats: Vec<Arc<Beat>> = (0..n).map(|_| Arc::new(Beat::default())).collect();
        for (i, b) in beats.iter().enumerate() {
            b.tid.store(100 + i as i32, Ordering::Release);
        }
        let stalls = Arc::new(AtomicU64::new(0));
        (Watch::new(beats.clone(), stalls.clone()), beats, stalls)
    }

    #[test]
    fn a_core_that_stops_ticking_is_interrupted_and_counted_once() {
        let (mut w, beats, stalls) = watch(2);
        let t0 = Instant::now();
        assert!(w.look(t0).is_empty());
        beats[0].beat();
        assert!(w.look(t0 + STALL_AFTER / 2).is_empty());
        // Core 1 has not ticked since the first look; core 0 ticked half-way.
        assert_eq!(w.look(t0 + STALL_AFTER), vec![(1, 101, true)]);
        assert_eq!(
            w.look(t0 + STALL_AFTER * 2),
            vec![(0, 100, true), (1, 101, false)]
        );
        assert_eq!(stalls.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_core_that_ticks_again_is_left_alone_and_a_later_stall_counts_again() {
        let (mut w, beats, stalls) = watch(1);
        let t0 = Instant::now();
        w.look(t0);
        assert_eq!(w.look(t0 + STALL_AFTER).len(), 1);
        beats[0].beat();
        assert!(w.look(t0 + STALL_AFTER * 2).is_empty());
        assert!(w.look(t0 + STALL_AFTER * 2 + STALL_AFTER / 2).is_empty());
        assert_eq!(w.look(t0 + STALL_AFTER * 3), vec![(0, 100, true)]);
        assert_eq!(stalls.load(Ordering::Relaxed), 2);
    }

    /// Runs `call` on a thread of its own, sends that thread [`WAKE_SIGNAL`] once it is seen
    /// blocked in system call `nr`, then runs `release`; what `call` returned, or `None` when
    /// it has not returned within 10 s.
    fn signalled_in<T: Send + 'static>(
        nr: libc::c_long,
        call: impl FnOnce() -> T + Send + 'static,
        release: impl FnOnce(),
    ) -> Option<T> {
        install_handler().unwrap();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            let _ = done_tx.send(call());
        });
        let tid = tid_rx.recv().unwrap();
        let task = format!("/proc/self/task/{tid}");
        let in_call = || {
            std::fs::read_to_string(format!("{task}/syscall"))
                .is_ok_and(|s| s.split(' ').next() == Some(nr.to_string().as_str()))
                && std::fs::read_to_string(format!("{task}/stat"))
                    .is_ok_and(|s| s.rsplit(')').next().is_some_and(|r| r.starts_with(" S")))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !in_call() {
            assert!(
                Instant::now() < deadline,
                "the thread never blocked in {nr}"
            );
            std::thread::yield_now();
        }
        // SAFETY: signals a thread of this process, whose handler is installed above.
        let rc = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, WAKE_SIGNAL) };
        assert_eq!(rc, 0);
        // The signal is taken once it is no longer pending on the thread.
        let pending = || {
            std::fs::read_to_string(format!("{task}/status")).is_ok_and(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("SigPnd:"))
                    .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
                    .is_some_and(|m| m & (1 << (WAKE_SIGNAL - 1)) != 0)
            })
        };
        while pending() {
            assert!(Instant::now() < deadline, "the signal was never taken");
            std::thread::yield_now();
        }
        release();
        done_rx.recv_timeout(Duration::from_secs(10)).ok()
    }

    #[test]
    fn the_wake_signal_ends_a_ring_wait() {
        // SAFETY: io_uring_setup with zeroed parameters makes a ring or fails.
        let ring = unsafe {
            let mut params: [u32; 30] = [0; 30];
            libc::syscall(libc::SYS_io_uring_setup, 4, params.as_mut_ptr())
        };
        assert!(ring >= 0, "io_uring: {}", std::io::Error::last_os_error());
        let ended = signalled_in(
            libc::SYS_io_uring_enter,
            move || {
                // SAFETY: waits for one completion on the ring made above (none will come).
                let rc = unsafe {
                    libc::syscall(libc::SYS_io_uring_enter, ring, 0, 1, 1u32, 0usize, 0usize)
                };
                (rc, std::io::Error::last_os_error().raw_os_error())
            },
            || {},
        );
        assert_eq!(ended, Some((-1, Some(libc::EINTR))));
        // SAFETY: the ring's descriptor, no longer used.
        unsafe { libc::close(ring as libc::c_int) };
    }

    #[test]
    fn a_blocking_call_the_wake_signal_reaches_is_restarted_not_failed() {
        let mut fds = [0; 2];
        // SAFETY: makes a pipe into `fds`.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let [r, w] = fds;
        let read = signalled_in(
            libc::SYS_read,
            move || {
                let mut byte = [0u8; 1];
                // SAFETY: reads one byte into `byte`.
                let n = unsafe { libc::read(r, byte.as_mut_ptr().cast(), 1) };
                (n, byte[0])
            },
            // SAFETY: writes one byte to the pipe.
            || assert_eq!(unsafe { libc::write(w, b"x".as_ptr().cast(), 1) }, 1),
        );
        assert_eq!(read, Some((1, b'x')), "the read failed for the signal");
        // SAFETY: the pipe's descriptors, no longer used.
        unsafe {
            libc::close(r);
            libc::close(w);
        }
    }

    #[test]
    fn ended_and_unstarted_cores_are_not_watched() {
        let (mut w, beats, stalls) = watch(2);
        beats[1].tid.store(0, Ordering::Release);
        let t0 = Instant::now();
        w.look(t0);
        beats[0].ended();
        assert!(w.look(t0 + STALL_AFTER * 5).is_empty());
        assert_eq!(stalls.load(Ordering::Relaxed), 0);
        assert!(!w.all_ended());
        beats[1].ended();
        assert!(w.all_ended());
    }

    #[test]
    fn a_core_blocking_on_purpose_is_no_stall_and_is_watched_again_after() {
        let (mut w, beats, stalls) = watch(1);
        let t0 = Instant::now();
        w.look(t0);
        beats[0].blocking(true);
        assert!(w.look(t0 + STALL_AFTER * 5).is_empty());
        beats[0].blocking(false);
        // Its time blocked is not counted: a stall is a full STALL_AFTER from now.
        let t1 = t0 + STALL_AFTER * 6;
        assert!(w.look(t1).is_empty());
        assert!(w.look(t1 + STALL_AFTER / 2).is_empty());
        assert_eq!(stalls.load(Ordering::Relaxed), 0);
        assert_eq!(w.look(t1 + STALL_AFTER).len(), 1);
        assert_eq!(stalls.load(Ordering::Relaxed), 1);
    }
}
