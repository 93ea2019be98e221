//! Outbound connections: kept and reused while a next hop has mail, ended when idle, woken for
//! a flush, and shared under `--max-outbound-connections` (a next hop waiting with none gets a
//! place that frees up; idle connections give theirs up).
#![allow(clippy::unwrap_used)]

mod common;
mod relaying;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use common::Server;
use relaying::*;

/// A next hop that takes one message per connection: after its 250 it says `421 4.4.2` and
/// closes, as servers do when an idle connection times out.
fn one_message_per_connection_next_hop() -> (u16, StoredRx, std::sync::mpsc::Receiver<()>) {
    scripted_next_hop(
        |_, line| {
            line.starts_with("EHLO")
                .then_some(Act::Say("250 idle.test\r\n"))
        },
        Act::SayAndClose("250 2.0.0 stored\r\n421 4.4.2 idle.test idle timeout\r\n"),
    )
}

#[test]
fn a_connection_the_next_hop_closed_while_idle_is_not_used_again() {
    let (port, stored, closed) = one_message_per_connection_next_hop();
    let route = format!("dest.test=127.0.0.1:{port}");
    let server = Server::start(&["--route", &route, "--metrics", "127.0.0.1:0"]);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<idle1@t>",
        "x\r\n",
    );
    let (n, _) = stored.recv_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(n, 0);
    // postern keeps that connection for the next message; the next hop has closed it.
    closed.recv_timeout(Duration::from_secs(20)).unwrap();
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<idle2@t>",
        "x\r\n",
    );
    let (n, data) = stored.recv_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(n, 1);
    assert!(data.contains("Message-ID: <idle2@t>"), "{data}");
    let m = server.metrics_until(|m| m.contains("postern_recipients_delivered_total 2\n"));
    assert!(m.contains("postern_recipients_delivered_total 2\n"), "{m}");
    assert!(m.contains("postern_delivery_deferrals_total 0\n"), "{m}");
}

#[test]
fn mail_that_arrives_while_the_last_connection_says_quit_is_still_delivered() {
    // One connection per next hop: the only one idles out and says QUIT, whose reply comes
    // late. A message for that next hop queued meanwhile found the connection neither idle
    // nor replaceable (the limit counted it); it must not wait for a next message to come.
    let (quit_seen, quit_rx) = std::sync::mpsc::channel();
    let (tell, told) = std::sync::mpsc::channel::<()>();
    let told = std::sync::Mutex::new(Some(told));
    let (port, stored, _) = scripted_next_hop(
        move |n, line| {
            (n == 0 && line.starts_with("QUIT")).then(|| {
                let _ = quit_seen.send(());
                let told = told.lock().unwrap().take().unwrap();
                Act::SayWhenTold(told, "221 bye\r\n")
            })
        },
        Act::Say("250 2.0.0 taken\r\n"),
    );
    let route = format!("dest.test=127.0.0.1:{port}");
    let server = Server::start(&[
        "--route",
        &route,
        "--cores",
        "1",
        "--max-connections-per-destination",
        "1",
        "--outbound-idle-timeout",
        "200ms",
        "--retry-initial",
        "1h",
    ]);
    let wait = Duration::from_secs(30);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<first@t>",
        "one\r\n",
    );
    let (_, first) = stored.recv_timeout(wait).unwrap();
    assert!(first.contains("<first@t>"), "{first}");
    quit_rx
        .recv_timeout(wait)
        .expect("the idle connection said QUIT");
    // Queued for the next hop before its 250 is written (one core): then the QUIT's reply.
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<second@t>",
        "two\r\n",
    );
    tell.send(()).unwrap();
    let (_, second) = stored
        .recv_timeout(wait)
        .expect("the second message was never delivered");
    assert!(second.contains("<second@t>"), "{second}");
}

