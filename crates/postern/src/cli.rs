//! Command-line flags. Every flag of `postern serve` (and `postern queue --spool`) can also
//! come from `POSTERN_<NAME>` (for example `POSTERN_MAX_MESSAGE_SIZE=10M`); repeatable flags
//! take a comma-separated list there.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand};
use ipnet::IpNet;
use postern_proto::address::canonical_domain;
use postern_proto::BareNewlinePolicy;
use postern_queue::RetryPolicy;
use postern_relay::conn::Timeouts;
use postern_relay::route::{HostPort, Router};
use postern_relay::tls::TlsPolicy;
use postern_relay::RelayConfig;
use postern_server::{Settings, TlsFiles};

#[derive(Parser, Debug)]
#[command(
    name = "postern",
    version,
    about = "A thread-per-core, durable SMTP mail transfer agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Accept mail over SMTP, store it durably in the spool, and deliver it to its next hop.
    #[command(after_help = "Every flag can also be set in the environment as \
        POSTERN_<NAME> (--max-message-size: POSTERN_MAX_MESSAGE_SIZE=10M); a repeatable flag \
        takes a comma-separated list there. A flag on the command line wins over its variable.")]
    Serve(Box<Serve>),
    /// List the mail waiting in a spool (the server may be running; the spool is only read;
    /// --flush and --delete ask the server).
    Queue(Queue),
    /// Ask a running server whether it takes mail (its metrics listener's /readyz): exit 0
    /// when it does, 1 with a line saying why not (a container's health check).
    Ready(Ready),
}

/// `postern ready`.
#[derive(Args, Debug)]
pub(crate) struct Ready {
    /// The server's --metrics address; one on every address (0.0.0.0, ::) is asked on
    /// loopback.
    #[arg(long, env = "POSTERN_METRICS", default_value = "127.0.0.1:9325", value_parser = metrics_to_ask, allow_hyphen_values = true)]
    metrics: MetricsAddress,
    /// Longest wait for the connection and the answer (more than 0).
    #[arg(long, default_value = "5s", value_parser = wait_duration, allow_hyphen_values = true)]
    pub(crate) timeout: Duration,
}

impl Ready {
    /// Where to ask: None where the metrics listener is turned off (`none`).
    pub(crate) fn address(&self) -> Option<SocketAddr> {
        self.metrics.0.map(|mut a| {
            if a.ip().is_unspecified() {
                a.set_ip(match a {
                    SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            a
        })
    }
}

/// `postern queue`.
#[derive(Args, Debug)]
pub(crate) struct Queue {
    /// Spool directory, as given to `postern serve`.
    #[arg(long, env = "POSTERN_SPOOL", default_value = "./postern-spool", value_parser = path, allow_hyphen_values = true)]
    pub(crate) spool: PathBuf,
    /// One JSON object per message (one per line) instead of the table [default: off].
    #[arg(long)]
    pub(crate) json: bool,
    /// Instead of listing, ask the postern serving this spool to try its deferred mail now
    /// (it sends that process SIGUSR1) [default: off].
    #[arg(long, conflicts_with = "json")]
    pub(crate) flush: bool,
    /// Instead of listing, delete these queued messages (queue IDs, repeatable or comma
    /// separated; `-` reads more from standard input, separated by blanks, commas or lines,
    /// for a purge larger than a command line holds; up to 1,000,000 at once): the postern
    /// serving this spool records their recipients as failed, sends no report, and forgets
    /// them. Waits up to 10 s (and 1 ms more for each ID) for them to leave the queue
    /// [default: none].
    #[arg(long, value_name = "ID", value_delimiter = ',', value_parser = queue_id_arg,
          conflicts_with_all = ["json", "flush"])]
    pub(crate) delete: Vec<String>,
    /// Instead of listing, write this queued message to standard output as it is stored and
    /// will be relayed (postern's Received header first, then the message as the client sent
    /// it, CR LF line ends); on a terminal, control characters are written as escapes
    /// [default: none].
    #[arg(long, value_name = "ID", value_parser = shown_queue_id,
          conflicts_with_all = ["json", "flush", "delete"])]
    pub(crate) show: Option<String>,
}

/// What the command line asks for.
pub(crate) enum Job {
    /// Run the server.
    Serve(Box<Config>),
    /// List the queue.
    Queue(Queue),
    /// Ask a running server whether it is ready.
    Ready(Ready),
}

