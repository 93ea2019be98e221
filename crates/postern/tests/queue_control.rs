//! The queue from the operator's side: high-water marks of the queue and the spool (452 and
//! back), mail held with `--hold`, `postern queue` listings and flushes beside a running
//! server.
#![allow(clippy::unwrap_used)]

mod common;
mod relaying;

use std::process::Command;
use std::time::{Duration, Instant};

use common::Server;
use relaying::*;

/// Asks MAIL (with RSET between) until the reply starts with `want`, for at most 15 s: the
/// server's answer changes when its queue or spool crosses a mark, which it checks at MAIL.
fn mail_until(c: &mut common::Client, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = c.cmd("MAIL FROM:<a@origin.test>");
        if r.starts_with(want) {
            if want.starts_with('2') {
                c.cmd("RSET");
            }
            return;
        }
        assert!(Instant::now() < deadline, "still {r}, waiting for {want}");
        if r.starts_with('2') {
            c.cmd("RSET");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn queue_past_its_high_water_mark_refuses_then_accepts_again() {
    let (server, down) = unreachable_dest(&[
        "--queue-high-water",
        "3",
        "--queue-low-water",
        "1",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let port = down.1;
    for i in 0..3 {
        send(
            &server,
            "a@origin.test",
            &["b@dest.test"],
            &format!("<bp{i}@t>"),
            "x\r\n",
        );
    }
    // The next hop is down, so the three stay queued: new mail is refused for now.
    let mut c = greeted(&server);
    mail_until(&mut c, "452 4.3.1");
    // Meanwhile a load balancer is told to send new clients elsewhere.
    let refusing = server.metrics_until(|m| m.contains("postern_cores_refusing_mail 2\n"));
    assert!(
        refusing.contains("postern_cores_refusing_mail 2\n"),
        "{refusing}"
    );
    let (status, body) = server.http_get("/readyz");
    assert!(status.contains("503"), "{status} {body}");
    assert!(body.contains("high-water"), "{body}");
    // The next hop comes up, the queue drains, mail is accepted again.
    drop(down);
    let peer = Peer::start_on("127.0.0.1", port, &[]);
    peer.wait_for("the queued three", Duration::from_secs(20), |s| {
        s.len() == 3
    });
    mail_until(&mut c, "250");
    server.metrics_until(|m| m.contains("postern_cores_refusing_mail 0\n"));
    let (status, body) = server.http_get("/readyz");
    assert!(status.contains("200"), "{status} {body}");
}

#[test]
fn recipients_queued_past_their_high_water_mark_refuse_then_accept_again() {
    // Two messages are far below the message mark; their five recipients reach the
    // recipient mark, which is what bounds the memory the queued envelopes take.
    let (server, down) = unreachable_dest(&[
        "--queue-high-water-recipients",
        "5",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let port = down.1;
    let three = ["b1@dest.test", "b2@dest.test", "b3@dest.test"];
    send(&server, "a@origin.test", &three, "<r3@t>", "x\r\n");
    let mut c = greeted(&server);
    // Three of five: still accepting.
    mail_until(&mut c, "250");
    let two = ["b4@dest.test", "b5@dest.test"];
    send(&server, "a@origin.test", &two, "<r2@t>", "x\r\n");
    mail_until(&mut c, "452 4.3.1");
    let line = server.log_until(|l| l.contains("new mail gets 452 4.3.1"));
    assert!(line.contains("--queue-high-water-recipients"), "{line}");
    let m = server.metrics_until(|m| m.contains("postern_queue_recipients 5\n"));
    assert!(m.contains("postern_queue_depth 2\n"), "{m}");
    // The next hop comes up, the queue drains, mail is accepted again.
    drop(down);
    let peer = Peer::start_on("127.0.0.1", port, &[]);
    peer.wait_for("the queued two", Duration::from_secs(20), |s| s.len() == 2);
    mail_until(&mut c, "250");
    // Each core publishes its own refusal at its next look at the marks.
    let done = |m: &str| {
        m.contains("postern_queue_recipients 0\n") && m.contains("postern_cores_refusing_mail 0\n")
    };
    let m = server.metrics_until(done);
    assert!(done(&m), "{m}");
}

#[test]
fn held_mail_counts_against_the_queue_high_water_mark() {
    // Nothing delivers with --hold (the harness's default without a route), so what is kept
    // is the queue.
    let server = Server::start(&["--cores", "1", "--queue-high-water", "3"]);
    for i in 0..3 {
        send(
            &server,
            "a@origin.test",
            &["b@dest.test"],
            &format!("<held{i}@t>"),
            "x\r\n",
        );
    }
    let mut c = greeted(&server);
    assert_eq!(
        c.cmd("MAIL FROM:<a@origin.test>"),
        "452 4.3.1 Mail queue full, try again later"
    );
}

#[test]
fn held_mail_counts_against_the_queue_high_water_mark_across_cores() {
    // The mark is for the whole queue, not each core's share: whichever core a connection
    // lands on, exactly five messages are taken and every later one gets 452.
    let server = Server::start(&["--cores", "2", "--queue-high-water", "5"]);
    let mut replies = Vec::new();
    for i in 0..12 {
        let mut c = greeted(&server);
        let reply = c.cmd("MAIL FROM:<a@origin.test>");
        if reply.starts_with("250") {
            assert!(c.cmd("RCPT TO:<b@dest.test>").starts_with("250"));
            assert!(c.cmd("DATA").starts_with("354"));
            let id = common::queue_id(&c.cmd(&format!("Message-ID: <m{i}@t>\r\n\r\nx\r\n.")));
            replies.push(format!("250 {id}"));
        } else {
            replies.push(reply);
        }
        c.cmd("QUIT");
    }
    let taken = replies.iter().filter(|r| r.starts_with("250")).count();
    assert_eq!(taken, 5, "{replies:#?}");
    assert!(
        replies[5..]
            .iter()
            .all(|r| r == "452 4.3.1 Mail queue full, try again later"),
        "{replies:#?}"
    );
    let line = server.log_until(|l| l.contains("new mail gets 452 4.3.1"));
    assert!(line.contains("--queue-high-water"), "{line}");
}

#[test]
fn spool_past_its_high_water_mark_refuses_then_accepts_again() {
    let (server, down) = unreachable_dest(&[
        "--cores",
        "1",
        "--spool-segment-size",
        "128k",
        "--spool-high-water",
        "512k",
    ]);
    let port = down.1;
    let body = ("z".repeat(78) + "\r\n").repeat(500); // 40 KiB
    let mut c = greeted(&server);
    let mut sent = 0;
    let refused = loop {
        let r = c.cmd("MAIL FROM:<a@origin.test>");
        if !r.starts_with("250") || sent >= 30 {
            break r;
        }
        assert!(c.cmd("RCPT TO:<b@dest.test>").starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        c.send(format!("Message-ID: <sp{sent}@t>\r\n\r\n{body}.\r\n").as_bytes());
        assert!(c.line().starts_with("250"));
        sent += 1;
    };
    assert!(
        refused.starts_with("452 4.3.1"),
        "after {sent} messages: {refused}"
    );
    assert!(sent >= 2, "refused too early, after {sent}");
    // The next hop comes up; delivered messages free their segments; mail is accepted again.
    drop(down);
    let peer = Peer::start_on("127.0.0.1", port, &[]);
    peer.wait_for("the queued messages", Duration::from_secs(30), |s| {
        s.len() == sent
    });
    mail_until(&mut c, "250");
}

/// Sends one message of `body` to dest.test; returns the reply to its end of data, or to the
/// command that refused it.
fn try_message(c: &mut common::Client, n: usize, body: &str) -> String {
    let mail = c.cmd("MAIL FROM:<a@origin.test>");
    if !mail.starts_with("250") {
        return mail;
    }
    assert!(c
        .cmd(&format!("RCPT TO:<r{n}@dest.test>"))
        .starts_with("250"));
    let go = c.cmd("DATA");
    if !go.starts_with("354") {
        c.cmd("RSET");
        return go;
    }
    c.send(format!("Message-ID: <full{n}@t>\r\n\r\n{body}.\r\n").as_bytes());
    let reply = c.line();
    if !reply.starts_with("250") {
        c.cmd("RSET");
    }
    reply
}

#[test]
fn a_spool_disk_that_filled_up_is_freed_once_its_queue_is_delivered() {
    let disk = common::Tmpfs::mount("6m");
    let spool = disk.path.join("spool");
    let down = reserve("127.0.0.1", 0);
    let port = down.1;
    let route = format!("dest.test=127.0.0.1:{port}");
    let mut args = vec!["--route", route.as_str(), "--cores", "1"];
    args.extend(["--spool-segment-size", "1M"]);
    args.extend(FAST_RETRY);
    let mut server = Server::start_in(&args, spool.clone(), None);
    let body = ("f".repeat(78) + "\r\n").repeat(1000); // 80 KiB
    let mut c = greeted(&server);
    let mut acked = 0;
    let refused = loop {
        let reply = try_message(&mut c, acked, &body);
        if !reply.starts_with("250") || acked >= 200 {
            break reply;
        }
        acked += 1;
    };
    assert!(refused.starts_with("452 4.3.1"), "after {acked}: {refused}");
    assert!(acked >= 5, "refused too early, after {acked}");

    // The next hop comes up while the disk is full: the statuses of the deliveries may find
    // no room, yet every message must be delivered and its space given back.
    drop(down);
    let peer = Peer::start_on("127.0.0.1", port, &[]);
    peer.wait_for("every acknowledged message", Duration::from_secs(60), |s| {
        s.len() == acked
    });
    c.cmd("QUIT");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = acked;
    loop {
        // A fresh session each time, so refusals never add up to the session's error limit.
        let mut c = greeted(&server);
        let reply = try_message(&mut c, n, "room again\r\n");
        c.cmd("QUIT");
        if reply.starts_with("250") {
            break;
        }
        assert!(Instant::now() < deadline, "still refused: {reply}");
        n += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(server.terminate().success());
    // Nothing delivered is left to deliver again after a restart.
    let left = postern_spool::recover(&spool).unwrap();
    let pending: Vec<_> = left
        .messages
        .iter()
        .filter(|m| !m.is_final())
        .map(|m| m.meta.recipients[0].path.clone())
        .filter(|r| !r.contains(&format!("r{n}@")))
        .collect();
    assert!(pending.is_empty(), "would be delivered again: {pending:?}");
}

#[test]
fn the_queue_command_lists_waiting_mail_beside_a_running_server() {
    let (port, stored, _) = scripted_next_hop(|_, _| None, Act::Say("250 2.0.0 stored\r\n"));
    let ok_route = format!("ok.test=127.0.0.1:{port}");
    let (server, _down) = unreachable_dest(&["--route", &ok_route]);
    let waiting = send(
        &server,
        "a@origin.test",
        &["b@dest.test", "c@dest.test"],
        "<wait@t>",
        "x\r\n",
    );
    let delivered = send(&server, "a@origin.test", &["d@ok.test"], "<ok@t>", "x\r\n");
    server.log_until(|l| l.contains("to=\"c@dest.test\"") && l.contains("deferred"));
    stored.recv_timeout(Duration::from_secs(20)).unwrap();
    // The delivered message leaves the listing once its outcome is written.
    let deadline = Instant::now() + Duration::from_secs(20);
    let listing = loop {
        let listing = queue_listing(&server.spool);
        if !listing.iter().any(|m| m["queue_id"] == delivered.as_str()) {
            break listing;
        }
        assert!(Instant::now() < deadline, "still listed: {listing:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(listing.len(), 1, "{listing:?}");
    let m = &listing[0];
    assert_eq!(m["queue_id"], waiting.as_str());
    assert_eq!(m["sender"], "a@origin.test");
    let rcpts = m["recipients"].as_array().unwrap();
    let addresses: Vec<&str> = rcpts
        .iter()
        .map(|r| r["address"].as_str().unwrap())
        .collect();
    assert_eq!(addresses, ["b@dest.test", "c@dest.test"]);
    for r in rcpts {
        assert_eq!(r["state"], "deferred", "{r}");
        assert!(r["reply"].as_str().unwrap().contains("refused"), "{r}");
        assert!(r["next_attempt"].as_u64().unwrap() >= m["arrival"].as_u64().unwrap());
        // No --delay-warning: nobody was warned.
        assert_eq!(r["delay_warned"], false, "{r}");
    }
    let table = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["queue", "--spool"])
        .arg(&server.spool)
        .output()
        .unwrap();
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.contains(&waiting), "{table}");
    assert!(
        table.contains("<c@dest.test> deferred, next attempt"),
        "{table}"
    );
    assert!(
        table.contains("\n-- 1 message, 2 recipients waiting, "),
        "{table}"
    );
}

#[test]
fn the_queue_command_shows_a_waiting_message_as_it_is_stored() {
    let server = Server::start(&[]);
    let id = send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<show@t>",
        "first line\r\n..dot\r\n",
    );
    let show = |id: &str| {
        Command::new(env!("CARGO_BIN_EXE_postern"))
            .args(["queue", "--show", id, "--spool"])
            .arg(&server.spool)
            .output()
            .unwrap()
    };
    let out = show(&id);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    // Octet for octet as it will be relayed: postern's trace first, CR LF line ends, the
    // dot unstuffed.
    assert!(text.starts_with("Received: from "), "{text:?}");
    assert!(text.contains(&format!(" id {id}\r\n")), "{text:?}");
    assert!(
        text.ends_with(
            "From: <a@origin.test>\r\nTo: <b@dest.test>\r\nSubject: test\r\n\
             Message-ID: <show@t>\r\n\r\nfirst line\r\n.dot\r\n"
        ),
        "{text:?}"
    );
    // A well-formed ID that is not queued, and one that is not an ID at all.
    let other = format!("{}B", &id[..16]);
    let other = if other == id {
        format!("{}C", &id[..16])
    } else {
        other
    };
    let out = show(&other);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains(&format!("{other} is not in the queue")),
        "{err}"
    );
    let out = show("nonsense");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("--show") && err.contains("'nonsense' is not a queue ID"),
        "{err}"
    );
}

#[test]
fn queue_flush_tries_deferred_mail_now() {
    // The first RCPT is put off; later ones are taken.
    let rcpts = std::sync::atomic::AtomicUsize::new(0);
    let (port, stored, _) = scripted_next_hop(
        move |_, line| {
            let first = line.starts_with("RCPT")
                && rcpts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
            first.then_some(Act::Say("451 4.3.0 later\r\n"))
        },
        Act::Say("250 2.0.0 stored\r\n"),
    );
    let route = format!("dest.test=127.0.0.1:{port}");
    let server = Server::start(&["--route", &route, "--retry-initial", "1h"]);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<flush@t>",
        "x\r\n",
    );
    server.log_until(|l| l.contains("to=\"b@dest.test\"") && l.contains("deferred"));
    assert!(stored.try_recv().is_err());
    let out = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["queue", "--flush", "--spool"])
        .arg(&server.spool)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        said.contains(&format!("pid {}", server.child.id())),
        "{said}"
    );
    // Delivered now, an hour before its retry was due.
    let (_, data) = stored.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(data.contains("Message-ID: <flush@t>"), "{data}");
    server.log_until(|l| l.contains("SIGUSR1: trying deferred mail now"));
}

#[test]
fn a_flush_while_a_connection_is_tried_is_not_undone_when_that_connection_fails() {
    // The next hop refused the first message's session (it waits an hour for its retry); a
    // second connection, for the next message, waits on the next hop's EHLO reply when the
    // operator flushes. That connection then fails too: the mail the flush put in line is
    // tried again at once, not sent back to its retry (and the next hop paused) for an
    // attempt that began before the flush.
    use std::sync::{mpsc::channel, Mutex};
    let (in_ehlo, in_second_ehlo) = channel::<()>();
    let (release, released) = channel::<()>();
    let in_ehlo = Mutex::new(in_ehlo);
    let released = Mutex::new(Some(released));
    let (port, stored, _) = scripted_next_hop(
        move |conn, line| {
            if !line.starts_with("EHLO") {
                return None;
            }
            match conn {
                0 => Some(Act::SayAndClose("421 4.3.2 not now\r\n")),
                1 => {
                    let _ = in_ehlo.lock().unwrap().send(());
                    let told = released.lock().unwrap().take().unwrap();
                    Some(Act::SayAndClose(if told.recv().is_ok() {
                        "421 4.3.2 still not\r\n"
                    } else {
                        "421 4.3.2 the test went\r\n"
                    }))
                }
                _ => None,
            }
        },
        Act::Say("250 2.0.0 stored\r\n"),
    );
    let route = format!("dest.test=127.0.0.1:{port}");
    let server = Server::start(&["--route", &route, "--retry-initial", "1h"]);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<m0@t>",
        "x\r\n",
    );
    server.log_until(|l| l.contains("to=\"b@dest.test\"") && l.contains("deferred"));
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<m1@t>",
        "y\r\n",
    );
    in_second_ehlo
        .recv_timeout(Duration::from_secs(20))
        .expect("a second connection, for the second message");
    server.signal("-USR1");
    server.log_until(|l| l.contains("flush: deferred mail is tried now"));
    release.send(()).unwrap();
    // Both delivered on the next connection.
    let ids = message_ids(&stored, 2);
    assert_eq!(ids, ["<m0@t>", "<m1@t>"]);
}

