//! A reply that never ends fails its message at `--timeout`, as one that never comes does.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use common::num;

#[test]
fn a_reply_of_endless_continuation_lines_times_out() {
    let (addr, server) = common::one_connection_server(|mut input, mut out| {
        let mut line = String::new();
        input.read_line(&mut line).unwrap();
        out.write_all(b"250-tarpit\r\n250 PIPELINING\r\n").unwrap();
        line.clear();
        input.read_line(&mut line).unwrap();
        // MAIL gets a reply that goes on, a line every 50 ms, for at most 10 s (then the
        // connection closes).
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if out.write_all(b"250-still going\r\n").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let out = std::process::Command::new(common::BIN)
        .args(["send", "--target", &addr, "--json"])
        .arg(&json)
        .args(["--messages", "1", "--connections", "1", "--timeout", "1s"])
        .output()
        .unwrap();
    server.join().unwrap();
    // A run with a failed message ends with status 1, its report written.
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert_eq!(num(&report, "messages_failed"), 1, "{report}");
    assert_eq!(report["errors"]["timeout"], 1, "{report}");
}
