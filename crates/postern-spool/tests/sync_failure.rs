//! A failed sync: every ticket it may have covered fails, every draft begun before it fails
//! at finish (its records may be gone), the process goes on, and later messages are durable.
//! The failure is injected by reporting an error for a batch; the bytes themselves are fine.
#![allow(clippy::unwrap_used)]

mod common;

use common::{body, meta};
use postern_spool::{recover, DeliveryState, Spool, SpoolError, SpoolOptions, Status, TicketState};

#[test]
fn a_failed_sync_fails_what_it_touched_and_nothing_after() {
    let dir = tempfile::tempdir().unwrap();
    let opts = SpoolOptions {
        segment_size: 256 * 1024,
    };
    let mut spool = Spool::open(dir.path(), 0, opts).unwrap();

    let mut first = spool.begin(&meta(1)).unwrap();
    spool.append(&mut first, &body(1, 5000)).unwrap();
    let t1 = spool.finish(first).unwrap();
    let batch = spool.take_sync().unwrap();
    // While that batch runs: another message finishes, one is begun and stays open.
    let mut second = spool.begin(&meta(2)).unwrap();
    spool.append(&mut second, &body(2, 5000)).unwrap();
    let t2 = spool.finish(second).unwrap();
    let mut open = spool.begin(&meta(3)).unwrap();
    spool.append(&mut open, &body(3, 5000)).unwrap();
    let open_id = open.queue_id().to_owned();

    spool.sync_done(batch, Err(std::io::Error::from_raw_os_error(5)));
    assert_eq!(spool.ticket_state(t1), TicketState::Failed);
    assert_eq!(
        spool.ticket_state(t2),
        TicketState::Failed,
        "finished before the failure was known: its records may share the lost range"
    );
    // Its batch reports success later: too late, still failed.
    let late = spool.take_sync().unwrap();
    spool.sync_done(late, Ok(()));
    assert_eq!(spool.ticket_state(t2), TicketState::Failed);

    spool.append(&mut open, &body(3, 100)).unwrap();
    let err = spool.finish(open).unwrap_err();
    assert!(matches!(err, SpoolError::SyncFailed(_)) && err.is_temporary());

    // The process goes on: a new message is durable as usual.
    let mut next = spool.begin(&meta(4)).unwrap();
    spool.append(&mut next, &body(4, 5000)).unwrap();
    let next_id = next.queue_id().to_owned();
    let t4 = spool.finish(next).unwrap();
    spool.sync_now().unwrap();
    assert!(spool.is_durable(t4));

    let r = recover(dir.path()).unwrap();
    let ids: Vec<&str> = r.messages.iter().map(|m| m.queue_id.as_str()).collect();
    assert!(ids.contains(&next_id.as_str()));
    assert!(
        !ids.contains(&open_id.as_str()),
        "the draft refused at finish has no END"
    );
    assert_eq!(r.corrupt_records, 0);
}

#[test]
fn a_status_in_a_failed_sync_is_known_lost_after_a_later_sync_succeeds() {
    // The latest ticket written on a core says nothing of an earlier one that failed: the
    // relay settles a message after waiting for the latest, and must still learn that one of
    // its outcomes was not recorded.
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 0, SpoolOptions::default()).unwrap();
    let mut ids = Vec::new();
    for i in 1..=3 {
        let mut d = spool.begin(&meta(i)).unwrap();
        spool.append(&mut d, &body(i, 1000)).unwrap();
        ids.push(d.queue_id().to_owned());
        spool.finish(d).unwrap();
    }
    spool.sync_now().unwrap();
    let delivered = Status {
        state: DeliveryState::Delivered,
        reply: "250 2.0.0 taken".into(),
    };
    let (lost, later, untouched) = (&ids[0], &ids[1], &ids[2]);
    let first = spool.append_status(lost, 0, &delivered).unwrap();
    let batch = spool.take_sync().unwrap();
    spool.sync_done(batch, Err(std::io::Error::from_raw_os_error(5)));
    assert_eq!(spool.ticket_state(first), TicketState::Failed);
    // Statuses after the failure, this message's among them, are made durable.
    spool.append_status(later, 0, &delivered).unwrap();
    let last = spool.append_status(lost, 0, &delivered).unwrap();
    spool.sync_now().unwrap();
    assert!(spool.is_durable(last));
    assert!(spool.status_lost(lost), "its first status record was lost");
    assert!(
        !spool.status_lost(later),
        "all its status records are durable"
    );
    assert!(!spool.status_lost(untouched), "it has no status record");
}

