//! A report that cannot be printed (stdout a pipe its reader closed) does not end either
//! command in a panic, and `send` still writes its JSON report.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::{Sink, BIN};

#[test]
fn send_with_its_stdout_closed_still_writes_its_json_and_exits_cleanly() {
    let sink = Sink::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let mut sender = Command::new(BIN)
        .args([
            "send",
            "--target",
            &sink.addr,
            "--quiet",
            "--messages",
            "20",
        ])
        .args(["--json", json.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the read end before anything is written to it.
    drop(sender.stdout.take());
    let out = sender.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["messages_accepted"], 20);
    sink.stop();
}

#[test]
fn a_sink_whose_reader_took_the_first_line_exits_cleanly() {
    // `postern-load sink ... | head -1` is how a script learns the port.
    let mut sink = Command::new(BIN)
        .args(["sink", "--listen", "127.0.0.1:0", "--lifetime", "300ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(sink.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("listening on "), "{first}");
    let out = sink.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
