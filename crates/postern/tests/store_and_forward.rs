//! Store and forward, end to end: the real `postern` accepts mail over SMTP and delivers it to
//! real next hops on loopback (aiosmtpd, which nobody here wrote, and the project's own
//! postern-load sink), retries temporary failures, and survives SIGKILL and SIGTERM without
//! losing or needlessly repeating a delivery.
#![allow(clippy::unwrap_used)]

mod common;
mod relaying;

use std::collections::HashMap;
use std::net::TcpStream;
use std::time::Duration;

use common::Server;
use relaying::*;

#[test]
fn delivers_through_data_to_aiosmtpd_with_dot_stuffing_and_trace() {
    let peer = Peer::start(&[]);
    let route = format!("dest.test=127.0.0.1:{}", peer.port);
    let server = Server::start(&["--route", &route]);
    send(
        &server,
        "alice@origin.test",
        &["bob@dest.test", "carol@dest.test"],
        "<m1@t>",
        "line one\r\n..leading dot\r\n...two dots\r\n",
    );
    send(
        &server,
        "alice@origin.test",
        &["dave@sub.dest.test"],
        "<m2@t>",
        "second\r\n",
    );
    let stored = peer.wait_for("two messages", Duration::from_secs(20), |s| s.len() == 2);
    let by_id: HashMap<&str, &Stored> = stored.iter().map(|s| (s.message_id.as_str(), s)).collect();
    let m1 = by_id["<m1@t>"];
    assert_eq!(m1.mail_from, "alice@origin.test");
    // Two recipients with the same next hop share one transaction.
    assert_eq!(m1.rcpt_tos, ["bob@dest.test", "carol@dest.test"]);
    let text = String::from_utf8(m1.data.clone()).unwrap();
    assert!(text.starts_with("Received: from client.test"), "{text}");
    assert!(text.contains("by mx.test"));
    // The receiver undid the dot-stuffing: the lines are as sent.
    assert!(
        text.ends_with("line one\r\n.leading dot\r\n..two dots\r\n"),
        "{text:?}"
    );
    assert_eq!(by_id["<m2@t>"].rcpt_tos, ["dave@sub.dest.test"]);
}