#[test]
fn a_trickle_of_mail_keeps_one_connection_and_lets_the_others_close() {
    // Eight messages held, handed over at once at a restart: eight connections to the sink,
    // idle once they are delivered. Then a message every 150 ms for 4 s: each goes to the
    // connection idle for the shortest time, so one carries them all and the others reach
    // their 2 s idle timeout. (Woken longest idle first, each of the eight got a message
    // every 1.2 s and none ever closed.)
    let (server, sink, out, _dir) = held_then_relayed(
        |held| send_in_one_session(held, "r@sink.test", "burst", 8),
        &[],
        &["--outbound-idle-timeout", "2s"],
    );
    let m = server.metrics_until(|m| m.contains("postern_recipients_delivered_total 8\n"));
    assert!(m.contains("postern_recipients_delivered_total 8\n"), "{m}");
    let open = |m: &str| -> u64 {
        m.lines()
            .find_map(|l| l.strip_prefix("postern_outbound_connections "))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no outbound connection gauge: {m}"))
    };
    let (mut c, _) = hello(&server);
    let began = Instant::now();
    let mut sent = 0;
    let mut during = None;
    while began.elapsed() < Duration::from_secs(4) {
        assert!(c.cmd("MAIL FROM:<s@origin.test>").starts_with("250"));
        assert!(c.cmd("RCPT TO:<r@sink.test>").starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        c.send(format!("Message-ID: <trickle{sent}@t>\r\n\r\nx\r\n.\r\n").as_bytes());
        assert!(c.line().starts_with("250 2.0.0"));
        sent += 1;
        // Read while the trickle still runs, past the idle timeout: what stays open for it.
        if during.is_none() && began.elapsed() >= Duration::from_millis(3500) {
            during = Some(open(&server.http_get("/metrics").1));
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    let during = during.expect("the trickle ran past 3.5 s");
    assert!(
        during <= 3,
        "{during} connections open for a message every 150 ms"
    );
    let delivered = format!("postern_recipients_delivered_total {}\n", 8 + sent);
    let m = server.metrics_until(|m| m.contains(&delivered));
    assert!(m.contains(&delivered), "{m}");
    drop(server);
    let counters = stop_sink(sink, out);
    assert!(
        counters.contains(&format!("postern_load_sink_messages_total {}\n", 8 + sent)),
        "{counters}"
    );
}

#[test]
fn mail_that_arrives_while_an_idle_connection_says_quit_opens_no_second_connection() {
    // Room for more connections this time: the worker whose QUIT's reply is late connects
    // again for the message queued meanwhile, and no other worker opens a connection of its
    // own for it (which made three connections for two messages).
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let opened = Arc::new(AtomicUsize::new(0));
    let (quit_seen, quit_rx) = std::sync::mpsc::channel::<usize>();
    let (tell, told) = std::sync::mpsc::channel::<()>();
    let told = Arc::new(Mutex::new(Some(told)));
    let (stored, stored_rx) = std::sync::mpsc::channel::<(usize, String)>();
    let counted = opened.clone();
    std::thread::spawn(move || {
        for conn in l.incoming().take(8) {
            let Ok(s) = conn else { return };
            let n = counted.fetch_add(1, Ordering::SeqCst);
            let (quit_seen, told, stored) = (quit_seen.clone(), told.clone(), stored.clone());
            std::thread::spawn(move || {
                let on_command = |line: &str| {
                    if line.starts_with("QUIT") {
                        let _ = quit_seen.send(n);
                        if n == 0 {
                            // The first connection's QUIT is answered when the test says.
                            let told = told.lock().unwrap().take().unwrap();
                            let _ = told.recv();
                        }
                    }
                };
                serve_plainly(s, "late-quit.test", on_command, |data| {
                    let _ = stored.send((n, data));
                    AtEnd::Say(b"250 2.0.0 taken\r\n")
                });
            });
        }
    });
    let route = format!("dest.test=127.0.0.1:{port}");
    let server = Server::start(&[
        "--route",
        &route,
        "--cores",
        "1",
        "--outbound-idle-timeout",
        "200ms",
        "--retry-initial",
        "1h",
    ]);
    let wait = Duration::from_secs(30);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<one@t>",
        "one\r\n",
    );
    let (n, first) = stored_rx.recv_timeout(wait).unwrap();
    assert!(n == 0 && first.contains("<one@t>"), "{n}: {first}");
    assert_eq!(
        quit_rx.recv_timeout(wait).unwrap(),
        0,
        "the idle connection says QUIT"
    );
    // Queued while that QUIT waits for its reply (one core: before its 250 is written).
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<two@t>",
        "two\r\n",
    );
    tell.send(()).unwrap();
    let (n, second) = stored_rx
        .recv_timeout(wait)
        .expect("the second message was never delivered");
    assert!(second.contains("<two@t>"), "{second}");
    // The connection that took it idles out in turn: by then a second one for the same
    // message would long have opened.
    assert_eq!(quit_rx.recv_timeout(wait).unwrap(), n);
    assert_eq!(
        opened.load(Ordering::SeqCst),
        2,
        "connections opened for two messages"
    );
}

/// When a [`gated_next_hop`] answers an end of data.
#[derive(Clone, Copy)]
enum Gate {
    /// Once this many sessions wait at their end of data together (a group; the count
    /// starts again for the next).
    Together(usize),
    /// Once this many connections are open at the same time.
    Open(usize),
}

/// A next hop that serves its connections concurrently (a thread each, 32 connections at
/// most): the first `refuse` get `421` as their greeting and a close. It offers no
/// PIPELINING. The first `free` ends of data are answered at once; each later one waits for
/// `gate` (10 s at most, then `451 4.3.0 gate`); after the wait the first `defer` of those
/// are answered `451 4.3.0 later`, the rest `250`. Each message answered 250 goes to the
/// receiver, with the number of its connection (from 0, in the order they came).
fn gated_next_hop(
    refuse: usize,
    free: usize,
    gate: Gate,
    defer: usize,
) -> (u16, std::sync::mpsc::Receiver<(usize, String)>) {
    use std::sync::{Arc, Condvar, Mutex};
    #[derive(Default)]
    struct State {
        open: usize,
        waiting: usize,
        group: u64,
        ends: usize,
        deferred: usize,
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    let shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
    std::thread::spawn(move || {
        for (n, conn) in l.incoming().take(32).enumerate() {
            let Ok(s) = conn else { return };
            let (tx, shared) = (tx.clone(), shared.clone());
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                if n < refuse {
                    let _ = w.write_all(b"421 4.3.2 gated.test busy\r\n");
                    return;
                }
                let (lock, changed) = &*shared;
                lock.lock().unwrap().open += 1;
                changed.notify_all();
                serve_plainly(
                    s,
                    "gated.test",
                    |_| {},
                    |data| {
                        let mut st = lock.lock().unwrap();
                        st.ends += 1;
                        let mut passed = st.ends <= free;
                        if !passed {
                            let until = Instant::now() + Duration::from_secs(10);
                            let group = st.group;
                            if let Gate::Together(n) = gate {
                                st.waiting += 1;
                                if st.waiting >= n {
                                    st.waiting = 0;
                                    st.group += 1;
                                    changed.notify_all();
                                }
                            }
                            loop {
                                passed = match gate {
                                    Gate::Together(_) => st.group != group,
                                    Gate::Open(n) => st.open >= n,
                                };
                                let left = until.saturating_duration_since(Instant::now());
                                if passed || left.is_zero() {
                                    break;
                                }
                                st = changed.wait_timeout(st, left).unwrap().0;
                            }
                            if !passed && matches!(gate, Gate::Together(_)) {
                                st.waiting -= 1;
                            }
                        }
                        AtEnd::Say(if !passed {
                            b"451 4.3.0 gate\r\n"
                        } else if st.deferred < defer {
                            st.deferred += 1;
                            b"451 4.3.0 later\r\n"
                        } else {
                            let _ = tx.send((n, data));
                            b"250 2.0.0 stored\r\n"
                        })
                    },
                );
                lock.lock().unwrap().open -= 1;
                changed.notify_all();
            });
        }
    });
    (port, rx)
}

/// A [`scripted_next_hop`] doing `after_data`, whose first connection answers QUIT only
/// when told: it returns the port, the stored messages, a receiver told when that QUIT
/// comes, and the sender that lets its reply go.
fn slow_to_quit(
    after_data: Act,
) -> (
    u16,
    StoredRx,
    std::sync::mpsc::Receiver<()>,
    std::sync::mpsc::Sender<()>,
) {
    let (quit_seen, quit_rx) = std::sync::mpsc::channel();
    let (release_quit, quit_gate) = std::sync::mpsc::channel::<()>();
    let quit_gate = std::sync::Mutex::new(Some(quit_gate));
    let (port, stored, _) = scripted_next_hop(
        move |n, line| {
            (n == 0 && line.starts_with("QUIT")).then(|| {
                let _ = quit_seen.send(());
                Act::SayWhenTold(quit_gate.lock().unwrap().take().unwrap(), "221 bye\r\n")
            })
        },
        after_data,
    );
    (port, stored, quit_rx, release_quit)
}

/// A server on one core with one outbound connection in all (kept idle for 60 s unless
/// `extra` says), routing a.test to 127.0.0.1:`port_a` and b.test to a next hop it starts,
/// whose stored messages it returns; with `extra` flags.
fn one_connection_for_two_next_hops(port_a: u16, extra: &[&str]) -> (Server, StoredRx) {
    let (port_b, stored_b, _) = scripted_next_hop(|_, _| None, Act::Say("250 2.0.0 stored\r\n"));
    let route_a = format!("a.test=127.0.0.1:{port_a}");
    let route_b = format!("b.test=127.0.0.1:{port_b}");
    let mut args = vec![
        "--cores",
        "1",
        "--route",
        &route_a,
        "--route",
        &route_b,
        "--max-outbound-connections",
        "1",
    ];
    if !extra.contains(&"--outbound-idle-timeout") {
        args.extend(["--outbound-idle-timeout", "60s"]);
    }
    args.extend_from_slice(extra);
    (Server::start(&args), stored_b)
}

/// Sends `n` messages from a@origin.test to b@dest.test (Message-IDs `<{prefix}{k}@t>`) and
/// waits until each is deferred; returns their queue IDs.
fn send_until_deferred(server: &Server, prefix: &str, n: usize) -> Vec<String> {
    let ids: Vec<String> = (0..n)
        .map(|k| {
            send(
                server,
                "a@origin.test",
                &["b@dest.test"],
                &format!("<{prefix}{k}@t>"),
                "x\r\n",
            )
        })
        .collect();
    for id in &ids {
        server.log_until(|l| l.contains(id.as_str()) && l.contains("status=\"deferred\""));
    }
    ids
}

