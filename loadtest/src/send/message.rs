//! The messages the sender sends: a small header block that is unique per message (a
//! Message-ID and an `X-Postern-Load-Seq` header, so a sink or a test can find loss and
//! duplication; Date and From, which RFC 5322 3.6 asks of every message) and a body of 78-octet lines cut from one padding buffer shared by every
//! executor, so a 1 MiB message costs no copy and no allocation beyond its header.

use std::fmt::Write;
use std::sync::Arc;

/// The sequence header's name.
pub const SEQ_HEADER: &str = "X-Postern-Load-Seq";

/// The From header field's mailbox for messages sent with the null reverse path (`--from ''`).
pub const NULL_SENDER_FROM: &str = "mailer-daemon@postern-load.test";

/// Octets per padding line, CR LF included.
const LINE: usize = 78;
/// A short last line's source: `x` then CR LF; a tail of it is always a well-formed line.
const TAIL: &[u8; LINE + 1] = &{
    let mut t = [b'x'; LINE + 1];
    t[LINE - 1] = b'\r';
    t[LINE] = b'\n';
    t
};

/// Body padding for every message of a run.
#[derive(Clone, Debug)]
pub struct Bodies {
    padding: Arc<[u8]>,
    run_id: String,
}

/// One message, as a header block and two borrowed body pieces.
#[derive(Debug)]
pub struct Message<'a> {
    /// Headers and the empty line after them.
    pub header: String,
    /// Whole padding lines.
    pub lines: &'a [u8],
    /// The last, shorter line (may be empty).
    pub tail: &'a [u8],
}

impl Message<'_> {
    /// Octets in the message as it is stored (before dot-stuffing).
    pub fn len(&self) -> u64 {
        (self.header.len() + self.lines.len() + self.tail.len()) as u64
    }

    /// Whether the message has no octets (never: there is always a header).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The pieces in order.
    pub fn pieces(&self) -> [&[u8]; 3] {
        [self.header.as_bytes(), self.lines, self.tail]
    }
}

impl Bodies {
    /// Padding for messages up to `max_size` octets; `run_id` makes Message-IDs unique
    /// across runs.
    pub fn new(max_size: u64, run_id: String) -> Self {
        let lines = (max_size as usize).div_ceil(LINE) + 1;
        let mut padding = Vec::with_capacity(lines * LINE);
        for i in 0..lines {
            // Printable, never a dot at a line start, different from line to line.
            for j in 0..LINE - 2 {
                padding.push(b'A' + ((i + j) % 26) as u8);
            }
            padding.extend_from_slice(b"\r\n");
        }
        Self {
            padding: padding.into(),
            run_id,
        }
    }

    /// Message `seq` of `size` octets (more when `size` is smaller than the headers) from
    /// `from` to `to`, dated `date` (an RFC 5322 date-time).
    pub fn message<'a>(
        &'a self,
        seq: u64,
        size: u64,
        from: &str,
        to: &str,
        date: &str,
    ) -> Message<'a> {
        // A null reverse path still needs an author: RFC 5322 3.6.2 makes From a mailbox.
        let from = if from.is_empty() {
            NULL_SENDER_FROM
        } else {
            from
        };
        let mut header = String::with_capacity(256);
        // Writing into a String cannot fail.
        let _ = write!(
            header,
            "Message-ID: <{}.{seq}@postern-load.test>\r\n{SEQ_HEADER}: {seq}\r\n\
             Date: {date}\r\nFrom: <{from}>\r\nTo: <{to}>\r\n\
             Subject: postern-load message {seq}\r\n\r\n",
            self.run_id
        );
        let want = (size as usize).saturating_sub(header.len()).max(2);
        let (mut full, mut rest) = (want / LINE, want % LINE);
        if rest == 1 {
            // A one-octet line cannot end in CR LF: borrow a whole line.
            if full == 0 {
                rest = 2;
            } else {
                full -= 1;
                rest += LINE;
            }
        }
        let full = full.min(self.padding.len() / LINE);
        Message {
            header,
            lines: &self.padding[..full * LINE],
            tail: &TAIL[TAIL.len() - rest..],
        }
    }
}

