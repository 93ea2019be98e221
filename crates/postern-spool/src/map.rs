//! Memory maps of segment files: the only `unsafe` of the spool.
//!
//! A segment is written with `pwrite` (records gathered in memory, large body chunks at once)
//! and read through one shared read-only mapping ([`ReadMap`]) from which bodies are handed
//! out, on any thread: a `MAP_SHARED` view of the same page cache the writes go to. What keeps
//! the reads sound is the spool's discipline, stated once here: a byte range is handed out for
//! reading only after the `pwrite` that wrote it returned (a finished message's body only
//! through `Spool::body`, once the sync that writes and syncs its records has completed), and the spool never writes it
//! again, never truncates a segment and never recycles one (it deletes; an unlinked file stays
//! valid for whoever still maps it). The one reader outside that discipline is `postern
//! queue`, which scans a live spool: the bytes it may see changing are only those of records
//! being appended, and the scan treats every byte as untrusted (lengths bounds-checked, CRC
//! checked) before it uses one.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;

use memmap2::{MmapOptions, MmapRaw};

/// A read-only mapping of a whole segment, shared by every body handle into it.
#[derive(Debug)]
pub(crate) struct ReadMap(MmapRaw);

impl ReadMap {
    /// Maps `file` read-only.
    pub(crate) fn new(file: &File) -> io::Result<ReadMap> {
        // A raw mapping hands out only a pointer: references are made in `range`, and only
        // over bytes that are no longer written.
        MmapOptions::new().map_raw_read_only(file).map(ReadMap)
    }

    /// An anonymous read-only mapping holding `bytes` (a body made in memory, see
    /// [`crate::MessageRef::from_bytes`]).
    pub(crate) fn holding(bytes: &[u8]) -> io::Result<ReadMap> {
        let mut map = MmapOptions::new().len(bytes.len().max(1)).map_anon()?;
        map[..bytes.len()].copy_from_slice(bytes);
        Ok(ReadMap(MmapRaw::from(map.make_read_only()?)))
    }

    /// The mapping's length.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// The bytes `start..end`, which must have been written completely and never be written
    /// again (records before the write cursor; a whole segment at recovery, when no writer
    /// runs). Panics when the range is out of bounds.
    pub(crate) fn range(&self, start: usize, end: usize) -> &[u8] {
        assert!(start <= end && end <= self.0.len(), "range outside the map");
        // SAFETY: the range is inside the mapping (checked above), the mapping lives as long
        // as `self`, and by the spool's discipline (module comment) nothing writes these bytes
        // while the returned borrow lives. The slice is built from the raw pointer rather than
        // so that no reference ever covers the part of the segment still being written.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().add(start), end - start) }
    }
}
