//! `--metrics ADDR`: the counters as Prometheus text at `/metrics`, served with blocking I/O
//! on plain threads (never an executor): one per connection, at most [`MAX_CLIENTS`] at once,
//! so a client that connects and sends nothing never holds up a scrape.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::LoadError;
use crate::sink::counters::Counters;

/// Largest request head read.
const MAX_REQUEST: usize = 8 * 1024;

/// Connections served at once; more are closed at once.
const MAX_CLIENTS: usize = 64;

/// Longest time a client may take to send its request and read the answer.
const CLIENT_TIME: Duration = Duration::from_secs(5);

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
            let busy = Arc::new(AtomicUsize::new(0));
            for stream in listener.incoming().flatten() {
                if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
                    busy.fetch_sub(1, Ordering::AcqRel);
                    continue;
                }
                let (counters, done) = (counters.clone(), busy.clone());
                let served = std::thread::Builder::new()
                    .name("postern-load-metrics-client".into())
                    .spawn(move || {
                        let _ = answer(stream, &counters);
                        done.fetch_sub(1, Ordering::AcqRel);
                    });
                if served.is_err() {
                    busy.fetch_sub(1, Ordering::AcqRel);
                }
            }
        })
        .map_err(|source| LoadError::Listen { addr, source })?;
    Ok(local)
}

fn answer(mut stream: TcpStream, counters: &Counters) -> std::io::Result<()> {
    let deadline = Instant::now() + CLIENT_TIME;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::TimedOut))
    };
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
        stream.set_read_timeout(Some(left()?))?;
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let (status, body, head_only) = respond(&head, counters);
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{}",
        body.len(),
        if head_only { "" } else { body.as_str() }
    );
    stream.set_write_timeout(Some(left()?))?;
    stream.write_all(response.as_bytes())
}

/// The status, the body and whether only the head is sent (HEAD), for a request head.
fn respond(head: &[u8], counters: &Counters) -> (&'static str, String, bool) {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut words = line.trim_ascii().split(|&b| b == b' ');
    let (method, target) = (words.next().unwrap_or_default(), words.next());
    let path = target.map(|t| t.split(|&b| b == b'?').next().unwrap_or_default());
    let head_only = method == b"HEAD";
    match (method, path) {
        (b"GET" | b"HEAD", Some(b"/metrics")) => ("200 OK", counters.render(), head_only),
        (b"GET" | b"HEAD", Some(_)) => ("404 Not Found", "not found\n".to_owned(), head_only),
        _ => (
            "405 Method Not Allowed",
            "only GET and HEAD\n".to_owned(),
            false,
        ),
    }
}
