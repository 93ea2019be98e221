//! The reclaim index of one core: its segments, oldest first, each with the number of messages
//! pinning it (open or live messages whose `START` it holds), and which segment each live
//! message pins. Segments are released from the oldest (docs/durability.md); the one
//! exception is a segment that only ever held records of messages abandoned before their end
//! (a body refused as too large, a client gone mid-body), which goes as soon as none of them
//! is open, whatever is older.

use std::collections::{HashMap, VecDeque};

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

/// The index.
#[derive(Debug, Default)]
pub(crate) struct Index {
    segments: VecDeque<Entry>,
    /// Live (finished, not final) messages by queue ID, with the segment they pin.
    live: HashMap<String, u64>,
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

    /// A finished message keeps its pin until it is final.
    pub(crate) fn set_live(&mut self, queue_id: String, seq: u64) {
        self.live.insert(queue_id, seq);
    }

    /// Whether a finished message is live here (not yet final).
    pub(crate) fn is_live(&self, queue_id: &str) -> bool {
        self.live.contains_key(queue_id)
    }

    /// A live message became final: releases its pin. False when it was not live here.
    pub(crate) fn set_final(&mut self, queue_id: &str) -> bool {
        match self.live.remove(queue_id) {
            Some(seq) => {
                self.unpin(seq);
                true
            }
            None => false,
        }
    }

    /// The oldest segment, when nothing pins it and it is not `current`: removed from the
    /// index, for the caller to delete.
    pub(crate) fn pop_free(&mut self, current: Option<u64>) -> Option<(u64, u64)> {
        let front = self.segments.front()?;
        if front.pins > 0 || Some(front.seq) == current {
            return None;
        }
        self.segments.pop_front().map(|e| (e.seq, e.bytes))
    }

    /// A segment, other than `current`, that only abandoned drafts wrote into and none of
    /// them is open: removed from the index, for the caller to delete, whatever is older. Its
    /// records matter to no recovery: a draft without its `END` is never delivered, and one
    /// whose `START` or `ABORT` it held leaves the others' records without a message.
    pub(crate) fn pop_unused(&mut self, current: Option<u64>) -> Option<(u64, u64)> {
        if !self.maybe_unused {
            return None;
        }
        let found = self.segments.iter().position(|e| {
            e.abandoned && !e.kept && e.pins == 0 && e.drafts == 0 && Some(e.seq) != current
        });
        let Some(i) = found else {
            // Looked for again once another draft is abandoned, or now and then while the
            // segment in use would be taken but for being in use (an abandoned draft wrote
            // into it, nothing else that matters): once another is in use, it goes.
            self.maybe_unused = current
                .and_then(|c| self.entry(c))
                .is_some_and(|e| e.abandoned && !e.kept && e.pins == 0 && e.drafts == 0);
            return None;
        };
        self.segments.remove(i).map(|e| (e.seq, e.bytes))
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

    /// The newest segment's number.
    pub(crate) fn last(&self) -> Option<u64> {
        self.segments.back().map(|e| e.seq)
    }

    /// Bytes of all segment files.
    pub(crate) fn bytes(&self) -> u64 {
        self.segments.iter().map(|e| e.bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_go_oldest_first_and_only_unpinned() {
        let mut ix = Index::default();
        for seq in 1..=3 {
            ix.add_segment(seq, 10, true);
        }
        ix.pin(1);
        ix.set_live("a".into(), 1);
        ix.pin(2); // an open draft
        assert_eq!(ix.pop_free(Some(3)), None);
        assert!(ix.set_final("a"));
        assert!(!ix.set_final("a"), "only once");
        assert_eq!(ix.pop_free(Some(3)), Some((1, 10)));
        assert_eq!(ix.pop_free(Some(3)), None, "the open draft pins 2");
        ix.unpin(2);
        assert_eq!(ix.pop_free(Some(3)), Some((2, 10)));
        assert_eq!(ix.pop_free(Some(3)), None, "the current segment stays");
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
        ix.set_live("old".into(), 1);
        ix.pin(2);
        ix.draft_in(2);
        ix.pin(3);
        ix.draft_in(3);
        ix.draft_out(3, true);
        ix.set_live("new".into(), 3);
        ix.draft_in(4);
        ix.pin(5);
        ix.draft_in(5);
        assert_eq!(ix.pop_unused(Some(6)), None, "the drafts are open");
        // Abandoned: its START's pin goes, then each segment it wrote into (as
        // `Spool::abort` does).
        ix.unpin(2);
        ix.draft_out(2, false);
        ix.draft_out(4, false);
        assert_eq!(ix.pop_unused(Some(6)), Some((2, 10)));
        assert_eq!(ix.pop_unused(Some(6)), Some((4, 10)));
        assert_eq!(
            ix.pop_unused(Some(6)),
            None,
            "3 kept, 5 open, 1 from the opening"
        );
        // A draft abandoned in the segment in use: it goes once another is in use.
        ix.add_segment(7, 10, false);
        ix.draft_in(7);
        ix.draft_out(7, false);
        assert_eq!(ix.pop_unused(Some(7)), None);
        ix.add_segment(8, 10, false);
        assert_eq!(ix.pop_unused(Some(8)), Some((7, 10)));
        // A status makes a segment matter; a put-back one keeps its place.
        ix.keep(8);
        assert_eq!(ix.pop_unused(None), None);
        ix.put_back(4, 10, false);
        assert_eq!(ix.pop_free(None), None, "1 is pinned");
        assert_eq!(ix.pop_unused(Some(8)), Some((4, 10)));
        assert!(ix.set_final("old"));
        assert_eq!(ix.pop_free(Some(8)), Some((1, 10)));
        assert_eq!(
            ix.pop_free(Some(8)),
            None,
            "3 is pinned by the live message"
        );
    }
}
