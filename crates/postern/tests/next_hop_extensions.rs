//! Mail a next hop's extensions cannot take as it is: 8-bit content to a next hop without
//! 8BITMIME, UTF-8 addresses and header fields without SMTPUTF8, BINARYMIME bodies without
//! BINARYMIME; what goes on unchanged, in another form, or back to the sender.
#![allow(clippy::unwrap_used)]

mod common;
mod relaying;

use std::time::Duration;

use common::Server;
use relaying::*;

#[test]
fn eight_bit_content_never_goes_to_a_next_hop_without_8bitmime() {
    // RFC 6152 3: the 8-bit message fails with 5.6.3 and is bounced (the report itself is
    // ASCII, as its text and headers are); a message declared 8BITMIME that is plain ASCII
    // is delivered.
    let peer = Peer::start(&["--no-8bitmime"]);
    let server = routed_to(&peer, &[]);
    send_commands(
        &server,
        &[
            "MAIL FROM:<alice@origin.test> BODY=8BITMIME",
            "RCPT TO:<bob@dest.test>",
        ],
        "<ascii@t>",
    );
    let (mut c, _) = hello(&server);
    assert!(c
        .cmd("MAIL FROM:<alice@origin.test> BODY=8BITMIME")
        .starts_with("250"));
    assert!(c.cmd("RCPT TO:<carol@dest.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send("Subject: t\r\nMessage-ID: <eight@t>\r\n\r\nGr\u{fc}\u{df}e\r\n.\r\n".as_bytes());
    assert!(c.line().starts_with("250 2.0.0"));
    c.cmd("QUIT");
    let stored = peer.wait_for(
        "the ASCII message and the bounce",
        Duration::from_secs(20),
        |s| s.len() == 2,
    );
    assert!(
        stored.iter().all(|m| m.message_id != "<eight@t>"),
        "{stored:?}"
    );
    let ascii = stored.iter().find(|m| m.message_id == "<ascii@t>").unwrap();
    assert_eq!(ascii.rcpt_tos, ["bob@dest.test"]);
    let bounce = stored.iter().find(|m| m.message_id != "<ascii@t>").unwrap();
    let text = String::from_utf8_lossy(&bounce.data);
    assert!(
        text.contains("Final-Recipient: rfc822; carol@dest.test"),
        "{text}"
    );
    assert!(text.contains("Status: 5.6.3"), "{text}");
    assert!(bounce.data.iter().all(|&b| b < 0x80), "{text}");
}

/// The text of the one report (from the null sender) among `stored`.
fn bounce_text(stored: &[Stored]) -> String {
    let bounce = stored
        .iter()
        .find(|m| m.mail_from.is_empty() || m.mail_from == "<>")
        .expect("the bounce");
    String::from_utf8_lossy(&bounce.data).into_owned()
}

/// Sends `body` from a@origin.test to b@dest.test through `server`, declared
/// `BODY=BINARYMIME` (with `params` after it) in one `BDAT LAST`, and sees it taken.
fn send_binarymime(server: &Server, params: &str, body: &[u8]) {
    let (mut c, _) = hello(server);
    let mail = format!("MAIL FROM:<a@origin.test> BODY=BINARYMIME{params}");
    assert!(c.cmd(&mail).starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@dest.test>").starts_with("250"));
    c.send(format!("BDAT {} LAST\r\n", body.len()).as_bytes());
    c.send(body);
    assert!(c.line().starts_with("250 2.0.0"));
    c.cmd("QUIT");
}

#[test]
fn eight_bit_content_is_announced_and_utf8_header_fields_need_smtputf8() {
    // A next hop with 8BITMIME and without SMTPUTF8.
    let peer = Peer::start(&["--no-smtputf8"]);
    let server = routed_to(&peer, &[]);
    let send_raw = |helo: &str, mail: &str, message: &str| {
        let mut c = server.connect();
        c.line();
        c.send(format!("EHLO {helo}\r\n").as_bytes());
        c.reply();
        assert!(c.cmd(mail).starts_with("250"), "{mail}");
        assert!(c.cmd("RCPT TO:<bob@dest.test>").starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        c.send(format!("{message}.\r\n").as_bytes());
        assert!(c.line().starts_with("250 2.0.0"));
        c.cmd("QUIT");
    };
    // 8-bit content sent without BODY=8BITMIME: it goes on with BODY=8BITMIME (RFC 6152 3).
    send_raw(
        "c.test",
        "MAIL FROM:<alice@origin.test>",
        "Message-ID: <undeclared@t>\r\n\r\nGr\u{fc}\u{df}e\r\n",
    );
    // SMTPUTF8, ASCII addresses, a UTF-8 header field: an internationalized message, which
    // cannot go to this next hop (RFC 6531 3.2): bounced with 5.6.9, a UTF-8 header message
    // that cannot be transferred (5.6.7 is for addresses; registered by RFC 6531).
    send_raw(
        "c.test",
        "MAIL FROM:<alice@origin.test> SMTPUTF8",
        "Message-ID: <intl@t>\r\nSubject: Gr\u{fc}\u{df}e\r\n\r\nx\r\n",
    );
    // SMTPUTF8 and a UTF-8 EHLO name, but an ASCII message: delivered without SMTPUTF8,
    // and the Received field names the client by A-labels.
    send_raw(
        "b\u{fc}cher.test",
        "MAIL FROM:<alice@origin.test> SMTPUTF8",
        "Message-ID: <plain@t>\r\n\r\nx\r\n",
    );
    let stored = peer.wait_for("two messages and a bounce", Duration::from_secs(20), |s| {
        s.len() == 3
    });
    let by_id = |id: &str| stored.iter().find(|m| m.message_id == id);
    let undeclared = by_id("<undeclared@t>").expect("the undeclared 8-bit message");
    assert!(
        undeclared.mail_options.iter().any(|o| o == "BODY=8BITMIME"),
        "{:?}",
        undeclared.mail_options
    );
    assert!(by_id("<intl@t>").is_none(), "{stored:?}");
    let plain = by_id("<plain@t>").expect("the ASCII message");
    assert!(
        plain.data.is_ascii(),
        "{}",
        String::from_utf8_lossy(&plain.data)
    );
    assert!(String::from_utf8_lossy(&plain.data).contains("from xn--bcher-kva.test ("));
    let text = bounce_text(&stored);
    assert!(text.contains("Status: 5.6.9"), "{text}");
    assert!(text.contains("header fields"), "{text}");
    assert!(text.contains("<intl@t>"), "{text}");
}

#[test]
fn a_mailbox_given_with_u_labels_and_a_labels_goes_in_its_ascii_form() {
    // One mailbox, given first with U-labels and then with A-labels: one recipient, kept in
    // the form a next hop without SMTPUTF8 can take (RFC 6531 3.2), whichever came first.
    let peer = Peer::start(&["--no-smtputf8"]);
    let route = format!("xn--bcher-kva.test=127.0.0.1:{}", peer.port);
    let server = Server::start(&["--route", &route]);
    send_commands(
        &server,
        &[
            "MAIL FROM:<alice@origin.test> SMTPUTF8",
            "RCPT TO:<u@b\u{fc}cher.test>",
            "RCPT TO:<u@xn--bcher-kva.test>",
        ],
        "<labels@t>",
    );
    let (got, _) = peer.first("the message");
    assert_eq!(got.message_id, "<labels@t>");
    assert_eq!(got.rcpt_tos, ["u@xn--bcher-kva.test"]);
}

#[test]
fn a_utf8_domain_alone_does_not_make_the_message_need_smtputf8() {
    // The one recipient's domain is in U-labels, its local part ASCII, and the header
    // section ASCII: the message goes to a next hop without SMTPUTF8 with the domain in
    // A-labels (RFC 6531 3.2), and the Received header postern adds names it so too (a
    // UTF-8 `for` clause would make the message need SMTPUTF8 and bounce it with 5.6.7).
    let peer = Peer::start(&["--no-smtputf8"]);
    let route = format!("xn--bcher-kva.test=127.0.0.1:{}", peer.port);
    let server = Server::start(&["--route", &route]);
    send_commands(
        &server,
        &[
            "MAIL FROM:<alice@origin.test> SMTPUTF8",
            "RCPT TO:<u@b\u{fc}cher.test>",
        ],
        "<idn@t>",
    );
    let (got, text) = peer.first("the message");
    assert_eq!(got.message_id, "<idn@t>");
    assert_eq!(got.rcpt_tos, ["u@xn--bcher-kva.test"]);
    assert!(text.contains("\tfor <u@xn--bcher-kva.test>;"), "{text}");
}

#[test]
fn a_sender_whose_only_utf8_is_its_domain_goes_in_a_labels() {
    // The reverse path's domain in U-labels, the rest ASCII: the next hop without SMTPUTF8
    // gets MAIL FROM with the domain in A-labels (RFC 6531 3.2), not a bounce.
    let peer = Peer::start(&["--no-smtputf8"]);
    let route = format!("dest.test=127.0.0.1:{}", peer.port);
    let server = Server::start(&["--route", &route]);
    send_commands(
        &server,
        &[
            "MAIL FROM:<alice@b\u{fc}cher.test> SMTPUTF8",
            "RCPT TO:<bob@dest.test>",
        ],
        "<from-idn@t>",
    );
    let (got, _) = peer.first("the message");
    assert_eq!(got.message_id, "<from-idn@t>");
    assert_eq!(got.mail_from, "alice@xn--bcher-kva.test");
    assert_eq!(got.rcpt_tos, ["bob@dest.test"]);
}

#[test]
fn utf8_addresses_fail_with_5_6_7_and_the_others_with_5_6_9_when_the_headers_are_utf8() {
    // A next hop without SMTPUTF8; a UTF-8 header field, one ASCII and one UTF-8 recipient:
    // neither can go. The UTF-8 address is the reason for its recipient (5.6.7), the header
    // section for the other (5.6.9); before, both got 5.6.9.
    let peer = Peer::start(&["--no-smtputf8"]);
    let server = routed_to(&peer, &[]);
    let mut c = server.connect();
    c.line();
    c.send(b"EHLO c.test\r\n");
    c.reply();
    assert!(c
        .cmd("MAIL FROM:<alice@origin.test> SMTPUTF8")
        .starts_with("250"));
    assert!(c.cmd("RCPT TO:<bob@dest.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<j\u{f6}rg@dest.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send("Message-ID: <both@t>\r\nSubject: Gr\u{fc}\u{df}e\r\n\r\nx\r\n.\r\n".as_bytes());
    assert!(c.line().starts_with("250 2.0.0"));
    c.cmd("QUIT");
    let stored = peer.wait_for("the bounces", Duration::from_secs(20), |s| {
        s.iter()
            .filter(|m| m.mail_from.is_empty() || m.mail_from == "<>")
            .count()
            >= 1
            && s.iter()
                .filter(|m| m.mail_from.is_empty() || m.mail_from == "<>")
                .map(|m| {
                    String::from_utf8_lossy(&m.data)
                        .matches("Final-Recipient:")
                        .count()
                })
                .sum::<usize>()
                == 2
    });
    assert!(
        stored.iter().all(|m| m.message_id != "<both@t>"),
        "{stored:?}"
    );
    // The status that follows each recipient's Final-Recipient field.
    let reports: String = stored
        .iter()
        .filter(|m| m.mail_from.is_empty() || m.mail_from == "<>")
        .map(|m| String::from_utf8_lossy(&m.data).into_owned())
        .collect();
    let status_of = |rcpt: &str| {
        let at = reports
            .find(&format!("Final-Recipient: {rcpt}"))
            .unwrap_or_else(|| panic!("{reports}"));
        let rest = &reports[at..];
        let s = rest.find("Status: ").unwrap() + "Status: ".len();
        rest[s..s + 5].to_owned()
    };
    assert_eq!(status_of("rfc822; bob@dest.test"), "5.6.9");
    assert_eq!(status_of("utf-8; j\\x{F6}rg@dest.test"), "5.6.7");
}

#[test]
fn only_the_utf8_recipients_fail_at_a_next_hop_without_smtputf8() {
    // A next hop without SMTPUTF8; an ASCII sender and header section, one ASCII and one
    // UTF-8 recipient there: the ASCII one gets the message (without SMTPUTF8), the UTF-8
    // one is bounced with 5.6.7 (RFC 6531 3.2).
    let peer = Peer::start(&["--no-smtputf8"]);
    let server = routed_to(&peer, &[]);
    send_commands(
        &server,
        &[
            "MAIL FROM:<alice@origin.test> SMTPUTF8",
            "RCPT TO:<bob@dest.test>",
            "RCPT TO:<j\u{f6}rg@dest.test>",
        ],
        "<split@t>",
    );
    let stored = peer.wait_for("the message and a bounce", Duration::from_secs(20), |s| {
        s.len() == 2
    });
    let got = stored
        .iter()
        .find(|m| m.message_id == "<split@t>")
        .expect("the message for the ASCII recipient");
    assert_eq!(got.rcpt_tos, ["bob@dest.test"]);
    assert!(
        !got.mail_options.iter().any(|o| o == "SMTPUTF8"),
        "{:?}",
        got.mail_options
    );
    let text = bounce_text(&stored);
    assert!(text.contains("Status: 5.6.7"), "{text}");
    assert!(text.contains("rg@dest.test"), "{text}");
    assert!(!text.contains("bob@dest.test"), "{text}");
}

#[test]
fn a_binarymime_message_bounced_with_ret_full_returns_only_its_headers() {
    // The aiosmtpd next hop offers no BINARYMIME, so the message fails there (5.6.3).
    let peer = Peer::start(&[]);
    let server = routed_to(&peer, &[]);
    let mut body = b"Subject: binary\r\nMessage-ID: <bin@t>\r\n\r\n".to_vec();
    body.extend((0u8..=255).cycle().take(3000));
    send_binarymime(&server, " RET=FULL", &body);
    let (bounce, text) = peer.first("the bounce");
    assert_eq!(bounce.mail_from, "<>");
    assert!(text.contains("Status: 5.6.3"), "{text}");
    assert!(text.contains("text/rfc822-headers"), "{text}");
    assert!(text.contains("Message-ID: <bin@t>"), "{text}");
    assert!(
        !bounce.data.contains(&0u8),
        "binary content came back in the report"
    );
}

#[test]
fn a_binarymime_message_that_is_text_goes_to_a_next_hop_without_binarymime_unchanged() {
    // The aiosmtpd next hop offers 8BITMIME, not CHUNKING or BINARYMIME: the body, declared
    // BINARYMIME but made of CRLF lines (8-bit, one line starting with a dot), goes by DATA
    // as 8BITMIME and arrives byte for byte.
    let peer = Peer::start(&[]);
    let server = routed_to(&peer, &[]);
    let body = "Subject: caf\u{e9}\r\nMessage-ID: <bintext@t>\r\n\r\n.leading dot\r\n\
                cr\u{e8}me\r\n.\r\nlast\r\n"
        .as_bytes();
    send_binarymime(&server, "", body);
    let (got, _) = peer.first("the message");
    assert!(
        got.data.ends_with(body),
        "{:?}",
        String::from_utf8_lossy(&got.data)
    );
    assert!(got.data.starts_with(b"Received: "));
    assert!(
        got.mail_options.iter().any(|o| o == "BODY=8BITMIME")
            && !got.mail_options.iter().any(|o| o.contains("BINARYMIME")),
        "{:?}",
        got.mail_options
    );
}

#[test]
fn a_binarymime_message_that_is_text_but_for_long_lines_is_made_to_fit_a_next_hop_without_it() {
    // What a server upstream (postern among them) declares BINARYMIME when a body came to it
    // as text with a line over 998 octets (or a NUL), and its next hop takes BINARYMIME: to
    // the aiosmtpd next hop (neither CHUNKING nor BINARYMIME) it goes as text, its long line
    // broken, its last line ended and its NUL as it came, as it would have gone had it come
    // here as text. Refused with 5.6.3, such mail was returned one hop later than where it
    // came in.
    let peer = Peer::start(&[]);
    let server = routed_to(&peer, &[]);
    let long = "w".repeat(1500);
    let body =
        format!("Subject: long\r\nMessage-ID: <binlong@t>\r\n\r\n{long}\r\nbefore\0after\r\nend");
    send_binarymime(&server, "", body.as_bytes());
    let (got, _) = peer.first("the message");
    let data = String::from_utf8(got.data.clone()).unwrap();
    assert!(
        data.ends_with(&format!(
            "\r\n\r\n{}\r\n {}\r\nbefore\0after\r\nend\r\n",
            "w".repeat(998),
            "w".repeat(502)
        )),
        "{data:?}"
    );
    assert!(
        !got.mail_options.iter().any(|o| o.contains("BINARYMIME")),
        "{:?}",
        got.mail_options
    );
}

#[test]
fn a_binarymime_message_with_a_part_labelled_binary_is_not_made_to_fit() {
    // Long lines in a part labelled `Content-Transfer-Encoding: binary` are the part's
    // octets, which breaking them would change: still 5.6.3 for a next hop without
    // BINARYMIME (RFC 3030 3 lets a server return such mail), not mangled.
    let peer = Peer::start(&[]);
    let server = routed_to(&peer, &[]);
    let body = format!(
        "Subject: bin\r\nMessage-ID: <binpart@t>\r\nMIME-Version: 1.0\r\n\
         Content-Transfer-Encoding: binary\r\n\r\n{}\r\n",
        "w".repeat(1500)
    );
    send_binarymime(&server, " RET=FULL", body.as_bytes());
    let (bounce, text) = peer.first("the bounce");
    assert_eq!(bounce.mail_from, "<>");
    assert!(text.contains("Status: 5.6.3"), "{text}");
    // Nor does it come back whole: its header section only, and the report says why.
    assert!(text.contains("text/rfc822-headers"), "{text}");
    assert!(text.contains("came as binary MIME"), "{text}");
}

#[test]
fn a_binarymime_message_that_is_text_comes_back_whole_when_asked_for() {
    // A text body without a line end after its last line, which a server upstream sends
    // declared BINARYMIME (its next hop took that): returned whole with RET=FULL, as it is
    // when it comes as text, not cut to its header section for the declaration alone.
    let peer = Peer::start(&["--reject-rcpt", "b@dest"]);
    let server = routed_to(&peer, &[]);
    let body = "Subject: whole\r\nMessage-ID: <binwhole@t>\r\n\r\nfirst line\r\nno line end";
    send_binarymime(&server, " RET=FULL", body.as_bytes());
    let (bounce, text) = peer.first("the bounce");
    assert_eq!(bounce.mail_from, "<>");
    assert!(text.contains("Status: 5.1.1"), "{text}");
    assert!(text.contains("Content-Type: message/rfc822"), "{text}");
    assert!(text.contains("\r\nfirst line\r\nno line end\r\n"), "{text}");
}

#[test]
fn a_bounce_of_8bit_header_fields_reaches_a_sender_whose_next_hop_lacks_8bitmime() {
    let (_dest, origin, server) = refusing_next_hop_and_sender_s(&["--no-8bitmime"]);
    let (mut c, _) = hello(&server);
    assert!(c
        .cmd("MAIL FROM:<a@origin.test> BODY=8BITMIME")
        .starts_with("250"));
    assert!(c.cmd("RCPT TO:<nobody@dest.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send("Subject: caf\u{e9} cr\u{e8}me\r\nMessage-ID: <8bit@t>\r\n\r\nbody\r\n.\r\n".as_bytes());
    assert!(c.line().starts_with("250 2.0.0"));
    c.cmd("QUIT");
    let (bounce, text) = origin.first("the bounce, through a next hop without 8BITMIME");
    assert_eq!(bounce.mail_from, "<>");
    assert!(
        bounce.data.iter().all(|&b| b < 0x80),
        "the report is not 7-bit: {text}"
    );
    assert!(
        text.contains("Final-Recipient: rfc822; nobody@dest.test"),
        "{text}"
    );
    assert!(text.contains("message/global-headers"), "{text}");
    // The header section comes back encoded, and whole.
    assert!(
        text.contains("Content-Transfer-Encoding: quoted-printable"),
        "{text}"
    );
    assert!(text.contains("Subject: caf=C3=A9 cr=C3=A8me"), "{text}");
}

#[test]
fn a_full_8bit_return_comes_back_as_headers_to_a_sender_whose_next_hop_lacks_8bitmime() {
    let dest = Peer::start(&["--reject-rcpt", "nobody"]);
    let plain = Peer::start(&["--no-8bitmime"]);
    let eight = Peer::start(&[]);
    let to_dest = format!("dest.test=127.0.0.1:{}", dest.port);
    let to_plain = format!("plain.test=127.0.0.1:{}", plain.port);
    let to_eight = format!("eight.test=127.0.0.1:{}", eight.port);
    let server = Server::start(&[
        "--route", &to_dest, "--route", &to_plain, "--route", &to_eight,
    ]);
    for sender in ["a@plain.test", "a@eight.test"] {
        let (mut c, _) = hello(&server);
        let mail = format!("MAIL FROM:<{sender}> BODY=8BITMIME RET=FULL");
        assert!(c.cmd(&mail).starts_with("250"));
        assert!(c.cmd("RCPT TO:<nobody@dest.test>").starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        c.send(
            "Subject: full\r\nMessage-ID: <full8@t>\r\n\r\nbody with caf\u{e9}\r\n.\r\n".as_bytes(),
        );
        assert!(c.line().starts_with("250 2.0.0"));
        c.cmd("QUIT");
    }
    // Through a next hop with 8BITMIME the whole message comes back, 8-bit.
    let (_, whole) = eight.first("the bounce with the whole message");
    assert!(whole.contains("Content-Type: message/rfc822"), "{whole}");
    assert!(whole.contains("body with caf\u{e9}"), "{whole}");
    assert!(
        whole.contains("a copy of the message are attached"),
        "{whole}"
    );
    // Through one without, the report still comes, 7-bit, with the header section.
    let (bounce, text) = plain.first("the bounce, through a next hop without 8BITMIME");
    assert_eq!(bounce.mail_from, "<>");
    assert!(bounce.data.iter().all(|&b| b < 0x80), "not 7-bit: {text}");
    assert!(text.contains("Content-Type: text/rfc822-headers"), "{text}");
    assert!(text.contains("Message-ID: <full8@t>"), "{text}");
    assert!(!text.contains("body with"), "{text}");
    assert!(
        text.contains("the headers of the message are attached"),
        "{text}"
    );
    assert!(
        text.contains("Final-Recipient: rfc822; nobody@dest.test"),
        "{text}"
    );
}

#[test]
fn a_body_that_came_as_text_but_is_not_goes_as_binarymime_where_the_next_hop_takes_it() {
    // A line of 3,000 octets and a NUL, sent by DATA with no BODY: neither 7BIT nor
    // 8BITMIME may carry them (RFC 5321 4.5.3.1.6, RFC 6152 3). A next hop with CHUNKING and
    // BINARYMIME gets the body declared BINARYMIME, unchanged; a plain text message to the
    // same next hop goes without it.
    let (mail_tx, mail_rx) = std::sync::mpsc::channel::<String>();
    let mail_tx = std::sync::Mutex::new(mail_tx);
    let (port, stored, _) = scripted_next_hop(
        move |_, line| {
            if line.starts_with("EHLO") {
                Some(Act::Say(
                    "250-scripted.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-8BITMIME\r\n\
                     250 BINARYMIME\r\n",
                ))
            } else {
                if line.starts_with("MAIL") {
                    let _ = mail_tx.lock().unwrap().send(line.trim_end().to_owned());
                }
                None
            }
        },
        Act::Say("250 2.0.0 stored\r\n"),
    );
    let server = routed_apart(port, port, &[]);
    let long = "x".repeat(3000);
    let body = format!("{long}\r\nbefore\0after\r\n");
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<long@t>",
        &body,
    );
    let mail = mail_rx.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(mail.contains(" BODY=BINARYMIME"), "{mail}");
    let (_, data) = stored.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(
        data.ends_with(&format!("Message-ID: <long@t>\r\n\r\n{body}")),
        "{data:?}"
    );
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<short@t>",
        "short lines\r\n",
    );
    let mail = mail_rx.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(!mail.contains("BODY="), "{mail}");
    let (_, data) = stored.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(data.ends_with("\r\n\r\nshort lines\r\n"), "{data:?}");
}

#[test]
fn long_lines_are_broken_for_a_next_hop_without_binarymime() {
    // The aiosmtpd next hop offers neither CHUNKING nor BINARYMIME: a line of 3,000 octets
    // goes as lines of at most 998, each after the first begun with a space (RFC 5321
    // 4.5.3.1.6), the text otherwise as it was.
    let peer = Peer::start(&[]);
    let server = routed_to(&peer, &[]);
    let long = "w".repeat(3000);
    send(
        &server,
        "a@origin.test",
        &["b@dest.test"],
        "<fold@t>",
        &format!("{long}\r\nafter\r\n"),
    );
    let (got, _) = peer.first("the message");
    let data = String::from_utf8(got.data.clone()).unwrap();
    assert!(data.split("\r\n").all(|l| l.len() <= 998), "{data:?}");
    assert!(
        data.ends_with(&format!(
            "\r\n\r\n{}\r\n {}\r\n {}\r\n {}\r\nafter\r\n",
            "w".repeat(998),
            "w".repeat(997),
            "w".repeat(997),
            "w".repeat(8)
        )),
        "{data:?}"
    );
}

#[test]
fn a_long_header_field_is_folded_at_its_blanks_for_a_next_hop_without_binarymime() {
    // A References field of 60 message IDs (about 3,000 octets on one line), to the aiosmtpd
    // next hop (neither CHUNKING nor BINARYMIME): folded before blanks that were there
    // (RFC 5322 2.2.3), so that every ID arrives whole and unfolding gives the field back.
    let peer = Peer::start(&[]);
    let server = routed_to(&peer, &[]);
    let ids: String = (0..60)
        .map(|i| format!(" <message-{i:04}-with-a-long-id@lists.example.org>"))
        .collect();
    let (mut c, _) = hello(&server);
    assert!(c.cmd("MAIL FROM:<a@origin.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@dest.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(format!("References:{ids}\r\nSubject: folded\r\n\r\nbody\r\n.\r\n").as_bytes());
    assert!(c.line().starts_with("250 2.0.0"));
    c.cmd("QUIT");
    let (got, _) = peer.first("the message");
    let data = String::from_utf8(got.data.clone()).unwrap();
    assert!(data.split("\r\n").all(|l| l.len() <= 998), "{data:?}");
    let references = data
        .split("\r\nReferences:")
        .nth(1)
        .and_then(|rest| rest.split("\r\nSubject:").next())
        .unwrap_or_else(|| panic!("{data:?}"));
    assert!(references.contains("\r\n "), "not folded: {references:?}");
    assert_eq!(references.replace("\r\n ", " "), ids);
}

#[test]
fn a_bdat_body_whose_last_line_has_no_line_end_gets_one_for_a_next_hop_without_binarymime() {
    // BDAT lets a client end a message without CR LF; a next hop with CHUNKING but without
    // BINARYMIME takes text only, whose lines all end in CR LF (RFC 5322 2.1, RFC 3030 3).
    let (port, stored, _) = scripted_next_hop(
        |_, line| {
            line.starts_with("EHLO").then_some(Act::Say(
                "250-scripted.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 8BITMIME\r\n",
            ))
        },
        Act::Say("250 2.0.0 stored\r\n"),
    );
    let server = routed_apart(port, port, &[]);
    let (mut c, _) = hello(&server);
    assert!(c.cmd("MAIL FROM:<a@origin.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@dest.test>").starts_with("250"));
    let message = "Subject: unended\r\n\r\nthe last line";
    c.send(format!("BDAT {} LAST\r\n{message}", message.len()).as_bytes());
    assert!(c.line().starts_with("250 2.0.0"));
    c.cmd("QUIT");
    let (_, data) = stored.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(
        data.ends_with("Subject: unended\r\n\r\nthe last line\r\n"),
        "{data:?}"
    );
}
