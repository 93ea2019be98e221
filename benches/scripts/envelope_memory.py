#!/usr/bin/env python3
"""What a session that sends recipients and never a body costs postern in resident memory.

Starts postern (one core, `--hold`, default limits) and, for each kind of envelope below, holds
N sessions open, each having sent MAIL and a pipelined batch of RCPT commands (or, for the
last kind, 8,000 pipelined EHLOs in one write, whose replies it reads), then prints the
growth of postern's VmRSS per session. A fresh server is started for each kind. Loopback only,
bounded in count and time. Usage, from the workspace root after `cargo build --release`:

    python3 benches/scripts/envelope_memory.py [N]   # N sessions per kind, 200 by default
"""
import os
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serving  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200
# (what it is, recipients sent, length of the ORCPT value's padding, None for no ORCPT, or
# ("path", N) for mailboxes of N octets without ORCPT)
KINDS = [
    ("idle after EHLO", 0, None),
    ("1,000 short recipients", 1000, None),
    ("1,000 recipients with 440-octet ORCPTs", 1000, 433),
    ("1,000 recipients of 200 octets", 1000, ("path", 200)),
    ("none, after 8,000 pipelined EHLOs", 0, "ehlo"),
]
EHLOS = 8000


def read_reply(f):
    """Reads one reply and returns its code (the last line's)."""
    while True:
        line = f.readline()
        if not line:
            sys.exit("the server closed a connection")
        if line[3:4] != b"-":
            return line[:3]


def measure(count, pad):
    with tempfile.TemporaryDirectory() as spool:
        # (The pipelined EHLOs are past the junk command limit, which would end the session.)
        junk = ("--max-junk-commands", "0") if pad == "ehlo" else ()
        srv, port = serving.start(
            spool, "--hostname", "mem.test", "--cores", "1", *junk, quiet=True
        )
        try:
            before = serving.rss_kib(srv.pid)
            if isinstance(pad, tuple):
                # A local part that brings the mailbox (r0000...@mem.test) to the length given.
                local = "x" * (pad[1] - len("r0000@mem.test"))
                batch = "".join(f"RCPT TO:<r{i:04}{local}@mem.test>\r\n" for i in range(count))
            else:
                orcpt = "" if pad in (None, "ehlo") else " ORCPT=rfc822;" + "o" * pad
                batch = "".join(f"RCPT TO:<r{i:04}@mem.test>{orcpt}\r\n" for i in range(count))
            conns, taken = [], 0
            deadline = time.time() + 120
            for _ in range(N):
                if time.time() > deadline:
                    break
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                f = s.makefile("rb")
                read_reply(f)
                s.sendall(b"EHLO client.test\r\n")
                read_reply(f)
                if pad == "ehlo":
                    s.sendall(b"EHLO client.test\r\n" * EHLOS)
                    for _ in range(EHLOS):
                        read_reply(f)
                if count:
                    s.sendall(b"MAIL FROM:<a@b.test>\r\n")
                    read_reply(f)
                    s.sendall(batch.encode())
                    taken = sum(read_reply(f) == b"250" for _ in range(count))
                conns.append((s, f))
            after = serving.rss_kib(srv.pid)
            for s, _ in conns:
                s.close()
            return len(conns), taken, (after - before) / max(1, len(conns))
        finally:
            srv.terminate()
            srv.wait(timeout=30)


print("| sessions | envelope | recipients taken (last session) | RSS growth per session |")
print("| --- | --- | --- | --- |")
for name, count, pad in KINDS:
    n, taken, per = measure(count, pad)
    print(f"| {n} | {name} | {taken} | {per:.0f} KiB |")
