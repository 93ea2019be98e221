//! Segment files: creation (reserved, header written, file and directory synced) and the
//! write cursor into the mapping.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::MmapMut;

use crate::format::{crc, record_len, Kind, HEADER, MAGIC, RECORD_HEADER, VERSION};
use crate::map;

/// A segment being written.
pub(crate) struct Segment {
    pub(crate) seq: u64,
    pub(crate) file: Arc<File>,
    map: MmapMut,
    pos: usize,
}

/// The file name of segment `seq`.
pub(crate) fn file_name(seq: u64) -> String {
    format!("{seq:010}.seg")
}

/// The segment number of a file name, if it is one.
pub(crate) fn parse_name(name: &str) -> Option<u64> {
    name.strip_suffix(".seg")?.parse().ok()
}

/// Syncs a directory, so that a new entry in it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Segment {
    /// Creates segment `seq` of `size` bytes in `dir`, durable before it returns.
    pub(crate) fn create(dir: &Path, core: u32, seq: u64, size: u64) -> io::Result<Segment> {
        let path: PathBuf = dir.join(file_name(seq));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let made = (|| {
            rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, size)?;
            let mut map = map::map_mut(&file)?;
            map[..8].copy_from_slice(MAGIC);
            map[8..12].copy_from_slice(&VERSION.to_le_bytes());
            map[12..16].copy_from_slice(&core.to_le_bytes());
            map[16..24].copy_from_slice(&seq.to_le_bytes());
            file.sync_all()?;
            sync_dir(dir)?;
            Ok::<_, io::Error>(map)
        })();
        match made {
            Ok(map) => Ok(Segment {
                seq,
                file: Arc::new(file),
                map,
                pos: HEADER,
            }),
            Err(e) => {
                // Leave no half-made segment behind for recovery to puzzle over.
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// Bytes left for records.
    pub(crate) fn room(&self) -> usize {
        self.map.len() - self.pos
    }

    /// Bytes used, header included.
    pub(crate) fn used(&self) -> usize {
        self.pos
    }

    /// The space for the next record; `commit(n)` after writing `n` bytes into it.
    pub(crate) fn tail(&mut self) -> &mut [u8] {
        &mut self.map[self.pos..]
    }

    pub(crate) fn commit(&mut self, n: usize) {
        self.pos += n;
    }

    /// Writes a record whose payload is `head` then `bulk`, putting `bulk` into the file with
    /// `pwrite` rather than through the mapping: whole pages written that way need no page
    /// fault and no zeroing, which copying into fresh mapped pages costs (docs/benchmarks.md).
    /// The page cache is shared, so the mapping sees the bytes; the header, with the length
    /// word last, still goes through the mapping afterwards.
    pub(crate) fn append_bulk(
        &mut self,
        kind: Kind,
        head: &[u8],
        bulk: &[u8],
    ) -> std::io::Result<()> {
        let payload = head.len() + bulk.len();
        let total = record_len(payload);
        let start = self.pos;
        let bulk_at = start + RECORD_HEADER + head.len();
        let mut written = 0;
        while written < bulk.len() {
            written +=
                rustix::io::pwrite(&*self.file, &bulk[written..], (bulk_at + written) as u64)?;
        }
        let rec = &mut self.map[start..start + total];
        rec[RECORD_HEADER..RECORD_HEADER + head.len()].copy_from_slice(head);
        rec[RECORD_HEADER + payload..].fill(0);
        rec[4..8].copy_from_slice(&crc(kind, &[head, bulk]).to_le_bytes());
        rec[8] = kind as u8;
        rec[9..12].fill(0);
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
        rec[0..4].copy_from_slice(&(payload as u32).to_le_bytes());
        self.pos += total;
        Ok(())
    }
}

/// Whether `data` starts with a segment header.
pub(crate) fn header_ok(data: &[u8]) -> bool {
    data.len() >= HEADER && &data[..8] == MAGIC && data[8..12] == VERSION.to_le_bytes()
}
