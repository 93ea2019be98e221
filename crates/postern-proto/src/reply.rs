//! Reply codes, RFC 3463 enhanced status codes, writing replies and parsing them (client side).

use std::fmt;

use crate::framer::{Frame, LineFramer};
use crate::limits::{MAX_REPLY_LINE, MAX_REPLY_LINES, MAX_REPLY_LINES_READ, MAX_REPLY_LINE_READ};

/// An RFC 3463 enhanced status code, `class.subject.detail`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EnhancedCode {
    /// 2 (success), 4 (persistent transient failure) or 5 (permanent failure).
    pub class: u8,
    /// The subject, 0 to 999.
    pub subject: u16,
    /// The detail, 0 to 999.
    pub detail: u16,
}

impl EnhancedCode {
    /// Builds a code; used by the named constants below.
    pub const fn new(class: u8, subject: u16, detail: u16) -> Self {
        Self {
            class,
            subject,
            detail,
        }
    }

    /// Parses `c.s.d` at the start of `text`, returning the code and the rest after one space.
    pub fn parse_prefix(text: &str) -> Option<(Self, &str)> {
        let end = text.find(' ').unwrap_or(text.len());
        let mut parts = text[..end].split('.');
        let class = parse_digits(parts.next()?, 1)?;
        let subject = parse_digits(parts.next()?, 3)?;
        let detail = parse_digits(parts.next()?, 3)?;
        if parts.next().is_some() || !matches!(class, 2 | 4 | 5) {
            return None;
        }
        let rest = text.get(end + 1..).unwrap_or("");
        Some((Self::new(class as u8, subject, detail), rest))
    }
}

fn parse_digits(s: &str, max: usize) -> Option<u16> {
    if s.is_empty() || s.len() > max || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// A reply the server sends: code, enhanced code and one line of text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaticReply {
    /// The three-digit reply code.
    pub code: u16,
    /// The enhanced status code.
    pub enhanced: EnhancedCode,
    /// The human-readable text.
    pub text: &'static str,
}

impl StaticReply {
    /// Builds a reply; used for the named replies of [`crate::server`].
    pub const fn new(code: u16, enhanced: EnhancedCode, text: &'static str) -> Self {
        Self {
            code,
            enhanced,
            text,
        }
    }

    /// Appends the reply line, CRLF included, to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        write_reply(out, self.code, Some(self.enhanced), self.text);
    }
}

/// Appends one reply line `code [enhanced ]text\r\n` to `out`.
pub fn write_reply(out: &mut Vec<u8>, code: u16, enhanced: Option<EnhancedCode>, text: &str) {
    write_line(out, code, ' ', enhanced, text);
}

/// Appends one line of a multi-line reply; `last` selects the `code SP` form over `code-`.
pub fn write_reply_line(out: &mut Vec<u8>, code: u16, last: bool, text: &str) {
    write_line(out, code, if last { ' ' } else { '-' }, None, text);
}

fn write_line(out: &mut Vec<u8>, code: u16, sep: char, enhanced: Option<EnhancedCode>, text: &str) {
    use std::io::Write;
    // Writing into a Vec cannot fail.
    let _ = match enhanced {
        Some(e) => write!(out, "{code:03}{sep}{e} {text}\r\n"),
        None => write!(out, "{code:03}{sep}{text}\r\n"),
    };
}

/// A complete reply as the client side receives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit reply code, shared by all lines.
    pub code: u16,
    /// The enhanced status code of the first line, when the server sent one.
    pub enhanced: Option<EnhancedCode>,
    /// The text of each line, without code, separator or enhanced code.
    pub lines: Vec<String>,
}

impl Reply {
    /// 2xx and 3xx.
    pub fn is_positive(&self) -> bool {
        self.code < 400
    }
    /// 4xx: try again later.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }
    /// 5xx: do not try again.
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some(e) = self.enhanced {
            write!(f, " {e}")?;
        }
        for (i, line) in self.lines.iter().enumerate() {
            write!(f, "{}{line}", if i == 0 { " " } else { " / " })?;
        }
        Ok(())
    }
}