#[test]
fn a_flush_at_once_after_a_start_releases_the_whole_recovered_queue() {
    // A queue of deferred mail, found at a start, is handed to delivery a batch at a time;
    // a flush asked for at once (as the start finishes) counts for the batches still on
    // their way too. It released only those already handed over, and the others waited
    // for their recorded retry, an hour here.
    const N: usize = 4000;
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    // Each message is put off once (451 to its data), then taken.
    let peer = Peer::start(&["--tempfail-first", "1"]);
    let route = format!("dest.test=127.0.0.1:{}", peer.port);
    let args = ["--cores", "2", "--route", &route, "--retry-initial", "1h"];
    let mut first = Server::start_in(&args, spool.clone(), None);
    send_in_one_session(&first, "r@dest.test", "queued", N);
    let deadline = Instant::now() + Duration::from_secs(120);
    while first.log_count(|l| l.contains("status=\"deferred\"")) < N {
        assert!(Instant::now() < deadline, "not all deferred");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(first.terminate().success());
    assert!(peer.stored().is_empty());
    let second = Server::start_in(&args, spool, None);
    second.signal("-USR1");
    peer.wait_for("the whole queue", Duration::from_secs(60), |s| s.len() >= N);
    drop(dir);
}

#[test]
fn the_listing_and_a_flush_say_when_the_server_holds_its_mail() {
    let queue = |spool: &std::path::Path, flush: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_postern"));
        cmd.args(["queue", "--spool"]).arg(spool);
        if flush {
            cmd.arg("--flush");
        }
        cmd.output().unwrap()
    };
    // Without a route the test server holds its mail (--hold).
    let mut held = Server::start(&[]);
    send(
        &held,
        "a@origin.test",
        &["b@dest.test"],
        "<held@t>",
        "x\r\n",
    );
    let out = queue(&held.spool, false);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        listing.contains(&format!("(pid {}) runs with --hold", held.child.id())),
        "{listing}"
    );
    let out = queue(&held.spool, true);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("runs with --hold: it delivers nothing"),
        "{out:?}"
    );
    // The same spool served without --hold: nothing said of holding, and a flush is sent.
    let spool = held.spool.clone();
    assert!(held.terminate().success());
    let down = reserve("127.0.0.1", 0);
    let route = format!("dest.test=127.0.0.1:{}", down.1);
    let mut args = vec!["--route", route.as_str()];
    args.extend(FAST_RETRY);
    let server = Server::start_in(&args, spool.clone(), None);
    let out = queue(&spool, false);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("--hold"),
        "{out:?}"
    );
    let out = queue(&spool, true);
    assert!(out.status.success(), "{out:?}");
    drop(server);
}

