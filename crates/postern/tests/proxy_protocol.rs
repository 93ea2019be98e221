//! Behind a load balancer (`--proxy-from`): the PROXY protocol header of versions 1 and 2
//! names the real client, which relay checks, per-client limits and the trace header then
//! see; a connection from the load balancer without a valid header is closed. HAProxy itself
//! is the load balancer of the last test.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{Client, Server};

/// A connection to `server` from `from` (a loopback address) that begins with `header`.
fn through(server: &Server, from: [u8; 4], header: &[u8]) -> Client {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::from((from, 0)).into()).unwrap();
    socket.connect(&server.smtp.into()).unwrap();
    let mut c = Client::from_stream(TcpStream::from(socket));
    c.send(header);
    c
}

fn v1(source: &str) -> Vec<u8> {
    format!("PROXY TCP4 {source} 198.51.100.1 40000 25\r\n").into_bytes()
}

/// A version 2 header: PROXY over TCP from `source` (IPv6) to 2001:db8::1 port 25, with a
/// TLV after the addresses; LOCAL with no addresses.
fn v2(source: Option<std::net::Ipv6Addr>) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    match source {
        Some(ip) => {
            h.extend_from_slice(&[0x21, 0x21]);
            let mut body = ip.octets().to_vec();
            body.extend_from_slice(
                &"2001:db8::1"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets(),
            );
            body.extend_from_slice(&40000u16.to_be_bytes());
            body.extend_from_slice(&25u16.to_be_bytes());
            // PP2_TYPE_NOOP with two octets.
            body.extend_from_slice(&[0x04, 0, 2, 7, 7]);
            h.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
            h.extend_from_slice(&body);
        }
        None => h.extend_from_slice(&[0x20, 0x00, 0, 0]),
    }
    h
}

/// Sends one message to user@example.org (and first tries elsewhere.test, which only a
/// relay client may use); returns the reply to that RCPT and the queue ID.
fn transaction(c: &mut Client) -> (String, String) {
    let banner = c.line();
    assert!(banner.starts_with("220 mx.test"), "{banner}");
    transaction_after_banner(c)
}

/// [`transaction`] once the banner was read.
fn transaction_after_banner(c: &mut Client) -> (String, String) {
    c.send(b"EHLO client.test\r\n");
    c.reply();
    assert_eq!(c.cmd("MAIL FROM:<a@client.test>"), "250 2.1.0 Ok");
    let relay = c.cmd("RCPT TO:<b@elsewhere.test>");
    assert_eq!(c.cmd("RCPT TO:<user@example.org>"), "250 2.1.5 Ok");
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: proxied\r\n\r\nbody\r\n.\r\n");
    let id = common::queue_id(&c.line());
    c.cmd("QUIT");
    (relay, id)
}

/// The Received header of the spooled message `id`.
fn received(server: &Server, id: &str) -> String {
    let spooled = common::spooled(&server.spool);
    let (_, _, _, body) = spooled.iter().find(|m| m.0 == id).unwrap();
    let text = String::from_utf8_lossy(body);
    let end = text.find("\r\n\r\n").unwrap();
    text[..end].to_owned()
}

