//! The seam between accepting mail and delivering it. The server knows nothing of queues or
//! next hops: once a message is durable and answered 250, the session hands it to the core's
//! [`Delivery`], which the binary plugs in (postern-relay's, in the real program). The delivery
//! side in turn reaches the core's spool through a [`CoreHandle`], to record outcomes and to
//! spool the messages it makes itself (bounces).

use std::rc::Rc;
use std::sync::Arc;

use postern_spool::{MessageMeta, MessageRef, SpoolError, Status};

use crate::core::Core;

/// A message made durable and acknowledged.
#[derive(Clone)]
pub struct Accepted {
    /// Its queue ID.
    pub queue_id: String,
    /// The envelope and trace facts, as spooled.
    pub meta: MessageMeta,
    /// The body (with the Received header postern added), read from the spool's mapping.
    pub body: MessageRef,
}

/// One core's delivery side, living on that core.
pub trait Delivery {
    /// A message was acknowledged with 250 on this core.
    fn accepted(&self, message: Accepted);
    /// Whether new transactions may start; `Err` says why not (the queue is past one of its
    /// high-water marks, and MAIL is answered `452 4.3.1`).
    fn accepting(&self) -> Result<(), &'static str>;
    /// The server is stopping and its sessions are done: returns once the deliveries in
    /// flight have their outcomes recorded (appended to the spool, which the core then
    /// syncs). The core stops waiting at the end of its shutdown grace.
    fn wind_down(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>> {
        Box::pin(async {})
    }
    /// The operator deleted this message of this core (`postern queue --delete`): it is
    /// delivered no more, and nothing is reported of it. The core records its recipients as
    /// failed and forgets it. Returns how many of its recipients were still to be settled
    /// (None when the delivery side did not have it).
    fn deleted(&self, _queue_id: &str) -> Option<usize> {
        None
    }
    /// Transactions with a next hop under way on every core, their outcomes not yet known.
    fn in_flight(&self) -> usize {
        0
    }
}

/// Makes each core's [`Delivery`]; called once on every core's thread as it starts.
pub type DeliveryFactory = Arc<dyn Fn(CoreHandle) -> Rc<dyn Delivery> + Send + Sync>;

/// What the delivery side may do with its core.
#[derive(Clone)]
pub struct CoreHandle(pub(crate) Rc<Core>);

impl CoreHandle {
    /// The core's number (0-based), which is also its spool's.
    pub fn id(&self) -> usize {
        self.0.id
    }

    /// Our host name.
    pub fn hostname(&self) -> &str {
        &self.0.settings.hostname
    }

    /// Appends recipient `rcpt`'s outcome for `queue_id` to this core's spool; it becomes
    /// durable with the next group commit (await [`CoreHandle::durable`] to know).
    pub fn append_status(
        &self,
        queue_id: &str,
        rcpt: u32,
        status: &Status,
    ) -> Result<(), SpoolError> {
        let appended = self.0.store.append_status(queue_id, rcpt, status);
        if let Err(e) = &appended {
            self.0.spool_error("recording a delivery outcome", e);
        }
        appended
    }

    /// Waits until everything appended so far on this core is settled; an error unless each
    /// status record of message `queue_id` appended in this run is durable.
    pub async fn durable(&self, queue_id: &str) -> Result<(), SpoolError> {
        self.0.store.flush_statuses(queue_id).await
    }

    /// Forgets a message of this core whose recipients all have durable final statuses, and
    /// reclaims the segments freed.
    pub fn mark_final(&self, queue_id: &str) {
        if let Err(e) = self.0.store.mark_final(queue_id) {
            self.0.spool_error("reclaiming segments", &e);
        }
    }

    /// Reclaims segments that hold nothing live (call now and then).
    pub fn reclaim(&self) {
        if let Err(e) = self.0.store.reclaim() {
            self.0.spool_error("reclaiming segments", &e);
        }
    }

