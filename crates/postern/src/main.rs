//! The `postern` binary: flags (each also read from `POSTERN_<NAME>`), start-up checks,
//! signals, and the server on its embedded defaults.

// The macros come before the modules, which use them too.

/// A line on stdout. A closed stdout (a pipe whose reader has gone) must not stop the server
/// or make it panic, so a failed write is ignored.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// A line on stderr, with the same care as [`say!`].
macro_rules! complain {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod cli;
mod memory;
mod probe;
mod queue;
mod ready;
mod ring;
mod terminal;

use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Bytes of log lines gathered into one write by the log thread.
const LOG_BUFFER: usize = 64 * 1024;

/// The log filter without `RUST_LOG`: `info`, but only errors from rustls, whose warnings
/// (an IP address as SNI, a stray ChangeCipherSpec, a refused renegotiation) any client can
/// cause, one line each, as often as it likes. Handshake failures are counted in the metrics.
/// Nor glommio's ring set-up warnings: their only one says that registering its I/O buffers
/// failed (over RLIMIT_MEMLOCK without CAP_IPC_LOCK), buffers postern never uses.
const DEFAULT_LOG_FILTER: &str = "info,rustls=error,glommio::sys::uring=error";

/// The log filter: `RUST_LOG`, or [`DEFAULT_LOG_FILTER`] when it is unset or blank (an empty
/// value from an environment file must not silence the log). A word that is neither a level
/// nor `TARGET=LEVEL` would turn off every line but a target's nobody has (`warning` is not
/// a level, `warn` is): refused, like a wrong flag. A value without a bare level adds to the
/// default instead of replacing it.
fn log_filter() -> Result<tracing_subscriber::EnvFilter, String> {
    let value = std::env::var("RUST_LOG").unwrap_or_default();
    if value.trim().is_empty() {
        return Ok(tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    }
    // Blanks around each part are dropped here: the filter's parser would keep them in a
    // target's name (`info, postern=debug` would name a target " postern").
    let directives: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    for directive in &directives {
        let bare = !directive.contains(['=', '[']);
        if bare
            && directive
                .parse::<tracing::level_filters::LevelFilter>()
                .is_err()
        {
            return Err(format!(
                "RUST_LOG: '{directive}' is not a level (error, warn, info, debug, trace, off) \
                 nor TARGET=LEVEL"
            ));
        }
    }
    // Directives for some targets only (`postern_relay=debug`) would leave every other
    // target off, its errors and warnings too, and a misspelt target would silence the whole
    // log: without a level of its own, the value goes on top of the default, whose parts for
    // a target the value names are left out.
    let mut parts: Vec<&str> = Vec::new();
    let has_level = directives.iter().any(|d| !d.contains(['=', '[']));
    if !has_level {
        let named = |target: &str| {
            directives
                .iter()
                .any(|d| d.split(['=', '[']).next() == Some(target))
        };
        parts.extend(
            DEFAULT_LOG_FILTER
                .split(',')
                .filter(|d| match d.split_once('=') {
                    Some((target, _)) => !named(target),
                    None => true,
                }),
        );
    }
    parts.extend(directives);
    let filter = parts.join(",");
    tracing_subscriber::EnvFilter::builder()
        .parse(&filter)
        // The operator's own value is quoted, not the default it was put on top of.
        .map_err(|e| format!("RUST_LOG: '{}': {e}", value.trim()))
}

/// Messages moved to other cores at start-up that get a log line each (old and new queue ID).
const MOVED_LOGGED: usize = 20;

fn main() -> ExitCode {
    set_panic_hook();
    no_huge_pages();
    // `serve` takes the stop signals over first thing, before the flags are even read, so that
    // a SIGTERM during start-up stops it gracefully once it runs; only the moments between
    // exec and here (before it has touched anything) are left to the default action. Other
    // commands keep the defaults.
    let signals = (std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new("serve")))
        .then(|| Signals::new(HANDLED_SIGNALS));
    let config = match cli::parse() {
        Ok(Some(cli::Job::Serve(config))) => *config,
        Ok(Some(cli::Job::Queue(q))) => return queue::run(&q),
        Ok(Some(cli::Job::Ready(r))) => return ready::run(&r),
        Ok(None) => return ExitCode::SUCCESS,
        Err(message) => {
            complain!("postern: {message}");
            return ExitCode::from(2);
        }
    };
    let log_filter = match log_filter() {
        Ok(filter) => filter,
        Err(message) => {
            complain!("postern: {message}");
            return ExitCode::from(2);
        }
    };
    // From here on this thread, and every thread it makes (the log's writer, the cores),
    // leaves those signals to the signal thread, which takes them back for itself.
    block_handled_signals();
    // Log lines are handed to a writer thread (a lock-free channel), so a core never makes a
    // write(2) per delivery; lines beyond the channel's capacity are dropped, not waited for.
    // The writer thread takes every line waiting in the channel, then flushes: through a
    // buffer, a burst of lines is one write(2), and a lone line still goes out at once.
    let Some((writer, _log_guard)) = log_writer() else {
        return ExitCode::FAILURE;
    };
    // Colours only on a terminal: a log file or journal gets plain text to grep.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_writer(move || OneLine(writer.clone()))
        .with_ansi(colour)
        .with_env_filter(log_filter)
        .init();
    tracing::info!("postern {} starting", env!("CARGO_PKG_VERSION"));
    for var in cli::unknown_variables() {
        tracing::warn!("{var} names no setting and is ignored (a misspelt name?)");
    }
    if !config.server.hostname.contains('.') && !config.server.hostname.starts_with('[') {
        // Taken (a test network may name its hosts so), but RFC 5321 2.3.5 and 4.1.1.1 want
        // a fully qualified name in the banner and EHLO, and many next hops refuse others.
        // (An address literal is no name: `[IPv6:2001:db8::25]` has no dot either.)
        tracing::warn!(
            hostname = %config.server.hostname,
            "the host name has a single label, not a fully qualified domain name: next hops \
             may refuse its EHLO (RFC 5321 2.3.5); give one with --hostname"
        );
    }
    // Past RLIMIT_FSIZE a write raises SIGXFSZ, which ends the process by default; with a
    // handler the write fails with EFBIG instead, which the spool answers as a full disk
    // (452 4.3.1) and logs.
    let fsize_exceeded = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Err(e) = signal_hook::flag::register(signal_hook::consts::SIGXFSZ, fsize_exceeded) {
        tracing::warn!("cannot handle SIGXFSZ: {e}");
    }
    let signals = signals.unwrap_or_else(|| Signals::new(HANDLED_SIGNALS));
    let stop = std::sync::Arc::new(postern_server::StopFlag::default());
    let launch = std::sync::Arc::new(std::sync::Mutex::new(Launch::default()));
    match signals {
        Ok(signals) => {
            let spawned = spawn_signal_thread(
                signals,
                stop.clone(),
                launch.clone(),
                config.server.spool_dir.clone(),
                config.server.cores,
                config.server.drain_time,
            );
            // Every thread blocks the stop signals: without this one, none would be heard.
            if let Err(e) = spawned {
                tracing::error!("cannot start: no thread for the signals ({e})");
                return ExitCode::FAILURE;
            }
        }
        Err(e) => {
            tracing::warn!("cannot handle signals: {e}");
            // Their default actions, then, in the threads made from here on (the cores).
            unblock_handled_signals();
        }
    }
    let mut settings = config.server;
    let mut config_relay = config.relay;
    let cores = settings.cores;
    let tls_port = !settings.listen_tls.is_empty();
    match check_open_file_limit(settings.max_connections, cores, tls_port) {
        Ok((cap, reserve)) => {
            settings.max_connections = cap;
            settings.max_connections_per_ip = settings.max_connections_per_ip.min(cap);
            // A quarter of the descriptors kept for the spool and delivery, 256 at most.
            settings.max_lingering = usize::try_from(reserve / 4).unwrap_or(256).min(256);
            if let Some(relay) = &mut config_relay {
                relay.max_outbound = outbound_within(relay.max_outbound, reserve, cores);
            }
        }
        Err(e) => {
            complain!("postern: cannot start: {e}");
            return ExitCode::from(1);
        }
    }
    if let Err(e) = probe::io_uring() {
        complain!("postern: cannot start: {}", probe::advice(&e));
        return ExitCode::from(1);
    }
    // glommio refuses to start an executor under this much locked memory: said now, before
    // the spool is read (a long recovery would come first otherwise).
    if let Some(limit) =
        postern_server::memlock_limit().filter(|&l| l < postern_server::MIN_MEMLOCK)
    {
        complain!(
            "postern: cannot start: the locked-memory limit here is {} KiB, and each core's \
             io_uring needs at least {} KiB: raise it with `ulimit -l unlimited`, or \
             LimitMEMLOCK=infinity in the systemd unit",
            limit / 1024,
            postern_server::MIN_MEMLOCK / 1024
        );
        return ExitCode::from(1);
    }
    // A start that cannot listen changes nothing: the addresses are checked before the spool
    // is locked (made, when new) or moved to fewer cores.
    let addresses = (settings.listen.iter().map(|a| ("--listen", a)))
        .chain(settings.listen_tls.iter().map(|a| ("--listen-tls", a)))
        .chain(settings.metrics.iter().map(|a| ("--metrics", a)));
    for (flag, &addr) in addresses {
        if let Err(e) = postern_server::check_listen(addr) {
            complain!("postern: cannot start: {flag}: {e}");
            return ExitCode::from(1);
        }
    }
    if let Err(e) = check_file_size_limit(settings.spool_segment_size) {
        complain!("postern: cannot start: {e}");
        return ExitCode::from(1);
    }
    // So do the certificate and key, and the next hops' trust anchors (with --hold too): read
    // before the spool is locked, made or moved.
    if let Some(files) = &settings.tls {
        if let Err(e) = postern_server::tls::check_pair(&files.cert, &files.key) {
            complain!("postern: cannot start: {e}");
            return ExitCode::from(1);
        }
    }
    if config.outbound_tls_required {
        let clients = postern_relay::tls::TlsClients::new(config.outbound_tls_ca.as_deref());
        if let Err(e) = clients.and_then(|c| c.check_required()) {
            complain!("postern: cannot start: {e}");
            return ExitCode::from(1);
        }
    }
    // The spool's lock comes first: recovery must not read a spool another process writes.
    let spool_lock = match postern_server::lock_spool(&settings.spool_dir) {
        Ok(lock) => lock,
        Err(e) => {
            complain!("postern: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    if let Err(e) = check_spool_room(&settings.spool_dir, settings.spool_segment_size, cores) {
        complain!("postern: cannot start: {e}");
        return ExitCode::from(1);
    }
    // Fewer cores than last time: what the missing cores' directories still hold moves to
    // the remaining ones before anything else reads the spool.
    let options = postern_spool::SpoolOptions {
        segment_size: settings.spool_segment_size,
    };
    match postern_spool::fold_cores(&settings.spool_dir, cores as u32, options) {
        Ok(folded) if folded.dirs > 0 => {
            warn_left_behind(&folded);
            // Each ID's new name, for the operator following a message through the logs; a
            // large queue gets the first ones and a count, not a line per message (the log's
            // buffer would drop lines).
            for (old, new) in folded.moved.iter().take(MOVED_LOGGED) {
                tracing::info!(queue_id = %new, was = %old, "moved from a core that no longer exists");
            }
            if folded.moved.len() > MOVED_LOGGED {
                tracing::info!(
                    more = folded.moved.len() - MOVED_LOGGED,
                    "more messages moved from cores that no longer exist (their new queue \
                     IDs: `postern queue`; the old ID is in each message's Received header)"
                );
            }
            tracing::info!(
                directories = folded.dirs,
                messages = folded.moved.len(),
                "spool written by more cores folded into {cores}"
            );
            for &(core, records, messages) in &folded.damage {
                if records + messages == 0 {
                    // A move begun by an earlier build, whose journal kept no counts.
                    tracing::warn!(
                        core,
                        "the directory of a removed core has damaged records (not counted \
                         by the build that began the move)"
                    );
                    continue;
                }
                tracing::warn!(
                    core,
                    corrupt_records = records,
                    damaged_messages = messages,
                    "the directory of a removed core has damaged records: the damaged \
                     messages were not moved, and where a damaged record held a delivery \
                     outcome its recipient may be tried again"
                );
            }
            for dir in &folded.kept_damaged {
                tracing::warn!(
                    dir = %dir.display(),
                    "damaged records in a folded core directory: kept for inspection"
                );
            }
        }
        Ok(folded) => {
            warn_left_behind(&folded);
        }
        Err(postern_spool::SpoolError::NoSpace(e)) => {
            // Nothing moved (the move was undone): the old directories stay as they were,
            // and their mail waits there (see `start_relay`).
            tracing::warn!(
                "no room to move the queue of cores past --cores {cores} ({e}); it waits \
                 where it is until a start finds room"
            );
        }
        Err(e) => {
            complain!(
                "postern: cannot start: moving the queue of cores past --cores {cores} in {}: {e}",
                settings.spool_dir.display()
            );
            return ExitCode::from(1);
        }
    }
    // Said before the spool is read (a long recovery), once any move to fewer cores is done
    // (the marker must not take the room a move's journal needs on a full disk).
    mark_held(&settings.spool_dir, config_relay.is_none());
    for net in settings
        .relay_networks
        .iter()
        .filter(|n| n.prefix_len() == 0)
    {
        tracing::warn!(
            "--relay-network {net} takes in every {} client: this server relays mail from \
             anyone to anywhere (an open relay); name the clients' own networks instead",
            if net.addr().is_ipv4() { "IPv4" } else { "IPv6" }
        );
    }
    for net in settings.proxy_from.iter().filter(|n| n.prefix_len() == 0) {
        tracing::warn!(
            "--proxy-from {net} takes a PROXY header from every {} client: any of them can \
             pass for any address (and for a relay network's); name the load balancers' own \
             addresses instead",
            if net.addr().is_ipv4() { "IPv4" } else { "IPv6" }
        );
    }
    // RFC 5321 4.5.1: mail to the postmaster is always taken. Without --postmaster it goes
    // to postmaster@<hostname>, whose MX is most often this very server: each such message
    // would come back as a loop and be returned to its sender.
    if let Some(relay) = &config_relay {
        let mailbox = format!("postmaster@{}", settings.hostname);
        if settings.postmaster.is_none()
            && matches!(
                relay.router.route(&mailbox),
                Some(postern_relay::route::Destination::Mx(_))
            )
        {
            tracing::warn!(
                "mail to <postmaster> goes to {mailbox} by that domain's MX, most often this \
                 server itself (then returned as a mail loop): name where it goes with \
                 --postmaster ADDR, or route the domain with --route"
            );
        }
    }
    let mut relay_handle = None;
    let delivery = match config_relay {
        None => {
            tracing::info!("--hold: accepted mail stays queued, nothing is delivered");
            if !config.unused_with_hold.is_empty() {
                tracing::warn!(
                    "{} given with --hold: not used in this run (a run without --hold \
                     delivers by them)",
                    config.unused_with_hold.join(" and ")
                );
            }
            // Read the spool all the same, so that damage is reported at start-up with or
            // without delivery.
            match recover_and_report(&settings, "nothing is delivered (--hold)") {
                Ok((_, damage)) => settings.spool_damage_found = damage,
                Err(e) => {
                    complain!("postern: cannot start: {e}");
                    return ExitCode::from(1);
                }
            }
            None
        }
        Some(relay) => match start_relay(relay, &settings) {
            Ok((r, damage)) => {
                settings.spool_damage_found = damage;
                relay_handle = Some(r.clone());
                Some(r.factory())
            }
            Err(e) => {
                complain!("postern: cannot start: {e}");
                return ExitCode::from(1);
            }
        },
    };
    // A SIGTERM or SIGINT that came while the spool was read (a long move to fewer cores):
    // stop now, rather than say "ready" and greet clients first. (One that comes while the
    // cores start stops them as they come up.)
    if stop.is_stopping() {
        say!("postern: stopped before it was ready (a stop was asked for while it started)");
        return ExitCode::SUCCESS;
    }
    let running = match postern_server::start_locked(settings, delivery, spool_lock, stop.clone()) {
        Ok(r) => r,
        Err(e) => {
            complain!("postern: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    // Running for the signal thread before `ready` is said: a supervisor (or a test) that
    // signals once it reads that line gets what a running server does with the signal (a
    // drain with --drain-time), not the stop of a server still starting.
    let deferred = {
        let mut l = launch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        l.running = Some(Launched {
            relay: relay_handle,
            deletions: running.deletions(),
            server_cert: running.server_cert(),
        });
        std::mem::take(&mut l.deferred)
    };
    for addr in &running.listen {
        say!("postern: smtp listening on {addr}");
    }
    for addr in &running.listen_tls {
        say!("postern: smtps listening on {addr}");
    }
    if let Some(addr) = running.metrics {
        say!("postern: metrics listening on {addr}");
    }
    let plural = if cores == 1 { "" } else { "s" };
    say!("postern: ready with {cores} core{plural}");
    for signal in deferred {
        send_to_self(signal);
    }
    // The start's recovery is over and its tables are freed: their memory goes back now, not
    // never (see memory.rs).
    memory::give_back();
    if !running.wait() {
        say!(
            "postern: stopped after a core failed or could not sync its spool (see the log above)"
        );
        return ExitCode::FAILURE;
    }
    say!("postern: stopped");
    ExitCode::SUCCESS
}

/// Turns transparent huge pages off for this process. Where the kernel backs the
/// allocator's regions with them, a core that first touches memory it has just taken waits
/// while the kernel zeroes 2 MiB: milliseconds on a virtual machine, a stall of every session
/// on the core (docs/operations.md, "Memory"). A kernel that refuses costs only that.
fn no_huge_pages() {
    let _ = rustix::thread::disable_transparent_huge_pages(true);
}

/// The signal thread's signals, each with the process that sent it.
type Signals = signal_hook::iterator::SignalsInfo<signal_hook::iterator::exfiltrator::WithOrigin>;

/// How soon a stop signal from the process that sent the last one is taken for the same
/// request, not a second one that hurries the stop.
const SAME_STOP: std::time::Duration = std::time::Duration::from_secs(1);

/// The signals `serve` takes over: the stop (TERM, INT, and QUIT, a terminal's Ctrl-\, whose
/// default action would end the server abruptly, without its 421s), HUP, USR1 and USR2 for
/// their chores, and ALRM, which a stray `kill -ALRM` (or a library's alarm) would otherwise
/// turn into an abrupt end of the server by its default action: it is logged and ignored.
const HANDLED_SIGNALS: [libc::c_int; 7] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
];

/// Blocks the signals `serve` handles in the calling thread, and in the threads it makes
/// later. The kernel gives a signal sent to the process to a thread that does not block it,
/// and prefers the main thread: one waiting on a disk without interruption (a file system
/// frozen during the start) kept a SIGTERM pending until that wait ended, the signal
/// thread never woken for it.
fn block_handled_signals() {
    mask_handled_signals(libc::SIG_BLOCK);
}

/// Takes back, in the calling thread (the signal thread), the signals that
/// [`block_handled_signals`] blocked in the thread that made it.
fn unblock_handled_signals() {
    mask_handled_signals(libc::SIG_UNBLOCK);
}

/// Blocks (`SIG_BLOCK`) or unblocks (`SIG_UNBLOCK`) the signals `serve` handles in the
/// calling thread.
#[allow(unsafe_code)]
fn mask_handled_signals(how: libc::c_int) {
    // SAFETY: `set` is a local signal set, made empty before signals are added to it;
    // pthread_sigmask changes only the calling thread's mask and takes a null old set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in HANDLED_SIGNALS {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// Sends `signal` to this process (not to the calling thread, which blocks it: see
/// [`block_handled_signals`]), for the signal thread.
#[allow(unsafe_code)]
fn send_to_self(signal: i32) {
    // SAFETY: kill(2) with this process's own ID and a signal number it handles.
    unsafe {
        libc::kill(libc::getpid(), signal);
    }
}

/// What the signal thread acts on once the server runs. Signals other than the stops (a
/// flush, deletions, a certificate reload) that come before wait in `deferred` and are raised
/// again then.
#[derive(Default)]
struct Launch {
    running: Option<Launched>,
    deferred: Vec<i32>,
}

/// The running server's parts the signal thread uses.
struct Launched {
    relay: Option<std::sync::Arc<postern_relay::Relay>>,
    deletions: std::sync::Arc<postern_server::Deletions>,
    server_cert: Option<std::sync::Arc<postern_server::tls::ServerCert>>,
}

/// Handles `postern serve`'s signals from the start (before the spool is read, and while the
/// cores start): a first SIGTERM or SIGINT stops (once the server runs, with `--drain-time`,
/// it drains first, and a second begins the stop), the next hurries the stop, one more ends
/// the process at once, whatever the server is doing; the others once it runs.
fn spawn_signal_thread(
    mut signals: Signals,
    stop: std::sync::Arc<postern_server::StopFlag>,
    launch: std::sync::Arc<std::sync::Mutex<Launch>>,
    spool_dir: std::path::PathBuf,
    cores: usize,
    drain_time: std::time::Duration,
) -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
    // SIGQUIT stops as SIGTERM does.
    let stops = |signal| signal == SIGTERM || signal == SIGINT || signal == SIGQUIT;
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            // What a signal asks of the disk (the requests of `postern queue --delete` in the
            // spool directory, a certificate read again) is done by a thread of its own: on a
            // disk that hangs (a frozen or stalled file system) that work waits, and the stop
            // signals are still heard. Made before this thread takes its signals back, so that
            // it blocks them, as the other threads do.
            type Chore = Box<dyn FnOnce() + Send>;
            let (chores, queued) = std::sync::mpsc::channel::<Chore>();
            let chores = std::thread::Builder::new()
                .name("signal-chores".into())
                .spawn(move || {
                    // Each chore in the order its signal came.
                    for chore in queued {
                        chore();
                    }
                })
                .ok()
                .map(|_| chores);
            // Without that thread (none could be made), here.
            let run = |chore: Chore| match &chores {
                Some(chores) => {
                    if let Err(unsent) = chores.send(chore) {
                        (unsent.0)();
                    }
                }
                None => chore(),
            };
            unblock_handled_signals();
            // Counted here: the stop flag is also set by a core that fails.
            let mut asked_to_stop = false;
            let mut hurried = false;
            let mut drained = false;
            // The process that sent the last stop signal acted on, and when.
            let mut last_stop: Option<(libc::pid_t, std::time::Instant)> = None;
            for origin in signals.forever() {
                let signal = origin.signal;
                let sender = origin.process.map(|p| p.pid).filter(|&pid| pid > 0);
                if stops(signal) {
                    // `timeout(1)` signals the process and then its process group, so a stop
                    // comes twice, microseconds apart, from one sender, and the second would
                    // cut the grace short. A second from the same process (not the terminal's
                    // Ctrl-C, which has none) within SAME_STOP is the same request.
                    let now = std::time::Instant::now();
                    if let (Some(pid), Some((last, at))) = (sender, last_stop) {
                        if pid == last && now.duration_since(at) < SAME_STOP {
                            tracing::info!(
                                sender = pid,
                                "a stop signal again from the same process within {}: the \
                                 same request (as timeout(1) sends to the process and its group)",
                                humantime::format_duration(SAME_STOP)
                            );
                            continue;
                        }
                    }
                    last_stop = sender.map(|pid| (pid, now));
                }
                // The drain's end began the stop: the next signal hurries it.
                asked_to_stop |= drained && stop.is_stopping();
                let stop_signal = stops(signal);
                // Not while the server starts (a stop then ends the start before it takes
                // mail), nor once it stops (a core failed).
                let running = launch
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .running
                    .is_some();
                if stop_signal
                    && !asked_to_stop
                    && !drained
                    && !drain_time.is_zero()
                    && running
                    && !stop.is_stopping()
                {
                    drained = true;
                    stop.drain();
                    tracing::info!(
                        "draining: /readyz answers 503 and mail is still taken for {}; then \
                         the stop begins (a second SIGTERM or SIGINT begins it now)",
                        humantime::format_duration(drain_time)
                    );
                    let stop = stop.clone();
                    let ended = std::thread::Builder::new()
                        .name("drain".into())
                        .spawn(move || {
                            // As every thread but the signal thread.
                            block_handled_signals();
                            std::thread::sleep(drain_time);
                            if !stop.is_stopping() {
                                stop.stop();
                                tracing::info!(
                                    "drained; stopping: no new connections, finishing \
                                     transactions in flight (another SIGTERM or SIGINT stops \
                                     without waiting for them)"
                                );
                            }
                        });
                    if ended.is_ok() {
                        continue;
                    }
                    // No thread to end it: the stop begins now.
                }
                if stop_signal && !asked_to_stop {
                    asked_to_stop = true;
                    stop.stop();
                    tracing::info!(
                        "stopping: no new connections, finishing transactions in flight \
                     (another SIGTERM or SIGINT stops without waiting for them)"
                    );
                    continue;
                }
                if stop_signal && !hurried {
                    hurried = true;
                    stop.hurry();
                    tracing::warn!(
                        "stopping now: the grace for transactions and deliveries in flight \
                     is cut short (a third SIGTERM or SIGINT ends the process at once)"
                    );
                    continue;
                }
                if stop_signal {
                    // What is left of a hurried stop waits on the disk (a last sync, a
                    // spool on a file system that hangs): the operator ends it. Mail
                    // acknowledged is on disk; outcomes not yet synced are lost, and
                    // their deliveries made again after the next start. Written at
                    // once, not through the log's writer, which the end may not wait for.
                    complain!(
                        "postern: a third stop signal: ending at once, without waiting for \
                     the spool's last sync"
                    );
                    let _ = signal_hook::low_level::emulate_default_handler(signal);
                    // Not reached: the default action of SIGTERM and SIGINT ends the
                    // process. Should it not, the signal is ignored as before.
                    continue;
                }
                // The others act on the running server: until it runs, they wait, and are
                // raised again then.
                let (relay_handle, deletions, server_cert) = {
                    let mut l = launch
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    match &l.running {
                        Some(r) => (r.relay.clone(), r.deletions.clone(), r.server_cert.clone()),
                        None => {
                            l.deferred.push(signal);
                            continue;
                        }
                    }
                };
                if signal == SIGUSR1 {
                    // `postern queue --flush`: deferred mail is tried now.
                    match &relay_handle {
                        // A stopping server starts no delivery: what is deferred waits
                        // for the next run.
                        Some(_) if asked_to_stop => tracing::info!(
                            "SIGUSR1: not flushing, the server is stopping (the next run \
                         tries deferred mail as its schedule says)"
                        ),
                        Some(relay) => {
                            tracing::info!("SIGUSR1: trying deferred mail now");
                            relay.flush();
                        }
                        None => {
                            tracing::info!("SIGUSR1: nothing to flush, --hold delivers nothing")
                        }
                    }
                    continue;
                }
                if signal == SIGUSR2 {
                    // `postern queue --delete`: its requests wait in the spool.
                    let spool_dir = spool_dir.clone();
                    let stop = stop.clone();
                    run(Box::new(move || {
                        // Come after the stop began (behind a disk that hung, say): the requests
                        // stay, for their commands to withdraw, as when the stop came first.
                        if stop.is_stopping() {
                            tracing::info!("SIGUSR2: not deleting, the server is stopping");
                            return;
                        }
                        let asked = deletion_requests(&spool_dir, cores);
                        tracing::info!(
                            messages = asked.len(),
                            "SIGUSR2: deleting for the operator"
                        );
                        deletions.ask(asked);
                    }));
                    continue;
                }
                if let (SIGHUP, Some(cert)) = (signal, server_cert) {
                    // A renewed certificate takes effect without a restart.
                    run(Box::new(move || match cert.reload() {
                        Ok(()) => tracing::info!(
                            "SIGHUP: TLS certificate and key read again from {}; new \
                         handshakes use them",
                            cert.cert_path().display()
                        ),
                        Err(e) => tracing::error!(
                            "SIGHUP: {e}; the certificate in use stays until this is fixed"
                        ),
                    }));
                    continue;
                }
                if signal == SIGHUP {
                    // `systemctl reload` without TLS: nothing is read again.
                    tracing::info!(
                        "SIGHUP: nothing to read again (it reloads the --tls-cert and \
                     --tls-key files, and none are set); other settings take a restart"
                    );
                    continue;
                }
                // Every other setting is a flag: a restart applies new ones. A stray
                // signal must not kill the server abruptly.
                let name = signal_hook::low_level::signal_name(signal).unwrap_or("unknown");
                tracing::warn!("{name} ignored; SIGTERM stops postern");
            }
        });
    spawned.map(|_| ())
}

/// Keeps each log event on one line: a line break inside an event (a library's message that
/// prints an error with `{:#?}`) becomes a space, so that every line of the log is one event
/// to grep. The formatter hands each event over in one write.
struct OneLine<W>(W);

/// A control character that only a peer's text can have put in a log line: not a tab, not a
/// line end (joined), not ESC (the log's own colours; tracing escapes one in a value).
fn is_stray_control(b: u8) -> bool {
    b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r' | 0x1b)
}

impl<W: std::io::Write> std::io::Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let body = buf.strip_suffix(b"\n").unwrap_or(buf);
        // Past ASCII: a character that may need escaping (looked at below).
        if !body
            .iter()
            .any(|&b| b == b'\n' || b == b'\r' || is_stray_control(b) || b >= 0x7f)
        {
            return self.0.write(buf);
        }
        let mut joined: Vec<u8> = Vec::with_capacity(buf.len());
        let mut lines = body.split(|&b| b == b'\n');
        if let Some(first) = lines.next() {
            joined.extend_from_slice(first);
        }
        for line in lines {
            joined.push(b' ');
            joined.extend_from_slice(line.trim_ascii_start());
        }
        // A CR (in a next hop's reply, say) would send a terminal back over the line; a NUL
        // or another control character from a peer has no place in a log line either.
        for b in &mut joined {
            if *b == b'\r' || is_stray_control(*b) {
                *b = b' ';
            }
        }
        // DEL, a C1 control, a bidi control or a line separator (from a peer's UTF-8 text):
        // written as an escape, as `postern queue` shows them, so that no log viewer reorders
        // or breaks the line.
        if let Ok(text) = std::str::from_utf8(&joined) {
            if text
                .chars()
                .any(|c| c != '\u{1b}' && crate::terminal::unsafe_on_a_terminal(c))
            {
                let mut escaped = String::with_capacity(text.len() + 16);
                for c in text.chars() {
                    if c != '\u{1b}' && c != '\t' && crate::terminal::unsafe_on_a_terminal(c) {
                        let _ = std::fmt::Write::write_fmt(
                            &mut escaped,
                            format_args!("\\u{{{:x}}}", u32::from(c)),
                        );
                    } else {
                        escaped.push(c);
                    }
                }
                joined = escaped.into_bytes();
            }
        }
        joined.extend_from_slice(&buf[body.len()..]);
        self.0.write_all(&joined)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// The log's destination, whose errors are dropped with the lines: with stderr gone (a closed
/// pipe), tracing-appender's writer thread would otherwise miss the stop's shutdown message
/// behind a failed flush, and every stop would wait out its guard's second.
struct Unfailing<W>(W);

impl<W: std::io::Write> std::io::Write for Unfailing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.write(buf) {
            // Tried again by the caller (`write_all`).
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Err(e),
            Ok(n) => Ok(n),
            Err(_) => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}

/// The log's writer thread and its handle. tracing-appender panics when it cannot make the
/// thread (a limit on tasks): that is said on one line as the start's error (None), not
/// reported as a bug.
fn log_writer() -> Option<(
    tracing_appender::non_blocking::NonBlocking,
    tracing_appender::non_blocking::WorkerGuard,
)> {
    // Only this thread runs yet: the hook is its own while it is swapped.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let made = std::panic::catch_unwind(|| {
        tracing_appender::non_blocking(std::io::BufWriter::with_capacity(
            LOG_BUFFER,
            Unfailing(std::io::stderr()),
        ))
    });
    std::panic::set_hook(hook);
    match made {
        Ok(made) => Some(made),
        Err(payload) => {
            let why = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("no reason given");
            complain!(
                "postern: cannot start: no thread for the log writer (a limit on tasks? {})",
                why.split_whitespace().collect::<Vec<_>>().join(" ")
            );
            None
        }
    }
}

/// A panic (a bug, or a library failing where it cannot return an error) is reported as one
/// line naming the thread and the place, and a backtrace only where RUST_BACKTRACE asks.
fn set_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let message = message.split_whitespace().collect::<Vec<_>>().join(" ");
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        complain!("postern: internal error: thread {name} panicked{at}: {message}");
        // A core whose start panicked is reported by glommio without the cause.
        postern_server::note_panic(&format!("{message}{at}"));
        let trace = std::backtrace::Backtrace::capture();
        if trace.status() == std::backtrace::BacktraceStatus::Captured {
            complain!("{trace}");
        }
    }));
}

