//! One process per spool: the spool directory's lock file.
//!
//! Two servers on one spool would each take the other's segment files for their own (one
//! recovers and retires what the other still appends to), and mail acknowledged by either
//! could be lost. [`DirLock::acquire`] takes an exclusive `flock` on `<dir>/postern.lock`
//! before anything in the directory is opened, and holds it for as long as the value lives;
//! the kernel drops it when the process ends, however it ends, so a crash never leaves a
//! stale lock behind.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::Path;

use rustix::fs::{flock, FlockOperation};

/// The lock file's name in the spool directory.
pub const LOCK_FILE: &str = "postern.lock";

/// An exclusive hold on a spool directory, released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock of `dir` (which must exist) without waiting, and writes this process's
    /// ID into the lock file for whoever finds the lock held. When another process holds it,
    /// the error is [`io::ErrorKind::WouldBlock`] and names that process's ID when it can.
    pub fn acquire(dir: &Path) -> io::Result<DirLock> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        if let Err(e) = flock(&file, FlockOperation::NonBlockingLockExclusive) {
            if e != rustix::io::Errno::WOULDBLOCK {
                return Err(e.into());
            }
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => String::new(),
                pid => format!(" (pid {pid})"),
            };
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "{} is in use by another postern{holder}; one spool serves one process",
                    dir.display()
                ),
            ));
        }
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        Ok(DirLock { _file: file })
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
}