#[test]
fn a_message_deleted_while_its_next_hop_holds_back_its_354_is_not_sent() {
    use std::io::{BufRead, BufReader, Read, Write};
    // The next hop (without CHUNKING: the body waits for DATA's 354) takes the envelope and
    // sits on its answer to DATA; the operator deletes the message meanwhile, and `postern
    // queue --delete` says it is deleted. Before, the 354 then came and the body went out: a
    // message reported deleted was delivered.
    let (go, held) = std::sync::mpsc::channel::<()>();
    let (seen, data_seen) = std::sync::mpsc::channel::<()>();
    let (after, what_came) = std::sync::mpsc::channel::<Vec<u8>>();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        w.write_all(b"220 hop.test ESMTP\r\n").unwrap();
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            if line.starts_with("EHLO") {
                w.write_all(b"250-hop.test\r\n250 8BITMIME\r\n").unwrap();
            } else if line.starts_with("DATA") {
                seen.send(()).unwrap();
                let _ = held.recv();
                w.write_all(b"354 go\r\n").unwrap();
                // Whatever comes after the 354 until the connection ends.
                let mut rest = Vec::new();
                let _ = r.read_to_end(&mut rest);
                let _ = after.send(rest);
                return;
            } else {
                w.write_all(b"250 2.0.0 ok\r\n").unwrap();
            }
            line.clear();
        }
    });
    let route = format!("dest.test=127.0.0.1:{port}");
    let server = Server::start(&["--route", &route, "--cores", "1"]);
    let id = send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<withdrawn@t>",
        "not to be sent\r\n",
    );
    data_seen.recv_timeout(Duration::from_secs(20)).unwrap();
    let (code, out, err) = delete(&server.spool, &id);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(out, format!("deleted {id}\n"));
    go.send(()).unwrap();
    // The connection is given up with the transaction, the body unsent.
    let came = what_came.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(
        came.is_empty(),
        "after the 354: {:?}",
        String::from_utf8_lossy(&came)
    );
    let line = server.log_until(|l| l.contains("its body was not sent"));
    assert!(line.contains(&id), "{line}");
}

