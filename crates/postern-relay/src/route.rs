//! Where mail for a domain goes: a fixed route (`--route DOMAIN=HOST:PORT`, longest suffix
//! wins), else the smarthost (`--relay-host`), else the domain's MX records.

use std::fmt;

use postern_proto::address::canonical_domain;

/// A host and port, as written on the command line.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// A host name or an IP address (without brackets).
    pub host: String,
    /// The TCP port.
    pub port: u16,
}

impl HostPort {
    /// Parses `host:port`, `[v6]:port` (also `[IPv6:v6]:port`, as an address literal is
    /// written in mail, RFC 5321 4.1.3), or a bare host with `default_port`.
    pub fn parse(s: &str, default_port: u16) -> Result<HostPort, String> {
        let bad = || format!("'{s}' is not HOST:PORT");
        let s = s.trim();
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(bad)?;
            // The tag says IPv6: an IPv4 address behind it is no literal (RFC 5321 4.1.3).
            let host = match host.get(..5) {
                Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => {
                    let v6 = &host[5..];
                    v6.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
                    v6
                }
                _ => host,
            };
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad())?,
                None if after.is_empty() => default_port,
                None => return Err(bad()),
            };
            if host.parse::<std::net::IpAddr>().is_err() {
                return Err(bad());
            }
            (host, port)
        } else {
            match s.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (h, p.parse().map_err(|_| bad())?),
                Some((h, p)) => {
                    // An IPv6 address without brackets: `::1:2626` is an address (port 25)
                    // as much as `::1` with port 2626, so neither is guessed.
                    let split = match (h.parse::<std::net::Ipv6Addr>(), p.parse::<u16>()) {
                        (Ok(_), Ok(port)) if port > 0 => {
                            format!(" ([{h}]:{p}, or [{s}]:{default_port}?)")
                        }
                        _ => String::new(),
                    };
                    return Err(format!(
                        "'{s}' is not HOST:PORT: an IPv6 address goes in brackets, \
                         [ADDRESS]:PORT{split}"
                    ));
                }
                None => (s, default_port),
            }
        };
        if host.is_empty() {
            return Err(bad());
        }
        if port == 0 {
            return Err(format!(
                "'{s}' is not HOST:PORT: port 0 cannot be connected to"
            ));
        }
        // An IP address, or a host name of letters, digits and hyphens (or UTF-8 labels);
        // underscores pass too, as in container service names.
        let name = host.trim_end_matches('.');
        let is_name = matches!(
            postern_proto::address::parse_host(&name.replace('_', "u")),
            Ok(postern_proto::Host::Domain(_))
        );
        if host.parse::<std::net::IpAddr>().is_err() && !is_name {
            return Err(format!(
                "'{s}' is not HOST:PORT: '{host}' is neither a host name nor an IP address"
            ));
        }
        // A name in A-labels, the form DNS, a TLS server name (which takes no U-labels) and
        // the logs use.
        let host = if host.parse::<std::net::IpAddr>().is_ok() {
            host.to_ascii_lowercase()
        } else {
            postern_proto::address::domain_to_ascii(name)
                .ok_or_else(|| {
                    format!("'{s}' is not HOST:PORT: '{host}' is not a valid internationalized host name")
                })?
                .to_ascii_lowercase()
        };
        Ok(HostPort { host, port })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A next hop.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Destination {
    /// A fixed host (a route or the smarthost): its addresses, no MX lookup.
    Fixed(HostPort),
    /// The MX hosts of a domain.
    Mx(String),
}

impl Destination {
    /// The name the queue groups by: recipients with the same key share a transaction, and
    /// the key's hash picks the core that delivers.
    pub fn key(&self) -> String {
        match self {
            Destination::Fixed(hp) => hp.to_string(),
            Destination::Mx(domain) => domain.clone(),
        }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Fixed(hp) => write!(f, "{hp}"),
            Destination::Mx(domain) => write!(f, "MX of {domain}"),
        }
    }
}

/// The routing table.
#[derive(Clone, Debug, Default)]
pub struct Router {
    relay_host: Option<HostPort>,
    /// (domain, next hop), longest domain first.
    routes: Vec<(String, HostPort)>,
}

impl Router {
    /// A table from the operator's flags.
    pub fn new(relay_host: Option<HostPort>, routes: Vec<(String, HostPort)>) -> Router {
        let mut routes: Vec<(String, HostPort)> = routes
            .into_iter()
            .map(|(d, hp)| (canonical_domain(d.trim_start_matches('.')), hp))
            .collect();
        routes.sort_by_key(|(d, _)| std::cmp::Reverse(d.len()));
        Router { relay_host, routes }
    }

    /// Parses one `--route DOMAIN=HOST:PORT`.
    pub fn parse_route(s: &str) -> Result<(String, HostPort), String> {
        let (domain, hop) = s
            .split_once('=')
            .ok_or_else(|| format!("'{s}' is not DOMAIN=HOST:PORT"))?;
        let domain = domain.trim().trim_matches('.');
        if domain.is_empty() {
            return Err(format!("'{s}' has no domain"));
        }
        Ok((domain.to_ascii_lowercase(), HostPort::parse(hop, 25)?))
    }

