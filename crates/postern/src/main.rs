//! The `postern` binary: flags (each also read from `POSTERN_<NAME>`), start-up checks,
//! signals, and the server on its embedded defaults.
#![forbid(unsafe_code)]

mod cli;

use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let settings = match cli::parse() {
        Ok(Some(settings)) => settings,
        Ok(None) => return ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("postern: {message}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cores = settings.cores;
    let running = match postern_server::start(settings) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("postern: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    for addr in &running.listen {
        println!("postern: smtp listening on {addr}");
    }
    for addr in &running.listen_tls {
        println!("postern: smtps listening on {addr}");
    }
    if let Some(addr) = running.metrics {
        println!("postern: metrics listening on {addr}");
    }
    println!("postern: ready with {cores} cores");
    let stop = running.stop_flag();
    match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ]) {
        Ok(mut signals) => {
            std::thread::spawn(move || {
                if signals.forever().next().is_some() {
                    tracing::info!(
                        "stopping: no new connections, finishing transactions in flight"
                    );
                    stop.stop();
                }
            });
        }
        Err(e) => tracing::warn!("cannot handle signals: {e}"),
    }
    running.wait();
    println!("postern: stopped");
    ExitCode::SUCCESS
}
