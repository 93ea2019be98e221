#!/usr/bin/env python3
"""End-to-end relay benchmark on loopback: accept, spool, deliver to a sink; postern against Postfix.

One postern-load sink is the next hop of both servers; its /metrics count what arrives. For each
server in turn (alternating order, several rounds) `postern-load send --connections 50
--pipelining --bdat` sends N 1 KiB messages (both servers offer CHUNKING: Postfix since 3.4). Measured:

- accepted msg/s, as the generator reports it;
- delivered msg/s end to end: N / (time from starting the generator until the sink has counted
  N more messages);
- the server's queue depth while sending and after: postern's postern_queue_depth, Postfix's
  queue files (incoming, active, deferred, hold: the messages postqueue -j lists, counted
  without asking showq so the sampling costs Postfix nothing).

Postfix is the stock Debian package, installed and configured by compare.py (a loopback relay,
durable queue as shipped) with relayhost = the sink; its queue is empty before each round.
postern runs from this tree's release build with a durable spool in a temporary directory, all
cores, and --route to the sink. Needs root. Writes docs/benchmarks-relay.md (or --out).

    python3 loadtest/bench/relay.py [--rounds 3] [--postern-messages 50000] [--postfix-messages 3000]
"""

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (ensure_postfix, configure_postfix, drain_postfix, machine)

ROOT = compare.ROOT
LOAD = compare.LOAD
POSTERN = os.path.join(ROOT, "target", "release", "postern")
DOMAIN = "sink.test"  # postern-load send's default recipient domain
SIZE = 1024
CONNECTIONS = 50
TARGET_RATIO = 20.0
SAMPLE_EVERY = 0.25  # queue depth samples, seconds
POLL_EVERY = 0.02  # sink counter polls while waiting for the last deliveries, seconds
SETTLE_S = 10.0  # longest wait for the queue depth to reach 0 once the sink has every message


def log(msg):
    compare.log(msg)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


scrape = compare.scrape


class Sink:
    """postern-load sink with --metrics, both on ephemeral loopback ports."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [LOAD, "sink", "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
             "--lifetime", "3h"], stdout=subprocess.PIPE, text=True)
        self.port = self.metrics = None
        for _ in range(4):
            line = self.proc.stdout.readline()
            if line.startswith("listening on "):
                self.port = int(line.split()[-1].rsplit(":", 1)[1])
            elif line.startswith("metrics on "):
                self.metrics = line.split()[-1]
            if self.port and self.metrics:
                break
        if not (self.port and self.metrics):
            raise SystemExit("postern-load sink did not start (no listen or metrics address)")

    def delivered(self):
        return int(scrape(self.metrics).get("postern_load_sink_messages_total", 0))

    def stop(self):
        self.proc.terminate()
        self.proc.communicate(timeout=30)


class Postern:
    name = "postern"

    def __init__(self, sink_port, workdir, flags):
        self.port, mport = free_port(), free_port()
        self.metrics = f"127.0.0.1:{mport}"
        self.log_path = os.path.join(workdir, "postern.log")
        self.cmd = [POSTERN, "serve", "--spool", os.path.join(workdir, "spool"),
                    "--listen", f"127.0.0.1:{self.port}",
                    "--route", f"{DOMAIN}=127.0.0.1:{sink_port}",
                    "--metrics", self.metrics, "--hostname", "bench.test", *flags]
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=self.log_file)
        compare.wait_port(self.port)
        compare.wait_port(mport)
        self.send_args = ["--pipelining", "--bdat"]

    def depth(self):
        return int(scrape(self.metrics).get("postern_queue_depth", 0))

    def counters(self):
        m = scrape(self.metrics)
        return {k: int(m.get(k, 0)) for k in
                ("postern_messages_accepted_total", "postern_recipients_delivered_total")}

    def prepare(self, timeout=120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.depth() > 0:
            time.sleep(0.2)

    def log_summary(self):
        """Delivery outcomes in postern's log, counted by their status field."""
        self.log_file.flush()
        counts = {}
        ansi = re.compile(r"\x1b\[[0-9;]*m")
        status = re.compile(r'status="([^"]*)"')
        with open(self.log_path, errors="replace") as f:
            for line in f:
                m = status.search(ansi.sub("", line))
                if m:
                    counts[m.group(1)] = counts.get(m.group(1), 0) + 1
        return counts

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log_file.close()


