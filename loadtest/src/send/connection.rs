//! One connection of the sender, from connect to QUIT: postern-proto's client session decides
//! every command; this module moves its bytes, times each step and counts each outcome.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::net::TcpStream;
use postern_proto::client::{
    BodyMode, ClientError, ClientEvent, ClientSession, OutRecipient, Transaction, TransactionResult,
};
use postern_proto::stuff::DotStuffer;
use rustls::pki_types::ServerName;

use crate::conn::Conn;
use crate::send::core::{Core, Run, NO_SERVER_WAIT};
use crate::send::filter::NoPipelining;
use crate::send::message::{address, with_date, Message};
use crate::send::outbox::Outbox;
use crate::send::plan::Ticket;
use crate::send::stats::Lat;

/// Why a connection ended early; the name is what the report counts.
#[derive(Debug)]
pub struct Failure(pub &'static str);

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure(match e.kind() {
            io::ErrorKind::TimedOut => "timeout",
            io::ErrorKind::ConnectionRefused => "connection_refused",
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => "connection_reset",
            io::ErrorKind::UnexpectedEof => "connection_closed",
            _ => "io_error",
        })
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure(match e {
            ClientError::Greeting(_) => "greeting_refused",
            ClientError::Helo(_) => "ehlo_refused",
            ClientError::StartTls(_) => "starttls_refused",
            ClientError::Closing(_) => "server_closed_421",
            ClientError::Protocol(_) => "protocol_error",
            ClientError::Unexpected(..) => "unexpected_reply",
            ClientError::OutOfOrder => "client_out_of_order",
        })
    }
}

/// Read buffer per connection; replies are small.
const READ_BUFFER: usize = 16 * 1024;

/// The most replies (MAIL, each RCPT, DATA or BDAT and the body's) awaited at once with
/// `--window`.
const MAX_REPLIES_AWAITED: usize = 4096;

/// Largest single write of a body when `--chunk-size` is not given.
const DEFAULT_WRITE: u64 = 256 * 1024;

/// An open, greeted connection.
struct Client {
    conn: Conn,
    session: ClientSession,
    raw: Vec<u8>,
    raw_len: usize,
    inbox: Vec<u8>,
    filter: Option<NoPipelining>,
    /// What is queued to be written: commands, and bodies, gathered so that messages
    /// pipelined into each other go out together.
    outbox: Outbox,
    timeout: Duration,
    /// When the first command (EHLO) was written.
    first_write: Option<Instant>,
    /// Where each read not yet wholly handled ended in the stream of `inbox` (counted from
    /// the connection's start), and when it was made.
    read_ends: VecDeque<(u64, Instant)>,
    /// Octets of `inbox` handled since the connection's start.
    handled: u64,
    /// When the read that completed the last event's reply was made: the time a reply is
    /// timed at, however long after it is taken (a body written meanwhile, say).
    replied_at: Instant,
}

impl Client {
    /// Runs the session until it has something other than "need input" to say. Commands it
    /// queues are written before each read; those queued with its answer are left for the
    /// caller (a BDAT line goes out together with its body).
    async fn next_event(&mut self) -> Result<ClientEvent, Failure> {
        // A reply that never ends (continuation lines without pause, a line dripped an octet
        // at a time) fails at the timeout like one that never comes: each read's own timeout
        // would let it go on for ever.
        let deadline = Instant::now() + self.timeout;
        // Bounded: every pass either returns or waits for a read that times out, until the
        // deadline.
        loop {
            let event = self.handle();
            if event != ClientEvent::NeedInput {
                return Ok(event);
            }
            if Instant::now() >= deadline {
                return Err(Failure("timeout"));
            }
            self.write_queued().await?;
            self.read().await?;
        }
    }

    /// Hands the session what was read, without reading more; notes when the reply it
    /// answers with was read.
    fn handle(&mut self) -> ClientEvent {
        let (used, event) = self.session.handle(&self.inbox);
        self.inbox.drain(..used);
        if used > 0 {
            self.handled += used as u64;
            // The last octet handled came with the first read that ends at or after it.
            while let Some(&(end, at)) = self.read_ends.front() {
                if end >= self.handled {
                    self.replied_at = at;
                    if end == self.handled {
                        self.read_ends.pop_front();
                    }
                    break;
                }
                self.read_ends.pop_front();
            }
        }
        event
    }

