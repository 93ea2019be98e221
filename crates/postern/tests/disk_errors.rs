//! A disk that reports I/O errors: the spool sits on a pass-through FUSE file system
//! (`tests/peers/faulty_fs.py`) whose syncs, or writes, fail with EIO while the test says so.
//! A message whose group commit or write failed is refused `451 4.3.0` (not stored, not "disk
//! full"), the server goes on, and what it acknowledged is all there; a failed last sync at the
//! stop ends the process with status 1; with `--sync-on-core` a sync that hangs holds its
//! whole core. Needs root and /dev/fuse (CI has both; scripts/test
//! installs libfuse 2 and fusepy).
#![allow(clippy::unwrap_used)]

mod common;
mod relaying;

use common::{queue_id, spooled, Client, FaultyFs, Server};

fn send(c: &mut Client, rcpt: &str, body: &str) -> String {
    send_from(c, "a@b.test", rcpt, body)
}

/// A server on one core (with `extra` flags) on a fresh [`FaultyFs`], routing dest.test to a
/// next hop that refuses its recipient for good once told, and a message for it acknowledged;
/// then every sync fails and the refusal comes, so that the message's bounce cannot be made
/// durable: the file system, the spool, the server and the message's queue ID, once the
/// server says it cannot spool the bounce.
fn a_bounce_waiting_for_room(extra: &[&str]) -> (FaultyFs, std::path::PathBuf, Server, String) {
    let (port, refuse) = relaying::next_hop_answering_rcpt_when_told("550 5.1.1 no such user\r\n");
    let disk = FaultyFs::mount();
    let spool = disk.path.join("spool");
    let route = format!("dest.test=127.0.0.1:{port}");
    let mut args = vec![
        "--cores",
        "1",
        "--route",
        &route,
        "--metrics",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let server = Server::start_in(&args, spool.clone(), None);
    let mut c = server.connect();
    c.line();
    c.cmd("EHLO client.test");
    let acked = send_from(
        &mut c,
        "s@origin.test",
        "nobody@dest.test",
        "Subject: x\r\n\r\nx\r\n",
    );
    assert!(acked.starts_with("250 2.0.0"), "{acked}");
    assert!(c.cmd("QUIT").starts_with("221"));
    let id = queue_id(&acked);
    disk.fail_syncs(true);
    refuse.send(()).unwrap();
    let said = server.log_until(|l| l.contains("cannot spool a bounce") && l.contains(&id));
    // Counted among the messages that wait for their bounce alone.
    assert!(said.contains("settled_waiting=1"), "{said}");
    (disk, spool, server, id)
}

/// One message from `from` to `rcpt`; the reply to its end of data.
fn send_from(c: &mut Client, from: &str, rcpt: &str, body: &str) -> String {
    assert!(c.cmd(&format!("MAIL FROM:<{from}>")).starts_with("250"));
    assert!(c.cmd(&format!("RCPT TO:<{rcpt}>")).starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(body.as_bytes());
    c.cmd(".")
}

/// A server on one core with 1 MiB segments (and `extra` flags), its spool on a fresh
/// [`FaultyFs`], a client past EHLO, and a first message acknowledged: the file system, the
/// spool, the server, the client and that message's reply.
fn started(extra: &[&str]) -> (FaultyFs, std::path::PathBuf, Server, Client, String) {
    let disk = FaultyFs::mount();
    let spool = disk.path.join("spool");
    let mut args = vec!["--cores", "1", "--spool-segment-size", "1M"];
    args.extend_from_slice(extra);
    let server = Server::start_in(&args, spool.clone(), None);
    let mut c = server.connect();
    c.line();
    c.cmd("EHLO client.test");
    let first = send(&mut c, "one@d.test", "Subject: one\r\n\r\nfirst\r\n");
    assert!(first.starts_with("250 2.0.0"), "{first}");
    (disk, spool, server, c, first)
}

#[test]
fn a_failed_sync_gives_451_and_the_server_goes_on() {
    let (disk, spool, mut server, mut c, first) = started(&[]);

    disk.fail_syncs(true);
    let failed = send(&mut c, "two@d.test", "Subject: two\r\n\r\nsecond\r\n");
    assert!(
        failed.starts_with("451 4.3.0"),
        "an I/O error is a local error, not a full disk: {failed}"
    );
    server.log_until(|l| l.contains("spool error") && l.contains("Input/output error"));

    disk.fail_syncs(false);
    // With nothing else going on, the refused message's final statuses (written after the
    // failure) still reach the disk: a kill now must not bring it back for delivery.
    let refused_is_final = || {
        postern_spool::recover(&spool)
            .unwrap()
            .messages
            .iter()
            .any(|m| m.queue_id != queue_id(&first) && m.is_final())
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !refused_is_final() {
        assert!(
            std::time::Instant::now() < deadline,
            "the refused message's statuses were never synced on an idle core"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let third = send(&mut c, "three@d.test", "Subject: three\r\n\r\nthird\r\n");
    assert!(third.starts_with("250 2.0.0"), "{third}");
    assert!(c.cmd("QUIT").starts_with("221"));

    let status = server.terminate();
    assert!(status.success(), "{status}");
    // Both acknowledged messages are there, whole.
    let kept = spooled(&spool);
    for (reply, rcpt, text) in [
        (&first, "one@d.test", "first"),
        (&third, "three@d.test", "third"),
    ] {
        let id = queue_id(reply);
        let m = kept.iter().find(|m| m.0 == id);
        let m = m.unwrap_or_else(|| panic!("{id} was acknowledged and is gone: {kept:?}"));
        assert_eq!(m.2, [rcpt]);
        assert!(m.3.ends_with(format!("{text}\r\n").as_bytes()));
    }
    // The refused one's records reached the disk here (only the syncs failed), in the segment
    // the first message holds; its recipients' final statuses, written after the failure,
    // keep the next start from delivering it beside the copy its client sends again.
    let recovered = postern_spool::recover(&spool).unwrap();
    let live: Vec<&str> = recovered
        .messages
        .iter()
        .filter(|m| !m.is_final())
        .map(|m| m.queue_id.as_str())
        .collect();
    assert_eq!(live, [queue_id(&first), queue_id(&third)]);
    assert_eq!(
        recovered.messages.len(),
        3,
        "the refused message's records are there"
    );
}

#[test]
fn a_segment_whose_sync_failed_is_not_synced_again_with_later_mail() {
    // The syncs of the segment being written fail (a bad region under it): its message is
    // refused, the segment abandoned, and later mail goes to the next one, acknowledged as
    // usual. The abandoned segment's records (all refused or withdrawn) are not written and
    // synced again with the next batch, whose sync would fail with them.
    let (disk, spool, mut server, mut c, _) = started(&[]);
    let segment = std::fs::read_dir(spool.join("0"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".seg"))
        .min()
        .unwrap();
    disk.fail_syncs_of(&segment);
    let failed = send(&mut c, "two@d.test", "Subject: two\r\n\r\nsecond\r\n");
    assert!(failed.starts_with("451 4.3.0"), "{failed}");
    for n in 0..3 {
        let later = send(&mut c, "three@d.test", "Subject: three\r\n\r\nlater\r\n");
        assert!(
            later.starts_with("250 2.0.0"),
            "message {n} after the failure: {later}"
        );
    }
    assert!(c.cmd("QUIT").starts_with("221"));
    disk.fail_syncs(false);
    assert!(server.terminate().success());
}

#[test]
fn a_sync_that_finds_no_room_gives_452() {
    // A copy-on-write file system finds no room for what it writes back, at the sync: the
    // message is refused as over a full disk, 452 4.3.1, as at a segment's creation.
    let (disk, _spool, mut server, mut c, _) = started(&[]);
    disk.fail_syncs_for_room();
    let refused = send(&mut c, "two@d.test", "Subject: two\r\n\r\nsecond\r\n");
    assert_eq!(refused, "452 4.3.1 Insufficient system storage");
    disk.fail_syncs(false);
    let later = send(&mut c, "three@d.test", "Subject: three\r\n\r\nlater\r\n");
    assert!(later.starts_with("250 2.0.0"), "{later}");
    assert!(c.cmd("QUIT").starts_with("221"));
    assert!(server.terminate().success());
}

#[test]
fn a_failed_write_gives_451_and_later_mail_is_stored_whole() {
    let (disk, spool, mut server, mut c, first) = started(&[]);

    // A body larger than the session gathers in memory, so that it is written while the
    // disk fails every write.
    disk.fail_writes(true);
    let big = format!(
        "Subject: two\r\n\r\n{}",
        ("z".repeat(998) + "\r\n").repeat(40)
    );
    let failed = send(&mut c, "two@d.test", &big);
    assert!(failed.starts_with("451 4.3.0"), "{failed}");
    disk.fail_writes(false);

    // The segment that took the failed write is abandoned; what follows is written and
    // read back whole.
    let third = send(&mut c, "three@d.test", &big.replace("two", "three"));
    assert!(third.starts_with("250 2.0.0"), "{third}");
    assert!(c.cmd("QUIT").starts_with("221"));
    assert!(server.terminate().success());
    let kept = spooled(&spool);
    let ids: Vec<&str> = kept.iter().map(|m| m.0.as_str()).collect();
    assert_eq!(ids, [queue_id(&first), queue_id(&third)], "{kept:?}");
    assert!(kept[1].3.ends_with(big.replace("two", "three").as_bytes()));
}

#[test]
fn a_failed_last_sync_at_the_stop_exits_1() {
    let (disk, spool, mut server, mut c, acked) = started(&["--shutdown-grace", "300ms"]);
    // A second message left in the middle of its data, with more than the session gathers in
    // memory written to the spool: records the stop's last sync must cover.
    assert!(c.cmd("MAIL FROM:<a@b.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<two@d.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(("y".repeat(998) + "\r\n").repeat(40).as_bytes());
    // The stop waits 300 ms for that transaction, tells it 421 and abandons the draft; every
    // sync fails by then.
    disk.fail_syncs(true);
    server.signal("-TERM");
    assert!(c.line().starts_with("421"));
    let status = server.child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{status}");
    // Either the last sync failed, or the group commit's sync of the abandoned draft's
    // records did, during the stop, and the last had nothing left to write.
    server
        .log_until(|l| l.contains("ERROR") && l.contains("sync") && l.contains("the stop failed"));

    // The acknowledged message was durable before its 250 and is still there.
    disk.fail_syncs(false);
    let kept = spooled(&spool);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0].0, queue_id(&acked));
}

#[test]
fn a_bounce_the_failing_disk_cannot_take_stays_counted_and_does_not_hold_the_stop() {
    use std::time::{Duration, Instant};
    // The bounce cannot be made durable: it waits to be tried again.
    let (disk, spool, mut server, id) = a_bounce_waiting_for_room(&["--shutdown-grace", "10m"]);
    // Still queued, and counted so: it holds its space until the bounce is made.
    let depth = |m: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix("postern_queue_depth "))
            .map(str::to_owned)
    };
    let metrics = server.metrics_until(|m| depth(m).as_deref() == Some("1"));
    assert_eq!(depth(&metrics).as_deref(), Some("1"), "{metrics}");

    // The stop does not wait out its ten minutes for the disk to come back.
    let asked = Instant::now();
    server.signal("-TERM");
    loop {
        if server.child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            asked.elapsed() < Duration::from_secs(60),
            "the stop waited on the bounce's retries"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // The failure was not recorded: the message and its recipient wait for the next run,
    // which tries again and bounces then.
    disk.fail_syncs(false);
    let kept = postern_spool::recover(&spool).unwrap();
    let msg = kept
        .messages
        .iter()
        .find(|m| m.queue_id == id)
        .expect("the acknowledged message is kept");
    assert!(!msg.is_final(), "{msg:?}");
}

#[test]
fn a_flush_tries_a_bounce_waiting_for_room_at_once() {
    use std::time::{Duration, Instant};
    // Room is made (here the disk comes back) and the operator asks for a flush: the bounce is
    // tried then, not at its next try 10 s after the failure.
    let (disk, spool, server, id) = a_bounce_waiting_for_room(&[]);
    let failed = Instant::now();
    disk.fail_syncs(false);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["queue", "--spool"])
        .arg(&spool)
        .arg("--flush")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    server.log_until(|l| l.contains("delivery status notification queued") && l.contains(&id));
    assert!(
        failed.elapsed() < Duration::from_secs(9),
        "the bounce waited for its own retry: {:?}",
        failed.elapsed()
    );
}

#[test]
fn a_message_whose_bounce_waits_for_room_can_be_deleted() {
    // A full or failing disk is when an operator deletes mail: a message whose bounce the
    // spool cannot take is deleted, leaves the gauges at once, and its bounce is not made.
    let (disk, spool, mut server, id) = a_bounce_waiting_for_room(&[]);
    server.metrics_until(|m| m.contains("postern_queue_depth 1\n"));

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["queue", "--spool"])
        .arg(&spool)
        .args(["--delete", &id])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    // (Its segment may be reclaimed before the command looks: then it cannot tell how the
    // message left, and says so; the server's log says it was deleted.)
    assert!(
        said == format!("deleted {id}\n") || said.starts_with(&format!("{id} left the queue")),
        "{said}"
    );
    server.log_until(|l| l.contains("deleted by the operator") && l.contains(&id));
    server.metrics_until(|m| m.contains("postern_queue_depth 0\n"));
    // Its bounce's next try finds it deleted, and makes no report.
    server.log_until(|l| l.contains("is not made") && l.contains(&id));
    disk.fail_syncs(false);
    let log = server.terminate_for_log();
    assert!(
        !log.lines()
            .any(|l| l.contains("delivery status notification queued") && l.contains(&id)),
        "{log}"
    );
}

/// Lets a [`FaultyFs`] whose syncs hang go when dropped, whatever happens: a server on it has
/// a thread waiting in the sync, which must return before the server can be dropped.
struct LetGo<'a>(&'a FaultyFs);

impl Drop for LetGo<'_> {
    fn drop(&mut self) {
        self.0.stop_hanging();
    }
}

