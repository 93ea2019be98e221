//! A wrong flag or value: one line on stderr that names it, exit code 2.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::BIN;

/// Runs the program with `args`, ended after 20 s should it take the flags and start (exit
/// code 124 then, which no case expects).
fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new("timeout")
        .args(["20", BIN])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn wrong_flags_are_one_line_and_exit_2() {
    // 249 octets as written, past the 254 of a path once {seq} is a 20-digit number.
    let long_at_most_seq = format!("{}{{seq}}@x.test", "r".repeat(237));
    let too_long = format!("{}@x.test", "s".repeat(248));
    for (args, names) in [
        (&["send", "--bogus"][..], "--bogus"),
        (&["send", "--size", "1x"][..], "--size"),
        (&["send", "--rate", "fast"][..], "--rate"),
        (
            &["send", "--messages", "5", "--duration", "1s"][..],
            "--duration",
        ),
        (&["send", "--connections", "0"][..], "--connections"),
        (&["send", "--window", "4"][..], "--pipelining"),
        (&["send", "--pipelining", "--window", "0"][..], "--window"),
        (&["sink", "--drop-after", "0"][..], "--drop-after"),
        (&["sink", "--reply-mix", "250:9,999:1"][..], "--reply-mix"),
        // The sink's positive end-of-data reply is 250: a 251 would be counted and not said.
        (&["sink", "--reply-mix", "250:1,251:1"][..], "--reply-mix"),
        (&["sink", "--tls-cert", "x.pem"][..], "--tls-key"),
        (&["frobnicate"][..], "frobnicate"),
        (&["send", "--rate", "1e-20/s"][..], "--rate"),
        (&["send", "--rate", "inf/s"][..], "--rate"),
        (&["send", "--timeout", "0s"][..], "--timeout"),
        // M would be months to the duration parser: a five-month run without a word.
        (&["send", "--duration", "5M"][..], "--duration"),
        (&["sink", "--delay", "5M"][..], "--delay"),
        // A negative number is a wrong value for its flag, not an unknown argument.
        (&["send", "--connections", "-1"][..], "--connections"),
        (&["sink", "--threads", "-1"][..], "--threads"),
        (&[][..], "a command is required"),
        (
            &[
                "sink",
                "--listen",
                "127.0.0.1:26999",
                "--metrics",
                "127.0.0.1:26999",
            ][..],
            "--metrics",
        ),
        (
            &[
                "sink",
                "--listen",
                "127.0.0.1:26999",
                "--metrics",
                "0.0.0.0:26999",
            ][..],
            "--metrics",
        ),
        // Two reports into one file: the last would overwrite the other.
        (
            &["send", "--json", "same.out", "--hdr-log", "same.out"][..],
            "--hdr-log",
        ),
        (&["sink", "--timeout", "0s"][..], "--timeout"),
        (&["send", "--helo", ""][..], "--helo"),
        (&["send", "--chunk-size", "10"][..], "--bdat"),
        (&["send", "--cpus", ","][..], "--cpus"),
        (&["send", "--messages", "0"][..], "--messages"),
        (&["send", "--duration", "0s"][..], "--duration"),
        (&["send", "--target", "127.0.0.1"][..], "--target"),
        (&["send", "--target", "127.0.0.1:0"][..], "--target"),
        (&["send", "--target", "::1"][..], "--target"),
        (&["send", "--to", ""][..], "--to"),
        (
            &["send", "--to", "a@b.test>\r\nRCPT TO:<c@d.test"][..],
            "--to",
        ),
        (&["send", "--from", "a b@c.test"][..], "--from"),
        (&["send", "--from", "<a@c.test>"][..], "--from"),
        (&["send", "--from", "j\u{f6}rg@c.test"][..], "--from"),
        (&["send", "--to", &long_at_most_seq][..], "--to"),
        (&["send", "--from", &too_long][..], "--from"),
        (&["sink", "--max-size", "0"][..], "--max-size"),
        (&["sink", "--lifetime", "0s"][..], "--lifetime"),
        (&["sink", "--hostname", "two words"][..], "--hostname"),
        // A negative duration is a wrong value for its flag, not an unknown argument.
        (&["send", "--timeout", "-5s"][..], "--timeout"),
        (&["send", "--duration", "-1s"][..], "--duration"),
        (&["sink", "--delay", "-1s"][..], "--delay"),
        (&["sink", "--timeout", "-1s"][..], "--timeout"),
        (&["sink", "--lifetime", "-1s"][..], "--lifetime"),
    ] {
        let (code, err) = run(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(names), "{args:?} should name {names}: {err}");
    }
}

