//! Segment files: creation (reserved, header written, file and directory synced), the header,
//! and the write cursor.
//!
//! Records are not written through a writable mapping: small ones are gathered in memory and
//! go into the file with one `pwrite` per group commit (on the thread that runs the sync);
//! large body chunks go in with `pwrite` at once. A writable shared mapping would make every
//! `fdatasync` write-protect the pages it cleans, with a TLB shootdown across the CPUs each
//! time, and every fresh page would cost a page fault and a zeroing. Readers use the read-only
//! mapping, which shares the page cache with the writes. Ahead of small records the reserved
//! space is written with zeros a step at a time ([`Segment::zero_ahead`]), so that group
//! commits do not each convert unwritten extents.

use std::fs::{File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::format::{
    crc, record_len, write_record, Kind, HEADER, MAGIC, OLDEST_READ, RECORD_HEADER, VERSION,
};
use crate::map::ReadMap;

/// A segment being written.
pub(crate) struct Segment {
    pub(crate) seq: u64,
    pub(crate) salt: u32,
    pub(crate) file: Arc<File>,
    /// The read-only mapping body handles share.
    pub(crate) read: Arc<ReadMap>,
    pos: usize,
    /// The file is written (with records or zeros) up to here; beyond, its reserved space may
    /// still be unwritten extents.
    zeroed_to: usize,
    /// Records appended and not yet written to the file, which start at `pending_at`.
    pending: Vec<u8>,
    pending_at: usize,
}

/// How much file [`Segment::zero_ahead`] writes with zeros at a time.
pub(crate) const ZERO_STEP: usize = 256 * 1024;

/// How far past a small record's end the file is kept written (with zeros if need be).
pub(crate) const ZERO_LEAD: usize = 256 * 1024;

/// The zeros [`Segment::zero_ahead`] writes.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Whether the file system writes over a file's blocks in place, so that zeros written ahead
/// stay the blocks the records later go to. Copy-on-write file systems (btrfs, bcachefs, ZFS)
/// give every overwrite a new block: zeros there would only turn the reservation into data
/// that each record write then needs fresh space to replace, so segments on them get none.
fn overwrites_in_place(file: &File) -> bool {
    const COPY_ON_WRITE: [u64; 3] = [
        0x9123_683e, // btrfs
        0xca45_1a4e, // bcachefs
        0x2fc1_2fc1, // ZFS
    ];
    match rustix::fs::fstatfs(file) {
        #[allow(clippy::unnecessary_cast)]
        Ok(fs) => !COPY_ON_WRITE.contains(&(fs.f_type as u64)),
        Err(_) => false,
    }
}

/// Writes all of `bytes` at `offset`.
pub(crate) fn pwrite_all(file: &File, bytes: &[u8], offset: u64) -> io::Result<()> {
    write_all_at(
        |bytes, at| rustix::io::pwrite(file, bytes, at),
        bytes,
        offset,
    )
}

/// Writes all of `bytes` at `offset` with `write`, as `pwrite` would, again where it was
/// interrupted: a core's thread takes the watchdog's wake-up signal, which ends a write to a
/// slow (network or FUSE) file system early with `EINTR`, and that is no failed write.
fn write_all_at(
    mut write: impl FnMut(&[u8], u64) -> rustix::io::Result<usize>,
    mut bytes: &[u8],
    mut offset: u64,
) -> io::Result<()> {
    while !bytes.is_empty() {
        let n = match write(bytes, offset) {
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[n..];
        offset += n as u64;
    }
    Ok(())
}

/// `fallocate` over the whole of `file`, again where it was interrupted (see
/// [`write_all_at`]).
fn reserve(file: &File, size: u64) -> rustix::io::Result<()> {
    loop {
        match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, size) {
            Err(rustix::io::Errno::INTR) => continue,
            other => return other,
        }
    }
}

/// The file name of segment `seq`.
pub(crate) fn file_name(seq: u64) -> String {
    format!("{seq:010}.seg")
}

/// Whether a failed `link` says the file system has no hard links.
fn links_unsupported(e: &io::Error) -> bool {
    e.raw_os_error().is_some_and(|code| {
        [
            rustix::io::Errno::PERM,
            rustix::io::Errno::OPNOTSUPP,
            rustix::io::Errno::NOSYS,
            rustix::io::Errno::MLINK,
        ]
        .iter()
        .any(|errno| errno.raw_os_error() == code)
    })
}

/// The name a segment has while it is being made.
pub(crate) fn temp_name(seq: u64) -> String {
    format!(".{seq:010}.seg.new")
}

/// Whether a file name is that of a segment whose making was cut off.
pub(crate) fn is_temp_name(name: &str) -> bool {
    name.strip_prefix('.')
        .and_then(|n| n.strip_suffix(".seg.new"))
        .is_some_and(|n| n.parse::<u64>().is_ok())
}

/// The segment number of a file name, if it is one: exactly as [`file_name`] writes it, and a
/// number a spool can reach (draft numbers keep a segment's in their upper 32 bits). Another
/// name (`1.seg`, `+000000001.seg`, a number past 2^32) is no segment: a reclaim deletes
/// segments by the name it writes, and such a file would outlive the segments that settle it.
pub(crate) fn parse_name(name: &str) -> Option<u64> {
    let seq: u32 = name.strip_suffix(".seg")?.parse().ok()?;
    let seq = u64::from(seq);
    (file_name(seq) == name).then_some(seq)
}

/// Whether `path` (a symbolic link followed) is a regular file. A directory, a socket or a
/// dangling link with a segment's name holds no records: it is left alone, never read.
pub(crate) fn is_regular_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file())
}

