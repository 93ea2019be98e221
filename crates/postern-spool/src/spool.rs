//! One core's spool: streaming appends, commit tickets, group commit and reclaim.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::body::{MessageRef, Piece};
use crate::commit::{Commits, Ticket, TicketState};
use crate::error::SpoolError;
use crate::format::{record_len, Fields, Kind, HEADER, RECORD_HEADER};
use crate::meta::{DeliveryState, MessageMeta, Status};
use crate::queue_id;
use crate::reclaim::Index;
use crate::recover::recover_core;
use crate::segment::{
    file_name, header, is_regular_file, is_temp_name, mark_bytes, parse_name, pwrite_all, sync_dir,
    write_seal, Header, Segment, SEAL_AT,
};
use crate::spare::{PreparedSegment, SpareJob};

/// The reply kept in the statuses of a message whose sync failed after it was finished (see
/// [`Spool::forget_failed`]).
const WITHDRAWN: &str =
    "not stored: a sync of the spool failed, and its client was told to send it again";

/// Tunables.
#[derive(Clone, Copy, Debug)]
pub struct SpoolOptions {
    /// Size of each segment file, reserved with `fallocate` when it is created. Larger
    /// segments mean fewer creations; the disk must hold at least one more than is in use.
    pub segment_size: u64,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        Self {
            segment_size: 64 * 1024 * 1024,
        }
    }
}

/// A message being written. Give it to [`Spool::finish`] or [`Spool::abort`] exactly once;
/// dropping it instead keeps its segment pinned until the spool is reopened.
#[derive(Debug)]
pub struct Draft {
    spool: u64,
    /// The segment holding the START record (pinned while the draft lives).
    seq: u64,
    /// The segments after `seq` it wrote records into, oldest first (see `Index::draft_in`);
    /// empty, and not allocated, for a message within one segment.
    later: Vec<u64>,
    no: u64,
    queue_id: String,
    size: u64,
    /// The octets of the records appended for it so far (see `Index::set_live`).
    records: u64,
    /// Where its `START` record's payload is, to write it again when the draft is moved
    /// forward ([`Spool::append`]).
    start: Piece,
    pieces: Vec<Piece>,
    /// Recipients in its envelope.
    recipients: u32,
    /// An append failed: some of the body may be missing, so the draft never finishes.
    broken: bool,
    /// How much of the spool's reserve a segment for its records must leave free
    /// ([`Spool::set_reserve`]).
    keep: Keep,
    /// What other records had taken ([`Spool`]'s `grown`) when it began, was last moved, or
    /// a move of it was refused ([`Spool::holds_back`]).
    grown_at: u64,
}

impl Draft {
    /// The queue ID the message will have.
    pub fn queue_id(&self) -> &str {
        &self.queue_id
    }
    /// The number of recipients in its envelope.
    pub fn recipients(&self) -> u32 {
        self.recipients
    }
    /// Body bytes appended so far.
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// The sync work of one group commit: `Send`, so it runs on a helper thread while the core
/// goes on; give it back to [`Spool::sync_done`] with the result of [`SyncBatch::run`].
#[derive(Debug)]
pub struct SyncBatch {
    files: Vec<Arc<File>>,
    /// The segment being written when the batch was taken: never deleted by the spool while
    /// this batch runs (not even when only abandoned drafts wrote into it: it waits for
    /// [`Spool::sync_done`]), so its file's being unlinked is someone else's doing.
    current: Option<Arc<File>>,
    /// Records appended since the previous batch, not yet in their files.
    writes: Vec<Gathered>,
    range: (u64, u64),
}

impl SyncBatch {
    /// Writes the records gathered since the previous batch into their segment files (one
    /// `pwrite` per file), then runs `fdatasync` on every segment file written since the
    /// previous batch. Blocking.
    pub fn run(&self) -> std::io::Result<()> {
        for (file, at, bytes) in &self.writes {
            pwrite_all(file, bytes, *at)?;
        }
        for f in &self.files {
            f.sync_data()?;
        }
        // Deleted by another process (the spool removed by hand): the records are in a file
        // no start will read, and must not be acknowledged. The tickets fail (451), and the
        // next records go to a new segment, or fail with it where the directory went too.
        if let Some(current) = &self.current {
            if !still_linked(current) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the segment being written was deleted by another process (not postern): \
                     what it holds would be lost at the next start",
                ));
            }
        }
        Ok(())
    }

    /// How many tickets this batch settles.
    pub fn tickets(&self) -> u64 {
        self.range.1 - self.range.0
    }
}

/// Whether `file` still has a name (one that cannot be looked at is taken to have one).
fn still_linked(file: &File) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    file.metadata().map_or(true, |m| m.nlink() > 0)
}

/// The body of a message finished by [`Spool::finish_with_body`], not yet readable: [`Spool::body`]
/// turns it into a [`MessageRef`] once the message's ticket is durable.
#[derive(Debug)]
pub struct PendingBody {
    spool: u64,
    ticket: Ticket,
    body: MessageRef,
}

impl PendingBody {
    /// The ticket whose durability makes the body readable.
    pub fn ticket(&self) -> Ticket {
        self.ticket
    }
}

/// Body chunks at least this large are written with `pwrite` instead of through the mapping.
/// The directory, inside a core's, where segments with damaged records are set aside.
pub const DAMAGED_DIR: &str = "damaged";

/// What a damaged segment's name gets when it is kept in place, for want of room for
/// [`DAMAGED_DIR`] (`0000000003.seg.damaged`).
pub(crate) const DAMAGED_SUFFIX: &str = ".damaged";

const BULK_WRITE: usize = 16 * 1024;

/// Records gathered in memory for the next sync are written out early past this many bytes.
const PENDING_LIMIT: usize = 256 * 1024;

/// How much of the spool's reserve ([`Spool::set_reserve`]) a record must leave free where it
/// makes a new segment, or goes into one made out of the reserve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Keep {
    /// Nothing: the copy of a waiting message forward, which lets segments go, and the end
    /// or abandonment of a message whose records are in.
    Nothing,
    /// Half: what finishes mail (a final outcome, a failure report).
    Half,
    /// All of it: new mail, deferrals, delay warnings and success reports.
    All,
}

impl Keep {
    /// The bytes to leave free of a reserve of `reserve`.
    fn of(self, reserve: u64) -> u64 {
        match self {
            Keep::Nothing => 0,
            Keep::Half => reserve / 2,
            Keep::All => reserve,
        }
    }
}

/// How long after a spare was refused for the reserve no other is asked for.
const SPARE_AFTER_REFUSAL: Duration = Duration::from_secs(1);

/// Held from the look at the free space to the end of the segment's creation, for creations
/// that must leave the reserve: the cores share one file system, and each looking while the
/// others create would let them all take the same room.
static RESERVE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Makes segment `seq` of `size` bytes where it leaves `reserve` bytes free (none to leave:
/// at once).
pub(crate) fn create_past_reserve(
    dir: &Path,
    core: u32,
    seq: u64,
    size: u64,
    reserve: u64,
) -> std::io::Result<Segment> {
    if reserve == 0 {
        return Segment::create(dir, core, seq, size);
    }
    let _held = RESERVE_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    room_past_reserve(dir, size, reserve)?;
    Segment::create(dir, core, seq, size)
}

/// A segment refused to new mail for the reserve ([`Spool::set_reserve`]): the disk is not
/// full, but what is left is kept for what finishes the mail already taken.
#[derive(Debug)]
struct ReserveKept(String);

impl std::fmt::Display for ReserveKept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ReserveKept {}

/// Whether `e` is a refusal for the reserve rather than the file system's own `ENOSPC`.
pub fn is_reserve_refusal(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<ReserveKept>())
}

/// The reserve to keep on the file system of `dir` for `cores` cores writing segments of
/// `size` bytes: two segments per core (one for what finishes mail, one for the copies that
/// let segments go), where the file system holds four per core in all (with the one written
/// and the next made ahead); none on a smaller one (which would otherwise take little or no
/// mail), or one that says nothing of its size.
pub fn reserve_for(dir: &Path, size: u64, cores: usize) -> u64 {
    let reserve = size.saturating_mul(2 * cores as u64);
    let Ok(fs) = rustix::fs::statvfs(dir) else {
        return 0;
    };
    let total = fs.f_blocks.saturating_mul(fs.f_frsize);
    if total >= reserve.saturating_mul(2) {
        reserve
    } else {
        0
    }
}

/// Whether a segment of `size` bytes leaves `reserve` bytes free on the file system of `dir`
/// (what its owner may use without privileges). A file system that says nothing of its size
/// (some FUSE and network ones), or a reserve of 0, passes.
pub(crate) fn room_past_reserve(dir: &Path, size: u64, reserve: u64) -> std::io::Result<()> {
    if reserve == 0 {
        return Ok(());
    }
    let Ok(fs) = rustix::fs::statvfs(dir) else {
        return Ok(());
    };
    if fs.f_blocks == 0 {
        return Ok(());
    }
    let free = fs.f_bavail.saturating_mul(fs.f_frsize);
    if free >= reserve.saturating_add(size) {
        return Ok(());
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::StorageFull,
        ReserveKept(format!(
            "{free} bytes free, and a new segment of {size} would leave less than the \
             {reserve} kept for copies of waiting mail, delivery outcomes and reports"
        )),
    ))
}

/// Tells one spool's drafts from another's (cores, reopenings).
static NEXT_SPOOL_ID: AtomicU64 = AtomicU64::new(1);