/// `postern queue --delete IDS` on `spool`: exit code, stdout, stderr.
fn delete(spool: &std::path::Path, ids: &str) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["queue", "--spool"])
        .arg(spool)
        .args(["--delete", ids])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_deletion_whose_account_cannot_be_written_is_done_and_says_so_without_failing() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let server = Server::start_in(&[], spool.clone(), None);
    let doomed = send(&server, "a@origin.test", &["b@dest.test"], "<f@t>", "x\r\n");
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["queue", "--spool"])
        .arg(&spool)
        .args(["--delete", &doomed])
        .stdout(full)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("done, but its account could not be written"),
        "{err}"
    );
    assert!(listed(&spool).is_empty());
    drop(server);
}

/// The queue IDs `postern queue --json` lists.
fn listed(spool: &std::path::Path) -> Vec<String> {
    queue_listing(spool)
        .iter()
        .map(|m| m["queue_id"].as_str().unwrap().to_owned())
        .collect()
}

/// On btrfs `stat` gives a subvolume's device and /proc/locks the file system's: the server
/// is still found (as the process with the spool open), and the deletion made.
#[test]
fn the_operator_s_deletion_finds_the_server_on_btrfs() {
    let fs = common::LoopFs::mount("btrfs", 512);
    let spool = fs.path.join("spool");
    let server = Server::start_in(&[], spool.clone(), None);
    let doomed = send(&server, "a@origin.test", &["b@dest.test"], "<b@t>", "x\r\n");
    let (code, out, err) = delete(&spool, &doomed);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, format!("deleted {doomed}\n"));
    assert!(listed(&spool).is_empty());
    drop(server);
}

