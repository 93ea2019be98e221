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
use crate::segment::sync_dir;
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
}

/// Moves what the directories of cores `cores` and up still have to deliver into the spools
/// of cores `0..cores`, makes it durable, then removes those directories. Called before any
/// core opens its spool. A crash in the middle leaves the old copies in place: at worst a
/// message is delivered twice, never lost.
pub fn fold_cores(root: &Path, cores: u32, options: SpoolOptions) -> Result<Folded, SpoolError> {
    let mut out = Folded::default();
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(out);
    };
    let entries: Vec<std::fs::DirEntry> = entries.flatten().collect();
    // What an earlier fold set aside after moving its messages: never read again.
    for e in &entries {
        if e.file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(FOLDED))
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let old_dirs: Vec<(u32, std::path::PathBuf)> = entries
        .iter()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path())))
        .filter(|(n, _)| *n >= cores)
        .collect();
    if old_dirs.is_empty() || cores == 0 {
        return Ok(out);
    }
    // Every directory is read: outcomes of these messages may have been recorded by the core
    // that delivered them in an earlier run.
    let found = recover(root)?;
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
    // The copies are durable: each old directory is renamed out of the way in one step, so
    // that no later start copies its messages again, whatever happens to the deletion.
    let damaged: Vec<u32> = (found.corrupt_at.iter())
        .chain(found.damaged_at.iter().map(|(start, _)| start))
        .map(|l| l.core)
        .collect();
    drop(found);
    let mut aside = Vec::new();
    for (n, dir) in &old_dirs {
        let to = root.join(format!("{FOLDED}{n}"));
        std::fs::rename(dir, &to).map_err(SpoolError::at(dir))?;
        aside.push((*n, to));
        out.dirs += 1;
    }
    sync_dir(root).map_err(SpoolError::from_io)?;
    for (n, dir) in aside {
        if damaged.contains(&n) || dir.join(crate::DAMAGED_DIR).exists() {
            // Damaged records (or segments set aside for them): kept for the operator to look
            // at (see the log), under a name the next start does not clear.
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let kept = root.join(format!("{DAMAGED_FOLD}{n}-{secs}"));
            match std::fs::rename(&dir, &kept) {
                Ok(()) => out.kept_damaged.push(kept),
                Err(_) => out.kept_damaged.push(dir),
            }
        } else {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(out)
}

/// The name an old core directory takes once its messages have moved (then it is deleted,
/// unless it has damaged records).
const FOLDED: &str = ".folded-core-";
/// The name an old core directory with damaged records keeps (with the time it was folded).
const DAMAGED_FOLD: &str = ".damaged-core-";

/// Where earlier runs set aside segments (a core's `damaged` directory) or whole core
/// directories (at a fold) with damaged records, for the operator to look at.
pub fn kept_damage(root: &Path) -> Vec<std::path::PathBuf> {
    let mut kept = Vec::new();
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(DAMAGED_FOLD) {
            kept.push(path);
        } else if name.parse::<u32>().is_ok() {
            let aside = path.join(crate::DAMAGED_DIR);
            for seg in std::fs::read_dir(&aside).into_iter().flatten().flatten() {
                kept.push(seg.path());
            }
        }
    }
    kept.sort();
    kept
}
