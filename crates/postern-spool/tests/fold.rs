//! Fewer cores than the spool was written with: the missing cores' queued messages move, with
//! their outcomes, to the remaining cores; what was final is dropped; the old directories go.
#![allow(clippy::unwrap_used)]

mod common;

use common::{body, meta};
use postern_spool::{fold_cores, recover, DeliveryState, Spool, SpoolOptions, Status};

const OPTS: SpoolOptions = SpoolOptions {
    segment_size: 128 * 1024,
};

fn delivered() -> Status {
    Status {
        state: DeliveryState::Delivered,
        reply: "250 2.0.0 ok".into(),
    }
}

#[test]
fn queued_mail_of_missing_cores_moves_with_its_outcomes() {
    let dir = tempfile::tempdir().unwrap();
    // Core 2 of an earlier run: one message half delivered, one delivered whole, one untried.
    let mut old = Spool::open(dir.path(), 2, OPTS).unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        let mut d = old.begin(&meta(i)).unwrap();
        old.append(&mut d, &body(i, 5000)).unwrap();
        ids.push(d.queue_id().to_owned());
        old.finish(d).unwrap();
    }
    old.append_status(&ids[0], 0, &delivered()).unwrap();
    old.append_status(&ids[1], 0, &delivered()).unwrap();
    old.append_status(&ids[1], 1, &delivered()).unwrap();
    old.sync_now().unwrap();
    drop(old);

    let folded = fold_cores(dir.path(), 2, OPTS).unwrap();
    assert_eq!(folded.dirs, 1);
    assert_eq!(folded.moved.len(), 2, "{folded:?}");
    assert!(!dir.path().join("2").exists());
    let r = recover(dir.path()).unwrap();
    assert_eq!(r.messages.len(), 2);
    for m in &r.messages {
        assert_eq!(m.core, 0, "2 mod 2 is core 0");
        let (old_id, _) = folded
            .moved
            .iter()
            .find(|(_, new)| *new == m.queue_id)
            .unwrap();
        let i = ids.iter().position(|id| id == old_id).unwrap();
        assert_eq!(r.body_vec(m), body(i, 5000));
        assert_eq!(m.meta.reverse_path, meta(i).reverse_path);
        let done: Vec<bool> = m.statuses.iter().map(Option::is_some).collect();
        assert_eq!(
            done,
            if i == 0 {
                [true, false]
            } else {
                [false, false]
            }
        );
    }
    // Nothing more to fold.
    assert_eq!(fold_cores(dir.path(), 2, OPTS).unwrap().dirs, 0);
}

#[test]
fn a_core_directory_not_named_as_postern_names_it_is_not_folded_or_read() {
    // Core 3's directory restored as `03`: the same number, but no core opens, folds away or
    // reclaims a directory of that name. Folded, its mail was copied at every start while the
    // original stayed, each copy delivered again.
    let dir = tempfile::tempdir().unwrap();
    let mut old = Spool::open(dir.path(), 3, OPTS).unwrap();
    let mut d = old.begin(&meta(1)).unwrap();
    old.append(&mut d, &body(1, 5000)).unwrap();
    old.finish(d).unwrap();
    old.sync_now().unwrap();
    drop(old);
    let odd = dir.path().join("03");
    std::fs::rename(dir.path().join("3"), &odd).unwrap();

    for _ in 0..2 {
        let folded = fold_cores(dir.path(), 2, OPTS).unwrap();
        assert_eq!((folded.dirs, folded.moved.len()), (0, 0), "{folded:?}");
    }
    let r = recover(dir.path()).unwrap();
    assert!(r.messages.is_empty(), "{:?}", r.messages.len());
    assert_eq!(
        r.strays,
        std::slice::from_ref(&odd),
        "reported for the operator to move"
    );
    assert!(odd.is_dir());
}

#[test]
fn what_postern_did_not_write_in_a_folded_directory_is_kept() {
    // Core 2's directory with its mail, an operator's note and a directory named like a
    // segment beside it; and a directory `7` holding only a note.
    let dir = tempfile::tempdir().unwrap();
    let mut old = Spool::open(dir.path(), 2, OPTS).unwrap();
    let mut d = old.begin(&meta(1)).unwrap();
    old.append(&mut d, &body(1, 5000)).unwrap();
    old.finish(d).unwrap();
    old.sync_now().unwrap();
    drop(old);
    std::fs::write(dir.path().join("2").join("notes.txt"), b"keep me").unwrap();
    std::fs::create_dir(dir.path().join("2").join("0000000009.seg")).unwrap();
    std::fs::create_dir(dir.path().join("7")).unwrap();
    std::fs::write(dir.path().join("7").join("README"), b"mine").unwrap();

    let folded = fold_cores(dir.path(), 2, OPTS).unwrap();
    assert_eq!((folded.dirs, folded.moved.len()), (2, 1), "{folded:?}");
    assert_eq!(folded.kept_foreign.len(), 2, "{folded:?}");
    assert!(!dir.path().join("2").exists() && !dir.path().join("7").exists());
    let mut kept: Vec<Vec<String>> = folded
        .kept_foreign
        .iter()
        .map(|k| {
            let mut names: Vec<String> = std::fs::read_dir(k)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        })
        .collect();
    kept.sort();
    // postern's own segment files went; the rest is as it was.
    assert_eq!(
        kept,
        [vec!["0000000009.seg", "notes.txt"], vec!["README"]],
        "{:?}",
        folded.kept_foreign
    );
    assert_eq!(
        std::fs::read(
            folded
                .kept_foreign
                .iter()
                .find(|k| k.join("README").exists())
                .unwrap()
                .join("README")
        )
        .unwrap(),
        b"mine"
    );
    // The mail moved once, and a later start neither moves nor deletes anything more.
    assert_eq!(recover(dir.path()).unwrap().messages.len(), 1);
    let again = fold_cores(dir.path(), 2, OPTS).unwrap();
    assert_eq!((again.dirs, again.kept_foreign.len()), (0, 0), "{again:?}");
    assert!(folded.kept_foreign.iter().all(|k| k.is_dir()));
}
