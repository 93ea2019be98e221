//! One server per spool and per port: a second `postern` started on a spool or a port that a
//! running one holds ends at once with a clear error, and the running one keeps its mail.
#![allow(clippy::unwrap_used)]

mod common;

use common::{queue_id, spooled, Server};

/// Runs a second `postern serve` with `args`: its exit code and stderr. One that is still
/// running after 20 s has started where it must not; it is killed and the test fails.
fn second(args: &[&str]) -> (i32, String) {
    let mut all = vec!["serve", "--hold", "--cores", "1"];
    all.extend_from_slice(args);
    let (code, _, err) = common::run_bounded(&all);
    (code, err)
}

#[test]
fn a_second_server_on_a_spool_in_use_stops_and_the_first_keeps_its_mail() {
    let mut first = Server::start(&[]);
    let spool = first.spool.to_str().unwrap().to_owned();
    let (code, err) = second(&["--listen", "127.0.0.1:0", "--spool", &spool]);
    assert_eq!(code, 1, "{err}");
    let pid = first.child.id().to_string();
    assert!(
        err.contains("in use by another postern") && err.contains(&pid),
        "{err}"
    );

    let mut c = first.connect();
    c.line();
    c.cmd("EHLO client.test");
    c.cmd("MAIL FROM:<a@client.test>");
    c.cmd("RCPT TO:<b@localhost>");
    c.cmd("DATA");
    let reply = c.cmd("Subject: kept\r\n\r\nstill here\r\n.");
    assert!(reply.starts_with("250 "), "{reply}");
    let id = queue_id(&reply);
    assert!(first.terminate().success());
    let kept = spooled(&first.spool);
    assert!(
        kept.iter().any(|(qid, ..)| *qid == id),
        "{id} not in {kept:?}"
    );
}

#[test]
fn a_second_server_stops_even_when_the_lock_file_was_deleted() {
    // A clean-up of "stale" lock files while the first server runs: the spool directory is
    // still locked, and the first server keeps the mail it acknowledges.
    let mut first = Server::start(&[]);
    std::fs::remove_file(first.spool.join("postern.lock")).unwrap();
    let spool = first.spool.to_str().unwrap().to_owned();
    let (code, err) = second(&["--listen", "127.0.0.1:0", "--spool", &spool]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("in use by another postern"), "{err}");
    let mut c = first.connect();
    c.line();
    c.cmd("EHLO client.test");
    c.cmd("MAIL FROM:<a@client.test>");
    c.cmd("RCPT TO:<b@localhost>");
    c.cmd("DATA");
    let id = queue_id(&c.cmd("Subject: kept\r\n\r\nstill here\r\n."));
    assert!(first.terminate().success());
    let kept = spooled(&first.spool);
    assert!(
        kept.iter().any(|(qid, ..)| *qid == id),
        "{id} not in {kept:?}"
    );
}