/// The spool of one core. Owned and used by that core alone (no locks inside); the blocking
/// work it needs (syncs, making segments) is handed out as `Send` values to run elsewhere.
pub struct Spool {
    dir: PathBuf,
    core: u32,
    options: SpoolOptions,
    /// The segment being written.
    seg: Option<Segment>,
    /// The next segment, made ahead of time.
    spare: Option<Segment>,
    /// A spare is being made.
    spare_pending: bool,
    /// Free space on the spool's file system that new mail leaves (see [`Spool::set_reserve`]).
    reserve: u64,
    /// What the current segment was made for: records that must leave more of the reserve
    /// go into it only once that much is free again.
    seg_keep: Keep,
    /// When a spare was last refused for the reserve, and the number it was to have: no other
    /// is asked for within [`SPARE_AFTER_REFUSAL`].
    spare_refused: Option<Instant>,
    spare_seq: u64,
    next_seq: u64,
    /// The number of the newest segment written to so far (0: none since the opening). A
    /// spare numbered at or below it is never used, even once that segment is reclaimed.
    newest_used: u64,
    next_draft: u64,
    /// Drafts numbered below this were begun before a sync failed: they cannot be durable.
    poisoned_below: u64,
    /// Per-opening counter for queue IDs.
    counter: u64,
    /// Queue ID times never go below this: past the newest ID found at open, then the time
    /// of the last ID issued.
    id_floor: u64,
    id: u64,
    /// Reused to encode record payloads.
    scratch: Vec<u8>,
    index: Index,
    /// Segments where the last opening found damaged records: set aside, not deleted, once
    /// nothing live is left in them.
    damaged: Vec<u64>,
    commits: Commits,
    /// Files written since the last batch was taken.
    dirty: Vec<Arc<File>>,
    /// Records of retired segments not yet written to their files (for the next batch).
    unwritten: Vec<Gathered>,
    /// The records the batch being synced writes, until it is done, and the segment that was
    /// current when it was taken (its records are in that one or older ones).
    in_flight: Vec<Gathered>,
    in_flight_seq: u64,
    /// The segment that was current when the batch being synced was taken, until it is
    /// done: not deleted meanwhile ([`SyncBatch`] takes its being unlinked for another
    /// process's doing), and whether a reclaim passed it over for that.
    syncing: Option<u64>,
    reclaim_after_sync: bool,
    /// Full segments to seal once the ticket issued when they filled is durable.
    to_seal: Vec<Seal>,
    /// The current segment's mark of how far its records are durable.
    mark: Mark,
    /// Whether freed segments are handed out ([`Spool::take_unlinks`]) rather than deleted
    /// in [`Spool::reclaim`].
    unlink_later: bool,
    /// Freed segments waiting to be deleted, oldest first.
    to_unlink: Vec<Freed>,
    /// Freed segments handed out and not yet reported deleted ([`Spool::unlinks_done`]).
    unlinks_out: bool,
    /// Deleting has stopped for this run ([`Spool::stop_deleting`]).
    deleting_stopped: bool,
    /// Drafts moved forward in this run ([`Spool::append`]).
    drafts_moved: u64,
    /// Octets of records written in this run other than by moves of drafts.
    grown: u64,
    /// Octets of records moves of drafts wrote in this run.
    moved_bytes: u64,
    /// A move of a draft is being written: its records are not growth.
    moving: bool,
    /// Drafts are moved forward ([`Spool::set_move_drafts`]).
    move_drafts: bool,
}

/// How often the segment being written has its header's mark moved on (docs/durability.md,
/// "Recovery rule"): once a second costs one more small write per second to a page the next
/// group commit syncs anyway.
const MARK_EVERY: Duration = Duration::from_secs(1);

/// The mark ([`mark_bytes`]) of the segment being written: where its records are known
/// durable, and where its header says they are.
#[derive(Debug)]
struct Mark {
    /// A batch's last ticket, and where the current segment's records ended when the batch
    /// was taken: durable with that ticket.
    waiting: Option<(Ticket, u64, usize)>,
    /// The segment and end that a durable ticket covers.
    durable: (u64, usize),
    /// The segment and end its header was last given, and when.
    written: (u64, usize),
    written_at: Instant,
    every: Duration,
}

impl Mark {
    fn new() -> Mark {
        Mark {
            waiting: None,
            durable: (0, 0),
            written: (0, 0),
            written_at: Instant::now(),
            every: MARK_EVERY,
        }
    }

    /// The end to write into segment `seq`'s header now, if it is time and there is more to
    /// claim than the header says.
    fn due(&mut self, seq: u64) -> Option<usize> {
        let (durable_seq, end) = self.durable;
        if durable_seq != seq || self.written == self.durable || end <= HEADER {
            return None;
        }
        let now = Instant::now();
        if now.duration_since(self.written_at) < self.every {
            return None;
        }
        self.written = self.durable;
        self.written_at = now;
        Some(end)
    }
}

/// A full segment waiting for its seal ([`write_seal`]).
struct Seal {
    ticket: Ticket,
    file: Arc<File>,
    salt: u32,
    end: u64,
}

/// Gathered records for one file: the file, their offset, their bytes (shared between the
/// spool and the batch that writes them).
type Gathered = (Arc<File>, u64, Arc<Vec<u8>>);

impl Spool {
    /// Opens (creating) the spool of `core` under `root`: scans this core's segments to
    /// rebuild the reclaim index, deletes what holds nothing live, and writes new records to a
    /// new segment. Recovering the messages themselves is [`recover`](crate::recover)'s job.
    pub fn open(root: &Path, core: u32, options: SpoolOptions) -> Result<Spool, SpoolError> {
        let dir = root.join(core.to_string());
        if !dir.exists() {
            crate::segment::create_private_dir(&dir).map_err(SpoolError::at(&dir))?;
            sync_dir(root).map_err(SpoolError::at(root))?;
        } else {
            // A spool made before its directories were private (or by hand): closing the
            // core's directory keeps the mail in it from other users, whatever its files'
            // own modes.
            crate::segment::make_private(&dir);
        }
        let mut files = Vec::new();
        let mut stray_last = 0;
        for entry in std::fs::read_dir(&dir).map_err(SpoolError::at(&dir))? {
            let entry = entry.map_err(SpoolError::at(&dir))?;
            let name = entry.file_name();
            let name = name.to_str().unwrap_or_default();
            if let Some(seq) = parse_name(name) {
                if is_regular_file(&entry.path()) {
                    files.push((seq, entry.path()));
                } else {
                    // Not a segment (recovery reports it); its name stays taken.
                    stray_last = stray_last.max(seq);
                }
            } else if is_temp_name(name) {
                // A segment whose making was cut off: it never held a record.
                let path = entry.path();
                std::fs::remove_file(&path).map_err(SpoolError::at(&path))?;
            }
        }
        files.sort_unstable();
        let mut index = Index::default();
        let mut last = 0;
        let mut kept = Vec::new();
        for (seq, path) in files {
            last = seq;
            if segment_is_blank(&path)? || crate::recover::segment_holds_nothing(&path)? {
                // Its creation was cut off, or it was made ahead and never written: it holds
                // no record. Left in place, each restart behind a message still queued in an
                // older segment would keep one more such segment, reserved in full on disk.
                std::fs::remove_file(&path).map_err(SpoolError::at(&path))?;
                continue;
            }
            let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
            index.add_segment(seq, bytes, true);
            kept.push(path);
        }
        let found = recover_core(&dir, core)?;
        // A copy found in place of its original (docs/durability.md, "Copying forward") may
        // be in the page cache only: written, and the process gone before the sync meant for
        // it. The original's segments may go below, and the copy must not then be lost to a
        // power cut: every segment is made durable first. Where that fails, nothing is
        // deleted in this run (the next opening tries again).
        let copies_durable = found.superseded == 0
            || kept
                .iter()
                .all(|path| File::open(path).and_then(|f| f.sync_data()).is_ok());
        // Past every ID a record names, not only the messages still found: a status whose
        // message was reclaimed, or a start never finished, must not meet its ID again (a
        // new message would take that status for its own).
        let id_floor = found.newest_id_micros.saturating_add(1);
        let mut scratch = Fields(Vec::new());
        for m in &found.messages {
            if !m.is_final() {
                index.pin(m.start_seq);
                // What a copy of it would write: its records, and one status record for each
                // recipient with an outcome.
                let statuses: u64 = (0u32..)
                    .zip(&m.statuses)
                    .filter_map(|(rcpt, s)| {
                        let s = s.as_ref()?;
                        scratch.0.clear();
                        s.encode(&m.queue_id, rcpt, &mut scratch);
                        Some(record_len(scratch.0.len()) as u64)
                    })
                    .sum();
                index.set_live(
                    m.queue_id.clone(),
                    m.start_seq,
                    m.records + statuses,
                    m.statuses.clone(),
                );
            }
        }
        // Segments with damaged records, and those between a damaged message's first and
        // last records (one of them lost the records it misses), and the one holding the
        // envelope of a message cut off by damage (for whoever tells its sender).
        let mut damaged: Vec<u64> = found.corrupt_at.iter().map(|l| l.segment).collect();
        for (start, end) in &found.damaged_at {
            damaged.extend(start.segment..=end.segment);
        }
        for c in &found.cut_off {
            damaged.extend([c.start.segment, c.damage.segment]);
        }
        damaged.sort_unstable();
        damaged.dedup();
        drop(found);
        let next_seq = last.max(stray_last) + 1;
        if next_seq > u64::from(u32::MAX) {
            // Segment numbers are 32 bits (in names and in draft numbers): the next segment
            // would be one no later opening or recovery reads, and mail acknowledged in it
            // would be lost at the next start.
            let path = dir.join(file_name(next_seq - 1));
            return Err(SpoolError::Io(std::io::Error::other(format!(
                "{}: no segment can follow this one ({} is the highest number a segment may \
                 have); move the file away if it is not postern's, or deliver this core's \
                 mail from a fresh spool",
                path.display(),
                u32::MAX
            ))));
        }
        let mut spool = Spool {
            dir,
            core,
            options,
            seg: None,
            spare: None,
            spare_pending: false,
            reserve: 0,
            seg_keep: Keep::All,
            spare_refused: None,
            spare_seq: 0,
            next_seq,
            newest_used: 0,
            next_draft: (next_seq << 32) + 1,
            poisoned_below: 0,
            counter: 0,
            id_floor,
            id: NEXT_SPOOL_ID.fetch_add(1, Ordering::Relaxed),
            scratch: Vec::with_capacity(1024),
            index,
            damaged,
            commits: Commits::default(),
            dirty: Vec::new(),
            unwritten: Vec::new(),
            in_flight: Vec::new(),
            in_flight_seq: 0,
            syncing: None,
            reclaim_after_sync: false,
            to_seal: Vec::new(),
            mark: Mark::new(),
            unlink_later: false,
            to_unlink: Vec::new(),
            unlinks_out: false,
            deleting_stopped: false,
            drafts_moved: 0,
            grown: 0,
            moved_bytes: 0,
            moving: false,
            move_drafts: true,
        };
        spool.deleting_stopped = !copies_durable;
        // Segments left with nothing live by the last run go now. One that cannot go yet (a
        // damaged one to set aside on a full disk) stays where it is, in the index, for the
        // next reclaim, whose error the embedding reports: a spool that holds mail to deliver
        // must not fail to open for a segment that holds none.
        let _ = spool.reclaim();
        Ok(spool)
    }

