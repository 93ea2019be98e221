"""What the session-wait benchmarks share: free ports, waiting for a listener, and probe
sessions that time NOOP round trips. Loopback only."""
import socket
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
