//! `--hdr-log`: HdrHistogram interval logs (the format HdrHistogram's tools read), one entry
//! per latency kind and second, tagged with the kind's name, values in microseconds.

use std::fs::File;
use std::io;
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::serialization::interval_log::{IntervalLogWriter, IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::V2DeflateSerializer;

use crate::send::stats::{Lat, Stats};
use crate::send::TICK;

/// An interval log, or nothing when none was asked for.
pub struct HdrLog<'a> {
    writer: Option<IntervalLogWriter<'a, 'a, File, V2DeflateSerializer>>,
}

impl<'a> HdrLog<'a> {
    /// Starts the log in `file` (none: a log that writes nothing); `start` is the run's.
    pub fn start(
        file: Option<&'a mut File>,
        serializer: &'a mut V2DeflateSerializer,
        start: Instant,
    ) -> io::Result<Self> {
        let Some(file) = file else {
            return Ok(Self { writer: None });
        };
        let base = SystemTime::now() - start.elapsed();
        let writer = IntervalLogWriterBuilder::new()
            .add_comment("postern-load send latency, microseconds")
            .with_start_time(base)
            .with_base_time(base)
            .with_max_value_divisor(1000.0)
            .begin_log_with(file, serializer)?;
        Ok(Self {
            writer: Some(writer),
        })
    }

    /// Writes interval `index`, `secs` long (a tick, or less for the run's last).
    pub fn write(&mut self, index: u64, secs: f64, stats: &Stats) -> io::Result<()> {
        let Some(w) = self.writer.as_mut() else {
            return Ok(());
        };
        let start = TICK * index as u32;
        let length = Duration::from_secs_f64(secs);
        for kind in Lat::ALL {
            let h = &stats.latency[kind as usize];
            w.write_histogram(h, start, length, Tag::new(kind.name()))
                .map_err(|e| io::Error::other(format!("{e:?}")))?;
        }
        Ok(())
    }
}