    /// The number the next segment this opening makes will take: every one it writes is
    /// numbered from here up.
    pub(crate) fn next_segment(&self) -> u64 {
        self.next_seq
    }

    /// The core this spool belongs to.
    pub fn core(&self) -> u32 {
        self.core
    }

    /// Bytes of segment files in this core's directory (all reserved on disk).
    pub fn bytes_in_use(&self) -> u64 {
        self.index.bytes() + self.spare.as_ref().map_or(0, Segment::size)
    }

    /// Largest payload one record may carry.
    fn max_payload(&self) -> usize {
        self.options.segment_size as usize - HEADER - RECORD_HEADER - 8
    }

    /// After a failure (a sync or a write): every ticket issued so far has failed and every
    /// draft begun so far fails at finish, so nothing appended until now needs to reach the
    /// disk. The current segment is left as it is, its gathered records and those waiting for
    /// older segments dropped, and no file written so far is synced again: a file whose sync
    /// fails for good would fail every later batch with it, the new messages in other
    /// segments too, and records of a newer segment could reach the disk without older ones.
    fn abandon_all(&mut self) {
        if let Some(mut old) = self.seg.take() {
            let _ = old.take_pending();
        }
        self.unwritten.clear();
        self.dirty.clear();
    }

    /// Stops writing to the current segment (full).
    fn retire_current(&mut self) {
        if let Some(mut old) = self.seg.take() {
            if let Some((at, bytes)) = old.take_pending() {
                self.unwritten.push((old.file.clone(), at, Arc::new(bytes)));
            }
            self.mark_dirty(&old.file);
        }
    }

    /// The segment to write a record of `len` bytes into, starting a new one when needed; one
    /// made here must leave free what `keep` says of the reserve, and a record goes into a
    /// segment made for records that leave less only once that much is free again (new mail
    /// filling a segment made out of the reserve would leave the copy it was for no room).
    fn segment_for(&mut self, len: usize, keep: Keep) -> Result<&mut Segment, SpoolError> {
        if len > self.options.segment_size as usize - HEADER {
            return Err(SpoolError::TooLarge(len));
        }
        let fits = self.seg.as_ref().is_some_and(|s| s.room() >= len);
        if fits && keep.of(self.reserve) > self.seg_keep.of(self.reserve) {
            self.check_reserve(keep)?;
            self.seg_keep = keep;
        }
        if !fits {
            // A full segment is sealed once all it holds is durable: the ticket issued now
            // covers its last record. (One left by a failed write is not current any more,
            // and is never sealed.)
            // No segment is made out of more of the reserve than `keep` allows (a spare is made
            // only past all of it, so taking one leaves it as it was): looked at before
            // anything changes.
            // A spare deleted by another process (the spool's files removed by hand) would
            // take mail into a file no start reads: a new one is made instead.
            if self
                .spare
                .as_ref()
                .is_some_and(|spare| !still_linked(&spare.file))
            {
                self.spare = None;
            }
            if self.spare.is_none() {
                self.check_reserve(keep)?;
            }
            if let Some(full) = self.seg.as_ref() {
                let seal = Seal {
                    ticket: self.commits.issue(),
                    file: full.file.clone(),
                    salt: full.salt,
                    end: full.end() as u64,
                };
                self.to_seal.push(seal);
            }
            self.retire_current();
            // A segment made ahead of time off the core when there is one; otherwise make it
            // here (file, reservation and two fsyncs: the slow path).
            let (seg, made_for) = match self.spare.take() {
                Some(seg) => (seg, Keep::All),
                None if self.next_seq > u64::from(u32::MAX) => {
                    // Segment numbers are 32 bits: a segment past the last would be a file
                    // no opening or recovery reads, and mail acknowledged in it would be
                    // lost at the next start. New mail is refused instead (for now).
                    return Err(SpoolError::Io(std::io::Error::other(format!(
                        "{}: no segment can follow {} (the highest number a segment may \
                         have); new mail waits until the queue is delivered and the spool \
                         moved to a fresh directory",
                        self.dir.display(),
                        file_name(self.next_seq - 1)
                    ))));
                }
                None => {
                    let seg = create_past_reserve(
                        &self.dir,
                        self.core,
                        self.next_seq,
                        self.options.segment_size,
                        keep.of(self.reserve),
                    )
                    .map_err(SpoolError::from_io)?;
                    self.next_seq += 1;
                    (seg, keep)
                }
            };
            self.seg_keep = made_for;
            self.index.add_segment(seg.seq, seg.size(), false);
            self.newest_used = self.newest_used.max(seg.seq);
            self.seg = Some(seg);
        }
        self.seg.as_mut().ok_or(SpoolError::UnknownDraft)
    }

    fn mark_dirty(&mut self, file: &Arc<File>) {
        if !self.dirty.iter().any(|f| Arc::ptr_eq(f, file)) {
            self.dirty.push(file.clone());
        }
    }

    /// Appends one record; returns the segment it went to and where its payload starts.
    fn append_record(
        &mut self,
        kind: Kind,
        pieces: &[&[u8]],
    ) -> Result<(&Segment, usize), SpoolError> {
        self.append_record_keeping(kind, pieces, Keep::Nothing)
    }

    /// [`Spool::append_record`], leaving free what `keep` says of the reserve.
    fn append_record_keeping(
        &mut self,
        kind: Kind,
        pieces: &[&[u8]],
        keep: Keep,
    ) -> Result<(&Segment, usize), SpoolError> {
        let len = record_len(pieces.iter().map(|p| p.len()).sum());
        let bulk = matches!(pieces, [_, bulk] if bulk.len() >= BULK_WRITE);
        self.segment_for(len, keep)?;
        if !self.moving {
            self.grown = self.grown.saturating_add(len as u64);
        }
        // A write that goes into the file at once (a bulk chunk, or gathered records past
        // PENDING_LIMIT) comes after the gathered records of older segments are in theirs: a
        // crash must never leave a later record on file without an earlier one that only a
        // sync would have written (recovery would see a message with a hole in its body).
        // Those records wait in `unwritten`, or in the batch being synced (written here too:
        // the same bytes at the same place). Also that batch's records of this very segment:
        // left to the sync thread, a kill in the middle of its write tears them under valid
        // records written here after them, which recovery cannot take for a torn tail.
        let at_once = |seg: &Segment| bulk || seg.pending_len() + len >= PENDING_LIMIT;
        if let Some(seg) = self.seg.as_ref().filter(|s| at_once(s)) {
            let behind_in_flight = !self.in_flight.is_empty() && seg.seq >= self.in_flight_seq;
            if behind_in_flight || !self.unwritten.is_empty() {
                if let Err(e) = self.write_behind(behind_in_flight) {
                    self.fail_unwritten();
                    return Err(SpoolError::from_io(e));
                }
            }
        }
        let seg = self.seg.as_mut().ok_or(SpoolError::UnknownDraft)?;
        let written = match pieces {
            [head, bulk] if bulk.len() >= BULK_WRITE => seg.append_bulk(kind, head, bulk),
            _ => {
                seg.zero_ahead(len);
                Ok(seg.append(kind, pieces))
            }
        };
        // Gathered records beyond PENDING_LIMIT go into the file now, so that memory stays
        // bounded while a slow sync runs.
        let written = written.and_then(|at| {
            if seg.pending_len() >= PENDING_LIMIT {
                if let Some((offset, bytes)) = seg.take_pending() {
                    pwrite_all(&seg.file, &bytes, offset)?;
                }
            }
            Ok(at)
        });
        let file = seg.file.clone();
        self.mark_dirty(&file);
        match written {
            Ok(at) => Ok((self.seg.as_ref().ok_or(SpoolError::UnknownDraft)?, at)),
            Err(e) => {
                // The gathered records before this one may be lost with the failed write.
                self.fail_unwritten();
                Err(SpoolError::from_io(e))
            }
        }
    }

