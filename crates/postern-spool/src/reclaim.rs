//! The reclaim index of one core: its segments, oldest first, each with the number of messages
//! pinning it (open or live messages whose `START` it holds), and which segment each live
//! message pins. Segments are released from the oldest (docs/durability.md); the one
//! exception is a segment that only ever held records of messages abandoned before their end
//! (a body refused as too large, a client gone mid-body), which goes as soon as none of them
//! is open, whatever is older. A live message that keeps the oldest segment while the spool
//! grows behind it is copied forward ([`Index::next_to_copy`]): once its copy is durable,
//! the pin moves to the copy's segment.

use std::collections::{HashMap, VecDeque};

use crate::meta::Status;

/// One segment file of the core.
#[derive(Debug)]
struct Entry {
    seq: u64,
    pins: usize,
    bytes: u64,
    /// Open drafts with records in this segment.
    drafts: usize,
    /// Whether it may hold a record that matters once its draft is over: a finished
    /// message's, a status, or anything of a segment this run did not make.
    kept: bool,
    /// Whether an abandoned draft wrote into it (what `pop_unused` is for).
    abandoned: bool,
}

impl Entry {
    /// Only abandoned drafts wrote into it, and none of them is open.
    fn unused(&self) -> bool {
        self.abandoned && !self.kept && self.pins == 0 && self.drafts == 0
    }
}

/// A live message: finished, not final.
#[derive(Debug)]
struct Live {
    /// The segment holding its `START`, which it pins.
    seq: u64,
    /// The octets its records take in the segments (`START`, body, `END`, and the status
    /// records written for it since), which copying it forward would write again.
    size: u64,
    /// A copy written further on and not yet durable: the segment holding the copy's
    /// `START`, which it pins too until the copy is durable (then only it) or fails.
    copy: Option<u64>,
    /// The octets the copy's records take (its `size` once durable).
    copy_size: u64,
    /// The latest outcome of each recipient recorded in this spool (by envelope index; empty
    /// until the first), which a copy carries with it.
    statuses: Vec<Option<Status>>,
    /// The ticket of the latest status record appended for it in this run (0: none).
    last_status: u64,
    /// A status record of its, appended in this run, was in a write or a sync that failed.
    status_lost: bool,
}

/// Batches of copies `Index::next_to_copy` looks for in one walk over the live messages.
const PLAN_BATCHES: usize = 16;

/// Room for live messages the index keeps however few there are (see `Index::set_final`).
const ROOM_KEPT: usize = 1024;

/// The index.
#[derive(Debug, Default)]
pub(crate) struct Index {
    segments: VecDeque<Entry>,
    /// Live (finished, not final) messages by queue ID.
    live: HashMap<String, Live>,
    /// The sum of the live messages' sizes: the octets their records take.
    live_bytes: u64,
    /// The segment of the first copy written since the oldest segment last moved past the
    /// one before: while an older segment is left, copies stop short of it (see
    /// `next_to_copy`).
    copy_floor: Option<u64>,
    /// The live messages the last walk of `next_to_copy` found to copy, oldest first, with
    /// the segment of each one's `START`: handed out a batch at a time, so that a long queue
    /// is walked once for several batches rather than once for each.
    plan: VecDeque<(u64, String)>,
    /// Whether a segment may have become unused since `pop_unused` last found none (a draft
    /// abandoned, a segment put back): only then is the index looked through for one, not at
    /// every reclaim.
    maybe_unused: bool,
}

impl Index {
    /// Adds a segment file (newer than all the others): one found at the opening is `kept`,
    /// one this run makes is not, until it holds a record that matters.
    pub(crate) fn add_segment(&mut self, seq: u64, bytes: u64, kept: bool) {
        debug_assert!(self.segments.back().is_none_or(|e| e.seq < seq));
        self.segments.push_back(Entry {
            seq,
            pins: 0,
            bytes,
            drafts: 0,
            kept,
            abandoned: false,
        });
    }

    fn entry(&mut self, seq: u64) -> Option<&mut Entry> {
        // Segments are sorted: a binary search by number.
        let i = self.segments.binary_search_by_key(&seq, |e| e.seq).ok()?;
        self.segments.get_mut(i)
    }

    /// An open draft wrote its first record into segment `seq`. Only the segments it writes
    /// into count for it, not those it passed over while it waited: a slow message must not
    /// keep another's abandoned body from going.
    pub(crate) fn draft_in(&mut self, seq: u64) {
        if let Some(e) = self.entry(seq) {
            e.drafts += 1;
        }
    }

