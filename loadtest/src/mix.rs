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
    /// A mix from `(item, weight)` pairs; weights of zero are left out by the caller. Only
    /// the ratios count: `1:1` and `2147483648:2147483648` are the same mix, whose cycle is
    /// two picks long.
    pub fn new(pairs: Vec<(T, u32)>) -> Self {
        let common = pairs
            .iter()
            .fold(0u64, |g, (_, w)| gcd(g, u64::from(*w)))
            .max(1);
        let mut ends = Vec::with_capacity(pairs.len());
        let mut items = Vec::with_capacity(pairs.len());
        let mut total = 0u64;
        for (item, w) in pairs {
            total += u64::from(w) / common;
            ends.push(total);
            items.push(item);
        }
        let total = total.max(1);
        // A stride coprime with the total visits every slot once per cycle; near the total
        // times the golden ratio, consecutive picks land far apart, so each item's share is
        // spread over the cycle rather than given in a run.
        let golden = ((total as f64) * 0.618_033_988_75).round() as u64;
        // Bounded: among any `total` consecutive numbers one is coprime with it (1 is).
        let stride = (golden.max(1)..golden.max(1) + total)
            .find(|s| gcd(*s, total) == 1)
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
        // In u128: the product of two values below the total (up to 2^64) would wrap in u64,
        // and the picks would stop being a permutation of the cycle.
        let slot =
            (u128::from(n % self.total) * u128::from(self.stride) % u128::from(self.total)) as u64;
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
    fn equal_weights_alternate_whatever_their_size() {
        for w in [1, 10, 2_147_483_648] {
            let mix = Mix::new(vec![("a", w), ("b", w)]);
            let picks: Vec<&str> = (0..6).map(|n| *mix.pick(n)).collect();
            let a = picks.iter().filter(|p| **p == "a").count();
            assert_eq!(a, 3, "weight {w}: {picks:?}");
            assert!(
                picks.windows(2).all(|p| p[0] != p[1]),
                "weight {w}: {picks:?}"
            );
        }
    }

    /// Weights whose total passes 2^32: late in a cycle `n * stride` passes 2^64, and each
    /// pick must still be the item of slot `n * stride mod total` (it wrapped, and the
    /// picks stopped being a permutation of the cycle).
    #[test]
    fn huge_weights_still_pick_by_the_cycle() {
        let mix = Mix::new(vec![(0u8, 4_294_967_295), (1u8, 4_294_967_294)]);
        let total = mix.total;
        assert!(total > 1 << 32 && mix.stride > 1 << 32);
        for n in total - 1000..total {
            let slot = (u128::from(n) * u128::from(mix.stride) % u128::from(total)) as u64;
            let item = u8::from(slot >= mix.ends[0]);
            assert_eq!(*mix.pick(n), item, "n {n}, slot {slot}");
        }
    }

    #[test]
    fn no_long_runs_in_an_uneven_mix() {
        let mix = Mix::new(vec![("a", 10), ("b", 11)]);
        let picks: Vec<&str> = (0..21).map(|n| *mix.pick(n)).collect();
        let longest = picks
            .chunk_by(|x, y| x == y)
            .map(<[&str]>::len)
            .max()
            .unwrap_or(0);
        assert!(longest <= 3, "{picks:?}");
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