    /// Writes the gathered records of older segments into their files now, oldest first:
    /// those of the batch being synced (with `in_flight`; its thread writes them too), then
    /// those of retired segments, rather than at the next sync. Each file stays listed for
    /// its sync's `fdatasync`.
    fn write_behind(&mut self, in_flight: bool) -> std::io::Result<()> {
        let in_flight = if in_flight {
            std::mem::take(&mut self.in_flight)
        } else {
            Vec::new()
        };
        for (file, at, bytes) in in_flight.iter().chain(&std::mem::take(&mut self.unwritten)) {
            pwrite_all(file, bytes, *at)?;
        }
        Ok(())
    }

    /// After a failed write of gathered records (other drafts' and finished messages' among
    /// them): like a failed sync, every ticket not yet synced fails, every draft begun so far
    /// fails at finish, and later records go to a new segment. Nothing whose records may be
    /// missing can be reported durable.
    fn fail_unwritten(&mut self) {
        self.commits.fail_issued();
        self.note_failed_statuses();
        self.poisoned_below = self.next_draft;
        self.abandon_all();
    }

    /// Starts a message: writes its envelope and returns the draft to append the body to. A
    /// new segment it needs leaves the whole reserve free ([`Spool::set_reserve`]).
    pub fn begin(&mut self, meta: &MessageMeta) -> Result<Draft, SpoolError> {
        self.begin_new(meta, Keep::All)
    }

    /// Starts a message made here to finish other mail (a failure report): like
    /// [`Spool::begin`], but it may take half the reserve, as a failing message's bounce is
    /// what lets it leave the queue.
    pub fn begin_report(&mut self, meta: &MessageMeta) -> Result<Draft, SpoolError> {
        self.begin_new(meta, Keep::Half)
    }

    fn begin_new(&mut self, meta: &MessageMeta, keep: Keep) -> Result<Draft, SpoolError> {
        self.counter += 1;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let micros = queue_id::time_for(now, self.id_floor, self.counter);
        self.id_floor = micros;
        let queue_id = queue_id::make(micros, self.core, self.counter);
        self.begin_as(meta, queue_id, keep)
    }

    /// Starts a message under `queue_id` (a new one's, or a live one's being copied), its
    /// records leaving free what `keep` says of the reserve.
    fn begin_as(
        &mut self,
        meta: &MessageMeta,
        queue_id: String,
        keep: Keep,
    ) -> Result<Draft, SpoolError> {
        let no = self.next_draft;
        self.next_draft += 1;
        let mut f = Fields(std::mem::take(&mut self.scratch));
        f.0.clear();
        f.u64(no).bytes(queue_id.as_bytes());
        meta.encode(&mut f);
        let written = self
            .append_record_keeping(Kind::Start, &[&f.0], keep)
            .map(|(s, at)| {
                let start = Piece {
                    map: s.read.clone(),
                    start: at,
                    end: at + f.0.len(),
                };
                (s.seq, start)
            });
        let records = record_len(f.0.len()) as u64;
        self.scratch = f.0;
        let (seq, start) = written?;
        self.index.pin(seq);
        self.index.draft_in(seq);
        Ok(Draft {
            spool: self.id,
            seq,
            later: Vec::new(),
            no,
            queue_id,
            size: 0,
            records,
            start,
            pieces: Vec::new(),
            recipients: u32::try_from(meta.recipients.len()).unwrap_or(u32::MAX),
            broken: false,
            keep,
            grown_at: self.grown,
        })
    }

    /// Appends body bytes as they arrive, in records of at most one segment each. On an error
    /// the draft can still be aborted (and must be: it will not finish). A draft that holds
    /// old segments while other mail fills the spool behind it is moved forward first
    /// (written again at the end), so that the segments it held can go
    /// ([`Spool::holds_back`]).
    pub fn append(&mut self, draft: &mut Draft, bytes: &[u8]) -> Result<(), SpoolError> {
        if draft.spool != self.id {
            return Err(SpoolError::UnknownDraft);
        }
        if self.holds_back(draft) {
            self.move_forward(draft)?;
        }
        self.append_body(draft, bytes)
    }

    /// Whether `draft`, a message still being received, holds old segments while the spool
    /// grows behind it with other mail: at least two segments it wrote nothing into came
    /// after the one with its `START`, and since it began (or was last moved, or a move of it
    /// was refused) other records took at least two segments and twice what its own records
    /// take. A client trickling a body within the limits (an octet
    /// a command timeout) would otherwise hold every segment from there on for up to its
    /// session's length; a body streaming at speed writes into each segment as it comes, and
    /// is left where it is. Not only the draft in the oldest segment: with many slow
    /// clients, each moving only once the ones before it went would keep a segment of
    /// intake per client and per pause between its pieces. What moves write is not counted
    /// as growth, and the moves of drafts other than the one in the oldest segment write at
    /// most half of what other records take (and two segments) together: slow drafts cannot
    /// move one another on without end, and those that come by most often cannot spend
    /// what the one keeping the oldest segment needs (its own moves are bounded by its own
    /// rule: at most half of the growth between two of them). Not a
    /// draft that will fail at its end anyway (its records may be missing: moved, it would
    /// pass for whole). An embedding that gathers small pieces of a body before appending
    /// them appends at once when this says so. A binary search and a few comparisons: cheap at
    /// every read.
    pub fn holds_back(&self, draft: &Draft) -> bool {
        if !self.move_drafts
            || draft.broken
            || draft.no < self.poisoned_below
            || self.deleting_stopped
        {
            return false;
        }
        let segment = self.options.segment_size;
        let passed =
            (self.index.newer_than(draft.seq) as u64).saturating_sub(draft.later.len() as u64);
        let grown = self.grown.saturating_sub(draft.grown_at);
        let budget = (self.grown / 2).saturating_add(2 * segment);
        // The draft in the oldest segment is what keeps the spool from shrinking: it moves
        // whatever the others spent (its own rule above still bounds its moves).
        let at_front = self.index.newer_than(draft.seq) + 1 == self.index.segments();
        passed >= 2
            && grown >= (2 * segment).max(2 * draft.records)
            && (at_front || self.moved_bytes.saturating_add(draft.records) <= budget)
    }

    /// Moves `draft` forward: its envelope and the body so far written again at the end of
    /// the spool under a new draft number, then an `ABORT` for the old one (where it fits),
    /// so that the segments it held go once nothing else keeps them. Its records so far are
    /// put in their files first (gathered ones wait for a sync otherwise), to be read back
    /// from there. A draft is never acknowledged before its `END` is durable, so the old
    /// records may go before the new ones are: a crash in between loses only what a crash
    /// loses anyway (the message was not taken). Where the copy cannot be written whole (no
    /// room, the reserve), it is abandoned and the draft stays as it was, where it was, not
    /// moved again before the spool grows as much once more. An error that failed every
    /// draft begun so far (a failed write) is returned: this one fails at its end.
    fn move_forward(&mut self, draft: &mut Draft) -> Result<(), SpoolError> {
        let on_file = self
            .write_behind(!self.in_flight.is_empty())
            .and_then(|()| {
                let Some(seg) = self.seg.as_mut() else {
                    return Ok(());
                };
                match seg.take_pending() {
                    Some((offset, bytes)) => pwrite_all(&seg.file, &bytes, offset),
                    None => Ok(()),
                }
            });
        if let Err(e) = on_file {
            self.fail_unwritten();
            draft.broken = true;
            return Err(SpoolError::from_io(e));
        }
        self.moving = true;
        let moved = self.write_again(draft);
        self.moving = false;
        draft.grown_at = self.grown;
        match moved {
            Ok(moved) => {
                self.moved_bytes = self.moved_bytes.saturating_add(moved.records);
                let old = std::mem::replace(draft, moved);
                self.write_abort(old.no);
                self.index.unpin(old.seq);
                self.draft_over(&old, false);
                self.drafts_moved += 1;
                Ok(())
            }
            // Every draft begun so far fails at its end: said, as for any failed write.
            Err(e) if draft.no < self.poisoned_below => {
                draft.broken = true;
                Err(e)
            }
            Err(_) => Ok(()),
        }
    }

    /// A copy of `draft` (its envelope and body so far) at the end of the spool, as a draft
    /// of its own; on an error, the part written is abandoned.
    fn write_again(&mut self, draft: &Draft) -> Result<Draft, SpoolError> {
        let no = self.next_draft;
        self.next_draft += 1;
        let mut start = draft
            .start
            .map
            .range(draft.start.start, draft.start.end)
            .to_vec();
        start[..8].copy_from_slice(&no.to_le_bytes());
        let (seq, piece) = self
            .append_record_keeping(Kind::Start, &[&start], draft.keep)
            .map(|(s, at)| {
                let piece = Piece {
                    map: s.read.clone(),
                    start: at,
                    end: at + start.len(),
                };
                (s.seq, piece)
            })?;
        self.index.pin(seq);
        self.index.draft_in(seq);
        let mut moved = Draft {
            spool: self.id,
            seq,
            later: Vec::new(),
            no,
            queue_id: draft.queue_id.clone(),
            size: 0,
            records: record_len(start.len()) as u64,
            start: piece,
            pieces: Vec::with_capacity(draft.pieces.len()),
            recipients: draft.recipients,
            broken: false,
            keep: draft.keep,
            grown_at: 0,
        };
        for p in &draft.pieces {
            if let Err(e) = self.append_body(&mut moved, p.map.range(p.start, p.end)) {
                self.abort(moved);
                return Err(e);
            }
        }
        Ok(moved)
    }

