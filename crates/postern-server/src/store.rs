//! The core's spool as the sessions see it: begin, append, commit (awaiting the group
//! commit), abort. The sync runs on glommio's blocking thread pool, never on the core.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use event_listener::Event;
use postern_proto::address::{canonical_domain, local_part_value, same_mailbox};
use postern_proto::{BodyType, Envelope, Notify, Ret};
use postern_spool::{
    MessageMeta, MessageRef, Recipient, Spool, SpoolError, SpoolOptions, Status, SyncBatch, Ticket,
    TicketState,
};

use crate::core::Core;
use crate::error::StartError;
use crate::relay::RelayPolicy;

pub(crate) use postern_spool::Draft;

/// What the spool records about a message, from the session.
pub(crate) struct Meta<'a> {
    pub(crate) client: SocketAddr,
    /// The address the client reached us at (`postmaster@[it]` is our postmaster).
    pub(crate) local: IpAddr,
    pub(crate) helo: &'a str,
    pub(crate) envelope: &'a Envelope,
    pub(crate) arrival: SystemTime,
    /// Recognises the postmaster's addresses.
    pub(crate) relay: &'a RelayPolicy,
    /// Our host name.
    pub(crate) hostname: &'a str,
    /// `--postmaster`, where the postmaster's mail goes.
    pub(crate) postmaster: Option<&'a str>,
}

/// The envelope's recipients as the spool keeps them: the postmaster's sent where the operator
/// said, and each mailbox once (in the form it was first given, or in its ASCII form where the
/// client gave that too). Local parts compare by their
/// value (quotes and quoted pairs aside) with their case, domains in their canonical form. A
/// mailbox given again with other DSN parameters keeps every report either asked for
/// ([`merge_notify`]) and the first ORCPT given.
fn recipients(m: &Meta<'_>) -> Vec<Recipient> {
    let count = m.envelope.recipient_count();
    let mut out: Vec<Recipient> = Vec::with_capacity(count);
    // Most messages have a few recipients: compare in place; a map only for long lists.
    let mut seen = (count > 16).then(HashMap::<String, usize>::new);
    for r in m.envelope.recipients() {
        let mut rcpt = Recipient {
            path: r.path.to_owned(),
            notify: r.notify.map(|n| n.bits()),
            orcpt: r.orcpt.map(str::to_owned),
        };
        if m.relay.is_postmaster(r.path, m.local) {
            postmaster(&mut rcpt, m.hostname, m.postmaster);
        }
        let taken = match seen.as_mut() {
            Some(seen) => {
                let key = match rcpt.path.rsplit_once('@') {
                    Some((local, domain)) => {
                        format!("{}@{}", local_part_value(local), canonical_domain(domain))
                    }
                    None => rcpt.path.clone(),
                };
                match seen.entry(key) {
                    std::collections::hash_map::Entry::Occupied(e) => Some(*e.get()),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(out.len());
                        None
                    }
                }
            }
            None => out.iter().position(|o| same_mailbox(&o.path, &rcpt.path)),
        };
        match taken {
            Some(i) => {
                let first = &mut out[i];
                first.notify = merge_notify(first.notify, rcpt.notify);
                if first.orcpt.is_none() {
                    first.orcpt = rcpt.orcpt;
                }
                // The same mailbox with A-labels where the first form had U-labels: the form
                // a next hop without SMTPUTF8 can take too.
                if !first.path.is_ascii() && rcpt.path.is_ascii() {
                    first.path = rcpt.path;
                }
            }
            None => out.push(rcpt),
        }
    }
    out
}

/// The NOTIFY of one recipient given twice: every report either RCPT asked for. No NOTIFY is
/// this server's default (failure and delay reports), which NEVER adds nothing to; joined with
/// anything else it is written out, since a next hop may take no NOTIFY as failure reports
/// only (RFC 3461 4.1) and drop a delay report one RCPT asked for.
fn merge_notify(a: Option<u8>, b: Option<u8>) -> Option<u8> {
    const DEFAULT: u8 = Notify::FAILURE | Notify::DELAY;
    match (a, b) {
        (Some(a), Some(b)) => Some(a | b),
        (None, None) | (None, Some(0)) | (Some(0), None) => None,
        (None, Some(x)) | (Some(x), None) => Some(x | DEFAULT),
    }
}

