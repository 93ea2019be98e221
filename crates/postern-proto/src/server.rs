//! The server session: RFC 5321 sequencing, PIPELINING, DATA and BDAT, STARTTLS, limits.
//!
//! The embedding feeds bytes to [`ServerSession::handle`] and gets back one [`Event`] at a
//! time with the number of input bytes used. Replies accumulate in [`ServerSession::output`];
//! the embedding writes them out when `handle` says [`Event::NeedInput`] (all complete commands
//! in the buffer are answered, RFC 2920), [`Event::StartTls`] or [`Event::Close`], so pipelined
//! commands read together are answered in one write; and on [`Event::Flush`], when the replies
//! to one read pass [`OUTPUT_HIGH_WATER`], so a client that pipelines commands with long
//! replies (EHLO, HELP) cannot make the replies it has not read yet grow without bound.
//!
//! Three events ask the embedding for a decision before the session goes on: [`Event::Mail`],
//! [`Event::Rcpt`] and [`Event::DataStart`] are settled with [`ServerSession::accept`] or
//! [`ServerSession::reject`]; [`Event::DataEnd`] with [`ServerSession::message_queued`] or
//! [`ServerSession::message_failed`] once the spool has made the message durable. A decision
//! the embedding never gives counts as a temporary local error (451 4.3.0), never as consent.

use std::borrow::Cow;
use std::sync::Arc;

use crate::address::{ForwardPath, ReversePath};
use crate::bdat::ChunkDecoder;
use crate::command::{Command, CommandError};
use crate::crlf::LineEnds;
use crate::data::DataDecoder;
use crate::envelope::Envelope;
use crate::framer::{Frame, LineFramer};
use crate::limits::{
    DEFAULT_MAX_ERRORS, DEFAULT_MAX_JUNK_COMMANDS, DSN_LINE_EXTRA, ENVELOPE_BYTES_PER_RECIPIENT,
    MAX_COMMAND_LINE, MAX_RCPT_OVERSHOOT, MIN_ENVELOPE_BYTES, MIN_RECIPIENTS,
};
use crate::params::{BodyType, MailParams, RcptParams};
use crate::reply::{write_reply, write_reply_line, EnhancedCode, StaticReply};

const fn r(code: u16, class: u8, subject: u16, detail: u16, text: &'static str) -> StaticReply {
    StaticReply::new(code, EnhancedCode::new(class, subject, detail), text)
}

/// Named replies of the server session.
pub mod replies {
    use super::r;
    use crate::reply::StaticReply;

    /// MAIL accepted.
    pub const MAIL_OK: StaticReply = r(250, 2, 1, 0, "Ok");
    /// RCPT accepted.
    pub const RCPT_OK: StaticReply = r(250, 2, 1, 5, "Ok");
    /// RSET, NOOP.
    pub const OK: StaticReply = r(250, 2, 0, 0, "Ok");
    /// QUIT.
    pub const BYE: StaticReply = r(221, 2, 0, 0, "Bye");
    /// VRFY (RFC 5321 3.5.3).
    pub const VRFY: StaticReply = r(
        252,
        2,
        5,
        0,
        "Cannot VRFY user, but will accept message and attempt delivery",
    );
    /// HELP.
    pub const HELP: StaticReply = r(
        214,
        2,
        0,
        0,
        "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY EXPN HELP STARTTLS",
    );
    /// HELP where STARTTLS is not offered (no certificate, or TLS already on).
    pub const HELP_NO_TLS: StaticReply = r(
        214,
        2,
        0,
        0,
        "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY EXPN HELP",
    );
    /// HELP where CHUNKING is not offered either (BDAT is then not recognised).
    pub const HELP_NO_BDAT: StaticReply = r(
        214,
        2,
        0,
        0,
        "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY EXPN HELP STARTTLS",
    );
    /// HELP with neither CHUNKING nor STARTTLS offered.
    pub const HELP_NO_BDAT_NO_TLS: StaticReply = r(
        214,
        2,
        0,
        0,
        "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY EXPN HELP",
    );
    /// BODY=BINARYMIME where BINARYMIME is not offered (`offer_chunking` off).
    pub const BINARYMIME_NOT_OFFERED: StaticReply = r(555, 5, 5, 4, "BODY=BINARYMIME not offered");
    /// BDAT where CHUNKING is not offered: a command this server does not know.
    pub const BDAT_NOT_OFFERED: StaticReply = r(500, 5, 5, 1, "Command not recognized");
    /// EXPN: no list is expanded here, and a server that does not expand lists answers 252,
    /// which neither confirms nor denies an address (RFC 5321 7.3, 3.5.3), as VRFY does.
    pub const EXPN: StaticReply = r(
        252,
        2,
        5,
        0,
        "Cannot expand list, but will accept message and attempt delivery",
    );
    /// SEND, SOML, SAML, TURN.
    pub const OBSOLETE: StaticReply = r(502, 5, 5, 1, "Command not implemented");
    /// AUTH on a server that offers none.
    pub const NO_AUTH: StaticReply = r(502, 5, 5, 1, "Authentication not enabled");
    /// STARTTLS without a certificate.
    pub const NO_TLS: StaticReply = r(502, 5, 5, 1, "STARTTLS not available");
    /// STARTTLS inside TLS.
    pub const TLS_ACTIVE: StaticReply = r(503, 5, 5, 1, "TLS already active");
    /// STARTTLS inside a mail transaction.
    pub const TLS_IN_TRANSACTION: StaticReply = r(503, 5, 5, 1, "MAIL transaction in progress");
    /// STARTTLS accepted.
    pub const TLS_GO: StaticReply = r(220, 2, 0, 0, "Ready to start TLS");
    /// MAIL before HELO/EHLO.
    pub const NEED_HELO: StaticReply = r(503, 5, 5, 1, "Send HELO or EHLO first");
    /// MAIL inside a transaction.
    pub const NESTED_MAIL: StaticReply = r(503, 5, 5, 1, "Nested MAIL command");
    /// RCPT, DATA or BDAT before MAIL.
    pub const NEED_MAIL: StaticReply = r(503, 5, 5, 1, "Need MAIL command");
    /// DATA before any RCPT.
    pub const NEED_RCPT: StaticReply = r(503, 5, 5, 1, "Need RCPT command");
    /// DATA or BDAT when every RCPT was refused (RFC 2920 3.1).
    pub const NO_RECIPIENTS: StaticReply = r(554, 5, 5, 1, "No valid recipients");
    /// RCPT after the first BDAT chunk: the envelope is already in the message being stored.
    pub const RCPT_AFTER_BDAT: StaticReply = r(503, 5, 5, 1, "RCPT not allowed after BDAT");
    /// DATA after BDAT in one transaction.
    pub const DATA_AFTER_BDAT: StaticReply = r(503, 5, 5, 1, "DATA not allowed after BDAT");
    /// DATA with BODY=BINARYMIME (RFC 3030 3).
    pub const BINARY_NEEDS_BDAT: StaticReply = r(503, 5, 5, 1, "BINARYMIME requires BDAT");
    /// MAIL with AUTH= on a server that offers no AUTH.
    pub const AUTH_NOT_OFFERED: StaticReply = r(555, 5, 5, 4, "AUTH parameter not supported");
    /// ESMTP parameters after HELO.
    pub const PARAMS_NEED_EHLO: StaticReply = r(555, 5, 5, 4, "Parameters not allowed after HELO");
    /// SIZE= or the body over the limit.
    pub const TOO_BIG: StaticReply = r(
        552,
        5,
        3,
        4,
        "Message size exceeds fixed maximum message size",
    );
    /// Recipient limit reached.
    pub const TOO_MANY_RCPTS: StaticReply = r(452, 4, 5, 3, "Too many recipients");
    /// ORCPT with raw UTF-8 outside an SMTPUTF8 transaction (RFC 6533 3).
    pub const ORCPT_NEEDS_SMTPUTF8: StaticReply = r(501, 5, 5, 4, "UTF-8 in ORCPT needs SMTPUTF8");
    /// Non-ASCII address without SMTPUTF8 (RFC 6531 3.7.4.1).
    pub const NEED_SMTPUTF8: StaticReply = r(553, 5, 6, 7, "Non-ASCII address needs SMTPUTF8");
    /// Bare CR or LF in a DATA body under the reject policy.
    pub const BARE_NEWLINE: StaticReply = r(
        550,
        5,
        6,
        11,
        "Bare CR or LF in message; use CRLF line endings",
    );
    /// The spool cannot take the message now (RFC 3463 4.3.1).
    pub const SPOOL_FULL: StaticReply = r(452, 4, 3, 1, "Insufficient system storage");
    /// The spool failed to write or sync the message (a disk's I/O error): not stored, to
    /// be sent again later (RFC 5321 4.2.3's 451, RFC 3463 4.3.0).
    pub const SPOOL_ERROR: StaticReply = r(
        451,
        4,
        3,
        0,
        "Local error in processing: the message could not be stored, try again later",
    );
    /// A command line ended by a bare LF (RFC 5321 2.3.8).
    pub const BARE_LF_COMMAND: StaticReply = r(
        500,
        5,
        5,
        2,
        "Syntax error: command lines must end with CR LF",
    );
    /// Line over the cap.
    pub const LINE_TOO_LONG: StaticReply = r(500, 5, 5, 2, "Line too long");
    /// A command line with a BDAT after a CR inside it.
    pub const BARE_CR_BDAT: StaticReply =
        r(500, 5, 5, 2, "Syntax error: a CR inside a command line");
    /// A decision the embedding never gave.
    pub const NO_DECISION: StaticReply = r(451, 4, 3, 0, "Local error in processing");
    /// Too many errors.
    pub const TOO_MANY_ERRORS: StaticReply = r(421, 4, 7, 0, "Too many errors, closing connection");
    /// Too many commands that move no mail forward.
    pub const TOO_MUCH_JUNK: StaticReply = r(
        421,
        4,
        7,
        0,
        "Too many commands without mail, closing connection",
    );
    /// An HTTP request on the SMTP port.
    pub const NOT_SMTP: StaticReply = r(421, 4, 7, 0, "This is an SMTP server, closing connection");
    /// Command timeout (RFC 5321 4.5.3.2.7).
    pub const TIMEOUT: StaticReply = r(421, 4, 4, 2, "Timeout exceeded, closing connection");
    /// The session's total time is over (the embedding's cap), whatever the client does.
    pub const SESSION_TIME: StaticReply = r(
        421,
        4,
        4,
        2,
        "Session time limit reached, closing connection",
    );
    /// Server going down.
    pub const SHUTDOWN: StaticReply = r(421, 4, 3, 2, "Service shutting down, closing connection");
    /// Bad BDAT size: the stream cannot be followed any more.
    pub const BDAT_LOST: StaticReply = r(
        421,
        4,
        5,
        0,
        "Cannot follow BDAT framing, closing connection",
    );
}

