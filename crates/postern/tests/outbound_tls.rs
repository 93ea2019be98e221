//! STARTTLS towards next hops: opportunistic (cleartext when it fails, on a new connection)
//! and required (a verified certificate, or the mail waits), and how a failed handshake is
//! reported.
#![allow(clippy::unwrap_used)]

mod common;
mod relaying;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use common::Server;
use relaying::*;

#[test]
fn opportunistic_tls_takes_an_old_style_certificate_it_need_not_verify() {
    // A next hop (OpenSSL, through aiosmtpd) whose self-signed certificate is X.509 version 1,
    // as old MTAs' often are: opportunistic TLS checks nothing of the certificate, so the
    // session is encrypted. Before, the handshake's signature was checked through a parse
    // of the certificate that takes version 3 only: the handshake failed, and the next hop
    // got its mail in cleartext for an hour. The certificate is a fixture (made with
    // `openssl x509 -req` without extensions, valid until 2126): OpenSSL 3.2 and later make
    // version 3 certificates only.
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let (cert, key) = (fixtures.join("v1-cert.pem"), fixtures.join("v1-key.pem"));
    let der = pem_first_der(&std::fs::read(&cert).unwrap());
    // The version field is absent from a version 1 certificate: its TBSCertificate begins
    // with the serial number (an INTEGER, tag 2), not with the [0] tag (0xA0) of a version.
    assert_eq!(tbs_first_tag(&der), 0x02, "not a version 1 certificate");
    let peer = Peer::start(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let server = routed_to(&peer, &["--metrics", "127.0.0.1:0"]);
    send(
        &server,
        "a@origin.test",
        &["r@dest.test"],
        "<v1@t>",
        "x\r\n",
    );
    let (got, _) = peer.first("the message");
    assert!(got.tls, "delivered in cleartext");
    let m = server.metrics_until(|m| m.contains("postern_outbound_tls_handshakes_total 1\n"));
    assert!(
        m.contains("postern_outbound_tls_handshake_failures_total 0\n"),
        "{m}"
    );
}

#[test]
fn a_next_hop_with_a_ca_certificate_as_its_own_is_named_plainly_in_the_deferral() {
    // A certificate marked as an authority (CA:TRUE) served as the next hop's own, and
    // trusted: the verifier refuses it, and the log says why in words.
    let dir = tempfile::tempdir().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().unwrap();
    let ca = params.self_signed(&key).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, ca.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let (cert, key) = (cert_path.to_str().unwrap(), key_path.to_str().unwrap());
    let (sink, out, addr) = start_sink(&["--tls-cert", cert, "--tls-key", key]);
    let port = addr.rsplit(':').next().unwrap();
    let route = format!("sink.test=localhost:{port}");
    let server = Server::start(&[
        "--route",
        &route,
        "--outbound-tls",
        "required",
        "--outbound-tls-ca",
        cert,
    ]);
    send(
        &server,
        "a@origin.test",
        &["r@sink.test"],
        "<ca@t>",
        "x\r\n",
    );
    let deferred = server.log_until(|l| l.contains("status=\"deferred\""));
    assert!(
        deferred.contains("invalid peer certificate: it is a CA certificate, not a server's"),
        "{deferred}"
    );
    // A cryptographic failure (RFC 3463 3.8), not a broken connection's 4.4.2.
    assert!(deferred.contains("dsn=\"4.7.5\""), "{deferred}");
    let counters = stop_sink(sink, out);
    assert!(
        counters.contains("postern_load_sink_messages_total 0\n"),
        "{counters}"
    );
}

#[test]
fn failed_handshakes_on_connections_opened_together_are_no_connection_limit() {
    // Eight messages queued, then delivered at once with TLS required to a next hop whose
    // certificate is not trusted: eight connections open together and every handshake fails.
    // That is no limit of connections per client (which a host shows by refusing the session),
    // so none is said or applied, and the failures in a row pause the next hop.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = localhost_cert(dir.path());
    let (sink, out, addr) = start_sink(&["--tls-cert", &cert, "--tls-key", &key]);
    let port = addr.rsplit(':').next().unwrap();
    let spool = dir.path().join("spool");
    let mut held = Server::start_in(&["--cores", "1"], spool.clone(), None);
    for i in 0..8 {
        send(
            &held,
            "a@origin.test",
            &["r@sink.test"],
            &format!("<t{i}@t>"),
            "x\r\n",
        );
    }
    assert!(held.terminate().success());
    let route = format!("sink.test=localhost:{port}");
    let server = Server::start_in(
        &[
            "--route",
            &route,
            "--outbound-tls",
            "required",
            "--cores",
            "1",
            "--retry-initial",
            "60s",
        ],
        spool,
        None,
    );
    server.log_until(|l| l.contains("delivery to it paused"));
    assert_eq!(
        server.log_count(|l| l.contains("refused another connection")),
        0,
        "failed handshakes were taken for a limit on connections"
    );
    let counters = stop_sink(sink, out);
    assert!(
        counters.contains("postern_load_sink_messages_total 0\n"),
        "{counters}"
    );
}

/// A self-signed certificate for `localhost` and its key, written into `dir`: their paths.
fn localhost_cert(dir: &std::path::Path) -> (String, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (
        cert.to_str().unwrap().to_owned(),
        key.to_str().unwrap().to_owned(),
    )
}

#[test]
fn required_tls_trusts_the_store_that_ssl_cert_file_names() {
    // The system's trust store is found as OpenSSL finds it: SSL_CERT_FILE, when set, names
    // it (a host whose bundle is elsewhere than Debian's or Red Hat's path says so there).
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = localhost_cert(dir.path());
    let (cert, key) = (cert.as_str(), key.as_str());
    let (sink, out, addr) = start_sink(&["--tls-cert", cert, "--tls-key", key]);
    let port = addr.rsplit(':').next().unwrap();
    let route = format!("sink.test=localhost:{port}");
    let server = Server::start_with_env(
        &[
            "--route",
            &route,
            "--outbound-tls",
            "required",
            "--metrics",
            "127.0.0.1:0",
        ],
        &[("SSL_CERT_FILE", cert)],
    );
    send(
        &server,
        "a@origin.test",
        &["r@sink.test"],
        "<store@t>",
        "x\r\n",
    );
    let m = server.metrics_until(|m| m.contains("postern_recipients_delivered_total 1\n"));
    assert!(m.contains("postern_recipients_delivered_total 1\n"), "{m}");
    let counters = stop_sink(sink, out);
    assert!(
        counters.contains("postern_load_sink_messages_total 1\n"),
        "{counters}"
    );
}

#[test]
fn required_tls_tries_the_next_mx_host_at_the_same_address_under_its_own_name() {
    use dns_server::{Rec, TestDns};
    // Two MX hosts at one address, the certificate naming only the second. The address was
    // listed once, under the best host's name: its certificate failed that name, and the
    // second host, whose name it carries, was never tried; the mail waited until returned.
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["mx2.dest.test".into()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let (sink, out, addr) = start_sink(&["--tls-cert", cert, "--tls-key", key]);
    let port = addr.rsplit(':').next().unwrap();
    let loopback = "127.0.0.1".parse().unwrap();
    let dns = TestDns::start(
        "test",
        &[
            ("dest.test.", Rec::Mx(10, "mx1.dest.test.")),
            ("dest.test.", Rec::Mx(20, "mx2.dest.test.")),
            ("mx1.dest.test.", Rec::A(loopback)),
            ("mx2.dest.test.", Rec::A(loopback)),
        ],
    );
    let dns_addr = dns.addr.to_string();
    let server = Server::start(&[
        "--dns-server",
        &dns_addr,
        "--mx-port",
        port,
        "--outbound-tls",
        "required",
        "--outbound-tls-ca",
        cert,
        "--metrics",
        "127.0.0.1:0",
    ]);
    send(
        &server,
        "a@origin.test",
        &["r@dest.test"],
        "<second-name@t>",
        "x\r\n",
    );
    let m = server.metrics_until(|m| {
        m.contains("postern_recipients_delivered_total 1\n")
            || m.contains("postern_delivery_deferrals_total 1\n")
    });
    assert!(m.contains("postern_recipients_delivered_total 1\n"), "{m}");
    assert!(m.contains("postern_delivery_deferrals_total 0\n"), "{m}");
    // Delivered to the address under the second name, which its certificate carries.
    let line = server.log_until(|l| l.contains("sent"));
    assert!(line.contains("mx2.dest.test"), "{line}");
    let counters = stop_sink(sink, out);
    assert!(
        counters.contains("postern_load_sink_messages_total 1\n"),
        "{counters}"
    );
}

#[test]
fn outbound_starttls_opportunistic_and_required() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = localhost_cert(dir.path());
    let tls = ["--tls-cert", cert.as_str(), "--tls-key", key.as_str()];
    let (sink, out, addr) = start_sink(&tls);
    let port = addr.rsplit(':').next().unwrap();
    let route = format!("sink.test=localhost:{port}");
    // Opportunistic (the default): a self-signed certificate still gets encryption.
    {
        let server = Server::start(&["--route", &route, "--metrics", "127.0.0.1:0"]);
        send(
            &server,
            "a@origin.test",
            &["r@sink.test"],
            "<tls1@t>",
            "x\r\n",
        );
        // Each core publishes its counters a few times a second: the handshake may have been
        // counted on another core than the delivery.
        let m = server.metrics_until(|m| {
            m.contains("postern_recipients_delivered_total 1\n")
                && m.contains("postern_outbound_tls_handshakes_total 1\n")
        });
        assert!(
            m.contains("postern_outbound_tls_handshakes_total 1\n"),
            "{m}"
        );
        assert!(m.contains("postern_tls_handshakes_total 0\n"), "{m}");
    }
    // Required, with the certificate's issuer trusted: verified, delivered.
    {
        let server = Server::start(&[
            "--route",
            &route,
            "--metrics",
            "127.0.0.1:0",
            "--outbound-tls",
            "required",
            "--outbound-tls-ca",
            cert.as_str(),
        ]);
        send(
            &server,
            "a@origin.test",
            &["r@sink.test"],
            "<tls2@t>",
            "x\r\n",
        );
        let m = server.metrics_until(|m| {
            m.contains("postern_recipients_delivered_total 1\n")
                && m.contains("postern_outbound_tls_handshakes_total 1\n")
        });
        assert!(m.contains("postern_recipients_delivered_total 1\n"), "{m}");
        assert!(
            m.contains("postern_outbound_tls_handshakes_total 1\n"),
            "{m}"
        );
    }
    // Required without trusting it: not delivered, deferred (never sent in cleartext).
    {
        let server = Server::start(&[
            "--route",
            &route,
            "--metrics",
            "127.0.0.1:0",
            "--outbound-tls",
            "required",
        ]);
        send(
            &server,
            "a@origin.test",
            &["r@sink.test"],
            "<tls3@t>",
            "x\r\n",
        );
        let m = server.metrics_until(|m| {
            m.contains("postern_delivery_deferrals_total 1\n")
                && m.contains("postern_outbound_tls_handshake_failures_total 1\n")
        });
        assert!(m.contains("postern_delivery_deferrals_total 1\n"), "{m}");
        assert!(m.contains("postern_recipients_delivered_total 0\n"), "{m}");
        assert!(
            m.contains("postern_outbound_tls_handshakes_total 0\n"),
            "{m}"
        );
        assert!(
            m.contains("postern_outbound_tls_handshake_failures_total 1\n"),
            "{m}"
        );
    }
    let counters = stop_sink(sink, out);
    assert!(
        counters.contains("postern_load_sink_messages_total 2\n"),
        "{counters}"
    );
    assert!(
        counters.contains("postern_load_sink_tls_handshakes_total 2\n")
            || counters.contains("postern_load_sink_tls_handshakes_total 3\n"),
        "{counters}"
    );
}

/// A next hop that offers STARTTLS and takes mail in cleartext. STARTTLS itself: with
/// `refuse` it answers 454 and the session goes on; otherwise it agrees and closes, which
/// breaks the handshake.
fn broken_tls_next_hop(refuse: bool) -> (u16, StoredRx) {
    let (port, stored, _) = scripted_next_hop(
        move |_, line| {
            if line.starts_with("EHLO") {
                Some(Act::Say("250-tls.test\r\n250 STARTTLS\r\n"))
            } else if line.starts_with("STARTTLS") && refuse {
                Some(Act::Say("454 4.7.0 TLS not available now\r\n"))
            } else if line.starts_with("STARTTLS") {
                Some(Act::SayAndClose("220 2.0.0 go ahead\r\n"))
            } else {
                None
            }
        },
        Act::Say("250 2.0.0 stored\r\n"),
    );
    (port, stored)
}

/// Sends one message through postern (default opportunistic TLS) to `broken_tls_next_hop`
/// (with `refuse`): returns whether it arrived on the first connection, after checking that
/// it arrived whole and with no deferral counted.
fn through_tls_next_hop(refuse: bool, message_id: &str) -> bool {
    let (port, stored) = broken_tls_next_hop(refuse);
    let route = format!("dest.test=127.0.0.1:{port}");
    let server = Server::start(&["--route", &route, "--metrics", "127.0.0.1:0"]);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        message_id,
        "hello\r\n",
    );
    let (connection, data) = stored.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(
        data.contains(&format!("Message-ID: {message_id}")),
        "{data}"
    );
    // A refused STARTTLS is no handshake; one broken off is a failed one.
    let failures = format!(
        "postern_outbound_tls_handshake_failures_total {}\n",
        u8::from(!refuse)
    );
    // Each core publishes its counters a few times a second: wait for both.
    let m = server.metrics_until(|m| {
        m.contains("postern_recipients_delivered_total 1\n") && m.contains(&failures)
    });
    assert!(m.contains("postern_delivery_deferrals_total 0\n"), "{m}");
    assert!(m.contains(&failures), "{m}");
    assert!(
        m.contains("postern_outbound_tls_handshakes_total 0\n"),
        "{m}"
    );
    // A failed handshake is said, since mail to that address now goes unencrypted.
    let said = |l: &str| l.contains("WARN") && l.contains("goes in cleartext for a minute");
    if !refuse {
        let line = server.log_until(said);
        assert!(line.contains("STARTTLS failed"), "{line}");
    }
    assert_eq!(server.log_count(said), usize::from(!refuse));
    connection == 0
}

