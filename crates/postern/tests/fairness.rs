//! A client that sends faster than its core can take the bytes does not starve the core's
//! other sessions, and its own session still meets the session cap and the stop.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{Client, Server};

/// The longest a flood goes on: the tests end it much sooner when the server is fair.
const FLOOD_FOR: Duration = Duration::from_secs(20);

/// A client inside DATA that writes bare line feeds, the costliest bytes for the server to take, as fast as the socket takes them,
/// until `stop` is set, the server closes, or `FLOOD_FOR` passes. Returns whether it was
/// still writing when stopped (not ended by its own time cap).
/// `under_way` is told once a MiB of it is written.
fn flood(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    under_way: std::sync::mpsc::Sender<()>,
) -> JoinHandle<(bool, Vec<u8>)> {
    let mut c = Client::connect(addr);
    c.line();
    c.cmd("EHLO flood.test");
    c.cmd("MAIL FROM:<a@b.test>");
    c.cmd("RCPT TO:<c@d.test>");
    assert!(c.cmd("DATA").starts_with("354"));
    std::thread::spawn(move || {
        let mut stream = c.stream;
        stream
            .set_write_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let block = vec![b'\n'; 64 * 1024];
        let started = Instant::now();
        let mut capped = true;
        let mut written = 0;
        while started.elapsed() < FLOOD_FOR {
            if stop.load(Ordering::SeqCst) {
                capped = false;
                break;
            }
            match stream.write(&block) {
                Ok(n) => {
                    written += n;
                    if written >= 1 << 20 {
                        let _ = under_way.send(());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                // Closed by the server.
                Err(_) => {
                    capped = false;
                    break;
                }
            }
        }
        // What the server said, up to its close (or 5 s).
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut said = Vec::new();
        let mut reader = c.reader;
        reader
            .get_mut()
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let _ = reader.read_to_end(&mut said);
        (!capped, said)
    })
}

#[test]
fn a_flooding_client_does_not_starve_the_other_sessions_of_its_core() {
    // Within the size limit: each bare line feed is a line end to store.
    let server = Server::start(&["--cores", "1"]);
    let stop = Arc::new(AtomicBool::new(false));
    let (told, under_way) = std::sync::mpsc::channel();
    let flooder = flood(server.smtp, stop.clone(), told);
    // The next client comes once the flood is in full swing (a MiB in).
    under_way
        .recv_timeout(FLOOD_FOR)
        .expect("the flood never got going");
    let mut c = TcpStream::connect(server.smtp).unwrap();
    c.set_read_timeout(Some(FLOOD_FOR + Duration::from_secs(5)))
        .unwrap();
    let mut banner = [0u8; 3];
    c.read_exact(&mut banner).unwrap();
    stop.store(true, Ordering::SeqCst);
    // Still flooding when told to stop: not ended by its own time cap.
    let (flooding, _) = flooder.join().unwrap();
    assert_eq!(&banner, b"220");
    assert!(
        flooding,
        "the second client was served only once the flood had ended"
    );
}

#[test]
fn a_flooding_client_is_held_to_the_session_cap() {
    let server = Server::start(&[
        "--cores",
        "1",
        "--max-message-size",
        "1k",
        "--max-session-time",
        "1s",
        "--command-timeout",
        "30s",
    ]);
    let stop = Arc::new(AtomicBool::new(false));
    let (told, _under_way) = std::sync::mpsc::channel();
    let (ended_by_server, said) = flood(server.smtp, stop, told).join().unwrap();
    let said = String::from_utf8_lossy(&said);
    assert!(
        ended_by_server,
        "the flood ran its full {FLOOD_FOR:?} on a session capped at 1 s"
    );
    assert!(
        said.contains("421 4.4.2 mx.test Session time limit reached"),
        "{said}"
    );
}
