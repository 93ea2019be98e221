//! Server transcripts: client bytes in, exact reply lines out, every one also split at every
//! byte offset. Covers the command sequences of RFC 5321 4.3.2 and the extensions.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;

use postern_proto::server::OUTPUT_HIGH_WATER;
use postern_proto::{BareNewlinePolicy, ServerConfig};
use support::{client, config, run, run_every_split, server};

const BANNER: &str = "220 mx.test ESMTP postern";
const EHLO: [&str; 9] = [
    "250-mx.test Hello client.test",
    "250-PIPELINING",
    "250-SIZE 10000",
    "250-ENHANCEDSTATUSCODES",
    "250-8BITMIME",
    "250-BINARYMIME",
    "250-CHUNKING",
    "250-SMTPUTF8",
    "250 DSN",
];

/// Asserts that the session's replies are exactly `lines`.
fn assert_transcript(o: &support::Outcome, lines: &[&str]) {
    assert_eq!(o.output, server(lines));
}

/// Asserts that the session's replies end with `lines`.
fn assert_tail(o: &support::Outcome, lines: &[&str]) {
    assert!(o.output.ends_with(&server(lines)), "{}", o.output);
}

fn with_banner_and_ehlo(rest: &[&str]) -> String {
    let mut lines = vec![BANNER];
    lines.extend_from_slice(&EHLO);
    lines.extend_from_slice(rest);
    server(&lines)
}

#[test]
fn replies_to_a_long_pipelined_run_are_flushed_in_bounded_pieces() {
    // 2,000 EHLOs in one read: some 340 KiB of replies, from 16 KiB of commands (past the
    // junk command limit, lifted here: this is about the output's pieces).
    let mut input = b"EHLO client.test\r\n".repeat(2000);
    input.extend_from_slice(b"QUIT\r\n");
    let config = Arc::new(ServerConfig {
        max_junk_commands: u32::MAX,
        ..(*support::config()).clone()
    });
    let o = support::run(&config, false, &input, &[]);
    let one = EHLO.iter().map(|l| l.len() + 2).sum::<usize>();
    assert_eq!(o.output.matches(EHLO[0]).count(), 2000);
    assert!(o.output.ends_with("221 2.0.0 mx.test Bye\r\n"));
    assert!(
        o.flushed.len() >= 2000 * one / (OUTPUT_HIGH_WATER + one),
        "{:?}",
        o.flushed
    );
    for &n in &o.flushed {
        assert!(
            (OUTPUT_HIGH_WATER..OUTPUT_HIGH_WATER + one).contains(&n),
            "{n}"
        );
    }
    // The same whole output however the input is cut.
    let cuts: Vec<usize> = (7..input.len()).step_by(4099).collect();
    assert_eq!(support::run(&config, false, &input, &cuts).output, o.output);
}

#[test]
fn pipelined_data_transaction() {
    let input = client(&[
        "EHLO client.test",
        "MAIL FROM:<alice@client.test>",
        "RCPT TO:<bob@mx.test>",
        "RCPT TO:<carol@mx.test>",
        "DATA",
        "Subject: hi",
        "",
        "..dot line",
        ".",
        "QUIT",
    ]);
    let o = run_every_split(&config(), &input);
    assert_eq!(
        o.output,
        with_banner_and_ehlo(&[
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "250 2.1.5 Ok",
            "354 End data with <CR><LF>.<CR><LF>",
            "250 2.0.0 Ok: queued as Q1",
            "221 2.0.0 mx.test Bye",
        ])
    );
    assert_eq!(o.messages.len(), 1);
    let (from, rcpts, body) = &o.messages[0];
    assert_eq!(from, "alice@client.test");
    assert_eq!(rcpts, &["bob@mx.test", "carol@mx.test"]);
    assert_eq!(body, b"Subject: hi\r\n\r\n.dot line\r\n");
    assert!(o.closed);
}

#[test]
fn bdat_transaction_in_chunks() {
    let mut input = client(&[
        "EHLO client.test",
        "MAIL FROM:<> BODY=BINARYMIME",
        "RCPT TO:<bob@mx.test>",
    ]);
    input.extend_from_slice(b"BDAT 7\r\nab\r\n.\r\nBDAT 3 LAST\r\n\0\xff\nNOOP\r\n");
    let o = run_every_split(&config(), &input);
    assert_eq!(
        o.output,
        with_banner_and_ehlo(&[
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "250 2.0.0 7 octets received",
            "250 2.0.0 Ok: queued as Q1",
            "250 2.0.0 Ok",
        ])
    );
    assert_eq!(o.messages[0].2, b"ab\r\n.\r\n\0\xff\n");
    assert_eq!(o.messages[0].0, "");
}

#[test]
fn bdat_zero_last_ends_the_message() {
    let mut input = client(&[
        "EHLO client.test",
        "MAIL FROM:<a@b.test>",
        "RCPT TO:<c@mx.test>",
    ]);
    input.extend_from_slice(b"BDAT 2\r\nhiBDAT 0 LAST\r\n");
    let o = run_every_split(&config(), &input);
    assert_tail(
        &o,
        &["250 2.0.0 2 octets received", "250 2.0.0 Ok: queued as Q1"],
    );
    assert_eq!(o.messages[0].2, b"hi");
}

#[test]
fn several_transactions_per_connection() {
    let input = client(&[
        "EHLO client.test",
        "MAIL FROM:<a@b.test>",
        "RCPT TO:<c@mx.test>",
        "DATA",
        "one",
        ".",
        "MAIL FROM:<d@b.test>",
        "RCPT TO:<e@mx.test>",
        "DATA",
        "two",
        ".",
    ]);
    let o = run_every_split(&config(), &input);
    assert_eq!(o.messages.len(), 2);
    assert_eq!(o.messages[1].2, b"two\r\n");
    assert!(o.output.contains("queued as Q2"));
}

#[test]
fn sequencing_errors() {
    let input = client(&[
        "MAIL FROM:<a@b.test>",
        "EHLO client.test",
        "RCPT TO:<c@mx.test>",
        "DATA",
        "MAIL FROM:<a@b.test>",
        "DATA",
        "MAIL FROM:<a@b.test>",
        "RSET",
        "DATA",
    ]);
    let o = run_every_split(&config(), &input);
    assert_transcript(
        &o,
        &[
            BANNER,
            "503 5.5.1 Send HELO or EHLO first",
            EHLO[0],
            EHLO[1],
            EHLO[2],
            EHLO[3],
            EHLO[4],
            EHLO[5],
            EHLO[6],
            EHLO[7],
            EHLO[8],
            "503 5.5.1 Need MAIL command",
            "503 5.5.1 Need MAIL command",
            "250 2.1.0 Ok",
            "503 5.5.1 Need RCPT command",
            "503 5.5.1 Nested MAIL command",
            "250 2.0.0 Ok",
            "503 5.5.1 Need MAIL command",
        ],
    );
}

/// Without a greeting asked for, MAIL and RCPT take their parameters alike before one; after
/// HELO neither does.
#[test]
fn without_a_greeting_required_parameters_are_taken_at_mail_and_rcpt_alike() {
    let config = Arc::new(ServerConfig {
        require_helo: false,
        ..(*config()).clone()
    });
    let input = client(&[
        "MAIL FROM:<a@b.test> SIZE=10",
        "RCPT TO:<c@mx.test> NOTIFY=NEVER",
        "HELO client.test",
        "MAIL FROM:<a@b.test>",
        "RCPT TO:<c@mx.test> NOTIFY=NEVER",
    ]);
    let o = run_every_split(&config, &input);
    assert_transcript(
        &o,
        &[
            BANNER,
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "250 mx.test Hello client.test",
            "250 2.1.0 Ok",
            "555 5.5.4 Parameters not allowed after HELO",
        ],
    );
}

#[test]
fn relay_refusal_then_no_valid_recipients() {
    let input = client(&[
        "EHLO client.test",
        "MAIL FROM:<a@b.test>",
        "RCPT TO:<x@denied.example>",
        "DATA",
        "QUIT",
    ]);
    let o = run_every_split(&config(), &input);
    assert_tail(
        &o,
        &[
            "250 2.1.0 Ok",
            "554 5.7.1 Relay access denied",
            "554 5.5.1 No valid recipients",
            "221 2.0.0 mx.test Bye",
        ],
    );
    assert!(o.messages.is_empty());
}

#[test]
fn helo_session_and_misc_commands() {
    let input = client(&[
        "HELO client.test",
        "NOOP",
        "NOOP anything at all",
        "VRFY bob",
        "EXPN staff",
        "HELP",
        "SEND FROM:<a@b>",
        "TURN",
        "AUTH PLAIN AGFAYg==",
        "AUTH",
        "auth PLAIN a b",
        "STARTTLS",
        "MAIL FROM:<a@b.test> SIZE=10",
        "MAIL FROM:<a@b.test>",
        "QUIT",
    ]);
    let o = run_every_split(&config(), &input);
    assert_transcript(
        &o,
        &[
            BANNER,
            "250 mx.test Hello client.test",
            "250 2.0.0 Ok",
            "250 2.0.0 Ok",
            "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery",
            "252 2.5.0 Cannot expand list, but will accept message and attempt delivery",
            "214 2.0.0 See RFC 5321; commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY EXPN HELP",
            "502 5.5.1 Command not implemented",
            "502 5.5.1 Command not implemented",
            "502 5.5.1 Authentication not enabled",
            "502 5.5.1 Authentication not enabled",
            "502 5.5.1 Authentication not enabled",
            "502 5.5.1 STARTTLS not available",
            "555 5.5.4 Parameters not allowed after HELO",
            "250 2.1.0 Ok",
            "221 2.0.0 mx.test Bye",
        ],
    );
}