/// Descriptors beyond the inbound connections: spool segments, outbound connections, the
/// metrics listener's clients, the rings.
const OPEN_FILE_HEADROOM: u64 = 1024;

/// Descriptors a core needs before its first connection (its three rings and their eventfds,
/// its listeners, its spool's segments, its blocking pool), and the process besides.
const OPEN_FILES_PER_CORE: u64 = 16;
const OPEN_FILES_BASE: u64 = 64;

/// The connections an open-file limit of `limit` holds with room left for the cores' own
/// descriptors (`least`) and `aside` (the spool and delivery's [`OPEN_FILE_HEADROOM`], and the
/// over-limit clients of the implicit-TLS port): all but those, and never less than half of
/// what the cores' own leave.
fn connections_within(limit: u64, least: u64, aside: u64) -> usize {
    let cap = limit
        .saturating_sub(least.saturating_add(aside))
        .max(limit.saturating_sub(least) / 2)
        .max(1);
    usize::try_from(cap).unwrap_or(usize::MAX)
}

/// Raises the soft open-file limit to the hard one and returns the connection limit to use:
/// `--max-connections`, or less where even the hard limit leaves too few descriptors for it
/// and for the spool and delivery (said in a warning). A limit too low for the cores to start
/// at all is an error (naming the limit, rather than whichever descriptor happens to fail
/// first).
/// With the connection limit, the descriptors left over by the connections and the cores.
/// `tls_port`: an implicit-TLS listener, whose over-limit clients each hold a descriptor
/// while they are answered ([`postern_server::TLS_REFUSALS_MAX`] per core): kept aside too.
fn check_open_file_limit(
    max_connections: usize,
    cores: usize,
    tls_port: bool,
) -> Result<(usize, u64), String> {
    match postern_server::raise_open_file_limit() {
        Ok(limit) => {
            let least = OPEN_FILES_BASE + OPEN_FILES_PER_CORE * cores as u64;
            if let Some(now) = limit.now.filter(|&n| n < least) {
                let plural = if cores == 1 { "" } else { "s" };
                return Err(format!(
                    "the open-file limit is {now}, too low to start {cores} core{plural} \
                     (at least {least}, and one more per connection); raise it with \
                     `ulimit -n` or LimitNOFILE= in the systemd unit"
                ));
            }
            if limit.now != limit.was {
                tracing::info!(
                    "open-file limit raised from {} to {}",
                    limit.was.map_or("unlimited".into(), |n| n.to_string()),
                    limit.now.map_or("unlimited".into(), |n| n.to_string()),
                );
            }
            // Beside the connections: the cores' own descriptors (over 1,024 past 60 cores),
            // and the spool's and delivery's.
            let refusing = if tls_port {
                (postern_server::TLS_REFUSALS_MAX as u64).saturating_mul(cores as u64)
            } else {
                0
            };
            let aside = OPEN_FILE_HEADROOM.saturating_add(refusing);
            let beside = least.saturating_add(aside);
            let wanted = (max_connections as u64).saturating_add(beside);
            let capped = limit
                .now
                .filter(|&n| n < wanted)
                .map(|n| (n, connections_within(n, least, aside)))
                .filter(|&(_, cap)| cap < max_connections);
            if let Some((now, cap)) = capped {
                let left = now.saturating_sub(cap as u64);
                tracing::warn!(
                    "the open-file limit ({now}) is below --max-connections ({max_connections}) \
                     plus {beside} for the cores, the spool and delivery: connections are \
                     capped at {cap}, leaving {left} descriptors so that idle connections \
                     cannot take those mail needs, and those past it get 421 4.3.2; raise it \
                     with `ulimit -n` or LimitNOFILE= in the systemd unit, or lower \
                     --max-connections"
                );
                // Free for lingering connections: what neither the connections, the cores'
                // own descriptors nor the TLS port's refusals take.
                return Ok((
                    cap,
                    now.saturating_sub((cap as u64).saturating_add(least).saturating_add(refusing)),
                ));
            }
            // No limit: no reserve to keep either.
            let spare = limit.now.map_or(u64::MAX, |n| {
                n.saturating_sub(
                    (max_connections as u64)
                        .saturating_add(least)
                        .saturating_add(refusing),
                )
            });
            Ok((max_connections, spare))
        }
        Err(e) => {
            tracing::warn!("cannot raise the open-file limit: {e}");
            // The limit is not known: nothing is held to it.
            Ok((max_connections, u64::MAX))
        }
    }
}