    /// An `ABORT` for draft `no`, best effort: only where it fits the segment in use (or a
    /// spare is ready), since recovery needs none (a draft without `END` is never reported)
    /// and making a segment here would stall the core on its fsyncs. It keeps a draft that
    /// ended without its `END` from being named as cut off by later damage (recovery).
    fn write_abort(&mut self, no: u64) {
        let fits = self.seg.as_ref().is_some_and(|s| s.room() >= record_len(8));
        if fits || self.spare.is_some() {
            let _ = self.append_record(Kind::Abort, &[&no.to_le_bytes()]);
        }
    }

    /// Appends body bytes to `draft`, in records of at most one segment each.
    fn append_body(&mut self, draft: &mut Draft, bytes: &[u8]) -> Result<(), SpoolError> {
        let no = draft.no.to_le_bytes();
        let max_body = self.max_payload() - 8;
        let mut rest = bytes;
        while !rest.is_empty() {
            // Fill what is left of the current segment before starting another; the slack
            // covers the record header, the draft number and alignment.
            let room = self.seg.as_ref().map_or(0, Segment::room);
            let fits = room.saturating_sub(RECORD_HEADER + 8 + 7);
            let take = if fits > 0 { fits } else { max_body }
                .min(max_body)
                .min(rest.len());
            let appended =
                self.append_record_keeping(Kind::Body, &[&no, &rest[..take]], draft.keep);
            let (seg, at) = match appended {
                Ok(appended) => appended,
                Err(e) => {
                    // Part of the body may be in: an END after it would make a message
                    // cut short look whole.
                    draft.broken = true;
                    return Err(e);
                }
            };
            let start = at + no.len();
            let seq = seg.seq;
            draft.pieces.push(Piece {
                map: seg.read.clone(),
                start,
                end: start + take,
            });
            if seq > draft.later.last().copied().unwrap_or(draft.seq) {
                self.index.draft_in(seq);
                draft.later.push(seq);
            }
            rest = &rest[take..];
            draft.size += take as u64;
            draft.records += record_len(no.len() + take) as u64;
        }
        Ok(())
    }

    /// Ends a message; it is durable once its ticket is (see [`Spool::ticket_state`]).
    pub fn finish(&mut self, draft: Draft) -> Result<Ticket, SpoolError> {
        self.finish_inner(draft, false).map(|(t, _)| t)
    }

    /// Ends a message like [`Spool::finish`] and also returns its body, to be read straight
    /// from the read-only mapping once the ticket is durable: [`Spool::body`] hands the
    /// [`MessageRef`] out then, and not before, since the sync that makes the ticket durable
    /// is what writes the message's gathered records into the file. No syscall here, so
    /// finishing a small message costs none.
    pub fn finish_with_body(&mut self, draft: Draft) -> Result<(Ticket, PendingBody), SpoolError> {
        let spool = self.id;
        self.finish_inner(draft, false).map(|(ticket, body)| {
            (
                ticket,
                PendingBody {
                    spool,
                    ticket,
                    body,
                },
            )
        })
    }

    /// The body of a finished message, once its ticket is durable (its bytes are then in the
    /// file and never written again); the pending body back while it is not, or when it
    /// comes from another spool (or an earlier opening of this one).
    pub fn body(&self, pending: PendingBody) -> Result<MessageRef, PendingBody> {
        if pending.spool == self.id && self.is_durable(pending.ticket) {
            Ok(pending.body)
        } else {
            Err(pending)
        }
    }

    /// Ends a draft: a new message (it becomes live), or the copy of a live one (`copy`: see
    /// [`Spool::copy_forward`]).
    fn finish_inner(
        &mut self,
        draft: Draft,
        copy: bool,
    ) -> Result<(Ticket, MessageRef), SpoolError> {
        if draft.spool != self.id {
            return Err(SpoolError::UnknownDraft);
        }
        if draft.no < self.poisoned_below {
            // An ABORT where it fits: damage found later does not name it (recovery).
            self.write_abort(draft.no);
            self.index.unpin(draft.seq);
            self.draft_over(&draft, false);
            return Err(SpoolError::SyncFailed(
                "a sync covering this message's records failed".into(),
            ));
        }
        if draft.broken {
            self.write_abort(draft.no);
            self.index.unpin(draft.seq);
            self.draft_over(&draft, false);
            return Err(SpoolError::SyncFailed(
                "an append of this message's body failed".into(),
            ));
        }
        let mut end = [0u8; 16];
        end[..8].copy_from_slice(&draft.no.to_le_bytes());
        end[8..].copy_from_slice(&draft.size.to_le_bytes());
        let end_seq = match self.append_record(Kind::End, &[&end]) {
            Ok((seg, _)) => seg.seq,
            Err(e) => {
                self.index.unpin(draft.seq);
                // Part of its END may be on file, where its other records are. (One in a
                // segment made for it alone may go: its client was refused, and that
                // message is better never delivered than delivered beside its resend.)
                self.draft_over(&draft, true);
                return Err(e);
            }
        };
        self.index.keep(end_seq);
        self.draft_over(&draft, true);
        let records = draft.records + record_len(end.len()) as u64;
        let body = MessageRef::new(&draft.queue_id, draft.size, draft.pieces);
        if !copy {
            self.index
                .set_live(draft.queue_id, draft.seq, records, Vec::new());
        } else if !self.index.copy_written(&draft.queue_id, draft.seq, records) {
            // Final meanwhile (the caller checks before it copies; kept for safety): the
            // copy's records stay, the message they belong to final by its statuses.
            self.index.unpin(draft.seq);
        }
        Ok((self.commits.issue(), body))
    }

    /// A draft is over: each segment it wrote into counts it no more, and keeps its records
    /// (`kept`: finished) or may go once nothing else holds it (abandoned).
    fn draft_over(&mut self, draft: &Draft, kept: bool) {
        for &seq in std::iter::once(&draft.seq).chain(&draft.later) {
            self.index.draft_out(seq, kept);
        }
    }

    /// Abandons a message: recovery will not report it. Best effort: the `ABORT` record needs
    /// no sync, since a message without `END` is not reported either.
    pub fn abort(&mut self, draft: Draft) {
        if draft.spool == self.id {
            self.write_abort(draft.no);
            self.index.unpin(draft.seq);
            // Its records will never be read as a message: the segments only it (and others
            // abandoned) wrote into go at the next reclaim, whatever older mail still waits.
            self.draft_over(&draft, false);
        }
    }

    /// Records the outcome for recipient `rcpt` (its index in the envelope) of message
    /// `queue_id`, in this core's spool whatever core owns the message; durable once the
    /// returned ticket is. Recovery merges statuses of all cores; reclaim relies on the copy in
    /// the owner's spool (docs/durability.md, "Status records").
    pub fn append_status(
        &mut self,
        queue_id: &str,
        rcpt: u32,
        status: &Status,
    ) -> Result<Ticket, SpoolError> {
        self.append_status_record(queue_id, rcpt, status, true)
            .map(|(ticket, _)| ticket)
    }

    /// [`Spool::append_status`], with the octets the record takes; `track`: whether a
    /// failure of its ticket marks the message ([`Spool::status_lost`]), and whether the
    /// record counts among the message's own (not for a copy's records: a copy that fails
    /// leaves the message where it was, its own records untouched, and one that succeeds
    /// counts them itself).
    fn append_status_record(
        &mut self,
        queue_id: &str,
        rcpt: u32,
        status: &Status,
        track: bool,
    ) -> Result<(Ticket, u64), SpoolError> {
        let mut f = Fields(std::mem::take(&mut self.scratch));
        f.0.clear();
        status.encode(queue_id, rcpt, &mut f);
        // A deferral (written at every retry of every waiting recipient) lets no message leave
        // the queue, and losing one costs only an earlier retry after a restart: it keeps the
        // reserve, as new mail does; a final outcome may take half of it; a copy's records
        // (`track` false), which carry the outcomes over, all of it.
        let keep = match (track, status.is_final()) {
            (false, _) => Keep::Nothing,
            (true, true) => Keep::Half,
            (true, false) => Keep::All,
        };
        let written = self
            .append_record_keeping(Kind::Status, &[&f.0], keep)
            .map(|(seg, _)| seg.seq);
        let bytes = record_len(f.0.len()) as u64;
        self.scratch = f.0;
        // A status must stay as long as the message it settles may be read.
        self.index.keep(written?);
        let ticket = self.commits.issue();
        self.index.set_status(
            queue_id,
            rcpt,
            status,
            track.then_some(ticket.0),
            if track { bytes } else { 0 },
        );
        Ok((ticket, bytes))
    }

    /// Whether a status record of live message `queue_id` appended in this run was in a write
    /// or a sync that failed: its latest ticket may be durable while an earlier record of it
    /// was lost, so that a restart would not find that outcome. Conservative: also true when
    /// a later record of that recipient made up for the lost one. False for a message not
    /// live here.
    pub fn status_lost(&self, queue_id: &str) -> bool {
        self.index.status_lost(queue_id)
    }

