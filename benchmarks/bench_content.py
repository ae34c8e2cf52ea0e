#!/usr/bin/env python3
"""Side by side: `ctr content ingest` of a large blob into our pycontainerd and into the real
containerd, and (informational) `ctr content get` of it back.

Both daemons run at once, each in a fresh temp root/state (benchmarks/_common.py), so they see
the same disk and page cache. Each round makes a fresh random blob (--size MB, so no round
dedupes against an earlier one), writes it to a file, and times the stock ctr ingesting it from
that file (stdin redirected, as `ctr content ingest REF < file`) into each daemon in turn (the
order alternates between rounds). The blob is checked (`ctr content ls -q` must list its digest),
read back with `ctr content get` (timed, output discarded) and removed again. One unmeasured
warm-up round first. Medians over --runs rounds.

The ratio printed is ours/containerd on the median ingest time: below 1.0 means we are faster
(target <= 1.0). Nothing is pinned by default: an ingest uses the client, the daemon's loop and
its worker threads (--pin puts each daemon on the first CPU and ctr on the others).

Usage:
    .venv/bin/python benchmarks/bench_content.py [--size 200] [--runs 5] [--json]

Exit status: 0 when both were measured, 1 when ours failed, 2 when containerd failed,
3 with --strict when the ratio is above 1.0, 130 on Ctrl-C. Daemons are stopped and temp
dirs removed in every case.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from _common import (CONTAINERD, PYCONTAINERD, Daemon, DaemonError, Placement, containerd_spec, eprint,
                     median, pycontainerd_spec, raised_priority, short_tempdir, thread_affinity)

OURS, THEIRS = "pycontainerd", "containerd"
CTR = shutil.which("ctr") or "/usr/bin/ctr"
TARGET = 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=200, help="blob size in MB (10^6 bytes)")
    ap.add_argument("--runs", type=int, default=5, help="measured rounds (median)")
    ap.add_argument("--pin", action="store_true", help="daemons on the first CPU, ctr on the others")
    ap.add_argument("--nice", type=int, default=-10, help="niceness for everything started (0 to keep)")
    ap.add_argument("--containerd", default=CONTAINERD, help="containerd binary")
    ap.add_argument("--pycontainerd", default=str(PYCONTAINERD), help="our daemon's entry point")
    ap.add_argument("--json", action="store_true", help="print JSON on stdout, not a table")
    ap.add_argument("--strict", action="store_true", help="exit 3 when the ratio is above 1.0")
    return ap.parse_args(argv)


def ctr(address: Path, *args: str, stdin=None, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([CTR, "-a", str(address), "-n", "bench", *args], stdin=stdin, stdout=stdout,
                          stderr=subprocess.PIPE, timeout=600)


def make_blob(path: Path, size: int) -> str:
    """A fresh random file of `size` bytes; its digest."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 1 << 24))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return "sha256:" + h.hexdigest()


def one_round(name: str, address: Path, blob: Path, digest: str, ref: str,
              cpus: frozenset[int] | None) -> tuple[float, float]:
    """Ingest, check, get, remove: (ingest seconds, get seconds)."""
    with open(blob, "rb") as f, thread_affinity(cpus):
        t0 = time.perf_counter()
        p = ctr(address, "content", "ingest", ref, stdin=f)
        ingest = time.perf_counter() - t0
    if p.returncode != 0:
        raise DaemonError(f"{name}: ctr content ingest failed: {p.stderr.decode().strip()}")
    listed = ctr(address, "content", "ls", "-q").stdout.decode().split()
    if digest not in listed:
        raise DaemonError(f"{name}: {digest} not listed after ingest")
    with thread_affinity(cpus):
        t0 = time.perf_counter()
        p = ctr(address, "content", "get", digest, stdout=subprocess.DEVNULL)
        get = time.perf_counter() - t0
    if p.returncode != 0:
        raise DaemonError(f"{name}: ctr content get failed: {p.stderr.decode().strip()}")
    ctr(address, "content", "rm", digest)
    return ingest, get


def run(args: argparse.Namespace, notes: list[str]) -> int:
    if shutil.which(CTR) is None:
        eprint("ctr is not installed")
        return 2
    placement = Placement.split(args.pin)
    size = args.size * 1_000_000
    results: dict[str, dict[str, list[float]]] = {OURS: {"ingest": [], "get": []},
                                                  THEIRS: {"ingest": [], "get": []}}
    with short_tempdir("bc") as tmp:
        (tmp / "o").mkdir()
        (tmp / "t").mkdir()
        ours = Daemon(pycontainerd_spec(tmp / "o", pycache=tmp / "pyc", binary=args.pycontainerd),
                      placement.daemon_cpus)
        theirs = Daemon(containerd_spec(tmp / "t", binary=args.containerd), placement.daemon_cpus)
        daemons = {OURS: ours, THEIRS: theirs}
        try:
            for name, d in daemons.items():
                try:
                    d.start().wait_ready()
                except DaemonError as e:
                    eprint(f"{name} did not start: {e}")
                    return 1 if name == OURS else 2
            blob = tmp / "blob"
            for rnd in range(args.runs + 1):
                digest = make_blob(blob, size)
                order = [OURS, THEIRS] if rnd % 2 else [THEIRS, OURS]
                for name in order:
                    d = daemons[name]
                    try:
                        ingest, get = one_round(name, d.spec.address, blob, digest, f"bench-{rnd}",
                                                placement.client_cpus)
                    except DaemonError as e:
                        eprint(str(e))
                        return 1 if name == OURS else 2
                    if rnd:  # round 0 warms up
                        results[name]["ingest"].append(ingest)
                        results[name]["get"].append(get)
                    if not args.json:
                        eprint(f"round {rnd}{' (warm-up)' if not rnd else ''}: {name:12} "
                               f"ingest {ingest:6.2f} s   get {get:6.2f} s")
        finally:
            for d in daemons.values():
                d.stop()

    med = {name: {k: median(v) for k, v in r.items()} for name, r in results.items()}
    ratio = med[OURS]["ingest"] / med[THEIRS]["ingest"]
    get_ratio = med[OURS]["get"] / med[THEIRS]["get"]
    report = {
        "size_bytes": size, "runs": args.runs, "placement": placement.describe(), "notes": notes,
        "median_s": med, "ingest_ratio_ours_over_containerd": ratio,
        "get_ratio_ours_over_containerd": get_ratio, "target_ingest_ratio": TARGET,
        "samples_s": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        mb = size / 1e6
        print(f"ctr content ingest / get of a {args.size} MB blob, median of {args.runs} rounds "
              f"({placement.describe()})")
        print(f"{'':24}{'pycontainerd':>14}{'containerd':>14}{'ours/theirs':>14}")
        for key, label in (("ingest", "ingest (s)"), ("get", "get (s)")):
            o, t = med[OURS][key], med[THEIRS][key]
            print(f"{label:24}{o:14.2f}{t:14.2f}{o / t:14.2f}")
        print(f"{'ingest MB/s':24}{mb / med[OURS]['ingest']:14.0f}{mb / med[THEIRS]['ingest']:14.0f}")
        verdict = "meets" if ratio <= TARGET else "misses"
        print(f"ingest ratio ours/containerd: {ratio:.2f} ({verdict} the target <= {TARGET})")
    if args.strict and ratio > TARGET:
        return 3
    return 0


def main() -> int:
    args = parse_args()

    def terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        with raised_priority(args.nice) as notes:
            return run(args, notes)
    except KeyboardInterrupt:
        eprint("interrupted: daemons stopped, temp dirs removed")
        return 130


if __name__ == "__main__":
    sys.exit(main())
