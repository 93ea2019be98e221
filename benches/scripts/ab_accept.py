#!/usr/bin/env python3
"""An A/B of two postern release builds on the accepting and relaying path, alternating.

For each run, a fresh spool and a fresh `postern-load sink`: postern relays to the sink; the
bundled generator sends 50 connections of 1 KiB messages (PIPELINING, BDAT) in a closed loop
for 5 s (msg/s), then, once the queue is drained, at a fixed rate for 10 s (end of data to
250, p50 and p99). Prints one line per run and the medians per build. Loopback only, bounded
in time. Usage, from the workspace root (root not needed):

    python3 benches/scripts/ab_accept.py BEFORE_DIR AFTER_DIR [RUNS] [RATE]

where each directory holds a release `postern` (and AFTER_DIR a `postern-load`), RUNS per
build (3) and RATE in msg/s (6000).
"""
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "loadtest", "bench"))
import compare  # noqa: E402

if len(sys.argv) < 3:
    sys.exit(__doc__)
BUILDS = {"before": sys.argv[1], "after": sys.argv[2]}
RUNS = int(sys.argv[3]) if len(sys.argv) > 3 else 3
RATE = int(sys.argv[4]) if len(sys.argv) > 4 else 6000
compare.LOAD = os.path.join(BUILDS["after"], "postern-load")
LOAD = ["--connections", "50", "--size", "1024", "--pipelining", "--bdat",
        "--to", "rcpt{r}@dest.test"]
SMTP, METRICS = "127.0.0.1:2700", "127.0.0.1:2701"

rows = {name: [] for name in BUILDS}
for _ in range(RUNS):
    for name, where in BUILDS.items():
        sink = compare.Sink()
        spool = tempfile.mkdtemp(prefix="postern-ab-", dir="/var/tmp")
        server = subprocess.Popen(
            [os.path.join(where, "postern"), "serve", "--listen", SMTP, "--spool",
             os.path.join(spool, "spool"), "--hostname", "bench.test", "--relay-host",
             sink.addr, "--metrics", METRICS],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            compare.wait_port(2700)
            closed = compare.send(SMTP, *LOAD, "--duration", "5s")
            compare.drain_postern(METRICS)
            fixed = compare.send(SMTP, *LOAD, "--rate", f"{RATE}/s", "--duration", "10s")
            compare.drain_postern(METRICS)
        finally:
            server.terminate()
            server.wait(timeout=30)
            sink.stop()
            shutil.rmtree(spool, ignore_errors=True)
        eod = fixed["latency_ms"]["end_of_data"]
        row = (closed["messages_per_s"], eod["p50"], eod["p99"])
        rows[name].append(row)
        print(f"{name}: {row[0]:.0f} msg/s closed loop; at {RATE}/s end of data to 250 "
              f"p50 {row[1]:.3f} ms, p99 {row[2]:.3f} ms", flush=True)
for name, rs in rows.items():
    print(f"{name} medians: {statistics.median(r[0] for r in rs):.0f} msg/s, "
          f"p99 {statistics.median(r[2] for r in rs):.3f} ms")
