//! The client state machine wired to the server state machine in memory, and to canned
//! replies for servers unlike ours (no PIPELINING, no EHLO, odd multi-line replies).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use postern_proto::client::{
    BdatChunk, BodyMode, ClientError, ClientEvent, ClientSession, OutRecipient, Transaction,
};
use postern_proto::stuff::DotStuffer;
use postern_proto::{Event, ServerConfig, ServerSession};

struct Wire {
    client: ClientSession,
    server: ServerSession,
    to_server: Vec<u8>,
    to_client: Vec<u8>,
    body: Vec<u8>,
    queued: Vec<Vec<u8>>,
    /// Every command line the client wrote (its output and BDAT chunk headers, no body).
    commands: String,
}

impl Wire {
    fn new() -> Self {
        Self::with_config(ServerConfig::default())
    }

    fn with_config(config: ServerConfig) -> Self {
        let config = Arc::new(ServerConfig {
            hostname: "mx.test".into(),
            max_message_size: 1 << 20,
            ..config
        });
        let mut server = ServerSession::new(config, false);
        server.greet();
        Wire {
            client: ClientSession::new("relay.test"),
            server,
            to_server: Vec::new(),
            to_client: Vec::new(),
            body: Vec::new(),
            queued: Vec::new(),
            commands: String::new(),
        }
    }

    /// Moves the client's queued commands towards the server.
    fn take_output(&mut self) {
        let out = self.client.output();
        self.commands.push_str(&String::from_utf8_lossy(out));
        self.to_server.extend_from_slice(out);
        self.client.clear_output();
    }

    fn bdat_commands(&self) -> Vec<&str> {
        self.commands
            .split_inclusive("\r\n")
            .filter(|l| l.starts_with("BDAT "))
            .collect()
    }

    fn run_server(&mut self) {
        loop {
            let step = self.server.handle(&self.to_server);
            let consumed = step.consumed;
            match step.event {
                Event::NeedInput | Event::Close => {
                    self.to_server.drain(..consumed);
                    break;
                }
                Event::Rcpt(postern_proto::ForwardPath::Mailbox(m), _) if m.local == "nobody" => {
                    self.server.reject(postern_proto::StaticReply::new(
                        550,
                        postern_proto::EnhancedCode::new(5, 1, 1),
                        "No such user",
                    ))
                }
                Event::Mail(..) | Event::Rcpt(..) | Event::DataStart => self.server.accept(),
                Event::Body(b) => self.body.extend_from_slice(b),
                Event::DataEnd => {
                    self.queued.push(std::mem::take(&mut self.body));
                    self.server.message_queued("ID1");
                }
                Event::DataAbort => self.body.clear(),
                Event::StartTls => unreachable!("no TLS in this test"),
                // Taken with the rest once the server needs input.
                Event::Flush => {}
            }
            self.to_server.drain(..consumed);
        }
        self.to_client.extend_from_slice(self.server.output());
        self.server.clear_output();
    }

    /// Moves bytes both ways until the client has something to say.
    fn pump(&mut self) -> ClientEvent {
        for _ in 0..100 {
            self.take_output();
            self.run_server();
            let (n, event) = self.client.handle(&self.to_client);
            self.to_client.drain(..n);
            if event != ClientEvent::NeedInput {
                return event;
            }
        }
        panic!("client and server stalled");
    }

    fn send_body(&mut self, mode: BodyMode, body: &[u8]) {
        self.take_output();
        match mode {
            BodyMode::Bdat => {
                let mut next = 0;
                for c in self.client.bdat_chunks() {
                    assert_eq!(c.offset, next, "chunks in order, without gaps");
                    next = c.offset + c.len;
                    self.commands.push_str(&c.header);
                    self.to_server.extend_from_slice(c.header.as_bytes());
                    let at = c.offset as usize;
                    self.to_server
                        .extend_from_slice(&body[at..at + c.len as usize]);
                }
                assert_eq!(next, body.len() as u64, "chunks cover the body");
            }
            BodyMode::Data => {
                let mut stuffer = DotStuffer::new();
                for half in [&body[..body.len() / 2], &body[body.len() / 2..]] {
                    for slice in stuffer.stuff(half) {
                        self.to_server.extend_from_slice(slice);
                    }
                }
                self.to_server.extend_from_slice(stuffer.finish());
            }
        }
        self.client.body_sent();
    }
}

fn transaction(mode: BodyMode, body: &[u8], rcpts: &[&str]) -> Transaction {
    Transaction {
        from: "sender@origin.test".into(),
        mail_params: String::new(),
        rcpts: rcpts
            .iter()
            .map(|r| OutRecipient {
                path: (*r).to_owned(),
                params: " NOTIFY=FAILURE".into(),
            })
            .collect(),
        body_len: body.len() as u64,
        mode,
        chunk_size: 0,
    }
}

fn deliver(mode: BodyMode, body: &[u8]) {
    deliver_as(mode, "", body);
}

fn deliver_as(mode: BodyMode, mail_params: &str, body: &[u8]) {
    let mut w = Wire::new();
    assert_eq!(w.pump(), ClientEvent::Ready);
    let caps = w.client.capabilities().clone();
    assert!(caps.pipelining && caps.chunking && caps.eightbitmime && caps.smtputf8);
    assert_eq!(caps.size, Some(1 << 20));
    w.client
        .send(&Transaction {
            mail_params: mail_params.to_owned(),
            ..transaction(mode, body, &["a@mx.test", "nobody@mx.test", "b@mx.test"])
        })
        .unwrap();
    assert_eq!(w.pump(), ClientEvent::SendBody);
    w.send_body(mode, body);
    let ClientEvent::Done(result) = w.pump() else {
        panic!("no result")
    };
    assert_eq!(result.mail.code, 250);
    assert_eq!(
        result.rcpts.iter().map(|r| r.code).collect::<Vec<_>>(),
        vec![250, 550, 250]
    );
    assert_eq!(
        result.outcome(0).lines,
        vec!["Ok: queued as ID1".to_owned()]
    );
    assert_eq!(result.outcome(1).code, 550);
    assert_eq!(w.queued, vec![body.to_vec()]);
    w.client.quit();
    assert_eq!(w.pump(), ClientEvent::Closed);
}

#[test]
fn pipelined_data_round_trip() {
    deliver(
        BodyMode::Data,
        b"Subject: x\r\n\r\n.leading dot\r\n..two\r\nend\r\n",
    );
}

#[test]
fn pipelined_bdat_round_trip() {
    // Octets that are not text (a NUL, a bare LF) go as BINARYMIME, byte for byte.
    deliver_as(
        BodyMode::Bdat,
        " BODY=BINARYMIME",
        b"binary\0\xff\r\n.\r\nstill body\n",
    );
}

#[test]
fn size_over_the_next_hop_limit_fails_before_sending() {
    let mut w = Wire::new();
    assert_eq!(w.pump(), ClientEvent::Ready);
    let mut t = transaction(BodyMode::Data, b"", &["a@mx.test"]);
    t.body_len = 2 << 20;
    let err = w.client.send(&t).unwrap_err();
    assert_eq!(
        (err.code, err.enhanced.map(|e| e.to_string())),
        (552, Some("5.3.4".into()))
    );
    assert!(w.client.output().is_empty());
}

