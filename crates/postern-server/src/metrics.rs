//! Metrics: each core records into its own histograms and counters (no cross-core writes on
//! the hot path) and publishes a copy a few times a second; a scrape merges the copies and
//! renders the Prometheus text format.

use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Latency histograms, in microseconds, 1 µs to 100 s at 3 significant digits.
fn histogram() -> Timings {
    Timings::new(
        Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid histogram bounds"),
        &BUCKETS,
    )
}

/// Session durations reach `--max-session-time` (1 h by default) and beyond: up to 4 h.
fn session_histogram() -> Timings {
    Timings::new(
        Histogram::new_with_bounds(1, 4 * 3_600_000_000, 3).expect("valid histogram bounds"),
        &SESSION_BUCKETS,
    )
}

/// How long each of the two periods lasts whose observations the summary quantiles cover:
/// the quantiles are of the last 5 to 10 minutes.
pub const QUANTILE_PERIOD: Duration = Duration::from_secs(300);

/// One kind of timing on one core: its exported buckets and sum, counted exactly since the
/// start, and hdrhistograms of the recent observations for the quantiles. The histograms'
/// slots are ranges of equivalent values (a value at a bucket's bound shares its slot with
/// values a little above it, and one past the histogram's top is kept at the top), so the
/// buckets and the sum are not read from them.
#[derive(Clone, Debug)]
pub struct Timings {
    /// This period's observations, for the quantiles.
    recent: Histogram<u64>,
    /// The period before's.
    before: Histogram<u64>,
    /// When this period started (at the first look).
    period_started: Option<Instant>,
    /// The upper bounds of the exported buckets, in whole microseconds.
    bounds: Vec<u64>,
    /// Observations per bucket (not cumulative); one more, past the last bound, for `+Inf`.
    counts: Vec<u64>,
    /// The sum of the observations, in nanoseconds.
    sum_ns: u64,
}

impl Timings {
    fn new(hist: Histogram<u64>, buckets: &[f64]) -> Self {
        Self {
            before: hist.clone(),
            recent: hist,
            period_started: None,
            // Each bound is a whole number of microseconds (0.0001 s is 100 µs); rounded so
            // that 0.00025 * 1e6 = 249.99... is not cut to 249.
            bounds: buckets.iter().map(|le| (le * 1e6).round() as u64).collect(),
            counts: vec![0; buckets.len() + 1],
            sum_ns: 0,
        }
    }

    /// Adds one observation.
    fn observe(&mut self, d: Duration) {
        // Rounded up to the microsecond: a value a nanosecond past a bound is past it.
        let us = u64::try_from(d.as_nanos().div_ceil(1000)).unwrap_or(u64::MAX);
        let bucket = self.bounds.partition_point(|&le| le < us);
        self.counts[bucket] += 1;
        self.sum_ns = self
            .sum_ns
            .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        // In range by the clamp.
        let _ = self.recent.record(us.clamp(1, self.recent.high()));
    }

    /// Starts a new period when this one is over: the one before is forgotten. After more
    /// than a period without a look, nothing recent is left.
    fn age(&mut self, now: Instant) {
        let Some(started) = self.period_started else {
            self.period_started = Some(now);
            return;
        };
        let elapsed = now.saturating_duration_since(started);
        if elapsed < QUANTILE_PERIOD {
            return;
        }
        std::mem::swap(&mut self.recent, &mut self.before);
        self.recent.reset();
        if elapsed >= 2 * QUANTILE_PERIOD {
            self.before.reset();
        }
        self.period_started = Some(now);
    }

    /// The observations the quantiles cover: this period's and the one before's.
    fn window(&self) -> Histogram<u64> {
        let mut both = self.recent.clone();
        // Same bounds, so adding cannot fail.
        let _ = both.add(&self.before);
        both
    }

    fn add(&mut self, other: &Timings) {
        // Same bounds on every core, so adding cannot fail.
        let _ = self.recent.add(&other.recent);
        let _ = self.before.add(&other.before);
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.sum_ns = self.sum_ns.saturating_add(other.sum_ns);
    }

