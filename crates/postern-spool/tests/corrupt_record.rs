//! Damage in the middle of a segment: the bad record is skipped, counted and located, the scan
//! goes on, nothing crashes; bytes copied from another segment (as a body may carry them) are
//! never taken for records; a segment whose creation was cut off, or that was made ahead and
//! never written, is dropped quietly.
#![allow(clippy::unwrap_used)]

mod common;

use common::{body, meta};
use postern_spool::{recover, Spool, SpoolOptions};

const OPTS: SpoolOptions = SpoolOptions {
    segment_size: 128 * 1024,
};

fn segment_files(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(root.join("0"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn a_corrupt_record_in_the_middle_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    for i in 0..3 {
        let mut d = spool.begin(&meta(i)).unwrap();
        spool
            .append(&mut d, format!("MARKER-{i}-").repeat(10).as_bytes())
            .unwrap();
        spool.finish(d).unwrap();
    }
    spool.sync_now().unwrap();
    drop(spool);
    let seg = &segment_files(dir.path())[0];
    let mut data = std::fs::read(seg).unwrap();
    let at = data.windows(9).position(|w| w == b"MARKER-1-").unwrap();
    data[at] ^= 0x20;
    std::fs::write(seg, &data).unwrap();
    let r = recover(dir.path()).unwrap();
    assert_eq!((r.corrupt_records, r.damaged, r.torn_tails), (1, 1, 0));
    assert_eq!(r.corrupt_at.len(), 1);
    assert!(r.corrupt_at[0].offset < at as u64 && r.corrupt_at[0].segment == 1);
    // Message 1 lost its body record, so its END no longer matches: not reported. 0 and 2 are.
    let bodies: Vec<Vec<u8>> = r.messages.iter().map(|m| m.body().to_vec()).collect();
    assert_eq!(r.messages.len(), 2);
    assert!(bodies[0].starts_with(b"MARKER-0-") && bodies[1].starts_with(b"MARKER-2-"));
}

#[test]
fn records_copied_into_a_body_are_not_records_there() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    let mut d = spool.begin(&meta(1)).unwrap();
    spool.append(&mut d, &body(1, 3000)).unwrap();
    let real = d.queue_id().to_owned();
    spool.finish(d).unwrap();
    spool.sync_now().unwrap();
    drop(spool);
    // The valid records of segment 1, as bytes.
    let seg1 = std::fs::read(&segment_files(dir.path())[0]).unwrap();
    let mut end = 64;
    loop {
        let len = u32::from_le_bytes(seg1[end..end + 4].try_into().unwrap()) as usize;
        if len == 0 {
            break;
        }
        end += (12 + len + 7) & !7;
    }
    let blob = &seg1[64..end];
    // A stranger's body carrying them, in a new segment (a reopening starts one), four bytes
    // in: where the scan would land if this body record's length word read 8.
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    let mut d = spool.begin(&meta(2)).unwrap();
    let carrier = [&[0u8; 4][..], blob].concat();
    spool.append(&mut d, &carrier).unwrap();
    spool.finish(d).unwrap();
    spool.sync_now().unwrap();
    drop(spool);
    let seg2 = &segment_files(dir.path())[1];
    let mut data = std::fs::read(seg2).unwrap();
    let at = data.windows(blob.len()).position(|w| w == blob).unwrap();
    let record = at - 4 - 8 - 12;
    data[record..record + 4].copy_from_slice(&8u32.to_le_bytes());
    std::fs::write(seg2, &data).unwrap();

    let r = recover(dir.path()).unwrap();
    let ids: Vec<&str> = r.messages.iter().map(|m| m.queue_id.as_str()).collect();
    assert_eq!(ids, [real.as_str()], "the copy is not a second message");
    assert_eq!(
        r.corrupt_records, 4,
        "the damaged record and the three copies"
    );
    assert_eq!(r.damaged, 1, "the carrier lost its body");
}

#[test]
fn a_segment_cut_off_while_being_made_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    let mut d = spool.begin(&meta(1)).unwrap();
    spool.append(&mut d, b"hello").unwrap();
    spool.finish(d).unwrap();
    spool.sync_now().unwrap();
    drop(spool);
    // As a crash between creating the file and syncing its header leaves it.
    let blank = dir.path().join("0").join("0000000007.seg");
    std::fs::write(&blank, vec![0u8; 4096]).unwrap();
    let r = recover(dir.path()).unwrap();
    assert_eq!(
        (r.messages.len(), r.unused_segments, r.corrupt_records),
        (1, 1, 0)
    );
    let spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    assert!(!blank.exists());
    assert_eq!(spool.segment_count(), 1);
}

#[test]
fn segments_made_ahead_and_never_written_do_not_pile_up_over_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    // A message that stays queued pins the oldest segment, so nothing after it is released
    // oldest-first.
    let mut d = spool.begin(&meta(1)).unwrap();
    spool.append(&mut d, b"still queued").unwrap();
    spool.finish(d).unwrap();
    spool.sync_now().unwrap();
    drop(spool);
    for _ in 0..3 {
        // Each run makes its next segment ahead of need, as the server does at start.
        let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
        let job = spool.spare_job().expect("a spare to make");
        spool.install_spare(job.run());
        drop(spool);
    }
    let spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    assert_eq!(spool.segment_count(), 1, "{:?}", segment_files(dir.path()));
    assert_eq!(recover(dir.path()).unwrap().messages.len(), 1);
}

