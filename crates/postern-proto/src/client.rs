//! The client session, for the relay and the load generator: greeting, EHLO with fallback to
//! HELO, capabilities, STARTTLS, and transactions pipelined when the server offers PIPELINING,
//! with the body sent by DATA (dot-stuffed by [`crate::stuff::DotStuffer`]) or by BDAT, in one
//! `BDAT n LAST` or, pipelined, in several chunks ([`BdatChunk`]).
//!
//! Like the server side it does no I/O: [`ClientSession::handle`] takes the server's bytes and
//! returns one [`ClientEvent`]; commands accumulate in [`ClientSession::output`].

use std::collections::VecDeque;
use std::fmt::Write;

use crate::reply::{ParsedReply, Reply, ReplyError, ReplyParser};

/// The most commands of one transaction written before their replies are read, with
/// PIPELINING: the rest wait for those replies and go in groups as large. A group must fit
/// the connection's window (RFC 2920 3.1): a next hop that blocks writing replies nobody
/// reads stops reading, and a client still writing a thousand RCPTs and a BDAT body after
/// them would wait for it for ever. A hundred replies are a few KiB (at most 51 KiB of
/// 512-octet lines), well within the socket buffers on both sides.
pub const PIPELINED_GROUP: usize = 100;

/// What the server offered in its EHLO reply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// The server answered EHLO (otherwise HELO, and nothing below is offered).
    pub esmtp: bool,
    /// PIPELINING (RFC 2920).
    pub pipelining: bool,
    /// CHUNKING (RFC 3030).
    pub chunking: bool,
    /// BINARYMIME (RFC 3030).
    pub binarymime: bool,
    /// SIZE, with the limit when one was given (0 means no fixed limit).
    pub size: Option<u64>,
    /// STARTTLS (RFC 3207).
    pub starttls: bool,
    /// 8BITMIME (RFC 6152).
    pub eightbitmime: bool,
    /// SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// ENHANCEDSTATUSCODES (RFC 2034).
    pub enhanced_status_codes: bool,
    /// DSN (RFC 3461).
    pub dsn: bool,
    /// AUTH mechanisms offered (RFC 4954), space-separated as sent.
    pub auth: Option<String>,
}

impl Capabilities {
    /// Reads the lines of an EHLO reply after the first.
    pub fn from_ehlo(reply: &Reply) -> Self {
        let mut caps = Capabilities {
            esmtp: true,
            ..Capabilities::default()
        };
        for line in reply.lines.iter().skip(1) {
            // Blanks of any kind between and after the words (`DSN<TAB>`, `SIZE  1000`).
            let mut words = line.split_ascii_whitespace();
            let keyword = words.next().unwrap_or("").to_ascii_uppercase();
            match keyword.as_str() {
                "PIPELINING" => caps.pipelining = true,
                "CHUNKING" => caps.chunking = true,
                "BINARYMIME" => caps.binarymime = true,
                "SIZE" => caps.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "STARTTLS" => caps.starttls = true,
                "8BITMIME" => caps.eightbitmime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "ENHANCEDSTATUSCODES" => caps.enhanced_status_codes = true,
                "DSN" => caps.dsn = true,
                "AUTH" => caps.auth = Some(words.collect::<Vec<_>>().join(" ")),
                _ => {}
            }
        }
        caps
    }
}

/// How the body goes out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyMode {
    /// DATA, then the dot-stuffed body and `.CRLF`.
    Data,
    /// The raw body after `BDAT n LAST`, or in chunks of [`Transaction::chunk_size`].
    Bdat,
}

/// One BDAT chunk of a body (RFC 3030): the command to write, then `len` octets of the body
/// from `offset`.
///
/// The first chunk's command is already at the end of [`ClientSession::output`] when
/// [`ClientEvent::SendBody`] comes, as it is for a body sent in one chunk, so its `header` is
/// empty; every later chunk's `header` (`BDAT n\r\n`, the last `BDAT n LAST\r\n`) goes out
/// right before its octets. Writing, for each chunk in order, `header` and then its octets
/// sends the whole body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BdatChunk {
    /// The BDAT command line with its CRLF; empty for the first chunk.
    pub header: String,
    /// Where the chunk starts in the body.
    pub offset: u64,
    /// Octets in the chunk.
    pub len: u64,
}

/// One recipient of an outgoing transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutRecipient {
    /// The mailbox, without angle brackets.
    pub path: String,
    /// Parameters to append to RCPT TO, each with its leading space (NOTIFY=, ORCPT=).
    pub params: String,
}

