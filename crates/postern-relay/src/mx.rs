//! Next-hop lookup for outbound mail: MX records, the implicit MX, null MX and domain literals
//! (RFC 5321 section 5.1, RFC 7505).
//!
//! postern's cores run glommio executors, but hickory-resolver needs tokio. A [`Resolver`] owns
//! one OS thread (`postern-dns`) running a current-thread tokio runtime and one hickory resolver,
//! whose TTL cache is therefore shared by every core. A lookup is sent to that thread through a
//! channel; the whole lookup (MX, then the addresses of every MX host) runs there, and the answer
//! comes back through a oneshot channel whose waker is called from the resolver thread, which
//! glommio accepts as a foreign wake. A lookup costs two cross-thread hand-offs and no core ever
//! blocks on DNS. The thread ends when the last handle is dropped.
//!
//! Decisions beyond the RFC text:
//!
//! * **Null MX.** A domain has a null MX when every MX record it publishes names the root (`.`);
//!   RFC 7505 section 3 specifies preference 0, but a lone root target at another preference
//!   names no host either, so it is read the same way. Mail is then refused at once
//!   ([`MxError::NullMx`], 5.1.10). A root MX published *alongside* real MX hosts breaks RFC 7505
//!   ("MUST NOT advertise any other MX RR"); the root entry names no host, so it is skipped and
//!   the real hosts are used: the domain still lists servers that take its mail.
//! * **MX hosts without addresses.** Each MX host's A and AAAA records are looked up; hosts with
//!   no address are left out of the answer and the rest keep their order. When no host has an
//!   address the lookup fails: [`MxError::Temporary`] if any address lookup failed for a reason
//!   that may pass (SERVFAIL, timeout, network), otherwise [`MxError::NoMxAddress`] (every host is
//!   NXDOMAIN or has no address records), which is permanent: 5.4.4, routing information the
//!   DNS does not give (RFC 3463 3.5), as against 5.1.2 for a domain with no MX at all and no
//!   address, which cannot take mail.
//! * **Malformed MX host names.** An MX record whose target is no host name (a label with a
//!   space, a control character, `@` or raw UTF-8 in it: anything but letters, digits, hyphens
//!   and underscores, the last for the internal names some sites use) names no host this
//!   server should connect to, and is skipped without a lookup. When every target but the
//!   root is such a name, the domain cannot be routed: [`MxError::MalformedMx`], permanent,
//!   5.4.4, as for MX hosts without addresses (a name that cannot be a host's would get no
//!   address from a well-kept DNS either).
//! * **Address order.** Within one host, IPv4 addresses come before IPv6 ones, each family
//!   shuffled on every lookup (the DNS, or its cache, may give them in the same order every time,
//!   and only the first few addresses are tried: all of them get their turn). Many senders' IPv6
//!   paths are less reliable and large receivers judge IPv6 senders more strictly (reverse DNS),
//!   so IPv4 is tried first.
//! * **Equal preferences.** MX hosts of equal preference are shuffled on every lookup (RFC 5321
//!   section 5.1 asks for randomisation to spread load); a host named by several MX records
//!   keeps its best preference only. The best [`MAX_MX_HOSTS`] hosts are resolved (counted
//!   after this server, by its name, and the hosts not preferred to it are taken out); the
//!   next ones when none of those has an address, or to finish the preference the first
//!   ones ended in (a host there may be this server by its address), up to 64 in all.
//! * **A backup MX without a primary.** When this server is an MX host of the domain and no
//!   more preferred host has an address (its lookup failed, for now or for good), the mail
//!   waits ([`MxError::NoPrimary`], 4.4.4) rather than bouncing: the primary's DNS may be
//!   mended, and a backup must not fail mail for good over it (Postfix does the same).
//! * **Names.** Domains are looked up fully qualified (a trailing dot is added), so no search
//!   list applies; UTF-8 domains are converted to A-labels. Hosts are reported lower-case, as
//!   A-labels, without the trailing dot.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::thread;
use std::time::{Duration, Instant};

use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::TokioResolver;
use postern_proto::Host;
use rand::seq::SliceRandom;
use tokio::sync::{mpsc, oneshot};

/// The most MX hosts whose addresses one lookup resolves at once (the best ones after
/// sorting). Only when none of them has an address are the next ones resolved, up to
/// [`MX_HOST_ROUNDS`] times as many in all; a domain publishing more gets the rest ignored
/// rather than costing a query each.
pub const MAX_MX_HOSTS: usize = 16;
/// How many rounds of [`MAX_MX_HOSTS`] lookups one MX lookup may take.
pub const MX_HOST_ROUNDS: usize = 4;

/// How long one DNS query waits for an answer before it is sent again, for
/// [`Resolver::with_server`].
pub const DEFAULT_QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// How many times a query that got no answer (timeout, network error, SERVFAIL) is sent again
/// before the lookup fails as [`MxError::Temporary`], for [`Resolver::with_server`].
pub const DEFAULT_QUERY_RETRIES: usize = 2;

/// One place mail for a domain can be handed to, in the order it should be tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextHop {
    /// The MX host, lower-case, as A-labels, without the trailing dot; the domain itself for the
    /// implicit MX; the address's text (without brackets or `IPv6:` tag) for a domain literal.
    pub host: String,
    /// The MX preference (lower is tried first); 0 for the implicit MX and domain literals.
    pub preference: u16,
    /// The host's addresses, never empty: IPv4 first, then IPv6.
    pub addrs: Vec<IpAddr>,
}

/// What an MX lookup found: the hosts to try, and what [`Myself::drop_from`] needs to tell a
/// loop from a primary that cannot be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxHops {
    /// The hosts with addresses, in the order to try them.
    pub hops: Vec<NextHop>,
    /// The best preference among the hosts the domain publishes, those without an address
    /// included; 0 for the implicit MX and domain literals.
    pub best: u16,
    /// The best preference among the hosts whose addresses could not be looked up for now
    /// (a DNS failure that may pass): a host less preferred than it is used in its place.
    pub pending: Option<u16>,
    /// When the first of the records this answer rests on (the MX records, the hosts'
    /// address records) runs past its TTL, so that the answer may have changed; `None` for a
    /// domain literal, which rests on no record.
    pub valid_until: Option<Instant>,
}