/// A zeroed length word in the middle of a segment reads as the end of its data: what follows
/// is hidden, nothing counts as a corrupt record, and a message whose END lies in the next
/// segment comes out damaged. Both segments between its START and END are kept for
/// inspection at the next opening, not deleted with the rest of what holds nothing live.
#[test]
fn the_segments_of_a_damaged_message_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    let mut d = spool.begin(&meta(1)).unwrap();
    for i in 0..20 {
        spool.append(&mut d, &body(i, 8 * 1024)).unwrap();
    }
    spool.finish(d).unwrap();
    spool.sync_now().unwrap();
    drop(spool);
    let segs = segment_files(dir.path());
    assert!(segs.len() >= 2, "the message must cross a segment boundary");
    // The record after START: its length word zeroed.
    let mut data = std::fs::read(&segs[0]).unwrap();
    let start_len = u32::from_le_bytes(data[64..68].try_into().unwrap()) as usize;
    let next = 64 + ((12 + start_len + 7) & !7);
    data[next..next + 4].fill(0);
    std::fs::write(&segs[0], &data).unwrap();
    let r = recover(dir.path()).unwrap();
    // The first segment is full and sealed: the zeroed length word is damage where it is.
    assert_eq!((r.corrupt_records, r.damaged), (1, 1));
    let (start, end) = r.damaged_at[0];
    assert_eq!((start.segment, start.offset), (1, 64));
    assert!(end.segment > start.segment, "{end:?}");
    drop(r);
    let _spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    let kept = std::fs::read_dir(dir.path().join("0").join(postern_spool::DAMAGED_DIR))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(kept as u64, end.segment - start.segment + 1);
}

/// Three messages synced into one segment of a new spool, the spool closed; returns the
/// segment's path.
fn three_messages(root: &std::path::Path) -> std::path::PathBuf {
    assert!(!root.join("0").exists());
    three_messages_in_a_new_opening(root)
}

fn kept_for_inspection(root: &std::path::Path) -> usize {
    std::fs::read_dir(root.join("0").join(postern_spool::DAMAGED_DIR))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A segment is reserved in full before it gets its name, so a file shorter than that lost
/// its end to damage, not to a crash: reported where it ends, and kept.
#[test]
fn a_segment_cut_short_is_damage_reported_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let seg = three_messages(dir.path());
    // Cut in the middle of the second message's body.
    let cut = 64 + 5000 + 2500;
    let made = std::fs::metadata(&seg).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let r = recover(dir.path()).unwrap();
    assert_eq!(r.messages.len(), 1, "only the first is whole");
    assert_eq!(r.corrupt_records, 1);
    // Reported at the record the cut went through.
    assert_eq!(r.corrupt_at[0].segment, 1);
    assert!(
        r.corrupt_at[0].offset > 64 + 5000 && r.corrupt_at[0].offset < cut,
        "{:?}",
        r.corrupt_at
    );
    // What could not be read: from that record to where the file ended as it was made.
    assert_eq!(r.unread_octets, made - r.corrupt_at[0].offset);
    let first = r.messages[0].queue_id.clone();
    drop(r);
    // Still in place while the first message is queued; set aside, not deleted, once it is
    // final.
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    assert!(seg.exists());
    spool.mark_final(&first).unwrap();
    assert!(!seg.exists());
    assert_eq!(kept_for_inspection(dir.path()), 1);
}

#[test]
fn a_segment_cut_to_nothing_or_into_its_header_is_damage_reported_and_kept() {
    for len in [0, 30] {
        let dir = tempfile::tempdir().unwrap();
        let seg = three_messages(dir.path());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len)
            .unwrap();
        let r = recover(dir.path()).unwrap();
        assert_eq!(
            (r.messages.len(), r.corrupt_records, r.unused_segments),
            (0, 1, 0),
            "{len} bytes"
        );
        // What is left of it could not be read (what it was made with is unknown).
        assert_eq!(r.unread_octets, len, "{len} bytes");
        drop(r);
        let _spool = Spool::open(dir.path(), 0, OPTS).unwrap();
        assert_eq!(kept_for_inspection(dir.path()), 1, "{len} bytes");
    }
}

