//! The sink's listeners: one socket per executor on the same address with SO_REUSEPORT, so
//! the kernel spreads connections over the executors. All are bound and listening before the
//! sink says where it listens, so a client that read that line can connect at once.

use std::net::SocketAddr;
use std::os::fd::IntoRawFd;

use socket2::{Domain, Protocol, Socket, Type};

use crate::error::LoadError;

/// Pending connections per listener (the kernel caps it at net.core.somaxconn).
const BACKLOG: i32 = 4096;

/// Binds `count` listening sockets on `addr`; returns them and the address bound (with the
/// port resolved when `addr` had port 0).
///
/// SO_REUSEPORT would also let a second sink (or a server of the same user) share a fixed port
/// with one already listening there, and the kernel would split the connections, and the
/// counts, between them: a port something listens on is refused first.
pub fn bind(addr: SocketAddr, count: usize) -> Result<(Vec<Socket>, SocketAddr), LoadError> {
    if addr.port() != 0 && postern_server::still_listening(addr) {
        return Err(LoadError::Listen {
            addr,
            source: std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another process already listens there (another sink?)",
            ),
        });
    }
    let first = listen(addr)?;
    let local = first
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or_else(|| LoadError::Listen {
            addr,
            source: std::io::Error::other("no local address"),
        })?;
    let mut sockets = vec![first];
    for _ in 1..count {
        sockets.push(listen(local)?);
    }
    Ok((sockets, local))
}

fn listen(addr: SocketAddr) -> Result<Socket, LoadError> {
    let err = |source| LoadError::Listen { addr, source };
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    s.set_reuse_port(true).map_err(err)?;
    s.set_reuse_address(true).map_err(err)?;
    s.set_tcp_nodelay(true).map_err(err)?;
    s.bind(&addr.into()).map_err(err)?;
    s.listen(BACKLOG).map_err(err)?;
    Ok(s)
}

/// Hands a listening socket to the glommio executor this is called on.
#[allow(unsafe_code)]
pub fn into_glommio(socket: Socket) -> glommio::net::TcpListener {
    use std::os::fd::FromRawFd;
    let fd = socket.into_raw_fd();
    // SAFETY: `fd` is a bound, listening TCP socket that `into_raw_fd` released from its
    // owner, so the new listener is its only owner and closes it exactly once.
    unsafe { glommio::net::TcpListener::from_raw_fd(fd) }
}