/// A refusal kept until the end of a body.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PendingReply {
    code: u16,
    enhanced: EnhancedCode,
    text: Cow<'static, str>,
}

impl From<StaticReply> for PendingReply {
    fn from(r: StaticReply) -> Self {
        Self {
            code: r.code,
            enhanced: r.enhanced,
            text: Cow::Borrowed(r.text),
        }
    }
}

/// A message refused once its data was on the way: over the size limit, a bare line end
/// under [`BareNewlinePolicy::Reject`], or the embedding's refusal of its body or its commit.
/// The embedding logs it (taken with [`ServerSession::take_refused`]): its replies are
/// written here, so it has no other sight of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedMessage {
    /// The reply's code (`552`).
    pub code: u16,
    /// The reply's enhanced code (`5.3.4`).
    pub enhanced: EnhancedCode,
    /// The reply's text.
    pub text: String,
    /// The client's HELO or EHLO name.
    pub helo: String,
    /// The transaction's reverse path, without angle brackets (empty for `<>`).
    pub reverse_path: String,
    /// How many recipients the transaction had.
    pub recipients: usize,
}

/// What to do with bare CR and bare LF in a DATA body or a text (not BINARYMIME) BDAT body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BareNewlinePolicy {
    /// Store them as CR LF (what recent Postfix does).
    #[default]
    Normalize,
    /// Refuse the message with 550 5.6.11 once the end of data is found.
    Reject,
}

/// Settings shared by every session of a server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Our name, in the banner and the EHLO reply.
    pub hostname: String,
    /// Advertised in SIZE and enforced on DATA and BDAT.
    pub max_message_size: u64,
    /// Recipients per transaction (at least 100, RFC 5321 4.5.3.1.8). The envelope's octets
    /// are capped at [`ENVELOPE_BYTES_PER_RECIPIENT`] times this, and never below
    /// [`MIN_ENVELOPE_BYTES`].
    pub max_recipients: usize,
    /// Error replies after which the session is ended with 421.
    pub max_errors: u32,
    /// Commands that move no mail forward (EHLO, HELO, RSET, NOOP, VRFY, EXPN, HELP, an empty BDAT
    /// chunk not the last) a session may send between messages accepted before each further
    /// one counts as an error.
    pub max_junk_commands: u32,
    /// Command line cap, CR LF included.
    pub max_line: usize,
    /// Refuse MAIL before HELO/EHLO.
    pub require_helo: bool,
    /// Bare CR and LF in DATA and text BDAT bodies.
    pub bare_newline: BareNewlinePolicy,
    /// Offer PIPELINING in the EHLO reply (default on). Off makes the session look like an
    /// older server to clients; pipelined commands are still answered in order.
    pub offer_pipelining: bool,
    /// Offer CHUNKING and BINARYMIME in the EHLO reply (default on). Off makes the session look
    /// like an older server to clients: HELP does not list BDAT, and a BDAT that arrives
    /// anyway is not recognised (500, then the close: its chunk cannot be read as commands).
    pub offer_chunking: bool,
    /// The most envelope octets the embedding can store for one message (a spool record's
    /// room), counting [`ServerConfig::stored_bytes_per_recipient`] for each recipient
    /// besides its path and ORCPT: the budget from `max_recipients` is lowered to it, below
    /// [`MIN_ENVELOPE_BYTES`] too. `usize::MAX` for no such bound.
    pub max_envelope_bytes: usize,
    /// What the embedding stores for each recipient besides its path and ORCPT (see
    /// `max_envelope_bytes`).
    pub stored_bytes_per_recipient: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            hostname: "localhost".into(),
            max_message_size: 50 * 1024 * 1024,
            max_recipients: 1000,
            max_errors: DEFAULT_MAX_ERRORS,
            max_junk_commands: DEFAULT_MAX_JUNK_COMMANDS,
            max_line: MAX_COMMAND_LINE,
            require_helo: true,
            bare_newline: BareNewlinePolicy::Normalize,
            offer_pipelining: true,
            offer_chunking: true,
            max_envelope_bytes: usize::MAX,
            stored_bytes_per_recipient: 0,
        }
    }
}