    /// A draft with records in segment `seq` is over: finished (`kept`: its records matter
    /// from now on), or abandoned (they never will).
    pub(crate) fn draft_out(&mut self, seq: u64, kept: bool) {
        if let Some(e) = self.entry(seq) {
            e.drafts = e.drafts.saturating_sub(1);
            e.kept |= kept;
            e.abandoned |= !kept;
        }
        self.maybe_unused |= !kept;
    }

    /// A record that matters (a status) went into segment `seq`.
    pub(crate) fn keep(&mut self, seq: u64) {
        if let Some(e) = self.entry(seq) {
            e.kept = true;
        }
    }

    /// A message being written pins the segment holding its `START`.
    pub(crate) fn pin(&mut self, seq: u64) {
        if let Some(e) = self.entry(seq) {
            e.pins += 1;
        }
    }

    /// Releases a pin (an aborted or failed draft).
    pub(crate) fn unpin(&mut self, seq: u64) {
        if let Some(e) = self.entry(seq) {
            e.pins = e.pins.saturating_sub(1);
        }
    }

    /// A finished message keeps its pin until it is final; `size`, the octets its records
    /// take; `statuses`, its recipients' outcomes so far (those recovery found, at an
    /// opening).
    pub(crate) fn set_live(
        &mut self,
        queue_id: String,
        seq: u64,
        size: u64,
        statuses: Vec<Option<Status>>,
    ) {
        self.live_bytes += size;
        let live = Live {
            seq,
            size,
            copy: None,
            copy_size: 0,
            statuses,
            last_status: 0,
            status_lost: false,
        };
        if let Some(old) = self.live.insert(queue_id, live) {
            self.live_bytes -= old.size;
            self.unpin(old.seq);
            if let Some(copy) = old.copy {
                self.unpin(copy);
            }
        }
    }

    /// Records recipient `rcpt`'s outcome for a live message (nothing for another): the
    /// latest replaces the one before, except that a final outcome stays (as recovery takes
    /// them).
    /// `ticket`: the record's, when its failure is to mark the message (see
    /// `note_failed_statuses`).
    ///
    /// `bytes`: the octets of its status record. A recipient's first counts among the
    /// message's octets (a copy carries one status per recipient, the latest, taken to be
    /// about as long). 0 for a record written into a copy, which counts them itself.
    pub(crate) fn set_status(
        &mut self,
        queue_id: &str,
        rcpt: u32,
        status: &Status,
        ticket: Option<u64>,
        bytes: u64,
    ) {
        let Some(live) = self.live.get_mut(queue_id) else {
            return;
        };
        if let Some(ticket) = ticket {
            live.last_status = ticket;
        }
        let rcpt = rcpt as usize;
        if live.statuses.len() <= rcpt {
            live.statuses.resize(rcpt + 1, None);
        }
        let slot = &mut live.statuses[rcpt];
        if slot.is_none() {
            live.size += bytes;
            self.live_bytes += bytes;
            if live.copy.is_some() {
                // The copy on its way was written without it: its size counts it too.
                live.copy_size += bytes;
            }
        }
        if !slot.as_ref().is_some_and(Status::is_final) {
            *slot = Some(status.clone());
        }
    }

    /// After a failed write or sync: marks each live message whose latest status record has
    /// a ticket that `failed`. No failed record is missed, as a failure fails every ticket not
    /// yet settled: a message with a status record among them has its latest one among them
    /// too.
    pub(crate) fn note_failed_statuses(&mut self, failed: impl Fn(u64) -> bool) {
        for live in self.live.values_mut() {
            if live.last_status != 0 && failed(live.last_status) {
                live.status_lost = true;
            }
        }
    }

    /// Whether a status record of live message `queue_id`, appended in this run, was in a
    /// write or a sync that failed (false for one not live here).
    pub(crate) fn status_lost(&self, queue_id: &str) -> bool {
        self.live.get(queue_id).is_some_and(|l| l.status_lost)
    }

    /// What a copy of live message `queue_id` carries: its recipients' outcomes so far. None
    /// when it is not live here, or a copy of it is already on its way.
    pub(crate) fn copyable(&self, queue_id: &str) -> Option<Vec<Option<Status>>> {
        let live = self.live.get(queue_id)?;
        live.copy.is_none().then(|| live.statuses.clone())
    }