    /// Forgets what was read and not handled (at STARTTLS, where it is not to be trusted).
    fn discard_input(&mut self) {
        self.raw_len = 0;
        self.handled += self.inbox.len() as u64;
        self.inbox.clear();
        self.read_ends.clear();
    }

    /// Writes the session's commands and whatever the outbox holds, in order.
    async fn write_queued(&mut self) -> Result<(), Failure> {
        if !self.session.output().is_empty() {
            self.outbox
                .push(&mut self.conn, self.session.output())
                .await?;
            self.session.clear_output();
        }
        if !self.outbox.is_empty() {
            self.first_write.get_or_insert_with(Instant::now);
            self.outbox.flush(&mut self.conn).await?;
        }
        Ok(())
    }

    /// Writes what the session queued, reads once and hands the reply over; for settling an
    /// RSET between transactions.
    async fn pump(&mut self) -> Result<(), Failure> {
        self.write_queued().await?;
        self.read().await?;
        match self.handle() {
            ClientEvent::NeedInput => Ok(()),
            ClientEvent::Failed(e) => Err(e.into()),
            _ => Err(Failure("protocol_error")),
        }
    }

    async fn read(&mut self) -> Result<(), Failure> {
        if self.raw_len == self.raw.len() {
            return Err(Failure("reply_too_long"));
        }
        let n = self.conn.read_some(&mut self.raw[self.raw_len..]).await?;
        let at = Instant::now();
        if n == 0 {
            return Err(Failure("connection_closed"));
        }
        self.raw_len += n;
        let used = match self.filter.as_mut() {
            Some(f) => f.filter(&self.raw[..self.raw_len], &mut self.inbox),
            None => {
                self.inbox.extend_from_slice(&self.raw[..self.raw_len]);
                self.raw_len
            }
        };
        self.raw.copy_within(used..self.raw_len, 0);
        self.raw_len -= used;
        let end = self.handled + self.inbox.len() as u64;
        if self.read_ends.back().is_none_or(|&(last, _)| last < end) {
            self.read_ends.push_back((end, at));
        }
        Ok(())
    }

    /// Sends QUIT and waits for its answer (or the timeout).
    async fn quit(mut self) {
        self.session.quit();
        let _ = self.next_event().await;
        let _ = futures_lite::io::AsyncWriteExt::close(&mut self.conn).await;
    }
}

/// Runs one of the run's connections until the plan has no more messages.
pub async fn run(core: Rc<Core>) {
    let mut next = core.run.plan.claim();
    // Bounded: every pass settles or fails at least the ticket it starts with, or tries
    // again to open a connection for one not yet due (which comes due, or the run stops),
    // and tickets run out.
    while let Some(ticket) = next.take() {
        let client = match open_unless_stopped(&core).await {
            Ok(c) => c,
            Err(Failure(STOPPED)) => {
                // Stopped (a signal, or no server) before the message could start.
                core.run.plan.unclaim();
                break;
            }
            // With --rate, a message not yet due when a connection for it fails has not
            // been tried: it waits for the next attempt, and fails only when one fails once
            // it is due (counted, it would end the run early, with failures that came due
            // faster than the rate).
            Err(Failure(kind)) if ticket.due.is_some_and(|due| Instant::now() < due) => {
                core.run.give_up_unless_opened(kind);
                glommio::timer::sleep(CONNECT_RETRY).await;
                next = Some(ticket);
                continue;
            }
            Err(Failure(kind)) => {
                core.fail(kind);
                core.run.give_up_unless_opened(kind);
                // Do not spin against a server that refuses connections.
                glommio::timer::sleep(CONNECT_RETRY).await;
                next = core.run.plan.claim();
                continue;
            }
        };
        next = serve(&core, client, ticket).await;
    }
}

/// The pause after a connection that failed to open, before the next try: a server that
/// refuses connections is not hammered.
const CONNECT_RETRY: Duration = Duration::from_millis(20);

