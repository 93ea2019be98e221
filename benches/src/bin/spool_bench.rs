//! Spool throughput beside the raw disk, measured in the same run on the same filesystem:
//!
//! - durable appends per second with group commit (a batch of messages, then one sync), against
//!   a plain loop of `write` + `fdatasync` per message;
//! - 10 MiB messages in MB/s against plain sequential `write` + one `fdatasync` of the same bytes;
//! - recovery time of a spool of about 1 GiB.
//!
//! `cargo run --release -p postern-benches --bin spool-bench -- [DIR]` (its files go in a new
//! directory inside DIR, /var/tmp by default, removed at the end; the figures are medians of 5
//! runs).
#![forbid(unsafe_code)]

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use postern_spool::{recover, MessageMeta, Recipient, Spool, SpoolOptions};

const RUNS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn meta() -> MessageMeta {
    MessageMeta {
        arrival: 1_795_346_220,
        client: "192.0.2.1".into(),
        helo: "client.example".into(),
        reverse_path: "sender@origin.example".into(),
        recipients: vec![Recipient {
            path: "rcpt@dest.example".into(),
            notify: None,
            orcpt: None,
        }],
        ..MessageMeta::default()
    }
}

fn fresh(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).expect("bench directory");
    p
}

/// Messages per second: `count` messages of `size`, one sync per `batch` messages.
fn spool_rate(dir: &Path, count: usize, size: usize, batch: usize) -> f64 {
    let root = fresh(dir, "spool");
    let mut spool = Spool::open(&root, 0, SpoolOptions::default()).expect("open spool");
    let body = vec![b'x'; size];
    let meta = meta();
    // Segments are made ahead of time on a helper thread, as the server does on its blocking
    // pool.
    let mut maker: Option<
        std::thread::JoinHandle<std::io::Result<postern_spool::PreparedSegment>>,
    > = None;
    let start = Instant::now();
    for i in 0..count {
        if maker.as_ref().is_some_and(|m| m.is_finished()) {
            if let Some(m) = maker.take() {
                spool.install_spare(m.join().expect("segment maker"));
            }
        }
        if maker.is_none() {
            if let Some(job) = spool.spare_job() {
                maker = Some(std::thread::spawn(move || job.run()));
            }
        }
        let mut d = spool.begin(&meta).expect("begin");
        for piece in body.chunks(64 * 1024) {
            spool.append(&mut d, piece).expect("append");
        }
        spool.finish(d).expect("finish");
        if (i + 1) % batch == 0 || i + 1 == count {
            spool.sync_now().expect("sync");
        }
    }
    count as f64 / start.elapsed().as_secs_f64()
}

/// Messages per second of a plain loop: write the message, fdatasync, next.
fn raw_rate(dir: &Path, count: usize, size: usize, batch: usize) -> f64 {
    let path = fresh(dir, "raw").join("file");
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)
        .expect("raw file");
    let body = vec![b'x'; size];
    let start = Instant::now();
    for i in 0..count {
        f.write_all(&body).expect("write");
        if (i + 1) % batch == 0 || i + 1 == count {
            f.sync_data().expect("fdatasync");
        }
    }
    count as f64 / start.elapsed().as_secs_f64()
}

fn recovery_time(dir: &Path, bytes: u64) -> (Duration, usize) {
    let root = fresh(dir, "recovery");
    let mut spool = Spool::open(&root, 0, SpoolOptions::default()).expect("open spool");
    let body = vec![b'r'; 100 * 1024];
    let meta = meta();
    let mut written = 0;
    while written < bytes {
        let mut d = spool.begin(&meta).expect("begin");
        spool.append(&mut d, &body).expect("append");
        spool.finish(d).expect("finish");
        written += body.len() as u64;
    }
    spool.sync_now().expect("sync");
    drop(spool);
    // Drop the page cache's copy where allowed, so recovery reads the disk.
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
    let start = Instant::now();
    let r = recover(&root).expect("recover");
    let mut sum = 0u64;
    for m in &r.messages {
        for piece in r.body(m) {
            sum += u64::from(piece[0]);
        }
    }
    std::hint::black_box(sum);
    (start.elapsed(), r.messages.len())
}

fn main() {
    let dir = std::env::args().nth(1).map_or_else(
        || std::env::temp_dir().join(format!("postern-spool-bench-{}", std::process::id())),
        PathBuf::from,
    );
    let dir = if dir.starts_with("/tmp") {
        PathBuf::from("/var/tmp").join(dir.file_name().unwrap_or_default())
    } else {
        dir
    };
    // Everything goes in a directory of its own made inside the one given, removed at the
    // end: the directory given (a disk's mount point, a data directory) is never emptied.
    std::fs::create_dir_all(&dir).expect("bench directory");
    let dir = dir.join(format!("postern-spool-bench-{}", std::process::id()));
    std::fs::create_dir(&dir).expect("a bench directory of its own");
    println!("directory: {}", dir.display());
    println!("| workload | postern spool (median of {RUNS}) | raw write + fdatasync (same run) | ratio |");
    println!("| --- | --- | --- | --- |");

    // Each run measures the spool and its reference back to back, so that drift on a shared
    // machine hits both; the ratio reported is the median of the per-run ratios.
    let paired = |spool: &dyn Fn() -> f64, raw: &dyn Fn() -> f64| {
        let (mut s, mut r, mut q) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..RUNS {
            let (a, b) = (spool(), raw());
            s.push(a);
            r.push(b);
            q.push(a / b);
        }
        (median(s), median(r), median(q))
    };
    let (n, size) = (200_000, 1024);
    let (s, r, q) = paired(&|| spool_rate(&dir, n, size, 256), &|| {
        raw_rate(&dir, 5_000, size, 1)
    });
    println!("| 1 KiB, durable, sync per 256 messages | {s:.0} msg/s | {r:.0} msg/s (sync per message) | {q:.1} |");
    let (s, r, q) = paired(&|| spool_rate(&dir, n, size, 256), &|| {
        raw_rate(&dir, n, size, 256)
    });
    println!("| 1 KiB, durable, sync per 256 messages | {s:.0} msg/s | {r:.0} msg/s (sync per 256) | {q:.2} |");
    if std::env::var_os("SPOOL_BENCH_SMALL_ONLY").is_some() {
        return;
    }
    for (label, size, count, batch) in [
        ("100 KiB", 100 * 1024, 5_000, 16),
        ("10 MiB", 10 * 1024 * 1024, 40, 1),
    ] {
        let (s, r, q) = paired(&|| spool_rate(&dir, count, size, batch), &|| {
            raw_rate(&dir, count, size, batch)
        });
        let mb = |rate: f64| rate * size as f64 / 1e6;
        println!(
            "| {label}, durable, sync per {batch} | {s:.0} msg/s, {:.0} MB/s | {r:.0} msg/s, {:.0} MB/s | {q:.2} |",
            mb(s),
            mb(r)
        );
    }

    let (t, msgs) = recovery_time(&dir, 1 << 30);
    println!();
    println!(
        "recovery of 1 GiB ({msgs} messages of 100 KiB, bodies read): {:.2} s",
        t.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