#[test]
fn size_limits() {
    let big = "x".repeat(998);
    let mut lines = vec![
        "EHLO client.test",
        "MAIL FROM:<a@b.test> SIZE=10001",
        "MAIL FROM:<a@b.test> SIZE=100",
        "RCPT TO:<c@mx.test>",
        "DATA",
    ];
    lines.extend(std::iter::repeat_n(big.as_str(), 11));
    lines.extend([".", "NOOP"]);
    let input = client(&lines);
    let o = run(&config(), false, &input, &[]);
    assert_tail(
        &o,
        &[
            "552 5.3.4 Message size exceeds fixed maximum message size",
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "354 End data with <CR><LF>.<CR><LF>",
            "552 5.3.4 Message size exceeds fixed maximum message size",
            "250 2.0.0 Ok",
        ],
    );
    assert!(o.messages.is_empty());
    assert_eq!(o.aborted, 1);
}

#[test]
fn a_body_refused_before_its_end_is_dropped_at_once_not_at_its_end() {
    // The embedding drops what it stored of a body as soon as it is refused (over the size
    // limit, a bare line end): a client taking its time over the rest, which is read and
    // thrown away, would otherwise keep it (and the spool segment it is in) until the end.
    let big = "x".repeat(998);
    let mut lines = vec![
        "EHLO client.test",
        "MAIL FROM:<a@b.test>",
        "RCPT TO:<c@mx.test>",
        "DATA",
    ];
    lines.extend(std::iter::repeat_n(big.as_str(), 11));
    let over = client(&lines);
    let mut bare = client(&lines[..4]);
    bare.extend_from_slice(b"one\ntwo\r\n");
    let mut chunked = client(&lines[..3]);
    chunked.extend_from_slice(b"BDAT 5000\r\n");
    chunked.extend(std::iter::repeat_n(b'c', 5000));
    chunked.extend_from_slice(b"BDAT 6000 LAST\r\n");
    let mut declared = client(&lines[..3]);
    declared.extend_from_slice(b"BDAT 100\r\n");
    declared.extend(std::iter::repeat_n(b'd', 100));
    declared.extend_from_slice(b"BDAT 20000 LAST\r\nddd");
    let mut repaired = client(&lines[..3]);
    repaired.extend_from_slice(b"BDAT 9990\r\n");
    repaired.extend(std::iter::repeat_n(b'\n', 9990));
    let reject_bare = Arc::new(ServerConfig {
        bare_newline: postern_proto::BareNewlinePolicy::Reject,
        ..(*config()).clone()
    });
    for (what, cfg, input) in [
        ("DATA over the limit", config(), over),
        ("a bare line end", reject_bare, bare),
        ("chunks over the limit", config(), chunked),
        ("a chunk declared over the limit", config(), declared),
        ("line ends repaired over the limit", config(), repaired),
    ] {
        let o = run(&cfg, false, &input, &[]);
        assert_eq!((o.starts, o.aborted), (1, 1), "{what}: {}", o.output);
        assert!(o.messages.is_empty(), "{what}");
    }
}

/// A transaction whose one chunk, `BDAT 20000 LAST`, is over the size limit, sent whole.
fn oversized_last_chunk() -> Vec<u8> {
    let mut input = client(&[
        "EHLO client.test",
        "MAIL FROM:<a@b.test>",
        "RCPT TO:<c@mx.test>",
    ]);
    input.extend_from_slice(b"BDAT 20000 LAST\r\n");
    input.extend(std::iter::repeat_n(b'R', 20000));
    input
}

#[test]
fn oversized_bdat_chunk_is_consumed_and_refused() {
    let mut input = oversized_last_chunk();
    input.extend_from_slice(b"NOOP\r\n");
    let o = run(&config(), false, &input, &[]);
    assert_tail(
        &o,
        &[
            "552 5.3.4 Message size exceeds fixed maximum message size",
            "250 2.0.0 Ok",
        ],
    );
    assert!(o.messages.is_empty());
}

#[test]
fn a_chunk_after_a_refused_last_one_is_out_of_sequence() {
    // RFC 3030 2: a BDAT after the LAST one is answered 503. The refusal of the LAST chunk
    // is not repeated for it, as it is for the chunks pipelined behind a refused middle one.
    let mut input = oversized_last_chunk();
    input.extend_from_slice(b"BDAT 5 LAST\r\nhelloBDAT 0 LAST\r\nNOOP\r\n");
    let o = run_every_split(&config(), &input);
    assert_tail(
        &o,
        &[
            "552 5.3.4 Message size exceeds fixed maximum message size",
            "503 5.5.1 Need MAIL command",
            "503 5.5.1 Need MAIL command",
            "250 2.0.0 Ok",
        ],
    );
    assert!(o.messages.is_empty());
    assert!(!o.closed, "{}", o.output);
}

#[test]
fn bdat_without_transaction_is_consumed_and_refused() {
    let mut input = client(&["EHLO client.test"]);
    input.extend_from_slice(b"BDAT 12 LAST\r\nRSET\r\nQUIT\r\nNOOP\r\n");
    let o = run_every_split(&config(), &input);
    assert!(o
        .output
        .ends_with(&server(&["503 5.5.1 Need MAIL command", "250 2.0.0 Ok"])));
    assert!(!o.closed);
}

#[test]
fn data_after_bdat_and_binarymime_with_data() {
    let mut input = client(&[
        "EHLO client.test",
        "MAIL FROM:<a@b.test>",
        "RCPT TO:<c@mx.test>",
    ]);
    input.extend_from_slice(b"BDAT 1\r\nxDATA\r\nRSET\r\n");
    input.extend(client(&[
        "MAIL FROM:<a@b.test> BODY=BINARYMIME",
        "RCPT TO:<c@mx.test>",
        "DATA",
    ]));
    let o = run_every_split(&config(), &input);
    assert_tail(
        &o,
        &[
            "250 2.0.0 1 octets received",
            "503 5.5.1 DATA not allowed after BDAT",
            "250 2.0.0 Ok",
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "503 5.5.1 BINARYMIME requires BDAT",
        ],
    );
    assert_eq!(o.aborted, 1, "RSET abandons the open BDAT body");
}

#[test]
fn bad_bdat_size_closes_the_connection() {
    let mut input = client(&[
        "EHLO client.test",
        "MAIL FROM:<a@b.test>",
        "RCPT TO:<c@mx.test>",
    ]);
    input.extend_from_slice(b"BDAT 12x\r\nMAIL FROM:<evil@x.test>\r\n");
    let o = run_every_split(&config(), &input);
    assert_tail(
        &o,
        &[
            "501 5.5.4 Syntax: BDAT size [LAST]",
            "421 4.5.0 mx.test Cannot follow BDAT framing, closing connection",
        ],
    );
    assert!(o.closed);
}

/// A BDAT line whose size was read but whose other words are wrong: the chunk is read and
/// thrown away (never run as commands), refused with 501 at its end, and its transaction
/// fails (the chunk before it is dropped); the session stays in step and goes on.
#[test]
fn a_bdat_line_with_a_size_and_wrong_words_has_its_chunk_thrown_away() {
    for bad in ["BDAT 6 LASTX", "BDAT 6 LAST LAST", "bdat 6 foo"] {
        let mut input = client(&[
            "EHLO client.test",
            "MAIL FROM:<a@b.test>",
            "RCPT TO:<c@mx.test>",
        ]);
        input.extend_from_slice(b"BDAT 3\r\nabc");
        // The chunk would be a command, read as one.
        input.extend_from_slice(format!("{bad}\r\nNOOP\r\n").as_bytes());
        input.extend_from_slice(b"BDAT 2 LAST\r\nzz");
        input.extend_from_slice(&client(&["MAIL FROM:<a@b.test>", "RCPT TO:<c@mx.test>"]));
        input.extend_from_slice(b"BDAT 2 LAST\r\nok");
        let o = run_every_split(&config(), &input);
        assert_tail(
            &o,
            &[
                "250 2.0.0 3 octets received",
                "501 5.5.4 Syntax: BDAT size [LAST]",
                // A chunk pipelined behind the refused one: refused alike.
                "501 5.5.4 Syntax: BDAT size [LAST]",
                "250 2.1.0 Ok",
                "250 2.1.5 Ok",
                "250 2.0.0 Ok: queued as Q1",
            ],
        );
        assert!(!o.closed, "{bad}: {o:?}");
        assert_eq!(o.aborted, 1, "{bad}: the first chunk's body is dropped");
        assert_eq!(o.messages.len(), 1, "{bad}: {o:?}");
        assert_eq!(o.messages[0].2, b"ok", "{bad}");
    }
}

/// A BDAT line refused before its size is read (a bare LF, a line over the cap, with or
/// without the leading zeros RFC 3030 allows) still announced a chunk: the chunk's octets must
/// never run as commands.
#[test]
fn a_refused_bdat_line_closes_the_connection_before_its_chunk() {
    let chunk = "RSET\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<c@mx.test>\r\nBDAT 5 LAST\r\nEVIL!";
    let long_zeros = format!("BDAT {}{} LAST\r\n", "0".repeat(600), chunk.len());
    let long_line = format!("bdat {} LAST{}\r\n", chunk.len(), " ".repeat(600));
    let bare_lf = format!("BDAT {} LAST\n", chunk.len());
    let tab = format!("BDAT\t{} LAST\r\n", chunk.len());
    let leading_blank = format!(" BDAT {} LAST\r\n", chunk.len());
    let vertical_tab = format!("bdat\x0b{} LAST\r\n", chunk.len());
    // One line here; a BDAT line to a reader that ends lines at a bare CR.
    let behind_cr = format!("NOOP \rBDAT {} LAST\r\n", chunk.len());
    let cases = [
        (tab, "500 5.5.1 Command not recognized"),
        (
            behind_cr,
            "500 5.5.2 Syntax error: a CR inside a command line",
        ),
        (leading_blank, "500 5.5.1 Command not recognized"),
        (vertical_tab, "500 5.5.1 Command not recognized"),
        (
            bare_lf,
            "500 5.5.2 Syntax error: command lines must end with CR LF",
        ),
        (long_zeros, "500 5.5.2 Line too long"),
        (long_line, "500 5.5.2 Line too long"),
    ];
    for (bdat, refusal) in cases {
        let mut input = client(&[
            "EHLO client.test",
            "MAIL FROM:<a@b.test>",
            "RCPT TO:<c@mx.test>",
        ]);
        input.extend_from_slice(bdat.as_bytes());
        input.extend_from_slice(chunk.as_bytes());
        let o = run_every_split(&config(), &input);
        assert_tail(
            &o,
            &[
                refusal,
                "421 4.5.0 mx.test Cannot follow BDAT framing, closing connection",
            ],
        );
        assert!(o.closed && o.messages.is_empty(), "{bdat:?}: {o:?}");
    }
}

