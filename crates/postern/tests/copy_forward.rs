//! A message deferred for long must not keep the spool from shrinking: the real `postern`
//! copies it forward in its spool while mail behind it is delivered, and the copy is what a
//! restart (after SIGKILL) delivers, once, with the outcomes recorded before the copy.
#![allow(clippy::unwrap_used)]

mod common;
mod relaying;

use std::time::{Duration, Instant};

use common::Server;
use relaying::*;

fn segments(spool: &std::path::Path) -> usize {
    std::fs::read_dir(spool.join("0"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        .count()
}

fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_deferred_message_is_copied_forward_so_the_mail_delivered_behind_it_frees_its_segments() {
    let peer = Peer::start(&[]);
    let down = reserve("127.0.0.1", 0);
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let to_peer = |domain: &str| format!("{domain}=127.0.0.1:{}", peer.port);
    let (dest, origin) = (to_peer("dest.test"), to_peer("origin.test"));
    let to_down = format!("down.test=127.0.0.1:{}", down.1);
    let mut args = common::SMALL_SEGMENTS.to_vec();
    args.extend([
        "--metrics",
        "127.0.0.1:0",
        "--route",
        &dest,
        "--route",
        &origin,
    ]);
    let mut first_args = args.clone();
    first_args.extend(["--route", &to_down]);
    first_args.extend(FAST_RETRY);
    let mut server = Server::start_in(&first_args, spool.clone(), None);

    // W: one recipient delivered at once, the other deferred again and again (nothing
    // listens for down.test), each deferral a status record.
    let text = "w".repeat(76) + "\r\n";
    let w_body = text.repeat(250);
    send(
        &server,
        "s@origin.test",
        &["a@dest.test", "b@down.test"],
        "<w@t>",
        &w_body,
    );
    peer.wait_for("W for a@dest.test", Duration::from_secs(20), |s| {
        s.iter().any(|m| m.message_id == "<w@t>")
    });
    // Then about ten segments' worth of mail, all delivered.
    let line = "x".repeat(76) + "\r\n";
    let (mut c, _) = hello(&server);
    for i in 0..240 {
        assert!(c.cmd("MAIL FROM:<s@origin.test>").starts_with("250"));
        assert!(c.cmd("RCPT TO:<x@dest.test>").starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        c.send(format!("Message-ID: <m{i}@t>\r\n\r\n{}.\r\n", line.repeat(64)).as_bytes());
        assert!(c.line().starts_with("250 2.0.0"));
    }
    c.cmd("QUIT");
    peer.wait_for("the mail behind W", Duration::from_secs(60), |s| {
        s.len() == 241
    });
    // W is copied forward and what it kept goes: a few segments remain, not ten.
    server.metrics_until(|m| counter(m, "postern_spool_messages_copied_total") >= 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while segments(&spool) > 4 {
        assert!(
            Instant::now() < deadline,
            "{} segments kept for one waiting message",
            segments(&spool)
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Killed: the spool holds W once, the delivered recipient's outcome with it.
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let r = postern_spool::recover(&spool).unwrap();
    assert_eq!((r.damaged, r.corrupt_records), (0, 0));
    let waiting: Vec<_> = r.messages.iter().filter(|m| !m.is_final()).collect();
    assert_eq!(waiting.len(), 1, "{:?}", r.messages.len());
    let w = waiting[0];
    assert_eq!(w.meta.recipients.len(), 2);
    assert!(matches!(
        w.statuses[0].as_ref().map(|s| &s.state),
        Some(postern_spool::DeliveryState::Delivered)
    ));
    assert!(matches!(
        w.statuses[1].as_ref().map(|s| &s.state),
        Some(postern_spool::DeliveryState::Deferred { .. })
    ));

    // Started again with down.test reachable: W goes there once, with the body it was
    // accepted with, and not again to a@dest.test.
    let back = Peer::start(&[]);
    let to_back = format!("down.test=127.0.0.1:{}", back.port);
    args.extend(["--route", &to_back]);
    let server = Server::start_in(&args, spool.clone(), None);
    let got = back.wait_for("W for b@down.test", Duration::from_secs(30), |s| {
        !s.is_empty()
    });
    server.metrics_until(|m| counter(m, "postern_queue_depth") == 0);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message_id, "<w@t>");
    assert_eq!(got[0].rcpt_tos, ["b@down.test"]);
    let first = peer.stored();
    let to_dest: Vec<_> = first.iter().filter(|m| m.message_id == "<w@t>").collect();
    assert_eq!(to_dest.len(), 1, "W went to a@dest.test again");
    assert_eq!(got[0].data, to_dest[0].data, "the copy's body differs");
    drop(down);
}

#[test]
fn a_copy_found_at_a_start_is_made_durable_before_the_segments_of_its_original_go() {
    // A copy forward is on file, and the process ended before the sync meant for it (the page
    // cache still has it): the next start must not delete the original's segments for it.
    // The copy is not covered by its segment's mark, so the original is kept; and a start
    // that finds a message twice makes every segment durable first, and where that fails,
    // deletes nothing in that run.
    use postern_spool::{DeliveryState, MessageMeta, Recipient, Spool, SpoolOptions, Status};
    let disk = common::FaultyFs::mount();
    let spool = disk.path.join("spool");
    let opts = SpoolOptions {
        segment_size: 128 * 1024,
    };
    // Arrived now: delivery runs in the second start, and an older message would be past
    // its queue lifetime there.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let meta = |i: u64| MessageMeta {
        arrival: now + i,
        reverse_path: format!("s{i}@origin.test"),
        recipients: vec![
            Recipient {
                path: "a@dest.test".into(),
                notify: None,
                orcpt: None,
            },
            Recipient {
                path: "b@down.test".into(),
                notify: None,
                orcpt: None,
            },
        ],
        ..MessageMeta::default()
    };
    let delivered = Status {
        state: DeliveryState::Delivered,
        reply: "250 2.0.0 taken".into(),
    };
    let id = {
        let mut s = Spool::open(&spool, 0, opts).unwrap();
        let mut w = s.begin(&meta(0)).unwrap();
        s.append(&mut w, b"Subject: waits\r\n\r\nfor down.test\r\n")
            .unwrap();
        let id = w.queue_id().to_owned();
        let (_, pending) = s.finish_with_body(w).unwrap();
        s.sync_now().unwrap();
        let body = s.body(pending).unwrap();
        s.append_status(&id, 0, &delivered).unwrap();
        for i in 1..60 {
            let mut d = s.begin(&meta(i)).unwrap();
            s.append(&mut d, &vec![b'x'; 8 * 1024]).unwrap();
            let done = d.queue_id().to_owned();
            s.finish(d).unwrap();
            s.append_status(&done, 0, &delivered).unwrap();
            s.append_status(&done, 1, &delivered).unwrap();
            s.sync_now().unwrap();
            s.mark_final(&done).unwrap();
        }
        s.copy_forward(&id, &meta(0), &body).unwrap().unwrap();
        // Written to the file (this sync is the test's way to get it there), and the
        // process gone before it let the old place go.
        s.sync_now().unwrap();
        std::mem::forget(s);
        id
    };
    let mut files: Vec<String> = std::fs::read_dir(spool.join("0"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".seg"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    let (first, copy) = (files[0].clone(), files.last().unwrap().clone());
    let count = || segments(&spool);

    // The copy's segment cannot be made durable: the original's stay.
    disk.fail_syncs_of(&copy);
    let mut server = Server::start_in(&["--cores", "1"], spool.clone(), None);
    assert!(
        spool.join("0").join(&first).exists(),
        "the original's segment went before the copy was durable"
    );
    assert!(count() >= files.len());
    assert!(server.terminate().success());

    // With syncs working again, they go once a copy is known durable: the one on file is
    // not (no mark of its segment covers it), and the start copies the message again (with
    // segments of the size the spool was written with, a copy is due; delivery runs, the
    // waiting recipient's next hop refusing connections).
    disk.fail_syncs(false);
    let down = reserve("127.0.0.1", 0);
    let to_down = format!("down.test=127.0.0.1:{}", down.1);
    let mut args = common::SMALL_SEGMENTS.to_vec();
    args.extend(["--route", &to_down]);
    let mut server = Server::start_in(&args, spool.clone(), None);
    let deadline = Instant::now() + Duration::from_secs(20);
    while spool.join("0").join(&first).exists() || count() > 3 {
        assert!(Instant::now() < deadline, "{} segments kept", count());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(server.terminate().success());
    let r = postern_spool::recover(&spool).unwrap();
    let waiting: Vec<_> = r.messages.iter().filter(|m| !m.is_final()).collect();
    assert_eq!(waiting.len(), 1);
    assert_eq!(waiting[0].queue_id, id);
    assert_eq!(waiting[0].statuses[0], Some(delivered));
}

#[test]
fn a_body_trickled_while_other_mail_is_delivered_does_not_keep_the_segments_behind_it() {
    // A client sends a body within the limits a line now and then (the command timeout
    // allows minutes between reads) while other mail comes and is delivered. The message
    // being received is moved forward at its next line, and the delivered mail's segments go
    // while it is still open, rather than at its end (up to --max-session-time later).
    let peer = Peer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let dest = format!("dest.test=127.0.0.1:{}", peer.port);
    let mut args = common::SMALL_SEGMENTS.to_vec();
    args.extend(["--metrics", "127.0.0.1:0", "--route", &dest]);
    let server = Server::start_in(&args, spool.clone(), None);
    let (mut slow, _) = hello(&server);
    assert!(slow.cmd("MAIL FROM:<s@origin.test>").starts_with("250"));
    assert!(slow.cmd("RCPT TO:<slow@dest.test>").starts_with("250"));
    assert!(slow.cmd("DATA").starts_with("354"));
    slow.send(b"Message-ID: <slow@t>\r\n\r\nthe first line\r\n");
    // About ten segments' worth of other mail, all delivered.
    let line = "x".repeat(76) + "\r\n";
    let (mut c, _) = hello(&server);
    for i in 0..240 {
        assert!(c.cmd("MAIL FROM:<s@origin.test>").starts_with("250"));
        assert!(c.cmd("RCPT TO:<x@dest.test>").starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        c.send(format!("Message-ID: <m{i}@t>\r\n\r\n{}.\r\n", line.repeat(64)).as_bytes());
        assert!(c.line().starts_with("250 2.0.0"));
    }
    peer.wait_for("the other mail", Duration::from_secs(60), |s| {
        s.len() == 240
    });
    let grown = segments(&spool);
    assert!(grown >= 6, "{grown} segments");
    // The next line moves the message; the segments behind it go at the next delivery.
    slow.send(b"the second line\r\n");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    while segments(&spool) > 4 {
        assert!(
            Instant::now() < deadline,
            "{} of {grown} segments kept for a message still being received",
            segments(&spool)
        );
        assert!(c.cmd("MAIL FROM:<s@origin.test>").starts_with("250"));
        assert!(c.cmd("RCPT TO:<x@dest.test>").starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        c.send(format!("Message-ID: <n{n}@t>\r\n\r\nshort\r\n.\r\n").as_bytes());
        assert!(c.line().starts_with("250 2.0.0"));
        n += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    server.metrics_until(|m| counter(m, "postern_spool_drafts_moved_total") == 1);
    // Its end: taken and delivered whole.
    let reply = slow.cmd("the last line\r\n.");
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    let got = peer.wait_for("the trickled message", Duration::from_secs(20), |s| {
        s.iter().any(|m| m.message_id == "<slow@t>")
    });
    let m = got.iter().find(|m| m.message_id == "<slow@t>").unwrap();
    let text = String::from_utf8_lossy(&m.data);
    assert!(
        text.ends_with("\r\n\r\nthe first line\r\nthe second line\r\nthe last line\r\n"),
        "{text}"
    );
}
