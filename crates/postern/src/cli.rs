//! Command-line flags. Every flag can also come from `POSTERN_<NAME>` (for example
//! `POSTERN_MAX_MESSAGE_SIZE=10M`); repeatable flags take a comma-separated list there.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;
use postern_proto::BareNewlinePolicy;
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
    /// Accept mail over SMTP and store it durably in the spool.
    Serve(Serve),
}

#[derive(Args, Debug)]
struct Serve {
    /// SMTP listen address (repeatable).
    #[arg(
        long,
        env = "POSTERN_LISTEN",
        value_delimiter = ',',
        default_value = "127.0.0.1:2525"
    )]
    listen: Vec<SocketAddr>,
    /// Implicit-TLS (RFC 8314) listen address (repeatable); needs --tls-cert and --tls-key.
    #[arg(long, env = "POSTERN_LISTEN_TLS", value_delimiter = ',')]
    listen_tls: Vec<SocketAddr>,
    /// Executors, one per core [default: all cores].
    #[arg(long, env = "POSTERN_CORES")]
    cores: Option<usize>,
    /// Spool directory.
    #[arg(long, env = "POSTERN_SPOOL", default_value = "./postern-spool")]
    spool: PathBuf,
    /// Size of each spool segment file, reserved on disk when it is created.
    #[arg(long, env = "POSTERN_SPOOL_SEGMENT_SIZE", default_value = "64M", value_parser = parse_size)]
    spool_segment_size: u64,
    /// Our host name, in the banner, EHLO and Received headers [default: the system's].
    #[arg(long, env = "POSTERN_HOSTNAME")]
    hostname: Option<String>,
    /// A domain to accept mail for from anyone (repeatable).
    #[arg(long, env = "POSTERN_ACCEPT_DOMAIN", value_delimiter = ',')]
    accept_domain: Vec<String>,
    /// A network allowed to relay to any domain (repeatable) [default: 127.0.0.0/8, ::1/128].
    #[arg(long, env = "POSTERN_RELAY_NETWORK", value_delimiter = ',')]
    relay_network: Vec<IpNet>,
    /// Largest message, advertised in SIZE (bytes; k, M, G suffixes are powers of 1024).
    #[arg(long, env = "POSTERN_MAX_MESSAGE_SIZE", default_value = "50M", value_parser = parse_size)]
    max_message_size: u64,
    /// Recipients per transaction (at least 100).
    #[arg(long, env = "POSTERN_MAX_RECIPIENTS", default_value_t = 1000)]
    max_recipients: usize,
    /// Concurrent connections, all cores together; more get 421 4.3.2.
    #[arg(long, env = "POSTERN_MAX_CONNECTIONS", default_value_t = 20_000)]
    max_connections: usize,
    /// Concurrent connections from one client address; more get 421 4.7.0.
    #[arg(long, env = "POSTERN_MAX_CONNECTIONS_PER_IP", default_value_t = 1000)]
    max_connections_per_ip: usize,
    /// Longest wait for a command or body bytes (RFC 5321 4.5.3.2), e.g. 500ms, 3s, 5m.
    #[arg(long, env = "POSTERN_COMMAND_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    command_timeout: Duration,
    /// Longest session, whatever the client does.
    #[arg(long, env = "POSTERN_MAX_SESSION_TIME", default_value = "1h", value_parser = parse_duration)]
    max_session_time: Duration,
    /// Longest wait for transactions in flight when stopping.
    #[arg(long, env = "POSTERN_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    shutdown_grace: Duration,
    /// PEM certificate chain; with --tls-key, enables STARTTLS.
    #[arg(long, env = "POSTERN_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "POSTERN_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Prometheus metrics, /healthz and /readyz on this address.
    #[arg(long, env = "POSTERN_METRICS")]
    metrics: Option<SocketAddr>,
    /// Refuse bodies with bare CR or LF (550 5.6.11) instead of storing them as CRLF.
    #[arg(long, env = "POSTERN_REJECT_BARE_NEWLINES")]
    reject_bare_newlines: bool,
}

/// Parses `1048576`, `64k`, `50M`, `2G` (suffixes are powers of 1024).
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 10),
        Some((i, 'm' | 'M')) => (&s[..i], 20),
        Some((i, 'g' | 'G')) => (&s[..i], 30),
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size like 1048576, 64k or 50M"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// Parses `500ms`, `3s`, `5m`, `1h`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|_| format!("'{s}' is not a duration like 500ms, 3s, 5m or 1h"))
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
pub(crate) fn parse() -> Result<Option<Settings>, String> {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
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
            return Err("a command is required: try 'postern serve' or 'postern --help'".into());
        }
        Err(e) => {
            // clap's first paragraph, on one line: what is wrong and which flag.
            let rendered = e.render().to_string();
            let first: Vec<&str> = rendered
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            return Err(first.join(" ").trim_start_matches("error: ").to_owned());
        }
    };
    let Command::Serve(s) = cli.command;
    settings(s).map(Some)
}

fn settings(s: Serve) -> Result<Settings, String> {
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cores = s.cores.unwrap_or(available);
    if cores == 0 {
        return Err("--cores must be at least 1".into());
    }
    if s.max_recipients < 100 {
        return Err("--max-recipients must be at least 100 (RFC 5321 4.5.3.1.8)".into());
    }
    if s.max_connections == 0 || s.max_connections_per_ip == 0 {
        return Err("--max-connections and --max-connections-per-ip must be at least 1".into());
    }
    if s.max_connections_per_ip > s.max_connections {
        return Err("--max-connections-per-ip cannot exceed --max-connections".into());
    }
    if !s.listen_tls.is_empty() && s.tls_cert.is_none() {
        return Err("--listen-tls needs --tls-cert and --tls-key".into());
    }
    if s.listen.is_empty() && s.listen_tls.is_empty() {
        return Err("--listen: at least one listen address is needed".into());
    }
    if !(64 * 1024..=1 << 32).contains(&s.spool_segment_size) {
        return Err("--spool-segment-size must be between 64k and 4G".into());
    }
    if s.command_timeout.is_zero() {
        return Err("--command-timeout must be more than 0".into());
    }
    let defaults = Settings::default();
    Ok(Settings {
        listen: s.listen,
        listen_tls: s.listen_tls,
        cores,
        spool_dir: s.spool,
        spool_segment_size: s.spool_segment_size,
        hostname: s.hostname.unwrap_or_else(system_hostname),
        accept_domains: s.accept_domain,
        relay_networks: if s.relay_network.is_empty() {
            defaults.relay_networks
        } else {
            s.relay_network
        },
        max_message_size: s.max_message_size,
        max_recipients: s.max_recipients,
        max_connections: s.max_connections,
        max_connections_per_ip: s.max_connections_per_ip,
        command_timeout: s.command_timeout,
        max_session_time: s.max_session_time,
        shutdown_grace: s.shutdown_grace,
        tls: s
            .tls_cert
            .zip(s.tls_key)
            .map(|(cert, key)| TlsFiles { cert, key }),
        metrics: s.metrics,
        bare_newline: if s.reject_bare_newlines {
            BareNewlinePolicy::Reject
        } else {
            BareNewlinePolicy::Normalize
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("1048576"), Ok(1_048_576));
        assert_eq!(parse_size("64k"), Ok(65_536));
        assert_eq!(parse_size("50M"), Ok(50 << 20));
        assert!(parse_size("5x").is_err());
        assert!(parse_size("99999999999G").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("soon").is_err());
    }
}
