#![allow(clippy::unwrap_used)]
//! Delivery status notifications: the reports `dsn::build` makes, read back with mail-parser.

use mail_parser::{Message, MessageParser, MessagePart, MimeHeaders, PartType};
use postern_relay::dsn::{self, Action, Report, ReportRecipient};

const ORIGINAL: &[u8] = b"Received: from client.example (client.example [192.0.2.7])\r\n\
    \tby mx.example.org; Mon, 1 Jan 2024 00:00:00 +0000\r\n\
    From: Alice <alice@example.com>\r\n\
    To: bob@example.net, carol@example.net\r\n\
    Subject: Quarterly figures\r\n\
    Message-ID: <original.1@example.com>\r\n\
    \r\n\
    Hello Bob,\r\n\
    the figures are attached. BODY-MARKER-1234\r\n";

fn recipient(path: &str, action: Action, status: &str, diagnostic: &str) -> ReportRecipient {
    ReportRecipient {
        path: path.to_string(),
        orcpt: Some(format!("rfc822;{path}")),
        action,
        status: status.to_string(),
        remote_mta: Some("mx.example.net".to_string()),
        diagnostic: Some(diagnostic.to_string()),
        last_attempt: Some(1_704_070_800),
        will_retry_until: Some(1_704_499_200),
    }
}

fn failures() -> Vec<ReportRecipient> {
    vec![
        recipient(
            "bob@example.net",
            Action::Failed,
            "5.1.1",
            "550 5.1.1 <bob@example.net>: no such user",
        ),
        recipient(
            "carol@example.net",
            Action::Failed,
            "5.2.2",
            "552 5.2.2 <carol@example.net>: mailbox full",
        ),
    ]
}

fn report<'a>(recipients: &'a [ReportRecipient], original: &'a [u8]) -> Report<'a> {
    Report {
        reporting_mta: "mx.example.org",
        queue_id: "Q1234ABCD",
        envid: Some("env-42"),
        arrival: 1_704_067_200,
        now: 1_704_074_400,
        to: "alice@example.com",
        received_from: Some("client.example [192.0.2.7]"),
        recipients,
        original,
        return_full: false,
        binary: false,
        max_returned: 64 * 1024,
    }
}

/// Every line ends in CRLF and holds at most 998 octets before it.
fn assert_lines_ok(bytes: &[u8]) {
    assert!(bytes.ends_with(b"\r\n"), "no CRLF at the end");
    for (index, line) in bytes.split_inclusive(|&byte| byte == b'\n').enumerate() {
        assert!(
            line.ends_with(b"\r\n"),
            "line {index} does not end in CRLF: {:?}",
            String::from_utf8_lossy(line)
        );
        let content = &line[..line.len() - 2];
        assert!(!content.contains(&b'\r'), "bare CR in line {index}");
        assert!(
            content.len() <= 998,
            "line {index} is {} octets: {:?}",
            content.len(),
            String::from_utf8_lossy(&content[..content.len().min(120)])
        );
    }
}

fn parse(bytes: &[u8]) -> Message<'_> {
    MessageParser::default().parse(bytes).unwrap()
}

/// The three parts under the multipart/report root.
fn parts<'a>(message: &'a Message<'a>) -> Vec<&'a MessagePart<'a>> {
    let root = &message.parts[0];
    let ids = root.sub_parts().expect("the root is multipart");
    ids.iter().map(|&id| &message.parts[id as usize]).collect()
}

fn mime_type(part: &MessagePart<'_>) -> String {
    let content_type = part.content_type().expect("every part has a Content-Type");
    format!(
        "{}/{}",
        content_type.ctype(),
        content_type.subtype().unwrap_or_default()
    )
}

/// The delivery-status part's body as written (it must be plain 7bit text).
fn delivery_status(message: &Message<'_>) -> String {
    let part = parts(message)[1];
    String::from_utf8(part.contents().to_vec()).unwrap()
}

/// The per-recipient blocks of a delivery-status body, each as (name, value) pairs.
fn blocks(status: &str) -> Vec<Vec<(String, String)>> {
    let unfolded = status.replace("\r\n ", " ");
    unfolded
        .split("\r\n\r\n")
        .map(|block| {
            block
                .split("\r\n")
                .filter(|line| !line.is_empty())
                .map(|line| {
                    let (name, value) = line.split_once(':').unwrap();
                    (name.to_string(), value.trim().to_string())
                })
                .collect()
        })
        .collect()
}

fn value<'a>(block: &'a [(String, String)], name: &str) -> Option<&'a str> {
    block
        .iter()
        .find(|(field, _)| field.eq_ignore_ascii_case(name))
        .map(|(_, value)| value.as_str())
}

#[test]
fn report_is_multipart_report_with_three_parts() {
    let recipients = failures();
    let bytes = dsn::build(&report(&recipients, ORIGINAL));
    assert_lines_ok(&bytes);
    let message = parse(&bytes);

    let content_type = message.content_type().unwrap();
    assert_eq!(content_type.ctype(), "multipart");
    assert_eq!(content_type.subtype(), Some("report"));
    assert_eq!(
        content_type.attribute("report-type"),
        Some("delivery-status")
    );

    let parts = parts(&message);
    assert_eq!(parts.len(), 3);
    assert_eq!(mime_type(parts[0]), "text/plain");
    assert_eq!(mime_type(parts[1]), "message/delivery-status");
    assert_eq!(mime_type(parts[2]), "text/rfc822-headers");
}