/// Zeros over the first `len` bytes of a segment with records behind them: damage, reported
/// and kept as it was (in `damaged/`), not a segment whose creation was cut off, dropped with
/// the mail behind the zeros.
fn zeros_over_the_start_are_damage_reported_and_kept(len: usize) {
    let dir = tempfile::tempdir().unwrap();
    let seg = three_messages(dir.path());
    let mut data = std::fs::read(&seg).unwrap();
    data[..len].fill(0);
    std::fs::write(&seg, &data).unwrap();
    let r = recover(dir.path()).unwrap();
    assert_eq!((r.corrupt_records, r.unused_segments), (1, 0), "{len}");
    // Nothing of it is read.
    assert_eq!(r.unread_octets, data.len() as u64, "{len}");
    drop(r);
    let _spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    assert_eq!(kept_for_inspection(dir.path()), 1, "{len}");
    let kept = dir.path().join("0").join(postern_spool::DAMAGED_DIR);
    let kept = std::fs::read_dir(kept).unwrap().next().unwrap().unwrap();
    assert_eq!(std::fs::read(kept.path()).unwrap(), data, "kept as it was");
}

#[test]
fn a_zeroed_header_over_records_is_damage_reported_and_kept() {
    zeros_over_the_start_are_damage_reported_and_kept(64);
}

/// A whole first page: the header and the first records.
#[test]
fn a_zeroed_first_page_over_records_is_damage_reported_and_kept() {
    zeros_over_the_start_are_damage_reported_and_kept(4096);
}

/// What a crash while a segment is being made leaves: a file under its temporary name, which
/// the next opening removes.
#[test]
fn a_segment_whose_making_was_cut_off_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    three_messages(dir.path());
    let tmp = dir.path().join("0").join(".0000000002.seg.new");
    std::fs::write(&tmp, b"").unwrap();
    let r = recover(dir.path()).unwrap();
    assert_eq!((r.messages.len(), r.corrupt_records), (3, 0));
    drop(r);
    let _spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    assert!(!tmp.exists());
}

/// A length word that runs past the end of its segment is damage, reported where it is (the
/// records after it are lost to the scan), never a torn tail.
#[test]
fn a_length_past_the_end_is_damage_reported_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let seg = three_messages(dir.path());
    let mut data = std::fs::read(&seg).unwrap();
    let start_len = u32::from_le_bytes(data[64..68].try_into().unwrap()) as usize;
    let second = 64 + ((12 + start_len + 7) & !7);
    data[second..second + 4].fill(0xff);
    std::fs::write(&seg, &data).unwrap();
    let r = recover(dir.path()).unwrap();
    assert_eq!((r.corrupt_records, r.torn_tails), (1, 0));
    assert_eq!(r.corrupt_at[0].offset, second as u64);
    assert!(
        r.messages.is_empty(),
        "the first message lost its body record"
    );
    drop(r);
    let _spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    assert_eq!(kept_for_inspection(dir.path()), 1);
}

/// The offsets of the records of the segment file `data`, in order (8-aligned, each
/// `length u32 | crc u32 | kind u8 | 3 zeros | payload`).
fn record_offsets(data: &[u8]) -> Vec<usize> {
    let mut at = 64;
    let mut found = Vec::new();
    while at + 4 <= data.len() {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        if len == 0 {
            break;
        }
        found.push(at);
        at += (12 + len + 7) & !7;
    }
    found
}

/// Twelve messages of 30,000 octets, each synced, over three segments or more (the first
/// ones full and sealed): the spool's directory and its segment files, oldest first.
fn twelve_messages_over_sealed_segments() -> (tempfile::TempDir, Vec<std::path::PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    for i in 0..12 {
        let mut d = spool.begin(&meta(i)).unwrap();
        spool.append(&mut d, &body(i, 30_000)).unwrap();
        spool.finish(d).unwrap();
        spool.sync_now().unwrap();
    }
    drop(spool);
    let files = segment_files(dir.path());
    assert!(files.len() >= 3, "{files:?}");
    (dir, files)
}

#[test]
fn zeros_over_a_length_word_in_a_full_segment_are_damage_reported_and_kept() {
    // A full, sealed segment: a zero length word before the end its header records is a
    // lost or zeroed write, not the end of the data, so its later messages are not lost
    // without a word.
    let (dir, files) = twelve_messages_over_sealed_segments();
    let before = recover(dir.path()).unwrap();
    assert_eq!((before.messages.len(), before.corrupt_records), (12, 0));
    let first = &files[0];
    let mut data = std::fs::read(first).unwrap();
    let records = record_offsets(&data);
    let at = records[records.len() / 2];
    data[at..at + 4].fill(0);
    std::fs::write(first, &data).unwrap();

    let r = recover(dir.path()).unwrap();
    // The message the zeroed record belonged to is lost, and only that one: the scan goes on
    // past the hole (before the seal's end everything was durable).
    assert_eq!(r.messages.len(), 11, "{:?}", r.corrupt_at);
    assert!(
        r.corrupt_records >= 1,
        "{} messages, no damage reported",
        r.messages.len()
    );
    assert!(r
        .corrupt_at
        .iter()
        .any(|c| c.segment == 1 && c.offset == at as u64));
    // Once the messages still read are final, the segment is set aside, not deleted.
    let ids: Vec<String> = r.messages.iter().map(|m| m.queue_id.clone()).collect();
    drop(r);
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    for id in &ids {
        spool.mark_final(id).unwrap();
    }
    assert!(!first.exists());
    assert_eq!(kept_for_inspection(dir.path()), 1);
}

