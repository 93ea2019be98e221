//! Connection limits shared by all cores: a global count (one atomic) and an exact count per
//! client, kept in a map split into shards by a hash of the client so that cores admitting
//! different clients rarely meet on a lock, and each lock is held for one map update.
//!
//! A client is its address, except that an IPv4-mapped IPv6 address (`::ffff:192.0.2.1`, as a
//! dual-stack listener sees IPv4 clients) is the IPv4 address itself, and that IPv6 clients are
//! counted per network of `--ipv6-client-prefix` bits (84 by default): one site holds a /64 or
//! more.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

const SHARDS: usize = 64;

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Too many connections in all.
    Total,
    /// Too many from this client.
    PerIp,
}

/// The shared counters.
#[derive(Debug)]
pub(crate) struct ConnectionLimits {
    total: AtomicUsize,
    max_total: usize,
    per_client: Box<[Mutex<HashMap<IpAddr, u32>>]>,
    hasher: RandomState,
    max_per_client: u32,
    ipv6_prefix: u8,
}

/// One admitted connection; gives its place back when dropped.
#[derive(Debug)]
pub(crate) struct Permit {
    limits: Arc<ConnectionLimits>,
    /// None while the client is not yet known (a load balancer's connection before its
    /// PROXY header): counted in the total only.
    client: Option<IpAddr>,
}

impl ConnectionLimits {
    /// Limits of `max_total` connections in all and `max_per_client` from one client, IPv6
    /// clients counted per network of `ipv6_prefix` bits (at most 128).
    pub(crate) fn new(max_total: usize, max_per_client: usize, ipv6_prefix: u8) -> Arc<Self> {
        Arc::new(Self {
            total: AtomicUsize::new(0),
            max_total,
            per_client: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            max_per_client: u32::try_from(max_per_client).unwrap_or(u32::MAX),
            ipv6_prefix: ipv6_prefix.min(128),
        })
    }

    /// The client `ip` is counted as.
    fn client(&self, ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let bits = u32::from(self.ipv6_prefix);
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
            v4 => v4,
        }
    }

    fn shard(&self, client: IpAddr) -> &Mutex<HashMap<IpAddr, u32>> {
        &self.per_client[(self.hasher.hash_one(client) as usize) % SHARDS]
    }

    /// Admits a connection from `ip`, or says why not.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, Refusal> {
        let mut permit = self.admit_unknown()?;
        permit.attribute(ip)?;
        Ok(permit)
    }

    /// Admits a connection whose client is not known yet, in the total only; see
    /// [`Permit::attribute`].
    pub(crate) fn admit_unknown(self: &Arc<Self>) -> Result<Permit, Refusal> {
        if self.total.fetch_add(1, Ordering::Relaxed) >= self.max_total {
            self.total.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::Total);
        }
        Ok(Permit {
            limits: self.clone(),
            client: None,
        })
    }
}

impl Permit {
    /// Counts the connection as its client's, `ip`, or says it is one too many from there
    /// (the permit then still holds its place in the total, until dropped).
    pub(crate) fn attribute(&mut self, ip: IpAddr) -> Result<(), Refusal> {
        debug_assert!(self.client.is_none());
        let client = self.limits.client(ip);
        let mut counts = self
            .limits
            .shard(client)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if counts.get(&client).copied().unwrap_or(0) >= self.limits.max_per_client {
            return Err(Refusal::PerIp);
        }
        *counts.entry(client).or_insert(0) += 1;
        self.client = Some(client);
        Ok(())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(client) = self.client {
            let mut counts = self
                .limits
                .shard(client)
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(count) = counts.get_mut(&client) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    counts.remove(&client);
                }
            }
        }
        self.limits.total.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn limits_bite_and_permits_give_back() {
        let l = ConnectionLimits::new(3, 2, 64);
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        let p1 = l.admit(a).unwrap();
        let _p2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).unwrap_err(), Refusal::PerIp);
        let _p3 = l.admit(b).unwrap();
        assert_eq!(l.admit(b).unwrap_err(), Refusal::Total);
        drop(p1);
        assert!(l.admit(a).is_ok());
    }

    #[test]
    fn every_client_has_its_own_count() {
        // With one connection allowed per client, 5,000 clients each get theirs: no client is
        // refused for sharing a count with another.
        let l = ConnectionLimits::new(10_000, 1, 64);
        let held: Vec<Permit> = (0..5_000u32)
            .map(|i| {
                l.admit(IpAddr::from((0x0a00_0000 + i).to_be_bytes()))
                    .unwrap()
            })
            .collect();
        assert_eq!(l.admit(ip("10.0.0.7")).unwrap_err(), Refusal::PerIp);
        drop(held);
        assert!(l.per_client.iter().all(|s| s.lock().unwrap().is_empty()));
        assert_eq!(l.total.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_connection_counted_before_its_client_is_known_gets_the_client_s_count_later() {
        // A load balancer's connections: the total at accept, the client's own count once its
        // PROXY header names it.
        let l = ConnectionLimits::new(3, 1, 64);
        let mut p1 = l.admit_unknown().unwrap();
        let mut p2 = l.admit_unknown().unwrap();
        p1.attribute(ip("192.0.2.1")).unwrap();
        assert_eq!(p2.attribute(ip("192.0.2.1")).unwrap_err(), Refusal::PerIp);
        p2.attribute(ip("192.0.2.2")).unwrap();
        let p3 = l.admit_unknown().unwrap();
        assert_eq!(l.admit_unknown().unwrap_err(), Refusal::Total);
        drop((p1, p2, p3));
        assert!(l.per_client.iter().all(|s| s.lock().unwrap().is_empty()));
        assert_eq!(l.total.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_mapped_ipv4_client_is_the_ipv4_client() {
        let l = ConnectionLimits::new(10, 1, 64);
        let _p = l.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(l.admit(ip("::ffff:192.0.2.1")).unwrap_err(), Refusal::PerIp);
    }

    #[test]
    fn ipv6_clients_are_counted_per_prefix() {
        let l = ConnectionLimits::new(10, 1, 64);
        let _p = l.admit(ip("2001:db8:1:2::1")).unwrap();
        assert_eq!(
            l.admit(ip("2001:db8:1:2:ffff::9")).unwrap_err(),
            Refusal::PerIp
        );
        assert!(l.admit(ip("2001:db8:1:3::1")).is_ok());
        // A prefix of 128 counts each address on its own.
        let l = ConnectionLimits::new(10, 1, 128);
        let _p = l.admit(ip("2001:db8::1")).unwrap();
        assert!(l.admit(ip("2001:db8::2")).is_ok());
        assert_eq!(l.admit(ip("2001:db8::1")).unwrap_err(), Refusal::PerIp);
    }
}
