//! SIGTERM (SIGINT, SIGQUIT): no new connections, idle sessions get 421, a body in flight is finished and
//! acknowledged, the spool is synced, exit status 0.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write as _;
use std::net::TcpStream;

use common::{queue_id, spooled, Server};

#[test]
fn sigterm_finishes_the_transaction_in_flight_and_says_421_to_idle_sessions() {
    finishes_in_flight_and_says_421_to_idle_sessions("-TERM");
}

#[test]
fn sigquit_stops_as_sigterm_does() {
    // A terminal's Ctrl-\: by its default action the server would end at once, its sessions
    // told nothing.
    finishes_in_flight_and_says_421_to_idle_sessions("-QUIT");
}

/// The stop at `signal`: the body being sent is finished and acknowledged, then 421, as an
/// idle session gets at once; no new connections, exit status 0.
fn finishes_in_flight_and_says_421_to_idle_sessions(signal: &str) {
    let mut server = Server::start(&["--cores", "1"]);
    let mut idle = server.connect();
    idle.line();
    idle.cmd("EHLO idle.test");
    let mut busy = in_data(&server, "busy.test");
    busy.send(b"Subject: in flight\r\n\r\nfirst half\r\n");

    // Ask the server to stop while the body is half sent.
    server.signal(signal);

    assert_eq!(
        idle.line(),
        "421 4.3.2 mx.test Service shutting down, closing connection"
    );
    assert!(idle.closed());
    busy.send(b"second half\r\n.\r\n");
    let id = queue_id(&busy.line());
    assert_eq!(
        busy.line(),
        "421 4.3.2 mx.test Service shutting down, closing connection"
    );

    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        TcpStream::connect(server.smtp).is_err(),
        "still accepting after stop"
    );
    let msgs = spooled(&server.spool);
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].0, id);
    assert!(msgs[0].3.ends_with(b"first half\r\nsecond half\r\n"));
}

#[test]
fn sigterm_lets_a_bdat_transaction_between_chunks_finish() {
    let mut server = Server::start(&["--cores", "1"]);
    let mut idle = server.greeted("idle.test");
    let mut chunked = server.greeted("chunked.test");
    chunked.cmd("MAIL FROM:<a@b.test>");
    chunked.cmd("RCPT TO:<c@d.test>");
    chunked.send(b"BDAT 22\r\nSubject: chunked\r\n\r\nab");
    assert_eq!(chunked.line(), "250 2.0.0 22 octets received");

    server.signal("-TERM");
    // The idle session hears of the stop; the one between chunks may still finish.
    assert_eq!(
        idle.line(),
        "421 4.3.2 mx.test Service shutting down, closing connection"
    );
    chunked.send(b"BDAT 4 LAST\r\ncd\r\n");
    let id = queue_id(&chunked.line());
    assert_eq!(
        chunked.line(),
        "421 4.3.2 mx.test Service shutting down, closing connection"
    );
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let msgs = spooled(&server.spool);
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].0, id);
    assert!(msgs[0].3.ends_with(b"Subject: chunked\r\n\r\nabcd\r\n"));
}

#[test]
fn a_body_still_unfinished_when_the_grace_ends_gets_421_and_is_not_stored() {
    let mut server = Server::start(&["--cores", "1", "--shutdown-grace", "500ms"]);
    let mut stalled = in_data(&server, "stalled.test");
    stalled.send(b"Subject: never finished\r\n\r\nhalf\r\n");
    let mut chunked = server.connect();
    chunked.line();
    chunked.cmd("EHLO chunked.test");
    chunked.cmd("MAIL FROM:<a@b.test>");
    chunked.cmd("RCPT TO:<c@d.test>");
    chunked.send(b"BDAT 100 LAST\r\nten octets");

    server.signal("-TERM");
    // RFC 5321 3.8: the server says 421 before it closes, even inside a body.
    for c in [&mut stalled, &mut chunked] {
        assert_eq!(
            c.line(),
            "421 4.3.2 mx.test Service shutting down, closing connection"
        );
        assert!(c.closed());
    }
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(spooled(&server.spool).is_empty());
}