#[test]
fn report_headers_name_the_mailer_daemon_and_the_sender() {
    let recipients = failures();
    let bytes = dsn::build(&report(&recipients, ORIGINAL));
    let message = parse(&bytes);

    assert_eq!(
        message.subject(),
        Some("Undelivered Mail Returned to Sender")
    );
    let from = message.from().unwrap().first().unwrap();
    assert_eq!(from.address(), Some("MAILER-DAEMON@mx.example.org"));
    assert_eq!(from.name(), Some("Mail Delivery System"));
    let to = message.to().unwrap().first().unwrap();
    assert_eq!(to.address(), Some("alice@example.com"));
    assert_eq!(
        message.header_raw("Auto-Submitted").map(str::trim),
        Some("auto-replied")
    );
    assert_eq!(
        message.header_raw("MIME-Version").map(str::trim),
        Some("1.0")
    );
    assert_eq!(message.date().unwrap().to_timestamp(), 1_704_074_400);
    let id = message.message_id().unwrap();
    assert!(
        id.starts_with("Q1234ABCD.1704074400.") && id.ends_with("@mx.example.org"),
        "{id}"
    );
}

#[test]
fn message_ids_differ_between_reports_about_different_recipients() {
    let recipients = failures();
    let first = dsn::build(&report(&recipients[..1], ORIGINAL));
    let second = dsn::build(&report(&recipients[1..], ORIGINAL));
    let first = parse(&first).message_id().unwrap().to_string();
    let second = parse(&second).message_id().unwrap().to_string();
    assert_ne!(first, second);
}

#[test]
fn delivery_status_has_per_message_and_per_recipient_fields() {
    let recipients = failures();
    let bytes = dsn::build(&report(&recipients, ORIGINAL));
    let message = parse(&bytes);
    let status = delivery_status(&message);
    let blocks = blocks(&status);
    assert_eq!(blocks.len(), 1 + recipients.len(), "{status}");

    let per_message = &blocks[0];
    assert_eq!(
        value(per_message, "Reporting-MTA"),
        Some("dns; mx.example.org")
    );
    assert_eq!(value(per_message, "Original-Envelope-Id"), Some("env-42"));
    assert_eq!(value(per_message, "X-Postern-Queue-ID"), Some("Q1234ABCD"));
    assert_eq!(
        value(per_message, "Arrival-Date"),
        Some("Mon, 1 Jan 2024 00:00:00 +0000")
    );

    for (block, recipient) in blocks[1..].iter().zip(&recipients) {
        assert_eq!(
            value(block, "Final-Recipient"),
            Some(format!("rfc822; {}", recipient.path).as_str())
        );
        assert_eq!(
            value(block, "Original-Recipient"),
            Some(format!("rfc822;{}", recipient.path).as_str())
        );
        assert_eq!(value(block, "Action"), Some("failed"));
        assert_eq!(value(block, "Status"), Some(recipient.status.as_str()));
        assert_eq!(value(block, "Remote-MTA"), Some("dns; mx.example.net"));
        assert_eq!(
            value(block, "Diagnostic-Code"),
            Some(format!("smtp; {}", recipient.diagnostic.as_deref().unwrap()).as_str())
        );
        assert_eq!(
            value(block, "Last-Attempt-Date"),
            Some("Mon, 1 Jan 2024 01:00:00 +0000")
        );
        assert_eq!(value(block, "Will-Retry-Until"), None, "only for delayed");
    }
}

#[test]
fn delivery_status_part_is_plain_7bit() {
    let recipients = vec![recipient(
        "user@bücher.example",
        Action::Failed,
        "5.1.1",
        &format!("550 5.1.1 {} unknown\r\nInjected: field", "x".repeat(300)),
    )];
    let bytes = dsn::build(&report(&recipients, ORIGINAL));
    assert_lines_ok(&bytes);
    let message = parse(&bytes);
    let part = parts(&message)[1];
    assert_eq!(part.content_transfer_encoding(), Some("7bit"));
    let status = delivery_status(&message);
    assert!(status.is_ascii(), "{status}");
    assert!(
        status.contains("Final-Recipient: utf-8; user@b\\x{FC}cher.example\r\n"),
        "{status}"
    );
    // The reply's line break is a space: no new field appears.
    assert!(!status.contains("\r\nInjected:"), "{status}");
    let blocks = blocks(&status);
    let diagnostic = value(&blocks[1], "Diagnostic-Code").unwrap();
    assert!(
        diagnostic.ends_with("unknown Injected: field"),
        "{diagnostic}"
    );
    // The raw bytes carry the fields unencoded.
    let raw = String::from_utf8_lossy(&bytes);
    assert!(raw.contains("\r\nAction: failed\r\n"));
}

#[test]
fn headers_only_without_ret_full() {
    let recipients = failures();
    let bytes = dsn::build(&report(&recipients, ORIGINAL));
    let message = parse(&bytes);
    let returned = parts(&message)[2];
    assert_eq!(mime_type(returned), "text/rfc822-headers");
    let text = returned.text_contents().unwrap();
    assert!(text.contains("Subject: Quarterly figures\r\n"), "{text}");
    assert!(
        text.contains("Message-ID: <original.1@example.com>\r\n"),
        "{text}"
    );
    assert!(text.contains("\tby mx.example.org;"), "{text}");
    assert!(!text.contains("BODY-MARKER-1234"), "{text}");
    assert!(!text.contains("Hello Bob"), "{text}");
}

