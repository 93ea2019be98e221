//! `postern ready`: asks a running server's metrics listener whether it takes mail
//! (`GET /readyz`), for a container's health check, which runs a command in the container and
//! has no HTTP client there to run.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::cli::Ready;
use crate::terminal::for_terminal;

/// The most of the answer read: the status line and a short body are all there is.
const ANSWER_MAX: usize = 4096;

/// Exit 0 with `ready` when the server answers 200; 1 with a line saying why otherwise.
pub(crate) fn run(r: &Ready) -> ExitCode {
    let Some(addr) = r.address() else {
        complain!(
            "postern: not ready: the metrics listener is turned off (--metrics none), and \
             readiness is asked there"
        );
        return ExitCode::FAILURE;
    };
    match ask(addr, r.timeout) {
        Ok((200, _)) => {
            // A closed or full stdout does not change the answer (the exit status).
            say!("ready");
            ExitCode::SUCCESS
        }
        Ok((code, body)) => {
            complain!(
                "postern: not ready: {addr} answers {code} {}",
                one_line(&body)
            );
            ExitCode::FAILURE
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            complain!(
                "postern: not ready: the metrics listener at {addr} did not answer within {:?}",
                r.timeout
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            // Refused is also what a server started without --metrics gives (it has no
            // metrics listener unless asked for one): say where to look.
            let hint = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                "; is the server running, with --metrics on this address?"
            } else {
                ""
            };
            complain!(
                "postern: not ready: no answer from the metrics listener at {addr} ({e}){hint}"
            );
            ExitCode::FAILURE
        }
    }
}

/// The answer's body as one line of the command's output: its lines joined with a space,
/// and nothing in it a terminal acts on.
fn one_line(body: &str) -> String {
    let words: Vec<&str> = body.split_whitespace().collect();
    for_terminal(&words.join(" "))
}

/// `GET /readyz` on `addr`, the whole exchange within `timeout` (a listener that trickles its
/// answer does not stretch it): the status code and the body.
fn ask(addr: std::net::SocketAddr, timeout: Duration) -> std::io::Result<(u16, String)> {
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::TimedOut))
    };
    let mut stream = TcpStream::connect_timeout(&addr, left()?)?;
    stream.set_write_timeout(Some(left()?))?;
    write!(
        stream,
        "GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    // Bounded: each pass reads at least one octet, up to ANSWER_MAX, or ends at the deadline.
    while answer.len() < ANSWER_MAX {
        stream.set_read_timeout(Some(left()?))?;
        let n = match stream.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => r?,
        };
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n.min(ANSWER_MAX - answer.len())]);
    }
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let code = head
        .lines()
        .next()
        .and_then(|status| status.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not an HTTP answer".to_owned(),
            )
        })?;
    Ok((code, body.to_owned()))
}
