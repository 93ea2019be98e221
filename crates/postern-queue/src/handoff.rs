//! Cross-core handoff: one lock-free inbox per core. Any core pushes; only the owner pops.

use std::sync::Arc;

use crossbeam::queue::SegQueue;
use event_listener::{Event, EventListener};

/// One core's inbox.
#[derive(Debug)]
pub struct Inbox<T> {
    queue: SegQueue<T>,
    ready: Event,
}

impl<T> Default for Inbox<T> {
    fn default() -> Self {
        Self {
            queue: SegQueue::new(),
            ready: Event::new(),
        }
    }
}

impl<T> Inbox<T> {
    /// Adds an item and wakes the owner if it waits.
    pub fn push(&self, item: T) {
        self.queue.push(item);
        self.ready.notify(1);
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

    /// A listener to await before looking again. Take it *before* draining the inbox, so a
    /// push between the last `pop` and the wait is not missed.
    pub fn listen(&self) -> EventListener {
        self.ready.listen()
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
    use event_listener::Listener;

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
    fn a_push_wakes_a_listener_taken_before() {
        let boxes: Mailboxes<u32> = Mailboxes::new(1);
        let listener = boxes.get(0).listen();
        let b = boxes.clone();
        let t = std::thread::spawn(move || b.send(0, 7));
        listener.wait();
        t.join().unwrap();
        assert_eq!(boxes.get(0).pop(), Some(7));
    }
}