#[test]
fn a_length_word_run_past_the_end_in_a_full_segment_loses_only_its_message() {
    // One bit flipped high in a length word of a sealed segment: the record claims more than
    // the file holds. Everything before the seal's end was durable, so the scan goes on past
    // it, as past a zeroed length word, rather than losing the rest of the segment.
    let (dir, files) = twelve_messages_over_sealed_segments();
    let first = &files[0];
    let mut data = std::fs::read(first).unwrap();
    let records = record_offsets(&data);
    let at = records[records.len() / 2];
    data[at + 3] |= 0x80;
    assert!(
        u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize > data.len(),
        "the length must run past the file"
    );
    std::fs::write(first, &data).unwrap();

    let r = recover(dir.path()).unwrap();
    assert_eq!(r.messages.len(), 11, "{:?}", r.corrupt_at);
    assert!(r
        .corrupt_at
        .iter()
        .any(|c| c.segment == 1 && c.offset == at as u64));
    assert_eq!(r.torn_tails, 0);
}

#[test]
fn a_damaged_segment_is_set_aside_only_after_older_ones_handed_out_are_deleted() {
    // Setting a segment aside takes it out of the scan at once; an older segment handed out
    // for deleting elsewhere is still there until deleted. The damaged one waits for it.
    let dir = tempfile::tempdir().unwrap();
    let ids = full_segments(dir.path());
    let files = segment_files(dir.path());
    let second = &files[1];
    let mut data = std::fs::read(second).unwrap();
    let records = record_offsets(&data);
    let at = records[records.len() / 2];
    data[at..at + 4].fill(0);
    std::fs::write(second, &data).unwrap();
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    spool.set_unlink_later(true);
    for id in &ids {
        spool.mark_final(id).unwrap();
    }
    let handed = spool.take_unlinks();
    let paths: Vec<_> = handed.iter().map(|f| f.path.clone()).collect();
    assert_eq!(paths, [files[0].clone()]);
    assert!(second.exists());
    assert_eq!(kept_for_inspection(dir.path()), 0);
    // Still waiting while the first is out, whatever asks.
    spool.reclaim().unwrap();
    assert!(second.exists() && spool.take_unlinks().is_empty());
    assert!(postern_spool::unlink_segments(handed).is_ok());
    spool.unlinks_done();
    spool.reclaim().unwrap();
    assert!(!second.exists());
    assert_eq!(kept_for_inspection(dir.path()), 1);
}

#[test]
fn zeros_over_the_first_length_word_of_a_full_segment_are_damage_reported_and_kept() {
    // Its first record gone, the segment looks like one made ahead and never written; the
    // seal says otherwise, so it is not deleted as empty at the next opening.
    let dir = tempfile::tempdir().unwrap();
    let ids = full_segments(dir.path());
    let first = &segment_files(dir.path())[0];
    let mut data = std::fs::read(first).unwrap();
    data[64..68].fill(0);
    std::fs::write(first, &data).unwrap();
    let r = recover(dir.path()).unwrap();
    assert!(r
        .corrupt_at
        .iter()
        .any(|c| c.segment == 1 && c.offset == 64));
    drop(r);
    // Nothing live is left in it (its messages' records are hidden): set aside at the
    // opening or once the rest is final, never deleted.
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    for id in &ids {
        spool.mark_final(id).unwrap();
    }
    assert_eq!(kept_for_inspection(dir.path()), 1);
}

#[test]
fn a_bad_last_record_of_a_full_segment_is_damage_not_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    full_segments(dir.path());
    let first = &segment_files(dir.path())[0];
    let mut data = std::fs::read(first).unwrap();
    let last = *record_offsets(&data).last().unwrap();
    // A bit flipped in its payload: the CRC no longer matches.
    data[last + 20] ^= 0x01;
    std::fs::write(first, &data).unwrap();
    let r = recover(dir.path()).unwrap();
    assert_eq!(r.torn_tails, 0);
    assert!(r
        .corrupt_at
        .iter()
        .any(|c| c.segment == 1 && c.offset == last as u64));
}

/// Twelve 30,000-byte messages, each synced, in 128 KiB segments: the first ones are full
/// and sealed. Returns their queue IDs.
fn full_segments(root: &std::path::Path) -> Vec<String> {
    let mut spool = Spool::open(root, 0, OPTS).unwrap();
    let mut ids = Vec::new();
    for i in 0..12 {
        let mut d = spool.begin(&meta(i)).unwrap();
        spool.append(&mut d, &body(i, 30_000)).unwrap();
        ids.push(d.queue_id().to_owned());
        spool.finish(d).unwrap();
        spool.sync_now().unwrap();
    }
    drop(spool);
    assert!(segment_files(root).len() >= 3);
    ids
}

