//! Where the sender may send: loopback unless the operator says otherwise, so a mistyped
//! address never turns a benchmark into a flood against somebody else's server.

use std::net::{SocketAddr, ToSocketAddrs};

use crate::error::LoadError;

/// Resolves `target` (`HOST:PORT`) and refuses it when any address is not loopback, unless
/// `allow_remote`. Returns the first address that takes a connection, or the first one when
/// none does (a name such as `localhost` may give `::1` first for a server on 127.0.0.1).
pub fn resolve(target: &str, allow_remote: bool) -> Result<SocketAddr, LoadError> {
    let addrs = resolve_all(target, allow_remote)?;
    Ok(first_listening(&addrs))
}

/// The first of `addrs` where a TCP connection can be made (tried one after the other, each
/// for at most a second), or the first of them when none can: when there is but one, it is
/// not tried.
fn first_listening(addrs: &[SocketAddr]) -> SocketAddr {
    if addrs.len() > 1 {
        for addr in addrs {
            if std::net::TcpStream::connect_timeout(addr, std::time::Duration::from_secs(1)).is_ok()
            {
                return *addr;
            }
        }
    }
    addrs[0]
}

/// Every address of `target`, none of them remote unless `allow_remote`; never empty.
fn resolve_all(target: &str, allow_remote: bool) -> Result<Vec<SocketAddr>, LoadError> {
    let addrs: Vec<SocketAddr> = target
        .to_socket_addrs()
        .map_err(|e| LoadError::Resolve {
            target: target.to_owned(),
            why: e.to_string(),
        })?
        .collect();
    if addrs.is_empty() {
        return Err(LoadError::Resolve {
            target: target.to_owned(),
            why: "no address".into(),
        });
    }
    if !allow_remote {
        if let Some(&addr) = addrs.iter().find(|a| !is_loopback(a)) {
            return Err(LoadError::RemoteTarget { addr });
        }
    }
    Ok(addrs)
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
    fn of_several_addresses_the_one_that_listens_is_taken() {
        // As `localhost` giving ::1 first for a sink on 127.0.0.1: the first address has
        // nothing listening, the second has.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let silent: SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
        let listening: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        assert_eq!(first_listening(&[silent, listening]), listening);
        // None listens: the first, as before.
        drop(listener);
        assert_eq!(first_listening(&[silent, listening]), silent);
    }

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
