//! Next hops and helpers the relay tests share: the aiosmtpd peer (`peers/smtp_peer.py`),
//! scripted next hops on raw sockets, the postern-load sink, a test DNS server, and a few
//! ways of handing mail to the server.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{self, Server};

/// One message as the aiosmtpd peer stored it.
#[derive(Debug, Clone)]
pub struct Stored {
    pub mail_from: String,
    /// The parameters of MAIL, as aiosmtpd parsed them (DSN ones aside).
    pub mail_options: Vec<String>,
    pub rcpt_tos: Vec<String>,
    /// DSN parameters of MAIL, and of each RCPT in order (a `--dsn` peer only).
    pub dsn_mail: Vec<String>,
    pub dsn_rcpts: Vec<Vec<String>>,
    pub message_id: String,
    pub data: Vec<u8>,
    /// Whether the session was in TLS (STARTTLS, with a peer given a certificate).
    pub tls: bool,
}

/// The aiosmtpd next hop (tests/peers/smtp_peer.py).
pub struct Peer {
    pub child: Child,
    pub _stdin: ChildStdin,
    pub port: u16,
    pub log: PathBuf,
    pub _dir: tempfile::TempDir,
}

impl Peer {
    /// A peer on a free loopback port of its own choosing.
    pub fn start(extra: &[&str]) -> Peer {
        Self::start_on("127.0.0.1", 0, extra)
    }

