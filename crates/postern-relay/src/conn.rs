//! One outbound SMTP connection: connect, greeting, EHLO, STARTTLS by policy, then
//! transactions with the body read straight from the spool's mapping.

use std::io;

use nix::errno::Errno;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::future;
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use postern_proto::client::{
    BodyMode, ClientError, ClientEvent, ClientSession, Transaction, TransactionResult,
};
use postern_proto::stuff::DotStuffer;
use postern_proto::Reply;
use postern_server::conn::Conn;
use postern_spool::MessageRef;
use rustls::pki_types::ServerName;

use crate::tls::TlsPolicy;

/// Client timeouts (RFC 5321 4.5.3.2 defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect.
    pub connect: Duration,
    /// The 220 greeting (and the EHLO and STARTTLS replies).
    pub greeting: Duration,
    /// The reply to MAIL.
    pub mail: Duration,
    /// The reply to each RCPT.
    pub rcpt: Duration,
    /// The 354 to DATA.
    pub data_init: Duration,
    /// Each write of body bytes.
    pub data_block: Duration,
    /// The reply after the end of the body.
    pub data_done: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        let m = |n: u64| Duration::from_secs(60 * n);
        Timeouts {
            connect: Duration::from_secs(30),
            greeting: m(5),
            mail: m(5),
            rcpt: m(5),
            data_init: m(2),
            data_block: m(3),
            data_done: m(10),
        }
    }
}

/// Why a connection could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnError {
    /// Connecting, reading or writing failed, or timed out.
    Io(String),
    /// This machine has no way to that address: no route to its network (said by its
    /// kernel, or by a router on the way), or no support of its family here (an IPv4
    /// address on a machine with IPv6 only, say). Nothing of the next hop's doing.
    NoRoute(String),
    /// The server refused us or broke the protocol.
    Smtp(ClientError),
    /// STARTTLS was required and is not offered.
    TlsRequired,
    /// The TLS handshake failed.
    Tls(String),
    /// Reading or writing failed, or timed out, after the server had answered.
    Lost(String),
    /// A connection kept from an earlier transaction was refused (421) or closed at its RSET,
    /// so the server took nothing of the next transaction: that one goes on a new connection.
    Stale(String),
}

impl ConnError {
    /// The text for a status record and a bounce.
    pub fn describe(&self, remote: &str) -> String {
        cut_account(match self {
            ConnError::Io(e) | ConnError::NoRoute(e) | ConnError::Lost(e) | ConnError::Stale(e) => {
                format!("connection with {remote} failed: {e}")
            }
            ConnError::Smtp(ClientError::Greeting(r)) | ConnError::Smtp(ClientError::Helo(r)) => {
                format!("{remote} said: {r}")
            }
            ConnError::Smtp(e) => format!("{remote}: {e}"),
            ConnError::TlsRequired => {
                format!("{remote} does not offer STARTTLS, which is required")
            }
            ConnError::Tls(e) => format!("TLS with {remote} failed: {e}"),
        })
    }

    /// Whether TLS failed on the host's name alone (the certificate does not carry it, or
    /// it is no name TLS can carry): the same address may do under another name.
    pub fn on_the_name(&self) -> bool {
        matches!(self, ConnError::Tls(s) if s.starts_with(NAME_NOT_CERTIFIED) || s.ends_with(NOT_A_SERVER_NAME))
    }

    /// The status a report gives this failure where no reply of the next hop gives one:
    /// `4.7.4` for a next hop without the TLS required of it (security features not
    /// supported), `4.7.5` for a handshake or a certificate that failed (cryptographic
    /// failure), RFC 3463 3.8; None for the others, whose status comes from elsewhere.
    pub fn tls_status(&self) -> Option<&'static str> {
        match self {
            ConnError::TlsRequired => Some("4.7.4"),
            ConnError::Tls(_) => Some("4.7.5"),
            _ => None,
        }
    }

    /// Whether the next hop answered before the failure (a greeting, an EHLO reply, a TLS
    /// handshake): it is then the remote MTA of the failure, not an address nobody answered.
    pub fn answered(&self) -> bool {
        !matches!(self, ConnError::Io(_) | ConnError::NoRoute(_))
    }
}

/// The most octets of an account of an attempt kept (a next hop's reply may have 64 lines of
/// 500 octets; kept whole, it would be stored for each recipient at each attempt, and go
/// into reports): enough for any reply people write.
pub(crate) const MAX_ACCOUNT: usize = 2048;

/// `text` cut after [`MAX_ACCOUNT`] octets, at a character's end, marked `[...]`.
pub(crate) fn cut_account(mut text: String) -> String {
    if text.len() > MAX_ACCOUNT {
        let mut end = MAX_ACCOUNT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str(" [...]");
    }
    text
}

/// How to set up TLS on one connection.
#[derive(Clone)]
pub struct TlsSetup {
    /// The policy.
    pub policy: TlsPolicy,
    /// The client configuration to use (verified for `Required`).
    pub config: Arc<rustls::ClientConfig>,
    /// Set by [`Outbound::connect`] when it tried a TLS handshake: whether it completed,
    /// whatever happened in the session after it.
    pub handshake: std::cell::Cell<Option<bool>>,
}

/// An open, greeted connection, idle between transactions.
pub struct Outbound {
    stream: Conn,
    session: ClientSession,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Reused for coalesced writes.
    out: Vec<u8>,
    /// The host name or address we talk to, for logs and reports.
    pub remote: String,
    /// The address connected to.
    pub addr: SocketAddr,
    /// Transactions done on this connection.
    pub transactions: u64,
    /// The connection broke off and that was counted against its next hop (once per
    /// connection, however many transactions it carried).
    pub broke_counted: std::cell::Cell<bool>,
    /// Its next hop's count of transactions answered (`DestQueue::answered`) when this
    /// connection's transaction began, plus those this connection got answered since: when
    /// the count has moved past it, another connection got an answer meanwhile.
    pub answered_mark: std::cell::Cell<u64>,
    /// Given up because its replies are out of step, with every command's bytes written
    /// and no QUIT yet: a QUIT is owed before the close (RFC 5321 4.1.1.10).
    quit_owed: std::cell::Cell<bool>,
    /// A write failed or ran out of time: what the next hop has may end inside a command or
    /// a body, so nothing more is written (a QUIT there could complete a BDAT chunk).
    write_failed: bool,
    /// Asked when a transaction's body is due: true when its message was withdrawn (deleted
    /// by the operator) meanwhile, and the body is not to be sent (see [`WITHDRAWN`]).
    withdrawn: Option<Box<dyn Fn() -> bool>>,
    /// When the last reply was read (or the connection made, or [`Outbound::quiet_from_now`]
    /// called), and how long the next hop had been quiet before it.
    last_reply: Instant,
    quiet_before_last: Duration,
    /// The session's count of replies read when commands last went out.
    replies_at_write: u64,
    /// A wait for replies to pipelined commands ran out after the next hop had answered
    /// some of them: see [`Outbound::lost_pipelined_replies`].
    pipelined_silence: bool,
    /// The longest wait for the reply to a command of an envelope (`MAIL`, `RCPT`, `DATA`'s
    /// 354, a `RSET`): see [`Outbound::reply_wait`].
    envelope_wait: Duration,
}

const READ_BUFFER: usize = 16 * 1024;
/// How long replies are read for after a write to the next hop failed (those it sent before
/// it broke off: a refusal of the body, the replies to a batch's earlier transactions).
pub(crate) const AFTER_WRITE_FAILURE: Duration = Duration::from_secs(2);
/// How long a parting QUIT may take to write.
const PARTING_WRITE: Duration = Duration::from_secs(1);