#[test]
fn zeros_in_the_segment_being_written_are_its_end() {
    // The segment in use when the server stopped has no seal: zeros over a length word there
    // are what a crash leaves, the end of the data, and are not reported (the full segments
    // before it are sealed).
    let dir = tempfile::tempdir().unwrap();
    full_segments(dir.path());
    let files = segment_files(dir.path());
    let current = files.last().unwrap();
    let mut data = std::fs::read(current).unwrap();
    let records = record_offsets(&data);
    assert!(records.len() >= 2, "{records:?}");
    data[records[1]..records[1] + 4].fill(0);
    std::fs::write(current, &data).unwrap();
    let r = recover(dir.path()).unwrap();
    assert_eq!(r.corrupt_records, 0, "{:?}", r.corrupt_at);
    assert!(r.messages.len() < 12);
}

/// Where the START records of a segment's messages are (kind 1).
fn message_starts(data: &[u8]) -> Vec<usize> {
    record_offsets(data)
        .into_iter()
        .filter(|&at| data[at + 8] == 1)
        .collect()
}

/// Four messages synced one by one into one segment, its mark moved on at every batch, the
/// spool closed; returns the segment's path and the queue IDs.
fn four_marked_messages(root: &std::path::Path) -> (std::path::PathBuf, Vec<String>) {
    let mut spool = Spool::open(root, 0, OPTS).unwrap();
    spool.set_mark_interval(std::time::Duration::ZERO);
    let mut ids = Vec::new();
    for i in 0..4 {
        let mut d = spool.begin(&meta(i)).unwrap();
        spool.append(&mut d, &body(i, 5000)).unwrap();
        ids.push(d.queue_id().to_owned());
        spool.finish(d).unwrap();
        spool.sync_now().unwrap();
    }
    drop(spool);
    let segs = segment_files(root);
    assert_eq!(segs.len(), 1, "{segs:?}");
    (segs[0].clone(), ids)
}

#[test]
fn zeros_before_the_mark_of_the_segment_being_written_are_damage_reported_and_kept() {
    // The segment in use has no seal, but its header marks how far its records were durable
    // (here: to the end of the third message, written with the fourth's batch). Zeros over a
    // length word before that are damage, not what a crash leaves.
    let dir = tempfile::tempdir().unwrap();
    let (seg, ids) = four_marked_messages(dir.path());
    let mut data = std::fs::read(&seg).unwrap();
    let starts = message_starts(&data);
    assert_eq!(starts.len(), 4, "{starts:?}");
    data[starts[1]..starts[1] + 4].fill(0);
    std::fs::write(&seg, &data).unwrap();
    let r = recover(dir.path()).unwrap();
    // Only the message whose START was zeroed is lost: the scan goes on past the hole.
    let found: Vec<&str> = r.messages.iter().map(|m| m.queue_id.as_str()).collect();
    assert_eq!(found, [&ids[0], &ids[2], &ids[3]]);
    assert_eq!(r.torn_tails, 0);
    // Past the hole the records were read again: nothing is left unread.
    assert_eq!(r.unread_octets, 0);
    assert!(
        r.corrupt_at.iter().any(|c| c.offset == starts[1] as u64),
        "{:?}",
        r.corrupt_at
    );
    drop(r);
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    for id in [&ids[0], &ids[2], &ids[3]] {
        spool.mark_final(id).unwrap();
    }
    assert!(!seg.exists());
    assert_eq!(kept_for_inspection(dir.path()), 1);
}

#[test]
fn zeros_over_the_last_length_word_before_the_mark_lose_only_that_message() {
    // The mark ends right after the third message's last record; zeros over that record's
    // length word are damage, and the next record starts exactly at the mark: the fourth
    // message, durable though past the mark, comes back.
    let dir = tempfile::tempdir().unwrap();
    let (seg, ids) = four_marked_messages(dir.path());
    let mut data = std::fs::read(&seg).unwrap();
    let starts = message_starts(&data);
    let records = record_offsets(&data);
    let third_end = records[records.iter().position(|&r| r == starts[3]).unwrap() - 1];
    data[third_end..third_end + 4].fill(0);
    std::fs::write(&seg, &data).unwrap();
    let r = recover(dir.path()).unwrap();
    let found: Vec<&str> = r.messages.iter().map(|m| m.queue_id.as_str()).collect();
    assert_eq!(found, [&ids[0], &ids[1], &ids[3]], "{:?}", r.corrupt_at);
    assert_eq!(r.torn_tails, 0);
    assert!(r.corrupt_at.iter().any(|c| c.offset == third_end as u64));
}

#[test]
fn files_named_almost_like_segments_are_left_alone() {
    // A restored or hand-made spool: `1.seg` (not as postern names segments) and the largest
    // number as a directory's name. Neither is read or counted, the spool opens (the next
    // number once wrapped to 0), and the real segment's messages come back.
    let dir = tempfile::tempdir().unwrap();
    let (_, ids) = four_marked_messages(dir.path());
    let core = dir.path().join("0");
    std::fs::write(core.join("1.seg"), b"not a segment").unwrap();
    std::fs::create_dir(core.join("18446744073709551615.seg")).unwrap();
    let r = recover(dir.path()).unwrap();
    assert_eq!(r.messages.len(), 4);
    assert_eq!((r.corrupt_records, r.torn_tails), (0, 0));
    drop(r);
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    let mut d = spool.begin(&meta(9)).unwrap();
    spool.append(&mut d, &body(9, 100)).unwrap();
    spool.finish(d).unwrap();
    spool.sync_now().unwrap();
    for id in &ids {
        spool.mark_final(id).unwrap();
    }
    drop(spool);
    assert!(core.join("1.seg").exists());
    let r = recover(dir.path()).unwrap();
    assert_eq!(r.messages.len(), 1);
}