impl MxHops {
    /// Hosts found without MX records (a host's own addresses, the implicit MX), good until
    /// `valid_until`.
    fn plain((hops, valid_until): (Vec<NextHop>, Instant)) -> MxHops {
        MxHops {
            hops,
            best: 0,
            pending: None,
            valid_until: Some(valid_until),
        }
    }
}

/// Why no next hop was found; each variant says whether to bounce or to retry later.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MxError {
    /// The domain publishes a null MX (RFC 7505): it accepts no mail. Permanent, 5.1.10.
    #[error("the domain publishes a null MX and accepts no mail")]
    NullMx,
    /// The domain does not exist (NXDOMAIN), or is not a valid domain name or address literal.
    /// Permanent, 5.1.2.
    #[error("the domain does not exist")]
    NoSuchDomain,
    /// The domain exists but has no MX and no A/AAAA records. Permanent, 5.1.2.
    #[error("the domain has no mail host with an address")]
    NoMailHost,
    /// An address literal that no host can have as its own (unspecified, multicast,
    /// broadcast) or that names none without its link (IPv6 link-local): a connection to
    /// `0.0.0.0` would even reach this machine. Permanent, 5.1.2.
    #[error("{0} is not a host's address")]
    NotHostAddress(IpAddr),
    /// The domain's MX hosts are all NXDOMAIN or without address records. Permanent, 5.4.4
    /// (unable to route).
    #[error("the domain's MX hosts have no address")]
    NoMxAddress,
    /// The domain's MX records name no host but by malformed names (the first given here,
    /// escaped). Permanent, 5.4.4 (unable to route).
    #[error("the domain's MX records name no host but by malformed names (such as {0})")]
    MalformedMx(String),
    /// This server is among the domain's MX hosts and no host is more preferred than it (RFC
    /// 5321 section 5.1): the mail would come back here. Permanent, 5.4.6.
    #[error("mail for the domain loops back to this server (MX host {0})")]
    LoopsToSelf(String),
    /// This server is among the domain's MX hosts (named here) and the hosts more preferred
    /// than it have no address, for now or for good: a backup MX holds the mail for its
    /// primary. Retry later, 4.4.4.
    #[error("this server is a backup MX (MX host {0}) and no more preferred host has an address")]
    NoPrimary(String),
    /// The lookup failed for a reason that may pass (SERVFAIL, timeout, network error, the
    /// resolver thread gone). Retry later, 4.4.3.
    #[error("DNS lookup failed temporarily: {0}")]
    Temporary(String),
}

impl MxError {
    /// Whether the message should bounce now (`true`) or be retried later (`false`).
    pub fn is_permanent(&self) -> bool {
        !matches!(self, MxError::Temporary(_) | MxError::NoPrimary(_))
    }

    /// The enhanced status code (RFC 3463) for the failure, for the DSN or the log.
    pub fn enhanced(&self) -> &'static str {
        match self {
            MxError::NullMx => "5.1.10",
            MxError::NoSuchDomain | MxError::NoMailHost | MxError::NotHostAddress(_) => "5.1.2",
            MxError::NoMxAddress | MxError::MalformedMx(_) => "5.4.4",
            MxError::LoopsToSelf(_) => "5.4.6",
            MxError::Temporary(_) => "4.4.3",
            MxError::NoPrimary(_) => "4.4.4",
        }
    }
}

/// This server, as an MX host can name it: by its host name, or by an address and port it
/// takes SMTP on.
#[derive(Debug, Clone, Copy)]
pub struct Myself<'a> {
    /// Our host name (`--hostname`).
    pub hostname: &'a str,
    /// Our SMTP listen addresses; an unspecified address (`0.0.0.0`, `[::]`) stands for every
    /// address of this machine.
    pub listen: &'a [SocketAddr],
    /// The port MX hosts are reached on.
    pub port: u16,
}

impl Myself<'_> {
    /// Whether `hop` is this server: its name is ours, or one of its addresses is one we take
    /// SMTP on at the MX port. `local` lists this machine's addresses; it is asked only when we
    /// listen on an unspecified address at that port.
    fn is(&self, hop: &NextHop, local: &mut impl FnMut() -> Vec<IpAddr>) -> bool {
        let name = self.hostname.trim_end_matches('.');
        if !name.is_empty() && hop.host.eq_ignore_ascii_case(name) {
            return true;
        }
        let at_port = || self.listen.iter().filter(|l| l.port() == self.port);
        // An IPv4 address written as IPv6 (`::ffff:192.0.2.1`) reaches the IPv4 socket.
        let ours = |ip: &IpAddr, l: &SocketAddr| l.ip().to_canonical() == ip.to_canonical();
        if hop.addrs.iter().any(|ip| at_port().any(|l| ours(ip, l))) {
            return true;
        }
        let wildcard_v4 = at_port().any(|l| l.ip() == IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let wildcard_v6 = at_port().any(|l| l.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED));
        if !wildcard_v4 && !wildcard_v6 {
            return false;
        }
        let mine = local();
        hop.addrs.iter().any(|ip| {
            let ip = &ip.to_canonical();
            // A socket on [::] also takes IPv4 unless it is IPv6-only: counted as ours.
            let family = match ip {
                IpAddr::V4(_) => wildcard_v4 || wildcard_v6,
                IpAddr::V6(_) => wildcard_v6,
            };
            family && (ip.is_loopback() || mine.contains(ip))
        })
    }

    /// The MX hosts left once this server is taken out (RFC 5321 section 5.1): when it is
    /// among them, every host at its preference or a worse one goes, itself included, so mail
    /// only ever moves to hosts more preferred than this one. None left is
    /// [`MxError::LoopsToSelf`] (mail for a domain whose best MX is this server, that this
    /// server has no route for), or [`MxError::NoPrimary`] when the domain publishes more
    /// preferred hosts that had no address.
    pub fn drop_from(
        &self,
        found: MxHops,
        mut local: impl FnMut() -> Vec<IpAddr>,
    ) -> Result<Vec<NextHop>, MxError> {
        let MxHops { hops, best, .. } = found;
        let mut known = None;
        let mut local = || known.get_or_insert_with(&mut local).clone();
        // The most preferred host that is this server names it in the error: not another
        // host of the same preference.
        let Some((own, host)) = hops
            .iter()
            .filter(|hop| self.is(hop, &mut local))
            .min_by_key(|hop| hop.preference)
            .map(|hop| (hop.preference, hop.host.clone()))
        else {
            return Ok(hops);
        };
        let left: Vec<NextHop> = hops.into_iter().filter(|h| h.preference < own).collect();
        if left.is_empty() {
            return Err(if best < own {
                MxError::NoPrimary(host)
            } else {
                MxError::LoopsToSelf(host)
            });
        }
        Ok(left)
    }
}