/// `postern queue --delete` as root, beside a server that runs as another user (`nobody`,
/// as `postern` under the shipped unit) and owns the spool.
fn delete_as_root_with(spool: &std::path::Path, id: &str, before: &str) -> (Option<i32>, String) {
    let script = format!("{before}; exec \"$0\" queue --spool \"$1\" --delete \"$2\"");
    let out = Command::new("sh")
        .args(["-c", &script, env!("CARGO_BIN_EXE_postern")])
        .arg(spool)
        .arg(id)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// The request file is the command's own, new: a link the spool's owner put at its name
/// (which has the command's pid in it) is not written through, whoever runs the command.
#[test]
fn a_deletion_request_is_never_written_through_a_link_in_the_spool() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    let spool = dir.path().join("spool");
    let server = Server::start_as_nobody(&[], spool.clone(), None);
    let doomed = send(&server, "a@origin.test", &["b@dest.test"], "<l@t>", "x\r\n");
    // `$$` is the shell's pid, which `exec` hands to the command.
    let plant = format!("ln -s {} \"$1/.postern.delete.$$.tmp\"", victim.display());
    let (code, out) = delete_as_root_with(&spool, &doomed, &plant);
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "precious\n",
        "{out}"
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(listed(&spool).is_empty(), "{out}");
}

/// A request written under a umask that keeps it from the server's user (a hardened sudo's
/// 077) is still read by it.
#[test]
fn a_deletion_asked_under_a_tight_umask_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let server = Server::start_as_nobody(&[], spool.clone(), None);
    let doomed = send(&server, "a@origin.test", &["b@dest.test"], "<u@t>", "x\r\n");
    let (code, out) = delete_as_root_with(&spool, &doomed, "umask 077");
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out, format!("deleted {doomed}\n"));
}

#[test]
fn a_held_message_deleted_by_the_operator_leaves_the_queue_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let mut server = Server::start_in(&["--metrics", "127.0.0.1:0"], spool.clone(), None);
    let doomed = send(
        &server,
        "a@origin.test",
        &["b@dest.test", "c@dest.test"],
        "<d@t>",
        "x\r\n",
    );
    let kept = send(&server, "a@origin.test", &["b@dest.test"], "<k@t>", "x\r\n");
    let mut before = listed(&spool);
    before.sort();
    let mut both = vec![doomed.clone(), kept.clone()];
    both.sort();
    assert_eq!(before, both);
    let (code, out, err) = delete(&spool, &doomed);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, format!("deleted {doomed}\n"));
    assert_eq!(listed(&spool), std::slice::from_ref(&kept));
    server.log_until(|l| l.contains("deleted by the operator") && l.contains(&doomed));
    // Its two recipients counted as deleted (not as failures, which an alert watches), and
    // the other message is still queued. (Each core publishes its figures a few times a
    // second, the other message's core on its own time: waited for together.)
    let m = server.metrics_until(|m| {
        m.contains("postern_recipients_deleted_total 2\n") && m.contains("postern_queue_depth 1\n")
    });
    assert!(m.contains("postern_recipients_deleted_total 2\n"), "{m}");
    assert!(m.contains("postern_recipients_failed_total 0\n"), "{m}");
    assert!(m.contains("postern_queue_depth 1\n"), "{m}");
    // Recorded in the spool: a restart does not bring it back.
    assert!(server.terminate().success());
    let mut server = Server::start_in(&[], spool.clone(), None);
    assert_eq!(listed(&spool), std::slice::from_ref(&kept));
    // An ID not in the queue (the one just deleted) is refused by name.
    let (code, _, err) = delete(&spool, &doomed);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("{doomed} is not in the queue")),
        "{err}"
    );
    // No request file is left behind.
    let left: Vec<_> = std::fs::read_dir(&spool)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("delete"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // Without a server, nothing is deleted, and the command says what to do.
    assert!(server.terminate().success());
    let (code, _, err) = delete(&spool, &kept);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("start it"), "{err}");
    assert_eq!(listed(&spool), [kept]);
}

#[test]
fn ids_no_longer_queued_are_named_and_the_others_deleted_all_the_same() {
    // A listing, then a deletion: a message may have left the queue between the two. The
    // others are deleted (one not queued stopped the whole command, and a script had to
    // list and try again); the command names those not queued and exits 1.
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let server = Server::start_in(&[], spool.clone(), None);
    let gone = send(&server, "a@origin.test", &["b@dest.test"], "<g@t>", "x\r\n");
    let doomed = send(&server, "a@origin.test", &["b@dest.test"], "<d@t>", "x\r\n");
    let kept = send(&server, "a@origin.test", &["b@dest.test"], "<k@t>", "x\r\n");
    let (code, _, err) = delete(&spool, &gone);
    assert_eq!(code, Some(0), "{err}");
    let (code, out, err) = delete(&spool, &format!("{gone},{doomed}"));
    assert_eq!(code, Some(1), "{out}{err}");
    assert_eq!(out, format!("deleted {doomed}\n"), "{err}");
    assert!(
        err.contains(&format!("{gone} is not in the queue")),
        "{err}"
    );
    assert!(!err.contains("nothing was deleted"), "{err}");
    assert_eq!(listed(&spool), std::slice::from_ref(&kept));
    // None queued: nothing is asked, and the command says so.
    let (code, _, err) = delete(&spool, &format!("{gone},{doomed}"));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("{gone}, {doomed} are not in the queue"))
            || err.contains(&format!("{doomed}, {gone} are not in the queue")),
        "{err}"
    );
    assert!(err.contains("nothing was deleted"), "{err}");
    assert_eq!(listed(&spool), [kept]);
    drop(server);
}

