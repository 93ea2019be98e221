//! The trace header postern prepends (RFC 5321 4.4) and the mail-loop check on the ones a
//! message already carries.

use std::fmt::Write;
use std::net::SocketAddr;
use std::time::SystemTime;

/// Received headers beyond which a message is taken to be looping (RFC 5321 6.3).
pub(crate) const MAX_RECEIVED: usize = 100;

/// What the Received header says about the transaction.
pub(crate) struct Trace<'a> {
    pub(crate) helo: &'a str,
    pub(crate) client: SocketAddr,
    pub(crate) hostname: &'a str,
    pub(crate) esmtp: bool,
    pub(crate) tls: bool,
    /// The TLS cipher suite in use, by its IANA name (RFC 8314 4.3's `tls` clause).
    pub(crate) tls_cipher: Option<&'a str>,
    /// The transaction used SMTPUTF8 (MAIL ... SMTPUTF8).
    pub(crate) smtputf8: bool,
    pub(crate) queue_id: &'a str,
    /// The single recipient, when there is exactly one.
    pub(crate) single_rcpt: Option<&'a str>,
    pub(crate) now: SystemTime,
}

/// Writes the Received header, folded, CRLF-terminated.
pub(crate) fn received_header(t: &Trace<'_>, out: &mut Vec<u8>) {
    // Registered "with" names only (RFC 5321 4.4, RFC 3848, RFC 6531 3.7.3). TLS came by
    // STARTTLS, an ESMTP extension, or on the implicit-TLS port, so it is ESMTPS even after
    // HELO; SMTPUTF8 needs EHLO, so it always has the ESMTP names' UTF8 forms.
    let protocol = match (t.smtputf8, t.esmtp || t.tls, t.tls) {
        (true, _, false) => "UTF8SMTP",
        (true, _, true) => "UTF8SMTPS",
        (false, false, _) => "SMTP",
        (false, true, false) => "ESMTP",
        (false, true, true) => "ESMTPS",
    };
    let mut s = String::with_capacity(256);
    let helo = if t.helo.is_empty() { "unknown" } else { t.helo };
    // A UTF-8 HELO name goes in as A-labels, with or without SMTPUTF8: this header must not
    // be what makes a message internationalized (RFC 6532), which a next hop without
    // SMTPUTF8 could not take.
    let ascii_helo;
    let helo = if helo.is_ascii() {
        helo
    } else {
        ascii_helo = postern_proto::address::domain_to_ascii(helo)
            .map_or_else(|| "unknown".to_owned(), |d| d.into_owned());
        &ascii_helo
    };
    // TCP-info is an address literal (RFC 5321 4.4, 4.1.3): `[192.0.2.1]`, `[IPv6:2001:db8::1]`.
    let literal = match t.client.ip() {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("[{v4}]"),
            None => format!("[IPv6:{v6}]"),
        },
        v4 => format!("[{v4}]"),
    };
    // An address literal for our own name takes its TCP-info too (RFC 5321 4.4's
    // Extended-Domain): the literal itself.
    let by = if t.hostname.starts_with('[') {
        format!("{0} ({0})", t.hostname)
    } else {
        t.hostname.to_owned()
    };
    let _ = write!(
        s,
        "Received: from {helo} ({literal})\r\n\tby {by} (postern) with {protocol} id {}",
        t.queue_id
    );
    // Not an address with a control character (C1 controls such as U+0085 and U+009B are
    // possible in a quoted SMTPUTF8 local part), a Unicode line or paragraph separator, or a
    // bidirectional override: tools that split text at them would see a header line the
    // client wrote, and displays would show it reordered. Nor one with `;`, `(` or `)` (a
    // quoted local part may hold them): readers of trace fields take what follows the first
    // `;` for the date, and parentheses for comments, so a client could write a date or a
    // comment of its own into this server's field. The clause is optional (RFC 5321 4.4).
    let fit = |r: &&str| {
        !r.chars()
            .any(|c| unfit_for_trace(c) || matches!(c, ';' | '(' | ')'))
    };
    if let Some(rcpt) = t.single_rcpt.filter(fit) {
        // `<Postmaster>` alone is this server's postmaster (RFC 5321 4.1.1.3); the clause takes
        // a whole Path (4.4), so the domain is written out.
        let _ = if rcpt.contains('@') {
            // Only the domain UTF-8: in A-labels, like the HELO name, so that this clause is
            // not what makes the message need SMTPUTF8 at a next hop without it (RFC 6531
            // 3.2). A UTF-8 local part has no ASCII form and stays as it is.
            let rcpt = postern_proto::address::mailbox_to_ascii(rcpt)
                .unwrap_or(std::borrow::Cow::Borrowed(rcpt));
            write!(s, "\r\n\tfor <{rcpt}>")
        } else {
            write!(s, "\r\n\tfor <{rcpt}@{}>", t.hostname)
        };
    }
    // RFC 8314 4.3: the cipher suite of a TLS session, in a clause of its own after the
    // others (RFC 5321 4.4's Additional-Registered-Clauses). A name as rustls gives it is
    // letters, digits and `_`; anything else is left out rather than written into the trace.
    if let Some(cipher) = t
        .tls_cipher
        .filter(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
    {
        let _ = write!(s, "\r\n\ttls {cipher}");
    }
    let _ = write!(s, ";\r\n\t{}\r\n", rfc5322_date(t.now));
    out.extend_from_slice(s.as_bytes());
}

