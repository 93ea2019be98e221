//! BDAT: bodies go out with BDAT when the sink offers CHUNKING, with DATA when it does not,
//! and arrive whole and once either way; `--chunk-size` splits them into BDAT chunks when
//! the sender pipelines, and leaves one `BDAT n LAST` when it does not.
#![allow(clippy::unwrap_used)]

mod common;

use common::{check_record, num, record_path, send_json, Sink};

#[test]
fn bdat_bodies_arrive_once() {
    let (_dir, record) = record_path();
    let sink = Sink::start(&["--record", record.to_str().unwrap()]);
    let report = send_json(
        &sink.addr,
        &[
            "--messages",
            "300",
            "--connections",
            "4",
            "--bdat",
            "--pipelining",
            "--size",
            "10k",
            "--chunk-size",
            "4k",
        ],
    );
    let counters = sink.stop();
    assert_eq!(num(&report, "messages_accepted"), 300);
    assert_eq!(counters.get("bdat_bodies_total"), 300);
    assert_eq!(counters.get("data_bodies_total"), 0);
    assert_eq!(counters.get("bytes_total"), 300 * 10 * 1024);
    // 4k + 4k + 2k.
    assert_eq!(counters.get("bdat_chunks_total"), 300 * 3);
    check_record(&record, 0..300);
}

#[test]
fn bdat_bodies_in_chunks_arrive_whole() {
    let (_dir, record) = record_path();
    let sink = Sink::start(&["--record", record.to_str().unwrap()]);
    let report = send_json(
        &sink.addr,
        &[
            "--messages",
            "100",
            "--connections",
            "2",
            "--bdat",
            "--pipelining",
            "--size",
            "20k",
            "--chunk-size",
            "4k",
        ],
    );
    let counters = sink.stop();
    assert_eq!(num(&report, "messages_accepted"), 100);
    assert_eq!(counters.get("bdat_bodies_total"), 100);
    assert_eq!(counters.get("bdat_chunks_total"), 100 * 5);
    assert_eq!(counters.get("bytes_total"), 100 * 20 * 1024);
    assert_eq!(counters.get("bytes_received_total"), 100 * 20 * 1024);
    check_record(&record, 0..100);
}

#[test]
fn bdat_without_pipelining() {
    let sink = Sink::start(&[]);
    let report = send_json(
        &sink.addr,
        &[
            "--messages",
            "50",
            "--bdat",
            "--size",
            "20k",
            "--chunk-size",
            "4k",
        ],
    );
    let counters = sink.stop();
    assert_eq!(num(&report, "messages_accepted"), 50);
    assert_eq!(counters.get("bdat_bodies_total"), 50);
    // Without pipelining each body goes as one BDAT LAST, written 4k at a time.
    assert_eq!(counters.get("bdat_chunks_total"), 50);
    assert_eq!(counters.get("bytes_total"), 50 * 20 * 1024);
    assert_eq!(counters.get("pipelined_transactions_total"), 0);
}

#[test]
fn a_sink_without_chunking_gets_data() {
    let sink = Sink::start(&["--no-chunking"]);
    let report = send_json(&sink.addr, &["--messages", "50", "--bdat", "--pipelining"]);
    let counters = sink.stop();
    assert_eq!(num(&report, "messages_accepted"), 50);
    assert_eq!(counters.get("bdat_bodies_total"), 0);
    assert_eq!(counters.get("data_bodies_total"), 50);
}

/// A body that `--chunk-size` would cut into more chunks than one message may have replies
/// awaited (all its chunks go out before their replies are read) is cut into fewer, larger
/// ones: 4 MiB in chunks of 64 octets would await 65,536 replies, over a megabyte of them,
/// which a server that stops reading while its own writes wait (as a relay may) would leave
/// the sender and itself waiting on each other.
#[test]
fn a_body_is_never_cut_into_more_chunks_than_replies_a_message_may_await() {
    let sink = Sink::start(&[]);
    let report = send_json(
        &sink.addr,
        &[
            "--messages",
            "2",
            "--connections",
            "1",
            "--bdat",
            "--pipelining",
            "--size",
            "4m",
            "--chunk-size",
            "64",
        ],
    );
    let counters = sink.stop();
    assert_eq!(num(&report, "messages_accepted"), 2, "{report}");
    assert_eq!(counters.get("bdat_bodies_total"), 2);
    let chunks = counters.get("bdat_chunks_total");
    // At most 4096 replies awaited per message, MAIL and RCPT among them.
    assert!((2 * 1024..=2 * 4094).contains(&chunks), "{chunks} chunks");
}
