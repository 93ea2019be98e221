//! The final report of a run: the same figures as text on stdout and, with `--json`, as a JSON
//! document (every field always present, so scripts need no special cases).

use std::collections::BTreeMap;
use std::fmt::Write;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::send::stats::{Lat, Stats};

/// Latency summary of one kind, in milliseconds.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p99_9: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p99_9: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

/// What the run asked for.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    /// The server.
    pub target: String,
    /// Concurrent connections.
    pub connections: u32,
    /// Executors.
    pub threads: u16,
    /// Messages asked for (None with `--duration`).
    pub messages: Option<u64>,
    /// Seconds asked for (None with `--messages`).
    pub duration_s: Option<f64>,
    /// Message sizes and weights.
    pub sizes: Vec<(u64, u32)>,
    /// Recipients per message.
    pub rcpts: u32,
    /// `--pipelining`.
    pub pipelining: bool,
    /// `--window`: messages in flight per connection.
    pub window: u32,
    /// `--bdat`.
    pub bdat: bool,
    /// `--starttls`.
    pub starttls: bool,
    /// `--rate`, messages per second.
    pub rate: Option<f64>,
    /// `--msgs-per-conn`.
    pub msgs_per_conn: u64,
}

/// The report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// What was asked.
    pub settings: Settings,
    /// The run was ended early by SIGINT or SIGTERM: the figures cover it until then.
    pub interrupted: bool,
    /// The run was ended because no connection opened in its first seconds (nothing listens
    /// at the target, or nothing answers there).
    pub no_server: bool,
    /// With `--rate` and `--duration`, or an interrupted `--rate` run: messages that came due
    /// during the run (until the interrupt).
    pub messages_due: Option<u64>,
    /// Of those, the ones never started because no connection was free (the server did not
    /// keep up): their waits are in no latency row.
    pub messages_not_started: Option<u64>,
    /// Messages whose body was written completely.
    pub messages_sent: u64,
    /// Messages answered 2xx after their body.
    pub messages_accepted: u64,
    /// Messages refused with 4xx or 5xx.
    pub messages_refused: u64,
    /// Messages with no final reply (connection errors, timeouts).
    pub messages_failed: u64,
    /// Octets of the messages sent (headers and body, before dot-stuffing).
    pub bytes_sent: u64,
    /// Octets of the messages accepted.
    pub bytes_accepted: u64,
    /// Connections greeted.
    pub connections_opened: u64,
    /// Connections whose server did not offer PIPELINING although it was asked for.
    pub connections_without_pipelining: u64,
    /// Connections whose server did not offer CHUNKING although BDAT was asked for.
    pub connections_without_chunking: u64,
    /// Seconds from the start to the end of the last message (its final reply or its failure),
    /// and never less than `--duration`: the time the load was offered.
    pub elapsed_s: f64,
    /// Accepted messages per second.
    pub messages_per_s: f64,
    /// Accepted megabytes (10^6 octets) per second.
    pub mb_per_s: f64,
    /// Latency by kind: connect, ehlo, transaction, end_of_data.
    pub latency_ms: BTreeMap<&'static str, Latency>,
    /// Messages by the code of the reply that decided them.
    pub replies: BTreeMap<String, u64>,
    /// Recipients refused at RCPT in transactions whose MAIL was taken.
    pub recipients_refused: u64,
    /// Those, by the code of their RCPT reply.
    pub recipient_refusals: BTreeMap<String, u64>,
    /// Failures by kind.
    pub errors: BTreeMap<&'static str, u64>,
}

impl Report {
    /// The report of `stats`.
    pub fn new(
        settings: Settings,
        stats: &Stats,
        due: Option<u64>,
        started: u64,
        interrupted: bool,
        no_server: bool,
    ) -> Self {
        let offered = if interrupted || no_server {
            0.0
        } else {
            settings.duration_s.unwrap_or(0.0)
        };
        let elapsed_s = (stats.last_reply_us as f64 / 1e6).max(offered).max(1e-6);
        Self {
            settings,
            interrupted,
            no_server,
            messages_due: due,
            messages_not_started: due.map(|d| d.saturating_sub(started)),
            messages_sent: stats.sent,
            messages_accepted: stats.accepted,
            messages_refused: stats.refused,
            messages_failed: stats.failed,
            bytes_sent: stats.bytes_sent,
            bytes_accepted: stats.bytes_accepted,
            connections_opened: stats.connections,
            connections_without_pipelining: stats.without_pipelining,
            connections_without_chunking: stats.without_chunking,
            elapsed_s,
            messages_per_s: stats.accepted as f64 / elapsed_s,
            mb_per_s: stats.bytes_accepted as f64 / 1e6 / elapsed_s,
            latency_ms: Lat::ALL
                .iter()
                .map(|&k| (k.name(), Latency::of(&stats.latency[k as usize])))
                .collect(),
            replies: stats
                .replies
                .iter()
                .map(|(c, n)| (c.to_string(), *n))
                .collect(),
            recipients_refused: stats.rcpt_refusals.values().sum(),
            recipient_refusals: stats
                .rcpt_refusals
                .iter()
                .map(|(c, n)| (c.to_string(), *n))
                .collect(),
            errors: stats.errors.clone(),
        }
    }

