//! One outbound connection's life: opening it (trying the next hop's addresses in order,
//! pausing a next hop none of whose addresses answer), then taking its next hop's jobs one
//! transaction at a time or pipelined, until it is idle too long or its place is wanted.

use super::*;

/// How an idle connection's wait ended.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// A job came.
    Job,
    /// Another next hop waits in line for a connection.
    Wanted,
    /// The idle timeout, or the stop.
    Over,
}

/// What an idle connection came to ([`CoreRelay::idle`]).
enum Idled {
    /// A job came for it: it takes it.
    Work,
    /// It is gone (closed by the next hop, or ended after its idle time): jobs that came
    /// meanwhile need a new connection.
    Reconnect,
    /// It gives its place up and was counted out: it says QUIT
    /// ([`CoreRelay::quit_after_leaving`]) and its worker ends.
    Quit,
    /// Its idle time is over: it says QUIT ([`CoreRelay::quit_idle`]).
    Over,
}

/// Whether `job`'s commands go out in one group (MAIL, its RCPTs, BDAT): one with more
/// recipients is written a group at a time, each after the replies to the one before, so it
/// cannot go back to back with others.
pub(super) fn one_group(job: &Job) -> bool {
    job.rcpts.len() + 2 <= postern_proto::client::PIPELINED_GROUP
}

/// The replies a job's transaction has awaited at once in a batch (RSET, MAIL, each RCPT,
/// BDAT).
pub(super) fn replies_awaited(job: &Job) -> usize {
    job.rcpts.len() + 3
}

/// Whether `job` joins a batch of transactions already awaiting `replies`: replies awaited at
/// once stay few enough for any socket buffer, so that the server never blocks writing them
/// while this side still writes.
pub(super) fn joins_batch(job: &Job, replies: usize) -> bool {
    one_group(job) && replies + replies_awaited(job) <= MAX_PIPELINED_REPLIES
}

/// An idle connection's place among those a job wakes (`DestQueue::idle_waits`), the most
/// recently idle last; it leaves when dropped (unless a job's wake-up took it out already).
struct IdleWait<'a>(Rc<Event>, &'a DestQueue);

impl<'a> IdleWait<'a> {
    fn new(dq: &'a DestQueue) -> Self {
        let wake = Rc::new(Event::new());
        dq.idle_waits.borrow_mut().push(wake.clone());
        Self(wake, dq)
    }
}

impl Drop for IdleWait<'_> {
    fn drop(&mut self) {
        self.1
            .idle_waits
            .borrow_mut()
            .retain(|w| !Rc::ptr_eq(w, &self.0));
    }
}

/// Counts a worker of a next hop as opening a connection (see `DestQueue::opening`) until
/// dropped.
pub(super) struct Opening<'a>(&'a DestQueue);

impl<'a> Opening<'a> {
    /// Counts one more.
    pub(super) fn new(dq: &'a DestQueue) -> Self {
        dq.opening.set(dq.opening.get() + 1);
        Self(dq)
    }

    /// Takes over the count `CoreRelay::start_worker` made for the worker it started.
    fn adopt(dq: &'a DestQueue) -> Self {
        Self(dq)
    }
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        self.0.opening.set(self.0.opening.get() - 1);
    }
}

/// Sessions broken off in a row that pause a next hop whatever came before (see
/// `CoreRelay::every_address_broke`).
const BROKEN_IN_A_ROW_PAUSES: u32 = 8;

