//! The dot-stuffing encoder for sending a body with DATA, as slices for vectored writes.
//!
//! The body is never copied: the encoder splits it where a line starts with a dot and puts a
//! static `"."` in front. Lines are taken to start after every LF, so a stray bare LF followed
//! by a dot can never end the transmission early at a lenient receiver.

use memchr::memmem;

const DOT: &[u8] = b".";

/// Dot-stuffs a body handed over in any number of pieces.
#[derive(Clone, Debug)]
pub struct DotStuffer {
    at_line_start: bool,
    last_cr: bool,
    /// The body so far ends in CR LF (or is empty): `.CRLF` alone ends it.
    ends_crlf: bool,
}

impl Default for DotStuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl DotStuffer {
    /// A stuffer at the start of the body.
    pub fn new() -> Self {
        Self {
            at_line_start: true,
            last_cr: false,
            ends_crlf: true,
        }
    }

    /// The slices that send `piece`, the next part of the body, stuffed.
    pub fn stuff<'a>(&'a mut self, piece: &'a [u8]) -> Stuffed<'a> {
        let dot_first = self.at_line_start && piece.first() == Some(&b'.');
        Stuffed {
            stuffer: self,
            piece,
            pos: 0,
            dot_next: dot_first,
        }
    }

    /// What ends the transmission after the last piece: `.CRLF`, with a CRLF before it when
    /// the body did not end with one (a bare LF at its end is not one: the receiver looks for
    /// CR LF . CR LF).
    pub fn finish(&self) -> &'static [u8] {
        match (self.ends_crlf, self.last_cr) {
            (true, _) => b".\r\n",
            (false, true) => b"\n.\r\n",
            (false, false) => b"\r\n.\r\n",
        }
    }
}

/// Iterator over the stuffed slices of one piece.
#[derive(Debug)]
pub struct Stuffed<'a> {
    stuffer: &'a mut DotStuffer,
    piece: &'a [u8],
    pos: usize,
    dot_next: bool,
}

impl<'a> Iterator for Stuffed<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.dot_next {
            self.dot_next = false;
            return Some(DOT);
        }
        let rest = &self.piece[self.pos..];
        if rest.is_empty() {
            return None;
        }
        let end = match memmem::find(rest, b"\n.") {
            Some(i) => {
                self.dot_next = true;
                i + 1
            }
            None => rest.len(),
        };
        self.pos += end;
        if self.pos == self.piece.len() {
            let last = self.piece[self.piece.len() - 1];
            let before_cr = match self.piece.len() {
                1 => self.stuffer.last_cr,
                n => self.piece[n - 2] == b'\r',
            };
            self.stuffer.at_line_start = last == b'\n';
            self.stuffer.ends_crlf = last == b'\n' && before_cr;
            self.stuffer.last_cr = last == b'\r';
        }
        Some(&rest[..end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stuff_all(pieces: &[&[u8]]) -> Vec<u8> {
        let mut s = DotStuffer::new();
        let mut out = Vec::new();
        for p in pieces {
            for slice in s.stuff(p) {
                out.extend_from_slice(slice);
            }
        }
        out.extend_from_slice(s.finish());
        out
    }

    #[test]
    fn dots_at_line_start_are_doubled() {
        assert_eq!(
            stuff_all(&[b".a\r\nb.\r\n.\r\n"]),
            b"..a\r\nb.\r\n..\r\n.\r\n"
        );
    }

    #[test]
    fn dot_after_a_piece_boundary_is_doubled() {
        assert_eq!(stuff_all(&[b"a\r\n", b".b\r\n"]), b"a\r\n..b\r\n.\r\n");
    }

    #[test]
    fn missing_final_crlf_is_added() {
        assert_eq!(stuff_all(&[b"a"]), b"a\r\n.\r\n");
        assert_eq!(stuff_all(&[b"a\r"]), b"a\r\n.\r\n");
        assert_eq!(stuff_all(&[]), b".\r\n");
        assert_eq!(stuff_all(&[b"a\r", b"\n"]), b"a\r\n.\r\n");
        // A bare LF at the end is no CR LF: the end of data is still CR LF . CR LF.
        assert_eq!(stuff_all(&[b"a\n"]), b"a\n\r\n.\r\n");
        assert_eq!(stuff_all(&[b"a", b"\n"]), b"a\n\r\n.\r\n");
    }

    #[test]
    fn body_without_dots_is_one_slice() {
        let mut s = DotStuffer::new();
        let slices: Vec<&[u8]> = s.stuff(b"hello\r\nworld\r\n").collect();
        assert_eq!(slices, vec![&b"hello\r\nworld\r\n"[..]]);
    }
}