class Postfix:
    name = "Postfix"

    def __init__(self, sink_port):
        compare.configure_postfix(sink_port)
        self.port = compare.POSTFIX_PORT
        self.qdir = subprocess.run(["postconf", "-h", "queue_directory"], capture_output=True,
                                   text=True, check=True).stdout.strip()
        # The same as postern's: Postfix offers CHUNKING too.
        self.send_args = ["--pipelining", "--bdat"]

    def depth(self):
        n = 0
        for sub in ("incoming", "active", "deferred", "hold"):
            for _, _, files in os.walk(os.path.join(self.qdir, sub)):
                n += len(files)
        return n

    def prepare(self):
        compare.drain_postfix()

    def stop(self):
        compare.stop_postfix()


def measure(server, sink, messages, timeout):
    """One round: send `messages`, wait until the sink has them; returns the round's figures."""
    server.prepare()
    base = sink.delivered()
    samples = []  # (seconds since start, queue depth, delivered so far)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [LOAD, "send", "--target", f"127.0.0.1:{server.port}", "--json", f.name,
               "--quiet", "--connections", str(CONNECTIONS), "--messages", str(messages),
               "--size", str(SIZE), *server.send_args]
        t0 = time.monotonic()
        gen = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        deadline = t0 + timeout
        next_sample = t0
        while gen.poll() is None and time.monotonic() < deadline:
            now = time.monotonic()
            if now >= next_sample:
                samples.append((now - t0, server.depth(), sink.delivered() - base))
                next_sample = now + SAMPLE_EVERY
            time.sleep(0.02)
        if gen.poll() is None:
            gen.kill()
            gen.wait()
            raise SystemExit(f"postern-load send against {server.name} ran past {timeout} s")
        t_sent = time.monotonic()
        if gen.returncode != 0:
            raise SystemExit(f"postern-load send against {server.name} failed "
                             f"(exit {gen.returncode})")
        report = json.load(open(f.name))
    depth_at_sent = server.depth()
    samples.append((t_sent - t0, depth_at_sent, sink.delivered() - base))
    # Every message the generator saw accepted must reach the sink; wait for that many.
    want = report["messages_accepted"]
    got = sink.delivered() - base
    next_sample = time.monotonic() + SAMPLE_EVERY
    while got < want and time.monotonic() < deadline:
        time.sleep(POLL_EVERY)
        got = sink.delivered() - base
        now = time.monotonic()
        if now >= next_sample:
            samples.append((now - t0, server.depth(), got))
            next_sample = now + SAMPLE_EVERY
    t_done = time.monotonic()
    at_done = server.depth()
    samples.append((t_done - t0, at_done, got))
    # The server may count a message as queued a moment after the sink has it (postern drops
    # it from the depth once its delivery status is committed): give that SETTLE_S seconds.
    final = at_done
    settle_deadline = time.monotonic() + SETTLE_S
    while final > 0 and time.monotonic() < settle_deadline:
        time.sleep(0.05)
        final = server.depth()
    settle_s = time.monotonic() - t_done
    complete = got >= want
    return dict(
        messages=messages, accepted_n=want, refused=report["messages_refused"],
        failed=report["messages_failed"], accepted_rate=report["messages_per_s"],
        delivered_n=got, complete=complete, delivered_rate=got / (t_done - t0),
        send_s=t_sent - t0, total_s=t_done - t0, drain_s=t_done - t_sent,
        depth_at_sent=depth_at_sent, peak=max(d for _, d, _ in samples), at_done=at_done,
        final=final, settle_s=settle_s,
        samples=samples)


