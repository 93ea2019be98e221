//! The delivery engine of one core, in two roles.
//!
//! As an **owner**, a core tracks the messages its sessions accepted (and the ones recovery
//! found in its spool): it routes their recipients, groups them by next hop, and hands one
//! [`Job`] per next hop to the shard that owns the next hop, through the lock-free
//! [`Mailboxes`]. Outcomes come back the same way; the owner writes each as a status record
//! to its own spool, makes the bounce when recipients failed, and once every recipient is
//! final and durable tells the spool to forget the message.
//!
//! As a **shard**, a core delivers the jobs of the next hops that hash to it: one queue per
//! next hop, up to `max_per_destination` connections, reused for the next job while there is
//! one, and a passive [`Schedule`] of deferred jobs for their retry time.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use event_listener::{Event, IntoNotification};
use futures_lite::future;
use postern_proto::client::{BodyMode, ClientError, OutRecipient, Transaction, TransactionResult};
use postern_proto::{Notify, Reply};
use postern_queue::{shard_of, Depth, Mailboxes, RetryDecision, RetryPolicy, Schedule, Watermarks};
use postern_server::delivery::{Accepted, CoreHandle, Delivery, DeliveryFactory, Outcome};
use postern_spool::{DeliveryState, MessageMeta, MessageRef, Recipient, RecoveredMessage, Status};

use crate::conn::{ConnError, Outbound, Timeouts, TlsSetup};
use crate::dsn;
use crate::mx::{MxError, NextHop, Resolver};
use crate::route::{Destination, Router};
use crate::tls::{TlsClients, TlsPolicy};

/// The relay's settings.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Our name in EHLO and in bounces.
    pub hostname: String,
    /// Routes and smarthost.
    pub router: Router,
    /// A DNS server to ask instead of /etc/resolv.conf.
    pub dns_server: Option<SocketAddr>,
    /// The port of MX hosts (25; other values for tests and labs).
    pub mx_port: u16,
    /// Where this server takes SMTP (its `--listen` addresses): an MX host reached at one of
    /// them is this server (RFC 5321 section 5.1, docs/delivery.md).
    pub own_addrs: Vec<SocketAddr>,
    /// Retry schedule and queue lifetime.
    pub retry: RetryPolicy,
    /// Warn the sender when a message is still queued after this long (off when None).
    pub delay_warning: Option<Duration>,
    /// Concurrent connections per next hop.
    pub max_per_destination: usize,
    /// Outbound connections of all next hops together (each core takes its share).
    pub max_outbound: usize,
    /// Transactions pipelined into each other on one connection, where the next hop offers
    /// PIPELINING and CHUNKING; 1 sends one transaction per round trip.
    pub max_in_flight: usize,
    /// How long an idle connection waits for the next message before QUIT.
    pub idle_timeout: Duration,
    /// STARTTLS towards next hops.
    pub tls: TlsPolicy,
    /// Extra trust anchors for required TLS.
    pub tls_ca: Option<std::path::PathBuf>,
    /// Client timeouts.
    pub timeouts: Timeouts,
    /// Queue depth (messages not yet final) at which accepting stops; 0 for no limit.
    pub queue_high_water: u64,
    /// Queue depth at which accepting starts again.
    pub queue_low_water: u64,
    /// The most octets of a message returned in a bounce.
    pub bounce_max_returned: usize,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            hostname: "localhost".into(),
            router: Router::default(),
            dns_server: None,
            mx_port: 25,
            own_addrs: Vec::new(),
            retry: RetryPolicy::default(),
            delay_warning: None,
            max_per_destination: 16,
            max_outbound: 1000,
            max_in_flight: 1,
            idle_timeout: Duration::from_secs(10),
            tls: TlsPolicy::Opportunistic,
            tls_ca: None,
            timeouts: Timeouts::default(),
            queue_high_water: 1_000_000,
            queue_low_water: 800_000,
            bounce_max_returned: 128 * 1024,
        }
    }
}

/// A message on its way, shared by the jobs of its next hops (no copy of the body).
#[derive(Debug)]
struct Msg {
    queue_id: String,
    owner: usize,
    meta: MessageMeta,
    body: MessageRef,
}

/// The recipients of one message that go to one next hop.
#[derive(Debug)]
struct Job {
    msg: Arc<Msg>,
    rcpts: Vec<u32>,
    dest: Destination,
    /// Failed attempts so far.
    failures: u32,
    /// Not before this time (ms since the epoch).
    not_before: u64,
    /// The next hop of the latest attempt offered DSN, so the DSN parameters went on with the
    /// message (and success reports are that hop's business).
    hop_dsn: bool,
    /// Addresses of the next hop that broke off or put off this attempt: its next connection
    /// goes elsewhere (see `pass_over`).
    tried: Vec<SocketAddr>,
}

/// A job passed over to another address of its next hop, with what the last one said, for
/// when no other address takes it.
struct Carried {
    job: Job,
    status: String,
    text: String,
    /// Each recipient's own reply, in the order of `job.rcpts`, when they differ (RCPT
    /// replies); empty when `text` is every recipient's.
    texts: Vec<String>,
    remote: Option<String>,
}

/// What a carried job brings besides itself: the answer it is deferred with if no other
/// address takes it.
struct Note {
    status: String,
    text: String,
    texts: Vec<String>,
    remote: Option<String>,
}

impl Carried {
    fn split(self) -> (Job, Note) {
        let Carried {
            job,
            status,
            text,
            texts,
            remote,
        } = self;
        (
            job,
            Note {
                status,
                text,
                texts,
                remote,
            },
        )
    }
}

impl Note {
    fn with(self, job: Job) -> Carried {
        Carried {
            job,
            status: self.status,
            text: self.text,
            texts: self.texts,
            remote: self.remote,
        }
    }
}

/// A connection `open` made.
struct Opened {
    conn: Outbound,
    /// Addresses that could not be reached or refused the session on the way.
    failed: Vec<SocketAddr>,
    /// The address is of a less preferred MX host than the best: the connection is used for
    /// a while only, so that the better host gets mail again once it is back.
    fallback: bool,
}

/// Addresses tried within one attempt of a job at most (as Postfix's
/// `smtp_mx_address_limit`): a domain with many addresses that all put mail off costs a
/// bounded number of connections per attempt.
const MAX_ADDRESSES_PER_ATTEMPT: usize = 5;

/// How an idle connection's wait ended.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Idle {
    /// A job came.
    Job,
    /// Another next hop waits in line for a connection.
    Wanted,
    /// The idle timeout, or the stop.
    Over,
}

/// How long a connection stays idle before it gives its place to a next hop whose
/// connections have a backlog (to one with none, at once).
const IDLE_GRACE: Duration = Duration::from_secs(1);

/// How long a next hop's only connection keeps its place past the core's share of outbound
/// connections while another next hop waits in line for one.
const TURN: Duration = Duration::from_secs(30);

/// What a worker does with its connection after a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum After {
    /// Use it for the next job.
    Keep,
    /// It broke: drop it.
    Broken,
    /// It works, but the job goes to another address: QUIT, then connect elsewhere.
    Elsewhere,
}

#[derive(Debug)]
enum Result_ {
    /// `relayed`: the next hop offers no DSN, so a success report, if asked for, is ours.
    Delivered {
        relayed: bool,
    },
    Deferred {
        next_attempt: u64,
        /// postern's status for the deferral when its reply holds none (4.4.1, 4.4.2).
        status: String,
    },
    Failed {
        status: String,
    },
}

/// One recipient's outcome, on its way back to the owner.
#[derive(Debug)]
struct Report {
    queue_id: String,
    rcpt: u32,
    result: Result_,
    reply: String,
    remote: Option<String>,
}

/// What all cores share.
pub struct Relay {
    config: RelayConfig,
    cores: usize,
    jobs: Mailboxes<Job>,
    /// Outcomes, by owner: those of one job go together, so the owner settles them in one
    /// batch (a transaction that failed every recipient makes one bounce, not one per
    /// batch the owner happened to take them out in).
    reports: Mailboxes<Vec<Report>>,
    depth: Depth,
    marks: Watermarks,
    resolver: Resolver,
    tls: TlsClients,
    recovered: Mutex<Vec<RecoveredMessage>>,
    /// Outbound transactions running, on all cores: a stopping core waits for them to end and
    /// their outcomes to be recorded.
    in_flight: AtomicUsize,
    /// Cores that have begun to wind down (they start no new transaction).
    winding_down: AtomicUsize,
    /// How many times the operator asked to try deferred mail now ([`Relay::flush`]).
    flushes: AtomicU64,
    /// Wakes every core's retry loop when a flush is asked for (from any thread).
    flush_asked: Event,
}

/// Counts an outbound transaction in [`Relay::in_flight`] while it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        InFlight(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How often a stopping core looks whether the deliveries in flight on every core are over.
const WIND_DOWN_POLL: Duration = Duration::from_millis(5);

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("cores", &self.cores).finish()
    }
}

/// How long replies are read for after a write to the next hop failed.
const AFTER_WRITE_FAILURE: Duration = Duration::from_secs(2);

/// How long a next hop gets one transaction per round trip after a connection to it broke in
/// the middle of pipelined transactions.
const SERIAL_AFTER_BREAK: Duration = Duration::from_secs(60);

/// The most replies (RSET, MAIL, each RCPT, BDAT) awaited at once on a connection that
/// pipelines transactions; a few dozen octets each.
const MAX_PIPELINED_REPLIES: usize = 512;

/// A message's arrival in milliseconds since the epoch, for its queue lifetime and delay
/// warning. The spool keeps the arrival in whole seconds, so the end of that second is taken:
/// a lifetime may run up to a second long, never short.
fn arrival_ms(meta: &MessageMeta) -> u64 {
    meta.arrival.saturating_mul(1000).saturating_add(999)
}

/// Whether a message's header section (up to its first empty line) is all ASCII.
fn headers_are_ascii(body: &MessageRef) -> bool {
    #[derive(Clone, Copy)]
    enum At {
        LineStart,
        CrAtLineStart,
        InLine,
    }
    let mut at = At::LineStart;
    for chunk in body.chunks() {
        for &b in chunk {
            if b > 0x7f {
                return false;
            }
            at = match (at, b) {
                (At::LineStart | At::CrAtLineStart, b'\n') => return true,
                (At::LineStart, b'\r') => At::CrAtLineStart,
                (_, b'\n') => At::LineStart,
                _ => At::InLine,
            };
        }
    }
    true
}