/// `--max-outbound-connections`, held to half of the descriptors `reserve` that neither the
/// inbound connections nor the cores' own take (the rest are the spool's, the lingering
/// connections' and the resolver's), one per core at least; said when it is lowered.
fn outbound_within(wanted: usize, reserve: u64, cores: usize) -> usize {
    let room = usize::try_from(reserve / 2)
        .unwrap_or(usize::MAX)
        .max(cores);
    if wanted > room {
        tracing::warn!(
            "the open-file limit leaves {reserve} descriptors beside the connections and the \
             cores' own: outbound connections are capped at {room}, not \
             --max-outbound-connections {wanted}; raise it with `ulimit -n` or LimitNOFILE= \
             in the systemd unit, or lower --max-connections"
        );
        return room;
    }
    wanted
}

/// Folded core directories that could not be deleted: their mail was moved, the operator may
/// delete them.
fn warn_left_behind(folded: &postern_spool::Folded) {
    for dir in &folded.kept_foreign {
        tracing::warn!(
            dir = %dir.display(),
            "a folded core directory held entries other than postern's segments (files \
             postern did not write, or damaged segments set aside): its mail was moved and its \
             segments deleted, and the rest is kept here, to be looked at and deleted by hand"
        );
    }
    for dir in &folded.left_behind {
        tracing::warn!(
            dir = %dir.display(),
            "a folded core directory could not be deleted; its mail was moved, so it may be \
             deleted by hand"
        );
    }
}

