//! Entry points for the fuzz targets in `fuzz/`, kept here so that each target is one line and
//! the checks compile (and run in unit tests) with the crate. Each takes arbitrary bytes and
//! panics only when an invariant breaks.

use std::sync::Arc;

use crate::data::{decode_all, DataDecoder};
use crate::framer::{Frame, LineFramer};
use crate::reply::{ParsedReply, ReplyParser};
use crate::server::{Event, ServerConfig, ServerSession};
use crate::stuff::DotStuffer;
use crate::Command;

/// First byte picks a split point in the rest.
fn split(data: &[u8]) -> (&[u8], usize) {
    match data.split_first() {
        Some((&b, rest)) => (rest, usize::from(b) * rest.len() / 256),
        None => (data, 0),
    }
}

/// Frames `pieces`, delivered one after another as reads, with a `max_line` cap: each line,
/// or None for a line over the cap. Checks that no line exceeds the cap and that the caller
/// never has to keep an overlong line. Shared by the fuzz target and the property tests.
pub fn frame_pieces(max_line: usize, pieces: &[&[u8]]) -> Vec<Option<Vec<u8>>> {
    let mut f = LineFramer::new(max_line);
    let mut buf = Vec::new();
    let mut out = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            match f.next_line(&buf) {
                Frame::Line { line, consumed } => {
                    assert!(line.len() + 2 <= max_line, "line over the cap");
                    out.push(Some(line.to_vec()));
                    buf.drain(..consumed);
                }
                Frame::TooLong { consumed, .. } => {
                    out.push(None);
                    buf.drain(..consumed);
                }
                Frame::Incomplete { consumed } => {
                    buf.drain(..consumed);
                    break;
                }
            }
        }
        assert!(
            buf.len() < max_line,
            "framer made the caller buffer an overlong line"
        );
    }
    out
}

/// The framer gives the same lines however the input is split, and never more than the cap.
pub fn framer(data: &[u8]) {
    let (input, cut) = split(data);
    assert_eq!(
        frame_pieces(64, &[&input[..cut], &input[cut..]]),
        frame_pieces(64, &[input])
    );
}

/// A parsed command encodes to a line that parses to the same command.
pub fn command(data: &[u8]) {
    if let Ok(cmd) = Command::parse(data) {
        let mut line = String::new();
        cmd.encode(&mut line);
        let line = line.strip_suffix("\r\n").unwrap_or(&line);
        assert_eq!(Command::parse(line.as_bytes()), Ok(cmd), "{line}");
    }
}

/// DATA decoding does not depend on splits; a decoded body re-stuffed decodes to itself.
pub fn data(data: &[u8]) {
    let (input, cut) = split(data);
    let mut whole = Vec::new();
    let mut d = DataDecoder::new();
    let (end, used) = decode_all(&mut d, input, &mut whole);
    let mut parts = Vec::new();
    let mut d2 = DataDecoder::new();
    let (e1, n1) = decode_all(&mut d2, &input[..cut], &mut parts);
    let (e2, n2) = if e1 {
        (true, 0)
    } else {
        decode_all(&mut d2, &input[cut..], &mut parts)
    };
    assert_eq!((&parts, e2, n1 + n2), (&whole, end, used));
    if end {
        let mut s = DotStuffer::new();
        let mut wire = Vec::new();
        for slice in s.stuff(&whole) {
            wire.extend_from_slice(slice);
        }
        wire.extend_from_slice(s.finish());
        let mut again = Vec::new();
        let (e, n) = decode_all(&mut DataDecoder::new(), &wire, &mut again);
        assert!(e && n == wire.len());
        // The decoder's output always ends lines in CRLF, so re-stuffing adds nothing.
        if whole.is_empty() || whole.ends_with(b"\r\n") {
            assert_eq!(again, whole);
        }
    }
}

/// BDAT chunk decoding takes exactly the chunk, however it arrives.
pub fn bdat(data: &[u8]) {
    let (input, cut) = split(data);
    let size = (cut as u64).min(input.len() as u64 / 2);
    let mut d = crate::bdat::ChunkDecoder::new(size);
    let a = d.decode(&input[..cut]).bytes.len();
    let b = d.decode(&input[cut..]).bytes.len();
    assert_eq!((a + b) as u64, size.min(input.len() as u64));
    assert_eq!(d.remaining(), 0);
}

