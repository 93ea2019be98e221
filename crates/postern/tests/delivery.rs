//! Store and forward, end to end: the real `postern` accepts mail over SMTP and delivers it to
//! real next hops on loopback (aiosmtpd, which nobody here wrote, and the project's own
//! postern-load sink), retries temporary failures, bounces permanent ones, and survives
//! SIGKILL without losing or needlessly repeating a delivery.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use common::Server;

/// One message as the aiosmtpd peer stored it.
#[derive(Debug, Clone)]
struct Stored {
    mail_from: String,
    /// The parameters of MAIL, as aiosmtpd parsed them (DSN ones aside).
    mail_options: Vec<String>,
    rcpt_tos: Vec<String>,
    /// DSN parameters of MAIL, and of each RCPT in order (a `--dsn` peer only).
    dsn_mail: Vec<String>,
    dsn_rcpts: Vec<Vec<String>>,
    message_id: String,
    data: Vec<u8>,
}

/// The aiosmtpd next hop (tests/peers/smtp_peer.py).
struct Peer {
    child: Child,
    _stdin: ChildStdin,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Peer {
    /// A peer on a free loopback port of its own choosing.
    fn start(extra: &[&str]) -> Peer {
        Self::start_on("127.0.0.1", 0, extra)
    }

    fn start_on(host: &str, port: u16, extra: &[&str]) -> Peer {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stored.jsonl");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/smtp_peer.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args(["--host", host, "--port", &port.to_string()])
            .arg("--log")
            .arg(&log)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 with aiosmtpd (scripts/test installs it)");
        let stdin = child.stdin.take().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let port = line
            .trim()
            .strip_prefix("ready ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the aiosmtpd peer did not start: {line:?}"));
        Peer {
            child,
            _stdin: stdin,
            port,
            log,
            _dir: dir,
        }
    }

