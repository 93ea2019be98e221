//! Recovery: read every segment of every core, check every record, and rebuild the messages
//! that were finished (docs/durability.md).

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use memmap2::Mmap;

use crate::error::SpoolError;
use crate::format::{read_record, Cursor, Kind, Read, HEADER};
use crate::map;
use crate::meta::{MessageMeta, Status};
use crate::segment::{header_ok, parse_name};

/// A message found whole.
#[derive(Debug)]
pub struct RecoveredMessage {
    /// Its queue ID.
    pub queue_id: String,
    /// Its envelope and trace facts.
    pub meta: MessageMeta,
    /// The core whose spool holds it.
    pub core: u32,
    /// The latest outcome of each recipient (by envelope index), None while never tried.
    pub statuses: Vec<Option<Status>>,
    size: u64,
    /// The segment holding the message's START record.
    pub(crate) start_seq: u64,
    /// Body pieces: (index into the mapped segments, start, end).
    chunks: Vec<(usize, usize, usize)>,
}

impl RecoveredMessage {
    /// Whether every recipient has a final outcome (delivered or failed): nothing left to do.
    /// A message without recipients (which SMTP cannot produce) has nothing to do either.
    pub fn is_final(&self) -> bool {
        self.statuses
            .iter()
            .all(|s| s.as_ref().is_some_and(Status::is_final))
    }

    /// The body length.
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// What recovery found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Finished messages, in the order they were finished per core.
    pub messages: Vec<RecoveredMessage>,
    /// Records skipped because their CRC or kind was wrong.
    pub corrupt_records: u64,
    /// Messages started but never finished or aborted (cut off by a crash).
    pub unfinished: u64,
    /// Finished messages missing body records (lost to corruption): not reported.
    pub damaged: u64,
    /// Status records whose message was not found (already reclaimed, or lost).
    pub orphan_statuses: u64,
    /// Segments read.
    pub segments: u64,
    maps: Vec<Mmap>,
}

impl Recovered {
    /// The body of `m`, straight from the mapped segments.
    pub fn body<'a>(&'a self, m: &'a RecoveredMessage) -> impl Iterator<Item = &'a [u8]> + 'a {
        m.chunks.iter().map(|&(seg, a, b)| &self.maps[seg][a..b])
    }

    /// The body of `m` copied into one buffer.
    pub fn body_vec(&self, m: &RecoveredMessage) -> Vec<u8> {
        let mut v = Vec::with_capacity(m.size as usize);
        for piece in self.body(m) {
            v.extend_from_slice(piece);
        }
        v
    }
}

struct Partial {
    start_seq: u64,
    queue_id: String,
    meta: MessageMeta,
    size: u64,
    chunks: Vec<(usize, usize, usize)>,
}

/// Scans the spool under `root`: every core directory, every segment in number order.
pub fn recover(root: &Path) -> Result<Recovered, SpoolError> {
    let Ok(cores) = std::fs::read_dir(root) else {
        return Ok(Recovered::default());
    };
    let mut core_dirs: Vec<(u32, std::path::PathBuf)> = cores
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path())))
        .collect();
    core_dirs.sort();
    scan_dirs(&core_dirs)
}

/// Scans one core's directory (what the core's own spool needs at open).
pub(crate) fn recover_core(dir: &Path, core: u32) -> Result<Recovered, SpoolError> {
    scan_dirs(&[(core, dir.to_path_buf())])
}