impl CoreRelay {
    /// Delivers a next hop's jobs over one connection at a time, reusing it while jobs come.
    pub(super) async fn worker(self: Rc<Self>, dq: Rc<DestQueue>) {
        // Jobs this worker passed over to another address: the next connection takes them
        // first, so that no other worker sends them back to the address that put them off.
        let mut carry: Vec<Carried> = Vec::new();
        // For its turn past the core's share (see `yields_place`).
        let started = Instant::now();
        // Counted as opening from its start (`start_worker`) until its first connection is
        // made or given up; each later one from when it begins.
        let mut first = Some(Opening::adopt(&dq));
        'connect: while (!carry.is_empty() || !dq.ready.borrow().is_empty())
            && !self.handle.is_stopping()
        {
            if carry.is_empty() && self.yields_place(&dq, started) {
                // About to connect again while another next hop waits in line. (No longer
                // opening when `leave` looks at what its next hop's jobs call for.)
                drop(first.take());
                self.leave(&dq);
                return;
            }
            let tried: Vec<SocketAddr> = carry
                .iter()
                .flat_map(|c| c.job.tried.iter().copied())
                .collect();
            let attempt_began = mono_ms();
            let flushes_before = self.flushes_seen.get();
            let opening = first.take().unwrap_or_else(|| Opening::new(&dq));
            let opened = self.open(&dq, &tried).await;
            drop(opening);
            let (mut conn, fallback_until, mut recheck_at, cleartext_until) = match opened {
                Ok(Opened {
                    conn: c,
                    failed,
                    fallback,
                    recheck_at,
                    preference,
                    cleartext_until,
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
                    // (A fallback is left after its while, and looked up again then.)
                    let recheck_at = recheck_at
                        .filter(|_| !fallback)
                        .map(|at| (at, Chosen::new(&c, preference)));
                    (
                        c,
                        fallback.then(|| mono_ms() + self.pause_ms()),
                        recheck_at,
                        cleartext_until,
                    )
                }
                Err(unopened) if unopened.1.is_none() && unopened.5 && dq.workers.get() > 1 => {
                    // Refused by a host that answered (a 421 greeting, say) while other
                    // connections of ours to the same next hop are open or opening: a limit
                    // on connections per client, not a next hop that is down. The jobs stay
                    // for the other connections, nothing is paused, and no more connections
                    // are opened to it for a while. (The last of a burst that are all
                    // refused takes the path below.)
                    self.at_connection_limit(&dq, unopened.4, &unopened.0);
                    for k in carry.drain(..) {
                        self.settle_carried(k);
                    }
                    break;
                }
                Err(unopened)
                    if unopened.1.is_none()
                        && unopened.2.is_none()
                        && (unopened.4 > 0 || lookup_failed(&unopened))
                        && self.others_work(&dq, attempt_began) =>
                {
                    // No answer (refused, closed before its greeting, timed out, or the
                    // lookup failed for now; not only addresses this machine has no way to,
                    // which say nothing of the next hop) while other connections of ours to
                    // the same next hop work: a host or firewall that drops connections past
                    // a limit, or a passing fault. The jobs wait for the connections that
                    // work, as above.
                    if unopened.4 > 0 {
                        self.at_connection_limit(&dq, unopened.4, &unopened.0);
                    } else {
                        self.lookup_failed_beside_others(&dq, &unopened.0);
                    }
                    for k in carry.drain(..) {
                        self.settle_carried(k);
                    }
                    break;
                }
                Err(unopened) => {
                    for k in carry.drain(..) {
                        self.settle_carried(k);
                    }
                    // A flush acted on while this attempt was made (a connection timing out
                    // slowly, the only one a failing next hop gets): the mail it put in line
                    // was released by the operator after what failed here began, and is not
                    // sent back to its retry (nor the next hop paused) for it. One more
                    // connection is tried for it at once.
                    if unopened.1.is_none() && self.flushes_seen.get() != flushes_before {
                        tracing::debug!(
                            next_hop = %dq.dest.key(),
                            "a connection tried before the flush failed ({}); trying again",
                            unopened.0
                        );
                        continue 'connect;
                    }
                    self.unopened(&dq, unopened);
                    break;
                }
            };
            // Counted out before any QUIT below: a connection saying QUIT works no more.
            let connected = Connected::new(&dq);
            dq.answered_at.set(mono_ms());
            let mut used = false;
            // The next hop looked up again once the answers the connection was chosen by
            // expire (`still_chosen`), and whether that found it gone from this host.
            let mut recheck: Option<Recheck> = None;
            let mut moved = false;
            // Connections to this next hop failed lately (this attempt's too).
            let mut after_failures = dq.broken_in_a_row.get() > 0;
            // Whether connections were opened for batches of transactions that the next hop
            // turns out not to take (no PIPELINING or CHUNKING).
            let batches_refused = dq.pipelines.replace(conn.can_pipeline()) && !conn.can_pipeline();
            if after_failures {
                // The next hop answers again: the jobs that piled up get one more connection
                // now, not only once this one's first transaction is answered (which a
                // transaction that hangs may put off for many minutes).
                dq.opened_since_broke
                    .set(dq.opened_since_broke.get().saturating_add(1));
                self.spread_waiting(&dq);
            } else if batches_refused {
                // The jobs each would have taken get connections of their own.
                self.spread_waiting(&dq);
            }
            loop {
                // Jobs refused here before anything is sent (over the next hop's size, 8-bit
                // for one without 8BITMIME, deleted) go on without an await: a backlog of them
                // gives way to the core's sessions.
                glommio::yield_if_needed().await;
                if self.handle.is_stopping() {
                    // No new transaction once the server stops; carried jobs wait for the
                    // next run (their earlier attempt recorded nothing).
                    drop(connected);
                    self.say_quit(conn).await;
                    break 'connect;
                }
                // (A 421 to the NOOP after a transaction leaves the session said closing,
                // not closed: no owed QUIT, and no next transaction either.)
                if used && (conn.is_closing() || !conn.owes_quit() || conn.went_away_while_idle()) {
                    // The next hop said something after the last transaction's replies (a
                    // reply too many) or closed: the next commands' replies could not be told
                    // from it. The jobs waiting go on a new connection, nothing charged.
                    tracing::debug!(remote = %conn.remote, "next hop out of step or gone between transactions");
                    // A reply nobody asked for (not a 421, not the end): QUIT all the same
                    // (RFC 5321 4.1.1.10); its reply could not be told apart, so none is
                    // awaited.
                    drop(connected);
                    if conn.owes_quit() && conn.unasked_after_reply() {
                        conn.quit_now().await;
                    }
                    continue 'connect;
                }
                used = true;
                let over = |until: Option<u64>| until.is_some_and(|until| mono_ms() >= until);
                if carry.is_empty() && (over(fallback_until) || over(cleartext_until)) {
                    // A less preferred host served long enough: see whether a better one is
                    // back (RFC 5321 5.1, preference order). Or the while in cleartext is
                    // over: the next connection tries STARTTLS again, so that a next hop with
                    // mail enough to keep this one busy is not kept in cleartext by it.
                    drop(connected);
                    self.say_quit(conn).await;
                    continue 'connect;
                }
                let mut asked_now = false;
                if recheck.is_none() {
                    if let Some((_, chosen)) = recheck_at.take_if(|(at, _)| Instant::now() >= *at) {
                        // The DNS answers this connection was chosen by ran past their TTL:
                        // the next hop may have moved, or published a null MX, since.
                        let (this, dq) = (self.clone(), dq.clone());
                        recheck = Some(Box::pin(async move {
                            this.still_chosen(&dq, &chosen)
                                .await
                                .map(|next| (next, chosen))
                        }));
                        asked_now = true;
                    }
                }
                if let Some(pending) = recheck.as_mut() {
                    // The answer is waited for a moment when the look-up begins (the cache's
                    // answer, or a DNS that answers at once), so that the job about to go
                    // goes where the DNS now says; beyond that it is looked at between
                    // transactions, and a DNS slow to answer holds no mail up.
                    let verdict = if asked_now {
                        future::or(async { Some(pending.as_mut().await) }, async {
                            glommio::timer::sleep(RECHECK_WAIT).await;
                            None
                        })
                        .await
                    } else {
                        future::poll_once(pending.as_mut()).await
                    };
                    if let Some(verdict) = verdict {
                        recheck = None;
                        match verdict {
                            Some(next) => recheck_at = Some(next),
                            None => moved = true,
                        }
                    }
                }
                if moved && carry.is_empty() {
                    drop(connected);
                    self.say_quit(conn).await;
                    continue 'connect;
                }
                if asked_now && self.handle.is_stopping() {
                    // The stop came while the look-up was waited for: the stop's wind-down
                    // may have found nothing in flight and ended, and a transaction begun now
                    // would have its outcome made durable by nobody (the next run would send
                    // the message again).
                    drop(connected);
                    self.say_quit(conn).await;
                    break 'connect;
                }
                let (job, note) = if carry.is_empty() {
                    (dq.ready.borrow_mut().pop_front(), None)
                } else {
                    let (job, note) = carry.remove(0).split();
                    (Some(job), Some(note))
                };
                let Some(job) = job else {
                    match self.idle(&dq, &mut conn).await {
                        Idled::Work => continue,
                        Idled::Reconnect => {
                            // A reply said while it sat idle, not a close: QUIT all the same
                            // (RFC 5321 4.1.1.10), no reply awaited.
                            drop(connected);
                            if conn.owes_quit() && conn.unasked_after_reply() {
                                conn.quit_now().await;
                            }
                            continue 'connect;
                        }
                        Idled::Quit => {
                            drop(connected);
                            self.quit_after_leaving(conn).await;
                            return;
                        }
                        Idled::Over => {
                            drop(connected);
                            if self.quit_idle(&dq, conn).await {
                                return;
                            }
                            continue 'connect;
                        }
                    }
                };
                if mono_ms() < dq.lockstep_until.get() {
                    conn.forgo_pipelining();
                }
                let window = if mono_ms() < dq.serial_until.get() {
                    1
                } else {
                    self.relay.config.max_in_flight
                };
                let counted = InFlight::new(&self.relay.in_flight);
                conn.answered_mark.set(dq.answered.get());
                let after = if window > 1 && conn.can_pipeline() && one_group(&job) {
                    let mut replies = replies_awaited(&job);
                    let mut jobs = vec![job];
                    while jobs.len() < window {
                        let more = {
                            let mut ready = dq.ready.borrow_mut();
                            if !ready.front().is_some_and(|j| joins_batch(j, replies)) {
                                None
                            } else {
                                ready.pop_front()
                            }
                        };
                        let Some(more) = more else {
                            break;
                        };
                        replies += replies_awaited(&more);
                        jobs.push(more);
                    }
                    self.transact_pipelined(&mut conn, &dq, jobs, note, &mut carry)
                        .await
                } else {
                    self.transact(&mut conn, &dq, job, note, &mut carry).await
                };
                drop(counted);
                if !matches!(after, After::Broken) {
                    dq.answered_at.set(mono_ms());
                }
                if after_failures && dq.broken_in_a_row.get() == 0 {
                    after_failures = false;
                    // A transaction answered after failures lifts the one-connection limit
                    // for good (a connection that failed since put it back).
                    self.spread_waiting(&dq);
                }
                match after {
                    After::Keep if carry.is_empty() && self.yields_place(&dq, started) => {
                        // Other next hops wait for a connection of the core's share.
                        drop(connected);
                        self.leave(&dq);
                        self.quit_after_leaving(conn).await;
                        return;
                    }
                    After::Keep => {}
                    After::Broken => {
                        // Given up out of step: QUIT, not awaited, before the close (RFC
                        // 5321 4.1.1.10). Not after a failed write (it could land inside a
                        // body), a 421, or the session's own QUIT.
                        drop(connected);
                        if conn.quit_owed() {
                            conn.quit_now().await;
                        }
                        continue 'connect;
                    }
                    After::Elsewhere => {
                        drop(connected);
                        self.say_quit(conn).await;
                        continue 'connect;
                    }
                }
            }
        }
        self.leave(&dq);
    }

    /// Whether another connection of ours to `dq`'s next hop works: one is open (past its
    /// EHLO, not saying QUIT), and one got an answer since an attempt that began at
    /// `began` (ms), or within [`WORKS_WITHIN`] for an attempt that failed sooner. A
    /// connection open to a host that has since gone silent is not one that works.
    fn others_work(&self, dq: &DestQueue, began: u64) -> bool {
        let within = u64::try_from(WORKS_WITHIN.as_millis()).unwrap_or(u64::MAX);
        dq.connected.get() > 0
            && dq.answered_at.get() >= began.min(mono_ms().saturating_sub(within))
    }

    /// A connection to `dq`'s next hop was refused while others of ours to it are open or
    /// opening: the next hop takes no more than those (Postfix's
    /// `smtpd_client_connection_count_limit`, say). Not a failure of the next hop: the
    /// `failed` addresses this attempt counted as failures are taken off the count, and until
    /// [`CAP_HOLDS`] has passed no more connections than the others are opened to it.
    fn at_connection_limit(&self, dq: &DestQueue, failed: u32, why: &str) {
        dq.broken_in_a_row
            .set(dq.broken_in_a_row.get().saturating_sub(failed));
        dq.unopened_in_a_row
            .set(dq.unopened_in_a_row.get().saturating_sub(failed));
        // This worker is about to leave; the others stay.
        let open = dq.workers.get().saturating_sub(1).max(1);
        let capped = dq.cap_until.get() > mono_ms();
        // Once per window: a burst refused one by one lowers the cap one by one.
        if capped {
            tracing::debug!(
                next_hop = %dq.dest.key(),
                connections = open,
                "the next hop refused another connection: at most {open} to it"
            );
        } else {
            tracing::info!(
                next_hop = %dq.dest.key(),
                connections = open,
                "the next hop refused another connection while {open} of ours were open or \
                 opening ({why}): at most {open} to it for {}s",
                CAP_HOLDS.as_secs()
            );
        }
        dq.cap.set(open);
        dq.cap_until
            .set(mono_ms() + u64::try_from(CAP_HOLDS.as_millis()).unwrap_or(u64::MAX));
    }

    /// The lookup for a connection to `dq`'s next hop failed for now while others of ours to
    /// it work. Unlike a refused connection, that says nothing of a limit of the next hop's
    /// (a resolver's passing fault), so the connections are not held to those for
    /// [`CAP_HOLDS`]; but another one opened now would only ask the resolver again, at once
    /// and over and over while jobs wait: none is, for [`LOOKUP_CAP_HOLDS`]. A hold of its
    /// own, beside a limit learned from a refusal (`DestQueue::cap`), which it leaves as it
    /// is.
    fn lookup_failed_beside_others(&self, dq: &DestQueue, why: &str) {
        let open = dq.workers.get().saturating_sub(1).max(1);
        let until = mono_ms() + u64::try_from(LOOKUP_CAP_HOLDS.as_millis()).unwrap_or(u64::MAX);
        tracing::debug!(
            next_hop = %dq.dest.key(),
            connections = open,
            "{why}: the jobs wait for the connections that work, and no more are opened for {}s",
            LOOKUP_CAP_HOLDS.as_secs()
        );
        dq.lookup_cap.set(open);
        dq.lookup_cap_until.set(until);
    }

    /// No connection could be made to `dq`'s next hop: the jobs waiting for it wait again (or
    /// fail, when the failure is for good), and the next hop is paused when connections keep
    /// failing.
    fn unopened(&self, dq: &DestQueue, unopened: Unopened) {
        let (text, permanent, remote, deferred, failed, _) = unopened;
        // The next hop is unreachable (everything waiting for it waits again) or
        // does not exist (everything waiting for it fails).
        let jobs: Vec<Job> = dq.ready.borrow_mut().drain(..).collect();
        // RFC 3463 3.5: no answer from any host (4.4.1), or a host that answered
        // and then failed the connection (4.4.2); a reply's own status wins
        // where the account quotes one (dsn::deferral_status).
        let status =
            permanent
                .or(deferred)
                .unwrap_or(if remote.is_some() { "4.4.2" } else { "4.4.1" });
        // A host that answered: its reply's own status where the account quotes one
        // (a 5xx to HELO, a 421 greeting, a 454 to STARTTLS), so that a report, and
        // the expiry bounce, say the next hop's code (RFC 3463 3.5).
        let status = match (permanent, deferred, &remote) {
            (Some(_), _, Some(_)) => dsn::deferral_status(&text, status),
            (None, None, Some(_)) => dsn::connection_status(&text, status),
            _ => status.to_owned(),
        };
        let status = status.as_str();
        // Paused with two failures in a row, as for broken-off sessions: one
        // refused connection to a next hop with a single address (a restart, say)
        // defers the jobs waiting now, and the next job tries again at once.
        // With more addresses one attempt has failed on two or more already. A
        // name that could not be resolved (no address tried) pauses at once:
        // every job would ask the resolver again.
        // (Counted by this attempt: the next hop's count of failures in a row may have been
        // reset meanwhile by another connection's transaction.)
        let no_address_tried = failed == 0;
        if permanent.is_none() && no_address_tried {
            // Counted as a failure of the next hop, as an address that broke is (see
            // `broke`): when the pause ends, the jobs it held come due together and one
            // connection (one lookup) tries for them all, not one per job.
            dq.last_broke.set(mono_ms());
            dq.broken_in_a_row.set(dq.broken_in_a_row.get().max(1));
            dq.opened_since_broke.set(0);
        }
        // Classified now (not a connection limit): a failure in the next hop's history, and
        // `failed` more addresses in a row that could not be used.
        dq.note_outcome(true);
        dq.unopened_in_a_row
            .set(dq.unopened_in_a_row.get().saturating_add(failed));
        // Two connections in a row not made pause it; a session broken off before one counts
        // as for sessions broken off (see `failing_enough`): a next hop that answers most
        // transactions is not paused for one break and one refused connection.
        if permanent.is_none()
            && (dq.unopened_in_a_row.get() >= 2 || no_address_tried || self.failing_enough(dq))
        {
            dq.down_until.set(mono_ms() + self.pause_ms());
            // For jobs put back unsent while it lasts (`requeue`; a kept connection of
            // another worker that ended at its RSET): they were not tried, and say so, as
            // for a suspension, so that a last attempt is not expired untried. No host
            // answered for them: no Remote-MTA in their reports.
            let not_tried = format!("{}{text}", dsn::NOT_TRIED);
            *dq.paused_for.borrow_mut() = Some((status.into(), not_tried));
            tracing::info!(
                next_hop = %dq.dest.key(),
                "no connection to the next hop could be used ({text}); delivery to it paused for {:?}",
                Duration::from_millis(self.pause_ms())
            );
        }
        self.settle_all_in_turns(jobs, permanent.is_some(), status, &text, remote);
    }

    /// A connection with no job waiting: kept for the next job up to `--outbound-idle-timeout`,
    /// unless another next hop wants its place (at once for one waiting with no connection,
    /// after [`IDLE_GRACE`] for one whose connections have a backlog).
    async fn idle(self: &Rc<Self>, dq: &Rc<DestQueue>, conn: &mut Outbound) -> Idled {
        // Idle: keep the connection for a while for the next job, unless another
        // next hop waits in line for a connection of the core's share.
        // One idle timeout, however often the wait is woken for nothing.
        let idle_since = Instant::now();
        let idle_until = idle_since + self.relay.config.idle_timeout;
        // Among the connections a job wakes, in its place from now on: a wait woken for
        // nothing (a place wanted elsewhere) keeps it, rather than going back to the top.
        let idle_wait = IdleWait::new(dq);
        let (woke, wanted) = loop {
            let wanted = self.slot_wanted.listen();
            // A next hop in line gets the place at once; one whose connections
            // have a backlog once this one has been idle for a moment (so that a
            // trickle of mail keeps its connection).
            let grace_over = idle_since.elapsed() >= IDLE_GRACE;
            let backlog = self.someone_wanting_more();
            if self.someone_starved() || (grace_over && backlog) {
                drop(wanted);
                // Out of those a job wakes before `leave` may wake one.
                drop(idle_wait);
                self.leave(dq);
                return Idled::Quit;
            }
            dq.idle.set(dq.idle.get() + 1);
            let listener = idle_wait.0.listen();
            // No borrow of the queue may live across the wait (enqueue pushes to
            // it).
            let empty = dq.ready.borrow().is_empty();
            let idle_end = async {
                future::or(
                    glommio::timer::sleep(idle_until.saturating_duration_since(Instant::now())),
                    self.handle.stopped(),
                )
                .await;
                Wake::Over
            };
            let grace_end = async {
                if backlog {
                    let left = IDLE_GRACE.saturating_sub(idle_since.elapsed());
                    glommio::timer::sleep(left).await;
                } else {
                    future::pending::<()>().await;
                }
                Wake::Wanted
            };
            let woke = if empty {
                future::or(
                    async {
                        listener.await;
                        Wake::Job
                    },
                    future::or(
                        idle_end,
                        future::or(grace_end, async {
                            wanted.await;
                            Wake::Wanted
                        }),
                    ),
                )
                .await
            } else {
                Wake::Job
            };
            dq.idle.set(dq.idle.get() - 1);
            // Asked for its place with nothing of its own to do: given up at the
            // top of the loop if the line still has someone (or it waits again).
            if woke != Wake::Wanted || !dq.ready.borrow().is_empty() {
                break (woke == Wake::Job, woke == Wake::Wanted);
            }
        };
        // No longer among the connections a job wakes.
        drop(idle_wait);
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
            return Idled::Reconnect;
        }
        if woke || !dq.ready.borrow().is_empty() {
            return Idled::Work;
        }
        if self.someone_waiting() {
            // Its place is wanted: counted out before the QUIT, not after it.
            self.leave(dq);
            return Idled::Quit;
        }
        Idled::Over
    }

