//! A full disk: on a small tmpfs the test mounts, postern answers 452 4.3.1 when the spool
//! cannot take a message, keeps running, loses nothing it acknowledged, and accepts again once
//! space returns. Needs the privilege to mount (root in CI).
#![allow(clippy::unwrap_used)]

mod common;
mod relaying;

use common::{spooled, Server};

#[test]
fn a_full_spool_disk_gives_452_and_loses_nothing() {
    let disk = common::Tmpfs::mount("6m");
    let mnt = disk.path.clone();
    // Leave about 3.5 MiB: room for one 1 MiB segment past the two kept from new mail (for
    // copies and outcomes), not two.
    let filler = mnt.join("filler");
    std::fs::write(&filler, vec![0u8; 2560 * 1024]).unwrap();

    let spool = mnt.join("spool");
    let mut server = Server::start_in(
        &["--cores", "1", "--spool-segment-size", "1M"],
        spool.clone(),
        None,
    );
    let mut c = server.connect();
    c.line();
    c.cmd("EHLO client.test");
    let body = "x".repeat(99) + "\r\n";
    let mut acked = Vec::new();
    let mut refused = None;
    for i in 0..40 {
        c.cmd("MAIL FROM:<a@b.test>");
        c.cmd(&format!("RCPT TO:<r{i}@d.test>"));
        let go = c.cmd("DATA");
        if go.starts_with("452") {
            refused = Some(go);
            break;
        }
        assert_eq!(go, "354 End data with <CR><LF>.<CR><LF>");
        for _ in 0..1000 {
            c.send(body.as_bytes());
        }
        let reply = c.cmd(".");
        if reply.starts_with("452") {
            refused = Some(reply);
            break;
        }
        acked.push(common::queue_id(&reply));
    }
    let refused = refused.expect("the spool never filled up");
    assert_eq!(refused, "452 4.3.1 Insufficient system storage");
    assert!(!acked.is_empty());
    assert_eq!(
        c.cmd("RSET"),
        "250 2.0.0 Ok",
        "the session and the process go on"
    );

    // Space comes back: mail is accepted again.
    std::fs::remove_file(&filler).unwrap();
    c.cmd("MAIL FROM:<a@b.test>");
    c.cmd("RCPT TO:<after@d.test>");
    assert_eq!(c.cmd("DATA"), "354 End data with <CR><LF>.<CR><LF>");
    acked.push(common::queue_id(
        &c.cmd("Subject: after\r\n\r\nspace is back\r\n."),
    ));
    assert_eq!(c.cmd("QUIT"), "221 2.0.0 mx.test Bye");

    assert!(server.terminate().success());
    let msgs = spooled(&spool);
    for id in &acked {
        let m = msgs
            .iter()
            .find(|m| &m.0 == id)
            .unwrap_or_else(|| panic!("acknowledged {id} lost"));
        assert!(m.3.ends_with(b"\r\n"));
    }
    assert_eq!(
        msgs.len(),
        acked.len(),
        "nothing unacknowledged is reported whole"
    );
}

#[test]
fn the_first_message_after_start_takes_the_segment_being_made_not_a_second_one() {
    // Room for one 256 MiB segment, not two (and too small to keep any from new mail). At
    // start-up the server makes its first segment off the core; a message that arrives
    // meanwhile must wait for it, not make another (which the disk cannot hold) and be
    // refused.
    let disk = common::Tmpfs::mount("400m");
    let spool = disk.path.join("spool");
    let mut server = Server::start_in(
        &["--cores", "1", "--spool-segment-size", "256M"],
        spool.clone(),
        None,
    );
    let mut c = server.connect();
    c.send(b"EHLO client.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r@d.test>\r\nDATA\r\n");
    let greeting_and_replies: Vec<String> = (0..5).map(|_| c.line()).collect();
    assert_eq!(
        greeting_and_replies[4], "354 End data with <CR><LF>.<CR><LF>",
        "{greeting_and_replies:?}"
    );
    let id = common::queue_id(&c.cmd("Subject: first\r\n\r\nat once\r\n."));
    assert_eq!(c.cmd("QUIT"), "221 2.0.0 mx.test Bye");
    assert!(server.terminate().success());
    let msgs = spooled(&spool);
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].0, id);
}

