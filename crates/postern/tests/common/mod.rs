//! The real `postern` binary on an ephemeral loopback port with a spool in a temporary
//! directory, and a plain SMTP client over a real socket.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// One core on the smallest spool segments the server takes: segments filled, sealed and
/// deleted by a test's few messages.
pub const SMALL_SEGMENTS: [&str; 4] = ["--cores", "1", "--spool-segment-size", "128k"];

/// A running server process; killed when dropped.
pub struct Server {
    pub child: Child,
    pub smtp: SocketAddr,
    /// Every `--listen` address, in the order printed (`smtp` is the first).
    #[allow(dead_code)]
    pub smtp_all: Vec<SocketAddr>,
    pub smtps: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub spool: PathBuf,
    /// What the server has written to stderr (its log).
    log: Arc<(Mutex<String>, Condvar)>,
    _dir: Option<tempfile::TempDir>,
}

/// The line added to a server's kept log once its stderr is closed (the process ended).
const LOG_END: &str = "-- end of log --\n";

impl Server {
    /// Starts `postern serve` with `args` (plus an ephemeral port and a fresh spool unless
    /// given) and waits until it says it is ready. Unless `args` says where to deliver
    /// (`--relay-host`, `--route`, `--dns-server`), mail is held in the queue (`--hold`), so
    /// tests of the accepting side never send traffic beyond loopback.
    pub fn start(args: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        Self::start_in(args, spool, Some(dir))
    }

    /// Like [`Server::start`] on an existing spool directory.
    pub fn start_in(args: &[&str], spool: PathBuf, dir: Option<tempfile::TempDir>) -> Server {
        Self::launch(args, &[], spool, dir)
    }

    /// Like [`Server::start`], run through `wrapper` (a command that runs the one after it).
    pub fn start_via(wrapper: &[&str], args: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        Self::launch_via(wrapper, args, &[], spool, Some(dir))
    }

