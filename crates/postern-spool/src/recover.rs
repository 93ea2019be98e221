//! Recovery: read every segment of every core, check every record, and rebuild the messages
//! that were finished, with their recipients' latest statuses (docs/durability.md).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::body::{MessageRef, Piece};
use crate::error::SpoolError;
use crate::format::{read_record, record_len, Cursor, Kind, Read, HEADER, RECORD_HEADER};
use crate::map::ReadMap;
use crate::meta::{MessageMeta, Status};
use crate::segment::{header, marked_end, parse_name, sealed_end, Header};

/// A message found whole.
#[derive(Debug)]
pub struct RecoveredMessage {
    /// Its queue ID.
    pub queue_id: String,
    /// Its envelope and trace facts.
    pub meta: MessageMeta,
    /// The core whose spool holds it (its owner).
    pub core: u32,
    /// The latest outcome of each recipient (by envelope index), None while never tried.
    pub statuses: Vec<Option<Status>>,
    /// The body, read from the mapping.
    body: MessageRef,
    /// The segment holding the message's START record.
    pub(crate) start_seq: u64,
    /// How many status records the scan had read when it read this message's START: those
    /// of its core before it are not its own (see `apply_statuses`).
    statuses_before: usize,
    /// A corrupt record was found between its START and its END: perhaps one of its own
    /// status records (see `keep_latest_copies`).
    tainted: bool,
    /// Its `END` lies before its segment's seal or durable mark, which are written only once
    /// what they cover is durable: the message was on disk, not in the page cache alone (see
    /// `keep_latest_copies`).
    known_durable: bool,
    /// The octets of its `START`, body and `END` records.
    pub(crate) records: u64,
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
        self.body.len()
    }

    /// The body handle (`Send + Sync`, no copy), to hand to the relay.
    pub fn body(&self) -> &MessageRef {
        &self.body
    }
}

/// Where a skipped record was, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordLocation {
    /// The core directory.
    pub core: u32,
    /// The segment number.
    pub segment: u64,
    /// Byte offset of the record in the segment file.
    pub offset: u64,
}

/// A message whose `START` was read, with damage after it and no `END`: its last records (the
/// `END` among them) may have been lost to the damage, so it may have been acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CutOffMessage {
    /// Its queue ID, as its `250` gave it.
    pub queue_id: String,
    /// The reverse path, empty for `<>`: whom to tell.
    pub reverse_path: String,
    /// How many recipients it had.
    pub recipients: usize,
    /// Where its `START` is.
    pub start: RecordLocation,
    /// The first damage after it.
    pub damage: RecordLocation,
}

/// A segment file that could not be read past `at` (its offset: page aligned).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadError {
    /// Where the read failed.
    pub at: RecordLocation,
    /// The error the read gave.
    pub error: String,
}

/// What recovery found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Finished messages, in the order they were finished per core.
    pub messages: Vec<RecoveredMessage>,
    /// Records (or segment headers) skipped because their CRC, kind or layout was wrong,
    /// other than a torn tail.
    pub corrupt_records: u64,
    /// Where each corrupt record was.
    pub corrupt_at: Vec<RecordLocation>,
    /// Segments whose last record was incomplete (a crash or power loss while writing): the
    /// normal trace of a crash, not corruption.
    pub torn_tails: u64,
    /// Messages started but never finished or aborted (cut off by a crash).
    pub unfinished: u64,
    /// Finished messages missing body records (lost to corruption): not reported.
    pub damaged: u64,
    /// Where each damaged message's first record (`START`) and last (`END`) are: the records
    /// it lost lie between them.
    pub damaged_at: Vec<(RecordLocation, RecordLocation)>,
    /// Messages started with damage after their `START` and no `END` found: counted in
    /// `unfinished` too. A crash cuts off only what was never acknowledged, and its torn
    /// tail is no damage; these may have lost their `END` to the damage instead, after their
    /// `250`. Not delivered (their bodies are not whole), named so that their senders can
    /// be told. (A message with its `START` lost too is named nowhere.)
    pub cut_off: Vec<CutOffMessage>,
    /// Octets of segment files that could not be read for damage, at most: the rest of a
    /// file from a record whose length runs past its end (with no valid record after it), a
    /// hole before a sealed segment's end or a segment's durable mark with nothing valid
    /// after it, what was cut from the end of a file shorter than it was made, and a file
    /// whose header is bad or names another core or number. The messages whose records lay there are lost and counted nowhere else; the
    /// figure gives their scale (it may hold space never written).
    pub unread_octets: u64,
    /// Segment files that could not be read to their end (a media error: the disk could not
    /// give a page back): where the read failed, and why. Each is damage too (in
    /// `corrupt_at`, with what was past it in `unread_octets`): the scan stops there.
    pub read_errors: Vec<ReadError>,
    /// Status records whose message was not found (already reclaimed, or lost).
    pub orphan_statuses: u64,
    /// Messages found whole more than once (copied forward, the old place not yet deleted):
    /// the earlier copies passed over, the last one kept.
    pub superseded: u64,
    /// The newest time (microseconds) of any queue ID a record names: a message's start,
    /// finished or not, or a status, its message's segment reclaimed or not. A spool opened
    /// again issues no ID with a time below it.
    pub newest_id_micros: u64,
    /// Segments read.
    pub segments: u64,
    /// Segment files with a blank header (creation cut off by a crash): nothing in them.
    pub unused_segments: u64,
    /// Entries named like segments that are not regular files (a directory, say), and
    /// directories named like a core's but not as postern writes the name (`03`): not read,
    /// left where they are.
    pub strays: Vec<PathBuf>,
}

