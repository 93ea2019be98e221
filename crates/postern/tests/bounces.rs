//! Reports to the sender (RFC 3461, 3464): bounces for recipients refused for good or past the
//! queue lifetime, delay warnings, success reports for recipients relayed to a next hop without
//! DSN, and what each carries back.
#![allow(clippy::unwrap_used)]

mod common;
mod relaying;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::Server;
use relaying::*;

#[test]
fn permanent_failure_bounces_to_the_sender_with_a_delivery_report() {
    // One peer is both the next hop of the recipients and the sender's domain's route.
    let peer = Peer::start(&["--reject-rcpt", "nobody"]);
    let server = routed_to(&peer, &[]);
    send(
        &server,
        "alice@origin.test",
        &["nobody@dest.test", "bob@dest.test"],
        "<orig@t>",
        "the original body\r\n",
    );
    let stored = peer.wait_for(
        "the delivery and the bounce",
        Duration::from_secs(20),
        |s| s.len() == 2,
    );
    let delivered = stored.iter().find(|s| s.message_id == "<orig@t>").unwrap();
    assert_eq!(delivered.rcpt_tos, ["bob@dest.test"]);
    let bounce = stored.iter().find(|s| s.message_id != "<orig@t>").unwrap();
    // aiosmtpd writes the null reverse path as "<>".
    assert_eq!(
        bounce.mail_from, "<>",
        "a bounce comes from the null reverse path"
    );
    assert_eq!(bounce.rcpt_tos, ["alice@origin.test"]);
    let text = String::from_utf8_lossy(&bounce.data);
    assert!(text.contains("multipart/report"), "{text}");
    assert!(
        text.contains("report-type=delivery-status")
            || text.contains("report-type=\"delivery-status\""),
        "{text}"
    );
    assert!(
        text.contains("Final-Recipient: rfc822; nobody@dest.test"),
        "{text}"
    );
    assert!(text.contains("Action: failed"), "{text}");
    assert!(text.contains("Status: 5.1.1"), "{text}");
    assert!(text.contains("no such user here"), "{text}");
    assert!(
        text.contains("Message-ID: <orig@t>"),
        "the original headers come back: {text}"
    );
    assert!(
        !text.contains("Final-Recipient: rfc822; bob@dest.test"),
        "{text}"
    );
}

#[test]
fn a_recipient_refused_for_good_stays_refused_when_the_next_hop_then_goes_away() {
    // RCPT: 550 for the first recipient, then 421 and a close at the second. The 550 was an
    // answer (RFC 5321 4.2.1): that recipient is bounced at once with it, not deferred with
    // the 421 and asked again on every retry; the other waits for its retry.
    let peer = Peer::start(&["--reject-rcpt", "nobody", "--close-rcpt", "gone"]);
    let server = routed_to(&peer, &["--retry-initial", "60s"]);
    send(
        &server,
        "alice@origin.test",
        &["nobody@dest.test", "gone@dest.test"],
        "<refused@t>",
        "body\r\n",
    );
    let stored = peer.wait_for("the bounce", Duration::from_secs(20), |s| !s.is_empty());
    let bounce = &stored[0];
    assert_eq!(bounce.mail_from, "<>");
    assert_eq!(bounce.rcpt_tos, ["alice@origin.test"]);
    let text = String::from_utf8_lossy(&bounce.data);
    assert!(
        text.contains("Final-Recipient: rfc822; nobody@dest.test"),
        "{text}"
    );
    assert!(text.contains("Status: 5.1.1"), "{text}");
    assert!(text.contains("no such user here"), "{text}");
    assert!(
        !text.contains("Final-Recipient: rfc822; gone@dest.test"),
        "the recipient put off waits for its retry: {text}"
    );
}

#[test]
fn dsn_parameters_go_on_where_the_next_hop_offers_dsn_and_success_is_reported_where_not() {
    // RFC 3461: a next hop with DSN gets RET, ENVID, NOTIFY and ORCPT as they came in; a next
    // hop without DSN gets none of them (aiosmtpd would refuse them), and a recipient that
    // asked for NOTIFY=SUCCESS there gets a "relayed" report from postern.
    let with_dsn = Peer::start(&["--dsn"]);
    let plain = Peer::start(&[]);
    let server = Server::start(&[
        "--route",
        &format!("dsn.test=127.0.0.1:{}", with_dsn.port),
        "--route",
        &format!("plain.test=127.0.0.1:{}", plain.port),
        "--route",
        &format!("origin.test=127.0.0.1:{}", plain.port),
    ]);
    let (mut c, ehlo) = hello(&server);
    assert!(ehlo.iter().any(|l| l == "250-DSN" || l == "250 DSN"));
    for cmd in [
        "MAIL FROM:<alice@origin.test> RET=HDRS ENVID=env+2B1",
        "RCPT TO:<a@dsn.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;first@dsn.test",
        "RCPT TO:<b@dsn.test>",
        "RCPT TO:<c@plain.test> NOTIFY=SUCCESS ORCPT=rfc822;orig-c@plain.test",
        "RCPT TO:<d@plain.test> NOTIFY=FAILURE",
    ] {
        let r = c.cmd(cmd);
        assert!(r.starts_with("250"), "{cmd}: {r}");
    }
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: dsn\r\nMessage-ID: <dsn@t>\r\n\r\nbody\r\n.\r\n");
    assert!(c.line().starts_with("250 2.0.0"));
    c.cmd("QUIT");

    let (got, _) = with_dsn.first("the message at the DSN next hop");
    assert_eq!(got.rcpt_tos, ["a@dsn.test", "b@dsn.test"]);
    assert_eq!(got.dsn_mail, ["RET=HDRS", "ENVID=env+2B1"]);
    assert_eq!(
        got.dsn_rcpts,
        [
            vec![
                "NOTIFY=SUCCESS,FAILURE".to_owned(),
                "ORCPT=rfc822;first@dsn.test".to_owned()
            ],
            vec![]
        ]
    );
    let stored = plain.wait_for(
        "the message and the success report",
        Duration::from_secs(20),
        |s| s.len() == 2,
    );
    let msg = stored.iter().find(|s| s.message_id == "<dsn@t>").unwrap();
    assert_eq!(msg.rcpt_tos, ["c@plain.test", "d@plain.test"]);
    let report = stored.iter().find(|s| s.message_id != "<dsn@t>").unwrap();
    assert_eq!(report.mail_from, "<>");
    assert_eq!(report.rcpt_tos, ["alice@origin.test"]);
    let text = String::from_utf8_lossy(&report.data);
    assert!(text.contains("report-type"), "{text}");
    // The report carries the values, decoded from xtext (RFC 3461 4.4).
    assert!(text.contains("Original-Envelope-Id: env+1\r\n"), "{text}");
    assert!(
        text.contains("Final-Recipient: rfc822; c@plain.test"),
        "{text}"
    );
    assert!(
        text.contains("Original-Recipient: rfc822;orig-c@plain.test"),
        "{text}"
    );
    assert!(text.contains("Action: relayed"), "{text}");
    assert!(text.contains("Status: 2.0.0"), "{text}");
    // Only c asked for success and went where no report would come from.
    for other in ["a@dsn.test", "b@dsn.test", "d@plain.test"] {
        assert!(
            !text.contains(&format!("rfc822; {other}")),
            "{other}: {text}"
        );
    }
}