#[test]
fn a_message_whose_sync_failed_does_not_hold_its_segments_once_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let opts = SpoolOptions {
        segment_size: 64 * 1024,
    };
    let mut spool = Spool::open(dir.path(), 0, opts).unwrap();
    let mut lost = spool.begin(&meta(1)).unwrap();
    spool.append(&mut lost, &body(1, 40_000)).unwrap();
    let lost_id = lost.queue_id().to_owned();
    let t = spool.finish(lost).unwrap();
    let batch = spool.take_sync().unwrap();
    spool.sync_done(batch, Err(std::io::Error::from_raw_os_error(5)));
    assert_eq!(spool.ticket_state(t), TicketState::Failed);
    spool.forget_failed(&lost_id, 1).unwrap();

    // Later messages fill several segments, are delivered and marked final.
    let mut ids = Vec::new();
    for i in 2..12 {
        let mut d = spool.begin(&meta(i)).unwrap();
        spool.append(&mut d, &body(i, 40_000)).unwrap();
        ids.push(d.queue_id().to_owned());
        spool.finish(d).unwrap();
    }
    spool.sync_now().unwrap();
    let before = spool.bytes_in_use();
    let mut deleted = 0;
    for id in &ids {
        deleted += spool.mark_final(id).unwrap();
    }
    assert!(
        deleted >= 5,
        "{deleted} segments deleted of {before} bytes: the failed message's first segment holds the rest"
    );
    assert!(
        spool.bytes_in_use() <= 3 * 64 * 1024,
        "{}",
        spool.bytes_in_use()
    );
}

#[test]
fn a_message_refused_after_a_failed_sync_is_not_taken_again_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 0, SpoolOptions::default()).unwrap();
    let mut kept = spool.begin(&meta(1)).unwrap();
    spool.append(&mut kept, &body(1, 500)).unwrap();
    let kept_id = kept.queue_id().to_owned();
    let t1 = spool.finish(kept).unwrap();
    spool.sync_now().unwrap();
    assert!(spool.is_durable(t1));

    // The next message's END is written, and the sync that covers it fails; its client is
    // told to send it again. Its records reached the file all the same (as they may on a
    // disk), in the segment the first message still holds.
    let mut refused = spool.begin(&meta(2)).unwrap();
    spool.append(&mut refused, &body(2, 500)).unwrap();
    let refused_id = refused.queue_id().to_owned();
    let recipients = refused.recipients();
    let t2 = spool.finish(refused).unwrap();
    let batch = spool.take_sync().unwrap();
    // The batch writes its records; its fdatasync is said to have failed.
    batch.run().unwrap();
    spool.sync_done(batch, Err(std::io::Error::from_raw_os_error(5)));
    assert_eq!(spool.ticket_state(t2), TicketState::Failed);
    spool.forget_failed(&refused_id, recipients).unwrap();
    spool.sync_now().unwrap();
    drop(spool);

    let r = recover(dir.path()).unwrap();
    let find = |id: &str| r.messages.iter().find(|m| m.queue_id == id);
    assert!(!find(&kept_id).unwrap().is_final());
    let refused = find(&refused_id).expect("its records are in the file");
    assert_eq!(refused.statuses.len(), recipients as usize);
    assert!(
        refused.is_final(),
        "a restart would deliver it beside the copy its client sends again"
    );
}

#[test]
fn a_spare_numbered_below_a_segment_already_used_is_never_used() {
    use postern_spool::{DeliveryState, Status};
    let dir = tempfile::tempdir().unwrap();
    let opts = SpoolOptions {
        segment_size: 64 * 1024,
    };
    let mut spool = Spool::open(dir.path(), 0, opts).unwrap();
    // Two messages fill most of the first segment.
    let mut ids = Vec::new();
    for (i, len) in [(1, 5000), (2, 50_000)] {
        let mut d = spool.begin(&meta(i)).unwrap();
        spool.append(&mut d, &body(i, len)).unwrap();
        ids.push(d.queue_id().to_owned());
        spool.finish(d).unwrap();
    }
    spool.sync_now().unwrap();
    // Both are delivered.
    for id in &ids {
        spool.mark_final(id).unwrap();
    }
    // A spare is asked for (the next number), but is slow to come: delivery outcomes fill
    // the first segment, and the one after it is made inline, with the number after the
    // spare's. It holds nothing but outcomes.
    let job = spool.spare_job().unwrap();
    let delivered = Status {
        state: DeliveryState::Delivered,
        reply: "250 2.0.0 ok".into(),
    };
    let first = segment_files(dir.path());
    while segment_files(dir.path()).len() == first.len() {
        spool.append_status(&ids[0], 0, &delivered).unwrap();
    }
    let made_inline = segment_files(dir.path()).pop().unwrap();
    // Its sync fails: that segment is abandoned and, holding no message, reclaimed with the
    // first.
    let batch = spool.take_sync().unwrap();
    spool.sync_done(batch, Err(std::io::Error::from_raw_os_error(5)));
    spool.reclaim().unwrap();
    for f in spool.take_unlinks() {
        std::fs::remove_file(&f.path).unwrap();
    }
    assert_eq!(segment_files(dir.path()), Vec::<String>::new());
    // The spare arrives now, numbered below the segment used before it.
    spool.install_spare(job.run());
    let mut next = spool.begin(&meta(3)).unwrap();
    spool.append(&mut next, &body(3, 20_000)).unwrap();
    spool.finish(next).unwrap();
    spool.sync_now().unwrap();
    let now = segment_files(dir.path());
    assert_eq!(now.len(), 1, "{now:?}");
    assert!(
        now[0] > made_inline,
        "segment {} used after segment {made_inline}",
        now[0]
    );
}

/// The segment files of core 0, by name (which sorts as the numbers do).
fn segment_files(root: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root.join("0"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}
