//! postern-spool keeps the promise behind every `250`: a memory-mapped, append-only log of
//! messages per core, in CRC-framed records, made durable by group commit, and read back by a
//! recovery scan after a crash (docs/durability.md gives the exact order of writes and syncs).
//!
//! Each core owns a [`Spool`] and appends only to its own segments, so the hot path takes no
//! lock and makes no syscall: records are copied into the mapping. The one blocking call,
//! `fdatasync`, is packaged as a [`SyncBatch`] that the embedding runs where it wants (postern
//! runs it on a helper thread, never on a core). This crate knows nothing of glommio or SMTP.
//! Its only `unsafe` is mapping files, in `map`.

mod error;
mod format;
mod map;
mod meta;
mod queue_id;
mod recover;
mod segment;
mod spool;

pub use error::SpoolError;
pub use meta::{DeliveryState, MessageMeta, Recipient, Status};
pub use recover::{recover, Recovered, RecoveredMessage};
pub use spool::{
    Draft, PreparedSegment, SpareJob, Spool, SpoolOptions, SyncBatch, Ticket, TicketState,
};
