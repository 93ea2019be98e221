//! A job made into a transaction for one connection: the envelope's parameters as the next
//! hop's extensions allow them, and the body as it must go (8-bit, binary or downgraded).

use super::*;
use postern_proto::address::mailbox_to_ascii;

impl CoreRelay {
    /// Fails `job` for good with `status` and `text`, decided here from what `conn`'s next hop
    /// offers before anything is sent; that next hop is the one the reports name.
    fn refused_here(&self, job: Job, status: &str, text: &str, conn: &Outbound) {
        let remote = Some(relay_label(&conn.remote, conn.addr));
        self.settle_all(job, true, status, text, remote);
    }

    /// The transaction for `job` on `conn`, or None when the job was settled without
    /// sending (the next hop lacks an extension the message needs).
    pub(super) fn prepare(
        &self,
        conn: &Outbound,
        mut job: Job,
    ) -> Option<(Job, Transaction, MessageRef)> {
        if job.msg.deleted.load(Ordering::Acquire) {
            // Deleted by the operator: its owner has settled and forgotten it.
            return None;
        }
        let meta = &job.msg.meta;
        // Read from where the message is now (it may have been copied forward since).
        let original = job.msg.body();
        let caps = conn.capabilities();
        let (chunking, binarymime, smtputf8, eightbitmime) = (
            caps.chunking,
            caps.binarymime,
            caps.smtputf8,
            caps.eightbitmime,
        );
        // BINARYMIME needs BDAT and BINARYMIME at the next hop (RFC 3030 3). A body declared
        // BINARYMIME that is text all the same (CRLF lines of at most 998 octets, no NUL) goes
        // as it is, declared 8BITMIME or 7BIT (decided below from its content): nothing in it
        // changes, and DATA's dot-stuffing is undone at the other end. Any other body is not
        // rewritten (postern does not encode MIME parts) and fails for this next hop.
        let mut body_type = meta.body_type;
        // One that came as text (no BODY, 7BIT or 8BITMIME) but is not: a line over 998
        // octets, a NUL, a last line without CR LF (one scan, for the two rules below).
        let mut not_text = body_type != 2 && !text_lines(original.chunks());
        if body_type == 2 && !(chunking && binarymime) {
            if !is_text(|| original.chunks()) {
                // Declared binary, but text apart from lines over 998 octets, a last line
                // without CR LF or NULs: what a server upstream (postern among them) declares
                // BINARYMIME when such a body came to it as text and its next hop takes
                // BINARYMIME. It goes as a body that came as text does (made to fit below,
                // a NUL as it came).
                if !text_but_for_length(|| original.chunks()) {
                    let text = format!(
                        "{} does not support BINARYMIME and the message is not text that could go without it",
                        conn.remote
                    );
                    self.refused_here(job, "5.6.3", &text, conn);
                    return None;
                }
                not_text = true;
            }
            body_type = 0;
        } else if not_text && chunking && binarymime {
            // Neither 7BIT nor 8BITMIME may carry it (RFC 5321 4.5.3.1.6, RFC 6152 3): a next
            // hop that takes BINARYMIME gets it declared so, unchanged (RFC 3030 3); any other
            // gets its long lines broken, below.
            body_type = 2;
        }
        // RFC 6531 3.2: an internationalized message (UTF-8 in its reverse path, its header
        // section or a recipient's address) goes only to a next hop with SMTPUTF8. postern
        // does not downgrade, so such a message fails for that next hop. With an ASCII
        // reverse path and header section, only the recipients whose own local part is UTF-8
        // fail: the others go on in a transaction without them, which is not
        // internationalized (a domain in U-labels goes in A-labels). One sent with SMTPUTF8 that has none of these goes on without
        // the parameter.
        if meta.smtputf8 && !smtputf8 {
            let text = || {
                format!(
                    "{} does not support SMTPUTF8, needed for this message's addresses or header fields",
                    conn.remote
                )
            };
            let (ascii, intl): (Vec<u32>, Vec<u32>) = job.rcpts.iter().partition(|&&i| {
                meta.recipients
                    .get(i as usize)
                    .is_some_and(|r| mailbox_to_ascii(&r.path).is_some())
            });
            if ascii.is_empty() || mailbox_to_ascii(&meta.reverse_path).is_none() {
                self.refused_here(job, "5.6.7", &text(), conn);
                return None;
            }
            // The recipients with a UTF-8 local part fail with X.6.7 (their addresses), the
            // others, when the header section holds UTF-8, with X.6.9: a UTF-8 header message
            // that cannot be transferred (registered by RFC 6531).
            let headers_ascii = headers_are_ascii(&original);
            if !intl.is_empty() {
                let failed = Job {
                    msg: job.msg.clone(),
                    rcpts: intl,
                    dest: job.dest.clone(),
                    failures: job.failures,
                    not_before: 0,
                    hop_dsn: false,
                    tried: Vec::new(),
                    flushes: job.flushes,
                };
                self.refused_here(failed, "5.6.7", &text(), conn);
                job.rcpts = ascii;
            }
            if !headers_ascii {
                let text = format!(
                    "{} does not support SMTPUTF8, needed for this message's header fields",
                    conn.remote
                );
                self.refused_here(job, "5.6.9", &text, conn);
                return None;
            }
        }
        // RFC 6152 3: no octet above 127 goes to a next hop without 8BITMIME, and any that
        // goes is announced with BODY=8BITMIME. postern does not rewrite MIME bodies, so such
        // a message fails for a next hop without 8BITMIME (as BINARYMIME does above). The
        // content decides, not the declaration: a message declared 8BITMIME that is plain
        // ASCII goes to any next hop, and 8-bit content declared as nothing or 7BIT goes
        // with BODY=8BITMIME.
        // (Not scanned where the answer changes nothing: declared 8BITMIME to a next hop that
        // offers it.)
        let mut eight_bit = body_type != 2
            && !(body_type == 1 && eightbitmime)
            && original.chunks().any(|c| !c.is_ascii());
        // A report from `<>` that returns a whole 8-bit message: what still reaches its
        // sender through this next hop is the report with the header section only. Only this
        // transaction's body changes: a later attempt, through a next hop with 8BITMIME,
        // sends the whole report.
        let mut body = original;
        if eight_bit && !eightbitmime {
            let seven_bit = |r: &[u8]| !dsn::is_8bit(r);
            if let Some(remade) =
                headers_only(&job.msg, &body, dsn::HeadersOnly::EightBit, seven_bit)
            {
                tracing::info!(
                    queue_id = %job.msg.queue_id,
                    "{} does not support 8BITMIME: the report goes with the returned message's header section only",
                    conn.remote
                );
                body = remade;
                eight_bit = false;
            }
        }
        // Lines over 998 octets to a next hop that cannot take them declared binary (above):
        // RFC 5321 4.5.3.1.6 lets a client send none, so each is folded or broken into lines
        // of at most 998 octets (`fold_long_lines`; base64 and quoted-printable decoders pass
        // over the breaks). A last line without CR LF gets one, as DATA would add (a message
        // is lines, RFC 5322 2.1); a NUL is left as it came (docs/delivery.md).
        if not_text && body_type != 2 {
            if let Some(folded) = fold_long_lines(&job.msg.queue_id, &body) {
                tracing::info!(
                    queue_id = %job.msg.queue_id,
                    "{} does not support BINARYMIME: the message's lines are made to fit it (over 998 octets folded or broken, the last ended)",
                    conn.remote
                );
                body = folded;
            }
        }
        // The same for a report from `<>` larger than the next hop takes (its SIZE): with the
        // header section only, it may fit.
        if let Some(limit) = caps.size.filter(|&l| l > 0 && body.len() > l) {
            let fits = |r: &[u8]| r.len() as u64 <= limit;
            if let Some(remade) = headers_only(&job.msg, &body, dsn::HeadersOnly::TooBig, fits) {
                tracing::info!(
                    queue_id = %job.msg.queue_id,
                    "{} takes at most {limit} octets: the report goes with the returned message's header section only",
                    conn.remote
                );
                body = remade;
            }
        }
        if eight_bit && !eightbitmime {
            let text = format!(
                "{} does not support 8BITMIME and the message has 8-bit content",
                conn.remote
            );
            self.refused_here(job, "5.6.3", &text, conn);
            return None;
        }
        let mut mail_params = String::new();
        match body_type {
            2 => mail_params.push_str(" BODY=BINARYMIME"),
            1 if eightbitmime => mail_params.push_str(" BODY=8BITMIME"),
            _ if eight_bit => mail_params.push_str(" BODY=8BITMIME"),
            _ => {}
        }
        if meta.smtputf8 && smtputf8 {
            mail_params.push_str(" SMTPUTF8");
        }
        // The DSN parameters go on where the next hop takes them (RFC 3461 4); where it does
        // not, a success report asked for is sent from here when the message is relayed.
        let dsn = caps.dsn;
        if dsn {
            dsn_mail_params(meta, &mut mail_params);
        }
        job.hop_dsn = dsn;
        // Without SMTPUTF8 at the next hop, a domain in U-labels goes in A-labels (RFC 6531
        // 3.2); the checks above left only paths that have that form.
        let as_sent = |path: &str| {
            if meta.smtputf8 && !smtputf8 {
                mailbox_to_ascii(path).map_or_else(|| path.to_owned(), |p| p.into_owned())
            } else {
                path.to_owned()
            }
        };
        let tx = Transaction {
            from: as_sent(&meta.reverse_path),
            mail_params,
            rcpts: job
                .rcpts
                .iter()
                .filter_map(|&i| meta.recipients.get(i as usize))
                .map(|r| OutRecipient {
                    path: as_sent(&r.path),
                    params: if dsn {
                        dsn_rcpt_params(r, meta.smtputf8 && smtputf8)
                    } else {
                        String::new()
                    },
                })
                .collect(),
            body_len: body.len(),
            mode: if chunking {
                BodyMode::Bdat
            } else {
                BodyMode::Data
            },
            chunk_size: 0,
        };
        Some((job, tx, body))
    }
}

