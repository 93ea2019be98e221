//! The DATA body decoder: streaming dot-unstuffing that hands out borrowed slices.
//!
//! End of data is `<CRLF>.<CRLF>` and nothing else. A dot line counts as the end only when the
//! line before it ended in a real CR LF and the dot is followed by a real CR LF: `<LF>.<LF>`,
//! `<LF>.<CRLF>`, `<CR>.<CR>`, `<CR>.<CRLF>` and the other SMTP smuggling variants are body.
//! Bare CR and bare LF are written out as CR LF and reported through
//! [`DataDecoder::saw_bare_newline`], so the session can either keep the normalised body or
//! refuse it (550 5.6.11) once the real end of data has been found. CRs right before a CR LF
//! are one line end with it (`a<CR><CR><LF>` is `a<CRLF>`, as text that went through an LF to
//! CR LF conversion twice ends its lines), not an empty line that would end a header section
//! early; they count as bare all the same.
//!
//! Output is a series of slices of the input (plus a few static ones), long runs of ordinary
//! lines coming out as one slice: the decoder copies nothing.

const CRLF: &[u8] = b"\r\n";
const DOT_CRLF: &[u8] = b".\r\n";
const DOT: &[u8] = b".";

/// The most CRs in a row held back to see whether a CR LF ends them (and they go with it):
/// each CR past these is a bare one written out at once, so that a body of nothing but CRs
/// is handed on as it comes, counted against the size limit, not kept as a count to be
/// written out all at once later.
pub(crate) const MOST_CRS_HELD: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// At the start of a line. `strict`: the previous line ended in a real CR LF.
    LineStart { strict: bool },
    /// A dot at the start of a line.
    Dot { strict: bool },
    /// A dot and a CR at the start of a line.
    DotCr { strict: bool },
    /// Inside a line.
    Text,
    /// A run of `pending` CRs (at least one, at most [`MOST_CRS_HELD`]) ended the last input,
    /// or was followed by something other than LF (then each is a bare CR, written out one by
    /// one); whether the run ends in CR LF is not known yet.
    Cr { pending: usize },
    /// End of data was seen.
    Done,
}

/// One step of decoding.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded<'a> {
    /// Input bytes used by this step.
    pub consumed: usize,
    /// Body bytes produced by this step (possibly empty).
    pub bytes: &'a [u8],
    /// End of data was reached; `consumed` includes the terminating `.CRLF`.
    pub end: bool,
}

/// Decodes a DATA body, keeping its place across reads.
#[derive(Clone, Debug)]
pub struct DataDecoder {
    state: State,
    bare_newline: bool,
}

impl Default for DataDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl DataDecoder {
    /// A decoder positioned just after the 354 reply, at the start of the first line.
    pub fn new() -> Self {
        Self {
            state: State::LineStart { strict: true },
            bare_newline: false,
        }
    }

    /// Whether a bare CR or bare LF has been seen (and normalised to CR LF).
    pub fn saw_bare_newline(&self) -> bool {
        self.bare_newline
    }

