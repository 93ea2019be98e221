//! Recovery: read every segment of every core, check every record, and rebuild the messages
//! that were finished (docs/durability.md).

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use memmap2::Mmap;

use crate::error::SpoolError;
use crate::format::{read_record, Cursor, Kind, Read, HEADER};
use crate::map;
use crate::meta::MessageMeta;
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
    size: u64,
    /// Body pieces: (index into the mapped segments, start, end).
    chunks: Vec<(usize, usize, usize)>,
}

impl RecoveredMessage {
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
    queue_id: String,
    meta: MessageMeta,
    size: u64,
    chunks: Vec<(usize, usize, usize)>,
}

/// Scans the spool under `root`: every core directory, every segment in number order.
pub fn recover(root: &Path) -> Result<Recovered, SpoolError> {
    let mut out = Recovered::default();
    let Ok(cores) = std::fs::read_dir(root) else {
        return Ok(out);
    };
    let mut core_dirs: Vec<(u32, std::path::PathBuf)> = cores
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path())))
        .collect();
    core_dirs.sort();
    for (core, dir) in core_dirs {
        let mut segs: Vec<(u64, std::path::PathBuf)> = std::fs::read_dir(&dir)
            .map_err(SpoolError::from_io)?
            .flatten()
            .filter_map(|e| Some((parse_name(e.file_name().to_str()?)?, e.path())))
            .collect();
        segs.sort();
        // Drafts are numbered per spool opening; a new opening starts a new segment, and the
        // numbers restart, so open drafts are forgotten at each segment whose numbering restarts.
        let mut open: HashMap<u64, Partial> = HashMap::new();
        for (_, path) in segs {
            let file = File::open(&path).map_err(SpoolError::from_io)?;
            let map = map::map(&file).map_err(SpoolError::from_io)?;
            if !header_ok(&map) {
                out.corrupt_records += 1;
                continue;
            }
            out.segments += 1;
            let index = out.maps.len();
            scan(&map, index, core, &mut open, &mut out);
            out.maps.push(map);
        }
        out.unfinished += open.len() as u64;
    }
    Ok(out)
}

fn scan(
    map: &[u8],
    index: usize,
    core: u32,
    open: &mut HashMap<u64, Partial>,
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
                                out.messages.push(RecoveredMessage {
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