#[test]
fn a_bad_record_before_the_mark_is_damage_and_one_past_it_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (seg, _) = four_marked_messages(dir.path());
    let clean = std::fs::read(&seg).unwrap();
    let starts = message_starts(&clean);
    let records = record_offsets(&clean);
    // The last record of the third message, its CRC broken, with zeros after it: before the
    // mark, so damage.
    let third_end = records[records.iter().position(|&r| r == starts[3]).unwrap() - 1];
    let mut data = clean.clone();
    data[third_end + 12] ^= 0x01;
    data[starts[3]..].fill(0);
    std::fs::write(&seg, &data).unwrap();
    let r = recover(dir.path()).unwrap();
    assert_eq!(r.torn_tails, 0, "{:?}", r.corrupt_at);
    assert!(r.corrupt_at.iter().any(|c| c.offset == third_end as u64));
    // The fourth message's records are past the mark: zeros over its START, or its last
    // record cut off, are what a crash leaves there.
    let mut data = clean.clone();
    data[starts[3]..starts[3] + 4].fill(0);
    std::fs::write(&seg, &data).unwrap();
    let r = recover(dir.path()).unwrap();
    assert_eq!((r.messages.len(), r.corrupt_records), (3, 0));
    let last = *records.last().unwrap();
    let mut data = clean;
    data[last + 12] ^= 0x01;
    std::fs::write(&seg, &data).unwrap();
    let r = recover(dir.path()).unwrap();
    assert_eq!(
        (r.messages.len(), r.corrupt_records, r.torn_tails),
        (3, 0, 1)
    );
}

/// Three messages written into a new spool at `root`, not yet synced.
fn three_unsynced(root: &std::path::Path) -> Spool {
    let mut spool = Spool::open(root, 0, OPTS).unwrap();
    for i in 0..3 {
        let mut d = spool.begin(&meta(i)).unwrap();
        spool.append(&mut d, &body(i, 5000)).unwrap();
        spool.finish(d).unwrap();
    }
    spool
}

/// Breaks the CRC of the last record of the spool's first segment and checks that recovery
/// reports it as damage, not as a torn tail: the segment's mark covers it.
fn a_broken_last_record_is_damage(root: &std::path::Path) {
    let seg = segment_files(root)[0].clone();
    let mut data = std::fs::read(&seg).unwrap();
    assert_eq!(message_starts(&data).len(), 3);
    let last = *record_offsets(&data).last().unwrap();
    data[last + 12] ^= 0x01;
    std::fs::write(&seg, &data).unwrap();
    let r = recover(root).unwrap();
    assert_eq!(r.torn_tails, 0, "{:?}", r.corrupt_at);
    assert!(r.corrupt_at.iter().any(|c| c.offset == last as u64));
}

#[test]
fn a_stop_marks_the_segment_being_written_to_its_end() {
    // Written well within a second: no group commit moved the mark. The stop does.
    let dir = tempfile::tempdir().unwrap();
    let mut spool = three_unsynced(dir.path());
    spool.sync_now().unwrap();
    spool.mark_durable_end();
    drop(spool);
    a_broken_last_record_is_damage(dir.path());
}

#[test]
fn the_stop_s_mark_waits_for_no_batch_in_flight() {
    // A batch still syncing at the stop (a slow disk): the stop writes no mark, whose own
    // fdatasync could take that batch's write-back error. The last record is then read as
    // what a crash may leave (a torn tail), not as damage under a mark.
    let dir = tempfile::tempdir().unwrap();
    let mut spool = three_unsynced(dir.path());
    spool.sync_now().unwrap();
    let mut d = spool.begin(&meta(3)).unwrap();
    spool.append(&mut d, &body(3, 100)).unwrap();
    spool.finish(d).unwrap();
    let in_flight = spool.take_sync().unwrap();
    spool.mark_durable_end();
    drop(in_flight);
    drop(spool);
    let seg = segment_files(dir.path())[0].clone();
    let mut data = std::fs::read(&seg).unwrap();
    let last = *record_offsets(&data).last().unwrap();
    data[last + 12] ^= 0x01;
    std::fs::write(&seg, &data).unwrap();
    let r = recover(dir.path()).unwrap();
    assert_eq!(
        (r.torn_tails, r.corrupt_records),
        (1, 0),
        "{:?}",
        r.corrupt_at
    );
}