#[test]
fn a_failure_nobody_is_told_of_beside_a_deferral_is_recorded_and_delivery_goes_on() {
    // One recipient refused for good with no report due (NOTIFY=NEVER; the null sender),
    // another deferred: the failure is settled at once, with no report, while the deferred
    // one waits for its retry. One core, so that a core that failed would stop the server.
    let refusing = Peer::start(&["--reject-rcpt", "nobody"]);
    let deferring = Peer::start(&["--tempfail-first", "1000"]);
    let to_dest = format!("dest.test=127.0.0.1:{}", refusing.port);
    let to_later = format!("later.test=127.0.0.1:{}", deferring.port);
    let to_origin = format!("origin.test=127.0.0.1:{}", refusing.port);
    let server = Server::start(&[
        "--cores", "1", "--route", &to_dest, "--route", &to_later, "--route", &to_origin,
    ]);
    for (from, notify, id) in [
        ("a@origin.test", " NOTIFY=NEVER", "<never@t>"),
        ("", "", "<null@t>"),
    ] {
        let queue_id = send_commands(
            &server,
            &[
                &format!("MAIL FROM:<{from}>"),
                &format!("RCPT TO:<nobody@dest.test>{notify}"),
                "RCPT TO:<b@later.test>",
            ],
            id,
        );
        server.log_until(|l| l.contains(&queue_id) && l.contains("nobody@dest.test"));
        server.log_until(|l| l.contains(&queue_id) && l.contains("b@later.test"));
    }
    // The server still delivers.
    send(
        &server,
        "a@origin.test",
        &["ok@dest.test"],
        "<after@t>",
        "x\r\n",
    );
    let stored = refusing.wait_for("the next message", Duration::from_secs(20), |s| {
        s.iter().any(|m| m.message_id == "<after@t>")
    });
    assert_eq!(stored.len(), 1, "no report for either failure: {stored:?}");
}

#[test]
fn a_success_report_does_not_wait_for_the_rest_of_the_message() {
    // c@plain.test asked for success and is relayed to a next hop without DSN; x@down.test
    // stays deferred (nothing listens there). The relayed report comes at once: held until
    // the whole message settled, a restart in between (which cannot tell which recorded
    // deliveries were relayed) would lose it.
    let plain = Peer::start(&[]);
    let down = reserve("127.0.0.1", 0);
    let server = Server::start(&[
        "--route",
        &format!("plain.test=127.0.0.1:{}", plain.port),
        "--route",
        &format!("origin.test=127.0.0.1:{}", plain.port),
        "--route",
        &format!("down.test=127.0.0.1:{}", down.1),
    ]);
    send_commands(
        &server,
        &[
            "MAIL FROM:<alice@origin.test>",
            "RCPT TO:<c@plain.test> NOTIFY=SUCCESS",
            "RCPT TO:<x@down.test>",
        ],
        "<partial@t>",
    );
    let stored = plain.wait_for(
        "the message and the success report",
        Duration::from_secs(20),
        |s| s.len() == 2,
    );
    let report = stored
        .iter()
        .find(|s| s.message_id != "<partial@t>")
        .unwrap();
    assert_eq!(report.mail_from, "<>");
    let text = String::from_utf8_lossy(&report.data);
    assert!(text.contains("Action: relayed"), "{text}");
    assert!(
        text.contains("Final-Recipient: rfc822; c@plain.test"),
        "{text}"
    );
    assert!(!text.contains("x@down.test"), "{text}");
}

#[test]
fn a_mailbox_given_twice_keeps_every_report_either_rcpt_asked_for() {
    // As after a list expanded upstream: the same mailbox twice, the second time with a
    // failure report asked for and the list as its original recipient.
    let peer = Peer::start(&["--reject-rcpt", "nobody"]);
    let server = routed_to(&peer, &[]);
    send_commands(
        &server,
        &[
            "MAIL FROM:<a@origin.test>",
            "RCPT TO:<nobody@dest.test> NOTIFY=NEVER",
            "RCPT TO:<nobody@Dest.test> NOTIFY=FAILURE ORCPT=rfc822;list@lists.test",
        ],
        "<twice@t>",
    );
    let (bounce, text) = peer.first("the failure report the second RCPT asked for");
    assert_eq!(bounce.mail_from, "<>");
    assert!(
        text.contains("Final-Recipient: rfc822; nobody@dest.test"),
        "{text}"
    );
    assert!(
        text.contains("Original-Recipient: rfc822;list@lists.test"),
        "{text}"
    );
    assert_eq!(
        text.matches("Final-Recipient:").count(),
        1,
        "still one recipient: {text}"
    );
}

