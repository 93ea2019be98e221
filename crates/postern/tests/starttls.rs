//! STARTTLS and implicit TLS with a certificate the test makes (rcgen), a rustls client, and
//! the CVE-2011-0411 check: commands pipelined after STARTTLS are never run.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use common::{queue_id, spooled, Server};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

struct Tls {
    stream: BufReader<StreamOwned<ClientConnection, TcpStream>>,
}

/// A client's TLS session with mx.test, trusting `roots`.
fn client_for_mx(roots: &RootCertStore) -> ClientConnection {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    ClientConnection::new(Arc::new(config), ServerName::try_from("mx.test").unwrap()).unwrap()
}

impl Tls {
    fn wrap(tcp: TcpStream, roots: &RootCertStore) -> Tls {
        let conn = client_for_mx(roots);
        Tls {
            stream: BufReader::new(StreamOwned::new(conn, tcp)),
        }
    }
    fn line(&mut self) -> String {
        loop {
            let mut l = String::new();
            assert!(self.stream.read_line(&mut l).unwrap() > 0, "closed");
            if l.as_bytes().get(3) != Some(&b'-') {
                return l.trim_end().to_owned();
            }
        }
    }
    fn reply(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let mut l = String::new();
            assert!(self.stream.read_line(&mut l).unwrap() > 0, "closed");
            let last = l.as_bytes().get(3) != Some(&b'-');
            lines.push(l.trim_end().to_owned());
            if last {
                return lines;
            }
        }
    }
    fn cmd(&mut self, c: &str) -> String {
        let s = self.stream.get_mut();
        s.write_all(format!("{c}\r\n").as_bytes()).unwrap();
        s.flush().unwrap();
        self.line()
    }
}

fn server_with_cert() -> (Server, RootCertStore, tempfile::TempDir) {
    server_with_cert_and(&[])
}