/// What the session needs from the embedding next.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// Every complete command is answered: write [`ServerSession::output`], then read more.
    NeedInput,
    /// MAIL FROM passed the grammar and sequencing checks: accept or reject it.
    Mail(ReversePath<'a>, MailParams<'a>),
    /// RCPT TO passed the grammar and sequencing checks: accept or reject it (relay control).
    Rcpt(ForwardPath<'a>, RcptParams<'a>),
    /// The body is about to start (DATA, or the first BDAT chunk): accept (open a spool
    /// record) or reject (say, 452 4.3.1 when the spool is full).
    DataStart,
    /// The next body bytes, dot-unstuffed: append them.
    Body(&'a [u8]),
    /// The body is complete: commit it, then call `message_queued` or `message_failed`.
    DataEnd,
    /// The body that was being appended is abandoned: discard it.
    DataAbort,
    /// Write the output, then start the TLS handshake. The rest of the input was discarded:
    /// drop it (commands pipelined after STARTTLS are never run).
    StartTls,
    /// Write the output, then close the connection.
    Close,
    /// The replies waiting in [`ServerSession::output`] passed [`OUTPUT_HIGH_WATER`]: write
    /// them (and clear them), then call `handle` again with the rest of the input. Given again
    /// each time another `OUTPUT_HIGH_WATER` octets of replies are added without a clear.
    Flush,
}

/// Replies held before [`Event::Flush`] asks for them to be written.
pub const OUTPUT_HIGH_WATER: usize = 16 * 1024;

/// One step of [`ServerSession::handle`].
#[derive(Debug, PartialEq, Eq)]
pub struct Step<'a> {
    /// Input bytes used; drop them before the next call.
    pub consumed: usize,
    /// What happened.
    pub event: Event<'a>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decision {
    None,
    Mail,
    Rcpt,
    DataStart,
    Commit,
}

#[derive(Clone, Debug)]
enum Phase {
    /// Reading commands.
    Commands,
    /// Inside a DATA body.
    Data(DataDecoder),
    /// Inside a BDAT chunk.
    Chunk {
        decoder: ChunkDecoder,
        size: u64,
        last: bool,
    },
    /// Closed: nothing more is read.
    Closed,
}

/// The state of one SMTP server session.
#[derive(Debug)]
pub struct ServerSession {
    config: Arc<ServerConfig>,
    framer: LineFramer,
    out: Vec<u8>,
    /// `out`'s length when `Flush` was last given (0 once cleared).
    flush_mark: usize,
    envelope: Envelope,
    phase: Phase,
    decision: Decision,
    greeted: bool,
    tls_available: bool,
    tls_active: bool,
    errors: u32,
    /// Commands that move no mail forward (EHLO, HELO, RSET, NOOP, VRFY, EXPN, HELP, an empty BDAT
    /// chunk not the last) since the session began or the last message was accepted.
    junk: u32,
    /// MAIL accepted, transaction open.
    in_mail: bool,
    /// RCPT commands tried in this transaction (accepted or not).
    rcpts_tried: usize,
    /// BDAT used in this transaction.
    bdat: bool,
    /// The embedding has an open body record (DataStart accepted).
    body_open: bool,
    /// Body octets handed out.
    body_bytes: u64,
    /// Why the body in progress will be refused at its end.
    body_failed: Option<PendingReply>,
    /// Line ends of a text BDAT body, across its chunks.
    line_ends: LineEnds,
    /// A BDAT chunk was refused (with this reply) and no other command came since: the
    /// chunks a pipelining client had already sent behind it are read and discarded (RFC 3030
    /// 2), each answered with the same refusal, not counted as the client's errors. The same
    /// reply, not `503` for a transaction that has ended: a client that judges the message by
    /// the reply to its `LAST` chunk takes a temporary refusal (`452` from a full spool) for
    /// what it is, not for a permanent one.
    discarding: Option<PendingReply>,
    /// The last message refused after its data began, until the embedding takes it.
    refused: Option<Box<RefusedMessage>>,
}

impl ServerSession {
    /// A new session; `tls_available` says whether STARTTLS may be offered.
    pub fn new(config: Arc<ServerConfig>, tls_available: bool) -> Self {
        // MAIL and RCPT may be longer by the DSN parameters' room; other commands are held
        // to `max_line` in `command`.
        let framer = LineFramer::new(config.max_line.saturating_add(DSN_LINE_EXTRA));
        Self {
            config,
            framer,
            out: Vec::with_capacity(512),
            flush_mark: 0,
            envelope: Envelope::default(),
            phase: Phase::Commands,
            decision: Decision::None,
            greeted: false,
            tls_available,
            tls_active: false,
            errors: 0,
            junk: 0,
            in_mail: false,
            rcpts_tried: 0,
            bdat: false,
            body_open: false,
            body_bytes: 0,
            body_failed: None,
            line_ends: LineEnds::default(),
            discarding: None,
            refused: None,
        }
    }

    /// Writes the 220 banner. Call once, before the first `handle`.
    pub fn greet(&mut self) {
        let text = format!("{} ESMTP postern", self.config.hostname);
        write_reply(&mut self.out, 220, None, &text);
    }

    /// Replies waiting to be written.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// Forgets the replies once written.
    pub fn clear_output(&mut self) {
        self.out.clear();
        self.flush_mark = 0;
    }

    /// The message refused since the last call, if any (see [`RefusedMessage`]).
    pub fn take_refused(&mut self) -> Option<Box<RefusedMessage>> {
        self.refused.take()
    }