/// A second SIGTERM does not wait out the grace: the body still coming gets 421 at once (the
/// client's reads give up after 10 s, the grace is a minute), and the log says why.
#[test]
fn a_second_sigterm_cuts_the_grace_short() {
    let mut server = Server::start(&["--cores", "1", "--shutdown-grace", "60s"]);
    let mut stalled = in_data(&server, "stalled.test");
    stalled.send(b"Subject: never finished\r\n\r\nhalf\r\n");
    server.signal("-TERM");
    server.log_until(|l| l.contains("stopping: no new connections"));
    server.signal("-INT");
    assert_eq!(
        stalled.line(),
        "421 4.3.2 mx.test Service shutting down, closing connection"
    );
    assert!(stalled.closed());
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    server.log_until(|l| l.contains("stopping now: the grace") && l.contains("cut short"));
    let over = server.log_until(|l| l.contains("the stop's grace is over with sessions"));
    assert!(over.contains("sessions=1"), "{over}");
    assert!(spooled(&server.spool).is_empty());
}

/// `timeout(1)` signals the process and then its process group: one stop, asked twice by
/// one process. The grace is not cut short for it; a stop signal from another process still
/// hurries the stop.
#[test]
fn a_stop_signal_sent_again_by_the_same_process_is_the_same_stop() {
    let mut server = Server::start(&["--cores", "1", "--shutdown-grace", "60s"]);
    let mut finishing = in_data(&server, "finishing.test");
    finishing.send(b"Subject: in flight\r\n\r\nfirst half\r\n");
    let mut stalled = in_data(&server, "stalled.test");
    stalled.send(b"Subject: never finished\r\n\r\nhalf\r\n");
    // One shell, its builtin kill: both come from the shell's process, the second after the
    // first was taken (as a supervisor's second would be).
    let pid = server.child.id();
    let twice = format!("kill -TERM {pid}; sleep 0.2; kill -TERM {pid}");
    let status = std::process::Command::new("sh")
        .args(["-c", &twice])
        .status()
        .unwrap();
    assert!(status.success());
    server.log_until(|l| l.contains("a stop signal again from the same process"));
    // Still the graceful stop: the message in flight is finished and acknowledged.
    finishing.send(b"second half\r\n.\r\n");
    assert!(finishing.line().starts_with("250 2.0.0 Ok: queued as "));
    assert_eq!(
        server.log_count(|l| l.contains("cut short")),
        0,
        "the grace was cut short"
    );
    // Another process's stop signal is a second request: it hurries the stop.
    server.signal("-TERM");
    assert_eq!(
        stalled.line(),
        "421 4.3.2 mx.test Service shutting down, closing connection"
    );
    server.log_until(|l| l.contains("stopping now: the grace") && l.contains("cut short"));
    assert!(server.child.wait().unwrap().success());
}

/// A session greeted as `helo`, inside a transaction's DATA (354 received).
fn in_data(server: &Server, helo: &str) -> common::Client {
    let mut c = server.connect();
    c.line();
    c.cmd(&format!("EHLO {helo}"));
    c.cmd("MAIL FROM:<a@b.test>");
    c.cmd("RCPT TO:<c@d.test>");
    assert_eq!(c.cmd("DATA"), "354 End data with <CR><LF>.<CR><LF>");
    c
}

#[test]
fn connections_waiting_to_be_accepted_at_sigterm_get_421_not_a_reset() {
    let mut server = Server::start(&["--cores", "1"]);
    // While the process is stopped, the kernel completes these handshakes and queues
    // them on the listener; the server sees them only after it has been told to stop.
    server.signal("-STOP");
    let waiting: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(server.smtp).unwrap())
        .collect();
    server.signal("-TERM");
    server.signal("-CONT");
    for (i, stream) in waiting.into_iter().enumerate() {
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut text = String::new();
        let read = std::io::Read::read_to_string(&mut &stream, &mut text);
        assert!(read.is_ok(), "connection {i}: {read:?} after {text:?}");
        let last = text.lines().last().unwrap_or_default().to_owned();
        assert_eq!(
            last, "421 4.3.2 mx.test Service shutting down, closing connection",
            "connection {i} read {text:?}"
        );
    }
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_transaction_pipelined_behind_the_body_finished_in_the_grace_gets_421() {
    let mut server = Server::start(&["--cores", "1", "--metrics", "127.0.0.1:0"]);
    let mut idle = server.connect();
    idle.line();
    let mut busy = in_data(&server, "busy.test");
    busy.send(b"Subject: in flight\r\n\r\nbody\r\n");
    // A second body that never ends holds the stop in its grace meanwhile.
    let mut held = in_data(&server, "held.test");
    held.send(b"Subject: never finished\r\n\r\n");
    server.signal("-TERM");
    // The idle session's 421 says the core has seen the stop.
    assert_eq!(
        idle.line(),
        "421 4.3.2 mx.test Service shutting down, closing connection"
    );
    // The end of the body, and a whole new transaction behind it in the same write.
    busy.send(
        b".\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<second@d.test>\r\nDATA\r\n\
          Subject: after the stop\r\n\r\nbody\r\n.\r\n",
    );
    let id = queue_id(&busy.line());
    assert_eq!(
        busy.line(),
        "421 4.3.2 mx.test Service shutting down, closing connection"
    );
    assert!(busy.closed());
    // The figures of what the grace finished are published while the stop goes on.
    let metrics = server.metrics_until(|m| m.contains("postern_messages_accepted_total 1\n"));
    assert!(
        metrics.contains("postern_messages_accepted_total 1\n"),
        "{metrics}"
    );
    drop(held);
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let stored = spooled(&server.spool);
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].0, id);
}