    /// A copy of live message `queue_id` was written, its `START` in segment `seq` (pinned
    /// by the draft that wrote it), its records `size` octets: both pin until
    /// [`Index::copy_over`].
    pub(crate) fn copy_written(&mut self, queue_id: &str, seq: u64, size: u64) -> bool {
        match self.live.get_mut(queue_id) {
            Some(live) if live.copy.is_none() => {
                live.copy = Some(seq);
                live.copy_size = size;
                let front = self.segments.front().map(|e| e.seq);
                if self
                    .copy_floor
                    .is_none_or(|floor| front.is_none_or(|front| front >= floor))
                {
                    self.copy_floor = Some(seq);
                }
                true
            }
            _ => false,
        }
    }

    /// The copy of `queue_id` is durable (`durable`: the old place's pin goes, and the
    /// copy's segment is the message's from now on) or failed (the copy's pin goes).
    pub(crate) fn copy_over(&mut self, queue_id: &str, durable: bool) {
        let Some(live) = self.live.get_mut(queue_id) else {
            return;
        };
        let Some(copy) = live.copy.take() else {
            return;
        };
        let unpinned = if durable {
            self.live_bytes = self.live_bytes - live.size + live.copy_size;
            live.size = live.copy_size;
            std::mem::replace(&mut live.seq, copy)
        } else {
            copy
        };
        self.unpin(unpinned);
    }

    /// The live messages to copy forward, oldest first: when the segments come to twice what
    /// is live and a `segment_size` more, and there are at least three, those whose `START`
    /// lies in the oldest segments, as many of them as it takes to bring the spool back to
    /// about what is live and a segment (once the copies are durable, those segments go in
    /// order). A segment with an open draft's `START`, or with a copy on its way, stops the
    /// walk: nothing at or past it is asked for. So does the segment the last copies began
    /// in, while a segment older than it is left: what was copied there is not copied again
    /// while something older (a message the caller could not copy, a deletion that failed)
    /// keeps the spool from shrinking. The proportion bounds the work: the spool
    /// has grown by what is live and a segment since the last copies before anything is
    /// copied again, so over time every octet written costs less than one octet copied
    /// (what is live counts the octets a copy writes, envelopes and outcomes with the
    /// bodies: small messages would otherwise be copied again and again).
    ///
    /// At most `most` are handed out. A walk over the live messages finds those of the oldest
    /// segments, about `PLAN_BATCHES` times `most`, and its result is kept: later calls hand
    /// out the rest, less those copied or final meanwhile, and walk again once fewer than
    /// `most` are left (so that one the caller cannot copy, handed out again and again, does
    /// not keep those behind it from being found). A copy on its way stops the handing out
    /// there.
    pub(crate) fn next_to_copy(
        &mut self,
        current: Option<u64>,
        segment_size: u64,
        most: usize,
    ) -> Vec<String> {
        let Some(upto) = self.copy_upto(current, segment_size) else {
            self.plan = VecDeque::new();
            return Vec::new();
        };
        // What was found before and no longer waits there (copied, final) goes, and so does
        // what lies past the segments to empty now.
        while self.plan.back().is_some_and(|&(seq, _)| seq > upto) {
            self.plan.pop_back();
        }
        let live = &self.live;
        let waits = |&(seq, ref id): &(u64, String)| live.get(id).is_some_and(|l| l.seq == seq);
        while self.plan.front().is_some_and(|e| !waits(e)) {
            self.plan.pop_front();
        }
        let fresh = self.plan.is_empty();
        if fresh {
            self.plan = self.plan_copies(upto, most);
        }
        let (ids, stopped) = self.hand_out(most);
        if fresh || stopped || ids.len() == most {
            return ids;
        }
        self.plan = self.plan_copies(upto, most);
        self.hand_out(most).0
    }

    /// A walk for `next_to_copy`: enough for a few batches, so that a long queue is walked
    /// once for each few thousand copies, not once for each batch, nor its whole list made in
    /// one go.
    fn plan_copies(&self, upto: u64, most: usize) -> VecDeque<(u64, String)> {
        let mut wanted = most.saturating_mul(PLAN_BATCHES);
        let mut upto_now = upto;
        for e in self.segments.iter().take_while(|e| e.seq <= upto) {
            upto_now = e.seq;
            wanted = wanted.saturating_sub(e.pins);
            if wanted == 0 {
                break;
            }
        }
        self.walk_to_copy(upto_now).into()
    }

    /// Up to `most` of the plan's messages that still wait where it found them, and whether
    /// a copy on its way stopped the list short.
    fn hand_out(&self, most: usize) -> (Vec<String>, bool) {
        let mut ids = Vec::new();
        for (seq, id) in &self.plan {
            if ids.len() == most {
                break;
            }
            match self.live.get(id) {
                Some(l) if l.seq == *seq && l.copy.is_some() => return (ids, true),
                Some(l) if l.seq == *seq => ids.push(id.clone()),
                _ => {}
            }
        }
        (ids, false)
    }

