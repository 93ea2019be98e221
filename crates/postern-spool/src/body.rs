//! Handles on message bodies inside the spool's mappings: what the relay reads from, on any
//! core, without a copy.

use std::sync::Arc;

use crate::map::ReadMap;

/// One body record's payload: a range of a segment's read-only mapping.
#[derive(Clone, Debug)]
pub(crate) struct Piece {
    pub(crate) map: Arc<ReadMap>,
    pub(crate) start: usize,
    pub(crate) end: usize,
}

/// A finished message's body, as the chunks it was written in, read straight from the shared
/// read-only mappings of its segments. `Send + Sync` and cheap to clone (one `Arc`), so it can
/// be handed to another core's relay; it keeps the mappings alive (not the files: a reclaimed
/// segment stays readable through a handle taken before).
///
/// Hand it out only once the message's ticket is durable: before that, a crash may still undo
/// the message.
#[derive(Clone)]
pub struct MessageRef {
    queue_id: Arc<str>,
    size: u64,
    pieces: Arc<[Piece]>,
}

impl MessageRef {
    pub(crate) fn new(queue_id: &str, size: u64, pieces: Vec<Piece>) -> MessageRef {
        MessageRef {
            queue_id: queue_id.into(),
            size,
            pieces: pieces.into(),
        }
    }

    /// A body made in memory rather than spooled (a message rewritten on its way to one next
    /// hop), in an anonymous mapping so that it reads like any other.
    pub fn from_bytes(queue_id: &str, bytes: &[u8]) -> std::io::Result<MessageRef> {
        let map = Arc::new(ReadMap::holding(bytes)?);
        let piece = Piece {
            map,
            start: 0,
            end: bytes.len(),
        };
        Ok(MessageRef::new(queue_id, bytes.len() as u64, vec![piece]))
    }

    /// The message's queue ID.
    pub fn queue_id(&self) -> &str {
        &self.queue_id
    }

    /// The body length in bytes.
    pub fn len(&self) -> u64 {
        self.size
    }

    /// Whether the body is empty.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// The body in order, as borrowed chunks of the mappings (no copy). Chunks are as large as
    /// the appends that wrote them, up to a segment.
    pub fn chunks(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.pieces.iter().map(|p| p.map.range(p.start, p.end))
    }

    /// The body copied into one buffer (tests, small messages).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(usize::try_from(self.size).unwrap_or(0));
        for c in self.chunks() {
            v.extend_from_slice(c);
        }
        v
    }
}

impl std::fmt::Debug for MessageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageRef")
            .field("queue_id", &self.queue_id)
            .field("size", &self.size)
            .field("chunks", &self.pieces.len())
            .finish()
    }
}

/// Checked at compile time: a body handle may cross cores.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<MessageRef>();
};
