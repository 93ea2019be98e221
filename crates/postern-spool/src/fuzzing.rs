//! Entry points for the spool's fuzz targets in `fuzz/`, kept in the crate so that each
//! target is one line and the harness compiles (and runs in tests) with the crate. Each takes
//! arbitrary bytes and panics only when an invariant breaks.
//!
//! Records carry a CRC under their segment's salt, so random bytes almost never reach the
//! decoders behind it. [`segment`] therefore reads its input as a program that writes
//! segments: valid records of every kind (well-formed or not inside), raw damage, cut files
//! and seals, and then runs the recovery scan over them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::format::{record_len, write_record, Cursor, Fields, Kind, HEADER, MAGIC, VERSION};
use crate::meta::{MessageMeta, Recipient, Status};

/// The record reader and the envelope and status decoders on raw bytes: no panic, lengths in
/// bounds, and what decodes encodes back to the same bytes' meaning.
pub fn record(data: &[u8]) {
    let Some((salt, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let salt = u32::from_le_bytes(*salt);
    match crate::format::read_record(rest, salt) {
        crate::format::Read::Record { kind, payload, len } => {
            assert!(len <= rest.len() && len == record_len(payload.len()));
            let mut again = vec![0u8; len];
            assert_eq!(write_record(&mut again, salt, kind, &[payload]), len);
            assert_eq!(
                again[..8],
                rest[..8],
                "a record read back writes the same header"
            );
        }
        crate::format::Read::Corrupt { len } => assert!(len <= rest.len()),
        crate::format::Read::End | crate::format::Read::Overrun => {}
    }
    if let Some(meta) = MessageMeta::decode(&mut Cursor(rest)) {
        let mut f = Fields::default();
        meta.encode(&mut f);
        assert_eq!(MessageMeta::decode(&mut Cursor(&f.0)), Some(meta));
    }
    let mut c = Cursor(rest);
    if let Some(no) = c.u64() {
        if let Some((rcpt, queue_id, status)) = Status::decode(no, &mut c) {
            let mut f = Fields::default();
            status.encode(&queue_id, rcpt, &mut f);
            let mut c = Cursor(&f.0);
            let no = c.u64().expect("the recipient index was written");
            assert_eq!(Status::decode(no, &mut c), Some((rcpt, queue_id, status)));
        }
    }
}

/// Writes one core's segments as `data` says (see [`build`]) in a directory of its own under
/// the system's temporary directory, recovers them, checks what recovery promises, and removes
/// the directory.
pub fn segment(data: &[u8]) {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let root = std::env::temp_dir().join(format!(
        "postern-spool-fuzz-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    let core = root.join("0");
    std::fs::create_dir_all(&core).expect("a temporary directory");
    let written = build(data, &core);
    let result = crate::recover(&root);
    let _ = std::fs::remove_dir_all(&root);
    let recovered = match result {
        Ok(recovered) => recovered,
        // Only a newer format's segment stops a scan, and the builder writes none.
        Err(e) => panic!("recovery failed: {e}"),
    };
    assert_eq!(recovered.corrupt_at.len() as u64, recovered.corrupt_records);
    for m in &recovered.messages {
        assert_eq!(m.statuses.len(), m.meta.recipients.len());
        assert_eq!(m.body().to_vec().len() as u64, m.size());
        assert_eq!(m.core, 0);
    }
    if written.clean {
        // Nothing but valid records, every segment whole: nothing is damage, and every
        // message ended with its right size is back, with its body.
        assert_eq!(recovered.corrupt_records, 0, "{:?}", recovered.corrupt_at);
        assert_eq!(recovered.torn_tails, 0);
        assert_eq!(recovered.damaged, 0);
        let mut found: Vec<(String, Vec<u8>)> = recovered
            .messages
            .iter()
            .map(|m| (m.queue_id.clone(), m.body().to_vec()))
            .collect();
        let mut want = written.complete;
        found.sort();
        want.sort();
        assert_eq!(found, want);
    }
}

/// What [`build`] wrote.
struct Written {
    /// Only valid records went in, no file was cut short and no envelope was malformed.
    clean: bool,
    /// The messages whose records a recovery must give back when `clean`: queue ID, body.
    complete: Vec<(String, Vec<u8>)>,
}

/// A message being written: its queue ID and the body so far.
struct Open {
    queue_id: String,
    body: Vec<u8>,
}

/// At most this many segments and operations per input, to keep each run short.
const MAX_SEGMENTS: u64 = 4;
const MAX_OPS: usize = 256;
/// The size each segment is made with.
const SEGMENT_SIZE: usize = 16 * 1024;

/// Input: a salt seed (4 bytes), then operations, each a tag byte and its arguments, by
/// `tag % 8`: `0` raw damage (a length byte, that many bytes as they are), `1` the next
/// segment (read as a `7` once there are [`MAX_SEGMENTS`]), `2` a
/// file cut short (a byte: where), `3` a seal on the segment being written (or, with bit 5
/// set, a mark of how far its records are durable, where they end now), and otherwise a
/// record for draft `tag >> 5`: START (4), BODY (5), END (6), STATUS or
/// ABORT (7, by the next byte); the bytes after give each its fields.
fn build(data: &[u8], dir: &Path) -> Written {
    let mut input = data.iter().copied();
    let mut next = move || input.next();
    let seed = u32::from_le_bytes([
        next().unwrap_or(0),
        next().unwrap_or(0),
        next().unwrap_or(0),
        next().unwrap_or(0),
    ]);
    let mut w = Written {
        clean: true,
        complete: Vec::new(),
    };
    let mut open: std::collections::HashMap<u64, Open> = std::collections::HashMap::new();
    let mut seq = 1u64;
    let mut seg = Seg::new(seed, seq);
    for _ in 0..MAX_OPS {
        let Some(tag) = next() else { break };
        let draft = u64::from(tag >> 5);
        match tag % 8 {
            0 => {
                let n = usize::from(next().unwrap_or(0));
                let bytes: Vec<u8> = (0..n).map_while(|_| next()).collect();
                // Zeros end a segment's data early, anything else is damage.
                w.clean &= bytes.is_empty();
                seg.raw(&bytes);
            }
            1 if seq < MAX_SEGMENTS => {
                seg.finish(dir);
                seq += 1;
                seg = Seg::new(seed.wrapping_add(seq as u32), seq);
            }
            2 => {
                seg.cut = Some(usize::from(next().unwrap_or(0)) * 64);
                w.clean = false;
            }
            // A mark of how far the records are durable, where the writing is now.
            3 if tag & 0x20 != 0 => seg.mark = Some(seg.at),
            3 => seg.sealed = true,
            4 => {
                let queue_id = format!("Q{seq}x{draft}x{}", seg.at);
                let recipients = next().unwrap_or(0) % 4;
                let meta = MessageMeta {
                    arrival: u64::from(tag),
                    client: "192.0.2.1".into(),
                    helo: "client.test".into(),
                    reverse_path: "a@origin.test".into(),
                    recipients: (0..recipients)
                        .map(|i| Recipient {
                            path: format!("r{i}@dest.test"),
                            notify: (i % 2 == 0).then_some(i),
                            orcpt: None,
                        })
                        .collect(),
                    envid: None,
                    ret: None,
                    body_type: 0,
                    smtputf8: false,
                };
                let mut f = Fields::default();
                f.u64(draft).bytes(queue_id.as_bytes());
                // An envelope cut short is malformed inside a valid record.
                let whole = next().unwrap_or(0) % 16 != 0;
                if whole {
                    meta.encode(&mut f);
                } else {
                    w.clean = false;
                }
                seg.record(Kind::Start, &f.0);
                if whole {
                    // A second START for a draft still open replaces it: its earlier body is
                    // not a message.
                    open.insert(
                        draft,
                        Open {
                            queue_id,
                            body: Vec::new(),
                        },
                    );
                }
            }
            5 => {
                let n = usize::from(next().unwrap_or(0));
                let bytes: Vec<u8> = (0..n).map_while(|_| next()).collect();
                let mut f = Fields::default();
                f.u64(draft);
                f.0.extend_from_slice(&bytes);
                seg.record(Kind::Body, &f.0);
                if let Some(o) = open.get_mut(&draft) {
                    o.body.extend_from_slice(&bytes);
                }
            }
            6 => {
                let wrong = next().unwrap_or(0) % 8 == 0;
                let size = open.get(&draft).map_or(0, |o| o.body.len() as u64);
                let size = if wrong { size + 1 } else { size };
                let mut f = Fields::default();
                f.u64(draft).u64(size);
                seg.record(Kind::End, &f.0);
                if let Some(o) = open.remove(&draft) {
                    if wrong {
                        w.clean = false;
                    } else {
                        w.complete.push((o.queue_id, o.body));
                    }
                }
            }
            _ if next().unwrap_or(0) % 2 == 0 => {
                let mut f = Fields::default();
                f.u64(draft);
                seg.record(Kind::Abort, &f.0);
                open.remove(&draft);
            }
            _ => {
                // A status for a message of this segment (or one not there: an orphan).
                let queue_id = format!("Q{seq}x{draft}x{}", next().unwrap_or(0));
                let status = Status {
                    state: match next().unwrap_or(0) % 4 {
                        0 => crate::DeliveryState::Delivered,
                        1 => crate::DeliveryState::Deferred {
                            next_attempt: 7,
                            warned: false,
                        },
                        2 => crate::DeliveryState::Deferred {
                            next_attempt: 7,
                            warned: true,
                        },
                        _ => crate::DeliveryState::Failed,
                    },
                    reply: "250 ok".into(),
                };
                let mut f = Fields::default();
                status.encode(&queue_id, u32::from(tag & 3), &mut f);
                seg.record(Kind::Status, &f.0);
            }
        }
        if seg.full {
            w.clean = false;
        }
    }
    seg.finish(dir);
    w
}

/// One segment being built in memory.
struct Seg {
    salt: u32,
    seq: u64,
    bytes: Vec<u8>,
    at: usize,
    sealed: bool,
    mark: Option<usize>,
    cut: Option<usize>,
    /// A write did not fit and was left out.
    full: bool,
}

impl Seg {
    fn new(salt: u32, seq: u64) -> Seg {
        let mut bytes = vec![0u8; SEGMENT_SIZE];
        bytes[..8].copy_from_slice(MAGIC);
        bytes[8..12].copy_from_slice(&VERSION.to_le_bytes());
        // Made as core 0's segment `seq`, as its file is named.
        bytes[16..24].copy_from_slice(&seq.to_le_bytes());
        bytes[24..28].copy_from_slice(&salt.to_le_bytes());
        bytes[28..36].copy_from_slice(&(SEGMENT_SIZE as u64).to_le_bytes());
        Seg {
            salt,
            seq,
            bytes,
            at: HEADER,
            sealed: false,
            mark: None,
            cut: None,
            full: false,
        }
    }

    fn record(&mut self, kind: Kind, payload: &[u8]) {
        let len = record_len(payload.len());
        if self.at + len > self.bytes.len() {
            self.full = true;
            return;
        }
        self.at += write_record(&mut self.bytes[self.at..], self.salt, kind, &[payload]);
    }

    fn raw(&mut self, bytes: &[u8]) {
        let end = (self.at + bytes.len()).min(self.bytes.len());
        self.bytes[self.at..end].copy_from_slice(&bytes[..end - self.at]);
        self.at = end;
    }

    fn finish(&mut self, dir: &Path) {
        if self.sealed {
            let mut seal = [0u8; 12];
            seal[..8].copy_from_slice(&(self.at as u64).to_le_bytes());
            seal[8..].copy_from_slice(
                &crate::segment::seal_crc(self.salt, self.at as u64).to_le_bytes(),
            );
            self.bytes[36..48].copy_from_slice(&seal);
        } else if let Some(end) = self.mark {
            self.bytes[36..48].copy_from_slice(&crate::segment::mark_bytes(self.salt, end as u64));
        }
        let len = self
            .cut
            .map_or(self.bytes.len(), |cut| cut.clamp(HEADER, self.bytes.len()));
        let path: PathBuf = dir.join(crate::segment::file_name(self.seq));
        std::fs::write(path, &self.bytes[..len]).expect("a temporary segment file");
    }
}