    /// The newest segment `next_to_copy` would empty now, if any.
    fn copy_upto(&self, current: Option<u64>, segment_size: u64) -> Option<u64> {
        let start = self
            .live_bytes
            .saturating_add(segment_size)
            .saturating_mul(2);
        let total = self.bytes();
        if self.segments.len() < 3 || total < start {
            return None;
        }
        let target = self.live_bytes.saturating_add(segment_size);
        let front = self.segments.front().map_or(0, |e| e.seq);
        let floor = self.copy_floor.filter(|&floor| front < floor);
        // The segments to empty, oldest first, up to the first that cannot be.
        let mut upto = None;
        let mut left = total;
        for e in &self.segments {
            if Some(e.seq) == current || floor.is_some_and(|f| e.seq >= f) || left <= target {
                break;
            }
            upto = Some(e.seq);
            left = left.saturating_sub(e.bytes);
        }
        upto
    }

    /// The live messages whose `START` lies in the segments up to `upto`, oldest first, by
    /// queue ID within a segment, up to the first segment with an open draft's `START` or a
    /// copy on its way.
    fn walk_to_copy(&self, upto: u64) -> Vec<(u64, String)> {
        // (segment, queue ID, whether a copy is on its way), by segment: one pass over the
        // live messages and one sort by number, the only work that grows with the queue. (A
        // sort by queue ID here would read each ID's octets again and again, wherever they
        // lie in memory: a few hundred nanoseconds a message.)
        let mut found: Vec<(u64, &str, bool)> = self
            .live
            .iter()
            .filter(|(_, live)| live.seq <= upto)
            .map(|(id, live)| (live.seq, id.as_str(), live.copy.is_some()))
            .collect();
        found.sort_unstable_by_key(|f| f.0);
        let mut ids = Vec::new();
        let mut rest = &found[..];
        for e in self.segments.iter().take_while(|e| e.seq <= upto) {
            let before = rest.iter().take_while(|f| f.0 < e.seq).count();
            rest = &rest[before..];
            let n = rest.iter().take_while(|f| f.0 == e.seq).count();
            let (here, after) = rest.split_at(n);
            rest = after;
            if e.pins == 0 {
                continue;
            }
            if here.len() != e.pins || here.iter().any(|&(_, _, copying)| copying) {
                // An open draft started here, or a copy is on its way: it stays for now, and
                // so does everything after it.
                break;
            }
            // Copied in order of arrival (queue IDs sort by it), each ID read once.
            let mut here: Vec<String> = here.iter().map(|&(_, id, _)| id.to_owned()).collect();
            here.sort_unstable();
            ids.extend(here.into_iter().map(|id| (e.seq, id)));
        }
        ids
    }

    /// Whether a finished message is live here (not yet final).
    pub(crate) fn is_live(&self, queue_id: &str) -> bool {
        self.live.contains_key(queue_id)
    }

    /// A live message became final: releases its pin. False when it was not live here.
    pub(crate) fn set_final(&mut self, queue_id: &str) -> bool {
        match self.live.remove(queue_id) {
            Some(live) => {
                self.live_bytes -= live.size;
                self.unpin(live.seq);
                if let Some(copy) = live.copy {
                    self.unpin(copy);
                }
                // A queue that grew large (an outage) gives its room back as it drains,
                // rather than keeping the table of its largest size for good. Shrunk to
                // twice what is left, once a quarter is: each shrink is paid for by the
                // removals before it.
                let (len, room) = (self.live.len(), self.live.capacity());
                if room > ROOM_KEPT && len < room / 4 {
                    self.live.shrink_to(len * 2);
                }
                true
            }
            None => false,
        }
    }

    /// The oldest segment, when nothing pins it and it is none of `in_use` (the one being
    /// written, the one the batch being synced was taken in): removed from the index, for
    /// the caller to delete.
    pub(crate) fn pop_free(&mut self, in_use: [Option<u64>; 2]) -> Option<(u64, u64)> {
        let front = self.segments.front()?;
        if front.pins > 0 || in_use.contains(&Some(front.seq)) {
            return None;
        }
        self.segments.pop_front().map(|e| (e.seq, e.bytes))
    }