#[derive(Args, Debug)]
// `--cores -1` or `--relay-host -x` is a wrong value for that flag, not an unknown flag: the
// flags whose values are checked take a value starting with a hyphen (`--cores --hold` is
// refused as a number that is not one). So do the paths (--spool, the TLS files), which
// refuse one that begins with `-` (`--spool --hold`, `--spool -1`): `./-1` names such a
// file.
struct Serve {
    /// SMTP listen address (repeatable) [default: 127.0.0.1:2525, unless --listen-tls is
    /// given]; `none` for no cleartext listener, beside --listen-tls (where a unit's
    /// environment sets POSTERN_LISTEN).
    #[arg(long, env = "POSTERN_LISTEN", value_delimiter = ',', value_parser = listen_address, allow_hyphen_values = true)]
    listen: Vec<ListenAddress>,
    /// Implicit-TLS (RFC 8314) listen address (repeatable); needs --tls-cert and --tls-key
    /// [default: none].
    #[arg(long, env = "POSTERN_LISTEN_TLS", value_delimiter = ',', value_parser = socket_address, allow_hyphen_values = true)]
    listen_tls: Vec<SocketAddr>,
    /// Executors, one per core [default: all cores].
    #[arg(long, env = "POSTERN_CORES", value_parser = number::<usize>, allow_hyphen_values = true)]
    cores: Option<usize>,
    /// Spool directory.
    #[arg(long, env = "POSTERN_SPOOL", default_value = "./postern-spool", value_parser = path, allow_hyphen_values = true)]
    spool: PathBuf,
    /// Size of each spool segment file, reserved on disk when it is created (128k to 4G: a
    /// message's envelope is kept in one segment, and 100 recipients must fit).
    #[arg(long, env = "POSTERN_SPOOL_SEGMENT_SIZE", default_value = "64M", value_parser = parse_size, allow_hyphen_values = true)]
    spool_segment_size: u64,
    /// Spool size (all cores) at which new mail gets 452 4.3.1 until it falls to 80 % of it;
    /// 0 for no mark (a full disk still gives 452 4.3.1).
    #[arg(long, env = "POSTERN_SPOOL_HIGH_WATER", default_value = "0", value_parser = parse_size, allow_hyphen_values = true)]
    spool_high_water: u64,
    /// Our host name, in the banner, EHLO and Received headers [default: the system's].
    #[arg(long, env = "POSTERN_HOSTNAME", value_parser = trimmed::<String>, allow_hyphen_values = true)]
    hostname: Option<String>,
    /// A domain to accept mail for from anyone (repeatable); `.example.net` takes the
    /// subdomains of example.net [default: none].
    #[arg(long, env = "POSTERN_ACCEPT_DOMAIN", value_delimiter = ',', value_parser = trimmed::<String>, allow_hyphen_values = true)]
    accept_domain: Vec<String>,
    /// Where mail to <postmaster>, postmaster@HOSTNAME and postmaster@[the address the client
    /// reached] goes (an address); all are accepted from anyone (RFC 5321 4.5.1) [default:
    /// they become postmaster@HOSTNAME, routed like any recipient].
    #[arg(long, env = "POSTERN_POSTMASTER", value_parser = trimmed::<String>, allow_hyphen_values = true)]
    postmaster: Option<String>,
    /// A network allowed to relay to any domain, as ADDR/PREFIX or one address (repeatable);
    /// `none`: no client relays, not even loopback (mail only for --accept-domain and the
    /// postmaster) [default: 127.0.0.0/8, ::1/128].
    #[arg(long, env = "POSTERN_RELAY_NETWORK", value_delimiter = ',', value_parser = relay_network, allow_hyphen_values = true)]
    relay_network: Vec<RelayNetwork>,
    /// Largest message, advertised in SIZE (bytes; k, M, G suffixes are powers of 1024).
    #[arg(long, env = "POSTERN_MAX_MESSAGE_SIZE", default_value = "50M", value_parser = parse_size, allow_hyphen_values = true)]
    max_message_size: u64,
    /// Recipients per transaction (at least 100); the envelope (paths and ORCPTs) is also
    /// capped at 128 octets per recipient allowed, never below 75,956 octets (room for 100
    /// recipients of the longest form).
    #[arg(long, env = "POSTERN_MAX_RECIPIENTS", default_value_t = 1000, value_parser = number::<usize>, allow_hyphen_values = true)]
    max_recipients: usize,
    /// Commands that move no mail forward (EHLO, HELO, RSET, NOOP, VRFY, EXPN, HELP, an empty BDAT
    /// chunk not the last) a session may send between messages accepted; past it each one
    /// also counts as an error, and the session ends with 421 4.7.0 at the error limit (20).
    /// 0 for no limit.
    #[arg(long, env = "POSTERN_MAX_JUNK_COMMANDS", default_value_t = 100, value_parser = number::<u32>, allow_hyphen_values = true)]
    max_junk_commands: u32,
    /// Concurrent connections, all cores together; more get 421 4.3.2.
    #[arg(long, env = "POSTERN_MAX_CONNECTIONS", default_value_t = 20_000, value_parser = number::<usize>, allow_hyphen_values = true)]
    max_connections: usize,
    /// Concurrent connections from one client address; more get 421 4.7.0 [default: 1000, or
    /// --max-connections when that is lower].
    #[arg(long, env = "POSTERN_MAX_CONNECTIONS_PER_IP", value_parser = number::<usize>, allow_hyphen_values = true)]
    max_connections_per_ip: Option<usize>,
    /// For --max-connections-per-ip, IPv6 clients are counted per network of this prefix
    /// length (16 to 128; 128 counts each address on its own).
    #[arg(long, env = "POSTERN_IPV6_CLIENT_PREFIX", default_value_t = 84,
          value_parser = ranged::<u8>(16, 128), allow_hyphen_values = true)]
    ipv6_client_prefix: u8,
    /// A load balancer (ADDR/PREFIX or one address; repeatable) whose connections begin with
    /// a PROXY protocol header, version 1 or 2, naming the real client: that client is then
    /// the one limits, relay checks, the Received header and the log see. A connection from
    /// one without a valid header is closed [default: none].
    #[arg(long, env = "POSTERN_PROXY_FROM", value_delimiter = ',', value_parser = network, allow_hyphen_values = true)]
    proxy_from: Vec<IpNet>,
    /// Longest wait for a command or body bytes (RFC 5321 4.5.3.2), e.g. 500ms, 3s, 5m.
    #[arg(long, env = "POSTERN_COMMAND_TIMEOUT", default_value = "5m", value_parser = parse_duration, allow_hyphen_values = true)]
    command_timeout: Duration,
    /// Longest session, whatever the client does.
    #[arg(long, env = "POSTERN_MAX_SESSION_TIME", default_value = "1h", value_parser = parse_duration, allow_hyphen_values = true)]
    max_session_time: Duration,
    /// Longest wait for transactions in flight when stopping.
    #[arg(long, env = "POSTERN_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration, allow_hyphen_values = true)]
    shutdown_grace: Duration,
    /// After a SIGTERM or SIGINT, how long to go on taking mail with /readyz answering 503
    /// before the stop begins, so that a load balancer sends new clients elsewhere first (a
    /// second signal begins the stop at once); 0 for none.
    #[arg(long, env = "POSTERN_DRAIN_TIME", default_value = "0s", value_parser = parse_duration, allow_hyphen_values = true)]
    drain_time: Duration,
    /// PEM certificate chain; with --tls-key, enables STARTTLS [default: none, no TLS].
    #[arg(long, env = "POSTERN_TLS_CERT", requires = "tls_key", value_parser = path, allow_hyphen_values = true)]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert [default: none].
    #[arg(long, env = "POSTERN_TLS_KEY", requires = "tls_cert", value_parser = path, allow_hyphen_values = true)]
    tls_key: Option<PathBuf>,
    /// Prometheus metrics, /healthz and /readyz on this address; `none` turns off one set
    /// elsewhere (the unit's POSTERN_METRICS, from /etc/default/postern) [default: none, not
    /// served].
    #[arg(long, env = "POSTERN_METRICS", value_parser = metrics_address, allow_hyphen_values = true)]
    metrics: Option<MetricsAddress>,
    /// Refuse bodies with bare CR or LF (550 5.6.11) instead of storing them as CRLF
    /// [default: off; =false turns off a value set in the environment].
    #[arg(long, env = "POSTERN_REJECT_BARE_NEWLINES", value_parser = switch,
          action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true", hide_default_value = true)]
    reject_bare_newlines: bool,
    /// Keep accepted mail queued without delivering it; delivery resumes when postern runs
    /// without --hold [default: off; --hold=false turns off a POSTERN_HOLD set in the
    /// environment].
    #[arg(long, env = "POSTERN_HOLD", value_parser = switch,
          action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true", hide_default_value = true)]
    hold: bool,
    /// Run each group commit's write and fdatasync on the core's own thread instead of a
    /// thread of its blocking pool: fewer thread switches per sync (on a 2-vCPU VM about a
    /// fifth more messages a second at the peak), but while a sync waits on the disk the
    /// core serves nothing else, and a disk that hangs stops the whole core (no greeting, no
    /// 451 at a stop) until it answers [default: off].
    #[arg(long, env = "POSTERN_SYNC_ON_CORE", value_parser = switch,
          action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true", hide_default_value = true)]
    sync_on_core: bool,
    /// Send all mail to this smarthost (HOST:PORT; port 25 when left out) instead of looking
    /// up MX records [default: none, MX records].
    #[arg(long, env = "POSTERN_RELAY_HOST", value_parser = trimmed::<String>, allow_hyphen_values = true)]
    relay_host: Option<String>,
    /// Send mail for DOMAIN and its subdomains to HOST:PORT (port 25 when left out;
    /// repeatable; the longest domain wins; takes precedence over --relay-host) [default:
    /// none].
    #[arg(long, env = "POSTERN_ROUTE", value_delimiter = ',', value_parser = trimmed::<String>,
          value_name = "DOMAIN=HOST[:PORT]", allow_hyphen_values = true)]
    route: Vec<String>,
    /// The DNS server for MX lookups (ADDR or ADDR:PORT) [default: from /etc/resolv.conf].
    #[arg(long, env = "POSTERN_DNS_SERVER", value_parser = trimmed::<String>, allow_hyphen_values = true)]
    dns_server: Option<String>,
    /// The TCP port of MX hosts (25 on the Internet; another value only in labs and tests).
    #[arg(long, env = "POSTERN_MX_PORT", default_value_t = 25,
          value_parser = ranged::<u16>(1, u16::MAX), allow_hyphen_values = true)]
    mx_port: u16,
    /// First retry delay after a temporary failure; it doubles with each failure, up to
    /// --retry-max. A message queued longer than the delay (after a restart, or a wait under
    /// --hold) waits as long as its age instead, up to --retry-max.
    #[arg(long, env = "POSTERN_RETRY_INITIAL", default_value = "5m", value_parser = parse_duration, allow_hyphen_values = true)]
    retry_initial: Duration,
    /// Largest retry delay.
    #[arg(long, env = "POSTERN_RETRY_MAX", default_value = "1h", value_parser = parse_duration, allow_hyphen_values = true)]
    retry_max: Duration,
    /// A message still undelivered after this long is returned to its sender.
    #[arg(long, env = "POSTERN_MAX_QUEUE_LIFETIME", default_value = "5days", value_parser = parse_duration, allow_hyphen_values = true)]
    max_queue_lifetime: Duration,
    /// Tell the sender when a message is still queued after this long (0: at its first
    /// deferral) [default: never].
    #[arg(long, env = "POSTERN_DELAY_WARNING", value_parser = parse_duration, allow_hyphen_values = true)]
    delay_warning: Option<Duration>,
    /// STARTTLS towards next hops: none, opportunistic (when offered, unauthenticated) or
    /// required (verified certificate).
    #[arg(long, env = "POSTERN_OUTBOUND_TLS", default_value = "opportunistic", value_parser = trimmed::<String>, allow_hyphen_values = true)]
    outbound_tls: String,
    /// Extra trust anchors (PEM) for --outbound-tls required [default: none, the system's].
    #[arg(long, env = "POSTERN_OUTBOUND_TLS_CA", value_parser = path, allow_hyphen_values = true)]
    outbound_tls_ca: Option<PathBuf>,
    /// Concurrent connections to one next hop.
    #[arg(
        long,
        env = "POSTERN_MAX_CONNECTIONS_PER_DESTINATION",
        default_value_t = 16,
        value_parser = number::<usize>, allow_hyphen_values = true)]
    max_connections_per_destination: usize,
    /// Outbound connections to all next hops together, each core taking an equal share
    /// (fewer when the open-file limit leaves too few descriptors, said at start-up). Past it,
    /// mail for another next hop waits for a connection to end; idle ones end at once for it.
    #[arg(long, env = "POSTERN_MAX_OUTBOUND_CONNECTIONS", default_value_t = 1000,
          value_parser = number::<usize>, allow_hyphen_values = true)]
    max_outbound_connections: usize,
    /// Messages pipelined into each other on one outbound connection when the next hop
    /// offers PIPELINING and CHUNKING: each transaction is written before the earlier ones'
    /// replies are read (1 to 256). 1 sends one transaction per round trip.
    #[arg(long, env = "POSTERN_MAX_TRANSACTIONS_IN_FLIGHT", default_value_t = 1, value_parser = number::<usize>, allow_hyphen_values = true)]
    max_transactions_in_flight: usize,
    /// How long an idle outbound connection waits for the next message.
    #[arg(long, env = "POSTERN_OUTBOUND_IDLE_TIMEOUT", default_value = "10s", value_parser = parse_duration, allow_hyphen_values = true)]
    outbound_idle_timeout: Duration,
    /// Outbound TCP connect timeout.
    #[arg(long, env = "POSTERN_SMTP_CONNECT_TIMEOUT", default_value = "30s", value_parser = parse_duration, allow_hyphen_values = true)]
    smtp_connect_timeout: Duration,
    /// Outbound wait for the greeting, EHLO and STARTTLS replies (RFC 5321 4.5.3.2.1), and for
    /// the TLS handshake.
    #[arg(long, env = "POSTERN_SMTP_GREETING_TIMEOUT", default_value = "5m", value_parser = parse_duration, allow_hyphen_values = true)]
    smtp_greeting_timeout: Duration,
    /// Outbound wait for the reply to MAIL (RFC 5321 4.5.3.2.2), and to RSET; replies to MAIL,
    /// RCPT and DATA, which may come together (PIPELINING), each wait the longest of
    /// --smtp-mail-timeout, --smtp-rcpt-timeout and --smtp-data-init-timeout.
    #[arg(long, env = "POSTERN_SMTP_MAIL_TIMEOUT", default_value = "5m", value_parser = parse_duration, allow_hyphen_values = true)]
    smtp_mail_timeout: Duration,
    /// Outbound wait for the reply to RCPT (RFC 5321 4.5.3.2.3); see --smtp-mail-timeout.
    #[arg(long, env = "POSTERN_SMTP_RCPT_TIMEOUT", default_value = "5m", value_parser = parse_duration, allow_hyphen_values = true)]
    smtp_rcpt_timeout: Duration,
    /// Outbound wait for the 354 after DATA (RFC 5321 4.5.3.2.4); see --smtp-mail-timeout.
    #[arg(long, env = "POSTERN_SMTP_DATA_INIT_TIMEOUT", default_value = "2m", value_parser = parse_duration, allow_hyphen_values = true)]
    smtp_data_init_timeout: Duration,
    /// Outbound limit on each write of body bytes (RFC 5321 4.5.3.2.5).
    #[arg(long, env = "POSTERN_SMTP_DATA_BLOCK_TIMEOUT", default_value = "3m", value_parser = parse_duration, allow_hyphen_values = true)]
    smtp_data_block_timeout: Duration,
    /// Outbound wait for the reply after the body (RFC 5321 4.5.3.2.6).
    #[arg(long, env = "POSTERN_SMTP_DATA_DONE_TIMEOUT", default_value = "10m", value_parser = parse_duration, allow_hyphen_values = true)]
    smtp_data_done_timeout: Duration,
    /// Messages queued (not yet delivered or bounced) at which new mail gets 452 4.3.1; 0 for
    /// no limit.
    #[arg(long, env = "POSTERN_QUEUE_HIGH_WATER", default_value_t = 1_000_000, value_parser = number::<u64>, allow_hyphen_values = true)]
    queue_high_water: u64,
    /// Messages queued at which mail is accepted again [default: 80% of --queue-high-water].
    #[arg(long, env = "POSTERN_QUEUE_LOW_WATER", value_parser = number::<u64>, allow_hyphen_values = true)]
    queue_low_water: Option<u64>,
    /// Recipients of the queued messages (each message's envelope is held in memory until it
    /// is final, about 130 bytes a recipient) at which new mail gets 452 4.3.1, accepted
    /// again at 80 % of it; 0 for no limit. Not applied with --hold (the envelopes are not
    /// held in memory then; each queued message still costs the spool's index of it, under
    /// 200 bytes, which --queue-high-water bounds)
    #[arg(long, env = "POSTERN_QUEUE_HIGH_WATER_RECIPIENTS", default_value_t = 10_000_000, value_parser = number::<u64>, allow_hyphen_values = true)]
    queue_high_water_recipients: u64,
}

