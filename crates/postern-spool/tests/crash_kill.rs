//! Crash test: a writer child process is SIGKILLed at random moments, 200 times over the same
//! spool; after each kill the spool is recovered and checked:
//! - every acknowledged message is present and intact, unless final statuses were written for
//!   both of its recipients (then it may have been reclaimed);
//! - every message reported whole is one the child finished, with the bytes it wrote (a
//!   finished but unacknowledged message may survive: docs/durability.md), never an aborted or
//!   cut-off one;
//! - every acknowledged status is there;
//! - a kill corrupts nothing and leaves no message with a hole in its body.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use common::fnv;
use postern_spool::{recover, DeliveryState, MessageMeta, Spool, SpoolOptions, Status};

const ITERATIONS: u64 = 200;

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn outcome(rcpt: u32) -> Status {
    Status {
        state: if rcpt == 0 {
            DeliveryState::Delivered
        } else {
            DeliveryState::Failed
        },
        reply: format!("rcpt {rcpt} done"),
    }
}

/// The child: writes messages (bounded), printing BEGIN, ABORT, FIN (finished), ACK (durable),
/// STATUS (a status about to be written), SACK (a status durable) and FINAL (about to be
/// reclaimed) lines as it goes.
#[test]
#[ignore = "run by crash_kill_many_times as a child process"]
fn crash_child() {
    let Ok(dir) = std::env::var("POSTERN_CRASH_DIR") else {
        return;
    };
    let mut rng: u64 = std::env::var("POSTERN_CRASH_SEED")
        .unwrap()
        .parse()
        .unwrap();
    let mut spool = Spool::open(
        dir.as_ref(),
        0,
        SpoolOptions {
            segment_size: 256 * 1024,
        },
    )
    .unwrap();
    let mut out = std::io::stdout().lock();
    let mut unsynced = Vec::new();
    let mut statuses_unsynced: Vec<(String, u32)> = Vec::new();
    // Messages waiting for outcomes, oldest first: earlier children's, then this one's.
    let mut acked: std::collections::VecDeque<String> = recover(dir.as_ref())
        .unwrap()
        .messages
        .iter()
        .filter(|m| m.statuses.iter().all(Option::is_none))
        .map(|m| m.queue_id.clone())
        .collect();
    let mut finals: HashMap<String, u32> = HashMap::new();
    for i in 0..5_000u64 {
        let meta = MessageMeta {
            arrival: i,
            reverse_path: format!("s{i}@x.test"),
            recipients: common::meta(0).recipients,
            ..MessageMeta::default()
        };
        let mut d = spool.begin(&meta).unwrap();
        writeln!(out, "BEGIN {}", d.queue_id()).unwrap();
        out.flush().unwrap();
        let len = (xorshift(&mut rng) % 40_000) as usize;
        let body: Vec<u8> = (0..len).map(|k| (k as u64 ^ rng) as u8).collect();
        for piece in body.chunks(1 + (xorshift(&mut rng) % 20_000) as usize) {
            spool.append(&mut d, piece).unwrap();
        }
        if xorshift(&mut rng) % 8 == 0 {
            let id = d.queue_id().to_owned();
            spool.abort(d);
            writeln!(out, "ABORT {id}").unwrap();
            continue;
        }
        let id = d.queue_id().to_owned();
        spool.finish(d).unwrap();
        writeln!(out, "FIN {id} {} {}", fnv(&body), body.len()).unwrap();
        unsynced.push(id);
        // Outcomes for the oldest acknowledged messages, so that segments empty in order.
        for _ in 0..xorshift(&mut rng) % 3 {
            let Some(id) = acked.pop_front() else { break };
            for rcpt in 0..2 {
                writeln!(out, "STATUS {id} {rcpt}").unwrap();
                out.flush().unwrap();
                spool.append_status(&id, rcpt, &outcome(rcpt)).unwrap();
                statuses_unsynced.push((id.clone(), rcpt));
            }
        }
        if xorshift(&mut rng) % 3 == 0 {
            spool.sync_now().unwrap();
            for id in unsynced.drain(..) {
                writeln!(out, "ACK {id}").unwrap();
                acked.push_back(id);
            }
            for (id, rcpt) in statuses_unsynced.drain(..) {
                writeln!(out, "SACK {id} {rcpt}").unwrap();
                let n = finals.entry(id.clone()).or_default();
                *n += 1;
                if *n == 2 {
                    writeln!(out, "FINAL {id}").unwrap();
                    out.flush().unwrap();
                    spool.mark_final(&id).unwrap();
                }
            }
        }
        out.flush().unwrap();
    }
}

#[derive(Default)]
struct Seen {
    begun: HashSet<String>,
    aborted: HashSet<String>,
    finished: HashMap<String, (u64, usize)>,
    acked: HashSet<String>,
    status_written: HashMap<String, Vec<u32>>,
    status_acked: HashMap<String, Vec<u32>>,
    /// The message in flight at each kill.
    cut: HashSet<String>,
}

