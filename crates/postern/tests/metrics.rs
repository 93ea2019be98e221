//! The metrics port: Prometheus text that promtool accepts, counters that follow the traffic,
//! health and readiness, and sessions spread over the cores.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Server;

#[test]
fn metrics_follow_traffic_and_pass_promtool() {
    let server = Server::start(&["--metrics", "127.0.0.1:0", "--cores", "2"]);
    let mut c = server.connect();
    c.line();
    c.cmd("EHLO client.test");
    for i in 0..3 {
        c.cmd("MAIL FROM:<a@b.test>");
        c.cmd(&format!("RCPT TO:<c{i}@d.test>"));
        c.cmd("DATA");
        assert!(c
            .cmd("Subject: m\r\n\r\nbody\r\n.")
            .starts_with("250 2.0.0 Ok: queued as "));
    }
    // Refused at its end (a mail loop): not timed as an end of data to 250.
    c.cmd("MAIL FROM:<a@b.test>");
    c.cmd("RCPT TO:<c@d.test>");
    c.cmd("DATA");
    assert!(c
        .cmd(&format!("{}\r\nbody\r\n.", "Received: x\r\n".repeat(101)))
        .starts_with("554 5.4.6"));
    c.cmd("BOGUS");
    let text = server.metrics_until(|m| m.contains("postern_messages_accepted_total 3\n"));
    for expected in [
        "postern_messages_accepted_total 3\n",
        "postern_connections_total 1\n",
        "postern_active_sessions 1\n",
        "postern_eod_latency_seconds_count 3\n",
        "postern_spool_commit_latency_seconds_count 3\n",
        "postern_replies_total{class=\"3xx\"} 4\n",
        "postern_replies_total{class=\"5xx\"} 2\n",
        // Held (--hold): nothing delivers, so all three are still queued.
        "postern_queue_depth 3\n",
        "postern_eod_latency_quantile_seconds{quantile=\"0.99\"}",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is needed (.ci/run installs the prometheus package)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    assert_eq!(server.http_get("/healthz").0, "HTTP/1.1 200 OK");
    assert_eq!(server.http_get("/readyz").0, "HTTP/1.1 200 OK");
    assert_eq!(server.http_get("/nope").0, "HTTP/1.1 404 Not Found");
}

#[test]
fn the_first_scrape_after_ready_sees_the_queue_and_spool_of_every_core() {
    // Three messages kept by a first run; once the second says it is ready, its very first
    // scrape counts them (not zeros until each core's first periodic copy) and says ready.
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let mut first = Server::start_in(&["--cores", "2"], spool.clone(), None);
    for i in 0..3 {
        let mut c = first.connect();
        c.line();
        c.cmd("EHLO client.test");
        c.cmd("MAIL FROM:<a@b.test>");
        c.cmd(&format!("RCPT TO:<c{i}@d.test>"));
        c.cmd("DATA");
        assert!(c
            .cmd("Subject: m\r\n\r\nbody\r\n.")
            .starts_with("250 2.0.0"));
    }
    assert!(first.terminate().success());
    let second = Server::start_in(
        &["--cores", "2", "--metrics", "127.0.0.1:0"],
        spool,
        Some(dir),
    );
    let (status, text) = second.http_get("/metrics");
    assert!(status.contains("200"), "{status}");
    assert!(text.contains("postern_queue_depth 3\n"), "{text}");
    assert!(!text.contains("postern_spool_bytes 0\n"), "{text}");
    let (status, body) = second.http_get("/readyz");
    assert!(status.contains("200"), "{status} {body}");
}

#[test]
fn every_read_that_gets_replies_is_one_command_latency_sample_quit_too() {
    let server = Server::start(&["--metrics", "127.0.0.1:0", "--cores", "1"]);
    let count = |text: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix("postern_command_latency_seconds_count "))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no command latency count in\n{text}"))
    };
    let mut c = server.connect();
    c.line();
    c.cmd("EHLO client.test");
    c.cmd("NOOP");
    // QUIT alone, then a read holding NOOP and QUIT: each answered read is one sample.
    assert!(c.cmd("QUIT").starts_with("221"));
    let mut d = server.connect();
    d.line();
    d.send(b"NOOP\r\nQUIT\r\n");
    assert!(d.line().starts_with("250"));
    assert!(d.line().starts_with("221"));
    let text = server.metrics_until(|m| m.contains("postern_active_sessions 0\n") && count(m) >= 4);
    assert_eq!(count(&text), 4, "{text}");
}