#[test]
fn failed_opportunistic_tls_is_retried_in_cleartext_on_a_new_connection() {
    assert!(
        !through_tls_next_hop(false, "<tlsfail@t>"),
        "delivered on the connection whose handshake failed"
    );
}

#[test]
fn a_handshake_cut_once_costs_a_short_while_in_cleartext_not_an_hour() {
    // A next hop with working TLS (aiosmtpd with a certificate) behind a path that cuts its
    // first handshake (a reset, a passing fault): the 220 to STARTTLS, then the close. Before,
    // that one failure sent its mail in cleartext for an hour; now for the pause of a next
    // hop that failed (`--retry-initial`, here 200 ms), doubled with each failure in a row.
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let (cert, key) = (fixtures.join("v1-cert.pem"), fixtures.join("v1-key.pem"));
    let peer = Peer::start(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let upstream = format!("127.0.0.1:{}", peer.port);
    std::thread::spawn(move || {
        for (n, client) in listener.incoming().take(8).enumerate() {
            let Ok(mut client) = client else { return };
            if n == 0 {
                let mut lines = BufReader::new(client.try_clone().unwrap());
                client.write_all(b"220 cut.test ESMTP\r\n").unwrap();
                let mut line = String::new();
                while lines.read_line(&mut line).is_ok_and(|n| n > 0) {
                    if line.starts_with("EHLO") {
                        client
                            .write_all(b"250-cut.test\r\n250 STARTTLS\r\n")
                            .unwrap();
                    } else if line.starts_with("STARTTLS") {
                        client.write_all(b"220 2.0.0 go ahead\r\n").unwrap();
                        break;
                    }
                    line.clear();
                }
                continue;
            }
            // Later connections go through to the next hop, byte for byte.
            let server = std::net::TcpStream::connect(&upstream).unwrap();
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut s2);
                let _ = s2.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let (mut server, mut client) = (server, client);
                let _ = std::io::copy(&mut server, &mut client);
                let _ = client.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    let route = format!("dest.test=127.0.0.1:{port}");
    let mut args = vec!["--route", route.as_str()];
    args.extend(FAST_RETRY);
    let server = Server::start(&args);
    send(
        &server,
        "a@origin.test",
        &["r@dest.test"],
        "<cut@t>",
        "x\r\n",
    );
    let (first, _) = peer.first("the first message");
    assert!(
        !first.tls,
        "the first message went in TLS after its handshake was cut"
    );
    let line = server.log_until(|l| l.contains("STARTTLS failed"));
    assert!(line.contains("goes in cleartext for 200 ms"), "{line}");
    // The while is 200 ms from the failure; the connection that took the first message in
    // cleartext is not used past it, so the next message gets STARTTLS again.
    std::thread::sleep(Duration::from_millis(500));
    send(
        &server,
        "a@origin.test",
        &["r@dest.test"],
        "<after@t>",
        "y\r\n",
    );
    let stored = peer.wait_for("the second message", Duration::from_secs(20), |s| {
        s.len() >= 2
    });
    assert_eq!(stored[1].message_id, "<after@t>");
    assert!(stored[1].tls, "the next hop's mail is still in cleartext");
}

#[test]
fn a_reply_behind_the_ehlo_reply_is_not_taken_for_the_answer_to_starttls() {
    // The next hop writes a 220 behind its EHLO reply, before STARTTLS went out: taken for
    // STARTTLS's answer, the handshake met the real one, failed, and the next hop got mail
    // in cleartext for an hour. It is a reply nobody asked for: the connection is given up
    // before STARTTLS, with QUIT, and TLS is not held against the next hop.
    let (server, line, asked) = deferred_after_ehlo(
        "250-scripted.test\r\n250 STARTTLS\r\n220 2.0.0 early\r\n",
        "220 2.0.0 go ahead\r\n",
        "<early@t>",
    );
    assert!(
        line.contains("a reply came after the EHLO reply, which no command asked for"),
        "{line}"
    );
    assert_eq!(asked, 0, "STARTTLS was sent");
    assert_eq!(server.log_count(|l| l.contains("goes in cleartext for")), 0);
}

/// A server routing dest.test to a scripted next hop that answers EHLO with `ehlo`, and
/// STARTTLS or MAIL with `answer`, sent one message: the server, its line for the message
/// deferred, and how many STARTTLS or MAIL commands the next hop got.
fn deferred_after_ehlo(
    ehlo: &'static str,
    answer: &'static str,
    message_id: &str,
) -> (Server, String, usize) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let asked = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = asked.clone();
    let (port, _stored, _) = scripted_next_hop(
        move |_, line| {
            if line.starts_with("EHLO") {
                Some(Act::Say(ehlo))
            } else if line.starts_with("STARTTLS") || line.starts_with("MAIL") {
                seen.fetch_add(1, Ordering::SeqCst);
                Some(Act::Say(answer))
            } else {
                None
            }
        },
        Act::Say("250 2.0.0 taken\r\n"),
    );
    let route = format!("dest.test=127.0.0.1:{port}");
    let server = Server::start(&["--route", &route]);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        message_id,
        "x\r\n",
    );
    let line = server.log_until(|l| l.contains("status=\"deferred\""));
    let asked = asked.load(Ordering::SeqCst);
    (server, line, asked)
}

#[test]
fn a_421_behind_the_ehlo_reply_ends_the_session_before_anything_else_goes() {
    // The next hop writes a 421 behind its EHLO reply (it is closing). Before, STARTTLS (or
    // MAIL, where no STARTTLS is offered) went out and took the 421 for its answer. It is the
    // session's end, said before any command follows: a host refusing the session.
    for ehlo in [
        "250-scripted.test\r\n250 STARTTLS\r\n421 4.3.2 scripted.test going away\r\n",
        "250 scripted.test\r\n421 4.3.2 scripted.test going away\r\n",
    ] {
        let (_server, line, asked) =
            deferred_after_ehlo(ehlo, "421 4.3.2 told you\r\n", "<closing@t>");
        assert!(line.contains("going away"), "{ehlo}: {line}");
        assert_eq!(asked, 0, "{ehlo}: a command was sent");
    }
}

#[test]
fn a_refused_opportunistic_starttls_goes_on_in_cleartext() {
    assert!(
        through_tls_next_hop(true, "<tls454@t>"),
        "not delivered on the connection that got 454"
    );
}

#[test]
fn a_refused_starttls_defers_when_tls_is_required() {
    let (port, stored) = broken_tls_next_hop(true);
    let route = format!("dest.test=127.0.0.1:{port}");
    let server = Server::start(&[
        "--route",
        &route,
        "--metrics",
        "127.0.0.1:0",
        "--outbound-tls",
        "required",
    ]);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<tls454req@t>",
        "hello\r\n",
    );
    server.metrics_until(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("postern_delivery_deferrals_total "))
            .is_some_and(|n| n != "0")
    });
    assert!(
        stored.try_recv().is_err(),
        "sent in cleartext though TLS is required"
    );
}