/// [`send_until_deferred`], then a flush.
fn defer_then_flush(server: &Server, prefix: &str, n: usize) {
    send_until_deferred(server, prefix, n);
    let out = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["queue", "--flush", "--spool"])
        .arg(&server.spool)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn a_flush_wakes_every_idle_connection_to_a_next_hop_not_one() {
    // Four messages on four connections are put off together; the connections stay, idle.
    // A flush queues the four jobs in one go: each idle connection takes one. (Woken one
    // at a time, one connection would carry them one after another, and the next hop here
    // takes them only four at once.)
    let (port, stored) = gated_next_hop(0, 0, Gate::Together(4), 4);
    let route = format!("dest.test=127.0.0.1:{port}");
    let server = Server::start(&[
        "--cores",
        "1",
        "--route",
        &route,
        "--retry-initial",
        "1h",
        "--outbound-idle-timeout",
        "60s",
    ]);
    defer_then_flush(&server, "idle", 4);
    assert_eq!(
        message_ids(&stored, 4),
        ["<idle0@t>", "<idle1@t>", "<idle2@t>", "<idle3@t>"]
    );
}

#[test]
fn once_a_paused_next_hop_answers_the_mail_held_for_it_gets_its_other_connections() {
    // Two greetings of 421 in a row pause the next hop; the mail that comes meanwhile is
    // held for the pause's end, and then tried over one connection. Once that one is
    // answered, the others open for the rest (here, the next hop takes the rest only while
    // two connections are open).
    let (port, stored) = gated_next_hop(2, 1, Gate::Open(2), 0);
    let route = format!("dest.test=127.0.0.1:{port}");
    let mut server = Server::start(&[
        "--cores",
        "1",
        "--route",
        &route,
        "--retry-initial",
        "2s",
        "--retry-max",
        "2s",
    ]);
    for k in 0..2 {
        let id = send(
            &server,
            "a@origin.test",
            &["b@dest.test"],
            &format!("<down{k}@t>"),
            "x\r\n",
        );
        server.log_until(|l| l.contains(id.as_str()) && l.contains("status=\"deferred\""));
    }
    server.log_until(|l| l.contains("delivery to it paused"));
    for k in 2..6 {
        send(
            &server,
            "a@origin.test",
            &["b@dest.test"],
            &format!("<down{k}@t>"),
            "x\r\n",
        );
    }
    assert_eq!(
        message_ids(&stored, 6),
        [
            "<down0@t>",
            "<down1@t>",
            "<down2@t>",
            "<down3@t>",
            "<down4@t>",
            "<down5@t>"
        ]
    );
    // None of them waited 10 s at the gate for a second connection and was put off.
    let log = server.terminate_for_log();
    assert!(!log.contains("4.3.0 gate"), "{log}");
}

/// The Message-ID field's value in a message's content (empty without one).
fn message_id_of(data: &str) -> String {
    data.lines()
        .find_map(|l| l.strip_prefix("Message-ID: "))
        .unwrap_or_default()
        .to_owned()
}

/// What a [`serve_plainly`] next hop does at an end of data.
enum AtEnd {
    /// Says this and goes on.
    Say(&'static [u8]),
    /// Says this (a 421), then reads until the client closes.
    BreakOff(&'static [u8]),
}

/// Serves one connection as a plain next hop until QUIT or the close: greets as `name`,
/// offers 8BITMIME, says 354 to DATA and 250 to other commands (after calling `on_command`
/// with the line);
/// at each end of data `at_end`, given the message's content, says what to do. Returns
/// whether it broke the session off.
fn serve_plainly(
    s: std::net::TcpStream,
    name: &str,
    mut on_command: impl FnMut(&str),
    mut at_end: impl FnMut(String) -> AtEnd,
) -> bool {
    use std::io::Read;
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let _ = w.write_all(format!("220 {name} ESMTP\r\n").as_bytes());
    let (mut line, mut data, mut in_data) = (String::new(), String::new(), false);
    while r.read_line(&mut line).unwrap_or(0) > 0 {
        let reply: &[u8] = if in_data && line == ".\r\n" {
            in_data = false;
            match at_end(std::mem::take(&mut data)) {
                AtEnd::Say(reply) => reply,
                AtEnd::BreakOff(reply) => {
                    let _ = w.write_all(reply);
                    let _ = r.read_to_end(&mut Vec::new());
                    return true;
                }
            }
        } else if in_data {
            data.push_str(&line);
            b""
        } else {
            on_command(&line);
            if line.starts_with("EHLO") {
                b"250-next.test\r\n250 8BITMIME\r\n"
            } else if line.starts_with("DATA") {
                in_data = true;
                b"354 go\r\n"
            } else if line.starts_with("QUIT") {
                let _ = w.write_all(b"221 bye\r\n");
                break;
            } else {
                b"250 ok\r\n"
            }
        };
        let _ = w.write_all(reply);
        line.clear();
    }
    false
}

/// A next hop that takes at most `limit` connections from us at once (a thread each; 64
/// connections in all): one more gets `421 4.7.0` as its greeting and a close, as Postfix's
/// `smtpd_client_connection_count_limit` does. Each end of data takes a moment (50 ms) and is
/// answered 250; the Message-IDs go to the receiver.
fn limited_next_hop(limit: usize) -> (u16, std::sync::mpsc::Receiver<String>) {
    limited_next_hop_saying(
        limit,
        b"421 4.7.0 limited.test Error: too many connections\r\n",
    )
}

/// [`limited_next_hop`], with `over` the only thing a connection over the limit is sent
/// before it is closed: nothing, as a host that drops connections past its limit (a
/// firewall's per-client limit, an inetd-style cap).
fn limited_next_hop_saying(
    limit: usize,
    over: &'static [u8],
) -> (u16, std::sync::mpsc::Receiver<String>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    let open = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        for conn in l.incoming().take(64) {
            let Ok(s) = conn else { return };
            let mut w = s.try_clone().unwrap();
            if open.fetch_add(1, Ordering::SeqCst) >= limit {
                open.fetch_sub(1, Ordering::SeqCst);
                let _ = w.write_all(over);
                continue;
            }
            let (tx, open) = (tx.clone(), open.clone());
            std::thread::spawn(move || {
                serve_plainly(
                    s,
                    "limited.test",
                    |_| {},
                    |data| {
                        std::thread::sleep(Duration::from_millis(50));
                        let _ = tx.send(message_id_of(&data));
                        AtEnd::Say(b"250 2.0.0 stored\r\n")
                    },
                );
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (port, rx)
}

#[test]
fn a_next_hop_that_limits_our_connections_gets_its_mail_over_those_it_takes() {
    // The mail queues up faster than two connections carry it, so more are opened, and the
    // third gets 421. The two that work carry everything, at once, not after a retry delay
    // of an hour for each message the third connection would have taken.
    twenty_over_the_connections_it_takes(limited_next_hop(2), "lim");
}

/// Twenty messages sent to a next hop that takes only some of our connections: all of them
/// reach it over those, none deferred.
fn twenty_over_the_connections_it_takes(
    (port, stored): (u16, std::sync::mpsc::Receiver<String>),
    tag: &str,
) {
    let route = format!("dest.test=127.0.0.1:{port}");
    let mut server = Server::start(&["--cores", "1", "--route", &route, "--retry-initial", "1h"]);
    let ids: Vec<String> = (0..20).map(|k| format!("<{tag}{k}@t>")).collect();
    for id in &ids {
        send(&server, "a@origin.test", &["b@dest.test"], id, "x\r\n");
    }
    all_stored_none_deferred(&stored, &ids, &mut server);
}

#[test]
fn a_burst_of_connections_to_a_next_hop_that_limits_them_loses_no_time() {
    // Twenty messages held, then released at once by a restart: connections open together,
    // and those over the limit are refused while the others are still opening.
    let (port, stored) = limited_next_hop(2);
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let mut held = Server::start_in(&["--cores", "1"], spool.clone(), None);
    let ids: Vec<String> = (0..20).map(|k| format!("<burst{k}@t>")).collect();
    for id in &ids {
        send(&held, "a@origin.test", &["b@dest.test"], id, "x\r\n");
    }
    assert!(held.terminate().success());
    let route = format!("dest.test=127.0.0.1:{port}");
    let mut server = Server::start_in(
        &["--cores", "1", "--route", &route, "--retry-initial", "1h"],
        spool,
        Some(dir),
    );
    all_stored_none_deferred(&stored, &ids, &mut server);
}

#[test]
fn a_next_hop_that_drops_connections_past_its_limit_gets_its_mail_over_those_it_takes() {
    // As above, but the third connection is closed before any greeting: no host answered it,
    // yet two connections to the next hop are working. The jobs wait for those two, not an
    // hour's retry.
    twenty_over_the_connections_it_takes(limited_next_hop_saying(2, b""), "drop");
}

#[test]
fn a_next_hop_gone_silent_beside_an_open_connection_is_not_taken_for_a_connection_limit() {
    // The next hop takes one connection and the first message's data, then answers nothing
    // more, there or on new connections (they wait in its backlog, never greeted). The
    // second message's connection gets no greeting: the connection beside it is open, but
    // had no answer while the attempt lasted, so it does not count as working. The second
    // message is deferred, as for a next hop that cannot be reached; no limit is learned.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (got_data, data_in) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok((s, _)) = l.accept() else { return };
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let _ = w.write_all(b"220 silent.test ESMTP\r\n");
        let (mut line, mut in_data) = (String::new(), false);
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            let reply: &[u8] = if in_data && line == ".\r\n" {
                // Silent from now on; the listener stays open and accepts nothing more.
                let _ = got_data.send(());
                b""
            } else if in_data {
                b""
            } else if line.starts_with("EHLO") {
                b"250 silent.test\r\n"
            } else if line.starts_with("DATA") {
                in_data = true;
                b"354 go\r\n"
            } else {
                b"250 ok\r\n"
            };
            let _ = w.write_all(reply);
            line.clear();
        }
        drop(l);
    });
    let route = format!("dest.test=127.0.0.1:{port}");
    let mut server = Server::start(&[
        "--cores",
        "1",
        "--route",
        &route,
        "--retry-initial",
        "1h",
        "--smtp-greeting-timeout",
        "3s",
    ]);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<first@t>",
        "x\r\n",
    );
    data_in.recv_timeout(Duration::from_secs(20)).unwrap();
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<second@t>",
        "x\r\n",
    );
    let deferred = server.log_until(|l| l.contains("status=\"deferred\""));
    assert!(deferred.contains("timed out"), "{deferred}");
    let log = server.terminate_for_log();
    assert!(!log.contains("refused another connection"), "{log}");
}

