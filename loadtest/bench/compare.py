#!/usr/bin/env python3
"""Side-by-side SMTP benchmark on loopback, everything measured in one run.

1. Generator check: Postfix's smtp-source and postern-load send against the same sinks
   (postern-load sink and Postfix's smtp-sink), so the table shows whether the generator or
   the sink is the bottleneck. Target: postern-load send >= 2x smtp-source msg/s.
2. Servers: the same workloads (1 KiB and 100 KiB; 1 and 50 connections; with and without
   PIPELINING; with and without BDAT) against a stock Postfix relaying to a postern-load sink,
   and against postern when --postern ADDR (or --start-postern) is given, with the
   postern/Postfix ratio.

Needs root when Postfix must be installed or configured (it installs it with apt when
missing: debconf "No configuration", then a loopback-only relay set up with postconf).
Prints the tables with the command and writes them to target/bench/compare.md (or --out),
the section docs/benchmarks.md holds.

    python3 loadtest/bench/compare.py [--rounds 3] [--seconds 2] [--postern 127.0.0.1:2525]
"""

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
LOAD = os.path.join(ROOT, "target", "release", "postern-load")
POSTFIX_PORT = 25262
SMTP_SINK_PORT = 25263
KIB = 1024

# Messages in flight per connection for the `--window` runs (postern-load send --window).
WINDOW = 8

# Generator check: (size, sessions, messages per round).
GENERATOR_CASES = [
    (1 * KIB, 1, 10000),
    (1 * KIB, 50, 30000),
    (100 * KIB, 1, 3000),
    (100 * KIB, 50, 5000),
]


def log(msg):
    print(f"== {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def wait_port(port, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def ensure_postfix():
    if shutil.which("postfix") and shutil.which("smtp-source") and shutil.which("smtp-sink"):
        return
    log("installing postfix (apt)")
    if os.geteuid() != 0:
        raise SystemExit("Postfix is missing and installing it needs root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["debconf-set-selections"],
        input=b"postfix postfix/main_mailer_type select No configuration\n")
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "postfix"], env=env, stdout=subprocess.DEVNULL)


_postfix_saved = None


# The files the benchmark's configuration changes, put back as they were (or removed when
# there were none) at the end.
_POSTFIX_FILES = ("/etc/postfix/main.cf", "/etc/postfix/master.cf", "/etc/mailname")


def _save_postfix():
    """Keeps the machine's Postfix configuration and whether it ran, once per process, and
    puts both back when the process ends (atexit: after the scripts' own cleanup, which
    stops the benchmark's Postfix; a SIGTERM ends the script through that cleanup too)."""
    global _postfix_saved
    if _postfix_saved is not None:
        return
    import atexit
    import signal
    was_running = subprocess.run(["postfix", "status"], capture_output=True).returncode == 0
    files = {}
    for path in _POSTFIX_FILES:
        if os.path.exists(path):
            with open(path, "rb") as f:
                files[path] = f.read()
        else:
            files[path] = None
    _postfix_saved = (was_running, files)
    atexit.register(_restore_postfix)
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def _restore_postfix():
    was_running, files = _postfix_saved
    subprocess.run(["postfix", "stop"], capture_output=True)
    for path, content in files.items():
        if content is None:
            if os.path.exists(path):
                os.remove(path)
        else:
            with open(path, "wb") as f:
                f.write(content)
    if was_running:
        subprocess.run(["postfix", "start"], capture_output=True)
    log("the machine's Postfix configuration put back"
        + (" and Postfix started again" if was_running else ""))


def stop_postfix():
    """Stops the benchmark's Postfix: only one this script configured (the machine's own
    is left alone, and put back at the end)."""
    if _postfix_saved is not None:
        subprocess.run(["postfix", "stop"], capture_output=True)