    /// The next hop for a recipient mailbox (`local@domain`). A domain matches a route for
    /// itself or any of its subdomains; the longest matching route wins. Domains compare in
    /// canonical form (lower case, A-labels). A mailbox without a
    /// domain goes to the smarthost when there is one.
    pub fn route(&self, mailbox: &str) -> Option<Destination> {
        let domain = mailbox.rsplit_once('@').map(|(_, d)| canonical_domain(d));
        if let Some(domain) = &domain {
            for (suffix, hop) in &self.routes {
                let hit = domain == suffix
                    || domain
                        .strip_suffix(suffix.as_str())
                        .is_some_and(|head| head.ends_with('.'));
                if hit {
                    return Some(Destination::Fixed(hop.clone()));
                }
            }
        }
        if let Some(hop) = &self.relay_host {
            return Some(Destination::Fixed(hop.clone()));
        }
        domain.filter(|d| !d.is_empty()).map(Destination::Mx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn host_ports() {
        assert_eq!(
            HostPort::parse("MX.Example.com.:2525", 25).unwrap(),
            HostPort {
                host: "mx.example.com".into(),
                port: 2525
            }
        );
        assert_eq!(HostPort::parse("10.0.0.1", 25).unwrap().port, 25);
        let v6 = HostPort::parse("[::1]:26", 25).unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 26));
        assert_eq!(v6.to_string(), "[::1]:26");
        assert_eq!(HostPort::parse("localhost", 25).unwrap().host, "localhost");
        assert_eq!(
            HostPort::parse("mail_relay:25", 25).unwrap().host,
            "mail_relay"
        );
        assert_eq!(
            HostPort::parse("[192.0.2.1]:26", 25).unwrap().host,
            "192.0.2.1"
        );
        // An IPv6 address without brackets is not guessed at: `::1:2626` is an address as
        // much as `::1` and a port.
        for bare in ["::1", "::1:2626", "2001:db8::1:25"] {
            let err = HostPort::parse(bare, 25).unwrap_err();
            assert!(err.contains("in brackets"), "{bare}: {err}");
        }
        assert!(HostPort::parse("::1:2626", 25)
            .unwrap_err()
            .contains("([::1]:2626, or [::1:2626]:25?)"));
        // A U-label host in A-labels: a TLS server name takes no other form.
        assert_eq!(
            HostPort::parse("MX.B\u{fc}cher.Example.:26", 25).unwrap(),
            HostPort {
                host: "mx.xn--bcher-kva.example".into(),
                port: 26
            }
        );
        for literal in ["[IPv6:2001:db8::1]:26", "[ipv6:2001:DB8::1]:26"] {
            let hp = HostPort::parse(literal, 25).unwrap();
            assert_eq!(
                (hp.host.as_str(), hp.port),
                ("2001:db8::1", 26),
                "{literal}"
            );
        }
        for bad in [
            "",
            ":25",
            "host:0",
            "host:x",
            "[::1",
            "[::1]x",
            "127.0.0.1:2525:5",
            "a b:25",
            "a..b:25",
            "-x:25",
            "h:x:y",
            "[not-v6]:25",
            "[IPv6:192.0.2.1x]:25",
            "[IPv6:192.0.2.1]:25",
            "[IPv6:192.0.2.1]",
        ] {
            assert!(HostPort::parse(bad, 25).is_err(), "{bad}");
        }
        // Port 0 is named as the trouble, in both forms.
        for zero in ["host:0", "[::1]:0"] {
            let err = HostPort::parse(zero, 25).unwrap_err();
            assert!(err.contains("port 0"), "{zero}: {err}");
        }
    }

    #[test]
    fn longest_suffix_then_smarthost_then_mx() {
        let r = Router::new(
            None,
            vec![
                Router::parse_route("example.com=10.0.0.1:25").unwrap(),
                Router::parse_route("eu.example.com=10.0.0.2:26").unwrap(),
            ],
        );
        let fixed = |h: &str, p| {
            Some(Destination::Fixed(HostPort {
                host: h.into(),
                port: p,
            }))
        };
        assert_eq!(r.route("a@example.com"), fixed("10.0.0.1", 25));
        assert_eq!(r.route("a@x.EU.example.com"), fixed("10.0.0.2", 26));
        assert_eq!(r.route("a@eu.example.com"), fixed("10.0.0.2", 26));
        assert_eq!(
            r.route("a@badexample.com"),
            Some(Destination::Mx("badexample.com".into()))
        );
        assert_eq!(r.route("postmaster"), None);
        let smart = Router::new(Some(HostPort::parse("smart:2525", 25).unwrap()), vec![]);
        assert_eq!(smart.route("a@anywhere.test"), fixed("smart", 2525));
        assert_eq!(smart.route("postmaster"), fixed("smart", 2525));
    }

    #[test]
    fn a_u_label_and_its_a_label_take_the_same_route() {
        let fixed = Some(Destination::Fixed(HostPort {
            host: "10.0.0.9".into(),
            port: 25,
        }));
        for route in [
            "b\u{fc}cher.test=10.0.0.9:25",
            "xn--bcher-kva.test=10.0.0.9:25",
        ] {
            let r = Router::new(None, vec![Router::parse_route(route).unwrap()]);
            assert_eq!(r.route("u@b\u{fc}cher.test"), fixed, "{route}");
            assert_eq!(r.route("u@XN--BCHER-KVA.test"), fixed, "{route}");
            assert_eq!(r.route("u@sub.b\u{fc}cher.test"), fixed, "{route}");
        }
        let mx = Router::new(None, vec![]);
        assert_eq!(
            mx.route("u@b\u{fc}cher.test"),
            Some(Destination::Mx("xn--bcher-kva.test".into()))
        );
    }
}