/// Makes `dir` and any parents missing, open to this user only: a spool holds mail, which
/// other local users must not read, whatever the umask (Postfix keeps its queue so too).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    // The directories made here are each synced into their parent: the files synced in them
    // later are durable only with the path to them.
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|a| !a.as_os_str().is_empty() && !a.exists())
        .collect();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)?;
    for made in missing.iter().rev() {
        match made.parent() {
            Some(p) if !p.as_os_str().is_empty() => sync_dir(p)?,
            _ => sync_dir(Path::new("."))?,
        }
    }
    Ok(())
}

/// Takes group and other access away from `dir` where it has any. Best effort: a directory
/// this user may not change keeps its mode (the spool still works; only its privacy is the
/// owner's to set).
pub(crate) fn make_private(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(dir) else {
        return;
    };
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o700));
    }
}

/// Spool directories: `rwx------`.
pub(crate) const PRIVATE_DIR_MODE: u32 = 0o700;

/// Spool files (segments, the lock, the journal): `rw-------`.
pub(crate) const PRIVATE_FILE_MODE: u32 = 0o600;

/// Syncs a directory, so that a new entry in it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A fresh random salt: `RandomState` is seeded from the OS's randomness.
fn new_salt(seq: u64) -> u32 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(seq);
    let v = h.finish();
    (v ^ (v >> 32)) as u32
}

/// What the first bytes of a segment file say.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Header {
    /// A segment of this format, with its salt and the size reserved when it was made (0 in
    /// segments made before the size was recorded).
    Valid { salt: u32, size: u64 },
    /// Nothing but zeros: a segment whose creation was cut off by an earlier version, which
    /// made segments under their final name. (Zeros over a header with anything behind it are
    /// damage: the records behind it are not given up.)
    Blank,
    /// Something else: not ours, or damaged (a segment file is never shorter than its header,
    /// since it gets its name only once made).
    Bad,
    /// Our magic with a later format version: written by a newer postern. Not damage: what
    /// it holds is kept for that version to read.
    Newer(u32),
}

/// How far past this build's format a version word is taken for a newer postern's rather
/// than for damage.
const NEWER_VERSIONS: u32 = 16;

/// Whether `data` holds only zero bytes (eight at a time where it can).
fn all_zero(data: &[u8]) -> bool {
    let (words, rest) = data.split_at(data.len() - data.len() % 8);
    words
        .chunks_exact(8)
        .all(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0)
        && rest.iter().all(|&b| b == 0)
}

