//! Pipelined transactions over a real socket, with DATA and BDAT, several per connection; the
//! spool holds each message with its Received header.
#![allow(clippy::unwrap_used)]

mod common;

use common::{queue_id, spooled, Server};

#[test]
fn pipelined_data_and_bdat_transactions_are_spooled() {
    let mut server = Server::start(&[]);
    let mut c = server.connect();
    assert_eq!(c.line(), "220 mx.test ESMTP postern");
    c.send(
        b"EHLO client.test\r\nMAIL FROM:<alice@origin.test>\r\nRCPT TO:<bob@dest.test>\r\nDATA\r\n",
    );
    let ehlo = c.reply();
    assert!(
        ehlo.contains(&"250-PIPELINING".to_owned()) && ehlo.contains(&"250-CHUNKING".to_owned())
    );
    assert_eq!(c.line(), "250 2.1.0 Ok");
    assert_eq!(c.line(), "250 2.1.5 Ok");
    assert_eq!(c.line(), "354 End data with <CR><LF>.<CR><LF>");
    c.send(b"Subject: one\r\n\r\n..dotted\r\n.\r\n");
    let first = queue_id(&c.line());

    // The whole second transaction in one write, body by BDAT in two chunks.
    c.send(b"MAIL FROM:<> BODY=BINARYMIME\r\nRCPT TO:<carol@dest.test>\r\nRCPT TO:<dave@dest.test>\r\nBDAT 5\r\nab\0\r\nBDAT 3 LAST\r\nxyzQUIT\r\n");
    assert_eq!(c.line(), "250 2.1.0 Ok");
    assert_eq!(c.line(), "250 2.1.5 Ok");
    assert_eq!(c.line(), "250 2.1.5 Ok");
    assert_eq!(c.line(), "250 2.0.0 5 octets received");
    let second = queue_id(&c.line());
    assert_eq!(c.line(), "221 2.0.0 mx.test Bye");
    assert!(c.closed());
    assert_ne!(first, second);

    assert!(server.terminate().success());
    let msgs = spooled(&server.spool);
    assert_eq!(msgs.len(), 2);
    let one = msgs
        .iter()
        .find(|m| m.0 == first)
        .expect("first message spooled");
    assert_eq!(one.1, "alice@origin.test");
    assert_eq!(one.2, vec!["bob@dest.test".to_owned()]);
    let text = String::from_utf8(one.3.clone()).unwrap();
    assert!(
        text.starts_with(
            "Received: from client.test ([127.0.0.1])\r\n\tby mx.test (postern) with ESMTP id "
        ),
        "{text}"
    );
    assert!(
        text.contains(&format!("id {first}\r\n\tfor <bob@dest.test>;")),
        "{text}"
    );
    assert!(
        text.ends_with("\r\nSubject: one\r\n\r\n.dotted\r\n"),
        "{text}"
    );
    let two = msgs
        .iter()
        .find(|m| m.0 == second)
        .expect("second message spooled");
    assert_eq!(two.1, "");
    assert_eq!(two.2.len(), 2);
    assert!(two.3.ends_with(b"\r\nab\0\r\nxyz"));
    assert!(
        !String::from_utf8_lossy(&two.3).contains("\tfor <"),
        "no `for` with two recipients"
    );
}

/// Transactions pipelined into each other (RFC 2920 3.1): the next MAIL follows the previous
/// body in the same write, before its reply; each message gets its own reply, in order.
#[test]
fn transactions_pipelined_into_each_other_are_each_answered_and_spooled() {
    let mut server = Server::start(&[]);
    let mut c = server.connect();
    assert_eq!(c.line(), "220 mx.test ESMTP postern");
    assert!(c.cmd("EHLO client.test").contains("250 "));
    c.send(
        b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<one@dest.test>\r\nBDAT 7 LAST\r\nfirst\r\n\
          MAIL FROM:<b@origin.test>\r\nRCPT TO:<two@dest.test>\r\nBDAT 8 LAST\r\nsecond\r\n\
          MAIL FROM:<c@origin.test>\r\nRCPT TO:<three@dest.test>\r\nDATA\r\n",
    );
    let mut ids = Vec::new();
    for _ in 0..2 {
        assert_eq!(c.line(), "250 2.1.0 Ok");
        assert_eq!(c.line(), "250 2.1.5 Ok");
        ids.push(queue_id(&c.line()));
    }
    assert_eq!(c.line(), "250 2.1.0 Ok");
    assert_eq!(c.line(), "250 2.1.5 Ok");
    assert_eq!(c.line(), "354 End data with <CR><LF>.<CR><LF>");
    c.send(b"third\r\n.\r\nQUIT\r\n");
    ids.push(queue_id(&c.line()));
    assert_eq!(c.line(), "221 2.0.0 mx.test Bye");
    assert!(c.closed());

    assert!(server.terminate().success());
    let msgs = spooled(&server.spool);
    assert_eq!(msgs.len(), 3);
    for (id, (from, rcpt, tail)) in ids.iter().zip([
        ("a@origin.test", "one@dest.test", &b"\r\nfirst\r\n"[..]),
        ("b@origin.test", "two@dest.test", b"\r\nsecond\r\n"),
        ("c@origin.test", "three@dest.test", b"\r\nthird\r\n"),
    ]) {
        let m = msgs.iter().find(|m| &m.0 == id).expect("spooled");
        assert_eq!((m.1.as_str(), m.2.clone()), (from, vec![rcpt.to_owned()]));
        assert!(
            m.3.ends_with(tail),
            "{id}: {:?}",
            String::from_utf8_lossy(&m.3)
        );
    }
}

#[test]
fn a_command_ended_by_a_bare_lf_is_refused_and_the_session_goes_on() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    c.line();
    c.cmd("EHLO client.test");
    c.send(b"MAIL FROM:<a@origin.test>\nNOOP\r\n");
    assert_eq!(
        c.line(),
        "500 5.5.2 Syntax error: command lines must end with CR LF"
    );
    assert_eq!(c.line(), "250 2.0.0 Ok");
    // The MAIL was not run.
    assert_eq!(
        c.cmd("RCPT TO:<b@dest.test>"),
        "503 5.5.1 Need MAIL command"
    );
}
