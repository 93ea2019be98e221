#!/usr/bin/env python3
"""Kills postern (kill -9) under load and restarts it; checks no acknowledged mail is lost.

Each round starts a `postern-load sink` as the relay host (it writes the Message-ID of each
message it accepts to a --record file) and a `postern serve` in front of it. 20 smtplib threads
send mail and note each Message-ID answered 250 at the end of data. After a random 0.2 to 3 s
the server is killed, then started again on the same spool as the round's variant says. The
round waits until `postern queue` lists nothing, stops the server with SIGTERM and reads the
sink records. An acknowledged message is lost when it is in no sink record of any round once
the last round's queue drained (a round after which one is missing copies the spool and its
logs to lost-N/ at once). Messages delivered more than once are counted, not failed: the
promise is at least once.

Variants (--variants; all by default, each pass over them in a seeded random order):
  base-c1, base-c2          kill, restart with the same cores (1 or 2)
  slow-sink                 the sink answers after 50 ms, so much is queued at the kill
  term-then-kill            SIGTERM, then SIGKILL 100 ms into the graceful stop
  slow-term-then-kill       the same with the 50 ms sink
  cores-1to2, cores-2to1    restart with another core count (2 to 1 folds a core's spool
                            into the remaining one; a 20 ms sink, so that mail is queued)
  double-kill, double-kill-fold, double-kill-flip
                            a second kill 5 to 100 ms after the restart began (cores 2 then
                            2 then 2; 2 then 1 then 1, and 2 then 1 then 2, with a 20 ms sink)
  kill-mid-fold, kill-mid-fold-flip
                            the second kill 0 to 40 ms after the restarted server logs
                            "starting", to cut a fold or recovery short (a 50 ms sink)
  sizes-2MB, sizes-2MB-slow messages of 100 B to 2 MB (log-uniform) instead of mostly < 8 kB
  tempfail-451              the sink answers 451 to 70 % of messages; 5 s after the restart a
                            clean sink takes over its port and must get all the deferred mail

    python3 loadtest/checks/crash_campaign.py [--rounds-per-variant 3] [--variants a,b,...]
        [--seed 12345] [--time-budget 2400] [--drain-timeout 30] [--threads 20] [--out DIR]
        [--postern target/release/postern] [--postern-load target/release/postern-load]
        [--postern-flag=--sync-on-core ...]

Build first with `cargo build --release`; the binaries default to target/release/ under the
repository root, wherever the script is run from. The default campaign (15 variants, 3 rounds
each) took about 6 minutes on a 2-core machine. A run with the same --seed follows the same
plan and kill delays; the moment a kill lands in the server's work still varies.

What it proves: no message acknowledged with 250 is lost when the process is killed at any
moment of taking, storing or delivering mail; when the restart uses fewer or more cores than
the spool was written with (folds); when the kill comes during a graceful stop; when a second
kill cuts the restart's recovery or fold short; and that deferred (451) mail survives a kill.
What it does not prove: anything about power loss or a kernel crash. kill -9 leaves the page
cache intact, so data written but not yet fdatasync'd survives it; this does not test that
postern syncs before it answers 250 (docs/durability.md says how it does).

Exit status: 0 when no acknowledged message was lost and every round's queue drained; 1 when
one was lost, a round's queue did not drain (or the round could not run), or nothing was
acknowledged at all (a campaign that checked nothing does not pass); 2 for bad arguments or
missing binaries; 128+N when stopped by signal N (SIGINT, SIGTERM: no verdict).

Loopback only (127.0.0.1, ports picked by the kernel). Every wait is bounded: startups 20 s
and 30 s, senders 20 s after the kill, the drain --drain-timeout without the queue
shrinking (ten of them in all), the final stop 40 s; the
--time-budget is checked between rounds, so a campaign overruns it by at most one round. Every
process started is killed at exit, also on SIGINT and SIGTERM. Everything is written under
--out (default: a new directory under the system temp dir): the shared spool, acks.log and
attempts.log (what the senders sent and were told), campaign.log, results.json (per round),
summary.json, one rNNN-VARIANT/ directory per round with each process's output and the sink
records, and, for a round that lost mail, lost-N/ with a copy of the spool and of the round's
directory and missing.txt.
"""
import argparse
import collections
import dataclasses
import json
import math
import random
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class Variant:
    cores: int                        # the server killed under load
    restarts: tuple[int, ...]         # cores of each restart; all but the last are killed early
    term_first: bool = False          # SIGTERM, then SIGKILL 100 ms into the graceful stop
    sink_opts: tuple[str, ...] = ()
    wide_sizes: bool = False
    # When set, an early kill is timed from the restart's "starting" log line (so that it
    # lands in recovery or the fold) rather than from the process start.
    kill_after_starting: tuple[float, float] | None = None
    tempfail: bool = False
    extra_drain_s: float = 0