    /// The report as text.
    pub fn text(&self) -> String {
        let s = &self.settings;
        let mut t = String::new();
        let mode = match (s.pipelining, s.bdat) {
            (true, true) => "pipelining, BDAT",
            (true, false) => "pipelining, DATA",
            (false, true) => "no pipelining, BDAT",
            (false, false) => "no pipelining, DATA",
        };
        let window = if s.window > 1 {
            format!(", {} messages in flight per connection", s.window)
        } else {
            String::new()
        };
        let _ = writeln!(
            t,
            "postern-load send: {} with {} connection(s) on {} thread(s), {mode}{window}{}",
            s.target,
            s.connections,
            s.threads,
            if s.starttls { ", STARTTLS" } else { "" }
        );
        if self.interrupted {
            let _ = writeln!(
                t,
                "note:     stopped early by a signal: the figures cover the run until then"
            );
        }
        if self.no_server {
            let _ = writeln!(
                t,
                "note:     no connection opened in {} s: the run stopped; is the server up?",
                crate::send::core::NO_SERVER_WAIT.as_secs()
            );
        }
        if self.connections_without_pipelining > 0 {
            let _ = writeln!(
                t,
                "note:     the server offered no PIPELINING on {} connection(s): one command \
                 per round trip there",
                self.connections_without_pipelining
            );
        }
        if self.connections_without_chunking > 0 {
            let _ = writeln!(
                t,
                "note:     the server offered no CHUNKING on {} connection(s): DATA instead of \
                 BDAT there",
                self.connections_without_chunking
            );
        }
        let _ = writeln!(
            t,
            "messages: {} sent, {} accepted, {} refused, {} failed",
            self.messages_sent, self.messages_accepted, self.messages_refused, self.messages_failed
        );
        if self.recipients_refused > 0 {
            let by_code: Vec<String> = self
                .recipient_refusals
                .iter()
                .map(|(c, n)| format!("{c}: {n}"))
                .collect();
            let _ = writeln!(
                t,
                "rcpts:    {} refused at RCPT in transactions the server took up ({}); a \
                 message counts as accepted when any of its recipients was",
                self.recipients_refused,
                by_code.join(", ")
            );
        }
        if let (Some(due), Some(missed)) = (self.messages_due, self.messages_not_started) {
            if missed > 0 {
                let _ = writeln!(
                    t,
                    "missed:   {missed} of the {due} messages due at --rate were never started \
                     (no connection was free: the server did not keep up); no latency row \
                     counts their wait"
                );
            }
        }
        let _ = writeln!(
            t,
            "bytes:    {} sent, {} accepted",
            self.bytes_sent, self.bytes_accepted
        );
        let _ = writeln!(
            t,
            "elapsed:  {:.3} s, {} connection(s) greeted",
            self.elapsed_s, self.connections_opened
        );
        // Whole messages per second, but for slow runs, where that would read 0.
        let places = if self.messages_per_s < 10.0 { 2 } else { 0 };
        let _ = writeln!(
            t,
            "rate:     {:.places$} messages/s, {:.2} MB/s",
            self.messages_per_s, self.mb_per_s
        );
        let _ = writeln!(
            t,
            "latency (ms)          count       p50       p90       p99     p99.9       max"
        );
        for (name, l) in &self.latency_ms {
            let _ = writeln!(
                t,
                "  {name:<16} {:>10} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                l.count, l.p50, l.p90, l.p99, l.p99_9, l.max
            );
        }
        let replies: Vec<String> = self
            .replies
            .iter()
            .map(|(c, n)| format!("{c}: {n}"))
            .collect();
        let _ = writeln!(t, "replies:  {}", or_none(&replies));
        let errors: Vec<String> = self
            .errors
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect();
        let _ = writeln!(t, "errors:   {}", or_none(&errors));
        t
    }
}

fn or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}
