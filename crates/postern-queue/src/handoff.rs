//! Cross-core handoff: one lock-free inbox per core. Any core pushes; only the owner pops.
//! The wake-up is lock-free too: the owner leaves its waker in an `AtomicWaker`, and a push
//! takes it (one atomic swap; nothing to do when the owner is busy and has left none).

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;

use atomic_waker::AtomicWaker;
use crossbeam::queue::SegQueue;

/// One core's inbox.
#[derive(Debug)]
pub struct Inbox<T> {
    queue: SegQueue<T>,
    waker: AtomicWaker,
}

impl<T> Default for Inbox<T> {
    fn default() -> Self {
        Self {
            queue: SegQueue::new(),
            waker: AtomicWaker::new(),
        }
    }
}

impl<T> Inbox<T> {
    /// Adds an item and wakes the owner if it waits.
    pub fn push(&self, item: T) {
        self.queue.push(item);
        self.waker.wake();
    }

    /// Takes the oldest item, if any.
    pub fn pop(&self) -> Option<T> {
        self.queue.pop()
    }

    /// Items waiting (a snapshot: others may push meanwhile).
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Resolves once the inbox holds something. Only the owner (one task) may wait: the
    /// inbox keeps one waker. A push that races the wait is never missed: the waker is
    /// registered before the inbox is looked at again.
    pub fn wait(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if !self.queue.is_empty() {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            if self.queue.is_empty() {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
    }
}

/// The inboxes of every core, shared by all of them.
#[derive(Debug)]
pub struct Mailboxes<T> {
    inboxes: Arc<[Inbox<T>]>,
}

impl<T> Clone for Mailboxes<T> {
    fn clone(&self) -> Self {
        Self {
            inboxes: self.inboxes.clone(),
        }
    }
}

impl<T> Mailboxes<T> {
    /// Inboxes for `cores` cores (at least one).
    pub fn new(cores: usize) -> Self {
        Self {
            inboxes: (0..cores.max(1)).map(|_| Inbox::default()).collect(),
        }
    }

    /// The number of inboxes.
    pub fn len(&self) -> usize {
        self.inboxes.len()
    }

    /// Always false: there is at least one inbox.
    pub fn is_empty(&self) -> bool {
        self.inboxes.is_empty()
    }

    /// Core `core`'s inbox (modulo the number of cores).
    pub fn get(&self, core: usize) -> &Inbox<T> {
        &self.inboxes[core % self.inboxes.len()]
    }

    /// Sends `item` to core `core`.
    pub fn send(&self, core: usize, item: T) {
        self.get(core).push(item);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::Mailboxes;

    #[test]
    fn items_from_many_threads_all_arrive_in_per_sender_order() {
        let boxes: Mailboxes<(usize, usize)> = Mailboxes::new(2);
        let senders: Vec<_> = (0..4)
            .map(|t| {
                let boxes = boxes.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000 {
                        boxes.send(1, (t, i));
                    }
                })
            })
            .collect();
        for s in senders {
            s.join().unwrap();
        }
        let mut next = [0usize; 4];
        while let Some((t, i)) = boxes.get(1).pop() {
            assert_eq!(i, next[t]);
            next[t] += 1;
        }
        assert_eq!(next, [10_000; 4]);
        assert!(boxes.get(0).is_empty());
    }

    #[test]
    fn a_push_from_another_thread_wakes_the_waiting_owner() {
        let boxes: Mailboxes<u32> = Mailboxes::new(1);
        for round in 0..200 {
            // The owner waits on its own thread; a lost wake-up shows as a timeout here.
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            let owner = boxes.clone();
            let waiter = std::thread::spawn(move || {
                futures_lite::future::block_on(owner.get(0).wait());
                let _ = done_tx.send(owner.get(0).pop());
            });
            boxes.send(0, round);
            let got = done_rx
                .recv_timeout(std::time::Duration::from_secs(10))
                .expect("the push did not wake the owner");
            waiter.join().unwrap();
            assert_eq!(got, Some(round));
            assert!(boxes.get(0).is_empty());
        }
    }
}