/// Whether a message's header section (up to its first empty line) is all ASCII.
pub(super) fn headers_are_ascii(body: &MessageRef) -> bool {
    #[derive(Clone, Copy)]
    enum At {
        LineStart,
        CrAtLineStart,
        InLine,
    }
    let mut at = At::LineStart;
    for chunk in body.chunks() {
        for &b in chunk {
            if b > 0x7f {
                return false;
            }
            at = match (at, b) {
                (At::LineStart | At::CrAtLineStart, b'\n') => return true,
                (At::LineStart, b'\r') => At::CrAtLineStart,
                (_, b'\n') => At::LineStart,
                _ => At::InLine,
            };
        }
    }
    true
}

/// `body`, a report from `<>` in `msg`, remade with its returned message's header section
/// only (`why`), when the remade report `fits`; None for any other message.
pub(super) fn headers_only(
    msg: &Msg,
    body: &MessageRef,
    why: dsn::HeadersOnly,
    fits: impl Fn(&[u8]) -> bool,
) -> Option<MessageRef> {
    if !msg.meta.reverse_path.is_empty() {
        return None;
    }
    dsn::with_headers_only(&body.to_vec(), why)
        .filter(|r| fits(r))
        .and_then(|r| MessageRef::from_bytes(&msg.queue_id, &r).ok())
}