    /// Ends a connection idle for its whole `--outbound-idle-timeout` with QUIT. True when
    /// another next hop wanted its place meanwhile: it was counted out then, and its worker
    /// ends; false when jobs that came meanwhile may want a new connection.
    async fn quit_idle(self: &Rc<Self>, dq: &Rc<DestQueue>, conn: Outbound) -> bool {
        // The QUIT's reply may take a while, and this worker still counts against
        // the next hop's connections, and as opening one: a job queued meanwhile
        // starts no worker of its own (two connections would open for it), since
        // the loop's test looks at the queue again and connects for it. If another
        // next hop comes to want the place meanwhile, it is counted out then, and
        // the QUIT goes on.
        let opening = Opening::new(dq);
        let wanted = self.slot_wanted.listen();
        let mut quit = std::pin::pin!(self.say_quit(conn));
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
        drop(opening);
        if asked {
            self.leave(dq);
            // As many others as the core's share are already waiting for their QUIT's reply:
            // this one is closed without waiting for it, so that sockets past the cap stay
            // bounded, as in `quit_after_leaving` (its QUIT went out).
            if self.quitting.get() >= self.most_outbound() {
                return true;
            }
            self.quitting.set(self.quitting.get() + 1);
            quit.await;
            self.quitting.set(self.quitting.get() - 1);
            return true;
        }
        false
    }