    /// Whether the end of data has been reached.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes from the start of `input`; call again with `input[consumed..]` until it returns
    /// `end`, or until `consumed` is all of the input and more must be read.
    pub fn decode<'a>(&mut self, input: &'a [u8]) -> Decoded<'a> {
        let mut pos = 0;
        loop {
            let Some(&byte) = input.get(pos) else {
                return self.step(pos, &[]);
            };
            match self.state {
                State::Done => return self.done(pos),
                State::LineStart { strict } => {
                    if byte == b'.' {
                        pos += 1;
                        self.state = State::Dot { strict };
                    } else {
                        self.state = State::Text;
                        return self.text(input, pos);
                    }
                }
                State::Dot { strict } => match byte {
                    b'\r' => {
                        pos += 1;
                        self.state = State::DotCr { strict };
                    }
                    b'\n' => {
                        // A lone dot ended by a bare LF: body, never the end.
                        self.bare_newline = true;
                        self.state = State::LineStart { strict: false };
                        return self.step(pos + 1, DOT_CRLF);
                    }
                    _ => {
                        // A stuffed dot: drop it and keep the rest of the line.
                        self.state = State::Text;
                        return self.text(input, pos);
                    }
                },
                State::DotCr { strict } => {
                    if byte == b'\n' && strict {
                        self.state = State::Done;
                        return self.done(pos + 1);
                    }
                    if byte == b'\n' {
                        self.state = State::LineStart { strict: true };
                        return self.step(pos + 1, DOT_CRLF);
                    }
                    if byte == b'\r' {
                        // `.` then two CRs: a dot line whose end (a run of CRs, perhaps a
                        // CR LF after all) is read on as any other. Never the end of data.
                        self.state = State::Cr { pending: 1 };
                        return self.step(pos, DOT);
                    }
                    // `.` then a bare CR: a dot line of its own, ended by a bare CR.
                    self.bare_newline = true;
                    self.state = State::LineStart { strict: false };
                    return self.step(pos, DOT_CRLF);
                }
                State::Cr { pending } => match byte {
                    b'\n' => {
                        // CR LF, after `pending - 1` CRs that go with it.
                        self.bare_newline |= pending > 1;
                        self.state = State::LineStart { strict: true };
                        return self.step(pos + 1, CRLF);
                    }
                    b'\r' if pending >= MOST_CRS_HELD => {
                        // The oldest CR held is bare whatever follows: written out now.
                        self.bare_newline = true;
                        return self.step(pos + 1, CRLF);
                    }
                    b'\r' => {
                        pos += 1;
                        self.state = State::Cr {
                            pending: pending + 1,
                        };
                    }
                    _ => {
                        // Bare CRs: a line end each, the byte after them read once they are
                        // all written out.
                        self.bare_newline = true;
                        self.state = match pending {
                            1 => State::LineStart { strict: false },
                            _ => State::Cr {
                                pending: pending - 1,
                            },
                        };
                        return self.step(pos, CRLF);
                    }
                },
                State::Text => return self.text(input, pos),
            }
        }
    }

    /// Scans text from `start`, continuing across ordinary CR LF line ends, and returns the
    /// longest slice that needs no change.
    fn text<'a>(&mut self, input: &'a [u8], start: usize) -> Decoded<'a> {
        let mut pos = crate::scan::clean_blocks(input, start);
        loop {
            let Some(i) = memchr::memchr2(b'\r', b'\n', &input[pos..]) else {
                return self.step(input.len(), &input[start..]);
            };
            let at = pos + i;
            if input[at] == b'\n' {
                // Bare LF: hand out the text before it, then a CR LF in its place.
                if at > start {
                    return self.step(at, &input[start..at]);
                }
                self.bare_newline = true;
                self.state = State::LineStart { strict: false };
                return self.step(at + 1, CRLF);
            }
            match input.get(at + 1) {
                None | Some(b'\r') => {
                    // CR at the end of input, or the first of a run: what follows the run
                    // decides (the next read, perhaps).
                    self.state = State::Cr { pending: 1 };
                    return self.step(at + 1, &input[start..at]);
                }
                Some(b'\n') => {
                    let next = at + 2;
                    match input.get(next) {
                        Some(b'.') | None => {
                            self.state = State::LineStart { strict: true };
                            return self.step(next, &input[start..next]);
                        }
                        Some(_) => pos = next,
                    }
                }
                Some(_) => {
                    if at > start {
                        return self.step(at, &input[start..at]);
                    }
                    self.bare_newline = true;
                    self.state = State::LineStart { strict: false };
                    return self.step(at + 1, CRLF);
                }
            }
        }
    }

    #[inline]
    fn step<'a>(&self, consumed: usize, bytes: &'a [u8]) -> Decoded<'a> {
        Decoded {
            consumed,
            bytes,
            end: false,
        }
    }

    fn done<'a>(&self, consumed: usize) -> Decoded<'a> {
        Decoded {
            consumed,
            bytes: &[],
            end: true,
        }
    }
}