#[test]
fn sessions_spread_over_several_cores() {
    let server = Server::start(&["--metrics", "127.0.0.1:0", "--cores", "2"]);
    let mut clients = Vec::new();
    for _ in 0..64 {
        let mut c = server.connect();
        c.line();
        clients.push(c);
    }
    let text = server.metrics_until(|m| m.contains("postern_connections_total 64\n"));
    let per_core: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with("postern_core_connections_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(per_core.len(), 2);
    assert_eq!(per_core.iter().sum::<u64>(), 64);
    assert!(
        per_core.iter().all(|&n| n > 0),
        "SO_REUSEPORT left a core idle: {per_core:?}"
    );
}

#[test]
fn silent_clients_of_the_metrics_port_do_not_hold_up_a_scrape() {
    use std::io::Read;
    let server = Server::start(&["--metrics", "127.0.0.1:0"]);
    let addr = server.metrics.unwrap();
    // Three clients that connect and never send a request: served one after another, each
    // would hold the port for the server's 5 s read timeout.
    let silent: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(4))).unwrap();
    write!(s, "GET /metrics?collect=all HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text)
        .expect("the scrape is answered while silent clients wait");
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("postern_connections_total"), "{text}");
    drop(silent);

    let mut h = TcpStream::connect(addr).unwrap();
    write!(h, "HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut head = String::new();
    h.read_to_string(&mut head).unwrap();
    let (status, rest) = head.split_once("\r\n").unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(rest.ends_with("\r\n\r\n"), "HEAD has no body: {head:?}");
    let (status, _) = server.http_get_with("DELETE", "/metrics");
    assert!(status.starts_with("HTTP/1.1 405"), "{status}");
}

#[test]
fn clients_that_hold_every_slot_of_the_metrics_port_do_not_keep_a_scrape_out() {
    use std::io::Read;
    let server = Server::start(&["--metrics", "127.0.0.1:0"]);
    let addr = server.metrics.unwrap();
    // More clients than the port serves at once, each sending a byte of its request now and
    // then (a read timeout per read would never end them).
    let mut slow: Vec<TcpStream> = (0..80).map(|_| TcpStream::connect(addr).unwrap()).collect();
    for s in &mut slow {
        let _ = s.write_all(b"G");
    }
    let scrape = || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(4))).unwrap();
        write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text
    };
    for _ in 0..3 {
        for s in &mut slow {
            let _ = s.write_all(b"E");
        }
        let text = scrape();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text:?}");
    }
}

#[test]
fn a_burst_of_scrapers_beyond_the_slots_is_answered_in_full() {
    use std::io::Read;
    let server = Server::start(&["--metrics", "127.0.0.1:0"]);
    let addr = server.metrics.unwrap();
    // Many more scrapers than the port serves at once, each sending its request as soon as
    // it connects: the newest must not take the place of one being answered (each lost its
    // response to a bare close).
    let scrapers: Vec<_> = (0..200)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let _ = write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
                let mut text = String::new();
                let _ = s.read_to_string(&mut text);
                text.lines().next().unwrap_or("(nothing)").to_owned()
            })
        })
        .collect();
    let statuses: Vec<String> = scrapers.into_iter().map(|t| t.join().unwrap()).collect();
    let lost = statuses.iter().filter(|s| *s != "HTTP/1.1 200 OK").count();
    assert_eq!(lost, 0, "{statuses:?}");
}

#[test]
fn clients_kept_after_their_response_do_not_keep_a_scrape_out() {
    use std::io::Read;
    let server = Server::start(&["--metrics", "127.0.0.1:0"]);
    let addr = server.metrics.unwrap();
    // Requests that announce a body and never send it: each is answered at once, and its
    // connection is then read for a moment (so that the close does not reset the response
    // away). More of them than the port serves at once, all in that moment.
    let mut kept = Vec::new();
    for _ in 0..80 {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(4))).unwrap();
        write!(
            s,
            "GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n"
        )
        .unwrap();
        let mut status = [0u8; 15];
        s.read_exact(&mut status).unwrap();
        assert_eq!(&status, b"HTTP/1.1 200 OK");
        kept.push(s);
    }
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(4))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text:?}");
    drop(kept);
}

#[test]
fn an_empty_line_before_a_request_is_passed_over_and_head_never_gets_a_body() {
    use std::io::Read;
    let server = Server::start(&["--metrics", "127.0.0.1:0"]);
    let addr = server.metrics.unwrap();
    let response = |request: &[u8]| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
        s.write_all(request).unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text
    };
    // RFC 9112 2.2: an empty line before the request line is ignored.
    let text = response(b"\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text:?}");
    // RFC 9110 9.3.2: no body after HEAD, whatever the status.
    for request in [
        &b"HEAD /metrics HTTP/2.0\r\nHost: x\r\n\r\n"[..],
        b"HEAD /metrics HTTP/1.1\r\n\r\n",
        b"HEAD /nowhere HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let text = response(request);
        assert!(text.starts_with("HTTP/1.1 "), "{text:?}");
        assert!(text.ends_with("\r\n\r\n"), "HEAD got a body: {text:?}");
    }
}

