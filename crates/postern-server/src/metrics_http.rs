//! The metrics port: Prometheus text at `/metrics`, liveness at `/healthz`, readiness at
//! `/readyz` (503 once the server is draining, so a load balancer stops sending new clients).
//! It runs on threads of its own with blocking I/O: never on a core that carries sessions.
//! Each connection gets a thread of its own (at most [`MAX_CLIENTS`] at once) and
//! [`REQUEST_TIME`] for its whole request, so a client that connects and says nothing, or
//! trickles its request, never holds up the scrape behind it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::core::StopFlag;
use crate::error::StartError;
use crate::metrics::Registry;

/// Largest request head read.
const MAX_REQUEST: usize = 8 * 1024;

/// Connections served at once. Past this, the oldest connection still sending its request
/// (or being read after its response, for a moment) is dropped to make room: a scraper sends
/// its request at once and is answered within a millisecond, so clients that trickle their
/// requests, say nothing, or send requests that keep them in the linger after the response
/// cannot keep it out. A connection whose whole request is in and is being answered, or one
/// taken less than [`NEW`] ago, is not dropped for [`ANSWER_GRACE`]: a burst of scrapers
/// beyond the slots waits for their answers rather than losing them.
const MAX_CLIENTS: usize = 64;

/// How long a new connection may wait for a slot when every connection is being answered
/// or new; past it, the oldest is dropped all the same (a client that does not read its
/// response).
const ANSWER_GRACE: Duration = Duration::from_secs(1);

/// How long a connection is spared before its request is in: a scraper sends it at once, and
/// one of a burst just taken is not dropped for the next.
const NEW: Duration = Duration::from_millis(250);

/// How long a client has for its whole request head.
const REQUEST_TIME: Duration = Duration::from_secs(5);

/// Connections being served: (number, since when, a handle to shut it down, whether its
/// request is in and its response being made or written).
type Serving = Arc<Mutex<Vec<(u64, Instant, TcpStream, Arc<AtomicBool>)>>>;

/// Binds `addr` (before the cores start, so a metrics address in use ends the start before
/// any SMTP client is taken).
pub(crate) fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).map_err(|e| StartError::Metrics(format!("{addr}: {e}")))
}