/// A message sent on the connection and not yet answered.
struct Pending<'a> {
    /// Its due time, or when its MAIL was queued.
    started: Instant,
    /// Where its body ends in what the connection wrote (see [`Outbox::pushed`]), once
    /// queued: its end of data is when the write that carried that octet out finished.
    eod: Option<u64>,
    mode: BodyMode,
    message: Message<'a>,
}

/// Sends messages on one open connection, starting with `first`: one at a time, or with
/// `--window N` up to N pipelined into each other, until the plan runs out, the connection has
/// carried `--msgs-per-conn`, or it fails. Returns the ticket the next connection starts with.
async fn serve(core: &Core, mut client: Client, first: Ticket) -> Option<Ticket> {
    let run = &core.run;
    // Replies awaited at once stay few enough for any socket buffer, so the server never
    // blocks writing them while this side still writes: MAIL, each RCPT, and the body's
    // (DATA and its end, or one per BDAT chunk).
    let replies_each = run.args.rcpts as usize + 1 + body_replies(run);
    let window = (run.args.window as usize).min((MAX_REPLIES_AWAITED / replies_each).max(1));
    let limit = run.args.msgs_per_conn;
    let mut flight: VecDeque<Pending<'_>> = VecDeque::with_capacity(window);
    let mut next = Some(first);
    let mut started_here = 0u64;
    // Bounded: every pass starts a message, or reads with a timeout towards a reply of one in
    // flight, or ends; tickets run out.
    loop {
        // Start every message that may start now.
        while flight.len() < window && (flight.is_empty() || client.session.can_send()) {
            if limit > 0 && started_here >= limit {
                break;
            }
            let Some(ticket) = next.take().or_else(|| run.plan.claim()) else {
                break;
            };
            if let Some(due) = ticket.due {
                let now = Instant::now();
                if due > now {
                    if !flight.is_empty() {
                        // Read the replies owed meanwhile; it starts when they are in.
                        next = Some(ticket);
                        break;
                    }
                    if !wait_until(run, due).await {
                        // Stopped while waiting: the message is not sent, and it does not
                        // count as started; nor as due where it came due first, since this
                        // connection was free for it.
                        run.plan.unclaim_waited(due);
                        break;
                    }
                }
            }
            started_here += 1;
            match start(core, &mut client, ticket).await {
                Ok(Some(p)) => flight.push_back(p),
                // Refused here, without a command sent: nothing in this pass waited, so the
                // executor's other tasks (the ticker, the other connections) get their turn.
                Ok(None) => glommio::yield_if_needed().await,
                Err(Failure(kind)) => {
                    return salvage(core, &mut client, &mut flight, kind, 1, None).await
                }
            }
        }
        if flight.is_empty() {
            client.quit().await;
            let more = limit > 0 && started_here >= limit;
            return if more {
                next.or_else(|| run.plan.claim())
            } else {
                None
            };
        }
        let event = match client.next_event().await {
            Ok(e) => e,
            Err(Failure(kind)) => {
                return salvage(core, &mut client, &mut flight, kind, 0, next).await
            }
        };
        match event {
            ClientEvent::SendBody => {
                // The newest message owes its body: no message starts while one is owed.
                let Some(p) = flight.back_mut().filter(|p| p.eod.is_none()) else {
                    return lose(core, "client_out_of_order", flight.len(), next);
                };
                if let Err(Failure(kind)) = write_body(&mut client, p).await {
                    return salvage(core, &mut client, &mut flight, kind, 0, next).await;
                }
                client.session.body_sent();
                p.eod = Some(client.outbox.pushed());
                let len = p.message.len();
                core.with_stats(|s| {
                    s.sent += 1;
                    s.bytes_sent += len;
                });
            }
            ClientEvent::Done(result) => {
                let Some(p) = flight.pop_front() else {
                    return lose(core, "protocol_error", 1, next);
                };
                settle(core, &p, &result, &mut client);
            }
            ClientEvent::Failed(e) => {
                settle_closing(core, &mut flight, &e, &mut client);
                let Failure(kind) = e.into();
                return lose(core, kind, flight.len(), next);
            }
            _ => return lose(core, "protocol_error", flight.len(), next),
        }
    }
}