/// Starts `task` on this core, to run once the caller is back in the executor. glommio's
/// `spawn_local` polls a new task at once, inside the caller: up to its first wait, the task
/// would run while the caller still holds its borrows (of the tracked messages, of a
/// destination's queue), and a task that takes one of them then (a bounce owed to nobody
/// settles without waiting for anything) would panic the core.
fn spawn_detached(task: impl std::future::Future<Output = ()> + 'static) {
    glommio::spawn_local(async move {
        future::yield_now().await;
        task.await;
    })
    .detach();
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Relay {
    /// The relay for `cores` cores, with the messages recovery found still to deliver.
    pub fn new(
        config: RelayConfig,
        cores: usize,
        recovered: Vec<RecoveredMessage>,
    ) -> Result<Arc<Relay>, String> {
        let resolver = match config.dns_server {
            Some(addr) => Resolver::with_server(addr),
            None => Resolver::system(),
        }
        .map_err(|e| {
            format!(
                "cannot start the DNS resolver for MX lookups ({e}); fix /etc/resolv.conf or \
                 pass --dns-server ADDR"
            )
        })?;
        let tls = TlsClients::new(config.tls_ca.as_deref())?;
        let cores = cores.max(1);
        Ok(Arc::new(Relay {
            marks: Watermarks::new(config.queue_high_water, config.queue_low_water),
            config,
            cores,
            jobs: Mailboxes::new(cores),
            reports: Mailboxes::new(cores),
            depth: Depth::new(cores),
            resolver,
            tls,
            recovered: Mutex::new(recovered),
            in_flight: AtomicUsize::new(0),
            winding_down: AtomicUsize::new(0),
            flushes: AtomicU64::new(0),
            flush_asked: Event::new(),
        }))
    }

    /// The factory the server calls on each core.
    pub fn factory(self: &Arc<Self>) -> DeliveryFactory {
        let relay = self.clone();
        Arc::new(move |handle: CoreHandle| -> Rc<dyn Delivery> {
            let core = CoreRelay::start(relay.clone(), handle);
            core as Rc<dyn Delivery>
        })
    }

    /// Asks every core to try its deferred mail now (SIGUSR1, `postern queue --flush`): the
    /// jobs waiting for a retry go at once, and next hops paused after failures are tried
    /// again. Every core's retry loop is woken at once. Retry counts stay as they are.
    pub fn flush(&self) {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.flush_asked.notify(usize::MAX);
    }

    /// Messages not yet final, all cores together.
    pub fn queue_depth(&self) -> u64 {
        self.depth.total()
    }
}

/// How long a bounce that could not be spooled waits before it is tried again.
const BOUNCE_RETRY: Duration = Duration::from_secs(10);

/// A recipient failed for good: (recipient, reply, next hop, status, when).
type Failure = (u32, String, Option<String>, String, u64);

/// A recipient deferred past `--delay-warning`: (recipient, reply, next hop, status).
type Delay = (u32, String, Option<String>, String);

impl Tracked {
    /// Marks `rcpt` as warned of its delay; false if it already was.
    fn warn_once(&mut self, rcpt: u32) -> bool {
        let (word, bit) = ((rcpt / 64) as usize, 1u64 << (rcpt % 64));
        if self.warned.len() <= word {
            self.warned.resize(word + 1, 0);
        }
        let first = self.warned[word] & bit == 0;
        self.warned[word] |= bit;
        first
    }

    /// Takes `rcpt`'s mark of [`Tracked::warn_once`] back: its warning was not made.
    fn unwarn(&mut self, rcpt: u32) {
        if let Some(word) = self.warned.get_mut((rcpt / 64) as usize) {
            *word &= !(1u64 << (rcpt % 64));
        }
    }
}

/// A report being made (a bounce, a delay warning, a success report for a recipient relayed
/// to a next hop without DSN) or a message being finished, counted in
/// `CoreRelay::reporting` from when its task is spawned until it ends: a stop waits for it.
struct Reporting(Rc<CoreRelay>);

impl Reporting {
    fn new(core: &Rc<CoreRelay>) -> Self {
        core.reporting.set(core.reporting.get() + 1);
        Reporting(core.clone())
    }
}

impl Drop for Reporting {
    fn drop(&mut self) {
        self.0.reporting.set(self.0.reporting.get() - 1);
    }
}

/// The owner's record of a message not yet final.
struct Tracked {
    msg: Arc<Msg>,
    /// Recipients without a final outcome.
    pending: usize,
    /// Recipients failed for good, waiting for the bounce.
    failed: Vec<Failure>,
    /// A bounce for some failed recipients is being made while others are still pending;
    /// the message is finished only after it.
    bouncing: bool,
    /// Recipients that asked for success reports (NOTIFY=SUCCESS) and were relayed to a next
    /// hop without DSN: (recipient, reply, next hop, when).
    relayed: Vec<(u32, String, Option<String>, u64)>,
    /// Recipients already sent a delay warning (a bit each; empty until the first).
    warned: Vec<u64>,
    /// A status record could not be written (the spool's disk is full): the outcome is known
    /// here but not on disk. The message is still forgotten once every recipient is settled,
    /// so its segments can be reclaimed; a crash before that delivers it again (a duplicate,
    /// never a loss). Keeping it instead would keep the disk full for good.
    unrecorded: bool,
}

/// Deliveries waiting for one next hop, and its connections.
struct DestQueue {
    dest: Destination,
    ready: RefCell<VecDeque<Job>>,
    workers: Cell<usize>,
    idle: Cell<usize>,
    arrived: Event,
    /// Waiting in the core's `starved` list for a connection the core's cap held back.
    starved: Cell<bool>,
    /// In the core's `wanting_more` list: it has connections, and jobs they do not take.
    wanting_more: Cell<bool>,
    /// A failed opportunistic TLS handshake: cleartext until then (ms).
    cleartext_until: Cell<u64>,
    /// The next hop could not be reached: jobs wait until then (ms) instead of each trying
    /// to connect again.
    down_until: Cell<u64>,
    /// A connection broke in the middle of pipelined transactions: one transaction per round
    /// trip until then (ms).
    serial_until: Cell<u64>,
    /// The addresses the next hop resolved to at the latest connection, in preference order.
    addrs: RefCell<Vec<SocketAddr>>,
    /// Addresses passed over until then (ms): they broke off or put off a transaction.
    avoid: RefCell<HashMap<SocketAddr, u64>>,
    /// Addresses that could not be reached or broke a connection off (421, closed, timed
    /// out), until then (ms). When every address of the next hop is here, the next hop as a
    /// whole is paused (`down_until`).
    broke: RefCell<HashMap<SocketAddr, u64>>,
    /// Connections in a row, since a transaction was last answered, that could not be made
    /// or broke off.
    broken_in_a_row: Cell<u32>,
    /// When a connection last failed (ms).
    last_broke: Cell<u64>,
    /// Why the next hop is paused (status, text, remote), while `down_until` lasts.
    paused_for: RefCell<Option<(String, String, Option<String>)>>,
}

/// One core's relay.
pub struct CoreRelay {
    relay: Arc<Relay>,
    handle: CoreHandle,
    id: usize,
    tracked: RefCell<HashMap<String, Tracked>>,
    dests: RefCell<HashMap<String, Rc<DestQueue>>>,
    retry: RefCell<Schedule<Job>>,
    retry_changed: Event,
    /// The last [`Relay::flushes`] this core acted on.
    flushes_seen: Cell<u64>,
    /// Messages with relayed recipients whose success report is still to be made.
    relayed_waiting: RefCell<Vec<String>>,
    /// Messages with failed recipients whose bounce is still to be made.
    failed_waiting: RefCell<Vec<String>>,
    /// Recipients deferred past `--delay-warning` in this batch of outcomes, by message.
    delays_waiting: RefCell<Vec<(String, Delay)>>,
    /// Bounces being made and messages being finished: a graceful stop waits for them, so
    /// that their statuses are recorded and the next run does not repeat them.
    reporting: Cell<usize>,
    /// When a failed sync of settled statuses was last logged (at most once a minute).
    sync_warned: Cell<Option<std::time::Instant>>,
    /// Outbound connections of this core (workers, from their start to their end).
    outbound: Cell<usize>,
    /// Next hops with jobs waiting that got no connection for the core's cap, in the order
    /// they asked: each connection that ends goes to the first.
    starved: RefCell<VecDeque<Rc<DestQueue>>>,
    /// Told when a next hop is starved: idle connections of others give up their place.
    slot_wanted: Event,
    /// Connections counted out (see `leave`) still waiting for their QUIT's reply.
    quitting: Cell<usize>,
    /// Next hops that have connections and wanted more when the core had none to give: a
    /// place no next hop in line takes goes to the first of them.
    wanting_more: RefCell<VecDeque<Rc<DestQueue>>>,
}

impl Delivery for CoreRelay {
    fn accepted(&self, message: Accepted) {
        let msg = Arc::new(Msg {
            queue_id: message.queue_id,
            owner: self.id,
            meta: message.meta,
            body: message.body,
        });
        let all: Vec<u32> = (0..msg.meta.recipients.len() as u32).collect();
        self.track(msg.clone(), all.len());
        self.dispatch(&msg, &all, 0, 0);
    }

    fn accepting(&self) -> bool {
        self.relay.marks.accepting(self.relay.depth.total())
    }

    fn wind_down(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>> {
        Box::pin(async move {
            // A core notices the stop on its own tick, so until every core winds down, one
            // may still start a transaction whose outcome comes here. Once all do, none
            // starts (a worker checks its core's stop and counts itself in flight in one
            // step), and a transaction's reports are sent before it stops counting: then
            // every outcome is in its owner's inbox, and the report loop records it (appends
            // its status) in the same step as it takes it out.
            self.relay.winding_down.fetch_add(1, Ordering::SeqCst);
            let inbox = self.relay.reports.get(self.id);
            while self.relay.winding_down.load(Ordering::SeqCst) < self.relay.cores
                || self.relay.in_flight.load(Ordering::SeqCst) > 0
                || !inbox.is_empty()
                || self.reporting.get() > 0
            {
                glommio::timer::sleep(WIND_DOWN_POLL).await;
            }
        })
    }

    fn in_flight(&self) -> usize {
        self.relay.in_flight.load(Ordering::SeqCst)
    }
}

impl CoreRelay {
    fn start(relay: Arc<Relay>, handle: CoreHandle) -> Rc<CoreRelay> {
        let id = handle.id();
        let core = Rc::new(CoreRelay {
            relay,
            handle,
            id,
            tracked: RefCell::new(HashMap::new()),
            dests: RefCell::new(HashMap::new()),
            retry: RefCell::new(Schedule::new()),
            retry_changed: Event::new(),
            flushes_seen: Cell::new(0),
            relayed_waiting: RefCell::new(Vec::new()),
            failed_waiting: RefCell::new(Vec::new()),
            delays_waiting: RefCell::new(Vec::new()),
            reporting: Cell::new(0),
            sync_warned: Cell::new(None),
            outbound: Cell::new(0),
            starved: RefCell::new(VecDeque::new()),
            slot_wanted: Event::new(),
            quitting: Cell::new(0),
            wanting_more: RefCell::new(VecDeque::new()),
        });
        glommio::spawn_local(core.clone().job_loop()).detach();
        glommio::spawn_local(core.clone().report_loop()).detach();
        glommio::spawn_local(core.clone().retry_loop()).detach();
        glommio::spawn_local(core.clone().housekeeping()).detach();
        core.resume_recovered();
        core
    }

    /// Takes this core's share of what recovery found: messages whose owner is this core (or,
    /// when there are fewer cores than before, whose owner maps to it).
    fn resume_recovered(&self) {
        let mine: Vec<RecoveredMessage> = match self.relay.recovered.lock() {
            Ok(mut all) => {
                let (mine, rest) = std::mem::take(&mut *all)
                    .into_iter()
                    .partition(|m| m.core as usize % self.relay.cores == self.id);
                *all = rest;
                mine
            }
            Err(_) => return,
        };
        for m in mine {
            if m.is_final() {
                continue;
            }
            let msg = Arc::new(Msg {
                queue_id: m.queue_id.clone(),
                owner: self.id,
                meta: m.meta.clone(),
                body: m.body().clone(),
            });
            let mut now_rcpts = Vec::new();
            let mut later: HashMap<u64, Vec<u32>> = HashMap::new();
            let (arrival, now) = (arrival_ms(&msg.meta), now_ms());
            for (i, s) in m.statuses.iter().enumerate() {
                match s.as_ref().map(|s| &s.state) {
                    None => now_rcpts.push(i as u32),
                    Some(DeliveryState::Deferred { next_attempt }) => later
                        .entry(self.relay.config.retry.resume_at(
                            arrival,
                            next_attempt.saturating_mul(1000),
                            now,
                        ))
                        .or_default()
                        .push(i as u32),
                    Some(_) => {}
                }
            }
            let pending = now_rcpts.len() + later.values().map(Vec::len).sum::<usize>();
            self.track(msg.clone(), pending);
            self.dispatch(&msg, &now_rcpts, 0, 0);
            for (at, rcpts) in later {
                self.dispatch(&msg, &rcpts, 1, at);
            }
        }
    }

    fn track(&self, msg: Arc<Msg>, pending: usize) {
        self.tracked.borrow_mut().insert(
            msg.queue_id.clone(),
            Tracked {
                msg,
                pending,
                failed: Vec::new(),
                bouncing: false,
                relayed: Vec::new(),
                warned: Vec::new(),
                unrecorded: false,
            },
        );
        self.publish_depth();
    }

    fn publish_depth(&self) {
        let n = self.tracked.borrow().len() as u64;
        self.relay.depth.set(self.id, n);
        self.handle.set_queue_depth(n);
    }

    /// Routes recipients `rcpts` of `msg` and sends one job per next hop to its shard.
    fn dispatch(&self, msg: &Arc<Msg>, rcpts: &[u32], failures: u32, not_before: u64) {
        let mut groups: Vec<(Destination, Vec<u32>)> = Vec::new();
        let mut unrouted = Vec::new();
        for &i in rcpts {
            let Some(r) = msg.meta.recipients.get(i as usize) else {
                continue;
            };
            match self.relay.config.router.route(&r.path) {
                Some(dest) => match groups.iter_mut().find(|(d, _)| *d == dest) {
                    Some((_, v)) => v.push(i),
                    None => groups.push((dest, vec![i])),
                },
                None => unrouted.push(Report {
                    queue_id: msg.queue_id.clone(),
                    rcpt: i,
                    result: Result_::Failed {
                        status: "5.1.2".into(),
                    },
                    reply: "no route to this recipient (no domain and no relay host)".into(),
                    remote: None,
                }),
            }
        }
        if !unrouted.is_empty() {
            self.relay.reports.send(self.id, unrouted);
        }
        for (dest, rcpts) in groups {
            let shard = shard_of(&dest.key(), self.relay.cores);
            tracing::debug!(queue_id = %msg.queue_id, %dest, shard, recipients = rcpts.len(), "queued for delivery");
            self.relay.jobs.send(
                shard,
                Job {
                    msg: msg.clone(),
                    rcpts,
                    dest,
                    failures,
                    not_before,
                    hop_dsn: false,
                    tried: Vec::new(),
                },
            );
        }
    }

    // ----- shard side -----

    async fn job_loop(self: Rc<Self>) {
        let inbox = self.relay.jobs.get(self.id);
        loop {
            while let Some(job) = inbox.pop() {
                tracing::debug!(queue_id = %job.msg.queue_id, core = self.id, "job received");
                if job.not_before > now_ms() {
                    self.schedule(job);
                } else {
                    self.enqueue(job);
                }
            }
            if self.handle.is_stopping() {
                return;
            }
            future::or(inbox.wait(), self.handle.stopped()).await;
        }
    }

    fn schedule(&self, job: Job) {
        let at = job.not_before;
        let earlier = self.retry.borrow().next_deadline().is_none_or(|d| at < d);
        self.retry.borrow_mut().insert(at, job);
        if earlier {
            self.retry_changed.notify(1);
        }
    }

    async fn retry_loop(self: Rc<Self>) {
        loop {
            let listener = self.retry_changed.listen();
            // Listening before looking: a flush asked for in between still wakes the loop.
            let flushed = self.relay.flush_asked.listen();
            self.flush_if_asked();
            let now = now_ms();
            // Taken out before any goes on: a job that `enqueue` puts back (its next hop is
            // paused until a time this reading of the clock has passed but its own has not,
            // as after a step back of the clock) waits for the next pass, not this one.
            let due: Vec<Job> = {
                let mut retry = self.retry.borrow_mut();
                std::iter::from_fn(|| retry.pop_due(now)).collect()
            };
            for job in due {
                self.enqueue(job);
            }
            let wait = self
                .retry
                .borrow()
                .next_deadline()
                .map_or(Duration::from_secs(3600), |d| {
                    Duration::from_millis(d.saturating_sub(now))
                });
            if self.handle.is_stopping() {
                return;
            }
            future::or(
                future::or(future::or(listener, flushed), glommio::timer::sleep(wait)),
                self.handle.stopped(),
            )
            .await;
        }
    }

    /// Acts on a flush asked for since the last look: every next hop's pause and passed-over
    /// addresses are forgotten, and every job waiting for its retry goes now.
    fn flush_if_asked(self: &Rc<Self>) {
        let asked = self.relay.flushes.load(Ordering::SeqCst);
        if asked == self.flushes_seen.replace(asked) {
            return;
        }
        for dq in self.dests.borrow().values() {
            dq.down_until.set(0);
            dq.paused_for.borrow_mut().take();
            dq.avoid.borrow_mut().clear();
            dq.broke.borrow_mut().clear();
            dq.broken_in_a_row.set(0);
        }
        let jobs: Vec<Job> = self.retry.borrow_mut().drain().collect();
        tracing::info!(
            core = self.id,
            jobs = jobs.len(),
            "flush: deferred mail is tried now"
        );
        for job in jobs {
            self.enqueue(Job {
                not_before: 0,
                ..job
            });
        }
    }

    fn enqueue(self: &Rc<Self>, job: Job) {
        let key = job.dest.key();
        let dq = self
            .dests
            .borrow_mut()
            .entry(key)
            .or_insert_with(|| {
                Rc::new(DestQueue {
                    dest: job.dest.clone(),
                    ready: RefCell::new(VecDeque::new()),
                    workers: Cell::new(0),
                    idle: Cell::new(0),
                    arrived: Event::new(),
                    starved: Cell::new(false),
                    wanting_more: Cell::new(false),
                    cleartext_until: Cell::new(0),
                    down_until: Cell::new(0),
                    serial_until: Cell::new(0),
                    addrs: RefCell::new(Vec::new()),
                    avoid: RefCell::new(HashMap::new()),
                    broke: RefCell::new(HashMap::new()),
                    broken_in_a_row: Cell::new(0),
                    last_broke: Cell::new(0),
                    paused_for: RefCell::new(None),
                })
            })
            .clone();
        let down_until = dq.down_until.get();
        // A job whose lifetime ends before the next hop's pause does gets its last attempt
        // now, not after the pause.
        let expiry = self.relay.config.retry.expiry(arrival_ms(&job.msg.meta));
        if down_until > now_ms() && expiry > down_until {
            self.schedule(Job {
                not_before: down_until,
                ..job
            });
            return;
        }
        dq.ready.borrow_mut().push_back(job);
        if dq.idle.get() > 0 {
            // One more idle connection for each job: a plain `notify(1)` wakes no second one
            // while the first has not run yet, and jobs queued in one go (a flush, retries
            // come due together) would all wait for that one.
            dq.arrived.notify(1.additional());
        }
        if dq.ready.borrow().len() > dq.idle.get() && dq.workers.get() < self.most_workers(&dq) {
            self.start_worker(&dq);
        }
    }

    /// This core's share of `--max-outbound-connections`.
    fn most_outbound(&self) -> usize {
        (self.relay.config.max_outbound / self.relay.cores.max(1)).max(1)
    }

    /// Starts a connection to `dq`'s next hop, unless the core has its share of outbound
    /// connections: then a next hop without any connection waits in line for the first to
    /// end (one that has connections goes on with those), and this returns false.
    fn start_worker(self: &Rc<Self>, dq: &Rc<DestQueue>) -> bool {
        if self.handle.is_stopping() {
            return false;
        }
        if self.outbound.get() >= self.most_outbound() {
            if dq.workers.get() == 0 {
                if !dq.starved.replace(true) {
                    self.starved.borrow_mut().push_back(dq.clone());
                    // One idle connection of another next hop ends for it.
                    self.slot_wanted.notify(1.additional());
                }
            } else if dq.ready.borrow().len() > dq.workers.get() {
                if !dq.wanting_more.replace(true) {
                    self.wanting_more.borrow_mut().push_back(dq.clone());
                }
                // An idle connection of another next hop ends for it (one at a time: each
                // that does wakes the next while the backlog lasts, see `leave`).
                self.slot_wanted.notify(1);
            }
            return false;
        }
        self.outbound.set(self.outbound.get() + 1);
        dq.workers.set(dq.workers.get() + 1);
        spawn_detached(self.clone().worker(dq.clone()));
        true
    }

    /// A worker of `dq` leaves (counted out before its QUIT, so that decisions meanwhile see
    /// it gone): its place goes to the first next hop waiting in line, and when its own next
    /// hop still has jobs that no connection will take, that one asks for a connection again
    /// (at the back of the line when the core is at its share).
    fn leave(self: &Rc<Self>, dq: &Rc<DestQueue>) {
        dq.workers.set(dq.workers.get() - 1);
        self.outbound.set(self.outbound.get() - 1);
        if self.handle.is_stopping() {
            // No new connection once the server stops.
            return;
        }
        let mut given = false;
        loop {
            let Some(next) = self.starved.borrow_mut().pop_front() else {
                break;
            };
            next.starved.set(false);
            if next.workers.get() == 0 && !next.ready.borrow().is_empty() {
                given = self.start_worker(&next);
                break;
            }
        }
        if dq.ready.borrow().len() > dq.idle.get() && dq.workers.get() < self.most_workers(dq) {
            given |= self.start_worker(dq);
        }
        while !given {
            let Some(next) = self.wanting_more.borrow_mut().pop_front() else {
                break;
            };
            next.wanting_more.set(false);
            if next.ready.borrow().len() > next.idle.get()
                && next.workers.get() < self.most_workers(&next)
            {
                given = self.start_worker(&next);
                if !given {
                    break;
                }
                // Still more jobs than connections: first in line for the next place, and
                // the next idle connection is asked for it.
                if next.ready.borrow().len() > next.workers.get()
                    && next.workers.get() < self.most_workers(&next)
                    && !next.wanting_more.replace(true)
                {
                    self.wanting_more.borrow_mut().push_front(next.clone());
                    self.slot_wanted.notify(1.additional());
                }
            }
        }
    }

    /// Whether a next hop with jobs waits in line for a connection.
    fn someone_starved(&self) -> bool {
        self.starved
            .borrow()
            .iter()
            .any(|d| d.workers.get() == 0 && !d.ready.borrow().is_empty())
    }

    /// Whether a next hop waits for a place: in line, or with jobs its connections do not
    /// take (an idle connection of another next hop gives its place to either; a busy one
    /// only to a next hop in line, or two busy next hops would trade places after every
    /// transaction).
    fn someone_waiting(&self) -> bool {
        self.someone_starved() || self.someone_wanting_more()
    }

    /// Whether a next hop's connections have more jobs than they take, at the core's share.
    fn someone_wanting_more(&self) -> bool {
        self.wanting_more
            .borrow()
            .iter()
            .any(|d| self.wants_more(d))
    }

    /// Whether `dq` has more jobs waiting than connections, and room for another.
    fn wants_more(&self, dq: &DestQueue) -> bool {
        dq.ready.borrow().len() > dq.workers.get() && dq.workers.get() < self.most_workers(dq)
    }

    /// Takes the next hops that no longer want more out of `wanting_more` (their backlog
    /// went), so that the list and the next hops it keeps do not grow while the core stays
    /// at its share and every place goes to `starved`.
    fn prune_wanting_more(&self) {
        self.wanting_more.borrow_mut().retain(|d| {
            let keep = self.wants_more(d);
            d.wanting_more.set(keep);
            keep
        });
    }

    /// Ends a connection whose worker has left (see [`CoreRelay::leave`]): with QUIT and a
    /// short wait for its reply, or, while as many others as the core's share are still in
    /// that wait, without waiting, so that sockets past the cap stay bounded.
    async fn quit_after_leaving(&self, conn: Outbound) {
        if self.quitting.get() >= self.most_outbound() {
            conn.quit_now().await;
            return;
        }
        self.quitting.set(self.quitting.get() + 1);
        conn.quit().await;
        self.quitting.set(self.quitting.get() - 1);
    }

    /// Whether a connection of `dq`, open since `since`, should give its place up after its
    /// transaction: a next hop waits in line for one, and this next hop keeps another, or
    /// this one has had its turn ([`TURN`]; then its next hop goes to the back of the line).
    fn yields_place(&self, dq: &DestQueue, since: Instant) -> bool {
        (dq.workers.get() > 1 || since.elapsed() >= TURN) && self.someone_starved()
    }

    /// How many connections a next hop may have now. While the last connections to it failed
    /// (none has answered a transaction since), one at a time tries it: when a pause ends,
    /// the jobs it held come all at once, and a next hop still down costs one connection,
    /// not one per job.
    fn most_workers(&self, dq: &DestQueue) -> usize {
        if dq.broken_in_a_row.get() > 0 {
            1
        } else {
            self.relay.config.max_per_destination.max(1)
        }
    }

    /// Delivers a next hop's jobs over one connection at a time, reusing it while jobs come.
    async fn worker(self: Rc<Self>, dq: Rc<DestQueue>) {
        // Jobs this worker passed over to another address: the next connection takes them
        // first, so that no other worker sends them back to the address that put them off.
        let mut carry: Vec<Carried> = Vec::new();
        // For its turn past the core's share (see `yields_place`).
        let started = Instant::now();
        'connect: while (!carry.is_empty() || !dq.ready.borrow().is_empty())
            && !self.handle.is_stopping()
        {
            if carry.is_empty() && self.yields_place(&dq, started) {
                // About to connect again while another next hop waits in line.
                self.leave(&dq);
                return;
            }
            let tried: Vec<SocketAddr> = carry
                .iter()
                .flat_map(|c| c.job.tried.iter().copied())
                .collect();
            let failures_before = dq.broken_in_a_row.get();
            let (mut conn, fallback_until) = match self.open(&dq, &tried).await {
                Ok(Opened {
                    conn: c,
                    failed,
                    fallback,
                }) => {
                    // A carried job counts the addresses that failed on the way as tried. One
                    // whose only way on is an address it already tried, or that has tried
                    // its share, waits for its retry with the last answer.
                    for mut k in std::mem::take(&mut carry) {
                        for a in &failed {
                            if !k.job.tried.contains(a) {
                                k.job.tried.push(*a);
                            }
                        }
                        if k.job.tried.contains(&c.addr)
                            || k.job.tried.len() >= MAX_ADDRESSES_PER_ATTEMPT
                        {
                            self.settle_carried(k);
                        } else {
                            carry.push(k);
                        }
                    }
                    (c, fallback.then(|| now_ms() + self.pause_ms()))
                }
                Err((text, permanent, remote, deferred)) => {
                    for k in carry.drain(..) {
                        self.settle_carried(k);
                    }
                    // The next hop is unreachable (everything waiting for it waits again) or
                    // does not exist (everything waiting for it fails).
                    let jobs: Vec<Job> = dq.ready.borrow_mut().drain(..).collect();
                    // RFC 3463 3.5: no answer from any host (4.4.1), or a host that answered
                    // and then failed the connection (4.4.2); a reply's own status wins
                    // where the account quotes one (dsn::deferral_status).
                    let status = permanent.or(deferred).unwrap_or(if remote.is_some() {
                        "4.4.2"
                    } else {
                        "4.4.1"
                    });
                    // Refused for good by a host that answered (a 5xx to HELO): the reply's
                    // own status.
                    let status = match (permanent, &remote) {
                        (Some(_), Some(_)) => dsn::deferral_status(&text, status),
                        _ => status.to_owned(),
                    };
                    let status = status.as_str();
                    // Paused with two failures in a row, as for broken-off sessions: one
                    // refused connection to a next hop with a single address (a restart, say)
                    // defers the jobs waiting now, and the next job tries again at once.
                    // With more addresses one attempt has failed on two or more already. A
                    // name that could not be resolved (no address tried) pauses at once:
                    // every job would ask the resolver again.
                    let no_address_tried = dq.broken_in_a_row.get() == failures_before;
                    if permanent.is_none() && (dq.broken_in_a_row.get() >= 2 || no_address_tried) {
                        dq.down_until.set(now_ms() + self.pause_ms());
                        *dq.paused_for.borrow_mut() =
                            Some((status.into(), text.clone(), remote.clone()));
                        tracing::info!(
                            next_hop = %dq.dest.key(),
                            "the next hop cannot be reached ({text}); delivery to it paused for {:?}",
                            Duration::from_millis(self.pause_ms())
                        );
                    }
                    for job in jobs {
                        self.settle_all(job, permanent.is_some(), status, &text, remote.clone());
                    }
                    break;
                }
            };
            let mut used = false;
            // Connections to this next hop failed lately (this attempt's too).
            let mut after_failures = dq.broken_in_a_row.get() > 0;
            loop {
                if self.handle.is_stopping() {
                    // No new transaction once the server stops; carried jobs wait for the
                    // next run (their earlier attempt recorded nothing).
                    conn.quit().await;
                    break 'connect;
                }
                if used && conn.went_away_while_idle() {
                    // The next hop said something after the last transaction's replies (a
                    // reply too many) or closed: the next commands' replies could not be told
                    // from it. The jobs waiting go on a new connection, nothing charged.
                    tracing::debug!(remote = %conn.remote, "next hop out of step or gone between transactions");
                    continue 'connect;
                }
                used = true;
                if carry.is_empty() && fallback_until.is_some_and(|until| now_ms() >= until) {
                    // A less preferred host served long enough: see whether a better one is
                    // back (RFC 5321 5.1, preference order).
                    conn.quit().await;
                    continue 'connect;
                }
                let (job, note) = if carry.is_empty() {
                    (dq.ready.borrow_mut().pop_front(), None)
                } else {
                    let (job, note) = carry.remove(0).split();
                    (Some(job), Some(note))
                };
                let Some(job) = job else {
                    // Idle: keep the connection for a while for the next job, unless another
                    // next hop waits in line for a connection of the core's share.
                    // One idle timeout, however often the wait is woken for nothing.
                    let idle_since = Instant::now();
                    let idle_until = idle_since + self.relay.config.idle_timeout;
                    let (woke, wanted) = loop {
                        let wanted = self.slot_wanted.listen();
                        // A next hop in line gets the place at once; one whose connections
                        // have a backlog once this one has been idle for a moment (so that a
                        // trickle of mail keeps its connection).
                        let grace_over = idle_since.elapsed() >= IDLE_GRACE;
                        let backlog = self.someone_wanting_more();
                        if self.someone_starved() || (grace_over && backlog) {
                            drop(wanted);
                            self.leave(&dq);
                            self.quit_after_leaving(conn).await;
                            return;
                        }
                        dq.idle.set(dq.idle.get() + 1);
                        let listener = dq.arrived.listen();
                        // No borrow of the queue may live across the wait (enqueue pushes to
                        // it).
                        let empty = dq.ready.borrow().is_empty();
                        let idle_end = async {
                            future::or(
                                glommio::timer::sleep(
                                    idle_until.saturating_duration_since(Instant::now()),
                                ),
                                self.handle.stopped(),
                            )
                            .await;
                            Idle::Over
                        };
                        let grace_end = async {
                            if backlog {
                                let left = IDLE_GRACE.saturating_sub(idle_since.elapsed());
                                glommio::timer::sleep(left).await;
                            } else {
                                future::pending::<()>().await;
                            }
                            Idle::Wanted
                        };
                        let woke = if empty {
                            future::or(
                                async {
                                    listener.await;
                                    Idle::Job
                                },
                                future::or(
                                    idle_end,
                                    future::or(grace_end, async {
                                        wanted.await;
                                        Idle::Wanted
                                    }),
                                ),
                            )
                            .await
                        } else {
                            Idle::Job
                        };
                        dq.idle.set(dq.idle.get() - 1);
                        // Asked for its place with nothing of its own to do: given up at the
                        // top of the loop if the line still has someone (or it waits again).
                        if woke != Idle::Wanted || !dq.ready.borrow().is_empty() {
                            break (woke == Idle::Job, woke == Idle::Wanted);
                        }
                    };
                    if wanted {
                        // Woken for a place, with a job of its own to do: the wake goes to
                        // another idle connection.
                        self.slot_wanted.notify(1.additional());
                    }
                    if (woke || !dq.ready.borrow().is_empty()) && conn.went_away_while_idle() {
                        // The next hop closed it meanwhile (often after an idle timeout of
                        // its own): the waiting job goes on a new connection, not charged a
                        // failed attempt for a transaction the next hop never saw.
                        tracing::debug!(remote = %conn.remote, "idle connection closed by the next hop");
                        continue 'connect;
                    }
                    if woke || !dq.ready.borrow().is_empty() {
                        continue;
                    }
                    if self.someone_waiting() {
                        // Its place is wanted: counted out before the QUIT, not after it.
                        self.leave(&dq);
                        self.quit_after_leaving(conn).await;
                        return;
                    }
                    // The QUIT's reply may take a while, and this worker still counts against
                    // the next hop's connections: a job queued meanwhile started no worker of
                    // its own. The loop's test looks at the queue again before leaving. If
                    // another next hop comes to want the place meanwhile, it is counted out
                    // then, and the QUIT goes on.
                    let wanted = self.slot_wanted.listen();
                    let mut quit = std::pin::pin!(conn.quit());
                    let asked = future::or(
                        async {
                            (&mut quit).await;
                            false
                        },
                        async {
                            wanted.await;
                            true
                        },
                    )
                    .await;
                    if asked {
                        self.leave(&dq);
                        self.quitting.set(self.quitting.get() + 1);
                        quit.await;
                        self.quitting.set(self.quitting.get() - 1);
                        return;
                    }
                    continue 'connect;
                };
                let window = if now_ms() < dq.serial_until.get() {
                    1
                } else {
                    self.relay.config.max_in_flight
                };
                let counted = InFlight::new(&self.relay.in_flight);
                let after = if window > 1 && conn.can_pipeline() {
                    // Replies awaited at once stay few enough for any socket buffer: the
                    // server must never block writing them while this side still writes.
                    let mut replies = job.rcpts.len() + 3;
                    let mut jobs = vec![job];
                    while jobs.len() < window && replies < MAX_PIPELINED_REPLIES {
                        let Some(more) = dq.ready.borrow_mut().pop_front() else {
                            break;
                        };
                        replies += more.rcpts.len() + 3;
                        jobs.push(more);
                    }
                    self.transact_pipelined(&mut conn, &dq, jobs, note, &mut carry)
                        .await
                } else {
                    self.transact(&mut conn, &dq, job, note, &mut carry).await
                };
                drop(counted);
                if after_failures && dq.broken_in_a_row.get() == 0 {
                    after_failures = false;
                    // A transaction answered after failures lifts the one-connection limit:
                    // the jobs that piled up meanwhile get their other connections now (this
                    // one takes the next job itself).
                    let waiting = dq.ready.borrow().len().saturating_sub(dq.idle.get() + 1);
                    let room = self.most_workers(&dq).saturating_sub(dq.workers.get());
                    for _ in 0..waiting.min(room) {
                        if !self.start_worker(&dq) {
                            break;
                        }
                    }
                }
                match after {
                    After::Keep if carry.is_empty() && self.yields_place(&dq, started) => {
                        // Other next hops wait for a connection of the core's share.
                        self.leave(&dq);
                        self.quit_after_leaving(conn).await;
                        return;
                    }
                    After::Keep => {}
                    After::Broken => continue 'connect,
                    After::Elsewhere => {
                        conn.quit().await;
                        continue 'connect;
                    }
                }
            }
        }
        self.leave(&dq);
    }

    /// A job never sent on a connection that ended at its RSET goes back: to the front of
    /// `carry` when it was carried (`note`), so that it keeps its way past the address that
    /// put it off, else to the front of its queue.
    fn put_back(&self, dq: &DestQueue, job: Job, note: Option<Note>, carry: &mut Vec<Carried>) {
        match note {
            Some(note) => carry.insert(0, note.with(job)),
            None => self.requeue(dq, vec![job]),
        }
    }

    /// Runs one job on `conn`; `note` when it was carried.
    async fn transact(
        &self,
        conn: &mut Outbound,
        dq: &DestQueue,
        job: Job,
        note: Option<Note>,
        carry: &mut Vec<Carried>,
    ) -> After {
        let Some((job, tx, body)) = self.prepare(conn, job) else {
            return After::Keep;
        };
        let outcome = conn.deliver(&tx, &body, &self.relay.config.timeouts).await;
        if let Err(Err(ConnError::Stale(e))) = &outcome {
            // The next hop ended a kept connection before this transaction began: the job
            // goes on a new connection, not charged a failed attempt (a new connection never
            // sends RSET first, so this cannot repeat).
            tracing::debug!(remote = %conn.remote, "kept connection ended at RSET ({e}); reconnecting");
            self.put_back(dq, job, note, carry);
            return After::Broken;
        }
        // Replies got before a break still count where they refused for good.
        let partial = match &outcome {
            Err(Err(_)) => conn.take_unfinished(),
            _ => None,
        };
        self.conclude(conn, dq, job, outcome, partial, carry)
    }

    /// Runs up to `--max-transactions-in-flight` jobs on `conn`, pipelined into each other:
    /// every transaction is written before the first reply is read. Jobs not sent because the
    /// connection broke go back to the front of the queue.
    async fn transact_pipelined(
        &self,
        conn: &mut Outbound,
        dq: &DestQueue,
        jobs: Vec<Job>,
        note: Option<Note>,
        carry: &mut Vec<Carried>,
    ) -> After {
        let t = &self.relay.config.timeouts;
        // The first job's note when it was carried, while it may still go back unsent.
        let mut note = note;
        let mut sent = Vec::with_capacity(jobs.len());
        let mut unsent = jobs.into_iter();
        // The error that ended the connection, once there is one.
        let mut broken: Option<ConnError> = None;
        // A job whose RSET found the connection ended: it goes back first.
        let mut stale = Vec::new();
        for (i, job) in unsent.by_ref().enumerate() {
            let first_note = if i == 0 { note.take() } else { None };
            let Some((job, tx, body)) = self.prepare(conn, job) else {
                continue;
            };
            match conn.start(&tx, &body, t).await {
                Ok(()) => {
                    if sent.is_empty() {
                        note = first_note;
                    }
                    sent.push(job);
                }
                Err(Ok(local)) => {
                    self.conclude(conn, dq, job, Err(Ok(local)), None, carry);
                }
                Err(Err(e)) => {
                    if let e @ ConnError::Stale(_) = conn.at_rset(e.clone()) {
                        // A kept connection that ended at its RSET took nothing: the job goes
                        // on a new connection, not charged a failed attempt.
                        tracing::debug!(remote = %conn.remote, "kept connection ended at RSET ({e:?}); reconnecting");
                        match first_note {
                            Some(n) => carry.insert(0, n.with(job)),
                            None => stale.push(job),
                        }
                        broken = Some(e);
                        break;
                    }
                    // Part of it may have gone out: its outcome is unknown, like the sent ones'.
                    // (The replies read so far belong to earlier transactions.)
                    self.conclude(conn, dq, job, Err(Err(e.clone())), None, carry);
                    dq.serial_until
                        .set(now_ms() + SERIAL_AFTER_BREAK.as_millis() as u64);
                    broken = Some(e);
                    break;
                }
            }
        }
        stale.extend(unsent);
        self.requeue(dq, stale);
        // After a failed write the replies to what went out before it may still be readable
        // (from a server that answered 421 and closed, say): read them briefly, not guess.
        let limit = match broken {
            None => t.mail.max(t.rcpt).max(t.data_done),
            Some(_) => t.data_done.min(AFTER_WRITE_FAILURE),
        };
        let mut sent = sent.into_iter();
        let mut elsewhere = false;
        // Outcomes are concluded once the batch's last reply is in: a reply too many found
        // after it means every reply of the batch may have answered the command before its
        // own (see `unasked_after_reply`).
        let mut answered: Vec<(Job, TransactionResult)> = Vec::new();
        while let Some(job) = sent.next() {
            // Only the first job sent can be the carried one.
            let first_note = note.take();
            match conn.finish(limit).await {
                Ok(result) => answered.push((job, result)),
                Err(e) => {
                    // Those answered before the break keep their replies, unless the batch
                    // ran out of time: a reply the next hop never sent would have let each
                    // later one answer the command before its own (the next RSET's 250 taken
                    // for a message's), so none of them is known.
                    let short = matches!(&e, ConnError::Io(text) if text == crate::conn::TIMED_OUT);
                    for (job, result) in answered.drain(..) {
                        let outcome = if short {
                            Err(Err(e.clone()))
                        } else {
                            Ok(result)
                        };
                        self.conclude(conn, dq, job, outcome, None, carry);
                    }
                    if let ConnError::Stale(why) = conn.at_rset(e.clone()) {
                        // Ended at the RSET before this transaction: the server took neither
                        // it nor any later one, and none is charged a failed attempt.
                        tracing::debug!(remote = %conn.remote, "kept connection ended at RSET ({why}); reconnecting");
                        match first_note {
                            Some(n) => {
                                carry.insert(0, n.with(job));
                                self.requeue(dq, sent.collect());
                            }
                            None => self.requeue(dq, std::iter::once(job).chain(sent).collect()),
                        }
                        return After::Broken;
                    }
                    // The oldest transaction: the replies it got before the break are its own.
                    let partial = conn.take_unfinished();
                    self.conclude(conn, dq, job, Err(Err(e.clone())), partial, carry);
                    if matches!(e, ConnError::Smtp(ClientError::Closing(_))) {
                        // The server closed at this reply, so it took none of the later
                        // transactions: they go back to the queue as if never sent.
                        self.requeue(dq, sent.collect());
                    } else {
                        // Their outcome is unknown: deferred, like this one. A next hop that
                        // drops connections in the middle of a batch might do it to every
                        // batch, so it gets one transaction per round trip for a while.
                        dq.serial_until
                            .set(now_ms() + SERIAL_AFTER_BREAK.as_millis() as u64);
                        for job in sent {
                            self.conclude(conn, dq, job, Err(Err(e.clone())), None, carry);
                        }
                    }
                    return After::Broken;
                }
            }
        }
        if conn.unasked_after_reply() {
            // Out of step: none of these outcomes is known. Deferred, and tried again (a
            // duplicate at worst, never a refusal taken for a delivery); one transaction per
            // round trip to this next hop for a while, so that one stray reply costs one
            // message's attempt, not a batch's.
            let e = ConnError::Io(crate::conn::OUT_OF_STEP.into());
            dq.serial_until
                .set(now_ms() + SERIAL_AFTER_BREAK.as_millis() as u64);
            for (job, _) in answered {
                self.conclude(conn, dq, job, Err(Err(e.clone())), None, carry);
            }
            return After::Broken;
        }
        for (job, result) in answered {
            elsewhere |= self.conclude(conn, dq, job, Ok(result), None, carry) == After::Elsewhere;
        }
        match (broken, elsewhere) {
            (Some(_), _) => After::Broken,
            (None, true) => After::Elsewhere,
            (None, false) => After::Keep,
        }
    }

    /// Puts jobs that were never sent back at the front of their queue, in order.
    /// While the next hop is paused they are deferred like the jobs that waited for it.
    fn requeue(&self, dq: &DestQueue, jobs: Vec<Job>) {
        if dq.down_until.get() > now_ms() {
            if let Some((status, text, remote)) = dq.paused_for.borrow().clone() {
                for job in jobs {
                    self.settle_all(job, false, &status, &text, remote.clone());
                }
                return;
            }
        }
        let mut ready = dq.ready.borrow_mut();
        for job in jobs.into_iter().rev() {
            ready.push_front(job);
        }
    }

    /// The transaction for `job` on `conn`, or None when the job was settled without
    /// sending (the next hop lacks an extension the message needs).
    fn prepare(&self, conn: &Outbound, mut job: Job) -> Option<(Job, Transaction, MessageRef)> {
        let meta = &job.msg.meta;
        let caps = conn.capabilities();
        let (chunking, binarymime, smtputf8, eightbitmime) = (
            caps.chunking,
            caps.binarymime,
            caps.smtputf8,
            caps.eightbitmime,
        );
        // BINARYMIME needs BDAT and BINARYMIME at the next hop (RFC 3030 3). A body declared
        // BINARYMIME that is text all the same (CRLF lines of at most 998 octets, no NUL) goes
        // as it is, declared 8BITMIME or 7BIT (decided below from its content): nothing in it
        // changes, and DATA's dot-stuffing is undone at the other end. Any other body is not
        // rewritten (postern does not encode MIME parts) and fails for this next hop.
        let mut body_type = meta.body_type;
        if body_type == 2 && !(chunking && binarymime) {
            if !is_text(job.msg.body.chunks()) {
                let text = format!(
                    "{} does not support BINARYMIME and the message is not text that could go without it",
                    conn.remote
                );
                self.settle_all(job, true, "5.6.3", &text, Some(conn.remote.clone()));
                return None;
            }
            body_type = 0;
        }
        // RFC 6531 3.2: an internationalized message (UTF-8 in its reverse path, its header
        // section or a recipient's address) goes only to a next hop with SMTPUTF8. postern
        // does not downgrade, so such a message fails for that next hop. With an ASCII
        // reverse path and header section, only the recipients whose own address is UTF-8
        // fail: the others go on in a transaction without them, which is not
        // internationalized. One sent with SMTPUTF8 that has none of these goes on without
        // the parameter.
        if meta.smtputf8 && !smtputf8 {
            let text = || {
                format!(
                    "{} does not support SMTPUTF8, needed for this message's addresses or header fields",
                    conn.remote
                )
            };
            let (ascii, intl): (Vec<u32>, Vec<u32>) = job.rcpts.iter().partition(|&&i| {
                meta.recipients
                    .get(i as usize)
                    .is_some_and(|r| r.path.is_ascii())
            });
            if ascii.is_empty()
                || !meta.reverse_path.is_ascii()
                || !headers_are_ascii(&job.msg.body)
            {
                self.settle_all(job, true, "5.6.7", &text(), Some(conn.remote.clone()));
                return None;
            }
            if !intl.is_empty() {
                let failed = Job {
                    msg: job.msg.clone(),
                    rcpts: intl,
                    dest: job.dest.clone(),
                    failures: job.failures,
                    not_before: 0,
                    hop_dsn: false,
                    tried: Vec::new(),
                };
                self.settle_all(failed, true, "5.6.7", &text(), Some(conn.remote.clone()));
                job.rcpts = ascii;
            }
        }
        // RFC 6152 3: no octet above 127 goes to a next hop without 8BITMIME, and any that
        // goes is announced with BODY=8BITMIME. postern does not rewrite MIME bodies, so such
        // a message fails for a next hop without 8BITMIME (as BINARYMIME does above). The
        // content decides, not the declaration: a message declared 8BITMIME that is plain
        // ASCII goes to any next hop, and 8-bit content declared as nothing or 7BIT goes
        // with BODY=8BITMIME.
        // (Not scanned where the answer changes nothing: declared 8BITMIME to a next hop that
        // offers it.)
        let mut eight_bit = body_type != 2
            && !(body_type == 1 && eightbitmime)
            && job.msg.body.chunks().any(|c| c.iter().any(|&b| b > 0x7f));
        // A report from `<>` that returns a whole 8-bit message: what still reaches its
        // sender through this next hop is the report with the header section only. Only this
        // transaction's body changes: a later attempt, through a next hop with 8BITMIME,
        // sends the whole report.
        let mut body = job.msg.body.clone();
        if eight_bit && !eightbitmime {
            let seven_bit = |r: &[u8]| !dsn::is_8bit(r);
            if let Some(remade) =
                headers_only(&job.msg, &body, dsn::HeadersOnly::EightBit, seven_bit)
            {
                tracing::info!(
                    queue_id = %job.msg.queue_id,
                    "{} does not support 8BITMIME: the report goes with the returned message's header section only",
                    conn.remote
                );
                body = remade;
                eight_bit = false;
            }
        }
        // The same for a report from `<>` larger than the next hop takes (its SIZE): with the
        // header section only, it may fit.
        if let Some(limit) = caps.size.filter(|&l| l > 0 && body.len() > l) {
            let fits = |r: &[u8]| r.len() as u64 <= limit;
            if let Some(remade) = headers_only(&job.msg, &body, dsn::HeadersOnly::TooBig, fits) {
                tracing::info!(
                    queue_id = %job.msg.queue_id,
                    "{} takes at most {limit} octets: the report goes with the returned message's header section only",
                    conn.remote
                );
                body = remade;
            }
        }
        if eight_bit && !eightbitmime {
            let text = format!(
                "{} does not support 8BITMIME and the message has 8-bit content",
                conn.remote
            );
            self.settle_all(job, true, "5.6.3", &text, Some(conn.remote.clone()));
            return None;
        }
        let mut mail_params = String::new();
        match body_type {
            2 => mail_params.push_str(" BODY=BINARYMIME"),
            1 if eightbitmime => mail_params.push_str(" BODY=8BITMIME"),
            _ if eight_bit => mail_params.push_str(" BODY=8BITMIME"),
            _ => {}
        }
        if meta.smtputf8 && smtputf8 {
            mail_params.push_str(" SMTPUTF8");
        }
        // The DSN parameters go on where the next hop takes them (RFC 3461 4); where it does
        // not, a success report asked for is sent from here when the message is relayed.
        let dsn = caps.dsn;
        if dsn {
            dsn_mail_params(meta, &mut mail_params);
        }
        job.hop_dsn = dsn;
        let tx = Transaction {
            from: meta.reverse_path.clone(),
            mail_params,
            rcpts: job
                .rcpts
                .iter()
                .filter_map(|&i| meta.recipients.get(i as usize))
                .map(|r| OutRecipient {
                    path: r.path.clone(),
                    params: if dsn {
                        dsn_rcpt_params(r, meta.smtputf8 && smtputf8)
                    } else {
                        String::new()
                    },
                })
                .collect(),
            body_len: body.len(),
            mode: if chunking {
                BodyMode::Bdat
            } else {
                BodyMode::Data
            },
            chunk_size: 0,
        };
        Some((job, tx, body))
    }

    /// Records the outcome of `job`'s transaction on `conn`, and says what becomes of the
    /// connection.
    /// `partial`: with a broken connection (`Err(Err(_))`), the replies this job's transaction
    /// got before the break.
    fn conclude(
        &self,
        conn: &Outbound,
        dq: &DestQueue,
        job: Job,
        outcome: Result<TransactionResult, Result<Reply, ConnError>>,
        partial: Option<TransactionResult>,
        carry: &mut Vec<Carried>,
    ) -> After {
        let remote_name = conn.remote.as_str();
        let remote = Some(remote_name.to_owned());
        match outcome {
            Ok(result) => {
                dq.broken_in_a_row.set(0);
                let mut deferred = Vec::new();
                let mut deferred_texts = Vec::new();
                let mut last_deferral = String::new();
                // Recipients the next hop would not take in this transaction only ("too many
                // recipients") while it took others: they go again at once, in the next
                // transaction (RFC 5321 4.5.3.1.10), not after a retry delay.
                let mut overflow = Vec::new();
                let took_some = result.mail.is_positive()
                    && result.data.as_ref().is_some_and(Reply::is_positive)
                    && result.rcpts.iter().any(Reply::is_positive);
                let mut out = Vec::with_capacity(job.rcpts.len());
                for (k, &rcpt) in job.rcpts.iter().enumerate() {
                    let reply = result.outcome(k);
                    let text = reply_line(reply);
                    // RFC 5321 4.5.3.1.10: a 552 to RCPT is "too many recipients" from an
                    // older server, and is temporary (as Postfix takes it).
                    let rcpt_552 = result.mail.is_positive()
                        && result.rcpts.get(k).is_some_and(|r| r.code == 552);
                    if reply.is_positive() {
                        let relayed = !job.hop_dsn;
                        self.report(
                            &mut out,
                            &job.msg,
                            rcpt,
                            Result_::Delivered { relayed },
                            text,
                            remote.clone(),
                        );
                    } else if reply.is_permanent() && !rcpt_552 {
                        let status = dsn::status_of(&text);
                        self.report(
                            &mut out,
                            &job.msg,
                            rcpt,
                            Result_::Failed { status },
                            text,
                            remote.clone(),
                        );
                    } else if took_some
                        && result
                            .rcpts
                            .get(k)
                            .is_some_and(|r| r.code == 452 || r.code == 552)
                    {
                        overflow.push(rcpt);
                    } else {
                        deferred.push(rcpt);
                        deferred_texts.push(text.clone());
                        last_deferral = text;
                    }
                }
                self.send_reports(&job.msg, out);
                if !overflow.is_empty() {
                    self.schedule(Job {
                        msg: job.msg.clone(),
                        rcpts: overflow,
                        dest: job.dest.clone(),
                        failures: job.failures,
                        not_before: 0,
                        hop_dsn: false,
                        tried: Vec::new(),
                    });
                }
                if !deferred.is_empty() {
                    let whole = deferred.len() == job.rcpts.len();
                    let again = Job {
                        rcpts: deferred,
                        ..job
                    };
                    let status = dsn::status_of(&last_deferral);
                    if !whole {
                        self.settle_each(
                            again,
                            false,
                            &status,
                            &last_deferral,
                            &deferred_texts,
                            remote,
                        );
                        return After::Keep;
                    }
                    // The whole transaction was put off: another address of the next hop may
                    // take it now. A 4xx to MAIL or to the data (the host's trouble) also
                    // passes the address over for other jobs a while; a 4xx to every RCPT
                    // (greylisting, full mailboxes) only for this job.
                    let host_trouble =
                        !result.mail.is_positive() || result.rcpts.iter().any(Reply::is_positive);
                    let c = Carried {
                        job: again,
                        status,
                        text: last_deferral,
                        texts: deferred_texts,
                        remote,
                    };
                    match self.pass_over(dq, conn.addr, host_trouble, c, carry) {
                        Some(c) => self.settle_carried(c),
                        None => return After::Elsewhere,
                    }
                }
                After::Keep
            }
            Err(Ok(local)) => {
                // Decided here, before anything was sent: postern's words, not a reply.
                let text = local.lines.join(" ");
                let status = local
                    .enhanced
                    .map_or_else(|| "5.3.4".to_owned(), |e| e.to_string());
                self.settle_all(job, local.is_permanent(), &status, &text, remote);
                After::Keep
            }
            Err(Err(e)) => {
                // The connection broke off (421, closed, timed out): another address may
                // take the job at once. Recipients the next hop had already refused for good
                // are failed now with that refusal (RFC 5321 4.2.1), not tried again.
                let job = match partial {
                    Some(r) => self.fail_refused(job, &r, &remote),
                    None => job,
                };
                if job.rcpts.is_empty() {
                    if !conn.broke_counted.replace(true) {
                        self.broke(dq, conn.addr);
                    }
                    return After::Broken;
                }
                let c = Carried {
                    job,
                    status: "4.4.2".into(),
                    text: e.describe(remote_name),
                    texts: Vec::new(),
                    remote,
                };
                // One broken connection counts once, whatever it carried.
                if !conn.broke_counted.replace(true) {
                    self.broke(dq, conn.addr);
                }
                if let Some(c) = self.pass_over(dq, conn.addr, true, c, carry) {
                    if self.every_address_broke(dq) {
                        self.suspend(dq, &c, carry);
                    }
                    self.settle_carried(c);
                }
                After::Broken
            }
        }
    }

    /// Fails the recipients of `job` that `partial` (the replies its transaction got before the
    /// connection broke) shows refused for good at RCPT after MAIL was taken; returns the job
    /// with the others. A 552 to RCPT is "too many recipients" and temporary (as in
    /// `conclude`).
    fn fail_refused(
        &self,
        mut job: Job,
        partial: &TransactionResult,
        remote: &Option<String>,
    ) -> Job {
        if !partial.mail.is_positive() {
            return job;
        }
        let mut out = Vec::new();
        let mut left = Vec::with_capacity(job.rcpts.len());
        for (k, &rcpt) in job.rcpts.iter().enumerate() {
            match partial.rcpts.get(k) {
                Some(r) if r.is_permanent() && r.code != 552 => {
                    let text = reply_line(r);
                    let status = dsn::status_of(&text);
                    let result = Result_::Failed { status };
                    self.report(&mut out, &job.msg, rcpt, result, text, remote.clone());
                }
                _ => left.push(rcpt),
            }
        }
        self.send_reports(&job.msg, out);
        job.rcpts = left;
        job
    }

    /// How long a next hop, or one of its addresses, is left alone after it could not be
    /// reached or broke off (ms): the first retry delay, at most a minute.
    fn pause_ms(&self) -> u64 {
        let pause = self.relay.config.retry.initial.min(Duration::from_secs(60));
        u64::try_from(pause.as_millis()).unwrap_or(u64::MAX)
    }

    /// Notes that `addr` of `dq`'s next hop could not be reached or broke a connection off.
    fn broke(&self, dq: &DestQueue, addr: SocketAddr) {
        let now = now_ms();
        let mut broke = dq.broke.borrow_mut();
        broke.retain(|_, until| *until > now);
        broke.insert(addr, now + self.pause_ms());
        dq.last_broke.set(now);
        dq.broken_in_a_row
            .set(dq.broken_in_a_row.get().saturating_add(1));
    }

    /// Whether every address of `dq`'s next hop could not be reached or broke a connection
    /// off lately, with at least two such failures in a row: one dropped connection to a
    /// next hop with a single address is a glitch, not an outage.
    fn every_address_broke(&self, dq: &DestQueue) -> bool {
        if dq.broken_in_a_row.get() < 2 {
            return false;
        }
        let now = now_ms();
        let broke = dq.broke.borrow();
        let addrs = dq.addrs.borrow();
        !addrs.is_empty()
            && addrs
                .iter()
                .all(|a| broke.get(a).is_some_and(|&until| until > now))
    }

    /// Every address of the next hop broke off: the next hop is left alone for a while, as
    /// one that cannot be reached is, rather than each waiting job opening connections to
    /// every address again. The jobs this worker carries are deferred with their own answers;
    /// those waiting for the next hop, never sent, with the answer `last` got, said to be
    /// the reason they were not tried (it may be about another message); jobs that come
    /// meanwhile wait for the pause's end.
    fn suspend(&self, dq: &DestQueue, last: &Carried, carry: &mut Vec<Carried>) {
        dq.down_until.set(now_ms() + self.pause_ms());
        // No next hop answered for these jobs: no Remote-MTA in their reports.
        let not_tried = format!("{}{}", dsn::NOT_TRIED, last.text);
        *dq.paused_for.borrow_mut() = Some((last.status.clone(), not_tried.clone(), None));
        tracing::info!(
            next_hop = %dq.dest.key(),
            "every address of the next hop broke off; delivery to it suspended for {}s",
            self.pause_ms() / 1000
        );
        for k in carry.drain(..) {
            self.settle_carried(k);
        }
        let jobs: Vec<Job> = dq.ready.borrow_mut().drain(..).collect();
        for job in jobs {
            self.settle_all(job, false, &last.status, &not_tried, None);
        }
    }

    /// Passes over `addr` of `dq`'s next hop for a while (see `pause_ms`).
    fn avoid(&self, dq: &DestQueue, addr: SocketAddr) {
        let now = now_ms();
        let mut avoid = dq.avoid.borrow_mut();
        avoid.retain(|_, until| *until > now);
        avoid.insert(addr, now + self.pause_ms());
    }

    /// A job's transaction at `addr` broke off or was put off as a whole. The job goes at once
    /// to another address of its next hop that it has not tried in this attempt, on this
    /// worker's next connection (RFC 5321 5.1: the addresses in order until one takes the
    /// mail), at most [`MAX_ADDRESSES_PER_ATTEMPT`]; None then. With none left it comes back,
    /// to be deferred. With `host_trouble` the address is also passed over by new
    /// connections for a while.
    fn pass_over(
        &self,
        dq: &DestQueue,
        addr: SocketAddr,
        host_trouble: bool,
        mut c: Carried,
        carry: &mut Vec<Carried>,
    ) -> Option<Carried> {
        if host_trouble {
            self.avoid(dq, addr);
        }
        if !c.job.tried.contains(&addr) {
            c.job.tried.push(addr);
        }
        let others = c.job.tried.len() < MAX_ADDRESSES_PER_ATTEMPT
            && dq.addrs.borrow().iter().any(|a| !c.job.tried.contains(a));
        if !others {
            return Some(c);
        }
        tracing::info!(queue_id = %c.job.msg.queue_id, %addr, "trying the next address of the next hop");
        carry.push(c);
        None
    }

    /// A passed-over job that no other address took: deferred with the last answer.
    fn settle_carried(&self, c: Carried) {
        self.settle_each(c.job, false, &c.status, &c.text, &c.texts, c.remote);
    }

    /// Every recipient of `job` failed the same way: for good, or for now (then rescheduled,
    /// or expired when the message's lifetime is over).
    fn settle_all(
        &self,
        job: Job,
        permanent: bool,
        status: &str,
        text: &str,
        remote: Option<String>,
    ) {
        self.settle_each(job, permanent, status, text, &[], remote);
    }

    /// Like [`CoreRelay::settle_all`], with each recipient's own reply where `texts` has one
    /// (in the order of `job.rcpts`; its status is then the reply's).
    fn settle_each(
        &self,
        job: Job,
        permanent: bool,
        status: &str,
        text: &str,
        texts: &[String],
        remote: Option<String>,
    ) {
        let text_of = |k: usize| texts.get(k).map_or(text, String::as_str);
        let status_of = |k: usize| match texts.get(k) {
            Some(t) => dsn::status_of(t),
            None => status.to_owned(),
        };
        let mut out = Vec::with_capacity(job.rcpts.len());
        if permanent {
            for (k, &rcpt) in job.rcpts.iter().enumerate() {
                let result = Result_::Failed {
                    status: status_of(k),
                };
                let reply = text_of(k).to_owned();
                self.report(&mut out, &job.msg, rcpt, result, reply, remote.clone());
            }
            self.send_reports(&job.msg, out);
            return;
        }
        let failures = job.failures + 1;
        let arrival = arrival_ms(&job.msg.meta);
        match self
            .relay
            .config
            .retry
            .after_failure(arrival, failures, now_ms())
        {
            RetryDecision::RetryAt(at) => {
                for (k, &rcpt) in job.rcpts.iter().enumerate() {
                    let result = Result_::Deferred {
                        next_attempt: at,
                        status: status_of(k),
                    };
                    let reply = text_of(k).to_owned();
                    self.report(&mut out, &job.msg, rcpt, result, reply, remote.clone());
                }
                self.send_reports(&job.msg, out);
                self.handle.count_outcome(Outcome::Deferred);
                self.schedule(Job {
                    failures,
                    not_before: at,
                    tried: Vec::new(),
                    ..job
                });
            }
            RetryDecision::Expire => {
                for (k, &rcpt) in job.rcpts.iter().enumerate() {
                    let result = Result_::Failed {
                        status: "4.4.7".into(),
                    };
                    let reply = format!("delivery time expired; last error: {}", text_of(k));
                    self.report(&mut out, &job.msg, rcpt, result, reply, remote.clone());
                }
                self.send_reports(&job.msg, out);
            }
        }
    }

    /// Logs one recipient's outcome and adds it to `out`, the outcomes of its job that go to
    /// the owner together ([`CoreRelay::send_reports`]).
    fn report(
        &self,
        out: &mut Vec<Report>,
        msg: &Msg,
        rcpt: u32,
        result: Result_,
        reply: String,
        remote: Option<String>,
    ) {
        let to = msg
            .meta
            .recipients
            .get(rcpt as usize)
            .map_or("", |r| r.path.as_str());
        let relay = remote.as_deref().unwrap_or("none");
        match &result {
            Result_::Delivered { .. } => {
                tracing::info!(queue_id = %msg.queue_id, to, relay, status = "sent", "{reply}")
            }
            Result_::Deferred { .. } => {
                tracing::info!(queue_id = %msg.queue_id, to, relay, status = "deferred", "{reply}")
            }
            Result_::Failed { .. } => {
                tracing::info!(queue_id = %msg.queue_id, to, relay, status = "bounced", "{reply}")
            }
        }
        out.push(Report {
            queue_id: msg.queue_id.clone(),
            rcpt,
            result,
            reply,
            remote,
        });
    }

    /// Sends the outcomes of one job to the owner of its message, in one piece.
    fn send_reports(&self, msg: &Msg, out: Vec<Report>) {
        if !out.is_empty() {
            self.relay.reports.send(msg.owner, out);
        }
    }

    /// Connects to the next hop: its addresses in preference order (those in `tried` by the
    /// jobs this connection is for, and those passed over lately, last), the next one when a
    /// host refuses or greets with an error. Err carries the text, for a permanent failure
    /// its status, and the next hop's name when the last failure came from a host that
    /// answered (its greeting, EHLO or TLS), for the log's `relay` and the report's
    /// Remote-MTA.
    async fn open(&self, dq: &DestQueue, tried: &[SocketAddr]) -> Result<Opened, Unopened> {
        let config = &self.relay.config;
        let (hops, port) = match &dq.dest {
            Destination::Fixed(hp) => {
                let hops = match hp.host.parse::<IpAddr>() {
                    Ok(ip) => vec![NextHop {
                        host: hp.host.clone(),
                        preference: 0,
                        addrs: vec![ip],
                    }],
                    Err(_) if hp.host == "localhost" => vec![NextHop {
                        host: hp.host.clone(),
                        preference: 0,
                        addrs: vec![IpAddr::from([127, 0, 0, 1])],
                    }],
                    Err(_) => self
                        .relay
                        .resolver
                        .host_next_hops(&hp.host)
                        .await
                        .map_err(|e| unresolved(&hp.host, &e))?,
                };
                (hops, hp.port)
            }
            Destination::Mx(domain) => {
                let hops = self
                    .relay
                    .resolver
                    .mx_next_hops(domain, &config.hostname)
                    .await
                    .and_then(|found| {
                        let me = crate::mx::Myself {
                            hostname: &config.hostname,
                            listen: &config.own_addrs,
                            port: config.mx_port,
                        };
                        me.drop_from(found, crate::mx::local_addresses)
                    })
                    .map_err(|e| unresolved(domain, &e))?;
                (hops, config.mx_port)
            }
        };
        let policy = config.tls;
        let config_for = |policy| TlsSetup {
            policy,
            config: match policy {
                TlsPolicy::Required => self.relay.tls.verified.clone(),
                _ => self.relay.tls.unverified.clone(),
            },
            handshake: std::cell::Cell::new(None),
        };
        let mut last = String::from("no address to connect to");
        let mut last_remote = None;
        let mut candidates: Vec<(&NextHop, SocketAddr)> = hops
            .iter()
            .flat_map(|h| {
                h.addrs
                    .iter()
                    .map(move |&ip| (h, SocketAddr::new(ip, port)))
            })
            .collect();
        *dq.addrs.borrow_mut() = candidates.iter().map(|&(_, a)| a).collect();
        let best = candidates.iter().map(|(h, _)| h.preference).min();
        let addresses = candidates.len();
        let mut failed = Vec::new();
        // Whether every address tried answered and then refused HELO for good (after EHLO):
        // that host will not take mail from us, now or later (RFC 5321 4.2.1: a 5yz is not
        // to be repeated), so its mail fails rather than waiting out the queue lifetime. A
        // 5xx greeting is not that: such a server may greet others so, and be back.
        let mut refused_helo = true;
        // Addresses tried, passed over or found unreachable lately go last (one that took
        // a greeting timeout to fail would otherwise cost the next connection as much, as
        // often as the shuffle puts it first); the sort is stable, so preference order holds
        // otherwise.
        let now = now_ms();
        {
            let (avoid, broke) = (dq.avoid.borrow(), dq.broke.borrow());
            let lately = |m: &HashMap<SocketAddr, u64>, a: &SocketAddr| {
                m.get(a).is_some_and(|&until| until > now)
            };
            candidates
                .sort_by_key(|(_, a)| (tried.contains(a), lately(&avoid, a) || lately(&broke, a)));
        }
        // At most MAX_ADDRESSES_PER_ATTEMPT addresses, as for a job passed over: a next hop
        // with many silent addresses cannot hold a worker for their greeting timeouts.
        for (hop, addr) in candidates.into_iter().take(MAX_ADDRESSES_PER_ATTEMPT) {
            let fallback = best.is_some_and(|b| hop.preference > b);
            let opened = |conn: Outbound, failed: Vec<SocketAddr>| Opened {
                conn,
                failed,
                fallback,
            };
            let cleartext =
                policy == TlsPolicy::Opportunistic && dq.cleartext_until.get() > now_ms();
            let setup = (policy != TlsPolicy::None && !cleartext).then(|| config_for(policy));
            let helo = &config.hostname;
            tracing::debug!(%addr, host = %hop.host, "connecting");
            let connected =
                Outbound::connect(addr, &hop.host, helo, setup.as_ref(), &config.timeouts).await;
            if let Some(ok) = setup.as_ref().and_then(|s| s.handshake.get()) {
                self.handle.count_outbound_tls(ok);
            }
            match connected {
                Ok(c) => {
                    tracing::debug!(%addr, tls = c.is_tls(), "connected");
                    return Ok(opened(c, failed));
                }
                Err(ConnError::Tls(e)) if policy == TlsPolicy::Opportunistic => {
                    // Try again in cleartext on a new connection, and stay in cleartext
                    // with this next hop for a while.
                    dq.cleartext_until.set(now_ms() + 3_600_000);
                    match Outbound::connect(addr, &hop.host, helo, None, &config.timeouts).await {
                        Ok(c) => return Ok(opened(c, failed)),
                        Err(e2) => {
                            refused_helo = false;
                            // It answered the first time (STARTTLS came before the
                            // handshake), whatever the second connection did.
                            last = format!("{}; then {}", e, e2.describe(&hop.host));
                            last_remote = Some(hop.host.clone());
                        }
                    }
                }
                Err(e) => {
                    if !matches!(&e, ConnError::Smtp(ClientError::Helo(r)) if r.is_permanent()) {
                        refused_helo = false;
                    }
                    // The account kept is that of the last host that answered, if any did: a
                    // later address where nobody answered does not hide it.
                    if e.answered() || last_remote.is_none() {
                        last = e.describe(&format!("{} [{}]", hop.host, addr.ip()));
                        last_remote = e.answered().then(|| hop.host.clone());
                    }
                }
            }
            self.broke(dq, addr);
            failed.push(addr);
        }
        // Every address, not only those this attempt reached: a host further down the list
        // (a backup MX) may still take the mail.
        let refused =
            (refused_helo && addresses > 0 && failed.len() == addresses).then_some("5.0.0");
        Err((last, refused, last_remote, None))
    }

    // ----- owner side -----

    async fn report_loop(self: Rc<Self>) {
        let inbox = self.relay.reports.get(self.id);
        loop {
            while let Some(batch) = inbox.pop() {
                for r in batch {
                    self.settle(r);
                }
            }
            self.report_relayed();
            self.report_failed();
            self.report_delays();
            // Also while stopping: outcomes of deliveries in flight still come (see
            // `wind_down`).
            inbox.wait().await;
        }
    }

    /// Records one recipient's outcome.
    fn settle(self: &Rc<Self>, r: Report) {
        let now = now_ms();
        let mut tracked = self.tracked.borrow_mut();
        let Some(t) = tracked.get_mut(&r.queue_id) else {
            return;
        };
        let state = match &r.result {
            Result_::Delivered { relayed } => {
                self.handle.count_outcome(Outcome::Delivered);
                t.pending = t.pending.saturating_sub(1);
                let asked = t
                    .msg
                    .meta
                    .recipients
                    .get(r.rcpt as usize)
                    .and_then(|rcpt| rcpt.notify)
                    .is_some_and(|n| n & Notify::SUCCESS != 0);
                if *relayed && asked {
                    t.relayed
                        .push((r.rcpt, r.reply.clone(), r.remote.clone(), now / 1000));
                    self.relayed_waiting.borrow_mut().push(r.queue_id.clone());
                }
                Some(DeliveryState::Delivered)
            }
            Result_::Deferred { next_attempt, .. } => Some(DeliveryState::Deferred {
                next_attempt: next_attempt / 1000,
            }),
            Result_::Failed { status } => {
                // The status record is written after the bounce is durable (see
                // `report_failures`).
                self.handle.count_outcome(Outcome::Failed);
                t.pending = t.pending.saturating_sub(1);
                t.failed.push((
                    r.rcpt,
                    r.reply.clone(),
                    r.remote.clone(),
                    status.clone(),
                    now / 1000,
                ));
                None
            }
        };
        if let Some(state) = state {
            let status = Status {
                state,
                reply: r.reply.clone(),
            };
            if self
                .handle
                .append_status(&r.queue_id, r.rcpt, &status)
                .is_err()
            {
                t.unrecorded = true;
            }
        }
        if let (Result_::Deferred { status, .. }, Some(after)) =
            (&r.result, self.relay.config.delay_warning)
        {
            let age = now.saturating_sub(arrival_ms(&t.msg.meta));
            // DELAY notices only when asked for or by default (RFC 3461 4.1); the one
            // warning of a message goes out after this batch, naming every recipient
            // deferred in it that wants one.
            let wants = t
                .msg
                .meta
                .recipients
                .get(r.rcpt as usize)
                .is_some_and(|rcpt| rcpt.notify.is_none_or(|n| n & Notify::DELAY != 0));
            if wants && age >= after.as_millis() as u64 && t.warn_once(r.rcpt) {
                let status = dsn::deferral_status(&r.reply, status);
                let delay = (r.rcpt, r.reply.clone(), r.remote.clone(), status);
                self.delays_waiting
                    .borrow_mut()
                    .push((r.queue_id.clone(), delay));
            }
        }
        if !t.failed.is_empty() && t.pending > 0 {
            self.failed_waiting.borrow_mut().push(r.queue_id.clone());
        }
        if t.pending == 0 && !t.bouncing {
            if let Some(t) = tracked.remove(&r.queue_id) {
                drop(tracked);
                self.publish_depth();
                let me = self.clone();
                let busy = Reporting::new(self);
                spawn_detached(async move {
                    me.finish(t).await;
                    drop(busy);
                });
            }
        }
    }

    /// Success reports for recipients relayed while others of their message are still
    /// pending, made after each batch of outcomes rather than when the whole message is
    /// settled: a restart does not know which recorded deliveries went to a next hop without
    /// DSN, so a report held back until then could be lost. (A message settled as a whole
    /// gets its report from `finish`.)
    fn report_relayed(self: &Rc<Self>) {
        let waiting = std::mem::take(&mut *self.relayed_waiting.borrow_mut());
        if waiting.is_empty() {
            return;
        }
        let mut tracked = self.tracked.borrow_mut();
        for queue_id in waiting {
            let Some(t) = tracked.get_mut(&queue_id) else {
                continue;
            };
            if t.pending == 0 || t.relayed.is_empty() {
                continue;
            }
            let relayed = std::mem::take(&mut t.relayed);
            if t.msg.meta.reverse_path.is_empty() {
                continue;
            }
            let msg = t.msg.clone();
            let me = self.clone();
            let busy = Reporting::new(self);
            spawn_detached(async move {
                me.relayed_report(&msg, &relayed).await;
                drop(busy);
            });
        }
    }

    /// Bounces for recipients failed while others of their message are still pending (a
    /// retry for a 4xx may take days), made after each batch of outcomes: the sender learns
    /// of a permanent failure at once, and its status is recorded so that a restart does not
    /// try that recipient again.
    fn report_failed(self: &Rc<Self>) {
        let mut waiting = std::mem::take(&mut *self.failed_waiting.borrow_mut());
        if waiting.is_empty() {
            return;
        }
        waiting.dedup();
        let mut tracked = self.tracked.borrow_mut();
        for queue_id in waiting {
            let Some(t) = tracked.get_mut(&queue_id) else {
                continue;
            };
            if t.bouncing || t.pending == 0 || t.failed.is_empty() {
                continue;
            }
            t.bouncing = true;
            let failed = std::mem::take(&mut t.failed);
            let msg = t.msg.clone();
            let me = self.clone();
            let busy = Reporting::new(self);
            spawn_detached(async move {
                me.bounce_partial(queue_id, msg, failed).await;
                drop(busy);
            });
        }
    }

    async fn bounce_partial(
        self: Rc<Self>,
        queue_id: String,
        msg: Arc<Msg>,
        mut failed: Vec<Failure>,
    ) {
        let (done, more) = loop {
            let outcome = self.report_failures(&msg, &failed).await;
            {
                let mut tracked = self.tracked.borrow_mut();
                let Some(t) = tracked.get_mut(&queue_id) else {
                    return;
                };
                match outcome {
                    Ok(unrecorded) => {
                        t.unrecorded |= unrecorded;
                        t.bouncing = false;
                        let more = !t.failed.is_empty();
                        let done = if t.pending == 0 {
                            tracked.remove(&queue_id)
                        } else {
                            None
                        };
                        break (done, more);
                    }
                    Err(()) => {
                        // Not durable (the spool's disk is full, most likely): tried again
                        // after a pause, with any failures that came meanwhile.
                        tracing::error!(
                            queue_id = %queue_id,
                            "cannot spool the bounce; trying again in {}s",
                            BOUNCE_RETRY.as_secs()
                        );
                        t.failed.splice(0..0, std::mem::take(&mut failed));
                    }
                }
            }
            glommio::timer::sleep(BOUNCE_RETRY).await;
            let mut tracked = self.tracked.borrow_mut();
            let Some(t) = tracked.get_mut(&queue_id) else {
                return;
            };
            if t.pending == 0 {
                // Every recipient is settled meanwhile: `finish` bounces what is left.
                t.bouncing = false;
                break (tracked.remove(&queue_id), false);
            }
            failed = std::mem::take(&mut t.failed);
        };
        if let Some(t) = done {
            self.publish_depth();
            self.finish(t).await;
        } else if more {
            // Failures that came while this bounce was made.
            self.failed_waiting.borrow_mut().push(queue_id);
            self.report_failed();
        }
    }

    /// The delay warnings gathered from the last batch of outcomes: one report per message,
    /// naming its recipients deferred in the batch and not warned before.
    fn report_delays(self: &Rc<Self>) {
        let waiting = std::mem::take(&mut *self.delays_waiting.borrow_mut());
        if waiting.is_empty() {
            return;
        }
        let mut by_message: Vec<(String, Vec<Delay>)> = Vec::new();
        for (queue_id, delay) in waiting {
            match by_message.iter_mut().find(|(id, _)| *id == queue_id) {
                Some((_, delays)) => delays.push(delay),
                None => by_message.push((queue_id, vec![delay])),
            }
        }
        let tracked = self.tracked.borrow();
        for (queue_id, delays) in by_message {
            let Some(t) = tracked.get(&queue_id) else {
                continue;
            };
            let msg = t.msg.clone();
            let me = self.clone();
            let busy = Reporting::new(self);
            spawn_detached(async move {
                me.delay_warning(&msg, &delays).await;
                drop(busy);
            });
        }
    }

    /// Bounces `failed` (those that asked for it) and records their failures once the bounce
    /// is durable. `Ok(true)`: a status could not be written.
    async fn report_failures(&self, msg: &Msg, failed: &[Failure]) -> Result<bool, ()> {
        let wanted: Vec<&Failure> = failed
            .iter()
            .filter(|(i, ..)| {
                msg.meta
                    .recipients
                    .get(*i as usize)
                    .is_some_and(|r| r.notify.is_none_or(|n| n & Notify::FAILURE != 0))
            })
            .collect();
        if msg.meta.reverse_path.is_empty() {
            tracing::warn!(
                queue_id = %msg.queue_id,
                "a message from the null reverse path failed; no bounce is sent (RFC 5321 4.5.5)"
            );
        } else if !wanted.is_empty() {
            let recipients: Vec<dsn::ReportRecipient> = wanted
                .iter()
                .map(|(i, reply, remote, status, at)| {
                    let r = &msg.meta.recipients[*i as usize];
                    dsn::ReportRecipient {
                        path: r.path.clone(),
                        orcpt: r.orcpt.clone(),
                        action: dsn::Action::Failed,
                        status: status.clone(),
                        remote_mta: remote.clone(),
                        diagnostic: Some(reply.clone()),
                        last_attempt: Some(*at),
                        will_retry_until: None,
                    }
                })
                .collect();
            self.bounce(msg, &recipients, dsn::Action::Failed).await?;
        }
        let mut unrecorded = false;
        for (i, reply, ..) in failed {
            let status = Status {
                state: DeliveryState::Failed,
                reply: reply.clone(),
            };
            if self
                .handle
                .append_status(&msg.queue_id, *i, &status)
                .is_err()
            {
                unrecorded = true;
            }
        }
        Ok(unrecorded)
    }

    /// Every recipient has its outcome: bounce the failed ones, record them, forget the
    /// message once it is all durable.
    async fn finish(self: Rc<Self>, mut t: Tracked) {
        let msg = t.msg.clone();
        let msg = &msg;
        if !t.relayed.is_empty() && !msg.meta.reverse_path.is_empty() {
            self.relayed_report(msg, &t.relayed).await;
        }
        // Made once, even if the bounce below has to be tried again.
        t.relayed.clear();
        if !t.failed.is_empty() {
            match self.report_failures(msg, &t.failed).await {
                Ok(unrecorded) => t.unrecorded |= unrecorded,
                Err(()) => {
                    // Not durable (the spool's disk is full, most likely): the message stays
                    // queued and the bounce is tried again, once other messages have been
                    // settled and their segments reclaimed. After a restart it would be made
                    // again from the spool.
                    tracing::error!(
                        queue_id = %msg.queue_id,
                        "cannot spool the bounce; trying again in {}s",
                        BOUNCE_RETRY.as_secs()
                    );
                    let me = self.clone();
                    let busy = Reporting::new(&self);
                    spawn_detached(async move {
                        glommio::timer::sleep(BOUNCE_RETRY).await;
                        me.finish(t).await;
                        drop(busy);
                    });
                    return;
                }
            }
        }
        if t.unrecorded {
            tracing::warn!(
                queue_id = %msg.queue_id,
                "a delivery status could not be written (spool full); the message is settled \
                 anyway, so its space can be reclaimed"
            );
        }
        if let Err(e) = self.handle.durable().await {
            // As for a status that could not be written: the outcomes are final here, and a
            // message kept live for ever would keep its segment, and every later one, from
            // being reclaimed for the rest of the run. A crash before its segments are
            // reclaimed only repeats a delivery. Logged once a minute: a failing disk fails
            // every message's sync.
            let now = std::time::Instant::now();
            if self
                .sync_warned
                .get()
                .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(60))
            {
                self.sync_warned.set(Some(now));
                tracing::warn!(
                    queue_id = %msg.queue_id,
                    "a message's final statuses could not be synced ({e}); such messages are \
                     settled anyway, so that their space can be reclaimed (logged once a minute)"
                );
            }
        }
        self.handle.mark_final(&msg.queue_id);
    }

    /// The success report for recipients that asked for one and went to a next hop without
    /// DSN (action `relayed`). Best effort: the deliveries are already recorded, so a report
    /// that cannot be spooled is logged, not retried.
    async fn relayed_report(&self, msg: &Msg, relayed: &[(u32, String, Option<String>, u64)]) {
        let recipients: Vec<dsn::ReportRecipient> = relayed
            .iter()
            .filter_map(|(i, reply, remote, at)| {
                let r = msg.meta.recipients.get(*i as usize)?;
                Some(dsn::ReportRecipient {
                    path: r.path.clone(),
                    orcpt: r.orcpt.clone(),
                    action: dsn::Action::Relayed,
                    status: dsn::status_of(reply),
                    remote_mta: remote.clone(),
                    diagnostic: Some(reply.clone()),
                    last_attempt: Some(*at),
                    will_retry_until: None,
                })
            })
            .collect();
        if !recipients.is_empty()
            && self
                .bounce(msg, &recipients, dsn::Action::Relayed)
                .await
                .is_err()
        {
            tracing::error!(queue_id = %msg.queue_id, "cannot spool the success report");
        }
    }

    async fn delay_warning(&self, msg: &Msg, warn: &[Delay]) {
        if msg.meta.reverse_path.is_empty() {
            return;
        }
        let until = self
            .relay
            .config
            .retry
            .expiry(arrival_ms(&msg.meta))
            .div_ceil(1000);
        let recipients: Vec<dsn::ReportRecipient> = warn
            .iter()
            .filter_map(|(i, reply, remote, status)| {
                let r = msg.meta.recipients.get(*i as usize)?;
                // DELAY notices only when asked for or by default (RFC 3461 4.1).
                r.notify
                    .is_none_or(|n| n & 4 != 0)
                    .then(|| dsn::ReportRecipient {
                        path: r.path.clone(),
                        orcpt: r.orcpt.clone(),
                        action: dsn::Action::Delayed,
                        status: status.clone(),
                        remote_mta: remote.clone(),
                        diagnostic: Some(reply.clone()),
                        last_attempt: Some(now_ms() / 1000),
                        will_retry_until: Some(until),
                    })
            })
            .collect();
        if !recipients.is_empty()
            && self
                .bounce(msg, &recipients, dsn::Action::Delayed)
                .await
                .is_err()
        {
            // Not spooled (the disk is full): the next deferral of these recipients tries
            // the warning again, as a bounce is tried again.
            if let Some(t) = self.tracked.borrow_mut().get_mut(&msg.queue_id) {
                for (i, ..) in warn {
                    t.unwarn(*i);
                }
            }
        }
    }

    /// Builds a DSN about `msg`, spools it durably and queues it like any message.
    async fn bounce(
        &self,
        msg: &Msg,
        recipients: &[dsn::ReportRecipient],
        action: dsn::Action,
    ) -> Result<(), ()> {
        let cap = self.relay.config.bounce_max_returned;
        // The returned content needs one contiguous buffer, bounded by the cap.
        let mut original = Vec::with_capacity((msg.body.len() as usize).min(cap + 1));
        for chunk in msg.body.chunks() {
            let room = (cap + 1).saturating_sub(original.len());
            if room == 0 {
                break;
            }
            original.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        let now = now_ms() / 1000;
        let bytes = dsn::build(&dsn::Report {
            reporting_mta: &self.relay.config.hostname,
            queue_id: &msg.queue_id,
            envid: msg.meta.envid.as_deref(),
            arrival: msg.meta.arrival,
            now,
            to: &msg.meta.reverse_path,
            received_from: Some(&msg.meta.helo),
            recipients,
            original: &original,
            // What the sender asked for: the report says why it gets the headers instead
            // (a message over the cap, which `original` is then longer than; BINARYMIME).
            return_full: msg.meta.ret == Some(1),
            binary: msg.meta.body_type == 2,
            max_returned: cap,
        });
        let meta = MessageMeta {
            arrival: now,
            // Made here: no client sent it.
            client: String::new(),
            helo: self.relay.config.hostname.clone(),
            reverse_path: String::new(),
            recipients: vec![Recipient {
                path: msg.meta.reverse_path.clone(),
                notify: None,
                orcpt: None,
            }],
            envid: None,
            ret: None,
            body_type: u8::from(dsn::is_8bit(&bytes)),
            smtputf8: !msg.meta.reverse_path.is_ascii(),
        };
        match self.handle.inject(&meta, &bytes).await {
            Ok(accepted) => {
                self.handle.count_outcome(Outcome::Bounced);
                tracing::info!(
                    queue_id = %msg.queue_id,
                    bounce = %accepted.queue_id,
                    to = %msg.meta.reverse_path,
                    action = action.as_str(),
                    "delivery status notification queued"
                );
                self.accepted(accepted);
                Ok(())
            }
            Err(e) => {
                tracing::error!(queue_id = %msg.queue_id, "cannot spool a bounce: {e}");
                Err(())
            }
        }
    }

    /// Reclaims spool segments now and then (status-only segments have nothing else to free
    /// them) and keeps the depth gauge fresh.
    async fn housekeeping(self: Rc<Self>) {
        while !self.handle.is_stopping() {
            future::or(
                glommio::timer::sleep(Duration::from_secs(1)),
                self.handle.stopped(),
            )
            .await;
            self.handle.reclaim();
            self.publish_depth();
            self.prune_wanting_more();
            self.forget_quiet_next_hops();
            self.handle.set_outbound(
                (self.outbound.get() + self.quitting.get()) as u64,
                self.dests.borrow().len() as u64,
            );
        }
    }

    /// Forgets the next hops with nothing going on: no connection, no job waiting, and no
    /// pause, passed-over or failed address, or other window still running. Mail for one
    /// later starts it afresh. Without this, every next hop ever mailed would be kept for
    /// the life of the process.
    fn forget_quiet_next_hops(&self) {
        let now = now_ms();
        let retry_max = u64::try_from(self.relay.config.retry.max.as_millis()).unwrap_or(u64::MAX);
        self.dests.borrow_mut().retain(|_, dq| {
            dq.workers.get() > 0
                || dq.starved.get()
                || dq.wanting_more.get()
                || !dq.ready.borrow().is_empty()
                || dq.down_until.get() > now
                || dq.serial_until.get() > now
                || dq.cleartext_until.get() > now
                || dq.avoid.borrow().values().any(|&until| until > now)
                || dq.broke.borrow().values().any(|&until| until > now)
                // Failed lately: its deferred jobs come back within the longest retry delay,
                // and then still get one connection at a time, not a fresh next hop's many.
                || (dq.broken_in_a_row.get() > 0
                    && now < dq.last_broke.get().saturating_add(retry_max))
        });
    }
}

/// `body`, a report from `<>` in `msg`, remade with its returned message's header section
/// only (`why`), when the remade report `fits`; None for any other message.
fn headers_only(
    msg: &Msg,
    body: &MessageRef,
    why: dsn::HeadersOnly,
    fits: impl Fn(&[u8]) -> bool,
) -> Option<MessageRef> {
    if !msg.meta.reverse_path.is_empty() {
        return None;
    }
    dsn::with_headers_only(&body.to_vec(), why)
        .filter(|r| fits(r))
        .and_then(|r| MessageRef::from_bytes(&msg.queue_id, &r).ok())
}

/// A next hop that could not be reached: the text, the status when its jobs fail for good,
/// the next hop's name when the last failure came from a host that answered, and postern's
/// own status for a deferral no reply explains (a DNS failure's, say).
type Unopened = (
    String,
    Option<&'static str>,
    Option<String>,
    Option<&'static str>,
);

/// A next hop that could not be resolved (no host answered): failed for good with the
/// lookup's status when it is permanent, deferred with it otherwise (4.4.3 a DNS failure,
/// 4.4.4 no primary for a backup MX).
fn unresolved(domain: &str, e: &MxError) -> Unopened {
    let text = format!("{domain}: {e}");
    if e.is_permanent() {
        (text, Some(e.enhanced()), None, None)
    } else {
        (text, None, None, Some(e.enhanced()))
    }
}

/// A reply as one line of text: `550 5.1.1 text`.
fn reply_line(r: &Reply) -> String {
    let mut s = r.code.to_string();
    if let Some(e) = &r.enhanced {
        s.push(' ');
        s.push_str(&e.to_string());
    }
    for line in &r.lines {
        s.push(' ');
        s.push_str(line);
    }
    s
}

/// RET and ENVID for a next hop that offers DSN, as they came in (ENVID is still xtext).
fn dsn_mail_params(meta: &MessageMeta, out: &mut String) {
    match meta.ret {
        Some(1) => out.push_str(" RET=FULL"),
        Some(2) => out.push_str(" RET=HDRS"),
        _ => {}
    }
    if let Some(envid) = &meta.envid {
        out.push_str(" ENVID=");
        out.push_str(envid);
    }
}

/// A recipient's DSN parameters for the next hop. In a transaction without SMTPUTF8 a
/// UTF-8 ORCPT is written in its ASCII form, each non-ASCII character as `\x{HEX}`
/// (RFC 6533 3, utf-8-addr-xtext). That form is up to ten times longer: past the 500 octets
/// RFC 3461 4.2 allows an ORCPT (and the line room it gives DSN parameters) it is left out,
/// as for a next hop without DSN, rather than sent on a line the next hop may refuse.
fn dsn_rcpt_params(r: &Recipient, smtputf8: bool) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if let Some(bits) = r.notify {
        let _ = write!(out, " NOTIFY={}", Notify::from_bits(bits));
    }
    if let Some(orcpt) = &r.orcpt {
        let mut value = String::with_capacity(orcpt.len());
        if smtputf8 || orcpt.is_ascii() {
            value.push_str(orcpt);
        } else {
            for c in orcpt.chars() {
                if c.is_ascii() {
                    value.push(c);
                } else {
                    let _ = write!(value, "\\x{{{:X}}}", u32::from(c));
                }
            }
        }
        if value.len() <= postern_proto::limits::MAX_ORCPT {
            out.push_str(" ORCPT=");
            out.push_str(&value);
        }
    }
    out
}

/// Whether a message is text in the sense of RFC 5322 2.1.1 and RFC 6152 3: lines that end in
/// CRLF (the last one too), CR and LF nowhere else, no NUL, no line over 998 octets before
/// its CRLF. Octets above 127 are allowed (8-bit text). Such a body can go without BINARYMIME,
/// unless a part of it is labelled `Content-Transfer-Encoding: binary`, a label only a
/// binary transport may carry (RFC 2045 6.2): such a body is not taken for text either (the
/// label as one unfolded line without a comment, as mail software writes it).
/// `chunks`: the body in pieces, cut anywhere.
fn is_text<'a>(chunks: impl Iterator<Item = &'a [u8]>) -> bool {
    // The start of each line, enough to recognise the label.
    const PREFIX: usize = 64;
    let mut start = [0u8; PREFIX];
    let mut line = 0usize;
    let mut after_cr = false;
    for chunk in chunks {
        for &b in chunk {
            if after_cr {
                if b != b'\n' || (line <= PREFIX && labelled_binary(&start[..line])) {
                    return false;
                }
                after_cr = false;
                line = 0;
                continue;
            }
            match b {
                0 | b'\n' => return false,
                b'\r' => after_cr = true,
                _ => {
                    if let Some(slot) = start.get_mut(line) {
                        *slot = b;
                    }
                    line += 1;
                    if line > 998 {
                        return false;
                    }
                }
            }
        }
    }
    !after_cr && line == 0
}

