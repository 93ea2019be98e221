//! Copying a long-waiting message forward so that the segments behind it can go, on a real
//! filesystem: what the copy carries, and what a recovery finds at each point of it.
#![allow(clippy::unwrap_used)]

mod common;

use common::{body, meta, pass_through};
use postern_spool::{
    recover, DeliveryState, MessageMeta, MessageRef, Spool, SpoolOptions, Status, TicketState,
};

const OPTS: SpoolOptions = SpoolOptions {
    segment_size: 64 * 1024,
};

fn delivered() -> Status {
    Status {
        state: DeliveryState::Delivered,
        reply: "250 2.0.0 taken".into(),
    }
}

fn deferred() -> Status {
    Status {
        state: DeliveryState::Deferred {
            next_attempt: 1_795_350_000,
            warned: true,
        },
        reply: "451 4.3.0 try later".into(),
    }
}

/// A spool whose first segment holds message W (its first recipient delivered, its second
/// deferred and warned of the delay) and whose later segments hold messages delivered since:
/// W's body and ID, and the spool.
fn waiting_behind_delivered_mail(root: &std::path::Path) -> (Spool, String, MessageRef) {
    let mut spool = Spool::open(root, 0, OPTS).unwrap();
    let mut w = spool.begin(&meta(1)).unwrap();
    // Over two segments: the copy must take the whole body, wherever its pieces lie.
    spool.append(&mut w, &body(1, 90 * 1024)).unwrap();
    let id = w.queue_id().to_owned();
    let (_, pending) = spool.finish_with_body(w).unwrap();
    spool.sync_now().unwrap();
    let w_body = spool.body(pending).unwrap();
    spool.append_status(&id, 0, &delivered()).unwrap();
    spool.append_status(&id, 1, &deferred()).unwrap();
    for i in 2..40 {
        pass_through(&mut spool, i, 8 * 1024, &delivered().reply);
    }
    assert!(spool.segment_count() >= 6, "{}", spool.segment_count());
    (spool, id, w_body)
}

/// What a recovery of `root` finds of W: it alone, once, whole, with both outcomes.
fn recovered_once(root: &std::path::Path, id: &str) -> postern_spool::Recovered {
    let r = recover(root).unwrap();
    assert_eq!((r.damaged, r.corrupt_records), (0, 0));
    let ids: Vec<&str> = r.messages.iter().map(|m| m.queue_id.as_str()).collect();
    let live: Vec<&str> = r
        .messages
        .iter()
        .filter(|m| !m.is_final())
        .map(|m| m.queue_id.as_str())
        .collect();
    assert_eq!(live, [id], "all found: {ids:?}");
    assert_eq!(ids.iter().filter(|&&m| m == id).count(), 1, "{ids:?}");
    let w = r.messages.iter().find(|m| m.queue_id == id).unwrap();
    assert_eq!(r.body_vec(w), body(1, 90 * 1024));
    assert_eq!(w.meta, meta(1));
    assert_eq!(w.statuses, [Some(delivered()), Some(deferred())]);
    r
}

#[test]
fn a_message_copied_forward_lets_the_segments_it_kept_go_and_is_found_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, id, w_body) = waiting_behind_delivered_mail(dir.path());
    let before = spool.segment_count();
    // Every segment after W's is done with, but W keeps them all.
    assert_eq!(spool.reclaim().unwrap(), 0);
    assert_eq!(spool.next_to_copy(usize::MAX), [id.as_str()]);
    let (ticket, pending) = spool.copy_forward(&id, &meta(1), &w_body).unwrap().unwrap();
    assert!(
        spool
            .copy_forward(&id, &meta(1), &w_body)
            .unwrap()
            .is_none(),
        "one copy at a time"
    );
    assert!(
        spool.next_to_copy(usize::MAX).is_empty(),
        "a copy is on its way"
    );
    // Until the copy is durable, nothing goes.
    assert_eq!(spool.reclaim().unwrap(), 0);
    spool.sync_now().unwrap();
    assert!(spool.is_durable(ticket));
    let copied = spool.body(pending).unwrap();
    assert_eq!(copied.to_vec(), body(1, 90 * 1024));
    let freed = spool.copy_over(&id, true).unwrap();
    assert!(
        spool.segment_count() <= 3,
        "{freed} of {before} segments freed, {} kept",
        spool.segment_count()
    );
    assert!(spool.next_to_copy(usize::MAX).is_empty());
    assert!(spool.is_live(&id));
    // An outcome recorded after the copy applies to it.
    let later = Status {
        state: DeliveryState::Deferred {
            next_attempt: 1_795_360_000,
            warned: true,
        },
        reply: "451 4.3.0 later still".into(),
    };
    spool.append_status(&id, 1, &later).unwrap();
    spool.sync_now().unwrap();
    drop(spool);
    let r = recover(dir.path()).unwrap();
    let found: Vec<_> = r.messages.iter().filter(|m| m.queue_id == id).collect();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].statuses, [Some(delivered()), Some(later)]);
    assert_eq!(r.body_vec(found[0]), body(1, 90 * 1024));
    assert_eq!(r.messages.iter().filter(|m| !m.is_final()).count(), 1);
    // Opened again, it is still live there, and the segments stay few.
    let spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    assert_eq!(spool.live_messages(), 1);
    assert!(spool.segment_count() <= 3);
}