/// Sends a postmaster recipient where the operator said (`--postmaster`), or, without that, to
/// `postmaster@<hostname>` in lower case. The address the client used is kept as its
/// ORCPT (when it gave none), so reports still name it.
fn postmaster(rcpt: &mut Recipient, hostname: &str, to: Option<&str>) {
    let target = match to {
        Some(to) => to.to_owned(),
        // One spelling, whatever case the client used, so that the copies are one recipient.
        None => format!("postmaster@{}", hostname.to_ascii_lowercase()),
    };
    if target == rcpt.path {
        return;
    }
    // Only an address (RFC 3461 4.2: `rfc822;` takes an addr-spec): the bare `<Postmaster>`
    // is none, and its report names where it went.
    if rcpt.orcpt.is_none()
        && rcpt.path.is_ascii()
        && rcpt.path.contains('@')
        && !rcpt.path.contains(['+', '='])
    {
        rcpt.orcpt = Some(format!("rfc822;{}", rcpt.path));
    }
    rcpt.path = target;
}

/// One core's spool.
pub(crate) struct CoreStore {
    spool: RefCell<Spool>,
    /// Woken when a message is finished and waits for a sync.
    work: Event,
    /// Woken after each sync.
    synced: Event,
    /// Woken when the segment being made ahead of time is ready (or failed).
    spare_made: Event,
    /// Messages refused to their clients after a failed sync, whose final statuses are not
    /// durable yet: queue ID, recipients, the ticket of the last status written, and the
    /// tries left to write them again should that sync fail too.
    withdrawn: RefCell<Vec<Withdrawn>>,
    /// The latest status record's ticket.
    last_status: Cell<Option<Ticket>>,
    /// Where the blocking pool leaves a finished sync for the core to collect.
    finished: Arc<FinishedSync>,
    /// Whether a sync is running and not yet collected.
    syncing: Cell<bool>,
    /// When a slow sync on the core was last logged (`--sync-on-core`).
    slow_sync_said: Cell<Option<std::time::Instant>>,
    /// Syncs of the group commit that failed, since the start.
    failed_syncs: Cell<u64>,
    /// Whether the last failure (a sync's, or a write's) was the disk's want of room, as on
    /// a copy-on-write file system: the messages it failed are answered as over a full disk.
    last_failure_no_space: Cell<bool>,
    /// Woken when segments were freed, for [`unlink_freed`] to delete them off the core.
    freed: Event,
    /// Whether [`unlink_freed`] has a batch on the blocking pool; woken by `freed` when done.
    unlinking: Cell<bool>,
}

/// A sync the blocking pool has finished, waiting for the core. Whichever task of the core
/// runs first collects it: a session after a read, or the sync's own task once glommio hands
/// back the blocking pool's result (which it does only between rounds of its run queue).
#[derive(Default)]
struct FinishedSync {
    ready: AtomicBool,
    slot: Mutex<Option<(SyncBatch, std::io::Result<()>)>>,
}

impl FinishedSync {
    /// Leaves a sync's outcome for [`collect_sync`].
    fn put(&self, batch: SyncBatch, result: std::io::Result<()>) {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some((batch, result));
        self.ready.store(true, Ordering::Release);
    }
}

/// Runs a group commit's writes and sync. A panic would leave the core waiting for this sync
/// for ever: it fails as a sync does instead (451 to the clients waiting on it).
fn run_sync(batch: &SyncBatch) -> std::io::Result<()> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| batch.run()))
        .unwrap_or_else(|_| Err(std::io::Error::other("the sync panicked")))
}

impl CoreStore {
    /// Checks at start-up that the spool directory can be created and written.
    pub(crate) fn check_dir(dir: &Path) -> Result<(), StartError> {
        let advice = |e: std::io::Error| {
            // What to change depends on what is there.
            let what = if dir.exists() && !dir.is_dir() {
                "it is not a directory: remove it or pass another --spool DIR"
            } else if e.raw_os_error() == Some(libc::EROFS) {
                "its file system is read-only here: remount it read-write, or under systemd \
                 with ProtectSystem= create the directory or list it in ReadWritePaths=; or \
                 pass another --spool DIR"
            } else if e.kind() == std::io::ErrorKind::PermissionDenied {
                "make it writable by this user, or pass another --spool DIR"
            } else if dir.symlink_metadata().is_ok() && !dir.exists() {
                "it is a symbolic link to nothing: fix the link or pass another --spool DIR"
            } else {
                "create it or pass --spool DIR"
            };
            StartError::Spool(format!(
                "{} is not a writable directory ({e}); {what}",
                dir.display()
            ))
        };
        postern_spool::create_private_dir(dir).map_err(advice)?;
        probe_writable(dir).map_err(advice)
    }

