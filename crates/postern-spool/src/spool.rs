//! One core's spool: streaming appends, commit tickets and group commit.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::SpoolError;
use crate::format::{record_len, write_record, Fields, Kind, HEADER, RECORD_HEADER};
use crate::meta::{MessageMeta, Status};
use crate::queue_id;
use crate::recover::recover_core;
use crate::segment::{file_name as segment_file_name, parse_name, sync_dir, Segment};

/// Tunables.
#[derive(Clone, Copy, Debug)]
pub struct SpoolOptions {
    /// Size of each segment file, reserved when it is created.
    pub segment_size: u64,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        Self {
            segment_size: 64 * 1024 * 1024,
        }
    }
}

/// A message being written. Finish or abort it exactly once.
#[derive(Debug)]
pub struct Draft {
    spool: u64,
    /// The segment holding the START record.
    seq: u64,
    no: u64,
    queue_id: String,
    size: u64,
}

impl Draft {
    /// The queue ID the message will have.
    pub fn queue_id(&self) -> &str {
        &self.queue_id
    }
    /// Body bytes appended so far.
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// A finished message's place in the commit order; durable once a sync covers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

/// Where a ticket stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TicketState {
    /// Not synced yet.
    Pending,
    /// Synced: the message is durable.
    Durable,
    /// The sync that covered it failed: the message is not durable.
    Failed,
}

/// Making the next segment ahead of time: `Send`, to run off the core.
#[derive(Debug)]
pub struct SpareJob {
    dir: PathBuf,
    core: u32,
    seq: u64,
    size: u64,
}

/// A segment made by a [`SpareJob`], ready for [`Spool::install_spare`].
pub struct PreparedSegment(Segment);

impl std::fmt::Debug for PreparedSegment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PreparedSegment({})", self.0.seq)
    }
}

impl SpareJob {
    /// Creates, reserves and syncs the segment file (blocking).
    pub fn run(self) -> std::io::Result<PreparedSegment> {
        Segment::create(&self.dir, self.core, self.seq, self.size).map(PreparedSegment)
    }
}

/// The sync work of one group commit: `Send`, so it can run on a helper thread.
#[derive(Debug)]
pub struct SyncBatch {
    files: Vec<Arc<File>>,
    upto: u64,
}

impl SyncBatch {
    /// Runs `fdatasync` on every file written since the last batch (blocking).
    pub fn run(&self) -> std::io::Result<()> {
        for f in &self.files {
            f.sync_data()?;
        }
        Ok(())
    }
}

/// Body chunks at least this large are written with `pwrite` instead of through the mapping.
const BULK_WRITE: usize = 16 * 1024;

static NEXT_SPOOL_ID: AtomicU64 = AtomicU64::new(1);

/// The spool of one core. Not `Sync`: owned and used by that core alone.
pub struct Spool {
    dir: PathBuf,
    core: u32,
    options: SpoolOptions,
    seg: Option<Segment>,
    next_seq: u64,
    next_draft: u64,
    counter: u64,
    /// The next segment, made ahead of time.
    spare: Option<Segment>,
    /// A spare is being made.
    spare_pending: bool,
    /// Tells this spool's drafts from another's.
    id: u64,
    /// Reused to encode record payloads.
    scratch: Vec<u8>,
    /// This core's segments, oldest first, with the number of live messages that start in
    /// each: the reclaim index.
    segments: VecDeque<(u64, usize)>,
    /// Live (finished, not final) messages of this core, by queue ID, with their START segment.
    live: HashMap<String, u64>,
    issued: u64,
    batched: u64,
    durable: u64,
    failed: Vec<(u64, u64)>,
    dirty: Vec<Arc<File>>,
    retired_bytes: u64,
}

