//! The sender's report and the sink's counters tell the same story: messages, bytes,
//! recipients, connections and the count of every reply code, also when the sink injects
//! failures, and /metrics serves the same counters while the sink runs.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::{num, send_json, Counters, Sink};

#[test]
fn counts_agree() {
    let sink = Sink::start(&[]);
    let report = send_json(
        &sink.addr,
        &[
            "--messages",
            "500",
            "--connections",
            "5",
            "--rcpts",
            "3",
            "--pipelining",
            "--size",
            "2k:1,7k:1",
        ],
    );
    let c = sink.stop();
    assert_eq!(num(&report, "messages_sent"), 500);
    assert_eq!(num(&report, "messages_accepted"), c.get("messages_total"));
    assert_eq!(num(&report, "bytes_accepted"), c.get("bytes_total"));
    assert_eq!(num(&report, "bytes_sent"), c.get("bytes_received_total"));
    assert_eq!(
        num(&report, "connections_opened"),
        c.get("connections_total")
    );
    assert_eq!(c.get("recipients_total"), 3 * 500);
    assert_eq!(report["replies"]["250"].as_u64(), Some(500));
}

#[test]
fn injected_failures_are_counted_the_same_on_both_sides() {
    let sink = Sink::start(&["--reply-mix", "250:8,451:1,550:1"]);
    let report = send_json(
        &sink.addr,
        &["--messages", "100", "--connections", "2", "--pipelining"],
    );
    let c = sink.stop();
    assert_eq!(num(&report, "messages_accepted"), 80);
    assert_eq!(num(&report, "messages_refused"), 20);
    for code in ["250", "451", "550"] {
        let sent = report["replies"][code].as_u64().unwrap_or(0);
        let seen = c.get(&format!("replies_total{{code=\"{code}\"}}"));
        assert_eq!(sent, seen, "code {code}");
    }
    assert_eq!(c.get("replies_total{code=\"451\"}"), 10);
}

#[test]
fn the_reply_mix_holds_for_the_sink_as_a_whole_whatever_its_threads() {
    // 98:1:1 over 100 messages is one of each failure, though 4 executors each take only
    // some of the messages (a share counted per executor would come round on none of them).
    let sink = Sink::start(&["--threads", "4", "--reply-mix", "250:98,451:1,550:1"]);
    let report = send_json(
        &sink.addr,
        &["--messages", "100", "--connections", "16", "--pipelining"],
    );
    let c = sink.stop();
    assert_eq!(c.get("replies_total{code=\"451\"}"), 1);
    assert_eq!(c.get("replies_total{code=\"550\"}"), 1);
    assert_eq!(num(&report, "messages_accepted"), 98, "{report}");
}

#[test]
fn injected_refusals_never_add_up_to_a_close() {
    // Twenty-nine 550s on one connection: each is the sink's own fault, not the client's
    // error, so the sink never closes with "too many errors" and the mix stays as asked.
    let sink = Sink::start(&["--reply-mix", "250:1,550:29"]);
    let report = send_json(&sink.addr, &["--messages", "30", "--connections", "1"]);
    let c = sink.stop();
    assert_eq!(num(&report, "messages_accepted"), 1, "{report}");
    assert_eq!(num(&report, "messages_refused"), 29, "{report}");
    assert_eq!(num(&report, "messages_failed"), 0, "{report}");
    assert_eq!(num(&report, "connections_opened"), 1, "{report}");
    assert_eq!(c.get("connections_total"), 1);
}

#[test]
fn an_injected_421_closes_the_connection() {
    // 250 and 421 in turn: each 421 ends its connection (RFC 5321 3.8), so what the sender
    // pipelined behind it is never read as another transaction.
    let sink = Sink::start(&["--reply-mix", "250:1,421:1"]);
    let report = send_json(
        &sink.addr,
        &["--messages", "20", "--connections", "1", "--pipelining"],
    );
    let c = sink.stop();
    assert_eq!(num(&report, "messages_accepted"), 10, "{report}");
    // Each 421 answered a message, which the server so refused: counted as the sink counts
    // it, not as a failure.
    assert_eq!(num(&report, "messages_refused"), 10, "{report}");
    assert_eq!(num(&report, "messages_failed"), 0, "{report}");
    assert_eq!(c.get("messages_total"), 10);
    assert_eq!(c.get("replies_total{code=\"421\"}"), 10);
    assert_eq!(c.get("connections_total"), 10, "one connection per 421");
}