/// One transaction from `mail` with these RCPT command lines, then `tail`, against a limit
/// of `limit` recipients.
fn with_rcpt_lines(
    mail: &str,
    rcpts: impl Iterator<Item = String>,
    limit: usize,
    tail: &[&str],
) -> support::Outcome {
    let mut lines = vec!["EHLO client.test".to_owned(), mail.to_owned()];
    lines.extend(rcpts);
    lines.extend(tail.iter().map(|t| (*t).to_owned()));
    let cfg = Arc::new(ServerConfig {
        max_recipients: limit,
        ..(*config()).clone()
    });
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    run(&cfg, false, &client(&refs), &[])
}

/// One transaction of `n` recipients, then `tail`, against a limit of 100 recipients.
fn with_recipients(n: usize, tail: &[&str]) -> support::Outcome {
    let rcpts = (0..n).map(|i| format!("RCPT TO:<r{i}@mx.test>"));
    with_rcpt_lines("MAIL FROM:<a@b.test>", rcpts, 100, tail)
}

#[test]
fn recipient_limit_is_452() {
    let o = with_recipients(101, &[]);
    assert_eq!(o.output.matches("250 2.1.5 Ok").count(), 100);
    assert!(o.output.ends_with("452 4.5.3 Too many recipients\r\n"));
}

#[test]
fn recipients_past_the_limit_do_not_end_the_session() {
    // 130 recipients against a limit of 100: 30 answers of 452, then the message is still
    // taken for the 100 accepted (RFC 5321 4.5.3.1.10), and the session goes on.
    let o = with_recipients(130, &["DATA", "hi", ".", "NOOP"]);
    assert_eq!(
        o.output.matches("452 4.5.3 Too many recipients").count(),
        30
    );
    assert!(!o.output.contains("421"), "{}", o.output);
    assert_eq!(o.messages.len(), 1);
    assert_eq!(o.messages[0].1.len(), 100);
    assert_tail(
        &o,
        &[
            "354 End data with <CR><LF>.<CR><LF>",
            "250 2.0.0 Ok: queued as Q1",
            "250 2.0.0 Ok",
        ],
    );
    assert!(!o.closed);
}

#[test]
fn a_mailbox_already_taken_is_250_again_at_the_recipient_limit() {
    // Stored once, so not "too many": a 452 would have the client send it again later
    // (RFC 5321 4.5.3.1.10). Any case of the domain is the same mailbox; a new one is 452.
    let o = with_recipients(
        100,
        &[
            "RCPT TO:<r0@mx.test>",
            "RCPT TO:<r7@MX.Test>",
            "RCPT TO:<R7@mx.test>",
            "DATA",
            "hi",
            ".",
        ],
    );
    assert_eq!(o.output.matches("250 2.1.5 Ok").count(), 102);
    assert_eq!(o.output.matches("452 4.5.3").count(), 1, "{}", o.output);
    assert_eq!(o.messages.len(), 1);
    assert_eq!(o.messages[0].1.len(), 100);
}

/// The mailbox and ORCPT of the `i`th recipient of `with_long_recipients`: 500 envelope
/// octets together.
fn long_recipient(i: usize) -> (String, String) {
    let mailbox = format!("r{i:03}@mx.test");
    let orcpt = format!("rfc822;{}@mx.test", "o".repeat(500 - mailbox.len() - 15));
    assert_eq!(mailbox.len() + orcpt.len(), 500);
    (mailbox, orcpt)
}

/// `n` recipients of 500 envelope octets each, then `tail`, at the default recipient limit
/// (1000).
fn with_long_recipients(n: usize, tail: &[&str]) -> support::Outcome {
    let rcpts = (0..n).map(|i| {
        let (mailbox, orcpt) = long_recipient(i);
        format!("RCPT TO:<{mailbox}> ORCPT={orcpt}")
    });
    with_rcpt_lines("MAIL FROM:<a@b.test>", rcpts, 1000, tail)
}

#[test]
fn long_recipients_past_the_envelope_budget_are_452() {
    use postern_proto::limits::ENVELOPE_BYTES_PER_RECIPIENT;
    // 128 octets per allowed recipient: 1000 allow 128,000 octets, the reverse path included,
    // which leaves room for 255 of these recipients.
    let fit = (1000 * ENVELOPE_BYTES_PER_RECIPIENT - "a@b.test".len()) / 500;
    let o = with_long_recipients(fit + 40, &["DATA", "hi", ".", "NOOP"]);
    assert_eq!(
        o.output.matches("250 2.1.5 Ok").count(),
        fit,
        "{}",
        o.output
    );
    assert_eq!(
        o.output.matches("452 4.5.3 Too many recipients").count(),
        40
    );
    assert_eq!(o.messages.len(), 1);
    assert_eq!(o.messages[0].1.len(), fit);
    assert_tail(
        &o,
        &[
            "354 End data with <CR><LF>.<CR><LF>",
            "250 2.0.0 Ok: queued as Q1",
            "250 2.0.0 Ok",
        ],
    );
}

#[test]
fn the_envelope_budget_holds_100_recipients_of_the_longest_form() {
    // RFC 5321 4.5.3.1.8: 100 recipients whatever their length, here 254-octet mailboxes with
    // 500-octet ORCPTs, from a 254-octet reverse path with a 100-octet ENVID, at a recipient
    // limit of 100.
    let domain = format!("{}.{}.{}", "a".repeat(63), "b".repeat(63), "c".repeat(61));
    let mailbox = |local: &str| {
        let m = format!("{local}{}@{domain}", "l".repeat(64 - local.len()));
        assert_eq!(m.len(), 254);
        m
    };
    let mail = format!(
        "MAIL FROM:<{}> ENVID={}",
        mailbox("sender"),
        "e".repeat(100)
    );
    let orcpt = format!("rfc822;{}", "x".repeat(493));
    let rcpts =
        (0..101).map(|i| format!("RCPT TO:<{}> ORCPT={orcpt}", mailbox(&format!("{i:03}"))));
    let o = with_rcpt_lines(&mail, rcpts, 100, &[]);
    assert!(o.output.contains("250 2.1.0 Ok"), "{}", o.output);
    assert_eq!(
        o.output.matches("250 2.1.5 Ok").count(),
        100,
        "{}",
        o.output
    );
    assert!(o.output.ends_with("452 4.5.3 Too many recipients\r\n"));
}

#[test]
fn an_absurd_recipient_overshoot_counts_as_errors() {
    let o = with_recipients(1200, &[]);
    // A limit of 100: 1000 overshooting RCPTs are free, then 20 errors end it.
    assert_eq!(o.output.matches("452 4.5.3").count(), 1020);
    assert!(o.output.ends_with(
        "452 4.5.3 Too many recipients\r\n421 4.7.0 mx.test Too many errors, closing connection\r\n"
    ));
    assert!(o.closed);
}

#[test]
fn a_mailbox_already_taken_is_250_past_the_overshoot_too() {
    // 100 distinct recipients fill the limit; the same mailbox again, 1,200 times more, is
    // always 250 (a 452 would have the client send it the message again), and the rest of
    // the transaction still goes through.
    let rcpts = (0..100)
        .map(|i| format!("RCPT TO:<r{i}@mx.test>"))
        .chain((0..1200).map(|_| "RCPT TO:<r7@MX.test>".to_owned()))
        .take(1100 + 18);
    let o = with_rcpt_lines("MAIL FROM:<a@b.test>", rcpts, 100, &["DATA", "hi", "."]);
    assert!(!o.output.contains("452"), "{}", o.output);
    assert_eq!(o.output.matches("250 2.1.5 Ok").count(), 1118);
    assert!(o.output.contains("354 "), "{}", o.output);
    assert!(!o.closed);
    // Repeated without end, it is ended like any absurd overshoot: nothing is taken.
    let rcpts = (0..100)
        .map(|i| format!("RCPT TO:<r{i}@mx.test>"))
        .chain((0..1200).map(|_| "RCPT TO:<r7@mx.test>".to_owned()));
    let o = with_rcpt_lines("MAIL FROM:<a@b.test>", rcpts, 100, &["DATA"]);
    assert!(!o.output.contains("452"), "{}", o.output);
    assert!(
        o.output
            .ends_with("250 2.1.5 Ok\r\n421 4.7.0 mx.test Too many errors, closing connection\r\n"),
        "{}",
        &o.output[o.output.len() - 200..]
    );
    assert!(!o.output.contains("354"));
    assert!(o.closed);
}

