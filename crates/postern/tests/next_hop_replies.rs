//! Next hops whose replies do not match what was sent (one too many, one too few, never
//! ended), and transactions pipelined to a next hop: each message's outcome is what its own
//! replies said, and one not known is never taken for delivered.
#![allow(clippy::unwrap_used)]

mod common;
mod relaying;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Server;
use relaying::*;

/// A next hop (PIPELINING, CHUNKING) that answers the first message's BDAT with a reply too
/// many, once `go` says so, and refuses every later message with 554. Returns its port and
/// how many BDAT commands it has seen.
fn next_hop_with_a_reply_too_many(
    go: std::sync::mpsc::Receiver<()>,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let seen = std::sync::Arc::new(AtomicUsize::new(0));
    let bdats = seen.clone();
    let (port, _) = batch_next_hop("", move |n| {
        bdats.fetch_add(1, Ordering::SeqCst);
        if n == 0 {
            // Both messages are queued by now: the second waits for this connection.
            go.recv().unwrap();
            Some(b"250 2.0.0 queued\r\n250 2.0.0 a reply nobody asked for\r\n")
        } else {
            Some(b"554 5.7.1 message refused\r\n")
        }
    });
    (port, seen)
}

#[test]
fn a_reply_too_many_between_transactions_does_not_shift_the_next_one_s_replies() {
    // Left unread, the extra reply would answer the next transaction's RSET, RSET's its MAIL,
    // and so on: the refusal of the second message would be taken for RCPT's, and the reply
    // to RCPT for the message's. The second message must be bounced, not counted delivered.
    let (go, wait) = std::sync::mpsc::channel();
    let (port, bdats) = next_hop_with_a_reply_too_many(wait);
    two_messages_the_second_bounced(port, || go.send(()).unwrap());
    assert_eq!(bdats.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// A next hop on a thread for one connection (its reads and writes time out after 30 s, so
/// that a postern that stops reading or writing fails the test rather than hangs it): it
/// greets, then `hop` runs on the connection and its reader. The port, and the thread.
fn one_connection_hop<T: Send + 'static>(
    hop: impl FnOnce(TcpStream, BufReader<TcpStream>) -> T + Send + 'static,
) -> (u16, std::thread::JoinHandle<T>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let thread = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        // Each reply goes out as it is written: one held back (Nagle, behind replies not yet
        // acknowledged) would be thrown away by a close that resets the connection, as the
        // hops that close with a body unread do.
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(b"220 hop.test ESMTP\r\n").unwrap();
        let r = BufReader::new(s.try_clone().unwrap());
        hop(s, r)
    });
    (port, thread)
}

/// Answers command lines until DATA: EHLO with `250 hop.test` (no extension), anything else
/// with `250`. Whether DATA came (not the connection's end).
fn until_data(s: &mut TcpStream, r: &mut BufReader<TcpStream>) -> bool {
    let mut line = String::new();
    while r.read_line(&mut line).unwrap_or(0) > 0 {
        if line.starts_with("DATA") {
            return true;
        }
        let reply: &[u8] = if line.starts_with("EHLO") {
            b"250 hop.test\r\n"
        } else {
            b"250 2.0.0 ok\r\n"
        };
        s.write_all(reply).unwrap();
        line.clear();
    }
    false
}

#[test]
fn a_refusal_taken_for_a_deferral_is_logged_with_the_transient_class() {
    // A 552 to RCPT is a deferral (RFC 5321 4.5.3.1.10); the log's dsn says 4.2.2, as the
    // reports do, not the reply's 5.2.2.
    let (port, _) = one_connection_hop(|mut s, mut r| {
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            let reply: &[u8] = if line.starts_with("EHLO") {
                b"250 hop.test\r\n"
            } else if line.starts_with("RCPT") {
                b"552 5.2.2 over quota\r\n"
            } else if line.starts_with("QUIT") {
                b"221 2.0.0 bye\r\n"
            } else {
                b"250 2.0.0 ok\r\n"
            };
            if s.write_all(reply).is_err() {
                return;
            }
            line.clear();
        }
    });
    let (_server, deferred) = first_deferral(port, &[], "<quota@t>");
    assert!(deferred.contains("552 5.2.2 over quota"), "{deferred}");
    assert!(deferred.contains("dsn=\"4.2.2\""), "{deferred}");
}

/// A small message `id` sent through [`routed_to_port`]`(port, extra)`: the server, and the
/// log line of the first deferral.
fn first_deferral(port: u16, extra: &[&str], id: &str) -> (Server, String) {
    let server = routed_to_port(port, extra);
    send(&server, "a@origin.test", &["b@dest.test"], id, "x\r\n");
    let deferred = server.log_until(|l| l.contains("status=\"deferred\""));
    (server, deferred)
}

/// postern on one core routing dest.test to `port`, retries an hour apart, with `extra`.
fn routed_to_port(port: u16, extra: &[&str]) -> Server {
    let route = format!("dest.test=127.0.0.1:{port}");
    let mut args = vec!["--cores", "1", "--route", &route, "--retry-initial", "1h"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

#[test]
fn a_long_reply_line_to_the_data_is_read_and_the_message_delivered_once() {
    // RFC 5321 caps a reply line at 512 octets; some servers write longer ones. A 250 to the
    // data with 10,000 octets of text is still the answer to the message: taken as an error,
    // the message would be sent again at every retry.
    let long: &'static str = Box::leak(format!("250 2.0.0 {}\r\n", "y".repeat(10_000)).into());
    let (port, stored, _) = scripted_next_hop(|_, _| None, Act::Say(long));
    let server = routed_to_port(port, &[]);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<long@t>",
        "x\r\n",
    );
    let outcome = server.log_until(|l| l.contains("status="));
    assert!(outcome.contains("status=\"sent\""), "{outcome}");
    stored.recv_timeout(Duration::from_secs(10)).unwrap();
}

#[test]
fn a_reply_line_longer_than_a_read_to_the_data_is_taken_and_the_message_delivered_once() {
    // Past what the client holds of a line (16 KiB), the line's start is kept and its tail
    // skipped: still the answer to the message, on every kind of next hop. Taken as an
    // error, the message was sent again at every retry.
    let long: &'static str = Box::leak(format!("250 2.0.0 {}\r\n", "y".repeat(40_000)).into());
    for (ehlo, extra) in EACH_KIND_OF_NEXT_HOP {
        let (port, stored, _) = scripted_next_hop(
            move |_, line| line.starts_with("EHLO").then_some(Act::Say(ehlo)),
            Act::Say(long),
        );
        let outcome = sent_once(port, extra, &stored, "<longer@t>");
        assert!(outcome.contains("250 2.0.0 yyy"), "{outcome}");
    }
}

/// Next hops of each kind a reply is read from, by their EHLO reply, with postern's extra
/// flags: PIPELINING and CHUNKING (the end of a BDAT body, for a message alone and in a
/// pipelined batch), PIPELINING alone (a pipelined DATA), and neither (a DATA sent a command
/// at a time).
const EACH_KIND_OF_NEXT_HOP: [(&str, &[&str]); 4] = [
    (
        "250-scripted.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n",
        &[],
    ),
    (
        "250-scripted.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n",
        &["--max-transactions-in-flight", "8"],
    ),
    ("250-scripted.test\r\n250 PIPELINING\r\n", &[]),
    ("250 scripted.test\r\n", &[]),
];

/// Sends one message, `id`, through postern started with `extra` to the scripted next hop on
/// `port`, and checks that its first outcome is a delivery, on the first connection, in one
/// copy. Returns that outcome's log line.
fn sent_once(port: u16, extra: &[&str], stored: &StoredRx, id: &str) -> String {
    let server = routed_to_port(port, extra);
    send(&server, "a@origin.test", &["b@dest.test"], id, "x\r\n");
    let outcome = server.log_until(|l| l.contains("status="));
    assert!(outcome.contains("status=\"sent\""), "{extra:?}: {outcome}");
    let (n, body) = stored.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(n, 0);
    assert!(body.contains(&format!("Message-ID: {id}")), "{body}");
    assert!(stored.try_recv().is_err(), "one copy only");
    outcome
}

#[test]
fn a_message_answered_with_an_addressing_status_is_delivered_once_a_noop_finds_the_replies_in_step()
{
    // RFC 5321 4.2.1 makes any 2yz to the data a success, and some next hops give it a 2.1.x
    // status (RFC 3463 leaves the detail to them). That is also what a RCPT reply looks like
    // when a reply nobody asked for has pushed the others along, so a NOOP asks whether the
    // replies are in step; a next hop in step answers 250, and the message is delivered,
    // once. Taken as out of step, it would be sent again at every retry and then returned
    // as undelivered.
    for (ehlo, extra) in EACH_KIND_OF_NEXT_HOP {
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = lines.clone();
        let (port, stored, _) = scripted_next_hop(
            move |n, line| {
                seen.lock().unwrap().push((n, line.trim_end().to_owned()));
                line.starts_with("EHLO").then_some(Act::Say(ehlo))
            },
            Act::Say("250 2.1.0 Ok, message accepted\r\n"),
        );
        let outcome = sent_once(port, extra, &stored, "<addressed@t>");
        assert!(
            outcome.contains("250 2.1.0 Ok, message accepted"),
            "{outcome}"
        );
        let lines = lines.lock().unwrap();
        assert!(
            lines.iter().any(|(n, l)| *n == 0 && l == "NOOP"),
            "{ehlo:?}: {lines:?}"
        );
    }
}

#[test]
fn blank_lines_around_a_next_hop_s_replies_are_no_replies() {
    // A line end too many after a reply (or before one, or after the 354) is no reply: it
    // shifts nothing, and taken for a reply nobody asked for it had every message sent again
    // at each retry and then returned as undelivered.
    for (ehlo, extra) in EACH_KIND_OF_NEXT_HOP {
        let (port, stored, _) = scripted_next_hop_going(
            "127.0.0.1:0",
            move |_, line| match line.get(..4) {
                Some("EHLO") => Some(Act::Say(ehlo)),
                Some("MAIL") => Some(Act::Say("\r\n250 2.1.0 ok\r\n")),
                _ => None,
            },
            "354 go\r\n\r\n",
            Act::Say("250 2.0.0 queued\r\n\r\n"),
        );
        sent_once(port, extra, &stored, "<blank@t>");
    }
}

#[test]
fn a_reply_of_endless_lines_is_given_up_past_its_line_cap_not_at_its_timeout() {
    // A next hop that answers EHLO with continuation lines, as fast as it can write them and
    // never ending: every read is ready at once, and the core would read them until the
    // reply's timeout (minutes at the defaults), its other sessions waiting meanwhile. Past
    // 1,000 lines the reply is given up, the connection closed.
    let (port, flood) = one_connection_hop(|mut s, mut r| {
        let mut ehlo = String::new();
        r.read_line(&mut ehlo).unwrap();
        s.write_all(b"250-hop.test\r\n").unwrap();
        let lines = b"250-x\r\n".repeat(64 * 1024);
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            match s.write_all(&lines) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
                // Closed by postern.
                Err(_) => return true,
            }
        }
        false
    });
    let (mut server, deferred) =
        first_deferral(port, &["--smtp-greeting-timeout", "5m"], "<flood@t>");
    assert!(
        deferred.contains("reply of more than 1000 lines"),
        "{deferred}"
    );
    assert!(flood.join().unwrap(), "the connection was kept for 30 s");
    assert!(server.terminate().success());
}

