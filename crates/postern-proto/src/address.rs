//! RFC 5321 paths: mailboxes, domains, address literals, the null path and Postmaster.
//!
//! Everything borrows from the command line. The local part is kept as written (a quoted
//! local part keeps its quotes), so encoding gives back the same text. Non-ASCII is accepted
//! by the grammar (RFC 6531) and reported by [`Mailbox::is_ascii`]; whether it is allowed
//! depends on the transaction, which the session decides.

use core::fmt;
use core::net::{Ipv4Addr, Ipv6Addr};

use crate::limits::{MAX_DOMAIN, MAX_PATH};

/// The part of a mailbox after the `@`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Host<'a> {
    /// A domain name (A-labels or, with SMTPUTF8, U-labels).
    Domain(&'a str),
    /// `[192.0.2.1]`.
    Ipv4(Ipv4Addr),
    /// `[IPv6:2001:db8::1]`.
    Ipv6(Ipv6Addr),
}

impl fmt::Display for Host<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Domain(d) => f.write_str(d),
            Host::Ipv4(a) => write!(f, "[{a}]"),
            Host::Ipv6(a) => write!(f, "[IPv6:{a}]"),
        }
    }
}

/// `local-part@host`. Two are equal when their addresses are: the source route is no part of
/// one (it is ignored, and not written back).
#[derive(Clone, Copy, Debug)]
pub struct Mailbox<'a> {
    /// The local part as written: a dot-string, or a quoted string with its quotes.
    pub local: &'a str,
    /// The domain or address literal.
    pub host: Host<'a>,
    /// The source route written before it (accepted and ignored) held UTF-8: the path
    /// needs SMTPUTF8 as a UTF-8 mailbox does (RFC 6531 3.3).
    pub route_utf8: bool,
}

impl Mailbox<'_> {
    /// Whether the path is all ASCII (otherwise it needs SMTPUTF8), its source route too.
    pub fn is_ascii(&self) -> bool {
        !self.route_utf8
            && self.local.is_ascii()
            && match self.host {
                Host::Domain(d) => d.is_ascii(),
                _ => true,
            }
    }
}

impl PartialEq for Mailbox<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.local == other.local && self.host == other.host
    }
}

impl Eq for Mailbox<'_> {}

impl std::hash::Hash for Mailbox<'_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.local.hash(state);
        self.host.hash(state);
    }
}

impl fmt::Display for Mailbox<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.host)
    }
}

/// The argument of MAIL FROM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReversePath<'a> {
    /// `<>`: bounces and other notifications.
    Null,
    /// A sender mailbox.
    Mailbox(Mailbox<'a>),
}

/// The argument of RCPT TO.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ForwardPath<'a> {
    /// `<Postmaster>` without a domain (RFC 5321 4.5.1).
    Postmaster,
    /// A recipient mailbox.
    Mailbox(Mailbox<'a>),
}

impl fmt::Display for ReversePath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReversePath::Null => f.write_str("<>"),
            ReversePath::Mailbox(m) => write!(f, "<{m}>"),
        }
    }
}

impl fmt::Display for ForwardPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ForwardPath::Postmaster => f.write_str("<Postmaster>"),
            ForwardPath::Mailbox(m) => write!(f, "<{m}>"),
        }
    }
}

/// What was wrong with a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not of the RFC 5321 Path grammar.
    #[error("bad address syntax")]
    Syntax,
    /// Domain over 255 octets.
    #[error("domain too long")]
    DomainTooLong,
    /// Path over 256 octets.
    #[error("path too long")]
    PathTooLong,
}

/// Parses `<...>` at the start of `s`; returns the mailbox (None for `<>`) and the rest.
fn parse_path(s: &str) -> Result<(Option<Mailbox<'_>>, &str), PathError> {
    let b = s.as_bytes();
    if b.first() != Some(&b'<') {
        return Err(PathError::Syntax);
    }
    let mut pos = 1;
    if b.get(pos) == Some(&b'>') {
        return Ok((None, &s[2..]));
    }
    // A source route (`@a,@b:`) is accepted and ignored (RFC 5321 4.1.2, C.).
    let mut route_utf8 = false;
    if b.get(pos) == Some(&b'@') {
        let colon = memchr::memchr(b':', &b[pos..]).ok_or(PathError::Syntax)? + pos;
        for hop in s[pos..colon].split(',') {
            let domain = hop.strip_prefix('@').ok_or(PathError::Syntax)?;
            check_domain(domain)?;
        }
        route_utf8 = !s[pos..colon].is_ascii();
        pos = colon + 1;
    }
    let local_end = local_part_end(b, pos)?;
    // A local part over RFC 5321's 64 octets is taken within the path's limit: 4.5.3.1 asks
    // for no limits where possible, and return paths that carry an address of their own
    // (SRS, VERP, a mailing list's bounce tags) pass 64.
    let local = &s[pos..local_end];
    if b.get(local_end) != Some(&b'@') {
        return Err(PathError::Syntax);
    }
    let host_start = local_end + 1;
    // The host ends at its own last byte: a `]` for a literal, the domain grammar otherwise.
    let host_end = if b.get(host_start) == Some(&b'[') {
        b[host_start..]
            .iter()
            .position(|&c| c == b']')
            .ok_or(PathError::Syntax)?
            + host_start
            + 1
    } else {
        host_start + scan_domain(&b[host_start..])?
    };
    if b.get(host_end) != Some(&b'>') {
        return Err(PathError::Syntax);
    }
    let close = host_end;
    let host = match b[host_start] {
        b'[' => parse_host(&s[host_start..host_end])?,
        _ => Host::Domain(&s[host_start..host_end]),
    };
    if close + 1 > MAX_PATH {
        return Err(PathError::PathTooLong);
    }
    let mailbox = Mailbox {
        local,
        host,
        route_utf8,
    };
    Ok((Some(mailbox), &s[close + 1..]))
}