/// Whether a line is a `Content-Transfer-Encoding: binary` header field.
fn labelled_binary(line: &[u8]) -> bool {
    const NAME: &[u8] = b"content-transfer-encoding:";
    line.len() > NAME.len()
        && line[..NAME.len()].eq_ignore_ascii_case(NAME)
        && line[NAME.len()..]
            .trim_ascii()
            .eq_ignore_ascii_case(b"binary")
}

#[cfg(test)]
mod tests {
    use super::{dsn_rcpt_params, is_text, Recipient};

    #[test]
    fn text_is_crlf_lines_of_at_most_998_octets_without_nul() {
        let text = |pieces: &[&[u8]]| is_text(pieces.iter().copied());
        assert!(text(&[b"Subject: a\r\n\r\nbody \xc3\xa9\r\n"]));
        assert!(text(&[]), "an empty body");
        // CR and LF split between pieces.
        assert!(text(&[b"a\r", b"\nb\r\n"]));
        let long = [vec![b'x'; 998], b"\r\n".to_vec()].concat();
        assert!(text(&[&long]));
        let too_long = [vec![b'x'; 999], b"\r\n".to_vec()].concat();
        assert!(!text(&[&too_long]));
        // Split over pieces, the count goes on.
        assert!(!text(&[&too_long[..500], &too_long[500..]]));
        assert!(!text(&[b"a\nb\r\n"]), "bare LF");
        assert!(!text(&[b"a\rb\r\n"]), "bare CR");
        assert!(!text(&[b"a\x00b\r\n"]), "NUL");
        assert!(!text(&[b"no line end"]), "a last line without CRLF");
        assert!(!text(&[b"ends in CR\r"]));
        // A part labelled binary is not taken for text, however its lines look.
        assert!(!text(&[
            b"Subject: a\r\n\r\n--b\r\nContent-Transfer-",
            b"Encoding:  Binary \r\n\r\nx\r\n"
        ]));
        assert!(text(&[b"Content-Transfer-Encoding: 8bit\r\n\r\nx\r\n"]));
        assert!(text(&[b"X: Content-Transfer-Encoding: binary\r\n"]));
        // Only the whole line counts, not its first 64 octets.
        let long = format!("Content-Transfer-Encoding:{}binary-ish\r\n", " ".repeat(32));
        assert!(text(&[long.as_bytes()]));
    }

