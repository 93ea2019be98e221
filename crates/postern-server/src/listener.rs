//! A core's listening socket, and how it stops listening without leaving a connection
//! unanswered.
//!
//! While a core runs, connections are taken with glommio's accept, an io_uring operation
//! that is always in flight on an idle listener. When the server stops, that operation must
//! not simply be dropped: glommio then asks the kernel to cancel it, and should the kernel
//! have completed it meanwhile (a client connecting at that moment), the new connection's
//! descriptor is never handed to anyone. It stays open, unanswered, until the process ends,
//! and the client sees a close with no reply at all (no `421`). So a stopping core takes
//! the connections the kernel has already completed with plain non-blocking `accept4`
//! calls, then shuts the listener's reading side, which ends the operation still in flight
//! (with a connection that came just then, or an error), and only then lets it go.
//!
//! The module's unsafe code is handing descriptors it made or accepted to glommio
//! (`FromRawFd`) and the `accept4`, `fcntl` and `shutdown` calls on the listener's
//! descriptor, which glommio's listener does not expose.

#![allow(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};

use glommio::net::{TcpListener, TcpStream};
use socket2::{Domain, Protocol, Socket, Type};

/// The backlog of each listener (as glommio's own `bind`).
const BACKLOG: i32 = 1024;

/// A listening socket on one core: glommio's listener, and its descriptor for the stop.
pub(crate) struct Listener {
    inner: TcpListener,
    fd: RawFd,
}

impl Listener {
    /// Listens on `addr` with SO_REUSEPORT (every core binds the same address, and the
    /// kernel spreads connections over them), on the calling core's executor.
    pub(crate) fn bind(addr: SocketAddr) -> io::Result<Listener> {
        let domain = if addr.is_ipv6() {
            Domain::IPV6
        } else {
            Domain::IPV4
        };
        let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_port(true)?;
        socket.bind(&addr.into())?;
        socket.listen(BACKLOG)?;
        let fd = socket.into_raw_fd();
        // SAFETY: `fd` is the listening TCP socket made just above; ownership passes to the
        // glommio listener, which closes it when dropped. `self.fd` is only used while
        // `self.inner` lives.
        let inner = unsafe { TcpListener::from_raw_fd(fd) };
        Ok(Listener { inner, fd })
    }

    /// The next connection (glommio's io_uring accept).
    pub(crate) async fn accept(&self) -> glommio::Result<TcpStream, ()> {
        self.inner.accept().await
    }

    /// The connections the kernel has completed and not yet handed over, at most `max`,
    /// taken without io_uring: the listener is made non-blocking, and `accept4` is called
    /// until it has none left. Only for a core that stops (glommio's accept expects a blocking
    /// listener).
    pub(crate) fn take_waiting(&self, max: usize) -> Vec<TcpStream> {
        // SAFETY: `self.fd` is the open listener owned by `self.inner`; F_GETFL and F_SETFL
        // change only its flags.
        let nonblocking = unsafe {
            let flags = libc::fcntl(self.fd, libc::F_GETFL);
            flags >= 0 && libc::fcntl(self.fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
        };
        let mut taken = Vec::new();
        if !nonblocking {
            return taken;
        }
        while taken.len() < max {
            // SAFETY: `self.fd` is the open listener; null address pointers are allowed.
            let fd = unsafe {
                libc::accept4(
                    self.fd,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: `fd` is the connected socket accept4 just returned, owned by no one
                // else; the stream closes it.
                taken.push(unsafe { TcpStream::from_raw_fd(fd) });
                continue;
            }
            match io::Error::last_os_error().raw_os_error() {
                // A client that reset while queued: the ones behind it are still taken.
                Some(libc::ECONNABORTED | libc::EINTR) => continue,
                // None left (EAGAIN), or none can be taken (no descriptor left).
                _ => break,
            }
        }
        taken
    }

    /// Shuts the listener's reading side: it takes no more connections (the kernel resets
    /// those it completes from now on), and an io_uring accept in flight ends at once.
    pub(crate) fn stop_listening(&self) {
        // SAFETY: `self.fd` is the open listener owned by `self.inner`.
        unsafe {
            libc::shutdown(self.fd, libc::SHUT_RD);
        }
    }
}