    /// A job never sent on a connection that ended at its RSET goes back: to the front of
    /// `carry` when it was carried (`note`), so that it keeps its way past the address that
    /// put it off, else to the front of its queue.
    pub(super) fn put_back(
        &self,
        dq: &DestQueue,
        job: Job,
        note: Option<Note>,
        carry: &mut Vec<Carried>,
    ) {
        match note {
            Some(note) => self.carry_again(dq, note.with(job), carry),
            None => self.requeue(dq, vec![job]),
        }
    }

    /// Concludes the batch's transactions answered before a break: with their replies, or,
    /// when those cannot be trusted (`unknown`: the break's error), as broken by it.
    fn conclude_answered(
        &self,
        conn: &Outbound,
        dq: &DestQueue,
        answered: &mut Vec<(Job, TransactionResult)>,
        unknown: Option<&ConnError>,
        carry: &mut Vec<Carried>,
    ) {
        for (job, result) in answered.drain(..) {
            let outcome = match unknown {
                Some(e) => Err(Err(e.clone())),
                None => Ok(result),
            };
            self.conclude(conn, dq, job, outcome, None, carry);
        }
    }

    /// Puts back a batch's job that the next hop never took (it ended at the RSET before it),
    /// and those sent after it: a carried one first in `carry` (with its note), the others at
    /// the front of their queue, none charged a failed attempt.
    fn put_back_untaken(
        &self,
        dq: &DestQueue,
        job: Job,
        note: Option<Note>,
        later: impl Iterator<Item = Job>,
        carry: &mut Vec<Carried>,
    ) {
        match note {
            Some(n) => {
                self.carry_again(dq, n.with(job), carry);
                self.requeue(dq, later.collect());
            }
            None => self.requeue(dq, std::iter::once(job).chain(later).collect()),
        }
    }

    /// Puts a carried job back first in `carry`, for the next connection; unless the next
    /// hop was paused meanwhile (a transaction of the batch, or another connection, found it
    /// down): then no connection is made for it, and it is deferred with its note.
    fn carry_again(&self, dq: &DestQueue, carried: Carried, carry: &mut Vec<Carried>) {
        if dq.down_until.get() > mono_ms() {
            self.settle_carried(carried);
        } else {
            carry.insert(0, carried);
        }
    }

    /// Runs one job on `conn`; `note` when it was carried.
    pub(super) async fn transact(
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
        // A message deleted by the operator while its envelope is answered (a next hop slow
        // to say 354) does not have its body sent: its deletion, already reported done,
        // would otherwise be followed by its delivery.
        let msg = job.msg.clone();
        conn.withdraw_if(Some(Box::new(move || msg.deleted.load(Ordering::Acquire))));
        let outcome = conn.deliver(&tx, &body, &self.relay.config.timeouts).await;
        conn.withdraw_if(None);
        if matches!(&outcome, Err(Err(ConnError::Io(why))) if why == crate::conn::WITHDRAWN) {
            tracing::info!(
                queue_id = %job.msg.queue_id,
                remote = %conn.remote,
                "deleted by the operator while its transaction was under way: its body was not \
                 sent, and the connection is given up with it"
            );
            return After::Broken;
        }
        if let Err(Err(ConnError::Stale(e))) = &outcome {
            // The next hop ended a kept connection before this transaction began: the job
            // goes on a new connection, not charged a failed attempt (a new connection never
            // sends RSET first, so this cannot repeat).
            tracing::debug!(remote = %conn.remote, "kept connection ended at RSET ({e}); reconnecting");
            self.put_back(dq, job, note, carry);
            return After::Broken;
        }
        // Replies got before a break still count where they refused for good, unless they
        // were out of step, or the break came as a timeout or after a long silence: a reply
        // the next hop never sent would have let each later one answer the command before
        // its own, so a refusal may have been another recipient's (as for a batch, see
        // SILENCE_BEFORE_BREAK).
        let partial = match &outcome {
            Err(Err(e)) if crate::conn::out_of_step(e) => None,
            Err(Err(ConnError::Io(text))) if text == crate::conn::TIMED_OUT => None,
            Err(Err(_)) if conn.quiet_for() >= SILENCE_BEFORE_BREAK => None,
            Err(Err(_)) => conn.take_unfinished(),
            _ => None,
        };
        match self.conclude(conn, dq, job, outcome, partial, carry) {
            // Answered (a refusal read after the body's write broke off), but the
            // connection is gone: the next job gets a new one.
            After::Keep | After::Elsewhere if conn.write_broke() => After::Broken,
            after => after,
        }
    }