#[test]
fn a_first_line_starting_with_white_space_cannot_continue_the_trace_header() {
    // No header field starts with a space or a tab (RFC 5322 2.2.3): such a first line,
    // stored right after the Received header, would read as part of it, a client's words and
    // date inside this server's trace. An empty line goes between them, by DATA and by BDAT
    // (a first chunk of one space).
    let peer = Peer::start(&[]);
    let route = format!("dest.test=127.0.0.1:{}", peer.port);
    let server = Server::start(&["--route", &route]);
    let forged = "\t; Mon, 01 Jan 2001 00:00:00 +0000\r\nSubject: forged\r\n\r\nhello\r\n";
    let mut c = greeted(&server);
    assert!(c.cmd("MAIL FROM:<a@origin.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<r@dest.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(format!("{forged}.\r\n").as_bytes());
    assert!(c.line().starts_with("250"));
    assert!(c.cmd("MAIL FROM:<a@origin.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<r2@dest.test>").starts_with("250"));
    c.send(b"BDAT 1\r\n ");
    assert!(c.line().starts_with("250"));
    let rest = "more\r\nSubject: also\r\n\r\nhi\r\n";
    let last = format!("BDAT {} LAST\r\n{rest}", rest.len());
    c.send(last.as_bytes());
    let said = c.line();
    assert!(said.starts_with("250"), "{said}");
    let stored = peer.wait_for("two messages", Duration::from_secs(20), |s| s.len() == 2);
    for (rcpt, content) in [
        ("r@dest.test", forged.to_owned()),
        ("r2@dest.test", format!(" {rest}")),
    ] {
        let m = stored.iter().find(|m| m.rcpt_tos == [rcpt]).unwrap();
        let text = String::from_utf8(m.data.clone()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("Received: from c.test"), "{text:?}");
        assert_eq!(head.matches(';').count(), 1, "{text:?}");
        assert!(!head.contains("2001") && !head.contains("more"), "{text:?}");
        assert_eq!(body, content, "{text:?}");
    }
}

#[test]
fn a_relay_host_named_localhost_is_reached_on_ipv6_loopback_too() {
    // A smarthost listening on ::1 alone: `localhost` stands for both loopback addresses,
    // as a resolver gives it (before, for 127.0.0.1 only, and the mail waited for ever).
    let peer = Peer::start_on("::1", 0, &[]);
    let relay = format!("localhost:{}", peer.port);
    let server = Server::start(&["--relay-host", &relay]);
    send(
        &server,
        "alice@origin.test",
        &["bob@dest.test"],
        "<v6@t>",
        "x\r\n",
    );
    let stored = peer.wait_for("the message", Duration::from_secs(20), |s| s.len() == 1);
    assert_eq!(stored[0].rcpt_tos, ["bob@dest.test"]);
}

#[test]
fn a_large_body_of_dot_lines_goes_through_data_whole() {
    // Over 64 KiB, with a dot-stuffed line every few octets and long lines between: the
    // pieces the stuffing makes are gathered into writes, in order, none lost or doubled.
    let peer = Peer::start(&[]);
    let route = format!("dest.test=127.0.0.1:{}", peer.port);
    let server = Server::start(&["--route", &route]);
    let mut body = String::new();
    for i in 0..20_000 {
        body.push_str("..\r\n");
        if i % 1000 == 0 {
            body.push_str(&format!("{i:05}{}\r\n", "y".repeat(900)));
        }
    }
    send(
        &server,
        "alice@origin.test",
        &["bob@dest.test"],
        "<dots@t>",
        &body,
    );
    let stored = peer.wait_for("the message", Duration::from_secs(20), |s| s.len() == 1);
    let text = String::from_utf8(stored[0].data.clone()).unwrap();
    // The receiver undid the stuffing: each "..\r\n" sent in DATA is "." again.
    let sent = body.replace("..\r\n", ".\r\n");
    assert!(text.ends_with(&sent), "{} octets stored", text.len());
    assert!(text.len() > 64 * 1024);
}

#[test]
fn a_message_for_many_recipients_goes_to_a_pipelining_next_hop_in_one_transaction() {
    // 300 recipients at one next hop with PIPELINING and CHUNKING: their RCPTs go in groups
    // that fit the connection's window (RFC 2920 3.1), the body behind the last, and the
    // message is delivered once, to all of them.
    let (sink, out, addr) = start_sink(&[]);
    let route = format!("sink.test={addr}");
    let server = Server::start(&["--route", &route, "--metrics", "127.0.0.1:0"]);
    let mut c = greeted(&server);
    c.cmd("MAIL FROM:<a@origin.test>");
    for i in 0..300 {
        assert_eq!(c.cmd(&format!("RCPT TO:<r{i}@sink.test>")), "250 2.1.5 Ok");
    }
    c.cmd("DATA");
    c.send(b"Subject: many\r\n\r\nbody\r\n.\r\n");
    assert!(c.line().starts_with("250"));
    let text = server.metrics_until(|m| m.contains("postern_recipients_delivered_total 300\n"));
    assert!(
        text.contains("postern_recipients_delivered_total 300\n"),
        "{text}"
    );
    let counters = stop_sink(sink, out);
    assert!(
        counters.contains("postern_load_sink_bdat_bodies_total 1\n"),
        "{counters}"
    );
}

#[test]
fn lines_ended_in_cr_cr_lf_keep_the_header_section_whole() {
    // Text that went through an LF to CR LF conversion twice ends its lines in CR CR LF:
    // each is one line end, by DATA and by BDAT, so aiosmtpd finds the Message-ID among the
    // headers instead of in a body that began after the Subject.
    let peer = Peer::start(&[]);
    let route = format!("dest.test=127.0.0.1:{}", peer.port);
    let server = Server::start(&["--route", &route]);
    let message = |id: &str| {
        format!("Subject: twice converted\r\r\nMessage-ID: <{id}@t>\r\r\n\r\r\nbody\r\r\n")
    };
    let (mut c, _) = hello(&server);
    for (id, bdat) in [("crcr-data", false), ("crcr-bdat", true)] {
        assert!(c.cmd("MAIL FROM:<a@origin.test>").starts_with("250"));
        assert!(c.cmd("RCPT TO:<b@dest.test>").starts_with("250"));
        let text = message(id);
        if bdat {
            c.send(format!("BDAT {} LAST\r\n{text}", text.len()).as_bytes());
        } else {
            assert!(c.cmd("DATA").starts_with("354"));
            c.send(format!("{text}.\r\n").as_bytes());
        }
        let reply = c.line();
        assert!(reply.starts_with("250 2.0.0"), "{reply}");
    }
    let stored = peer.wait_for("two messages", Duration::from_secs(20), |s| s.len() == 2);
    for id in ["crcr-data", "crcr-bdat"] {
        let m = stored
            .iter()
            .find(|m| m.message_id == format!("<{id}@t>"))
            .unwrap_or_else(|| panic!("{id} not among the headers: {stored:?}"));
        let data = String::from_utf8_lossy(&m.data);
        assert!(
            data.ends_with(&format!(
                "Subject: twice converted\r\nMessage-ID: <{id}@t>\r\n\r\nbody\r\n"
            )),
            "{data:?}"
        );
    }
}

#[test]
fn mail_waiting_all_at_once_opens_a_connection_per_batch_not_per_message() {
    // Ten messages held in the queue, handed over together at a restart with
    // --max-transactions-in-flight 8: a connection takes up to 8 of them at once, so two
    // connections carry them all (ten opened before, eight of them only to say EHLO and
    // QUIT).
    assert_eq!(connections_for_held_messages(10, 1, &[]), 2);
}

#[test]
fn messages_for_many_recipients_waiting_together_get_a_connection_each() {
    // A message for more recipients than go in one group of commands is never batched with
    // others: four of them handed over at once with --max-transactions-in-flight 8 get four
    // connections, as with one transaction in flight, not one connection taking them in turn.
    assert_eq!(connections_for_held_messages(4, 150, &[]), 4);
}

#[test]
fn a_next_hop_without_pipelining_gets_a_connection_per_message_after_all() {
    // As above, to a next hop that offers no PIPELINING: the first connection to open finds
    // that each connection takes one message at a time, and the others get their own.
    assert_eq!(
        connections_for_held_messages(10, 1, &["--no-pipelining"]),
        10
    );
}

/// Holds `messages` messages for `rcpts` recipients each, all at one next hop, then restarts
/// postern with --max-transactions-in-flight 8 and the next hop a sink with `sink_flags`;
/// returns how many connections the sink took (every recipient delivered).
fn connections_for_held_messages(messages: usize, rcpts: usize, sink_flags: &[&str]) -> u64 {
    let queue = |held: &Server| {
        let mut c = greeted(held);
        for m in 0..messages {
            assert!(c.cmd("MAIL FROM:<s@origin.test>").starts_with("250"));
            for r in 0..rcpts {
                assert!(c
                    .cmd(&format!("RCPT TO:<r{r}@sink.test>"))
                    .starts_with("250"));
            }
            assert!(c.cmd("DATA").starts_with("354"));
            c.send(format!("Message-ID: <held{m}@t>\r\n\r\nx\r\n.\r\n").as_bytes());
            assert!(c.line().starts_with("250 2.0.0"));
        }
    };
    let (server, sink, out, _dir) =
        held_then_relayed(queue, sink_flags, &["--max-transactions-in-flight", "8"]);
    let delivered = format!("postern_recipients_delivered_total {}\n", messages * rcpts);
    let text = server.metrics_until(|m| m.contains(&delivered));
    assert!(text.contains(&delivered), "{text}");
    drop(server);
    let counters = stop_sink(sink, out);
    assert!(
        counters.contains(&format!("postern_load_sink_messages_total {messages}\n")),
        "{counters}"
    );
    counters
        .lines()
        .find_map(|l| l.strip_prefix("postern_load_sink_connections_total "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no connection count: {counters}"))
}

#[test]
fn a_message_for_many_recipients_among_others_waiting_is_not_batched_with_them() {
    // Transactions in flight (--max-transactions-in-flight 4) go back to back only when each
    // is one group of commands: the message for 150 recipients, waiting with small ones while
    // the only connection is busy, goes on its own, group by group, and the small ones after
    // it together. Every recipient is delivered, none deferred.
    let (sink, out, addr) = start_sink(&["--delay", "300ms"]);
    let route = format!("sink.test={addr}");
    let server = Server::start(&[
        "--route",
        &route,
        "--metrics",
        "127.0.0.1:0",
        "--max-transactions-in-flight",
        "4",
        "--max-connections-per-destination",
        "1",
    ]);
    let mut c = greeted(&server);
    for rcpts in [1, 150, 1, 1] {
        c.cmd("MAIL FROM:<a@origin.test>");
        for i in 0..rcpts {
            assert_eq!(c.cmd(&format!("RCPT TO:<r{i}@sink.test>")), "250 2.1.5 Ok");
        }
        c.cmd("DATA");
        c.send(b"Subject: batch\r\n\r\nbody\r\n.\r\n");
        assert!(c.line().starts_with("250"));
    }
    let text = server.metrics_until(|m| m.contains("postern_recipients_delivered_total 153\n"));
    assert!(
        text.contains("postern_recipients_delivered_total 153\n"),
        "{text}"
    );
    assert!(
        text.contains("postern_delivery_deferrals_total 0\n"),
        "{text}"
    );
    let counters = stop_sink(sink, out);
    assert!(
        counters.contains("postern_load_sink_messages_total 4\n"),
        "{counters}"
    );
}

#[test]
fn delivers_through_bdat_to_the_project_sink() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("record.txt");
    let (sink, out, addr) = start_sink(&["--record", record.to_str().unwrap()]);
    let route = format!("sink.test={addr}");
    let server = Server::start(&["--route", &route, "--metrics", "127.0.0.1:0"]);
    let n = 20;
    for i in 0..n {
        let body = format!("X-Postern-Load-Seq: {i}\r\n\r\nbody {i}\r\n");
        let mut c = greeted(&server);
        c.cmd("MAIL FROM:<a@origin.test>");
        c.cmd("RCPT TO:<r@sink.test>");
        c.cmd("DATA");
        c.send(format!("Message-ID: <bdat{i}@t>\r\n{body}.\r\n").as_bytes());
        assert!(c.line().starts_with("250"));
    }
    let text =
        server.metrics_until(|m| m.contains(&format!("postern_recipients_delivered_total {n}\n")));
    assert!(
        text.contains(&format!("postern_recipients_delivered_total {n}\n")),
        "{text}"
    );
    let counters = stop_sink(sink, out);
    assert!(
        counters.contains(&format!("postern_load_sink_bdat_bodies_total {n}\n")),
        "{counters}"
    );
    assert!(
        counters.contains("postern_load_sink_data_bodies_total 0\n"),
        "{counters}"
    );
    let recorded = std::fs::read_to_string(&record).unwrap();
    let mut seqs: Vec<u64> = recorded
        .lines()
        .map(|l| l.split(' ').next().unwrap().parse().unwrap())
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (0..n).collect::<Vec<_>>());
}

#[test]
fn temporary_failure_is_retried_until_delivered() {
    let peer = Peer::start(&["--tempfail-first", "2"]);
    let route = format!("dest.test=127.0.0.1:{}", peer.port);
    let mut args = vec!["--route", &route, "--metrics", "127.0.0.1:0"];
    args.extend(FAST_RETRY);
    let server = Server::start(&args);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<retry@t>",
        "hello\r\n",
    );
    let stored = peer.wait_for("the third attempt", Duration::from_secs(20), |s| {
        !s.is_empty()
    });
    assert_eq!(stored.len(), 1);
    let m = server.metrics_until(|m| {
        m.contains("postern_delivery_deferrals_total 2\n")
            && m.contains("postern_recipients_delivered_total 1\n")
    });
    assert!(m.contains("postern_delivery_deferrals_total 2\n"), "{m}");
    assert!(m.contains("postern_recipients_delivered_total 1\n"), "{m}");
    assert!(m.contains("postern_bounces_total 0\n"), "{m}");
}

#[test]
fn a_restart_with_a_shorter_retry_max_retries_queued_mail_within_it() {
    // Deferred for an hour by one run; the next run's --retry-max is 1s: the hour recorded in
    // the spool does not outlast the operator's new setting.
    let peer = Peer::start(&["--tempfail-first", "1"]);
    let route = format!("dest.test=127.0.0.1:{}", peer.port);
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let slow = [
        "--route",
        &route,
        "--metrics",
        "127.0.0.1:0",
        "--retry-initial",
        "1h",
        "--retry-max",
        "1h",
    ];
    let mut first = Server::start_in(&slow, spool.clone(), None);
    send(
        &first,
        "a@origin.test",
        &["b@dest.test"],
        "<later@t>",
        "x\r\n",
    );
    let m = first.metrics_until(|m| m.contains("postern_delivery_deferrals_total 1\n"));
    assert!(m.contains("postern_delivery_deferrals_total 1\n"), "{m}");
    assert!(first.terminate().success());
    assert!(peer.stored().is_empty());
    let quick = [
        "--route",
        &route,
        "--retry-initial",
        "500ms",
        "--retry-max",
        "1s",
    ];
    let _second = Server::start_in(&quick, spool, None);
    let stored = peer.wait_for(
        "the retry after the restart",
        Duration::from_secs(20),
        |s| !s.is_empty(),
    );
    assert_eq!(stored[0].message_id, "<later@t>");
}

#[test]
fn the_postmaster_is_accepted_from_anyone_and_delivered_where_configured() {
    // 127.0.0.1 is outside the relay networks here: only the postmaster is accepted from it.
    let peer = Peer::start(&[]);
    let ops = format!("ops.test=127.0.0.1:{}", peer.port);
    let mx = format!("mx.test=127.0.0.1:{}", peer.port);
    let server = Server::start(&[
        "--relay-network",
        "192.0.2.0/24",
        "--route",
        &ops,
        "--route",
        &mx,
        "--postmaster",
        "ops@ops.test",
    ]);
    let (mut c, _) = hello(&server);
    assert!(c.cmd("MAIL FROM:<a@origin.test>").starts_with("250"));
    assert!(c
        .cmd("RCPT TO:<someone@elsewhere.test>")
        .starts_with("554 5.7.1"));
    // The postmaster at an address literal that is not the one the client reached is not ours.
    assert!(c
        .cmd("RCPT TO:<postmaster@[192.0.2.9]>")
        .starts_with("554 5.7.1"));
    c.cmd("RSET");
    c.cmd("QUIT");
    send_commands(
        &server,
        &[
            "MAIL FROM:<a@origin.test>",
            "RCPT TO:<Postmaster>",
            "RCPT TO:<postmaster@MX.test>",
            "RCPT TO:<postmaster@[127.0.0.1]>",
        ],
        "<pm1@t>",
    );
    let (got, _) = peer.first("the postmaster's mail");
    // The addresses are the same mailbox: one recipient, the configured one.
    assert_eq!(got.rcpt_tos, ["ops@ops.test"]);

    // Without --postmaster, <postmaster> is postmaster@<hostname>, routed like any address.
    let peer = Peer::start(&[]);
    let mx = format!("mx.test=127.0.0.1:{}", peer.port);
    let server = Server::start(&["--relay-network", "192.0.2.0/24", "--route", &mx]);
    send_commands(
        &server,
        &[
            "MAIL FROM:<a@origin.test>",
            "RCPT TO:<postmaster>",
            "RCPT TO:<PostMaster@MX.TEST>",
            "RCPT TO:<POSTMASTER@[127.0.0.1]>",
        ],
        "<pm2@t>",
    );
    let (got, _) = peer.first("the postmaster's mail, by host name");
    assert_eq!(got.rcpt_tos, ["postmaster@mx.test"]);

    // A --postmaster in U-labels goes on in A-labels: the mail came without SMTPUTF8, and
    // the next hop (aiosmtpd here) offers none.
    let peer = Peer::start(&[]);
    let route = format!("xn--bcher-kva.test=127.0.0.1:{}", peer.port);
    let server = Server::start(&["--route", &route, "--postmaster", "pm@b\u{fc}cher.test"]);
    send_commands(
        &server,
        &["MAIL FROM:<a@origin.test>", "RCPT TO:<postmaster>"],
        "<pm3@t>",
    );
    let (got, _) = peer.first("the postmaster's mail, in A-labels");
    assert_eq!(got.rcpt_tos, ["pm@xn--bcher-kva.test"]);
}

#[test]
fn a_552_to_rcpt_is_temporary_and_those_recipients_follow_at_once() {
    // A next hop that takes one recipient per transaction and answers 552 to the others
    // (RFC 5321 4.5.3.1.10: treat it as temporary): all three arrive, nothing bounces, and
    // the rest go in the next transactions at once (the retry delay here is the default
    // 5 minutes, far past the wait below).
    let peer = Peer::start(&["--max-rcpts", "1"]);
    let server = routed_to(&peer, &[]);
    send(
        &server,
        "alice@origin.test",
        &["a@dest.test", "b@dest.test", "c@dest.test"],
        "<many@t>",
        "body\r\n",
    );
    let stored = peer.wait_for("three deliveries", Duration::from_secs(20), |s| {
        s.iter().map(|m| m.rcpt_tos.len()).sum::<usize>() >= 3
    });
    let mut got: Vec<&str> = stored
        .iter()
        .flat_map(|m| m.rcpt_tos.iter().map(String::as_str))
        .collect();
    got.sort_unstable();
    assert_eq!(got, ["a@dest.test", "b@dest.test", "c@dest.test"]);
    assert!(
        stored.iter().all(|m| m.message_id == "<many@t>"),
        "no bounce: {stored:?}"
    );
}

#[test]
fn a_mailbox_given_twice_is_one_recipient() {
    let peer = Peer::start(&[]);
    let route = format!("dest.test=127.0.0.1:{}", peer.port);
    let server = Server::start(&["--route", &route]);
    send_commands(
        &server,
        &[
            "MAIL FROM:<a@origin.test>",
            "RCPT TO:<bob@dest.test>",
            "RCPT TO:<bob@DEST.test>",
            "RCPT TO:<Bob@dest.test>",
            "RCPT TO:<bob@dest.test>",
            "RCPT TO:<\"bob\"@dest.test>",
            "RCPT TO:<\"b\\ob\"@Dest.test>",
        ],
        "<dup@t>",
    );
    let (got, _) = peer.first("the message");
    // Domains compare without case; local parts by their value (quotes and quoted pairs
    // aside), with their case (RFC 5321 2.4).
    assert_eq!(got.rcpt_tos, ["bob@dest.test", "Bob@dest.test"]);

    // A long list (looked up in a set rather than compared in place) the same way.
    let mut commands = vec!["MAIL FROM:<a@origin.test>".to_owned()];
    for i in 0..20 {
        commands.push(format!("RCPT TO:<r{i}@dest.test>"));
        commands.push(format!("RCPT TO:<r{i}@Dest.Test>"));
        commands.push(format!("RCPT TO:<\"r{i}\"@dest.test>"));
    }
    commands.push("RCPT TO:<R0@dest.test>".to_owned());
    let refs: Vec<&str> = commands.iter().map(String::as_str).collect();
    send_commands(&server, &refs, "<dup2@t>");
    let stored = peer.wait_for("the second message", Duration::from_secs(20), |s| {
        s.len() == 2
    });
    let second = stored.iter().find(|m| m.message_id == "<dup2@t>").unwrap();
    let mut want: Vec<String> = (0..20).map(|i| format!("r{i}@dest.test")).collect();
    want.push("R0@dest.test".to_owned());
    assert_eq!(second.rcpt_tos, want);
}

#[test]
fn next_hop_down_then_up() {
    let down = reserve("127.0.0.1", 0);
    let port = down.1;
    let route = format!("dest.test=127.0.0.1:{port}");
    let mut args = vec!["--route", &route, "--metrics", "127.0.0.1:0"];
    args.extend(FAST_RETRY);
    let server = Server::start(&args);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<down@t>",
        "wait for me\r\n",
    );
    // Nothing listens yet: the attempt fails and is deferred.
    let m = server.metrics_until(|m| {
        m.contains("postern_delivery_deferrals_total 1\n")
            || m.contains("postern_delivery_deferrals_total 2\n")
    });
    assert!(m.contains("postern_delivery_deferrals_total"), "{m}");
    assert!(m.contains("postern_recipients_delivered_total 0\n"), "{m}");
    drop(down);
    let peer = Peer::start_on("127.0.0.1", port, &[]);
    let stored = peer.wait_for("the retry", Duration::from_secs(20), |s| !s.is_empty());
    assert_eq!(stored[0].message_id, "<down@t>");
}

