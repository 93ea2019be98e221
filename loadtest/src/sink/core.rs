//! One executor of the sink: its listener's accept loop, its sessions, its record batch and
//! its counter slot. Stopping is a flag the main thread sets; a watcher task turns it into a
//! wake-up for everything waiting on this executor.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use event_listener::Event;
use postern_proto::ServerConfig;
use socket2::Socket;

use crate::sink::counters::{Counters, Slot};
use crate::sink::faults::Faults;
use crate::sink::record::{Recorder, BATCH};
use crate::sink::{listeners, session};

/// How often the watcher looks at the stop flag and hands over a partial record batch.
const WATCH: Duration = Duration::from_millis(50);
/// How long sessions in the middle of a message may go on after the stop.
const GRACE: Duration = Duration::from_secs(2);

/// What every executor shares.
pub struct Shared {
    /// The protocol settings.
    pub proto: Arc<ServerConfig>,
    /// STARTTLS, when a certificate was given.
    pub tls: Option<futures_rustls::TlsAcceptor>,
    /// Injected faults.
    pub faults: Faults,
    /// Counters of every executor.
    pub counters: Arc<Counters>,
    /// Longest silence of a client.
    pub timeout: Duration,
    /// Set by the main thread to stop.
    pub stop: Arc<AtomicBool>,
    /// End-of-data decisions made on every executor: drives the reply mix, whose shares
    /// are then exact for the sink as a whole, whatever the number of executors.
    pub decisions: AtomicU64,
}

/// One executor's state.
pub struct Core {
    /// What every executor shares.
    pub shared: Arc<Shared>,
    /// This executor's number.
    pub id: usize,
    /// Record lines not yet written.
    pub record: RefCell<Vec<u8>>,
    recorder: Option<Arc<Recorder>>,
    stopping: Cell<bool>,
    stop_event: Event,
    /// Sessions open.
    pub sessions: Cell<usize>,
    /// Messages this executor has accepted, which numbers their queue IDs.
    pub accepted: Cell<u64>,
    /// Notified when a session ends.
    pub session_ended: Event,
}

impl Core {
    /// This executor's counters.
    pub fn slot(&self) -> &Slot {
        &self.shared.counters.slots[self.id]
    }

    /// Whether `--record` is on.
    pub fn recording(&self) -> bool {
        self.recorder.is_some()
    }

    /// Writes the record lines gathered so far (those of the messages whose replies are
    /// about to go out), or only once they fill a batch unless `force`.
    pub fn flush_record(&self, force: bool) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        let mut buf = self.record.borrow_mut();
        if buf.is_empty() || (!force && buf.len() < BATCH) {
            return;
        }
        recorder.write(&buf);
        buf.clear();
    }

    /// Whether the sink is stopping.
    pub fn is_stopping(&self) -> bool {
        self.stopping.get()
    }

    /// Resolves once the sink is stopping.
    pub async fn stopped(&self) {
        // Bounded: each pass either returns or waits for the one notification.
        loop {
            if self.stopping.get() {
                return;
            }
            let listener = self.stop_event.listen();
            if self.stopping.get() {
                return;
            }
            listener.await;
        }
    }
}

/// Runs one executor until the stop flag is set and its sessions are done.
pub async fn run(shared: Arc<Shared>, id: usize, socket: Socket, recorder: Option<Arc<Recorder>>) {
    let listener = listeners::into_glommio(socket);
    let core = Rc::new(Core {
        shared,
        id,
        record: RefCell::new(Vec::with_capacity(BATCH)),
        recorder,
        stopping: Cell::new(false),
        stop_event: Event::new(),
        sessions: Cell::new(0),
        accepted: Cell::new(0),
        session_ended: Event::new(),
    });
    let watcher = glommio::spawn_local(watch(core.clone()));
    // Bounded: ends at the stop.
    loop {
        let accept = async { Some(listener.accept().await) };
        let stop = async {
            core.stopped().await;
            None
        };
        match futures_lite::future::or(accept, stop).await {
            None => break,
            Some(Ok(stream)) => {
                glommio::spawn_local(session::serve(core.clone(), stream)).detach();
            }
            // EMFILE and the like: back off instead of spinning.
            Some(Err(_)) => glommio::timer::sleep(Duration::from_millis(10)).await,
        }
    }
    drop(listener);
    let drained = async {
        while core.sessions.get() > 0 {
            let l = core.session_ended.listen();
            if core.sessions.get() == 0 {
                break;
            }
            l.await;
        }
    };
    futures_lite::future::or(drained, glommio::timer::sleep(GRACE)).await;
    watcher.await;
    core.flush_record(true);
}

async fn watch(core: Rc<Core>) {
    // Bounded: ends at the stop.
    loop {
        glommio::timer::sleep(WATCH).await;
        core.flush_record(true);
        if core.shared.stop.load(Ordering::Relaxed) {
            core.stopping.set(true);
            core.stop_event.notify(usize::MAX);
            return;
        }
    }
}
