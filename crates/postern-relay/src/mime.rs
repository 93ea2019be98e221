//! Just enough MIME (RFC 2045, 2046) to read a message's structure without a parse tree: the
//! header sections of its parts and of messages inside it, one line at a time, with the
//! nesting held in a bounded list rather than on the call stack. A message is the sender's:
//! parts nested without end must cost neither stack nor more than a pass over the bytes.

/// How deep parts and messages inside the message are followed.
pub const MAX_NESTING: usize = 32;

/// The fields of a header section that say how a part is made.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PartHeader {
    /// `Content-Type` type and subtype, lower-case ("text", "plain" when absent).
    pub media: Option<(String, String)>,
    /// The `boundary` parameter of a multipart `Content-Type`.
    pub boundary: Option<Vec<u8>>,
    /// `Content-Transfer-Encoding`, lower-case, without comments.
    pub encoding: Option<String>,
    /// The `report-type` parameter of a `multipart/report` (RFC 6522), lower-case.
    pub report_type: Option<String>,
}

impl PartHeader {
    /// Reads one header section (the fields, without the empty line that ends it).
    pub fn read(section: &[u8]) -> PartHeader {
        let mut header = PartHeader::default();
        for (name, value) in fields(section) {
            header.field(&name, &value);
        }
        header
    }

    fn field(&mut self, name: &[u8], value: &[u8]) {
        if name.eq_ignore_ascii_case(b"content-transfer-encoding") {
            let value = without_comments(value);
            self.encoding = Some(String::from_utf8_lossy(value.trim_ascii()).to_ascii_lowercase());
        } else if name.eq_ignore_ascii_case(b"content-type") {
            let value = without_comments(value);
            let (media, params) = match value.iter().position(|&b| b == b';') {
                Some(at) => (&value[..at], &value[at + 1..]),
                None => (&value[..], &b""[..]),
            };
            let media = String::from_utf8_lossy(media.trim_ascii()).to_ascii_lowercase();
            let Some((kind, sub)) = media.split_once('/') else {
                return;
            };
            let (kind, sub) = (kind.trim().to_owned(), sub.trim().to_owned());
            self.boundary = (kind == "multipart")
                .then(|| parameter(params, b"boundary"))
                .flatten()
                .filter(|b| !b.is_empty());
            self.report_type = (kind == "multipart" && sub == "report")
                .then(|| parameter(params, b"report-type"))
                .flatten()
                .map(|t| String::from_utf8_lossy(&t).to_ascii_lowercase());
            self.media = Some((kind, sub));
        }
    }

    /// Whether the part is a message of its own (`message/rfc822`, `message/global`), whose
    /// body starts with a header section.
    pub fn is_message(&self) -> bool {
        self.media
            .as_ref()
            .is_some_and(|(kind, sub)| kind == "message" && (sub == "rfc822" || sub == "global"))
    }

    /// Whether the part is labelled `Content-Transfer-Encoding: binary`.
    pub fn is_binary(&self) -> bool {
        self.encoding.as_deref() == Some("binary")
    }
}

/// The fields of a header section, unfolded (RFC 5322 2.2.3): name (blanks before the colon
/// dropped) and value. Lines end in CR LF or LF; lines that are no field are skipped.
pub fn fields(section: &[u8]) -> impl Iterator<Item = (Vec<u8>, Vec<u8>)> + '_ {
    let mut lines = section
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .peekable();
    std::iter::from_fn(move || loop {
        let line = lines.next()?;
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = line[..colon].trim_ascii_end().to_vec();
        let mut value = line[colon + 1..].to_vec();
        while let Some(next) =
            lines.next_if(|l| l.first().is_some_and(|&b| b == b' ' || b == b'\t'))
        {
            value.extend_from_slice(next);
        }
        if name.is_empty() || name.iter().any(|&b| b <= b' ' || b >= 0x7f) {
            continue;
        }
        return Some((name, value));
    })
}

/// A field value without its comments (RFC 5322 3.2.2: nested, with quoted pairs; not inside
/// quoted strings).
pub fn without_comments(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    let mut depth = 0usize;
    let mut quoted = false;
    let mut escaped = false;
    for &b in value {
        if escaped {
            escaped = false;
            if depth == 0 {
                out.push(b);
            }
            continue;
        }
        match b {
            b'\\' if depth > 0 || quoted => {
                escaped = true;
                if depth == 0 {
                    out.push(b);
                }
            }
            b'"' if depth == 0 => {
                quoted = !quoted;
                out.push(b);
            }
            b'(' if !quoted => depth += 1,
            b')' if depth > 0 => depth -= 1,
            _ if depth > 0 => {}
            _ => out.push(b),
        }
    }
    out
}