#[test]
fn no_transaction_starts_once_the_stop_is_asked_for() {
    let mut server = Server::start(&["--cores", "1"]);
    let mut busy = in_data(&server, "busy.test");
    busy.send(b"Subject: in flight\r\n\r\nbody\r\n");
    server.signal("-TERM");
    // As soon as the stop is asked for (the log says so once it is), not at the core's next
    // look at it: the body ends, and the transaction pipelined behind it is refused.
    server.log_until(|l| l.contains("stopping: no new connections"));
    busy.send(b".\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<second@d.test>\r\n");
    let id = queue_id(&busy.line());
    assert_eq!(
        busy.line(),
        "421 4.3.2 mx.test Service shutting down, closing connection"
    );
    assert!(busy.closed());
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let stored = spooled(&server.spool);
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].0, id);
}

#[test]
fn a_client_that_never_reads_its_replies_does_not_hold_the_stop() {
    // It pipelines commands and reads nothing: the server's writes wait on a full socket. It
    // has no transaction in flight, so the stop ends it after a short last write, long
    // before the grace (or the command timeout) would.
    use std::io::Write;
    use std::time::{Duration, Instant};
    // NOOPs without end: no junk command limit, or it would end the session first.
    let mut server = Server::start(&[
        "--cores",
        "1",
        "--shutdown-grace",
        "60s",
        "--max-junk-commands",
        "0",
    ]);
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.smtp.into()).unwrap();
    let mut tcp = TcpStream::from(socket);
    tcp.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let batch = "NOOP\r\n".repeat(10_000);
    // Until the server stops reading, which it does only while its own write waits: a write
    // that cannot finish in 2 s. Bounded at 256 MiB.
    let mut stalled = false;
    for _ in 0..(256 << 20) / batch.len() {
        if tcp.write_all(batch.as_bytes()).is_err() {
            stalled = true;
            break;
        }
    }
    assert!(
        stalled,
        "the server read everything without its replies being read"
    );
    let asked = Instant::now();
    server.signal("-TERM");
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            asked.elapsed() < Duration::from_secs(15),
            "the stop waited for the client that does not read"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn sigusr1_while_stopping_starts_no_delivery_and_says_so() {
    // Delivering (a route, not --hold), held in its grace by a body in flight.
    let mut server = Server::start(&["--cores", "1", "--route", "dest.test=127.0.0.1:9"]);
    let mut busy = in_data(&server, "busy.test");
    busy.send(b"Subject: in flight\r\n\r\nhalf\r\n");
    server.signal("-TERM");
    server.log_until(|l| l.contains("stopping: no new connections"));
    server.signal("-USR1");
    let line = server.log_until(|l| l.contains("SIGUSR1"));
    assert!(
        line.contains("not flushing, the server is stopping"),
        "{line}"
    );
    busy.send(b".\r\n");
    queue_id(&busy.line());
    assert!(server.child.wait().unwrap().success());
}