impl Seen {
    fn record(&mut self, line: &str, last_begun: &mut Option<String>) {
        // libtest may print "test crash_child ... " on the same line as the first record.
        let Some(at) = [
            "BEGIN ", "ABORT ", "FIN ", "ACK ", "STATUS ", "SACK ", "FINAL ",
        ]
        .iter()
        .filter_map(|k| line.find(k))
        .min() else {
            return;
        };
        let mut words = line[at..].split(' ');
        match (words.next(), words.next()) {
            (Some("BEGIN"), Some(id)) => {
                self.begun.insert(id.to_owned());
                *last_begun = Some(id.to_owned());
            }
            (Some("ABORT"), Some(id)) => {
                self.aborted.insert(id.to_owned());
            }
            (Some("FIN"), Some(id)) => {
                let hash = words.next().unwrap().parse().unwrap();
                let len = words.next().unwrap().parse().unwrap();
                self.finished.insert(id.to_owned(), (hash, len));
            }
            (Some("ACK"), Some(id)) => {
                self.acked.insert(id.to_owned());
            }
            (Some(kind @ ("STATUS" | "SACK")), Some(id)) => {
                let rcpt = words.next().unwrap().parse().unwrap();
                let to = if kind == "SACK" {
                    &mut self.status_acked
                } else {
                    &mut self.status_written
                };
                to.entry(id.to_owned()).or_default().push(rcpt);
            }
            _ => {}
        }
    }

    fn all_final_acked(&self, id: &str) -> bool {
        self.status_acked
            .get(id)
            .is_some_and(|r| r.contains(&0) && r.contains(&1))
    }

    fn all_final_written(&self, id: &str) -> bool {
        self.status_written
            .get(id)
            .is_some_and(|r| r.contains(&0) && r.contains(&1))
    }
}

#[test]
fn crash_kill_many_times() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut seen = Seen::default();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut reclaimed = 0;
    for iteration in 0..ITERATIONS {
        let mut child = Command::new(&exe)
            .args([
                "--ignored",
                "--exact",
                "crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("POSTERN_CRASH_DIR", dir.path())
            .env("POSTERN_CRASH_SEED", (iteration + 1).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let kill_after = 1 + xorshift(&mut rng) % 80;
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut last_begun = None;
        for _ in 0..kill_after {
            let Some(Ok(line)) = lines.next() else { break };
            seen.record(&line, &mut last_begun);
        }
        child.kill().unwrap();
        // Everything the child printed before it died is still in the pipe.
        for line in lines.map_while(Result::ok) {
            seen.record(&line, &mut last_begun);
        }
        child.wait().unwrap();
        if let Some(id) = last_begun.take() {
            seen.cut.insert(id);
        }

        let r = recover(dir.path()).unwrap();
        let mut found = HashSet::new();
        for m in &r.messages {
            let body = m.body().to_vec();
            match seen.finished.get(&m.queue_id) {
                Some(&(hash, len)) => assert_eq!(
                    (fnv(&body), body.len()),
                    (hash, len),
                    "iteration {iteration}: {} damaged",
                    m.queue_id
                ),
                // Killed between writing END and printing FIN: only a message in flight at a kill.
                None => assert!(
                    seen.cut.contains(&m.queue_id),
                    "iteration {iteration}: {} was never finished (begun: {}, aborted: {})",
                    m.queue_id,
                    seen.begun.contains(&m.queue_id),
                    seen.aborted.contains(&m.queue_id),
                ),
            }
            assert!(
                !seen.aborted.contains(&m.queue_id),
                "iteration {iteration}: aborted {} came back",
                m.queue_id
            );
            for &rcpt in seen.status_acked.get(&m.queue_id).into_iter().flatten() {
                assert_eq!(
                    m.statuses[rcpt as usize],
                    Some(outcome(rcpt)),
                    "iteration {iteration}: a status of {} lost",
                    m.queue_id
                );
            }
            if seen.all_final_acked(&m.queue_id) {
                assert!(m.is_final());
            }
            found.insert(m.queue_id.clone());
        }
        for id in &seen.acked {
            if !found.contains(id) {
                assert!(
                    seen.all_final_written(id),
                    "iteration {iteration}: acknowledged {id} lost"
                );
                reclaimed += 1;
            }
        }
        assert_eq!(
            r.corrupt_records, 0,
            "iteration {iteration}: a process kill corrupts nothing: {:?}",
            r.corrupt_at
        );
        assert_eq!(
            r.damaged, 0,
            "iteration {iteration}: a process kill leaves no message with a hole in its body"
        );
    }
    let statuses: usize = seen.status_acked.values().map(Vec::len).sum();
    assert!(
        seen.acked.len() > 200 && statuses > 100 && reclaimed > 0,
        "the children did too little to prove anything: {} acked, {statuses} statuses, \
         {reclaimed} reclaimed",
        seen.acked.len()
    );
}