    /// Like [`Server::start`], with these `POSTERN_*` variables set.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        Self::launch(args, env, spool, Some(dir))
    }

    /// Like [`Server::start_in`], run as user `nobody` (by `setpriv`, from util-linux; the
    /// tests run as root), on a spool directory made for it.
    pub fn start_as_nobody(
        args: &[&str],
        spool: PathBuf,
        dir: Option<tempfile::TempDir>,
    ) -> Server {
        std::fs::create_dir_all(&spool).unwrap();
        let chowned = Command::new("chown")
            .args(["-R", "nobody:nogroup"])
            .arg(&spool)
            .status()
            .unwrap();
        assert!(chowned.success());
        let wrapper = [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--",
        ];
        Self::launch_via(&wrapper, args, &[], spool, dir)
    }

    fn launch(
        args: &[&str],
        env: &[(&str, &str)],
        spool: PathBuf,
        dir: Option<tempfile::TempDir>,
    ) -> Server {
        Self::launch_via(&[], args, env, spool, dir)
    }

    /// Starts the server through `wrapper` (a command that runs the one after it), if any.
    fn launch_via(
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
        spool: PathBuf,
        dir: Option<tempfile::TempDir>,
    ) -> Server {
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut cmd = Command::new(first);
                cmd.args(rest).arg(env!("CARGO_BIN_EXE_postern"));
                cmd
            }
            None => Command::new(env!("CARGO_BIN_EXE_postern")),
        };
        // The tests read the log at its default level; a RUST_LOG of the caller's would change it.
        cmd.env_remove("RUST_LOG");
        cmd.envs(env.iter().copied());
        cmd.arg("serve")
            .arg("--spool")
            .arg(&spool)
            .args(["--hostname", "mx.test"]);
        if !args.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        if !args.contains(&"--cores") {
            cmd.args(["--cores", "2"]);
        }
        let delivers = args
            .iter()
            .any(|a| ["--relay-host", "--route", "--dns-server"].contains(a));
        if !delivers {
            cmd.arg("--hold");
        }
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        // The log (stderr) is passed on to the test's stderr and kept for `log_until`.
        let log = Arc::new((Mutex::new(String::new()), Condvar::new()));
        let kept = log.clone();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            let mut line = String::new();
            while err.read_line(&mut line).is_ok_and(|n| n > 0) {
                eprint!("{line}");
                kept.0.lock().unwrap().push_str(&line);
                kept.1.notify_all();
                line.clear();
            }
            kept.0.lock().unwrap().push_str(LOG_END);
            kept.1.notify_all();
        });
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let (mut smtp, mut smtps, mut metrics) = (None, None, None);
        let mut smtp_all = Vec::new();
        loop {
            let mut line = String::new();
            assert!(
                out.read_line(&mut line).unwrap() > 0,
                "postern exited before it was ready"
            );
            let addr = || {
                line.trim()
                    .rsplit(' ')
                    .next()
                    .unwrap()
                    .parse::<SocketAddr>()
                    .unwrap()
            };
            if line.contains("smtp listening on") {
                smtp_all.push(addr());
                smtp = smtp.or(Some(addr()));
            } else if line.contains("smtps listening on") {
                smtps = Some(addr());
            } else if line.contains("metrics listening on") {
                metrics = Some(addr());
            } else if line.contains("ready with") {
                break;
            }
        }
        // Keep draining stdout so the server never blocks on it.
        std::thread::spawn(move || {
            let mut sink = String::new();
            let _ = out.read_to_string(&mut sink);
        });
        Server {
            child,
            smtp: smtp.expect("no smtp address printed"),
            smtp_all,
            smtps,
            metrics,
            spool,
            log,
            _dir: dir,
        }
    }

    /// Waits (at most 20 s) until a line of the server's log satisfies `pred`; returns it.
    pub fn log_until(&self, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        let (text, changed) = &*self.log;
        let mut text = text.lock().unwrap();
        loop {
            if let Some(line) = text.lines().find(|l| pred(l)) {
                return line.to_owned();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no such log line in:\n{text}");
            text = changed.wait_timeout(text, left).unwrap().0;
        }
    }

    /// How many lines of the server's log so far satisfy `pred`.
    pub fn log_count(&self, pred: impl Fn(&str) -> bool) -> usize {
        let (text, _) = &*self.log;
        text.lock().unwrap().lines().filter(|l| pred(l)).count()
    }

    /// Sends SIGTERM, waits for a successful exit and returns the whole log.
    pub fn terminate_for_log(&mut self) -> String {
        let status = self.terminate();
        assert!(status.success(), "postern exited with {status}");
        let (text, changed) = &*self.log;
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut text = text.lock().unwrap();
        while !text.ends_with(LOG_END) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the log did not end after the process exited"
            );
            text = changed.wait_timeout(text, left).unwrap().0;
        }
        text.clone()
    }

    pub fn connect(&self) -> Client {
        Client::connect(self.smtp)
    }

    /// Sends a signal (`-TERM`, `-HUP`, `-STOP`, ...) to the server process.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal("-TERM");
        self.child.wait().unwrap()
    }

    /// GET a path on the metrics port; returns (status line, body).
    pub fn http_get(&self, path: &str) -> (String, String) {
        self.http_get_with("GET", path)
    }

    /// A request with `method` for a path on the metrics port; returns (status line, body).
    pub fn http_get_with(&self, method: &str, path: &str) -> (String, String) {
        let mut s = TcpStream::connect(self.metrics.expect("no metrics port")).unwrap();
        write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.lines().next().unwrap().to_owned(), body.to_owned())
    }

    /// Reads the metrics until `pred` holds (the cores publish every 250 ms), and returns
    /// them; fails the test when it does not hold within 20 s.
    pub fn metrics_until(&self, pred: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (_, body) = self.http_get("/metrics");
            if pred(&body) {
                return body;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the metrics never came to what the test waits for:\n{body}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A child process that is killed (and reaped) when the guard is dropped, also when the test
/// fails before it stops the child itself.
pub struct KillOnDrop(pub std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A line-oriented SMTP client over a real socket.
pub struct Client {
    pub reader: BufReader<TcpStream>,
    pub stream: TcpStream,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        Self::from_stream(TcpStream::connect(addr).unwrap())
    }

    /// A client on a connection made by the test (from a chosen address, say).
    pub fn from_stream(stream: TcpStream) -> Client {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Client {
            reader: BufReader::new(stream.try_clone().unwrap()),
            stream,
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Reads one whole reply; returns its lines.
    pub fn reply(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).unwrap();
            assert!(
                n > 0,
                "connection closed while waiting for a reply; got {lines:?}"
            );
            let line = line.trim_end().to_owned();
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line);
            if last {
                return lines;
            }
        }
    }

    /// Reads one reply and returns its last line.
    pub fn line(&mut self) -> String {
        self.reply().pop().unwrap()
    }

    /// Sends a command and returns the last line of its reply.
    pub fn cmd(&mut self, command: &str) -> String {
        self.send(format!("{command}\r\n").as_bytes());
        self.line()
    }

    /// Whether the server has closed the connection (reads EOF).
    pub fn closed(&mut self) -> bool {
        let mut rest = String::new();
        self.reader.read_to_string(&mut rest).is_ok() && rest.is_empty()
    }
}

/// The records of one segment file's bytes, as (offset, kind) in order, and where they end
/// (the first zero length word after the 64-byte header; records are 8-aligned).
pub fn segment_records(data: &[u8]) -> (Vec<(usize, u8)>, usize) {
    let mut records = Vec::new();
    let mut at = 64;
    while at + 12 <= data.len() {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        if len == 0 {
            break;
        }
        records.push((at, data[at + 8]));
        at += (12 + len + 7) & !7;
    }
    (records, at)
}

impl Server {
    /// A session that has read the banner and had its EHLO `helo` answered.
    pub fn greeted(&self, helo: &str) -> Client {
        let mut c = self.connect();
        c.line();
        c.cmd(&format!("EHLO {helo}"));
        c
    }

    /// A session greeted with EHLO client.test that has had `354` to DATA for one recipient.
    pub fn in_data(&self) -> Client {
        let mut c = self.connect();
        assert!(c.line().starts_with("220"));
        c.send(b"EHLO client.test\r\n");
        c.reply();
        assert!(c.cmd("MAIL FROM:<a@client.test>").starts_with("250"));
        assert!(c.cmd("RCPT TO:<b@example.org>").starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        c
    }
}

/// The queue ID in a `250 2.0.0 Ok: queued as ID` reply.
pub fn queue_id(reply: &str) -> String {
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    reply.rsplit(' ').next().unwrap().to_owned()
}

/// Recovers the spool and returns (queue ID, reverse path, recipients, body) of each message.
pub fn spooled(spool: &Path) -> Vec<(String, String, Vec<String>, Vec<u8>)> {
    let r = postern_spool::recover(spool).unwrap();
    r.messages
        .iter()
        .map(|m| {
            (
                m.queue_id.clone(),
                m.meta.reverse_path.clone(),
                m.meta.recipients.iter().map(|r| r.path.clone()).collect(),
                r.body_vec(m),
            )
        })
        .collect()
}

/// A tmpfs of `size` (like `4m`) mounted on a fresh directory for a full-disk test, unmounted
/// when dropped. Needs the privilege to mount (root in CI).
pub struct Tmpfs {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(
            mounted.success(),
            "this test mounts a {size} tmpfs: run it as root (CI does)"
        );
        Tmpfs { path, _dir: dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

/// A file system in a file (`kind`: `ext4` or `btrfs`), loop-mounted on a fresh directory,
/// that a test can freeze (`fsfreeze`: every write and sync to it waits until it is thawed,
/// as on a disk that hangs). Thawed and unmounted when dropped. Needs root and loop devices
/// (CI has both; scripts/test installs the mkfs programs).
pub struct LoopFs {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopFs {
    pub fn mount(kind: &str, size_mib: u64) -> LoopFs {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("fs.img");
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).unwrap();
        std::fs::File::create(&image)
            .unwrap()
            .set_len(size_mib << 20)
            .unwrap();
        let force = if kind == "ext4" { "-F" } else { "-f" };
        let made = Command::new(format!("mkfs.{kind}"))
            .args(["-q", force])
            .arg(&image)
            .status()
            .unwrap();
        assert!(made.success(), "mkfs.{kind} failed");
        let mounted = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&path)
            .status()
            .unwrap();
        assert!(
            mounted.success(),
            "this test loop-mounts a {kind} image: run it as root with loop devices (CI does)"
        );
        LoopFs { path, _dir: dir }
    }

    /// Freezes it until the guard is dropped. Bind the guard after anything that waits for
    /// a process using the file system (a [`Server`], which is killed and waited for when
    /// dropped): dropped first, it thaws before that wait, also when the test fails.
    pub fn freeze(&self) -> Frozen<'_> {
        let status = Command::new("fsfreeze")
            .arg("--freeze")
            .arg(&self.path)
            .status()
            .unwrap();
        assert!(status.success(), "fsfreeze --freeze failed");
        Frozen(self)
    }
}

/// A frozen [`LoopFs`], thawed when dropped.
pub struct Frozen<'a>(&'a LoopFs);

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze")
            .arg("--unfreeze")
            .arg(&self.0.path)
            .status();
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        // Thawed first: a frozen file system would hang whatever still writes to it.
        let _ = Command::new("fsfreeze")
            .arg("--unfreeze")
            .arg(&self.path)
            .status();
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

/// The threads of process `pid` that wait in the kernel without interruption (state `D`: on
/// I/O, or on a frozen file system), each with what it waits in (`wchan`).
fn threads_in_d_state(pid: u32) -> Vec<(String, String)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
                // The state follows the command name, which is in parentheses.
                stat.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('D'))
            })
        })
        .map(|task| {
            let wchan = std::fs::read_to_string(task.path().join("wchan")).unwrap_or_default();
            (task.file_name().to_string_lossy().into_owned(), wchan)
        })
        .collect()
}

