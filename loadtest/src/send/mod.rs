//! `postern-load send`: many SMTP sessions over one glommio executor per thread, each
//! executor counting on its own and handing the main thread one interval a second (progress,
//! interval log) and its totals at the end (report, JSON, plot).

pub mod connection;
pub mod core;
pub mod filter;
pub mod hdrlog;
pub mod message;
pub mod outbox;
pub mod plan;
pub mod plot;
pub mod progress;
pub mod report;
pub mod stats;

use std::cell::Cell;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use event_listener::Event;

use crate::cli::SendArgs;
use crate::error::LoadError;
use crate::executors;
use crate::mix::Mix;
use crate::send::core::{Core, Run};
use crate::send::message::Bodies;
use crate::send::plan::Plan;
use crate::send::report::{Report, Settings};
use crate::send::stats::Stats;

/// Length of one progress and log interval.
pub const TICK: Duration = Duration::from_secs(1);

/// Messages sent when neither `--messages` nor `--duration` is given.
pub const DEFAULT_MESSAGES: u64 = 1000;

/// What an executor tells the main thread.
enum Note {
    /// Figures of interval `index` (the last one may be shorter than a tick).
    Interval {
        thread: usize,
        index: u64,
        stats: Box<Stats>,
    },
    /// The executor is done; its totals.
    Done { thread: usize, stats: Box<Stats> },
}