#[test]
fn a_second_server_on_a_port_in_use_stops() {
    let first = Server::start(&[]);
    let spool = tempfile::tempdir().unwrap();
    let port = first.smtp.port();
    for listen in [format!("127.0.0.1:{port}"), format!("0.0.0.0:{port}")] {
        let (code, err) = second(&[
            "--listen",
            &listen,
            "--spool",
            spool.path().join("spool").to_str().unwrap(),
        ]);
        assert_eq!(code, 1, "{listen}: {err}");
        assert!(
            err.contains(&listen) && err.contains("already listens"),
            "{err}"
        );
        assert!(err.contains("--listen: "), "names the flag: {err}");
        // Refused before the spool was touched: not even made.
        assert!(!spool.path().join("spool").exists(), "{listen}");
    }
    // The metrics listener too, named as such.
    let taken = format!("127.0.0.1:{port}");
    let (code, err) = second(&[
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        &taken,
        "--spool",
        spool.path().join("spool").to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--metrics: ") && err.contains(&taken), "{err}");
    // The first still answers.
    let mut c = first.connect();
    assert!(c.line().starts_with("220 "));
    assert!(c.cmd("NOOP").starts_with("250"));
}

#[test]
fn a_restart_on_the_same_port_starts_at_once_after_the_old_server_exits() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    // The kernel takes some milliseconds to tear down an exited server's listener; a restart
    // in that moment is no second server.
    for round in 0..8 {
        let mut server = Server::start_in(&["--listen", &listen], spool.clone(), None);
        let mut c = server.connect();
        assert!(c.line().starts_with("220 "), "round {round}");
        drop(c);
        assert!(server.terminate().success(), "round {round}");
    }
}

/// Every segment file under `spool`.
fn segments(spool: &std::path::Path) -> Vec<std::path::PathBuf> {
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
    out
}

#[test]
fn damaged_records_are_reported_at_start_with_or_without_hold() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    // Without a route the test server holds its mail (--hold).
    let mut first = Server::start_in(&["--cores", "1"], spool.clone(), None);
    let mut c = first.connect();
    c.line();
    c.cmd("EHLO client.test");
    c.cmd("MAIL FROM:<a@client.test>");
    c.cmd("RCPT TO:<b@dest.test>");
    c.cmd("DATA");
    let reply = c.cmd("Subject: soon damaged\r\n\r\nmarker-of-the-body\r\n.");
    assert!(reply.starts_with("250 "), "{reply}");
    assert!(first.terminate().success());
    // One byte of the body changes on disk, as a failing disk might change it.
    let marker = b"marker-of-the-body";
    let mut changed = 0;
    for seg in segments(&spool) {
        let mut bytes = std::fs::read(&seg).unwrap();
        if let Some(at) = bytes.windows(marker.len()).position(|w| w == marker) {
            bytes[at] ^= 0x20;
            std::fs::write(&seg, bytes).unwrap();
            changed += 1;
        }
    }
    assert_eq!(changed, 1, "the body is in one segment");
    let queue = |json: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_postern"));
        cmd.args(["queue", "--spool"]).arg(&spool);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    // The listing says so too, though nothing is left to list.
    let (listing, _) = queue(false);
    assert!(
        listing.contains("1 record(s) skipped as damaged"),
        "{listing}"
    );
    assert!(listing.contains("1 message(s) damaged"), "{listing}");
    let (json, said) = queue(true);
    assert!(
        json.is_empty() && said.contains("damaged"),
        "{json} / {said}"
    );
    // A listing that cannot be written is an error, not a silent success.
    let full = std::process::Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["queue", "--spool"])
        .arg(&spool)
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    assert_eq!(full.status.code(), Some(1), "{full:?}");
    assert!(
        String::from_utf8_lossy(&full.stderr).contains("writing the listing"),
        "{full:?}"
    );
    // With --hold (the test server's default without a route) as without it.
    let delivering = ["--cores", "1", "--route", "dest.test=127.0.0.1:1"];
    let server = Server::start_in(
        &["--cores", "1", "--metrics", "127.0.0.1:0"],
        spool.clone(),
        None,
    );
    let warned = server.log_until(|l| l.contains("the spool has damaged records"));
    assert!(warned.contains("corrupt_records=1"), "{warned}");
    // A monitor sees it too, not only the log.
    let (_, metrics) = server.http_get("/metrics");
    assert!(
        metrics.contains("\npostern_spool_damaged_records 1\n"),
        "{metrics}"
    );
    drop(server);
    // The segment is kept for inspection, not deleted, and every later start says so.
    let aside: Vec<_> = std::fs::read_dir(spool.join("0").join("damaged"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    let server = Server::start_in(&delivering, spool.clone(), None);
    let warned = server.log_until(|l| l.contains("kept for inspection"));
    assert!(warned.contains("damaged"), "{warned}");
}

/// A message whose last records went with damage (the segment holding its end cut short, as
/// a failing disk or a careless copy leaves it) was acknowledged with a queue ID: the start
/// names it and its sender, and so does `postern queue`.
#[test]
fn a_message_whose_end_was_lost_to_damage_is_named_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let small = ["--cores", "1", "--spool-segment-size", "128k"];
    let mut first = Server::start_in(&small, spool.clone(), None);
    let mut c = first.connect();
    c.line();
    c.cmd("EHLO client.test");
    c.cmd("MAIL FROM:<teller@client.test>");
    c.cmd("RCPT TO:<b@dest.test>");
    c.cmd("DATA");
    let line = "x".repeat(76);
    let body: String = (0..2000).map(|_| format!("{line}\r\n")).collect();
    let reply = c.cmd(&format!(
        "Subject: long\r\n\r\n{body}the-last-line-of-the-body\r\n."
    ));
    assert!(reply.starts_with("250 "), "{reply}");
    let id = queue_id(&reply);
    assert!(first.terminate().success());
    // The segment with the body's end (and the END after it) cut short before it.
    let marker = b"the-last-line-of-the-body";
    let mut cut = 0;
    for seg in segments(&spool) {
        let bytes = std::fs::read(&seg).unwrap();
        if let Some(at) = bytes.windows(marker.len()).position(|w| w == marker) {
            let f = std::fs::File::options().write(true).open(&seg).unwrap();
            f.set_len(at as u64).unwrap();
            cut += 1;
        }
    }
    assert_eq!(cut, 1, "the body's end is in one segment");
    let listing = std::process::Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["queue", "--spool"])
        .arg(&spool)
        .output()
        .unwrap();
    let listing = String::from_utf8(listing.stdout).unwrap();
    assert!(
        listing.contains(&format!("-- {id} from teller@client.test (1 recipient)")),
        "{listing}"
    );
    let server = Server::start_in(&small, spool.clone(), None);
    let warned = server.log_until(|l| l.contains("has no end"));
    assert!(
        warned.contains(&format!("queue_id={id}")) && warned.contains("from=teller@client.test"),
        "{warned}"
    );
}