/// The addresses of this machine's interfaces (empty if they cannot be listed).
pub fn local_addresses() -> Vec<IpAddr> {
    let Ok(all) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    all.filter_map(|ifa| {
        let addr = ifa.address?;
        if let Some(v4) = addr.as_sockaddr_in() {
            Some(IpAddr::V4(Ipv4Addr::from(v4.ip())))
        } else {
            addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        }
    })
    .collect()
}

/// One lookup handed to the resolver thread.
struct Job {
    domain: String,
    kind: Lookup,
    reply: oneshot::Sender<Result<MxHops, MxError>>,
}

/// What a [`Job`] looks up.
enum Lookup {
    /// The domain's MX hosts. With our host name, to take out of them (with all not preferred
    /// to it) before their addresses are looked up.
    Mx(Option<String>),
    /// A host's own addresses only, no MX (a route's host or the relay host).
    Host,
}

/// A handle to the resolver thread; cheap to clone, usable from any thread or executor.
///
/// The thread, with its runtime and cache, lives until the last handle is dropped.
#[derive(Debug, Clone)]
pub struct Resolver {
    jobs: mpsc::UnboundedSender<Job>,
}

impl Resolver {
    /// A resolver using the system configuration (`/etc/resolv.conf`: name servers, timeout and
    /// attempts; the search list never applies, names are looked up fully qualified).
    pub fn system() -> io::Result<Resolver> {
        Self::start(|| {
            let builder = TokioResolver::builder_tokio().map_err(io::Error::other)?;
            builder.build().map_err(io::Error::other)
        })
    }

    /// A resolver asking only `server` (UDP, then TCP when an answer is truncated), with
    /// [`DEFAULT_QUERY_TIMEOUT`] and [`DEFAULT_QUERY_RETRIES`]; for `--dns-server ADDR` and
    /// tests. `/etc/hosts` is not consulted.
    pub fn with_server(server: SocketAddr) -> io::Result<Resolver> {
        Self::with_server_timeout(server, DEFAULT_QUERY_TIMEOUT, DEFAULT_QUERY_RETRIES)
    }

    /// Like [`Resolver::with_server`], with each query waiting `timeout` for an answer and sent
    /// again up to `retries` times before the lookup fails as [`MxError::Temporary`].
    pub fn with_server_timeout(
        server: SocketAddr,
        timeout: Duration,
        retries: usize,
    ) -> io::Result<Resolver> {
        Self::start(move || {
            let mut udp = ConnectionConfig::udp();
            udp.port = server.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = server.port();
            let name_server = NameServerConfig::new(server.ip(), true, vec![udp, tcp]);
            let config = ResolverConfig::from_name_servers(vec![name_server]);
            let mut options = ResolverOpts::default();
            options.timeout = timeout;
            options.attempts = retries;
            options.use_hosts_file = ResolveHosts::Never;
            TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
                .with_options(options)
                .build()
                .map_err(io::Error::other)
        })
    }

    /// Starts the resolver thread; `build` runs on it, inside its runtime, and its error is
    /// returned here.
    fn start<F>(build: F) -> io::Result<Resolver>
    where
        F: FnOnce() -> io::Result<TokioResolver> + Send + 'static,
    {
        let (jobs, mut queue) = mpsc::unbounded_channel::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
        thread::Builder::new()
            .name("postern-dns".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let resolver = {
                    let _context = runtime.enter();
                    match build() {
                        Ok(resolver) => resolver,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    }
                };
                let _ = ready_tx.send(Ok(()));
                runtime.block_on(async move {
                    while let Some(job) = queue.recv().await {
                        tokio::spawn(serve(resolver.clone(), job));
                    }
                });
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Resolver { jobs }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::other(
                "the DNS resolver thread stopped while starting",
            )),
        }
    }

    /// The ordered next hops for mail to `domain` (RFC 5321 section 5.1): MX hosts by
    /// preference, equal preferences shuffled, each with its addresses; or the domain itself
    /// (the implicit MX) when it has no MX records; or the address of a domain literal
    /// (`[192.0.2.1]`, `[IPv6:2001:db8::1]`), which needs no lookup.
    ///
    /// The future may be awaited on any executor; the lookup runs on the resolver thread and
    /// is abandoned there when the future is dropped.
    pub async fn next_hops(&self, domain: &str) -> Result<Vec<NextHop>, MxError> {
        self.hops(domain, None).await.map(|found| found.hops)
    }

    /// [`Resolver::next_hops`] for mail to `domain` on this server named `hostname`: an MX
    /// host of that name is this server, so it and every host not preferred to it leave the
    /// list by name, whether or not the name has an address (RFC 5321 section 5.1, "its own
    /// name"); none left is [`MxError::LoopsToSelf`], and more preferred hosts none of which
    /// has an address [`MxError::NoPrimary`]. Hosts that are this server by an address are
    /// for [`Myself::drop_from`], once addresses are known.
    pub async fn mx_next_hops(&self, domain: &str, hostname: &str) -> Result<MxHops, MxError> {
        let name = hostname.trim_end_matches('.');
        self.hops(domain, (!name.is_empty()).then(|| name.to_owned()))
            .await
    }

    /// The addresses of the host `host` itself (A and AAAA, following CNAMEs), with no MX
    /// lookup: the next hop of a route or of the relay host is the host the operator named
    /// (RFC 5321 5.1 applies to a mail domain, not to a configured host). A name that does
    /// not exist or has no address is a temporary failure here: the operator's setting is
    /// wrong, and mail waits for it to be fixed rather than bouncing.
    pub async fn host_next_hops(&self, host: &str) -> Result<Vec<NextHop>, MxError> {
        self.host_hops(host).await.map(|found| found.hops)
    }

    /// [`Resolver::host_next_hops`] with when the answer's records run past their TTL (`best`
    /// and `pending` say nothing here).
    pub async fn host_hops(&self, host: &str) -> Result<MxHops, MxError> {
        self.ask(host, Lookup::Host).await
    }

    async fn hops(&self, domain: &str, own_name: Option<String>) -> Result<MxHops, MxError> {
        self.ask(domain, Lookup::Mx(own_name)).await
    }

    async fn ask(&self, domain: &str, kind: Lookup) -> Result<MxHops, MxError> {
        if let Some(literal) = domain_literal(domain) {
            let addr = literal?;
            return Ok(MxHops {
                hops: vec![NextHop {
                    host: addr.to_string(),
                    preference: 0,
                    addrs: vec![addr],
                }],
                best: 0,
                pending: None,
                valid_until: None,
            });
        }
        let (reply, answer) = oneshot::channel();
        let job = Job {
            domain: domain.to_owned(),
            kind,
            reply,
        };
        if self.jobs.send(job).is_err() {
            return Err(MxError::Temporary(
                "the DNS resolver thread has stopped".into(),
            ));
        }
        answer.await.unwrap_or_else(|_| {
            Err(MxError::Temporary(
                "the DNS resolver thread dropped the lookup".into(),
            ))
        })
    }
}

