//! Appends, syncs and recovery on a real filesystem.
#![allow(clippy::unwrap_used)]

use postern_spool::{recover, MessageMeta, Recipient, Spool, SpoolOptions, Ticket, TicketState};

fn meta(i: usize) -> MessageMeta {
    MessageMeta {
        arrival: 1_795_346_220 + i as u64,
        client: "192.0.2.1".into(),
        helo: "client.test".into(),
        reverse_path: format!("sender{i}@origin.test"),
        recipients: vec![
            Recipient {
                path: "a@dest.test".into(),
                notify: Some(2),
                orcpt: Some("rfc822;a@dest.test".into()),
            },
            Recipient {
                path: "b@dest.test".into(),
                notify: None,
                orcpt: None,
            },
        ],
        envid: Some("ENV1".into()),
        ret: Some(2),
        body_type: 1,
        smtputf8: false,
    }
}

fn body(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|k| (k * 31 + i * 7) as u8).collect()
}

const SMALL: SpoolOptions = SpoolOptions {
    segment_size: 64 * 1024,
};

/// A spool of 64 KiB segments under `root` holding one message finished in it (`meta(1)`,
/// 1,000 octets of `body(1, _)`), not yet synced: the spool, its ID and its ticket.
fn one_message_in_small_segments(root: &std::path::Path) -> (Spool, String, Ticket) {
    let mut spool = Spool::open(root, 0, SMALL).unwrap();
    let mut m = spool.begin(&meta(1)).unwrap();
    spool.append(&mut m, &body(1, 1000)).unwrap();
    let id = m.queue_id().to_owned();
    let ticket = spool.finish(m).unwrap();
    (spool, id, ticket)
}

#[test]
fn finished_messages_come_back_whole_and_aborted_ones_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let opts = SpoolOptions {
        segment_size: 256 * 1024,
    };
    let mut spool = Spool::open(dir.path(), 0, opts).unwrap();
    let mut expected = Vec::new();
    let mut tickets = Vec::new();
    for i in 0..20 {
        let mut d = spool.begin(&meta(i)).unwrap();
        let b = body(i, 1000 + i * 3000);
        for piece in b.chunks(777) {
            spool.append(&mut d, piece).unwrap();
        }
        if i % 5 == 4 {
            spool.abort(d);
            continue;
        }
        expected.push((d.queue_id().to_owned(), meta(i), b));
        tickets.push(spool.finish(d).unwrap());
    }
    // One left open, as a crash would leave it.
    let mut open = spool.begin(&meta(99)).unwrap();
    spool.append(&mut open, b"never finished").unwrap();
    assert!(tickets
        .iter()
        .all(|t| spool.ticket_state(*t) == TicketState::Pending));
    spool.sync_now().unwrap();
    assert!(tickets
        .iter()
        .all(|t| spool.ticket_state(*t) == TicketState::Durable));

    let r = recover(dir.path()).unwrap();
    assert_eq!(r.messages.len(), expected.len());
    assert_eq!(r.unfinished, 1);
    assert_eq!(r.corrupt_records, 0);
    assert!(r.segments > 1, "bodies this size span segments");
    for (m, (id, meta, body)) in r.messages.iter().zip(&expected) {
        assert_eq!(&m.queue_id, id);
        assert_eq!(&m.meta, meta);
        assert_eq!(&r.body_vec(m), body);
    }
}

#[test]
fn reopening_starts_a_new_segment_and_keeps_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let opts = SpoolOptions {
        segment_size: 128 * 1024,
    };
    for round in 0..3 {
        let mut spool = Spool::open(dir.path(), 1, opts).unwrap();
        let mut d = spool.begin(&meta(round)).unwrap();
        // An unfinished draft numbered like the next opening's first must not be confused.
        spool.append(&mut d, b"x").unwrap();
        let mut d2 = spool.begin(&meta(round)).unwrap();
        spool.append(&mut d2, &body(round, 5000)).unwrap();
        spool.finish(d2).unwrap();
        spool.sync_now().unwrap();
    }
    let r = recover(dir.path()).unwrap();
    assert_eq!(r.messages.len(), 3);
    assert_eq!(r.unfinished, 3);
    assert!(r.messages.iter().all(|m| m.core == 1 && m.size() == 5000));
}

