//! ESMTP parameters of MAIL FROM and RCPT TO: SIZE, BODY, SMTPUTF8, RET, ENVID, AUTH, NOTIFY,
//! ORCPT. Values that are opaque to the server (xtext) stay borrowed and as written.

use std::fmt::{self, Write};

use crate::limits::{MAX_DECIMAL_DIGITS, MAX_ENVID, MAX_ORCPT, MAX_SIZE_DIGITS};

/// The body type declared with BODY= (RFC 6152, RFC 3030).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum BodyType {
    /// 7BIT, the default.
    #[default]
    SevenBit,
    /// 8BITMIME.
    EightBitMime,
    /// BINARYMIME: only with BDAT.
    BinaryMime,
}

impl BodyType {
    /// The keyword as sent in BODY=.
    pub fn as_str(self) -> &'static str {
        match self {
            BodyType::SevenBit => "7BIT",
            BodyType::EightBitMime => "8BITMIME",
            BodyType::BinaryMime => "BINARYMIME",
        }
    }
}

/// RET= of RFC 3461: how much of the message a failure DSN returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ret {
    /// The whole message.
    Full,
    /// Headers only.
    Hdrs,
}

/// NOTIFY= of RFC 3461, as a set of bits. `Notify::NEVER` stands alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Notify(u8);

impl Notify {
    /// NEVER.
    pub const NEVER: Notify = Notify(0);
    /// SUCCESS.
    pub const SUCCESS: u8 = 1;
    /// FAILURE.
    pub const FAILURE: u8 = 2;
    /// DELAY.
    pub const DELAY: u8 = 4;

    /// A set of SUCCESS, FAILURE and DELAY bits (0 is NEVER).
    pub fn from_bits(bits: u8) -> Notify {
        Notify(bits & 7)
    }
    /// The bits.
    pub fn bits(self) -> u8 {
        self.0
    }
    /// Whether `bit` is in the set.
    pub fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }
}

impl fmt::Display for Notify {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("NEVER");
        }
        let mut sep = "";
        for (bit, name) in [(1, "SUCCESS"), (2, "FAILURE"), (4, "DELAY")] {
            if self.0 & bit != 0 {
                write!(f, "{sep}{name}")?;
                sep = ",";
            }
        }
        Ok(())
    }
}

/// Parameters of MAIL FROM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MailParams<'a> {
    /// SIZE=: the client's estimate of the message size.
    pub size: Option<u64>,
    /// BODY=.
    pub body: Option<BodyType>,
    /// SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// RET= (RFC 3461).
    pub ret: Option<Ret>,
    /// ENVID= (RFC 3461), xtext as written.
    pub envid: Option<&'a str>,
    /// AUTH= (RFC 4954), xtext as written.
    pub auth: Option<&'a str>,
}

/// Parameters of RCPT TO.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RcptParams<'a> {
    /// NOTIFY= (RFC 3461).
    pub notify: Option<Notify>,
    /// ORCPT= (RFC 3461): `addr-type;xtext` as written.
    pub orcpt: Option<&'a str>,
}

/// What was wrong with a parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    /// A keyword this server does not know (555 5.5.4).
    #[error("unrecognized parameter")]
    Unknown,
    /// A known keyword with a bad or missing value (501 5.5.4).
    #[error("invalid parameter value")]
    Invalid,
    /// A known keyword given twice (501 5.5.4).
    #[error("parameter given twice")]
    Duplicate,
}

/// esmtp-value bytes: %d33-60 / %d62-126, and UTF-8 (RFC 6531).
static VALUE: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        t[c] = (c >= 33 && c <= 126 && c != b'=' as usize) || c >= 0x80;
        c += 1;
    }
    t
};

/// Splits `rest` (what follows the path) into `(keyword, value)` pairs.
fn pairs(rest: &str) -> impl Iterator<Item = Result<(&str, Option<&str>), ParamError>> {
    // A closure, not the char pattern: on these short strings a plain loop beats the vector
    // search that `split(' ')` sets up.
    #[allow(clippy::manual_pattern_char_comparison)]
    let is_space = |c: char| c == ' ';
    rest.split(is_space).filter(|p| !p.is_empty()).map(|p| {
        let (key, value) = match p.bytes().position(|c| c == b'=') {
            Some(i) => (&p[..i], Some(&p[i + 1..])),
            None => (p, None),
        };
        let key_ok = key
            .bytes()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
            && key.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-');
        // esmtp-value: %d33-60 / %d62-126, and UTF-8 (RFC 6531).
        let value_ok =
            value.is_none_or(|v| !v.is_empty() && v.bytes().all(|c| VALUE[usize::from(c)]));
        if key_ok && value_ok {
            Ok((key, value))
        } else {
            Err(ParamError::Invalid)
        }
    })
}

