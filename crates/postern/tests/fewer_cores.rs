//! A restart with fewer cores than the spool was written by: the removed cores' mail moves to
//! the remaining ones and is delivered once, across crashes, a full spool and a stop asked for
//! during the move.
#![allow(clippy::unwrap_used)]

mod common;
mod relaying;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Server;
use relaying::*;

/// `postern` arguments for a start on one core, holding its mail, on any loopback port: the
/// spool's path goes last.
const ONE_CORE_HELD: [&str; 7] = [
    "serve",
    "--cores",
    "1",
    "--hold",
    "--listen",
    "127.0.0.1:0",
    "--spool",
];

/// Holds mail on two cores (`--hold`, with `extra` flags) in `spool` until some of it is on
/// core 1 (one connection per message, which the kernel spreads over the cores), and stops;
/// returns how many messages were sent and how many are on core 1.
fn hold_on_two_cores(spool: &Path, extra: &[&str], prefix: &str) -> (usize, usize) {
    let mut args = vec!["--cores", "2"];
    args.extend_from_slice(extra);
    let mut held = Server::start_in(&args, spool.to_path_buf(), None);
    let on_core_1 = || {
        common::spooled(spool)
            .iter()
            .filter(|m| postern_spool::owner_core(&m.0) == Some(1))
            .count()
    };
    let mut sent = 0;
    while sent < 40 {
        send(
            &held,
            "a@origin.test",
            &["b@dest.test"],
            &format!("<{prefix}{sent}@t>"),
            "x\r\n",
        );
        sent += 1;
        if sent >= 6 && on_core_1() > 0 {
            break;
        }
    }
    assert!(held.terminate().success());
    let on_1 = on_core_1();
    assert!(on_1 > 0, "no message on core 1: the test proves nothing");
    (sent, on_1)
}

/// A large move logs the first messages' new queue IDs one by one and a count for the rest, not
/// a line per message.
#[test]
fn a_move_to_fewer_cores_logs_a_few_queue_ids_and_counts_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let mut held = Server::start_in(&["--cores", "2"], spool.clone(), None);
    let on_core_1 = || {
        common::spooled(&spool)
            .iter()
            .filter(|m| postern_spool::owner_core(&m.0) == Some(1))
            .count()
    };
    let mut sent = 0;
    // Each message on a connection of its own, which the kernel gives either core.
    while sent < 400 && on_core_1() < 30 {
        let body = "x\r\n";
        send(
            &held,
            "a@origin.test",
            &["b@dest.test"],
            &format!("<many{sent}@t>"),
            body,
        );
        sent += 1;
    }
    assert!(held.terminate().success());
    let moved = on_core_1();
    assert!(moved >= 30, "only {moved} of {sent} on core 1");
    let mut one = Server::start_in(&["--cores", "1"], spool.clone(), None);
    one.log_until(|l| l.contains("folded into 1"));
    let log = one.terminate_for_log();
    let each = log
        .lines()
        .filter(|l| l.contains("moved from a core that no longer exists"))
        .count();
    assert_eq!(each, 20, "{log}");
    let more = format!("more={}", moved - 20);
    assert!(
        log.lines()
            .any(|l| l.contains(&more) && l.contains("more messages moved")),
        "{more} in {log}"
    );
}

/// The peer stored `sent` messages, each once (by Message-ID).
fn assert_each_once(peer: &Peer, sent: usize, why: &str) {
    let stored = peer.stored();
    let mut ids: Vec<&str> = stored.iter().map(|m| m.message_id.as_str()).collect();
    ids.sort_unstable();
    let all = ids.len();
    ids.dedup();
    assert_eq!((ids.len(), all), (sent, sent), "{why}");
}

#[test]
fn mail_queued_by_more_cores_is_delivered_once_however_often_fewer_cores_restart() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let (sent, _) = hold_on_two_cores(&spool, &[], "fold");
    // One core delivers everything, then restarts a few times.
    let peer = Peer::start(&[]);
    let route = format!("dest.test=127.0.0.1:{}", peer.port);
    let args = [
        "--route",
        route.as_str(),
        "--cores",
        "1",
        "--metrics",
        "127.0.0.1:0",
    ];
    for run in 0..4 {
        let mut server = Server::start_in(&args, spool.clone(), None);
        if run == 0 {
            peer.wait_for("every held message", Duration::from_secs(20), |s| {
                s.len() >= sent
            });
        }
        // Settled and recorded before the stop (the queue is empty).
        server.metrics_until(|m| m.contains("postern_queue_depth 0\n"));
        assert!(server.terminate().success());
        assert!(
            !spool.join("1").exists(),
            "core 1's directory is still there"
        );
    }
    assert_each_once(&peer, sent, "delivered again after a restart");
}