/// Why the outcome of a transaction is not known: its replies were out of step.
pub(crate) const OUT_OF_STEP: &str =
    "a reply came that no command asked for: the replies were out of step";

/// Why a connection is given up before its first transaction, or a kept one before the next.
const UNASKED_AFTER_EHLO: &str = "a reply came after the EHLO reply, which no command asked for";
const UNASKED_AFTER_RSET: &str = "a reply came after the RSET reply, which no command asked for";
const OUT_OF_STEP_AHEAD: &str = "the replies to the next commands could not be told from it";
/// Why a message is not sent after its 354: a reply came behind it, which no command asked
/// for (taken after the body, it would pass for the answer to the message).
const UNASKED_AFTER_354: &str =
    "a reply came after the 354, which no command asked for: the body was not sent";
/// Why a message is not sent with BDAT: a reply came behind the one that let BDAT go out (its
/// last RCPT's, without PIPELINING), before BDAT was written, so no command asked for it.
/// Taken as the answer to the body (BDAT has no 354 to show the shift), it would pass a
/// message the next hop then refuses for delivered.
pub(crate) const UNASKED_BEFORE_BDAT: &str =
    "a reply came before BDAT was sent, which no command asked for: the body was not sent";

/// Whether a failure ended a session whose replies were out of step: each reply read may have
/// answered the command before its own, so none of them says what became of its command.
pub fn out_of_step(e: &ConnError) -> bool {
    match e {
        ConnError::Smtp(ClientError::Unexpected(..)) => true,
        ConnError::Io(text) | ConnError::Lost(text) => {
            text == OUT_OF_STEP || text == UNASKED_AFTER_354 || text == UNASKED_BEFORE_BDAT
        }
        _ => false,
    }
}

/// Whether transactions whose replies were all read (one, or a pipelined batch) took a
/// message (its data accepted) although the next hop refused something among them: then a
/// NOOP checks that the replies were in step. A reply no command asked for, which next hops
/// that misbehave send after a refusal, shifts every later reply onto the command before its
/// own, and the real answer to the last data, read too late by the look after the last
/// reply, could be a refusal.
pub fn taken_past_a_refusal<'a>(
    results: impl Iterator<Item = &'a TransactionResult> + Clone,
) -> bool {
    let taken = |r: &TransactionResult| {
        r.mail.is_positive() && r.data.as_ref().is_some_and(Reply::is_positive)
    };
    let refused = |r: &TransactionResult| {
        !r.mail.is_positive()
            || r.rcpts.iter().any(|x| !x.is_positive())
            || r.data.as_ref().is_some_and(|d| !d.is_positive())
    };
    results.clone().any(taken) && results.clone().any(refused)
}

/// Whether transactions whose replies were all read took a message with an addressing status
/// (RFC 3463 X.1.X, what MAIL and RCPT get: `250 2.1.5`) as the answer to its data. Some next
/// hops answer a message so, and any 2yz is a success (RFC 5321 4.2.1); but it is also what a
/// RCPT reply looks like when a reply no command asked for has pushed the replies along by
/// one, the data's own answer (perhaps a refusal) still to come. Asked a NOOP, a next hop in
/// step says 250; one out of step puts that answer in the NOOP's place.
pub fn taken_with_an_addressing_status<'a>(
    mut results: impl Iterator<Item = &'a TransactionResult>,
) -> bool {
    results.any(|r| {
        r.mail.is_positive()
            && r.data
                .as_ref()
                .is_some_and(|d| d.is_positive() && d.enhanced.is_some_and(|e| e.subject == 1))
    })
}

/// Whether the replies just read must be seen to be in step (a NOOP, [`Outbound::in_step`])
/// before their outcomes are taken: [`taken_past_a_refusal`] or
/// [`taken_with_an_addressing_status`].
pub fn unsure_of<'a>(results: impl Iterator<Item = &'a TransactionResult> + Clone) -> bool {
    taken_past_a_refusal(results.clone()) || taken_with_an_addressing_status(results)
}

/// Whether a refusal of NOOP says the command is not known (500, 502, or X.5.X): a server
/// without NOOP, not a refusal of data that took its place.
fn not_known(r: &Reply) -> bool {
    matches!(r.code, 500 | 502) || r.enhanced.is_some_and(|e| e.subject == 5)
}

/// The octets of a blank line.
fn is_blank(b: &u8) -> bool {
    matches!(b, b'\r' | b'\n' | b' ' | b'\t')
}

/// What a socket holds past blank lines, looked at without waiting ([`behind_blanks`]).
enum Behind {
    /// Nothing (more) has come.
    Nothing,
    /// The end of the connection, or an error on it.
    Closed,
    /// Bytes other than blanks: the first of them, in the head peeked at.
    Said([u8; 64], std::ops::Range<usize>),
    /// Blanks still, after as many as are taken off at one look.
    Blanks,
}

/// What the socket `fd` holds past blank lines (no reply: some next hops write a line end
/// too many after a reply), which are taken off it a peek at a time, at most 16 peeks of 64
/// octets; nothing else is taken.
fn behind_blanks(fd: std::os::fd::RawFd) -> Behind {
    use nix::sys::socket::{recv, MsgFlags};
    for _ in 0..16 {
        let mut head = [0u8; 64];
        let n = match recv(fd, &mut head, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
            Err(Errno::EAGAIN) => return Behind::Nothing,
            Ok(0) | Err(_) => return Behind::Closed,
            Ok(n) => n,
        };
        let blanks = head[..n].iter().take_while(|b| is_blank(b)).count();
        if blanks < n {
            return Behind::Said(head, blanks..n);
        }
        if recv(fd, &mut head[..blanks], MsgFlags::MSG_DONTWAIT).unwrap_or_default() != blanks {
            return Behind::Closed;
        }
    }
    Behind::Blanks
}

/// A reply longer than the read buffer.
const REPLY_TOO_LONG: &str = "reply too long";

/// How long a NOOP answered with something other than 250 waits for a reply behind that one
/// (its own, when the replies were pushed along by one).
const NOOP_ECHO_WAIT: Duration = Duration::from_secs(2);

/// The text of a [`timed`] read or write that ran out of time.
pub(crate) const TIMED_OUT: &str = "timed out";

/// The text of a transaction given up before its body because its message was withdrawn
/// (deleted by the operator) while its envelope was answered: the connection is given up
/// with it, and the message's deletion stands for its outcome.
pub(crate) const WITHDRAWN: &str = "withdrawn before its body was sent";

/// The most body octets one write carries, each write given the data-block timeout.
const BODY_BLOCK: usize = 64 * 1024;

/// Writes `bytes` in writes of at most [`BODY_BLOCK`] octets, each within `limit`: the
/// data-block timeout is for each send of a block of data (RFC 5321 4.5.3.2.5), so a next hop
/// that keeps reading, however slowly, takes a body of any size, while one that stopped
/// reading is given up after `limit` (a chunk of the spool, or a body rewritten whole, may be
/// many megabytes: one write of it all would need the whole body sent within `limit`).
async fn write_in_blocks(
    stream: &mut Conn,
    bytes: &[u8],
    limit: Duration,
) -> Result<(), ConnError> {
    for block in bytes.chunks(BODY_BLOCK) {
        timed(limit, stream.write_all(block)).await?;
    }
    Ok(())
}

async fn timed<T>(
    limit: Duration,
    f: impl std::future::Future<Output = io::Result<T>>,
) -> Result<T, ConnError> {
    // `or` polls `f` first: one that is always ready (a read of a socket a next hop keeps
    // full) would never let a spent limit's timer be seen.
    if limit.is_zero() {
        return Err(ConnError::Io(TIMED_OUT.into()));
    }
    let timeout = async {
        glommio::timer::sleep(limit).await;
        Err(io::Error::new(io::ErrorKind::TimedOut, TIMED_OUT))
    };
    future::or(f, timeout)
        .await
        .map_err(|e| ConnError::Io(io_text(&e)))
}