#[test]
fn a_next_hop_without_the_required_tls_gets_quit_and_nothing_else() {
    for offers_starttls in [true, false] {
        let (seen_tx, seen) = std::sync::mpsc::channel::<String>();
        let seen_tx = std::sync::Mutex::new(seen_tx);
        let (port, stored, _) = scripted_next_hop(
            move |_, line| {
                let _ = seen_tx.lock().unwrap().send(line.trim_end().to_owned());
                if line.starts_with("EHLO") && offers_starttls {
                    Some(Act::Say("250-tls.test\r\n250 STARTTLS\r\n"))
                } else if line.starts_with("EHLO") {
                    Some(Act::Say("250 plain.test\r\n"))
                } else if line.starts_with("STARTTLS") {
                    Some(Act::Say("454 4.7.0 TLS not available now\r\n"))
                } else {
                    None
                }
            },
            Act::Say("250 2.0.0 stored\r\n"),
        );
        let route = format!("dest.test=127.0.0.1:{port}");
        let server = Server::start(&["--route", &route, "--outbound-tls", "required"]);
        send(
            &server,
            "a@origin.test",
            &["b@dest.test"],
            "<tlsquit@t>",
            "hello\r\n",
        );
        let mut lines = Vec::new();
        while let Ok(line) = seen.recv_timeout(Duration::from_secs(10)) {
            let quit = line == "QUIT";
            lines.push(line);
            if quit {
                break;
            }
        }
        let expected: &[&str] = if offers_starttls {
            &["EHLO", "STARTTLS", "QUIT"]
        } else {
            &["EHLO", "QUIT"]
        };
        let verbs: Vec<&str> = lines
            .iter()
            .map(|l| l.split(' ').next().unwrap_or(""))
            .collect();
        assert_eq!(verbs, expected, "offers STARTTLS: {offers_starttls}");
        assert!(stored.try_recv().is_err(), "sent in cleartext");
        // The next hop answered: the deferral names it, not "none".
        let deferred = server.log_until(|l| l.contains("status=\"deferred\""));
        assert!(
            deferred.contains("relay=\"127.0.0.1[127.0.0.1]:") && deferred.contains("TLS"),
            "{deferred}"
        );
        // Its own status where it said one (454 4.7.0), else security features not
        // supported (RFC 3463 3.8), not a broken connection's 4.4.2.
        let dsn = if offers_starttls { "4.7.0" } else { "4.7.4" };
        assert!(deferred.contains(&format!("dsn=\"{dsn}\"")), "{deferred}");
    }
}