/// Calls `f` with the date-time of now for a Date field, made at most once a second on each
/// thread.
pub fn with_date<T>(f: impl FnOnce(&str) -> T) -> T {
    thread_local! {
        static NOW: std::cell::RefCell<(u64, String)> = const {
            std::cell::RefCell::new((u64::MAX, String::new()))
        };
    }
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    NOW.with_borrow_mut(|(at, date)| {
        if *at != secs {
            *at = secs;
            *date = postern_server::rfc5322_date(now);
        }
        f(date)
    })
}

/// Fills `{seq}` or `{n}` (sequence) and `{r}` (recipient index) in an address pattern.
pub fn address(pattern: &str, seq: u64, rcpt: u32) -> String {
    if !pattern.contains('{') {
        return pattern.to_owned();
    }
    pattern
        .replace("{seq}", &seq.to_string())
        .replace("{n}", &seq.to_string())
        .replace("{r}", &rcpt.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATE: &str = "Fri, 04 Dec 2026 12:00:00 +0000";

    fn flat(m: &Message<'_>) -> Vec<u8> {
        m.pieces().concat()
    }

    #[test]
    fn sizes_are_exact_and_lines_end_in_crlf() {
        let bodies = Bodies::new(1 << 20, "run".into());
        for size in [200, 1024, 1025, 1026, 10_240, 100 * 1024, 1 << 20] {
            let m = bodies.message(7, size, "a@b.test", "c@d.test", DATE);
            let bytes = flat(&m);
            assert_eq!(bytes.len() as u64, size.max(m.header.len() as u64 + 2));
            assert_eq!(m.len(), bytes.len() as u64);
            assert!(bytes.ends_with(b"\r\n"));
            for (i, _) in bytes.iter().enumerate().filter(|(_, &b)| b == b'\n') {
                assert_eq!(bytes[i - 1], b'\r', "bare LF at {i} for size {size}");
            }
            for (i, _) in bytes.iter().enumerate().filter(|(_, &b)| b == b'\r') {
                assert_eq!(bytes.get(i + 1), Some(&b'\n'), "bare CR at {i}");
            }
        }
    }

    #[test]
    fn tiny_sizes_still_make_a_message() {
        let bodies = Bodies::new(1024, "run".into());
        let m = bodies.message(1, 10, "a@b.test", "c@d.test", DATE);
        assert!(flat(&m).ends_with(b"\r\n\r\nx\r\n") || flat(&m).ends_with(b"\r\n\r\n\r\n"));
    }

    #[test]
    fn headers_carry_the_sequence() {
        let bodies = Bodies::new(1024, "run".into());
        let m = bodies.message(42, 1024, "a@b.test", "c@d.test", DATE);
        assert!(m
            .header
            .starts_with("Message-ID: <run.42@postern-load.test>\r\nX-Postern-Load-Seq: 42\r\n"));
        assert!(m
            .header
            .contains(&format!("\r\nDate: {DATE}\r\nFrom: <a@b.test>\r\n")));
    }

    #[test]
    fn the_null_reverse_path_still_has_an_author() {
        let bodies = Bodies::new(1024, "run".into());
        let m = bodies.message(1, 1024, "", "c@d.test", DATE);
        assert!(
            m.header
                .contains(&format!("\r\nFrom: <{NULL_SENDER_FROM}>\r\n")),
            "{}",
            m.header
        );
    }

    #[test]
    fn patterns() {
        assert_eq!(address("u{n}.{r}@x.test", 5, 2), "u5.2@x.test");
        assert_eq!(address("u{seq}@x.test", 7, 0), "u7@x.test");
        assert_eq!(address("plain@x.test", 5, 2), "plain@x.test");
    }
}
