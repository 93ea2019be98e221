//! The live progress line on stderr, once a second, only when stderr is a terminal.

use std::io::{IsTerminal, Write};

use crate::send::stats::{Lat, Stats};

/// The shortest interval shown as a rate, in seconds.
const MIN_SHOWN: f64 = 0.25;

/// Prints progress when it is wanted.
#[derive(Debug)]
pub struct Progress {
    on: bool,
    total: u64,
}

impl Progress {
    /// Progress on stderr unless `quiet` or stderr is not a terminal.
    pub fn new(quiet: bool) -> Self {
        Self {
            on: !quiet && std::io::stderr().is_terminal(),
            total: 0,
        }
    }

    /// One second's figures (`secs` is the interval's length: shorter for the last one).
    pub fn interval(&mut self, index: u64, secs: f64, s: &Stats) {
        self.total += s.accepted;
        // A last interval of a few milliseconds (the run ended just past a tick) would show
        // its few messages as a rate: the report gives the end instead.
        if !self.on || secs < MIN_SHOWN {
            return;
        }
        let p99 = s.latency[Lat::Transaction as usize].value_at_quantile(0.99) as f64 / 1000.0;
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[K{:>6.1}s {:>9.0} msg/s {:>8.2} MB/s  errors {:<6} p99 {:>8.3} ms  accepted {}",
            index as f64 + secs,
            s.accepted as f64 / secs,
            s.bytes_accepted as f64 / 1e6 / secs,
            s.error_count(),
            p99,
            self.total
        );
        let _ = err.flush();
    }

    /// Clears the line before the report.
    pub fn finish(&self) {
        if self.on {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
    }
}
