#!/usr/bin/env python3
"""How long a core's sessions wait while the spool copies a large deferred queue forward.

For each build in turn: postern (one core, 1 MiB spool segments) routes `deferred.test` to a
`postern-load sink` that answers every message 451, so N messages queued for it are
deferred for an hour, and `sink.test` to one that takes them all. Once the N are deferred, the bundled generator sends
mail for the sink at a steady rate (RATE a second for FLOW seconds). That mail is delivered
at once, but its segments stay behind the deferred queue's, so the spool grows until it
holds twice what is live: then the spool copies the deferred messages forward, batch after
batch, so that the old segments can go (docs/durability.md, "Reclaiming space").

Two probe sessions send NOOP every 5 ms from the start of the flow until PROBE seconds
later. Prints, per build, the probes' worst and 99th-percentile NOOP round trip, the most
segment files the spool held, how many it held at the end, how long after the flow's start
the deferred queue had first been copied (the segment count a fifth under its peak), and how many copies were made (from the server's debug log) against the messages
of the flow. The reference is the other build, measured in the same run. Loopback only, bounded
in time. Usage, from the workspace root, with release builds (and `postern-load` in the
first directory):

    python3 benches/scripts/copy_forward.py BEFORE_DIR AFTER_DIR [N [RATE [FLOW]]]

N is 100000, RATE 4000 and FLOW 40 by default.
"""
import glob
import os
import signal
import subprocess
import sys
import tempfile
import time

from probing import free_port, joined, queue_deferred, start_probes, wait_listening

if len(sys.argv) < 3:
    sys.exit(__doc__)
BUILDS = {"before": sys.argv[1], "after": sys.argv[2]}
N = int(sys.argv[3]) if len(sys.argv) > 3 else 100_000
RATE = int(sys.argv[4]) if len(sys.argv) > 4 else 4000
FLOW = int(sys.argv[5]) if len(sys.argv) > 5 else 40
PROBE = FLOW + 20  # s
LOAD = os.path.join(sys.argv[1], "postern-load")
PROBES = 2


def segments(spool):
    return len(glob.glob(os.path.join(spool, "**", "*.seg"), recursive=True))


def name_of(bindir):
    return next(n for n, d in BUILDS.items() if d == bindir)


def run(bindir):
    port, sink_port, refuser_port = free_port(), free_port(), free_port()
    result = {}
    with tempfile.TemporaryDirectory() as work:
        spool = os.path.join(work, "spool")
        err_path = os.path.join(work, "err")
        sink = subprocess.Popen([LOAD, "sink", "--listen", f"127.0.0.1:{sink_port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        refuser = subprocess.Popen([LOAD, "sink", "--listen", f"127.0.0.1:{refuser_port}",
                                    "--reply-mix", "451:1"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        args = [os.path.join(bindir, "postern"), "serve", "--cores", "1",
                "--listen", f"127.0.0.1:{port}", "--spool", spool,
                "--spool-segment-size", "1M",
                "--hostname", "bench.test", "--max-junk-commands", "0",
                "--route", f"deferred.test=127.0.0.1:{refuser_port}",
                "--route", f"sink.test=127.0.0.1:{sink_port}", "--retry-initial", "1h"]
        # The copies are logged at debug level, a line for each round of them.
        env = dict(os.environ, RUST_LOG="info,postern_relay::engine=debug")
        with open(err_path, "w") as err:
            server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, env=env)
        try:
            wait_listening(port, time.time() + 30)
            wait_listening(sink_port, time.time() + 30)
            wait_listening(refuser_port, time.time() + 30)
            queue_deferred(LOAD, port, N, "d{seq}@deferred.test", err_path,
                           "the deferred queue")
            probes = start_probes(port, PROBE, PROBES)
            began = time.time()
            flow = subprocess.Popen(
                [LOAD, "send", "--target", f"127.0.0.1:{port}", "--connections", "8",
                 "--pipelining", "--bdat", "--rate", f"{RATE}/s", "--duration", f"{FLOW}s",
                 "--quiet"], stdout=subprocess.DEVNULL)
            peak, copied_at, seen = 0, None, []
            while time.time() < began + PROBE:
                n = segments(spool)
                seen.append(n)
                peak = max(peak, n)
                if copied_at is None and peak >= 8 and n < peak * 0.8:
                    copied_at = time.time() - began
                time.sleep(0.25)
            rtts = joined(probes, 30)
            if flow.wait(60) != 0:
                raise SystemExit("the flow failed")
            print(name_of(bindir), "segment files every 5 s:", seen[::20], flush=True)
            with open(err_path) as f:
                copies = sum(int(line.split(" messages=")[1].split()[0]) for line in f
                             if "copied waiting messages forward" in line)
            result = {"rtts": rtts, "peak": peak, "end": seen[-1],
                      "copied_at": copied_at, "copies": copies}
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(120)
            for p in (sink, refuser):
                p.send_signal(signal.SIGTERM)
                p.wait(30)
    return result


results = {name: run(d) for name, d in BUILDS.items()}
print(f"{N} messages deferred on one core, then {RATE}/s for {FLOW} s delivered behind them;"
      f" {PROBES} sessions' NOOP every 5 ms for {PROBE} s")
print(f"{'build':7} {'worst ms':>9} {'p99.9 ms':>9} {'p99 ms':>8} {'probes':>7} {'peak segs':>10} "
      f"{'end segs':>9} {'copied by s':>12} {'copies':>8} {'copies/flow':>12}")
for name, r in results.items():
    rtts = r["rtts"]
    at = "never" if r["copied_at"] is None else f"{r['copied_at']:.1f}"
    print(f"{name:7} {rtts[-1]:9.1f} {rtts[int(len(rtts) * 0.999)]:9.2f} "
          f"{rtts[int(len(rtts) * 0.99)]:8.2f} {len(rtts):7} "
          f"{r['peak']:10} {r['end']:9} {at:>12} {r['copies']:8} "
          f"{r['copies'] / (RATE * FLOW):12.2f}")
b, a = results["before"]["rtts"][-1], results["after"]["rtts"][-1]
print(f"worst round trip, after / before: {a / b:.2f}")