impl Recovered {
    /// Adds what the read of another core found (`found`: its status records, in the order
    /// read) to this and to `statuses`.
    fn add(
        &mut self,
        other: Recovered,
        statuses: &mut Vec<(u32, String, u32, Status)>,
        found: Vec<(u32, String, u32, Status)>,
    ) {
        let Recovered {
            mut messages,
            corrupt_records,
            corrupt_at,
            torn_tails,
            unfinished,
            damaged,
            damaged_at,
            cut_off,
            unread_octets,
            read_errors,
            orphan_statuses,
            newest_id_micros,
            segments,
            unused_segments,
            strays,
            superseded,
        } = other;
        for m in &mut messages {
            m.statuses_before += statuses.len();
        }
        statuses.extend(found);
        self.messages.extend(messages);
        self.corrupt_records += corrupt_records;
        self.corrupt_at.extend(corrupt_at);
        self.torn_tails += torn_tails;
        self.unfinished += unfinished;
        self.damaged += damaged;
        self.damaged_at.extend(damaged_at);
        self.cut_off.extend(cut_off);
        self.unread_octets += unread_octets;
        self.read_errors.extend(read_errors);
        self.orphan_statuses += orphan_statuses;
        self.newest_id_micros = self.newest_id_micros.max(newest_id_micros);
        self.segments += segments;
        self.unused_segments += unused_segments;
        self.strays.extend(strays);
        self.superseded += superseded;
    }

    /// Counts `queue_id` in [`Recovered::newest_id_micros`].
    fn saw_id(&mut self, queue_id: &str) {
        if let Some(t) = crate::queue_id::micros_of(queue_id) {
            self.newest_id_micros = self.newest_id_micros.max(t);
        }
    }

    /// The body of `m`, straight from the mapped segments.
    pub fn body<'a>(&'a self, m: &'a RecoveredMessage) -> impl Iterator<Item = &'a [u8]> + 'a {
        m.body.chunks()
    }

    /// The body of `m` copied into one buffer.
    pub fn body_vec(&self, m: &RecoveredMessage) -> Vec<u8> {
        m.body.to_vec()
    }
}

struct Partial {
    start_seq: u64,
    statuses_before: usize,
    /// The first corrupt record found after its START, if any.
    damage: Option<RecordLocation>,
    /// Offset of the START record in its segment.
    start_at: u64,
    queue_id: String,
    meta: MessageMeta,
    size: u64,
    /// The octets of its records so far.
    records: u64,
    pieces: Vec<Piece>,
    /// It was open where a segment's records ended past its seal or mark (none there): a
    /// power cut may have lost that segment's last writes while a later segment's reached
    /// the disk, and its records there with them.
    open_at_unsealed_end: bool,
}

/// Scans the spool under `root`: every core directory, every segment in number order. Run it
/// at start-up, before any [`Spool`](crate::Spool) writes.
pub fn recover(root: &Path) -> Result<Recovered, SpoolError> {
    // No spool yet is an empty one; one that cannot be listed (a reader allowed to enter
    // the directory and not to read it) is not.
    let cores = match std::fs::read_dir(root) {
        Ok(cores) => cores,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Recovered::default()),
        Err(e) => return Err(SpoolError::at(root)(e)),
    };
    let mut core_dirs: Vec<(u32, PathBuf)> = Vec::new();
    let mut odd = Vec::new();
    // A listing cut short by an error (an I/O error on the directory) fails the recovery: a
    // core's directory left unseen would pass for one with nothing in it.
    for e in cores {
        let e = e.map_err(SpoolError::at(root))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        // A core's directory; a stray file with a number for a name is not one.
        if !e.path().is_dir() {
            continue;
        }
        match crate::core_number(name) {
            Some(core) => core_dirs.push((core, e.path())),
            // `03` or `+3`: no core's directory has that name, so nothing postern does to
            // core 3 (its opening, a fold, reclaiming) would act on it.
            None if name.parse::<u32>().is_ok() => odd.push(e.path()),
            None => {}
        }
    }
    core_dirs.sort();
    let mut out = scan_dirs(&core_dirs)?;
    odd.sort();
    out.strays.extend(odd);
    Ok(out)
}

/// Whether a segment file has a valid header and not one record: a segment made ahead (the
/// spare) or opened by a run that wrote nothing to it. It holds nothing to keep.
///
/// Only the header and the first record's length word are looked at, read (not mapped: a
/// page the disk cannot give back would end the process through a mapping). One that cannot
/// be read holds something as far as this says: recovery reports it.
pub(crate) fn segment_holds_nothing(path: &Path) -> Result<bool, SpoolError> {
    use std::os::unix::fs::FileExt;
    let file = File::open(path).map_err(SpoolError::at(path))?;
    let len = file.metadata().map_err(SpoolError::at(path))?.len();
    let mut head = [0u8; HEADER + RECORD_HEADER];
    let mut n = 0;
    while n < head.len() {
        match file.read_at(&mut head[n..], n as u64) {
            Ok(0) => break,
            Ok(got) => n += got,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Ok(false),
        }
    }
    let data = &head[..n];
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    Ok(match header(data) {
        // A sealed segment held records, whatever its first length word says now.
        Header::Valid { salt, size } => {
            !cut_short(len, size)
                && sealed_end(data, salt).is_none_or(|end| end <= HEADER)
                && marked_end(data, salt).is_none_or(|end| end <= HEADER)
                && data
                    .get(HEADER..)
                    .is_some_and(|rest| matches!(read_record(rest, salt), Read::End))
        }
        _ => false,
    })
}

/// Whether a segment file of `len` bytes is shorter than the `size` it was made with (0: not
/// recorded, in segments of earlier versions).
fn cut_short(len: usize, size: u64) -> bool {
    size != 0 && (len as u64) < size
}

/// Scans one core's directory (what the core's own spool needs at open).
pub(crate) fn recover_core(dir: &Path, core: u32) -> Result<Recovered, SpoolError> {
    scan_dirs(&[(core, dir.to_path_buf())])
}

/// How many times a core is read when segments vanish while it is (a `postern queue` beside
/// a running server).
const READS_WHILE_VANISHING: usize = 3;