/// The replies (code and lines) a parser with a line cap of `cap` finds in `pieces` read one
/// after another, up to and with the first error.
fn replies_in(cap: usize, pieces: &[&[u8]]) -> Vec<Result<(u16, Vec<String>), String>> {
    let mut p = ReplyParser::with_line_cap(cap);
    let mut buf: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            match p.parse(&buf) {
                ParsedReply::Complete { reply, consumed } => {
                    buf.drain(..consumed);
                    out.push(Ok((reply.code, reply.lines)));
                }
                ParsedReply::Incomplete { consumed } => {
                    buf.drain(..consumed);
                    break;
                }
                ParsedReply::Error { error, .. } => {
                    out.push(Err(error.to_string()));
                    return out;
                }
            }
            // Never more than the cap's worth of one line held, and the piece just read.
            assert!(buf.len() <= cap + piece.len());
        }
    }
    out
}

/// The reply parser never panics and consumes what it reports; with a small line cap, the
/// replies found do not depend on how the input was cut into reads (overlong lines
/// included).
pub fn reply(data: &[u8]) {
    let (input, cut) = split(data);
    let whole = replies_in(64, &[input]);
    assert_eq!(whole, replies_in(64, &[&input[..cut], &input[cut..]]));
    let bytewise: Vec<&[u8]> = input.chunks(1).collect();
    assert_eq!(whole, replies_in(64, &bytewise));
    let mut p = ReplyParser::new();
    let mut pos = 0;
    while pos < data.len() {
        let consumed = match p.parse(&data[pos..]) {
            ParsedReply::Complete { reply, consumed } => {
                assert!((200..600).contains(&reply.code) && !reply.lines.is_empty());
                consumed
            }
            ParsedReply::Incomplete { consumed } => {
                if consumed == 0 {
                    break;
                }
                consumed
            }
            ParsedReply::Error { consumed, .. } => consumed.max(1),
        };
        assert!(consumed <= data.len() - pos);
        pos += consumed;
    }
}

fn run_session(input: &[u8], cut: usize) -> (Vec<u8>, usize) {
    let config = Arc::new(ServerConfig {
        max_message_size: 4096,
        ..ServerConfig::default()
    });
    let mut s = ServerSession::new(config, true);
    s.greet();
    let mut buf = Vec::new();
    let mut messages = 0;
    'outer: for piece in [&input[..cut], &input[cut..]] {
        buf.extend_from_slice(piece);
        loop {
            let step = s.handle(&buf);
            let consumed = step.consumed;
            match step.event {
                Event::NeedInput => {
                    buf.drain(..consumed);
                    break;
                }
                Event::Close => break 'outer,
                Event::StartTls => {
                    buf.clear();
                    s.tls_established();
                    continue;
                }
                Event::Mail(..) | Event::Rcpt(..) | Event::DataStart => s.accept(),
                Event::DataEnd => {
                    messages += 1;
                    s.message_queued("FUZZ");
                }
                // Replies stay in the output, to be compared whole at the end.
                Event::Body(_) | Event::DataAbort | Event::Flush => {}
            }
            buf.drain(..consumed);
        }
    }
    (s.output().to_vec(), messages)
}

/// A whole server session over arbitrary client bytes: replies do not depend on how the bytes
/// arrive (STARTTLS aside, which drops what follows it in the same read), and every reply line
/// is well formed.
pub fn server_session(data: &[u8]) {
    let (input, cut) = split(data);
    let whole = run_session(input, 0);
    if !input
        .windows(8)
        .any(|w| w.eq_ignore_ascii_case(b"STARTTLS"))
    {
        assert_eq!(run_session(input, cut), whole);
    }
    for line in whole.0.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        assert!(
            line.len() >= 5 && line[..3].iter().all(u8::is_ascii_digit) && line.ends_with(b"\r")
        );
    }
}