/// The value of parameter `name` in `params` (`; a=b; c="d e"`), unquoted. A value written
/// in RFC 2231's forms is put back together: extended (`name*=us-ascii'en'a%20b`, its octets
/// percent-encoded after a charset and a language) or cut in numbered sections (`name*0=ab;
/// name*1*=%63d`, each section plain or extended), as some mailers write a long boundary. The
/// plain form comes first when both are there.
fn parameter(params: &[u8], name: &[u8]) -> Option<Vec<u8>> {
    let mut extended = None;
    let mut sections: Vec<(usize, Vec<u8>)> = Vec::new();
    for (attribute, value) in parameters(params) {
        if attribute.eq_ignore_ascii_case(name) {
            return Some(value);
        }
        let Some(rest) = attribute
            .get(..name.len())
            .filter(|head| head.eq_ignore_ascii_case(name))
            .and_then(|_| attribute[name.len()..].strip_prefix(b"*"))
        else {
            continue;
        };
        if rest.is_empty() {
            extended.get_or_insert_with(|| percent_decoded(without_charset(&value)));
            continue;
        }
        let (digits, encoded) = match rest.strip_suffix(b"*") {
            Some(digits) => (digits, true),
            None => (rest, false),
        };
        // Section numbers are decimal without leading zeros (RFC 2231 3); a message may hold
        // any, but a value needs few: past MAX_SECTIONS they are not read.
        let number = std::str::from_utf8(digits)
            .ok()
            .filter(|d| !d.is_empty() && (d == &"0" || !d.starts_with('0')))
            .and_then(|d| d.parse::<usize>().ok())
            .filter(|&n| n < MAX_SECTIONS);
        let Some(number) = number else { continue };
        if sections.iter().any(|(n, _)| *n == number) {
            continue;
        }
        let value = match (encoded, number) {
            (false, _) => value,
            (true, 0) => percent_decoded(without_charset(&value)),
            (true, _) => percent_decoded(&value),
        };
        sections.push((number, value));
    }
    if let Some(value) = extended {
        return Some(value);
    }
    // The sections are taken from 0 up to the first one missing.
    sections.sort_unstable_by_key(|(n, _)| *n);
    let mut value = Vec::new();
    for (expected, (number, section)) in sections.into_iter().enumerate() {
        if number != expected {
            break;
        }
        value.extend_from_slice(&section);
    }
    (!value.is_empty()).then_some(value)
}

/// The most sections of one RFC 2231 parameter value that are read.
const MAX_SECTIONS: usize = 64;

/// An extended value's octets, after its `charset'language'` (RFC 2231 4); all of it when
/// those are missing.
fn without_charset(value: &[u8]) -> &[u8] {
    let mut quotes = value.iter().enumerate().filter(|(_, &b)| b == b'\'');
    match (quotes.next(), quotes.next()) {
        (Some(_), Some((second, _))) => &value[second + 1..],
        _ => value,
    }
}