/// The most replies a message's body may have awaited: the chunks a message of up to
/// `--size` is cut into with `--chunk-size`, at most what one message may have awaited
/// beside its MAIL and RCPTs; else 2 (DATA and the end of data).
fn body_replies(run: &Run) -> usize {
    let largest = run.sizes.items().iter().copied().max().unwrap_or(0) + HEADER_ROOM;
    match run.args.chunk_size {
        Some(chunk) if run.args.bdat => {
            let chunks = usize::try_from(largest.div_ceil(chunk)).unwrap_or(usize::MAX);
            chunks.clamp(1, chunk_budget(run))
        }
        _ => 2,
    }
}

/// Room above the largest `--size`, which counts the header fields, for a size below their
/// floor (about 210 octets), sent at the floor.
const HEADER_ROOM: u64 = 256;

/// Replies one message's BDAT chunks may have awaited: its chunks are written back to back
/// before any of their replies is read, so a body is never cut into more.
fn chunk_budget(run: &Run) -> usize {
    MAX_REPLIES_AWAITED
        .saturating_sub(run.args.rcpts as usize + 1)
        .max(1)
}

/// The BDAT chunk size for a message of `len` octets: `--chunk-size`, raised where the body
/// would be cut into more chunks than [`chunk_budget`] (0: one chunk).
fn chunk_size_for(run: &Run, len: u64) -> u64 {
    match run.args.chunk_size {
        Some(chunk) => chunk.max(len.div_ceil(chunk_budget(run) as u64)),
        None => 0,
    }
}

/// Counts the answer to message `p`, read at `client.replied_at`.
fn settle(core: &Core, p: &Pending<'_>, result: &TransactionResult, client: &mut Client) {
    // Accepted only with MAIL, a recipient and the body taken: a server that took the
    // pipelined DATA after refusing them gets a lone dot, not the message.
    let accepted = result.mail.is_positive()
        && result.rcpts.iter().any(|r| r.is_positive())
        && result.data.as_ref().is_some_and(|d| d.code < 300);
    let decided = match &result.data {
        Some(d) if accepted => d.code,
        _ if !result.mail.is_positive() => result.mail.code,
        _ => match result.rcpts.iter().find(|r| r.is_positive()) {
            None => result.rcpts.first().map_or(result.mail.code, |r| r.code),
            Some(_) => result.data.as_ref().map_or(0, |d| d.code),
        },
    };
    core.settle(
        decided,
        accepted,
        p.message.len(),
        p.started,
        p.eod.and_then(|end| client.outbox.written_at(end)),
        client.replied_at,
    );
    // Recipients refused in a transaction whose MAIL the server took: the message's own
    // count says nothing of them when another recipient was taken (with every recipient
    // refused, the message is counted refused too, by the first refusal's code).
    if result.mail.is_positive() && result.rcpts.iter().any(|r| !r.is_positive()) {
        core.with_stats(|s| {
            for r in result.rcpts.iter().filter(|r| !r.is_positive()) {
                *s.rcpt_refusals.entry(r.code).or_default() += 1;
            }
        });
    }
}

/// A 421 that came instead of the next reply answers a command of the oldest message in
/// flight (replies come in order): the server refused that message, with 421 (RFC 5321
/// 3.8), as a sink counts it. What was pipelined behind it is lost with the connection.
fn settle_closing(
    core: &Core,
    flight: &mut VecDeque<Pending<'_>>,
    e: &ClientError,
    client: &mut Client,
) {
    if let ClientError::Closing(reply) = e {
        if let Some(p) = flight.pop_front() {
            core.settle(
                reply.code,
                false,
                p.message.len(),
                p.started,
                p.eod.and_then(|end| client.outbox.written_at(end)),
                client.replied_at,
            );
        }
    }
}

/// The longest wait for replies already on their way when a connection fails.
const SALVAGE_WAIT: Duration = Duration::from_secs(2);