fn server_with_cert_and(extra: &[&str]) -> (Server, RootCertStore, tempfile::TempDir) {
    let ck = rcgen::generate_simple_self_signed(vec!["mx.test".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let mut args = vec![
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--listen-tls",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let server = Server::start(&args);
    let mut roots = RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    (server, roots, dir)
}

#[test]
fn starttls_drops_pipelined_commands_and_starts_over() {
    let (mut server, roots, _dir) = server_with_cert();
    let mut c = server.connect();
    c.line();
    c.send(b"EHLO client.test\r\n");
    assert_eq!(c.reply().last().unwrap(), "250 STARTTLS");
    // The injected MAIL FROM rides in the same packet as STARTTLS.
    c.send(b"STARTTLS\r\nMAIL FROM:<injected@attacker.test>\r\n");
    assert_eq!(c.line(), "220 2.0.0 Ready to start TLS");
    let mut t = Tls::wrap(c.stream.try_clone().unwrap(), &roots);
    // Had the injected command been run after the handshake, its reply would come first.
    t.stream
        .get_mut()
        .write_all(b"EHLO client.test\r\n")
        .unwrap();
    let ehlo = t.reply();
    assert_eq!(ehlo[0], "250-mx.test Hello client.test", "{ehlo:?}");
    assert!(
        !ehlo.iter().any(|l| l.contains("STARTTLS")),
        "STARTTLS offered inside TLS"
    );
    assert_eq!(t.cmd("STARTTLS"), "503 5.5.1 TLS already active");
    assert_eq!(t.cmd("MAIL FROM:<a@b.test>"), "250 2.1.0 Ok");
    assert_eq!(t.cmd("RCPT TO:<c@d.test>"), "250 2.1.5 Ok");
    assert_eq!(t.cmd("DATA"), "354 End data with <CR><LF>.<CR><LF>");
    let id = queue_id(&t.cmd("Subject: secret\r\n\r\nover TLS\r\n."));
    assert_eq!(t.cmd("QUIT"), "221 2.0.0 mx.test Bye");

    let metrics = server.metrics_until(|m| m.contains("postern_tls_handshakes_total 1\n"));
    assert!(
        metrics.contains("postern_tls_handshakes_total 1\n"),
        "{metrics}"
    );
    assert!(server.terminate().success());
    let msgs = spooled(&server.spool);
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].0, id);
    assert_eq!(msgs[0].1, "a@b.test", "the injected sender never made it");
    let text = String::from_utf8_lossy(&msgs[0].3);
    assert!(text.contains("with ESMTPS id"), "{text}");
    assert_tls_clause(&text);
}

/// The trace header names the TLS 1.3 cipher suite the test's client and the server agreed
/// on, by its IANA name, in RFC 8314 4.3's `tls` clause.
fn assert_tls_clause(text: &str) {
    let named = [
        "TLS_AES_128_GCM_SHA256",
        "TLS_AES_256_GCM_SHA384",
        "TLS_CHACHA20_POLY1305_SHA256",
    ]
    .iter()
    .any(|suite| text.contains(&format!("\r\n\ttls {suite};\r\n")));
    assert!(named, "{text}");
}

#[test]
fn implicit_tls_port_greets_inside_tls() {
    let (mut server, roots, _dir) = server_with_cert();
    let tcp = TcpStream::connect(server.smtps.unwrap()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut t = Tls::wrap(tcp, &roots);
    assert_eq!(t.line(), "220 mx.test ESMTP postern");
    t.stream
        .get_mut()
        .write_all(b"EHLO client.test\r\n")
        .unwrap();
    let ehlo = t.reply();
    assert!(!ehlo.iter().any(|l| l.contains("STARTTLS")));
    assert_eq!(t.cmd("MAIL FROM:<a@b.test>"), "250 2.1.0 Ok");
    assert_eq!(t.cmd("RCPT TO:<c@d.test>"), "250 2.1.5 Ok");
    assert_eq!(t.cmd("DATA"), "354 End data with <CR><LF>.<CR><LF>");
    queue_id(&t.cmd("Subject: s\r\n\r\nimplicit\r\n."));
    // HELO inside implicit TLS is still a TLS session.
    assert!(t.cmd("HELO again.test").starts_with("250 "));
    assert_eq!(t.cmd("MAIL FROM:<e@b.test>"), "250 2.1.0 Ok");
    assert_eq!(t.cmd("RCPT TO:<c@d.test>"), "250 2.1.5 Ok");
    assert_eq!(t.cmd("DATA"), "354 End data with <CR><LF>.<CR><LF>");
    queue_id(&t.cmd("Subject: s\r\n\r\nimplicit\r\n."));
    assert_eq!(t.cmd("QUIT"), "221 2.0.0 mx.test Bye");
    assert!(server.terminate().success());
    let msgs = spooled(&server.spool);
    assert_eq!(msgs.len(), 2);
    for m in &msgs {
        let text = String::from_utf8_lossy(&m.3);
        assert!(text.contains(") with ESMTPS id"), "{text}");
        assert_tls_clause(&text);
    }
}

/// A TLS client on `--listen-tls` through a load balancer: its PROXY header and its hello
/// go in one write.
fn tls_through_a_balancer(server: &Server, roots: &RootCertStore) -> Tls {
    let mut tcp = TcpStream::connect(server.smtps.unwrap()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut conn = client_for_mx(roots);
    let mut first = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 465\r\n".to_vec();
    conn.write_tls(&mut first).unwrap();
    tcp.write_all(&first).unwrap();
    Tls {
        stream: BufReader::new(StreamOwned::new(conn, tcp)),
    }
}

#[test]
fn a_balancer_s_client_over_the_connection_limit_gets_its_421_inside_tls() {
    // The 421 waits for the header, and goes inside TLS, whose handshake follows it.
    let (server, roots, _dir) = server_with_cert_and(&[
        "--proxy-from",
        "127.0.0.1",
        "--max-connections",
        "1",
        "--max-connections-per-ip",
        "1",
    ]);
    // The one place, taken by a client of its own (127.0.0.1 is the balancer).
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 2], 0)).into())
        .unwrap();
    socket.connect(&server.smtp.into()).unwrap();
    let mut holder = common::Client::from_stream(TcpStream::from(socket));
    assert!(holder.line().starts_with("220 "));
    let mut t = tls_through_a_balancer(&server, &roots);
    assert_eq!(
        t.line(),
        "421 4.3.2 mx.test Too many connections, try again later"
    );
}

#[test]
fn implicit_tls_behind_a_load_balancer_reads_its_proxy_header_then_the_handshake() {
    // The header and the client's hello in one write: the hello is not taken for part of
    // the header, and the client is the one the header names.
    let (mut server, roots, _dir) = server_with_cert_and(&["--proxy-from", "127.0.0.1"]);
    let mut t = tls_through_a_balancer(&server, &roots);
    assert_eq!(t.line(), "220 mx.test ESMTP postern");
    t.cmd("EHLO client.test");
    assert_eq!(t.cmd("MAIL FROM:<a@b.test>"), "250 2.1.0 Ok");
    // Loopback may relay; the client behind the load balancer may not.
    assert_eq!(t.cmd("RCPT TO:<c@d.test>"), "554 5.7.1 Relay access denied");
    assert_eq!(t.cmd("QUIT"), "221 2.0.0 mx.test Bye");
    assert!(server.terminate().success());
}

