//! Fewer cores than the spool was written with: the messages still queued in the directories
//! of cores that no longer exist are written again into the spool of core `n mod cores`, with
//! their recipients' outcomes, and the old directories are removed.
//!
//! Left in place, they would be delivered by another core whose status records live in its
//! own segments; once that core released those segments, the next start would find the old
//! messages without outcomes and deliver them again (docs/durability.md).

use std::path::Path;

use crate::error::SpoolError;
use crate::recover::recover;
use crate::segment::{parse_name, sync_dir};
use crate::spool::{Spool, SpoolOptions};

/// What [`fold_cores`] did.
#[derive(Debug, Default)]
pub struct Folded {
    /// Core directories removed.
    pub dirs: usize,
    /// Messages written again, as (old queue ID, new queue ID).
    pub moved: Vec<(String, String)>,
    /// Old directories with damaged records, set aside rather than deleted.
    pub kept_damaged: Vec<std::path::PathBuf>,
    /// Old directories whose messages were moved but that could not be deleted.
    pub left_behind: Vec<std::path::PathBuf>,
    /// Old directories that held entries postern did not write (a file put there by hand, a
    /// directory named like a segment): postern's segments deleted, the rest kept here.
    pub kept_foreign: Vec<std::path::PathBuf>,
    /// Damage found in the old directories, which stays there (not moved): per old core, the
    /// corrupt records and the damaged messages (body records lost).
    pub damage: Vec<(u32, u64, u64)>,
}

/// Moves what the directories of cores `cores` and up still have to deliver into the spools
/// of cores `0..cores`, makes it durable, then removes those directories. Called before any
/// core opens its spool.
///
/// A journal (`.fold-journal` in `root`) makes the move all or nothing across crashes: it
/// names the first segment the move writes in each target before anything is written there,
/// and says "copied" once the copies are durable. A start that finds it still "copying"
/// deletes those segments (they hold nothing but copies) and moves again from the old
/// directories; one that finds it "copied" only finishes setting the old directories aside.
/// So however often the move is cut off, each message exists once afterwards. A move that
/// fails while copying is undone the same way before the error is returned: only then may the
/// error be [`SpoolError::NoSpace`], after which the old directories may be delivered from
/// where they are. Any error once the copies are durable, or while undoing, is never
/// `NoSpace`: the server must not start beside a move it could not finish or undo, whose
/// next undo would delete what it wrote.
pub fn fold_cores(root: &Path, cores: u32, options: SpoolOptions) -> Result<Folded, SpoolError> {
    let mut out = Folded::default();
    if !root.is_dir() {
        return Ok(out);
    }
    if let Some(journal) = Journal::read(root)? {
        if journal.copied {
            set_aside(root, &journal, &mut out).map_err(must_stop)?;
        } else {
            undo(root, &journal).map_err(must_stop)?;
        }
    }
    // A listing cut short by an error fails: an old core's directory left unseen would not
    // be folded, its mail waiting unnoticed.
    let entries: Vec<std::fs::DirEntry> = std::fs::read_dir(root)
        .map_err(SpoolError::at(root))?
        .collect::<Result<_, _>>()
        .map_err(SpoolError::at(root))?;
    // What an earlier fold set aside after moving its messages: never read again.
    for e in &entries {
        let name = e.file_name();
        if let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(FOLDED)) {
            let kept = root.join(format!("{KEPT_FOLD}{rest}-{}", unix_secs()));
            clear_folded(&e.path(), &kept, &mut out);
        }
    }
    let mut old_dirs: Vec<u32> = entries
        .iter()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| crate::core_number(e.file_name().to_str()?))
        .filter(|n| *n >= cores)
        .collect();
    old_dirs.sort_unstable();
    if old_dirs.is_empty() || cores == 0 {
        return Ok(out);
    }
    // Every directory is read: outcomes of these messages may have been recorded by the core
    // that delivered them in an earlier run.
    let found = recover(root)?;
    let mut journal = Journal {
        copied: false,
        sources: old_dirs,
        targets: Vec::new(),
        damaged: Vec::new(),
    };
    journal.write(root)?;
    if let Err(e) = copy(root, cores, options, &found, &mut journal, &mut out) {
        // Nothing moved: the old directories stay, and are delivered from where they are.
        undo(root, &journal).map_err(must_stop)?;
        out.moved.clear();
        return Err(e);
    }
    // The copies are durable. From here on a crash only finishes the move. The damage goes
    // into the journal, so that a start that finishes the move reports it too.
    for &n in &journal.sources {
        let records = found.corrupt_at.iter().filter(|l| l.core == n).count() as u64;
        let messages = (found.damaged_at.iter().filter(|(s, _)| s.core == n).count()
            + found.cut_off.iter().filter(|c| c.start.core == n).count())
            as u64;
        if records + messages > 0 {
            journal.damaged.push((n, records, messages));
        }
    }
    drop(found);
    journal.copied = true;
    journal.write(root).map_err(must_stop)?;
    set_aside(root, &journal, &mut out).map_err(must_stop)?;
    Ok(out)
}