#[test]
fn a_deferred_message_deleted_by_the_operator_is_not_delivered_and_nobody_is_told() {
    // The next hop is down: the message waits for its retry an hour away. Deleted, it is not
    // delivered when the next hop is back and the queue is flushed; no report goes out.
    let origin = Peer::start(&[]);
    let down = reserve("127.0.0.1", 0);
    let dest = format!("dest.test=127.0.0.1:{}", down.1);
    let back = format!("origin.test=127.0.0.1:{}", origin.port);
    let server = Server::start(&["--route", &dest, "--route", &back, "--retry-initial", "1h"]);
    let doomed = send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<gone@t>",
        "x\r\n",
    );
    server.log_until(|l| l.contains("to=\"b@dest.test\"") && l.contains("deferred"));
    let (code, _, err) = delete(&server.spool, &doomed);
    assert_eq!(code, Some(0), "{err}");
    let port = down.1;
    drop(down);
    let peer = Peer::start_on("127.0.0.1", port, &[]);
    let out = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["queue", "--flush", "--spool"])
        .arg(&server.spool)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    server.log_until(|l| l.contains("SIGUSR1: trying deferred mail now"));
    // A message sent after it is delivered; the deleted one, flushed before it, never.
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<after@t>",
        "x\r\n",
    );
    let stored = peer.wait_for("the later message", Duration::from_secs(20), |s| {
        s.iter().any(|m| m.message_id == "<after@t>")
    });
    assert!(
        stored.iter().all(|m| m.message_id != "<gone@t>"),
        "the deleted message was delivered"
    );
    assert!(origin.stored().is_empty(), "a report went to the sender");
    // The later message's delivery is recorded just after its next hop's 250.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !listed(&server.spool).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(listed(&server.spool).is_empty());
}

#[test]
fn a_deletion_counts_only_the_recipients_it_stops() {
    // One recipient delivered, one waiting for a next hop that is down: deleting the message
    // stops one, which is what the log line and the deletion counter say (not the failure
    // counter: a purge is no failed delivery).
    let up = Peer::start(&[]);
    let down = reserve("127.0.0.1", 0);
    let to_up = format!("up.test=127.0.0.1:{}", up.port);
    let to_down = format!("dest.test=127.0.0.1:{}", down.1);
    let server = Server::start(&[
        "--route",
        &to_up,
        "--route",
        &to_down,
        "--retry-initial",
        "1h",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let id = send(
        &server,
        "a@origin.test",
        &["b@up.test", "b@dest.test"],
        "<half@t>",
        "x\r\n",
    );
    up.first("the delivered half");
    server.log_until(|l| l.contains("to=\"b@dest.test\"") && l.contains("deferred"));
    server.metrics_until(|m| m.contains("postern_recipients_delivered_total 1\n"));
    let (code, _, err) = delete(&server.spool, &id);
    assert_eq!(code, Some(0), "{err}");
    let line = server.log_until(|l| l.contains("deleted by the operator"));
    assert!(line.contains("recipients=1"), "{line}");
    // Written as on every other line of the message's history, for a grep of its ID.
    assert!(line.contains(&format!(" queue_id={id} ")), "{line}");
    let m = server.metrics_until(|m| m.contains("postern_recipients_deleted_total 1\n"));
    assert!(m.contains("postern_recipients_deleted_total 1\n"), "{m}");
    assert!(m.contains("postern_recipients_failed_total 0\n"), "{m}");
}

#[test]
fn a_deleted_message_for_a_next_hop_that_is_down_is_tried_no_more() {
    // Retries every few hundred milliseconds to a next hop where nothing listens: once the
    // message is deleted, its job leaves the retry schedule instead of failing again and
    // again until its lifetime ends.
    let (mut server, _down) = unreachable_dest(&[]);
    let doomed = send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<down@t>",
        "x\r\n",
    );
    // A witness, kept: its attempts show that retries go on meanwhile.
    let kept = send(
        &server,
        "a@origin.test",
        &["c@dest.test"],
        "<kept@t>",
        "x\r\n",
    );
    server.log_until(|l| l.contains(&doomed) && l.contains("deferred"));
    let (code, _, err) = delete(&server.spool, &doomed);
    assert_eq!(code, Some(0), "{err}");
    server.log_until(|l| l.contains("deleted by the operator") && l.contains(&doomed));
    // The window in which attempts would show: five more of the witness's.
    let deferrals = || server.log_count(|l| l.contains(&kept) && l.contains("deferred"));
    let before = deferrals();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while deferrals() < before + 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "the kept message was not tried again"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = server.terminate_for_log();
    let after: Vec<&str> = log
        .lines()
        .skip_while(|l| !l.contains("deleted by the operator"))
        .filter(|l| l.contains(&doomed) && l.contains("deferred"))
        .collect();
    // One attempt may have been under way when it was deleted.
    assert!(after.len() <= 1, "{after:#?}");
}

#[test]
fn a_deletion_request_left_behind_is_not_acted_on_later() {
    // A request file a command left (it gave up, or died) is old by the next signal: that
    // message stays. The same ID given twice is one deletion.
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let server = Server::start_in(&[], spool.clone(), None);
    let stays = send(&server, "a@origin.test", &["b@dest.test"], "<s@t>", "x\r\n");
    let goes = send(&server, "a@origin.test", &["b@dest.test"], "<g@t>", "x\r\n");
    let left = spool.join("postern.delete.99999");
    std::fs::write(&left, format!("{stays} 1\n")).unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(120);
    std::fs::File::options()
        .write(true)
        .open(&left)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let (code, out, err) = delete(&spool, &format!("{goes},{goes}"));
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, format!("deleted {goes}\n"));
    server.log_until(|l| l.contains("an old deletion request, removed unread"));
    assert!(!left.exists());
    assert_eq!(listed(&spool), [stays]);
}

