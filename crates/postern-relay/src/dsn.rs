//! Delivery status notifications (RFC 3464): the bounce and delay reports postern sends back to
//! a message's reverse path.
//!
//! [`build`] turns a [`Report`] into a complete message, header and MIME body with CRLF line
//! ends, ready to be spooled and sent from the null reverse path `<>`. The message is a
//! `multipart/report; report-type=delivery-status` (RFC 6522) with three parts:
//!
//! 1. `text/plain`: a short explanation for people, one paragraph per recipient with the next
//!    hop's reply. mail-builder picks its transfer encoding: 7bit when every line is short ASCII,
//!    quoted-printable otherwise.
//! 2. `message/delivery-status`: the machine-readable fields of RFC 3464 section 2, always
//!    written as 7bit and never encoded. Every value is made safe first: line breaks and other
//!    control characters become spaces, runs of white space shrink to one, non-ASCII characters
//!    are written as RFC 6533 `\x{HEX}` escapes, a value is cut at [`MAX_FIELD_VALUE`] octets,
//!    and long fields are folded at spaces near 78 columns.
//! 3. The returned content. With `RET=FULL` ([`Report::return_full`]) a report of a failure
//!    brings the whole message back as `message/rfc822`; otherwise (and in a report that
//!    tells of no failure: delays, deliveries, relays, RFC 3461 4.3) only its header section
//!    comes back, as `text/rfc822-headers`;
//!    `message/global` and `message/global-headers` where those header fields hold UTF-8
//!    (RFC 6533 6).
//!    The full message is returned only when it is no larger than [`Report::max_returned`],
//!    every line fits in [`MAX_LINE`] octets and it holds no NUL; otherwise the headers come
//!    back instead, and the text part says why. The
//!    header section is cut at the last whole line within `max_returned`, and a header line
//!    longer than [`MAX_LINE`] is broken into continuation lines. Bare CR and bare LF become
//!    CRLF. A whole `message/rfc822` is never re-encoded (that type allows no encoding): its
//!    transfer encoding says `8bit` when it holds a byte over 127 (8BITMIME mail), `7bit`
//!    otherwise, and such a report must be sent with `BODY=8BITMIME`; [`is_8bit`] tells the
//!    caller. A header section, or a whole `message/global`, with 8-bit octets is encoded
//!    (quoted-printable or base64), so that the report is 7-bit.
//!
//! Each recipient's `Status` must agree with its `Action` (RFC 3464 2.3.4): a status that is not
//! an enhanced status code is replaced by `5.0.0`, `4.0.0` or `2.0.0` after the action, and one
//! of the wrong class keeps its subject and detail under the action's class (`delayed` with
//! `5.4.7` becomes `4.4.7`).
//!
//! The Subject says "Undelivered Mail Returned to Sender" when any recipient failed, "Delayed
//! Mail (still being retried)" when all are delayed, "Successful Mail Delivery Report" when all
//! were delivered, and "Delivery Status Notification" for any other mix (or no recipients).
//!
//! No clock is read here: the caller passes the report's time ([`Report::now`]); only
//! mail-builder's MIME boundary is random (it mixes in the time), so two builds of one report
//! differ in the boundary alone. The
//! Message-ID is `<queue-id.now.hash@reporting-mta>`, where hash is an FNV-1a digest of the
//! recipients and their actions, so two reports about one message in the same second differ
//! when they are about different recipients. Nothing here panics, whatever the input.

use mail_builder::headers::address::Address;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::date::Date;
use mail_builder::headers::raw::Raw;
use mail_builder::headers::text::Text;
use mail_builder::mime::{BodyPart, MimePart};
use mail_builder::MessageBuilder;
use std::fmt::Write as _;

/// The longest line a message may carry, without its CRLF (RFC 5322 2.1.1).
pub const MAX_LINE: usize = 998;

/// The longest value of one delivery-status field after it is made safe, in octets. With the
/// longest field name this keeps every unfoldable line well under [`MAX_LINE`].
pub const MAX_FIELD_VALUE: usize = 900;

/// The column delivery-status fields fold at, when a space allows (RFC 5322 2.1.1).
const FOLD_COLUMN: usize = 78;

/// The latest time a date field can show with a four-digit year: 9999-12-31 23:59:59 UTC.
const LATEST_TIME: u64 = 253_402_300_799;

/// The longest host name or queue id put into the From address and the Message-ID, in
/// characters (a domain name has at most 255 octets, RFC 1035 2.3.4).
const MAX_ATOM: usize = 255;

/// The longest address written in the To header, in octets: what fits on one line as
/// `To: <address>`. A real path is far shorter (256 octets, RFC 5321 4.5.3.1.3); a longer one is
/// cut rather than breaking the line limit.
const MAX_TO: usize = MAX_LINE - "To: <>".len();

/// The display name of the report's sender.
const SENDER_NAME: &str = "Mail Delivery System";

/// What happened to a recipient, as the report tells it (RFC 3464 2.3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Delivery failed for good; the message will not be retried.
    Failed,
    /// Delivery has not succeeded yet; the message stays queued and is retried.
    Delayed,
    /// The message was delivered; only reported when the sender asked with `NOTIFY=SUCCESS`.
    Delivered,
    /// The message was passed to a next hop that does not offer DSN, so no success report
    /// will come from further on; only reported when the sender asked with `NOTIFY=SUCCESS`
    /// (RFC 3461 4.1, RFC 3464 2.3.3).
    Relayed,
}

impl Action {
    /// The action as the `Action` field writes it: lower case.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Delivered => "delivered",
            Action::Relayed => "relayed",
        }
    }

    /// The status class (RFC 3463) a status for this action must have.
    fn class(self) -> u8 {
        match self {
            Action::Failed => b'5',
            Action::Delayed => b'4',
            Action::Delivered | Action::Relayed => b'2',
        }
    }
}

/// The host's name in a next hop's account as the relay gives it (`name[address]:port`, the
/// address connected to): what `Remote-MTA` names. An account without an address is the
/// name itself.
pub fn mta_name(remote: &str) -> &str {
    match remote.find('[') {
        Some(at) if at > 0 => &remote[..at],
        _ => remote,
    }
}

/// One recipient of the report: one per-recipient block of the delivery-status part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportRecipient {
    /// The mailbox delivery was attempted to: `Final-Recipient: rfc822; path`.
    pub path: String,
    /// The `ORCPT` parameter as given at `RCPT` time, such as `rfc822;a@b`, passed through as
    /// `Original-Recipient` (decoded from xtext, but for the `utf-8` type). A value without `;`
    /// gets `rfc822;` in front.
    pub orcpt: Option<String>,
    /// What happened to this recipient.
    pub action: Action,
    /// The enhanced status code (RFC 3463), such as `5.1.1` or `4.4.7`; see [`status_of`] to
    /// take it from a reply. Brought into line with `action` when the classes disagree.
    pub status: String,
    /// The next hop's host name: `Remote-MTA: dns; host`.
    pub remote_mta: Option<String>,
    /// The next hop's reply as one line, such as `550 5.1.1 <x@y>: no such user`:
    /// `Diagnostic-Code: smtp; reply`. Text that is not a reply (postern's own reason, such
    /// as a lost connection or a next hop lacking an extension) is written
    /// `Diagnostic-Code: X-Postern; text` instead (RFC 3464 2.3.6).
    pub diagnostic: Option<String>,
    /// The last delivery attempt, in unix seconds: `Last-Attempt-Date`.
    pub last_attempt: Option<u64>,
    /// When retries stop, in unix seconds: `Will-Retry-Until`, written only for
    /// [`Action::Delayed`].
    pub will_retry_until: Option<u64>,
}

/// Everything a report needs. The caller passes all times, in unix seconds.
#[derive(Debug, Clone, Copy)]
pub struct Report<'a> {
    /// Our host name: `Reporting-MTA: dns; host`, and the report comes from
    /// `MAILER-DAEMON@host`.
    pub reporting_mta: &'a str,
    /// The original message's queue id: the `X-Postern-Queue-ID` field.
    pub queue_id: &'a str,
    /// The `ENVID` given at `MAIL` time: `Original-Envelope-Id`.
    pub envid: Option<&'a str>,
    /// When the original message arrived: `Arrival-Date`.
    pub arrival: u64,
    /// When the report is made: its `Date` header and part of its Message-ID.
    pub now: u64,
    /// The original reverse path, which receives the report (`To`). Never build a report for
    /// the null reverse path: reports about reports are not sent (RFC 5321 4.5.5).
    pub to: &'a str,
    /// Who sent us the message (HELO name or address), for the text for people.
    pub received_from: Option<&'a str>,
    /// The recipients the report is about, each with its own block.
    pub recipients: &'a [ReportRecipient],
    /// The original message as spooled: header section, empty line, body, CRLF line ends.
    pub original: &'a [u8],
    /// `RET=FULL`: return the whole message rather than its header section, in a report
    /// that tells of a failure (see [`Report::wants_full`]).
    pub return_full: bool,
    /// The message came as binary MIME (`BODY=BINARYMIME`, RFC 3030): never returned whole,
    /// as a report is 7bit or 8bit MIME (RFC 2045 2.8: no NUL, lines within 998 octets).
    pub binary: bool,
    /// The most octets of original content returned; a larger message returns its headers
    /// only, themselves cut to this size.
    pub max_returned: usize,
}