/// An error the start cannot go on from (never [`SpoolError::NoSpace`], which lets the server
/// deliver the old directories in place).
fn must_stop(e: SpoolError) -> SpoolError {
    match e {
        SpoolError::NoSpace(e) => SpoolError::Io(e),
        other => other,
    }
}

/// Whether a move to fewer cores was cut off and waits for [`fold_cores`] to finish or undo
/// it: nothing may write to the spool before.
pub fn fold_pending(root: &Path) -> bool {
    root.join(JOURNAL).exists()
}

/// Writes the messages of the old directories that are not final into the spools of cores
/// `n mod cores`, with their outcomes, and syncs them. Each target is named in the journal,
/// with the first segment the move will write there, before anything is written to it.
fn copy(
    root: &Path,
    cores: u32,
    options: SpoolOptions,
    found: &crate::recover::Recovered,
    journal: &mut Journal,
    out: &mut Folded,
) -> Result<(), SpoolError> {
    let mut by_target: Vec<Vec<&crate::recover::RecoveredMessage>> =
        vec![Vec::new(); cores as usize];
    for m in &found.messages {
        if m.core >= cores && !m.is_final() {
            by_target[(m.core % cores) as usize].push(m);
        }
    }
    for (target, messages) in by_target.iter().enumerate() {
        if messages.is_empty() {
            continue;
        }
        let mut spool = Spool::open(root, target as u32, options)?;
        journal.targets.push((target as u32, spool.next_segment()));
        journal.write(root)?;
        for m in messages {
            let mut draft = spool.begin(&m.meta)?;
            for chunk in m.body().chunks() {
                spool.append(&mut draft, chunk)?;
            }
            let new_id = draft.queue_id().to_owned();
            spool.finish(draft)?;
            for (rcpt, status) in m.statuses.iter().enumerate() {
                if let Some(status) = status {
                    spool.append_status(&new_id, rcpt as u32, status)?;
                }
            }
            out.moved.push((m.queue_id.clone(), new_id));
        }
        spool.sync_now()?;
    }
    Ok(())
}

/// Undoes a move that did not finish: deletes every segment it wrote in its targets (from the
/// first one the journal names; nothing else writes there before the move ends), then the
/// journal. The old directories were not touched.
fn undo(root: &Path, journal: &Journal) -> Result<(), SpoolError> {
    for &(target, first) in &journal.targets {
        let dir = root.join(target.to_string());
        // A target the move never made has nothing to undo; one that cannot be listed (or
        // an entry that cannot be read) keeps the journal, for the next start to try again:
        // passed over, its copies would stay beside their originals and be delivered twice.
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(SpoolError::at(&dir)(e)),
        };
        let mut copies: Vec<(u64, std::path::PathBuf)> = Vec::new();
        for e in entries {
            let e = e.map_err(SpoolError::at(&dir))?;
            let Some(seq) = e.file_name().to_str().and_then(parse_name) else {
                continue;
            };
            if seq >= first {
                copies.push((seq, e.path()));
            }
        }
        // Newest first: a crash in the middle leaves the journal, and the next start goes on.
        copies.sort_unstable_by_key(|c| std::cmp::Reverse(c.0));
        for (_, path) in copies {
            std::fs::remove_file(&path).map_err(SpoolError::at(&path))?;
        }
        sync_dir(&dir).map_err(SpoolError::at(&dir))?;
    }
    Journal::remove(root)
}