    /// How many observations there are.
    pub fn len(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One core's figures.
#[derive(Clone, Debug)]
pub struct CoreMetrics {
    /// End of data to the 250 reply.
    pub eod_latency: Timings,
    /// Spool commit (append end to durable).
    pub commit_latency: Timings,
    /// Time from a command's arrival to its reply being written.
    pub command_latency: Timings,
    /// Whole sessions.
    pub session_duration: Timings,
    /// Connections accepted.
    pub connections: u64,
    /// Connections refused at once (overload, per-IP limit).
    pub connections_refused: u64,
    /// Connections from a load balancer (`--proxy-from`) closed for want of a valid PROXY
    /// header in time.
    pub proxy_header_failures: u64,
    /// Messages accepted (250 after end of data).
    pub messages: u64,
    /// Message bytes spooled (with the Received header added).
    pub bytes: u64,
    /// Replies sent, by class: index 0 for 2xx, 1 for 3xx, 2 for 4xx, 3 for 5xx.
    pub replies: [u64; 4],
    /// TLS handshakes completed.
    pub tls_handshakes: u64,
    /// TLS handshakes failed.
    pub tls_failures: u64,
    /// TLS handshakes completed with next hops (STARTTLS on delivery).
    pub outbound_tls_handshakes: u64,
    /// TLS handshakes with next hops that failed.
    pub outbound_tls_failures: u64,
    /// Spool errors (append, commit).
    pub spool_errors: u64,
    /// Sessions open now.
    pub active_sessions: u64,
    /// Bytes of spool segment files (reserved on disk in full).
    pub spool_bytes: u64,
    /// Messages waiting for delivery.
    pub queue_depth: u64,
    /// Recipients of the messages waiting for delivery (0 with `--hold`).
    pub queue_recipients: u64,
    /// Outbound connections open (or being opened) now.
    pub outbound_connections: u64,
    /// Next hops the relay keeps state for (jobs, connections, pauses).
    pub next_hops: u64,
    /// 1 while this core refuses new transactions (452) because the queue or the spool is
    /// over its high-water mark.
    pub refusing: u64,
    /// Recipients delivered to their next hop.
    pub delivered: u64,
    /// Delivery attempts deferred (temporary failure).
    pub deferred: u64,
    /// Recipients failed for good (permanent failure or expiry).
    pub failed: u64,
    /// Recipients deleted by the operator (`postern queue --delete`) before their outcome.
    pub deleted: u64,
    /// Bounces (DSNs) made.
    pub bounces: u64,
    /// Waiting messages copied forward in the spool, so that the segments they kept could go.
    pub copied_forward: u64,
    /// Messages still being received moved forward in the spool (the spool's own count).
    pub drafts_moved: u64,
}

impl Default for CoreMetrics {
    fn default() -> Self {
        Self {
            eod_latency: histogram(),
            commit_latency: histogram(),
            command_latency: histogram(),
            session_duration: session_histogram(),
            connections: 0,
            connections_refused: 0,
            proxy_header_failures: 0,
            messages: 0,
            bytes: 0,
            replies: [0; 4],
            tls_handshakes: 0,
            tls_failures: 0,
            outbound_tls_handshakes: 0,
            outbound_tls_failures: 0,
            spool_errors: 0,
            active_sessions: 0,
            spool_bytes: 0,
            queue_depth: 0,
            queue_recipients: 0,
            outbound_connections: 0,
            next_hops: 0,
            refusing: 0,
            delivered: 0,
            deferred: 0,
            failed: 0,
            deleted: 0,
            bounces: 0,
            copied_forward: 0,
            drafts_moved: 0,
        }
    }
}

impl CoreMetrics {
    /// Records a latency.
    pub fn record(t: &mut Timings, d: Duration) {
        t.observe(d);
    }

    /// Moves the quantiles' window on (see [`QUANTILE_PERIOD`]); called as the core
    /// publishes its copy.
    pub fn age(&mut self, now: Instant) {
        for t in [
            &mut self.eod_latency,
            &mut self.commit_latency,
            &mut self.command_latency,
            &mut self.session_duration,
        ] {
            t.age(now);
        }
    }

    /// Counts the replies in a block of reply bytes (first line of each reply).
    pub fn count_replies(&mut self, out: &[u8]) {
        for line in out.split(|&b| b == b'\n') {
            // A final line of a reply has a space (or nothing) after the code.
            if line.len() >= 4 && line[3] == b' ' || line.len() == 4 {
                if let Some(class @ b'2'..=b'5') = line.first() {
                    self.replies[usize::from(class - b'2')] += 1;
                }
            }
        }
    }

    fn merge(&mut self, other: &CoreMetrics) {
        for (a, b) in [
            (&mut self.eod_latency, &other.eod_latency),
            (&mut self.commit_latency, &other.commit_latency),
            (&mut self.command_latency, &other.command_latency),
            (&mut self.session_duration, &other.session_duration),
        ] {
            a.add(b);
        }
        self.connections += other.connections;
        self.connections_refused += other.connections_refused;
        self.proxy_header_failures += other.proxy_header_failures;
        self.messages += other.messages;
        self.bytes += other.bytes;
        for (a, b) in self.replies.iter_mut().zip(other.replies) {
            *a += b;
        }
        self.tls_handshakes += other.tls_handshakes;
        self.tls_failures += other.tls_failures;
        self.outbound_tls_handshakes += other.outbound_tls_handshakes;
        self.outbound_tls_failures += other.outbound_tls_failures;
        self.spool_errors += other.spool_errors;
        self.active_sessions += other.active_sessions;
        self.spool_bytes += other.spool_bytes;
        self.queue_depth += other.queue_depth;
        self.queue_recipients += other.queue_recipients;
        self.outbound_connections += other.outbound_connections;
        self.next_hops += other.next_hops;
        self.refusing += other.refusing;
        self.delivered += other.delivered;
        self.deferred += other.deferred;
        self.failed += other.failed;
        self.deleted += other.deleted;
        self.bounces += other.bounces;
        self.copied_forward += other.copied_forward;
        self.drafts_moved += other.drafts_moved;
    }
}

/// Where each core publishes its copy; shared with the scraper.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    cores: Arc<Mutex<Vec<Arc<Mutex<CoreMetrics>>>>>,
    /// Stalled cores the watchdog has interrupted (kept by the watchdog, not by a core: a
    /// stalled core publishes nothing).
    stalls: Arc<std::sync::atomic::AtomicU64>,
    /// Damaged spool records found at start-up.
    damage: Arc<std::sync::atomic::AtomicU64>,
}

impl Registry {
    /// A slot for one more core.
    pub fn slot(&self) -> Arc<Mutex<CoreMetrics>> {
        let slot = Arc::new(Mutex::new(CoreMetrics::default()));
        if let Ok(mut cores) = self.cores.lock() {
            cores.push(slot.clone());
        }
        slot
    }