#[test]
fn a_refusal_sent_before_the_next_hop_broke_off_the_body_is_the_message_s_outcome() {
    // A next hop without SIZE that refuses a large body part way (552) and closes with the
    // rest unread (a reset): the write breaks, and the refusal, already sent, decides. It
    // was taken for a broken connection, and the message sent again at every retry.
    let outcome = broken_off_after("552 5.3.4 Message too big for this system\r\n");
    assert!(outcome.contains("status=\"bounced\""), "{outcome}");
    assert!(outcome.contains("552 5.3.4 Message too big"), "{outcome}");
}

#[test]
fn a_421_sent_before_the_next_hop_broke_off_the_body_defers_with_its_words() {
    let outcome = broken_off_after("421 4.3.2 hop.test shutting down\r\n");
    assert!(outcome.contains("status=\"deferred\""), "{outcome}");
    assert!(
        outcome.contains("421 4.3.2 hop.test shutting down"),
        "{outcome}"
    );
}

/// A message of 16 MiB from `<>` to a next hop (no SIZE, PIPELINING or CHUNKING) that reads
/// 64 KiB of its body, says `reply` and closes with the rest unread (a reset); the log line of
/// its outcome.
fn broken_off_after(reply: &'static str) -> String {
    let (port, hop) = one_connection_hop(move |mut s, mut r| {
        assert!(until_data(&mut s, &mut r));
        s.write_all(b"354 go\r\n").unwrap();
        let mut part = vec![0u8; 64 * 1024];
        r.read_exact(&mut part).unwrap();
        s.write_all(reply.as_bytes()).unwrap();
        // Closed with the rest of the body unread: a reset.
    });
    let mut server = routed_to_port(port, &[]);
    // 16 MiB: more than the socket buffers on the way take, so the write does break off.
    let body =
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n".repeat(256 * 1024);
    send(&server, "", &["b@dest.test"], "<large@t>", &body);
    hop.join().unwrap();
    let outcome = server.log_until(|l| l.contains("to=\"b@dest.test\"") && l.contains("status="));
    assert!(server.terminate().success());
    outcome
}

#[test]
fn a_refusal_sent_before_the_next_hop_broke_off_a_batch_s_body_is_its_outcome() {
    // The same in a batch (transactions pipelined into each other): the transaction whose
    // BDAT body's write broke off gets the refusal its next hop sent before closing.
    let (port, hop) = one_connection_hop(|mut s, mut r| {
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            if line.starts_with("EHLO") {
                s.write_all(b"250-hop.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n")
                    .unwrap();
            } else if line.starts_with("BDAT") {
                let mut part = vec![0u8; 64 * 1024];
                r.read_exact(&mut part).unwrap();
                s.write_all(b"552 5.3.4 Message too big for this system\r\n")
                    .unwrap();
                // Closed with the rest of the body unread: a reset.
                return;
            } else {
                s.write_all(b"250 2.0.0 ok\r\n").unwrap();
            }
            line.clear();
        }
    });
    let mut server = routed_to_port(port, &["--max-transactions-in-flight", "2"]);
    let body =
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n".repeat(256 * 1024);
    send(&server, "", &["b@dest.test"], "<large@t>", &body);
    hop.join().unwrap();
    let outcome = server.log_until(|l| l.contains("to=\"b@dest.test\"") && l.contains("status="));
    assert!(outcome.contains("status=\"bounced\""), "{outcome}");
    assert!(outcome.contains("552 5.3.4 Message too big"), "{outcome}");
    assert!(server.terminate().success());
}

#[test]
fn a_batch_s_body_whose_write_times_out_leaves_the_replies_before_it_standing() {
    // A batch of a small message and a large one: the next hop takes the first (its replies
    // are sent), then stops reading in the middle of the second's body. The second's write
    // times out and gets no reply, as expected of a body that did not all go out: the first
    // is still delivered on its own replies, not deferred and sent again.
    let (port, hop) = one_connection_hop(|mut s, mut r| {
        let mut line = String::new();
        let mut bodies = 0;
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            if line.starts_with("EHLO") {
                s.write_all(b"250-hop.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n")
                    .unwrap();
            } else if let Some(args) = line.strip_prefix("BDAT ") {
                bodies += 1;
                if bodies == 2 {
                    // Reads no more, and keeps the connection until postern ends it.
                    let mut rest = Vec::new();
                    std::thread::sleep(Duration::from_secs(5));
                    let _ = r.read_to_end(&mut rest);
                    return;
                }
                let n: usize = args.split_whitespace().next().unwrap().parse().unwrap();
                let mut body = vec![0u8; n];
                r.read_exact(&mut body).unwrap();
                s.write_all(b"250 2.0.0 queued\r\n").unwrap();
            } else {
                s.write_all(b"250 2.0.0 ok\r\n").unwrap();
            }
            line.clear();
        }
    });
    let large =
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n".repeat(256 * 1024);
    let mut server = released_in_one_batch(
        port,
        &[("<small@t>", "x\r\n"), ("<large@t>", &large)],
        &["--smtp-data-block-timeout", "1s"],
    );
    // The small one is taken on its own replies; the large one is deferred for its write.
    server.log_until(|l| l.contains("status=\"sent\""));
    server.log_until(|l| l.contains("status=\"deferred\"") && l.contains("timed out"));
    hop.join().unwrap();
    let all = server.terminate_for_log();
    let sent = all
        .lines()
        .filter(|l| l.contains("status=\"sent\""))
        .count();
    assert_eq!(sent, 1, "{all}");
}

#[test]
fn a_reply_behind_the_354_is_not_taken_for_the_message_s_answer() {
    // A next hop (no PIPELINING, no CHUNKING) whose 354 comes with a 250 behind it, and
    // which refuses the message after its dot: read after the body, that 250 would pass for
    // the answer to the message, counted delivered. It is given up unsent instead.
    let (port, hop) = one_connection_hop(|mut s, mut r| {
        assert!(until_data(&mut s, &mut r));
        s.write_all(b"354 go\r\n250 2.0.0 Ok\r\n").unwrap();
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            if line == ".\r\n" {
                s.write_all(b"554 5.7.1 rejected\r\n").unwrap();
                return true;
            }
            line.clear();
        }
        false
    });
    let (mut server, deferred) = first_deferral(port, &[], "<behind@t>");
    assert!(deferred.contains("after the 354"), "{deferred}");
    assert!(!hop.join().unwrap(), "the body was sent");
    let log = server.terminate_for_log();
    assert!(!log.contains("status=\"delivered\""), "{log}");
}

/// Sends two messages through one connection to the next hop on `port` (retries 300 ms
/// apart), calls `then`, and checks that the second one, which the next hop refuses with
/// `554 5.7.1 message refused`, is bounced to its sender.
fn two_messages_the_second_bounced(port: u16, then: impl FnOnce()) {
    let origin = Peer::start(&[]);
    let server = one_connection_to(port, &origin, &[]);
    for id in ["<first@t>", "<second@t>"] {
        send(&server, "a@origin.test", &["b@dest.test"], id, "x\r\n");
    }
    then();
    let (bounce, text) = origin.first("the second message's bounce");
    assert_eq!(bounce.mail_from, "<>");
    assert!(text.contains("554 5.7.1 message refused"), "{text}");
    assert!(text.contains("<second@t>"), "{text}");
}

/// A next hop (PIPELINING, CHUNKING) that answers each group of commands in one write, as
/// pipelining servers do (once the group's last command is in, or nothing more is waiting to
/// be read: a client that does not pipeline gets each reply), takes the first message, and
/// slips a reply too many in front of the next group's replies, whose BDAT it refuses (as
/// every later one). Returns its port, and a word for each session that got the reply too
/// many: whether it ended with QUIT (true) or with the client's close.
fn next_hop_with_a_late_reply_too_many() -> (u16, std::sync::mpsc::Receiver<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (ended, ends) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut messages = 0;
        for stream in listener.incoming().take(4) {
            let mut strayed = false;
            let mut quit = false;
            let Ok(mut stream) = stream else { return };
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut out = b"220 hop.test ESMTP\r\n".to_vec();
            'session: loop {
                if !out.is_empty() && stream.write_all(&std::mem::take(&mut out)).is_err() {
                    break;
                }
                // The replies to a group go out together, after its last command.
                let mut flush = false;
                while !flush {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break 'session;
                    }
                    let verb = line
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_ascii_uppercase();
                    match verb.as_str() {
                        "EHLO" => {
                            out.extend_from_slice(
                                b"250-hop.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n",
                            );
                            flush = true;
                        }
                        "RSET" if messages == 1 => {
                            strayed = true;
                            out.extend_from_slice(b"250 2.0.0 a reply nobody asked for\r\n");
                            out.extend_from_slice(b"250 2.0.0 ok\r\n");
                        }
                        "BDAT" => {
                            let n: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
                            let mut body = vec![0u8; n];
                            reader.read_exact(&mut body).unwrap();
                            messages += 1;
                            out.extend_from_slice(if messages == 1 {
                                b"250 2.0.0 queued\r\n".as_slice()
                            } else {
                                b"554 5.7.1 message refused\r\n".as_slice()
                            });
                            flush = true;
                        }
                        "QUIT" => {
                            quit = true;
                            let _ = stream.write_all(b"221 2.0.0 bye\r\n");
                            break 'session;
                        }
                        _ => out.extend_from_slice(b"250 2.0.0 ok\r\n"),
                    }
                    flush |= reader.buffer().is_empty();
                }
            }
            if strayed {
                let _ = ended.send(quit);
            }
        }
    });
    (port, ends)
}

#[test]
fn a_reply_too_many_within_the_next_group_leaves_its_outcome_unknown_not_delivered() {
    // The reply too many comes only once the next group is written: RSET takes it, MAIL takes
    // RSET's reply, RCPT MAIL's and BDAT RCPT's, and the refusal is left over. Seen after the
    // last reply, it makes the outcome unknown: the message is tried again, and bounced.
    let (port, ends) = next_hop_with_a_late_reply_too_many();
    two_messages_the_second_bounced(port, || ());
    // The session found out of step is still ended with QUIT (RFC 5321 4.1.1.10).
    assert_eq!(ends.recv_timeout(Duration::from_secs(20)), Ok(true));
}

/// Greets a client of a scripted next hop (reads time out after 30 s); returns its reader.
fn greeted_by_hop(stream: &mut TcpStream) -> BufReader<TcpStream> {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let _ = stream.write_all(b"220 hop.test ESMTP\r\n");
    BufReader::new(stream.try_clone().unwrap())
}

/// The next command line and its verb in capitals; None once the client is gone.
fn command_line(reader: &mut BufReader<TcpStream>) -> Option<(String, String)> {
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return None;
    }
    let verb = line
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_uppercase();
    Some((line, verb))
}

/// The Message-IDs a next hop took.
type Taken = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// Reads the body a `BDAT n LAST` line announced and records its Message-ID as taken.
fn take_bdat_body(line: &str, reader: &mut BufReader<TcpStream>, record: &Taken) {
    let n: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = vec![0u8; n];
    reader.read_exact(&mut body).unwrap();
    let text = String::from_utf8_lossy(&body).into_owned();
    let id = text.lines().find_map(|l| l.strip_prefix("Message-ID: "));
    record
        .lock()
        .unwrap()
        .push(id.unwrap_or_default().to_owned());
}

/// What the next hop took once it has `n` messages (15 s at most).
fn taken_once(taken: &Taken, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while taken.lock().unwrap().len() < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    taken.lock().unwrap().clone()
}

