//! Starting and stopping the server: one glommio executor per core, each with its own
//! SO_REUSEPORT listener on every address, so the kernel spreads connections over the cores.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::{CpuSet, LocalExecutorBuilder, Placement, PoolPlacement};
use postern_proto::ServerConfig;
use postern_spool::{DirLock, LOCK_FILE};
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::Settings;
use crate::core::{watch, Core, Deletions, StopFlag};
use crate::delivery::{CoreHandle, DeliveryFactory};
use crate::error::StartError;
use crate::limits::{ConnectionLimits, Refusal};
use crate::listener::Listener;
use crate::metrics::Registry;
use crate::relay::RelayPolicy;
use crate::store::CoreStore;
use crate::{metrics_http, session, tls, watchdog};

/// After the shutdown grace, how long sessions still inside a body get to write their 421.
const GRACE_OVER_WRITES: Duration = Duration::from_secs(1);

/// Memory glommio registers for storage I/O per executor. postern does its file I/O through
/// the spool's mapping, so the minimum is enough, and it keeps well inside a default 8 MiB
/// RLIMIT_MEMLOCK even with many cores.
const IO_MEMORY: usize = 64 * 1024;

/// A running server.
pub struct Running {
    /// The SMTP addresses actually bound (ports resolved).
    pub listen: Vec<SocketAddr>,
    /// The implicit-TLS addresses actually bound.
    pub listen_tls: Vec<SocketAddr>,
    /// The metrics address actually bound.
    pub metrics: Option<SocketAddr>,
    stop: Arc<StopFlag>,
    deletions: Arc<Deletions>,
    server_cert: Option<Arc<tls::ServerCert>>,
    threads: Vec<std::thread::JoinHandle<bool>>,
    /// Held until the cores have stopped: no other process opens this spool meanwhile.
    _spool_lock: DirLock,
}

impl Running {
    /// The flag that stops the server (for signal handlers).
    pub fn stop_flag(&self) -> Arc<StopFlag> {
        self.stop.clone()
    }

    /// Where the operator's deletions go (for the signal thread, on SIGUSR2).
    pub fn deletions(&self) -> Arc<Deletions> {
        self.deletions.clone()
    }

    /// The server's certificate and key when TLS is on, to read again on SIGHUP.
    pub fn server_cert(&self) -> Option<Arc<tls::ServerCert>> {
        self.server_cert.clone()
    }

    /// Waits until every core has stopped; false when one of them failed (panicked, which
    /// stops the others) or could not make its spool durable at the end.
    pub fn wait(self) -> bool {
        let mut clean = true;
        for t in self.threads {
            clean &= t.join().unwrap_or(false);
        }
        clean
    }
}

/// Binds a placeholder on `addr` with SO_REUSEPORT to learn the port when it is 0, so every
/// core binds the same one. The placeholder never listens, so it never takes a connection.
///
/// SO_REUSEPORT would also let this process join the listeners of another process of the same
/// user on that port (another postern left running), and the kernel would split connections
/// between the two. So a fixed port that something already listens on is refused first.
fn reserve(addr: SocketAddr) -> Result<(Socket, SocketAddr), StartError> {
    let bind_err = |source| StartError::Bind { addr, source };
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    if addr.port() != 0 && still_listening(addr) {
        return Err(bind_err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another process already listens there (another postern?)",
        )));
    }
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP)).map_err(bind_err)?;
    s.set_reuse_port(true).map_err(bind_err)?;
    s.set_reuse_address(true).map_err(bind_err)?;
    s.bind(&addr.into()).map_err(bind_err)?;
    let local = s
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or_else(|| bind_err(std::io::Error::other("no local address")))?;
    Ok((s, local))
}

/// Whether `addr` can be listened on now, by the checks the start makes (something else
/// listening on a fixed port, an address that is not ours, a port this user may not bind),
/// without keeping the socket. The binary asks before it touches the spool, so that a start
/// that cannot listen changes nothing there.
pub fn check_listen(addr: SocketAddr) -> Result<(), StartError> {
    reserve(addr).map(drop)
}

/// Whether something listens on `addr` and goes on listening for half a second: a process that
/// has just exited (a restart) leaves its listener in the table for some milliseconds while
/// the kernel tears it down, which is no reason to refuse to start.
pub fn still_listening(addr: SocketAddr) -> bool {
    const LOOKS: u32 = 20;
    const APART: Duration = Duration::from_millis(25);
    for _ in 0..LOOKS {
        if !listening_on(addr) {
            return false;
        }
        std::thread::sleep(APART);
    }
    true
}

/// Whether a listener on `other` keeps a bind of `ours` (on the same port) out, as the kernel
/// decides it: within one family the same address or a wildcard on either side; across the
/// families, only where an IPv6 address stands for IPv4 ones: the IPv6 wildcard (a
/// dual-stack socket, as postern's are where `dual_stack`, `net.ipv6.bindv6only` being 0;
/// another program's socket may have said otherwise, which cannot be seen from here, and is
/// taken to follow that setting too) and IPv4-mapped addresses. An IPv4 wildcard and a plain
/// IPv6 address do not meet.
fn listens_over(ours: std::net::IpAddr, other: std::net::IpAddr, dual_stack: bool) -> bool {
    use std::net::IpAddr::{V4, V6};
    let meet_v4 = |a: std::net::Ipv4Addr, b: std::net::Ipv4Addr| {
        a == b || a.is_unspecified() || b.is_unspecified()
    };
    match (ours, other) {
        (V4(a), V4(b)) => meet_v4(a, b),
        (V6(a), V6(b)) => a == b || a.is_unspecified() || b.is_unspecified(),
        (V4(a), V6(b)) => {
            (dual_stack && b.is_unspecified()) || b.to_ipv4_mapped().is_some_and(|b| meet_v4(a, b))
        }
        (V6(a), V4(b)) => {
            (dual_stack && a.is_unspecified()) || a.to_ipv4_mapped().is_some_and(|a| meet_v4(a, b))
        }
    }
}

/// Whether an IPv6 socket takes IPv4 too unless its program says otherwise
/// (`net.ipv6.bindv6only` is 0, the default, also when it cannot be read).
pub fn ipv6_is_dual_stack() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").map_or(true, |v| v.trim() == "0")
}