/// Waits (20 s at most) until the next hop has stored every message of `ids`, then stops the
/// server and checks that none was deferred and that the limit was learned.
fn all_stored_none_deferred(
    stored: &std::sync::mpsc::Receiver<String>,
    ids: &[String],
    server: &mut Server,
) {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < ids.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match stored.recv_timeout(left) {
            Ok(id) => got.push(id),
            Err(_) => panic!("{} of {} delivered: {got:?}", got.len(), ids.len()),
        }
    }
    got.sort();
    let mut want = ids.to_vec();
    want.sort();
    assert_eq!(got, want);
    let log = server.terminate_for_log();
    assert!(log.contains("to it for 300s"), "{log}");
    assert_eq!(
        log.matches("to it for 300s").count(),
        1,
        "logged once: {log}"
    );
    assert!(!log.contains("status=\"deferred\""), "{log}");
}

#[test]
fn past_the_outbound_connection_cap_mail_for_another_next_hop_waits_for_a_connection_to_end() {
    // One outbound connection in all: while the first next hop holds its transaction, mail
    // for a second next hop gets no connection; once the first transaction is answered, its
    // connection, idle, gives its place up (not after --outbound-idle-timeout).
    let (release, gate) = std::sync::mpsc::channel();
    let (port_a, stored_a, _) =
        scripted_next_hop(|_, _| None, Act::SayWhenTold(gate, "250 2.0.0 stored\r\n"));
    let (server, stored_b) = one_connection_for_two_next_hops(port_a, &[]);
    send(&server, "s@origin.test", &["r@a.test"], "<a@t>", "x\r\n");
    // The first next hop has the message and holds its reply: the one connection is taken.
    let (_, data) = stored_a.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(data.contains("Message-ID: <a@t>"), "{data}");
    send(&server, "s@origin.test", &["r@b.test"], "<b@t>", "x\r\n");
    // Delivered in milliseconds with a connection of its own; here it waits (2 s is the
    // bound of a look for something that should not happen).
    assert!(
        stored_b.recv_timeout(Duration::from_secs(2)).is_err(),
        "the second next hop got a connection past the cap"
    );
    release.send(()).unwrap();
    let (_, data) = stored_b.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(data.contains("Message-ID: <b@t>"), "{data}");
}

#[test]
fn a_next_hop_with_nothing_going_on_is_forgotten_and_its_connection_counted_while_open() {
    let (port, stored, _) = scripted_next_hop(|_, _| None, Act::Say("250 2.0.0 stored\r\n"));
    let route = format!("dest.test=127.0.0.1:{port}");
    let server = Server::start(&[
        "--cores",
        "1",
        "--route",
        &route,
        "--outbound-idle-timeout",
        "3s",
        "--metrics",
        "127.0.0.1:0",
    ]);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<hop@t>",
        "x\r\n",
    );
    stored.recv_timeout(Duration::from_secs(20)).unwrap();
    // Kept idle for 3 s: one connection, one next hop.
    let one = "postern_outbound_connections 1\n";
    let text = server.metrics_until(|m| m.contains(one) && m.contains("postern_next_hops 1\n"));
    assert!(text.contains(one), "{text}");
    // Then QUIT, and nothing is left of the next hop (3 s idle, then a second's tick at
    // most: looked for over 15 s).
    let none = "postern_next_hops 0\n";
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut text = server.metrics_until(|m| m.contains(none));
    while !text.contains(none) && Instant::now() < deadline {
        text = server.metrics_until(|m| m.contains(none));
    }
    assert!(text.contains(none), "{text}");
    assert!(text.contains("postern_outbound_connections 0\n"), "{text}");
}