/// Sends a message from alice@origin.test with RET=FULL to nobody@dest.test (whom the next
/// hop refuses), its body `lines` lines of 18 octets.
fn send_ret_full(server: &Server, message_id: &str, lines: usize) {
    let (mut c, _) = hello(server);
    assert!(c
        .cmd("MAIL FROM:<alice@origin.test> RET=FULL")
        .starts_with("250"));
    assert!(c.cmd("RCPT TO:<nobody@dest.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    let body = "0123456789abcdef\r\n".repeat(lines);
    c.send(format!("Subject: big\r\nMessage-ID: {message_id}\r\n\r\n{body}.\r\n").as_bytes());
    assert!(c.line().starts_with("250 2.0.0"));
}

#[test]
fn a_whole_message_report_too_large_for_the_sender_s_server_goes_with_the_headers() {
    // RET=FULL, and the sender's server takes 3,000 octets at most (SIZE): the report returns
    // the header section instead, rather than reaching nobody.
    let (_dest, origin, server) = refusing_next_hop_and_sender_s(&["--size-limit", "3000"]);
    send_ret_full(&server, "<big@t>", 300);
    let (bounce, text) = origin.first("the report");
    assert_eq!(bounce.rcpt_tos, ["alice@origin.test"]);
    assert!(bounce.data.len() <= 3000, "{}", bounce.data.len());
    assert!(text.contains("does not take mail this large"), "{text}");
    assert!(text.contains("Message-ID: <big@t>"), "{text}");
    assert!(
        text.contains("Final-Recipient: rfc822; nobody@dest.test"),
        "{text}"
    );
    assert!(!text.contains("0123456789abcdef"), "{text}");
}

#[test]
fn a_whole_message_report_over_the_returned_size_says_why_it_has_the_headers() {
    // RET=FULL for a message over the 128 KiB a report returns: the headers come back, and the
    // report's text tells the sender why it did not get what it asked for.
    let (_dest, origin, server) = refusing_next_hop_and_sender_s(&[]);
    send_ret_full(&server, "<huge@t>", 9000); // 162 KiB
    let (_, text) = origin.first("the report");
    assert!(text.contains("Message-ID: <huge@t>"), "{text}");
    assert!(!text.contains("0123456789abcdef"), "{text}");
    // The text part is quoted-printable: without its soft line breaks, on one line.
    let text = text.replace("=\r\n", "");
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        text.contains("could not come back: it is larger than 128 KiB"),
        "{text}"
    );
}

#[test]
fn a_failed_bounce_is_dropped_not_bounced_again() {
    let peer = Peer::start(&["--reject-rcpt", "nobody"]);
    let route = format!("dest.test=127.0.0.1:{}", peer.port);
    let server = Server::start(&["--route", &route, "--metrics", "127.0.0.1:0"]);
    let mut c = greeted(&server);
    c.cmd("MAIL FROM:<>");
    c.cmd("RCPT TO:<nobody@dest.test>");
    c.cmd("DATA");
    c.send(b"Subject: a bounce\r\n\r\nbody\r\n.\r\n");
    assert!(c.line().starts_with("250"));
    let m = server.metrics_until(|m| m.contains("postern_recipients_failed_total 1\n"));
    assert!(m.contains("postern_recipients_failed_total 1\n"), "{m}");
    assert!(m.contains("postern_bounces_total 0\n"), "{m}");
    assert!(peer.stored().is_empty());
}

#[test]
fn recipients_failed_in_one_transaction_get_one_bounce() {
    // Several sessions, spread over both cores, each send messages to six recipients that the
    // next hop refuses: each message fails in one transaction, and its sender gets one report
    // naming all six, however the outcomes travel from the delivering core to the owner's.
    const SESSIONS: usize = 4;
    const EACH: usize = 40;
    const RCPTS: usize = 6;
    let peer = Peer::start(&["--reject-rcpt", "nobody"]);
    let mut server = routed_to(&peer, &["--metrics", "127.0.0.1:0"]);
    let addr = server.smtp;
    let senders: Vec<_> = (0..SESSIONS)
        .map(|s| {
            std::thread::spawn(move || {
                let mut c = common::Client::connect(addr);
                assert!(c.line().starts_with("220"));
                c.send(b"EHLO client.test\r\n");
                c.reply();
                let mut ids = Vec::new();
                for i in 0..EACH {
                    assert!(c.cmd("MAIL FROM:<alice@origin.test>").starts_with("250"));
                    for r in 0..RCPTS {
                        let rcpt = format!("RCPT TO:<nobody{r}@dest.test>");
                        assert!(c.cmd(&rcpt).starts_with("250"));
                    }
                    assert!(c.cmd("DATA").starts_with("354"));
                    c.send(format!("Message-ID: <f{s}-{i}@t>\r\n\r\nx\r\n.\r\n").as_bytes());
                    let reply = c.line();
                    assert!(reply.starts_with("250 2.0.0"), "{reply}");
                    ids.push(common::queue_id(&reply));
                }
                c.cmd("QUIT");
                ids
            })
        })
        .collect();
    let ids: Vec<String> = senders
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let failed = format!(
        "postern_recipients_failed_total {}\n",
        SESSIONS * EACH * RCPTS
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !server
        .metrics_until(|m| m.contains(&failed))
        .contains(&failed)
    {
        assert!(Instant::now() < deadline, "not every recipient failed");
    }
    // Every outcome is settled; a graceful stop waits for the reports being made.
    let log = server.terminate_for_log();
    let mut reports: HashMap<&str, usize> = HashMap::new();
    for line in log
        .lines()
        .filter(|l| l.contains("delivery status notification queued"))
    {
        // Each says what kind of report it is: these are all failures.
        assert!(line.contains("action=\"failed\""), "{line}");
        // The address it goes to is quoted, as in every other line naming an address.
        assert!(line.contains(" to=\""), "{line}");
        let id = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("queue_id="))
            .unwrap_or_else(|| panic!("no queue_id in {line}"));
        *reports.entry(id).or_default() += 1;
    }
    let not_once: Vec<(&String, Option<usize>)> = ids
        .iter()
        .map(|id| (id, reports.get(id.as_str()).copied()))
        .filter(|(_, n)| *n != Some(1))
        .collect();
    assert!(
        not_once.is_empty(),
        "messages not bounced exactly once (bounces made): {not_once:?}"
    );
    assert_eq!(reports.len(), ids.len(), "bounces of messages not sent");
}

#[test]
fn undeliverable_past_the_queue_lifetime_bounces_with_its_last_error_s_status() {
    // Nothing answers: the last error is postern's own 4.4.1 (no answer from the host), which
    // the report keeps rather than 4.4.7 (RFC 3463 3.5: the actual problem's code).
    let origin = Peer::start(&[]);
    let (server, _down) = unreachable_dest_with_origin(&origin, &["--max-queue-lifetime", "1s"]);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<old@t>",
        "x\r\n",
    );
    let (_, text) = origin.first("the expiry bounce");
    assert!(text.contains("Status: 4.4.1"), "{text}");
    assert!(
        text.contains("delivery time expired; last error:"),
        "{text}"
    );
    assert!(text.contains("Action: failed"), "{text}");
    assert!(
        text.contains("Final-Recipient: rfc822; b@dest.test"),
        "{text}"
    );
}