impl Report<'_> {
    /// Whether the whole message is to come back: asked for with `RET=FULL`, and the report
    /// tells of a failure. A report of delays or successes alone returns the header section
    /// (RFC 3461 4.3: such a report SHOULD return only the headers).
    pub fn wants_full(&self) -> bool {
        self.return_full
            && self
                .recipients
                .iter()
                .any(|recipient| recipient.action == Action::Failed)
    }
}

/// Builds the whole report: header and MIME body with CRLF line ends, ready to be spooled and
/// sent from the null reverse path `<>` to [`Report::to`].
pub fn build(report: &Report<'_>) -> Vec<u8> {
    let host = reporting_host(report.reporting_mta);
    let queue_id = dot_atom(report.queue_id, "dsn");
    let returned = Returned::from_original(report);

    let text = text_part_of(human_text(report, &host, &returned));
    let status = MimePart::new(
        "message/delivery-status",
        BodyPart::Binary(delivery_status(report, &host).into()),
    )
    .header("Content-Description", Text::new("Delivery report"))
    .transfer_encoding("7bit");
    // A part that is 8bit makes the whole 8bit: a multipart is labelled with the widest
    // encoding of its parts (RFC 2045 6.4), and without a label it is taken as 7bit.
    let eight_bit = returned.stays_8bit();
    let mut body = MimePart::new(
        ContentType::new("multipart/report").attribute("report-type", "delivery-status"),
        vec![text, status, returned.into_part()],
    );
    if eight_bit {
        body = body.transfer_encoding("8bit");
    }

    let message_id = format!(
        "{queue_id}.{}.{:016x}@{host}",
        report.now,
        recipients_digest(report.recipients)
    );
    let mut output = Vec::with_capacity(report.original.len().min(report.max_returned) + 4096);
    MessageBuilder::new()
        .date(Date::new(timestamp(report.now)))
        .from(Address::new_address(
            Some(SENDER_NAME),
            format!("MAILER-DAEMON@{host}"),
        ))
        .to(Address::new_address(None::<&str>, cut(report.to, MAX_TO)))
        .subject(subject(report.recipients))
        .message_id(message_id)
        .header("Auto-Submitted", Raw::new("auto-replied"))
        .header("MIME-Version", Raw::new("1.0"))
        .body(body)
        .serialize(&mut output);
    output
}

/// A report's text part, saying `text`.
fn text_part_of<'x>(text: String) -> MimePart<'x> {
    MimePart::new("text/plain", text).header("Content-Description", Text::new("Notification"))
}

/// A text part's body, decoded by its `Content-Transfer-Encoding`, when it is UTF-8.
fn decoded_text(body: &[u8], encoding: Option<&str>) -> Option<String> {
    let decoded = match encoding {
        Some("base64") => mail_parser::decoders::base64::base64_decode(body)?,
        Some("quoted-printable") => {
            mail_parser::decoders::quoted_printable::quoted_printable_decode(body)?
        }
        _ => body.to_vec(),
    };
    String::from_utf8(decoded).ok()
}

/// What the text part of a report says when the whole message is attached.
const COPY_ATTACHED: &str = "A delivery report and a copy of the message are attached.\r\n";

/// Why a report's returned message gives way to its header section on the way to its sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadersOnly {
    /// The message has 8-bit content and the next hop has no 8BITMIME.
    EightBit,
    /// The report is larger than the next hop's SIZE.
    TooBig,
}

