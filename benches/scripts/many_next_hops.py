#!/usr/bin/env python3
"""How long a core's sessions wait while it keeps many next hops that failed.

For each build in turn, ROUNDS times: postern on one core, its DNS server a stub on loopback
that answers every query SERVFAIL at once. The bundled generator sends N messages, each to a
domain of its own, so each gets a next hop of its own whose lookup fails for now: the jobs
are deferred, and the next hops are kept for a while (failing ones are remembered for the
longest retry delay). Two probe sessions then send NOOP every 5 ms for PROBE seconds, while
the core goes through its table of next hops once a second to forget the quiet ones.

Prints, per build and round, the probes' worst, 99.9th and 99th-percentile NOOP round trip,
and the medians. The reference is the other build, measured in the same run. Loopback only,
bounded in time. Usage, from the workspace root, with release builds (and `postern-load` in
the first directory):

    python3 benches/scripts/many_next_hops.py BEFORE_DIR AFTER_DIR [N [ROUNDS]]

N is 100000 and ROUNDS 3 by default.
"""
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from probing import free_port, joined, queue_deferred, start_probes, wait_listening

if len(sys.argv) < 3:
    sys.exit(__doc__)
BUILDS = {"before": sys.argv[1], "after": sys.argv[2]}
N = int(sys.argv[3]) if len(sys.argv) > 3 else 100_000
ROUNDS = int(sys.argv[4]) if len(sys.argv) > 4 else 3
LOAD = os.path.join(sys.argv[1], "postern-load")
PROBE = 20  # s
PROBES = 2


def servfail(port, stop):
    """A DNS stub on loopback that answers every query SERVFAIL, until `stop` is set."""
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", port))
    u.settimeout(0.5)
    while not stop.is_set():
        try:
            q, peer = u.recvfrom(4096)
        except socket.timeout:
            continue
        if len(q) < 12:
            continue
        # The same ID and question; QR and RA set, RD as asked, RCODE 2; no records.
        flags = 0x8000 | (q[2] << 8 & 0x0100) | 0x0080 | 2
        u.sendto(q[:2] + flags.to_bytes(2, "big") + q[4:6] + bytes(6) + q[12:], peer)
    u.close()


def run(bindir):
    port, dns = free_port(), free_port()
    stop = threading.Event()
    stub = threading.Thread(target=servfail, args=(dns, stop))
    stub.start()
    with tempfile.TemporaryDirectory() as work:
        err_path = os.path.join(work, "err")
        args = [os.path.join(bindir, "postern"), "serve", "--cores", "1",
                "--listen", f"127.0.0.1:{port}", "--spool", os.path.join(work, "spool"),
                "--hostname", "bench.test", "--max-junk-commands", "0",
                "--dns-server", f"127.0.0.1:{dns}"]
        with open(err_path, "w") as err:
            server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_listening(port, time.time() + 30)
            queue_deferred(LOAD, port, N, "r@d{seq}.test", err_path, "the mail")
            rtts = joined(start_probes(port, PROBE, PROBES), PROBE + 30)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(120)
            stop.set()
            stub.join(5)
    return (rtts[-1], rtts[int(len(rtts) * 0.999)], rtts[int(len(rtts) * 0.99)], len(rtts))


results = {name: [] for name in BUILDS}
for _ in range(ROUNDS):
    for name, d in BUILDS.items():
        results[name].append(run(d))
print(f"{N} next hops failing on one core; {PROBES} sessions' NOOP every 5 ms for {PROBE} s")
print(f"{'build':7} {'round':>5} {'worst ms':>9} {'p99.9 ms':>9} {'p99 ms':>8} {'probes':>7}")
for name, rs in results.items():
    for i, (worst, p999, p99, n) in enumerate(rs, 1):
        print(f"{name:7} {i:5} {worst:9.1f} {p999:9.2f} {p99:8.2f} {n:7}")
    med = [statistics.median(r[k] for r in rs) for k in range(3)]
    print(f"{name:7} {'med':>5} {med[0]:9.1f} {med[1]:9.2f} {med[2]:8.2f}")
b = statistics.median(r[1] for r in results["before"])
a = statistics.median(r[1] for r in results["after"])
print(f"p99.9 round trip, after / before (medians): {a / b:.2f}")