/// What the binary runs: the server, and the relay unless mail is held.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) server: Settings,
    pub(crate) relay: Option<RelayConfig>,
    /// `--outbound-tls-ca`, read at start-up with --hold too: a file that cannot work is said
    /// at once, not when the hold is lifted.
    pub(crate) outbound_tls_ca: Option<PathBuf>,
    /// `--outbound-tls required`: its trust anchors are checked at start-up, with --hold too.
    pub(crate) outbound_tls_required: bool,
    /// With --hold, the flags given that say where mail goes, unused in this run.
    pub(crate) unused_with_hold: Vec<&'static str>,
}

/// `POSTERN_*` variables set in the environment that name no setting of `postern serve` (a
/// misspelt name, or one of another version), each ignored: for a warning at start.
pub(crate) fn unknown_variables() -> Vec<String> {
    let cli = <Cli as clap::CommandFactory>::command();
    let known: Vec<String> = cli
        .find_subcommand("serve")
        .map(|serve| {
            serve
                .get_arguments()
                .filter_map(|a| a.get_env())
                .filter_map(|e| e.to_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let mut unknown: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| k.starts_with("POSTERN_") && !known.contains(k))
        .collect();
    unknown.sort();
    unknown
}

/// A queue ID for `--delete`, or `-` (standard input): a wrong flag (exit 2) when empty,
/// whatever the spool holds.
fn queue_id_arg(s: &str) -> Result<String, String> {
    if s.trim() == "-" {
        return Ok("-".to_owned());
    }
    queue_id_then(s, "; nothing was deleted")
}

/// The queue IDs `--delete -` reads from `input` (separated by blanks, commas or lines), or
/// a line naming the first that is not one.
pub(crate) fn queue_ids_from(input: &str) -> Result<Vec<String>, String> {
    input
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|w| !w.is_empty())
        .map(|w| {
            queue_id_then(w, "; nothing was deleted")
                .map_err(|e| format!("--delete - (standard input): {e}"))
        })
        .collect()
}

/// `--show`'s value: a queue ID.
fn shown_queue_id(s: &str) -> Result<String, String> {
    queue_id_then(s, "")
}

/// A queue ID (blanks around it dropped), or why not, ending in `then`.
fn queue_id_then(s: &str, then: &str) -> Result<String, String> {
    match s.trim() {
        "" => Err(format!("an empty queue ID{then}")),
        id if !postern_spool::is_queue_id(id) => {
            // Say which part is wrong: its length, or a letter IDs never hold.
            let why = match id.chars().find(|&c| !postern_spool::is_queue_id_char(c)) {
                _ if id.chars().count() != 17 => {
                    format!("{} characters, not 17; ", id.chars().count())
                }
                Some(c) => format!("it has '{}', which no ID holds; ", c.escape_default()),
                None => String::new(),
            };
            Err(format!(
                "'{id}' is not a queue ID ({why}IDs are 17 of the digits and the letters \
                 BCDFGHJKLMNPQRSTVWXYZ and b, as `postern queue` lists them){then}"
            ))
        }
        id => Ok(id.to_owned()),
    }
}

/// A switch's value (`--hold=yes`, `POSTERN_HOLD=" true"`): the spellings clap's boolish
/// parser takes, without the blanks around them.
fn switch(s: &str) -> Result<bool, String> {
    let s = s.trim();
    match s.to_ascii_lowercase().as_str() {
        "y" | "yes" | "t" | "true" | "on" | "1" => Ok(true),
        "n" | "no" | "f" | "false" | "off" | "0" => Ok(false),
        _ => Err(format!(
            "'{s}' is not a switch value (true or false; also yes or no, on or off, 1 or 0)"
        )),
    }
}

/// A path, without blanks (a CR among them) around it; not an empty one, nor one that
/// begins with `-` (a flag left without its value, or a value like `-1` given by mistake).
fn path(s: &str) -> Result<PathBuf, String> {
    match s.trim() {
        "" => Err("an empty path".to_owned()),
        p if p.starts_with("--") => Err(format!(
            "'{p}' is a flag, not a path: the path goes right after its flag"
        )),
        p if p.starts_with('-') => Err(format!(
            "'{p}' is not a path (it begins with '-'; write ./{p} for a file named so)"
        )),
        p => Ok(PathBuf::from(p)),
    }
}

/// A value, or one item of a list flag, without the blanks around it: a `POSTERN_*` variable
/// may list `a.example, b.example` as well as `a.example,b.example`.
fn trimmed<T>(s: &str) -> Result<T, String>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let s = s.trim();
    s.parse().map_err(|e: T::Err| {
        // The parser's own words for `-1` are "invalid digit found in string".
        match s.strip_prefix('-') {
            Some(n) if n.bytes().all(|b| b.is_ascii_digit()) && n.bytes().any(|b| b != b'0') => {
                format!("'{s}' is negative; it takes a whole number")
            }
            // And for a number past the type's range, "number too large to fit in target type".
            None if s.bytes().all(|b| b.is_ascii_digit())
                && e.to_string().contains("too large") =>
            {
                format!("'{s}' is too large")
            }
            _ => e.to_string(),
        }
    })
}

/// A count: digits only, without the blanks around them. The parser's own words for `abc`,
/// `1k` or an empty value ("invalid digit found in string", "cannot parse integer from empty
/// string") would not say what the flag takes, and it would take `+5`.
fn number<T>(s: &str) -> Result<T, String>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let t = s.trim();
    let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
    if t.is_empty() {
        return Err("an empty value; it takes a whole number".to_owned());
    }
    // `-0` parses as 0 where a sign is taken, and as nothing where it is not.
    if t.strip_prefix('-')
        .is_some_and(|d| digits(d) && d.bytes().all(|b| b == b'0'))
    {
        return Err(format!("'{t}' has a sign; it takes digits only"));
    }
    if !digits(t) && !t.strip_prefix('-').is_some_and(digits) {
        return Err(format!(
            "'{t}' is not a whole number; it takes digits only (no sign, unit or exponent)"
        ));
    }
    trimmed(t)
}

/// A number within `low..=high`, without the blanks around it.
fn ranged<T>(low: T, high: T) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync
where
    T: Into<i128> + TryFrom<i128> + Copy + std::fmt::Display + Send + Sync + 'static,
{
    move |s: &str| {
        let n: i128 = number(s)?;
        // Said as for other numbers (`number`), with the range the flag takes.
        let takes = format!("it takes a whole number in {low}..={high}");
        if n < 0 && low.into() >= 0 {
            return Err(format!("'{}' is negative; {takes}", s.trim()));
        }
        if n > high.into() {
            return Err(format!("'{}' is too large; {takes}", s.trim()));
        }
        if n < low.into() {
            return Err(format!("{n} is not in {low}..={high}"));
        }
        T::try_from(n).map_err(|_| format!("{n} is not in {low}..={high}"))
    }
}