/// A report (`multipart/report`) whose returned part is a whole message (`message/rfc822` or
/// `message/global`), remade for a next hop that cannot take it (`why`): the returned
/// message gives way to its header section, encoded as in a headers-only report. A message/*
/// part allows no encoding (RFC 2046 5.2.1), and `RET=FULL` asks for the whole message
/// without requiring it (RFC 3461 4.3), so this is the report that can still reach its
/// sender; from `<>`, the alternative is a report nobody gets. None when `report` is not such
/// a report.
pub fn with_headers_only(report: &[u8], why: HeadersOnly) -> Option<Vec<u8>> {
    // Read without a parse tree (crate::mime): the returned message is the sender's, and may
    // nest messages without end.
    let top_block = header_block(report);
    let top = crate::mime::PartHeader::read(top_block);
    let is_report = top
        .media
        .as_ref()
        .is_some_and(|(kind, sub)| kind == "multipart" && sub == "report");
    // Delivery status reports only (RFC 3464, and RFC 6533's internationalized ones, which
    // return a message/global), not other reports such as MDNs.
    let delivery_status = top.report_type.as_deref().is_some_and(|t| {
        t.eq_ignore_ascii_case("delivery-status")
            || t.eq_ignore_ascii_case("global-delivery-status")
    });
    if !is_report || !delivery_status {
        return None;
    }
    let boundary = top.boundary.as_deref()?;
    let offset = top_block.len();
    let (start, body, end) =
        crate::mime::first_part(report.get(offset..)?, boundary, |(start, body, _)| {
            report
                .get(offset + start..offset + body)
                .is_some_and(|h| crate::mime::PartHeader::read(h).is_message())
        })
        .map(|(start, body, end)| (offset + start, offset + body, offset + end))?;
    // A message/global may come encoded (RFC 6532 3.7; postern's own reports encode one
    // with 8-bit octets): its header section is that of the decoded message.
    let part = report.get(body..end)?;
    let label = crate::mime::PartHeader::read(report.get(start..body)?);
    let decoded = match label.encoding.as_deref() {
        Some("base64") => Some(mail_parser::decoders::base64::base64_decode(part)?),
        Some("quoted-printable") => {
            Some(mail_parser::decoders::quoted_printable::quoted_printable_decode(part)?)
        }
        _ => None,
    };
    let fields = without_empty_line(header_block(decoded.as_deref().unwrap_or(part)));
    let mut returned = Vec::new();
    Returned::Headers(normalize(fields, true)?)
        .into_part()
        .write_part(&mut returned);
    let before = report.get(..start)?;
    let after = report.get(end..)?;
    let mut out = Vec::with_capacity(before.len() + returned.len() + after.len() + 128);
    // A report of ours says in its text that the whole message is attached: it says now
    // what is. The text is read decoded (it comes base64 when mostly not ASCII, where the
    // sentence cannot be seen) and written anew.
    let text_part = crate::mime::first_part(report.get(offset..start)?, boundary, |(s, b, _)| {
        report.get(offset + s..offset + b).is_some_and(|h| {
            let label = crate::mime::PartHeader::read(h);
            label
                .media
                .as_ref()
                .is_none_or(|(kind, sub)| kind == "text" && sub == "plain")
        })
    });
    let own = text_part.and_then(|(s, b, e)| {
        let label = crate::mime::PartHeader::read(report.get(offset + s..offset + b)?);
        let text = decoded_text(
            report.get(offset + b..offset + e)?,
            label.encoding.as_deref(),
        )?;
        text.contains(COPY_ATTACHED)
            .then_some((offset + s, offset + e, text))
    });
    match own {
        Some((part_start, part_end, text)) => {
            out.extend_from_slice(&report[..part_start]);
            let now = match why {
                HeadersOnly::EightBit => {
                    "A delivery report and the headers of the message are attached (the next\r\n\
                     hop toward you does not take 8-bit mail, so the whole message could not\r\n\
                     come back).\r\n"
                }
                HeadersOnly::TooBig => {
                    "A delivery report and the headers of the message are attached (the next\r\n\
                     hop toward you does not take mail this large, so the whole message could\r\n\
                     not come back).\r\n"
                }
            };
            let mut part = Vec::new();
            text_part_of(text.replacen(COPY_ATTACHED, now, 1)).write_part(&mut part);
            out.extend_from_slice(&part);
            let rest = &report[part_end..start];
            if !part.ends_with(b"\r\n") && !rest.starts_with(b"\r\n") {
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(rest);
        }
        None => out.extend_from_slice(before),
    }
    out.extend_from_slice(&returned);
    if !returned.ends_with(b"\r\n") && !after.starts_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(after);
    if !is_8bit(&out) {
        // The whole is 7bit again: so says its label (RFC 2045 6.4).
        let head = header_block(&out).len();
        let label = b"\r\nContent-Transfer-Encoding: 8bit\r\n";
        if let Some(at) = out[..head].windows(label.len()).position(|w| w == label) {
            out[at + label.len() - 6..at + label.len() - 2].copy_from_slice(b"7bit");
        }
    }
    Some(out)
}

/// Splits the header section off a message: the bytes up to and including the first empty
/// line, or the whole message when it has none. An empty line is `CRLF` or a bare `LF`.
pub fn header_block(message: &[u8]) -> &[u8] {
    let mut start = 0;
    while let Some(rest) = message.get(start..) {
        let Some(newline) = rest.iter().position(|&byte| byte == b'\n') else {
            break;
        };
        let end = start + newline + 1;
        if matches!(rest.get(..=newline), Some(b"\n" | b"\r\n")) {
            return message.get(..end).unwrap_or(message);
        }
        start = end;
    }
    message
}

/// The status of a deferral whose last answer was `reply`: the status of the next hop's reply
/// when `reply` is one (or postern's account of a session that ends with one, see
/// [`smtp_reply_in`]), else `fallback`, postern's status for what happened without a reply
/// (4.4.1 no answer, 4.4.2 a connection broken off, RFC 3463 3.5).
pub fn deferral_status(reply: &str, fallback: &str) -> String {
    let inner = smtp_reply_in(reply.trim_start());
    if inner.is_some_and(|r| matches!(r.as_bytes()[0], b'2' | b'4' | b'5')) {
        status_of(reply)
    } else {
        fallback.to_owned()
    }
}

/// `status` (`X.Y.Z`) with the persistent transient class, 4: a deferral's, whatever the
/// class of the reply it came from (a `552 5.2.2` to RCPT is taken for a deferral, RFC 5321
/// 4.5.3.1.10). Anything else comes back unchanged.
pub fn transient(status: &str) -> String {
    match status.as_bytes() {
        [b'2' | b'5', b'.', ..] => format!("4{}", &status[1..]),
        _ => status.to_owned(),
    }
}

/// The status of a connection that failed for now after the next hop answered: the enhanced
/// code of the reply that ended it where postern's account quotes one that gives it (a `421
/// 4.3.2` greeting, a `454 4.7.0` to STARTTLS), otherwise `fallback` (4.4.2, the connection
/// broke), which says more than a bare class (`4.0.0`).
pub fn connection_status(text: &str, fallback: &str) -> String {
    match deferral_status(text, fallback) {
        status if status.ends_with(".0.0") => fallback.to_owned(),
        status => status,
    }
}

/// The enhanced status code (RFC 3463) for a report about an SMTP reply (or about postern's
/// account of a session that ends with one, see [`smtp_reply_in`]): the reply's own when
/// it starts `NNN X.Y.Z` (or `NNN-X.Y.Z`), its class X made the reply code's first digit,
/// otherwise `5.0.0` for a 5xx reply, `4.0.0` for 4xx, `2.0.0` for 2xx, and `5.5.0` (protocol
/// error) for a reply without a valid code.
pub fn status_of(reply: &str) -> String {
    let reply = reply.trim_start();
    // A next hop's reply inside postern's account of the session ("...: server refused
    // STARTTLS: 454 4.7.0 ...") keeps its own status.
    let reply = smtp_reply_in(reply).unwrap_or(reply);
    let class = match reply.as_bytes() {
        [class @ (b'2' | b'4' | b'5'), b'0'..=b'9', b'0'..=b'9', rest @ ..]
            if matches!(rest.first(), None | Some(b' ' | b'-' | b'\r' | b'\n')) =>
        {
            *class
        }
        _ => return "5.5.0".to_string(),
    };
    // The first four bytes are ASCII, so 4 is a character boundary.
    let code = reply
        .get(4..)
        .and_then(|rest| rest.split_ascii_whitespace().next());
    match code.and_then(enhanced_code) {
        // A code whose class disagrees with the reply's keeps its subject and detail under the
        // reply's class, which is what the next hop's software acted on (`550 4.1.1` is
        // `5.1.1`): RFC 3463 2 has the class agree with the reply, and the subject is still
        // the best account of the problem.
        Some((_, rest)) => format!("{}.{rest}", char::from(class)),
        None => format!("{}.0.0", char::from(class)),
    }
}

/// Whether a message holds any byte over 127. A report that does must go out with
/// `BODY=8BITMIME`, and to a next hop that does not offer 8BITMIME it cannot go as it is.
pub fn is_8bit(message: &[u8]) -> bool {
    !message.is_ascii()
}

/// Parses `X.Y.Z` with X one of 2, 4, 5 and Y, Z one to three digits each (RFC 3463 2).
/// Returns the class digit and the `Y.Z` rest.
fn enhanced_code(code: &str) -> Option<(u8, &str)> {
    let mut fields = code.split('.');
    let class = match fields.next()?.as_bytes() {
        [class @ (b'2' | b'4' | b'5')] => *class,
        _ => return None,
    };
    let subject = fields.next()?;
    let detail = fields.next()?;
    let digits = |field: &str| {
        (1..=3).contains(&field.len()) && field.bytes().all(|byte| byte.is_ascii_digit())
    };
    if fields.next().is_some() || !digits(subject) || !digits(detail) {
        return None;
    }
    Some((class, code.get(2..)?))
}

/// The recipient's status, brought into line with its action (RFC 3464 2.3.4).
///
/// A failure keeps a persistent transient code (4.x.x): a message returned when its queue
/// lifetime ran out says its last attempt's status, or `4.4.7` (RFC 3463 3.5).
fn recipient_status(recipient: &ReportRecipient) -> String {
    let class = char::from(recipient.action.class());
    match enhanced_code(recipient.status.trim()) {
        Some((b'4', rest)) if recipient.action == Action::Failed => {
            format!("4.{rest}")
        }
        Some((_, rest)) => format!("{class}.{rest}"),
        None => format!("{class}.0.0"),
    }
}

/// The returned content: the third part of the report.
enum Returned {
    /// The whole message, for `message/rfc822`.
    Full(Vec<u8>),
    /// The header section only, for `text/rfc822-headers`.
    Headers(Vec<u8>),
}

/// Why the whole message, asked for with `RET=FULL`, did not come back: words for the
/// report's text, after "could not come back".
fn not_whole(report: &Report<'_>) -> Option<String> {
    let original = report.original;
    if !report.wants_full() || original.is_empty() {
        return None;
    }
    if report.binary {
        return Some("it came as binary MIME (BINARYMIME), which a report cannot carry".into());
    }
    let too_large = || format!("it is larger than {} KiB", report.max_returned / 1024);
    if original.len() > report.max_returned {
        return Some(too_large());
    }
    match normalize(original, false) {
        None => Some(
            "it has a line longer than 998 octets or a NUL octet, which a report cannot carry"
                .into(),
        ),
        Some(full) if full.len() > report.max_returned => Some(too_large()),
        Some(_) => None,
    }
}

impl Returned {
    fn from_original(report: &Report<'_>) -> Self {
        let original = report.original;
        if report.wants_full()
            && !report.binary
            && !original.is_empty()
            && original.len() <= report.max_returned
        {
            if let Some(full) = normalize(original, false) {
                if full.len() <= report.max_returned {
                    return Returned::Full(full);
                }
            }
        }
        let fields = without_empty_line(header_block(original));
        let mut headers = normalize(fields, true).unwrap_or_default();
        if headers.len() > report.max_returned {
            let cut = headers
                .get(..report.max_returned)
                .and_then(|head| head.windows(2).rposition(|pair| pair == b"\r\n"))
                .map_or(0, |at| at + 2);
            headers.truncate(cut);
        }
        Returned::Headers(headers)
    }

    fn is_full(&self) -> bool {
        matches!(self, Returned::Full(_))
    }

    /// Whether the part goes out with 8-bit octets, as a whole `message/rfc822` with them
    /// (which allows no encoding); every other part with them is encoded.
    fn stays_8bit(&self) -> bool {
        matches!(self, Returned::Full(content) if is_8bit(content) && !is_global(content))
    }

    fn into_part(self) -> MimePart<'static> {
        let header_only = matches!(self, Returned::Headers(_));
        // UTF-8 in the returned header fields makes them internationalized: the RFC 6532
        // types then (RFC 6533 6.3, 6.4).
        let (content_type, description, content) = match self {
            Returned::Full(content) => {
                let kind = if is_global(&content) {
                    "message/global"
                } else {
                    "message/rfc822"
                };
                (kind, "Original message", content)
            }
            Returned::Headers(content) => {
                // Internationalized header fields are UTF-8 (RFC 6532 3.2); 8-bit octets
                // that are not are of some unknown charset, and plain headers to the report.
                let kind = if content.is_ascii() || std::str::from_utf8(&content).is_err() {
                    "text/rfc822-headers"
                } else {
                    "message/global-headers"
                };
                (kind, "Original message headers", content)
            }
        };
        if (header_only || content_type == "message/global") && is_8bit(&content) {
            // Header fields with 8-bit octets are encoded (quoted-printable, which RFC 6533
            // 6.3 allows for message/global-headers too; base64 where they are not UTF-8, or
            // mostly 8-bit, as mail-builder picks), so that the report is 7-bit and
            // reaches a sender whose next hop lacks 8BITMIME: a report from `<>` that fails
            // is never reported again. A whole message/global is encoded the same way: that
            // type takes any encoding (RFC 6532 3.7, unlike message/rfc822), and one with
            // 8-bit octets must go 7-bit to a return path without SMTPUTF8 (RFC 6533 6),
            // which is not known here. The part is made as binary so that it gets no charset
            // parameter, which none of these types defines, and then given its text.
            let mut part = MimePart::new(content_type, BodyPart::Binary(Vec::new().into()));
            part.contents = match String::from_utf8(content) {
                Ok(text) => BodyPart::Text(text.into()),
                Err(e) => BodyPart::Binary(e.into_bytes().into()),
            };
            return part.header("Content-Description", Text::new(description));
        }
        let encoding = if is_8bit(&content) { "8bit" } else { "7bit" };
        MimePart::new(content_type, BodyPart::Binary(content.into()))
            .header("Content-Description", Text::new(description))
            .transfer_encoding(encoding)
    }
}