/// `value` with its `%XX` escapes turned into octets (a `%` not followed by two hex digits
/// stays as it is).
fn percent_decoded(value: &[u8]) -> Vec<u8> {
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        let escape = (value[i] == b'%')
            .then(|| Some((hex(*value.get(i + 1)?)?, hex(*value.get(i + 2)?)?)))
            .flatten();
        match escape {
            Some((high, low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            None => {
                out.push(value[i]);
                i += 1;
            }
        }
    }
    out
}

/// The parameters of `params` (`; a=b; c="d e"`) in order: attribute and unquoted value.
fn parameters(params: &[u8]) -> impl Iterator<Item = (&[u8], Vec<u8>)> {
    let mut rest = params;
    std::iter::from_fn(move || loop {
        rest = rest.trim_ascii_start();
        let eq = rest.iter().position(|&b| b == b'=' || b == b';')?;
        let (attribute, after) = (rest[..eq].trim_ascii(), &rest[eq..]);
        if after[0] == b';' {
            rest = &after[1..];
            continue;
        }
        let after = after[1..].trim_ascii_start();
        let (value, next) = if after.first() == Some(&b'"') {
            let mut value = Vec::new();
            let mut i = 1;
            let mut escaped = false;
            while let Some(&b) = after.get(i) {
                i += 1;
                match b {
                    _ if escaped => {
                        escaped = false;
                        value.push(b);
                    }
                    b'\\' => escaped = true,
                    b'"' => break,
                    _ => value.push(b),
                }
            }
            (value, &after[i.min(after.len())..])
        } else {
            let end = after
                .iter()
                .position(|&b| b == b';' || b.is_ascii_whitespace())
                .unwrap_or(after.len());
            (after[..end].to_vec(), &after[end..])
        };
        // What follows the value up to the next `;` is no parameter; nothing is left when
        // there is no `;`.
        rest = match next.iter().position(|&b| b == b';') {
            Some(semicolon) => &next[semicolon + 1..],
            None => &[],
        };
        return Some((attribute, value));
    })
}

/// Where a line stands against the open multipart boundaries: `Some((i, closing))` when it
/// is the delimiter (`--boundary`) or, with `closing`, the close delimiter (`--boundary--`)
/// of `open[i]`, transport padding allowed after it (RFC 2046 5.1.1).
fn delimiter(line: &[u8], open: &[Frame]) -> Option<(usize, bool)> {
    let rest = line.strip_prefix(b"--")?;
    open.iter().enumerate().rev().find_map(|(i, frame)| {
        let Frame::Multipart(boundary, _) = frame else {
            return None;
        };
        let after = rest.strip_prefix(boundary.as_slice())?;
        match after.strip_prefix(b"--") {
            Some(padding) if padding.trim_ascii().is_empty() => Some((i, true)),
            _ if after.trim_ascii().is_empty() => Some((i, false)),
            _ => None,
        }
    })
}

/// The lines of `data`: where each starts, where the next starts, and the line without its
/// line end (LF or CR LF).
fn lines(data: &[u8]) -> impl Iterator<Item = (usize, usize, &[u8])> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        if at >= data.len() {
            return None;
        }
        let start = at;
        let end = data[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(data.len(), |n| at + n + 1);
        let line = &data[start..end];
        let bare = line
            .strip_suffix(b"\n")
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .unwrap_or(line);
        at = end;
        Some((start, end, bare))
    })
}

/// What encloses the line being read.
enum Frame {
    /// A multipart's boundary, and whether it is a `multipart/digest`, whose parts are
    /// messages unless their header says otherwise (RFC 2046 5.1.5).
    Multipart(Vec<u8>, bool),
    Message,
}

/// Whether a part of `message` (or of a message inside it) is labelled
/// `Content-Transfer-Encoding: binary`. Structure nested deeper than [`MAX_NESTING`] counts
/// as labelled: it is not followed, so what it holds is not known to be text.
pub fn labelled_binary(message: &[u8]) -> bool {
    let mut open: Vec<Frame> = Vec::new();
    // The header section being read, from where it starts; None in a body.
    let mut header_from = Some(0usize);
    for (at, end, bare) in lines(message) {
        match header_from {
            // A part may be header fields alone (RFC 2046 5.1.1: its empty line is there only
            // before a body): a delimiter ends its header section, and is one.
            Some(from) if !bare.is_empty() && delimiter(bare, &open).is_some() => {
                if PartHeader::read(&message[from..at]).is_binary() {
                    return true;
                }
                let (i, closing) = delimiter(bare, &open).unwrap_or_default();
                open.truncate(if closing { i } else { i + 1 });
                header_from = (!closing).then_some(end);
            }
            Some(from) if bare.is_empty() => {
                let header = PartHeader::read(&message[from..at]);
                if header.is_binary() {
                    return true;
                }
                // A part of a digest without a Content-Type is a message/rfc822.
                let in_digest = matches!(open.last(), Some(Frame::Multipart(_, true)));
                let message_part = header.is_message() || (in_digest && header.media.is_none());
                header_from = None;
                if let Some(boundary) = header.boundary {
                    let digest = header
                        .media
                        .as_ref()
                        .is_some_and(|(kind, sub)| kind == "multipart" && sub == "digest");
                    open.push(Frame::Multipart(boundary, digest));
                } else if message_part {
                    open.push(Frame::Message);
                    header_from = Some(end);
                }
                if open.len() > MAX_NESTING {
                    return true;
                }
            }
            Some(_) => {}
            None => {
                if let Some((i, closing)) = delimiter(bare, &open) {
                    // What was open inside that multipart ends with it.
                    open.truncate(if closing { i } else { i + 1 });
                    if !closing {
                        header_from = Some(end);
                    }
                }
            }
        }
    }
    // A header section that runs to the end.
    header_from.is_some_and(|from| PartHeader::read(&message[from..]).is_binary())
}

