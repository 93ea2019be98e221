//! Line ends of a BDAT body that is text (BODY=7BIT or 8BITMIME, RFC 3030 3): every line must
//! end in CR LF, as in DATA. A bare CR or bare LF is written out as CR LF and reported through
//! [`LineEnds::saw_bare_newline`], so the session can keep the repaired body or refuse it
//! (550 5.6.11), as it does for DATA. As in DATA, CRs right before a CR LF are one line end
//! with it (and count as bare). BINARYMIME bodies never go through here.
//!
//! The state carries over chunk boundaries: a CR that ends one chunk and an LF that starts the
//! next are one CR LF. Output is slices of the input plus a static CR LF: nothing is copied.

use crate::data::MOST_CRS_HELD;

const CRLF: &[u8] = b"\r\n";

/// One step of [`LineEnds::repair`].
#[derive(Debug, PartialEq, Eq)]
pub struct Repaired<'a> {
    /// Input octets used by this step (0 only when a CR held back turned out to be bare and
    /// `bytes` is its CR LF).
    pub consumed: usize,
    /// Body octets produced (possibly empty).
    pub bytes: &'a [u8],
}

/// The line-end state of one text body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LineEnds {
    /// CRs in a row held back (the last input ended in them) until what follows them shows
    /// whether they end in CR LF; at most [`MOST_CRS_HELD`], each CR past these written out
    /// as a bare one at once.
    crs_pending: usize,
    bare: bool,
}

impl LineEnds {
    /// Whether a bare CR or bare LF has been seen (and repaired to CR LF).
    pub fn saw_bare_newline(&self) -> bool {
        self.bare
    }