fn scan_dirs(core_dirs: &[(u32, PathBuf)]) -> Result<Recovered, SpoolError> {
    let mut out = Recovered::default();
    let mut statuses = Vec::new();
    for &(core, ref dir) in core_dirs {
        // A segment that vanished while the core was read may have held the old place of a
        // message copied forward (docs/durability.md, "Copying forward") into a segment this
        // read did not list, or read before the copy was written: the core is read again,
        // from its start, a few times, before the rule below is relied on.
        let mut reads = 0;
        loop {
            reads += 1;
            let mut one = Recovered::default();
            let mut found = Vec::new();
            let vanished = scan_core(core, dir, &mut one, &mut found)?;
            if !vanished || reads >= READS_WHILE_VANISHING {
                out.add(one, &mut statuses, found);
                break;
            }
        }
    }
    apply_statuses(&mut out, statuses);
    Ok(out)
}

/// Reads the segments of one core into `out` and `statuses`; whether any vanished while it
/// did.
fn scan_core(
    core: u32,
    dir: &Path,
    out: &mut Recovered,
    statuses: &mut Vec<(u32, String, u32, Status)>,
) -> Result<bool, SpoolError> {
    {
        let mut segs: Vec<(u64, PathBuf)> = Vec::new();
        // Segments gone while this scan ran (a `postern queue` beside a running server).
        // Reclaimed ones leave oldest first and only once nothing in them is live, so every
        // message that starts in one or before was final, though the segments with its last
        // statuses may have left before they were read. Out of order, only segments that
        // abandoned drafts alone wrote into go (no finished message's record, no status),
        // and the newest ones holding nothing (a spare made late, an empty one at an
        // opening): see below.
        let mut vanished: Vec<u64> = Vec::new();
        // Not `flatten`: a listing cut short by an error would pass for all the segments,
        // and those unseen for none (their messages never pinned, reclaimed or left behind
        // by a fold).
        let mut listed = Vec::new();
        for e in std::fs::read_dir(dir).map_err(SpoolError::at(dir))? {
            let e = e.map_err(SpoolError::at(dir))?;
            if let Some(seq) = e.file_name().to_str().and_then(parse_name) {
                listed.push((seq, e.path()));
            }
        }
        for (seq, path) in listed {
            match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => segs.push((seq, path)),
                // Reclaimed since the directory was read (a `postern queue` beside a running
                // server): it held nothing live.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    // A link to nothing is still there, and holds nothing.
                    if std::fs::symlink_metadata(&path).is_ok() {
                        out.strays.push(path);
                    } else {
                        vanished.push(seq);
                    }
                }
                Ok(_) => out.strays.push(path),
                // Opening it below reports the error.
                Err(_) => segs.push((seq, path)),
            }
        }
        segs.sort();
        // Draft numbers are unique per core across openings (docs/durability.md).
        let mut open: HashMap<u64, Partial> = HashMap::new();
        // The openings whose drafts wrote records here (a draft number's high half: the
        // first segment the opening wrote).
        let mut openings: std::collections::BTreeSet<u64> = std::collections::BTreeSet::new();
        for (seq, path) in segs {
            let file = match File::open(&path) {
                Ok(file) => file,
                // Reclaimed since the directory was read (a `postern queue` beside a running
                // server): a reclaimed segment held nothing live.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    vanished.push(seq);
                    continue;
                }
                Err(e) => return Err(SpoolError::at(&path)(e)),
            };
            // Read through before it is mapped: a page the disk cannot give back would end
            // the process through the mapping (SIGBUS), at every start; read, it is an error,
            // and the map stops before it.
            let file_len = file.metadata().map_err(SpoolError::at(&path))?.len();
            let (map, failed) = ReadMap::readable(&file).map_err(SpoolError::at(&path))?;
            let map = Arc::new(map);
            let read_failed = failed.is_some();
            if let Some((offset, error)) = failed {
                out.read_errors.push(ReadError {
                    at: RecordLocation {
                        core,
                        segment: seq,
                        offset,
                    },
                    error: error.to_string(),
                });
            }
            // A newer postern's segment is not damage to set aside: nothing is read or
            // changed, and the start (or the listing) ends here, saying so.
            if let Header::Newer(found) = header(map.range(0, map.len())) {
                return Err(SpoolError::NewerFormat {
                    path,
                    found,
                    supported: crate::format::VERSION,
                });
            }
            let mut scan = Scan {
                map: &map,
                core,
                seq,
                open: &mut open,
                openings: &mut openings,
                statuses: &mut *statuses,
                out: &mut *out,
                durable_to: 0,
                file_len,
                read_failed,
            };
            scan.segment();
            #[cfg(test)]
            tests::AFTER_SEGMENT.with(|hook| {
                if let Some(hook) = hook.borrow_mut().as_mut() {
                    hook(seq);
                }
            });
        }
        out.unfinished += open.len() as u64;
        // Unfinished with damage after the start: the damage may have taken the END. Not
        // where the message is found whole all the same (an earlier place of a message
        // copied forward, or of one still being received moved forward, whose copy the
        // damage cut off). Not where the first damage is in a segment a later opening
        // wrote (numbered from that opening's first on): the crash or stop that ended the
        // draft's own opening cut it off before its END, never acknowledged.
        let whole: std::collections::HashSet<&str> = out
            .messages
            .iter()
            .filter(|m| m.core == core)
            .map(|m| m.queue_id.as_str())
            .collect();
        let mut cut_off: Vec<CutOffMessage> = open
            .into_iter()
            .filter_map(|(no, p)| {
                let damage = p.damage?;
                // (A range whose start is past its end would panic: checked first.)
                let from = (no >> 32).saturating_add(1);
                let later_opening = from <= damage.segment
                    && openings.range(from..=damage.segment).next().is_some();
                (!later_opening && !whole.contains(p.queue_id.as_str())).then_some(CutOffMessage {
                    start: RecordLocation {
                        core,
                        segment: p.start_seq,
                        offset: p.start_at,
                    },
                    damage,
                    queue_id: p.queue_id,
                    reverse_path: p.meta.reverse_path,
                    recipients: p.meta.recipients.len(),
                })
            })
            .collect();
        // A message moved forward whose old place had no ABORT is open twice: named once,
        // at its latest place.
        cut_off.sort_by_key(|c| std::cmp::Reverse((c.start.segment, c.start.offset)));
        let mut named = std::collections::HashSet::new();
        cut_off.retain(|c| named.insert(c.queue_id.clone()));
        cut_off.reverse();
        // A reclaim leaves no older segment behind the one it deletes unless that one held
        // nothing a message needs (nothing at all, or only abandoned drafts' records): a
        // segment that went while an older one is still there says nothing of the messages
        // before it.
        // Only regular files count (a stray directory with a segment's name is no segment
        // left behind); a listing that fails now tells nothing, and nothing is inferred.
        let oldest_left = std::fs::read_dir(dir).ok().and_then(|entries| {
            let entries: Vec<_> = entries.collect::<Result<_, _>>().ok()?;
            let oldest = entries
                .into_iter()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .filter_map(|e| parse_name(e.file_name().to_str()?))
                .min()
                .unwrap_or(u64::MAX);
            Some(oldest)
        });
        let any_vanished = !vanished.is_empty();
        let gone =
            oldest_left.and_then(|oldest| vanished.into_iter().filter(|&seq| seq < oldest).max());
        if let Some(gone) = gone {
            out.messages
                .retain(|m| m.core != core || m.start_seq > gone);
            cut_off.retain(|c| c.start.segment > gone);
        }
        out.cut_off.extend(cut_off);
        // After the above: of a message found twice, beside a server that copied it forward
        // and deleted the old place while this read, the old place may be the one known
        // durable (the copy's mark not moved yet), and must not be kept over the copy only
        // to be dropped as gone.
        out.superseded += keep_latest_copies(&mut out.messages, core);
        Ok(any_vanished)
    }
}