    /// Keeps a refusal of the transaction's message for [`Self::take_refused`]; call before
    /// the transaction is reset. Not for a transaction with no recipient (a BDAT out of
    /// sequence): no message was refused there, and the client's error is its reply.
    fn note_refused(&mut self, code: u16, enhanced: EnhancedCode, text: &str) {
        if self.envelope.recipient_count() == 0 {
            return;
        }
        self.refused = Some(Box::new(RefusedMessage {
            code,
            enhanced,
            text: text.to_owned(),
            helo: self.envelope.helo().to_owned(),
            reverse_path: self.envelope.reverse_path().to_owned(),
            recipients: self.envelope.recipient_count(),
        }));
    }

    /// The transaction's envelope (valid from `Mail` until the transaction ends).
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// Whether the session is inside TLS.
    pub fn is_tls(&self) -> bool {
        self.tls_active
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// Whether a DATA body or BDAT chunk is being read (for choosing a timeout).
    pub fn in_body(&self) -> bool {
        matches!(self.phase, Phase::Data(_) | Phase::Chunk { .. })
    }

    /// Whether a message's content has started and not ended: inside a DATA body or a BDAT
    /// chunk, or between the chunks of a BDAT transaction (RFC 3030 2: the chunks together
    /// are the body).
    pub fn in_message(&self) -> bool {
        self.in_body() || (self.in_mail && self.bdat)
    }

    /// The TLS handshake finished: back to the initial state (RFC 3207 4.2).
    pub fn tls_established(&mut self) {
        self.tls_active = true;
        self.greeted = false;
        self.envelope.clear_helo();
        self.framer.reset();
        self.reset_transaction();
    }

    /// Settles a pending `Mail`, `Rcpt` or `DataStart` with consent.
    pub fn accept(&mut self) {
        match std::mem::replace(&mut self.decision, Decision::None) {
            Decision::Mail => {
                self.in_mail = true;
                replies::MAIL_OK.write(&mut self.out);
            }
            Decision::Rcpt => replies::RCPT_OK.write(&mut self.out),
            Decision::DataStart => {
                self.body_open = true;
                if !self.bdat {
                    write_reply(&mut self.out, 354, None, "End data with <CR><LF>.<CR><LF>");
                    self.phase = Phase::Data(DataDecoder::new());
                }
            }
            other => self.decision = other,
        }
    }

    /// Settles a pending `Mail`, `Rcpt` or `DataStart` with a refusal.
    pub fn reject(&mut self, reply: StaticReply) {
        self.reject_with(reply.code, reply.enhanced, reply.text);
    }

    /// Like [`Self::reject`] with text built at run time.
    pub fn reject_with(&mut self, code: u16, enhanced: EnhancedCode, text: &str) {
        match std::mem::replace(&mut self.decision, Decision::None) {
            Decision::Mail => self.envelope.clear_transaction(),
            Decision::Rcpt => self.envelope.pop_rcpt(),
            Decision::DataStart => {
                if self.bdat {
                    // The chunk still has to be read; it is refused at its end.
                    self.body_failed = Some(PendingReply {
                        code,
                        enhanced,
                        text: Cow::Owned(text.to_owned()),
                    });
                    return;
                }
                self.note_refused(code, enhanced, text);
            }
            other => {
                self.decision = other;
                return;
            }
        }
        self.error_reply(code, Some(enhanced), text);
    }

    /// Stops appending the current body (the spool failed, say): the rest is read and thrown
    /// away, and `reply` answers the end of data. No `DataAbort` follows.
    pub fn abort_body(&mut self, reply: StaticReply) {
        self.body_open = false;
        self.body_failed = Some(reply.into());
    }

    /// The message is durable under `queue_id`: answers the end of data with 250.
    pub fn message_queued(&mut self, queue_id: &str) {
        if self.decision == Decision::Commit {
            self.decision = Decision::None;
            let text = format!("Ok: queued as {queue_id}");
            write_reply(&mut self.out, 250, Some(EnhancedCode::new(2, 0, 0)), &text);
            // Like Postfix's hard error limit: errors count between messages delivered.
            self.errors = 0;
            self.junk = 0;
            self.reset_transaction();
        }
    }

    /// The message could not be made durable: answers the end of data with `reply`.
    pub fn message_failed(&mut self, reply: StaticReply) {
        if self.decision == Decision::Commit {
            self.decision = Decision::None;
            self.body_open = false;
            self.note_refused(reply.code, reply.enhanced, reply.text);
            self.error_reply(reply.code, Some(reply.enhanced), reply.text);
            self.reset_transaction();
        }
    }

    /// The client was silent too long: 421 4.4.2 and close. Returns whether a body record
    /// was open (the embedding discards it).
    pub fn timeout(&mut self) -> bool {
        self.close_with(replies::TIMEOUT)
    }

    /// The session has lasted as long as it may: 421 4.4.2, said as such, and close. Returns
    /// whether a body record was open.
    pub fn session_time_over(&mut self) -> bool {
        self.close_with(replies::SESSION_TIME)
    }

    /// The server is stopping: 421 4.3.2 and close. Returns whether a body record was open.
    pub fn shutdown(&mut self) -> bool {
        self.close_with(replies::SHUTDOWN)
    }

    fn close_with(&mut self, reply: StaticReply) -> bool {
        // A session already closed (its 221, or a 421 of its own) says nothing more: one
        // closing reply, never a second after it (RFC 5321 3.8).
        if !self.is_closed() {
            self.write_closing(reply);
        }
        let open = self.body_open;
        self.reset_transaction();
        self.phase = Phase::Closed;
        open
    }

    /// Writes a reply that ends the session (221, 421) with this server's name first, as
    /// RFC 5321 4.2.3 gives them (`421 <domain> Service not available, closing transmission
    /// channel`): a client may read the name in these replies (RFC 5321 4.2).
    fn write_closing(&mut self, reply: StaticReply) {
        let text = format!("{} {}", self.config.hostname, reply.text);
        write_reply(&mut self.out, reply.code, Some(reply.enhanced), &text);
    }

    /// Processes `input` (everything received and not yet consumed) up to the next event.
    pub fn handle<'a>(&mut self, input: &'a [u8]) -> Step<'a> {
        if self.decision != Decision::None {
            if let Some(step) = self.settle_forgotten() {
                return step;
            }
        }
        let mut pos = 0;
        loop {
            let event = match &mut self.phase {
                Phase::Closed => Some(self.closing_event()),
                Phase::Data(_) => self.data(input, &mut pos),
                Phase::Chunk { .. } => self.chunk(input, &mut pos),
                Phase::Commands if self.out.len() >= self.flush_mark + OUTPUT_HIGH_WATER => {
                    self.flush_mark = self.out.len();
                    Some(Event::Flush)
                }
                // The tail of an overlong line, dropped up to its line feed first: the line
                // after it is looked at from its start below, in whatever read it came.
                Phase::Commands if !self.framer.at_line_start() => {
                    pos += self.framer.skip_tail(&input[pos..]);
                    (!self.framer.at_line_start()).then_some(Event::NeedInput)
                }
                // A TLS ClientHello on a cleartext port (a client set for implicit TLS, RFC
                // 8314, or one that starts TLS without STARTTLS): no line of it is a command,
                // and the client waits for the server's hello, which never comes. Closed at
                // once, as an HTTP request is, rather than when the command timeout ends it.
                Phase::Commands if self.framer.at_line_start() && looks_like_tls(&input[pos..]) => {
                    self.close_with(replies::NOT_SMTP)
                        .then_some(Event::DataAbort)
                }
                Phase::Commands => match self.framer.next_line(&input[pos..]) {
                    Frame::Incomplete { consumed } => {
                        pos += consumed;
                        Some(Event::NeedInput)
                    }
                    Frame::TooLong { head, consumed } => {
                        pos += consumed;
                        self.refuse_line(replies::LINE_TOO_LONG, head)
                    }
                    Frame::Line { line, consumed } => {
                        // The octet before the line feed (CR normally). Only CR LF ends a
                        // command line (RFC 5321 2.3.8); a line ended by a bare LF is refused,
                        // not run, and the framer stays in step at the LF.
                        let bare_lf = consumed < 2 || input[pos + consumed - 2] != b'\r';
                        pos += consumed;
                        if bare_lf {
                            self.refuse_line(replies::BARE_LF_COMMAND, line)
                        } else {
                            self.command(line, input, &mut pos)
                        }
                    }
                },
            };
            if let Some(event) = event {
                return Step {
                    consumed: pos,
                    event,
                };
            }
            if self.is_closed() {
                return Step {
                    consumed: pos,
                    event: self.closing_event(),
                };
            }
        }
    }

    /// The event of a closed session: `Close`, after a `DataAbort` where it closed with a
    /// message open (the error limit's 421 in the middle of a BDAT transaction).
    fn closing_event(&mut self) -> Event<'static> {
        if self.reset_transaction() {
            Event::DataAbort
        } else {
            Event::Close
        }
    }

    /// The embedding went on without settling a decision: treat it as a local error.
    fn settle_forgotten(&mut self) -> Option<Step<'static>> {
        if self.decision == Decision::Commit {
            self.decision = Decision::None;
            replies::NO_DECISION.write(&mut self.out);
            self.reset_transaction();
            return Some(Step {
                consumed: 0,
                event: Event::DataAbort,
            });
        }
        self.reject(replies::NO_DECISION);
        None
    }

    fn error_reply(&mut self, code: u16, enhanced: Option<EnhancedCode>, text: &str) {
        write_reply(&mut self.out, code, enhanced, text);
        self.count_error();
    }

    fn count_error(&mut self) {
        self.errors += 1;
        if self.errors >= self.config.max_errors && !self.is_closed() {
            self.write_closing(replies::TOO_MANY_ERRORS);
            self.phase = Phase::Closed;
        }
    }

    /// Refuses a command line without running it. A refused BDAT line still announced a
    /// chunk (RFC 3030 2): its octets follow, and reading them as commands would let a client
    /// smuggle commands past the line's refusal, so the connection ends as after an
    /// unreadable chunk size.
    fn refuse_line(&mut self, reply: StaticReply, line: &[u8]) -> Option<Event<'static>> {
        // Another line than a chunk's: what follows it is no longer the pipeline's.
        self.discarding = None;
        self.note_rcpt_tried(line);
        self.error_reply(reply.code, Some(reply.enhanced), reply.text);
        if is_bdat(line) && !self.is_closed() {
            let open = self.close_with(replies::BDAT_LOST);
            return open.then_some(Event::DataAbort);
        }
        None
    }

    /// A refused RCPT is a RCPT tried, whatever refused it (its syntax, a bare LF, its
    /// length): DATA or BDAT after it gets 554 (no valid recipients), not 503 (RFC 2920
    /// 3.1). Returns the line's verb.
    fn note_rcpt_tried<'l>(&mut self, line: &'l [u8]) -> &'l [u8] {
        let verb = line.split(|&b| b == b' ').next().unwrap_or_default();
        if self.in_mail && verb.eq_ignore_ascii_case(b"RCPT") {
            self.rcpts_tried += 1;
        }
        verb
    }

    fn fail(&mut self, reply: StaticReply) -> Option<Event<'static>> {
        self.error_reply(reply.code, Some(reply.enhanced), reply.text);
        None
    }

    fn ok(&mut self, reply: StaticReply) -> Option<Event<'static>> {
        reply.write(&mut self.out);
        None
    }

    /// Ends the transaction; returns whether the embedding had a body record open.
    fn reset_transaction(&mut self) -> bool {
        let open = self.body_open;
        self.envelope.clear_transaction();
        self.in_mail = false;
        self.rcpts_tried = 0;
        self.bdat = false;
        self.body_open = false;
        self.body_bytes = 0;
        self.body_failed = None;
        self.line_ends = LineEnds::default();
        if !matches!(self.phase, Phase::Closed) {
            self.phase = Phase::Commands;
        }
        open
    }

    /// Resets for RSET, HELO/EHLO and STARTTLS; a `DataAbort` if a body was open.
    fn reset_event(&mut self) -> Option<Event<'static>> {
        self.reset_transaction().then_some(Event::DataAbort)
    }

    fn command<'a>(
        &mut self,
        line: &'a [u8],
        input: &'a [u8],
        pos: &mut usize,
    ) -> Option<Event<'a>> {
        if !is_bdat(line) {
            self.discarding = None;
        }
        if line.len() + 2 > self.config.max_line && !takes_dsn_room(line) {
            return self.refuse_line(replies::LINE_TOO_LONG, line);
        }
        // A BDAT behind a CR inside the line: what a reader that ends lines at a bare CR
        // takes for a chunk would be read here as commands. Refused and the session closed,
        // as for any line that may announce a chunk not read as one.
        if line.contains(&b'\r') && is_bdat(line) {
            return self.refuse_line(replies::BARE_CR_BDAT, line);
        }
        let cmd = match Command::parse(line) {
            Ok(cmd) => cmd,
            // Not offered, so not known here, whatever its arguments (see below).
            Err(_) if is_bdat(line) && !self.config.offer_chunking => {
                return self.refuse_line(replies::BDAT_NOT_OFFERED, line);
            }
            Err(e @ CommandError::ChunkSyntax(size)) if self.config.offer_chunking => {
                // The size was read: the chunk is read and thrown away as a refused one is,
                // answered 501 at its end, and its transaction fails (RFC 3030 2); the
                // session stays in step. (Taken as not the last: a BDAT pipelined behind it
                // gets the same refusal, any other command ends that.)
                self.discarding = None;
                self.phase = Phase::Chunk {
                    decoder: ChunkDecoder::new(size),
                    size,
                    last: false,
                };
                self.body_failed = Some(e.reply().into());
                return self.refused_mid_body();
            }
            Err(CommandError::BadChunkSize) => {
                // The chunk that follows cannot be skipped: stop before reading it as commands.
                CommandError::BadChunkSize.reply().write(&mut self.out);
                let open = self.close_with(replies::BDAT_LOST);
                return open.then_some(Event::DataAbort);
            }
            Err(CommandError::Unknown) if looks_like_http(line) => {
                let open = self.close_with(replies::NOT_SMTP);
                return open.then_some(Event::DataAbort);
            }
            // BDAT and a tab: not a command this parser reads, but a client or a proxy in
            // front that does would send a chunk next.
            Err(e) if is_bdat(line) => return self.refuse_line(e.reply(), line),
            Err(e) => {
                let verb = self.note_rcpt_tried(line);
                // AUTH is not offered: whatever its arguments, it is a command recognised and
                // not implemented (RFC 5321 4.2.4), as with a mechanism.
                if verb.eq_ignore_ascii_case(b"AUTH") {
                    return self.fail(replies::NO_AUTH);
                }
                return self.fail(e.reply());
            }
        };
        if matches!(cmd, Command::Bdat { .. }) && !self.config.offer_chunking {
            // Not offered, so not known here; its chunk follows, so the session ends.
            return self.refuse_line(replies::BDAT_NOT_OFFERED, line);
        }
        // Commands that move no mail forward: a client may send some, but one that sends them
        // without end would hold its core for nothing.
        let junk = matches!(
            cmd,
            Command::Ehlo(_)
                | Command::Helo(_)
                | Command::Rset
                | Command::Noop(_)
                | Command::Vrfy(_)
                | Command::Expn(_)
                | Command::Help(_)
        );
        // (An empty chunk that is not the last counts too, once its reply is written, as
        // a chunk behind a refused one does: `chunk`, `end_of_body`.)
        let event = self.run_command(cmd, input, pos);
        if junk {
            self.count_junk();
            if self.is_closed() {
                // The junk limit ended the session with this command, its reply written
                // before the 421; a message it dropped (RSET, EHLO) is still told.
                return event.filter(|e| matches!(e, Event::DataAbort));
            }
        }
        event
    }

    /// Past [`ServerConfig::max_junk_commands`] since the last message accepted, each command
    /// that moves no mail forward still gets its reply and also counts as an error, so the
    /// session ends at the error limit (like Postfix's junk command limit).
    fn count_junk(&mut self) {
        self.junk = self.junk.saturating_add(1);
        if self.junk > self.config.max_junk_commands && !self.is_closed() {
            self.errors = self.errors.saturating_add(1);
            if self.errors >= self.config.max_errors {
                self.write_closing(replies::TOO_MUCH_JUNK);
                self.phase = Phase::Closed;
            }
        }
    }

    fn run_command<'a>(
        &mut self,
        cmd: Command<'a>,
        input: &'a [u8],
        pos: &mut usize,
    ) -> Option<Event<'a>> {
        match cmd {
            Command::Ehlo(name) | Command::Helo(name) => {
                let esmtp = matches!(cmd, Command::Ehlo(_));
                self.envelope.set_helo(name, esmtp);
                self.greeted = true;
                if esmtp {
                    self.write_ehlo(name);
                } else {
                    let text = hello_text(&self.config.hostname, name);
                    write_reply(&mut self.out, 250, None, &text);
                }
                self.reset_event()
            }
            Command::Mail(path, params) => self.mail(path, params),
            Command::Rcpt(path, params) => self.rcpt(path, params),
            Command::Data => self.data_command(),
            Command::Bdat { size, last } => self.bdat_command(size, last),
            Command::Rset => {
                replies::OK.write(&mut self.out);
                self.reset_event()
            }
            Command::Noop(_) => self.ok(replies::OK),
            Command::Quit => {
                let open = self.close_with(replies::BYE);
                open.then_some(Event::DataAbort)
            }
            Command::Vrfy(_) => self.ok(replies::VRFY),
            Command::Expn(_) => self.ok(replies::EXPN),
            // What it lists is what this session offers (RFC 5321 4.1.1.8).
            Command::Help(_) => {
                let tls = self.tls_available && !self.tls_active;
                self.ok(match (self.config.offer_chunking, tls) {
                    (true, true) => replies::HELP,
                    (true, false) => replies::HELP_NO_TLS,
                    (false, true) => replies::HELP_NO_BDAT,
                    (false, false) => replies::HELP_NO_BDAT_NO_TLS,
                })
            }
            Command::Auth(..) => self.fail(replies::NO_AUTH),
            Command::Obsolete(_) => self.fail(replies::OBSOLETE),
            Command::StartTls => {
                if self.tls_active {
                    return self.fail(replies::TLS_ACTIVE);
                }
                if !self.tls_available {
                    return self.fail(replies::NO_TLS);
                }
                if self.in_mail {
                    return self.fail(replies::TLS_IN_TRANSACTION);
                }
                replies::TLS_GO.write(&mut self.out);
                // Whatever the client pipelined after STARTTLS is dropped, unread.
                *pos = input.len();
                self.framer.reset();
                Some(Event::StartTls)
            }
        }
    }

    fn write_ehlo(&mut self, name: &str) {
        let first = hello_text(&self.config.hostname, name);
        let size = format!("SIZE {}", self.config.max_message_size);
        let lines: [&str; 10] = [
            &first,
            "PIPELINING",
            &size,
            "ENHANCEDSTATUSCODES",
            "8BITMIME",
            "BINARYMIME",
            "CHUNKING",
            "SMTPUTF8",
            "DSN",
            "STARTTLS",
        ];
        let starttls = self.tls_available && !self.tls_active;
        let count = if starttls { 10 } else { 9 };
        let offered = |line: &&str| match *line {
            "PIPELINING" => self.config.offer_pipelining,
            "BINARYMIME" | "CHUNKING" => self.config.offer_chunking,
            _ => true,
        };
        let shown: Vec<&str> = lines[..count].iter().copied().filter(offered).collect();
        for (i, line) in shown.iter().enumerate() {
            write_reply_line(&mut self.out, 250, i + 1 == shown.len(), line);
        }
    }

    fn mail<'a>(&mut self, path: ReversePath<'a>, params: MailParams<'a>) -> Option<Event<'a>> {
        if !self.greeted && self.config.require_helo {
            return self.fail(replies::NEED_HELO);
        }
        if self.in_mail {
            return self.fail(replies::NESTED_MAIL);
        }
        if !params.is_empty() && !self.envelope.is_esmtp() && self.greeted {
            return self.fail(replies::PARAMS_NEED_EHLO);
        }
        if params.auth.is_some() {
            // RFC 5321 4.1.1.11: AUTH is not offered, so its parameter is not recognised.
            return self.fail(replies::AUTH_NOT_OFFERED);
        }
        if params
            .size
            .is_some_and(|s| s > self.config.max_message_size)
        {
            return self.fail(replies::TOO_BIG);
        }
        // Other extensions' parameters are taken only as EHLO advertises them.
        if params.body == Some(BodyType::BinaryMime) && !self.config.offer_chunking {
            return self.fail(replies::BINARYMIME_NOT_OFFERED);
        }
        if let ReversePath::Mailbox(m) = &path {
            if !m.is_ascii() && !params.smtputf8 {
                return self.fail(replies::NEED_SMTPUTF8);
            }
        }
        self.envelope.set_mail(&path, &params);
        self.decision = Decision::Mail;
        Some(Event::Mail(path, params))
    }

    fn rcpt<'a>(&mut self, path: ForwardPath<'a>, params: RcptParams<'a>) -> Option<Event<'a>> {
        if !self.in_mail {
            return self.fail(replies::NEED_MAIL);
        }
        if self.bdat {
            return self.fail(replies::RCPT_AFTER_BDAT);
        }
        self.rcpts_tried += 1;
        // As at MAIL: parameters need EHLO, unless no greeting was asked for.
        if !params.is_empty() && !self.envelope.is_esmtp() && self.greeted {
            return self.fail(replies::PARAMS_NEED_EHLO);
        }
        if let ForwardPath::Mailbox(m) = &path {
            if !m.is_ascii() && !self.envelope.smtputf8() {
                return self.fail(replies::NEED_SMTPUTF8);
            }
        }
        if params.orcpt.is_some_and(|o| !o.is_ascii()) && !self.envelope.smtputf8() {
            // Raw UTF-8 in ORCPT only inside SMTPUTF8 (RFC 6533 3); outside it the address
            // is written utf-8-addr-xtext.
            return self.fail(replies::ORCPT_NEEDS_SMTPUTF8);
        }
        let limit = self.config.max_recipients.max(MIN_RECIPIENTS);
        let budget = limit
            .saturating_mul(ENVELOPE_BYTES_PER_RECIPIENT)
            .max(MIN_ENVELOPE_BYTES);
        let taken = self.envelope.recipient_count();
        let stored = self
            .config
            .max_envelope_bytes
            .saturating_sub((taken + 1).saturating_mul(self.config.stored_bytes_per_recipient));
        let budget = budget.min(stored);
        let fits = self.envelope.rcpt_fits(&path, &params, budget);
        // A mailbox already taken, given again past the limit with DSN parameters: taken
        // again where the envelope's octets allow, so that its reports are merged with the
        // first's when the message is stored (a 250 alone would drop a NOTIFY=SUCCESS the
        // client was told was taken; RFC 3461 4.1).
        let repeat_with_dsn = taken >= limit
            && fits
            && (params.notify.is_some() || params.orcpt.is_some())
            && self.envelope.has_recipient(&path);
        if (taken >= limit || !fits) && !repeat_with_dsn {
            // RFC 5321 4.5.3.1.10: the client sends these in a later transaction, so the
            // answer is not held against the session until the overshoot gets absurd.
            let absurd = self.rcpts_tried - taken > MAX_RCPT_OVERSHOOT;
            if self.envelope.has_recipient(&path) {
                // A mailbox already taken is the same recipient, stored once: a 452 would
                // have the client send the message to it again later. Past the overshoot it
                // is still 250, but counts as an error, so that a client repeating it
                // without end is ended (nothing of the transaction is taken then).
                replies::RCPT_OK.write(&mut self.out);
                if absurd {
                    self.count_error();
                }
                return None;
            }
            if absurd {
                return self.fail(replies::TOO_MANY_RCPTS);
            }
            replies::TOO_MANY_RCPTS.write(&mut self.out);
            return None;
        }
        self.envelope.push_rcpt(&path, &params);
        self.decision = Decision::Rcpt;
        Some(Event::Rcpt(path, params))
    }

    /// Why a transaction cannot take a body now, if it cannot.
    fn body_refusal(&self) -> Option<StaticReply> {
        if !self.in_mail {
            Some(replies::NEED_MAIL)
        } else if self.envelope.recipient_count() == 0 && self.rcpts_tried == 0 {
            Some(replies::NEED_RCPT)
        } else if self.envelope.recipient_count() == 0 {
            Some(replies::NO_RECIPIENTS)
        } else {
            None
        }
    }

    fn data_command(&mut self) -> Option<Event<'static>> {
        if let Some(refusal) = self.body_refusal() {
            return self.fail(refusal);
        }
        if self.bdat {
            return self.fail(replies::DATA_AFTER_BDAT);
        }
        if self.envelope.body_type() == BodyType::BinaryMime {
            return self.fail(replies::BINARY_NEEDS_BDAT);
        }
        self.body_bytes = 0;
        self.body_failed = None;
        self.decision = Decision::DataStart;
        Some(Event::DataStart)
    }

    fn bdat_command(&mut self, size: u64, last: bool) -> Option<Event<'static>> {
        self.phase = Phase::Chunk {
            decoder: ChunkDecoder::new(size),
            size,
            last,
        };
        if self.body_failed.is_some() {
            return None;
        }
        if let Some(refused) = &self.discarding {
            self.body_failed = Some(refused.clone());
            return None;
        }
        if let Some(refusal) = self.body_refusal() {
            self.body_failed = Some(refusal.into());
            return None;
        }
        if self.body_bytes.saturating_add(size) > self.config.max_message_size {
            self.body_failed = Some(replies::TOO_BIG.into());
            return self.refused_mid_body();
        }
        if !self.bdat {
            self.bdat = true;
            self.decision = Decision::DataStart;
            return Some(Event::DataStart);
        }
        None
    }

    fn data<'a>(&mut self, input: &'a [u8], pos: &mut usize) -> Option<Event<'a>> {
        let Phase::Data(decoder) = &mut self.phase else {
            return None;
        };
        loop {
            if *pos == input.len() {
                return Some(Event::NeedInput);
            }
            let step = decoder.decode(&input[*pos..]);
            *pos += step.consumed;
            if decoder.saw_bare_newline()
                && self.config.bare_newline == BareNewlinePolicy::Reject
                && self.body_failed.is_none()
            {
                self.body_failed = Some(replies::BARE_NEWLINE.into());
                if !step.end && std::mem::take(&mut self.body_open) {
                    return Some(Event::DataAbort);
                }
            }
            if step.end {
                return self.end_of_body(None);
            }
            if step.bytes.is_empty() || self.body_failed.is_some() {
                continue;
            }
            self.body_bytes += step.bytes.len() as u64;
            if self.body_bytes > self.config.max_message_size {
                self.body_failed = Some(replies::TOO_BIG.into());
                if std::mem::take(&mut self.body_open) {
                    return Some(Event::DataAbort);
                }
                continue;
            }
            return Some(Event::Body(step.bytes));
        }
    }

    fn chunk<'a>(&mut self, input: &'a [u8], pos: &mut usize) -> Option<Event<'a>> {
        let Phase::Chunk {
            decoder,
            size,
            last,
        } = &mut self.phase
        else {
            return None;
        };
        let (size, last) = (*size, *last);
        // A text body (not BINARYMIME) must have CR LF line ends, as in DATA (RFC 3030 3).
        let text = self.envelope.body_type() != BodyType::BinaryMime;
        if decoder.remaining() > 0 {
            let avail = decoder.available(&input[*pos..]);
            if avail.is_empty() {
                return Some(Event::NeedInput);
            }
            let (consumed, bytes) = if text {
                let r = self.line_ends.repair(avail);
                (r.consumed, r.bytes)
            } else {
                (avail.len(), avail)
            };
            decoder.advance(consumed);
            *pos += consumed;
            return self.chunk_bytes(bytes);
        }
        if last && text {
            // CRs held back at the very end of the body were bare ones: a CR LF each, one
            // per call (`chunk_bytes` hands it on, or drops it for a body already refused).
            let tail = self.line_ends.finish();
            if !tail.is_empty() {
                return self.chunk_bytes(tail);
            }
        }
        self.phase = Phase::Commands;
        if last || self.body_failed.is_some() {
            return self.end_of_body(Some(last));
        }
        let text = format!("{size} octets received");
        write_reply(&mut self.out, 250, Some(EnhancedCode::new(2, 0, 0)), &text);
        if size == 0 {
            // An empty chunk that is not the last adds nothing to the message: it moves no
            // mail forward, like a NOOP, and counts as junk after its reply. Where that
            // ends the session, the message it belonged to is dropped.
            self.count_junk();
            if self.is_closed() {
                return self.refused_mid_body();
            }
        }
        None
    }

    /// Hands on body octets of a chunk, unless the body is already being refused; applies the
    /// bare line-end policy and the size limit to what the chunk turned out to hold.
    fn chunk_bytes<'a>(&mut self, bytes: &'a [u8]) -> Option<Event<'a>> {
        if self.line_ends.saw_bare_newline()
            && self.config.bare_newline == BareNewlinePolicy::Reject
            && self.body_failed.is_none()
        {
            self.body_failed = Some(replies::BARE_NEWLINE.into());
            return self.refused_mid_body();
        }
        if bytes.is_empty() || self.body_failed.is_some() {
            return None;
        }
        self.body_bytes += bytes.len() as u64;
        if self.body_bytes > self.config.max_message_size {
            // Repaired line ends can make a body longer than its BDAT sizes said.
            self.body_failed = Some(replies::TOO_BIG.into());
            return self.refused_mid_body();
        }
        Some(Event::Body(bytes))
    }

    /// A body refused before its end (over the size limit, a bare line end): the embedding
    /// drops what it stored of it now (`DataAbort`), not once the rest is read and thrown
    /// away. A client that takes its time over that rest (a trickle, a BDAT chunk declared
    /// far over the limit) would otherwise keep the spool's segment pinned, and no segment
    /// after it freed, for as long as its session lasts.
    fn refused_mid_body(&mut self) -> Option<Event<'static>> {
        std::mem::take(&mut self.body_open).then_some(Event::DataAbort)
    }

    /// The end of a DATA body, of a BDAT LAST chunk, or of a refused chunk (`chunk`: a BDAT
    /// chunk's end, with whether it was the `LAST`).
    fn end_of_body(&mut self, chunk: Option<bool>) -> Option<Event<'static>> {
        self.phase = Phase::Commands;
        let (last, chunk) = (chunk == Some(true), chunk.is_some());
        if let Some(reply) = self.body_failed.take() {
            let open = self.body_open;
            if chunk && self.discarding.is_some() {
                // A chunk the client had pipelined behind a refused one: it could not know,
                // and a long message's chunks would otherwise reach the error limit. It
                // moves no mail forward, so it counts as junk: a client that sends only
                // refused chunks is still ended.
                write_reply(&mut self.out, reply.code, Some(reply.enhanced), &reply.text);
                self.count_junk();
            } else {
                self.note_refused(reply.code, reply.enhanced, &reply.text);
                self.error_reply(reply.code, Some(reply.enhanced), &reply.text);
            }
            // Up to the `LAST` chunk: nothing a client pipelines comes after that one
            // but a new transaction, and a chunk sent there is out of sequence (RFC 3030 2:
            // `503`), not one more of the failed message's.
            self.discarding = (chunk && !last).then_some(reply);
            // Whatever refused it, a refused chunk fails its transaction (RFC 3030 2), one
            // before any RCPT too: its client may have pipelined its next MAIL behind it.
            self.reset_transaction();
            return open.then_some(Event::DataAbort);
        }
        self.decision = Decision::Commit;
        Some(Event::DataEnd)
    }
}