#[test]
fn a_spool_past_the_file_size_limit_gives_452_and_a_log_line_not_a_dead_process() {
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    // A start under a file-size limit below one segment is refused (no message could be
    // stored); one lowered while the server runs (`prlimit --pid`) is met at the next write
    // past it, which raises SIGXFSZ: that ends a process that does not handle it.
    let mut child = common::KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_postern"))
            .args(["serve", "--listen", "127.0.0.1:0", "--cores", "1", "--hold"])
            .args(["--spool-segment-size", "1M", "--spool"])
            .arg(&spool)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut addr = None;
    loop {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "postern exited");
        if let Some(a) = line.trim().strip_prefix("postern: smtp listening on ") {
            addr = Some(a.parse().unwrap());
        }
        if line.starts_with("postern: ready") {
            break;
        }
    }
    // The first segment is made ahead, off the core, once the core is ready: the limit is
    // lowered only after it has its name (it is linked to it once reserved), or making it
    // would be what meets the limit, and the message would be refused at DATA.
    let core = spool.join("0");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !std::fs::read_dir(&core).is_ok_and(|d| {
        d.flatten()
            .any(|e| e.path().extension().is_some_and(|x| x == "seg"))
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "no segment made in 20 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let lowered = Command::new("prlimit")
        .args(["--pid", &child.id().to_string(), "--fsize=65536"])
        .status()
        .unwrap();
    assert!(lowered.success());
    let mut c = common::Client::connect(addr.unwrap());
    c.line();
    c.cmd("EHLO client.test");
    c.cmd("MAIL FROM:<a@b.test>");
    c.cmd("RCPT TO:<r@d.test>");
    let data = c.cmd("DATA");
    // A body that reaches past 64 KiB into the segment.
    assert!(data.starts_with("354"), "{data}");
    let body = "x".repeat(998) + "\r\n";
    c.send(format!("Subject: x\r\n\r\n{}.\r\n", body.repeat(100)).as_bytes());
    let reply = c.line();
    assert_eq!(reply, "452 4.3.1 Insufficient system storage");
    let bye = c.cmd("QUIT");
    // Started without --hostname: the machine's name comes first.
    assert!(
        bye.starts_with("221 2.0.0 ") && bye.ends_with(" Bye"),
        "{bye}"
    );
    assert!(child.try_wait().unwrap().is_none(), "postern died");
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(log.contains("spool error"), "{log}");
}

#[test]
fn a_server_starts_on_a_full_disk_refuses_mail_with_452_and_takes_it_once_space_returns() {
    // Room for a segment past the two kept from new mail once the fillers are gone.
    let disk = common::Tmpfs::mount("6m");
    let spool = disk.path.join("spool");
    let args = ["--cores", "1", "--spool-segment-size", "1M"];
    // A first run takes a message and stops.
    let mut first = Server::start_in(&args, spool.clone(), None);
    let mut c = first.connect();
    c.line();
    c.cmd("EHLO client.test");
    c.cmd("MAIL FROM:<a@b.test>");
    c.cmd("RCPT TO:<r@d.test>");
    c.cmd("DATA");
    let kept = common::queue_id(&c.cmd("Subject: kept\r\n\r\nkept\r\n."));
    drop(c);
    assert!(first.terminate().success());
    // Then the disk fills to the last block.
    let fill = |name: &str| {
        use std::io::Write;
        let path = disk.path.join(name);
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        path
    };
    let filler = fill("filler");
    let mut server = Server::start_in(&args, spool.clone(), None);
    // It started (and dropped the spare the first run never wrote to): whatever that freed
    // is filled too.
    let filler2 = fill("filler2");
    let mut c = server.connect();
    c.line();
    c.cmd("EHLO client.test");
    let line = "y".repeat(998) + "\r\n";
    let deliver = |c: &mut common::Client| {
        c.cmd("RSET");
        c.cmd("MAIL FROM:<a@b.test>");
        c.cmd("RCPT TO:<r@d.test>");
        let go = c.cmd("DATA");
        if !go.starts_with("354") {
            return go;
        }
        c.send(b"Subject: x\r\n\r\n");
        for _ in 0..100 {
            c.send(line.as_bytes());
        }
        c.cmd(".")
    };
    // Whatever segment the new run could still make fills up; then 452.
    let refused = (0..40)
        .map(|_| deliver(&mut c))
        .find(|r| !r.starts_with("250"))
        .expect("the disk never filled up");
    assert_eq!(refused, "452 4.3.1 Insufficient system storage");
    std::fs::remove_file(&filler).unwrap();
    std::fs::remove_file(&filler2).unwrap();
    let after = common::queue_id(&deliver(&mut c));
    drop(c);
    assert!(server.terminate().success());
    let ids: Vec<String> = spooled(&spool).into_iter().map(|m| m.0).collect();
    assert!(ids.contains(&kept) && ids.contains(&after), "{ids:?}");
}

#[test]
fn a_core_directory_this_process_cannot_write_is_a_start_up_error() {
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let core0 = spool.join("0");
    std::fs::create_dir_all(&core0).unwrap();
    // Root may write anywhere but on a read-only mount.
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"])
        .arg(&core0)
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "this test mounts a tmpfs: run it as root"
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(core0.clone());
    let mut child = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["serve", "--listen", "127.0.0.1:0", "--cores", "1", "--hold"])
        .arg("--spool")
        .arg(&spool)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("postern started on a spool it cannot write");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&core0.display().to_string()) && err.contains("not a writable directory"),
        "{err}"
    );
}