    /// A segment, none of `in_use`, that only abandoned drafts wrote into and none of them is
    /// open: removed from the index, for the caller to delete, whatever is older. Its records
    /// matter to no recovery: a draft without its `END` is never delivered, and one whose
    /// `START` or `ABORT` it held leaves the others' records without a message.
    pub(crate) fn pop_unused(&mut self, in_use: [Option<u64>; 2]) -> Option<(u64, u64)> {
        if !self.maybe_unused {
            return None;
        }
        let found = self
            .segments
            .iter()
            .position(|e| e.unused() && !in_use.contains(&Some(e.seq)));
        let Some(i) = found else {
            // Looked for again once another draft is abandoned, or now and then while a
            // segment would be taken but for being in use (an abandoned draft wrote into
            // it, nothing else that matters): once it is not, it goes.
            self.maybe_unused = in_use.into_iter().flatten().any(|s| self.is_unused(s));
            return None;
        };
        self.segments.remove(i).map(|e| (e.seq, e.bytes))
    }

    /// Whether segment `seq` is one [`Index::pop_free`] or [`Index::pop_unused`] would take
    /// but for its being in use.
    pub(crate) fn would_go(&mut self, seq: u64) -> bool {
        let oldest_free = self
            .segments
            .front()
            .is_some_and(|e| e.seq == seq && e.pins == 0);
        oldest_free || self.is_unused(seq)
    }

    fn is_unused(&mut self, seq: u64) -> bool {
        self.entry(seq).is_some_and(|e| e.unused())
    }

    /// Puts back a segment `pop_free` or `pop_unused` returned (its deletion failed or
    /// waits), in its place among the others; `kept` as it was when it was taken out.
    pub(crate) fn put_back(&mut self, seq: u64, bytes: u64, kept: bool) {
        self.maybe_unused |= !kept;
        let at = self.segments.partition_point(|e| e.seq < seq);
        self.segments.insert(
            at,
            Entry {
                seq,
                pins: 0,
                bytes,
                drafts: 0,
                kept,
                abandoned: !kept,
            },
        );
    }

    /// Live messages.
    pub(crate) fn live(&self) -> usize {
        self.live.len()
    }

    /// Segment files.
    pub(crate) fn segments(&self) -> usize {
        self.segments.len()
    }

    /// How many segments are newer than segment `seq` (all of them, where it is gone).
    pub(crate) fn newer_than(&self, seq: u64) -> usize {
        self.segments.len() - self.segments.partition_point(|e| e.seq <= seq)
    }

    /// The newest segment's number.
    pub(crate) fn last(&self) -> Option<u64> {
        self.segments.back().map(|e| e.seq)
    }

