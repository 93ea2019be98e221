//! The command grammar (RFC 5321 4.1 and the extensions postern speaks): parse and encode.
//!
//! [`Command::parse`] takes one line without its CR LF and borrows from it; it allocates
//! nothing. [`Command::encode`] writes the canonical form, and `parse(encode(c)) == c`.

use std::fmt::Write;

use crate::address::{
    is_valid_helo, parse_forward_path, parse_reverse_path, ForwardPath, PathError, ReversePath,
};
use crate::params::{parse_decimal, MailParams, ParamError, RcptParams};
use crate::reply::{EnhancedCode, StaticReply};

/// Commands of RFC 5321 that postern refuses as obsolete (502).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Obsolete {
    /// SEND.
    Send,
    /// SOML.
    Soml,
    /// SAML.
    Saml,
    /// TURN.
    Turn,
}

/// One SMTP command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command<'a> {
    /// HELO domain.
    Helo(&'a str),
    /// EHLO domain-or-literal.
    Ehlo(&'a str),
    /// MAIL FROM:<reverse-path> [params].
    Mail(ReversePath<'a>, MailParams<'a>),
    /// RCPT TO:<forward-path> [params].
    Rcpt(ForwardPath<'a>, RcptParams<'a>),
    /// DATA.
    Data,
    /// BDAT size [LAST] (RFC 3030).
    Bdat {
        /// Octets in the chunk that follows.
        size: u64,
        /// This is the last chunk.
        last: bool,
    },
    /// RSET.
    Rset,
    /// NOOP [string].
    Noop(Option<&'a str>),
    /// QUIT.
    Quit,
    /// VRFY string.
    Vrfy(&'a str),
    /// EXPN string.
    Expn(&'a str),
    /// HELP [string].
    Help(Option<&'a str>),
    /// STARTTLS (RFC 3207).
    StartTls,
    /// AUTH mechanism [initial-response] (RFC 4954).
    Auth(&'a str, Option<&'a str>),
    /// SEND, SOML, SAML or TURN.
    Obsolete(Obsolete),
}

/// Why a command line was refused. Always the client's fault; each maps to one reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Not a command this server knows (500 5.5.1).
    #[error("command not recognized")]
    Unknown,
    /// A known command with arguments that do not fit its syntax (501 5.5.4).
    #[error("syntax error in arguments")]
    Syntax(&'static str),
    /// Bytes that are not UTF-8 or are control characters (501 5.5.2).
    #[error("invalid characters in command")]
    InvalidCharacters,
    /// A malformed reverse path (501 5.1.7).
    #[error("bad sender address: {0}")]
    Sender(PathError),
    /// A malformed forward path (501 5.1.3).
    #[error("bad recipient address: {0}")]
    Recipient(PathError),
    /// A MAIL or RCPT parameter that is not recognized (555 5.5.4).
    #[error("parameter not recognized")]
    UnknownParameter,
    /// A MAIL or RCPT parameter with a bad value (501 5.5.4).
    #[error("invalid parameter")]
    InvalidParameter,
    /// A MAIL or RCPT parameter given twice (501 5.5.4).
    #[error("parameter given twice")]
    DuplicateParameter,
    /// A BDAT line whose size cannot be read: the server cannot stay in step (501, then close).
    #[error("bad BDAT size")]
    BadChunkSize,
    /// A BDAT line whose size was read but whose rest is wrong (`BDAT 5 LASTX`): the chunk is
    /// read and thrown away, and refused with 501 (the session stays in step).
    #[error("bad BDAT arguments")]
    ChunkSyntax(u64),
}

impl CommandError {
    /// The reply the server sends for this error.
    pub fn reply(&self) -> StaticReply {
        let e = EnhancedCode::new;
        match self {
            CommandError::Unknown => StaticReply::new(500, e(5, 5, 1), "Command not recognized"),
            CommandError::Syntax(usage) => StaticReply::new(501, e(5, 5, 4), usage),
            CommandError::InvalidCharacters => {
                StaticReply::new(501, e(5, 5, 2), "Invalid characters in command")
            }
            CommandError::Sender(p) => StaticReply::new(501, e(5, 1, 7), path_text(*p, true)),
            CommandError::Recipient(p) => StaticReply::new(501, e(5, 1, 3), path_text(*p, false)),
            CommandError::UnknownParameter => StaticReply::new(
                555,
                e(5, 5, 4),
                "Parameter not recognized or not implemented",
            ),
            CommandError::InvalidParameter => {
                StaticReply::new(501, e(5, 5, 4), "Invalid parameter value")
            }
            CommandError::DuplicateParameter => {
                StaticReply::new(501, e(5, 5, 4), "Parameter given twice")
            }
            CommandError::BadChunkSize | CommandError::ChunkSyntax(_) => {
                StaticReply::new(501, e(5, 5, 4), "Syntax: BDAT size [LAST]")
            }
        }
    }
}

fn path_text(p: PathError, sender: bool) -> &'static str {
    match (p, sender) {
        (PathError::Syntax, true) => "Bad sender address syntax",
        (PathError::Syntax, false) => "Bad recipient address syntax",
        (PathError::DomainTooLong, _) => "Domain too long",
        (PathError::PathTooLong, _) => "Path too long",
    }
}

/// The usage given for a MAIL line whose parameters do not follow the path with a space.
const MAIL_PARAMETERS: &str = "Syntax: MAIL FROM:<address> [SP keyword[=value]]...";
/// The same for RCPT.
const RCPT_PARAMETERS: &str = "Syntax: RCPT TO:<address> [SP keyword[=value]]...";

impl From<ParamError> for CommandError {
    fn from(e: ParamError) -> Self {
        match e {
            ParamError::Unknown => CommandError::UnknownParameter,
            ParamError::Invalid => CommandError::InvalidParameter,
            ParamError::Duplicate => CommandError::DuplicateParameter,
        }
    }
}

/// Splits the verb (letters up to the first space) from its argument.
fn split_verb(line: &[u8]) -> (&[u8], &[u8]) {
    // Verbs are short: a plain scan beats setting up a vector search.
    match line.iter().take(16).position(|&b| b == b' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &[]),
    }
}

fn verb_is(verb: &[u8], name: &str) -> bool {
    verb.eq_ignore_ascii_case(name.as_bytes())
}

/// MAIL and RCPT arguments need only be UTF-8: their grammar refuses every control character.
fn utf8_arg(arg: &[u8]) -> Result<&str, CommandError> {
    std::str::from_utf8(arg).map_err(|_| CommandError::InvalidCharacters)
}

/// Free-text arguments must be UTF-8 without control characters (TAB aside).
fn text_arg(arg: &[u8]) -> Result<&str, CommandError> {
    let s = std::str::from_utf8(arg).map_err(|_| CommandError::InvalidCharacters)?;
    if s.bytes().any(|c| (c < 32 && c != b'\t') || c == 127) {
        return Err(CommandError::InvalidCharacters);
    }
    Ok(s)
}

fn no_arg<'a>(
    arg: &[u8],
    cmd: Command<'a>,
    usage: &'static str,
) -> Result<Command<'a>, CommandError> {
    if arg.iter().all(|&c| c == b' ') {
        Ok(cmd)
    } else {
        Err(CommandError::Syntax(usage))
    }
}

fn optional(s: &str) -> Option<&str> {
    let s = s.trim_matches(' ');
    (!s.is_empty()).then_some(s)
}

/// Strips a case-insensitive `FROM:`/`TO:` and one optional space after it (a common
/// deviation that Postfix and others accept).
fn strip_keyword<'a>(arg: &'a str, keyword: &str) -> Option<&'a str> {
    let head = arg.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = &arg[keyword.len()..];
    Some(rest.strip_prefix(' ').unwrap_or(rest))
}