/// A next hop offering PIPELINING, CHUNKING and `extensions` (EHLO lines, each ending in CR
/// LF), answering each command as it comes. Each body (`BDAT n LAST`) gets what `answer`
/// says for it, given how many bodies came before; `None` is no answer at all. A message
/// answered 250 is taken: its Message-ID is recorded.
fn batch_next_hop(
    extensions: &'static str,
    answer: impl Fn(usize) -> Option<&'static [u8]> + Send + 'static,
) -> (u16, Taken) {
    let (port, taken, _) = batch_next_hop_told(extensions, Duration::from_secs(30), answer);
    (port, taken)
}

/// [`batch_next_hop`] that ends a connection idle for `idle` with a 421 (as Postfix's
/// `smtpd_timeout`).
fn batch_next_hop_idle(
    extensions: &'static str,
    idle: Duration,
    answer: impl Fn(usize) -> Option<&'static [u8]> + Send + 'static,
) -> (u16, Taken) {
    let (port, taken, _) = batch_next_hop_told(extensions, idle, answer);
    (port, taken)
}

/// [`batch_next_hop_idle`] that also tells what happened to its connections, in order:
/// `connected`, `QUIT` (a client that said goodbye) and `closed` (however it ended).
fn batch_next_hop_told(
    extensions: &'static str,
    idle: Duration,
    answer: impl Fn(usize) -> Option<&'static [u8]> + Send + 'static,
) -> (u16, Taken, Taken) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let taken = Taken::default();
    let record = taken.clone();
    let events = Taken::default();
    let event = events.clone();
    let tell = move |what: &str| event.lock().unwrap().push(what.to_owned());
    std::thread::spawn(move || {
        let mut bodies = 0;
        let ehlo = format!("250-hop.test\r\n250-PIPELINING\r\n{extensions}250 CHUNKING\r\n");
        for stream in listener.incoming().take(8) {
            let Ok(mut stream) = stream else { return };
            tell("connected");
            let mut reader = greeted_by_hop(&mut stream);
            stream.set_read_timeout(Some(idle)).unwrap();
            loop {
                let Some((line, verb)) = command_line(&mut reader) else {
                    // Gone, or idle too long: a client still there is told so.
                    let _ = stream.write_all(b"421 4.4.2 hop.test Error: timeout exceeded\r\n");
                    break;
                };
                let reply: &[u8] = match verb.as_str() {
                    "EHLO" => ehlo.as_bytes(),
                    "BDAT" => {
                        let n: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
                        let mut body = vec![0u8; n];
                        reader.read_exact(&mut body).unwrap();
                        bodies += 1;
                        let Some(reply) = answer(bodies - 1) else {
                            continue;
                        };
                        if reply.starts_with(b"250") {
                            let text = String::from_utf8_lossy(&body).into_owned();
                            let id = text.lines().find_map(|l| l.strip_prefix("Message-ID: "));
                            record
                                .lock()
                                .unwrap()
                                .push(id.unwrap_or_default().to_owned());
                        }
                        reply
                    }
                    "QUIT" => {
                        tell("QUIT");
                        let _ = stream.write_all(b"221 2.0.0 bye\r\n");
                        break;
                    }
                    _ => b"250 2.0.0 ok\r\n",
                };
                if stream.write_all(reply).is_err() {
                    break;
                }
            }
            tell("closed");
        }
    });
    (port, taken, events)
}

/// Messages (Message-ID, body) queued while held (a server that routes nowhere holds), then
/// released together to the next hop on `port`, pipelined into one batch; with `extra` flags.
fn released_in_one_batch(port: u16, messages: &[(&str, &str)], extra: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let mut held = Server::start_in(&["--cores", "1"], spool.clone(), None);
    for (id, body) in messages {
        send(&held, "a@origin.test", &["b@dest.test"], id, body);
    }
    assert!(held.terminate().success());
    let route = format!("dest.test=127.0.0.1:{port}");
    let mut args = vec![
        "--route",
        &route,
        "--cores",
        "1",
        "--max-transactions-in-flight",
        "8",
        "--metrics",
        "127.0.0.1:0",
        "--retry-initial",
        "300ms",
        "--retry-max",
        "300ms",
    ];
    args.extend_from_slice(extra);
    // The spool's directory lives as long as the server that owns it.
    Server::start_in(&args, spool, Some(dir))
}

/// Waits, for `limit` at most, until the next hop has taken the message `id`.
fn taken_within(taken: &Taken, id: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !taken.lock().unwrap().iter().any(|t| t == id) {
        assert!(
            Instant::now() < deadline,
            "{id} was never taken: {:?}",
            taken.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_batch_broken_off_after_an_addressing_status_to_a_body_leaves_that_outcome_unknown() {
    // The first message's body is answered `250 2.1.5`, and the next hop then closes (a 421
    // in place of the second transaction's RSET reply). A success with an addressing status
    // is known only once a NOOP finds the replies in step, and there is none to ask: the
    // first message's outcome is not known, and it goes again (a duplicate at worst, never
    // a refusal pushed along taken for a delivery).
    let (port, taken) = batch_next_hop("", |n| {
        Some(if n == 0 {
            b"250 2.1.5 ok\r\n421 4.3.2 closing\r\n"
        } else {
            b"250 2.0.0 queued\r\n"
        })
    });
    let _server = released_in_one_batch(port, &[("<a1@t>", "x\r\n"), ("<a2@t>", "x\r\n")], &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while taken
        .lock()
        .unwrap()
        .iter()
        .filter(|t| *t == "<a1@t>")
        .count()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "not sent again: {:?}",
            taken.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_batch_short_of_a_reply_leaves_every_outcome_in_it_unknown() {
    // Three messages pipelined into one another; the next hop never answers the second one's
    // data (nor takes it). Each later reply then answers the command before its own: the
    // third's RSET reply is taken for the second message's, and the batch runs out of time
    // on the last. None of its outcomes is known: the second message must be tried again and
    // taken, not counted delivered.
    let (port, taken) = batch_next_hop("", |n| (n != 1).then_some(b"250 2.0.0 queued\r\n"));
    let _server = released_in_one_batch(
        port,
        &[
            ("<b1@t>", "x\r\n"),
            ("<b2@t>", "x\r\n"),
            ("<b3@t>", "x\r\n"),
        ],
        &[
            "--smtp-mail-timeout",
            "1s",
            "--smtp-rcpt-timeout",
            "1s",
            "--smtp-data-done-timeout",
            "1s",
        ],
    );
    taken_within(&taken, "<b2@t>", Duration::from_secs(20));
}

#[test]
fn a_batch_short_of_a_reply_ended_by_the_next_hop_s_own_timeout_leaves_every_outcome_unknown() {
    // As above, but postern waits the default 10 minutes for the missing reply, and the next
    // hop, silent the while, ends the connection first (421 after 9 s idle). The replies read
    // before that were each the command before its own: the second message must not count as
    // delivered on the third RSET's 250.
    let idle = Duration::from_secs(9);
    let (port, taken) =
        batch_next_hop_idle("", idle, |n| (n != 1).then_some(b"250 2.0.0 queued\r\n"));
    let _server = released_in_one_batch(
        port,
        &[
            ("<b1@t>", "x\r\n"),
            ("<b2@t>", "x\r\n"),
            ("<b3@t>", "x\r\n"),
        ],
        &[],
    );
    taken_within(&taken, "<b2@t>", Duration::from_secs(30));
}

#[test]
fn refusals_a_next_hop_slows_down_before_it_closes_stay_refusals() {
    // A next hop (PIPELINING, CHUNKING) that answers each unknown recipient after 0.8 s and
    // ends the session with a 421 at the eleventh, as Postfix does past its error limits: some
    // 9 s from the batch's write to its end, but never 8 s without a reply. The ten refusals
    // read are the next hop's own: those recipients bounce now, and the rest is tried again.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let taken = Taken::default();
    let record = taken.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(4) {
            let Ok(mut stream) = stream else { return };
            let mut reader = greeted_by_hop(&mut stream);
            let mut errors = 0;
            while let Some((line, verb)) = command_line(&mut reader) {
                let reply: &[u8] = match verb.as_str() {
                    "EHLO" => b"250-hop.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n",
                    "RCPT" if line.contains("<unknown") => {
                        std::thread::sleep(Duration::from_millis(800));
                        errors += 1;
                        if errors > 10 {
                            let _ = stream.write_all(b"421 4.7.0 hop.test too many errors\r\n");
                            break;
                        }
                        b"550 5.1.1 unknown user\r\n"
                    }
                    "BDAT" => {
                        take_bdat_body(&line, &mut reader, &record);
                        b"250 2.0.0 queued\r\n"
                    }
                    "QUIT" => {
                        let _ = stream.write_all(b"221 2.0.0 bye\r\n");
                        break;
                    }
                    _ => b"250 2.0.0 ok\r\n",
                };
                if stream.write_all(reply).is_err() {
                    break;
                }
            }
        }
    });
    let origin = Peer::start(&[]);
    // Pipelined batches, where a break after a long silence leaves every reply unknown.
    let mut server = one_connection_to(port, &origin, &["--max-transactions-in-flight", "8"]);
    let unknown: Vec<String> = (0..11).map(|i| format!("unknown{i}@dest.test")).collect();
    let mut rcpts = vec!["b@dest.test"];
    rcpts.extend(unknown.iter().map(String::as_str));
    send(&server, "a@origin.test", &rcpts, "<slowed@t>", "x\r\n");
    let (_, text) = origin.first("the refused recipients' bounce");
    for i in 0..10 {
        assert!(
            text.contains(&format!("Final-Recipient: rfc822; unknown{i}@dest.test")),
            "{text}"
        );
    }
    assert!(
        !text.contains("Final-Recipient: rfc822; b@dest.test"),
        "{text}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while taken.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "b@ was never delivered");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Failed at the first attempt, not put off to a later one.
    let log = server.terminate_for_log();
    let put_off: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("to=\"unknown0@dest.test\"") && l.contains("status=\"deferred\""))
        .collect();
    assert!(put_off.is_empty(), "{put_off:#?}");
    // The session the next hop ended is in the log, with its words: the transactions it had
    // not answered went again without a line of their own.
    assert!(
        log.lines()
            .any(|l| l.contains("the next hop broke the session off")
                && l.contains("421 4.7.0 hop.test too many errors")
                && l.contains(&format!("127.0.0.1:{port}"))),
        "{log}"
    );
}

#[test]
fn a_batch_ending_in_a_message_over_the_next_hop_s_size_keeps_its_outcomes() {
    // Two messages released together in one batch; the second is over the next hop's SIZE and
    // refused before it is sent, leaving the RSET written for it awaited. Its reply, after the
    // first message's, is not a reply too many: the first message is delivered once.
    let (port, taken, events) =
        batch_next_hop_told("250-SIZE 2000\r\n", Duration::from_secs(30), |_| {
            Some(b"250 2.0.0 queued\r\n")
        });
    let big = ("y".repeat(76) + "\r\n").repeat(64);
    // One connection, so that both go in its one batch.
    let mut server = released_in_one_batch(
        port,
        &[("<small@t>", "x\r\n"), ("<big@t>", &big)],
        &["--max-connections-per-destination", "1"],
    );
    // The big one fails for good (and so does its bounce: its sender's domain goes nowhere).
    server.metrics_until(|m| counter(m, "postern_recipients_failed_total") >= 1);
    server.metrics_until(|m| m.contains("postern_recipients_delivered_total 1\n"));
    let log = server.terminate_for_log();
    assert!(!log.contains("out of step"), "{log}");
    assert_eq!(*taken.lock().unwrap(), ["<small@t>"]);
    // The big one is refused before anything is written for it (no RSET whose reply would
    // be left unread, so that the idle connection looked out of step and was given up): the
    // one connection stays, and ends with QUIT at the stop.
    let deadline = Instant::now() + Duration::from_secs(10);
    while events.lock().unwrap().last().map(String::as_str) != Some("closed")
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        *events.lock().unwrap(),
        ["connected", "QUIT", "closed"],
        "{log}"
    );
}

#[test]
fn a_next_hop_that_never_ends_its_reply_is_given_up_and_does_not_hold_the_core() {
    // The reply to MAIL is continuation lines without end, as fast as the socket takes them:
    // every read is ready at once, and the wait would end only at its deadline (minutes
    // here); the reply is given up past its line cap instead.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Told once the flood is under way (its first block written).
    let (flooding, under_way) = std::sync::mpsc::channel();
    let hop = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        stream.write_all(b"220 hop.test ESMTP\r\n").unwrap();
        reader.read_line(&mut line).unwrap();
        stream.write_all(b"250 hop.test\r\n").unwrap();
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("MAIL"), "{line}");
        let flood = b"250-x\r\n".repeat(64 * 1024);
        let start = Instant::now();
        // Until postern gives up (the write fails), for 30 s at most.
        while start.elapsed() < Duration::from_secs(30) {
            if stream.write_all(&flood).is_err() {
                break;
            }
            let _ = flooding.send(());
        }
        (start.elapsed(), Instant::now())
    });
    let route = format!("dest.test=127.0.0.1:{port}");
    // MAIL's reply is waited for as long as the longest of the envelope's timeouts.
    let server = Server::start(&[
        "--route",
        &route,
        "--smtp-mail-timeout",
        "5m",
        "--smtp-rcpt-timeout",
        "5m",
        "--smtp-data-init-timeout",
        "5m",
        "--cores",
        "1",
    ]);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<flood@t>",
        "x\r\n",
    );
    under_way
        .recv_timeout(Duration::from_secs(20))
        .expect("the flood never started");
    // The core still greets new clients.
    for _ in 0..3 {
        let start = Instant::now();
        let mut c = server.connect();
        assert!(c.line().starts_with("220 "));
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "a greeting took {:?} after the flood began",
            start.elapsed()
        );
        c.cmd("QUIT");
    }
    let (flooded, _) = hop.join().unwrap();
    assert!(
        flooded < Duration::from_secs(12),
        "the reply went on for {flooded:?}"
    );
    server.log_until(|l| l.contains("reply of more than 1000 lines"));
}

