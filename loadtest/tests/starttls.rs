//! STARTTLS: every connection upgrades before its first message, and a sink that offers no
//! TLS gets no mail at all rather than mail in cleartext.
#![allow(clippy::unwrap_used)]

mod common;

use common::{certificate, check_record, num, record_path, send, send_json, Sink};

#[test]
fn every_connection_starts_tls() {
    let (_certs, cert, key) = certificate();
    let (_dir, record) = record_path();
    let sink = Sink::start(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--record",
        record.to_str().unwrap(),
    ]);
    let report = send_json(
        &sink.addr,
        &[
            "--messages",
            "200",
            "--connections",
            "4",
            "--starttls",
            "--pipelining",
            "--msgs-per-conn",
            "20",
        ],
    );
    let counters = sink.stop();
    assert_eq!(num(&report, "messages_accepted"), 200);
    // Every connection, 20 messages at most on each: ten or more.
    assert_eq!(
        counters.get("tls_handshakes_total"),
        num(&report, "connections_opened")
    );
    assert!(counters.get("tls_handshakes_total") >= 10);
    assert_eq!(
        counters.get("connections_total"),
        counters.get("tls_handshakes_total")
    );
    assert_eq!(counters.get("tls_failures_total"), 0);
    check_record(&record, 0..200);
}

#[test]
fn no_starttls_offered_means_no_mail() {
    let sink = Sink::start(&[]);
    let out = send(&["--target", &sink.addr, "--messages", "5", "--starttls"]);
    let counters = sink.stop();
    assert_eq!(out.status.code(), Some(1), "nothing accepted is exit 1");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("starttls_not_offered: 5"), "{text}");
    assert_eq!(counters.get("messages_total"), 0);
}

#[test]
fn a_refused_starttls_is_counted_as_such() {
    // STARTTLS offered, then refused with 454: counted as `starttls_refused` (it was
    // `protocol_error`), and the connection ends with QUIT.
    use std::io::{BufRead, Write};
    let (addr, server) = common::one_connection_server(|input, mut out| {
        for line in input.lines() {
            let Ok(line) = line else { break };
            let reply: &[u8] = match line.get(..4).map(str::to_ascii_uppercase).as_deref() {
                Some("EHLO") => b"250-scripted\r\n250 STARTTLS\r\n",
                Some("STAR") => b"454 4.7.0 TLS not available now\r\n",
                Some("QUIT") => b"221 2.0.0 bye\r\n",
                _ => b"500 5.5.1 what\r\n",
            };
            out.write_all(reply).unwrap();
            if line.eq_ignore_ascii_case("QUIT") {
                break;
            }
        }
    });
    let out = send(&["--target", &addr, "--messages", "1", "--starttls"]);
    server.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "nothing accepted is exit 1");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("starttls_refused: 1"), "{text}");
}