/// RET and ENVID for a next hop that offers DSN, as they came in (ENVID is still xtext).
pub(super) fn dsn_mail_params(meta: &MessageMeta, out: &mut String) {
    match meta.ret {
        Some(1) => out.push_str(" RET=FULL"),
        Some(2) => out.push_str(" RET=HDRS"),
        _ => {}
    }
    if let Some(envid) = &meta.envid {
        out.push_str(" ENVID=");
        out.push_str(envid);
    }
}

/// A recipient's DSN parameters for the next hop. In a transaction without SMTPUTF8 a
/// UTF-8 ORCPT is written in its ASCII form, each non-ASCII character as `\x{HEX}`
/// (RFC 6533 3, utf-8-addr-xtext). That form is up to ten times longer: past the 500 octets
/// RFC 3461 4.2 allows an ORCPT (and the line room it gives DSN parameters) it is left out,
/// as for a next hop without DSN, rather than sent on a line the next hop may refuse.
pub(super) fn dsn_rcpt_params(r: &Recipient, smtputf8: bool) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if let Some(bits) = r.notify {
        let _ = write!(out, " NOTIFY={}", Notify::from_bits(bits));
    }
    if let Some(orcpt) = &r.orcpt {
        let mut value = String::with_capacity(orcpt.len());
        if smtputf8 || orcpt.is_ascii() {
            value.push_str(orcpt);
        } else {
            for c in orcpt.chars() {
                if c.is_ascii() {
                    value.push(c);
                } else {
                    let _ = write!(value, "\\x{{{:X}}}", u32::from(c));
                }
            }
        }
        if value.len() <= postern_proto::limits::MAX_ORCPT {
            out.push_str(" ORCPT=");
            out.push_str(&value);
        }
    }
    out
}

/// Whether a message is text in the sense of RFC 5322 2.1.1 and RFC 6152 3: lines that end in
/// CRLF (the last one too), CR and LF nowhere else, no NUL, no line over 998 octets before
/// its CRLF. Octets above 127 are allowed (8-bit text). Such a body can go without BINARYMIME,
/// unless a part of it is labelled `Content-Transfer-Encoding: binary`, a label only a
/// binary transport may carry (RFC 2045 6.2): such a body is not taken for text either. The
/// label is read from the MIME header sections only (the message's, its parts', those of
/// messages inside it), as MIME reads them: folded, with comments, any case; the same words
/// in a body or a preamble are no label.
/// `chunks`: the body in pieces, cut anywhere (each call from the start).
pub(super) fn is_text<'a, I: Iterator<Item = &'a [u8]>>(chunks: impl Fn() -> I) -> bool {
    text_lines(chunks()) && !labelled_binary(chunks())
}

/// Whether a body that is not [`is_text`] is text all the same but for the length of its
/// lines, the line end of its last one and NULs, what a body that came as text may have
/// (so [`fold_long_lines`] makes it go as one): every CR in a CR LF (a last octet CR
/// aside), and no part labelled binary.
pub(super) fn text_but_for_length<'a, I: Iterator<Item = &'a [u8]>>(
    chunks: impl Fn() -> I,
) -> bool {
    crlf_lines(chunks(), None) && !labelled_binary(chunks())
}

