"""What the session-wait benchmarks share: free ports, waiting for a listener, and probe
sessions that time NOOP round trips. Loopback only."""
import socket
import subprocess
import threading
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, deadline):
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def connect(port, deadline):
    """A connection to `port`, tried every 10 ms until `deadline` (a server starting)."""
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=10)
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.01)


def probe(port, seconds, out):
    """NOOP round trips (ms) for `seconds`, from when the server answers."""
    s = connect(port, time.time() + 120)
    f = s.makefile("rb")
    f.readline()
    s.sendall(b"EHLO probe.test\r\n")
    while f.readline()[3:4] != b" ":
        pass
    end = time.time() + seconds
    while time.time() < end:
        t = time.perf_counter()
        s.sendall(b"NOOP\r\n")
        if not f.readline().startswith(b"250"):
            raise SystemExit("the probe's NOOP was refused")
        out.append((time.perf_counter() - t) * 1000)
        time.sleep(0.005)
    s.sendall(b"QUIT\r\n")
    s.close()


def count(path, needle):
    with open(path) as f:
        return sum(needle in line for line in f)


def queue_deferred(load, port, n, to, err_path, why):
    """Sends `n` messages to `to` (a `postern-load send --to` pattern) through the server on
    `port`, and waits until its log at `err_path` says each was deferred."""
    subprocess.run(
        [load, "send", "--target", f"127.0.0.1:{port}", "--connections", "16",
         "--pipelining", "--window", "8", "--bdat", "--messages", str(n),
         "--to", to, "--quiet"],
        check=True, stdout=subprocess.DEVNULL, timeout=120)
    deadline = time.time() + 120
    while count(err_path, 'status="deferred"') < n:
        if time.time() > deadline:
            raise SystemExit(f"{why} was not deferred in time")
        time.sleep(0.5)


def start_probes(port, seconds, sessions):
    """`sessions` probe sessions on `port` for `seconds`: their threads, started, and the
    list their round trips go into."""
    rtts = []
    threads = [threading.Thread(target=probe, args=(port, seconds, rtts))
               for _ in range(sessions)]
    for t in threads:
        t.start()
    return threads, rtts


def joined(probes, timeout):
    """The round trips of `start_probes`' sessions once they end, sorted."""
    threads, rtts = probes
    for t in threads:
        t.join(timeout)
    if not rtts:
        raise SystemExit("no probe answered")
    return sorted(rtts)
