//! What one core's sessions share: settings, policy, TLS, metrics, shutdown, the spool.
//! Everything here is owned by one executor thread; nothing is written from another core.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam::utils::CachePadded;
use event_listener::Event;
use postern_proto::ServerConfig;

use crate::config::Settings;
use crate::limits::ConnectionLimits;
use crate::metrics::CoreMetrics;
use crate::relay::RelayPolicy;
use crate::store::CoreStore;

/// At most one log line about spool errors per core this often.
const SPOOL_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// Whether a log line kept to one every `every` goes out now, given `log` (when the last went
/// out, and how many were held back since): with how many were held back when it does (and
/// the count starts again), None when it is held back (and counted).
fn due(log: &Cell<(Option<std::time::Instant>, u64)>, every: Duration) -> Option<u64> {
    log_due_at(log, every, std::time::Instant::now())
}

/// [`due`] at `now`.
pub fn log_due_at(
    log: &Cell<(Option<std::time::Instant>, u64)>,
    every: Duration,
    now: std::time::Instant,
) -> Option<u64> {
    let (last, quiet) = log.get();
    if last.is_some_and(|t| now.duration_since(t) < every) {
        log.set((last, quiet + 1));
        return None;
    }
    log.set((Some(now), 0));
    Some(quiet)
}

/// At most one line a minute per core about failed TLS handshakes: scanners fail them by the
/// thousand, and the counter has them all.
const TLS_FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);

/// Messages the operator asked to delete (`postern queue --delete`, then SIGUSR2), handed
/// from the signal thread to the cores: each core takes those of its own spool at its next
/// tick (50 ms).
#[derive(Debug, Default)]
pub struct Deletions {
    /// Raised with each request, so that a core looks at the list only when it changed.
    asked: AtomicU64,
    /// Queue IDs with their number of recipients, not yet taken by their core.
    waiting: Mutex<Vec<(String, u32)>>,
}

/// The most recipients a deletion records where `--max-recipients` is lower (a message has
/// at most `--max-recipients`, which bounds the count otherwise).
const MAX_RECIPIENTS_DELETED: u32 = 100_000;

/// Relay refusals logged per second and core.
const REFUSALS_LOGGED: u32 = 20;

/// Requests kept for cores that have not taken them yet: as many as `postern queue
/// --delete` asks at once ([`MAX_DELETIONS_ASKED`]), several commands' worth.
const MAX_DELETIONS_WAITING: usize = 4 * MAX_DELETIONS_ASKED;

/// The most queue IDs one `postern queue --delete` asks to delete.
pub const MAX_DELETIONS_ASKED: usize = 1_000_000;

impl Deletions {
    /// Asks the cores to delete these messages (queue ID, recipients).
    pub fn ask(&self, ids: Vec<(String, u32)>) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        waiting.extend(ids);
        let over = waiting.len().saturating_sub(MAX_DELETIONS_WAITING);
        let dropped: Vec<String> = waiting.drain(..over).map(|(id, _)| id).collect();
        drop(waiting);
        if let Some(first) = dropped.first() {
            // Never silently: the commands that asked wait for them and say they were not
            // deleted, pointing at this log.
            tracing::warn!(
                dropped = dropped.len(),
                first = %first,
                "deletion requests past {MAX_DELETIONS_WAITING} waiting for their cores: the \
                 oldest are not acted on"
            );
        }
        self.asked.fetch_add(1, Ordering::AcqRel);
    }

    /// The requests for `core`'s messages, taken out of the list.
    fn take_for(&self, core: usize) -> Vec<(String, u32)> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let (mine, others): (Vec<_>, Vec<_>) = std::mem::take(&mut *waiting)
            .into_iter()
            .partition(|(id, _)| postern_spool::owner_core(id) == Some(core as u32));
        *waiting = others;
        mine
    }
}

/// The process-wide stop request, set from the signal thread.
#[derive(Debug, Default)]
pub struct StopFlag {
    stop: AtomicBool,
    hurry: AtomicBool,
    drain: AtomicBool,
}

impl StopFlag {
    /// Says the server is about to stop (`--drain-time`): `/readyz` answers 503 while it
    /// still takes mail.
    pub fn drain(&self) {
        self.drain.store(true, Ordering::Release);
    }
    /// Whether the server drains or stops.
    pub fn is_draining(&self) -> bool {
        self.drain.load(Ordering::Acquire) || self.is_stopping()
    }
    /// Asks every core to stop.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }
    /// Whether a stop was asked for.
    pub fn is_stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
    /// Asks every core to stop without waiting out the shutdown grace (a second SIGTERM):
    /// sessions still in a transaction are told 421 now, deliveries in flight are left.
    pub fn hurry(&self) {
        self.stop();
        self.hurry.store(true, Ordering::Release);
    }
    /// Whether the grace was cut short.
    pub fn is_hurried(&self) -> bool {
        self.hurry.load(Ordering::Acquire)
    }
}