    pub(crate) fn open(
        dir: &Path,
        core: usize,
        segment_size: u64,
        cores: usize,
    ) -> Result<CoreStore, StartError> {
        // Each core writes its own directory, which may differ from the root (made by another
        // user, mounted read-only).
        let own = dir.join(core.to_string());
        if own.symlink_metadata().is_ok() && !own.is_dir() {
            return Err(StartError::Spool(format!(
                "{} is not a directory, and core {core} keeps its messages there: move it \
                 out of the spool or pass another --spool DIR",
                own.display()
            )));
        }
        if own.is_dir() {
            probe_writable(&own).map_err(|e| {
                StartError::Spool(format!(
                    "{} is not a writable directory ({e}); make it writable by this user",
                    own.display()
                ))
            })?;
        }
        let core = u32::try_from(core).map_err(|_| StartError::Spool("too many cores".into()))?;
        let mut spool = Spool::open(dir, core, SpoolOptions { segment_size })
            .map_err(|e| StartError::Spool(format!("{}: {e}", dir.display())))?;
        spool.set_unlink_later(true);
        // Two segments for each core of the file system's space are kept from new mail: for
        // every core to copy its waiting mail forward and write outcomes when new mail has
        // filled the disk (see `Spool::set_reserve`); none on a file system too small for it.
        spool.set_reserve(postern_spool::reserve_for(dir, segment_size, cores));
        Ok(CoreStore {
            spool: RefCell::new(spool),
            work: Event::new(),
            synced: Event::new(),
            spare_made: Event::new(),
            withdrawn: RefCell::new(Vec::new()),
            last_status: Cell::new(None),
            finished: Arc::default(),
            syncing: Cell::new(false),
            slow_sync_said: Cell::new(None),
            failed_syncs: Cell::new(0),
            last_failure_no_space: Cell::new(false),
            freed: Event::new(),
            unlinking: Cell::new(false),
        })
    }

    /// Messages finished and not yet final (recovered ones included).
    pub(crate) fn live_messages(&self) -> usize {
        self.spool.borrow().live_messages()
    }

    /// Mail is held (`--hold`): nothing becomes final, so no segment goes behind a message
    /// moved forward, and none is moved.
    pub(crate) fn hold_mail(&self) {
        self.spool.borrow_mut().set_move_drafts(false);
    }

    /// Messages still being received moved forward in this run.
    pub(crate) fn drafts_moved(&self) -> u64 {
        self.spool.borrow().drafts_moved()
    }

    pub(crate) fn bytes_in_use(&self) -> u64 {
        self.spool.borrow().bytes_in_use()
    }

    /// The spool's record of a message from the session's envelope.
    pub(crate) fn meta(m: &Meta<'_>) -> MessageMeta {
        let env = m.envelope;
        MessageMeta {
            arrival: m
                .arrival
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            // An IPv4 client on a dual-stack listener is itself, not `::ffff:a.b.c.d`.
            client: m.client.ip().to_canonical().to_string(),
            helo: m.helo.to_owned(),
            reverse_path: env.reverse_path().to_owned(),
            recipients: recipients(m),
            envid: env.envid().map(str::to_owned),
            ret: env.ret().map(|r| match r {
                Ret::Full => 1,
                Ret::Hdrs => 2,
            }),
            body_type: match env.body_type() {
                BodyType::SevenBit => 0,
                BodyType::EightBitMime => 1,
                BodyType::BinaryMime => 2,
            },
            smtputf8: env.smtputf8(),
        }
    }

    /// Waits, when the segment being made ahead of time is needed for this message's start
    /// record and first writes, until it is ready (a few milliseconds, right after start-up or
    /// after a segment filled faster than the next could be made).
    pub(crate) async fn spare_for(&self, meta: &MessageMeta) {
        while self.spool.borrow_mut().start_awaits_spare(meta) {
            let listener = self.spare_made.listen();
            if !self.spool.borrow_mut().start_awaits_spare(meta) {
                break;
            }
            listener.await;
        }
    }

    pub(crate) fn begin(&self, meta: &MessageMeta) -> Result<Draft, SpoolError> {
        let begun = self.spool.borrow_mut().begin(meta);
        self.failed_write(begun)
    }

    /// [`CoreStore::begin`] for a failure report made here, which may take half the spool's
    /// reserve.
    fn begin_report(&self, meta: &MessageMeta) -> Result<Draft, SpoolError> {
        let begun = self.spool.borrow_mut().begin_report(meta);
        self.failed_write(begun)
    }

    /// Whether `draft` keeps the spool's oldest segment while other mail fills the spool
    /// behind it: its next append moves it forward ([`postern_spool::Spool::holds_back`]).
    pub(crate) fn holds_back(&self, draft: &Draft) -> bool {
        self.spool.borrow().holds_back(draft)
    }

    pub(crate) fn append(&self, draft: &mut Draft, bytes: &[u8]) -> Result<(), SpoolError> {
        let appended = self.spool.borrow_mut().append(draft, bytes);
        self.failed_write(appended)
    }