/// Whether `s` is RFC 3461 xtext: printable ASCII but `+` and `=`, with `+XX` hex escapes.
pub fn is_xtext(s: &str) -> bool {
    xtext(s, false)
}

/// Whether `s` is xtext whose decoded value is printable US-ASCII (0x20 to 0x7E), as ENVID
/// and an `rfc822` ORCPT must be (RFC 3461 4.2, 4.4): no control characters, no 8-bit
/// octets hidden in escapes.
pub fn is_printable_xtext(s: &str) -> bool {
    xtext(s, true)
}

fn xtext(s: &str, printable: bool) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                let hex = |c: Option<&u8>| match c {
                    Some(c @ b'0'..=b'9') => Some(c - b'0'),
                    Some(c @ b'A'..=b'F') => Some(c - b'A' + 10),
                    _ => None,
                };
                let (Some(hi), Some(lo)) = (hex(b.get(i + 1)), hex(b.get(i + 2))) else {
                    return false;
                };
                if printable && !(0x20..=0x7e).contains(&(hi << 4 | lo)) {
                    return false;
                }
                i += 3;
            }
            33..=126 if b[i] != b'=' => i += 1,
            _ => return false,
        }
    }
    true
}

/// Parses a decimal count of at most [`MAX_DECIMAL_DIGITS`] digits after any leading zeros
/// (RFC 3030's `1*DIGIT`; the command line's own limit bounds the zeros).
pub fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let significant = s.trim_start_matches('0');
    if significant.len() > MAX_DECIMAL_DIGITS {
        return None;
    }
    Some(significant.parse().unwrap_or(0))
}

/// Parses a SIZE value: at most [`MAX_SIZE_DIGITS`] digits (RFC 1870 4), leading zeros
/// allowed; a value past `u64::MAX` becomes `u64::MAX`, which no limit admits.
pub fn parse_size(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > MAX_SIZE_DIGITS || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some(s.parse().unwrap_or(u64::MAX))
}

fn set<T>(slot: &mut Option<T>, value: T) -> Result<(), ParamError> {
    if slot.is_some() {
        return Err(ParamError::Duplicate);
    }
    *slot = Some(value);
    Ok(())
}

impl<'a> MailParams<'a> {
    /// Parses the parameters after the reverse path.
    pub fn parse(rest: &'a str) -> Result<Self, ParamError> {
        let mut p = MailParams::default();
        for pair in pairs(rest) {
            let (key, value) = pair?;
            if key.eq_ignore_ascii_case("SIZE") {
                let n = value.and_then(parse_size).ok_or(ParamError::Invalid)?;
                set(&mut p.size, n)?;
            } else if key.eq_ignore_ascii_case("BODY") {
                let v = value.ok_or(ParamError::Invalid)?;
                let body = if v.eq_ignore_ascii_case("7BIT") {
                    BodyType::SevenBit
                } else if v.eq_ignore_ascii_case("8BITMIME") {
                    BodyType::EightBitMime
                } else if v.eq_ignore_ascii_case("BINARYMIME") {
                    BodyType::BinaryMime
                } else {
                    return Err(ParamError::Invalid);
                };
                set(&mut p.body, body)?;
            } else if key.eq_ignore_ascii_case("SMTPUTF8") {
                if value.is_some() {
                    return Err(ParamError::Invalid);
                }
                if p.smtputf8 {
                    return Err(ParamError::Duplicate);
                }
                p.smtputf8 = true;
            } else if key.eq_ignore_ascii_case("RET") {
                let v = value.ok_or(ParamError::Invalid)?;
                let ret = if v.eq_ignore_ascii_case("FULL") {
                    Ret::Full
                } else if v.eq_ignore_ascii_case("HDRS") {
                    Ret::Hdrs
                } else {
                    return Err(ParamError::Invalid);
                };
                set(&mut p.ret, ret)?;
            } else if key.eq_ignore_ascii_case("ENVID") {
                let v = value.filter(|v| v.len() <= MAX_ENVID && is_printable_xtext(v));
                set(&mut p.envid, v.ok_or(ParamError::Invalid)?)?;
            } else if key.eq_ignore_ascii_case("AUTH") {
                // Kept as written, whatever it is (or again): AUTH is not offered, so the
                // parameter is one not recognised (555), not one badly written (501).
                if p.auth.is_none() {
                    p.auth = Some(value.unwrap_or(""));
                }
            } else {
                return Err(ParamError::Unknown);
            }
        }
        Ok(p)
    }

