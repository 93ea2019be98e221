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

/// Sends pipelined BDAT with eight messages in flight (`extra` flags beside) to a sink that
/// drops every connection at its fifth end of data; the sender must count accepted what the
/// sink answered 250.
fn sender_counts_what_the_sink_took(extra: &[&str]) {
    let sink = Sink::start(&["--drop-after", "5"]);
    let mut args = vec![
        "--target",
        &sink.addr,
        "--pipelining",
        "--window",
        "8",
        "--bdat",
    ];
    args.extend_from_slice(extra);
    let out = common::send(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    let c = sink.stop();
    assert!(
        c.get("messages_total") > 0 && c.get("dropped_total") > 0,
        "{c:?}"
    );
    assert!(
        text.contains(&format!("{} accepted", c.get("messages_total"))),
        "the sink answered {} messages 250; the sender saw: {text}",
        c.get("messages_total")
    );
}

#[test]
fn replies_owed_before_a_dropped_message_still_go_out() {
    // The first four of each connection are answered before the fifth end of data closes it.
    sender_counts_what_the_sink_took(&["--messages", "40", "--connections", "1"]);
}

#[test]
fn replies_that_came_before_a_reset_count_as_the_server_gave_them() {
    // Bodies in many small chunks: the sender is still writing when the sink closes the
    // connection on unread input (a reset), and the write fails while the replies to the
    // messages before the dropped one wait in the socket. They count as accepted, as the sink
    // counted them, not as lost with the connection.
    sender_counts_what_the_sink_took(&[
        "--messages",
        "200",
        "--connections",
        "2",
        "--chunk-size",
        "300",
    ]);
}

#[test]
fn messages_that_time_out_count_in_the_length_of_the_run() {
    let sink = Sink::start(&["--delay", "10s"]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let out = std::process::Command::new(common::BIN)
        .args(["send", "--target", &sink.addr, "--messages", "2"])
        .args(["--timeout", "300ms", "--json", json.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    let elapsed = report["elapsed_s"].as_f64().unwrap();
    assert!(elapsed >= 0.3, "two 300 ms timeouts in {elapsed} s");
}
