//! The command line: `postern-load send` and `postern-load sink`, with every flag's value
//! checked by clap so that a wrong flag or value is one line naming it and exit code 2.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::units;

/// postern-load: SMTP load generator and sink.
#[derive(Debug, Parser)]
#[command(name = "postern-load", version, about, propagate_version = true)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The two tools.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Send mail to an SMTP server as fast as it takes it (or at a fixed rate) and report.
    Send(Box<SendArgs>),
    /// Receive mail and throw it away (or record its IDs), with optional faults.
    Sink(Box<SinkArgs>),
}

/// A list of sizes with weights (`1k`, or `1k:70,10k:25,1m:5`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SizeMix(pub Vec<(u64, u32)>);

/// End-of-data reply codes with weights (`250:98,451:1,550:1`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplyMix(pub Vec<(u16, u32)>);

/// CPUs to pin executors to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

fn size(s: &str) -> Result<u64, String> {
    units::parse_size("size", s).map_err(|e| e.to_string())
}

fn chunk_size(s: &str) -> Result<u64, String> {
    match size(s)? {
        0 => Err("a chunk size must be above zero".into()),
        n => Ok(n),
    }
}

fn size_mix(s: &str) -> Result<SizeMix, String> {
    let mix = units::parse_weighted("--size", s, |v| units::parse_size("--size", v))
        .map_err(|e| e.to_string())?;
    if mix.iter().any(|(n, _)| *n == 0) {
        return Err("a message size must be above zero".into());
    }
    Ok(SizeMix(mix))
}

fn reply_mix(s: &str) -> Result<ReplyMix, String> {
    let mix = units::parse_weighted("--reply-mix", s, |v| {
        v.parse::<u16>()
            .ok()
            // 250 is end of data's one positive reply (RFC 5321 4.3.2), the one the sink
            // sends; another 2xx would be counted and never said.
            .filter(|c| *c == 250 || (400..600).contains(c))
            .ok_or_else(|| {
                crate::LoadError::flag(
                    "--reply-mix",
                    format!("{v:?} is not 250 or a 4xx or 5xx code"),
                )
            })
    })
    .map_err(|e| e.to_string())?;
    Ok(ReplyMix(mix))
}

/// A count above zero (said so, rather than as a range up to 2^64 - 1).
fn at_least_one(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(0) => Err("it takes a whole number of at least 1".into()),
        Ok(n) => Ok(n),
        Err(_)
            if s.strip_prefix('-')
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) =>
        {
            Err(format!("{s:?} is negative"))
        }
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

fn rate(s: &str) -> Result<f64, String> {
    units::parse_rate("--rate", s).map_err(|e| e.to_string())
}

fn duration(s: &str) -> Result<Duration, String> {
    units::parse_duration("duration", s).map_err(|e| e.to_string())
}

/// How long to send, or for the sink to live: above zero (a run of no time does nothing).
fn run_duration(s: &str) -> Result<Duration, String> {
    match duration(s)? {
        d if d.is_zero() => Err("a run must last more than zero".into()),
        d => Ok(d),
    }
}

/// `HOST:PORT` (an IPv6 address in brackets), with a port that can be connected to.
fn target(s: &str) -> Result<String, String> {
    let port = s
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty() && (!host.contains(':') || host.ends_with(']')))
        .map(|(_, port)| port);
    match port.map(str::parse::<u16>) {
        Some(Ok(p)) if p > 0 => Ok(s.to_owned()),
        _ => Err(format!(
            "{s:?} is not HOST:PORT (127.0.0.1:2525, [::1]:25, localhost:2525)"
        )),
    }
}

/// The longest address a pattern may make: a path is at most 256 octets with its angle
/// brackets (RFC 5321 4.5.3.1.3).
const MAX_ADDRESS: usize = 254;

/// An address pattern for MAIL or RCPT: it goes between `<` and `>` on a command line, so no
/// angle brackets, line ends, other control characters or spaces; ASCII only, as the generator
/// does not send SMTPUTF8; and short enough for a path once `{seq}` and `{r}` are filled in.
/// (`--from ''` is the null reverse path.)
fn address_pattern(s: &str) -> Result<String, String> {
    if let Some(c) = s
        .chars()
        .find(|c| c.is_control() || c.is_whitespace() || matches!(c, '<' | '>'))
    {
        return Err(format!("{s:?} holds {c:?}, which an address cannot"));
    }
    if let Some(c) = s.chars().find(|c| !c.is_ascii()) {
        return Err(format!(
            "{s:?} holds {c:?}: addresses must be ASCII (the generator does not send SMTPUTF8)"
        ));
    }
    // The widest filling: a 20-digit sequence number for each {seq} or {n}, 4 digits per {r}.
    let longest = crate::send::message::address(s, u64::MAX, 9999).len();
    if longest > MAX_ADDRESS {
        return Err(format!(
            "makes addresses of up to {longest} octets; a path holds at most {MAX_ADDRESS}"
        ));
    }
    Ok(s.to_owned())
}