#[test]
fn a_pipelined_batch_lost_with_its_connection_counts_as_one_break() {
    use std::io::Read;
    // A single-address relay host that offers PIPELINING and CHUNKING. Its first connection
    // greets once the test says so, takes a batch of two transactions and drops without a
    // reply; later connections are passed through to a real peer.
    let peer = Peer::start(&[]);
    let peer_port = peer.port;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (open_gate, gate) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        for (n, conn) in l.incoming().take(4).enumerate() {
            let Ok(mut s) = conn else { return };
            if n > 0 {
                let mut up = TcpStream::connect(("127.0.0.1", peer_port)).unwrap();
                let (mut s2, mut up2) = (s.try_clone().unwrap(), up.try_clone().unwrap());
                std::thread::spawn(move || std::io::copy(&mut up2, &mut s2));
                std::thread::spawn(move || std::io::copy(&mut s, &mut up));
                continue;
            }
            let _ = gate.recv_timeout(Duration::from_secs(20));
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = s.write_all(b"220 batch.test ESMTP\r\n");
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            let mut greeted = false;
            while let Ok(k) = s.read(&mut buf) {
                if k == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..k]);
                if !greeted && seen.ends_with(b"\r\n") {
                    greeted = true;
                    let _ = s.write_all(b"250-batch.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n");
                }
                if seen.windows(4).filter(|w| w == b"BDAT").count() >= 2 {
                    break;
                }
            }
            // Dropped here, without a reply to either transaction.
        }
    });
    let relay = format!("127.0.0.1:{port}");
    let server = Server::start(&[
        "--relay-host",
        &relay,
        "--max-transactions-in-flight",
        "4",
        "--max-connections-per-destination",
        "1",
        "--retry-initial",
        "60s",
        "--metrics",
        "127.0.0.1:0",
    ]);
    send_in_one_session(&server, "r@dest.test", "batch", 2);
    open_gate.send(()).unwrap();
    // Both outcomes are unknown: deferred. One connection broke, not two: the relay host is
    // not paused, and the next message goes at once.
    server.metrics_until(|m| m.contains("postern_delivery_deferrals_total 2\n"));
    send(
        &server,
        "s@origin.test",
        &["r@dest.test"],
        "<after-batch@t>",
        "x\r\n",
    );
    let got = peer.wait_for("the next message", Duration::from_secs(20), |s| {
        !s.is_empty()
    });
    assert_eq!(got[0].message_id, "<after-batch@t>");
}

/// What a run through postern to a recording sink left behind.
struct Relayed {
    /// postern's metrics once it had delivered every message.
    metrics: String,
    /// The sink's counters.
    sink: String,
    /// The sequence numbers the sink recorded, sorted, repeats included.
    seqs: Vec<u64>,
}

/// Sends `n` messages to postern with `postern-load send` (8 connections, pipelined, BDAT);
/// postern, with `--max-transactions-in-flight 8`, `connections` per next hop and quick
/// retries, relays them to a recording sink started with `sink_args`. Returns once postern has
/// delivered all of them (or gave up waiting after 30 s).
fn relay_pipelined(n: u64, connections: &str, sink_args: &[&str]) -> Relayed {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("record.txt");
    let mut args = vec!["--record", record.to_str().unwrap()];
    args.extend_from_slice(sink_args);
    let (sink, out, addr) = start_sink(&args);
    let route = format!("sink.test={addr}");
    let mut args = vec![
        "--route",
        &route,
        "--metrics",
        "127.0.0.1:0",
        "--max-connections-per-destination",
        connections,
        "--max-transactions-in-flight",
        "8",
    ];
    args.extend(FAST_RETRY);
    let server = Server::start(&args);
    let target = server.smtp.to_string();
    let sent = Command::new(postern_load())
        .args(["send", "--target", &target, "--quiet", "--connections", "8"])
        .args(["--messages", &n.to_string(), "--pipelining", "--bdat"])
        .args(["--to", "rcpt{r}@sink.test"])
        .output()
        .unwrap();
    assert!(sent.status.success(), "{sent:?}");
    let delivered = format!("postern_recipients_delivered_total {n}\n");
    // Retries wait 200 to 400 ms each; bounded at six waits of five seconds.
    let mut metrics = String::new();
    for _ in 0..6 {
        metrics = server.metrics_until(|m| m.contains(&delivered));
        if metrics.contains(&delivered) {
            break;
        }
    }
    assert!(metrics.contains(&delivered), "{metrics}");
    let sink = stop_sink(sink, out);
    // Each core publishes its counters on its own time: deferrals counted on another core
    // than the last delivery's may show a moment later. Every 451 the sink gave is one.
    let sample = |text: &str, name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .map_or(0, |v| v.trim().parse::<u64>().unwrap())
    };
    let refused = sample(&sink, "postern_load_sink_replies_total{code=\"451\"}");
    if refused > 0 {
        metrics = server.metrics_until(|m| {
            m.contains(&delivered) && sample(m, "postern_delivery_deferrals_total") >= refused
        });
    }
    let recorded = std::fs::read_to_string(&record).unwrap();
    let mut seqs: Vec<u64> = recorded
        .lines()
        .map(|l| l.split(' ').next().unwrap().parse().unwrap())
        .collect();
    seqs.sort_unstable();
    Relayed {
        metrics,
        sink,
        seqs,
    }
}

/// A Prometheus sample's value, by its name and labels.
fn counter(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
        .parse()
        .unwrap()
}

/// `--max-transactions-in-flight`: one connection to the next hop carries several messages
/// pipelined into each other, and each reply still settles its own message. The sink defers
/// one message in five (and closes the connection after several errors, with messages in
/// flight); a reply credited to the wrong message would leave one message never recorded
/// and another recorded twice.
#[test]
fn transactions_pipelined_to_the_next_hop_settle_each_message() {
    let n = 200;
    let r = relay_pipelined(n, "1", &["--reply-mix", "250:4,451:1"]);
    let overlapped = counter(&r.sink, "postern_load_sink_overlapped_transactions_total");
    assert!(overlapped > 0, "nothing was pipelined: {}", r.sink);
    let deferred = counter(&r.sink, "postern_load_sink_replies_total{code=\"451\"}");
    assert!(deferred > 0, "{}", r.sink);
    // Every 451 defers its message; so does a 421 closing the connection (the sink's
    // "too many errors") for the message it answers.
    let deferrals = counter(&r.metrics, "postern_delivery_deferrals_total");
    assert!(
        deferrals >= deferred,
        "{deferrals} deferrals, {deferred} times 451"
    );
    assert_eq!(r.seqs, (0..n).collect::<Vec<_>>());
}

/// A next hop that drops the connection in the middle of a pipelined batch: nothing is lost,
/// and a message arrives twice only when the sink took it before the drop and its reply never
/// came back (at most one batch per dropped connection).
#[test]
fn a_connection_dropped_mid_batch_loses_nothing() {
    let n = 100;
    let mut r = relay_pipelined(n, "2", &["--drop-after", "5"]);
    let drops = counter(&r.sink, "postern_load_sink_dropped_total");
    assert!(drops > 0, "{}", r.sink);
    let recorded = r.seqs.len() as u64;
    r.seqs.dedup();
    assert_eq!(r.seqs, (0..n).collect::<Vec<_>>(), "every message arrived");
    assert!(
        recorded <= n + drops * 8,
        "{recorded} recorded for {n} messages and {drops} drops"
    );
}

#[test]
fn a_kept_connection_refused_at_its_rset_costs_no_retry_delay() {
    // Without PIPELINING the RSET before the second transaction is answered on its own; with
    // it the second transaction follows the RSET in the same write, with DATA or with BDAT,
    // one transaction at a time or pipelined into each other.
    let cases: [(&'static str, &[&str]); 4] = [
        ("250 scripted.test\r\n", &[]),
        ("250-scripted.test\r\n250 PIPELINING\r\n", &[]),
        (
            "250-scripted.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n",
            &[],
        ),
        (
            "250-scripted.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n",
            &["--max-transactions-in-flight", "8"],
        ),
    ];
    for (ehlo, extra) in cases {
        // Without PIPELINING, a RSET refused with the connection left open is the same:
        // nothing of the second transaction went out behind it.
        let refused = (!ehlo.contains("PIPELINING")).then_some((false, "502 5.5.1 not here\r\n"));
        let answers = [(true, "421 4.4.2 idle timeout\r\n"), (true, "")];
        for (closes, said) in answers.into_iter().chain(refused) {
            let (port, stored, _) = scripted_next_hop(
                move |_, line| {
                    if line.starts_with("EHLO") {
                        Some(Act::Say(ehlo))
                    } else if closes {
                        line.starts_with("RSET").then_some(Act::SayAndClose(said))
                    } else {
                        line.starts_with("RSET").then_some(Act::Say(said))
                    }
                },
                Act::Say("250 2.0.0 stored\r\n"),
            );
            let route = format!("dest.test=127.0.0.1:{port}");
            let mut args = vec!["--route", &route, "--metrics", "127.0.0.1:0"];
            args.extend_from_slice(extra);
            let server = Server::start(&args);
            let case = format!("EHLO {ehlo:?}, {extra:?}, RSET answered {said:?}");
            send(
                &server,
                "a@origin.test",
                &["b@dest.test"],
                "<first@t>",
                "x\r\n",
            );
            let (first, _) = stored.recv_timeout(Duration::from_secs(20)).unwrap();
            send(
                &server,
                "a@origin.test",
                &["b@dest.test"],
                "<second@t>",
                "x\r\n",
            );
            // Delivered at once on a new connection, though the first retry is minutes away.
            let (second, data) = stored
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|e| panic!("{case}: {e}"));
            assert!(data.contains("Message-ID: <second@t>"), "{case}: {data}");
            assert_eq!((first, second), (0, 1), "{case}");
            let m = server.metrics_until(|m| m.contains("postern_recipients_delivered_total 2\n"));
            assert!(
                m.contains("postern_delivery_deferrals_total 0\n"),
                "{case}: {m}"
            );
        }
    }
}

