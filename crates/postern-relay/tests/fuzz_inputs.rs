//! The relay's fuzz harness (`postern_relay::fuzzing`, run by the `report` and `fit_text`
//! targets in `fuzz/`) over its committed seed corpora and over random inputs, so that the
//! harness and the invariants it checks run with every test, not only under cargo-fuzz.

use std::path::Path;

use proptest::prelude::*;

/// Runs `check` over every seed of the target's committed corpus.
fn over_seeds(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("a corpus entry").path();
        check(&std::fs::read(&path).expect("a corpus file"));
        seen += 1;
    }
    assert!(seen > 0, "no seeds in {}", dir.display());
}

#[test]
fn report_seeds() {
    over_seeds("report", postern_relay::fuzzing::report);
}

#[test]
fn fit_text_seeds() {
    over_seeds("fit_text", postern_relay::fuzzing::fit_text);
}

/// Settings, then fields separated by 0xFF, then the original message.
fn input(settings: [u8; 3], fields: &[&[u8]], original: &[u8]) -> Vec<u8> {
    let mut data = settings.to_vec();
    for field in fields {
        data.extend_from_slice(field);
        data.push(0xff);
    }
    data.extend_from_slice(original);
    data
}

const FIELDS: [&[u8]; 9] = [
    b"mx.example",
    b"1M1XDX3R6CW000001",
    b"env-1",
    b"sender@origin.example",
    b"client.example",
    b"rcpt@dest.example",
    b"rfc822;rcpt@dest.example",
    b"mx.dest.example",
    b"550 5.1.1 <rcpt@dest.example>: no such user",
];

/// A failure report returning a whole 8-bit message, and a headers-only one.
#[test]
fn a_whole_eight_bit_message_comes_back_and_goes_to_headers_only() {
    let original = "Subject: caf\u{e9}\r\nFrom: a@origin.example\r\n\r\nna\u{ef}ve body\r\n";
    postern_relay::fuzzing::report(&input([0xe1, 255, 1], &FIELDS, original.as_bytes()));
    postern_relay::fuzzing::report(&input([0xe0, 255, 0], &FIELDS, original.as_bytes()));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Messages made of the octets that matter to fitting: blanks, line ends, NUL, a
    /// character of several octets, in runs long enough to make lines over 998 octets.
    #[test]
    fn random_messages_fit_text(
        runs in proptest::collection::vec(
            (proptest::sample::select(vec![
                &b"a"[..], b" ", b"\t", b"\r\n", b"\r", b"\n", b"\0", "\u{20ac}".as_bytes(), b":",
            ]), 1usize..1200),
            0..8,
        ),
    ) {
        let data: Vec<u8> = runs.iter().flat_map(|(piece, n)| piece.repeat(*n)).collect();
        postern_relay::fuzzing::fit_text(&data);
    }

    #[test]
    fn random_reports_stay_mail(data in proptest::collection::vec(any::<u8>(), 0..1200)) {
        postern_relay::fuzzing::report(&data);
    }

    /// Originals made of the octets that matter to the checks: line ends, NUL, 8-bit,
    /// blanks and field syntax, with long runs of letters for long lines.
    #[test]
    fn messages_of_awkward_octets_stay_mail(
        flags in any::<u8>(),
        parts in proptest::collection::vec(
            prop_oneof![
                Just(b"\r\n".to_vec()), Just(b"\n".to_vec()), Just(b"\r".to_vec()),
                Just(vec![0u8]), Just(vec![0xc3, 0xa9]), Just(vec![0xe9]), Just(b" ".to_vec()),
                Just(b"\t".to_vec()), Just(b"Subject: ".to_vec()), Just(b"X: a\r\n\r\n".to_vec()),
                (1usize..1200).prop_map(|n| vec![b'x'; n]),
            ],
            0..24,
        ),
    ) {
        let original = parts.concat();
        postern_relay::fuzzing::report(&input([flags | 1, 255, 1], &FIELDS, &original));
        postern_relay::fuzzing::report(&input([flags & !1, 255, 2], &FIELDS, &original));
    }
}
