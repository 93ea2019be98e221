//! One sink session: bytes in, postern-proto's server session decides, replies out. Bodies
//! are counted (and their headers scanned with `--record`), never stored.

use std::rc::Rc;

use futures_lite::future;
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use postern_proto::{Event, ServerSession};

use crate::conn::Conn;
use crate::sink::core::Core;
use crate::sink::counters::Slot;
use crate::sink::faults::Verdict;
use crate::sink::record::HeaderScan;

/// Read buffer per session: large enough that bulk bodies arrive in few reads.
const READ_BUFFER: usize = 64 * 1024;

/// Runs one session to its end.
pub async fn serve(core: Rc<Core>, tcp: TcpStream) {
    core.sessions.set(core.sessions.get() + 1);
    Slot::add(&core.slot().connections, 1);
    let _ = tcp.set_nodelay(true);
    let mut s = Session {
        proto: ServerSession::new(core.shared.proto.clone(), core.shared.tls.is_some()),
        core: core.clone(),
        conn: Conn::Plain(tcp),
        scan: HeaderScan::default(),
        body_len: 0,
        on_connection: 0,
        in_bdat: false,
        reply_owed: false,
    };
    s.run().await;
    let _ = s.conn.close().await;
    core.sessions.set(core.sessions.get() - 1);
    core.session_ended.notify(usize::MAX);
}

struct Session {
    core: Rc<Core>,
    conn: Conn,
    proto: ServerSession,
    scan: HeaderScan,
    body_len: u64,
    on_connection: u64,
    /// Inside a BDAT body, from its first chunk to its end.
    in_bdat: bool,
    /// A message's final reply is queued and not yet written.
    reply_owed: bool,
}

enum Wake {
    Read(std::io::Result<usize>),
    Timeout,
    Stop,
}

impl Session {
    async fn run(&mut self) {
        if self.core.is_stopping() {
            self.proto.shutdown();
        } else {
            self.proto.greet();
        }
        if !self.flush().await || self.proto.is_closed() {
            return;
        }
        let mut buf = vec![0u8; READ_BUFFER];
        let (mut start, mut end) = (0usize, 0usize);
        // Bounded: every pass reads, and reads end with the client, a timeout or the stop.
        loop {
            // A MAIL whose RCPT comes in the same read: the client pipelines.
            let mut mail_in_this_read = false;
            loop {
                let before = self.proto.output().len();
                let step = self.proto.handle(&buf[start..end]);
                start += step.consumed;
                // A body the session refused itself (over `--max-size`): its end-of-data
                // reply counts with the mix's.
                self.count_refused();
                if self.in_bdat {
                    let acks = chunk_acks(&self.proto.output()[before..]);
                    Slot::add(&self.core.slot().bdat_chunks, acks);
                }
                match step.event {
                    Event::NeedInput => break,
                    Event::Mail(..) => {
                        self.in_bdat = false;
                        mail_in_this_read = true;
                        if self.reply_owed {
                            Slot::add(&self.core.slot().overlapped, 1);
                        }
                        self.proto.accept();
                    }
                    Event::Rcpt(..) => {
                        let slot = self.core.slot();
                        Slot::add(&slot.recipients, 1);
                        if std::mem::take(&mut mail_in_this_read) {
                            Slot::add(&slot.pipelined, 1);
                        }
                        self.proto.accept();
                    }
                    Event::DataStart => {
                        self.scan.reset();
                        self.body_len = 0;
                        let before = self.proto.output().len();
                        self.proto.accept();
                        // Only DATA is answered 354 at its start; BDAT goes straight on.
                        let slot = self.core.slot();
                        self.in_bdat = !self.proto.output()[before..].starts_with(b"354");
                        if self.in_bdat {
                            Slot::add(&slot.bdat_bodies, 1);
                            Slot::add(&slot.bdat_chunks, 1);
                        } else {
                            Slot::add(&slot.data_bodies, 1);
                        }
                    }
                    Event::Body(bytes) => {
                        self.body_len += bytes.len() as u64;
                        if self.core.recording() {
                            self.scan.feed(bytes);
                        }
                    }
                    Event::DataEnd => {
                        self.in_bdat = false;
                        if !self.data_end().await {
                            return;
                        }
                    }
                    Event::DataAbort => self.in_bdat = false,
                    Event::StartTls => {
                        start = end;
                        if !self.flush().await || !self.start_tls().await {
                            return;
                        }
                        self.proto.tls_established();
                    }
                    Event::Close => {
                        self.flush().await;
                        return;
                    }
                    Event::Flush => {
                        if !self.flush().await {
                            return;
                        }
                    }
                }
            }
            if !self.flush().await {
                return;
            }
            if start == end {
                (start, end) = (0, 0);
            } else if end == buf.len() {
                buf.copy_within(start..end, 0);
                (start, end) = (0, end - start);
            }
            match self.read(&mut buf[end..]).await {
                Wake::Read(Ok(0)) | Wake::Read(Err(_)) => return,
                Wake::Read(Ok(n)) => end += n,
                Wake::Timeout => {
                    Slot::add(&self.core.slot().timeouts, 1);
                    self.proto.timeout();
                    self.flush().await;
                    return;
                }
                Wake::Stop => {
                    self.proto.shutdown();
                    self.flush().await;
                    return;
                }
            }
        }
    }