/// A recipient pattern: an address pattern, not empty.
fn recipient_pattern(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("a recipient cannot be empty".into());
    }
    address_pattern(s)
}

/// A message size limit above zero (SIZE 0 tells clients there is none, RFC 1870).
fn size_limit(s: &str) -> Result<u64, String> {
    match size(s)? {
        0 => Err("the limit must be above zero".into()),
        n => Ok(n),
    }
}

/// A duration above zero (a timeout of zero would fail every wait).
fn timeout(s: &str) -> Result<Duration, String> {
    match duration(s)? {
        d if d.is_zero() => Err("a timeout must be above zero".into()),
        d => Ok(d),
    }
}

/// A host name for EHLO, a banner or an EHLO reply: not empty, no white space or control
/// characters.
fn helo(s: &str) -> Result<String, String> {
    if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{s:?} is not a host name (no spaces or control characters)"
        ));
    }
    Ok(s.to_owned())
}

fn cpus(s: &str) -> Result<CpuList, String> {
    crate::executors::parse_cpus(s)
        .map(CpuList)
        .map_err(|e| e.to_string())
}

/// Flags of `postern-load send`.
#[derive(Clone, Debug, Args)]
// `--connections -1` is a wrong value for that flag, named as such, not an unknown argument.
#[command(allow_negative_numbers = true)]
pub struct SendArgs {
    /// The server, HOST:PORT. Loopback only unless --allow-remote.
    #[arg(long, default_value = "127.0.0.1:2525", value_parser = target)]
    pub target: String,
    /// Allow a target that is not a loopback address [default: off].
    #[arg(long)]
    pub allow_remote: bool,
    /// Concurrent connections, spread over the threads.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub connections: u32,
    /// Messages to send in all (default 1000 unless --duration is given).
    #[arg(long, conflicts_with = "duration", value_parser = at_least_one)]
    pub messages: Option<u64>,
    /// Start messages for this long instead of a number of messages (30s, 2m); those in flight
    /// at the end still get their replies (each within --timeout), and count. [default: none: --messages ends the run]
    #[arg(long, value_parser = run_duration, allow_hyphen_values = true)]
    pub duration: Option<Duration>,
    /// Messages per connection before QUIT and a new connection; 0 keeps each connection.
    #[arg(long, default_value_t = 0)]
    pub msgs_per_conn: u64,
    /// Message size in bytes, headers included (1024, 10k, 1m), or a mix: 1k:70,10k:25,1m:5.
    /// The generator's own header fields set a floor of about 210 bytes: a smaller size is
    /// sent at that floor.
    #[arg(long, default_value = "1k", value_parser = size_mix)]
    pub size: SizeMix,
    /// Recipients per message.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub rcpts: u32,
    /// Sender address; {seq} is replaced by the message's sequence number.
    #[arg(long, default_value = "load{seq}@sender.test", value_parser = address_pattern)]
    pub from: String,
    /// Recipient address; {seq} is the message's sequence number, {r} the recipient's index.
    #[arg(long, default_value = "rcpt{r}@sink.test", value_parser = recipient_pattern)]
    pub to: String,
    /// Pipeline MAIL, RCPT and DATA/BDAT when the server offers PIPELINING [default: off].
    #[arg(long)]
    pub pipelining: bool,
    /// With --pipelining, up to this many messages in flight on each connection: the next
    /// message's MAIL, RCPT and DATA or BDAT go out right after the previous body, before
    /// its reply (RFC 2920 3.1). 1 waits for each message's reply before the next. Fewer
    /// with many --rcpts (at most 4096 replies awaited). With --rate, a message due while
    /// others are in flight starts once the next reply is in.
    #[arg(long, default_value_t = 1, requires = "pipelining",
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub window: u32,
    /// Send bodies with BDAT when the server offers CHUNKING [default: off: DATA].
    #[arg(long)]
    pub bdat: bool,
    /// With --bdat, send each body as BDAT chunks of at most this many bytes, the last one
    /// `BDAT n LAST`, all written back to back (needs --pipelining and a server that offers
    /// PIPELINING; otherwise one `BDAT n LAST`). Also the largest single write of a body.
    /// When absent: one `BDAT n LAST` per body, written 256k at a time. Raised for a message
    /// it would cut into more chunks than one message may have replies awaited (4096, less
    /// its MAIL and RCPTs).
    #[arg(long, value_parser = chunk_size, requires = "bdat")]
    pub chunk_size: Option<u64>,
    /// Start TLS on every connection (the server must offer STARTTLS) [default: off].
    #[arg(long)]
    pub starttls: bool,
    /// Open loop: start messages at this rate (500/s), latency measured from each message's
    /// intended start. [default: none: closed loop, each connection sends its next message once the last is answered]
    #[arg(long, value_parser = rate)]
    pub rate: Option<f64>,
    /// Executors (one thread each; no more than --connections).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: u16,
    /// Pin executors to these CPUs (0,1 or 2-5), taken in turn when there are more threads;
    /// unpinned when absent.
    #[arg(long, value_parser = cpus)]
    pub cpus: Option<CpuList>,
    /// Longest wait for a connection, a whole reply (however it trickles in) or a write.
    #[arg(long, default_value = "30s", value_parser = timeout, allow_hyphen_values = true)]
    pub timeout: Duration,
    /// The name sent with EHLO.
    #[arg(long, default_value = "postern-load.test", value_parser = helo)]
    pub helo: String,
    /// Write the report as JSON to this file. [default: none]
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write HdrHistogram interval logs (one interval a second) to this file. [default: none]
    #[arg(long)]
    pub hdr_log: Option<PathBuf>,
    /// Draw the latency percentile curves into this SVG file. [default: none]
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// No progress line, even on a terminal [default: off].
    #[arg(long)]
    pub quiet: bool,
}

