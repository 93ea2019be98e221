//! `--drop-after`: the sink closes a connection without a reply at its N-th message; the
//! sender counts those as failed, reconnects, and the record holds only what was accepted.
#![allow(clippy::unwrap_used)]

mod common;

use common::{num, record_path, send_json, Sink};

#[test]
fn dropped_connections_lose_only_the_unanswered_message() {
    let (_dir, record) = record_path();
    let sink = Sink::start(&["--drop-after", "3", "--record", record.to_str().unwrap()]);
    let report = send_json(&sink.addr, &["--messages", "30", "--pipelining"]);
    let c = sink.stop();
    // One connection: two accepted, the third dropped, a new connection, and so on.
    assert_eq!(num(&report, "messages_accepted"), 20);
    assert_eq!(num(&report, "messages_failed"), 10);
    assert_eq!(report["errors"]["connection_closed"].as_u64(), Some(10));
    assert_eq!(c.get("dropped_total"), 10);
    assert_eq!(c.get("messages_total"), 20);
    let recorded = std::fs::read_to_string(&record).unwrap().lines().count();
    assert_eq!(recorded, 20);
}

#[test]
fn a_server_that_never_answers_times_out() {
    let sink = Sink::start(&["--delay", "10s"]);
    let started = std::time::Instant::now();
    let out = std::process::Command::new(common::BIN)
        .args([
            "send",
            "--target",
            &sink.addr,
            "--messages",
            "2",
            "--timeout",
            "300ms",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("timeout: 2"), "{text}");
    assert!(
        started.elapsed().as_secs() < 8,
        "the timeout was not applied"
    );
}