/// MAIL and RCPT lines, which may carry DSN parameters past the usual line cap.
fn takes_dsn_room(line: &[u8]) -> bool {
    line.len() >= 5
        && (line[..5].eq_ignore_ascii_case(b"MAIL ") || line[..5].eq_ignore_ascii_case(b"RCPT "))
}

/// The first line of the HELO/EHLO reply. The client's name is shown in ASCII (a UTF-8 domain
/// as A-labels, since reply text is ASCII: RFC 5321 4.2), and left out when the line would
/// pass 512 octets with its code and CRLF (RFC 5321 4.5.3.1.5).
fn hello_text(hostname: &str, name: &str) -> String {
    match crate::address::domain_to_ascii(name) {
        Some(ascii) if hostname.len() + ascii.len() + 13 <= 512 => {
            format!("{hostname} Hello {ascii}")
        }
        _ => format!("{hostname} Hello"),
    }
}

/// Whether a command line is meant as BDAT (the verb in any case, after any blanks, then a
/// blank: space, tab, vertical tab or form feed), whatever the rest of it. A lenient reader
/// (a client's, a proxy's in front) may take any of these for BDAT and send a chunk next;
/// one that ends lines at a bare CR, also a BDAT after a CR inside the line
/// (`NOOP \rBDAT 5`), which this server reads as one line.
fn is_bdat(line: &[u8]) -> bool {
    let blank = |b: u8| matches!(b, b' ' | b'\t' | 0x0b | 0x0c);
    line.split(|&b| b == b'\r').any(|part| {
        let start = part.iter().position(|&b| !blank(b)).unwrap_or(part.len());
        let part = &part[start..];
        part.len() > 4 && part[..4].eq_ignore_ascii_case(b"BDAT") && blank(part[4])
    })
}

/// A TLS record carrying a handshake (type 22, protocol version 3.x): the start of a
/// ClientHello. No command line begins with a control character.
fn looks_like_tls(input: &[u8]) -> bool {
    input.starts_with(&[0x16, 0x03])
}

fn looks_like_http(line: &[u8]) -> bool {
    [
        &b"GET "[..],
        b"POST ",
        b"HEAD ",
        b"PUT ",
        b"CONNECT ",
        b"OPTIONS ",
        b"DELETE ",
        b"TRACE ",
        b"PATCH ",
        // The HTTP/2 connection preface (RFC 9113 3.4).
        b"PRI * HTTP/2",
    ]
    .iter()
    .any(|m| line.starts_with(m))
}