/// An RFC 5322 date-time in UTC: `Sun, 22 Nov 2026 11:17:00 +0000`.
pub fn rfc5322_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {d:02} {} {y} {:02}:{:02}:{:02} +0000",
        WEEKDAYS[(days.rem_euclid(7)) as usize],
        MONTHS[(m - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Counts `Received:` header fields in the header section of a body as it streams past,
/// also in the obsolete form with white space before the colon (`Received :`, RFC 5322 4.5).
#[derive(Debug, Default)]
pub(crate) struct LoopDetector {
    /// Position in the current line (saturating; only the first 8 bytes are kept).
    col: usize,
    /// The first bytes of the current line.
    head: [u8; 8],
    /// The line starts with the field name `Received` and only white space has come after it.
    named: bool,
    /// The header section has ended (an empty line).
    done: bool,
    count: usize,
}

impl LoopDetector {
    /// Feeds body bytes; cheap once the header section is over.
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.done {
                return;
            }
            if b == b'\n' {
                if self.col == 0 || (self.col == 1 && self.head[0] == b'\r') {
                    self.done = true;
                }
                self.col = 0;
                continue;
            }
            if self.col < self.head.len() {
                self.head[self.col] = b;
                self.named = self.col == 7 && self.head.eq_ignore_ascii_case(b"received");
            } else if self.named {
                match b {
                    b' ' | b'\t' => {}
                    b':' => {
                        self.count += 1;
                        self.named = false;
                    }
                    _ => self.named = false,
                }
            }
            self.col = self.col.saturating_add(1);
        }
    }

    /// Whether the message carries more Received headers than allowed.
    pub(crate) fn is_looping(&self) -> bool {
        self.count > MAX_RECEIVED
    }
}