#[test]
fn mail_that_arrives_while_a_connection_gives_its_place_up_is_still_delivered() {
    // One outbound connection in all, one per next hop. The first next hop's connection,
    // idle while mail for the second waits in line, gives its place up and says QUIT, whose
    // reply comes late; a message for the first next hop queued meanwhile must get a
    // connection in its turn, not wait for more mail to come.
    let (release_data, data_gate) = std::sync::mpsc::channel();
    let (port_a, stored_a, quit_rx, release_quit) =
        slow_to_quit(Act::SayWhenTold(data_gate, "250 2.0.0 stored\r\n"));
    let (server, stored_b) = one_connection_for_two_next_hops(
        port_a,
        &[
            "--max-connections-per-destination",
            "1",
            "--retry-initial",
            "1h",
        ],
    );
    let wait = Duration::from_secs(20);
    send(&server, "s@origin.test", &["r@a.test"], "<a1@t>", "x\r\n");
    // The first next hop holds its reply to the data: the one connection is taken.
    stored_a.recv_timeout(wait).unwrap();
    send(&server, "s@origin.test", &["r@b.test"], "<b@t>", "x\r\n");
    release_data.send(()).unwrap();
    // Idle with the second next hop in line: QUIT, answered late.
    quit_rx.recv_timeout(wait).unwrap();
    send(&server, "s@origin.test", &["r@a.test"], "<a2@t>", "x\r\n");
    let (_, data) = stored_b.recv_timeout(wait).unwrap();
    assert!(data.contains("Message-ID: <b@t>"), "{data}");
    release_quit.send(()).unwrap();
    let (n, data) = stored_a.recv_timeout(wait).unwrap();
    assert!(data.contains("Message-ID: <a2@t>"), "{data}");
    assert_eq!(n, 1, "a new connection");
}

#[test]
fn a_next_hop_at_the_outbound_cap_keeps_its_connections_for_its_backlog() {
    // Two outbound connections in all. Ten messages to one next hop are put off, then a
    // flush queues them in one go: the two connections, idle, take them, and the rest wait
    // for those. The next hop has connections, so it is not in line for one, and its
    // connections do not give their places up to it (a new connection, with its handshakes,
    // after every transaction).
    let (port, stored) = gated_next_hop(0, usize::MAX, Gate::Open(1), 10);
    let route = format!("dest.test=127.0.0.1:{port}");
    let server = Server::start(&[
        "--cores",
        "1",
        "--route",
        &route,
        "--max-outbound-connections",
        "2",
        "--outbound-idle-timeout",
        "60s",
        "--retry-initial",
        "1h",
    ]);
    defer_then_flush(&server, "backlog", 10);
    let connections: Vec<usize> = (0..10)
        .map(|k| {
            stored
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|e| panic!("message {k}: {e}"))
                .0
        })
        .collect();
    assert!(
        connections.iter().all(|&n| n < 2),
        "connections made: {connections:?}"
    );
}

#[test]
fn an_idle_connection_asked_for_its_place_gives_it_before_its_quit_is_answered() {
    // One outbound connection in all. The first next hop's connection sits idle; mail for a
    // second next hop comes: the idle connection ends for it, and the place is the second
    // next hop's at once, not once the QUIT is answered (here it is not answered until the
    // second next hop has its message; postern waits 5 s for a QUIT's reply).
    let (port_a, stored_a, quit_rx, release_quit) = slow_to_quit(Act::Say("250 2.0.0 stored\r\n"));
    let (server, stored_b) = one_connection_for_two_next_hops(port_a, &[]);
    let wait = Duration::from_secs(20);
    send(&server, "s@origin.test", &["r@a.test"], "<a@t>", "x\r\n");
    stored_a.recv_timeout(wait).unwrap();
    send(&server, "s@origin.test", &["r@b.test"], "<b@t>", "x\r\n");
    quit_rx.recv_timeout(wait).unwrap();
    // Within 3 s (in milliseconds here): before postern's 5 s wait for the QUIT's reply.
    let got = stored_b.recv_timeout(Duration::from_secs(3));
    release_quit.send(()).unwrap();
    let (_, data) = got.expect("the second next hop waited for the first one's QUIT");
    assert!(data.contains("Message-ID: <b@t>"), "{data}");
}

#[test]
fn idle_connections_of_other_next_hops_give_their_places_to_a_backlog() {
    // Three outbound connections in all: two sit idle at next hops that had one message
    // each, while a third next hop gets a backlog on the one place left. The idle ones give
    // their places up to it (here its next hop takes mail only while three connections are
    // open to it).
    let (port_1, stored_1, _) = scripted_next_hop(|_, _| None, Act::Say("250 2.0.0 stored\r\n"));
    let (port_2, stored_2, _) = scripted_next_hop(|_, _| None, Act::Say("250 2.0.0 stored\r\n"));
    let (port_big, stored_big) = gated_next_hop(0, 0, Gate::Open(3), 0);
    let routes = [
        format!("h1.test=127.0.0.1:{port_1}"),
        format!("h2.test=127.0.0.1:{port_2}"),
        format!("big.test=127.0.0.1:{port_big}"),
    ];
    let mut server = Server::start(&[
        "--cores",
        "1",
        "--route",
        &routes[0],
        "--route",
        &routes[1],
        "--route",
        &routes[2],
        "--max-outbound-connections",
        "3",
        "--outbound-idle-timeout",
        "60s",
    ]);
    send(&server, "s@origin.test", &["r@h1.test"], "<h1@t>", "x\r\n");
    send(&server, "s@origin.test", &["r@h2.test"], "<h2@t>", "x\r\n");
    stored_1.recv_timeout(Duration::from_secs(20)).unwrap();
    stored_2.recv_timeout(Duration::from_secs(20)).unwrap();
    for k in 0..9 {
        send(
            &server,
            "s@origin.test",
            &["r@big.test"],
            &format!("<big{k}@t>"),
            "x\r\n",
        );
    }
    assert_eq!(message_ids(&stored_big, 9).len(), 9);
    let log = server.terminate_for_log();
    assert!(!log.contains("4.3.0 gate"), "{log}");
}

#[test]
fn a_trickle_of_mail_keeps_its_connection_beside_a_backlog_and_gives_it_up_when_quiet() {
    // Two outbound connections in all. One next hop gets a stream of messages on its one
    // connection, while another, on the other place, has a backlog (its next hop
    // answers only once two connections are open to it). An idle connection gives its place
    // to a backlog only after a second idle: the trickle keeps its connection rather than
    // losing it after each message, and once the trickle ends the place goes to the backlog.
    let (port_t, stored_t) = gated_next_hop(0, usize::MAX, Gate::Open(1), 0);
    let (port_b, stored_b) = gated_next_hop(0, 0, Gate::Open(2), 0);
    let routes = [
        format!("trickle.test=127.0.0.1:{port_t}"),
        format!("big.test=127.0.0.1:{port_b}"),
    ];
    let mut server = Server::start(&[
        "--cores",
        "1",
        "--route",
        &routes[0],
        "--route",
        &routes[1],
        "--max-outbound-connections",
        "2",
        "--outbound-idle-timeout",
        "60s",
    ]);
    let trickle = |k: usize| {
        let id = format!("<t{k}@t>");
        send(&server, "s@origin.test", &["r@trickle.test"], &id, "x\r\n");
    };
    trickle(0);
    assert_eq!(stored_t.recv_timeout(Duration::from_secs(20)).unwrap().0, 0);
    // The trickle's connection is idle from here: the backlog and the next trickle message
    // go in at once (the backlog's three in one session), well inside its second of grace.
    send_in_one_session(&server, "r@big.test", "big", 3);
    // The pace of the trickle is the scenario: a message every few tens of milliseconds
    // (its own session and sync, then a pause), each well inside the second of idle after
    // which its connection would go to the backlog, with room for a slow machine.
    for k in 1..=10 {
        trickle(k);
        std::thread::sleep(Duration::from_millis(20));
    }
    for k in 1..=10 {
        let (n, _) = stored_t
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("trickle message {k}: {e}"));
        assert_eq!(n, 0, "trickle message {k} came over a new connection");
    }
    // The backlog's next hop had no second connection while the trickle ran (it answers
    // once it has one): nothing of the backlog is delivered yet. Without the grace, the
    // trickle's idle connection gave its place up at the backlog's first message.
    assert!(
        stored_b.try_recv().is_err(),
        "the backlog got a second connection during the trickle"
    );
    // Then the trickle's connection, idle, gives its place to the backlog.
    assert_eq!(message_ids(&stored_b, 3).len(), 3);
    let log = server.terminate_for_log();
    assert!(!log.contains("4.3.0 gate"), "{log}");
}