/// The connection failed (`kind`) with `flight` unanswered, and `extra` more messages lost
/// before they were in flight. Replies the server sent before it went may still be there to
/// read (a write fails on a reset while the replies that came before it wait in the socket):
/// they settle the messages they answer, as the server decided them, read for at most
/// [`SALVAGE_WAIT`]. The rest are lost ([`lose`]).
async fn salvage(
    core: &Core,
    client: &mut Client,
    flight: &mut VecDeque<Pending<'_>>,
    kind: &'static str,
    extra: usize,
    held: Option<Ticket>,
) -> Option<Ticket> {
    if kind != "timeout" {
        let deadline = Instant::now() + SALVAGE_WAIT.min(client.timeout);
        // Bounded: every pass settles a message, or reads with the deadline, or ends.
        'read: while !flight.is_empty() {
            match client.handle() {
                ClientEvent::Done(result) => {
                    let Some(p) = flight.pop_front() else {
                        break 'read;
                    };
                    settle(core, &p, &result, client);
                    continue;
                }
                ClientEvent::NeedInput => {}
                ClientEvent::Failed(e) => {
                    settle_closing(core, flight, &e, client);
                    break 'read;
                }
                _ => break 'read,
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let read = async { Some(client.read().await.is_ok()) };
            let expire = async {
                glommio::timer::sleep(left).await;
                None
            };
            if futures_lite::future::or(read, expire).await != Some(true) {
                break;
            }
        }
    }
    lose(core, kind, flight.len() + extra, held)
}

/// Longest sleep towards a due time between looks at the stop flag: how late a SIGINT or
/// SIGTERM can end a run at a slow `--rate`.
pub(super) const STOP_POLL: Duration = Duration::from_millis(50);

/// Waits until `due`, or until the run is stopped; true when `due` came.
async fn wait_until(run: &Run, due: Instant) -> bool {
    // Bounded: each pass sleeps towards `due`, at most STOP_POLL at a time.
    loop {
        if run.plan.stopped() {
            return false;
        }
        let now = Instant::now();
        if now >= due {
            return true;
        }
        glommio::timer::sleep((due - now).min(STOP_POLL)).await;
    }
}

/// The connection failed with `lost` messages unanswered, which are lost with it: counts
/// them, and hands the next connection the ticket not yet started, or a fresh one.
fn lose(core: &Core, kind: &'static str, lost: usize, held: Option<Ticket>) -> Option<Ticket> {
    for _ in 0..lost {
        core.fail(kind);
    }
    held.or_else(|| core.run.plan.claim())
}

/// What [`open_unless_stopped`] fails with when the run stopped first.
const STOPPED: &str = "stopped";

/// [`open`], given up when the run is stopped (a signal), or when no connection of the run
/// has opened within [`NO_SERVER_WAIT`] (a server that accepts and never greets, or a
/// connect that never completes): the first is [`STOPPED`], the second a `no_greeting` or
/// `connect_timeout` failure. Neither waits out `--timeout`.
async fn open_unless_stopped(core: &Core) -> Result<Client, Failure> {
    let run = &core.run;
    // Not even tried once stopped: a try that failed would fail its message after the end
    // of the messages due.
    if run.plan.stopped() {
        return Err(Failure(STOPPED));
    }
    let connected = std::cell::Cell::new(false);
    let watch = async {
        // Bounded: the run stops, or NO_SERVER_WAIT passes, or `open` ends first.
        loop {
            glommio::timer::sleep(STOP_POLL).await;
            if run.plan.stopped() {
                return Err(Failure(STOPPED));
            }
            let opened = run.opened.load(std::sync::atomic::Ordering::Relaxed);
            if !opened && run.plan.start().elapsed() >= NO_SERVER_WAIT {
                let kind = if connected.get() {
                    "no_greeting"
                } else {
                    "connect_timeout"
                };
                return Err(Failure(kind));
            }
        }
    };
    futures_lite::future::or(open(core, &connected), watch).await
}

