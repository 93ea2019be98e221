//! Against a server that breaks RFC 2920 (it refuses MAIL, then takes the pipelined RCPT and
//! DATA as if MAIL had gone through), the sender sends no content and counts the message as
//! refused by the MAIL reply, not as accepted by the reply to the lone dot.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;

use common::num;

/// Serves one connection with fixed replies; returns the lines it read.
fn broken_server(listener: TcpListener) -> Vec<String> {
    let (stream, _) = listener.accept().unwrap();
    let mut out = stream.try_clone().unwrap();
    let mut lines = Vec::new();
    out.write_all(b"220 broken.test ESMTP\r\n").unwrap();
    // Bounded: the client sends one message and QUIT, then closes.
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        let verb = line.get(..4).unwrap_or(&line).to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" => b"250-broken.test\r\n250 PIPELINING\r\n",
            "MAIL" => b"550 5.7.1 sender refused\r\n",
            "RCPT" => b"250 2.1.5 ok\r\n",
            "DATA" => b"354 go ahead\r\n",
            "QUIT" => b"221 2.0.0 bye\r\n",
            _ if line == "." => b"250 2.0.0 kept it\r\n",
            _ => b"",
        };
        lines.push(line);
        out.write_all(reply).unwrap();
        if verb == "QUIT" {
            break;
        }
    }
    lines
}

#[test]
fn a_354_after_a_refused_mail_sends_nothing_and_counts_the_refusal() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || broken_server(listener));
    let (out, report) =
        common::send_with_report(&addr, &["--messages", "1", "--pipelining", "--quiet"]);
    let lines = server.join().unwrap();
    // Nothing accepted: exit code 1.
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert_eq!(num(&report, "messages_accepted"), 0, "{report}");
    assert_eq!(num(&report, "messages_refused"), 1, "{report}");
    let data = lines.iter().position(|l| l == "DATA").unwrap();
    assert_eq!(lines[data + 1], ".", "content was sent: {lines:?}");
}