/// A stop that hangs on its disk (here a frozen file system under the spool) ends at the
/// third SIGTERM: the first stops, the second cuts the grace, the third ends the process by
/// its signal, which an operator (or a supervisor) sends when the second was not enough.
#[test]
fn a_third_sigterm_ends_a_stop_that_hangs_on_its_disk() {
    let fs = common::LoopFs::mount("ext4", 256);
    let spool = fs.path.join("spool");
    let mut server = Server::start_in(&["--cores", "1"], spool, None);
    // One message first, so the spool's files are made before the freeze.
    let mut first = in_data(&server, "first.test");
    first.send(b"Subject: before\r\n\r\nx\r\n.\r\n");
    assert!(first.line().starts_with("250 "));
    let frozen = fs.freeze();
    // The next message's sync waits for the thaw, and the stop with it.
    let mut stuck = in_data(&server, "stuck.test");
    stuck.send(b"Subject: during\r\n\r\ny\r\n.\r\n");
    let pid = server.child.id();
    common::wait_for_d_state(pid);
    server.signal("-TERM");
    server.log_until(|l| l.contains("stopping: no new connections"));
    server.signal("-TERM");
    server.log_until(|l| l.contains("stopping now"));
    server.signal("-TERM");
    server.log_until(|l| l.contains("a third stop signal: ending at once"));
    // It ends as soon as the kernel lets its threads go: at the thaw.
    drop(frozen);
    let status = server.child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status}");
}

#[test]
fn a_stop_is_heard_while_a_deletion_request_waits_on_a_frozen_spool() {
    // SIGUSR2 has the server take `postern queue --delete`'s requests out of the spool
    // directory (a rename, a read, a removal), which on a frozen file system waits for the
    // thaw. Before, the signal thread itself waited there, and no SIGTERM was heard until
    // the thaw, not even the third that ends the process at once.
    let fs = common::LoopFs::mount("ext4", 256);
    let spool = fs.path.join("spool");
    let mut server = Server::start_in(&["--cores", "1"], spool.clone(), None);
    std::fs::write(spool.join("postern.delete.4242"), "NOSUCHID 1\n").unwrap();
    let frozen = fs.freeze();
    server.signal("-USR2");
    common::wait_for_d_state(server.child.id());
    server.signal("-TERM");
    server.log_until(|l| l.contains("stopping: no new connections"));
    // The stop's last sync waits for the thaw too; then the server ends as usual, and the
    // request is taken (and found to name no message).
    drop(frozen);
    assert!(server.child.wait().unwrap().success());
    assert!(!spool.join("postern.delete.4242").exists());
}

#[test]
fn a_stray_sigalrm_is_logged_and_the_server_goes_on() {
    // Its default action ends a process at once: no 421s, no last sync, no exit 0.
    let mut server = Server::start(&[]);
    server.signal("-ALRM");
    server.log_until(|l| l.contains("SIGALRM ignored; SIGTERM stops postern"));
    let mut c = server.connect();
    assert!(c.line().starts_with("220 "));
    assert_eq!(c.cmd("NOOP"), "250 2.0.0 Ok");
    assert!(server.terminate().success());
}

#[test]
fn only_the_signal_thread_takes_the_signals_the_server_handles() {
    // The kernel gives a signal sent to the process to any thread that does not block it: one
    // waiting on a disk without interruption would hold it pending. Every thread but the
    // signal thread (the log's writer, the cores, their helpers, the signal chores) blocks
    // SIGHUP, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM and SIGTERM.
    let server = Server::start(&[]);
    let handled: u64 = [1u32, 2, 3, 10, 12, 14, 15]
        .iter()
        .map(|s| 1u64 << (s - 1))
        .sum();
    let tasks = std::fs::read_dir(format!("/proc/{}/task", server.child.id())).unwrap();
    let mut seen = Vec::new();
    for task in tasks {
        // A thread that ended meanwhile (a helper of the blocking pool) is passed over.
        let Ok(status) = std::fs::read_to_string(task.unwrap().path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap()
                .trim()
                .to_owned()
        };
        let (name, blocked) = (field("Name:"), field("SigBlk:"));
        let blocked = u64::from_str_radix(&blocked, 16).unwrap();
        if name == "signals" {
            assert_eq!(blocked & handled, 0, "the signal thread blocks {blocked:x}");
        } else {
            assert_eq!(
                blocked & handled,
                handled,
                "thread {name} blocks {blocked:x}"
            );
        }
        seen.push(name);
    }
    assert_eq!(
        seen.iter().filter(|n| *n == "signals").count(),
        1,
        "{seen:?}"
    );
    assert!(seen.len() > 3, "{seen:?}");
}

#[test]
#[cfg(debug_assertions)] // The hook that makes a core fail is in debug builds only.
fn a_core_that_fails_stops_the_others_without_waiting_out_the_grace() {
    // A core that fails (a bug; made to here, in a debug build) stops the server, exit status
    // 1, for its supervisor to start it again. The other cores' stops waited for the failed
    // core to wind its deliveries down, which it never does, until the grace was over (30 s
    // by default), with nothing in flight and the listeners already closed.
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let mut child = common::KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_postern"))
            .args(["serve", "--listen", "127.0.0.1:0", "--cores", "2"])
            .args(["--route", "x.test=127.0.0.1:9", "--hostname", "mx.test"])
            .args(["--shutdown-grace", "30s", "--spool"])
            .arg(dir.path().join("spool"))
            .env("POSTERN_DEBUG_FAIL_CORE", "1")
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "still running with a failed core"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(1), "{status}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "the stop took {:?}",
        started.elapsed()
    );
}