def steady(server, sink, rate, seconds, timeout):
    """Open loop at `rate` msg/s for `seconds`: does the queue drain as fast as it fills?"""
    server.prepare()
    base = sink.delivered()
    samples = []
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [LOAD, "send", "--target", f"127.0.0.1:{server.port}", "--json", f.name,
               "--quiet", "--connections", str(CONNECTIONS), "--rate", f"{rate}/s",
               "--duration", f"{seconds}s", "--size", str(SIZE), *server.send_args]
        t0 = time.monotonic()
        gen = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        deadline = t0 + timeout
        while gen.poll() is None and time.monotonic() < deadline:
            samples.append((time.monotonic() - t0, server.depth(), sink.delivered() - base))
            time.sleep(SAMPLE_EVERY)
        if gen.poll() is None:
            gen.kill()
            gen.wait()
            raise SystemExit(f"open-loop run against {server.name} ran past {timeout} s")
        t_sent = time.monotonic()
        if gen.returncode != 0:
            raise SystemExit(f"the generator failed against {server.name} "
                             f"(exit {gen.returncode})")
        report = json.load(open(f.name))
    at_sent = server.depth()
    want = report["messages_accepted"]
    got = sink.delivered() - base
    while got < want and time.monotonic() < deadline:
        time.sleep(POLL_EVERY)
        got = sink.delivered() - base
    drain = time.monotonic() - t_sent
    depths = [d for _, d, _ in samples]
    half = len(depths) // 2
    first = statistics.mean(depths[:half]) if half else 0.0
    second = statistics.mean(depths[half:]) if depths[half:] else 0.0
    # Load that was never offered (due and not sent), or mail refused or failed, never reaches
    # the queue: a flat queue says nothing then.
    unsent = ((report.get("messages_not_started") or 0) + (report.get("messages_failed") or 0)
              + (report.get("messages_refused") or 0))
    return dict(rate=rate, seconds=seconds, accepted=want, accepted_rate=report["messages_per_s"],
                unsent=unsent,
                delivered=got, at_sent=at_sent, peak=max(depths, default=0),
                mean_first=first, mean_second=second, drain_s=drain,
                eod_p99=report["latency_ms"]["end_of_data"]["p99"], samples=samples)


def median(rs, key):
    return statistics.median(r[key] for r in rs)


def fmt(x, digits=0):
    return f"{x:,.{digits}f}"


def series(r, step=1.0):
    """Queue depth about once a second: "t s: depth (delivered)"."""
    out, next_t = [], 0.0
    for t, d, got in r["samples"]:
        if t >= next_t or (t, d, got) == r["samples"][-1]:
            out.append(f"{t:.1f} s: {d} ({got})")
            next_t = t + step
    return ", ".join(out)


def verdict(r):
    """A backlog that stays within what is in flight is not growing."""
    return r["depth_at_sent"] <= 0.05 * r["messages"] and r["final"] == 0