#[test]
fn the_error_count_starts_again_after_a_message_is_accepted() {
    let mut lines = vec!["EHLO client.test"];
    lines.extend(["BOGUS"; 15]);
    lines.extend([
        "MAIL FROM:<a@b.test>",
        "RCPT TO:<c@mx.test>",
        "DATA",
        "x",
        ".",
    ]);
    lines.extend(["BOGUS"; 15]);
    lines.push("NOOP");
    let o = run_every_split(&config(), &client(&lines));
    assert_eq!(o.output.matches("500 5.5.1").count(), 30);
    assert!(!o.output.contains("421"), "{}", o.output);
    assert!(o.output.ends_with("250 2.0.0 Ok\r\n"));
    // Without a message in between, the same 30 errors end the session at the 20th.
    let mut lines = vec!["EHLO client.test"];
    lines.extend(["BOGUS"; 30]);
    let o = run_every_split(&config(), &client(&lines));
    assert_eq!(o.output.matches("500 5.5.1").count(), 20);
    assert!(o.closed);
}

#[test]
fn rcpt_after_the_first_bdat_chunk_is_refused() {
    // The envelope goes into the spool with the first chunk: a later RCPT cannot join it.
    let mut input = client(&[
        "EHLO client.test",
        "MAIL FROM:<a@b.test>",
        "RCPT TO:<first@mx.test>",
    ]);
    input.extend_from_slice(b"BDAT 4\r\nab\r\nRCPT TO:<second@mx.test>\r\nBDAT 4 LAST\r\ncd\r\n");
    let o = run_every_split(&config(), &input);
    assert_eq!(
        o.output,
        with_banner_and_ehlo(&[
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "250 2.0.0 4 octets received",
            "503 5.5.1 RCPT not allowed after BDAT",
            "250 2.0.0 Ok: queued as Q1",
        ])
    );
    assert_eq!(o.messages.len(), 1);
    assert_eq!(o.messages[0].1, ["first@mx.test"]);
    assert_eq!(o.messages[0].2, b"ab\r\ncd\r\n");
}

#[test]
fn size_takes_twenty_digits() {
    // RFC 1870 4: size-value ::= 1*20DIGIT; a value past any limit is too big, not bad syntax.
    let input = client(&[
        "EHLO client.test",
        "MAIL FROM:<a@b.test> SIZE=99999999999999999999",
        "MAIL FROM:<a@b.test> SIZE=00000000000000000001",
        "RSET",
        "MAIL FROM:<a@b.test> SIZE=000000000000000000001",
    ]);
    let o = run_every_split(&config(), &input);
    assert_tail(
        &o,
        &[
            "552 5.3.4 Message size exceeds fixed maximum message size",
            "250 2.1.0 Ok",
            "250 2.0.0 Ok",
            "501 5.5.4 Invalid parameter value",
        ],
    );
}

#[test]
fn spool_refusal_at_data() {
    let input = client(&[
        "EHLO client.test",
        "MAIL FROM:<a@spool-full.example>",
        "RCPT TO:<c@mx.test>",
        "DATA",
        "NOOP",
    ]);
    let o = run_every_split(&config(), &input);
    assert_tail(
        &o,
        &["452 4.3.1 Insufficient system storage", "250 2.0.0 Ok"],
    );
    // The embedding is told of the refused message, for its log.
    assert_eq!(o.refused, ["452 4.3.1 <a@spool-full.example> 1"]);
}

#[test]
fn spool_refusal_at_first_bdat_chunk_still_reads_the_chunk() {
    let mut input = client(&[
        "EHLO client.test",
        "MAIL FROM:<a@spool-full.example>",
        "RCPT TO:<c@mx.test>",
    ]);
    input.extend_from_slice(b"BDAT 6 LAST\r\nNOOP\r\nNOOP\r\n");
    let o = run_every_split(&config(), &input);
    assert_tail(
        &o,
        &["452 4.3.1 Insufficient system storage", "250 2.0.0 Ok"],
    );
    assert!(o.messages.is_empty());
    assert_eq!(o.refused, ["452 4.3.1 <a@spool-full.example> 1"]);
}

#[test]
fn messages_refused_after_their_data_began_are_told_to_the_embedding_once() {
    // Too large (DATA, then BDAT chunks of which each one after the first is discarded), and
    // not a BDAT out of sequence, where no message was refused.
    let big = "x".repeat(10_001);
    let mut input = client(&[
        "EHLO client.test",
        "MAIL FROM:<a@b.test>",
        "RCPT TO:<c@mx.test>",
        "DATA",
        &big,
        ".",
        "MAIL FROM:<>",
        "RCPT TO:<c@mx.test>",
        "RCPT TO:<d@mx.test>",
    ]);
    input.extend_from_slice(b"BDAT 10001\r\n");
    input.extend_from_slice(big.as_bytes());
    input.extend_from_slice(b"BDAT 1 LAST\r\nx");
    input.extend_from_slice(b"BDAT 2 LAST\r\nxx");
    input.extend_from_slice(&client(&["NOOP"]));
    let o = run_every_split(&config(), &input);
    assert_tail(&o, &["503 5.5.1 Need MAIL command", "250 2.0.0 Ok"]);
    assert_eq!(
        o.refused,
        ["552 5.3.4 <a@b.test> 1", "552 5.3.4 <> 2"],
        "{}",
        o.output
    );
}

#[test]
fn chunks_behind_a_spool_refusal_get_it_too_the_last_one_included() {
    // RFC 3030 2 leaves the reply to a discarded chunk open. A client that judges its message
    // by the reply to its LAST chunk must see the temporary refusal (and try again later),
    // not a 5xx for a transaction that has ended, which would make it bounce the message.
    let mut input = client(&[
        "EHLO client.test",
        "MAIL FROM:<a@spool-full.example>",
        "RCPT TO:<c@mx.test>",
    ]);
    input.extend_from_slice(b"BDAT 3\r\nabcBDAT 3\r\ndefBDAT 3 LAST\r\nghi");
    input.extend_from_slice(&client(&["NOOP"]));
    let o = run_every_split(&config(), &input);
    assert_tail(
        &o,
        &[
            "452 4.3.1 Insufficient system storage",
            "452 4.3.1 Insufficient system storage",
            "452 4.3.1 Insufficient system storage",
            "250 2.0.0 Ok",
        ],
    );
    assert!(o.messages.is_empty());
    assert!(!o.closed);
}

#[test]
fn syntax_errors_get_precise_codes() {
    let input = client(&[
        "EHLO client.test",
        "FOO bar",
        "MAIL FROM:bare@address.test",
        "MAIL FROM:<a@b.test> X-UNKNOWN=1",
        "MAIL FROM:<ü@b.test>",
        "MAIL FROM:<ü@b.test> SMTPUTF8",
        "RCPT TO:<ü@mx.test>",
        "RCPT TO:<not an address>",
        "RCPT TO:<Postmaster>",
    ]);
    let o = run_every_split(&config(), &input);
    assert_tail(
        &o,
        &[
            "500 5.5.1 Command not recognized",
            "501 5.1.7 Bad sender address syntax",
            "555 5.5.4 Parameter not recognized or not implemented",
            "553 5.6.7 Non-ASCII address needs SMTPUTF8",
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "501 5.1.3 Bad recipient address syntax",
            "250 2.1.5 Ok",
        ],
    );
}

#[test]
fn a_utf8_source_route_needs_smtputf8_as_a_utf8_mailbox_does() {
    // The route is ignored, but it is part of the path, and RFC 6531 3.3 lets UTF-8 into a
    // path only with SMTPUTF8.
    let input = client(&[
        "EHLO client.test",
        "MAIL FROM:<@b\u{fc}cher.example:a@b.test>",
        "MAIL FROM:<@relay.example:a@b.test>",
        "RCPT TO:<@b\u{fc}cher.example,@relay.example:c@mx.test>",
        "RCPT TO:<@relay.example:c@mx.test>",
        "RSET",
        "MAIL FROM:<@b\u{fc}cher.example:a@b.test> SMTPUTF8",
        "RCPT TO:<@b\u{fc}cher.example:c@mx.test>",
    ]);
    let o = run_every_split(&config(), &input);
    assert_tail(
        &o,
        &[
            "553 5.6.7 Non-ASCII address needs SMTPUTF8",
            "250 2.1.0 Ok",
            "553 5.6.7 Non-ASCII address needs SMTPUTF8",
            "250 2.1.5 Ok",
            "250 2.0.0 Ok",
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
        ],
    );
}

#[test]
fn utf8_in_orcpt_needs_smtputf8_and_escapes_must_be_printable() {
    let input = client(&[
        "EHLO client.test",
        "MAIL FROM:<a@b.test>",
        "RCPT TO:<c@mx.test> ORCPT=utf-8;\u{fc}@x.test",
        "RCPT TO:<c@mx.test> ORCPT=rfc822;a+0D+0AX:+20y@x.test",
        "RCPT TO:<c@mx.test> ORCPT=rfc822;a+2Bb@x.test",
        "RSET",
        "MAIL FROM:<a@b.test> SMTPUTF8 ENVID=a+00",
        "MAIL FROM:<a@b.test> SMTPUTF8",
        "RCPT TO:<c@mx.test> ORCPT=utf-8;\u{fc}@x.test",
    ]);
    let o = run_every_split(&config(), &input);
    assert_tail(
        &o,
        &[
            "501 5.5.4 UTF-8 in ORCPT needs SMTPUTF8",
            "501 5.5.4 Invalid parameter value",
            "250 2.1.5 Ok",
            "250 2.0.0 Ok",
            "501 5.5.4 Invalid parameter value",
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
        ],
    );
}

#[test]
fn an_rfc822_orcpt_may_escape_utf8_as_postfix_writes_it() {
    // Postfix relays an internationalised recipient given no ORCPT with one it makes itself,
    // `rfc822;` and the UTF-8 octets xtext-escaped, with or without SMTPUTF8.
    let input = client(&[
        "EHLO client.test",
        "MAIL FROM:<a@b.test>",
        "RCPT TO:<jorg@mx.test> ORCPT=rfc822;j+C3+B6rg@mx.test",
        "RCPT TO:<c@mx.test> ORCPT=rfc822;j+C3rg@mx.test",
        "RSET",
        "MAIL FROM:<s\u{e9}nder@b.test> SMTPUTF8",
        "RCPT TO:<j\u{f6}rg@mx.test> ORCPT=rfc822;j+C3+B6rg@mx.test",
    ]);
    let o = run_every_split(&config(), &input);
    assert_tail(
        &o,
        &[
            "250 2.1.5 Ok",
            "501 5.5.4 Invalid parameter value",
            "250 2.0.0 Ok",
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
        ],
    );
}

