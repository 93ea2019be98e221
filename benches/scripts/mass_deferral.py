#!/usr/bin/env python3
"""How long a core's sessions wait while a next hop's whole queue is deferred at once.

For each build in turn: postern on one core routes every message to a next hop that takes
the connection and never greets (one connection to it at a time), so the mail queues behind
that connection. The bundled generator queues N messages (PIPELINING, BDAT); then a probe
session sends NOOP every 5 ms for 30 s, through the moment the greeting's wait ends and all N
jobs are deferred together. Prints, per build, the probe's worst and 99th-percentile NOOP
round trip, and how long the deferral took (first to last deferral log line). The reference
is the other build, measured in the same run. Loopback only, bounded in time. Usage, from
the workspace root, with release builds (and `postern-load` in the first directory):

    python3 benches/scripts/mass_deferral.py BEFORE_DIR AFTER_DIR [N]

N is 150000 by default.
"""
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

if len(sys.argv) < 3:
    sys.exit(__doc__)
BUILDS = {"before": sys.argv[1], "after": sys.argv[2]}
N = int(sys.argv[3]) if len(sys.argv) > 3 else 150_000
LOAD = os.path.join(sys.argv[1], "postern-load")
GREETING_WAIT = 20  # s: longer than the generator needs to queue N messages
PROBE_FOR = 30  # s


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, deadline):
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def probe(port, out):
    """NOOP round trips (ms) for PROBE_FOR seconds."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = s.makefile("rb")
    f.readline()
    s.sendall(b"EHLO probe.test\r\n")
    while f.readline()[3:4] != b" ":
        pass
    end = time.time() + PROBE_FOR
    while time.time() < end:
        t = time.perf_counter()
        s.sendall(b"NOOP\r\n")
        if not f.readline().startswith(b"250"):
            raise SystemExit("the probe's NOOP was refused")
        out.append((time.perf_counter() - t) * 1000)
        time.sleep(0.005)
    s.sendall(b"QUIT\r\n")
    s.close()


def stamp(line):
    h, m, sec = line.split("T", 1)[1].split("Z", 1)[0].split(":")
    return int(h) * 3600 + int(m) * 60 + float(sec)


def run(name, bindir):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4096)  # takes connections and never greets
    port = free_port()
    with tempfile.TemporaryDirectory() as work:
        err_path = os.path.join(work, "err")
        with open(err_path, "w") as err:
            server = subprocess.Popen(
                [os.path.join(bindir, "postern"), "serve", "--cores", "1",
                 "--listen", f"127.0.0.1:{port}", "--spool", os.path.join(work, "spool"),
                 "--hostname", "bench.test", "--max-junk-commands", "0",
                 "--route", f"sink.test=127.0.0.1:{silent.getsockname()[1]}",
                 "--max-connections-per-destination", "1",
                 "--smtp-greeting-timeout", f"{GREETING_WAIT}s", "--retry-initial", "1h"],
                stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_listening(port, time.time() + 30)
            began = time.time()
            subprocess.run(
                [LOAD, "send", "--target", f"127.0.0.1:{port}", "--connections", "16",
                 "--pipelining", "--window", "8", "--bdat", "--messages", str(N), "--quiet"],
                check=True, stdout=subprocess.DEVNULL, timeout=GREETING_WAIT)
            if time.time() - began > GREETING_WAIT - 3:
                raise SystemExit("queueing took too long: lower N")
            rtts = []
            t = threading.Thread(target=probe, args=(port, rtts))
            t.start()
            t.join(PROBE_FOR + 20)
        finally:
            server.terminate()
            server.wait(60)
            silent.close()
        with open(err_path) as f:
            deferred = [stamp(l) for l in f if 'status="deferred"' in l]
    rtts.sort()
    if len(deferred) != N:
        raise SystemExit(f"{name}: {len(deferred)} of {N} deferred within the probe")
    return {
        "worst": rtts[-1],
        "p99": rtts[int(len(rtts) * 0.99)],
        "probes": len(rtts),
        "deferral_s": deferred[-1] - deferred[0],
    }


results = {name: run(name, d) for name, d in BUILDS.items()}
print(f"{N} jobs deferred together on one core; a session's NOOP every 5 ms meanwhile")
print(f"{'build':8} {'worst ms':>9} {'p99 ms':>8} {'probes':>7} {'deferral s':>11}")
for name, r in results.items():
    print(f"{name:8} {r['worst']:9.1f} {r['p99']:8.2f} {r['probes']:7} {r['deferral_s']:11.2f}")
b, a = results["before"], results["after"]
print(f"worst round trip, after / before: {a['worst'] / b['worst']:.2f}")
