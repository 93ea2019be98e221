//! `--record` holds every message the sink said 250 to, even when the sink is killed at once
//! after the reply (SIGKILL: no flush at exit).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;

use common::{record_path, Sink};

/// Sends `command` and reads one reply (its last line).
fn command(reader: &mut BufReader<TcpStream>, stream: &mut TcpStream, command: &[u8]) -> String {
    stream.write_all(command).unwrap();
    last_line(reader)
}

fn last_line(reader: &mut BufReader<TcpStream>) -> String {
    loop {
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "connection closed"
        );
        if line.as_bytes().get(3) != Some(&b'-') {
            return line;
        }
    }
}

#[test]
fn a_message_accepted_just_before_a_kill_is_in_the_record() {
    for round in 0..5 {
        let (_dir, record) = record_path();
        let sink = Sink::start(&["--record", record.to_str().unwrap()]);
        let mut stream = TcpStream::connect(&sink.addr).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        assert!(last_line(&mut reader).starts_with("220"));
        for c in [
            &b"EHLO client.test\r\n"[..],
            b"MAIL FROM:<a@client.test>\r\n",
            b"RCPT TO:<b@sink.test>\r\n",
        ] {
            assert!(command(&mut reader, &mut stream, c).starts_with("250"));
        }
        assert!(command(&mut reader, &mut stream, b"DATA\r\n").starts_with("354"));
        let body =
            format!("X-Postern-Load-Seq: {round}\r\nMessage-ID: <k{round}@t>\r\n\r\nx\r\n.\r\n");
        let reply = command(&mut reader, &mut stream, body.as_bytes());
        assert!(reply.starts_with("250"), "{reply}");
        // SIGKILL, at once.
        drop(sink);
        let recorded = std::fs::read_to_string(&record).unwrap();
        assert_eq!(recorded, format!("{round} <k{round}@t>\n"), "round {round}");
    }
}
