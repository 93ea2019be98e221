//! The reclaim index of one core: its segments, oldest first, each with the number of messages
//! pinning it (open or live messages whose `START` it holds), and which segment each live
//! message pins. Segments are released strictly from the oldest (docs/durability.md).

use std::collections::{HashMap, VecDeque};

/// One segment file of the core.
#[derive(Debug)]
struct Entry {
    seq: u64,
    pins: usize,
    bytes: u64,
}

/// The index.
#[derive(Debug, Default)]
pub(crate) struct Index {
    segments: VecDeque<Entry>,
    /// Live (finished, not final) messages by queue ID, with the segment they pin.
    live: HashMap<String, u64>,
}

impl Index {
    /// Adds a segment file (newer than all the others).
    pub(crate) fn add_segment(&mut self, seq: u64, bytes: u64) {
        debug_assert!(self.segments.back().is_none_or(|e| e.seq < seq));
        self.segments.push_back(Entry {
            seq,
            pins: 0,
            bytes,
        });
    }

    fn entry(&mut self, seq: u64) -> Option<&mut Entry> {
        // Segments are sorted: a binary search by number.
        let i = self.segments.binary_search_by_key(&seq, |e| e.seq).ok()?;
        self.segments.get_mut(i)
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

    /// Puts back a segment `pop_free` returned (its deletion failed).
    pub(crate) fn push_front(&mut self, seq: u64, bytes: u64) {
        self.segments.push_front(Entry {
            seq,
            pins: 0,
            bytes,
        });
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
            ix.add_segment(seq, 10);
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
}
