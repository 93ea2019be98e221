#!/usr/bin/env python3
"""The queue's memory: what N queued messages of one recipient hold, and what is left once
they are delivered.

For each build given (directories holding `postern` and `postern-load`), in turn: postern on
2 cores routes every message to a next hop that is down (a port nothing listens on), and the
bundled generator queues N 1 KiB messages (PIPELINING, BDAT). The server is stopped and
started again (it reads the queue back from its spool). Then a sink starts on that port,
`postern queue --flush` sends the queue, and once the queue depth on `/metrics` is 0 the
script waits 15 s (the allocator's delayed returns). Prints postern's anonymous resident memory
(RssAnon) fresh, queued, 3 s after the restart's `ready`, and drained, per queued message,
and what draining left over the fresh figure. Loopback only, bounded in time. Usage, from the workspace root:

    python3 benches/scripts/queue_memory.py DIR [DIR ...] [--messages N]

N is 200000 by default.
"""
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

args = sys.argv[1:]
N = 200_000
if "--messages" in args:
    i = args.index("--messages")
    N = int(args[i + 1])
    del args[i:i + 2]
if not args:
    sys.exit(__doc__)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def anon_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"RssAnon:\s+(\d+) kB", f.read()).group(1))


def depth(metrics):
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("postern_queue_depth "):
                return int(float(line.split()[1]))
    raise SystemExit("no postern_queue_depth on /metrics")


def listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def wait_for(what, check, seconds):
    end = time.time() + seconds
    while time.time() < end:
        if check():
            return
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def measure(bindir):
    port, hop, metrics = free_port(), free_port(), free_port()
    with tempfile.TemporaryDirectory() as work:
        spool = os.path.join(work, "spool")
        def start():
            srv = subprocess.Popen(
                [os.path.join(bindir, "postern"), "serve", "--cores", "2",
                 "--listen", f"127.0.0.1:{port}", "--spool", spool, "--hostname", "memory.test",
                 "--route", f"sink.test=127.0.0.1:{hop}", "--retry-initial", "1h",
                 "--metrics", f"127.0.0.1:{metrics}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            for line in srv.stdout:
                if "ready with" in line:
                    return srv
            raise SystemExit("postern did not start")

        server = start()
        sink = None
        try:
            fresh = anon_kib(server.pid)
            subprocess.run(
                [os.path.join(bindir, "postern-load"), "send", "--target", f"127.0.0.1:{port}",
                 "--connections", "16", "--pipelining", "--window", "8", "--bdat",
                 "--messages", str(N), "--quiet"],
                check=True, stdout=subprocess.DEVNULL, timeout=300)
            wait_for("the queue", lambda: depth(metrics) == N, 60)
            time.sleep(3)
            queued = anon_kib(server.pid)
            server.terminate()
            server.wait(120)
            server = start()
            wait_for("the queue read back", lambda: depth(metrics) == N, 60)
            time.sleep(3)
            restarted = anon_kib(server.pid)
            sink = subprocess.Popen(
                [os.path.join(bindir, "postern-load"), "sink", "--listen", f"127.0.0.1:{hop}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for("the sink", lambda: listening(hop), 10)
            subprocess.run([os.path.join(bindir, "postern"), "queue", "--flush", "--spool", spool],
                           check=True, stdout=subprocess.DEVNULL)
            began = time.time()
            wait_for("the queue to drain", lambda: depth(metrics) == 0, 600)
            drain_s = time.time() - began
            time.sleep(15)
            drained = anon_kib(server.pid)
        finally:
            server.terminate()
            server.wait(120)
            if sink:
                sink.terminate()
                sink.wait(30)
    return fresh, queued, restarted, drained, drain_s


print(f"{N} messages of one recipient queued on 2 cores, then delivered; RssAnon in MiB")
print(f"{'build':30} {'fresh':>7} {'queued':>7} {'B/msg':>6} {'restarted':>9} {'drained':>8} "
      f"{'left':>6} {'drain s':>8}")
for d in args:
    fresh, queued, restarted, drained, drain_s = measure(d)
    per = (queued - fresh) * 1024 / N
    print(f"{d:30} {fresh / 1024:7.1f} {queued / 1024:7.1f} {per:6.0f} {restarted / 1024:9.1f} "
          f"{drained / 1024:8.1f} {(drained - fresh) / 1024:6.1f} {drain_s:8.1f}")