/// Sends one message per (recipient, Message-ID) from a@origin.test and returns, in the same
/// order, the report that names each recipient, once `origin` has them all.
fn expiry_reports<const N: usize>(
    server: &Server,
    origin: &Peer,
    messages: [(&str, &str); N],
) -> [String; N] {
    for (rcpt, id) in messages {
        send(server, "a@origin.test", &[rcpt], id, "x\r\n");
    }
    let stored = origin.wait_for("the expiry bounces", Duration::from_secs(20), |s| {
        s.len() == N
    });
    messages.map(|(rcpt, _)| {
        stored
            .iter()
            .map(|m| String::from_utf8_lossy(&m.data).into_owned())
            .find(|t| t.contains(&format!("Final-Recipient: rfc822; {rcpt}")))
            .unwrap_or_else(|| panic!("no report for {rcpt}"))
    })
}

#[test]
fn an_expired_recipient_keeps_its_next_hop_s_status_or_gets_4_4_7() {
    // Three messages put off by the next hop until their lifetime ends: one with an enhanced
    // status (450 4.2.1), kept in its report; one whose reply says no more than its class
    // (451 without a status), reported 4.4.7; one refused with 552 at RCPT, which is
    // temporary there, reported 4.2.2.
    let origin = Peer::start(&[]);
    let (port, _stored, _) = scripted_next_hop(
        |_, line| {
            if line.starts_with("RCPT TO:<busy@") {
                Some(Act::Say("450 4.2.1 mailbox busy\r\n"))
            } else if line.starts_with("RCPT TO:<vague@") {
                Some(Act::Say("451 try later\r\n"))
            } else if line.starts_with("RCPT TO:<full@") {
                // RFC 5321 4.5.3.1.10: too many recipients from an older server, temporary.
                Some(Act::Say("552 5.2.2 mailbox full\r\n"))
            } else {
                None
            }
        },
        Act::Say("250 2.0.0 stored\r\n"),
    );
    let server = routed_apart(port, origin.port, &["--max-queue-lifetime", "2s"]);
    let [busy, vague, full] = expiry_reports(
        &server,
        &origin,
        [
            ("busy@dest.test", "<busy@t>"),
            ("vague@dest.test", "<vague@t>"),
            ("full@dest.test", "<full@t>"),
        ],
    );
    // Taken as temporary, its code stays in the transient class, as in a delay warning.
    assert!(full.contains("Status: 4.2.2"), "{full}");
    assert!(full.contains("552 5.2.2 mailbox full"), "{full}");
    assert!(busy.contains("Status: 4.2.1"), "{busy}");
    assert!(busy.contains("450 4.2.1 mailbox busy"), "{busy}");
    assert!(busy.contains("delivery time expired"), "{busy}");
    assert!(vague.contains("Status: 4.4.7"), "{vague}");
    assert!(vague.contains("451 try later"), "{vague}");
}

#[test]
fn an_expired_recipient_keeps_the_status_of_the_421_that_ended_its_sessions() {
    // Next hops that answer and then end the session with a 421 carrying an enhanced status:
    // one at its greeting, one in answer to MAIL. The expiry reports their status, not the
    // 4.4.2 of a broken connection.
    let origin = Peer::start(&[]);
    let greeting = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let greeting_port = greeting.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in greeting.incoming().take(100) {
            let Ok(mut conn) = conn else { return };
            let _ = std::io::Write::write_all(&mut conn, b"421 4.3.2 hop.test too busy\r\n");
        }
    });
    let (mail_port, _stored, _) = scripted_next_hop(
        |_, line| {
            line.starts_with("MAIL")
                .then_some(Act::SayAndClose("421 4.7.0 hop.test go away\r\n"))
        },
        Act::Say("250 2.0.0 stored\r\n"),
    );
    let busy = format!("busy.test=127.0.0.1:{greeting_port}");
    let away = format!("away.test=127.0.0.1:{mail_port}");
    let back = format!("origin.test=127.0.0.1:{}", origin.port);
    let server = Server::start(&[
        "--route",
        &busy,
        "--route",
        &away,
        "--route",
        &back,
        "--max-queue-lifetime",
        "2s",
    ]);
    let [busy, away] = expiry_reports(
        &server,
        &origin,
        [("b@busy.test", "<busy@t>"), ("b@away.test", "<away@t>")],
    );
    assert!(busy.contains("Status: 4.3.2"), "{busy}");
    assert!(busy.contains("421 4.3.2 hop.test too busy"), "{busy}");
    assert!(away.contains("Status: 4.7.0"), "{away}");
    assert!(away.contains("421 4.7.0 hop.test go away"), "{away}");
}

#[test]
fn the_queue_lifetime_runs_whole_from_arrival() {
    // The spool keeps arrival times in whole seconds. A message that arrives late in a second
    // must still get its whole lifetime, not one shortened by the part of the second that
    // the truncation drops.
    let origin = Peer::start(&[]);
    let (server, _down) = unreachable_dest_with_origin(&origin, &["--max-queue-lifetime", "1s"]);
    let mut c = greeted(&server);
    let into_second = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_millis()
    };
    // Wait, bounded, for the clock to be at least 0.7 s into a second.
    let deadline = Instant::now() + Duration::from_secs(3);
    while into_second() < 700 {
        assert!(Instant::now() < deadline, "the clock did not move");
        std::thread::sleep(Duration::from_millis(5));
    }
    let before = Instant::now();
    c.send(b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n");
    assert!(c.line().starts_with("250"));
    assert!(c.line().starts_with("250"));
    assert!(c.line().starts_with("354"));
    c.send(b"Subject: late in a second\r\n\r\nx\r\n.\r\n");
    assert!(c.line().starts_with("250"));
    let (_, text) = origin.first("the expiry bounce");
    let waited = before.elapsed();
    assert!(text.contains("delivery time expired"), "{text}");
    assert!(
        waited >= Duration::from_millis(995),
        "bounced {waited:?} after arrival, within a lifetime of 1 s"
    );
}

