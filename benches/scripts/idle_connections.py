#!/usr/bin/env python3
"""Opens N idle SMTP connections to a postern it starts (each reads the banner, sends EHLO and
then stays silent) and prints postern's resident memory before and after, in MiB. Loopback only,
bounded in count and time. Usage, from the workspace root after `cargo build --release`:

    python3 benches/scripts/idle_connections.py [N]
"""
import os, resource, socket, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serving

N = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, N + 1024)), hard))

def rss_mib(pid):
    return serving.rss_kib(pid) / 1024

with tempfile.TemporaryDirectory() as spool:
    srv, port = serving.start(spool, "--hostname", "idle.test", "--max-connections",
                              str(N + 100), "--max-connections-per-ip", str(N + 100))
    try:
        before = rss_mib(srv.pid)
        conns = []
        deadline = time.time() + 120
        for i in range(N):
            if time.time() > deadline:
                break
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            conns.append(s)
        for s in conns:
            s.recv(512)
            s.sendall(b"EHLO idle.test\r\n")
        for s in conns:
            buf = b""
            # The EHLO reply ends with its one line that has a space after the code.
            while not (buf.endswith(b"\r\n") and (buf.startswith(b"250 ") or b"\r\n250 " in buf)):
                chunk = s.recv(4096)
                if not chunk:
                    sys.exit("a connection was closed before its EHLO reply")
                buf += chunk
        after = rss_mib(srv.pid)
        print(f"| idle sessions | postern RSS before | RSS with sessions open | per session |")
        print(f"| --- | --- | --- | --- |")
        print(f"| {len(conns)} | {before:.1f} MiB | {after:.1f} MiB | {(after - before) * 1024 / max(1, len(conns)):.1f} KiB |")
        for s in conns:
            s.close()
    finally:
        srv.terminate()
        srv.wait(timeout=30)
