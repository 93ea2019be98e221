//! Silent clients are dropped with 421 4.4.2 after the command timeout.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::Server;

#[test]
fn a_silent_client_gets_421_and_is_closed() {
    let server = Server::start(&["--command-timeout", "300ms"]);
    let mut c = server.connect();
    c.line();
    let started = Instant::now();
    assert_eq!(
        c.line(),
        "421 4.4.2 mx.test Timeout exceeded, closing connection"
    );
    assert!(started.elapsed().as_millis() >= 250, "timed out too early");
    assert!(c.closed());
}

#[test]
fn a_client_stalling_inside_data_is_dropped_and_nothing_is_spooled() {
    let mut server = Server::start(&["--command-timeout", "300ms"]);
    let mut c = server.connect();
    c.line();
    c.cmd("EHLO client.test");
    c.cmd("MAIL FROM:<a@b.test>");
    c.cmd("RCPT TO:<c@d.test>");
    c.cmd("DATA");
    c.send(b"Subject: half a message\r\n");
    assert_eq!(
        c.line(),
        "421 4.4.2 mx.test Timeout exceeded, closing connection"
    );
    assert!(server.terminate().success());
    assert!(common::spooled(&server.spool).is_empty());
}

#[test]
fn the_session_time_cap_holds_even_for_a_chatty_client() {
    let server = Server::start(&["--max-session-time", "500ms", "--command-timeout", "10s"]);
    let mut c = server.connect();
    c.line();
    let started = Instant::now();
    loop {
        let reply = c.cmd("NOOP");
        if reply.starts_with("421 4.4.2") {
            // Said as what it is, not as a silent client's timeout.
            assert_eq!(
                reply,
                "421 4.4.2 mx.test Session time limit reached, closing connection"
            );
            break;
        }
        assert_eq!(reply, "250 2.0.0 Ok");
        assert!(
            started.elapsed().as_secs() < 5,
            "the session cap did not bite"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_client_that_never_reads_its_replies_is_dropped_and_frees_its_place() {
    never_reads(&["--command-timeout", "1s", "--max-session-time", "1h"]);
}

#[test]
fn a_client_that_never_reads_its_replies_is_dropped_at_the_session_cap() {
    never_reads(&["--command-timeout", "1h", "--max-session-time", "3s"]);
}

/// A client that sends commands and never reads the replies, on a server with `limits`:
/// its session ends (and its place under the per-address limit comes free) although the
/// client never closes.
fn never_reads(limits: &[&str]) {
    let server = Server::start(&with_one_per_address(limits));
    // Commands, never a read: once our writes have waited half a second straight, the server
    // has stopped reading, because its own write of the replies waits on us.
    let stream = flood(&server, usize::MAX, Duration::from_millis(500));
    // Its write gives up after the command timeout, or at the session's cap; the session
    // ends and its place under --max-connections-per-ip is free again, though the client
    // still has not closed.
    place_comes_free(&server, "a client that does not read still holds its place");
    drop(stream);
}

#[test]
fn a_client_that_reads_a_trickle_is_dropped_at_the_session_cap() {
    let server = Server::start(&with_one_per_address(&[
        "--command-timeout",
        "1h",
        "--max-session-time",
        "3s",
    ]));
    let started = Instant::now();
    // Some megabytes of commands, whose replies fill the socket's buffers.
    let mut stream = flood(&server, 4 << 20, Duration::from_millis(300));
    // Then read a trickle, 4,000 bytes every half second: each write of the server makes a
    // little progress, none waits long, and the session would go on for minutes.
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let trickle = std::thread::spawn(move || {
        let mut buf = [0u8; 4000];
        for _ in 0..120 {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    });
    // The cap (3 s, and 1 s more for a reply being written) ends it: its place is free.
    place_comes_free(
        &server,
        "a client reading a trickle outlives the session cap",
    );
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "freed only after {:?}",
        started.elapsed()
    );
    trickle.join().unwrap();
}

fn with_one_per_address<'a>(limits: &[&'a str]) -> Vec<&'a str> {
    let mut args = limits.to_vec();
    // The floods are NOOPs, which would otherwise end the session at the junk command limit
    // long before its writes wait.
    args.extend(["--max-connections-per-ip", "1", "--max-junk-commands", "0"]);
    args
}

/// Connects with a small receive buffer (so that the replies the server owes fill it soon),
/// reads the banner, then writes NOOPs without reading, until `bytes` are written or the
/// writes have waited `waited` straight. Returns the connection, non-blocking.
fn flood(server: &Server, bytes: usize, waited: Duration) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&server.smtp.into()).unwrap();
    let mut stream: TcpStream = sock.into();
    let mut banner = [0u8; 512];
    let n = stream.read(&mut banner).unwrap();
    assert!(banner[..n].starts_with(b"220 "));
    stream.set_nonblocking(true).unwrap();
    let noops = b"NOOP\r\n".repeat(1000);
    let started = Instant::now();
    let mut sent = 0usize;
    let mut waiting_since: Option<Instant> = None;
    while sent < bytes {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the server never stopped reading"
        );
        match stream.write(&noops) {
            Ok(n) => {
                sent += n;
                waiting_since = None;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if waiting_since.get_or_insert_with(Instant::now).elapsed() >= waited {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            // Already dropped (a limit has run out meanwhile).
            Err(_) => break,
        }
    }
    stream
}

/// Waits (at most 20 s) until a new connection from the same address gets a banner, not
/// the per-address 421; fails with `why` otherwise.
fn place_comes_free(server: &Server, why: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut c = server.connect();
        let line = c.line();
        if line.starts_with("220 ") {
            return;
        }
        assert!(line.starts_with("421 4.7.0"), "{line}");
        assert!(Instant::now() < deadline, "{why}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends `line` a byte every 300 ms (40 bytes or so: 12 s at most; it stops at the first failed
/// write) on a server whose command timeout is 2 s: the 421 must come 2 s after the trickle
/// began, not after its last byte.
fn trickled_until_the_timeout(c: &mut common::Client, line: &'static [u8]) {
    let mut writer = c.stream.try_clone().unwrap();
    let started = Instant::now();
    let trickle = std::thread::spawn(move || {
        for b in line {
            if writer.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    assert_eq!(
        c.line(),
        "421 4.4.2 mx.test Timeout exceeded, closing connection"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(8),
        "{waited:?}"
    );
    trickle.join().unwrap();
}

#[test]
fn a_command_trickled_a_byte_at_a_time_still_gets_its_timeout() {
    // The command timeout runs from the end of the last reply until a command is whole: a
    // byte every 300 ms does not start it again (without that, a client holds its place
    // until the session's cap, an hour by default).
    let server = Server::start(&["--command-timeout", "2s"]);
    let mut c = server.greeted("slow.test");
    trickled_until_the_timeout(&mut c, b"NOOP trickle trickle trickle trickle tri");
}

#[test]
fn a_bdat_line_trickled_between_chunks_still_gets_its_timeout() {
    // Between chunks the next BDAT line is a command: the timeout is not started again by
    // each byte of it, as it is by each read of a chunk's octets.
    let server = Server::start(&["--command-timeout", "2s"]);
    let mut c = server.greeted("slow.test");
    c.cmd("MAIL FROM:<a@b.test>");
    c.cmd("RCPT TO:<c@d.test>");
    c.send(b"BDAT 5\r\nhello");
    assert_eq!(c.line(), "250 2.0.0 5 octets received");
    trickled_until_the_timeout(&mut c, b"BDAT 5 LAST         trickle trickle tri");
}