/// An address to listen on: an IP address and a port. Not a multicast or broadcast address:
/// TCP takes no connections there (RFC 1122 4.2.3.10), and a listener bound to one would look
/// ready while no client could ever reach it.
fn socket_address(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s.trim().parse().map_err(|_| {
        format!(
            "'{}' is not an address like 127.0.0.1:2525, 0.0.0.0:25 or [::1]:2525 (an IP \
             address and a port; host names are not taken)",
            s.trim()
        )
    })?;
    // A mapped IPv4 address (`[::ffff:224.0.0.1]`) is that address.
    let ip = addr.ip().to_canonical();
    let broadcast = matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast());
    if ip.is_multicast() || broadcast {
        return Err(format!(
            "'{addr}' is a {} address, where TCP takes no connections: give one of this \
             machine's addresses (0.0.0.0 or [::] for all)",
            if broadcast { "broadcast" } else { "multicast" }
        ));
    }
    Ok(addr)
}

/// `--listen`: an address, or `none` for no cleartext listener.
#[derive(Clone, Copy, Debug)]
struct ListenAddress(Option<SocketAddr>);

fn listen_address(s: &str) -> Result<ListenAddress, String> {
    address_or_none(s).map(ListenAddress)
}

/// An address, or `none`.
fn address_or_none(s: &str) -> Result<Option<SocketAddr>, String> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    socket_address(s).map(Some).map_err(|e| or_none(s, e))
}

/// `--relay-network`: a network, or `none` for no relaying client at all.
#[derive(Clone, Copy, Debug)]
struct RelayNetwork(Option<IpNet>);

fn relay_network(s: &str) -> Result<RelayNetwork, String> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(RelayNetwork(None));
    }
    network(s)
        .map(|net| RelayNetwork(Some(net)))
        .map_err(|e| or_none(s, e))
}

/// A flag's error where `none` is also taken: the word is named where `s` could have been
/// meant for it (a word, not an address or network gone wrong in its numbers).
fn or_none(s: &str, e: String) -> String {
    let numbers = s
        .trim()
        .chars()
        .any(|c| c.is_ascii_digit() || c == ':' || c == '/');
    if numbers {
        e
    } else {
        format!("{e}, or none")
    }
}

/// `--metrics`: an address, or `none` for no metrics listener.
#[derive(Clone, Copy, Debug)]
struct MetricsAddress(Option<SocketAddr>);

fn metrics_address(s: &str) -> Result<MetricsAddress, String> {
    address_or_none(s).map(MetricsAddress)
}

/// A running server's metrics address, to ask: port 0 (which a server listening takes as "any
/// free port") names no listener.
fn metrics_to_ask(s: &str) -> Result<MetricsAddress, String> {
    match metrics_address(s)? {
        MetricsAddress(Some(a)) if a.port() == 0 => Err(format!(
            "'{}' has port 0: give the port the server's log names",
            s.trim()
        )),
        m => Ok(m),
    }
}

/// A network as `ADDR/PREFIX`, or one address as its own network (`/32`, `/128`).
/// An IPv6 network of IPv4-mapped addresses (`::ffff:127.0.0.1`, `::ffff:10.0.0.0/104`) as
/// the IPv4 network it stands for: a client that comes in on an IPv6 socket with such an
/// address is taken as its IPv4 address, which the mapped form would never match (a
/// `--proxy-from` balancer copied from `ss` on a dual-stack listener then never matched,
/// and its header was taken for a command).
fn unmapped(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        _ => net,
    }
}

fn network(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    match s.parse::<IpNet>() {
        // `192.168.1.5/24` may mean the one host or its network: which, only the operator
        // knows, and guessing wrong lets a network relay or locks one out.
        Ok(net) if net.addr() != net.network() => Err(format!(
            "'{s}' has host bits set: write the network as {} or the one address as {}",
            net.trunc(),
            net.addr()
        )),
        Ok(net) => Ok(unmapped(net)),
        Err(e) => match s.parse::<std::net::IpAddr>() {
            Ok(addr) => Ok(unmapped(IpNet::from(addr))),
            Err(_) if s.contains('/') => {
                // ipnet says "invalid IP address syntax" for a prefix that is too long too.
                let (addr, prefix) = s.split_once('/').unwrap_or((s, ""));
                let digits = !prefix.is_empty() && prefix.bytes().all(|b| b.is_ascii_digit());
                match addr.parse::<std::net::IpAddr>() {
                    Err(_) => Err(format!("'{addr}' is not an IP address ({e})")),
                    Ok(a) => {
                        let bits = if a.is_ipv4() { 32 } else { 128 };
                        match prefix.parse::<u64>() {
                            Ok(p) if digits && p > bits => Err(format!(
                                "the prefix /{p} is longer than an {} address ({bits} bits)",
                                if a.is_ipv4() { "IPv4" } else { "IPv6" },
                            )),
                            _ => Err(format!(
                                "'{prefix}' is not a prefix length (a network like 10.0.0.0/8)"
                            )),
                        }
                    }
                }
            }
            Err(_) => Err(format!(
                "'{s}' is neither an address nor a network like 10.0.0.0/8"
            )),
        },
    }
}

/// The largest `--max-message-size`: 1024G.
const MAX_MESSAGE_SIZE: u64 = 1 << 40;

/// The smallest `--spool-segment-size`: a message's `START` record (its envelope) is never
/// split, and 100 recipients of the longest form (paths of 256 octets, ORCPTs of 500) must
/// fit one segment (RFC 5321 4.5.3.1.8: a server takes at least 100 recipients). 64k held
/// 81 of them.
const MIN_SEGMENT_SIZE: u64 = 128 * 1024;

/// Parses `1048576`, `64k`, `50M`, `2G` (suffixes are powers of 1024).
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if s.strip_prefix('-')
        .is_some_and(|n| n.starts_with(|c: char| c.is_ascii_digit()))
    {
        return Err(format!(
            "'{s}' is negative; it takes a size like 1048576, 64k or 50M"
        ));
    }
    let (digits, shift) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 10),
        Some((i, 'm' | 'M')) => (&s[..i], 20),
        Some((i, 'g' | 'G')) => (&s[..i], 30),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| {
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            format!("'{s}' is too large")
        } else {
            format!("'{s}' is not a size like 1048576, 64k or 50M")
        }
    })?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// Parses `500ms`, `3s`, `5m`, `1h`.
/// A duration that is a wait: more than 0.
fn wait_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!(
            "'{}' is no time to wait: give more than 0",
            s.trim()
        )),
        d => Ok(d),
    }
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    // Blanks around a value (from an environment file) are no part of it, as for numbers.
    let s = s.trim();
    if s.strip_prefix('-')
        .is_some_and(|n| n.starts_with(|c: char| c.is_ascii_digit()))
    {
        return Err(format!(
            "'{s}' is negative; it takes a duration like 500ms, 3s, 5m or 1h"
        ));
    }
    // `M` is a month to the parser, while sizes take it for MiB: `5M` written for minutes
    // would be five months without a word.
    if s.contains('M') {
        return Err(format!(
            "'{s}' is ambiguous: durations take m for minutes (M would be months; write 30d)"
        ));
    }
    // The parser passes over blanks between digits: `1 5m` would be fifteen minutes. (Blanks
    // between units, `1h 30m`, are fine.)
    let chars: Vec<char> = s.chars().collect();
    let split_number = chars.iter().enumerate().any(|(i, c)| {
        c.is_ascii_digit()
            && chars[i + 1..]
                .iter()
                .position(|c| !c.is_whitespace())
                .is_some_and(|n| n > 0 && chars[i + 1 + n].is_ascii_digit())
    });
    // Nor may a blank stand beside a decimal point (`1. 5h` is no 1.5 hours).
    let split_fraction = chars
        .windows(2)
        .any(|w| (w[0] == '.' && w[1].is_whitespace()) || (w[0].is_whitespace() && w[1] == '.'));
    if split_number || split_fraction {
        return Err(format!("'{s}' is not a duration like 500ms, 3s, 5m or 1h"));
    }
    // Each number with its unit is read on its own and the sum kept within bounds: the
    // parser's own sum of parts that add up to its largest value panics.
    let mut total = Duration::ZERO;
    for part in duration_parts(s) {
        let d = humantime::parse_duration(part).map_err(|e| match e {
            humantime::DurationError::NumberOverflow => overflow(s, part),
            _ => format!("'{s}' is not a duration like 500ms, 3s, 5m or 1h"),
        })?;
        // Deadlines are instants: a duration this long would overflow when added to one.
        total = total
            .checked_add(d)
            .filter(|t| *t <= MAX_DURATION)
            .ok_or_else(|| format!("'{s}' is more than 10 years"))?;
    }
    Ok(total)
}

/// A duration's parts, each a number and its unit (`1h 30m` and `1h30m`: `1h`, `30m`); a
/// string without a number is one part (and no duration).
fn duration_parts(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut in_unit = false;
    for (i, c) in s.char_indices() {
        if c.is_ascii_digit() && in_unit {
            parts.push(s[start..i].trim());
            start = i;
            in_unit = false;
        } else if !(c.is_ascii_digit() || c == '.' || c.is_whitespace()) {
            in_unit = true;
        }
    }
    parts.push(s[start..].trim());
    parts
}