    /// A write into a segment that fails fails every ticket not yet synced, other sessions'
    /// among them (see `Spool`'s failed writes): those waiting for theirs are woken to see it,
    /// rather than wait for the next sync, which an idle core may never make.
    fn failed_write<T>(&self, result: Result<T, SpoolError>) -> Result<T, SpoolError> {
        if let Err(e) = &result {
            if !matches!(e, SpoolError::SyncFailed(_)) {
                self.last_failure_no_space
                    .set(matches!(e, SpoolError::NoSpace(_)));
            }
            self.synced.notify(usize::MAX);
        }
        result
    }

    /// A message's failure as its client is told it: over a full disk (`452 4.3.1`) when
    /// the failure that took it was the disk's want of room.
    fn as_failed(&self, e: SpoolError) -> SpoolError {
        match e {
            SpoolError::SyncFailed(why) if self.last_failure_no_space.get() => {
                SpoolError::NoSpace(std::io::Error::other(why))
            }
            e => e,
        }
    }

    pub(crate) fn abort(&self, draft: Draft) {
        let mut spool = self.spool.borrow_mut();
        spool.abort(draft);
        // Its ABORT record may have made a write that failed, failing every ticket not yet
        // synced (as in `failed_write`): those waiting for theirs look again.
        self.synced.notify(usize::MAX);
        // The segments it filled go (unless older mail holds them), and the batch their
        // seals wait for runs now rather than with the next message: until it has, their
        // files stay open, and a deleted one keeps its space (a full disk would stay full).
        let _ = spool.reclaim();
        let wanted = spool.sync_wanted();
        drop(spool);
        self.wake_unlinker();
        if wanted {
            self.work.notify(1);
        }
    }

    /// Finishes the message and waits until a group commit has made it durable.
    pub(crate) async fn commit(&self, draft: Draft) -> Result<(String, MessageRef), SpoolError> {
        let queue_id = draft.queue_id().to_owned();
        let recipients = draft.recipients();
        let finished = self.spool.borrow_mut().finish_with_body(draft);
        let (ticket, pending) = self.failed_write(finished).map_err(|e| self.as_failed(e))?;
        if let Err(e) = self.wait(ticket).await {
            // Refused to its client: nothing delivers it, and its segments must not stay.
            let mut spool = self.spool.borrow_mut();
            // (Segments that could not be deleted stay for the next start.)
            let ticket = match spool.forget_failed(&queue_id, recipients) {
                Ok((_, ticket)) => ticket,
                Err(_) => None,
            };
            // Its final statuses are written again if they could not be written or the sync
            // meant for them fails too (a disk failing for a while): see `rewithdraw`.
            self.withdrawn.borrow_mut().push(Withdrawn {
                queue_id: queue_id.clone(),
                recipients,
                ticket,
                tries: WITHDRAW_TRIES,
                retry_at: std::time::Instant::now() + WITHDRAW_PAUSE,
            });
            // Its statuses go with the next sync, which nothing else may ask for soon (an
            // idle core): until they are durable, a restart would deliver it.
            let wanted = spool.sync_wanted();
            drop(spool);
            if wanted {
                self.work.notify(1);
            }
            self.wake_unlinker();
            return Err(e);
        }
        let body = self.spool.borrow().body(pending).map_err(|_| {
            SpoolError::Io(std::io::Error::other(
                "spool body not durable after its sync",
            ))
        })?;
        Ok((queue_id, body))
    }

    /// Spools a whole message made locally and waits until it is durable; one that `finishes`
    /// other mail (a failure report, which lets its message leave the queue) may take half
    /// the spool's reserve, others (a delay warning) keep it as new mail does.
    pub(crate) async fn inject(
        &self,
        meta: &MessageMeta,
        body: &[u8],
        finishes: bool,
    ) -> Result<(String, MessageRef), SpoolError> {
        // As a session does: a message that would fill the segment waits for the one being
        // made ahead rather than make another on the core.
        self.spare_for(meta).await;
        let mut draft = if finishes {
            self.begin_report(meta)?
        } else {
            self.begin(meta)?
        };
        if let Err(e) = self.append(&mut draft, body) {
            self.abort(draft);
            return Err(e);
        }
        self.commit(draft).await
    }

    /// The live messages to copy forward now, at most `most` (`Spool::next_to_copy`).
    pub(crate) fn next_to_copy(&self, most: usize) -> Vec<String> {
        self.spool.borrow_mut().next_to_copy(most)
    }