#[test]
fn status_records_merge_across_cores_and_restarts() {
    use postern_spool::{DeliveryState, Status};
    let dir = tempfile::tempdir().unwrap();
    let opts = SpoolOptions {
        segment_size: 128 * 1024,
    };
    let mut a = Spool::open(dir.path(), 0, opts).unwrap();
    let mut d = a.begin(&meta(1)).unwrap();
    a.append(&mut d, b"body").unwrap();
    let id = d.queue_id().to_owned();
    a.finish(d).unwrap();
    let deferred = Status {
        state: DeliveryState::Deferred {
            next_attempt: 42,
            warned: false,
        },
        reply: "451 4.3.0 try later".into(),
    };
    a.append_status(&id, 0, &deferred).unwrap();
    a.sync_now().unwrap();
    drop(a);
    // Recipient 1: deferred, then deferred again once its sender was warned of the delay.
    let warned = Status {
        state: DeliveryState::Deferred {
            next_attempt: 43,
            warned: true,
        },
        reply: "451 4.3.0 try later".into(),
    };
    // After a restart: recipient 0 delivered, then a stale deferral that must not undo it.
    let mut a = Spool::open(dir.path(), 0, opts).unwrap();
    let delivered = Status {
        state: DeliveryState::Delivered,
        reply: "250 2.0.0 ok".into(),
    };
    a.append_status(&id, 0, &delivered).unwrap();
    a.append_status(&id, 0, &deferred).unwrap();
    a.append_status(&id, 1, &deferred).unwrap();
    a.append_status(&id, 1, &warned).unwrap();
    a.append_status("NO-SUCH-ID", 0, &delivered).unwrap();
    a.sync_now().unwrap();

    let r = recover(dir.path()).unwrap();
    assert_eq!(r.messages.len(), 1);
    let m = &r.messages[0];
    assert_eq!(m.statuses, vec![Some(delivered.clone()), Some(warned)]);
    assert!(!m.is_final(), "recipient 1 is deferred");
    assert_eq!(r.orphan_statuses, 1);

    let failed = Status {
        state: DeliveryState::Failed,
        reply: "550 5.1.1 no such user".into(),
    };
    a.append_status(&id, 1, &failed).unwrap();
    a.sync_now().unwrap();
    let r = recover(dir.path()).unwrap();
    assert!(r.messages[0].is_final());
    assert_eq!(r.messages[0].statuses[1], Some(failed));
}

#[test]
fn spare_segments_are_used_in_order_and_late_ones_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let opts = SpoolOptions {
        segment_size: 64 * 1024,
    };
    let mut spool = Spool::open(dir.path(), 0, opts).unwrap();
    let job = spool.spare_job().unwrap();
    assert!(spool.spare_job().is_none(), "one spare at a time");
    spool.install_spare(job.run());
    // Fill several segments; the spare goes first, the rest are made inline.
    let late = spool.spare_job().is_none();
    assert!(late, "a spare is ready, no job needed");
    for i in 0..6 {
        let mut d = spool.begin(&meta(i)).unwrap();
        spool.append(&mut d, &body(i, 40_000)).unwrap();
        spool.finish(d).unwrap();
    }
    // A spare made for a number the spool has already passed is deleted, not used.
    let job = spool.spare_job().unwrap();
    for i in 6..12 {
        let mut d = spool.begin(&meta(i)).unwrap();
        spool.append(&mut d, &body(i, 40_000)).unwrap();
        spool.finish(d).unwrap();
    }
    let stale = job.run();
    spool.install_spare(stale);
    spool.sync_now().unwrap();
    let r = recover(dir.path()).unwrap();
    assert_eq!(r.messages.len(), 12);
    for (i, m) in r.messages.iter().enumerate() {
        assert_eq!(
            r.body_vec(m),
            body(i, 40_000),
            "message {i} in order and whole"
        );
    }
    let files = std::fs::read_dir(dir.path().join("0")).unwrap().count();
    assert_eq!(files, spool.segment_count(), "no stray spare left behind");
}

