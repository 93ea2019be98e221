//! Size, recipient and connection limits, over real sockets.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Client, Server};

#[test]
fn message_size_limit_is_advertised_and_enforced() {
    let server = Server::start(&["--max-message-size", "2k"]);
    let mut c = server.connect();
    c.line();
    c.send(b"EHLO client.test\r\n");
    assert!(c.reply().contains(&"250-SIZE 2048".to_owned()));
    assert_eq!(
        c.cmd("MAIL FROM:<a@b.test> SIZE=4096"),
        "552 5.3.4 Message size exceeds fixed maximum message size"
    );
    c.cmd("MAIL FROM:<a@b.test>");
    c.cmd("RCPT TO:<c@d.test>");
    assert_eq!(c.cmd("DATA"), "354 End data with <CR><LF>.<CR><LF>");
    for _ in 0..40 {
        c.send(b"0123456789012345678901234567890123456789012345678901234567890123456789\r\n");
    }
    assert_eq!(
        c.cmd("."),
        "552 5.3.4 Message size exceeds fixed maximum message size"
    );
    assert_eq!(c.cmd("NOOP"), "250 2.0.0 Ok", "the session goes on");
    // The operator sees why: each refused message is logged with its client and envelope.
    let refused = "message refused: 552 5.3.4 Message size exceeds fixed maximum message size";
    let line = server.log_until(|l| l.contains(refused));
    for field in [
        "client=127.0.0.1",
        "helo=\"client.test\"",
        "from=\"a@b.test\"",
        "nrcpt=1",
    ] {
        assert!(line.contains(field), "{field} in {line}");
    }
    // So is one refused at a BDAT chunk, and one with a bare line end under
    // --reject-bare-newlines.
    let server = Server::start(&["--max-message-size", "2k", "--reject-bare-newlines"]);
    let mut c = server.connect();
    c.line();
    c.send(b"EHLO client.test\r\n");
    c.reply();
    c.cmd("MAIL FROM:<>");
    c.cmd("RCPT TO:<c@d.test>");
    c.cmd("RCPT TO:<e@d.test>");
    c.send(b"BDAT 3000 LAST\r\n");
    c.send(&[b'x'; 3000]);
    assert_eq!(
        c.reply(),
        ["552 5.3.4 Message size exceeds fixed maximum message size"]
    );
    c.cmd("MAIL FROM:<f@b.test>");
    c.cmd("RCPT TO:<c@d.test>");
    c.cmd("DATA");
    c.send(b"a\nb\r\n");
    assert!(c.cmd(".").starts_with("550 5.6.11 "));
    let sized = server.log_until(|l| l.contains("message refused: 552 5.3.4"));
    assert!(sized.contains("from=\"\" nrcpt=2"), "{sized}");
    let bare = server.log_until(|l| l.contains("message refused: 550 5.6.11"));
    assert!(bare.contains("from=\"f@b.test\""), "{bare}");
}