    /// Whether any parameter is present (ESMTP parameters need EHLO).
    pub fn is_empty(&self) -> bool {
        *self == MailParams::default()
    }

    /// Appends the parameters, each preceded by a space.
    pub fn encode(&self, out: &mut String) {
        if let Some(n) = self.size {
            let _ = write!(out, " SIZE={n}");
        }
        if let Some(b) = self.body {
            let _ = write!(out, " BODY={}", b.as_str());
        }
        if self.smtputf8 {
            out.push_str(" SMTPUTF8");
        }
        if let Some(r) = self.ret {
            out.push_str(match r {
                Ret::Full => " RET=FULL",
                Ret::Hdrs => " RET=HDRS",
            });
        }
        if let Some(e) = self.envid {
            let _ = write!(out, " ENVID={e}");
        }
        match self.auth {
            // Given without a value: written back so.
            Some("") => out.push_str(" AUTH"),
            Some(a) => {
                let _ = write!(out, " AUTH={a}");
            }
            None => {}
        }
    }
}

impl<'a> RcptParams<'a> {
    /// Parses the parameters after the forward path.
    pub fn parse(rest: &'a str) -> Result<Self, ParamError> {
        let mut p = RcptParams::default();
        for pair in pairs(rest) {
            let (key, value) = pair?;
            if key.eq_ignore_ascii_case("NOTIFY") {
                let v = value.ok_or(ParamError::Invalid)?;
                set(&mut p.notify, parse_notify(v)?)?;
            } else if key.eq_ignore_ascii_case("ORCPT") {
                let v = value.filter(|v| v.len() <= MAX_ORCPT && is_orcpt(v));
                set(&mut p.orcpt, v.ok_or(ParamError::Invalid)?)?;
            } else {
                return Err(ParamError::Unknown);
            }
        }
        Ok(p)
    }

    /// Whether any parameter is present.
    pub fn is_empty(&self) -> bool {
        *self == RcptParams::default()
    }

    /// Appends the parameters, each preceded by a space.
    pub fn encode(&self, out: &mut String) {
        if let Some(n) = self.notify {
            let _ = write!(out, " NOTIFY={n}");
        }
        if let Some(o) = self.orcpt {
            let _ = write!(out, " ORCPT={o}");
        }
    }
}

fn parse_notify(v: &str) -> Result<Notify, ParamError> {
    if v.eq_ignore_ascii_case("NEVER") {
        return Ok(Notify::NEVER);
    }
    let mut bits = 0;
    for word in v.split(',') {
        let bit = if word.eq_ignore_ascii_case("SUCCESS") {
            Notify::SUCCESS
        } else if word.eq_ignore_ascii_case("FAILURE") {
            Notify::FAILURE
        } else if word.eq_ignore_ascii_case("DELAY") {
            Notify::DELAY
        } else {
            return Err(ParamError::Invalid);
        };
        if bits & bit != 0 {
            return Err(ParamError::Invalid);
        }
        bits |= bit;
    }
    Ok(Notify::from_bits(bits))
}

/// `addr-type ";" xtext`, addr-type an atom (RFC 3461 4.2), the decoded address printable
/// US-ASCII, or UTF-8 other than controls (Postfix writes an internationalised recipient
/// it was given no ORCPT for as `rfc822;j+C3+B6rg@...`, and takes it from others). Raw UTF-8
/// only for the `utf-8` address type (RFC 6533 3), and only in an SMTPUTF8 transaction,
/// which the session checks.
fn is_orcpt(v: &str) -> bool {
    let Some((kind, addr)) = v.split_once(';') else {
        return false;
    };
    !kind.is_empty()
        && kind.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
        && !addr.is_empty()
        && if kind.eq_ignore_ascii_case("utf-8") {
            // RFC 6533 3: ASCII only, `utf-8-addr-xtext`; with UTF-8, `utf-8-addr-unitext`.
            // Both are the same characters and escapes but for the UTF-8 itself.
            is_utf8_addr_text(addr)
        } else if kind.eq_ignore_ascii_case("rfc822") {
            addr.is_ascii() && is_text_xtext(addr)
        } else {
            addr.is_ascii() && is_printable_xtext(addr)
        }
}

/// Whether `s` is xtext whose decoded value is printable US-ASCII or UTF-8 text: escapes of
/// control characters (`+0D+0A`, `+00`, `+7F`, C1 controls) and octets that are no UTF-8 are
/// refused, since the value may end up in a report's header field.
fn is_text_xtext(s: &str) -> bool {
    if !is_xtext(s) {
        return false;
    }
    let b = s.as_bytes();
    let mut decoded = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'+' {
            // Two upper-case hex digits, checked by `is_xtext`.
            let hex = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
            decoded.push(hex(b[i + 1]) << 4 | hex(b[i + 2]));
            i += 3;
        } else {
            decoded.push(b[i]);
            i += 1;
        }
    }
    std::str::from_utf8(&decoded).is_ok_and(|text| !text.chars().any(char::is_control))
}