fn proxied_server(extra: &[&str]) -> Server {
    let mut args = vec![
        "--proxy-from",
        "127.0.0.1",
        "--accept-domain",
        "example.org",
        "--metrics",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
}

#[test]
fn the_client_a_version_1_header_names_is_the_one_relay_checks_and_the_trace_header_see() {
    // Loopback may relay (the default), but the client behind the load balancer is not on it.
    let server = proxied_server(&[]);
    let mut c = through(&server, [127, 0, 0, 1], &v1("192.0.2.7"));
    let (relay, id) = transaction(&mut c);
    assert_eq!(relay, "554 5.7.1 Relay access denied");
    let trace = received(&server, &id);
    assert!(trace.contains("[192.0.2.7]"), "{trace}");
    assert!(!trace.contains("127.0.0.1"), "{trace}");
    // A client that is no load balancer speaks SMTP at once, as itself.
    let mut c = through(&server, [127, 0, 0, 2], b"");
    let (relay, id) = transaction(&mut c);
    assert_eq!(relay, "250 2.1.5 Ok");
    assert!(received(&server, &id).contains("[127.0.0.2]"));
}

#[test]
fn a_version_2_header_names_an_ipv6_client_or_leaves_the_load_balancer_itself() {
    let server = proxied_server(&[]);
    let client: std::net::Ipv6Addr = "2001:db8::7".parse().unwrap();
    let mut c = through(&server, [127, 0, 0, 1], &v2(Some(client)));
    let (relay, id) = transaction(&mut c);
    assert_eq!(relay, "554 5.7.1 Relay access denied");
    let trace = received(&server, &id);
    assert!(trace.contains("[IPv6:2001:db8::7]"), "{trace}");
    // LOCAL (the load balancer's own check): the connection's own address, loopback here.
    let mut c = through(&server, [127, 0, 0, 1], &v2(None));
    let (relay, id) = transaction(&mut c);
    assert_eq!(relay, "250 2.1.5 Ok");
    assert!(received(&server, &id).contains("[127.0.0.1]"));
}

#[test]
fn a_client_the_balancer_cannot_name_is_not_the_balancer() {
    // A version 1 UNKNOWN (or version 2 PROXY of no address family): not the balancer's
    // loopback address, which may relay here, but the unspecified one.
    let server = proxied_server(&[]);
    let mut c = through(&server, [127, 0, 0, 1], b"PROXY UNKNOWN\r\n");
    let (relay, id) = transaction(&mut c);
    assert_eq!(relay, "554 5.7.1 Relay access denied");
    let trace = received(&server, &id);
    assert!(trace.contains("[0.0.0.0]"), "{trace}");
}

#[test]
fn the_per_client_limit_counts_the_clients_behind_the_load_balancer() {
    let server = proxied_server(&["--max-connections-per-ip", "1"]);
    let mut first = through(&server, [127, 0, 0, 1], &v1("192.0.2.7"));
    assert!(first.line().starts_with("220 "));
    let mut again = through(&server, [127, 0, 0, 1], &v1("192.0.2.7"));
    let refused = again.line();
    assert!(refused.starts_with("421 4.7.0 "), "{refused}");
    let mut other = through(&server, [127, 0, 0, 1], &v1("192.0.2.8"));
    assert!(other.line().starts_with("220 "));
    // Its place comes back with its session.
    first.cmd("QUIT");
    assert!(first.closed());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = through(&server, [127, 0, 0, 1], &v1("192.0.2.7"));
        let line = c.line();
        if line.starts_with("220 ") {
            break;
        }
        assert!(Instant::now() < deadline, "{line}");
        assert!(line.starts_with("421 4.7.0 "), "{line}");
    }
}

#[test]
fn a_connection_from_the_load_balancer_without_a_valid_header_is_closed_unanswered() {
    let server = proxied_server(&["--command-timeout", "1s", "--cores", "1"]);
    // A connection closed before it sends anything (a balancer's plain TCP health check): not
    // a failure. It goes first, on the one core, so that it is long settled when the count
    // is read.
    drop(through(&server, [127, 0, 0, 1], b""));
    // SMTP at once, a header with a bad address, and silence (the wait is bounded).
    for first in [
        &b"EHLO client.test\r\n"[..],
        b"PROXY TCP4 999.0.2.7 198.51.100.1 1 25\r\n",
        b"",
    ] {
        let mut c = through(&server, [127, 0, 0, 1], first);
        let mut got = Vec::new();
        let started = Instant::now();
        // A reset (the unread input) or an end, with nothing written first.
        let _ = c.stream.read_to_end(&mut got);
        assert!(
            got.is_empty(),
            "{first:?}: {}",
            String::from_utf8_lossy(&got)
        );
        assert!(started.elapsed() < Duration::from_secs(8), "{first:?}");
    }
    // The server goes on.
    let mut c = through(&server, [127, 0, 0, 1], &v1("192.0.2.7"));
    assert!(c.line().starts_with("220 "));
    // Read once the core has published that session (the only one counted), so after every
    // failure before it.
    let m = server.metrics_until(|m| m.contains("postern_connections_total 1\n"));
    assert!(m.contains("postern_proxy_header_failures_total 3\n"), "{m}");
    assert!(m.contains("postern_connections_refused_total 0\n"), "{m}");
}