/// An I/O error in words, for a status record and a report. rustls's text for a TLS session
/// that ended without its close_notify carries a link to its manual.
fn io_text(e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::UnexpectedEof && e.to_string().contains("close_notify") {
        return "connection closed by the server without ending TLS (no close_notify)".into();
    }
    e.to_string()
}

/// A failed handshake in words. rustls names most certificate faults itself, but passes on
/// some of what its verifier found as a Rust identifier (`Other(OtherError(CaUsedAsEndEntity))`):
/// those an operator meets with a misconfigured next hop are said plainly, the rest by name.
/// (Malformed encodings, bad signatures and the wrong key usage rustls names itself.)
/// How a handshake that failed on the certificate's names alone begins: under another name
/// of the same address (an MX host beside it) the certificate may do.
const NAME_NOT_CERTIFIED: &str = "the certificate does not name this host";

/// The end of the text for a host name that TLS cannot carry.
const NOT_A_SERVER_NAME: &str = "is not a valid TLS server name";

fn handshake_failure(e: &io::Error) -> String {
    use rustls::{CertificateError as C, Error};
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<Error>());
    let certificate = match inner {
        Some(Error::InvalidCertificate(c)) => c,
        // rustls's own texts name its types ("received corrupt message of type
        // InvalidContentType"): what they mean for a next hop.
        Some(Error::InvalidMessage(_)) => {
            return "the next hop's answer is not TLS, or is damaged".into()
        }
        Some(Error::AlertReceived(a)) => {
            return format!("the next hop ended the handshake with the alert {a:?}")
        }
        Some(Error::PeerIncompatible(p)) => {
            return format!("no TLS version or cipher suite in common with the next hop ({p:?})")
        }
        Some(Error::PeerMisbehaved(p)) => {
            return format!("the next hop broke the TLS protocol ({p:?})")
        }
        _ if e.kind() == io::ErrorKind::UnexpectedEof => {
            return "connection closed by the server during the TLS handshake".into()
        }
        _ => return io_text(e),
    };
    let plain = match certificate {
        C::NotValidForName => return NAME_NOT_CERTIFIED.into(),
        C::NotValidForNameContext { presented, .. } => {
            // rustls writes each name as its type would be (`DnsName("a.example")`).
            let names: Vec<&str> = presented
                .iter()
                .map(|n| {
                    n.strip_prefix("DnsName(\"")
                        .and_then(|n| n.strip_suffix("\")"))
                        .or_else(|| {
                            n.strip_prefix("IpAddress(")
                                .and_then(|n| n.strip_suffix(')'))
                        })
                        .unwrap_or(n)
                })
                .collect();
            return match names.as_slice() {
                [] => format!("{NAME_NOT_CERTIFIED} (it names no host)"),
                names => format!("{NAME_NOT_CERTIFIED} (it names {})", names.join(", ")),
            };
        }
        C::UnknownIssuer => "its issuer is not trusted (no chain to a trusted authority)".into(),
        C::BadSignature => "its signature does not verify".into(),
        C::Expired => "it has expired".into(),
        C::ExpiredContext { not_after, .. } => {
            format!("it expired on {}", crate::dsn::date(not_after.as_secs()))
        }
        C::NotValidYet => "it is not valid yet".into(),
        C::NotValidYetContext { not_before, .. } => {
            format!(
                "it is not valid before {}",
                crate::dsn::date(not_before.as_secs())
            )
        }
        C::Revoked => "it has been revoked".into(),
        C::BadEncoding => "it cannot be read".into(),
        C::UnhandledCriticalExtension => {
            "it has a critical extension that is not understood".into()
        }
        C::Other(other) => match other.to_string().as_str() {
            "CaUsedAsEndEntity" => "it is a CA certificate, not a server's".into(),
            "EndEntityUsedAsCa" => "a server's certificate signs another in its chain".into(),
            "PathLenConstraintViolated" => {
                "its chain is longer than an authority in it allows".into()
            }
            "NameConstraintViolation" => {
                "its names are outside what its authority may certify".into()
            }
            "UnsupportedCertVersion" => "it is not an X.509 v3 certificate".into(),
            "UnsupportedCriticalExtension" => {
                "it has a critical extension that is not understood".into()
            }
            "SignatureAlgorithmMismatch" => "its signature does not verify".into(),
            name => name.to_owned(),
        },
        // The others (a purpose, a revocation list, an algorithm) rustls says in words.
        _ => return io_text(e),
    };
    format!("invalid peer certificate: {plain}")
}

impl Outbound {
    /// Connects to `addr` (named `remote`), reads the greeting, says EHLO (HELO when refused)
    /// and, by policy, starts TLS. `tls` None means no TLS on this connection (policy none,
    /// or a retry in cleartext after a failed opportunistic handshake).
    pub async fn connect(
        addr: SocketAddr,
        remote: &str,
        helo: &str,
        tls: Option<&TlsSetup>,
        t: &Timeouts,
    ) -> Result<Outbound, ConnError> {
        let tcp = TcpStream::connect_timeout(addr, t.connect)
            .await
            .map_err(|e| {
                let e = std::io::Error::from(e);
                // (Not EADDRNOTAVAIL, which also says this machine's ports ran out.)
                let no_route = [Errno::ENETUNREACH, Errno::EAFNOSUPPORT].map(|n| n as i32);
                match e.raw_os_error() {
                    Some(n) if no_route.contains(&n) => ConnError::NoRoute(e.to_string()),
                    _ => ConnError::Io(e.to_string()),
                }
            })?;
        let _ = tcp.set_nodelay(true);
        let mut conn = Outbound {
            stream: Conn::Plain(tcp),
            session: ClientSession::new(helo),
            buf: vec![0; READ_BUFFER],
            start: 0,
            end: 0,
            out: Vec::new(),
            remote: remote.to_owned(),
            addr,
            transactions: 0,
            broke_counted: std::cell::Cell::new(false),
            answered_mark: std::cell::Cell::new(0),
            quit_owed: std::cell::Cell::new(false),
            write_failed: false,
            withdrawn: None,
            last_reply: Instant::now(),
            quiet_before_last: Duration::ZERO,
            replies_at_write: 0,
            pipelined_silence: false,
            envelope_wait: t.mail.max(t.rcpt).max(t.data_init),
        };
        match conn.open(remote, tls, t).await {
            // A reply after the EHLO reply, before any command of a transaction went out,
            // would answer the first command sent (and each reply the one after its own: a
            // refusal taken for a delivery). The connection is given up before it carries mail.
            Ok(()) if conn.unasked_after_reply() => {
                // QUIT all the same (RFC 5321 4.1.1.10); its reply could not be told apart.
                conn.quit_now().await;
                Err(ConnError::Lost(format!(
                    "{UNASKED_AFTER_EHLO}: {OUT_OF_STEP_AHEAD}"
                )))
            }
            Ok(()) => Ok(conn),
            // Reading or writing failed after the server had answered: it is the remote MTA
            // of the failure (RFC 3464 2.3.5), unlike an address where nobody answered.
            Err(ConnError::Io(e)) if conn.session.has_answered() => Err(ConnError::Lost(e)),
            Err(e) => Err(e),
        }
    }