/// Whether a TCP socket of this network namespace listens on `addr`'s port at an address that
/// overlaps it ([`listens_over`]), from `/proc/net/tcp` and `tcp6`.
/// A bind test cannot tell: with SO_REUSEADDR it also fails on an earlier run's connections
/// in TIME_WAIT. Where `/proc` cannot be read, nothing is found.
fn listening_on(addr: SocketAddr) -> bool {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    const LISTEN: &str = "0A";
    let dual_stack = ipv6_is_dual_stack();
    let overlaps = |other: IpAddr| listens_over(addr.ip(), other, dual_stack);
    let parse_ip = |hex: &str| -> Option<IpAddr> {
        // The kernel prints each 32-bit word of the address in host byte order.
        let words = (0..hex.len() / 8)
            .map(|i| u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok())
            .collect::<Option<Vec<u32>>>()?;
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        match bytes.len() {
            4 => Some(IpAddr::V4(Ipv4Addr::new(
                bytes[0], bytes[1], bytes[2], bytes[3],
            ))),
            16 => {
                let octets: [u8; 16] = bytes.try_into().ok()?;
                Some(IpAddr::V6(Ipv6Addr::from(octets)))
            }
            _ => None,
        }
    };
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        let Ok(text) = std::fs::read_to_string(table) else {
            return false;
        };
        text.lines().skip(1).any(|line| {
            let mut fields = line.split_whitespace().skip(1);
            let (Some(local), Some(_remote), Some(state)) =
                (fields.next(), fields.next(), fields.next())
            else {
                return false;
            };
            let Some((ip, port)) = local.split_once(':') else {
                return false;
            };
            state == LISTEN
                && u16::from_str_radix(port, 16) == Ok(addr.port())
                && parse_ip(ip).is_some_and(overlaps)
        })
    })
}

/// Starts the server and returns once every core is listening. Acknowledged messages stay in
/// the spool; see [`start_with`] to deliver them.
pub fn start(settings: Settings) -> Result<Running, StartError> {
    start_with(settings, None)
}

/// Starts the server with a delivery side made on each core by `delivery`, and returns once
/// every core is listening.
pub fn start_with(
    settings: Settings,
    delivery: Option<DeliveryFactory>,
) -> Result<Running, StartError> {
    let lock = lock_spool(&settings.spool_dir)?;
    start_locked(settings, delivery, lock, Arc::default())
}

/// Checks that the spool directory can be created and written, and takes its lock (one process
/// per spool: [`DirLock`]). For a caller that reads the spool before [`start_locked`].
pub fn lock_spool(dir: &std::path::Path) -> Result<DirLock, StartError> {
    CoreStore::check_dir(dir)?;
    let lock = DirLock::acquire(dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock => StartError::Spool(e.to_string()),
        _ => StartError::Spool(format!(
            "cannot lock {}: {e}",
            dir.join(LOCK_FILE).display()
        )),
    })?;
    if let Some(e) = lock.pid_not_written() {
        tracing::warn!(
            "{}: this process's ID could not be written there ({e}); the spool is locked all \
             the same, and a second postern or `postern queue` finds this one through the \
             kernel",
            dir.join(LOCK_FILE).display()
        );
    }
    Ok(lock)
}

