//! Places for outbound connections: each core holds at most its share of
//! `--max-outbound-connections`, and these decide which next hop gets a place that frees up
//! (one waiting with none first, then one whose connections have a backlog) and when a
//! connection gives its place up.

use super::*;

/// How long past `--retry-max` after its last failure a next hop that failed is kept (see
/// `forget_quiet_next_hops`).
const KEPT_PAST_RETRY_MAX: u64 = 60_000;

/// Next hops `forget_quiet_next_hops` looks at in one turn (a turn a second).
const FORGET_SLICE: usize = 4096;

impl CoreRelay {
    /// This core's share of `--max-outbound-connections`.
    pub(super) fn most_outbound(&self) -> usize {
        (self.relay.config.max_outbound / self.relay.cores.max(1)).max(1)
    }

    /// Starts a connection to `dq`'s next hop, unless the core has its share of outbound
    /// connections: then a next hop without any connection waits in line for the first to
    /// end (one that has connections goes on with those), and this returns false.
    pub(super) fn start_worker(self: &Rc<Self>, dq: &Rc<DestQueue>) -> bool {
        if self.handle.is_stopping() {
            return false;
        }
        if self.outbound.get() >= self.most_outbound() {
            if dq.workers.get() == 0 {
                if !dq.starved.replace(true) {
                    self.starved.borrow_mut().push_back(dq.clone());
                    // One idle connection of another next hop ends for it.
                    self.slot_wanted.notify(1.additional());
                } else {
                    // Already in line (maybe from mail deleted since, which woke a
                    // connection that then found nobody wanting): one is woken again, unless
                    // a wake-up is still pending.
                    self.slot_wanted.notify(1);
                }
            } else if self.backlog(dq) {
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
        // Opening from now, not from when the task first runs: jobs queued in the same go
        // count on it (the worker takes this count over).
        std::mem::forget(super::worker::Opening::new(dq));
        spawn_detached(self.clone().worker(dq.clone()));
        true
    }

    /// A worker of `dq` leaves (counted out before its QUIT, so that decisions meanwhile see
    /// it gone): its place goes to the first next hop waiting in line, and when its own next
    /// hop still has jobs that no connection will take, that one asks for a connection again
    /// (at the back of the line when the core is at its share).
    pub(super) fn leave(self: &Rc<Self>, dq: &Rc<DestQueue>) {
        dq.workers.set(dq.workers.get() - 1);
        self.outbound.set(self.outbound.get() - 1);
        if self.handle.is_stopping() {
            // No new connection once the server stops.
            return;
        }
        // A job this worker was woken for, and leaves behind, goes to an idle connection.
        dq.wake_for_waiting();
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
        if self.connections_wanted(dq, 0) > 0 && dq.workers.get() < self.most_workers(dq) {
            given |= self.start_worker(dq);
        }
        while !given {
            let Some(next) = self.wanting_more.borrow_mut().pop_front() else {
                break;
            };
            next.wanting_more.set(false);
            if self.connections_wanted(&next, 0) > 0
                && next.workers.get() < self.most_workers(&next)
            {
                given = self.start_worker(&next);
                if !given {
                    break;
                }
                // Still more jobs than connections: first in line for the next place, and
                // the next idle connection is asked for it.
                if self.backlog(&next)
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
    pub(super) fn someone_starved(&self) -> bool {
        self.starved
            .borrow()
            .iter()
            .any(|d| d.workers.get() == 0 && !d.ready.borrow().is_empty())
    }

    /// Whether a next hop waits for a place: in line, or with jobs its connections do not
    /// take (an idle connection of another next hop gives its place to either; a busy one
    /// only to a next hop in line, or two busy next hops would trade places after every
    /// transaction).
    pub(super) fn someone_waiting(&self) -> bool {
        self.someone_starved() || self.someone_wanting_more()
    }

    /// Whether a next hop's connections have more jobs than they take, at the core's share.
    pub(super) fn someone_wanting_more(&self) -> bool {
        self.wanting_more
            .borrow()
            .iter()
            .any(|d| self.wants_more(d))
    }

    /// Whether `dq` has more jobs waiting than connections, and room for another.
    pub(super) fn wants_more(&self, dq: &DestQueue) -> bool {
        self.backlog(dq) && dq.workers.get() < self.most_workers(dq)
    }

    /// Whether `dq` has more jobs waiting than its connections take at once.
    fn backlog(&self, dq: &DestQueue) -> bool {
        self.batches_waiting(dq, dq.workers.get() + 1) > dq.workers.get()
    }

    /// How many waiting jobs one connection of `dq` takes at once: up to
    /// `--max-transactions-in-flight` where the next hop pipelines (assumed until a
    /// connection finds it does not) and nothing holds it to one transaction per round trip,
    /// one otherwise.
    pub(super) fn jobs_per_connection(&self, dq: &DestQueue) -> usize {
        let now = mono_ms();
        if !dq.pipelines.get() || now < dq.serial_until.get() || now < dq.lockstep_until.get() {
            1
        } else {
            self.relay.config.max_in_flight.max(1)
        }
    }

    /// How many more connections `dq`'s waiting jobs call for: those its idle connections,
    /// its connections still opening and the caller (`taking` jobs itself) will not take,
    /// each new one taking [`CoreRelay::jobs_per_connection`]. With one transaction in flight
    /// that is a connection for each job nobody takes; with more, a burst for one next hop
    /// opens a connection per batch, not one per message that then finds nothing to send.
    pub(super) fn connections_wanted(&self, dq: &DestQueue, taking: usize) -> usize {
        let per = self.jobs_per_connection(dq);
        let have = dq.idle.get() + dq.opening.get();
        if per == 1 {
            return dq.ready.borrow().len().saturating_sub(have + taking);
        }
        // The caller's batch first, then one for each connection: as many batches as could
        // use a connection that may still be opened are enough to know.
        let most = self.most_workers(dq).saturating_sub(dq.workers.get());
        let caller = usize::from(taking > 0);
        self.batches_waiting(dq, caller + have + most + 1)
            .saturating_sub(caller + have)
    }

    /// How many connections would take `dq`'s waiting jobs at once, batched as a connection
    /// batches them (up to [`CoreRelay::jobs_per_connection`] each, a job for many recipients
    /// on its own, the replies awaited bounded): counted up to `enough`, and over the first
    /// few thousand jobs (the rest taken as full batches).
    fn batches_waiting(&self, dq: &DestQueue, enough: usize) -> usize {
        /// Jobs looked at, at most.
        const LOOKED_AT: usize = 4096;
        let per = self.jobs_per_connection(dq);
        let ready = dq.ready.borrow();
        if per == 1 {
            return ready.len();
        }
        let mut batches = 0;
        // In the batch being made: its jobs and the replies they await (0 for a job for many
        // recipients, which goes alone: nothing joins it).
        let (mut jobs, mut replies) = (0, 0);
        for job in ready.iter().take(LOOKED_AT) {
            if jobs > 0 && jobs < per && replies > 0 && super::worker::joins_batch(job, replies) {
                jobs += 1;
                replies += super::worker::replies_awaited(job);
                continue;
            }
            batches += 1;
            if batches >= enough {
                return batches;
            }
            jobs = 1;
            replies = if super::worker::one_group(job) {
                super::worker::replies_awaited(job)
            } else {
                0
            };
        }
        // Past those, batches of one-recipient jobs (as many as the awaited replies allow).
        let full = per.clamp(1, MAX_PIPELINED_REPLIES / 4);
        batches + ready.len().saturating_sub(LOOKED_AT).div_ceil(full)
    }

    /// Takes the next hops that no longer want more out of `wanting_more` (their backlog
    /// went), so that the list and the next hops it keeps do not grow while the core stays
    /// at its share and every place goes to `starved`.
    pub(super) fn prune_wanting_more(&self) {
        self.wanting_more.borrow_mut().retain(|d| {
            let keep = self.wants_more(d);
            d.wanting_more.set(keep);
            keep
        });
    }

    /// Ends a connection whose worker has left (see [`CoreRelay::leave`]): with QUIT and a
    /// short wait for its reply, or, while as many others as the core's share are still in
    /// that wait, without waiting, so that sockets past the cap stay bounded.
    pub(super) async fn quit_after_leaving(&self, conn: Outbound) {
        if self.quitting.get() >= self.most_outbound() {
            conn.quit_now().await;
            return;
        }
        self.quitting.set(self.quitting.get() + 1);
        self.say_quit(conn).await;
        self.quitting.set(self.quitting.get() - 1);
    }

    /// Ends `conn` with QUIT (its reply read, within a few seconds), counted meanwhile so that
    /// a stop lets it finish.
    pub(super) async fn say_quit(&self, conn: Outbound) {
        /// Counts the connection out when its QUIT ends, or when the wait for its reply is
        /// given up (the future dropped, the connection closed with it).
        struct Closing<'a>(&'a Cell<usize>);
        impl Drop for Closing<'_> {
            fn drop(&mut self) {
                self.0.set(self.0.get() - 1);
            }
        }
        self.closing.set(self.closing.get() + 1);
        let _closing = Closing(&self.closing);
        conn.quit().await;
    }

    /// Whether a connection of `dq`, open since `since`, should give its place up after its
    /// transaction: a next hop waits in line for one, and this next hop keeps another, or
    /// this one has had its turn ([`TURN`]; then its next hop goes to the back of the line).
    pub(super) fn yields_place(&self, dq: &DestQueue, since: Instant) -> bool {
        (dq.workers.get() > 1 || since.elapsed() >= TURN) && self.someone_starved()
    }

    /// How many connections a next hop may have now. While the last connections to it failed
    /// (none has answered a transaction since), one at a time tries it, and one more for each
    /// that opened since: when a pause ends, the jobs it held come all at once, and a next hop
    /// still down costs one connection, not one per job.
    pub(super) fn most_workers(&self, dq: &DestQueue) -> usize {
        let all = self.relay.config.max_per_destination.max(1);
        let most = if dq.broken_in_a_row.get() > 0 {
            all.min(1 + dq.opened_since_broke.get() as usize)
        } else {
            all
        };
        // A connection limit the next hop showed (see `DestQueue::cap`), and a hold after a
        // lookup failed (`DestQueue::lookup_cap`).
        let now = mono_ms();
        let mut most = most;
        if dq.cap_until.get() > now {
            most = most.min(dq.cap.get().max(1));
        }
        if dq.lookup_cap_until.get() > now {
            most = most.min(dq.lookup_cap.get().max(1));
        }
        most
    }

    /// Forgets the next hops with nothing going on: no connection, no job waiting, and no
    /// pause, passed-over or failed address, or other window still running. Mail for one
    /// later starts it afresh. Without this, every next hop ever mailed would be kept for
    /// the life of the process. Called once a second, it looks at `FORGET_SLICE` next hops
    /// a turn, going on from where the last turn stopped: a core with mail for a hundred
    /// thousand next hops (failing ones are kept a while) spent about 8 ms a second here
    /// when each turn looked at them all; a quiet one is forgotten within a round instead.
    pub(super) fn forget_quiet_next_hops(&self) {
        let now = mono_ms();
        let retry_max = u64::try_from(self.relay.config.retry.max.as_millis()).unwrap_or(u64::MAX);
        let mut dests = self.dests.borrow_mut();
        let keep = |dq: &DestQueue| {
            dq.workers.get() > 0
                || dq.starved.get()
                || dq.wanting_more.get()
                || !dq.ready.borrow().is_empty()
                || dq.down_until.get() > now
                || dq.serial_until.get() > now
                || dq.lockstep_until.get() > now
                // (Its failures in a row are kept as long as the count is: see `open`.)
                || dq
                    .cleartext
                    .borrow()
                    .values()
                    .any(|&(until, _)| until.saturating_add(CLEARTEXT_LONGEST_MS) > now)
                || dq.cap_until.get() > now
                || dq.lookup_cap_until.get() > now
                || dq.avoid.borrow().values().any(|&until| until > now)
                || dq.broke.borrow().values().any(|&until| until > now)
                // Failed lately: its deferred jobs come back within the longest retry delay
                // (counted from when they were deferred, a moment after the failure, and
                // taken when the core gets to them: a minute's margin), and then still get
                // one connection at a time, not a fresh next hop's many.
                || (dq.broken_in_a_row.get() > 0
                    && now < dq.last_broke.get().saturating_add(retry_max).saturating_add(KEPT_PAST_RETRY_MAX))
        };
        let at = sweep(&mut dests, self.forget_at.get(), FORGET_SLICE, |dq| {
            let mut ready = dq.ready.borrow_mut();
            if sparse(ready.len(), ready.capacity()) {
                let left = ready.len();
                ready.shrink_to(left * 2);
            }
            drop(ready);
            keep(dq)
        });
        self.forget_at.set(at);
        if sparse(dests.len(), dests.capacity()) {
            let left = dests.len();
            dests.shrink_to(left * 2);
        }
    }
}

/// Looks at up to `most` entries of `map` from `at` on, in order, and drops those `keep`
/// refuses (the last entry takes a dropped one's place, and is looked at next). Returns where
/// the next turn goes on: 0 once the end is reached, so that turn after turn every entry is
/// looked at once a round.
fn sweep<K, V>(
    map: &mut IndexMap<K, V>,
    mut at: usize,
    most: usize,
    mut keep: impl FnMut(&V) -> bool,
) -> usize {
    for _ in 0..most {
        let Some((_, v)) = map.get_index(at) else {
            break;
        };
        if keep(v) {
            at += 1;
        } else {
            map.swap_remove_index(at);
        }
    }
    if at >= map.len() {
        0
    } else {
        at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_looks_at_a_slice_a_turn_and_at_each_entry_once_a_round() {
        let mut map: IndexMap<u32, u32> = (0..10_000).map(|i| (i, i)).collect();
        let mut seen = vec![0u32; 10_000];
        let mut at = 0;
        let mut turns = 0;
        // A round: until the sweep comes back to the start. Odd entries go.
        loop {
            at = sweep(&mut map, at, 4096, |&v| {
                seen[v as usize] += 1;
                v % 2 == 0
            });
            turns += 1;
            if at == 0 {
                break;
            }
            assert!(turns < 10, "the round never ends");
        }
        // 10,000 looked at 4,096 a turn: three turns.
        assert_eq!(turns, 3);
        assert!(seen.iter().all(|&n| n == 1), "each looked at once");
        assert_eq!(map.len(), 5_000);
        assert!(map.values().all(|v| v % 2 == 0));
        // A turn with nothing to drop looks at no more than its slice.
        let mut looked = 0;
        assert_eq!(
            sweep(&mut map, 0, 4096, |_| {
                looked += 1;
                true
            }),
            4096
        );
        assert_eq!(looked, 4096);
        // An empty map, or a place past its end, starts again at 0.
        assert_eq!(sweep(&mut map, 9_999, 4096, |_| true), 0);
        assert_eq!(
            sweep(&mut IndexMap::<u32, u32>::new(), 0, 4096, |_| true),
            0
        );
    }
}