#[test]
fn connections_that_give_their_places_up_do_not_pile_up_waiting_for_quit() {
    // One outbound connection in all, and five next hops that never answer QUIT: mail to
    // each in turn makes each connection give its place up to the next. Counted out before
    // its QUIT, each would stay open for the 5 s wait for the reply; past one such wait at a
    // time, a connection says QUIT and closes at once. At the next hops: at most the one
    // connection, one waiting for its QUIT's reply, and for a moment one closing.
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let (open, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (stored_tx, stored) = std::sync::mpsc::channel();
    let mut routes = Vec::new();
    for hop in 0..5 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        routes.push(format!(
            "h{hop}.test=127.0.0.1:{}",
            l.local_addr().unwrap().port()
        ));
        let (open, most, stored_tx) = (open.clone(), most.clone(), stored_tx.clone());
        std::thread::spawn(move || {
            for conn in l.incoming().take(8) {
                let Ok(s) = conn else { return };
                let (open, most, stored_tx) = (open.clone(), most.clone(), stored_tx.clone());
                most.fetch_max(open.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    let mut w = s.try_clone().unwrap();
                    let mut r = BufReader::new(s);
                    let _ = w.write_all(b"220 slow-quit.test ESMTP\r\n");
                    let (mut line, mut in_data) = (String::new(), false);
                    while r.read_line(&mut line).unwrap_or(0) > 0 {
                        let reply: &[u8] = if in_data && line == ".\r\n" {
                            in_data = false;
                            let _ = stored_tx.send(());
                            b"250 2.0.0 stored\r\n"
                        } else if in_data || line.starts_with("QUIT") {
                            b""
                        } else if line.starts_with("DATA") {
                            in_data = true;
                            b"354 go\r\n"
                        } else {
                            b"250 ok\r\n"
                        };
                        let _ = w.write_all(reply);
                        line.clear();
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
    }
    let mut args = vec![
        "--cores",
        "1",
        "--max-outbound-connections",
        "1",
        "--outbound-idle-timeout",
        "60s",
    ];
    for r in &routes {
        args.extend(["--route", r.as_str()]);
    }
    let server = Server::start(&args);
    for k in 0..10 {
        send(
            &server,
            "s@origin.test",
            &[&format!("r@h{}.test", k % 5)],
            &format!("<q{k}@t>"),
            "x\r\n",
        );
    }
    for k in 0..10 {
        stored
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("message {k}: {e}"));
    }
    let most = most.load(Ordering::SeqCst);
    assert!(most <= 3, "{most} connections open at once");
}

#[test]
fn a_connection_saying_quit_after_its_idle_time_gives_its_place_when_it_is_wanted() {
    // One outbound connection in all. The first next hop's connection idles out and says
    // QUIT, whose reply comes late; mail for a second next hop that comes meanwhile gets the
    // place then, not once the reply has come (postern waits 5 s for it).
    let (port_a, stored_a, quit_rx, release_quit) = slow_to_quit(Act::Say("250 2.0.0 stored\r\n"));
    let (server, stored_b) =
        one_connection_for_two_next_hops(port_a, &["--outbound-idle-timeout", "300ms"]);
    let wait = Duration::from_secs(20);
    send(&server, "s@origin.test", &["r@a.test"], "<a@t>", "x\r\n");
    stored_a.recv_timeout(wait).unwrap();
    quit_rx.recv_timeout(wait).unwrap();
    send(&server, "s@origin.test", &["r@b.test"], "<b@t>", "x\r\n");
    // Within 3 s (in milliseconds here): before postern's 5 s wait for the QUIT's reply.
    let got = stored_b.recv_timeout(Duration::from_secs(3));
    release_quit.send(()).unwrap();
    let (_, data) = got.expect("the second next hop waited for the first one's QUIT");
    assert!(data.contains("Message-ID: <b@t>"), "{data}");
}

/// A next hop without PIPELINING that refuses `<later@...>` with 450 and takes the rest;
/// sends each command line it reads (its verb) down the channel.
fn next_hop_recording_commands() -> (u16, std::sync::mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(4) {
            let Ok(mut stream) = stream else { return };
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let _ = stream.write_all(b"220 hop.test ESMTP\r\n");
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            let mut in_data = false;
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                let reply: &[u8] = if in_data {
                    if line == ".\r\n" {
                        in_data = false;
                        b"250 2.0.0 stored\r\n"
                    } else {
                        b""
                    }
                } else {
                    let verb = line.split_whitespace().next().unwrap_or("").to_owned();
                    let _ = tx.send(verb.to_ascii_uppercase());
                    match verb.to_ascii_uppercase().as_str() {
                        "DATA" => {
                            in_data = true;
                            b"354 go\r\n"
                        }
                        "RCPT" if line.contains("<later@") => b"450 4.2.0 try later\r\n",
                        "QUIT" => {
                            let _ = stream.write_all(b"221 2.0.0 bye\r\n");
                            break;
                        }
                        _ => b"250 2.0.0 ok\r\n",
                    }
                };
                let _ = stream.write_all(reply);
                line.clear();
            }
        }
    });
    (port, rx)
}

#[test]
fn a_kept_connection_whose_last_transaction_was_refused_says_quit_at_shutdown() {
    // Without PIPELINING, the RSET after the refused transaction is still unanswered when the
    // server stops: QUIT goes out once its reply is in (RFC 5321 4.1.1.10).
    let (port, commands) = next_hop_recording_commands();
    let route = format!("dest.test=127.0.0.1:{port}");
    let mut server = Server::start(&["--route", &route, "--cores", "1"]);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<first@t>",
        "x\r\n",
    );
    let id = send(
        &server,
        "a@origin.test",
        &["later@dest.test"],
        "<second@t>",
        "y\r\n",
    );
    server.log_until(|l| l.contains(&id) && l.contains("deferred"));
    let mut seen = Vec::new();
    while let Ok(verb) = commands.recv_timeout(Duration::from_secs(5)) {
        seen.push(verb);
        if seen.iter().filter(|v| *v == "RSET").count() >= 2 {
            break;
        }
    }
    assert!(server.terminate().success());
    while let Ok(verb) = commands.recv_timeout(Duration::from_secs(5)) {
        seen.push(verb);
        if seen.last().is_some_and(|v| v == "QUIT") {
            break;
        }
    }
    assert_eq!(seen.last().map(String::as_str), Some("QUIT"), "{seen:?}");
}

