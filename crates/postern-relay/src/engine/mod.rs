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
//!
//! This module holds the core's state, the intake of messages and the retry loop; the rest
//! is in `places` (who gets an outbound connection under the core's cap), `worker` (one
//! connection's life), `prepare` (a job made into a transaction), `outcome` (replies made
//! into each recipient's outcome) and `reports` (the owner's status records, bounces and
//! other reports).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use event_listener::{Event, IntoNotification};
use futures_lite::future;
use indexmap::IndexMap;
use postern_proto::client::{BodyMode, ClientError, OutRecipient, Transaction, TransactionResult};
use postern_proto::{Notify, Reply};
use postern_queue::{shard_of, Depth, Mailboxes, RetryDecision, RetryPolicy, Schedule, Watermarks};
use postern_server::delivery::{Accepted, CoreHandle, Delivery, DeliveryFactory, Outcome};
use postern_server::GiveWay;
use postern_spool::{DeliveryState, MessageMeta, MessageRef, Recipient, RecoveredMessage, Status};

use crate::conn::{ConnError, Outbound, Timeouts, TlsSetup};
use crate::dsn;
use crate::mx::{MxError, NextHop, Resolver};
use crate::route::{Destination, Router};
use crate::tls::{TlsClients, TlsPolicy};

mod outcome;
mod places;
pub(crate) mod prepare;
mod reports;
mod worker;

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
    /// Recipients of the messages queued (all of each message's recipients: its whole
    /// envelope is held until it is final) at which accepting stops; 0 for no limit.
    pub queue_high_water_recipients: u64,
    /// Recipients queued at which accepting starts again.
    pub queue_low_water_recipients: u64,
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
            queue_high_water_recipients: 10_000_000,
            queue_low_water_recipients: 8_000_000,
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
    /// Where its body is read: replaced when the message is copied forward in its spool
    /// (`CoreRelay::copy_forward`), so that the old place's space is freed once the
    /// deliveries reading it are done.
    body: Mutex<MessageRef>,
    /// Deleted by the operator (`postern queue --delete`): its jobs still queued on any core
    /// are dropped instead of delivered.
    deleted: AtomicBool,
    /// When the engine took it (see [`Seen`]).
    seen: Seen,
}

/// When the engine took a message ([`mono_ms`]), and its age then (the wall clock's, from
/// its arrival): its age later is counted on from there on the monotonic clock, so that a
/// step of the wall clock ahead does not make every deferred message as old as the step
/// (the retry delay grows with the age), nor one back make it younger.
#[derive(Clone, Copy, Debug)]
struct Seen {
    at: u64,
    age: u64,
}

impl Seen {
    fn now(arrival: u64) -> Seen {
        Seen {
            at: mono_ms(),
            age: now_ms().saturating_sub(arrival),
        }
    }

    /// The message's age now (ms).
    fn age(&self) -> u64 {
        self.age.saturating_add(mono_ms().saturating_sub(self.at))
    }
}

impl Msg {
    /// The body, where it is now.
    fn body(&self) -> MessageRef {
        self.body
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The message was copied forward: its body is read from the copy from now on.
    fn moved_to(&self, body: MessageRef) {
        *self
            .body
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = body;
    }
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
    /// [`Relay::flushes`] when its time was decided (0 for one recovered at a start, decided
    /// in an earlier run): one a flush asked for since then reaches its shard due now,
    /// whatever its time (see `job_loop`).
    flushes: u64,
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
    /// The recipients `texts` speak of, in their order (the job's when split off).
    rcpts: Vec<u32>,
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
        let rcpts = job.rcpts.clone();
        (
            job,
            Note {
                status,
                text,
                texts,
                rcpts,
                remote,
            },
        )
    }
}

impl Note {
    /// Carried again with `job`, which may have fewer recipients than when it was noted
    /// (some failed meanwhile, at a next hop that could not take them): each keeps its own
    /// reply.
    fn with(self, job: Job) -> Carried {
        let texts = texts_for(&job.rcpts, &self.rcpts, self.texts, &self.text);
        Carried {
            job,
            status: self.status,
            text: self.text,
            texts,
            remote: self.remote,
        }
    }
}

/// The replies of `rcpts` (each its own from `texts`, which speak of `noted` in order, or
/// `text`), in the order of `rcpts`; none when `texts` has none.
fn texts_for(rcpts: &[u32], noted: &[u32], texts: Vec<String>, text: &str) -> Vec<String> {
    if texts.is_empty() || rcpts == noted {
        return texts;
    }
    rcpts
        .iter()
        .map(|r| {
            noted
                .iter()
                .position(|n| n == r)
                .and_then(|k| texts.get(k).cloned())
                .unwrap_or_else(|| text.to_owned())
        })
        .collect()
}

/// A connection `open` made.
struct Opened {
    conn: Outbound,
    /// Addresses that could not be reached or refused the session on the way.
    failed: Vec<SocketAddr>,
    /// The address is of a less preferred MX host than the best: the connection is used for
    /// a while only, so that the better host gets mail again once it is back.
    fallback: bool,
    /// When the DNS answers the connection was chosen by run past their TTL, and the next
    /// hop is looked up again; `None` for an address given as such.
    recheck_at: Option<Instant>,
    /// The MX preference of the host connected to (0 for other next hops).
    preference: u16,
    /// In cleartext because the address's opportunistic handshakes failed: the end of that
    /// while (ms, [`mono_ms`]), past which the connection takes no new transaction (even
    /// when the while ended as it connected).
    cleartext_until: Option<u64>,
}

/// A look-up of a kept connection's next hop under way: when to ask again and what the
/// connection was chosen as, or `None` when it is to be left.
type Recheck = std::pin::Pin<Box<dyn std::future::Future<Output = Option<(Instant, Chosen)>>>>;

/// A kept connection as chosen by the DNS, for `CoreRelay::still_chosen`.
struct Chosen {
    addr: SocketAddr,
    /// The host's name, as looked up.
    host: String,
    preference: u16,
    opened: Instant,
}

impl Chosen {
    fn new(conn: &Outbound, preference: u16) -> Chosen {
        Chosen {
            addr: conn.addr,
            host: conn.remote.clone(),
            preference,
            opened: Instant::now(),
        }
    }
}

/// What `CoreRelay::find` found for a next hop.
struct Found {
    hops: Vec<NextHop>,
    port: u16,
    /// The hosts came from MX records (or the implicit MX): each is checked for being this
    /// server once connected.
    looked_up_mx: bool,
    /// The best preference the domain publishes, hosts without an address included.
    published_best: Option<u16>,
    /// The best preference among MX hosts whose addresses could not be looked up for now.
    pending_best: Option<u16>,
    /// When the first answer the hosts rest on runs past its TTL.
    valid_until: Option<Instant>,
}

/// The least time between two lookups of a kept connection's next hop: a TTL of 0 (or of a
/// second) must not cost a lookup for every transaction.
const RECHECK_FLOOR: Duration = Duration::from_secs(1);

/// The most time between two lookups of a kept connection's next hop, whatever the TTL, as
/// Postfix bounds a connection's reuse (`smtp_connection_reuse_time_limit`, 300 s): the
/// cache's answer costs next to nothing, and a long TTL does not keep mail on a host for
/// hours after its DNS changed.
const RECHECK_CEILING: Duration = Duration::from_secs(300);

/// How long a kept connection goes on after its next hop's lookup failed for now (a DNS
/// server that does not answer) before the next one: not a query a second per connection
/// to a DNS that is down.
const RECHECK_AFTER_FAILURE: Duration = Duration::from_secs(30);

