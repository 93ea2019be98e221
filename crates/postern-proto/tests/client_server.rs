//! The client state machine wired to the server state machine in memory, and to canned
//! replies for servers unlike ours (no PIPELINING, no EHLO, odd multi-line replies).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use postern_proto::client::{
    BodyMode, ClientError, ClientEvent, ClientSession, OutRecipient, Transaction,
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
}

impl Wire {
    fn new() -> Self {
        let config = Arc::new(ServerConfig {
            hostname: "mx.test".into(),
            max_message_size: 1 << 20,
            ..ServerConfig::default()
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
        }
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
            }
            self.to_server.drain(..consumed);
        }
        self.to_client.extend_from_slice(self.server.output());
        self.server.clear_output();
    }

    /// Moves bytes both ways until the client has something to say.
    fn pump(&mut self) -> ClientEvent {
        for _ in 0..100 {
            self.to_server.extend_from_slice(self.client.output());
            self.client.clear_output();
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
        self.to_server.extend_from_slice(self.client.output());
        self.client.clear_output();
        match mode {
            BodyMode::Bdat => self.to_server.extend_from_slice(body),
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
    }
}

fn deliver(mode: BodyMode, body: &[u8]) {
    let mut w = Wire::new();
    assert_eq!(w.pump(), ClientEvent::Ready);
    let caps = w.client.capabilities().clone();
    assert!(caps.pipelining && caps.chunking && caps.eightbitmime && caps.smtputf8);
    assert_eq!(caps.size, Some(1 << 20));
    w.client
        .send(&transaction(
            mode,
            body,
            &["a@mx.test", "nobody@mx.test", "b@mx.test"],
        ))
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
    deliver(BodyMode::Bdat, b"binary\0\xff\r\n.\r\nstill body\n");
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

#[test]
fn greeting_refusal_and_421_and_garbage() {
    let mut c = ClientSession::new("relay.test");
    let (events, _) = canned(&mut c, &["554-no\r\n554 go away\r\n"]);
    let [ClientEvent::Failed(ClientError::Greeting(r))] = &events[..] else {
        panic!("{events:?}")
    };
    assert_eq!(r.lines, vec!["no".to_owned(), "go away".to_owned()]);

    let mut c = ClientSession::new("relay.test");
    let (events, _) = canned(&mut c, &["220 x\r\n", "421 4.3.2 busy\r\n"]);
    assert!(matches!(
        &events[..],
        [ClientEvent::Failed(ClientError::Closing(_))]
    ));

    let mut c = ClientSession::new("relay.test");
    let (events, _) = canned(&mut c, &["HTTP/1.1 400 Bad Request\r\n"]);
    let [ClientEvent::Failed(e)] = &events[..] else {
        panic!("{events:?}")
    };
    assert!(matches!(e, ClientError::Protocol(_)) && e.is_temporary());
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
