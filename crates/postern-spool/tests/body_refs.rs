//! Body handles: read from the mapping on another thread, still readable after their segment
//! is reclaimed; and a message being written keeps its first segment from being reclaimed.
#![allow(clippy::unwrap_used)]

mod common;

use common::{body, meta, pass_through};
use postern_spool::{recover, DeliveryState, Spool, SpoolOptions, Status};

fn delivered() -> Status {
    Status {
        state: DeliveryState::Delivered,
        reply: "250 2.0.0 ok".into(),
    }
}

#[test]
fn bodies_are_read_from_the_mapping_on_another_thread_even_after_reclaim() {
    let dir = tempfile::tempdir().unwrap();
    let opts = SpoolOptions {
        segment_size: 128 * 1024,
    };
    let mut spool = Spool::open(dir.path(), 0, opts).unwrap();
    let mut refs = Vec::new();
    for i in 0..8 {
        let b = body(i, 1000 + i * 20_000);
        let mut d = spool.begin(&meta(i)).unwrap();
        for piece in b.chunks(7000) {
            spool.append(&mut d, piece).unwrap();
        }
        let (ticket, r) = spool.finish_with_body(d).unwrap();
        refs.push((ticket, r, b));
    }
    spool.sync_now().unwrap();
    assert!(refs.iter().all(|(t, _, _)| spool.is_durable(*t)));
    let refs: Vec<_> = refs
        .into_iter()
        .map(|(t, r, b)| (t, spool.body(r).unwrap(), b))
        .collect();
    // Every message final: their segments go (all but the one being written).
    for (_, r, _) in &refs {
        spool.append_status(r.queue_id(), 0, &delivered()).unwrap();
        spool.append_status(r.queue_id(), 1, &delivered()).unwrap();
    }
    spool.sync_now().unwrap();
    let before = spool.segment_count();
    for (_, r, _) in &refs {
        spool.mark_final(r.queue_id()).unwrap();
    }
    assert!(spool.segment_count() < before, "segments were reclaimed");
    let reader = std::thread::spawn(move || {
        refs.iter().all(|(_, r, b)| {
            r.len() == b.len() as u64 && r.to_vec() == *b && r.chunks().count() > 0
        })
    });
    assert!(reader.join().unwrap());
}

#[test]
fn a_message_being_written_keeps_its_first_segment() {
    let dir = tempfile::tempdir().unwrap();
    let opts = SpoolOptions {
        segment_size: 64 * 1024,
    };
    let mut spool = Spool::open(dir.path(), 0, opts).unwrap();
    let long_body = body(99, 300_000);
    let mut long = spool.begin(&meta(99)).unwrap();
    let long_id = long.queue_id().to_owned();
    for (k, piece) in long_body.chunks(30_000).enumerate() {
        spool.append(&mut long, piece).unwrap();
        // Meanwhile short messages come and go final, which reclaims what it can.
        pass_through(&mut spool, k, 10_000, &delivered().reply);
    }
    let (ticket, r) = spool.finish_with_body(long).unwrap();
    spool.sync_now().unwrap();
    assert!(spool.is_durable(ticket));
    let r = spool.body(r).unwrap();
    assert_eq!(r.to_vec(), long_body);
    let rec = recover(dir.path()).unwrap();
    let m = rec
        .messages
        .iter()
        .find(|m| m.queue_id == long_id)
        .expect("the long message survives the reclaims around it");
    assert_eq!(m.body().to_vec(), long_body);
    assert_eq!(spool.live_messages(), 1);
}

/// Whether `needle` occurs in a segment file under `root`.
fn in_segment_files(root: &std::path::Path, needle: &[u8]) -> bool {
    let mut found = false;
    for entry in walk(root) {
        let data = std::fs::read(&entry).unwrap();
        found |= data.windows(needle.len()).any(|w| w == needle);
    }
    found
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|x| x == "seg") {
            out.push(p);
        }
    }
    out
}

#[test]
fn small_records_wait_for_the_sync_but_never_pile_up_past_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 0, SpoolOptions::default()).unwrap();
    // A small message is finished without a write: its bytes reach the file with the sync.
    let small = body(1, 3000);
    let mut d = spool.begin(&meta(1)).unwrap();
    spool.append(&mut d, &small).unwrap();
    let (ticket, pending) = spool.finish_with_body(d).unwrap();
    let marker = &small[1000..1064];
    assert!(
        !in_segment_files(dir.path(), marker),
        "finished without a syscall"
    );
    // Not readable before its sync.
    let pending = spool.body(pending).unwrap_err();
    assert_eq!(pending.ticket(), ticket);
    spool.sync_now().unwrap();
    assert!(spool.is_durable(ticket));
    assert!(in_segment_files(dir.path(), marker));
    assert_eq!(spool.body(pending).unwrap().to_vec(), small);
    // Many small chunks with no sync between them: the early ones are in the file before
    // any sync, so the gathered bytes stay bounded.
    let long = body(2, 1024 * 1024);
    let mut d = spool.begin(&meta(2)).unwrap();
    for piece in long.chunks(4000) {
        spool.append(&mut d, piece).unwrap();
    }
    assert!(in_segment_files(dir.path(), &long[10..74]), "written early");
    let (ticket, pending) = spool.finish_with_body(d).unwrap();
    spool.sync_now().unwrap();
    assert!(spool.is_durable(ticket));
    assert_eq!(spool.body(pending).unwrap().to_vec(), long);
}