#[test]
fn data_after_only_refused_recipients_is_554_whatever_the_refusal() {
    let input = client(&[
        "EHLO client.test",
        "MAIL FROM:<a@b.test>",
        "DATA",
        "RCPT TO:<not an address>",
        "DATA",
        "RSET",
        "MAIL FROM:<a@b.test>",
        "RCPT TO:<c@mx.test> XFOO=1",
        "DATA",
    ]);
    let o = run_every_split(&config(), &input);
    assert_tail(
        &o,
        &[
            "503 5.5.1 Need RCPT command",
            "501 5.1.3 Bad recipient address syntax",
            "554 5.5.1 No valid recipients",
            "250 2.0.0 Ok",
            "250 2.1.0 Ok",
            "555 5.5.4 Parameter not recognized or not implemented",
            "554 5.5.1 No valid recipients",
        ],
    );
}

#[test]
fn mail_and_rcpt_have_room_for_dsn_parameters() {
    // RFC 3461 4: NOTIFY and ORCPT may make RCPT 500 octets longer than 512, RET and ENVID
    // make MAIL longer; other commands keep the usual cap.
    let mail = format!("MAIL FROM:<a@b.test> RET=HDRS ENVID={}", "e".repeat(100));
    let orcpt = format!("rfc822;{}", "q".repeat(480));
    let rcpt = format!("RCPT TO:<c@mx.test> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT={orcpt}");
    assert!(rcpt.len() + 2 > 512 && rcpt.len() + 2 <= 1012);
    let noop = format!("NOOP {}", "x".repeat(600));
    let input = client(&["EHLO client.test", &mail, &rcpt, &noop, "NOOP"]);
    let o = run_every_split(&config(), &input);
    assert_tail(
        &o,
        &[
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "500 5.5.2 Line too long",
            "250 2.0.0 Ok",
        ],
    );
    assert_eq!(o.output.matches("Line too long").count(), 1);
}

#[test]
fn line_too_long_then_in_step() {
    let mut input = client(&["EHLO client.test"]);
    input.extend(std::iter::repeat_n(b'A', 600));
    input.extend_from_slice(b"\r\nNOOP\r\n");
    let o = run_every_split(&config(), &input);
    assert!(o
        .output
        .ends_with(&server(&["500 5.5.2 Line too long", "250 2.0.0 Ok"])));
}

#[test]
fn too_many_errors_closes_with_421() {
    let lines = vec!["BOGUS"; 30];
    let o = run_every_split(&config(), &client(&lines));
    assert_eq!(o.output.matches("500 5.5.1").count(), 20);
    assert!(o
        .output
        .ends_with("421 4.7.0 mx.test Too many errors, closing connection\r\n"));
    assert!(o.closed);
}

#[test]
fn http_request_is_dropped() {
    for request in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"DELETE /x HTTP/1.1\r\n\r\n",
        b"TRACE / HTTP/1.1\r\n\r\n",
        b"PATCH / HTTP/1.1\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ] {
        let o = run_every_split(&config(), request);
        assert_transcript(
            &o,
            &[
                BANNER,
                "421 4.7.0 mx.test This is an SMTP server, closing connection",
            ],
        );
        assert!(o.closed, "{}", String::from_utf8_lossy(request));
    }
}

#[test]
fn a_tls_client_hello_on_the_cleartext_port_is_dropped_at_once() {
    // The start of a ClientHello (record header, handshake header, client version, random),
    // with an LF among its bytes and without one; and after a command, from a client that
    // starts TLS without STARTTLS.
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    hello.extend((0u8..32).map(|i| i.wrapping_mul(37)));
    hello[20] = b'\n';
    let without_lf: Vec<u8> = hello.iter().copied().filter(|&b| b != b'\n').collect();
    let after_ehlo = [&b"EHLO client.test\r\n"[..], &hello].concat();
    // After a command line over the cap, whose tail the framer drops up to its line feed:
    // the hello right behind it is seen from its first byte, in whatever read it comes (also
    // when the hello holds a line feed, and the read that ends the long line holds it all).
    let after_long_line = [&[b'x'; 1100][..], b"\r\n", &hello].concat();
    let o = run_every_split(&config(), &after_long_line);
    assert!(o.closed);
    assert_eq!(
        o.output,
        server(&[
            "220 mx.test ESMTP postern",
            "500 5.5.2 Line too long",
            "421 4.7.0 mx.test This is an SMTP server, closing connection",
        ]),
    );
    for request in [hello, without_lf, after_ehlo] {
        let o = run_every_split(&config(), &request);
        assert!(o.closed);
        assert!(
            o.output
                .ends_with("421 4.7.0 mx.test This is an SMTP server, closing connection\r\n"),
            "{}",
            o.output
        );
        assert!(!o.output.contains("500"), "{}", o.output);
    }
}

#[test]
fn smuggled_end_of_data_is_body() {
    for smuggle in [&b"\n.\n"[..], b"\n.\r\n", b"\r.\r\n", b"\r.\r", b"\r\n.\n"] {
        let mut input = client(&[
            "EHLO client.test",
            "MAIL FROM:<a@b.test>",
            "RCPT TO:<c@mx.test>",
            "DATA",
            "x",
        ]);
        input.extend_from_slice(smuggle);
        input.extend(client(&[
            "MAIL FROM:<evil@x.test>",
            "RCPT TO:<victim@mx.test>",
            "DATA",
            "spoof",
            ".",
        ]));
        let o = run_every_split(&config(), &input);
        assert_eq!(o.messages.len(), 1, "{smuggle:?}");
        assert_tail(
            &o,
            &[
                "354 End data with <CR><LF>.<CR><LF>",
                "250 2.0.0 Ok: queued as Q1",
            ],
        );
        let body = &o.messages[0].2;
        assert!(
            body.windows(5).any(|w| w == b"spoof"),
            "smuggled commands stay in the body"
        );
    }
}

/// Under the default policy a bare line end is the line end it is stored as: a dot after it
/// is a leading dot, unstuffed like any other (docs/protocol.md).
#[test]
fn a_dot_after_a_bare_line_end_is_unstuffed_as_at_any_line_start() {
    let mut input = client(&[
        "EHLO client.test",
        "MAIL FROM:<a@b.test>",
        "RCPT TO:<c@mx.test>",
        "DATA",
    ]);
    input.extend_from_slice(b"a\n..b\r\nc\n.d\r\ne\r.f\r\n.\r\n");
    let o = run_every_split(&config(), &input);
    assert_eq!(o.messages.len(), 1);
    assert_eq!(
        String::from_utf8_lossy(&o.messages[0].2),
        "a\r\n.b\r\nc\r\nd\r\ne\r\nf\r\n"
    );
}

#[test]
fn bare_newline_reject_policy() {
    let cfg = Arc::new(ServerConfig {
        bare_newline: BareNewlinePolicy::Reject,
        ..(*config()).clone()
    });
    let mut input = client(&[
        "EHLO client.test",
        "MAIL FROM:<a@b.test>",
        "RCPT TO:<c@mx.test>",
        "DATA",
    ]);
    input.extend_from_slice(b"a\nb\r\n.\r\nNOOP\r\n");
    let o = run(&cfg, false, &input, &[]);
    assert_tail(
        &o,
        &[
            "550 5.6.11 Bare CR or LF in message; use CRLF line endings",
            "250 2.0.0 Ok",
        ],
    );
    assert!(o.messages.is_empty());
    assert_eq!(o.aborted, 1);
}

#[test]
fn bdat_text_bodies_get_crlf_line_ends_like_data() {
    // Without BINARYMIME a BDAT body is text (RFC 3030 3): bare CR and LF are stored as CR LF,
    // a CR LF split between chunks stays one line end, and a bare CR at the very end counts.
    let mut input = client(&[
        "EHLO client.test",
        "MAIL FROM:<a@b.test> BODY=8BITMIME",
        "RCPT TO:<c@mx.test>",
    ]);
    input.extend_from_slice(b"BDAT 4\r\na\nb\rBDAT 4\r\n\nc\rdBDAT 1 LAST\r\n\r");
    let o = run_every_split(&config(), &input);
    assert_tail(
        &o,
        &[
            "250 2.0.0 4 octets received",
            "250 2.0.0 4 octets received",
            "250 2.0.0 Ok: queued as Q1",
        ],
    );
    assert_eq!(o.messages.len(), 1);
    assert_eq!(o.messages[0].2, b"a\r\nb\r\nc\r\nd\r\n");
}

#[test]
fn bare_newline_reject_policy_covers_bdat_but_not_binarymime() {
    let cfg = Arc::new(ServerConfig {
        bare_newline: BareNewlinePolicy::Reject,
        ..(*config()).clone()
    });
    let mut input = client(&[
        "EHLO client.test",
        "MAIL FROM:<a@b.test>",
        "RCPT TO:<c@mx.test>",
    ]);
    input.extend_from_slice(b"BDAT 2\r\nx\rBDAT 3 LAST\r\nyz\n");
    input.extend_from_slice(&client(&[
        "MAIL FROM:<a@b.test> BODY=BINARYMIME",
        "RCPT TO:<c@mx.test>",
    ]));
    input.extend_from_slice(b"BDAT 3 LAST\r\na\nb");
    let o = run_every_split(&cfg, &input);
    assert_tail(
        &o,
        &[
            "250 2.0.0 2 octets received",
            "550 5.6.11 Bare CR or LF in message; use CRLF line endings",
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "250 2.0.0 Ok: queued as Q1",
        ],
    );
    assert_eq!(o.messages.len(), 1);
    assert_eq!(o.messages[0].2, b"a\nb");
}