#[test]
fn a_deletion_of_a_message_delivered_since_it_was_listed_is_no_deletion() {
    // The request names a message the server has meanwhile delivered (the race between a
    // listing and the server's taking the request): nothing is recorded for it, and the log
    // says it was no longer queued rather than that it was deleted.
    let peer = Peer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let route = format!("dest.test=127.0.0.1:{}", peer.port);
    let server = Server::start_in(&["--route", &route], spool.clone(), None);
    let id = send(&server, "a@origin.test", &["b@dest.test"], "<d@t>", "x\r\n");
    peer.wait_for("the delivery", Duration::from_secs(20), |s| s.len() == 1);
    server.log_until(|l| l.contains(id.as_str()) && l.contains("status=\"sent\""));
    std::fs::write(spool.join("postern.delete.99998"), format!("{id} 1\n")).unwrap();
    server.signal("-USR2");
    let line = server.log_until(|l| l.contains(id.as_str()) && l.contains("deleted"));
    assert!(line.contains("not deleted: no longer queued"), "{line}");
    assert!(!line.contains("deleted by the operator"), "{line}");
}

#[test]
fn a_transaction_put_off_after_its_message_was_deleted_is_not_counted_as_a_deferral() {
    // As below, with a 451 for the reply: the outcome is logged, and neither recorded nor
    // counted (the deferral counter counted it, for mail no longer queued).
    let (release, gate) = std::sync::mpsc::channel();
    let (port, stored, _) = scripted_next_hop(
        |_, _| None,
        Act::SayWhenTold(gate, "451 4.3.0 try later\r\n"),
    );
    // A second next hop that takes mail, on the same (only) core: its delivery, counted
    // after the deleted message's outcome, shows when the counters include that outcome.
    let (ok_port, ok_stored, _) = scripted_next_hop(|_, _| None, Act::Say("250 2.0.0 ok\r\n"));
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let route = format!("dest.test=127.0.0.1:{port}");
    let ok_route = format!("ok.test=127.0.0.1:{ok_port}");
    let server = Server::start_in(
        &[
            "--route",
            &route,
            "--route",
            &ok_route,
            "--cores",
            "1",
            "--metrics",
            "127.0.0.1:0",
        ],
        spool.clone(),
        None,
    );
    let id = send(&server, "a@origin.test", &["b@dest.test"], "<d@t>", "x\r\n");
    stored.recv_timeout(Duration::from_secs(20)).unwrap();
    let (code, _, err) = delete(&spool, &id);
    assert_eq!(code, Some(0), "{err}");
    release.send(()).unwrap();
    let line =
        server.log_until(|l| l.contains(id.as_str()) && l.contains("when the operator deleted"));
    assert!(line.contains("status=\"deferred\""), "{line}");
    send(&server, "a@origin.test", &["c@ok.test"], "<ok@t>", "x\r\n");
    ok_stored.recv_timeout(Duration::from_secs(20)).unwrap();
    let m = server.metrics_until(|m| m.contains("postern_recipients_delivered_total 1\n"));
    assert!(m.contains("postern_delivery_deferrals_total 0\n"), "{m}");
}

#[test]
fn a_transaction_under_way_when_its_message_is_deleted_is_logged_as_it_ends() {
    // The next hop has the whole message and holds its reply while the operator deletes the
    // message: the 250 that then comes is logged (the mail has left), though nothing more
    // is recorded for a message the operator deleted.
    let (release, gate) = std::sync::mpsc::channel();
    let (port, stored, _) =
        scripted_next_hop(|_, _| None, Act::SayWhenTold(gate, "250 2.0.0 taken\r\n"));
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let route = format!("dest.test=127.0.0.1:{port}");
    let server = Server::start_in(&["--route", &route], spool.clone(), None);
    let id = send(&server, "a@origin.test", &["b@dest.test"], "<u@t>", "x\r\n");
    stored.recv_timeout(Duration::from_secs(20)).unwrap();
    let (code, out, err) = delete(&spool, &id);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, format!("deleted {id}\n"));
    release.send(()).unwrap();
    let line =
        server.log_until(|l| l.contains(id.as_str()) && l.contains("when the operator deleted"));
    assert!(line.contains("250 2.0.0 taken"), "{line}");
    assert!(line.contains("status=\"sent\""), "{line}");
}

