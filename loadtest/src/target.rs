//! Where the sender may send: loopback unless the operator says otherwise, so a mistyped
//! address never turns a benchmark into a flood against somebody else's server.

use std::net::{SocketAddr, ToSocketAddrs};

use crate::error::LoadError;

/// Resolves `target` (`HOST:PORT`) and refuses it when any address is not loopback, unless
/// `allow_remote`. Returns the first address.
pub fn resolve(target: &str, allow_remote: bool) -> Result<SocketAddr, LoadError> {
    let addrs: Vec<SocketAddr> = target
        .to_socket_addrs()
        .map_err(|e| LoadError::Resolve {
            target: target.to_owned(),
            why: e.to_string(),
        })?
        .collect();
    let first = *addrs.first().ok_or_else(|| LoadError::Resolve {
        target: target.to_owned(),
        why: "no address".into(),
    })?;
    if !allow_remote {
        if let Some(&addr) = addrs.iter().find(|a| !is_loopback(a)) {
            return Err(LoadError::RemoteTarget { addr });
        }
    }
    Ok(first)
}

/// 127.0.0.0/8, ::1, and IPv4-mapped loopback.
pub fn is_loopback(addr: &SocketAddr) -> bool {
    match addr {
        SocketAddr::V4(a) => a.ip().is_loopback(),
        SocketAddr::V6(a) => {
            a.ip().is_loopback() || a.ip().to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn loopback_is_allowed_and_remote_is_not() {
        assert!(resolve("127.0.0.1:25", false).is_ok());
        assert!(resolve("127.1.2.3:25", false).is_ok());
        assert!(resolve("[::1]:25", false).is_ok());
        assert!(resolve("[::ffff:127.0.0.1]:25", false).is_ok());
        assert!(matches!(
            resolve("192.0.2.1:25", false),
            Err(LoadError::RemoteTarget { .. })
        ));
        assert!(matches!(
            resolve("0.0.0.0:25", false),
            Err(LoadError::RemoteTarget { .. })
        ));
        assert!(resolve("192.0.2.1:25", true).is_ok());
        assert!(resolve("no-port", false).is_err());
    }
}
