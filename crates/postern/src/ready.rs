//! `postern ready`: asks a running server's metrics listener whether it takes mail
//! (`GET /readyz`), for a container's health check, which runs a command in the container and
//! has no HTTP client there to run.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;

use crate::cli::Ready;

/// The most of the answer read: the status line and a short body are all there is.
const ANSWER_MAX: u64 = 4096;

/// Exit 0 with `ready` when the server answers 200; 1 with a line saying why otherwise.
pub(crate) fn run(r: &Ready) -> ExitCode {
    let Some(addr) = r.address() else {
        eprintln!(
            "postern: not ready: the metrics listener is turned off (--metrics none), and \
             readiness is asked there"
        );
        return ExitCode::FAILURE;
    };
    match ask(addr, r.timeout) {
        Ok((200, _)) => {
            println!("ready");
            ExitCode::SUCCESS
        }
        Ok((code, body)) => {
            eprintln!("postern: not ready: {addr} answers {code} {}", body.trim());
            ExitCode::FAILURE
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            eprintln!(
                "postern: not ready: the metrics listener at {addr} did not answer within {:?}",
                r.timeout
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("postern: not ready: no answer from the metrics listener at {addr} ({e})");
            ExitCode::FAILURE
        }
    }
}

/// `GET /readyz` on `addr`, each step within `timeout`: the status code and the body.
fn ask(addr: std::net::SocketAddr, timeout: std::time::Duration) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    stream.take(ANSWER_MAX).read_to_end(&mut answer)?;
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