/// Parses a domain literal (RFC 5321 section 4.1.3): `None` when `domain` is not one,
/// `Some(Err)` when it is malformed or of an unsupported kind (general address literals).
fn domain_literal(domain: &str) -> Option<Result<IpAddr, MxError>> {
    if !domain.starts_with('[') {
        return None;
    }
    Some(match postern_proto::address::parse_host(domain) {
        Ok(Host::Ipv4(a)) => host_address(IpAddr::V4(a)),
        Ok(Host::Ipv6(a)) => host_address(IpAddr::V6(a)),
        Ok(Host::Domain(_)) | Err(_) => Err(MxError::NoSuchDomain),
    })
}

/// `ip` when a host can have it as its own, reachable from here: not the unspecified address
/// (`0.0.0.0`, `::`, which a connection takes for this machine), nor a multicast or broadcast
/// address (RFC 1122 3.2.1.3, RFC 4291 2.5.2), also when written as IPv4-mapped IPv6, nor an
/// IPv6 link-local one (`fe80::/10`, RFC 4291 2.5.6), which names no host without the link
/// it is on, and neither the DNS nor a literal says which (a connection fails with EINVAL).
fn host_address(ip: IpAddr) -> Result<IpAddr, MxError> {
    let canonical = ip.to_canonical();
    let unusable = canonical.is_unspecified()
        || canonical.is_multicast()
        || canonical == IpAddr::V4(Ipv4Addr::BROADCAST)
        || matches!(canonical, IpAddr::V6(v6) if v6.is_unicast_link_local());
    if unusable {
        Err(MxError::NotHostAddress(ip))
    } else {
        Ok(ip)
    }
}

/// Runs one job on the resolver thread; gives up when the caller stops waiting.
async fn serve(resolver: TokioResolver, job: Job) {
    let Job {
        domain,
        kind,
        mut reply,
    } = job;
    let work = async {
        match kind {
            Lookup::Host => host_lookup(&resolver, &domain).await.map(MxHops::plain),
            Lookup::Mx(own_name) => lookup(&resolver, &domain, own_name.as_deref()).await,
        }
    };
    let answer = tokio::select! {
        answer = work => answer,
        () = reply.closed() => return,
    };
    let _ = reply.send(answer);
}

/// What one record-set lookup found.
enum Found<T> {
    /// Records of the type asked for (possibly none, after filtering a CNAME-only answer),
    /// and when the answer runs past its TTL.
    Records(Vec<T>, Instant),
    /// The name does not exist.
    NxDomain,
    /// The name exists but has no records of that type.
    NoData,
    /// The lookup failed for a reason that may pass.
    Failed(String),
}

/// Classifies a hickory lookup result for `query`, keeping the records `pick` selects.
///
/// Only the records of the name asked about count, or of the names its CNAMEs in the answer
/// lead to (RFC 1034 3.6.2, 5.3.3; RFC 2181 5.4.1): a name server (a forwarder, a spoofer)
/// may put records of other names in the answer section, and an MX or an address of another
/// name taken for this one sends its mail to a host the domain never named.
fn classify<T>(
    result: Result<hickory_resolver::lookup::Lookup, NetError>,
    query: &Name,
    pick: impl Fn(&RData) -> Option<T>,
) -> Found<T> {
    match result {
        Ok(lookup) => {
            let answers = lookup.answers();
            let mut names = vec![query.clone()];
            // A chain of CNAMEs, followed from the name asked about (bounded: a loop adds no
            // name, and a chain is at most as long as the answer).
            for _ in 0..answers.len() {
                let next = answers.iter().find_map(|r| match &r.data {
                    RData::CNAME(target)
                        if names.iter().any(|n| n.eq_ignore_root(&r.name))
                            && !names.iter().any(|n| n.eq_ignore_root(&target.0)) =>
                    {
                        Some(target.0.clone())
                    }
                    _ => None,
                });
                match next {
                    Some(name) => names.push(name),
                    None => break,
                }
            }
            Found::Records(
                answers
                    .iter()
                    .filter(|r| names.iter().any(|n| n.eq_ignore_root(&r.name)))
                    .filter_map(|r| pick(&r.data))
                    .collect(),
                lookup.valid_until(),
            )
        }
        Err(e) if e.is_nx_domain() => Found::NxDomain,
        Err(e) if e.is_no_records_found() => Found::NoData,
        Err(e) => Found::Failed(e.to_string()),
    }
}

