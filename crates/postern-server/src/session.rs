//! One SMTP session: moves bytes between the socket, postern-proto's server state machine and
//! the core's spool. The session lives on the core that accepted it, from accept to close.

use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use futures_lite::future;
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use postern_proto::address::ForwardPath;
use postern_proto::server::replies;
use postern_proto::{EnhancedCode, Event, ServerSession, StaticReply};

use crate::conn::Conn;
use crate::core::Core;
use crate::delivery::Accepted;
use crate::limits::Permit;
use crate::metrics::CoreMetrics;
use crate::received::{received_header, LoopDetector, Trace};
use crate::store::{CoreStore, Draft, Meta};
use postern_spool::MessageMeta;

/// Read buffer per session: it starts small (an idle session costs little) and doubles while
/// reads fill it, up to the cap. Commands are capped far below the first size and bodies are
/// handed on as they arrive, so the cap bounds a session's input memory whatever the client
/// sends.
const READ_BUFFER_FIRST: usize = 4 * 1024;
const READ_BUFFER_MAX: usize = 64 * 1024;
/// Bytes a session takes in, read after read, before it lets the core's other tasks run: a
/// client that keeps its socket full never waits for a read, and glommio asks a task to yield
/// only when the core's time slice (100 ms) is over, so each of many such clients could keep
/// the core for a whole slice in turn, and a new connection, another session's command or the
/// core's timers wait behind all of them (seconds, with a hundred clients uploading at once).
const READ_TURN: usize = 256 * 1024;
/// Longest TLS handshake (shorter when the command timeout or the session's cap is).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest TLS handshake begun once the server is stopping.
const HANDSHAKE_DURING_STOP: Duration = Duration::from_secs(1);
/// Body pieces are gathered up to this before they go to the spool, and only larger ones go
/// as they are: the decoders hand out a piece per dot-stuffed line and per bare line end, and
/// a record each would cost the spool (and the message's list of pieces, kept in memory until
/// it is delivered) many times the bytes. A body of 512-octet dot-stuffed lines stays at one
/// piece per 16 KiB.
const BODY_GATHER: usize = 16 * 1024;
/// What a reply written at or past the session's cap (its closing 421) still gets.
pub(crate) const CLOSING_WRITE: Duration = Duration::from_secs(1);

/// The most a session reads and drops after closing its side (see `serve`).
const LINGER_BYTES: usize = 1024 * 1024;

/// Relay refused.
const RELAY_DENIED: StaticReply =
    StaticReply::new(554, EnhancedCode::new(5, 7, 1), "Relay access denied");
/// More than 100 Received headers (RFC 5321 6.3).
const MAIL_LOOP: StaticReply = StaticReply::new(
    554,
    EnhancedCode::new(5, 4, 6),
    "Too many Received headers: mail loop",
);

/// The delivery queue is past its high-water mark.
const QUEUE_FULL: StaticReply = StaticReply::new(
    452,
    EnhancedCode::new(4, 3, 1),
    "Mail queue full, try again later",
);

/// The reply to a spool error: no room (a full disk, a file size limit, a record too large
/// for a segment) is `452 4.3.1`; a failed write or sync (`EIO`) is `451 4.3.0`, a local
/// fault rather than a full system. Both tell the client to send the message again later.
fn spool_reply(e: &postern_spool::SpoolError) -> StaticReply {
    use postern_spool::SpoolError;
    match e {
        SpoolError::NoSpace(_) | SpoolError::TooLarge(_) => replies::SPOOL_FULL,
        _ => replies::SPOOL_ERROR,
    }
}

enum Wake {
    Read(std::io::Result<usize>),
    Timeout,
    Stop,
}

