//! `--rate`: messages start on schedule, and latency counts from when a message was due, so a
//! server that falls behind shows it (no coordinated omission).
#![allow(clippy::unwrap_used)]

mod common;

use common::{num, send_json, Sink};

/// 100 messages at 200/s over `connections`: all accepted, none before it is due.
fn on_schedule(connections: &str, extra: &[&str]) {
    let sink = Sink::start(&[]);
    let mut args = vec![
        "--messages",
        "100",
        "--rate",
        "200/s",
        "--connections",
        connections,
        "--pipelining",
    ];
    args.extend_from_slice(extra);
    let report = send_json(&sink.addr, &args);
    sink.stop();
    assert_eq!(num(&report, "messages_accepted"), 100);
    // The last message is due at 99/200 s.
    let elapsed = report["elapsed_s"].as_f64().unwrap();
    assert!((0.49..5.0).contains(&elapsed), "elapsed {elapsed}");
    assert!(report["messages_per_s"].as_f64().unwrap() < 210.0);
}

#[test]
fn messages_start_on_schedule() {
    on_schedule("4", &[]);
}

#[test]
fn a_window_still_starts_nothing_before_it_is_due() {
    on_schedule("2", &["--bdat", "--window", "8"]);
}

#[test]
fn a_slow_server_shows_in_latency_from_the_due_time() {
    // The sink answers each message after 50 ms, so one connection manages 20/s while the
    // schedule asks for 100/s: the 20th message is due at 0.19 s but done near 1 s.
    let sink = Sink::start(&["--delay", "50ms"]);
    let report = send_json(
        &sink.addr,
        &[
            "--messages",
            "20",
            "--rate",
            "100/s",
            "--connections",
            "1",
            "--pipelining",
        ],
    );
    sink.stop();
    assert_eq!(num(&report, "messages_accepted"), 20);
    let lat = &report["latency_ms"];
    let eod_p50 = lat["end_of_data"]["p50"].as_f64().unwrap();
    let txn_max = lat["transaction"]["max"].as_f64().unwrap();
    assert!(
        (45.0..500.0).contains(&eod_p50),
        "end of data p50 {eod_p50}"
    );
    assert!(
        txn_max > 600.0,
        "transaction max {txn_max} hides the backlog"
    );
}

#[test]
fn messages_due_that_a_slow_server_left_unstarted_are_reported() {
    // One connection to a server that takes 100 ms a message, at 100/s for 1 s: about ten
    // are started, ninety never are.
    let sink = Sink::start(&["--delay", "100ms"]);
    let report = send_json(
        &sink.addr,
        &["--rate", "100/s", "--duration", "1s", "--connections", "1"],
    );
    sink.stop();
    assert_eq!(num(&report, "messages_due"), 100);
    let missed = num(&report, "messages_not_started");
    let sent = num(&report, "messages_sent");
    assert!(missed >= 50, "{report}");
    assert_eq!(missed + sent, 100, "{report}");
}

#[test]
fn a_server_that_keeps_up_misses_nothing() {
    let sink = Sink::start(&[]);
    let report = send_json(
        &sink.addr,
        &["--rate", "100/s", "--duration", "1s", "--connections", "4"],
    );
    sink.stop();
    assert_eq!(num(&report, "messages_due"), 100);
    assert_eq!(num(&report, "messages_not_started"), 0, "{report}");
}
