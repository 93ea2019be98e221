//! A passive schedule of deadlines: items wait in deadline order; the owner asks what is due
//! and when the next deadline is, and sleeps (or not) itself.

use std::collections::BTreeMap;

/// Items keyed by deadline (milliseconds since the epoch), first in first out among equal
/// deadlines.
#[derive(Debug)]
pub struct Schedule<T> {
    entries: BTreeMap<(u64, u64), T>,
    seq: u64,
}

impl<T> Default for Schedule<T> {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
            seq: 0,
        }
    }
}

impl<T> Schedule<T> {
    /// An empty schedule.
    pub fn new() -> Self {
        Self::default()
    }

    /// Schedules `item` for `at`.
    pub fn insert(&mut self, at: u64, item: T) {
        self.entries.insert((at, self.seq), item);
        self.seq += 1;
    }

    /// The earliest deadline, if anything waits.
    pub fn next_deadline(&self) -> Option<u64> {
        self.entries.keys().next().map(|&(at, _)| at)
    }

    /// Takes the earliest item whose deadline is at or before `now`.
    pub fn pop_due(&mut self, now: u64) -> Option<T> {
        let entry = self.entries.first_entry()?;
        if entry.key().0 > now {
            return None;
        }
        Some(entry.remove())
    }

    /// Takes every item, due or not (to retry everything at once, or at shutdown).
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        std::mem::take(&mut self.entries).into_values()
    }

    /// Keeps only the items for which `keep` holds (to drop those that lost their reason to
    /// wait), returning how many were dropped.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, item| keep(item));
        before - self.entries.len()
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::Schedule;
    use proptest::prelude::*;

    proptest! {
        /// Against a model: a sorted list. Items come out in deadline order, ties in insertion
        /// order, and never before their deadline.
        #[test]
        fn pops_in_deadline_order_never_early(
            ops in proptest::collection::vec((0u64..1000, any::<bool>()), 1..200)
        ) {
            let mut s = Schedule::new();
            let mut model: Vec<(u64, usize)> = Vec::new();
            let mut now = 0;
            for (i, (t, advance)) in ops.into_iter().enumerate() {
                if advance {
                    now += t / 4;
                    while let Some(item) = s.pop_due(now) {
                        let pos = model
                            .iter()
                            .enumerate()
                            .min_by_key(|(_, (at, seq))| (*at, *seq))
                            .map(|(p, _)| p);
                        let (at, seq) = model.remove(pos.expect("model has it"));
                        prop_assert!(at <= now);
                        prop_assert_eq!(item, seq);
                    }
                    prop_assert!(model.iter().all(|(at, _)| *at > now));
                    prop_assert_eq!(s.next_deadline(), model.iter().map(|(at, _)| *at).min());
                } else {
                    s.insert(now + t, i);
                    model.push((now + t, i));
                }
                prop_assert_eq!(s.len(), model.len());
            }
        }
    }
    #[test]
    fn retain_drops_what_fails_and_keeps_the_order_of_the_rest() {
        let mut s = Schedule::new();
        for (at, item) in [(30, 1), (10, 2), (20, 3), (10, 4)] {
            s.insert(at, item);
        }
        assert_eq!(s.retain(|&item| item != 2 && item != 3), 2);
        assert_eq!(s.len(), 2);
        assert_eq!(s.next_deadline(), Some(10));
        assert_eq!(s.pop_due(100), Some(4));
        assert_eq!(s.pop_due(100), Some(1));
        assert!(s.is_empty());
    }
}