/// Connects, reads the banner, greets, and starts TLS when asked.
async fn open(core: &Core, connected: &std::cell::Cell<bool>) -> Result<Client, Failure> {
    let run = &core.run;
    let started = Instant::now();
    let tcp = TcpStream::connect_timeout(run.addr, run.args.timeout)
        .await
        .map_err(|e| match e {
            glommio::GlommioError::IoError(e) => Failure::from(e),
            _ => Failure("connect_error"),
        })?;
    connected.set(true);
    let _ = tcp.set_nodelay(true);
    let mut client = Client {
        conn: Conn::plain_with_timeouts(tcp, run.args.timeout)?,
        session: ClientSession::new(&run.args.helo),
        raw: vec![0; READ_BUFFER],
        raw_len: 0,
        inbox: Vec::with_capacity(1024),
        filter: (!run.args.pipelining).then(NoPipelining::default),
        outbox: Outbox::new(run.args.chunk_size.unwrap_or(DEFAULT_WRITE)),
        timeout: run.args.timeout,
        first_write: None,
        read_ends: VecDeque::new(),
        handled: 0,
        replied_at: started,
    };
    greet(&mut client).await?;
    run.opened.store(true, std::sync::atomic::Ordering::Relaxed);
    let banner_at = client.first_write.unwrap_or(started);
    core.with_stats(|s| {
        s.connections += 1;
        s.record(Lat::Connect, banner_at - started);
        s.record(Lat::Ehlo, banner_at.elapsed());
    });
    if run.args.starttls {
        start_tls(core, &mut client, run.addr).await?;
    }
    // What the server offered, against what was asked: the report says when the two differ.
    let offered = client.session.capabilities();
    let (no_pipelining, no_chunking) = (
        run.args.pipelining && !offered.pipelining,
        run.args.bdat && !offered.chunking,
    );
    if no_pipelining || no_chunking {
        core.with_stats(|s| {
            s.without_pipelining += u64::from(no_pipelining);
            s.without_chunking += u64::from(no_chunking);
        });
    }
    // Only the greeting and EHLO replies need PIPELINING hidden: transaction replies go to
    // the session as they are, not parsed and written again.
    client.filter = None;
    Ok(client)
}

async fn greet(client: &mut Client) -> Result<(), Failure> {
    match client.next_event().await? {
        ClientEvent::Ready => Ok(()),
        ClientEvent::Failed(e) => {
            // The QUIT the session queued after a refused greeting or HELO (RFC 5321
            // 4.1.1.10), best effort.
            let _ = client.write_queued().await;
            Err(e.into())
        }
        _ => Err(Failure("protocol_error")),
    }
}

async fn start_tls(core: &Core, client: &mut Client, addr: SocketAddr) -> Result<(), Failure> {
    let Some(connector) = core.run.tls.clone() else {
        return Err(Failure("tls_unavailable"));
    };
    if !client.session.capabilities().starttls {
        return Err(Failure("starttls_not_offered"));
    }
    client
        .session
        .start_tls()
        .map_err(|_| Failure("client_out_of_order"))?;
    match client.next_event().await? {
        ClientEvent::StartTls => {}
        // A 454 (or any other refusal): `--starttls` asks for TLS on every connection.
        ClientEvent::StartTlsRefused(_) => return Err(Failure("starttls_refused")),
        ClientEvent::Failed(e) => return Err(e.into()),
        _ => return Err(Failure("protocol_error")),
    }
    let tcp = client
        .conn
        .take_plain()
        .ok_or(Failure("client_out_of_order"))?;
    let name = ServerName::IpAddress(addr.ip().into());
    let handshake = async { Some(connector.connect(name, tcp).await) };
    let expire = async {
        glommio::timer::sleep(client.timeout).await;
        None
    };
    match futures_lite::future::or(handshake, expire).await {
        Some(Ok(tls)) => client.conn = Conn::Tls(Box::new(futures_rustls::TlsStream::Client(tls))),
        Some(Err(_)) => return Err(Failure("tls_handshake")),
        None => return Err(Failure("timeout")),
    }
    client.discard_input();
    if client.filter.is_some() {
        client.filter = Some(NoPipelining::default());
    }
    client.session.tls_established();
    let at = Instant::now();
    greet(client).await?;
    core.with_stats(|s| s.record(Lat::Ehlo, at.elapsed()));
    Ok(())
}