/// [`start_with`] on a spool whose lock the caller already holds (from [`lock_spool`]); the
/// server keeps it until its cores have stopped. `stop` is the flag its cores stop by: the
/// caller's, so that a stop asked for while they start (a signal) is theirs from the first.
pub fn start_locked(
    settings: Settings,
    delivery: Option<DeliveryFactory>,
    spool_lock: DirLock,
    stop: Arc<StopFlag>,
) -> Result<Running, StartError> {
    // A move to fewer cores cut off by a crash is finished or undone by
    // `postern_spool::fold_cores`, before any core writes: writing first would put new mail
    // into segments the undo deletes.
    if postern_spool::fold_pending(&settings.spool_dir) {
        return Err(StartError::Spool(format!(
            "a move of the queue to fewer cores was cut off in {} (.fold-journal): \
             `postern serve` finishes it at start",
            settings.spool_dir.display()
        )));
    }
    let settings = Arc::new(settings);
    let (tls_config, server_cert) = match &settings.tls {
        Some(files) => {
            let (config, cert) =
                tls::server_config(&files.cert, &files.key, Some(&settings.hostname))?;
            (Some(config), Some(cert))
        }
        None => (None, None),
    };
    let mut placeholders = Vec::new();
    let mut listen = Vec::new();
    let mut listen_tls = Vec::new();
    for (addrs, out) in [
        (&settings.listen, &mut listen),
        (&settings.listen_tls, &mut listen_tls),
    ] {
        for &addr in addrs {
            let (s, local) = reserve(addr)?;
            placeholders.push(s);
            out.push(local);
        }
    }
    let proto = Arc::new(ServerConfig {
        hostname: settings.hostname.clone(),
        max_message_size: settings.max_message_size,
        max_recipients: settings.max_recipients,
        max_junk_commands: match settings.max_junk_commands {
            0 => u32::MAX,
            n => n,
        },
        bare_newline: settings.bare_newline,
        // An envelope whose START record would not fit one spool segment gets 452 4.5.3 at
        // the RCPT that would make it so, not 452 4.3.1 at DATA for good.
        max_envelope_bytes: postern_spool::envelope_room(settings.spool_segment_size),
        stored_bytes_per_recipient: postern_spool::START_PER_RECIPIENT,
        ..ServerConfig::default()
    });
    let relay = RelayPolicy::new(
        &settings.accept_domains,
        &settings.relay_networks,
        &settings.hostname,
    );
    let limits = ConnectionLimits::new(
        settings.max_connections,
        settings.max_connections_per_ip,
        settings.ipv6_client_prefix,
    );
    let metrics_listener = settings.metrics.map(metrics_http::bind).transpose()?;
    let registry = Registry::default();
    registry.set_spool_damage(settings.spool_damage_found);
    let deletions = Arc::new(Deletions::default());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), StartError>>();
    let mut threads = Vec::new();
    let mut beats = Vec::new();
    // Each core writes its own count as it takes a message: a cache line each.
    let held: Arc<[crossbeam::utils::CachePadded<AtomicU64>]> = (0..settings.cores.max(1))
        .map(|_| crossbeam::utils::CachePadded::new(AtomicU64::new(crate::core::NOT_COUNTED)))
        .collect();
    // Core N runs on the Nth CPU the process may use (as `taskset`, a cpuset cgroup or
    // systemd's AllowedCPUs= leave it), not on CPU N, which may be another's or refused.
    // Under a CPU quota below that set (a container's CPU limit without a cpuset) the cores
    // are left to the kernel: pinned, every such process would share the first CPUs.
    let allowed = allowed_cpus();
    let mut pin = settings.cores <= cpus && cpus == allowed.len();
    // Pinning reads the CPU topology from sysfs (glommio); without it (a chroot or a
    // container with no /sys) the cores are left to the kernel rather than not started.
    if pin {
        if let Err(e) = CpuSet::online() {
            tracing::warn!(
                "cannot read the CPU topology ({e}; is /sys mounted?): the cores are not \
                 pinned to CPUs"
            );
            pin = false;
        }
    }
    for id in 0..settings.cores.max(1) {
        let placement = match allowed.get(id) {
            Some(&cpu) if pin => Placement::Fixed(cpu),
            _ => Placement::Unbound,
        };
        let builder = LocalExecutorBuilder::new(placement.clone())
            .name(&format!("postern-core-{id}"))
            .io_memory(IO_MEMORY)
            .blocking_thread_pool_placement(blocking_pool(&placement));
        let ctx = CoreInit {
            id,
            settings: settings.clone(),
            proto: proto.clone(),
            relay: relay.clone(),
            tls: tls_config.clone().map(futures_rustls::TlsAcceptor::from),
            limits: limits.clone(),
            published: registry.slot(),
            stop: stop.clone(),
            deletions: deletions.clone(),
            listen: listen.clone(),
            listen_tls: listen_tls.clone(),
            delivery: delivery.clone(),
            beat: Arc::default(),
            held: held.clone(),
        };
        beats.push(ctx.beat.clone());
        let ready = ready_tx.clone();
        let handle = match builder.spawn(move || core_main(ctx, ready)) {
            Ok(handle) => handle,
            Err(e) => {
                let e = StartError::Executor(executor_advice(&e.to_string()));
                return Err(abandon_start(&stop, threads, e));
            }
        };
        let stop_all = stop.clone();
        let failed = ready_tx.clone();
        let watcher = std::thread::Builder::new().name(format!("postern-join-{id}"));
        let joiner = watcher.spawn(move || {
            // A core that fails leaves its deliveries and its spool unserved: the whole
            // server stops (the others gracefully), for its supervisor to start it again.
            // One that fails before it is ready (an executor glommio could not make) says
            // why to the start, which otherwise only sees it gone.
            match handle.join() {
                Ok(clean) => clean,
                Err(e) => {
                    let advice = executor_advice(&e.to_string());
                    let _ = failed.send(Err(StartError::Executor(advice)));
                    stop_all.stop();
                    false
                }
            }
        });
        match joiner {
            Ok(joiner) => threads.push(joiner),
            Err(e) => {
                // The core's thread, whose handle went with the closure, stops with the others.
                let e = StartError::Executor(executor_advice(&e.to_string()));
                return Err(abandon_start(&stop, threads, e));
            }
        }
    }
    drop(ready_tx);
    for _ in 0..settings.cores.max(1) {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(abandon_start(&stop, threads, e)),
            Err(_) => {
                let e = StartError::Executor(executor_advice("an executor exited during start-up"));
                return Err(abandon_start(&stop, threads, e));
            }
        }
    }
    drop(placeholders);
    if let Err(e) = watchdog::spawn(beats, registry.stalls()) {
        let e = StartError::Executor(format!("cannot start the cores' watchdog: {e}"));
        return Err(abandon_start(&stop, threads, e));
    }
    let metrics = match metrics_listener {
        Some(listener) => match metrics_http::start(listener, registry, stop.clone()) {
            Ok(local) => Some(local),
            Err(e) => return Err(abandon_start(&stop, threads, e)),
        },
        None => None,
    };
    Ok(Running {
        listen,
        listen_tls,
        metrics,
        stop,
        deletions,
        server_cert,
        threads,
        _spool_lock: spool_lock,
    })
}

/// A start that fails once some cores run: they stop as on SIGTERM (a client already taken
/// finishes its transaction or gets `421`, and what they accepted is synced) before the error
/// is handed back, so the process does not exit under them.
fn abandon_start(
    stop: &StopFlag,
    threads: Vec<std::thread::JoinHandle<bool>>,
    e: StartError,
) -> StartError {
    stop.stop();
    for t in threads {
        let _ = t.join();
    }
    e
}

/// A core's blocking pool: two threads where the core runs, so that its group commit's sync
/// runs beside the making of a segment or the deletion of freed ones rather than behind it.
fn blocking_pool(core: &Placement) -> PoolPlacement {
    const THREADS: usize = 2;
    match core {
        Placement::Fixed(cpu) => match CpuSet::online() {
            Ok(set) => PoolPlacement::Fenced(THREADS, set.filter(|l| l.cpu == *cpu)),
            Err(_) => PoolPlacement::Unbound(THREADS),
        },
        _ => PoolPlacement::Unbound(THREADS),
    }
}

/// The CPUs this process may run on, in order (empty when the mask cannot be read).
fn allowed_cpus() -> Vec<usize> {
    use rustix::thread::{sched_getaffinity, CpuSet as Mask};
    sched_getaffinity(None).map_or_else(
        |_| Vec::new(),
        |mask| (0..Mask::MAX_CPU).filter(|&cpu| mask.is_set(cpu)).collect(),
    )
}

/// The last panic's message (see [`note_panic`]).
static LAST_PANIC: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

/// Keeps a panic's message, which the program's panic hook hands over: glommio reports an
/// executor whose start panicked as "thread panicked", without the cause (a thread of its
/// blocking pool that could not be made, say), which the start's advice then looks at.
pub fn note_panic(message: &str) {
    if let Ok(mut last) = LAST_PANIC.lock() {
        message.clone_into(&mut last);
    }
}

