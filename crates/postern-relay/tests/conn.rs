//! The outbound connection against scripted servers on loopback sockets.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::time::Duration;

use postern_proto::client::{BodyMode, OutRecipient, Transaction};
use postern_relay::conn::{ConnError, Outbound, Timeouts};

fn run<T>(f: impl std::future::Future<Output = T> + 'static) -> T
where
    T: 'static,
{
    glommio::LocalExecutorBuilder::default()
        .io_memory(64 * 1024)
        .make()
        .unwrap()
        .run(f)
}

/// A server that greets, answers EHLO with 8BITMIME, and then 250 to everything (354 to DATA).
fn scripted(greeting: &'static str) -> std::net::SocketAddr {
    scripted_with(
        greeting,
        "250-peer.test\r\n250 8BITMIME\r\n",
        Duration::ZERO,
    )
}

/// [`scripted`] with this EHLO reply, answering each RCPT after `rcpt_delay`.
fn scripted_with(
    greeting: &'static str,
    ehlo: &'static str,
    rcpt_delay: Duration,
) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut w = s.try_clone().unwrap();
        w.write_all(greeting.as_bytes()).unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        let mut in_data = false;
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            if in_data {
                if line == ".\r\n" {
                    in_data = false;
                    let _ = w.write_all(b"250 queued\r\n");
                }
                line.clear();
                continue;
            }
            let reply: &[u8] = if line.starts_with("DATA") {
                in_data = true;
                b"354 go\r\n"
            } else if line.starts_with("EHLO") {
                ehlo.as_bytes()
            } else if line.starts_with("RCPT") {
                std::thread::sleep(rcpt_delay);
                b"250 ok\r\n"
            } else if line.starts_with("QUIT") {
                b"221 bye\r\n"
            } else {
                b"250 ok\r\n"
            };
            if w.write_all(reply).is_err() {
                break;
            }
            line.clear();
        }
    });
    addr
}

#[test]
fn greets_and_says_ehlo() {
    let addr = scripted("220 peer.test ESMTP\r\n");
    run(async move {
        let c = Outbound::connect(addr, "peer.test", "me.test", None, &Timeouts::default())
            .await
            .unwrap();
        assert!(c.capabilities().esmtp && c.capabilities().eightbitmime);
        assert!(!c.is_tls());
        c.quit().await;
    });
}

#[test]
fn an_error_greeting_is_refused() {
    let addr = scripted("554 go away\r\n");
    let err = run(async move {
        Outbound::connect(addr, "peer.test", "me.test", None, &Timeouts::default())
            .await
            .err()
            .unwrap()
    });
    assert!(matches!(err, ConnError::Smtp(_)), "{err:?}");
}

#[test]
fn a_silent_server_times_out() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = Timeouts {
        greeting: Duration::from_millis(200),
        ..Timeouts::default()
    };
    let err = run(async move {
        Outbound::connect(addr, "peer.test", "me.test", None, &t)
            .await
            .err()
            .unwrap()
    });
    drop(l);
    assert!(
        matches!(err, ConnError::Io(ref e) if e.contains("timed out")),
        "{err:?}"
    );
}

#[test]
fn a_server_that_trickles_its_greeting_times_out_all_the_same() {
    // One byte every 50 ms: each read comes well inside the limit, the whole greeting
    // (about 2.5 s) does not (RFC 5321 4.5.3.2 times the wait for the reply).
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (done_tx, done) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        for b in b"220 a-greeting-sent-one-byte-at-a-time.peer.test ESMTP\r\n" {
            if done.try_recv().is_ok() || s.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let t = Timeouts {
        greeting: Duration::from_millis(500),
        ..Timeouts::default()
    };
    let started = std::time::Instant::now();
    let err = run(async move {
        Outbound::connect(addr, "peer.test", "me.test", None, &t)
            .await
            .err()
            .unwrap()
    });
    let took = started.elapsed();
    let _ = done_tx.send(());
    assert!(
        matches!(err, ConnError::Io(ref e) if e.contains("timed out")),
        "{err:?}"
    );
    assert!(took < Duration::from_millis(2000), "took {took:?}");
}

/// A message in a spool under `dir`, synced; its body handle.
fn spooled(dir: &std::path::Path) -> postern_spool::MessageRef {
    let mut spool =
        postern_spool::Spool::open(dir, 0, postern_spool::SpoolOptions::default()).unwrap();
    let meta = postern_spool::MessageMeta {
        recipients: vec![postern_spool::Recipient {
            path: "r@x.test".into(),
            notify: None,
            orcpt: None,
        }],
        ..Default::default()
    };
    let mut draft = spool.begin(&meta).unwrap();
    spool
        .append(&mut draft, b"Subject: x\r\n\r\n.dot\r\n")
        .unwrap();
    let (_, body) = spool.finish_with_body(draft).unwrap();
    spool.sync_now().unwrap();
    spool.body(body).unwrap()
}

/// A DATA transaction from `s@x.test` to `r0@x.test` .. `r{n-1}@x.test`.
fn data_transaction(n: usize, body_len: u64) -> Transaction {
    Transaction {
        from: "s@x.test".into(),
        mail_params: String::new(),
        rcpts: (0..n)
            .map(|i| OutRecipient {
                path: format!("r{i}@x.test"),
                params: String::new(),
            })
            .collect(),
        body_len,
        mode: BodyMode::Data,
        chunk_size: 0,
    }
}

/// With PIPELINING the envelope's replies come back one after another; each has its own wait.
/// Here each RCPT takes 300 ms against a limit of 800 ms: six of them take longer than one
/// limit, and none takes longer than its own.
#[test]
fn pipelined_replies_each_get_their_own_wait() {
    let addr = scripted_with(
        "220 peer.test ESMTP\r\n",
        "250-peer.test\r\n250 PIPELINING\r\n",
        Duration::from_millis(300),
    );
    let dir = tempfile::tempdir().unwrap();
    let body = spooled(dir.path());
    let codes = run(async move {
        let limit = Duration::from_millis(800);
        let t = Timeouts {
            greeting: limit,
            mail: limit,
            rcpt: limit,
            data_init: limit,
            data_done: limit,
            ..Timeouts::default()
        };
        let mut c = Outbound::connect(addr, "peer.test", "me.test", None, &t)
            .await
            .unwrap();
        let tx = data_transaction(6, body.len());
        let r = c.deliver(&tx, &body, &t).await.unwrap();
        c.quit().await;
        (0..6).map(|i| r.outcome(i).code).collect::<Vec<_>>()
    });
    assert_eq!(codes, [250; 6]);
}

/// Without PIPELINING, the RSET between two transactions waits for its reply before MAIL.
#[test]
fn two_transactions_without_pipelining() {
    let addr = scripted("220 peer.test ESMTP\r\n");
    let dir = tempfile::tempdir().unwrap();
    let body = spooled(dir.path());
    let codes = run(async move {
        let t = Timeouts {
            mail: Duration::from_secs(5),
            ..Timeouts::default()
        };
        let mut c = Outbound::connect(addr, "peer.test", "me.test", None, &t)
            .await
            .unwrap();
        let tx = data_transaction(1, body.len());
        let mut codes = Vec::new();
        for _ in 0..2 {
            let r = c.deliver(&tx, &body, &t).await.unwrap();
            codes.push(r.outcome(0).code);
        }
        c.quit().await;
        codes
    });
    assert_eq!(codes, [250, 250]);
}