/// The whole lookup for one domain, on the resolver thread.
async fn lookup(
    resolver: &TokioResolver,
    domain: &str,
    own_name: Option<&str>,
) -> Result<MxHops, MxError> {
    let name = fqdn(domain).ok_or(MxError::NoSuchDomain)?;
    let mx = resolver.lookup(name.clone(), RecordType::MX).await;
    let (records, mx_until) = match classify(mx, &name, |data| match data {
        RData::MX(mx) => Some((mx.preference, mx.exchange.clone())),
        _ => None,
    }) {
        Found::Records(records, until) => (records, Some(until)),
        Found::NoData => (Vec::new(), None),
        Found::NxDomain => return Err(MxError::NoSuchDomain),
        Found::Failed(why) => return Err(MxError::Temporary(format!("MX {domain}: {why}"))),
    };

    if records.is_empty() {
        // The domain is its own mail host (the implicit MX): this server, by its name.
        let host = host_text(&name);
        if own_name.is_some_and(|own| host.eq_ignore_ascii_case(own)) {
            return Err(MxError::LoopsToSelf(host));
        }
        return implicit_mx(resolver, name).await.map(MxHops::plain);
    }
    let (records, malformed): (Vec<_>, Vec<_>) = records
        .into_iter()
        .partition(|(_, exchange)| exchange.is_root() || is_host_name(exchange));
    if let Some((_, first)) = malformed.first() {
        tracing::debug!(%domain, malformed = malformed.len(), first = %host_text(first),
            "MX records with malformed host names; skipped");
        if records.iter().all(|(_, exchange)| exchange.is_root()) {
            return Err(MxError::MalformedMx(host_text(first)));
        }
    }
    if records.iter().all(|(_, exchange)| exchange.is_root()) {
        return Err(MxError::NullMx);
    }
    let hosts = order_mx(records);
    let best = hosts.first().map_or(0, |(preference, _)| *preference);
    // This server goes first, by name, then the list is cut: a long list must not hide it.
    let (mut hosts, own) = match own_name {
        Some(own) => drop_own_name(hosts, own)?,
        None => (hosts, None),
    };
    hosts.truncate(MAX_MX_HOSTS * MX_HOST_ROUNDS);

    // The best MAX_MX_HOSTS hosts are resolved at once (the set aborts them if this lookup is
    // abandoned); only when none of them has an address, the next ones. A preference the
    // round cut through is resolved whole, in the next rounds: a host there may be this
    // server by its address (`Myself::drop_from`), which RFC 5321 5.1 has every host of that
    // preference dropped with.
    let mut hops = Vec::new();
    let mut temporary = None;
    let mut valid_until = mx_until;
    let mut hosts = hosts.into_iter().peekable();
    // The preference to finish: that of the last host of the round that found the first
    // addresses; after it, only hosts of that preference are resolved.
    let mut finish: Option<u16> = None;
    loop {
        let round: Vec<(u16, Name)> = match finish {
            None => hosts.by_ref().take(MAX_MX_HOSTS).collect(),
            Some(p) => std::iter::from_fn(|| hosts.next_if(|(q, _)| *q == p))
                .take(MAX_MX_HOSTS)
                .collect(),
        };
        let Some(&(last, _)) = round.last() else {
            break;
        };
        resolve_hosts(
            resolver,
            domain,
            round,
            &mut hops,
            &mut temporary,
            &mut valid_until,
        )
        .await?;
        if finish.is_none() && !hops.is_empty() {
            finish = Some(last);
        }
    }
    if !hops.is_empty() {
        let pending = temporary.map(|(preference, _)| preference);
        return Ok(MxHops {
            hops,
            best,
            pending,
            valid_until,
        });
    }
    Err(match (own, temporary.map(|(_, why)| why)) {
        // A backup MX whose primaries have no address keeps the mail for them.
        (Some(own), _) => MxError::NoPrimary(own),
        (None, Some(why)) => MxError::Temporary(why),
        (None, None) => MxError::NoMxAddress,
    })
}

/// Resolves `hosts` (MX hosts of `domain`, in order) at once, adding those with addresses to
/// `hops`, and the first temporary failure to `temporary` (with its host's preference, the
/// best of those that failed for now, as the hosts come in preference order); `valid_until`
/// is brought forward to the earliest expiry of the addresses found.
async fn resolve_hosts(
    resolver: &TokioResolver,
    domain: &str,
    hosts: Vec<(u16, Name)>,
    hops: &mut Vec<NextHop>,
    temporary: &mut Option<(u16, String)>,
    valid_until: &mut Option<Instant>,
) -> Result<(), MxError> {
    let mut tasks = tokio::task::JoinSet::new();
    for (index, (preference, exchange)) in hosts.into_iter().enumerate() {
        let resolver = resolver.clone();
        tasks.spawn(async move {
            let addrs = addresses(&resolver, exchange.clone()).await;
            (index, preference, exchange, addrs)
        });
    }
    let mut resolved = Vec::with_capacity(tasks.len());
    while let Some(done) = tasks.join_next().await {
        resolved.push(done.map_err(|e| MxError::Temporary(format!("MX host lookup task: {e}")))?);
    }
    resolved.sort_by_key(|(index, ..)| *index);

    for (_, preference, exchange, addrs) in resolved {
        let host = host_text(&exchange);
        match addrs {
            Addresses::Found(addrs, until) => {
                *valid_until = Some(valid_until.map_or(until, |v| v.min(until)));
                hops.push(NextHop {
                    host,
                    preference,
                    addrs,
                });
            }
            Addresses::None => {
                tracing::debug!(%domain, %host, "MX host has no address; skipped");
            }
            Addresses::Failed(why) => {
                tracing::debug!(%domain, %host, %why, "MX host address lookup failed; skipped");
                temporary.get_or_insert((preference, format!("MX host {host} of {domain}: {why}")));
            }
        }
    }
    Ok(())
}

/// The addresses of a configured host, for [`Resolver::host_next_hops`], and when they run
/// past their TTL.
async fn host_lookup(
    resolver: &TokioResolver,
    host: &str,
) -> Result<(Vec<NextHop>, Instant), MxError> {
    let Some(name) = fqdn(host) else {
        return Err(MxError::Temporary(format!("{host} is not a host name")));
    };
    match addresses(resolver, name).await {
        Addresses::Found(addrs, until) => Ok((
            vec![NextHop {
                host: host.trim_end_matches('.').to_owned(),
                preference: 0,
                addrs,
            }],
            until,
        )),
        Addresses::None => Err(MxError::Temporary(format!(
            "the host {host} has no address (A or AAAA record) or does not exist"
        ))),
        Addresses::Failed(why) => Err(MxError::Temporary(format!("A/AAAA {host}: {why}"))),
    }
}

/// The domain as a fully qualified name (so no search list applies), or `None` if it is not a
/// domain name. An ASCII name that IDNA's rules refuse (an underscore inside a label, as in
/// the container service names a route or relay host may give) is taken as it is written.
fn fqdn(domain: &str) -> Option<Name> {
    if domain.is_empty() || domain == "." {
        return None;
    }
    let mut name = Name::from_utf8(domain)
        .or_else(|e| {
            if domain.is_ascii() {
                Name::from_ascii(domain)
            } else {
                Err(e)
            }
        })
        .ok()?;
    name.set_fqdn(true);
    Some(name)
}