/// Whether a whole message returned is a `message/global`: its header section holds UTF-8.
/// As for a header section returned alone, 8-bit octets that are not UTF-8 are of some
/// unknown charset, not internationalized header fields.
fn is_global(message: &[u8]) -> bool {
    let header = header_block(message);
    !header.is_ascii() && std::str::from_utf8(header).is_ok()
}

/// The header fields of a block found by [`header_block`]: without its empty line when it has
/// one, the whole block when the message had no empty line.
fn without_empty_line(block: &[u8]) -> &[u8] {
    if block == b"\r\n" || block == b"\n" {
        return b"";
    }
    [&b"\r\n"[..], b"\n"]
        .into_iter()
        .filter_map(|end| block.strip_suffix(end))
        .find(|fields| fields.ends_with(b"\n"))
        .unwrap_or(block)
}

/// Copies `input` with every line ending made CRLF and a CRLF after the last line. A line
/// over [`MAX_LINE`] octets or a NUL makes the copy fail, or with `break_long` (a header
/// section) the line is folded (RFC 5322 2.2.3): a CRLF goes in before its last space or tab,
/// so the field's content stays the same; a line without one is broken with `CRLF SP` where
/// it reaches the limit; a NUL becomes a space.
fn normalize(input: &[u8], break_long: bool) -> Option<Vec<u8>> {
    let mut output = Vec::with_capacity(input.len() + input.len() / 32 + 2);
    // Where the current line starts in `output`, and its last space or tab after something
    // else on it (a fold there leaves a line with content before it: a line of blanks alone
    // would be obsolete syntax, and to some readers the header section's end).
    let mut start = 0;
    let mut blank = None;
    let mut content = false;
    // The current line was begun by a fold of ours: blanks after the one it starts with are
    // let go until something else comes (a run of blanks is folding white space, the same
    // as one), and if nothing does, the fold is undone (a line of blanks alone would be
    // obsolete syntax, and to some readers the header section's end).
    let mut folded = false;
    let mut bytes = input.iter().copied().peekable();
    while let Some(byte) = bytes.next() {
        match byte {
            b'\r' | b'\n' => {
                if byte == b'\r' && bytes.peek() == Some(&b'\n') {
                    bytes.next();
                }
                if folded && !content {
                    output.truncate(start - 2);
                }
                output.extend_from_slice(b"\r\n");
                start = output.len();
                blank = None;
                content = false;
                folded = false;
            }
            // Neither 7bit nor 8bit content may hold a NUL (RFC 2045 2.7, 2.8): a whole
            // message with one cannot come back as it is.
            0 if !break_long => return None,
            _ => {
                // In a header section, returned for its sender to read, a NUL is a space.
                let byte = if byte == 0 { b' ' } else { byte };
                if output.len() - start == MAX_LINE {
                    if !break_long {
                        return None;
                    }
                    match blank.take() {
                        Some(at) => {
                            output.splice(at..at, *b"\r\n");
                            start = at + 2;
                            // After the blank folded at, nothing but other octets.
                            content = output.len() > start + 1;
                        }
                        None => {
                            output.extend_from_slice(b"\r\n ");
                            start = output.len() - 1;
                            content = false;
                        }
                    }
                    folded = true;
                }
                if matches!(byte, b' ' | b'\t') {
                    if content {
                        blank = Some(output.len());
                    } else if folded {
                        continue;
                    }
                } else {
                    content = true;
                }
                output.push(byte);
            }
        }
    }
    if folded && !content {
        output.truncate(start - 2);
        output.extend_from_slice(b"\r\n");
    } else if output.len() > start {
        output.extend_from_slice(b"\r\n");
    }
    Some(output)
}

/// The `message/delivery-status` body (RFC 3464 2.1): the per-message fields, then one block
/// per recipient, each block after an empty line.
fn delivery_status(report: &Report<'_>, host: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + report.recipients.len() * 320);
    if let Some(envid) = report.envid {
        // RFC 3461 4.4: the ENVID came as xtext; the report carries its value, spelled as
        // it came (RFC 3464 2.2.1): printable ASCII and spaces, at most 100 octets as taken,
        // so written whole, spaces kept, on one line. Anything else is made safe.
        let value = xtext_decode(envid);
        let verbatim = value.len() <= 100 && value.bytes().all(|b| (0x20..0x7f).contains(&b));
        if verbatim && !value.trim().is_empty() {
            out.extend_from_slice(b"Original-Envelope-Id: ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        } else {
            field(&mut out, "Original-Envelope-Id", &safe(&value));
        }
    }
    field(&mut out, "Reporting-MTA", &format!("dns; {host}"));
    field(&mut out, "Arrival-Date", &date(report.arrival));
    // Extension fields come after the standard ones (RFC 3464 2.2).
    field(&mut out, "X-Postern-Queue-ID", &safe(report.queue_id));

    for recipient in report.recipients {
        out.extend_from_slice(b"\r\n");
        if let Some(orcpt) = &recipient.orcpt {
            // RFC 3461 4.2: an ORCPT is xtext whatever its address type, decoded for the
            // report (RFC 3464 2.3.1 wants the address); utf-8 (RFC 6533) has a form of its
            // own, written as it came.
            let value = match orcpt.split_once(';') {
                Some((kind, _)) if kind.trim().eq_ignore_ascii_case("utf-8") => safe(orcpt),
                Some((kind, addr)) if kind.trim().eq_ignore_ascii_case("rfc822") => {
                    // An address beyond ASCII in escapes (`j+C3+B6rg`, as Postfix writes
                    // one) is of the utf-8 type, in its ASCII form (RFC 6533 3).
                    let address = xtext_decode(addr);
                    if address.is_ascii() {
                        format!("rfc822;{}", safe_address(&address))
                    } else {
                        format!("utf-8;{}", safe(&utf8_addr_xtext(&address)))
                    }
                }
                // Made safe as a whole, so that it is cut as one value: the two halves
                // each at the cap would make a line no mail may have.
                Some((kind, addr)) => safe(&format!("{};{}", kind.trim(), xtext_decode(addr))),
                None => format!("rfc822; {}", safe(&xtext_decode(orcpt))),
            };
            field(&mut out, "Original-Recipient", &value);
        }
        // A UTF-8 mailbox is of the utf-8 address type, written utf-8-addr-xtext (RFC 6533
        // 3).
        let final_recipient = if recipient.path.is_ascii() {
            format!("rfc822; {}", safe_address(&recipient.path))
        } else {
            format!("utf-8; {}", safe(&utf8_addr_xtext(&recipient.path)))
        };
        field(&mut out, "Final-Recipient", &final_recipient);
        field(&mut out, "Action", recipient.action.as_str());
        field(&mut out, "Status", &recipient_status(recipient));
        if let Some(remote) = &recipient.remote_mta {
            // A next hop given by address is written as an address literal: the `dns` type
            // names hosts, and `[192.0.2.1]` is how SMTP writes an address in their place.
            let remote = mta_name(remote);
            let name = match remote.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(ip)) => format!("[{ip}]"),
                Ok(std::net::IpAddr::V6(ip)) => format!("[IPv6:{ip}]"),
                Err(_) => safe(remote),
            };
            field(&mut out, "Remote-MTA", &format!("dns; {name}"));
        }
        if let Some(diagnostic) = &recipient.diagnostic {
            // The next hop's reply where there is one, even inside postern's account of a
            // session it ended ("...: server closed the session: 421 ..."), RFC 3464 2.3.6.
            let value = match smtp_reply_in(diagnostic) {
                Some(reply) => format!("smtp; {}", safe(reply)),
                None => format!("X-Postern; {}", safe(diagnostic)),
            };
            field(&mut out, "Diagnostic-Code", &value);
        }
        if let Some(at) = recipient.last_attempt {
            field(&mut out, "Last-Attempt-Date", &date(at));
        }
        if let (Action::Delayed, Some(until)) = (recipient.action, recipient.will_retry_until) {
            field(&mut out, "Will-Retry-Until", &date(until));
        }
    }
    out
}

/// Writes `name: value` CRLF, folding at spaces before [`FOLD_COLUMN`] when it can. `value`
/// is already safe: ASCII, no control characters, single spaces.
/// How the account of a recipient whose message was never sent begins: its next hop was
/// paused after another session broke off or connections to it could not be made. The reply
/// it quotes was not given to this message, so a report writes it as postern's words
/// (`X-Postern`), not as this recipient's reply.
pub const NOT_TRIED: &str = "not tried, delivery to the next hop suspended after: ";

/// The SMTP reply that `text` is, or that it ends with after a `": "`.
fn smtp_reply_in(text: &str) -> Option<&str> {
    // Also behind other words (an expiry's "last error: ").
    if text.contains(NOT_TRIED) {
        return None;
    }
    if is_smtp_reply(text) {
        return Some(text);
    }
    text.match_indices(": ")
        .map(|(at, sep)| &text[at + sep.len()..])
        .find(|rest| is_smtp_reply(rest))
}