#[test]
fn the_last_attempt_comes_at_the_end_of_the_lifetime_while_the_next_hop_is_paused() {
    // Nothing listens at first: the second failure in a row pauses the next hop for a minute
    // (the retry delay, at most 60 s). The lifetime ends well before that, and the last
    // attempt must come then, not after the pause.
    let down = reserve("127.0.0.1", 0);
    let port = down.1;
    let route = format!("dest.test=127.0.0.1:{port}");
    let server = Server::start(&[
        "--route",
        &route,
        "--retry-initial",
        "60s",
        "--retry-max",
        "60s",
        "--max-queue-lifetime",
        "6s",
        "--metrics",
        "127.0.0.1:0",
    ]);
    for (n, id) in ["<first@t>", "<last@t>"].into_iter().enumerate() {
        send(&server, "a@origin.test", &["b@dest.test"], id, "x\r\n");
        let count = format!("postern_delivery_deferrals_total {}\n", n + 1);
        let m = server.metrics_until(|m| m.contains(&count));
        assert!(m.contains(&count), "{m}");
    }
    let paused = server.log_until(|l| l.contains("delivery to it paused for 60s"));
    assert!(paused.contains(&format!("127.0.0.1:{port}")), "{paused}");
    drop(down);
    let peer = Peer::start_on("127.0.0.1", port, &[]);
    let has_last = |s: &[Stored]| {
        s.iter()
            .any(|m| String::from_utf8_lossy(&m.data).contains("Message-ID: <last@t>"))
    };
    let stored = peer.wait_for("the last attempt", Duration::from_secs(20), has_last);
    assert!(has_last(&stored));
}

#[test]
fn delay_warning_tells_the_sender_once() {
    let origin = Peer::start(&[]);
    let (mut server, _down) = unreachable_dest_with_origin(
        &origin,
        &["--delay-warning", "300ms", "--metrics", "127.0.0.1:0"],
    );
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<slow@t>",
        "x\r\n",
    );
    let (_, text) = origin.first("the delay warning");
    assert!(text.contains("Action: delayed"), "{text}");
    assert!(text.contains("Will-Retry-Until:"), "{text}");
    // Nothing answered: no answer from host (RFC 3463 3.5), not a protocol status.
    assert!(text.contains("Status: 4.4.1"), "{text}");
    // Several more deferrals pass, still one warning.
    server.metrics_until(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("postern_delivery_deferrals_total "))
            .is_some_and(|n| n.parse::<u64>().unwrap() >= 6)
    });
    // Made once, not only delivered once so far: a second one queued and not yet delivered
    // would show in the log.
    let log = server.terminate_for_log();
    assert_eq!(warnings_made(&log), 1, "{log}");
    assert_eq!(origin.stored().len(), 1);
}

/// Delay warnings (`action="delayed"`) that a run's log says it queued.
fn warnings_made(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("delivery status notification queued"))
        .filter(|l| l.contains("action=\"delayed\""))
        .count()
}

#[test]
fn a_delay_warning_is_not_made_again_after_a_restart() {
    // The first run tries once (the next retry is an hour away), warns at that deferral and
    // stops: no later deferral of that run writes the recipient's status again. The second
    // run, on the same spool, retries at once and keeps failing.
    let origin = Peer::start(&[]);
    let down = reserve("127.0.0.1", 0);
    let dest = format!("dest.test=127.0.0.1:{}", down.1);
    let back = format!("origin.test=127.0.0.1:{}", origin.port);
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let common = [
        "--route",
        dest.as_str(),
        "--route",
        back.as_str(),
        "--delay-warning",
        "0s",
        "--metrics",
        "127.0.0.1:0",
    ];
    let mut first = common.to_vec();
    first.extend(["--retry-initial", "1h", "--retry-max", "1h"]);
    let mut server = Server::start_in(&first, spool.clone(), None);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<restarted@t>",
        "x\r\n",
    );
    let (_, text) = origin.first("the delay warning");
    assert!(text.contains("Action: delayed"), "{text}");
    let log = server.terminate_for_log();
    assert_eq!(warnings_made(&log), 1, "{log}");
    // The listing says the sender was warned about b@, from the spool.
    let listing = queue_listing(&spool);
    let original = listing
        .iter()
        .find(|m| m["sender"] == "a@origin.test")
        .unwrap_or_else(|| panic!("{listing:#?}"));
    assert_eq!(
        original["recipients"][0]["delay_warned"], true,
        "{listing:#?}"
    );

    let mut second = common.to_vec();
    second.extend(FAST_RETRY);
    let mut server = Server::start_in(&second, spool, Some(dir));
    server.metrics_until(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("postern_delivery_deferrals_total "))
            .is_some_and(|n| n.parse::<u64>().unwrap() >= 3)
    });
    let log = server.terminate_for_log();
    assert_eq!(
        warnings_made(&log),
        0,
        "warned again after the restart:\n{log}"
    );
    assert_eq!(origin.stored().len(), 1, "{:#?}", origin.stored());
}

#[test]
fn a_message_from_the_null_sender_is_not_listed_as_warned_of_its_delay() {
    // No warning goes to <> (RFC 3461 4.1, RFC 5321 4.5.5): the listing must not say the
    // sender was warned (each deferral after the first said so).
    let down = reserve("127.0.0.1", 0);
    let dest = format!("dest.test=127.0.0.1:{}", down.1);
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let mut args = vec![
        "--route",
        dest.as_str(),
        "--delay-warning",
        "0s",
        "--metrics",
        "127.0.0.1:0",
    ];
    args.extend(FAST_RETRY);
    let mut server = Server::start_in(&args, spool.clone(), Some(dir));
    send(&server, "", &["b@dest.test"], "<from-null@t>", "x\r\n");
    server.metrics_until(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("postern_delivery_deferrals_total "))
            .is_some_and(|n| n.parse::<u64>().unwrap() >= 3)
    });
    let log = server.terminate_for_log();
    assert_eq!(warnings_made(&log), 0, "{log}");
    let listing = queue_listing(&spool);
    let original = listing
        .iter()
        .find(|m| m["sender"] == "")
        .unwrap_or_else(|| panic!("{listing:#?}"));
    assert_eq!(
        original["recipients"][0]["delay_warned"], false,
        "{listing:#?}"
    );
}