/// A next hop serving its connections concurrently (a thread each, 32 connections at most),
/// which breaks off the transactions of `<fail0@t>` and `<fail1@t>` with `421` and answers
/// every other message 250 (its Message-ID to the first receiver). `<fail0@t>`'s end of data
/// is answered only once a connection that had a message answered has said something after
/// it (its QUIT when idle: postern has taken that answer); the second receiver is told when
/// postern has closed a broken-off connection (it has taken that break too). `<failr@t>` is
/// broken off the same way, and the next connection then gets `421` as its greeting.
fn next_hop_breaking_off_beside_others() -> (
    u16,
    std::sync::mpsc::Receiver<String>,
    std::sync::mpsc::Receiver<()>,
) {
    use std::sync::{Arc, Condvar, Mutex};
    #[derive(Default)]
    struct State {
        answered_on: Option<usize>,
        spoke_after: bool,
        refuse_next: bool,
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (stored_tx, stored) = std::sync::mpsc::channel();
    let (closed_tx, closed) = std::sync::mpsc::channel();
    let shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
    std::thread::spawn(move || {
        for (n, conn) in l.incoming().take(32).enumerate() {
            let Ok(mut s) = conn else { return };
            if std::mem::take(&mut shared.0.lock().unwrap().refuse_next) {
                let _ = s.write_all(b"421 4.3.2 flaky.test busy\r\n");
                continue;
            }
            let (stored_tx, closed_tx, shared) =
                (stored_tx.clone(), closed_tx.clone(), shared.clone());
            std::thread::spawn(move || {
                let (lock, changed) = &*shared;
                let on_command = |_: &str| {
                    let mut st = lock.lock().unwrap();
                    if st.answered_on == Some(n) {
                        st.spoke_after = true;
                        changed.notify_all();
                    }
                };
                let at_end = |data: String| {
                    let id = message_id_of(&data);
                    if id == "<fail0@t>" {
                        let st = lock.lock().unwrap();
                        let (st, _) = changed
                            .wait_timeout_while(st, Duration::from_secs(20), |st| !st.spoke_after)
                            .unwrap();
                        assert!(st.spoke_after, "no answer was taken beside it");
                    }
                    // And the next connection gets 421 as its greeting.
                    if id == "<failr@t>" {
                        lock.lock().unwrap().refuse_next = true;
                    }
                    if id.starts_with("<fail") {
                        return AtEnd::BreakOff(b"421 4.3.2 flaky.test going down\r\n");
                    }
                    let _ = stored_tx.send(id);
                    let mut st = lock.lock().unwrap();
                    st.answered_on = Some(n);
                    st.spoke_after = false;
                    AtEnd::Say(b"250 2.0.0 stored\r\n")
                };
                if serve_plainly(s, "flaky.test", on_command, at_end) {
                    let _ = closed_tx.send(());
                }
            });
        }
    });
    (port, stored, closed)
}

#[test]
fn a_next_hop_that_breaks_off_now_and_then_while_it_answers_others_is_not_paused() {
    // One connection's transaction breaks off while another connection has a message
    // answered; then one more breaks off. Two breaks with no answer between them, but the
    // first came beside an answer: the next hop works, and is not paused as a whole (which
    // would hold all its mail for a minute, and a next hop failing one session in ten for
    // most of the time).
    let (server, stored, closed) = breaking_off_behind(&["--outbound-idle-timeout", "1s"]);
    let from = "a@origin.test";
    send(&server, from, &["b@dest.test"], "<fail0@t>", "x\r\n");
    // On a second connection while the first waits; answered; that connection, idle, says
    // QUIT after a second, which lets the first's 421 go.
    send(&server, from, &["b@dest.test"], "<ok1@t>", "x\r\n");
    assert_eq!(
        stored.recv_timeout(Duration::from_secs(20)).unwrap(),
        "<ok1@t>"
    );
    closed.recv_timeout(Duration::from_secs(30)).unwrap();
    broken_off(&server, &closed, "<fail1@t>");
    delivered_unpaused(&server, &stored, "<ok2@t>");
}

/// postern on one core (with `flags`, and a first retry after 5 minutes) sending dest.test
/// to a [`next_hop_breaking_off_beside_others`]: the server, and the next hop's receivers.
fn breaking_off_behind(
    flags: &[&str],
) -> (
    Server,
    std::sync::mpsc::Receiver<String>,
    std::sync::mpsc::Receiver<()>,
) {
    let (port, stored, closed) = next_hop_breaking_off_beside_others();
    let route = format!("dest.test=127.0.0.1:{port}");
    let mut args = vec!["--cores", "1", "--route", &route, "--retry-initial", "5m"];
    args.extend_from_slice(flags);
    (Server::start(&args), stored, closed)
}

/// Mail sent now goes at once, not after a pause of the next hop, and none was logged.
fn delivered_unpaused(server: &Server, stored: &std::sync::mpsc::Receiver<String>, id: &str) {
    send(server, "a@origin.test", &["b@dest.test"], id, "x\r\n");
    assert_eq!(stored.recv_timeout(Duration::from_secs(20)).unwrap(), id);
    assert_eq!(
        server.log_count(|l| l.contains("suspended") || l.contains("paused")),
        0
    );
}

/// postern on one core with one connection at a time to a
/// [`next_hop_breaking_off_beside_others`] for dest.test, once `answered` messages
/// (`<ok0@t>`...) went there and were answered: the server, and the next hop's receivers.
fn one_connection_after_answers(
    answered: usize,
) -> (
    Server,
    std::sync::mpsc::Receiver<String>,
    std::sync::mpsc::Receiver<()>,
) {
    let (server, stored, closed) = breaking_off_behind(&[
        "--max-connections-per-destination",
        "1",
        // The connection is kept between messages however slow the machine.
        "--outbound-idle-timeout",
        "60s",
    ]);
    for k in 0..answered {
        let ok = format!("<ok{k}@t>");
        send(&server, "a@origin.test", &["b@dest.test"], &ok, "x\r\n");
        assert_eq!(stored.recv_timeout(Duration::from_secs(20)).unwrap(), ok);
    }
    (server, stored, closed)
}

/// Sends `message_id`, whose transaction the next hop breaks off, and waits until postern
/// has closed that connection and deferred the message.
fn broken_off(server: &Server, closed: &std::sync::mpsc::Receiver<()>, message_id: &str) {
    let id = send(
        server,
        "a@origin.test",
        &["b@dest.test"],
        message_id,
        "x\r\n",
    );
    closed.recv_timeout(Duration::from_secs(30)).unwrap();
    server.log_until(|l| l.contains(id.as_str()) && l.contains("status=\"deferred\""));
}

#[test]
fn two_breaks_in_a_row_from_a_next_hop_that_answers_most_transactions_do_not_pause_it() {
    // Over one connection at a time: four messages answered, then two transactions broken
    // off with 421 in a row. Two failures in a row, but most of the next hop's last
    // transactions were answered: a next hop that drops one session in ten has two drops in
    // a row every hundred or so, and pausing it for each would hold all its mail.
    let (server, stored, closed) = one_connection_after_answers(4);
    broken_off(&server, &closed, "<fail0@t>");
    broken_off(&server, &closed, "<fail1@t>");
    delivered_unpaused(&server, &stored, "<ok4@t>");
}

#[test]
fn a_next_hop_that_answered_and_then_breaks_off_every_session_is_paused_after_eight() {
    // Ten messages answered, then every transaction broken off: not paused while the breaks
    // are fewer than three quarters of the last sixteen outcomes, but after eight in a row
    // whatever came before.
    let (server, _stored, closed) = one_connection_after_answers(10);
    for k in 0..8 {
        broken_off(&server, &closed, &format!("<fail{k}@t>"));
        let paused = server.log_count(|l| l.contains("delivery to it suspended"));
        assert_eq!(paused, usize::from(k == 7), "after {} breaks", k + 1);
    }
}

#[test]
fn a_break_and_a_refused_connection_from_a_next_hop_that_answers_most_do_not_pause_it() {
    // Four messages answered, a transaction broken off, then a connection greeted with 421:
    // two failures in a row, one of them a session broken off, from a next hop that answers
    // most transactions. The message that met the refusal waits for its retry; the next one
    // goes at once, the next hop not paused.
    let (server, stored, closed) = one_connection_after_answers(4);
    broken_off(&server, &closed, "<failr@t>");
    let id = send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<refused@t>",
        "x\r\n",
    );
    server.log_until(|l| l.contains(id.as_str()) && l.contains("status=\"deferred\""));
    delivered_unpaused(&server, &stored, "<ok4@t>");
}

