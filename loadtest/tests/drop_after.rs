//! `--drop-after`: the sink closes a connection without a reply at its N-th message; the
//! sender counts those as failed, reconnects, and the record holds only what was accepted.
#![allow(clippy::unwrap_used)]

mod common;

use common::{num, record_path, send_json, Sink};

#[test]
fn dropped_connections_lose_only_the_unanswered_message() {
    let (_dir, record) = record_path();
    let sink = Sink::start(&["--drop-after", "3", "--record", record.to_str().unwrap()]);
    let report = send_json(&sink.addr, &["--messages", "30", "--pipelining"]);
    let c = sink.stop();
    // One connection: two accepted, the third dropped, a new connection, and so on.
    assert_eq!(num(&report, "messages_accepted"), 20);
    assert_eq!(num(&report, "messages_failed"), 10);
    assert_eq!(report["errors"]["connection_closed"].as_u64(), Some(10));
    assert_eq!(c.get("dropped_total"), 10);
    assert_eq!(c.get("messages_total"), 20);
    let recorded = std::fs::read_to_string(&record).unwrap().lines().count();
    assert_eq!(recorded, 20);
}