/// Whether `text` is an SMTP reply line rather than postern's own words: a reply code (2 to
/// 5, then two digits; RFC 5321 4.2 has 0 to 5 second, but next hops do send `571`), then a
/// space, a dash or nothing. postern's words begin with a host or domain name, which may
/// begin like a reply (`123-reg.example: ...`, `421-mx.example [192.0.2.1] said: ...`,
/// `250-mx.example does not support ...`): a first word ending in a colon, or one followed by
/// an address in brackets, or a dotted name followed by the words postern puts after a host
/// name (`said: `, `does not support `, `does not offer `), is such a name.
fn is_smtp_reply(text: &str) -> bool {
    let b = text.as_bytes();
    let coded = matches!(b, [b'2'..=b'5', b'0'..=b'9', b'0'..=b'9', ..])
        && matches!(b.get(3), None | Some(b' ' | b'-' | b'\r' | b'\n'));
    if !coded {
        return false;
    }
    if b.get(3) != Some(&b'-') {
        return true;
    }
    let mut words = text.split(' ');
    let first = words.next().unwrap_or_default();
    // A name has a dot inside and is no enhanced status code (`5.1.1`).
    let after_code = first.get(4..).unwrap_or_default();
    let dotted_name = after_code.contains('.')
        && !after_code
            .split('.')
            .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    let after_first = text.get(first.len() + 1..).unwrap_or_default();
    let our_words = ["said: ", "does not support ", "does not offer "]
        .iter()
        .any(|w| after_first.starts_with(w));
    let bracketed = words.next().is_some_and(|w| w.starts_with('['));
    !(first.ends_with(':') || bracketed || (dotted_name && our_words))
}

/// Undoes xtext (RFC 3461 4): `+` and two upper-case hex digits stand for that octet. A `+`
/// not followed by two hex digits is kept as it is.
fn xtext_decode(value: &str) -> String {
    let b = value.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'+' {
            if let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|&c| hex(c)),
                b.get(i + 2).and_then(|&c| hex(c)),
            ) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn field(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.push(b':');
    let mut column = name.len() + 1;
    let mut first = true;
    // Spaces in a row are kept (an address's quoted local part may hold them): an empty
    // word between two is written as one more space, and never folded before, so that no
    // line is only white space.
    for word in value.split(' ') {
        if first && word.is_empty() {
            continue;
        }
        if !first && !word.is_empty() && column + 1 + word.len() > FOLD_COLUMN {
            out.extend_from_slice(b"\r\n");
            column = 0;
        }
        out.push(b' ');
        out.extend_from_slice(word.as_bytes());
        column += 1 + word.len();
        first = false;
    }
    out.extend_from_slice(b"\r\n");
}

/// RFC 6533 3 `utf-8-addr-xtext`: printable ASCII but `+`, `=` and `\` as itself, every
/// other character as `\x{HEX}`.
pub fn utf8_addr_xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_ascii_graphic() && !matches!(c, '+' | '=' | '\\') {
            out.push(c);
        } else {
            let _ = write!(out, "\\x{{{:X}}}", u32::from(c));
        }
    }
    out
}

/// Makes a value safe for a delivery-status field: control characters become spaces, white
/// space runs shrink to one space, non-ASCII characters become RFC 6533 `\x{HEX}`, and the
/// result is trimmed and cut at [`MAX_FIELD_VALUE`] octets.
fn safe(value: &str) -> String {
    clean(value, true)
}

/// [`safe`] for an address: its spaces are kept as they are, since a quoted local part may
/// hold several in a row (`"a  b"@example.com`) and the report gives the address as it was
/// (RFC 3464 2.3.1, 2.3.2); folding at a space loses none of them.
fn safe_address(value: &str) -> String {
    clean(value, false)
}

fn clean(value: &str, squeeze: bool) -> String {
    let mut out = String::with_capacity(value.len().min(MAX_FIELD_VALUE));
    for ch in value.chars() {
        if out.len() >= MAX_FIELD_VALUE {
            // A value that came already escaped (an address in utf-8-addr-xtext) is not
            // cut inside an escape: a reader would take `\x{F` for text.
            if let Some(open) = out.rfind('\\') {
                if is_escape_start(&out[open + 1..]) {
                    out.truncate(open);
                }
            }
            break;
        }
        if ch.is_ascii_graphic() || (ch == ' ' && !squeeze && !out.is_empty()) {
            out.push(ch);
        } else if ch.is_ascii() {
            if !out.is_empty() && !out.ends_with(' ') {
                out.push(' ');
            }
        } else {
            let escape = format!("\\x{{{:X}}}", u32::from(ch));
            if out.len() + escape.len() > MAX_FIELD_VALUE {
                break;
            }
            out.push_str(&escape);
        }
    }
    out.truncate(out.trim_end().len());
    out
}

/// Whether `tail` (what follows a `\`) is the start of a `\x{HEX}` escape left unclosed.
fn is_escape_start(tail: &str) -> bool {
    let Some(rest) = tail.strip_prefix('x') else {
        return tail.is_empty();
    };
    let Some(hex) = rest.strip_prefix('{') else {
        return rest.is_empty();
    };
    hex.len() <= 6 && hex.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Makes a value safe for the text for people: control characters and the characters that
/// reorder or break a line (a next hop's U+202E would turn the rest of the reason around in
/// the sender's mail reader) become spaces, white space runs shrink to one space, and the
/// result is trimmed.
fn readable(value: &str) -> String {
    value
        .split(|ch: char| ch.is_whitespace() || postern_proto::text::unfit_for_display(ch))
        .filter(|word| !word.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The server's name as the From address, the Message-ID and `Reporting-MTA` give it: an
/// address literal (a `--hostname` of `[192.0.2.1]`, for a server with no name) as it is,
/// a domain literal being good on the right of both (RFC 5322 3.4.1, 3.6.4); a name as a
/// dot-atom ([`dot_atom`]).
fn reporting_host(value: &str) -> String {
    let value = value.trim();
    match postern_proto::address::parse_host(value) {
        Ok(postern_proto::address::Host::Ipv4(_) | postern_proto::address::Host::Ipv6(_)) => {
            value.to_owned()
        }
        _ => dot_atom(value, "localhost"),
    }
}

/// Keeps the characters of a dot-atom (RFC 5322 3.2.3) for the From address and the
/// Message-ID; every other character becomes `_`, and an empty result becomes `fallback`.
fn dot_atom(value: &str, fallback: &str) -> String {
    let atom: String = value
        .trim()
        .chars()
        .map(|ch| {
            if ch.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~.".contains(ch) {
                ch
            } else {
                '_'
            }
        })
        .collect();
    let atom = atom.trim_matches('.');
    let atom = cut(atom, MAX_ATOM);
    if atom.is_empty() {
        fallback.to_string()
    } else {
        atom.to_string()
    }
}

/// The longest prefix of `value` of at most `max` octets that ends on a character boundary.
fn cut(value: &str, max: usize) -> &str {
    let mut end = value.len().min(max);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    value.get(..end).unwrap_or_default()
}

/// Unix seconds for a date field, held to four-digit years.
fn timestamp(unix: u64) -> i64 {
    i64::try_from(unix.min(LATEST_TIME)).unwrap_or(0)
}

/// An RFC 5322 date in UTC for unix seconds, held to four-digit years.
pub(crate) fn date(unix: u64) -> String {
    Date::new(timestamp(unix)).to_rfc822()
}

/// The Subject: a failure report when any recipient failed, a delay report when all are
/// delayed, a success report when all were delivered.
fn subject(recipients: &[ReportRecipient]) -> &'static str {
    let all = |action| {
        !recipients.is_empty()
            && recipients
                .iter()
                .all(|recipient| recipient.action == action)
    };
    if recipients
        .iter()
        .any(|recipient| recipient.action == Action::Failed)
    {
        "Undelivered Mail Returned to Sender"
    } else if all(Action::Delayed) {
        "Delayed Mail (still being retried)"
    } else if all(Action::Delivered) {
        "Successful Mail Delivery Report"
    } else if recipients
        .iter()
        .all(|r| matches!(r.action, Action::Delivered | Action::Relayed))
        && !recipients.is_empty()
    {
        "Mail Relayed Report"
    } else {
        "Delivery Status Notification"
    }
}

/// FNV-1a over the recipients' paths and actions: tells apart reports about the same message.
fn recipients_digest(recipients: &[ReportRecipient]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for recipient in recipients {
        let action = recipient.action.as_str().as_bytes();
        for &byte in recipient.path.as_bytes().iter().chain(b"\0").chain(action) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(PRIME);
        }
    }
    hash
}