    #[test]
    fn a_utf8_orcpt_is_written_in_ascii_outside_smtputf8() {
        let r = Recipient {
            path: "u@x.test".into(),
            notify: Some(3),
            orcpt: Some("utf-8;j\u{f6}ran@\u{e9}x.test".into()),
        };
        assert_eq!(
            dsn_rcpt_params(&r, false),
            " NOTIFY=SUCCESS,FAILURE ORCPT=utf-8;j\\x{F6}ran@\\x{E9}x.test"
        );
        assert_eq!(
            dsn_rcpt_params(&r, true),
            " NOTIFY=SUCCESS,FAILURE ORCPT=utf-8;j\u{f6}ran@\u{e9}x.test"
        );
    }

    #[test]
    fn an_orcpt_too_long_in_its_ascii_form_is_left_out() {
        // 140 CJK characters: 420 octets as UTF-8, 1,120 as \x{4E2D}.
        let orcpt = format!("utf-8;{}@dsn.test", "\u{4e2d}".repeat(140));
        let r = Recipient {
            path: "r1@dsn.test".into(),
            notify: Some(3),
            orcpt: Some(orcpt.clone()),
        };
        assert_eq!(dsn_rcpt_params(&r, false), " NOTIFY=SUCCESS,FAILURE");
        assert_eq!(
            dsn_rcpt_params(&r, true),
            format!(" NOTIFY=SUCCESS,FAILURE ORCPT={orcpt}")
        );
    }
}
