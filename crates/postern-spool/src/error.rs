//! The spool's one error type.

use std::io;

/// What went wrong in the spool. Always a local fault; [`SpoolError::is_temporary`] tells the
/// session whether to answer 4xx (try again later) or treat it as fatal.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The disk is full (at segment creation): temporary, 452 4.3.1.
    #[error("spool disk full: {0}")]
    NoSpace(io::Error),
    /// Another I/O error (EIO, a failed sync): temporary for the client, 452 4.3.1.
    #[error("spool I/O error: {0}")]
    Io(#[from] io::Error),
    /// A record too large for any segment (raise the segment size).
    #[error("record of {0} bytes does not fit in a segment")]
    TooLarge(usize),
    /// The draft is unknown (already finished or aborted): a bug in the caller.
    #[error("no such draft")]
    UnknownDraft,
}

impl SpoolError {
    /// Whether the client may try again later (every case but a caller bug).
    pub fn is_temporary(&self) -> bool {
        !matches!(self, SpoolError::UnknownDraft)
    }

    pub(crate) fn from_io(e: io::Error) -> Self {
        if e.raw_os_error() == Some(28) || e.kind() == io::ErrorKind::StorageFull {
            SpoolError::NoSpace(e)
        } else {
            SpoolError::Io(e)
        }
    }
}
