#!/usr/bin/env python3
"""What a group commit pays for writing into space reserved with fallocate.

fallocate reserves a file's space as unwritten extents; the first write into one makes the
next fdatasync convert it as well (a metadata write, on a journalled file system a journal
commit). postern's spool keeps its segments written with zeros a little ahead of small records
so that its syncs carry data only. This script measures the difference on one file system:
records of one group commit (17 KiB) written and fdatasynced back to back, into a file
reserved with fallocate, then into a file written with zeros first. Rounds alternate; medians
of the per-sync wall and CPU time are printed.

    python3 benches/scripts/fdatasync_extents.py [--dir DIR] [--syncs 2000] [--rounds 2]
"""

import argparse
import os
import statistics
import time

RECORD = 17 * 1024


def one(path, zeroed, syncs):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        size = syncs * RECORD + 4096
        os.posix_fallocate(fd, 0, size)
        if zeroed:
            zeros = bytes(1 << 20)
            for off in range(0, size, len(zeros)):
                os.pwrite(fd, zeros[: min(len(zeros), size - off)], off)
        os.fsync(fd)
        record = b"x" * RECORD
        waits = []
        cpu0 = time.process_time()
        for i in range(syncs):
            os.pwrite(fd, record, i * RECORD)
            start = time.perf_counter()
            os.fdatasync(fd)
            waits.append(time.perf_counter() - start)
        cpu = (time.process_time() - cpu0) / syncs
    finally:
        os.close(fd)
        os.unlink(path)
    waits.sort()
    return statistics.median(waits), waits[len(waits) * 99 // 100], cpu


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/var/tmp")
    p.add_argument("--syncs", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    path = os.path.join(a.dir, f"postern-extents.{os.getpid()}")
    results = {False: [], True: []}
    for _ in range(a.rounds):
        for zeroed in (False, True):
            results[zeroed].append(one(path, zeroed, a.syncs))
    print(f"{a.syncs} syncs of {RECORD} bytes per round, {a.rounds} rounds, in {a.dir}")
    print("| file | fdatasync p50 (ms) | p99 (ms) | CPU per sync (ms) |")
    print("| --- | --- | --- | --- |")
    for zeroed, name in ((False, "reserved with fallocate"), (True, "written with zeros first")):
        rows = results[zeroed]
        med = [statistics.median(r[k] for r in rows) * 1000 for k in range(3)]
        print(f"| {name} | {med[0]:.3f} | {med[1]:.3f} | {med[2]:.3f} |")


if __name__ == "__main__":
    main()