    /// Records the damaged spool records found at start-up.
    pub(crate) fn set_spool_damage(&self, records: u64) {
        self.damage
            .store(records, std::sync::atomic::Ordering::Relaxed);
    }

    /// The watchdog's count of stalled cores.
    pub(crate) fn stalls(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.stalls.clone()
    }

    /// The sum of all cores' last published copies.
    pub fn merged(&self) -> CoreMetrics {
        self.merged_with_connections().0
    }

    /// The sum of all cores' last published copies, and each core's connections from the
    /// same copies (a core may publish between two reads: one read of each keeps the total
    /// and its parts in agreement).
    fn merged_with_connections(&self) -> (CoreMetrics, Vec<u64>) {
        let mut total = CoreMetrics::default();
        let mut each = Vec::new();
        if let Ok(cores) = self.cores.lock() {
            for core in cores.iter() {
                match core.lock() {
                    Ok(m) => {
                        total.merge(&m);
                        each.push(m.connections);
                    }
                    Err(_) => each.push(0),
                }
            }
        }
        (total, each)
    }

    /// How many cores refuse new transactions now (as last published), without merging the
    /// histograms: for `/readyz`.
    pub fn refusing(&self) -> u64 {
        self.cores.lock().map_or(0, |cores| {
            cores
                .iter()
                .map(|core| core.lock().map_or(0, |m| m.refusing))
                .sum()
        })
    }