    /// Writes each of these live messages (queue ID, envelope and body as spooled) again at
    /// the end of the spool with its outcomes so far, waits until the copies are durable (one
    /// group commit for all), and lets the segments that held them go. Returns, in the same
    /// order, the body to read each from now on, or None where it was not copied (final, or
    /// being copied, already; or past an error, which is returned too; or once `stopping`
    /// says so). A message not copied stays where it was.
    pub(crate) async fn copy_forward(
        &self,
        messages: &[(&str, &MessageMeta, &MessageRef)],
        stopping: &dyn Fn() -> bool,
    ) -> (Vec<Option<MessageRef>>, Option<SpoolError>) {
        let mut moved = vec![None; messages.len()];
        let mut error = None;
        let mut written = Vec::new();
        let mut turns = crate::GiveWay::new();
        for (i, &(queue_id, meta, body)) in messages.iter().enumerate() {
            // Each copy is written on the core: its sessions get their turns between them.
            turns.step().await;
            self.spare_for(meta).await;
            if stopping() {
                // Past the stop's last sync, a copy would wait for the next opening to be
                // made durable.
                break;
            }
            let copied = self.spool.borrow_mut().copy_forward(queue_id, meta, body);
            match self.failed_write(copied) {
                Ok(Some((ticket, pending))) => written.push((i, ticket, pending)),
                Ok(None) => {}
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        let Some(&(_, last, _)) = written.last() else {
            return (moved, error);
        };
        if let Err(e) = self.wait(last).await {
            error.get_or_insert(e);
        }
        let mut spool = self.spool.borrow_mut();
        for (i, ticket, pending) in written {
            let queue_id = messages[i].0;
            let durable = spool.is_durable(ticket);
            if durable {
                moved[i] = spool.body(pending).ok();
            }
            if let Err(e) = spool.copy_over(queue_id, durable) {
                error.get_or_insert(e);
            }
        }
        drop(spool);
        self.wake_unlinker();
        (moved, error)
    }

    /// Appends a recipient's status record; durable with the next group commit.
    pub(crate) fn append_status(
        &self,
        queue_id: &str,
        rcpt: u32,
        status: &Status,
    ) -> Result<(), SpoolError> {
        let appended = self
            .spool
            .borrow_mut()
            .append_status(queue_id, rcpt, status);
        let ticket = self.failed_write(appended)?;
        self.last_status.set(Some(ticket));
        self.work.notify(1);
        Ok(())
    }

    /// Waits until every status appended so far is settled; an error when the latest failed,
    /// or when one of message `queue_id`'s did (a later batch may have succeeded after it:
    /// the latest ticket alone does not say).
    pub(crate) async fn flush_statuses(&self, queue_id: &str) -> Result<(), SpoolError> {
        if let Some(ticket) = self.last_status.get() {
            self.wait(ticket).await?;
        }
        if self.spool.borrow().status_lost(queue_id) {
            return Err(SpoolError::SyncFailed(
                "a status record was in a failed write or sync".into(),
            ));
        }
        Ok(())
    }

    /// Whether the finished message `queue_id` is this core's and not yet final.
    pub(crate) fn is_live(&self, queue_id: &str) -> bool {
        self.spool.borrow().is_live(queue_id)
    }

    pub(crate) fn mark_final(&self, queue_id: &str) -> Result<usize, SpoolError> {
        let reclaimed = self.spool.borrow_mut().mark_final(queue_id);
        self.wake_unlinker();
        reclaimed
    }

    pub(crate) fn reclaim(&self) -> Result<usize, SpoolError> {
        let reclaimed = self.spool.borrow_mut().reclaim();
        self.wake_unlinker();
        reclaimed
    }

    /// Wakes [`unlink_freed`] when freed segments wait (whatever the reclaim that freed them
    /// returned: one that met an error may have freed some first).
    fn wake_unlinker(&self) {
        if self.spool.borrow().has_unlinks() {
            self.freed.notify(usize::MAX);
        }
    }

    /// Waits for a ticket's group commit.
    async fn wait(&self, ticket: Ticket) -> Result<(), SpoolError> {
        self.work.notify(1);
        loop {
            let listener = self.synced.listen();
            match self.spool.borrow().ticket_state(ticket) {
                TicketState::Durable => return Ok(()),
                TicketState::Failed => {
                    return Err(self.as_failed(SpoolError::SyncFailed("spool sync failed".into())))
                }
                TicketState::Pending => {}
            }
            listener.await;
        }
    }

    /// At shutdown: lets the sync in flight be collected (for a few seconds at most: a stop
    /// must end), then syncs what is pending, on this thread, and wakes whoever waits for a
    /// ticket (a session whose end of data came before a slow sync then says its 250). Gives
    /// back that last sync's error, or an error without a last sync when the one in flight
    /// did not end.
    /// `beat`: the core's heartbeat, told that the last sync blocks the core on purpose.
    pub(crate) async fn shutdown(&self, beat: &crate::watchdog::Beat) -> Result<(), SpoolError> {
        const SYNC_IN_FLIGHT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
        // Segments freed and not yet deleted go now, rather than at the next start, after
        // those on their way (in order: older ones first), which get as long as a sync.
        let deleted = futures_lite::future::or(
            async {
                while self.unlinking.get() {
                    let listener = self.freed.listen();
                    if !self.unlinking.get() {
                        break;
                    }
                    listener.await;
                }
                true
            },
            async {
                glommio::timer::sleep(SYNC_IN_FLIGHT_WAIT).await;
                false
            },
        )
        .await;
        // Then the sync in flight, with no wait between its end and the last sync: the group
        // commit could start another meanwhile (an outcome recorded), which the last sync
        // would not see, and the stop would end before it.
        let collected = futures_lite::future::or(
            async {
                self.sync_collected().await;
                true
            },
            async {
                glommio::timer::sleep(SYNC_IN_FLIGHT_WAIT).await;
                false
            },
        )
        .await;
        if !collected {
            // A sync still running (a disk that hangs): no second one beside it. It would
            // hang this thread too, and two `fdatasync`s of one file share a write-back
            // error, which only one of them is told: the batch in flight could read
            // durable for records that were lost. What is still pending is not
            // acknowledged (the sessions waiting are told 451 now); outcomes recorded
            // since the last sync are made again after the next start.
            self.spool.borrow_mut().fail_pending();
            self.synced.notify(usize::MAX);
            return Err(SpoolError::SyncFailed(format!(
                "the sync in flight did not end within {}s; no last sync was made",
                SYNC_IN_FLIGHT_WAIT.as_secs()
            )));
        }
        let mut spool = self.spool.borrow_mut();
        // On the core's own thread: the watchdog is not to take a slow disk's sync for a
        // stalled core.
        beat.blocking(true);
        let mut synced = spool.sync_now();
        // A segment that sync made durable gets its seal, a record of its own: synced too,
        // so that the mark below covers all.
        if synced.is_ok() && spool.sync_wanted() {
            synced = spool.sync_now();
        }
        spool.mark_durable_end();
        // Those that cannot go stay on disk, in order; the next start deletes them. None goes
        // while older ones may still be on their way.
        // (The unlinker may have taken another batch while the sync in flight was waited
        // for: then these wait for the next start too.) Still marked blocking: hundreds of
        // reserved segments take a second or more to delete.
        if deleted && !self.unlinking.get() {
            let _ = postern_spool::unlink_segments(spool.take_unlinks());
        }
        beat.blocking(false);
        drop(spool);
        self.synced.notify(usize::MAX);
        synced
    }

    /// How many syncs of the group commit have failed since the start.
    pub(crate) fn failed_syncs(&self) -> u64 {
        self.failed_syncs.get()
    }

    /// Waits until no sync is in flight (the last one collected).
    async fn sync_collected(&self) {
        while self.syncing.get() {
            let listener = self.synced.listen();
            if !self.syncing.get() {
                break;
            }
            listener.await;
        }
    }
}

/// Creates and removes an empty file in `dir`. A full disk is not a reason to refuse to start
/// (mail is refused with 452 until space returns, and delivery frees it), so `ENOSPC` and
/// `EDQUOT` pass; only a directory this process may not write fails.
fn probe_writable(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(".postern-probe");
    let made = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&probe);
    let _ = std::fs::remove_file(&probe);
    match made {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) => {
            tracing::warn!(
                "the spool's disk is full ({}): mail is refused with 452 until space returns",
                dir.display()
            );
            Ok(())
        }
        other => other.map(drop),
    }
}

