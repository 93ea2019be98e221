//! Silent clients are dropped with 421 4.4.2 after the command timeout.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Instant;

use common::Server;

#[test]
fn a_silent_client_gets_421_and_is_closed() {
    let server = Server::start(&["--command-timeout", "300ms"]);
    let mut c = server.connect();
    c.line();
    let started = Instant::now();
    assert_eq!(
        c.line(),
        "421 4.4.2 mx.test Timeout exceeded, closing connection"
    );
    assert!(started.elapsed().as_millis() >= 250, "timed out too early");
    assert!(c.closed());
}

#[test]
fn a_client_stalling_inside_data_is_dropped_and_nothing_is_spooled() {
    let mut server = Server::start(&["--command-timeout", "300ms"]);
    let mut c = server.connect();
    c.line();
    c.cmd("EHLO client.test");
    c.cmd("MAIL FROM:<a@b.test>");
    c.cmd("RCPT TO:<c@d.test>");
    c.cmd("DATA");
    c.send(b"Subject: half a message\r\n");
    assert_eq!(
        c.line(),
        "421 4.4.2 mx.test Timeout exceeded, closing connection"
    );
    assert!(server.terminate().success());
    assert!(common::spooled(&server.spool).is_empty());
}

#[test]
fn the_session_time_cap_holds_even_for_a_chatty_client() {
    let server = Server::start(&["--max-session-time", "500ms", "--command-timeout", "10s"]);
    let mut c = server.connect();
    c.line();
    let started = Instant::now();
    loop {
        let reply = c.cmd("NOOP");
        if reply.starts_with("421 4.4.2") {
            // Said as what it is, not as a silent client's timeout.
            assert_eq!(
                reply,
                "421 4.4.2 mx.test Session time limit reached, closing connection"
            );
            break;
        }
        assert_eq!(reply, "250 2.0.0 Ok");
        assert!(
            started.elapsed().as_secs() < 5,
            "the session cap did not bite"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
