//! `--json`, `--hdr-log` and `--plot`: the JSON report parses and has every field, the interval
//! log is an HdrHistogram log, the plot is an SVG.
#![allow(clippy::unwrap_used)]

mod common;

use common::{send, Sink};

#[test]
fn every_output_file_is_written_and_complete() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let log = dir.path().join("r.hlog");
    let svg = dir.path().join("r.svg");
    let sink = Sink::start(&[]);
    let out = send(&[
        "--target",
        &sink.addr,
        "--messages",
        "300",
        "--connections",
        "3",
        // No more executors than connections.
        "--threads",
        "8",
        "--rate",
        "250/s",
        "--json",
        json.to_str().unwrap(),
        "--hdr-log",
        log.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    sink.stop();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Not a terminal: no progress line.
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for field in [
        "messages_sent",
        "messages_accepted",
        "messages_refused",
        "messages_failed",
        "bytes_sent",
        "bytes_accepted",
        "connections_opened",
    ] {
        assert!(report[field].is_u64(), "{field} in {report}");
    }
    for field in ["elapsed_s", "messages_per_s", "mb_per_s"] {
        assert!(report[field].as_f64().unwrap() > 0.0, "{field}");
    }
    for kind in ["connect", "ehlo", "transaction", "end_of_data"] {
        let l = &report["latency_ms"][kind];
        for p in ["count", "p50", "p90", "p99", "p99_9", "max", "mean"] {
            assert!(l[p].is_number(), "latency_ms.{kind}.{p} in {report}");
        }
        assert!(l["p50"].as_f64() <= l["p99"].as_f64() && l["p99"].as_f64() <= l["max"].as_f64());
    }
    assert_eq!(
        report["latency_ms"]["transaction"]["count"].as_u64(),
        Some(300)
    );
    assert!(report["replies"].is_object() && report["errors"].is_object());
    let settings = &report["settings"];
    for field in [
        "target",
        "connections",
        "threads",
        "messages",
        "duration_s",
        "sizes",
        "rcpts",
        "pipelining",
        "bdat",
        "starttls",
        "rate",
        "msgs_per_conn",
    ] {
        assert!(
            settings.get(field).is_some(),
            "settings.{field} in {report}"
        );
    }
    assert_eq!(settings["threads"].as_u64(), Some(3), "{report}");

    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("#[StartTime: "), "{log}");
    // About 1.2 s of run: at least one interval per latency kind.
    assert!(
        log.lines().any(|l| l.starts_with("Tag=transaction,")),
        "{log}"
    );
    // Each interval as long as it lasted: whole seconds, and the run's last cut short where
    // the run ended, so that the intervals add up to the run.
    let lengths: f64 = log
        .lines()
        .filter_map(|l| l.strip_prefix("Tag=transaction,"))
        .map(|l| l.split(',').nth(1).unwrap().parse::<f64>().unwrap())
        .sum();
    let elapsed = report["elapsed_s"].as_f64().unwrap();
    assert!(
        (lengths - elapsed).abs() < 0.1,
        "{lengths} s of intervals in {elapsed} s: {log}"
    );
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(
        svg.contains("<svg") && svg.contains("transaction"),
        "not a plot"
    );
}