#[test]
fn an_over_limit_client_of_the_implicit_tls_port_gets_its_421_inside_tls() {
    let (server, roots, _dir) =
        server_with_cert_and(&["--max-connections-per-ip", "1", "--max-connections", "10"]);
    let connect = || {
        let tcp = TcpStream::connect(server.smtps.unwrap()).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Tls::wrap(tcp, &roots)
    };
    let mut first = connect();
    assert_eq!(first.line(), "220 mx.test ESMTP postern");
    let mut second = connect();
    assert_eq!(
        second.line(),
        "421 4.7.0 mx.test Too many connections from your address, try again later"
    );
    // Then the server ends the TLS session and the connection.
    let mut rest = Vec::new();
    let end = second.stream.read_to_end(&mut rest);
    assert!(end.is_ok() && rest.is_empty(), "{end:?} {rest:?}");
    let four = "postern_replies_total{class=\"4xx\"} 1";
    // Two handshakes, each counted once: the session's and the refusal's.
    let shakes = "postern_tls_handshakes_total 2\n";
    let m = server.metrics_until(|m| m.contains(four) && m.contains(shakes));
    assert!(m.contains("postern_connections_refused_total 1"), "{m}");
    assert!(m.contains(four) && m.contains(shakes), "{m}");
    assert!(
        m.contains("postern_tls_handshake_failures_total 0\n"),
        "{m}"
    );
    assert_eq!(first.cmd("QUIT"), "221 2.0.0 mx.test Bye");
}

/// A session whose client answers STARTTLS's 220 with bytes that are no ClientHello, read
/// until the server closes it.
fn a_handshake_that_fails(server: &Server) {
    let mut c = server.connect();
    c.line();
    c.cmd("EHLO client.test");
    assert_eq!(c.cmd("STARTTLS"), "220 2.0.0 Ready to start TLS");
    c.send(b"this is not a TLS ClientHello\r\n\r\n");
    let mut rest = Vec::new();
    let _ = c.reader.read_to_end(&mut rest);
}

#[test]
fn a_failed_handshake_closes_only_that_session() {
    let (server, _roots, _dir) = server_with_cert();
    a_handshake_that_fails(&server);
    // Another session is unaffected.
    let mut d = server.connect();
    assert_eq!(d.line(), "220 mx.test ESMTP postern");
    assert_eq!(d.cmd("NOOP"), "250 2.0.0 Ok");
    let metrics = server.metrics_until(|m| m.contains("postern_tls_handshake_failures_total 1\n"));
    assert!(metrics.contains("postern_tls_handshake_failures_total 1\n"));
}

#[test]
fn a_failed_handshake_is_logged_with_its_client_and_why_at_most_once_a_minute() {
    // An operator sees why handshakes fail (a counter alone says nothing of whom or why),
    // without a line for each of a scanner's thousands: the first at once, then one a
    // minute per core with how many came meanwhile.
    let (mut server, _roots, _dir) = server_with_cert_and(&["--cores", "1"]);
    a_handshake_that_fails(&server);
    let line = server.log_until(|l| l.contains("TLS handshake failed"));
    assert!(line.contains("client=127.0.0.1:"), "{line}");
    assert!(line.contains("more_since_last=0"), "{line}");
    a_handshake_that_fails(&server);
    a_handshake_that_fails(&server);
    server.metrics_until(|m| m.contains("postern_tls_handshake_failures_total 3\n"));
    let log = server.terminate_for_log();
    let logged = log
        .lines()
        .filter(|l| l.contains(" INFO ") && l.contains("TLS handshake failed"))
        .count();
    assert_eq!(logged, 1, "{log}");
}