#[test]
fn a_stop_between_a_copy_and_the_release_of_its_old_place_finds_the_message_once() {
    // The copy is durable but the process ends before the old segments are let go: both
    // copies are on disk, and a recovery takes one, with its outcomes; the opening after it
    // lets the old segments go.
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, id, w_body) = waiting_behind_delivered_mail(dir.path());
    let before = spool.segment_count();
    let (ticket, _) = spool.copy_forward(&id, &meta(1), &w_body).unwrap().unwrap();
    spool.sync_now().unwrap();
    assert!(spool.is_durable(ticket));
    std::mem::forget(spool);
    recovered_once(dir.path(), &id);
    // Killed before the mark of the copy's segment moved past it: nothing on disk says the
    // copy is durable, and the opening keeps the message where it was.
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    assert_eq!(spool.live_messages(), 1);
    assert!(spool.segment_count() >= before, "{}", spool.segment_count());
    // The copy a start makes at once lets the old segments go.
    assert_eq!(spool.next_to_copy(usize::MAX), [id.as_str()]);
    let found = recover(dir.path()).unwrap();
    let w = found.messages.iter().find(|m| m.queue_id == id).unwrap();
    spool.copy_forward(&id, &w.meta, w.body()).unwrap().unwrap();
    spool.sync_now().unwrap();
    spool.copy_over(&id, true).unwrap();
    drop(found);
    assert!(
        spool.segment_count() < before / 2,
        "{} of {before} kept",
        spool.segment_count()
    );
    drop(spool);
    recovered_once(dir.path(), &id);
}

#[test]
fn a_copy_at_a_graceful_stop_is_known_durable_and_the_opening_lets_the_old_place_go() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, id, w_body) = waiting_behind_delivered_mail(dir.path());
    let before = spool.segment_count();
    spool.copy_forward(&id, &meta(1), &w_body).unwrap().unwrap();
    spool.sync_now().unwrap();
    // A stop syncs the seal of the segment the copy filled, then moves the mark of the one
    // being written over its durable records.
    while spool.sync_wanted() {
        spool.sync_now().unwrap();
    }
    spool.mark_durable_end();
    std::mem::forget(spool);
    recovered_once(dir.path(), &id);
    let spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    assert_eq!(spool.live_messages(), 1);
    assert!(
        spool.segment_count() < before / 2,
        "{} of {before} kept",
        spool.segment_count()
    );
    drop(spool);
    recovered_once(dir.path(), &id);
}

/// Each segment file of core 0 under `root`, with its content.
fn segment_files(
    root: &std::path::Path,
) -> std::collections::BTreeMap<std::path::PathBuf, Vec<u8>> {
    std::fs::read_dir(root.join("0"))
        .unwrap()
        .flatten()
        .map(|e| (e.path(), std::fs::read(e.path()).unwrap()))
        .collect()
}

/// Copies message `id` forward; the copy reaches its file (the page cache) and its sync says
/// EIO (the kernel may have marked the pages clean without writing them), so the message
/// stays where it was; then the process is killed.
fn copy_whose_sync_fails_then_kill(
    mut spool: Spool,
    id: &str,
    meta: &MessageMeta,
    body: &MessageRef,
) {
    let (ticket, _) = spool.copy_forward(id, meta, body).unwrap().unwrap();
    let batch = spool.take_sync().unwrap();
    batch.run().unwrap();
    spool.sync_done(batch, Err(std::io::Error::from_raw_os_error(5)));
    assert_eq!(spool.ticket_state(ticket), TicketState::Failed);
    spool.copy_over(id, false).unwrap();
    std::mem::forget(spool);
}