/// Runs one session to its end. The caller has already counted it in `core.sessions`
/// (before spawning it, so that a stop never misses a session whose task has not run yet).
/// `reached`: the address the client connected to, where it is not the socket's own (a load
/// balancer's, from its PROXY header).
pub(crate) async fn serve(
    core: Rc<Core>,
    tcp: TcpStream,
    peer: SocketAddr,
    reached: Option<SocketAddr>,
    implicit_tls: bool,
    permit: Permit,
) {
    let started = Instant::now();
    core.metrics.borrow_mut().connections += 1;
    let _ = tcp.set_nodelay(true);
    // An IPv4 client of a dual-stack listener is itself everywhere (log, trace header,
    // spool, relay check), not `::ffff:a.b.c.d`.
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let mut session = Session {
        core: core.clone(),
        // Unspecified where the socket cannot say (an accepted one always can).
        local: reached
            .or_else(|| tcp.local_addr().ok())
            .map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip()),
        conn: Conn::Plain(tcp),
        peer,
        proto: ServerSession::new(core.proto.clone(), core.tls.is_some() && !implicit_tls),
        draft: None,
        gathered: Vec::new(),
        meta: None,
        loops: LoopDetector::default(),
        content_begun: false,
        eod_at: None,
        eod_queued: false,
        deadline: started + core.settings.max_session_time,
    };
    let ready = if implicit_tls {
        let ok = session.start_tls(true).await;
        if ok {
            // The whole session is inside TLS (RFC 8314): Received says ESMTPS/UTF8SMTPS.
            session.proto.tls_established();
        }
        ok
    } else {
        true
    };
    if ready {
        session.run().await;
    }
    if let Some(draft) = session.draft.take() {
        core.store.abort(draft);
    }
    // Give the place back before the client can see the close.
    drop(permit);
    // The session is over: what follows is its connection's end.
    CoreMetrics::record(
        &mut core.metrics.borrow_mut().session_duration,
        started.elapsed(),
    );
    // Over TLS the close writes a close_notify: bounded too, for a client that does not read.
    // Closing a socket with input still unread sends a reset, which throws away what the
    // socket has not sent yet (the last replies, the 421 that ends a session pipelining
    // past the error limit or streaming a body when the stop's grace ends): our side is
    // closed first, then what the client still sends is read and dropped until it closes,
    // within the same bound (as HTTP servers do, RFC 9112 9.6).
    let until = Instant::now() + CLOSING_WRITE;
    let close = async { session.conn.close().await.is_ok() };
    let timeout = async {
        glommio::timer::sleep(CLOSING_WRITE).await;
        false
    };
    // No longer counted under --max-connections, these take descriptors kept for the spool
    // and delivery: a core's share of `max_lingering` at most (clients that never close
    // cannot hold them without bound); past it the connection closes at once.
    if future::or(close, timeout).await {
        linger(&core, &core.lingering, &mut session.conn, until).await;
    }
    core.sessions.set(core.sessions.get() - 1);
    core.session_ended.notify(usize::MAX);
}