/// Decodes all of `input` at once (tests, benches and fuzzing): the body, whether the end was
/// found, and the input bytes used.
pub fn decode_all(decoder: &mut DataDecoder, input: &[u8], body: &mut Vec<u8>) -> (bool, usize) {
    let mut pos = 0;
    while pos < input.len() {
        let step = decoder.decode(&input[pos..]);
        body.extend_from_slice(step.bytes);
        pos += step.consumed;
        if step.end {
            return (true, pos);
        }
    }
    (false, pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_split(input: &[u8], cuts: &[usize]) -> (Vec<u8>, bool, usize, bool) {
        let mut d = DataDecoder::new();
        let mut body = Vec::new();
        let mut buf = Vec::new();
        let mut used = 0;
        let mut bounds = cuts.to_vec();
        bounds.push(input.len());
        let mut start = 0;
        for end in bounds {
            buf.extend_from_slice(&input[start..end]);
            start = end;
            let (done, n) = decode_all(&mut d, &buf, &mut body);
            used += n;
            buf.drain(..n);
            assert!(buf.is_empty() || done, "decoder left input unconsumed");
            if done {
                return (body, true, used, d.saw_bare_newline());
            }
        }
        (body, false, used, d.saw_bare_newline())
    }

    fn decode(input: &[u8]) -> (Vec<u8>, bool, usize, bool) {
        let whole = decode_split(input, &[]);
        for a in 0..=input.len() {
            for b in a..=input.len() {
                assert_eq!(decode_split(input, &[a, b]), whole, "split at {a},{b}");
            }
        }
        whole
    }

    #[test]
    fn plain_body_ends_at_crlf_dot_crlf() {
        let (body, end, used, bare) = decode(b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n");
        assert_eq!(body, b"Subject: x\r\n\r\nhello\r\n");
        assert!(end && !bare);
        assert_eq!(used, 24);
    }

    #[test]
    fn empty_body() {
        assert_eq!(decode(b".\r\n"), (Vec::new(), true, 3, false));
    }

    #[test]
    fn stuffed_dots_are_removed() {
        let (body, end, _, _) = decode(b"..hidden\r\n...\r\n.x\r\n.\r\n");
        assert_eq!(body, b".hidden\r\n..\r\nx\r\n");
        assert!(end);
    }

    #[test]
    fn smuggling_lf_dot_lf_is_body() {
        let (body, end, _, bare) = decode(b"a\n.\nMAIL FROM:<x@y>\r\n.\r\n");
        assert!(end && bare);
        assert_eq!(body, b"a\r\n.\r\nMAIL FROM:<x@y>\r\n");
    }

    #[test]
    fn smuggling_lf_dot_crlf_is_body() {
        let (body, end, _, bare) = decode(b"a\n.\r\nRCPT TO:<x@y>\r\n.\r\n");
        assert!(end && bare);
        assert_eq!(body, b"a\r\n.\r\nRCPT TO:<x@y>\r\n");
    }

    #[test]
    fn smuggling_cr_dot_cr_is_body() {
        let (body, end, _, bare) = decode(b"a\r.\rDATA\r\n.\r\n");
        assert!(end && bare);
        assert_eq!(body, b"a\r\n.\r\nDATA\r\n");
    }

    #[test]
    fn smuggling_cr_dot_crlf_is_body() {
        let (body, end, _, bare) = decode(b"a\r.\r\nQUIT\r\n.\r\n");
        assert!(end && bare);
        assert_eq!(body, b"a\r\n.\r\nQUIT\r\n");
    }

    #[test]
    fn smuggling_crlf_dot_lf_is_body() {
        let (body, end, _, bare) = decode(b"a\r\n.\nQUIT\r\n.\r\n");
        assert!(end && bare);
        assert_eq!(body, b"a\r\n.\r\nQUIT\r\n");
    }

    #[test]
    fn crs_before_a_crlf_are_one_line_end_with_it() {
        // Text converted from LF to CR LF twice: the header section goes on past the
        // Subject, and the end of data is found after a line ended so.
        let (body, end, _, bare) = decode(b"Subject: a\r\r\nTo: b\r\r\n\r\r\nbody\r\r\r\n.\r\n");
        assert!(end && bare);
        assert_eq!(body, b"Subject: a\r\nTo: b\r\n\r\nbody\r\n");
        // CRs not followed by LF are still a line end each.
        let (body, end, _, bare) = decode(b"a\r\rb\r\n.\r\n");
        assert!(end && bare);
        assert_eq!(body, b"a\r\n\r\nb\r\n");
        // A CR LF after CRs alone does not count as bare.
        let (_, _, _, bare) = decode(b"a\r\nb\r\n.\r\n");
        assert!(!bare);
    }

    #[test]
    fn a_long_run_of_crs_comes_out_as_it_is_read() {
        // Past a few CRs held back, each further CR is written out as it comes: what a read
        // of CRs gives is bounded by the read, not held to come out all at once later.
        let mut d = DataDecoder::new();
        let mut body = Vec::new();
        let crs = vec![b'\r'; 1000];
        let (end, used) = decode_all(&mut d, &crs, &mut body);
        assert!(!end);
        assert_eq!(used, 1000);
        assert_eq!(body.len(), 2 * (1000 - MOST_CRS_HELD));
        let (end, _) = decode_all(&mut d, b"\nx\r\n.\r\n", &mut body);
        assert!(end && d.saw_bare_newline());
        assert_eq!(body.len(), 2 * (1000 - MOST_CRS_HELD) + 2 + 3);
        // The last few CRs went with the LF, as a shorter run does.
        let (short, _, _, _) = decode(b"a\r\r\r\r\nb\r\n.\r\n");
        assert_eq!(short, b"a\r\nb\r\n");
    }

    #[test]
    fn a_dot_line_ended_by_crs_and_crlf_is_body() {
        // `.<CR><CR><LF>` is no end of data: a dot line, stuffed again on relay. The real
        // `<CRLF>.<CRLF>` right after it is the end.
        let (body, end, used, bare) = decode(b"a\r\n.\r\r\n.\r\nNOOP\r\n");
        assert!(end && bare);
        assert_eq!(body, b"a\r\n.\r\n");
        assert_eq!(used, 10);
        let (body, end, _, _) = decode(b".\r\r\rx\r\n.\r\n");
        assert!(end);
        assert_eq!(body, b".\r\n\r\n\r\nx\r\n");
    }

    #[test]
    fn dot_cr_then_text_is_a_dot_line() {
        let (body, end, _, bare) = decode(b".\rx\r\n.\r\n");
        assert!(end && bare);
        assert_eq!(body, b".\r\nx\r\n");
    }

    #[test]
    fn unterminated_body_waits() {
        let (body, end, used, _) = decode(b"line\r\n.");
        assert!(!end);
        assert_eq!(body, b"line\r\n");
        assert_eq!(used, 7);
    }

    #[test]
    fn nothing_after_the_end_is_consumed() {
        let mut d = DataDecoder::new();
        let mut body = Vec::new();
        let (end, used) = decode_all(&mut d, b"x\r\n.\r\nNOOP\r\n", &mut body);
        assert!(end);
        assert_eq!(used, 6);
        assert!(d.is_done());
    }

    #[test]
    fn long_runs_come_out_as_one_slice() {
        let input = b"one\r\ntwo\r\nthree\r\n.\r\n";
        let mut d = DataDecoder::new();
        let first = d.decode(input);
        assert_eq!(first.bytes, b"one\r\ntwo\r\nthree\r\n");
    }
}