/// Takes the requests of `postern queue --delete` out of the spool directory: each file's
/// lines `<queue id> <recipients>`. A line that is not one is passed over.
fn deletion_requests(spool: &std::path::Path, cores: usize) -> Vec<(String, u32)> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut asked = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let Ok(entries) = std::fs::read_dir(spool) else {
        return asked;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(queue::DELETE_PREFIX) {
            continue;
        }
        // Claimed first, by a rename: the request is then either the command's to withdraw
        // (it gave up, and told the operator nothing was deleted) or ours to act on, never
        // both. One the command withdrew meanwhile is gone, and passed over.
        let shown = entry.path();
        let path = spool.join(format!(".{}.taken", name.to_string_lossy()));
        if std::fs::rename(&shown, &path).is_err() {
            continue;
        }
        // A plain file, read without following a link or waiting on a pipe, and only as much
        // as a request can hold. One older than a command waits for its answer was left by a
        // command that gave up or died: it is not acted on now.
        let mut text = String::new();
        let meta = std::fs::symlink_metadata(&path);
        let stale = meta
            .as_ref()
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > DELETION_REQUEST_STALE);
        if stale {
            tracing::warn!(
                "{}: an old deletion request, removed unread",
                shown.display()
            );
        } else if meta.is_ok_and(|m| m.is_file()) {
            let opened = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(&path);
            match opened {
                Ok(f) => {
                    let _ = f.take(DELETION_REQUEST_MAX).read_to_string(&mut text);
                }
                // Said, not passed over: the command waits, and then points at this log.
                Err(e) => tracing::warn!(
                    "{}: cannot read the deletion request ({e}); nothing deleted for it",
                    shown.display()
                ),
            }
        }
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!("{}: {e}", path.display());
        }
        for line in text.lines() {
            let mut words = line.split_ascii_whitespace();
            let (Some(id), Some(Ok(n)), None) = (
                words.next(),
                words.next().map(str::parse::<u32>),
                words.next(),
            ) else {
                tracing::warn!("{}: a line that is no request: {line:?}", shown.display());
                continue;
            };
            if !seen.insert(id.to_owned()) {
                continue;
            }
            match postern_spool::owner_core(id) {
                Some(core) if (core as usize) < cores => asked.push((id.to_owned(), n)),
                _ => tracing::warn!(
                    queue_id = %id,
                    "not deleted: no core of this run holds it (a queue ID of a core removed by \
                     a smaller --cores whose mail could not be moved yet)"
                ),
            }
        }
    }
    asked
}