#[test]
fn stop_signals_act_while_the_start_hangs_on_its_disk() {
    // The spool's file system is frozen before the start: the start waits on it. Stop
    // signals are handled all the same: the first two say so, and the third ends the process
    // as soon as the kernel lets its threads go (at the thaw). Before, they waited unread
    // until the start was done, and three came out as one graceful stop.
    use std::io::BufRead;
    use std::os::unix::process::ExitStatusExt;
    let fs = common::LoopFs::mount("ext4", 64);
    let spool = fs.path.join("spool");
    // Declared before the freeze's guard, so dropped after it: a test that fails thaws the
    // file system before it kills and waits for the process.
    let mut server = None;
    let frozen = fs.freeze();
    let child = server.insert(common::KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_postern"))
            .args(["serve", "--listen", "127.0.0.1:0", "--cores", "1", "--hold"])
            .arg("--spool")
            .arg(&spool)
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let (tx, rx) = std::sync::mpsc::channel();
    let err = std::io::BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn(move || {
        for line in err.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let pid = child.id();
    common::wait_for_d_state(pid);
    let wait_for = |what: &str| loop {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no line saying {what:?}"));
        if line.contains(what) {
            break;
        }
    };
    let term = || {
        assert!(std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success());
    };
    term();
    wait_for("stopping: no new connections");
    term();
    wait_for("stopping now");
    term();
    wait_for("a third stop signal: ending at once");
    drop(frozen);
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status}");
}

/// Waits at most 20 s for `server` to end; its exit status.
fn exit_within_20s(server: &mut Server) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running 20 s after the stop"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `postern ready` with `args` (and `metrics` in POSTERN_METRICS when given): exit code,
/// stdout, stderr.
fn ready(args: &[&str], metrics: Option<&str>) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_postern"));
    cmd.arg("ready").args(args).env_remove("POSTERN_METRICS");
    if let Some(m) = metrics {
        cmd.env("POSTERN_METRICS", m);
    }
    common::run_command_bounded(cmd)
}

/// A listener on loopback for one connection: `answer` gets it once its request is read.
fn one_answer_server(
    answer: impl FnOnce(std::net::TcpStream) + Send + 'static,
) -> (String, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = listener.local_addr().unwrap().to_string();
    let thread = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut request = std::io::BufReader::new(conn.try_clone().unwrap());
        let mut line = String::new();
        // Bounded: the request's lines, up to the blank one (or the read timeout).
        while std::io::BufRead::read_line(&mut request, &mut line).unwrap_or(0) > 0
            && line != "\r\n"
        {
            line.clear();
        }
        answer(conn);
    });
    (at, thread)
}