    /// The greeting, EHLO and, by policy, STARTTLS, on a fresh connection.
    async fn open(
        &mut self,
        remote: &str,
        tls: Option<&TlsSetup>,
        t: &Timeouts,
    ) -> Result<(), ConnError> {
        self.expect_ready(t.greeting).await?;
        // A 421 read behind the EHLO reply: the next hop is closing (RFC 5321 3.8). Whatever
        // went out next (STARTTLS, MAIL) would take it for its answer: the session ends
        // here, as at a 421 greeting (a host refusing the session).
        if let Some(reply) = self.closing_behind() {
            return Err(ConnError::Smtp(ClientError::Closing(reply)));
        }
        let Some(tls) = tls else {
            return Ok(());
        };
        if tls.policy == TlsPolicy::None {
            return Ok(());
        }
        if !self.session.capabilities().starttls {
            if tls.policy == TlsPolicy::Required {
                // The session is still usable in cleartext: end it properly (RFC 5321
                // 4.1.1.10), without sending anything else.
                self.end_session().await;
                return Err(ConnError::TlsRequired);
            }
            return Ok(());
        }
        // The name the handshake is made for, found before STARTTLS: a name that TLS cannot
        // carry (a label ending in '-', a last label all digits) is said before the next hop
        // switches to TLS. Opportunistic TLS checks no name: the address stands in for it
        // (and no SNI is sent).
        let name = match ServerName::try_from(remote.to_owned()) {
            Ok(name) => name,
            Err(_) if tls.policy == TlsPolicy::Opportunistic => {
                ServerName::IpAddress(self.addr.ip().into())
            }
            Err(_) => {
                self.end_session().await;
                return Err(ConnError::Tls(format!("'{remote}' {NOT_A_SERVER_NAME}")));
            }
        };
        // A reply read before STARTTLS is written cannot be its answer (RFC 3207 4), and
        // taken for it, the handshake would meet the real one and fail, as if TLS did not
        // work there. STARTTLS is not sent: `Outbound::connect` finds the reply unasked and
        // gives the connection up, out of step, as before a transaction.
        if self.unasked_after_reply() {
            return Ok(());
        }
        self.session.start_tls().map_err(ConnError::Smtp)?;
        match self.next_event(t.greeting).await? {
            ClientEvent::StartTls => {}
            ClientEvent::StartTlsRefused(reply) if tls.policy == TlsPolicy::Opportunistic => {
                // Opportunistic TLS: a refusal leaves the session as it was, in cleartext
                // (RFC 3207 4 leaves the choice to the client).
                tracing::info!(remote, %reply, "STARTTLS refused; going on in cleartext");
                return Ok(());
            }
            ClientEvent::StartTlsRefused(reply) => {
                self.end_session().await;
                return Err(ConnError::Smtp(ClientError::StartTls(reply)));
            }
            ClientEvent::Failed(e) => return Err(ConnError::Smtp(e)),
            other => {
                return Err(ConnError::Io(format!(
                    "unexpected {other:?} after STARTTLS"
                )))
            }
        }
        // Bytes after the 220 would be an injection attempt (RFC 3207 5): drop them.
        self.start = self.end;
        let Conn::Plain(tcp) = std::mem::replace(&mut self.stream, Conn::Gone) else {
            return Err(ConnError::Tls("connection already in TLS".into()));
        };
        let connector = futures_rustls::TlsConnector::from(tls.config.clone());
        let handshake = async {
            (connector.connect(name, tcp).await)
                .map_err(|e| io::Error::new(e.kind(), handshake_failure(&e)))
        };
        let stream = timed(t.greeting, handshake).await.map_err(|e| match e {
            ConnError::Io(s) => ConnError::Tls(s),
            other => other,
        });
        tls.handshake.set(Some(stream.is_ok()));
        let stream = stream?;
        self.stream = Conn::Tls(Box::new(futures_rustls::TlsStream::Client(stream)));
        self.session.tls_established();
        self.expect_ready(t.greeting).await
    }

    /// Whether the session runs inside TLS.
    pub fn is_tls(&self) -> bool {
        self.session.is_tls()
    }

    /// What the server offered.
    pub fn capabilities(&self) -> &postern_proto::client::Capabilities {
        self.session.capabilities()
    }

    async fn expect_ready(&mut self, limit: Duration) -> Result<(), ConnError> {
        match self.next_event(limit).await? {
            ClientEvent::Ready => Ok(()),
            ClientEvent::Failed(e) => Err(ConnError::Smtp(e)),
            other => Err(ConnError::Io(format!(
                "unexpected {other:?} while greeting"
            ))),
        }
    }

    /// Writes what the session has queued; `true` when there was something.
    async fn flush(&mut self, limit: Duration) -> Result<bool, ConnError> {
        if self.session.output().is_empty() {
            return Ok(false);
        }
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        out.extend_from_slice(self.session.output());
        self.session.clear_output();
        self.replies_at_write = self.session.replies_read();
        let stream = &mut self.stream;
        let result = timed(limit, async {
            stream.write_all(&out).await?;
            stream.flush().await
        })
        .await;
        self.out = out;
        if result.is_err() {
            self.write_failed = true;
        }
        result.map(|()| true)
    }

    /// How long the wait for the next reply may take, `limit` being the caller's: no longer
    /// than the envelope's timeouts allow while the reply awaited answers a command of an
    /// envelope. With PIPELINING and BDAT the commands go out with the body and every reply
    /// is awaited after it, for the end of the data's timeout (10 min) otherwise: a next hop
    /// that dropped the pipelined commands would hold each try that long, and close first
    /// where its own timeout is shorter.
    fn reply_wait(&self, limit: Duration) -> Duration {
        if self.session.awaiting_envelope_reply() {
            limit.min(self.envelope_wait)
        } else {
            limit
        }
    }

    /// Writes pending commands and reads until the session has an event other than
    /// `NeedInput`.
    async fn next_event(&mut self, limit: Duration) -> Result<ClientEvent, ConnError> {
        self.read_until(limit, false).await
    }

