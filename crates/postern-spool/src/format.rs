//! The record format: `length u32 | crc32c u32 | kind u8 | 3 zero bytes | payload`, 8-byte
//! aligned, CRC over the segment's salt, the kind and the payload (docs/durability.md).

/// Segment header size; records start here.
pub(crate) const HEADER: usize = 64;
/// Segment magic.
pub(crate) const MAGIC: &[u8; 8] = b"PSTNSEG\0";
/// Format version: 2 added the per-segment salt in the CRC.
pub(crate) const VERSION: u32 = 3;

/// The oldest format version read. Version 3 added copies of live messages (a queue ID
/// finished twice in a core's log, the later copy standing for both, and the status records of
/// its ID before its `START` passed over): a version 2 postern would deliver both copies, so
/// it must not read a version 3 segment (it refuses a newer version), while a version 2
/// segment, which holds no copy, reads the same under either version's rules.
pub(crate) const OLDEST_READ: u32 = 2;
/// Record header: length, CRC, kind, padding.
pub(crate) const RECORD_HEADER: usize = 12;

/// Record kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    Start = 1,
    Body = 2,
    End = 3,
    Abort = 4,
    Status = 5,
}

impl Kind {
    pub(crate) fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Start,
            2 => Kind::Body,
            3 => Kind::End,
            4 => Kind::Abort,
            5 => Kind::Status,
            _ => return None,
        })
    }
}

/// Space a record with `payload` bytes takes, alignment included.
pub(crate) fn record_len(payload: usize) -> usize {
    (RECORD_HEADER + payload + 7) & !7
}

/// The CRC of a record's kind and payload pieces, in a segment with `salt`.
pub(crate) fn crc(salt: u32, kind: Kind, pieces: &[&[u8]]) -> u32 {
    let mut c = crc32c::crc32c(&salt.to_le_bytes());
    c = crc32c::crc32c_append(c, &[kind as u8]);
    for p in pieces {
        c = crc32c::crc32c_append(c, p);
    }
    c
}

/// Writes a record made of `pieces` at the start of `dst`, which must hold `record_len`.
/// The length word goes last, after a compiler fence: a process killed in the middle leaves
/// a zero length, which recovery reads as the end of the data. After a power loss pages may
/// reach the disk in any order; there the CRC is what recovery trusts.
pub(crate) fn write_record(dst: &mut [u8], salt: u32, kind: Kind, pieces: &[&[u8]]) -> usize {
    let payload: usize = pieces.iter().map(|p| p.len()).sum();
    let mut at = RECORD_HEADER;
    for p in pieces {
        dst[at..at + p.len()].copy_from_slice(p);
        at += p.len();
    }
    let total = record_len(payload);
    dst[at..total].fill(0);
    dst[4..8].copy_from_slice(&crc(salt, kind, pieces).to_le_bytes());
    dst[8] = kind as u8;
    dst[9..12].fill(0);
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    dst[0..4].copy_from_slice(&(payload as u32).to_le_bytes());
    total
}

/// One record read back.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Read<'a> {
    /// A valid record and the space it takes.
    Record {
        kind: Kind,
        payload: &'a [u8],
        len: usize,
    },
    /// A record whose CRC or kind is wrong, but whose length stays in bounds: skip `len`.
    Corrupt { len: usize },
    /// Zeros: nothing written here (or a record whose writer died before its length word),
    /// the end of the segment's data.
    End,
    /// A length running past the end of the segment. No writer makes one (a length word is
    /// written last, and only for a record that fits), so it is damage; the records after
    /// it cannot be found.
    Overrun,
}

/// Reads the record at the start of `src`, in a segment with `salt`.
pub(crate) fn read_record(src: &[u8], salt: u32) -> Read<'_> {
    if src.len() < RECORD_HEADER {
        return Read::End;
    }
    let payload_len = u32::from_le_bytes([src[0], src[1], src[2], src[3]]) as usize;
    // Every record carries at least a draft number, so a zero length is never a record: it is
    // space not written yet, or a record whose writer died before its length word.
    if payload_len == 0 {
        return Read::End;
    }
    let len = record_len(payload_len);
    if len > src.len() {
        return Read::Overrun;
    }
    let stored = u32::from_le_bytes([src[4], src[5], src[6], src[7]]);
    let payload = &src[RECORD_HEADER..RECORD_HEADER + payload_len];
    match Kind::from_u8(src[8]) {
        Some(kind) if crc(salt, kind, &[payload]) == stored => Read::Record { kind, payload, len },
        _ => Read::Corrupt { len },
    }
}

/// Appends length-prefixed fields to a payload.
#[derive(Default)]
pub(crate) struct Fields(pub(crate) Vec<u8>);

impl Fields {
    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(crate) fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(&(b.len() as u32).to_le_bytes());
        self.0.extend_from_slice(b);
        self
    }
}

/// Reads fields written by [`Fields`].
pub(crate) struct Cursor<'a>(pub(crate) &'a [u8]);

impl<'a> Cursor<'a> {
    pub(crate) fn u64(&mut self) -> Option<u64> {
        let (head, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(u64::from_le_bytes(*head))
    }
    pub(crate) fn bytes(&mut self) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_first_chunk::<4>()?;
        let n = u32::from_le_bytes(*head) as usize;
        let (b, rest) = (rest.get(..n)?, rest.get(n..)?);
        self.0 = rest;
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_corruption_is_seen() {
        let mut buf = vec![0u8; 256];
        let n = write_record(&mut buf, 7, Kind::Body, &[b"abc", b"defgh"]);
        assert_eq!(n, 24);
        assert_eq!(
            read_record(&buf, 7),
            Read::Record {
                kind: Kind::Body,
                payload: b"abcdefgh",
                len: 24
            }
        );
        assert_eq!(read_record(&buf[n..], 7), Read::End);
        assert_eq!(
            read_record(&buf, 8),
            Read::Corrupt { len: 24 },
            "a record is valid only under its own segment's salt"
        );
        buf[13] ^= 1;
        assert_eq!(read_record(&buf, 7), Read::Corrupt { len: 24 });
        buf[0] = 0xff;
        buf[1] = 0xff;
        assert_eq!(
            read_record(&buf, 7),
            Read::Overrun,
            "a length past the end is damage, and ends the scan"
        );
    }
}
