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
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt};
use std::path::Path;

use rustix::fs::{flock, FlockOperation};

/// The lock file's name in the spool directory.
pub const LOCK_FILE: &str = "postern.lock";

/// An exclusive hold on a spool directory, released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DirLock {
    _dir: File,
    _file: File,
    /// Why this process's ID could not be written into the lock file, if it could not.
    pid_not_written: Option<io::Error>,
}

impl DirLock {
    /// Takes the lock of `dir` (which must exist) without waiting, and writes this process's
    /// ID into the lock file for whoever finds the lock held. When another process holds it,
    /// the error is [`io::ErrorKind::WouldBlock`] and names that process's ID when it can.
    pub fn acquire(dir: &Path) -> io::Result<DirLock> {
        let path = dir.join(LOCK_FILE);
        let in_use = || {
            // The kernel's record of the holder comes first: the lock file may not hold the
            // holder's PID yet (it writes it after taking the lock), or hold one a process
            // wrote from another PID namespace, or one left there by hand. (For a lock a
            // child inherited, the kernel too names the process that took it.)
            let holder = match flock_holder(dir) {
                Ok(Some(pid)) => format!(" (pid {pid})"),
                _ => match pid_in_lock_file(&path) {
                    None => String::new(),
                    Some(pid) => format!(" (pid {pid}, as its lock file says)"),
                },
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
        // The PID is for people: whoever finds the lock held is told the holder by the
        // kernel first (`flock_holder`). A full disk, on which a copy-on-write file system
        // (btrfs) cannot rewrite even these few bytes, must not stop the start that would
        // deliver the queue and free it.
        // The failure is kept for the caller to say.
        let pid_not_written = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .err();
        Ok(DirLock {
            _dir: dir_file,
            _file: file,
            pid_not_written,
        })
    }

    /// Why the lock file does not hold this process's ID (a full disk, say), if it does not:
    /// the lock holds all the same, and whoever finds it held is told the holder by the
    /// kernel.
    pub fn pid_not_written(&self) -> Option<&io::Error> {
        self.pid_not_written.as_ref()
    }
}

/// The process ID a lock file holds, if what it starts with is one: only its first few bytes
/// are read (the lock file may be anything, even a link to a device that never ends, such as
/// /dev/full or /dev/zero).
fn pid_in_lock_file(path: &Path) -> Option<u32> {
    let mut head = Vec::with_capacity(32);
    File::open(path)
        .and_then(|f| std::io::Read::read_to_end(&mut std::io::Read::take(f, 32), &mut head))
        .ok()?;
    std::str::from_utf8(&head).ok()?.trim().parse().ok()
}

/// The process that holds an exclusive `flock` on the file or directory at `path`, as the
/// kernel tells it in `/proc/locks`; `None` when no process in this PID namespace does.
pub fn flock_holder(path: &Path) -> io::Result<Option<u32>> {
    let meta = std::fs::metadata(path)?;
    let locks = std::fs::read_to_string("/proc/locks")?;
    let (dev, ino) = (meta.dev(), meta.ino());
    let holders = flock_holders(&locks, ino);
    let device = (rustix::fs::major(dev), rustix::fs::minor(dev));
    // /proc/locks gives the file system's device, which is the one `stat` gives except on
    // btrfs (a subvolume's own): there the holder is the process with the file open.
    Ok(holders
        .iter()
        .find(|(_, on)| *on == device)
        .or_else(|| holders.iter().find(|(pid, _)| has_open(*pid, dev, ino)))
        .map(|(pid, _)| *pid))
}

/// The processes holding an exclusive `flock` on a file with this inode, each with the device
/// (major, minor) the lock names, from the text of `/proc/locks` (`1: FLOCK  ADVISORY  WRITE
/// <pid> <maj>:<min>:<inode> 0 EOF`, major and minor in hex). Waiters (`->`), other kinds of
/// lock, and holders outside this PID namespace (shown as 0 or -1) are passed over.
fn flock_holders(locks: &str, inode: u64) -> Vec<(u32, (u32, u32))> {
    locks
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [_, "FLOCK", _, "WRITE", pid, file, ..] = fields.as_slice() else {
                return None;
            };
            let mut parts = file.split(':');
            let major = u32::from_str_radix(parts.next()?, 16).ok()?;
            let minor = u32::from_str_radix(parts.next()?, 16).ok()?;
            if parts.next()?.parse::<u64>().ok()? != inode {
                return None;
            }
            let pid = pid.parse::<u32>().ok().filter(|&p| p > 0)?;
            Some((pid, (major, minor)))
        })
        .collect()
}