/// Waits (at most 20 s) until a thread of process `pid` waits on a frozen file system; the
/// test fails if none does. A wait of a moment in state `D` (a page of the program read from
/// disk as it starts, before it even handles its signals) is not one: the thread must wait
/// where a frozen file system holds writers (`percpu_rwsem_wait`, `sb_start_write`), or stay
/// in `D` for half a second.
pub fn wait_for_d_state(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut since: std::collections::HashMap<String, Instant> = Default::default();
    loop {
        let now = Instant::now();
        let waiting = threads_in_d_state(pid);
        since.retain(|tid, _| waiting.iter().any(|(t, _)| t == tid));
        for (tid, wchan) in &waiting {
            let first = *since.entry(tid.clone()).or_insert(now);
            let frozen = ["percpu_rwsem", "sb_start_write", "freeze"]
                .iter()
                .any(|w| wchan.contains(w));
            if frozen || now.duration_since(first) >= Duration::from_millis(500) {
                return;
            }
        }
        assert!(
            now < deadline,
            "no thread of the server waits on the frozen file system"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `postern` with `args` to its end: exit code, stdout, stderr. One still running after
/// 20 s (a server that started where it should have refused) is killed and the test fails,
/// rather than waiting for it for ever.
pub fn run_bounded(args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_postern"));
    cmd.args(args);
    run_command_bounded(cmd)
}

/// Like [`run_bounded`] for any command (postern under `strace` or `prlimit`, say).
pub fn run_command_bounded(cmd: Command) -> (i32, String, String) {
    run_command_within(cmd, Duration::from_secs(20))
}

/// Like [`run_command_bounded`] with a bound of `limit`.
pub fn run_command_within(mut cmd: Command, limit: Duration) -> (i32, String, String) {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("{what} is still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status.code().unwrap_or(-1),
        out.join().unwrap(),
        err.join().unwrap(),
    )
}

/// A pass-through FUSE file system (`tests/peers/faulty_fs.py`, on fusepy) over a fresh
/// directory, whose syncs fail with `EIO` while [`FaultyFs::fail_syncs`] is on, as on a disk
/// whose write-back failed, and whose writes fail while [`FaultyFs::fail_writes`] is on. Unmounted when dropped. Needs root, `/dev/fuse`, libfuse 2 and
/// fusepy (scripts/test installs the last two).
pub struct FaultyFs {
    pub path: PathBuf,
    control: PathBuf,
    daemon: KillOnDrop,
    _dir: tempfile::TempDir,
}

impl FaultyFs {
    pub fn mount() -> FaultyFs {
        Self::mount_with(false)
    }

    /// [`FaultyFs::mount`], serving each request on a thread of its own: a sync that hangs
    /// ([`FaultyFs::hang_syncs`]) holds only itself.
    pub fn mount_threaded() -> FaultyFs {
        Self::mount_with(true)
    }

    fn mount_with(threads: bool) -> FaultyFs {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let path = dir.path().join("mnt");
        let control = dir.path().join("fail-syncs");
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(&path).unwrap();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/faulty_fs.py");
        let mut daemon = KillOnDrop(
            Command::new("python3")
                .arg(script)
                .args([&root, &path, &control])
                .env("FAULTY_FS_THREADS", if threads { "1" } else { "0" })
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let target = path.to_str().unwrap().to_owned();
        let mounted = || {
            std::fs::read_to_string("/proc/mounts")
                .unwrap()
                .lines()
                .any(|l| l.split(' ').nth(1) == Some(target.as_str()))
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !mounted() {
            if let Some(status) = daemon.try_wait().unwrap() {
                let mut err = String::new();
                let _ = daemon.stderr.take().unwrap().read_to_string(&mut err);
                panic!(
                    "faulty_fs.py ended ({status}) without mounting: it needs root, /dev/fuse, \
                     libfuse 2 and fusepy (scripts/test installs them):\n{err}"
                );
            }
            assert!(
                Instant::now() < deadline,
                "faulty_fs.py did not mount in 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        FaultyFs {
            path,
            control,
            daemon,
            _dir: dir,
        }
    }

    /// From now on every fsync and fdatasync under the mount fails with `EIO` (`false`: they
    /// work again).
    pub fn fail_syncs(&self, on: bool) {
        Self::switch(&self.control, on);
    }

    /// From now on the fsyncs and fdatasyncs of the file called `name` (in any directory)
    /// fail with `EIO` (until [`FaultyFs::fail_syncs`] is called with `false`).
    pub fn fail_syncs_of(&self, name: &str) {
        std::fs::write(&self.control, name).unwrap();
    }

    /// From now on every fsync and fdatasync fails with `ENOSPC`, as on a copy-on-write file
    /// system that finds no room for the blocks it writes back.
    pub fn fail_syncs_for_room(&self) {
        std::fs::write(&self.control, "ENOSPC:").unwrap();
    }

    /// From now on every fsync and fdatasync waits until this is called with `false` (a disk
    /// that stops answering).
    pub fn hang_syncs(&self, on: bool) {
        Self::switch(&self.control.with_extension("hang"), on);
    }

    /// Lets the syncs that wait go on, if any do (never fails: for a guard's drop).
    pub fn stop_hanging(&self) {
        let _ = std::fs::remove_file(self.control.with_extension("hang"));
    }

    /// Whether a sync has waited since [`FaultyFs::hang_syncs`] began.
    pub fn a_sync_hangs(&self) -> bool {
        self.control.with_extension("hanging").exists()
    }

    /// From now on listing a directory called `name` (in any directory) fails with `EIO`;
    /// `None`: listings work again.
    pub fn fail_listing_of(&self, name: Option<&str>) {
        let control = self.control.with_extension("readdir");
        match name {
            Some(name) => std::fs::write(control, name).unwrap(),
            None => std::fs::remove_file(control).unwrap(),
        }
    }

    /// From now on every read of the file called `name` (in any directory) that reaches the
    /// 4096 octets from `offset` fails with `EIO`, as over a bad sector. Reads of a file open
    /// before this may still be served from the page cache; one opened after is read anew.
    pub fn fail_reads_of(&self, name: &str, offset: u64) {
        std::fs::write(
            self.control.with_extension("reads"),
            format!("{name} {offset}"),
        )
        .unwrap();
    }

    /// From now on every write under the mount fails with `EIO` (`false`: they work again).
    pub fn fail_writes(&self, on: bool) {
        Self::switch(&self.control.with_extension("writes"), on);
    }

    fn switch(control: &Path, on: bool) {
        if on {
            std::fs::write(control, b"").unwrap();
        } else {
            std::fs::remove_file(control).unwrap();
        }
    }
}

impl Drop for FaultyFs {
    fn drop(&mut self) {
        // Lazily: a server still being killed may hold files open there.
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        let _ = self.daemon.0.kill();
        let _ = self.daemon.0.wait();
    }
}