/// When to look a kept connection's next hop up again, for answers valid until `until`:
/// then, within [`RECHECK_FLOOR`] and [`RECHECK_CEILING`] from now.
fn recheck_time(until: Instant) -> Instant {
    let now = Instant::now();
    now + until
        .saturating_duration_since(now)
        .clamp(RECHECK_FLOOR, RECHECK_CEILING)
}

/// How long a job waits for its connection's look-up when it begins (see
/// `CoreRelay::still_chosen`): long enough for the resolver's cache or a DNS that answers at
/// once, short beside a transaction.
const RECHECK_WAIT: Duration = Duration::from_millis(200);

/// The longest an address whose opportunistic handshakes fail is spoken to in cleartext
/// before STARTTLS is tried again (ms); its failures in a row are remembered as long after
/// the last while ends.
const CLEARTEXT_LONGEST_MS: u64 = 3_600_000;

/// Addresses tried within one attempt of a job at most (as Postfix's
/// `smtp_mx_address_limit`): a domain with many addresses that all put mail off costs a
/// bounded number of connections per attempt.
const MAX_ADDRESSES_PER_ATTEMPT: usize = 5;

/// Addresses this machine has no way to (no route to their network, no support of their
/// family here) passed over in one attempt beside [`MAX_ADDRESSES_PER_ATTEMPT`]: they cost
/// next to nothing, but the list of them is bounded all the same.
const MAX_NO_ROUTE: usize = 64;

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

/// How the log's `relay` field and a report's account name the host that answered: its name,
/// then the address and port connected to (`mx1.example.net[192.0.2.1]:25`, as Postfix logs
/// it), so that a name with several addresses, or one that does not look like the address
/// it has, shows where the mail went. A report's `Remote-MTA` takes the name alone
/// ([`crate::dsn::mta_name`]).
fn relay_label(host: &str, addr: std::net::SocketAddr) -> String {
    format!("{host}[{}]:{}", addr.ip(), addr.port())
}