/// Finishes a move whose copies are durable: renames each old directory aside in one step,
/// so that no later start copies its messages again, then deletes the old directories, or
/// keeps those with damaged records for the operator, and drops the journal.
fn set_aside(root: &Path, journal: &Journal, out: &mut Folded) -> Result<(), SpoolError> {
    out.damage.extend_from_slice(&journal.damaged);
    for n in &journal.sources {
        let dir = root.join(n.to_string());
        if dir.is_dir() {
            let to = root.join(format!("{FOLDED}{n}"));
            if to.exists() {
                // What an earlier fold of this core set aside: cleared as at a start.
                let kept = root.join(format!("{KEPT_FOLD}{n}-{}-earlier", unix_secs()));
                clear_folded(&to, &kept, out);
            }
            if to.exists() {
                // What an earlier fold of this core set aside and could not delete: a rename
                // onto it would fail (not empty), at every start while the journal stays. It
                // goes under another name the clean-up below still matches.
                let older = root.join(format!("{FOLDED}{n}.{}", unix_secs()));
                std::fs::rename(&to, &older).map_err(SpoolError::at(&to))?;
                out.left_behind.push(older);
            }
            std::fs::rename(&dir, &to).map_err(SpoolError::at(&dir))?;
            out.dirs += 1;
        }
    }
    sync_dir(root).map_err(SpoolError::at(root))?;
    for n in &journal.sources {
        let dir = root.join(format!("{FOLDED}{n}"));
        if !dir.is_dir() {
            continue;
        }
        let damaged = journal.damaged.iter().any(|(d, _, _)| d == n);
        if damaged || dir.join(crate::DAMAGED_DIR).exists() || !damaged_in_place(&dir).is_empty() {
            // Damaged records (or segments set aside for them): kept for the operator to look
            // at (see the log), under a name the next start does not clear.
            let kept = root.join(format!("{DAMAGED_FOLD}{n}-{}", unix_secs()));
            match std::fs::rename(&dir, &kept) {
                Ok(()) => out.kept_damaged.push(kept),
                Err(_) => out.kept_damaged.push(dir),
            }
        } else {
            let kept = root.join(format!("{KEPT_FOLD}{n}-{}", unix_secs()));
            clear_folded(&dir, &kept, out);
        }
    }
    // Last, so that a crash before this point keeps damaged directories too.
    Journal::remove(root)
}

/// The state of a move, in `root/.fold-journal`: written whole to a temporary file, synced
/// and renamed over the old one, so a crash leaves the old state or the new one.
#[derive(Debug, PartialEq, Eq)]
struct Journal {
    /// The copies are durable; only setting the old directories aside is left.
    copied: bool,
    /// The old core directories being moved.
    sources: Vec<u32>,
    /// Each target core and the first segment the move writes there.
    targets: Vec<(u32, u64)>,
    /// Old directories with damaged records (kept rather than deleted), with the counts of
    /// corrupt records and damaged messages found in each.
    damaged: Vec<(u32, u64, u64)>,
}

const JOURNAL: &str = ".fold-journal";
const JOURNAL_TMP: &str = ".fold-journal.tmp";
const JOURNAL_HEAD: &str = "postern fold journal 1";

impl Journal {
    fn encode(&self) -> String {
        let mut s = format!(
            "{JOURNAL_HEAD}\nstate {}\n",
            if self.copied { "copied" } else { "copying" }
        );
        for n in &self.sources {
            s.push_str(&format!("source {n}\n"));
        }
        for (n, first) in &self.targets {
            s.push_str(&format!("target {n} {first}\n"));
        }
        for (n, records, messages) in &self.damaged {
            s.push_str(&format!("damaged {n} {records} {messages}\n"));
        }
        s
    }