#[test]
fn a_message_of_exactly_the_advertised_size_is_taken() {
    // RFC 1870 4: the number after SIZE is the size of the largest message the server will
    // take, counted in the octets the client sends. The Received header postern puts in
    // front is its own addition and does not count: a message at the limit, declared at
    // MAIL and sent by BDAT or by DATA, gets its 250; one octet more gets 552.
    let server = Server::start(&["--max-message-size", "2k"]);
    let mut c = server.greeted("client.test");
    // Lines of 64 octets, CR LF included, the first starting with a dot (doubled by DATA's
    // dot-stuffing, which does not count); the last one shorter to make the size.
    let body = |n: usize| {
        let mut b = format!(".{}\r\n", "x".repeat(61));
        b.push_str(&format!("{}\r\n", "x".repeat(62)).repeat(n / 64 - 2));
        b.push_str(&format!("{}\r\n", "y".repeat(64 + n % 64 - 2)));
        assert_eq!(b.len(), n);
        b
    };
    for (size, want) in [(2048, "250 2.0.0"), (2049, "552 5.3.4")] {
        let body = body(size);
        let declared = size.min(2048);
        let mail = format!("MAIL FROM:<a@b.test> SIZE={declared}");
        assert!(c.cmd(&mail).starts_with("250"));
        assert!(c.cmd("RCPT TO:<c@d.test>").starts_with("250"));
        c.send(format!("BDAT {} LAST\r\n", body.len()).as_bytes());
        c.send(body.as_bytes());
        let reply = c.reply();
        assert!(
            reply[0].starts_with(want),
            "{size} octets by BDAT: {reply:?}"
        );
        assert!(c.cmd(&mail).starts_with("250"));
        assert!(c.cmd("RCPT TO:<c@d.test>").starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        c.send(format!(".{body}").as_bytes());
        let reply = c.cmd(".");
        assert!(reply.starts_with(want), "{size} octets by DATA: {reply:?}");
    }
}

#[test]
fn recipient_limit_gives_452() {
    let server = Server::start(&["--max-recipients", "100"]);
    let mut c = server.greeted("client.test");
    c.cmd("MAIL FROM:<a@b.test>");
    let mut batch = String::new();
    for i in 0..101 {
        batch.push_str(&format!("RCPT TO:<r{i}@d.test>\r\n"));
    }
    c.send(batch.as_bytes());
    for _ in 0..100 {
        assert_eq!(c.line(), "250 2.1.5 Ok");
    }
    assert_eq!(c.line(), "452 4.5.3 Too many recipients");
}

#[test]
fn long_recipients_past_the_envelope_budget_are_452_and_sent_again_later() {
    // At the default --max-recipients (1000) a transaction keeps 128,000 envelope octets:
    // 255 recipients of 500 (a 12-octet mailbox, a 488-octet ORCPT) beside the reverse
    // path. The rest get 452 4.5.3 and come in a second transaction.
    let mut server = Server::start(&[]);
    let orcpt = format!("rfc822;{}@mx.test", "o".repeat(488 - 15));
    let mut c = server.connect();
    c.line();
    c.cmd("EHLO client.test");
    let mut ids = Vec::new();
    let mut sent = 0;
    while sent < 300 {
        assert_eq!(c.cmd("MAIL FROM:<a@b.test>"), "250 2.1.0 Ok");
        let batch: String = (sent..300)
            .map(|i| format!("RCPT TO:<r{i:03}@mx.test> ORCPT={orcpt}\r\n"))
            .collect();
        c.send(batch.as_bytes());
        let replies: Vec<String> = (sent..300).map(|_| c.line()).collect();
        let taken = replies.iter().take_while(|r| *r == "250 2.1.5 Ok").count();
        assert!(
            replies[taken..]
                .iter()
                .all(|r| r == "452 4.5.3 Too many recipients"),
            "{replies:?}"
        );
        assert!(taken > 0, "a fresh transaction takes recipients");
        assert_eq!(c.cmd("DATA"), "354 End data with <CR><LF>.<CR><LF>");
        ids.push(common::queue_id(&c.cmd("Subject: many\r\n\r\nhi\r\n.")));
        sent += taken;
    }
    assert_eq!(c.cmd("QUIT"), "221 2.0.0 mx.test Bye");
    assert!(server.terminate().success());
    let stored = common::spooled(&server.spool);
    let counts: Vec<usize> = ids
        .iter()
        .map(|id| stored.iter().find(|m| &m.0 == id).unwrap().2.len())
        .collect();
    assert_eq!(counts, [255, 45]);
}

#[test]
fn connections_over_the_per_ip_limit_get_421_at_once() {
    let server = Server::start(&[
        "--max-connections-per-ip",
        "2",
        "--max-connections",
        "10",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let mut a = server.connect();
    let mut b = server.connect();
    assert!(a.line().starts_with("220 "));
    assert!(b.line().starts_with("220 "));
    let mut c = server.connect();
    assert_eq!(
        c.line(),
        "421 4.7.0 mx.test Too many connections from your address, try again later"
    );
    assert!(c.closed());
    // The 421 counts as a reply, beside the refused connection.
    let refused = "postern_connections_refused_total 1";
    let four = "postern_replies_total{class=\"4xx\"} 1";
    let text = server.metrics_until(|m| m.contains(refused) && m.contains(four));
    assert!(text.contains(refused) && text.contains(four), "{text}");
    // A place frees up when a session ends.
    assert_eq!(a.cmd("QUIT"), "221 2.0.0 mx.test Bye");
    assert!(a.closed());
    // The place is given back before the close reaches the client.
    let mut d = Client::connect(server.smtp);
    assert!(d.line().starts_with("220 "));
}

#[test]
fn a_refused_client_that_talks_before_the_banner_gets_its_421_and_a_clean_close() {
    // A client that pipelines its EHLO behind its connect, over the limit: closing with that
    // input unread would send a reset, and the 421 written just before would be lost.
    use std::io::{Read, Write};
    let server = Server::start(&["--max-connections-per-ip", "1", "--cores", "1"]);
    let mut a = server.connect();
    assert!(a.line().starts_with("220 "));
    for round in 0..3 {
        let mut stream = std::net::TcpStream::connect(server.smtp).unwrap();
        stream.write_all(b"EHLO client.test\r\n").unwrap();
        let mut replies = String::new();
        let end = stream.read_to_string(&mut replies);
        assert_eq!(
            replies,
            "421 4.7.0 mx.test Too many connections from your address, try again later\r\n",
            "round {round}: {end:?}"
        );
        assert!(
            end.is_ok(),
            "round {round}: the stream ended in {end:?}, not a clean close"
        );
        // Linux hands over the 421 and the end of the stream that came before a reset, and
        // keeps the reset as the socket's error (EPIPE once the end has come): a peer that
        // drops what it holds on a reset, or a 421 lost on the way, would not see the 421.
        // The reset, when there is one, follows the close within a moment; this looks for
        // it for half a second.
        let until = std::time::Instant::now() + std::time::Duration::from_millis(500);
        while std::time::Instant::now() < until {
            let error = stream.take_error().unwrap();
            assert!(
                error.is_none(),
                "round {round}: reset after the 421: {error:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

#[test]
fn an_ipv4_client_on_a_dual_stack_listener_is_counted_as_itself() {
    // The second listener takes IPv4 clients as IPv4-mapped IPv6 addresses
    // (::ffff:127.0.0.1); they are the same client as on the IPv4 listener. That needs IPv6
    // and dual-stack sockets, which a host may have turned off.
    let dual_stack = std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only")
        .is_ok_and(|v| v.trim() == "0")
        && std::net::TcpListener::bind("[::]:0").is_ok();
    assert!(
        dual_stack,
        "this test needs dual-stack IPv6 sockets (net.ipv6.bindv6only = 0)"
    );
    let server = Server::start(&[
        "--listen",
        "127.0.0.1:0",
        "--listen",
        "[::]:0",
        "--max-connections-per-ip",
        "1",
        "--cores",
        "1",
    ]);
    let [v4, dual] = server.smtp_all[..] else {
        panic!("two listeners: {:?}", server.smtp_all)
    };
    let mut a = Client::connect(v4);
    assert!(a.line().starts_with("220 "));
    let mut b = Client::connect(std::net::SocketAddr::from(([127, 0, 0, 1], dual.port())));
    assert_eq!(
        b.line(),
        "421 4.7.0 mx.test Too many connections from your address, try again later"
    );
    // An IPv6 client is another client.
    let mut c = Client::connect(std::net::SocketAddr::from((
        std::net::Ipv6Addr::LOCALHOST,
        dual.port(),
    )));
    assert!(c.line().starts_with("220 "));
}

#[test]
fn a_lower_max_connections_alone_lowers_the_per_ip_default_with_it() {
    // The per-IP default (1000) follows a lower --max-connections instead of contradicting it.
    let server = Server::start(&["--max-connections", "2"]);
    let mut a = server.connect();
    let mut b = server.connect();
    assert!(a.line().starts_with("220 "));
    assert!(b.line().starts_with("220 "));
    let mut c = server.connect();
    assert!(c.line().starts_with("421 "));
    assert!(c.closed());
}

/// The value of an unlabelled metric line `name value`.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[test]
fn a_body_cut_into_tiny_pieces_costs_the_spool_what_a_plain_one_does() {
    // Dot-stuffed lines and bare line feeds come out of the decoder as tiny pieces; stored one
    // record each, 150 KiB of them would take some 2 MiB of spool.
    let server =
        Server::start(&[&common::SMALL_SEGMENTS[..], &["--metrics", "127.0.0.1:0"]].concat());
    let mut c = server.connect();
    c.line();
    c.cmd("EHLO client.test");
    c.cmd("MAIL FROM:<a@b.test>");
    c.cmd("RCPT TO:<c@d.test>");
    assert!(c.cmd("DATA").starts_with("354"));
    let mut body = Vec::new();
    for _ in 0..25_000 {
        body.extend_from_slice(b"..\r\nx\n");
    }
    // End of data needs a real CR LF before the dot.
    body.extend_from_slice(b"end\r\n");
    c.send(&body);
    let id = common::queue_id(&c.cmd("."));
    let m = server.metrics_until(|m| m.contains("postern_messages_accepted_total 1\n"));
    let used = metric(&m, "postern_spool_bytes");
    // The body as stored: ".\r\nx\r\n" per pair, plus the Received header.
    let stored = 25_000 * 6 + 5;
    assert!(
        used <= 4 * stored,
        "{used} bytes of spool for a {stored}-byte message"
    );
    drop(c);
    let mut server = server;
    assert!(server.terminate().success());
    let spooled = common::spooled(&server.spool);
    assert_eq!(spooled.len(), 1);
    assert_eq!(spooled[0].0, id);
    let mut expected = b".\r\nx\r\n".repeat(25_000);
    expected.extend_from_slice(b"end\r\n");
    assert!(spooled[0].3.ends_with(&expected));
}

/// A client that pipelines commands that move no mail forward gets 100 free, then 20 more
/// counted as errors, then 421 and a close; the limit can be lifted.
#[test]
fn commands_without_mail_end_the_session_at_the_junk_limit() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    c.line();
    c.send("NOOP\r\n".repeat(200).as_bytes());
    for n in 1..=120 {
        assert_eq!(c.line(), "250 2.0.0 Ok", "NOOP {n}");
    }
    assert_eq!(
        c.line(),
        "421 4.7.0 mx.test Too many commands without mail, closing connection"
    );
    assert!(c.closed());

    let lifted = Server::start(&["--max-junk-commands", "0"]);
    let mut c = lifted.connect();
    c.line();
    c.send("NOOP\r\n".repeat(200).as_bytes());
    for n in 1..=200 {
        assert_eq!(c.line(), "250 2.0.0 Ok", "NOOP {n}");
    }
    assert!(c.cmd("QUIT").starts_with("221 "));
}

#[test]
fn a_session_closed_with_input_still_coming_ends_in_its_421_and_a_clean_close_not_a_reset() {
    // A client past the error limit, with more pipelined behind the command that ends its
    // session, and not reading yet: the 421 waits in the server's socket. Closing a socket
    // with unread input sends a reset, which throws away what it has not sent, the 421
    // too. The server closes its side and reads what still comes, so the client reads every
    // reply, the 421 last, and then the end of the stream.
    use std::io::{Read, Write};
    let server = Server::start(&[]);
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(2048).unwrap();
    socket.connect(&server.smtp.into()).unwrap();
    let mut c = Client::from_stream(socket.into());
    assert!(c.line().starts_with("220"));
    // 100 commands without mail (EHLO replies fill the client's small window), then 20
    // errors: the 20th gets the 421. Then more, which the server never reads as commands.
    let mut input = "EHLO client.test\r\n".repeat(60);
    input.push_str(&"NOOP\r\n".repeat(40));
    input.push_str(&"BOGUS\r\n".repeat(20));
    let mut input = input.into_bytes();
    input.extend(std::iter::repeat_n(b'x', 100_000));
    let mut writer = c.stream.try_clone().unwrap();
    let sending = std::thread::spawn(move || {
        // The server may be gone before the last of it: that is not the point here.
        let _ = writer.write_all(&input);
    });
    sending.join().unwrap();
    let mut replies = String::new();
    let end = c.reader.read_to_string(&mut replies);
    assert!(
        replies.ends_with("421 4.7.0 mx.test Too many errors, closing connection\r\n"),
        "{end:?}: {}",
        &replies[replies.len().saturating_sub(300)..]
    );
    assert!(
        end.is_ok(),
        "the stream ended in {end:?}, not a clean close"
    );
}

/// [`common::SMALL_SEGMENTS`] with room for more recipients than one segment holds.
const SMALL_SEGMENTS_MANY_RECIPIENTS: [&str; 6] = [
    "--cores",
    "1",
    "--spool-segment-size",
    "128k",
    "--max-recipients",
    "5000",
];

/// With small spool segments and a large recipient limit, an envelope that would not fit one
/// segment (long paths with long ORCPTs) is cut short at RCPT with 452 4.5.3, which clients
/// answer by sending the rest in another transaction, and the message with the recipients
/// taken is stored. Taken whole it could never be stored: DATA got 452 4.3.1 (a full disk) at
/// every try. The smallest segment still takes the 100 recipients RFC 5321 4.5.3.1.8 asks
/// for.
#[test]
fn an_envelope_is_capped_at_what_one_spool_segment_holds() {
    let server = Server::start(&SMALL_SEGMENTS_MANY_RECIPIENTS);
    let mut c = server.connect();
    c.line();
    c.cmd("EHLO client.test");
    c.cmd("MAIL FROM:<a@b.test>");
    let orcpt = "x".repeat(400);
    let mut taken = 0;
    let mut capped = None;
    for i in 0..400 {
        let local = format!("{i:03}{}", "r".repeat(60));
        let reply = c.cmd(&format!(
            "RCPT TO:<{local}@d.test> ORCPT=rfc822;{orcpt}{i:03}@d.test"
        ));
        if reply.starts_with("250") {
            taken += 1;
        } else {
            capped = Some(reply);
            break;
        }
    }
    let capped = capped.expect("some RCPT past a segment's room is refused");
    assert!(capped.starts_with("452 4.5.3"), "{capped}");
    assert!((100..400).contains(&taken), "{taken} taken");
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: many\r\n\r\nbody\r\n");
    let id = common::queue_id(&c.cmd("."));
    drop(c);
    let mut server = server;
    assert!(server.terminate().success());
    let spooled = common::spooled(&server.spool);
    assert_eq!(spooled.len(), 1);
    assert_eq!(spooled[0].0, id);
    // The room is shared by the recipients taken, not reserved for as many as
    // --max-recipients allows: a large limit with small segments still takes mail.
    let server = Server::start(&SMALL_SEGMENTS_MANY_RECIPIENTS);
    let mut c = server.connect();
    c.line();
    c.cmd("EHLO client.test");
    c.cmd("MAIL FROM:<a@b.test>");
    for i in 0..200 {
        let reply = c.cmd(&format!("RCPT TO:<r{i}@d.test>"));
        assert!(reply.starts_with("250"), "{i}: {reply}");
    }
}