#[test]
fn a_header_that_comes_in_pieces_is_taken_whole_and_what_follows_it_is_smtp() {
    // The protocol asks for the header in one piece; a network may split it. Each piece is
    // taken as it comes (the next look at the socket waits for more), and the SMTP sent
    // behind the last one, in the same packet, is the session's.
    let server = proxied_server(&["--cores", "1"]);
    let client: std::net::Ipv6Addr = "2001:db8::9".parse().unwrap();
    let v2 = v2(Some(client));
    let v1 = v1("192.0.2.9");
    for (header, cuts, address) in [
        (&v1, &[6usize, 20][..], "[192.0.2.9]"),
        (&v2, &[5, 16, 30][..], "[IPv6:2001:db8::9]"),
    ] {
        let mut c = through(&server, [127, 0, 0, 1], &header[..cuts[0]]);
        c.stream.set_nodelay(true).unwrap();
        let mut pieces: Vec<&[u8]> = cuts.windows(2).map(|w| &header[w[0]..w[1]]).collect();
        pieces.push(&header[*cuts.last().unwrap()..]);
        for (i, piece) in pieces.iter().enumerate() {
            // Apart, as a network's pieces come (what is checked does not hang on it).
            std::thread::sleep(Duration::from_millis(30));
            let mut bytes = piece.to_vec();
            if i + 1 == pieces.len() {
                bytes.extend_from_slice(b"NOOP\r\n");
            }
            c.send(&bytes);
        }
        assert!(c.line().starts_with("220 mx.test"));
        assert_eq!(c.line(), "250 2.0.0 Ok");
        let (_, id) = transaction_after_banner(&mut c);
        let trace = received(&server, &id);
        assert!(trace.contains(address), "{trace}");
    }
}

#[test]
fn a_balancer_that_closes_within_its_header_is_let_go_at_once() {
    // The close is seen as it comes, not at the header's deadline (10 s), and the log says
    // what happened.
    let server = proxied_server(&["--cores", "1"]);
    let c = through(&server, [127, 0, 0, 1], b"PROXY TCP4 192.0.2.7 ");
    let started = Instant::now();
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut c = c;
    let mut got = Vec::new();
    let _ = c.stream.read_to_end(&mut got);
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let said = server.log_until(|l| l.contains("connection closed: closed after"));
    assert!(said.contains("21 octets of a PROXY header"), "{said}");
}

#[test]
fn a_balancer_s_connection_whose_header_comes_as_the_server_stops_is_told_421() {
    let mut server = proxied_server(&[]);
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.connect(&server.smtp.into()).unwrap();
    let mut c = Client::from_stream(TcpStream::from(socket));
    server.signal("-TERM");
    server.log_until(|l| l.contains("stopping: no new connections"));
    // Within the second a header on its way still gets.
    c.send(&v1("192.0.2.7"));
    assert_eq!(
        c.line(),
        "421 4.3.2 mx.test Service shutting down, closing connection"
    );
    assert!(server.child.wait().unwrap().success());
}

/// The haproxy program, from PATH or sbin.
fn haproxy() -> Option<String> {
    let on_path = std::process::Command::new("haproxy")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success());
    if on_path {
        return Some("haproxy".into());
    }
    ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .map(str::to_owned)
}

#[test]
fn behind_haproxy_each_version_of_its_header_gives_the_client_s_address() {
    // scripts/test installs haproxy; run by hand without it, the test says so and fails.
    let haproxy = haproxy().expect("haproxy is not installed (scripts/test installs it)");
    let server = proxied_server(&[]);
    let dir = tempfile::tempdir().unwrap();
    for send_proxy in ["send-proxy", "send-proxy-v2"] {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let config = dir.path().join(format!("{send_proxy}.cfg"));
        let mut f = std::fs::File::create(&config).unwrap();
        write!(
            f,
            "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
             timeout client 30s\n  timeout server 30s\nfrontend smtp\n  bind 127.0.0.1:{port}\n  \
             default_backend postern\nbackend postern\n  server p {} {send_proxy}\n",
            server.smtp
        )
        .unwrap();
        drop(f);
        let child = std::process::Command::new(&haproxy)
            .args(["-f", config.to_str().unwrap(), "-db"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let _haproxy = common::KillOnDrop(child);
        // The client connects to haproxy from 127.0.0.9; postern sees haproxy's 127.0.0.1.
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            socket
                .bind(&SocketAddr::from(([127, 0, 0, 9], 0)).into())
                .unwrap();
            let to = SocketAddr::from(([127, 0, 0, 1], port));
            match socket.connect(&to.into()) {
                Ok(()) => break TcpStream::from(socket),
                Err(e) => {
                    assert!(Instant::now() < deadline, "haproxy did not listen: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        let mut c = Client::from_stream(stream);
        let (relay, id) = transaction(&mut c);
        // 127.0.0.9 is loopback, so it may relay, as itself.
        assert_eq!(relay, "250 2.1.5 Ok", "{send_proxy}");
        let trace = received(&server, &id);
        assert!(trace.contains("[127.0.0.9]"), "{send_proxy}: {trace}");
    }
}