    /// Runs up to `--max-transactions-in-flight` jobs on `conn`, pipelined into each other:
    /// every transaction is written before the first reply is read. Jobs not sent because the
    /// connection broke go back to the front of the queue.
    pub(super) async fn transact_pipelined(
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
        // Where in `sent` the job whose body's write broke off is.
        let mut broken_at: Option<usize> = None;
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
                            Some(n) => self.carry_again(dq, n.with(job), carry),
                            None => stale.push(job),
                        }
                        broken = Some(e);
                        break;
                    }
                    // Part of it went out: what the next hop sent before it broke off (a
                    // refusal of its body, as from one without SIZE that stops reading an
                    // oversized body) is read with the others' replies, as its outcome. No
                    // reply can take it (its body did not all go out). A failure before
                    // anything was written leaves its outcome unknown at once.
                    if conn.write_broke() {
                        if sent.is_empty() {
                            note = first_note;
                        }
                        broken_at = Some(sent.len());
                        sent.push(job);
                    } else {
                        self.conclude(conn, dq, job, Err(Err(e.clone())), None, carry);
                    }
                    dq.serial_until
                        .set(mono_ms() + SERIAL_AFTER_BREAK.as_millis() as u64);
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
            Some(_) => t.data_done.min(crate::conn::AFTER_WRITE_FAILURE),
        };
        let mut sent = sent.into_iter();
        let mut elsewhere = false;
        // Outcomes are concluded once the batch's last reply is in: a reply too many found
        // after it means every reply of the batch may have answered the command before its
        // own (see `unasked_after_reply`).
        let mut answered: Vec<(Job, TransactionResult)> = Vec::new();
        // The silence before a break counts from the end of the writes (a slow write is no
        // silence of the next hop's).
        conn.quiet_from_now();
        let mut read = 0usize;
        // The job whose body did not all go out, once its reply (or none) is read.
        let mut cut: Option<(Job, ConnError, Option<TransactionResult>)> = None;
        while let Some(job) = sent.next() {
            // Only the first job sent can be the carried one.
            let first_note = note.take();
            let cut_short = broken_at == Some(read);
            read += 1;
            let finished = match conn.finish(limit).await {
                // A reply that takes a body that did not all go out cannot be in step.
                Ok(result) if cut_short && result.data.as_ref().is_none_or(|d| d.is_positive()) => {
                    Err(ConnError::Io(crate::conn::OUT_OF_STEP.into()))
                }
                finished => finished,
            };
            match finished {
                Ok(result) => answered.push((job, result)),
                // No reply to a body that did not all go out (the connection ended, or the
                // next hop still waits for the rest of it): expected, and no sign that the
                // others' replies were out of step. Its outcome is the broken write's, with
                // what it got before, as for a transaction alone (see `transact`).
                Err(e @ ConnError::Io(_)) if cut_short && !crate::conn::out_of_step(&e) => {
                    let unfinished = conn.take_unfinished();
                    // Not a reply to this transaction's MAIL: the RSET awaited is the one
                    // before it, not one the session sent after a refusal of it.
                    let unanswered = unfinished.as_ref().is_none_or(|p| p.mail.code == 0);
                    let at_rset = if unanswered {
                        conn.at_rset(e.clone())
                    } else {
                        e.clone()
                    };
                    if let ConnError::Stale(why) = at_rset {
                        // The next hop closed at the RSET before this transaction (its body's
                        // write then broke on the closed connection): it took neither this one
                        // nor any later one, and none is charged a failed attempt, as below.
                        tracing::debug!(remote = %conn.remote, "kept connection ended at RSET ({why}); reconnecting");
                        let silent = conn.quiet_for() >= SILENCE_BEFORE_BREAK;
                        let unsure = silent || addressed(&answered);
                        self.conclude_answered(
                            conn,
                            dq,
                            &mut answered,
                            unsure.then_some(&e),
                            carry,
                        );
                        self.put_back_untaken(dq, job, first_note, sent.by_ref(), carry);
                        return After::Broken;
                    }
                    let broke = broken.clone().unwrap_or(e);
                    let partial = match &broke {
                        ConnError::Io(text) if text == crate::conn::TIMED_OUT => None,
                        _ if conn.quiet_for() >= SILENCE_BEFORE_BREAK => None,
                        _ => unfinished,
                    };
                    // The last job sent: concluded after those answered before it, so that
                    // their answers count before its break (which may pause the next hop).
                    cut = Some((job, broke, partial));
                }
                Err(e) => {
                    // Those answered before the break keep their replies, unless the batch
                    // ran out of time, the next hop ended it after a long silence, or its
                    // replies were out of step: a reply it never sent would have let each
                    // later one answer the command before its own (the next RSET's 250 taken
                    // for a message's), so none of them is known (see SILENCE_BEFORE_BREAK).
                    let silent = conn.quiet_for() >= SILENCE_BEFORE_BREAK;
                    // Nor when one was taken with an addressing status, which only a NOOP
                    // after the batch could show to be in step.
                    let short = matches!(&e, ConnError::Io(text) if text == crate::conn::TIMED_OUT)
                        || silent
                        || crate::conn::out_of_step(&e)
                        || addressed(&answered);
                    self.conclude_answered(conn, dq, &mut answered, short.then_some(&e), carry);
                    if let ConnError::Stale(why) = conn.at_rset(e.clone()) {
                        // Ended at the RSET before this transaction: the server took neither
                        // it nor any later one, and none is charged a failed attempt.
                        tracing::debug!(remote = %conn.remote, "kept connection ended at RSET ({why}); reconnecting");
                        self.put_back_untaken(dq, job, first_note, sent.by_ref(), carry);
                        return After::Broken;
                    }
                    // The oldest transaction: the replies it got before the break are its own,
                    // unless the break is that they were out of step.
                    let partial = if short { None } else { conn.take_unfinished() };
                    self.conclude(conn, dq, job, Err(Err(e.clone())), partial, carry);
                    if matches!(e, ConnError::Smtp(ClientError::Closing(_))) {
                        // The server closed at this reply, so it took none of the later
                        // transactions: they go back to the queue as if never sent (a batch
                        // short of a reply may have had them taken: sent again, a duplicate
                        // at worst, one transaction per round trip for a while, as below).
                        if short {
                            dq.serial_until
                                .set(mono_ms() + SERIAL_AFTER_BREAK.as_millis() as u64);
                        }
                        self.requeue(dq, sent.collect());
                    } else {
                        // Their outcome is unknown: deferred, like this one. A next hop that
                        // drops connections in the middle of a batch might do it to every
                        // batch, so it gets one transaction per round trip for a while.
                        dq.serial_until
                            .set(mono_ms() + SERIAL_AFTER_BREAK.as_millis() as u64);
                        for job in sent {
                            self.conclude(conn, dq, job, Err(Err(e.clone())), None, carry);
                        }
                    }
                    return After::Broken;
                }
            }
        }
        // A batch that took a message past a refusal, or with an addressing status, is asked
        // a NOOP (see `unsure_of`): anything but its 250 is a reply left over.
        // One taken with an addressing status in a batch whose write broke gets no NOOP: its
        // outcome is not known.
        let unsure = || crate::conn::unsure_of(answered.iter().map(|(_, r)| r));
        let strict = addressed(&answered);
        if conn.unasked_after_last_reply()
            || (broken.is_some() && strict)
            || (broken.is_none() && unsure() && conn.in_step(t.mail, strict).await.is_err())
        {
            // Out of step: none of these outcomes is known. Deferred, and tried again (a
            // duplicate at worst, never a refusal taken for a delivery); one transaction per
            // round trip to this next hop for a while, so that one stray reply costs one
            // message's attempt, not a batch's.
            let e = ConnError::Io(crate::conn::OUT_OF_STEP.into());
            conn.out_of_step_given_up();
            dq.serial_until
                .set(mono_ms() + SERIAL_AFTER_BREAK.as_millis() as u64);
            for (job, _) in answered {
                self.conclude(conn, dq, job, Err(Err(e.clone())), None, carry);
            }
            if let Some((job, broke, partial)) = cut {
                self.conclude(conn, dq, job, Err(Err(broke)), partial, carry);
            }
            return After::Broken;
        }
        for (job, result) in answered {
            elsewhere |= self.conclude(conn, dq, job, Ok(result), None, carry) == After::Elsewhere;
        }
        if let Some((job, broke, partial)) = cut {
            self.conclude(conn, dq, job, Err(Err(broke)), partial, carry);
        }
        match (broken, elsewhere) {
            (Some(_), _) => After::Broken,
            (None, true) => After::Elsewhere,
            (None, false) => After::Keep,
        }
    }

    /// Puts jobs that were never sent back at the front of their queue, in order.
    /// While the next hop is paused they are deferred like the jobs that waited for it.
    pub(super) fn requeue(&self, dq: &DestQueue, jobs: Vec<Job>) {
        // Those the operator deleted meanwhile go no further: put back, they would wait
        // with their bodies' space held (the look for deleted jobs was made already).
        let jobs: Vec<Job> = jobs
            .into_iter()
            .filter(|job| !job.msg.deleted.load(Ordering::Acquire))
            .collect();
        if dq.down_until.get() > mono_ms() {
            if let Some((status, text)) = dq.paused_for.borrow().clone() {
                for job in jobs {
                    self.settle_all(job, false, &status, &text, None);
                }
                return;
            }
        }
        let n = jobs.len();
        let mut ready = dq.ready.borrow_mut();
        for job in jobs.into_iter().rev() {
            ready.push_front(job);
        }
        drop(ready);
        // As for jobs that arrive: an idle connection takes them (the worker that puts them
        // back may give its place up rather than reconnect).
        if dq.idle.get() > 0 && n > 0 {
            dq.wake_idle(n);
        }
    }

    /// How long a next hop, or one of its addresses, is left alone after it could not be
    /// reached or broke off (ms): the first retry delay, at most a minute.
    pub(super) fn pause_ms(&self) -> u64 {
        let pause = self.relay.config.retry.initial.min(Duration::from_secs(60));
        u64::try_from(pause.as_millis()).unwrap_or(u64::MAX)
    }

    /// Starts connections for the jobs of `dq` waiting beyond those this worker takes next
    /// and those the other connections take, as many as the next hop may have.
    fn spread_waiting(self: &Rc<Self>, dq: &Rc<DestQueue>) {
        let waiting = self.connections_wanted(dq, self.jobs_per_connection(dq));
        let room = self.most_workers(dq).saturating_sub(dq.workers.get());
        for _ in 0..waiting.min(room) {
            if !self.start_worker(dq) {
                break;
            }
        }
    }

    /// Notes that `addr` of `dq`'s next hop could not be reached or broke a connection off.
    pub(super) fn broke(&self, dq: &DestQueue, addr: SocketAddr) {
        let now = self.passed_over(dq, addr);
        dq.last_broke.set(now);
        dq.broken_in_a_row
            .set(dq.broken_in_a_row.get().saturating_add(1));
        dq.opened_since_broke.set(0);
    }

    /// Notes that `addr` of `dq`'s next hop broke, for the first retry delay (at most a
    /// minute; see `every_address_broke`); gives back the time now (ms).
    fn passed_over(&self, dq: &DestQueue, addr: SocketAddr) -> u64 {
        let now = mono_ms();
        let mut broke = dq.broke.borrow_mut();
        broke.retain(|_, until| *until > now);
        broke.insert(addr, now + self.pause_ms());
        now
    }

    /// Whether `dq`'s failures in a row are enough to pause it: two, with failures at least
    /// three quarters of its last outcomes, or [`BROKEN_IN_A_ROW_PAUSES`] whatever came
    /// before.
    fn failing_enough(&self, dq: &DestQueue) -> bool {
        let in_a_row = dq.broken_in_a_row.get();
        in_a_row >= BROKEN_IN_A_ROW_PAUSES || (in_a_row >= 2 && dq.mostly_failing())
    }

    /// `conn`, to `dq`'s next hop, broke off (a 421, a close, a timeout) in a transaction.
    /// Counted as a failure in a row only when no other connection to the next hop had a
    /// transaction answered meanwhile: a next hop that carries mail on its other connections
    /// while it drops one now and then (a content filter that fails one message in ten, a
    /// per-session limit) works; two such breaks in a row, each beside transactions answered
    /// elsewhere, would otherwise pause it as a whole, and with it all its mail. The address
    /// is passed over all the same (another address may take the job at once). Logged, with
    /// `why`: the transactions the next hop had not answered go again without a word of their
    /// own (they were not refused), and a next hop that ends sessions over and over (an error
    /// limit) should show in the log.
    pub(super) fn broke_off(&self, dq: &DestQueue, conn: &crate::conn::Outbound, why: &str) {
        tracing::info!(
            next_hop = %dq.dest.key(),
            addr = %conn.addr,
            "the next hop broke the session off in a transaction ({why}); what it had not \
             answered goes again"
        );
        if dq.answered.get() == conn.answered_mark.get() {
            self.broke(dq, conn.addr);
            dq.note_outcome(true);
        } else {
            tracing::debug!(
                next_hop = %dq.dest.key(),
                addr = %conn.addr,
                "a connection broke off while others had transactions answered: not counted \
                 as the next hop failing"
            );
            self.passed_over(dq, conn.addr);
        }
    }

    /// Whether every address of `dq`'s next hop could not be reached or broke a connection
    /// off lately, with enough failures in a row (`failing_enough`): one dropped connection
    /// to a next hop with a single address is a glitch, not an outage; nor are a few drops in
    /// a row from a next hop that answers most transactions (one that fails a session in ten
    /// has two in a row every hundred or so, one that fails three in ten five in a row every
    /// few hundred); and one that was working and now fails every session is paused after
    /// [`BROKEN_IN_A_ROW_PAUSES`].
    pub(super) fn every_address_broke(&self, dq: &DestQueue) -> bool {
        if !self.failing_enough(dq) {
            return false;
        }
        let now = mono_ms();
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
    pub(super) fn suspend(&self, dq: &DestQueue, last: &Carried, carry: &mut Vec<Carried>) {
        dq.down_until.set(mono_ms() + self.pause_ms());
        // No next hop answered for these jobs: no Remote-MTA in their reports.
        let not_tried = format!("{}{}", dsn::NOT_TRIED, last.text);
        *dq.paused_for.borrow_mut() = Some((last.status.clone(), not_tried.clone()));
        tracing::info!(
            next_hop = %dq.dest.key(),
            "every address of the next hop broke off; delivery to it suspended for {}s",
            self.pause_ms() / 1000
        );
        for k in carry.drain(..) {
            self.settle_carried(k);
        }
        let jobs: Vec<Job> = dq.ready.borrow_mut().drain(..).collect();
        self.settle_all_in_turns(jobs, false, &last.status, &not_tried, None);
    }

    /// The addresses in `on_a_name` (their certificate failed a host's name, another name
    /// was ahead) other than `but` failed this attempt: noted as broken, and among `failed`.
    fn failed_on_names(
        &self,
        dq: &DestQueue,
        on_a_name: &mut Vec<SocketAddr>,
        failed: &mut Vec<SocketAddr>,
        but: Option<SocketAddr>,
    ) {
        for a in on_a_name.drain(..) {
            if Some(a) != but && !failed.contains(&a) {
                self.broke(dq, a);
                failed.push(a);
            }
        }
    }

    /// Passes over `addr` of `dq`'s next hop for a while (see `pause_ms`).
    pub(super) fn avoid(&self, dq: &DestQueue, addr: SocketAddr) {
        let now = mono_ms();
        let mut avoid = dq.avoid.borrow_mut();
        avoid.retain(|_, until| *until > now);
        avoid.insert(addr, now + self.pause_ms());
    }

    /// A job's transaction at `addr` broke off or was put off as a whole. The job goes at once
    /// to another address of its next hop that it has not tried in this attempt, on this
    /// worker's next connection (RFC 5321 5.1: the addresses in order until one takes the
    /// mail), at most [`MAX_ADDRESSES_PER_ATTEMPT`]; None then. With none left, or the next
    /// hop paused, it comes back, to be deferred. With `host_trouble` the address is also
    /// passed over by new connections for a while.
    pub(super) fn pass_over(
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
        // A next hop paused meanwhile (every address broke off, for a job before this one
        // in the same batch, say) gets no new connection for this job either.
        let paused = dq.down_until.get() > mono_ms();
        if !others || paused {
            return Some(c);
        }
        tracing::info!(queue_id = %c.job.msg.queue_id, %addr, "trying the next address of the next hop");
        carry.push(c);
        None
    }

    /// The next hop's hosts and addresses, looked up (through the resolver's cache) or as
    /// configured.
    async fn find(&self, dq: &DestQueue) -> Result<Found, Unopened> {
        let config = &self.relay.config;
        tracing::debug!(next_hop = %dq.dest.key(), "finding the next hop's addresses");
        Ok(match &dq.dest {
            Destination::Fixed(hp) => {
                let (hops, valid_until) = match hp.host.parse::<IpAddr>() {
                    Ok(ip) => (
                        vec![NextHop {
                            host: hp.host.clone(),
                            preference: 0,
                            addrs: vec![ip],
                        }],
                        None,
                    ),
                    // Both loopback addresses, IPv4 first, as a resolver gives `localhost.`:
                    // a next hop listening on ::1 alone is reached too.
                    Err(_) if hp.host == "localhost" => (
                        vec![NextHop {
                            host: hp.host.clone(),
                            preference: 0,
                            addrs: vec![
                                IpAddr::from([127, 0, 0, 1]),
                                IpAddr::from([0, 0, 0, 0, 0, 0, 0, 1]),
                            ],
                        }],
                        None,
                    ),
                    Err(_) => {
                        let found = self
                            .relay
                            .resolver
                            .host_hops(&hp.host)
                            .await
                            .map_err(|e| unresolved(&hp.host, &e))?;
                        (found.hops, found.valid_until)
                    }
                };
                // A route's host and the relay host are the operator's choice: not checked
                // for being this server.
                Found {
                    hops,
                    port: hp.port,
                    looked_up_mx: false,
                    published_best: None,
                    pending_best: None,
                    valid_until,
                }
            }
            Destination::Mx(domain) => {
                let found = self
                    .relay
                    .resolver
                    .mx_next_hops(domain, &config.hostname)
                    .await
                    .map_err(|e| unresolved(domain, &e))?;
                let (published_best, pending_best, valid_until) =
                    (Some(found.best), found.pending, found.valid_until);
                let me = crate::mx::Myself {
                    hostname: &config.hostname,
                    listen: &config.own_addrs,
                    port: config.mx_port,
                };
                let hops = me
                    .drop_from(found, crate::mx::local_addresses)
                    .map_err(|e| unresolved(domain, &e))?;
                // MX hosts are checked for being this server once connected.
                Found {
                    hops,
                    port: config.mx_port,
                    looked_up_mx: true,
                    published_best,
                    pending_best,
                    valid_until,
                }
            }
        })
    }

    /// Whether the kept connection `chosen` (not a fallback) still goes where the next hop's
    /// DNS sends its mail, once the answers it was opened on ran past their TTL (RFC 5321
    /// 5.1; RFC 7505 3: no mail to a domain that now publishes a null MX); `Some` gives when
    /// to ask again. It does while its address is one of the most preferred hosts'. Its host
    /// still among them under other addresses (a pool that answers with a rotating part of
    /// its addresses, one family's lookup that failed for now) keeps it up to
    /// [`RECHECK_CEILING`] from its start, after which a new connection takes the host's
    /// addresses as they are now. A lookup that fails for now, for its host or one more
    /// preferred, or as a whole, keeps it (its host answered a moment ago), asked again
    /// after [`RECHECK_AFTER_FAILURE`].
    async fn still_chosen(&self, dq: &DestQueue, chosen: &Chosen) -> Option<Instant> {
        let for_now = || Some(Instant::now() + RECHECK_AFTER_FAILURE);
        match self.find(dq).await {
            Ok(found) => {
                let best = found.hops.iter().map(|h| h.preference).min();
                let better = best.into_iter().chain(found.pending_best).min();
                let preferred: Vec<&NextHop> = found
                    .hops
                    .iter()
                    .filter(|h| better.is_none_or(|b| h.preference <= b))
                    .collect();
                let next = found
                    .valid_until
                    .map_or(Instant::now() + RECHECK_CEILING, recheck_time);
                let here = chosen.addr.ip().to_canonical();
                if preferred
                    .iter()
                    .any(|h| h.addrs.iter().any(|a| a.to_canonical() == here))
                {
                    return Some(next);
                }
                let ceiling = chosen.opened + RECHECK_CEILING;
                if preferred.iter().any(|h| h.host == chosen.host) && Instant::now() < ceiling {
                    return Some(next.min(ceiling));
                }
                if found.pending_best.is_some_and(|p| p <= chosen.preference) {
                    return for_now();
                }
                tracing::info!(
                    next_hop = %dq.dest.key(),
                    addr = %chosen.addr,
                    "the next hop's DNS no longer leads to this connection's address; reconnecting"
                );
                None
            }
            // Failed for good (a null MX published now, the name gone): the jobs meet that in
            // the next connection's lookup.
            Err(unopened) if unopened.1.is_some() => {
                tracing::info!(
                    next_hop = %dq.dest.key(),
                    addr = %chosen.addr,
                    "the next hop's DNS now says {}; leaving the connection",
                    unopened.0
                );
                None
            }
            Err(_) => for_now(),
        }
    }

    /// Connects to the next hop: its addresses in preference order (those in `tried` by the
    /// jobs this connection is for, and those passed over lately, last), the next one when a
    /// host refuses or greets with an error. Err carries the text, for a permanent failure
    /// its status, and the next hop's name when the last failure came from a host that
    /// answered (its greeting, EHLO or TLS), for the log's `relay` and the report's
    /// Remote-MTA.
    pub(super) async fn open(
        &self,
        dq: &DestQueue,
        tried: &[SocketAddr],
    ) -> Result<Opened, Unopened> {
        let config = &self.relay.config;
        let Found {
            hops,
            port,
            looked_up_mx,
            published_best,
            pending_best,
            valid_until,
        } = self.find(dq).await?;
        let recheck_at = valid_until.map(recheck_time);
        // Only a name of ours that no other server is likely to give itself: a fully
        // qualified one, not `localhost` (which unconfigured servers greet with).
        let check_greeting = looked_up_mx && distinctive(&config.hostname);
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
        // The status of the last account where the failure itself says one (TLS).
        let mut last_status = None;
        // Whether the last account is a host refusing the session (see `Unopened`).
        let mut last_refused = false;
        // Each address once, under its best host: MX names that share addresses (aliases of
        // one pool) would have one attempt try the same host again and leave the backup MX
        // past the attempt's five addresses. An IPv4-mapped IPv6 address (an AAAA record
        // for an IPv4 host) is that IPv4 address. Where TLS is required, the certificate is
        // checked against the host's name, so an address is listed once for each name: one
        // whose certificate does not name the best host may name the next (RFC 7672 2.2.2,
        // RFC 8461 5: the next MX host is tried); it is passed over under the later names
        // once it failed otherwise than in TLS (it is down whatever its name).
        let by_name = policy == TlsPolicy::Required;
        let mut listed = std::collections::HashSet::new();
        let mut candidates: Vec<(&NextHop, SocketAddr)> = hops
            .iter()
            .flat_map(|h| {
                h.addrs
                    .iter()
                    .map(move |&ip| (h, SocketAddr::new(ip.to_canonical(), port)))
            })
            .filter(|&(h, a)| listed.insert((a, by_name.then(|| h.host.to_ascii_lowercase()))))
            .collect();
        {
            let mut once = std::collections::HashSet::new();
            *dq.addrs.borrow_mut() = candidates
                .iter()
                .map(|&(_, a)| a)
                .filter(|&a| once.insert(a))
                .collect();
        }
        let best = candidates.iter().map(|(h, _)| h.preference).min();
        // A host less preferred than one that could not be reached, or whose addresses could
        // not be looked up for now, stands in for it: its connection is a fallback, kept only
        // for the pause, so that the better host gets the mail back once it can.
        let better = best.into_iter().chain(pending_best).min();
        // For a host that turns out to be this server: a more preferred one published, with
        // or without an address now, may take the mail later.
        let primary = best.into_iter().chain(published_best).min();
        let addresses = dq.addrs.borrow().len();
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
        let now = mono_ms();
        {
            let (avoid, broke) = (dq.avoid.borrow(), dq.broke.borrow());
            let lately = |m: &HashMap<SocketAddr, u64>, a: &SocketAddr| {
                m.get(a).is_some_and(|&until| until > now)
            };
            candidates
                .sort_by_key(|(_, a)| (tried.contains(a), lately(&avoid, a) || lately(&broke, a)));
        }
        // At most MAX_ADDRESSES_PER_ATTEMPT addresses, as for a job passed over: a next hop
        // with many silent addresses cannot hold a worker for their greeting timeouts. An
        // address this machine has no way to (its kernel says so at once: an IPv4 address on
        // a machine with IPv6 only, say) costs nothing and is not counted, up to
        // MAX_NO_ROUTE of them: five such addresses first would otherwise leave the
        // reachable ones, or a backup MX, untried at every attempt.
        let mut costly = 0;
        let mut no_route = Vec::new();
        // With TLS required, an address listed under several names (see `by_name`): how many
        // of its listings are still ahead, those that failed otherwise than on the name
        // alone (down under any name), those that failed on a name with another ahead (not
        // counted as failed unless the others fail too), and those counted against
        // MAX_ADDRESSES_PER_ATTEMPT (once each, whatever its names).
        let mut ahead: HashMap<SocketAddr, usize> = HashMap::new();
        for &(_, a) in &candidates {
            *ahead.entry(a).or_default() += 1;
        }
        let mut down = std::collections::HashSet::new();
        let mut on_a_name: Vec<SocketAddr> = Vec::new();
        let mut counted = std::collections::HashSet::new();
        for (hop, addr) in candidates.into_iter() {
            if no_route.len() == MAX_NO_ROUTE {
                break;
            }
            if let Some(n) = ahead.get_mut(&addr) {
                *n = n.saturating_sub(1);
            }
            if costly == MAX_ADDRESSES_PER_ATTEMPT && !counted.contains(&addr) {
                continue;
            }
            if down.contains(&addr) || no_route.contains(&addr) {
                continue;
            }
            let fallback = better.is_some_and(|b| hop.preference > b);
            // Addresses that failed on the way, as a carried job counts them (those this
            // machine has no way to are not among them, as they are not counted here).
            let opened = |conn: Outbound, failed: Vec<SocketAddr>, cleartext_until| Opened {
                conn,
                failed,
                fallback,
                recheck_at,
                preference: hop.preference,
                cleartext_until,
            };
            // The end of the while this address is spoken to in cleartext, if it lasts.
            let window = (policy == TlsPolicy::Opportunistic)
                .then(|| dq.cleartext.borrow().get(&addr).map(|&(until, _)| until))
                .flatten()
                .filter(|&until| until > mono_ms());
            let setup = (policy != TlsPolicy::None && window.is_none()).then(|| config_for(policy));
            let helo = &config.hostname;
            tracing::debug!(%addr, host = %hop.host, "connecting");
            let connected =
                Outbound::connect(addr, &hop.host, helo, setup.as_ref(), &config.timeouts).await;
            if let Some(ok) = setup.as_ref().and_then(|s| s.handshake.get()) {
                self.handle.count_outbound_tls(ok);
            }
            match connected {
                Ok(c) if check_greeting && c.names_itself(&config.hostname) => {
                    self.failed_on_names(dq, &mut on_a_name, &mut failed, Some(addr));
                    return Err(loops_here(c, hop, addr, primary, &config.hostname, &failed).await);
                }
                Ok(c) => {
                    // Addresses that failed on a name, other than this one (it works under
                    // this name), failed.
                    self.failed_on_names(dq, &mut on_a_name, &mut failed, Some(addr));
                    tracing::debug!(%addr, tls = c.is_tls(), "connected");
                    if c.is_tls() {
                        // Its handshakes work again: a later failure starts over.
                        dq.cleartext.borrow_mut().remove(&addr);
                    }
                    return Ok(opened(c, failed, window));
                }
                Err(ConnError::Tls(e)) if policy == TlsPolicy::Opportunistic => {
                    // Try again in cleartext on a new connection, and stay in cleartext
                    // with this address for a while, longer with each failure in a row:
                    // said when that while begins (not by each connection whose handshake
                    // failed meanwhile), since mail to it now goes unencrypted.
                    let (until, begins) = {
                        let mut cleartext = dq.cleartext.borrow_mut();
                        let now = mono_ms();
                        // Failures in a row are forgotten a window's longest after the last.
                        cleartext.retain(|_, (until, _)| {
                            until.saturating_add(CLEARTEXT_LONGEST_MS) > now
                        });
                        match cleartext.get(&addr).copied() {
                            // A connection that began its handshake before another's failure.
                            Some((until, _)) if until > now => (until, None),
                            was => {
                                let failures = was.map_or(1, |(_, n)| n.saturating_add(1));
                                let window = cleartext_window(self.pause_ms(), failures);
                                let until = now.saturating_add(window);
                                cleartext.insert(addr, (until, failures));
                                (until, Some((window, failures)))
                            }
                        }
                    };
                    if let Some((window, failures)) = begins {
                        tracing::warn!(
                            next_hop = %dq.dest.key(),
                            %addr,
                            failures_in_a_row = failures,
                            "STARTTLS failed ({e}); mail to this address goes in cleartext for \
                             {} (--outbound-tls opportunistic; STARTTLS is tried again after \
                             that, and each failure in a row doubles the while, up to an hour)",
                            spoken_while(window)
                        );
                    } else {
                        tracing::debug!(%addr, "STARTTLS failed ({e}); in cleartext already");
                    }
                    match Outbound::connect(addr, &hop.host, helo, None, &config.timeouts).await {
                        Ok(c) if check_greeting && c.names_itself(&config.hostname) => {
                            let here = loops_here(c, hop, addr, primary, &config.hostname, &failed);
                            return Err(here.await);
                        }
                        Ok(c) => return Ok(opened(c, failed, Some(until))),
                        Err(e2) => {
                            refused_helo = false;
                            // It answered the first time (STARTTLS came before the
                            // handshake), whatever the second connection did.
                            last = format!("{}; then {}", e, e2.describe(&hop.host));
                            last_remote = Some(relay_label(&hop.host, addr));
                            last_status = None;
                            last_refused = refuses_session(&e2);
                        }
                    }
                }
                Err(e @ ConnError::NoRoute(_)) => {
                    // Not this next hop's failure: it is not marked as broken (which could
                    // pause it, beside addresses that work), takes no place among the failed
                    // ones, and does not stand against a refusal of HELO by all the others.
                    if last_remote.is_none() {
                        last = e.describe(&tried_label(&hop.host, addr));
                        last_status = None;
                        last_refused = false;
                    }
                    no_route.push(addr);
                    continue;
                }
                Err(e) => {
                    if !matches!(&e, ConnError::Smtp(ClientError::Helo(r)) if r.is_permanent()) {
                        refused_helo = false;
                    }
                    // The account kept is that of the last host that answered, if any did: a
                    // later address where nobody answered does not hide it.
                    if e.answered() || last_remote.is_none() {
                        last = e.describe(&tried_label(&hop.host, addr));
                        last_remote = e.answered().then(|| relay_label(&hop.host, addr));
                        last_status = e.tls_status();
                        last_refused = refuses_session(&e);
                    }
                    if by_name && e.on_the_name() && ahead.get(&addr).is_some_and(|&n| n > 0) {
                        // Another name of this address is ahead: tried under it before the
                        // address counts as failed.
                        if !on_a_name.contains(&addr) {
                            on_a_name.push(addr);
                        }
                        if counted.insert(addr) {
                            costly += 1;
                        }
                        continue;
                    }
                    down.insert(addr);
                }
            }
            // (An address tried under a second name, TLS being required, is one failure.)
            on_a_name.retain(|&a| a != addr);
            if !failed.contains(&addr) {
                self.broke(dq, addr);
                failed.push(addr);
            }
            if counted.insert(addr) {
                costly += 1;
            }
        }
        // Those whose other names were not reached.
        self.failed_on_names(dq, &mut on_a_name, &mut failed, None);
        // Every address, not only those this attempt reached: a host further down the list
        // (a backup MX) may still take the mail. (Those this machine has no way to aside.)
        let refused =
            (refused_helo && !failed.is_empty() && failed.len() + no_route.len() == addresses)
                .then_some("5.0.0");
        let failed = u32::try_from(failed.len()).unwrap_or(u32::MAX);
        Err((
            last,
            refused,
            last_remote,
            last_status,
            failed,
            last_refused,
        ))
    }

    // ----- owner side -----
}