/// The most bytes read of one deletion request: [`postern_server::MAX_DELETIONS_ASKED`] lines
/// of a queue ID and a count, with room to spare.
const DELETION_REQUEST_MAX: u64 = postern_server::MAX_DELETIONS_ASKED as u64 * 64;

/// A deletion request older than this (its command waits 10 s) is not acted on.
const DELETION_REQUEST_STALE: std::time::Duration = std::time::Duration::from_secs(30);

/// Says in the spool whether this server holds its mail (`--hold`), for `postern queue`. A
/// file that cannot be written or removed costs only that hint: warned of.
fn mark_held(spool: &std::path::Path, held: bool) {
    let path = spool.join(queue::HOLD_FILE);
    let done = if held {
        // Like the rest of the spool, its user's alone.
        std::os::unix::fs::OpenOptionsExt::mode(
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true),
            0o600,
        )
        .open(&path)
        .and_then(|mut f| {
            std::io::Write::write_all(
                &mut f,
                b"this postern runs with --hold: nothing is delivered\n",
            )
        })
    } else {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    };
    if let Err(e) = done {
        tracing::warn!(
            "{}: {e} (`postern queue` may say wrongly whether mail is held)",
            path.display()
        );
    }
}

/// Reads what the spool still has to deliver (every core's segments, before any core writes)
/// and makes the relay that resumes it.
fn start_relay(
    config: postern_relay::RelayConfig,
    settings: &postern_server::Settings,
) -> Result<(std::sync::Arc<postern_relay::Relay>, u64), String> {
    let (mut pending, damage) =
        recover_and_report(settings, "delivery resumes once the server is up")?;
    // Mail still in the directories of cores past --cores (its move found no room) waits
    // there: delivered from there, its outcomes would be written on a core whose segments
    // do not keep them, and a later start would deliver it all again.
    let before = pending.len();
    pending.retain(|m| (m.core as usize) < settings.cores);
    if pending.len() < before {
        tracing::warn!(
            waiting = before - pending.len(),
            "messages in the directories of cores past --cores {} wait there, not delivered, \
             until a start finds room to move them (free space and restart, or start with \
             the earlier --cores)",
            settings.cores
        );
    }
    postern_relay::Relay::new(config, settings.cores, pending).map(|r| (r, damage))
}

