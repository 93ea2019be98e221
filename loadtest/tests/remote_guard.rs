//! The sender refuses a target that is not loopback unless `--allow-remote` is given, before it
//! opens any connection.
#![allow(clippy::unwrap_used)]

mod common;

use common::send;

#[test]
fn remote_targets_are_refused() {
    for target in ["192.0.2.1:25", "0.0.0.0:2525", "[2001:db8::1]:25"] {
        let started = std::time::Instant::now();
        let out = send(&["--target", target, "--messages", "1"]);
        let err = String::from_utf8_lossy(&out.stderr);
        // A wrong flag: exit code 2, naming it.
        assert_eq!(out.status.code(), Some(2), "{target}: {err}");
        assert!(err.contains("--target"), "{target}: {err}");
        assert!(err.contains("not a loopback address"), "{target}: {err}");
        assert!(err.contains("--allow-remote"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(out.stdout.is_empty());
        // Refused before any connection attempt (which would take the 20 s timeout).
        assert!(started.elapsed().as_secs() < 10);
    }
}