/// One core's shared state.
pub(crate) struct Core {
    /// The core's number, which is also its spool's.
    pub(crate) id: usize,
    pub(crate) settings: Arc<Settings>,
    pub(crate) proto: Arc<ServerConfig>,
    pub(crate) relay: RelayPolicy,
    pub(crate) tls: Option<futures_rustls::TlsAcceptor>,
    pub(crate) limits: Arc<ConnectionLimits>,
    pub(crate) metrics: RefCell<CoreMetrics>,
    pub(crate) published: Arc<Mutex<CoreMetrics>>,
    pub(crate) store: CoreStore,
    /// Set once this core has seen the stop request.
    pub(crate) stopping: Cell<bool>,
    /// The process-wide stop request, which a session also reads before each command: the
    /// core's own flag follows it only at the next tick of `watch`.
    pub(crate) stop_flag: Arc<StopFlag>,
    /// The operator's deletions, shared by the cores.
    pub(crate) deletions: Arc<Deletions>,
    /// Relay refusals logged in the current second (its start, how many, how many more were
    /// not): a flood of them must not crowd out the lines that matter.
    pub(crate) refusals_logged: Cell<(Option<std::time::Instant>, u32, u64)>,
    /// Woken when `stopping` is set, and again when `grace_over` is.
    pub(crate) stop_event: Event,
    /// The shutdown grace is over: sessions still inside a body are told 421 and closed.
    pub(crate) grace_over: Cell<bool>,
    /// Sessions open on this core.
    pub(crate) sessions: Cell<usize>,
    /// Sessions over, their connections closed on our side, reading what their clients still
    /// send (see `session::serve`); no longer counted under the connection limits.
    pub(crate) lingering: Cell<usize>,
    /// Connections refused over the limits, their 421 written and our side closed, reading
    /// what their clients still send (see `session::linger`); they share the sessions' cap.
    pub(crate) refusals_lingering: Cell<usize>,
    /// Woken when a session ends.
    pub(crate) session_ended: Event,
    /// The spool is past its high-water mark (until it falls to the low mark).
    pub(crate) spool_full: Cell<bool>,
    /// With `--hold`: past the queue's high-water mark, until its low-water mark.
    pub(crate) queue_full: Cell<bool>,
    /// With `--hold`: the messages each core keeps (this core writes only its own).
    pub(crate) held: Arc<[CachePadded<AtomicU64>]>,
    /// New transactions were refused at the last look (for the log of each change).
    pub(crate) refusing: Cell<bool>,
    /// When a spool error was last logged, and how many came since.
    pub(crate) spool_error_log: Cell<(Option<std::time::Instant>, u64)>,
    /// When a failed TLS handshake was last logged, and how many failed since.
    pub(crate) tls_failure_log: Cell<(Option<std::time::Instant>, u64)>,
    /// Where acknowledged messages go (none: they stay in the spool).
    pub(crate) delivery: std::cell::RefCell<Option<Rc<dyn crate::delivery::Delivery>>>,
}

/// Why new mail is refused when the queue's marks say so.
const QUEUE_FULL: &str = "the queue is at --queue-high-water";

/// A core's held count before it has read its spool.
pub(crate) const NOT_COUNTED: u64 = u64::MAX;

impl Core {
    /// Hands an acknowledged message to the delivery side.
    pub(crate) fn accepted(&self, message: crate::delivery::Accepted) {
        let delivery = self.delivery.borrow().clone();
        match delivery {
            Some(d) => d.accepted(message),
            None => self.count_held(),
        }
    }

    /// With `--hold`: publishes how many messages this core keeps, for every core's look at
    /// the queue's marks.
    pub(crate) fn count_held(&self) {
        if self.settings.held_queue_marks.is_none() {
            return;
        }
        if let Some(c) = self.held.get(self.id) {
            c.store(self.store.live_messages() as u64, Ordering::Relaxed);
        }
    }

    /// Logs a recipient refused for relaying, within [`Self::may_log_refusal`].
    pub(crate) fn log_relay_refusal(&self, client: std::net::IpAddr, to: &str) {
        if self.may_log_refusal() {
            tracing::info!(
                client = %client,
                to = ?to,
                "recipient refused: 554 5.7.1 relay access denied"
            );
        }
    }