/// The MX hosts in the order to try them: root targets dropped, each host once at its best
/// preference, shuffled, then stably sorted by preference (so equal preferences stay
/// shuffled). The caller cuts the list to [`MAX_MX_HOSTS`], once this server is out of it.
fn order_mx(records: Vec<(u16, Name)>) -> Vec<(u16, Name)> {
    let mut hosts: Vec<(u16, Name)> = Vec::with_capacity(records.len());
    // Where each name is in `hosts` (names compare and hash without regard to case): a look
    // through `hosts` for each record made a published set of thousands of names cost
    // seconds on the thread that makes every core's lookups.
    let mut seen: std::collections::HashMap<Name, usize> =
        std::collections::HashMap::with_capacity(records.len());
    for (preference, exchange) in records {
        if exchange.is_root() {
            continue;
        }
        match seen.entry(exchange) {
            std::collections::hash_map::Entry::Occupied(at) => {
                let known = &mut hosts[*at.get()];
                known.0 = known.0.min(preference);
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                hosts.push((preference, slot.key().clone()));
                slot.insert(hosts.len() - 1);
            }
        }
    }
    hosts.shuffle(&mut rand::rng());
    hosts.sort_by_key(|(preference, _)| *preference);
    hosts
}

/// The MX hosts more preferred than the one named `own` (this server), when it is among
/// them, with this server's host name; none is [`MxError::LoopsToSelf`]. By name alone: a
/// name of ours without an address in the DNS (an internal name, a failed lookup) is still
/// this server.
#[allow(clippy::type_complexity)]
fn drop_own_name(
    hosts: Vec<(u16, Name)>,
    own: &str,
) -> Result<(Vec<(u16, Name)>, Option<String>), MxError> {
    let Some((preference, name)) = hosts
        .iter()
        .find(|(_, exchange)| host_text(exchange).eq_ignore_ascii_case(own))
        .map(|(p, exchange)| (*p, host_text(exchange)))
    else {
        return Ok((hosts, None));
    };
    let left: Vec<(u16, Name)> = hosts.into_iter().filter(|(p, _)| *p < preference).collect();
    if left.is_empty() {
        return Err(MxError::LoopsToSelf(name));
    }
    Ok((left, Some(name)))
}

/// The implicit MX (RFC 5321 section 5.1): the domain itself at preference 0, if it has an
/// address, and when its addresses run past their TTL.
async fn implicit_mx(
    resolver: &TokioResolver,
    name: Name,
) -> Result<(Vec<NextHop>, Instant), MxError> {
    let host = host_text(&name);
    match addresses(resolver, name).await {
        Addresses::Found(addrs, until) => Ok((
            vec![NextHop {
                host,
                preference: 0,
                addrs,
            }],
            until,
        )),
        Addresses::None => Err(MxError::NoMailHost),
        Addresses::Failed(why) => Err(MxError::Temporary(format!("A/AAAA {host}: {why}"))),
    }
}

/// What the address lookups for one host found.
enum Addresses {
    /// IPv4 addresses, then IPv6 addresses, never empty; and when the first of the answers
    /// that gave them runs past its TTL.
    Found(Vec<IpAddr>, Instant),
    /// Neither lookup found an address, and both answered definitively (NXDOMAIN or no data).
    None,
    /// No address was found and at least one lookup failed for a reason that may pass.
    Failed(String),
}

/// Once the A lookup has found addresses, or found that the name does not exist, how long the
/// AAAA answer is waited for: a name server that drops AAAA queries (some still do) costs
/// this, not its whole timeout and retries, for every connection to that host.
const OTHER_FAMILY_GRACE: Duration = Duration::from_millis(500);

/// Once the AAAA lookup has found addresses, how long the A answer is waited for: longer, as
/// IPv4 is the family tried first and may be all this machine can reach (an AAAA answer that
/// came first, from a cache, must not cost the host its IPv4 addresses), enough for one
/// query sent again after the resolver's default timeout (5 s), and still bounded against a
/// name server that drops A queries.
const IPV4_GRACE: Duration = Duration::from_secs(6);

/// Looks up a host's A and AAAA records at the same time.
async fn addresses(resolver: &TokioResolver, host: Name) -> Addresses {
    let pick_v4 = |data: &RData| match data {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        _ => None,
    };
    let pick_v6 = |data: &RData| match data {
        RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
        _ => None,
    };
    let usable = |found: &Found<IpAddr>| matches!(found, Found::Records(ips, _) if ips.iter().any(|ip| host_address(*ip).is_ok()));
    // The other family's answer, in full where the first found no address (and did not find
    // the name missing), for `grace` otherwise (then given up as no records).
    async fn the_other<F>(
        wait_in_full: bool,
        grace: Duration,
        other: F,
        host: &Name,
        pick: impl Fn(&RData) -> Option<IpAddr>,
    ) -> Found<IpAddr>
    where
        F: std::future::Future<Output = Result<hickory_resolver::lookup::Lookup, NetError>> + Unpin,
    {
        if wait_in_full {
            classify(other.await, host, pick)
        } else {
            match tokio::time::timeout(grace, other).await {
                Ok(answer) => classify(answer, host, pick),
                Err(_) => Found::NoData,
            }
        }
    }
    let a = resolver.lookup(host.clone(), RecordType::A);
    let aaaa = resolver.lookup(host.clone(), RecordType::AAAA);
    tokio::pin!(a, aaaa);
    let (v4, v6) = tokio::select! {
        first = &mut a => {
            let v4 = classify(first, &host, pick_v4);
            let in_full = !usable(&v4) && !matches!(v4, Found::NxDomain);
            let v6 = the_other(in_full, OTHER_FAMILY_GRACE, &mut aaaa, &host, pick_v6).await;
            (v4, v6)
        }
        first = &mut aaaa => {
            let v6 = classify(first, &host, pick_v6);
            let v4 = the_other(!usable(&v6), IPV4_GRACE, &mut a, &host, pick_v4).await;
            (v4, v6)
        }
    };
    // NXDOMAIN to A: the name does not exist, and an AAAA lookup that failed cannot make it a
    // name that may come to have an address. (Not the other way round: some name servers
    // answer AAAA queries NXDOMAIN for names that have only A records.)
    let no_such_name = matches!(v4, Found::NxDomain);
    let mut addrs = Vec::new();
    let mut failed = None;
    let mut valid_until: Option<Instant> = None;
    for found in [v4, v6] {
        match found {
            Found::Records(mut records, until) => {
                // An address no host can have (a parked domain's `0.0.0.0`) is no address.
                records.retain(|ip| host_address(*ip).is_ok());
                records.shuffle(&mut rand::rng());
                if !records.is_empty() {
                    valid_until = Some(valid_until.map_or(until, |v| v.min(until)));
                }
                addrs.append(&mut records);
            }
            Found::NxDomain | Found::NoData => {}
            Found::Failed(why) => {
                failed.get_or_insert(why);
            }
        }
    }
    if no_such_name {
        failed = None;
    }
    match (addrs.is_empty(), failed, valid_until) {
        (false, _, Some(until)) => Addresses::Found(addrs, until),
        // (Addresses always come with their answer's expiry.)
        (_, Some(why), _) => Addresses::Failed(why),
        _ => Addresses::None,
    }
}

