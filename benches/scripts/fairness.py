#!/usr/bin/env python3
"""One core, a well-behaved client beside clients that pipeline NOOPs or upload without pause.

postern runs on one core (`--cores 1 --hold`, pinned to CPU 0) with the junk command limit
lifted (`--max-junk-commands 0`, so the hogs are not simply cut off); each hog is one
connection that writes NOOPs 10,000 at a time and reads the replies as they come, for as long
as the run lasts (`--kind noop`), or that sends 20 MiB messages back to back, each body
written right behind its pipelined MAIL, RCPT and DATA (`--kind bulk`). Beside them
`postern-load send` (2 connections, PIPELINING and BDAT, pinned to CPU 1) sends 1 KiB messages
for --seconds; the table gives its rate and whole-transaction latency with 0 hogs (the
reference, same run) and with each hog count asked for.

    python3 benches/scripts/fairness.py [--postern target/release/postern] [--hogs 0,1,2,4]
        [--kind noop|bulk]
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PORT = 25285


def connect_draining(stop):
    """A connection past its greeting whose replies a thread reads and drops until `stop`."""
    s = socket.create_connection(("127.0.0.1", PORT))
    s.recv(512)

    def drain():
        while not stop.is_set():
            try:
                if not s.recv(1 << 20):
                    return
            except OSError:
                return

    threading.Thread(target=drain, daemon=True).start()
    return s


def hog(stop, deadline):
    s = connect_draining(stop)
    block = b"NOOP\r\n" * 10000
    # Bounded by the run's deadline.
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            s.sendall(block)
        except OSError:
            return


def bulk_hog(stop, deadline):
    s = connect_draining(stop)
    s.sendall(b"EHLO hog.test\r\n")
    mib = (b"x" * 998 + b"\r\n") * 1024
    # Bounded by the run's deadline.
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            s.sendall(b"MAIL FROM:<hog@hog.test>\r\nRCPT TO:<sink@hog.test>\r\nDATA\r\n")
            for _ in range(20):
                s.sendall(mib)
            s.sendall(b".\r\n")
        except OSError:
            return


def run(postern, load, hogs, seconds, extra, kind=hog):
    spool = tempfile.mkdtemp(prefix="postern-fairness-", dir="/var/tmp")
    server = subprocess.Popen(
        [postern, "serve", "--listen", f"127.0.0.1:{PORT}", "--spool", os.path.join(spool, "s"),
         "--cores", "1", "--hold", "--queue-high-water", "0", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", PORT)).close()
                break
            except OSError:
                time.sleep(0.05)
        threads = [threading.Thread(target=kind, args=(stop, time.monotonic() + seconds + 10),
                                    daemon=True) for _ in range(hogs)]
        for t in threads:
            t.start()
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            subprocess.run([load, "send", "--target", f"127.0.0.1:{PORT}", "--connections", "2",
                            "--duration", f"{seconds}s", "--pipelining", "--bdat", "--quiet",
                            "--json", f.name, "--cpus", "1"],
                           check=True, stdout=subprocess.DEVNULL)
            return json.load(open(f.name))
    finally:
        stop.set()
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(spool, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--postern", default=os.path.join(ROOT, "target", "release", "postern"))
    ap.add_argument("--load", default=os.path.join(ROOT, "target", "release", "postern-load"))
    ap.add_argument("--hogs", default="0,1,2,4")
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--kind", choices=["noop", "bulk"], default="noop",
                    help="what each hog sends (default noop)")
    ap.add_argument("--postern-flag", action="append", default=None, metavar="FLAG",
                    help="flags for postern serve instead of --max-junk-commands 0")
    args = ap.parse_args()
    extra = args.postern_flag if args.postern_flag is not None else ["--max-junk-commands", "0"]
    print(f"postern: {args.postern} {' '.join(extra)}; hogs: {args.kind}")
    print("| hogs | messages/s | transaction p50 ms | p90 ms | p99 ms | max ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for h in [int(x) for x in args.hogs.split(",")]:
        rep = run(args.postern, args.load, h, args.seconds, extra,
                  bulk_hog if args.kind == "bulk" else hog)
        t = rep["latency_ms"]["transaction"]
        print(f"| {h} | {rep['messages_per_s']:,.0f} | {t['p50']:.2f} | {t['p90']:.2f} | "
              f"{t['p99']:.2f} | {t['max']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