#[test]
fn help_names_starttls_only_where_it_is_offered() {
    let input = client(&["EHLO client.test", "HELP"]);
    let o = run(&config(), true, &input, &[]);
    assert_tail(
        &o,
        &["214 2.0.0 See RFC 5321; commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY EXPN HELP STARTTLS"],
    );
    let o = run(&config(), false, &input, &[]);
    assert_tail(
        &o,
        &["214 2.0.0 See RFC 5321; commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY EXPN HELP"],
    );
}

#[test]
fn starttls_discards_pipelined_commands_and_resets() {
    let input = client(&[
        "EHLO client.test",
        "STARTTLS",
        "MAIL FROM:<injected@x.test>",
        "RCPT TO:<v@mx.test>",
    ]);
    let o = run(&config(), true, &input, &[]);
    let mut expected = vec![BANNER];
    expected.extend_from_slice(&EHLO[..7]);
    expected.extend([
        "250-SMTPUTF8",
        "250-DSN",
        "250 STARTTLS",
        "220 2.0.0 Ready to start TLS",
    ]);
    assert_eq!(o.output, server(&expected));
    assert_eq!(o.tls, 1);

    // After the handshake the client must greet again, and STARTTLS is neither offered nor allowed.
    let before = client(&["EHLO client.test", "STARTTLS"]);
    let mut input = before.clone();
    input.extend(client(&[
        "MAIL FROM:<a@b.test>",
        "EHLO again.test",
        "STARTTLS",
    ]));
    let o = run(&config(), true, &input, &[before.len()]);
    assert_tail(
        &o,
        &[
            "220 2.0.0 Ready to start TLS",
            "503 5.5.1 Send HELO or EHLO first",
            "250-mx.test Hello again.test",
            "250-PIPELINING",
            "250-SIZE 10000",
            "250-ENHANCEDSTATUSCODES",
            "250-8BITMIME",
            "250-BINARYMIME",
            "250-CHUNKING",
            "250-SMTPUTF8",
            "250 DSN",
            "503 5.5.1 TLS already active",
        ],
    );
}

#[test]
fn ehlo_resets_the_transaction() {
    let input = client(&[
        "EHLO client.test",
        "MAIL FROM:<a@b.test>",
        "RCPT TO:<c@mx.test>",
        "EHLO client.test",
        "DATA",
    ]);
    let o = run_every_split(&config(), &input);
    assert!(o.output.ends_with("503 5.5.1 Need MAIL command\r\n"));
}

#[test]
fn pipelining_and_chunking_can_be_left_unoffered() {
    let cfg = Arc::new(ServerConfig {
        offer_pipelining: false,
        offer_chunking: false,
        ..(*config()).clone()
    });
    let o = run(
        &cfg,
        true,
        &client(&["EHLO client.test", "HELP", "QUIT"]),
        &[],
    );
    assert_transcript(
        &o,
        &[
            BANNER,
            "250-mx.test Hello client.test",
            "250-SIZE 10000",
            "250-ENHANCEDSTATUSCODES",
            "250-8BITMIME",
            "250-SMTPUTF8",
            "250-DSN",
            "250 STARTTLS",
            // HELP lists what is offered: no BDAT.
            "214 2.0.0 See RFC 5321; commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY EXPN HELP STARTTLS",
            "221 2.0.0 mx.test Bye",
        ],
    );
    let cfg = Arc::new(ServerConfig {
        offer_chunking: false,
        ..(*config()).clone()
    });
    let o = run(&cfg, false, &client(&["EHLO client.test"]), &[]);
    assert_transcript(
        &o,
        &[
            BANNER,
            "250-mx.test Hello client.test",
            "250-PIPELINING",
            "250-SIZE 10000",
            "250-ENHANCEDSTATUSCODES",
            "250-8BITMIME",
            "250-SMTPUTF8",
            "250 DSN",
        ],
    );
}

#[test]
fn helo_names_are_checked_and_echoed_in_ascii() {
    let input = client(&[
        "EHLO [999.1.1.1]",
        "EHLO [IPv6:zz]",
        "HELO [x-tag:some.content]",
        "HELO [tag:a;b(c]",
        "HELO b\u{fc}cher.example",
        // Underscores, which hosts use in their names: taken.
        "HELO DESKTOP_7F3A",
        "NOOP \u{1}ignored",
        "QUIT",
    ]);
    let o = run_every_split(&config(), &input);
    assert_transcript(
        &o,
        &[
            BANNER,
            "501 5.5.4 Syntax: EHLO hostname",
            "501 5.5.4 Syntax: EHLO hostname",
            "501 5.5.4 Syntax: HELO hostname",
            "501 5.5.4 Syntax: HELO hostname",
            "250 mx.test Hello xn--bcher-kva.example",
            "250 mx.test Hello DESKTOP_7F3A",
            "250 2.0.0 Ok",
            "221 2.0.0 mx.test Bye",
        ],
    );
}

#[test]
fn the_ehlo_greeting_line_stays_within_512_octets() {
    let label = "a".repeat(63);
    let hostname = [label.as_str(); 4].join(".");
    assert_eq!(hostname.len(), 255);
    let cfg = Arc::new(ServerConfig {
        hostname: hostname.clone(),
        ..(*config()).clone()
    });
    let client_label = "b".repeat(63);
    let client_name = [client_label.as_str(); 4].join(".");
    let input = client(&[&format!("HELO {client_name}"), "HELO short.test"]);
    let o = run_every_split(&cfg, &input);
    let lines: Vec<&str> = o.output.split("\r\n").collect();
    assert_eq!(lines[1], format!("250 {hostname} Hello"));
    assert_eq!(lines[2], format!("250 {hostname} Hello short.test"));
    assert!(o.output.split_inclusive("\r\n").all(|l| l.len() <= 512));
}

#[test]
fn auth_parameter_is_refused_when_auth_is_not_offered() {
    // Well written or not, once or twice: the parameter of an extension not offered.
    for auth in ["AUTH=<>", "AUTH=+zz", "AUTH", "AUTH=<> AUTH=<>"] {
        let mail = format!("MAIL FROM:<a@b.test> {auth}");
        let input = client(&["EHLO client.test", &mail, "MAIL FROM:<a@b.test>"]);
        let o = run_every_split(&config(), &input);
        assert_tail(
            &o,
            &["555 5.5.4 AUTH parameter not supported", "250 2.1.0 Ok"],
        );
    }
}

#[test]
fn a_command_line_ended_by_a_bare_lf_is_refused_not_run() {
    let mut input = client(&["EHLO client.test"]);
    // RFC 5321 2.3.8: only CR LF ends a line. A bare CR inside a line is no end either.
    input.extend_from_slice(
        b"MAIL FROM:<a@client.test>\nRCPT TO:<b@mx.test>\r\nNOOP\rRSET\r\n\nNOOP\r\n",
    );
    let o = run_every_split(&config(), &input);
    assert_eq!(
        o.output,
        with_banner_and_ehlo(&[
            "500 5.5.2 Syntax error: command lines must end with CR LF",
            "503 5.5.1 Need MAIL command",
            "500 5.5.1 Command not recognized",
            "500 5.5.2 Syntax error: command lines must end with CR LF",
            "250 2.0.0 Ok",
        ])
    );
    assert!(o.messages.is_empty());
}

/// Commands that move no mail forward are free up to 100 between messages accepted; each one
/// past that still gets its reply and counts as an error, so a session that sends nothing else
/// ends after 120 of them.
#[test]
fn commands_without_mail_end_the_session_past_the_junk_limit() {
    let mut lines = vec!["EHLO client.test"];
    lines.extend(["NOOP", "RSET", "VRFY someone", "EXPN staff", "HELP"].repeat(32));
    let o = run(&config(), false, &client(&lines), &[]);
    // EHLO is the first; the 120th (the 119th after it) is answered, then the session ends.
    let answered = o.output.matches("250 2.0.0 Ok\r\n").count()
        + o.output.matches("252 2.").count()
        + o.output.matches("214 ").count();
    assert_eq!(answered, 119, "{}", o.output);
    assert!(
        o.output
            .ends_with("421 4.7.0 mx.test Too many commands without mail, closing connection\r\n"),
        "{}",
        o.output
    );
    assert!(o.closed);

    // A message accepted starts the count again: 99 before it and 99 after are fine.
    let mut lines = vec!["EHLO client.test"];
    lines.extend(vec!["NOOP"; 99]);
    lines.extend([
        "MAIL FROM:<a@b.test>",
        "RCPT TO:<c@d.test>",
        "DATA",
        "Subject: s",
        "",
        "body",
        ".",
    ]);
    lines.extend(vec!["NOOP"; 99]);
    lines.push("QUIT");
    let o = run(&config(), false, &client(&lines), &[]);
    assert!(!o.output.contains("421 "), "{}", o.output);
    assert!(o.output.contains("queued as"), "{}", o.output);
    assert!(
        o.output.ends_with("221 2.0.0 mx.test Bye\r\n"),
        "{}",
        o.output
    );
}

/// The junk limit may end the session on a first empty chunk: like a NOOP there, it gets its
/// own reply before the 421, and the body it started is dropped.
#[test]
fn an_empty_chunk_that_ends_the_session_at_the_junk_limit_is_answered_and_its_body_dropped() {
    let mut lines = vec![
        "EHLO client.test",
        "MAIL FROM:<a@b.test>",
        "RCPT TO:<c@d.test>",
    ];
    // EHLO counts; the 120th command without mail ends the session: the BDAT 0.
    lines.extend(vec!["NOOP"; 118]);
    lines.push("BDAT 0");
    let o = run(&config(), false, &client(&lines), &[]);
    assert!(
        o.output.ends_with(
            "250 2.0.0 0 octets received\r\n\
             421 4.7.0 mx.test Too many commands without mail, closing connection\r\n"
        ),
        "{}",
        o.output
    );
    assert!(o.closed);
    assert_eq!((o.starts, o.aborted), (1, 1), "{}", o.output);
    assert!(o.messages.is_empty());
}

