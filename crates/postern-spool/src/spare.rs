//! Making the next segment ahead of time, off the core: creating a segment takes a file
//! creation, an `fallocate` and two `fsync`s, which no core should wait for.

use std::path::PathBuf;

use crate::segment::Segment;

/// The work of making the next segment: `Send`, to run on a helper thread; hand the result to
/// [`Spool::install_spare`](crate::Spool::install_spare).
#[derive(Debug)]
pub struct SpareJob {
    pub(crate) dir: PathBuf,
    pub(crate) core: u32,
    pub(crate) seq: u64,
    pub(crate) size: u64,
    /// The spool's reserve, which a spare (made for new mail) must leave free.
    pub(crate) reserve: u64,
}

/// A segment made by a [`SpareJob`], durable and ready to be written.
pub struct PreparedSegment(pub(crate) Segment);

impl std::fmt::Debug for PreparedSegment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PreparedSegment({})", self.0.seq)
    }
}

impl SpareJob {
    /// Creates, reserves and syncs the segment file and its directory (blocking).
    pub fn run(self) -> std::io::Result<PreparedSegment> {
        crate::spool::create_past_reserve(&self.dir, self.core, self.seq, self.size, self.reserve)
            .map(PreparedSegment)
    }
}