/// libfaketime (Debian's `faketime` package), which moves the wall clock a process reads, not
/// its monotonic clock, by the offset a file holds, read again at each reading.
fn faketime_library() -> std::path::PathBuf {
    std::fs::read_dir("/usr/lib")
        .unwrap()
        .map(|e| e.unwrap().path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists())
        .expect("libfaketime is installed (scripts/test installs the faketime package)")
}

/// A server routing dest.test to 127.0.0.1:`port` on one core, with `extra` flags, whose
/// wall clock is moved by the offset written to the file returned (`+0` at first; `-1d`,
/// `+2h`, read again at each reading of the clock).
fn server_with_a_clock_to_step(port: u16, extra: &[&str]) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let offset = dir.path().join("offset");
    std::fs::write(&offset, "+0\n").unwrap();
    let (library, offset_file) = (faketime_library(), offset.to_str().unwrap().to_owned());
    let route = format!("dest.test=127.0.0.1:{port}");
    let mut args = vec!["--route", &route, "--retry-initial", "1s", "--cores", "1"];
    args.extend(extra);
    let server = Server::start_with_env(
        &args,
        &[
            ("LD_PRELOAD", library.to_str().unwrap()),
            ("FAKETIME_TIMESTAMP_FILE", &offset_file),
            ("FAKETIME_NO_CACHE", "1"),
            // The name libfaketime documents, and the one older releases read.
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
            ("DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    (server, dir)
}

/// Steps the clock of a [`server_with_a_clock_to_step`] to `offset`.
fn step_clock(dir: &tempfile::TempDir, offset: &str) {
    std::fs::write(dir.path().join("offset"), format!("{offset}\n")).unwrap();
}

#[test]
fn a_step_back_of_the_clock_holds_no_mail_for_a_paused_next_hop() {
    let down = reserve("127.0.0.1", 0);
    let (server, clock) = server_with_a_clock_to_step(down.1, &["--retry-max", "2s"]);
    // Nothing listens: two attempts fail and the next hop is paused for a second.
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<first@t>",
        "one\r\n",
    );
    let paused = server.log_until(|l| l.contains("delivery to it paused for 1s"));
    // The wall clock is stepped back a day (an NTP step, `date -s`), and the next hop comes up.
    step_clock(&clock, "-1d");
    let port = down.1;
    drop(down);
    let peer = Peer::start_on("127.0.0.1", port, &[]);
    // A message that comes while the pause lasts waits for its end, not for the day; and the
    // first one's retry, a few seconds off when it was deferred, is as far off as it was.
    send(
        &server,
        "a@origin.test",
        &["c@dest.test"],
        "<second@t>",
        "two\r\n",
    );
    let stored = peer.wait_for("both messages", Duration::from_secs(30), |s| s.len() >= 2);
    let mut ids: Vec<&str> = stored.iter().map(|s| s.message_id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["<first@t>", "<second@t>"]);
    // The server's clock did go back: its log's time (the wall clock, RFC 3339 in UTC, which
    // sorts as text) for the second delivery is before the pause's.
    let sent = server.log_until(|l| l.contains("to=\"c@dest.test\"") && l.contains("sent"));
    let time = |line: &str| line.split_whitespace().next().unwrap().to_owned();
    assert!(time(&sent) < time(&paused), "{paused}\n{sent}");
}

#[test]
fn a_step_ahead_of_the_clock_does_not_age_deferred_mail_into_the_longest_delay() {
    let down = reserve("127.0.0.1", 0);
    // The longest delay an hour (the default): a message as old as that waits that long.
    let (server, clock) = server_with_a_clock_to_step(down.1, &["--metrics", "127.0.0.1:0"]);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<ahead@t>",
        "one\r\n",
    );
    server.metrics_until(|m| m.contains("postern_delivery_deferrals_total 1\n"));
    // The wall clock is stepped two hours ahead (a virtual machine resumed, a clock set
    // right); the attempt after that fails too. Before, the message then counted as two
    // hours old and waited the longest delay, an hour, for its next attempt.
    step_clock(&clock, "+2h");
    server.metrics_until(|m| m.contains("postern_delivery_deferrals_total 2\n"));
    let port = down.1;
    drop(down);
    let peer = Peer::start_on("127.0.0.1", port, &[]);
    let stored = peer.wait_for("the message", Duration::from_secs(30), |s| !s.is_empty());
    assert_eq!(stored[0].message_id, "<ahead@t>");
}

