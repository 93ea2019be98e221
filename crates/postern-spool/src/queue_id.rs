//! Queue IDs: short, printable, unique across cores and restarts (time, core, counter).

/// Digits and consonants, no vowels (no words by accident) and no look-alikes.
const ALPHABET: &[u8; 32] = b"0123456789BCDFGHJKLMNPQRSTVWXYZb";

fn push(out: &mut String, mut v: u64, digits: usize) {
    let mut buf = [0u8; 13];
    for d in buf[..digits].iter_mut().rev() {
        *d = ALPHABET[(v & 31) as usize];
        v >>= 5;
    }
    out.extend(buf[..digits].iter().map(|&b| b as char));
}

fn digit(c: u8) -> Option<u64> {
    ALPHABET.iter().position(|&a| a == c).map(|v| v as u64)
}

fn read(s: &[u8]) -> Option<u64> {
    s.iter()
        .try_fold(0u64, |acc, &c| Some((acc << 5) | digit(c)?))
}

/// The time part of a queue ID made by [`make`].
pub(crate) fn micros_of(id: &str) -> Option<u64> {
    (id.len() == 17).then(|| read(&id.as_bytes()[..11]))?
}

/// The core that owns the message with queue ID `id` (the core whose spool wrote it), or
/// `None` when `id` is not a queue ID made by this spool.
pub fn owner_core(id: &str) -> Option<u32> {
    let core = (id.len() == 17).then(|| read(&id.as_bytes()[11..13]))??;
    u32::try_from(core).ok()
}

/// Whether `id` is written as a queue ID is (17 characters of its alphabet), whether or not
/// any message has it.
pub fn is_queue_id(id: &str) -> bool {
    id.len() == 17 && id.bytes().all(|c| digit(c).is_some())
}

/// Whether `c` is one of the characters a queue ID is written in.
pub fn is_queue_id_char(c: char) -> bool {
    u8::try_from(c).is_ok_and(|b| digit(b).is_some())
}

/// The most cores whose queue IDs differ: an ID holds the core in 2 digits of base 32.
pub const MAX_CORES: usize = 32 * 32;

/// How many counter values an ID holds (4 digits): it starts over after this many.
const COUNTER_SPAN: u64 = 1 << 20;

/// The time part for the ID with `counter`, the clock reading `now`, when no ID may have a time
/// below `floor` (the last one issued, or past the newest found at open). Never below the
/// floor, so a clock set back (or behind the newest ID in the spool) cannot go back over IDs
/// already issued; and moved one microsecond on where the counter starts over, so that IDs
/// that share a time (a clock held behind the floor, over a million messages) still differ.
/// Issued with a counter that goes up by one, the IDs of a core only ever go up.
pub(crate) fn time_for(now: u64, floor: u64, counter: u64) -> u64 {
    let micros = now.max(floor);
    if micros == floor && counter % COUNTER_SPAN == 0 {
        micros + 1
    } else {
        micros
    }
}

/// `micros` since the epoch (11 digits, good to the year 3084), the core (2 digits) and a
/// per-spool counter (4 digits, which starts over after 2^20 IDs): 17 characters, sortable
/// by time within a core.
/// Characters in a queue ID.
pub(crate) const LEN: usize = 17;

pub(crate) fn make(micros: u64, core: u32, counter: u64) -> String {
    let mut s = String::with_capacity(LEN);
    push(&mut s, micros, 11);
    push(&mut s, u64::from(core), 2);
    push(&mut s, counter, 4);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_printable_distinct_and_fixed_length() {
        let a = make(1_795_346_220_000_000, 0, 1);
        let b = make(1_795_346_220_000_000, 0, 2);
        let c = make(1_795_346_220_000_000, 1, 1);
        assert_eq!(a.len(), 17);
        assert!(a.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert!(a != b && a != c && b != c);
        assert!(make(1, 0, 0) < make(2, 0, 0));
        assert_eq!(micros_of(&c), Some(1_795_346_220_000_000));
        assert_eq!(owner_core(&c), Some(1));
        assert_eq!(owner_core(&make(5, 1023, 9)), Some(1023));
        assert_eq!(owner_core("NOT-AN-ID"), None);
    }

    /// IDs issued as the spool issues them, from `counter` on, with the clock at `clock(i)`.
    fn issue(mut floor: u64, mut counter: u64, n: u64, clock: impl Fn(u64) -> u64) -> bool {
        let mut last = String::new();
        for i in 0..n {
            counter += 1;
            floor = time_for(clock(i), floor, counter);
            let id = make(floor, 3, counter);
            if id <= last {
                return false;
            }
            last = id;
        }
        true
    }

    #[test]
    fn ids_stay_distinct_with_the_clock_behind_the_floor_past_the_counter_s_span() {
        let ahead = 1_796_000_000_000_000;
        // The clock ten days behind the newest ID at open, for more IDs than the counter holds.
        assert!(issue(ahead, 0, 2 * COUNTER_SPAN + 10, |_| ahead - 864_000_000_000));
        // A clock that stands still, from a counter just short of its end.
        assert!(issue(0, COUNTER_SPAN - 5, 20, |_| 1000));
        // A clock set back in the middle of a run.
        assert!(issue(0, 0, 1000, |i| if i < 500 { 5000 + i } else { 100 }));
    }
}