#[test]
fn a_permanent_failure_is_bounced_at_once_though_another_recipient_waits_for_a_retry() {
    // dest.test refuses nobody@ with 550; slow.test is down (retried for days by default);
    // bounces go to origin.test, the same peer.
    let peer = Peer::start(&["--reject-rcpt", "nobody"]);
    let down = reserve("127.0.0.1", 0);
    let slow = format!("slow.test=127.0.0.1:{}", down.1);
    let dest = format!("dest.test=127.0.0.1:{}", peer.port);
    let origin = format!("origin.test=127.0.0.1:{}", peer.port);
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let mut args = vec![
        "--route",
        dest.as_str(),
        "--route",
        origin.as_str(),
        "--route",
        slow.as_str(),
        "--metrics",
        "127.0.0.1:0",
    ];
    args.extend(FAST_RETRY);
    let mut server = Server::start_in(&args, spool.clone(), None);
    send(
        &server,
        "alice@origin.test",
        &["nobody@dest.test", "later@slow.test"],
        "<mixed@t>",
        "x\r\n",
    );
    let stored = peer.wait_for(
        "the bounce for nobody@, while later@ is still retried",
        Duration::from_secs(20),
        |s| !s.is_empty(),
    );
    let text = String::from_utf8_lossy(&stored[0].data).into_owned();
    assert_eq!(stored[0].mail_from, "<>");
    assert_eq!(stored[0].rcpt_tos, ["alice@origin.test"]);
    assert!(
        text.contains("Final-Recipient: rfc822; nobody@dest.test"),
        "{text}"
    );
    assert!(text.contains("Status: 5.1.1"), "{text}");
    assert!(!text.contains("later@slow.test"), "{text}");
    let m = server.metrics_until(|m| m.contains("postern_queue_depth 1\n"));
    assert!(m.contains("postern_queue_depth 1\n"), "{m}");

    // The failure is recorded: after a restart only later@ is tried again, and nobody@
    // gets neither a second RCPT nor a second bounce.
    server.terminate();
    let server = Server::start_in(&args, spool, Some(dir));
    server.metrics_until(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("postern_delivery_deferrals_total "))
            .is_some_and(|n| n.parse::<u64>().unwrap() >= 3)
    });
    let m = server.metrics_until(|m| m.contains("postern_recipients_failed_total"));
    assert!(
        m.contains("postern_recipients_failed_total 0\n"),
        "nobody@ was tried again after the restart: {m}"
    );
    assert_eq!(peer.stored().len(), 1, "{:#?}", peer.stored());
}

#[test]
fn a_stop_right_after_a_permanent_failure_still_makes_its_bounce_and_records_it() {
    // nobody@dest.test is refused with 550 while later@slow.test waits for a retry, so the
    // bounce first waits a moment for the message's other outcomes. A stop in that moment
    // still makes it (queued: origin.test is down too) and records the failure, so that the
    // next run neither tries nobody@ again nor loses the report.
    let peer = Peer::start(&["--reject-rcpt", "nobody"]);
    let down = reserve("127.0.0.1", 0);
    let dest = format!("dest.test=127.0.0.1:{}", peer.port);
    let slow = format!("slow.test=127.0.0.1:{}", down.1);
    let origin = format!("origin.test=127.0.0.1:{}", down.1);
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let args = [
        "--route", &dest, "--route", &slow, "--route", &origin, "--cores", "1",
    ];
    let mut server = Server::start_in(&args, spool.clone(), None);
    send(
        &server,
        "alice@origin.test",
        &["nobody@dest.test", "later@slow.test"],
        "<stopped@t>",
        "x\r\n",
    );
    server.log_until(|l| l.contains("status=\"bounced\"") && l.contains("nobody@dest.test"));
    let log = server.terminate_for_log();
    let listing = queue_listing(&spool);
    let pending = |m: &serde_json::Value| -> Vec<String> {
        m["recipients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["address"].as_str().unwrap().to_owned())
            .collect()
    };
    let original = listing
        .iter()
        .find(|m| m["sender"] == "alice@origin.test")
        .unwrap_or_else(|| panic!("{listing:#?}"));
    assert_eq!(
        pending(original),
        ["later@slow.test"],
        "{listing:#?}\n{log}"
    );
    let bounce = listing
        .iter()
        .find(|m| m["sender"] == "")
        .unwrap_or_else(|| panic!("no bounce queued: {listing:#?}\n{log}"));
    assert_eq!(pending(bounce), ["alice@origin.test"]);
}

#[test]
fn a_delay_warning_names_every_deferred_recipient_that_wants_one() {
    // dest.test and far.test are both down, so their recipients are deferred in separate
    // attempts (separate batches of outcomes).
    let origin = Peer::start(&[]);
    let far = reserve("127.0.0.1", 0);
    let far_route = format!("far.test=127.0.0.1:{}", far.1);
    let (mut server, _down) = unreachable_dest_with_origin(
        &origin,
        &[
            "--delay-warning",
            "300ms",
            "--route",
            &far_route,
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    send_commands(
        &server,
        &[
            "MAIL FROM:<a@origin.test>",
            "RCPT TO:<failure-only@dest.test> NOTIFY=FAILURE",
            "RCPT TO:<asked@dest.test> NOTIFY=DELAY,FAILURE",
            "RCPT TO:<default@dest.test>",
            "RCPT TO:<elsewhere@far.test> NOTIFY=DELAY",
        ],
        "<slow3@t>",
    );
    let warned = ["asked@dest.test", "default@dest.test", "elsewhere@far.test"];
    let count = |stored: &[Stored], who: &str| {
        let field = format!("Final-Recipient: rfc822; {who}");
        stored
            .iter()
            .filter(|s| String::from_utf8_lossy(&s.data).contains(&field))
            .count()
    };
    origin.wait_for(
        "delay warnings for the three recipients that want one",
        Duration::from_secs(20),
        |s| warned.iter().all(|w| count(s, w) >= 1),
    );
    // Several more deferrals of each pass: still one warning per recipient.
    server.metrics_until(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("postern_delivery_deferrals_total "))
            .is_some_and(|n| n.parse::<u64>().unwrap() >= 16)
    });
    // Every warning made was delivered (none queued behind the ones counted below): the
    // server is stopped first, and its log counts those it made.
    let log = server.terminate_for_log();
    let made = log
        .lines()
        .filter(|l| l.contains("delivery status notification queued"))
        .count();
    let stored_after = origin.stored();
    assert_eq!(made, stored_after.len(), "{log}");
    for s in &stored_after {
        let text = String::from_utf8_lossy(&s.data);
        assert!(text.contains("Action: delayed"), "{text}");
        assert!(!text.contains("failure-only@dest.test"), "{text}");
    }
    for w in warned {
        assert_eq!(count(&stored_after, w), 1, "{w}: {stored_after:#?}");
    }
}

#[test]
fn a_next_hop_that_refuses_helo_for_good_bounces_the_mail_at_once() {
    // EHLO and then HELO answered 550: that host will not take mail from us (RFC 5321
    // 4.2.1), so the mail fails now, with the reply's status, not after days of retries.
    let origin = Peer::start(&[]);
    let (port, _stored, _) = scripted_next_hop(
        |_, line| {
            (line.starts_with("EHLO") || line.starts_with("HELO"))
                .then_some(Act::Say("550 5.7.1 go away\r\n"))
        },
        Act::Say("250 2.0.0 stored\r\n"),
    );
    let server = routed_apart(port, origin.port, &["--retry-initial", "1h"]);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<helo@t>",
        "x\r\n",
    );
    let (_, text) = origin.first("the bounce");
    assert!(text.contains("Action: failed"), "{text}");
    assert!(text.contains("Status: 5.7.1"), "{text}");
    assert!(text.contains("550 5.7.1 go away"), "{text}");
}