/// Drives a client against canned server bytes, one reply batch per client write.
fn canned(client: &mut ClientSession, replies: &[&str]) -> (Vec<ClientEvent>, String) {
    let mut events = Vec::new();
    let mut sent = String::new();
    for r in replies {
        let mut input = r.as_bytes().to_vec();
        loop {
            let (n, e) = client.handle(&input);
            input.drain(..n);
            sent.push_str(&String::from_utf8_lossy(client.output()));
            client.clear_output();
            if e == ClientEvent::NeedInput {
                break;
            }
            events.push(e);
        }
    }
    (events, sent)
}

#[test]
fn ehlo_refused_falls_back_to_helo() {
    let mut c = ClientSession::new("relay.test");
    let (events, sent) = canned(
        &mut c,
        &["220 old.test\r\n", "502 5.5.1 what\r\n", "250 old.test\r\n"],
    );
    assert_eq!(events, vec![ClientEvent::Ready]);
    assert_eq!(sent, "EHLO relay.test\r\nHELO relay.test\r\n");
    assert!(!c.capabilities().esmtp && !c.capabilities().pipelining);
}

#[test]
fn any_permanent_refusal_of_ehlo_falls_back_to_helo() {
    for code in ["500", "501", "502", "504", "550", "554"] {
        let mut c = ClientSession::new("relay.test");
        let refusal = format!("{code} no EHLO here\r\n");
        let (events, sent) = canned(&mut c, &["220 old.test\r\n", &refusal, "250 old.test\r\n"]);
        assert_eq!(events, vec![ClientEvent::Ready], "{code}");
        assert_eq!(sent, "EHLO relay.test\r\nHELO relay.test\r\n", "{code}");
    }
}

#[test]
fn a_refused_helo_or_a_temporary_ehlo_refusal_ends_with_quit() {
    for replies in [
        &[
            "220 x\r\n",
            "554 5.7.1 go away\r\n",
            "554 5.7.1 still no\r\n",
        ][..],
        &["220 x\r\n", "451 4.3.0 busy\r\n"][..],
    ] {
        let mut c = ClientSession::new("relay.test");
        let (events, sent) = canned(&mut c, replies);
        let [ClientEvent::Failed(ClientError::Helo(r))] = &events[..] else {
            panic!("{events:?}")
        };
        assert_eq!(r.code, replies.last().unwrap()[..3].parse::<u16>().unwrap());
        assert!(sent.ends_with("QUIT\r\n"), "{sent:?}");
    }
}

#[test]
fn a_success_other_than_250_to_ehlo_or_helo_is_out_of_step_not_a_refusal() {
    // A second greeting (its EHLO reply still to come), or a 354: no answer EHLO or HELO can
    // get. Taken for a refusal, it was reported as the next hop saying it, with a status made
    // of a success's code.
    for replies in [
        &["220 x first\r\n", "220 x second\r\n"][..],
        &["220 x\r\n", "354 go on\r\n"][..],
        &["220 x\r\n", "502 5.5.1 no EHLO\r\n", "220 x again\r\n"][..],
    ] {
        let mut c = ClientSession::new("relay.test");
        let (events, sent) = canned(&mut c, replies);
        let [ClientEvent::Failed(ClientError::Unexpected(command, r))] = &events[..] else {
            panic!("{events:?}")
        };
        let helo = replies.len() == 3;
        assert_eq!(*command, if helo { "HELO" } else { "EHLO" });
        assert_eq!(r.code, replies.last().unwrap()[..3].parse::<u16>().unwrap());
        assert!(sent.ends_with("QUIT\r\n"), "{sent:?}");
    }
}

#[test]
fn the_names_a_server_gives_itself_are_kept_and_blanks_in_ehlo_lines_are_any_blanks() {
    let mut c = ClientSession::new("relay.test");
    let (events, _) = canned(
        &mut c,
        &[
            "220 Greeter.Example. ESMTP ready\r\n",
            "250-helper.example hello\r\n250-DSN\t\r\n250-SIZE  1000\r\n250 8BITMIME \r\n",
        ],
    );
    assert_eq!(events, vec![ClientEvent::Ready]);
    assert!(c.names_itself("greeter.example"));
    assert!(c.names_itself("HELPER.EXAMPLE."));
    assert!(!c.names_itself("relay.test"));
    assert!(!c.names_itself(""));
    let caps = c.capabilities();
    assert!(caps.dsn && caps.eightbitmime, "{caps:?}");
    assert_eq!(caps.size, Some(1000));
    // After HELO, its reply's name.
    let mut c = ClientSession::new("relay.test");
    canned(&mut c, &["220 x\r\n", "502 no\r\n", "250 old.example\r\n"]);
    assert!(c.names_itself("old.example") && c.names_itself("x"));
}

#[test]
fn a_long_ehlo_reply_is_taken_whole_up_to_its_last_line() {
    // More lines than the client keeps: the extra lines are read and dropped, the reply
    // itself still counts (RFC 5321 4.2.1 sets no line count), up to the 1,000 lines a
    // reply may have here.
    for (lines, keeps_last) in [(40, true), (900, false)] {
        let mut ehlo = String::new();
        for i in 0..lines {
            ehlo.push_str(&format!("250-X-EXTENSION-{i}\r\n"));
        }
        ehlo.push_str("250 PIPELINING\r\n");
        let mut c = ClientSession::new("relay.test");
        let (events, _) = canned(&mut c, &["220 x\r\n", &ehlo]);
        assert_eq!(events, vec![ClientEvent::Ready], "{lines}");
        assert!(c.capabilities().esmtp);
        assert_eq!(c.capabilities().pipelining, keeps_last, "{lines}");
    }
}

#[test]
fn a_refused_starttls_leaves_the_session_usable_in_cleartext() {
    let mut c = ClientSession::new("relay.test");
    canned(&mut c, &["220 x\r\n", "250-x\r\n250 STARTTLS\r\n"]);
    c.start_tls().unwrap();
    let (events, sent) = canned(&mut c, &["454 4.7.0 not now\r\n"]);
    let [ClientEvent::StartTlsRefused(r)] = &events[..] else {
        panic!("{events:?}")
    };
    assert_eq!((r.code, sent.as_str()), (454, "STARTTLS\r\n"));
    assert!(!c.is_tls());
    // The session goes on: a transaction can start.
    c.send(&transaction(BodyMode::Data, b"hi\r\n", &["a@x.test"]))
        .unwrap();
    assert!(String::from_utf8_lossy(c.output()).starts_with("MAIL FROM:<sender@origin.test>"));
}

#[test]
fn names_said_before_tls_are_forgotten_after_it() {
    // RFC 3207 4.2: what the server said before TLS may be anyone's on the path. A greeting
    // rewritten to this server's own name must not make a verified next hop look like a
    // loop back here.
    let mut c = ClientSession::new("relay.test");
    canned(
        &mut c,
        &["220 me.example\r\n", "250-me.example\r\n250 STARTTLS\r\n"],
    );
    assert!(c.names_itself("me.example"));
    c.start_tls().unwrap();
    let (events, _) = canned(&mut c, &["220 2.0.0 go ahead\r\n"]);
    assert_eq!(events, vec![ClientEvent::StartTls]);
    c.tls_established();
    assert!(!c.names_itself("me.example"));
    let (events, sent) = canned(&mut c, &["250-other.example\r\n250 PIPELINING\r\n"]);
    assert_eq!(sent, "EHLO relay.test\r\n");
    assert_eq!(events, vec![ClientEvent::Ready]);
    assert!(!c.names_itself("me.example"));
    assert!(c.names_itself("other.example"));
    // The names given inside TLS count.
    let mut c = ClientSession::new("relay.test");
    canned(
        &mut c,
        &["220 x.example\r\n", "250-x.example\r\n250 STARTTLS\r\n"],
    );
    c.start_tls().unwrap();
    canned(&mut c, &["220 go\r\n"]);
    c.tls_established();
    canned(&mut c, &["250 me.example\r\n"]);
    assert!(c.names_itself("me.example"));
}