/// Parses the path of MAIL FROM; returns it and the rest of the line.
pub fn parse_reverse_path(s: &str) -> Result<(ReversePath<'_>, &str), PathError> {
    let (mailbox, rest) = parse_path(s)?;
    Ok((
        mailbox.map_or(ReversePath::Null, ReversePath::Mailbox),
        rest,
    ))
}

/// Parses the path of RCPT TO; returns it and the rest of the line.
pub fn parse_forward_path(s: &str) -> Result<(ForwardPath<'_>, &str), PathError> {
    const POSTMASTER: &str = "<postmaster>";
    if let Some(rest) = strip_prefix_ignore_case(s, POSTMASTER) {
        return Ok((ForwardPath::Postmaster, rest));
    }
    match parse_path(s)? {
        (Some(m), rest) => Ok((ForwardPath::Mailbox(m), rest)),
        (None, _) => Err(PathError::Syntax),
    }
}

/// Parses a whole mailbox `local@host` with no angle brackets (used for stored addresses).
pub fn parse_mailbox(s: &str) -> Result<Mailbox<'_>, PathError> {
    let b = s.as_bytes();
    let local_end = local_part_end(b, 0)?;
    if b.get(local_end) != Some(&b'@') {
        return Err(PathError::Syntax);
    }
    let local = &s[..local_end];
    // The whole path, angle brackets included, within RFC 5321's 256 (a local part over 64
    // is taken, as in `parse_path`).
    if s.len() + 2 > MAX_PATH {
        return Err(PathError::PathTooLong);
    }
    Ok(Mailbox {
        local,
        host: parse_host(&s[local_end + 1..])?,
        route_utf8: false,
    })
}

/// The end of a dot-string or quoted-string local part starting at `pos`.
fn local_part_end(b: &[u8], pos: usize) -> Result<usize, PathError> {
    if b.get(pos) == Some(&b'"') {
        let mut i = pos + 1;
        loop {
            match b.get(i) {
                None => return Err(PathError::Syntax),
                Some(b'"') => return Ok(i + 1),
                Some(b'\\') => match b.get(i + 1) {
                    Some(32..=126) => i += 2,
                    _ => return Err(PathError::Syntax),
                },
                Some(&c) if c == 32 || c == 33 || (35..=126).contains(&c) || c >= 0x80 => i += 1,
                Some(_) => return Err(PathError::Syntax),
            }
        }
    }
    let mut i = pos;
    let mut atom_len = 0;
    while let Some(&c) = b.get(i) {
        if c == b'.' {
            if atom_len == 0 {
                return Err(PathError::Syntax);
            }
            atom_len = 0;
        } else if is_atext(c) {
            atom_len += 1;
        } else {
            break;
        }
        i += 1;
    }
    if atom_len == 0 {
        return Err(PathError::Syntax);
    }
    Ok(i)
}

/// Byte classes for the hot loops: bit 0 atext (RFC 5322, plus UTF-8 per RFC 6531), bit 1 a
/// letter, digit or UTF-8 byte of a domain label.
const ATEXT: u8 = 1;
const LABEL: u8 = 2;
static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        let alnum = b.is_ascii_alphanumeric() || b >= 0x80;
        let special = matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'/'
                | b'='
                | b'?'
                | b'^'
                | b'_'
                | b'`'
                | b'{'
                | b'|'
                | b'}'
                | b'~'
        );
        t[c] = if alnum {
            ATEXT | LABEL
        } else if special {
            ATEXT
        } else {
            0
        };
        c += 1;
    }
    t
};

/// RFC 5322 atext, plus UTF-8 (RFC 6531).
fn is_atext(c: u8) -> bool {
    CLASS[usize::from(c)] & ATEXT != 0
}