#[test]
fn bodies_refused_or_cut_off_do_not_fill_the_disk_while_older_mail_waits() {
    // One message waits in the oldest segment (held); then client after client sends a body
    // over --max-message-size (552) or goes away in the middle of one. Each leaves up to a
    // whole message of records in the segments after the waiting one: kept until that one
    // was delivered, ten such attempts filled this 8 MiB disk, and every message after them
    // got 452, at every restart too.
    let disk = common::Tmpfs::mount("8m");
    let spool = disk.path.join("spool");
    let mut server = Server::start_in(
        &[
            "--cores",
            "1",
            "--spool-segment-size",
            "256k",
            "--max-message-size",
            "600k",
        ],
        spool.clone(),
        None,
    );
    let mut c = server.in_data();
    let waiting = common::queue_id(&c.cmd("Subject: waits\r\n\r\nfor a next hop\r\n."));
    let line = "y".repeat(998) + "\r\n";
    // Bounded: 40 attempts of 700 KB each, 28 MB in all, three and a half times the disk.
    for attempt in 0..40 {
        let mut c = server.in_data();
        for _ in 0..700 {
            c.send(line.as_bytes());
        }
        if attempt % 4 == 3 {
            // Gone in the middle of the body: the session ends with the connection.
            drop(c);
            continue;
        }
        let reply = c.cmd(".");
        assert!(reply.starts_with("552 5.3.4"), "attempt {attempt}: {reply}");
    }
    // Mail is still taken.
    let mut c = server.in_data();
    let after = common::queue_id(&c.cmd("Subject: after\r\n\r\nstill taken\r\n."));
    assert_eq!(c.cmd("QUIT"), "221 2.0.0 mx.test Bye");
    // What the abandoned bodies held is given back: a few segments remain, not dozens.
    let segments = || {
        std::fs::read_dir(spool.join("0"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
            .count()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    // Bounded by the deadline: the deletions run off the core.
    while segments() > 6 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} segments kept for two small messages",
            segments()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(server.terminate().success());
    let r = postern_spool::recover(&spool).unwrap();
    assert_eq!((r.damaged, r.corrupt_records), (0, 0));
    let mut ids: Vec<&str> = r.messages.iter().map(|m| m.queue_id.as_str()).collect();
    ids.sort_unstable();
    let mut both = [waiting.as_str(), after.as_str()];
    both.sort_unstable();
    assert_eq!(ids, both);
}

/// One 20 KB message for r@dest.test from a session of its own: the reply that ended it
/// (`250` at its end, or a refusal on the way: a full spool may say `452` before the data).
fn offer_to_dest(server: &Server, n: usize) -> String {
    let (mut c, _) = relaying::hello(server);
    for command in ["MAIL FROM:<a@origin.test>", "RCPT TO:<r@dest.test>", "DATA"] {
        let reply = c.cmd(command);
        if !reply.starts_with('2') && !reply.starts_with('3') {
            return reply;
        }
    }
    let mut body = format!("Message-ID: <fill{n}@t>\r\n\r\n");
    for _ in 0..20 {
        body.push_str(&"y".repeat(998));
        body.push_str("\r\n");
    }
    body.push_str(".\r\n");
    c.send(body.as_bytes());
    let reply = c.line();
    c.cmd("QUIT");
    reply
}

#[test]
fn a_disk_filled_while_a_message_waits_in_the_oldest_segment_empties_once_the_rest_is_delivered() {
    // One message waits in the oldest segment for a next hop that stays down; mail for another
    // next hop, down for now, fills the disk. Once that next hop takes its mail, the waiting
    // message is copied forward so that the segments behind it can go, and the outcomes of
    // the deliveries are written: both need room in a new segment. New mail took the disk to
    // its last segment: neither could be written, nothing was deleted, and every message after
    // got 452, for good (and each restart sent the delivered mail again).
    let disk = common::Tmpfs::mount("8m");
    let spool = disk.path.join("spool");
    let free_port = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (dest, down) = (free_port(), free_port());
    let to_dest = format!("dest.test=127.0.0.1:{dest}");
    let to_down = format!("down.test=127.0.0.1:{down}");
    let server = Server::start_in(
        &[
            "--cores",
            "1",
            "--spool-segment-size",
            "256k",
            "--route",
            &to_dest,
            "--route",
            &to_down,
            "--retry-initial",
            "300ms",
            "--retry-max",
            "300ms",
        ],
        spool.clone(),
        None,
    );
    relaying::send(
        &server,
        "a@origin.test",
        &["w@down.test"],
        "<waits@t>",
        "x\r\n",
    );
    // Bounded: 8 MiB of 20 KB messages is some 400.
    let mut taken = 0;
    let refusal = loop {
        assert!(taken < 1000, "the disk never filled");
        let reply = offer_to_dest(&server, taken);
        if !reply.starts_with("250") {
            break reply;
        }
        taken += 1;
    };
    assert!(refusal.starts_with("452 4.3.1"), "{refusal}");
    assert!(taken > 100, "only {taken} messages taken");
    // Their next hop stays down for two more rounds of retries: the deferrals written then
    // must not take the room the copy will need. Bounded by the deadline.
    let deferred = |l: &str| l.contains("to=\"r@dest.test\"") && l.contains("status=\"deferred\"");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while server.log_count(deferred) < 3 * taken {
        assert!(std::time::Instant::now() < deadline, "not retried");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The next hop comes back and takes them all.
    let peer = relaying::Peer::start_on("127.0.0.1", dest, &[]);
    peer.wait_for(
        "the mail taken before the disk filled",
        std::time::Duration::from_secs(60),
        |stored| stored.len() >= taken,
    );
    // Then the disk empties and mail is taken again. Bounded by the deadline.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let reply = offer_to_dest(&server, taken);
        if reply.starts_with("250") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still refused once the mail was delivered: {reply}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    drop(server);
}

#[test]
fn a_file_system_too_small_for_the_reserve_keeps_none_and_takes_mail() {
    // 1.5 MiB and 1 MiB segments: one segment and the two kept from new mail do not fit.
    // Kept all the same, no message would ever be taken; none is kept (a warning says so).
    let disk = common::Tmpfs::mount("1536k");
    let spool = disk.path.join("spool");
    let mut server = Server::start_in(
        &["--cores", "1", "--spool-segment-size", "1M"],
        spool.clone(),
        None,
    );
    let warning = server.log_until(|l| l.contains("less than four segments for each core"));
    assert!(warning.contains("none is kept"), "{warning}");
    let mut c = server.in_data();
    let id = common::queue_id(&c.cmd("Subject: small\r\n\r\ntaken\r\n."));
    assert_eq!(c.cmd("QUIT"), "221 2.0.0 mx.test Bye");
    assert!(server.terminate().success());
    assert_eq!(spooled(&spool)[0].0, id);
}
