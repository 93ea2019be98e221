//! A transcript harness: client bytes in, exact reply text out, with a simple policy standing
#![allow(unreachable_pub, dead_code)]
//! in for the embedding (relay control, spool).

use std::sync::Arc;

use postern_proto::server::replies;
use postern_proto::{EnhancedCode, Event, ForwardPath, Host, ServerConfig, ServerSession};

/// What the embedding saw.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Everything the server wrote, in order.
    pub output: String,
    /// Queued messages: reverse path, recipients, body.
    pub messages: Vec<(String, Vec<String>, Vec<u8>)>,
    /// Bodies abandoned after DataStart.
    pub aborted: usize,
    /// DataStart events: bodies the embedding was asked to begin.
    pub starts: usize,
    /// The session asked to close.
    pub closed: bool,
    /// STARTTLS handshakes the session asked for.
    pub tls: usize,
    /// The length of the output written at each `Flush`.
    pub flushed: Vec<usize>,
    /// Messages refused after their data began, as `code enhanced reverse-path recipients`.
    pub refused: Vec<String>,
}

/// Feeds `input` cut at `cuts` to a new session, answering decisions with the test policy:
/// recipients at `denied.example` get 554 5.7.1; `spool-full.example` senders get 452 4.3.1 at
/// DataStart, `refuse-503.example` senders 503 5.5.1. Queue IDs are Q1, Q2, ...
pub fn run(config: &Arc<ServerConfig>, tls: bool, input: &[u8], cuts: &[usize]) -> Outcome {
    let mut s = ServerSession::new(config.clone(), tls);
    s.greet();
    let mut o = Outcome::default();
    let mut buf: Vec<u8> = Vec::new();
    let mut body = Vec::new();
    let mut bounds = cuts.to_vec();
    bounds.push(input.len());
    let mut start = 0;
    'pieces: for end in bounds {
        buf.extend_from_slice(&input[start..end]);
        start = end;
        loop {
            let step = s.handle(&buf);
            let consumed = step.consumed;
            if let Some(r) = s.take_refused() {
                o.refused.push(format!(
                    "{} {} <{}> {}",
                    r.code, r.enhanced, r.reverse_path, r.recipients
                ));
            }
            match step.event {
                Event::NeedInput => {
                    buf.drain(..consumed);
                    break;
                }
                Event::Mail(..) => s.accept(),
                Event::Rcpt(ForwardPath::Mailbox(m), _)
                    if m.host == Host::Domain("denied.example") =>
                {
                    s.reject_with(554, EnhancedCode::new(5, 7, 1), "Relay access denied")
                }
                Event::Rcpt(..) => s.accept(),
                Event::DataStart => {
                    o.starts += 1;
                    if s.envelope().reverse_path().ends_with("@spool-full.example") {
                        s.reject(replies::SPOOL_FULL);
                    } else if s.envelope().reverse_path().ends_with("@refuse-503.example") {
                        s.reject_with(503, EnhancedCode::new(5, 5, 1), "Refused here");
                    } else {
                        body.clear();
                        s.accept();
                    }
                }
                Event::Body(bytes) => body.extend_from_slice(bytes),
                Event::DataEnd => {
                    let env = s.envelope();
                    let rcpts = env.recipients().map(|r| r.path.to_owned()).collect();
                    o.messages.push((
                        env.reverse_path().to_owned(),
                        rcpts,
                        std::mem::take(&mut body),
                    ));
                    let id = format!("Q{}", o.messages.len());
                    s.message_queued(&id);
                }
                Event::DataAbort => {
                    body.clear();
                    o.aborted += 1;
                }
                Event::StartTls => {
                    o.tls += 1;
                    buf.clear();
                    o.output.push_str(&String::from_utf8_lossy(s.output()));
                    s.clear_output();
                    s.tls_established();
                    continue;
                }
                Event::Close => {
                    o.closed = true;
                    break 'pieces;
                }
                Event::Flush => {
                    o.flushed.push(s.output().len());
                    o.output.push_str(&String::from_utf8_lossy(s.output()));
                    s.clear_output();
                }
            }
            buf.drain(..consumed);
        }
    }
    o.output.push_str(&String::from_utf8_lossy(s.output()));
    o
}

/// Runs `input` whole, then split at every byte offset, and checks that every split gives the
/// same outcome. Returns the outcome.
pub fn run_every_split(config: &Arc<ServerConfig>, input: &[u8]) -> Outcome {
    let whole = run(config, false, input, &[]);
    for cut in 1..input.len() {
        let split = run(config, false, input, &[cut]);
        assert_eq!(split, whole, "split at byte {cut}");
    }
    let bytewise: Vec<usize> = (1..input.len()).collect();
    assert_eq!(run(config, false, input, &bytewise), whole, "byte by byte");
    whole
}

/// Client lines joined with CRLF.
pub fn client(lines: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    for l in lines {
        v.extend_from_slice(l.as_bytes());
        v.extend_from_slice(b"\r\n");
    }
    v
}

/// Server reply lines joined with CRLF.
pub fn server(lines: &[&str]) -> String {
    lines.iter().map(|l| format!("{l}\r\n")).collect()
}

/// The default configuration with hostname `mx.test`.
pub fn config() -> Arc<ServerConfig> {
    Arc::new(ServerConfig {
        hostname: "mx.test".into(),
        max_message_size: 10_000,
        ..ServerConfig::default()
    })
}