#[test]
fn whole_message_with_ret_full() {
    let recipients = failures();
    let mut report = report(&recipients, ORIGINAL);
    report.return_full = true;
    let bytes = dsn::build(&report);
    assert_lines_ok(&bytes);
    let top = String::from_utf8_lossy(dsn::header_block(&bytes)).into_owned();
    assert!(!top.contains("8bit"), "a 7-bit report: {top}");
    let message = parse(&bytes);
    let returned = parts(&message)[2];
    assert_eq!(mime_type(returned), "message/rfc822");
    let PartType::Message(original) = &returned.body else {
        panic!("the returned part is not a message: {:?}", returned.body);
    };
    assert_eq!(original.subject(), Some("Quarterly figures"));
    assert_eq!(original.message_id(), Some("original.1@example.com"));
    let body = original.body_text(0).unwrap();
    assert!(body.contains("BODY-MARKER-1234"), "{body}");
    // The message comes back byte for byte.
    let raw = &bytes[..];
    assert!(
        raw.windows(ORIGINAL.len()).any(|window| window == ORIGINAL),
        "the original is not returned verbatim"
    );
}

#[test]
fn a_binary_message_returns_headers_only_and_says_why() {
    let recipients = failures();
    let mut report = report(&recipients, ORIGINAL);
    report.return_full = true;
    report.binary = true;
    let bytes = dsn::build(&report);
    assert_lines_ok(&bytes);
    let message = parse(&bytes);
    assert_eq!(mime_type(parts(&message)[2]), "text/rfc822-headers");
    let text = parts(&message)[0].text_contents().unwrap();
    assert!(text.contains("could not come back"), "{text}");
    assert!(text.contains("BINARYMIME"), "{text}");
    // Not asked for: no reason to give.
    report.return_full = false;
    let message = dsn::build(&report);
    let message = parse(&message);
    let text = parts(&message)[0].text_contents().unwrap();
    assert!(!text.contains("could not come back"), "{text}");
}

#[test]
fn over_the_cap_returns_headers_only() {
    let recipients = failures();
    let mut report = report(&recipients, ORIGINAL);
    report.return_full = true;
    report.max_returned = ORIGINAL.len() - 1;
    let bytes = dsn::build(&report);
    let message = parse(&bytes);
    let returned = parts(&message)[2];
    assert_eq!(mime_type(returned), "text/rfc822-headers");
    let text = returned.text_contents().unwrap();
    assert!(text.contains("Subject: Quarterly figures"), "{text}");
    assert!(!text.contains("BODY-MARKER-1234"), "{text}");
    assert!(String::from_utf8_lossy(&bytes).contains("headers of the message"));
    // The sender asked for the whole message: the text says why it did not come back.
    let text = parts(&message)[0].text_contents().unwrap();
    assert!(
        text.contains("could not come back: it is larger than"),
        "{text}"
    );
}

#[test]
fn headers_are_cut_at_a_line_within_the_cap() {
    let recipients = failures();
    let mut report = report(&recipients, ORIGINAL);
    report.max_returned = 100;
    let bytes = dsn::build(&report);
    assert_lines_ok(&bytes);
    let message = parse(&bytes);
    let text = parts(&message)[2].text_contents().unwrap();
    assert!(text.len() <= 100, "{text}");
    assert!(text.starts_with("Received: from client.example"), "{text}");
    assert!(!text.contains("Subject:"), "{text}");
}

#[test]
fn a_line_over_998_octets_returns_headers_with_the_line_broken() {
    let mut original = b"Subject: long\r\nX-Long: ".to_vec();
    original.extend(std::iter::repeat_n(b'h', 2500));
    original.extend_from_slice(b"\r\n\r\n");
    original.extend(std::iter::repeat_n(b'b', 1500));
    original.extend_from_slice(b"\r\n");
    let recipients = failures();
    let mut report = report(&recipients, &original);
    report.return_full = true;
    let bytes = dsn::build(&report);
    assert_lines_ok(&bytes);
    let message = parse(&bytes);
    let returned = parts(&message)[2];
    assert_eq!(mime_type(returned), "text/rfc822-headers");
    let text = returned.text_contents().unwrap();
    assert_eq!(text.matches('h').count(), 2500, "every octet kept");
    assert!(!text.contains("bbbb"), "the body is not returned");
    let why = parts(&message)[0].text_contents().unwrap();
    assert!(why.contains("a line longer than 998 octets"), "{why}");
}

#[test]
fn a_nul_in_the_message_returns_headers_and_says_why() {
    // Neither 7bit nor 8bit content may hold a NUL (RFC 2045 2.7, 2.8).
    let original = b"Subject: nul\r\n\r\nbefore\0after\r\n";
    let recipients = failures();
    let mut report = report(&recipients, original);
    report.return_full = true;
    let bytes = dsn::build(&report);
    assert_lines_ok(&bytes);
    assert!(!bytes.contains(&0), "a NUL in the report");
    let message = parse(&bytes);
    assert_eq!(mime_type(parts(&message)[2]), "text/rfc822-headers");
    let why = parts(&message)[0].text_contents().unwrap();
    assert!(why.contains("a NUL octet"), "{why}");
    // Without RET=FULL, headers only as asked, and no reason to give.
    report.return_full = false;
    let bytes = dsn::build(&report);
    let message = parse(&bytes);
    let text = parts(&message)[0].text_contents().unwrap();
    assert!(!text.contains("could not come back"), "{text}");
}