/// Why a reply from a peer could not be parsed. Always the next hop's fault, and treated as
/// a temporary failure of that connection.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// A line longer than [`MAX_REPLY_LINE_SKIPPED`]: a line without end.
    #[error("reply line of more than {MAX_REPLY_LINE_SKIPPED} octets")]
    LineTooLong,
    /// A line did not start with three digits (200 to 599) and a separator; the line as
    /// [`shown`] in reports and logs.
    #[error("malformed reply line {0}")]
    Malformed(String),
    /// The lines of one multi-line reply carried different codes: the first, then the other.
    #[error("reply code changed inside a multi-line reply ({0}, then {1})")]
    InconsistentCode(u16, u16),
    /// More lines in one reply than [`MAX_REPLY_LINES_READ`]: a server that sends
    /// continuation lines without end would hold the client reading them until its timeout.
    #[error("reply of more than {MAX_REPLY_LINES_READ} lines")]
    TooManyLines,
}

/// A line a server sent, for a report or a log: in double quotes, at most
/// [`SHOWN_LINE`] octets of it, printable ASCII as it is and every other octet (a quote and a
/// backslash too) as `\xHH`.
fn shown(line: &[u8]) -> String {
    let mut out = String::from("\"");
    for &b in line.iter().take(SHOWN_LINE) {
        if (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("\\x{b:02X}"));
        }
    }
    if line.len() > SHOWN_LINE {
        out.push_str("...");
    }
    out.push('"');
    out
}

/// The longest reply line read (its start kept, the rest skipped) before it is taken for one
/// without end: far past any server's, which RFC 5321 caps at 512 octets.
pub const MAX_REPLY_LINE_SKIPPED: usize = 1 << 20;

/// How much of a malformed reply line an error shows.
const SHOWN_LINE: usize = 64;

/// Assembles replies from bytes as they arrive, keeping partial lines across reads.
#[derive(Debug)]
pub struct ReplyParser {
    framer: LineFramer,
    partial: Option<Reply>,
    /// Lines of the partial reply read, those dropped past [`MAX_REPLY_LINES`] included.
    lines_read: usize,
    /// Blank lines read since the last reply.
    blank_lines: usize,
    /// The start of a line longer than the framer takes, while its tail is skipped: read as
    /// a line of its own (its text cut, as any long line's) once its line feed has come.
    long_line: Option<Vec<u8>>,
    /// Octets of that line read so far.
    long_read: usize,
}

impl Default for ReplyParser {
    fn default() -> Self {
        Self::new()
    }
}

/// The outcome of one [`ReplyParser::parse`] call.
#[derive(Debug, PartialEq, Eq)]
pub enum ParsedReply {
    /// A complete reply; `consumed` bytes were used.
    Complete {
        /// The reply.
        reply: Reply,
        /// Bytes of input used.
        consumed: usize,
    },
    /// The reply is not complete; `consumed` bytes were used (keep the rest).
    Incomplete {
        /// Bytes of input used.
        consumed: usize,
    },
    /// The peer sent something that is not a reply; `consumed` bytes were used.
    Error {
        /// What was wrong.
        error: ReplyError,
        /// Bytes of input used.
        consumed: usize,
    },
}

impl ReplyParser {
    /// A parser expecting the first line of a reply.
    pub fn new() -> Self {
        Self::with_line_cap(MAX_REPLY_LINE_READ)
    }

    /// A parser holding lines of at most `cap` octets whole (the fuzz target's small one
    /// reaches the long-line path with short inputs).
    pub(crate) fn with_line_cap(cap: usize) -> Self {
        Self {
            framer: LineFramer::new(cap),
            partial: None,
            lines_read: 0,
            blank_lines: 0,
            long_line: None,
            long_read: 0,
        }
    }

