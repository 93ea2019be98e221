//! Never an open relay: other domains only from relay networks; accepted domains from anyone.
#![allow(clippy::unwrap_used)]

mod common;

use common::Server;

/// A server that relays only for 192.0.2.0/24 and accepts mail for example.org, and a
/// loopback client (an outsider there) in a transaction whose first recipient, in another
/// domain, was refused.
fn outsider_refused_once() -> (Server, common::Client) {
    let server = Server::start(&[
        "--relay-network",
        "192.0.2.0/24",
        "--accept-domain",
        "example.org",
    ]);
    let mut c = server.connect();
    c.line();
    c.cmd("EHLO outsider.test");
    assert_eq!(c.cmd("MAIL FROM:<a@outsider.test>"), "250 2.1.0 Ok");
    assert_eq!(
        c.cmd("RCPT TO:<victim@elsewhere.test>"),
        "554 5.7.1 Relay access denied"
    );
    (server, c)
}

#[test]
fn outside_the_relay_networks_only_accepted_domains_are_taken() {
    // Loopback is not a relay network here, so this client is an outsider.
    let (_server, mut c) = outsider_refused_once();
    assert_eq!(c.cmd("RCPT TO:<user@EXAMPLE.org>"), "250 2.1.5 Ok");
    assert_eq!(c.cmd("RCPT TO:<postmaster>"), "250 2.1.5 Ok");
    // Our own postmaster, quoted or not (RFC 5321 4.1.2, 4.5.1).
    assert_eq!(c.cmd("RCPT TO:<\"PostMaster\"@mx.test>"), "250 2.1.5 Ok");
    assert_eq!(
        c.cmd("RCPT TO:<user@sub.example.org>"),
        "554 5.7.1 Relay access denied"
    );
}

#[test]
fn an_accepted_domain_with_a_dot_in_front_takes_its_subdomains_from_anyone() {
    let server = Server::start(&[
        "--relay-network",
        "192.0.2.0/24",
        "--accept-domain",
        ".example.org",
    ]);
    let mut c = server.greeted("outsider.test");
    assert_eq!(c.cmd("MAIL FROM:<a@outsider.test>"), "250 2.1.0 Ok");
    assert_eq!(c.cmd("RCPT TO:<user@mx.Example.org>"), "250 2.1.5 Ok");
    assert_eq!(c.cmd("RCPT TO:<user@a.b.example.org>"), "250 2.1.5 Ok");
    for refused in [
        "user@example.org",
        "user@badexample.org",
        "user@example.org.test",
    ] {
        assert_eq!(
            c.cmd(&format!("RCPT TO:<{refused}>")),
            "554 5.7.1 Relay access denied",
            "{refused}"
        );
    }
}

#[test]
fn by_default_loopback_may_relay_and_nothing_else_is_accepted() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    c.line();
    c.cmd("EHLO local.test");
    c.cmd("MAIL FROM:<a@local.test>");
    assert_eq!(c.cmd("RCPT TO:<anyone@anywhere.test>"), "250 2.1.5 Ok");
}

/// A loopback client's transaction on `server` up to a recipient in another domain: the
/// client, and the reply to that RCPT.
fn relay_from_loopback(server: &Server) -> (common::Client, String) {
    let mut c = server.greeted("local.test");
    assert_eq!(c.cmd("MAIL FROM:<a@local.test>"), "250 2.1.0 Ok");
    let reply = c.cmd("RCPT TO:<anyone@anywhere.test>");
    (c, reply)
}

#[test]
fn with_relay_network_none_not_even_loopback_relays() {
    const DENIED: &str = "554 5.7.1 Relay access denied";
    // As a flag and from the environment (a container image's setting).
    for server in [
        Server::start(&["--relay-network", "none", "--accept-domain", "example.org"]),
        Server::start_with_env(
            &["--accept-domain", "example.org"],
            &[("POSTERN_RELAY_NETWORK", "None")],
        ),
    ] {
        let (mut c, reply) = relay_from_loopback(&server);
        assert_eq!(reply, DENIED);
        assert_eq!(c.cmd("RCPT TO:<user@example.org>"), "250 2.1.5 Ok");
        assert_eq!(c.cmd("RCPT TO:<postmaster>"), "250 2.1.5 Ok");
    }
    // `none` twice is still none; a network given as a flag replaces `none` from the
    // environment (the container image's setting) whole.
    let twice = Server::start(&["--relay-network", "none,none"]);
    assert_eq!(relay_from_loopback(&twice).1, DENIED);
    let replaced = Server::start_with_env(
        &["--relay-network", "127.0.0.0/8"],
        &[("POSTERN_RELAY_NETWORK", "none")],
    );
    assert_eq!(relay_from_loopback(&replaced).1, "250 2.1.5 Ok");
}

#[test]
fn lists_from_the_environment_may_have_blanks_after_their_commas() {
    let server = Server::start_with_env(
        &[],
        &[
            ("POSTERN_RELAY_NETWORK", "192.0.2.0/24, 198.51.100.0/24"),
            ("POSTERN_ACCEPT_DOMAIN", "example.org, example.net"),
        ],
    );
    let mut c = server.connect();
    c.line();
    c.cmd("EHLO outsider.test");
    c.cmd("MAIL FROM:<a@outsider.test>");
    // Loopback is in neither network: only the two domains are taken.
    assert_eq!(c.cmd("RCPT TO:<user@example.net>"), "250 2.1.5 Ok");
    assert_eq!(c.cmd("RCPT TO:<user@example.org>"), "250 2.1.5 Ok");
    assert_eq!(
        c.cmd("RCPT TO:<victim@elsewhere.test>"),
        "554 5.7.1 Relay access denied"
    );
}