/// A character kept out of a trace field: a control, a line or paragraph separator, or a
/// bidirectional formatting character (embeddings, overrides, isolates, marks).
fn unfit_for_trace(c: char) -> bool {
    postern_proto::text::unfit_for_display(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn dates() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_346_220);
        assert_eq!(rfc5322_date(t), "Sun, 22 Nov 2026 11:17:00 +0000");
        assert_eq!(
            rfc5322_date(SystemTime::UNIX_EPOCH),
            "Thu, 01 Jan 1970 00:00:00 +0000"
        );
    }

    #[test]
    fn received_header_format() {
        assert_eq!(
            header(&Trace {
                tls: true,
                ..trace()
            }),
            "Received: from client.test ([192.0.2.7])\r\n\tby mx.test (postern) with ESMTPS id Q1\r\n\tfor <a@b.test>;\r\n\tThu, 01 Jan 1970 00:00:00 +0000\r\n"
        );
        // RFC 8314 4.3: the cipher suite in a `tls` clause, after `for`.
        assert_eq!(
            header(&Trace {
                tls: true,
                tls_cipher: Some("TLS_AES_256_GCM_SHA384"),
                ..trace()
            }),
            "Received: from client.test ([192.0.2.7])\r\n\tby mx.test (postern) with ESMTPS id Q1\r\n\tfor <a@b.test>\r\n\ttls TLS_AES_256_GCM_SHA384;\r\n\tThu, 01 Jan 1970 00:00:00 +0000\r\n"
        );
        // A name with anything but letters, digits and `_` is left out.
        let odd = header(&Trace {
            tls: true,
            tls_cipher: Some("X; (y)"),
            ..trace()
        });
        assert!(!odd.contains("tls "), "{odd}");
    }

    #[test]
    fn an_address_literal_for_our_name_has_its_tcp_info() {
        for hostname in ["[192.0.2.1]", "[IPv6:2001:db8::1]"] {
            let text = header(&Trace {
                hostname,
                ..trace()
            });
            assert!(
                text.contains(&format!(
                    "\tby {hostname} ({hostname}) (postern) with ESMTP id"
                )),
                "{text}"
            );
        }
    }

    #[test]
    fn a_utf8_domain_after_an_ascii_local_part_is_written_in_a_labels() {
        for (rcpt, written) in [
            ("u@b\u{fc}cher.test", "u@xn--bcher-kva.test"),
            ("\"a@b\"@b\u{fc}cher.test", "\"a@b\"@xn--bcher-kva.test"),
            ("j\u{f6}rg@b\u{fc}cher.test", "j\u{f6}rg@b\u{fc}cher.test"),
            ("u@xn--bcher-kva.test", "u@xn--bcher-kva.test"),
        ] {
            let text = header(&Trace {
                smtputf8: true,
                single_rcpt: Some(rcpt),
                ..trace()
            });
            assert!(text.contains(&format!("\tfor <{written}>;")), "{text}");
        }
    }

    #[test]
    fn no_for_clause_for_an_address_with_a_separator_control_bidi_or_trace_character() {
        for rcpt in [
            "\"a\u{2028}b\"@b.test",
            "\"a\u{85}b\"@b.test",
            "\"a\u{2029}\"@b.test",
            "\"a\u{9b}b\"@b.test",
            "\"\u{202e}gnp.exe\"@b.test",
            "\"a\u{2066}b\u{2069}\"@b.test",
            "\"x;Mon, 01 Jan 2001 00:00:00 +0000\"@b.test",
            "\"a(b\"@b.test",
            "\"a)b\"@b.test",
        ] {
            let text = header(&Trace {
                smtputf8: true,
                single_rcpt: Some(rcpt),
                ..trace()
            });
            assert!(!text.contains("for <"), "{text}");
            assert!(
                text.ends_with(";\r\n\tThu, 01 Jan 1970 00:00:00 +0000\r\n"),
                "{text}"
            );
        }
    }

    #[test]
    fn the_bare_postmaster_is_named_with_our_domain() {
        for rcpt in ["Postmaster", "postMASTER"] {
            let text = header(&Trace {
                single_rcpt: Some(rcpt),
                ..trace()
            });
            assert!(
                text.contains(&format!("\r\n\tfor <{rcpt}@mx.test>;")),
                "{text}"
            );
        }
    }

    /// The trace of a client `client.test` at 192.0.2.7, EHLO, no TLS, one recipient.
    fn trace() -> Trace<'static> {
        Trace {
            helo: "client.test",
            client: "192.0.2.7:5000".parse().unwrap(),
            hostname: "mx.test",
            esmtp: true,
            tls: false,
            tls_cipher: None,
            smtputf8: false,
            queue_id: "Q1",
            single_rcpt: Some("a@b.test"),
            now: SystemTime::UNIX_EPOCH,
        }
    }

    fn header(t: &Trace<'_>) -> String {
        let mut out = Vec::new();
        received_header(t, &mut out);
        String::from_utf8(out).unwrap()
    }

    fn with_name(helo: &str, esmtp: bool, tls: bool, smtputf8: bool) -> String {
        header(&Trace {
            helo,
            esmtp,
            tls,
            smtputf8,
            single_rcpt: None,
            ..trace()
        })
    }

    #[test]
    fn protocol_names_are_registered_ones() {
        for (esmtp, tls, utf8, name) in [
            (false, false, false, " with SMTP id"),
            (false, true, false, " with ESMTPS id"),
            (true, false, false, " with ESMTP id"),
            (true, true, false, " with ESMTPS id"),
            (true, false, true, " with UTF8SMTP id"),
            (true, true, true, " with UTF8SMTPS id"),
        ] {
            let h = with_name("c.test", esmtp, tls, utf8);
            assert!(h.contains(name), "{esmtp} {tls} {utf8}: {h}");
        }
    }

    #[test]
    fn the_client_address_is_an_address_literal() {
        for (client, literal) in [
            ("192.0.2.7:25", "([192.0.2.7])"),
            ("[2001:db8::1]:25", "([IPv6:2001:db8::1])"),
            ("[::ffff:192.0.2.8]:25", "([192.0.2.8])"),
        ] {
            let h = header(&Trace {
                helo: "c.test",
                client: client.parse().unwrap(),
                ..trace()
            });
            assert!(
                h.starts_with(&format!("Received: from c.test {literal}\r\n")),
                "{h}"
            );
        }
    }

    #[test]
    fn a_utf8_helo_name_is_written_as_a_labels() {
        for smtputf8 in [false, true] {
            let h = with_name("b\u{fc}cher.example", true, false, smtputf8);
            assert!(
                h.starts_with("Received: from xn--bcher-kva.example ("),
                "{h}"
            );
            assert!(h.is_ascii());
        }
    }

    #[test]
    fn loop_detector_counts_headers_only() {
        let mut d = LoopDetector::default();
        let mut body = Vec::new();
        for _ in 0..101 {
            body.extend_from_slice(b"Received: from x by y; date\r\n");
        }
        body.extend_from_slice(b"\r\nReceived: in the body does not count\r\n");
        for chunk in body.chunks(7) {
            d.feed(chunk);
        }
        assert!(d.is_looping());
        let mut d = LoopDetector::default();
        d.feed(&body[..body.len() / 2]);
        assert!(!d.is_looping());
        let mut d = LoopDetector::default();
        d.feed(b"Subject: x\r\n\r\n");
        d.feed(&body);
        assert!(!d.is_looping());
    }

    #[test]
    fn loop_detector_takes_the_obsolete_form_with_space_before_the_colon() {
        let mut body = Vec::new();
        for i in 0..101 {
            body.extend_from_slice(match i % 3 {
                0 => b"Received : from x by y; date\r\n".as_slice(),
                1 => b"RECEIVED\t: from x by y; date\r\n".as_slice(),
                _ => b"received: from x by y; date\r\n".as_slice(),
            });
        }
        for size in [1, 5, 64] {
            let mut d = LoopDetector::default();
            for chunk in body.chunks(size) {
                d.feed(chunk);
            }
            assert!(d.is_looping(), "chunks of {size}");
        }
        // Other fields whose names start alike do not count.
        let mut d = LoopDetector::default();
        for _ in 0..101 {
            d.feed(b"Received-SPF: pass\r\nReceivedx: y\r\nReceived x: y\r\n");
        }
        assert!(!d.is_looping());
    }
}
