//! The BDAT chunk decoder (RFC 3030): exactly `size` raw octets, binary-safe, no unstuffing.

/// Counts off the octets of one BDAT chunk as they arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkDecoder {
    remaining: u64,
}

/// One step of chunk decoding.
#[derive(Debug, PartialEq, Eq)]
pub struct Chunk<'a> {
    /// Chunk octets in this step (all of them consumed from the input).
    pub bytes: &'a [u8],
    /// The chunk is complete.
    pub end: bool,
}

impl ChunkDecoder {
    /// A decoder for a chunk of `size` octets.
    pub fn new(size: u64) -> Self {
        Self { remaining: size }
    }

    /// Octets of the chunk still to come.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// The part of the chunk that `input` holds, without taking it (see [`Self::advance`]).
    pub fn available<'a>(&self, input: &'a [u8]) -> &'a [u8] {
        let take = usize::try_from(self.remaining).map_or(input.len(), |r| r.min(input.len()));
        &input[..take]
    }

    /// Takes `n` octets of the chunk (at most what [`Self::available`] showed).
    pub fn advance(&mut self, n: usize) {
        self.remaining = self.remaining.saturating_sub(n as u64);
    }

    /// Takes as much of the chunk as `input` holds; `bytes.len()` is the input consumed.
    pub fn decode<'a>(&mut self, input: &'a [u8]) -> Chunk<'a> {
        let take = usize::try_from(self.remaining).map_or(input.len(), |r| r.min(input.len()));
        self.remaining -= take as u64;
        Chunk {
            bytes: &input[..take],
            end: self.remaining == 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_exactly_the_chunk() {
        let mut d = ChunkDecoder::new(5);
        let c = d.decode(b"ab");
        assert_eq!((c.bytes, c.end), (&b"ab"[..], false));
        let c = d.decode(b"c\r\n.\r\nNOOP");
        assert_eq!((c.bytes, c.end), (&b"c\r\n"[..], true));
    }

    #[test]
    fn zero_length_chunk_is_complete_at_once() {
        let mut d = ChunkDecoder::new(0);
        let c = d.decode(b"QUIT\r\n");
        assert!(c.end && c.bytes.is_empty());
    }
}