fn executor_advice(cause: &str) -> String {
    let panicked = LAST_PANIC.lock().map(|m| m.clone()).unwrap_or_default();
    let thread_limit = |text: &str| {
        text.contains("os error 11") || text.contains("Resource temporarily unavailable")
    };
    // EAGAIN from clone: a thread could not be made (ENOMEM and EPERM are the rings'), here
    // or in a core's start.
    if thread_limit(cause) || (cause.contains("panicked") && thread_limit(&panicked)) {
        return format!(
            "cannot start a thread for a core ({cause}): a limit on tasks stops it; postern \
             needs about four threads per core (raise TasksMax= in the systemd unit, a \
             container's pids limit, or `ulimit -u`; or give fewer --cores)"
        );
    }
    // A panic in postern's own code (the note says where): a bug, which no setting of the
    // system's mends; the line before this one gave it.
    if cause.contains("panicked") && panicked.contains("crates/postern") {
        return format!(
            "a core failed as it started ({panicked}): a bug in postern, not a setting of this \
             system's (the line above has it; please report it)"
        );
    }
    format!(
        "cannot start a glommio executor ({cause}). postern needs io_uring (Linux 5.8 or later, \
         not disabled by kernel.io_uring_disabled or a seccomp profile) and locked memory for \
         its rings: the memlock limit here is {}; raise it with `ulimit -l unlimited` or \
         LimitMEMLOCK=infinity in the systemd unit",
        memlock_limit_text()
    )
}

/// This process's locked-memory limit, for advice on io_uring's rings: `8 KiB`, or
/// `unlimited or unknown`.
pub fn memlock_limit_text() -> String {
    memlock_limit().map_or("unlimited or unknown".to_owned(), |l| {
        format!("{} KiB", l / 1024)
    })
}

/// The least locked memory glommio starts an executor with (its rings' check, whatever the
/// process's privileges).
pub const MIN_MEMLOCK: u64 = 512 * 1024;

/// The soft RLIMIT_MEMLOCK in bytes, from /proc (None when unlimited or unknown).
pub fn memlock_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

struct CoreInit {
    id: usize,
    settings: Arc<Settings>,
    proto: Arc<ServerConfig>,
    relay: RelayPolicy,
    tls: Option<futures_rustls::TlsAcceptor>,
    limits: Arc<ConnectionLimits>,
    published: Arc<std::sync::Mutex<crate::metrics::CoreMetrics>>,
    stop: Arc<StopFlag>,
    deletions: Arc<Deletions>,
    listen: Vec<SocketAddr>,
    listen_tls: Vec<SocketAddr>,
    delivery: Option<DeliveryFactory>,
    /// This core's heartbeat, for the watchdog.
    beat: Arc<watchdog::Beat>,
    /// With `--hold`: the messages each core keeps.
    held: Arc<[crossbeam::utils::CachePadded<AtomicU64>]>,
}

