//! The owner's side of outcomes: status records in the spool, and the reports postern
//! makes from them (bounces, delay warnings, success reports for recipients relayed to a
//! next hop without DSN), until each message is final and forgotten.

use super::*;
use postern_proto::address::mailbox_to_ascii;

/// How long a failure of some of a message's recipients waits for the outcomes of the others
/// before its report is made (see `report_loop`).
const GATHER_FAILURES: Duration = Duration::from_millis(500);

/// A next attempt (Unix milliseconds) in the whole seconds a status record keeps: rounded up,
/// as an arrival time is (to the end of its second), so that after a restart the attempt
/// comes up to a second late, never early: the last one, planned for the end of the queue
/// lifetime, then expires the message rather than find it a second short and try again.
pub(super) fn attempt_secs(ms: u64) -> u64 {
    ms.div_ceil(1000)
}

impl CoreRelay {
    pub(super) async fn report_loop(self: Rc<Self>) {
        let inbox = self.relay.reports.get(self.id);
        loop {
            self.settle_arrived(inbox).await;
            // Failures of messages with recipients still pending: those recipients' outcomes
            // at other next hops (other domains failing their lookups, say) often come
            // moments later, and then share the report (or the whole message is settled and
            // `finish` makes one report of it all). Each message gathers for its own half
            // second from its first failure, whatever others do meanwhile. A stop ends the
            // wait: its grace is for making these reports.
            while let Some(due) = self.first_failures_due() {
                if self.handle.is_stopping() {
                    break;
                }
                let Some(left) = due.checked_duration_since(Instant::now()) else {
                    break;
                };
                let waited = futures_lite::future::or(inbox.wait(), glommio::timer::sleep(left));
                futures_lite::future::or(waited, self.handle.stopped()).await;
                self.settle_arrived(inbox).await;
            }
            self.report_relayed();
            self.report_failed();
            self.report_delays();
            // Messages still gathering: back to their wait.
            if !self.failed_waiting.borrow().is_empty() && !self.handle.is_stopping() {
                continue;
            }
            // Also while stopping: outcomes of deliveries in flight still come (see
            // `wind_down`).
            inbox.wait().await;
        }
    }

    /// Records the outcomes that have arrived, giving way between them (a next hop's queue
    /// deferred at once comes back as one outcome per job), counted in `settling` meanwhile
    /// for a stop to wait on.
    async fn settle_arrived(self: &Rc<Self>, inbox: &postern_queue::Inbox<Vec<Report>>) {
        let mut turns = GiveWay::new();
        while let Some(batch) = inbox.pop() {
            self.settling.set(self.settling.get() + batch.len());
            for r in batch {
                self.settle(r);
                self.settling.set(self.settling.get() - 1);
                turns.step().await;
            }
        }
    }

    /// When the first message gathering failures is done gathering.
    fn first_failures_due(&self) -> Option<Instant> {
        self.failed_waiting.borrow().first_due(GATHER_FAILURES)
    }