    fn decode(text: &str) -> Option<Journal> {
        let mut lines = text.lines();
        if lines.next()? != JOURNAL_HEAD {
            return None;
        }
        let copied = match lines.next()? {
            "state copied" => true,
            "state copying" => false,
            _ => return None,
        };
        let mut j = Journal {
            copied,
            sources: Vec::new(),
            targets: Vec::new(),
            damaged: Vec::new(),
        };
        for line in lines {
            let (word, numbers) = line.split_once(' ')?;
            let numbers = numbers
                .split(' ')
                .map(|n| n.parse::<u64>().ok())
                .collect::<Option<Vec<u64>>>()?;
            let core = |n: u64| u32::try_from(n).ok();
            match (word, numbers.as_slice()) {
                ("source", &[n]) => j.sources.push(core(n)?),
                // As an earlier build wrote it, without the counts.
                ("damaged", &[n]) => j.damaged.push((core(n)?, 0, 0)),
                ("damaged", &[n, records, messages]) => {
                    j.damaged.push((core(n)?, records, messages));
                }
                ("target", &[n, first]) => j.targets.push((core(n)?, first)),
                _ => return None,
            }
        }
        Some(j)
    }

    fn write(&self, root: &Path) -> Result<(), SpoolError> {
        let tmp = root.join(JOURNAL_TMP);
        let made = (|| {
            let mut f = std::os::unix::fs::OpenOptionsExt::mode(
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true),
                crate::segment::PRIVATE_FILE_MODE,
            )
            .open(&tmp)?;
            std::io::Write::write_all(&mut f, self.encode().as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, root.join(JOURNAL))?;
            sync_dir(root)
        })();
        made.map_err(SpoolError::at(&tmp))
    }

    /// The journal of a move cut off by a crash, if there is one.
    fn read(root: &Path) -> Result<Option<Journal>, SpoolError> {
        let path = root.join(JOURNAL);
        match std::fs::read_to_string(&path) {
            Ok(text) => Journal::decode(&text).map(Some).ok_or_else(|| {
                SpoolError::Io(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{}: not a journal this version wrote; the move of a smaller --cores \
                         was cut off and cannot be finished",
                        path.display()
                    ),
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(SpoolError::at(&path)(e)),
        }
    }

    fn remove(root: &Path) -> Result<(), SpoolError> {
        let path = root.join(JOURNAL);
        match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(root).map_err(SpoolError::at(root)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(SpoolError::at(&path)(e)),
        }
    }
}

/// The name an old core directory takes once its messages have moved (then it is deleted,
/// unless it has damaged records).
const FOLDED: &str = ".folded-core-";
/// The name an old core directory with damaged records keeps (with the time it was folded).
const DAMAGED_FOLD: &str = ".damaged-core-";
/// The name an old core directory keeps that held entries postern did not write, its
/// segments deleted (with the time it was folded).
const KEPT_FOLD: &str = ".kept-core-";

/// Seconds since the Unix epoch, for the names of directories set aside.
fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Deletes a folded core directory whose mail has moved: postern's own files in it (its
/// segments, a segment being made), then the directory. Anything else in it is not to be
/// deleted here: put there by someone else (notes, a copy kept by hand, a directory named
/// like a segment), or damaged segments set aside (its `damaged/`, a `.seg.damaged`, for
/// the operator to look at): the directory is kept under `kept` with it, and said.
fn clear_folded(dir: &Path, kept: &Path, out: &mut Folded) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        out.left_behind.push(dir.to_path_buf());
        return;
    };
    let mut foreign = false;
    for e in entries {
        let Ok(e) = e else {
            out.left_behind.push(dir.to_path_buf());
            return;
        };
        let name = e.file_name();
        let name = name.to_str().unwrap_or("");
        let making = name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".new"))
            .and_then(parse_name);
        let ours = (parse_name(name).is_some() || making.is_some())
            && e.file_type().is_ok_and(|t| t.is_file());
        if !ours {
            foreign = true;
        } else if std::fs::remove_file(e.path()).is_err() {
            out.left_behind.push(dir.to_path_buf());
            return;
        }
    }
    if !foreign {
        if std::fs::remove_dir(dir).is_err() {
            out.left_behind.push(dir.to_path_buf());
        }
        return;
    }
    match std::fs::rename(dir, kept) {
        Ok(()) => out.kept_foreign.push(kept.to_path_buf()),
        Err(_) => out.left_behind.push(dir.to_path_buf()),
    }
}