/// Runs one core until it stops; false when it could not start, or a sync failed during the
/// stop (its last one or one of the group commit).
async fn core_main(init: CoreInit, ready: mpsc::Sender<Result<(), StartError>>) -> bool {
    let _ends = watchdog::EndsBeat(init.beat.clone());
    // A core that fails as it starts (a bug), for the test of what the start says then:
    // debug builds only, never a release.
    #[cfg(debug_assertions)]
    if std::env::var("POSTERN_DEBUG_FAIL_CORE").is_ok_and(|v| v == format!("{}:start", init.id)) {
        panic!("POSTERN_DEBUG_FAIL_CORE: this core fails as it starts");
    }
    glommio::spawn_local(heartbeat(init.beat.clone())).detach();
    let store = match CoreStore::open(
        &init.settings.spool_dir,
        init.id,
        init.settings.spool_segment_size,
        init.settings.cores,
    ) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(e));
            return false;
        }
    };
    if init.delivery.is_none() {
        store.hold_mail();
    }
    let mut listeners = Vec::new();
    for (addrs, implicit_tls) in [(&init.listen, false), (&init.listen_tls, true)] {
        for &addr in addrs {
            match Listener::bind(addr) {
                Ok(l) => listeners.push((l, implicit_tls)),
                Err(source) => {
                    let _ = ready.send(Err(StartError::Bind { addr, source }));
                    return false;
                }
            }
        }
    }
    let core = Rc::new(Core {
        id: init.id,
        settings: init.settings,
        proto: init.proto,
        relay: init.relay,
        tls: init.tls,
        limits: init.limits,
        metrics: Default::default(),
        published: init.published,
        store,
        stopping: Default::default(),
        stop_flag: init.stop.clone(),
        deletions: init.deletions.clone(),
        refusals_logged: Default::default(),
        stop_event: Default::default(),
        grace_over: Default::default(),
        sessions: Default::default(),
        lingering: Default::default(),
        refusals_lingering: Default::default(),
        session_ended: Default::default(),
        delivery: Default::default(),
        spool_full: Default::default(),
        queue_full: Default::default(),
        held: init.held,
        refusing: Default::default(),
        spool_error_log: Default::default(),
        tls_failure_log: Default::default(),
    });
    core.count_held();
    let committer =
        glommio::spawn_local(crate::store::group_commit(core.clone(), init.beat.clone()));
    let unlinker = glommio::spawn_local(crate::store::unlink_freed(core.clone()));
    // A core that comes up after a stop was asked for (a start given up while it opened its
    // spool) starts no delivery: the other cores' stops may not wait for it.
    if let Some(factory) = init.delivery.as_ref().filter(|_| !init.stop.is_stopping()) {
        let d = factory(CoreHandle(core.clone()));
        *core.delivery.borrow_mut() = Some(d);
    }
    core.publish_first();
    let _ = ready.send(Ok(()));
    // Dropped now, not at the core's end: should another core fail before it reports, the
    // start-up sees every sender gone and gives up, instead of waiting on this one.
    drop(ready);
    // A core that fails (a bug), for the tests of what the others do then: debug builds
    // only, never a release.
    #[cfg(debug_assertions)]
    if std::env::var("POSTERN_DEBUG_FAIL_CORE").is_ok_and(|v| v == core.id.to_string()) {
        glommio::spawn_local(async { panic!("POSTERN_DEBUG_FAIL_CORE: this core fails") }).detach();
    }
    crate::store::ensure_spare(&core);
    let watcher = glommio::spawn_local(watch(core.clone(), init.stop));
    let acceptors: Vec<_> = listeners
        .into_iter()
        .map(|(l, implicit_tls)| glommio::spawn_local(accept_loop(core.clone(), l, implicit_tls)))
        .collect();
    core.stopped().await;
    // A sync that fails from here on may have lost what the stop records (delivery outcomes,
    // say), as the last one may: the exit status says so.
    let failed_before_stop = core.store.failed_syncs();
    for a in acceptors {
        a.await;
    }
    // Let sessions in the middle of a transaction finish, within the grace period.
    let drained = || async {
        while core.sessions.get() > 0 {
            let l = core.session_ended.listen();
            if core.sessions.get() == 0 {
                break;
            }
            l.await;
        }
    };
    // A second stop signal ends the grace at once; the signal thread cannot wake this core, so
    // it looks.
    let hurried = || async {
        while !core.stop_flag.is_hurried() {
            glommio::timer::sleep(HURRY_LOOK_EVERY).await;
        }
    };
    let grace_ends = std::time::Instant::now() + core.settings.shutdown_grace;
    let grace = glommio::timer::sleep(core.settings.shutdown_grace);
    futures_lite::future::or(drained(), futures_lite::future::or(grace, hurried())).await;
    if core.sessions.get() > 0 {
        // Connections whose session is over, reading what their clients still send before
        // they close, are no sessions losing mail.
        let open = core.sessions.get().saturating_sub(core.lingering.get());
        if open > 0 {
            tracing::warn!(
                core = core.id,
                sessions = open,
                "the stop's grace is over with sessions still open: they are told 421 and \
                 closed; a message still being sent is not stored (its client still has it), \
                 one whose end of data came is answered by its sync (250 once it is on disk)"
            );
        }
        // Sessions still inside a body: they answer 421 and close (RFC 5321 3.8), and
        // what they had is not stored; a moment for those writes.
        core.grace_over.set(true);
        core.stop_event.notify(usize::MAX);
        // The writes, then the moment each session reads what its client still sends after
        // its side is closed (so that the 421 is not lost to a reset).
        let last = glommio::timer::sleep(GRACE_OVER_WRITES + session::CLOSING_WRITE);
        futures_lite::future::or(drained(), last).await;
    }
    // Deliveries in flight get the rest of the grace to have their outcomes recorded, so
    // that the next run does not send them again.
    let delivery = core.delivery.borrow().clone();
    if let Some(delivery) = delivery {
        let rest = grace_ends.saturating_duration_since(std::time::Instant::now());
        let wound_down = futures_lite::future::or(
            async {
                delivery.wind_down().await;
                true
            },
            async {
                futures_lite::future::or(glommio::timer::sleep(rest), hurried()).await;
                false
            },
        )
        .await;
        // The wait is for every core's deliveries (and for every core to get there), so
        // one core says what is left for all.
        let in_flight = delivery.in_flight();
        if !wound_down && in_flight > 0 && core.id == 0 {
            tracing::warn!(
                in_flight,
                "the stop's grace is over with deliveries in flight: their messages stay \
                 queued, and one a next hop had already taken goes to it again after the \
                 next start"
            );
        }
    }
    let synced = core.store.shutdown(&init.beat).await;
    let failed_in_stop = core.store.failed_syncs() - failed_before_stop;
    if let Err(e) = &synced {
        // Not rate-limited as other spool errors are: it is the core's last word. Every
        // message acknowledged was durable before its 250; what this sync held is what was
        // recorded after the one before (delivery outcomes), and a delivery whose outcome
        // is lost is made again after the next start.
        core.metrics.borrow_mut().spool_errors += 1;
        tracing::error!(
            core = core.id,
            spool = %core.settings.spool_dir.display(),
            "the last sync before the stop failed: {e}; outcomes recorded since the sync \
             before may be lost, and their deliveries made again after the next start"
        );
    } else if failed_in_stop > 0 {
        // The group commit's own syncs during the stop (each already logged as a spool
        // error): what they held is lost in the same way, though the last one had nothing
        // left to write.
        tracing::error!(
            core = core.id,
            spool = %core.settings.spool_dir.display(),
            failed = failed_in_stop,
            "a sync during the stop failed; outcomes recorded since the sync before it may \
             be lost, and their deliveries made again after the next start"
        );
    }
    if core.sessions.get() > core.lingering.get() {
        // A session that was waiting for its message's sync (a slow disk) has it now: it
        // says its 250 (then 421) before the core ends, rather than leave a stored message
        // unacknowledged, which its client would send again (or its 451, when the sync in
        // flight never ended and no last one was made). A second stop signal ends it.
        let last = glommio::timer::sleep(GRACE_OVER_WRITES + session::CLOSING_WRITE);
        futures_lite::future::or(drained(), futures_lite::future::or(last, hurried())).await;
    }
    drop(committer);
    drop(unlinker);
    drop(watcher);
    core.publish();
    synced.is_ok() && failed_in_stop == 0
}

/// Ticks the core's heartbeat from a timer for as long as the core runs (see `watchdog`).
async fn heartbeat(beat: Arc<watchdog::Beat>) {
    beat.started();
    loop {
        glommio::timer::sleep(watchdog::BEAT_EVERY).await;
        beat.beat();
    }
}