/// Makes sure the next segment is being made ahead of time, on the blocking pool, so that a
/// full segment never makes a session wait for a file to be created and synced on the core.
pub(crate) fn ensure_spare(core: &Rc<Core>) {
    let Some(job) = core.store.spool.borrow_mut().spare_job() else {
        return;
    };
    let core = core.clone();
    glommio::spawn_local(async move {
        // A panic there would take the core's one blocking thread, which also runs its syncs:
        // caught, it is a failed spare like any other.
        let made = glommio::executor()
            .spawn_blocking(move || {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run())).unwrap_or_else(
                    |_| Err(std::io::Error::other("making the next segment panicked")),
                )
            })
            .await;
        if let Err(e) = &made {
            // One refused for the reserve is no error: the new mail it was for is refused,
            // and that is said.
            if !postern_spool::is_reserve_refusal(e) {
                core.spool_error("making the next segment", e);
            }
        }
        core.store.spool.borrow_mut().install_spare(made);
        core.store.spare_made.notify(usize::MAX);
    })
    .detach();
}

/// Deletes the segments the spool has freed, on the blocking pool, one batch at a time and in
/// the order they were freed: deleting a segment frees its reserved extents, a millisecond or
/// two that would otherwise stall every session of the core.
pub(crate) async fn unlink_freed(core: Rc<Core>) {
    let store = &core.store;
    loop {
        let listener = store.freed.listen();
        let freed = store.spool.borrow_mut().take_unlinks();
        if freed.is_empty() {
            listener.await;
            continue;
        }
        store.unlinking.set(true);
        let deleted = glommio::executor()
            .spawn_blocking(move || {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    postern_spool::unlink_segments(freed)
                }))
                .ok()
            })
            .await;
        store.unlinking.set(false);
        store.freed.notify(usize::MAX);
        let Some(deleted) = deleted else {
            // What is left of the batch is lost to the index: deleting anything newer now
            // could delete a segment before an older one. Nothing more is deleted in this
            // run; the next start deletes what is left, in order.
            core.spool_error("deleting segments", &"the deletion panicked");
            store.spool.borrow_mut().stop_deleting();
            return;
        };
        match deleted {
            Ok(()) => store.spool.borrow_mut().unlinks_done(),
            Err((undeleted, e)) => {
                // The first that could not go, and every newer one, go back to the index: none
                // is deleted before it, and a later reclaim tries again.
                let what = undeleted.first().map_or_else(
                    || "deleting segments".to_owned(),
                    |f| format!("deleting {}", f.path.display()),
                );
                core.spool_error(&what, &e);
                store.spool.borrow_mut().keep_undeleted(undeleted);
            }
        }
    }
}