impl<'a> Command<'a> {
    /// Parses one command line (without its line ending).
    pub fn parse(line: &'a [u8]) -> Result<Command<'a>, CommandError> {
        // RFC 5321 4.1.1: trailing white space (SP or HTAB) before the line end is tolerated.
        let end = line
            .iter()
            .rposition(|&b| b != b' ' && b != b'\t')
            .map_or(0, |i| i + 1);
        let (verb, arg) = split_verb(&line[..end]);
        match verb.len() {
            4 => {}
            8 if verb_is(verb, "STARTTLS") => {
                return no_arg(arg, Command::StartTls, "Syntax: STARTTLS")
            }
            _ => return Err(CommandError::Unknown),
        }
        let upper = [
            verb[0].to_ascii_uppercase(),
            verb[1].to_ascii_uppercase(),
            verb[2].to_ascii_uppercase(),
            verb[3].to_ascii_uppercase(),
        ];
        match &upper {
            b"MAIL" => {
                let arg = utf8_arg(arg)?;
                let rest = strip_keyword(arg, "FROM:")
                    .ok_or(CommandError::Syntax("Syntax: MAIL FROM:<address>"))?;
                let (path, rest) = parse_reverse_path(rest).map_err(CommandError::Sender)?;
                // The path is whole: what sticks to it (a tab before a parameter) is the
                // line's syntax, not the address's.
                // (A tab among the parameters too: they are separated by spaces, and no
                // value holds one.)
                if (!rest.is_empty() && !rest.starts_with(' ')) || rest.contains('\t') {
                    return Err(CommandError::Syntax(MAIL_PARAMETERS));
                }
                Ok(Command::Mail(path, MailParams::parse(rest)?))
            }
            b"RCPT" => {
                let arg = utf8_arg(arg)?;
                let rest = strip_keyword(arg, "TO:")
                    .ok_or(CommandError::Syntax("Syntax: RCPT TO:<address>"))?;
                let (path, rest) = parse_forward_path(rest).map_err(CommandError::Recipient)?;
                // (A tab among the parameters too: they are separated by spaces, and no
                // value holds one.)
                if (!rest.is_empty() && !rest.starts_with(' ')) || rest.contains('\t') {
                    return Err(CommandError::Syntax(RCPT_PARAMETERS));
                }
                Ok(Command::Rcpt(path, RcptParams::parse(rest)?))
            }
            b"DATA" => no_arg(arg, Command::Data, "Syntax: DATA"),
            b"BDAT" => parse_bdat(arg),
            b"EHLO" | b"HELO" => {
                let name = text_arg(arg)?.trim_matches(' ');
                if name.is_empty() || name.contains(' ') || !is_valid_helo(name) {
                    return Err(CommandError::Syntax(if upper[0] == b'E' {
                        "Syntax: EHLO hostname"
                    } else {
                        "Syntax: HELO hostname"
                    }));
                }
                Ok(if upper[0] == b'E' {
                    Command::Ehlo(name)
                } else {
                    Command::Helo(name)
                })
            }
            b"RSET" => no_arg(arg, Command::Rset, "Syntax: RSET"),
            // RFC 5321 4.1.1.9: whatever follows NOOP is ignored, so it is never refused.
            b"NOOP" => Ok(Command::Noop(text_arg(arg).ok().and_then(optional))),
            b"QUIT" => no_arg(arg, Command::Quit, "Syntax: QUIT"),
            b"VRFY" => optional(text_arg(arg)?)
                .map(Command::Vrfy)
                .ok_or(CommandError::Syntax("Syntax: VRFY address")),
            b"EXPN" => optional(text_arg(arg)?)
                .map(Command::Expn)
                .ok_or(CommandError::Syntax("Syntax: EXPN list")),
            b"HELP" => Ok(Command::Help(optional(text_arg(arg)?))),
            b"AUTH" => {
                let arg = text_arg(arg)?;
                let mut words = arg.split(' ').filter(|w| !w.is_empty());
                let mech = words
                    .next()
                    .ok_or(CommandError::Syntax("Syntax: AUTH mechanism"))?;
                let initial = words.next();
                if words.next().is_some() {
                    return Err(CommandError::Syntax(
                        "Syntax: AUTH mechanism [initial-response]",
                    ));
                }
                Ok(Command::Auth(mech, initial))
            }
            b"SEND" => Ok(Command::Obsolete(Obsolete::Send)),
            b"SOML" => Ok(Command::Obsolete(Obsolete::Soml)),
            b"SAML" => Ok(Command::Obsolete(Obsolete::Saml)),
            b"TURN" => Ok(Command::Obsolete(Obsolete::Turn)),
            _ => Err(CommandError::Unknown),
        }
    }

    /// Appends the command line, CR LF included.
    pub fn encode(&self, out: &mut String) {
        let _ = match self {
            Command::Helo(d) => write!(out, "HELO {d}"),
            Command::Ehlo(d) => write!(out, "EHLO {d}"),
            Command::Mail(path, params) => {
                let _ = write!(out, "MAIL FROM:{path}");
                params.encode(out);
                Ok(())
            }
            Command::Rcpt(path, params) => {
                let _ = write!(out, "RCPT TO:{path}");
                params.encode(out);
                Ok(())
            }
            Command::Data => write!(out, "DATA"),
            Command::Bdat { size, last: true } => write!(out, "BDAT {size} LAST"),
            Command::Bdat { size, last: false } => write!(out, "BDAT {size}"),
            Command::Rset => write!(out, "RSET"),
            Command::Noop(None) => write!(out, "NOOP"),
            Command::Noop(Some(s)) => write!(out, "NOOP {s}"),
            Command::Quit => write!(out, "QUIT"),
            Command::Vrfy(s) => write!(out, "VRFY {s}"),
            Command::Expn(s) => write!(out, "EXPN {s}"),
            Command::Help(None) => write!(out, "HELP"),
            Command::Help(Some(s)) => write!(out, "HELP {s}"),
            Command::StartTls => write!(out, "STARTTLS"),
            Command::Auth(m, None) => write!(out, "AUTH {m}"),
            Command::Auth(m, Some(r)) => write!(out, "AUTH {m} {r}"),
            Command::Obsolete(o) => write!(
                out,
                "{}",
                match o {
                    Obsolete::Send => "SEND",
                    Obsolete::Soml => "SOML",
                    Obsolete::Saml => "SAML",
                    Obsolete::Turn => "TURN",
                }
            ),
        };
        out.push_str("\r\n");
    }
}

fn parse_bdat(arg: &[u8]) -> Result<Command<'static>, CommandError> {
    let arg = std::str::from_utf8(arg).map_err(|_| CommandError::BadChunkSize)?;
    let mut words = arg.split(' ').filter(|w| !w.is_empty());
    let size = words
        .next()
        .and_then(parse_decimal)
        .ok_or(CommandError::BadChunkSize)?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(CommandError::ChunkSyntax(size)),
    };
    if words.next().is_some() {
        return Err(CommandError::ChunkSyntax(size));
    }
    Ok(Command::Bdat { size, last })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::{Host, Mailbox};
    use crate::params::BodyType;

    fn parse(s: &str) -> Result<Command<'_>, CommandError> {
        Command::parse(s.as_bytes())
    }

    fn round_trip(c: Command<'_>) {
        let mut s = String::new();
        c.encode(&mut s);
        let line = s.strip_suffix("\r\n").unwrap();
        assert_eq!(Command::parse(line.as_bytes()), Ok(c), "{line}");
    }

    #[test]
    fn trailing_spaces_and_tabs_are_tolerated() {
        // RFC 5321 4.1.1: receivers SHOULD tolerate trailing white space.
        for tail in [" ", "\t", " \t", "\t \t"] {
            assert_eq!(parse(&format!("QUIT{tail}")), Ok(Command::Quit), "{tail:?}");
            assert_eq!(parse(&format!("DATA{tail}")), Ok(Command::Data), "{tail:?}");
            assert_eq!(
                parse(&format!("BDAT 5 LAST{tail}")),
                Ok(Command::Bdat {
                    size: 5,
                    last: true
                }),
                "{tail:?}"
            );
            assert_eq!(
                parse(&format!("EHLO x.test{tail}")),
                Ok(Command::Ehlo("x.test"))
            );
            assert!(matches!(
                parse(&format!("MAIL FROM:<a@b.test> SIZE=10{tail}")),
                Ok(Command::Mail(_, p)) if p.size == Some(10)
            ));
            assert!(matches!(
                parse(&format!("RCPT TO:<c@d.test>{tail}")),
                Ok(Command::Rcpt(..))
            ));
        }
        // Inside the line a tab is still not a separator.
        assert_eq!(parse("QUIT\tnow"), Err(CommandError::Unknown));
    }

    #[test]
    fn verbs_are_case_insensitive() {
        assert_eq!(
            parse("eHlO client.example"),
            Ok(Command::Ehlo("client.example"))
        );
        assert_eq!(parse("quit"), Ok(Command::Quit));
        assert_eq!(parse("StartTLS"), Ok(Command::StartTls));
        assert_eq!(
            parse("mail from:<>"),
            Ok(Command::Mail(ReversePath::Null, MailParams::default()))
        );
    }

    #[test]
    fn mail_with_params() {
        let c = parse("MAIL FROM:<a@b.example> SIZE=10 BODY=BINARYMIME").unwrap();
        let Command::Mail(ReversePath::Mailbox(m), p) = c else {
            panic!("{c:?}")
        };
        assert_eq!(m.host, Host::Domain("b.example"));
        assert_eq!((p.size, p.body), (Some(10), Some(BodyType::BinaryMime)));
    }

    #[test]
    fn space_after_colon_is_tolerated() {
        assert!(matches!(parse("MAIL FROM: <a@b>"), Ok(Command::Mail(..))));
        assert!(matches!(parse("RCPT TO: <a@b>"), Ok(Command::Rcpt(..))));
    }

    #[test]
    fn errors_map_to_replies() {
        let code = |s: &str| {
            let r = parse(s).unwrap_err().reply();
            format!("{} {}", r.code, r.enhanced)
        };
        assert_eq!(code("FROB"), "500 5.5.1");
        assert_eq!(code("MAILX FROM:<>"), "500 5.5.1");
        assert_eq!(code("MAIL TO:<a@b>"), "501 5.5.4");
        assert_eq!(code("MAIL FROM:a@b"), "501 5.1.7");
        assert_eq!(code("RCPT TO:<a@@b>"), "501 5.1.3");
        assert_eq!(code("MAIL FROM:<a@b> FOO=BAR"), "555 5.5.4");
        assert_eq!(code("MAIL FROM:<a@b> SIZE=x"), "501 5.5.4");
        // The path is whole: what sticks to it is the line's syntax, not the address's.
        assert_eq!(code("MAIL FROM:<a@b>SIZE=1"), "501 5.5.4");
        assert_eq!(code("MAIL FROM:<a@b>\tSIZE=1"), "501 5.5.4");
        assert_eq!(code("RCPT TO:<a@b>\tNOTIFY=NEVER"), "501 5.5.4");
        assert!(parse("MAIL FROM:<a@b> SIZE=1\tBODY=8BITMIME")
            .unwrap_err()
            .reply()
            .text
            .starts_with("Syntax: MAIL FROM:<address> [SP"));
        // Trailing white space is still tolerated (RFC 5321 4.1.1).
        assert!(parse("MAIL FROM:<a@b> SIZE=1\t").is_ok());
        assert!(parse("MAIL FROM:<a@b>\tSIZE=1")
            .unwrap_err()
            .reply()
            .text
            .starts_with("Syntax: MAIL FROM:<address> [SP"));
        assert_eq!(code("MAIL FROM:<a@b> SIZE=1 SIZE=1"), "501 5.5.4");
        assert_eq!(
            parse("RCPT TO:<a@b> NOTIFY=NEVER NOTIFY=NEVER")
                .unwrap_err()
                .reply()
                .text,
            "Parameter given twice"
        );
        assert_eq!(code("DATA now"), "501 5.5.4");
        assert_eq!(code("BDAT x"), "501 5.5.4");
        assert_eq!(code("BDAT 10 FIRST"), "501 5.5.4");
        // The size was read: the chunk can be skipped.
        assert_eq!(parse("BDAT 10 FIRST"), Err(CommandError::ChunkSyntax(10)));
        assert_eq!(parse("BDAT 7 LAST LAST"), Err(CommandError::ChunkSyntax(7)));
        assert_eq!(parse("BDAT x LAST"), Err(CommandError::BadChunkSize));
        assert_eq!(code("BDAT 99999999999999999999"), "501 5.5.4");
        assert_eq!(code("BDAT 00000000000000000000001 0"), "501 5.5.4");
        // chunk-size is 1*DIGIT (RFC 3030 2): leading zeros, however many, are a size.
        assert_eq!(
            parse("BDAT 00000000000000000000000005 LAST").unwrap(),
            Command::Bdat {
                size: 5,
                last: true
            }
        );
        assert_eq!(
            parse("BDAT 0000000000000000000000").unwrap(),
            Command::Bdat {
                size: 0,
                last: false
            }
        );
        assert_eq!(code("BDAT 000000009999999999999999999999"), "501 5.5.4");
        assert_eq!(code("EHLO"), "501 5.5.4");
        assert_eq!(code("HELO a b"), "501 5.5.4");
        assert_eq!(code("VRFY \u{1}"), "501 5.5.2");
        // NOOP's argument is ignored (RFC 5321 4.1.1.9), whatever it holds.
        assert!(matches!(parse("NOOP \u{1}"), Ok(Command::Noop(None))));
        assert_eq!(code("VRFY"), "501 5.5.4");
    }

    #[test]
    fn invalid_utf8_is_refused() {
        assert_eq!(
            Command::parse(b"MAIL FROM:<\xff@b>"),
            Err(CommandError::InvalidCharacters)
        );
    }

    #[test]
    fn obsolete_commands() {
        assert_eq!(parse("TURN"), Ok(Command::Obsolete(Obsolete::Turn)));
        assert_eq!(
            parse("saml FROM:<a@b>"),
            Ok(Command::Obsolete(Obsolete::Saml))
        );
    }

    #[test]
    fn every_command_round_trips() {
        let mb = Mailbox {
            local: "\"x y\"",
            host: Host::Domain("example.org"),
            route_utf8: false,
        };
        for c in [
            Command::Helo("a.example"),
            Command::Ehlo("[192.0.2.1]"),
            Command::Mail(ReversePath::Null, MailParams::default()),
            Command::Mail(
                ReversePath::Mailbox(mb),
                MailParams {
                    size: Some(5),
                    body: Some(BodyType::EightBitMime),
                    smtputf8: true,
                    ret: Some(crate::params::Ret::Full),
                    envid: Some("id+2B"),
                    auth: Some("<>"),
                },
            ),
            Command::Rcpt(ForwardPath::Postmaster, RcptParams::default()),
            Command::Rcpt(
                ForwardPath::Mailbox(mb),
                RcptParams {
                    notify: Some(crate::params::Notify::NEVER),
                    orcpt: Some("rfc822;x@y"),
                },
            ),
            Command::Data,
            Command::Bdat {
                size: 0,
                last: true,
            },
            Command::Bdat {
                size: 1 << 40,
                last: false,
            },
            Command::Rset,
            Command::Noop(None),
            Command::Noop(Some("hello there")),
            Command::Quit,
            Command::Vrfy("postmaster"),
            Command::Expn("list"),
            Command::Help(None),
            Command::Help(Some("MAIL")),
            Command::StartTls,
            Command::Auth("PLAIN", Some("AGEAYg==")),
            Command::Auth("LOGIN", None),
            Command::Obsolete(Obsolete::Send),
            Command::Obsolete(Obsolete::Soml),
            Command::Obsolete(Obsolete::Saml),
            Command::Obsolete(Obsolete::Turn),
        ] {
            round_trip(c);
        }
    }
}
