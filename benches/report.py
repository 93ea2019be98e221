#!/usr/bin/env python3
"""Prints the latest criterion medians of the proto benchmarks as a table with ratios to the
memchr reference measured in the same run. Usage (from the workspace root):

    cargo bench -p postern-benches --bench proto && python3 benches/report.py
"""
import json
import os
import sys

ROOT = os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "criterion")


def median(group, bench):
    path = os.path.join(ROOT, group, bench, "new")
    with open(os.path.join(path, "estimates.json")) as f:
        ns = json.load(f)["median"]["point_estimate"]
    with open(os.path.join(path, "benchmark.json")) as f:
        tp = json.load(f).get("throughput") or {}
    return ns, tp


def rate(ns, tp):
    if "Bytes" in tp:
        return tp["Bytes"] / ns * 1e9 / 2**20, "MiB/s"
    return tp["Elements"] / ns * 1e9 / 1e6, "M lines/s"


def main():
    rows = []
    ns, tp = median("commands", "frame_and_parse")
    ref_ns, ref_tp = median("commands", "memchr_reference")
    r, unit = rate(ns, tp)
    rr, _ = rate(ref_ns, ref_tp)
    rows.append(("command lines: frame + parse", f"{r:,.1f} {unit}", f"{rr:,.1f} {unit}", ref_ns / ns))
    for name in ("1KiB", "100KiB", "10MiB"):
        group = f"body_{name}"
        ref_ns, ref_tp = median(group, f"memchr_reference/{name}")
        rr, unit = rate(ref_ns, ref_tp)
        for bench in ("data_decode", "bdat_text"):
            ns, tp = median(group, f"{bench}/{name}")
            r, _ = rate(ns, tp)
            rows.append((f"{bench} {name}", f"{r:,.0f} {unit}", f"{rr:,.0f} {unit}", ref_ns / ns))
    print("| benchmark | postern (median) | memchr reference (same run) | ratio |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row[0]} | {row[1]} | {row[2]} | {row[3]:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