/// Reads and drops what a client still sends after our side of its connection is closed,
/// until it closes too, `LINGER_BYTES` have come or `until`. No longer counted under
/// --max-connections, such connections take descriptors kept for the spool and delivery: a
/// core's share of `max_lingering` at most, sessions' and refusals' together (clients that
/// never close cannot hold them without bound); past it this returns at once. `count` is
/// the core's counter this one is kept in while it lasts.
pub(crate) async fn linger<R: futures_lite::AsyncRead + Unpin>(
    core: &Core,
    count: &std::cell::Cell<usize>,
    reader: &mut R,
    until: Instant,
) {
    let lingering = core.settings.max_lingering;
    let most = (lingering / core.settings.cores.max(1)).max(usize::from(lingering > 0));
    if core.lingering.get() + core.refusals_lingering.get() >= most {
        return;
    }
    // Refused connections (a flood of them, silent and never closing) take half of it at
    // most, so that sessions still get their clean ends.
    if std::ptr::eq(count, &core.refusals_lingering) && count.get() >= most / 2 {
        return;
    }
    count.set(count.get() + 1);
    let mut scrap = [0u8; 4096];
    let mut drained = 0;
    let read = async {
        while drained < LINGER_BYTES {
            match reader.read(&mut scrap).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    };
    let left = until.saturating_duration_since(Instant::now());
    future::or(read, glommio::timer::sleep(left)).await;
    count.set(count.get() - 1);
}

struct Session {
    core: Rc<Core>,
    conn: Conn,
    peer: SocketAddr,
    /// The address the client reached us at.
    local: IpAddr,
    proto: ServerSession,
    /// The spool record of the message being received.
    draft: Option<Draft>,
    /// Small body pieces not yet appended to it.
    gathered: Vec<u8>,
    /// Its envelope as spooled, for the delivery side.
    meta: Option<MessageMeta>,
    loops: LoopDetector,
    /// Whether any of the message's content has come yet (after the Received header).
    content_begun: bool,
    /// When the last end of data was seen, until its reply is written.
    eod_at: Option<Instant>,
    /// That reply is the 250 with a queue ID (only those are timed).
    eod_queued: bool,
    deadline: Instant,
}

impl Session {
    async fn run(&mut self) {
        // The process-wide flag too: a core sees its own only at its next tick.
        if self.core.stop_asked() {
            self.proto.shutdown();
        } else {
            self.proto.greet();
        }
        if !self.flush().await || self.proto.is_closed() {
            return;
        }
        let mut buf = vec![0u8; READ_BUFFER_FIRST];
        let (mut start, mut end) = (0usize, 0usize);
        // When the wait for the next command began: the command timeout runs from there
        // until a command is whole (a client trickling a line a byte at a time does not
        // start it again with each byte); inside a body, from each read (RFC 5321 4.5.3.2.5).
        let mut waiting_since = Instant::now();
        // Taken in since this session last let the others run (see READ_TURN).
        let mut read_in_turn = 0usize;
        loop {
            let arrived = Instant::now();
            // A command answered (or an event of a transaction) since the last read.
            let mut progressed = false;
            // Answer every complete command (and take every body byte) already read.
            loop {
                // Once the server stops, a session outside a message body gets 421, also
                // when its next commands were pipelined behind the body just finished: the
                // stop lets transactions in flight finish, not new ones start.
                if !self.proto.in_message() && self.core.stop_asked() {
                    let open = self.proto.shutdown();
                    self.abandon_draft(open);
                    self.flush().await;
                    return;
                }
                let step = self.proto.handle(&buf[start..end]);
                self.log_refused();
                start += step.consumed;
                progressed |= !matches!(step.event, Event::NeedInput);
                match step.event {
                    Event::NeedInput => break,
                    Event::Mail(..) => {
                        if self.core.accepting() {
                            self.proto.accept();
                        } else {
                            self.proto.reject(QUEUE_FULL);
                        }
                    }
                    Event::Rcpt(path, _) => {
                        if self.core.relay.allows(&path, self.peer.ip(), self.local) {
                            self.proto.accept();
                        } else {
                            let to = match path {
                                ForwardPath::Mailbox(m) => m.to_string(),
                                ForwardPath::Postmaster => "Postmaster".to_owned(),
                            };
                            self.core.log_relay_refusal(self.peer.ip(), &to);
                            self.proto.reject(RELAY_DENIED);
                        }
                    }
                    Event::DataStart => self.data_start().await,
                    Event::Body(bytes) => self.body(bytes),
                    Event::DataEnd => {
                        if !self.data_end().await {
                            return;
                        }
                    }
                    Event::DataAbort => self.drop_draft(),
                    Event::StartTls => {
                        // Anything pipelined after STARTTLS is dropped unread.
                        start = end;
                        if !self.flush_timed(arrived).await || !self.start_tls(false).await {
                            return;
                        }
                        self.proto.tls_established();
                    }
                    Event::Close => {
                        self.flush_timed(arrived).await;
                        return;
                    }
                    Event::Flush => {
                        if !self.flush().await {
                            return;
                        }
                        // A long pipelined run is worked through between reads: the core's
                        // other sessions get their turn in it, not only at the next read.
                        glommio::yield_if_needed().await;
                    }
                }
                // What the session refused itself (a full spool at the data, a loop).
                self.log_refused();
            }
            // Inside a body (DATA's, or a chunk's octets), each read; not between chunks,
            // where the next BDAT line is a command like any other.
            let restart = progressed || !self.proto.output().is_empty() || self.proto.in_body();
            if !self.flush_timed(arrived).await {
                return;
            }
            // From the end of the reply's write: a client slow to read it is not given less.
            if restart {
                waiting_since = Instant::now();
            }
            if start == end {
                (start, end) = (0, 0);
            } else if end == buf.len() {
                buf.copy_within(start..end, 0);
                (start, end) = (0, end - start);
            }
            // The protocol consumes every body octet and refuses a command line longer than
            // its limit, far below the buffer: there is always room, or a read of nothing
            // would look like the client's close.
            debug_assert!(
                end < buf.len(),
                "the read buffer is full of unconsumed input"
            );
            match self.read(&mut buf[end..], waiting_since).await {
                Wake::Read(Ok(0)) | Wake::Read(Err(_)) => return,
                Wake::Read(Ok(n)) => {
                    crate::store::collect_sync(&self.core);
                    end += n;
                    read_in_turn += n;
                    if read_in_turn >= READ_TURN {
                        read_in_turn = 0;
                        // To the back of the core's run queue, behind the sessions, accepts
                        // and timers made ready meanwhile.
                        futures_lite::future::yield_now().await;
                    }
                    // A full read: the client is sending in bulk, give it room.
                    if end == buf.len() && buf.len() < READ_BUFFER_MAX {
                        buf.resize(buf.len() * 2, 0);
                    }
                }
                Wake::Timeout => {
                    let open = if Instant::now() >= self.deadline {
                        self.proto.session_time_over()
                    } else {
                        self.proto.timeout()
                    };
                    self.abandon_draft(open);
                    // The client let a whole command timeout pass: its 421 gets what a reply
                    // at the session's cap gets, not a second timeout to be read.
                    self.flush_within(CLOSING_WRITE).await;
                    return;
                }
                Wake::Stop => {
                    let open = self.proto.shutdown();
                    self.abandon_draft(open);
                    self.flush().await;
                    return;
                }
            }
        }
    }

    /// Waits for bytes, the command timeout (counted from `waiting_since`), the session's end,
    /// or (between transactions' bodies) the server's stop.
    async fn read(&mut self, into: &mut [u8], waiting_since: Instant) -> Wake {
        // A client that keeps the socket full makes every read ready at once, and `or` polls
        // the read first: the cap, the stop and the other tasks of the core are seen here,
        // not only when a read has to wait.
        glommio::yield_if_needed().await;
        let now = Instant::now();
        if now >= self.deadline {
            return Wake::Timeout;
        }
        let stoppable = !self.proto.in_message();
        if (stoppable && self.core.stopping.get()) || self.core.grace_over.get() {
            return Wake::Stop;
        }
        let wait = self
            .core
            .settings
            .command_timeout
            .saturating_sub(now.saturating_duration_since(waiting_since))
            .min(self.deadline.saturating_duration_since(now));
        let core = self.core.clone();
        let read = async { Wake::Read(self.conn.read(into).await) };
        let timeout = async {
            glommio::timer::sleep(wait).await;
            Wake::Timeout
        };
        let stop = async {
            if stoppable {
                core.stopped().await;
            } else {
                core.grace_ended().await;
            }
            Wake::Stop
        };
        future::or(read, future::or(timeout, stop)).await
    }

    fn abandon_draft(&mut self, open: bool) {
        if open {
            self.drop_draft();
        }
    }

    /// Abandons the message being received, if any: its spool records and its gathered
    /// pieces.
    fn drop_draft(&mut self) {
        if let Some(draft) = self.draft.take() {
            self.core.store.abort(draft);
        }
        self.gathered = Vec::new();
    }

    /// Writes out the pending replies. False when the connection is gone.
    /// [`Session::flush`], and for replies to what was read at `arrived`, one sample of the
    /// command latency once they are written (the QUIT's 221 and STARTTLS's 220 too).
    async fn flush_timed(&mut self, arrived: Instant) -> bool {
        if self.proto.output().is_empty() {
            return true;
        }
        if !self.flush().await {
            return false;
        }
        CoreMetrics::record(
            &mut self.core.metrics.borrow_mut().command_latency,
            arrived.elapsed(),
        );
        true
    }

    async fn flush(&mut self) -> bool {
        self.flush_within(self.core.settings.command_timeout).await
    }

    /// [`Session::flush`], the write bounded by `bound` (and the session's cap) rather than
    /// by the command timeout.
    async fn flush_within(&mut self, bound: Duration) -> bool {
        let out = self.proto.output();
        if out.is_empty() {
            return true;
        }
        // A client that sends but never reads (or reads a trickle) fills the socket's buffers
        // until this write waits: the whole write gets no longer than a command may, nor
        // past the session's cap, so such a client cannot hold its connection (and its place
        // under the limits) for ever. The timer is made only when the write has to wait:
        // `or` polls the write first, and the sleep starts at its first poll.
        // Writes may run until 1 s past the cap, all of them together: the last replies (the
        // 421 among them) may still reach a client that reads slowly.
        let closing = (self.deadline + CLOSING_WRITE).saturating_duration_since(Instant::now());
        let limit = bound.min(closing);
        // A stop gives a write that waits 1 s more, as it gives a read none: outside a
        // message from the stop, inside one from the end of the grace. A client that never
        // reads would otherwise hold the stop for the whole grace.
        let core = self.core.clone();
        let stoppable = !self.proto.in_message();
        let conn = &mut self.conn;
        let write = async { conn.write_all(out).await.is_ok() && conn.flush().await.is_ok() };
        let expire = async {
            glommio::timer::sleep(limit).await;
            false
        };
        let stop = async {
            if stoppable {
                core.stopped().await;
            } else {
                core.grace_ended().await;
            }
            glommio::timer::sleep(CLOSING_WRITE).await;
            false
        };
        let ok = future::or(write, future::or(expire, stop)).await;
        // Replies are counted as sent once written whole (not those of a write that timed
        // out against a client that does not read, or that met a reset).
        if ok {
            self.core
                .metrics
                .borrow_mut()
                .count_replies(self.proto.output());
        }
        self.proto.clear_output();
        let queued = std::mem::take(&mut self.eod_queued);
        if let (Some(at), true, true) = (self.eod_at.take(), queued, ok) {
            CoreMetrics::record(
                &mut self.core.metrics.borrow_mut().eod_latency,
                at.elapsed(),
            );
        }
        ok
    }

    /// The TLS handshake, on STARTTLS or at once on the implicit-TLS port.
    /// `implicit`: on the implicit-TLS port, before anything else (RFC 8314).
    async fn start_tls(&mut self, implicit: bool) -> bool {
        let (Some(acceptor), Conn::Plain(_)) = (self.core.tls.clone(), &self.conn) else {
            return false;
        };
        let Conn::Plain(tcp) = std::mem::replace(&mut self.conn, Conn::Gone) else {
            return false;
        };
        // A handshake is a client's turn like a command: bounded by the command timeout and
        // the session's cap as well.
        let limit = TLS_HANDSHAKE_TIMEOUT
            .min(self.core.settings.command_timeout)
            .min(self.deadline.saturating_duration_since(Instant::now()));
        // A stop ends a handshake still in progress: its client cannot be sent a 421 (it is
        // already speaking TLS), has nothing in flight, and would otherwise hold the stop for
        // the whole grace.
        // One that begins during the stop (a connection taken from the listener's backlog
        // then) gets a short while, so that a client that completes it hears the 421.
        let core = self.core.clone();
        let already_stopping = core.stop_asked();
        let limit = if already_stopping {
            limit.min(HANDSHAKE_DURING_STOP)
        } else {
            limit
        };
        // On the implicit-TLS port, a connection closed before its first byte, or silent
        // until the limit (a port check, a load balancer's probe that connects and waits),
        // attempted no handshake: not counted as failed.
        let spoke = std::cell::Cell::new(!implicit);
        let handshake = async {
            if implicit && crate::conn::closed_before_a_byte(&tcp).await {
                return Some(None);
            }
            spoke.set(true);
            Some(Some(acceptor.accept(tcp).await))
        };
        let stopped = async {
            if already_stopping {
                std::future::pending::<()>().await;
            }
            core.stopped().await;
            None
        };
        let outcome = crate::runtime::within(limit, futures_lite::future::or(handshake, stopped))
            .await
            .flatten();
        match outcome {
            Some(Some(Ok(tls))) => {
                self.conn = Conn::Tls(Box::new(futures_rustls::TlsStream::Server(tls)));
                self.core.metrics.borrow_mut().tls_handshakes += 1;
                true
            }
            // Closed before a byte, or not a byte before the limit: no handshake.
            Some(None) => false,
            None if !spoke.get() => false,
            // Ended by the stop: not the client's failure.
            None if !already_stopping && core.stopping.get() => false,
            Some(Some(Err(e))) => {
                self.core.tls_failure(self.peer, &e);
                false
            }
            None => {
                let why = format!("not finished within {:?}", limit);
                self.core.tls_failure(self.peer, &why);
                false
            }
        }
    }

    async fn data_start(&mut self) {
        let env = self.proto.envelope();
        let meta = Meta {
            client: self.peer,
            local: self.local,
            helo: env.helo(),
            envelope: env,
            arrival: SystemTime::now(),
            relay: &self.core.relay,
            hostname: &self.core.settings.hostname,
            postmaster: self.core.settings.postmaster.as_deref(),
        };
        let record = CoreStore::meta(&meta);
        self.core.store.spare_for(&record).await;
        let begun = self.core.store.begin(&record);
        self.meta = Some(record);
        crate::store::ensure_spare(&self.core);
        let mut draft = match begun {
            Ok(d) => d,
            Err(e) => {
                self.core.spool_error("starting a message", &e);
                self.proto.reject(spool_reply(&e));
                return;
            }
        };
        let single = (env.recipient_count() == 1)
            .then(|| env.recipients().next().map(|r| r.path))
            .flatten();
        let mut header = Vec::with_capacity(256);
        let cipher = self.conn.tls_cipher();
        received_header(
            &Trace {
                helo: env.helo(),
                client: self.peer,
                hostname: &self.core.settings.hostname,
                esmtp: env.is_esmtp(),
                tls: self.proto.is_tls(),
                tls_cipher: cipher.as_deref(),
                smtputf8: env.smtputf8(),
                queue_id: draft.queue_id(),
                single_rcpt: single,
                now: meta.arrival,
            },
            &mut header,
        );
        if let Err(e) = self.core.store.append(&mut draft, &header) {
            self.core.spool_error("writing a message", &e);
            self.core.store.abort(draft);
            self.proto.reject(spool_reply(&e));
            return;
        }
        self.loops = LoopDetector::default();
        self.content_begun = false;
        self.gathered.clear();
        self.draft = Some(draft);
        self.proto.accept();
    }

    /// Logs a message refused after its data began, which only the reply would show.
    fn log_refused(&mut self) {
        if let Some(refused) = self.proto.take_refused() {
            self.core.log_message_refusal(self.peer.ip(), &refused);
        }
    }

    fn body(&mut self, bytes: &[u8]) {
        self.loops.feed(bytes);
        if self.draft.is_none() {
            return;
        }
        if !self.content_begun && !bytes.is_empty() {
            self.content_begun = true;
            // A first line that starts with a space or a tab (no header field can, RFC 5322
            // 2.2.3) would read as a continuation of the Received header just written: words
            // of the client's, a second date, inside this server's trace. An empty line goes
            // first, so that the header section ends with the trace and the client's lines
            // are the body (as they are for a message without header fields).
            if matches!(bytes[0], b' ' | b'\t') {
                self.gathered.extend_from_slice(b"\r\n");
            }
        }
        let appended = if bytes.len() < BODY_GATHER {
            self.gathered.extend_from_slice(bytes);
            // A body that comes slowly while other mail fills the spool goes in at once,
            // which moves it forward, rather than once 16 KiB of it have come (a client
            // trickling it would keep the oldest segment, and all behind it, meanwhile).
            let holds_back = || {
                self.draft
                    .as_ref()
                    .is_some_and(|d| self.core.store.holds_back(d))
            };
            if self.gathered.len() >= BODY_GATHER || holds_back() {
                self.append_gathered()
            } else {
                Ok(())
            }
        } else {
            self.append_gathered().and_then(|()| {
                let draft = self.draft.as_mut().expect("checked above");
                self.core.store.append(draft, bytes)
            })
        };
        if let Err(e) = appended {
            self.core.spool_error("writing a message", &e);
            self.drop_draft();
            self.proto.abort_body(spool_reply(&e));
        }
    }

    /// Appends the gathered small pieces to the draft.
    fn append_gathered(&mut self) -> Result<(), postern_spool::SpoolError> {
        let Some(draft) = self.draft.as_mut() else {
            self.gathered.clear();
            return Ok(());
        };
        if self.gathered.is_empty() {
            return Ok(());
        }
        let appended = self.core.store.append(draft, &self.gathered);
        self.gathered.clear();
        appended
    }

    /// Settles an end of data; false when the connection is gone (nothing more is taken
    /// from it, and this message is not committed).
    async fn data_end(&mut self) -> bool {
        // A client that pipelines transactions into each other may have sent this message
        // before reading the previous one's reply: let that reply go before waiting for this
        // commit, rather than after it.
        if self.eod_at.is_some() && !self.flush().await {
            if let Some(draft) = self.draft.take() {
                self.core.store.abort(draft);
            }
            return false;
        }
        self.eod_at = Some(Instant::now());
        let appended = self.append_gathered();
        if self.gathered.capacity() > 4 * 1024 {
            self.gathered = Vec::new();
        }
        if let Err(e) = appended {
            self.core.spool_error("writing a message", &e);
            self.drop_draft();
            self.proto.message_failed(spool_reply(&e));
            return true;
        }
        let Some(draft) = self.draft.take() else {
            self.proto.message_failed(replies::NO_DECISION);
            return true;
        };
        if self.loops.is_looping() {
            self.core.store.abort(draft);
            self.proto.message_failed(MAIL_LOOP);
            return true;
        }
        let size = draft.size();
        let committing = Instant::now();
        match self.core.store.commit(draft).await {
            Ok((queue_id, body)) => {
                let mut m = self.core.metrics.borrow_mut();
                CoreMetrics::record(&mut m.commit_latency, committing.elapsed());
                m.messages += 1;
                m.bytes += size;
                drop(m);
                self.proto.message_queued(&queue_id);
                self.eod_queued = true;
                if let Some(meta) = self.meta.take() {
                    // The record of where a message came from, for the operator (the
                    // delivery lines give where it went, under the same queue ID).
                    tracing::info!(
                        queue_id = %queue_id,
                        client = %self.peer.ip(),
                        helo = ?meta.helo,
                        from = ?meta.reverse_path,
                        nrcpt = meta.recipients.len(),
                        size,
                        "message accepted"
                    );
                    self.core.accepted(Accepted {
                        queue_id,
                        meta,
                        body,
                    });
                }
            }
            Err(e) => {
                self.core.spool_error("committing a message", &e);
                self.proto.message_failed(spool_reply(&e));
            }
        }
        true
    }
}