    /// Records one recipient's outcome.
    pub(super) fn settle(self: &Rc<Self>, r: Report) {
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
                next_attempt: attempt_secs(*next_attempt),
                // Kept on each later deferral: the record a restart reads is the latest.
                warned: t.is_warned(r.rcpt),
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
        if let (
            Result_::Deferred {
                status,
                next_attempt,
            },
            Some(after),
        ) = (&r.result, self.relay.config.delay_warning)
        {
            let age = now.saturating_sub(arrival_ms(&t.msg.meta));
            // DELAY notices only when asked for or by default (RFC 3461 4.1), and never to
            // the null sender (RFC 5321 4.5.5; marked, its recipients would be listed as
            // warned); the one warning of a message goes out after this batch, naming every
            // recipient deferred in it that wants one.
            let wants = !t.msg.meta.reverse_path.is_empty()
                && t.msg
                    .meta
                    .recipients
                    .get(r.rcpt as usize)
                    .is_some_and(|rcpt| rcpt.notify.is_none_or(|n| n & Notify::DELAY != 0));
            if wants && age >= after.as_millis() as u64 && t.warn_once(r.rcpt) {
                let status = dsn::deferral_status(&r.reply, status);
                let delay = (
                    r.rcpt,
                    r.reply.clone(),
                    r.remote.clone(),
                    status,
                    attempt_secs(*next_attempt),
                );
                self.delays_waiting
                    .borrow_mut()
                    .push((r.queue_id.clone(), delay));
            }
        }
        if !t.failed.is_empty() && t.pending > 0 {
            // Gathering from its first failure on (one already gathering keeps its start).
            self.failed_waiting
                .borrow_mut()
                .add(&r.queue_id, Instant::now());
        }
        if t.pending == 0 && !t.bouncing {
            if let Some(t) = tracked.remove(&r.queue_id) {
                drop(tracked);
                self.publish_depth();
                let me = self.clone();
                let busy = Reporting::new(self);
                spawn_detached(async move {
                    me.finish_counted(t).await;
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
    pub(super) fn report_relayed(self: &Rc<Self>) {
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
    /// Only messages done gathering (see `report_loop`) are reported, all of them once
    /// stopping.
    pub(super) fn report_failed(self: &Rc<Self>) {
        let all = self.handle.is_stopping();
        let due = self
            .failed_waiting
            .borrow_mut()
            .take_due(Instant::now(), GATHER_FAILURES, all);
        if due.is_empty() {
            return;
        }
        let mut tracked = self.tracked.borrow_mut();
        for queue_id in due {
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

    pub(super) async fn bounce_partial(
        self: Rc<Self>,
        queue_id: String,
        msg: Arc<Msg>,
        mut failed: Vec<Failure>,
    ) {
        // Deleted by the operator since this was asked for: nothing is reported of it.
        if msg.deleted.load(Ordering::Acquire) {
            return;
        }
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
                        self.bounce_put_off(&queue_id);
                        t.failed.splice(0..0, std::mem::take(&mut failed));
                    }
                }
            }
            if !self.bounce_pause().await {
                return;
            }
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
            self.finish_counted(t).await;
        } else if more {
            // Failures that came while this bounce was made: reported now, their gathering
            // done meanwhile.
            let gathered = Instant::now()
                .checked_sub(GATHER_FAILURES)
                .unwrap_or_else(Instant::now);
            self.failed_waiting.borrow_mut().add(&queue_id, gathered);
            self.report_failed();
        }
    }

    /// The delay warnings gathered from the last batch of outcomes: one report per message,
    /// naming its recipients deferred in the batch and not warned before.
    pub(super) fn report_delays(self: &Rc<Self>) {
        let waiting = std::mem::take(&mut *self.delays_waiting.borrow_mut());
        if waiting.is_empty() {
            return;
        }
        // In the order the messages came, through a map: a look through the list for each
        // made a pass over many messages' deferrals (a queue resumed after a long outage)
        // cost the square of their number, with the core held all the while.
        let mut by_message: Vec<(String, Vec<Delay>)> = Vec::new();
        let mut at: HashMap<String, usize> = HashMap::new();
        for (queue_id, delay) in waiting {
            match at.get(&queue_id) {
                Some(&i) => by_message[i].1.push(delay),
                None => {
                    at.insert(queue_id.clone(), by_message.len());
                    by_message.push((queue_id, vec![delay]));
                }
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
    pub(super) async fn report_failures(&self, msg: &Msg, failed: &[Failure]) -> Result<bool, ()> {
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

    /// Says that a bounce could not be spooled and waits: at most once a minute per core, with
    /// how many settled messages wait so (on a full disk every settled message's bounce fails in turn,
    /// each again every [`BOUNCE_RETRY`]: a line each would flood the log).
    fn bounce_put_off(&self, queue_id: &str) {
        if let Some(held_back) = once_a_minute(&self.bounce_wait_logged) {
            tracing::error!(
                queue_id = %queue_id,
                // Messages settled but for their bounce (one whose other recipients are
                // still pending waits as it is, tracked, and is not among them).
                settled_waiting = self.bounces_waiting.borrow().len(),
                more_since_last = held_back,
                "cannot spool a bounce (see the spool error); its message stays queued and each \
                 waiting bounce is tried again every {}s: free space on the spool's disk (or \
                 delete such messages with `postern queue --delete`)",
                BOUNCE_RETRY.as_secs()
            );
        }
    }

    /// Waits [`BOUNCE_RETRY`], or until the operator asks for a flush (room was made), before
    /// a bounce that could not be spooled is tried again; false when the stop comes first.
    /// The stop's grace is not spent on a disk that keeps failing: the failures are not
    /// recorded, so the next run tries those recipients again and makes the bounce then.
    async fn bounce_pause(&self) -> bool {
        let flushed = self.relay.flush_asked.listen();
        futures_lite::future::or(
            futures_lite::future::or(
                async {
                    glommio::timer::sleep(BOUNCE_RETRY).await;
                    true
                },
                async {
                    flushed.await;
                    true
                },
            ),
            async {
                self.handle.stopped().await;
                false
            },
        )
        .await
    }

    /// Puts a message in, or takes it out of, [`CoreRelay::bounces_waiting`], and publishes
    /// the queue's depth.
    pub(super) fn bounce_waits(&self, msg: &Arc<Msg>, waiting: bool) {
        let mut waits = self.bounces_waiting.borrow_mut();
        let recipients = msg.meta.recipients.len() as u64;
        let total = self.bounces_waiting_recipients.get();
        if waiting {
            if waits.insert(msg.queue_id.clone(), msg.clone()).is_none() {
                self.bounces_waiting_recipients.set(total + recipients);
            }
        } else if waits.remove(&msg.queue_id).is_some() {
            self.bounces_waiting_recipients.set(total - recipients);
        }
        drop(waits);
        self.publish_depth();
    }

    /// Every recipient has its outcome: bounce the failed ones, record them, forget the
    /// message once it is all durable.
    /// [`CoreRelay::finish`], the message counted in the queue's depth until it ends.
    async fn finish_counted(self: Rc<Self>, t: Tracked) {
        let recipients = t.msg.meta.recipients.len() as u64;
        let (n, r) = self.finishing.get();
        self.finishing.set((n + 1, r + recipients));
        self.publish_depth();
        self.clone().finish(t).await;
        let (n, r) = self.finishing.get();
        self.finishing
            .set((n.saturating_sub(1), r.saturating_sub(recipients)));
        self.publish_depth();
    }

    pub(super) async fn finish(self: Rc<Self>, mut t: Tracked) {
        let msg = t.msg.clone();
        let msg = &msg;
        if !t.relayed.is_empty() && !msg.meta.reverse_path.is_empty() {
            self.relayed_report(msg, &t.relayed).await;
        }
        // Made once, even if the bounce below has to be tried again.
        t.relayed.clear();
        if !t.failed.is_empty() {
            match self.report_failures(msg, &t.failed).await {
                Ok(unrecorded) => {
                    t.unrecorded |= unrecorded;
                    // Made at a second try: it waits no more.
                    if self.bounces_waiting.borrow().contains_key(&msg.queue_id) {
                        self.bounce_waits(msg, false);
                    }
                    // Deleted while its bounce was being made: the bounce stays made (it was
                    // on its way), as a delivery under way when its message is deleted does.
                    if msg.deleted.load(Ordering::Acquire) {
                        tracing::info!(
                            queue_id = %msg.queue_id,
                            "the bounce was made as the operator deleted the message"
                        );
                    }
                }
                Err(()) => {
                    // Not durable (the spool's disk is full, most likely): the message stays
                    // queued and the bounce is tried again, once other messages have been
                    // settled and their segments reclaimed. After a restart it would be made
                    // again from the spool.
                    let me = self.clone();
                    let busy = Reporting::new(&self);
                    // Not one the operator deleted while this try was under way: it waits no
                    // more (the task below says so and lets it go).
                    if !t.msg.deleted.load(Ordering::Acquire) {
                        me.bounce_waits(&t.msg, true);
                    }
                    self.bounce_put_off(&msg.queue_id);
                    spawn_detached(async move {
                        let again = me.bounce_pause().await;
                        // Deleted by the operator meanwhile: its deletion records and
                        // forgets it, with no report.
                        if t.msg.deleted.load(Ordering::Acquire) {
                            tracing::info!(
                                queue_id = %t.msg.queue_id,
                                "the bounce waiting for room in the spool is not made: the \
                                 message was deleted by the operator"
                            );
                        } else if again {
                            // Still waiting while it is tried again, so that a deletion meanwhile
                            // finds it; `finish` takes it out once its bounce is made, or puts
                            // it back to wait.
                            me.finish(t).await;
                            drop(busy);
                            return;
                        }
                        me.bounce_waits(&t.msg, false);
                        drop(busy);
                    });
                    return;
                }
            }
        }
        let due = if t.unrecorded {
            once_a_minute(&self.unrecorded_logged)
        } else {
            None
        };
        if let Some(held_back) = due {
            // The spool's own error (a full disk, a read-only or failing one) is logged
            // where the write failed; this says what became of the message.
            tracing::warn!(
                queue_id = %msg.queue_id,
                more_since_last = held_back,
                "a delivery status could not be written (see the spool error); the message is \
                 settled anyway, so its space can be reclaimed (a crash before then may deliver \
                 it again)"
            );
        }
        if let Err(e) = self.handle.durable(&msg.queue_id).await {
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
    pub(super) async fn relayed_report(
        &self,
        msg: &Msg,
        relayed: &[(u32, String, Option<String>, u64)],
    ) {
        if msg.deleted.load(Ordering::Acquire) {
            return;
        }
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

    pub(super) async fn delay_warning(&self, msg: &Msg, warn: &[Delay]) {
        if msg.meta.reverse_path.is_empty() || msg.deleted.load(Ordering::Acquire) {
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
            .filter_map(|(i, reply, remote, status, _)| {
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
        if recipients.is_empty() {
            return;
        }
        if self
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
            return;
        }
        // The warning is durable: so that a restart does not warn again, each recipient's
        // deferral is written once more with the mark (the record a restart reads is its
        // latest; a final outcome written meanwhile still wins). A crash before this record
        // is durable warns once more, rather than never.
        let tracked = self.tracked.borrow();
        let Some(t) = tracked.get(&msg.queue_id) else {
            return;
        };
        for (i, reply, _, _, next_attempt) in warn {
            if !t.is_warned(*i) {
                continue;
            }
            let status = Status {
                state: DeliveryState::Deferred {
                    next_attempt: *next_attempt,
                    warned: true,
                },
                reply: reply.clone(),
            };
            // A failure is logged as the spool's error; the cost is a warning made again
            // after a restart.
            let _ = self.handle.append_status(&msg.queue_id, *i, &status);
        }
    }

    /// Builds a DSN about `msg`, spools it durably and queues it like any message.
    pub(super) async fn bounce(
        &self,
        msg: &Msg,
        recipients: &[dsn::ReportRecipient],
        action: dsn::Action,
    ) -> Result<(), ()> {
        let cap = self.relay.config.bounce_max_returned;
        // The returned content needs one contiguous buffer, bounded by the cap.
        let body = msg.body();
        let mut original = Vec::with_capacity((body.len() as usize).min(cap + 1));
        for chunk in body.chunks() {
            let room = (cap + 1).saturating_sub(original.len());
            if room == 0 {
                break;
            }
            original.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        let now = now_ms() / 1000;
        // The sender's address in the report's To field as it goes in an envelope without
        // SMTPUTF8 (its domain in A-labels) where it has such a form, so that only a UTF-8
        // local part makes the report's header section internationalized (RFC 6531 3.2):
        // otherwise a next hop without SMTPUTF8 could not take the report.
        let ascii_to = mailbox_to_ascii(&msg.meta.reverse_path);
        let to = ascii_to.as_deref().unwrap_or(&msg.meta.reverse_path);
        let bytes = dsn::build(&dsn::Report {
            reporting_mta: &self.relay.config.hostname,
            queue_id: &msg.queue_id,
            envid: msg.meta.envid.as_deref(),
            arrival: msg.meta.arrival,
            now,
            to,
            received_from: Some(&msg.meta.helo),
            recipients,
            original: &original,
            // What the sender asked for: the report says why it gets the headers instead
            // (a message over the cap, which `original` is then longer than; BINARYMIME).
            return_full: msg.meta.ret == Some(1),
            // Declared BINARYMIME, but text all the same (what a server upstream sends so
            // when a text body has a long line, a NUL, or no line end at its close): held to
            // what a report can carry as a body that came as text is.
            binary: msg.meta.body_type == 2
                && !prepare::text_but_for_length(|| std::iter::once(original.as_slice())),
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
            // The envelope's own address is UTF-8: the transaction is internationalized,
            // and goes to a next hop without SMTPUTF8 in A-labels where it can.
            smtputf8: !msg.meta.reverse_path.is_ascii(),
        };
        // A failure report lets its message leave the queue: it may take half the spool's
        // reserve, which a delay warning or a success report, like new mail, leaves whole.
        let finishes = action == dsn::Action::Failed;
        match self.handle.inject(&meta, &bytes, finishes).await {
            Ok(accepted) => {
                self.handle.count_outcome(Outcome::Bounced);
                tracing::info!(
                    queue_id = %msg.queue_id,
                    bounce = %accepted.queue_id,
                    to = ?msg.meta.reverse_path,
                    action = action.as_str(),
                    "delivery status notification queued"
                );
                self.accepted(accepted);
                Ok(())
            }
            Err(e) => {
                // Logged by the core as a spool error (once a minute, counted); here only at
                // debug level, as a full disk fails every message's report in turn.
                tracing::debug!(queue_id = %msg.queue_id, "cannot spool a report: {e}");
                Err(())
            }
        }
    }
}

/// Whether a line kept to once a minute is due now: `log` holds when the last was written
/// and how many were held back since. Due: the count held back (cleared); None otherwise.
fn once_a_minute(log: &Cell<(Option<Instant>, u64)>) -> Option<u64> {
    once_a_minute_at(log, Instant::now())
}

/// [`once_a_minute`] at `now`.
fn once_a_minute_at(log: &Cell<(Option<Instant>, u64)>, now: Instant) -> Option<u64> {
    postern_server::log_due_at(log, Duration::from_secs(60), now)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_line_kept_to_once_a_minute_says_how_many_were_held_back() {
        use super::once_a_minute_at;
        use std::cell::Cell;
        use std::time::{Duration, Instant};
        let log = Cell::new((None, 0));
        let start = Instant::now();
        assert_eq!(once_a_minute_at(&log, start), Some(0));
        for s in 0..1000u64 {
            let at = start + Duration::from_millis(59_000 * s / 1000);
            assert_eq!(once_a_minute_at(&log, at), None);
        }
        // A minute after the first line: the next is due, and counts the thousand.
        let later = start + Duration::from_secs(60);
        assert_eq!(once_a_minute_at(&log, later), Some(1000));
        assert_eq!(once_a_minute_at(&log, later + Duration::from_secs(1)), None);
        assert_eq!(
            once_a_minute_at(&log, later + Duration::from_secs(60)),
            Some(1)
        );
    }

    #[test]
    fn a_next_attempt_kept_in_seconds_is_never_earlier() {
        for ms in [0, 1, 999, 1000, 1001, 1_795_346_220_999, 1_795_346_221_000] {
            let kept = super::attempt_secs(ms);
            assert!(
                kept * 1000 >= ms && kept * 1000 < ms + 1000,
                "{ms} kept as {kept}"
            );
        }
    }
}