/// Whether `name` can be a mail host's: every label of letters, digits, hyphens and
/// underscores (see the module's notes).
fn is_host_name(name: &Name) -> bool {
    name.iter().all(|label| {
        !label.is_empty()
            && label
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// A name as a host string: lower-case A-labels without the trailing dot.
fn host_text(name: &Name) -> String {
    let mut text = name.to_lowercase().to_ascii();
    if text.ends_with('.') {
        text.pop();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(host: &str, preference: u16, addr: &str) -> NextHop {
        NextHop {
            host: host.into(),
            preference,
            addrs: vec![addr.parse().unwrap()],
        }
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    /// mx.example.net, listening on `listen`, with MX hosts on port 25.
    fn myself(listen: &[SocketAddr]) -> Myself<'_> {
        Myself {
            hostname: "mx.example.net",
            listen,
            port: 25,
        }
    }

    /// `hops` as a lookup finds them, the best preference published among them.
    fn found(hops: Vec<NextHop>) -> MxHops {
        let best = hops.iter().map(|h| h.preference).min().unwrap_or(0);
        MxHops {
            hops,
            best,
            pending: None,
            valid_until: None,
        }
    }

    fn hosts(r: &Result<Vec<NextHop>, MxError>) -> Vec<String> {
        match r {
            Ok(hops) => hops.iter().map(|h| h.host.clone()).collect(),
            Err(e) => vec![e.to_string()],
        }
    }

    #[test]
    fn this_server_and_every_host_not_preferred_to_it_leave_the_mx_list() {
        let listen = [addr("192.0.2.10:25")];
        let me = myself(&listen);
        let never = || -> Vec<IpAddr> { panic!("no wildcard listen: interfaces not listed") };
        let list = || {
            vec![
                hop("a.example.org", 5, "198.51.100.1"),
                hop("MX.Example.NET", 10, "198.51.100.2"),
                hop("c.example.org", 10, "198.51.100.3"),
                hop("d.example.org", 20, "198.51.100.4"),
            ]
        };
        // By name (any case): what is at 10 or worse goes, what is better stays.
        assert_eq!(
            hosts(&me.drop_from(found(list()), never)),
            ["a.example.org"]
        );
        // Not among them: the list is untouched.
        let other = vec![
            hop("a.example.org", 5, "198.51.100.1"),
            hop("d.example.org", 20, "198.51.100.4"),
        ];
        assert_eq!(
            hosts(&me.drop_from(found(other), never)),
            ["a.example.org", "d.example.org"]
        );
        // By address and port: the best host is this server, nothing is left.
        let by_addr = vec![
            hop("mail.example.org", 10, "192.0.2.10"),
            hop("b.example.org", 20, "198.51.100.5"),
        ];
        let r = me.drop_from(found(by_addr), never);
        assert!(
            matches!(&r, Err(MxError::LoopsToSelf(h)) if h == "mail.example.org"),
            "{r:?}"
        );
        assert_eq!(r.unwrap_err().enhanced(), "5.4.6");
        // Another host at the same preference, listed first: the error still names the one
        // that is this server.
        let equal = vec![
            hop("b.example.org", 10, "198.51.100.5"),
            hop("mail.example.org", 10, "192.0.2.10"),
        ];
        let r = me.drop_from(found(equal), never);
        assert!(
            matches!(&r, Err(MxError::LoopsToSelf(h)) if h == "mail.example.org"),
            "{r:?}"
        );
        // The same address at another port than the MX port is someone else.
        let other_port = Myself { port: 2525, ..me };
        let by_addr = vec![hop("mail.example.org", 10, "192.0.2.10")];
        assert_eq!(
            hosts(&other_port.drop_from(found(by_addr), never)),
            ["mail.example.org"]
        );
    }

    #[test]
    fn a_backup_mx_whose_better_hosts_have_no_address_waits_for_them() {
        let listen = [addr("192.0.2.10:25")];
        let me = myself(&listen);
        let never = || -> Vec<IpAddr> { panic!("no wildcard listen: interfaces not listed") };
        // The domain publishes a host at 5 that had no address: this server, at 10, is a
        // backup with no primary to hand the mail to. It waits; it is no loop.
        let hops = vec![
            hop("mail.example.org", 10, "192.0.2.10"),
            hop("b.example.org", 20, "198.51.100.5"),
        ];
        let r = me.drop_from(
            MxHops {
                hops: hops.clone(),
                best: 5,
                pending: None,
                valid_until: None,
            },
            never,
        );
        assert_eq!(r, Err(MxError::NoPrimary("mail.example.org".into())));
        let e = r.unwrap_err();
        assert_eq!(e.enhanced(), "4.4.4");
        assert!(!e.is_permanent());
        // Nothing better published: a loop, permanent.
        let r = me.drop_from(
            MxHops {
                hops,
                best: 10,
                pending: None,
                valid_until: None,
            },
            never,
        );
        assert!(matches!(&r, Err(e @ MxError::LoopsToSelf(_)) if e.is_permanent()));
    }

    #[test]
    fn the_machines_addresses_include_loopback() {
        let mine = local_addresses();
        assert!(mine.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)), "{mine:?}");
    }

    #[test]
    fn a_wildcard_listen_makes_every_local_address_this_server() {
        let listen = [addr("0.0.0.0:25")];
        let me = myself(&listen);
        let mut asked = 0;
        let local = || {
            asked += 1;
            vec!["203.0.113.7".parse().unwrap()]
        };
        let hops = vec![
            hop("a.example.org", 5, "198.51.100.1"),
            hop("b.example.org", 10, "203.0.113.7"),
            hop("c.example.org", 15, "127.0.0.2"),
        ];
        assert_eq!(hosts(&me.drop_from(found(hops), local)), ["a.example.org"]);
        assert_eq!(asked, 1, "interfaces listed once per lookup");
        // A loopback MX is this server too; an IPv6 one is not (no IPv6 listener).
        let hops = vec![
            hop("v6.example.org", 5, "::1"),
            hop("lo.example.org", 10, "127.0.0.1"),
        ];
        assert_eq!(
            hosts(&me.drop_from(found(hops), Vec::new)),
            ["v6.example.org"]
        );
        let hops = vec![hop("lo.example.org", 10, "127.0.0.1")];
        assert!(matches!(
            me.drop_from(found(hops), Vec::new),
            Err(MxError::LoopsToSelf(_))
        ));
    }

    #[test]
    fn an_ipv4_address_of_ours_written_as_ipv6_is_this_server() {
        // `::ffff:127.0.0.50` reaches the socket on 127.0.0.50: the mail would loop.
        let listen = [addr("127.0.0.50:25")];
        let me = myself(&listen);
        let hops = vec![
            hop("mapped.example.org", 10, "::ffff:127.0.0.50"),
            hop("backup.example.org", 20, "192.0.2.9"),
        ];
        assert!(matches!(
            me.drop_from(found(hops), Vec::new),
            Err(MxError::LoopsToSelf(h)) if h == "mapped.example.org"
        ));
        // With a wildcard listener, a mapped local address is ours too.
        let listen = [addr("0.0.0.0:25")];
        let me = myself(&listen);
        let hops = vec![
            hop("better.example.org", 5, "192.0.2.1"),
            hop("mapped.example.org", 10, "::ffff:203.0.113.7"),
        ];
        let local = || vec!["203.0.113.7".parse().unwrap()];
        assert_eq!(
            hosts(&me.drop_from(found(hops), local)),
            ["better.example.org"]
        );
    }

    #[test]
    fn literals_parse_without_lookup() {
        assert_eq!(
            domain_literal("[192.0.2.1]"),
            Some(Ok("192.0.2.1".parse().unwrap()))
        );
        assert_eq!(
            domain_literal("[IPv6:2001:db8::1]"),
            Some(Ok("2001:db8::1".parse().unwrap()))
        );
        assert_eq!(
            domain_literal("[ipv6:::1]"),
            Some(Ok("::1".parse().unwrap()))
        );
        assert_eq!(domain_literal("example.com"), None);
        for bad in [
            "[::1]",
            "[192.0.2]",
            "[192.0.2.1",
            "[x-tag:abc]",
            "[IPv6:192.0.2.1]",
            "[IPv6:1:2:3:4:5:6:7::]",
        ] {
            assert_eq!(
                domain_literal(bad),
                Some(Err(MxError::NoSuchDomain)),
                "{bad}"
            );
        }
    }

    #[test]
    fn this_server_leaves_the_mx_list_by_its_name_before_any_address_is_looked_up() {
        let name = |s: &str| Name::from_ascii(s).unwrap();
        let list = || {
            order_mx(vec![
                (5, name("primary.example.")),
                (10, name("MX.Example.Net.")),
                (10, name("twin.example.")),
                (20, name("worse.example.")),
            ])
        };
        let (left, own) = drop_own_name(list(), "mx.example.net").unwrap();
        let hosts: Vec<String> = left.iter().map(|(_, n)| host_text(n)).collect();
        assert_eq!(hosts, ["primary.example"]);
        assert_eq!(own.as_deref(), Some("mx.example.net"));
        let (all, own) = drop_own_name(list(), "other.example.net").unwrap();
        assert_eq!((all.len(), own), (4, None));
        let best = order_mx(vec![
            (10, name("mx.example.net.")),
            (20, name("worse.example.")),
        ]);
        assert_eq!(
            drop_own_name(best, "mx.example.net"),
            Err(MxError::LoopsToSelf("mx.example.net".into()))
        );
    }

    #[test]
    fn mx_order_keeps_best_preference_and_drops_root() {
        let name = |s: &str| Name::from_ascii(s).unwrap();
        let ordered = order_mx(vec![
            (30, name("c.example.")),
            (10, name("a.example.")),
            (0, Name::root()),
            (20, name("b.example.")),
            (5, name("A.example.")),
        ]);
        let hosts: Vec<_> = ordered.iter().map(|(p, n)| (*p, host_text(n))).collect();
        assert_eq!(
            hosts,
            vec![
                (5, "a.example".to_string()),
                (20, "b.example".to_string()),
                (30, "c.example".to_string()),
            ]
        );
    }

    #[test]
    fn error_classes() {
        assert!(MxError::NullMx.is_permanent());
        assert_eq!(MxError::NullMx.enhanced(), "5.1.10");
        assert!(MxError::NoSuchDomain.is_permanent());
        assert!(MxError::NoMailHost.is_permanent());
        assert_eq!(MxError::NoMailHost.enhanced(), "5.1.2");
        assert!(MxError::NoMxAddress.is_permanent());
        assert_eq!(MxError::NoMxAddress.enhanced(), "5.4.4");
        assert!(!MxError::Temporary(String::new()).is_permanent());
        assert_eq!(MxError::Temporary(String::new()).enhanced(), "4.4.3");
    }

    #[test]
    fn fqdn_appends_the_root() {
        assert_eq!(fqdn("example.com").unwrap().to_ascii(), "example.com.");
        assert_eq!(fqdn("example.com.").unwrap().to_ascii(), "example.com.");
        assert_eq!(
            host_text(&fqdn("Bücher.Example").unwrap()),
            "xn--bcher-kva.example"
        );
        assert!(fqdn("").is_none());
        assert!(fqdn(".").is_none());
        // Underscores, which a route or relay host may have (a container service name).
        assert_eq!(fqdn("mail_relay").unwrap().to_ascii(), "mail_relay.");
        assert_eq!(
            fqdn("smtp_out.internal.example").unwrap().to_ascii(),
            "smtp_out.internal.example."
        );
    }
}