/// Whether the spool's file system is big enough for its segments, which are reserved whole
/// when made: one that cannot hold a single segment could never take a message (every one
/// would get 452 4.3.1), so the start fails; one that cannot hold four for each core (the
/// one written, the next made ahead, two kept from new mail) refuses mail long before it is
/// full, which is a warning.
fn check_spool_room(dir: &std::path::Path, segment: u64, cores: usize) -> Result<(), String> {
    // Some file systems (FUSE, network ones) say nothing of their size: no check then.
    let Ok(fs) = rustix::fs::statvfs(dir) else {
        return Ok(());
    };
    if fs.f_blocks == 0 {
        return Ok(());
    }
    let total = fs.f_blocks.saturating_mul(fs.f_frsize);
    if total < segment {
        return Err(format!(
            "the spool's file system ({}) holds {total} bytes in all, less than one spool \
             segment (--spool-segment-size {segment}): no message could be stored; lower \
             --spool-segment-size or give a bigger file system",
            dir.display()
        ));
    }
    // Each core writes one segment, has the next made ahead, and keeps two from new mail
    // (for copies of waiting mail and the outcomes of deliveries once new mail fills the disk).
    let wanted = segment.saturating_mul(4 * cores as u64);
    if total < wanted {
        let plural = if cores == 1 { "" } else { "s" };
        tracing::warn!(
            "the spool's file system ({}) holds {total} bytes in all, less than four segments \
             for each core ({wanted} bytes of --spool-segment-size {segment} with {cores} \
             core{plural}: the one written, the next made ahead, and two kept from new mail for \
             copies of waiting mail and delivery outcomes): none is kept, and mail gets 452 \
             4.3.1 long before it is full; lower --spool-segment-size",
            dir.display()
        );
    }
    Ok(())
}

