//! A spool written by a newer postern (a later segment format), met by this one after a
//! downgrade: the start ends with an error that says so, and nothing in the spool is set
//! aside as damaged or changed, so that the newer version still finds all its mail.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::Server;

/// Every segment file of the spool.
fn segments(spool: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for core in std::fs::read_dir(spool).unwrap().flatten() {
        if core.path().is_dir() {
            for f in std::fs::read_dir(core.path()).unwrap().flatten() {
                if f.path().extension().is_some_and(|e| e == "seg") {
                    out.push(f.path());
                }
            }
        }
    }
    out.sort();
    out
}

/// Writes `version` as the format version of every segment of the spool (bytes 8..12).
fn set_version(spool: &Path, version: u32) {
    for seg in segments(spool) {
        let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        f.write_all_at(&version.to_le_bytes(), 8).unwrap();
    }
}

/// Runs `cmd` to its end, or fails the test if it has not ended within 30 s (a server that
/// started when it should not have).
fn ended(mut cmd: Command) -> std::process::Output {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after 30 s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_spool_of_a_newer_format_stops_the_start_and_is_left_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let mut server = Server::start_in(&["--cores", "1"], spool.clone(), None);
    let mut c = server.connect();
    assert!(c.line().starts_with("220"));
    c.send(b"EHLO client.test\r\n");
    c.reply();
    assert!(c.cmd("MAIL FROM:<a@origin.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@dest.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: kept\r\n\r\nbody\r\n.\r\n");
    assert!(c.line().starts_with("250 2.0.0"));
    c.cmd("QUIT");
    assert!(server.terminate().success());

    let before = segments(&spool);
    assert!(!before.is_empty());
    set_version(&spool, 9);
    let mut serve = Command::new(env!("CARGO_BIN_EXE_postern"));
    serve
        .args([
            "serve",
            "--cores",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--spool",
        ])
        .arg(&spool)
        .env_remove("RUST_LOG");
    let out = ended(serve);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("written by a newer postern"), "{err}");
    assert!(err.contains("spool format 9"), "{err}");
    // Nothing set aside as damaged, nothing removed.
    assert_eq!(segments(&spool), before);
    assert!(!spool.join("0").join("damaged").exists());

    // The listing says the same, rather than counting the mail as damaged.
    let out = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["queue", "--spool"])
        .arg(&spool)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(err.contains("written by a newer postern"), "{err}");

    // Back in this build's format (as the newer version would find it), or in the one
    // before (version 2, without copies forward, read as it is): the message is there.
    for version in [3, 2] {
        set_version(&spool, version);
        let out = Command::new(env!("CARGO_BIN_EXE_postern"))
            .args(["queue", "--spool"])
            .arg(&spool)
            .output()
            .unwrap();
        let listed = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "version {version}: {out:?}");
        assert!(
            listed.contains("b@dest.test"),
            "version {version}: {listed}"
        );
    }
}

#[test]
fn a_segment_gone_quiet_has_its_mark_moved_over_its_last_message() {
    // The segment being written keeps in its header (bytes 36..48, where a full segment's
    // seal goes) how far its records are durable, moved on with a group commit that comes
    // after the one that made them so. A message followed by nothing gets no such commit:
    // within about a second of quiet the server writes the mark itself, so a crash then
    // leaves a segment whose every record is known good, and damage to it is reported rather
    // than taken for a torn tail.
    let server = Server::start(&["--cores", "1"]);
    let mut c = server.connect();
    assert!(c.line().starts_with("220"));
    c.send(b"EHLO client.test\r\n");
    c.reply();
    assert!(c.cmd("MAIL FROM:<a@client.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@example.org>").starts_with("250"));
    c.send(b"BDAT 27 LAST\r\nSubject: quiet\r\n\r\nnothing.\r\n");
    let reply = c.line();
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    // The first segment is the one being written (the next is its spare, made ahead).
    let segs = segments(&server.spool);
    assert!(!segs.is_empty());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let (mark, end) = loop {
        let data = std::fs::read(&segs[0]).unwrap();
        let mark = u64::from_le_bytes(data[36..44].try_into().unwrap()) as usize;
        let end = common::segment_records(&data).1;
        if mark == end || std::time::Instant::now() > deadline {
            break (mark, end);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(mark, end, "the mark does not reach the last record");
}