/// A next hop that offers STARTTLS, completes the handshake with `cert`, then closes the
/// connection instead of answering the EHLO inside TLS.
fn next_hop_dropping_after_tls(cert: &rcgen::CertifiedKey<rcgen::KeyPair>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let chain = vec![cert.cert.der().clone()];
    let key = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
    let config = std::sync::Arc::new(
        rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap(),
    );
    std::thread::spawn(move || {
        let Ok((s, _)) = l.accept() else { return };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let _ = w.write_all(b"220 tls.test ESMTP\r\n");
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            if line.starts_with("EHLO") {
                let _ = w.write_all(b"250-tls.test\r\n250 STARTTLS\r\n");
            } else if line.starts_with("STARTTLS") {
                let _ = w.write_all(b"220 2.0.0 go ahead\r\n");
                break;
            }
            line.clear();
        }
        let mut conn = rustls::ServerConnection::new(config).unwrap();
        let mut tcp = r.into_inner();
        while conn.is_handshaking() {
            if conn.complete_io(&mut tcp).is_err() {
                return;
            }
        }
        // The client's EHLO arrives inside TLS; the connection ends without a reply.
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut buf = [0u8; 512];
        let _ = tls.read(&mut buf);
    });
    port
}

#[test]
fn a_completed_outbound_handshake_counts_even_when_the_session_then_fails() {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let port = next_hop_dropping_after_tls(&ck);
    let route = format!("dest.test=localhost:{port}");
    let server = Server::start(&["--route", &route, "--metrics", "127.0.0.1:0"]);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<tlsdrop@t>",
        "hello\r\n",
    );
    let m = server.metrics_until(|m| {
        m.contains("postern_delivery_deferrals_total 1\n")
            && m.contains("postern_outbound_tls_handshakes_total 1\n")
    });
    assert!(
        m.contains("postern_outbound_tls_handshakes_total 1\n"),
        "{m}"
    );
    assert!(
        m.contains("postern_outbound_tls_handshake_failures_total 0\n"),
        "{m}"
    );
    // It answered (and completed a handshake): the deferral names it.
    let deferred = server.log_until(|l| l.contains("status=\"deferred\""));
    assert!(deferred.contains("relay=\"localhost["), "{deferred}");
}