#[test]
fn sigkill_during_deliveries_loses_nothing_and_repeats_only_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    // A slow next hop, so deliveries are in flight when postern dies.
    let peer = Peer::start(&["--delay", "0.05"]);
    let route = format!("dest.test=127.0.0.1:{}", peer.port);
    let args = [
        "--route",
        route.as_str(),
        "--max-connections-per-destination",
        "4",
    ];
    let mut server = Server::start_in(&args, spool.clone(), None);
    let n = 60;
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("<kill{i}@t>");
        send(&server, "a@origin.test", &["b@dest.test"], &id, "x\r\n");
        ids.push(id);
    }
    // Kill it while some are delivered and some are not.
    peer.wait_for("some deliveries", Duration::from_secs(20), |s| s.len() >= 5);
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let before = peer.stored().len();
    assert!(
        before < n,
        "all delivered before the kill; the test proves nothing"
    );
    let _server = Server::start_in(&args, spool, None);
    let stored = peer.wait_for("every message", Duration::from_secs(60), |s| {
        let mut seen: Vec<&str> = s.iter().map(|m| m.message_id.as_str()).collect();
        seen.sort_unstable();
        seen.dedup();
        seen.len() == n
    });
    let mut count: HashMap<&str, usize> = HashMap::new();
    for s in &stored {
        *count.entry(s.message_id.as_str()).or_default() += 1;
    }
    for id in &ids {
        assert!(count.contains_key(id.as_str()), "{id} lost");
    }
    // Only deliveries in flight at the kill (at most one per connection) may repeat.
    let repeated: usize = count.values().map(|c| c - 1).sum();
    assert!(repeated <= 4, "{repeated} repeated deliveries: {count:?}");
}