    /// Logs a message refused after its data began (too large, a bare line end, a full
    /// spool, a loop), within [`Self::may_log_refusal`].
    pub(crate) fn log_message_refusal(
        &self,
        client: std::net::IpAddr,
        refused: &postern_proto::RefusedMessage,
    ) {
        if self.may_log_refusal() {
            tracing::info!(
                client = %client,
                helo = ?refused.helo,
                from = ?refused.reverse_path,
                nrcpt = refused.recipients,
                "message refused: {} {} {}",
                refused.code,
                refused.enhanced,
                refused.text
            );
        }
    }

    /// Whether a refusal may be logged: at most [`REFUSALS_LOGGED`] a second on this core;
    /// past that they are counted, and the count is logged once the second is over.
    fn may_log_refusal(&self) -> bool {
        let now = std::time::Instant::now();
        self.end_refusal_window(now);
        let (since, logged, unlogged) = self.refusals_logged.get();
        let since = since.unwrap_or(now);
        if logged < REFUSALS_LOGGED {
            self.refusals_logged
                .set((Some(since), logged + 1, unlogged));
            true
        } else {
            self.refusals_logged
                .set((Some(since), logged, unlogged + 1));
            false
        }
    }

    /// Closes the second of refusals logged once it is over, logging how many were not
    /// (called with each refusal and at each tick of the core, so that the count of a flood
    /// that stopped is not lost).
    pub(crate) fn end_refusal_window(&self, now: std::time::Instant) {
        let (since, _, unlogged) = self.refusals_logged.get();
        let Some(at) = since else {
            return;
        };
        if now.duration_since(at) < Duration::from_secs(1) {
            return;
        }
        if unlogged > 0 {
            tracing::info!(
                unlogged,
                "more refusals than are logged ({REFUSALS_LOGGED} a second): recipients \
                 refused for relaying, messages refused"
            );
        }
        self.refusals_logged.set((None, 0, 0));
    }

    /// Deletes a message of this core's spool for the operator: its delivery drops it, each
    /// recipient is recorded as failed (no report is made: a failed status on disk means the
    /// report was made), and once that is durable the message is forgotten and its space
    /// reclaimed. An ID this spool does not hold leaves records nobody reads. The task that
    /// waits for the records to be durable, where there is one.
    pub(crate) fn delete(
        self: &Rc<Self>,
        queue_id: &str,
        recipients: u32,
    ) -> Option<glommio::Task<()>> {
        if !self.store.is_live(queue_id) {
            // Delivered (or deleted) since the listing the request came from: nothing to
            // record, and no deletion to log.
            tracing::info!(
                queue_id = %queue_id,
                "not deleted: no longer queued (delivered or deleted since it was listed)"
            );
            return None;
        }
        // The count comes from the request (the listing's): bounded, against a forged one,
        // by the most a message may have.
        let most = u32::try_from(self.settings.max_recipients)
            .unwrap_or(u32::MAX)
            .max(MAX_RECIPIENTS_DELETED);
        let recipients = recipients.min(most);
        let delivery = self.delivery.borrow().clone();
        // How many it stops: those the delivery side still had to settle, or with nothing
        // delivering (--hold) every recipient the listing gave. A delivery side that no
        // longer tracks the message has its outcomes and is making it final.
        let stopped = match delivery {
            Some(ref d) => match d.deleted(queue_id) {
                Some(n) => u32::try_from(n).unwrap_or(u32::MAX),
                None => {
                    tracing::info!(
                        queue_id = %queue_id,
                        "not deleted: no longer queued (every recipient has its outcome)"
                    );
                    return None;
                }
            },
            None => recipients,
        };
        let status = postern_spool::Status {
            state: postern_spool::DeliveryState::Failed,
            reply: postern_spool::DELETED_BY_OPERATOR.to_owned(),
        };
        let mut recorded = true;
        for rcpt in 0..recipients {
            if let Err(e) = self.store.append_status(queue_id, rcpt, &status) {
                self.metrics.borrow_mut().spool_errors += 1;
                tracing::error!(
                    queue_id = %queue_id,
                    "deleting: a status could not be written ({e}); the message is forgotten in \
                     this run, and a restart may deliver the recipients not recorded"
                );
                recorded = false;
                break;
            }
        }
        if delivery.is_none() {
            // With nothing delivering (--hold), no delivery side counts the recipients that
            // were deleted: counted here, as the delivery side counts those it stops.
            self.metrics.borrow_mut().deleted += u64::from(stopped);
        }
        let core = self.clone();
        let queue_id = queue_id.to_owned();
        Some(glommio::spawn_local(async move {
            // As for a message settled by its delivery: forgotten even when the records could
            // not be made durable, or its segments, and every later one, would stay. Logged
            // as deleted once that is durable: before, a restart could still deliver it.
            match core.store.flush_statuses(&queue_id).await {
                Ok(()) if recorded => {
                    tracing::info!(
                        queue_id = %queue_id,
                        recipients = stopped,
                        "deleted by the operator"
                    );
                }
                Ok(()) => {}
                Err(e) => tracing::error!(
                    queue_id = %queue_id,
                    "deleting: the statuses could not be synced ({e}); the message is forgotten \
                     in this run, and a restart may deliver it"
                ),
            }
            if let Err(e) = core.store.mark_final(&queue_id) {
                core.spool_error("reclaiming segments", &e);
            }
        }))
    }

