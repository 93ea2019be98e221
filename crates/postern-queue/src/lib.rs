//! postern-queue: the parts of the delivery queue that know nothing of I/O, sockets or the
//! runtime. Each core owns one shard of the queue; a shard owns the next hops whose name
//! hashes to it ([`shard_of`]), so every connection to one next hop is pooled on one core.
//!
//! - [`Mailboxes`]: one lock-free inbox per core (crossbeam `SegQueue`), through which cores
//!   hand deliveries and outcomes to each other, with a lock-free wake-up (`AtomicWaker`) that
//!   works across threads.
//! - [`Schedule`]: a passive retry schedule. It never sleeps; it answers what is due at a
//!   given time and when the next deadline is, and the embedding sleeps until then.
//! - [`RetryPolicy`]: exponential back-off between a first and a largest delay, bounded by the
//!   queue lifetime, after which a message expires.
//! - [`Watermarks`] and [`Depth`]: queue depth counted per core, read by every core, and the
//!   high/low marks with hysteresis that turn accepting off and on again.
//!
//! Times are milliseconds since the Unix epoch, passed in by the caller: nothing here reads a
//! clock.

mod depth;
mod handoff;
mod retry;
mod schedule;

pub use depth::{Depth, Watermarks};
pub use handoff::{Inbox, Mailboxes};
pub use retry::{RetryDecision, RetryPolicy};
pub use schedule::Schedule;

/// The shard (core) that owns next hop `destination` among `shards`: a stable hash (FNV-1a of
/// the lower-case name), the same in every process, so a restart keeps the same placement.
pub fn shard_of(destination: &str, shards: usize) -> usize {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = destination
        .bytes()
        .map(|b| b.to_ascii_lowercase())
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    if shards <= 1 {
        return 0;
    }
    // Lemire's multiply-shift keeps the high bits, which FNV mixes best.
    ((u128::from(hash) * shards as u128) >> 64) as usize
}

#[cfg(test)]
mod tests {
    use super::shard_of;

    #[test]
    fn shard_is_stable_case_blind_and_in_range() {
        for shards in 1..=16 {
            for name in ["example.com", "mx.example.org:25", "a", ""] {
                let s = shard_of(name, shards);
                assert!(s < shards);
                assert_eq!(s, shard_of(&name.to_ascii_uppercase(), shards));
            }
        }
    }

    #[test]
    fn shards_spread_destinations() {
        let shards = 8;
        let mut counts = [0usize; 8];
        for i in 0..8000 {
            counts[shard_of(&format!("domain{i}.example"), shards)] += 1;
        }
        // A fair hash puts about 1000 in each; allow wide slack, but not an empty shard.
        for c in counts {
            assert!((700..1300).contains(&c), "{counts:?}");
        }
    }
}
