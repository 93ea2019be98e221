//! Gathers what one transaction writes (commands, headers, body pieces) so a small message
//! goes out in one write, while large body pieces are written straight from the shared
//! padding buffer, never copied.

use crate::conn::Conn;
use std::io;

/// Pieces at least this large are written directly instead of being gathered.
const DIRECT: usize = 32 * 1024;

/// A write buffer for one connection.
#[derive(Debug)]
pub struct Outbox {
    buf: Vec<u8>,
    /// Largest single write.
    chunk: usize,
}

impl Outbox {
    /// An outbox writing at most `chunk` octets at a time.
    pub fn new(chunk: u64) -> Self {
        let chunk = (chunk as usize).max(512);
        Self {
            buf: Vec::with_capacity(DIRECT.min(chunk) * 2),
            chunk,
        }
    }

    /// Queues `piece`, writing out first when it is large.
    pub async fn push(&mut self, conn: &mut Conn, piece: &[u8]) -> io::Result<()> {
        if piece.len() < DIRECT.min(self.chunk) {
            self.buf.extend_from_slice(piece);
            if self.buf.len() >= self.chunk {
                self.flush(conn).await?;
            }
            return Ok(());
        }
        self.flush(conn).await?;
        for part in piece.chunks(self.chunk) {
            conn.write_out(part).await?;
        }
        Ok(())
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
        r
    }
}