/// The line rules of [`is_text`]. (Run on every message to a next hop with BINARYMIME, so
/// with memchr's scans: every LF right after a CR, as many CRs as LFs, no NUL, and no more
/// than 998 octets and the CR between two LFs.)
pub(crate) fn text_lines<'a>(chunks: impl Iterator<Item = &'a [u8]>) -> bool {
    crlf_lines(chunks, Some(999))
}

/// [`text_lines`] with lines of any length when `longest` (octets and the CR) is None, the
/// last line then without a line end too (or ending in the CR alone), and NULs.
fn crlf_lines<'a>(chunks: impl Iterator<Item = &'a [u8]>, longest: Option<usize>) -> bool {
    let nul_ok = longest.is_none();
    let longest = longest.unwrap_or(usize::MAX);
    // The octets of the line so far, its CR included; the piece before's last octet.
    let (mut line, mut last) = (0usize, None);
    let (mut crs, mut lfs) = (0usize, 0usize);
    for chunk in chunks {
        if chunk.is_empty() {
            continue;
        }
        if !nul_ok && memchr::memchr(0, chunk).is_some() {
            return false;
        }
        crs += memchr::memchr_iter(b'\r', chunk).count();
        let mut start = 0;
        for lf in memchr::memchr_iter(b'\n', chunk) {
            let before = lf.checked_sub(1).map_or(last, |i| Some(chunk[i]));
            line += lf - start;
            if before != Some(b'\r') || line > longest {
                return false;
            }
            (line, start) = (0, lf + 1);
            lfs += 1;
        }
        line += chunk.len() - start;
        if line > longest {
            return false;
        }
        last = chunk.last().copied();
    }
    if longest == usize::MAX {
        return crs == lfs || (crs == lfs + 1 && last == Some(b'\r'));
    }
    crs == lfs && line == 0
}

/// `body` made fit for a next hop that takes only text: each line over 998 octets (before its
/// line end) broken, and a CR LF after a last line without one; None when neither is needed
/// (or the copy cannot be made). In the header section a long line is folded (RFC 5322
/// 2.2.3): a CR LF goes in before its last space or tab within the limit that has something
/// else before it and after it on the line, so that unfolding gives the field back as it
/// was. A line without such a blank (in the header section), or in the body, is broken after
/// 998 octets, and then every 997, by CR LF and a space, as Postfix's client does, never
/// inside a UTF-8 sequence where one can be told.
pub(crate) fn fold_long_lines(queue_id: &str, body: &MessageRef) -> Option<MessageRef> {
    const MAX: usize = 998;
    let blank = |b: &u8| matches!(b, b' ' | b'\t');
    let whole: Vec<u8> = body.chunks().flat_map(|c| c.iter().copied()).collect();
    let mut out = Vec::with_capacity(whole.len() + whole.len() / 300 + 2);
    let mut changed = false;
    let mut in_header = true;
    for line in whole.split_inclusive(|&b| b == b'\n') {
        let end = if line.ends_with(b"\r\n") {
            2
        } else {
            usize::from(line.ends_with(b"\n"))
        };
        let (mut content, mut ending) = line.split_at(line.len() - end);
        if end == 0 {
            // The last line, without its line end: it gets CR LF, as over DATA. A lone CR
            // there (which DATA too makes CR LF) is taken for that line end's first half.
            content = content.strip_suffix(b"\r").unwrap_or(content);
            ending = b"\r\n";
            changed |= !line.is_empty();
        }
        if content.is_empty() && end > 0 {
            in_header = false;
        }
        if content.len() <= MAX {
            out.extend_from_slice(content);
            out.extend_from_slice(ending);
            continue;
        }
        changed = true;
        if in_header {
            // Blanks at the end of a field are no content (and a line of blanks alone, which
            // a break among them would make, is obsolete syntax, to some readers the header
            // section's end): a long line loses them, and any bare CR among them (one the
            // spool does not store: it makes bare CRs line ends). A long line of nothing
            // else goes altogether.
            match content.iter().rposition(|b| !blank(b) && *b != b'\r') {
                Some(last) => content = &content[..=last],
                None => continue,
            }
        }
        let mut room = MAX;
        // The first line of a header field, not yet folded or broken: its name ends at a
        // colon, before which no fold goes (a blank there is obsolete syntax).
        let mut field_start = in_header && content.first().is_some_and(|b| !blank(b));
        while content.len() > room {
            if in_header {
                // (Some other octet: the blanks at the end are gone, and a line of blanks
                // alone is one blank, within the room. Each look is bounded by the room or
                // ends at once, so a line of any length costs in proportion to it.)
                let first = content.iter().position(|b| !blank(b)).unwrap_or(0);
                let last = content.iter().rposition(|b| !blank(b)).unwrap_or(0);
                // A header field's fold: the last blank within the room after the line's
                // first other octet (and after its name's colon), and before its last.
                let after = if field_start {
                    memchr::memchr(b':', &content[..=room]).unwrap_or(room)
                } else {
                    first
                };
                field_start = false;
                if let Some(at) = (after + 1..=room.min(last))
                    .rev()
                    .find(|&at| blank(&content[at]))
                {
                    out.extend_from_slice(&content[..at]);
                    out.extend_from_slice(b"\r\n");
                    content = &content[at..];
                    room = MAX;
                    continue;
                }
                // No blank to fold at, and the text begins so late that a break would leave
                // blanks alone on the line (the break backs off up to 3 octets, below): the
                // run of blanks before it goes as one blank.
                if first + 3 >= room {
                    content = &content[first - 1..];
                    continue;
                }
            }
            // Back off from the middle of a UTF-8 sequence (at most 3 octets), so that each
            // line stays valid UTF-8 where the text was.
            let mut cut = room;
            while cut > room - 3 && content[cut] & 0xc0 == 0x80 {
                cut -= 1;
            }
            if content[cut] & 0xc0 == 0x80 {
                cut = room;
            }
            out.extend_from_slice(&content[..cut]);
            out.extend_from_slice(b"\r\n ");
            content = &content[cut..];
            room = MAX - 1;
        }
        out.extend_from_slice(content);
        out.extend_from_slice(ending);
    }
    changed
        .then(|| MessageRef::from_bytes(queue_id, &out).ok())
        .flatten()
}