#[test]
fn the_json_listing_gives_each_message_s_dsn_parameters() {
    // What a next hop will be given and what a report will say: RET, ENVID, BODY, SMTPUTF8,
    // and each recipient's NOTIFY and ORCPT, as stored (here as the client gave them, ENVID
    // and ORCPT in their xtext); null where it gave none.
    let server = Server::start(&["--cores", "1"]);
    let (mut c, _) = hello(&server);
    for (command, want) in [
        (
            "MAIL FROM:<a@origin.test> BODY=8BITMIME RET=HDRS ENVID=e+2B1 SMTPUTF8",
            "250",
        ),
        (
            "RCPT TO:<b@dest.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;b+40x@dest.test",
            "250",
        ),
        ("RCPT TO:<c@dest.test> NOTIFY=NEVER", "250"),
        ("RCPT TO:<d@dest.test>", "250"),
        ("DATA", "354"),
    ] {
        let reply = c.cmd(command);
        assert!(reply.starts_with(want), "{command}: {reply}");
    }
    c.send(b"Subject: dsn\r\n\r\nx\r\n.\r\n");
    let id = common::queue_id(&c.line());
    let listing = queue_listing(&server.spool);
    let m = listing
        .iter()
        .find(|m| m["queue_id"] == id.as_str())
        .unwrap();
    assert_eq!(m["ret"], "hdrs", "{m}");
    assert_eq!(m["envid"], "e+2B1", "{m}");
    assert_eq!(m["body"], "8bitmime", "{m}");
    assert_eq!(m["smtputf8"], true, "{m}");
    let r = m["recipients"].as_array().unwrap();
    assert_eq!(
        r[0]["notify"],
        serde_json::json!(["success", "delay"]),
        "{m}"
    );
    assert_eq!(r[0]["orcpt"], "rfc822;b+40x@dest.test", "{m}");
    assert_eq!(r[1]["notify"], serde_json::json!(["never"]), "{m}");
    assert!(r[1]["orcpt"].is_null(), "{m}");
    assert!(r[2]["notify"].is_null() && r[2]["orcpt"].is_null(), "{m}");
    // And a message without them: nulls, 7bit.
    let plain = send(
        &server,
        "a@origin.test",
        &["e@dest.test"],
        "<plain@t>",
        "x\r\n",
    );
    let listing = queue_listing(&server.spool);
    let m = listing
        .iter()
        .find(|m| m["queue_id"] == plain.as_str())
        .unwrap();
    assert!(m["ret"].is_null() && m["envid"].is_null(), "{m}");
    assert_eq!(m["body"], "7bit", "{m}");
    assert_eq!(m["smtputf8"], false, "{m}");
}

#[test]
fn a_next_attempt_brought_forward_by_a_restart_s_settings_is_listed_as_it_will_be_made() {
    // Deferred for an hour by the first run; the second allows at most two minutes between
    // attempts, so it tries within two minutes of its start, and the listing says so.
    let down = reserve("127.0.0.1", 0);
    let route = format!("dest.test=127.0.0.1:{}", down.1);
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let first = [
        "--route",
        route.as_str(),
        "--retry-initial",
        "1h",
        "--retry-max",
        "1h",
    ];
    let mut server = Server::start_in(&first, spool.clone(), None);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<later@t>",
        "x\r\n",
    );
    server.log_until(|l| l.contains("to=\"b@dest.test\"") && l.contains("deferred"));
    server.terminate_for_log();
    let next_attempt = |listing: &[serde_json::Value]| {
        assert_eq!(listing.len(), 1, "{listing:?}");
        listing[0]["recipients"][0]["next_attempt"]
            .as_u64()
            .unwrap()
    };
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let before = next_attempt(&queue_listing(&spool));
    assert!(before >= now() + 3000, "{before}");

    let second = [
        "--route",
        route.as_str(),
        "--retry-initial",
        "1m",
        "--retry-max",
        "2m",
    ];
    let started = now();
    let mut server = Server::start_in(&second, spool.clone(), Some(dir));
    // Written as the queue resumes, just after start-up: bounded wait for the record.
    let deadline = Instant::now() + Duration::from_secs(20);
    let listed = loop {
        let at = next_attempt(&queue_listing(&spool));
        if at < before || Instant::now() > deadline {
            break at;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        listed >= started + 119 && listed <= now() + 121,
        "listed {listed}, started {started}"
    );
    server.terminate_for_log();
    // Kept in the spool: a listing of the stopped server says the same.
    assert_eq!(next_attempt(&queue_listing(&server.spool)), listed);
}

#[test]
fn one_deletion_of_more_than_ten_thousand_messages_deletes_them_all() {
    // A purge of a spam run: every ID given is deleted, the first ones too (a cap of 10,000
    // requests waiting for their cores dropped the oldest, and the command then waited and
    // failed, the log silent).
    const N: usize = 10_050;
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let server = Server::start_in(&[], spool.clone(), None);
    let mut c = server.connect();
    c.line();
    c.cmd("EHLO client.test");
    let mut ids = Vec::with_capacity(N);
    for batch in (0..N).collect::<Vec<_>>().chunks(250) {
        let mut pipelined = String::new();
        for _ in batch {
            pipelined.push_str(
                "MAIL FROM:<a@origin.test>\r\nRCPT TO:<b@dest.test>\r\nBDAT 3 LAST\r\nx\r\n",
            );
        }
        c.send(pipelined.as_bytes());
        for _ in batch {
            assert!(c.line().starts_with("250"));
            assert!(c.line().starts_with("250"));
            let reply = c.line();
            assert!(reply.starts_with("250 2.0.0"), "{reply}");
            ids.push(common::queue_id(&reply));
        }
    }
    assert_eq!(c.cmd("QUIT"), "221 2.0.0 mx.test Bye");
    // The first on the command line, the others on standard input (as a purge larger than a
    // command line holds gives them), a line each or several to a line.
    let mut stdin = String::new();
    for (i, id) in ids[1..].iter().enumerate() {
        stdin.push_str(id);
        stdin.push_str(if i % 3 == 0 { "\n" } else { ", " });
    }
    let run = |input: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_postern"))
            .args(["queue", "--spool"])
            .arg(&spool)
            .args(["--delete", &ids[0], "--delete", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut to = child.stdin.take().unwrap();
        let input = input.to_owned();
        let writer =
            std::thread::spawn(move || std::io::Write::write_all(&mut to, input.as_bytes()));
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Something on standard input that is no queue ID: nothing is deleted.
    let (code, _, err) = run(&format!("{stdin}not-an-id\n"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("'not-an-id' is not a queue ID"), "{err}");
    assert_eq!(listed(&spool).len(), N);
    let (code, out, err) = run(&stdin);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), N, "{err}");
    for id in [&ids[0], &ids[N / 2], &ids[N - 1]] {
        assert!(out.contains(&format!("deleted {id}\n")), "{id}");
    }
    assert!(listed(&spool).is_empty());
    assert_eq!(
        server.log_count(|l| l.contains("deleted by the operator")),
        N
    );
    drop(server);
}