impl Spool {
    /// Opens (creating) the spool of `core` under `root`. Existing segments are left for
    /// recovery; new messages go to a new segment.
    pub fn open(root: &Path, core: u32, options: SpoolOptions) -> Result<Spool, SpoolError> {
        let dir = root.join(core.to_string());
        if !dir.exists() {
            std::fs::create_dir_all(&dir).map_err(SpoolError::from_io)?;
            sync_dir(root).map_err(SpoolError::from_io)?;
        }
        // Rebuild the reclaim index from this core's own segments.
        let found = recover_core(&dir, core)?;
        let mut segments: VecDeque<(u64, usize)> = VecDeque::new();
        let mut bytes = 0;
        for entry in std::fs::read_dir(&dir).map_err(SpoolError::from_io)? {
            let entry = entry.map_err(SpoolError::from_io)?;
            if let Some(seq) = entry.file_name().to_str().and_then(parse_name) {
                segments.push_back((seq, 0));
                bytes += entry.metadata().map_or(0, |m| m.len());
            }
        }
        segments.make_contiguous().sort_unstable();
        let mut live = HashMap::new();
        for m in found.messages.iter().filter(|m| !m.is_final()) {
            if let Some(slot) = segments.iter_mut().find(|(seq, _)| *seq == m.start_seq) {
                slot.1 += 1;
                live.insert(m.queue_id.clone(), m.start_seq);
            }
        }
        let last = segments.back().map_or(0, |&(seq, _)| seq);
        let mut spool = Spool {
            dir,
            core,
            options,
            seg: None,
            spare: None,
            spare_pending: false,
            next_seq: last + 1,
            next_draft: 1,
            counter: 0,
            id: NEXT_SPOOL_ID.fetch_add(1, Ordering::Relaxed),
            scratch: Vec::with_capacity(1024),
            segments,
            live,
            issued: 0,
            batched: 0,
            durable: 0,
            failed: Vec::new(),
            dirty: Vec::new(),
            retired_bytes: bytes,
        };
        // Segments left with nothing live by the last run go now.
        spool.reclaim()?;
        Ok(spool)
    }

    /// Bytes of segment files in this core's directory.
    pub fn bytes_in_use(&self) -> u64 {
        self.retired_bytes + self.seg.as_ref().map_or(0, |s| s.used() as u64)
    }

    /// Largest payload one record may carry.
    fn max_payload(&self) -> usize {
        self.options.segment_size as usize - HEADER - RECORD_HEADER - 8
    }

    /// Makes room for a record of `len` bytes, starting a new segment when needed.
    fn segment_for(&mut self, len: usize) -> Result<&mut Segment, SpoolError> {
        if len > self.options.segment_size as usize - HEADER {
            return Err(SpoolError::TooLarge(len));
        }
        let full = self.seg.as_ref().is_none_or(|s| s.room() < len);
        if full {
            if let Some(old) = self.seg.take() {
                self.retired_bytes += self.options.segment_size;
                self.mark_dirty(&old.file);
            }
            // A segment made ahead of time off the core when there is one; otherwise make it
            // here (file, reservation and two fsyncs: the slow path).
            let seg = match self.spare.take() {
                Some(seg) => seg,
                None => {
                    let seg = Segment::create(
                        &self.dir,
                        self.core,
                        self.next_seq,
                        self.options.segment_size,
                    )
                    .map_err(SpoolError::from_io)?;
                    self.next_seq += 1;
                    seg
                }
            };
            self.segments.push_back((seg.seq, 0));
            self.seg = Some(seg);
        }
        self.seg.as_mut().ok_or(SpoolError::UnknownDraft)
    }

    fn mark_dirty(&mut self, file: &Arc<File>) {
        if !self.dirty.iter().any(|f| Arc::ptr_eq(f, file)) {
            self.dirty.push(file.clone());
        }
    }

    fn append_record(&mut self, kind: Kind, pieces: &[&[u8]]) -> Result<(), SpoolError> {
        let len = record_len(pieces.iter().map(|p| p.len()).sum());
        let seg = self.segment_for(len)?;
        match pieces {
            [head, bulk] if bulk.len() >= BULK_WRITE => {
                seg.append_bulk(kind, head, bulk)
                    .map_err(SpoolError::from_io)?;
            }
            _ => {
                let n = write_record(seg.tail(), kind, pieces);
                seg.commit(n);
            }
        }
        let file = seg.file.clone();
        self.mark_dirty(&file);
        Ok(())
    }