/// How an account of a failed connection names the address tried: `host [ip]`, with the
/// port where it is not SMTP's own (a `--route` or `--relay-host` to another port, where a
/// mistyped port is what the operator needs to see).
fn tried_label(host: &str, addr: std::net::SocketAddr) -> String {
    match addr.port() {
        25 => format!("{host} [{}]", addr.ip()),
        port => format!("{host} [{}]:{port}", addr.ip()),
    }
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
    /// Recipients of the queued messages, per core, and their marks.
    recipients: Depth,
    recipient_marks: Watermarks,
    resolver: Resolver,
    tls: TlsClients,
    recovered: Mutex<Vec<RecoveredMessage>>,
    /// Outbound transactions running, on all cores: a stopping core waits for them to end and
    /// their outcomes to be recorded.
    in_flight: AtomicUsize,
    /// Cores that have begun to wind down (they start no new transaction).
    winding_down: AtomicUsize,
    /// Cores whose relay started: the ones a winding down waits for. Every core that starts
    /// does so before the server says it is ready; one that failed to start never does, and
    /// a start given up stops the others without waiting for it.
    started: AtomicUsize,
    /// How many times the operator asked to try deferred mail now ([`Relay::flush`]).
    flushes: AtomicU64,
    /// Wakes every core's retry loop when a flush is asked for (from any thread).
    flush_asked: Event,
    /// How many messages the operator deleted: a core looks for their waiting jobs only
    /// when it grew.
    deletions: AtomicU64,
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

/// A silence this long (since the last reply read, and since the batch was written) before a
/// next hop ends a pipelined batch (a 421 or a close) makes the batch's replies unknown, as
/// when postern's own wait runs out: a next hop in step that had the commands would have
/// answered them, while one that never sent a reply waits for more input and ends the
/// connection on its own idle timeout (Postfix's is 10 s under stress), each later reply
/// having answered the command before its own. Longer than the delays next hops put before
/// their replies to slow a sender down (Exchange's tarpit is 5 s, Postfix's error sleep 1 s),
/// whose refusals stay known.
const SILENCE_BEFORE_BREAK: Duration = Duration::from_secs(8);

/// How long a next hop gets one transaction per round trip after a connection to it broke in
/// the middle of pipelined transactions.
const SERIAL_AFTER_BREAK: Duration = Duration::from_secs(60);

/// How long a next hop whose replies could not be read does without PIPELINING (see
/// `DestQueue::lockstep_until`): several retries at the default delays, so that a message
/// the next hop takes in spite of its reply goes to it at most once an hour.
const LOCKSTEP_AFTER_PROTOCOL_ERROR: Duration = Duration::from_secs(3600);

/// The most replies (RSET, MAIL, each RCPT, BDAT) awaited at once on a connection that
/// pipelines transactions; a few dozen octets each.
const MAX_PIPELINED_REPLIES: usize = 512;

/// A message's arrival in milliseconds since the epoch, for its queue lifetime and delay
/// warning. The spool keeps the arrival in whole seconds, so the end of that second is taken:
/// a lifetime may run up to a second long, never short.
fn arrival_ms(meta: &MessageMeta) -> u64 {
    meta.arrival.saturating_mul(1000).saturating_add(999)
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

/// The engine's clock for the windows it keeps in memory only (a next hop's pause, an address
/// passed over or broken, the hour without PIPELINING or TLS, a connection cap, when a
/// connection was last answered): milliseconds on the monotonic clock, counted on from the
/// wall clock's reading when first asked. A step of the wall clock (an NTP step, `date -s`)
/// leaves those windows as long as they were meant to be: on the wall clock a step back of a
/// day held a paused next hop's new mail for that day. The times of jobs (a retry's time, a
/// message's expiry from its arrival) stay on the wall clock, as the spool keeps them.
fn mono_ms() -> u64 {
    static START: OnceLock<(u64, Instant)> = OnceLock::new();
    let (wall, at) = *START.get_or_init(|| (now_ms(), Instant::now()));
    wall.saturating_add(u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX))
}

thread_local! {
    /// This core's place among the cores winding down (see [`Relay::factory`]).
    static WINDS_DOWN: RefCell<Option<WindsDown>> = const { RefCell::new(None) };
}

/// Counts a core among those winding down once: when its stop begins, or when its thread ends
/// without one (a core that failed).
struct WindsDown {
    relay: Arc<Relay>,
    counted: Cell<bool>,
}

impl WindsDown {
    fn count(&self) {
        if !self.counted.replace(true) {
            self.relay.winding_down.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Drop for WindsDown {
    fn drop(&mut self) {
        self.count();
    }
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
        // The queue recovery found, counted on each owner's behalf from the start: a core
        // counts its own once its delivery side starts, and until every core has, the
        // others' mail would be missing from the depth that --queue-high-water is checked
        // against (new mail taken past the mark while the start goes on).
        let (depth, recipients) = (Depth::new(cores), Depth::new(cores));
        // Every recipient of a message counts, final or not, as once its core tracks it
        // (its whole envelope stays in memory until the message is final).
        let mut counted = vec![(0u64, 0u64); cores];
        for m in recovered.iter().filter(|m| !m.is_final()) {
            let Some((messages, envelope)) = counted.get_mut(m.core as usize) else {
                continue;
            };
            *messages += 1;
            *envelope += m.meta.recipients.len() as u64;
        }
        for (core, (messages, envelope)) in counted.into_iter().enumerate() {
            depth.set(core, messages);
            recipients.set(core, envelope);
        }
        Ok(Arc::new(Relay {
            marks: Watermarks::new(config.queue_high_water, config.queue_low_water),
            recipient_marks: Watermarks::new(
                config.queue_high_water_recipients,
                config.queue_low_water_recipients,
            ),
            recipients,
            config,
            cores,
            jobs: Mailboxes::new(cores),
            reports: Mailboxes::new(cores),
            depth,
            resolver,
            tls,
            recovered: Mutex::new(recovered),
            in_flight: AtomicUsize::new(0),
            winding_down: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
            flushes: AtomicU64::new(0),
            flush_asked: Event::new(),
            deletions: AtomicU64::new(0),
        }))
    }

    /// The factory the server calls on each core.
    pub fn factory(self: &Arc<Self>) -> DeliveryFactory {
        let relay = self.clone();
        Arc::new(move |handle: CoreHandle| -> Rc<dyn Delivery> {
            relay.started.fetch_add(1, Ordering::SeqCst);
            // Counted among the cores winding down when this core's thread ends, if it has
            // not been already: a core that failed (a bug) never winds down, and the others'
            // stops would wait for it until the grace is over.
            WINDS_DOWN.with(|w| {
                let earlier = w.borrow_mut().replace(WindsDown {
                    relay: relay.clone(),
                    counted: Cell::new(false),
                });
                // One core per thread: an earlier relay's place (a test's, on this thread)
                // is not this thread's end.
                if let Some(earlier) = earlier {
                    earlier.counted.set(true);
                }
            });
            let core = CoreRelay::start(relay.clone(), handle);
            core as Rc<dyn Delivery>
        })
    }

    /// Asks every core to try its deferred mail now (SIGUSR1, `postern queue --flush`): the
    /// jobs waiting for a retry go at once, and next hops paused after failures are tried
    /// again, as are bounces waiting for the spool's room. Every core's retry loop is woken at
    /// once. Retry counts stay as they are.
    pub fn flush(&self) {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.flush_asked.notify(usize::MAX);
    }

    /// Messages not yet final, all cores together.
    pub fn queue_depth(&self) -> u64 {
        self.depth.total()
    }
}

/// The most messages copied forward in one batch (see `CoreRelay::copy_forward`).
const COPY_BATCH_MESSAGES: usize = 512;

/// About the most octets of bodies copied forward in one batch (the first message goes
/// whatever its size).
const COPY_BATCH_BYTES: u64 = 32 << 20;

/// The most batches copied forward one after another, before the rest waits for the next
/// second.
const COPY_ROUNDS: usize = 16;

/// How long a bounce that could not be spooled waits before it is tried again.
const BOUNCE_RETRY: Duration = Duration::from_secs(10);

/// A recipient failed for good: (recipient, reply, next hop, status, when).
type Failure = (u32, String, Option<String>, String, u64);

/// A recipient deferred past `--delay-warning`: (recipient, reply, next hop, status, next
/// attempt in Unix seconds).
type Delay = (u32, String, Option<String>, String, u64);

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

    /// Whether `rcpt` was warned of its delay (or its warning is being made).
    fn is_warned(&self, rcpt: u32) -> bool {
        self.warned
            .get((rcpt / 64) as usize)
            .is_some_and(|w| w & (1u64 << (rcpt % 64)) != 0)
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

/// The messages a core owns that are not yet final, by queue ID, with the sum of their
/// recipients (for the recipient mark).
#[derive(Default)]
struct Queued {
    messages: HashMap<String, Tracked>,
    recipients: u64,
}

impl Queued {
    fn insert(&mut self, queue_id: String, t: Tracked) {
        let n = t.msg.meta.recipients.len() as u64;
        if let Some(old) = self.messages.insert(queue_id, t) {
            self.recipients -= old.msg.meta.recipients.len() as u64;
        }
        self.recipients += n;
    }

    fn remove(&mut self, queue_id: &str) -> Option<Tracked> {
        let t = self.messages.remove(queue_id)?;
        self.recipients -= t.msg.meta.recipients.len() as u64;
        if sparse(self.messages.len(), self.messages.capacity()) {
            self.messages.shrink_to(self.messages.len() * 2);
        }
        Some(t)
    }

    fn get(&self, queue_id: &str) -> Option<&Tracked> {
        self.messages.get(queue_id)
    }

    fn get_mut(&mut self, queue_id: &str) -> Option<&mut Tracked> {
        self.messages.get_mut(queue_id)
    }

    fn len(&self) -> usize {
        self.messages.len()
    }
}

/// Room a collection of the queue keeps however little it holds (see [`sparse`]).
const ROOM_KEPT: usize = 1024;

/// Whether a collection holding `len` items has room for over four times as many (and more
/// than [`ROOM_KEPT`]): then it is shrunk to twice `len`, so that a queue that grew large (an
/// outage) gives its memory back as it drains, rather than keeping its largest size for good.
/// Each shrink is paid for by the removals before it.
fn sparse(len: usize, room: usize) -> bool {
    room > ROOM_KEPT && len < room / 4
}

/// Messages gathering failures for one report each (see `report_loop`), in the order they
/// began, which is the order they are done: looked up by queue ID, and taken from the front,
/// without a pass over all of them per failure or per wake-up (a queue resumed after an
/// outage may have thousands gathering at once).
#[derive(Default)]
struct Gathering {
    order: VecDeque<(String, Instant)>,
    members: std::collections::HashSet<String>,
}

impl Gathering {
    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Starts `queue_id` gathering at `since`, unless it already is.
    fn add(&mut self, queue_id: &str, since: Instant) {
        if self.members.insert(queue_id.to_owned()) {
            // Begun now, or (`since` in the past) done already: the back, or the front.
            if self.order.back().is_none_or(|(_, last)| *last <= since) {
                self.order.push_back((queue_id.to_owned(), since));
            } else {
                self.order.push_front((queue_id.to_owned(), since));
            }
        }
    }

    /// When the first message is done gathering.
    fn first_due(&self, gather: Duration) -> Option<Instant> {
        self.order.front().map(|(_, since)| *since + gather)
    }

    /// Takes the messages done gathering by `now`, or all of them.
    fn take_due(&mut self, now: Instant, gather: Duration, all: bool) -> Vec<String> {
        let mut due = Vec::new();
        while let Some((_, since)) = self.order.front() {
            if !all && *since + gather > now {
                break;
            }
            if let Some((queue_id, _)) = self.order.pop_front() {
                self.members.remove(&queue_id);
                due.push(queue_id);
            }
        }
        if sparse(self.members.len(), self.members.capacity()) {
            self.members.shrink_to(self.members.len() * 2);
        }
        if sparse(self.order.len(), self.order.capacity()) {
            self.order.shrink_to(self.order.len() * 2);
        }
        due
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
    /// Workers whose connection is open (greeting and EHLO answered), idle or not.
    connected: Cell<usize>,
    /// Workers opening a connection (from their start, or from when one begins again, until
    /// it is made or given up): each takes jobs once it is open, so a job queued meanwhile
    /// needs no connection of its own (see `CoreRelay::connections_wanted`).
    opening: Cell<usize>,
    /// When a connection to the next hop last opened or had a transaction answered (ms).
    answered_at: Cell<u64>,
    idle: Cell<usize>,
    /// The idle connections' wake-ups, the most recently idle last: a job wakes the one
    /// idle for the shortest time (see [`DestQueue::wake_idle`]).
    idle_waits: RefCell<Vec<Rc<Event>>>,
    /// Waiting in the core's `starved` list for a connection the core's cap held back.
    starved: Cell<bool>,
    /// In the core's `wanting_more` list: it has connections, and jobs they do not take.
    wanting_more: Cell<bool>,
    /// Addresses whose opportunistic TLS handshake failed: cleartext to them until then
    /// (ms), and how many handshakes in a row failed (see [`cleartext_window`]). Per
    /// address, not for the whole next hop: one host with broken TLS must not take TLS away
    /// from the domain's other MX hosts.
    cleartext: RefCell<HashMap<SocketAddr, (u64, u32)>>,
    /// The next hop could not be reached: jobs wait until then (ms) instead of each trying
    /// to connect again.
    down_until: Cell<u64>,
    /// A connection broke in the middle of pipelined transactions: one transaction per round
    /// trip until then (ms).
    serial_until: Cell<u64>,
    /// The next hop's replies could not be read (a malformed reply, or one the command
    /// cannot get): until then (ms) its connections do without PIPELINING, so that a body
    /// goes out only once its recipients are answered. Otherwise a BDAT body pipelined
    /// behind its RCPT, taken by the next hop while the RCPT's reply cannot be read, would
    /// be taken again at every retry.
    lockstep_until: Cell<u64>,
    /// Whether the next hop's latest connection offered PIPELINING and CHUNKING (assumed
    /// until one is opened): where it did not, each connection takes one job at a time,
    /// whatever `--max-transactions-in-flight` says (see `CoreRelay::jobs_per_connection`).
    pipelines: Cell<bool>,
    /// The addresses the next hop resolved to at the latest connection, in preference order.
    addrs: RefCell<Vec<SocketAddr>>,
    /// Addresses passed over until then (ms): they broke off or put off a transaction.
    avoid: RefCell<HashMap<SocketAddr, u64>>,
    /// Addresses that could not be reached or broke a connection off (421, closed, timed
    /// out), until then (ms). When every address of the next hop is here, the next hop as a
    /// whole is paused (`down_until`).
    broke: RefCell<HashMap<SocketAddr, u64>>,
    /// Connections in a row, since a transaction was last answered, that could not be made
    /// or broke off (one that broke while another connection had a transaction answered is
    /// not counted: see `CoreRelay::broke_off`).
    broken_in_a_row: Cell<u32>,
    /// Of `broken_in_a_row`, the addresses that could not be used at all (no connection
    /// made, or an error for a greeting): two in a row pause the next hop.
    unopened_in_a_row: Cell<u32>,
    /// Transactions answered by the next hop so far.
    answered: Cell<u64>,
    /// Its last [`RECENT`] outcomes, newest in the lowest bit (1: a session broken off and
    /// counted in a row, or an attempt whose connections could not be made, not taken for a
    /// connection limit; 0: a transaction answered), and how many there are (at most
    /// [`RECENT`]).
    recent: Cell<(u32, u8)>,
    /// Connections opened (greeting and EHLO answered) since the last one failed: each lets
    /// one more connection start past the one-connection limit after failures, so that a
    /// transaction that hangs does not hold every other job for the next hop, while a next
    /// hop that answers EHLO and then fails every transaction gets a few connections, not
    /// all it may have.
    opened_since_broke: Cell<u32>,
    /// When a connection last failed (ms).
    last_broke: Cell<u64>,
    /// Why the next hop is paused (status, text), while `down_until` lasts: what a job put
    /// back unsent meanwhile is deferred with (`requeue`), its text saying it was not tried
    /// (`dsn::NOT_TRIED`), with no remote host (none answered for it).
    paused_for: RefCell<Option<(String, String)>>,
    /// The most connections the next hop takes from us, learned from a connection it
    /// refused while others of ours were open or opening (a per-client limit), until
    /// `cap_until` (ms).
    cap: Cell<usize>,
    cap_until: Cell<u64>,
    /// The most connections opened to it while a lookup for one failed beside others that
    /// work (see `CoreRelay::lookup_failed_beside_others`), until `lookup_cap_until` (ms):
    /// apart from `cap`, which a resolver's fault neither tightens nor lengthens.
    lookup_cap: Cell<usize>,
    lookup_cap_until: Cell<u64>,
}

/// How many of a next hop's last outcomes [`DestQueue::mostly_failing`] looks at.
const RECENT: u8 = 16;

impl DestQueue {
    /// Notes an outcome: a transaction answered, or a connection that broke off or could not
    /// be made.
    fn note_outcome(&self, failed: bool) {
        let (bits, n) = self.recent.get();
        let bits = ((bits << 1) | u32::from(failed)) & ((1 << RECENT) - 1);
        self.recent.set((bits, n.saturating_add(1).min(RECENT)));
    }

    /// Whether at least three quarters of its last outcomes (up to [`RECENT`]) were failures:
    /// a next hop that answers many of its transactions and drops others is not down, even
    /// when drops come in a row.
    fn mostly_failing(&self) -> bool {
        let (bits, n) = self.recent.get();
        bits.count_ones() * 4 >= u32::from(n) * 3
    }

    /// Wakes up to `n` idle connections for jobs just queued, the most recently idle first.
    /// Under a trickle of mail the same few connections then take it in turn, and the others
    /// reach `--outbound-idle-timeout` and close, rather than each getting a job now and then
    /// (the longest idle first) and all of them staying open.
    fn wake_idle(&self, n: usize) {
        let mut waits = self.idle_waits.borrow_mut();
        for _ in 0..n {
            let Some(wake) = waits.pop() else {
                break;
            };
            wake.notify(1);
        }
    }

    /// Wakes idle connections for the waiting jobs that no connection woken already (and not
    /// yet run) will take: after a worker that was woken for one gave its place up instead.
    fn wake_for_waiting(&self) {
        let woken = self
            .idle
            .get()
            .saturating_sub(self.idle_waits.borrow().len());
        let uncovered = self.ready.borrow().len().saturating_sub(woken);
        self.wake_idle(uncovered);
    }
}

/// How long a next hop's connection limit learned from a refusal holds (see
/// [`DestQueue::cap`]); then more connections are tried again, and a refusal learns it anew.
const CAP_HOLDS: Duration = Duration::from_secs(300);

/// How long no more connections are opened to a next hop after one failed at its lookup
/// while others of ours to it work (see `CoreRelay::lookup_failed_beside_others`): a
/// resolver's passing fault, not a limit of the next hop's.
const LOOKUP_CAP_HOLDS: Duration = Duration::from_secs(30);

/// One core's relay.
pub struct CoreRelay {
    relay: Arc<Relay>,
    handle: CoreHandle,
    id: usize,
    tracked: RefCell<Queued>,
    dests: RefCell<IndexMap<String, Rc<DestQueue>>>,
    /// Where `forget_quiet_next_hops` goes on in `dests` at its next turn.
    forget_at: Cell<usize>,
    retry: RefCell<Schedule<Job>>,
    retry_changed: Event,
    /// The last [`Relay::flushes`] this core acted on.
    flushes_seen: Cell<u64>,
    /// Messages with relayed recipients whose success report is still to be made.
    relayed_waiting: RefCell<Vec<String>>,
    /// Messages with failed recipients whose bounce is still to be made, with when each
    /// began gathering the failures that share its report.
    failed_waiting: RefCell<Gathering>,
    /// Recipients deferred past `--delay-warning` in this batch of outcomes, by message.
    delays_waiting: RefCell<Vec<(String, Delay)>>,
    /// Bounces being made and messages being finished: a graceful stop waits for them, so
    /// that their statuses are recorded and the next run does not repeat them.
    reporting: Cell<usize>,
    /// When a failed sync of settled statuses was last logged (at most once a minute).
    sync_warned: Cell<Option<std::time::Instant>>,
    /// When a bounce put off for want of room was last logged, and how many since (at most
    /// once a minute).
    bounce_wait_logged: Cell<(Option<Instant>, u64)>,
    /// The same for messages settled with a status that could not be written.
    unrecorded_logged: Cell<(Option<Instant>, u64)>,
    /// Messages settled but for a bounce the spool could not take, waiting to try it again
    /// (no longer tracked), by queue ID: still counted in the queue's depth, as they still
    /// hold their space, and the operator may delete them (a full disk is when one would).
    bounces_waiting: RefCell<HashMap<String, Arc<Msg>>>,
    /// The recipients of the messages in `bounces_waiting`, all together.
    bounces_waiting_recipients: Cell<u64>,
    /// Messages taken out of `tracked` whose `finish` has not ended (their reports being
    /// spooled, their last statuses made durable), and their recipients: not final yet, so
    /// still counted in the queue's depth.
    finishing: Cell<(u64, u64)>,
    /// Outcomes the report loop has taken from its inbox and not yet settled.
    settling: Cell<usize>,
    /// The last [`Relay::deletions`] whose jobs this core dropped.
    deletions_seen: Cell<u64>,
    /// Messages are being copied forward in this core's spool (one batch at a time).
    copying: Cell<bool>,
    /// Outbound connections of this core (workers, from their start to their end).
    outbound: Cell<usize>,
    /// Next hops with jobs waiting that got no connection for the core's cap, in the order
    /// they asked: each connection that ends goes to the first.
    starved: RefCell<VecDeque<Rc<DestQueue>>>,
    /// Told when a next hop is starved: idle connections of others give up their place.
    slot_wanted: Event,
    /// Connections counted out (see `leave`) still waiting for their QUIT's reply.
    quitting: Cell<usize>,
    /// Connections saying QUIT, however they ended (see `say_quit`): a stop waits for them.
    closing: Cell<usize>,
    /// Next hops that have connections and wanted more when the core had none to give: a
    /// place no next hop in line takes goes to the first of them.
    wanting_more: RefCell<VecDeque<Rc<DestQueue>>>,
    /// Jobs that failed together in numbers (a next hop's whole queue, when it could not be
    /// reached), for `settle_loop` to settle in turns with the core's sessions.
    backlog: RefCell<VecDeque<Settlement>>,
    /// Told when `backlog` gets a batch.
    backlog_added: Event,
}

/// Jobs that failed the same way, to be settled by `settle_loop` (see
/// [`CoreRelay::settle_all_in_turns`]).
struct Settlement {
    jobs: Vec<Job>,
    permanent: bool,
    status: String,
    text: String,
    remote: Option<String>,
}

/// How many jobs failed together are settled at once, without giving way: more go to the
/// core's `settle_loop`. Settling one costs some microseconds (a log line and a report per
/// recipient): a next hop's queue of 200,000 held a core for a second.
const SETTLE_AT_ONCE: usize = 64;

impl Delivery for CoreRelay {
    fn accepted(&self, message: Accepted) {
        let msg = Arc::new(Msg {
            queue_id: message.queue_id,
            owner: self.id,
            seen: Seen::now(arrival_ms(&message.meta)),
            meta: message.meta,
            body: Mutex::new(message.body),
            deleted: AtomicBool::new(false),
        });
        let all: Vec<u32> = (0..msg.meta.recipients.len() as u32).collect();
        self.track(msg.clone(), all.len());
        self.dispatch(&msg, &all, 0, 0);
    }

    fn accepting(&self) -> Result<(), &'static str> {
        // Both marks are looked at every time, so each keeps its hysteresis.
        let messages = self.relay.marks.accepting(self.relay.depth.total());
        let recipients = self
            .relay
            .recipient_marks
            .accepting(self.relay.recipients.total());
        match (messages, recipients) {
            (true, true) => Ok(()),
            (false, _) => Err("the queue is at --queue-high-water"),
            (true, false) => Err("the queue is at --queue-high-water-recipients"),
        }
    }

    fn wind_down(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>> {
        Box::pin(async move {
            // A core notices the stop on its own tick, so until every core winds down, one
            // may still start a transaction whose outcome comes here. Once all do, none
            // starts (a worker checks its core's stop and counts itself in flight in one
            // step), and a transaction's reports are sent before it stops counting: then
            // every outcome is in its owner's inbox, and the report loop records it (appends
            // its status) before it counts it out of `settling`.
            let counted = WINDS_DOWN.with(|w| match &*w.borrow() {
                Some(w) if Arc::ptr_eq(&w.relay, &self.relay) => {
                    w.count();
                    true
                }
                _ => false,
            });
            if !counted {
                self.relay.winding_down.fetch_add(1, Ordering::SeqCst);
            }
            // Idle connections woken by the stop start their QUIT (counted in `closing`)
            // once they run: a moment for them before the first look.
            glommio::timer::sleep(WIND_DOWN_POLL).await;
            let inbox = self.relay.reports.get(self.id);
            while self.relay.winding_down.load(Ordering::SeqCst)
                < self.relay.started.load(Ordering::SeqCst)
                || self.relay.in_flight.load(Ordering::SeqCst) > 0
                || !inbox.is_empty()
                // A batch taken from the inbox, not all recorded yet (the loop gives way
                // between outcomes).
                || self.settling.get() > 0
                // Outcomes taken but not yet reported: the report loop may be gathering
                // a message's failures, and then makes their reports.
                || !self.failed_waiting.borrow().is_empty()
                || !self.relayed_waiting.borrow().is_empty()
                || !self.delays_waiting.borrow().is_empty()
                || self.reporting.get() > 0
                // Connections ending say QUIT and read its reply (RFC 5321 4.1.1.10), which
                // without PIPELINING waits behind a RSET's reply: a few round trips.
                || self.closing.get() > 0
            {
                glommio::timer::sleep(WIND_DOWN_POLL).await;
            }
        })
    }

    fn deleted(&self, queue_id: &str) -> Option<usize> {
        // Its outcomes still to come are ignored (nothing tracks it), and its jobs queued on
        // any core are dropped when their turn comes.
        let Some(t) = self.tracked.borrow_mut().remove(queue_id) else {
            // Settled, but for its bounce, which waits for room in the spool: that bounce
            // is not made (the operator's deletion says not to report), and none of its
            // recipients is still to be settled.
            let msg = self.bounces_waiting.borrow().get(queue_id).cloned()?;
            self.bounce_waits(&msg, false);
            msg.deleted.store(true, Ordering::Release);
            self.relay.deletions.fetch_add(1, Ordering::AcqRel);
            return Some(0);
        };
        t.msg.deleted.store(true, Ordering::Release);
        self.relay.deletions.fetch_add(1, Ordering::AcqRel);
        self.publish_depth();
        // Deleted by the operator: counted apart from the failures, which an alert may watch
        // (those waiting for their bounce were counted when they failed).
        for _ in 0..t.pending {
            self.handle.count_outcome(Outcome::Deleted);
        }
        Some(t.pending)
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
            tracked: RefCell::new(Queued::default()),
            dests: RefCell::new(IndexMap::new()),
            forget_at: Cell::new(0),
            retry: RefCell::new(Schedule::new()),
            retry_changed: Event::new(),
            flushes_seen: Cell::new(0),
            relayed_waiting: RefCell::new(Vec::new()),
            failed_waiting: RefCell::new(Gathering::default()),
            delays_waiting: RefCell::new(Vec::new()),
            reporting: Cell::new(0),
            sync_warned: Cell::new(None),
            bounce_wait_logged: Cell::new((None, 0)),
            unrecorded_logged: Cell::new((None, 0)),
            bounces_waiting: RefCell::new(HashMap::new()),
            bounces_waiting_recipients: Cell::new(0),
            finishing: Cell::new((0, 0)),
            settling: Cell::new(0),
            deletions_seen: Cell::new(0),
            copying: Cell::new(false),
            outbound: Cell::new(0),
            starved: RefCell::new(VecDeque::new()),
            slot_wanted: Event::new(),
            quitting: Cell::new(0),
            closing: Cell::new(0),
            wanting_more: RefCell::new(VecDeque::new()),
            backlog: RefCell::new(VecDeque::new()),
            backlog_added: Event::new(),
        });
        glommio::spawn_local(core.clone().job_loop()).detach();
        glommio::spawn_local(core.clone().report_loop()).detach();
        glommio::spawn_local(core.clone().retry_loop()).detach();
        glommio::spawn_local(core.clone().housekeeping()).detach();
        glommio::spawn_local(core.clone().settle_loop()).detach();
        core.resume_recovered();
        core
    }

    /// Takes this core's share of what recovery found: messages whose owner is this core.
    fn resume_recovered(&self) {
        let mine: Vec<RecoveredMessage> = match self.relay.recovered.lock() {
            Ok(mut all) => {
                let (mine, rest) = std::mem::take(&mut *all)
                    .into_iter()
                    // Each on its owner only: statuses written to another core's spool
                    // would not settle it there (the start moves, by a fold, what a core
                    // past --cores held, before this).
                    .partition(|m| m.core as usize == self.id);
                *all = rest;
                mine
            }
            Err(_) => return,
        };
        // Whether attempts brought forward are still recorded (see below).
        let mut record_moves = true;
        for m in mine {
            if m.is_final() {
                continue;
            }
            let msg = Arc::new(Msg {
                queue_id: m.queue_id.clone(),
                owner: self.id,
                seen: Seen::now(arrival_ms(&m.meta)),
                meta: m.meta.clone(),
                body: Mutex::new(m.body().clone()),
                deleted: AtomicBool::new(false),
            });
            let mut now_rcpts = Vec::new();
            let mut later: HashMap<u64, Vec<u32>> = HashMap::new();
            // Warned of their delay in an earlier run: not warned again.
            let mut warned = Vec::new();
            let (arrival, now) = (arrival_ms(&msg.meta), now_ms());
            for (i, s) in m.statuses.iter().enumerate() {
                match s.as_ref().map(|s| &s.state) {
                    None => now_rcpts.push(i as u32),
                    Some(&DeliveryState::Deferred {
                        next_attempt,
                        warned: was_warned,
                    }) => {
                        if was_warned {
                            warned.push(i as u32);
                        }
                        let at = self.relay.config.retry.resume_at(
                            arrival,
                            next_attempt.saturating_mul(1000),
                            now,
                        );
                        // Brought forward by this run's settings (a shorter --retry-max or
                        // --max-queue-lifetime) to a time still ahead: recorded, so that
                        // `postern queue` lists the attempt this run makes. (One due now
                        // records its own outcome at once.) A record that cannot be written
                        // costs only that, the attempt is made all the same; after the first
                        // failure (a full disk) no more are tried in this pass, which would
                        // only fail in turn and take room from the outcomes and bounces.
                        let moved = reports::attempt_secs(at);
                        if moved < next_attempt && at > now && record_moves {
                            if let Some(recorded) = s {
                                let status = Status {
                                    state: DeliveryState::Deferred {
                                        next_attempt: moved,
                                        warned: was_warned,
                                    },
                                    reply: recorded.reply.clone(),
                                };
                                record_moves = self
                                    .handle
                                    .append_status(&msg.queue_id, i as u32, &status)
                                    .is_ok();
                            }
                        }
                        later.entry(at).or_default().push(i as u32);
                    }
                    Some(_) => {}
                }
            }
            let pending = now_rcpts.len() + later.values().map(Vec::len).sum::<usize>();
            self.track(msg.clone(), pending);
            if let Some(t) = self.tracked.borrow_mut().get_mut(&msg.queue_id) {
                for i in warned {
                    t.warn_once(i);
                }
            }
            self.dispatch(&msg, &now_rcpts, 0, 0);
            for (at, rcpts) in later {
                // Its wait was decided in an earlier run: any flush of this one counts for
                // it, also one asked for before it reaches its shard.
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
        let (n, recipients) = {
            let tracked = self.tracked.borrow();
            let waiting = self.bounces_waiting.borrow().len() as u64;
            let (finishing, finishing_recipients) = self.finishing.get();
            (
                tracked.len() as u64 + waiting + finishing,
                tracked.recipients + self.bounces_waiting_recipients.get() + finishing_recipients,
            )
        };
        self.relay.depth.set(self.id, n);
        self.relay.recipients.set(self.id, recipients);
        self.handle.set_queue_depth(n, recipients);
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
                    // Only recovered jobs are sent with a time ahead, their waits decided
                    // in an earlier run.
                    flushes: 0,
                },
            );
        }
    }

    // ----- shard side -----

    async fn job_loop(self: Rc<Self>) {
        let inbox = self.relay.jobs.get(self.id);
        let mut turns = GiveWay::new();
        loop {
            while let Some(job) = inbox.pop() {
                tracing::debug!(queue_id = %job.msg.queue_id, core = self.id, "job received");
                // A flush asked for since its time was decided counts for it, also one this
                // core acted on while the job was on its way (a restart hands its queue over
                // a batch at a time, and a flush at once after it found only the first
                // batches waiting here).
                let flushed = job.flushes != self.relay.flushes.load(Ordering::SeqCst);
                if job.not_before > now_ms() && !flushed {
                    self.schedule(job);
                } else {
                    self.enqueue(job);
                }
                // Thousands at once (a restart's queue, a core's retries): the core's sessions
                // get their turns meanwhile.
                turns.step().await;
            }
            if self.handle.is_stopping() {
                return;
            }
            future::or(inbox.wait(), self.handle.stopped()).await;
        }
    }

    fn schedule(&self, job: Job) {
        if job.msg.deleted.load(Ordering::Acquire) {
            return;
        }
        // Kept by the engine's own clock: the time left until the job's, so that a step of
        // the wall clock moves no retry already decided (a step back of a day held every
        // deferred job a day more).
        let at = mono_ms().saturating_add(job.not_before.saturating_sub(now_ms()));
        let earlier = self.retry.borrow().next_deadline().is_none_or(|d| at < d);
        self.retry.borrow_mut().insert(at, job);
        if earlier {
            self.retry_changed.notify(1);
        }
    }

    /// Settles [`Settlement`]s, giving way between jobs. Never ends, also while stopping: a
    /// batch is counted in [`Relay::in_flight`] until settled, so that every core's stop
    /// waits for its reports.
    async fn settle_loop(self: Rc<Self>) {
        let mut turns = GiveWay::new();
        loop {
            let added = self.backlog_added.listen();
            loop {
                let next = self.backlog.borrow_mut().pop_front();
                let Some(batch) = next else { break };
                for job in batch.jobs {
                    let remote = batch.remote.clone();
                    self.settle_all(job, batch.permanent, &batch.status, &batch.text, remote);
                    turns.step().await;
                }
                self.relay.in_flight.fetch_sub(1, Ordering::SeqCst);
            }
            added.await;
        }
    }

    /// [`Self::settle_all`] for each of `jobs`: at once when they are few, otherwise in turns
    /// with the core's sessions, by `settle_loop`.
    fn settle_all_in_turns(
        &self,
        jobs: Vec<Job>,
        permanent: bool,
        status: &str,
        text: &str,
        remote: Option<String>,
    ) {
        if jobs.len() <= SETTLE_AT_ONCE {
            for job in jobs {
                self.settle_all(job, permanent, status, text, remote.clone());
            }
            return;
        }
        self.relay.in_flight.fetch_add(1, Ordering::SeqCst);
        self.backlog.borrow_mut().push_back(Settlement {
            jobs,
            permanent,
            status: status.to_owned(),
            text: text.to_owned(),
            remote,
        });
        self.backlog_added.notify(1);
    }

    async fn retry_loop(self: Rc<Self>) {
        let mut turns = GiveWay::new();
        loop {
            let listener = self.retry_changed.listen();
            // Listening before looking: a flush asked for in between still wakes the loop.
            let flushed = self.relay.flush_asked.listen();
            let mut due = self.flush_if_asked();
            let now = mono_ms();
            // Taken out before any goes on: a job that `enqueue` puts back (its next hop is
            // paused until a time this reading of the clock has passed but its own, taken
            // from the wall clock, has not) waits for the next pass, not this one.
            {
                let mut retry = self.retry.borrow_mut();
                due.extend(std::iter::from_fn(|| retry.pop_due(now)));
            }
            for job in due {
                self.enqueue(job);
                turns.step().await;
            }
            // Read again: the jobs above may have taken a while (given way to others).
            let now = mono_ms();
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
    /// addresses are forgotten, and every job waiting for its retry goes now. A next hop's
    /// failures in a row are kept: one still down gets one connection for all its jobs, and
    /// one that is back opens more as its connections open. Returns those jobs, for the
    /// caller to put in line giving way between them (after an outage they may be many).
    fn flush_if_asked(self: &Rc<Self>) -> Vec<Job> {
        let asked = self.relay.flushes.load(Ordering::SeqCst);
        if asked == self.flushes_seen.replace(asked) {
            return Vec::new();
        }
        for dq in self.dests.borrow().values() {
            dq.down_until.set(0);
            dq.paused_for.borrow_mut().take();
            dq.avoid.borrow_mut().clear();
            dq.broke.borrow_mut().clear();
        }
        let jobs: Vec<Job> = self.retry.borrow_mut().drain().collect();
        tracing::info!(
            core = self.id,
            jobs = jobs.len(),
            "flush: deferred mail is tried now"
        );
        jobs.into_iter()
            .map(|job| Job {
                not_before: 0,
                ..job
            })
            .collect()
    }

    fn enqueue(self: &Rc<Self>, job: Job) {
        if job.msg.deleted.load(Ordering::Acquire) {
            // Deleted by the operator: its owner has settled and forgotten it.
            return;
        }
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
                    connected: Cell::new(0),
                    opening: Cell::new(0),
                    answered_at: Cell::new(0),
                    idle: Cell::new(0),
                    idle_waits: RefCell::new(Vec::new()),
                    starved: Cell::new(false),
                    wanting_more: Cell::new(false),
                    cleartext: RefCell::new(HashMap::new()),
                    down_until: Cell::new(0),
                    serial_until: Cell::new(0),
                    lockstep_until: Cell::new(0),
                    pipelines: Cell::new(true),
                    addrs: RefCell::new(Vec::new()),
                    avoid: RefCell::new(HashMap::new()),
                    broke: RefCell::new(HashMap::new()),
                    broken_in_a_row: Cell::new(0),
                    unopened_in_a_row: Cell::new(0),
                    answered: Cell::new(0),
                    recent: Cell::new((0, 0)),
                    opened_since_broke: Cell::new(0),
                    last_broke: Cell::new(0),
                    paused_for: RefCell::new(None),
                    cap: Cell::new(0),
                    cap_until: Cell::new(0),
                    lookup_cap: Cell::new(0),
                    lookup_cap_until: Cell::new(0),
                })
            })
            .clone();
        // The pause is on the engine's own clock, the job's times on the wall clock: the
        // pause's end is taken over as the time left of it.
        let (mono, down_until) = (mono_ms(), dq.down_until.get());
        if down_until > mono {
            let not_before = now_ms().saturating_add(down_until - mono);
            // A job whose lifetime ends before the next hop's pause does gets its last
            // attempt now, not after the pause.
            let expiry = self.relay.config.retry.expiry(arrival_ms(&job.msg.meta));
            if expiry > not_before {
                self.schedule(Job { not_before, ..job });
                return;
            }
        }
        dq.ready.borrow_mut().push_back(job);
        if dq.idle.get() > 0 {
            // One more idle connection for each job: a plain `notify(1)` wakes no second one
            // while the first has not run yet, and jobs queued in one go (a flush, retries
            // come due together) would all wait for that one.
            dq.wake_idle(1);
        }
        if self.connections_wanted(&dq, 0) > 0 && dq.workers.get() < self.most_workers(&dq) {
            self.start_worker(&dq);
        }
    }

    /// Reclaims spool segments now and then (status-only segments have nothing else to free
    /// them) and keeps the depth gauge fresh.
    /// Drops the jobs of messages the operator deleted that wait here for their retry or for
    /// a connection: they would only hold their bodies' space (and make connections). Looked
    /// for only after a deletion: a long queue is not walked every second for nothing.
    fn drop_deleted(&self) {
        let deletions = self.relay.deletions.load(Ordering::Acquire);
        if self.deletions_seen.replace(deletions) == deletions {
            return;
        }
        let deleted = |job: &Job| job.msg.deleted.load(Ordering::Acquire);
        self.retry.borrow_mut().retain(|job| !deleted(job));
        for dq in self.dests.borrow().values() {
            dq.ready.borrow_mut().retain(|job| !deleted(job));
        }
    }

    /// Copies forward the messages that keep the oldest segment of this core's spool while
    /// the segments behind it pile up (a message deferred for days behind a day of other
    /// mail delivered): once each copy is durable its old place goes, and its deliveries read
    /// the copy (docs/durability.md, "Reclaiming space"). One batch at a time, off the
    /// housekeeping loop, since each copy waits for a group commit.
    fn copy_forward(self: &Rc<Self>) {
        if self.copying.get() || self.handle.is_stopping() {
            return;
        }
        let first = self.copy_batch();
        if first.is_empty() {
            return;
        }
        self.copying.set(true);
        let core = self.clone();
        spawn_detached(async move {
            let (mut copied, mut bytes) = (0usize, 0u64);
            let mut batch = first;
            // Batch after batch while the spool asks for more (bounded: the rest waits for
            // the next second), each after a group commit.
            for _ in 0..COPY_ROUNDS {
                let bodies: Vec<MessageRef> = batch.iter().map(|m| m.body()).collect();
                let refs: Vec<(&str, &MessageMeta, &MessageRef)> = batch
                    .iter()
                    .zip(&bodies)
                    .map(|(m, b)| (m.queue_id.as_str(), &m.meta, b))
                    .collect();
                let moved = core.handle.copy_forward(&refs).await;
                let before = copied;
                for (msg, moved) in batch.iter().zip(moved) {
                    if let Some(body) = moved {
                        copied += 1;
                        bytes += body.len();
                        msg.moved_to(body);
                    }
                }
                if copied == before || core.handle.is_stopping() {
                    break;
                }
                batch = core.copy_batch();
                if batch.is_empty() {
                    break;
                }
            }
            if copied > 0 {
                tracing::debug!(
                    core = core.id,
                    messages = copied,
                    bytes,
                    "copied waiting messages forward in the spool, so that the segments \
                     they kept can be deleted"
                );
            }
            core.copying.set(false);
        });
    }

    /// The next messages to copy forward, as the spool asks for them: a bounded batch (the
    /// copies are written on the core, between its sessions' work).
    fn copy_batch(&self) -> Vec<Arc<Msg>> {
        let ids = self.handle.next_to_copy(COPY_BATCH_MESSAGES);
        if ids.is_empty() {
            return Vec::new();
        }
        let mut budget = COPY_BATCH_BYTES;
        let tracked = self.tracked.borrow();
        ids.iter()
            .filter_map(|id| tracked.get(id).map(|t| t.msg.clone()))
            .take(COPY_BATCH_MESSAGES)
            .take_while(|m| {
                let first = budget == COPY_BATCH_BYTES;
                budget = budget.saturating_sub(m.body().len());
                first || budget > 0
            })
            .collect()
    }

    async fn housekeeping(self: Rc<Self>) {
        // At once too: a server restarted again and again (each opening writes to a segment
        // of its own) would otherwise keep one more segment per run shorter than a second
        // behind a waiting message.
        // (After a yield: spawned, this task runs at once, before the recovered messages
        // are tracked.)
        future::yield_now().await;
        self.copy_forward();
        while !self.handle.is_stopping() {
            future::or(
                glommio::timer::sleep(Duration::from_secs(1)),
                self.handle.stopped(),
            )
            .await;
            self.drop_deleted();
            self.handle.reclaim();
            self.copy_forward();
            self.publish_depth();
            self.prune_wanting_more();
            self.forget_quiet_next_hops();
            self.handle.set_outbound(
                (self.outbound.get() + self.quitting.get()) as u64,
                self.dests.borrow().len() as u64,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed connection's account names the port where it is not 25: a wrong one given
    /// with --route or --relay-host shows there.
    #[test]
    fn an_account_of_a_connection_names_a_port_other_than_25() {
        let at = |a: &str| a.parse::<std::net::SocketAddr>().unwrap();
        assert_eq!(tried_label("mx", at("192.0.2.1:25")), "mx [192.0.2.1]");
        assert_eq!(
            tried_label("mx", at("192.0.2.1:2525")),
            "mx [192.0.2.1]:2525"
        );
        assert_eq!(tried_label("::1", at("[::1]:2526")), "::1 [::1]:2526");
    }

    #[test]
    fn a_job_carried_again_with_fewer_recipients_keeps_each_one_s_reply() {
        let texts = || {
            vec![
                "450 a busy".to_owned(),
                "451 b later".into(),
                "452 c full".into(),
            ]
        };
        assert_eq!(texts_for(&[0, 4, 7], &[0, 4, 7], texts(), "x"), texts());
        assert_eq!(
            texts_for(&[0, 7], &[0, 4, 7], texts(), "x"),
            ["450 a busy", "452 c full"]
        );
        assert_eq!(texts_for(&[9], &[0, 4, 7], texts(), "x"), ["x"]);
        assert!(texts_for(&[0, 7], &[0, 4, 7], Vec::new(), "x").is_empty());
    }

    #[test]
    fn a_drained_queue_gives_its_room_back() {
        let body = MessageRef::from_bytes("q", b"x\r\n").unwrap_or_else(|e| panic!("{e}"));
        let msg = |i: usize| {
            Arc::new(Msg {
                queue_id: format!("m{i}"),
                owner: 0,
                seen: Seen::now(0),
                meta: MessageMeta {
                    arrival: 0,
                    client: String::new(),
                    helo: String::new(),
                    reverse_path: String::new(),
                    recipients: vec![Recipient {
                        path: "a@dest.test".into(),
                        notify: None,
                        orcpt: None,
                    }],
                    envid: None,
                    ret: None,
                    body_type: 0,
                    smtputf8: false,
                },
                body: Mutex::new(body.clone()),
                deleted: AtomicBool::new(false),
            })
        };
        let mut queued = Queued::default();
        let mut gathering = Gathering::default();
        let since = Instant::now();
        for i in 0..20_000 {
            queued.insert(
                format!("m{i}"),
                Tracked {
                    msg: msg(i),
                    pending: 1,
                    failed: Vec::new(),
                    bouncing: false,
                    relayed: Vec::new(),
                    warned: Vec::new(),
                    unrecorded: false,
                },
            );
            gathering.add(&format!("m{i}"), since);
        }
        assert!(queued.messages.capacity() >= 20_000);
        for i in 10..20_000 {
            assert!(queued.remove(&format!("m{i}")).is_some());
        }
        assert_eq!((queued.len(), queued.recipients), (10, 10));
        assert!(
            queued.messages.capacity() <= ROOM_KEPT * 4,
            "room for {} kept for 10 messages",
            queued.messages.capacity()
        );
        assert!((0..10).all(|i| queued.get(&format!("m{i}")).is_some()));
        let due = gathering.take_due(since, Duration::ZERO, false);
        assert_eq!(due.len(), 20_000);
        assert!(gathering.is_empty());
        assert!(gathering.members.capacity() <= ROOM_KEPT * 4);
        assert!(gathering.order.capacity() <= ROOM_KEPT * 4);
    }

    #[test]
    fn the_recovered_queue_is_counted_for_every_core_before_any_starts() {
        // Two messages of two recipients on core 1, one of them with a recipient delivered
        // (it still counts: its envelope stays in memory, as once the core tracks it), and
        // one message on core 0 whose recipients are all done.
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let meta = |i: u64| MessageMeta {
            arrival: 1_795_346_220 + i,
            client: "192.0.2.1".into(),
            helo: "client.test".into(),
            reverse_path: "s@origin.test".into(),
            recipients: ["a@dest.test", "b@dest.test"]
                .into_iter()
                .map(|path| Recipient {
                    path: path.into(),
                    notify: None,
                    orcpt: None,
                })
                .collect(),
            envid: None,
            ret: None,
            body_type: 1,
            smtputf8: false,
        };
        let delivered = Status {
            state: DeliveryState::Delivered,
            reply: "250 ok".into(),
        };
        let write = |core: u32, done: &[(u64, &[u32])]| {
            let mut spool = postern_spool::Spool::open(dir.path(), core, Default::default())
                .unwrap_or_else(|e| panic!("{e}"));
            for &(i, rcpts) in done {
                let mut draft = spool.begin(&meta(i)).unwrap_or_else(|e| panic!("{e}"));
                spool
                    .append(&mut draft, b"Subject: x\r\n\r\nx\r\n")
                    .unwrap_or_else(|e| panic!("{e}"));
                let id = draft.queue_id().to_owned();
                spool.finish(draft).unwrap_or_else(|e| panic!("{e}"));
                for &r in rcpts {
                    spool
                        .append_status(&id, r, &delivered)
                        .unwrap_or_else(|e| panic!("{e}"));
                }
            }
            spool.sync_now().unwrap_or_else(|e| panic!("{e}"));
        };
        write(1, &[(1, &[]), (2, &[0])]);
        write(0, &[(3, &[0, 1])]);
        let recovered = postern_spool::recover(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let relay = Relay::new(RelayConfig::default(), 2, recovered.messages)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(relay.depth.total(), 2);
        assert_eq!(relay.recipients.total(), 4);
    }

    #[test]
    fn messages_gathering_are_taken_in_the_order_they_are_done_each_once() {
        let gather = Duration::from_millis(500);
        let t0 = Instant::now();
        let mut g = Gathering::default();
        g.add("A", t0);
        g.add("B", t0 + Duration::from_millis(300));
        // Again: keeps its start.
        g.add("A", t0 + Duration::from_millis(400));
        assert_eq!(g.first_due(gather), Some(t0 + gather));
        assert!(g
            .take_due(t0 + Duration::from_millis(499), gather, false)
            .is_empty());
        assert_eq!(g.take_due(t0 + gather, gather, false), ["A"]);
        assert_eq!(g.first_due(gather), Some(t0 + Duration::from_millis(800)));
        // One done already goes first.
        g.add("C", t0);
        assert_eq!(g.take_due(t0 + gather, gather, false), ["C"]);
        // At the stop, all of them.
        g.add("D", t0 + Duration::from_secs(9));
        assert_eq!(g.take_due(t0, gather, true), ["B", "D"]);
        assert!(g.is_empty());
        // Taken, it may gather again.
        g.add("A", t0 + Duration::from_secs(10));
        assert_eq!(
            g.take_due(t0 + Duration::from_secs(11), gather, false),
            ["A"]
        );
    }
}