#[test]
fn a_refusal_of_data_followed_by_a_close_bounces_the_message() {
    // Exim's `drop` in its DATA ACL: a 554, then the connection closed, before the RSET that
    // would confirm the refusal was in step. The refusal stands; the message is not sent
    // again and again on new connections.
    let origin = Peer::start(&[]);
    let (port, connections, _) = next_hop_refusing_data_once(true);
    let server = routed_apart(port, origin.port, &["--cores", "1"]);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<dropped@t>",
        "x\r\n",
    );
    let (_, text) = origin.first("the bounce");
    assert!(
        text.contains("Final-Recipient: rfc822; b@dest.test"),
        "{text}"
    );
    assert!(text.contains("554 5.7.1 not from you"), "{text}");
    assert!(text.contains("Status: 5.7.1"), "{text}");
    assert_eq!(
        connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one connection"
    );
}

#[test]
fn a_next_hop_that_refuses_noop_gets_its_mixed_transactions_once() {
    // A transaction taken past a refused recipient is asked a NOOP to see that the replies
    // are in step; a next hop that does not take NOOP (nothing follows its refusal) is in
    // step, and the message is not sent again.
    let origin = Peer::start(&[]);
    let (port, stored, _) = scripted_next_hop(
        |_, line| {
            if line.starts_with("NOOP") {
                Some(Act::Say("502 5.5.1 command not implemented\r\n"))
            } else if line.starts_with("RCPT TO:<unknown@") {
                Some(Act::Say("550 5.1.1 unknown user\r\n"))
            } else {
                None
            }
        },
        Act::Say("250 2.0.0 stored\r\n"),
    );
    let mut server = routed_apart(
        port,
        origin.port,
        &[&["--cores", "1"][..], &FAST_RETRY].concat(),
    );
    send(
        &server,
        "a@origin.test",
        &["unknown@dest.test", "b@dest.test"],
        "<mixed@t>",
        "x\r\n",
    );
    let (_, text) = origin.first("unknown@'s bounce");
    assert!(
        text.contains("Final-Recipient: rfc822; unknown@dest.test"),
        "{text}"
    );
    assert!(stored.recv_timeout(Duration::from_secs(5)).is_ok());
    // Sent once: after the stop, the log has every attempt the server made.
    server.log_until(|l| l.contains("to=\"b@dest.test\"") && l.contains("status=\"sent\""));
    let log = server.terminate_for_log();
    let attempts = log
        .lines()
        .filter(|l| l.contains("to=\"b@dest.test\"") && l.contains("status="))
        .count();
    assert_eq!(attempts, 1, "{log}");
    assert!(stored.try_recv().is_err(), "sent twice");
}

/// A next hop (no extensions) whose first connection refuses DATA with 554, then closes
/// (`close`) or answers the RSET after it with 421 and says nothing more (a server waiting
/// for QUIT); later connections take each message. Returns its port, how many connections it
/// took, and the Message-IDs it took.
fn next_hop_refusing_data_once(
    close: bool,
) -> (
    u16,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::mpsc::Receiver<String>,
) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = count.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().take(20).enumerate() {
            let Ok(mut stream) = stream else { return };
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let tx = tx.clone();
            std::thread::spawn(move || {
                stream
                    .set_read_timeout(Some(Duration::from_secs(30)))
                    .unwrap();
                let _ = stream.write_all(b"220 hop.test ESMTP\r\n");
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let (mut line, mut refused, mut closing) = (String::new(), false, false);
                while reader.read_line(&mut line).unwrap_or(0) > 0 {
                    let reply: String = if closing {
                        String::new()
                    } else if refused {
                        closing = true;
                        "421 4.3.2 hop.test closing\r\n".into()
                    } else if line.starts_with("DATA") && n == 0 {
                        let _ = stream.write_all(b"554 5.7.1 not from you\r\n");
                        if close {
                            return;
                        }
                        refused = true;
                        String::new()
                    } else if line.starts_with("DATA") {
                        let _ = stream.write_all(b"354 go\r\n");
                        let mut body = String::new();
                        loop {
                            let mut l = String::new();
                            if reader.read_line(&mut l).unwrap_or(0) == 0 || l == ".\r\n" {
                                break;
                            }
                            body.push_str(&l);
                        }
                        let id = body.lines().find_map(|l| l.strip_prefix("Message-ID: "));
                        let _ = tx.send(id.unwrap_or_default().to_owned());
                        "250 2.0.0 stored\r\n".into()
                    } else if line.starts_with("QUIT") {
                        let _ = stream.write_all(b"221 2.0.0 bye\r\n");
                        return;
                    } else {
                        "250 2.0.0 ok\r\n".into()
                    };
                    let _ = stream.write_all(reply.as_bytes());
                    line.clear();
                }
            });
        }
    });
    (port, count, rx)
}

#[test]
fn a_connection_closing_after_a_refused_data_takes_no_further_transaction() {
    // The 421 to the RSET settles the refusal of DATA; the connection, which the next hop
    // is closing, takes no further message (sent on it, the next would wait minutes for a
    // reply that never comes).
    let origin = Peer::start(&[]);
    let (port, _, taken) = next_hop_refusing_data_once(false);
    let server = routed_apart(port, origin.port, &["--cores", "1"]);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<refused@t>",
        "x\r\n",
    );
    let (_, text) = origin.first("the bounce");
    assert!(text.contains("554 5.7.1 not from you"), "{text}");
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<next@t>",
        "y\r\n",
    );
    assert_eq!(
        taken.recv_timeout(Duration::from_secs(10)).unwrap(),
        "<next@t>"
    );
}

