//! A reply is timed when it is read, not when the sender gets round to it: replies that come
//! together while the sender then blocks writing a large body keep the times they came at.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, Read, Write};
use std::time::Duration;

use common::{num, send_json};

/// How long the scripted server stops reading after its burst of replies.
const STALL: Duration = Duration::from_secs(2);

/// The scripted server's receive buffer (doubled by the kernel).
const RECEIVE_BUFFER: usize = 256 * 1024;

/// One connection of PIPELINING and CHUNKING: the replies to the first `held` messages are
/// written in one burst once all of them are in, then nothing is read for [`STALL`]; every
/// later command is answered at once.
fn scripted_server(held: usize) -> (String, std::thread::JoinHandle<()>) {
    // A fixed receive buffer, so that a 16 MiB body cannot go into the sockets' buffers
    // while the server stalls (the sender's own buffer grows to 4 MiB at most by default):
    // one the kernel grew after the first bodies could take it whole, and its end of data
    // would then be timed during the stall, its reply after it.
    common::one_connection_server_with_receive_buffer(RECEIVE_BUFFER, move |mut input, mut out| {
        let mut owed = Vec::new();
        let mut bodies = 0;
        let mut line = String::new();
        // Bounded: each pass reads a command, and the sender sends a bounded number.
        loop {
            line.clear();
            if input.read_line(&mut line).unwrap() == 0 {
                return;
            }
            let command = line.trim_end().to_ascii_uppercase();
            let reply: &[u8] = if command.starts_with("EHLO") {
                b"250-scripted\r\n250-PIPELINING\r\n250 CHUNKING\r\n"
            } else if command.starts_with("QUIT") {
                out.write_all(b"221 bye\r\n").unwrap();
                return;
            } else if let Some(rest) = command.strip_prefix("BDAT ") {
                let len: u64 = rest.split(' ').next().unwrap().parse().unwrap();
                std::io::copy(&mut (&mut input).take(len), &mut std::io::sink()).unwrap();
                bodies += 1;
                b"250 2.0.0 taken\r\n"
            } else {
                b"250 ok\r\n"
            };
            if bodies <= held && !command.starts_with("EHLO") {
                owed.extend_from_slice(reply);
                if bodies == held {
                    // The whole burst in one write, then a server busy elsewhere.
                    out.write_all(&owed).unwrap();
                    bodies += 1;
                    std::thread::sleep(STALL);
                }
            } else {
                out.write_all(reply).unwrap();
            }
        }
    })
}

#[test]
fn replies_read_together_keep_their_time_while_a_large_body_is_written() {
    // Two messages in flight; their replies come together. The sender then starts the
    // third, whose 16 MiB body cannot all go into the socket while the server does not read,
    // before it has taken the second message's replies, already read.
    let (addr, server) = scripted_server(2);
    let report = send_json(
        &addr,
        &[
            "--messages",
            "4",
            "--connections",
            "1",
            "--pipelining",
            "--bdat",
            "--window",
            "2",
            "--size",
            "16m",
        ],
    );
    server.join().unwrap();
    assert_eq!(num(&report, "messages_accepted"), 4, "{report}");
    let eod = &report["latency_ms"]["end_of_data"];
    let max = eod["max"].as_f64().unwrap();
    // Half the stall: room for a slow machine's copies of 16 MiB, none for the stall.
    assert!(
        max < STALL.as_secs_f64() * 1000.0 / 2.0,
        "a reply read at once was timed after the stall of {STALL:?}: {eod}"
    );
}
