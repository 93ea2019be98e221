//! Next hops found through MX records (from a test DNS server) and routes: preference order,
//! fallback to the address records, null MX, a primary that puts mail off or comes back, and
//! next hops whose addresses do not answer, greet or stay connected.
#![allow(clippy::unwrap_used)]

mod common;
mod relaying;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use common::Server;
use relaying::*;

/// A server that asks `dns` for MX records and reaches MX hosts on `port`, with `extra` flags,
/// metrics, and retries a minute apart: only what happens within the first attempt is seen.
fn mx_server_one_attempt(dns: &dns_server::TestDns, port: u16, extra: &[&str]) -> Server {
    let dns_addr = dns.addr.to_string();
    let port = port.to_string();
    let mut args = vec!["--dns-server", &dns_addr, "--mx-port", &port];
    args.extend(["--retry-initial", "60s", "--metrics", "127.0.0.1:0"]);
    args.extend(extra);
    Server::start(&args)
}

/// A server that asks `dns` for MX records and reaches MX hosts on `port`, with `extra` flags
/// and quick retries.
fn mx_server(dns: &dns_server::TestDns, port: u16, extra: &[&str]) -> Server {
    let dns_addr = dns.addr.to_string();
    let port = port.to_string();
    let mut args = vec!["--dns-server", &dns_addr, "--mx-port", &port];
    args.extend(extra);
    args.extend(FAST_RETRY);
    Server::start(&args)
}

#[test]
fn the_relay_host_is_reached_at_its_own_address_not_through_its_mx() {
    use dns_server::{Rec, TestDns};
    // relay.test has an address and an MX record naming another host: mail sent through the
    // relay host goes to relay.test itself (an MX is for mail addressed to the domain).
    let relay = Peer::start_on("127.0.0.60", 0, &[]);
    let port = relay.port;
    let other = Peer::start_on("127.0.0.61", port, &[]);
    let dns = TestDns::start(
        "test",
        &[
            ("relay.test.", Rec::A("127.0.0.60".parse().unwrap())),
            ("relay.test.", Rec::Mx(10, "other.test.")),
            ("other.test.", Rec::A("127.0.0.61".parse().unwrap())),
        ],
    );
    let dns_addr = dns.addr.to_string();
    let relay_host = format!("relay.test:{port}");
    let mut args = vec!["--dns-server", &dns_addr, "--relay-host", &relay_host];
    args.extend(FAST_RETRY);
    let server = Server::start(&args);
    send(
        &server,
        "s@origin.test",
        &["r@anywhere.test"],
        "<smarthost@t>",
        "x\r\n",
    );
    relay.first("delivery to the relay host");
    assert!(
        other.stored().is_empty(),
        "delivered through the relay host's MX"
    );
    drop(dns);
}

#[test]
fn mx_preference_fallback_to_a_and_null_mx() {
    use dns_server::{Rec, TestDns};
    // Two MX hosts on two loopback addresses, same port; the preferred one is down at first.
    let mx2 = Peer::start_on("127.0.0.3", 0, &[]);
    let port = mx2.port;
    let mx1_down = reserve("127.0.0.2", port);
    let implicit = Peer::start_on("127.0.0.4", port, &[]);
    let origin = Peer::start_on("127.0.0.5", port, &[]);
    let dns = TestDns::start(
        "test",
        &[
            ("pref.test.", Rec::Mx(10, "mx1.test.")),
            ("pref.test.", Rec::Mx(20, "mx2.test.")),
            ("mx1.test.", Rec::A("127.0.0.2".parse().unwrap())),
            ("mx2.test.", Rec::A("127.0.0.3".parse().unwrap())),
            ("plain.test.", Rec::A("127.0.0.4".parse().unwrap())),
            ("null.test.", Rec::Mx(0, ".")),
            ("origin.test.", Rec::A("127.0.0.5".parse().unwrap())),
        ],
    );
    // Connections are not kept idle, so each message looks up and connects afresh.
    let server = mx_server(&dns, port, &["--outbound-idle-timeout", "10ms"]);
    // mx1 (preference 10) refuses connections: delivered to mx2.
    send(
        &server,
        "s@origin.test",
        &["r@pref.test"],
        "<pref1@t>",
        "x\r\n",
    );
    mx2.wait_for("delivery to the second MX", Duration::from_secs(20), |s| {
        s.len() == 1
    });
    // An address found unreachable goes last for the first retry delay (200 ms here,
    // docs/delivery.md), whatever its preference: the next message comes once that is over,
    // which is the behaviour asked about here, not a wait for an event.
    let avoided_until = std::time::Instant::now() + Duration::from_millis(400);
    // Now mx1 is up: the next message goes to it, not to mx2.
    drop(mx1_down);
    let mx1 = Peer::start_on("127.0.0.2", port, &[]);
    std::thread::sleep(avoided_until.saturating_duration_since(std::time::Instant::now()));
    send(
        &server,
        "s@origin.test",
        &["r@pref.test"],
        "<pref2@t>",
        "x\r\n",
    );
    mx1.wait_for("delivery to the first MX", Duration::from_secs(20), |s| {
        s.len() == 1
    });
    assert_eq!(mx2.stored().len(), 1);
    // No MX: the domain's own address.
    send(
        &server,
        "s@origin.test",
        &["r@plain.test"],
        "<plain@t>",
        "x\r\n",
    );
    implicit.wait_for(
        "delivery to the implicit MX",
        Duration::from_secs(20),
        |s| s.len() == 1,
    );
    // Null MX: bounced at once, the report going to the sender's domain.
    send(
        &server,
        "s@origin.test",
        &["r@null.test"],
        "<null@t>",
        "x\r\n",
    );
    let (bounce, text) = origin.first("the null-MX bounce");
    assert!(text.contains("Status: 5.1.10"), "{text}");
    assert_eq!(bounce.mail_from, "<>");
    drop(dns);
}

/// A next hop on `host` (port 0: any) that greets and answers EHLO, then says
/// `421 4.3.2` to MAIL and closes, for every connection (bounded). Returns its port and a
/// count of its connections.
fn busy_next_hop(host: &str, port: u16) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    busy_next_hop_gated(host, port, None)
}

/// [`busy_next_hop`], which greets its first connection only once `gate` gets a word.
fn busy_next_hop_gated(
    host: &str,
    port: u16,
    gate: Option<std::sync::mpsc::Receiver<()>>,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let l = TcpListener::bind((host, port)).unwrap();
    let port = l.local_addr().unwrap().port();
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for conn in l.incoming().take(50) {
            let Ok(s) = conn else { return };
            seen.fetch_add(1, Ordering::SeqCst);
            if let Some(gate) = &gate {
                let _ = gate.recv_timeout(Duration::from_secs(20));
            }
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            let _ = w.write_all(b"220 busy.test ESMTP\r\n");
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                if line.starts_with("MAIL") {
                    let _ = w.write_all(b"421 4.3.2 busy.test too busy, closing\r\n");
                    break;
                }
                let _ = w.write_all(b"250 busy.test\r\n");
                line.clear();
            }
        }
    });
    (port, count)
}