    /// Starts a message: writes its envelope and returns the draft to append the body to.
    pub fn begin(&mut self, meta: &MessageMeta) -> Result<Draft, SpoolError> {
        let no = self.next_draft;
        self.next_draft += 1;
        self.counter += 1;
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let queue_id = queue_id::make(micros, self.core, self.counter);
        let mut f = Fields(std::mem::take(&mut self.scratch));
        f.0.clear();
        f.u64(no).bytes(queue_id.as_bytes());
        meta.encode(&mut f);
        let written = self.append_record(Kind::Start, &[&f.0]);
        self.scratch = f.0;
        written?;
        let seq = self.seg.as_ref().map_or(0, |s| s.seq);
        Ok(Draft {
            spool: self.id,
            seq,
            no,
            queue_id,
            size: 0,
        })
    }

    /// Appends body bytes, in records of at most one segment each.
    pub fn append(&mut self, draft: &mut Draft, bytes: &[u8]) -> Result<(), SpoolError> {
        if draft.spool != self.id {
            return Err(SpoolError::UnknownDraft);
        }
        let no = draft.no.to_le_bytes();
        let max_body = self.max_payload() - 8;
        let mut rest = bytes;
        while !rest.is_empty() {
            // Fill what is left of the current segment before starting another; the slack
            // covers the record header, the draft number and alignment.
            let room = self.seg.as_ref().map_or(0, |s| s.room());
            let fits = room.saturating_sub(RECORD_HEADER + 8 + 7);
            let take = if fits > 0 { fits } else { max_body }
                .min(max_body)
                .min(rest.len());
            self.append_record(Kind::Body, &[&no, &rest[..take]])?;
            rest = &rest[take..];
        }
        draft.size += bytes.len() as u64;
        Ok(())
    }

    /// Ends a message; it is durable once its ticket is.
    pub fn finish(&mut self, draft: Draft) -> Result<Ticket, SpoolError> {
        if draft.spool != self.id {
            return Err(SpoolError::UnknownDraft);
        }
        let mut end = [0u8; 16];
        end[..8].copy_from_slice(&draft.no.to_le_bytes());
        end[8..].copy_from_slice(&draft.size.to_le_bytes());
        self.append_record(Kind::End, &[&end])?;
        if let Some(slot) = self.segments.iter_mut().find(|(seq, _)| *seq == draft.seq) {
            slot.1 += 1;
        }
        self.live.insert(draft.queue_id, draft.seq);
        self.issued += 1;
        Ok(Ticket(self.issued))
    }

    /// Records the outcome for recipient `rcpt` (its index in the envelope) of message
    /// `queue_id`; durable once the returned ticket is. Status records of a message are written
    /// by the core that owns the message (docs/durability.md).
    pub fn append_status(
        &mut self,
        queue_id: &str,
        rcpt: u32,
        status: &Status,
    ) -> Result<Ticket, SpoolError> {
        let mut f = Fields(std::mem::take(&mut self.scratch));
        f.0.clear();
        status.encode(queue_id, rcpt, &mut f);
        let written = self.append_record(Kind::Status, &[&f.0]);
        self.scratch = f.0;
        written?;
        self.issued += 1;
        Ok(Ticket(self.issued))
    }

    /// Forgets a message of this core whose recipients all have final, durable status
    /// records, and deletes the segments that no longer hold anything live. Segments go in
    /// order, oldest first, so a status record never outlives the message it is about
    /// (docs/durability.md). Returns the number of segments deleted.
    pub fn mark_final(&mut self, queue_id: &str) -> Result<usize, SpoolError> {
        if let Some(seq) = self.live.remove(queue_id) {
            if let Some(slot) = self.segments.iter_mut().find(|(s, _)| *s == seq) {
                slot.1 = slot.1.saturating_sub(1);
            }
        }
        self.reclaim()
    }

