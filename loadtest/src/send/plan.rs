//! Which message comes next and when it is due: one ticket per message from a counter shared
//! by every executor (one atomic add per message), bounded by `--messages` or `--duration`,
//! and with `--rate` a due time per ticket, so latency is measured from when a message should
//! have started rather than from when a busy connection got round to it (coordinated
//! omission).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The schedule of a run.
#[derive(Debug)]
pub struct Plan {
    start: Instant,
    limit: Option<u64>,
    deadline: Option<Instant>,
    rate: Option<f64>,
    next: AtomicU64,
    /// Tickets handed out.
    claimed: AtomicU64,
    /// Set (by SIGINT or SIGTERM) to end the run early: no more tickets.
    stop: Arc<AtomicBool>,
    /// When the run first saw `stop` set: where an interrupted run's due times end.
    stop_seen: OnceLock<Instant>,
    /// Tickets given back unsent that came due before the stop was seen, on a connection
    /// that was waiting for them: late by the wait's own granularity, not for want of a
    /// connection, so not among those due (nor those missed).
    excused: AtomicU64,
}

/// One message to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    /// The message's sequence number, from 0.
    pub seq: u64,
    /// When it is due (open loop only).
    pub due: Option<Instant>,
}

impl Plan {
    /// A plan starting at `start`: `limit` messages or until `start + duration`, at `rate`
    /// messages per second when given.
    pub fn new(
        start: Instant,
        limit: Option<u64>,
        duration: Option<Duration>,
        rate: Option<f64>,
    ) -> Self {
        Self {
            start,
            limit,
            deadline: duration.map(|d| start + d),
            rate,
            next: AtomicU64::new(0),
            claimed: AtomicU64::new(0),
            stop: Arc::new(AtomicBool::new(false)),
            stop_seen: OnceLock::new(),
            excused: AtomicU64::new(0),
        }
    }

    /// The flag that ends the run early once set.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Whether the run was ended early (the first look that sees it notes when).
    pub fn stopped(&self) -> bool {
        let stopped = self.stop.load(Ordering::Relaxed);
        if stopped {
            self.stop_seen.get_or_init(Instant::now);
        }
        stopped
    }

    /// Messages handed out so far.
    pub fn claimed(&self) -> u64 {
        self.claimed.load(Ordering::Relaxed)
    }

    /// With `--rate`, how many messages came due during the run: those a server that kept up
    /// would have been sent. The run ends at `--duration`, or where it was stopped before
    /// (with `--messages` alone, only a stopped run has an end).
    pub fn due(&self) -> Option<u64> {
        let rate = self.rate?;
        let deadline = match (self.stop_seen.get().copied(), self.deadline) {
            (Some(stop), Some(deadline)) => stop.min(deadline),
            (stop, deadline) => stop.or(deadline)?,
        };
        // The count of sequence numbers whose due time falls before the deadline, by the same
        // test `claim` applies: the estimate is off by one at most where rounding differs.
        let mut due = ((deadline - self.start).as_secs_f64() * rate).ceil() as u64;
        // Bounded: each loop moves the estimate by one, at most a step or two.
        while due > 0 && self.due_time(due - 1, rate) >= deadline {
            due -= 1;
        }
        while due < u64::MAX && self.due_time(due, rate) < deadline {
            due += 1;
        }
        let due = self.limit.map_or(due, |l| l.min(due));
        Some(due.saturating_sub(self.excused.load(Ordering::Relaxed)))
    }

    /// When message `seq` is due at `rate` messages per second.
    fn due_time(&self, seq: u64, rate: f64) -> Instant {
        self.start + Duration::from_secs_f64(seq as f64 / rate)
    }

