//! Queue depth per core and the high/low water marks that stop and restart accepting.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Messages queued, counted per core: each core writes only its own counter, every core may
/// read them all (a handful of relaxed loads).
#[derive(Clone, Debug)]
pub struct Depth {
    counts: Arc<[AtomicU64]>,
}

impl Depth {
    /// Counters for `cores` cores.
    pub fn new(cores: usize) -> Self {
        Self {
            counts: (0..cores.max(1)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Sets core `core`'s count (only that core calls this).
    pub fn set(&self, core: usize, value: u64) {
        if let Some(c) = self.counts.get(core) {
            c.store(value, Ordering::Relaxed);
        }
    }

    /// Core `core`'s count.
    pub fn get(&self, core: usize) -> u64 {
        self.counts
            .get(core)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// The sum over all cores.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// High and low marks with hysteresis: accepting stops when the level reaches `high` and starts
/// again only when it falls to `low`, so it does not flap at the mark.
#[derive(Debug)]
pub struct Watermarks {
    high: u64,
    low: u64,
    full: AtomicBool,
}

impl Watermarks {
    /// Marks at `high` and `low` (`low` is clamped to at most `high`). A `high` of 0 means no
    /// limit.
    pub fn new(high: u64, low: u64) -> Self {
        Self {
            high,
            low: low.min(high),
            full: AtomicBool::new(false),
        }
    }

    /// Takes the current level and says whether new work may be accepted.
    pub fn accepting(&self, level: u64) -> bool {
        if self.high == 0 {
            return true;
        }
        let full = self.full.load(Ordering::Relaxed);
        // At the high mark it is full whatever it was: with the low mark equal to the high
        // one, a level sitting at the mark must not flip at each look.
        let now_full = level >= self.high || (full && level > self.low);
        if now_full != full {
            self.full.store(now_full, Ordering::Relaxed);
        }
        !now_full
    }
}

#[cfg(test)]
mod tests {
    use super::{Depth, Watermarks};

    #[test]
    fn hysteresis_between_the_marks() {
        let w = Watermarks::new(100, 80);
        let levels = [0, 99, 100, 99, 81, 80, 81, 99, 100, 150, 79];
        let got: Vec<bool> = levels.iter().map(|&l| w.accepting(l)).collect();
        assert_eq!(
            got,
            [true, true, false, false, false, true, true, true, false, false, true]
        );
    }

    #[test]
    fn equal_marks_do_not_flap_at_the_mark() {
        let w = Watermarks::new(10, 10);
        let levels = [9, 10, 10, 10, 9, 10];
        let got: Vec<bool> = levels.iter().map(|&l| w.accepting(l)).collect();
        assert_eq!(got, [true, false, false, false, true, false]);
    }

    #[test]
    fn zero_high_mark_never_stops() {
        let w = Watermarks::new(0, 0);
        assert!(w.accepting(u64::MAX));
    }

    #[test]
    fn depth_sums_cores() {
        let d = Depth::new(3);
        d.set(0, 5);
        d.set(2, 7);
        d.set(9, 100);
        assert_eq!(d.total(), 12);
        assert_eq!(d.get(2), 7);
    }
}