#[test]
fn a_carried_job_whose_kept_connection_ends_at_rset_stays_carried() {
    use dns_server::{Rec, TestDns};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    // mx2 (preference 20) takes mail, without PIPELINING, and ends its first connection with
    // 421 at the RSET before the second transaction. mx1 (10) greylists every recipient:
    // both messages, pipelined to it together, are passed over to mx2, carried by the same
    // worker. The second must then go on a new connection to mx2, not back to mx1.
    let (port, stored, _) = scripted_next_hop_at(
        "127.0.0.3:0",
        |n, line| {
            (n == 0 && line.starts_with("RSET"))
                .then_some(Act::SayAndClose("421 4.4.2 closing\r\n"))
        },
        Act::Say("250 2.0.0 stored\r\n"),
    );
    let rcpts_at_mx1 = Arc::new(AtomicUsize::new(0));
    let counted = rcpts_at_mx1.clone();
    let (_, _, _) = scripted_next_hop_at(
        &format!("127.0.0.2:{port}"),
        move |_, line| {
            if line.starts_with("EHLO") {
                Some(Act::Say(
                    "250-mx1.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n",
                ))
            } else if line.starts_with("RCPT") {
                counted.fetch_add(1, Ordering::SeqCst);
                Some(Act::Say("450 4.2.0 greylisted\r\n"))
            } else {
                None
            }
        },
        Act::Say("554 5.5.1 no valid recipients\r\n"),
    );
    let dns = TestDns::start(
        "test",
        &[
            ("grey.test.", Rec::Mx(10, "mx1.test.")),
            ("grey.test.", Rec::Mx(20, "mx2.test.")),
            ("mx1.test.", Rec::A("127.0.0.2".parse().unwrap())),
            ("mx2.test.", Rec::A("127.0.0.3".parse().unwrap())),
        ],
    );
    // Both messages queued first (--hold), so that the next start hands them to one worker
    // at once and they go to mx1 in one pipelined batch.
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let dns_addr = dns.addr.to_string();
    let port_s = port.to_string();
    let base = [
        "--dns-server",
        dns_addr.as_str(),
        "--mx-port",
        port_s.as_str(),
        "--retry-initial",
        "60s",
        "--cores",
        "1",
        "--max-connections-per-destination",
        "1",
        "--max-transactions-in-flight",
        "8",
        "--metrics",
        "127.0.0.1:0",
    ];
    let mut held: Vec<&str> = base.to_vec();
    held.push("--hold");
    let mut first = Server::start_in(&held, spool.clone(), None);
    send_in_one_session(&first, "r@grey.test", "grey", 2);
    assert!(first.terminate().success());
    let server = Server::start_in(&base, spool, None);
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(stored.recv_timeout(Duration::from_secs(20)).unwrap());
    }
    // The first connection to mx2 took one; the second, a new connection, took the other.
    let conns: Vec<usize> = got.iter().map(|(n, _)| *n).collect();
    assert_eq!(conns, vec![0, 1]);
    let m = server.metrics_until(|m| m.contains("postern_recipients_delivered_total 2\n"));
    assert!(m.contains("postern_delivery_deferrals_total 0\n"), "{m}");
    // Each recipient was put off by mx1 once: the second did not go back to it.
    assert_eq!(rcpts_at_mx1.load(Ordering::SeqCst), 2);
    drop(dns);
}

/// A next hop offering `extensions` (EHLO lines, each ending in CR LF) that slips a reply
/// nobody asked for behind its reply to the first `after` command (`EHLO` or `RSET`) of its
/// first connection, in the same write. It refuses `<unknown@...>` at RCPT with 550, and a
/// message whose body holds `refuse-me` with 554 a moment after the body (after postern's
/// look for replies too many); it takes the others and records their Message-IDs. Its
/// replies carry the enhanced codes servers give: `2.1.0` to MAIL, `2.1.5` to RCPT, `2.0.0`
/// to the rest.
fn next_hop_with_a_stray_after(after: &'static str, extensions: &'static str) -> (u16, Taken) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let taken = Taken::default();
    let record = taken.clone();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().take(8).enumerate() {
            let Ok(mut stream) = stream else { return };
            let mut reader = greeted_by_hop(&mut stream);
            let mut stray = n == 0;
            'session: while let Some((line, verb)) = command_line(&mut reader) {
                let body = match verb.as_str() {
                    "DATA" => {
                        stream.write_all(b"354 go on\r\n").unwrap();
                        let mut body = String::new();
                        loop {
                            let mut l = String::new();
                            if reader.read_line(&mut l).unwrap_or(0) == 0 {
                                // Closed before the end of the data: nothing taken.
                                break 'session;
                            }
                            if l == ".\r\n" {
                                break;
                            }
                            body.push_str(&l);
                        }
                        Some(body)
                    }
                    "BDAT" => {
                        let n: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
                        let mut body = vec![0u8; n];
                        reader.read_exact(&mut body).unwrap();
                        Some(String::from_utf8_lossy(&body).into_owned())
                    }
                    _ => None,
                };
                let mut reply = match (verb.as_str(), body) {
                    ("EHLO", _) => format!("250-hop.test\r\n{extensions}250 8BITMIME\r\n"),
                    ("RCPT", _) if line.contains("<unknown@") => {
                        "550 5.1.1 unknown user\r\n".into()
                    }
                    ("QUIT", _) => {
                        let _ = stream.write_all(b"221 2.0.0 bye\r\n");
                        break;
                    }
                    (_, Some(body)) if body.contains("refuse-me") => {
                        std::thread::sleep(Duration::from_millis(200));
                        "554 5.7.1 message refused\r\n".into()
                    }
                    (_, Some(body)) if body.contains("close-on-me") => {
                        std::thread::sleep(Duration::from_millis(200));
                        let _ = stream.write_all(b"421 4.3.2 closing on this message\r\n");
                        break;
                    }
                    (_, Some(body)) => {
                        let id = body.lines().find_map(|l| l.strip_prefix("Message-ID: "));
                        record
                            .lock()
                            .unwrap()
                            .push(id.unwrap_or_default().to_owned());
                        "250 2.0.0 queued\r\n".into()
                    }
                    ("MAIL", _) => "250 2.1.0 ok\r\n".into(),
                    ("RCPT", _) => "250 2.1.5 ok\r\n".into(),
                    _ => "250 2.0.0 ok\r\n".into(),
                };
                if stray && verb == after {
                    stray = false;
                    reply.push_str("250 2.0.0 a reply nobody asked for\r\n");
                }
                if stream.write_all(reply.as_bytes()).is_err() {
                    break;
                }
            }
        }
    });
    (port, taken)
}