/// An outgoing transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    /// The reverse path without angle brackets; empty for `<>`.
    pub from: String,
    /// Parameters to append to MAIL FROM after SIZE, each with its leading space.
    pub mail_params: String,
    /// The recipients.
    pub rcpts: Vec<OutRecipient>,
    /// Octets in the body as it will be sent (before dot-stuffing).
    pub body_len: u64,
    /// DATA or BDAT.
    pub mode: BodyMode,
    /// With BDAT, the largest chunk in octets; 0 sends the body as one `BDAT n LAST`. A larger
    /// body goes out in several chunks only when the server offers PIPELINING: all chunks are
    /// written back to back and their replies read afterwards (RFC 2920, RFC 3030 4.2).
    /// Without PIPELINING the body still goes as one chunk, since waiting for each chunk's
    /// reply would only cost round trips. Ignored with DATA.
    pub chunk_size: u64,
}

/// The server's answers to one transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransactionResult {
    /// The reply to MAIL.
    pub mail: Reply,
    /// The reply to each RCPT, in order.
    pub rcpts: Vec<Reply>,
    /// The reply to the body (or to DATA when it was refused); None when never asked.
    pub data: Option<Reply>,
}

impl TransactionResult {
    /// The reply that decides the fate of recipient `i`.
    pub fn outcome(&self, i: usize) -> &Reply {
        if !self.mail.is_positive() {
            return &self.mail;
        }
        match (self.rcpts.get(i), &self.data) {
            (Some(r), _) if !r.is_positive() => r,
            (_, Some(d)) => d,
            (Some(r), None) => r,
            (None, None) => &self.mail,
        }
    }
}

