//! Gathers what one transaction writes (commands, headers, body pieces) so a small message
//! goes out in one write, while large body pieces are written straight from the shared
//! padding buffer, never copied.

use crate::conn::Conn;
use std::collections::VecDeque;
use std::io;
use std::time::Instant;

/// The most write ends kept for [`Outbox::written_at`] (more only while nobody asks: the
/// oldest go).
const WRITE_ENDS_KEPT: usize = 4096;

/// Pieces at least this large are written directly instead of being gathered.
const DIRECT: usize = 32 * 1024;

/// A write buffer for one connection.
#[derive(Debug)]
pub struct Outbox {
    buf: Vec<u8>,
    /// Largest single write.
    chunk: usize,
    /// Octets handed to `push` since the connection's start.
    pushed: u64,
    /// Each finished write: the octets written out by its end (counted as `pushed`), and
    /// when it finished; oldest first.
    write_ends: VecDeque<(u64, Instant)>,
    /// The end of the last write let go unasked (past [`WRITE_ENDS_KEPT`]): an octet up to
    /// it was written at a time no longer known.
    forgotten: u64,
}

impl Outbox {
    /// An outbox writing at most `chunk` octets at a time.
    pub fn new(chunk: u64) -> Self {
        let chunk = (chunk as usize).max(512);
        Self {
            buf: Vec::with_capacity(DIRECT.min(chunk) * 2),
            chunk,
            pushed: 0,
            write_ends: VecDeque::new(),
            forgotten: 0,
        }
    }

    /// Queues `piece`, writing out first when it is large.
    pub async fn push(&mut self, conn: &mut Conn, piece: &[u8]) -> io::Result<()> {
        if piece.len() < DIRECT.min(self.chunk) {
            self.buf.extend_from_slice(piece);
            self.pushed += piece.len() as u64;
            if self.buf.len() >= self.chunk {
                self.flush(conn).await?;
            }
            return Ok(());
        }
        self.flush(conn).await?;
        for part in piece.chunks(self.chunk) {
            conn.write_out(part).await?;
            self.pushed += part.len() as u64;
            self.written();
        }
        Ok(())
    }

    /// Octets handed to `push` so far (written or gathered): where the next begins.
    pub fn pushed(&self) -> u64 {
        self.pushed
    }

    /// When the write that carried octet `end` (its last, counted as `pushed` counts) out
    /// finished; `None` while it is not written. Asked in the order of the octets: the ends
    /// before `end` are forgotten.
    pub fn written_at(&mut self, end: u64) -> Option<Instant> {
        if end <= self.forgotten {
            return None;
        }
        while self.write_ends.front().is_some_and(|&(e, _)| e < end) {
            self.write_ends.pop_front();
        }
        self.write_ends.front().map(|&(_, at)| at)
    }

    /// Notes a write that just finished, carrying everything pushed.
    fn written(&mut self) {
        if self.write_ends.len() >= WRITE_ENDS_KEPT {
            if let Some((end, _)) = self.write_ends.pop_front() {
                self.forgotten = end;
            }
        }
        self.write_ends.push_back((self.pushed, Instant::now()));
    }

    /// Whether nothing is gathered.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Writes out what is gathered.
    pub async fn flush(&mut self, conn: &mut Conn) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let r = conn.write_out(&self.buf).await;
        self.buf.clear();
        if r.is_ok() {
            self.written();
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn an_octet_is_written_when_the_write_carrying_it_ends() {
        let mut outbox = Outbox::new(4096);
        let t0 = Instant::now();
        let (t1, t2) = (t0 + Duration::from_millis(1), t0 + Duration::from_millis(2));
        outbox.write_ends.push_back((10, t0));
        outbox.write_ends.push_back((20, t1));
        outbox.write_ends.push_back((30, t2));
        assert_eq!(outbox.written_at(5), Some(t0));
        assert_eq!(outbox.written_at(10), Some(t0));
        assert_eq!(outbox.written_at(11), Some(t1));
        assert_eq!(outbox.written_at(30), Some(t2));
        // Not written yet.
        assert_eq!(outbox.written_at(31), None);
        // A write let go unasked: the octets it carried have no time, not a later write's.
        let mut outbox = Outbox::new(4096);
        for k in 1..=WRITE_ENDS_KEPT as u64 + 1 {
            outbox.pushed = k * 10;
            outbox.written();
        }
        assert_eq!(outbox.written_at(5), None);
        assert_eq!(outbox.written_at(10), None);
        assert!(outbox.written_at(15).is_some());
    }
}