/// A next hop without extensions that refuses every recipient with 550, `delay` after each
/// RCPT (up to 8 connections). Returns its port.
fn slow_refusing_next_hop(delay: Duration) -> u16 {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(8) {
            let Ok(mut stream) = stream else { return };
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let _ = stream.write_all(b"220 slow.hop ESMTP\r\n");
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                let reply: &[u8] = match verb.as_str() {
                    "EHLO" => b"250 slow.hop\r\n",
                    "RCPT" => {
                        std::thread::sleep(delay);
                        b"550 5.1.1 no such user here, slowly\r\n"
                    }
                    "QUIT" => {
                        let _ = stream.write_all(b"221 2.0.0 bye\r\n");
                        break;
                    }
                    _ => b"250 2.0.0 ok\r\n",
                };
                if stream.write_all(reply).is_err() {
                    break;
                }
            }
        }
    });
    port
}

#[test]
fn recipients_failing_at_two_next_hops_moments_apart_get_one_bounce() {
    // dest.test's next hop refuses at once, slow.test's 200 ms later: one report names both,
    // rather than one report for each (RFC 3464 lets one report cover them).
    let peer = Peer::start(&["--reject-rcpt", "nobody"]);
    let slow = slow_refusing_next_hop(Duration::from_millis(200));
    let to_slow = format!("slow.test=127.0.0.1:{slow}");
    let mut server = routed_to(&peer, &["--route", &to_slow, "--metrics", "127.0.0.1:0"]);
    let id = send(
        &server,
        "alice@origin.test",
        &["nobody@dest.test", "nobody@slow.test"],
        "<two@t>",
        "x\r\n",
    );
    let bounce = peer.wait_for("the bounce", Duration::from_secs(20), |s| !s.is_empty());
    let text = String::from_utf8_lossy(&bounce[0].data).into_owned();
    assert!(
        text.contains("Final-Recipient: rfc822; nobody@dest.test")
            && text.contains("Final-Recipient: rfc822; nobody@slow.test"),
        "{text}"
    );
    server.metrics_until(|m| m.contains("postern_recipients_failed_total 2\n"));
    let log = server.terminate_for_log();
    let reports = log
        .lines()
        .filter(|l| l.contains("delivery status notification queued"))
        .filter(|l| l.contains(&format!("queue_id={id}")))
        .count();
    assert_eq!(reports, 1, "{log}");
}

#[test]
fn a_bounce_to_a_sender_in_u_labels_reaches_a_next_hop_without_smtputf8() {
    // The sender's domain is in U-labels, its local part ASCII: the message went out without
    // SMTPUTF8 (the domain in A-labels), and so must its bounce, To field included, or a next
    // hop without SMTPUTF8 would refuse the report, which nobody is then told of.
    let peer = Peer::start(&["--reject-rcpt", "nobody", "--no-smtputf8"]);
    let server = routed_apart(
        peer.port,
        peer.port,
        &["--route", &format!("bücher.test=127.0.0.1:{}", peer.port)],
    );
    let (mut c, _) = hello(&server);
    assert!(c
        .cmd("MAIL FROM:<alice@bücher.test> SMTPUTF8")
        .starts_with("250"));
    assert!(c.cmd("RCPT TO:<nobody@dest.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: test\r\nMessage-ID: <orig@t>\r\n\r\nbody\r\n.\r\n");
    assert!(c.line().starts_with("250 2.0.0"));
    let stored = peer.wait_for("the bounce", Duration::from_secs(20), |s| !s.is_empty());
    let bounce = &stored[0];
    assert_eq!(bounce.mail_from, "<>");
    assert_eq!(bounce.rcpt_tos, ["alice@xn--bcher-kva.test"]);
    let text = String::from_utf8_lossy(&bounce.data);
    assert!(text.contains("To: <alice@xn--bcher-kva.test>"), "{text}");
    assert!(
        text.contains("Final-Recipient: rfc822; nobody@dest.test"),
        "{text}"
    );
}

#[test]
fn each_message_gathers_its_failures_for_its_own_half_second() {
    // A's first recipient fails at once and its second waits (its next hop never answers):
    // A gathers failures for half a second. B comes a third of a second later: its first
    // recipient fails at once, its second once A's report is made. That is inside B's own
    // half second, so B gets one report naming both. Before, A's half second ended B's
    // gathering too, and B got two reports.
    let (port_x, _, _) = scripted_next_hop(
        |_, line| {
            line.starts_with("RCPT")
                .then_some(Act::Say("550 5.1.1 no such user\r\n"))
        },
        Act::Say("250 2.0.0 stored\r\n"),
    );
    let (port_y, _hold_y) = next_hop_answering_rcpt_when_told("451 4.3.0 later\r\n");
    let (port_z, release_z) = next_hop_answering_rcpt_when_told("550 5.1.1 no such user\r\n");
    let origin = Peer::start(&[]);
    let routes = [
        format!("x.test=127.0.0.1:{port_x}"),
        format!("y.test=127.0.0.1:{port_y}"),
        format!("z.test=127.0.0.1:{port_z}"),
        format!("origin.test=127.0.0.1:{}", origin.port),
    ];
    let mut args = vec!["--cores", "1", "--shutdown-grace", "1s"];
    for r in &routes {
        args.extend(["--route", r.as_str()]);
    }
    let mut server = Server::start(&args);
    let a = send(
        &server,
        "s@origin.test",
        &["a1@x.test", "a2@y.test"],
        "<a@t>",
        "x\r\n",
    );
    server.log_until(|l| l.contains("to=\"a1@x.test\"") && l.contains("bounced"));
    // The pace is the scenario: B's first failure near the end of A's half second, so that
    // B's own half second leaves room for a slow sync of A's report before B's second
    // failure.
    std::thread::sleep(Duration::from_millis(350));
    let b = send(
        &server,
        "s@origin.test",
        &["b1@x.test", "b2@z.test"],
        "<b@t>",
        "x\r\n",
    );
    server.log_until(|l| l.contains("to=\"b1@x.test\"") && l.contains("bounced"));
    // A's report, made at the end of A's half second; then B's second recipient fails.
    let made = |id: &str| {
        let id = format!("queue_id={id}");
        move |l: &str| l.contains("delivery status notification queued") && l.contains(&id)
    };
    server.log_until(made(&a));
    release_z.send(()).unwrap();
    server.log_until(|l| l.contains("to=\"b2@z.test\"") && l.contains("bounced"));
    server.log_until(made(&b));
    let log = server.terminate_for_log();
    let b_reports: Vec<&str> = log.lines().filter(|l| made(&b)(l)).collect();
    assert_eq!(b_reports.len(), 1, "{b_reports:#?}");
}