async fn accept_loop(core: Rc<Core>, listener: Listener, implicit_tls: bool) {
    // Checked at each turn too: under a backlog that never empties, or an accept error that
    // comes at once each time, the accept below is always ready first. The process-wide flag
    // as well as the core's own: the task that sets the latter runs only when this one
    // yields.
    // Refusals made since this loop last gave way: each holds its descriptor until its task
    // runs (see below).
    let mut refused = 0usize;
    while !core.stop_asked() {
        let mut accept = std::pin::pin!(listener.accept());
        let stop = async {
            core.stopped().await;
            None
        };
        let accepted = async { Some(accept.as_mut().await) };
        let Some(accepted) = futures_lite::future::or(accepted, stop).await else {
            // The accept in flight is not dropped as it is (see `listener`): what the kernel
            // has completed is taken first, then the listener shut, which ends the accept,
            // with a connection that came in between or an error.
            drain(&core, &listener, implicit_tls);
            let ended = futures_lite::future::or(async { Some(accept.as_mut().await) }, async {
                glommio::timer::sleep(ACCEPT_END_WAIT).await;
                None
            });
            if let Some(Ok(stream)) = ended.await {
                admit(&core, stream, implicit_tls);
            }
            return;
        };
        let stream = match accepted {
            Ok(stream) => stream,
            // One connection's trouble (it was reset while queued, or the network errors
            // accept(2) passes on for the new connection): the next one is taken at once.
            Err(e) if connection_error(&e) => {
                glommio::yield_if_needed().await;
                continue;
            }
            // EMFILE and friends: back off briefly instead of spinning.
            Err(_) => {
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // glommio's accept takes a connection already waiting without going through the
        // ring, so it never waits while the backlog has one: under a flood that keeps it
        // full this loop would hold the core, its sessions, timers and stop alike. It gives
        // way once the core's time slice is over, and after every few refusals: a refusal
        // answers from a task of its own, which runs only then, and until it does its
        // descriptor is held (a connect flood at the limit could gather thousands in a slice,
        // and take the descriptors the spool and delivery need).
        if !admit(&core, stream, implicit_tls) {
            refused += 1;
        }
        if refused >= REFUSALS_BEFORE_YIELD {
            refused = 0;
            futures_lite::future::yield_now().await;
        } else {
            glommio::yield_if_needed().await;
        }
    }
    drain(&core, &listener, implicit_tls);
}

/// Connections whose handshake the kernel has already completed would be reset when the
/// listener closes: they are taken and told that the server is stopping (421). Then the
/// listener takes no more.
/// Whether an accept's error is about the one connection it would have taken (accept(2):
/// the connection was reset while queued, or a network error on it that Linux passes on),
/// so that the next one can be taken at once, unlike a lack of descriptors or memory.
fn connection_error(e: &glommio::GlommioError<()>) -> bool {
    let os = match e {
        glommio::GlommioError::IoError(e) => e.raw_os_error(),
        glommio::GlommioError::EnhancedIoError { source, .. } => source.raw_os_error(),
        _ => None,
    };
    matches!(
        os,
        Some(
            libc::ECONNABORTED
                | libc::EINTR
                | libc::EPROTO
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
        )
    )
}

fn drain(core: &Rc<Core>, listener: &Listener, implicit_tls: bool) {
    for stream in listener.take_waiting(BACKLOG_DRAIN_MAX) {
        admit(core, stream, implicit_tls);
    }
    listener.stop_listening();
}

/// How long a stopping core waits for its accept in flight to end once its listener is shut
/// (at once, in practice); past it the accept is dropped as it is.
const ACCEPT_END_WAIT: Duration = Duration::from_secs(1);

// glommio's preemption timer stays at its 100 ms. A shorter one (500 us) gave a client that
// pipelines without pause its share of the core rather than 100 ms slices of it, but glommio
// 0.9 parks an executor whose timer fired before it ran anything, with tasks still runnable:
// with 500 us that happened at start-up under load, and the core slept until some I/O came.
// Such clients are held by the junk command limit instead (`--max-junk-commands`).

/// How often a core in its shutdown grace looks whether a second stop signal cut it short.
const HURRY_LOOK_EVERY: Duration = Duration::from_millis(50);

/// At most this many waiting connections are taken from a listener when the server stops:
/// the listeners' backlog of 1,024, which Linux lets hold one more.
const BACKLOG_DRAIN_MAX: usize = 1025;

/// Refused connections the accept loop takes before it lets their tasks answer them.
const REFUSALS_BEFORE_YIELD: usize = 32;

/// Starts a session for an accepted connection (true), or refuses it when over a limit.
fn admit(core: &Rc<Core>, stream: glommio::net::TcpStream, implicit_tls: bool) -> bool {
    let Ok(peer) = stream.peer_addr() else {
        // Reset by the client between the kernel's accept and this one: accepted all the
        // same, and counted, though no session is left to run.
        core.metrics.borrow_mut().connections += 1;
        return true;
    };
    // A load balancer's connection: counted in the total now, and as its client's once its
    // PROXY header has named the client.
    let from_proxy = core
        .settings
        .proxy_from
        .iter()
        .any(|n| n.contains(&peer.ip().to_canonical()));
    let admitted = if from_proxy {
        core.limits.admit_unknown()
    } else {
        core.limits.admit(peer.ip())
    };
    match admitted {
        Ok(permit) => {
            // Counted now, not when the task first runs: a stop waits for it either way.
            core.sessions.set(core.sessions.get() + 1);
            let core = core.clone();
            let task = async move {
                if from_proxy {
                    proxied(core, stream, peer, implicit_tls, permit).await;
                } else {
                    session::serve(core, stream, peer, None, implicit_tls, permit).await;
                }
            };
            glommio::spawn_local(task).detach();
            true
        }
        Err(refusal) if from_proxy => {
            // A load balancer's: its header first, which the 421 must not be read as an
            // answer to (nor a TLS handshake begin on); counted as refused once it is read.
            // A few at a time per core: past that it is closed at once, without a reply (a
            // balancer that sends its header late would otherwise hold a descriptor per
            // refusal for the whole wait).
            let Some(slot) = RefusalSlot::take(&PROXY_REFUSALS, PROXY_REFUSALS_MAX) else {
                core.metrics.borrow_mut().connections_refused += 1;
                drop(stream);
                return false;
            };
            let core = core.clone();
            let task = async move {
                let mut stream = stream;
                let named = proxy_header(&core, &mut stream, peer, REFUSAL_HEADER_WAIT).await;
                drop(slot);
                if named.is_none() {
                    let _ = futures_lite::io::AsyncWriteExt::close(&mut stream).await;
                    return;
                }
                count_refusal(&core);
                refuse(core, stream, refusal, implicit_tls).await;
            };
            glommio::spawn_local(task).detach();
            false
        }
        Err(refusal) => {
            count_refusal(core);
            glommio::spawn_local(refuse(core.clone(), stream, refusal, implicit_tls)).detach();
            false
        }
    }
}

/// Over-limit clients of the implicit-TLS port that one core answers at a time. Their `421`
/// costs a TLS handshake each; past this many, more are closed without a reply, so that a
/// flood of connections does not also become a flood of handshakes. Each holds a descriptor
/// for up to 20 s: the open-file budget counts them.
pub const TLS_REFUSALS_MAX: usize = 16;

/// Longest handshake and write for an over-limit client of the implicit-TLS port.
const TLS_REFUSAL_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection from a load balancer (`--proxy-from`): its PROXY header is read, then its
/// client is admitted under the per-client limit, and served as that client. A connection
/// without a valid header in time is closed without a word (the load balancer logs it; an
/// SMTP reply would reach a client that is not ours to talk to, or be read as its data).
async fn proxied(
    core: Rc<Core>,
    mut stream: glommio::net::TcpStream,
    peer: SocketAddr,
    implicit_tls: bool,
    mut permit: crate::limits::Permit,
) {
    let wait = crate::proxy::HEADER_TIMEOUT
        .min(core.settings.command_timeout)
        .max(crate::proxy::HEADER_TIMEOUT_LEAST);
    let served = proxy_header(&core, &mut stream, peer, wait).await;
    let Some((client, reached)) = served else {
        let _ = futures_lite::io::AsyncWriteExt::close(&mut stream).await;
        drop(permit);
        core.sessions.set(core.sessions.get() - 1);
        core.session_ended.notify(usize::MAX);
        return;
    };
    if let Err(refusal) = permit.attribute(client.ip()) {
        drop(permit);
        core.sessions.set(core.sessions.get() - 1);
        core.session_ended.notify(usize::MAX);
        count_refusal(&core);
        refuse(core, stream, refusal, implicit_tls).await;
        return;
    }
    session::serve(core, stream, client, reached, implicit_tls, permit).await;
}

/// Reads the PROXY header of a connection from the load balancer at `peer`, within `wait`
/// (and at most [`HEADER_DURING_STOP`] once the server stops): the client it names and the
/// address that client reached, where the header names them. None (logged and counted)
/// when no valid header came.
async fn proxy_header(
    core: &Core,
    stream: &mut glommio::net::TcpStream,
    peer: SocketAddr,
    wait: Duration,
) -> Option<(SocketAddr, Option<SocketAddr>)> {
    use crate::proxy::Proxied;
    let header = futures_lite::future::or(
        async { Some(crate::proxy::read_header(stream, Instant::now() + wait).await) },
        async {
            core.stopped().await;
            glommio::timer::sleep(HEADER_DURING_STOP).await;
            None
        },
    )
    .await;
    let header = header.unwrap_or_else(|| Err("no PROXY header before the stop".into()));
    match header {
        // A balancer's plain TCP health check: nothing was asked.
        Err(e) if e == crate::proxy::CLOSED_BEFORE_A_BYTE => {
            tracing::debug!(load_balancer = %peer, "connection closed before a byte");
            None
        }
        Err(e) => {
            core.metrics.borrow_mut().proxy_header_failures += 1;
            tracing::info!(load_balancer = %peer, "connection closed: {e}");
            None
        }
        Ok(Proxied::Local) => Some((peer, None)),
        // Someone the balancer cannot name: not the balancer, whose address may be a relay
        // network's (loopback, for one on the same host), but the unspecified address, in no
        // relay network but everyone's (0.0.0.0/0, which start-up warns about).
        Ok(Proxied::Unknown) => Some((SocketAddr::from(([0, 0, 0, 0], 0)), None)),
        Ok(Proxied::Client {
            source,
            destination,
        }) => Some((source, Some(destination))),
    }
}

/// Counts a connection refused at once, and its 421 on a plain listener (a reply like any
/// other; on the implicit-TLS port it is counted once it has gone out inside TLS).
/// Counts a connection refused at a limit (its 421 is counted once written, in `refuse`).
fn count_refusal(core: &Core) {
    core.metrics.borrow_mut().connections_refused += 1;
}

/// Over-limit connections from load balancers that one core waits on for their PROXY header
/// at a time (see `admit`).
const PROXY_REFUSALS_MAX: usize = 64;

thread_local! {
    static PROXY_REFUSALS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// What a connection from a load balancer still has for its PROXY header once the server
/// stops: one already on its way is read, and its client told 421.
const HEADER_DURING_STOP: Duration = Duration::from_secs(1);

/// What an over-limit connection from a load balancer has for its PROXY header: its 421 must
/// not go out before the header is read (on the implicit-TLS port it goes inside TLS, whose
/// handshake follows the header), and a refusal is not to hold a descriptor long.
const REFUSAL_HEADER_WAIT: Duration = Duration::from_secs(3);

thread_local! {
    /// This core's over-limit implicit-TLS clients being answered now.
    static TLS_REFUSALS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Tells an over-limit client so at once rather than leaving it hanging: in cleartext on a
/// plain listener, inside TLS on the implicit-TLS port (RFC 8314 3.3: a client there speaks
/// TLS first, and would not understand a cleartext reply), a few at a time per core.
async fn refuse(
    core: Rc<Core>,
    mut stream: glommio::net::TcpStream,
    refusal: Refusal,
    implicit_tls: bool,
) {
    use futures_lite::io::AsyncWriteExt;
    // "421 <domain> ..." (RFC 5321 4.2.3), as every reply that closes a session.
    let host = &core.settings.hostname;
    let text = match refusal {
        Refusal::Total => format!("421 4.3.2 {host} Too many connections, try again later\r\n"),
        Refusal::PerIp => {
            format!("421 4.7.0 {host} Too many connections from your address, try again later\r\n")
        }
    };
    if !implicit_tls {
        // Our side closed, what the client still sends (an EHLO pipelined behind its
        // connect, a QUIT) is read as a session's end does: closing with input unread would
        // send a reset, which can take the 421 with it.
        let until = Instant::now() + session::CLOSING_WRITE;
        let wrote = within(session::CLOSING_WRITE, async {
            stream.write_all(text.as_bytes()).await.is_ok() && stream.close().await.is_ok()
        })
        .await;
        // Counted as sent once written, as on the implicit-TLS port (a client that reset
        // its connection at once gets none).
        if wrote == Some(true) {
            core.metrics.borrow_mut().count_replies(text.as_bytes());
        }
        if wrote == Some(true) && !core.stopping.get() {
            session::linger(&core, &core.refusals_lingering, &mut stream, until).await;
        }
        crate::conn::drop_input_already_here(&stream);
        return;
    }
    // No handshakes for refusals once the server stops: it would not wait for them.
    let (Some(acceptor), false) = (core.tls.clone(), core.stopping.get()) else {
        let _ = stream.close().await;
        return;
    };
    let Some(_slot) = RefusalSlot::take(&TLS_REFUSALS, TLS_REFUSALS_MAX) else {
        let _ = stream.close().await;
        return;
    };
    let limit = TLS_REFUSAL_TIMEOUT.min(core.settings.command_timeout);
    // The handshake is counted once, completed or failed, as a session's is (and not at all
    // when the client closes before its first byte).
    let handshake = async {
        if crate::conn::closed_before_a_byte(&stream).await {
            return None;
        }
        Some(acceptor.accept(stream).await.ok())
    };
    let mut tls = match within(limit, handshake).await {
        // Closed before a byte.
        Some(None) => return,
        Some(Some(Some(tls))) => tls,
        // Failed, or timed out.
        Some(Some(None)) | None => {
            core.metrics.borrow_mut().tls_failures += 1;
            return;
        }
    };
    core.metrics.borrow_mut().tls_handshakes += 1;
    let reply = async {
        if tls.write_all(text.as_bytes()).await.is_ok() && tls.flush().await.is_ok() {
            core.metrics.borrow_mut().count_replies(text.as_bytes());
        }
        // close_notify, then the connection.
        let _ = tls.close().await;
    };
    let _ = within(limit, reply).await;
}

/// A place among this core's refused connections of one kind being handled at a time (the
/// count in `taken`, at most `max`), given back when dropped.
struct RefusalSlot(&'static std::thread::LocalKey<std::cell::Cell<usize>>);

impl RefusalSlot {
    fn take(
        taken: &'static std::thread::LocalKey<std::cell::Cell<usize>>,
        max: usize,
    ) -> Option<RefusalSlot> {
        let now = taken.get();
        (now < max).then(|| {
            taken.set(now + 1);
            RefusalSlot(taken)
        })
    }
}

impl Drop for RefusalSlot {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// `fut`'s output, or `None` when `limit` passes first.
pub(crate) async fn within<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = T>,
) -> Option<T> {
    let timeout = async {
        glommio::timer::sleep(limit).await;
        None
    };
    futures_lite::future::or(async { Some(fut.await) }, timeout).await
}

/// The open-file limit after [`raise_open_file_limit`] (`None`: unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFileLimit {
    /// The soft limit before.
    pub was: Option<u64>,
    /// The soft limit now: the hard limit.
    pub now: Option<u64>,
}

/// Raises the soft RLIMIT_NOFILE to the hard limit: every connection is a descriptor, and a
/// soft limit of 1,024 (the usual default) would leave connections past it waiting in the
/// kernel's queue. Servers that hold many connections do the same.
pub fn raise_open_file_limit() -> std::io::Result<OpenFileLimit> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    let was = lim.current;
    if lim.current != lim.maximum {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        )?;
    }
    Ok(OpenFileLimit {
        was,
        now: lim.maximum,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn an_accept_error_of_one_connection_is_told_from_a_lack_of_resources() {
        let err =
            |n: i32| glommio::GlommioError::<()>::IoError(std::io::Error::from_raw_os_error(n));
        for n in [
            libc::ECONNABORTED,
            libc::EPROTO,
            libc::ENETUNREACH,
            libc::EHOSTUNREACH,
        ] {
            assert!(connection_error(&err(n)), "{n}");
        }
        for n in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(!connection_error(&err(n)), "{n}");
        }
    }

    #[test]
    fn listeners_of_the_other_family_meet_only_through_ipv6_that_stands_for_ipv4() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let meets = |ours: &str, other: &str| listens_over(ip(ours), ip(other), true);
        // One family: the same address, or a wildcard on either side.
        assert!(meets("127.0.0.1", "127.0.0.1"));
        assert!(meets("0.0.0.0", "192.0.2.1"));
        assert!(meets("192.0.2.1", "0.0.0.0"));
        assert!(!meets("127.0.0.1", "127.0.0.2"));
        assert!(meets("::", "::1"));
        assert!(!meets("::1", "2001:db8::1"));
        // The IPv4 wildcard and an IPv6 address: the kernel takes both binds.
        assert!(!meets("0.0.0.0", "::1"));
        assert!(!meets("0.0.0.0", "2001:db8::1"));
        assert!(!meets("::1", "0.0.0.0"));
        assert!(!meets("2001:db8::1", "127.0.0.1"));
        // The IPv6 wildcard (dual-stack) and IPv4-mapped addresses stand for IPv4 ones.
        assert!(meets("0.0.0.0", "::"));
        assert!(meets("127.0.0.1", "::"));
        assert!(meets("::", "127.0.0.1"));
        assert!(meets("127.0.0.1", "::ffff:127.0.0.1"));
        assert!(meets("0.0.0.0", "::ffff:127.0.0.1"));
        assert!(!meets("127.0.0.2", "::ffff:127.0.0.1"));
        assert!(meets("::ffff:127.0.0.1", "0.0.0.0"));
        // With net.ipv6.bindv6only set, the IPv6 wildcard is IPv6 only: the kernel takes an
        // IPv4 bind beside it.
        let meets_v6only = |ours: &str, other: &str| listens_over(ip(ours), ip(other), false);
        assert!(!meets_v6only("0.0.0.0", "::"));
        assert!(!meets_v6only("::", "127.0.0.1"));
        assert!(meets_v6only("::", "::1"));
        assert!(meets_v6only("127.0.0.1", "::ffff:127.0.0.1"));
    }

    #[test]
    fn a_cut_off_move_to_fewer_cores_is_never_written_over() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        std::fs::create_dir_all(&spool).unwrap();
        std::fs::write(spool.join(".fold-journal"), "").unwrap();
        assert!(postern_spool::fold_pending(&spool));
        let settings = Settings {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
            cores: 1,
            spool_dir: spool,
            ..Settings::default()
        };
        match start(settings) {
            Err(StartError::Spool(why)) => assert!(why.contains(".fold-journal"), "{why}"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("started beside a cut-off move"),
        }
    }
}