#[test]
fn metrics_are_served_while_running() {
    let sink = Sink::start(&["--metrics", "127.0.0.1:0"]);
    send_json(&sink.addr, &["--messages", "30"]);
    let mut http = TcpStream::connect(sink.metrics.as_deref().unwrap()).unwrap();
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    http.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let live = Counters::parse(body);
    let at_exit = sink.stop();
    assert_eq!(live.get("messages_total"), 30);
    assert_eq!(live.0, at_exit.0);
}

fn http(addr: &str, request: &[u8]) -> String {
    let mut http = TcpStream::connect(addr).unwrap();
    http.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    http.write_all(request).unwrap();
    let mut response = String::new();
    http.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn a_silent_metrics_client_does_not_hold_up_a_scrape() {
    let sink = Sink::start(&["--metrics", "127.0.0.1:0"]);
    let addr = sink.metrics.clone().unwrap();
    // Clients that connect and send nothing, or half a request.
    let _idle: Vec<TcpStream> = (0..3)
        .map(|i| {
            let mut s = TcpStream::connect(&addr).unwrap();
            if i > 0 {
                s.write_all(b"GET /met").unwrap();
            }
            s
        })
        .collect();
    let started = std::time::Instant::now();
    let response = http(&addr, b"GET /metrics?name=x HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "the scrape waited {:?} behind silent clients",
        started.elapsed()
    );
    let head = http(&addr, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.ends_with("\r\n\r\n"),
        "a HEAD answer has no body: {head}"
    );
    let post = http(&addr, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    sink.stop();
}

#[test]
fn the_record_reaches_its_file_while_the_sink_runs() {
    let (_dir, record) = common::record_path();
    let sink = Sink::start(&["--record", record.to_str().unwrap()]);
    send_json(&sink.addr, &["--messages", "300", "--connections", "3"]);
    // The sink goes on running: the lines must reach the file without its exit. Bounded
    // wait for the writer (the executors hand over their lines every 50 ms).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let lines = loop {
        let lines = std::fs::read_to_string(&record)
            .unwrap_or_default()
            .lines()
            .count();
        if lines == 300 || std::time::Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(lines, 300, "lines in the record while the sink runs");
    sink.stop();
    common::check_record(&record, 0..300);
}

#[test]
fn the_report_says_when_the_server_offered_less_than_was_asked() {
    let sink = Sink::start(&["--no-chunking", "--no-pipelining"]);
    let report = send_json(
        &sink.addr,
        &[
            "--messages",
            "20",
            "--connections",
            "2",
            "--pipelining",
            "--bdat",
        ],
    );
    sink.stop();
    assert_eq!(num(&report, "connections_without_pipelining"), 2);
    assert_eq!(num(&report, "connections_without_chunking"), 2);
    let sink = Sink::start(&[]);
    let report = send_json(&sink.addr, &["--messages", "20", "--pipelining", "--bdat"]);
    sink.stop();
    assert_eq!(num(&report, "connections_without_pipelining"), 0);
    assert_eq!(num(&report, "connections_without_chunking"), 0);
}

#[test]
fn a_dropped_message_takes_no_share_of_the_reply_mix() {
    // Each connection's second message is dropped unanswered, so only first messages get a
    // reply. The shares are of the replies given: half 250, half 550. A dropped message that
    // took its slot of the cycle left every answered message on the same half.
    let sink = Sink::start(&["--drop-after", "2", "--reply-mix", "250:1,550:1"]);
    let report = send_json(&sink.addr, &["--messages", "20", "--connections", "1"]);
    let c = sink.stop();
    assert_eq!(c.get("dropped_total"), 10, "{c:?}");
    assert_eq!(c.get("replies_total{code=\"250\"}"), 5, "{c:?}");
    assert_eq!(c.get("replies_total{code=\"550\"}"), 5, "{c:?}");
    assert_eq!(num(&report, "messages_accepted"), 5, "{report}");
    assert_eq!(num(&report, "messages_refused"), 5, "{report}");
}

#[test]
fn each_message_the_sink_accepts_gets_a_queue_id_of_its_own() {
    // Without a reply mix: two connections, three messages each, spread by the kernel over
    // the sink's two executors or not.
    let sink = Sink::start(&["--threads", "2"]);
    let mut ids = std::collections::BTreeSet::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(&sink.addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut script = String::from("EHLO c\r\n");
        for _ in 0..3 {
            script.push_str("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n");
            script.push_str("Subject: s\r\n\r\nbody\r\n.\r\n");
        }
        script.push_str("QUIT\r\n");
        s.write_all(script.as_bytes()).unwrap();
        let mut replies = String::new();
        s.read_to_string(&mut replies).unwrap();
        let queued: Vec<&str> = replies
            .lines()
            .filter_map(|l| l.split_once("queued as ").map(|(_, id)| id.trim()))
            .collect();
        assert_eq!(queued.len(), 3, "{replies}");
        ids.extend(queued.into_iter().map(str::to_owned));
    }
    sink.stop();
    assert_eq!(ids.len(), 6, "{ids:?}");
}

#[test]
fn a_body_over_the_size_limit_counts_among_the_end_of_data_replies() {
    // No SIZE= at MAIL: the sink finds each body too big only as it comes, by DATA, by one
    // BDAT chunk, and by the second of two.
    let sink = Sink::start(&["--max-size", "2k"]);
    let mut s = TcpStream::connect(&sink.addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let envelope = "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n";
    let big = format!("Subject: s\r\n\r\n{}\r\n", "x".repeat(3000));
    let mut script = String::from("EHLO c\r\n");
    script.push_str(&format!("{envelope}DATA\r\n{big}.\r\n"));
    script.push_str(&format!(
        "{envelope}DATA\r\nSubject: s\r\n\r\nsmall\r\n.\r\n"
    ));
    script.push_str(&format!("{envelope}BDAT {} LAST\r\n{big}", big.len()));
    let (first, second) = big.split_at(1500);
    script.push_str(&format!("{envelope}BDAT {}\r\n{first}", first.len()));
    script.push_str(&format!("BDAT {} LAST\r\n{second}", second.len()));
    script.push_str("QUIT\r\n");
    s.write_all(script.as_bytes()).unwrap();
    let mut replies = String::new();
    s.read_to_string(&mut replies).unwrap();
    assert_eq!(replies.matches("\r\n552 ").count(), 3, "{replies}");
    let c = sink.stop();
    assert_eq!(c.get("replies_total{code=\"552\"}"), 3, "{c:?}");
    assert_eq!(c.get("replies_total{code=\"250\"}"), 1, "{c:?}");
    assert_eq!(c.get("messages_total"), 1, "{c:?}");
}

#[test]
fn the_sink_runs_without_transparent_huge_pages() {
    // A 2 MiB page zeroed at its first touch would hold a connection for milliseconds, which
    // the sender's latencies would count as the server's (the kernel shows it from 5.0 on).
    // Only where this test's own process has them: a kernel without them, or a parent that
    // turned them off (the setting is inherited), shows 0 whatever the sink does.
    if thp_enabled(std::process::id()).as_deref() != Some("1") {
        eprintln!("transparent huge pages are off for this test already: nothing to check");
        return;
    }
    let sink = Sink::start(&[]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", sink.pid())).unwrap();
    let thp = status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(str::trim);
    assert_eq!(thp, Some("0"), "{status}");
    sink.stop();
}

/// The `THP_enabled` line of process `pid`'s status (absent before Linux 5.0).
fn thp_enabled(pid: u32) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(|v| v.trim().to_owned())
}