/// A client session against a next hop whose every byte is the input's, read a line at a
/// time: transactions (one to three, each with one to four recipients, DATA or BDAT, as the
/// first two bytes say) are
/// sent whenever the session lets them go, bodies counted as written at once. No panic, no
/// event the client did not ask for (STARTTLS), never more outcomes than transactions sent,
/// and a recipient counts as delivered only when MAIL, its RCPT and the body were all
/// answered 2xx, after its body was written.
pub fn client_session(data: &[u8]) {
    drive_client(data);
}

/// [`client_session`]'s run: transactions sent, and outcomes with a recipient delivered.
fn drive_client(data: &[u8]) -> (usize, usize) {
    use crate::client::{BodyMode, ClientEvent, ClientSession, OutRecipient, Transaction};
    let (plan, rest) = data.split_at(data.len().min(2));
    let plan = [
        plan.first().copied().unwrap_or(0),
        plan.get(1).copied().unwrap_or(0),
    ];
    let wanted = 1 + usize::from(plan[0] % 3);
    let transactions: Vec<Transaction> = (0..wanted)
        .map(|k| Transaction {
            from: format!("s{k}@origin.test"),
            mail_params: String::new(),
            rcpts: (0..1 + usize::from((plan[0] >> 2) % 4))
                .map(|r| OutRecipient {
                    path: format!("r{r}@dest.test"),
                    params: String::new(),
                })
                .collect(),
            body_len: 10 + u64::from(plan[1] >> 4),
            mode: if plan[1] & 1 == 0 {
                BodyMode::Data
            } else {
                BodyMode::Bdat
            },
            chunk_size: u64::from(plan[1] & 2) * 2,
        })
        .collect();
    let input = rest;
    let mut c = ClientSession::new("relay.test");
    if plan[1] & 4 != 0 {
        c.forgo_pipelining();
    }
    let (mut bodies, mut done, mut delivered) = (0usize, 0usize, 0usize);
    // The bodies written before each transaction sent: its own comes after.
    let mut bodies_before: Vec<usize> = Vec::new();
    // As the relay does: each transaction after the first behind a RSET, sent as soon as the
    // session lets it go (at once with PIPELINING, once the RSET is answered without).
    let send_more = |c: &mut ClientSession, bodies_before: &mut Vec<usize>, bodies: usize| {
        while bodies_before.len() < transactions.len() && c.can_send() {
            if !bodies_before.is_empty() {
                c.rset();
                if !c.can_send() {
                    break;
                }
            }
            if c.send(&transactions[bodies_before.len()]).is_err() {
                break;
            }
            bodies_before.push(bodies);
        }
    };
    // Every transaction sent ends with an outcome, or is handed back unfinished.
    let accounted = |c: &mut ClientSession, done: usize, sent: usize| {
        let mut unfinished = 0;
        while c.take_unfinished().is_some() {
            unfinished += 1;
        }
        assert_eq!(done + unfinished, sent, "a transaction lost");
    };
    // The next hop's bytes arrive a line at a time, each read after the client wrote what it
    // had (a reply cannot come before its command); what the session has not consumed yet (a
    // reply not yet whole) stays for the next read.
    let mut lines = input.split_inclusive(|&b| b == b'\n');
    let mut buf = Vec::new();
    // Each call consumes bytes or gives an event, or asks for the next line: a bound all the
    // same.
    for _ in 0..4 * input.len() + 16 {
        let (used, event) = c.handle(&buf);
        assert!(used <= buf.len(), "consumed more than it was given");
        buf.drain(..used);
        match event {
            ClientEvent::NeedInput if used == 0 => match lines.next() {
                Some(line) => buf.extend_from_slice(line),
                None => {
                    if c.settle_unanswered().is_some() {
                        done += 1;
                    }
                    accounted(&mut c, done, bodies_before.len());
                    return (bodies_before.len(), delivered);
                }
            },
            ClientEvent::NeedInput => send_more(&mut c, &mut bodies_before, bodies),
            ClientEvent::Ready => send_more(&mut c, &mut bodies_before, bodies),
            ClientEvent::SendBody => {
                bodies += 1;
                c.body_sent();
                send_more(&mut c, &mut bodies_before, bodies);
            }
            ClientEvent::Done(result) => {
                done += 1;
                let sent = bodies_before.len();
                assert!(done <= sent, "{done} outcomes for {sent} transactions");
                let k = done - 1;
                let rcpts = transactions[k].rcpts.len();
                if result.mail.is_positive() {
                    assert_eq!(result.rcpts.len(), rcpts, "{result:?}");
                }
                let taken = (0..rcpts).any(|i| result.outcome(i).is_positive());
                delivered += usize::from(taken);
                // Its own body was written, after it was sent.
                assert!(
                    !taken || bodies > bodies_before[k],
                    "delivered before its body was written"
                );
                for i in 0..rcpts {
                    if result.outcome(i).is_positive() {
                        assert!(result.mail.is_positive(), "{result:?}");
                        assert!(result.rcpts.get(i).is_some_and(|r| r.is_positive()));
                        assert!(
                            result.data.as_ref().is_some_and(|d| d.is_positive()),
                            "delivered without a 2xx to its body: {result:?}"
                        );
                    }
                }
                send_more(&mut c, &mut bodies_before, bodies);
            }
            ClientEvent::Closed | ClientEvent::Failed(_) => {
                accounted(&mut c, done, bodies_before.len());
                return (bodies_before.len(), delivered);
            }
            ClientEvent::StartTls | ClientEvent::StartTlsRefused(_) => {
                panic!("a STARTTLS event nobody asked for: {event:?}")
            }
        }
        assert!(c.output().len() < 1 << 20);
        c.clear_output();
    }
    panic!("no progress through {} bytes", input.len());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_hold_their_invariants() {
        let seeds: [&[u8]; 8] = [
            b"\x80EHLO a\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nx\n.\n\r\n.\r\nQUIT\r\n",
            // A source route with UTF-8 in it, not written back.
            b"MAIL FROM:<@\xc3\xbc.example:a@b.test>",
            b"MAIL FROM:<a@b.test> AUTH",
            b"\x10EHLO a\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 3 LAST\r\nabcNOOP\r\n",
            b"\xffMAIL FROM:<@x,@y:a@[IPv6:::1]> SIZE=1 BODY=8BITMIME",
            b"\x00250-a\r\n250 b\r\n5xx\r\n",
            b"\x40..\r\n.\r\r.\r\n\r\n.\r\n",
            b"",
        ];
        // Overlong reply lines (past the fuzz target's cap of 64), in and out of a multi-line
        // reply, cut in the middle of one: the same replies however the reads fall.
        let long = format!(
            "\x60250-{}\r\n250 {}\r\n421 {}\r\n250 ok\r\n",
            "a".repeat(100),
            "b".repeat(70),
            " ".repeat(300)
        );
        reply(long.as_bytes());
        // A line one octet short of the cap before its CR LF: its CR is never kept, whether
        // the line came whole or the CR with its first reads.
        reply(&[&b"\x40421"[..], &[b'y'; 60], b"\r\nsy\r\n"].concat());
        assert_eq!(
            replies_in(64, &[&long.as_bytes()[1..]]),
            [
                Ok((250, vec!["a".repeat(58), "b".repeat(58)])),
                Ok((421, vec![" ".repeat(58)])),
                Ok((250, vec!["ok".to_owned()])),
            ]
        );
        for seed in seeds {
            framer(seed);
            command(seed);
            data(seed);
            bdat(seed);
            reply(seed);
            server_session(seed);
            client_session(seed);
        }
        // A whole exchange, pipelined with BDAT, and the same where the body's reply is a
        // refusal and a reply too many follows.
        // Two transactions of two recipients each: 4 and 5 replies (RSET).
        assert_eq!(
            drive_client(
                b"\x04\x01220 hop\r\n250-hop\r\n250-PIPELINING\r\n250 CHUNKING\r\n\
                  250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n\
                  250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n221 bye\r\n",
            ),
            (2, 2)
        );
        assert_eq!(
            drive_client(
                b"\x00\x40220 hop\r\n250 hop\r\n250 ok\r\n250 ok\r\n354 go\r\n\
                  554 no\r\n250 ok\r\n250 extra\r\n",
            ),
            (1, 0)
        );
    }
}
