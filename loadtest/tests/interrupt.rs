//! SIGINT (Ctrl-C) or SIGTERM ends a run early and still gives its report and JSON.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Counters, Sink, BIN};

fn accepted_so_far(metrics: &str) -> u64 {
    so_far(metrics, "messages_total")
}

/// The sink's counter `name` (as its /metrics at `metrics` say it, less the prefix).
fn so_far(metrics: &str, name: &str) -> u64 {
    let mut http = TcpStream::connect(metrics).unwrap();
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    http.read_to_string(&mut response).unwrap();
    let (_, body) = response.split_once("\r\n\r\n").unwrap();
    Counters::parse(body).get(name)
}

/// Starts a quiet `send` to `target` with `extra` flags, its JSON report to `json`.
fn spawn_send(target: &str, extra: &[&str], json: &std::path::Path) -> std::process::Child {
    Command::new(BIN)
        .args(["send", "--target", target, "--quiet"])
        .args(extra)
        .args(["--json", json.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Starts a `send` with `extra` flags against `sink`, waits until the sink has taken
/// mail, and interrupts it: returns its output, its JSON report, and when it started.
fn interrupt_after_first(sink: &Sink, extra: &[&str]) -> (Output, serde_json::Value, Instant) {
    interrupt_after(sink, 1, extra)
}

/// [`interrupt_after_first`], once the sink has taken `accepted` messages.
fn interrupt_after(
    sink: &Sink,
    accepted: u64,
    extra: &[&str],
) -> (Output, serde_json::Value, Instant) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let sender = spawn_send(&sink.addr, extra, &json);
    let started = Instant::now();
    // Bounded: until the sink has taken mail, or 20 s.
    let metrics = sink.metrics.clone().unwrap();
    while accepted_so_far(&metrics) < accepted && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(Command::new("kill")
        .args(["-INT", &sender.id().to_string()])
        .status()
        .unwrap()
        .success());
    let out = sender.wait_with_output().unwrap();
    let report = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    (out, report, started)
}

#[test]
fn an_interrupted_run_still_reports() {
    let sink = Sink::start(&["--metrics", "127.0.0.1:0"]);
    let (out, report, started) = interrupt_after_first(&sink, &["--duration", "60s"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "the run went on"
    );
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("stopped early by a signal"), "{text}");
    assert_eq!(report["interrupted"], true);
    assert!(report["messages_accepted"].as_u64().unwrap() > 0);
    assert!(report["elapsed_s"].as_f64().unwrap() < 40.0, "{report}");
    let c = sink.stop();
    assert_eq!(
        report["messages_accepted"].as_u64().unwrap(),
        c.get("messages_total")
    );
}

#[test]
fn an_interrupt_ends_the_wait_for_the_next_message_due() {
    // At two messages a minute the second is due 30 s in: the interrupt comes while the only
    // connection waits for it, which ends the run at once and sends nothing more.
    let sink = Sink::start(&["--metrics", "127.0.0.1:0"]);
    let (out, report, started) = interrupt_after_first(
        &sink,
        &["--rate", "2/min", "--duration", "10m", "--connections", "1"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the run waited for the next message: {text}"
    );
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert_eq!(report["interrupted"], true);
    assert_eq!(report["messages_sent"], 1, "{report}");
    assert_eq!(report["messages_accepted"], 1, "{report}");
    // Due until the interrupt: the first message only, and it was started.
    assert_eq!(report["messages_due"], 1, "{report}");
    assert_eq!(report["messages_not_started"], 0, "{report}");
    assert_eq!(sink.stop().get("messages_total"), 1);
}

#[test]
fn an_interrupt_while_a_free_connection_waits_for_a_message_due_misses_none() {
    // A sink that keeps up with 25 messages a second: once the run is under way (its
    // connection open, the first 12 messages taken), the one connection waits most of
    // 40 ms for each message's due time, and the interrupt comes during such a wait.
    // The message due just before it, whose wait was woken late by the stop, is not
    // reported missed for want of a connection. Several runs, as the interrupt lands where
    // it does.
    for _ in 0..4 {
        let sink = Sink::start(&["--metrics", "127.0.0.1:0"]);
        let (out, report, _) = interrupt_after(
            &sink,
            12,
            &["--rate", "25/s", "--duration", "60s", "--connections", "1"],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{text}");
        assert_eq!(report["interrupted"], true);
        assert_eq!(report["messages_not_started"], 0, "{report}");
        assert_eq!(report["messages_due"], report["messages_sent"], "{report}");
        sink.stop();
    }
}

/// A loopback address where nothing listens: a port that was free a moment ago.
fn nothing_listens() -> String {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    free.local_addr().unwrap().to_string()
}

#[test]
fn a_run_against_a_port_where_nothing_listens_stops_and_says_so() {
    let target = nothing_listens();
    let started = Instant::now();
    let out = common::send(&[
        "--target",
        &target,
        "--duration",
        "120s",
        "--connections",
        "4",
        "--quiet",
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the run went on against nothing"
    );
    assert!(
        stderr.contains(&format!(
            "no connection to {target} opened in 3 s (connection refused)"
        )),
        "{stderr}"
    );
    assert!(
        stdout.contains("note:     no connection opened"),
        "{stdout}"
    );
    assert!(!stdout.contains("stopped early by a signal"), "{stdout}");
}

#[test]
fn an_open_loop_against_nothing_fails_messages_only_as_they_come_due() {
    // A connection that cannot open fails the message it was to carry once that message is
    // due, not before: each failed try took the next message at once, so the run ran ahead
    // of its rate, with more messages failed than had come due.
    let target = nothing_listens();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let out = common::send(&[
        "--target",
        &target,
        "--rate",
        "10/s",
        "--duration",
        "60s",
        "--connections",
        "2",
        "--quiet",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert_eq!(report["no_server"], true, "{report}");
    let (failed, due) = (
        common::num(&report, "messages_failed"),
        common::num(&report, "messages_due"),
    );
    // (A try under way when another connection gives up may fail one due just after the
    // stop: one a connection at most.)
    assert!(
        failed > 0 && failed <= due + 2,
        "{failed} failed of {due} due: {report}"
    );
}

#[test]
fn an_interrupt_while_the_server_stalls_ends_the_messages_due_at_the_signal() {
    // The sink holds each answer to the data for 30 s: every connection waits in a read when
    // the interrupt comes, until its --timeout. The messages due end at the signal, not when
    // the first connection wakes up from that wait.
    let sink = Sink::start(&["--delay", "30s", "--metrics", "127.0.0.1:0"]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let sender = spawn_send(
        &sink.addr,
        &[
            "--rate",
            "100/s",
            "--duration",
            "60s",
            "--connections",
            "2",
            "--timeout",
            "4s",
        ],
        &json,
    );
    let spawned = Instant::now();
    // Both connections in (so the run is under way, its signal handlers set), each with a
    // message waiting for its answer; then a second of the run at least.
    let metrics = sink.metrics.clone().unwrap();
    while so_far(&metrics, "connections_total") < 2 && spawned.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(1).saturating_sub(spawned.elapsed()));
    let signalled = spawned.elapsed().as_secs_f64();
    assert!(Command::new("kill")
        .args(["-INT", &sender.id().to_string()])
        .status()
        .unwrap()
        .success());
    sender.wait_with_output().unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert_eq!(report["interrupted"], true, "{report}");
    // The run began after the process did, and the stop is seen within 50 ms of the signal:
    // at 100 a second, no more than the signal's time of messages and a few. Seen only once
    // the reads gave up, it was 4 s more of them.
    let due = common::num(&report, "messages_due") as f64;
    assert!(
        due <= 100.0 * (signalled + 0.5),
        "{due} due at {signalled} s: {report}"
    );
    sink.stop();
}

/// A `send` against a listener that takes connections and never greets, with `extra` flags:
/// started, and the listener (held, so its connections stay open and silent).
fn send_to_silent(extra: &[&str]) -> (std::process::Child, std::net::TcpListener, String) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = listener.local_addr().unwrap().to_string();
    let sender = Command::new(BIN)
        .args(["send", "--target", &target, "--quiet", "--duration", "120s"])
        .args(["--connections", "2", "--timeout", "60s"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (sender, listener, target)
}

#[test]
fn a_server_that_never_greets_ends_the_run_in_seconds_not_at_the_timeout() {
    let started = Instant::now();
    let (sender, _listener, target) = send_to_silent(&[]);
    let out = sender.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "waited for the 60 s timeout: {stdout}"
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!(
            "no connection to {target} opened in 3 s (no greeting)"
        )),
        "{stderr}"
    );
    assert!(
        stdout.contains("note:     no connection opened"),
        "{stdout}"
    );
}

#[test]
fn an_interrupt_ends_the_wait_for_a_greeting() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let (sender, listener, _) = send_to_silent(&["--json", json.to_str().unwrap()]);
    // A connection has come: the sender waits for its greeting now.
    let (_held, _) = listener.accept().unwrap();
    assert!(Command::new("kill")
        .args(["-INT", &sender.id().to_string()])
        .status()
        .unwrap()
        .success());
    let asked = Instant::now();
    let out = sender.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "the interrupt waited: {text}"
    );
    assert!(text.contains("stopped early by a signal"), "{text}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert_eq!(report["interrupted"], true, "{report}");
    assert_eq!(report["no_server"], false, "{report}");
    assert_eq!(report["messages_sent"], 0, "{report}");
}