/// Why a session cannot go on. The connection should be closed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The greeting was not 220 (often 421 or 554).
    #[error("server refused the session: {0}")]
    Greeting(Reply),
    /// Neither EHLO nor HELO was accepted.
    #[error("server refused HELO/EHLO: {0}")]
    Helo(Reply),
    /// STARTTLS was refused.
    #[error("server refused STARTTLS: {0}")]
    StartTls(Reply),
    /// The server said 421 or otherwise ended the session.
    #[error("server closed the session: {0}")]
    Closing(Reply),
    /// A reply the command cannot get (RFC 5321 4.3.2), such as 250 to DATA.
    #[error("unexpected reply to {0} ({1})")]
    Unexpected(&'static str, Reply),
    /// The server's bytes were not SMTP replies.
    #[error("protocol error from server: {0}")]
    Protocol(#[from] ReplyError),
    /// A call that the session's state does not allow (an embedding bug).
    #[error("client session used out of order")]
    OutOfOrder,
}

impl ClientError {
    /// Whether trying again later may succeed (every case but a 5xx greeting or HELO refusal).
    pub fn is_temporary(&self) -> bool {
        match self {
            ClientError::Greeting(r) | ClientError::Helo(r) | ClientError::StartTls(r) => {
                !r.is_permanent()
            }
            _ => true,
        }
    }
}

/// What the embedding does next.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// Write the output, then read more.
    NeedInput,
    /// Greeted: capabilities are known and a transaction (or STARTTLS) can start.
    Ready,
    /// STARTTLS was accepted: write the output, do the handshake, then `tls_established`.
    StartTls,
    /// STARTTLS was refused (RFC 3207 4: 454 or 501); the session goes on in cleartext if
    /// the embedding wants it to, as after `Ready`.
    StartTlsRefused(Reply),
    /// Write the output, then the body: for DATA through a `DotStuffer` and its `finish`, for
    /// BDAT raw, chunk by chunk as [`ClientSession::bdat_chunks`] lays out. Then call
    /// `body_sent`.
    SendBody,
    /// The transaction is over.
    Done(TransactionResult),
    /// QUIT was answered.
    Closed,
    /// The session cannot go on.
    Failed(ClientError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    Mail,
    Rcpt,
    /// The 354 to DATA.
    DataGo,
    /// The reply to a BDAT chunk other than the last.
    Chunk,
    /// The reply after the body.
    DataDone,
    Rset,
    /// The RSET after a refusal of DATA that settles the transaction once answered.
    SettleRset,
    /// A NOOP asked to see whether the replies are in step: its only answer is a 250.
    Noop,
    Quit,
}

/// One SMTP client session.
#[derive(Debug)]
pub struct ClientSession {
    helo_name: String,
    out: Vec<u8>,
    parser: ReplyParser,
    caps: Capabilities,
    expect: VecDeque<Expect>,
    /// Commands held back until the reply before them arrives (no PIPELINING).
    held: VecDeque<(Expect, String)>,
    /// The transactions awaiting replies, oldest first. More than one only when transactions
    /// are pipelined into each other (see [`ClientSession::can_send`]); replies come in order,
    /// so every reply belongs to the oldest.
    results: VecDeque<TransactionResult>,
    mode: BodyMode,
    /// The BDAT chunks of the newest transaction's body.
    chunks: Vec<BdatChunk>,
    /// `SendBody` is due to be returned.
    body_pending: bool,
    /// `SendBody` was returned and `body_sent` not yet called.
    body_open: bool,
    tls: bool,
    /// Whole replies read from the server.
    replies: u64,
    /// Without PIPELINING: a RSET or QUIT asked for while replies were awaited, written once
    /// they are all in (RFC 2920 3: no command before the previous one's reply).
    waiting: Option<(Expect, &'static [u8])>,
    /// The session ended with a 421 that answered a RSET.
    closed_at_rset: bool,
    /// A RSET went out (or waits to) after the last transaction: another is not needed.
    reset: bool,
    /// Transactions the session gave up on (a 421, a reply out of step), oldest first, with
    /// the replies they had got.
    abandoned: VecDeque<TransactionResult>,
    /// A reply other than 250 to the NOOP of [`ClientSession::noop`], for the embedding to
    /// weigh: a server that does not take NOOP, or the answer to an earlier command.
    noop_refused: Option<Reply>,
    /// The server said 421 to the RSET that settles a refusal of DATA, or the connection
    /// ended or fell silent before its reply: nothing more may go out on it.
    closing: bool,
    /// The server said 421: it is closing the connection, and takes no QUIT.
    said_closing: bool,
    /// The names the server gave itself: the first word of its 220 greeting and of its
    /// EHLO (or HELO) reply (RFC 5321 4.2, 4.1.1.1).
    greeted_as: Option<String>,
    helo_as: Option<String>,
}

/// The first word of a reply's first line: the domain a greeting or an EHLO reply starts with.
fn first_word(reply: &Reply) -> Option<String> {
    let line = reply.lines.first()?;
    line.split_ascii_whitespace().next().map(str::to_owned)
}

impl ClientSession {
    /// A session that will greet with `helo_name`; the server speaks first.
    pub fn new(helo_name: &str) -> Self {
        Self {
            helo_name: helo_name.to_owned(),
            out: Vec::with_capacity(512),
            parser: ReplyParser::new(),
            caps: Capabilities::default(),
            expect: VecDeque::from([Expect::Greeting]),
            held: VecDeque::new(),
            results: VecDeque::new(),
            mode: BodyMode::Data,
            chunks: Vec::new(),
            body_pending: false,
            body_open: false,
            tls: false,
            replies: 0,
            waiting: None,
            closed_at_rset: false,
            reset: true,
            abandoned: VecDeque::new(),
            noop_refused: None,
            closing: false,
            said_closing: false,
            greeted_as: None,
            helo_as: None,
        }
    }

    /// Commands waiting to be written.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// How the current BDAT body goes out, for the embedding to write after
    /// [`ClientEvent::SendBody`]: one chunk covering the whole body unless it is sent in
    /// several (see [`Transaction::chunk_size`]); empty with DATA.
    pub fn bdat_chunks(&self) -> &[BdatChunk] {
        &self.chunks
    }

    /// Forgets the commands once written.
    pub fn clear_output(&mut self) {
        self.out.clear();
    }

    /// What the server offered.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// From now on, each command waits for the reply to the one before it, as with a server
    /// that does not offer PIPELINING (RFC 2920): a body goes out only once its recipients
    /// are answered. For a server whose replies could not be read after a body had gone out
    /// pipelined behind them.
    pub fn forgo_pipelining(&mut self) {
        self.caps.pipelining = false;
    }

    /// Whether the server named itself `name` (any case, a trailing dot aside) in its greeting
    /// or its EHLO (HELO) reply: a next hop that is this very server, reached where its own
    /// addresses did not show it (through NAT, a port forward).
    pub fn names_itself(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.');
        !name.is_empty()
            && [&self.greeted_as, &self.helo_as]
                .into_iter()
                .flatten()
                .any(|n| n.trim_end_matches('.').eq_ignore_ascii_case(name))
    }

    /// Whether the session runs inside TLS.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Whether the server has sent a whole reply (its greeting, at least): a failure after
    /// that is one of a server that answered, not of an address where nobody did.
    pub fn has_answered(&self) -> bool {
        self.replies > 0
    }

    /// How many whole replies have come from the server: an embedding that times each wait
    /// for a reply (RFC 5321 4.5.3.2) starts the next wait when this moves.
    pub fn replies_read(&self) -> u64 {
        self.replies
    }

    /// Whether no reply is awaited and nothing is held back.
    pub fn is_idle(&self) -> bool {
        self.idle()
    }

    fn idle(&self) -> bool {
        self.expect.is_empty() && self.held.is_empty() && !self.body_pending && !self.body_open
    }

    /// Whether [`ClientSession::send`] may start a transaction now: when idle, or, with
    /// PIPELINING, once every earlier body has been written and only replies to RSET or to
    /// earlier transactions' MAIL, RCPT and bodies are awaited. RFC 2920 3.1 lets the message
    /// content open a group and BDAT is no synchronisation point (RFC 3030 4.2), so the next
    /// transaction's MAIL, RCPT and DATA or BDAT may follow the previous body at once.
    pub fn can_send(&self) -> bool {
        if self.closing {
            return false;
        }
        let only_replies_to_earlier = || {
            self.caps.pipelining
                && self.expect.iter().all(|e| {
                    matches!(
                        e,
                        Expect::Rset
                            | Expect::Mail
                            | Expect::Rcpt
                            | Expect::Chunk
                            | Expect::DataDone
                    )
                })
        };
        self.held.is_empty()
            && !self.body_pending
            && !self.body_open
            && (self.expect.is_empty() || only_replies_to_earlier())
    }

    /// Whether the next reply awaited answers a command of a transaction's envelope (`RSET`,
    /// `MAIL`, `RCPT`, or `DATA`'s 354), not its body (a BDAT chunk, the end of the data)
    /// nor anything else: a wait for one of those that runs out after the server answered
    /// others written with it is the mark of a server that drops what is pipelined to it.
    pub fn awaiting_envelope_reply(&self) -> bool {
        matches!(
            self.expect.front(),
            Some(Expect::Rset | Expect::Mail | Expect::Rcpt | Expect::DataGo)
        )
    }

    /// Transactions sent and not yet answered in full.
    pub fn in_flight(&self) -> usize {
        self.results.len()
    }

    /// Asks for STARTTLS. Only when idle.
    pub fn start_tls(&mut self) -> Result<(), ClientError> {
        if !self.idle() {
            return Err(ClientError::OutOfOrder);
        }
        self.out.extend_from_slice(b"STARTTLS\r\n");
        self.expect.push_back(Expect::StartTls);
        Ok(())
    }

    /// The handshake is done: greets again (RFC 3207 4.2). What the server said of itself
    /// before TLS (its capabilities, the names in its greeting and EHLO reply) is forgotten:
    /// anyone on the path could have written it. The names it gives after TLS count.
    pub fn tls_established(&mut self) {
        self.tls = true;
        self.parser = ReplyParser::new();
        self.caps = Capabilities::default();
        self.greeted_as = None;
        self.helo_as = None;
        self.send_ehlo();
    }

    fn send_ehlo(&mut self) {
        self.greeting_command(b"EHLO ");
        self.expect.push_back(Expect::Ehlo);
    }

    fn greeting_command(&mut self, verb: &[u8]) {
        self.out.extend_from_slice(verb);
        self.out.extend_from_slice(self.helo_name.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    /// Starts a transaction when [`ClientSession::can_send`] allows, and otherwise answers 451
    /// without sending. Fails at once, without sending, with a 552-class [`Reply`] when the
    /// server's SIZE is smaller than the body. Each transaction ends with its own
    /// [`ClientEvent::Done`], in the order they were sent.
    pub fn send(&mut self, t: &Transaction) -> Result<(), Reply> {
        if !self.can_send() {
            return Err(local_reply(451, "4.3.0", "client session busy"));
        }
        if let Some(refusal) = self.refusal(t) {
            return Err(refusal);
        }
        let mut mail = format!("MAIL FROM:<{}>", t.from);
        if self.caps.size.is_some() {
            let _ = write!(mail, " SIZE={}", t.body_len);
        }
        mail.push_str(&t.mail_params);
        mail.push_str("\r\n");
        let mut cmds = vec![(Expect::Mail, mail)];
        for r in &t.rcpts {
            cmds.push((
                Expect::Rcpt,
                format!("RCPT TO:<{}>{}\r\n", r.path, r.params),
            ));
        }
        self.mode = t.mode;
        self.chunks.clear();
        match t.mode {
            BodyMode::Data => cmds.push((Expect::DataGo, "DATA\r\n".to_owned())),
            BodyMode::Bdat => {
                let size = if self.caps.pipelining {
                    t.chunk_size
                } else {
                    0
                };
                self.plan_chunks(t.body_len, size);
                cmds.push(match &self.chunks[..] {
                    [first, _, ..] => (Expect::Chunk, format!("BDAT {}\r\n", first.len)),
                    _ => (Expect::DataDone, format!("BDAT {} LAST\r\n", t.body_len)),
                });
            }
        }
        self.reset = false;
        self.results.push_back(TransactionResult {
            mail: local_reply(0, "", ""),
            rcpts: Vec::with_capacity(t.rcpts.len()),
            data: None,
        });
        for (i, (expect, line)) in cmds.into_iter().enumerate() {
            if i == 0 || (self.caps.pipelining && i < PIPELINED_GROUP) {
                self.out.extend_from_slice(line.as_bytes());
                self.expect.push_back(expect);
            } else {
                self.held.push_back((expect, line));
            }
        }
        if self.held.is_empty() {
            self.expect_later_chunks();
            // With BDAT, the body follows its command straight away.
            self.body_pending = t.mode == BodyMode::Bdat;
        }
        Ok(())
    }

    /// Later chunks go out with the body, but their replies come in order after the first's.
    fn expect_later_chunks(&mut self) {
        for i in 1..self.chunks.len() {
            let last = i + 1 == self.chunks.len();
            self.expect.push_back(if last {
                Expect::DataDone
            } else {
                Expect::Chunk
            });
        }
    }

    /// Splits a BDAT body of `len` octets into chunks of at most `size` (0: one chunk).
    fn plan_chunks(&mut self, len: u64, size: u64) {
        if size == 0 || len <= size {
            self.chunks.push(BdatChunk {
                header: String::new(),
                offset: 0,
                len,
            });
            return;
        }
        let mut offset = 0;
        while offset < len {
            let n = size.min(len - offset);
            let header = match (offset, offset + n == len) {
                (0, _) => String::new(),
                (_, true) => format!("BDAT {n} LAST\r\n"),
                (_, false) => format!("BDAT {n}\r\n"),
            };
            self.chunks.push(BdatChunk {
                header,
                offset,
                len: n,
            });
            offset += n;
        }
    }

    /// The body has been written (for DATA, with the terminating `.CRLF`).
    pub fn body_sent(&mut self) {
        self.body_open = false;
        if self.mode == BodyMode::Data {
            self.expect.push_back(Expect::DataDone);
        }
    }

    /// The oldest transaction that ended without its outcome, because the session failed (a
    /// 421, a reply out of step) or the connection broke: the replies it got before that. A
    /// recipient the server already refused for good stays refused (RFC 5321 4.2.1: a 5yz is
    /// not to be repeated), whatever became of the rest.
    pub fn take_unfinished(&mut self) -> Option<TransactionResult> {
        self.abandoned
            .pop_front()
            .or_else(|| self.results.pop_front())
    }

    /// Whether the reply to a RSET is the next one awaited: a failure now comes before the
    /// server has answered, or taken, anything sent after that RSET.
    pub fn awaiting_rset(&self) -> bool {
        self.expect.front() == Some(&Expect::Rset)
    }

    /// Whether the session ended with a 421 given in answer to a RSET: the server is closing,
    /// so it took nothing sent after that RSET.
    pub fn closed_at_rset(&self) -> bool {
        self.closed_at_rset
    }

    /// The reply [`ClientSession::send`] would refuse `t` with before writing anything for
    /// it, whatever the session is doing: a body over the server's SIZE. Asked before an RSET
    /// is written for `t`, so that a transaction refused here leaves no command behind.
    pub fn refusal(&self, t: &Transaction) -> Option<Reply> {
        let limit = self.caps.size.filter(|&l| l > 0)?;
        (t.body_len > limit).then(|| {
            local_reply(
                552,
                "5.3.4",
                "message size exceeds the next hop's fixed maximum message size",
            )
        })
    }

    /// Resets the connection for the next transaction (RSET). With PIPELINING the next
    /// [`ClientSession::send`] may follow at once.
    pub fn rset(&mut self) {
        // One RSET is enough: a refused transaction has already sent one.
        if !self.reset {
            self.reset = true;
            self.write_or_wait(Expect::Rset, b"RSET\r\n");
        }
    }

    /// Asks for a reply that can only be a 250 (NOOP, RFC 5321 4.1.1.9), to see whether the
    /// replies are in step: a reply left over from the last transaction takes its place. Read
    /// until idle; a reply other than 250 is kept for [`ClientSession::take_noop_refusal`].
    pub fn noop(&mut self) {
        self.noop_refused = None;
        self.write_or_wait(Expect::Noop, b"NOOP\r\n");
    }

    /// The reply other than 250 that the last NOOP got, if it got one.
    pub fn take_noop_refusal(&mut self) -> Option<Reply> {
        self.noop_refused.take()
    }

    /// When the connection ends (or its wait runs out) before the RSET after a refusal of
    /// DATA is answered: that refusal settles the transaction (a reply out of step would have
    /// been a 354 right behind it, most likely read already).
    pub fn settle_unanswered(&mut self) -> Option<TransactionResult> {
        if self.expect.front() != Some(&Expect::SettleRset) {
            return None;
        }
        self.close_settled();
        self.results.pop_front()
    }

    /// Whether the session ended where a refusal of DATA was settled without the RSET's
    /// reply (a 421, the connection's end, no answer): it takes no further transaction.
    pub fn is_closing(&self) -> bool {
        self.closing
    }

    /// Whether the server said 421 (it closes the connection: no QUIT is owed it).
    pub fn said_closing(&self) -> bool {
        self.said_closing
    }

    fn close_settled(&mut self) {
        self.closing = true;
        self.expect.clear();
        self.held.clear();
        self.waiting = None;
        self.out.clear();
    }

    /// Ends the session (QUIT).
    pub fn quit(&mut self) {
        self.write_or_wait(Expect::Quit, b"QUIT\r\n");
    }

    /// Writes a RSET or QUIT now, or, without PIPELINING while replies are awaited, once they
    /// are in. A QUIT takes the place of a RSET waiting to go.
    fn write_or_wait(&mut self, expect: Expect, line: &'static [u8]) {
        if !self.caps.pipelining && !self.expect.is_empty() {
            self.waiting = Some((expect, line));
        } else {
            self.out.extend_from_slice(line);
            self.expect.push_back(expect);
        }
    }

    /// Processes the server's bytes up to the next event; drop `consumed` bytes after.
    pub fn handle(&mut self, input: &[u8]) -> (usize, ClientEvent) {
        let mut pos = 0;
        // Replies can answer only the commands awaited on entry: one queued during this call
        // (a held command released, a RSET) is not written yet, and a reply to it in this
        // input came before it, unasked: taken as its answer, every later reply would answer
        // the wrong command (a refused message counted delivered).
        let (answerable, replies_before) = (self.expect.len() as u64, self.replies);
        loop {
            if self.body_pending {
                self.body_pending = false;
                self.body_open = true;
                return (pos, ClientEvent::SendBody);
            }
            if self.expect.is_empty() {
                return (pos, ClientEvent::NeedInput);
            }
            let reply = match self.parser.parse(&input[pos..]) {
                ParsedReply::Incomplete { consumed } => {
                    return (pos + consumed, ClientEvent::NeedInput)
                }
                ParsedReply::Error { error, consumed } => {
                    return (pos + consumed, self.fail(error.into()));
                }
                ParsedReply::Complete { reply, consumed } => {
                    // A 421 is the server closing, whatever it answers: taken as such below.
                    if self.replies - replies_before >= answerable && reply.code != 421 {
                        let error = ClientError::Unexpected("a command not yet sent", reply);
                        return (pos + consumed, self.fail(error));
                    }
                    pos += consumed;
                    reply
                }
            };
            let event = self.on_reply(reply);
            if self.expect.is_empty() && self.held.is_empty() && self.results.is_empty() {
                if let Some((expect, line)) = self.waiting.take() {
                    self.out.extend_from_slice(line);
                    self.expect.push_back(expect);
                }
            }
            if let Some(event) = event {
                return (pos, event);
            }
        }
    }

    fn on_reply(&mut self, reply: Reply) -> Option<ClientEvent> {
        self.replies += 1;
        let expect = self.expect.pop_front()?;
        if reply.code == 421 {
            self.said_closing = true;
        }
        if reply.code == 421 && expect == Expect::SettleRset {
            // The server closing after it refused DATA: the refusal stands (a reply out of
            // step would have been a 354 here), and the connection is done.
            self.close_settled();
            return self.results.pop_front().map(ClientEvent::Done);
        }
        if reply.code == 421 && expect != Expect::Quit {
            self.closed_at_rset = expect == Expect::Rset;
            self.waiting = None;
            self.expect.clear();
            self.abandoned.extend(self.results.drain(..));
            self.held.clear();
            // Nothing more goes to a server that is closing (RFC 5321 3.8), not even what
            // the replies before this one let out, nor a QUIT.
            self.out.clear();
            return Some(ClientEvent::Failed(ClientError::Closing(reply)));
        }
        match expect {
            // Replies these commands cannot get (RFC 5321 4.3.2): an intermediate 3xx to
            // anything but DATA, a success other than 354 to DATA. Taking one as an answer
            // would count a message delivered whose body was never sent: the session ends,
            // and the outcome stays open (the mail is tried again).
            Expect::Mail | Expect::Rcpt | Expect::Chunk | Expect::DataDone
                if (300..400).contains(&reply.code) =>
            {
                let command = match expect {
                    Expect::Mail => "MAIL",
                    Expect::Rcpt => "RCPT",
                    _ => "the message",
                };
                Some(self.fail(ClientError::Unexpected(command, reply)))
            }
            Expect::DataGo if reply.is_positive() && reply.code != 354 => {
                Some(self.fail(ClientError::Unexpected("DATA", reply)))
            }
            // A success to a chunk before the last with an addressing status (RFC 3463
            // X.1.X, a MAIL or RCPT reply's: 2.1.0, 2.1.5) answered another command: a reply
            // no command asked for pushed it along, and the chunk's own reply, perhaps a
            // refusal, is still to come. BDAT has no intermediate reply that would show it
            // (DATA's 354 does). The session ends out of step and the outcome stays open
            // (the mail is tried again). Such a success to the end of the data is the
            // transaction's result, for the embedding to check with a NOOP before it takes
            // it: some servers do answer a message so, and RFC 5321 4.2.1 makes any 2yz a
            // success.
            Expect::Chunk
                if reply.is_positive() && reply.enhanced.is_some_and(|e| e.subject == 1) =>
            {
                Some(self.fail(ClientError::Unexpected("the message", reply)))
            }
            Expect::Greeting if reply.code == 220 => {
                self.greeted_as = first_word(&reply);
                self.send_ehlo();
                None
            }
            Expect::Greeting => Some(self.fail(ClientError::Greeting(reply))),
            Expect::Ehlo if reply.code == 250 => {
                self.caps = Capabilities::from_ehlo(&reply);
                self.helo_as = first_word(&reply);
                Some(ClientEvent::Ready)
            }
            // Any permanent refusal of EHLO may be a server that does not know it (RFC 5321
            // 4.1.4 names 500, 501, 502 and 550; others answer 504 or 554): HELO next.
            Expect::Ehlo if reply.is_permanent() => {
                self.greeting_command(b"HELO ");
                self.expect.push_back(Expect::Helo);
                None
            }
            // A success or an intermediate reply other than 250 answers something else (a
            // second greeting the server wrote, and EHLO's own reply still to come): out of
            // step, not a refusal of EHLO.
            Expect::Ehlo | Expect::Helo if reply.code < 400 && reply.code != 250 => {
                let command = if matches!(expect, Expect::Ehlo) {
                    "EHLO"
                } else {
                    "HELO"
                };
                Some(self.fail(ClientError::Unexpected(command, reply)))
            }
            Expect::Ehlo | Expect::Helo if reply.code != 250 => {
                Some(self.fail(ClientError::Helo(reply)))
            }
            Expect::Helo => {
                self.caps = Capabilities::default();
                self.helo_as = first_word(&reply);
                Some(ClientEvent::Ready)
            }
            Expect::Ehlo => None,
            Expect::StartTls if reply.code == 220 => Some(ClientEvent::StartTls),
            Expect::StartTls => Some(ClientEvent::StartTlsRefused(reply)),
            Expect::Mail => {
                if let Some(r) = self.results.front_mut() {
                    r.mail = reply;
                }
                self.release_held()
            }
            Expect::Rcpt => {
                if let Some(r) = self.results.front_mut() {
                    r.rcpts.push(reply);
                }
                self.release_held()
            }
            Expect::DataGo if reply.code == 354 => {
                let empty = self.results.front().is_some_and(|r| {
                    !r.mail.is_positive() || !r.rcpts.iter().any(Reply::is_positive)
                });
                if empty {
                    // Pipelined DATA accepted though MAIL or every RCPT was refused: end the
                    // data at once with a lone dot, sending no content (RFC 2920 3.1).
                    self.out.extend_from_slice(b".\r\n");
                    self.expect.push_back(Expect::DataDone);
                    return None;
                }
                self.body_open = true;
                Some(ClientEvent::SendBody)
            }
            Expect::Chunk => {
                // A refused chunk fails the message (RFC 3030 4.2); the chunks after it get
                // their replies too, and the transaction ends with the last one.
                if let Some(r) = self.results.front_mut() {
                    if !reply.is_positive() && r.data.is_none() {
                        r.data = Some(reply);
                    }
                }
                None
            }
            Expect::DataGo if self.settles_at_rset(&reply) => {
                // DATA refused after a recipient was taken: the refusal may be a RCPT reply
                // that a reply no command asked for pushed along, with the server's 354 still
                // to come. The RSET that closes the transaction tells: its 250 settles it,
                // anything else puts the session out of step.
                if let Some(r) = self.results.front_mut() {
                    r.data = Some(reply);
                }
                self.held.clear();
                self.reset = true;
                self.write_or_wait(Expect::SettleRset, b"RSET\r\n");
                None
            }
            Expect::DataGo | Expect::DataDone => {
                let mut result = self.results.pop_front()?;
                // The first refused chunk decides, when there was one.
                result.data.get_or_insert(reply);
                if expect == Expect::DataGo {
                    // Nothing of this transaction is left to send. At the end of its data,
                    // what is held is a later transaction's, sent behind this one.
                    self.held.clear();
                }
                if expect == Expect::DataGo && result.mail.is_positive() {
                    // DATA refused (no valid recipient, most often) after MAIL was taken: the
                    // server still holds the transaction open, and the next MAIL would get
                    // 503. RSET closes it (RFC 2920 3.1); nothing was pipelined behind DATA,
                    // which waits for its 354.
                    self.rset();
                }
                Some(ClientEvent::Done(result))
            }
            // RSET has one answer, 250 (RFC 5321 4.1.1.5): any other (a 354 left over from
            // a DATA whose refusal came early, a 5xx) means the replies are out of step, and
            // what was pipelined behind it cannot be matched with its own.
            Expect::SettleRset | Expect::Rset if reply.code != 250 => {
                Some(self.fail(ClientError::Unexpected("RSET", reply)))
            }
            Expect::SettleRset => self.results.pop_front().map(ClientEvent::Done),
            Expect::Rset => None,
            Expect::Noop if reply.code == 250 => None,
            Expect::Noop => {
                self.noop_refused = Some(reply);
                None
            }
            Expect::Quit => Some(ClientEvent::Closed),
        }
    }

    /// Whether a refusal of DATA waits for the reply to the RSET after it before it settles
    /// the transaction: MAIL and a recipient were taken, so the refusal is not the usual one
    /// (no valid recipient), and it may have answered another command.
    fn settles_at_rset(&self, reply: &Reply) -> bool {
        !reply.is_positive()
            && reply.code != 421
            && self
                .results
                .front()
                .is_some_and(|r| r.mail.is_positive() && r.rcpts.iter().any(Reply::is_positive))
    }

    /// Once every reply awaited is in: sends the next held command (without PIPELINING) or
    /// group of them (with it, see [`PIPELINED_GROUP`]), or settles a transaction whose MAIL
    /// or every RCPT failed without asking for the body.
    fn release_held(&mut self) -> Option<ClientEvent> {
        if !self.expect.is_empty() {
            return None;
        }
        let result = self.results.front()?;
        let no_rcpt_left = self.held.iter().all(|(e, _)| *e != Expect::Rcpt);
        let doomed = !result.mail.is_positive()
            || (no_rcpt_left && !result.rcpts.iter().any(Reply::is_positive));
        if doomed {
            self.held.clear();
            let result = self.results.pop_front()?;
            self.out.extend_from_slice(b"RSET\r\n");
            self.expect.push_back(Expect::Rset);
            self.reset = true;
            return Some(ClientEvent::Done(result));
        }
        // A RCPT refused as one too many (452, or 552 from an older server; RFC 5321
        // 4.5.3.1.10) says the transaction is full: the recipients not sent yet are not sent
        // in it (a server counts those past its limit as errors, and may end the session
        // before the data), and take the reply the server would give them, for the embedding
        // to send them in the next transaction. Only "too many recipients" says so: its
        // enhanced code X.5.3 (RFC 3463 3.6), or, without one, after a recipient was taken
        // (a limit never refuses the first). The same codes also say one mailbox is full
        // (452 4.2.2) or the server short of room (452 4.3.1): the recipients behind it are
        // still asked for, or they would wait behind that mailbox at every attempt.
        let full = result.mail.is_positive()
            && (0..result.rcpts.len()).any(|k| too_many_recipients(&result.rcpts, k));
        if full && self.held.front().is_some_and(|(e, _)| *e == Expect::Rcpt) {
            while self.held.front().is_some_and(|(e, _)| *e == Expect::Rcpt) {
                self.held.pop_front();
                if let Some(r) = self.results.front_mut() {
                    r.rcpts.push(local_reply(
                        452,
                        "4.5.3",
                        "Too many recipients in this transaction (not sent)",
                    ));
                }
            }
            // With none taken, the transaction ends here, as with every RCPT refused.
            return self.release_held();
        }
        let group = if self.caps.pipelining {
            PIPELINED_GROUP
        } else {
            1
        };
        for _ in 0..group {
            let Some((expect, line)) = self.held.pop_front() else {
                break;
            };
            self.out.extend_from_slice(line.as_bytes());
            self.expect.push_back(expect);
            if self.mode == BodyMode::Bdat && matches!(expect, Expect::Chunk | Expect::DataDone) {
                self.expect_later_chunks();
                self.body_pending = true;
            }
        }
        None
    }

    /// Ends the session on a reply it cannot go on from. The server (which did not say
    /// 421) still expects QUIT before the close, even after an error (RFC 5321 3.1,
    /// 4.1.1.10): it replaces any command not yet written, and the embedding writes it if it
    /// can, without waiting for its reply (after a reply out of step, one may never come).
    fn fail(&mut self, e: ClientError) -> ClientEvent {
        self.waiting = None;
        self.expect.clear();
        self.abandoned.extend(self.results.drain(..));
        self.held.clear();
        self.out.clear();
        self.out.extend_from_slice(b"QUIT\r\n");
        ClientEvent::Failed(e)
    }
}

/// Whether the reply to the `k`th RCPT of a transaction (in `rcpts`) refuses it as one
/// recipient too many for the transaction (RFC 5321 4.5.3.1.10): 452, or 552 from an older
/// server, with the enhanced code X.5.3 (RFC 3463 3.6), or without an enhanced code after a
/// recipient was taken (a limit never refuses the first). A 452 or 552 about the mailbox
/// itself (full, 4.2.2 or 5.2.2) or the server's room (4.3.1) is not one.
pub fn too_many_recipients(rcpts: &[Reply], k: usize) -> bool {
    rcpts.get(k).is_some_and(|r| {
        matches!(r.code, 452 | 552)
            && r.enhanced.map_or_else(
                || rcpts[..k].iter().any(Reply::is_positive),
                |e| e.subject == 5 && e.detail == 3,
            )
    })
}

/// A reply made up locally (for a transaction refused before anything was sent).
fn local_reply(code: u16, enhanced: &str, text: &str) -> Reply {
    Reply {
        code,
        enhanced: crate::reply::EnhancedCode::parse_prefix(enhanced).map(|(e, _)| e),
        lines: vec![text.to_owned()],
    }
}