/// Keeps one of each message of `core` found whole more than once: the last one written
/// that is known durable. A live message is copied forward (`Spool::copy_forward`) under its
/// own queue ID so that the segments it kept can go, and both stay on disk until they do;
/// the statuses after the kept copy's START are applied to it. A copy not known to be
/// durable (its END past its segment's seal and mark) gives way to an earlier one that is:
/// it may be in the page cache only (a copy whose sync failed, read back by a restart
/// without a reboot, looks whole), and the earlier one's segments, released for it, would go
/// with nothing on disk in their place. Where none is known durable (the original was
/// acknowledged less than a mark's while before a stop, and the copy made in a later run),
/// the earliest is kept: it was durable when it was acknowledged, or when the places before
/// it were let go, which a copy's failed sync never does. Among places known durable, a copy
/// with a corrupt record between its START and END (its outcomes, written there, may have
/// been one) gives way to an earlier one without, whose later statuses include the records
/// before it.
fn keep_latest_copies(messages: &mut Vec<RecoveredMessage>, core: u32) -> u64 {
    let mut chosen: HashMap<&str, usize> = HashMap::new();
    let mut copies = 0u64;
    for (i, m) in messages.iter().enumerate().rev() {
        if m.core != core {
            continue;
        }
        match chosen.entry(m.queue_id.as_str()) {
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(i);
            }
            std::collections::hash_map::Entry::Occupied(mut e) => {
                copies += 1;
                let chosen = &messages[*e.get()];
                let earlier = if m.known_durable != chosen.known_durable {
                    m.known_durable
                } else if !m.known_durable {
                    // Neither known durable: the first, even with a corrupt record in it
                    // (an outcome lost to it is a recipient tried again; a copy in the
                    // page cache alone is a message lost).
                    true
                } else {
                    !m.tainted && chosen.tainted
                };
                if earlier {
                    e.insert(i);
                }
            }
        }
    }
    if copies == 0 {
        return 0;
    }
    let keep: Vec<bool> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| m.core != core || chosen.get(m.queue_id.as_str()) == Some(&i))
        .collect();
    let mut keep = keep.into_iter();
    messages.retain(|_| keep.next().unwrap_or(true));
    copies
}

/// Gives each message its recipients' outcomes. The owner's own records come first, in the
/// order its log holds them: each replaces the one before, except that a final outcome is never
/// replaced by a later deferral (which can only be stale). Only the owner's records after the
/// message's `START` count: a message copied forward carries, after its copy's `START`, the
/// outcome of each recipient as it stood, which the records before sum up (and which stays
/// right once the segments holding those are deleted); a message never copied has no record
/// before its `START`. Records written on other cores then
/// only fill a recipient the owner has nothing for, or turn a deferral into a final outcome
/// (the owner's copy was not durable yet): their order relative to the owner's is unknown.
fn apply_statuses(out: &mut Recovered, statuses: Vec<(u32, String, u32, Status)>) {
    let index: HashMap<&str, usize> = out
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| (m.queue_id.as_str(), i))
        .collect();
    let mut owned = Vec::with_capacity(statuses.len());
    let mut foreign = Vec::new();
    for (at, (core, queue_id, rcpt, status)) in statuses.into_iter().enumerate() {
        if let Some(t) = crate::queue_id::micros_of(&queue_id) {
            out.newest_id_micros = out.newest_id_micros.max(t);
        }
        match index.get(queue_id.as_str()) {
            Some(&i) if out.messages[i].core == core => {
                if at >= out.messages[i].statuses_before {
                    owned.push((i, rcpt as usize, status));
                }
            }
            Some(&i) => foreign.push((i, rcpt as usize, status)),
            None => out.orphan_statuses += 1,
        }
    }
    for (i, rcpt, status) in owned {
        if let Some(slot) = out.messages[i].statuses.get_mut(rcpt) {
            if !slot.as_ref().is_some_and(Status::is_final) {
                *slot = Some(status);
            }
        }
    }
    for (i, rcpt, status) in foreign {
        if let Some(slot) = out.messages[i].statuses.get_mut(rcpt) {
            if slot.is_none() || (status.is_final() && !slot.as_ref().is_some_and(Status::is_final))
            {
                *slot = Some(status);
            }
        }
    }
}