    /// Consumes reply lines from `input` until one reply is complete or input runs out.
    pub fn parse(&mut self, input: &[u8]) -> ParsedReply {
        let mut pos = 0;
        loop {
            // An overlong line is a line like any other (RFC 5321 4.5.3.1 asks a client to
            // take what it can; a server that answers a body with one would otherwise get
            // the message again at every retry): its start is kept, its tail skipped, and it
            // is read once its line feed has come, never before (what follows it in the
            // stream must not be taken for a reply of its own).
            let long = match self.long_line.take() {
                Some(head) => {
                    let skipped = self.framer.skip_tail(&input[pos..]);
                    pos += skipped;
                    self.long_read = self.long_read.saturating_add(skipped);
                    if self.long_read > MAX_REPLY_LINE_SKIPPED {
                        // A line without end: given up, as a reply of endless lines is,
                        // rather than read until the reply's timeout.
                        self.partial = None;
                        return ParsedReply::Error {
                            error: ReplyError::LineTooLong,
                            consumed: pos,
                        };
                    }
                    if !self.framer.at_line_start() {
                        self.long_line = Some(head);
                        return ParsedReply::Incomplete { consumed: pos };
                    }
                    Some(head)
                }
                None => None,
            };
            let (line, consumed) = match long.as_deref() {
                Some(head) => (head, 0),
                None => match self.framer.next_line(&input[pos..]) {
                    Frame::Incomplete { consumed } => {
                        return ParsedReply::Incomplete {
                            consumed: pos + consumed,
                        }
                    }
                    Frame::TooLong { head, consumed } if !self.framer.at_line_start() => {
                        // The tail still to come: skipped as it does.
                        self.long_line = Some(head[..head.len().min(self.head_kept())].to_vec());
                        self.long_read = consumed;
                        pos += consumed;
                        continue;
                    }
                    Frame::TooLong { head, consumed } => {
                        (&head[..head.len().min(self.head_kept())], consumed)
                    }
                    Frame::Line { line, consumed } => (line, consumed),
                },
            };
            pos += consumed;
            match self.line(line) {
                Ok(Some(reply)) => {
                    return ParsedReply::Complete {
                        reply,
                        consumed: pos,
                    }
                }
                Ok(None) => {}
                Err(error) => {
                    self.partial = None;
                    return ParsedReply::Error {
                        error,
                        consumed: pos,
                    };
                }
            }
        }
    }

    /// How much of an overlong line is kept: what a reply line may be, and never more than the
    /// framer's cap less a line end, so that the same is kept however the line's reads fell
    /// (an overlong line holds at least that much before its CR LF, which is never kept).
    fn head_kept(&self) -> usize {
        MAX_REPLY_LINE.min(self.framer.max_line().saturating_sub(2))
    }