#[test]
fn a_body_is_handed_out_only_by_the_spool_that_made_it() {
    let dir = tempfile::tempdir().unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 0, SpoolOptions::default()).unwrap();
    let mut other = Spool::open(other_dir.path(), 0, SpoolOptions::default()).unwrap();
    // The other spool has a durable ticket of the same number.
    let mut d = other.begin(&meta(1)).unwrap();
    other.append(&mut d, &body(1, 100)).unwrap();
    let (other_ticket, _) = other.finish_with_body(d).unwrap();
    other.sync_now().unwrap();
    let mut d = spool.begin(&meta(2)).unwrap();
    spool.append(&mut d, &body(2, 100)).unwrap();
    let (ticket, pending) = spool.finish_with_body(d).unwrap();
    assert_eq!(ticket, other_ticket);
    let pending = other.body(pending).unwrap_err();
    spool.sync_now().unwrap();
    let pending = other.body(pending).unwrap_err();
    assert_eq!(spool.body(pending).unwrap().to_vec(), body(2, 100));
}

/// Freed segments handed out to be deleted elsewhere (as the server does, off its cores): the
/// files stay until deleted, come out oldest first; one that cannot be deleted stops the
/// deleting, and it and every newer one go back to the spool, to be handed out again in
/// order; those the process never got to delete hold nothing the next open brings back.
#[test]
fn segments_freed_for_deletion_elsewhere_come_out_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let opts = SpoolOptions {
        segment_size: 64 * 1024,
    };
    let mut spool = Spool::open(dir.path(), 0, opts).unwrap();
    spool.set_unlink_later(true);
    let mut ids = Vec::new();
    for i in 0..16 {
        let mut d = spool.begin(&meta(i)).unwrap();
        spool.append(&mut d, &body(i, 20_000)).unwrap();
        ids.push(d.queue_id().to_owned());
        spool.finish(d).unwrap();
    }
    for id in &ids {
        spool.append_status(id, 0, &delivered()).unwrap();
        spool.append_status(id, 1, &delivered()).unwrap();
    }
    spool.sync_now().unwrap();
    let before = spool.segment_count();
    let mut freed = 0;
    for id in &ids {
        freed += spool.mark_final(id).unwrap();
    }
    let handed = spool.take_unlinks();
    let paths: Vec<_> = handed.iter().map(|f| f.path.clone()).collect();
    assert!(freed >= 4, "{freed}");
    assert_eq!(paths.len(), freed);
    assert_eq!(spool.segment_count(), before - freed);
    assert!(
        paths.iter().all(|p| p.exists()),
        "deleted by the spool itself"
    );
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(paths, sorted, "not oldest first");
    assert!(spool.take_unlinks().is_empty());
    // The second cannot be deleted (a directory stands in its place): the first goes, the
    // rest stay, and come back to the spool.
    std::fs::remove_file(&paths[1]).unwrap();
    std::fs::create_dir(&paths[1]).unwrap();
    let (undeleted, _) = postern_spool::unlink_segments(handed).unwrap_err();
    assert!(!paths[0].exists());
    assert!(
        paths[2..].iter().all(|p| p.exists()),
        "a newer one went first"
    );
    let back: Vec<_> = undeleted.iter().map(|f| f.path.clone()).collect();
    assert_eq!(back, paths[1..]);
    spool.keep_undeleted(undeleted);
    assert_eq!(spool.segment_count(), before - 1);
    // Handed out again, in order, by the next reclaim.
    assert_eq!(spool.reclaim().unwrap(), freed - 1);
    let again = spool.take_unlinks();
    let again_paths: Vec<_> = again.iter().map(|f| f.path.clone()).collect();
    assert_eq!(again_paths, paths[1..]);
    std::fs::remove_dir(&paths[1]).unwrap();
    // The newest two left as by a process that ended before deleting them.
    let mut again = again;
    let left = again.split_off(again.len() - 2);
    assert!(postern_spool::unlink_segments(again).is_ok());
    assert!(paths[..paths.len() - 2].iter().all(|p| !p.exists()));
    drop(spool);
    let r = recover(dir.path()).unwrap();
    assert!(r.messages.iter().all(|m| m.is_final()));
    drop(r);
    let spool = Spool::open(dir.path(), 0, opts).unwrap();
    assert!(
        left.iter().all(|f| !f.path.exists()),
        "left for ever: {left:?}"
    );
    assert_eq!(spool.live_messages(), 0);
}