    pub fn start_on(host: &str, port: u16, extra: &[&str]) -> Peer {
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

    pub fn stored(&self) -> Vec<Stored> {
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
                    tls: v["tls"].as_bool().unwrap_or(false),
                }
            })
            .collect()
    }

    /// Waits (bounded) until `pred` holds for what the peer stored.
    pub fn wait_for(
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
    pub fn first(&self, what: &str) -> (Stored, String) {
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

pub fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|x| x.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

pub fn base64_decode(s: &str) -> Vec<u8> {
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
pub struct Reserved(
    /// Held only to keep the port.
    #[allow(dead_code)]
    pub socket2::Socket,
    pub u16,
);

pub fn reserve(host: &str, port: u16) -> Reserved {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let addr: std::net::SocketAddr = format!("{host}:{port}").parse().unwrap();
    s.bind(&addr.into()).unwrap();
    let port = s.local_addr().unwrap().as_socket().unwrap().port();
    Reserved(s, port)
}

/// A session greeted with EHLO client.test, and the EHLO reply.
pub fn hello(server: &Server) -> (common::Client, Vec<String>) {
    let mut c = server.connect();
    assert!(c.line().starts_with("220"));
    c.send(b"EHLO client.test\r\n");
    let ehlo = c.reply();
    (c, ehlo)
}

/// A server that delivers mail for dest.test and origin.test (the senders' domain, where
/// bounces go) to `peer`.
pub fn routed_to(peer: &Peer, extra: &[&str]) -> Server {
    routed_apart(peer.port, peer.port, extra)
}

/// postern sending dest.test to the next hop on `dest`, and origin.test (the senders'
/// domain, where reports go) to the one on `origin`, with the `extra` flags.
pub fn routed_apart(dest: u16, origin: u16, extra: &[&str]) -> Server {
    let dest = format!("dest.test=127.0.0.1:{dest}");
    let origin = format!("origin.test=127.0.0.1:{origin}");
    let mut args = vec!["--route", dest.as_str(), "--route", origin.as_str()];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// Sends one message with the given envelope; returns the queue ID.
pub fn send(server: &Server, from: &str, rcpts: &[&str], message_id: &str, body: &str) -> String {
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

pub const FAST_RETRY: [&str; 4] = ["--retry-initial", "200ms", "--retry-max", "400ms"];

/// postern-load's binary, built on demand when this package's tests run alone.
pub fn postern_load() -> PathBuf {
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

/// Sends one message with MAIL and RCPT commands as given (each must get 250).
pub fn send_commands(server: &Server, commands: &[&str], message_id: &str) -> String {
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

/// A next hop for dest.test that refuses `nobody`, the sender's own next hop for origin.test
/// (an aiosmtpd peer with `origin_flags`), and a server routing to both.
pub fn refusing_next_hop_and_sender_s(origin_flags: &[&str]) -> (Peer, Peer, Server) {
    let dest = Peer::start(&["--reject-rcpt", "nobody"]);
    let origin = Peer::start(origin_flags);
    let to_dest = format!("dest.test=127.0.0.1:{}", dest.port);
    let to_origin = format!("origin.test=127.0.0.1:{}", origin.port);
    let server = Server::start(&["--route", &to_dest, "--route", &to_origin]);
    (dest, origin, server)
}

/// Sends `n` messages from s@origin.test to `rcpt` in one session, one after another, with
/// Message-IDs `<{prefix}{i}@t>`.
pub fn send_in_one_session(server: &Server, rcpt: &str, prefix: &str, n: usize) {
    let (mut c, _) = hello(server);
    for i in 0..n {
        assert!(c.cmd("MAIL FROM:<s@origin.test>").starts_with("250"));
        assert!(c.cmd(&format!("RCPT TO:<{rcpt}>")).starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        c.send(format!("Message-ID: <{prefix}{i}@t>\r\n\r\nx\r\n.\r\n").as_bytes());
        assert!(c.line().starts_with("250 2.0.0"));
    }
}

#[path = "../../../postern-relay/tests/support/dns_server.rs"]
pub mod dns_server;

/// Holds mail in a fresh spool (`queue` sends it to a one-core postern that delivers
/// nothing), then starts postern on that spool, one core, with a postern-load sink (given
/// `sink_flags`) as the next hop of sink.test, metrics on, and `extra` flags: the held mail
/// is handed over all at once. Returns the server, the sink and its output, and the
/// directory holding the spool (to keep while the server runs).
pub fn held_then_relayed(
    queue: impl FnOnce(&Server),
    sink_flags: &[&str],
    extra: &[&str],
) -> (
    Server,
    Child,
    BufReader<std::process::ChildStdout>,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let mut held = Server::start_in(&["--cores", "1"], spool.clone(), None);
    queue(&held);
    assert!(held.terminate().success());
    let (sink, out, addr) = start_sink(sink_flags);
    let route = format!("sink.test={addr}");
    let mut args = vec![
        "--cores",
        "1",
        "--route",
        &route,
        "--metrics",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let server = Server::start_in(&args, spool, None);
    (server, sink, out, dir)
}

/// Starts `postern-load sink` with `extra` flags; returns it and its address.
pub fn start_sink(extra: &[&str]) -> (Child, BufReader<std::process::ChildStdout>, String) {
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
pub fn stop_sink(mut sink: Child, mut out: BufReader<std::process::ChildStdout>) -> String {
    Command::new("kill")
        .args(["-TERM", &sink.id().to_string()])
        .status()
        .unwrap();
    let mut counters = String::new();
    out.read_to_string(&mut counters).unwrap();
    sink.wait().unwrap();
    counters
}

/// postern with dest.test routed to a port where nothing listens, origin.test (the senders'
/// domain, where reports go) routed to `origin`, fast retries, and `extra` flags.
pub fn unreachable_dest_with_origin(origin: &Peer, extra: &[&str]) -> (Server, Reserved) {
    let route = format!("origin.test=127.0.0.1:{}", origin.port);
    let mut args = vec!["--route", &route];
    args.extend(extra);
    unreachable_dest(&args)
}

/// postern with dest.test routed to a port where nothing listens (held until the returned
/// reservation is dropped), fast retries, and `extra` flags.
pub fn unreachable_dest(extra: &[&str]) -> (Server, Reserved) {
    let down = reserve("127.0.0.1", 0);
    let route = format!("dest.test=127.0.0.1:{}", down.1);
    let mut args = vec!["--route", &route];
    args.extend(FAST_RETRY);
    args.extend(extra);
    (Server::start(&args), down)
}

/// A connection to `server`, past its greeting and EHLO.
pub fn greeted(server: &Server) -> common::Client {
    let mut c = server.connect();
    c.line();
    c.send(b"EHLO c.test\r\n");
    c.reply();
    c
}

/// What a scripted next hop does with a line.
pub enum Act {
    /// Write this reply.
    Say(&'static str),
    /// Write this reply, then close the connection.
    SayAndClose(&'static str),
    /// Write this reply once the receiver gets a word (or is dropped).
    SayWhenTold(std::sync::mpsc::Receiver<()>, &'static str),
}

/// What a scripted next hop stored: each message's content with its connection's number.
pub type StoredRx = std::sync::mpsc::Receiver<(usize, String)>;

/// A next hop on a thread, for up to 4 connections: it greets, answers each command line as
/// `answer` says (given the connection's number and the line; where it says nothing, QUIT gets
/// 221 and a close and anything else 250), answers DATA with 354 and a BDAT that is not LAST
/// with 250, and sends each message's content with its connection's number to the first
/// receiver, then does what `after_data` says. The second receiver gets a word after each connection closes.
pub fn scripted_next_hop(
    answer: impl Fn(usize, &str) -> Option<Act> + Send + 'static,
    after_data: Act,
) -> (u16, StoredRx, std::sync::mpsc::Receiver<()>) {
    scripted_next_hop_at("127.0.0.1:0", answer, after_data)
}

/// [`scripted_next_hop`] listening on `bind`.
pub fn scripted_next_hop_at(
    bind: &str,
    answer: impl Fn(usize, &str) -> Option<Act> + Send + 'static,
    after_data: Act,
) -> (u16, StoredRx, std::sync::mpsc::Receiver<()>) {
    scripted_next_hop_going(bind, answer, "354 go\r\n", after_data)
}

/// [`scripted_next_hop_at`] that answers DATA with `go`.
pub fn scripted_next_hop_going(
    bind: &str,
    answer: impl Fn(usize, &str) -> Option<Act> + Send + 'static,
    go: &'static str,
    after_data: Act,
) -> (u16, StoredRx, std::sync::mpsc::Receiver<()>) {
    let go = Act::Say(go);
    let l = TcpListener::bind(bind).unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    let (closed_tx, closed) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for (n, conn) in l.incoming().take(4).enumerate() {
            let Ok(s) = conn else { return };
            // Each reply goes out as it is written: one held back (Nagle) would be thrown
            // away by a close that resets the connection (one with commands unread).
            s.set_nodelay(true).unwrap();
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
                    Some(&go)
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

/// A [`scripted_next_hop`] that answers each RCPT with `reply` once the returned sender
/// says so (once for all; or when it is dropped), and stores the data: its port, and that
/// sender.
pub fn next_hop_answering_rcpt_when_told(
    reply: &'static str,
) -> (u16, std::sync::mpsc::Sender<()>) {
    let (tell, told) = std::sync::mpsc::channel::<()>();
    let told = std::sync::Mutex::new(Some(told));
    let (port, _, _) = scripted_next_hop(
        move |_, line| {
            line.starts_with("RCPT").then(|| {
                let told = told.lock().unwrap().take().unwrap();
                Act::SayWhenTold(told, reply)
            })
        },
        Act::Say("250 2.0.0 stored\r\n"),
    );
    (port, tell)
}

/// `postern queue --json` on `spool`: one object per waiting message.
pub fn queue_listing(spool: &Path) -> Vec<serde_json::Value> {
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

/// The Message-IDs of `n` messages from `stored`, waiting up to 20 s for each.
pub fn message_ids(stored: &std::sync::mpsc::Receiver<(usize, String)>, n: usize) -> Vec<String> {
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