#[test]
fn without_pipelining_commands_wait_for_replies() {
    let mut c = ClientSession::new("relay.test");
    let (events, _) = canned(&mut c, &["220 x\r\n", "250-x\r\n250 8BITMIME\r\n"]);
    assert_eq!(events, vec![ClientEvent::Ready]);
    c.send(&transaction(
        BodyMode::Data,
        b"hi\r\n",
        &["a@x.test", "b@x.test"],
    ))
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(c.output()),
        "MAIL FROM:<sender@origin.test>\r\n"
    );
    c.clear_output();
    let (_, sent) = canned(&mut c, &["250 ok\r\n"]);
    assert_eq!(sent, "RCPT TO:<a@x.test> NOTIFY=FAILURE\r\n");
    let (_, sent) = canned(&mut c, &["250 ok\r\n"]);
    assert_eq!(sent, "RCPT TO:<b@x.test> NOTIFY=FAILURE\r\n");
    let (_, sent) = canned(&mut c, &["250 ok\r\n"]);
    assert_eq!(sent, "DATA\r\n");
    let (events, _) = canned(&mut c, &["354 go\r\n"]);
    assert_eq!(events, vec![ClientEvent::SendBody]);
    c.body_sent();
    let (events, _) = canned(&mut c, &["250 2.0.0 queued\r\n"]);
    let [ClientEvent::Done(r)] = &events[..] else {
        panic!("{events:?}")
    };
    assert_eq!(r.data.as_ref().map(|d| d.code), Some(250));
}

#[test]
fn a_reply_that_comes_before_its_command_is_out_of_step() {
    // Two replies to MAIL in one read: the second came before RCPT went out, so it answers
    // nothing. Taken as RCPT's, each later reply would answer the command before it (the
    // reply to the end of data taken from DATA's 354 and a refusal never seen).
    let mut c = ClientSession::new("relay.test");
    let (events, _) = canned(&mut c, &["220 x\r\n", "250-x\r\n250 8BITMIME\r\n"]);
    assert_eq!(events, vec![ClientEvent::Ready]);
    c.send(&transaction(BodyMode::Data, b"hi\r\n", &["a@x.test"]))
        .unwrap();
    c.clear_output();
    let (events, sent) = canned(&mut c, &["250 ok\r\n250 ok\r\n"]);
    let [ClientEvent::Failed(ClientError::Unexpected(_, extra))] = &events[..] else {
        panic!("{events:?}")
    };
    assert_eq!(extra.code, 250);
    assert_eq!(sent, "QUIT\r\n", "RCPT never goes out");
    // A 421 in the same place is the server closing, and said so.
    let mut c = ClientSession::new("relay.test");
    canned(&mut c, &["220 x\r\n", "250-x\r\n250 8BITMIME\r\n"]);
    c.send(&transaction(BodyMode::Data, b"hi\r\n", &["a@x.test"]))
        .unwrap();
    c.clear_output();
    let (events, _) = canned(&mut c, &["250 ok\r\n421 4.3.2 going down\r\n"]);
    assert!(
        matches!(&events[..], [ClientEvent::Failed(ClientError::Closing(r))] if r.code == 421),
        "{events:?}"
    );
    // Replies to commands written before are taken as always (pipelined in one read).
    let mut c = ClientSession::new("relay.test");
    let (events, _) = canned(&mut c, &["220 x\r\n", "250-x\r\n250 PIPELINING\r\n"]);
    assert_eq!(events, vec![ClientEvent::Ready]);
    c.send(&transaction(BodyMode::Data, b"hi\r\n", &["a@x.test"]))
        .unwrap();
    c.clear_output();
    let (events, _) = canned(&mut c, &["250 ok\r\n250 ok\r\n354 go\r\n"]);
    assert_eq!(events, vec![ClientEvent::SendBody]);
}

#[test]
fn a_refused_data_after_a_recipient_was_taken_settles_at_the_rset_reply() {
    // A reply no command asked for (after b's refusal) pushes c's refusal into DATA's place;
    // the server's 354 comes next. Settled at once, DATA's "refusal" would fail a, which the
    // server took, with c's reply.
    let start = |c: &mut ClientSession| {
        canned(c, &["220 x\r\n", "250-x\r\n250 PIPELINING\r\n"]);
        c.send(&transaction(
            BodyMode::Data,
            b"hi\r\n",
            &["a@x.test", "b@x.test", "c@x.test"],
        ))
        .unwrap();
        c.clear_output();
    };
    let mut c = ClientSession::new("relay.test");
    start(&mut c);
    let (events, sent) = canned(
        &mut c,
        &["250 ok\r\n250 ok\r\n550 5.1.1 b\r\n250 stray\r\n550 5.1.1 c\r\n"],
    );
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(sent, "RSET\r\n");
    let (events, _) = canned(&mut c, &["354 go\r\n"]);
    assert!(
        matches!(&events[..], [ClientEvent::Failed(ClientError::Unexpected("RSET", r))] if r.code == 354),
        "{events:?}"
    );
    let unfinished = c.take_unfinished().expect("the transaction is given up");
    assert_eq!(unfinished.data.as_ref().map(|d| d.code), Some(550));
    // The 354 in the same read as the refusal came before the RSET went out: out of step too.
    let mut c = ClientSession::new("relay.test");
    start(&mut c);
    let (events, _) = canned(
        &mut c,
        &["250 ok\r\n250 ok\r\n550 5.1.1 b\r\n250 stray\r\n550 5.1.1 c\r\n354 go\r\n"],
    );
    assert!(
        matches!(
            &events[..],
            [ClientEvent::Failed(ClientError::Unexpected(..))]
        ),
        "{events:?}"
    );
    // A refusal of DATA that the RSET's 250 follows is taken.
    let mut c = ClientSession::new("relay.test");
    start(&mut c);
    let (events, _) = canned(
        &mut c,
        &["250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n554 5.3.0 not now\r\n"],
    );
    assert!(events.is_empty(), "{events:?}");
    let (events, _) = canned(&mut c, &["250 2.0.0 reset\r\n"]);
    let [ClientEvent::Done(r)] = &events[..] else {
        panic!("{events:?}")
    };
    assert_eq!(r.data.as_ref().map(|d| d.code), Some(554));
    assert_eq!(r.outcome(0).code, 554);
    // A 421 to that RSET (the server closing after its refusal), or the connection ending
    // before its reply, leaves the refusal standing.
    let mut c = ClientSession::new("relay.test");
    start(&mut c);
    canned(
        &mut c,
        &["250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n554 5.3.0 not now\r\n"],
    );
    let (events, _) = canned(&mut c, &["421 4.3.2 closing\r\n"]);
    assert!(
        matches!(&events[..], [ClientEvent::Done(r)] if r.outcome(0).code == 554),
        "{events:?}"
    );
    assert!(
        c.is_closing() && !c.can_send(),
        "no transaction after the 421"
    );
    let mut c = ClientSession::new("relay.test");
    start(&mut c);
    canned(
        &mut c,
        &["250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n554 5.3.0 not now\r\n"],
    );
    let settled = c.settle_unanswered().expect("settled by its refusal");
    assert_eq!(settled.outcome(0).code, 554);
    assert!(c.is_idle() && c.is_closing() && !c.can_send());
}