/// Queues the commands of the message `ticket`; None when it was refused before anything
/// was sent (too large for the server's SIZE), already settled.
async fn start<'a>(
    core: &'a Core,
    client: &mut Client,
    ticket: Ticket,
) -> Result<Option<Pending<'a>>, Failure> {
    let run = &core.run;
    let size = *run.sizes.pick(ticket.seq);
    let from = address(&run.args.from, ticket.seq, 0);
    let rcpts: Vec<OutRecipient> = (0..run.args.rcpts)
        .map(|r| OutRecipient {
            path: address(&run.args.to, ticket.seq, r),
            params: String::new(),
        })
        .collect();
    let message = with_date(|date| {
        run.bodies
            .message(ticket.seq, size, &from, &rcpts[0].path, date)
    });
    let mode = if run.args.bdat && client.session.capabilities().chunking {
        BodyMode::Bdat
    } else {
        BodyMode::Data
    };
    let t = Transaction {
        from,
        mail_params: String::new(),
        rcpts,
        body_len: message.len(),
        mode,
        // BDAT in chunks of this size where the session may pipeline them; 0 is one chunk.
        chunk_size: chunk_size_for(run, message.len()),
    };
    let started = ticket.due.unwrap_or_else(Instant::now);
    // Bounded: the session is busy only while an RSET reply is pending; each pass reads.
    let mut tries = 0;
    loop {
        match client.session.send(&t) {
            Ok(()) => break,
            Err(r) if r.code == 451 && tries < 8 => {
                tries += 1;
                client.pump().await?;
            }
            Err(r) if r.code == 451 => return Err(Failure("client_busy")),
            Err(r) => {
                // Refused here, before a command went out (over the server's SIZE, say): no
                // transaction and no reply from the server, a failure of its own kind.
                core.fail(if r.code == 552 {
                    "over_server_size"
                } else {
                    "refused_before_sending"
                });
                return Ok(None);
            }
        }
    }
    Ok(Some(Pending {
        started,
        eod: None,
        mode,
        message,
    }))
}

/// Queues the commands before the body, then the body of `p` as the session laid it out.
async fn write_body(client: &mut Client, p: &Pending<'_>) -> Result<(), Failure> {
    let Client {
        conn,
        session,
        outbox,
        ..
    } = client;
    outbox.push(conn, session.output()).await?;
    session.clear_output();
    match p.mode {
        BodyMode::Bdat => {
            for chunk in session.bdat_chunks() {
                outbox.push(conn, chunk.header.as_bytes()).await?;
                for part in within(p.message.pieces(), chunk.offset, chunk.len) {
                    outbox.push(conn, part).await?;
                }
            }
        }
        BodyMode::Data => {
            let mut stuffer = DotStuffer::new();
            for piece in p.message.pieces() {
                for slice in stuffer.stuff(piece) {
                    outbox.push(conn, slice).await?;
                }
            }
            outbox.push(conn, stuffer.finish()).await?;
        }
    }
    Ok(())
}

/// The parts of `pieces`, taken as one run of octets, that lie in `offset..offset + len`.
fn within(pieces: [&[u8]; 3], offset: u64, len: u64) -> impl Iterator<Item = &[u8]> {
    let (start, end) = (offset as usize, (offset + len) as usize);
    let mut at = 0;
    pieces.into_iter().filter_map(move |piece| {
        let (from, to) = (at, at + piece.len());
        at = to;
        let part = &piece[start.clamp(from, to) - from..end.clamp(from, to) - from];
        (!part.is_empty()).then_some(part)
    })
}

#[cfg(test)]
mod tests {
    use super::within;

    #[test]
    fn within_cuts_across_pieces() {
        let pieces: [&[u8]; 3] = [b"head", b"lines", b"t"];
        let cut = |o, n| within(pieces, o, n).collect::<Vec<_>>().concat();
        let whole = pieces.concat();
        for o in 0..whole.len() {
            for n in 0..=whole.len() - o {
                assert_eq!(cut(o as u64, n as u64), &whole[o..o + n], "{o} {n}");
            }
        }
        assert_eq!(within(pieces, 2, 4).count(), 2);
    }
}