#[test]
fn a_message_over_the_next_hops_size_fails_at_once() {
    let peer = Peer::start(&["--size-limit", "4000"]);
    let server = routed_to(&peer, &[]);
    let big = "y".repeat(76) + "\r\n";
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<big@t>",
        &big.repeat(64),
    );
    let stored = peer.wait_for("the bounce", Duration::from_secs(20), |s| !s.is_empty());
    assert_eq!(stored.len(), 1, "only the bounce arrives");
    let text = String::from_utf8_lossy(&stored[0].data);
    assert!(text.contains("Status: 5.3.4"), "{text}");
    // Decided here from the next hop's SIZE, not said by it (RFC 3464 2.3.6).
    assert!(
        text.contains("Diagnostic-Code: X-Postern; message size exceeds"),
        "{text}"
    );
    assert!(!text.contains("said:"), "{text}");
}

#[test]
fn sigterm_waits_for_a_delivery_in_flight_so_the_next_run_does_not_send_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    // A next hop that answers the end of the data only when the test says so.
    let (told, gate) = std::sync::mpsc::channel();
    let (port, stored, _) =
        scripted_next_hop(|_, _| None, Act::SayWhenTold(gate, "250 2.0.0 stored\r\n"));
    let route = format!("dest.test=127.0.0.1:{port}");
    let args = ["--route", route.as_str(), "--shutdown-grace", "20s"];
    let mut server = Server::start_in(&args, spool.clone(), None);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<inflight@t>",
        "x\r\n",
    );
    stored.recv_timeout(Duration::from_secs(20)).unwrap();
    // Stop while the next hop holds its reply; the listener closing shows the stop began.
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(server.smtp).is_ok() {
        assert!(std::time::Instant::now() < deadline, "still listening");
        std::thread::sleep(Duration::from_millis(10));
    }
    told.send(()).unwrap();
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");

    // The next run knows the message was delivered: only the new one goes out, on the one
    // connection the destination may have, after anything recovered.
    let peer = Peer::start(&[]);
    let route = format!("dest.test=127.0.0.1:{}", peer.port);
    let args = [
        "--route",
        route.as_str(),
        "--max-connections-per-destination",
        "1",
    ];
    let server = Server::start_in(&args, spool, None);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<after@t>",
        "x\r\n",
    );
    let got = peer.wait_for("the new message", Duration::from_secs(20), |s| {
        s.iter().any(|m| m.message_id == "<after@t>")
    });
    let ids: Vec<&str> = got.iter().map(|m| m.message_id.as_str()).collect();
    assert_eq!(ids, ["<after@t>"], "sent again after a graceful stop");
}