#[test]
fn a_noop_answered_by_anything_but_250_is_kept_for_the_embedding() {
    let ready = || {
        let mut c = ClientSession::new("relay.test");
        canned(&mut c, &["220 x\r\n", "250-x\r\n250 PIPELINING\r\n"]);
        c.noop();
        assert_eq!(String::from_utf8_lossy(c.output()), "NOOP\r\n");
        c.clear_output();
        c
    };
    let mut c = ready();
    let (events, _) = canned(&mut c, &["250 2.0.0 ok\r\n"]);
    assert!(events.is_empty() && c.is_idle(), "{events:?}");
    assert_eq!(c.take_noop_refusal(), None);
    // A server that does not take NOOP, or a reply left over in its place: the embedding
    // tells them apart by what follows.
    let mut c = ready();
    let (events, _) = canned(&mut c, &["554 5.7.1 message refused\r\n"]);
    assert!(events.is_empty() && c.is_idle(), "{events:?}");
    assert_eq!(c.take_noop_refusal().map(|r| r.code), Some(554));
}

#[test]
fn all_recipients_refused_without_pipelining_skips_data() {
    let mut c = ClientSession::new("relay.test");
    canned(&mut c, &["220 x\r\n", "250 x\r\n"]);
    c.send(&transaction(BodyMode::Data, b"hi\r\n", &["a@x.test"]))
        .unwrap();
    c.clear_output();
    let (events, sent) = canned(&mut c, &["250 ok\r\n", "550 5.1.1 no such user\r\n"]);
    assert_eq!(sent, "RCPT TO:<a@x.test> NOTIFY=FAILURE\r\nRSET\r\n");
    let [ClientEvent::Done(r)] = &events[..] else {
        panic!("{events:?}")
    };
    assert_eq!(r.outcome(0).code, 550);
    assert_eq!(
        r.outcome(0).enhanced.map(|e| e.to_string()),
        Some("5.1.1".into())
    );
}

/// One pipelined DATA transaction to `a@x.test` whose MAIL, RCPT and DATA get the replies in
/// `batch` and the dot (or body) `last`: what was sent after the batch, and the reply that
/// decided the recipient.
fn pipelined_data(batch: &str, last: &str) -> (String, u16) {
    let mut c = ClientSession::new("relay.test");
    canned(&mut c, &["220 x\r\n", "250-x\r\n250 PIPELINING\r\n"]);
    c.send(&transaction(
        BodyMode::Data,
        b"secret body\r\n",
        &["a@x.test"],
    ))
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(c.output()),
        "MAIL FROM:<sender@origin.test>\r\nRCPT TO:<a@x.test> NOTIFY=FAILURE\r\nDATA\r\n"
    );
    c.clear_output();
    let (events, sent) = canned(&mut c, &[batch, last]);
    let [ClientEvent::Done(r)] = &events[..] else {
        panic!("{events:?}")
    };
    assert!(c.is_idle());
    (sent, r.outcome(0).code)
}

#[test]
fn a_354_after_every_recipient_was_refused_gets_only_the_dot() {
    // RFC 2920 3.1: pipelined DATA accepted though no RCPT was: a single dot, no content.
    let (sent, code) = pipelined_data(
        "250 ok\r\n550 5.1.1 no\r\n354 go\r\n",
        "554 5.5.1 no valid recipients\r\n",
    );
    assert_eq!((sent.as_str(), code), (".\r\n", 550));
}

#[test]
fn a_354_after_mail_was_refused_gets_only_the_dot() {
    // A server that refused MAIL yet took the pipelined RCPT and DATA (it should have said
    // 503): the transaction is empty all the same, so no content goes, and the MAIL reply
    // decides, whatever the server says to the dot. Sending the body there made a refusal
    // (bounced) or a deferral (sent again) of a message the server kept.
    for (mail, code) in [("550 5.7.1 sender rejected", 550), ("451 4.3.0 later", 451)] {
        let batch = format!("{mail}\r\n250 ok\r\n354 go\r\n");
        let (sent, decided) = pipelined_data(&batch, "250 2.0.0 queued\r\n");
        assert_eq!((sent.as_str(), decided), (".\r\n", code), "{mail}");
    }
}

#[test]
fn greeting_refusal_and_421_and_garbage() {
    let mut c = ClientSession::new("relay.test");
    let (events, sent) = canned(&mut c, &["554-no\r\n554 go away\r\n"]);
    let [ClientEvent::Failed(ClientError::Greeting(r))] = &events[..] else {
        panic!("{events:?}")
    };
    assert_eq!(r.lines, vec!["no".to_owned(), "go away".to_owned()]);
    // A refused session still ends with QUIT (RFC 5321 3.1).
    assert_eq!(sent, "QUIT\r\n");

    let mut c = ClientSession::new("relay.test");
    let (events, _) = canned(&mut c, &["220 x\r\n", "421 4.3.2 busy\r\n"]);
    assert!(matches!(
        &events[..],
        [ClientEvent::Failed(ClientError::Closing(_))]
    ));

    let mut c = ClientSession::new("relay.test");
    let (events, sent) = canned(&mut c, &["HTTP/1.1 400 Bad Request\r\n"]);
    let [ClientEvent::Failed(e)] = &events[..] else {
        panic!("{events:?}")
    };
    assert!(matches!(e, ClientError::Protocol(_)) && e.is_temporary());
    // Out of step, but still told the session is over.
    assert_eq!(sent, "QUIT\r\n");
}

/// With PIPELINING, RSET and the next transaction go out in one write, and the RSET's reply
/// is taken in stride before the next transaction's replies.
#[test]
fn rset_pipelined_before_the_next_transaction() {
    let mut w = Wire::new();
    assert_eq!(w.pump(), ClientEvent::Ready);
    for (i, body) in [&b"first\r\n"[..], b"second\r\n"].into_iter().enumerate() {
        if i > 0 {
            w.client.rset();
        }
        w.client
            .send(&transaction(BodyMode::Bdat, body, &["a@mx.test"]))
            .unwrap();
        let out = String::from_utf8(w.client.output().to_vec()).unwrap();
        assert_eq!(out.starts_with("RSET\r\nMAIL FROM:"), i > 0, "{out}");
        assert_eq!(w.pump(), ClientEvent::SendBody);
        w.send_body(BodyMode::Bdat, body);
        let ClientEvent::Done(result) = w.pump() else {
            panic!("no result")
        };
        assert_eq!(result.outcome(0).code, 250);
    }
    assert_eq!(
        w.queued,
        vec![b"first\r\n".to_vec(), b"second\r\n".to_vec()]
    );
}

