#!/usr/bin/env python3
"""The disk's own floor under a durable reply: what an ideal group-committing server would make
a message wait, on this filesystem, for nothing but fdatasync.

Writes a 1 KiB record into a file written with zeros beforehand (as postern's spool writes
zeros ahead of its records, so that a sync never has an unwritten extent to convert as well)
and fdatasyncs it, back to back, for a few seconds (a group commit that is always busy, as a server's is under load). A message that
arrives at a random moment has to wait for the sync in progress to end and then for a sync of
its own; the script samples such arrivals uniformly over the run and reports that wait's
percentiles, and the share of arrivals that wait more than 2 ms. No server can answer a durable
250 faster than that on this disk.

    python3 benches/scripts/fdatasync_tail.py [--dir /var/tmp] [--seconds 10] [--json]
"""

import argparse
import bisect
import json
import os
import random
import tempfile
import time

RECORD = 1024
FILE_SIZE = 256 << 20


def measure(directory, seconds):
    """Returns [(start, duration)] in seconds for back-to-back write+fdatasync, and the wall
    time."""
    fd, path = tempfile.mkstemp(prefix="fdatasync-tail-", dir=directory)
    try:
        # Zeros written over the whole file and synced: preallocated space alone is left
        # unwritten, and the first sync over each part of it would also convert the extent
        # (a journal commit), which the spool's own zeroing ahead spares its syncs.
        zeros = bytes(1 << 20)
        for at in range(0, FILE_SIZE, len(zeros)):
            os.pwrite(fd, zeros, at)
        os.fsync(fd)
        record = b"x" * RECORD
        syncs, offset = [], 0
        t0 = time.perf_counter()
        # Bounded by the clock.
        while time.perf_counter() - t0 < seconds:
            os.pwrite(fd, record, offset)
            offset = (offset + RECORD) % (FILE_SIZE - RECORD)
            start = time.perf_counter()
            os.fdatasync(fd)
            syncs.append((start - t0, time.perf_counter() - start))
        return syncs, time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(path)


def percentile(sorted_xs, p):
    return sorted_xs[min(len(sorted_xs) - 1, int(p * len(sorted_xs)))]


def arrivals(syncs, wall, samples=200_000, seed=1):
    """The wait of `samples` arrivals at uniform random moments: the rest of the sync in
    progress (none between syncs), then the next sync in full."""
    rng = random.Random(seed)
    starts = [s for s, _ in syncs]
    waits = []
    for _ in range(samples):
        # From the first sync's start: an arrival before it has no sync in progress to
        # wait for (index -1 would take the last sync's).
        t = rng.uniform(syncs[0][0], syncs[-1][0])
        i = bisect.bisect_right(starts, t) - 1
        start, dur = syncs[i]
        rest = max(0.0, start + dur - t)
        own = syncs[i + 1][1] if i + 1 < len(syncs) else dur
        waits.append(rest + own)
    waits.sort()
    return waits


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/var/tmp", help="a directory on the spool's filesystem")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    syncs, wall = measure(args.dir, args.seconds)
    durations = sorted(d for _, d in syncs)
    waits = arrivals(syncs, wall)
    ms = 1000.0
    out = {
        "syncs": len(syncs),
        "seconds": wall,
        "sync_ms": {k: percentile(durations, p) * ms
                    for k, p in (("p50", .5), ("p99", .99), ("p99_9", .999))},
        "sync_max_ms": durations[-1] * ms,
        "arrival_wait_ms": {k: percentile(waits, p) * ms
                            for k, p in (("p50", .5), ("p90", .9), ("p99", .99))},
        "arrivals_over_2ms_pct": 100.0 * (1 - bisect.bisect_right(waits, 0.002) / len(waits)),
    }
    if args.json:
        print(json.dumps(out))
        return
    s, a = out["sync_ms"], out["arrival_wait_ms"]
    print(f"{out['syncs']} write+fdatasync in {wall:.1f} s on {args.dir}: sync p50 "
          f"{s['p50']:.3f} ms, p99 {s['p99']:.3f} ms, p99.9 {s['p99_9']:.3f} ms, max "
          f"{out['sync_max_ms']:.1f} ms")
    print(f"an arrival at a random moment waits p50 {a['p50']:.3f} ms, p90 {a['p90']:.3f} ms, "
          f"p99 {a['p99']:.3f} ms; {out['arrivals_over_2ms_pct']:.2f} % wait more than 2 ms")


if __name__ == "__main__":
    main()