#[test]
fn a_quiet_spell_moves_the_mark_over_the_last_batch_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = three_unsynced(dir.path());
    spool.set_mark_interval(std::time::Duration::ZERO);
    // The batch that makes them durable cannot claim them in the header it writes.
    spool.sync_now().unwrap();
    assert!(spool.mark_lags());
    assert!(spool.mark_tick());
    spool.sync_now().unwrap();
    assert!(!spool.mark_lags());
    assert!(!spool.mark_tick(), "one batch per quiet spell");
    drop(spool);
    a_broken_last_record_is_damage(dir.path());
}

#[test]
fn a_marked_segment_whose_first_record_is_zeroed_is_not_taken_for_an_empty_one() {
    let dir = tempfile::tempdir().unwrap();
    let (seg, ids) = four_marked_messages(dir.path());
    let mut data = std::fs::read(&seg).unwrap();
    data[64..68].fill(0);
    std::fs::write(&seg, &data).unwrap();
    let r = recover(dir.path()).unwrap();
    assert!(
        r.corrupt_at.iter().any(|c| c.offset == 64),
        "{:?}",
        r.corrupt_at
    );
    drop(r);
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    for id in &ids {
        spool.mark_final(id).unwrap();
    }
    assert_eq!(kept_for_inspection(dir.path()), 1);
}

/// A directory (or anything not a regular file) with a segment's name holds no records: it
/// is reported and left alone, the real segments are read, and new segments take other names.
#[test]
fn an_entry_named_like_a_segment_that_is_not_a_file_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let seg = three_messages(dir.path());
    let core = dir.path().join("0");
    let strays = [core.join("0000000002.seg"), core.join("0000000009.seg")];
    for s in &strays {
        std::fs::create_dir(s).unwrap();
    }
    let r = recover(dir.path()).unwrap();
    assert_eq!(r.messages.len(), 3);
    assert_eq!(r.corrupt_records, 0);
    let mut found = r.strays.clone();
    found.sort();
    assert_eq!(found, strays);
    drop(r);
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    // Enough for a segment of its own: a new one is made, past the strays' numbers.
    let mut d = spool.begin(&meta(3)).unwrap();
    spool.append(&mut d, &body(3, 200 * 1024)).unwrap();
    spool.finish(d).unwrap();
    spool.sync_now().unwrap();
    drop(spool);
    let r = recover(dir.path()).unwrap();
    assert_eq!(r.messages.len(), 4);
    assert!(seg.is_file());
    assert!(strays.iter().all(|s| s.is_dir()));
}

/// The CRC does not cover a record's length word: one damaged to claim more than its record
/// held would make the scan jump over good records, and in the segment being written (no
/// seal) land on zeros and read as a crash's torn tail, the messages after it lost without a
/// word. The scan goes on from the first valid record inside the claimed span, and the bad
/// record is damage, reported and kept.
#[test]
fn a_length_word_that_claims_too_much_does_not_hide_the_records_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let seg = three_messages(dir.path());
    let mut data = std::fs::read(&seg).unwrap();
    let records = record_offsets(&data);
    let end_of_data = {
        let last = *records.last().unwrap();
        let len = u32::from_le_bytes(data[last..last + 4].try_into().unwrap()) as usize;
        last + ((12 + len + 7) & !7)
    };
    // The first message's body record: its jump now lands in the zeros past the data.
    let body = records[1];
    let claimed = end_of_data - body + 4096;
    assert!(body + claimed < data.len());
    data[body..body + 4].copy_from_slice(&(claimed as u32).to_le_bytes());
    std::fs::write(&seg, &data).unwrap();
    let r = recover(dir.path()).unwrap();
    assert_eq!(
        (r.corrupt_records, r.torn_tails, r.damaged),
        (1, 0, 1),
        "{:?}",
        r.corrupt_at
    );
    assert_eq!(r.corrupt_at[0].offset, body as u64);
    let bodies: Vec<Vec<u8>> = r.messages.iter().map(|m| m.body().to_vec()).collect();
    assert_eq!(
        bodies,
        [body_of(1), body_of(2)],
        "the messages after it are kept"
    );
    drop(r);
    // The messages found are live: the segment stays where it is, to be delivered from.
    let spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    assert_eq!(spool.live_messages(), 2);
    assert!(seg.exists());
}

fn body_of(i: usize) -> Vec<u8> {
    body(i, 5000)
}

#[test]
fn a_segment_copied_or_moved_by_hand_is_damage_not_a_second_copy_of_its_mail() {
    // A segment's header names the core and the number it was made as. A copy under another
    // number (a restore over a live spool, say) gave every message in it twice, each copy
    // delivered; one moved into another core's directory put its mail under that core. Either
    // is reported as damage and kept for inspection; the original is read as before.
    let dir = tempfile::tempdir().unwrap();
    let seg = three_messages(dir.path());
    let r = recover(dir.path()).unwrap();
    let mut ids: Vec<String> = r.messages.iter().map(|m| m.queue_id.clone()).collect();
    ids.sort();
    drop(r);
    assert_eq!(ids.len(), 3);
    let copy = dir.path().join("0").join("0000000012.seg");
    std::fs::copy(&seg, &copy).unwrap();
    std::fs::create_dir_all(dir.path().join("1")).unwrap();
    let moved = dir.path().join("1").join(seg.file_name().unwrap());
    std::fs::copy(&seg, &moved).unwrap();
    let r = recover(dir.path()).unwrap();
    let mut found: Vec<String> = r.messages.iter().map(|m| m.queue_id.clone()).collect();
    found.sort();
    assert_eq!(found, ids, "each message once, from the original");
    assert!(r.messages.iter().all(|m| m.core == 0));
    assert_eq!(r.corrupt_records, 2, "{:?}", r.corrupt_at);
    let mut at: Vec<(u32, u64, u64)> = r
        .corrupt_at
        .iter()
        .map(|c| (c.core, c.segment, c.offset))
        .collect();
    at.sort_unstable();
    assert_eq!(at, [(0, 12, 0), (1, 1, 0)]);
}