#[test]
fn a_whole_message_with_8bit_header_fields_is_message_global_only_when_they_are_utf8() {
    // RFC 6532 3.7, RFC 6533 6.3: message/global header fields are UTF-8.
    let recipients = failures();
    for (original, kind) in [
        (
            &b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n\r\nbody\r\n"[..],
            "message/global",
        ),
        (
            &b"Subject: Gr\xfc\xdfe\r\n\r\nbody\r\n"[..],
            "message/rfc822",
        ),
    ] {
        let mut report = report(&recipients, original);
        report.return_full = true;
        let bytes = dsn::build(&report);
        assert_lines_ok(&bytes);
        let message = parse(&bytes);
        let returned = parts(&message)[2];
        assert_eq!(mime_type(returned), kind);
        if kind == "message/rfc822" {
            // That type allows no encoding: the original as it came, and an 8bit report.
            assert!(
                bytes.windows(original.len()).any(|w| w == original),
                "the original is not returned verbatim"
            );
            assert!(dsn::is_8bit(&bytes));
        } else {
            // message/global takes any encoding (RFC 6532 3.7), and goes 7-bit where the
            // return path may lack SMTPUTF8 (RFC 6533 6): the report is 7-bit, and the part
            // decodes to the original.
            assert!(!dsn::is_8bit(&bytes), "an 8-bit report");
            assert_eq!(returned.contents(), original);
        }
    }
}

#[test]
fn a_whole_internationalized_message_is_returned_encoded_in_a_7bit_report() {
    // UTF-8 header fields and an 8-bit body, from an ASCII sender: the report needs neither
    // 8BITMIME nor SMTPUTF8 on its way back, and carries the whole message, octet for octet.
    // A body in another charset comes base64, one in UTF-8 quoted-printable.
    for (original, encoding) in [
        (
            &b"Subject: caf\xc3\xa9\r\nFrom: <a@example.test>\r\n\r\nGr\xfc\xdfe\r\n"[..],
            "base64",
        ),
        (
            &b"Subject: caf\xc3\xa9\r\nFrom: <a@example.test>\r\n\r\nGr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n"[..],
            "quoted-printable",
        ),
    ] {
        let recipients = failures();
        let mut report = report(&recipients, original);
        report.return_full = true;
        let bytes = dsn::build(&report);
        assert_lines_ok(&bytes);
        assert!(!dsn::is_8bit(&bytes), "an 8-bit report");
        let top = String::from_utf8_lossy(dsn::header_block(&bytes)).into_owned();
        assert!(!top.contains("Content-Transfer-Encoding: 8bit"), "{top}");
        let message = parse(&bytes);
        let returned = parts(&message)[2];
        assert_eq!(mime_type(returned), "message/global");
        assert_eq!(returned.content_transfer_encoding(), Some(encoding));
        assert_eq!(returned.contents(), original);
        // Too large for the sender's next hop: remade with the header section, read from
        // the encoded message.
        let remade = dsn::with_headers_only(&bytes, dsn::HeadersOnly::TooBig).unwrap();
        assert_lines_ok(&remade);
        let message = parse(&remade);
        let returned = parts(&message)[2];
        assert_eq!(mime_type(returned), "message/global-headers");
        assert_eq!(
            returned.contents(),
            b"Subject: caf\xc3\xa9\r\nFrom: <a@example.test>\r\n"
        );
    }
}

#[test]
fn eight_bit_headers_come_back_encoded_in_a_7bit_report() {
    let original = "Subject: Grüße aus Köln\r\nFrom: jörg@example.de\r\n\r\nHallo\r\n";
    let recipients = failures();
    let bytes = dsn::build(&report(&recipients, original.as_bytes()));
    assert_lines_ok(&bytes);
    // 7-bit, so that it reaches a sender whose next hop lacks 8BITMIME.
    assert!(!dsn::is_8bit(&bytes));
    let message = parse(&bytes);
    let returned = parts(&message)[2];
    assert_eq!(
        returned.content_transfer_encoding(),
        Some("quoted-printable")
    );
    // UTF-8 header fields are internationalized: message/global-headers (RFC 6533 6.4),
    // a type without parameters.
    assert_eq!(mime_type(returned), "message/global-headers");
    let raw = String::from_utf8(bytes.clone()).unwrap();
    assert!(
        raw.contains("Content-Type: message/global-headers\r\n"),
        "{raw}"
    );
    let decoded = String::from_utf8_lossy(returned.contents()).into_owned();
    assert!(
        decoded.starts_with("Subject: Grüße aus Köln\r\nFrom: jörg@example.de\r\n"),
        "{decoded}"
    );
    assert!(!decoded.contains("Hallo"), "{decoded}");

    // Octets that are not UTF-8 come back encoded too, and whole.
    let latin1 = b"Subject: Gr\xfc\xdfe\r\n\r\nbody\r\n";
    let bytes = dsn::build(&report(&recipients, latin1));
    assert!(!dsn::is_8bit(&bytes));
    let message = parse(&bytes);
    let returned = parts(&message)[2];
    assert_eq!(
        returned.content_transfer_encoding(),
        Some("quoted-printable")
    );
    let raw = String::from_utf8(bytes.clone()).unwrap();
    assert!(raw.contains("\r\n\r\nSubject: Gr=FC=DFe\r\n"), "{raw}");
    // Not UTF-8, so not internationalized header fields (RFC 6532 3.2).
    assert_eq!(mime_type(returned), "text/rfc822-headers");
    // Neither type defines a charset parameter.
    assert!(
        raw.contains("Content-Type: text/rfc822-headers\r\n"),
        "{raw}"
    );

    let ascii = dsn::build(&report(&recipients, ORIGINAL));
    assert!(!dsn::is_8bit(&ascii));
    assert_eq!(
        parts(&parse(&ascii))[2].content_transfer_encoding(),
        Some("7bit")
    );
    assert_eq!(mime_type(parts(&parse(&ascii))[2]), "text/rfc822-headers");
}