/// postern on one core, one connection at a time to the next hop on `port` (dest.test), its
/// reports to `origin`, retries 300 ms apart, and `extra` flags.
fn one_connection_to(port: u16, origin: &Peer, extra: &[&str]) -> Server {
    let to_dest = format!("dest.test=127.0.0.1:{port}");
    let to_origin = format!("origin.test=127.0.0.1:{}", origin.port);
    let mut args = vec![
        "--route",
        &to_dest,
        "--route",
        &to_origin,
        "--max-connections-per-destination",
        "1",
        "--retry-initial",
        "300ms",
        "--retry-max",
        "300ms",
        "--cores",
        "1",
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// The next hop of [`next_hop_with_a_stray_after`], postern sending to it one connection at a
/// time (reports to a peer for origin.test), and `messages` (Message-ID, recipients, body)
/// sent in that order from a@origin.test. Returns what the next hop took, the peer, and the
/// server (kept for its log).
fn strayed_into(
    after: &'static str,
    extensions: &'static str,
    messages: &[(&str, &[&str], &str)],
) -> (Taken, Peer, Server) {
    strayed_into_with(after, extensions, messages, &[])
}

/// [`strayed_into`], postern run with the `extra` flags.
fn strayed_into_with(
    after: &'static str,
    extensions: &'static str,
    messages: &[(&str, &[&str], &str)],
    extra: &[&str],
) -> (Taken, Peer, Server) {
    let (port, taken) = next_hop_with_a_stray_after(after, extensions);
    let origin = Peer::start(&[]);
    let server = one_connection_to(port, &origin, extra);
    for (id, rcpts, body) in messages {
        send(&server, "a@origin.test", rcpts, id, body);
    }
    (taken, origin, server)
}

#[test]
fn a_reply_after_the_ehlo_reply_gives_the_connection_up_before_it_carries_mail() {
    // Taken on, the extra reply would answer MAIL, MAIL's reply RCPT and RCPT's the body:
    // the message would count as delivered before the next hop's refusal came.
    let (_, origin, server) = strayed_into(
        "EHLO",
        "250-PIPELINING\r\n250-CHUNKING\r\n",
        &[("<refused@t>", &["b@dest.test"], "refuse-me\r\n")],
    );
    let (bounce, text) = origin.first("the refused message's bounce");
    assert_eq!(bounce.mail_from, "<>");
    assert!(text.contains("554 5.7.1 message refused"), "{text}");
    server.log_until(|l| l.contains("after the EHLO reply"));
}

#[test]
fn a_reply_after_the_mail_reply_does_not_pass_a_rcpt_reply_for_the_answer_to_the_body() {
    // The extra reply behind MAIL's answers RCPT, and RCPT's `250 2.1.5` the body: BDAT has
    // no 354 that would show the shift, and the next hop's real answer to the body, a 554,
    // comes after its content check. An addressing status (2.1.x) to a body is checked with a
    // NOOP, whose place the 554 takes: the message is tried again, and bounced with the 554,
    // not counted delivered.
    let (taken, origin, server) = strayed_into(
        "MAIL",
        "250-PIPELINING\r\n250-CHUNKING\r\n",
        &[("<refused@t>", &["b@dest.test"], "refuse-me\r\n")],
    );
    // Its NOOP got the 554 in its place: out of step, as the first attempt's outcome says.
    refused_after_a_first_attempt_out_of_step(
        &taken,
        &origin,
        &server,
        "the replies were out of step",
    );
}

/// The message of [`strayed_into`] that the next hop refuses came back to its sender with
/// the next hop's 554, was taken nowhere, and its first attempt was deferred saying `why`.
fn refused_after_a_first_attempt_out_of_step(
    taken: &Taken,
    origin: &Peer,
    server: &Server,
    why: &str,
) {
    let (bounce, text) = origin.first("the refused message's bounce");
    assert_eq!(bounce.mail_from, "<>");
    assert!(text.contains("554 5.7.1 message refused"), "{text}");
    assert!(taken.lock().unwrap().is_empty());
    let first = server.log_until(|l| l.contains("status="));
    assert!(first.contains("status=\"deferred\""), "{first}");
    assert!(first.contains(why), "{first}");
}

#[test]
fn a_421_in_place_of_the_noop_s_answer_after_an_addressing_status_is_no_delivery() {
    // As above, but the next hop's real answer to the body is a 421 and the close: it comes
    // in the NOOP's place. After a success with an addressing status, only the NOOP's 250
    // shows the replies in step; taken as the next hop closing, as after other replies, the
    // message would count as delivered, and it never was.
    let (taken, _origin, server) = strayed_into(
        "MAIL",
        "250-PIPELINING\r\n250-CHUNKING\r\n",
        &[("<closed-on@t>", &["b@dest.test"], "close-on-me\r\n")],
    );
    let first = server.log_until(|l| l.contains("status="));
    assert!(first.contains("status=\"deferred\""), "{first}");
    assert!(first.contains("the replies were out of step"), "{first}");
    assert!(taken.lock().unwrap().is_empty());
}

#[test]
fn a_connection_given_up_for_a_reply_nobody_asked_for_still_says_quit() {
    // RFC 5321 4.1.1.10: the client does not close before it sends QUIT. Its reply cannot be
    // told from the stray ones, so none is waited for.
    given_up_with_quit(
        |n, line| {
            (n == 0 && line.starts_with("EHLO")).then_some(Act::Say(
                "250-scripted.test\r\n250 PIPELINING\r\n250 2.0.0 nobody asked\r\n",
            ))
        },
        "<quit@t>",
    );
}

#[test]
fn a_connection_given_up_before_bdat_for_a_reply_nobody_asked_for_says_quit() {
    // As above, with the extra reply behind the RCPT reply that lets BDAT go: nothing was
    // written since, so QUIT can still go out (it cannot after a 354, where it would be
    // body text).
    given_up_with_quit(
        |n, line| {
            if line.starts_with("EHLO") {
                Some(Act::Say("250-scripted.test\r\n250 CHUNKING\r\n"))
            } else if n == 0 && line.starts_with("RCPT") {
                Some(Act::Say("250 2.1.5 ok\r\n250 2.0.0 nobody asked\r\n"))
            } else {
                None
            }
        },
        "<quit-bdat@t>",
    );
}

/// A next hop that answers as `answer` says (a reply nobody asked for on its first
/// connection), sent one message: that connection ends with nothing sent on it, its last line
/// QUIT (the message waits for its retry).
fn given_up_with_quit(
    answer: impl Fn(usize, &str) -> Option<Act> + Send + 'static,
    message_id: &str,
) {
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = lines.clone();
    let (port, stored, closed) = scripted_next_hop(
        move |n, line| {
            seen.lock().unwrap().push((n, line.trim_end().to_owned()));
            answer(n, line)
        },
        Act::Say("250 2.0.0 stored\r\n"),
    );
    let route = format!("dest.test=127.0.0.1:{port}");
    let server = Server::start(&["--cores", "1", "--route", &route]);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        message_id,
        "x\r\n",
    );
    closed.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(stored.try_recv().is_err(), "nothing was sent on it");
    let first: Vec<String> = lines
        .lock()
        .unwrap()
        .iter()
        .filter(|(n, _)| *n == 0)
        .map(|(_, l)| l.clone())
        .collect();
    assert_eq!(first.last().map(String::as_str), Some("QUIT"), "{first:?}");
}

#[test]
fn a_reply_after_the_rset_reply_without_pipelining_moves_the_next_message_to_a_new_connection() {
    // Without PIPELINING, MAIL goes out once RSET is answered; the extra reply behind RSET's
    // would answer it, and each later reply the command before its own.
    let (taken, origin, _server) = strayed_into(
        "RSET",
        "250-CHUNKING\r\n",
        &[
            ("<taken@t>", &["b@dest.test"], "x\r\n"),
            ("<refused@t>", &["b@dest.test"], "refuse-me\r\n"),
        ],
    );
    let (_, text) = origin.first("the refused message's bounce");
    assert!(text.contains("554 5.7.1 message refused"), "{text}");
    assert!(text.contains("<refused@t>"), "{text}");
    assert_eq!(*taken.lock().unwrap(), ["<taken@t>"]);
}

#[test]
fn replies_out_of_step_refuse_no_recipient_with_another_s_refusal() {
    // Pipelined behind RSET, every reply answers the command before its own: unknown@'s 550
    // lands on b@'s RCPT, and b@'s 250 on DATA, which ends the session as out of step. The
    // 550 must not fail b@: the transaction's outcome is unknown, and the retry sorts it out.
    let (taken, origin, _server) = strayed_into(
        "RSET",
        "250-PIPELINING\r\n",
        &[
            ("<first@t>", &["c@dest.test"], "x\r\n"),
            ("<second@t>", &["unknown@dest.test", "b@dest.test"], "y\r\n"),
        ],
    );
    let (_, text) = origin.first("unknown@'s bounce");
    assert!(
        text.contains("Final-Recipient: rfc822; unknown@dest.test"),
        "{text}"
    );
    assert!(
        !text.contains("Final-Recipient: rfc822; b@dest.test"),
        "{text}"
    );
    assert_eq!(taken_once(&taken, 2), ["<first@t>", "<second@t>"]);
}

#[test]
fn a_refusal_pushed_into_data_s_place_fails_no_recipient_the_next_hop_took() {
    // The extra reply behind b@'s 250 answers unknown@'s RCPT, and unknown@'s 550 lands on
    // DATA, with the next hop's 354 still to come. Taken as DATA's refusal, it would fail b@,
    // which the next hop took, with unknown@'s reply.
    let (taken, origin, _server) = strayed_into(
        "RCPT",
        "250-PIPELINING\r\n",
        &[("<mixed@t>", &["b@dest.test", "unknown@dest.test"], "x\r\n")],
    );
    let (_, text) = origin.first("unknown@'s bounce");
    assert!(
        text.contains("Final-Recipient: rfc822; unknown@dest.test"),
        "{text}"
    );
    assert!(
        !text.contains("Final-Recipient: rfc822; b@dest.test"),
        "{text}"
    );
    assert_eq!(taken_once(&taken, 1), ["<mixed@t>"]);
}

/// A BDAT transaction to unknown@ (refused) and b@ whose body the next hop refuses a moment
/// after its replies, with a reply too many behind unknown@'s 550, sent by postern with the
/// `extra` flags: b@ is bounced with the next hop's 554, never counted as delivered.
fn refusal_of_the_data_pushed_past_the_last_reply(extra: &[&str]) {
    let (taken, origin, _server) = strayed_into_with(
        "RCPT",
        "250-PIPELINING\r\n250-CHUNKING\r\n",
        &[(
            "<refused@t>",
            &["unknown@dest.test", "b@dest.test"],
            "refuse-me\r\n",
        )],
        extra,
    );
    let (_, text) = origin.first("the bounce");
    assert!(
        text.contains("Final-Recipient: rfc822; b@dest.test"),
        "{text}"
    );
    assert!(text.contains("554 5.7.1 message refused"), "{text}");
    assert!(taken.lock().unwrap().is_empty());
}

#[test]
fn a_refusal_to_the_data_pushed_past_the_last_reply_is_not_taken_for_a_delivery() {
    // The extra reply behind unknown@'s 550 answers b@'s RCPT, and b@'s 250 the body; the
    // next hop's real answer to the body, its 554, comes a moment later, after postern's look
    // past the last reply. Taken as it was read, b@ would count as delivered.
    refusal_of_the_data_pushed_past_the_last_reply(&[]);
}

#[test]
fn a_reply_after_the_rcpt_reply_without_pipelining_is_not_taken_for_the_answer_to_bdat() {
    // Without PIPELINING, BDAT goes out once RCPT is answered; the extra reply behind RCPT's,
    // read with it, came before BDAT was sent. Taken as the answer to the body (BDAT has no
    // 354 that would show the shift), the message would count as delivered, and the next
    // hop's real answer, its 554 a moment after the body, would be read by nobody.
    let (taken, origin, server) = strayed_into(
        "RCPT",
        "250-CHUNKING\r\n",
        &[("<refused@t>", &["b@dest.test"], "refuse-me\r\n")],
    );
    refused_after_a_first_attempt_out_of_step(
        &taken,
        &origin,
        &server,
        "which no command asked for",
    );
}

/// Sends one message from a@origin.test to unknown@dest.test and b@dest.test through a
/// one-core postern routed to a next hop on `port` (its first retry an hour away): the log
/// lines of their outcomes, unknown@'s and b@'s.
fn outcomes_for_unknown_and_b(port: u16) -> (String, String) {
    let route = format!("dest.test=127.0.0.1:{port}");
    let server = Server::start(&["--cores", "1", "--route", &route, "--retry-initial", "1h"]);
    send(
        &server,
        "a@origin.test",
        &["unknown@dest.test", "b@dest.test"],
        "<two@t>",
        "x\r\n",
    );
    let unknown = server.log_until(|l| l.contains("to=\"unknown@dest.test\""));
    let b = server.log_until(|l| l.contains("to=\"b@dest.test\""));
    (unknown, b)
}

#[test]
fn a_421_behind_the_last_rcpt_reply_is_the_next_hop_closing_not_replies_out_of_step() {
    // A 421 may come at any time (RFC 5321 3.8): read behind the reply that lets BDAT go,
    // it ends the transaction unsent, but the refusal read before it stands (unknown@ is
    // bounced with its 550 now, not tried again as after replies out of step).
    let (port, _stored, _closed) = scripted_next_hop(
        |_, line| {
            if line.starts_with("EHLO") {
                Some(Act::Say("250-scripted.test\r\n250 CHUNKING\r\n"))
            } else if line.starts_with("RCPT TO:<unknown@") {
                Some(Act::Say("550 5.1.1 unknown user\r\n"))
            } else if line.starts_with("RCPT") {
                Some(Act::SayAndClose("250 2.1.5 ok\r\n421 4.3.2 going down\r\n"))
            } else {
                None
            }
        },
        Act::Say("250 2.0.0 stored\r\n"),
    );
    let (unknown, b) = outcomes_for_unknown_and_b(port);
    assert!(unknown.contains("status=\"bounced\""), "{unknown}");
    assert!(unknown.contains("550 5.1.1 unknown user"), "{unknown}");
    assert!(b.contains("status=\"deferred\""), "{b}");
    assert!(b.contains("421 4.3.2 going down"), "{b}");
}

#[test]
fn a_221_behind_the_reply_to_the_body_is_the_next_hop_closing_and_the_250_stands() {
    // Some next hops say 221 right after their last 250 and close (a limit of messages per
    // connection), often in the same write. A 221 answers nothing postern asked (it sent no
    // QUIT): not replies out of step. The message is delivered, not sent again at every
    // retry and bounced when its lifetime ends.
    for chunking in [false, true] {
        let (port, stored, _) = scripted_next_hop(
            move |_, line| {
                (chunking && line.starts_with("EHLO"))
                    .then_some(Act::Say("250-scripted.test\r\n250 CHUNKING\r\n"))
            },
            Act::SayAndClose("250 2.0.0 stored\r\n221 2.0.0 closing\r\n"),
        );
        let route = format!("dest.test=127.0.0.1:{port}");
        let server = Server::start(&["--cores", "1", "--route", &route, "--retry-initial", "1h"]);
        send(
            &server,
            "a@origin.test",
            &["b@dest.test"],
            "<one@t>",
            "x\r\n",
        );
        let outcome = server.log_until(|l| l.contains("to=\"b@dest.test\""));
        assert!(outcome.contains("status=\"sent\""), "{chunking}: {outcome}");
        // The connection the next hop closed is not used again: the next message goes on a
        // connection of its own.
        send(
            &server,
            "a@origin.test",
            &["c@dest.test"],
            "<two@t>",
            "y\r\n",
        );
        let outcome = server.log_until(|l| l.contains("to=\"c@dest.test\""));
        assert!(outcome.contains("status=\"sent\""), "{chunking}: {outcome}");
        let got: Vec<(usize, bool)> = (0..2)
            .map(|_| {
                let (conn, data) = stored.recv_timeout(Duration::from_secs(10)).unwrap();
                (conn, data.contains("<two@t>"))
            })
            .collect();
        assert_eq!(got, [(0, false), (1, true)], "{chunking}");
    }
}

#[test]
fn a_221_behind_the_reply_to_the_body_is_no_reply_to_the_noop_asked_after_a_refusal() {
    // One recipient refused, the other taken: the message's 250 is checked with a NOOP (a
    // stray reply would have pushed the others along). The 221 the next hop wrote as it
    // closed is read in the NOOP's place: nothing was left over, and the 250 stands.
    let (port, stored, _) = scripted_next_hop(
        |_, line| {
            line.starts_with("RCPT TO:<unknown@")
                .then_some(Act::Say("550 5.1.1 unknown user\r\n"))
        },
        Act::SayAndClose("250 2.0.0 stored\r\n221 2.0.0 closing\r\n"),
    );
    let (unknown, b) = outcomes_for_unknown_and_b(port);
    assert!(b.contains("status=\"sent\""), "{b}");
    assert!(unknown.contains("status=\"bounced\""), "{unknown}");
    assert!(stored.recv_timeout(Duration::from_secs(10)).is_ok());
}

#[test]
fn a_line_end_a_next_hop_writes_late_after_its_reply_does_not_cost_the_connection() {
    // Some next hops write a line end too many a moment after a reply. A blank line is no
    // reply and shifts nothing: the kept connection takes the next message (it was given up,
    // and every message then took a connection of its own).
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let taken: std::sync::Arc<std::sync::Mutex<Vec<(usize, String)>>> = Default::default();
    let record = taken.clone();
    let (blank_tx, blank_sent) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().take(4).enumerate() {
            let Ok(mut stream) = stream else { return };
            let (record, blank_tx) = (record.clone(), blank_tx.clone());
            std::thread::spawn(move || {
                let mut reader = greeted_by_hop(&mut stream);
                while let Some((_, verb)) = command_line(&mut reader) {
                    let reply = match verb.as_str() {
                        "EHLO" => "250-hop.test\r\n250 8BITMIME\r\n",
                        "DATA" => "354 go on\r\n",
                        "QUIT" => {
                            let _ = stream.write_all(b"221 2.0.0 bye\r\n");
                            return;
                        }
                        _ => "250 2.0.0 ok\r\n",
                    };
                    stream.write_all(reply.as_bytes()).unwrap();
                    if verb != "DATA" {
                        continue;
                    }
                    let mut body = String::new();
                    loop {
                        let mut l = String::new();
                        if reader.read_line(&mut l).unwrap_or(0) == 0 {
                            return;
                        }
                        if l == ".\r\n" {
                            break;
                        }
                        body.push_str(&l);
                    }
                    stream.write_all(b"250 2.0.0 queued\r\n").unwrap();
                    let id = body.lines().find_map(|l| l.strip_prefix("Message-ID: "));
                    record
                        .lock()
                        .unwrap()
                        .push((n, id.unwrap_or_default().to_owned()));
                    // Late: after postern's look for replies too many.
                    std::thread::sleep(Duration::from_millis(1000));
                    stream.write_all(b"\r\n").unwrap();
                    let _ = blank_tx.send(());
                }
            });
        }
    });
    let origin = Peer::start(&[]);
    let server = one_connection_to(port, &origin, &[]);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<one@t>",
        "x\r\n",
    );
    blank_sent.recv_timeout(Duration::from_secs(20)).unwrap();
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<two@t>",
        "y\r\n",
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while taken.lock().unwrap().len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        *taken.lock().unwrap(),
        [(0, "<one@t>".to_owned()), (0, "<two@t>".to_owned())]
    );
}