#[test]
fn each_deferred_recipient_keeps_its_own_reply() {
    let (port, stored, _) = scripted_next_hop(
        |_, line| {
            if line.starts_with("RCPT TO:<busy@") {
                Some(Act::Say("450 4.2.1 mailbox busy\r\n"))
            } else if line.starts_with("RCPT TO:<later@") {
                Some(Act::Say("451 4.3.0 try later\r\n"))
            } else {
                None
            }
        },
        Act::Say("250 2.0.0 stored\r\n"),
    );
    let route = format!("dest.test=127.0.0.1:{port}");
    let server = Server::start(&["--route", &route]);
    // Nobody taken (the whole transaction put off), then one taken beside the two.
    let ids = [
        send(
            &server,
            "a@origin.test",
            &["busy@dest.test", "later@dest.test"],
            "<none@t>",
            "x\r\n",
        ),
        send(
            &server,
            "a@origin.test",
            &["busy@dest.test", "ok@dest.test", "later@dest.test"],
            "<some@t>",
            "x\r\n",
        ),
    ];
    stored.recv_timeout(Duration::from_secs(20)).unwrap();
    for id in &ids {
        for (rcpt, reply) in [
            ("busy@dest.test", "450 4.2.1 mailbox busy"),
            ("later@dest.test", "451 4.3.0 try later"),
        ] {
            let line = server.log_until(|l| {
                l.contains(id.as_str())
                    && l.contains(&format!("to=\"{rcpt}\""))
                    && l.contains("status=\"deferred\"")
            });
            assert!(line.contains(reply), "{line}");
        }
    }
}

