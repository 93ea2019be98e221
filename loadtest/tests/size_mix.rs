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

#[test]
fn messages_over_the_servers_size_are_failures_of_their_own_not_transactions() {
    // The sink takes 2 KiB: the 4 KiB half of the mix is refused here, before MAIL, by the
    // SIZE the sink offered. No command went out and no reply came: no 552 in the replies,
    // no transaction in the latency rows.
    let sink = Sink::start(&["--max-size", "2k"]);
    let report = send_json(
        &sink.addr,
        &[
            "--messages",
            "20",
            "--connections",
            "2",
            "--size",
            "1k:1,4k:1",
        ],
    );
    let counters = sink.stop();
    assert_eq!(num(&report, "messages_accepted"), 10, "{report}");
    assert_eq!(counters.get("messages_total"), 10);
    assert_eq!(num(&report, "messages_failed"), 10, "{report}");
    assert_eq!(report["errors"]["over_server_size"], 10, "{report}");
    assert!(report["replies"].get("552").is_none(), "{report}");
    assert_eq!(report["replies"]["250"], 10, "{report}");
    assert_eq!(report["latency_ms"]["transaction"]["count"], 10, "{report}");
}