fn scan_dirs(core_dirs: &[(u32, std::path::PathBuf)]) -> Result<Recovered, SpoolError> {
    let mut out = Recovered::default();
    let mut statuses = Vec::new();
    for (core, dir) in core_dirs {
        let mut segs: Vec<(u64, std::path::PathBuf)> = std::fs::read_dir(dir)
            .map_err(SpoolError::from_io)?
            .flatten()
            .filter_map(|e| Some((parse_name(e.file_name().to_str()?)?, e.path())))
            .collect();
        segs.sort();
        // Drafts are numbered per opening of a spool; each opening starts a new segment.
        let mut open: HashMap<u64, Partial> = HashMap::new();
        for (seq, path) in segs {
            let file = File::open(&path).map_err(SpoolError::from_io)?;
            let map = map::map(&file).map_err(SpoolError::from_io)?;
            if !header_ok(&map) {
                out.corrupt_records += 1;
                continue;
            }
            out.segments += 1;
            let index = out.maps.len();
            scan(
                &map,
                (index, seq),
                *core,
                &mut open,
                &mut statuses,
                &mut out,
            );
            out.maps.push(map);
        }
        out.unfinished += open.len() as u64;
    }
    apply_statuses(&mut out, statuses);
    Ok(out)
}

/// Gives each message the latest outcome of each recipient; a final outcome is never replaced
/// by a later deferral (a deferral racing a delivery is stale).
fn apply_statuses(out: &mut Recovered, statuses: Vec<(String, u32, Status)>) {
    let index: HashMap<&str, usize> = out
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| (m.queue_id.as_str(), i))
        .collect();
    let mut updates = Vec::with_capacity(statuses.len());
    for (queue_id, rcpt, status) in statuses {
        match index.get(queue_id.as_str()) {
            Some(&i) => updates.push((i, rcpt as usize, status)),
            None => out.orphan_statuses += 1,
        }
    }
    for (i, rcpt, status) in updates {
        if let Some(slot) = out.messages[i].statuses.get_mut(rcpt) {
            if !slot.as_ref().is_some_and(Status::is_final) {
                *slot = Some(status);
            }
        }
    }
}

fn scan(
    map: &[u8],
    (index, seq): (usize, u64),
    core: u32,
    open: &mut HashMap<u64, Partial>,
    statuses: &mut Vec<(String, u32, Status)>,
    out: &mut Recovered,
) {
    let mut pos = HEADER;
    loop {
        match read_record(&map[pos..]) {
            Read::End => return,
            Read::Corrupt { len } => {
                out.corrupt_records += 1;
                pos += len;
            }
            Read::Record { kind, payload, len } => {
                let start = pos + crate::format::RECORD_HEADER;
                pos += len;
                let mut c = Cursor(payload);
                let Some(no) = c.u64() else {
                    out.corrupt_records += 1;
                    continue;
                };
                match kind {
                    Kind::Status => match Status::decode(no, &mut c) {
                        Some((rcpt, queue_id, status)) => statuses.push((queue_id, rcpt, status)),
                        None => out.corrupt_records += 1,
                    },
                    Kind::Start => {
                        let queue_id = c.bytes().and_then(|b| String::from_utf8(b.to_vec()).ok());
                        let meta = MessageMeta::decode(&mut c);
                        if let (Some(queue_id), Some(meta)) = (queue_id, meta) {
                            if no == 1 {
                                // A new opening of the spool: earlier drafts can never finish.
                                out.unfinished += open.len() as u64;
                                open.clear();
                            }
                            open.insert(
                                no,
                                Partial {
                                    start_seq: seq,
                                    queue_id,
                                    meta,
                                    size: 0,
                                    chunks: Vec::new(),
                                },
                            );
                        } else {
                            out.corrupt_records += 1;
                        }
                    }
                    Kind::Body => {
                        if let Some(p) = open.get_mut(&no) {
                            p.size += (payload.len() - 8) as u64;
                            p.chunks.push((index, start + 8, start + payload.len()));
                        }
                    }
                    Kind::End => {
                        let size = c.u64();
                        if let Some(p) = open.remove(&no) {
                            if size == Some(p.size) {
                                let n = p.meta.recipients.len();
                                out.messages.push(RecoveredMessage {
                                    statuses: vec![None; n],
                                    start_seq: p.start_seq,
                                    queue_id: p.queue_id,
                                    meta: p.meta,
                                    core,
                                    size: p.size,
                                    chunks: p.chunks,
                                });
                            } else {
                                out.damaged += 1;
                            }
                        }
                    }
                    Kind::Abort => {
                        open.remove(&no);
                    }
                }
            }
        }
    }
}
