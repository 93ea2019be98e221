//! The spool's one error type.

use std::io;

/// What went wrong in the spool. Always a local fault (never the peer's, never the next
/// hop's); [`SpoolError::is_temporary`] tells the session whether to answer `452`/`451` (try
/// again later) or to treat it as a bug.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// No room for a new segment (`ENOSPC`, `EDQUOT`, or `EFBIG` under `RLIMIT_FSIZE`), met
    /// when a segment is created. Temporary: appends work again once space returns.
    #[error("spool disk full: {0}")]
    NoSpace(io::Error),
    /// Another I/O error (`EIO` on a write, creating a directory or a segment). Temporary for
    /// the client; the segment being written is abandoned, later appends go to a new one.
    #[error("spool I/O error: {0}")]
    Io(#[from] io::Error),
    /// A sync that covered records of this message failed, so the message is not durable and
    /// was not stored; the client must send it again. Temporary.
    #[error("spool sync failed: {0}")]
    SyncFailed(String),
    /// A record larger than a segment can hold (an envelope over the segment size): raise the
    /// segment size. Body bytes never cause it; they are split into chunks.
    #[error("record of {0} bytes does not fit in a segment")]
    TooLarge(usize),
    /// The draft belongs to another spool (another core, or an earlier opening): a bug in the
    /// caller, not temporary.
    #[error("draft not of this spool")]
    UnknownDraft,
    /// A segment in a format this build cannot read, written by a newer postern (a
    /// downgrade): the spool is left untouched, for that version. Not temporary.
    #[error(
        "{}: written by a newer postern (spool format {found}; this one reads format {supported}): \
         run that version on this spool",
        path.display()
    )]
    NewerFormat {
        /// The segment file.
        path: std::path::PathBuf,
        /// Its format version.
        found: u32,
        /// The format this build reads and writes.
        supported: u32,
    },
}

impl SpoolError {
    /// Whether the client may try again later (`452 4.3.1` or `451 4.3.0`): every case but a caller bug and
    /// a spool of a newer format (both met before any client).
    pub fn is_temporary(&self) -> bool {
        !matches!(
            self,
            SpoolError::UnknownDraft | SpoolError::NewerFormat { .. }
        )
    }

    /// Sorts an I/O error into "out of space" and the rest.
    /// [`SpoolError::from_io`] for an error about `path`, which the message names.
    pub(crate) fn at(path: &std::path::Path) -> impl Fn(io::Error) -> SpoolError + '_ {
        move |e| {
            let named = io::Error::new(e.kind(), format!("{}: {e}", path.display()));
            match SpoolError::from_io(e) {
                SpoolError::NoSpace(_) => SpoolError::NoSpace(named),
                _ => SpoolError::Io(named),
            }
        }
    }

    pub(crate) fn from_io(e: io::Error) -> Self {
        let no_space = matches!(
            e.raw_os_error(),
            Some(code) if code == libc_codes::ENOSPC
                || code == libc_codes::EDQUOT
                || code == libc_codes::EFBIG
        ) || matches!(
            e.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge
        );
        if no_space {
            SpoolError::NoSpace(e)
        } else {
            SpoolError::Io(e)
        }
    }
}

/// The errno values the spool sorts on (Linux).
mod libc_codes {
    pub(super) const EFBIG: i32 = rustix::io::Errno::FBIG.raw_os_error();
    pub(super) const ENOSPC: i32 = rustix::io::Errno::NOSPC.raw_os_error();
    pub(super) const EDQUOT: i32 = rustix::io::Errno::DQUOT.raw_os_error();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_space_codes_are_no_space_and_temporary() {
        for code in [libc_codes::ENOSPC, libc_codes::EDQUOT, libc_codes::EFBIG] {
            let e = SpoolError::from_io(io::Error::from_raw_os_error(code));
            assert!(matches!(e, SpoolError::NoSpace(_)), "{e}");
            assert!(e.is_temporary());
        }
        let eio = SpoolError::from_io(io::Error::from_raw_os_error(5));
        assert!(matches!(eio, SpoolError::Io(_)) && eio.is_temporary());
        assert!(!SpoolError::UnknownDraft.is_temporary());
    }
}