#[test]
fn help_is_not_an_error() {
    let (code, _) = run(&["send", "--help"]);
    assert_eq!(code, Some(0));
}

#[test]
fn more_connections_than_the_open_file_limit_holds_are_refused_before_the_run() {
    let out = Command::new("prlimit")
        .args(["--nofile=100:100", BIN, "send", "--connections", "200"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--connections") && err.contains("100"),
        "{err}"
    );
}

#[test]
fn a_report_file_that_cannot_be_written_is_found_before_the_run() {
    let sink = common::Sink::start(&[]);
    for flag in ["--json", "--plot", "--hdr-log"] {
        let out = Command::new(BIN)
            .args(["send", "--target", &sink.addr, "--messages", "5", flag])
            .arg("/nonexistent-dir/report")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // A wrong flag value: one line naming the flag, exit code 2.
        assert_eq!(out.status.code(), Some(2), "{flag}: {err}");
        assert_eq!(err.lines().count(), 1, "{flag}: {err}");
        assert!(err.contains(flag), "{flag}: {err}");
        assert!(err.contains("/nonexistent-dir/report"), "{flag}: {err}");
        assert!(
            out.stdout.is_empty(),
            "{flag}: ran before finding out: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert_eq!(sink.stop().get("messages_total"), 0, "no message was sent");
    let (code, err) = run(&["sink", "--record", "/nonexistent-dir/r", "--lifetime", "5s"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--record"), "{err}");
    // Certificate files that hold no certificate: named, once, before the sink listens.
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let empty = empty.to_str().unwrap();
    let (code, err) = run(&[
        "sink",
        "--tls-cert",
        empty,
        "--tls-key",
        empty,
        "--lifetime",
        "5s",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--tls-cert") && err.contains("empty.pem"),
        "{err}"
    );
    assert!(!err.contains("TLS: TLS"), "{err}");
}

#[test]
fn a_second_sink_on_a_port_already_listened_on_is_refused() {
    let first = common::Sink::start(&[]);
    let (code, err) = run(&["sink", "--listen", &first.addr, "--lifetime", "5s"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("another process already listens"), "{err}");
}

#[test]
fn a_target_that_does_not_resolve_or_a_cpu_not_online_is_a_wrong_flag() {
    for (args, names) in [
        (
            &[
                "send",
                "--target",
                "no-such-host.invalid:25",
                "--messages",
                "1",
            ][..],
            "--target",
        ),
        (
            &["send", "--cpus", "100000", "--messages", "1"][..],
            "--cpus",
        ),
        (
            &["sink", "--cpus", "100000", "--lifetime", "1s"][..],
            "--cpus",
        ),
    ] {
        let (code, err) = run(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(names), "{args:?} should name {names}: {err}");
    }
}

#[test]
fn a_count_of_zero_is_refused_as_such() {
    for args in [
        &["send", "--messages", "0"][..],
        &["sink", "--drop-after", "0"],
    ] {
        let (code, err) = run(args);
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains("at least 1"), "{args:?}: {err}");
        assert!(!err.contains("18446744073709551615"), "{args:?}: {err}");
    }
}

#[test]
fn a_negative_duration_is_refused_as_negative() {
    let (code, err) = run(&["send", "--timeout", "-5s"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("\"-5s\" is negative"), "{err}");
    // A flag where the value was left out is not taken for a negative duration.
    let (code, err) = run(&["send", "--duration", "--quiet"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--duration"), "{err}");
    assert!(err.contains("a value is required"), "{err}");
    assert!(!err.contains("negative"), "{err}");
    let (code, err) = run(&["send", "--messages", "-1"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--messages") && err.contains("is negative"),
        "{err}"
    );
}

#[test]
fn one_report_file_under_two_names_is_refused_before_the_run() {
    // Another spelling of the same path, and a link to it: compared as files, not as names.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("report.out");
    let respelled = dir.path().join(".").join("report.out");
    let link = dir.path().join("link.out");
    std::fs::write(&file, "").unwrap();
    std::os::unix::fs::symlink(&file, &link).unwrap();
    for (json, other_flag, other) in [(&file, "--hdr-log", &respelled), (&file, "--plot", &link)] {
        let (code, err) = run(&[
            "send",
            "--json",
            json.to_str().unwrap(),
            other_flag,
            other.to_str().unwrap(),
        ]);
        assert_eq!(code, Some(2), "{other_flag}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(other_flag) && err.contains("--json"),
            "{other_flag}: {err}"
        );
    }
}