#[test]
fn a_move_to_fewer_cores_cut_off_by_crashes_delivers_each_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let (sent, _) = hold_on_two_cores(&spool, &[], "cut");
    // Two starts on one core, each killed as the move of core 1's mail syncs its copies: the
    // first `fdatasync` of the process is that sync (strace counts each thread's calls apart,
    // and the cores' threads do not exist yet).
    for _ in 0..2 {
        let mut cmd = Command::new("strace");
        cmd.args([
            "-f",
            "-qq",
            "-o",
            "/dev/null",
            "-e",
            "inject=fdatasync:signal=SIGKILL:when=1",
        ])
        .arg(env!("CARGO_BIN_EXE_postern"))
        .args(ONE_CORE_HELD)
        .arg(&spool);
        let (code, _, err) = common::run_command_bounded(cmd);
        assert_ne!(code, 0, "the start was not cut off: {err}");
        assert!(!err.contains("ready with"), "{err}");
        assert!(spool.join("1").exists(), "the move finished: {err}");
        assert!(
            common::spooled(&spool).len() > sent,
            "the copies were not on disk when the start was cut off: the test proves nothing"
        );
    }
    // A start that is not cut off delivers everything, each message once.
    let peer = Peer::start(&[]);
    let route = format!("dest.test=127.0.0.1:{}", peer.port);
    let args = [
        "--route",
        route.as_str(),
        "--cores",
        "1",
        "--metrics",
        "127.0.0.1:0",
    ];
    let mut server = Server::start_in(&args, spool.clone(), None);
    peer.wait_for("every held message", Duration::from_secs(20), |s| {
        s.len() >= sent
    });
    server.metrics_until(|m| m.contains("postern_queue_depth 0\n"));
    assert!(server.terminate().success());
    assert_each_once(&peer, sent, "delivered more than once");
}

#[test]
fn a_removed_core_s_directory_that_cannot_be_listed_stops_the_start_and_keeps_its_mail() {
    // A listing that fails (a bad directory block) is no empty directory: the move would
    // copy nothing and delete the directory with the mail it did not see.
    let disk = common::FaultyFs::mount();
    let spool = disk.path.join("spool");
    let (sent, _) = hold_on_two_cores(&spool, &[], "unlisted");
    disk.fail_listing_of(Some("1"));
    let mut args = ONE_CORE_HELD.to_vec();
    args.push(spool.to_str().unwrap());
    let (code, _, err) = common::run_bounded(&args);
    assert_eq!(code, 1, "{err}");
    assert!(!err.contains("ready with"), "{err}");
    assert!(err.contains("/1"), "the error names no directory: {err}");
    disk.fail_listing_of(None);
    assert!(spool.join("1").exists(), "the directory went: {err}");
    assert_eq!(common::spooled(&spool).len(), sent, "{err}");
    // Once it can be listed, the move takes every message.
    let mut one = Server::start_in(&["--cores", "1"], spool.clone(), None);
    one.log_until(|l| l.contains("folded into 1"));
    assert!(one.terminate().success());
    assert!(!spool.join("1").exists());
    assert_eq!(common::spooled(&spool).len(), sent);
}

#[test]
fn mail_of_removed_cores_with_no_room_to_move_waits_and_is_delivered_once() {
    let disk = common::Tmpfs::mount("24m");
    let spool = disk.path.join("spool");
    let small = ["--spool-segment-size", "1M"];
    let (sent, waiting) = hold_on_two_cores(&spool, &small, "room");
    // The disk fills up: one core's start cannot copy core 1's mail.
    let filler = disk.path.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
    }
    let peer = Peer::start(&[]);
    let route = format!("dest.test=127.0.0.1:{}", peer.port);
    let args = [
        "--route",
        route.as_str(),
        "--cores",
        "1",
        small[0],
        small[1],
        "--metrics",
        "127.0.0.1:0",
    ];
    let mut full = Server::start_in(&args, spool.clone(), None);
    full.log_until(|l| l.contains("no room to move"));
    full.log_until(|l| l.contains("wait there, not delivered"));
    // Core 0's own mail goes; core 1's waits where it is.
    peer.wait_for("core 0's mail", Duration::from_secs(20), |s| {
        s.len() >= sent - waiting
    });
    full.metrics_until(|m| m.contains("postern_queue_depth 0\n"));
    assert!(full.terminate().success());
    assert_eq!(
        peer.stored().len(),
        sent - waiting,
        "core 1's mail went out"
    );
    // Room again: the next start moves it, and it is delivered, once.
    std::fs::remove_file(&filler).unwrap();
    let mut server = Server::start_in(&args, spool.clone(), None);
    peer.wait_for("every message", Duration::from_secs(20), |s| {
        s.len() >= sent
    });
    server.metrics_until(|m| m.contains("postern_queue_depth 0\n"));
    assert!(server.terminate().success());
    assert_each_once(&peer, sent, "delivered more than once");
}

#[test]
fn a_stop_asked_for_during_the_move_to_fewer_cores_ends_the_start_before_ready() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let (sent, _) = hold_on_two_cores(&spool, &[], "stop");
    // The move's sync (the process's first fdatasync) takes 3 s: time to ask for a stop.
    let mut tracer = common::KillOnDrop(
        Command::new("strace")
            .args(["-f", "-qq", "-o", "/dev/null", "-e"])
            .arg("inject=fdatasync:delay_enter=3000000:when=1")
            .arg(env!("CARGO_BIN_EXE_postern"))
            .args(ONE_CORE_HELD)
            .arg(&spool)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !spool.join(".fold-journal").exists() {
        assert!(Instant::now() < deadline, "the move never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    // strace's child is the server.
    let tracer_pid = tracer.0.id();
    let children =
        std::fs::read_to_string(format!("/proc/{tracer_pid}/task/{tracer_pid}/children")).unwrap();
    let server = children.split_whitespace().next().unwrap().to_owned();
    assert!(Command::new("kill")
        .args(["-TERM", &server])
        .status()
        .unwrap()
        .success());
    let mut out = String::new();
    tracer
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(tracer.0.wait().unwrap().success(), "{out}");
    assert!(out.contains("stopped before it was ready"), "{out}");
    assert!(
        !out.contains("ready with"),
        "said ready after a stop: {out}"
    );
    // The move itself finished: nothing lost, nothing twice.
    assert_eq!(common::spooled(&spool).len(), sent);
}
