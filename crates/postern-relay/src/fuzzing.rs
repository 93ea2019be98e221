//! Entry points for the fuzz targets in `fuzz/`, kept here so that each target is one line and
//! the checks compile (and run in tests) with the crate. Each takes arbitrary bytes and panics
//! only when an invariant breaks.
//!
//! A delivery report carries what others wrote: the returned message is the sender's, the
//! diagnostic a next hop's reply, the original recipient a client's `ORCPT`. Whatever they
//! hold, a report must stay mail that any next hop takes: CRLF line ends only, no line over
//! [`MAX_LINE`] octets, no NUL (RFC 5322 2.1.1, RFC 2045 2.7 and 2.8).

use crate::dsn::{
    build, connection_status, deferral_status, header_block, is_8bit, status_of, with_headers_only,
    Action, HeadersOnly, Report, ReportRecipient, MAX_LINE,
};
use crate::mime::labelled_binary;

/// Builds a report from fields cut out of `data` and checks it, and the report it becomes
/// for a next hop that takes only its headers.
///
/// Layout: three octets of settings (flags; the most octets returned; recipients), then
/// fields separated by `0xFF`: reporting host, queue ID, ENVID, reverse path, client name,
/// recipient, ORCPT, remote host, diagnostic, and last the original message (which may hold
/// `0xFF`).
pub fn report(data: &[u8]) {
    let (settings, rest) = data.split_at(data.len().min(3));
    let setting = |i: usize| settings.get(i).copied().unwrap_or(0);
    let flags = setting(0);
    let mut fields = rest.splitn(10, |&byte| byte == 0xff);
    let mut next = || String::from_utf8_lossy(fields.next().unwrap_or_default()).into_owned();
    let (host, queue_id, envid, to, client) = (next(), next(), next(), next(), next());
    let (path, orcpt, remote, diagnostic) = (next(), next(), next(), next());
    let original = rest
        .splitn(10, |&byte| byte == 0xff)
        .nth(9)
        .unwrap_or_default();

    for text in [&diagnostic, &path] {
        for status in [
            status_of(text),
            deferral_status(text, "4.4.1"),
            connection_status(text, "4.4.2"),
        ] {
            assert!(is_enhanced_code(&status), "{status:?} from {text:?}");
        }
    }
    let _ = labelled_binary(original);

    let actions = [
        Action::Failed,
        Action::Delayed,
        Action::Delivered,
        Action::Relayed,
    ];
    let recipients: Vec<ReportRecipient> = (0..usize::from(setting(2) % 4) + 1)
        .map(|i| ReportRecipient {
            path: if i == 0 {
                path.clone()
            } else {
                format!("{path}{i}")
            },
            orcpt: (flags & 0x20 != 0).then(|| orcpt.clone()),
            action: actions[(usize::from(flags >> 3) + i) % actions.len()],
            status: status_of(&diagnostic),
            remote_mta: (flags & 0x80 != 0).then(|| remote.clone()),
            diagnostic: (flags & 0x40 != 0).then(|| diagnostic.clone()),
            last_attempt: Some(1_790_000_000),
            will_retry_until: Some(1_790_400_000),
        })
        .collect();
    let report = Report {
        reporting_mta: &host,
        queue_id: &queue_id,
        envid: (!envid.is_empty()).then_some(envid.as_str()),
        arrival: 1_789_990_000,
        now: 1_790_000_000,
        to: &to,
        received_from: (!client.is_empty()).then_some(client.as_str()),
        recipients: &recipients,
        original,
        return_full: flags & 1 != 0,
        binary: flags & 2 != 0,
        max_returned: match setting(1) {
            255 => usize::MAX,
            n => usize::from(n) * 64,
        },
    };
    let built = build(&report);
    check_mail(&built, "report");
    let why = if flags & 4 != 0 {
        HeadersOnly::EightBit
    } else {
        HeadersOnly::TooBig
    };
    if let Some(trimmed) = with_headers_only(&built, why) {
        check_mail(&trimmed, "report with headers only");
        // Its text, whatever its encoding, no longer says the whole message is attached (a
        // next hop's words quoted in it may say anything).
        let text = |mail: &[u8]| {
            mail_parser::MessageParser::default()
                .parse(mail)
                .and_then(|m| m.body_text(0).map(|t| t.into_owned()))
                .unwrap_or_default()
        };
        let said = |text: &str| {
            text.matches("a copy of the message are attached.\r\n")
                .count()
        };
        let (before, after) = (said(&text(&built)), said(&text(&trimmed)));
        assert!(
            before >= 1 && after == before - 1,
            "report with headers only still says the message is attached: {:?}",
            text(&trimmed)
        );
    }
}