/// A one-core server with 128 KiB segments that relays `sink.test` to the sink at `addr`.
fn small_segment_server(addr: &str) -> Server {
    let route = format!("sink.test={addr}");
    Server::start(&[
        "--route",
        &route,
        "--metrics",
        "127.0.0.1:0",
        "--cores",
        "1",
        "--spool-segment-size",
        "128k",
    ])
}

/// Sends messages `from..from + n` of about 20 KB each to `r@sink.test` and waits until all
/// the server has taken so far are delivered.
fn send_20k(server: &Server, from: usize, n: usize) {
    let filler = "x".repeat(998);
    let body: String = (0..20).map(|_| format!("{filler}\r\n")).collect();
    for i in from..from + n {
        let mut c = greeted(server);
        c.cmd("MAIL FROM:<a@origin.test>");
        c.cmd("RCPT TO:<r@sink.test>");
        c.cmd("DATA");
        c.send(format!("Message-ID: <seg{i}@t>\r\n\r\n{body}.\r\n").as_bytes());
        assert!(c.line().starts_with("250"));
    }
    let delivered = format!("postern_recipients_delivered_total {}\n", from + n);
    server.metrics_until(|m| m.contains(&delivered));
}

/// Segment files in a core's directory.
fn segments(core: &std::path::Path) -> usize {
    std::fs::read_dir(core)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
        .count()
}