    /// Like `next_event`, but with `until_idle` also returns `NeedInput` once no reply is
    /// awaited any more (after a RSET without PIPELINING).
    async fn read_until(
        &mut self,
        limit: Duration,
        until_idle: bool,
    ) -> Result<ClientEvent, ConnError> {
        // The limit is for the whole wait for one reply (RFC 5321 4.5.3.2), not for each
        // read: a server that sends its reply a byte at a time does not get past it. The
        // wait starts again when a command goes out and when a whole reply is in (pipelined
        // commands each get their own wait, as they would one after another).
        let mut deadline = Instant::now() + self.reply_wait(limit);
        let left = |deadline: Instant| deadline.saturating_duration_since(Instant::now());
        loop {
            if self.flush(limit).await? {
                deadline = Instant::now() + self.reply_wait(limit);
            }
            let replies = self.session.replies_read();
            let (n, event) = self.session.handle(&self.buf[self.start..self.end]);
            self.start += n;
            if self.session.replies_read() != replies {
                let now = Instant::now();
                deadline = now + self.reply_wait(limit);
                self.quiet_before_last = now.saturating_duration_since(self.last_reply);
                self.last_reply = now;
            }
            if matches!(event, ClientEvent::Failed(_))
                && !self.session.output().is_empty()
                && !self.write_failed
            {
                // A parting QUIT (after a refused greeting), best effort; never behind a
                // write that broke off (it would land inside a chunk left unfinished).
                let _ = self.flush(PARTING_WRITE).await;
            }
            if event != ClientEvent::NeedInput || (until_idle && self.session.is_idle()) {
                return Ok(event);
            }
            // Handling the replies may have queued commands (EHLO after the greeting, held
            // commands without PIPELINING): they go out before waiting.
            if self.flush(limit).await? {
                deadline = Instant::now() + self.reply_wait(limit);
            }
            if self.start == self.end {
                (self.start, self.end) = (0, 0);
            } else if self.end == self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                (self.start, self.end) = (0, self.end - self.start);
            }
            if self.end == self.buf.len() {
                return Err(ConnError::Io(REPLY_TOO_LONG.into()));
            }
            // A next hop that keeps the socket full (a reply of endless continuation lines)
            // makes reads ready one after another: once the core's time slice is up, its
            // other tasks run before the next one.
            glommio::yield_if_needed().await;
            let (stream, room) = (&mut self.stream, &mut self.buf[self.end..]);
            let read = timed(left(deadline), stream.read(room)).await;
            // Silence, or a close, where the next hop owes the reply to a command of an
            // envelope it wrote with others it answered.
            let partway = || {
                self.session.capabilities().pipelining
                    && self.session.awaiting_envelope_reply()
                    && self.session.replies_read() > self.replies_at_write
            };
            let n = match read {
                Ok(n) => n,
                Err(e) => {
                    if matches!(&e, ConnError::Io(t) if t == TIMED_OUT) && partway() {
                        self.pipelined_silence = true;
                    }
                    return Err(e);
                }
            };
            if n == 0 {
                // A next hop whose own timeout is the shorter ends the wait so.
                if partway() {
                    self.pipelined_silence = true;
                }
                return Err(ConnError::Io("connection closed by the server".into()));
            }
            self.end += n;
        }
    }

    /// Runs one transaction. `Ok` carries every reply (a refused MAIL or RCPT is an answer,
    /// not an error); `Err(Ok(reply))` is a refusal made locally before anything was sent
    /// (SIZE); `Err(Err(_))` means the connection is unusable and the outcome unknown.
    pub async fn deliver(
        &mut self,
        tx: &Transaction,
        body: &MessageRef,
        t: &Timeouts,
    ) -> Result<TransactionResult, Result<Reply, ConnError>> {
        if self.transactions > 0 {
            self.session.rset();
            if !self.session.capabilities().pipelining {
                match self.read_until(t.mail, true).await {
                    // A reply after RSET's would answer the MAIL sent next: nothing of this
                    // transaction went out, so it goes on a new connection.
                    Ok(ClientEvent::NeedInput) if self.unasked_after_reply() => {
                        self.quit_owed.set(true);
                        return Err(Err(ConnError::Stale(format!(
                            "{UNASKED_AFTER_RSET}: {OUT_OF_STEP_AHEAD}"
                        ))));
                    }
                    Ok(ClientEvent::NeedInput) => {}
                    // A RSET refused (a next hop that takes none after a refusal): nothing of
                    // this transaction went out, so it goes on a new connection, no failed
                    // attempt counted.
                    Ok(ClientEvent::Failed(ClientError::Unexpected("RSET", r))) => {
                        return Err(Err(ConnError::Stale(format!("RSET answered {r}"))));
                    }
                    Ok(ClientEvent::Failed(e)) => {
                        return Err(Err(self.at_rset(ConnError::Smtp(e))))
                    }
                    Err(e) => return Err(Err(self.at_rset(e))),
                    Ok(other) => {
                        return Err(Err(ConnError::Io(format!(
                            "unexpected {other:?} after RSET"
                        ))))
                    }
                }
            }
        }
        self.transactions += 1;
        self.session.send(tx).map_err(Ok)?;
        self.run_transaction(tx, body, t)
            .await
            .map_err(|e| e.map_err(|e| self.at_rset(e)))
    }

    /// A failure at the RSET that opens a transaction on a kept connection becomes
    /// [`ConnError::Stale`]: a 421 in answer to it, or the connection ending before its reply
    /// came. With PIPELINING the transaction went out behind the RSET; a server that closes
    /// there takes none of it.
    pub fn at_rset(&self, e: ConnError) -> ConnError {
        match e {
            ConnError::Smtp(ClientError::Closing(r)) if self.session.closed_at_rset() => {
                ConnError::Stale(format!("RSET answered {r}"))
            }
            // Not a timeout: a server that holds its replies until it has taken the
            // message (RFC 2920 allows it) may have taken the one behind the RSET.
            ConnError::Io(e) if self.session.awaiting_rset() && e != TIMED_OUT => {
                ConnError::Stale(format!("at RSET: {e}"))
            }
            e => e,
        }
    }

    /// The rest of [`Outbound::deliver`], once the transaction's commands are queued.
    async fn run_transaction(
        &mut self,
        tx: &Transaction,
        body: &MessageRef,
        t: &Timeouts,
    ) -> Result<TransactionResult, Result<Reply, ConnError>> {
        let envelope_limit = t.mail.max(t.rcpt);
        let limit = match tx.mode {
            BodyMode::Data => envelope_limit.max(t.data_init),
            BodyMode::Bdat => envelope_limit,
        };
        // With PIPELINING and BDAT the session asks for the body before any reply when the
        // commands fit one group (a transaction for more recipients asks once its last group
        // goes out); the commands then go out in the same write as a small body, not in one
        // of their own.
        let ready = if tx.mode == BodyMode::Bdat && self.session.capabilities().pipelining {
            match self.session.handle(&[]) {
                (_, ClientEvent::NeedInput) => None,
                (_, event) => Some(event),
            }
        } else {
            None
        };
        let event = match ready {
            Some(event) => event,
            None => match self.next_event(limit).await {
                Ok(event) => event,
                // Closed, or silent, after refusing DATA: the refusal settles it.
                Err(e) => return self.session.settle_unanswered().ok_or(Err(e)),
            },
        };
        match event {
            // Bytes behind the 354 answer nothing yet (its body is not even sent): read after
            // the body, a `250` among them would be taken for the message's answer, and a
            // refusal that came after the dot left unread. The body is not sent, the
            // connection is given up (the next hop drops a message whose dot never comes),
            // and the message is tried again.
            // The same for BDAT: the session asks for the body as soon as the reply that
            // releases it is read (or before any, pipelined), so bytes behind it came before
            // BDAT was written.
            // A 421 there is the next hop closing (RFC 5321 3.8), which it may say at any
            // time: the body is not sent either, but the replies read before it stand.
            ClientEvent::SendBody if self.unread_past_blanks() => {
                let unread = &self.buf[self.start..self.end];
                if unread.starts_with(b"421") {
                    if let postern_proto::reply::ParsedReply::Complete { reply, .. } =
                        postern_proto::reply::ReplyParser::new().parse(unread)
                    {
                        return Err(Err(ConnError::Smtp(ClientError::Closing(reply))));
                    }
                }
                let why = match tx.mode {
                    BodyMode::Data => UNASKED_AFTER_354,
                    BodyMode::Bdat => UNASKED_BEFORE_BDAT,
                };
                Err(Err(ConnError::Io(why.into())))
            }
            ClientEvent::SendBody if self.withdrawn.as_ref().is_some_and(|w| w()) => {
                // Withdrawn while its envelope was answered (a next hop slow to say 354):
                // the body is not sent. Past a 354 or a BDAT line only the connection's end
                // takes the transaction back; nothing more is written (a QUIT would be read
                // as body), as after a write that broke off.
                self.write_failed = true;
                Err(Err(ConnError::Io(WITHDRAWN.into())))
            }
            ClientEvent::SendBody => {
                if let Err(broke) = self.send_body(tx.mode, body, t.data_block).await {
                    return self.after_broken_body(broke).await;
                }
                self.session.body_sent();
                // A slow write is no silence of the next hop's.
                self.quiet_from_now();
                match self.next_event(t.data_done).await.map_err(Err)? {
                    ClientEvent::Done(_) if self.unasked_after_last_reply() => {
                        Err(Err(ConnError::Io(OUT_OF_STEP.into())))
                    }
                    ClientEvent::Done(result) if unsure_of(std::iter::once(&result)) => {
                        let strict = taken_with_an_addressing_status(std::iter::once(&result));
                        self.in_step(t.mail, strict).await.map_err(Err)?;
                        Ok(result)
                    }
                    ClientEvent::Done(result) => Ok(result),
                    ClientEvent::Failed(e) => Err(Err(ConnError::Smtp(e))),
                    other => Err(Err(ConnError::Io(format!(
                        "unexpected {other:?} after the body"
                    )))),
                }
            }
            ClientEvent::Done(_) if self.unasked_after_last_reply() => {
                Err(Err(ConnError::Io(OUT_OF_STEP.into())))
            }
            ClientEvent::Done(result) => Ok(result),
            ClientEvent::Failed(e) => Err(Err(ConnError::Smtp(e))),
            other => Err(Err(ConnError::Io(format!(
                "unexpected {other:?} in a transaction"
            )))),
        }
    }

    /// Whether the replies are still in step after a transaction, asked with a NOOP: a reply
    /// left over (the real answer to the data, when a reply no command asked for pushed the
    /// others along) takes the place of its 250. A 421 there is the next hop closing, after
    /// replies in step, and so is a 221 (said as it closed after its last reply). `strict` (a message taken with an addressing status, which is itself
    /// what a reply pushed along looks like) takes only a 250 for in step, or a refusal of
    /// NOOP as not known (500, 502, X.5.X) followed by silence: a 421 or the connection's end
    /// there may be the real answer to the data, which a delivery must not be taken over.
    pub async fn in_step(&mut self, limit: Duration, strict: bool) -> Result<(), ConnError> {
        let out_of_step = || ConnError::Io(OUT_OF_STEP.into());
        self.session.noop();
        match self.read_until(limit, true).await {
            Ok(ClientEvent::NeedInput) if self.unasked_after_last_reply() => Err(out_of_step()),
            Ok(ClientEvent::NeedInput) => match self.session.take_noop_refusal() {
                None => Ok(()),
                // A 221 the next hop wrote as it closed after its last reply, read in the
                // NOOP's place: nothing was left over before it. Taken as a 421 there is.
                Some(r) if r.code == 221 && strict => Err(out_of_step()),
                Some(r) if r.code == 221 => Ok(()),
                Some(r) if strict && !not_known(&r) => Err(out_of_step()),
                // Replies pushed along put a reply left over in the NOOP's place, and its own
                // 250 comes next; a server that does not take NOOP says nothing more (and
                // keeps the connection: one that ends it there may have been out of step).
                Some(_) if self.quiet_for_a_while(NOOP_ECHO_WAIT).await => Ok(()),
                Some(_) => Err(out_of_step()),
            },
            Ok(ClientEvent::Failed(ClientError::Closing(_))) if strict => Err(out_of_step()),
            Ok(ClientEvent::Failed(ClientError::Closing(_))) => Ok(()),
            Ok(ClientEvent::Failed(e)) => Err(ConnError::Smtp(e)),
            Ok(other) => Err(ConnError::Io(format!("unexpected {other:?} after NOOP"))),
            // No answer to a NOOP in all that time, or more than a reply: what the last
            // reply answered is not known either.
            Err(ConnError::Io(e)) if e == TIMED_OUT || e == REPLY_TOO_LONG => Err(out_of_step()),
            // The connection ended with nothing more read: no reply was left over (unless
            // strict: a next hop may close right after refusing the data, and the refusal
            // be lost to the reset our NOOP causes).
            Err(_) if strict => Err(out_of_step()),
            Err(_) => Ok(()),
        }
    }

    /// Whether the next hop stays quiet, the connection open, for `wait` (what is already
    /// read counts as speaking).
    async fn quiet_for_a_while(&mut self, wait: Duration) -> bool {
        if self.start < self.end {
            return false;
        }
        if self.end == self.buf.len() {
            (self.start, self.end) = (0, 0);
        }
        let (stream, room) = (&mut self.stream, &mut self.buf[self.end..]);
        match timed(wait, stream.read(room)).await {
            Ok(n) => {
                self.end += n;
                false
            }
            Err(ConnError::Io(e)) => e == TIMED_OUT,
            Err(_) => false,
        }
    }

    /// Whether the connection may take another transaction: not when a refusal of DATA was
    /// settled by the connection ending there (see `ClientSession::is_closing`).
    pub fn is_closing(&self) -> bool {
        self.session.is_closing()
    }

    /// Whether a connection given up is still owed a QUIT (RFC 5321 4.1.1.10): not when the
    /// next hop said 421 (it is closing) or the session ended itself.
    pub fn owes_quit(&self) -> bool {
        !self.session.is_closing() && !self.session.said_closing()
    }

    /// Marks a connection given up because its replies are out of step (every command's
    /// bytes written, no QUIT written by the session): it gets its QUIT before the close.
    pub fn out_of_step_given_up(&self) {
        self.quit_owed.set(true);
    }

    /// Whether the next hop answered some of the commands written together and then fell
    /// silent until the wait for the reply to a later command of an envelope (`MAIL`,
    /// `RCPT`, `DATA`, a pipelined `RSET`) ran out, or closed the connection (its own
    /// timeout the shorter): the sign of a server (or a filter in
    /// front of it) that reads one command and drops what was pipelined behind it, which
    /// would time out on every try. Its next hop is then sent one command at a time for a
    /// while. A next hop silent from the first reply on does not count (it may be down), nor
    /// one slow to answer a body (its reply is awaited the same way one command at a time).
    pub fn lost_pipelined_replies(&self) -> bool {
        self.pipelined_silence
    }

    /// Whether a write to the next hop failed: the connection cannot carry another
    /// transaction.
    pub fn write_broke(&self) -> bool {
        self.write_failed
    }

    /// Sets what is asked when a transaction's body is due (see [`WITHDRAWN`]); None asks
    /// nothing.
    pub fn withdraw_if(&mut self, withdrawn: Option<Box<dyn Fn() -> bool>>) {
        self.withdrawn = withdrawn;
    }

    /// Whether [`Outbound::out_of_step_given_up`] marked it, and it is still owed a QUIT.
    /// Never for a connection that broke in the middle of a body (a QUIT written there would
    /// be taken as body bytes), nor for one whose session wrote QUIT itself.
    pub fn quit_owed(&self) -> bool {
        self.quit_owed.get() && !self.write_failed && self.owes_quit()
    }

    /// Starts counting the next hop's silence now (once commands are written: the time
    /// their writing took is not the next hop's).
    pub fn quiet_from_now(&mut self) {
        self.last_reply = Instant::now();
        self.quiet_before_last = Duration::ZERO;
    }

    /// The longest the next hop has been quiet lately: since its last reply, or before it (a
    /// 421 that ends a silence).
    pub fn quiet_for(&self) -> Duration {
        self.last_reply.elapsed().max(self.quiet_before_last)
    }

    /// Whether transactions can be pipelined into each other on this connection: the next hop
    /// offers PIPELINING and CHUNKING, so each body follows its `BDAT n LAST` at once and no
    /// reply has to be read before the next transaction starts (RFC 2920 3.1, RFC 3030).
    pub fn can_pipeline(&self) -> bool {
        let caps = self.session.capabilities();
        caps.pipelining && caps.chunking
    }

    /// Sends a transaction with BDAT, body included, without reading any reply; only where
    /// [`Outbound::can_pipeline`]. Its replies come from [`Outbound::finish`], one call per
    /// transaction started, in order. Like `deliver`, a reused connection is reset first, in
    /// the same flight. `Err(Ok(reply))` is a refusal made before anything was sent (SIZE).
    pub async fn start(
        &mut self,
        tx: &Transaction,
        body: &MessageRef,
        t: &Timeouts,
    ) -> Result<(), Result<Reply, ConnError>> {
        if !self.can_pipeline() || tx.mode != BodyMode::Bdat {
            return Err(Err(ConnError::Io(
                "pipelined transactions need PIPELINING and BDAT".into(),
            )));
        }
        // Refused here before its RSET is written: an RSET for nothing would leave its reply
        // unread once the batch's last transaction is answered, and the idle connection
        // would look out of step.
        if let Some(refusal) = self.session.refusal(tx) {
            return Err(Ok(refusal));
        }
        if self.transactions > 0 {
            self.session.rset();
        }
        self.transactions += 1;
        self.session.send(tx).map_err(Ok)?;
        // With BDAT the session asks for the body at once, before any reply.
        match self.session.handle(&[]) {
            (0, ClientEvent::SendBody) => {}
            (_, other) => {
                return Err(Err(ConnError::Io(format!(
                    "unexpected {other:?} starting a transaction"
                ))))
            }
        }
        let sent = self.send_body(BodyMode::Bdat, body, t.data_block).await;
        // Broken off or not, no more of the body goes: the session is idle again once its
        // replies are in, so that one too many behind them can still be seen.
        self.session.body_sent();
        sent.map_err(Err)
    }

    /// The replies the oldest transaction without an outcome got before the connection failed
    /// ([`ClientSession::take_unfinished`]).
    pub fn take_unfinished(&mut self) -> Option<TransactionResult> {
        self.session.take_unfinished()
    }

    /// The replies to the oldest transaction sent with [`Outbound::start`] and not yet
    /// finished, waiting at most `limit`. An error leaves the outcome of it and of every later
    /// one unknown, except a 421 (`ClientError::Closing`): the server took none of the later
    /// ones.
    pub async fn finish(&mut self, limit: Duration) -> Result<TransactionResult, ConnError> {
        match self.next_event(limit).await? {
            ClientEvent::Done(result) => Ok(result),
            ClientEvent::Failed(e) => Err(ConnError::Smtp(e)),
            other => Err(ConnError::Io(format!(
                "unexpected {other:?} after the body"
            ))),
        }
    }

    /// Writes the pending commands and the body. A body up to `COALESCE` octets goes out in
    /// the same write as the commands before it (one send for BDAT's command and data);
    /// larger ones are written chunk by chunk straight from the spool's mappings.
    async fn send_body(
        &mut self,
        mode: BodyMode,
        body: &MessageRef,
        limit: Duration,
    ) -> Result<(), ConnError> {
        const COALESCE: u64 = BODY_BLOCK as u64;
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        out.extend_from_slice(self.session.output());
        self.session.clear_output();
        self.replies_at_write = self.session.replies_read();
        let small = body.len() <= COALESCE;
        let stream = &mut self.stream;
        let result = async {
            match mode {
                BodyMode::Bdat if small => body.chunks().for_each(|c| out.extend_from_slice(c)),
                BodyMode::Bdat => {
                    timed(limit, stream.write_all(&out)).await?;
                    out.clear();
                    for chunk in body.chunks() {
                        write_in_blocks(stream, chunk, limit).await?;
                    }
                }
                BodyMode::Data => {
                    // Dot-stuffing cuts the body at each line that starts with a dot: pieces
                    // are gathered up to 64 KiB a write (a body of "." lines would otherwise
                    // cost a write every three octets), and only a large one goes alone.
                    let mut stuffer = DotStuffer::new();
                    for chunk in body.chunks() {
                        for piece in stuffer.stuff(chunk) {
                            if small || out.len() + piece.len() <= COALESCE as usize {
                                out.extend_from_slice(piece);
                                continue;
                            }
                            if !out.is_empty() {
                                timed(limit, stream.write_all(&out)).await?;
                                out.clear();
                            }
                            if piece.len() < COALESCE as usize {
                                out.extend_from_slice(piece);
                            } else {
                                write_in_blocks(stream, piece, limit).await?;
                            }
                        }
                    }
                    out.extend_from_slice(stuffer.finish());
                }
            }
            if !out.is_empty() {
                timed(limit, stream.write_all(&out)).await?;
            }
            timed(limit, stream.flush()).await
        }
        .await;
        self.out = out;
        if result.is_err() {
            self.write_failed = true;
        }
        result
    }

    /// A body whose write broke off: the next hop may have answered before it closed (a `552`
    /// to a body over a limit it did not advertise with SIZE, a `421`; with PIPELINING, the
    /// replies to MAIL and RCPT that were not read yet). Those are read for a moment: a
    /// refusal of the message is its outcome, like any other, and the refusals of recipients
    /// stand (RFC 5321 4.2.1). A reply that would take the message cannot be (it did not all
    /// go out): then, as with no reply, the outcome is the broken write's.
    async fn after_broken_body(
        &mut self,
        broke: ConnError,
    ) -> Result<TransactionResult, Result<Reply, ConnError>> {
        self.session.body_sent();
        // The write's time is no silence of the next hop's.
        self.quiet_from_now();
        match self.next_event(AFTER_WRITE_FAILURE).await {
            Ok(ClientEvent::Done(_)) if self.unasked_after_last_reply() => {
                Err(Err(ConnError::Io(OUT_OF_STEP.into())))
            }
            Ok(ClientEvent::Done(result))
                if result.data.as_ref().is_some_and(|d| !d.is_positive()) =>
            {
                Ok(result)
            }
            // Taking a body that did not all go out: no reply to it can be in step.
            Ok(ClientEvent::Done(result)) if result.data.is_some() => {
                Err(Err(ConnError::Io(OUT_OF_STEP.into())))
            }
            // The session's own failure (a 421, at the RSET of a kept connection too, where
            // it means the next hop took nothing of this transaction; replies out of step).
            Ok(ClientEvent::Failed(e)) => Err(Err(ConnError::Smtp(e))),
            _ => Err(Err(broke)),
        }
    }

    /// Whether something came after the reply just read, with no command outstanding: the
    /// next hop sent a reply too many earlier, so the replies taken were each the answer to
    /// the command before, and the real last one is what follows. The outcome of what they
    /// answered is then not known. A `421` is not counted: next hops say it right after a
    /// last 250 as they close, and counting it would send such a next hop every message again
    /// and again (after a shifted reply it is the real answer to the last command, which
    /// this cannot tell). Nor is the end of the connection, nor blank lines, which are no
    /// reply (some next hops write a line end too many after a reply): those are read and
    /// dropped. Inside TLS only what has already been read and decrypted can be looked at.
    pub fn unasked_after_reply(&mut self) -> bool {
        self.unasked_behind(false)
    }

    /// [`Conn::unasked_after_reply`] after the last reply of a transaction (to its body, or
    /// the NOOP asked after it): there a `221` is not counted either. Some next hops say it
    /// right after their last 250 as they close (a limit of messages per connection), often
    /// in the same write; it answers only a QUIT, which was not sent, so it shifts nothing,
    /// and the connection is not used again (see [`Conn::went_away_while_idle`]). Counted,
    /// it had every message to such a next hop sent again at each retry. Before a
    /// transaction (after EHLO, after RSET) it still counts: the connection then carries
    /// nothing, and the job goes on a new one.
    pub fn unasked_after_last_reply(&mut self) -> bool {
        self.unasked_behind(true)
    }

    fn unasked_behind(&mut self, goodbye_ends: bool) -> bool {
        use std::os::fd::AsRawFd;
        // A reply still awaited (a RSET queued after a refusal, or before a transaction that
        // was then refused here for its size) may be what follows: nothing to tell.
        if !self.session.is_idle() {
            return false;
        }
        let unasked = |head: &[u8]| {
            let code = &head[..head.len().min(3)];
            let closing = b"421".starts_with(code) || (goodbye_ends && code == b"221");
            !head.is_empty() && !closing
        };
        if self.unread_past_blanks() {
            let n = (self.end - self.start).min(3);
            return unasked(&self.buf[self.start..self.start + n]);
        }
        if self.is_tls() {
            return false;
        }
        let Some(tcp) = self.stream.tcp() else {
            return false;
        };
        // Past a few peeks of blanks, what follows is left to the next read (the reply
        // parser's own cap ends blank lines without end).
        match behind_blanks(tcp.as_raw_fd()) {
            Behind::Said(head, said) => unasked(&head[said]),
            Behind::Nothing | Behind::Closed | Behind::Blanks => false,
        }
    }

    /// Whether bytes other than blanks are read and not yet parsed; the blanks before them are
    /// dropped (blank lines are no reply: some next hops write a line end too many).
    fn unread_past_blanks(&mut self) -> bool {
        while self.start < self.end && is_blank(&self.buf[self.start]) {
            self.start += 1;
        }
        self.start < self.end
    }

    /// A whole `421` reply read and not yet parsed, with no command outstanding: the next
    /// hop closing unasked.
    fn closing_behind(&mut self) -> Option<postern_proto::reply::Reply> {
        if !self.session.is_idle() || !self.unread_past_blanks() {
            return None;
        }
        let unread = &self.buf[self.start..self.end];
        if !unread.starts_with(b"421") {
            return None;
        }
        match postern_proto::reply::ReplyParser::new().parse(unread) {
            postern_proto::reply::ParsedReply::Complete { reply, .. } => Some(reply),
            _ => None,
        }
    }

    /// Whether the server ended the connection, or said something unasked (a 421 before
    /// closing an idle connection), while it sat idle between transactions. Looked at without
    /// waiting; blank lines are no reply (some next hops write a line end too many, a moment
    /// after their reply) and are taken off and dropped, anything else is left. Such a
    /// connection is not used again. Inside TLS, any byte counts (what the socket holds is
    /// not yet decrypted).
    pub fn went_away_while_idle(&mut self) -> bool {
        use nix::sys::socket::{recv, MsgFlags};
        use std::os::fd::AsRawFd;
        if self.unread_past_blanks() {
            return true;
        }
        let Some(tcp) = self.stream.tcp() else {
            return true;
        };
        if self.is_tls() {
            // What the socket holds is not decrypted yet: any byte counts.
            let mut byte = [0u8; 1];
            let peek = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
            return !matches!(recv(tcp.as_raw_fd(), &mut byte, peek), Err(Errno::EAGAIN));
        }
        // Past a few peeks of blanks, the connection is given up.
        !matches!(behind_blanks(tcp.as_raw_fd()), Behind::Nothing)
    }

    /// Each command waits for the reply before it from now on
    /// ([`ClientSession::forgo_pipelining`]).
    pub fn forgo_pipelining(&mut self) {
        self.session.forgo_pipelining();
    }

    /// Whether the server named itself `name` in its greeting or EHLO reply
    /// ([`ClientSession::names_itself`]).
    pub fn names_itself(&self, name: &str) -> bool {
        self.session.names_itself(name)
    }

    /// Says QUIT and closes, without waiting long for the reply.
    pub async fn quit(mut self) {
        self.end_session().await;
    }

    /// Says QUIT and closes without waiting for the reply (RFC 5321 4.1.1.10 has the client
    /// wait only as a SHOULD): for a connection whose place has gone to another while too
    /// many others are still waiting for their QUIT's reply.
    pub async fn quit_now(mut self) {
        // Written whatever the session still awaits (it would hold QUIT back behind a reply
        // without PIPELINING): nothing more is read on this connection.
        let stream = &mut self.stream;
        let _ = timed(PARTING_WRITE, async {
            stream.write_all(b"QUIT\r\n").await?;
            stream.flush().await?;
            stream.close().await
        })
        .await;
    }

    async fn end_session(&mut self) {
        // Not to a next hop that said it is closing (a 421 to a NOOP left the session usable
        // for nothing more): only the close.
        if self.owes_quit() {
            self.session.quit();
            let limit = Duration::from_secs(5);
            let _ = self.next_event(limit).await;
        }
        // Bounded: closing TLS writes its close_notify, which a next hop that stopped reading
        // would hold for ever.
        let stream = &mut self.stream;
        let _ = timed(PARTING_WRITE, stream.close()).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tls_failures_are_said_without_rustls_type_texts_or_links() {
        use super::{handshake_failure, io_text};
        use std::io::{Error, ErrorKind};
        let tls = |e: rustls::Error| handshake_failure(&Error::new(ErrorKind::InvalidData, e));
        let garbage = tls(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType,
        ));
        assert_eq!(garbage, "the next hop's answer is not TLS, or is damaged");
        // Certificates: in words, without rustls's type names.
        let cert = |c: rustls::CertificateError| tls(rustls::Error::InvalidCertificate(c));
        let name = cert(rustls::CertificateError::NotValidForNameContext {
            expected: rustls::pki_types::ServerName::try_from("mx.example.net").unwrap(),
            presented: vec![
                "DnsName(\"other.example\")".into(),
                "IpAddress(127.0.0.9)".into(),
            ],
        });
        assert_eq!(
            name,
            "the certificate does not name this host (it names other.example, 127.0.0.9)"
        );
        assert_eq!(
            cert(rustls::CertificateError::UnknownIssuer),
            "invalid peer certificate: its issuer is not trusted (no chain to a trusted authority)"
        );
        let expired = cert(rustls::CertificateError::ExpiredContext {
            time: rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                1_800_000_000,
            )),
            not_after: rustls::pki_types::UnixTime::since_unix_epoch(
                std::time::Duration::from_secs(1_700_000_000),
            ),
        });
        assert!(
            expired.starts_with("invalid peer certificate: it expired on "),
            "{expired}"
        );
        assert!(!expired.contains("UNIX"), "{expired}");
        let alert = tls(rustls::Error::AlertReceived(
            rustls::AlertDescription::HandshakeFailure,
        ));
        assert_eq!(
            alert,
            "the next hop ended the handshake with the alert HandshakeFailure"
        );
        let eof = Error::new(ErrorKind::UnexpectedEof, "tls handshake eof");
        assert_eq!(
            handshake_failure(&eof),
            "connection closed by the server during the TLS handshake"
        );
        let cut = Error::new(
            ErrorKind::UnexpectedEof,
            "peer closed connection without sending TLS close_notify: https://docs.rs/rustls/",
        );
        let said = io_text(&cut);
        assert!(!said.contains("https://"), "{said}");
        assert!(said.contains("without ending TLS"), "{said}");
        // Other errors as the system says them.
        let reset = Error::from_raw_os_error(104);
        assert_eq!(io_text(&reset), reset.to_string());
    }

    use std::io;

    #[test]
    fn certificate_faults_named_by_the_verifier_are_said_plainly() {
        #[derive(Debug)]
        struct Named(&'static str);
        impl std::fmt::Display for Named {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for Named {}
        let failed = |name: &'static str| {
            let other = rustls::OtherError(std::sync::Arc::new(Named(name)));
            let e = rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other));
            super::handshake_failure(&io::Error::new(io::ErrorKind::InvalidData, e))
        };
        assert_eq!(
            failed("CaUsedAsEndEntity"),
            "invalid peer certificate: it is a CA certificate, not a server's"
        );
        assert_eq!(
            failed("SomethingNew"),
            "invalid peer certificate: SomethingNew"
        );
        // What rustls says well itself is left as it is.
        let e = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let said = super::handshake_failure(&io::Error::new(io::ErrorKind::InvalidData, e));
        assert!(said.starts_with("invalid peer certificate: "), "{said}");
        assert!(!said.contains("Other("), "{said}");
    }
}