#[test]
fn a_relay_network_given_as_one_address_is_that_address() {
    // 127.0.0.1 alone (as /32): this client may relay; 127.0.0.2 on the same port may not.
    let server = Server::start(&["--relay-network", "127.0.0.1"]);
    for (from, allowed) in [([127, 0, 0, 1], true), ([127, 0, 0, 2], false)] {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(&std::net::SocketAddr::from((from, 0)).into())
            .unwrap();
        socket.connect(&server.smtp.into()).unwrap();
        let mut c = common::Client::from_stream(std::net::TcpStream::from(socket));
        c.line();
        c.cmd("EHLO local.test");
        c.cmd("MAIL FROM:<a@local.test>");
        let reply = c.cmd("RCPT TO:<someone@elsewhere.test>");
        assert_eq!(reply.starts_with("250 "), allowed, "{from:?}: {reply}");
    }
}

#[test]
fn the_log_says_what_was_accepted_from_whom_and_what_relaying_was_refused() {
    let (mut server, mut c) = outsider_refused_once();
    assert_eq!(c.cmd("RCPT TO:<user@example.org>"), "250 2.1.5 Ok");
    assert_eq!(c.cmd("RCPT TO:<other@example.org>"), "250 2.1.5 Ok");
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: logged\r\n\r\nbody\r\n.\r\n");
    let reply = c.line();
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    let queue_id = common::queue_id(&reply);
    c.cmd("QUIT");
    let log = server.terminate_for_log();
    let refused = log
        .lines()
        .find(|l| l.contains("relay access denied"))
        .unwrap_or_else(|| panic!("no refusal logged: {log}"));
    assert!(refused.contains("client=127.0.0.1"), "{refused}");
    assert!(
        refused.contains("to=\"victim@elsewhere.test\""),
        "{refused}"
    );
    let accepted = log
        .lines()
        .find(|l| l.contains("message accepted"))
        .unwrap_or_else(|| panic!("no acceptance logged: {log}"));
    for field in [
        format!("queue_id={queue_id}"),
        "client=127.0.0.1".to_owned(),
        "helo=\"outsider.test\"".to_owned(),
        "from=\"a@outsider.test\"".to_owned(),
        "nrcpt=2".to_owned(),
    ] {
        assert!(accepted.contains(&field), "{field}: {accepted}");
    }
    assert!(accepted.contains(" size="), "{accepted}");
}

#[test]
fn a_flood_of_relay_refusals_is_logged_twenty_a_second() {
    // One core; 30 refused recipients, pipelined in two sessions, well within a second.
    let mut server = Server::start(&["--cores", "1", "--relay-network", "192.0.2.0/24"]);
    for session in 0..2 {
        let mut c = server.connect();
        c.line();
        c.cmd("EHLO outsider.test");
        let mut burst = String::from("MAIL FROM:<a@outsider.test>\r\n");
        for k in 0..15 {
            burst.push_str(&format!("RCPT TO:<v{session}-{k}@elsewhere.test>\r\n"));
        }
        c.send(burst.as_bytes());
        assert_eq!(c.line(), "250 2.1.0 Ok");
        for _ in 0..15 {
            assert_eq!(c.line(), "554 5.7.1 Relay access denied");
        }
        c.cmd("QUIT");
    }
    // The ten not logged are counted once the second is over, though no refusal follows.
    let counted = server.log_until(|l| l.contains("more refusals than are logged"));
    assert!(counted.contains("unlogged=10"), "{counted}");
    let log = server.terminate_for_log();
    let logged = log
        .lines()
        .filter(|l| l.contains("relay access denied"))
        .count();
    assert_eq!(logged, 20, "{log}");
}

#[test]
fn a_long_pipelined_body_for_a_refused_recipient_does_not_end_the_session() {
    // A client pipelining a large message in many BDAT chunks learns of the refusal only
    // after sending them all (RFC 3030 2): each is read and discarded, and the session takes
    // its next message instead of closing at the error limit.
    let (mut server, mut c) = outsider_refused_once();
    let chunk = format!("BDAT 1000\r\n{}", "x".repeat(998) + "\r\n");
    c.send(format!("{}BDAT 0 LAST\r\n", chunk.repeat(40)).as_bytes());
    assert_eq!(c.line(), "554 5.5.1 No valid recipients");
    // Each discarded chunk gets the refusal that failed the transaction.
    for _ in 0..40 {
        assert_eq!(c.line(), "554 5.5.1 No valid recipients");
    }
    assert_eq!(c.cmd("MAIL FROM:<a@outsider.test>"), "250 2.1.0 Ok");
    assert_eq!(c.cmd("RCPT TO:<user@example.org>"), "250 2.1.5 Ok");
    c.send(b"BDAT 12 LAST\r\nSubject: x\r\n");
    let id = common::queue_id(&c.line());
    assert_eq!(c.cmd("QUIT"), "221 2.0.0 mx.test Bye");
    assert!(server.terminate().success());
    let spooled = common::spooled(&server.spool);
    assert_eq!(spooled.len(), 1);
    assert_eq!(spooled[0].0, id);
    assert_eq!(spooled[0].2, ["user@example.org"]);
}
