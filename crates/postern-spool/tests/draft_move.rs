//! A message still being received that keeps the oldest segment while other mail fills the
//! spool behind it (a client trickling its body) is moved forward: written again at the end,
//! so that the segments it held go. Its body comes out whole; a crash after the move loses
//! nothing acknowledged and leaves no damage; a body streamed at speed is left where it is.
#![allow(clippy::unwrap_used)]

mod common;

use common::{body, meta, pass_through};
use postern_spool::{recover, Draft, Spool, SpoolOptions};

const OPTS: SpoolOptions = SpoolOptions {
    segment_size: 128 * 1024,
};

/// `n` messages of `len` octets, finished, durable and delivered (final): they hold their
/// segments no longer than something older does.
fn delivered_mail(spool: &mut Spool, from: usize, n: usize, len: usize) {
    for i in from..from + n {
        pass_through(spool, i, len, "250 2.0.0 ok");
    }
}

/// Once what was written is durable and reclaimed, at most two of `grown` segments are
/// left: the moved drafts' and the one in use.
fn assert_shrinks_to_two(spool: &mut Spool, grown: usize) {
    spool.sync_now().unwrap();
    spool.reclaim().unwrap();
    assert!(
        spool.segment_count() <= 2,
        "{} of {grown} segments kept",
        spool.segment_count()
    );
}

/// A draft begun with `first` as its body so far.
fn slow_draft(spool: &mut Spool, first: &[u8]) -> Draft {
    let mut slow = spool.begin(&meta(0)).unwrap();
    spool.append(&mut slow, first).unwrap();
    slow
}

#[test]
fn a_trickled_body_is_moved_forward_and_the_segments_behind_it_go() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    let mut expected = body(1000, 3000);
    let mut slow = slow_draft(&mut spool, &expected);
    let id = slow.queue_id().to_owned();
    // About six segments of other mail, all delivered: kept all the same, behind the draft's
    // START in the oldest segment.
    delivered_mail(&mut spool, 1, 60, 12 * 1024);
    let grown = spool.segment_count();
    assert!(grown >= 6, "{grown} segments");
    assert_eq!(spool.drafts_moved(), 0);
    // The next piece of the slow body moves it, and the segments it held go.
    let more = body(1001, 500);
    spool.append(&mut slow, &more).unwrap();
    expected.extend_from_slice(&more);
    assert_eq!(spool.drafts_moved(), 1);
    assert_shrinks_to_two(&mut spool, grown);
    // Not moved again while it is where the spool ends.
    let last = body(1002, 700);
    spool.append(&mut slow, &last).unwrap();
    expected.extend_from_slice(&last);
    assert_eq!(spool.drafts_moved(), 1);
    spool.finish(slow).unwrap();
    spool.sync_now().unwrap();
    drop(spool);
    let r = recover(dir.path()).unwrap();
    assert_eq!((r.corrupt_records, r.damaged, r.torn_tails), (0, 0, 0));
    let found: Vec<_> = r.messages.iter().filter(|m| m.queue_id == id).collect();
    assert_eq!(found.len(), 1, "found {} times", found.len());
    assert_eq!(r.body_vec(found[0]), expected);
    assert_eq!(found[0].meta, meta(0));
    assert_eq!(r.unfinished, 0, "the old place is aborted");
}

#[test]
fn a_crash_after_the_move_leaves_no_message_and_no_damage() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    let mut slow = slow_draft(&mut spool, &body(1000, 3000));
    delivered_mail(&mut spool, 1, 60, 12 * 1024);
    spool.append(&mut slow, &body(1001, 500)).unwrap();
    assert_eq!(spool.drafts_moved(), 1);
    spool.sync_now().unwrap();
    spool.reclaim().unwrap();
    // Killed before its end: never acknowledged, so nothing to deliver, and nothing damaged.
    std::mem::forget(slow);
    std::mem::forget(spool);
    let r = recover(dir.path()).unwrap();
    assert!(r.messages.iter().all(|m| m.is_final() || m.meta != meta(0)));
    assert_eq!((r.corrupt_records, r.damaged), (0, 0));
    assert!(r.cut_off.is_empty());
}

#[test]
fn a_body_written_into_every_segment_as_it_comes_is_left_where_it_is() {
    // A large body streamed beside other mail writes into each segment the spool makes: it
    // holds the oldest one only as long as it takes to arrive, and copying it would double
    // its writes.
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    let mut expected = Vec::new();
    let mut big = spool.begin(&meta(0)).unwrap();
    for i in 0..12 {
        let part = body(2000 + i, 20 * 1024);
        spool.append(&mut big, &part).unwrap();
        expected.extend_from_slice(&part);
        delivered_mail(&mut spool, 10 * i + 1, 4, 12 * 1024);
    }
    assert!(spool.segment_count() >= 6, "{}", spool.segment_count());
    assert_eq!(spool.drafts_moved(), 0);
    let id = big.queue_id().to_owned();
    spool.finish(big).unwrap();
    spool.sync_now().unwrap();
    drop(spool);
    let r = recover(dir.path()).unwrap();
    let m = r.messages.iter().find(|m| m.queue_id == id).unwrap();
    assert_eq!(r.body_vec(m), expected);
}

#[test]
fn a_draft_whose_records_may_be_missing_is_not_moved() {
    // A sync failed under its records: it fails at its end, and a move would make a whole
    // message of what is left.
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    let mut slow = slow_draft(&mut spool, &body(1000, 3000));
    let mut other = spool.begin(&meta(9)).unwrap();
    spool.append(&mut other, b"in the failed batch").unwrap();
    spool.finish(other).unwrap();
    let batch = spool.take_sync().unwrap();
    spool.sync_done(batch, Err(std::io::Error::from_raw_os_error(5)));
    delivered_mail(&mut spool, 1, 60, 12 * 1024);
    spool.append(&mut slow, &body(1001, 500)).unwrap();
    assert_eq!(spool.drafts_moved(), 0);
    assert!(spool.finish(slow).is_err());
}