/// A one-core server (with `extra` flags) on `disk` (a threaded [`FaultyFs`]) that has
/// acknowledged one message (one@d.test); then the disk stops answering syncs, and a second
/// message's end of data (two@d.test) waits in one. The server, the client waiting for that
/// reply, and the guard that lets the disk go (bound last, so dropped first).
fn a_message_waiting_on_a_hung_sync<'a>(
    disk: &'a FaultyFs,
    extra: &[&str],
) -> (Server, Client, LetGo<'a>) {
    use std::time::{Duration, Instant};
    let mut args = vec!["--cores", "1"];
    args.extend_from_slice(extra);
    let server = Server::start_in(&args, disk.path.join("spool"), None);
    let mut c = server.connect();
    c.line();
    c.cmd("EHLO client.test");
    let first = send(&mut c, "one@d.test", "Subject: one\r\n\r\nfirst\r\n");
    assert!(first.starts_with("250 2.0.0"), "{first}");
    assert!(c.cmd("MAIL FROM:<a@b.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<two@d.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: two\r\n\r\nsecond\r\n");
    // Syncs hang from here, with no reply still awaited but the one to the data: with
    // --sync-on-core any sync the core makes meanwhile (its once-a-second mark, say) holds it,
    // and a command sent after it would get no reply either.
    disk.hang_syncs(true);
    let let_go = LetGo(disk);
    c.send(b".\r\n");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !disk.a_sync_hangs() {
        assert!(Instant::now() < deadline, "no sync reached the disk");
        std::thread::sleep(Duration::from_millis(20));
    }
    (server, c, let_go)
}

#[test]
fn with_sync_on_core_a_sync_that_hangs_holds_the_whole_core_until_the_disk_answers() {
    use std::io::Read;
    use std::time::Duration;
    let disk = FaultyFs::mount_threaded();
    let spool = disk.path.join("spool");
    let (server, mut c, let_go) = a_message_waiting_on_a_hung_sync(&disk, &["--sync-on-core"]);
    // The core itself waits in the sync: a new client's connection is taken by the kernel,
    // and greeted by nobody. (Without the flag a core greets it at once: the sync waits on
    // a thread of its blocking pool.)
    let mut other = std::net::TcpStream::connect(server.smtp).unwrap();
    other
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut byte = [0u8; 1];
    let early = other.read(&mut byte);
    assert!(
        early
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "greeted while the core waits on the disk: {early:?}"
    );
    // The disk answers: the message is acknowledged and the new client greeted.
    drop(let_go);
    let second = c.line();
    assert!(second.starts_with("250 2.0.0"), "{second}");
    let mut other = Client::from_stream(other);
    let banner = other.line();
    assert!(banner.starts_with("220 "), "{banner}");
    // The log says how long the core was held.
    let said = server.log_until(|l| l.contains("a sync of the spool held this core for"));
    assert!(said.contains("--sync-on-core"), "{said}");
    drop(server);
    let mut stored: Vec<String> = spooled(&spool).into_iter().flat_map(|m| m.2).collect();
    stored.sort();
    assert_eq!(stored, ["one@d.test", "two@d.test"]);
}

#[test]
fn a_stop_whose_sync_never_ends_tells_the_waiting_client_451_and_exits_1() {
    let disk = FaultyFs::mount_threaded();
    let (mut server, mut c, _let_go) =
        a_message_waiting_on_a_hung_sync(&disk, &["--shutdown-grace", "500ms"]);
    server.signal("-TERM");
    // No second sync is made beside the one that hangs; the client is told its message was
    // not stored, and the core ends, saying why. (The process ends only once the sync
    // returns: no thread leaves a system call the disk has not answered.)
    let reply = c.line();
    assert!(reply.starts_with("451 4.3.0"), "{reply}");
    server.log_until(|l| l.contains("did not end within 5s"));
    disk.stop_hanging();
    let status = server.child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{status}");
}

#[test]
fn an_operator_deletion_is_logged_once_it_is_durable() {
    // The deletion's final statuses wait in a sync the disk does not answer: until it does, a
    // restart would still deliver the message, so the log must not say it was deleted.
    let disk = FaultyFs::mount_threaded();
    let spool = disk.path.join("spool");
    let server = Server::start_in(
        &["--cores", "1", "--metrics", "127.0.0.1:0"],
        spool.clone(),
        None,
    );
    let mut c = server.connect();
    c.line();
    c.cmd("EHLO client.test");
    let id = queue_id(&send(&mut c, "one@d.test", "Subject: one\r\n\r\nfirst\r\n"));
    assert_eq!(c.cmd("QUIT"), "221 2.0.0 mx.test Bye");
    disk.hang_syncs(true);
    let let_go = LetGo(&disk);
    let mut delete = std::process::Command::new(env!("CARGO_BIN_EXE_postern"));
    delete
        .args(["queue", "--spool"])
        .arg(&spool)
        .args(["--delete", &id]);
    let deleting = std::thread::spawn(move || common::run_command_bounded(delete));
    // The core has taken the request (its recipient counted as failed, its statuses
    // appended); their sync cannot end while the disk hangs. A line logged after the signal
    // below comes after any the deletion logged meanwhile (one writer, in order).
    server.metrics_until(|m| m.contains("postern_recipients_deleted_total 1\n"));
    server.signal("-HUP");
    server.log_until(|l| l.contains("SIGHUP: nothing to read again"));
    assert_eq!(
        server.log_count(|l| l.contains("deleted by the operator")),
        0,
        "logged as deleted while its statuses wait for the disk"
    );
    drop(let_go);
    let said = server.log_until(|l| l.contains("deleted by the operator") && l.contains(&id));
    assert!(said.contains("recipients=1"), "{said}");
    let (code, out, err) = deleting.join().unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("deleted {id}\n"));
}