# Sink answer delays: they keep mail queued at the kill, for recovery and folds to move.
DELAY_50MS = ("--delay", "50ms")
DELAY_20MS = ("--delay", "20ms")
VARIANTS = {
    "base-c1": Variant(1, (1,)),
    "base-c2": Variant(2, (2,)),
    "slow-sink": Variant(2, (2,), sink_opts=DELAY_50MS, extra_drain_s=15),
    "term-then-kill": Variant(2, (2,), term_first=True),
    "cores-1to2": Variant(1, (2,)),
    "cores-2to1": Variant(2, (1,), sink_opts=DELAY_20MS),
    "double-kill": Variant(2, (2, 2)),
    "double-kill-fold": Variant(2, (1, 1), sink_opts=DELAY_20MS),
    "double-kill-flip": Variant(2, (1, 2), sink_opts=DELAY_20MS),
    "sizes-2MB": Variant(2, (2,), wide_sizes=True),
    "slow-term-then-kill": Variant(2, (2,), term_first=True, sink_opts=DELAY_50MS),
    "sizes-2MB-slow": Variant(2, (2,), wide_sizes=True, sink_opts=DELAY_50MS),
    "kill-mid-fold": Variant(2, (1, 1), sink_opts=DELAY_50MS, kill_after_starting=(0.0, 0.04)),
    "kill-mid-fold-flip": Variant(2, (1, 2), sink_opts=DELAY_50MS, kill_after_starting=(0.0, 0.04)),
    "tempfail-451": Variant(2, (2,), sink_opts=("--reply-mix", "250:30,451:70"), tempfail=True),
}

# Log lines worth keeping in results.json: signs of damage, recovery and folds.
INTEREST = re.compile(r"panic|damaged|corrupt|torn|WARN|ERROR|kept for inspection|moved from"
                      r"|fold|not regular|journal", re.I)
# Warnings about this machine's open-file limit, not about the spool.
NOISE = ("the open-file limit (20000) is below --max-connections", "the open-file limit leaves")
# The Message-IDs the senders make; anything else in a sink record was never sent by us.
OURS = re.compile(r"^<r(\d{3,})\.t\d{2,}\.\d{5,}\.[0-9a-f]{12}@probe\.test>$")


class Interrupted(Exception):
    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


# ---------------------------------------------------------------- processes

CHILDREN: list[subprocess.Popen] = []


def spawn(cmd, out_path, err_path):
    # The child keeps its own copies of the descriptors; ours are closed at once so that a
    # long campaign does not pile up open files.
    with open(out_path, "w") as out, open(err_path, "w") as err:
        p = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=err,
                             stdin=subprocess.DEVNULL)
    CHILDREN.append(p)
    return p


def kill_children():
    # A second Ctrl-C must not cut the cleanup short and leave servers behind.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    for p in CHILDREN:
        if p.poll() is None:
            p.kill()
    for p in CHILDREN:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def stop_process(p, sig=signal.SIGTERM, wait=10):
    """Sends sig and waits; SIGKILL after `wait` seconds. Returns (exit status, forced)."""
    if p.poll() is None:
        p.send_signal(sig)
    try:
        return p.wait(timeout=wait), False
    except subprocess.TimeoutExpired:
        p.kill()
        return p.wait(timeout=10), True


def tail(path, n):
    return path.read_text(errors="replace")[-n:]


