//! Recipients a server refuses at RCPT, in transactions it takes up for the others: the
//! message counts as accepted, and the report says how many recipients were refused and
//! with which codes, in its text and its JSON.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, Write};

use common::num;

#[test]
fn recipients_refused_beside_accepted_ones_are_counted_by_code() {
    // Of each message's three recipients the first is taken, the second refused for good,
    // the third for now.
    let (addr, server) = common::one_connection_server(|input, mut out| {
        let mut rcpts = 0usize;
        let mut in_body = false;
        // Bounded: the sender sends its messages and QUIT, then closes.
        for line in input.lines() {
            let Ok(line) = line else { break };
            if in_body {
                if line == "." {
                    in_body = false;
                    out.write_all(b"250 2.0.0 kept\r\n").unwrap();
                }
                continue;
            }
            let verb = line.get(..4).unwrap_or(&line).to_ascii_uppercase();
            let reply: &[u8] = match verb.as_str() {
                "EHLO" => b"250-scripted\r\n250 PIPELINING\r\n",
                "MAIL" => b"250 2.1.0 ok\r\n",
                "RCPT" => {
                    rcpts += 1;
                    match rcpts % 3 {
                        1 => b"250 2.1.5 ok\r\n",
                        2 => b"550 5.1.1 no such user\r\n",
                        _ => b"452 4.2.2 mailbox full\r\n",
                    }
                }
                "DATA" => {
                    in_body = true;
                    b"354 go ahead\r\n"
                }
                "QUIT" => b"221 2.0.0 bye\r\n",
                _ => b"500 5.5.2 what\r\n",
            };
            out.write_all(reply).unwrap();
            if verb == "QUIT" {
                break;
            }
        }
    });
    let (out, report) = common::send_with_report(
        &addr,
        &["--messages", "4", "--rcpts", "3", "--pipelining", "--quiet"],
    );
    server.join().unwrap();
    assert!(out.status.success(), "{report}");
    assert_eq!(num(&report, "messages_accepted"), 4, "{report}");
    assert_eq!(num(&report, "recipients_refused"), 8, "{report}");
    assert_eq!(report["recipient_refusals"]["550"], 4, "{report}");
    assert_eq!(report["recipient_refusals"]["452"], 4, "{report}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("rcpts:    8 refused at RCPT") && text.contains("452: 4, 550: 4"),
        "{text}"
    );
}
