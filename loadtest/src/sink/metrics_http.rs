//! `--metrics ADDR`: the counters as Prometheus text at `/metrics`, served by a plain thread
//! with blocking I/O (never an executor), one short request at a time.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crate::error::LoadError;
use crate::sink::counters::Counters;

/// Largest request head read.
const MAX_REQUEST: usize = 8 * 1024;

/// Binds `addr` and serves from a new thread (which ends with the process); returns the
/// address bound.
pub fn start(addr: SocketAddr, counters: Arc<Counters>) -> Result<SocketAddr, LoadError> {
    let listener = TcpListener::bind(addr).map_err(|source| LoadError::Listen { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| LoadError::Listen { addr, source })?;
    std::thread::Builder::new()
        .name("postern-load-metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = answer(stream, &counters);
            }
        })
        .map_err(|source| LoadError::Listen { addr, source })?;
    Ok(local)
}

fn answer(mut stream: TcpStream, counters: &Counters) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let (status, body) = if head.starts_with(b"GET /metrics ") {
        ("200 OK", counters.render())
    } else {
        ("404 Not Found", "not found\n".to_owned())
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())
}