/// Serves from a new thread on a listener from [`bind`]; returns the bound address.
pub(crate) fn start(
    listener: TcpListener,
    registry: Registry,
    stop: Arc<StopFlag>,
) -> Result<SocketAddr, StartError> {
    let local = listener
        .local_addr()
        .map_err(|e| StartError::Metrics(e.to_string()))?;
    std::thread::Builder::new()
        .name("postern-metrics".into())
        .spawn(move || {
            let busy = Arc::new(AtomicUsize::new(0));
            let serving: Serving = Arc::default();
            // A failed accept (EMFILE, say) leaves the connection waiting: pause rather than
            // spin on it, as the SMTP listeners do.
            let accepted = listener.incoming().filter_map(|r| {
                r.map_err(|_| std::thread::sleep(std::time::Duration::from_millis(10)))
                    .ok()
            });
            for (n, stream) in (0u64..).zip(accepted) {
                if busy.load(Ordering::Acquire) >= MAX_CLIENTS {
                    // Its thread ends at its next read or write; until it has, the threads
                    // may be one more than the slots. Those being answered are waited for
                    // a moment first (bounded).
                    let give_up = Instant::now() + ANSWER_GRACE;
                    while busy.load(Ordering::Acquire) >= MAX_CLIENTS
                        && !evict_oldest(&serving, Instant::now() >= give_up)
                    {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                let answering = Arc::new(AtomicBool::new(false));
                if let Ok(handle) = stream.try_clone() {
                    if let Ok(mut r) = serving.lock() {
                        r.push((n, Instant::now(), handle, answering.clone()));
                    }
                }
                busy.fetch_add(1, Ordering::AcqRel);
                let (registry, stop, done) = (registry.clone(), stop.clone(), busy.clone());
                // Out of the list however the connection ends (answered, silence, error, or
                // a failed spawn): a copy left there would keep the connection open.
                let listed = Listed(serving.clone(), n);
                let spawned = std::thread::Builder::new()
                    .name("postern-metrics-client".into())
                    .spawn(move || {
                        let _ = answer(stream, &registry, &stop, &answering);
                        drop(listed);
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

/// A connection's place in the list of those being served; leaves it when dropped.
struct Listed(Serving, u64);

impl Drop for Listed {
    fn drop(&mut self) {
        if let Ok(mut r) = self.0.lock() {
            r.retain(|(k, ..)| *k != self.1);
        }
    }
}

/// Shuts down the connection served the longest that is neither being answered nor new
/// (with `any`, the longest of all), so that its thread ends and a new client is served;
/// false when there was none to shut down.
fn evict_oldest(serving: &Serving, any: bool) -> bool {
    let Ok(mut r) = serving.lock() else {
        return true;
    };
    let oldest = r
        .iter()
        .enumerate()
        .filter(|(_, (_, since, _, answering))| {
            any || (!answering.load(Ordering::Acquire) && since.elapsed() >= NEW)
        })
        .min_by_key(|(_, (_, since, ..))| *since)
        .map(|(i, _)| i);
    match oldest {
        Some(i) => {
            let (_, _, stream, _) = r.swap_remove(i);
            let _ = stream.shutdown(std::net::Shutdown::Both);
            true
        }
        // Nobody listed (all ended meanwhile): a slot is free or about to be.
        None => r.is_empty(),
    }
}

fn answer(
    mut stream: TcpStream,
    registry: &Registry,
    stop: &StopFlag,
    answering: &AtomicBool,
) -> std::io::Result<()> {
    stream.set_write_timeout(Some(REQUEST_TIME))?;
    let deadline = Instant::now() + REQUEST_TIME;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let mut complete = false;
    // Empty lines passed over count toward the head's cap: a client sending line ends
    // without end is not read for the whole deadline.
    let mut skipped = 0;
    while head.len() + skipped < MAX_REQUEST {
        // One deadline for the whole head, not for each read.
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        stream.set_read_timeout(Some(left))?;
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        // Empty lines before the request line are passed over (RFC 9112 2.2).
        let blank = head
            .iter()
            .position(|&b| b != b'\r' && b != b'\n')
            .unwrap_or(head.len());
        head.drain(..blank);
        skipped += blank;
        if head_is_complete(&head) {
            complete = true;
            break;
        }
    }
    // Its request is in: not dropped for a new client while it is answered (a moment).
    answering.store(complete, Ordering::Release);
    let (status, kind, body, head_only) = if complete {
        route(&head, registry, stop)
    } else {
        // RFC 6585 5.
        (
            "431 Request Header Fields Too Large",
            "text/plain",
            "request head too large\n".to_owned(),
            false,
        )
    };
    // A HEAD request gets no body, whatever its status (RFC 9110 9.3.2).
    let head_only = head_only || head.starts_with(b"HEAD ");
    let allow = if status.starts_with("405") {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    // An HTTP/0.9 request (a request line without a version) gets the body alone.
    let response = if complete && is_http09(&head) {
        if head_only {
            String::new()
        } else {
            body
        }
    } else {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n{}",
            body.len(),
            if head_only { "" } else { body.as_str() }
        )
    };
    stream.write_all(response.as_bytes())?;
    answering.store(false, Ordering::Release);
    if complete && !has_body(&head) {
        return Ok(());
    }
    // A head too large, or a request with a body (which is not read), leaves input unread,
    // and a close with unread input resets the connection, which can overtake the response
    // on its way (RFC 9112 9.6): the writing side is closed first, and what the client still
    // sends is read and dropped for a moment.
    stream.shutdown(std::net::Shutdown::Write)?;
    stream.set_read_timeout(Some(LINGER))?;
    let until = Instant::now() + LINGER;
    let mut drained = 0usize;
    while drained < LINGER_BYTES && Instant::now() < until {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
    Ok(())
}

/// Whether a request says a body follows its head (Content-Length other than 0, or
/// Transfer-Encoding), or bytes already came after the head's empty line.
fn has_body(head: &[u8]) -> bool {
    let end = head
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .or_else(|| head.windows(2).position(|w| w == b"\n\n").map(|i| i + 2))
        .unwrap_or(head.len());
    end < head.len()
        || head[..end].split(|&b| b == b'\n').skip(1).any(|line| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                return false;
            };
            let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
            name.eq_ignore_ascii_case(b"transfer-encoding")
                || (name.eq_ignore_ascii_case(b"content-length") && value != b"0")
        })
}

/// Whether a request's header fields frame its body validly (RFC 9112 6): every
/// Content-Length a number, and all of them the same one (6.3: otherwise a 400 and a close);
/// Transfer-Encoding only in HTTP/1.1, ending in `chunked`, and never beside a Content-Length
/// (6.1 lets a server refuse that; refused, as a request that meant to smuggle a second one
/// would carry it). The body itself is never read: this only keeps a faulty request from being
/// answered as a good one.
fn framing_is_valid(fields: &[&[u8]], version: &[u8]) -> bool {
    let value_of = |line: &[u8], name: &[u8]| -> Option<Vec<u8>> {
        let colon = line.iter().position(|&b| b == b':')?;
        line[..colon]
            .eq_ignore_ascii_case(name)
            .then(|| line[colon + 1..].trim_ascii().to_vec())
    };
    let mut length: Option<Vec<u8>> = None;
    let mut codings: Option<Vec<u8>> = None;
    for line in fields {
        if let Some(value) = value_of(line, b"content-length") {
            // A list of the same value is one value (RFC 9110 8.6).
            for one in value.split(|&b| b == b',') {
                let one = one.trim_ascii();
                if one.is_empty() || !one.iter().all(u8::is_ascii_digit) {
                    return false;
                }
                match &length {
                    Some(seen) if seen.as_slice() != one => return false,
                    _ => length = Some(one.to_vec()),
                }
            }
        } else if let Some(value) = value_of(line, b"transfer-encoding") {
            // Several fields are one list, in order (RFC 9110 5.3).
            codings.get_or_insert_with(Vec::new).push(b',');
            if let Some(all) = codings.as_mut() {
                all.extend_from_slice(&value);
            }
        }
    }
    let Some(codings) = codings else {
        return true;
    };
    let last = codings
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .rfind(|c| !c.is_empty())
        .unwrap_or(b"");
    length.is_none() && version == b"HTTP/1.1" && last.eq_ignore_ascii_case(b"chunked")
}

/// How long, and how much, a response's connection reads after the response (see `answer`).
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 256 * 1024;

/// Whether the request line is an HTTP/0.9 one: a method and a path, no version
/// (`GET /path`); other two-word lines are not requests at all, and get a 400 in HTTP/1.1.
fn is_http09(head: &[u8]) -> bool {
    let first = head.split(|&b| b == b'\n').next().unwrap_or(b"");
    let first = first.strip_suffix(b"\r").unwrap_or(first);
    match first.split(|&b| b == b' ').collect::<Vec<_>>()[..] {
        [method, path] => {
            !method.is_empty()
                && method.iter().all(u8::is_ascii_uppercase)
                && path.starts_with(b"/")
        }
        _ => false,
    }
}

/// Whether `head` holds a whole request head: up to an empty line, a line end being CR LF or a
/// bare LF (RFC 9112 2.2 lets a recipient take a bare LF as one), or, for a request line with
/// no version (HTTP/0.9), that line alone.
fn head_is_complete(head: &[u8]) -> bool {
    let Some(first_end) = head.iter().position(|&b| b == b'\n') else {
        return false;
    };
    let first = &head[..first_end];
    let first = first.strip_suffix(b"\r").unwrap_or(first);
    if first.split(|&b| b == b' ').count() == 2 {
        return true;
    }
    head.windows(2).any(|w| w == b"\n\n") || head.windows(3).any(|w| w == b"\n\r\n")
}

/// The path and query of an absolute-form request target (`http://host:port/path?query`),
/// `/` when it has none; None when `target` is not in absolute form.
fn absolute_path(target: &[u8]) -> Option<&[u8]> {
    let lower = target.to_ascii_lowercase();
    let scheme = [&b"http://"[..], b"https://"]
        .into_iter()
        .find(|s| lower.starts_with(s))?;
    let rest = &target[scheme.len()..];
    let start = rest.iter().position(|&b| b == b'/' || b == b'?');
    Some(match start {
        Some(i) if rest[i] == b'/' => &rest[i..],
        // `http://host?query` is the path `/` with a query, which is ignored.
        _ => b"/",
    })
}

/// The response to a whole request head: (status, content type, body, HEAD).
fn route(
    head: &[u8],
    registry: &Registry,
    stop: &StopFlag,
) -> (&'static str, &'static str, String, bool) {
    let bad = || {
        (
            "400 Bad Request",
            "text/plain",
            "bad request\n".to_owned(),
            false,
        )
    };
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let line = lines.next().unwrap_or(b"");
    let parts: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    // RFC 9112 3: method SP request-target SP HTTP-version; an HTTP/0.9 line has no version.
    let (method, target, version) = match parts[..] {
        [m, t, v] => (m, t, v),
        [m, t] => (m, t, &b"HTTP/0.9"[..]),
        _ => return bad(),
    };
    let token = |s: &[u8]| {
        !s.is_empty()
            && s.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(c))
    };
    // The absolute form (`http://host/metrics`) must be taken too (RFC 9112 3.2.2); the
    // asterisk form belongs to OPTIONS alone (RFC 9112 3.2.4).
    let target = absolute_path(target).unwrap_or(target);
    let origin_form = target.starts_with(b"/") || (target == b"*" && method == b"OPTIONS");
    if !token(method) || !origin_form || !version.starts_with(b"HTTP/") {
        return bad();
    }
    // Major versions other than 1 (and 0.9 above) are not spoken here (RFC 9110 15.6.6); a
    // later 1.x minor version is answered as 1.1 (RFC 9110 6.2).
    if version != b"HTTP/0.9" && !version.starts_with(b"HTTP/1.") {
        return (
            "505 HTTP Version Not Supported",
            "text/plain",
            "HTTP/1.1 only\n".to_owned(),
            false,
        );
    }
    // RFC 9112 3.2: an HTTP/1.1 request without Host is answered 400.
    // More than one Host is answered 400 as well.
    let fields: Vec<&[u8]> = lines.take_while(|l| !l.is_empty()).collect();
    let hosts = fields
        .iter()
        .filter(|l| l.len() >= 5 && l[..5].eq_ignore_ascii_case(b"host:"))
        .count();
    if (version == b"HTTP/1.1" && hosts == 0) || hosts > 1 {
        return bad();
    }
    if !framing_is_valid(&fields, version) {
        return bad();
    }
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
        (b"GET", b"/readyz") if stop.is_draining() => (
            "503 Service Unavailable",
            "text/plain",
            "draining\n".to_owned(),
        ),
        // A load balancer should send new clients elsewhere while MAIL here gets 452.
        (b"GET", b"/readyz") if registry.refusing() > 0 => (
            "503 Service Unavailable",
            "text/plain",
            "refusing new mail: the queue or the spool is over its high-water mark\n".to_owned(),
        ),
        (b"GET", b"/readyz") => ("200 OK", "text/plain", "ready\n".to_owned()),
        (b"GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".to_owned(),
        ),
    };
    (status, kind, body, head_only)
}