    /// After a failed write or sync: marks the live messages with a status record among the
    /// tickets that failed ([`Spool::status_lost`]).
    fn note_failed_statuses(&mut self) {
        let commits = &self.commits;
        self.index
            .note_failed_statuses(|t| commits.state(Ticket(t)) == TicketState::Failed);
    }

    /// The live messages to copy forward now ([`Spool::copy_forward`]), by queue ID: those
    /// whose `START` is in the oldest segment, when nothing else keeps it and the spool behind
    /// it has grown to twice what is live and a segment more (docs/durability.md,
    /// "Reclaiming space"). Usually none. At most `most`: the next call hands out the rest
    /// (those not copied yet), without looking through every live message again.
    pub fn next_to_copy(&mut self, most: usize) -> Vec<String> {
        if self.deleting_stopped {
            // Nothing copied would be freed in this run.
            return Vec::new();
        }
        let current = self.seg.as_ref().map(|s| s.seq);
        self.index
            .next_to_copy(current, self.options.segment_size, most)
    }

    /// Writes live message `queue_id` again at the end of the spool, under its own queue ID,
    /// with its envelope (`meta`, as spooled), its body (`body`, read from where it is) and
    /// the outcome of each recipient recorded so far; Ok(None) when it is not live here or a
    /// copy of it is on its way already. Once the returned ticket is durable, give the
    /// outcome to [`Spool::copy_over`]: the message's old segments are then kept for it no
    /// more, and its body is read from the copy ([`Spool::body`]). Until then, and if it
    /// fails, the message stays where it was. Recovery takes the later of two copies of one
    /// message, with the outcomes written after that copy's `START` (the copy's own, written
    /// before its `END`, and any later).
    pub fn copy_forward(
        &mut self,
        queue_id: &str,
        meta: &MessageMeta,
        body: &MessageRef,
    ) -> Result<Option<(Ticket, PendingBody)>, SpoolError> {
        let Some(statuses) = self.index.copyable(queue_id) else {
            return Ok(None);
        };
        let mut draft = self.begin_as(meta, queue_id.to_owned(), Keep::Nothing)?;
        for chunk in body.chunks() {
            if let Err(e) = self.append(&mut draft, chunk) {
                self.abort(draft);
                return Err(e);
            }
        }
        // The outcomes go before the copy's END: a recovery that finds the END finds them
        // (a scan stops at the first hole), and takes them in place of every record of the
        // message before the copy's START.
        for (rcpt, status) in statuses.iter().enumerate() {
            let Some(status) = status else { continue };
            match self.append_status_record(queue_id, rcpt as u32, status, false) {
                Ok((_, bytes)) => draft.records += bytes,
                Err(e) => {
                    self.abort(draft);
                    return Err(e);
                }
            }
        }
        let (ticket, copied) = self.finish_inner(draft, true)?;
        Ok(Some((
            ticket,
            PendingBody {
                spool: self.id,
                ticket,
                body: copied,
            },
        )))
    }

    /// The copy [`Spool::copy_forward`] wrote of `queue_id` is durable (`durable`), or its
    /// ticket failed: in the first case the segments that held the message before are
    /// released and reclaimed, as far as nothing older keeps them. Returns the number of
    /// segments deleted.
    pub fn copy_over(&mut self, queue_id: &str, durable: bool) -> Result<usize, SpoolError> {
        self.index.copy_over(queue_id, durable);
        if durable {
            self.reclaim()
        } else {
            Ok(0)
        }
    }

    /// Forgets a message of this core whose recipients all have final, durable status records
    /// in this spool, and deletes the segments that no longer hold anything live, oldest first
    /// (docs/durability.md, "Reclaiming space"). Returns the number of segments deleted.
    pub fn mark_final(&mut self, queue_id: &str) -> Result<usize, SpoolError> {
        self.index.set_final(queue_id);
        self.reclaim()
    }

    /// Lets go of a finished message whose ticket failed: its client was refused, so nothing
    /// here delivers it, and the segments it holds may be deleted like those of a message
    /// delivered. Without this a failed sync would keep them, and every later one, for the
    /// rest of the run, since segments are deleted oldest first. Returns the number of
    /// segments deleted.
    ///
    /// Its records may have reached the disk all the same (a failed sync does not say which
    /// pages did not), so each of its `recipients` also gets a final status, written after
    /// the failure: once a later sync makes it durable, a restart before the message's
    /// segments go does not take it for mail to deliver, beside the copy its client sends
    /// again. Until then a restart may still deliver it (a duplicate, never a loss).
    /// Returns the segments deleted, and the ticket of the last status written (None when a
    /// write failed), for a caller that writes them again should their sync fail
    /// ([`Spool::withdraw`]).
    pub fn forget_failed(
        &mut self,
        queue_id: &str,
        recipients: u32,
    ) -> Result<(usize, Option<Ticket>), SpoolError> {
        // The disk may fail again: the restart's duplicate is all that is at stake.
        let ticket = self.withdraw(queue_id, recipients);
        self.index.set_final(queue_id);
        Ok((self.reclaim()?, ticket))
    }

    /// Appends the final statuses [`Spool::forget_failed`] writes for a message refused to its
    /// client (again, when the sync that was to make them durable failed too); the ticket
    /// of the last, or None when an append failed.
    pub fn withdraw(&mut self, queue_id: &str, recipients: u32) -> Option<Ticket> {
        let withdrawn = Status {
            state: DeliveryState::Failed,
            reply: WITHDRAWN.to_owned(),
        };
        let mut last = None;
        for rcpt in 0..recipients {
            last = Some(self.append_status(queue_id, rcpt, &withdrawn).ok()?);
        }
        last
    }