/// A pipelined DATA refused because every RCPT was: the server still holds the transaction
/// MAIL opened, so the session closes it with RSET by itself, and the next transaction on the
/// connection is taken rather than refused as a nested MAIL.
#[test]
fn a_refused_data_after_a_taken_mail_is_followed_by_rset() {
    let mut w = Wire::new();
    assert_eq!(w.pump(), ClientEvent::Ready);
    w.client
        .send(&transaction(
            BodyMode::Data,
            b"lost\r\n",
            &["nobody@mx.test"],
        ))
        .unwrap();
    let ClientEvent::Done(refused) = w.pump() else {
        panic!("no result")
    };
    assert_eq!(refused.mail.code, 250);
    assert_eq!(refused.data.as_ref().map(|d| d.code), Some(554));
    assert_eq!(String::from_utf8_lossy(w.client.output()), "RSET\r\n");
    // Asked for again, it is not sent twice.
    w.client.rset();
    assert_eq!(String::from_utf8_lossy(w.client.output()), "RSET\r\n");
    w.client
        .send(&transaction(BodyMode::Data, b"second\r\n", &["a@mx.test"]))
        .unwrap();
    assert_eq!(w.pump(), ClientEvent::SendBody);
    w.send_body(BodyMode::Data, b"second\r\n");
    let ClientEvent::Done(taken) = w.pump() else {
        panic!("no result")
    };
    assert_eq!((taken.mail.code, taken.outcome(0).code), (250, 250));
    assert_eq!(w.queued, vec![b"second\r\n".to_vec()]);
}

/// A 421 in the middle of a transaction ends the session, and the replies the transaction had
/// got stay readable: a recipient refused for good before it is not to be asked again.
#[test]
fn replies_before_a_421_are_kept_for_the_unfinished_transaction() {
    let mut c = ClientSession::new("relay.test");
    canned(&mut c, &["220 x\r\n", "250-x\r\n250 PIPELINING\r\n"]);
    c.send(&transaction(
        BodyMode::Data,
        b"body\r\n",
        &["a@x.test", "b@x.test"],
    ))
    .unwrap();
    c.clear_output();
    let (events, _) = canned(
        &mut c,
        &["250 ok\r\n550 5.1.1 no such user\r\n421 4.3.2 going down\r\n"],
    );
    assert!(
        matches!(&events[..], [ClientEvent::Failed(ClientError::Closing(_))]),
        "{events:?}"
    );
    let r = c.take_unfinished().expect("the transaction's replies");
    assert_eq!(r.mail.code, 250);
    assert_eq!(r.rcpts.iter().map(|r| r.code).collect::<Vec<_>>(), [550]);
    assert!(c.take_unfinished().is_none());
}

