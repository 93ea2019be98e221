#!/usr/bin/env python3
"""Thread-per-core scaling, one run: postern on 1, 2, 4, 8 ... cores against the same load.

For each core count postern starts afresh (new spool, relaying to a postern-load sink) with
`--cores N`, its executors pinned to CPUs 0..N-1. The generator (postern-load send, one executor
per load CPU) and the sink run on CPUs of their own, taken from the top of the machine, so the
server's cores are not shared with the load. Two loads per core count, each for --rounds rounds
of --seconds, postern's queue drained to the sink after each:

- `c50`: the issue's shape, 50 connections, PIPELINING + BDAT, one message in flight each;
- `c50w8`: the same 50 connections with 8 messages in flight each (RFC 2920 3.1), which keeps
  every core busy whatever the disk's sync time.

At the largest core count postern is also driven open loop at half its `c50` peak, for the end
of data to 250 latency. As root, the same `c50` load then goes to a stock Postfix relaying to
the same sink, and Postfix's smtp-source drives postern, Postfix's smtp-sink (which stores
nothing) and Postfix, for the issue's two ratios; Postfix is installed with apt when missing
(without it, or with --no-postfix, postern alone). The disk's own sync floor
(benches/scripts/fdatasync_tail.py) is measured in the same run.

    python3 loadtest/bench/scaling.py [--cores 1,2,4,8] [--rounds 2] [--seconds 4] [--no-build]

Meant for a machine with enough CPUs for the largest core count plus the load (16 for 1..8);
on fewer CPUs the load shares the server's cores (said in the table).
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (the shared Postfix, sink and generator helpers)

ROOT = compare.ROOT
POSTERN = os.path.join(ROOT, "target", "release", "postern")
PORT = 25275
METRICS = "127.0.0.1:25276"
SMTP_SINK_PORT = 25277
LOADS = {
    "c50": ["--connections", "50"],
    "c50w8": ["--connections", "50", "--window", "8"],
}
COMMON = ["--size", "1024", "--pipelining", "--bdat", "--to", "rcpt{r}@dest.test"]


def cpu_list(cpus):
    return ",".join(str(c) for c in cpus)


def taskset(cpus):
    return ["taskset", "-c", cpu_list(cpus)] if cpus and shutil.which("taskset") else []


def start_postern(spool, cores, next_hop, log, extra=()):
    proc = subprocess.Popen(
        [POSTERN, "serve", "--listen", f"127.0.0.1:{PORT}", "--spool", spool,
         "--hostname", "bench.test", "--relay-host", next_hop, "--metrics", METRICS,
         "--cores", str(cores), *extra],
        stdout=log, stderr=log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.flush()
            with open(log.name) as f:
                said = f.read()
            raise SystemExit(f"postern --cores {cores} exited ({proc.returncode}): {said}")
        try:
            with socket.create_connection(("127.0.0.1", PORT), timeout=1):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"postern --cores {cores} not listening after 30 s")


def drain(args):
    if "--hold" not in args.postern_flag:
        compare.drain_postern(METRICS)


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def smtp_source(port, messages, cpus):
    """Postfix's smtp-source: 50 sessions, connections reused (-d), 1 KiB; msg/s."""
    t0 = time.monotonic()
    compare.run([*taskset(cpus), "smtp-source", "-d", "-s", "50", "-m", str(messages),
                 "-l", "1024", "-f", "bench@origin.test", "-t", "rcpt@dest.test",
                 f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, timeout=300)
    return messages / (time.monotonic() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cores", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--half-peak-seconds", type=int, default=10)
    ap.add_argument("--source-messages", type=int, default=30000,
                    help="messages per smtp-source round")
    ap.add_argument("--no-build", action="store_true",
                    help="use target/release as it is (a machine without cargo)")
    ap.add_argument("--no-postfix", action="store_true")
    ap.add_argument("--postern-flag", action="append", default=[], metavar="FLAG",
                    help="an extra flag for postern serve, e.g. --postern-flag=--hold "
                    "(accept and spool only: no delivery, no drain between rounds)")
    ap.add_argument("--spool-dir", default="/var/tmp",
                    help="where the spools (and the disk floor's file) go")
    ap.add_argument("--out", default=os.path.join(ROOT, "target", "bench", "scaling.md"))
    ap.add_argument("--json", help="also write every measurement here")
    args = ap.parse_args()
    cmd = " ".join(["python3 loadtest/bench/scaling.py", *sys.argv[1:]])
    cores = [int(c) for c in args.cores.split(",")]
    top = max(cores)
    ncpu = os.cpu_count() or 1
    if not args.no_build:
        compare.log("building postern and postern-load (release)")
        compare.run(["cargo", "build", "--release", "-q", "-p", "postern", "-p",
                     "postern-load"], cwd=ROOT)
    # CPUs: the server takes 0..N-1; the sink the last two; the load those in between. With
    # --hold postern relays nothing: the sink (Postfix's next hop only) is not pinned and the
    # load takes every CPU above the server's.
    holding = "--hold" in args.postern_flag
    if ncpu >= top + 4:
        spare = 0 if holding else 2
        sink_cpus = list(range(ncpu - spare, ncpu))
        load_cpus = list(range(top, ncpu - spare))
        placement = (f"postern on CPUs 0..N-1, postern-load send on CPUs {cpu_list(load_cpus)} "
                     f"({len(load_cpus)} executors), the sink "
                     + (f"on CPUs {cpu_list(sink_cpus)}" if sink_cpus else "not pinned"))
    else:
        sink_cpus, load_cpus = [], []
        placement = f"only {ncpu} CPUs: the load and the sink share the server's"
    threads = str(max(1, len(load_cpus)))
    load_pin = ["--threads", threads] + (["--cpus", cpu_list(load_cpus)] if load_cpus else [])
    postfix = not args.no_postfix and os.geteuid() == 0
    if postfix:
        try:
            compare.ensure_postfix()
        except (OSError, subprocess.SubprocessError) as e:
            compare.log(f"no Postfix here and it could not be installed ({e}): postern only")
            postfix = False
    work = tempfile.mkdtemp(prefix="postern-scaling-", dir=args.spool_dir)
    log = open(os.path.join(work, "postern.log"), "w")
    results = {"command": cmd, "postern_flags": args.postern_flag, "machine": compare.machine() if postfix else None,
               "placement": placement, "cores": {}, "postfix": None}
    procs = []
    try:
        sink = compare.Sink("--threads", str(max(1, len(sink_cpus))),
                            *(["--cpus", cpu_list(sink_cpus)] if sink_cpus else []))
        procs.append(sink.proc)
        floor = json.loads(subprocess.run(
            [sys.executable, os.path.join(ROOT, "benches", "scripts", "fdatasync_tail.py"),
             "--json", "--dir", work, "--seconds", "5"],
            check=True, capture_output=True, text=True).stdout)
        results["floor"] = floor
        compare.log(f"disk floor: sync p50 {floor['sync_ms']['p50']:.3f} ms, "
                    f"p99 {floor['sync_ms']['p99']:.3f} ms")
        for n in cores:
            spool = os.path.join(work, f"spool-{n}")
            p = start_postern(spool, n, sink.addr, log, args.postern_flag)
            row = {}
            try:
                for name, shape in LOADS.items():
                    reps = []
                    for r in range(args.rounds):
                        rep = compare.send(f"127.0.0.1:{PORT}", *shape, *COMMON, *load_pin,
                                           "--duration", f"{args.seconds}s")
                        reps.append(rep)
                        compare.log(f"{n} cores, {name}, round {r + 1}: "
                                    f"{rep['messages_per_s']:.0f} msg/s")
                        drain(args)
                    row[name] = reps
                if n == top:
                    peak = compare.median([r["messages_per_s"] for r in row["c50"]])
                    rate = max(1, int(peak / 2))
                    compare.log(f"{n} cores, open loop at {rate} msg/s")
                    row["half"] = compare.send(
                        f"127.0.0.1:{PORT}", *LOADS["c50"], *COMMON, *load_pin,
                        "--rate", f"{rate}/s", "--duration", f"{args.half_peak_seconds}s")
                    row["half_rate"] = rate
                    drain(args)
                    if postfix:
                        try:
                            row["source"] = []
                            for r in range(args.rounds):
                                row["source"].append(smtp_source(PORT, args.source_messages,
                                                                 load_cpus))
                                compare.log(f"smtp-source to postern: {row['source'][-1]:.0f}")
                                drain(args)
                        except (OSError, subprocess.SubprocessError) as e:
                            compare.log(f"smtp-source failed, no Postfix comparison: {e}")
                            postfix = False
            finally:
                stop(p)
                shutil.rmtree(spool, ignore_errors=True)
            results["cores"][n] = row
            save(args, results)
        if postfix:
            try:
                results["postfix"] = run_postfix(args, sink, load_pin, load_cpus, top)
            except (OSError, subprocess.SubprocessError, SystemExit) as e:
                compare.log(f"Postfix runs failed, no Postfix comparison: {e}")
        results["relayed"] = sink.stop().get("messages_total", 0)
        procs.remove(sink.proc)
    finally:
        for p in procs:
            stop(p)
        log.close()
        if postfix:
            compare.stop_postfix()
        shutil.rmtree(work, ignore_errors=True)
    save(args, results)
    text = report(results, args, cores, top)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    compare.log(f"written to {args.out}")


def save(args, results):
    """Everything measured so far, as JSON (--json), so that a run cut short keeps it."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def run_postfix(args, sink, load_pin, load_cpus, top):
    """The same c50 load against Postfix relaying to the same sink, and smtp-source against
    smtp-sink and Postfix."""
    out = {"c50": [], "source_sink": [], "source_postfix": []}
    compare.configure_postfix(sink.port)
    compare.drain_postfix()
    for r in range(args.rounds):
        rep = compare.send(f"127.0.0.1:{compare.POSTFIX_PORT}", *LOADS["c50"], *COMMON,
                           *load_pin, "--duration", f"{args.seconds}s")
        out["c50"].append(rep)
        compare.log(f"Postfix, c50, round {r + 1}: {rep['messages_per_s']:.0f} msg/s")
        compare.drain_postfix()
    for r in range(args.rounds):
        out["source_postfix"].append(smtp_source(compare.POSTFIX_PORT,
                                                 max(2000, args.source_messages // 10),
                                                 load_cpus))
        compare.log(f"smtp-source to Postfix: {out['source_postfix'][-1]:.0f}")
        compare.drain_postfix()
    # smtp-sink is one process: it gets the server's CPUs, as postern does.
    ss = subprocess.Popen([*taskset(list(range(top))), "smtp-sink", "-u", "nobody", "-c",
                           f"127.0.0.1:{SMTP_SINK_PORT}", "1000"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        compare.wait_port(SMTP_SINK_PORT)
        for r in range(args.rounds):
            out["source_sink"].append(smtp_source(SMTP_SINK_PORT, args.source_messages,
                                                  load_cpus))
            compare.log(f"smtp-source to smtp-sink: {out['source_sink'][-1]:.0f}")
    finally:
        stop(ss)
    return out


def rates(reps):
    return " ".join(f"{r['messages_per_s']:.0f}" for r in reps)


def med_rate(reps):
    return compare.median([r["messages_per_s"] for r in reps])


def report(res, args, cores, top):
    floor = res["floor"]
    lines = [
        "## Thread-per-core scaling",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Machine: {res['machine'] or f'{os.cpu_count()} CPUs'}. {res['placement']}. "
        + (f"postern with `{' '.join(args.postern_flag)}`" if args.postern_flag else
           "postern relays everything to a postern-load sink")
        + f"; {args.rounds} rounds of {args.seconds} s per load"
        + ("" if "--hold" in args.postern_flag else ", queue drained after each")
        + f"; medians. Disk floor in the same "
        f"run (fdatasync of 1 KiB records back to back, 5 s): sync p50 "
        f"{floor['sync_ms']['p50']:.3f} ms, p99 {floor['sync_ms']['p99']:.3f} ms; an arrival "
        f"waits p99 {floor['arrival_wait_ms']['p99']:.3f} ms.",
        "",
        "| cores | c50 msg/s (rounds) | c50 median | c50w8 msg/s (rounds) | c50w8 median | "
        "c50w8 / 1 core |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    base = None
    for n in cores:
        row = res["cores"][n]
        a = rates(row["c50"])
        b = rates(row["c50w8"])
        mb = med_rate(row["c50w8"])
        base = base or mb
        lines.append(f"| {n} | {a} | {med_rate(row['c50']):,.0f} | {b} | {mb:,.0f} | "
                     f"{mb / base:.2f} |")
    row = res["cores"][top]
    half = row["half"]
    eod = half["latency_ms"]["end_of_data"]
    # Messages due and never sent have no latency: with any, no verdict.
    not_started = half.get("messages_not_started") or 0
    # Nor with failed or refused messages: their quick refusals would sit among the latencies.
    failed = (half.get("messages_failed") or 0) + (half.get("messages_refused") or 0)
    verdict = (f"not judged: {not_started} messages due were never sent" if not_started
               else f"not judged: {failed} messages failed or were refused" if failed
               else "met" if eod["p99"] < 2 else "**not met**")
    lines += [
        "",
        f"Open loop on {top} cores at half the c50 peak ({row['half_rate']} msg/s for "
        f"{args.half_peak_seconds} s, {half['messages_accepted']} accepted, "
        f"{half['messages_failed']} failed, {not_started} due and not sent): end of data to "
        f"250 p50 {eod['p50']:.3f} ms, "
        f"p90 {eod['p90']:.3f} ms, **p99 {eod['p99']:.3f} ms**, p99.9 {eod['p99_9']:.3f} ms, "
        f"max {eod['max']:.3f} ms (target p99 < 2 ms: {verdict}).",
    ]
    pf = res["postfix"]
    if pf:
        pm = med_rate(row["c50"])
        fm = med_rate(pf["c50"])
        src_p = compare.median(row["source"])
        src_s = compare.median(pf["source_sink"])
        src_f = compare.median(pf["source_postfix"])
        r1 = pm / fm if fm else float("nan")
        r2 = src_p / src_s if src_s else float("nan")
        lines += [
            "",
            f"Against Postfix (stock, durable queue, unpinned, relaying to the same sink), same "
            f"run, postern on {top} cores:",
            "",
            "| load | postern msg/s (rounds) | Postfix msg/s (rounds) | postern / Postfix |",
            "| --- | --- | --- | --- |",
            f"| postern-load c50 | {rates(row['c50'])} | {rates(pf['c50'])} | "
            f"**{r1:.1f}×** (target ≥ 50×: {'met' if r1 >= 50 else '**not met**'}) |",
            f"| smtp-source -d -s 50 | {' '.join(f'{x:.0f}' for x in row['source'])} | "
            f"{' '.join(f'{x:.0f}' for x in pf['source_postfix'])} | "
            f"{src_p / src_f if src_f else float('nan'):.1f}× |",
            "",
            f"smtp-source against Postfix's smtp-sink (stores nothing, one process on CPUs "
            f"0..{top - 1}): {' '.join(f'{x:.0f}' for x in pf['source_sink'])} msg/s, median "
            f"{src_s:,.0f}; postern durable / smtp-sink: **{r2:.2f}** (target ≥ 1: "
            f"{'met' if r2 >= 1 else '**not met**'}).",
        ]
    lines += ["", f"The sink counted {res.get('relayed', 0)} messages relayed in this run.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
