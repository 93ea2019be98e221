//! A wrong flag or value: one line on stderr that names it, exit code 2.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::BIN;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn wrong_flags_are_one_line_and_exit_2() {
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
        (&["sink", "--tls-cert", "x.pem"][..], "--tls-key"),
        (&["frobnicate"][..], "frobnicate"),
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
