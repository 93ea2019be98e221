"""Starting the release build of postern for the memory scripts beside this file (or the
binary that POSTERN_BIN names, to compare builds)."""
import os
import re
import subprocess


def start(spool, *flags, quiet=False):
    """Starts `postern serve --hold` on an ephemeral loopback port with `spool` and `flags`;
    returns the process and its port once it says it is ready."""
    srv = subprocess.Popen(
        [os.environ.get("POSTERN_BIN", "./target/release/postern"), "serve", "--listen", "127.0.0.1:0", "--spool", spool,
         "--hold", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL if quiet else None, text=True)
    port = None
    for line in srv.stdout:
        m = re.search(r"smtp listening on 127.0.0.1:(\d+)", line)
        if m:
            port = int(m.group(1))
        if "ready with" in line:
            break
    if port is None:
        srv.kill()
        raise SystemExit("postern did not start")
    return srv, port


def rss_kib(pid):
    """The process's resident memory in KiB."""
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1))