/// Whether a connection failed because the host refused the session, at its greeting or in
/// answer to EHLO or HELO (as at its limit of connections per client), not because TLS,
/// the network or the protocol failed.
fn refuses_session(e: &ConnError) -> bool {
    matches!(
        e,
        ConnError::Smtp(ClientError::Greeting(_) | ClientError::Closing(_) | ClientError::Helo(_))
    )
}

/// Whether a host name is one only this server would greet with: it has a dot inside, and it
/// is not `localhost` or under it (`localhost.localdomain`).
fn distinctive(hostname: &str) -> bool {
    let name = hostname.trim_end_matches('.').to_ascii_lowercase();
    name.contains('.') && !name.starts_with("localhost.") && !name.starts_with("localhost6.")
}

/// An MX host that greets with our own name: this server, where its addresses did not show
/// it (NAT, a port forward), and what it takes it would relay here again (RFC 5321 5.1).
/// Ends the session. A host more preferred than it that could not be reached now may take
/// the mail later (deferred, 4.4.4); otherwise nowhere is left to send it (5.4.6).
async fn loops_here(
    c: Outbound,
    hop: &NextHop,
    addr: SocketAddr,
    best: Option<u16>,
    hostname: &str,
    failed: &[SocketAddr],
) -> Unopened {
    c.quit_now().await;
    let text = format!(
        "{LOOPS_BACK} (MX host {} [{}] greets with our own name, {hostname})",
        hop.host,
        addr.ip(),
    );
    tracing::warn!(%addr, host = %hop.host, "{text}");
    let failed = u32::try_from(failed.len()).unwrap_or(u32::MAX);
    // The host answered (its greeting decided): it is the log's `relay` and the report's
    // Remote-MTA.
    let remote = Some(relay_label(&hop.host, addr));
    if best.is_some_and(|b| hop.preference > b) {
        (text, None, remote, Some("4.4.4"), failed, false)
    } else {
        (text, Some("5.4.6"), remote, None, failed, false)
    }
}