    fn line(&mut self, line: &[u8]) -> Result<Option<Reply>, ReplyError> {
        // A line of nothing but blanks between replies is no reply (some servers write a
        // line end too many after one): passed over, as Postfix's client passes over lines
        // that are no reply. They count, so that a server writing them without end is given
        // up like one writing a reply of endless lines.
        if self.partial.is_none() && line.iter().all(|&b| matches!(b, b' ' | b'\t' | b'\r')) {
            self.blank_lines += 1;
            if self.blank_lines > MAX_REPLY_LINES_READ {
                return Err(ReplyError::TooManyLines);
            }
            return Ok(None);
        }
        if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
            return Err(ReplyError::Malformed(shown(line)));
        }
        let code = u16::from(line[0] - b'0') * 100
            + u16::from(line[1] - b'0') * 10
            + u16::from(line[2] - b'0');
        if !(200..600).contains(&code) {
            return Err(ReplyError::Malformed(shown(line)));
        }
        let last = match line.get(3) {
            None | Some(b' ') => true,
            Some(b'-') => false,
            Some(_) => return Err(ReplyError::Malformed(shown(line))),
        };
        // A line longer than a reply line may be is kept to that length.
        let mut text = String::from_utf8_lossy(line.get(4..).unwrap_or(b""));
        let room = MAX_REPLY_LINE - 6;
        if text.len() > room {
            let mut cut = room;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.to_mut().truncate(cut);
        }
        let reply = match self.partial.as_mut() {
            Some(r) => {
                if r.code != code {
                    return Err(ReplyError::InconsistentCode(r.code, code));
                }
                self.lines_read += 1;
                if self.lines_read > MAX_REPLY_LINES_READ {
                    return Err(ReplyError::TooManyLines);
                }
                // RFC 5321 sets no line count: lines past the cap are read and dropped, so
                // memory stays bounded and the reply still ends where the server ends it.
                if r.lines.len() >= MAX_REPLY_LINES {
                    return Ok(last.then(|| self.partial.take()).flatten());
                }
                let text = match r.enhanced {
                    Some(_) => EnhancedCode::parse_prefix(&text)
                        .map_or(text.as_ref(), |(_, rest)| rest)
                        .to_owned(),
                    None => text.into_owned(),
                };
                r.lines.push(text);
                r
            }
            None => {
                self.lines_read = 1;
                self.blank_lines = 0;
                let (enhanced, text) = match EnhancedCode::parse_prefix(&text) {
                    Some((e, rest)) if e.class == (code / 100) as u8 => (Some(e), rest.to_owned()),
                    _ => (None, text.into_owned()),
                };
                self.partial.insert(Reply {
                    code,
                    enhanced,
                    lines: vec![text],
                })
            }
        };
        let _ = reply;
        if last {
            Ok(self.partial.take())
        } else {
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(input: &[u8]) -> ParsedReply {
        ReplyParser::new().parse(input)
    }

    #[test]
    fn a_reply_of_endless_continuation_lines_is_an_error_past_the_cap() {
        // Up to the cap the lines past the kept ones are read and dropped, and the reply
        // ends where the server ends it; one line more is an error, whatever follows.
        let mut at_cap = b"220-x\r\n".repeat(MAX_REPLY_LINES_READ - 1);
        at_cap.extend_from_slice(b"220 end\r\n");
        match parse_all(&at_cap) {
            ParsedReply::Complete { reply, consumed } => {
                assert_eq!(consumed, at_cap.len());
                assert_eq!(reply.lines.len(), MAX_REPLY_LINES);
            }
            other => panic!("{other:?}"),
        }
        let over = b"220-x\r\n".repeat(MAX_REPLY_LINES_READ + 1);
        let mut parser = ReplyParser::new();
        assert!(matches!(
            parser.parse(&over),
            ParsedReply::Error {
                error: ReplyError::TooManyLines,
                ..
            }
        ));
        // Replies one after another each count their own lines.
        let mut two = at_cap.clone();
        two.extend_from_slice(&at_cap);
        let mut parser = ReplyParser::new();
        let first = parser.parse(&two);
        let ParsedReply::Complete { consumed, .. } = first else {
            panic!("{first:?}");
        };
        assert!(matches!(
            parser.parse(&two[consumed..]),
            ParsedReply::Complete { .. }
        ));
    }

    #[test]
    fn blank_lines_between_replies_are_passed_over_up_to_the_cap() {
        let mut parser = ReplyParser::new();
        let input = b"\r\n \t\r\n\n250 2.0.0 ok\r\n\r\n";
        let ParsedReply::Complete { reply, consumed } = parser.parse(input) else {
            panic!("not read");
        };
        assert_eq!((reply.code, reply.lines[0].as_str()), (250, "ok"));
        assert_eq!(&input[consumed..], b"\r\n");
        assert!(matches!(
            parser.parse(&input[consumed..]),
            ParsedReply::Incomplete { consumed: 2 }
        ));
        // Inside a reply a blank line is still no reply line.
        assert!(matches!(
            ReplyParser::new().parse(b"250-a\r\n\r\n250 b\r\n"),
            ParsedReply::Error {
                error: ReplyError::Malformed(_),
                ..
            }
        ));
        // Without end, they are given up past the cap, as continuation lines are; each
        // reply starts the count again.
        let mut at_cap = b"\r\n".repeat(MAX_REPLY_LINES_READ);
        at_cap.extend_from_slice(b"250 ok\r\n");
        let twice = at_cap.repeat(2);
        let mut parser = ReplyParser::new();
        let ParsedReply::Complete { consumed, .. } = parser.parse(&twice) else {
            panic!("not read");
        };
        assert!(matches!(
            parser.parse(&twice[consumed..]),
            ParsedReply::Complete { .. }
        ));
        assert!(matches!(
            ReplyParser::new().parse(&b"\r\n".repeat(MAX_REPLY_LINES_READ + 1)),
            ParsedReply::Error {
                error: ReplyError::TooManyLines,
                ..
            }
        ));
    }

    #[test]
    fn a_long_reply_line_is_read_and_its_text_cut() {
        let mut line = b"250 2.1.5 ".to_vec();
        line.extend(std::iter::repeat_n(b'x', 700));
        line.extend_from_slice(b"\r\n");
        let ParsedReply::Complete { reply, consumed } = parse_all(&line) else {
            panic!("not read");
        };
        assert_eq!(consumed, line.len());
        assert_eq!(reply.code, 250);
        assert!(reply.lines[0].len() <= MAX_REPLY_LINE - 6);
        assert!(reply.lines[0].starts_with("xxx"));
    }

    #[test]
    fn a_reply_line_past_what_is_read_is_taken_with_its_text_cut() {
        // Whole in one read, and as it comes over many, the reply after it read apart.
        let mut line = b"250 2.0.0 ".to_vec();
        line.extend(std::iter::repeat_n(b'y', 3 * MAX_REPLY_LINE_READ));
        line.extend_from_slice(b"\r\n");
        let mut input = line.clone();
        input.extend_from_slice(b"221 2.0.0 bye\r\n");
        let ParsedReply::Complete { reply, consumed } = parse_all(&input) else {
            panic!("not read");
        };
        assert_eq!((reply.code, consumed), (250, line.len()));
        assert!(reply.lines[0].starts_with("yyy") && reply.lines[0].len() <= MAX_REPLY_LINE);
        assert!(matches!(
            parse_all(&input[consumed..]),
            ParsedReply::Complete { reply, .. } if reply.code == 221
        ));
        for piece in [1000, 4096, MAX_REPLY_LINE_READ - 1, MAX_REPLY_LINE_READ + 7] {
            let mut p = ReplyParser::new();
            let mut buf: Vec<u8> = Vec::new();
            let mut replies = Vec::new();
            for chunk in input.chunks(piece) {
                buf.extend_from_slice(chunk);
                loop {
                    match p.parse(&buf) {
                        ParsedReply::Complete { reply, consumed } => {
                            buf.drain(..consumed);
                            replies.push(reply);
                        }
                        ParsedReply::Incomplete { consumed } => {
                            buf.drain(..consumed);
                            break;
                        }
                        ParsedReply::Error { error, .. } => panic!("{error}"),
                    }
                }
                // Never more than a read's worth held.
                assert!(buf.len() <= MAX_REPLY_LINE_READ + piece, "{}", buf.len());
            }
            let codes: Vec<u16> = replies.iter().map(|r| r.code).collect();
            assert_eq!(codes, [250, 221], "pieces of {piece}");
            assert!(replies[0].lines[0].starts_with("yyy"));
        }
    }

    #[test]
    fn a_line_without_end_is_given_up_past_a_mebibyte() {
        let mut p = ReplyParser::new();
        let chunk = vec![b'y'; 64 * 1024];
        assert!(matches!(p.parse(b"250 "), ParsedReply::Incomplete { .. }));
        let mut read = 4;
        loop {
            match p.parse(&chunk) {
                ParsedReply::Incomplete { consumed } => {
                    assert_eq!(consumed, chunk.len());
                    read += consumed;
                    assert!(read <= MAX_REPLY_LINE_SKIPPED + chunk.len(), "{read}");
                }
                ParsedReply::Error { error, .. } => {
                    assert_eq!(error, ReplyError::LineTooLong);
                    assert!(read >= MAX_REPLY_LINE_SKIPPED - chunk.len(), "{read}");
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn an_overlong_line_inside_a_multi_line_reply_keeps_the_reply_whole() {
        let mut input = b"250-first\r\n250-".to_vec();
        input.extend(std::iter::repeat_n(b'z', 2 * MAX_REPLY_LINE_READ));
        input.extend_from_slice(b"\r\n250 last\r\n");
        let ParsedReply::Complete { reply, consumed } = parse_all(&input) else {
            panic!("not read");
        };
        assert_eq!(consumed, input.len());
        assert_eq!(reply.lines.len(), 3, "{reply:?}");
        assert_eq!(reply.lines[2], "last");
    }

    #[test]
    fn cutting_keeps_whole_characters() {
        let mut line = b"550 ".to_vec();
        for _ in 0..400 {
            line.extend_from_slice("é".as_bytes());
        }
        line.extend_from_slice(b"\r\n");
        let ParsedReply::Complete { reply, .. } = parse_all(&line) else {
            panic!("not read");
        };
        assert!(reply.lines[0].chars().all(|c| c == 'é'));
    }
}
