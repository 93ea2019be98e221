//! postern-spool keeps the promise behind every `250`: a memory-mapped, append-only log of
//! messages per core, in CRC-framed records, made durable by group commit, read back by a
//! recovery scan after a crash, and reclaimed segment by segment once its messages are final.
//! docs/durability.md gives the exact order of writes and syncs and what recovery promises.
//!
//! Each core owns a [`Spool`] and appends only to its own segments, so the hot path takes no
//! lock and, for small records, makes no syscall: records are gathered in memory and written
//! with one `pwrite` per group commit, by the thread that runs the sync (large body chunks go
//! in with `pwrite` at once, and so does what is gathered past 256 KiB). A body from
//! [`Spool::finish_with_body`] becomes a readable handle only through [`Spool::body`], once its
//! ticket is durable, by which time the sync has written the records it covers. Nothing is written through a mapping. The
//! blocking work, `fdatasync` for a group commit and making the next segment file, is handed out as `Send` values ([`SyncBatch`], [`SpareJob`])
//! that the embedding runs where it wants; the spool never blocks a core on the disk unless
//! asked to ([`Spool::sync_now`]). Bodies are read back through [`MessageRef`], `Send + Sync`
//! handles on read-only mappings, without copies.
//!
//! This crate must not know about glommio, SMTP or the queue: envelopes are plain strings.
//! Its costs: segments are reserved in full on disk (64 MiB each by default), a mapping per
//! live segment, and per live message an index entry; a long-deferred message keeps the
//! segments after it. Its only `unsafe` is in `map`.

// Segments of up to 4 GiB are mapped whole, and record lengths are 32-bit words read into
// `usize`: a 64-bit address space is assumed throughout.
#[cfg(not(target_pointer_width = "64"))]
compile_error!("postern-spool needs a 64-bit target");

mod body;
mod commit;
mod error;
mod fold;
mod format;
#[doc(hidden)]
pub mod fuzzing;
mod lock;
mod map;
mod meta;
mod queue_id;
mod reclaim;
mod recover;
mod segment;
mod spare;
mod spool;

pub use body::MessageRef;
pub use commit::{Ticket, TicketState};
pub use error::SpoolError;
pub use fold::{fold_cores, fold_pending, kept_damage, Folded};
pub use lock::{flock_holder, DirLock, LOCK_FILE};
pub use meta::{
    envelope_room, DeliveryState, MessageMeta, Recipient, Status, DELETED_BY_OPERATOR,
    START_PER_RECIPIENT,
};
pub use queue_id::{is_queue_id, is_queue_id_char, owner_core, MAX_CORES};
pub use recover::{recover, CutOffMessage, ReadError, RecordLocation, Recovered, RecoveredMessage};
pub use segment::create_private_dir;

/// The core whose directory has this name: its number exactly as postern writes it (`3`, not
/// `03` or `+3`, which parse to the same number but are not the directory any core opens).
pub fn core_number(name: &str) -> Option<u32> {
    let n: u32 = name.parse().ok()?;
    (n.to_string() == name).then_some(n)
}
pub use spare::{PreparedSegment, SpareJob};
pub use spool::{
    is_reserve_refusal, reserve_for, unlink_segments, Draft, PendingBody, Spool, SpoolOptions,
    SyncBatch, DAMAGED_DIR,
};
