//! Long passes on a core (a queue recovered at start, a retry pass, a next hop's outcomes
//! arriving together) taking turns with the core's sessions.

use std::time::Duration;

/// Gives way to the core's sessions during a long pass: a pass calls [`GiveWay::step`] after
/// each item.
///
/// glommio looks for finished I/O (a session's read) only between its turns, 100 ms long (see
/// the runtime), or when no task can run. A task that only yields stays runnable, so the
/// sessions waiting for their reads would wait for the turn's end, round trip after round
/// trip, while the pass lasts. Every [`GiveWay::EVERY`] items the pass sleeps for a moment
/// instead: with nothing left to run, the reads are looked at then.
#[derive(Debug, Default)]
pub struct GiveWay {
    since: u32,
}

impl GiveWay {
    /// Items between two looks for the sessions' reads (of the passes it serves, about a
    /// millisecond's work).
    pub const EVERY: u32 = 256;

    /// The sleep: the shortest timer, ended at the next look for I/O.
    const FOR: Duration = Duration::from_micros(1);

    /// A pass at its start.
    pub fn new() -> GiveWay {
        GiveWay::default()
    }

    /// One item done: gives way every [`GiveWay::EVERY`] items, and when glommio's turn is
    /// over.
    pub async fn step(&mut self) {
        self.since += 1;
        if self.since >= GiveWay::EVERY {
            self.since = 0;
            glommio::timer::sleep(GiveWay::FOR).await;
        } else {
            glommio::yield_if_needed().await;
        }
    }
}
