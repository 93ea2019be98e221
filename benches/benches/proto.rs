//! postern-proto hot paths, each beside a plain memchr scan of the same bytes.
//!
//! `cargo bench -p postern-benches --bench proto`; `benches/report.py` prints the ratios.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use postern_benches::{command_stream, data_wire};
use postern_proto::bdat::ChunkDecoder;
use postern_proto::crlf::LineEnds;
use postern_proto::data::DataDecoder;
use postern_proto::framer::{Frame, LineFramer};
use postern_proto::Command;

/// The reference: find every LF with memchr, as any line-oriented reader must.
fn memchr_lines(input: &[u8]) -> usize {
    memchr::memchr_iter(b'\n', input).count()
}

fn commands(c: &mut Criterion) {
    let (stream, lines) = command_stream(1000);
    let mut g = c.benchmark_group("commands");
    g.throughput(Throughput::Elements(lines as u64));
    g.bench_function("frame_and_parse", |b| {
        b.iter(|| {
            let mut f = LineFramer::new(512);
            let mut pos = 0;
            let mut ok = 0usize;
            while let Frame::Line { line, consumed } = f.next_line(&stream[pos..]) {
                pos += consumed;
                ok += usize::from(Command::parse(line).is_ok());
            }
            black_box(ok)
        })
    });
    g.bench_function("memchr_reference", |b| {
        b.iter(|| black_box(memchr_lines(black_box(&stream))))
    });
    g.finish();
}

fn bodies(c: &mut Criterion) {
    for (name, size) in [
        ("1KiB", 1024),
        ("100KiB", 100 * 1024),
        ("10MiB", 10 * 1024 * 1024),
    ] {
        let wire = data_wire(size);
        let mut g = c.benchmark_group(format!("body_{name}"));
        g.throughput(Throughput::Bytes(wire.len() as u64));
        if size > 1 << 20 {
            g.sample_size(20);
        }
        g.bench_with_input(BenchmarkId::new("data_decode", name), &wire, |b, wire| {
            b.iter(|| {
                let mut d = DataDecoder::new();
                let mut pos = 0;
                let mut out = 0usize;
                loop {
                    let step = d.decode(&wire[pos..]);
                    pos += step.consumed;
                    out += step.bytes.len();
                    if step.end {
                        break;
                    }
                }
                black_box(out)
            })
        });
        g.bench_with_input(BenchmarkId::new("bdat_decode", name), &wire, |b, wire| {
            b.iter(|| {
                let mut d = ChunkDecoder::new(wire.len() as u64);
                // 64 KiB reads, as from a socket.
                let mut out = 0usize;
                for read in wire.chunks(64 * 1024) {
                    out += d.decode(read).bytes.len();
                }
                black_box(out)
            })
        });
        // A text BDAT body: the chunk's octets with their line ends checked (and repaired).
        g.bench_with_input(BenchmarkId::new("bdat_text", name), &wire, |b, wire| {
            b.iter(|| {
                let mut d = ChunkDecoder::new(wire.len() as u64);
                let mut ends = LineEnds::default();
                let mut out = 0usize;
                for read in wire.chunks(64 * 1024) {
                    let mut rest = d.available(read);
                    while !rest.is_empty() {
                        let r = ends.repair(rest);
                        d.advance(r.consumed);
                        out += r.bytes.len();
                        rest = &rest[r.consumed..];
                    }
                }
                loop {
                    let tail = ends.finish().len();
                    if tail == 0 {
                        break;
                    }
                    out += tail;
                }
                black_box(out)
            })
        });
        g.bench_with_input(
            BenchmarkId::new("memchr_reference", name),
            &wire,
            |b, wire| b.iter(|| black_box(memchr_lines(black_box(wire)))),
        );
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = commands, bodies
}
criterion_main!(benches);
