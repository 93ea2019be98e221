//! One process per spool: the spool directory's lock.
//!
//! Two servers on one spool would each take the other's segment files for their own (one
//! recovers and retires what the other still appends to), and mail acknowledged by either
//! could be lost. [`DirLock::acquire`] takes an exclusive `flock` on the spool directory
//! itself, and then on `<dir>/postern.lock` (which earlier builds lock, and which holds the
//! PID for whoever finds the lock held), before anything in the directory is opened, and
//! holds both for as long as the value lives; the kernel drops them when the process ends,
//! however it ends, so a crash never leaves a stale lock behind. The lock on the directory
//! is what keeps a second server out even when the lock file is deleted (a clean-up of
//! "stale" lock files) while the first runs: a new file would be a new lock.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rustix::fs::{flock, FlockOperation};

/// The lock file's name in the spool directory.
pub const LOCK_FILE: &str = "postern.lock";

/// An exclusive hold on a spool directory, released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DirLock {
    _dir: File,
    _file: File,
}

impl DirLock {
    /// Takes the lock of `dir` (which must exist) without waiting, and writes this process's
    /// ID into the lock file for whoever finds the lock held. When another process holds it,
    /// the error is [`io::ErrorKind::WouldBlock`] and names that process's ID when it can.
    pub fn acquire(dir: &Path) -> io::Result<DirLock> {
        let path = dir.join(LOCK_FILE);
        let in_use = || {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = match holder.trim() {
                "" => String::new(),
                pid => format!(" (pid {pid})"),
            };
            io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "{} is in use by another postern{holder}; one spool serves one process",
                    dir.display()
                ),
            )
        };
        let locked = |f: &File| match flock(f, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(in_use()),
            Err(e) => Err(io::Error::from(e)),
        };
        let dir_file = File::open(dir)?;
        locked(&dir_file)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(crate::segment::PRIVATE_FILE_MODE)
            .open(&path)?;
        locked(&file)?;
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        Ok(DirLock {
            _dir: dir_file,
            _file: file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_hold_on_one_directory_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        // flock locks belong to the open file description, so a second open in this same
        // process conflicts exactly as another process would.
        let err = DirLock::acquire(dir.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        let text = err.to_string();
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        drop(first);
        DirLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn a_deleted_lock_file_does_not_let_a_second_hold_in() {
        let dir = tempfile::tempdir().unwrap();
        let _first = DirLock::acquire(dir.path()).unwrap();
        std::fs::remove_file(dir.path().join(LOCK_FILE)).unwrap();
        let err = DirLock::acquire(dir.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        assert!(
            err.to_string().contains("in use by another postern"),
            "{err}"
        );
    }
}