#[test]
fn malformed_requests_to_the_metrics_port_get_400_or_431() {
    use std::io::Read;
    let server = Server::start(&["--metrics", "127.0.0.1:0"]);
    let addr = server.metrics.unwrap();
    let status_of = |request: &[u8]| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
        s.write_all(request).unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text.lines().next().unwrap_or("").to_owned()
    };
    // RFC 9112 3.2: HTTP/1.1 needs Host.
    assert_eq!(
        status_of(b"GET /metrics HTTP/1.1\r\n\r\n"),
        "HTTP/1.1 400 Bad Request"
    );
    assert_eq!(
        status_of(b"\x16\x03\x01\x02\x00 binary\r\n\r\n"),
        "HTTP/1.1 400 Bad Request"
    );
    assert_eq!(
        status_of(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        "HTTP/1.1 400 Bad Request"
    );
    let long = format!("GET /metrics?{} HTTP/1.1\r\n", "a".repeat(9000));
    assert_eq!(
        status_of(long.as_bytes()),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    // Empty lines before the request line are passed over (RFC 9112 2.2), but count toward
    // the head's cap: line ends without end are not read for the whole deadline.
    assert_eq!(
        status_of(b"\r\n\r\nGET /healthz HTTP/1.0\r\n\r\n"),
        "HTTP/1.1 200 OK"
    );
    let blank_lines = format!("{}GET /healthz HTTP/1.0\r\n\r\n", "\r\n".repeat(5000));
    assert_eq!(
        status_of(blank_lines.as_bytes()),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    // HTTP/1.0 needs no Host.
    assert_eq!(
        status_of(b"GET /healthz HTTP/1.0\r\n\r\n"),
        "HTTP/1.1 200 OK"
    );
    assert_eq!(
        status_of(b"GET /metrics HTTP/9.9\r\nHost: x\r\n\r\n"),
        "HTTP/1.1 505 HTTP Version Not Supported"
    );
    assert_eq!(
        status_of(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"),
        "HTTP/1.1 404 Not Found"
    );
    // RFC 9112 3.2.2: the absolute form is taken; 3.2.4: the asterisk form is OPTIONS'.
    assert_eq!(
        status_of(b"GET http://x:9/healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
        "HTTP/1.1 200 OK"
    );
    assert_eq!(
        status_of(b"GET HTTP://X/nope?a=1 HTTP/1.1\r\nHost: x\r\n\r\n"),
        "HTTP/1.1 404 Not Found"
    );
    assert_eq!(
        status_of(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n"),
        "HTTP/1.1 405 Method Not Allowed"
    );
    assert_eq!(
        status_of(b"GET * HTTP/1.1\r\nHost: x\r\n\r\n"),
        "HTTP/1.1 400 Bad Request"
    );
    // RFC 9112 3.2: more than one Host is a bad request too.
    assert_eq!(
        status_of(b"GET /healthz HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n"),
        "HTTP/1.1 400 Bad Request"
    );
    // RFC 9112 6.3: a Content-Length that is not one number frames the body wrongly, and so
    // does one beside a Transfer-Encoding (6.1), a Transfer-Encoding not ending in chunked, or
    // one in HTTP/1.0: a 400, not an answer to what might be two requests.
    for framing in [
        "Content-Length: 5\r\nContent-Length: 6",
        "Content-Length: 5, 6",
        "Content-Length: -1",
        "Content-Length: 0x10",
        "Content-Length:",
        "Content-Length: 5\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding: gzip",
        "Transfer-Encoding: chunked, gzip",
    ] {
        let request = format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n");
        assert_eq!(
            status_of(request.as_bytes()),
            "HTTP/1.1 400 Bad Request",
            "{framing}"
        );
    }
    assert_eq!(
        status_of(b"GET /healthz HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
        "HTTP/1.1 400 Bad Request"
    );
    // One length, given twice alike, and a chunked body are framed well (the body is not
    // read, and the connection closes after the answer).
    for framing in [
        "Content-Length: 0",
        "Content-Length: 0\r\nContent-Length: 0",
        "Content-Length: 0, 0",
        "Transfer-Encoding: gzip\r\nTransfer-Encoding: Chunked",
    ] {
        let request = format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n");
        assert_eq!(
            status_of(request.as_bytes()),
            "HTTP/1.1 200 OK",
            "{framing}"
        );
    }
    // Lines ended by a bare LF (RFC 9112 2.2), and a request line without a version, are
    // answered at once, not left to time out.
    let started = std::time::Instant::now();
    assert_eq!(
        status_of(b"GET /healthz HTTP/1.1\nHost: x\n\n"),
        "HTTP/1.1 200 OK"
    );
    // HTTP/0.9: the body alone.
    assert_eq!(status_of(b"GET /healthz\r\n"), "ok");
    assert_eq!(status_of(b"HEAD /healthz\r\n"), "");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_431_is_not_lost_to_a_reset_while_the_client_is_still_sending() {
    use std::io::Read;
    let server = Server::start(&["--metrics", "127.0.0.1:0"]);
    let mut s = TcpStream::connect(server.metrics.unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    // A head far past 8 KiB, all written before anything is read: the server answers at
    // 8 KiB with the rest still unread on its side.
    let long = format!("GET /metrics?{} HTTP/1.1\r\n", "a".repeat(60_000));
    s.write_all(long.as_bytes()).unwrap();
    let mut text = String::new();
    let read = s.read_to_string(&mut text);
    assert!(read.is_ok(), "{read:?} after {text:?}");
    assert!(
        text.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{text:?}"
    );
}

#[test]
fn connections_closed_before_a_request_leave_nothing_open() {
    let server = Server::start(&["--metrics", "127.0.0.1:0"]);
    let addr = server.metrics.unwrap();
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", server.child.id()))
            .unwrap()
            .count()
    };
    let before = fds();
    // Probes that connect and hang up, as TCP health checks do.
    for _ in 0..100 {
        drop(TcpStream::connect(addr).unwrap());
    }
    // Accepted one after another: once a scrape is answered, every probe was taken.
    let (status, _) = server.http_get("/healthz");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while fds() > before + 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} descriptors left open",
            fds() - before
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A connection the client resets at once (SO_LINGER 0) may be gone before its session
/// begins; it was accepted all the same, and counted.
#[test]
fn connections_reset_at_once_are_counted() {
    let server = Server::start(&["--cores", "1", "--metrics", "127.0.0.1:0"]);
    let n = 200;
    for _ in 0..n {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_linger(Some(Duration::ZERO)).unwrap();
        s.connect(&server.smtp.into()).unwrap();
        drop(s);
    }
    let want = format!("postern_connections_total {n}\n");
    let text = server.metrics_until(|m| m.contains(&want));
    assert!(text.contains(&want), "{text}");
}

/// Runs `promtool check rules` on `path`; fails the test with its output otherwise.
fn promtool_checks_rules(path: &std::path::Path) {
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(path)
        .output()
        .expect("promtool is needed (.ci/run installs the prometheus package)");
    assert!(
        out.status.success(),
        "promtool check rules {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_deployed_alerts_and_dashboard_ask_only_for_metrics_the_server_exports() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
    let alerts = root.join("prometheus-alerts.yml");
    let dashboard = std::fs::read_to_string(root.join("grafana-dashboard.json")).unwrap();
    // The alert rules are valid as Prometheus reads them.
    promtool_checks_rules(&alerts);
    // So is every query of the dashboard, checked as a recording rule.
    let dash: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut queries = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let expr = expr.replace("$__rate_interval", "5m");
            rules += &format!(
                "      - record: dashboard:query_{queries}\n        expr: {}\n",
                serde_json::Value::String(expr)
            );
            queries += 1;
        }
    }
    assert!(queries > 20, "{queries}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-rules.yml");
    std::fs::write(&file, rules).unwrap();
    promtool_checks_rules(&file);
    // Every metric they name is one the server exports (a renamed metric would leave a panel
    // or an alert silent).
    let server = Server::start(&["--metrics", "127.0.0.1:0"]);
    let text = server.metrics_until(|m| m.contains("postern_queue_depth"));
    // The series, and the families (a histogram's name, as its `# TYPE` line gives it).
    let exported: std::collections::HashSet<&str> = text
        .lines()
        .filter_map(|l| match l.strip_prefix("# TYPE ") {
            Some(family) => family.split(' ').next(),
            None if l.starts_with('#') => None,
            None => l.split(['{', ' ']).next(),
        })
        .collect();
    let named = |text: &str| -> Vec<String> {
        text.match_indices("postern_")
            .map(|(at, _)| {
                text[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect()
            })
            .collect()
    };
    let alerts = std::fs::read_to_string(&alerts).unwrap();
    let mut names = named(&alerts);
    names.extend(named(&dashboard));
    assert!(names.len() > 30, "{names:?}");
    for name in names {
        assert!(
            exported.contains(name.as_str()),
            "{name} is not exported:\n{text}"
        );
    }
}
