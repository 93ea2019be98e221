//! One SMTP connection's byte stream, plain or inside TLS after STARTTLS (or from the
//! implicit-TLS port): the server's sessions use it, and so does the relay for its outbound
//! connections (with the client side of TLS).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::time::Duration;

use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;

/// The byte stream of one connection.
pub enum Conn {
    /// Cleartext.
    Plain(TcpStream),
    /// Inside TLS (the server or the client side).
    Tls(Box<futures_rustls::TlsStream<TcpStream>>),
    /// Taken apart for the handshake, or after a failed one: reads end, writes fail.
    Gone,
}

impl Conn {
    /// Takes the cleartext stream out for a TLS handshake (the connection is `Gone` until the
    /// TLS stream is put back); None when it is not in cleartext.
    pub fn take_plain(&mut self) -> Option<TcpStream> {
        match std::mem::replace(self, Conn::Gone) {
            Conn::Plain(s) => Some(s),
            other => {
                *self = other;
                None
            }
        }
    }

    /// A cleartext connection whose every read and write gives up with `TimedOut` after
    /// `timeout`; glommio links the timeout to the operation in the ring, which costs less
    /// per read than a timer racing it.
    pub fn plain_with_timeouts(tcp: TcpStream, timeout: Duration) -> io::Result<Self> {
        let t = Some(timeout.max(Duration::from_millis(1)));
        tcp.set_read_timeout(t).map_err(io::Error::from)?;
        tcp.set_write_timeout(t).map_err(io::Error::from)?;
        Ok(Conn::Plain(tcp))
    }

    /// The TCP stream underneath, cleartext or TLS; None when taken apart.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Conn::Plain(s) => Some(s),
            Conn::Tls(t) => Some(t.get_ref().0),
            Conn::Gone => None,
        }
    }

    /// The TLS cipher suite in use, by its name in the IANA registry (`TLS_AES_128_GCM_SHA256`);
    /// None in cleartext.
    pub fn tls_cipher(&self) -> Option<String> {
        let Conn::Tls(s) = self else {
            return None;
        };
        let suite = match s.as_ref() {
            futures_rustls::TlsStream::Server(s) => s.get_ref().1.negotiated_cipher_suite(),
            futures_rustls::TlsStream::Client(c) => c.get_ref().1.negotiated_cipher_suite(),
        }?;
        // rustls names the TLS 1.3 suites `TLS13_...`; the registry, `TLS_...`.
        let name = suite.suite().as_str()?;
        Some(match name.strip_prefix("TLS13") {
            Some(rest) => format!("TLS{rest}"),
            None => name.to_owned(),
        })
    }

    /// Reads what has arrived.
    pub async fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read(buf).await
    }

    /// Writes all of `buf` and flushes (TLS records).
    pub async fn write_out(&mut self, buf: &[u8]) -> io::Result<()> {
        self.write_all(buf).await?;
        self.flush().await
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => {
                let read = Pin::new(s.as_mut()).poll_read(cx, buf);
                // TLS may have made records of its own while reading (the alert that refuses
                // a renegotiation, the answer to a TLS 1.3 KeyUpdate), and a TLS stream's read
                // never writes them. A peer may be waiting for them while we wait for it:
                // send them before waiting. A flush that must wait for room is polled again
                // with the read.
                if read.is_pending() && s.get_ref().1.wants_write() {
                    if let Poll::Ready(Err(e)) = Pin::new(s.as_mut()).poll_flush(cx) {
                        return Poll::Ready(Err(e));
                    }
                }
                read
            }
            Conn::Gone => Poll::Ready(Ok(0)),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Gone => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Gone => Poll::Ready(Ok(())),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_close(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_close(cx),
            Conn::Gone => Poll::Ready(Ok(())),
        }
    }
}

/// Whether the client closed (or reset) the connection before sending a byte: a port check,
/// not a TLS client that failed its handshake. Nothing is consumed (`MSG_PEEK`).
pub(crate) async fn closed_before_a_byte(tcp: &TcpStream) -> bool {
    match tcp.peek(&mut [0u8; 1]).await {
        Ok(n) => n == 0,
        Err(e) => std::io::Error::from(e).kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// Reads and drops, without waiting, what the client has already sent (16 KiB at most):
/// closing a socket with input unread sends a reset, which throws away what the socket has
/// not sent yet, such as the reply written just before. For a connection refused at once,
/// where waiting for the client (as a session's end does) would make an overload dearer.
pub(crate) fn drop_input_already_here(tcp: &TcpStream) {
    use nix::sys::socket::{recv, MsgFlags};
    use std::os::fd::AsRawFd;
    let mut scrap = [0u8; 4096];
    for _ in 0..4 {
        match recv(tcp.as_raw_fd(), &mut scrap, MsgFlags::MSG_DONTWAIT) {
            Ok(n) if n == scrap.len() => {}
            _ => break,
        }
    }
}