/// Parses a domain or an address literal.
pub fn parse_host(s: &str) -> Result<Host<'_>, PathError> {
    if let Some(inner) = s.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or(PathError::Syntax)?;
        if let Some(v6) = strip_prefix_ignore_case(inner, "IPv6:") {
            if !is_rfc5321_ipv6(v6) {
                return Err(PathError::Syntax);
            }
            // An IPv4 tail may have leading zeros, which `Ipv6Addr`'s parser refuses.
            let value = match v6.rsplit_once(':') {
                Some((head, tail)) if tail.contains('.') => {
                    let v4 = parse_ipv4_literal(tail).ok_or(PathError::Syntax)?;
                    format!("{head}:{v4}").parse()
                }
                _ => v6.parse(),
            };
            return value.map(Host::Ipv6).map_err(|_| PathError::Syntax);
        }
        return parse_ipv4_literal(inner)
            .map(Host::Ipv4)
            .ok_or(PathError::Syntax);
    }
    check_domain(s)?;
    Ok(Host::Domain(s))
}

/// RFC 5321 4.1.3 `IPv4-address-literal`: four `Snum`, each one to three digits worth 0 to
/// 255 (so `010` is ten; `Ipv4Addr`'s parser refuses leading zeros).
fn parse_ipv4_literal(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if !(1..=3).contains(&part.len()) || !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        *octet = part.parse().ok()?;
    }
    parts.next().is_none().then_some(Ipv4Addr::from(octets))
}

