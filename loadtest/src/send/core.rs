//! What every connection of one executor shares: the run's settings and plan (read-only,
//! shared by all executors) and this executor's own counters, which nothing else writes.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::cli::SendArgs;
use crate::mix::Mix;
use crate::send::message::Bodies;
use crate::send::plan::Plan;
use crate::send::stats::{Lat, Stats};

/// The run, shared by every executor.
pub struct Run {
    /// The flags.
    pub args: SendArgs,
    /// The resolved target.
    pub addr: SocketAddr,
    /// Tickets and due times.
    pub plan: Plan,
    /// Message padding.
    pub bodies: Bodies,
    /// Message sizes by sequence number.
    pub sizes: Mix<u64>,
    /// TLS client, when `--starttls`.
    pub tls: Option<futures_rustls::TlsConnector>,
    /// A connection has opened (been greeted) during the run.
    pub opened: AtomicBool,
    /// The run was ended because no connection opened within [`NO_SERVER_WAIT`].
    pub gave_up: AtomicBool,
}

/// How long connects may all fail, none ever opening, before the run ends: nothing is
/// listening (or nothing answers), and sending the rest of the plan there proves nothing.
pub const NO_SERVER_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

impl Run {
    /// After a failed connect: ends the run when no connection has opened in
    /// [`NO_SERVER_WAIT`]. Says so once, on stderr; true when it did.
    pub fn give_up_unless_opened(&self, kind: &str) -> bool {
        if self.opened.load(Ordering::Relaxed) || self.plan.start().elapsed() < NO_SERVER_WAIT {
            return false;
        }
        if self.gave_up.swap(true, Ordering::Relaxed) {
            return false;
        }
        self.plan.stop_flag().store(true, Ordering::Relaxed);
        eprintln!(
            "postern-load: no connection to {} opened in {} s ({}): stopping the run",
            self.addr,
            NO_SERVER_WAIT.as_secs(),
            kind.replace('_', " ")
        );
        true
    }
}

/// One executor's state.
pub struct Core {
    /// The run.
    pub run: Arc<Run>,
    /// Since the start of the run.
    pub total: RefCell<Stats>,
    /// Since the last interval was handed to the main thread.
    pub interval: RefCell<Stats>,
}

impl Core {
    /// A core with empty counters.
    pub fn new(run: Arc<Run>) -> Self {
        Self {
            run,
            total: RefCell::default(),
            interval: RefCell::default(),
        }
    }

    /// Applies `f` to the run's and the interval's counters.
    pub fn with_stats(&self, f: impl Fn(&mut Stats)) {
        f(&mut self.total.borrow_mut());
        f(&mut self.interval.borrow_mut());
    }

    /// A message without a final reply.
    pub fn fail(&self, kind: &'static str) {
        // A failure ends a message as a reply does: the run's length counts the time it took
        // (a server that stalls until messages time out must not read as a fast one).
        let since_start = (Instant::now() - self.run.plan.start()).as_micros() as u64;
        self.with_stats(|s| {
            s.failed += 1;
            s.error(kind);
            s.last_reply_us = s.last_reply_us.max(since_start);
        });
    }

    /// A message with a final reply `code`.
    pub fn settle(
        &self,
        code: u16,
        accepted: bool,
        len: u64,
        started: Instant,
        eod: Option<Instant>,
        answered: Instant,
    ) {
        // The read that brought the reply, which may come before the start or the end of
        // data as this thread saw them only by a few microseconds (saturating then).
        let now = answered;
        let since_start = (now - self.run.plan.start()).as_micros() as u64;
        self.with_stats(|s| {
            *s.replies.entry(code).or_default() += 1;
            if accepted {
                s.accepted += 1;
                s.bytes_accepted += len;
            } else {
                s.refused += 1;
            }
            s.record(Lat::Transaction, now - started);
            if let Some(eod) = eod {
                s.record(Lat::EndOfData, now - eod);
            }
            s.last_reply_us = s.last_reply_us.max(since_start);
        });
    }
}
