//! The metrics port: Prometheus text at `/metrics`, liveness at `/healthz`, readiness at
//! `/readyz` (503 once the server is draining, so a load balancer stops sending new clients).
//! It runs on threads of its own with blocking I/O: never on a core that carries sessions.
//! Each connection gets a thread of its own (at most [`MAX_CLIENTS`] at once), so a client
//! that connects and says nothing never holds up the scrape behind it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::core::StopFlag;
use crate::error::StartError;
use crate::metrics::Registry;

/// Largest request head read.
const MAX_REQUEST: usize = 8 * 1024;

/// Connections served at once; past this, a new one is closed unanswered.
const MAX_CLIENTS: usize = 64;

/// Binds `addr` and serves from a new thread; returns the bound address.
pub(crate) fn start(
    addr: SocketAddr,
    registry: Registry,
    stop: Arc<StopFlag>,
) -> Result<SocketAddr, StartError> {
    let listener =
        TcpListener::bind(addr).map_err(|e| StartError::Metrics(format!("{addr}: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| StartError::Metrics(e.to_string()))?;
    std::thread::Builder::new()
        .name("postern-metrics".into())
        .spawn(move || {
            let busy = Arc::new(AtomicUsize::new(0));
            for stream in listener.incoming().flatten() {
                if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
                    busy.fetch_sub(1, Ordering::AcqRel);
                    continue;
                }
                let (registry, stop, done) = (registry.clone(), stop.clone(), busy.clone());
                let spawned = std::thread::Builder::new()
                    .name("postern-metrics-client".into())
                    .spawn(move || {
                        let _ = answer(stream, &registry, &stop);
                        done.fetch_sub(1, Ordering::AcqRel);
                    });
                if spawned.is_err() {
                    busy.fetch_sub(1, Ordering::AcqRel);
                }
            }
        })
        .map_err(|e| StartError::Metrics(e.to_string()))?;
    Ok(local)
}

fn answer(mut stream: TcpStream, registry: &Registry, stop: &StopFlag) -> std::io::Result<()> {
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
    let line = head.split(|&b| b == b'\r').next().unwrap_or(b"");
    let mut parts = line.split(|&b| b == b' ');
    let (method, target) = (parts.next().unwrap_or(b""), parts.next().unwrap_or(b""));
    // A query string (Prometheus' `params`) does not change what is served.
    let path = target.split(|&b| b == b'?').next().unwrap_or(b"");
    // HEAD gets GET's status and headers, without the body (RFC 9110 9.3.2).
    let head_only = method == b"HEAD";
    let method: &[u8] = if head_only { b"GET" } else { method };
    let (status, kind, body) = match (method, path) {
        (b"GET", b"/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            registry.render(),
        ),
        (b"GET", b"/healthz") => ("200 OK", "text/plain", "ok\n".to_owned()),
        (b"GET", b"/readyz") if stop.is_stopping() => (
            "503 Service Unavailable",
            "text/plain",
            "draining\n".to_owned(),
        ),
        (b"GET", b"/readyz") => ("200 OK", "text/plain", "ready\n".to_owned()),
        (b"GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".to_owned(),
        ),
    };
    let allow = if status.starts_with("405") {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n{}",
        body.len(),
        if head_only { "" } else { body.as_str() }
    );
    stream.write_all(response.as_bytes())
}