/// Sends `bodies` as transactions pipelined into each other: each one's commands go out right
/// after the previous body, before any reply to it is read.
fn pipeline_transactions(mode: BodyMode, bodies: &[&[u8]]) {
    let mut w = Wire::new();
    assert_eq!(w.pump(), ClientEvent::Ready);
    let rcpts: [&[&str]; 2] = [&["a@mx.test"], &["nobody@mx.test", "b@mx.test"]];
    for (i, body) in bodies.iter().enumerate() {
        assert!(w.client.can_send(), "transaction {i} may start");
        w.client
            .send(&transaction(mode, body, rcpts[i % 2]))
            .unwrap();
        assert_eq!(w.client.in_flight(), i + 1);
        if mode == BodyMode::Data && i == 0 {
            // The first DATA waits for its 354; later ones wait behind earlier bodies.
            assert_eq!(w.pump(), ClientEvent::SendBody);
        } else if mode == BodyMode::Bdat {
            let (_, event) = w.client.handle(&[]);
            assert_eq!(event, ClientEvent::SendBody);
        }
        if mode == BodyMode::Bdat || i == 0 {
            assert!(!w.client.can_send(), "not while a body is owed");
            w.send_body(mode, body);
        }
    }
    w.take_output();
    let wire = String::from_utf8_lossy(&w.to_server).into_owned();
    let after_body = match mode {
        BodyMode::Data => "end\r\n.\r\nMAIL FROM:",
        BodyMode::Bdat => "end\r\nMAIL FROM:",
    };
    assert_eq!(
        wire.matches(after_body).count(),
        bodies.len() - 1,
        "each later MAIL follows the previous body in one flight: {wire}"
    );
    let mut done = Vec::new();
    // Bounded: one Done per transaction, and a body per later DATA transaction.
    while done.len() < bodies.len() {
        match w.pump() {
            ClientEvent::Done(result) => done.push(result),
            // A later DATA's 354 comes after every earlier transaction's final reply.
            ClientEvent::SendBody => w.send_body(mode, bodies[done.len()]),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(w.client.in_flight(), 0);
    assert!(w.client.is_idle());
    for (i, result) in done.iter().enumerate() {
        let codes: Vec<u16> = result.rcpts.iter().map(|r| r.code).collect();
        let want: Vec<u16> = if i % 2 == 0 {
            vec![250]
        } else {
            vec![550, 250]
        };
        assert_eq!(codes, want, "replies of transaction {i}");
        assert_eq!(result.data.as_ref().map(|d| d.code), Some(250));
    }
    assert_eq!(
        w.queued,
        bodies.iter().map(|b| b.to_vec()).collect::<Vec<_>>()
    );
}

#[test]
fn bdat_transactions_pipelined_into_each_other() {
    pipeline_transactions(
        BodyMode::Bdat,
        &[b"one\r\nend\r\n", b"two\0\r\nend\r\n", b"three\r\nend\r\n"],
    );
}

#[test]
fn data_transaction_pipelined_after_a_body() {
    pipeline_transactions(BodyMode::Data, &[b"one\r\nend\r\n", b".two\r\nend\r\n"]);
}

#[test]
fn without_pipelining_a_transaction_waits_for_the_last() {
    let mut c = ClientSession::new("relay.test");
    let (events, _) = canned(&mut c, &["220 mx\r\n", "250 mx\r\n"]);
    assert_eq!(events, vec![ClientEvent::Ready]);
    c.send(&transaction(BodyMode::Data, b"hi\r\n", &["a@x.test"]))
        .unwrap();
    assert!(!c.can_send());
    let err = c
        .send(&transaction(BodyMode::Data, b"hi\r\n", &["b@x.test"]))
        .unwrap_err();
    assert_eq!(err.code, 451);
    assert_eq!(c.in_flight(), 1);
}

/// A body of `len` octets that holds what could confuse a framer: CRLF.CRLF, NUL, a line that
/// looks like a BDAT command.
fn awkward_body(len: usize) -> Vec<u8> {
    let pattern = b"line\r\n.\r\nBDAT 3 LAST\r\n\0\xff";
    pattern.iter().copied().cycle().take(len).collect()
}

/// Sends `body` with BDAT in chunks of `chunk_size` through the real server; returns the wire.
fn deliver_chunked(mut w: Wire, body: &[u8], chunk_size: u64) -> Wire {
    assert_eq!(w.pump(), ClientEvent::Ready);
    let mut t = transaction(BodyMode::Bdat, body, &["a@mx.test", "nobody@mx.test"]);
    t.chunk_size = chunk_size;
    w.client.send(&t).unwrap();
    assert_eq!(w.pump(), ClientEvent::SendBody);
    w.send_body(BodyMode::Bdat, body);
    let ClientEvent::Done(result) = w.pump() else {
        panic!("no result")
    };
    assert_eq!(
        result.rcpts.iter().map(|r| r.code).collect::<Vec<_>>(),
        [250, 550]
    );
    assert_eq!(
        result.outcome(0).lines,
        vec!["Ok: queued as ID1".to_owned()]
    );
    assert!(w.client.is_idle(), "every chunk's reply was read");
    assert_eq!(w.queued, vec![body.to_vec()]);
    // Nothing unread is left over to be taken for QUIT's reply.
    w.client.quit();
    assert_eq!(w.pump(), ClientEvent::Closed);
    w
}

#[test]
fn pipelined_bdat_in_several_chunks_arrives_whole() {
    let body = awkward_body(10_000);
    let w = deliver_chunked(Wire::new(), &body, 4096);
    assert_eq!(
        w.bdat_commands(),
        ["BDAT 4096\r\n", "BDAT 4096\r\n", "BDAT 1808 LAST\r\n"]
    );
}

#[test]
fn chunks_of_one_octet() {
    let body = awkward_body(40);
    let w = deliver_chunked(Wire::new(), &body, 1);
    let bdat = w.bdat_commands();
    assert_eq!(bdat.len(), 40);
    assert!(bdat[..39].iter().all(|c| *c == "BDAT 1\r\n"));
    assert_eq!(bdat[39], "BDAT 1 LAST\r\n");
}

#[test]
fn a_chunk_size_not_below_the_body_sends_what_it_always_sent() {
    let body = awkward_body(1000);
    let one = deliver_chunked(Wire::new(), &body, 0);
    assert_eq!(one.bdat_commands(), ["BDAT 1000 LAST\r\n"]);
    for chunk_size in [1000, 1001, 1 << 20] {
        let w = deliver_chunked(Wire::new(), &body, chunk_size);
        assert_eq!(w.commands, one.commands, "chunk size {chunk_size}");
    }
}

#[test]
fn without_pipelining_the_body_goes_in_one_chunk() {
    let body = awkward_body(10_000);
    let w = deliver_chunked(
        Wire::with_config(ServerConfig {
            offer_pipelining: false,
            ..ServerConfig::default()
        }),
        &body,
        4096,
    );
    assert!(!w.client.capabilities().pipelining);
    assert_eq!(w.bdat_commands(), ["BDAT 10000 LAST\r\n"]);
}

#[test]
fn without_pipelining_canned_bdat_waits_and_sends_one_chunk() {
    let mut c = ClientSession::new("relay.test");
    canned(&mut c, &["220 x\r\n", "250-x\r\n250 CHUNKING\r\n"]);
    let mut t = transaction(BodyMode::Bdat, b"0123456789", &["a@x.test"]);
    t.chunk_size = 4;
    c.send(&t).unwrap();
    c.clear_output();
    let (events, sent) = canned(&mut c, &["250 ok\r\n", "250 ok\r\n"]);
    assert_eq!(
        sent,
        "RCPT TO:<a@x.test> NOTIFY=FAILURE\r\nBDAT 10 LAST\r\n"
    );
    assert_eq!(events, vec![ClientEvent::SendBody]);
    assert_eq!(
        c.bdat_chunks(),
        [BdatChunk {
            header: String::new(),
            offset: 0,
            len: 10
        }]
    );
    c.body_sent();
    let (events, _) = canned(&mut c, &["250 2.0.0 queued\r\n"]);
    let [ClientEvent::Done(r)] = &events[..] else {
        panic!("{events:?}")
    };
    assert_eq!(r.data.as_ref().map(|d| d.code), Some(250));
}

/// A server that refuses the second of four chunks: the refusal decides the message, and the
/// transaction ends only once the replies to the chunks after it are read.
#[test]
fn a_refused_intermediate_chunk_fails_the_message() {
    let mut c = ClientSession::new("relay.test");
    canned(
        &mut c,
        &["220 x\r\n", "250-x\r\n250-PIPELINING\r\n250 CHUNKING\r\n"],
    );
    let mut t = transaction(BodyMode::Bdat, b"0123456789abcd", &["a@x.test"]);
    t.chunk_size = 4;
    c.send(&t).unwrap();
    assert_eq!(
        String::from_utf8_lossy(c.output()),
        "MAIL FROM:<sender@origin.test>\r\nRCPT TO:<a@x.test> NOTIFY=FAILURE\r\nBDAT 4\r\n"
    );
    c.clear_output();
    assert_eq!(c.handle(b""), (0, ClientEvent::SendBody));
    let plan: Vec<(&str, u64, u64)> = c
        .bdat_chunks()
        .iter()
        .map(|b| (b.header.as_str(), b.offset, b.len))
        .collect();
    assert_eq!(
        plan,
        [
            ("", 0, 4),
            ("BDAT 4\r\n", 4, 4),
            ("BDAT 4\r\n", 8, 4),
            ("BDAT 2 LAST\r\n", 12, 2)
        ]
    );
    c.body_sent();
    let (events, _) = canned(
        &mut c,
        &[
            "250 ok\r\n250 ok\r\n250 2.0.0 4 octets received\r\n",
            "554 5.6.0 chunk refused\r\n503 5.5.1 no transaction\r\n",
        ],
    );
    assert_eq!(events, vec![], "not done before the last chunk's reply");
    assert!(!c.is_idle());
    let (events, sent) = canned(&mut c, &["503 5.5.1 no transaction\r\n"]);
    let [ClientEvent::Done(r)] = &events[..] else {
        panic!("{events:?}")
    };
    assert_eq!(sent, "");
    assert_eq!(r.outcome(0).code, 554);
    assert_eq!(
        r.outcome(0).enhanced.map(|e| e.to_string()),
        Some("5.6.0".into())
    );
    assert!(c.is_idle(), "every chunk's reply was read");
    c.quit();
    let (events, _) = canned(&mut c, &["221 bye\r\n"]);
    assert_eq!(events, vec![ClientEvent::Closed]);
}

#[test]
fn a_reply_the_command_cannot_get_ends_the_session_undelivered() {
    // RFC 5321 4.3.2: DATA's only intermediate success is 354, and the end of data gets 2xx
    // or a failure. Anything else must never count as delivered.
    for (pipelining, replies, command) in [
        (
            false,
            &["250 ok\r\n", "250 ok\r\n", "250 2.0.0 what\r\n"][..],
            "DATA",
        ),
        (
            false,
            &["250 ok\r\n", "250 ok\r\n", "220 huh\r\n"][..],
            "DATA",
        ),
        (true, &["250 ok\r\n250 ok\r\n221 2.0.0 bye\r\n"][..], "DATA"),
        (false, &["354 mail?\r\n"][..], "MAIL"),
        (false, &["250 ok\r\n", "354 rcpt?\r\n"][..], "RCPT"),
    ] {
        let mut c = ClientSession::new("relay.test");
        let caps = if pipelining {
            "250-x\r\n250 PIPELINING\r\n"
        } else {
            "250 x\r\n"
        };
        canned(&mut c, &["220 x\r\n", caps]);
        c.send(&transaction(BodyMode::Data, b"hi\r\n", &["a@x.test"]))
            .unwrap();
        c.clear_output();
        let (events, sent) = canned(&mut c, replies);
        let [ClientEvent::Failed(ClientError::Unexpected(cmd, _))] = &events[..] else {
            panic!("{replies:?}: {events:?}")
        };
        assert_eq!(*cmd, command);
        // The session ends, with QUIT before the close (RFC 5321 4.1.1.10).
        assert!(sent.ends_with("QUIT\r\n"), "{replies:?}: {sent:?}");
    }
    // A 354 after the body is no delivery either.
    let mut c = ClientSession::new("relay.test");
    canned(&mut c, &["220 x\r\n", "250 x\r\n"]);
    c.send(&transaction(BodyMode::Data, b"hi\r\n", &["a@x.test"]))
        .unwrap();
    let (events, _) = canned(&mut c, &["250 ok\r\n", "250 ok\r\n", "354 go\r\n"]);
    assert_eq!(events, vec![ClientEvent::SendBody]);
    c.body_sent();
    let (events, sent) = canned(&mut c, &["354 again\r\n"]);
    assert!(
        matches!(&events[..], [ClientEvent::Failed(ClientError::Unexpected(_, r))] if r.code == 354),
        "{events:?}"
    );
    assert_eq!(sent, "QUIT\r\n");
}

#[test]
fn without_pipelining_rset_and_quit_wait_for_the_reply_before_them() {
    let mut c = ClientSession::new("relay.test");
    canned(&mut c, &["220 x\r\n", "250 x\r\n"]);
    c.send(&transaction(BodyMode::Data, b"hi\r\n", &["a@x.test"]))
        .unwrap();
    c.clear_output();
    // The only RCPT is put off: the session sends RSET itself.
    let (events, sent) = canned(&mut c, &["250 ok\r\n", "450 4.2.1 busy\r\n"]);
    assert!(matches!(&events[..], [ClientEvent::Done(_)]), "{events:?}");
    assert_eq!(sent, "RCPT TO:<a@x.test> NOTIFY=FAILURE\r\nRSET\r\n");
    // A RSET asked for again is not sent twice; a QUIT waits for the RSET's reply.
    c.rset();
    c.quit();
    assert_eq!(String::from_utf8_lossy(c.output()), "");
    let (events, sent) = canned(&mut c, &["250 2.0.0 reset\r\n"]);
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(sent, "QUIT\r\n");
    let (events, _) = canned(&mut c, &["221 bye\r\n"]);
    assert_eq!(events, vec![ClientEvent::Closed]);
}

/// A session with PIPELINING that has delivered one transaction with `tx` and then sent
/// RSET and `tx` again, in one flight.
fn second_transaction_in_flight(tx: &Transaction) -> ClientSession {
    let mut c = ClientSession::new("relay.test");
    canned(&mut c, &["220 x\r\n", "250-x\r\n250 PIPELINING\r\n"]);
    c.send(tx).unwrap();
    let (events, _) = canned(&mut c, &["250 ok\r\n250 ok\r\n354 go\r\n"]);
    assert_eq!(events, vec![ClientEvent::SendBody]);
    c.body_sent();
    let (events, _) = canned(&mut c, &["250 2.0.0 queued\r\n"]);
    assert!(matches!(&events[..], [ClientEvent::Done(_)]), "{events:?}");
    assert!(!c.awaiting_rset());
    c.rset();
    c.send(tx).unwrap();
    c
}

#[test]
fn a_421_is_known_to_answer_the_rset_before_a_pipelined_transaction() {
    let tx = transaction(BodyMode::Data, b"hi\r\n", &["a@x.test"]);
    // The next transaction follows its RSET at once; the RSET's reply is the next awaited.
    let mut c = second_transaction_in_flight(&tx);
    assert!(c.awaiting_rset());
    let (events, _) = canned(&mut c, &["421 4.4.2 idle timeout\r\n"]);
    assert!(
        matches!(&events[..], [ClientEvent::Failed(ClientError::Closing(_))]),
        "{events:?}"
    );
    assert!(c.closed_at_rset());
    // A 421 to a later command of the transaction is not the RSET's.
    let mut c = second_transaction_in_flight(&tx);
    let (events, _) = canned(&mut c, &["250 2.0.0 reset\r\n", "421 4.3.2 going down\r\n"]);
    assert!(
        matches!(&events[..], [ClientEvent::Failed(ClientError::Closing(_))]),
        "{events:?}"
    );
    assert!(!c.closed_at_rset());
}

#[test]
fn a_reply_other_than_250_to_a_rset_puts_the_session_out_of_step() {
    // RSET has one answer (RFC 5321 4.1.1.5). A 354 there is a DATA's, left over: the
    // server is reading message text, and what went behind the RSET cannot be matched with
    // its replies.
    let tx = transaction(BodyMode::Data, b"hi\r\n", &["a@x.test"]);
    let mut c = second_transaction_in_flight(&tx);
    let (events, sent) = canned(&mut c, &["354 go ahead\r\n"]);
    assert!(
        matches!(
            &events[..],
            [ClientEvent::Failed(ClientError::Unexpected("RSET", r))] if r.code == 354
        ),
        "{events:?}"
    );
    assert!(!c.closed_at_rset());
    assert!(!sent.contains("MAIL") && !sent.contains("RCPT"), "{sent}");
    // Without PIPELINING: the RSET after a transaction whose only recipient was put off.
    let mut c = ClientSession::new("relay.test");
    canned(&mut c, &["220 x\r\n", "250 x\r\n"]);
    c.send(&tx).unwrap();
    let (events, sent) = canned(&mut c, &["250 ok\r\n", "450 4.2.1 busy\r\n"]);
    assert!(matches!(&events[..], [ClientEvent::Done(_)]), "{events:?}");
    assert!(sent.ends_with("RSET\r\n"), "{sent}");
    let (events, sent) = canned(&mut c, &["502 5.5.1 not here\r\n"]);
    assert!(
        matches!(
            &events[..],
            [ClientEvent::Failed(ClientError::Unexpected("RSET", r))] if r.code == 502
        ),
        "{events:?}"
    );
    assert_eq!(sent, "QUIT\r\n");
}

#[test]
fn nothing_is_written_after_a_421_not_even_what_the_reply_before_it_let_out() {
    // Without PIPELINING each RCPT waits for the reply before it; the 250 to MAIL lets the
    // first out, but the 421 behind it in the same read says the server is closing (RFC
    // 5321 3.8): nothing more goes, a QUIT neither.
    let mut c = ClientSession::new("relay.test");
    canned(&mut c, &["220 x\r\n", "250 x\r\n"]);
    c.send(&transaction(BodyMode::Data, b"hi\r\n", &["a@x.test"]))
        .unwrap();
    assert!(String::from_utf8_lossy(c.output()).starts_with("MAIL FROM:"));
    c.clear_output();
    let (events, sent) = canned(&mut c, &["250 2.1.0 ok\r\n421 4.3.2 going down\r\n"]);
    assert!(
        matches!(&events[..], [ClientEvent::Failed(ClientError::Closing(_))]),
        "{events:?}"
    );
    assert_eq!(sent, "", "written after the 421");
}

#[test]
fn a_transaction_with_many_recipients_goes_in_groups_that_fit_the_window() {
    // RFC 2920 3.1: a group of commands written before their replies are read must fit the
    // connection's window. 250 recipients go as MAIL and 99 RCPTs, then the next 100 once
    // those are answered, then the rest with DATA or BDAT (and the body behind BDAT).
    use postern_proto::client::PIPELINED_GROUP;
    let names: Vec<String> = (0..250).map(|i| format!("r{i}@mx.test")).collect();
    let rcpts: Vec<&str> = names.iter().map(String::as_str).collect();
    let body = format!("Subject: x\r\n\r\n{}", "line\r\n".repeat(40)).into_bytes();
    for (mode, chunk_size) in [
        (BodyMode::Data, 0),
        (BodyMode::Bdat, 0),
        (BodyMode::Bdat, 64),
    ] {
        let mut w = Wire::new();
        assert_eq!(w.pump(), ClientEvent::Ready);
        w.commands.clear();
        let mut t = transaction(mode, &body, &rcpts);
        t.chunk_size = chunk_size;
        w.client.send(&t).unwrap();
        let first = String::from_utf8_lossy(w.client.output()).into_owned();
        assert_eq!(first.matches("\r\n").count(), PIPELINED_GROUP, "{first}");
        assert!(
            first.starts_with("MAIL FROM:<sender@origin.test>"),
            "{first}"
        );
        assert!(
            !first.contains("DATA") && !first.contains("BDAT"),
            "{first}"
        );
        assert_eq!(w.client.handle(&[]).1, ClientEvent::NeedInput);
        assert_eq!(w.pump(), ClientEvent::SendBody);
        w.send_body(mode, &body);
        let ClientEvent::Done(result) = w.pump() else {
            panic!("no result")
        };
        assert_eq!(result.mail.code, 250);
        assert_eq!(result.rcpts.len(), 250);
        assert!(result.rcpts.iter().all(|r| r.code == 250));
        assert_eq!(w.queued, vec![body.clone()]);
        assert_eq!(w.commands.matches("RCPT TO:").count(), 250);
        if chunk_size > 0 {
            assert!(w.bdat_commands().len() > 2, "{:?}", w.bdat_commands());
        }
    }
}

/// RFC 5321 4.5.3.1.10: once the server refuses a RCPT as one too many (452), the
/// recipients still held are not sent in this transaction (a server counts those past its
/// limit as errors and may end the session before the data): they get a local 452 4.5.3, for
/// the next transaction, and the data goes for those taken.
#[test]
fn recipients_past_a_too_many_recipients_reply_are_not_sent_in_that_transaction() {
    let names: Vec<String> = (0..250).map(|i| format!("r{i}@mx.test")).collect();
    let rcpts: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut c = ClientSession::new("relay.test");
    canned(&mut c, &["220 x\r\n", "250-x\r\n250 PIPELINING\r\n"]);
    c.send(&transaction(BodyMode::Data, b"body\r\n", &rcpts))
        .unwrap();
    let first = String::from_utf8_lossy(c.output()).into_owned();
    c.clear_output();
    assert_eq!(first.matches("RCPT TO:").count(), 99, "{first}");
    // MAIL and 60 RCPTs taken, then "too many" for the rest of the group.
    let mut replies = String::from("250 2.1.0 ok\r\n");
    replies.push_str(&"250 2.1.5 ok\r\n".repeat(60));
    replies.push_str(&"452 4.5.3 Too many recipients\r\n".repeat(39));
    let (events, sent) = canned(&mut c, &[&replies]);
    assert!(events.is_empty(), "{events:?}");
    assert!(!sent.contains("RCPT TO:"), "{sent}");
    assert_eq!(sent, "DATA\r\n");
    let (events, _) = canned(&mut c, &["354 go\r\n"]);
    assert_eq!(events, [ClientEvent::SendBody]);
    c.body_sent();
    let (events, _) = canned(&mut c, &["250 2.0.0 queued\r\n"]);
    let [ClientEvent::Done(result)] = &events[..] else {
        panic!("{events:?}")
    };
    assert_eq!(result.rcpts.len(), 250);
    assert!(result.rcpts[..60].iter().all(|r| r.code == 250));
    assert!(
        result.rcpts[60..].iter().all(|r| r.code == 452),
        "{:?}",
        result.rcpts[99..101].to_vec()
    );
    assert_eq!(result.data.as_ref().map(|d| d.code), Some(250));
}

/// A 452 or 552 about one mailbox (full, 4.2.2; the server short of room, 4.3.1) is no
/// "too many recipients": without PIPELINING, the recipients behind it are still sent in the
/// same transaction, rather than wait behind that mailbox at every attempt.
#[test]
fn a_full_mailbox_does_not_keep_the_recipients_behind_it_from_being_sent() {
    for refusal in [
        "452 4.2.2 Mailbox full\r\n",
        "552 5.2.2 Over quota\r\n",
        "452 Mailbox busy\r\n",
    ] {
        let mut c = ClientSession::new("relay.test");
        canned(&mut c, &["220 x\r\n", "250 x\r\n"]);
        c.send(&transaction(
            BodyMode::Data,
            b"body\r\n",
            &["full@mx.test", "fine@mx.test"],
        ))
        .unwrap();
        let first = String::from_utf8_lossy(c.output()).into_owned();
        c.clear_output();
        assert_eq!(first, "MAIL FROM:<sender@origin.test>\r\n", "{first}");
        let (_, sent) = canned(&mut c, &["250 2.1.0 ok\r\n"]);
        assert!(sent.starts_with("RCPT TO:<full@mx.test>"), "{sent}");
        let (_, sent) = canned(&mut c, &[refusal]);
        assert!(
            sent.starts_with("RCPT TO:<fine@mx.test>"),
            "after {refusal:?}: {sent:?}"
        );
        let (_, sent) = canned(&mut c, &["250 2.1.5 ok\r\n"]);
        assert_eq!(sent, "DATA\r\n");
        let (events, _) = canned(&mut c, &["354 go\r\n"]);
        assert_eq!(events, [ClientEvent::SendBody]);
        c.body_sent();
        let (events, _) = canned(&mut c, &["250 2.0.0 queued\r\n"]);
        let [ClientEvent::Done(result)] = &events[..] else {
            panic!("{events:?}")
        };
        let codes: Vec<u16> = result.rcpts.iter().map(|r| r.code).collect();
        assert_eq!(codes[1], 250, "{refusal:?}");
    }
    // Without an enhanced code, a 452 after a recipient was taken is the limit.
    let mut c = ClientSession::new("relay.test");
    canned(&mut c, &["220 x\r\n", "250 x\r\n"]);
    c.send(&transaction(
        BodyMode::Data,
        b"body\r\n",
        &["a@mx.test", "b@mx.test", "c@mx.test"],
    ))
    .unwrap();
    c.clear_output();
    canned(&mut c, &["250 ok\r\n"]);
    canned(&mut c, &["250 ok\r\n"]);
    let (_, sent) = canned(&mut c, &["452 Too many recipients\r\n"]);
    assert_eq!(sent, "DATA\r\n", "c is not sent");
}

#[test]
fn a_transaction_in_groups_sent_behind_another_keeps_its_held_commands() {
    // T1's end-of-data reply is still awaited when T2, for 150 recipients, is sent behind it
    // (RFC 2920 lets the next MAIL follow a body): T2's commands beyond its first group are
    // held, and T1's reply must not take them away.
    let names: Vec<String> = (0..150).map(|i| format!("r{i}@mx.test")).collect();
    let many: Vec<&str> = names.iter().map(String::as_str).collect();
    for mode in [BodyMode::Data, BodyMode::Bdat] {
        let mut w = Wire::new();
        assert_eq!(w.pump(), ClientEvent::Ready);
        let first = b"Subject: one\r\n\r\nfirst\r\n".to_vec();
        let second = b"Subject: two\r\n\r\nsecond\r\n".to_vec();
        w.client
            .send(&transaction(mode, &first, &["a@mx.test"]))
            .unwrap();
        assert_eq!(w.pump(), ClientEvent::SendBody);
        w.send_body(mode, &first);
        assert!(w.client.can_send());
        w.client.send(&transaction(mode, &second, &many)).unwrap();
        let ClientEvent::Done(one) = w.pump() else {
            panic!("no result for the first")
        };
        assert_eq!(one.outcome(0).code, 250);
        assert_eq!(w.pump(), ClientEvent::SendBody);
        w.send_body(mode, &second);
        let ClientEvent::Done(two) = w.pump() else {
            panic!("no result for the second")
        };
        assert_eq!(two.rcpts.len(), 150);
        assert!(two.rcpts.iter().all(|r| r.code == 250));
        assert_eq!(two.outcome(0).code, 250);
        assert_eq!(w.queued, vec![first, second]);
    }
}