/// A process killed while records of a full segment are still gathered (to be written by the
/// next sync) must not leave a later segment holding records that follow them: recovery would
/// see a message's start and end with a hole in its body, damage no disk caused. Each write
/// that goes to a file at once (a bulk body chunk, or gathered records past the memory bound)
/// comes after the older segments' gathered records are in their files. The "kill" here is
/// dropping the spool without its sync: what was written is in the page cache, what was only
/// gathered is gone.
#[test]
fn a_kill_between_segments_damages_no_message() {
    let dir = tempfile::tempdir().unwrap();
    let opts = SpoolOptions {
        segment_size: 1 << 20,
    };
    let mut spool = Spool::open(dir.path(), 0, opts).unwrap();
    // A body of small chunks, gathered and written 256 KiB at a time, over the end of the
    // first segment: what is still gathered of it at the switch waits for the next sync.
    let mut first = spool.begin(&meta(1)).unwrap();
    let mut first_len = 0;
    for i in 0..140 {
        let chunk = body(i, 8 * 1024);
        spool.append(&mut first, &chunk).unwrap();
        first_len += chunk.len();
    }
    // A bulk chunk goes into the second segment at once.
    spool.append(&mut first, &body(999, 32 * 1024)).unwrap();
    first_len += 32 * 1024;
    let _unsynced = spool.finish(first).unwrap();
    // Another message's small chunks push the second segment's gathered records (the first
    // message's end among them) into its file.
    let mut second = spool.begin(&meta(2)).unwrap();
    for i in 0..40 {
        spool.append(&mut second, &body(i, 8 * 1024)).unwrap();
    }
    std::mem::forget(second);
    let r = killed(dir.path(), spool);
    // The first message was finished but never synced: it may be there or not, but whole.
    for m in &r.messages {
        assert_eq!(m.size(), first_len as u64);
    }
}

/// The same with the older segment's records in a batch taken for its sync and not yet run
/// (the sync thread has not written them) when the next segment is written at once.
#[test]
fn a_kill_before_a_taken_batch_is_written_damages_no_message() {
    let dir = tempfile::tempdir().unwrap();
    let opts = SpoolOptions {
        segment_size: 1 << 20,
    };
    let mut spool = Spool::open(dir.path(), 0, opts).unwrap();
    let mut first = spool.begin(&meta(1)).unwrap();
    for i in 0..100 {
        spool.append(&mut first, &body(i, 8 * 1024)).unwrap();
    }
    let mut other = spool.begin(&meta(0)).unwrap();
    spool.append(&mut other, b"small\r\n").unwrap();
    let _ticket = spool.finish(other).unwrap();
    // Taken for its sync, never run: what it holds of the first segment is not in the file.
    let batch = spool.take_sync().expect("a batch");
    for i in 100..140 {
        spool.append(&mut first, &body(i, 8 * 1024)).unwrap();
    }
    let _unsynced = spool.finish(first).unwrap();
    let mut second = spool.begin(&meta(2)).unwrap();
    for i in 0..40 {
        spool.append(&mut second, &body(i, 8 * 1024)).unwrap();
    }
    std::mem::forget(batch);
    std::mem::forget(second);
    killed(dir.path(), spool);
}

#[test]
fn a_kill_before_a_batch_taken_after_a_rollover_is_written_damages_no_message() {
    // The batch is taken once the body has crossed into the second segment: it holds the
    // first segment's last gathered records as well as the second's. Records the second
    // segment writes at once must still not reach the file before those.
    let dir = tempfile::tempdir().unwrap();
    let opts = SpoolOptions {
        segment_size: 1 << 20,
    };
    let mut spool = Spool::open(dir.path(), 0, opts).unwrap();
    let mut first = spool.begin(&meta(1)).unwrap();
    for i in 0..140 {
        spool.append(&mut first, &body(i, 8 * 1024)).unwrap();
    }
    assert_eq!(
        spool.segment_count(),
        2,
        "the body must be in a second segment before the batch is taken"
    );
    let mut other = spool.begin(&meta(0)).unwrap();
    spool.append(&mut other, b"small\r\n").unwrap();
    let _ticket = spool.finish(other).unwrap();
    // Taken for its sync, never run.
    let batch = spool.take_sync().expect("a batch");
    for i in 140..150 {
        spool.append(&mut first, &body(i, 8 * 1024)).unwrap();
    }
    let _unsynced = spool.finish(first).unwrap();
    // Past the gathering limit: the second segment's records, the first message's end among
    // them, go into its file at once.
    let mut third = spool.begin(&meta(2)).unwrap();
    for i in 0..40 {
        spool.append(&mut third, &body(i, 8 * 1024)).unwrap();
    }
    std::mem::forget(batch);
    std::mem::forget(third);
    killed(dir.path(), spool);
}

