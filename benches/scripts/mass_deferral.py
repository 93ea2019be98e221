#!/usr/bin/env python3
"""How long a core's sessions wait while a next hop's whole queue is handled at once.

For each build in turn: postern (on CORES cores) routes every message to a next hop that
takes the connection and never greets (one connection to it at a time), so the mail queues
behind that connection. The bundled generator queues N messages (PIPELINING, BDAT). Probe
sessions (two per core) then send NOOP every 5 ms through three passes over the whole queue:

- deferral: the greeting's wait ends, and all N jobs are deferred together (with more than
  one core, the cores that own the messages record the outcomes the delivering core sends);
- flush: `postern queue --flush` makes every deferred job due at once (the retry pass);
- restart: the server is stopped and started again, and the recovered queue is handed to the
  delivering core (the job pass). The probes try to connect from before the start, every
  10 ms, so that they are in as soon as the server listens; a short pass may still be over
  by then.

Prints, per build and pass, the probes' worst and 99th-percentile NOOP round trip. The
reference is the other build, measured in the same run. Loopback only, bounded in time.
Usage, from the workspace root, with release builds (and `postern-load` in the first
directory):

    python3 benches/scripts/mass_deferral.py BEFORE_DIR AFTER_DIR [N [CORES]]

N is 150000 and CORES 1 by default.
"""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from probing import count, free_port, probe, wait_listening

if len(sys.argv) < 3:
    sys.exit(__doc__)
BUILDS = {"before": sys.argv[1], "after": sys.argv[2]}
N = int(sys.argv[3]) if len(sys.argv) > 3 else 150_000
CORES = int(sys.argv[4]) if len(sys.argv) > 4 else 1
LOAD = os.path.join(sys.argv[1], "postern-load")
GREETING_WAIT = 20  # s: longer than the generator needs to queue N messages
DEFERRAL_PROBE = 30  # s: through the end of the greeting's wait
PASS_PROBE = 10  # s: after a flush, or a restart
PROBES = 2 * CORES


def probes(port, seconds, during=None):
    """The round trips of PROBES sessions probing for `seconds`, sorted; `during` runs once
    they have started (connecting, or trying to, until the server listens)."""
    rtts = []
    threads = [threading.Thread(target=probe, args=(port, seconds, rtts))
               for _ in range(PROBES)]
    for t in threads:
        t.start()
    if during:
        time.sleep(0.5)
        during()
    for t in threads:
        t.join(seconds + 30)
    if not rtts:
        raise SystemExit("no probe answered")
    return sorted(rtts)


def run(bindir):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4096)  # takes connections and never greets
    port = free_port()
    result = {}
    with tempfile.TemporaryDirectory() as work:
        spool = os.path.join(work, "spool")
        err_path = os.path.join(work, "err")
        args = [os.path.join(bindir, "postern"), "serve", "--cores", str(CORES),
                "--listen", f"127.0.0.1:{port}", "--spool", spool,
                "--hostname", "bench.test", "--max-junk-commands", "0",
                "--route", f"sink.test=127.0.0.1:{silent.getsockname()[1]}",
                "--max-connections-per-destination", "1",
                "--smtp-greeting-timeout", f"{GREETING_WAIT}s", "--retry-initial", "1h"]
        with open(err_path, "w") as err:
            server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_listening(port, time.time() + 30)
            began = time.time()
            subprocess.run(
                [LOAD, "send", "--target", f"127.0.0.1:{port}", "--connections", "16",
                 "--pipelining", "--window", "8", "--bdat", "--messages", str(N), "--quiet"],
                check=True, stdout=subprocess.DEVNULL, timeout=GREETING_WAIT)
            if time.time() - began > GREETING_WAIT - 3:
                raise SystemExit("queueing took too long: lower N")
            result["deferral"] = probes(port, DEFERRAL_PROBE)
            deferred = count(err_path, 'status="deferred"')
            if deferred != N:
                raise SystemExit(f"{deferred} of {N} deferred within the probe")

            def flush():
                subprocess.run([os.path.join(bindir, "postern"), "queue", "--flush",
                                "--spool", spool], check=True, stdout=subprocess.DEVNULL)

            result["flush"] = probes(port, PASS_PROBE, flush)
            server.terminate()
            server.wait(120)

            def restart():
                nonlocal server
                with open(err_path, "a") as err:
                    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)

            # The probes try to connect from before the start, so that they are in as soon
            # as the server listens, when the recovered queue is handed over.
            result["restart"] = probes(port, PASS_PROBE, restart)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(120)
            silent.close()
    return result


results = {name: run(d) for name, d in BUILDS.items()}
print(f"{N} jobs for one next hop, {CORES} core(s); {PROBES} sessions' NOOP every 5 ms")
print(f"{'pass':9} {'build':7} {'worst ms':>9} {'p99 ms':>8} {'probes':>7}")
for phase in ("deferral", "flush", "restart"):
    for name, r in results.items():
        rtts = r[phase]
        print(f"{phase:9} {name:7} {rtts[-1]:9.1f} {rtts[int(len(rtts) * 0.99)]:8.2f} "
              f"{len(rtts):7}")
    b, a = results["before"][phase][-1], results["after"][phase][-1]
    print(f"{phase:9} worst round trip, after / before: {a / b:.2f}")