/// Whether process `pid` has the file (device, inode) open (false where its descriptors
/// cannot be read: another user's process, to all but root).
fn has_open(pid: u32, dev: u64, ino: u64) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| std::fs::metadata(fd.path()).is_ok_and(|m| m.dev() == dev && m.ino() == ino))
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
    fn the_holder_is_named_from_the_kernel_not_from_a_stale_lock_file() {
        let dir = tempfile::tempdir().unwrap();
        let _first = DirLock::acquire(dir.path()).unwrap();
        // The lock file names a process other than the holder (left there, or written from
        // another PID namespace).
        std::fs::write(dir.path().join(LOCK_FILE), "4000000\n").unwrap();
        let text = DirLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(
            text.contains(&format!("(pid {})", std::process::id())),
            "{text}"
        );
        assert!(!text.contains("4000000"), "{text}");
    }

    #[test]
    fn the_lock_holder_is_found_by_its_file_and_nothing_else() {
        let locks = "1: POSIX  ADVISORY  WRITE 11 fe:00:77 0 EOF\n\
                     2: FLOCK  ADVISORY  READ 12 fe:00:77 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 13 fe:01:77 0 EOF\n\
                     3: -> FLOCK  ADVISORY  WRITE 14 fe:00:77 0 EOF\n\
                     4: FLOCK  ADVISORY  WRITE -1 fe:00:77 0 EOF\n\
                     4: FLOCK  ADVISORY  WRITE 0 fe:00:77 0 EOF\n\
                     5: FLOCK  ADVISORY  WRITE 15 fe:00:77 0 EOF\n";
        assert_eq!(flock_holders(locks, 77), [(13, (254, 1)), (15, (254, 0))]);
        assert!(flock_holders(locks, 78).is_empty());
        assert!(flock_holders("", 77).is_empty());
    }

    #[test]
    fn a_lock_file_that_cannot_be_written_still_locks() {
        // /dev/full fails every write with ENOSPC, as a full disk does.
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/dev/full", dir.path().join(LOCK_FILE)).unwrap();
        let held = DirLock::acquire(dir.path()).unwrap();
        // And says why the PID is not there.
        assert!(held.pid_not_written().is_some());
        let second = DirLock::acquire(dir.path()).err().unwrap();
        assert_eq!(second.kind(), io::ErrorKind::WouldBlock, "{second}");
        drop(held);
    }

    #[test]
    fn a_deleted_lock_file_does_not_let_a_second_hold_in() {
        let dir = tempfile::tempdir().unwrap();
        let _first = DirLock::acquire(dir.path()).unwrap();
        assert!(_first.pid_not_written().is_none());
        std::fs::remove_file(dir.path().join(LOCK_FILE)).unwrap();
        let err = DirLock::acquire(dir.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        assert!(
            err.to_string().contains("in use by another postern"),
            "{err}"
        );
    }

    #[test]
    fn a_lock_file_is_read_only_for_a_pid_at_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(LOCK_FILE);
        std::fs::write(&file, "4242\n").unwrap();
        assert_eq!(pid_in_lock_file(&file), Some(4242));
        std::fs::write(&file, "not a pid\n").unwrap();
        assert_eq!(pid_in_lock_file(&file), None);
        // A link to a device that never ends is read for a few bytes, not to its end (which
        // would take all memory).
        std::fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &file).unwrap();
        assert_eq!(pid_in_lock_file(&file), None);
    }
}