/// The power cut after a failed sync: what it held never reached the disk. Segments made
/// since `before` are gone with it; the others are as they were then (a deletion since,
/// which an opening syncs, stays).
fn power_cut_back_to(
    root: &std::path::Path,
    before: &std::collections::BTreeMap<std::path::PathBuf, Vec<u8>>,
) {
    for (path, data) in &segment_files(root) {
        match before.get(path) {
            Some(old) if old != data => std::fs::write(path, old).unwrap(),
            Some(_) => {}
            None => std::fs::remove_file(path).unwrap(),
        }
    }
}

#[test]
fn a_copy_whose_sync_failed_does_not_take_the_original_s_place_at_the_next_opening() {
    // The copy's sync fails with EIO: the kernel may have marked its pages clean without
    // writing them, and a restart without a reboot reads the copy whole from the page cache,
    // where a later sync (the opening's) succeeds without writing it. Taken in place of the
    // original, the original's segments would be deleted at the opening, and a power cut
    // after that would leave neither.
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, id, w_body) = waiting_behind_delivered_mail(dir.path());
    spool.sync_now().unwrap();
    let before_copy = segment_files(dir.path());
    copy_whose_sync_fails_then_kill(spool, &id, &meta(1), &w_body);
    // The restart.
    let spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    assert_eq!(spool.live_messages(), 1);
    drop(spool);
    power_cut_back_to(dir.path(), &before_copy);
    recovered_once(dir.path(), &id);
}

#[test]
fn a_copy_whose_sync_failed_does_not_take_the_place_of_an_original_no_mark_covers() {
    // As above, but W was acknowledged just before a stop, before any mark of its segment
    // said so (a mark follows a while after), and copied in the next run: neither place is
    // known durable by the marks. The original was synced before its 250; the copy's sync
    // failed. The opening after must keep the original, not the copy.
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    let mut w = spool.begin(&meta(1)).unwrap();
    spool.append(&mut w, &body(1, 8 * 1024)).unwrap();
    let id = w.queue_id().to_owned();
    let ticket = spool.finish(w).unwrap();
    spool.sync_now().unwrap();
    assert!(spool.is_durable(ticket));
    // Killed at once: no mark after W.
    std::mem::forget(spool);

    let spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    assert_eq!(spool.live_messages(), 1);
    let r = recover(dir.path()).unwrap();
    let found = r.messages.iter().find(|m| m.queue_id == id).unwrap();
    let before_copy = segment_files(dir.path());
    copy_whose_sync_fails_then_kill(spool, &id, &found.meta, found.body());
    drop(r);

    // The restart without a reboot reads the copy whole from the page cache.
    let spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    assert_eq!(spool.live_messages(), 1);
    drop(spool);
    power_cut_back_to(dir.path(), &before_copy);
    let r = recover(dir.path()).unwrap();
    assert_eq!((r.damaged, r.corrupt_records), (0, 0));
    let ids: Vec<&str> = r.messages.iter().map(|m| m.queue_id.as_str()).collect();
    assert_eq!(ids, [id.as_str()], "W, once");
    assert_eq!(r.body_vec(&r.messages[0]), body(1, 8 * 1024));
    assert_eq!(r.messages[0].meta, meta(1));
}

#[test]
fn a_copy_not_yet_durable_keeps_the_old_place_and_a_failed_one_can_be_made_again() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, id, w_body) = waiting_behind_delivered_mail(dir.path());
    let before = spool.segment_count();
    spool.copy_forward(&id, &meta(1), &w_body).unwrap().unwrap();
    // Its sync failed, say: the message stays where it was.
    assert_eq!(spool.copy_over(&id, false).unwrap(), 0);
    assert_eq!(spool.reclaim().unwrap(), 0);
    assert!(spool.segment_count() >= before);
    assert_eq!(spool.next_to_copy(usize::MAX), [id.as_str()], "tried again");
    // Killed with an unsynced copy: what is on file is read as one message.
    std::mem::forget(spool);
    recovered_once(dir.path(), &id);
}