#[test]
fn a_segment_the_disk_cannot_read_is_reported_and_the_mail_before_it_kept() {
    // Three messages in one segment, the second's body over several pages; then a page in
    // the middle of that body can no longer be read (a bad sector). Read through the mapping,
    // it would end the server at every start (SIGBUS).
    let (disk, spool, mut server, mut c, first) = started(&[]);
    let body = format!(
        "Subject: two\r\n\r\n{}",
        ("marker-two ".to_owned() + &"z".repeat(987) + "\r\n").repeat(40)
    );
    let second = send(&mut c, "two@d.test", &body);
    assert!(second.starts_with("250 2.0.0"), "{second}");
    let third = send(&mut c, "three@d.test", "Subject: three\r\n\r\nthird\r\n");
    assert!(third.starts_with("250 2.0.0"), "{third}");
    assert!(c.cmd("QUIT").starts_with("221"));
    assert!(server.terminate().success());

    // The segment holding them, and a page well inside the second body.
    let (segment, bytes) = std::fs::read_dir(spool.join("0"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .find(|(_, b)| b.windows(10).any(|w| w == b"marker-two"))
        .expect("no segment holds the second message");
    let at = bytes.windows(10).position(|w| w == b"marker-two").unwrap() as u64;
    let bad = (at / 4096 + 3) * 4096;
    let name = segment.file_name().unwrap().to_str().unwrap().to_owned();
    disk.fail_reads_of(&name, bad);

    // The server starts, says where the disk failed, and keeps the first message.
    let server = Server::start_in(&["--cores", "1"], spool.clone(), None);
    let seq = name.trim_end_matches(".seg").trim_start_matches('0');
    let said = server.log_until(|l| l.contains("could not be read past this offset"));
    assert!(
        said.contains(&format!("segment {seq} offset {bad}")) && said.contains("error"),
        "{said}"
    );
    // The second message began before the bad page and its end lies past it: named.
    let cut = server.log_until(|l| l.contains("has no end"));
    assert!(cut.contains(&queue_id(&second)), "{cut}");

    // The listing says the same, and holds the first message alone.
    let (code, out, err) =
        common::run_bounded(&["queue", "--spool", spool.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{err}");
    let listed: Vec<&str> = out.lines().collect();
    assert_eq!(listed.len(), 1, "{out}");
    assert!(listed[0].contains(&queue_id(&first)), "{out}");
    assert!(
        err.contains(&format!(
            "segment {seq} could not be read past offset {bad}"
        )),
        "{err}"
    );
    let (code, shown, err) = common::run_bounded(&[
        "queue",
        "--spool",
        spool.to_str().unwrap(),
        "--show",
        &queue_id(&first),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(shown.ends_with("Subject: one\r\n\r\nfirst\r\n"), "{shown}");
    drop(server);
}

#[test]
fn mail_is_not_acknowledged_into_a_segment_someone_deleted() {
    // The spool's files deleted by hand while the server runs: a message whose records went
    // into the deleted segment would be lost at the next start, so it gets 451, not 250; the
    // next goes into a new segment and is there after a restart.
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let mut server = Server::start_in(&["--cores", "1"], spool.clone(), None);
    let mut c = server.connect();
    c.line();
    c.cmd("EHLO client.test");
    let first = send(&mut c, "one@d.test", "Subject: one\r\n\r\nfirst\r\n");
    assert!(first.starts_with("250 2.0.0"), "{first}");
    for entry in std::fs::read_dir(spool.join("0")).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let lost = send(&mut c, "two@d.test", "Subject: two\r\n\r\nsecond\r\n");
    assert!(lost.starts_with("451 4.3.0"), "{lost}");
    let third = send(&mut c, "three@d.test", "Subject: three\r\n\r\nthird\r\n");
    assert!(third.starts_with("250 2.0.0"), "{third}");
    assert!(c.cmd("QUIT").starts_with("221"));
    let log = server.terminate_for_log();
    assert!(log.contains("deleted by another process"), "{log}");
    let kept = spooled(&spool);
    let ids: Vec<&str> = kept.iter().map(|m| m.0.as_str()).collect();
    assert_eq!(ids, [queue_id(&third)], "{kept:?}");
}