/// A next hop on `host` (a thread for each connection, 16 in all) whose first connection
/// serves one message and then, at the RSET of the next transaction, tells the first receiver and holds
/// its reply until the sender gives a word, then closes without one. The connections after
/// it are closed before a greeting until the flag is set, then served. The Message-IDs it
/// stores go to the last receiver.
fn next_hop_closing_at_rset(
    host: &str,
) -> (
    u16,
    std::sync::mpsc::Receiver<()>,
    std::sync::mpsc::Sender<()>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::sync::mpsc::Receiver<String>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let l = TcpListener::bind((host, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    let (rset_tx, rset_seen) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (stored_tx, stored) = std::sync::mpsc::channel();
    let healed = std::sync::Arc::new(AtomicBool::new(false));
    let heal = healed.clone();
    std::thread::spawn(move || {
        let mut first = Some((rset_tx, released));
        for (n, conn) in l.incoming().take(16).enumerate() {
            let Ok(s) = conn else { return };
            if n > 0 && !healed.load(Ordering::SeqCst) {
                continue;
            }
            let stored_tx = stored_tx.clone();
            let hold = first.take();
            std::thread::spawn(move || {
                let closer = s.try_clone().unwrap();
                let on_command = |line: &str| {
                    if let Some((seen, released)) = hold.as_ref() {
                        if line.starts_with("RSET") {
                            let _ = seen.send(());
                            let _ = released.recv_timeout(Duration::from_secs(30));
                            let _ = closer.shutdown(std::net::Shutdown::Both);
                        }
                    }
                };
                serve_plainly(s, "rset.test", on_command, |data| {
                    let _ = stored_tx.send(message_id_of(&data));
                    AtEnd::Say(b"250 2.0.0 stored\r\n")
                });
            });
        }
    });
    (port, rset_seen, release, heal, stored)
}

#[test]
fn a_message_put_back_unsent_while_its_next_hop_is_paused_is_not_expired_untried() {
    use relaying::dns_server::{Rec, TestDns};
    use std::sync::atomic::Ordering;
    // The kept connection that carried the first message ends at the RSET of the second;
    // meanwhile a connection could be made to neither of the next hop's two addresses
    // (closed before its greeting, refused), and the next hop is paused. The second message
    // was never sent: past its lifetime, it still gets its last attempt when the pause ends,
    // rather than being expired as if that had been it.
    let (port, rset_seen, release, heal, stored) = next_hop_closing_at_rset("127.0.0.52");
    let dns = TestDns::start(
        "test",
        &[
            ("dest.test.", Rec::A("127.0.0.52".parse().unwrap())),
            ("dest.test.", Rec::A("127.0.0.53".parse().unwrap())),
        ],
    );
    let (dns_addr, port) = (dns.addr.to_string(), port.to_string());
    let server = Server::start(&[
        "--cores",
        "1",
        "--dns-server",
        &dns_addr,
        "--mx-port",
        &port,
        "--retry-initial",
        "5s",
        "--max-queue-lifetime",
        "2s",
        "--outbound-idle-timeout",
        "60s",
        "--metrics",
        "127.0.0.1:0",
    ]);
    send(&server, "", &["b@dest.test"], "<rset1@t>", "x\r\n");
    assert_eq!(
        stored.recv_timeout(Duration::from_secs(20)).unwrap(),
        "<rset1@t>"
    );
    let answered = Instant::now();
    let second = send(&server, "", &["b@dest.test"], "<rset2@t>", "x\r\n");
    // Its lifetime ends 2 s after the second it arrived in (arrival times are kept in
    // whole seconds, rounded up for the lifetime).
    let end_of_life = Instant::now() + Duration::from_millis(3300);
    rset_seen.recv_timeout(Duration::from_secs(20)).unwrap();
    // One more message: its connection is closed unanswered at one address and refused at
    // the other, which pauses the next hop. It comes once the kept connection has had no
    // answer for two seconds (before, a connection closed beside it is taken for the next
    // hop's limit on connections, and nothing is paused); counted here from before postern
    // read that answer, so with room to spare.
    std::thread::sleep(
        (answered + Duration::from_millis(2700)).saturating_duration_since(Instant::now()),
    );
    send(&server, "", &["b@dest.test"], "<rset3@t>", "x\r\n");
    let m = server.metrics_until(|m| m.contains("postern_delivery_deferrals_total 1\n"));
    assert!(m.contains("postern_delivery_deferrals_total 1\n"), "{m}");
    // The second message's lifetime is over; its connection now ends at the RSET.
    std::thread::sleep(end_of_life.saturating_duration_since(Instant::now()));
    release.send(()).unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    let reply = loop {
        let listing = queue_listing(&server.spool);
        let entry = listing.iter().find(|m| m["queue_id"] == second.as_str());
        match entry.map(|m| m["recipients"][0]["reply"].as_str()) {
            Some(None) if Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Some(reply) => break reply.map(str::to_owned),
            None => break None,
        }
    };
    let reply = reply.expect("the message put back unsent was expired");
    assert!(
        reply.starts_with("not tried, delivery to the next hop suspended after: "),
        "{reply}"
    );
    heal.store(true, Ordering::SeqCst);
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match stored.recv_timeout(left) {
            Ok(id) if id == "<rset2@t>" => break,
            Ok(_) => {}
            Err(e) => panic!("the second message was not delivered after the pause: {e}"),
        }
    }
    drop(dns);
}

#[test]
fn a_next_hop_s_whole_queue_failing_together_is_deferred_every_job_and_the_stop_waits_for_it() {
    // A next hop that takes the connection and never greets, one connection to it at a time:
    // the mail that comes meanwhile waits, and when the greeting's wait ends, all of it is
    // deferred together, more jobs than are settled at once (the core gives way between them
    // to its sessions). Each one is deferred, none twice, and a graceful stop waits for them.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let route = format!(
        "dest.test=127.0.0.1:{}",
        silent.local_addr().unwrap().port()
    );
    let mut server = Server::start(&[
        "--cores",
        "1",
        "--route",
        &route,
        "--max-connections-per-destination",
        "1",
        "--smtp-greeting-timeout",
        "8s",
        "--retry-initial",
        "1h",
    ]);
    let ids = send_until_deferred(&server, "together", 150);
    let log = server.terminate_for_log();
    for id in &ids {
        let deferred = log
            .lines()
            .filter(|l| l.contains(id.as_str()) && l.contains("status=\"deferred\""))
            .count();
        assert_eq!(deferred, 1, "{id}");
    }
    drop(silent);
}