/// Collects a sync the blocking pool has finished, if there is one: its tickets complete and
/// their sessions (and the group-commit loop) wake. Cheap when there is none (one atomic load);
/// sessions call it after each read, so a busy core sees a finished sync without waiting for
/// the end of its run queue's round.
pub(crate) fn collect_sync(core: &Core) {
    let store = &core.store;
    if !store.finished.ready.load(Ordering::Acquire) {
        return;
    }
    let Some((batch, result)) = store
        .finished
        .slot
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    else {
        return;
    };
    store.finished.ready.store(false, Ordering::Relaxed);
    if let Err(e) = &result {
        core.spool_error("syncing", e);
        store.failed_syncs.set(store.failed_syncs.get() + 1);
        store.last_failure_no_space.set(matches!(
            e.raw_os_error(),
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG)
        ));
    }
    let mut spool = store.spool.borrow_mut();
    spool.sync_done(batch, result);
    if spool.reclaim_after_sync() {
        // A segment only abandoned drafts wrote into, kept for the batch's sake: it goes
        // now (an error here is met again, and reported, at the next reclaim).
        let _ = spool.reclaim();
        drop(spool);
        store.wake_unlinker();
    } else {
        drop(spool);
    }
    store.syncing.set(false);
    store.synced.notify(usize::MAX);
}

/// How many times the final statuses of a message refused after a failed sync are written
/// again when the syncs meant for them fail too, the first [`WITHDRAW_PAUSE`] after, each
/// next twice as long after the one before (a disk that fails for a while). Past that, a
/// restart may deliver it beside the copy its client sends again (a duplicate, never a
/// loss).
const WITHDRAW_TRIES: u8 = 4;
const WITHDRAW_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// A message refused to its client after a failed sync, whose final statuses are not durable
/// yet (see [`CoreStore::rewithdraw`]).
struct Withdrawn {
    queue_id: String,
    recipients: u32,
    /// The last status written's ticket; None when it could not be written.
    ticket: Option<Ticket>,
    /// Times left to write them again.
    tries: u8,
    /// Not written again before this.
    retry_at: std::time::Instant,
}

impl CoreStore {
    /// Writes again the final statuses of refused messages whose sync failed, once their
    /// pause is over (for the next sync to take), and forgets those now durable or out of
    /// tries.
    fn rewithdraw(&self) {
        let mut withdrawn = self.withdrawn.borrow_mut();
        if withdrawn.is_empty() {
            return;
        }
        let now = std::time::Instant::now();
        let mut spool = self.spool.borrow_mut();
        withdrawn.retain_mut(|w| {
            // Not written at all: as a failed sync.
            match w
                .ticket
                .map_or(TicketState::Failed, |t| spool.ticket_state(t))
            {
                TicketState::Durable => false,
                TicketState::Pending => true,
                TicketState::Failed if w.tries == 0 => false,
                TicketState::Failed if now < w.retry_at => true,
                TicketState::Failed => {
                    w.tries -= 1;
                    w.ticket = spool.withdraw(&w.queue_id, w.recipients);
                    let tried = WITHDRAW_TRIES - w.tries;
                    w.retry_at = now + WITHDRAW_PAUSE * (1u32 << tried.min(8));
                    w.ticket.is_some() || w.tries > 0
                }
            }
        });
    }

    /// How long until a refused message's statuses are to be written again, if any are.
    fn rewithdraw_due_in(&self) -> Option<std::time::Duration> {
        let withdrawn = self.withdrawn.borrow();
        let spool = self.spool.borrow();
        let now = std::time::Instant::now();
        withdrawn
            .iter()
            .filter(|w| {
                w.tries > 0
                    && w.ticket
                        .is_none_or(|t| spool.ticket_state(t) == TicketState::Failed)
            })
            .map(|w| w.retry_at.saturating_duration_since(now))
            .min()
    }
}

