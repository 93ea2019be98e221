//! A weighted choice that is exact and repeatable: item `n` of a sequence is picked by a
//! fixed permutation of the weight slots, so every run with the same flags sends the same
//! sizes (and a sink injects the same faults) in the same proportions, spread out rather than
//! in runs, without a random number generator.

/// Items with whole-number weights.
#[derive(Clone, Debug)]
pub struct Mix<T> {
    /// Cumulative weight at the end of each item.
    ends: Vec<u64>,
    items: Vec<T>,
    total: u64,
    stride: u64,
}

impl<T: Clone> Mix<T> {
    /// A mix from `(item, weight)` pairs; weights of zero are left out by the caller.
    pub fn new(pairs: Vec<(T, u32)>) -> Self {
        let mut ends = Vec::with_capacity(pairs.len());
        let mut items = Vec::with_capacity(pairs.len());
        let mut total = 0u64;
        for (item, w) in pairs {
            total += u64::from(w);
            ends.push(total);
            items.push(item);
        }
        let total = total.max(1);
        // A stride coprime with the total visits every slot once per cycle, spread out.
        let stride = [7919u64, 104_729, 1_299_709, 1]
            .into_iter()
            .find(|p| gcd(*p, total) == 1)
            .unwrap_or(1);
        Self {
            ends,
            items,
            total,
            stride,
        }
    }

    /// One item with weight 1.
    pub fn single(item: T) -> Self {
        Self::new(vec![(item, 1)])
    }

    /// The item for position `n` of the sequence.
    pub fn pick(&self, n: u64) -> &T {
        let slot = (n % self.total).wrapping_mul(self.stride) % self.total;
        let i = self.ends.partition_point(|&end| end <= slot);
        &self.items[i.min(self.items.len() - 1)]
    }

    /// Every item, in the order given.
    pub fn items(&self) -> &[T] {
        &self.items
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proportions_are_exact_per_cycle() {
        let mix = Mix::new(vec![("a", 70), ("b", 25), ("c", 5)]);
        let mut counts = [0; 3];
        for n in 0..1000 {
            match *mix.pick(n) {
                "a" => counts[0] += 1,
                "b" => counts[1] += 1,
                _ => counts[2] += 1,
            }
        }
        assert_eq!(counts, [700, 250, 50]);
    }

    #[test]
    fn picks_are_spread_out() {
        let mix = Mix::new(vec![(250, 98), (451, 1), (550, 1)]);
        let odd: Vec<u64> = (0..100).filter(|&n| *mix.pick(n) != 250).collect();
        assert_eq!(odd.len(), 2);
        assert!(
            odd[1] - odd[0] > 1,
            "faults come apart, not in a run: {odd:?}"
        );
        assert!(
            odd[0] < 90,
            "faults do not wait for the end of the cycle: {odd:?}"
        );
    }
}