/// What the parser's overflow on `part` (one number and its unit, of the duration `s`)
/// says. A fraction the parser cannot hold is no great size: in seconds and smaller units,
/// one finer than a nanosecond (`0.5ns`, more than nine decimals); in minutes and larger,
/// one that does not come to whole seconds (`1.001h`), which the parser takes them in. A
/// whole part that fits in any unit (under 10^9, or 10^18 in seconds and smaller) is no
/// overflow of size.
fn overflow(s: &str, part: &str) -> String {
    let whole: String = part.chars().take_while(char::is_ascii_digit).collect();
    let rest = &part[whole.len()..];
    let unit = rest
        .trim_start_matches(|c: char| c.is_ascii_digit() || c == '.')
        .trim();
    let small = ["n", "u", "\u{b5}", "ms", "s"]
        .iter()
        .any(|p| unit.starts_with(p));
    let whole = whole.parse::<u64>().ok();
    match (rest.starts_with('.'), small) {
        (true, true) if whole.is_some_and(|n| n < 1_000_000_000_000_000_000) => {
            format!("'{s}' is finer than a nanosecond")
        }
        (true, false) if whole.is_some_and(|n| n < 1_000_000_000) => {
            format!("'{s}' does not come to whole seconds: write it in smaller units")
        }
        _ => format!("'{s}' is more than 10 years"),
    }
}

/// The longest duration any flag takes.
const MAX_DURATION: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

/// A domain name (ASCII or UTF-8 labels), as `--accept-domain` and `--route` take.
fn is_domain(s: &str) -> bool {
    matches!(
        postern_proto::address::parse_host(s.trim_end_matches('.')),
        Ok(postern_proto::address::Host::Domain(_))
    )
}

fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Parses the command line: `Ok(None)` when help or the version was printed, `Err` with a
/// one-line message naming the flag otherwise.
pub(crate) fn parse() -> Result<Option<Job>, String> {
    if let Some(message) = control_character_source() {
        return Err(message);
    }
    if let Some(message) = flag_taken_as_value() {
        return Err(with_env_source(message));
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayVersion => {
            // clap prints the version whatever follows the flag: `postern --version serve`
            // would print it and start nothing, without a word about the rest.
            let args: Vec<String> = std::env::args_os()
                .skip(1)
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            if let Some(extra) = args
                .iter()
                .find(|a| !matches!(a.as_str(), "--version" | "-V"))
            {
                return Err(format!(
                    "--version takes nothing else: '{extra}' was given with it"
                ));
            }
            let _ = e.print();
            return Ok(None);
        }
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            let _ = e.print();
            return Ok(None);
        }
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            return Err(
                "a command is required: try 'postern serve', 'postern queue', 'postern ready' \
                 or 'postern --help'"
                    .into(),
            );
        }
        Err(e) if e.kind() == clap::error::ErrorKind::InvalidUtf8 => {
            // clap says only that some argument is not UTF-8: name it.
            return Err(
                invalid_utf8_source().unwrap_or_else(|| "invalid UTF-8 in an argument".to_owned())
            );
        }
        Err(e) => {
            // clap's first paragraph, on one line: what is wrong and which flag.
            let rendered = e.render().to_string();
            let first: Vec<&str> = rendered
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let mut line = first.join(" ").trim_start_matches("error: ").to_owned();
            if e.kind() == clap::error::ErrorKind::UnknownArgument {
                if let Some(flag) = switch_before_unexpected(&e) {
                    // `--hold no`: clap names only the word, not the switch it was meant for.
                    line = format!(
                        "{line} after {flag}, which takes no separate value (write {flag}=VALUE)"
                    );
                }
            }
            if e.kind() == clap::error::ErrorKind::MissingRequiredArgument {
                // What asked for the missing flag may have come from the environment: only the
                // flags that require another (the certificate and its key) can ask.
                let set: Vec<String> = ["POSTERN_TLS_CERT", "POSTERN_TLS_KEY"]
                    .into_iter()
                    .filter(|name| std::env::var_os(name).is_some())
                    .map(str::to_owned)
                    .collect();
                if !set.is_empty() {
                    return Err(format!(
                        "{line} (set in the environment: {})",
                        set.join(", ")
                    ));
                }
            }
            return Err(with_env_source(line));
        }
    };
    let s = match cli.command {
        Command::Serve(s) => *s,
        Command::Queue(q) => return Ok(Some(Job::Queue(q))),
        Command::Ready(r) => return Ok(Some(Job::Ready(r))),
    };
    let relay = relay(&s).map_err(with_env_source)?;
    let outbound_tls_ca = s.outbound_tls_ca.clone();
    // Read by `relay` above, which refuses any other value.
    let outbound_tls_required = s.outbound_tls.parse() == Ok(TlsPolicy::Required);
    let unused_with_hold = if relay.is_none() {
        [
            ("--relay-host", s.relay_host.is_some()),
            ("--route", !s.route.is_empty()),
        ]
        .into_iter()
        .filter_map(|(flag, given)| given.then_some(flag))
        .collect()
    } else {
        Vec::new()
    };
    let server = settings(s).map_err(with_env_source)?;
    let relay = relay.map(|r| RelayConfig {
        hostname: server.hostname.clone(),
        own_addrs: server.listen.clone(),
        ..r
    });
    Ok(Some(Job::Serve(Box::new(Config {
        server,
        relay,
        outbound_tls_ca,
        outbound_tls_required,
        unused_with_hold,
    }))))
}

/// A flag that takes a value left without it, the next word being another flag (`--spool
/// --cores 1`): clap would take that flag for the value and then stumble on the word after
/// it (`unexpected argument '1'`), naming neither.
fn flag_taken_as_value() -> Option<String> {
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let cli = <Cli as clap::CommandFactory>::command();
    let command = cli.find_subcommand(args.first()?)?;
    let name = |word: &str| {
        let name = word.strip_prefix("--")?;
        Some(name.split_once('=').map_or(name, |(n, _)| n).to_owned())
    };
    let arg = |name: &str| command.get_arguments().find(|a| a.get_long() == Some(name));
    let takes_value = |a: &clap::Arg| {
        !matches!(a.get_action(), ArgAction::SetTrue | ArgAction::Help)
            && a.get_num_args().is_none_or(|n| n.min_values() > 0)
    };
    for pair in args[1..].windows(2) {
        if pair[0] == "--" {
            return None;
        }
        if pair[0].contains('=') {
            continue;
        }
        let (Some(flag), Some(next)) = (name(&pair[0]), name(&pair[1])) else {
            continue;
        };
        let next_is_flag = next == "help" || arg(&next).is_some();
        if next_is_flag && arg(&flag).is_some_and(takes_value) {
            return Some(format!(
                "a value is required for '--{flag}': the word after it, '--{next}', is a flag"
            ));
        }
    }
    None
}

/// The switch (`--hold`, `--reject-bare-newlines`, `--json`, ...) right before the argument
/// clap found unexpected, when there is one: a value given to it as a separate word.
fn switch_before_unexpected(e: &clap::Error) -> Option<String> {
    let clap::error::ContextValue::String(word) = e.get(clap::error::ContextKind::InvalidArg)?
    else {
        return None;
    };
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let at = args.iter().skip(1).position(|a| a == word)? + 1;
    let before = args[at - 1].strip_prefix("--")?;
    let cli = <Cli as clap::CommandFactory>::command();
    let switch = cli
        .get_subcommands()
        .flat_map(clap::Command::get_arguments)
        .filter(|a| a.get_long() == Some(before))
        .any(|a| {
            matches!(a.get_action(), ArgAction::SetTrue)
                || a.get_num_args().is_some_and(|n| n.min_values() == 0)
        });
    switch.then(|| format!("--{before}"))
}

/// Adds which environment variables the values behind a message came from: each flag it
/// names that was not on the command line and whose `POSTERN_<NAME>` is set (a clash between
/// two flags may have either, or both, from there).
fn with_env_source(line: String) -> String {
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut vars: Vec<String> = Vec::new();
    for flag in line
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
    {
        let on_command_line = args
            .iter()
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")));
        let var = format!("POSTERN_{}", flag[2..].replace('-', "_").to_uppercase());
        if !on_command_line && std::env::var_os(&var).is_some() && !vars.contains(&var) {
            vars.push(var);
        }
    }
    if vars.is_empty() {
        return line;
    }
    format!("{line} (from {})", vars.join(", "))
}

/// Which argument, flag value or `POSTERN_*` variable holds a control character (a line
/// break, say) inside it: no flag takes one, and an error quoting the value would not be one
/// line (blanks at either end, a CR from an environment file among them, are no part of a
/// value and pass).
fn control_character_source() -> Option<String> {
    // Help and the version are shown whatever the values.
    let asks_help = |a: &std::ffi::OsString| {
        ["--help", "-h", "--version", "-V", "help"]
            .iter()
            .any(|h| a == std::ffi::OsStr::new(h))
    };
    if std::env::args_os().skip(1).any(|a| asks_help(&a)) {
        return None;
    }
    let inside = |s: &str| s.trim().chars().find(|c| c.is_control());
    let shown = |c: char| c.escape_default().to_string();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    for (i, arg) in args.iter().enumerate().skip(1) {
        let Some(arg) = arg.to_str() else { continue };
        let Some(c) = inside(arg) else { continue };
        let flag = match arg.split_once('=') {
            Some((flag, _)) if flag.starts_with("--") && inside(flag).is_none() => Some(flag),
            _ => args[i - 1]
                .to_str()
                .filter(|p| p.starts_with("--") && !p.contains('=') && inside(p).is_none()),
        };
        return Some(match flag {
            Some(flag) => format!("a control character ({}) in the value of {flag}", shown(c)),
            None => format!(
                "a control character ({}) in the argument '{}'",
                shown(c),
                arg.escape_default()
            ),
        });
    }
    // Only the variables the command reads: one whose flag is on the command line, or that
    // names no setting of the command, is not read (nor is its value wrong).
    read_variables(&args).into_iter().find_map(|name| {
        let value = std::env::var_os(&name)?;
        let c = inside(value.to_str()?)?;
        Some(format!(
            "a control character ({}) in the variable {name}",
            shown(c)
        ))
    })
}

