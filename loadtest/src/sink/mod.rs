//! `postern-load sink`: a receiving SMTP server that throws mail away as fast as it arrives,
//! one glommio executor and SO_REUSEPORT listener per thread, with counters, an optional
//! record of what it accepted and optional faults. It prints `listening on ADDR` once every
//! listener is up and its counters when it stops (SIGTERM, SIGINT or `--lifetime`).

pub mod core;
pub mod counters;
pub mod faults;
pub mod listeners;
pub mod metrics_http;
pub mod record;
pub mod session;

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postern_proto::ServerConfig;

use crate::cli::SinkArgs;
use crate::error::LoadError;
use crate::executors;
use crate::mix::Mix;
use crate::sink::core::Shared;
use crate::sink::counters::Counters;
use crate::sink::faults::Faults;
use crate::sink::record::Recorder;

/// How often the main thread looks for a signal or the end of `--lifetime`.
const POLL: Duration = Duration::from_millis(50);

/// Runs the sink until it is told to stop, then prints its counters.
pub fn run(args: SinkArgs) -> Result<ExitCode, LoadError> {
    let threads = usize::from(args.threads);
    let cpus = args.cpus.clone().map(|c| c.0).unwrap_or_default();
    let mut codes: Vec<u16> = match &args.reply_mix {
        Some(mix) => mix.0.iter().map(|(c, _)| *c).collect(),
        None => vec![250],
    };
    // A body over `--max-size` is answered 552 whatever the mix.
    codes.push(552);
    codes.sort_unstable();
    codes.dedup();
    let proto = Arc::new(ServerConfig {
        hostname: args.hostname.clone(),
        max_message_size: args.max_size,
        offer_pipelining: !args.no_pipelining,
        offer_chunking: !args.no_chunking,
        // The failures the sink injects are its own, not a client's errors: they never add
        // up to the "too many errors" close, which would change the mix asked for.
        max_errors: u32::MAX,
        ..ServerConfig::default()
    });
    if let Some(metrics) = args.metrics {
        let (m, l) = (metrics.ip(), args.listen.ip());
        let overlap = m == l || m.is_unspecified() || l.is_unspecified();
        if metrics.port() != 0 && metrics.port() == args.listen.port() && overlap {
            return Err(LoadError::flag(
                "--metrics",
                format!("{metrics} is also --listen"),
            ));
        }
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(futures_rustls::TlsAcceptor::from(
            crate::tls::server_config(cert, key)?,
        )),
        _ => None,
    };
    let counters = Arc::new(Counters::new(threads, codes));
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone())
            .map_err(|e| LoadError::Internal(format!("cannot handle signals: {e}")))?;
    }
    let shared = Arc::new(Shared {
        proto,
        tls,
        faults: Faults {
            mix: args.reply_mix.clone().map(|m| Mix::new(m.0)),
            delay: args.delay,
            drop_after: args.drop_after,
        },
        counters: counters.clone(),
        timeout: args.timeout,
        stop: stop.clone(),
        decisions: AtomicU64::new(0),
    });
    let recorder = match &args.record {
        Some(path) => Some(Recorder::start(path)?),
        None => None,
    };

    let (sockets, local) = listeners::bind(args.listen, threads)?;
    let sockets = Arc::new(Mutex::new(
        sockets.into_iter().map(Some).collect::<Vec<_>>(),
    ));
    if let Some(addr) = args.metrics {
        let bound = metrics_http::start(addr, counters.clone())
            .map_err(|e| LoadError::Internal(format!("--metrics: {e}")))?;
        // Ignored when stdout is gone (a harness that read the first line and closed it).
        let _ = writeln!(std::io::stdout(), "metrics on {bound}");
    }
    let for_executors = recorder.clone();
    let handles = executors::spawn("postern-load-sink", threads, &cpus, move |id| {
        let shared = shared.clone();
        let socket = sockets
            .lock()
            .ok()
            .and_then(|mut s| s.get_mut(id).and_then(Option::take));
        let recorder = for_executors.clone();
        async move {
            if let Some(socket) = socket {
                core::run(shared, id, socket, recorder).await;
            }
        }
    });
    let handles = match handles {
        Ok(h) => h,
        Err(e) => {
            stop.store(true, Ordering::Relaxed);
            return Err(e);
        }
    };
    let _ = writeln!(std::io::stdout(), "listening on {local}");
    let _ = std::io::stdout().flush();
    let started = Instant::now();
    // Bounded by a signal or by --lifetime.
    while !stop.load(Ordering::Relaxed) {
        if args.lifetime.is_some_and(|l| started.elapsed() >= l) {
            stop.store(true, Ordering::Relaxed);
            break;
        }
        std::thread::sleep(POLL);
    }
    let mut failed = false;
    for h in handles {
        failed |= h.join().is_err();
    }
    if let (Some(r), Some(path)) = (recorder, &args.record) {
        r.finish(path)?;
    }
    let _ = std::io::stdout().write_all(counters.render().as_bytes());
    let _ = std::io::stdout().flush();
    if failed {
        return Err(LoadError::Internal("an executor failed".into()));
    }
    Ok(ExitCode::SUCCESS)
}