/// Whether a part of the message (or of a message inside it) is labelled
/// `Content-Transfer-Encoding: binary` ([`crate::mime::labelled_binary`]). The body is copied
/// whole to be read: only bodies declared BINARYMIME for a next hop without it come here.
fn labelled_binary<'a>(chunks: impl Iterator<Item = &'a [u8]>) -> bool {
    let whole: Vec<u8> = chunks.flat_map(|c| c.iter().copied()).collect();
    // Not a label anywhere, in any case: nothing to read.
    contains_ignoring_case(&whole, b"binary") && crate::mime::labelled_binary(&whole)
}

fn contains_ignoring_case(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

#[cfg(test)]
mod tests {
    use super::{dsn_rcpt_params, is_text, Recipient};

    #[test]
    fn text_is_crlf_lines_of_at_most_998_octets_without_nul() {
        let text = |pieces: &[&[u8]]| is_text(|| pieces.iter().copied());
        assert!(text(&[b"Subject: a\r\n\r\nbody \xc3\xa9\r\n"]));
        assert!(text(&[]), "an empty body");
        // CR and LF split between pieces.
        assert!(text(&[b"a\r", b"\nb\r\n"]));
        let long = [vec![b'x'; 998], b"\r\n".to_vec()].concat();
        assert!(text(&[&long]));
        let too_long = [vec![b'x'; 999], b"\r\n".to_vec()].concat();
        assert!(!text(&[&too_long]));
        // Split over pieces, the count goes on.
        assert!(!text(&[&too_long[..500], &too_long[500..]]));
        assert!(!text(&[b"a\nb\r\n"]), "bare LF");
        assert!(!text(&[b"a\rb\r\n"]), "bare CR");
        assert!(!text(&[b"a\x00b\r\n"]), "NUL");
        assert!(!text(&[b"no line end"]), "a last line without CRLF");
        assert!(!text(&[b"ends in CR\r"]));
        assert!(text(&[b"Content-Transfer-Encoding: 8bit\r\n\r\nx\r\n"]));
        assert!(text(&[b"X: Content-Transfer-Encoding: binary\r\n"]));
        let long = format!("Content-Transfer-Encoding:{}binary-ish\r\n", " ".repeat(32));
        assert!(text(&[long.as_bytes()]));
    }

    /// `body` as `fold_long_lines` makes it fit, or None where it is left as it is.
    fn fold(body: &[u8]) -> Option<Vec<u8>> {
        let m = postern_spool::MessageRef::from_bytes("Q", body).unwrap();
        super::fold_long_lines("Q", &m).map(|f| f.chunks().flatten().copied().collect())
    }

    #[test]
    fn long_lines_are_broken_with_a_space_and_nothing_else_changes() {
        assert_eq!(fold(b"short\r\nlines\r\n"), None);
        let exact = [vec![b'a'; 998], b"\r\n".to_vec()].concat();
        assert_eq!(fold(&exact), None);
        let long = [
            b"H: v\r\n\r\n".to_vec(),
            vec![b'x'; 2500],
            b"\r\nend\r\n".to_vec(),
        ]
        .concat();
        let got = fold(&long).unwrap();
        let lines: Vec<&[u8]> = got.split_inclusive(|&b| b == b'\n').collect();
        assert!(lines
            .iter()
            .all(|l| l.len() <= 1000 && l.ends_with(b"\r\n")));
        // 998, then 997 after the space each: 998 + 997 + 505.
        assert_eq!(lines.len(), 6, "{}", String::from_utf8_lossy(&got));
        assert_eq!(lines[2].len(), 1000);
        assert!(lines[3].starts_with(b" x") && lines[4].starts_with(b" x"));
        // Undone, the folds give the body back.
        let undone: Vec<u8> = String::from_utf8(got.clone())
            .unwrap()
            .replace("\r\n ", "")
            .into_bytes();
        assert_eq!(undone, long);
        // A two-octet character across the cut goes whole to the next line.
        let utf8 = [
            vec![b'y'; 997],
            "\u{e9}".repeat(10).into_bytes(),
            b"\r\n".to_vec(),
        ]
        .concat();
        let got = String::from_utf8(fold(&utf8).unwrap()).unwrap();
        assert!(
            got.starts_with(&format!("{}\r\n \u{e9}", "y".repeat(997))),
            "{got}"
        );
        // A last line without its line end gets one, long or not.
        let tail = [b"H: v\r\n\r\n".to_vec(), vec![b'z'; 1200]].concat();
        let got = fold(&tail).unwrap();
        assert!(got.ends_with(b"z\r\n") && got.len() == tail.len() + 3 + 2);
        assert_eq!(
            fold(b"H: v\r\n\r\nshort").unwrap(),
            b"H: v\r\n\r\nshort\r\n"
        );
        // A lone CR at the end is that line end's first half, as over DATA.
        assert_eq!(fold(b"H: v\r\n\r\nx\r").unwrap(), b"H: v\r\n\r\nx\r\n");
    }

    #[test]
    fn long_header_lines_are_folded_at_a_blank_so_that_unfolding_gives_them_back() {
        let ids: String = (0..60)
            .map(|i| format!(" <message-{i:04}-with-a-long-id@lists.example.org>"))
            .collect();
        let words: String = (0..300).map(|i| format!(" word{i}\tw")).collect();
        let header = format!("References:{ids}\r\nX-Words:{words}\r\nSubject: s\r\n");
        let body = format!("{header}\r\n{}\r\n", "b ".repeat(700));
        let got = fold(body.as_bytes()).unwrap();
        let text = String::from_utf8(got.clone()).unwrap();
        let (head, rest) = text.split_once("\r\n\r\n").unwrap();
        for line in head.split("\r\n") {
            assert!(line.len() <= 998, "{line}");
            // Each fold is before a blank that was there, with something after it.
            assert!(line.trim_start().len() > 1, "{line:?}");
        }
        // Unfolding (RFC 5322 2.2.3: a CR LF before a blank taken out) gives the fields back.
        assert_eq!(
            head.replace("\r\n ", " ").replace("\r\n\t", "\t") + "\r\n",
            header
        );
        assert!(head.matches("\r\n ").count() >= 3, "{head}");
        // No message ID is cut.
        assert_eq!(head.matches("@lists.example.org>").count(), 60);
        // The body's long line is broken as before: after 998 octets, with a space.
        assert!(rest.starts_with(&"b ".repeat(499)), "{rest}");
        assert_eq!(rest.split("\r\n").next().unwrap().len(), 998);

        // A header line with no blank to fold at past its name is folded there, and then
        // broken.
        let solid = format!("X-Solid: {}\r\n\r\nbody\r\n", "a".repeat(1500));
        let got = String::from_utf8(fold(solid.as_bytes()).unwrap()).unwrap();
        let lines = got.split("\r\n").collect::<Vec<_>>();
        assert_eq!(lines[0], "X-Solid:");
        assert_eq!(lines[1], format!(" {}", "a".repeat(997)));
        assert_eq!(lines[2], format!(" {}", "a".repeat(503)));
        assert_eq!(lines[3..], ["", "body", ""]);
        // A field's name is not folded, even where a blank comes before its colon.
        let named = format!("Subject :{}\r\n\r\n", "s".repeat(1200));
        let got = String::from_utf8(fold(named.as_bytes()).unwrap()).unwrap();
        assert!(
            got.starts_with(&format!("Subject :{}\r\n s", "s".repeat(989))),
            "{got:?}"
        );
        // Blanks that outrun a line before a character of several octets, which a break
        // backs off from: one blank.
        let late = format!(
            "X-U: a\r\n{}{}\r\n\r\n",
            " ".repeat(996),
            "\u{20ac}".repeat(400)
        );
        let got = String::from_utf8(fold(late.as_bytes()).unwrap()).unwrap();
        assert!(got.starts_with("X-U: a\r\n \u{20ac}"), "{got:?}");
        assert!(got.split("\r\n").all(|l| l.len() <= 998), "{got:?}");
        // Trailing blanks are no place to fold: the line would be blanks alone.
        let trailing = format!(
            "X-T: {}{}\r\nY: y\r\n\r\n",
            "c".repeat(900),
            " ".repeat(300)
        );
        let got = String::from_utf8(fold(trailing.as_bytes()).unwrap()).unwrap();
        assert_eq!(got, format!("X-T: {}\r\nY: y\r\n\r\n", "c".repeat(900)));
        // And so is a run of blanks longer than a line, before the text of a line.
        let leading = format!("X-L: a\r\n{}b\r\n\r\n", " ".repeat(1200));
        let got = String::from_utf8(fold(leading.as_bytes()).unwrap()).unwrap();
        assert_eq!(got, "X-L: a\r\n b\r\n\r\n");
    }

    /// The rules of `text_lines`, octet by octet.
    fn text_lines_slowly(body: &[u8]) -> bool {
        let mut lines = body.split_inclusive(|&b| b == b'\n');
        !body.contains(&0)
            && lines.all(|l| {
                l.len() <= 1000
                    && l.ends_with(b"\r\n")
                    && !l[..l.len() - 2].iter().any(|&b| b == b'\r' || b == b'\n')
            })
    }

    /// The rules of `crlf_lines` with lines of any length (and NULs), octet by octet.
    fn crlf_lines_slowly(body: &[u8]) -> bool {
        body.split_inclusive(|&b| b == b'\n').all(|l| {
            let content = match l.strip_suffix(b"\r\n") {
                Some(c) => c,
                None if l.ends_with(b"\n") => return false,
                // The last line, without a line end, or with its CR alone.
                None => l.strip_suffix(b"\r").unwrap_or(l),
            };
            !content.iter().any(|&b| b == b'\r' || b == b'\n')
        })
    }

    proptest::proptest! {
        #[test]
        fn a_body_made_to_fit_is_text_with_the_same_words(
            pieces in proptest::collection::vec(
                (proptest::sample::select(vec!["a", "\u{e9}", " ", "\t", "\r\n", "\r\n "]),
                 1usize..700),
                0..12,
            ),
            ending in proptest::sample::select(vec!["", "\r", "\r\n"]),
        ) {
            let mut body: String = pieces.iter().map(|(p, n)| p.repeat(*n)).collect();
            body.push_str(ending);
            let out = fold(body.as_bytes()).unwrap_or_else(|| body.clone().into_bytes());
            proptest::prop_assert!(super::text_lines(std::iter::once(&out[..])),
                "{:?}", String::from_utf8_lossy(&out));
            let text = String::from_utf8(out).unwrap();
            // Only line ends and blanks come and go (and a run of blanks that outruns a line
            // in a header section may shrink): the words stay, in order.
            let words = |t: &str| t.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
            let joined = |t: &str| words(t).concat();
            proptest::prop_assert_eq!(joined(&text), joined(&body));
        }

        #[test]
        fn a_header_section_made_to_fit_unfolds_to_what_it_was(
            fields in proptest::collection::vec(
                (
                    proptest::collection::vec(
                        (proptest::sample::select(vec!["a", "\u{e9}", "\u{20ac}"]), 1usize..300),
                        1..12,
                    ),
                    proptest::sample::select(vec![" ", "\t", "  "]),
                    0usize..1100,
                ),
                1..4,
            ),
        ) {
            // Fields of words (each within a line) parted by blanks, some ending in a run of
            // blanks: folded only, never broken.
            let header: String = fields
                .iter()
                .enumerate()
                .map(|(i, (words, gap, trailing))| {
                    let words: Vec<String> = words.iter().map(|(w, n)| w.repeat(*n)).collect();
                    format!("X-{i}: {}{}\r\n", words.join(gap), " ".repeat(*trailing))
                })
                .collect();
            let body = format!("{header}\r\nbody\r\n");
            let out = fold(body.as_bytes()).unwrap_or_else(|| body.clone().into_bytes());
            let text = String::from_utf8(out).unwrap();
            let (head, rest) = text.split_once("\r\n\r\n").unwrap();
            proptest::prop_assert_eq!(rest, "body\r\n");
            for line in head.split("\r\n") {
                proptest::prop_assert!(line.len() <= 998);
                proptest::prop_assert!(!line.trim().is_empty(), "a line of blanks: {:?}", head);
            }
            // Unfolded, each field is as it was, but for the blanks at the end of a long one.
            let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", "\t");
            let want: Vec<&str> = header
                .split("\r\n")
                .filter(|l| !l.is_empty())
                .map(|l| if l.len() > 998 { l.trim_end() } else { l })
                .collect();
            proptest::prop_assert_eq!(unfolded.split("\r\n").collect::<Vec<_>>(), want);
        }

        #[test]
        fn text_lines_reads_any_cut_as_octet_by_octet(
            body in proptest::collection::vec(
                proptest::sample::select(vec![b'\r', b'\n', 0u8, b'x']),
                0..40,
            ),
            long in 990usize..1003,
            at in 0usize..40,
            cuts in proptest::collection::vec(0usize..1100, 0..4),
        ) {
            // Short random bodies, and each with a long line put in.
            let at = at.min(body.len());
            let mut long_body = body.clone();
            long_body.splice(at..at, std::iter::repeat_n(b'y', long));
            long_body.extend_from_slice(b"\r\n");
            for b in [body, long_body] {
                let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(b.len())).collect();
                cuts.sort_unstable();
                let mut pieces = Vec::new();
                let mut from = 0;
                for &c in &cuts {
                    pieces.push(&b[from..c]);
                    from = c;
                }
                pieces.push(&b[from..]);
                proptest::prop_assert_eq!(
                    super::crlf_lines(pieces.iter().copied(), None),
                    crlf_lines_slowly(&b),
                    "{:?} cut at {:?}, any length",
                    b,
                    cuts
                );
                proptest::prop_assert_eq!(
                    super::text_lines(pieces.iter().copied()),
                    text_lines_slowly(&b),
                    "{:?} cut at {:?}",
                    String::from_utf8_lossy(&b),
                    cuts
                );
            }
        }
    }

    /// A multipart message whose second part has `label` as its header fields.
    fn multipart(label: &str) -> String {
        format!(
            "Subject: a\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n\
             preamble\r\n--b\r\nContent-Type: text/plain\r\n\r\nfirst\r\n--b\r\n{label}\
             Content-Type: application/octet-stream\r\n\r\nsecond\r\n--b--\r\n"
        )
    }

    #[test]
    fn a_part_labelled_binary_is_not_text_however_the_label_is_written() {
        let text = |body: &str| is_text(|| std::iter::once(body.as_bytes()));
        for label in [
            "Content-Transfer-Encoding: binary\r\n",
            "content-transfer-encoding:\tbInArY\r\n",
            "Content-Transfer-Encoding:\r\n binary\r\n",
            "Content-Transfer-Encoding:\r\n\tbinary\r\n",
            "Content-Transfer-Encoding : binary\r\n",
            "Content-Transfer-Encoding: binary (raw octets)\r\n",
            "Content-Transfer-Encoding: (it is) binary\r\n",
        ] {
            assert!(!text(&multipart(label)), "{label:?}");
        }
        // The message's own header section.
        assert!(!text(
            "Subject: a\r\nContent-Transfer-Encoding:\r\n binary\r\n\r\nx\r\n"
        ));
        // A message inside the message.
        let inner = "Subject: in\r\nContent-Transfer-Encoding: binary\r\n\r\ny\r\n";
        let outer = format!(
            "Subject: a\r\nMIME-Version: 1.0\r\nContent-Type: message/rfc822\r\n\r\n{inner}"
        );
        assert!(!text(&outer));
        // Other encodings, and the words in a body or a preamble, are no label.
        assert!(text(&multipart("Content-Transfer-Encoding: 8bit\r\n")));
        assert!(text(&multipart("")));
        assert!(text(
            "Subject: a\r\n\r\nContent-Transfer-Encoding: binary\r\n"
        ));
        let in_preamble =
            multipart("").replace("preamble\r\n", "Content-Transfer-Encoding: binary\r\n");
        assert!(text(&in_preamble));
        let in_a_part_body =
            multipart("").replace("second\r\n", "Content-Transfer-Encoding: binary\r\n");
        assert!(text(&in_a_part_body));
    }

    #[test]
    fn messages_nested_without_end_are_read_in_bounded_stack_and_taken_for_binary() {
        // 100,000 messages inside each other (3 MB): read on a thread with a small stack, as
        // a core's, without recursion; past the nesting looked into, not taken for text.
        let mut body = "Subject: a\r\nMIME-Version: 1.0\r\n".to_owned();
        body.push_str(&"Content-Type: message/rfc822\r\n\r\n".repeat(100_000));
        body.push_str("Subject: binary\r\n\r\nx\r\n");
        let text = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || is_text(|| std::iter::once(body.as_bytes())))
            .unwrap()
            .join()
            .unwrap();
        assert!(!text);
    }

    #[test]
    fn a_utf8_orcpt_is_written_in_ascii_outside_smtputf8() {
        let r = Recipient {
            path: "u@x.test".into(),
            notify: Some(3),
            orcpt: Some("utf-8;j\u{f6}ran@\u{e9}x.test".into()),
        };
        assert_eq!(
            dsn_rcpt_params(&r, false),
            " NOTIFY=SUCCESS,FAILURE ORCPT=utf-8;j\\x{F6}ran@\\x{E9}x.test"
        );
        assert_eq!(
            dsn_rcpt_params(&r, true),
            " NOTIFY=SUCCESS,FAILURE ORCPT=utf-8;j\u{f6}ran@\u{e9}x.test"
        );
    }

    #[test]
    fn an_orcpt_too_long_in_its_ascii_form_is_left_out() {
        // 140 CJK characters: 420 octets as UTF-8, 1,120 as \x{4E2D}.
        let orcpt = format!("utf-8;{}@dsn.test", "\u{4e2d}".repeat(140));
        let r = Recipient {
            path: "r1@dsn.test".into(),
            notify: Some(3),
            orcpt: Some(orcpt.clone()),
        };
        assert_eq!(dsn_rcpt_params(&r, false), " NOTIFY=SUCCESS,FAILURE");
        assert_eq!(
            dsn_rcpt_params(&r, true),
            format!(" NOTIFY=SUCCESS,FAILURE ORCPT={orcpt}")
        );
    }
}