/// A sync on the core (`--sync-on-core`) that held it this long is said, at most once a
/// minute per core: the core served nothing meanwhile.
const SLOW_SYNC_ON_CORE: std::time::Duration = std::time::Duration::from_millis(100);

/// Logs a sync on the core that took [`SLOW_SYNC_ON_CORE`] or more (once a minute at most).
fn slow_sync_on_core(core: &Core, took: std::time::Duration) {
    if took < SLOW_SYNC_ON_CORE {
        return;
    }
    let now = std::time::Instant::now();
    let said = &core.store.slow_sync_said;
    if said
        .get()
        .is_some_and(|at| now.duration_since(at) < std::time::Duration::from_secs(60))
    {
        return;
    }
    said.set(Some(now));
    tracing::warn!(
        core = core.id,
        "a sync of the spool held this core for {} ms (--sync-on-core: the core serves \
         nothing while its disk syncs); logged once a minute at most",
        took.as_millis()
    );
}

/// The group-commit loop of one core: every message finished since the last sync shares the
/// next one, which runs on the blocking pool while the core goes on with other sessions (or,
/// with `--sync-on-core`, on the core itself).
/// `beat`: the core's heartbeat, told that a sync on the core blocks it on purpose.
pub(crate) async fn group_commit(core: Rc<Core>, beat: Arc<crate::watchdog::Beat>) {
    let store = &core.store;
    loop {
        let listener = store.work.listen();
        store.rewithdraw();
        let batch = store.spool.borrow_mut().take_sync();
        let Some(batch) = batch else {
            // A quiet spell after a batch: the segment's mark is moved on to cover it once
            // its interval has passed (one small write and sync), unless new work comes first.
            // (Or a refused message's statuses are to be written again.)
            let mark = store.spool.borrow().mark_due_in();
            let due = match (mark, store.rewithdraw_due_in()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            match due {
                Some(due) => {
                    let timer = async {
                        glommio::timer::sleep(due).await;
                    };
                    futures_lite::future::or(listener, timer).await;
                    if mark.is_some() {
                        store.spool.borrow_mut().mark_tick();
                    }
                }
                None => listener.await,
            }
            continue;
        };
        store.syncing.set(true);
        if core.settings.sync_on_core {
            // `--sync-on-core`: here, holding the core until the disk answers (no stall for
            // the watchdog to wake); the sessions that came meanwhile share the next sync.
            beat.blocking(true);
            let began = std::time::Instant::now();
            let result = run_sync(&batch);
            beat.blocking(false);
            slow_sync_on_core(&core, began.elapsed());
            store.finished.put(batch, result);
            collect_sync(&core);
            glommio::yield_if_needed().await;
            continue;
        }
        let finished = store.finished.clone();
        let owner = core.clone();
        glommio::spawn_local(async move {
            glommio::executor()
                .spawn_blocking(move || {
                    let result = run_sync(&batch);
                    finished.put(batch, result);
                })
                .await;
            collect_sync(&owner);
        })
        .detach();
        store.sync_collected().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_postmaster_address_is_kept_as_its_orcpt_and_the_bare_postmaster_is_not() {
        let rcpt = |path: &str| Recipient {
            path: path.into(),
            notify: None,
            orcpt: None,
        };
        let mut at_host = rcpt("PostMaster@MX.test");
        postmaster(&mut at_host, "mx.test", None);
        assert_eq!(at_host.path, "postmaster@mx.test");
        assert_eq!(at_host.orcpt.as_deref(), Some("rfc822;PostMaster@MX.test"));
        let mut bare = rcpt("Postmaster");
        postmaster(&mut bare, "mx.test", Some("ops@ops.test"));
        assert_eq!(bare.path, "ops@ops.test");
        assert_eq!(bare.orcpt, None);
    }

    #[test]
    fn a_recipient_given_twice_gets_every_report_either_asked_for() {
        const S: u8 = Notify::SUCCESS;
        const F: u8 = Notify::FAILURE;
        const D: u8 = Notify::DELAY;
        let never = Some(0);
        assert_eq!(merge_notify(never, Some(F)), Some(F));
        assert_eq!(merge_notify(Some(S), Some(F)), Some(S | F));
        assert_eq!(merge_notify(never, never), never);
        assert_eq!(merge_notify(None, None), None);
        // No NOTIFY is the default, failure and delay reports.
        assert_eq!(merge_notify(None, never), None);
        assert_eq!(merge_notify(Some(F), None), Some(F | D));
        assert_eq!(merge_notify(None, Some(D)), Some(F | D));
        assert_eq!(merge_notify(None, Some(S)), Some(S | F | D));
    }
}