/// The `POSTERN_*` variables that the subcommand named in `args` reads: those of its flags
/// that are not on the command line.
fn read_variables(args: &[std::ffi::OsString]) -> Vec<String> {
    let cli = <Cli as clap::CommandFactory>::command();
    let Some(sub) = args
        .iter()
        .skip(1)
        .filter_map(|a| a.to_str())
        .find_map(|a| cli.find_subcommand(a))
    else {
        return Vec::new();
    };
    let given = |long: &str| {
        let flag = format!("--{long}");
        args.iter().filter_map(|a| a.to_str()).any(|a| {
            a == flag
                || a.strip_prefix(flag.as_str())
                    .is_some_and(|v| v.starts_with('='))
        })
    };
    sub.get_arguments()
        .filter(|a| !a.get_long().is_some_and(given))
        .filter_map(|a| a.get_env()?.to_str().map(str::to_owned))
        .collect()
}

/// Which argument, flag value or `POSTERN_*` variable is not UTF-8 (clap's error names none).
fn invalid_utf8_source() -> Option<String> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    for (i, arg) in args.iter().enumerate() {
        if arg.to_str().is_some() {
            continue;
        }
        let bytes = arg.as_encoded_bytes();
        let lossy = String::from_utf8_lossy(bytes);
        if bytes.starts_with(b"--") {
            return Some(match bytes.iter().position(|&b| b == b'=') {
                Some(eq) => format!(
                    "invalid UTF-8 in the value of {}",
                    String::from_utf8_lossy(&bytes[..eq])
                ),
                None => format!("invalid UTF-8 in the flag '{lossy}'"),
            });
        }
        let flag = i
            .checked_sub(1)
            .and_then(|p| args[p].to_str())
            .filter(|p| p.starts_with("--"));
        return Some(match flag {
            Some(flag) => format!("invalid UTF-8 in the value of {flag}"),
            None => format!("invalid UTF-8 in the argument '{lossy}'"),
        });
    }
    std::env::vars_os().find_map(|(name, value)| {
        let name = name.to_str()?;
        (name.starts_with("POSTERN_") && value.to_str().is_none())
            .then(|| format!("invalid UTF-8 in the variable {name}"))
    })
}