/// Ends `spool` as a killed process would (nothing more written, no sync) and recovers what is
/// on file, which must span two segments and hold no damaged message.
fn killed(root: &std::path::Path, spool: Spool) -> postern_spool::Recovered {
    assert!(
        std::fs::read_dir(root.join("0")).unwrap().count() >= 2,
        "the body must cross into a second segment"
    );
    std::mem::forget(spool);
    let r = recover(root).unwrap();
    assert_eq!(r.damaged, 0, "a kill damaged a message");
    assert_eq!(r.corrupt_records, 0);
    r
}

#[test]
fn a_spool_whose_segment_numbers_are_used_up_does_not_open() {
    // Something with the highest name a segment may have (restored, or made by hand): the
    // next segment would have a name no opening or recovery reads, and the mail acknowledged
    // in it would be lost at the next start. The opening fails instead, naming the file.
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("0/4294967295.seg")).unwrap();
    let Err(err) = Spool::open(root.path(), 0, SpoolOptions::default()) else {
        panic!("opened with no segment number left");
    };
    let text = err.to_string();
    assert!(
        text.contains("4294967295.seg") && text.contains("no segment can follow"),
        "{text}"
    );
    // One below it still leaves a number: the last.
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("0/4294967294.seg")).unwrap();
    let small = SpoolOptions {
        segment_size: 64 * 1024,
    };
    let mut spool = Spool::open(root.path(), 0, small).unwrap();
    let mut d = spool.begin(&meta(1)).unwrap();
    spool.append(&mut d, &body(1, 100)).unwrap();
    let id = d.queue_id().to_owned();
    let t = spool.finish(d).unwrap();
    spool.sync_now().unwrap();
    assert!(spool.is_durable(t));
    // Past it, no segment is made (one numbered past 32 bits would never be read again):
    // the message that needs one is refused, not acknowledged into a file lost at the
    // next start.
    assert!(
        spool.spare_job().is_none(),
        "no number is left to make ahead"
    );
    let refused = spool
        .begin(&meta(2))
        .and_then(|mut d| spool.append(&mut d, &body(2, 128 * 1024)).map(|()| d))
        .and_then(|d| spool.finish(d));
    let Err(err) = refused else {
        panic!("a message past the last segment was taken");
    };
    assert!(err.to_string().contains("no segment can follow"), "{err}");
    drop(spool);
    let names: Vec<String> = std::fs::read_dir(root.path().join("0"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with("4294967296")),
        "{names:?}"
    );
    let r = recover(root.path()).unwrap();
    assert_eq!(r.messages.len(), 1);
    assert_eq!(r.messages[0].queue_id, id);
}

#[test]
fn a_write_at_once_behind_a_batch_of_its_own_segment_comes_after_that_batch() {
    // A finished message's records wait in a batch taken for its sync; then a bulk chunk of
    // another message goes into the same segment at once. The batch's records are put in
    // the file first: left to its sync thread, a kill in the middle of that thread's write
    // tore its last record under valid ones written after it, which recovery reports as
    // damage rather than as a torn tail.
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 0, SpoolOptions::default()).unwrap();
    let mut first = spool.begin(&meta(1)).unwrap();
    spool.append(&mut first, b"small body\r\n").unwrap();
    let first_id = first.queue_id().to_owned();
    let _ticket = spool.finish(first).unwrap();
    let batch = spool.take_sync().expect("a batch");
    let mut second = spool.begin(&meta(2)).unwrap();
    spool.append(&mut second, &body(2, 64 * 1024)).unwrap();
    // Killed here: the batch never ran.
    std::mem::forget(batch);
    std::mem::forget(second);
    std::mem::forget(spool);
    let r = recover(dir.path()).unwrap();
    let ids: Vec<&str> = r.messages.iter().map(|m| m.queue_id.as_str()).collect();
    assert_eq!(
        ids,
        [first_id.as_str()],
        "the batch's records were not put first"
    );
    assert_eq!((r.damaged, r.corrupt_records), (0, 0));
}