    fn stored(&self) -> Vec<Stored> {
        let Ok(text) = std::fs::read_to_string(&self.log) else {
            return Vec::new();
        };
        text.lines()
            .filter(|l| l.ends_with('}'))
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                Stored {
                    mail_from: v["mail_from"].as_str().unwrap().to_owned(),
                    mail_options: strings(&v["mail_options"]),
                    rcpt_tos: v["rcpt_tos"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|r| r.as_str().unwrap().to_owned())
                        .collect(),
                    dsn_mail: strings(&v["dsn_mail"]),
                    dsn_rcpts: v["dsn_rcpts"]
                        .as_array()
                        .map(|a| a.iter().map(strings).collect())
                        .unwrap_or_default(),
                    message_id: v["message_id"].as_str().unwrap().to_owned(),
                    data: base64_decode(v["data"].as_str().unwrap()),
                }
            })
            .collect()
    }

    /// Waits (bounded) until `pred` holds for what the peer stored.
    fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&[Stored]) -> bool,
    ) -> Vec<Stored> {
        let deadline = Instant::now() + limit;
        loop {
            let stored = self.stored();
            if pred(&stored) {
                return stored;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; the peer has {stored:#?}"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Peer {
    /// Waits (bounded) for the first message to arrive and returns it with its text.
    fn first(&self, what: &str) -> (Stored, String) {
        let stored = self.wait_for(what, Duration::from_secs(20), |s| !s.is_empty());
        let first = stored[0].clone();
        let text = String::from_utf8_lossy(&first.data).into_owned();
        (first, text)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|x| x.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= u32::from(val(c)) << (18 - 6 * i);
        }
        for i in 0..chunk.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// A loopback port held by a socket that is bound but not listening: connections to it are
/// refused (a next hop that is down) and no other process can take it until it is dropped.
struct Reserved(
    /// Held only to keep the port.
    #[allow(dead_code)]
    socket2::Socket,
    u16,
);

fn reserve(host: &str, port: u16) -> Reserved {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let addr: std::net::SocketAddr = format!("{host}:{port}").parse().unwrap();
    s.bind(&addr.into()).unwrap();
    let port = s.local_addr().unwrap().as_socket().unwrap().port();
    Reserved(s, port)
}

/// A session greeted with EHLO client.test, and the EHLO reply.
fn hello(server: &Server) -> (common::Client, Vec<String>) {
    let mut c = server.connect();
    assert!(c.line().starts_with("220"));
    c.send(b"EHLO client.test\r\n");
    let ehlo = c.reply();
    (c, ehlo)
}

/// A server that delivers mail for dest.test and origin.test (the senders' domain, where
/// bounces go) to `peer`.
fn routed_to(peer: &Peer, extra: &[&str]) -> Server {
    let dest = format!("dest.test=127.0.0.1:{}", peer.port);
    let origin = format!("origin.test=127.0.0.1:{}", peer.port);
    let mut args = vec!["--route", dest.as_str(), "--route", origin.as_str()];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// Sends one message with the given envelope; returns the queue ID.
fn send(server: &Server, from: &str, rcpts: &[&str], message_id: &str, body: &str) -> String {
    let (mut c, _) = hello(server);
    assert!(c.cmd(&format!("MAIL FROM:<{from}>")).starts_with("250"));
    for r in rcpts {
        assert!(c.cmd(&format!("RCPT TO:<{r}>")).starts_with("250"));
    }
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(
        format!(
            "From: <{from}>\r\nTo: <{}>\r\nSubject: test\r\nMessage-ID: {message_id}\r\n\r\n{body}.\r\n",
            rcpts[0]
        )
        .as_bytes(),
    );
    let reply = c.line();
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    c.cmd("QUIT");
    common::queue_id(&reply)
}

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

const FAST_RETRY: [&str; 4] = ["--retry-initial", "200ms", "--retry-max", "400ms"];

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

/// postern-load's binary, built on demand when this package's tests run alone.
fn postern_load() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("postern-load");
    if !bin.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "postern-load"])
            .status()
            .unwrap();
        assert!(status.success());
    }
    bin
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
fn permanent_failure_bounces_to_the_sender_with_a_delivery_report() {
    // One peer is both the next hop of the recipients and the sender's domain's route.
    let peer = Peer::start(&["--reject-rcpt", "nobody"]);
    let server = routed_to(&peer, &[]);
    send(
        &server,
        "alice@origin.test",
        &["nobody@dest.test", "bob@dest.test"],
        "<orig@t>",
        "the original body\r\n",
    );
    let stored = peer.wait_for(
        "the delivery and the bounce",
        Duration::from_secs(20),
        |s| s.len() == 2,
    );
    let delivered = stored.iter().find(|s| s.message_id == "<orig@t>").unwrap();
    assert_eq!(delivered.rcpt_tos, ["bob@dest.test"]);
    let bounce = stored.iter().find(|s| s.message_id != "<orig@t>").unwrap();
    // aiosmtpd writes the null reverse path as "<>".
    assert_eq!(
        bounce.mail_from, "<>",
        "a bounce comes from the null reverse path"
    );
    assert_eq!(bounce.rcpt_tos, ["alice@origin.test"]);
    let text = String::from_utf8_lossy(&bounce.data);
    assert!(text.contains("multipart/report"), "{text}");
    assert!(
        text.contains("report-type=delivery-status")
            || text.contains("report-type=\"delivery-status\""),
        "{text}"
    );
    assert!(
        text.contains("Final-Recipient: rfc822; nobody@dest.test"),
        "{text}"
    );
    assert!(text.contains("Action: failed"), "{text}");
    assert!(text.contains("Status: 5.1.1"), "{text}");
    assert!(text.contains("no such user here"), "{text}");
    assert!(
        text.contains("Message-ID: <orig@t>"),
        "the original headers come back: {text}"
    );
    assert!(
        !text.contains("Final-Recipient: rfc822; bob@dest.test"),
        "{text}"
    );
}

#[test]
fn a_recipient_refused_for_good_stays_refused_when_the_next_hop_then_goes_away() {
    // RCPT: 550 for the first recipient, then 421 and a close at the second. The 550 was an
    // answer (RFC 5321 4.2.1): that recipient is bounced at once with it, not deferred with
    // the 421 and asked again on every retry; the other waits for its retry.
    let peer = Peer::start(&["--reject-rcpt", "nobody", "--close-rcpt", "gone"]);
    let server = routed_to(&peer, &["--retry-initial", "60s"]);
    send(
        &server,
        "alice@origin.test",
        &["nobody@dest.test", "gone@dest.test"],
        "<refused@t>",
        "body\r\n",
    );
    let stored = peer.wait_for("the bounce", Duration::from_secs(20), |s| !s.is_empty());
    let bounce = &stored[0];
    assert_eq!(bounce.mail_from, "<>");
    assert_eq!(bounce.rcpt_tos, ["alice@origin.test"]);
    let text = String::from_utf8_lossy(&bounce.data);
    assert!(
        text.contains("Final-Recipient: rfc822; nobody@dest.test"),
        "{text}"
    );
    assert!(text.contains("Status: 5.1.1"), "{text}");
    assert!(text.contains("no such user here"), "{text}");
    assert!(
        !text.contains("Final-Recipient: rfc822; gone@dest.test"),
        "the recipient put off waits for its retry: {text}"
    );
}

#[test]
fn dsn_parameters_go_on_where_the_next_hop_offers_dsn_and_success_is_reported_where_not() {
    // RFC 3461: a next hop with DSN gets RET, ENVID, NOTIFY and ORCPT as they came in; a next
    // hop without DSN gets none of them (aiosmtpd would refuse them), and a recipient that
    // asked for NOTIFY=SUCCESS there gets a "relayed" report from postern.
    let with_dsn = Peer::start(&["--dsn"]);
    let plain = Peer::start(&[]);
    let server = Server::start(&[
        "--route",
        &format!("dsn.test=127.0.0.1:{}", with_dsn.port),
        "--route",
        &format!("plain.test=127.0.0.1:{}", plain.port),
        "--route",
        &format!("origin.test=127.0.0.1:{}", plain.port),
    ]);
    let (mut c, ehlo) = hello(&server);
    assert!(ehlo.iter().any(|l| l == "250-DSN" || l == "250 DSN"));
    for cmd in [
        "MAIL FROM:<alice@origin.test> RET=HDRS ENVID=env+2B1",
        "RCPT TO:<a@dsn.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;first@dsn.test",
        "RCPT TO:<b@dsn.test>",
        "RCPT TO:<c@plain.test> NOTIFY=SUCCESS ORCPT=rfc822;orig-c@plain.test",
        "RCPT TO:<d@plain.test> NOTIFY=FAILURE",
    ] {
        let r = c.cmd(cmd);
        assert!(r.starts_with("250"), "{cmd}: {r}");
    }
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: dsn\r\nMessage-ID: <dsn@t>\r\n\r\nbody\r\n.\r\n");
    assert!(c.line().starts_with("250 2.0.0"));
    c.cmd("QUIT");

    let (got, _) = with_dsn.first("the message at the DSN next hop");
    assert_eq!(got.rcpt_tos, ["a@dsn.test", "b@dsn.test"]);
    assert_eq!(got.dsn_mail, ["RET=HDRS", "ENVID=env+2B1"]);
    assert_eq!(
        got.dsn_rcpts,
        [
            vec![
                "NOTIFY=SUCCESS,FAILURE".to_owned(),
                "ORCPT=rfc822;first@dsn.test".to_owned()
            ],
            vec![]
        ]
    );
    let stored = plain.wait_for(
        "the message and the success report",
        Duration::from_secs(20),
        |s| s.len() == 2,
    );
    let msg = stored.iter().find(|s| s.message_id == "<dsn@t>").unwrap();
    assert_eq!(msg.rcpt_tos, ["c@plain.test", "d@plain.test"]);
    let report = stored.iter().find(|s| s.message_id != "<dsn@t>").unwrap();
    assert_eq!(report.mail_from, "<>");
    assert_eq!(report.rcpt_tos, ["alice@origin.test"]);
    let text = String::from_utf8_lossy(&report.data);
    assert!(text.contains("report-type"), "{text}");
    // The report carries the values, decoded from xtext (RFC 3461 4.4).
    assert!(text.contains("Original-Envelope-Id: env+1\r\n"), "{text}");
    assert!(
        text.contains("Final-Recipient: rfc822; c@plain.test"),
        "{text}"
    );
    assert!(
        text.contains("Original-Recipient: rfc822;orig-c@plain.test"),
        "{text}"
    );
    assert!(text.contains("Action: relayed"), "{text}");
    assert!(text.contains("Status: 2.0.0"), "{text}");
    // Only c asked for success and went where no report would come from.
    for other in ["a@dsn.test", "b@dsn.test", "d@plain.test"] {
        assert!(
            !text.contains(&format!("rfc822; {other}")),
            "{other}: {text}"
        );
    }
}

/// Sends one message with MAIL and RCPT commands as given (each must get 250).
fn send_commands(server: &Server, commands: &[&str], message_id: &str) -> String {
    let (mut c, _) = hello(server);
    for cmd in commands {
        let r = c.cmd(cmd);
        assert!(r.starts_with("250"), "{cmd}: {r}");
    }
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(format!("Subject: t\r\nMessage-ID: {message_id}\r\n\r\nbody\r\n.\r\n").as_bytes());
    let reply = c.line();
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    c.cmd("QUIT");
    common::queue_id(&reply)
}

#[test]
fn a_failure_nobody_is_told_of_beside_a_deferral_is_recorded_and_delivery_goes_on() {
    // One recipient refused for good with no report due (NOTIFY=NEVER; the null sender),
    // another deferred: the failure is settled at once, with no report, while the deferred
    // one waits for its retry. One core, so that a core that failed would stop the server.
    let refusing = Peer::start(&["--reject-rcpt", "nobody"]);
    let deferring = Peer::start(&["--tempfail-first", "1000"]);
    let to_dest = format!("dest.test=127.0.0.1:{}", refusing.port);
    let to_later = format!("later.test=127.0.0.1:{}", deferring.port);
    let to_origin = format!("origin.test=127.0.0.1:{}", refusing.port);
    let server = Server::start(&[
        "--cores", "1", "--route", &to_dest, "--route", &to_later, "--route", &to_origin,
    ]);
    for (from, notify, id) in [
        ("a@origin.test", " NOTIFY=NEVER", "<never@t>"),
        ("", "", "<null@t>"),
    ] {
        let queue_id = send_commands(
            &server,
            &[
                &format!("MAIL FROM:<{from}>"),
                &format!("RCPT TO:<nobody@dest.test>{notify}"),
                "RCPT TO:<b@later.test>",
            ],
            id,
        );
        server.log_until(|l| l.contains(&queue_id) && l.contains("nobody@dest.test"));
        server.log_until(|l| l.contains(&queue_id) && l.contains("b@later.test"));
    }
    // The server still delivers.
    send(
        &server,
        "a@origin.test",
        &["ok@dest.test"],
        "<after@t>",
        "x\r\n",
    );
    let stored = refusing.wait_for("the next message", Duration::from_secs(20), |s| {
        s.iter().any(|m| m.message_id == "<after@t>")
    });
    assert_eq!(stored.len(), 1, "no report for either failure: {stored:?}");
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
fn eight_bit_content_never_goes_to_a_next_hop_without_8bitmime() {
    // RFC 6152 3: the 8-bit message fails with 5.6.3 and is bounced (the report itself is
    // ASCII, as its text and headers are); a message declared 8BITMIME that is plain ASCII
    // is delivered.
    let peer = Peer::start(&["--no-8bitmime"]);
    let server = routed_to(&peer, &[]);
    send_commands(
        &server,
        &[
            "MAIL FROM:<alice@origin.test> BODY=8BITMIME",
            "RCPT TO:<bob@dest.test>",
        ],
        "<ascii@t>",
    );
    let (mut c, _) = hello(&server);
    assert!(c
        .cmd("MAIL FROM:<alice@origin.test> BODY=8BITMIME")
        .starts_with("250"));
    assert!(c.cmd("RCPT TO:<carol@dest.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send("Subject: t\r\nMessage-ID: <eight@t>\r\n\r\nGr\u{fc}\u{df}e\r\n.\r\n".as_bytes());
    assert!(c.line().starts_with("250 2.0.0"));
    c.cmd("QUIT");
    let stored = peer.wait_for(
        "the ASCII message and the bounce",
        Duration::from_secs(20),
        |s| s.len() == 2,
    );
    assert!(
        stored.iter().all(|m| m.message_id != "<eight@t>"),
        "{stored:?}"
    );
    let ascii = stored.iter().find(|m| m.message_id == "<ascii@t>").unwrap();
    assert_eq!(ascii.rcpt_tos, ["bob@dest.test"]);
    let bounce = stored.iter().find(|m| m.message_id != "<ascii@t>").unwrap();
    let text = String::from_utf8_lossy(&bounce.data);
    assert!(
        text.contains("Final-Recipient: rfc822; carol@dest.test"),
        "{text}"
    );
    assert!(text.contains("Status: 5.6.3"), "{text}");
    assert!(bounce.data.iter().all(|&b| b < 0x80), "{text}");
}

#[test]
fn a_success_report_does_not_wait_for_the_rest_of_the_message() {
    // c@plain.test asked for success and is relayed to a next hop without DSN; x@down.test
    // stays deferred (nothing listens there). The relayed report comes at once: held until
    // the whole message settled, a restart in between (which cannot tell which recorded
    // deliveries were relayed) would lose it.
    let plain = Peer::start(&[]);
    let down = reserve("127.0.0.1", 0);
    let server = Server::start(&[
        "--route",
        &format!("plain.test=127.0.0.1:{}", plain.port),
        "--route",
        &format!("origin.test=127.0.0.1:{}", plain.port),
        "--route",
        &format!("down.test=127.0.0.1:{}", down.1),
    ]);
    send_commands(
        &server,
        &[
            "MAIL FROM:<alice@origin.test>",
            "RCPT TO:<c@plain.test> NOTIFY=SUCCESS",
            "RCPT TO:<x@down.test>",
        ],
        "<partial@t>",
    );
    let stored = plain.wait_for(
        "the message and the success report",
        Duration::from_secs(20),
        |s| s.len() == 2,
    );
    let report = stored
        .iter()
        .find(|s| s.message_id != "<partial@t>")
        .unwrap();
    assert_eq!(report.mail_from, "<>");
    let text = String::from_utf8_lossy(&report.data);
    assert!(text.contains("Action: relayed"), "{text}");
    assert!(
        text.contains("Final-Recipient: rfc822; c@plain.test"),
        "{text}"
    );
    assert!(!text.contains("x@down.test"), "{text}");
}

/// The text of the one report (from the null sender) among `stored`.
fn bounce_text(stored: &[Stored]) -> String {
    let bounce = stored
        .iter()
        .find(|m| m.mail_from.is_empty() || m.mail_from == "<>")
        .expect("the bounce");
    String::from_utf8_lossy(&bounce.data).into_owned()
}

#[test]
fn eight_bit_content_is_announced_and_utf8_header_fields_need_smtputf8() {
    // A next hop with 8BITMIME and without SMTPUTF8.
    let peer = Peer::start(&["--no-smtputf8"]);
    let server = routed_to(&peer, &[]);
    let send_raw = |helo: &str, mail: &str, message: &str| {
        let mut c = server.connect();
        c.line();
        c.send(format!("EHLO {helo}\r\n").as_bytes());
        c.reply();
        assert!(c.cmd(mail).starts_with("250"), "{mail}");
        assert!(c.cmd("RCPT TO:<bob@dest.test>").starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        c.send(format!("{message}.\r\n").as_bytes());
        assert!(c.line().starts_with("250 2.0.0"));
        c.cmd("QUIT");
    };
    // 8-bit content sent without BODY=8BITMIME: it goes on with BODY=8BITMIME (RFC 6152 3).
    send_raw(
        "c.test",
        "MAIL FROM:<alice@origin.test>",
        "Message-ID: <undeclared@t>\r\n\r\nGr\u{fc}\u{df}e\r\n",
    );
    // SMTPUTF8, ASCII addresses, a UTF-8 header field: an internationalized message, which
    // cannot go to this next hop (RFC 6531 3.2): bounced with 5.6.7.
    send_raw(
        "c.test",
        "MAIL FROM:<alice@origin.test> SMTPUTF8",
        "Message-ID: <intl@t>\r\nSubject: Gr\u{fc}\u{df}e\r\n\r\nx\r\n",
    );
    // SMTPUTF8 and a UTF-8 EHLO name, but an ASCII message: delivered without SMTPUTF8,
    // and the Received field names the client by A-labels.
    send_raw(
        "b\u{fc}cher.test",
        "MAIL FROM:<alice@origin.test> SMTPUTF8",
        "Message-ID: <plain@t>\r\n\r\nx\r\n",
    );
    let stored = peer.wait_for("two messages and a bounce", Duration::from_secs(20), |s| {
        s.len() == 3
    });
    let by_id = |id: &str| stored.iter().find(|m| m.message_id == id);
    let undeclared = by_id("<undeclared@t>").expect("the undeclared 8-bit message");
    assert!(
        undeclared.mail_options.iter().any(|o| o == "BODY=8BITMIME"),
        "{:?}",
        undeclared.mail_options
    );
    assert!(by_id("<intl@t>").is_none(), "{stored:?}");
    let plain = by_id("<plain@t>").expect("the ASCII message");
    assert!(
        plain.data.is_ascii(),
        "{}",
        String::from_utf8_lossy(&plain.data)
    );
    assert!(String::from_utf8_lossy(&plain.data).contains("from xn--bcher-kva.test ("));
    let text = bounce_text(&stored);
    assert!(text.contains("Status: 5.6.7"), "{text}");
    assert!(text.contains("<intl@t>"), "{text}");
}

#[test]
fn a_mailbox_given_with_u_labels_and_a_labels_goes_in_its_ascii_form() {
    // One mailbox, given first with U-labels and then with A-labels: one recipient, kept in
    // the form a next hop without SMTPUTF8 can take (RFC 6531 3.2), whichever came first.
    let peer = Peer::start(&["--no-smtputf8"]);
    let route = format!("xn--bcher-kva.test=127.0.0.1:{}", peer.port);
    let server = Server::start(&["--route", &route]);
    let mut c = server.connect();
    c.line();
    c.send(b"EHLO c.test\r\n");
    c.reply();
    assert!(c
        .cmd("MAIL FROM:<alice@origin.test> SMTPUTF8")
        .starts_with("250"));
    assert!(c.cmd("RCPT TO:<u@b\u{fc}cher.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<u@xn--bcher-kva.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Message-ID: <labels@t>\r\nSubject: hi\r\n\r\nx\r\n.\r\n");
    assert!(c.line().starts_with("250 2.0.0"));
    c.cmd("QUIT");
    let (got, _) = peer.first("the message");
    assert_eq!(got.message_id, "<labels@t>");
    assert_eq!(got.rcpt_tos, ["u@xn--bcher-kva.test"]);
}

#[test]
fn only_the_utf8_recipients_fail_at_a_next_hop_without_smtputf8() {
    // A next hop without SMTPUTF8; an ASCII sender and header section, one ASCII and one
    // UTF-8 recipient there: the ASCII one gets the message (without SMTPUTF8), the UTF-8
    // one is bounced with 5.6.7 (RFC 6531 3.2).
    let peer = Peer::start(&["--no-smtputf8"]);
    let server = routed_to(&peer, &[]);
    let mut c = server.connect();
    c.line();
    c.send(b"EHLO c.test\r\n");
    c.reply();
    assert!(c
        .cmd("MAIL FROM:<alice@origin.test> SMTPUTF8")
        .starts_with("250"));
    assert!(c.cmd("RCPT TO:<bob@dest.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<j\u{f6}rg@dest.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Message-ID: <split@t>\r\nSubject: hi\r\n\r\nx\r\n.\r\n");
    assert!(c.line().starts_with("250 2.0.0"));
    c.cmd("QUIT");
    let stored = peer.wait_for("the message and a bounce", Duration::from_secs(20), |s| {
        s.len() == 2
    });
    let got = stored
        .iter()
        .find(|m| m.message_id == "<split@t>")
        .expect("the message for the ASCII recipient");
    assert_eq!(got.rcpt_tos, ["bob@dest.test"]);
    assert!(
        !got.mail_options.iter().any(|o| o == "SMTPUTF8"),
        "{:?}",
        got.mail_options
    );
    let text = bounce_text(&stored);
    assert!(text.contains("Status: 5.6.7"), "{text}");
    assert!(text.contains("rg@dest.test"), "{text}");
    assert!(!text.contains("bob@dest.test"), "{text}");
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
fn a_mailbox_given_twice_keeps_every_report_either_rcpt_asked_for() {
    // As after a list expanded upstream: the same mailbox twice, the second time with a
    // failure report asked for and the list as its original recipient.
    let peer = Peer::start(&["--reject-rcpt", "nobody"]);
    let server = routed_to(&peer, &[]);
    send_commands(
        &server,
        &[
            "MAIL FROM:<a@origin.test>",
            "RCPT TO:<nobody@dest.test> NOTIFY=NEVER",
            "RCPT TO:<nobody@Dest.test> NOTIFY=FAILURE ORCPT=rfc822;list@lists.test",
        ],
        "<twice@t>",
    );
    let (bounce, text) = peer.first("the failure report the second RCPT asked for");
    assert_eq!(bounce.mail_from, "<>");
    assert!(
        text.contains("Final-Recipient: rfc822; nobody@dest.test"),
        "{text}"
    );
    assert!(
        text.contains("Original-Recipient: rfc822;list@lists.test"),
        "{text}"
    );
    assert_eq!(
        text.matches("Final-Recipient:").count(),
        1,
        "still one recipient: {text}"
    );
}

/// A next hop for dest.test that refuses `nobody`, the sender's own next hop for origin.test
/// (an aiosmtpd peer with `origin_flags`), and a server routing to both.
fn refusing_next_hop_and_sender_s(origin_flags: &[&str]) -> (Peer, Peer, Server) {
    let dest = Peer::start(&["--reject-rcpt", "nobody"]);
    let origin = Peer::start(origin_flags);
    let to_dest = format!("dest.test=127.0.0.1:{}", dest.port);
    let to_origin = format!("origin.test=127.0.0.1:{}", origin.port);
    let server = Server::start(&["--route", &to_dest, "--route", &to_origin]);
    (dest, origin, server)
}

/// Sends a message from alice@origin.test with RET=FULL to nobody@dest.test (whom the next
/// hop refuses), its body `lines` lines of 18 octets.
fn send_ret_full(server: &Server, message_id: &str, lines: usize) {
    let (mut c, _) = hello(server);
    assert!(c
        .cmd("MAIL FROM:<alice@origin.test> RET=FULL")
        .starts_with("250"));
    assert!(c.cmd("RCPT TO:<nobody@dest.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    let body = "0123456789abcdef\r\n".repeat(lines);
    c.send(format!("Subject: big\r\nMessage-ID: {message_id}\r\n\r\n{body}.\r\n").as_bytes());
    assert!(c.line().starts_with("250 2.0.0"));
}

#[test]
fn a_whole_message_report_too_large_for_the_sender_s_server_goes_with_the_headers() {
    // RET=FULL, and the sender's server takes 3,000 octets at most (SIZE): the report returns
    // the header section instead, rather than reaching nobody.
    let (_dest, origin, server) = refusing_next_hop_and_sender_s(&["--size-limit", "3000"]);
    send_ret_full(&server, "<big@t>", 300);
    let (bounce, text) = origin.first("the report");
    assert_eq!(bounce.rcpt_tos, ["alice@origin.test"]);
    assert!(bounce.data.len() <= 3000, "{}", bounce.data.len());
    assert!(text.contains("does not take mail this large"), "{text}");
    assert!(text.contains("Message-ID: <big@t>"), "{text}");
    assert!(
        text.contains("Final-Recipient: rfc822; nobody@dest.test"),
        "{text}"
    );
    assert!(!text.contains("0123456789abcdef"), "{text}");
}

#[test]
fn a_whole_message_report_over_the_returned_size_says_why_it_has_the_headers() {
    // RET=FULL for a message over the 128 KiB a report returns: the headers come back, and the
    // report's text tells the sender why it did not get what it asked for.
    let (_dest, origin, server) = refusing_next_hop_and_sender_s(&[]);
    send_ret_full(&server, "<huge@t>", 9000); // 162 KiB
    let (_, text) = origin.first("the report");
    assert!(text.contains("Message-ID: <huge@t>"), "{text}");
    assert!(!text.contains("0123456789abcdef"), "{text}");
    // The text part is quoted-printable: without its soft line breaks, on one line.
    let text = text.replace("=\r\n", "");
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        text.contains("could not come back: it is larger than 128 KiB"),
        "{text}"
    );
}

/// A next hop (PIPELINING, CHUNKING) that answers the first message's BDAT with a reply too
/// many, once `go` says so, and refuses every later message with 554. Returns its port and
/// how many BDAT commands it has seen.
fn next_hop_with_a_reply_too_many(
    go: std::sync::mpsc::Receiver<()>,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let seen = std::sync::Arc::new(AtomicUsize::new(0));
    let bdats = seen.clone();
    let (port, _) = batch_next_hop("", move |n| {
        bdats.fetch_add(1, Ordering::SeqCst);
        if n == 0 {
            // Both messages are queued by now: the second waits for this connection.
            go.recv().unwrap();
            Some(b"250 2.0.0 queued\r\n250 2.0.0 a reply nobody asked for\r\n")
        } else {
            Some(b"554 5.7.1 message refused\r\n")
        }
    });
    (port, seen)
}

#[test]
fn a_reply_too_many_between_transactions_does_not_shift_the_next_one_s_replies() {
    // Left unread, the extra reply would answer the next transaction's RSET, RSET's its MAIL,
    // and so on: the refusal of the second message would be taken for RCPT's, and the reply
    // to RCPT for the message's. The second message must be bounced, not counted delivered.
    let (go, wait) = std::sync::mpsc::channel();
    let (port, bdats) = next_hop_with_a_reply_too_many(wait);
    two_messages_the_second_bounced(port, || go.send(()).unwrap());
    assert_eq!(bdats.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// Sends two messages through one connection to the next hop on `port` (retries 300 ms
/// apart), calls `then`, and checks that the second one, which the next hop refuses with
/// `554 5.7.1 message refused`, is bounced to its sender.
fn two_messages_the_second_bounced(port: u16, then: impl FnOnce()) {
    let origin = Peer::start(&[]);
    let to_dest = format!("dest.test=127.0.0.1:{port}");
    let to_origin = format!("origin.test=127.0.0.1:{}", origin.port);
    let server = Server::start(&[
        "--route",
        &to_dest,
        "--route",
        &to_origin,
        "--max-connections-per-destination",
        "1",
        "--retry-initial",
        "300ms",
        "--retry-max",
        "300ms",
        "--cores",
        "1",
    ]);
    for id in ["<first@t>", "<second@t>"] {
        send(&server, "a@origin.test", &["b@dest.test"], id, "x\r\n");
    }
    then();
    let (bounce, text) = origin.first("the second message's bounce");
    assert_eq!(bounce.mail_from, "<>");
    assert!(text.contains("554 5.7.1 message refused"), "{text}");
    assert!(text.contains("<second@t>"), "{text}");
}

/// A next hop (PIPELINING, CHUNKING) that answers each group of commands in one write, as
/// pipelining servers do, takes the first message, and slips a reply too many in front of the
/// next group's replies, whose BDAT it refuses (as every later one). Returns its port.
fn next_hop_with_a_late_reply_too_many() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut messages = 0;
        for stream in listener.incoming().take(4) {
            let Ok(mut stream) = stream else { return };
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut out = b"220 hop.test ESMTP\r\n".to_vec();
            'session: loop {
                if !out.is_empty() && stream.write_all(&std::mem::take(&mut out)).is_err() {
                    break;
                }
                // The replies to a group go out together, after its last command.
                let mut flush = false;
                while !flush {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break 'session;
                    }
                    let verb = line
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_ascii_uppercase();
                    match verb.as_str() {
                        "EHLO" => {
                            out.extend_from_slice(
                                b"250-hop.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n",
                            );
                            flush = true;
                        }
                        "RSET" if messages == 1 => {
                            out.extend_from_slice(b"250 2.0.0 a reply nobody asked for\r\n");
                            out.extend_from_slice(b"250 2.0.0 ok\r\n");
                        }
                        "BDAT" => {
                            let n: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
                            let mut body = vec![0u8; n];
                            reader.read_exact(&mut body).unwrap();
                            messages += 1;
                            out.extend_from_slice(if messages == 1 {
                                b"250 2.0.0 queued\r\n".as_slice()
                            } else {
                                b"554 5.7.1 message refused\r\n".as_slice()
                            });
                            flush = true;
                        }
                        "QUIT" => {
                            let _ = stream.write_all(b"221 2.0.0 bye\r\n");
                            break 'session;
                        }
                        _ => out.extend_from_slice(b"250 2.0.0 ok\r\n"),
                    }
                }
            }
        }
    });
    port
}

#[test]
fn a_reply_too_many_within_the_next_group_leaves_its_outcome_unknown_not_delivered() {
    // The reply too many comes only once the next group is written: RSET takes it, MAIL takes
    // RSET's reply, RCPT MAIL's and BDAT RCPT's, and the refusal is left over. Seen after the
    // last reply, it makes the outcome unknown: the message is tried again, and bounced.
    two_messages_the_second_bounced(next_hop_with_a_late_reply_too_many(), || ());
}

/// The Message-IDs a next hop took.
type Taken = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// A next hop offering PIPELINING, CHUNKING and `extensions` (EHLO lines, each ending in CR
/// LF), answering each command as it comes. Each body (`BDAT n LAST`) gets what `answer`
/// says for it, given how many bodies came before; `None` is no answer at all. A message
/// answered 250 is taken: its Message-ID is recorded.
fn batch_next_hop(
    extensions: &'static str,
    answer: impl Fn(usize) -> Option<&'static [u8]> + Send + 'static,
) -> (u16, Taken) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let taken = Taken::default();
    let record = taken.clone();
    std::thread::spawn(move || {
        let mut bodies = 0;
        let ehlo = format!("250-hop.test\r\n250-PIPELINING\r\n{extensions}250 CHUNKING\r\n");
        for stream in listener.incoming().take(8) {
            let Ok(mut stream) = stream else { return };
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let _ = stream.write_all(b"220 hop.test ESMTP\r\n");
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let verb = line
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_ascii_uppercase();
                let reply: &[u8] = match verb.as_str() {
                    "EHLO" => ehlo.as_bytes(),
                    "BDAT" => {
                        let n: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
                        let mut body = vec![0u8; n];
                        reader.read_exact(&mut body).unwrap();
                        bodies += 1;
                        let Some(reply) = answer(bodies - 1) else {
                            continue;
                        };
                        if reply.starts_with(b"250") {
                            let text = String::from_utf8_lossy(&body).into_owned();
                            let id = text.lines().find_map(|l| l.strip_prefix("Message-ID: "));
                            record
                                .lock()
                                .unwrap()
                                .push(id.unwrap_or_default().to_owned());
                        }
                        reply
                    }
                    "QUIT" => {
                        let _ = stream.write_all(b"221 2.0.0 bye\r\n");
                        break;
                    }
                    _ => b"250 2.0.0 ok\r\n",
                };
                if stream.write_all(reply).is_err() {
                    break;
                }
            }
        }
    });
    (port, taken)
}

/// Messages (Message-ID, body) queued while held (a server that routes nowhere holds), then
/// released together to the next hop on `port`, pipelined into one batch; with `extra` flags.
fn released_in_one_batch(port: u16, messages: &[(&str, &str)], extra: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let mut held = Server::start_in(&["--cores", "1"], spool.clone(), None);
    for (id, body) in messages {
        send(&held, "a@origin.test", &["b@dest.test"], id, body);
    }
    assert!(held.terminate().success());
    let route = format!("dest.test=127.0.0.1:{port}");
    let mut args = vec![
        "--route",
        &route,
        "--cores",
        "1",
        "--max-transactions-in-flight",
        "8",
        "--metrics",
        "127.0.0.1:0",
        "--retry-initial",
        "300ms",
        "--retry-max",
        "300ms",
    ];
    args.extend_from_slice(extra);
    // The spool's directory lives as long as the server that owns it.
    Server::start_in(&args, spool, Some(dir))
}

#[test]
fn a_batch_short_of_a_reply_leaves_every_outcome_in_it_unknown() {
    // Three messages pipelined into one another; the next hop never answers the second one's
    // data (nor takes it). Each later reply then answers the command before its own: the
    // third's RSET reply is taken for the second message's, and the batch runs out of time
    // on the last. None of its outcomes is known: the second message must be tried again and
    // taken, not counted delivered.
    let (port, taken) = batch_next_hop("", |n| (n != 1).then_some(b"250 2.0.0 queued\r\n"));
    let _server = released_in_one_batch(
        port,
        &[
            ("<b1@t>", "x\r\n"),
            ("<b2@t>", "x\r\n"),
            ("<b3@t>", "x\r\n"),
        ],
        &[
            "--smtp-mail-timeout",
            "1s",
            "--smtp-rcpt-timeout",
            "1s",
            "--smtp-data-done-timeout",
            "1s",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !taken.lock().unwrap().iter().any(|id| id == "<b2@t>") {
        assert!(
            Instant::now() < deadline,
            "the second message was never taken: {:?}",
            taken.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_batch_ending_in_a_message_over_the_next_hop_s_size_keeps_its_outcomes() {
    // Two messages released together in one batch; the second is over the next hop's SIZE and
    // refused before it is sent, leaving the RSET written for it awaited. Its reply, after the
    // first message's, is not a reply too many: the first message is delivered once.
    let (port, taken) = batch_next_hop("250-SIZE 2000\r\n", |_| Some(b"250 2.0.0 queued\r\n"));
    let big = ("y".repeat(76) + "\r\n").repeat(64);
    let mut server = released_in_one_batch(port, &[("<small@t>", "x\r\n"), ("<big@t>", &big)], &[]);
    // The big one fails for good (no one takes its bounce: its sender's domain goes nowhere).
    server.metrics_until(|m| m.contains("postern_recipients_failed_total 1\n"));
    server.metrics_until(|m| m.contains("postern_recipients_delivered_total 1\n"));
    let log = server.terminate_for_log();
    assert!(!log.contains("out of step"), "{log}");
    assert_eq!(*taken.lock().unwrap(), ["<small@t>"]);
}

#[test]
fn a_next_hop_that_never_ends_its_reply_is_timed_out_and_does_not_hold_the_core() {
    // The reply to MAIL is continuation lines without end, as fast as the socket takes them:
    // every read is ready at once, and only the deadline itself can end the wait.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hop = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        stream.write_all(b"220 hop.test ESMTP\r\n").unwrap();
        reader.read_line(&mut line).unwrap();
        stream.write_all(b"250 hop.test\r\n").unwrap();
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("MAIL"), "{line}");
        let flood = b"250-x\r\n".repeat(64 * 1024);
        let start = Instant::now();
        // Until postern gives up (the write fails), for 30 s at most.
        while start.elapsed() < Duration::from_secs(30) {
            if stream.write_all(&flood).is_err() {
                break;
            }
        }
        start.elapsed()
    });
    let route = format!("dest.test=127.0.0.1:{port}");
    // MAIL's reply is waited for as long as the longest of the envelope's timeouts.
    let server = Server::start(&[
        "--route",
        &route,
        "--smtp-mail-timeout",
        "1s",
        "--smtp-rcpt-timeout",
        "1s",
        "--smtp-data-init-timeout",
        "1s",
        "--cores",
        "1",
    ]);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<flood@t>",
        "x\r\n",
    );
    // Meanwhile the core still greets new clients.
    for _ in 0..3 {
        let start = Instant::now();
        let mut c = server.connect();
        assert!(c.line().starts_with("220 "));
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "a greeting took {:?} during the flood",
            start.elapsed()
        );
        c.cmd("QUIT");
    }
    let flooded = hop.join().unwrap();
    assert!(
        flooded < Duration::from_secs(10),
        "the reply went on for {flooded:?} with a 1 s timeout"
    );
}

#[test]
fn a_failed_bounce_is_dropped_not_bounced_again() {
    let peer = Peer::start(&["--reject-rcpt", "nobody"]);
    let route = format!("dest.test=127.0.0.1:{}", peer.port);
    let server = Server::start(&["--route", &route, "--metrics", "127.0.0.1:0"]);
    let mut c = greeted(&server);
    c.cmd("MAIL FROM:<>");
    c.cmd("RCPT TO:<nobody@dest.test>");
    c.cmd("DATA");
    c.send(b"Subject: a bounce\r\n\r\nbody\r\n.\r\n");
    assert!(c.line().starts_with("250"));
    let m = server.metrics_until(|m| m.contains("postern_recipients_failed_total 1\n"));
    assert!(m.contains("postern_recipients_failed_total 1\n"), "{m}");
    assert!(m.contains("postern_bounces_total 0\n"), "{m}");
    assert!(peer.stored().is_empty());
}

#[test]
fn recipients_failed_in_one_transaction_get_one_bounce() {
    // Several sessions, spread over both cores, each send messages to six recipients that the
    // next hop refuses: each message fails in one transaction, and its sender gets one report
    // naming all six, however the outcomes travel from the delivering core to the owner's.
    const SESSIONS: usize = 4;
    const EACH: usize = 40;
    const RCPTS: usize = 6;
    let peer = Peer::start(&["--reject-rcpt", "nobody"]);
    let mut server = routed_to(&peer, &["--metrics", "127.0.0.1:0"]);
    let addr = server.smtp;
    let senders: Vec<_> = (0..SESSIONS)
        .map(|s| {
            std::thread::spawn(move || {
                let mut c = common::Client::connect(addr);
                assert!(c.line().starts_with("220"));
                c.send(b"EHLO client.test\r\n");
                c.reply();
                let mut ids = Vec::new();
                for i in 0..EACH {
                    assert!(c.cmd("MAIL FROM:<alice@origin.test>").starts_with("250"));
                    for r in 0..RCPTS {
                        let rcpt = format!("RCPT TO:<nobody{r}@dest.test>");
                        assert!(c.cmd(&rcpt).starts_with("250"));
                    }
                    assert!(c.cmd("DATA").starts_with("354"));
                    c.send(format!("Message-ID: <f{s}-{i}@t>\r\n\r\nx\r\n.\r\n").as_bytes());
                    let reply = c.line();
                    assert!(reply.starts_with("250 2.0.0"), "{reply}");
                    ids.push(common::queue_id(&reply));
                }
                c.cmd("QUIT");
                ids
            })
        })
        .collect();
    let ids: Vec<String> = senders
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let failed = format!(
        "postern_recipients_failed_total {}\n",
        SESSIONS * EACH * RCPTS
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !server
        .metrics_until(|m| m.contains(&failed))
        .contains(&failed)
    {
        assert!(Instant::now() < deadline, "not every recipient failed");
    }
    // Every outcome is settled; a graceful stop waits for the reports being made.
    let log = server.terminate_for_log();
    let mut reports: HashMap<&str, usize> = HashMap::new();
    for line in log
        .lines()
        .filter(|l| l.contains("delivery status notification queued"))
    {
        // Each says what kind of report it is: these are all failures.
        assert!(line.contains("action=\"failed\""), "{line}");
        let id = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("queue_id="))
            .unwrap_or_else(|| panic!("no queue_id in {line}"));
        *reports.entry(id).or_default() += 1;
    }
    let not_once: Vec<(&String, Option<usize>)> = ids
        .iter()
        .map(|id| (id, reports.get(id.as_str()).copied()))
        .filter(|(_, n)| *n != Some(1))
        .collect();
    assert!(
        not_once.is_empty(),
        "messages not bounced exactly once (bounces made): {not_once:?}"
    );
    assert_eq!(reports.len(), ids.len(), "bounces of messages not sent");
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

/// Sends `n` messages from s@origin.test to `rcpt` in one session, one after another, with
/// Message-IDs `<{prefix}{i}@t>`.
fn send_in_one_session(server: &Server, rcpt: &str, prefix: &str, n: usize) {
    let (mut c, _) = hello(server);
    for i in 0..n {
        assert!(c.cmd("MAIL FROM:<s@origin.test>").starts_with("250"));
        assert!(c.cmd(&format!("RCPT TO:<{rcpt}>")).starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        c.send(format!("Message-ID: <{prefix}{i}@t>\r\n\r\nx\r\n.\r\n").as_bytes());
        assert!(c.line().starts_with("250 2.0.0"));
    }
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
    // Now mx1 is up: the next message goes to it, not to mx2.
    drop(mx1_down);
    let mx1 = Peer::start_on("127.0.0.2", port, &[]);
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
    // (preference 20) takes mail. busy1 (10) says 421 to MAIL; busy2 (20) takes mail.
    let mx2 = Peer::start_on("127.0.0.3", 0, &[]);
    let port = mx2.port;
    let mx1 = Peer::start_on("127.0.0.2", port, &["--tempfail-first", "1000"]);
    let (_, busy_connections) = busy_next_hop("127.0.0.4", port);
    let busy2 = Peer::start_on("127.0.0.5", port, &[]);
    let dns = TestDns::start(
        "test",
        &[
            ("tempfail.test.", Rec::Mx(10, "mx1.test.")),
            ("tempfail.test.", Rec::Mx(20, "mx2.test.")),
            ("mx1.test.", Rec::A("127.0.0.2".parse().unwrap())),
            ("mx2.test.", Rec::A("127.0.0.3".parse().unwrap())),
            ("busy.test.", Rec::Mx(10, "busy1.test.")),
            ("busy.test.", Rec::Mx(20, "busy2.test.")),
            ("busy1.test.", Rec::A("127.0.0.4".parse().unwrap())),
            ("busy2.test.", Rec::A("127.0.0.5".parse().unwrap())),
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

#[test]
fn the_end_of_a_pause_costs_one_connection_not_one_per_waiting_message() {
    // A next hop that refuses every session, and several messages waiting for it: each time
    // the pause ends they all come due together, and one connection finds it still down.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let refusals = refusing_greeter("127.0.0.1", port);
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
    let deferrals = |m: &str| -> usize {
        m.lines()
            .find_map(|l| l.strip_prefix("postern_delivery_deferrals_total "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
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
    send(
        &server,
        "s@origin.test",
        &["r@loop.test"],
        "<loop@t>",
        "x\r\n",
    );
    let (bounce, text) = origin.first("the loop bounce");
    assert_eq!(bounce.mail_from, "<>");
    assert!(text.contains("Status: 5.4.6"), "{text}");
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
    send(
        &server,
        "s@origin.test",
        &["r@noaddr.test"],
        "<noaddr@t>",
        "x\r\n",
    );
    let (bounce, text) = origin.first("the loop bounce");
    assert_eq!(bounce.mail_from, "<>");
    assert!(text.contains("Status: 5.4.6"), "{text}");
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

#[path = "../../postern-relay/tests/support/dns_server.rs"]
mod dns_server;

/// Starts `postern-load sink` with `extra` flags; returns it and its address.
fn start_sink(extra: &[&str]) -> (Child, BufReader<std::process::ChildStdout>, String) {
    let mut sink = Command::new(postern_load())
        .args(["sink", "--listen", "127.0.0.1:0", "--lifetime", "120s"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(sink.stdout.take().unwrap());
    let addr = loop {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "sink exited");
        if let Some(a) = line.trim().strip_prefix("listening on ") {
            break a.to_owned();
        }
    };
    (sink, out, addr)
}

/// Stops a sink and returns the counters it prints.
fn stop_sink(mut sink: Child, mut out: BufReader<std::process::ChildStdout>) -> String {
    Command::new("kill")
        .args(["-TERM", &sink.id().to_string()])
        .status()
        .unwrap();
    let mut counters = String::new();
    out.read_to_string(&mut counters).unwrap();
    sink.wait().unwrap();
    counters
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
    let counters = stop_sink(sink, out);
    assert!(
        counters.contains("postern_load_sink_messages_total 0\n"),
        "{counters}"
    );
}

#[test]
fn outbound_starttls_opportunistic_and_required() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let tls = [
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
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
            cert.to_str().unwrap(),
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

/// Holds mail on two cores (`--hold`, with `extra` flags) in `spool` until some of it is on
/// core 1 (one connection per message, which the kernel spreads over the cores), and stops;
/// returns how many messages were sent and how many are on core 1.
fn hold_on_two_cores(spool: &Path, extra: &[&str], prefix: &str) -> (usize, usize) {
    let mut args = vec!["--cores", "2"];
    args.extend_from_slice(extra);
    let mut held = Server::start_in(&args, spool.to_path_buf(), None);
    let on_core_1 = || {
        common::spooled(spool)
            .iter()
            .filter(|m| postern_spool::owner_core(&m.0) == Some(1))
            .count()
    };
    let mut sent = 0;
    while sent < 40 {
        send(
            &held,
            "a@origin.test",
            &["b@dest.test"],
            &format!("<{prefix}{sent}@t>"),
            "x\r\n",
        );
        sent += 1;
        if sent >= 6 && on_core_1() > 0 {
            break;
        }
    }
    assert!(held.terminate().success());
    let on_1 = on_core_1();
    assert!(on_1 > 0, "no message on core 1: the test proves nothing");
    (sent, on_1)
}

/// A large move logs the first messages' new queue IDs one by one and a count for the rest, not
/// a line per message.
#[test]
fn a_move_to_fewer_cores_logs_a_few_queue_ids_and_counts_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let mut held = Server::start_in(&["--cores", "2"], spool.clone(), None);
    let on_core_1 = || {
        common::spooled(&spool)
            .iter()
            .filter(|m| postern_spool::owner_core(&m.0) == Some(1))
            .count()
    };
    let mut sent = 0;
    // Each message on a connection of its own, which the kernel gives either core.
    while sent < 400 && on_core_1() < 30 {
        let body = "x\r\n";
        send(
            &held,
            "a@origin.test",
            &["b@dest.test"],
            &format!("<many{sent}@t>"),
            body,
        );
        sent += 1;
    }
    assert!(held.terminate().success());
    let moved = on_core_1();
    assert!(moved >= 30, "only {moved} of {sent} on core 1");
    let mut one = Server::start_in(&["--cores", "1"], spool.clone(), None);
    one.log_until(|l| l.contains("folded into 1"));
    let log = one.terminate_for_log();
    let each = log
        .lines()
        .filter(|l| l.contains("moved from a core that no longer exists"))
        .count();
    assert_eq!(each, 20, "{log}");
    let more = format!("more={}", moved - 20);
    assert!(
        log.lines()
            .any(|l| l.contains(&more) && l.contains("more messages moved")),
        "{more} in {log}"
    );
}

/// The peer stored `sent` messages, each once (by Message-ID).
fn assert_each_once(peer: &Peer, sent: usize, why: &str) {
    let stored = peer.stored();
    let mut ids: Vec<&str> = stored.iter().map(|m| m.message_id.as_str()).collect();
    ids.sort_unstable();
    let all = ids.len();
    ids.dedup();
    assert_eq!((ids.len(), all), (sent, sent), "{why}");
}

#[test]
fn mail_queued_by_more_cores_is_delivered_once_however_often_fewer_cores_restart() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let (sent, _) = hold_on_two_cores(&spool, &[], "fold");
    // One core delivers everything, then restarts a few times.
    let peer = Peer::start(&[]);
    let route = format!("dest.test=127.0.0.1:{}", peer.port);
    let args = [
        "--route",
        route.as_str(),
        "--cores",
        "1",
        "--metrics",
        "127.0.0.1:0",
    ];
    for run in 0..4 {
        let mut server = Server::start_in(&args, spool.clone(), None);
        if run == 0 {
            peer.wait_for("every held message", Duration::from_secs(20), |s| {
                s.len() >= sent
            });
        }
        // Settled and recorded before the stop (the queue is empty).
        server.metrics_until(|m| m.contains("postern_queue_depth 0\n"));
        assert!(server.terminate().success());
        assert!(
            !spool.join("1").exists(),
            "core 1's directory is still there"
        );
    }
    assert_each_once(&peer, sent, "delivered again after a restart");
}

#[test]
fn a_move_to_fewer_cores_cut_off_by_crashes_delivers_each_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let (sent, _) = hold_on_two_cores(&spool, &[], "cut");
    // Two starts on one core, each killed as the move of core 1's mail syncs its copies: the
    // first `fdatasync` of the process is that sync (strace counts each thread's calls apart,
    // and the cores' threads do not exist yet).
    for _ in 0..2 {
        let mut cmd = Command::new("strace");
        cmd.args([
            "-f",
            "-qq",
            "-o",
            "/dev/null",
            "-e",
            "inject=fdatasync:signal=SIGKILL:when=1",
        ])
        .arg(env!("CARGO_BIN_EXE_postern"))
        .args([
            "serve",
            "--cores",
            "1",
            "--hold",
            "--listen",
            "127.0.0.1:0",
            "--spool",
        ])
        .arg(&spool);
        let (code, _, err) = common::run_command_bounded(cmd);
        assert_ne!(code, 0, "the start was not cut off: {err}");
        assert!(!err.contains("ready with"), "{err}");
        assert!(spool.join("1").exists(), "the move finished: {err}");
        assert!(
            common::spooled(&spool).len() > sent,
            "the copies were not on disk when the start was cut off: the test proves nothing"
        );
    }
    // A start that is not cut off delivers everything, each message once.
    let peer = Peer::start(&[]);
    let route = format!("dest.test=127.0.0.1:{}", peer.port);
    let args = [
        "--route",
        route.as_str(),
        "--cores",
        "1",
        "--metrics",
        "127.0.0.1:0",
    ];
    let mut server = Server::start_in(&args, spool.clone(), None);
    peer.wait_for("every held message", Duration::from_secs(20), |s| {
        s.len() >= sent
    });
    server.metrics_until(|m| m.contains("postern_queue_depth 0\n"));
    assert!(server.terminate().success());
    assert_each_once(&peer, sent, "delivered more than once");
}

#[test]
fn mail_of_removed_cores_with_no_room_to_move_waits_and_is_delivered_once() {
    let disk = common::Tmpfs::mount("24m");
    let spool = disk.path.join("spool");
    let small = ["--spool-segment-size", "1M"];
    let (sent, waiting) = hold_on_two_cores(&spool, &small, "room");
    // The disk fills up: one core's start cannot copy core 1's mail.
    let filler = disk.path.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
    }
    let peer = Peer::start(&[]);
    let route = format!("dest.test=127.0.0.1:{}", peer.port);
    let args = [
        "--route",
        route.as_str(),
        "--cores",
        "1",
        small[0],
        small[1],
        "--metrics",
        "127.0.0.1:0",
    ];
    let mut full = Server::start_in(&args, spool.clone(), None);
    full.log_until(|l| l.contains("no room to move"));
    full.log_until(|l| l.contains("wait there, not delivered"));
    // Core 0's own mail goes; core 1's waits where it is.
    peer.wait_for("core 0's mail", Duration::from_secs(20), |s| {
        s.len() >= sent - waiting
    });
    full.metrics_until(|m| m.contains("postern_queue_depth 0\n"));
    assert!(full.terminate().success());
    assert_eq!(
        peer.stored().len(),
        sent - waiting,
        "core 1's mail went out"
    );
    // Room again: the next start moves it, and it is delivered, once.
    std::fs::remove_file(&filler).unwrap();
    let mut server = Server::start_in(&args, spool.clone(), None);
    peer.wait_for("every message", Duration::from_secs(20), |s| {
        s.len() >= sent
    });
    server.metrics_until(|m| m.contains("postern_queue_depth 0\n"));
    assert!(server.terminate().success());
    assert_each_once(&peer, sent, "delivered more than once");
}

#[test]
fn a_stop_asked_for_during_the_move_to_fewer_cores_ends_the_start_before_ready() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let (sent, _) = hold_on_two_cores(&spool, &[], "stop");
    // The move's sync (the process's first fdatasync) takes 3 s: time to ask for a stop.
    let mut tracer = common::KillOnDrop(
        Command::new("strace")
            .args(["-f", "-qq", "-o", "/dev/null", "-e"])
            .arg("inject=fdatasync:delay_enter=3000000:when=1")
            .arg(env!("CARGO_BIN_EXE_postern"))
            .args([
                "serve",
                "--cores",
                "1",
                "--hold",
                "--listen",
                "127.0.0.1:0",
                "--spool",
            ])
            .arg(&spool)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !spool.join(".fold-journal").exists() {
        assert!(Instant::now() < deadline, "the move never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    // strace's child is the server.
    let tracer_pid = tracer.0.id();
    let children =
        std::fs::read_to_string(format!("/proc/{tracer_pid}/task/{tracer_pid}/children")).unwrap();
    let server = children.split_whitespace().next().unwrap().to_owned();
    assert!(Command::new("kill")
        .args(["-TERM", &server])
        .status()
        .unwrap()
        .success());
    let mut out = String::new();
    tracer
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(tracer.0.wait().unwrap().success(), "{out}");
    assert!(out.contains("stopped before it was ready"), "{out}");
    assert!(
        !out.contains("ready with"),
        "said ready after a stop: {out}"
    );
    // The move itself finished: nothing lost, nothing twice.
    assert_eq!(common::spooled(&spool).len(), sent);
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

/// postern with dest.test routed to a port where nothing listens, origin.test (the senders'
/// domain, where reports go) routed to `origin`, fast retries, and `extra` flags.
fn unreachable_dest_with_origin(origin: &Peer, extra: &[&str]) -> (Server, Reserved) {
    let route = format!("origin.test=127.0.0.1:{}", origin.port);
    let mut args = vec!["--route", &route];
    args.extend(extra);
    unreachable_dest(&args)
}

/// postern with dest.test routed to a port where nothing listens (held until the returned
/// reservation is dropped), fast retries, and `extra` flags.
fn unreachable_dest(extra: &[&str]) -> (Server, Reserved) {
    let down = reserve("127.0.0.1", 0);
    let route = format!("dest.test=127.0.0.1:{}", down.1);
    let mut args = vec!["--route", &route];
    args.extend(FAST_RETRY);
    args.extend(extra);
    (Server::start(&args), down)
}

/// A connection to `server`, past its greeting and EHLO.
fn greeted(server: &Server) -> common::Client {
    let mut c = server.connect();
    c.line();
    c.send(b"EHLO c.test\r\n");
    c.reply();
    c
}

#[test]
fn undeliverable_past_the_queue_lifetime_bounces_with_4_4_7() {
    let origin = Peer::start(&[]);
    let (server, _down) = unreachable_dest_with_origin(&origin, &["--max-queue-lifetime", "1s"]);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<old@t>",
        "x\r\n",
    );
    let (_, text) = origin.first("the expiry bounce");
    assert!(text.contains("Status: 4.4.7"), "{text}");
    assert!(text.contains("Action: failed"), "{text}");
    assert!(
        text.contains("Final-Recipient: rfc822; b@dest.test"),
        "{text}"
    );
}

#[test]
fn the_queue_lifetime_runs_whole_from_arrival() {
    // The spool keeps arrival times in whole seconds. A message that arrives late in a second
    // must still get its whole lifetime, not one shortened by the part of the second that
    // the truncation drops.
    let origin = Peer::start(&[]);
    let (server, _down) = unreachable_dest_with_origin(&origin, &["--max-queue-lifetime", "1s"]);
    let mut c = greeted(&server);
    let into_second = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_millis()
    };
    // Wait, bounded, for the clock to be at least 0.7 s into a second.
    let deadline = Instant::now() + Duration::from_secs(3);
    while into_second() < 700 {
        assert!(Instant::now() < deadline, "the clock did not move");
        std::thread::sleep(Duration::from_millis(5));
    }
    let before = Instant::now();
    c.send(b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n");
    assert!(c.line().starts_with("250"));
    assert!(c.line().starts_with("250"));
    assert!(c.line().starts_with("354"));
    c.send(b"Subject: late in a second\r\n\r\nx\r\n.\r\n");
    assert!(c.line().starts_with("250"));
    let (_, text) = origin.first("the expiry bounce");
    let waited = before.elapsed();
    assert!(text.contains("Status: 4.4.7"), "{text}");
    assert!(
        waited >= Duration::from_millis(995),
        "bounced {waited:?} after arrival, within a lifetime of 1 s"
    );
}

#[test]
fn the_last_attempt_comes_at_the_end_of_the_lifetime_while_the_next_hop_is_paused() {
    // Nothing listens at first: the second failure in a row pauses the next hop for a minute
    // (the retry delay, at most 60 s). The lifetime ends well before that, and the last
    // attempt must come then, not after the pause.
    let down = reserve("127.0.0.1", 0);
    let port = down.1;
    let route = format!("dest.test=127.0.0.1:{port}");
    let server = Server::start(&[
        "--route",
        &route,
        "--retry-initial",
        "60s",
        "--retry-max",
        "60s",
        "--max-queue-lifetime",
        "6s",
        "--metrics",
        "127.0.0.1:0",
    ]);
    for (n, id) in ["<first@t>", "<last@t>"].into_iter().enumerate() {
        send(&server, "a@origin.test", &["b@dest.test"], id, "x\r\n");
        let count = format!("postern_delivery_deferrals_total {}\n", n + 1);
        let m = server.metrics_until(|m| m.contains(&count));
        assert!(m.contains(&count), "{m}");
    }
    let paused = server.log_until(|l| l.contains("delivery to it paused for 60s"));
    assert!(paused.contains(&format!("127.0.0.1:{port}")), "{paused}");
    drop(down);
    let peer = Peer::start_on("127.0.0.1", port, &[]);
    let has_last = |s: &[Stored]| {
        s.iter()
            .any(|m| String::from_utf8_lossy(&m.data).contains("Message-ID: <last@t>"))
    };
    let stored = peer.wait_for("the last attempt", Duration::from_secs(20), has_last);
    assert!(has_last(&stored));
}

#[test]
fn delay_warning_tells_the_sender_once() {
    let origin = Peer::start(&[]);
    let (server, _down) = unreachable_dest_with_origin(
        &origin,
        &["--delay-warning", "300ms", "--metrics", "127.0.0.1:0"],
    );
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<slow@t>",
        "x\r\n",
    );
    let (_, text) = origin.first("the delay warning");
    assert!(text.contains("Action: delayed"), "{text}");
    assert!(text.contains("Will-Retry-Until:"), "{text}");
    // Nothing answered: no answer from host (RFC 3463 3.5), not a protocol status.
    assert!(text.contains("Status: 4.4.1"), "{text}");
    // Several more deferrals pass, still one warning.
    server.metrics_until(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("postern_delivery_deferrals_total "))
            .is_some_and(|n| n.parse::<u64>().unwrap() >= 6)
    });
    assert_eq!(origin.stored().len(), 1);
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
fn spool_past_its_high_water_mark_refuses_then_accepts_again() {
    let (server, down) = unreachable_dest(&[
        "--cores",
        "1",
        "--spool-segment-size",
        "64k",
        "--spool-high-water",
        "256k",
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

/// What a scripted next hop does with a line.
enum Act {
    /// Write this reply.
    Say(&'static str),
    /// Write this reply, then close the connection.
    SayAndClose(&'static str),
    /// Write this reply once the receiver gets a word (or is dropped).
    SayWhenTold(std::sync::mpsc::Receiver<()>, &'static str),
}

/// What a scripted next hop stored: each message's content with its connection's number.
type StoredRx = std::sync::mpsc::Receiver<(usize, String)>;

/// A next hop on a thread, for up to 4 connections: it greets, answers each command line as
/// `answer` says (given the connection's number and the line; where it says nothing, QUIT gets
/// 221 and a close and anything else 250), answers DATA with 354 and a BDAT that is not LAST
/// with 250, and sends each message's content with its connection's number to the first
/// receiver, then does what `after_data` says. The second receiver gets a word after each connection closes.
fn scripted_next_hop(
    answer: impl Fn(usize, &str) -> Option<Act> + Send + 'static,
    after_data: Act,
) -> (u16, StoredRx, std::sync::mpsc::Receiver<()>) {
    scripted_next_hop_at("127.0.0.1:0", answer, after_data)
}

/// [`scripted_next_hop`] listening on `bind`.
fn scripted_next_hop_at(
    bind: &str,
    answer: impl Fn(usize, &str) -> Option<Act> + Send + 'static,
    after_data: Act,
) -> (u16, StoredRx, std::sync::mpsc::Receiver<()>) {
    let l = TcpListener::bind(bind).unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    let (closed_tx, closed) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for (n, conn) in l.incoming().take(4).enumerate() {
            let Ok(s) = conn else { return };
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            let _ = w.write_all(b"220 scripted.test ESMTP\r\n");
            let mut line = String::new();
            let mut data = String::new();
            let mut in_data = false;
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                let act = if in_data && line == ".\r\n" {
                    in_data = false;
                    let _ = tx.send((n, std::mem::take(&mut data)));
                    Some(&after_data)
                } else if in_data {
                    data.push_str(&line);
                    None
                } else if line.starts_with("DATA") {
                    in_data = true;
                    Some(&Act::Say("354 go\r\n"))
                } else if let Some(args) = line.strip_prefix("BDAT ") {
                    let mut args = args.split_whitespace();
                    let size: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                    let mut chunk = vec![0u8; size];
                    if r.read_exact(&mut chunk).is_err() {
                        break;
                    }
                    data.push_str(&String::from_utf8_lossy(&chunk));
                    if args.next().is_some_and(|a| a.eq_ignore_ascii_case("LAST")) {
                        let _ = tx.send((n, std::mem::take(&mut data)));
                        Some(&after_data)
                    } else {
                        Some(&Act::Say("250 2.0.0 chunk taken\r\n"))
                    }
                } else {
                    let told = answer(n, &line).unwrap_or(if line.starts_with("QUIT") {
                        Act::SayAndClose("221 bye\r\n")
                    } else {
                        Act::Say("250 ok\r\n")
                    });
                    let _ = w.write_all(match told {
                        Act::Say(r) => r.as_bytes(),
                        Act::SayWhenTold(told, r) => {
                            let _ = told.recv();
                            r.as_bytes()
                        }
                        Act::SayAndClose(r) => {
                            let _ = w.write_all(r.as_bytes());
                            break;
                        }
                    });
                    None
                };
                match act {
                    Some(Act::Say(r)) => {
                        let _ = w.write_all(r.as_bytes());
                    }
                    Some(Act::SayWhenTold(told, r)) => {
                        let _ = told.recv();
                        let _ = w.write_all(r.as_bytes());
                    }
                    Some(Act::SayAndClose(r)) => {
                        let _ = w.write_all(r.as_bytes());
                        break;
                    }
                    None => {}
                }
                line.clear();
            }
            let _ = w.shutdown(std::net::Shutdown::Both);
            let _ = closed_tx.send(());
        }
    });
    (port, rx, closed)
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
fn a_refused_opportunistic_starttls_goes_on_in_cleartext() {
    assert!(
        through_tls_next_hop(true, "<tls454@t>"),
        "not delivered on the connection that got 454"
    );
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
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<one@t>",
        "x\r\n",
    );
    server.metrics_until(|m| m.contains("postern_delivery_deferrals_total 1\n"));
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<two@t>",
        "x\r\n",
    );
    let (connection, data) = stored.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(data.contains("Message-ID: <two@t>"), "{data}");
    assert_eq!(connection, 1);
}

#[test]
fn a_pipelined_batch_lost_with_its_connection_counts_as_one_break() {
    use std::io::Read;
    // A single-address relay host that offers PIPELINING and CHUNKING. Its first connection
    // greets once the test says so, takes a batch of two transactions and drops without a
    // reply; later connections are passed through to a real peer.
    let peer = Peer::start(&[]);
    let peer_port = peer.port;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (open_gate, gate) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        for (n, conn) in l.incoming().take(4).enumerate() {
            let Ok(mut s) = conn else { return };
            if n > 0 {
                let mut up = TcpStream::connect(("127.0.0.1", peer_port)).unwrap();
                let (mut s2, mut up2) = (s.try_clone().unwrap(), up.try_clone().unwrap());
                std::thread::spawn(move || std::io::copy(&mut up2, &mut s2));
                std::thread::spawn(move || std::io::copy(&mut s, &mut up));
                continue;
            }
            let _ = gate.recv_timeout(Duration::from_secs(20));
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = s.write_all(b"220 batch.test ESMTP\r\n");
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            let mut greeted = false;
            while let Ok(k) = s.read(&mut buf) {
                if k == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..k]);
                if !greeted && seen.ends_with(b"\r\n") {
                    greeted = true;
                    let _ = s.write_all(b"250-batch.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n");
                }
                if seen.windows(4).filter(|w| w == b"BDAT").count() >= 2 {
                    break;
                }
            }
            // Dropped here, without a reply to either transaction.
        }
    });
    let relay = format!("127.0.0.1:{port}");
    let server = Server::start(&[
        "--relay-host",
        &relay,
        "--max-transactions-in-flight",
        "4",
        "--max-connections-per-destination",
        "1",
        "--retry-initial",
        "60s",
        "--metrics",
        "127.0.0.1:0",
    ]);
    send_in_one_session(&server, "r@dest.test", "batch", 2);
    open_gate.send(()).unwrap();
    // Both outcomes are unknown: deferred. One connection broke, not two: the relay host is
    // not paused, and the next message goes at once.
    server.metrics_until(|m| m.contains("postern_delivery_deferrals_total 2\n"));
    send(
        &server,
        "s@origin.test",
        &["r@dest.test"],
        "<after-batch@t>",
        "x\r\n",
    );
    let got = peer.wait_for("the next message", Duration::from_secs(20), |s| {
        !s.is_empty()
    });
    assert_eq!(got[0].message_id, "<after-batch@t>");
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

/// What a run through postern to a recording sink left behind.
struct Relayed {
    /// postern's metrics once it had delivered every message.
    metrics: String,
    /// The sink's counters.
    sink: String,
    /// The sequence numbers the sink recorded, sorted, repeats included.
    seqs: Vec<u64>,
}

/// Sends `n` messages to postern with `postern-load send` (8 connections, pipelined, BDAT);
/// postern, with `--max-transactions-in-flight 8`, `connections` per next hop and quick
/// retries, relays them to a recording sink started with `sink_args`. Returns once postern has
/// delivered all of them (or gave up waiting after 30 s).
fn relay_pipelined(n: u64, connections: &str, sink_args: &[&str]) -> Relayed {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("record.txt");
    let mut args = vec!["--record", record.to_str().unwrap()];
    args.extend_from_slice(sink_args);
    let (sink, out, addr) = start_sink(&args);
    let route = format!("sink.test={addr}");
    let mut args = vec![
        "--route",
        &route,
        "--metrics",
        "127.0.0.1:0",
        "--max-connections-per-destination",
        connections,
        "--max-transactions-in-flight",
        "8",
    ];
    args.extend(FAST_RETRY);
    let server = Server::start(&args);
    let target = server.smtp.to_string();
    let sent = Command::new(postern_load())
        .args(["send", "--target", &target, "--quiet", "--connections", "8"])
        .args(["--messages", &n.to_string(), "--pipelining", "--bdat"])
        .args(["--to", "rcpt{r}@sink.test"])
        .output()
        .unwrap();
    assert!(sent.status.success(), "{sent:?}");
    let delivered = format!("postern_recipients_delivered_total {n}\n");
    // Retries wait 200 to 400 ms each; bounded at six waits of five seconds.
    let mut metrics = String::new();
    for _ in 0..6 {
        metrics = server.metrics_until(|m| m.contains(&delivered));
        if metrics.contains(&delivered) {
            break;
        }
    }
    assert!(metrics.contains(&delivered), "{metrics}");
    let sink = stop_sink(sink, out);
    let recorded = std::fs::read_to_string(&record).unwrap();
    let mut seqs: Vec<u64> = recorded
        .lines()
        .map(|l| l.split(' ').next().unwrap().parse().unwrap())
        .collect();
    seqs.sort_unstable();
    Relayed {
        metrics,
        sink,
        seqs,
    }
}

/// A Prometheus sample's value, by its name and labels.
fn counter(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
        .parse()
        .unwrap()
}

/// `--max-transactions-in-flight`: one connection to the next hop carries several messages
/// pipelined into each other, and each reply still settles its own message. The sink defers
/// one message in five (and closes the connection after several errors, with messages in
/// flight); a reply credited to the wrong message would leave one message never recorded
/// and another recorded twice.
#[test]
fn transactions_pipelined_to_the_next_hop_settle_each_message() {
    let n = 200;
    let r = relay_pipelined(n, "1", &["--reply-mix", "250:4,451:1"]);
    let overlapped = counter(&r.sink, "postern_load_sink_overlapped_transactions_total");
    assert!(overlapped > 0, "nothing was pipelined: {}", r.sink);
    let deferred = counter(&r.sink, "postern_load_sink_replies_total{code=\"451\"}");
    assert!(deferred > 0, "{}", r.sink);
    // Every 451 defers its message; so does a 421 closing the connection (the sink's
    // "too many errors") for the message it answers.
    let deferrals = counter(&r.metrics, "postern_delivery_deferrals_total");
    assert!(
        deferrals >= deferred,
        "{deferrals} deferrals, {deferred} times 451"
    );
    assert_eq!(r.seqs, (0..n).collect::<Vec<_>>());
}

/// A next hop that drops the connection in the middle of a pipelined batch: nothing is lost,
/// and a message arrives twice only when the sink took it before the drop and its reply never
/// came back (at most one batch per dropped connection).
#[test]
fn a_connection_dropped_mid_batch_loses_nothing() {
    let n = 100;
    let mut r = relay_pipelined(n, "2", &["--drop-after", "5"]);
    let drops = counter(&r.sink, "postern_load_sink_dropped_total");
    assert!(drops > 0, "{}", r.sink);
    let recorded = r.seqs.len() as u64;
    r.seqs.dedup();
    assert_eq!(r.seqs, (0..n).collect::<Vec<_>>(), "every message arrived");
    assert!(
        recorded <= n + drops * 8,
        "{recorded} recorded for {n} messages and {drops} drops"
    );
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
fn a_permanent_failure_is_bounced_at_once_though_another_recipient_waits_for_a_retry() {
    // dest.test refuses nobody@ with 550; slow.test is down (retried for days by default);
    // bounces go to origin.test, the same peer.
    let peer = Peer::start(&["--reject-rcpt", "nobody"]);
    let down = reserve("127.0.0.1", 0);
    let slow = format!("slow.test=127.0.0.1:{}", down.1);
    let dest = format!("dest.test=127.0.0.1:{}", peer.port);
    let origin = format!("origin.test=127.0.0.1:{}", peer.port);
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let mut args = vec![
        "--route",
        dest.as_str(),
        "--route",
        origin.as_str(),
        "--route",
        slow.as_str(),
        "--metrics",
        "127.0.0.1:0",
    ];
    args.extend(FAST_RETRY);
    let mut server = Server::start_in(&args, spool.clone(), None);
    send(
        &server,
        "alice@origin.test",
        &["nobody@dest.test", "later@slow.test"],
        "<mixed@t>",
        "x\r\n",
    );
    let stored = peer.wait_for(
        "the bounce for nobody@, while later@ is still retried",
        Duration::from_secs(20),
        |s| !s.is_empty(),
    );
    let text = String::from_utf8_lossy(&stored[0].data).into_owned();
    assert_eq!(stored[0].mail_from, "<>");
    assert_eq!(stored[0].rcpt_tos, ["alice@origin.test"]);
    assert!(
        text.contains("Final-Recipient: rfc822; nobody@dest.test"),
        "{text}"
    );
    assert!(text.contains("Status: 5.1.1"), "{text}");
    assert!(!text.contains("later@slow.test"), "{text}");
    let m = server.metrics_until(|m| m.contains("postern_queue_depth 1\n"));
    assert!(m.contains("postern_queue_depth 1\n"), "{m}");

    // The failure is recorded: after a restart only later@ is tried again, and nobody@
    // gets neither a second RCPT nor a second bounce.
    server.terminate();
    let server = Server::start_in(&args, spool, Some(dir));
    server.metrics_until(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("postern_delivery_deferrals_total "))
            .is_some_and(|n| n.parse::<u64>().unwrap() >= 3)
    });
    let m = server.metrics_until(|m| m.contains("postern_recipients_failed_total"));
    assert!(
        m.contains("postern_recipients_failed_total 0\n"),
        "nobody@ was tried again after the restart: {m}"
    );
    assert_eq!(peer.stored().len(), 1, "{:#?}", peer.stored());
}

#[test]
fn a_delay_warning_names_every_deferred_recipient_that_wants_one() {
    // dest.test and far.test are both down, so their recipients are deferred in separate
    // attempts (separate batches of outcomes).
    let origin = Peer::start(&[]);
    let far = reserve("127.0.0.1", 0);
    let far_route = format!("far.test=127.0.0.1:{}", far.1);
    let (server, _down) = unreachable_dest_with_origin(
        &origin,
        &[
            "--delay-warning",
            "300ms",
            "--route",
            &far_route,
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    send_commands(
        &server,
        &[
            "MAIL FROM:<a@origin.test>",
            "RCPT TO:<failure-only@dest.test> NOTIFY=FAILURE",
            "RCPT TO:<asked@dest.test> NOTIFY=DELAY,FAILURE",
            "RCPT TO:<default@dest.test>",
            "RCPT TO:<elsewhere@far.test> NOTIFY=DELAY",
        ],
        "<slow3@t>",
    );
    let warned = ["asked@dest.test", "default@dest.test", "elsewhere@far.test"];
    let count = |stored: &[Stored], who: &str| {
        let field = format!("Final-Recipient: rfc822; {who}");
        stored
            .iter()
            .filter(|s| String::from_utf8_lossy(&s.data).contains(&field))
            .count()
    };
    origin.wait_for(
        "delay warnings for the three recipients that want one",
        Duration::from_secs(20),
        |s| warned.iter().all(|w| count(s, w) >= 1),
    );
    // Several more deferrals of each pass: still one warning per recipient.
    server.metrics_until(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("postern_delivery_deferrals_total "))
            .is_some_and(|n| n.parse::<u64>().unwrap() >= 16)
    });
    let stored_after = origin.stored();
    for s in &stored_after {
        let text = String::from_utf8_lossy(&s.data);
        assert!(text.contains("Action: delayed"), "{text}");
        assert!(!text.contains("failure-only@dest.test"), "{text}");
    }
    for w in warned {
        assert_eq!(count(&stored_after, w), 1, "{w}: {stored_after:#?}");
    }
}

#[test]
fn a_binarymime_message_bounced_with_ret_full_returns_only_its_headers() {
    // The aiosmtpd next hop offers no BINARYMIME, so the message fails there (5.6.3).
    let peer = Peer::start(&[]);
    let server = routed_to(&peer, &[]);
    let (mut c, _) = hello(&server);
    assert!(c
        .cmd("MAIL FROM:<a@origin.test> BODY=BINARYMIME RET=FULL")
        .starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@dest.test>").starts_with("250"));
    let mut body = b"Subject: binary\r\nMessage-ID: <bin@t>\r\n\r\n".to_vec();
    body.extend((0u8..=255).cycle().take(3000));
    c.send(format!("BDAT {} LAST\r\n", body.len()).as_bytes());
    c.send(&body);
    assert!(c.line().starts_with("250 2.0.0"));
    c.cmd("QUIT");
    let (bounce, text) = peer.first("the bounce");
    assert_eq!(bounce.mail_from, "<>");
    assert!(text.contains("Status: 5.6.3"), "{text}");
    assert!(text.contains("text/rfc822-headers"), "{text}");
    assert!(text.contains("Message-ID: <bin@t>"), "{text}");
    assert!(
        !bounce.data.contains(&0u8),
        "binary content came back in the report"
    );
}

#[test]
fn a_binarymime_message_that_is_text_goes_to_a_next_hop_without_binarymime_unchanged() {
    // The aiosmtpd next hop offers 8BITMIME, not CHUNKING or BINARYMIME: the body, declared
    // BINARYMIME but made of CRLF lines (8-bit, one line starting with a dot), goes by DATA
    // as 8BITMIME and arrives byte for byte.
    let peer = Peer::start(&[]);
    let server = routed_to(&peer, &[]);
    let (mut c, _) = hello(&server);
    assert!(c
        .cmd("MAIL FROM:<a@origin.test> BODY=BINARYMIME")
        .starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@dest.test>").starts_with("250"));
    let body = "Subject: caf\u{e9}\r\nMessage-ID: <bintext@t>\r\n\r\n.leading dot\r\n\
                cr\u{e8}me\r\n.\r\nlast\r\n"
        .as_bytes();
    c.send(format!("BDAT {} LAST\r\n", body.len()).as_bytes());
    c.send(body);
    assert!(c.line().starts_with("250 2.0.0"));
    c.cmd("QUIT");
    let (got, _) = peer.first("the message");
    assert!(
        got.data.ends_with(body),
        "{:?}",
        String::from_utf8_lossy(&got.data)
    );
    assert!(got.data.starts_with(b"Received: "));
    assert!(
        got.mail_options.iter().any(|o| o == "BODY=8BITMIME")
            && !got.mail_options.iter().any(|o| o.contains("BINARYMIME")),
        "{:?}",
        got.mail_options
    );
}

#[test]
fn a_bounce_of_8bit_header_fields_reaches_a_sender_whose_next_hop_lacks_8bitmime() {
    let (_dest, origin, server) = refusing_next_hop_and_sender_s(&["--no-8bitmime"]);
    let (mut c, _) = hello(&server);
    assert!(c
        .cmd("MAIL FROM:<a@origin.test> BODY=8BITMIME")
        .starts_with("250"));
    assert!(c.cmd("RCPT TO:<nobody@dest.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send("Subject: caf\u{e9} cr\u{e8}me\r\nMessage-ID: <8bit@t>\r\n\r\nbody\r\n.\r\n".as_bytes());
    assert!(c.line().starts_with("250 2.0.0"));
    c.cmd("QUIT");
    let (bounce, text) = origin.first("the bounce, through a next hop without 8BITMIME");
    assert_eq!(bounce.mail_from, "<>");
    assert!(
        bounce.data.iter().all(|&b| b < 0x80),
        "the report is not 7-bit: {text}"
    );
    assert!(
        text.contains("Final-Recipient: rfc822; nobody@dest.test"),
        "{text}"
    );
    assert!(text.contains("message/global-headers"), "{text}");
    // The header section comes back encoded, and whole.
    assert!(
        text.contains("Content-Transfer-Encoding: quoted-printable"),
        "{text}"
    );
    assert!(text.contains("Subject: caf=C3=A9 cr=C3=A8me"), "{text}");
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
            deferred.contains("relay=\"127.0.0.1\"") && deferred.contains("TLS"),
            "{deferred}"
        );
    }
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
    assert!(
        deferred.contains("relay=\"127.0.0.1\"") && deferred.contains("closed by the server"),
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
        deferred.contains("relay=\"mx1.test\"") && deferred.contains("closed by the server"),
        "{deferred}"
    );
    drop(dns);
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

#[test]
fn a_kept_connection_refused_at_its_rset_costs_no_retry_delay() {
    // Without PIPELINING the RSET before the second transaction is answered on its own; with
    // it the second transaction follows the RSET in the same write, with DATA or with BDAT,
    // one transaction at a time or pipelined into each other.
    let cases: [(&'static str, &[&str]); 4] = [
        ("250 scripted.test\r\n", &[]),
        ("250-scripted.test\r\n250 PIPELINING\r\n", &[]),
        (
            "250-scripted.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n",
            &[],
        ),
        (
            "250-scripted.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n",
            &["--max-transactions-in-flight", "8"],
        ),
    ];
    for (ehlo, extra) in cases {
        for close in [
            Act::SayAndClose("421 4.4.2 idle timeout\r\n"),
            Act::SayAndClose(""),
        ] {
            let Act::SayAndClose(said) = close else {
                unreachable!()
            };
            let (port, stored, _) = scripted_next_hop(
                move |_, line| {
                    if line.starts_with("EHLO") {
                        Some(Act::Say(ehlo))
                    } else {
                        line.starts_with("RSET").then_some(Act::SayAndClose(said))
                    }
                },
                Act::Say("250 2.0.0 stored\r\n"),
            );
            let route = format!("dest.test=127.0.0.1:{port}");
            let mut args = vec!["--route", &route, "--metrics", "127.0.0.1:0"];
            args.extend_from_slice(extra);
            let server = Server::start(&args);
            let case = format!("EHLO {ehlo:?}, {extra:?}, RSET answered {said:?}");
            send(
                &server,
                "a@origin.test",
                &["b@dest.test"],
                "<first@t>",
                "x\r\n",
            );
            let (first, _) = stored.recv_timeout(Duration::from_secs(20)).unwrap();
            send(
                &server,
                "a@origin.test",
                &["b@dest.test"],
                "<second@t>",
                "x\r\n",
            );
            // Delivered at once on a new connection, though the first retry is minutes away.
            let (second, data) = stored
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|e| panic!("{case}: {e}"));
            assert!(data.contains("Message-ID: <second@t>"), "{case}: {data}");
            assert_eq!((first, second), (0, 1), "{case}");
            let m = server.metrics_until(|m| m.contains("postern_recipients_delivered_total 2\n"));
            assert!(
                m.contains("postern_delivery_deferrals_total 0\n"),
                "{case}: {m}"
            );
        }
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
    assert!(deferred.contains("relay=\"localhost\""), "{deferred}");
}

/// `postern queue --json` on `spool`: one object per waiting message.
fn queue_listing(spool: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["queue", "--json", "--spool"])
        .arg(spool)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
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
fn a_full_8bit_return_comes_back_as_headers_to_a_sender_whose_next_hop_lacks_8bitmime() {
    let dest = Peer::start(&["--reject-rcpt", "nobody"]);
    let plain = Peer::start(&["--no-8bitmime"]);
    let eight = Peer::start(&[]);
    let to_dest = format!("dest.test=127.0.0.1:{}", dest.port);
    let to_plain = format!("plain.test=127.0.0.1:{}", plain.port);
    let to_eight = format!("eight.test=127.0.0.1:{}", eight.port);
    let server = Server::start(&[
        "--route", &to_dest, "--route", &to_plain, "--route", &to_eight,
    ]);
    for sender in ["a@plain.test", "a@eight.test"] {
        let (mut c, _) = hello(&server);
        let mail = format!("MAIL FROM:<{sender}> BODY=8BITMIME RET=FULL");
        assert!(c.cmd(&mail).starts_with("250"));
        assert!(c.cmd("RCPT TO:<nobody@dest.test>").starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        c.send(
            "Subject: full\r\nMessage-ID: <full8@t>\r\n\r\nbody with caf\u{e9}\r\n.\r\n".as_bytes(),
        );
        assert!(c.line().starts_with("250 2.0.0"));
        c.cmd("QUIT");
    }
    // Through a next hop with 8BITMIME the whole message comes back, 8-bit.
    let (_, whole) = eight.first("the bounce with the whole message");
    assert!(whole.contains("Content-Type: message/rfc822"), "{whole}");
    assert!(whole.contains("body with caf\u{e9}"), "{whole}");
    assert!(
        whole.contains("a copy of the message are attached"),
        "{whole}"
    );
    // Through one without, the report still comes, 7-bit, with the header section.
    let (bounce, text) = plain.first("the bounce, through a next hop without 8BITMIME");
    assert_eq!(bounce.mail_from, "<>");
    assert!(bounce.data.iter().all(|&b| b < 0x80), "not 7-bit: {text}");
    assert!(text.contains("Content-Type: text/rfc822-headers"), "{text}");
    assert!(text.contains("Message-ID: <full8@t>"), "{text}");
    assert!(!text.contains("body with"), "{text}");
    assert!(
        text.contains("the headers of the message are attached"),
        "{text}"
    );
    assert!(
        text.contains("Final-Recipient: rfc822; nobody@dest.test"),
        "{text}"
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
fn a_carried_job_whose_kept_connection_ends_at_rset_stays_carried() {
    use dns_server::{Rec, TestDns};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    // mx2 (preference 20) takes mail, without PIPELINING, and ends its first connection with
    // 421 at the RSET before the second transaction. mx1 (10) greylists every recipient:
    // both messages, pipelined to it together, are passed over to mx2, carried by the same
    // worker. The second must then go on a new connection to mx2, not back to mx1.
    let (port, stored, _) = scripted_next_hop_at(
        "127.0.0.3:0",
        |n, line| {
            (n == 0 && line.starts_with("RSET"))
                .then_some(Act::SayAndClose("421 4.4.2 closing\r\n"))
        },
        Act::Say("250 2.0.0 stored\r\n"),
    );
    let rcpts_at_mx1 = Arc::new(AtomicUsize::new(0));
    let counted = rcpts_at_mx1.clone();
    let (_, _, _) = scripted_next_hop_at(
        &format!("127.0.0.2:{port}"),
        move |_, line| {
            if line.starts_with("EHLO") {
                Some(Act::Say(
                    "250-mx1.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n",
                ))
            } else if line.starts_with("RCPT") {
                counted.fetch_add(1, Ordering::SeqCst);
                Some(Act::Say("450 4.2.0 greylisted\r\n"))
            } else {
                None
            }
        },
        Act::Say("554 5.5.1 no valid recipients\r\n"),
    );
    let dns = TestDns::start(
        "test",
        &[
            ("grey.test.", Rec::Mx(10, "mx1.test.")),
            ("grey.test.", Rec::Mx(20, "mx2.test.")),
            ("mx1.test.", Rec::A("127.0.0.2".parse().unwrap())),
            ("mx2.test.", Rec::A("127.0.0.3".parse().unwrap())),
        ],
    );
    // Both messages queued first (--hold), so that the next start hands them to one worker
    // at once and they go to mx1 in one pipelined batch.
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let dns_addr = dns.addr.to_string();
    let port_s = port.to_string();
    let base = [
        "--dns-server",
        dns_addr.as_str(),
        "--mx-port",
        port_s.as_str(),
        "--retry-initial",
        "60s",
        "--cores",
        "1",
        "--max-connections-per-destination",
        "1",
        "--max-transactions-in-flight",
        "8",
        "--metrics",
        "127.0.0.1:0",
    ];
    let mut held: Vec<&str> = base.to_vec();
    held.push("--hold");
    let mut first = Server::start_in(&held, spool.clone(), None);
    send_in_one_session(&first, "r@grey.test", "grey", 2);
    assert!(first.terminate().success());
    let server = Server::start_in(&base, spool, None);
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(stored.recv_timeout(Duration::from_secs(20)).unwrap());
    }
    // The first connection to mx2 took one; the second, a new connection, took the other.
    let conns: Vec<usize> = got.iter().map(|(n, _)| *n).collect();
    assert_eq!(conns, vec![0, 1]);
    let m = server.metrics_until(|m| m.contains("postern_recipients_delivered_total 2\n"));
    assert!(m.contains("postern_delivery_deferrals_total 0\n"), "{m}");
    // Each recipient was put off by mx1 once: the second did not go back to it.
    assert_eq!(rcpts_at_mx1.load(Ordering::SeqCst), 2);
    drop(dns);
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
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let (lock, changed) = &*shared;
                lock.lock().unwrap().open += 1;
                changed.notify_all();
                let mut r = BufReader::new(s);
                let _ = w.write_all(b"220 gated.test ESMTP\r\n");
                let (mut line, mut data, mut in_data) = (String::new(), String::new(), false);
                while r.read_line(&mut line).unwrap_or(0) > 0 {
                    let reply: &[u8] = if in_data && line == ".\r\n" {
                        in_data = false;
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
                        if !passed {
                            b"451 4.3.0 gate\r\n"
                        } else if st.deferred < defer {
                            st.deferred += 1;
                            b"451 4.3.0 later\r\n"
                        } else {
                            let _ = tx.send((n, std::mem::take(&mut data)));
                            b"250 2.0.0 stored\r\n"
                        }
                    } else if in_data {
                        data.push_str(&line);
                        b""
                    } else if line.starts_with("EHLO") {
                        b"250-gated.test\r\n250 8BITMIME\r\n"
                    } else if line.starts_with("DATA") {
                        in_data = true;
                        data.clear();
                        b"354 go\r\n"
                    } else if line.starts_with("QUIT") {
                        let _ = w.write_all(b"221 bye\r\n");
                        break;
                    } else {
                        b"250 ok\r\n"
                    };
                    let _ = w.write_all(reply);
                    line.clear();
                }
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

/// Sends `n` messages from a@origin.test to b@dest.test (Message-IDs `<{prefix}{k}@t>`),
/// waits until each is deferred, then asks for a flush.
fn defer_then_flush(server: &Server, prefix: &str, n: usize) {
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
    let out = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["queue", "--flush", "--spool"])
        .arg(&server.spool)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// The Message-IDs of `n` messages from `stored`, waiting up to 20 s for each.
fn message_ids(stored: &std::sync::mpsc::Receiver<(usize, String)>, n: usize) -> Vec<String> {
    let mut ids: Vec<String> = (0..n)
        .map(|k| {
            let (_, data) = stored
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|e| panic!("message {k} of {n} not delivered: {e}"));
            data.lines()
                .find_map(|l| l.strip_prefix("Message-ID: "))
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    ids.sort();
    ids
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

#[test]
fn a_next_hop_that_refuses_helo_for_good_bounces_the_mail_at_once() {
    // EHLO and then HELO answered 550: that host will not take mail from us (RFC 5321
    // 4.2.1), so the mail fails now, with the reply's status, not after days of retries.
    let origin = Peer::start(&[]);
    let (port, _stored, _) = scripted_next_hop(
        |_, line| {
            (line.starts_with("EHLO") || line.starts_with("HELO"))
                .then_some(Act::Say("550 5.7.1 go away\r\n"))
        },
        Act::Say("250 2.0.0 stored\r\n"),
    );
    let dest = format!("dest.test=127.0.0.1:{port}");
    let back = format!("origin.test=127.0.0.1:{}", origin.port);
    let server = Server::start(&["--route", &dest, "--route", &back, "--retry-initial", "1h"]);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<helo@t>",
        "x\r\n",
    );
    let (_, text) = origin.first("the bounce");
    assert!(text.contains("Action: failed"), "{text}");
    assert!(text.contains("Status: 5.7.1"), "{text}");
    assert!(text.contains("550 5.7.1 go away"), "{text}");
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