/// The file-size limit (`ulimit -f`) applies to every segment file: one below a segment
/// makes every segment fail (EFBIG), as a file system too small would, so the start fails.
fn check_file_size_limit(segment: u64) -> Result<(), String> {
    let fsize = rustix::process::getrlimit(rustix::process::Resource::Fsize).current;
    match fsize.filter(|&l| l < segment) {
        Some(limit) => Err(format!(
            "the file-size limit is {limit} bytes, less than one spool segment \
             (--spool-segment-size {segment}): no message could be stored; raise it with \
             `ulimit -f` or LimitFSIZE= in the systemd unit, or lower --spool-segment-size"
        )),
        None => Ok(()),
    }
}

/// How many messages cut off by damage the start names one by one.
const CUT_OFF_LOGGED: usize = 100;

/// Reads the spool's messages still to deliver, logging how many and any damaged records.
/// `then` says what happens to them.
/// Returns the messages not yet final, and how many damaged records were found (or messages
/// missing records, where those are more).
fn recover_and_report(
    settings: &postern_server::Settings,
    then: &str,
) -> Result<(Vec<postern_spool::RecoveredMessage>, u64), String> {
    let recovered = if settings.spool_dir.exists() {
        postern_spool::recover(&settings.spool_dir).map_err(|e| {
            let what = match &e {
                postern_spool::SpoolError::Io(io)
                    if io.kind() == std::io::ErrorKind::PermissionDenied =>
                {
                    "; every directory and file in the spool must be readable and writable by \
                     the user postern runs as (give them to it with chown -R, or run postern as \
                     their owner)"
                }
                _ => "",
            };
            format!(
                "reading the spool {}: {e}{what}",
                settings.spool_dir.display()
            )
        })?
    } else {
        postern_spool::Recovered::default()
    };
    let pending: Vec<_> = recovered
        .messages
        .into_iter()
        .filter(|m| !m.is_final())
        .collect();
    // Also with nothing queued: every start says what it found.
    tracing::info!(
        queued = pending.len(),
        corrupt_records = recovered.corrupt_records,
        torn_tails = recovered.torn_tails,
        "spool recovered; {then}"
    );
    if recovered.corrupt_records > 0 || recovered.damaged > 0 {
        // Not what a crash leaves (that is a torn tail): the disk or something else changed
        // the files. Say where, so the operator can look.
        let at: Vec<String> = (recovered.corrupt_at.iter())
            .map(|l| format!("core {} segment {} offset {}", l.core, l.segment, l.offset))
            .chain(recovered.damaged_at.iter().map(|(start, end)| {
                format!(
                    "a message from core {} segment {} offset {} to segment {} offset {}",
                    start.core, start.segment, start.offset, end.segment, end.offset
                )
            }))
            .take(10)
            .collect();
        tracing::warn!(
            corrupt_records = recovered.corrupt_records,
            damaged_messages = recovered.damaged,
            unread_octets = recovered.unread_octets,
            first_at = %at.join("; "),
            "the spool has damaged records: the messages they held (or parts of them) are not \
             delivered, and a message whose first record was lost is not counted in \
             damaged_messages; past the damage up to unread_octets of segment files could not \
             be read (cut off, behind a record whose length runs past the file's end or a hole \
             in durable records, or in a file whose header is bad or not its own), and the \
             messages there are lost too; look at the disk"
        );
    }
    // A disk that cannot give pages back: said apart from other damage, with the error.
    for e in recovered.read_errors.iter().take(10) {
        tracing::warn!(
            at = %format_args!(
                "core {} segment {} offset {}",
                e.at.core, e.at.segment, e.at.offset
            ),
            error = %e.error,
            "a segment file could not be read past this offset (the disk gave an error, as \
             for a bad sector): what lies past it is counted in unread_octets and not \
             delivered; the file is kept as it is; look at the disk"
        );
    }
    // By name, each: the sender may be owed word that a message it was told was queued
    // will not arrive.
    for c in recovered.cut_off.iter().take(CUT_OFF_LOGGED) {
        let sender = if c.reverse_path.is_empty() {
            "<>"
        } else {
            &c.reverse_path
        };
        tracing::warn!(
            queue_id = %c.queue_id,
            from = %sender,
            recipients = c.recipients,
            start = %format_args!(
                "core {} segment {} offset {}",
                c.start.core, c.start.segment, c.start.offset
            ),
            damage = %format_args!(
                "segment {} offset {}",
                c.damage.segment, c.damage.offset
            ),
            "a message started before the damage has no end: its last records may have been \
             lost to it, after its 250 gave this queue ID; it is not delivered (its body is \
             not whole); tell its sender (its first records are kept with the damaged \
             segments)"
        );
    }
    if recovered.cut_off.len() > CUT_OFF_LOGGED {
        tracing::warn!(
            more = recovered.cut_off.len() - CUT_OFF_LOGGED,
            "more messages cut off by the damage; `postern queue --spool` lists them all"
        );
    }
    if !recovered.strays.is_empty() {
        let at: Vec<String> = (recovered.strays.iter().take(10))
            .map(|p| p.display().to_string())
            .collect();
        tracing::warn!(
            strays = recovered.strays.len(),
            first_at = %at.join(", "),
            "entries named like spool segments are not regular files (a directory, say), or \
             directories are named like a core's but not as postern names them (`03` for \
             `3`): they are not read, and mail in them is not delivered; move them out of \
             the spool (or rename such a directory, with postern stopped)"
        );
    }
    let kept = postern_spool::kept_damage(&settings.spool_dir);
    if !kept.is_empty() {
        let at: Vec<String> = kept.iter().map(|p| p.display().to_string()).collect();
        tracing::warn!(
            kept = %at.join(", "),
            "segments with damaged records are kept for inspection (nothing in them is \
             delivered; delete them when done)"
        );
    }
    // One damaged record usually makes one damaged message: not counted twice.
    Ok((pending, recovered.corrupt_records.max(recovered.damaged)))
}

