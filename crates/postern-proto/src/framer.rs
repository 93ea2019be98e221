//! The command line framer: complete lines out of arbitrary reads, borrowed, with a hard cap.
//!
//! The framer owns no buffer. The caller keeps its read buffer, hands the unconsumed part to
//! [`LineFramer::next_line`] and drops the bytes the framer reports as consumed. A line longer
//! than the cap is reported once as [`Frame::TooLong`]; its bytes are consumed as they arrive
//! (never buffered) until the next line feed, where the framer is in step again.

/// One step of framing.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A complete line without its line ending. `consumed` counts the ending too.
    Line {
        /// The line, CR LF (or a bare LF) stripped.
        line: &'a [u8],
        /// Bytes of input the line used.
        consumed: usize,
    },
    /// A line over the cap. Its bytes so far are consumed; the rest is skipped silently.
    TooLong {
        /// The start of the line, as much of it as this input holds (at least the cap's
        /// worth, or up to the line feed): enough to tell what command it was meant to be.
        head: &'a [u8],
        /// Bytes of input used.
        consumed: usize,
    },
    /// No complete line: keep the unconsumed bytes and call again once more have arrived.
    Incomplete {
        /// Bytes of input used (skipped bytes of an overlong line).
        consumed: usize,
    },
}

/// Splits a byte stream into lines ending in LF (CR LF normally), with a cap on line length.
#[derive(Clone, Debug)]
pub struct LineFramer {
    max_line: usize,
    /// Skipping the tail of an overlong line up to its LF.
    discarding: bool,
    /// Bytes at the start of the pending partial line already known to hold no LF.
    scanned: usize,
}

impl LineFramer {
    /// Whether the next byte starts a line (not the tail of an overlong one being skipped).
    pub fn at_line_start(&self) -> bool {
        !self.discarding
    }

    /// A framer for lines of at most `max_line` octets, CR LF included (minimum 3).
    pub fn new(max_line: usize) -> Self {
        Self {
            max_line: max_line.max(3),
            discarding: false,
            scanned: 0,
        }
    }

    /// The cap, CR LF included.
    pub fn max_line(&self) -> usize {
        self.max_line
    }

    /// Forgets any partial line (after STARTTLS, say).
    pub fn reset(&mut self) {
        self.discarding = false;
        self.scanned = 0;
    }

    /// Drops the tail of an overlong line from the start of `input`, up to and with its line
    /// feed, and returns how many bytes that was (all of `input` while the line feed has not
    /// come); 0 at a line start. A caller that looks at how a line begins before framing it
    /// calls this first, so that it sees the next line from its first byte, however the
    /// reads fell.
    pub fn skip_tail(&mut self, input: &[u8]) -> usize {
        if !self.discarding {
            return 0;
        }
        match memchr::memchr(b'\n', input) {
            None => input.len(),
            Some(i) => {
                self.discarding = false;
                i + 1
            }
        }
    }

