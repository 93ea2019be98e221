//! Counters and latency histograms of a run, kept per executor without sharing and merged by
//! the main thread: once a second for the progress line and the interval log, once at the end
//! for the report.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

/// The latencies measured, in report order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lat {
    /// From the start of `connect` to the 220 banner.
    Connect = 0,
    /// From EHLO written to its reply (HELO fallback included).
    Ehlo = 1,
    /// From the message's start (its due time under `--rate`) to the reply to its body.
    Transaction = 2,
    /// From the last body octet written to the reply to it.
    EndOfData = 3,
}

impl Lat {
    /// Every kind, in report order.
    pub const ALL: [Lat; 4] = [Lat::Connect, Lat::Ehlo, Lat::Transaction, Lat::EndOfData];

    /// The name in reports and logs.
    pub fn name(self) -> &'static str {
        match self {
            Lat::Connect => "connect",
            Lat::Ehlo => "ehlo",
            Lat::Transaction => "transaction",
            Lat::EndOfData => "end_of_data",
        }
    }
}

/// Highest latency recorded, in microseconds (one hour).
const MAX_MICROS: u64 = 3_600_000_000;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("constant histogram bounds are valid")
}

/// What happened to the messages of a run, or of one interval of it.
#[derive(Clone, Debug)]
pub struct Stats {
    /// Messages whose body was written completely.
    pub sent: u64,
    /// Messages answered 2xx after their body.
    pub accepted: u64,
    /// Messages refused with a 4xx or 5xx (at MAIL, every RCPT, DATA or the body).
    pub refused: u64,
    /// Messages with no final reply: connection lost, timeout, protocol error.
    pub failed: u64,
    /// Octets of the messages sent (before dot-stuffing).
    pub bytes_sent: u64,
    /// Octets of the messages accepted.
    pub bytes_accepted: u64,
    /// Connections that reached the greeting.
    pub connections: u64,
    /// Connections ready for mail whose server did not offer PIPELINING, though
    /// `--pipelining` asked for it: they sent one command per round trip.
    pub without_pipelining: u64,
    /// Connections ready for mail whose server did not offer CHUNKING, though `--bdat` asked
    /// for it: they sent DATA.
    pub without_chunking: u64,
    /// Messages by the code of the reply that decided them.
    pub replies: BTreeMap<u16, u64>,
    /// Recipients refused (4xx or 5xx to their RCPT) in transactions whose MAIL was taken,
    /// by reply code: a message accepted for some of its recipients counts as accepted, and
    /// these say for how many it was not.
    pub rcpt_refusals: BTreeMap<u16, u64>,
    /// Failures by kind.
    pub errors: BTreeMap<&'static str, u64>,
    /// Latency histograms in microseconds, indexed by [`Lat`].
    pub latency: [Histogram<u64>; 4],
    /// Microseconds from the run's start to the last message's end: its final reply, or its
    /// failure (a timeout, a connection lost).
    pub last_reply_us: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            sent: 0,
            accepted: 0,
            refused: 0,
            failed: 0,
            bytes_sent: 0,
            bytes_accepted: 0,
            connections: 0,
            without_pipelining: 0,
            without_chunking: 0,
            replies: BTreeMap::new(),
            rcpt_refusals: BTreeMap::new(),
            errors: BTreeMap::new(),
            latency: [histogram(), histogram(), histogram(), histogram()],
            last_reply_us: 0,
        }
    }
}

impl Stats {
    /// Records one latency.
    pub fn record(&mut self, kind: Lat, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, MAX_MICROS);
        self.latency[kind as usize].saturating_record(us);
    }

    /// Counts one failure of `kind`.
    pub fn error(&mut self, kind: &'static str) {
        *self.errors.entry(kind).or_default() += 1;
    }

    /// Adds `other` into `self`.
    pub fn merge(&mut self, other: &Stats) {
        self.sent += other.sent;
        self.accepted += other.accepted;
        self.refused += other.refused;
        self.failed += other.failed;
        self.bytes_sent += other.bytes_sent;
        self.bytes_accepted += other.bytes_accepted;
        self.connections += other.connections;
        self.without_pipelining += other.without_pipelining;
        self.without_chunking += other.without_chunking;
        for (code, n) in &other.replies {
            *self.replies.entry(*code).or_default() += n;
        }
        for (kind, n) in &other.errors {
            *self.errors.entry(kind).or_default() += n;
        }
        for (code, n) in &other.rcpt_refusals {
            *self.rcpt_refusals.entry(*code).or_default() += n;
        }
        for (mine, theirs) in self.latency.iter_mut().zip(&other.latency) {
            // Both histograms have the same bounds, so adding cannot fail.
            let _ = mine.add(theirs);
        }
        self.last_reply_us = self.last_reply_us.max(other.last_reply_us);
    }

    /// Errors of every kind.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}