/// The shape RFC 5321 4.1.3 gives an IPv6 address literal, which is narrower than RFC 4291's:
/// eight groups of one to four hex digits, or six and an IPv4 address; with `::`, at most six
/// groups besides it (four besides it and the IPv4 address), so that `::` stands for at least
/// two groups. The value itself is then read by `Ipv6Addr`'s parser.
fn is_rfc5321_ipv6(s: &str) -> bool {
    fn groups(part: &str, v4_allowed: bool) -> Option<usize> {
        if part.is_empty() {
            return Some(0);
        }
        let mut n = 0;
        let mut fields = part.split(':').peekable();
        while let Some(f) = fields.next() {
            let last = fields.peek().is_none();
            if last && v4_allowed && f.contains('.') {
                parse_ipv4_literal(f)?;
                n += 2;
            } else if (1..=4).contains(&f.len()) && f.bytes().all(|c| c.is_ascii_hexdigit()) {
                n += 1;
            } else {
                return None;
            }
        }
        Some(n)
    }
    match s.split_once("::") {
        None => groups(s, true) == Some(8),
        Some((left, right)) => {
            if right.contains("::") {
                return false;
            }
            match (groups(left, false), groups(right, true)) {
                (Some(l), Some(r)) => l + r <= 6,
                _ => false,
            }
        }
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// Validates the RFC 5321 Domain at the start of `b` (dot-separated labels of letters, digits
/// and inner hyphens, or UTF-8) in one pass, and returns its length: it ends at the first byte
/// that cannot be part of a domain.
fn scan_domain(b: &[u8]) -> Result<usize, PathError> {
    let mut label_len = 0usize;
    let mut prev = b'.';
    let mut i = 0;
    let mut utf8 = false;
    // An ASCII label of the form `xn--...` claims to be an A-label: it must be one (RFC 5890
    // 2.3.2.1), decoding to a U-label that encodes back to it.
    let mut a_label = false;
    // A U-label's length limit is its A-label's (RFC 5890 4.2), checked by `check_idna`;
    // 63 octets here is the limit of an ASCII label only.
    let mut label_utf8 = false;
    while let Some(&c) = b.get(i) {
        utf8 |= c >= 0x80;
        label_utf8 |= c >= 0x80;
        if CLASS[usize::from(c)] & LABEL != 0 || (c == b'-' && label_len != 0) {
            if label_len == 0 {
                a_label |= b
                    .get(i..i + 4)
                    .is_some_and(|p| p.eq_ignore_ascii_case(b"xn--"));
            }
            label_len += 1;
        } else if c == b'.' && label_len != 0 && (label_len <= 63 || label_utf8) && prev != b'-' {
            label_len = 0;
            label_utf8 = false;
        } else if c == b'.' || c == b'-' {
            return Err(PathError::Syntax);
        } else {
            break;
        }
        prev = c;
        i += 1;
    }
    if label_len == 0 || (label_len > 63 && !label_utf8) || prev == b'-' {
        return Err(PathError::Syntax);
    }
    if i > MAX_DOMAIN {
        return Err(PathError::DomainTooLong);
    }
    if utf8 {
        // UTF-8 bytes end only where a character ends, so the prefix is still text.
        let domain = std::str::from_utf8(&b[..i]).map_err(|_| PathError::Syntax)?;
        check_idna(domain)?;
    } else if a_label {
        // Each A-label on its own: the name as a whole is taken as before, all ASCII, and
        // IDNA's rule for names with right-to-left labels (every label then starts with a
        // letter) would refuse reverse-DNS names in use under such top-level domains
        // (`41-33-12-9.dyn.example.xn--mgbaam7a8h`).
        let domain = std::str::from_utf8(&b[..i]).map_err(|_| PathError::Syntax)?;
        for label in domain.split('.') {
            if label
                .get(..4)
                .is_some_and(|p| p.eq_ignore_ascii_case("xn--"))
            {
                check_idna(label)?;
            }
        }
    }
    Ok(i)
}

/// A domain with UTF-8 labels (RFC 6531 3.3) must be a domain name IDNA can carry: its
/// U-labels convert to A-labels under UTS #46 with the STD3 rules and DNS lengths. That
/// keeps out what no host name holds: spaces (U+00A0), controls (U+0085), line and paragraph
/// separators, bidirectional overrides.
///
/// UTS #46 also maps some characters silently: it drops the invisible ones (zero-width
/// space, soft hyphen, word joiner, byte order mark) and folds others (full-width letters).
/// IDNA2008 allows none of them in a U-label, and a name that reads differently from what
/// was logged could deceive, so each U-label must come back from its A-label unchanged (but
/// for case). Labels are each an LDH label or a U-label (RFC 6531 3.3), so a name may mix
/// U-labels with A-labels: an ASCII label is compared in its ASCII form.
fn check_idna(domain: &str) -> Result<(), PathError> {
    // Hyphens in the third and fourth places are checked in U-labels only (below): an LDH
    // label beside them (`ab--cd`) is taken as it is in a name all ASCII.
    let ascii = to_a_labels(domain).map_err(|_| PathError::Syntax)?;
    let (unicode, back) = idna::domain_to_unicode(&ascii);
    if back.is_err() {
        return Err(PathError::Syntax);
    }
    let (mut given, mut ascii, mut unicode) =
        (domain.split('.'), ascii.split('.'), unicode.split('.'));
    loop {
        match (given.next(), ascii.next(), unicode.next()) {
            (None, None, None) => return Ok(()),
            (Some(g), Some(a), Some(u)) => {
                // Case compared one character at a time, as UTS #46 maps it: no final sigma
                // for a word's end, and Cherokee (which it maps to its capitals) in either
                // case. A capital must be its small letter's own: a sign that lower-cases to
                // a letter (the Ohm sign to an omega) is not. A label that is not ASCII must
                // be a U-label: one that maps to an ASCII label (a Kelvin sign for a `k`) is
                // a homograph of that label.
                let lower = |t: &str| t.chars().flat_map(char::to_lowercase).collect::<String>();
                let own_capitals = g.chars().all(|c| {
                    let mut small = c.to_lowercase();
                    match (small.next(), small.next()) {
                        (Some(l), None) if l != c => {
                            let mut back = l.to_uppercase();
                            back.next() == Some(c) && back.next().is_none()
                        }
                        _ => true,
                    }
                });
                let same = if g.is_ascii() {
                    g.eq_ignore_ascii_case(a)
                } else {
                    let mut chars = g.chars().skip(2);
                    let reserved = chars.next() == Some('-') && chars.next() == Some('-');
                    !reserved && a.starts_with("xn--") && own_capitals && lower(g) == lower(u)
                };
                if !same {
                    return Err(PathError::Syntax);
                }
            }
            _ => return Err(PathError::Syntax),
        }
    }
}

/// `domain` with its U-labels as A-labels, under UTS #46 with the STD3 rules and DNS lengths;
/// hyphens are checked at the ends of labels only (see [`check_idna`] for U-labels').
fn to_a_labels(domain: &str) -> Result<std::borrow::Cow<'_, str>, idna::Errors> {
    idna::uts46::Uts46::new().to_ascii(
        domain.as_bytes(),
        idna::uts46::AsciiDenyList::STD3,
        idna::uts46::Hyphens::CheckFirstLast,
        idna::uts46::DnsLength::Verify,
    )
}

/// The ASCII form of a valid domain: the domain itself when it is ASCII, else with its
/// U-labels written as A-labels (`xn--...`). None when it is not a valid IDNA domain.
pub fn domain_to_ascii(domain: &str) -> Option<std::borrow::Cow<'_, str>> {
    if domain.is_ascii() {
        return Some(std::borrow::Cow::Borrowed(domain));
    }
    to_a_labels(domain).ok()
}

/// The ASCII form of a mailbox (`local@domain`): the mailbox itself when it is ASCII, with
/// its domain in A-labels when only the domain is UTF-8 (RFC 6531 3.2). None when its local
/// part is UTF-8 (no ASCII form exists) or its domain is not a valid IDNA domain.
pub fn mailbox_to_ascii(mailbox: &str) -> Option<std::borrow::Cow<'_, str>> {
    if mailbox.is_ascii() {
        return Some(std::borrow::Cow::Borrowed(mailbox));
    }
    let (local, domain) = mailbox.rsplit_once('@')?;
    if !local.is_ascii() {
        return None;
    }
    let domain = domain_to_ascii(domain)?;
    Some(std::borrow::Cow::Owned(format!("{local}@{domain}")))
}