    /// Deletes segments from the oldest while they hold nothing live (no open draft, no live
    /// message), never the one being written; returns how many. [`Spool::mark_final`] and
    /// [`Spool::open`] call it; call it also now and then on a core that writes mostly status
    /// records, whose full segments nothing else would release.
    pub fn reclaim(&mut self) -> Result<usize, SpoolError> {
        if self.deleting_stopped {
            return Ok(0);
        }
        self.reclaim_after_sync = false;
        let in_use = [self.seg.as_ref().map(|s| s.seq), self.syncing];
        let mut deleted = 0;
        let mut first_error = None;
        while let Some((seq, bytes)) = self.index.pop_free(in_use) {
            let path = self.dir.join(file_name(seq));
            let damaged = self.damaged.binary_search(&seq).is_ok();
            if damaged && (!self.to_unlink.is_empty() || self.unlinks_out) {
                // Set aside now, it would leave the scan before older segments still waiting
                // to be deleted: it waits for them, at the front of the index.
                self.index.put_back(seq, bytes, true);
                break;
            }
            if self.unlink_later && !damaged {
                self.to_unlink.push(Freed {
                    seq,
                    bytes,
                    kept: true,
                    path,
                });
                deleted += 1;
                continue;
            }
            let gone = if damaged {
                self.set_aside(&path)
            } else {
                std::fs::remove_file(&path)
            };
            match gone {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) if damaged => {
                    // No room for `damaged/`: renamed in place, out of the scan, which a
                    // rename in the same directory can be without new space. Left as it is,
                    // its messages (final, their statuses in the newer segments freed next)
                    // would be delivered again at the next start.
                    let in_place = self.set_aside_in_place(&path);
                    // Gone already: renamed by an earlier try whose directory sync failed.
                    if in_place.is_err_and(|e| e.kind() != std::io::ErrorKind::NotFound) {
                        // Kept, and everything behind it with it, until one of the two works.
                        self.index.put_back(seq, bytes, true);
                        first_error = Some(e);
                        break;
                    }
                    // Out of the scan: counted as freed, the error still reported.
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    self.index.put_back(seq, bytes, true);
                    first_error = Some(e);
                    break;
                }
            }
            deleted += 1;
        }
        // Then, out of order, the segments only abandoned drafts wrote into: a body refused
        // as too large, or cut off by its client, must not hold its segments until the
        // oldest mail waiting is delivered (days, for a next hop that is down), or repeated
        // attempts would fill the disk. Nothing in them is read by a recovery.
        while first_error.is_none() {
            let Some((seq, bytes)) = self.index.pop_unused(in_use) else {
                break;
            };
            let path = self.dir.join(file_name(seq));
            if self.unlink_later {
                self.to_unlink.push(Freed {
                    seq,
                    bytes,
                    kept: false,
                    path,
                });
                deleted += 1;
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    self.index.put_back(seq, bytes, false);
                    first_error = Some(e);
                    break;
                }
            }
            deleted += 1;
        }
        // The segment the batch being synced was taken in, would it go now, goes after
        // the batch ([`Spool::reclaim_after_sync`]).
        self.reclaim_after_sync |= self.syncing.is_some_and(|seq| self.index.would_go(seq));
        match first_error {
            Some(e) => Err(SpoolError::from_io(e)),
            None => Ok(deleted),
        }
    }

    /// Whether [`Spool::reclaim`] passed over a segment only because the batch being synced
    /// was taken in it: call it again once [`Spool::sync_done`] has been told.
    pub fn reclaim_after_sync(&self) -> bool {
        self.reclaim_after_sync && self.syncing.is_none()
    }

    /// Has [`Spool::reclaim`] hand freed segments out through [`Spool::take_unlinks`], to be
    /// deleted elsewhere ([`unlink_segments`]), instead of deleting them itself: freeing a
    /// segment's reserved extents takes a millisecond or two of the caller's thread. Damaged
    /// segments are still set aside at once. A segment freed and not yet deleted when the
    /// process ends holds only final messages, and the next [`Spool::open`] deletes it.
    pub fn set_unlink_later(&mut self, later: bool) {
        self.unlink_later = later;
    }

    /// The segments freed since the last call, oldest first, to delete in that order (an
    /// older segment's messages may be final by status records in a newer one, so the newer
    /// must not go first).
    pub fn take_unlinks(&mut self) -> Vec<Freed> {
        let freed = std::mem::take(&mut self.to_unlink);
        self.unlinks_out |= !freed.is_empty();
        freed
    }

    /// Whether freed segments wait to be handed out ([`Spool::take_unlinks`]).
    pub fn has_unlinks(&self) -> bool {
        !self.to_unlink.is_empty()
    }

    /// The segments last handed out are deleted: a damaged segment behind them may be set
    /// aside now.
    pub fn unlinks_done(&mut self) {
        self.unlinks_out = false;
    }

    /// Deleting stops for the rest of this run (the deleting of a batch went wrong and what
    /// is left of it is not known): what waits goes back to the index, which keeps counting
    /// it, and nothing more is freed. The next [`Spool::open`] deletes what is left, in order.
    pub fn stop_deleting(&mut self) {
        self.keep_undeleted(Vec::new());
        self.deleting_stopped = true;
    }

    /// Takes back segments [`unlink_segments`] could not delete (the first failure and every
    /// one after it), with those freed since and not yet handed out, all newer: they go back
    /// to the front of the index, oldest first, as if never freed, so that no newer segment
    /// is deleted before them (its status records may be what makes their messages final).
    /// The next [`Spool::reclaim`] tries again.
    pub fn keep_undeleted(&mut self, undeleted: Vec<Freed>) {
        self.unlinks_out = false;
        let pending = std::mem::take(&mut self.to_unlink);
        for f in undeleted.into_iter().chain(pending).rev() {
            self.index.put_back(f.seq, f.bytes, f.kept);
        }
    }

    /// Renames a damaged segment in its own directory to a name the scan passes over
    /// (`NNNNNNNNNN.seg.damaged`, numbered after it when taken), where [`crate::kept_damage`]
    /// finds it.
    fn set_aside_in_place(&self, path: &Path) -> std::io::Result<()> {
        let Some(name) = path.file_name() else {
            return Ok(());
        };
        let name = name.to_string_lossy();
        let mut to = self.dir.join(format!("{name}{DAMAGED_SUFFIX}"));
        let mut n = 1;
        while to.exists() {
            to = self.dir.join(format!("{name}{DAMAGED_SUFFIX}.{n}"));
            n += 1;
        }
        std::fs::rename(path, to)?;
        sync_dir(&self.dir)
    }

    /// Moves a segment with damaged records into the core's `damaged` directory, where it is
    /// kept for the operator to look at instead of deleted with the evidence.
    fn set_aside(&self, path: &Path) -> std::io::Result<()> {
        let aside = self.dir.join(DAMAGED_DIR);
        crate::segment::create_private_dir(&aside)?;
        let Some(name) = path.file_name() else {
            return Ok(());
        };
        // Segment numbers start again at 1 once a core's directory is empty: never over
        // evidence set aside before.
        let mut to = aside.join(name);
        let mut n = 1;
        while to.exists() {
            to = aside.join(format!("{}.{n}", name.to_string_lossy()));
            n += 1;
        }
        std::fs::rename(path, to)?;
        sync_dir(&aside)?;
        sync_dir(&self.dir)
    }

    /// Whether drafts that hold old segments are moved forward (the default). An embedding
    /// that delivers nothing (it holds all it takes) frees no segment behind a moved draft,
    /// and turns it off: the moves would be writes for nothing.
    pub fn set_move_drafts(&mut self, on: bool) {
        self.move_drafts = on;
    }

    /// Messages still being received that were moved forward in this run, so that the
    /// segments they held could go ([`Spool::append`]).
    pub fn drafts_moved(&self) -> u64 {
        self.drafts_moved
    }

    /// Messages of this core that are finished and not yet final.
    pub fn live_messages(&self) -> usize {
        self.index.live()
    }

    /// The octets the records of this core's live messages take (one status record for each
    /// recipient with an outcome): about what copying them all forward would write.
    pub fn live_bytes(&self) -> u64 {
        self.index.live_bytes()
    }

    /// Whether the finished message `queue_id` is held here and not yet final.
    pub fn is_live(&self, queue_id: &str) -> bool {
        self.index.is_live(queue_id)
    }

    /// Segment files of this core (the spare not counted).
    pub fn segment_count(&self) -> usize {
        self.index.segments()
    }

    /// The sync work for every ticket issued since the last batch, if any. Run it anywhere
    /// ([`SyncBatch::run`]) and report with [`Spool::sync_done`] before the next batch is
    /// taken: one batch at a time (postern's store does so). Two at once would share a file's
    /// write-back error, which only one of them is told, and the records of the first still
    /// being written are no longer known to the appends that must not overtake them.
    pub fn take_sync(&mut self) -> Option<SyncBatch> {
        let range = self.commits.take()?;
        let mut writes = std::mem::take(&mut self.unwritten);
        if let Some(seg) = self.seg.as_mut() {
            if let Some((at, bytes)) = seg.take_pending() {
                writes.push((seg.file.clone(), at, Arc::new(bytes)));
            }
            self.in_flight_seq = seg.seq;
        }
        self.syncing = self.seg.as_ref().map(|seg| seg.seq);
        self.in_flight.clone_from(&writes);
        let mut files = std::mem::take(&mut self.dirty);
        if let Some(seg) = self.seg.as_ref() {
            // This batch makes the records before the current end durable; an earlier one's
            // may let the header say so now (with this batch's sync). One claim waits at a
            // time.
            if self.mark.waiting.is_none() {
                self.mark.waiting = Some((Ticket(range.1), seg.seq, seg.end()));
            }
            if let Some(end) = self.mark.due(seg.seq) {
                let bytes = mark_bytes(seg.salt, end as u64).to_vec();
                writes.push((seg.file.clone(), SEAL_AT as u64, Arc::new(bytes)));
                if !files.iter().any(|f| Arc::ptr_eq(f, &seg.file)) {
                    files.push(seg.file.clone());
                }
            }
        }
        Some(SyncBatch {
            current: self.seg.as_ref().map(|seg| seg.file.clone()),
            files,
            writes,
            range,
        })
    }

    /// At a stop, after the last [`Spool::sync_now`]: moves the mark of the segment being
    /// written to where its records are durable now, and syncs it (one more small write and
    /// sync), so that a quiet segment is covered to its end. Best effort: a failure only
    /// leaves the mark where it was.
    pub fn mark_durable_end(&mut self) {
        // Not while a batch syncs the same file: a write-back error is told to one
        // `fdatasync` of the file only, and this one, which cannot fail any ticket, could
        // take it from the batch, whose tickets would then read durable.
        if !self.commits.idle() {
            return;
        }
        let Some(seg) = self.seg.as_ref() else {
            return;
        };
        let (seq, end) = self.mark.durable;
        if seq != seg.seq || end <= HEADER || self.mark.written == self.mark.durable {
            return;
        }
        let bytes = mark_bytes(seg.salt, end as u64);
        if pwrite_all(&seg.file, &bytes, SEAL_AT as u64).is_ok() && seg.file.sync_data().is_ok() {
            self.mark.written = self.mark.durable;
        }
    }

    /// Whether the header of the segment being written claims less than is durable, with no
    /// batch on its way that will move it: the last batch before a quiet spell. See
    /// [`Spool::mark_tick`].
    pub fn mark_lags(&self) -> bool {
        let Some(seg) = self.seg.as_ref() else {
            return false;
        };
        let (seq, end) = self.mark.durable;
        seq == seg.seq
            && end > HEADER
            && self.mark.written != self.mark.durable
            && self.mark.waiting.is_none()
            && self.commits.idle()
    }

    /// In a quiet spell, once the mark's interval has passed since it was last written: asks
    /// for one more batch, which only writes the mark of the segment being written (and syncs
    /// it), so that its last records before the quiet spell are covered too. True when a
    /// batch is now waiting for [`Spool::take_sync`].
    pub fn mark_tick(&mut self) -> bool {
        if !self.mark_lags() || self.mark.written_at.elapsed() < self.mark.every {
            return false;
        }
        self.commits.issue();
        true
    }

    /// How long until a lagging mark is due ([`Spool::mark_tick`]); None when it does not lag.
    pub fn mark_due_in(&self) -> Option<Duration> {
        self.mark_lags().then(|| {
            self.mark
                .every
                .saturating_sub(self.mark.written_at.elapsed())
        })
    }

    /// How often the segment being written has its mark moved on (default: a second; tests
    /// set zero to have every batch write it).
    pub fn set_mark_interval(&mut self, every: Duration) {
        self.mark.every = every;
    }

    /// Records the outcome of a batch from [`Spool::take_sync`]. After a failure every ticket
    /// issued so far fails, every draft begun so far fails at finish, and the current segment
    /// is abandoned (docs/durability.md, "Faults").
    pub fn sync_done(&mut self, batch: SyncBatch, result: std::io::Result<()>) {
        self.in_flight.clear();
        self.syncing = None;
        let ok = result.is_ok();
        self.commits.done(batch.range, ok);
        if !ok {
            self.note_failed_statuses();
            self.poisoned_below = self.next_draft;
            self.abandon_all();
        }
        if let Some((ticket, seq, end)) = self.mark.waiting {
            match self.commits.state(ticket) {
                TicketState::Pending => {}
                TicketState::Durable => {
                    self.mark.durable = (seq, end);
                    self.mark.waiting = None;
                }
                TicketState::Failed => self.mark.waiting = None,
            }
        }
        self.seal_durable();
    }

    /// Seals the full segments whose records are all durable now (best effort: a seal lost
    /// only takes away a check). Their files are synced again with the next batch, which a
    /// ticket issued here asks for: without it they would wait, held open, for the next
    /// message or status, and a segment deleted meanwhile (all its messages aborted, say)
    /// would keep its space on disk until then.
    fn seal_durable(&mut self) {
        let mut sealed = Vec::new();
        let commits = &self.commits;
        self.to_seal.retain(|s| match commits.state(s.ticket) {
            TicketState::Pending => true,
            TicketState::Failed => false,
            TicketState::Durable => {
                if write_seal(&s.file, s.salt, s.end).is_ok() {
                    sealed.push(s.file.clone());
                }
                false
            }
        });
        if !sealed.is_empty() {
            self.commits.issue();
        }
        for file in sealed {
            self.mark_dirty(&file);
        }
    }

    /// Whether tickets wait for a batch ([`Spool::take_sync`] would return one): after an
    /// [`Spool::abort`] that filled segments, their seals and the records gathered for them.
    pub fn sync_wanted(&self) -> bool {
        !self.commits.all_batched()
    }

    /// Fails every ticket issued and not yet durable, those of a batch still syncing too
    /// (whose later success then proves nothing): for a stop that cannot wait for that
    /// batch, so that nobody waiting is told a message is stored.
    pub fn fail_pending(&mut self) {
        self.commits.fail_issued();
        self.note_failed_statuses();
    }

    /// Where `ticket` stands.
    pub fn ticket_state(&self, ticket: Ticket) -> TicketState {
        self.commits.state(ticket)
    }

    /// Whether `ticket` is durable.
    pub fn is_durable(&self, ticket: Ticket) -> bool {
        self.ticket_state(ticket) == TicketState::Durable
    }

    /// Syncs everything pending now, on this thread (tests, benchmarks, shutdown).
    pub fn sync_now(&mut self) -> Result<(), SpoolError> {
        if let Some(batch) = self.take_sync() {
            let result = batch.run();
            let err = result.as_ref().err().map(ToString::to_string);
            self.sync_done(batch, result);
            if let Some(e) = err {
                return Err(SpoolError::SyncFailed(e));
            }
        }
        Ok(())
    }

    /// Keeps `bytes` of the spool's file system free of new mail: a segment for new mail is
    /// made (or made ahead) only where that much stays free after it, and new mail goes into
    /// a segment made out of the reserve only once it is whole again. Deferrals, delay
    /// warnings and success reports keep it as new mail does; what finishes mail (final
    /// outcomes, failure reports, [`Spool::begin_report`]) may take half of it; the copy of a
    /// waiting message forward, and the end of a message whose records are in, all of it.
    /// Without it, a disk filled with new mail while a message waits in the oldest segment
    /// stays full: that message cannot be copied forward (which needs a segment), so the
    /// segments behind it, delivered or not, are never deleted. 0 (the default) keeps none.
    pub fn set_reserve(&mut self, bytes: u64) {
        self.reserve = bytes;
    }

    /// Fails with [`SpoolError::NoSpace`] when a new segment would leave less free on the
    /// spool's file system than `keep` says of the reserve.
    fn check_reserve(&self, keep: Keep) -> Result<(), SpoolError> {
        let reserve = keep.of(self.reserve);
        match room_past_reserve(&self.dir, self.options.segment_size, reserve) {
            Ok(()) => Ok(()),
            Err(e) => Err(SpoolError::NoSpace(e)),
        }
    }

    /// The work of making the next segment ahead of time, when none is ready or being made.
    /// Run it off the core and hand the result to [`Spool::install_spare`].
    pub fn spare_job(&mut self) -> Option<SpareJob> {
        // Past the last segment number, none is made (see `segment_for`).
        if self.spare.is_some() || self.spare_pending || self.next_seq > u64::from(u32::MAX) {
            return None;
        }
        // Refused for the reserve a moment ago: asked for at every message, it would only be
        // refused again.
        if self
            .spare_refused
            .is_some_and(|at| at.elapsed() < SPARE_AFTER_REFUSAL)
        {
            return None;
        }
        self.spare_pending = true;
        self.spare_seq = self.next_seq;
        let job = SpareJob {
            dir: self.dir.clone(),
            core: self.core,
            seq: self.next_seq,
            size: self.options.segment_size,
            reserve: self.reserve,
        };
        self.next_seq += 1;
        Some(job)
    }

    /// Whether the start of a message with this envelope should wait for the spare being
    /// made: one is on its way and the current segment (if any) has no room for the start
    /// record and [`FIRST_WRITES`] more. (A body that outgrows the segment later still makes
    /// the next one itself when no spare is ready.) Waiting a moment beats making the next segment inline, which on a nearly full
    /// disk fails where the spare fits (and the spare is then deleted unused).
    pub fn start_awaits_spare(&mut self, meta: &MessageMeta) -> bool {
        if !self.spare_pending {
            return false;
        }
        let Some(room) = self.seg.as_ref().map(Segment::room) else {
            return true;
        };
        let mut f = Fields(std::mem::take(&mut self.scratch));
        f.0.clear();
        // Laid out as `begin` lays it out: draft number, queue ID, envelope.
        f.u64(0).bytes(&[0; queue_id::LEN]);
        meta.encode(&mut f);
        let len = record_len(f.0.len());
        self.scratch = f.0;
        // The trace header the session writes right after it, and the first bytes of the body,
        // should not start the next segment inline either.
        room < len + FIRST_WRITES
    }

    /// Takes a segment made by a [`SpareJob`]. A spare that arrives after the spool had to make
    /// a later segment itself is deleted unused, so segments are always used in number order
    /// (also when that later segment has been reclaimed meanwhile: abandoned by a failed sync,
    /// say, with nothing live in it or before it).
    pub fn install_spare(&mut self, made: std::io::Result<PreparedSegment>) {
        self.spare_pending = false;
        let seg = match made {
            Ok(PreparedSegment(seg)) => seg,
            Err(e) => {
                if is_reserve_refusal(&e) {
                    self.spare_refused = Some(Instant::now());
                    // No file was made: its number is given back unless a later one is taken.
                    if self.next_seq == self.spare_seq + 1 {
                        self.next_seq = self.spare_seq;
                    }
                }
                return;
            }
        };
        if self.newest_used > seg.seq || self.index.last().is_some_and(|last| last > seg.seq) {
            let _ = std::fs::remove_file(self.dir.join(file_name(seg.seq)));
        } else {
            self.spare = Some(seg);
        }
    }
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.dir)
            .field("core", &self.core)
            .field("segment", &self.seg.as_ref().map(|s| s.seq))
            .field("segments", &self.index.segments())
            .field("live", &self.index.live())
            .finish()
    }
}