    /// The Prometheus text exposition of the merged figures, plus connections per core.
    pub fn render(&self) -> String {
        let (total, each) = self.merged_with_connections();
        let mut out = render(&total);
        let _ = writeln!(
            out,
            "# HELP postern_core_connections_total Connections accepted, by core."
        );
        let _ = writeln!(out, "# TYPE postern_core_connections_total counter");
        for (i, n) in each.iter().enumerate() {
            let _ = writeln!(out, "postern_core_connections_total{{core=\"{i}\"}} {n}");
        }
        render_scalar(
            &mut out,
            "postern_core_stalls_total",
            "counter",
            "Cores that ran no timer for a second and were interrupted by the watchdog.",
            self.stalls.load(std::sync::atomic::Ordering::Relaxed),
        );
        render_scalar(
            &mut out,
            "postern_spool_damaged_records",
            "gauge",
            "Damaged spool records (or messages missing records, where more) found when this \
             process started: what they held is not delivered (the start-up log says where).",
            self.damage.load(std::sync::atomic::Ordering::Relaxed),
        );
        out
    }
}

/// Bucket bounds in seconds for the latency histograms. 2 ms is among them as the bound an
/// operator holds end of data to `250` to (the share of replies over it, from two scrapes).
const BUCKETS: [f64; 17] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// Bucket bounds in seconds for session durations.
const SESSION_BUCKETS: [f64; 14] = [
    0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
];

fn render_histogram(out: &mut String, name: &str, help: &str, t: &Timings) {
    render_histogram_in(out, name, help, t, &BUCKETS);
}

/// A histogram (exact buckets and sum) and a summary (quantiles from the hdrhistogram).
/// `buckets` are the bounds `t` was made with, as written in `le`.
fn render_histogram_in(out: &mut String, name: &str, help: &str, t: &Timings, buckets: &[f64]) {
    let _ = writeln!(out, "# HELP {name}_seconds {help}");
    let _ = writeln!(out, "# TYPE {name}_seconds histogram");
    let mut below = 0;
    for (&le, n) in buckets.iter().zip(&t.counts) {
        below += n;
        let _ = writeln!(out, "{name}_seconds_bucket{{le=\"{le}\"}} {below}");
    }
    let count = t.len();
    let _ = writeln!(out, "{name}_seconds_bucket{{le=\"+Inf\"}} {count}");
    let sum = t.sum_ns as f64 / 1e9;
    let _ = writeln!(out, "{name}_seconds_sum {sum}");
    let _ = writeln!(out, "{name}_seconds_count {count}");
    let window = t.window();
    let h = &window;
    let _ = writeln!(
        out,
        "# HELP {name}_quantile_seconds {help} (quantiles of the last 5 to 10 minutes)"
    );
    let _ = writeln!(out, "# TYPE {name}_quantile_seconds summary");
    for q in [0.5, 0.9, 0.99, 0.999] {
        // No observation, no quantile: NaN, as Prometheus's own client libraries write it.
        if h.is_empty() {
            let _ = writeln!(out, "{name}_quantile_seconds{{quantile=\"{q}\"}} NaN");
            continue;
        }
        let v = h.value_at_quantile(q) as f64 / 1e6;
        let _ = writeln!(out, "{name}_quantile_seconds{{quantile=\"{q}\"}} {v}");
    }
    let _ = writeln!(out, "{name}_quantile_seconds_sum {sum}");
    let _ = writeln!(out, "{name}_quantile_seconds_count {count}");
}

fn render_scalar(out: &mut String, name: &str, kind: &str, help: &str, v: u64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let _ = writeln!(out, "{name} {v}");
}

/// Renders figures in the Prometheus text format (0.0.4).
pub fn render(m: &CoreMetrics) -> String {
    let mut out = String::with_capacity(8192);
    render_histogram(
        &mut out,
        "postern_eod_latency",
        "End of data to 250 reply.",
        &m.eod_latency,
    );
    render_histogram(
        &mut out,
        "postern_spool_commit_latency",
        "Spool commit latency.",
        &m.commit_latency,
    );
    render_histogram(
        &mut out,
        "postern_command_latency",
        "Command to reply latency: from a read of commands to the write of their replies, one sample per read.",
        &m.command_latency,
    );
    render_histogram_in(
        &mut out,
        "postern_session_duration",
        "Session duration.",
        &m.session_duration,
        &SESSION_BUCKETS,
    );
    for (name, help, v) in [
        (
            "postern_connections_total",
            "Connections accepted (a session each, but for those reset before it began); those refused at a limit are in postern_connections_refused_total.",
            m.connections,
        ),
        (
            "postern_connections_refused_total",
            "Connections refused at once (overload or per-IP limit).",
            m.connections_refused,
        ),
        (
            "postern_proxy_header_failures_total",
            "Connections from a load balancer closed for want of a valid PROXY header.",
            m.proxy_header_failures,
        ),
        (
            "postern_messages_accepted_total",
            "Messages accepted.",
            m.messages,
        ),
        (
            "postern_bytes_accepted_total",
            "Message bytes accepted and spooled, the Received header postern adds included.",
            m.bytes,
        ),
        (
            "postern_tls_handshakes_total",
            "TLS handshakes completed with clients (STARTTLS and implicit TLS).",
            m.tls_handshakes,
        ),
        (
            "postern_tls_handshake_failures_total",
            "TLS handshakes with clients that failed.",
            m.tls_failures,
        ),
        (
            "postern_outbound_tls_handshakes_total",
            "TLS handshakes completed with next hops (STARTTLS on delivery).",
            m.outbound_tls_handshakes,
        ),
        (
            "postern_outbound_tls_handshake_failures_total",
            "TLS handshakes with next hops that failed.",
            m.outbound_tls_failures,
        ),
        (
            "postern_spool_errors_total",
            "Spool operations that failed: each failed write, sync or deletion, and each \
             message a failed group commit refused (one failed sync with 50 messages waiting \
             counts 51).",
            m.spool_errors,
        ),
        (
            "postern_recipients_delivered_total",
            "Recipients delivered to their next hop.",
            m.delivered,
        ),
        (
            "postern_delivery_deferrals_total",
            "Delivery attempts deferred after a temporary failure.",
            m.deferred,
        ),
        (
            "postern_recipients_failed_total",
            "Recipients failed for good (permanent failure or expiry).",
            m.failed,
        ),
        (
            "postern_recipients_deleted_total",
            "Recipients deleted by the operator (postern queue --delete) before they were delivered or failed: no attempt and no report made for them.",
            m.deleted,
        ),
        (
            "postern_bounces_total",
            "Delivery status notifications made.",
            m.bounces,
        ),
        (
            "postern_spool_messages_copied_total",
            "Waiting messages copied forward in the spool, so that the segments they kept could be deleted.",
            m.copied_forward,
        ),
        (
            "postern_spool_drafts_moved_total",
            "Messages still being received (a body trickled in) moved forward in the spool, so that the segments they kept could be deleted.",
            m.drafts_moved,
        ),
    ] {
        render_scalar(&mut out, name, "counter", help, v);
    }
    let _ = writeln!(out, "# HELP postern_replies_total Replies sent, by class.");
    let _ = writeln!(out, "# TYPE postern_replies_total counter");
    for (i, class) in ["2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
        let _ = writeln!(
            out,
            "postern_replies_total{{class=\"{class}\"}} {}",
            m.replies[i]
        );
    }
    for (name, help, v) in [
        (
            "postern_active_sessions",
            "Sessions open now.",
            m.active_sessions,
        ),
        (
            "postern_spool_bytes",
            "Bytes of spool segment files, each reserved on disk in full when made.",
            m.spool_bytes,
        ),
        (
            "postern_queue_depth",
            "Messages waiting for delivery.",
            m.queue_depth,
        ),
        (
            "postern_queue_recipients",
            "Recipients of the messages waiting for delivery, each message's all until it is final (0 while mail is held).",
            m.queue_recipients,
        ),
        (
            "postern_outbound_connections",
            "Outbound connections to next hops, open or being opened.",
            m.outbound_connections,
        ),
        (
            "postern_next_hops",
            "Next hops the relay keeps state for (jobs waiting, connections, a pause); quiet ones are forgotten.",
            m.next_hops,
        ),
        (
            "postern_cores_refusing_mail",
            "Cores refusing new transactions (452) while the queue or the spool is over its high-water mark.",
            m.refusing,
        ),
    ] {
        render_scalar(&mut out, name, "gauge", help, v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `postern_connections_total` and the sum of `postern_core_connections_total` in `text`.
    fn connections_and_their_parts(text: &str) -> (u64, u64) {
        let value = |l: &str| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap();
        let total = text
            .lines()
            .find(|l| l.starts_with("postern_connections_total "))
            .map(value)
            .unwrap();
        let parts = text
            .lines()
            .filter(|l| l.starts_with("postern_core_connections_total{"))
            .map(value)
            .sum();
        (total, parts)
    }

    #[test]
    fn the_connection_total_and_its_parts_come_from_the_same_copies() {
        // Two cores publish all along while the scrapes run: each scrape's total must be the
        // sum of the parts it shows.
        let registry = Registry::default();
        let slots = [registry.slot(), registry.slot()];
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let publisher = {
            let (slots, stop) = (slots.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 50_000_000 {
                    n += 1;
                    for slot in &slots {
                        slot.lock().unwrap().connections = n;
                    }
                }
            })
        };
        let mut moved = 0;
        for _ in 0..300 {
            let (total, parts) = connections_and_their_parts(&registry.render());
            assert_eq!(total, parts, "a scrape disagrees with itself");
            moved += u64::from(total > 0);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        publisher.join().unwrap();
        assert!(moved > 0, "nothing was published during the scrapes");
    }

    #[test]
    fn merge_and_render() {
        let registry = Registry::default();
        let a = registry.slot();
        let b = registry.slot();
        {
            let mut a = a.lock().unwrap();
            a.messages = 2;
            CoreMetrics::record(&mut a.eod_latency, Duration::from_micros(300));
            a.count_replies(b"250-x\r\n250 y\r\n354 go\r\n550 5.1.1 no\r\n");
        }
        {
            let mut b = b.lock().unwrap();
            b.messages = 3;
            CoreMetrics::record(&mut b.eod_latency, Duration::from_millis(3));
        }
        let text = registry.render();
        assert!(text.contains("postern_messages_accepted_total 5\n"));
        assert!(text.contains("postern_replies_total{class=\"2xx\"} 1\n"));
        assert!(text.contains("postern_replies_total{class=\"3xx\"} 1\n"));
        assert!(text.contains("postern_replies_total{class=\"5xx\"} 1\n"));
        assert!(text.contains("postern_eod_latency_seconds_bucket{le=\"0.0005\"} 1\n"));
        // 3 ms is past the 2 ms bound and within 2.5 ms's successor.
        assert!(text.contains("postern_eod_latency_seconds_bucket{le=\"0.002\"} 1\n"));
        assert!(text.contains("postern_eod_latency_seconds_bucket{le=\"0.0025\"} 1\n"));
        assert!(text.contains("postern_eod_latency_seconds_bucket{le=\"0.005\"} 2\n"));
        assert!(text.contains("postern_eod_latency_seconds_count 2\n"));
        // A summary with no observation has no quantiles to give.
        assert!(text.contains("postern_eod_latency_quantile_seconds{quantile=\"0.99\"} 0.003"));
        assert!(
            text.contains("postern_spool_commit_latency_quantile_seconds{quantile=\"0.5\"} NaN\n"),
            "{text}"
        );
    }

    #[test]
    fn buckets_and_sums_are_exact_at_the_bounds_and_past_the_top() {
        let registry = Registry::default();
        let a = registry.slot();
        {
            let mut a = a.lock().unwrap();
            // On a bound and just past it: the histogram's slot there holds both.
            CoreMetrics::record(&mut a.session_duration, Duration::from_secs(3600));
            CoreMetrics::record(&mut a.session_duration, Duration::from_millis(3_600_050));
            CoreMetrics::record(&mut a.eod_latency, Duration::from_millis(10));
            // Past the bound by less than a microsecond: past it all the same.
            CoreMetrics::record(&mut a.eod_latency, Duration::from_nanos(10_001_400));
            // Past the latency histogram's top (100 s): counted and summed in full.
            CoreMetrics::record(&mut a.eod_latency, Duration::from_secs(240));
        }
        let text = registry.render();
        let line = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
                .unwrap_or_else(|| panic!("no {name} in {text}"))
                .to_owned()
        };
        assert_eq!(
            line("postern_session_duration_seconds_bucket{le=\"3600\"}"),
            "1"
        );
        assert_eq!(
            line("postern_session_duration_seconds_bucket{le=\"7200\"}"),
            "2"
        );
        assert_eq!(line("postern_eod_latency_seconds_bucket{le=\"0.01\"}"), "1");
        assert_eq!(
            line("postern_eod_latency_seconds_bucket{le=\"0.025\"}"),
            "2"
        );
        assert_eq!(line("postern_eod_latency_seconds_bucket{le=\"10\"}"), "2");
        assert_eq!(line("postern_eod_latency_seconds_bucket{le=\"+Inf\"}"), "3");
        assert_eq!(line("postern_eod_latency_seconds_count"), "3");
        assert_eq!(line("postern_eod_latency_seconds_sum"), "240.0200014");
        assert_eq!(line("postern_session_duration_seconds_sum"), "7200.05");
        // The smallest bound, 100 µs, and 250 µs (0.00025 * 1e6 is 249.99...).
        {
            let mut a = a.lock().unwrap();
            CoreMetrics::record(&mut a.commit_latency, Duration::from_micros(100));
            CoreMetrics::record(&mut a.commit_latency, Duration::from_micros(250));
        }
        let text = registry.render();
        assert!(text.contains("postern_spool_commit_latency_seconds_bucket{le=\"0.0001\"} 1\n"));
        assert!(text.contains("postern_spool_commit_latency_seconds_bucket{le=\"0.00025\"} 2\n"));
    }

    #[test]
    fn quantiles_cover_the_last_minutes_and_counts_the_whole_run() {
        let registry = Registry::default();
        let a = registry.slot();
        let start = Instant::now();
        let quantile = |text: &str| {
            text.lines()
                .find_map(|l| {
                    l.strip_prefix("postern_eod_latency_quantile_seconds{quantile=\"0.5\"} ")
                })
                .unwrap()
                .to_owned()
        };
        let mut m = CoreMetrics::default();
        m.age(start);
        CoreMetrics::record(&mut m.eod_latency, Duration::from_secs(2));
        *a.lock().unwrap() = m.clone();
        // (Kept to three significant digits.)
        let first = quantile(&registry.render());
        assert!(first.starts_with("2.00"), "{first}");
        // A period later, the one before still counts.
        m.age(start + QUANTILE_PERIOD);
        CoreMetrics::record(&mut m.eod_latency, Duration::from_millis(1));
        CoreMetrics::record(&mut m.eod_latency, Duration::from_millis(1));
        *a.lock().unwrap() = m.clone();
        assert_eq!(quantile(&registry.render()), "0.001");
        // Two periods on, the 2 s is gone from the quantiles, not from the count or sum.
        m.age(start + 2 * QUANTILE_PERIOD);
        CoreMetrics::record(&mut m.eod_latency, Duration::from_millis(3));
        *a.lock().unwrap() = m.clone();
        let text = registry.render();
        assert!(
            text.contains("postern_eod_latency_quantile_seconds{quantile=\"0.999\"} 0.003"),
            "{text}"
        );
        assert!(text.contains("postern_eod_latency_quantile_seconds_count 4\n"));
        assert!(text.contains("postern_eod_latency_seconds_sum 2.005\n"));
        // Long quiet: nothing recent is left.
        m.age(start + 10 * QUANTILE_PERIOD);
        *a.lock().unwrap() = m.clone();
        assert_eq!(quantile(&registry.render()), "NaN");
    }

    #[test]
    fn long_sessions_keep_their_length() {
        let registry = Registry::default();
        let a = registry.slot();
        {
            let mut a = a.lock().unwrap();
            CoreMetrics::record(&mut a.session_duration, Duration::from_secs(1200));
            CoreMetrics::record(&mut a.session_duration, Duration::from_millis(40));
        }
        let text = registry.render();
        assert!(
            text.contains("postern_session_duration_seconds_bucket{le=\"600\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("postern_session_duration_seconds_bucket{le=\"1800\"} 2\n"),
            "{text}"
        );
        let max = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("postern_session_duration_quantile_seconds{quantile=\"0.999\"} ")
            })
            .unwrap();
        let max: f64 = max.parse().unwrap();
        assert!((1190.0..1210.0).contains(&max), "{max}");
    }
}
