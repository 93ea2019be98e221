#!/usr/bin/env python3
"""Stops postern (SIGTERM) while clients keep connecting, and sorts what each connection got.

Every connection must end in one of: refused (the listener is gone), a greeting then 221 or
421, a bare 421 (taken while stopping), or a reset before any greeting (completed by the
kernel in the instant the listener shut). A close with no reply at all (before or after the
greeting, a reset after it included), or a connection left open with nothing, is what
RFC 5321 3.8 rules out; the script exits 1 when any run saw one.

    python3 loadtest/checks/stop_while_connecting.py [--runs 10] [--binary target/release/postern]

Loopback only, 16 client threads for 2 s per run, SIGTERM after 1 s.
"""
import argparse
import collections
import select
import shutil
import socket
import subprocess
import tempfile
import threading
import time

CLIENTS = 16


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_connection(port):
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect(("127.0.0.1", port))
    except OSError:
        return "refused"
    try:
        f = s.makefile("rb")
        line = f.readline()
        if line.startswith(b"220"):
            s.sendall(b"QUIT\r\n")
            # What came before a reset counts (a 421 written as the server stopped, with our
            # QUIT unread, is followed by one): read until the end, keeping it.
            rest = b""
            while len(rest) < 3:
                try:
                    got = f.read1(3 - len(rest))
                except ConnectionResetError:
                    break
                if not got:
                    break
                rest += got
            if rest == b"":
                return "220+no reply"
            if rest in (b"221", b"421"):
                return "220+" + rest.decode()
            return "220+other"
        if line.startswith(b"421"):
            return "421"
        return "no reply" if line == b"" else "other"
    except ConnectionResetError:
        return "reset"
    except socket.timeout:
        return "left open"
    finally:
        s.close()


def run(binary, cores):
    port = free_port()
    spool = tempfile.mkdtemp(prefix="postern-stop-")
    try:
        server = subprocess.Popen(
            [binary, "serve", "--listen", f"127.0.0.1:{port}", "--spool", spool,
             "--cores", str(cores), "--hold", "--hostname", "mx.test"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        deadline = time.time() + 30
        # Bounded: a server that says nothing for 30 s is not waited for longer.
        while time.time() < deadline:
            ready, _, _ = select.select([server.stdout], [], [], deadline - time.time())
            line = server.stdout.readline() if ready else ""
            if not line or "ready with" in line:
                break
        threading.Thread(target=lambda: server.stdout.read(), daemon=True).start()
        seen = collections.Counter()
        lock = threading.Lock()
        end = time.time() + 2.0

        def client():
            while time.time() < end:
                got = one_connection(port)
                with lock:
                    seen[got] += 1
                if got == "refused":
                    time.sleep(0.01)

        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        server.terminate()
        for t in threads:
            t.join()
        return server.wait(timeout=60), seen
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--binary", default="target/release/postern")
    a = p.parse_args()
    bad_runs = 0
    for i in range(a.runs):
        code, seen = run(a.binary, a.cores)
        bad = {k: v for k, v in seen.items()
               if k in ("no reply", "left open", "other")
               or (k.startswith("220+") and k not in ("220+221", "220+421"))}
        bad_runs += bool(bad) or code != 0
        print(f"run {i}: exit {code}, " + ", ".join(f"{k} {v}" for k, v in seen.most_common()))
    print(f"runs with a connection closed or left without a reply: {bad_runs} of {a.runs}")
    raise SystemExit(1 if bad_runs else 0)


if __name__ == "__main__":
    main()
