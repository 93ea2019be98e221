//! A connection in cleartext or inside TLS (after STARTTLS), for either side, with reads that
//! give up after a timeout so that no session can wait forever.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;

/// The byte stream of one session.
pub enum Conn {
    /// Cleartext.
    Plain(TcpStream),
    /// Client side inside TLS.
    Client(Box<futures_rustls::client::TlsStream<TcpStream>>),
    /// Server side inside TLS.
    Server(Box<futures_rustls::server::TlsStream<TcpStream>>),
    /// Taken apart for a handshake, or after a failed one: reads end, writes fail.
    Gone,
}

impl Conn {
    /// Takes the cleartext stream out for a TLS handshake.
    pub fn take_plain(&mut self) -> Option<TcpStream> {
        match std::mem::replace(self, Conn::Gone) {
            Conn::Plain(s) => Some(s),
            other => {
                *self = other;
                None
            }
        }
    }

    /// Reads what has arrived. A stream set up with [`Conn::plain_with_timeouts`] gives up
    /// with `TimedOut` after its timeout; glommio links that timeout to the receive in the
    /// ring, which costs less per read than a timer racing it.
    pub async fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read(buf).await
    }

    /// Writes all of `buf` and flushes (TLS records), within the stream's write timeout.
    pub async fn write_out(&mut self, buf: &[u8]) -> io::Result<()> {
        self.write_all(buf).await?;
        self.flush().await
    }

    /// A cleartext connection whose reads and writes time out after `timeout`.
    pub fn plain_with_timeouts(tcp: TcpStream, timeout: Duration) -> io::Result<Self> {
        let t = Some(timeout.max(Duration::from_millis(1)));
        tcp.set_read_timeout(t).map_err(io::Error::from)?;
        tcp.set_write_timeout(t).map_err(io::Error::from)?;
        Ok(Conn::Plain(tcp))
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
            Conn::Client(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Server(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
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
            Conn::Client(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Server(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Gone => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Client(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Server(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Gone => Poll::Ready(Ok(())),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_close(cx),
            Conn::Client(s) => Pin::new(s.as_mut()).poll_close(cx),
            Conn::Server(s) => Pin::new(s.as_mut()).poll_close(cx),
            Conn::Gone => Poll::Ready(Ok(())),
        }
    }
}