/// The DER of the first PEM block of `pem`.
fn pem_first_der(pem: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(pem);
    let body: String = text
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64_decode(&body)
}

/// The tag of the first element inside a certificate's TBSCertificate: the outer SEQUENCE
/// and the TBSCertificate SEQUENCE header skipped (long-form lengths included).
fn tbs_first_tag(der: &[u8]) -> u8 {
    let header = |at: usize| -> usize {
        let len = der[at + 1];
        if len & 0x80 == 0 {
            2
        } else {
            2 + usize::from(len & 0x7f)
        }
    };
    let tbs = header(0);
    der[tbs + header(tbs)]
}

#[test]
fn an_mx_host_whose_name_tls_cannot_carry_still_gets_opportunistic_tls() {
    use dns_server::{Rec, TestDns};
    // A label ending in '-' is a DNS name, not a TLS server name. Opportunistic TLS checks
    // no name, so the handshake is made for the address. Before, the name was refused after
    // the next hop had said 220 to STARTTLS: the connection was given up, and the host got
    // its mail in cleartext on a second one (and for an hour after).
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let (cert, key) = (fixtures.join("v1-cert.pem"), fixtures.join("v1-key.pem"));
    let peer = Peer::start_on(
        "127.0.0.64",
        0,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let dns = TestDns::start(
        "test",
        &[
            ("dest.test.", Rec::Mx(10, "mx-.dest.test.")),
            ("mx-.dest.test.", Rec::A("127.0.0.64".parse().unwrap())),
        ],
    );
    let dns_addr = dns.addr.to_string();
    let port = peer.port.to_string();
    let server = Server::start(&["--dns-server", &dns_addr, "--mx-port", &port]);
    send(
        &server,
        "a@origin.test",
        &["r@dest.test"],
        "<dash@t>",
        "x\r\n",
    );
    let (got, _) = peer.first("the message");
    assert!(got.tls, "delivered in cleartext");
}