#[test]
fn a_utf8_recipient_is_of_the_utf8_address_type() {
    let recipients = vec![recipient(
        "j\u{f6}rg@b\u{fc}cher.example",
        Action::Failed,
        "5.1.1",
        "550 5.1.1 no such user",
    )];
    let bytes = dsn::build(&report(&recipients, ORIGINAL));
    let status = delivery_status(&parse(&bytes));
    let blocks = blocks(&status);
    assert_eq!(
        value(&blocks[1], "Final-Recipient"),
        Some("utf-8; j\\x{F6}rg@b\\x{FC}cher.example")
    );
}

#[test]
fn delay_report_says_delayed_and_until_when() {
    let recipients = vec![recipient(
        "bob@example.net",
        Action::Delayed,
        "4.4.7",
        "421 4.4.7 try again later",
    )];
    let bytes = dsn::build(&report(&recipients, ORIGINAL));
    assert_lines_ok(&bytes);
    let message = parse(&bytes);
    assert_eq!(
        message.subject(),
        Some("Delayed Mail (still being retried)")
    );
    let blocks = blocks(&delivery_status(&message));
    assert_eq!(value(&blocks[1], "Action"), Some("delayed"));
    assert_eq!(value(&blocks[1], "Status"), Some("4.4.7"));
    assert_eq!(
        value(&blocks[1], "Will-Retry-Until"),
        Some("Sat, 6 Jan 2024 00:00:00 +0000")
    );
    let text = parts(&message)[0].text_contents().unwrap();
    assert!(text.contains("will keep trying"), "{text}");
    assert!(text.contains("421 4.4.7 try again later"), "{text}");
}

#[test]
fn mixed_failure_and_delay_is_a_failure_report() {
    let mut recipients = failures();
    recipients.push(recipient(
        "dave@example.net",
        Action::Delayed,
        "5.4.7",
        "451 timeout",
    ));
    let bytes = dsn::build(&report(&recipients, ORIGINAL));
    let message = parse(&bytes);
    assert_eq!(
        message.subject(),
        Some("Undelivered Mail Returned to Sender")
    );
    let blocks = blocks(&delivery_status(&message));
    assert_eq!(value(&blocks[3], "Action"), Some("delayed"));
    assert_eq!(
        value(&blocks[3], "Status"),
        Some("4.4.7"),
        "class follows action"
    );
}

#[test]
fn text_part_lists_every_recipient_and_reply() {
    let recipients = failures();
    let bytes = dsn::build(&report(&recipients, ORIGINAL));
    let message = parse(&bytes);
    let text = parts(&message)[0].text_contents().unwrap();
    for recipient in &recipients {
        assert!(text.contains(&format!("<{}>", recipient.path)), "{text}");
        assert!(
            text.contains(recipient.diagnostic.as_deref().unwrap()),
            "{text}"
        );
    }
    assert!(text.contains("mx.example.org"), "{text}");
    assert!(text.contains("Q1234ABCD"), "{text}");
}

#[test]
fn status_of_reads_the_enhanced_code() {
    assert_eq!(dsn::status_of("550 5.1.1 <x@y>: no such user"), "5.1.1");
    assert_eq!(dsn::status_of("550 no such user"), "5.0.0");
    assert_eq!(dsn::status_of("450 mailbox busy"), "4.0.0");
}

#[test]
fn header_block_splits_at_the_empty_line() {
    assert_eq!(
        dsn::header_block(ORIGINAL),
        &ORIGINAL[..ORIGINAL.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4]
    );
    assert_eq!(dsn::header_block(b"no separator"), b"no separator");
}

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        const PIECES: &[&[u8]] = &[
            b"\r\n",
            b"\n",
            b"\r",
            b"\r\n\r\n",
            b"\n\n",
            b":",
            b" ",
            b"\t",
            b"\0",
            b"\xff",
            b"\xc3\xa9",
            b"Subject: x",
            b"--",
            b".",
            b"=?utf-8?q?x?=",
        ];
        let len = self.below(max + 1);
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            match self.below(4) {
                0 => out.extend_from_slice(PIECES[self.below(PIECES.len())]),
                1 => out.extend(std::iter::repeat_n(b'a', self.below(1200))),
                _ => out.push(self.next() as u8),
            }
        }
        out
    }

    fn text(&mut self, max: usize) -> String {
        String::from_utf8_lossy(&self.bytes(max)).into_owned()
    }

    fn time(&mut self) -> u64 {
        match self.below(4) {
            0 => 0,
            1 => u64::MAX,
            _ => self.next() >> self.below(64),
        }
    }
}