    /// Deletes segments from the oldest while they hold nothing live.
    fn reclaim(&mut self) -> Result<usize, SpoolError> {
        let current = self.seg.as_ref().map(|s| s.seq);
        let mut deleted = 0;
        while let Some(&(seq, live)) = self.segments.front() {
            if live > 0 || Some(seq) == current {
                break;
            }
            let path = self.dir.join(segment_file_name(seq));
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(SpoolError::from_io(e)),
            }
            self.retired_bytes = self.retired_bytes.saturating_sub(self.options.segment_size);
            self.segments.pop_front();
            deleted += 1;
        }
        Ok(deleted)
    }

    /// Messages of this core that are finished and not yet final.
    pub fn live_messages(&self) -> usize {
        self.live.len()
    }

    /// Segment files of this core.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Abandons a message: recovery will not report it. Best effort (no sync needed: a
    /// message without its END is not reported either).
    pub fn abort(&mut self, draft: Draft) {
        if draft.spool == self.id {
            let _ = self.append_record(Kind::Abort, &[&draft.no.to_le_bytes()]);
        }
    }

    /// The sync work for every ticket issued since the last batch, if any.
    pub fn take_sync(&mut self) -> Option<SyncBatch> {
        if self.issued == self.batched {
            return None;
        }
        self.batched = self.issued;
        Some(SyncBatch {
            files: std::mem::take(&mut self.dirty),
            upto: self.issued,
        })
    }

    /// The work of making the next segment ahead of time, when none is ready or being made.
    /// Run it off the core (it creates, reserves and syncs a file) and hand the result to
    /// [`Spool::install_spare`].
    pub fn spare_job(&mut self) -> Option<SpareJob> {
        if self.spare.is_some() || self.spare_pending {
            return None;
        }
        self.spare_pending = true;
        let job = SpareJob {
            dir: self.dir.clone(),
            core: self.core,
            seq: self.next_seq,
            size: self.options.segment_size,
        };
        self.next_seq += 1;
        Some(job)
    }

    /// Takes a segment made by a [`SpareJob`]. A spare that arrives after the spool had to make
    /// a later segment itself is deleted unused, so segments are always used in number order.
    pub fn install_spare(&mut self, made: std::io::Result<PreparedSegment>) {
        self.spare_pending = false;
        let Ok(PreparedSegment(seg)) = made else {
            return;
        };
        let behind = self.seg.as_ref().is_some_and(|cur| cur.seq > seg.seq)
            || self
                .segments
                .back()
                .is_some_and(|&(last, _)| last > seg.seq);
        if behind {
            let _ = std::fs::remove_file(self.dir.join(segment_file_name(seg.seq)));
        } else {
            self.spare = Some(seg);
        }
    }

    /// Records the outcome of a batch from [`Spool::take_sync`].
    pub fn sync_done(&mut self, batch: SyncBatch, result: std::io::Result<()>) {
        match result {
            Ok(()) => self.durable = self.durable.max(batch.upto),
            Err(_) => {
                self.failed.push((self.durable, batch.upto));
                self.durable = self.durable.max(batch.upto);
                // The kernel may have dropped the pages that failed: write no more there.
                if let Some(old) = self.seg.take() {
                    self.retired_bytes += old.used() as u64;
                }
            }
        }
    }

    /// Where `ticket` stands.
    pub fn ticket_state(&self, ticket: Ticket) -> TicketState {
        if ticket.0 > self.durable {
            TicketState::Pending
        } else if self
            .failed
            .iter()
            .any(|&(from, to)| ticket.0 > from && ticket.0 <= to)
        {
            TicketState::Failed
        } else {
            TicketState::Durable
        }
    }

    /// Syncs everything pending now, on this thread (tests, benchmarks, shutdown).
    pub fn sync_now(&mut self) -> Result<(), SpoolError> {
        if let Some(batch) = self.take_sync() {
            let result = batch.run();
            let err = result
                .as_ref()
                .err()
                .map(|e| std::io::Error::new(e.kind(), e.to_string()));
            self.sync_done(batch, result);
            if let Some(e) = err {
                return Err(SpoolError::Io(e));
            }
        }
        Ok(())
    }
}
