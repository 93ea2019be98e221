//! Commit tickets and the order in which sync batches settle them.
//!
//! Tickets are numbered in issue order. A batch covers the tickets issued since the previous
//! batch. A ticket is durable once its batch and every earlier batch have succeeded; a failed
//! batch fails every ticket not yet settled and issued up to the moment the failure is
//! reported, since the failed range may hold records of messages finished later, and an
//! earlier batch still in flight may not learn of the error (docs/durability.md, "Faults").

use std::collections::VecDeque;

/// A finished message's (or status record's) place in the commit order; durable once a sync
/// covers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(pub(crate) u64);

/// Where a ticket stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TicketState {
    /// Not synced yet.
    Pending,
    /// Synced: the message (or status) is durable. Reply `250`.
    Durable,
    /// A sync that covered it failed: not durable. Reply `451 4.3.0`.
    Failed,
}

/// The ticket counters of one spool.
#[derive(Debug, Default)]
pub(crate) struct Commits {
    issued: u64,
    batched: u64,
    /// Batches handed out and not yet settled in order: (last ticket, outcome when known).
    in_flight: VecDeque<(u64, Option<bool>)>,
    /// Every ticket up to this one is settled (durable unless in `failed`).
    settled: u64,
    /// Failed ticket ranges `(after, upto]`.
    failed: Vec<(u64, u64)>,
}

impl Commits {
    /// Issues the next ticket.
    pub(crate) fn issue(&mut self) -> Ticket {
        self.issued += 1;
        Ticket(self.issued)
    }

    /// The range `(after, upto]` of a new batch, when tickets are waiting.
    pub(crate) fn take(&mut self) -> Option<(u64, u64)> {
        if self.issued == self.batched {
            return None;
        }
        let range = (self.batched, self.issued);
        self.batched = self.issued;
        self.in_flight.push_back((self.issued, None));
        Some(range)
    }

    /// Whether every ticket issued is in a batch.
    pub(crate) fn all_batched(&self) -> bool {
        self.issued == self.batched
    }

    /// Whether every ticket issued is in a batch and every batch settled.
    pub(crate) fn idle(&self) -> bool {
        self.issued == self.batched && self.in_flight.is_empty()
    }

    /// Records a batch's outcome and settles what can be settled in order.
    pub(crate) fn done(&mut self, (_, upto): (u64, u64), ok: bool) {
        if !ok {
            // Not only this batch's range: an earlier batch still in flight syncs the same
            // files, and a sync error is reported to one fdatasync only, so that batch's
            // success, if it comes later, proves nothing (docs/durability.md, "Faults").
            self.fail_unsettled();
        }
        if let Some(slot) = self.in_flight.iter_mut().find(|(u, _)| *u == upto) {
            slot.1 = Some(ok);
        }
        while let Some(&(u, Some(_))) = self.in_flight.front() {
            self.settled = u;
            self.in_flight.pop_front();
        }
    }

    /// After a failed write: fails every ticket issued and not yet settled, those of a batch
    /// in flight too (the write may have held their records, or the disk lost others).
    pub(crate) fn fail_issued(&mut self) {
        match self.take() {
            Some(range) => self.done(range, false),
            None => self.fail_unsettled(),
        }
    }

    /// Fails the tickets after `settled` up to the last issued. Kept in order and apart
    /// (ranges start at `settled`, which only grows): one that meets the last is merged into
    /// it, and a ticket is looked up by binary search, however many failures a flapping disk
    /// has had.
    fn fail_unsettled(&mut self) {
        let (after, upto) = (self.settled, self.issued);
        if after == upto {
            return;
        }
        match self.failed.last_mut() {
            Some(last) if after <= last.1 => last.1 = last.1.max(upto),
            _ => self.failed.push((after, upto)),
        }
    }

