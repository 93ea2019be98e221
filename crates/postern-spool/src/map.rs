//! Memory maps of segment files: the only `unsafe` of the spool.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;

use memmap2::{Mmap, MmapMut};

/// Maps a segment for writing.
pub(crate) fn map_mut(file: &File) -> io::Result<MmapMut> {
    // SAFETY: the file is a segment this process created and reserved with fallocate; the
    // spool never truncates a mapped segment, and other processes are not expected to change
    // files under the spool directory (docs/durability.md). Writes go only through this
    // mapping, by the one core that owns the segment.
    unsafe { MmapMut::map_mut(file) }
}

/// Maps a segment for reading (recovery).
pub(crate) fn map(file: &File) -> io::Result<Mmap> {
    // SAFETY: as above; recovery maps segments read-only while no writer is running.
    unsafe { Mmap::map(file) }
}
