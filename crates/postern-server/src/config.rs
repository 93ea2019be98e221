//! The settings of a running server, already parsed and checked by the binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use postern_proto::BareNewlinePolicy;

use crate::relay::RelayPolicy;

/// Certificate and key files for STARTTLS and implicit TLS.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Everything the server needs to run.
#[derive(Clone, Debug)]
pub struct Settings {
    /// SMTP listeners (STARTTLS offered when TLS is configured).
    pub listen: Vec<SocketAddr>,
    /// Implicit-TLS listeners (RFC 8314).
    pub listen_tls: Vec<SocketAddr>,
    /// Executors, one per core.
    pub cores: usize,
    /// Spool directory.
    pub spool_dir: PathBuf,
    /// Size of each spool segment file, reserved when it is created.
    pub spool_segment_size: u64,
    /// Spool bytes (all cores) at which MAIL gets 452 4.3.1 until the spool falls to 80 % of
    /// it; 0 for no mark (a full disk still gives 452).
    pub spool_high_water: u64,
    /// Our name in the banner, EHLO and Received headers.
    pub hostname: String,
    /// Domains accepted from anyone.
    pub accept_domains: Vec<String>,
    /// Networks allowed to relay to any domain.
    pub relay_networks: Vec<IpNet>,
    /// Largest message, advertised in SIZE.
    pub max_message_size: u64,
    /// Recipients per transaction.
    pub max_recipients: usize,
    /// Commands that move no mail forward between messages accepted before each one counts
    /// as an error; 0 for no limit.
    pub max_junk_commands: u32,
    /// Concurrent connections, all cores together.
    pub max_connections: usize,
    /// Concurrent connections from one client address.
    pub max_connections_per_ip: usize,
    /// Connections whose session is over, all cores together, that may still read and drop
    /// what their clients send before they close (so that a reset does not throw away the
    /// last reply): they are not counted under `max_connections`, so this comes out of the
    /// descriptors kept for the spool and delivery. Past it a connection closes at once.
    pub max_lingering: usize,
    /// IPv6 clients are counted per network of this many bits by `max_connections_per_ip`.
    pub ipv6_client_prefix: u8,
    /// Load balancers whose connections begin with a PROXY protocol header (version 1 or 2)
    /// naming the real client; a connection from one without it is closed.
    pub proxy_from: Vec<IpNet>,
    /// Longest wait for the next command or body bytes (RFC 5321 4.5.3.2).
    pub command_timeout: Duration,
    /// Longest session, whatever the client does.
    pub max_session_time: Duration,
    /// Longest wait for in-flight transactions at shutdown.
    pub shutdown_grace: Duration,
    /// How long a stop signal leaves the server taking mail with `/readyz` at 503 before it
    /// stops (for a load balancer to send new clients elsewhere first); zero for none.
    pub drain_time: Duration,
    /// TLS, when configured.
    pub tls: Option<TlsFiles>,
    /// Prometheus listener.
    pub metrics: Option<SocketAddr>,
    /// Bare CR and LF in DATA bodies.
    pub bare_newline: BareNewlinePolicy,
    /// With nothing delivering (`--hold`): the messages kept (all cores together) at which
    /// MAIL gets 452 4.3.1, and at which mail is taken again.
    pub held_queue_marks: Option<(u64, u64)>,
    /// Where mail to `<postmaster>` and `postmaster@<hostname>` goes; without it, `<postmaster>`
    /// becomes `postmaster@<hostname>` and is routed like any recipient.
    pub postmaster: Option<String>,
    /// Damaged records the spool's reading found at start-up (exported as a gauge).
    pub spool_damage_found: u64,
    /// Each group commit's writes and `fdatasync` on the core's own thread rather than its
    /// blocking pool (`--sync-on-core`): fewer thread switches, but a disk that hangs holds
    /// the whole core.
    pub sync_on_core: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 2525))],
            listen_tls: Vec::new(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            spool_dir: PathBuf::from("postern-spool"),
            spool_segment_size: 64 * 1024 * 1024,
            spool_high_water: 0,
            held_queue_marks: None,
            spool_damage_found: 0,
            sync_on_core: false,
            hostname: "localhost".into(),
            accept_domains: Vec::new(),
            relay_networks: RelayPolicy::loopback(),
            max_message_size: 50 * 1024 * 1024,
            max_recipients: 1000,
            max_junk_commands: postern_proto::limits::DEFAULT_MAX_JUNK_COMMANDS,
            max_connections: 20_000,
            max_connections_per_ip: 1000,
            max_lingering: 256,
            ipv6_client_prefix: 84,
            proxy_from: Vec::new(),
            command_timeout: Duration::from_secs(300),
            max_session_time: Duration::from_secs(3600),
            shutdown_grace: Duration::from_secs(30),
            drain_time: Duration::ZERO,
            tls: None,
            metrics: None,
            bare_newline: BareNewlinePolicy::Normalize,
            postmaster: None,
        }
    }
}