    /// The octets the live messages' records take.
    pub(crate) fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    /// Bytes of all segment files.
    pub(crate) fn bytes(&self) -> u64 {
        self.segments.iter().map(|e| e.bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DeliveryState;

    #[test]
    fn a_drained_queue_gives_its_room_back() {
        let mut ix = Index::default();
        ix.add_segment(1, 10, true);
        for i in 0..100_000 {
            ix.pin(1);
            ix.set_live(format!("m{i}"), 1, 1, Vec::new());
        }
        let largest = ix.live.capacity();
        assert!(largest >= 100_000);
        for i in 10..100_000 {
            assert!(ix.set_final(&format!("m{i}")));
        }
        assert_eq!(ix.live(), 10);
        assert!(
            ix.live.capacity() <= ROOM_KEPT * 4,
            "room for {} kept for 10 messages",
            ix.live.capacity()
        );
        // What is left is still found, and the pins are right.
        for i in 0..10 {
            assert!(ix.is_live(&format!("m{i}")));
            assert!(ix.set_final(&format!("m{i}")));
        }
        assert_eq!(ix.pop_free([Some(2), None]), Some((1, 10)));
    }

    #[test]
    fn segments_go_oldest_first_and_only_unpinned() {
        let mut ix = Index::default();
        for seq in 1..=3 {
            ix.add_segment(seq, 10, true);
        }
        ix.pin(1);
        ix.set_live("a".into(), 1, 0, Vec::new());
        ix.pin(2); // an open draft
        assert_eq!(ix.pop_free([Some(3), None]), None);
        assert!(ix.set_final("a"));
        assert!(!ix.set_final("a"), "only once");
        assert_eq!(ix.pop_free([Some(3), None]), Some((1, 10)));
        assert_eq!(ix.pop_free([Some(3), None]), None, "the open draft pins 2");
        ix.unpin(2);
        assert_eq!(ix.pop_free([Some(3), None]), Some((2, 10)));
        assert_eq!(
            ix.pop_free([Some(3), None]),
            None,
            "the current segment stays"
        );
        assert_eq!((ix.segments(), ix.bytes(), ix.last()), (1, 10, Some(3)));
    }

    #[test]
    fn a_segment_only_abandoned_drafts_wrote_into_goes_whatever_is_older() {
        let mut ix = Index::default();
        for seq in 1..=6 {
            ix.add_segment(seq, 10, seq == 1);
        }
        // 1: from the opening, with a live message; 2, 4: an abandoned draft's (which passed
        // over 3 while it waited); 3: a finished message's; 5: a slow draft's, open; 6: in use.
        ix.pin(1);
        ix.set_live("old".into(), 1, 0, Vec::new());
        ix.pin(2);
        ix.draft_in(2);
        ix.pin(3);
        ix.draft_in(3);
        ix.draft_out(3, true);
        ix.set_live("new".into(), 3, 0, Vec::new());
        ix.draft_in(4);
        ix.pin(5);
        ix.draft_in(5);
        assert_eq!(ix.pop_unused([Some(6), None]), None, "the drafts are open");
        // Abandoned: its START's pin goes, then each segment it wrote into (as
        // `Spool::abort` does).
        ix.unpin(2);
        ix.draft_out(2, false);
        ix.draft_out(4, false);
        assert_eq!(ix.pop_unused([Some(6), None]), Some((2, 10)));
        assert_eq!(ix.pop_unused([Some(6), None]), Some((4, 10)));
        assert_eq!(
            ix.pop_unused([Some(6), None]),
            None,
            "3 kept, 5 open, 1 from the opening"
        );
        // A draft abandoned in the segment in use: it goes once another is in use.
        ix.add_segment(7, 10, false);
        ix.draft_in(7);
        ix.draft_out(7, false);
        assert_eq!(ix.pop_unused([Some(7), None]), None);
        ix.add_segment(8, 10, false);
        // Not while the sync in flight was taken in it; looked for again after.
        assert_eq!(ix.pop_unused([Some(8), Some(7)]), None);
        assert!(ix.would_go(7));
        assert_eq!(ix.pop_unused([Some(8), None]), Some((7, 10)));
        // A status makes a segment matter; a put-back one keeps its place.
        ix.keep(8);
        assert_eq!(ix.pop_unused([None, None]), None);
        ix.put_back(4, 10, false);
        assert_eq!(ix.pop_free([None, None]), None, "1 is pinned");
        assert_eq!(ix.pop_unused([Some(8), None]), Some((4, 10)));
        assert!(ix.set_final("old"));
        assert_eq!(ix.pop_free([Some(8), None]), Some((1, 10)));
        assert_eq!(
            ix.pop_free([Some(8), None]),
            None,
            "3 is pinned by the live message"
        );
    }

    #[test]
    fn only_a_front_kept_by_live_messages_alone_behind_enough_spool_is_copied() {
        let mut ix = Index::default();
        for seq in 1..=2 {
            ix.add_segment(seq, 100, true);
        }
        ix.pin(1);
        ix.set_live("a".into(), 1, 10, Vec::new());
        ix.pin(1);
        ix.set_live("b".into(), 1, 10, Vec::new());
        assert!(
            ix.next_to_copy(Some(2), 30, usize::MAX).is_empty(),
            "two segments"
        );
        ix.add_segment(3, 100, false);
        // 300 bytes of segments against 2 x (20 live + 30).
        assert_eq!(ix.next_to_copy(Some(3), 30, usize::MAX), ["a", "b"]);
        assert!(
            ix.next_to_copy(Some(3), 200, usize::MAX).is_empty(),
            "too little spool behind it"
        );
        // A draft open in the front segment keeps it: nothing is copied.
        ix.pin(1);
        assert!(ix.next_to_copy(Some(3), 30, usize::MAX).is_empty());
        ix.unpin(1);
        // One copy on its way: the others wait for it.
        ix.pin(3);
        assert!(ix.copy_written("a", 3, 10));
        assert!(!ix.copy_written("a", 3, 10), "one at a time");
        assert!(ix.next_to_copy(Some(3), 30, usize::MAX).is_empty());
        ix.copy_over("a", true);
        assert_eq!(ix.next_to_copy(Some(3), 30, usize::MAX), ["b"]);
        // Copied and final: both of b's places are let go, and 1 with them.
        ix.pin(3);
        assert!(ix.copy_written("b", 3, 10));
        assert!(ix.set_final("b"));
        assert_eq!(ix.pop_free([Some(3), None]), Some((1, 100)));
        assert_eq!(ix.pop_free([Some(3), None]), Some((2, 100)));
        assert!(ix.set_final("a"));
        assert_eq!(ix.live_bytes, 0);
        assert_eq!(ix.segments.back().map(|e| e.pins), Some(0));
    }

    #[test]
    fn enough_of_the_oldest_segments_are_emptied_in_one_go_to_bring_the_spool_back() {
        // Ten segments of 100, a live message of 10 starting in 1, 3 and 6, one being
        // written in 8; segments of 100. 1000 >= 2 x (30 + 100): copy until what is left
        // comes to 130 or less, or up to the open draft.
        let mut ix = Index::default();
        for seq in 1..=10 {
            ix.add_segment(seq, 100, true);
        }
        for (id, seq) in [("c", 1), ("d", 3), ("e", 6)] {
            ix.pin(seq);
            ix.set_live(id.into(), seq, 10, Vec::new());
        }
        assert_eq!(ix.next_to_copy(Some(10), 100, usize::MAX), ["c", "d", "e"]);
        // Left from 9 on, 200: more than 130, but 8 holds an open draft.
        ix.pin(8);
        ix.pin(8);
        ix.set_live("f".into(), 8, 10, Vec::new());
        assert_eq!(ix.next_to_copy(Some(10), 100, usize::MAX), ["c", "d", "e"]);
        // A copy on its way in 3 stops the walk there.
        ix.pin(10);
        assert!(ix.copy_written("d", 10, 10));
        assert_eq!(ix.next_to_copy(Some(10), 100, usize::MAX), ["c"]);
        // With less spool behind them, fewer.
        ix.copy_over("d", false);
        assert_eq!(ix.next_to_copy(Some(10), 100, usize::MAX), ["c", "d", "e"]);
        // 1000 >= 2 x (40 + 460), and five segments bring it to 500.
        assert_eq!(ix.next_to_copy(Some(10), 460, usize::MAX), ["c", "d"]);
        assert!(ix.next_to_copy(Some(10), 461, usize::MAX).is_empty());
    }

    #[test]
    fn a_long_list_to_copy_is_handed_out_a_batch_at_a_time_from_one_walk() {
        let mut ix = Index::default();
        for seq in 1..=10 {
            ix.add_segment(seq, 100, true);
        }
        for (id, seq) in [("a", 1), ("b", 1), ("c", 2), ("d", 3), ("e", 3)] {
            ix.pin(seq);
            ix.set_live(id.into(), seq, 10, Vec::new());
        }
        assert_eq!(ix.next_to_copy(Some(10), 100, 2), ["a", "b"]);
        // Not copied yet: the same again.
        assert_eq!(ix.next_to_copy(Some(10), 100, 2), ["a", "b"]);
        for id in ["a", "b"] {
            ix.pin(10);
            assert!(ix.copy_written(id, 10, 10));
            ix.copy_over(id, true);
        }
        // Final meanwhile: skipped.
        assert!(ix.set_final("d"));
        assert_eq!(ix.next_to_copy(Some(10), 100, 2), ["c", "e"]);
        // A copy on its way stops the batch there.
        ix.pin(10);
        assert!(ix.copy_written("e", 10, 10));
        assert_eq!(ix.next_to_copy(Some(10), 100, 5), ["c"]);
        // The walk's result was kept while it holds a batch: a message made live in an old
        // segment since (which a spool never does; here it shows that the list was not made
        // again) is not in it.
        ix.pin(2);
        ix.set_live("late".into(), 2, 10, Vec::new());
        ix.copy_over("e", true);
        assert_eq!(ix.next_to_copy(Some(10), 100, 1), ["c"]);
        // Once all of it is handed out and copied, the next call walks again.
        ix.pin(10);
        assert!(ix.copy_written("c", 10, 10));
        ix.copy_over("c", true);
        assert_eq!(ix.next_to_copy(Some(10), 100, 5), ["late"]);
        // Nothing to copy any more: the list goes.
        assert!(ix.set_final("late"));
        for id in ["a", "b", "c", "e"] {
            assert!(ix.set_final(id));
        }
        assert!(ix.next_to_copy(Some(10), 100, 5).is_empty());
        assert!(ix.plan.is_empty());
    }

    #[test]
    fn one_that_cannot_be_copied_does_not_hide_those_behind_the_walk_s_reach() {
        let mut ix = Index::default();
        for seq in 1..=60 {
            ix.add_segment(seq, 100, true);
        }
        ix.pin(1);
        ix.set_live("stuck".into(), 1, 1, Vec::new());
        for seq in 2..=41 {
            ix.pin(seq);
            ix.set_live(format!("m{seq:02}"), seq, 1, Vec::new());
        }
        // Two a batch: a walk reaches the first 2 x PLAN_BATCHES. All but the first are
        // copied, batch after batch (one a batch, beside it).
        let mut handed = Vec::new();
        for _ in 0..40 {
            let ids = ix.next_to_copy(Some(60), 100, 2);
            assert_eq!(ids.first().map(String::as_str), Some("stuck"));
            for id in &ids[1..] {
                ix.pin(60);
                assert!(ix.copy_written(id, 60, 1));
                ix.copy_over(id, true);
                handed.push(id.clone());
            }
        }
        // Past the first walk's reach too: the plan left with less than a batch is made
        // again, and what lies behind is found.
        assert!(
            handed.contains(&format!("m{:02}", PLAN_BATCHES * 2 + 1)),
            "{handed:?}"
        );
        assert_eq!(handed.len(), 40, "{handed:?}");
    }

    #[test]
    fn a_copy_made_durable_counts_what_the_copy_holds() {
        let mut ix = Index::default();
        for seq in 1..=3 {
            ix.add_segment(seq, 100, true);
        }
        ix.pin(1);
        ix.set_live("a".into(), 1, 10, vec![None, None]);
        let deferred = Status {
            state: DeliveryState::Deferred {
                next_attempt: 1,
                warned: false,
            },
            reply: "451 later".into(),
        };
        ix.set_status("a", 0, &deferred, Some(1), 4);
        assert_eq!(ix.live_bytes, 14);
        // A failed copy changes nothing; a durable one counts the copy's records.
        ix.pin(3);
        assert!(ix.copy_written("a", 3, 30));
        ix.copy_over("a", false);
        assert_eq!(ix.live_bytes, 14);
        ix.pin(3);
        assert!(ix.copy_written("a", 3, 30));
        // An outcome recorded while the copy is on its way is in neither the copy's records
        // nor its count yet: both count it.
        ix.set_status("a", 1, &deferred, Some(2), 5);
        assert_eq!(ix.live_bytes, 19);
        ix.copy_over("a", true);
        assert_eq!(ix.live_bytes, 35);
        // A later outcome of a recipient that has one adds nothing (a copy carries one).
        ix.set_status("a", 1, &deferred, Some(3), 5);
        assert_eq!(ix.live_bytes, 35);
        assert!(ix.set_final("a"));
        assert_eq!(ix.live_bytes, 0);
    }

    #[test]
    fn a_walk_looks_for_a_few_batches_only() {
        let mut ix = Index::default();
        for seq in 1..=40 {
            ix.add_segment(seq, 100, true);
        }
        // 30 segments of two waiting messages each.
        for seq in 1..=30 {
            for k in 0..2 {
                ix.pin(seq);
                ix.set_live(format!("{seq:02}-{k}"), seq, 1, Vec::new());
            }
        }
        assert_eq!(ix.next_to_copy(Some(40), 100, 1), ["01-0"]);
        // One a batch: a walk found the first PLAN_BATCHES, in PLAN_BATCHES / 2 segments.
        assert_eq!(ix.plan.len(), PLAN_BATCHES);
        assert_eq!(ix.plan.back().map(|e| e.0), Some(PLAN_BATCHES as u64 / 2));
    }

    #[test]
    fn what_was_copied_is_not_copied_again_while_an_older_segment_stays() {
        let mut ix = Index::default();
        for seq in 1..=8 {
            ix.add_segment(seq, 100, true);
        }
        for (id, seq) in [("stuck", 1), ("g", 2), ("h", 4)] {
            ix.pin(seq);
            ix.set_live(id.into(), seq, 10, Vec::new());
        }
        assert_eq!(
            ix.next_to_copy(Some(8), 100, usize::MAX),
            ["stuck", "g", "h"]
        );
        // The caller copies g and h, not the first (it cannot): 1 stays, and all behind it.
        for id in ["g", "h"] {
            ix.pin(8);
            assert!(ix.copy_written(id, 8, 10));
            ix.copy_over(id, true);
        }
        assert_eq!(ix.pop_free([Some(8), None]), None);
        ix.add_segment(9, 100, false);
        // g and h, now in 8, are not asked for again while 1 is left.
        assert_eq!(ix.next_to_copy(Some(9), 100, usize::MAX), ["stuck"]);
        // Once it goes, so do the segments before 8, and copying starts afresh from there.
        assert!(ix.set_final("stuck"));
        for seq in 1..=7 {
            assert_eq!(ix.pop_free([Some(9), None]), Some((seq, 100)));
        }
        for seq in 10..=12 {
            ix.add_segment(seq, 100, false);
        }
        assert_eq!(ix.next_to_copy(Some(12), 100, usize::MAX), ["g", "h"]);
    }
}
