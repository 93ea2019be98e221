//! Connection limits shared by all cores without a lock: a global count and a fixed table of
//! per-address counters indexed by a hash of the client address. Two addresses that share a
//! slot share its count, so the per-address limit can only bite early, never late.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

const SLOTS: usize = 4096;

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Too many connections in all.
    Total,
    /// Too many from this address.
    PerIp,
}

/// The shared counters.
#[derive(Debug)]
pub(crate) struct ConnectionLimits {
    total: AtomicUsize,
    max_total: usize,
    per_ip: Box<[AtomicU32]>,
    max_per_ip: u32,
}

/// One admitted connection; gives its place back when dropped.
#[derive(Debug)]
pub(crate) struct Permit {
    limits: Arc<ConnectionLimits>,
    slot: usize,
}

impl ConnectionLimits {
    pub(crate) fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(Self {
            total: AtomicUsize::new(0),
            max_total,
            per_ip: (0..SLOTS).map(|_| AtomicU32::new(0)).collect(),
            max_per_ip: u32::try_from(max_per_ip).unwrap_or(u32::MAX),
        })
    }

    fn slot(ip: IpAddr) -> usize {
        let mut h = DefaultHasher::new();
        ip.hash(&mut h);
        (h.finish() as usize) % SLOTS
    }

    /// Admits a connection from `ip`, or says why not.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, Refusal> {
        if self.total.fetch_add(1, Ordering::Relaxed) >= self.max_total {
            self.total.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::Total);
        }
        let slot = Self::slot(ip);
        if self.per_ip[slot].fetch_add(1, Ordering::Relaxed) >= self.max_per_ip {
            self.per_ip[slot].fetch_sub(1, Ordering::Relaxed);
            self.total.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::PerIp);
        }
        Ok(Permit {
            limits: self.clone(),
            slot,
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limits.per_ip[self.slot].fetch_sub(1, Ordering::Relaxed);
        self.limits.total.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_bite_and_permits_give_back() {
        let l = ConnectionLimits::new(3, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let p1 = l.admit(a).unwrap();
        let _p2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).unwrap_err(), Refusal::PerIp);
        let _p3 = l.admit(b).unwrap();
        assert_eq!(l.admit(b).unwrap_err(), Refusal::Total);
        drop(p1);
        assert!(l.admit(a).is_ok());
    }
}
