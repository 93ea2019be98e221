//! Spool benchmark harness: durable appends per second and MB/s for 1 KiB, 100 KiB and 10 MiB
//! messages with group commit, each beside a plain `write` + `fdatasync` loop on the same disk
//! in the same round, and recovery time for 1 GiB of spool.
//!
//! `cargo bench -p postern-spool --bench spool` (directory: `POSTERN_BENCH_DIR`, default
//! `/var/tmp/postern-spool-bench`; rounds: `POSTERN_BENCH_ROUNDS`, default 3).
//!
//! The spool runs as the server drives it: the core thread appends and never syncs; one sync
//! batch at a time runs on a helper thread, and the next batch takes every message finished
//! meanwhile (group commit); the next segment is made ahead of time on another helper thread.
//! A message counts when its ticket is durable.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use postern_spool::{
    recover, MessageMeta, PreparedSegment, Recipient, Spool, SpoolOptions, SyncBatch, Ticket,
};

#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    size: usize,
    count: usize,
    /// Appends per message (the body arrives in chunks of this size).
    chunk: usize,
    /// Messages per `fdatasync` in the reference loop.
    ref_group: usize,
}

fn meta(i: usize) -> MessageMeta {
    MessageMeta {
        arrival: 1_795_346_220 + i as u64,
        client: "192.0.2.1".into(),
        helo: "client.test".into(),
        reverse_path: "sender@origin.test".into(),
        recipients: vec![Recipient {
            path: "rcpt@dest.test".into(),
            notify: None,
            orcpt: None,
        }],
        ..MessageMeta::default()
    }
}

/// The spool side: returns (seconds until every ticket is durable, syncs).
fn run_spool(root: &Path, w: &Workload) -> (f64, u64) {
    let _ = std::fs::remove_dir_all(root);
    let mut spool = Spool::open(root, 0, SpoolOptions::default()).expect("open");
    let body: Vec<u8> = (0..w.size).map(|k| (k * 31) as u8).collect();
    let (sync_tx, sync_rx) = mpsc::channel::<SyncBatch>();
    let (done_tx, done_rx) = mpsc::channel::<(SyncBatch, std::io::Result<()>)>();
    let syncer = std::thread::spawn(move || {
        for batch in sync_rx {
            let r = batch.run();
            if done_tx.send((batch, r)).is_err() {
                break;
            }
        }
    });
    let (spare_tx, spare_rx) = mpsc::channel::<postern_spool::SpareJob>();
    let (made_tx, made_rx) = mpsc::channel::<std::io::Result<PreparedSegment>>();
    let maker = std::thread::spawn(move || {
        for job in spare_rx {
            if made_tx.send(job.run()).is_err() {
                break;
            }
        }
    });
    let mut in_flight = false;
    let mut syncs = 0;
    let mut last: Option<Ticket> = None;
    let start = Instant::now();
    let mut poll = |spool: &mut Spool, in_flight: &mut bool, block: bool| {
        if let Ok(made) = made_rx.try_recv() {
            spool.install_spare(made);
        }
        if let Some(job) = spool.spare_job() {
            spare_tx.send(job).unwrap();
        }
        if *in_flight {
            let got = if block {
                Some(done_rx.recv().unwrap())
            } else {
                done_rx.try_recv().ok()
            };
            if let Some((batch, r)) = got {
                r.as_ref().expect("sync");
                spool.sync_done(batch, r);
                *in_flight = false;
            }
        }
        if !*in_flight {
            if let Some(batch) = spool.take_sync() {
                sync_tx.send(batch).unwrap();
                *in_flight = true;
                syncs += 1;
            }
        }
    };
    for i in 0..w.count {
        let mut d = spool.begin(&meta(i)).expect("begin");
        for piece in body.chunks(w.chunk) {
            spool.append(&mut d, piece).expect("append");
        }
        last = Some(spool.finish(d).expect("finish"));
        poll(&mut spool, &mut in_flight, false);
    }
    let last = last.expect("some messages");
    while !spool.is_durable(last) {
        poll(&mut spool, &mut in_flight, true);
    }
    let secs = start.elapsed().as_secs_f64();
    drop(sync_tx);
    drop(spare_tx);
    syncer.join().unwrap();
    maker.join().unwrap();
    (secs, syncs)
}

/// The spool with the reference's grouping: `sync_now` on this thread every `group` messages.
fn run_spool_inline(root: &Path, w: &Workload, group: usize) -> f64 {
    let _ = std::fs::remove_dir_all(root);
    let mut spool = Spool::open(root, 0, SpoolOptions::default()).expect("open");
    let body: Vec<u8> = (0..w.size).map(|k| (k * 31) as u8).collect();
    let start = Instant::now();
    for i in 0..w.count {
        let mut d = spool.begin(&meta(i)).expect("begin");
        for piece in body.chunks(w.chunk) {
            spool.append(&mut d, piece).expect("append");
        }
        spool.finish(d).expect("finish");
        if (i + 1) % group == 0 {
            spool.sync_now().expect("sync");
        }
    }
    spool.sync_now().expect("sync");
    start.elapsed().as_secs_f64()
}

