//! A body goes to the spool in few records however it arrives: a client whose body is all
//! dot-stuffed lines of 512 octets gets one record per 16 KiB, not one per line (each record is
//! also a piece of the message kept in memory until it is delivered).
#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../postern-spool/tests/support/open_files.rs"]
mod open_files;

use std::path::Path;

use common::Server;
use open_files::deleted_but_open;

/// The records of each kind (START 1, BODY 2, END 3, ...) in every segment of the spool.
fn record_kinds(spool: &Path) -> Vec<u8> {
    let mut kinds = Vec::new();
    for core in std::fs::read_dir(spool).unwrap().flatten() {
        if !core.path().is_dir() {
            continue;
        }
        for f in std::fs::read_dir(core.path()).unwrap().flatten() {
            if f.path().extension().is_none_or(|e| e != "seg") {
                continue;
            }
            let data = std::fs::read(f.path()).unwrap();
            kinds.extend(common::segment_records(&data).0.iter().map(|&(_, k)| k));
        }
    }
    kinds
}

#[test]
fn a_body_of_dot_stuffed_lines_goes_in_records_of_16_kib() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let mut server = Server::start_in(&["--cores", "1"], spool.clone(), None);
    let mut c = server.in_data();
    // 4,000 lines of 512 octets after unstuffing: about 2 MiB.
    let line = format!("..{}\r\n", "x".repeat(509));
    let mut body = b"Subject: dots\r\n\r\n".to_vec();
    for _ in 0..4000 {
        body.extend_from_slice(line.as_bytes());
    }
    body.extend_from_slice(b".\r\n");
    c.send(&body);
    let reply = c.line();
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    assert!(server.terminate().success());
    let kinds = record_kinds(&spool);
    let bodies = kinds.iter().filter(|&&k| k == 2).count();
    let size = 4000 * 511;
    assert!(
        bodies <= size / (16 * 1024) + 3,
        "{bodies} body records for {size} octets"
    );
    assert!(bodies >= size / (64 * 1024), "{bodies} body records");
}

#[test]
fn a_refused_body_gives_the_segments_it_filled_back() {
    // 600 KB into 128 KiB segments, then refused as over the size limit (552, after it was
    // read to its end; a client that goes mid-body is the same abort). The segments it filled
    // are deleted and their files let go without another message coming (which a full disk
    // would never let come): a few such bodies would otherwise fill the spool's disk for good.
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let server = Server::start_in(
        &[
            "--cores",
            "1",
            "--spool-segment-size",
            "128k",
            "--max-message-size",
            "500k",
        ],
        spool.clone(),
        None,
    );
    let mut c = server.in_data();
    let line = format!("{}\r\n", "y".repeat(998));
    for _ in 0..600 {
        c.send(line.as_bytes());
    }
    c.send(b".\r\n");
    let reply = c.line();
    assert!(reply.starts_with("552 5.3.4"), "{reply}");
    let pid = server.child.id();
    let files = || std::fs::read_dir(spool.join("0")).unwrap().count();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut held = deleted_but_open(pid, &spool);
    while (!held.is_empty() || files() > 3) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        held = deleted_but_open(pid, &spool);
    }
    assert_eq!(held, Vec::<String>::new());
    assert!(
        files() <= 3,
        "{} files left in the core's directory",
        files()
    );
    // The session goes on: the next message is taken.
    assert!(c.cmd("MAIL FROM:<a@client.test>").starts_with("250"));
}