/// How lately another connection must have had an answer to count as one that works, for
/// a connection attempt that failed in less time than this (see `CoreRelay::others_work`).
const WORKS_WITHIN: Duration = Duration::from_secs(2);

/// Counts a worker's open connection in [`DestQueue::connected`] while it lives.
struct Connected<'a>(&'a DestQueue);

impl<'a> Connected<'a> {
    fn new(dq: &'a DestQueue) -> Self {
        dq.connected.set(dq.connected.get() + 1);
        Self(dq)
    }
}

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.0.connected.set(self.0.connected.get() - 1);
    }
}

/// A next hop that could not be reached: the text, the status when its jobs fail for good,
/// the next hop's name when the last failure came from a host that answered, postern's
/// own status for a deferral no reply explains (a DNS failure's, say), how many
/// addresses the attempt counted as failed (`CoreRelay::broke`), and whether that last
/// failure was a host refusing the session (at its greeting, or in answer to EHLO or HELO),
/// as a host does at its limit of connections per client, rather than TLS failing.
pub(super) type Unopened = (
    String,
    Option<&'static str>,
    Option<String>,
    Option<&'static str>,
    u32,
    bool,
);

/// How the account of a next hop that loops back to this server begins (see `loops_here`).
const LOOPS_BACK: &str = "mail for the domain loops back to this server";