/// A next hop (PIPELINING) serving each connection on its own thread: a message whose body
/// holds `break-me` is cut off in its data (the connection closed) the first time; one with
/// `hang-me` gets no reply to its data (the connection held for a minute); the others are
/// taken and their Message-IDs recorded. Returns its port, what it took, and whether a
/// message hangs.
fn next_hop_that_breaks_then_hangs() -> (u16, Taken, std::sync::Arc<std::sync::atomic::AtomicBool>)
{
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let taken = Taken::default();
    let record = taken.clone();
    let broken = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hanging = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hangs = hanging.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(16) {
            let Ok(mut stream) = stream else { return };
            let (record, broken, hangs) = (record.clone(), broken.clone(), hangs.clone());
            std::thread::spawn(move || {
                let mut reader = greeted_by_hop(&mut stream);
                while let Some((_, verb)) = command_line(&mut reader) {
                    let reply: String = match verb.as_str() {
                        "EHLO" => "250-hop.test\r\n250 PIPELINING\r\n".into(),
                        "QUIT" => {
                            let _ = stream.write_all(b"221 2.0.0 bye\r\n");
                            return;
                        }
                        "DATA" => {
                            stream.write_all(b"354 go on\r\n").unwrap();
                            let mut body = String::new();
                            loop {
                                let mut l = String::new();
                                if reader.read_line(&mut l).unwrap_or(0) == 0 {
                                    return;
                                }
                                if l == ".\r\n" {
                                    break;
                                }
                                body.push_str(&l);
                            }
                            if body.contains("break-me")
                                && !broken.swap(true, std::sync::atomic::Ordering::SeqCst)
                            {
                                return;
                            }
                            if body.contains("hang-me") {
                                hangs.store(true, std::sync::atomic::Ordering::SeqCst);
                                std::thread::sleep(Duration::from_secs(60));
                                return;
                            }
                            let id = body.lines().find_map(|l| l.strip_prefix("Message-ID: "));
                            record
                                .lock()
                                .unwrap()
                                .push(id.unwrap_or_default().to_owned());
                            "250 2.0.0 queued\r\n".into()
                        }
                        _ => "250 2.0.0 ok\r\n".into(),
                    };
                    if stream.write_all(reply.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, taken, hanging)
}

#[test]
fn a_transaction_that_hangs_after_a_failure_does_not_hold_the_next_hop_s_other_mail() {
    // After a connection broke off, a next hop gets one connection at a time until it answers
    // again. The next connection opens, and its transaction hangs at the end of the data
    // (the next hop's wait for it is minutes): the mail behind it gets other connections.
    let (port, taken, hanging) = next_hop_that_breaks_then_hangs();
    let to_dest = format!("dest.test=127.0.0.1:{port}");
    let server = Server::start(&["--route", &to_dest, "--cores", "1", "--retry-initial", "1h"]);
    let broken = send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<broken@t>",
        "break-me\r\n",
    );
    server.log_until(|l| l.contains(&broken) && l.contains("deferred"));
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<hung@t>",
        "hang-me\r\n",
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while !hanging.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        hanging.load(std::sync::atomic::Ordering::SeqCst),
        "the second message hangs"
    );
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<after@t>",
        "x\r\n",
    );
    assert_eq!(taken_once(&taken, 1), ["<after@t>"]);
}

#[test]
fn a_refusal_to_the_data_pushed_past_a_batch_s_last_reply_is_not_taken_for_a_delivery() {
    // As above, with transactions pipelined into each other (a batch of one here): the
    // batch's last reply read is b@'s 250, the next hop's 554 to the body comes after it.
    refusal_of_the_data_pushed_past_the_last_reply(&["--max-transactions-in-flight", "8"]);
}

/// A next hop (PIPELINING, CHUNKING) whose reply to RCPT is malformed (`250ok`, no space
/// after the code) but which takes every body all the same. Returns its port, what it took,
/// and how many MAIL commands it has seen.
fn next_hop_with_a_malformed_rcpt_reply(
) -> (u16, Taken, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let taken = Taken::default();
    let record = taken.clone();
    let mails = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = mails.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(20) {
            let Ok(mut stream) = stream else { return };
            let mut reader = greeted_by_hop(&mut stream);
            while let Some((line, verb)) = command_line(&mut reader) {
                let reply: &[u8] = match verb.as_str() {
                    "EHLO" => b"250-hop.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n",
                    "MAIL" => {
                        seen.fetch_add(1, Ordering::SeqCst);
                        b"250 2.1.0 ok\r\n"
                    }
                    "RCPT" => b"250ok\r\n",
                    "BDAT" => {
                        take_bdat_body(&line, &mut reader, &record);
                        b"250 2.0.0 queued\r\n"
                    }
                    "QUIT" => {
                        let _ = stream.write_all(b"221 2.0.0 bye\r\n");
                        break;
                    }
                    _ => b"250 2.0.0 ok\r\n",
                };
                if stream.write_all(reply).is_err() {
                    break;
                }
            }
        }
    });
    (port, taken, mails)
}