/// Waits (up to 20 s) until a core's directory holds at most `n` segment files.
fn segments_down_to(core: &std::path::Path, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while segments(core) > n && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(segments(core) <= n, "{} segments left", segments(core));
}

/// Segments whose messages are all delivered are deleted while the server runs (off the core
/// that freed them), not left until the next start.
#[test]
fn segments_of_delivered_mail_are_deleted_while_the_server_runs() {
    let (sink, out, addr) = start_sink(&[]);
    let server = small_segment_server(&addr);
    send_20k(&server, 0, 40);
    // About 800 KiB went through 128 KiB segments; what is left is the segment being written,
    // its spare and at most one behind them.
    segments_down_to(&server.spool.join("0"), 3);
    stop_sink(sink, out);
}

/// A bind mount over a file, undone when dropped: the file's name cannot be unlinked while
/// it is there (`EBUSY`). Needs the privilege to mount (root in CI).
struct BindMount(std::path::PathBuf);

impl BindMount {
    fn over(source: &std::path::Path, target: &std::path::Path) -> BindMount {
        let ok = std::process::Command::new("mount")
            .arg("--bind")
            .args([source, target])
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount --bind over {}", target.display());
        BindMount(target.to_owned())
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A freed segment that cannot be deleted holds back the deletion of every newer one (whose
/// status records may be what makes its messages final), and is tried again later.
#[test]
fn a_segment_that_cannot_be_deleted_holds_back_the_newer_ones() {
    let (sink, out, addr) = start_sink(&[]);
    let server = small_segment_server(&addr);
    send_20k(&server, 0, 4);
    let core = server.spool.join("0");
    let first = core.join("0000000001.seg");
    assert!(first.exists());
    let dummy = tempfile::NamedTempFile::new().unwrap();
    let mount = BindMount::over(dummy.path(), &first);
    // About 800 KiB more: segment 1 and several after it are freed; 1 cannot go.
    send_20k(&server, 4, 40);
    server.log_until(|l| l.contains("spool error while deleting") && l.contains("0000000001.seg"));
    assert!(
        segments(&core) >= 6,
        "{} segments: newer ones went before the first",
        segments(&core)
    );
    // Once it can go, they all go, at the next reclaim (the next message's).
    drop(mount);
    send_20k(&server, 44, 1);
    segments_down_to(&core, 3);
    assert!(!first.exists());
    stop_sink(sink, out);
}