/// A domain in the one form used to compare it: lower case, no trailing dot, U-labels
/// written as A-labels, so that `B\u{fc}cher.example` and `xn--bcher-kva.example` are the same
/// domain (RFC 5890 2.3.2.1). A name that is not a valid IDNA domain is only lower-cased.
pub fn canonical_domain(domain: &str) -> String {
    let domain = domain.trim_end_matches('.');
    if domain.is_ascii() {
        return domain.to_ascii_lowercase();
    }
    idna::domain_to_ascii(domain).map_or_else(|_| domain.to_lowercase(), |a| a.to_ascii_lowercase())
}

/// What a local part says: a quoted string without its quotes and with each quoted pair
/// (`\x`) read as its character, so that `"john"`, `"jo\hn"` and `john` are one local part
/// (RFC 5322 3.2.4: the quotes and the backslashes are not part of the value). Case is kept:
/// only the mailbox's host may say what case means (RFC 5321 2.4).
pub fn local_part_value(local: &str) -> std::borrow::Cow<'_, str> {
    let Some(inner) = local.strip_prefix('"').and_then(|l| l.strip_suffix('"')) else {
        return std::borrow::Cow::Borrowed(local);
    };
    let mut value = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        value.push(if c == '\\' {
            chars.next().unwrap_or(c)
        } else {
            c
        });
    }
    std::borrow::Cow::Owned(value)
}

/// The same mailbox: the local parts say the same (see [`local_part_value`]), the domains are
/// equal in canonical form (any case, U-labels or A-labels; see [`canonical_domain`]).
pub fn same_mailbox(a: &str, b: &str) -> bool {
    match (a.rsplit_once('@'), b.rsplit_once('@')) {
        (Some((la, da)), Some((lb, db))) => {
            (la == lb || local_part_value(la) == local_part_value(lb))
                && (da.eq_ignore_ascii_case(db)
                    || (!(da.is_ascii() && db.is_ascii())
                        && canonical_domain(da) == canonical_domain(db)))
        }
        _ => a == b,
    }
}

/// A key two mailboxes share when [`same_mailbox`] finds them the same: the local part's
/// value, `@`, the domain in canonical form (a string without `@` is its own key). Only two
/// ASCII domains that differ by a trailing dot, which no parsed path has, share a key and
/// not that test.
pub fn mailbox_key(mailbox: &str) -> String {
    match mailbox.rsplit_once('@') {
        Some((local, domain)) => {
            format!("{}@{}", local_part_value(local), canonical_domain(domain))
        }
        None => mailbox.to_owned(),
    }
}

/// Checks that all of `s` is one RFC 5321 Domain.
fn check_domain(s: &str) -> Result<(), PathError> {
    match scan_domain(s.as_bytes())? {
        n if n == s.len() => Ok(()),
        _ => Err(PathError::Syntax),
    }
}

/// Checks a host name as RFC 5321 4.1.3 writes it: a domain, or an IPv4 or IPv6 address
/// literal; at most 255 octets either way. The general form `[tag:content]` is refused, as in
/// a path: RFC 5321 4.1.3 requires its tag to be registered, and none is but `IPv6`. Its
/// content may hold `;` and `(`, which the Received header would carry into the trace where
/// parsers look for the date and comments. This server's own name is held to it.
pub fn is_valid_host_name(s: &str) -> bool {
    s.len() <= MAX_DOMAIN && parse_host(s).is_ok()
}