    /// Finds the next line in `input`, which must start with the first unconsumed byte.
    pub fn next_line<'a>(&mut self, input: &'a [u8]) -> Frame<'a> {
        let mut skipped = 0;
        if self.discarding {
            match memchr::memchr(b'\n', input) {
                None => {
                    return Frame::Incomplete {
                        consumed: input.len(),
                    }
                }
                Some(i) => {
                    self.discarding = false;
                    skipped = i + 1;
                }
            }
        }
        let rest = &input[skipped..];
        let from = self.scanned.min(rest.len());
        match memchr::memchr(b'\n', &rest[from..]) {
            Some(i) => {
                let lf = from + i;
                self.scanned = 0;
                let line = match lf.checked_sub(1) {
                    Some(cr) if rest[cr] == b'\r' => &rest[..cr],
                    _ => &rest[..lf],
                };
                // A bare LF counts as if it were CR LF, so the cap means the same either way.
                if line.len() + 2 > self.max_line {
                    return Frame::TooLong {
                        head: line,
                        consumed: skipped + lf + 1,
                    };
                }
                Frame::Line {
                    line,
                    consumed: skipped + lf + 1,
                }
            }
            None if rest.len() >= self.max_line => {
                // Even a bare LF next would make this line too long: drop it as it arrives.
                self.discarding = true;
                self.scanned = 0;
                Frame::TooLong {
                    head: rest,
                    consumed: input.len(),
                }
            }
            None => {
                self.scanned = rest.len();
                Frame::Incomplete { consumed: skipped }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces cut at `cuts`, the way a socket would deliver it, and collects
    /// what the framer reports: `Ok(line)` or `Err(())` for a line over the cap.
    fn frame_split(max: usize, input: &[u8], cuts: &[usize]) -> Vec<Result<Vec<u8>, ()>> {
        let mut framer = LineFramer::new(max);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        let mut bounds = cuts.to_vec();
        bounds.push(input.len());
        let mut start = 0;
        for end in bounds {
            buf.extend_from_slice(&input[start..end]);
            start = end;
            loop {
                match framer.next_line(&buf) {
                    Frame::Line { line, consumed } => {
                        out.push(Ok(line.to_vec()));
                        buf.drain(..consumed);
                    }
                    Frame::TooLong { consumed, .. } => {
                        out.push(Err(()));
                        buf.drain(..consumed);
                    }
                    Frame::Incomplete { consumed } => {
                        buf.drain(..consumed);
                        break;
                    }
                }
            }
            assert!(
                buf.len() < max,
                "framer let the caller buffer {} bytes",
                buf.len()
            );
        }
        out
    }

    #[test]
    fn lines_end_at_crlf_and_bare_lf() {
        let got = frame_split(512, b"EHLO a\r\nNOOP\nQUIT\r\n", &[]);
        assert_eq!(
            got,
            vec![
                Ok(b"EHLO a".to_vec()),
                Ok(b"NOOP".to_vec()),
                Ok(b"QUIT".to_vec())
            ]
        );
    }

    #[test]
    fn partial_line_waits() {
        let mut f = LineFramer::new(512);
        assert_eq!(f.next_line(b"EHLO exa"), Frame::Incomplete { consumed: 0 });
        assert_eq!(
            f.next_line(b"EHLO example\r\n"),
            Frame::Line {
                line: b"EHLO example",
                consumed: 14
            }
        );
    }

    #[test]
    fn cap_counts_crlf() {
        let ok = [b'a'; 510];
        let mut line = ok.to_vec();
        line.extend_from_slice(b"\r\n");
        assert_eq!(frame_split(512, &line, &[]), vec![Ok(ok.to_vec())]);
        let mut long = vec![b'a'; 511];
        long.extend_from_slice(b"\r\nNOOP\r\n");
        assert_eq!(
            frame_split(512, &long, &[]),
            vec![Err(()), Ok(b"NOOP".to_vec())]
        );
    }

    #[test]
    fn overlong_line_is_skipped_without_buffering_and_resyncs() {
        let mut input = vec![b'x'; 5000];
        input.extend_from_slice(b"\r\nRSET\r\n");
        let cuts: Vec<usize> = (1..input.len()).step_by(100).collect();
        assert_eq!(
            frame_split(512, &input, &cuts),
            vec![Err(()), Ok(b"RSET".to_vec())]
        );
    }

    #[test]
    fn every_split_gives_the_same_lines() {
        let mut input = b"EHLO a\r\nMAIL FROM:<a@b>\r\n".to_vec();
        input.extend(std::iter::repeat_n(b'z', 700));
        input.extend_from_slice(b"\r\nRCPT TO:<c@d>\nDATA\r\n");
        let whole = frame_split(512, &input, &[]);
        assert_eq!(whole.len(), 5);
        for a in 0..input.len() {
            assert_eq!(frame_split(512, &input, &[a]), whole, "split at {a}");
        }
    }
}
