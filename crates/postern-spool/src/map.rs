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

    /// Maps `file` read-only up to its first octet that cannot be read, found by reading the
    /// file through first (recovery's maps): a page the disk cannot give back (a media error)
    /// raises `SIGBUS` when touched through a mapping, which ends the process, and at every
    /// start again. A read error shows instead. With the map comes where the read failed and
    /// why, if it did.
    ///
    /// A file read to its end is mapped (the read went through the page cache that the
    /// mapping then finds filled). One that failed is not: what could be read before the
    /// error is copied into memory and served from there, since a page cache that keeps
    /// large folios may fault a good page back in with its bad neighbour, and a short read
    /// may end inside a page; a damaged segment is rare, and no larger than a segment.
    pub(crate) fn readable(file: &File) -> io::Result<(ReadMap, Option<(u64, io::Error)>)> {
        use std::os::unix::fs::FileExt;
        /// How much is read at a time; a failed read is gone over again a page at a time.
        const CHUNK: usize = 1 << 20;
        const PAGE: usize = 4096;
        let len = file.metadata()?.len();
        let mut buf = vec![0u8; CHUNK.min(usize::try_from(len).unwrap_or(CHUNK)).max(PAGE)];
        let mut at = 0u64;
        let mut failed = None;
        'read: while at < len {
            let want = buf
                .len()
                .min(usize::try_from(len - at).unwrap_or(usize::MAX));
            match file.read_at(&mut buf[..want], at) {
                // Shorter now than its length was: the map ends where the file does.
                Ok(0) => break,
                Ok(n) => at += n as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // Where in this stretch: the pages before the bad one are read. (Should
                    // the error not come again, the rest is read a page at a time.)
                    let why = loop {
                        let want = PAGE.min(usize::try_from(len - at).unwrap_or(PAGE));
                        match file.read_at(&mut buf[..want], at) {
                            Ok(0) => break 'read,
                            Ok(n) => at += n as u64,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => break e,
                        }
                        if at >= len {
                            break 'read;
                        }
                    };
                    failed = Some((at, why));
                    break;
                }
            }
        }
        let map_len = usize::try_from(at).map_err(io::Error::other)?;
        let map_file = |len: usize| {
            MmapOptions::new()
                .len(len)
                .map_raw_read_only(file)
                .map(ReadMap)
        };
        let Some((_, why)) = failed else {
            return Ok((map_file(map_len)?, None));
        };
        // Read again into memory (from the page cache, as just read); should it fail now, the
        // copy ends there.
        let mut copy = vec![0u8; map_len];
        let mut got = 0;
        while got < map_len {
            match file.read_at(&mut copy[got..], got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        copy.truncate(got);
        // Nothing read: a map of nothing (an anonymous one holds at least an octet).
        let map = if got == 0 {
            map_file(0)?
        } else {
            ReadMap::holding(&copy)?
        };
        Ok((map, Some((got as u64, why))))
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