#[test]
fn odd_inputs_never_panic_and_stay_well_formed() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..400 {
        let recipients: Vec<ReportRecipient> = (0..rng.below(4))
            .map(|_| ReportRecipient {
                path: rng.text(300),
                orcpt: (rng.below(2) == 0).then(|| rng.text(100)),
                action: [Action::Failed, Action::Delayed, Action::Delivered][rng.below(3)],
                status: rng.text(12),
                remote_mta: (rng.below(2) == 0).then(|| rng.text(300)),
                diagnostic: (rng.below(2) == 0).then(|| rng.text(3000)),
                last_attempt: (rng.below(2) == 0).then(|| rng.time()),
                will_retry_until: (rng.below(2) == 0).then(|| rng.time()),
            })
            .collect();
        let original = rng.bytes(if round % 10 == 0 { 200_000 } else { 5000 });
        let host = rng.text(300);
        let queue_id = rng.text(40);
        let envid = rng.text(200);
        let to = rng.text(200);
        let received_from = rng.text(200);
        let report = Report {
            reporting_mta: &host,
            queue_id: &queue_id,
            envid: (round % 3 == 0).then_some(envid.as_str()),
            arrival: rng.time(),
            now: rng.time(),
            to: &to,
            received_from: (round % 2 == 0).then_some(received_from.as_str()),
            recipients: &recipients,
            original: &original,
            return_full: rng.below(2) == 0,
            binary: rng.below(4) == 0,
            max_returned: [0, 10, 1000, usize::MAX][rng.below(4)],
        };
        let bytes = dsn::build(&report);
        assert_lines_ok(&bytes);
        let message = parse(&bytes);
        let parts = parts(&message);
        assert_eq!(parts.len(), 3, "round {round}");
        assert!(delivery_status(&message).is_ascii(), "round {round}");
        let status = delivery_status(&message);
        let utf8 = recipients.iter().filter(|r| !r.path.is_ascii()).count();
        assert_eq!(
            status.matches("\r\nFinal-Recipient: rfc822;").count(),
            recipients.len() - utf8,
            "round {round}: {status}"
        );
        assert_eq!(
            status.matches("\r\nFinal-Recipient: utf-8;").count(),
            utf8,
            "round {round}: {status}"
        );
        let _ = dsn::status_of(&rng.text(20));
        let _ = dsn::header_block(&original);
    }
}

#[test]
fn empty_original_and_no_recipients_still_make_a_report() {
    let mut report = report(&[], b"");
    report.return_full = true;
    let bytes = dsn::build(&report);
    assert_lines_ok(&bytes);
    let message = parse(&bytes);
    assert_eq!(parts(&message).len(), 3);
    assert_eq!(message.subject(), Some("Delivery Status Notification"));
}

#[test]
fn a_next_hop_given_by_address_is_an_address_literal_in_remote_mta() {
    let mut recipients = failures();
    recipients[0].remote_mta = Some("192.0.2.7".into());
    recipients[1].remote_mta = Some("2001:db8::7".into());
    let bytes = dsn::build(&report(&recipients, ORIGINAL));
    let message = parse(&bytes);
    let status = delivery_status(&message);
    let blocks = blocks(&status);
    assert_eq!(value(&blocks[1], "Remote-MTA"), Some("dns; [192.0.2.7]"));
    assert_eq!(
        value(&blocks[2], "Remote-MTA"),
        Some("dns; [IPv6:2001:db8::7]")
    );
}

#[test]
fn a_report_cut_short_before_its_close_delimiter_can_still_be_remade() {
    // A report (another MTA's, say) whose last part, the returned message, lacks its close
    // delimiter: the part runs to the end, and the report can still be remade with the
    // header section for a next hop that cannot take it whole.
    let original = "Subject: cafe\r\nMessage-ID: <m@t>\r\n\r\nGr\u{fc}\u{df}e\r\n";
    let recipients = failures();
    let mut full = report(&recipients, original.as_bytes());
    full.return_full = true;
    let bytes = dsn::build(&full);
    let text = String::from_utf8(bytes).unwrap();
    let close = text.rfind("\r\n--").unwrap();
    let cut = &text[..close + 2];
    assert!(!cut.trim_end().ends_with("--"), "{cut}");
    let remade = dsn::with_headers_only(cut.as_bytes(), dsn::HeadersOnly::EightBit)
        .expect("remade without the close delimiter");
    assert!(!dsn::is_8bit(&remade));
    let remade = String::from_utf8(remade).unwrap();
    assert!(
        remade.contains("Subject: cafe\r\nMessage-ID: <m@t>\r\n"),
        "{remade}"
    );
    assert!(!remade.contains("Gr\u{fc}"), "{remade}");
}