/// The scan of one segment.
struct Scan<'a> {
    map: &'a Arc<ReadMap>,
    core: u32,
    seq: u64,
    open: &'a mut HashMap<u64, Partial>,
    /// The openings whose drafts' records were read (see `scan_core`).
    openings: &'a mut std::collections::BTreeSet<u64>,
    statuses: &'a mut Vec<(u32, String, u32, Status)>,
    out: &'a mut Recovered,
    /// Where the segment's seal or mark says its records were durable to (0: neither).
    durable_to: usize,
    /// The segment file's length; more than the map's where a read failed.
    file_len: u64,
    /// Whether the map ends at a read error rather than at the file's end.
    read_failed: bool,
}

impl Scan<'_> {
    fn corrupt(&mut self, offset: usize) {
        let at = RecordLocation {
            core: self.core,
            segment: self.seq,
            offset: offset as u64,
        };
        for p in self.open.values_mut() {
            p.damage.get_or_insert(at);
        }
        self.out.corrupt_records += 1;
        self.out.corrupt_at.push(at);
    }

    fn segment(&mut self) {
        // No writer runs during recovery: the whole segment may be borrowed.
        let data = self.map.range(0, self.map.len());
        let (salt, size) = match header(data) {
            Header::Valid { salt, size } => (salt, size),
            // Zeros up to a read error are no blank segment: what lay past them is not known.
            Header::Blank if self.read_failed => {
                self.corrupt(0);
                self.out.unread_octets += self.file_len.saturating_sub(data.len() as u64);
                return;
            }
            Header::Blank => {
                self.out.unused_segments += 1;
                return;
            }
            // (A newer format's segment stopped the scan before this one.)
            Header::Bad | Header::Newer(_) => {
                self.corrupt(0);
                if matches!(header(data), Header::Bad) {
                    self.out.unread_octets += self.file_len.max(data.len() as u64);
                }
                return;
            }
        };
        // The header names the core and the number the segment was made as. A file copied
        // or moved by hand under another number or into another core's directory is not
        // read as this one: a copy would deliver its messages twice (its queue IDs beside the
        // original's), a renamed one put them out of order with the statuses that settle
        // them. It is damage, reported and kept for inspection, like a bad header.
        let made_as = (
            u32::from_le_bytes([data[12], data[13], data[14], data[15]]),
            u64::from_le_bytes([
                data[16], data[17], data[18], data[19], data[20], data[21], data[22], data[23],
            ]),
        );
        if made_as != (self.core, self.seq) {
            self.corrupt(0);
            self.out.unread_octets += self.file_len.max(data.len() as u64);
            return;
        }
        self.out.segments += 1;
        // A sealed segment was full, and everything it holds was durable: its records end
        // where the seal says, so a zero length word before that is damage (zeros over a
        // length word, a lost write), not the end of what was written.
        let sealed = sealed_end(data, salt).filter(|&end| end <= data.len());
        // A segment still being written has a mark instead: its records were durable up to
        // there, so before it a crash leaves nothing to read as a torn tail or an end.
        let marked = sealed
            .is_none()
            .then(|| marked_end(data, salt).filter(|&end| end <= data.len()))
            .flatten();
        self.durable_to = sealed.or(marked).unwrap_or(0);
        let mut pos = HEADER;
        let mut last_corrupt = None;
        let mut overrun = false;
        // Whether the records end at zeros past what the mark says was durable, in a segment
        // without a seal: where a crash's lost writes end them.
        let mut unsealed_end = false;
        // The CRC work the rescans below may do in this segment, all together.
        let mut rescan = data.len().saturating_mul(4).max(1 << 20);
        loop {
            match read_record(&data[pos..], salt) {
                Read::End => {
                    // A sealed segment has no torn tail: a bad record before the end is
                    // damage, and so is an end found anywhere but where the seal says.
                    if let Some(end) = sealed {
                        if let Some(at) = last_corrupt.take() {
                            self.corrupt(at);
                        }
                        if pos != end {
                            self.corrupt(pos);
                        }
                    } else if let Some(mark) = marked {
                        if let Some(at) = last_corrupt.take_if(|at| *at < mark) {
                            self.corrupt(at);
                        }
                        if pos < mark {
                            self.corrupt(pos);
                        }
                    }
                    // Before the seal's end or the mark everything was durable: zeros there
                    // are a hole in records that go on, not the end of what was written. The
                    // scan goes on from the next valid record in it, so that the messages
                    // after the hole are not lost with it (each record found has this
                    // segment's salt, which no copy from elsewhere carries).
                    let limit = sealed.or(marked).unwrap_or(0);
                    if let Some(next) = resume_before(data, pos, limit, salt, &mut rescan) {
                        pos = next;
                        continue;
                    }
                    // A hole with nothing valid after it before the seal's end or the mark:
                    // what was durable there is lost.
                    self.out.unread_octets += limit.saturating_sub(pos) as u64;
                    unsealed_end = sealed.is_none() && pos >= limit;
                    break;
                }
                Read::Overrun => {
                    // Damage, not a crash: reported where it is (with a bad record before it,
                    // that one too), and the segment is kept. (In a file cut short, the
                    // record the cut went through.)
                    if let Some(at) = last_corrupt.take() {
                        self.corrupt(at);
                    }
                    self.corrupt(pos);
                    // Before the seal's end or the mark, the records went on past this one
                    // (its length word is what was damaged): the scan goes on from the next
                    // valid record, as past a zeroed one. Past them, what follows is lost
                    // to the scan.
                    let limit = sealed.or(marked).unwrap_or(0);
                    if let Some(next) = resume_before(data, pos, limit, salt, &mut rescan) {
                        pos = next;
                        continue;
                    }
                    overrun = true;
                    self.out.unread_octets += (data.len() - pos) as u64;
                    break;
                }
                Read::Corrupt { len } => {
                    if let Some(at) = last_corrupt.replace(pos) {
                        self.corrupt(at);
                    }
                    // The CRC does not cover the length word: a damaged one may claim more
                    // than its record held, and the jump would pass over good records (in a
                    // segment without a seal, landing on zeros would even read as a torn
                    // tail). A valid record inside the span shows the length was wrong: the
                    // scan goes on from there, and the bad record is reported as damage.
                    match valid_record_within(&data[pos..], len, salt, &mut rescan) {
                        Rescan::Found(at) => pos += at,
                        Rescan::None => pos += len,
                        Rescan::OutOfBudget => {
                            // Not looked at in full: whatever follows, this record counts as
                            // damage (the segment is kept), never as a crash's torn tail.
                            if let Some(at) = last_corrupt.take() {
                                self.corrupt(at);
                            }
                            pos += len;
                        }
                    }
                }
                Read::Record { kind, payload, len } => {
                    if let Some(at) = last_corrupt.take() {
                        self.corrupt(at);
                    }
                    self.record(kind, payload, pos + RECORD_HEADER);
                    pos += len;
                }
            }
        }
        // A bad record followed by nothing is the record a crash cut off.
        if last_corrupt.is_some() {
            self.out.torn_tails += 1;
        }
        if unsealed_end || last_corrupt.is_some() {
            for p in self.open.values_mut() {
                p.open_at_unsealed_end = true;
            }
        }
        // A file shorter than it was made lost what was past its end to damage, not to a
        // crash (its size is reserved before it gets its name): damage where it ends, unless
        // already reported at the record the cut went through. So did a file that could not
        // be read past where its map ends (a media error).
        // (A read error past a sealed segment's end, in space never written, loses nothing.)
        let cut = if self.read_failed {
            sealed.is_none()
        } else {
            cut_short(data.len(), size)
        };
        if cut {
            let made = if size == 0 { self.file_len } else { size };
            self.out.unread_octets += made.saturating_sub(data.len() as u64);
            if !overrun {
                self.corrupt(data.len());
            }
        }
    }

    /// One valid record whose payload starts at `at`.
    fn record(&mut self, kind: Kind, payload: &[u8], at: usize) {
        let mut c = Cursor(payload);
        let Some(no) = c.u64() else {
            self.corrupt(at - RECORD_HEADER);
            return;
        };
        if kind != Kind::Status {
            self.openings.insert(no >> 32);
        }
        match kind {
            Kind::Status => match Status::decode(no, &mut c) {
                Some((rcpt, queue_id, status)) => {
                    self.statuses.push((self.core, queue_id, rcpt, status));
                }
                None => self.corrupt(at - RECORD_HEADER),
            },
            Kind::Start => {
                let queue_id = c.bytes().and_then(|b| String::from_utf8(b.to_vec()).ok());
                match (queue_id, MessageMeta::decode(&mut c)) {
                    (Some(queue_id), Some(meta)) => {
                        self.out.saw_id(&queue_id);
                        let partial = Partial {
                            start_seq: self.seq,
                            statuses_before: self.statuses.len(),
                            damage: None,
                            start_at: (at - RECORD_HEADER) as u64,
                            queue_id,
                            meta,
                            size: 0,
                            records: record_len(payload.len()) as u64,
                            pieces: Vec::new(),
                            open_at_unsealed_end: false,
                        };
                        if self.open.insert(no, partial).is_some() {
                            self.out.unfinished += 1;
                        }
                    }
                    _ => self.corrupt(at - RECORD_HEADER),
                }
            }
            Kind::Body => {
                if let Some(p) = self.open.get_mut(&no) {
                    p.size += (payload.len() - 8) as u64;
                    p.records += record_len(payload.len()) as u64;
                    p.pieces.push(Piece {
                        map: self.map.clone(),
                        start: at + 8,
                        end: at + payload.len(),
                    });
                }
            }
            Kind::End => {
                let size = c.u64();
                if let Some(p) = self.open.remove(&no) {
                    if size != Some(p.size) && p.open_at_unsealed_end && p.damage.is_none() {
                        // Body records lost at the end of an earlier segment, where nothing
                        // said they were durable: a batch that wrote there and into a later
                        // segment, cut by a power cut that let the later pages reach the disk
                        // first. Never acknowledged (that takes the whole batch's sync, and
                        // the earlier segment's seal after it): cut off by a crash, no damage.
                        self.out.unfinished += 1;
                    } else if size == Some(p.size) {
                        let n = p.meta.recipients.len();
                        self.out.messages.push(RecoveredMessage {
                            statuses: vec![None; n],
                            start_seq: p.start_seq,
                            statuses_before: p.statuses_before,
                            tainted: p.damage.is_some(),
                            known_durable: at - RECORD_HEADER + record_len(payload.len())
                                <= self.durable_to,
                            records: p.records + record_len(payload.len()) as u64,
                            body: MessageRef::new(&p.queue_id, p.size, p.pieces),
                            queue_id: p.queue_id,
                            meta: p.meta,
                            core: self.core,
                        });
                    } else {
                        self.out.damaged += 1;
                        let at_record = |segment, offset| RecordLocation {
                            core: self.core,
                            segment,
                            offset,
                        };
                        self.out.damaged_at.push((
                            at_record(p.start_seq, p.start_at),
                            at_record(self.seq, (at - RECORD_HEADER) as u64),
                        ));
                    }
                }
            }
            Kind::Abort => {
                self.open.remove(&no);
            }
        }
    }
}