/// A message finished and synced across two segments, the spool closed: its queue ID and the
/// segment files (oldest first).
fn one_message_across_segments(root: &std::path::Path) -> (String, Vec<std::path::PathBuf>) {
    let mut spool = Spool::open(root, 0, OPTS).unwrap();
    let mut d = spool.begin(&meta(1)).unwrap();
    for i in 0..20 {
        spool.append(&mut d, &body(i, 8 * 1024)).unwrap();
    }
    let id = d.queue_id().to_owned();
    spool.finish(d).unwrap();
    spool.sync_now().unwrap();
    drop(spool);
    let segs = segment_files(root);
    assert!(segs.len() >= 2, "the message must cross a segment boundary");
    (id, segs)
}

/// A message whose END went with the damage (its last segment cut short) was acknowledged
/// with a queue ID: it is named, with its sender, and what is left of it (the segments from
/// its START to the damage) is kept for inspection.
#[test]
fn a_message_whose_end_was_lost_to_damage_is_named_and_its_first_records_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (id, segs) = one_message_across_segments(dir.path());
    let last = segs.last().unwrap();
    std::fs::File::options()
        .write(true)
        .open(last)
        .unwrap()
        .set_len(100)
        .unwrap();
    let r = recover(dir.path()).unwrap();
    assert!(r.messages.is_empty());
    assert_eq!(r.damaged, 0, "no END was read: not a damaged message");
    assert_eq!(r.cut_off.len(), 1, "{r:?}");
    let c = &r.cut_off[0];
    assert_eq!(c.queue_id, id);
    assert_eq!(c.reverse_path, "sender1@origin.test");
    assert_eq!(c.recipients, 2);
    assert_eq!((c.start.segment, c.start.offset), (1, 64));
    assert_eq!(c.damage.segment, segs.len() as u64);
    drop(r);
    let _spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    assert_eq!(kept_for_inspection(dir.path()), segs.len());
}

/// A draft a crash cut off (never acknowledged) is not named for damage that a later opening
/// met: that damage cannot have held its END. Nor for a torn tail, a crash's own trace.
#[test]
fn a_draft_cut_off_by_a_crash_is_not_named_for_later_damage() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), 0, OPTS).unwrap();
    let mut d = spool.begin(&meta(7)).unwrap();
    spool.append(&mut d, &body(7, 3000)).unwrap();
    // A message finished after it takes its records to the file.
    let mut e = spool.begin(&meta(8)).unwrap();
    spool.append(&mut e, &body(8, 3000)).unwrap();
    spool.finish(e).unwrap();
    spool.sync_now().unwrap();
    std::mem::forget(d);
    std::mem::forget(spool);
    let r = recover(dir.path()).unwrap();
    assert_eq!((r.messages.len(), r.unfinished, r.cut_off.len()), (1, 1, 0));
    drop(r);
    // A later opening, whose segment is then damaged.
    let seg = three_messages_in_a_new_opening(dir.path());
    let mut data = std::fs::read(&seg).unwrap();
    let at = data
        .windows(32)
        .position(|w| w == &body(1, 5000)[..32])
        .unwrap();
    data[at..at + 64].fill(0xA5);
    std::fs::write(&seg, &data).unwrap();
    let r = recover(dir.path()).unwrap();
    assert!(r.corrupt_records > 0, "{r:?}");
    assert_eq!(r.unfinished, 1);
    assert!(r.cut_off.is_empty(), "{:?}", r.cut_off);
}

/// Three messages written by a new opening of the spool at `root`: the segment it wrote.
fn three_messages_in_a_new_opening(root: &std::path::Path) -> std::path::PathBuf {
    let before = if root.join("0").exists() {
        segment_files(root)
    } else {
        Vec::new()
    };
    let mut spool = Spool::open(root, 0, OPTS).unwrap();
    for i in 0..3 {
        let mut d = spool.begin(&meta(i)).unwrap();
        spool.append(&mut d, &body(i, 5000)).unwrap();
        spool.finish(d).unwrap();
    }
    spool.sync_now().unwrap();
    drop(spool);
    let after = segment_files(root);
    let new: Vec<_> = after.iter().filter(|p| !before.contains(p)).collect();
    assert_eq!(new.len(), 1, "{after:?}");
    new[0].clone()
}
