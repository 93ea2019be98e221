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

/// `micros` since the epoch (11 digits, good to the year 3084), the core (2 digits) and a
/// per-spool counter (4 digits): 17 characters, sortable by time within a core.
pub(crate) fn make(micros: u64, core: u32, counter: u64) -> String {
    let mut s = String::with_capacity(17);
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
}
