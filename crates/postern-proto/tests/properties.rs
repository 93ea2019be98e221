//! Property tests: round trips and split-independence for arbitrary inputs.
#![allow(clippy::unwrap_used)]

mod support;

use proptest::prelude::*;

use postern_proto::command::Obsolete;
use postern_proto::data::{decode_all, DataDecoder};
use postern_proto::params::{BodyType, MailParams, Notify, RcptParams, Ret};
use postern_proto::stuff::DotStuffer;
use postern_proto::{Command, ForwardPath, Host, Mailbox, ReversePath};

/// Cuts `len` bytes at sorted offsets drawn from `raw`.
fn cuts(raw: &[usize], len: usize) -> Vec<usize> {
    let mut c: Vec<usize> = raw
        .iter()
        .map(|r| if len == 0 { 0 } else { r % (len + 1) })
        .collect();
    c.sort_unstable();
    c
}

fn pieces<'a>(input: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    for &c in cuts.iter().chain(std::iter::once(&input.len())) {
        out.push(&input[start..c]);
        start = c;
    }
    out
}

/// A body of CRLF-terminated lines that may start with dots and hold any other byte.
fn crlf_body() -> impl Strategy<Value = Vec<u8>> {
    let line = prop_oneof![
        proptest::collection::vec(
            any::<u8>().prop_filter("no CR/LF", |b| *b != b'\r' && *b != b'\n'),
            0..40
        ),
        Just(b".".to_vec()),
        Just(b"..".to_vec()),
        Just(b".x".to_vec()),
    ];
    proptest::collection::vec(line, 0..20).prop_map(|lines| {
        let mut body = Vec::new();
        for l in lines {
            body.extend_from_slice(&l);
            body.extend_from_slice(b"\r\n");
        }
        body
    })
}

fn frame_all(input: &[u8], cuts: &[usize]) -> Vec<Option<Vec<u8>>> {
    postern_proto::fuzzing::frame_pieces(64, &pieces(input, cuts))
}

fn atom() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9!#$%&'*+/=?^_`{|}~-]{1,8}"
}

fn local_part() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::collection::vec(atom(), 1..4).prop_map(|a| a.join(".")),
        "[a-z @<>.,]{0,10}".prop_map(|s| format!("\"{s}\"")),
    ]
}

fn domain() -> impl Strategy<Value = String> {
    // No label of the A-label form (`xn--`): one that is no A-label is refused on purpose.
    let label = "[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?"
        .prop_filter("an A-label's prefix", |l: &String| !l.starts_with("xn--"));
    proptest::collection::vec(label, 1..4).prop_map(|l| l.join("."))
}

fn host(domain: &str) -> impl Strategy<Value = Host<'_>> {
    prop_oneof![
        Just(Host::Domain(domain)),
        any::<[u8; 4]>().prop_map(|a| Host::Ipv4(a.into())),
        any::<[u16; 8]>().prop_map(|a| Host::Ipv6(a.into())),
    ]
}

/// xtext whose escapes decode to printable US-ASCII (0x20 to 0x7E), as ENVID's must.
fn xtext() -> impl Strategy<Value = String> {
    "([!-*,-<>-~]|\\+[2-6][0-9A-F]|\\+7[0-9A-E]){1,12}"
}

fn text() -> impl Strategy<Value = String> {
    "[!-~]([ !-~]{0,10}[!-~])?"
}

/// Owned material for one generated command; `command` borrows from it.
#[derive(Debug, Clone)]
struct Material {
    kind: u8,
    local: String,
    domain: String,
    host_pick: u8,
    v4: [u8; 4],
    v6: [u16; 8],
    text: String,
    xtext: String,
    size: Option<u64>,
    flags: u8,
    number: u64,
}

fn material() -> impl Strategy<Value = Material> {
    (
        (
            0u8..19,
            local_part(),
            domain(),
            0u8..3,
            any::<[u8; 4]>(),
            any::<[u16; 8]>(),
        ),
        (
            text(),
            xtext(),
            proptest::option::of(0u64..u64::MAX / 2),
            any::<u8>(),
            any::<u64>(),
        ),
    )
        .prop_map(
            |((kind, local, domain, host_pick, v4, v6), (text, xtext, size, flags, number))| {
                Material {
                    kind,
                    local,
                    domain,
                    host_pick,
                    v4,
                    v6,
                    text,
                    xtext,
                    size,
                    flags,
                    number: number % 10_000_000_000_000_000_000,
                }
            },
        )
}