    /// When the run started.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Gives back a claimed ticket never started (the run was stopped first): it counts as
    /// not started, so messages due less those not started are those started.
    pub fn unclaim(&self) {
        let _ = self
            .claimed
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| c.checked_sub(1));
    }

    /// Gives back a ticket due at `due` that a connection was waiting to start when the run
    /// was stopped: where it came due before the stop was seen, it is not counted as due
    /// either (the connection was free; only the wait's wake-up was late).
    pub fn unclaim_waited(&self, due: Instant) {
        self.unclaim();
        if self.stop_seen.get().is_some_and(|stop| due < *stop) {
            self.excused.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The next message, or None when the run is over.
    pub fn claim(&self) -> Option<Ticket> {
        if self.stopped() || self.deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        if self.limit.is_some_and(|l| seq >= l) {
            return None;
        }
        let due = self.rate.map(|r| self.due_time(seq, r));
        if let (Some(due), Some(deadline)) = (due, self.deadline) {
            if due >= deadline {
                return None;
            }
        }
        self.claimed.fetch_add(1, Ordering::Relaxed);
        Some(Ticket { seq, due })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_limit_hands_out_each_sequence_number_once() {
        let plan = Plan::new(Instant::now(), Some(3), None, None);
        let seqs: Vec<u64> = std::iter::from_fn(|| plan.claim()).map(|t| t.seq).collect();
        assert_eq!(seqs, vec![0, 1, 2]);
        assert!(plan.claim().is_none());
    }

    #[test]
    fn a_rate_spaces_due_times_and_a_duration_ends_them() {
        let start = Instant::now();
        let plan = Plan::new(start, None, Some(Duration::from_secs(1)), Some(4.0));
        let dues: Vec<Duration> = std::iter::from_fn(|| plan.claim())
            .map(|t| t.due.unwrap() - start)
            .collect();
        assert_eq!(dues, [0, 250, 500, 750].map(Duration::from_millis).to_vec());
        assert_eq!((plan.due(), plan.claimed()), (Some(4), 4));
    }

    #[test]
    fn a_stopped_run_counts_the_messages_due_until_the_stop() {
        let start = Instant::now() - Duration::from_secs(1);
        let plan = Plan::new(start, None, Some(Duration::from_secs(60)), Some(10.0));
        assert_eq!(plan.due(), Some(600));
        plan.stop_flag().store(true, Ordering::Relaxed);
        let before = Instant::now();
        assert!(plan.stopped());
        let after = Instant::now();
        // Due times 0.0, 0.1, ... s before the stop was seen.
        let at_least = ((before - start).as_secs_f64() * 10.0).floor() as u64;
        let at_most = ((after - start).as_secs_f64() * 10.0).ceil() as u64 + 1;
        let due = plan.due().unwrap();
        assert!(
            (at_least..=at_most).contains(&due),
            "{due} of {at_least}..={at_most}"
        );
        // With --messages alone only a stopped run has an end.
        let plan = Plan::new(start, Some(1000), None, Some(10.0));
        assert_eq!(plan.due(), None);
        plan.stop_flag().store(true, Ordering::Relaxed);
        assert!(plan.stopped());
        assert!(plan.due().is_some_and(|d| (10..=1000).contains(&d)));
    }

    #[test]
    fn messages_due_and_never_started_are_counted() {
        let start = Instant::now();
        let plan = Plan::new(start, None, Some(Duration::from_secs(2)), Some(10.0));
        assert_eq!(plan.due(), Some(20));
        // A server that kept two connections busy: two messages were started.
        plan.claim().unwrap();
        plan.claim().unwrap();
        assert_eq!(plan.claimed(), 2);
        assert_eq!(Plan::new(start, Some(5), None, Some(10.0)).due(), None);
    }

    #[test]
    fn the_messages_due_are_those_a_run_hands_out() {
        // Durations and rates whose product rounds up past a whole number in floating point
        // (0.7 × 10 is 7.000000000000001), beside plain ones. Claiming takes microseconds, so
        // the due times end each run long before its deadline comes round.
        for (rate, ms) in [
            (10.0, 700),
            (3.0, 1000),
            (100.0, 1100),
            (7.0, 1000),
            (33.3, 990),
        ] {
            let plan = Plan::new(
                Instant::now(),
                None,
                Some(Duration::from_millis(ms)),
                Some(rate),
            );
            let handed_out = std::iter::from_fn(|| plan.claim()).count() as u64;
            assert_eq!(plan.due(), Some(handed_out), "rate {rate}, {ms} ms");
        }
    }

    #[test]
    fn a_ticket_given_back_unsent_counts_as_not_started() {
        let start = Instant::now() - Duration::from_secs(1);
        let plan = Plan::new(start, None, Some(Duration::from_secs(60)), Some(10.0));
        let claimed = std::iter::from_fn(|| plan.claim()).take(3).count() as u64;
        assert_eq!(plan.claimed(), claimed);
        // The third was waiting for its due time when the run stopped.
        plan.stop_flag().store(true, Ordering::Relaxed);
        assert!(plan.stopped());
        plan.unclaim();
        assert_eq!(plan.claimed(), 2);
        let due = plan.due().unwrap();
        assert!(due >= 3, "{due}");
        // Due less not started (due - claimed) is what was started.
        assert_eq!(due - (due - plan.claimed()), 2);
        plan.unclaim();
        plan.unclaim();
        plan.unclaim();
        assert_eq!(plan.claimed(), 0, "never below zero");
    }

    #[test]
    fn a_ticket_that_came_due_while_its_connection_waited_for_it_is_not_missed() {
        let start = Instant::now() - Duration::from_secs(1);
        let plan = Plan::new(start, None, Some(Duration::from_secs(60)), Some(10.0));
        let tickets: Vec<Ticket> = std::iter::from_fn(|| plan.claim()).take(3).collect();
        plan.stop_flag().store(true, Ordering::Relaxed);
        assert!(plan.stopped());
        let due = plan.due().unwrap();
        // The third came due (0.2 s in) long before the stop, while its connection waited
        // for it: given back, it is neither started nor missed.
        plan.unclaim_waited(tickets[2].due.unwrap());
        assert_eq!(plan.claimed(), 2);
        assert_eq!(plan.due(), Some(due - 1));
        // One due after the stop was seen is given back as any other.
        plan.unclaim_waited(Instant::now() + Duration::from_secs(1));
        assert_eq!(plan.claimed(), 1);
        assert_eq!(plan.due(), Some(due - 1));
    }

    #[test]
    fn a_stop_ends_the_handing_out() {
        let plan = Plan::new(Instant::now(), Some(10), None, None);
        assert!(plan.claim().is_some());
        plan.stop_flag().store(true, Ordering::Relaxed);
        assert!(plan.claim().is_none());
        assert!(plan.stopped());
    }
}