/// Whether `unopened` is a lookup that failed for now ([`unresolved`]: no address tried, no
/// host that answered, and a DNS failure's status to defer with), not a loop back here
/// deferred with the same status.
fn lookup_failed(unopened: &Unopened) -> bool {
    unopened.4 == 0
        && unopened.2.is_none()
        && matches!(unopened.3, Some("4.4.3" | "4.4.4"))
        && !unopened.0.starts_with(LOOPS_BACK)
}

/// A next hop that could not be resolved (no host answered): failed for good with the
/// lookup's status when it is permanent, deferred with it otherwise (4.4.3 a DNS failure,
/// 4.4.4 no primary for a backup MX).
pub(super) fn unresolved(domain: &str, e: &MxError) -> Unopened {
    let text = format!("{domain}: {e}");
    if e.is_permanent() {
        (text, Some(e.enhanced()), None, None, 0, false)
    } else {
        (text, None, None, Some(e.enhanced()), 0, false)
    }
}

/// Whether a message of those answered was taken with an addressing status (see
/// `taken_with_an_addressing_status`): its outcome is known only once a NOOP finds the
/// replies in step.
fn addressed<J>(answered: &[(J, postern_proto::client::TransactionResult)]) -> bool {
    crate::conn::taken_with_an_addressing_status(answered.iter().map(|(_, r)| r))
}

/// How long an address is spoken to in cleartext after its `failures`th failed handshake in
/// a row (ms): the pause of a next hop that failed (`--retry-initial`, at most a minute),
/// doubled with each failure after the first, up to an hour. One handshake cut by a passing
/// fault (a reset, a timeout) costs a minute of cleartext, not an hour; a next hop whose TLS
/// is broken for good costs a failed handshake now and then, not one per connection.
/// (The retry schedule's doubling, over other bounds.)
fn cleartext_window(pause_ms: u64, failures: u32) -> u64 {
    let doubling = RetryPolicy {
        initial: Duration::from_millis(pause_ms),
        max: Duration::from_millis(CLEARTEXT_LONGEST_MS),
        ..RetryPolicy::default()
    };
    doubling.delay(failures)
}

/// A while in words, for the log: "an hour", "8 minutes", "30 seconds", "200 ms".
fn spoken_while(ms: u64) -> String {
    match ms {
        CLEARTEXT_LONGEST_MS => "an hour".to_owned(),
        60_000 => "a minute".to_owned(),
        1000 => "a second".to_owned(),
        ms if ms % 60_000 == 0 => format!("{} minutes", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{} seconds", ms / 1000),
        ms => format!("{ms} ms"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cleartext_after_failed_handshakes_doubles_from_the_pause_up_to_an_hour() {
        use super::{cleartext_window, spoken_while};
        let minute = 60_000;
        let windows: Vec<u64> = (1..=9).map(|n| cleartext_window(minute, n)).collect();
        let minutes = [1, 2, 4, 8, 16, 32, 60, 60, 60].map(|m| m * minute);
        assert_eq!(windows, minutes);
        assert_eq!(cleartext_window(200, 1), 200);
        assert_eq!(cleartext_window(200, 3), 800);
        // No overflow however many failures.
        assert_eq!(cleartext_window(minute, u32::MAX), 3_600_000);
        let said: Vec<String> = [minute, 2 * minute, 3_600_000, 30_000, 1000, 200]
            .into_iter()
            .map(spoken_while)
            .collect();
        let want = [
            "a minute",
            "2 minutes",
            "an hour",
            "30 seconds",
            "a second",
            "200 ms",
        ];
        assert_eq!(said, want);
    }

    #[test]
    fn only_a_fully_qualified_name_not_localhost_is_taken_for_ours_in_a_greeting() {
        for ours in ["mx.example.net", "MX.Example.Net.", "a.b"] {
            assert!(super::distinctive(ours), "{ours}");
        }
        for shared in [
            "localhost",
            "localhost.localdomain",
            "LOCALHOST.",
            "localhost6.localdomain6",
            "3f2a1b9c",
            "",
        ] {
            assert!(!super::distinctive(shared), "{shared}");
        }
    }
}