#[test]
fn slow_drafts_do_not_move_one_another_on_without_other_mail() {
    // Two slow messages take turns at the front: once each is moved, what the moves wrote
    // is no growth that moves either again; only more of other mail does.
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    let mut a = slow_draft(&mut spool, &body(1000, 120 * 1024));
    let mut b = slow_draft(&mut spool, &body(1001, 120 * 1024));
    delivered_mail(&mut spool, 1, 60, 12 * 1024);
    for i in 0..50 {
        spool.append(&mut a, &body(2000 + i, 100)).unwrap();
        spool.append(&mut b, &body(3000 + i, 100)).unwrap();
        spool.sync_now().unwrap();
        spool.reclaim().unwrap();
    }
    let moved = spool.drafts_moved();
    assert!((1..=2).contains(&moved), "{moved} moves");
    // More of other mail lets them move again, once each at most.
    delivered_mail(&mut spool, 100, 60, 12 * 1024);
    for _ in 0..5 {
        spool.append(&mut a, b"x").unwrap();
        spool.append(&mut b, b"y").unwrap();
    }
    let again = spool.drafts_moved() - moved;
    assert!((1..=2).contains(&again), "{again} moves");
    for d in [a, b] {
        spool.finish(d).unwrap();
    }
    spool.sync_now().unwrap();
    drop(spool);
    let r = recover(dir.path()).unwrap();
    assert_eq!((r.corrupt_records, r.damaged), (0, 0));
    let mine: Vec<_> = r.messages.iter().filter(|m| m.meta == meta(0)).collect();
    assert_eq!(mine.len(), 2);
}

#[test]
fn several_slow_drafts_each_move_at_their_next_piece_wherever_they_are() {
    // Three slow messages begun at different times, other mail between and after them.
    // Each moves at its next piece, the newest first here (not yet at the front then): with
    // only the one at the front moving, each would wait for a piece of its own once the
    // ones before it went, and the spool would keep what came in meanwhile.
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    let mut a = slow_draft(&mut spool, &body(1000, 3000));
    delivered_mail(&mut spool, 1, 30, 12 * 1024);
    let mut b = slow_draft(&mut spool, &body(1001, 3000));
    delivered_mail(&mut spool, 100, 30, 12 * 1024);
    let mut c = slow_draft(&mut spool, &body(1002, 3000));
    delivered_mail(&mut spool, 200, 60, 12 * 1024);
    let grown = spool.segment_count();
    for d in [&mut c, &mut b, &mut a] {
        spool.append(d, b"the next piece").unwrap();
    }
    assert_eq!(spool.drafts_moved(), 3);
    assert_shrinks_to_two(&mut spool, grown);
    let ids: Vec<String> = [&a, &b, &c]
        .iter()
        .map(|d| d.queue_id().to_owned())
        .collect();
    for d in [a, b, c] {
        spool.finish(d).unwrap();
    }
    spool.sync_now().unwrap();
    drop(spool);
    let r = recover(dir.path()).unwrap();
    assert_eq!((r.corrupt_records, r.damaged), (0, 0));
    for (i, id) in ids.iter().enumerate() {
        let m = r.messages.iter().find(|m| &m.queue_id == id).unwrap();
        let mut want = body(1000 + i, 3000);
        want.extend_from_slice(b"the next piece");
        assert_eq!(r.body_vec(m), want);
    }
}

#[test]
fn a_spool_that_holds_its_mail_moves_no_draft() {
    // Nothing becomes final where mail is held: no segment would go behind a moved draft.
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    spool.set_move_drafts(false);
    let mut slow = slow_draft(&mut spool, &body(1000, 3000));
    delivered_mail(&mut spool, 1, 60, 12 * 1024);
    spool.append(&mut slow, &body(1001, 500)).unwrap();
    assert!(!spool.holds_back(&slow));
    assert_eq!(spool.drafts_moved(), 0);
}

#[test]
fn the_draft_in_the_oldest_segment_moves_when_the_others_spent_the_budget() {
    // Slow drafts that come by more often than the one in the oldest segment spend the
    // moves' budget: the one in the oldest segment, which alone keeps the spool from
    // shrinking, moves all the same.
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    let mut oldest = slow_draft(&mut spool, &body(1000, 120 * 1024));
    let mut others: Vec<Draft> = (0..7)
        .map(|i| slow_draft(&mut spool, &body(1100 + i, 120 * 1024)))
        .collect();
    for round in 0..6 {
        delivered_mail(&mut spool, 100 * round + 1, 25, 12 * 1024);
        for d in &mut others {
            spool.append(d, b"x").unwrap();
        }
    }
    // The others came by after each growth, and spent what the budget gave (a move each at
    // first, then one for every 300 KB or so).
    delivered_mail(&mut spool, 900, 25, 12 * 1024);
    for d in &mut others {
        spool.append(d, b"z").unwrap();
    }
    let before = spool.drafts_moved();
    assert!(before >= 7, "{before} moves");
    assert!(others.iter().all(|d| !spool.holds_back(d)));
    // The oldest, which has not moved at all, still does.
    assert!(spool.holds_back(&oldest));
    spool.append(&mut oldest, b"y").unwrap();
    assert_eq!(spool.drafts_moved(), before + 1);
}