#[test]
fn an_id_a_status_names_is_not_issued_again_after_its_message_is_gone() {
    use postern_spool::{DeliveryState, Status};
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 0, SpoolOptions::default()).unwrap();
    let mut d = spool.begin(&meta(1)).unwrap();
    spool.append(&mut d, &body(1, 100)).unwrap();
    let id = d.queue_id().to_owned();
    spool.finish(d).unwrap();
    // An outcome for a message of this core whose records are gone (reclaimed), issued when
    // the clock read far ahead of now (it has been set back since).
    let ahead = format!("3{}", &id[1..]);
    assert!(ahead > id);
    let delivered = Status {
        state: DeliveryState::Delivered,
        reply: "250 2.0.0 ok".into(),
    };
    spool.append_status(&ahead, 0, &delivered).unwrap();
    spool.sync_now().unwrap();
    drop(spool);
    let mut spool = Spool::open(dir.path(), 0, SpoolOptions::default()).unwrap();
    let d = spool.begin(&meta(2)).unwrap();
    assert!(
        d.queue_id() > ahead.as_str(),
        "{} issued after a status for {ahead} was found",
        d.queue_id()
    );
}

#[test]
fn segments_only_an_abandoned_body_wrote_into_go_while_older_mail_waits() {
    // A waits in the first segment; B's body runs over three more and is abandoned (too
    // large, or its client gone) while C is written and finished beside its end. B's own
    // segments go at once; A's and C's stay; a recovery then finds A and C whole and reports
    // no damage, B's START and its ABORT left without the records between them.
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, a_id, ta) = one_message_in_small_segments(dir.path());
    let mut b = spool.begin(&meta(2)).unwrap();
    spool.append(&mut b, &body(2, 200 * 1024)).unwrap();
    let mut c = spool.begin(&meta(3)).unwrap();
    spool.append(&mut c, &body(3, 1000)).unwrap();
    let c_id = c.queue_id().to_owned();
    let (tc, c_body) = spool.finish_with_body(c).unwrap();
    spool.sync_now().unwrap();
    assert!(spool.is_durable(ta) && spool.is_durable(tc));
    let before = spool.segment_count();
    assert!(before >= 4, "{before}");
    // While B is open nothing goes.
    assert_eq!(spool.reclaim().unwrap(), 0);
    spool.abort(b);
    let freed = spool.reclaim().unwrap();
    // All but the first (A's, and B's START) and the last (B's end, C).
    assert_eq!(freed, before - 2, "{freed} of {before} segments freed");
    assert_eq!(spool.segment_count(), before - freed);
    // C's body is still read where it was written.
    let c_body = spool.body(c_body).unwrap();
    assert_eq!(c_body.to_vec(), body(3, 1000));
    spool.sync_now().unwrap();
    drop(spool);
    let r = recover(dir.path()).unwrap();
    assert_eq!((r.damaged, r.corrupt_records), (0, 0));
    let ids: Vec<&str> = r.messages.iter().map(|m| m.queue_id.as_str()).collect();
    assert_eq!(ids, [a_id.as_str(), c_id.as_str()]);
    for m in &r.messages {
        assert_eq!(r.body_vec(m).len(), 1000);
    }
    // Opened again, nothing is lost and A still holds its segment.
    let spool = Spool::open(dir.path(), 0, SMALL).unwrap();
    assert_eq!(spool.live_messages(), 2);
}

#[test]
fn a_slow_message_does_not_keep_the_segments_an_abandoned_body_filled_while_it_waited() {
    // E starts, then waits (a slow client) while B's body fills three segments and is
    // abandoned; E's next chunk goes into the newest segment. Only the segments E wrote into
    // count for it: those it passed over held B's records alone, and go. (E, holding the
    // oldest segment while three it wrote nothing into came after it, is moved forward at
    // that chunk: its START goes to the newest segment, and the oldest goes too.)
    let dir = tempfile::tempdir().unwrap();
    let opts = SpoolOptions {
        segment_size: 64 * 1024,
    };
    let mut spool = Spool::open(dir.path(), 0, opts).unwrap();
    let mut e = spool.begin(&meta(1)).unwrap();
    spool.append(&mut e, &body(1, 500)).unwrap();
    let mut b = spool.begin(&meta(2)).unwrap();
    spool.append(&mut b, &body(2, 200 * 1024)).unwrap();
    spool.append(&mut e, &body(1, 500)).unwrap();
    let before = spool.segment_count();
    assert!(before >= 4, "{before}");
    assert_eq!(spool.drafts_moved(), 1);
    spool.abort(b);
    let freed = spool.reclaim().unwrap();
    assert_eq!(freed, before - 1, "{freed} of {before} segments freed");
    let e_id = e.queue_id().to_owned();
    let t = spool.finish(e).unwrap();
    spool.sync_now().unwrap();
    assert!(spool.is_durable(t));
    drop(spool);
    let r = recover(dir.path()).unwrap();
    assert_eq!((r.damaged, r.corrupt_records), (0, 0));
    assert_eq!(r.messages.len(), 1);
    assert_eq!(r.messages[0].queue_id, e_id);
    let mut whole = body(1, 500);
    whole.extend(body(1, 500));
    assert_eq!(r.body_vec(&r.messages[0]), whole);
}