#[test]
fn a_primary_mx_that_puts_mail_off_passes_it_to_the_next_mx_at_once() {
    use dns_server::{Rec, TestDns};
    // mx1 (preference 10) takes every session but answers 451 to every message; mx2
    // (preference 20) takes mail. busy1 (10) says 421 to MAIL; busy2 (20) takes mail. Their
    // addresses are this test's own: all on one port, they must not meet another test's.
    let mx2 = Peer::start_on("127.0.0.23", 0, &[]);
    let port = mx2.port;
    let mx1 = Peer::start_on("127.0.0.22", port, &["--tempfail-first", "1000"]);
    let (_, busy_connections) = busy_next_hop("127.0.0.24", port);
    let busy2 = Peer::start_on("127.0.0.25", port, &[]);
    let dns = TestDns::start(
        "test",
        &[
            ("tempfail.test.", Rec::Mx(10, "mx1.test.")),
            ("tempfail.test.", Rec::Mx(20, "mx2.test.")),
            ("mx1.test.", Rec::A("127.0.0.22".parse().unwrap())),
            ("mx2.test.", Rec::A("127.0.0.23".parse().unwrap())),
            ("busy.test.", Rec::Mx(10, "busy1.test.")),
            ("busy.test.", Rec::Mx(20, "busy2.test.")),
            ("busy1.test.", Rec::A("127.0.0.24".parse().unwrap())),
            ("busy2.test.", Rec::A("127.0.0.25".parse().unwrap())),
        ],
    );
    // Retries a minute apart: only a move to the next MX within the attempt delivers in time.
    let server = mx_server_one_attempt(&dns, port, &[]);
    // Several in a row, so that several connections to mx1 are open at once: none of them
    // may take back a message another one passed over.
    send_in_one_session(&server, "r@tempfail.test", "tf", 6);
    mx2.wait_for("delivery to the second MX", Duration::from_secs(20), |s| {
        s.len() == 6
    });
    assert!(mx1.stored().is_empty());
    send(
        &server,
        "s@origin.test",
        &["r@busy.test"],
        "<busy@t>",
        "x\r\n",
    );
    busy2.wait_for("delivery past the busy MX", Duration::from_secs(20), |s| {
        s.len() == 1
    });
    assert!(busy_connections.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    let m = server.metrics_until(|m| m.contains("postern_recipients_delivered_total 7\n"));
    assert!(m.contains("postern_recipients_delivered_total 7\n"), "{m}");
    assert!(m.contains("postern_delivery_deferrals_total 0\n"), "{m}");
    drop(dns);
}

#[test]
fn a_primary_mx_that_comes_back_gets_mail_again_though_a_backup_connection_is_open() {
    use dns_server::{Rec, TestDns};
    // mx1 is down at first: mail goes to mx2, over a connection postern keeps (the idle
    // timeout is 10 s). Once mx1 is back, mail must go to it again within the pause (the first
    // retry delay, 200 ms here), not keep flowing over the open connection to mx2.
    let mx2 = Peer::start_on("127.0.0.3", 0, &[]);
    let port = mx2.port;
    let mx1_down = reserve("127.0.0.2", port);
    let dns = TestDns::start(
        "test",
        &[
            ("back.test.", Rec::Mx(10, "mx1.test.")),
            ("back.test.", Rec::Mx(20, "mx2.test.")),
            ("mx1.test.", Rec::A("127.0.0.2".parse().unwrap())),
            ("mx2.test.", Rec::A("127.0.0.3".parse().unwrap())),
        ],
    );
    let server = mx_server(&dns, port, &[]);
    let (mut c, _) = hello(&server);
    let send_one = |c: &mut common::Client, n: usize| {
        assert!(c.cmd("MAIL FROM:<s@origin.test>").starts_with("250"));
        assert!(c.cmd("RCPT TO:<r@back.test>").starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        c.send(format!("Message-ID: <back{n}@t>\r\n\r\nx\r\n.\r\n").as_bytes());
        assert!(c.line().starts_with("250 2.0.0"));
    };
    send_one(&mut c, 0);
    mx2.wait_for("delivery to the backup", Duration::from_secs(20), |s| {
        s.len() == 1
    });
    drop(mx1_down);
    let mx1 = Peer::start_on("127.0.0.2", port, &[]);
    // Keep mail flowing (so the connection to mx2 never idles out) until mx1 gets some, each
    // message delivered before the next; bounded in count and time.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut sent = 1;
    while mx1.stored().is_empty() {
        assert!(
            std::time::Instant::now() < deadline && sent < 2000,
            "mx1 got nothing; mx2 has {}",
            mx2.stored().len()
        );
        send_one(&mut c, sent);
        sent += 1;
        mx2.wait_for("each message", Duration::from_secs(20), |s| {
            s.len() + mx1.stored().len() == sent
        });
    }
    drop(dns);
}

/// A next hop on `host:port` that greets every connection with `421` and closes (bounded);
/// returns a count of its connections.
#[test]
fn a_next_hop_whose_every_address_breaks_off_is_paused_not_tried_again_for_each_message() {
    use dns_server::{Rec, TestDns};
    use std::sync::atomic::Ordering;
    // Both MX hosts answer 421 to MAIL. The first greets only once all four messages are
    // queued behind the one connection the destination may have.
    let (gate_tx, gate) = std::sync::mpsc::channel();
    let (port, first) = busy_next_hop_gated("127.0.0.40", 0, Some(gate));
    let (_, second) = busy_next_hop("127.0.0.41", port);
    let dns = TestDns::start(
        "test",
        &[
            ("down.test.", Rec::Mx(10, "a.down.test.")),
            ("down.test.", Rec::Mx(20, "b.down.test.")),
            ("a.down.test.", Rec::A("127.0.0.40".parse().unwrap())),
            ("b.down.test.", Rec::A("127.0.0.41".parse().unwrap())),
        ],
    );
    let server = mx_server_one_attempt(&dns, port, &["--max-connections-per-destination", "1"]);
    send_in_one_session(&server, "r@down.test", "down", 4);
    gate_tx.send(()).unwrap();
    let m = server.metrics_until(|m| m.contains("postern_delivery_deferrals_total 4\n"));
    assert!(m.contains("postern_delivery_deferrals_total 4\n"), "{m}");
    // One connection to each address; before, each message tried both (eight connections).
    assert_eq!(
        first.load(Ordering::SeqCst),
        1,
        "connections to the first MX"
    );
    assert_eq!(
        second.load(Ordering::SeqCst),
        1,
        "connections to the second MX"
    );
    // The messages never sent say so, rather than quoting another message's answer as
    // their own.
    let replies: Vec<String> = queue_listing(&server.spool)
        .iter()
        .map(|m| m["recipients"][0]["reply"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(replies.len(), 4, "{replies:?}");
    let not_tried = replies
        .iter()
        .filter(|r| r.starts_with("not tried, delivery to the next hop suspended after: "))
        .count();
    assert_eq!(not_tried, 3, "{replies:?}");
    drop(dns);
}

/// The deferrals counted so far, from a scrape of /metrics.
fn deferrals(m: &str) -> usize {
    m.lines()
        .find_map(|l| l.strip_prefix("postern_delivery_deferrals_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn refusing_greeter(host: &str, port: u16) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let l = TcpListener::bind((host, port)).unwrap();
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for conn in l.incoming().take(50) {
            let Ok(mut s) = conn else { return };
            seen.fetch_add(1, Ordering::SeqCst);
            let _ = s.write_all(b"421 4.3.2 not now\r\n");
        }
    });
    count
}

/// A [`refusing_greeter`] on a free port of 127.0.0.1: its port and its count of connections.
fn refusing_next_hop() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    (port, refusing_greeter("127.0.0.1", port))
}

#[test]
fn the_end_of_a_pause_costs_one_connection_not_one_per_waiting_message() {
    // A next hop that refuses every session, and several messages waiting for it: each time
    // the pause ends they all come due together, and one connection finds it still down.
    let (port, refusals) = refusing_next_hop();
    let route = format!("dest.test=127.0.0.1:{port}");
    let server = Server::start(&[
        "--route",
        &route,
        "--retry-initial",
        "300ms",
        "--retry-max",
        "300ms",
        "--metrics",
        "127.0.0.1:0",
        "--cores",
        "1",
    ]);
    for i in 0..6 {
        send(
            &server,
            "a@origin.test",
            &["b@dest.test"],
            &format!("<p{i}@t>"),
            "x\r\n",
        );
    }
    let m = server.metrics_until(|m| deferrals(m) >= 30);
    let connections = refusals.load(std::sync::atomic::Ordering::SeqCst);
    // Each connection after the first pause defers the six messages together.
    assert!(
        connections * 3 <= deferrals(&m),
        "{connections} connections for {} deferrals",
        deferrals(&m)
    );
}

#[test]
fn the_end_of_a_pause_for_a_name_that_cannot_be_looked_up_costs_one_lookup() {
    use dns_server::TestDns;
    // The MX lookup of the recipients' domain fails (SERVFAIL) each time, and several messages
    // wait for it: each time the pause ends they all come due together, and one connection
    // attempt looks the name up for them all, as for a next hop that does not answer, rather
    // than one per message (each holding a place among the outbound connections). Attempts
    // are counted from the relay's debug log.
    let dns = TestDns::start("test", &[]);
    let dns_addr = dns.addr.to_string();
    let server = Server::start_with_env(
        &[
            "--dns-server",
            &dns_addr,
            "--retry-initial",
            "300ms",
            "--retry-max",
            "300ms",
            "--metrics",
            "127.0.0.1:0",
            "--cores",
            "1",
        ],
        &[("RUST_LOG", "info,postern_relay::engine::worker=debug")],
    );
    for i in 0..6 {
        send(
            &server,
            "a@origin.test",
            &["b@servfail.test"],
            &format!("<s{i}@t>"),
            "x\r\n",
        );
    }
    let attempts = || server.log_count(|l| l.contains("finding the next hop's addresses"));
    // The first round, as the messages came, may start several; then five pauses.
    let first = deferrals(&server.metrics_until(|m| deferrals(m) >= 6));
    let before = attempts();
    let m = server.metrics_until(|m| deferrals(m) >= first + 30);
    let later = deferrals(&m) - first;
    let lookups = attempts() - before;
    assert!(later >= 30, "{later} deferrals");
    assert!(
        lookups * 3 <= later,
        "{lookups} attempts for {later} deferrals"
    );
}

#[test]
fn a_flush_tries_a_next_hop_still_down_with_one_connection_not_one_per_message() {
    // A next hop that refuses every session, paused with six messages waiting for it. A flush
    // ends the pause and sends them all at once; the next hop's failures are not forgotten
    // with it, so one connection finds it still down rather than one per message.
    let (port, refusals) = refusing_next_hop();
    let route = format!("dest.test=127.0.0.1:{port}");
    let server = Server::start(&[
        "--route",
        &route,
        "--retry-initial",
        "60s",
        "--metrics",
        "127.0.0.1:0",
        "--cores",
        "1",
    ]);
    for i in 0..6 {
        send(
            &server,
            "a@origin.test",
            &["b@dest.test"],
            &format!("<f{i}@t>"),
            "x\r\n",
        );
    }
    // Two refusals pause it; the messages that come meanwhile wait for the pause's end.
    server.log_until(|l| l.contains("delivery to it paused"));
    let first = deferrals(&server.metrics_until(|m| deferrals(m) >= 2));
    let before = refusals.load(std::sync::atomic::Ordering::SeqCst);
    server.signal("-USR1");
    let m = server.metrics_until(|m| deferrals(m) >= first + 6);
    assert!(deferrals(&m) >= first + 6, "the flush sent nothing");
    let after = refusals.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert_eq!(
        after, 1,
        "{after} connections for the six messages after the flush"
    );
}

#[test]
fn one_attempt_tries_at_most_five_addresses() {
    use dns_server::{Rec, TestDns};
    let peer = Peer::start_on("127.0.0.30", 0, &[]);
    let port = peer.port;
    let counts: Vec<_> = (0..8)
        .map(|i| refusing_greeter(&format!("127.0.0.{}", 31 + i), port))
        .collect();
    let mut records = vec![("many.test.", Rec::Mx(10, "hosts.many.test."))];
    for i in 0..8u8 {
        records.push(("hosts.many.test.", Rec::A([127, 0, 0, 31 + i].into())));
    }
    let dns = TestDns::start("test", &records);
    let server = mx_server_one_attempt(&dns, port, &[]);
    send(
        &server,
        "s@origin.test",
        &["r@many.test"],
        "<many@t>",
        "x\r\n",
    );
    let m = server.metrics_until(|m| m.contains("postern_delivery_deferrals_total 1\n"));
    assert!(m.contains("postern_delivery_deferrals_total 1\n"), "{m}");
    let total: usize = counts
        .iter()
        .map(|c| c.load(std::sync::atomic::Ordering::SeqCst))
        .sum();
    assert_eq!(total, 5, "connections in one attempt");
    drop(dns);
}

#[test]
fn an_address_under_two_mx_names_is_tried_once_in_an_attempt() {
    use dns_server::Rec;
    // Two MX names for one pool of three addresses, all refusing, and a backup MX: the pool's
    // addresses, met twice in the list, are tried once each, and the backup gets the mail
    // within the attempt's five addresses (before, the pool took all five and the backup none).
    pool_tried_once_then_backup(45, "dup.test", |pool, backup| {
        let mut records = vec![
            ("dup.test.", Rec::Mx(10, "mx1.dup.test.")),
            ("dup.test.", Rec::Mx(20, "mx2.dup.test.")),
            ("dup.test.", Rec::Mx(30, "backup.dup.test.")),
            ("backup.dup.test.", Rec::A(backup)),
        ];
        for &ip in pool {
            records.push(("mx1.dup.test.", Rec::A(ip)));
            records.push(("mx2.dup.test.", Rec::A(ip)));
        }
        records
    });
}

/// A pool of three refusing addresses (127.0.0.`first` and the two after) and a backup MX
/// (the address after them) for `domain`, published by `records` (given the pool's addresses
/// and the backup's): a message for `domain` reaches the backup within one attempt, each
/// pool address tried once.
fn pool_tried_once_then_backup(
    first: u8,
    domain: &str,
    records: impl FnOnce(
        &[std::net::Ipv4Addr],
        std::net::Ipv4Addr,
    ) -> Vec<(&'static str, dns_server::Rec)>,
) {
    let ip = |n: u8| std::net::Ipv4Addr::new(127, 0, 0, first + n);
    let backup = Peer::start_on(&ip(3).to_string(), 0, &[]);
    let port = backup.port;
    let counts: Vec<_> = (0..3)
        .map(|i| refusing_greeter(&ip(i).to_string(), port))
        .collect();
    let dns = dns_server::TestDns::start("test", &records(&[ip(0), ip(1), ip(2)], ip(3)));
    let server = mx_server_one_attempt(&dns, port, &[]);
    let rcpt = format!("r@{domain}");
    send(&server, "s@origin.test", &[&rcpt], "<pool@t>", "x\r\n");
    let (stored, _) = backup.first("the message at the backup MX");
    assert_eq!(stored.rcpt_tos, [rcpt]);
    let each: Vec<usize> = counts
        .iter()
        .map(|c| c.load(std::sync::atomic::Ordering::SeqCst))
        .collect();
    assert_eq!(each, [1, 1, 1], "connections to each pool address");
    drop(dns);
}

#[test]
fn an_address_this_machine_has_no_way_to_does_not_use_up_an_attempt() {
    use dns_server::Rec;
    // The primary MX has four addresses that refuse the session and one this machine has no
    // route to: the kernel says ENETUNREACH at once for 127.255.255.255 (the broadcast
    // address of the loopback network), as for an IPv4 address on a machine with IPv6 only.
    // That one costs nothing, so the attempt's fifth connection goes to the backup MX, which
    // takes the message (before, the five addresses of the primary used the attempt up).
    let ip = |n: u8| std::net::Ipv4Addr::new(127, 0, 0, 150 + n);
    let backup = Peer::start_on(&ip(4).to_string(), 0, &[]);
    let port = backup.port;
    let counts: Vec<_> = (0..4)
        .map(|i| refusing_greeter(&ip(i).to_string(), port))
        .collect();
    let mut records = vec![
        ("noroute.test.", Rec::Mx(10, "mx.noroute.test.")),
        ("noroute.test.", Rec::Mx(20, "backup.noroute.test.")),
        ("backup.noroute.test.", Rec::A(ip(4))),
        ("mx.noroute.test.", Rec::A([127, 255, 255, 255].into())),
    ];
    for i in 0..4 {
        records.push(("mx.noroute.test.", Rec::A(ip(i))));
    }
    let dns = dns_server::TestDns::start("test", &records);
    let server = mx_server_one_attempt(&dns, port, &[]);
    send(
        &server,
        "s@origin.test",
        &["r@noroute.test"],
        "<noroute@t>",
        "x\r\n",
    );
    let (stored, _) = backup.first("the message at the backup MX");
    assert_eq!(stored.rcpt_tos, ["r@noroute.test"]);
    let each: Vec<usize> = counts
        .iter()
        .map(|c| c.load(std::sync::atomic::Ordering::SeqCst))
        .collect();
    assert_eq!(each, [1, 1, 1, 1], "connections to each refusing address");
    drop(dns);
}

#[test]
fn an_address_this_machine_has_no_way_to_does_not_get_its_next_hop_paused() {
    use dns_server::Rec;
    // The primary MX at 127.255.255.255 (ENETUNREACH, as an IPv4 address on a machine with
    // IPv6 only), tried first, and a backup that works but refuses its first session (421 to
    // EHLO). The unreachable address says nothing of the next hop: one refused session at
    // the other is a glitch, and the next message goes at once. Before, it counted as a
    // failure too, the attempt had two failures in a row, and the next hop was paused for
    // the first retry delay (a minute here).
    let (port, stored, _) = scripted_next_hop_at(
        "127.0.0.170:0",
        |n, line| {
            (n == 0 && line.starts_with("EHLO"))
                .then_some(Act::SayAndClose("421 4.3.2 restarting\r\n"))
        },
        Act::Say("250 2.0.0 stored\r\n"),
    );
    let dns = dns_server::TestDns::start(
        "test",
        &[
            ("nr2.test.", Rec::Mx(10, "mx1.nr2.test.")),
            ("nr2.test.", Rec::Mx(20, "mx2.nr2.test.")),
            ("mx1.nr2.test.", Rec::A([127, 255, 255, 255].into())),
            ("mx2.nr2.test.", Rec::A([127, 0, 0, 170].into())),
        ],
    );
    let server = mx_server_one_attempt(&dns, port, &[]);
    deferred_then_the_next_goes_at_once(&server, "b@nr2.test", &stored);
    drop(dns);
}

/// Sends a message to `rcpt` that is deferred (its first session broken off), then another,
/// which the next hop's second connection takes at once: nothing paused the next hop.
fn deferred_then_the_next_goes_at_once(server: &Server, rcpt: &str, stored: &StoredRx) {
    send(server, "a@origin.test", &[rcpt], "<one@t>", "x\r\n");
    server.metrics_until(|m| m.contains("postern_delivery_deferrals_total 1\n"));
    send(server, "a@origin.test", &[rcpt], "<two@t>", "x\r\n");
    let (connection, data) = stored.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(data.contains("Message-ID: <two@t>"), "{data}");
    assert_eq!(connection, 1);
}

#[test]
fn a_host_whose_name_server_drops_aaaa_queries_is_reached_without_waiting_them_out() {
    use dns_server::{Rec, TestDns};
    // The MX host's A query is answered, its AAAA query never: its IPv4 address is used a
    // moment later, not after the AAAA lookup's timeouts and retries (5 s each, three
    // queries), which every connection to it paid before.
    let peer = Peer::start_on("127.0.0.62", 0, &[]);
    let dns = TestDns::start(
        "test",
        &[
            ("slowv6.test.", Rec::Mx(10, "v4only.test.")),
            ("v4only.test.", Rec::A("127.0.0.62".parse().unwrap())),
        ],
    );
    let server = mx_server(&dns, peer.port, &[]);
    let sent = std::time::Instant::now();
    send(
        &server,
        "s@origin.test",
        &["r@slowv6.test"],
        "<slowv6@t>",
        "x\r\n",
    );
    peer.wait_for("the message", Duration::from_secs(30), |s| s.len() == 1);
    // A bound on the wait, well under one AAAA query's timeout.
    assert!(
        sent.elapsed() < Duration::from_secs(4),
        "delivered after {:?}",
        sent.elapsed()
    );
    drop(dns);
}

#[test]
fn an_address_published_as_a_and_as_ipv4_mapped_aaaa_is_tried_once() {
    use dns_server::Rec;
    // The pool's three addresses each published twice, as A and as the IPv4-mapped AAAA of
    // the same address: one server each, tried once in an attempt, and the backup MX gets
    // the mail within the attempt's five addresses (before, the pool took all five).
    pool_tried_once_then_backup(55, "mapped.test", |pool, backup| {
        let mut records = vec![
            ("mapped.test.", Rec::Mx(10, "pool.mapped.test.")),
            ("mapped.test.", Rec::Mx(20, "backup.mapped.test.")),
            ("backup.mapped.test.", Rec::A(backup)),
        ];
        for &ip in pool {
            records.push(("pool.mapped.test.", Rec::A(ip)));
            records.push(("pool.mapped.test.", Rec::Aaaa(ip.to_ipv6_mapped())));
        }
        records
    });
}

#[test]
fn mail_whose_best_mx_is_this_server_bounces_and_a_better_mx_still_gets_it() {
    use dns_server::{Rec, TestDns};
    // A backup MX on another loopback address; this server on 127.0.0.1 at the same port,
    // which is the MX port.
    let primary = Peer::start_on("127.0.0.3", 0, &[]);
    let port = primary.port;
    let worse = Peer::start_on("127.0.0.4", port, &[]);
    let origin = Peer::start_on("127.0.0.5", port, &[]);
    let dns = TestDns::start(
        "test",
        &[
            // This server is the best MX (by address), a worse one follows: nowhere to go.
            ("loop.test.", Rec::Mx(10, "here.test.")),
            ("loop.test.", Rec::Mx(20, "worse.test.")),
            ("here.test.", Rec::A("127.0.0.1".parse().unwrap())),
            ("worse.test.", Rec::A("127.0.0.4".parse().unwrap())),
            // This server (mx.test, its --hostname) is a backup MX: the primary gets the mail.
            ("backup.test.", Rec::Mx(5, "primary.test.")),
            ("backup.test.", Rec::Mx(10, "mx.test.")),
            ("primary.test.", Rec::A("127.0.0.3".parse().unwrap())),
            ("mx.test.", Rec::A("127.0.0.6".parse().unwrap())),
            ("origin.test.", Rec::A("127.0.0.5".parse().unwrap())),
        ],
    );
    let listen = format!("127.0.0.1:{port}");
    let server = mx_server(&dns, port, &["--listen", &listen]);
    let text = loop_bounce(&server, &origin, "r@loop.test", "<loop@t>");
    assert!(text.contains("loops back to this server"), "{text}");
    send(
        &server,
        "s@origin.test",
        &["r@backup.test"],
        "<backup@t>",
        "x\r\n",
    );
    primary.wait_for("delivery to the better MX", Duration::from_secs(20), |s| {
        s.len() == 1
    });
    // Neither message went to the worse MX, nor came back here a second time.
    assert!(worse.stored().is_empty());
    assert_eq!(origin.stored().len(), 1);
    drop(dns);
}

#[test]
fn mail_whose_best_mx_is_this_server_by_a_name_without_address_bounces() {
    use dns_server::{Rec, TestDns};
    let worse = Peer::start_on("127.0.0.4", 0, &[]);
    let port = worse.port;
    let origin = Peer::start_on("127.0.0.5", port, &[]);
    let dns = TestDns::start(
        "test",
        &[
            // This server's name (mx.test, its --hostname) is the best MX and has no address
            // in the DNS (an internal name, say): still this server.
            ("noaddr.test.", Rec::Mx(10, "mx.test.")),
            ("noaddr.test.", Rec::Mx(20, "worse.test.")),
            ("worse.test.", Rec::A("127.0.0.4".parse().unwrap())),
            ("origin.test.", Rec::A("127.0.0.5".parse().unwrap())),
        ],
    );
    let server = mx_server(&dns, port, &[]);
    let text = loop_bounce(&server, &origin, "r@noaddr.test", "<noaddr@t>");
    assert!(text.contains("loops back to this server"), "{text}");
    assert!(worse.stored().is_empty(), "sent on to a worse MX");
    drop(dns);
}

#[test]
fn a_backup_mx_whose_primary_has_no_address_keeps_the_mail_and_says_why() {
    use dns_server::{Rec, TestDns};
    let origin = Peer::start_on("127.0.0.5", 0, &[]);
    let port = origin.port;
    let dns = TestDns::start(
        "test",
        &[
            // This server (mx.test, its --hostname) is a backup MX; the primary's name does
            // not exist (for now, say: its zone is being mended).
            ("backup.test.", Rec::Mx(5, "gone.test.")),
            ("backup.test.", Rec::Mx(10, "mx.test.")),
            ("origin.test.", Rec::A("127.0.0.5".parse().unwrap())),
        ],
    );
    let server = mx_server(&dns, port, &["--delay-warning", "0s"]);
    send(
        &server,
        "s@origin.test",
        &["r@backup.test"],
        "<backup@t>",
        "x\r\n",
    );
    // Not a bounce: a delay warning, with the backup's own status (RFC 3463 4.4.4).
    let (warning, text) = origin.first("the delay warning");
    assert_eq!(warning.mail_from, "<>");
    assert!(text.contains("Action: delayed"), "{text}");
    assert!(text.contains("Status: 4.4.4"), "{text}");
    assert!(
        text.contains("no more preferred host has an address"),
        "{text}"
    );
    drop(dns);
}

#[test]
fn one_broken_session_with_a_single_address_relay_host_does_not_hold_up_other_mail() {
    // The first session says 421 to MAIL; the next ones take mail.
    let (port, stored, _) = scripted_next_hop(
        |n, line| {
            (n == 0 && line.starts_with("MAIL"))
                .then_some(Act::SayAndClose("421 4.3.2 restarting\r\n"))
        },
        Act::Say("250 2.0.0 stored\r\n"),
    );
    let relay = format!("127.0.0.1:{port}");
    let server = Server::start(&[
        "--relay-host",
        &relay,
        "--retry-initial",
        "60s",
        "--metrics",
        "127.0.0.1:0",
    ]);
    deferred_then_the_next_goes_at_once(&server, "b@dest.test", &stored);
}

#[test]
fn a_next_hop_that_greets_then_drops_the_connection_is_named_as_the_relay() {
    let (port, stored, _) = scripted_next_hop(
        |_, line| line.starts_with("EHLO").then_some(Act::SayAndClose("")),
        Act::Say("250 2.0.0 stored\r\n"),
    );
    let origin = Peer::start(&[]);
    let route = format!("dest.test=127.0.0.1:{port}");
    let back = format!("origin.test=127.0.0.1:{}", origin.port);
    let server = Server::start(&["--route", &route, "--route", &back, "--delay-warning", "0s"]);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<dropped@t>",
        "hello\r\n",
    );
    let deferred = server.log_until(|l| l.contains("status=\"deferred\""));
    // Named with the address and port connected to, as Postfix logs it.
    let relay = format!("relay=\"127.0.0.1[127.0.0.1]:{port}\"");
    assert!(
        deferred.contains(&relay) && deferred.contains("closed by the server"),
        "{deferred}"
    );
    // The warning names it too, with a bad connection rather than no answer (RFC 3463 3.5).
    let (_, text) = origin.first("the delay warning");
    assert!(text.contains("Action: delayed"), "{text}");
    assert!(text.contains("Remote-MTA: dns; [127.0.0.1]"), "{text}");
    assert!(text.contains("Status: 4.4.2"), "{text}");
    assert!(stored.try_recv().is_err());
}

#[test]
fn a_later_address_where_nobody_answers_does_not_hide_the_host_that_did() {
    use dns_server::{Rec, TestDns};
    // mx1 (preference 10) greets, then closes at EHLO; mx2 (20) refuses connections.
    let l = TcpListener::bind("127.0.0.2:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in l.incoming().take(2) {
            let Ok(mut s) = conn else { return };
            let _ = s.write_all(b"220 mx1.test ESMTP\r\n");
            let _ = s.read(&mut [0u8; 512]);
        }
    });
    let _mx2_down = reserve("127.0.0.3", port);
    let dns = TestDns::start(
        "test",
        &[
            ("two.test.", Rec::Mx(10, "mx1.test.")),
            ("two.test.", Rec::Mx(20, "mx2.test.")),
            ("mx1.test.", Rec::A("127.0.0.2".parse().unwrap())),
            ("mx2.test.", Rec::A("127.0.0.3".parse().unwrap())),
        ],
    );
    let server = mx_server_one_attempt(&dns, port, &[]);
    send(
        &server,
        "s@origin.test",
        &["r@two.test"],
        "<two@t>",
        "x\r\n",
    );
    let deferred = server.log_until(|l| l.contains("status=\"deferred\""));
    assert!(
        deferred.contains("relay=\"mx1.test[") && deferred.contains("closed by the server"),
        "{deferred}"
    );
    drop(dns);
}

#[test]
fn one_refused_connection_to_a_single_address_does_not_hold_the_next_message() {
    // The retry delay is the default 5 minutes, so a pause would last a minute.
    let down = reserve("127.0.0.1", 0);
    let route = format!("dest.test=127.0.0.1:{}", down.1);
    let server = Server::start(&["--route", &route]);
    for n in 0..2 {
        let id = send(
            &server,
            "a@origin.test",
            &["b@dest.test"],
            &format!("<refused{n}@t>"),
            "x\r\n",
        );
        // Each tried at once: the first failure is a glitch, not yet an outage.
        let line =
            server.log_until(|l| l.contains(id.as_str()) && l.contains("status=\"deferred\""));
        assert!(line.contains("refused"), "{line}");
    }
}

#[test]
fn an_address_that_did_not_greet_is_tried_last_by_the_next_connections() {
    use dns_server::{Rec, TestDns};
    // mail.test has two addresses, shuffled at each lookup: one takes connections and never
    // greets, the other is a next hop that closes each connection after its message. Once
    // the silent one has cost a greeting timeout, the next connections go to the other first.
    let good = TcpListener::bind("127.0.0.70:0").unwrap();
    let port = good.local_addr().unwrap().port();
    let silent = TcpListener::bind(("127.0.0.71", port)).unwrap();
    let (stored_tx, stored) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in good.incoming().take(8) {
            let Ok(s) = conn else { return };
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            let _ = w.write_all(b"220 good.test ESMTP\r\n");
            let (mut line, mut in_data) = (String::new(), false);
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                if in_data && line == ".\r\n" {
                    let _ = w.write_all(b"250 2.0.0 stored\r\n");
                    let _ = stored_tx.send(());
                    break;
                } else if line.starts_with("DATA") {
                    in_data = true;
                    let _ = w.write_all(b"354 go\r\n");
                } else if !in_data {
                    let _ = w.write_all(b"250 ok\r\n");
                }
                line.clear();
            }
        }
    });
    let (accepted_tx, accepted) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in silent.incoming().take(8) {
            let Ok(s) = conn else { return };
            held.push(s);
            let _ = accepted_tx.send(());
        }
    });
    let dns = TestDns::start(
        "test",
        &[
            ("mail.test.", Rec::A("127.0.0.70".parse().unwrap())),
            ("mail.test.", Rec::A("127.0.0.71".parse().unwrap())),
        ],
    );
    let dns_addr = dns.addr.to_string();
    let relay_host = format!("mail.test:{port}");
    let server = Server::start(&[
        "--dns-server",
        &dns_addr,
        "--relay-host",
        &relay_host,
        "--cores",
        "1",
        "--smtp-greeting-timeout",
        "1s",
        "--retry-initial",
        "60s",
    ]);
    for k in 0..8 {
        send(
            &server,
            "s@origin.test",
            &["r@anywhere.test"],
            &format!("<silent{k}@t>"),
            "x\r\n",
        );
        stored
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("message {k}: {e}"));
    }
    // The first connection may have met the silent address first (the shuffle's choice);
    // none after it.
    let met = accepted.try_iter().count();
    assert!(met <= 1, "the silent address took {met} connections");
    drop(dns);
}