/// Flags of `postern-load sink`.
#[derive(Clone, Debug, Args)]
// `--connections -1` is a wrong value for that flag, named as such, not an unknown argument.
#[command(allow_negative_numbers = true)]
pub struct SinkArgs {
    /// Address to listen on (port 0 picks one; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:2526")]
    pub listen: SocketAddr,
    /// Executors (one thread and one SO_REUSEPORT listener each).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: u16,
    /// Pin executors to these CPUs (0,1 or 2-5), taken in turn when there are more threads;
    /// unpinned when absent.
    #[arg(long, value_parser = cpus)]
    pub cpus: Option<CpuList>,
    /// Our name in the banner and EHLO reply.
    #[arg(long, default_value = "sink.postern-load.test", value_parser = helo)]
    pub hostname: String,
    /// Largest message accepted (advertised with SIZE); above zero.
    #[arg(long, default_value = "100m", value_parser = size_limit)]
    pub max_size: u64,
    /// Write each accepted message's sequence header and Message-ID to this file, one line
    /// each as they come (the file is made anew, or emptied, at start). [default: none]
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// Certificate chain (PEM) for STARTTLS. [default: none, STARTTLS not offered]
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) for STARTTLS. [default: none]
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Do not offer CHUNKING (and BINARYMIME), like an older server [default: off].
    #[arg(long)]
    pub no_chunking: bool,
    /// Do not offer PIPELINING, like an older server [default: off].
    #[arg(long)]
    pub no_pipelining: bool,
    /// Answer end of data with these codes (250, or a 4xx or 5xx) in these proportions
    /// (250:98,451:1,550:1); a 421 also closes the connection, as a server going down does.
    /// [default: 250 to every message]
    #[arg(long, value_parser = reply_mix)]
    pub reply_mix: Option<ReplyMix>,
    /// Wait this long before answering each end of data. [default: none, answered at once]
    #[arg(long, value_parser = duration, allow_hyphen_values = true)]
    pub delay: Option<Duration>,
    /// Close a connection without a reply at its N-th end of data. [default: never]
    #[arg(long, value_parser = at_least_one)]
    pub drop_after: Option<u64>,
    /// Serve counters as Prometheus text at http://ADDR/metrics. [default: none, not served]
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Close a session silent for this long.
    #[arg(long, default_value = "60s", value_parser = timeout, allow_hyphen_values = true)]
    pub timeout: Duration,
    /// Exit by itself after this long (otherwise on SIGTERM or SIGINT); above zero. [default: none]
    #[arg(long, value_parser = run_duration, allow_hyphen_values = true)]
    pub lifetime: Option<Duration>,
}