#[test]
fn a_segment_only_an_abandoned_body_filled_waits_for_the_sync_taken_while_it_was_written() {
    // M is finished and its batch taken while D's body is being written into the second
    // segment; D runs on into a third and is abandoned before the batch's sync returns.
    // The second segment holds only D's records, but the batch was taken in it: deleting it
    // now would make the batch take its unlinking for another process's doing and fail
    // every ticket (M's 250 would become a 451). It goes once the batch is done.
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, m_id, tm) = one_message_in_small_segments(dir.path());
    let mut d = spool.begin(&meta(2)).unwrap();
    spool.append(&mut d, &body(2, 70 * 1024)).unwrap();
    assert_eq!(spool.segment_count(), 2);
    let batch = spool.take_sync().expect("a batch");
    spool.append(&mut d, &body(2, 70 * 1024)).unwrap();
    assert_eq!(spool.segment_count(), 3);
    spool.abort(d);
    assert_eq!(
        spool.reclaim().unwrap(),
        0,
        "the batch's segment stays while it runs"
    );
    assert!(!spool.reclaim_after_sync(), "not before the batch is done");
    let result = batch.run();
    assert!(result.is_ok(), "{result:?}");
    spool.sync_done(batch, result);
    assert_eq!(spool.ticket_state(tm), TicketState::Durable);
    assert!(spool.reclaim_after_sync());
    assert_eq!(spool.reclaim().unwrap(), 1);
    assert!(!spool.reclaim_after_sync());
    assert_eq!(spool.segment_count(), 2);
    spool.sync_now().unwrap();
    drop(spool);
    let r = recover(dir.path()).unwrap();
    assert_eq!((r.damaged, r.corrupt_records), (0, 0));
    assert_eq!(r.messages.len(), 1);
    assert_eq!(r.messages[0].queue_id, m_id);
    assert_eq!(r.body_vec(&r.messages[0]), body(1, 1000));
}

#[test]
fn a_power_cut_that_keeps_a_later_segment_s_writes_and_loses_an_earlier_one_s_tail_is_no_damage() {
    // M's START and first piece are durable in the first segment beside A; its next batch
    // writes the rest of the first segment and the start of the second, M's END there. The
    // power goes before that batch's sync returns, and the disk kept the second segment's
    // pages but not the first one's tail: M was never acknowledged, so it is cut off by a
    // crash, not damaged (nothing set aside, no warning to look at the disk), and A is whole.
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, a_id, ta) = one_message_in_small_segments(dir.path());
    let mut m = spool.begin(&meta(2)).unwrap();
    spool.append(&mut m, &body(2, 20 * 1024)).unwrap();
    spool.sync_now().unwrap();
    assert!(spool.is_durable(ta));
    let segments = |dir: &std::path::Path| {
        let mut files: Vec<_> = std::fs::read_dir(dir.join("0"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        files
    };
    let first = segments(dir.path())[0].clone();
    let first_before = std::fs::read(&first).unwrap();
    spool.append(&mut m, &body(3, 100 * 1024)).unwrap();
    spool.finish(m).unwrap();
    spool.sync_now().unwrap();
    assert!(segments(dir.path()).len() >= 2);
    std::mem::forget(spool);
    // The power cut: the first segment as it was before the second batch.
    std::fs::write(&first, &first_before).unwrap();
    let r = recover(dir.path()).unwrap();
    assert_eq!((r.damaged, r.corrupt_records), (0, 0), "{:?}", r.damaged_at);
    assert!(r.damaged_at.is_empty());
    assert_eq!(r.unfinished, 1);
    let ids: Vec<&str> = r.messages.iter().map(|m| m.queue_id.as_str()).collect();
    assert_eq!(ids, [a_id.as_str()]);
    assert_eq!(r.body_vec(&r.messages[0]), body(1, 1000));
}