    /// Repairs from the start of `input` (not empty); call again with `input[consumed..]`.
    pub fn repair<'a>(&mut self, input: &'a [u8]) -> Repaired<'a> {
        if self.crs_pending > 0 {
            return match input.first() {
                Some(b'\n') => {
                    // CR LF, after the CRs that go with it.
                    self.bare |= self.crs_pending > 1;
                    self.crs_pending = 0;
                    Repaired {
                        consumed: 1,
                        bytes: CRLF,
                    }
                }
                Some(b'\r') if self.crs_pending >= MOST_CRS_HELD => {
                    // The oldest CR held is bare whatever follows.
                    self.bare = true;
                    Repaired {
                        consumed: 1,
                        bytes: CRLF,
                    }
                }
                Some(b'\r') => {
                    self.crs_pending += 1;
                    Repaired {
                        consumed: 1,
                        bytes: &[],
                    }
                }
                _ => {
                    // Bare CRs, a line end each.
                    self.bare = true;
                    self.crs_pending -= 1;
                    Repaired {
                        consumed: 0,
                        bytes: CRLF,
                    }
                }
            };
        }
        // Whole 64-octet blocks of CR LF text are passed over with vector compares. The walk
        // stops at a bare CR or LF, never between a CR and its LF, and also (for DATA's sake)
        // at a dot starting a line, which a BDAT body need not care about. Once per call, as
        // in DATA: the walk may look far ahead without moving (blocks that end inside a CR
        // LF), and walked again after each line it made a body of blank lines cost the
        // square of its length.
        let mut pos = crate::scan::clean_blocks(input, 0);
        loop {
            let Some(i) = memchr::memchr2(b'\r', b'\n', &input[pos..]) else {
                return Repaired {
                    consumed: input.len(),
                    bytes: input,
                };
            };
            let at = pos + i;
            let bare_at = match (input[at], input.get(at + 1)) {
                (b'\r', Some(b'\n')) => {
                    pos = at + 2;
                    continue;
                }
                (b'\r', None | Some(b'\r')) => {
                    // The last CR of the input, or the first of a run: held back until what
                    // follows the run shows whether it ends in CR LF.
                    self.crs_pending = 1;
                    return Repaired {
                        consumed: at + 1,
                        bytes: &input[..at],
                    };
                }
                _ => at,
            };
            if bare_at > 0 {
                return Repaired {
                    consumed: bare_at,
                    bytes: &input[..bare_at],
                };
            }
            self.bare = true;
            return Repaired {
                consumed: 1,
                bytes: CRLF,
            };
        }
    }

    /// The body ended: CRs still held back were bare. Returns a CR LF for one of them, or
    /// nothing once there are none; call until it returns nothing.
    pub fn finish(&mut self) -> &'static [u8] {
        if self.crs_pending > 0 {
            self.crs_pending -= 1;
            self.bare = true;
            CRLF
        } else {
            &[]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_walk_looks_at_each_block_a_bounded_number_of_times() {
        // Blank lines, and lines of 30 and 62 octets: every 64-octet block ends inside or
        // right after a CR LF, so a walk never moves its safe point and looks to the end.
        for line in [&b"\r\n"[..], &[b'a'; 30], &[b'b'; 62]] {
            let mut one = line.to_vec();
            if one.len() > 2 {
                one.extend_from_slice(b"\r\n");
            }
            let input = one.repeat(64 * 1024 / one.len());
            crate::scan::BLOCKS_WALKED.with(|n| n.set(0));
            let (out, bare) = repair_all(&[&input]);
            assert_eq!((out.len(), bare), (input.len(), false));
            let walked = crate::scan::BLOCKS_WALKED.with(std::cell::Cell::get);
            assert!(
                walked <= 2 * input.len() / 64 + 2,
                "{walked} blocks walked for {} octets of {}-octet lines",
                input.len(),
                one.len()
            );
        }
    }

    /// Feeds `pieces` as separate inputs (chunks or reads) and returns the repaired body.
    fn repair_all(pieces: &[&[u8]]) -> (Vec<u8>, bool) {
        let mut l = LineEnds::default();
        let mut out = Vec::new();
        for piece in pieces {
            let mut rest = *piece;
            while !rest.is_empty() {
                let r = l.repair(rest);
                out.extend_from_slice(r.bytes);
                rest = &rest[r.consumed..];
            }
        }
        loop {
            let tail = l.finish();
            if tail.is_empty() {
                break;
            }
            out.extend_from_slice(tail);
        }
        (out, l.saw_bare_newline())
    }

    #[test]
    fn crlf_text_passes_unchanged() {
        let body = b"Subject: x\r\n\r\nline one\r\nline two\r\n";
        assert_eq!(repair_all(&[body]), (body.to_vec(), false));
    }

    #[test]
    fn bare_lf_and_bare_cr_become_crlf() {
        assert_eq!(
            repair_all(&[b"a\nb\rc\r\n\n\r"]),
            (b"a\r\nb\r\nc\r\n\r\n\r\n".to_vec(), true)
        );
    }

    #[test]
    fn a_crlf_split_between_inputs_is_one_line_end() {
        assert_eq!(
            repair_all(&[b"ab\r", b"\ncd\r\n"]),
            (b"ab\r\ncd\r\n".to_vec(), false)
        );
        // A CR, then CR LF in the next input: one line end (the first CR is bare).
        assert_eq!(
            repair_all(&[b"ab\r", b"cd\r", b"\r\n"]),
            (b"ab\r\ncd\r\n".to_vec(), true)
        );
    }

    #[test]
    fn long_text_is_passed_over_and_a_defect_deep_inside_is_found() {
        let mut body = Vec::new();
        for i in 0..200u8 {
            body.extend(std::iter::repeat_n(b'a' + i % 26, 70));
            body.extend_from_slice(if i % 7 == 0 { b"\r\n." } else { b"\r\n" });
        }
        assert_eq!(repair_all(&[&body]), (body.clone(), false));
        let mut broken = body.clone();
        broken[9001] = b'\n';
        let mut fixed = body.clone();
        fixed.splice(9001..9002, *b"\r\n");
        assert_eq!(repair_all(&[&broken]), (fixed, true));
    }

    #[test]
    fn every_split_gives_the_same_body() {
        let body = b"x\r\ny\nz\r\r\n.\r\nq\r";
        let whole = repair_all(&[body]);
        for cut in 0..=body.len() {
            let (a, b) = body.split_at(cut);
            assert_eq!(repair_all(&[a, b]), whole, "cut at {cut}");
        }
        assert_eq!(whole.0, b"x\r\ny\r\nz\r\n.\r\nq\r\n".to_vec());
    }

    #[test]
    fn crs_before_a_crlf_are_one_line_end_with_it() {
        // Text converted from LF to CR LF twice: no empty line after the Subject, which would
        // end the header section there.
        let body = b"Subject: a\r\r\nTo: b\r\r\n\r\r\nbody\r\r\r\n";
        assert_eq!(
            repair_all(&[body]),
            (b"Subject: a\r\nTo: b\r\n\r\nbody\r\n".to_vec(), true)
        );
        // CRs not followed by LF are still a line end each, also at the end of the body.
        assert_eq!(
            repair_all(&[b"a\r\rb\r\r\r"]),
            (b"a\r\n\r\nb\r\n\r\n\r\n".to_vec(), true)
        );
        // Past a few held back, each CR comes out as it is read.
        let mut l = LineEnds::default();
        let mut out = 0;
        let crs = vec![b'\r'; 1000];
        let mut rest = &crs[..];
        while !rest.is_empty() {
            let r = l.repair(rest);
            out += r.bytes.len();
            rest = &rest[r.consumed..];
        }
        assert_eq!(out, 2 * (1000 - MOST_CRS_HELD));
        for body in [&body[..], b"a\r\rb\r\r\nc\r\r\r", b"x\r\r\r\r\r\r\n"] {
            let whole = repair_all(&[body]);
            for a in 0..=body.len() {
                for b in a..=body.len() {
                    let pieces = [&body[..a], &body[a..b], &body[b..]];
                    assert_eq!(repair_all(&pieces), whole, "cut at {a},{b}");
                }
            }
        }
    }
}