/// Where the scan of a segment goes on after damage at `pos` (zeros over a length word, or
/// one that runs past the file) before `limit`, the seal's end or the mark, before which the
/// records went on: the next valid record after it, within the look's bound, or `limit`
/// itself where a record starts there (the seal's end and the mark lie on a record boundary:
/// where the damage is the last record before the mark, the records past it, made durable by
/// later batches, start there). None: nothing to go on from.
fn resume_before(
    data: &[u8],
    pos: usize,
    limit: usize,
    salt: u32,
    rescan: &mut usize,
) -> Option<usize> {
    if pos >= limit {
        return None;
    }
    if let Rescan::Found(at) = valid_record_within(&data[pos..], limit - pos, salt, rescan) {
        return Some(pos + at);
    }
    matches!(
        data.get(limit..).map(|rest| read_record(rest, salt)),
        Some(Read::Record { .. })
    )
    .then_some(limit)
}

/// What a look inside a bad record's claimed span found.
enum Rescan {
    /// A valid record at this offset: the length word was wrong.
    Found(usize),
    /// None: the length is believed.
    None,
    /// The segment's CRC budget ran out before the span was looked at in full.
    OutOfBudget,
}

/// The offset, within the first `len` octets of `data` (a record that failed its CRC), of the
/// first record there that passes it: 8-aligned, as records are. None when there is none, as
/// in a record cut off by a crash, whose span holds only its own payload (a copy of records
/// from another segment in a body never passes: every segment has its own salt).
///
/// The work is bounded: positions that cannot start a record (a payload shorter than a draft
/// number, an unknown kind, no room for it) cost nothing, and the CRCs of the others are
/// charged to `budget`, the segment's (four times its size, 1 MiB at least).
fn valid_record_within(data: &[u8], len: usize, salt: u32, budget: &mut usize) -> Rescan {
    for at in (RECORD_HEADER.next_multiple_of(8)..len.min(data.len())).step_by(8) {
        let rest = &data[at..];
        let Some(head) = rest.get(..RECORD_HEADER) else {
            break;
        };
        let payload = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if payload < 8 || Kind::from_u8(head[8]).is_none() || record_len(payload) > rest.len() {
            continue;
        }
        match budget.checked_sub(payload) {
            Some(left) => *budget = left,
            None => return Rescan::OutOfBudget,
        }
        if matches!(read_record(rest, salt), Read::Record { .. }) {
            return Rescan::Found(at);
        }
    }
    Rescan::None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::write_record;
    use std::cell::RefCell;

    /// What runs after each segment is scanned, with its number.
    type Hook = Box<dyn FnMut(u64)>;

    thread_local! {
        /// A stand-in for a server that reclaims segments while a `postern queue` reads them.
        pub(super) static AFTER_SEGMENT: RefCell<Option<Hook>> = const { RefCell::new(None) };
    }

    /// A message read whole from the first segment, whose final status is in the second, and
    /// both segments reclaimed before the second is read: it was final, and is not listed (it
    /// was, as never tried).
    /// An envelope from a@origin.test to b@dest.test.
    fn one_recipient() -> crate::meta::MessageMeta {
        crate::meta::MessageMeta {
            arrival: 1_795_346_220,
            client: "192.0.2.1".into(),
            helo: "client.test".into(),
            reverse_path: "a@origin.test".into(),
            recipients: vec![crate::meta::Recipient {
                path: "b@dest.test".into(),
                notify: None,
                orcpt: None,
            }],
            envid: None,
            ret: None,
            body_type: 1,
            smtputf8: false,
        }
    }

    #[test]
    fn a_message_reclaimed_while_it_is_read_is_not_listed() {
        use crate::meta::{DeliveryState, Status};
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let options = crate::SpoolOptions {
            segment_size: 64 * 1024,
        };
        let meta = one_recipient();
        let mut spool =
            crate::Spool::open(dir.path(), 0, options).unwrap_or_else(|e| panic!("{e}"));
        // The message, whole in the first segment; then one over a segment, so that the
        // statuses that make both final go into the second.
        let mut ids = Vec::new();
        for len in [1024, 100 * 1024] {
            let mut draft = spool.begin(&meta).unwrap_or_else(|e| panic!("{e}"));
            spool
                .append(&mut draft, &vec![b'x'; len])
                .unwrap_or_else(|e| panic!("{e}"));
            ids.push(draft.queue_id().to_owned());
            spool.finish(draft).unwrap_or_else(|e| panic!("{e}"));
        }
        let delivered = Status {
            state: DeliveryState::Delivered,
            reply: "250 ok".into(),
        };
        for id in &ids {
            spool
                .append_status(id, 0, &delivered)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        spool.sync_now().unwrap_or_else(|e| panic!("{e}"));
        drop(spool);
        let core = dir.path().join("0");
        let found = recover(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(found.messages.len(), 2);
        assert!(
            found.messages.iter().all(RecoveredMessage::is_final),
            "read whole, both are final"
        );
        drop(found);
        // A stray directory with a segment's lowest name stays: it is no segment left behind
        // the reclaimed ones, and must not keep the rule from applying.
        std::fs::create_dir(core.join(crate::segment::file_name(0)))
            .unwrap_or_else(|e| panic!("{e}"));
        let reclaim = core.clone();
        AFTER_SEGMENT.with(|hook| {
            *hook.borrow_mut() = Some(Box::new(move |seq| {
                if seq == 1 {
                    for n in [1, 2] {
                        let _ = std::fs::remove_file(reclaim.join(crate::segment::file_name(n)));
                    }
                }
            }));
        });
        let found = recover(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        AFTER_SEGMENT.with(|hook| hook.borrow_mut().take());
        let listed: Vec<&str> = found.messages.iter().map(|m| m.queue_id.as_str()).collect();
        assert!(listed.is_empty(), "{listed:?}");
    }

    #[test]
    fn a_message_copied_forward_while_the_queue_is_read_is_still_listed() {
        // W waits in the first segment; the second holds only mail delivered. While the
        // listing reads the first, the server copies W forward into a third segment (which
        // the listing did not see) and deletes the first two: the second vanishes before it
        // is read. Taken at its word, that said W was final.
        use crate::meta::{DeliveryState, Status};
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let options = crate::SpoolOptions {
            segment_size: 64 * 1024,
        };
        let meta = one_recipient();
        let mut spool =
            crate::Spool::open(dir.path(), 0, options).unwrap_or_else(|e| panic!("{e}"));
        let write = |spool: &mut crate::Spool, len: usize| {
            let mut draft = spool.begin(&meta).unwrap_or_else(|e| panic!("{e}"));
            spool
                .append(&mut draft, &vec![b'x'; len])
                .unwrap_or_else(|e| panic!("{e}"));
            let id = draft.queue_id().to_owned();
            let (_, pending) = spool
                .finish_with_body(draft)
                .unwrap_or_else(|e| panic!("{e}"));
            spool.sync_now().unwrap_or_else(|e| panic!("{e}"));
            let body = spool
                .body(pending)
                .unwrap_or_else(|_| panic!("not durable"));
            (id, body)
        };
        let (w, w_body) = write(&mut spool, 1024);
        let (f, _) = write(&mut spool, 100 * 1024);
        let delivered = Status {
            state: DeliveryState::Delivered,
            reply: "250 ok".into(),
        };
        spool
            .append_status(&f, 0, &delivered)
            .unwrap_or_else(|e| panic!("{e}"));
        spool.sync_now().unwrap_or_else(|e| panic!("{e}"));
        spool.mark_final(&f).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(spool.segment_count(), 2);
        let mut server = Some(spool);
        let w_id = w.clone();
        AFTER_SEGMENT.with(|hook| {
            *hook.borrow_mut() = Some(Box::new(move |seq| {
                let Some(mut spool) = server.take().filter(|_| seq == 1) else {
                    return;
                };
                // More mail fills the second segment and is given up; W goes to a third.
                let mut draft = spool.begin(&meta).unwrap_or_else(|e| panic!("{e}"));
                spool
                    .append(&mut draft, &vec![b'y'; 64 * 1024])
                    .unwrap_or_else(|e| panic!("{e}"));
                spool.abort(draft);
                let copied = spool.copy_forward(&w_id, &meta, &w_body);
                assert!(copied.unwrap_or_else(|e| panic!("{e}")).is_some());
                spool.sync_now().unwrap_or_else(|e| panic!("{e}"));
                let deleted = spool
                    .copy_over(&w_id, true)
                    .unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(deleted, 2, "the first two segments go");
            }));
        });
        let found = recover(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        AFTER_SEGMENT.with(|hook| hook.borrow_mut().take());
        let listed: Vec<&str> = found.messages.iter().map(|m| m.queue_id.as_str()).collect();
        assert_eq!(listed, [w.as_str()]);
    }

    #[test]
    fn a_spare_deleted_while_the_queue_is_read_hides_no_message() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let meta = one_recipient();
        let mut spool = crate::Spool::open(dir.path(), 0, crate::SpoolOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let mut draft = spool.begin(&meta).unwrap_or_else(|e| panic!("{e}"));
        spool
            .append(&mut draft, b"queued\r\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let id = draft.queue_id().to_owned();
        spool.finish(draft).unwrap_or_else(|e| panic!("{e}"));
        spool.sync_now().unwrap_or_else(|e| panic!("{e}"));
        // The next segment, made ahead and holding nothing.
        let job = spool
            .spare_job()
            .unwrap_or_else(|| panic!("no spare to make"));
        let spare = job.seq;
        spool.install_spare(job.run());
        let core = dir.path().join("0");
        assert!(core.join(crate::segment::file_name(spare)).exists());
        // The server deletes that spare (as a restart does) while the queue is being read,
        // after the segment with the queued message: the message is still queued.
        let spare_path = core.join(crate::segment::file_name(spare));
        AFTER_SEGMENT.with(|hook| {
            *hook.borrow_mut() = Some(Box::new(move |seq| {
                if seq < spare {
                    let _ = std::fs::remove_file(&spare_path);
                }
            }));
        });
        let found = recover(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        AFTER_SEGMENT.with(|hook| hook.borrow_mut().take());
        let listed: Vec<&str> = found.messages.iter().map(|m| m.queue_id.as_str()).collect();
        assert_eq!(listed, [id.as_str()]);
        drop(spool);
    }

    /// A bad record claiming 4 KiB, with a valid record 1 KiB into its span.
    fn span_with_a_record(salt: u32) -> (Vec<u8>, usize) {
        let mut data = vec![0u8; 8192];
        data[0..4].copy_from_slice(&(4096u32 - 16).to_le_bytes());
        data[8] = Kind::Body as u8;
        let payload = [7u8; 100];
        write_record(&mut data[1024..], salt, Kind::Body, &[&payload]);
        (data, 4096)
    }

    #[test]
    fn a_valid_record_inside_a_bad_span_is_found_within_the_budget() {
        let (data, len) = span_with_a_record(0x5a5a_1234);
        let mut budget = 1 << 20;
        assert!(matches!(
            valid_record_within(&data, len, 0x5a5a_1234, &mut budget),
            Rescan::Found(1024)
        ));
        assert!(budget < 1 << 20, "its CRC was charged");
        // Another segment's salt: nothing there is a record.
        let mut budget = 1 << 20;
        assert!(matches!(
            valid_record_within(&data, len, 0x1111_2222, &mut budget),
            Rescan::None
        ));
        // No budget left: the look is cut short, and says so.
        let mut budget = 10;
        assert!(matches!(
            valid_record_within(&data, len, 0x5a5a_1234, &mut budget),
            Rescan::OutOfBudget
        ));
    }
}