/// Sends a message from s@origin.test to `rcpt`, and returns the text of the bounce `origin`
/// gets for it, a 5.4.6 from the null reverse path.
fn loop_bounce(server: &Server, origin: &Peer, rcpt: &str, id: &str) -> String {
    send(server, "s@origin.test", &[rcpt], id, "x\r\n");
    let (bounce, text) = origin.first("the loop bounce");
    assert_eq!(bounce.mail_from, "<>");
    assert!(text.contains("Status: 5.4.6"), "{text}");
    text
}

/// A port forward (as NAT makes one) from `host:port` to whatever `to` is set to: up to 20
/// connections, each copied both ways until either side closes.
fn forwarder(host: &str, port: u16) -> std::sync::Arc<std::sync::OnceLock<std::net::SocketAddr>> {
    let l = TcpListener::bind((host, port)).unwrap();
    let to = std::sync::Arc::new(std::sync::OnceLock::<std::net::SocketAddr>::new());
    let target = to.clone();
    std::thread::spawn(move || {
        for conn in l.incoming().take(20) {
            let Ok(inbound) = conn else { return };
            let Some(addr) = target.get() else { return };
            let Ok(outbound) = std::net::TcpStream::connect(addr) else {
                return;
            };
            for (mut from, mut into) in [
                (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                (outbound, inbound),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut into);
                    let _ = into.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    to
}

#[test]
fn an_mx_host_that_greets_with_our_own_name_is_this_server_behind_a_port_forward() {
    use dns_server::{Rec, TestDns};
    // fwd.test's address is not one of ours, but a port forward there reaches this server,
    // which greets as mx.test (its --hostname): relaying there would loop.
    let origin = Peer::start_on("127.0.0.5", 0, &[]);
    let port = origin.port;
    let forward_to = forwarder("127.0.0.9", port);
    let dns = TestDns::start(
        "test",
        &[
            ("nat.test.", Rec::Mx(10, "fwd.test.")),
            ("fwd.test.", Rec::A("127.0.0.9".parse().unwrap())),
            // A backup behind the forward: the primary (nothing listens there) may come back.
            ("backup.test.", Rec::Mx(5, "down.test.")),
            ("backup.test.", Rec::Mx(10, "fwd.test.")),
            ("down.test.", Rec::A("127.0.0.10".parse().unwrap())),
            // A backup behind the forward whose primary has no address (for now, perhaps).
            ("nameless.test.", Rec::Mx(5, "noaddress.test.")),
            ("nameless.test.", Rec::Mx(10, "fwd.test.")),
            ("origin.test.", Rec::A("127.0.0.5".parse().unwrap())),
        ],
    );
    let server = mx_server_one_attempt(&dns, port, &["--delay-warning", "0s"]);
    forward_to.set(server.smtp).unwrap();
    let text = loop_bounce(&server, &origin, "r@nat.test", "<nat@t>");
    assert!(text.contains("Action: failed"), "{text}");
    assert!(text.contains("greets with our own name"), "{text}");
    // The host whose greeting decided is named, as for any host that answered.
    assert!(text.contains("Remote-MTA: dns; fwd.test"), "{text}");
    send(
        &server,
        "s@origin.test",
        &["r@backup.test"],
        "<backup@t>",
        "x\r\n",
    );
    origin.wait_for("the delay warning", Duration::from_secs(20), |s| {
        s.len() == 2
    });
    send(
        &server,
        "s@origin.test",
        &["r@nameless.test"],
        "<nameless@t>",
        "x\r\n",
    );
    origin.wait_for("the second delay warning", Duration::from_secs(20), |s| {
        s.len() == 3
    });
    let stored = origin.stored();
    for warning in &stored[1..] {
        let warning = String::from_utf8_lossy(&warning.data).into_owned();
        assert!(warning.contains("Action: delayed"), "{warning}");
        assert!(warning.contains("Status: 4.4.4"), "{warning}");
    }
    // Nothing went round through the forward: the server took the three messages sent here.
    let metrics = server.metrics_until(|m| m.contains("postern_messages_accepted_total 3\n"));
    assert!(
        metrics.contains("postern_messages_accepted_total 3\n"),
        "{metrics}"
    );
    drop(dns);
}

#[test]
fn a_failed_handshake_at_one_mx_host_leaves_tls_to_the_others() {
    use dns_server::{Rec, TestDns};
    // mx1 (preference 10) offers STARTTLS and breaks the handshake, then closes the
    // cleartext retry at once: the mail goes on to mx2 (20) in the same attempt. mx2 is still
    // asked for STARTTLS: the failure was mx1's, not the domain's.
    let mx2 = TcpListener::bind("127.0.0.53:0").unwrap();
    let port = mx2.local_addr().unwrap().port();
    let mx1 = TcpListener::bind(("127.0.0.52", port)).unwrap();
    std::thread::spawn(move || {
        for (i, conn) in mx1.incoming().enumerate() {
            let Ok(mut s) = conn else { return };
            if i > 0 {
                // The cleartext retry: closed before any greeting.
                continue;
            }
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            let _ = s.write_all(b"220 mx1.test ESMTP\r\n");
            let _ = r.read_line(&mut line);
            let _ = s.write_all(b"250-mx1.test\r\n250 STARTTLS\r\n");
            let _ = r.read_line(&mut line);
            let _ = s.write_all(b"220 2.0.0 go ahead\r\nthis is no TLS record\r\n");
        }
    });
    let (seen_tx, seen) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let Ok((s, _)) = mx2.accept() else { return };
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let _ = w.write_all(b"220 mx2.test ESMTP\r\n");
        let mut in_data = false;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if in_data {
                if line == ".\r\n" {
                    in_data = false;
                    let _ = w.write_all(b"250 2.0.0 stored\r\n");
                }
                continue;
            }
            let verb = line
                .split([' ', '\r'])
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            let _ = seen_tx.send(verb.clone());
            let reply: &[u8] = match verb.as_str() {
                "EHLO" => b"250-mx2.test\r\n250 STARTTLS\r\n",
                "STARTTLS" => b"454 4.7.0 TLS not available now\r\n",
                "DATA" => {
                    in_data = true;
                    b"354 go ahead\r\n"
                }
                "QUIT" => b"221 2.0.0 bye\r\n",
                _ => b"250 2.0.0 ok\r\n",
            };
            let _ = w.write_all(reply);
        }
    });
    let dns = TestDns::start(
        "test",
        &[
            ("tlsmx.test.", Rec::Mx(10, "mx1.tlsmx.test.")),
            ("tlsmx.test.", Rec::Mx(20, "mx2.tlsmx.test.")),
            ("mx1.tlsmx.test.", Rec::A("127.0.0.52".parse().unwrap())),
            ("mx2.tlsmx.test.", Rec::A("127.0.0.53".parse().unwrap())),
        ],
    );
    let server = mx_server_one_attempt(&dns, port, &[]);
    send(
        &server,
        "s@origin.test",
        &["r@tlsmx.test"],
        "<tlsmx@t>",
        "x\r\n",
    );
    let mut verbs = Vec::new();
    while let Ok(verb) = seen.recv_timeout(Duration::from_secs(20)) {
        let data = verb == "DATA";
        verbs.push(verb);
        if data {
            break;
        }
    }
    assert_eq!(verbs, ["EHLO", "STARTTLS", "MAIL", "RCPT", "DATA"]);
    let m = server.metrics_until(|m| m.contains("postern_recipients_delivered_total 1\n"));
    assert!(m.contains("postern_recipients_delivered_total 1\n"), "{m}");
    drop(dns);
}

#[test]
fn a_route_host_with_an_underscore_in_its_name_is_looked_up_and_reached() {
    use dns_server::{Rec, TestDns};
    // Container service names have underscores, which IDNA's rules refuse: the name is still
    // asked of the DNS as it is written.
    let peer = Peer::start(&[]);
    let dns = TestDns::start(
        "test",
        &[("mail_relay.test.", Rec::A("127.0.0.1".parse().unwrap()))],
    );
    let route = format!("dest.test=mail_relay.test:{}", peer.port);
    let dns_addr = dns.addr.to_string();
    let server = Server::start(&["--dns-server", &dns_addr, "--route", &route]);
    send(
        &server,
        "s@origin.test",
        &["r@dest.test"],
        "<underscore@t>",
        "x\r\n",
    );
    peer.wait_for("the delivery", Duration::from_secs(20), |s| s.len() == 1);
    drop(dns);
}

#[test]
fn a_backup_mx_used_while_the_primary_s_address_cannot_be_looked_up_is_only_a_stand_in() {
    use dns_server::{Rec, TestDns};
    // The primary's address lookup fails for now (SERVFAIL): mail goes to the backup, over a
    // connection kept only for the pause (the first retry delay, 200 ms here), as for a
    // primary that could not be reached, so that the next connection asks the DNS again and
    // can find the primary back. Mail kept flowing must therefore come to the backup on a
    // new connection before long.
    let (port, stored, _) =
        scripted_next_hop_at("127.0.0.54:0", |_, _| None, Act::Say("250 2.0.0 ok\r\n"));
    let dns = TestDns::start(
        "test",
        &[
            ("standin.test.", Rec::Mx(10, "servfail.test.")),
            ("standin.test.", Rec::Mx(20, "mx2.test.")),
            ("mx2.test.", Rec::A("127.0.0.54".parse().unwrap())),
        ],
    );
    let server = mx_server(&dns, port, &[]);
    let (mut c, _) = hello(&server);
    // Bounded in count and time: one message at a time until one arrives on a second
    // connection.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for n in 0.. {
        assert!(
            std::time::Instant::now() < deadline && n < 2000,
            "every message came over the first connection"
        );
        assert!(c.cmd("MAIL FROM:<s@origin.test>").starts_with("250"));
        assert!(c.cmd("RCPT TO:<r@standin.test>").starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        c.send(format!("Message-ID: <standin{n}@t>\r\n\r\nx\r\n.\r\n").as_bytes());
        assert!(c.line().starts_with("250 2.0.0"));
        let (connection, _) = stored.recv_timeout(Duration::from_secs(20)).unwrap();
        if connection > 0 {
            break;
        }
    }
    drop(dns);
}

#[test]
fn a_lookup_failing_beside_a_working_connection_defers_nothing() {
    use dns_server::{Rec, TestDns};
    // One connection to the MX host delivers (a third of a second a message); then every
    // lookup fails. The connections opened for the backlog fail at their lookup, while the
    // first still works: the jobs wait for it, not a retry with the next hop paused. Nor is
    // the failed lookup taken for a limit of the next hop's on connections: no cap is set.
    let peer = Peer::start_on("127.0.0.63", 0, &["--delay", "0.3"]);
    let dns = TestDns::start_uncached(
        "test",
        &[
            ("dest.test.", Rec::Mx(10, "mx.dest.test.")),
            ("mx.dest.test.", Rec::A("127.0.0.63".parse().unwrap())),
        ],
    );
    let mut server = mx_server_one_attempt(&dns, peer.port, &["--cores", "1"]);
    send(
        &server,
        "s@origin.test",
        &["r@dest.test"],
        "<first@t>",
        "x\r\n",
    );
    peer.first("the first message");
    dns.fail_everything();
    let asked = dns.query_count();
    send_in_one_session(&server, "r@dest.test", "backlog", 8);
    peer.wait_for("the backlog", Duration::from_secs(30), |s| s.len() == 9);
    // A connection for the backlog asked (and failed) while the first carried it.
    let queries = dns.query_count() - asked;
    assert!(queries > 0, "no lookup failed");
    // Nor is another connection opened (and the failing resolver asked) at once, over and
    // over, while the backlog waits.
    assert!(queries < 30, "{queries} lookups for 8 messages");
    let log = server.terminate_for_log();
    assert!(!log.contains("status=\"deferred\""), "{log}");
    assert!(!log.contains("refused another connection"), "{log}");
}

/// Messages sent one at a time from s@origin.test to `rcpt`, numbered, through a server
/// that keeps its connections a minute (`--outbound-idle-timeout 60s`).
struct OneAtATime {
    server: Server,
    rcpt: &'static str,
    sent: usize,
}

impl OneAtATime {
    fn start(dns: &dns_server::TestDns, port: u16, rcpt: &'static str) -> OneAtATime {
        let server = mx_server(dns, port, &["--outbound-idle-timeout", "60s"]);
        OneAtATime {
            server,
            rcpt,
            sent: 0,
        }
    }

    /// Sends one more message (its Message-ID made of `what` and its number); returns how
    /// many have been sent.
    fn send(&mut self, what: &str) -> usize {
        self.sent += 1;
        let id = format!("<{what}{}@t>", self.sent);
        send(&self.server, "s@origin.test", &[self.rcpt], &id, "x\r\n");
        self.sent
    }

    /// Sends messages `what`, each once the one before has arrived (`arrived`, given how
    /// many were sent, waited for up to 10 s), a quarter second apart, for at least
    /// `at_least` and until `done`; fails with `why` when that takes 10 s more.
    fn keep_sending(
        &mut self,
        what: &str,
        at_least: Duration,
        arrived: impl Fn(usize) -> bool,
        done: impl Fn() -> bool,
        why: impl Fn() -> String,
    ) {
        let start = std::time::Instant::now();
        loop {
            let n = self.send(what);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !arrived(n) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "message {n} ({what}) never arrived"
                );
                std::thread::sleep(Duration::from_millis(25));
            }
            if start.elapsed() >= at_least && done() {
                return;
            }
            assert!(
                start.elapsed() < at_least + Duration::from_secs(10),
                "{}",
                why()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

#[test]
fn a_kept_connection_follows_the_dns_once_its_answers_expire() {
    use dns_server::{Rec, TestDns};
    // moves.test names mxa at first; its records live a second. A connection to mxa is kept
    // while mail keeps coming.
    let mxa = Peer::start_on("127.0.0.80", 0, &[]);
    let port = mxa.port;
    let mxb = Peer::start_on("127.0.0.81", port, &[]);
    let origin = Peer::start_on("127.0.0.82", port, &[]);
    let hosts = [
        ("mxa.test.", Rec::A("127.0.0.80".parse().unwrap())),
        ("mxb.test.", Rec::A("127.0.0.81".parse().unwrap())),
        ("origin.test.", Rec::A("127.0.0.82".parse().unwrap())),
    ];
    let with = |mx: Rec| {
        let mut records = vec![("moves.test.", mx)];
        records.extend(hosts.iter().cloned());
        records
    };
    let dns = TestDns::start_with_ttl("test", &with(Rec::Mx(10, "mxa.test.")), 1);
    let mut mail = OneAtATime::start(&dns, port, "r@moves.test");
    let n = mail.send("first");
    mxa.wait_for("the first message, at mxa", Duration::from_secs(20), |s| {
        s.len() == n
    });

    // The domain moves to mxb. Past the TTL, the kept connection is left for the host the
    // DNS names now: messages one at a time until one reaches mxb.
    dns.replace(&with(Rec::Mx(10, "mxb.test.")));
    mail.keep_sending(
        "moved",
        Duration::ZERO,
        |n| mxa.stored().len() + mxb.stored().len() == n,
        || !mxb.stored().is_empty(),
        || {
            format!(
                "{} messages went to mxa after moves.test named mxb",
                mxa.stored().len()
            )
        },
    );
    let at_mxa = mxa.stored().len();

    // Now the domain takes no mail (RFC 7505): the next messages bounce once the answers
    // have run out, and none goes to mxb over its kept connection.
    dns.replace(&with(Rec::Mx(0, ".")));
    let before = mxb.stored().len();
    mail.keep_sending(
        "nulled",
        Duration::ZERO,
        |n| at_mxa + mxb.stored().len() + origin.stored().len() == n,
        || !origin.stored().is_empty(),
        || {
            format!(
                "{} messages went to mxb after moves.test published a null MX",
                mxb.stored().len() - before
            )
        },
    );
    let (bounce, text) = origin.first("the null-MX bounce");
    assert!(text.contains("Status: 5.1.10"), "{text}");
    assert_eq!(bounce.mail_from, "<>");
    assert_eq!(mxa.stored().len(), at_mxa, "mxa got mail after the move");
}

#[test]
fn a_kept_connection_goes_on_while_the_dns_fails() {
    use dns_server::{Rec, TestDns};
    // A connection to mxa, chosen by records that live a second, is kept while mail comes.
    let mxa = Peer::start_on("127.0.0.83", 0, &[]);
    let port = mxa.port;
    let dns = TestDns::start_with_ttl(
        "test",
        &[
            ("steady.test.", Rec::Mx(10, "mxa.test.")),
            ("mxa.test.", Rec::A("127.0.0.83".parse().unwrap())),
        ],
        1,
    );
    let mut mail = OneAtATime::start(&dns, port, "r@steady.test");
    let n = mail.send("first");
    mxa.wait_for("the first message, at mxa", Duration::from_secs(20), |s| {
        s.len() == n
    });

    // Then the DNS fails: the connection's host answered a moment ago, and mail goes on
    // over it, though the lookup made past the TTL fails (a connection left for it would
    // find no address, and the mail would wait for the DNS). For 3 s, and until the DNS
    // was asked.
    dns.fail_everything();
    let queries = dns.query_count();
    mail.keep_sending(
        "failing",
        Duration::from_secs(3),
        |n| mxa.stored().len() == n,
        || dns.query_count() > queries,
        || "no lookup of the next hop while the DNS failed".into(),
    );
}

#[test]
fn a_kept_connection_stays_with_its_host_while_the_host_s_addresses_rotate() {
    use dns_server::{Rec, TestDns};
    // pool.test's host answers with a part of its addresses that changes (as large pools
    // do, with a short TTL): a connection to an address it no longer lists is still its
    // host's, and is kept, rather than a new one being opened at every TTL. Here the
    // address it lists now takes no connection: mail that goes there fails.
    let mxa = Peer::start_on("127.0.0.84", 0, &[]);
    let port = mxa.port;
    let elsewhere = reserve("127.0.0.85", port);
    let with = |addr: &str| {
        vec![
            ("pool.test.", Rec::Mx(10, "mx.pool.test.")),
            ("mx.pool.test.", Rec::A(addr.parse().unwrap())),
        ]
    };
    let dns = TestDns::start_with_ttl("test", &with("127.0.0.84"), 1);
    let mut mail = OneAtATime::start(&dns, port, "r@pool.test");
    let n = mail.send("first");
    mxa.wait_for("the first message, at mxa", Duration::from_secs(20), |s| {
        s.len() == n
    });
    // Past the TTL and a look-up (the DNS is asked again), mail still goes over the kept
    // connection.
    dns.replace(&with("127.0.0.85"));
    let queries = dns.query_count();
    mail.keep_sending(
        "rotated",
        Duration::from_secs(3),
        |n| mxa.stored().len() == n,
        || dns.query_count() > queries,
        || "no lookup of the next hop after its TTL".into(),
    );
    drop(elsewhere);
}
