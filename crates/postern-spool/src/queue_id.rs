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
    }
}