#[test]
fn a_message_made_final_while_its_copy_is_written_releases_both_places() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, id, w_body) = waiting_behind_delivered_mail(dir.path());
    spool.copy_forward(&id, &meta(1), &w_body).unwrap().unwrap();
    spool.append_status(&id, 1, &delivered()).unwrap();
    spool.sync_now().unwrap();
    spool.mark_final(&id).unwrap();
    assert_eq!(spool.copy_over(&id, true).unwrap(), 0, "nothing left to do");
    assert!(spool.segment_count() <= 1, "{}", spool.segment_count());
    assert_eq!(spool.live_messages(), 0);
    drop(spool);
    let r = recover(dir.path()).unwrap();
    assert!(r.messages.iter().all(|m| m.is_final()));
}

#[test]
fn little_is_copied_while_the_spool_is_mostly_live_mail() {
    // Messages all waiting: copying them would free nothing, and nothing is copied.
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    for i in 0..40 {
        let mut d = spool.begin(&meta(i)).unwrap();
        spool.append(&mut d, &body(i, 8 * 1024)).unwrap();
        spool.finish(d).unwrap();
    }
    spool.sync_now().unwrap();
    assert!(spool.segment_count() >= 5);
    assert!(spool.next_to_copy(usize::MAX).is_empty());
}

#[test]
fn records_of_a_message_before_its_copy_count_no_more_once_the_copy_is_kept() {
    // Recipient 0 delivered, then (a stale record) failed: the first final outcome stands.
    // Copied forward, the segment with the first one goes; the stale one, in the segment
    // the copy starts in, must not take its place.
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    let d = spool.begin(&meta(1)).unwrap();
    let id = d.queue_id().to_owned();
    let (_, pending) = spool.finish_with_body(d).unwrap();
    spool.sync_now().unwrap();
    let w_body = spool.body(pending).unwrap();
    spool.append_status(&id, 0, &delivered()).unwrap();
    spool.sync_now().unwrap();
    drop(spool);
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    let stale = Status {
        state: DeliveryState::Failed,
        reply: "550 5.1.1 stale".into(),
    };
    spool.append_status(&id, 0, &stale).unwrap();
    spool.sync_now().unwrap();
    let found = |root: &std::path::Path| recover(root).unwrap().messages[0].statuses.clone();
    assert_eq!(found(dir.path()), [Some(delivered()), None]);
    spool.copy_forward(&id, &meta(1), &w_body).unwrap().unwrap();
    spool.sync_now().unwrap();
    spool.copy_over(&id, true).unwrap();
    assert_eq!(spool.segment_count(), 1, "the first segment went");
    assert_eq!(found(dir.path()), [Some(delivered()), None]);
}