fn relay(s: &Serve) -> Result<Option<RelayConfig>, String> {
    let relay_host = s
        .relay_host
        .as_deref()
        .map(|h| HostPort::parse(h, 25).map_err(|e| format!("--relay-host: {e}")))
        .transpose()?;
    let routes = s
        .route
        .iter()
        .map(|r| Router::parse_route(r).map_err(|e| format!("--route: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, (domain, _)) in routes.iter().enumerate() {
        // bücher.example and xn--bcher-kva.example are one domain.
        let same = |d: &String| canonical_domain(d) == canonical_domain(domain);
        if routes[..i].iter().any(|(d, _)| same(d)) {
            return Err(format!("--route: {domain} is routed twice"));
        }
        if !is_domain(domain) {
            return Err(format!("--route: '{domain}' is not a domain"));
        }
    }
    let dns_server = s
        .dns_server
        .as_deref()
        .map(|d| {
            d.parse::<SocketAddr>()
                .or_else(|_| {
                    d.parse::<std::net::IpAddr>()
                        .map(|ip| SocketAddr::new(ip, 53))
                })
                .ok()
                // Port 0, or no address (0.0.0.0, ::), names no server to ask.
                .filter(|a| a.port() != 0 && !a.ip().is_unspecified())
                .ok_or_else(|| {
                    format!(
                        "--dns-server: '{d}' is not an address like 10.0.0.53 or 127.0.0.1:5353"
                    )
                })
        })
        .transpose()?;
    let tls: TlsPolicy = s
        .outbound_tls
        .parse()
        .map_err(|e| format!("--outbound-tls: {e}"))?;
    if s.max_connections_per_destination == 0 {
        return Err("--max-connections-per-destination must be at least 1".into());
    }
    if s.max_outbound_connections == 0 {
        return Err("--max-outbound-connections must be at least 1".into());
    }
    if !(1..=256).contains(&s.max_transactions_in_flight) {
        return Err("--max-transactions-in-flight must be from 1 to 256".into());
    }
    for (flag, d) in [
        ("--smtp-connect-timeout", s.smtp_connect_timeout),
        ("--smtp-greeting-timeout", s.smtp_greeting_timeout),
        ("--smtp-mail-timeout", s.smtp_mail_timeout),
        ("--smtp-rcpt-timeout", s.smtp_rcpt_timeout),
        ("--smtp-data-init-timeout", s.smtp_data_init_timeout),
        ("--smtp-data-block-timeout", s.smtp_data_block_timeout),
        ("--smtp-data-done-timeout", s.smtp_data_done_timeout),
        // 0 would return every message to its sender at its first deferral.
        ("--max-queue-lifetime", s.max_queue_lifetime),
    ] {
        if d.is_zero() {
            return Err(format!("{flag} must be more than 0"));
        }
    }
    // A warning due at or after the message is returned would never be sent.
    if s.delay_warning.is_some_and(|w| w >= s.max_queue_lifetime) {
        return Err(
            "--delay-warning must be shorter than --max-queue-lifetime (the message is \
             returned to its sender before the warning would be due)"
                .into(),
        );
    }
    // Below this, every attempt is retried in a storm of attempts, log lines and status
    // records (short values are for tests).
    if s.retry_initial < SHORTEST_WAIT {
        return Err("--retry-initial must be at least 100ms".into());
    }
    if s.retry_max < s.retry_initial {
        return Err("--retry-max must be at least --retry-initial".into());
    }
    let low = s
        .queue_low_water
        .unwrap_or(default_low_water(s.queue_high_water));
    if s.queue_high_water > 0 && low > s.queue_high_water {
        return Err("--queue-low-water cannot exceed --queue-high-water".into());
    }
    if s.queue_high_water == 0 && s.queue_low_water.is_some() {
        return Err(
            "--queue-low-water has no effect with --queue-high-water 0 (no mark): leave it out"
                .into(),
        );
    }
    if s.outbound_tls_ca.is_some() && tls != TlsPolicy::Required {
        return Err("--outbound-tls-ca needs --outbound-tls required".into());
    }
    if s.hold {
        return Ok(None);
    }
    Ok(Some(RelayConfig {
        hostname: String::new(),
        router: Router::new(relay_host, routes),
        dns_server,
        mx_port: s.mx_port,
        retry: RetryPolicy {
            initial: s.retry_initial,
            max: s.retry_max,
            lifetime: s.max_queue_lifetime,
        },
        delay_warning: s.delay_warning,
        max_per_destination: s.max_connections_per_destination,
        max_outbound: s.max_outbound_connections,
        max_in_flight: s.max_transactions_in_flight,
        idle_timeout: s.outbound_idle_timeout,
        tls,
        tls_ca: s.outbound_tls_ca.clone(),
        timeouts: Timeouts {
            connect: s.smtp_connect_timeout,
            greeting: s.smtp_greeting_timeout,
            mail: s.smtp_mail_timeout,
            rcpt: s.smtp_rcpt_timeout,
            data_init: s.smtp_data_init_timeout,
            data_block: s.smtp_data_block_timeout,
            data_done: s.smtp_data_done_timeout,
        },
        queue_high_water: s.queue_high_water,
        queue_low_water: low,
        queue_high_water_recipients: s.queue_high_water_recipients,
        queue_low_water_recipients: default_low_water(s.queue_high_water_recipients),
        ..RelayConfig::default()
    }))
}

/// The most executors per CPU `--cores` may ask for.
const MAX_CORES_PER_CPU: usize = 4;

/// Whether `a` and `b` cannot both be bound without SO_REUSEPORT: the same port, and the same
/// address or the wildcard of the other's family (an IPv4-mapped IPv6 address is IPv4). The
/// IPv6 wildcard also takes IPv4 where sockets are dual-stack (`dual_stack`, the kernel's
/// default, as postern's listeners leave IPV6_V6ONLY to it).
fn overlaps(a: SocketAddr, b: SocketAddr, dual_stack: bool) -> bool {
    let (x, y) = (a.ip().to_canonical(), b.ip().to_canonical());
    let covers = |wide: std::net::IpAddr, other: std::net::IpAddr| {
        wide.is_unspecified()
            && (wide.is_ipv4() == other.is_ipv4()
                || (dual_stack && wide.is_ipv6() && other.is_ipv4()))
    };
    a.port() == b.port() && (x == y || covers(x, y) || covers(y, x))
}

/// The shortest command timeout, session time and first retry delay that can work.
const SHORTEST_WAIT: Duration = Duration::from_millis(100);

/// `--max-connections-per-ip` when not given (and `--max-connections` is not lower).
const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 1000;

fn settings(mut s: Serve) -> Result<Settings, String> {
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cores = s.cores.unwrap_or(available);
    if cores == 0 {
        return Err("--cores must be at least 1".into());
    }
    // A queue ID tells the core that wrote it in two base-32 digits.
    if cores > postern_spool::MAX_CORES {
        return Err(format!(
            "--cores {cores} is more than {}, the most cores queue IDs tell apart",
            postern_spool::MAX_CORES
        ));
    }
    // Executors beyond the CPUs only share them; far beyond, each still reserves its spool
    // segments on disk and its io_uring memory.
    if cores > MAX_CORES_PER_CPU * available {
        return Err(format!(
            "--cores {cores} is more than {MAX_CORES_PER_CPU} per CPU this process may use ({available} {})",
            if available == 1 { "CPU" } else { "CPUs" }
        ));
    }
    if s.max_recipients < 100 {
        return Err("--max-recipients must be at least 100 (RFC 5321 4.5.3.1.8)".into());
    }
    let max_connections_per_ip = s
        .max_connections_per_ip
        .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_IP.min(s.max_connections));
    if s.max_connections == 0 {
        return Err("--max-connections must be at least 1".into());
    }
    if max_connections_per_ip == 0 {
        return Err("--max-connections-per-ip must be at least 1".into());
    }
    if max_connections_per_ip > s.max_connections {
        return Err("--max-connections-per-ip cannot exceed --max-connections".into());
    }
    if !s.listen_tls.is_empty() && s.tls_cert.is_none() {
        return Err("--listen-tls needs --tls-cert and --tls-key".into());
    }
    let no_relaying = s.relay_network.iter().any(|n| n.0.is_none());
    if no_relaying && s.relay_network.iter().any(|n| n.0.is_some()) {
        return Err("--relay-network none cannot be given with networks".into());
    }
    let no_cleartext = s.listen.iter().any(|l| l.0.is_none());
    let mut listen: Vec<SocketAddr> = s.listen.iter().filter_map(|l| l.0).collect();
    if no_cleartext && !listen.is_empty() {
        return Err("--listen none cannot be given with listen addresses".into());
    }
    if no_cleartext && s.listen_tls.is_empty() {
        return Err("--listen none leaves no listener: give --listen-tls".into());
    }
    if listen.is_empty() && s.listen_tls.is_empty() {
        // The default, where no listener is asked for: a server with only --listen-tls has
        // no cleartext port.
        listen.push(SocketAddr::from(([127, 0, 0, 1], 2525)));
    }
    if !(MIN_SEGMENT_SIZE..=1 << 32).contains(&s.spool_segment_size) {
        return Err(
            "--spool-segment-size must be between 128k and 4G (a message's envelope is kept \
             in one segment, and one of 100 recipients, the least RFC 5321 4.5.3.1.8 allows, \
             may take 78k)"
                .into(),
        );
    }
    // Each core keeps a segment it writes and a spare, both reserved in full on disk, and
    // watches its share of the mark: a share of two segments would refuse all mail on an
    // empty spool, so each core gets room for a third.
    let floor = s.spool_segment_size.saturating_mul(3 * cores as u64);
    if s.spool_high_water != 0 && s.spool_high_water < floor {
        return Err(format!(
            "--spool-high-water must be 0 or at least {} (three --spool-segment-size segments \
             per core: a core's segment and its spare are reserved on disk from its first message on)",
            floor
        ));
    }
    // Shorter than a round trip on many networks: every session would time out.
    if s.command_timeout < SHORTEST_WAIT {
        return Err("--command-timeout must be at least 100ms".into());
    }
    if s.max_session_time < SHORTEST_WAIT {
        return Err("--max-session-time must be at least 100ms".into());
    }
    if s.max_message_size == 0 {
        // SIZE 0 would tell clients there is no limit (RFC 1870).
        return Err("--max-message-size must be more than 0".into());
    }
    if s.max_message_size > MAX_MESSAGE_SIZE {
        // A SIZE past what 64 bits hold is read as the largest number they do, which only a
        // limit below it refuses; and no spool is meant to take a message of a tebibyte.
        return Err(format!(
            "--max-message-size {} is more than 1024G",
            s.max_message_size
        ));
    }
    // The system's name, the default, is checked like a given one: it goes into the banner,
    // EHLO and Received, where a space or a line end would break them.
    let own = s.hostname.is_none();
    let h = s.hostname.get_or_insert_with(system_hostname);
    if !h.is_ascii() || !postern_proto::address::is_valid_host_name(h) {
        return Err(if own {
            format!(
                "--hostname: the system's name {h:?} is not a host name; give one (an ASCII \
                 domain such as mx1.example.net)"
            )
        } else {
            format!(
                "--hostname: {h:?} is not a host name (an ASCII domain such as mx1.example.net)"
            )
        });
    }
    // A name of digits and dots is an IPv4 address to every client, not a host name (RFC
    // 5321 2.3.5: an address is written as a literal in brackets).
    if h.parse::<std::net::IpAddr>().is_ok()
        || h.trim_end_matches('.')
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'.')
    {
        let whose = if own { "the system's name " } else { "" };
        return Err(format!(
            "--hostname: {whose}{h:?} {}, not a host name; give a name (an ASCII domain \
             such as mx1.example.net)",
            if h.parse::<std::net::IpAddr>().is_ok() {
                "is an IP address"
            } else {
                "is all digits and dots, which clients read as an IP address"
            }
        ));
    }
    // `.example.net`: the subdomains of example.net.
    if let Some(d) = s
        .accept_domain
        .iter()
        .find(|d| !is_domain(d.strip_prefix('.').unwrap_or(d)))
    {
        return Err(format!("--accept-domain: {d:?} is not a domain"));
    }
    // Every listening address against those before it. SMTP listeners (SO_REUSEPORT) may
    // share a port at different addresses, wildcards included: the kernel gives a connection
    // to the most specific. The same address twice is a mistake. The metrics listener has no
    // SO_REUSEPORT: an SMTP listener at its address, or at the wildcard of its family on its
    // port, would make it fail to bind.
    let all: Vec<(&str, SocketAddr)> = listen
        .iter()
        .map(|a| ("--listen", *a))
        .chain(s.listen_tls.iter().map(|a| ("--listen-tls", *a)))
        .chain(
            s.metrics
                .and_then(|m| m.0)
                .iter()
                .map(|a| ("--metrics", *a)),
        )
        .collect();
    let dual_stack = postern_server::ipv6_is_dual_stack();
    for (i, &(flag, a)) in all.iter().enumerate() {
        if a.port() == 0 {
            continue;
        }
        let clash = |&&(earlier, b): &&(&str, SocketAddr)| {
            if flag == "--metrics" || earlier == "--metrics" {
                overlaps(a, b, dual_stack)
            } else {
                a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
            }
        };
        if let Some(&(earlier, b)) = all[..i].iter().find(clash) {
            return Err(if earlier == flag && a == b {
                format!("{flag}: {a} is given twice")
            } else {
                format!("{flag}: {a} is also a {earlier} address ({b})")
            });
        }
    }
    // Written with its domain in A-labels: mail for it may have come without SMTPUTF8, and
    // goes on so (RFC 6531 3.2). A UTF-8 local part has no such form.
    let postmaster = match &s.postmaster {
        Some(pm) => {
            let bare = pm.trim_start_matches('<').trim_end_matches('>');
            if postern_proto::address::parse_mailbox(bare).is_err() {
                return Err(format!(
                    "--postmaster: {pm:?} is not a mail address (local@domain)"
                ));
            }
            let ascii = postern_proto::address::mailbox_to_ascii(bare).ok_or_else(|| {
                let local_ascii = bare.rsplit_once('@').is_some_and(|(l, _)| l.is_ascii());
                if local_ascii {
                    format!("--postmaster: {pm:?} has a domain that is no valid IDNA name")
                } else {
                    format!(
                        "--postmaster: {pm:?} has a local part in UTF-8, which mail sent \
                         without SMTPUTF8 cannot be relayed to: give an ASCII address"
                    )
                }
            })?;
            Some(ascii.into_owned())
        }
        None => None,
    };
    let defaults = Settings::default();
    Ok(Settings {
        listen,
        listen_tls: s.listen_tls,
        cores,
        spool_dir: s.spool,
        spool_segment_size: s.spool_segment_size,
        spool_high_water: s.spool_high_water,
        held_queue_marks: (s.hold && s.queue_high_water > 0).then(|| {
            (
                s.queue_high_water,
                s.queue_low_water
                    .unwrap_or(default_low_water(s.queue_high_water)),
            )
        }),
        spool_damage_found: 0,
        sync_on_core: s.sync_on_core,
        hostname: s.hostname.unwrap_or_else(system_hostname),
        accept_domains: s.accept_domain,
        relay_networks: if s.relay_network.is_empty() {
            defaults.relay_networks
        } else {
            // Empty for `none`.
            s.relay_network.iter().filter_map(|n| n.0).collect()
        },
        max_message_size: s.max_message_size,
        max_recipients: s.max_recipients,
        max_junk_commands: s.max_junk_commands,
        max_connections: s.max_connections,
        // Set from the open-file limit at start-up (main).
        max_lingering: 256,
        max_connections_per_ip,
        ipv6_client_prefix: s.ipv6_client_prefix,
        proxy_from: s.proxy_from,
        command_timeout: s.command_timeout,
        max_session_time: s.max_session_time,
        shutdown_grace: s.shutdown_grace,
        drain_time: s.drain_time,
        tls: s
            .tls_cert
            .zip(s.tls_key)
            .map(|(cert, key)| TlsFiles { cert, key }),
        metrics: s.metrics.and_then(|m| m.0),
        postmaster,
        bare_newline: if s.reject_bare_newlines {
            BareNewlinePolicy::Reject
        } else {
            BareNewlinePolicy::Normalize
        },
    })
}