def start_sink(binary, rdir, tag, opts, lifetime_s, listen="127.0.0.1:0"):
    """Starts a sink recording to rdir/sink-TAG.rec; returns (process, address or None)."""
    out = rdir / f"sink-{tag}.out"
    # --lifetime is a safety net for when this script is itself killed with SIGKILL and cannot
    # clean up; it is longer than any round can last.
    p = spawn([binary, "sink", "--listen", listen, "--record", rdir / f"sink-{tag}.rec",
               "--threads", "1", "--lifetime", f"{lifetime_s}s", *opts],
              out, rdir / f"sink-{tag}.err")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and p.poll() is None:
        m = re.search(r"listening on (127\.0\.0\.1:\d+)", out.read_text())
        if m:
            return p, m.group(1)
        time.sleep(0.05)
    return p, None


@dataclasses.dataclass
class Server:
    proc: subprocess.Popen
    out: Path
    err: Path
    started: float  # time.monotonic()


def start_postern(binary, spool, rdir, tag, cores, relay, extra):
    out, err = rdir / f"postern-{tag}.out", rdir / f"postern-{tag}.err"
    # Short retry delays: mail whose delivery the kill cut off, or that the 451 sink deferred,
    # is tried again within the drain limit.
    cmd = [binary, "serve", "--listen", "127.0.0.1:0", "--spool", spool,
           "--metrics", "127.0.0.1:0", "--relay-host", relay,
           "--retry-initial", "1s", "--retry-max", "2s", "--cores", cores,
           "--hostname", "probe.test", *extra]
    return Server(spawn(cmd, out, err), out, err, time.monotonic())


