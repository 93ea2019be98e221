//! Crash test: a writer child process is SIGKILLed at random moments, 200 times over the same
//! spool; after each kill the spool is recovered and checked. Every acknowledged message must
//! be present and intact; every message reported whole must be one the child finished, with
//! the bytes it wrote (docs/durability.md: a finished but unacknowledged message may survive).
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use postern_spool::{recover, MessageMeta, Spool, SpoolOptions};

const ITERATIONS: u64 = 200;

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The child: writes messages forever (bounded), printing FIN when a message is finished and
/// ACK when a sync has made it durable.
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
    for i in 0..5_000u64 {
        let meta = MessageMeta {
            arrival: i,
            reverse_path: format!("s{i}@x.test"),
            recipients: vec![postern_spool::Recipient {
                path: "r@y.test".into(),
                notify: None,
                orcpt: None,
            }],
            ..MessageMeta::default()
        };
        let mut d = spool.begin(&meta).unwrap();
        writeln!(out, "BEGIN {}", d.queue_id()).unwrap();
        out.flush().unwrap();
        let len = (xorshift(&mut rng) % 40_000) as usize;
        let body: Vec<u8> = (0..len).map(|k| (k as u64 ^ rng) as u8).collect();
        for piece in body.chunks(1 + (xorshift(&mut rng) % 5000) as usize) {
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
        if xorshift(&mut rng) % 3 == 0 {
            spool.sync_now().unwrap();
            for id in unsynced.drain(..) {
                writeln!(out, "ACK {id}").unwrap();
            }
        }
        out.flush().unwrap();
    }
}

#[test]
fn crash_kill_many_times() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut finished: HashMap<String, (u64, usize)> = HashMap::new();
    let mut acked: Vec<String> = Vec::new();
    let mut aborted: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut cut: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut begun: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
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
        let kill_after = 1 + xorshift(&mut rng) % 60;
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut record = |line: &str, last_begun: &mut Option<String>| {
            // libtest may print "test crash_child ... " on the same line as the first record.
            let Some(at) = ["BEGIN ", "ABORT ", "FIN ", "ACK "]
                .iter()
                .filter_map(|k| line.find(k))
                .min()
            else {
                return;
            };
            let mut words = line[at..].split(' ');
            match (words.next(), words.next()) {
                (Some("BEGIN"), Some(id)) => {
                    begun.insert(id.to_owned());
                    *last_begun = Some(id.to_owned());
                }
                (Some("ABORT"), Some(id)) => {
                    aborted.insert(id.to_owned());
                }
                (Some("FIN"), Some(id)) => {
                    let hash = words.next().unwrap().parse().unwrap();
                    let len = words.next().unwrap().parse().unwrap();
                    finished.insert(id.to_owned(), (hash, len));
                }
                (Some("ACK"), Some(id)) => acked.push(id.to_owned()),
                _ => {}
            }
        };
        let mut last_begun = None;
        for _ in 0..kill_after {
            let Some(Ok(line)) = lines.next() else { break };
            record(&line, &mut last_begun);
        }
        child.kill().unwrap();
        // Everything the child printed before it died is still in the pipe.
        for line in lines.map_while(Result::ok) {
            record(&line, &mut last_begun);
        }
        child.wait().unwrap();
        if let Some(id) = last_begun.take() {
            cut.insert(id);
        }

        let r = recover(dir.path()).unwrap();
        let mut found = HashMap::new();
        for m in &r.messages {
            let body = r.body_vec(m);
            match finished.get(&m.queue_id) {
                Some(&(hash, len)) => assert_eq!(
                    (fnv(&body), body.len()),
                    (hash, len),
                    "iteration {iteration}: {} damaged",
                    m.queue_id
                ),
                // Killed between writing END and printing FIN: only a message in flight at a kill.
                None => assert!(
                    cut.contains(&m.queue_id),
                    "iteration {iteration}: {} was never finished (begun: {}, aborted: {}, size {})",
                    m.queue_id,
                    begun.contains(&m.queue_id),
                    aborted.contains(&m.queue_id),
                    body.len()
                ),
            }
            assert!(
                !aborted.contains(&m.queue_id),
                "iteration {iteration}: aborted {} came back",
                m.queue_id
            );
            found.insert(m.queue_id.clone(), ());
        }
        for id in &acked {
            assert!(
                found.contains_key(id),
                "iteration {iteration}: acknowledged {id} lost"
            );
        }
        assert_eq!(
            r.corrupt_records, 0,
            "iteration {iteration}: a process kill corrupts nothing"
        );
    }
    assert!(
        acked.len() > 200,
        "the children acknowledged too little to prove anything"
    );
}