def configure_postfix(relay_port, in_flow_delay="1s"):
    """A loopback-only Postfix on POSTFIX_PORT relaying everything to relay_port.
    in_flow_delay is Postfix's own default (1s: smtpd waits up to that long before taking a
    message while its queue manager falls behind); "0s" lets it accept as fast as it can.
    The machine's own configuration (main.cf, master.cf) and whether Postfix ran are put back
    when the script ends."""
    if os.geteuid() != 0:
        raise SystemExit("configuring Postfix needs root")
    _save_postfix()
    subprocess.run(["postfix", "stop"], capture_output=True)
    if not os.path.exists("/etc/postfix/main.cf"):
        shutil.copy("/usr/share/postfix/main.cf.debian", "/etc/postfix/main.cf")
    run(["postconf", "-e",
         "inet_interfaces = loopback-only", "inet_protocols = ipv4", "mydestination =",
         "mynetworks = 127.0.0.0/8", f"relayhost = [127.0.0.1]:{relay_port}",
         "default_process_limit = 200", "smtpd_client_connection_count_limit = 0",
         "smtpd_client_connection_rate_limit = 0", "anvil_rate_time_unit = 60s",
         "maillog_file = /var/log/postfix-bench.log", "compatibility_level = 3.6",
         "message_size_limit = 52428800", f"in_flow_delay = {in_flow_delay}"])
    subprocess.run(["postconf", "-M#", "smtp/inet"], capture_output=True)
    run(["postconf", "-Me",
         f"127.0.0.1:{POSTFIX_PORT}/inet = 127.0.0.1:{POSTFIX_PORT} inet n - n - - smtpd"])
    if not os.path.exists("/etc/mailname") or os.path.getsize("/etc/mailname") == 0:
        with open("/etc/mailname", "w") as f:
            f.write(platform.node() + "\n")
    run(["postfix", "check"])
    run(["postfix", "start"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(POSTFIX_PORT)


def postfix_queue_empty():
    """Whether Postfix's queue is empty: a listing that failed (showq busy, Postfix down)
    says nothing about it, and is not taken for an empty one."""
    listed = subprocess.run(["postqueue", "-j"], capture_output=True, text=True)
    return listed.returncode == 0 and listed.stdout.strip() == ""


def drain_postfix(timeout=300.0):
    """Lets Postfix hand its queue to the sink before the next measurement."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if postfix_queue_empty():
            return
        time.sleep(0.2)
    log("warning: Postfix queue not empty after drain timeout")


def scrape(addr):
    """Prometheus text from http://addr/metrics as {name: value}, label sets summed."""
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, value = line.rsplit(" ", 1)
        name = name.split("{", 1)[0]
        out[name] = out.get(name, 0) + float(value)
    return out


# The metrics address of the postern that --start-postern starts.
STARTED_POSTERN_METRICS = "127.0.0.1:25265"


def drain_postern(metrics_addr, timeout=300.0):
    """Lets postern deliver its queue before the next measurement (postern_queue_depth 0)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if scrape(metrics_addr).get("postern_queue_depth", 0) == 0:
            return
        time.sleep(0.2)
    log("warning: postern queue not empty after drain timeout")


class Sink:
    """A postern-load sink on an ephemeral loopback port."""

    def __init__(self, *extra):
        self.proc = subprocess.Popen(
            [LOAD, "sink", "--listen", "127.0.0.1:0", "--lifetime", "3h", *extra],
            stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            raise SystemExit(f"postern-load sink did not start: {line!r}")
        self.addr = line.split()[-1]
        self.port = int(self.addr.rsplit(":", 1)[1])

    def stop(self):
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        counters = {}
        for line in out.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                counters[name.replace("postern_load_sink_", "")] = int(value)
        return counters


def send(target, *args):
    """postern-load send; returns its JSON report."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([LOAD, "send", "--target", target, "--json", f.name, "--quiet", *args],
                       check=True, stdout=subprocess.DEVNULL)
        return json.load(open(f.name))


def smtp_source(port, sessions, messages, size):
    """Postfix's smtp-source, one connection per session reused (-d); returns msg/s."""
    start = time.monotonic()
    run(["smtp-source", "-d", "-s", str(sessions), "-m", str(messages), "-l", str(size),
         "-f", "bench@origin.test", "-t", "rcpt@dest.test", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL)
    return messages / (time.monotonic() - start)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def human(size):
    return f"{size // KIB} KiB"


def cpu_seconds(pid):
    """User and system CPU seconds of process `pid` (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def measured(sink_pid, fn):
    """Runs fn() (a generator run that returns msg/s); returns (msg/s, generator CPU %, sink
    CPU %) over its wall time."""
    sink0, gen0, t0 = cpu_seconds(sink_pid), children_cpu(), time.monotonic()
    rate = fn()
    wall = time.monotonic() - t0
    return (rate, 100 * (children_cpu() - gen0) / wall,
            100 * (cpu_seconds(sink_pid) - sink0) / wall)


# The generator runs of each case: smtp-source, then postern-load send three ways.
GENERATOR_RUNS = ("src", "plain", "piped", "window")


def generator_check(rounds, smtp_sink, pl_sink):
    sinks = [("postern-load sink", pl_sink.port, pl_sink.proc.pid),
             ("Postfix smtp-sink", SMTP_SINK_PORT, smtp_sink.pid)]
    rows = []
    for size, sessions, messages in GENERATOR_CASES:
        for sink_name, port, pid in sinks:
            target = f"127.0.0.1:{port}"
            common = ["--connections", str(sessions), "--messages", str(messages),
                      "--size", str(size)]
            runs = {
                "src": lambda: smtp_source(port, sessions, messages, size),
                "plain": lambda: send(target, *common)["messages_per_s"],
                "piped": lambda: send(target, *common, "--pipelining", "--bdat")[
                    "messages_per_s"],
                "window": lambda: send(target, *common, "--pipelining", "--bdat",
                                       "--window", str(WINDOW))["messages_per_s"],
            }
            row = dict(sink=sink_name, size=size, sessions=sessions, messages=messages,
                       **{k: [] for k in GENERATOR_RUNS})
            for _ in range(rounds):
                for k in GENERATOR_RUNS:
                    row[k].append(measured(pid, runs[k]))
            rows.append(row)
            log(f"generator {human(size)} x{sessions} -> {sink_name}: " + ", ".join(
                f"{k} {median([x[0] for x in row[k]]):.0f}" for k in GENERATOR_RUNS)
                + " msg/s")
    return rows


def workloads():
    for size in (1 * KIB, 100 * KIB):
        for conns in (1, 50):
            for pipelining in (False, True):
                for bdat in (False, True):
                    yield size, conns, pipelining, bdat, 1
            yield size, conns, True, True, WINDOW


def server_matrix(servers, rounds, seconds):
    """servers: list of (name, target, drain), drain a function that waits until that
    server's delivery backlog is gone (or None). Rounds alternate the servers' order. Returns
    {workload: {name: [reports]}}."""
    results = {}
    for w in workloads():
        size, conns, pipelining, bdat, window = w
        args = ["--connections", str(conns), "--duration", f"{seconds}s", "--size", str(size)]
        if pipelining:
            args.append("--pipelining")
        if bdat:
            args.append("--bdat")
        if window > 1:
            args += ["--window", str(window)]
        results[w] = {}
        for r in range(rounds):
            # Alternating, so that neither server always runs on a machine the other just
            # left busy.
            for name, target, drain in (servers if r % 2 == 0 else servers[::-1]):
                report = send(target, *args)
                results[w].setdefault(name, []).append(report)
                if drain:
                    drain()
        summary = ", ".join(
            f"{n} {median([r['messages_per_s'] for r in rs]):.0f} msg/s"
            for n, rs in results[w].items())
        log(f"{label(w)}: {summary}")
    return results


def label(w):
    size, conns, pipelining, bdat, window = w
    return (f"{human(size)}, {conns} conn, {'pipelining' if pipelining else 'no pipelining'}, "
            f"{'BDAT' if bdat else 'DATA'}" + (f", window {window}" if window > 1 else ""))


def machine():
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    pf = subprocess.run(["postconf", "-h", "mail_version"], capture_output=True,
                        text=True).stdout.strip()
    return (f"{os.cpu_count()} vCPU {model}, Linux {platform.release()}, Postfix {pf}, "
            f"{time.strftime('%Y-%m-%d')}")


def fmt(x, digits=0):
    return f"{x:,.{digits}f}"


def markdown(cmd, gen_rows, matrix, servers, rounds, seconds, relayed):
    out = []
    out.append("## Load generator and sink (postern-load), against Postfix\n")
    out.append(f"Command (root; installs and configures Postfix when missing): `{cmd}`\n")
    out.append(f"Machine: {machine()}. Everything on loopback, in one run; medians of "
               f"{rounds} rounds. postern-load runs one executor for send and one for sink "
               "(like the single smtp-source and smtp-sink processes); nothing is pinned.\n")
    out.append("### Is the generator the bottleneck?\n")
    out.append("Same sink, same run. smtp-source runs `-d -s N -m M -l SIZE` (one connection "
               "per session reused, no pipelining: MAIL, RCPT, DATA and the body each wait "
               "for their reply); `postern-load send` runs the same protocol pattern with "
               "`--connections N --messages M --size SIZE`, again with `--pipelining --bdat` "
               "(BDAT only where the sink offers CHUNKING; smtp-sink does not), and again "
               f"with `--window {WINDOW}` added ({WINDOW} messages in flight per connection, "
               "each message's commands following the previous body). (smtp-source's `-l` "
               "is the body alone; postern-load's `--size` includes its ~210 octets of "
               "headers.) CPU % is user + system time over the run's wall time: the "
               "generator's (a child of the script) and the sink's (from /proc), where 100 % "
               "is one core of the two; a single-threaded sink near 100 % is saturated.\n")
    out.append("| sink | size | sessions | smtp-source msg/s | send msg/s | send --pipelining "
               f"--bdat msg/s | + --window {WINDOW} msg/s | best send / smtp-source | "
               "target ≥ 2.0 | CPU % smtp-source / sink | CPU % best send / sink |")
    out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    met = 0
    for r in gen_rows:
        rate = {k: median([x[0] for x in r[k]]) for k in GENERATOR_RUNS}
        s = rate["src"]
        best_k = max(("plain", "piped", "window"), key=lambda k: rate[k])
        best = rate[best_k] / s if s else float("nan")
        ok = best >= 2.0
        met += ok

        def cpu(k):
            return (f"{median([x[1] for x in r[k]]):.0f} / "
                    f"{median([x[2] for x in r[k]]):.0f}")
        out.append(f"| {r['sink']} | {human(r['size'])} | {r['sessions']} | {fmt(s)} | "
                   f"{fmt(rate['plain'])} | {fmt(rate['piped'])} | {fmt(rate['window'])} | "
                   f"{best:.2f} | {'met' if ok else '**not met**'} | {cpu('src')} | "
                   f"{cpu(best_k)} |")
    out.append("")
    out.append(f"Target met in {met} of {len(gen_rows)} cases. Messages per round (msg/s: "
               "smtp-source / send / send --pipelining --bdat / + --window):\n")
    for r in gen_rows:
        rounds_txt = " / ".join(" ".join(fmt(x[0]) for x in r[k]) for k in GENERATOR_RUNS)
        out.append(f"- {r['sink']}, {human(r['size'])}, {r['sessions']} sessions, "
                   f"{r['messages']} messages: {rounds_txt}")
    out.append("")
    names = [n for n, _, _ in servers]
    drained = [n for n, _, drain in servers if drain]
    out.append("### Servers\n")
    out.append(f"`postern-load send --duration {seconds}s` per workload and round, against "
               "each server in turn, the order alternating by round. Postfix is a stock 3.x "
               "relay with its durable queue, relaying to a postern-load sink. The queue of "
               f"{' and '.join(drained) or 'no server'} is drained to the sink after every run, "
               "so that no run pays for those deliveries"
               + ("" if "postern" not in names or "postern" in drained else
                  " (postern, given by --postern, is not: its deliveries may overlap later "
                  "runs)")
               + ". p99 is the whole transaction's (MAIL to the reply to the body).\n")
    if "postern" not in names:
        out.append("postern was not part of this run (pass `--postern ADDR` or "
                   "`--start-postern`), so the ratio column is empty.\n")
    head = "| workload |"
    sep = "| --- |"
    for n in names:
        head += f" {n} msg/s | {n} MB/s | {n} p99 ms |"
        sep += " --- | --- | --- |"
    head += " postern / Postfix |"
    sep += " --- |"
    out.append(head)
    out.append(sep)
    for w, by in matrix.items():
        line = f"| {label(w)} |"
        rates = {}
        for n in names:
            rs = by.get(n, [])
            rate = median([r["messages_per_s"] for r in rs])
            rates[n] = rate
            mbs = median([r["mb_per_s"] for r in rs])
            p99 = median([r["latency_ms"]["transaction"]["p99"] for r in rs])
            failed = sum(r["messages_failed"] + r["messages_refused"] for r in rs)
            note = f" ({failed} not accepted)" if failed else ""
            line += f" {fmt(rate)}{note} | {fmt(mbs, 1)} | {fmt(p99, 2)} |"
        if "postern" in rates and rates.get("Postfix"):
            line += f" {rates['postern'] / rates['Postfix']:.2f} |"
        else:
            line += " – |"
        out.append(line)
    out.append("")
    if relayed is not None:
        accepted, counted, shared = relayed
        who = " and ".join(f"{n} {a}" for n, a in accepted.items())
        out.append(f"Accepted in these runs: {who}. The next hop (the postern-load sink"
                   + (", shared by both servers" if shared else ", Postfix's")
                   + f") counted {counted} messages before it was stopped.\n")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=2, help="per server workload run")
    ap.add_argument("--postern", metavar="ADDR", help="a running postern to include")
    ap.add_argument("--start-postern", action="store_true",
                    help="build and start postern from this tree (durable spool in a temp dir)")
    ap.add_argument("--skip-generator", action="store_true")
    ap.add_argument("--skip-servers", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "target", "bench", "compare.md"))
    args = ap.parse_args()
    cmd = " ".join(["python3 loadtest/bench/compare.py", *sys.argv[1:]])

    ensure_postfix()
    log("building postern-load (release)")
    run(["cargo", "build", "--release", "-q", "-p", "postern-load"], cwd=ROOT)
    procs = []
    postern_target = args.postern
    spool = None
    try:
        next_hop = Sink()
        direct = Sink()
        smtp_sink = subprocess.Popen(
            ["smtp-sink", "-u", "nobody", f"127.0.0.1:{SMTP_SINK_PORT}", "1000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(smtp_sink)
        wait_port(SMTP_SINK_PORT)
        if args.start_postern:
            log("building postern (release)")
            run(["cargo", "build", "--release", "-q", "-p", "postern"], cwd=ROOT)
            spool = tempfile.mkdtemp(prefix="postern-bench-", dir="/var/tmp")
            postern = subprocess.Popen(
                [os.path.join(ROOT, "target", "release", "postern"), "serve",
                 "--listen", "127.0.0.1:25264", "--spool", os.path.join(spool, "spool"),
                 "--hostname", "bench.test",
                 # The same next hop as Postfix: everything goes to the postern-load sink
                 # (never to MX hosts).
                 "--relay-host", next_hop.addr,
                 # For the drain between runs.
                 "--metrics", STARTED_POSTERN_METRICS],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(postern)
            wait_port(25264)
            postern_target = "127.0.0.1:25264"
        gen_rows = []
        if not args.skip_generator:
            gen_rows = generator_check(args.rounds, smtp_sink, direct)
        matrix = {}
        relayed = None
        if not args.skip_servers:
            configure_postfix(next_hop.port)
            drain_postfix()
            servers = [("Postfix", f"127.0.0.1:{POSTFIX_PORT}", drain_postfix)]
            if postern_target:
                drain = ((lambda: drain_postern(STARTED_POSTERN_METRICS))
                         if args.start_postern else None)
                servers.insert(0, ("postern", postern_target, drain))
            matrix = server_matrix(servers, args.rounds, args.seconds)
            accepted = {n: sum(r["messages_accepted"] for by in matrix.values()
                               for r in by.get(n, []))
                        for n, _, _ in servers}
            drain_postfix()
            relayed = (accepted, next_hop.stop().get("messages_total", 0),
                       bool(args.start_postern))
        else:
            servers = []
            next_hop.stop()
        direct.stop()
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=30)
        if not args.skip_servers:
            stop_postfix()
        if spool:
            shutil.rmtree(spool, ignore_errors=True)
    text = markdown(cmd, gen_rows, matrix, servers, args.rounds, args.seconds, relayed)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    log(f"written to {args.out}")


if __name__ == "__main__":
    main()