#[test]
fn a_whole_8bit_return_can_be_remade_with_the_header_section_only() {
    // ASCII header fields and an 8-bit body: a message/rfc822, which allows no encoding.
    let original = "Subject: cafe\r\nMessage-ID: <m@t>\r\n\r\nGr\u{fc}\u{df}e\r\n";
    let recipients = failures();
    let mut full = report(&recipients, original.as_bytes());
    full.return_full = true;
    let bytes = dsn::build(&full);
    assert!(dsn::is_8bit(&bytes));
    assert_eq!(mime_type(parts(&parse(&bytes))[2]), "message/rfc822");
    // The whole is labelled with the widest encoding of its parts (RFC 2045 6.4).
    let top = String::from_utf8_lossy(dsn::header_block(&bytes)).into_owned();
    assert!(
        top.contains("\r\nContent-Transfer-Encoding: 8bit\r\n"),
        "{top}"
    );

    let remade = dsn::with_headers_only(&bytes, dsn::HeadersOnly::EightBit).unwrap();
    assert!(!dsn::is_8bit(&remade));
    let top = String::from_utf8_lossy(dsn::header_block(&remade)).into_owned();
    assert!(
        top.contains("\r\nContent-Transfer-Encoding: 7bit\r\n"),
        "{top}"
    );
    assert_lines_ok(&remade);
    let message = parse(&remade);
    let remade_parts = parts(&message);
    assert_eq!(remade_parts.len(), 3);
    // The report itself is unchanged: the same delivery-status part.
    let original_message = parse(&bytes);
    assert_eq!(
        remade_parts[1].contents(),
        parts(&original_message)[1].contents()
    );
    let returned = remade_parts[2];
    assert_eq!(mime_type(returned), "text/rfc822-headers");
    let decoded = String::from_utf8_lossy(returned.contents()).into_owned();
    assert_eq!(decoded, "Subject: cafe\r\nMessage-ID: <m@t>\r\n");
    let text = remade_parts[0].text_contents().unwrap();
    assert!(
        text.contains("the headers of the message are attached"),
        "{text}"
    );
    assert!(text.contains("does not take 8-bit mail"), "{text}");
    // Too large for the next hop: the same report without the body, and its text gives
    // that reason.
    let big = format!(
        "Subject: big\r\nMessage-ID: <b@t>\r\n\r\n{}",
        "0123456789abcdef\r\n".repeat(256)
    );
    let mut full = report(&recipients, big.as_bytes());
    full.return_full = true;
    let bytes = dsn::build(&full);
    let smaller = dsn::with_headers_only(&bytes, dsn::HeadersOnly::TooBig).unwrap();
    assert!(smaller.len() + 4096 < bytes.len(), "{}", smaller.len());
    assert_lines_ok(&smaller);
    let message = parse(&smaller);
    let smaller_parts = parts(&message);
    assert_eq!(mime_type(smaller_parts[2]), "text/rfc822-headers");
    let text = smaller_parts[0].text_contents().unwrap();
    assert!(text.contains("does not take mail this large"), "{text}");

    // Not a report with a whole message: nothing to remake.
    assert!(dsn::with_headers_only(original.as_bytes(), dsn::HeadersOnly::EightBit).is_none());
    let headers_only = dsn::build(&report(&recipients, original.as_bytes()));
    assert!(dsn::with_headers_only(&headers_only, dsn::HeadersOnly::TooBig).is_none());
}

#[test]
fn an_original_recipient_of_any_address_type_but_utf8_is_decoded_from_xtext() {
    // RFC 3461 4.2: the ORCPT value is xtext whatever its address type; the report gives
    // the address itself (RFC 3464 2.3.1). utf-8 (RFC 6533) has its own form, kept.
    let cases = [
        ("rfc822;a+2Bb@example.net", "rfc822;a+b@example.net"),
        // UTF-8 in xtext escapes (Postfix's ORCPT for jörg): the utf-8 type's ASCII form.
        (
            "rfc822;j+C3+B6rg@example.net",
            "utf-8;j\\x{F6}rg@example.net",
        ),
        ("x-foo;bar+20baz", "x-foo;bar baz"),
        ("X.400;c=us+3Ba=b", "X.400;c=us;a=b"),
        (
            "utf-8;j\\x{F6}rg@example.net",
            "utf-8;j\\x{F6}rg@example.net",
        ),
    ];
    for (given, shown) in cases {
        let mut recipients = failures();
        recipients.truncate(1);
        recipients[0].orcpt = Some(given.to_owned());
        let bytes = dsn::build(&report(&recipients, ORIGINAL));
        let status = delivery_status(&parse(&bytes));
        let blocks = blocks(&status);
        assert_eq!(
            value(&blocks[1], "Original-Recipient"),
            Some(shown),
            "{given}"
        );
    }
}

#[test]
fn a_recipient_never_sent_does_not_report_another_sessions_reply_as_its_own() {
    let text = format!(
        "{}mx.example.net: server closed the session: 421 4.3.2 not now",
        dsn::NOT_TRIED
    );
    let mut recipients = vec![recipient(
        "bob@example.net",
        Action::Delayed,
        "4.3.2",
        &text,
    )];
    recipients[0].remote_mta = None;
    let bytes = dsn::build(&report(&recipients, ORIGINAL));
    let status = delivery_status(&parse(&bytes));
    let first = blocks(&status);
    let diagnostic = value(&first[1], "Diagnostic-Code").unwrap();
    assert!(
        diagnostic.starts_with("X-Postern; not tried"),
        "{diagnostic}"
    );
    assert_eq!(value(&first[1], "Remote-MTA"), None);
    // So when it expired that way: the account is behind the expiry's words.
    let expired = format!("delivery time expired; last error: {text}");
    let mut recipients = vec![recipient(
        "bob@example.net",
        Action::Failed,
        "4.3.2",
        &expired,
    )];
    recipients[0].remote_mta = None;
    let bytes = dsn::build(&report(&recipients, ORIGINAL));
    let status = delivery_status(&parse(&bytes));
    let expired_blocks = blocks(&status);
    let diagnostic = value(&expired_blocks[1], "Diagnostic-Code").unwrap();
    assert!(
        diagnostic.starts_with("X-Postern; delivery time expired"),
        "{diagnostic}"
    );
    // A reply of its own is still written as one.
    let recipients = failures();
    let bytes = dsn::build(&report(&recipients, ORIGINAL));
    let status = delivery_status(&parse(&bytes));
    assert!(value(&blocks(&status)[1], "Diagnostic-Code")
        .unwrap()
        .starts_with("smtp; 550 5.1.1"));
}