/// Reads a segment header, from the whole segment (or, to rule Blank out, its first bytes).
pub(crate) fn header(data: &[u8]) -> Header {
    let Some(h) = data.get(..HEADER) else {
        return Header::Bad;
    };
    if h.iter().all(|&b| b == 0) {
        if all_zero(&data[HEADER..]) {
            Header::Blank
        } else {
            Header::Bad
        }
    } else if &h[..8] == MAGIC
        && (OLDEST_READ..=VERSION).contains(&u32::from_le_bytes([h[8], h[9], h[10], h[11]]))
    {
        Header::Valid {
            salt: u32::from_le_bytes([h[24], h[25], h[26], h[27]]),
            size: u64::from_le_bytes([h[28], h[29], h[30], h[31], h[32], h[33], h[34], h[35]]),
        }
    } else if &h[..8] == MAGIC {
        // Only a version a few steps ahead: a damaged word (a flipped high bit) is damage.
        match u32::from_le_bytes([h[8], h[9], h[10], h[11]]) {
            found if found > VERSION && found <= VERSION + NEWER_VERSIONS => Header::Newer(found),
            _ => Header::Bad,
        }
    } else {
        Header::Bad
    }
}

/// Where a full segment's header says its records end, once every one of them is durable:
/// the end offset (u64) at 36, and at 44 a CRC of it under the segment's salt, so that damage
/// there is not believed. Zeros (no seal) in segments still being written, in those that a
/// crash or a failed sync left, and in those of earlier versions.
///
/// The segment being written keeps a *mark* in the same place (a CRC under another tag):
/// where its records were known durable, at most about a second behind (see
/// [`mark_bytes`]). A seal, once written, replaces it.
pub(crate) const SEAL_AT: usize = 36;
const SEAL_LEN: usize = 12;

/// The CRC of an end offset in the seal's place, under the segment's salt and a tag that
/// tells a seal from a mark.
fn end_crc(salt: u32, tag: &[u8; 4], end: u64) -> u32 {
    let mut bytes = [0u8; 16];
    bytes[..4].copy_from_slice(&salt.to_le_bytes());
    bytes[4..8].copy_from_slice(tag);
    bytes[8..].copy_from_slice(&end.to_le_bytes());
    crc32c::crc32c(&bytes)
}

pub(crate) fn seal_crc(salt: u32, end: u64) -> u32 {
    end_crc(salt, b"seal", end)
}

fn end_bytes(salt: u32, tag: &[u8; 4], end: u64) -> [u8; SEAL_LEN] {
    let mut bytes = [0u8; SEAL_LEN];
    bytes[..8].copy_from_slice(&end.to_le_bytes());
    bytes[8..].copy_from_slice(&end_crc(salt, tag, end).to_le_bytes());
    bytes
}

/// Seals a full segment: its records end at `end`, and all of them are durable. Recovery
/// then knows that a zero length word before `end` is damage, not the end of the data.
pub(crate) fn write_seal(file: &File, salt: u32, end: u64) -> io::Result<()> {
    pwrite_all(file, &end_bytes(salt, b"seal", end), SEAL_AT as u64)
}

/// The mark of a segment still being written, for its place at [`SEAL_AT`]: every record
/// before `end` was durable when it was written. Recovery then knows that a zero length word
/// before `end` is damage, not what a crash leaves at the end of the data: a crash loses only
/// what was written after the last sync, and the mark never claims that.
pub(crate) fn mark_bytes(salt: u32, end: u64) -> [u8; SEAL_LEN] {
    end_bytes(salt, b"mark", end)
}

/// The end in the seal's place under `tag`, when its CRC holds.
fn end_in_header(data: &[u8], salt: u32, tag: &[u8; 4]) -> Option<usize> {
    let seal = data.get(SEAL_AT..SEAL_AT + SEAL_LEN)?;
    let end = u64::from_le_bytes(seal[..8].try_into().ok()?);
    let crc = u32::from_le_bytes(seal[8..].try_into().ok()?);
    (end != 0 && crc == end_crc(salt, tag, end))
        .then(|| usize::try_from(end).ok())
        .flatten()
}

