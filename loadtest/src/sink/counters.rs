//! The sink's counters: one cache-line-aligned slot per executor, written only by that
//! executor (relaxed atomics, no contention), summed when printed at exit or served at
//! /metrics, in Prometheus text format either way.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one executor.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Slot {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Messages answered 2xx.
    pub messages: AtomicU64,
    /// Octets of the messages answered 2xx.
    pub bytes: AtomicU64,
    /// Octets of every body that reached its end (a body over `--max-size` is read and
    /// dropped, and not counted here).
    pub bytes_received: AtomicU64,
    /// Recipients accepted.
    pub recipients: AtomicU64,
    /// Connections closed by `--drop-after`.
    pub dropped: AtomicU64,
    /// STARTTLS handshakes completed.
    pub tls_handshakes: AtomicU64,
    /// STARTTLS handshakes failed.
    pub tls_failures: AtomicU64,
    /// Sessions closed for silence.
    pub timeouts: AtomicU64,
    /// Transactions whose MAIL and first RCPT arrived in one read (the client pipelines).
    pub pipelined: AtomicU64,
    /// Transactions whose MAIL arrived before the reply to the previous body was written
    /// (the client pipelines transactions into each other).
    pub overlapped: AtomicU64,
    /// Bodies started with DATA.
    pub data_bodies: AtomicU64,
    /// Bodies started with BDAT (not one whose first chunk is already over `--max-size`).
    pub bdat_bodies: AtomicU64,
    /// BDAT chunks of those bodies.
    pub bdat_chunks: AtomicU64,
    /// End-of-data replies, by the index of their code in [`Counters::codes`].
    pub replies: Vec<AtomicU64>,
}

impl Slot {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Every executor's counters.
#[derive(Debug)]
pub struct Counters {
    /// One per executor.
    pub slots: Vec<Slot>,
    /// End-of-data reply codes that can occur.
    pub codes: Vec<u16>,
}

impl Counters {
    /// Counters for `threads` executors answering with `codes`.
    pub fn new(threads: usize, codes: Vec<u16>) -> Self {
        let slots = (0..threads)
            .map(|_| Slot {
                replies: codes.iter().map(|_| AtomicU64::new(0)).collect(),
                ..Slot::default()
            })
            .collect();
        Self { slots, codes }
    }

    /// The index of `code` among the reply counters.
    pub fn code_index(&self, code: u16) -> Option<usize> {
        self.codes.iter().position(|&c| c == code)
    }

    fn sum(&self, f: impl Fn(&Slot) -> &AtomicU64) -> u64 {
        self.slots
            .iter()
            .map(|s| f(s).load(Ordering::Relaxed))
            .sum()
    }

    /// Prometheus text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let plain: [(&str, &str, u64); 14] = [
            (
                "connections_total",
                "Connections accepted.",
                self.sum(|s| &s.connections),
            ),
            (
                "messages_total",
                "Messages answered 2xx.",
                self.sum(|s| &s.messages),
            ),
            (
                "bytes_total",
                "Octets of the messages answered 2xx.",
                self.sum(|s| &s.bytes),
            ),
            (
                "bytes_received_total",
                "Octets of every body that reached its end (not those refused over --max-size).",
                self.sum(|s| &s.bytes_received),
            ),
            (
                "recipients_total",
                "Recipients accepted.",
                self.sum(|s| &s.recipients),
            ),
            (
                "dropped_total",
                "Connections closed without a reply by --drop-after.",
                self.sum(|s| &s.dropped),
            ),
            (
                "tls_handshakes_total",
                "STARTTLS handshakes completed.",
                self.sum(|s| &s.tls_handshakes),
            ),
            (
                "tls_failures_total",
                "STARTTLS handshakes failed.",
                self.sum(|s| &s.tls_failures),
            ),
            (
                "timeouts_total",
                "Sessions closed for silence.",
                self.sum(|s| &s.timeouts),
            ),
            (
                "pipelined_transactions_total",
                "Transactions whose MAIL and first RCPT arrived in one read.",
                self.sum(|s| &s.pipelined),
            ),
            (
                "overlapped_transactions_total",
                "Transactions whose MAIL arrived before the previous message's reply was written.",
                self.sum(|s| &s.overlapped),
            ),
            (
                "data_bodies_total",
                "Bodies started with DATA.",
                self.sum(|s| &s.data_bodies),
            ),
            (
                "bdat_bodies_total",
                "Bodies started with BDAT (not one whose first chunk is over --max-size).",
                self.sum(|s| &s.bdat_bodies),
            ),
            (
                "bdat_chunks_total",
                "BDAT chunks of those bodies, the last included.",
                self.sum(|s| &s.bdat_chunks),
            ),
        ];
        for (name, help, value) in plain {
            let _ = writeln!(out, "# HELP postern_load_sink_{name} {help}");
            let _ = writeln!(out, "# TYPE postern_load_sink_{name} counter");
            let _ = writeln!(out, "postern_load_sink_{name} {value}");
        }
        let _ = writeln!(
            out,
            "# HELP postern_load_sink_replies_total End-of-data replies by code."
        );
        let _ = writeln!(out, "# TYPE postern_load_sink_replies_total counter");
        for (i, code) in self.codes.iter().enumerate() {
            let n = self.sum(|s| &s.replies[i]);
            let _ = writeln!(
                out,
                "postern_load_sink_replies_total{{code=\"{code}\"}} {n}"
            );
        }
        out
    }
}