#[test]
fn ret_full_returns_the_whole_message_only_in_a_report_of_a_failure() {
    // RFC 3461 4.3: a report that tells of no failure SHOULD return the headers only, even
    // when the sender asked for the whole message; one with any failure returns it whole.
    let delayed = vec![recipient(
        "bob@example.net",
        Action::Delayed,
        "4.2.1",
        "451 4.2.1 mailbox busy",
    )];
    let relayed = vec![recipient(
        "bob@example.net",
        Action::Relayed,
        "2.0.0",
        "250 2.0.0 ok",
    )];
    let delivered = vec![recipient(
        "bob@example.net",
        Action::Delivered,
        "2.0.0",
        "250 2.0.0 ok",
    )];
    let mut mixed = failures();
    mixed.insert(0, delayed[0].clone());
    for (recipients, returned) in [
        (&delayed, "text/rfc822-headers"),
        (&relayed, "text/rfc822-headers"),
        (&delivered, "text/rfc822-headers"),
        (&mixed, "message/rfc822"),
    ] {
        let mut report = report(recipients, ORIGINAL);
        report.return_full = true;
        let bytes = dsn::build(&report);
        assert_lines_ok(&bytes);
        let message = parse(&bytes);
        let actions = format!(
            "{:?}",
            recipients.iter().map(|r| r.action).collect::<Vec<_>>()
        );
        assert_eq!(mime_type(parts(&message)[2]), returned, "{actions}");
        let raw = String::from_utf8_lossy(&bytes);
        assert_eq!(
            raw.contains("BODY-MARKER-1234"),
            returned == "message/rfc822",
            "{actions}"
        );
        // Headers asked for by the rules, not for want of room: no reason is given.
        let text = parts(&message)[0].text_contents().unwrap();
        assert!(!text.contains("could not come back"), "{actions}: {text}");
    }
}

#[test]
fn a_returned_message_nested_without_end_is_remade_in_bounded_stack() {
    // 3,000 messages inside each other (within the 128 KiB returned whole), 8-bit so that a
    // next hop without 8BITMIME has the report remade: read on a thread with a small stack.
    // (Not parsed here with a parse tree, which would be as deep.)
    // (A message/rfc822, returned as it is: ASCII header fields, an 8-bit body.)
    let original = format!(
        "Subject: cafe\r\nMIME-Version: 1.0\r\n{}Subject: in\r\n\r\ncaf\u{e9}\r\n",
        "Content-Type: message/rfc822\r\n\r\n".repeat(3000)
    );
    let recipients = failures();
    let mut full = report(&recipients, original.as_bytes());
    full.return_full = true;
    full.max_returned = 128 * 1024;
    let bytes = dsn::build(&full);
    let whole = original.as_bytes();
    assert!(
        bytes.windows(whole.len()).any(|w| w == whole),
        "not returned whole"
    );
    let remade = std::thread::Builder::new()
        .stack_size(128 * 1024)
        .spawn(move || dsn::with_headers_only(&bytes, dsn::HeadersOnly::EightBit))
        .unwrap()
        .join()
        .unwrap()
        .unwrap();
    let top = String::from_utf8_lossy(dsn::header_block(&remade)).into_owned();
    assert!(
        top.contains("\r\nContent-Transfer-Encoding: 7bit\r\n"),
        "{top}"
    );
    assert!(!dsn::is_8bit(&remade));
    assert!(remade.len() < 10_000, "{}", remade.len());
}

#[test]
fn a_text_part_mostly_not_ascii_says_what_comes_back_when_remade() {
    // Recipients and replies in Chinese: the text part goes out base64, where the sentence
    // saying the whole message is attached cannot be seen in the encoded bytes. Remade with
    // the header section only, the text says so all the same.
    let recipients: Vec<ReportRecipient> = ["用户", "客户", "经理", "会计"]
        .iter()
        .map(|who| {
            recipient(
                &format!("{who}@例子.测试"),
                Action::Failed,
                "5.1.1",
                &format!(
                    "550 5.1.1 <{who}@例子.测试>: 收件人不存在，邮件无法投递，请检查地址是否正确"
                ),
            )
        })
        .collect();
    let original = "Subject: cafe\r\nMessage-ID: <m@t>\r\n\r\nGr\u{fc}\u{df}e\r\n";
    let mut full = report(&recipients, original.as_bytes());
    full.return_full = true;
    let bytes = dsn::build(&full);
    let message = parse(&bytes);
    let text = parts(&message)[0];
    assert_eq!(text.content_transfer_encoding(), Some("base64"));
    assert!(
        text.text_contents()
            .unwrap()
            .contains("a copy of the message are attached"),
        "{:?}",
        text.text_contents()
    );
    let remade = dsn::with_headers_only(&bytes, dsn::HeadersOnly::EightBit).unwrap();
    assert_lines_ok(&remade);
    let message = parse(&remade);
    let remade_parts = parts(&message);
    assert_eq!(remade_parts.len(), 3);
    assert_eq!(mime_type(remade_parts[2]), "text/rfc822-headers");
    let said = remade_parts[0].text_contents().unwrap();
    assert!(
        said.contains("the headers of the message are attached"),
        "{said}"
    );
    assert!(!said.contains("a copy of the message"), "{said}");
    // The rest of the text stays.
    assert!(said.contains("收件人不存在"), "{said}");
}
