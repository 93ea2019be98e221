//! Relay control: who may send mail to which domains. Never an open relay by default.
//!
//! Mail to an accepted domain is taken from anyone; mail to any other domain only from clients
//! inside a relay network (loopback by default). Everything else is refused at RCPT with
//! `554 5.7.1`. The postmaster (`<postmaster>`, and `postmaster@` our own host name) is
//! accepted from anyone (RFC 5321 4.5.1).

use std::net::IpAddr;

use ipnet::IpNet;
use postern_proto::address::canonical_domain;
use postern_proto::{ForwardPath, Host};

/// The relay policy of one server.
#[derive(Clone, Debug)]
pub struct RelayPolicy {
    /// Domains we accept mail for, in canonical form (lower case, A-labels, no trailing dot).
    accept_domains: Vec<String>,
    /// Networks whose clients may relay to any domain.
    relay_networks: Vec<IpNet>,
    /// Our host name, lower-case: `postmaster@` it is ours.
    hostname: String,
}

impl RelayPolicy {
    /// A policy from the operator's lists. Domains match exactly, in any case, and a U-label
    /// matches its A-label (`b\u{fc}cher.example` is `xn--bcher-kva.example`).
    pub fn new(accept_domains: &[String], relay_networks: &[IpNet], hostname: &str) -> Self {
        Self {
            hostname: hostname.trim_end_matches('.').to_ascii_lowercase(),
            accept_domains: accept_domains.iter().map(|d| canonical_domain(d)).collect(),
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
        if self.accept_domains.is_empty() {
            return false;
        }
        let domain = domain.trim_end_matches('.');
        if domain.is_ascii() {
            // Its canonical form is its lower case: compare without making it.
            return self
                .accept_domains
                .iter()
                .any(|d| d.eq_ignore_ascii_case(domain));
        }
        let domain = canonical_domain(domain);
        self.accept_domains.contains(&domain)
    }

    /// Whether `path` (a stored recipient) is our postmaster: `postmaster`, or `postmaster@`
    /// our host name, any case.
    pub fn is_postmaster(&self, path: &str) -> bool {
        match path.rsplit_once('@') {
            None => is_postmaster_local(path),
            Some((local, domain)) => {
                is_postmaster_local(local)
                    && domain
                        .trim_end_matches('.')
                        .eq_ignore_ascii_case(&self.hostname)
            }
        }
    }

    /// Whether a recipient may be accepted from `client`. The postmaster is always accepted
    /// (RFC 5321 4.5.1): `<Postmaster>`, and `postmaster@` our host name.
    pub fn allows(&self, rcpt: &ForwardPath<'_>, client: IpAddr) -> bool {
        match rcpt {
            ForwardPath::Postmaster => true,
            ForwardPath::Mailbox(m)
                if is_postmaster_local(m.local)
                    && matches!(m.host, Host::Domain(d) if d.trim_end_matches('.').eq_ignore_ascii_case(&self.hostname)) =>
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

    #[test]
    fn accepted_domains_from_anyone_others_only_from_relay_networks() {
        let p = RelayPolicy::new(&["Example.ORG".into()], &RelayPolicy::loopback(), "mx.test");
        let outside: IpAddr = "198.51.100.7".parse().unwrap();
        let inside: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(p.allows(&rcpt("<a@example.org>"), outside));
        assert!(p.allows(&rcpt("<a@EXAMPLE.org>"), outside));
        assert!(!p.allows(&rcpt("<a@elsewhere.net>"), outside));
        assert!(!p.allows(&rcpt("<a@sub.example.org>"), outside));
        assert!(!p.allows(&rcpt("<a@[192.0.2.1]>"), outside));
        assert!(p.allows(&rcpt("<a@elsewhere.net>"), inside));
        assert!(p.allows(&rcpt("<postmaster>"), outside));
        assert!(p.allows(
            &rcpt("<a@elsewhere.net>"),
            "::ffff:127.0.0.1".parse().unwrap()
        ));
    }

    #[test]
    fn the_postmaster_of_our_own_host_name_is_accepted_from_anyone() {
        let p = RelayPolicy::new(&[], &[], "MX.test");
        let outside: IpAddr = "198.51.100.7".parse().unwrap();
        assert!(p.allows(&rcpt("<postmaster@mx.test>"), outside));
        assert!(p.allows(&rcpt("<PostMaster@MX.TEST>"), outside));
        assert!(!p.allows(&rcpt("<postmaster@other.test>"), outside));
        assert!(!p.allows(&rcpt("<root@mx.test>"), outside));
        assert!(p.is_postmaster("postmaster"));
        assert!(p.is_postmaster("POSTMASTER@mx.Test"));
        assert!(!p.is_postmaster("postmaster@other.test"));
        assert!(!p.is_postmaster("postmasters@mx.test"));
        // Quoted, it is the same mailbox (RFC 5321 4.1.2).
        assert!(p.allows(&rcpt("<\"postmaster\"@mx.test>"), outside));
        assert!(p.allows(&rcpt("<\"Post\\master\"@MX.test>"), outside));
        assert!(!p.allows(&rcpt("<\"postmaster \"@mx.test>"), outside));
        assert!(!p.allows(&rcpt("<\"postmaste\"@mx.test>"), outside));
        assert!(p.is_postmaster("\"postmaster\"@mx.test"));
        assert!(!p.is_postmaster("\"postmaster\\\"@mx.test"));
    }

    #[test]
    fn a_u_label_and_its_a_label_are_the_same_accepted_domain() {
        let outside: IpAddr = "198.51.100.7".parse().unwrap();
        for accepted in ["b\u{fc}cher.test", "XN--BCHER-KVA.test."] {
            let p = RelayPolicy::new(&[accepted.into()], &[], "mx.test");
            assert!(
                p.allows(&rcpt("<u@xn--bcher-kva.test>"), outside),
                "{accepted}"
            );
            assert!(
                p.allows(&rcpt("<u@B\u{dc}cher.test>"), outside),
                "{accepted}"
            );
            assert!(!p.allows(&rcpt("<u@bucher.test>"), outside), "{accepted}");
        }
    }

    #[test]
    fn no_relay_networks_means_no_relaying() {
        let p = RelayPolicy::new(&[], &[], "mx.test");
        assert!(!p.allows(&rcpt("<a@b.example>"), "127.0.0.1".parse().unwrap()));
    }
}
