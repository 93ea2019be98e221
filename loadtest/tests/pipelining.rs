//! Pipelined sends, unpipelined sends, and several executors on both sides: every message
//! arrives once, and the sink sees pipelining exactly when it was asked for and offered.
#![allow(clippy::unwrap_used)]

mod common;

use common::{check_record, num, record_path, send_json, Sink};

#[test]
fn pipelined_messages_all_arrive_once() {
    let (_dir, record) = record_path();
    let sink = Sink::start(&["--record", record.to_str().unwrap()]);
    let report = send_json(
        &sink.addr,
        &["--messages", "1000", "--connections", "8", "--pipelining"],
    );
    let counters = sink.stop();
    assert_eq!(num(&report, "messages_accepted"), 1000);
    assert_eq!(num(&report, "messages_failed"), 0);
    assert_eq!(counters.get("pipelined_transactions_total"), 1000);
    // One message in flight per connection: each MAIL waits for the previous reply.
    assert_eq!(counters.get("overlapped_transactions_total"), 0);
    check_record(&record, 0..1000);
}

/// `--window`: the next message's commands follow the previous body before its reply.
fn window(extra: &[&str]) {
    let (_dir, record) = record_path();
    let sink = Sink::start(&["--record", record.to_str().unwrap()]);
    let mut args = vec![
        "--messages",
        "1000",
        "--connections",
        "4",
        "--pipelining",
        "--window",
        "8",
    ];
    args.extend_from_slice(extra);
    let report = send_json(&sink.addr, &args);
    let counters = sink.stop();
    assert_eq!(num(&report, "messages_accepted"), 1000, "{report}");
    assert_eq!(num(&report, "messages_failed"), 0);
    assert_eq!(counters.get("messages_total"), 1000);
    let overlapped = counters.get("overlapped_transactions_total");
    assert!(overlapped > 0, "no MAIL came before the previous reply");
    assert!(overlapped < 1000);
    check_record(&record, 0..1000);
}

#[test]
fn a_window_pipelines_bdat_messages_into_each_other() {
    window(&["--bdat"]);
}

#[test]
fn a_window_pipelines_data_messages_into_each_other() {
    window(&["--msgs-per-conn", "100"]);
}

#[test]
fn without_the_flag_commands_wait_for_replies() {
    let (_dir, record) = record_path();
    let sink = Sink::start(&["--record", record.to_str().unwrap()]);
    let report = send_json(&sink.addr, &["--messages", "200", "--connections", "4"]);
    let counters = sink.stop();
    assert_eq!(num(&report, "messages_accepted"), 200);
    assert_eq!(counters.get("pipelined_transactions_total"), 0);
    check_record(&record, 0..200);
}

#[test]
fn a_sink_without_pipelining_is_not_pipelined_to() {
    let sink = Sink::start(&["--no-pipelining"]);
    let report = send_json(
        &sink.addr,
        &["--messages", "100", "--connections", "2", "--pipelining"],
    );
    let counters = sink.stop();
    assert_eq!(num(&report, "messages_accepted"), 100);
    assert_eq!(counters.get("messages_total"), 100);
    assert_eq!(counters.get("pipelined_transactions_total"), 0);
}

#[test]
fn several_executors_on_both_sides() {
    let (_dir, record) = record_path();
    let sink = Sink::start(&["--threads", "2", "--record", record.to_str().unwrap()]);
    let report = send_json(
        &sink.addr,
        &[
            "--messages",
            "600",
            "--connections",
            "6",
            "--threads",
            "2",
            "--pipelining",
            "--msgs-per-conn",
            "25",
        ],
    );
    let counters = sink.stop();
    assert_eq!(num(&report, "messages_accepted"), 600);
    // 600 messages, 25 per connection: at least 24 connections.
    assert!(num(&report, "connections_opened") >= 24);
    assert_eq!(
        counters.get("connections_total"),
        num(&report, "connections_opened")
    );
    check_record(&record, 0..600);
}