    /// Deletes `batch` for the operator, a few hundred messages at a time: between them the
    /// core's sessions run, and the tasks waiting for the records to be durable stay few
    /// however many messages a request names.
    async fn delete_all(self: Rc<Self>, batch: Vec<(String, u32)>) {
        /// Messages deleted before their records are waited for.
        const AT_ONCE: usize = 256;
        for chunk in batch.chunks(AT_ONCE) {
            let waiting: Vec<_> = chunk
                .iter()
                .filter_map(|(queue_id, recipients)| self.delete(queue_id, *recipients))
                .collect();
            for t in waiting {
                t.await;
            }
            glommio::yield_if_needed().await;
        }
    }

    /// Whether new transactions may start: the spool below its high-water mark (this core's
    /// share of it) and the delivery side not pushing back. Each change is logged once.
    pub(crate) fn accepting(&self) -> bool {
        let (open, why) = self.admission(false);
        if open == self.refusing.get() {
            self.refusing.set(!open);
            if open {
                tracing::info!(core = self.id, "accepting new mail again");
            } else {
                tracing::warn!(core = self.id, "new mail gets 452 4.3.1: {why}");
            }
        }
        open
    }

    /// Whether new transactions may start, and if not why, without logging a change. With
    /// `starting`, cores that have not counted their held mail yet count as holding none.
    fn admission(&self, starting: bool) -> (bool, &'static str) {
        if !self.spool_accepting() {
            (false, "the spool is at --spool-high-water")
        } else {
            let delivery = self.delivery.borrow().clone();
            match delivery {
                Some(d) => match d.accepting() {
                    Ok(()) => (true, QUEUE_FULL),
                    Err(why) => (false, why),
                },
                None => self.held_accepting(starting),
            }
        }
    }

    /// With nothing delivering (`--hold`), the queue's marks apply to the messages all cores
    /// keep (each core's count as it last published it).
    /// A core that has not read its spool yet (at start-up) counts as unknown: until every
    /// core has, new mail waits rather than pass the mark unseen (with `starting`, for the
    /// copy a core publishes before it is ready, they count as holding none: every core has
    /// counted by the time the server is ready).
    fn held_accepting(&self, starting: bool) -> (bool, &'static str) {
        let Some((high, low)) = self.settings.held_queue_marks else {
            return (true, QUEUE_FULL);
        };
        self.count_held();
        let mut live = 0u64;
        for c in self.held.iter() {
            match c.load(Ordering::Relaxed) {
                NOT_COUNTED if starting => {}
                NOT_COUNTED => return (false, "the queue is still being counted at start-up"),
                n => live += n,
            }
        }
        // As the delivery's marks: full at the high mark whatever it was, so that equal
        // marks do not flip at each look.
        let full = live >= high || (self.queue_full.get() && live > low);
        self.queue_full.set(full);
        (!full, QUEUE_FULL)
    }

    /// The spool's high-water mark with hysteresis: full at the mark, open again at 80 % of it.
    /// Each core watches its own share (the mark divided by the cores), so no core reads
    /// another's spool.
    fn spool_accepting(&self) -> bool {
        let mark = self.settings.spool_high_water;
        if mark == 0 {
            return true;
        }
        let share = mark / self.settings.cores.max(1) as u64;
        let used = self.store.bytes_in_use();
        let full = if self.spool_full.get() {
            used > share / 10 * 8
        } else {
            used >= share
        };
        self.spool_full.set(full);
        !full
    }

    /// Counts a failed TLS handshake and logs it, with the client and why: the first at once,
    /// then at most one line every [`TLS_FAILURE_LOG_EVERY`] with how many failed meanwhile
    /// (`more_since_last`). Each is logged at debug level too.
    pub(crate) fn tls_failure(&self, client: std::net::SocketAddr, why: &dyn std::fmt::Display) {
        self.metrics.borrow_mut().tls_failures += 1;
        tracing::debug!(core = self.id, %client, "TLS handshake failed: {why}");
        let Some(quiet) = due(&self.tls_failure_log, TLS_FAILURE_LOG_EVERY) else {
            return;
        };
        tracing::info!(
            core = self.id,
            %client,
            more_since_last = quiet,
            "TLS handshake failed: {why}"
        );
    }