fn command(m: &Material) -> Command<'_> {
    let host = match m.host_pick {
        0 => Host::Domain(&m.domain),
        1 => Host::Ipv4(m.v4.into()),
        _ => Host::Ipv6(m.v6.into()),
    };
    let mailbox = Mailbox {
        local: &m.local,
        host,
        route_utf8: false,
    };
    let f = m.flags;
    match m.kind {
        0 => Command::Helo(&m.domain),
        1 => Command::Ehlo(&m.domain),
        2 => Command::Mail(ReversePath::Null, MailParams::default()),
        3 => Command::Mail(
            ReversePath::Mailbox(mailbox),
            MailParams {
                size: m.size,
                body: [
                    None,
                    Some(BodyType::SevenBit),
                    Some(BodyType::EightBitMime),
                    Some(BodyType::BinaryMime),
                ][usize::from(f & 3)],
                smtputf8: f & 4 != 0,
                ret: [None, Some(Ret::Full), Some(Ret::Hdrs)][usize::from(f >> 3) % 3],
                envid: (f & 32 != 0).then_some(m.xtext.as_str()),
                auth: (f & 64 != 0).then_some(m.xtext.as_str()),
            },
        ),
        4 => Command::Rcpt(ForwardPath::Postmaster, RcptParams::default()),
        5 => Command::Rcpt(
            ForwardPath::Mailbox(mailbox),
            RcptParams {
                notify: (f & 8 != 0).then(|| Notify::from_bits(f)),
                orcpt: None,
            },
        ),
        6 => Command::Data,
        7 => Command::Bdat {
            size: m.number,
            last: f & 1 != 0,
        },
        8 => Command::Rset,
        9 => Command::Noop((f & 1 != 0).then_some(m.text.as_str())),
        10 => Command::Quit,
        11 => Command::Vrfy(&m.text),
        12 => Command::Expn(&m.text),
        13 => Command::Help((f & 1 != 0).then_some(m.text.as_str())),
        14 => Command::StartTls,
        15 => Command::Auth("PLAIN", (f & 1 != 0).then_some(m.xtext.as_str())),
        16 => Command::Obsolete(Obsolete::Send),
        17 => Command::Obsolete(Obsolete::Turn),
        _ => Command::Obsolete(Obsolete::Saml),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn dot_stuffing_round_trips_under_any_split(body in crlf_body(), raw in proptest::collection::vec(any::<usize>(), 0..6)) {
        let mut stuffer = DotStuffer::new();
        let mut wire = Vec::new();
        for piece in pieces(&body, &cuts(&raw, body.len())) {
            for slice in stuffer.stuff(piece) {
                wire.extend_from_slice(slice);
            }
        }
        wire.extend_from_slice(stuffer.finish());
        wire.extend_from_slice(b"NEXT");
        let mut decoder = DataDecoder::new();
        let mut decoded = Vec::new();
        let mut used = 0;
        let mut done = false;
        let mut buf = Vec::new();
        for piece in pieces(&wire, &cuts(&raw, wire.len())) {
            buf.extend_from_slice(piece);
            let (end, n) = decode_all(&mut decoder, &buf, &mut decoded);
            used += n;
            buf.drain(..n);
            if end { done = true; break; }
        }
        prop_assert!(done);
        prop_assert_eq!(used, wire.len() - 4);
        prop_assert_eq!(decoded, body);
        prop_assert!(!decoder.saw_bare_newline());
    }

    #[test]
    fn data_decoding_does_not_depend_on_splits(input in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), any::<u8>()], 0..200), raw in proptest::collection::vec(any::<usize>(), 0..6)) {
        let mut whole = Vec::new();
        let (end, used) = decode_all(&mut DataDecoder::new(), &input, &mut whole);
        let mut decoder = DataDecoder::new();
        let mut split = Vec::new();
        let mut total = 0;
        let mut split_end = false;
        for piece in pieces(&input, &cuts(&raw, input.len())) {
            if split_end { break; }
            let (e, n) = decode_all(&mut decoder, piece, &mut split);
            total += n;
            split_end = e;
        }
        prop_assert_eq!((split, split_end, total), (whole, end, used));
    }

    #[test]
    fn framer_does_not_depend_on_splits(input in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), any::<u8>()], 0..400), raw in proptest::collection::vec(any::<usize>(), 0..8)) {
        prop_assert_eq!(frame_all(&input, &cuts(&raw, input.len())), frame_all(&input, &[]));
    }

    #[test]
    fn bdat_chunking_round_trips(body in proptest::collection::vec(any::<u8>(), 0..3000), raw in proptest::collection::vec(any::<usize>(), 0..5)) {
        let mut input = support::client(&["EHLO c.test", "MAIL FROM:<a@b.test> BODY=BINARYMIME", "RCPT TO:<c@d.test>"]);
        let chunks = pieces(&body, &cuts(&raw, body.len()));
        for (i, chunk) in chunks.iter().enumerate() {
            let last = if i + 1 == chunks.len() { " LAST" } else { "" };
            input.extend_from_slice(format!("BDAT {}{last}\r\n", chunk.len()).as_bytes());
            input.extend_from_slice(chunk);
        }
        let o = support::run(&support::config(), false, &input, &cuts(&raw, input.len()));
        prop_assert_eq!(o.messages.len(), 1, "{}", o.output);
        prop_assert_eq!(&o.messages[0].2, &body);
    }

    #[test]
    fn commands_round_trip(m in material()) {
        let cmd = command(&m);
        let mut line = String::new();
        cmd.encode(&mut line);
        let line = line.strip_suffix("\r\n").unwrap();
        prop_assert_eq!(Command::parse(line.as_bytes()), Ok(cmd), "{}", line);
    }

    #[test]
    fn parsing_never_panics(line in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = Command::parse(&line);
    }
}

#[test]
fn host_strategy_is_used() {
    // Keeps the address-literal strategy honest: both literal kinds round-trip through paths.
    let mut runner = proptest::test_runner::TestRunner::default();
    runner
        .run(&host("example.test"), |h| {
            let text = format!("MAIL FROM:<x@{h}>");
            let parsed = Command::parse(text.as_bytes());
            prop_assert!(
                matches!(parsed, Ok(Command::Mail(ReversePath::Mailbox(m), _)) if m.host == h)
            );
            Ok(())
        })
        .unwrap();
}