/// The default `--queue-low-water`: 80 % of the high mark, rounded down (19 gives 15).
fn default_low_water(high: u64) -> u64 {
    (u128::from(high) * 8 / 10) as u64
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_listen_address_must_be_an_ip_address_and_a_port() {
        assert_eq!(
            socket_address(" 127.0.0.1:2525 "),
            Ok("127.0.0.1:2525".parse().unwrap())
        );
        for bad in ["localhost:2525", "127.0.0.1", "[::1]"] {
            let e = socket_address(bad).unwrap_err();
            assert!(e.contains("an IP address and a port"), "{bad}: {e}");
        }
        // TCP takes no connections at a multicast or broadcast address.
        for (bad, kind) in [
            ("224.0.0.1:25", "multicast"),
            ("239.255.255.250:2525", "multicast"),
            ("[ff02::1]:25", "multicast"),
            ("255.255.255.255:25", "broadcast"),
            ("[::ffff:224.0.0.1]:25", "multicast"),
            ("[::ffff:255.255.255.255]:25", "broadcast"),
        ] {
            let e = socket_address(bad).unwrap_err();
            assert!(e.contains(&format!("is a {kind} address")), "{bad}: {e}");
        }
        // `none` is named where the value could have meant it, not after an address or a
        // network whose numbers are wrong.
        assert!(listen_address("nothing")
            .unwrap_err()
            .ends_with(", or none"));
        assert!(!listen_address("224.0.0.1:25").unwrap_err().contains("none"));
        assert!(!relay_network("10.0.0.0/33").unwrap_err().contains("none"));
        assert!(!relay_network("10.0.0.1/8").unwrap_err().contains("none"));
        assert!(relay_network("everyone")
            .unwrap_err()
            .ends_with(", or none"));
    }

    #[test]
    fn ipv4_mapped_networks_are_the_ipv4_networks_they_stand_for() {
        // Clients on an IPv6 socket with a mapped address are taken as IPv4: a network
        // written in the mapped form would match none of them.
        for (given, taken) in [
            ("::ffff:127.0.0.1", "127.0.0.1/32"),
            ("::ffff:127.0.0.0/104", "127.0.0.0/8"),
            ("::FFFF:10.1.0.0/112", "10.1.0.0/16"),
            ("::ffff:0:0/96", "0.0.0.0/0"),
            ("2001:db8::/32", "2001:db8::/32"),
            ("::1", "::1/128"),
            ("10.0.0.0/8", "10.0.0.0/8"),
        ] {
            assert_eq!(network(given), Ok(taken.parse().unwrap()), "{given}");
        }
        assert!(network("::ffff:127.0.0.1/104").is_err(), "host bits set");
    }

    #[test]
    fn numbers_and_names_from_the_environment_may_have_blanks_around_them() {
        use clap::Parser;
        let cli = Cli::try_parse_from([
            "postern",
            "serve",
            "--max-recipients",
            " 5 ",
            "--cores",
            "1\n",
            "--mx-port",
            " 2526",
            "--ipv6-client-prefix",
            "64 ",
            "--hostname",
            " mx1.example.net ",
            "--command-timeout",
            " 5s",
            "--spool",
            "/var/spool/postern\r\n",
            "--tls-cert",
            " /etc/postern/cert.pem",
            "--tls-key",
            "/etc/postern/key.pem\r",
            "--outbound-tls-ca",
            "/etc/postern/ca.pem ",
        ])
        .unwrap();
        let Command::Serve(s) = cli.command else {
            panic!("not serve")
        };
        // Paths too (a CR from an environment file written on another system).
        assert_eq!(s.spool, PathBuf::from("/var/spool/postern"));
        assert_eq!(s.tls_cert, Some(PathBuf::from("/etc/postern/cert.pem")));
        assert_eq!(s.tls_key, Some(PathBuf::from("/etc/postern/key.pem")));
        assert_eq!(
            s.outbound_tls_ca,
            Some(PathBuf::from("/etc/postern/ca.pem"))
        );
        assert_eq!(s.max_recipients, 5);
        assert_eq!(s.cores, Some(1));
        assert_eq!(s.mx_port, 2526);
        assert_eq!(s.ipv6_client_prefix, 64);
        assert_eq!(s.hostname.as_deref(), Some("mx1.example.net"));
        assert_eq!(s.command_timeout, Duration::from_secs(5));
        for (flag, bad) in [
            ("--mx-port", "0"),
            ("--ipv6-client-prefix", " 8"),
            ("--max-recipients", "5x"),
        ] {
            let e = Cli::try_parse_from(["postern", "serve", flag, bad]).unwrap_err();
            assert!(e.to_string().contains(flag), "{flag} {bad}: {e}");
        }
    }

    #[test]
    fn a_capital_m_in_a_duration_is_refused_not_taken_for_months() {
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        for bad in ["5M", "5 M", "1Mon"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("m for minutes"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_default_low_water_is_80_percent_of_the_high_mark_also_for_small_marks() {
        assert_eq!(default_low_water(19), 15);
        assert_eq!(default_low_water(5), 4);
        assert_eq!(default_low_water(1_000_000), 800_000);
        assert_eq!(
            default_low_water(u64::MAX),
            u64::MAX / 10 * 8 + u64::MAX % 10 * 8 / 10
        );
    }
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("1048576"), Ok(1_048_576));
        assert_eq!(parse_size("64k"), Ok(65_536));
    }

    #[test]
    fn the_smallest_segment_holds_the_envelope_of_100_recipients_of_the_longest_form() {
        use postern_proto::limits::{MIN_ENVELOPE_BYTES, MIN_RECIPIENTS};
        let needed = MIN_ENVELOPE_BYTES + MIN_RECIPIENTS * postern_spool::START_PER_RECIPIENT;
        let room = |size: u64| postern_spool::envelope_room(size);
        assert!(
            room(MIN_SEGMENT_SIZE) >= needed,
            "{} < {needed}",
            room(MIN_SEGMENT_SIZE)
        );
        // Half of it does not: the floor is not higher than it needs to be by half.
        assert!(room(MIN_SEGMENT_SIZE / 2) < needed);
        assert_eq!(parse_size("50M"), Ok(50 << 20));
        assert!(parse_size("5x").is_err());
        assert!(parse_size("99999999999G").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("soon").is_err());
        // Blanks inside a number were passed over: `1 5m` was fifteen minutes.
        for odd in ["1 5m", "1\t0s", "1  5m"] {
            assert!(parse_duration(odd).is_err(), "{odd}");
        }
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("5 m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration(" 5m "), Ok(Duration::from_secs(300)));
        for negative in ["-1", "-1s"] {
            let e = parse_duration(negative).unwrap_err();
            assert!(e.contains("is negative"), "{e}");
        }
        let e = parse_size("-1").unwrap_err();
        assert!(e.contains("is negative"), "{e}");
    }

    #[test]
    fn numbers_past_what_fits_are_too_large_not_misspelt() {
        for big in [
            "99999999999999999999",
            "99999999999999999999G",
            "17179869184G",
        ] {
            let e = parse_size(big).unwrap_err();
            assert_eq!(e, format!("'{big}' is too large"));
        }
        let e = parse_size("12x4k").unwrap_err();
        assert!(e.contains("is not a size"), "{e}");
        let e = parse_duration("99999999999999999999999s").unwrap_err();
        assert!(e.contains("is more than 10 years"), "{e}");
        // Parts adding up to the parser's largest value (its own sum panicked).
        for big in [
            "18446744073709551615s1000ms",
            "18446744073709551615s 1000ms",
            "9000000000000000000s 9446744073709551615s 1000ms",
        ] {
            let e = parse_duration(big).unwrap_err();
            assert_eq!(e, format!("'{big}' is more than 10 years"));
        }
        for fine in ["0.5ns", "1.0000000001s", "1000000000.5ns", "0.0000001us"] {
            let e = parse_duration(fine).unwrap_err();
            assert_eq!(e, format!("'{fine}' is finer than a nanosecond"));
        }
        for uneven in ["1.001h", "0.1234d"] {
            let e = parse_duration(uneven).unwrap_err();
            assert_eq!(
                e,
                format!("'{uneven}' does not come to whole seconds: write it in smaller units")
            );
        }
    }

    #[test]
    fn durations_add_their_parts_and_take_no_blank_inside_a_number() {
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration(" 1.5h "), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s 500ms"), Ok(Duration::from_millis(2500)));
        assert_eq!(
            parse_duration("3650d"),
            Ok(Duration::from_secs(3650 * 86400))
        );
        for wrong in ["1. 5h", "1 .5h", "1 5m", "5", "", "h", "1h 30"] {
            let e = parse_duration(wrong).unwrap_err();
            assert!(e.contains("is not a duration"), "{wrong:?}: {e}");
        }
        let e = parse_duration("3000d 1000d").unwrap_err();
        assert!(e.contains("is more than 10 years"), "{e}");
    }
}