/// Checks a client's HELO/EHLO argument: [`is_valid_host_name`], with one leniency: the
/// labels of an ASCII domain may hold underscores wherever a letter may be. Hosts named
/// `DESKTOP_7F3A` or `mail_gw.example` greet with those names, and a refused greeting stops
/// their mail, which no check of the name was for. (Not in a UTF-8 name, whose A-label form,
/// for the reply and the Received header, cannot hold one.)
pub fn is_valid_helo(s: &str) -> bool {
    is_valid_host_name(s)
        || (s.is_ascii()
            && !s.starts_with('[')
            && s.contains('_')
            && is_valid_host_name(&s.replace('_', "x")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(s: &str) -> Result<ReversePath<'_>, PathError> {
        parse_reverse_path(s).map(|(p, rest)| {
            assert_eq!(rest, "");
            p
        })
    }

    #[test]
    fn helo_names_are_domains_or_address_literals() {
        for ok in [
            "mail.example.com",
            "[192.0.2.1]",
            "[IPv6:2001:db8::1]",
            "b\u{fc}cher.example",
            "DESKTOP_7F3A",
            "mail_gw.example.com",
            "_host.example",
        ] {
            assert!(is_valid_helo(ok), "{ok}");
        }
        // This server's own name has none: it is the EHLO of its deliveries, and next hops
        // may refuse one.
        assert!(!is_valid_host_name("mail_gw.example.com"));
        assert!(is_valid_host_name("mail.example.com"));
        let long_literal = format!("[tag:{}]", "x".repeat(250));
        for bad in [
            "[999.1.1.1]",
            "[IPv6:zz]",
            "[a]]",
            "[]",
            "[tag:]",
            "[x-tag:some.content]",
            "[tag:a;b(c]",
            "[-:x]",
            "[tag:a\\b]",
            "[ta_g:x]",
            "[192.0.2_1]",
            "a_b..example",
            "-_.example",
            "a b_c",
            "b\u{fc}_x.example",
            "[tag:\u{e9}]",
            "bad..domain",
            long_literal.as_str(),
        ] {
            assert!(!is_valid_helo(bad), "{bad}");
        }
    }

    #[test]
    fn null_path() {
        assert_eq!(rev("<>"), Ok(ReversePath::Null));
    }

    #[test]
    fn dot_atom_mailbox() {
        let p = rev("<first.last+tag@mail.example.com>").unwrap();
        assert_eq!(p.to_string(), "<first.last+tag@mail.example.com>");
    }

    #[test]
    fn quoted_local_part_keeps_quotes() {
        let p = rev("<\"john doe\\\"x\"@example.com>").unwrap();
        let ReversePath::Mailbox(m) = p else { panic!() };
        assert_eq!(m.local, "\"john doe\\\"x\"");
    }

    #[test]
    fn quoted_local_part_may_hold_angle_bracket() {
        let p = rev("<\"a>b\"@example.com>").unwrap();
        assert_eq!(p.to_string(), "<\"a>b\"@example.com>");
    }

    #[test]
    fn address_literals() {
        let p = rev("<a@[192.0.2.1]>").unwrap();
        assert_eq!(p.to_string(), "<a@[192.0.2.1]>");
        let p = rev("<a@[IPv6:2001:db8::1]>").unwrap();
        assert_eq!(p.to_string(), "<a@[IPv6:2001:db8::1]>");
        assert_eq!(rev("<a@[300.1.1.1]>"), Err(PathError::Syntax));
        // Snum is one to three digits (RFC 5321 4.1.3): leading zeros are allowed.
        assert_eq!(
            parse_host("[01.002.3.010]"),
            Ok(Host::Ipv4(Ipv4Addr::new(1, 2, 3, 10)))
        );
        assert_eq!(
            parse_host("[IPv6:::ffff:001.2.3.4]"),
            Ok(Host::Ipv6("::ffff:1.2.3.4".parse().unwrap()))
        );
        for bad in [
            "[0001.2.3.4]",
            "[1.2.3.256]",
            "[1.2.3]",
            "[1.2.3.4.5]",
            "[1.2.3.+4]",
            "[1..3.4]",
            "[IPv6:::ffff:1.2.3.0256]",
        ] {
            assert_eq!(parse_host(bad), Err(PathError::Syntax), "{bad}");
        }
    }

    #[test]
    fn a_mailbox_is_the_same_whatever_the_form_of_its_domain() {
        assert!(same_mailbox("u@Example.TEST", "u@example.test"));
        assert!(same_mailbox("u@b\u{fc}cher.test", "u@xn--bcher-kva.test"));
        assert!(same_mailbox("u@B\u{dc}cher.test", "u@b\u{fc}cher.test"));
        assert!(!same_mailbox("U@example.test", "u@example.test"));
        // A quoted local part is its value: quotes and quoted pairs aside.
        for same in [
            "\"u\"@example.test",
            "\"\\u\"@example.test",
            "u@EXAMPLE.test",
        ] {
            assert!(same_mailbox("u@example.test", same), "{same}");
        }
        assert!(same_mailbox("\"a b\"@x.test", "\"a\\ b\"@x.test"));
        assert!(!same_mailbox("\"U\"@example.test", "u@example.test"));
        assert!(!same_mailbox("\"u.\"@example.test", "u@example.test"));
        assert_eq!(local_part_value("\"a\\\"b\""), "a\"b");
        assert_eq!(local_part_value("\""), "\"");
        assert!(!same_mailbox("u@bucher.test", "u@b\u{fc}cher.test"));
    }

    #[test]
    fn ipv6_literals_follow_rfc_5321_grammar() {
        for ok in [
            "1:2:3:4:5:6:7:8",
            "2001:db8::1",
            "::",
            "::1",
            "1::",
            "1:2:3:4:5:6::",
            "::1:2:3:4:5:6",
            "1:2:3::4:5:6",
            "1:2:3:4:5:6:192.0.2.1",
            "::192.0.2.1",
            "::ffff:192.0.2.1",
            "1:2:3:4::192.0.2.1",
            "1:2::3:4:192.0.2.1",
            "ABCD:ef01::2",
        ] {
            assert!(is_rfc5321_ipv6(ok), "{ok}");
            let lit = format!("[IPv6:{ok}]");
            assert!(matches!(parse_host(&lit), Ok(Host::Ipv6(_))), "{lit}");
        }
        for bad in [
            // `::` standing for a single group (RFC 4291 allows it, RFC 5321 does not).
            "1:2:3:4:5:6:7::",
            "::1:2:3:4:5:6:7",
            "1:2:3::4:5:6:7",
            "1:2:3:4:5::192.0.2.1",
            "::1:2:3:4:5:192.0.2.1",
            "1:2:3:4:5:6:7",
            "1:2:3:4:5:6:7:8:9",
            "1::2::3",
            "12345::1",
            ":1:2:3:4:5:6:7",
            "1:2:3:4:5:6:7:",
            "1:2:3:4:5:192.0.2.1",
            "192.0.2.1::",
            "::192.0.2.1:1",
            "fe80::1%eth0",
            "",
        ] {
            assert!(!is_rfc5321_ipv6(bad), "{bad}");
            let lit = format!("[IPv6:{bad}]");
            assert_eq!(parse_host(&lit), Err(PathError::Syntax), "{lit}");
        }
    }

    #[test]
    fn source_route_is_ignored() {
        let p = rev("<@relay.one,@relay.two:user@example.com>").unwrap();
        assert_eq!(p.to_string(), "<user@example.com>");
    }

    #[test]
    fn syntax_errors() {
        for bad in [
            "a@b", "<a@b", "<@b>", "<a@>", "<a..b@c>", "<.a@c>", "<a.@c>", "<a@-b.c>", "<a@b-.c>",
            "<a@b..c>", "<a b@c>", "<\"a@c>", "<a@b c>", "<>x@y>",
        ] {
            let r = parse_reverse_path(bad).map(|(_, rest)| rest.is_empty());
            assert!(!matches!(r, Ok(true)), "{bad} accepted");
        }
    }

    #[test]
    fn length_limits() {
        // Over RFC 5321's 64 octets, as SRS and VERP return paths are: taken, within the
        // path's 256.
        let srs = format!("SRS0=HHH=TT=origin.example={}", "u".repeat(60));
        let full = format!("<{srs}@forwarder.example>");
        match rev(&full).unwrap_or_else(|e| panic!("{e}")) {
            ReversePath::Mailbox(m) => assert_eq!(m.local, srs),
            ReversePath::Null => panic!("null path"),
        }
        let local = "a".repeat(250);
        assert_eq!(
            rev(&format!("<{local}@example.com>")),
            Err(PathError::PathTooLong)
        );
        // A stored mailbox (`--postmaster`) the same: its path, brackets included, at most 256.
        let long_local = "p".repeat(100);
        assert!(parse_mailbox(&format!("{long_local}@example.com")).is_ok());
        let domain = format!("{}.example", "d".repeat(60));
        let local = "p".repeat(200);
        assert_eq!(
            parse_mailbox(&format!("{local}@{domain}")).map(|m| m.local),
            Err(PathError::PathTooLong)
        );
        let label = "b".repeat(63);
        let domain = [label.as_str(); 5].join(".");
        assert_eq!(rev(&format!("<a@{domain}>")), Err(PathError::DomainTooLong));
        let domain = [label.as_str(); 4].join(".");
        let local = "c".repeat(64);
        assert_eq!(
            rev(&format!("<{local}@{domain}>")),
            Err(PathError::PathTooLong)
        );
    }

    #[test]
    fn postmaster_without_domain() {
        assert_eq!(
            parse_forward_path("<POSTMASTER>"),
            Ok((ForwardPath::Postmaster, ""))
        );
        assert!(parse_forward_path("<>").is_err());
    }

    #[test]
    fn multibyte_character_across_the_postmaster_prefix_is_no_panic() {
        // Found by the `command` fuzz target: byte 12 falls inside a two-byte character.
        assert!(parse_forward_path("<\"q0IP00:dbȹL").is_err());
        assert!(parse_forward_path("<postmasterȹ>").is_err());
    }

    #[test]
    fn utf8_domains_must_be_idna_names() {
        assert!(is_valid_helo("b\u{fc}cher.example"));
        assert!(is_valid_helo("B\u{dc}CHER.example"));
        assert!(is_valid_helo("stra\u{df}e.example"));
        assert!(rev("<a@b\u{fc}cher.example>").is_ok());
        // Capital Greek ending in a sigma, and Cherokee in either case: the same U-labels
        // but for case.
        for cased in [
            "\u{39f}\u{394}\u{39f}\u{3a3}.example",
            "\u{3bf}\u{3b4}\u{3bf}\u{3c2}.example",
            "\u{13a0}\u{13a1}.example",
            "\u{ab70}\u{ab71}.example",
            "\u{130}stanbul.example",
        ] {
            assert!(is_valid_helo(cased), "{cased:?}");
            assert!(rev(&format!("<a@{cased}>")).is_ok(), "{cased:?}");
        }
        for bad in [
            // Signs that map to ASCII letters (Kelvin, Ohm, Angstrom) or a letter and its
            // accent apart: not U-labels, homographs of other names.
            "\u{212a}ey.example",
            "\u{2126}m.example",
            "\u{212b}ngstrom.example",
            "e\u{301}cole.example",
            "a\u{a0}b.example",
            "\u{202e}example.com",
            "\u{2028}x.example",
            "x\u{85}y.example",
            "ab--\u{fc}.example",
            "x\u{200b}n\u{e4}me.example",
            "paypal\u{ad}.\u{e9}x.com",
            "\u{feff}\u{e4}.example",
            "\u{2060}\u{e4}.example",
            "\u{ff45}x\u{e4}.example",
        ] {
            assert!(!is_valid_helo(bad), "{bad:?}");
            assert!(rev(&format!("<a@{bad}>")).is_err(), "{bad:?}");
        }
        // U-labels and A-labels mixed in one name (RFC 6531 3.3).
        for mixed in [
            "b\u{fc}.xn--tda.example",
            "xn--tda.b\u{fc}.example",
            "xn--b-xka.\u{fc}.example",
        ] {
            assert!(is_valid_helo(mixed), "{mixed:?}");
            assert!(rev(&format!("<a@{mixed}>")).is_ok(), "{mixed:?}");
        }
        assert!(rev("<a@xn--bcher-kva.\u{fc}.example>").is_ok());
        // An ASCII label of the A-label form must be one: Punycode that decodes (not
        // `xn--zz`), to a U-label (not `xn--a`, a C1 control; not `xn--abc`, which decodes
        // to ASCII), in the form that encodes back to it.
        for good in [
            "xn--bcher-kva.example",
            "XN--BCHER-KVA.example",
            "mx.xn--tda.example",
            "41-33-12-9.dyn.example.xn--mgbaam7a8h",
            "1.xn--mgbaam7a8h",
        ] {
            assert!(is_valid_helo(good), "{good:?}");
            assert!(rev(&format!("<a@{good}>")).is_ok(), "{good:?}");
        }
        for fake in [
            "xn--zz.example",
            "xn--a.example",
            "xn--abc.example",
            "mail.xn--zz.example",
            "b\u{fc}.xn--zz.example",
            "xn--.example",
        ] {
            assert!(!is_valid_helo(fake), "{fake:?}");
            assert!(rev(&format!("<a@{fake}>")).is_err(), "{fake:?}");
        }
        // An LDH label with hyphens in its third and fourth places is taken beside U-labels
        // as in a name all ASCII.
        assert!(rev("<a@ab--cd.example>").is_ok());
        assert!(rev("<a@ab--cd.b\u{fc}.example>").is_ok());
        assert!(is_valid_helo("ab--cd.b\u{fc}.example"));
        assert_eq!(
            domain_to_ascii("ab--cd.b\u{fc}.example").as_deref(),
            Some("ab--cd.xn--b-eha.example")
        );
        // A U-label's limit is its A-label's 63 octets, not its UTF-8 length: 32 u-umlauts
        // are 64 octets of UTF-8 and a 42-octet A-label; 60 are past 63 as an A-label.
        let long = "\u{fc}".repeat(32);
        assert!(rev(&format!("<a@{long}.example>")).is_ok());
        assert!(rev(&format!("<a@{}.example>", "\u{fc}".repeat(60))).is_err());
        assert_eq!(
            domain_to_ascii("b\u{fc}cher.example").as_deref(),
            Some("xn--bcher-kva.example")
        );
        assert_eq!(
            domain_to_ascii("plain.example").as_deref(),
            Some("plain.example")
        );
        assert_eq!(domain_to_ascii("a\u{a0}b.example"), None);
        for same in [
            "B\u{fc}cher.Example.",
            "xn--bcher-kva.example",
            "XN--BCHER-KVA.EXAMPLE",
        ] {
            assert_eq!(canonical_domain(same), "xn--bcher-kva.example", "{same}");
        }
        assert_eq!(canonical_domain("Plain.Example"), "plain.example");
    }

    #[test]
    fn only_a_utf8_local_part_has_no_mailbox_to_ascii() {
        assert_eq!(mailbox_to_ascii("a@b.test").as_deref(), Some("a@b.test"));
        assert_eq!(
            mailbox_to_ascii("u@b\u{fc}cher.test").as_deref(),
            Some("u@xn--bcher-kva.test")
        );
        assert_eq!(
            mailbox_to_ascii("\"a@b\"@b\u{fc}cher.test").as_deref(),
            Some("\"a@b\"@xn--bcher-kva.test")
        );
        assert_eq!(mailbox_to_ascii("j\u{f6}rg@b.test"), None);
        assert_eq!(mailbox_to_ascii("j\u{f6}rg@b\u{fc}cher.test"), None);
        assert_eq!(mailbox_to_ascii(""), Some("".into()));
    }

    #[test]
    fn utf8_mailbox_parses_and_is_flagged() {
        let p = rev("<δοκιμή@παράδειγμα.δοκιμή>").unwrap();
        let ReversePath::Mailbox(m) = p else { panic!() };
        assert!(!m.is_ascii());
    }
}
