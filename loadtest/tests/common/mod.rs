//! Helpers shared by the integration tests: the real `postern-load` binary as a sink and as a
//! sender, on 127.0.0.1 with ephemeral ports. The sink says where it listens on its first
//! stdout line, so tests wait for that line, never for a fixed time.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_postern-load");

/// A running sink.
pub struct Sink {
    child: Child,
    stdout: BufReader<ChildStdout>,
    /// Where it listens.
    pub addr: String,
    /// Where its metrics are served, with `--metrics`.
    pub metrics: Option<String>,
}

impl Sink {
    /// Starts `postern-load sink` on an ephemeral loopback port with `extra` flags and waits
    /// until it listens.
    pub fn start(extra: &[&str]) -> Sink {
        let mut child = Command::new(BIN)
            .args(["sink", "--listen", "127.0.0.1:0", "--lifetime", "120s"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the sink");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut metrics = None;
        // Bounded: the sink prints at most two lines before listening, or exits.
        for _ in 0..4 {
            let mut line = String::new();
            if stdout.read_line(&mut line).unwrap() == 0 {
                let mut err = String::new();
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!("the sink exited before listening: {err}");
            }
            if let Some(a) = line.trim().strip_prefix("metrics on ") {
                metrics = Some(a.to_owned());
            }
            if let Some(a) = line.trim().strip_prefix("listening on ") {
                return Sink {
                    child,
                    stdout,
                    addr: a.to_owned(),
                    metrics,
                };
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("the sink did not say where it listens");
    }

    /// The sink's process ID.
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the sink (SIGTERM), waits for it, and returns its counters.
    pub fn stop(mut self) -> Counters {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let mut out = String::new();
        self.stdout.read_to_string(&mut out).unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "sink exit status {status}");
        Counters::parse(&out)
    }
}

impl Drop for Sink {
    /// A test that failed before `stop` leaves no sink behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The counters a sink printed, by metric name (labels included).
#[derive(Debug)]
pub struct Counters(pub BTreeMap<String, u64>);

impl Counters {
    /// Reads Prometheus text.
    pub fn parse(text: &str) -> Counters {
        let mut map = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (name, value) = line.rsplit_once(' ').unwrap();
            let name = name.trim_start_matches("postern_load_sink_");
            map.insert(name.to_owned(), value.parse().unwrap());
        }
        Counters(map)
    }

    /// One counter (0 when absent).
    pub fn get(&self, name: &str) -> u64 {
        self.0.get(name).copied().unwrap_or(0)
    }
}

/// Runs `postern-load send` with `args`.
pub fn send(args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("send")
        .args(["--timeout", "20s"])
        .args(args)
        .output()
        .expect("run the sender")
}

/// Runs the sender against `addr` with `args` and `--json`; returns the JSON report, after
/// checking that the run succeeded.
pub fn send_json(addr: &str, args: &[&str]) -> serde_json::Value {
    let (out, report) = send_with_report(addr, args);
    assert!(
        out.status.success(),
        "sender failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    report
}

/// Runs the sender against `addr` with `args` and `--json`, whatever its exit status; returns
/// what it printed and the JSON report.
#[allow(dead_code)]
pub fn send_with_report(addr: &str, args: &[&str]) -> (Output, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let mut all = vec!["--target", addr, "--json", json.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = send(&all);
    let report = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    (out, report)
}

/// A number from the report.
pub fn num(report: &serde_json::Value, field: &str) -> u64 {
    report[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} missing in {report}"))
}

/// Checks that `record` holds each sequence number of `expected` exactly once, with distinct
/// Message-IDs.
pub fn check_record(record: &Path, expected: impl IntoIterator<Item = u64>) {
    let text = std::fs::read_to_string(record).unwrap();
    let mut seqs = Vec::new();
    let mut ids = BTreeSet::new();
    for line in text.lines() {
        let (seq, id) = line.split_once(' ').unwrap();
        seqs.push(seq.parse::<u64>().unwrap());
        assert!(ids.insert(id.to_owned()), "duplicate Message-ID {id}");
        assert!(
            id.starts_with('<') && id.ends_with("@postern-load.test>"),
            "{id}"
        );
    }
    let unique: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(unique.len(), seqs.len(), "duplicated sequence numbers");
    let expected: BTreeSet<u64> = expected.into_iter().collect();
    let lost: Vec<_> = expected.difference(&unique).take(10).collect();
    let extra: Vec<_> = unique.difference(&expected).take(10).collect();
    assert!(
        lost.is_empty() && extra.is_empty(),
        "lost {lost:?}, unexpected {extra:?}"
    );
}

/// A temporary directory with a record file path in it.
pub fn record_path() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("record.txt");
    (dir, path)
}

/// A self-signed certificate and key for 127.0.0.1, as PEM files in a new directory.
pub fn certificate() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    (dir, cert_path, key_path)
}

/// A scripted server for one connection on an ephemeral loopback port: it greets with `220`,
/// then `script` gets the connection's input (20 s per read at most) and output. Returns the
/// address and the thread, to join once the sender is done.
pub fn one_connection_server(
    script: impl FnOnce(BufReader<std::net::TcpStream>, std::net::TcpStream) + Send + 'static,
) -> (String, std::thread::JoinHandle<()>) {
    serve_one(std::net::TcpListener::bind("127.0.0.1:0").unwrap(), script)
}

/// As [`one_connection_server`], with the connection's receive buffer set to `bytes` (the
/// kernel doubles it) and so kept there: left alone, the kernel grows it as the server reads
/// fast, up to `net.ipv4.tcp_rmem`'s largest (32 MiB on some kernels), and a body the test
/// means to block the sender while the server does not read can then go in whole.
pub fn one_connection_server_with_receive_buffer(
    bytes: usize,
    script: impl FnOnce(BufReader<std::net::TcpStream>, std::net::TcpStream) + Send + 'static,
) -> (String, std::thread::JoinHandle<()>) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    // Set on the listener, before it listens: the accepted connection takes it, with the
    // window scale its handshake offers.
    socket.set_recv_buffer_size(bytes).unwrap();
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    socket.bind(&any.into()).unwrap();
    socket.listen(1).unwrap();
    serve_one(socket.into(), script)
}

fn serve_one(
    listener: std::net::TcpListener,
    script: impl FnOnce(BufReader<std::net::TcpStream>, std::net::TcpStream) + Send + 'static,
) -> (String, std::thread::JoinHandle<()>) {
    use std::io::Write as _;
    let addr = listener.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let mut out = stream.try_clone().unwrap();
        out.write_all(b"220 scripted ESMTP\r\n").unwrap();
        script(BufReader::new(stream), out);
    });
    (addr, server)
}