/// RFC 6533 3 `utf-8-addr-xtext` and `utf-8-addr-unitext`: printable ASCII but `+`, `=` and
/// `\`, or UTF-8 other than controls, or `\x{HEXPOINT}` for a character that may not appear
/// as itself.
fn is_utf8_addr_text(s: &str) -> bool {
    let mut rest = s;
    while let Some(c) = rest.chars().next() {
        rest = &rest[c.len_utf8()..];
        match c {
            '\\' => {
                let Some(after) = rest.strip_prefix("x{") else {
                    return false;
                };
                let Some((hex, tail)) = after.split_once('}') else {
                    return false;
                };
                if !is_hexpoint(hex) {
                    return false;
                }
                rest = tail;
            }
            '+' | '=' => return false,
            c if c.is_ascii() && !c.is_ascii_graphic() => return false,
            c if c.is_control() => return false,
            _ => {}
        }
    }
    true
}

/// RFC 6533 3 `HEXPOINT`: a Unicode scalar value in hex without superfluous leading zeros (two
/// digits below 0x100), and only for what cannot be written as itself: controls, space, `+`,
/// `=`, `\`, DEL, or anything beyond ASCII.
fn is_hexpoint(hex: &str) -> bool {
    if !(2..=6).contains(&hex.len()) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return false;
    }
    let Ok(value) = u32::from_str_radix(hex, 16) else {
        return false;
    };
    let minimal = if value < 0x100 {
        hex.len() == 2
    } else {
        !hex.starts_with('0')
    };
    // NUL is no character of an address.
    let needs_escape = (0x01..=0x20).contains(&value)
        || [0x2B, 0x3D, 0x5C, 0x7F].contains(&value)
        || value >= 0x80;
    minimal && needs_escape && char::from_u32(value).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mail_params_parse_and_encode() {
        let p =
            MailParams::parse(" size=1000  BODY=8bitmime SMTPUTF8 RET=hdrs ENVID=QQ+2B1 AUTH=<>")
                .unwrap();
        assert_eq!(p.size, Some(1000));
        assert_eq!(p.body, Some(BodyType::EightBitMime));
        assert!(p.smtputf8);
        assert_eq!(p.ret, Some(Ret::Hdrs));
        assert_eq!(p.envid, Some("QQ+2B1"));
        let mut s = String::new();
        p.encode(&mut s);
        assert_eq!(
            s,
            " SIZE=1000 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=QQ+2B1 AUTH=<>"
        );
    }

    #[test]
    fn mail_param_errors() {
        assert_eq!(MailParams::parse(" FOO=1"), Err(ParamError::Unknown));
        assert_eq!(MailParams::parse(" SIZE=abc"), Err(ParamError::Invalid));
        // RFC 1870 4 allows 20 digits; past u64 the value saturates (too big for any limit).
        assert_eq!(
            MailParams::parse(" SIZE=99999999999999999999").map(|p| p.size),
            Ok(Some(u64::MAX))
        );
        assert_eq!(
            MailParams::parse(" SIZE=999999999999999999999"),
            Err(ParamError::Invalid)
        );
        assert_eq!(
            MailParams::parse(" SIZE=1 SIZE=2"),
            Err(ParamError::Duplicate)
        );
        assert_eq!(
            MailParams::parse(" SMTPUTF8 smtputf8"),
            Err(ParamError::Duplicate)
        );
        assert_eq!(
            MailParams::parse(" RET=FULL ret=HDRS"),
            Err(ParamError::Duplicate)
        );
        assert_eq!(
            RcptParams::parse(" ORCPT=rfc822;a+40b ORCPT=rfc822;a+40b"),
            Err(ParamError::Duplicate)
        );
        assert_eq!(MailParams::parse(" BODY=9BIT"), Err(ParamError::Invalid));
        assert_eq!(MailParams::parse(" ENVID=a=b"), Err(ParamError::Invalid));
        assert_eq!(MailParams::parse(" ENVID=+zz"), Err(ParamError::Invalid));
        assert_eq!(MailParams::parse(" SMTPUTF8=yes"), Err(ParamError::Invalid));
    }

    #[test]
    fn rcpt_params() {
        let p = RcptParams::parse(" NOTIFY=failure,DELAY ORCPT=rfc822;a+40b").unwrap();
        assert_eq!(
            p.notify,
            Some(Notify::from_bits(Notify::FAILURE | Notify::DELAY))
        );
        let mut s = String::new();
        p.encode(&mut s);
        assert_eq!(s, " NOTIFY=FAILURE,DELAY ORCPT=rfc822;a+40b");
        assert_eq!(
            RcptParams::parse(" NOTIFY=NEVER,SUCCESS"),
            Err(ParamError::Invalid)
        );
        assert_eq!(
            RcptParams::parse(" ORCPT=nosemicolon"),
            Err(ParamError::Invalid)
        );
        assert_eq!(RcptParams::parse(" XFOO"), Err(ParamError::Unknown));
    }

    #[test]
    fn decoded_envid_is_printable_ascii_and_orcpt_printable_text() {
        // Escapes of CR, LF, NUL or 8-bit octets are xtext, but not printable values.
        for bad in ["a+0D+0AX-Inj:+20yes", "a+00b", "u+C3+A9", "a+7F"] {
            assert!(is_xtext(bad), "{bad}");
            assert!(!is_printable_xtext(bad), "{bad}");
            let envid = format!(" ENVID={bad}");
            assert_eq!(MailParams::parse(&envid), Err(ParamError::Invalid), "{bad}");
        }
        assert!(is_printable_xtext("a+20b+2B+3D"));
        // An rfc822 ORCPT may escape UTF-8 (Postfix writes `j+C3+B6rg` for jörg), never a
        // control character nor octets that are no UTF-8.
        for bad in [
            "a+0D+0AX-Inj:+20yes",
            "a+00b",
            "a+7F",
            "u+C3",
            "u+C2+85",
            "u+FF",
        ] {
            let orcpt = format!(" ORCPT=rfc822;{bad}@x.test");
            assert_eq!(RcptParams::parse(&orcpt), Err(ParamError::Invalid), "{bad}");
        }
        for good in ["j+C3+B6rg", "u+C3+A9+E2+98+83", "a+2Bb"] {
            let orcpt = format!(" ORCPT=rfc822;{good}@x.test");
            assert!(RcptParams::parse(&orcpt).is_ok(), "{good}");
        }
        // Other address types keep to printable ASCII.
        assert_eq!(
            RcptParams::parse(" ORCPT=x-foo;j+C3+B6rg"),
            Err(ParamError::Invalid)
        );
        // Raw UTF-8 only with the utf-8 address type (RFC 6533); the session also asks for
        // SMTPUTF8.
        assert!(RcptParams::parse(" ORCPT=utf-8;\u{fc}@x.test").is_ok());
        assert_eq!(
            RcptParams::parse(" ORCPT=rfc822;\u{e9}@x.test"),
            Err(ParamError::Invalid)
        );
        for bad in [
            "\u{fc}\u{85}@x.test",
            "\u{fc}+@x.test",
            "\u{fc}=@x.test",
            "\u{fc}\\@x.test",
            "\u{fc}\\x{}@x.test",
            "\u{fc}\\x{1234567}@x.test",
            "\u{fc} @x.test",
        ] {
            let orcpt = format!(" ORCPT=utf-8;{bad}");
            assert_eq!(RcptParams::parse(&orcpt), Err(ParamError::Invalid), "{bad}");
        }
        assert!(RcptParams::parse(" ORCPT=utf-8;\u{fc}\\x{2B}a@x.test").is_ok());
        // Without UTF-8, a utf-8 address is utf-8-addr-xtext (RFC 6533 3): no xtext `+XX`,
        // and each `\x{..}` a real character that may not stand as itself.
        for good in [
            "a@x.test",
            "a\\x{2B}b@x.test",
            "a\\x{E9}@x.test",
            "a\\x{1F600}@x.test",
            "a\\x{10FFFF}@x.test",
            "a\\x{20}b@x.test",
        ] {
            let orcpt = format!(" ORCPT=utf-8;{good}");
            assert!(RcptParams::parse(&orcpt).is_ok(), "{good}");
        }
        for bad in [
            "a+2Bb@x.test",
            "a\\x{}b@x.test",
            "a\\x{110000}b@x.test",
            "a\\x{D800}b@x.test",
            "a\\x{41}b@x.test",
            "a\\x{2b}b@x.test\\x{E}",
            "a\\x{00E9}@x.test",
            "a\\x{00}b@x.test",
            "a\\x{2B@x.test",
            "a=b@x.test",
        ] {
            let orcpt = format!(" ORCPT=utf-8;{bad}");
            assert_eq!(RcptParams::parse(&orcpt), Err(ParamError::Invalid), "{bad}");
        }
    }
}