/// Whether `status` is an enhanced status code: class 2, 4 or 5, then subject and detail of
/// one to three digits each (RFC 3463 2).
fn is_enhanced_code(status: &str) -> bool {
    let mut parts = status.split('.');
    let digits = |part: Option<&str>| {
        part.is_some_and(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
    };
    matches!(parts.next(), Some("2" | "4" | "5"))
        && digits(parts.next())
        && digits(parts.next())
        && parts.next().is_none()
}

/// Panics unless `mail` is CRLF text with no line over [`MAX_LINE`] octets and no NUL, and is
/// labelled 8bit when it has 8-bit octets in its body.
fn check_mail(mail: &[u8], what: &str) {
    assert!(!mail.contains(&0), "{what} holds a NUL");
    let mut line = 0;
    for (at, &byte) in mail.iter().enumerate() {
        match byte {
            b'\r' => assert!(mail.get(at + 1) == Some(&b'\n'), "{what}: bare CR at {at}"),
            b'\n' => {
                assert!(at > 0 && mail[at - 1] == b'\r', "{what}: bare LF at {at}");
                line = 0;
            }
            _ => {
                line += 1;
                assert!(
                    line <= MAX_LINE,
                    "{what}: a line over {MAX_LINE} octets at {at}"
                );
            }
        }
    }
    let head = header_block(mail);
    let body = &mail[head.len()..];
    if is_8bit(body) {
        let label = b"Content-Transfer-Encoding: 8bit\r\n";
        assert!(
            head.windows(label.len()).any(|w| w == label),
            "{what}: 8-bit body not labelled 8bit"
        );
    }
}

/// Makes `data`, taken as a stored message, fit a next hop that takes text only (as a relay
/// does for one without BINARYMIME, `fold_long_lines`), and checks what goes out: no line
/// over 998 octets before its line end, a line end after the last line, the same octets but
/// for line ends and blanks (in order), no more lines of blanks alone in the header section
/// than came in, and, where `data` holds no NUL and no CR or LF but in CR LF (the last line
/// aside), text (RFC 5322 2.1.1).
pub fn fit_text(data: &[u8]) {
    let Ok(body) = postern_spool::MessageRef::from_bytes("Q", data) else {
        return;
    };
    let out: Vec<u8> = match crate::engine::prepare::fold_long_lines("Q", &body) {
        Some(fitted) => fitted.chunks().flatten().copied().collect(),
        None => data.to_vec(),
    };
    let lines: Vec<&[u8]> = out.split_inclusive(|&b| b == b'\n').collect();
    for line in &lines {
        let content = line.strip_suffix(b"\n").unwrap_or(line);
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        assert!(
            content.len() <= MAX_LINE,
            "a line of {} octets",
            content.len()
        );
    }
    assert!(
        out.is_empty() || out.ends_with(b"\n"),
        "no line end at the end"
    );
    let words = |m: &[u8]| -> Vec<u8> {
        m.iter()
            .copied()
            .filter(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
            .collect()
    };
    assert_eq!(words(&out), words(data), "octets other than blanks changed");
    let blank_lines = |m: &[u8]| {
        m.split_inclusive(|&b| b == b'\n')
            .map(|l| l.strip_suffix(b"\n").unwrap_or(l))
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .take_while(|l| !l.is_empty())
            .filter(|l| l.iter().all(|b| matches!(b, b' ' | b'\t')))
            .count()
    };
    assert!(
        blank_lines(&out) <= blank_lines(data),
        "a line of blanks alone made in the header section"
    );
    let body_part = data.strip_suffix(b"\r").unwrap_or(data);
    let crlf_only = !data.contains(&0)
        && body_part.split_inclusive(|&b| b == b'\n').all(|l| {
            let content = l.strip_suffix(b"\r\n").unwrap_or(l);
            !content.contains(&b'\r') && !content.contains(&b'\n')
        });
    if crlf_only {
        assert!(
            crate::engine::prepare::text_lines(std::iter::once(&out[..])),
            "not text"
        );
    }
}