/// The end of the records a sealed segment holds, from its header (see [`write_seal`]).
pub(crate) fn sealed_end(data: &[u8], salt: u32) -> Option<usize> {
    end_in_header(data, salt, b"seal")
}

/// How far an unsealed segment's records were durable, from its header (see [`mark_bytes`]).
pub(crate) fn marked_end(data: &[u8], salt: u32) -> Option<usize> {
    end_in_header(data, salt, b"mark")
}

/// Writes `size` bytes of zeros from the start of `file`.
fn fill_with_zeros(file: &File, size: u64) -> io::Result<()> {
    let mut at = 0u64;
    while at < size {
        let n = (size - at).min(ZEROS.len() as u64) as usize;
        pwrite_all(file, &ZEROS[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

impl Segment {
    /// Creates segment `seq` of `size` bytes in `dir`, durable before it returns: file created,
    /// space reserved, header written, file synced, directory synced.
    pub(crate) fn create(dir: &Path, core: u32, seq: u64, size: u64) -> io::Result<Segment> {
        if seq > u64::from(u32::MAX) {
            // Its name would not be read as a segment's (see `parse_name`).
            return Err(io::Error::other(format!(
                "segment numbers are used up in {}",
                dir.display()
            )));
        }
        // Made under a temporary name and linked to its own only once reserved, headed and
        // synced: a segment file with a segment's name is never shorter than its header, so
        // recovery can tell a file cut short by damage from one whose creation was cut off.
        let path: PathBuf = dir.join(file_name(seq));
        let tmp: PathBuf = dir.join(temp_name(seq));
        let _ = std::fs::remove_file(&tmp);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(PRIVATE_FILE_MODE)
            .open(&tmp)?;
        let salt = new_salt(seq);
        let mut filled = false;
        let mut linked = false;
        let made = (|| {
            match reserve(&file, size) {
                Ok(()) => {}
                // A file system without fallocate (ext2, some network ones): the space is
                // reserved by writing it, once (off the core when this is the spare made
                // ahead; inline only when no spare was ready).
                Err(rustix::io::Errno::OPNOTSUPP) => {
                    fill_with_zeros(&file, size)?;
                    filled = true;
                }
                Err(e) => return Err(e.into()),
            }
            let mut head = [0u8; 36];
            head[..8].copy_from_slice(MAGIC);
            head[8..12].copy_from_slice(&VERSION.to_le_bytes());
            head[12..16].copy_from_slice(&core.to_le_bytes());
            head[16..24].copy_from_slice(&seq.to_le_bytes());
            head[24..28].copy_from_slice(&salt.to_le_bytes());
            head[28..36].copy_from_slice(&size.to_le_bytes());
            pwrite_all(&file, &head, 0)?;
            file.sync_all()?;
            // A link, not a rename: it never replaces a file already under that name. Where
            // the file system has no links (vfat, some network and FUSE mounts), a rename
            // once the name is known to be free (one process per spool, and only its core
            // makes this core's segments).
            match std::fs::hard_link(&tmp, &path) {
                Ok(()) => {
                    linked = true;
                    std::fs::remove_file(&tmp)?;
                }
                Err(e) if links_unsupported(&e) => {
                    if path.exists() {
                        return Err(io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            format!("{} exists", path.display()),
                        ));
                    }
                    std::fs::rename(&tmp, &path)?;
                    linked = true;
                }
                Err(e) => return Err(e),
            }
            sync_dir(dir)?;
            ReadMap::new(&file)
        })();
        let in_place = overwrites_in_place(&file);
        match made {
            Ok(read) => Ok(Segment {
                seq,
                salt,
                file: Arc::new(file),
                read: Arc::new(read),
                pos: HEADER,
                zeroed_to: if in_place && !filled {
                    HEADER
                } else {
                    size as usize
                },
                pending: Vec::new(),
                pending_at: HEADER,
            }),
            Err(e) => {
                // Leave no half-made segment behind for recovery to puzzle over.
                let _ = std::fs::remove_file(&tmp);
                if linked {
                    let _ = std::fs::remove_file(&path);
                }
                Err(e)
            }
        }
    }

    /// Bytes left for records.
    pub(crate) fn room(&self) -> usize {
        self.read.len() - self.pos
    }

    /// Where the records appended so far end.
    pub(crate) fn end(&self) -> usize {
        self.pos
    }

    /// The records appended since the last call, with the file offset they go to; None when
    /// there are none. Written by whoever runs the next sync, before it syncs.
    pub(crate) fn take_pending(&mut self) -> Option<(u64, Vec<u8>)> {
        if self.pending.is_empty() {
            return None;
        }
        let at = self.pending_at as u64;
        self.pending_at = self.pos;
        Some((at, std::mem::take(&mut self.pending)))
    }

    /// Before a small record of `len` bytes goes in at the cursor: makes sure the file is
    /// written with zeros at least [`ZERO_LEAD`] past its end, [`ZERO_STEP`] at a time.
    ///
    /// Why: `fallocate` reserves the segment as unwritten extents, and the first write into an
    /// unwritten extent makes the next `fdatasync` also convert it, a metadata write (on a
    /// journalled file system, a journal commit) on top of the data: three times the sync's
    /// time on ext4 with a journal. Zeros written a little ahead turn the extents into written
    /// ones once per step instead of once per group commit. Only small records ask for it:
    /// large body chunks write their own data, and zeroing ahead of them would double the
    /// bytes written. Best effort: a failed write of zeros is left for the record's own write
    /// to report.
    ///
    /// The zeros start at the cursor or beyond, where nothing has been appended: gathered
    /// records all lie before the cursor, so no later write of theirs overlaps.
    pub(crate) fn zero_ahead(&mut self, len: usize) {
        let end = self.read.len();
        let want = (self.pos + len + ZERO_LEAD).min(end);
        if want <= self.zeroed_to {
            return;
        }
        let from = self.zeroed_to.max(self.pos);
        let to = (from + ZERO_STEP).max(want).min(end);
        let mut at = from;
        while at < to {
            let n = (to - at).min(ZEROS.len());
            if pwrite_all(&self.file, &ZEROS[..n], at as u64).is_err() {
                break;
            }
            at += n;
        }
        self.zeroed_to = to;
    }

    /// Bytes appended and not yet written to the file.
    pub(crate) fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// The file's size (what it takes on disk: all of it is reserved).
    pub(crate) fn size(&self) -> u64 {
        self.read.len() as u64
    }

    /// Appends a record made of `pieces` to the pending bytes; returns where its payload
    /// starts. The caller has checked that it fits.
    pub(crate) fn append(&mut self, kind: Kind, pieces: &[&[u8]]) -> usize {
        let start = self.pos;
        if self.pending.is_empty() {
            self.pending_at = start;
        }
        let total = record_len(pieces.iter().map(|p| p.len()).sum());
        let from = self.pending.len();
        self.pending.resize(from + total, 0);
        write_record(&mut self.pending[from..], self.salt, kind, pieces);
        self.pos += total;
        start + RECORD_HEADER
    }

    /// Writes a record whose payload is `head` then `bulk` into the file at once: the pending
    /// records before it, then `bulk` (whole pages, no copy into a buffer), then the record's
    /// header, length word included, last. Returns where the payload starts. On an error
    /// nothing is committed (the length word stays zero) and the caller abandons the segment.
    pub(crate) fn append_bulk(
        &mut self,
        kind: Kind,
        head: &[u8],
        bulk: &[u8],
    ) -> io::Result<usize> {
        if let Some((at, bytes)) = self.take_pending() {
            pwrite_all(&self.file, &bytes, at)?;
        }
        let payload = head.len() + bulk.len();
        let total = record_len(payload);
        let start = self.pos;
        let bulk_at = start + RECORD_HEADER + head.len();
        pwrite_all(&self.file, bulk, bulk_at as u64)?;
        // The padding after the payload is never written: reserved space reads as zeros, and
        // segments are never reused.
        let mut rec = vec![0u8; RECORD_HEADER + head.len()];
        rec[RECORD_HEADER..].copy_from_slice(head);
        rec[4..8].copy_from_slice(&crc(self.salt, kind, &[head, bulk]).to_le_bytes());
        rec[8] = kind as u8;
        rec[0..4].copy_from_slice(&(payload as u32).to_le_bytes());
        // The length word last: a record without it reads as the end of the data.
        pwrite_all(&self.file, &rec[4..], (start + 4) as u64)?;
        pwrite_all(&self.file, &rec[..4], start as u64)?;
        self.pos += total;
        self.pending_at = self.pos;
        Ok(start + RECORD_HEADER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the file has data at or after `at` (SEEK_DATA), None past the last data.
    fn data_from(file: &File, at: u64) -> Option<u64> {
        rustix::fs::seek(file, rustix::fs::SeekFrom::Data(at)).ok()
    }

    /// An interrupted write (`EINTR`, the watchdog's signal on a slow file system) is made
    /// again, and a short one goes on from where it stopped; another error is the write's.
    #[test]
    fn an_interrupted_write_is_made_again_not_failed() {
        let mut file = [0u8; 16];
        let mut calls = Vec::new();
        let written = write_all_at(
            |bytes, at| {
                calls.push((bytes.len(), at));
                match calls.len() {
                    1 | 3 => Err(rustix::io::Errno::INTR),
                    // Short: two octets.
                    2 => {
                        file[at as usize..at as usize + 2].copy_from_slice(&bytes[..2]);
                        Ok(2)
                    }
                    _ => {
                        file[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
                        Ok(bytes.len())
                    }
                }
            },
            b"abcdef",
            4,
        );
        assert!(written.is_ok(), "{written:?}");
        assert_eq!(&file[4..10], b"abcdef");
        assert_eq!(calls, [(6, 4), (6, 4), (4, 6), (4, 6)]);
        let failed = write_all_at(|_, _| Err(rustix::io::Errno::IO), b"x", 0);
        let eio = rustix::io::Errno::IO.raw_os_error();
        assert_eq!(failed.map_err(|e| e.raw_os_error()), Err(Some(eio)));
    }

    #[test]
    fn small_records_keep_the_file_written_a_little_ahead_and_no_further() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let size = 8 * 1024 * 1024;
        let mut seg = Segment::create(dir.path(), 0, 1, size).unwrap_or_else(|e| panic!("{e}"));
        if !overwrites_in_place(&seg.file) {
            assert_eq!(seg.zeroed_to, size as usize, "no zeros on copy-on-write");
            eprintln!("a copy-on-write file system: no zeros ahead to check");
            return;
        }
        let lead = (HEADER + 100 + ZERO_LEAD) as u64;
        seg.zero_ahead(100);
        assert_eq!(seg.zeroed_to, HEADER + ZERO_STEP.max(100 + ZERO_LEAD));
        // A step more once the lead runs short, then nothing while it holds.
        let first = seg.zeroed_to;
        seg.append(Kind::Body, &[&[7u8; 100]]);
        seg.zero_ahead(100);
        assert_eq!(seg.zeroed_to, first + ZERO_STEP);
        seg.append(Kind::Body, &[&[7u8; 100]]);
        seg.zero_ahead(100);
        assert_eq!(seg.zeroed_to, first + ZERO_STEP);
        seg.pos = seg.zeroed_to - 10;
        let before = seg.zeroed_to;
        seg.zero_ahead(100);
        assert_eq!(
            seg.zeroed_to,
            (before + ZERO_STEP).max(before - 10 + 100 + ZERO_LEAD)
        );
        // Past a large record (its own data), zeros start from the cursor, never behind it.
        seg.pos = 6 * 1024 * 1024;
        seg.zero_ahead(100);
        assert_eq!(seg.zeroed_to, seg.pos + ZERO_STEP.max(100 + ZERO_LEAD));
        // Never past the end of the file.
        seg.pos = size as usize - 1000;
        seg.zero_ahead(100);
        assert_eq!(seg.zeroed_to, size as usize);
        // On a file system that reports reserved, unwritten space as a hole (ext4, XFS), the
        // zeros are written data and the space well past them is not.
        let fresh = Segment::create(dir.path(), 0, 2, size).unwrap_or_else(|e| panic!("{e}"));
        if data_from(&fresh.file, HEADER as u64 + 4096) == Some(HEADER as u64 + 4096) {
            eprintln!("this file system reports reserved space as data: extents not checked");
            return;
        }
        let mut seg = fresh;
        seg.zero_ahead(100);
        assert_eq!(data_from(&seg.file, lead - 4096), Some(lead - 4096));
        let far = 4 * 1024 * 1024;
        assert_ne!(
            data_from(&seg.file, far),
            Some(far),
            "zeroed no further than asked"
        );
    }

    #[test]
    fn headers_are_valid_blank_or_bad() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let seg = Segment::create(dir.path(), 3, 7, 64 * 1024).unwrap_or_else(|e| panic!("{e}"));
        let data = std::fs::read(dir.path().join(file_name(7))).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            header(&data),
            Header::Valid {
                salt: seg.salt,
                size: 64 * 1024
            }
        );
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap_or_else(|e| panic!("{e}"))
            .map(|e| {
                e.unwrap_or_else(|e| panic!("{e}"))
                    .file_name()
                    .to_string_lossy()
                    .into()
            })
            .collect();
        assert_eq!(names, [file_name(7)], "no temporary name left behind");
        assert!(is_temp_name(&temp_name(7)) && !is_temp_name(&file_name(7)));
        assert_eq!(parse_name(&temp_name(7)), None);
        // Only names as segments get them.
        assert_eq!(parse_name("0000000007.seg"), Some(7));
        assert_eq!(
            parse_name(&file_name(u64::from(u32::MAX))),
            Some(u64::from(u32::MAX))
        );
        for odd in [
            "7.seg",
            "+000000007.seg",
            "00000000007.seg",
            "18446744073709551615.seg",
        ] {
            assert_eq!(parse_name(odd), None, "{odd}");
        }
        // A file cut short is never a creation cut off: segments get their name once made.
        assert_eq!(header(&[]), Header::Bad);
        assert_eq!(header(&[0u8; 10]), Header::Bad);
        assert_eq!(header(&[0u8; 4096]), Header::Blank);
        let mut zeroed_header = data.clone();
        zeroed_header[..HEADER].fill(0);
        assert_eq!(
            header(&zeroed_header),
            Header::Blank,
            "no record yet behind the zeros"
        );
        let mut written = vec![0u8; 4096];
        written[HEADER] = 24;
        assert_eq!(
            header(&written),
            Header::Bad,
            "records behind a zeroed header"
        );
        // Zeros over the whole first page, records further on.
        let mut paged = vec![0u8; 3 * 4096 + 5];
        paged[2 * 4096 + 17] = 1;
        assert_eq!(header(&paged), Header::Bad, "a record past a zeroed page");
        paged[2 * 4096 + 17] = 0;
        paged[3 * 4096 + 4] = 1;
        assert_eq!(
            header(&paged),
            Header::Bad,
            "a byte in the last, short word"
        );
        let mut bad = data[..HEADER].to_vec();
        bad[9] = 9;
        assert_eq!(header(&bad), Header::Bad);
        let mut newer = bad.clone();
        newer[..8].copy_from_slice(MAGIC);
        newer[8..12].copy_from_slice(&9u32.to_le_bytes());
        assert_eq!(header(&newer), Header::Newer(9));
        newer[8..12].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(header(&newer), Header::Bad);
        newer[8..12].copy_from_slice(&(VERSION + NEWER_VERSIONS + 1).to_le_bytes());
        assert_eq!(
            header(&newer),
            Header::Bad,
            "past any plausible version: damage"
        );
        assert_ne!(new_salt(1), new_salt(1), "salts are drawn, not derived");
    }
}