#[test]
fn a_copy_whose_outcome_record_is_damaged_gives_way_to_the_original() {
    // A power cut tears (or a bit flip spoils) the copy's status record while its END is on
    // disk, before the old place was let go: the copy is whole, but what it would carry of
    // recipient 0 is lost. The original, still there, is read with every status after it.
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    let mut w = spool.begin(&meta(1)).unwrap();
    spool.append(&mut w, &body(1, 1000)).unwrap();
    let id = w.queue_id().to_owned();
    let (_, pending) = spool.finish_with_body(w).unwrap();
    spool.sync_now().unwrap();
    let w_body = spool.body(pending).unwrap();
    let taken = Status {
        state: DeliveryState::Delivered,
        reply: "250 2.0.0 W was taken".into(),
    };
    spool.append_status(&id, 0, &taken).unwrap();
    for i in 2..12 {
        let mut d = spool.begin(&meta(i)).unwrap();
        spool.append(&mut d, &body(i, 8 * 1024)).unwrap();
        spool.finish(d).unwrap();
    }
    spool.sync_now().unwrap();
    spool.copy_forward(&id, &meta(1), &w_body).unwrap().unwrap();
    spool.sync_now().unwrap();
    std::mem::forget(spool);
    let mut files: Vec<_> = std::fs::read_dir(dir.path().join("0"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    let last = files.last().unwrap();
    let mut data = std::fs::read(last).unwrap();
    let needle = b"W was taken";
    let at = data
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("the copy's status record in the last segment");
    data[at] ^= 0x20;
    std::fs::write(last, &data).unwrap();
    let r = recover(dir.path()).unwrap();
    assert_eq!(r.corrupt_records, 1);
    let w = r.messages.iter().find(|m| m.queue_id == id).unwrap();
    assert_eq!(
        w.statuses[0],
        Some(taken),
        "recipient 0 would be delivered again"
    );
    assert_eq!(r.messages.iter().filter(|m| m.queue_id == id).count(), 1);
}

#[test]
fn a_copy_whose_sync_fails_does_not_mark_the_message_s_statuses_lost() {
    // The copy carries the message's outcomes as records of its own; when it fails, the
    // message stays where it was with its own records, which were durable.
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, id, w_body) = waiting_behind_delivered_mail(dir.path());
    spool.sync_now().unwrap();
    let (ticket, _) = spool.copy_forward(&id, &meta(1), &w_body).unwrap().unwrap();
    let batch = spool.take_sync().unwrap();
    spool.sync_done(batch, Err(std::io::Error::from_raw_os_error(5)));
    assert_eq!(spool.ticket_state(ticket), TicketState::Failed);
    spool.copy_over(&id, false).unwrap();
    assert!(!spool.status_lost(&id));
}

#[test]
fn small_waiting_messages_count_what_their_records_take_not_their_bodies_alone() {
    // 300 waiting messages of 200-octet bodies, each with an outcome for both recipients:
    // their envelopes and status records take more room than their bodies. The spool is
    // copied forward once it holds twice what a copy of them would write, and a segment
    // more; counted by their bodies alone, copying would start at less than half that, and
    // a steady stream of other mail would have them copied again and again.
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    for i in 0..300 {
        let mut d = spool.begin(&meta(i)).unwrap();
        spool.append(&mut d, &body(i, 200)).unwrap();
        let id = d.queue_id().to_owned();
        spool.finish(d).unwrap();
        spool.append_status(&id, 0, &deferred()).unwrap();
        spool.append_status(&id, 1, &deferred()).unwrap();
        // A later attempt's outcome replaces the first: a copy carries only the latest.
        spool.append_status(&id, 1, &deferred()).unwrap();
    }
    spool.sync_now().unwrap();
    let written = spool.segment_count();
    let segment = OPTS.segment_size;
    // Mail delivered behind them, until the spool is `segments` segments long.
    let mut n = 1000;
    let mut grow_to = |spool: &mut Spool, segments: usize| {
        while spool.segment_count() < segments {
            pass_through(spool, n, 4 * 1024, &delivered().reply);
            n += 1;
        }
    };
    let live = spool.live_bytes();
    assert_eq!(spool.live_messages(), 300);
    // What their records take: well over their bodies, at most the segments they filled.
    let bodies = 300 * 200;
    assert!(
        live > 2 * bodies && live <= written as u64 * segment,
        "{live} octets counted for {written} segments of {segment}"
    );
    // Twice their bodies and a segment is passed, twice their records and a segment not yet.
    let short_of = usize::try_from((2 * (live + segment)).div_ceil(segment)).unwrap() - 1;
    assert!(2 * (bodies + segment) < short_of as u64 * segment);
    grow_to(&mut spool, short_of);
    assert!(spool.next_to_copy(usize::MAX).is_empty(), "copied too soon");
    // Read back at an opening, they count the same: nothing is copied yet either.
    drop(spool);
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    let recovered = spool.live_bytes();
    assert!(
        recovered.abs_diff(live) * 50 < live,
        "{recovered} octets counted at the opening against {live}"
    );
    assert!(
        spool.next_to_copy(usize::MAX).is_empty(),
        "copied too soon after the opening"
    );
    grow_to(&mut spool, short_of + 2);
    let ids = spool.next_to_copy(usize::MAX);
    assert_eq!(ids.len(), 300, "copied once it is twice as big");
    // Copied, they count what the copies hold: about the same.
    let found = recover(dir.path()).unwrap();
    for id in &ids {
        let m = found.messages.iter().find(|m| &m.queue_id == id).unwrap();
        spool.copy_forward(id, &m.meta, m.body()).unwrap().unwrap();
    }
    spool.sync_now().unwrap();
    for id in &ids {
        spool.copy_over(id, true).unwrap();
    }
    let copied = spool.live_bytes();
    assert!(
        copied.abs_diff(recovered) * 50 < recovered,
        "{copied} octets counted for the copies against {recovered}"
    );
    assert!(spool.next_to_copy(usize::MAX).is_empty(), "copied once");
}