#[test]
fn a_silent_handshake_is_bounded_by_the_command_timeout() {
    // The built-in handshake limit is 30 s; a 1 s command timeout bounds it too, after
    // STARTTLS and on the implicit-TLS port alike.
    let (server, roots, _dir) = server_with_cert_and(&["--command-timeout", "1s", "--cores", "1"]);
    let closed_within = |tcp: &mut TcpStream| {
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let start = std::time::Instant::now();
        let mut rest = Vec::new();
        let read = tcp.read_to_end(&mut rest);
        assert!(
            read.is_ok(),
            "still open after {:?}: {read:?}",
            start.elapsed()
        );
        start.elapsed()
    };
    let mut c = server.connect();
    c.line();
    c.cmd("EHLO client.test");
    assert_eq!(c.cmd("STARTTLS"), "220 2.0.0 Ready to start TLS");
    let waited = closed_within(&mut c.stream);
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    let mut tcp = TcpStream::connect(server.smtps.unwrap()).unwrap();
    let waited = closed_within(&mut tcp);
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    // One that starts a ClientHello and stops fails it.
    let mut tcp = TcpStream::connect(server.smtps.unwrap()).unwrap();
    tcp.write_all(&[0x16, 0x03, 0x01]).unwrap();
    let waited = closed_within(&mut tcp);
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    // Then a handshake that completes, on the same (one) core: once the copy of its counts
    // that shows it is published, the failures before it are in that copy too. The silent
    // STARTTLS client and the half ClientHello failed; the implicit-TLS client that never
    // sent a byte (a probe that connects and waits) tried no handshake.
    let tcp = TcpStream::connect(server.smtps.unwrap()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut done = Tls::wrap(tcp, &roots);
    assert_eq!(done.line(), "220 mx.test ESMTP postern");
    let m = server.metrics_until(|m| m.contains("postern_tls_handshakes_total 1\n"));
    assert!(
        m.contains("postern_tls_handshake_failures_total 2\n"),
        "{m}"
    );
}

#[test]
fn an_expired_certificate_for_another_name_is_warned_about_and_still_served() {
    let mut params = rcgen::CertificateParams::new(vec!["other.test".to_owned()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let server = Server::start(&[
        "--tls-cert",
        cert_path.to_str().unwrap(),
        "--tls-key",
        key_path.to_str().unwrap(),
    ]);
    let expired = server.log_until(|l| l.contains("WARN") && l.contains("expired on"));
    assert!(
        expired.contains("cert.pem") && expired.contains("2021"),
        "{expired}"
    );
    let name = server.log_until(|l| l.contains("does not name --hostname mx.test"));
    assert!(name.contains("other.test"), "{name}");
    // Clients that do not verify (most MTAs delivering opportunistically) still get TLS.
    let mut c = server.connect();
    c.line();
    c.send(b"EHLO client.test\r\n");
    assert_eq!(c.reply().last().unwrap(), "250 STARTTLS");
    assert_eq!(c.cmd("STARTTLS"), "220 2.0.0 Ready to start TLS");
}

#[test]
fn a_private_key_any_user_can_read_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let set = |path: &std::path::Path, mode| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    // A certificate for another name, so that a warning about it ends what the start (or a
    // reload) says of the pair: the key's comes before it.
    let ck = rcgen::generate_simple_self_signed(vec!["other.test".into()]).unwrap();
    let said = |l: &str| l.contains("WARN") && l.contains("by any user of this machine");
    // (key's mode, its directory's, warned): a directory closed to others closes the key.
    for (mode, dir_mode, warned) in [
        (0o644, 0o755, Some("can be read")),
        (0o666, 0o755, Some("can be replaced")),
        (0o600, 0o755, None),
        (0o640, 0o755, None),
        (0o711, 0o755, None),
        (0o644, 0o700, None),
    ] {
        let dir = tempfile::tempdir().unwrap();
        set(dir.path(), dir_mode);
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        set(&key, mode);
        let server = Server::start(&[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ]);
        server.log_until(|l| l.contains("does not name --hostname mx.test"));
        let case = format!("key {mode:o} in a directory {dir_mode:o}");
        assert_eq!(
            server.log_count(said),
            usize::from(warned.is_some()),
            "{case}"
        );
        if let Some(what) = warned {
            let line = server.log_until(said);
            let mode = format!("(mode {mode:o})");
            assert!(
                line.contains(what) && line.contains("key.pem"),
                "{case}: {line}"
            );
            assert!(line.contains(&mode), "{case}: {line}");
        }
        // Opened to everyone later: a reload says so too.
        if mode == 0o600 {
            set(&key, 0o644);
            server.signal("-HUP");
            server.log_until(|l| l.contains("SIGHUP: TLS certificate and key read again"));
            assert_eq!(server.log_count(said), 1, "{case}, then 644 and a reload");
        }
    }
}

/// STARTTLS with a client that trusts only `roots`; the first line of the EHLO reply inside
/// TLS, or the error of the handshake.
fn ehlo_inside_tls(server: &Server, roots: &RootCertStore) -> std::io::Result<String> {
    let mut c = server.connect();
    c.line();
    c.send(b"EHLO client.test\r\n");
    c.reply();
    assert_eq!(c.cmd("STARTTLS"), "220 2.0.0 Ready to start TLS");
    let mut t = Tls::wrap(c.stream.try_clone().unwrap(), roots);
    t.stream.get_mut().write_all(b"EHLO client.test\r\n")?;
    let mut line = String::new();
    t.stream.read_line(&mut line)?;
    Ok(line.trim_end().to_owned())
}

#[test]
fn sighup_reads_a_renewed_certificate_and_keeps_the_old_one_when_the_new_cannot_work() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let old = rcgen::generate_simple_self_signed(vec!["mx.test".into()]).unwrap();
    let new = rcgen::generate_simple_self_signed(vec!["mx.test".into()]).unwrap();
    let trusting = |ck: &rcgen::CertifiedKey<rcgen::KeyPair>| {
        let mut roots = RootCertStore::empty();
        roots.add(ck.cert.der().clone()).unwrap();
        roots
    };
    let (old_roots, new_roots) = (trusting(&old), trusting(&new));
    std::fs::write(&cert, old.cert.pem()).unwrap();
    std::fs::write(&key, old.signing_key.serialize_pem()).unwrap();
    let server = Server::start(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    assert_eq!(
        ehlo_inside_tls(&server, &old_roots).unwrap(),
        "250-mx.test Hello client.test"
    );
    assert!(ehlo_inside_tls(&server, &new_roots).is_err());

    std::fs::write(&cert, new.cert.pem()).unwrap();
    std::fs::write(&key, new.signing_key.serialize_pem()).unwrap();
    server.signal("-HUP");
    server.log_until(|l| l.contains("SIGHUP: TLS certificate and key read again"));
    assert_eq!(
        ehlo_inside_tls(&server, &new_roots).unwrap(),
        "250-mx.test Hello client.test"
    );
    assert!(
        ehlo_inside_tls(&server, &old_roots).is_err(),
        "the old certificate still served"
    );

    // A half-written renewal: the key no longer matches. The error names both files and the
    // certificate in use stays.
    std::fs::write(&key, old.signing_key.serialize_pem()).unwrap();
    server.signal("-HUP");
    let error = server.log_until(|l| l.contains("SIGHUP: ") && l.contains("ERROR"));
    assert!(
        error.contains("key.pem") && error.contains("stays"),
        "{error}"
    );
    assert_eq!(
        ehlo_inside_tls(&server, &new_roots).unwrap(),
        "250-mx.test Hello client.test"
    );
}

#[test]
fn sighup_says_so_when_the_chain_read_again_is_shorter() {
    // A chain of two (the server's certificate and its issuer's), then a reload that finds
    // the first alone, as a file caught half-written between its blocks reads: the key
    // still matches, so it is used, and the log says the chain got shorter.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let leaf = rcgen::generate_simple_self_signed(vec!["mx.test".into()]).unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
    std::fs::write(&cert, format!("{}{}", leaf.cert.pem(), other.cert.pem())).unwrap();
    std::fs::write(&key, leaf.signing_key.serialize_pem()).unwrap();
    let server = Server::start(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    std::fs::write(&cert, leaf.cert.pem()).unwrap();
    server.signal("-HUP");
    let warning = server.log_until(|l| l.contains("the chain read again"));
    assert!(
        warning.contains("has 1 certificate(s), the one in use had 2"),
        "{warning}"
    );
    server.log_until(|l| l.contains("SIGHUP: TLS certificate and key read again"));
}

#[test]
fn a_stop_does_not_wait_for_handshakes_in_progress() {
    // Long grace and long handshake limit: only ending the handshakes lets the stop finish
    // well inside either.
    let (mut server, _roots, _dir) =
        server_with_cert_and(&["--cores", "1", "--shutdown-grace", "60s"]);
    let mut c = server.connect();
    c.line();
    c.cmd("EHLO client.test");
    assert_eq!(c.cmd("STARTTLS"), "220 2.0.0 Ready to start TLS");
    let mut silent = TcpStream::connect(server.smtps.unwrap()).unwrap();
    // A ClientHello's first bytes, and no more.
    silent.write_all(b"\x16\x03\x01\x02\x00").unwrap();
    server.metrics_until(|m| m.contains("postern_active_sessions 2\n"));
    server.signal("-TERM");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the stop waited for the handshakes"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    for tcp in [&mut c.stream, &mut silent] {
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert!(tcp.read_to_end(&mut Vec::new()).is_ok(), "left open");
    }
}

/// `openssl s_client` asks for a TLS 1.2 renegotiation (its `R` command) on `addr`, after
/// STARTTLS when `starttls`; what it printed once it gave up. The server refuses with an alert;
/// the client must get it at once, not with the server's 421 when the command timeout ends.
fn renegotiate(addr: std::net::SocketAddr, starttls: bool) -> String {
    use std::process::{Command, Stdio};
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-connect",
        &addr.to_string(),
        "-crlf",
        "-tls1_2",
    ]);
    if starttls {
        cmd.args(["-starttls", "smtp"]);
    }
    let mut child = common::KillOnDrop(
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("openssl (the test command installs it)"),
    );
    // The renegotiation is asked for only once the session is quiet: on the implicit TLS port
    // after the greeting has come, since OpenSSL gives up on application data that arrives
    // while it waits for the server's answer to its hello ("unexpected record"). After
    // STARTTLS the server says nothing until the client speaks, so the end of the handshake
    // is enough. stdin stays open, as an end of input would end the session from the
    // client's side.
    let ready = if starttls {
        "    Verify return code"
    } else {
        "220 "
    };
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut out = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                out.push_str(&line);
                out.push('\n');
                if line.starts_with(ready) {
                    break;
                }
            }
            Err(e) => panic!("no {ready:?} line from s_client ({e}):\n{out}"),
        }
    }
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"R\n").unwrap();
    while child.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the client still waits for an answer to its renegotiation:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(stdin);
    reader.join().unwrap();
    for line in lines.try_iter() {
        out.push_str(&line);
        out.push('\n');
    }
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    out
}

