//! Relay control: who may send mail to which domains. Never an open relay by default.
//!
//! Mail to an accepted domain is taken from anyone; mail to any other domain only from clients
//! inside a relay network (loopback by default). Everything else is refused at RCPT with
//! `554 5.7.1`. The postmaster (`<postmaster>`, `postmaster@` our own host name, and
//! `postmaster@[address]` with the address the client reached us at) is accepted from anyone
//! (RFC 5321 4.5.1).

use std::net::IpAddr;

use ipnet::IpNet;
use postern_proto::address::canonical_domain;
use postern_proto::{ForwardPath, Host};

/// The relay policy of one server.
#[derive(Clone, Debug)]
pub struct RelayPolicy {
    /// Domains we accept mail for, in canonical form (lower case, A-labels, no trailing dot).
    accept_domains: Vec<String>,
    /// Domains whose subdomains we accept mail for (given as `.example.net`), in canonical
    /// form, each with a dot in front (`.example.net`).
    accept_parents: Vec<String>,
    /// Networks whose clients may relay to any domain.
    relay_networks: Vec<IpNet>,
    /// Our host name, lower-case: `postmaster@` it is ours.
    hostname: String,
}

impl RelayPolicy {
    /// A policy from the operator's lists. Domains match exactly, in any case, and a U-label
    /// matches its A-label (`b\u{fc}cher.example` is `xn--bcher-kva.example`); one written
    /// with a dot in front (`.example.net`) matches its subdomains, at any depth, and not
    /// itself.
    pub fn new(accept_domains: &[String], relay_networks: &[IpNet], hostname: &str) -> Self {
        let (parents, exact): (Vec<&String>, Vec<&String>) =
            accept_domains.iter().partition(|d| d.starts_with('.'));
        Self {
            hostname: hostname.trim_end_matches('.').to_ascii_lowercase(),
            accept_domains: exact.iter().map(|d| canonical_domain(d)).collect(),
            accept_parents: parents
                .iter()
                .map(|d| format!(".{}", canonical_domain(&d[1..])))
                .collect(),
            relay_networks: relay_networks.to_vec(),
        }
    }

    /// The default relay networks: loopback only.
    pub fn loopback() -> Vec<IpNet> {
        vec![
            "127.0.0.0/8".parse().expect("valid network"),
            "::1/128".parse().expect("valid network"),
        ]
    }

    /// Whether `client` is inside a relay network.
    pub fn is_relay_client(&self, client: IpAddr) -> bool {
        let client = match client {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(client, IpAddr::V4),
            v4 => v4,
        };
        self.relay_networks.iter().any(|n| n.contains(&client))
    }

    /// Whether `domain` is one we accept mail for.
    pub fn is_local_domain(&self, domain: &str) -> bool {
        if self.accept_domains.is_empty() && self.accept_parents.is_empty() {
            return false;
        }
        let domain = domain.trim_end_matches('.');
        // An ASCII domain's canonical form is its lower case: compare without making it.
        let canonical = (!domain.is_ascii()).then(|| canonical_domain(domain));
        let domain = canonical.as_deref().unwrap_or(domain);
        let under = |parent: &str| {
            domain.len() > parent.len()
                && domain.is_char_boundary(domain.len() - parent.len())
                && domain[domain.len() - parent.len()..].eq_ignore_ascii_case(parent)
        };
        self.accept_domains
            .iter()
            .any(|d| d.eq_ignore_ascii_case(domain))
            || self.accept_parents.iter().any(|p| under(p))
    }

    /// Whether `path` (a stored recipient of a session that reached us at `local`) is our
    /// postmaster: `postmaster`, `postmaster@` our host name (any case), or `postmaster@` the
    /// address literal of `local`.
    pub fn is_postmaster(&self, path: &str, local: IpAddr) -> bool {
        match path.rsplit_once('@') {
            None => is_postmaster_local(path),
            Some((part, domain)) => {
                is_postmaster_local(part)
                    && match postern_proto::address::parse_host(domain) {
                        Ok(host) => self.is_ours(&host, local),
                        Err(_) => false,
                    }
            }
        }
    }

    /// Whether `host` names this server: our host name, or the address literal of `local`,
    /// the address the client reached us at (RFC 5321 4.1.3).
    fn is_ours(&self, host: &Host<'_>, local: IpAddr) -> bool {
        let local = local.to_canonical();
        match host {
            // Our host name is ASCII (A-labels); a UTF-8 name (an SMTPUTF8 client's) is ours
            // when its A-label form is.
            Host::Domain(d) if d.is_ascii() => {
                d.trim_end_matches('.').eq_ignore_ascii_case(&self.hostname)
            }
            Host::Domain(d) => {
                canonical_domain(d.trim_end_matches('.')).eq_ignore_ascii_case(&self.hostname)
            }
            Host::Ipv4(a) => local == IpAddr::V4(*a),
            Host::Ipv6(a) => local == IpAddr::V6(*a).to_canonical(),
        }
    }