/// The parts of a multipart body, for each: where its header section starts, where its body
/// starts (after the empty line; its end when it has none) and where it ends (before the line
/// end that precedes the next delimiter). Only the delimiters of `boundary` count, not those
/// of multiparts inside the parts. A last part without its close delimiter (a multipart cut
/// short) runs to the end of `body`, as other MIME readers take it.
pub fn parts(body: &[u8], boundary: &[u8]) -> Vec<(usize, usize, usize)> {
    let mut found = Vec::new();
    first_part(body, boundary, |part| {
        found.push(part);
        false
    });
    found
}

/// The first part of a multipart body (as [`parts`] gives them) for which `wanted` says
/// true, reading no further than it: a body of many parts costs no list of them all.
pub fn first_part(
    body: &[u8],
    boundary: &[u8],
    mut wanted: impl FnMut((usize, usize, usize)) -> bool,
) -> Option<(usize, usize, usize)> {
    let mut offer = |part: (usize, usize, usize)| wanted(part).then_some(part);
    let open = [Frame::Multipart(boundary.to_vec(), false)];
    // The part being read: its start, and its body's start once known.
    let mut current: Option<(usize, Option<usize>)> = None;
    let mut line_start_before = 0usize;
    for (at, end, bare) in lines(body) {
        if let Some((_, closing)) = delimiter(bare, &open) {
            if let Some((start, body_start)) = current.take() {
                // The line end before the delimiter belongs to it (RFC 2046 5.1.1).
                let part_end = line_start_before.max(start);
                let part = (
                    start,
                    body_start.unwrap_or(part_end).min(part_end),
                    part_end,
                );
                if let Some(part) = offer(part) {
                    return Some(part);
                }
            }
            if closing {
                return None;
            }
            current = Some((end, None));
        } else if let Some((_, body_start @ None)) = current.as_mut() {
            if bare.is_empty() {
                *body_start = Some(end);
            }
        }
        // Where this line's own line end starts: the end of what precedes the next line.
        line_start_before = at + bare.len();
    }
    // No close delimiter: the last part runs to the end.
    let (start, body_start) = current?;
    let end = body.len().max(start);
    offer((start, body_start.unwrap_or(end).min(end), end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_s_parts_without_a_type_are_messages_whose_header_is_read() {
        // RFC 2046 5.1.5: in a multipart/digest a part without Content-Type is message/rfc822,
        // so the header section that starts its body is a message's, and its label counts.
        let digest = |part_header: &str| {
            format!(
                "Content-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n{part_header}\r\n\
                 Subject: inner\r\nContent-Transfer-Encoding: binary\r\n\r\nbody\r\n--d--\r\n"
            )
        };
        assert!(labelled_binary(digest("").as_bytes()));
        // With a type of its own the part is that type: its body is text, not a header.
        assert!(!labelled_binary(
            digest("Content-Type: text/plain\r\n").as_bytes()
        ));
        // Outside a digest a part without a type is text/plain (RFC 2046 5.1.1).
        let mixed = digest("").replace("multipart/digest", "multipart/mixed");
        assert!(!labelled_binary(mixed.as_bytes()));
    }

    #[test]
    fn a_part_of_header_fields_alone_ends_at_the_next_delimiter() {
        // The first part is a message/rfc822 without a body; the second is text whose words
        // only look like a header field: no part is labelled binary.
        let message = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\
              Content-Type: message/rfc822\r\n--b\r\nX-Part: 2\r\n\r\n\
              Content-Transfer-Encoding: binary\r\n\r\ntext\r\n--b--\r\n";
        assert!(!labelled_binary(message));
        // A label in a part of fields alone counts, before a delimiter or a close one.
        let labelled = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\
              Content-Transfer-Encoding: binary\r\n--b\r\n\r\ntext\r\n--b--\r\n";
        assert!(labelled_binary(labelled));
        let last = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\ntext\r\n\
              --b\r\nContent-Transfer-Encoding: binary\r\n--b--\r\nepilogue\r\n";
        assert!(labelled_binary(last));
        // After the close delimiter the epilogue is read as a body, not as fields.
        let epilogue = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nX: 1\r\n\
              --b--\r\nContent-Transfer-Encoding: binary\r\n\r\n";
        assert!(!labelled_binary(epilogue));
    }

    #[test]
    fn header_fields_unfold_and_lose_their_comments() {
        let h = PartHeader::read(
            b"Content-Type: multipart/mixed;\r\n boundary=\"a b\" (the (nested) one)\r\n\
              Content-Transfer-Encoding : (raw) Binary\r\n",
        );
        assert_eq!(h.media, Some(("multipart".into(), "mixed".into())));
        assert_eq!(h.boundary.as_deref(), Some(&b"a b"[..]));
        assert!(h.is_binary());
        let h = PartHeader::read(b"content-type: Message/RFC822\n");
        assert!(h.is_message() && !h.is_binary());
        let h = PartHeader::read(b"Content-Type: text/plain; charset=\"(not a comment)\"\r\n");
        assert_eq!(h.media, Some(("text".into(), "plain".into())));
    }

    #[test]
    fn parameters_are_found_quoted_or_not() {
        assert_eq!(
            parameter(b" a=1; boundary=xyz", b"boundary"),
            Some(b"xyz".to_vec())
        );
        assert_eq!(
            parameter(b"; BOUNDARY = \"q\\\"uote;d\" ; c=d", b"boundary"),
            Some(b"q\"uote;d".to_vec())
        );
        assert_eq!(parameter(b"a=\"x;boundary=no\"", b"boundary"), None);
        assert_eq!(parameter(b"", b"boundary"), None);
        assert_eq!(parameter(b";;", b"boundary"), None);
    }

    #[test]
    fn parameters_in_rfc_2231_forms_are_put_back_together() {
        let found = |params: &[u8]| parameter(params, b"boundary");
        assert_eq!(
            found(b"; boundary*=us-ascii'en'a%20b%3Bc"),
            Some(b"a b;c".to_vec())
        );
        assert_eq!(found(b"; boundary*=''%41"), Some(b"A".to_vec()));
        assert_eq!(found(b"; boundary*=x%zz%4"), Some(b"x%zz%4".to_vec()));
        // Sections come in any order, plain or encoded, and stop at the first gap.
        assert_eq!(
            found(
                b"; BOUNDARY*1*=%63d; boundary*0*=utf-8''a%62; boundary*2=\"e f\"; boundary*4=no"
            ),
            Some(b"abcde f".to_vec())
        );
        assert_eq!(found(b"; boundary*1=b; boundary*2=c"), None);
        // A repeated section keeps its first value; a number with a leading zero is none.
        assert_eq!(
            found(b"; boundary*0=a; boundary*0=x; boundary*01=y; boundary*1=b"),
            Some(b"ab".to_vec())
        );
        // The plain form wins over the others; other parameters are left alone.
        assert_eq!(
            found(b"; boundary*0=x; boundary=plain; boundary*=y"),
            Some(b"plain".to_vec())
        );
        assert_eq!(found(b"; boundaryx*0=a; boundar*0=b"), None);
        assert_eq!(found(b"; boundary*64=a"), None);
        let header = PartHeader::read(
            b"Content-Type: multipart/report;\r\n boundary*0=\"long-\";\r\n boundary*1=\"one\";\r\n report-type*=''delivery-status",
        );
        assert_eq!(header.boundary.as_deref(), Some(&b"long-one"[..]));
        assert_eq!(header.report_type.as_deref(), Some("delivery-status"));
    }

    #[test]
    fn parts_are_found_at_their_own_boundary_only() {
        let body = b"preamble\r\n--b\r\nA: 1\r\n\r\none\r\n--b\r\nContent-Type: multipart/x; boundary=c\r\n\r\n--c\r\n\r\ninner\r\n--c--\r\n--b--\r\nepilogue\r\n";
        let parts = parts(body, b"b");
        assert_eq!(parts.len(), 2, "{parts:?}");
        let (start, body_start, end) = parts[0];
        assert_eq!(&body[start..body_start], b"A: 1\r\n\r\n");
        assert_eq!(&body[body_start..end], b"one");
        assert!(body[parts[1].1..parts[1].2].ends_with(b"--c--"));
    }

    #[test]
    fn a_last_part_without_its_close_delimiter_runs_to_the_end() {
        let body = b"--b\r\nA: 1\r\n\r\none\r\n--b\r\nB: 2\r\n\r\ntwo, cut short";
        let parts = parts(body, b"b");
        assert_eq!(parts.len(), 2, "{parts:?}");
        let (start, body_start, end) = parts[1];
        assert_eq!(&body[start..body_start], b"B: 2\r\n\r\n");
        assert_eq!(&body[body_start..end], b"two, cut short");
        // And the first wanted part stops the reading there.
        let mut seen = 0;
        let first = first_part(body, b"b", |_| {
            seen += 1;
            true
        });
        assert_eq!((first, seen), (Some(parts[0]), 1));
    }
}