def markdown(cmd, results, names, rounds, wall, notes, flags):
    out = ["## End-to-end relay: accept, spool, deliver to a sink; postern against Postfix\n"]
    out.append(f"Command (root; installs and configures Postfix when missing): `{cmd}`\n")
    out.append(f"Machine: {compare.machine()}. Everything on loopback, in one run of "
               f"{wall:.0f} s; medians of {rounds} rounds, the servers' order alternating "
               "from round to round.\n")
    out.append(
        "One `postern-load sink` is the next hop of both servers and counts what arrives. "
        f"Each round sends N messages of {SIZE // 1024} KiB (headers included) with "
        f"`postern-load send --connections {CONNECTIONS} --pipelining --bdat` (both servers "
        "offer CHUNKING), then waits until the sink has counted N more. **Delivered msg/s** = N / "
        "(time from starting the generator until the sink has counted the N-th message); "
        "**accepted msg/s** is the generator's own figure (250 replies). Queue depth: "
        "postern's `postern_queue_depth`, Postfix's files in incoming, active, deferred and "
        f"hold; sampled every {SAMPLE_EVERY} s while sending and draining. *At end of "
        "sending* is the depth when the generator has its last reply; *final* once the sink "
        f"has them all (after at most {SETTLE_S:.0f} s for the count to reach 0: postern drops a "
        "message from its depth when the delivery status record is committed, a moment after "
        "the sink's 250).\n")
    out.append("postern: `target/release/postern serve --spool TMP --listen 127.0.0.1:PORT "
               f"--route {DOMAIN}=127.0.0.1:SINKPORT --metrics 127.0.0.1:PORT "
               f"--hostname bench.test{''.join(' ' + f for f in flags)}` ("
               + ("all cores, outbound connections per next hop at the default 16, "
                  if not flags else "")
               + "spool group commit before every 250). Postfix: the Debian package "
               "configured by compare.py, `relayhost = [127.0.0.1]:SINKPORT`, queue and "
               "delivery settings as shipped; its queue is empty before each round.\n")
    out.append("| server | N per round | accepted msg/s | delivered msg/s end to end | "
               "delivered / accepted | queue at end of sending | peak queue | final queue | "
               "drain after sending (s) | backlog |")
    out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    med = {}
    for n in names:
        rs = results[n]
        acc, dl = median(rs, "accepted_rate"), median(rs, "delivered_rate")
        med[n] = dl
        incomplete = sum(not r["complete"] for r in rs)
        bad = sum(r["refused"] + r["failed"] for r in rs)
        note = ""
        if incomplete:
            note += f" ({incomplete} round(s) not fully delivered before the timeout)"
        if bad:
            note += f" ({bad} not accepted)"
        grows = sum(not verdict(r) for r in rs)
        backlog = ("none (stays within what is in flight)" if not grows else
                   f"grows during sending in {grows} of {len(rs)} rounds, then drains"
                   if all(r["final"] == 0 for r in rs) else
                   f"**left behind** in {sum(r['final'] > 0 for r in rs)} rounds")
        out.append(f"| {n} | {fmt(rs[0]['messages'])} | {fmt(acc)} | {fmt(dl)}{note} | "
                   f"{dl / acc:.2f} | {fmt(median(rs, 'depth_at_sent'))} | "
                   f"{fmt(median(rs, 'peak'))} | {fmt(median(rs, 'final'))} | "
                   f"{median(rs, 'drain_s'):.2f} | {backlog} |")
    out.append("")
    if med.get("Postfix"):
        ratio = med["postern"] / med["Postfix"]
        ok = ratio >= TARGET_RATIO
        out.append(f"**postern / Postfix, delivered msg/s end to end: {ratio:.1f}x** "
                   f"(target ≥ {TARGET_RATIO:.0f}x and no growing backlog: ratio "
                   f"{'met' if ok else '**not met**'}; backlog "
                   f"{'none' if all(verdict(r) for r in results['postern']) else '**grows**'}"
                   " for postern).\n")
    out.append("A backlog counts as growing when the queue at the end of sending holds more "
               "than 5% of the round's messages, i.e. delivery fell behind acceptance by more "
               "than what is in flight.\n")
    out.append("Rounds (accepted / delivered msg/s; queue at end of sending, peak, when the "
               "sink had all, final; drain s):\n")
    for n in names:
        for i, r in enumerate(results[n], 1):
            out.append(f"- {n} round {i}: {fmt(r['accepted_rate'])} / "
                       f"{fmt(r['delivered_rate'])}; {r['depth_at_sent']}, {r['peak']}, "
                       f"{r['at_done']}, {r['final']} (after {r['settle_s']:.2f} s); "
                       f"{r['drain_s']:.2f} s "
                       f"(send {r['send_s']:.2f} s, {r['delivered_n']} of {r['accepted_n']} "
                       "delivered)")
    out.append("")
    out.append("Queue depth over time, last round (seconds since the generator started: "
               "depth (delivered so far)):\n")
    for n in names:
        out.append(f"- {n}: {series(results[n][-1])}")
    out.append("")
    for line in notes:
        out.append(line)
    if notes:
        out.append("")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--postern-messages", type=int, default=50000)
    ap.add_argument("--postfix-messages", type=int, default=3000)
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="longest round (sending and delivery), seconds")
    ap.add_argument("--postern-flag", action="append", default=[], metavar="FLAG",
                    help="an extra flag for postern serve, e.g. "
                    "--postern-flag=--max-connections-per-destination=64 (repeatable)")
    ap.add_argument("--steady-seconds", type=int, default=10,
                    help="length of the open-loop run at the target rate")
    ap.add_argument("--out", default=os.path.join(ROOT, "target", "bench", "relay.md"))
    args = ap.parse_args()
    cmd = " ".join(["python3 loadtest/bench/relay.py", *sys.argv[1:]])
    started = time.monotonic()
    for path in (POSTERN, LOAD):
        if not os.access(path, os.X_OK):
            raise SystemExit(f"{path} is missing: cargo build --release -p postern "
                             "-p postern-load")
    compare.ensure_postfix()
    workdir = tempfile.mkdtemp(prefix="postern-relay-bench-", dir="/var/tmp")
    sink = postern = postfix = None
    results = {"postern": [], "Postfix": []}
    notes = []
    try:
        sink = Sink()
        log(f"sink on 127.0.0.1:{sink.port}, metrics on {sink.metrics}")
        postfix = Postfix(sink.port)
        postfix.prepare()
        postern = Postern(sink.port, workdir, args.postern_flag)
        servers = [(postern, args.postern_messages), (postfix, args.postfix_messages)]
        for i in range(args.rounds):
            order = servers if i % 2 == 0 else servers[::-1]
            for server, n in order:
                r = measure(server, sink, n, args.timeout)
                results[server.name].append(r)
                log(f"round {i + 1} {server.name}: accepted {r['accepted_rate']:.0f} msg/s, "
                    f"delivered {r['delivered_rate']:.0f} msg/s end to end "
                    f"({r['delivered_n']}/{r['accepted_n']}), queue at end of sending "
                    f"{r['depth_at_sent']}, peak {r['peak']}, final {r['final']}, drain "
                    f"{r['drain_s']:.2f} s")
        # The target rate: 20x what Postfix delivered. Does postern's queue stay flat there?
        pf = statistics.median(r["delivered_rate"] for r in results["Postfix"])
        rate = int(pf * TARGET_RATIO)
        log(f"postern open loop at {rate} msg/s ({TARGET_RATIO:.0f}x Postfix's {pf:.0f})")
        st = steady(postern, sink, rate, args.steady_seconds, args.timeout)
        log(f"open loop: queue mean {st['mean_first']:.0f} then {st['mean_second']:.0f}, "
            f"peak {st['peak']}, at end {st['at_sent']}, drained in {st['drain_s']:.2f} s")
        notes.append(
            f"**Open loop at the target rate**: postern driven at {rate} msg/s "
            f"({TARGET_RATIO:.0f}× Postfix's median delivered rate) for {st['seconds']} s, "
            f"same connections and flags: {st['accepted']} accepted "
            f"({st['accepted_rate']:.0f} msg/s), {st['delivered']} delivered. Queue depth: mean "
            f"{st['mean_first']:.0f} over the first half and {st['mean_second']:.0f} over the "
            f"second, peak {st['peak']}, {st['at_sent']} when sending ended, drained "
            f"{st['drain_s']:.2f} s later; end of data to 250 p99 {st['eod_p99']:.2f} ms. "
            + ("Rule: the queue keeps up when, at the end of sending, it holds at most half a "
               "second of traffic and drains within a second. "
               + (f"Not judged: {st['unsent']} messages were due and not sent, failed or "
                  "were refused, so the rate was not offered."
                  if st["unsent"] or st["accepted_rate"] < 0.95 * rate else
                  "Met: delivery keeps up at this rate."
                  if st["at_sent"] <= 0.5 * rate and st["drain_s"] <= 1.0 else
                  "**Not met: the queue grows at this rate.**")))
        notes.append(f"- depth over time: {series({'samples': st['samples']})}")
        outcomes = postern.log_summary()
        c = postern.counters()
        notes.append(
            f"postern over the whole run: {c['postern_messages_accepted_total']} accepted, "
            f"{c['postern_recipients_delivered_total']} recipients delivered; delivery "
            "outcomes in its log: "
            + (", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())) or "none logged")
            + ".")
    finally:
        for s in (postern, postfix, sink):
            if s is not None:
                try:
                    s.stop()
                except Exception as e:  # keep cleaning up the others
                    log(f"stopping {type(s).__name__}: {e}")
        if postfix is None:
            compare.stop_postfix()
        shutil.rmtree(workdir, ignore_errors=True)
    wall = time.monotonic() - started
    text = markdown(cmd, results, ["postern", "Postfix"], args.rounds, wall, notes,
                    args.postern_flag)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    log(f"written to {args.out} ({wall:.0f} s)")


if __name__ == "__main__":
    main()