/// The damaged segments kept in a core's own directory, for want of room for `damaged/`.
fn damaged_in_place(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .contains(&format!(".seg{}", crate::spool::DAMAGED_SUFFIX))
        })
        .map(|e| e.path())
        .collect()
}

/// Where earlier runs set aside segments (a core's `damaged` directory, or in the core's
/// directory itself when that had no room) or whole core directories (at a fold) with
/// damaged records, for the operator to look at.
pub fn kept_damage(root: &Path) -> Vec<std::path::PathBuf> {
    let mut kept = Vec::new();
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(DAMAGED_FOLD) {
            kept.push(path);
        } else if crate::core_number(&name).is_some() {
            let aside = path.join(crate::DAMAGED_DIR);
            for seg in std::fs::read_dir(&aside).into_iter().flatten().flatten() {
                kept.push(seg.path());
            }
            kept.extend(damaged_in_place(&path));
        }
    }
    kept.sort();
    kept
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::meta::{MessageMeta, Recipient};

    #[test]
    fn a_fold_sets_a_core_aside_where_an_earlier_fold_left_one_behind() {
        // An earlier fold of core 2 set its directory aside and could not delete it; core 2
        // was written again since and is folded now, its copies already durable.
        let dir = tempfile::tempdir().unwrap();
        let left = dir.path().join(format!("{FOLDED}2"));
        std::fs::create_dir_all(left.join("sub")).unwrap();
        std::fs::write(left.join("sub/0000000001.seg"), b"old").unwrap();
        std::fs::create_dir(dir.path().join("2")).unwrap();
        std::fs::write(dir.path().join("2/0000000001.seg"), b"new").unwrap();
        let journal = Journal {
            copied: true,
            sources: vec![2],
            targets: vec![(0, 1)],
            damaged: Vec::new(),
        };
        journal.write(dir.path()).unwrap();
        let folded = fold_cores(dir.path(), 2, OPTS).unwrap();
        assert_eq!(folded.dirs, 1, "{folded:?}");
        assert!(!dir.path().join("2").exists());
        assert!(Journal::read(dir.path()).unwrap().is_none());
    }

    #[test]
    fn an_undo_that_cannot_list_a_target_keeps_the_journal() {
        // The move's target directory cannot be listed (here: it is not a directory, the
        // error is ENOTDIR): the copies in it cannot be found and deleted, so the journal
        // stays for the next start. Dropped, the copies would be delivered beside their
        // originals.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("0"), b"").unwrap();
        let journal = Journal {
            copied: false,
            sources: vec![2],
            targets: vec![(0, 5)],
            damaged: Vec::new(),
        };
        journal.write(dir.path()).unwrap();
        assert!(undo(dir.path(), &journal).is_err());
        assert!(
            Journal::read(dir.path()).unwrap().is_some(),
            "the journal is kept"
        );
        // A target the move never made is nothing to undo.
        std::fs::remove_file(dir.path().join("0")).unwrap();
        undo(dir.path(), &journal).unwrap();
        assert!(Journal::read(dir.path()).unwrap().is_none());
    }

    const OPTS: SpoolOptions = SpoolOptions {
        segment_size: 128 * 1024,
    };

    fn meta(i: u64) -> MessageMeta {
        MessageMeta {
            arrival: 1_795_346_220 + i,
            client: "192.0.2.1".into(),
            helo: "client.test".into(),
            reverse_path: format!("sender{i}@origin.test"),
            recipients: vec![Recipient {
                path: "a@dest.test".into(),
                notify: None,
                orcpt: None,
            }],
            envid: None,
            ret: None,
            body_type: 1,
            smtputf8: false,
        }
    }

    /// Three queued messages on core 3 of an earlier run.
    fn old_core(root: &Path) {
        old_core_on(root, 3);
    }

    /// Three queued messages on `core` of an earlier run.
    fn old_core_on(root: &Path, core: u32) {
        let mut old = Spool::open(root, core, OPTS).unwrap();
        for i in 0..3 {
            let mut d = old.begin(&meta(i)).unwrap();
            old.append(&mut d, format!("body {i}\r\n").as_bytes())
                .unwrap();
            old.finish(d).unwrap();
        }
        old.sync_now().unwrap();
    }

    fn senders(root: &Path) -> Vec<(u32, String)> {
        let mut v: Vec<(u32, String)> = recover(root)
            .unwrap()
            .messages
            .iter()
            .map(|m| (m.core, m.meta.reverse_path.clone()))
            .collect();
        v.sort();
        v
    }

    /// The move as far as a crash after its copies were written and before they were known
    /// to be durable (the journal still says "copying").
    fn cut_off_while_copying(root: &Path, cores: u32) {
        let found = recover(root).unwrap();
        let mut journal = Journal {
            copied: false,
            sources: vec![3],
            targets: Vec::new(),
            damaged: Vec::new(),
        };
        journal.write(root).unwrap();
        copy(
            root,
            cores,
            OPTS,
            &found,
            &mut journal,
            &mut Folded::default(),
        )
        .unwrap();
    }

    /// The three messages once each, on core 3 mod 2.
    fn moved_once() -> Vec<(u32, String)> {
        (0..3)
            .map(|i| (1, format!("sender{i}@origin.test")))
            .collect()
    }

    #[test]
    fn a_move_cut_off_while_copying_is_undone_and_done_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        old_core(root);
        cut_off_while_copying(root, 2);
        assert_eq!(
            senders(root).len(),
            6,
            "the copies are on disk beside the originals"
        );
        assert!(fold_pending(root));
        let folded = fold_cores(root, 2, OPTS).unwrap();
        assert_eq!(folded.dirs, 1);
        assert_eq!(folded.moved.len(), 3);
        assert_eq!(
            senders(root),
            moved_once(),
            "each message once, on core 3 mod 2"
        );
        assert!(!root.join(JOURNAL).exists());
        assert_eq!(fold_cores(root, 2, OPTS).unwrap().dirs, 0);
        assert_eq!(senders(root).len(), 3);
    }

    #[test]
    fn a_move_cut_off_after_its_copies_were_durable_is_finished() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        old_core(root);
        cut_off_while_copying(root, 2);
        let mut journal = Journal::read(root).unwrap().unwrap();
        assert_eq!(journal.targets.len(), 1);
        journal.copied = true;
        journal.write(root).unwrap();
        // The start after the crash finishes the move without copying again.
        let folded = fold_cores(root, 2, OPTS).unwrap();
        assert_eq!(folded.dirs, 1);
        assert!(folded.moved.is_empty(), "{folded:?}");
        assert_eq!(senders(root), moved_once());
        assert!(!root.join("3").exists() && !root.join(JOURNAL).exists());
        assert!(!fold_pending(root));
    }

    #[test]
    fn a_start_with_more_cores_after_a_cut_off_move_undoes_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        old_core(root);
        cut_off_while_copying(root, 2);
        // Back to four cores: nothing to move, but the copies must not stay beside the
        // originals.
        let folded = fold_cores(root, 4, OPTS).unwrap();
        assert_eq!(folded.dirs, 0);
        let expected: Vec<(u32, String)> = (0..3)
            .map(|i| (3, format!("sender{i}@origin.test")))
            .collect();
        assert_eq!(senders(root), expected);
    }

    #[test]
    fn errors_past_the_point_of_no_undo_never_read_as_a_full_disk() {
        let full = || std::io::Error::from_raw_os_error(28);
        assert!(matches!(
            SpoolError::from_io(full()),
            SpoolError::NoSpace(_)
        ));
        assert!(matches!(
            must_stop(SpoolError::from_io(full())),
            SpoolError::Io(_)
        ));
        assert!(matches!(
            must_stop(SpoolError::SyncFailed("x".into())),
            SpoolError::SyncFailed(_)
        ));
    }

    #[test]
    fn damage_in_a_folded_directory_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        old_core(root);
        let seg = root.join("3").join(crate::segment::file_name(1));
        let mut data = std::fs::read(&seg).unwrap();
        let at = data.windows(6).position(|w| w == b"body 1").unwrap();
        data[at] ^= 0x20;
        std::fs::write(&seg, &data).unwrap();
        let folded = fold_cores(root, 2, OPTS).unwrap();
        assert_eq!(folded.damage, [(3, 1, 1)]);
        assert_eq!(folded.moved.len(), 2, "the two whole messages moved");
        assert_eq!(folded.kept_damaged.len(), 1);
    }

    #[test]
    fn a_finished_move_still_reports_the_damage_it_found() {
        // A crash after the copies were durable: the start that finishes the move no longer
        // reads the old directory, and reports its damage from the journal.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        old_core(root);
        let j = Journal {
            copied: true,
            sources: vec![3],
            targets: vec![(1, 1)],
            damaged: vec![(3, 4, 2)],
        };
        j.write(root).unwrap();
        let folded = fold_cores(root, 2, OPTS).unwrap();
        assert_eq!(folded.damage, [(3, 4, 2)]);
        assert_eq!((folded.dirs, folded.kept_damaged.len()), (1, 1));
        assert!(folded.moved.is_empty());
        assert!(!fold_pending(root));
    }

    #[test]
    fn a_finished_move_and_a_new_one_in_the_same_start_report_both() {
        // The cut-off move went to three cores; this start asks for two, so after finishing
        // it the start moves core 2 (which holds a damaged record) as well.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        old_core_on(root, 2);
        let seg = root.join("2").join(crate::segment::file_name(1));
        let mut data = std::fs::read(&seg).unwrap();
        let at = data.windows(6).position(|w| w == b"body 1").unwrap();
        data[at] ^= 0x20;
        std::fs::write(&seg, &data).unwrap();
        std::fs::create_dir_all(root.join("5")).unwrap();
        let j = Journal {
            copied: true,
            sources: vec![5],
            targets: vec![(2, 1)],
            damaged: vec![(5, 4, 2)],
        };
        j.write(root).unwrap();
        let folded = fold_cores(root, 2, OPTS).unwrap();
        assert_eq!(folded.damage, [(5, 4, 2), (2, 1, 1)]);
        assert_eq!(
            folded.moved.len(),
            2,
            "the two whole messages of core 2 moved"
        );
    }

    #[test]
    fn the_journal_reads_back_what_was_written_and_refuses_anything_else() {
        let j = Journal {
            copied: true,
            sources: vec![2, 5],
            targets: vec![(0, 7), (1, 12)],
            damaged: vec![(5, 2, 1)],
        };
        assert_eq!(Journal::decode(&j.encode()), Some(j));
        assert_eq!(Journal::decode(""), None);
        assert_eq!(
            Journal::decode(&format!("{JOURNAL_HEAD}\nstate copying\ntarget 1\n")),
            None
        );
        assert_eq!(
            Journal::decode(&format!("{JOURNAL_HEAD}\nstate done\n")),
            None
        );
        assert_eq!(
            Journal::decode(&format!(
                "{JOURNAL_HEAD}\nstate copied\nsource 99999999999\n"
            )),
            None
        );
        // An earlier build's line, without the counts, still reads.
        assert_eq!(
            Journal::decode(&format!("{JOURNAL_HEAD}\nstate copied\ndamaged 4\n"))
                .map(|j| j.damaged),
            Some(vec![(4, 0, 0)])
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(JOURNAL), "garbage").unwrap();
        let e = fold_cores(dir.path(), 1, OPTS).unwrap_err();
        assert!(e.to_string().contains(".fold-journal"), "{e}");
    }
}