def wait_smtp_port(server, timeout):
    """The SMTP port once the server says it is ready, or None (exited, or not in time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        txt = server.out.read_text()
        m = re.search(r"smtp listening on 127\.0\.0\.1:(\d+)", txt)
        if m and "ready" in txt:
            return int(m.group(1))
        if server.proc.poll() is not None:
            return None
        time.sleep(0.02)
    return None


def queue_length(binary, spool, timeout=20):
    """(messages queued, stdout, stderr) from `postern queue --json`; the count is None when
    the listing failed, so that a failure is never taken for an empty queue."""
    try:
        r = subprocess.run([str(binary), "queue", "--json", "--spool", str(spool)],
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "", f"postern queue: no answer in {timeout} s"
    if r.returncode != 0:
        return None, r.stdout, r.stderr
    return sum(1 for line in r.stdout.splitlines() if line.strip()), r.stdout, r.stderr


# ---------------------------------------------------------------- mail

def make_body_text():
    """2.2 MB of 75-character lines; each message takes a slice of it. Big enough for a slice
    of 2 MB from any offset body_slice picks."""
    r = random.Random(1)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 "
    lines = ["".join(r.choice(alphabet) for _ in range(75))
             for _ in range(2_200_000 // 77 + 1)]
    return "\r\n".join(lines) + "\r\n"


def body_slice(body, size, rnd):
    # Offsets on line starts (75 characters and CRLF), so every line is a whole one.
    off = rnd.randrange(0, 100_000) // 77 * 77
    return body[off:off + size]


def small_sizes(rnd):
    if rnd.random() < 0.02:
        return rnd.randint(8_000, 200_000)
    return rnd.randint(100, 8_000)


def wide_sizes(rnd):
    # Log-uniform from 100 B to 2 MB, so that each order of magnitude is as common.
    return int(math.exp(rnd.uniform(math.log(100), math.log(2_000_000))))


class Ledger:
    """What the senders sent and were told: kept in memory for the checks, and written to
    attempts.log and acks.log as evidence."""

    def __init__(self, out):
        self.lock = threading.Lock()
        self.attempted = set()
        self.acked = {}  # Message-ID -> (round, variant, reply)
        self.attempts_log = open(out / "attempts.log", "w", buffering=1)
        self.acks_log = open(out / "acks.log", "w", buffering=1)

    def attempt(self, mid, round_no, size):
        with self.lock:
            self.attempted.add(mid)
            self.attempts_log.write(f"{mid}\t{round_no}\t{time.time():.6f}\t{size}\n")

    def ack(self, mid, round_no, variant, size, reply):
        with self.lock:
            self.acked.setdefault(mid, (round_no, variant, reply))
            self.acks_log.write(
                f"{mid}\t{round_no}\t{variant}\t{time.time():.6f}\t{size}\t250 {reply}\n")

    def snapshot(self):
        with self.lock:
            return dict(self.acked), set(self.attempted)


class Sender:
    """Threads that each send mail over one connection after another until stopped."""

    def __init__(self, port, nthreads, sizes, round_no, variant, body, ledger, seed):
        self.port = port
        self.nthreads = nthreads
        self.sizes = sizes
        self.round_no = round_no
        self.variant = variant
        self.body = body
        self.ledger = ledger
        self.seed = seed
        self.stopping = threading.Event()
        self.threads = []
        self.stats = collections.Counter()
        self.stats_lock = threading.Lock()

    def count(self, key):
        with self.stats_lock:
            self.stats[key] += 1

    def run_thread(self, ti):
        rnd = random.Random(self.seed * 1000 + ti)
        n = 0
        while not self.stopping.is_set():
            try:
                s = smtplib.SMTP("127.0.0.1", self.port, timeout=15)
            except Exception:
                self.count("connect_fail")
                time.sleep(0.05)
                continue
            try:
                s.ehlo("sender.probe.test")
                while not self.stopping.is_set():
                    n += 1
                    mid = (f"<r{self.round_no:03d}.t{ti:02d}.{n:05d}.{uuid.uuid4().hex[:12]}"
                           f"@probe.test>")
                    hdr = (f"From: <s@sender.probe.test>\r\nTo: <rcpt@dest.probe.test>\r\n"
                           f"Message-ID: {mid}\r\nSubject: crash probe r{self.round_no}\r\n"
                           f"X-Probe-Round: {self.round_no}\r\n\r\n")
                    size = self.sizes(rnd)
                    msg = hdr + body_slice(self.body, max(0, size - len(hdr)), rnd)
                    code, _ = s.mail("s@sender.probe.test")
                    if code != 250:
                        self.count(f"mail_{code}")
                        if code == 421:
                            break
                        s.rset()
                        time.sleep(0.05)
                        continue
                    code, _ = s.rcpt("rcpt@dest.probe.test")
                    if code != 250:
                        self.count(f"rcpt_{code}")
                        s.rset()
                        continue
                    self.ledger.attempt(mid, self.round_no, len(msg))
                    code, reply = s.data(msg)
                    if code == 250:
                        self.ledger.ack(mid, self.round_no, self.variant, len(msg),
                                        reply.decode("utf-8", "replace"))
                        self.count("acked")
                    else:
                        self.count(f"data_{code}")
                        if code == 421:
                            break
            except Exception as e:
                # The kill shows up here (a reset, a closed connection): counted, not fatal.
                self.count("exc_" + type(e).__name__)
            finally:
                s.close()

    def start(self):
        for ti in range(self.nthreads):
            t = threading.Thread(target=self.run_thread, args=(ti,), daemon=True)
            t.start()
            self.threads.append(t)

    def finish(self, timeout):
        """Stops the threads; returns how many are still stuck after `timeout` seconds."""
        self.stopping.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))
        return sum(t.is_alive() for t in self.threads)


# ---------------------------------------------------------------- logs and records

def scan_log(path):
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        if not INTEREST.search(line) or any(n in line for n in NOISE):
            continue
        # A recovery that found nothing corrupt or torn is the normal case.
        if ("spool recovered" in line and "corrupt_records=0 torn_tails=0" in line
                and "WARN" not in line):
            continue
        kept.append(line)
    return kept


def read_records(path):
    """Message-IDs in a sink record: the last field of each line."""
    return [line.split()[-1] for line in path.read_text(errors="replace").splitlines()
            if line.strip()]


# ---------------------------------------------------------------- campaign

class Campaign:
    def __init__(self, args, out):
        self.args = args
        self.out = out
        self.spool = out / "spool"
        self.journal = open(out / "campaign.log", "w", buffering=1)
        self.ledger = Ledger(out)
        self.rnd = random.Random(args.seed)
        self.body = make_body_text()
        self.sink_lifetime = 300 + 10 * math.ceil(args.drain_timeout + max(
            v.extra_drain_s for v in VARIANTS.values()))
        self.delivered = collections.Counter()  # Message-ID -> copies in sink records
        self.missing = set()                    # acknowledged, not delivered, as of last round
        self.lost_dirs = 0
        self.results = []

    def say(self, s):
        print(s, flush=True)
        self.journal.write(s + "\n")

    def plan(self):
        plan = []
        for _ in range(self.args.rounds_per_variant):
            block = list(self.args.variants)
            self.rnd.shuffle(block)
            plan += block
        return plan

    def run(self):
        plan = self.plan()
        self.say(f"campaign dir {self.out}; {len(plan)} rounds; seed {self.args.seed}")
        t0 = time.monotonic()
        budget_hit = None
        for ri, name in enumerate(plan, 1):
            if time.monotonic() - t0 > self.args.time_budget:
                budget_hit = f"time budget reached before round {ri} of {len(plan)}"
                self.say(budget_hit)
                break
            self.results.append(self.run_round(ri, name))
            with open(self.out / "results.json", "w") as f:
                json.dump(self.results, f, indent=1)
        return self.summarise(time.monotonic() - t0, budget_hit)

    def run_round(self, ri, name):
        v = VARIANTS[name]
        a = self.args
        rdir = self.out / f"r{ri:03d}-{name}"
        rdir.mkdir()
        res = dict(round=ri, variant=name, notes=[], logs={})
        t_round = time.monotonic()
        sink, relay = start_sink(a.postern_load, rdir, "1", v.sink_opts, self.sink_lifetime)
        if relay is None:
            stop_process(sink, signal.SIGKILL)
            res["drained"] = False
            res["not_drained"] = "the sink did not start, so the round did not run"
            res["notes"].append("sink did not start: " + tail(rdir / "sink-1.err", 1000))
            self.say(f"r{ri}: sink did not start")
            return res
        sinks = [sink]

        server = start_postern(a.postern, self.spool, rdir, "A", v.cores, relay,
                               a.postern_flag)
        port = wait_smtp_port(server, 20)
        if port is None:
            res["notes"].append("postern A did not become ready: " + tail(server.err, 2000))
            self.say(f"r{ri}: postern A not ready")
            stop_process(server.proc, signal.SIGKILL)
        else:
            sender = Sender(port, a.threads, wide_sizes if v.wide_sizes else small_sizes,
                            ri, name, self.body, self.ledger, a.seed * 100 + ri)
            sender.start()
            delay = self.rnd.uniform(0.2, 3.0)
            time.sleep(delay)
            if v.term_first:
                server.proc.send_signal(signal.SIGTERM)
                time.sleep(0.1)
            stop_process(server.proc, signal.SIGKILL)
            stuck = sender.finish(20)
            res["kill_after_s"] = round(delay, 3)
            res["sender"] = dict(sender.stats)
            res["acked_round"] = sender.stats["acked"]
            if stuck:
                res["notes"].append(f"{stuck} sender threads still alive after 20 s")
            n, _, qerr = queue_length(a.postern, self.spool)
            res["queued_after_kill"] = n
            if qerr.strip():
                res["notes"].append("queue stderr after kill: " + qerr.strip()[:500])
            self.say(f"r{ri} {name}: killed A (cores {v.cores}) after {delay:.2f}s; "
                     f"acked {res['acked_round']}; queued at kill {n}; sender {dict(sender.stats)}")

        for k, cores in enumerate(v.restarts):
            tag = f"B{k}"
            server = start_postern(a.postern, self.spool, rdir, tag, cores, relay,
                                   a.postern_flag)
            if k < len(v.restarts) - 1:
                if v.kill_after_starting:
                    deadline = time.monotonic() + 5
                    while (time.monotonic() < deadline
                           and "starting" not in server.err.read_text(errors="replace")):
                        time.sleep(0.001)
                    time.sleep(self.rnd.uniform(*v.kill_after_starting))
                    after = time.monotonic() - server.started
                else:
                    after = self.rnd.uniform(0.005, 0.1)
                    time.sleep(after)
                stop_process(server.proc, signal.SIGKILL)
                self.say(f"r{ri}: killed {tag} (cores {cores}) {after * 1000:.0f} ms after start")
                res.setdefault("quick_kills_ms", []).append(round(after * 1000))
            elif wait_smtp_port(server, 30) is None:
                res["notes"].append(f"{tag} not ready in 30 s; rc={server.proc.poll()}; "
                                    f"err tail: " + tail(server.err, 1500))
                self.say(f"r{ri}: {tag} NOT READY")
        final = server

        if v.tempfail:
            # Let the restarted server meet the 451s, then give the deferred mail a sink that
            # takes it, on the same address, which is the only relay the server knows.
            time.sleep(5)
            stop_process(sink)
            clean = False
            for attempt in range(20):
                s2, addr = start_sink(a.postern_load, rdir, f"2-{attempt}", (),
                                      self.sink_lifetime, listen=relay)
                if addr:
                    sinks.append(s2)
                    clean = True
                    break
                # The port can stay taken for a moment after the first sink exits.
                stop_process(s2, signal.SIGKILL, 2)
                time.sleep(0.25)
            if not clean:
                res["notes"].append("could not restart a clean sink on the same port")
            self.say(f"r{ri}: swapped 451 sink for a clean sink on {relay} ok={clean}")

        # A queue still shrinking is draining, however long it is (a fast sender fills it
        # faster than a slow sink empties it): the round fails when the queue has not
        # shrunk for the limit, or after ten limits in all.
        limit = a.drain_timeout + v.extra_drain_s
        t_drain = time.monotonic()
        moved_at, fewest = t_drain, None
        drained = False
        n, qout, qerr = None, "", ""
        while (time.monotonic() - moved_at < limit
               and time.monotonic() - t_drain < 10 * limit):
            n, qout, qerr = queue_length(a.postern, self.spool)
            if n == 0:
                drained = True
                break
            if n is not None and (fewest is None or n < fewest):
                fewest, moved_at = n, time.monotonic()
            if final.proc.poll() is not None:
                break
            time.sleep(0.5)
        res["drain_s"] = round(time.monotonic() - t_drain, 2)
        res["drained"] = drained
        if not drained:
            left = "an unknown number" if n is None else n
            res["not_drained"] = (f"queue did not drain ({limit} s without shrinking, or "
                                  f"{10 * limit} s in all), {left} left "
                                  f"(server rc={final.proc.poll()})")
            res["notes"].append(f"{res['not_drained']}: {qout[:3000]} {qerr[:1000]}")
            (rdir / "queue-not-drained.txt").write_text(qout + "\n---stderr---\n" + qerr)
            self.say(f"r{ri}: QUEUE DID NOT DRAIN ({limit}s without shrinking); {left} left")
        elif qerr.strip():
            res["notes"].append("queue stderr: " + qerr.strip()[:500])

        # Give the last delivery sessions a moment to end before the server is stopped.
        time.sleep(0.5)
        rc, forced = stop_process(final.proc, signal.SIGTERM, 40)
        res["final_stop_rc"] = rc
        if forced or rc != 0:
            res["notes"].append(f"final graceful stop rc={rc} forced={forced}")
        for s in sinks:
            stop_process(s)

        for path in sorted(rdir.glob("postern-*.err")):
            interesting = scan_log(path)
            recovered = [line.strip()[-160:] for line in
                         path.read_text(errors="replace").splitlines() if "spool recovered" in line]
            res["logs"][path.name] = dict(interesting=interesting[:40],
                                          n_interesting=len(interesting), recovered=recovered)

        self.verify_round(ri, rdir, res)
        res["round_s"] = round(time.monotonic() - t_round, 1)
        self.say(f"r{ri} {name}: drained={drained} in {res['drain_s']}s; "
                 f"missing_total={res['missing_total']}; extra copies this round="
                 f"{res['extra_copies_round']}; dup msgs so far={res['dups_cum']}; "
                 f"notes={len(res['notes'])}; interesting log lines="
                 f"{sum(x['n_interesting'] for x in res['logs'].values())}; "
                 f"round {res['round_s']}s")
        return res

    def extra_copies(self):
        return sum(c - 1 for c in self.delivered.values() if c > 1)

    def verify_round(self, ri, rdir, res):
        """Adds the round's sink records to all delivered so far, and compares with all that
        was acknowledged: mail left over from an earlier round may arrive in a later one."""
        extra_before = self.extra_copies()
        deliveries = 0
        for rec in rdir.glob("*.rec"):
            for mid in read_records(rec):
                self.delivered[mid] += 1
                deliveries += 1
        acked, _ = self.ledger.snapshot()
        missing = {m for m in acked if self.delivered[m] == 0}
        new_missing = missing - self.missing
        late = self.missing - missing
        res["missing_total"] = len(missing)
        res["new_missing"] = sorted(new_missing)[:50]
        if late:
            res["notes"].append(f"{len(late)} messages missing after an earlier round were "
                                f"delivered in this round: {sorted(late)[:10]}")
        if new_missing:
            self.lost_dirs += 1
            ldir = self.out / f"lost-{self.lost_dirs}"
            shutil.copytree(self.spool, ldir / "spool-after-round", symlinks=True)
            shutil.copytree(rdir, ldir / rdir.name, symlinks=True)
            with open(ldir / "missing.txt", "w") as f:
                for m in sorted(new_missing):
                    f.write(f"{m}\t{acked[m]}\n")
            res["lost_dir"] = str(ldir)
            self.say(f"r{ri}: !!! {len(new_missing)} ACKED MESSAGES NOT DELIVERED after drain "
                     f"-> {ldir}")
        self.missing = missing
        res["deliveries_round"] = deliveries
        res["extra_copies_round"] = self.extra_copies() - extra_before
        res["dups_cum"] = sum(1 for c in self.delivered.values() if c > 1)

    def summarise(self, elapsed, budget_hit):
        """Writes summary.json, prints the short summary, returns the exit status."""
        acked, attempted = self.ledger.snapshot()
        missing = sorted(m for m in acked if self.delivered[m] == 0)
        dups = {m: c for m, c in self.delivered.items() if c > 1}
        unacked = [m for m in self.delivered if m not in acked]
        never_attempted = [m for m in unacked if OURS.match(m) and m not in attempted]
        foreign = [m for m in unacked if not OURS.match(m)]
        variant_of_round = {r["round"]: r["variant"] for r in self.results}
        per_variant = collections.defaultdict(collections.Counter)
        for r in self.results:
            pv = per_variant[r["variant"]]
            pv["rounds"] += 1
            pv["acked"] += r.get("acked_round", 0)
            pv["not_drained"] += 0 if r["drained"] else 1
        for m, (_, variant, _) in acked.items():
            if self.delivered[m] > 1:
                per_variant[variant]["dup_msgs"] += 1
                per_variant[variant]["extra_copies"] += self.delivered[m] - 1
            if self.delivered[m] == 0:
                per_variant[variant]["lost"] += 1
        for m in unacked:
            ours = OURS.match(m)
            if ours and int(ours.group(1)) in variant_of_round:
                per_variant[variant_of_round[int(ours.group(1))]]["delivered_unacked"] += 1
        not_drained = [r for r in self.results if not r["drained"]]
        summary = dict(
            dir=str(self.out), seed=self.args.seed, rounds=len(self.results),
            stopped_early=budget_hit, acked=len(acked), delivered_distinct=len(self.delivered),
            lost=len(missing), lost_ids=missing[:100],
            dup_msgs=len(dups), extra_copies=sum(c - 1 for c in dups.values()),
            delivered_unacked=len(unacked), delivered_never_attempted=never_attempted[:50],
            foreign_deliveries=foreign[:50],
            not_drained_rounds=[f"r{r['round']}-{r['variant']}" for r in not_drained],
            per_variant={k: dict(v) for k, v in per_variant.items()},
            elapsed_s=round(elapsed, 1),
        )
        with open(self.out / "summary.json", "w") as f:
            json.dump(summary, f, indent=1)

        cols = ("rounds", "acked", "lost", "dup_msgs", "extra_copies", "delivered_unacked",
                "not_drained")
        print(f"\nsummary: {len(self.results)} rounds, seed {self.args.seed}, {elapsed:.0f} s"
              + (f" ({budget_hit})" if budget_hit else ""))
        print(f"  {'variant':<20}" + "".join(f"{c:>{len(c) + 2}}" for c in cols))
        for name in (v for v in VARIANTS if v in per_variant):
            print(f"  {name:<20}"
                  + "".join(f"{per_variant[name][c]:>{len(c) + 2}}" for c in cols))
        print(f"  acknowledged: {len(acked)}")
        print(f"  lost (acknowledged, in no sink record after the drain): {len(missing)}"
              + (" (mail left in a queue that did not drain counts too)" if not_drained else ""))
        print(f"  duplicated: {len(dups)} messages, {summary['extra_copies']} extra copies")
        print(f"  delivered but never acknowledged: {len(unacked)} (of those never sent: "
              f"{len(never_attempted)}, not ours: {len(foreign)})")
        notes = sum(len(r["notes"]) for r in self.results)
        print(f"  evidence: {self.out} (summary.json, results.json ({notes} round notes), "
              f"campaign.log, acks.log, attempts.log, rNNN-*/ logs and sink records"
              + (", lost-*/" if self.lost_dirs else "") + ")")

        failures = []
        if missing:
            failures.append(f"{len(missing)} acknowledged messages lost, e.g. {missing[0]} "
                            f"(see lost-*/missing.txt)")
        for r in not_drained:
            failures.append(f"round {r['round']} ({r['variant']}): {r['not_drained']}")
        if not acked:
            failures.append("no message was acknowledged, so nothing was checked")
        for f in failures:
            print(f"FAIL: {f}")
        if not failures:
            print("PASS: every acknowledged message was delivered and every queue drained")
        return 1 if failures else 0


# ---------------------------------------------------------------- main

def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--postern", type=Path, default=ROOT / "target/release/postern",
                   help="the server binary (default: target/release/postern in the repository)")
    p.add_argument("--postern-load", type=Path, default=ROOT / "target/release/postern-load",
                   help="the sink binary (default: target/release/postern-load)")
    p.add_argument("--postern-flag", action="append", default=[], metavar="FLAG",
                   help="an extra flag for every postern serve, e.g. --postern-flag=--sync-on-core "
                        "(repeatable)")
    p.add_argument("--rounds-per-variant", type=int, default=3, help="default 3")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated, from: " + ", ".join(VARIANTS))
    p.add_argument("--seed", type=int, default=12345,
                   help="picks the round order, kill delays and message sizes (default 12345)")
    p.add_argument("--time-budget", type=float, default=2400,
                   help="seconds; no round starts after it (default 2400)")
    p.add_argument("--drain-timeout", type=float, default=30,
                   help="seconds each round waits for the queue to empty (default 30)")
    p.add_argument("--threads", type=int, default=20, help="sender threads (default 20)")
    p.add_argument("--out", type=Path,
                   help="a new or empty directory (default: a new one under the temp dir)")
    a = p.parse_args()
    a.variants = [v for v in a.variants.split(",") if v]
    unknown = [v for v in a.variants if v not in VARIANTS]
    if unknown or not a.variants:
        p.error(f"unknown or no variants: {','.join(unknown)}; known: {', '.join(VARIANTS)}")
    for name in ("rounds_per_variant", "threads", "time_budget", "drain_timeout"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be above zero")
    if a.out is not None and a.out.exists() and (not a.out.is_dir() or any(a.out.iterdir())):
        p.error(f"--out {a.out} is not an empty directory")
    for binary in (a.postern, a.postern_load):
        if not binary.is_file():
            print(f"crash_campaign: {binary} is missing: run `cargo build --release` first "
                  f"(or give --postern and --postern-load)", file=sys.stderr)
            raise SystemExit(2)
    a.postern = a.postern.resolve()
    a.postern_load = a.postern_load.resolve()
    return a


def main():
    args = parse_args()
    if args.out is None:
        out = Path(tempfile.mkdtemp(prefix="postern-crash-campaign-"))
    else:
        out = args.out.resolve()
        out.mkdir(parents=True, exist_ok=True)
    print(f"output directory: {out}", flush=True)

    def interrupt(signum, _frame):
        raise Interrupted(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    try:
        return Campaign(args, out).run()
    except Interrupted as e:
        print(f"stopped by {signal.Signals(e.signum).name}: no verdict; "
              f"evidence so far in {out}", flush=True)
        return 128 + e.signum
    finally:
        kill_children()


if __name__ == "__main__":
    sys.exit(main())