/// The reference: the same bytes with `write(2)` into one file, `fdatasync` every `group`
/// messages (and at the end).
fn run_raw(root: &Path, w: &Workload, group: usize) -> f64 {
    let _ = std::fs::remove_dir_all(root);
    std::fs::create_dir_all(root).unwrap();
    let path = root.join("raw");
    let mut f: File = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let body: Vec<u8> = (0..w.size).map(|k| (k * 31) as u8).collect();
    let start = Instant::now();
    for i in 0..w.count {
        for piece in body.chunks(w.chunk) {
            f.write_all(piece).unwrap();
        }
        if (i + 1) % group == 0 {
            f.sync_data().unwrap();
        }
    }
    f.sync_data().unwrap();
    start.elapsed().as_secs_f64()
}

fn drop_caches() -> bool {
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

/// Writes `bytes` of 100 KiB messages, then times a recovery that checks every CRC and reads
/// every body. Returns (messages, cold seconds when caches could be dropped, warm seconds).
fn run_recovery(root: &Path, bytes: usize) -> (usize, Option<f64>, f64) {
    let _ = std::fs::remove_dir_all(root);
    let mut spool = Spool::open(root, 0, SpoolOptions::default()).expect("open");
    let size = 100 * 1024;
    let body: Vec<u8> = (0..size).map(|k| (k * 7) as u8).collect();
    let count = bytes / size;
    for i in 0..count {
        let mut d = spool.begin(&meta(i)).expect("begin");
        spool.append(&mut d, &body).expect("append");
        spool.finish(d).expect("finish");
        if i % 64 == 63 {
            spool.sync_now().expect("sync");
        }
    }
    spool.sync_now().expect("sync");
    drop(spool);
    let timed = || {
        let start = Instant::now();
        let r = recover(root).expect("recover");
        let mut sum = 0u64;
        for m in &r.messages {
            for c in m.body().chunks() {
                sum = sum.wrapping_add(c.iter().map(|&b| u64::from(b)).sum::<u64>());
            }
        }
        assert_eq!(r.messages.len(), count);
        std::hint::black_box(sum);
        start.elapsed().as_secs_f64()
    };
    let cold = drop_caches().then(timed);
    let warm = timed();
    (count, cold, warm)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    let root = PathBuf::from(
        std::env::var("POSTERN_BENCH_DIR")
            .unwrap_or_else(|_| "/var/tmp/postern-spool-bench".into()),
    );
    let rounds: usize = std::env::var("POSTERN_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let workloads = [
        Workload {
            name: "1 KiB",
            size: 1024,
            count: 300_000,
            chunk: 1024,
            ref_group: 256,
        },
        Workload {
            name: "100 KiB",
            size: 100 * 1024,
            count: 3_000,
            chunk: 64 * 1024,
            ref_group: 16,
        },
        Workload {
            name: "10 MiB",
            size: 10 * 1024 * 1024,
            count: 40,
            chunk: 64 * 1024,
            ref_group: 1,
        },
    ];
    println!(
        "spool bench in {} ({rounds} rounds, medians)",
        root.display()
    );
    println!(
        "| workload | spool msg/s | spool MB/s | syncs | raw write+fdatasync msg/s | raw MB/s | \
         spool/raw |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let mut inline_rows = Vec::new();
    for w in &workloads {
        let mut spool_rates = Vec::new();
        let mut raw_rates = Vec::new();
        let mut ratios = Vec::new();
        let mut syncs = Vec::new();
        let mut inline = Vec::new();
        for _ in 0..rounds {
            let (s, n) = run_spool(&root.join("spool"), w);
            let r = run_raw(&root.join("raw"), w, w.ref_group);
            let i = run_spool_inline(&root.join("spool"), w, w.ref_group);
            spool_rates.push(w.count as f64 / s);
            raw_rates.push(w.count as f64 / r);
            ratios.push(r / s);
            inline.push((w.count as f64 / i, r / i));
            syncs.push(n as f64);
        }
        let rate = median(inline.iter().map(|x| x.0).collect());
        let ratio = median(inline.iter().map(|x| x.1).collect());
        inline_rows.push(format!(
            "| {} (both: a sync per {}, on the writing thread) | {:.0} | {:.0} | {:.2} |",
            w.name,
            w.ref_group,
            rate,
            rate * w.size as f64 / 1e6,
            ratio
        ));
        let mb = |rate: f64| rate * w.size as f64 / 1e6;
        let (s, r) = (median(spool_rates), median(raw_rates));
        println!(
            "| {} (raw: a sync per {}) | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} |",
            w.name,
            w.ref_group,
            s,
            mb(s),
            median(syncs),
            r,
            mb(r),
            median(ratios)
        );
    }
    // One more reference for small messages: a sync per message, what a store without group
    // commit pays.
    let w = &workloads[0];
    let one = Workload { count: 3_000, ..*w };
    let t = run_raw(&root.join("raw"), &one, 1);
    println!(
        "| 1 KiB, raw with a sync per message | | | | {:.0} | {:.1} | |",
        one.count as f64 / t,
        one.count as f64 / t * 1024.0 / 1e6
    );

    println!();
    println!("| workload | spool msg/s | spool MB/s | spool/raw |");
    println!("| --- | --- | --- | --- |");
    for row in inline_rows {
        println!("{row}");
    }

    let (count, cold, warm) = run_recovery(&root.join("recovery"), 1 << 30);
    println!();
    println!(
        "recovery of 1 GiB ({count} messages of 100 KiB, every CRC checked, every body read): \
         cold {} s, warm {:.2} s",
        cold.map_or("n/a (cannot drop caches)".into(), |c| format!("{c:.2}")),
        warm
    );
    let _ = std::fs::remove_dir_all(&root);
}