    /// The messages of this core to copy forward now: live ones that keep the oldest
    /// segment while the spool behind it has grown (docs/durability.md, "Reclaiming space").
    /// Usually none; at most `most`, oldest first (the next call hands out the rest).
    pub fn next_to_copy(&self, most: usize) -> Vec<String> {
        self.0.store.next_to_copy(most)
    }

    /// Writes each of these live messages (queue ID, envelope and body as spooled) again at
    /// the end of this core's spool, with its outcomes so far, and once the copies are durable
    /// (one group commit for all) lets the segments go that they kept. Returns, in the same
    /// order, the body to read each from now on (the old one's space is freed once nothing
    /// reads it), or None where it was not copied: final here or already being copied, or
    /// past an error, which is logged and counted; such a message stays where it was.
    pub async fn copy_forward(
        &self,
        messages: &[(&str, &MessageMeta, &MessageRef)],
    ) -> Vec<Option<MessageRef>> {
        let core = &self.0;
        let (moved, error) = core
            .store
            .copy_forward(messages, &|| core.stopping.get())
            .await;
        if let Some(e) = error {
            self.0.spool_error("copying waiting messages forward", &e);
        }
        let copied = moved.iter().flatten().count() as u64;
        self.0.metrics.borrow_mut().copied_forward += copied;
        moved
    }

    /// Spools a message made here (a report) and waits until it is durable; one that
    /// `finishes` other mail (a failure report) may take half the spool's reserve.
    pub async fn inject(
        &self,
        meta: &MessageMeta,
        body: &[u8],
        finishes: bool,
    ) -> Result<Accepted, SpoolError> {
        let (queue_id, body) = match self.0.store.inject(meta, body, finishes).await {
            Ok(stored) => stored,
            Err(e) => {
                self.0
                    .spool_error("spooling a delivery status notification", &e);
                return Err(e);
            }
        };
        crate::store::ensure_spare(&self.0);
        Ok(Accepted {
            queue_id,
            meta: meta.clone(),
            body,
        })
    }

    /// Waits until the server is asked to stop.
    pub async fn stopped(&self) {
        self.0.stopped().await;
    }

    /// Whether the server is stopping.
    pub fn is_stopping(&self) -> bool {
        self.0.stopping.get()
    }

    /// Sets the queue-depth gauges of this core: messages, and their recipients.
    pub fn set_queue_depth(&self, depth: u64, recipients: u64) {
        let mut m = self.0.metrics.borrow_mut();
        m.queue_depth = depth;
        m.queue_recipients = recipients;
    }

    /// Sets the gauges of this core's outbound connections and the next hops it keeps.
    pub fn set_outbound(&self, connections: u64, next_hops: u64) {
        let mut m = self.0.metrics.borrow_mut();
        m.outbound_connections = connections;
        m.next_hops = next_hops;
    }

    /// Counts delivery outcomes in this core's metrics.
    pub fn count_outcome(&self, outcome: Outcome) {
        let mut m = self.0.metrics.borrow_mut();
        match outcome {
            Outcome::Delivered => m.delivered += 1,
            Outcome::Deferred => m.deferred += 1,
            Outcome::Failed => m.failed += 1,
            Outcome::Deleted => m.deleted += 1,
            Outcome::Bounced => m.bounces += 1,
        }
    }

    /// Counts a TLS handshake with a next hop, completed (`ok`) or failed.
    pub fn count_outbound_tls(&self, ok: bool) {
        let mut m = self.0.metrics.borrow_mut();
        if ok {
            m.outbound_tls_handshakes += 1;
        } else {
            m.outbound_tls_failures += 1;
        }
    }
}

/// A delivery outcome, for the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A recipient was delivered.
    Delivered,
    /// A recipient's delivery was deferred.
    Deferred,
    /// A recipient failed for good.
    Failed,
    /// A recipient was deleted by the operator before its outcome.
    Deleted,
    /// A bounce was made.
    Bounced,
}