    /// Whether a recipient may be accepted from `client`, in a session that reached us at
    /// `local`. The postmaster is always accepted (RFC 5321 4.5.1): `<Postmaster>`,
    /// `postmaster@` our host name, and `postmaster@[local]`.
    pub fn allows(&self, rcpt: &ForwardPath<'_>, client: IpAddr, local: IpAddr) -> bool {
        match rcpt {
            ForwardPath::Postmaster => true,
            ForwardPath::Mailbox(m)
                if is_postmaster_local(m.local) && self.is_ours(&m.host, local) =>
            {
                true
            }
            ForwardPath::Mailbox(m) => match m.host {
                Host::Domain(d) if self.is_local_domain(d) => true,
                _ => self.is_relay_client(client),
            },
        }
    }
}

/// Whether a local part, as written, is `postmaster` in any case: also quoted
/// (`"postmaster"`, `"post\master"`), which is the same mailbox (RFC 5321 4.1.2).
fn is_postmaster_local(local: &str) -> bool {
    let Some(inner) = local.strip_prefix('"').and_then(|l| l.strip_suffix('"')) else {
        return local.eq_ignore_ascii_case("postmaster");
    };
    // Undo the quoted pairs; compare octet by octet with "postmaster".
    let mut want = "postmaster".bytes();
    let mut octets = inner.bytes();
    while let Some(mut b) = octets.next() {
        if b == b'\\' {
            match octets.next() {
                Some(escaped) => b = escaped,
                None => return false,
            }
        }
        if want.next().is_none_or(|w| !b.eq_ignore_ascii_case(&w)) {
            return false;
        }
    }
    want.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_proto::address::parse_forward_path;

    fn rcpt(s: &str) -> ForwardPath<'_> {
        parse_forward_path(s).unwrap().0
    }

    /// The address clients reach the server at, in these tests.
    fn here() -> IpAddr {
        "192.0.2.25".parse().unwrap()
    }

    #[test]
    fn accepted_domains_from_anyone_others_only_from_relay_networks() {
        let p = RelayPolicy::new(&["Example.ORG".into()], &RelayPolicy::loopback(), "mx.test");
        let outside: IpAddr = "198.51.100.7".parse().unwrap();
        let inside: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(p.allows(&rcpt("<a@example.org>"), outside, here()));
        assert!(p.allows(&rcpt("<a@EXAMPLE.org>"), outside, here()));
        assert!(!p.allows(&rcpt("<a@elsewhere.net>"), outside, here()));
        assert!(!p.allows(&rcpt("<a@sub.example.org>"), outside, here()));
        assert!(!p.allows(&rcpt("<a@[192.0.2.1]>"), outside, here()));
        assert!(p.allows(&rcpt("<a@elsewhere.net>"), inside, here()));
        assert!(p.allows(&rcpt("<postmaster>"), outside, here()));
        assert!(p.allows(
            &rcpt("<a@elsewhere.net>"),
            "::ffff:127.0.0.1".parse().unwrap(),
            here()
        ));
    }

    #[test]
    fn a_domain_with_a_dot_in_front_takes_its_subdomains_only() {
        let p = RelayPolicy::new(
            &[".Example.ORG".into(), ".b\u{fc}cher.example".into()],
            &RelayPolicy::loopback(),
            "mx.test",
        );
        let outside: IpAddr = "198.51.100.7".parse().unwrap();
        for ok in [
            "<a@sub.example.org>",
            "<a@deep.sub.EXAMPLE.org>",
            "<a@mx.xn--bcher-kva.example>",
            "<a@mx.b\u{fc}cher.example>",
        ] {
            assert!(p.allows(&rcpt(ok), outside, here()), "{ok}");
        }
        for refused in [
            "<a@example.org>",
            "<a@badexample.org>",
            "<a@example.org.evil.test>",
            "<a@xn--bcher-kva.example>",
        ] {
            assert!(!p.allows(&rcpt(refused), outside, here()), "{refused}");
        }
        // Given both ways, the domain and its subdomains.
        let both = RelayPolicy::new(
            &["example.org".into(), ".example.org".into()],
            &[],
            "mx.test",
        );
        assert!(both.allows(&rcpt("<a@example.org>"), outside, here()));
        assert!(both.allows(&rcpt("<a@x.example.org>"), outside, here()));
    }

    #[test]
    fn the_postmaster_of_our_own_host_name_is_accepted_from_anyone() {
        let p = RelayPolicy::new(&[], &[], "MX.test");
        let outside: IpAddr = "198.51.100.7".parse().unwrap();
        assert!(p.allows(&rcpt("<postmaster@mx.test>"), outside, here()));
        assert!(p.allows(&rcpt("<PostMaster@MX.TEST>"), outside, here()));
        assert!(!p.allows(&rcpt("<postmaster@other.test>"), outside, here()));
        assert!(!p.allows(&rcpt("<root@mx.test>"), outside, here()));
        assert!(p.is_postmaster("postmaster", here()));
        assert!(p.is_postmaster("POSTMASTER@mx.Test", here()));
        assert!(!p.is_postmaster("postmaster@other.test", here()));
        assert!(!p.is_postmaster("postmasters@mx.test", here()));
        // Quoted, it is the same mailbox (RFC 5321 4.1.2).
        assert!(p.allows(&rcpt("<\"postmaster\"@mx.test>"), outside, here()));
        assert!(p.allows(&rcpt("<\"Post\\master\"@MX.test>"), outside, here()));
        assert!(!p.allows(&rcpt("<\"postmaster \"@mx.test>"), outside, here()));
        assert!(!p.allows(&rcpt("<\"postmaste\"@mx.test>"), outside, here()));
        assert!(p.is_postmaster("\"postmaster\"@mx.test", here()));
        assert!(!p.is_postmaster("\"postmaster\\\"@mx.test", here()));
    }

    #[test]
    fn the_postmaster_at_the_address_the_client_reached_is_accepted_from_anyone() {
        let p = RelayPolicy::new(&[], &[], "mx.test");
        let outside: IpAddr = "198.51.100.7".parse().unwrap();
        assert!(p.allows(&rcpt("<postmaster@[192.0.2.25]>"), outside, here()));
        assert!(p.allows(&rcpt("<PostMaster@[192.0.2.25]>"), outside, here()));
        assert!(!p.allows(&rcpt("<postmaster@[192.0.2.26]>"), outside, here()));
        assert!(!p.allows(&rcpt("<root@[192.0.2.25]>"), outside, here()));
        assert!(p.is_postmaster("postmaster@[192.0.2.25]", here()));
        assert!(!p.is_postmaster("postmaster@[192.0.2.26]", here()));
        // An IPv4 client on a dual-stack listener reached `::ffff:192.0.2.25`: the same host.
        let mapped: IpAddr = "::ffff:192.0.2.25".parse().unwrap();
        assert!(p.allows(&rcpt("<postmaster@[192.0.2.25]>"), outside, mapped));
        let v6: IpAddr = "2001:db8::25".parse().unwrap();
        assert!(p.allows(&rcpt("<postmaster@[IPv6:2001:db8::25]>"), outside, v6));
        assert!(p.is_postmaster("postmaster@[IPv6:2001:DB8::25]", v6));
        assert!(!p.allows(&rcpt("<postmaster@[IPv6:2001:db8::26]>"), outside, v6));
    }

    #[test]
    fn a_u_label_and_its_a_label_are_the_same_accepted_domain() {
        let outside: IpAddr = "198.51.100.7".parse().unwrap();
        for accepted in ["b\u{fc}cher.test", "XN--BCHER-KVA.test."] {
            let p = RelayPolicy::new(&[accepted.into()], &[], "mx.test");
            assert!(
                p.allows(&rcpt("<u@xn--bcher-kva.test>"), outside, here()),
                "{accepted}"
            );
            assert!(
                p.allows(&rcpt("<u@B\u{dc}cher.test>"), outside, here()),
                "{accepted}"
            );
            assert!(
                !p.allows(&rcpt("<u@bucher.test>"), outside, here()),
                "{accepted}"
            );
        }
    }

    #[test]
    fn the_postmaster_of_our_host_name_written_in_u_labels_is_ours() {
        // The host name is ASCII (A-labels); an SMTPUTF8 client may write it in U-labels.
        let p = RelayPolicy::new(&[], &[], "mx.xn--bcher-kva.example");
        let outside: IpAddr = "198.51.100.7".parse().unwrap();
        assert!(p.allows(
            &rcpt("<postmaster@mx.b\u{fc}cher.example>"),
            outside,
            here()
        ));
        assert!(p.allows(
            &rcpt("<postmaster@MX.B\u{dc}cher.example>"),
            outside,
            here()
        ));
        assert!(p.is_postmaster("postmaster@mx.b\u{fc}cher.example", here()));
        assert!(!p.allows(&rcpt("<postmaster@mx.bucher.example>"), outside, here()));
        assert!(!p.allows(&rcpt("<root@mx.b\u{fc}cher.example>"), outside, here()));
    }

    #[test]
    fn no_relay_networks_means_no_relaying() {
        let p = RelayPolicy::new(&[], &[], "mx.test");
        assert!(!p.allows(&rcpt("<a@b.example>"), "127.0.0.1".parse().unwrap(), here()));
    }
}