/// An error naming the later of two output flags whose paths are one file (by device and
/// inode: another spelling of the path, a link).
fn same_file_twice(
    outputs: &[(&'static str, &Option<std::path::PathBuf>)],
) -> Result<(), LoadError> {
    use std::os::unix::fs::MetadataExt;
    let mut seen: Vec<(&'static str, u64, u64)> = Vec::new();
    for (flag, path) in outputs {
        let Some(path) = path else { continue };
        // Only regular files: two writes to one terminal, pipe or /dev/null overwrite nothing.
        let Some(m) = std::fs::metadata(path)
            .ok()
            .filter(std::fs::Metadata::is_file)
        else {
            continue;
        };
        if let Some((other, ..)) = seen
            .iter()
            .find(|(_, dev, ino)| (*dev, *ino) == (m.dev(), m.ino()))
        {
            return Err(LoadError::flag(
                flag,
                format!(
                    "{} is also the file of {other} (the same file by another name)",
                    path.display()
                ),
            ));
        }
        seen.push((flag, m.dev(), m.ino()));
    }
    Ok(())
}

/// Runs `send` to its end and prints the report.
pub fn run(args: SendArgs) -> Result<ExitCode, LoadError> {
    let addr = crate::target::resolve(&args.target, args.allow_remote)?;
    check_open_files(args.connections)?;
    // Two reports written to one file: the last would overwrite the other.
    let outputs = [
        ("--json", &args.json),
        ("--plot", &args.plot),
        ("--hdr-log", &args.hdr_log),
    ];
    for (i, (flag, path)) in outputs.iter().enumerate() {
        let Some(path) = path else { continue };
        if let Some((other, _)) = outputs[..i]
            .iter()
            .find(|(_, p)| p.as_ref().is_some_and(|p| p == path))
        {
            return Err(LoadError::flag(
                flag,
                format!("{} is also the file of {other}", path.display()),
            ));
        }
    }
    // The report's files are made now, so that a path that cannot be written is found before
    // the run rather than after it, with its figures lost.
    for (flag, path) in [("--json", &args.json), ("--plot", &args.plot)] {
        if let Some(path) = path {
            std::fs::File::create(path).map_err(|e| LoadError::flag_file(flag, path, e))?;
        }
    }
    let messages = match (args.messages, args.duration) {
        (None, None) => Some(DEFAULT_MESSAGES),
        (m, _) => m,
    };
    let max_size = args.size.0.iter().map(|(s, _)| *s).max().unwrap_or(1024);
    let run_id = format!(
        "{}.{}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros()),
        std::process::id()
    );
    let tls = if args.starttls {
        Some(futures_rustls::TlsConnector::from(
            crate::tls::client_config()?,
        ))
    } else {
        None
    };
    // An executor without a connection would only idle: no more than one per connection.
    let threads = usize::from(args.threads).min(args.connections as usize);
    let cpus = args.cpus.clone().map(|c| c.0).unwrap_or_default();
    let settings = Settings {
        target: addr.to_string(),
        connections: args.connections,
        threads: threads as u16,
        messages,
        duration_s: args.duration.map(|d| d.as_secs_f64()),
        sizes: args.size.0.clone(),
        rcpts: args.rcpts,
        pipelining: args.pipelining,
        window: args.window,
        bdat: args.bdat,
        starttls: args.starttls,
        rate: args.rate,
        msgs_per_conn: args.msgs_per_conn,
    };
    let mut hdr_file = match &args.hdr_log {
        Some(path) => Some(
            std::fs::File::create(path).map_err(|e| LoadError::flag_file("--hdr-log", path, e))?,
        ),
        None => None,
    };
    // The same file under two names (`x` and `./x`, a link): compared as files, now that
    // each exists.
    same_file_twice(&outputs)?;
    let run = Arc::new(Run {
        sizes: Mix::new(args.size.0.clone()),
        bodies: Bodies::new(max_size, run_id),
        plan: Plan::new(Instant::now(), messages, args.duration, args.rate),
        addr,
        tls,
        args: args.clone(),
        opened: Default::default(),
        gave_up: Default::default(),
    });
    // SIGINT or SIGTERM ends the run early: no new messages, those in flight finish, and the
    // report is printed. A second one ends the process at once.
    let stop = run.plan.stop_flag();
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 130, stop.clone())
            .and_then(|_| signal_hook::flag::register(signal, stop.clone()))
            .map_err(|e| LoadError::Internal(format!("cannot handle signals: {e}")))?;
    }
    let (tx, rx) = mpsc::channel::<Note>();
    let spawn_run = run.clone();
    let handles = executors::spawn("postern-load-send", threads, &cpus, move |thread| {
        executor_main(spawn_run.clone(), thread, threads, tx.clone())
    })?;
    let mut serializer = hdrhistogram::serialization::V2DeflateSerializer::new();
    let mut log = hdrlog::HdrLog::start(hdr_file.as_mut(), &mut serializer, run.plan.start())
        .map_err(|e| log_error(&args, e))?;
    let mut progress = progress::Progress::new(args.quiet);
    let mut buckets = Buckets::new(threads);
    let mut total = Stats::default();
    // The newest interval, not shown yet.
    let mut held: Option<(u64, Stats)> = None;
    // Bounded: ends when every executor has dropped its sender, which each does once its
    // connections are done (bounded by the plan and the timeouts).
    for note in rx.iter() {
        match note {
            Note::Interval {
                thread,
                index,
                stats,
            } => buckets.add(thread, index, &stats),
            Note::Done { thread, stats } => {
                buckets.finish(thread);
                total.merge(&stats);
            }
        }
        for (index, stats) in buckets.ready() {
            // Shown and logged once the next one is in (it lasted a whole tick) or the run
            // is over (it may have been the run's last, cut short): an executor's last
            // interval comes before its end, so no interval is known to be the last when it
            // comes.
            if let Some((shown, before)) = held.replace((index, stats)) {
                let secs = interval_secs(shown, before.last_reply_us, false);
                log.write(shown, secs, &before)
                    .map_err(|e| log_error(&args, e))?;
                progress.interval(shown, secs, &before);
            }
        }
    }
    if let Some((index, stats)) = held.take() {
        let secs = interval_secs(index, stats.last_reply_us, true);
        log.write(index, secs, &stats)
            .map_err(|e| log_error(&args, e))?;
        progress.interval(index, secs, &stats);
    }
    progress.finish();
    for h in handles {
        h.join()
            .map_err(|e| LoadError::Internal(format!("an executor failed: {e}")))?;
    }
    drop(log);
    let report = Report::new(
        settings,
        &total,
        run.plan.due(),
        run.plan.claimed(),
        run.plan.stopped() && !run.gave_up.load(std::sync::atomic::Ordering::Relaxed),
        run.gave_up.load(std::sync::atomic::Ordering::Relaxed),
    );
    // The files first: a report that cannot be printed (stdout a closed pipe, a full disk)
    // must not cost them, nor end the program in a panic.
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)
            .map_err(|e| LoadError::Internal(e.to_string()))?;
        std::fs::write(path, json + "\n").map_err(|e| LoadError::file(path, e))?;
    }
    if let Some(path) = &args.plot {
        plot::draw(path, &total)?;
    }
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(report.text().as_bytes());
        let _ = out.flush();
    }
    Ok(if total.accepted == 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Descriptors each executor needs beside its connections (rings, eventfds, timers).
const SPARE_FILES: u64 = 64;

/// Raises the soft open-file limit to the hard one, and refuses a `--connections` the limit
/// cannot hold: past it, connects would fail with `EMFILE` and read as the server's errors.
fn check_open_files(connections: u32) -> Result<(), LoadError> {
    let Ok(limit) = postern_server::raise_open_file_limit() else {
        return Ok(());
    };
    match limit.now {
        Some(now) if u64::from(connections) + SPARE_FILES > now => Err(LoadError::flag(
            "--connections",
            format!(
                "{connections} connections need about {} open files, and the limit is {now} \
                 (raise it with ulimit -n)",
                u64::from(connections) + SPARE_FILES
            ),
        )),
        _ => Ok(()),
    }
}

fn log_error(args: &SendArgs, e: std::io::Error) -> LoadError {
    match &args.hdr_log {
        Some(path) => LoadError::file(path, e),
        None => LoadError::Internal(e.to_string()),
    }
}

async fn executor_main(run: Arc<Run>, thread: usize, threads: usize, tx: mpsc::Sender<Note>) {
    let core = Rc::new(Core::new(run.clone()));
    let mine = (0..run.args.connections as usize).filter(|c| c % threads == thread);
    let tasks: Vec<_> = mine
        .map(|_| glommio::spawn_local(connection::run(core.clone())))
        .collect();
    let done = Rc::new((Cell::new(false), Event::new()));
    let ticker = glommio::spawn_local(ticker(core.clone(), thread, tx.clone(), done.clone()));
    let watcher = glommio::spawn_local(watch_stop(core.clone(), done.clone()));
    for t in tasks {
        t.await;
    }
    done.0.set(true);
    done.1.notify(usize::MAX);
    ticker.await;
    watcher.await;
    let stats = Box::new(core.total.borrow().clone());
    let _ = tx.send(Note::Done { thread, stats });
}

/// Looks at the stop flag every [`connection::STOP_POLL`] until the connections are done, so
/// that the time a signal ended the run is noted then (the end of the messages due), also
/// while every connection waits on a server that stalls, for as long as `--timeout`.
async fn watch_stop(core: Rc<Core>, done: Rc<(Cell<bool>, Event)>) {
    // Bounded: ends once the connections are done, which the plan and timeouts bound.
    while !done.0.get() && !core.run.plan.stopped() {
        let listener = done.1.listen();
        if done.0.get() {
            break;
        }
        futures_lite::future::or(glommio::timer::sleep(connection::STOP_POLL), listener).await;
    }
}

/// Hands the main thread this executor's figures once a tick, and a last time when done.
async fn ticker(
    core: Rc<Core>,
    thread: usize,
    tx: mpsc::Sender<Note>,
    done: Rc<(Cell<bool>, Event)>,
) {
    let start = core.run.plan.start();
    // Bounded: ends once the connections are done, which the plan and timeouts bound.
    for index in 0u64.. {
        let listener = done.1.listen();
        if !done.0.get() {
            let next = start + TICK * (index as u32 + 1);
            let wait = next.saturating_duration_since(Instant::now());
            futures_lite::future::or(glommio::timer::sleep(wait), listener).await;
        }
        let stats = Box::new(std::mem::take(&mut *core.interval.borrow_mut()));
        let _ = tx.send(Note::Interval {
            thread,
            index,
            stats,
        });
        if done.0.get() {
            return;
        }
    }
}

/// The length of interval `index` (seconds from the start) for its rates: a whole tick,
/// except the run's last interval (`last`), which ends at its last reply
/// (`last_reply_us`, microseconds from the start). An interval's last reply says nothing of
/// its length otherwise: at 2 messages a second it comes half way through.
fn interval_secs(index: u64, last_reply_us: u64, last: bool) -> f64 {
    let tick = TICK.as_secs_f64();
    if !last {
        return tick;
    }
    ((last_reply_us as f64 / 1e6) - index as f64 * tick).clamp(0.001, tick)
}

/// Interval figures from every executor, merged per interval and released in order once
/// every executor has sent that interval or finished.
struct Buckets {
    last_sent: Vec<Option<u64>>,
    finished: Vec<bool>,
    pending: std::collections::BTreeMap<u64, Stats>,
}

impl Buckets {
    fn new(threads: usize) -> Self {
        Self {
            last_sent: vec![None; threads],
            finished: vec![false; threads],
            pending: Default::default(),
        }
    }

    fn add(&mut self, thread: usize, index: u64, stats: &Stats) {
        self.last_sent[thread] = Some(index);
        self.pending.entry(index).or_default().merge(stats);
    }

    fn finish(&mut self, thread: usize) {
        self.finished[thread] = true;
    }

    fn ready(&mut self) -> Vec<(u64, Stats)> {
        let mut out = Vec::new();
        while let Some((&index, _)) = self.pending.first_key_value() {
            let complete = self
                .last_sent
                .iter()
                .zip(&self.finished)
                .all(|(sent, done)| *done || sent.is_some_and(|s| s >= index));
            if !complete {
                break;
            }
            if let Some(stats) = self.pending.remove(&index) {
                out.push((index, stats));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interval_is_a_whole_tick_unless_it_ends_the_run() {
        // At 2 messages a second the last reply of interval 3 comes at 3.5 s: the interval
        // still lasted a second, and 2 replies in it are 2 a second, not 4.
        assert_eq!(interval_secs(3, 3_500_000, false), 1.0);
        // The run's last interval ends at its last reply.
        assert!((interval_secs(3, 3_500_000, true) - 0.5).abs() < 1e-9);
        assert_eq!(interval_secs(3, 3_000_000, true), 0.001);
        assert_eq!(interval_secs(3, 9_000_000, true), 1.0);
    }
}