/// An empty chunk that is not the last counts as one command without mail, as a NOOP does:
/// a session of them ends after as many replies as a session of NOOPs.
#[test]
fn empty_chunks_reach_the_junk_limit_after_as_many_replies_as_noops() {
    let replies = |filler: &str| {
        let mut lines = vec![
            "EHLO client.test",
            "MAIL FROM:<a@b.test>",
            "RCPT TO:<c@d.test>",
        ];
        lines.extend(vec![filler; 200]);
        let o = run(&config(), false, &client(&lines), &[]);
        assert!(o.closed, "{}", o.output);
        o.output.matches("\r\n").count()
    };
    assert_eq!(replies("BDAT 0"), replies("NOOP"));
}

/// Empty chunks that are not the last move no mail forward either: a client that sends them
/// without end inside one BDAT transaction ends like one that sends NOOPs.
#[test]
fn empty_bdat_chunks_without_end_count_as_commands_without_mail() {
    let mut lines = vec![
        "EHLO client.test",
        "MAIL FROM:<a@b.test>",
        "RCPT TO:<c@d.test>",
    ];
    lines.extend(vec!["BDAT 0"; 200]);
    let o = run(&config(), false, &client(&lines), &[]);
    let chunks = o.output.matches("0 octets received").count();
    assert!((100..200).contains(&chunks), "{chunks}: {}", o.output);
    assert!(
        o.output
            .ends_with("421 4.7.0 mx.test Too many commands without mail, closing connection\r\n"),
        "{}",
        o.output
    );
    assert!(o.closed);
    // A message made of chunks, the empty ones among them, is fine.
    let mut lines = vec![
        "EHLO client.test",
        "MAIL FROM:<a@b.test>",
        "RCPT TO:<c@d.test>",
    ];
    lines.extend(vec!["BDAT 0"; 5]);
    let mut input = client(&lines);
    input.extend_from_slice(b"BDAT 14 LAST\r\nSubject: s\r\n\r\n");
    input.extend_from_slice(b"QUIT\r\n");
    let o = run(&config(), false, &input, &[]);
    assert!(o.output.contains("queued as"), "{}", o.output);
    assert!(!o.output.contains("421 "), "{}", o.output);
}

#[test]
fn chunks_pipelined_behind_a_refused_one_are_discarded_without_ending_the_session() {
    // RFC 3030 2: a server offering PIPELINING takes and discards the chunks already in the
    // pipeline after a failed BDAT. A long message's chunks outnumber the error limit (20);
    // their refusals are not the client's errors, so the session goes on to its next message.
    let mut input = client(&[
        "EHLO client.test",
        "MAIL FROM:<a@b.test>",
        "RCPT TO:<x@denied.example>",
    ]);
    for _ in 0..30 {
        input.extend_from_slice(b"BDAT 5\r\nhello");
    }
    input.extend_from_slice(b"BDAT 5 LAST\r\nhello");
    input.extend_from_slice(&client(&["MAIL FROM:<a@b.test>", "RCPT TO:<c@mx.test>"]));
    input.extend_from_slice(b"BDAT 7 LAST\r\nthere\r\n");
    input.extend_from_slice(&client(&["QUIT"]));
    let o = run(&config(), false, &input, &[]);
    let mut expected = vec![
        "554 5.7.1 Relay access denied",
        "554 5.5.1 No valid recipients",
    ];
    // Each discarded chunk gets the refusal that failed the transaction.
    expected.extend(std::iter::repeat_n("554 5.5.1 No valid recipients", 30));
    expected.extend([
        "250 2.1.0 Ok",
        "250 2.1.5 Ok",
        "250 2.0.0 Ok: queued as Q1",
        "221 2.0.0 mx.test Bye",
    ]);
    assert_tail(&o, &expected);
    assert_eq!(o.messages.len(), 1);
    assert_eq!(o.messages[0].2, b"there\r\n");
}

#[test]
fn a_command_after_refused_chunks_makes_later_refusals_count_again() {
    // Only the chunks right behind a refused one are the pipeline's: once the client has sent
    // another command it has read nothing it should not have, and its errors count.
    let config = Arc::new(ServerConfig {
        max_errors: 3,
        ..(*config()).clone()
    });
    let mut input = client(&["EHLO client.test"]);
    for _ in 0..2 {
        input.extend_from_slice(b"BDAT 5\r\nhelloBDAT 5\r\nhelloBDAT 5\r\nhello");
        input.extend_from_slice(&client(&["NOOP"]));
    }
    let o = run(&config, false, &input, &[]);
    // Counted: the first chunk of each run (2) and nothing else, so the session is still
    // open; a third run would be refused at its first chunk.
    assert!(!o.closed, "{}", o.output);
    assert_eq!(o.output.matches("503 5.5.1 Need MAIL command").count(), 6);
    let mut input3 = input.clone();
    input3.extend_from_slice(b"BDAT 5\r\nhelloBDAT 5\r\nhello");
    let o = run(&config, false, &input3, &[]);
    assert!(o.closed, "{}", o.output);
    assert!(o.output.ends_with(
        "503 5.5.1 Need MAIL command\r\n421 4.7.0 mx.test Too many errors, closing connection\r\n"
    ));
}

#[test]
fn a_chunk_before_any_recipient_fails_its_transaction() {
    // RFC 3030 2: a refused chunk fails the transaction, one before any RCPT too. A client
    // that pipelines its next transaction behind a BDAT LAST must not have that one's
    // recipient taken into the failed one's (its MAIL would get 503 nested MAIL and the
    // message go under the first sender, which the client took for failed).
    let mut input = client(&["EHLO client.test", "MAIL FROM:<a@b.test>"]);
    input.extend_from_slice(b"BDAT 3\r\nabcBDAT 3 LAST\r\nabc");
    input.extend_from_slice(&client(&["MAIL FROM:<d@e.test>", "RCPT TO:<c@mx.test>"]));
    input.extend_from_slice(b"BDAT 4 LAST\r\nok\r\n");
    let o = run_every_split(&config(), &input);
    assert_tail(
        &o,
        &[
            "250 2.1.0 Ok",
            "503 5.5.1 Need RCPT command",
            "503 5.5.1 Need RCPT command",
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "250 2.0.0 Ok: queued as Q1",
        ],
    );
    assert_eq!(o.messages.len(), 1);
    assert_eq!(o.messages[0].0, "d@e.test");
    assert_eq!(o.messages[0].2, b"ok\r\n");
    // A RCPT sent next finds no transaction.
    let mut input = client(&["EHLO client.test", "MAIL FROM:<a@b.test>"]);
    input.extend_from_slice(b"BDAT 3 LAST\r\nabc");
    input.extend_from_slice(&client(&["RCPT TO:<c@mx.test>"]));
    let o = run_every_split(&config(), &input);
    assert_tail(
        &o,
        &[
            "250 2.1.0 Ok",
            "503 5.5.1 Need RCPT command",
            "503 5.5.1 Need MAIL command",
        ],
    );
    assert!(o.messages.is_empty());
}

#[test]
fn a_rcpt_refused_for_its_line_end_or_length_counts_as_tried() {
    // RFC 2920 3.1: a body after refused recipients gets 554 (no valid recipients), not 503,
    // whatever refused the RCPT line: a bare LF ending, or its length.
    let long = format!("RCPT TO:<{}@mx.test>", "x".repeat(2000));
    for rcpt in [b"RCPT TO:<c@mx.test>\n".to_vec(), client(&[long.as_str()])] {
        let mut input = client(&["EHLO client.test", "MAIL FROM:<a@b.test>"]);
        input.extend_from_slice(&rcpt);
        input.extend_from_slice(b"BDAT 2 LAST\r\nok");
        // The refused chunk ended the transaction: a new one may start.
        input.extend_from_slice(&client(&["MAIL FROM:<a@b.test>"]));
        let o = run(&config(), false, &input, &[]);
        assert_tail(&o, &["554 5.5.1 No valid recipients", "250 2.1.0 Ok"]);
        assert!(o.output.contains("\r\n500 5.5."), "{}", o.output);
        assert!(o.messages.is_empty());
    }
}

#[test]
fn binarymime_and_bdat_are_refused_where_chunking_is_not_offered() {
    // A next hop without CHUNKING (the load sink's --no-chunking) must not take BDAT, or a
    // client that sends it anyway would pass for one that does not.
    let cfg = Arc::new(ServerConfig {
        offer_chunking: false,
        ..(*config()).clone()
    });
    let input = client(&[
        "EHLO client.test",
        "MAIL FROM:<a@b.test> BODY=BINARYMIME",
        "MAIL FROM:<a@b.test> BODY=8BITMIME",
        "RCPT TO:<c@mx.test>",
    ]);
    let mut input = input;
    input.extend_from_slice(b"BDAT 4 LAST\r\nQUIT");
    let o = run(&cfg, false, &input, &[]);
    assert_tail(
        &o,
        &[
            "555 5.5.4 BODY=BINARYMIME not offered",
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "500 5.5.1 Command not recognized",
            "421 4.5.0 mx.test Cannot follow BDAT framing, closing connection",
        ],
    );
    assert!(o.closed);
    assert!(o.messages.is_empty());
    // With a size it cannot read, it is still a command not recognised here, not a syntax
    // error of one that is.
    let mut input = client(&[
        "EHLO client.test",
        "MAIL FROM:<a@b.test>",
        "RCPT TO:<c@mx.test>",
    ]);
    input.extend_from_slice(b"BDAT x LAST\r\nQUIT");
    let o = run(&cfg, false, &input, &[]);
    assert_tail(
        &o,
        &[
            "250 2.1.5 Ok",
            "500 5.5.1 Command not recognized",
            "421 4.5.0 mx.test Cannot follow BDAT framing, closing connection",
        ],
    );
    assert!(o.closed);
}