    /// Where `t` stands.
    pub(crate) fn state(&self, t: Ticket) -> TicketState {
        // The last range starting before `t`: the only one that can hold it.
        let i = self.failed.partition_point(|&(a, _)| a < t.0);
        if i > 0 && t.0 <= self.failed[i - 1].1 {
            TicketState::Failed
        } else if t.0 <= self.settled {
            TicketState::Durable
        } else {
            TicketState::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_batch_does_not_settle_an_earlier_one() {
        let mut c = Commits::default();
        let t1 = c.issue();
        let b1 = c.take().unwrap_or_default();
        let t2 = c.issue();
        let b2 = c.take().unwrap_or_default();
        assert_eq!(c.take(), None);
        c.done(b2, true);
        assert_eq!(c.state(t1), TicketState::Pending);
        assert_eq!(c.state(t2), TicketState::Pending, "its batch waits for b1");
        c.done(b1, true);
        assert_eq!(
            (c.state(t1), c.state(t2)),
            (TicketState::Durable, TicketState::Durable)
        );
    }

    #[test]
    fn a_failed_write_fails_the_tickets_of_a_batch_in_flight_too() {
        let mut c = Commits::default();
        let t1 = c.issue();
        let b1 = c.take().unwrap_or_default();
        // Every ticket issued is in that batch: the write that fails now has none of its own.
        c.fail_issued();
        assert_eq!(c.state(t1), TicketState::Failed);
        // The batch's own success, later, proves nothing.
        c.done(b1, true);
        assert_eq!(c.state(t1), TicketState::Failed);
        // Later tickets are not touched.
        let t2 = c.issue();
        let b2 = c.take().unwrap_or_default();
        assert_eq!(c.state(t2), TicketState::Pending);
        c.done(b2, true);
        assert_eq!(c.state(t2), TicketState::Durable);
        // With nothing issued since the last settled ticket, a failed write fails nothing.
        c.fail_issued();
        assert_eq!(c.state(t2), TicketState::Durable);
    }

    #[test]
    fn failures_far_apart_and_close_together_fail_exactly_their_tickets() {
        let mut c = Commits::default();
        let mut states = Vec::new();
        // Batches of three tickets; every third batch fails, and so do the two after the
        // ninth (meeting ranges, merged).
        for n in 0..12 {
            let tickets: Vec<Ticket> = (0..3).map(|_| c.issue()).collect();
            let batch = c.take().unwrap_or_default();
            let ok = n % 3 != 2 && n != 10;
            c.done(batch, ok);
            states.extend(tickets.into_iter().map(|t| (t, ok)));
        }
        for (t, ok) in states {
            let want = if ok {
                TicketState::Durable
            } else {
                TicketState::Failed
            };
            assert_eq!(c.state(t), want, "{t:?}");
        }
        assert!(c.failed.len() <= 4, "{:?}", c.failed);
        let next = c.issue();
        assert_eq!(c.state(next), TicketState::Pending);
    }

    #[test]
    fn a_failure_fails_every_ticket_issued_before_it_was_known() {
        let mut c = Commits::default();
        let t1 = c.issue();
        let b1 = c.take().unwrap_or_default();
        let t2 = c.issue();
        let b2 = c.take().unwrap_or_default();
        let t3 = c.issue();
        c.done(b1, false);
        let t4 = c.issue();
        c.done(b2, true);
        let b3 = c.take().unwrap_or_default();
        c.done(b3, true);
        assert_eq!(c.state(t1), TicketState::Failed);
        assert_eq!(
            c.state(t2),
            TicketState::Failed,
            "b2 reported success, too late"
        );
        assert_eq!(c.state(t3), TicketState::Failed);
        assert_eq!(c.state(t4), TicketState::Durable);
    }

    #[test]
    fn a_failure_fails_the_earlier_batches_still_in_flight() {
        let mut c = Commits::default();
        let t1 = c.issue();
        let b1 = c.take().unwrap_or_default();
        let t2 = c.issue();
        let b2 = c.take().unwrap_or_default();
        c.done(b2, false);
        c.done(b1, true);
        assert_eq!(
            (c.state(t1), c.state(t2)),
            (TicketState::Failed, TicketState::Failed),
            "b1 synced the same files; its success may hide b2's error"
        );
        let t3 = c.issue();
        let b3 = c.take().unwrap_or_default();
        c.done(b3, true);
        assert_eq!(c.state(t3), TicketState::Durable);
    }
}