#[test]
fn a_next_hop_whose_replies_cannot_be_read_gets_no_pipelined_body_again() {
    // The first attempt pipelines the body behind RCPT, and the next hop takes it while its
    // reply to RCPT cannot be read: the outcome is unknown, and the message is tried again.
    // Each retry waits for the RCPT's reply before the body, so the next hop does not take
    // the message at every retry.
    use std::sync::atomic::Ordering;
    let (port, taken, mails) = next_hop_with_a_malformed_rcpt_reply();
    let origin = Peer::start(&[]);
    let server = one_connection_to(port, &origin, &[]);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<once@t>",
        "x\r\n",
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while mails.load(Ordering::SeqCst) < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(mails.load(Ordering::SeqCst) >= 4, "not retried");
    assert_eq!(*taken.lock().unwrap(), ["<once@t>"]);
    // The log quotes the line that could not be read.
    let log = server.log_until(|l| l.contains(r#"malformed reply line "250ok""#));
    assert!(log.contains(r#"malformed reply line "250ok""#), "{log}");
}

/// A next hop (or a filter in front of it) that reads one command at a time and drops what
/// came behind it in the same read: it offers PIPELINING (and CHUNKING with `chunking`),
/// answers the MAIL of a pipelined group and never the RCPT and DATA or BDAT that followed
/// (the octets of a BDAT body are kept). With `idle_close` it closes a connection silent that
/// long, its own timeout shorter than the client's. Returns its port, what it took, and how
/// many MAIL commands it answered.
fn next_hop_that_drops_pipelined_commands(
    chunking: bool,
    idle_close: Option<Duration>,
) -> (u16, Taken, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let taken = Taken::default();
    let record = taken.clone();
    let mails = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = mails.clone();
    let id_of = |body: &[u8]| {
        String::from_utf8_lossy(body)
            .lines()
            .find_map(|l| l.strip_prefix("Message-ID: "))
            .unwrap_or("")
            .to_owned()
    };
    std::thread::spawn(move || {
        for stream in listener.incoming().take(20) {
            let Ok(mut stream) = stream else { return };
            let idle = idle_close.unwrap_or(Duration::from_secs(30));
            stream.set_read_timeout(Some(idle)).unwrap();
            let _ = stream.write_all(b"220 hop.test ESMTP\r\n");
            let mut buf = Vec::new();
            let mut chunk = [0u8; 65536];
            loop {
                // One read's first line is the command; the rest of the read is dropped (but
                // for a BDAT body, which follows its command).
                let (line, rest) = loop {
                    if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
                        let line = String::from_utf8_lossy(&buf[..end]).to_ascii_uppercase();
                        let rest = buf.split_off(end + 2);
                        buf.clear();
                        break (Some(line), rest);
                    }
                    match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => break (None, Vec::new()),
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let Some(line) = line else { break };
                let reply: &[u8] = if line.starts_with("EHLO") && chunking {
                    b"250-hop.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n"
                } else if line.starts_with("EHLO") {
                    b"250-hop.test\r\n250 PIPELINING\r\n"
                } else if line.starts_with("MAIL") {
                    seen.fetch_add(1, Ordering::SeqCst);
                    b"250 2.1.0 ok\r\n"
                } else if let Some(size) = line.strip_prefix("BDAT ") {
                    let size: usize = size.split_whitespace().next().unwrap().parse().unwrap();
                    let mut body = rest;
                    while body.len() < size {
                        match stream.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => body.extend_from_slice(&chunk[..n]),
                        }
                    }
                    record.lock().unwrap().push(id_of(&body[..size]));
                    b"250 2.0.0 queued\r\n"
                } else if line.starts_with("DATA") {
                    if stream.write_all(b"354 go on\r\n").is_err() {
                        break;
                    }
                    let mut body = Vec::new();
                    while !body.ends_with(b"\r\n.\r\n") {
                        match stream.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => body.extend_from_slice(&chunk[..n]),
                        }
                    }
                    record.lock().unwrap().push(id_of(&body));
                    b"250 2.0.0 queued\r\n"
                } else if line.starts_with("QUIT") {
                    let _ = stream.write_all(b"221 2.0.0 bye\r\n");
                    break;
                } else {
                    b"250 2.0.0 ok\r\n"
                };
                if stream.write_all(reply).is_err() {
                    break;
                }
            }
        }
    });
    (port, taken, mails)
}

/// The message <dropped@t> through a one-core postern to a next hop made by
/// [`next_hop_that_drops_pipelined_commands`], with `extra` flags: delivered once, after one
/// attempt that failed, with the log line saying why the next went a command at a time.
fn delivered_a_command_at_a_time(chunking: bool, idle_close: Option<Duration>, extra: &[&str]) {
    use std::sync::atomic::Ordering;
    let (port, taken, mails) = next_hop_that_drops_pipelined_commands(chunking, idle_close);
    let origin = Peer::start(&[]);
    let server = one_connection_to(port, &origin, extra);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<dropped@t>",
        "x\r\n",
    );
    taken_within(&taken, "<dropped@t>", Duration::from_secs(30));
    assert_eq!(*taken.lock().unwrap(), ["<dropped@t>"]);
    assert_eq!(
        mails.load(Ordering::SeqCst),
        2,
        "one attempt failed, one delivered"
    );
    let log = server.log_until(|l| l.contains("sent one command at a time"));
    assert!(
        log.contains("answered part of the commands pipelined"),
        "{log}"
    );
}

#[test]
fn a_next_hop_that_drops_pipelined_commands_gets_one_command_at_a_time_after_a_timeout() {
    // The first attempt pipelines MAIL, RCPT and DATA; the next hop answers the MAIL only and
    // the wait for the RCPT's reply runs out. Pipelining to it again would time out at every
    // retry: the next one goes a command at a time, and the message is delivered, once.
    // Replies to a pipelined group are each awaited for the longest of its commands' limits.
    let limits = [
        "--smtp-mail-timeout",
        "1s",
        "--smtp-rcpt-timeout",
        "1s",
        "--smtp-data-init-timeout",
        "1s",
    ];
    delivered_a_command_at_a_time(false, None, &limits);
    // With BDAT the body goes out with the commands and every reply is awaited after it: the
    // replies to the envelope's commands still get the envelope's timeouts, not the end of
    // the data's (10 min, which a next hop's own timeout would end first, every try).
    delivered_a_command_at_a_time(true, None, &limits);
}

#[test]
fn a_next_hop_that_drops_pipelined_commands_and_closes_first_gets_one_command_at_a_time() {
    // The same next hop, whose own idle timeout (half a second) is shorter than postern's (the
    // defaults, minutes): the connection's end, partway through the replies owed, counts as
    // the timeout would.
    delivered_a_command_at_a_time(false, Some(Duration::from_millis(500)), &[]);
}

#[test]
fn a_next_hop_slow_to_answer_a_pipelined_body_is_not_sent_one_command_at_a_time() {
    // MAIL, RCPT and BDAT with the body go out together; the next hop answers MAIL and RCPT
    // and takes longer than the end-of-data timeout over the body (a slow content scan).
    // That reply would be awaited the same way one command at a time: no reason to stop
    // pipelining to it.
    let (release, gate) = std::sync::mpsc::channel::<()>();
    let (port, _stored, _) = scripted_next_hop(
        |_, line| {
            line.starts_with("EHLO").then_some(Act::Say(
                "250-scripted.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n",
            ))
        },
        Act::SayWhenTold(gate, "250 2.0.0 scanned\r\n"),
    );
    let route = format!("dest.test=127.0.0.1:{port}");
    let server = Server::start(&["--route", &route, "--smtp-data-done-timeout", "1s"]);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<slow@t>",
        "x\r\n",
    );
    let line = server.log_until(|l| l.contains("status=\"deferred\""));
    assert!(line.contains("timed out"), "{line}");
    assert_eq!(
        server.log_count(|l| l.contains("answered part of the commands pipelined")),
        0
    );
    drop(release);
}

/// A next hop that leaves out a pipelined reply (none for the first RCPT) puts each later one
/// in the place of the command before its own: the 550 it gave the second recipient reads as
/// the first's. When the transaction then ends in a timeout, which reply answered which
/// command is not known: no recipient is failed on a reply read before it, both are tried
/// again.
#[test]
fn replies_read_before_a_timeout_fail_no_recipient_when_one_may_be_missing() {
    let (port, _stored, _) = scripted_next_hop(
        |_, line| {
            if line.starts_with("EHLO") {
                Some(Act::Say(
                    "250-scripted.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n",
                ))
            } else if line.starts_with("RCPT TO:<first@") {
                Some(Act::Say(""))
            } else if line.starts_with("RCPT TO:<second@") {
                Some(Act::Say("550 5.1.1 <second@dest.test> no such user\r\n"))
            } else {
                None
            }
        },
        // The body's reply, read as the second recipient's; then nothing more.
        Act::Say("250 2.0.0 taken\r\n"),
    );
    let route = format!("dest.test=127.0.0.1:{port}");
    let server = Server::start(&[
        "--route",
        &route,
        "--smtp-data-done-timeout",
        "1s",
        "--metrics",
        "127.0.0.1:0",
    ]);
    send(
        &server,
        "a@origin.test",
        &["first@dest.test", "second@dest.test"],
        "<gap@t>",
        "x\r\n",
    );
    for who in ["first", "second"] {
        let to = format!("to=\"{who}@dest.test\"");
        let line = server.log_until(|l| l.contains(&to) && l.contains("status="));
        assert!(line.contains("status=\"deferred\""), "{line}");
    }
    // One attempt, deferred (the counter counts attempts, not recipients); nothing failed.
    let m = server.metrics_until(|m| counter(m, "postern_delivery_deferrals_total") >= 1);
    assert_eq!(counter(&m, "postern_recipients_failed_total"), 0, "{m}");
}

/// A message for more recipients of one next hop than it takes in a transaction, by more than
/// it lets a client overshoot (postern's own server: 100 here, then 1,000 refused with 452,
/// then each one more an error, 421 at the twentieth): the relay stops sending RCPTs in a
/// transaction once one is refused as too many, and the rest go in the next ones. Sending
/// them all, every attempt ended in the 421, and nothing was delivered.
#[test]
fn recipients_past_the_next_hop_s_limit_go_in_later_transactions_not_into_its_421() {
    let next_hop = Server::start(&["--accept-domain", "dest.test", "--max-recipients", "100"]);
    let route = format!("dest.test=127.0.0.1:{}", next_hop.smtp.port());
    let relay = Server::start(&[
        "--route",
        &route,
        "--max-recipients",
        "1200",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let names: Vec<String> = (0..1200).map(|i| format!("r{i}@dest.test")).collect();
    let rcpts: Vec<&str> = names.iter().map(String::as_str).collect();
    send(&relay, "a@origin.test", &rcpts, "<many@t>", "x\r\n");
    let m = relay.metrics_until(|m| m.contains("postern_recipients_delivered_total 1200\n"));
    assert!(m.contains("postern_delivery_deferrals_total 0\n"), "{m}");
    let held = queue_listing(&next_hop.spool);
    let mut got: Vec<String> = held
        .iter()
        .flat_map(|m| m["recipients"].as_array().unwrap().iter())
        .map(|r| r["address"].as_str().unwrap().to_owned())
        .collect();
    got.sort();
    let mut want = names.clone();
    want.sort();
    assert_eq!(got, want);
    assert!(held
        .iter()
        .all(|m| m["recipients"].as_array().unwrap().len() <= 100));
}

#[test]
fn a_full_mailbox_beside_a_recipient_taken_waits_for_its_retry() {
    // 452 4.2.2 is about that mailbox, not a limit of the transaction: the recipient waits
    // for its retry like any deferral. Taken for "too many recipients", it was sent again at
    // once in a transaction of its own, to get the same answer.
    use std::sync::atomic::{AtomicUsize, Ordering};
    let asked = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = asked.clone();
    let (port, _stored, _) = scripted_next_hop(
        move |_, line| {
            if line.starts_with("RCPT TO:<full@dest.test>") {
                seen.fetch_add(1, Ordering::SeqCst);
                Some(Act::Say("452 4.2.2 Mailbox full\r\n"))
            } else {
                None
            }
        },
        Act::Say("250 2.0.0 stored\r\n"),
    );
    let route = format!("dest.test=127.0.0.1:{port}");
    let relay = Server::start(&[
        "--route",
        &route,
        "--retry-initial",
        "60s",
        "--metrics",
        "127.0.0.1:0",
    ]);
    send(
        &relay,
        "a@origin.test",
        &["fine@dest.test", "full@dest.test"],
        "<full@t>",
        "x\r\n",
    );
    let m = relay.metrics_until(|m| {
        m.contains("postern_delivery_deferrals_total 1\n")
            && m.contains("postern_recipients_delivered_total 1\n")
    });
    assert!(m.contains("postern_delivery_deferrals_total 1\n"), "{m}");
    assert_eq!(asked.load(Ordering::SeqCst), 1, "asked again at once");
}

#[test]
fn a_sender_refused_before_a_pipelining_next_hop_broke_off_fails_at_once() {
    // MAIL, RCPT and DATA go out together; the next hop refuses the sender for good, then
    // ends the session (421) at the RCPT. The refusal is the message's outcome (RFC 5321
    // 4.2.1: not to be repeated), as when the replies come one at a time: a bounce now, not
    // retries for the queue's lifetime ending in "delivery time expired".
    let origin = Peer::start(&[]);
    let (port, _stored, _) = scripted_next_hop(
        |_, line| {
            if line.starts_with("EHLO") {
                Some(Act::Say("250-scripted.test\r\n250 PIPELINING\r\n"))
            } else if line.starts_with("MAIL") {
                Some(Act::Say("550 5.7.1 sender blocked\r\n"))
            } else if line.starts_with("RCPT") {
                Some(Act::SayAndClose("421 4.3.2 closing\r\n"))
            } else {
                None
            }
        },
        Act::Say("250 2.0.0 stored\r\n"),
    );
    let server = routed_apart(port, origin.port, &[]);
    send(
        &server,
        "a@origin.test",
        &["r@dest.test"],
        "<blocked@t>",
        "x\r\n",
    );
    let (_, report) = origin.first("the bounce");
    assert!(report.contains("550 5.7.1 sender blocked"), "{report}");
    assert!(report.contains("Status: 5.7.1"), "{report}");
}