/// The `text/plain` part: what happened, in words, one paragraph per recipient.
fn human_text(report: &Report<'_>, host: &str, returned: &Returned) -> String {
    let has = |action| {
        report
            .recipients
            .iter()
            .any(|recipient| recipient.action == action)
    };
    let mut text = format!("This is the mail system at host {host}.\r\n\r\n");
    if has(Action::Failed) {
        // A failure keeps a 4.x.x status when the message's time in the queue ran out while
        // its delivery kept failing for a time (the last attempt's status): not a permanent
        // error, and the text must not call it one.
        let failed = report
            .recipients
            .iter()
            .filter(|recipient| recipient.action == Action::Failed);
        let (mut refused, mut expired) = (false, false);
        for recipient in failed {
            if recipient_status(recipient).starts_with('4') {
                expired = true;
            } else {
                refused = true;
            }
        }
        text.push_str("Your message could not be delivered to one or more of its recipients.\r\n");
        text.push_str(match (refused, expired) {
            (_, false) => {
                "The mail system has given up on them; this is a permanent error.\r\n\r\n"
            }
            (false, true) => {
                "The mail system has given up on them: each try failed for a time\r\n\
                 (a temporary error), until the message had waited in the queue\r\n\
                 as long as it may.\r\n\r\n"
            }
            (true, true) => {
                "The mail system has given up on them: some were refused for good (a\r\n\
                 permanent error); for the others each try failed for a time (a temporary\r\n\
                 error), until the message had waited in the queue as long as it may.\r\n\r\n"
            }
        });
    }
    if has(Action::Delayed) {
        text.push_str(
            "Your message has not been delivered yet to one or more of its recipients.\r\n\
             The mail system will keep trying; you do not need to send it again.\r\n\r\n",
        );
    }
    if has(Action::Delivered) {
        text.push_str(
            "Your message was delivered to one or more of its recipients,\r\n\
             as you asked to be told.\r\n\r\n",
        );
    }
    if has(Action::Relayed) {
        text.push_str(
            "Your message was passed on for one or more of its recipients to a mail system\r\n\
             that sends no delivery reports, so this is the last report you will get,\r\n\
             as you asked to be told of delivery.\r\n\r\n",
        );
    }
    let _ = write!(text, "The message arrived on {}", date(report.arrival));
    if let Some(from) = report.received_from.map(readable) {
        if !from.is_empty() {
            let _ = write!(text, "\r\nfrom {from}");
        }
    }
    let _ = write!(text, " (queue id {}).\r\n", readable(report.queue_id));
    if returned.is_full() {
        text.push_str(COPY_ATTACHED);
    } else if let Some(why) = not_whole(report) {
        let _ = write!(
            text,
            "A delivery report and the headers of the message are attached (the whole\r\n\
             message, which you asked for, could not come back: {why}).\r\n"
        );
    } else {
        text.push_str("A delivery report and the headers of the message are attached.\r\n");
    }

    for recipient in report.recipients {
        let what = match recipient.action {
            Action::Failed => "delivery failed",
            Action::Delayed => "delivery delayed, still trying",
            Action::Delivered => "delivered",
            Action::Relayed => "relayed to a system without delivery reports",
        };
        let _ = write!(
            text,
            "\r\n<{}>: {what} (status {})\r\n",
            readable(&recipient.path),
            recipient_status(recipient)
        );
        let remote = recipient.remote_mta.as_deref().map(readable);
        let diagnostic = recipient.diagnostic.as_deref().map(readable);
        let said = recipient.diagnostic.as_deref().is_some_and(is_smtp_reply);
        match (remote, diagnostic) {
            (Some(remote), Some(diagnostic)) if said => {
                let _ = write!(text, "    {remote} said: {diagnostic}\r\n");
            }
            (Some(remote), Some(diagnostic)) => {
                let _ = write!(
                    text,
                    "    Reason: {diagnostic}\r\n    Next hop: {remote}\r\n"
                );
            }
            (None, Some(diagnostic)) if !said => {
                let _ = write!(text, "    Reason: {diagnostic}\r\n");
            }
            (None, Some(diagnostic)) => {
                let _ = write!(text, "    Reply: {diagnostic}\r\n");
            }
            (Some(remote), None) => {
                let _ = write!(text, "    Next hop: {remote}\r\n");
            }
            (None, None) => {}
        }
        if let Some(at) = recipient.last_attempt {
            let _ = write!(text, "    Last attempt: {}\r\n", date(at));
        }
        if let (Action::Delayed, Some(until)) = (recipient.action, recipient.will_retry_until) {
            let _ = write!(text, "    Will retry until: {}\r\n", date(until));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_replies_are_smtp_diagnostics() {
        assert!(is_smtp_reply("550 5.1.1 no such user"));
        assert!(is_smtp_reply("421"));
        assert!(!is_smtp_reply("127.0.0.1: connection refused"));
        assert!(!is_smtp_reply(
            "message size exceeds the next hop's fixed maximum message size"
        ));
        assert!(!is_smtp_reply("5500 x"));
        // Reply codes begin with 2 to 5 (RFC 5321 4.2); a 571 is sent in the field.
        assert!(!is_smtp_reply("123 x"));
        assert!(!is_smtp_reply("650 x"));
        assert!(is_smtp_reply("571 Delivery not authorized"));
        assert!(is_smtp_reply("421-4.3.2 busy"));
        // postern's own words, about a host or domain whose name begins like a reply.
        assert!(!is_smtp_reply("123-reg.example: DNS lookup failed"));
        assert!(!is_smtp_reply("421-mx.example: no address"));
        assert!(!is_smtp_reply(
            "550-mx.example [192.0.2.1] said: 550 5.1.1 no"
        ));
        assert_eq!(
            smtp_reply_in("550-mx.example [192.0.2.1] said: 550 5.1.1 no"),
            Some("550 5.1.1 no")
        );
        // Without the address: a host given by name alone (a greeting or EHLO refusal, or
        // a next hop that lacks an extension).
        assert!(!is_smtp_reply(
            "250-mx.example does not support SMTPUTF8, needed for this message's addresses"
        ));
        assert!(!is_smtp_reply("250-mx.example said: 421 4.3.2 busy"));
        assert_eq!(
            smtp_reply_in("250-mx.example said: 421 4.3.2 busy"),
            Some("421 4.3.2 busy")
        );
        assert_eq!(
            connection_status("250-mx.example said: 421 4.3.2 busy", "4.4.2"),
            "4.3.2"
        );
        // A reply whose text goes on with such a word is still a reply.
        assert!(is_smtp_reply("550-5.1.1 does not exist"));
        assert!(is_smtp_reply("550-Mailbox does not exist"));
        assert!(is_smtp_reply(
            "550-mx.example.com does not accept mail from you"
        ));
        assert_eq!(
            deferral_status("421-mx.example: connection refused", "4.4.1"),
            "4.4.1"
        );
        assert_eq!(
            smtp_reply_in("127.0.0.1: server closed the session: 421 4.3.2 bye: now"),
            Some("421 4.3.2 bye: now")
        );
        assert_eq!(smtp_reply_in("550 5.1.1 x: y"), Some("550 5.1.1 x: y"));
        assert_eq!(
            smtp_reply_in("mx.test said: 554 go away"),
            Some("554 go away")
        );
        assert_eq!(
            smtp_reply_in("connection with 127.0.0.1 failed: refused"),
            None
        );
    }

    #[test]
    fn xtext_is_decoded() {
        assert_eq!(xtext_decode("a+2Bb+3Dc"), "a+b=c");
        assert_eq!(xtext_decode("plain"), "plain");
        assert_eq!(xtext_decode("odd+2"), "odd+2");
        assert_eq!(xtext_decode("+ZZ+41"), "+ZZA");
    }

    #[test]
    fn header_block_stops_after_the_empty_line() {
        assert_eq!(
            header_block(b"A: 1\r\nB: 2\r\n\r\nbody\r\n"),
            b"A: 1\r\nB: 2\r\n\r\n"
        );
        assert_eq!(header_block(b"A: 1\nB: 2\n\nbody\n"), b"A: 1\nB: 2\n\n");
        assert_eq!(header_block(b"\r\nbody"), b"\r\n");
        assert_eq!(header_block(b"A: 1\r\nB: 2\r\n"), b"A: 1\r\nB: 2\r\n");
        assert_eq!(header_block(b"A: 1"), b"A: 1");
        assert_eq!(header_block(b""), b"");
        assert_eq!(header_block(b"A: 1\r\n\r\n\r\nx"), b"A: 1\r\n\r\n");
    }

    #[test]
    fn a_deferral_without_a_reply_keeps_postern_s_status() {
        assert_eq!(
            deferral_status(
                "connection with mx [127.0.0.1] failed: Connection refused (os error 111)",
                "4.4.1"
            ),
            "4.4.1"
        );
        assert_eq!(deferral_status("mx: timed out", "4.4.2"), "4.4.2");
        assert_eq!(transient("5.2.2"), "4.2.2");
        assert_eq!(transient("4.7.1"), "4.7.1");
        assert_eq!(transient("5.0.0"), "4.0.0");
        assert_eq!(transient("x"), "x");
        assert_eq!(deferral_status("451 4.3.0 try later", "4.4.2"), "4.3.0");
        assert_eq!(deferral_status("421 try later", "4.4.2"), "4.0.0");
        assert_eq!(
            deferral_status(
                "mx [127.0.0.1]: server refused STARTTLS: 454 4.7.0 no",
                "4.4.1"
            ),
            "4.7.0"
        );
    }

    /// Another MTA's internationalized report (RFC 6533 6) returning a whole message/global
    /// is remade with its header section for a next hop without 8BITMIME, as an RFC 3464 one
    /// is; a report of another kind is not.
    #[test]
    fn a_global_delivery_status_report_is_remade_with_the_headers() {
        let report = |kind: &str| {
            format!(
                "From: MAILER-DAEMON@mx.example\r\nMIME-Version: 1.0\r\n\
                 Content-Type: multipart/report; report-type={kind}; boundary=\"b\"\r\n\r\n\
                 --b\r\nContent-Type: text/plain\r\n\r\nA copy is attached.\r\n\
                 --b\r\nContent-Type: message/global-delivery-status\r\n\r\n\
                 Reporting-MTA: dns; mx.example\r\n\r\nFinal-Recipient: utf-8; j\u{f6}rg@x\r\n\
                 Action: failed\r\nStatus: 5.1.1\r\n\r\n\
                 --b\r\nContent-Type: message/global\r\n\r\n\
                 Subject: caf\u{e9}\r\nFrom: j\u{f6}rg@x\r\n\r\nthe na\u{ef}ve body\r\n\
                 --b--\r\n"
            )
            .into_bytes()
        };
        let remade = with_headers_only(&report("global-delivery-status"), HeadersOnly::EightBit)
            .map(|r| String::from_utf8_lossy(&r).into_owned());
        let remade = remade.unwrap_or_default();
        assert!(remade.contains("message/global-headers"), "{remade}");
        assert!(!remade.contains("the na"), "{remade}");
        assert!(
            with_headers_only(&report("disposition-notification"), HeadersOnly::EightBit).is_none()
        );
    }

    /// b@dest.example, failed with 5.1.1 and nothing more said.
    fn failed_b() -> ReportRecipient {
        ReportRecipient {
            path: "b@dest.example".into(),
            orcpt: None,
            action: Action::Failed,
            status: "5.1.1".into(),
            remote_mta: None,
            diagnostic: None,
            last_attempt: None,
            will_retry_until: None,
        }
    }

    /// A report of `recipients` from mx.example to a@origin.example, returning a short
    /// message's headers.
    fn plain_report<'a>(recipients: &'a [ReportRecipient], envid: Option<&'a str>) -> Report<'a> {
        Report {
            reporting_mta: "mx.example",
            queue_id: "Q1",
            envid,
            arrival: 1_790_000_000,
            now: 1_790_000_100,
            to: "a@origin.example",
            received_from: None,
            recipients,
            original: b"Subject: s\r\n\r\nbody\r\n",
            return_full: false,
            binary: false,
            max_returned: 1 << 20,
        }
    }

    /// A server named by an address literal signs its reports with it, not with the
    /// literal's characters turned into a name nobody has.
    #[test]
    fn a_server_named_by_an_address_literal_signs_its_reports_with_it() {
        let recipients = [failed_b()];
        for literal in ["[192.0.2.1]", "[IPv6:2001:db8::1]"] {
            let report = Report {
                reporting_mta: literal,
                ..plain_report(&recipients, None)
            };
            let text = String::from_utf8_lossy(&build(&report)).into_owned();
            assert!(
                text.contains(&format!("<MAILER-DAEMON@{literal}>")),
                "{text}"
            );
            assert!(
                text.contains(&format!("Reporting-MTA: dns; {literal}\r\n")),
                "{text}"
            );
            let id = text
                .lines()
                .find_map(|l| l.strip_prefix("Message-ID: "))
                .unwrap_or_default();
            assert!(id.ends_with(&format!("@{literal}>")), "{id}");
        }
        // Something only like one is still made a dot-atom.
        let report = Report {
            reporting_mta: "[mx example]",
            ..plain_report(&recipients, None)
        };
        let text = String::from_utf8_lossy(&build(&report)).into_owned();
        assert!(text.contains("<MAILER-DAEMON@_mx_example_>"), "{text}");
    }

    /// RFC 3464 2.2.1: the envelope ID is given back as it was spelled, its spaces too.
    #[test]
    fn the_envelope_id_comes_back_spelled_as_it_came() {
        let recipients = [failed_b()];
        let report = |envid| plain_report(&recipients, Some(envid));
        let text = String::from_utf8_lossy(&build(&report("job+20+2042+20"))).into_owned();
        assert!(
            text.contains("Original-Envelope-Id: job  42 \r\n"),
            "{text}"
        );
        // A control character, escaped in the xtext, is still not written.
        let text = String::from_utf8_lossy(&build(&report("a+0D+0Ab"))).into_owned();
        assert!(text.contains("Original-Envelope-Id: a b\r\n"), "{text}");
    }

    /// RFC 3464 2.3.1, 2.3.2: an address is given as it was, a quoted local part's spaces
    /// in a row too.
    #[test]
    fn spaces_in_a_quoted_local_part_are_kept() {
        let recipients = [ReportRecipient {
            path: "\"a  b\"@dest.example".into(),
            orcpt: Some("rfc822;\"c+20+20d\"@x.example".into()),
            action: Action::Failed,
            status: "5.1.1".into(),
            remote_mta: None,
            diagnostic: Some("550 5.1.1   no  such user".into()),
            last_attempt: None,
            will_retry_until: None,
        }];
        let text = String::from_utf8_lossy(&build(&plain_report(&recipients, None))).into_owned();
        assert!(
            text.contains("Final-Recipient: rfc822; \"a  b\"@dest.example\r\n"),
            "{text}"
        );
        assert!(
            text.contains("Original-Recipient: rfc822;\"c  d\"@x.example\r\n"),
            "{text}"
        );
        // A reply's spaces are squeezed as before.
        assert!(
            text.contains("Diagnostic-Code: smtp; 550 5.1.1 no such user\r\n"),
            "{text}"
        );
    }

    /// The relay's account of a host names the address connected to (`name[ip]:port`);
    /// `Remote-MTA` names the host alone, an address as a literal.
    #[test]
    fn remote_mta_names_the_host_without_the_address_connected_to() {
        let line = |remote: &str| {
            let recipients = [ReportRecipient {
                path: "b@dest.example".into(),
                orcpt: None,
                action: Action::Failed,
                status: "5.1.1".into(),
                remote_mta: Some(remote.into()),
                diagnostic: Some("550 5.1.1 no such user".into()),
                last_attempt: None,
                will_retry_until: None,
            }];
            let text =
                String::from_utf8_lossy(&build(&plain_report(&recipients, None))).into_owned();
            let field = text
                .lines()
                .find(|l| l.starts_with("Remote-MTA: "))
                .map(str::to_owned);
            (field, text)
        };
        for (remote, want) in [
            ("mx.example[192.0.2.1]:25", "Remote-MTA: dns; mx.example"),
            ("127.0.0.1[127.0.0.1]:2525", "Remote-MTA: dns; [127.0.0.1]"),
            ("::1[::1]:25", "Remote-MTA: dns; [IPv6:::1]"),
            ("mx.example", "Remote-MTA: dns; mx.example"),
        ] {
            let (field, text) = line(remote);
            assert_eq!(field.as_deref(), Some(want), "{text}");
        }
        // The text for people names where the mail went.
        let (_, text) = line("mx.example[192.0.2.1]:25");
        assert!(
            text.contains("mx.example[192.0.2.1]:25 said: 550 5.1.1 no such user"),
            "{text}"
        );
    }

    /// A recipient that failed because its time in the queue ran out keeps its last 4.x.x
    /// status; the text does not call that a permanent error.
    #[test]
    fn a_failure_after_the_queue_lifetime_is_not_called_a_permanent_error() {
        let recipient = |path: &str, status: &str| ReportRecipient {
            path: path.into(),
            orcpt: None,
            action: Action::Failed,
            status: status.into(),
            remote_mta: None,
            diagnostic: None,
            last_attempt: None,
            will_retry_until: None,
        };
        let text_of = |recipients: &[ReportRecipient]| {
            String::from_utf8_lossy(&build(&plain_report(recipients, None))).into_owned()
        };
        let expired = text_of(&[recipient("b@dest.example", "4.4.1")]);
        assert!(expired.contains("Status: 4.4.1\r\n"), "{expired}");
        assert!(!expired.contains("permanent error"), "{expired}");
        assert!(expired.contains("temporary"), "{expired}");
        assert!(!expired.contains("quoted-printable"), "{expired}");
        assert!(expired.contains("as long as it may"), "{expired}");
        let refused = text_of(&[recipient("b@dest.example", "5.1.1")]);
        assert!(refused.contains("this is a permanent error"), "{refused}");
        assert!(!refused.contains("temporary"), "{refused}");
        let both = text_of(&[
            recipient("b@dest.example", "5.1.1"),
            recipient("c@dest.example", "4.4.1"),
        ]);
        assert!(both.contains("some were refused for good"), "{both}");
        assert!(
            both.contains("waited in the queue as long as it may"),
            "{both}"
        );
    }

    #[test]
    fn a_connection_s_status_is_its_reply_s_where_that_says_more_than_a_class() {
        let greeting = "127.0.0.1 said: 421 4.3.2 too busy";
        assert_eq!(connection_status(greeting, "4.4.2"), "4.3.2");
        let starttls = "127.0.0.1: server refused STARTTLS: 454 4.7.0 TLS not available";
        assert_eq!(connection_status(starttls, "4.4.2"), "4.7.0");
        assert_eq!(
            connection_status("127.0.0.1 said: 421 busy", "4.4.2"),
            "4.4.2"
        );
        assert_eq!(
            connection_status("connection with x failed: timed out", "4.4.2"),
            "4.4.2"
        );
    }

    #[test]
    fn status_of_takes_the_reply_code() {
        assert_eq!(status_of("550 5.1.1 <x@y>: no such user"), "5.1.1");
        assert_eq!(status_of("452-4.2.2 mailbox full"), "4.2.2");
        assert_eq!(status_of("554 5.7.1"), "5.7.1");
        assert_eq!(status_of("550 no such user"), "5.0.0");
        assert_eq!(status_of("421 try later"), "4.0.0");
        assert_eq!(status_of("250 2.1.5 ok"), "2.1.5");
        assert_eq!(status_of("550 4.1.1 mismatched class"), "5.1.1");
        assert_eq!(status_of("451 5.7.1 mismatched class"), "4.7.1");
        assert_eq!(status_of("250 5.0.0 ok"), "2.0.0");
        assert_eq!(status_of("550 5.1234.1 too long"), "5.0.0");
        assert_eq!(status_of("550 5.1.1x"), "5.0.0");
        assert_eq!(status_of("550"), "5.0.0");
        assert_eq!(status_of("5501 5.1.1"), "5.5.0");
        assert_eq!(status_of("hello"), "5.5.0");
        assert_eq!(status_of(""), "5.5.0");
        assert_eq!(status_of("354 go ahead"), "5.5.0");
        assert_eq!(status_of("550 é"), "5.0.0");
        assert_eq!(
            status_of("127.0.0.1 [127.0.0.1]: server refused STARTTLS: 454 4.7.0 not now"),
            "4.7.0"
        );
    }

    #[test]
    fn status_follows_the_action() {
        let mut recipient = ReportRecipient {
            path: "a@b".into(),
            orcpt: None,
            action: Action::Delayed,
            status: "5.4.7".into(),
            remote_mta: None,
            diagnostic: None,
            last_attempt: None,
            will_retry_until: None,
        };
        assert_eq!(recipient_status(&recipient), "4.4.7");
        recipient.status = "garbage".into();
        assert_eq!(recipient_status(&recipient), "4.0.0");
        recipient.action = Action::Failed;
        recipient.status = " 5.1.10 ".into();
        assert_eq!(recipient_status(&recipient), "5.1.10");
        recipient.status = "4.4.7".into();
        assert_eq!(recipient_status(&recipient), "4.4.7");
        recipient.status = "2.0.0".into();
        assert_eq!(recipient_status(&recipient), "5.0.0");
    }

    #[test]
    fn utf8_addresses_are_written_as_utf8_addr_xtext() {
        assert_eq!(
            utf8_addr_xtext("j\u{f6}rg+x=y\\z@b\u{fc}cher.example"),
            "j\\x{F6}rg\\x{2B}x\\x{3D}y\\x{5C}z@b\\x{FC}cher.example"
        );
        assert_eq!(utf8_addr_xtext("a b@c"), "a\\x{20}b@c");
    }

    #[test]
    fn safe_values_are_one_ascii_line() {
        assert_eq!(safe("a\r\nb\t c\u{0}"), "a b c");
        assert_eq!(safe("  user@bücher.example "), "user@b\\x{FC}cher.example");
        let long = safe(&"x".repeat(5000));
        assert_eq!(long.len(), MAX_FIELD_VALUE);
        let escapes = safe(&"é".repeat(5000));
        assert!(escapes.len() <= MAX_FIELD_VALUE && escapes.is_ascii());
        // Already escaped (utf8_addr_xtext), the cut falls between escapes.
        let escaped = safe(&utf8_addr_xtext(&"é".repeat(400)));
        assert!(escaped.len() <= MAX_FIELD_VALUE, "{}", escaped.len());
        assert!(
            escaped.ends_with("\\x{E9}"),
            "{}",
            &escaped[escaped.len() - 10..]
        );
        for cut in 0..8 {
            let value = format!("{}{}", "a".repeat(cut), utf8_addr_xtext(&"é".repeat(400)));
            let written = safe(&value);
            assert!(
                written.ends_with('}'),
                "{cut}: {}",
                &written[written.len() - 10..]
            );
        }
    }

    #[test]
    fn text_for_people_shows_no_control_nor_reordering_character() {
        // A next hop's reply with a right-to-left override would turn the rest of the reason
        // around in the sender's mail reader; a C1 control or a line separator would break it.
        assert_eq!(
            readable("550 no \u{202e}resu\u{2066}x\u{9b}y\u{2028}z \u{e9}"),
            "550 no resu x y z \u{e9}"
        );
        assert_eq!(readable("\u{200f} a\r\n\tb \u{61c}"), "a b");
    }

    #[test]
    fn fields_fold_at_spaces() {
        let mut out = Vec::new();
        let value = ["word"; 40].join(" ");
        field(&mut out, "Diagnostic-Code", &value);
        let text = String::from_utf8(out).unwrap_or_default();
        let lines: Vec<&str> = text.split_terminator("\r\n").collect();
        assert!(lines.len() > 1, "{text:?}");
        assert!(
            lines.iter().all(|line| line.len() <= FOLD_COLUMN),
            "{text:?}"
        );
        assert!(
            lines.iter().skip(1).all(|line| line.starts_with(' ')),
            "{text:?}"
        );
        assert_eq!(
            text.replace("\r\n", ""),
            format!("Diagnostic-Code: {value}")
        );
    }

    #[test]
    fn normalize_makes_crlf_and_guards_long_lines() {
        assert_eq!(
            normalize(b"a\nb\rc\r\nd", false).unwrap_or_default(),
            b"a\r\nb\r\nc\r\nd\r\n"
        );
        let long = vec![b'x'; MAX_LINE + 5];
        assert!(normalize(&long, false).is_none());
        let broken = normalize(&long, true).unwrap_or_default();
        let mut expected = vec![b'x'; MAX_LINE];
        expected.extend_from_slice(b"\r\n xxxxx\r\n");
        assert_eq!(broken, expected);
    }

    #[test]
    fn a_long_field_is_folded_before_its_last_blank_and_keeps_its_words() {
        let words: Vec<String> = (0..300).map(|i| format!("word{i:04}")).collect();
        let field = format!("X-Long: {}", words.join(" "));
        let folded = normalize(field.as_bytes(), true).unwrap_or_default();
        let text = String::from_utf8(folded).unwrap_or_default();
        let lines: Vec<&str> = text.split_terminator("\r\n").collect();
        assert!(lines.len() > 2, "{text}");
        assert!(lines.iter().all(|l| l.len() <= MAX_LINE), "{text}");
        assert!(lines[1..].iter().all(|l| l.starts_with(' ')), "{text}");
        // Unfolding (RFC 5322 2.2.3: remove each CRLF before a blank) gives the field back.
        assert_eq!(text.replace("\r\n", ""), field);
        // A tab is a place to fold too, and a line that is all one word is still cut.
        let tabbed = format!("X-T:\t{}\t{}", "a".repeat(990), "b".repeat(20));
        let folded = normalize(tabbed.as_bytes(), true).unwrap_or_default();
        let text = String::from_utf8(folded).unwrap_or_default();
        assert_eq!(
            text,
            format!("X-T:\t{}\r\n\t{}\r\n", "a".repeat(990), "b".repeat(20))
        );
        // A blank at the very start of a line (a continuation's own) is no place to fold.
        let lead = format!(" {}", "c".repeat(MAX_LINE + 3));
        let folded = normalize(lead.as_bytes(), true).unwrap_or_default();
        assert_eq!(
            String::from_utf8(folded).unwrap_or_default(),
            format!(" {}\r\n cccc\r\n", "c".repeat(MAX_LINE - 1))
        );
        // Nor is a blank among the blanks a line starts with: a fold there would leave a
        // line of blanks alone.
        let leads = format!("X-L: a\r\n \t{}", "d".repeat(MAX_LINE + 3));
        let folded = normalize(leads.as_bytes(), true).unwrap_or_default();
        let text = String::from_utf8(folded).unwrap_or_default();
        assert!(
            text.split_terminator("\r\n").all(|l| !l.trim().is_empty()),
            "{text:?}"
        );
        assert_eq!(
            text,
            format!("X-L: a\r\n \t{}\r\n ddddd\r\n", "d".repeat(MAX_LINE - 2))
        );
        // A run of blanks past the limit: folded once, the rest of the run let go; at the
        // end of the field, the fold undone.
        for (long, ends) in [
            (
                format!("X: a{}b\r\nY: c", " ".repeat(2000)),
                " b\r\nY: c\r\n",
            ),
            (format!("X: a{}\r\nY: c", " ".repeat(2000)), "\r\nY: c\r\n"),
            (format!("X: a{}", "\t".repeat(2000)), "\r\n"),
        ] {
            let folded = normalize(long.as_bytes(), true).unwrap_or_default();
            let text = String::from_utf8(folded).unwrap_or_default();
            assert!(
                text.split_terminator("\r\n")
                    .all(|l| !l.trim().is_empty() && l.len() <= MAX_LINE),
                "{text:?}"
            );
            assert!(text.ends_with(ends), "{text:?}");
        }
    }
}