#[test]
fn postern_ready_asks_the_server_whether_it_takes_mail() {
    let mut server = Server::start(&["--drain-time", "1h", "--metrics", "127.0.0.1:0"]);
    let metrics = server.metrics.unwrap();
    let at = metrics.to_string();
    // Given as a flag, and as the server's own setting says it (POSTERN_METRICS, on every
    // address, as in the container image): asked on loopback.
    let every = format!("0.0.0.0:{}", metrics.port());
    for (args, env) in [
        (vec!["--metrics", at.as_str()], None),
        (vec![], Some(every.as_str())),
    ] {
        let (code, out, err) = ready(&args, env);
        assert_eq!((code, out.as_str()), (0, "ready\n"), "{err}");
    }
    // A stdout that takes nothing (full, or a pipe whose reader is gone) changes nothing of
    // the answer, which is the exit status.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["ready", "--metrics", &at, "--timeout", "10s"])
        .env_remove("POSTERN_METRICS")
        .stdout(full)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.is_empty(), "{err}");
    // Draining: /readyz answers 503, and so does the command, with the reason.
    server.signal("-TERM");
    server.log_until(|l| l.contains("draining: /readyz answers 503"));
    let (code, _, err) = ready(&["--metrics", &at], None);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err,
        format!("postern: not ready: {at} answers 503 draining\n")
    );
    server.signal("-TERM");
    let status = exit_within_20s(&mut server);
    assert!(status.success(), "{status:?}");
    // Nothing listening, and a listener turned off: not ready, one line each.
    let (code, _, err) = ready(&["--metrics", &at, "--timeout", "2s"], None);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.starts_with("postern: not ready: no answer from the metrics listener"),
        "{err}"
    );
    // serve has no metrics listener unless asked for one: the line says where to look.
    assert!(err.contains("with --metrics on this address?"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let (code, _, err) = ready(&[], Some("none"));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("turned off"), "{err}");
    // A listener that takes the connection and never answers: the wait is named, not the
    // socket's error.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = silent.local_addr().unwrap().to_string();
    let (code, _, err) = ready(&["--metrics", &at, "--timeout", "300ms"], None);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err,
        format!("postern: not ready: the metrics listener at {at} did not answer within 300ms\n")
    );
    drop(silent);
    // One that answers an octet at a time without end: the timeout is the whole exchange's,
    // not each read's.
    let (at, trickle) = one_answer_server(|mut conn| {
        // Bounded: 100 octets, 100 ms apart, whatever the command does.
        for &b in b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Padding: "
            .iter()
            .cycle()
            .take(100)
        {
            if conn.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    });
    let started = std::time::Instant::now();
    let (code, _, err) = ready(&["--metrics", &at, "--timeout", "1s"], None);
    let took = started.elapsed();
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err,
        format!("postern: not ready: the metrics listener at {at} did not answer within 1s\n")
    );
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    trickle.join().unwrap();
    // A server's answer is one line of the command's, with nothing a terminal acts on.
    let (at, odd) = one_answer_server(|mut conn| {
        let _ = conn.write_all(
            b"HTTP/1.1 503 Service Unavailable\r\n\r\nline one\nline\ttwo\r\nthree\x1b[2J\xe2\x80\xae\n",
        );
    });
    let (code, _, err) = ready(&["--metrics", &at], None);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err,
        format!(
            "postern: not ready: {at} answers 503 line one line two three\\u{{1b}}[2J\\u{{202e}}\n"
        )
    );
    odd.join().unwrap();
    // Port 0 names no running listener.
    let (code, _, err) = ready(&["--metrics", "127.0.0.1:0"], None);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--metrics") && err.contains("port 0"), "{err}");
    // A wrong flag is one line naming it, exit 2, as for the other commands.
    let (code, _, err) = ready(&["--timeout", "0s"], None);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.starts_with("postern: ") && err.contains("--timeout"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn a_drain_says_not_ready_while_it_still_takes_mail_then_stops() {
    let mut server = Server::start(&["--drain-time", "2s", "--metrics", "127.0.0.1:0"]);
    assert_eq!(server.http_get("/readyz").0, "HTTP/1.1 200 OK");
    let mut before = server.connect();
    before.line();
    server.signal("-TERM");
    server.log_until(|l| l.contains("draining: /readyz answers 503"));
    let (status, body) = server.http_get("/readyz");
    assert_eq!(
        (status.as_str(), body.as_str()),
        ("HTTP/1.1 503 Service Unavailable", "draining\n")
    );
    // A session from before and a new one both go on taking mail.
    let mut after = server.connect();
    assert!(after.line().starts_with("220 "));
    for c in [&mut before, &mut after] {
        c.cmd("EHLO drain.test");
        assert_eq!(c.cmd("MAIL FROM:<a@b.test>"), "250 2.1.0 Ok");
        assert_eq!(c.cmd("RCPT TO:<c@d.test>"), "250 2.1.5 Ok");
        assert!(c.cmd("DATA").starts_with("354"));
        queue_id(&c.cmd("Subject: drained\r\n\r\nx\r\n."));
    }
    // Then the stop, by itself.
    server.log_until(|l| l.contains("drained; stopping"));
    assert_eq!(
        after.line(),
        "421 4.3.2 mx.test Service shutting down, closing connection"
    );
    let status = exit_within_20s(&mut server);
    assert!(status.success(), "{status:?}");
    assert_eq!(spooled(&server.spool).len(), 2);
}

#[test]
fn a_second_signal_during_a_drain_stops_at_once() {
    let mut server = Server::start(&["--drain-time", "1h"]);
    server.signal("-TERM");
    server.log_until(|l| l.contains("draining: /readyz answers 503"));
    server.signal("-TERM");
    let status = exit_within_20s(&mut server);
    assert!(status.success(), "{status:?}");
}