#[cfg(test)]
mod tests {
    /// A destination that is gone: every write and flush fails (a closed pipe).
    struct Gone;

    impl std::io::Write for Gone {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
    }

    #[test]
    fn a_log_destination_that_is_gone_fails_no_write_nor_flush() {
        use std::io::Write;
        let mut log = std::io::BufWriter::with_capacity(64, super::Unfailing(Gone));
        log.write_all(&[b'x'; 200]).unwrap();
        log.write_all(b"a line\n").unwrap();
        log.flush().unwrap();
    }

    use super::OneLine;
    use std::io::Write;

    #[test]
    fn the_connection_cap_leaves_the_cores_their_own_descriptors_past_60_cores() {
        // 128 cores need 64 + 16 * 128 = 2,112 descriptors of their own: with a limit of
        // 8,192, connections may take what those and the 1,024 for the spool and delivery
        // leave, not 8,192 less 1,024 (which left the cores short, and the spool with none).
        let least = super::OPEN_FILES_BASE + super::OPEN_FILES_PER_CORE * 128;
        let cap = super::connections_within(8192, least, super::OPEN_FILE_HEADROOM);
        assert_eq!(cap as u64, 8192 - least - super::OPEN_FILE_HEADROOM);
        // A single core: the limit less its own and 1,024, or half what its own leave.
        assert_eq!(
            super::connections_within(20_000, 80, 1024),
            20_000 - 80 - 1024
        );
        assert_eq!(super::connections_within(400, 80, 1024), 160);
        // What the implicit-TLS port's refusals hold is kept aside as well.
        assert_eq!(
            super::connections_within(20_000, 80, 1040),
            20_000 - 80 - 1040
        );
    }

    #[test]
    fn outbound_connections_are_held_to_half_the_spare_descriptors_one_per_core_at_least() {
        assert_eq!(super::outbound_within(1000, u64::MAX, 2), 1000);
        assert_eq!(super::outbound_within(1000, 2000, 2), 1000);
        assert_eq!(super::outbound_within(1000, 600, 2), 300);
        assert_eq!(super::outbound_within(1000, 2, 4), 4);
    }

    #[test]
    fn a_log_event_stays_on_one_line() {
        let mut out = OneLine(Vec::new());
        out.write_all(b"WARN x: Error: Os {\n    code: 12,\n}\n")
            .unwrap();
        out.write_all(b"INFO y: plain\n").unwrap();
        assert_eq!(
            String::from_utf8(out.0).unwrap(),
            "WARN x: Error: Os { code: 12, }\nINFO y: plain\n"
        );
    }

    #[test]
    fn a_carriage_return_in_a_log_event_is_a_space() {
        let mut out = OneLine(Vec::new());
        out.write_all(b"INFO z: reply=\"451 before\rAFTER\"\n")
            .unwrap();
        assert_eq!(
            String::from_utf8(out.0).unwrap(),
            "INFO z: reply=\"451 before AFTER\"\n"
        );
    }

    #[test]
    fn a_peer_s_control_characters_are_spaces_and_the_log_s_colours_stay() {
        let mut out = OneLine(Vec::new());
        out.write_all(b"\x1b[32mINFO\x1b[0m z: 550 a\x00b\x01c\td\n")
            .unwrap();
        assert_eq!(
            String::from_utf8(out.0).unwrap(),
            "\x1b[32mINFO\x1b[0m z: 550 a b c\td\n"
        );
    }

    #[test]
    fn a_peer_s_bidi_and_c1_controls_and_line_separators_are_escaped() {
        let mut out = OneLine(Vec::new());
        out.write_all("INFO z: 550 a\u{202e}b\u{2028}c\u{9b}d\u{7f} é\n".as_bytes())
            .unwrap();
        out.write_all("INFO z: é\n".as_bytes()).unwrap();
        assert_eq!(
            String::from_utf8(out.0).unwrap(),
            "INFO z: 550 a\\u{202e}b\\u{2028}c\\u{9b}d\\u{7f} é\nINFO z: é\n"
        );
    }
}