#[test]
fn a_renegotiation_is_refused_at_once() {
    // A command timeout far beyond the test's patience: the refusal must not wait for it.
    let (server, _roots, _dir) = server_with_cert_and(&["--command-timeout", "5m"]);
    for (addr, starttls) in [(server.smtp, true), (server.smtps.unwrap(), false)] {
        let out = renegotiate(addr, starttls);
        assert!(out.contains("RENEGOTIATING"), "{out}");
        assert!(out.contains("no renegotiation"), "{out}");
        // The session is over for the client; the server still serves others.
        let mut c = server.connect();
        assert!(c.line().starts_with("220 "));
    }
}

#[test]
fn clients_cannot_fill_the_log_with_tls_warnings() {
    use std::process::{Command, Stdio};
    let (mut server, _roots, _dir) = server_with_cert();
    let smtps = server.smtps.unwrap().to_string();
    for _ in 0..3 {
        // An IP address as SNI: TLS ignores it (RFC 6066 3) and the handshake goes on.
        let out = Command::new("openssl")
            .args(["s_client", "-connect", &smtps, "-servername", "127.0.0.1"])
            .stdin(Stdio::null())
            .output()
            .expect("openssl (the test command installs it)");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Certificate chain"), "{text}");
    }
    let metrics = server.metrics_until(|m| m.contains("postern_tls_handshakes_total 3\n"));
    assert!(metrics.contains("postern_tls_handshakes_total 3\n"));
    let log = server.terminate_for_log();
    assert!(!log.contains("rustls"), "{log}");
    assert!(!log.contains("SNI"), "{log}");
}

#[test]
fn a_connection_closed_before_its_first_byte_on_the_tls_port_is_no_failed_handshake() {
    let (server, _roots, _dir) = server_with_cert();
    let smtps = server.smtps.unwrap();
    // A port check: connect, close.
    drop(TcpStream::connect(smtps).unwrap());
    // Not TLS at all: a failed handshake, answered with an alert and a close.
    let mut junk = TcpStream::connect(smtps).unwrap();
    junk.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    junk.write_all(b"EHLO not-tls.test\r\n").unwrap();
    let mut rest = Vec::new();
    let _ = junk.read_to_end(&mut rest);
    // Both sessions over: only the second counts as a failure.
    let done = |m: &str| {
        m.contains("postern_connections_total 2\n") && m.contains("postern_active_sessions 0\n")
    };
    let m =
        server.metrics_until(|m| done(m) && m.contains("postern_tls_handshake_failures_total 1\n"));
    assert!(done(&m), "{m}");
    assert!(
        m.contains("postern_tls_handshake_failures_total 1\n"),
        "{m}"
    );
    assert!(m.contains("postern_tls_handshakes_total 0\n"), "{m}");
}