/// Room a message's first records after its start take, besides the start record: its trace
/// header and the first of its body (a read's worth).
const FIRST_WRITES: usize = 64 * 1024;

/// Whether a segment file is blank (creation cut off before it was synced): nothing but
/// zeros. Zeros over its header with anything behind them are damage, not a creation cut off.
fn segment_is_blank(path: &Path) -> Result<bool, SpoolError> {
    use std::io::Read;
    // The header and the first record's first: what nearly every segment is ruled out by.
    let mut file = File::open(path).map_err(SpoolError::at(path))?;
    let mut head = Vec::with_capacity(HEADER + RECORD_HEADER);
    // One that cannot be read is not blank as far as this says: recovery reports it.
    if (&mut file)
        .take((HEADER + RECORD_HEADER) as u64)
        .read_to_end(&mut head)
        .is_err()
        || header(&head) != Header::Blank
    {
        return Ok(false);
    }
    // Read through, not touched through a mapping where a page may not come back.
    let (map, failed) = crate::map::ReadMap::readable(&file).map_err(SpoolError::at(path))?;
    Ok(failed.is_none() && header(map.range(0, map.len())) == Header::Blank)
}

/// A segment freed by [`Spool::reclaim`] and handed out ([`Spool::take_unlinks`]) to be
/// deleted by [`unlink_segments`].
#[derive(Debug)]
pub struct Freed {
    seq: u64,
    bytes: u64,
    /// Freed in order (false: out of order, as only abandoned drafts wrote into it).
    kept: bool,
    /// The segment file.
    pub path: PathBuf,
}

/// Deletes segments from [`Spool::take_unlinks`] in order, stopping at the first that cannot
/// be deleted (one already gone is no error): on failure returns that one and those after it,
/// for [`Spool::keep_undeleted`], with why. Left on disk, they hold only final messages, and
/// the next [`Spool::open`] deletes them, oldest first.
pub fn unlink_segments(freed: Vec<Freed>) -> Result<(), (Vec<Freed>, std::io::Error)> {
    let mut freed = freed.into_iter();
    while let Some(f) = freed.next() {
        match std::fs::remove_file(&f.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err((std::iter::once(f).chain(freed).collect(), e)),
        }
    }
    Ok(())
}