    /// Counts a spool error and logs it: the first at once, then at most one line every
    /// [`SPOOL_ERROR_LOG_EVERY`] with how many came meanwhile, so a full or broken disk is in
    /// the log without flooding it.
    pub(crate) fn spool_error(&self, what: &str, e: &dyn std::fmt::Display) {
        self.metrics.borrow_mut().spool_errors += 1;
        let Some(quiet) = due(&self.spool_error_log, SPOOL_ERROR_LOG_EVERY) else {
            return;
        };
        tracing::error!(
            core = self.id,
            spool = %self.settings.spool_dir.display(),
            more_since_last = quiet,
            "spool error while {what}: {e}"
        );
    }

    /// Copies the core's figures to where the scraper reads them.
    pub(crate) fn publish(&self) {
        let refusing = !self.accepting();
        self.publish_as(refusing, false);
    }

    /// The first copy, made before the core says it is ready (so that the first scrape and
    /// `/readyz` see its queue and spool, not zeros). Cores that have not counted their held
    /// mail yet count as holding none, and a refusal is not logged: by the time the server is
    /// ready every core has counted, and the next copy and MAIL see all of them.
    pub(crate) fn publish_first(&self) {
        let (open, _) = self.admission(true);
        self.publish_as(!open, true);
    }

    /// Without `wait`, a copy that a scrape is reading (merging it with the other cores') is
    /// left for the next tick rather than waited for: the core's sessions do not wait on a
    /// scraper.
    fn publish_as(&self, refusing: bool, wait: bool) {
        let slot = if wait {
            self.published.lock().ok()
        } else {
            self.published.try_lock().ok()
        };
        let Some(mut slot) = slot else {
            return;
        };
        self.metrics.borrow_mut().age(std::time::Instant::now());
        let mut m = self.metrics.borrow().clone();
        m.active_sessions = self.sessions.get() as u64;
        m.spool_bytes = self.store.bytes_in_use();
        m.drafts_moved = self.store.drafts_moved();
        if self.delivery.borrow().is_none() {
            // Held mail (--hold): nothing delivers, so the queue is what the spool keeps live.
            m.queue_depth = self.store.live_messages() as u64;
        }
        m.refusing = u64::from(refusing);
        *slot = m;
    }

    /// Whether a stop was asked for, on this core or by the process (not yet seen by `watch`).
    pub(crate) fn stop_asked(&self) -> bool {
        self.stopping.get() || self.stop_flag.is_stopping()
    }

    /// Waits until a stop is requested on this core.
    pub(crate) async fn stopped(&self) {
        self.until(&self.stopping).await;
    }

    /// Waits until the shutdown grace is over.
    pub(crate) async fn grace_ended(&self) {
        self.until(&self.grace_over).await;
    }

    async fn until(&self, flag: &Cell<bool>) {
        loop {
            if flag.get() {
                return;
            }
            let listener = self.stop_event.listen();
            if flag.get() {
                return;
            }
            listener.await;
        }
    }
}

/// Watches the process-wide flag and tells the core; publishes metrics on the way (a copy of
/// four histograms is some 600 KB, so it is made every 250 ms, not on every tick). It goes on
/// publishing while the core stops, so that the figures of the transactions finished in the
/// grace are seen; the core drops it at its very end.
pub(crate) async fn watch(core: Rc<Core>, flag: Arc<StopFlag>) {
    const TICK: Duration = Duration::from_millis(50);
    const PUBLISH_EVERY: u32 = 5;
    let mut ticks = 0u32;
    let mut deletions_seen = 0;
    loop {
        glommio::timer::sleep(TICK).await;
        ticks += 1;
        core.end_refusal_window(std::time::Instant::now());
        let asked = core.deletions.asked.load(Ordering::Acquire);
        if asked != deletions_seen {
            deletions_seen = asked;
            let batch = core.deletions.take_for(core.id);
            // By a task of its own: a disk that hangs holds the deletions, not this watch
            // (the stop must still be heard).
            if !batch.is_empty() {
                glommio::spawn_local(core.clone().delete_all(batch)).detach();
            }
        }
        if ticks % PUBLISH_EVERY == 0 {
            core.publish();
        }
        if flag.is_stopping() && !core.stopping.get() {
            core.stopping.set(true);
            core.stop_event.notify(usize::MAX);
        }
    }
}
