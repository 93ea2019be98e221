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
    /// Open drafts whose records (from their `START` to their latest) span this segment.
    drafts: usize,
    /// Whether it may hold a record that matters once its draft is over: a finished
    /// message's, a status, or anything of a segment this run did not make.
    kept: bool,
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
        });
    }

    fn entry(&mut self, seq: u64) -> Option<&mut Entry> {
        // Segments are sorted: a binary search by number.
        let i = self.segments.binary_search_by_key(&seq, |e| e.seq).ok()?;
        self.segments.get_mut(i)
    }

    /// The segments numbered `from..=to`, as the index has them.
    fn range(&mut self, from: u64, to: u64) -> impl Iterator<Item = &mut Entry> {
        let start = self.segments.partition_point(|e| e.seq < from);
        self.segments
            .range_mut(start..)
            .take_while(move |e| e.seq <= to)
    }

    /// An open draft's records now reach `to` from `from` (both its segments): each segment
    /// in between is counted for it, those it skipped too.
    pub(crate) fn draft_spans(&mut self, from: u64, to: u64) {
        for e in self.range(from, to) {
            e.drafts += 1;
        }
    }

    /// A draft whose records span `from..=to` is over: finished (`kept`: its records matter
    /// from now on), or abandoned (they never will).
    pub(crate) fn draft_over(&mut self, from: u64, to: u64, kept: bool) {
        for e in self.range(from, to) {
            e.drafts = e.drafts.saturating_sub(1);
            e.kept |= kept;
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
        let found = self
            .segments
            .iter()
            .position(|e| !e.kept && e.pins == 0 && e.drafts == 0 && Some(e.seq) != current);
        let Some(i) = found else {
            // The segment in use is looked at again once an abandoned draft has left it.
            self.maybe_unused = false;
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
        // 1: from the opening, with a live message; 2..=4: an abandoned draft's, which
        // started in 2 and skipped 3; 5: a finished message's; 6: in use.
        ix.pin(1);
        ix.set_live("old".into(), 1);
        ix.pin(2);
        ix.draft_spans(2, 2);
        ix.draft_spans(3, 4);
        ix.pin(5);
        ix.draft_spans(5, 5);
        assert_eq!(ix.pop_unused(Some(6)), None, "both drafts are open");
        ix.draft_over(5, 5, true);
        ix.set_live("new".into(), 5);
        // Abandoned: its START's pin goes, then its span (as `Spool::abort` does).
        ix.unpin(2);
        ix.draft_over(2, 4, false);
        assert_eq!(ix.pop_unused(Some(6)), Some((2, 10)));
        assert_eq!(ix.pop_unused(Some(6)), Some((3, 10)));
        assert_eq!(ix.pop_unused(Some(6)), Some((4, 10)));
        assert_eq!(
            ix.pop_unused(Some(6)),
            None,
            "5 is kept, 6 in use, 1 from the opening"
        );
        // A status makes a segment matter; a put-back one keeps its place.
        ix.add_segment(7, 10, false);
        ix.keep(7);
        assert_eq!(ix.pop_unused(Some(6)), None);
        ix.put_back(3, 10, false);
        assert_eq!(ix.pop_free(None), None, "1 is pinned");
        assert_eq!(ix.pop_unused(Some(6)), Some((3, 10)));
        assert!(ix.set_final("old"));
        assert_eq!(ix.pop_free(Some(7)), Some((1, 10)));
        assert_eq!(
            ix.pop_free(Some(7)),
            None,
            "5 is pinned by the live message"
        );
    }
}