/// A server taking 100 recipients, and a session's lines up to its limit: EHLO, `mail`,
/// `first`, then 99 more (`a@d1.example` to `a@d99.example`).
fn at_a_limit_of_100(mail: &str, first: &str) -> (Arc<ServerConfig>, Vec<String>) {
    let cfg = Arc::new(ServerConfig {
        max_recipients: 100,
        ..(*config()).clone()
    });
    let mut lines = vec![
        "EHLO client.test".to_owned(),
        mail.to_owned(),
        first.to_owned(),
    ];
    lines.extend((1..100).map(|i| format!("RCPT TO:<a@d{i}.example>")));
    (cfg, lines)
}

#[test]
fn past_the_limit_a_recipient_taken_is_found_among_many_in_any_of_its_forms() {
    // Past the limit (100 here) a RCPT of a mailbox already taken is 250, any other 452: the
    // look-up among many recipients finds the same mailbox written otherwise (domain case,
    // A-labels for U-labels, a quoted local part) and nothing else (local part case).
    let (cfg, mut lines) = at_a_limit_of_100(
        "MAIL FROM:<a@b.test> SMTPUTF8",
        "RCPT TO:<a@b\u{fc}cher.example>",
    );
    for past in [
        "RCPT TO:<a@D5.EXAMPLE>",
        "RCPT TO:<\"a\"@d7.example>",
        "RCPT TO:<a@xn--bcher-kva.example>",
        "RCPT TO:<A@d5.example>",
        "RCPT TO:<a@d100.example>",
        "RCPT TO:<b@d1.example>",
    ] {
        lines.push(past.to_owned());
    }
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let o = run(&cfg, false, &client(&lines), &[]);
    assert_tail(
        &o,
        &[
            "250 2.1.5 Ok",
            "250 2.1.5 Ok",
            "250 2.1.5 Ok",
            "250 2.1.5 Ok",
            "452 4.5.3 Too many recipients",
            "452 4.5.3 Too many recipients",
            "452 4.5.3 Too many recipients",
        ],
    );
    assert_eq!(o.output.matches("250 2.1.5 Ok").count(), 103);
}

#[test]
fn past_the_limit_a_recipient_given_again_with_dsn_parameters_is_taken_again() {
    // Its NOTIFY and ORCPT reach the stored message (merged there with the first's); given
    // again without them it is only answered 250, and another mailbox still gets 452.
    let (cfg, mut lines) = at_a_limit_of_100(
        "MAIL FROM:<a@b.test>",
        "RCPT TO:<a@d0.example> NOTIFY=NEVER",
    );
    lines.push("RCPT TO:<a@D0.example> NOTIFY=SUCCESS,FAILURE".to_owned());
    lines.push("RCPT TO:<a@d7.example> ORCPT=rfc822;a@d7.example".to_owned());
    lines.push("RCPT TO:<a@d8.example>".to_owned());
    lines.push("RCPT TO:<a@d100.example> NOTIFY=SUCCESS".to_owned());
    lines.push("DATA".to_owned());
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let mut input = client(&lines);
    input.extend_from_slice(b"x\r\n.\r\n");
    let o = run(&cfg, false, &input, &[]);
    assert_eq!(
        o.output.matches("250 2.1.5 Ok").count(),
        103,
        "{}",
        o.output
    );
    assert_eq!(o.output.matches("452 4.5.3 Too many recipients").count(), 1);
    assert_eq!(o.messages.len(), 1, "{}", o.output);
    let rcpts = &o.messages[0].1;
    assert_eq!(rcpts.len(), 102);
    assert_eq!(rcpts[100..], ["a@D0.example", "a@d7.example"]);
}

#[test]
fn refused_chunks_without_end_still_end_the_session_as_junk() {
    // Discarded chunks are not errors, but they move no mail forward: a client that sends
    // nothing else is ended by the junk limit, as with NOOPs.
    let mut input = client(&["EHLO client.test"]);
    for _ in 0..300 {
        input.extend_from_slice(b"BDAT 1\r\nx");
    }
    let o = run(&config(), false, &input, &[]);
    assert!(o.closed, "{}", o.output);
    assert!(o.output.ends_with(
        "503 5.5.1 Need MAIL command\r\n421 4.7.0 mx.test Too many commands without mail, closing connection\r\n"
    ));
    assert!(o.output.matches("503 5.5.1 Need MAIL command").count() < 150);
    // `LAST` chunks end what a pipeline could hold: each one after is the client's own
    // error, and the error limit (20) ends the session sooner.
    let mut input = client(&["EHLO client.test"]);
    for _ in 0..300 {
        input.extend_from_slice(b"BDAT 1 LAST\r\nx");
    }
    let o = run(&config(), false, &input, &[]);
    assert!(o.closed, "{}", o.output);
    assert!(
        o.output.matches("503 5.5.1 Need MAIL command").count() <= 20,
        "{}",
        o.output
    );
    assert!(o.output.ends_with("closing connection\r\n"), "{}", o.output);
}

#[test]
fn an_empty_chunk_behind_a_refused_one_counts_once_as_junk() {
    // Empty chunks after a refused one: each is one command without mail, as a NOOP, so the
    // session ends where 119 NOOPs after EHLO would, not at about half that.
    let mut input = client(&["EHLO client.test"]);
    input.extend_from_slice(b"BDAT 1\r\nx");
    for _ in 0..200 {
        input.extend_from_slice(b"BDAT 0\r\n");
    }
    let o = run(&config(), false, &input, &[]);
    assert!(o.closed, "{}", o.output);
    // EHLO and the refused chunk, then 118 empty chunks answered before the 421.
    let empty = o.output.matches("503 5.5.1 Need MAIL command").count() - 1;
    assert_eq!(empty, 118, "{}", o.output);
}

#[test]
fn a_503_the_embedding_gives_a_first_chunk_ends_the_transaction() {
    // Only the protocol's own "no RCPT yet" keeps the transaction; a 503 the embedding gives
    // at the first chunk ends it, so the chunk pipelined behind is not taken as the rest of
    // a message whose start was refused.
    let mut input = client(&[
        "EHLO client.test",
        "MAIL FROM:<a@refuse-503.example>",
        "RCPT TO:<c@mx.test>",
    ]);
    input.extend_from_slice(b"BDAT 5\r\nhelloBDAT 5 LAST\r\nthere");
    let o = run_every_split(&config(), &input);
    assert_tail(
        &o,
        &[
            "250 2.1.5 Ok",
            "503 5.5.1 Refused here",
            // The chunk pipelined behind it is discarded with the same refusal.
            "503 5.5.1 Refused here",
        ],
    );
    assert!(o.messages.is_empty());
}

#[test]
fn a_session_closed_by_its_client_gets_no_second_closing_reply_at_the_stop() {
    // QUIT while a BDAT transaction is open: 221 and close. The server's stop (or a timeout)
    // that comes next must not say 421 after that 221 (RFC 5321 3.8: one closing reply).
    use postern_proto::{Event, ServerSession};
    let mut s = ServerSession::new(config(), false);
    s.greet();
    let input: &[u8] =
        b"EHLO x\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nBDAT 10\r\n0123456789QUIT\r\n";
    let mut pos = 0;
    for _ in 0..100 {
        let step = s.handle(&input[pos..]);
        pos += step.consumed;
        match step.event {
            Event::NeedInput => break,
            Event::Mail(..) | Event::Rcpt(..) | Event::DataStart => s.accept(),
            _ => {}
        }
        if s.is_closed() {
            break;
        }
    }
    let before = String::from_utf8_lossy(s.output()).into_owned();
    assert!(before.ends_with("221 2.0.0 mx.test Bye\r\n"), "{before}");
    assert!(s.is_closed());
    s.shutdown();
    s.timeout();
    let after = String::from_utf8_lossy(s.output()).into_owned();
    assert_eq!(after, before, "a reply after the 221");
}

#[test]
fn a_session_closed_by_a_limit_with_a_message_open_tells_the_embedding() {
    // The error limit: a chunk of a message taken, then an unknown command that is the last
    // error allowed. The session closes with 421, and the message begun is abandoned.
    let limited = Arc::new(ServerConfig {
        max_errors: 2,
        ..(*config()).clone()
    });
    let mut input = client(&[
        "EHLO client.test",
        "MAIL FROM:<a@b.example>",
        "RCPT TO:<x@d.example>",
        "FOO",
    ]);
    input.extend_from_slice(b"BDAT 5\r\nhello");
    input.extend_from_slice(&client(&["FOO"]));
    let o = run_every_split(&limited, &input);
    assert!(o.closed, "{}", o.output);
    assert!(o
        .output
        .ends_with("421 4.7.0 mx.test Too many errors, closing connection\r\n"));
    assert_eq!((o.starts, o.aborted), (1, 1), "{}", o.output);

    // The junk limit, reached by the RSET that drops the message.
    let junk_limited = Arc::new(ServerConfig {
        max_errors: 1,
        max_junk_commands: 1,
        ..(*config()).clone()
    });
    let mut input = client(&[
        "EHLO client.test",
        "MAIL FROM:<a@b.example>",
        "RCPT TO:<x@d.example>",
    ]);
    input.extend_from_slice(b"BDAT 5\r\nhello");
    input.extend_from_slice(&client(&["RSET"]));
    let o = run_every_split(&junk_limited, &input);
    assert!(o.closed, "{}", o.output);
    assert_eq!((o.starts, o.aborted), (1, 1), "{}", o.output);
}
