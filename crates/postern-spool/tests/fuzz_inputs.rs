//! The spool's fuzz harnesses (`postern_spool::fuzzing`, run by the targets in `fuzz/`) over
//! their committed seed corpora and over random programs, so that the harnesses and the
//! invariants they check run with every test, not only under cargo-fuzz.

use std::path::Path;

use proptest::prelude::*;

/// Every file in the seed corpus `fuzz/corpus/<target>` through `run`; there must be some.
fn corpus(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("a corpus entry").path();
        run(&std::fs::read(&path).expect("a corpus file"));
        seen += 1;
    }
    assert!(seen > 0, "no seeds in {}", dir.display());
}

#[test]
fn spool_record_seeds() {
    corpus("spool_record", postern_spool::fuzzing::record);
}

#[test]
fn spool_segment_seeds() {
    corpus("spool_segment", postern_spool::fuzzing::segment);
}

/// A whole message over two segments, a status, an aborted draft and a seal: a clean program,
/// so the harness checks the message comes back with its body.
#[test]
fn a_clean_program_gives_its_message_back() {
    let program = [
        7, 0, 0, 0, // salt
        36, 2, 1, // START draft 1, two recipients, whole envelope
        37, 3, b'a', b'b', b'c', // BODY draft 1
        1,    // next segment
        37, 2, b'd', b'e', // BODY draft 1
        38, 1, // END draft 1, right size
        39, 1, 0, 0, // STATUS
        68, 0, 1, // START draft 2, no recipients
        71, 0, // ABORT draft 2
        3, // seal
    ];
    postern_spool::fuzzing::segment(&program);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn random_programs_keep_recovery_s_promises(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        postern_spool::fuzzing::segment(&data);
    }

    #[test]
    fn random_records_decode_without_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        postern_spool::fuzzing::record(&data);
    }
}