    async fn read(&mut self, into: &mut [u8]) -> Wake {
        let core = self.core.clone();
        let stoppable = !self.proto.in_body();
        let timeout = self.core.shared.timeout;
        let read = async { Wake::Read(self.conn.read(into).await) };
        let expire = async {
            glommio::timer::sleep(timeout).await;
            Wake::Timeout
        };
        let stop = async {
            if stoppable {
                core.stopped().await;
                Wake::Stop
            } else {
                future::pending().await
            }
        };
        future::or(read, future::or(expire, stop)).await
    }

    /// Counts the end-of-data reply of a message refused since the last call, if any.
    fn count_refused(&mut self) {
        if let Some(refused) = self.proto.take_refused() {
            if let Some(i) = self.core.shared.counters.code_index(refused.code) {
                Slot::add(&self.core.slot().replies[i], 1);
            }
        }
    }

    /// Settles an end of data; false when the connection is to be dropped.
    async fn data_end(&mut self) -> bool {
        let slot_bytes = self.body_len;
        Slot::add(&self.core.slot().bytes_received, slot_bytes);
        self.on_connection += 1;
        let faults = &self.core.shared.faults;
        // One count for the whole sink, taken only when a mix needs it (a shared write per
        // message otherwise costs the reference server for nothing), and not for a message
        // dropped unanswered: the shares are of the replies given.
        let dropped = faults.drop_after.is_some_and(|d| self.on_connection >= d);
        let n = if faults.mix.is_some() && !dropped {
            self.core
                .shared
                .decisions
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        } else {
            0
        };
        let verdict = faults.verdict(n, self.on_connection);
        if let Some(delay) = faults.delay {
            // An earlier message pipelined before this one gets its reply before the wait.
            if self.reply_owed && !self.flush().await {
                return false;
            }
            glommio::timer::sleep(delay).await;
        }
        let counters = &self.core.shared.counters;
        self.reply_owed = true;
        match verdict {
            Verdict::Drop => {
                Slot::add(&self.core.slot().dropped, 1);
                // The replies owed for what came before this end of data (earlier messages
                // pipelined in the same read, BDAT chunks) go out first: only this one goes
                // unanswered.
                self.flush().await;
                false
            }
            Verdict::Accept(code) => {
                let slot = self.core.slot();
                Slot::add(&slot.messages, 1);
                Slot::add(&slot.bytes, slot_bytes);
                if let Some(i) = counters.code_index(code) {
                    Slot::add(&slot.replies[i], 1);
                }
                if self.core.recording() {
                    self.scan.line(&mut self.core.record.borrow_mut());
                    self.core.flush_record(false);
                }
                // Unique within the run: the executor, then its own count (the mix's shared
                // count `n` is taken only with a mix).
                let seq = self.core.accepted.get();
                self.core.accepted.set(seq + 1);
                let id = format!("{:X}{:08X}", self.core.id, seq);
                self.proto.message_queued(&id);
                true
            }
            Verdict::Refuse(reply) => {
                self.proto.message_failed(reply);
                self.count_refused();
                if reply.code == 421 {
                    // 421 closes the channel (RFC 5321 3.8): nothing after it is read.
                    self.flush().await;
                    return false;
                }
                true
            }
        }
    }

    /// Writes out the pending replies; false when the connection is gone.
    async fn flush(&mut self) -> bool {
        if self.proto.output().is_empty() {
            return true;
        }
        // The messages these replies accept are recorded before the replies go out.
        self.core.flush_record(true);
        let ok = self.conn.write_all(self.proto.output()).await.is_ok()
            && self.conn.flush().await.is_ok();
        self.proto.clear_output();
        self.reply_owed = false;
        ok
    }

    async fn start_tls(&mut self) -> bool {
        let Some(acceptor) = self.core.shared.tls.clone() else {
            return false;
        };
        let Some(tcp) = self.conn.take_plain() else {
            return false;
        };
        let timeout = self.core.shared.timeout;
        let handshake = async { Some(acceptor.accept(tcp).await) };
        let expire = async {
            glommio::timer::sleep(timeout).await;
            None
        };
        match future::or(handshake, expire).await {
            Some(Ok(tls)) => {
                self.conn = Conn::Tls(Box::new(futures_rustls::TlsStream::Server(tls)));
                Slot::add(&self.core.slot().tls_handshakes, 1);
                true
            }
            _ => {
                Slot::add(&self.core.slot().tls_failures, 1);
                false
            }
        }
    }
}

/// Replies `250` written inside a BDAT body: each answers a chunk before the last (the first
/// chunk is counted at its start, the last one ends the body). A NOOP between chunks would be
/// counted too; postern-load never sends one.
fn chunk_acks(replies: &[u8]) -> u64 {
    replies
        .split(|&b| b == b'\n')
        .filter(|line| line.starts_with(b"250 "))
        .count() as u64
}
