//! A size mix: each size in its exact share, every byte counted the same on both sides.
#![allow(clippy::unwrap_used)]

mod common;

use common::{check_record, num, record_path, send_json, Sink};

#[test]
fn sizes_come_in_their_shares_and_bytes_agree() {
    let (_dir, record) = record_path();
    let sink = Sink::start(&["--record", record.to_str().unwrap()]);
    let report = send_json(
        &sink.addr,
        &[
            "--messages",
            "200",
            "--connections",
            "4",
            "--pipelining",
            "--size",
            "1k:70,10k:25,100k:5",
        ],
    );
    let counters = sink.stop();
    // 200 messages: two full cycles of the 100-slot mix, so the shares are exact.
    let expected = 2 * (70 * 1024 + 25 * 10 * 1024 + 5 * 100 * 1024);
    assert_eq!(num(&report, "messages_accepted"), 200);
    assert_eq!(num(&report, "bytes_accepted"), expected);
    assert_eq!(counters.get("bytes_total"), expected);
    assert_eq!(counters.get("bytes_received_total"), expected);
    check_record(&record, 0..200);
}
