#!/usr/bin/env python3
"""Side by side: our pycontainerd daemon against the real containerd, in one run.

Measures, for each daemon, in fresh temp root/state dirs every time:

1. start-to-ready: from spawning the process to (a) its gRPC socket answering a Version call
   (polled every 2 ms, each try on a fresh grpc channel so grpc's reconnect back-off does not
   blur it) and (b) READY=1 arriving on $NOTIFY_SOCKET (a unix datagram socket we bind).
   Median of --runs starts, after one unmeasured start each (warms the page cache). The
   daemons alternate, so drifting machine load hits both alike. Ours is timed with its
   bytecode cached (as an installed package has it; the cache lives in a temp dir via
   PYTHONPYCACHEPREFIX, never in the repo), and once more without any bytecode cache, every
   module compiled from source at each start (informational: the worst case).
2. idle RSS and PSS from /proc/PID/smaps_rollup, --settle seconds after ready. Children are
   summed for pycontainerd only, and only if it has any (containerd spawns none at idle).
   RSS after the load (below) is reported too: a leak shows there first.
3. unary calls/s with --concurrency callers for Version/Version and Namespaces/List (header
   containerd-namespace: default) over --duration seconds after --warmup seconds, from a
   separate load-generator process using grpc's C-core asyncio client (grpc.aio) with
   raw-bytes generic calls on one channel (one HTTP/2 connection, as ctr uses). Also
   reported: the CPU the daemon used over the window, and calls per daemon CPU-second, an
   efficiency figure that holds even when the daemon was not the bottleneck.

The fair deal. On a machine with 2+ CPUs the daemon is pinned to the first CPU and the
poller and load generator to the others (--no-pin turns this off), so the client never
steals the daemon's core and each daemon gets exactly one: ours is one asyncio thread
anyway, and Go sizes GOMAXPROCS from the affinity mask, so containerd runs with
GOMAXPROCS=1. Everything we start runs at niceness --nice (default -10), the benchmark's
session autogroup too (restored afterwards), so other work on a shared machine disturbs
less; both daemons get the same. Each load window says what limited it: the DAEMON (its core
saturated, the number we want), the CLIENT (the load generator saturated its core: that
daemon's calls/s is only a lower bound; grpc.aio tops out near 10k calls/s per core here,
below what containerd serves on one core), CONTENDED (other processes took CPU) or LATENCY.

containerd runs from a temp config.toml (version 2) with root, state, grpc/ttrpc sockets
and the opt plugin's dir inside the temp dir, debug/metrics listeners off, and
disabled_plugins = ["io.containerd.grpc.v1.cri"], because our daemon has no CRI yet. It
never touches /run/containerd or /var/lib/containerd.

Targets (ratio ours/containerd): start-to-ready <= 3, idle RSS <= 1.5, calls/s >= 0.5.

Usage:
    .venv/bin/python benchmarks/bench_daemon.py [--runs 5] [--duration 5] [--json]

Exit status: 0 when both daemons were measured, 1 when pycontainerd could not be (missing,
failed to start, or its calls failed), 2 when containerd could not be, 3 with --strict when
a target was missed, 130 on Ctrl-C or SIGTERM. Daemons are stopped and temp dirs removed
in every case.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from _common import (CONTAINERD, NAMESPACE_HEADER, NAMESPACES_LIST_METHOD, PYCONTAINERD,
                     VERSION_METHOD, Daemon, DaemonError, DaemonSpec, LoadResult, Placement,
                     background_load, containerd_spec, eprint, median, memory_of, missing_binary,
                     pycontainerd_spec, raised_priority, run_unary_load, short_tempdir,
                     time_start, warm_up_grpc)

OURS, THEIRS = "pycontainerd", "containerd"
LOADS = {  # label: (method, metadata)
    "Version": (VERSION_METHOD, ()),
    "Namespaces.List": (NAMESPACES_LIST_METHOD, ((NAMESPACE_HEADER, "default"),)),
}
ROWS = [  # (label, key in ours, key in theirs, scale, format); "field.Label" = per-load field
    ("start -> Version answered (ms, median)", "start_to_version_s", None, 1000, "{:,.0f}"),
    ("start -> READY=1 on NOTIFY_SOCKET (ms)", "start_to_notify_s", None, 1000, "{:,.0f}"),
    ("  ours without bytecode cache (ms)", "start_to_version_nopyc_s", "start_to_version_s",
     1000, "{:,.0f}"),
    ("idle RSS (MiB)", "idle_rss_kib", None, 1 / 1024, "{:,.1f}"),
    ("idle PSS (MiB)", "idle_pss_kib", None, 1 / 1024, "{:,.1f}"),
    ("RSS after load (MiB)", "loaded_rss_kib", None, 1 / 1024, "{:,.1f}"),
    *[(f"{label} calls/s", f"calls_per_s.{label}", None, 1, "{:,.0f}") for label in LOADS],
    *[(f"{label} calls per daemon CPU-s", f"calls_per_daemon_cpu_s.{label}", None, 1,
       "{:,.0f}") for label in LOADS],
    *[(f"{label} daemon CPU (share of a core)", f"daemon_cpu.{label}", None, 100, "{:.0f}%")
      for label in LOADS],
]
TARGETS = {  # key (as in ROWS): (comparison, bound) on the ratio ours/containerd
    "start_to_version_s": ("<=", 3.0),
    "idle_rss_kib": ("<=", 1.5),
    "calls_per_s.Version": (">=", 0.5),
    "calls_per_s.Namespaces.List": (">=", 0.5),
}
SATURATED = 0.85   # a process using this share of its core (or more) is the bottleneck
LIMITS = {
    "daemon": "(the measure we want)",
    "client": "-> calls/s is a lower bound for this daemon; see calls per daemon CPU-s",
    "contended": "-> other processes took CPU; rerun on a quieter machine",
    "latency": "-> neither side saturated a core (wake-ups, locks or sleeps)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="timed starts per daemon (median)")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds after ready before memory")
    ap.add_argument("--concurrency", type=int, default=32, help="concurrent callers")
    ap.add_argument("--warmup", type=float, default=1.0, help="load warm-up seconds")
    ap.add_argument("--duration", type=float, default=5.0, help="load measured seconds")
    ap.add_argument("--timeout", type=float, default=30.0, help="max seconds to ready")
    ap.add_argument("--no-pin", action="store_true", help="do not pin daemon and clients to CPUs")
    ap.add_argument("--nice", type=int, default=-10,
                    help="niceness for daemons, poller and load generator alike (0 to keep)")
    ap.add_argument("--containerd", default=CONTAINERD, help="containerd binary")
    ap.add_argument("--pycontainerd", default=str(PYCONTAINERD), help="our daemon's entry point")
    ap.add_argument("--json", action="store_true", help="print JSON on stdout, not a table")
    ap.add_argument("--strict", action="store_true", help="exit 3 when a target is missed")
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Measuring

SpecFactory = Callable[[Path], DaemonSpec]


def measure_starts(variants: dict[str, SpecFactory], runs: int, placement: Placement,
                   timeout: float, failures: dict[str, str]) -> dict[str, dict]:
    """Median start-to-ready per variant, alternating variants; run 0 is an unmeasured warm-up.

    A variant that fails to start once is dropped, with the reason in `failures`, and so are
    the variants of the same daemon ("pycontainerd (no .pyc)" when "pycontainerd" failed).
    """
    timings: dict[str, list] = {name: [] for name in variants}
    for run in range(runs + 1):
        for name, make_spec in variants.items():
            if any(name.startswith(failed) for failed in failures):
                continue
            with short_tempdir("bs") as tmp:
                try:
                    t = time_start(make_spec(tmp), tmp, placement.daemon_cpus, timeout)
                except DaemonError as e:
                    failures[name] = str(e)
                    eprint(f"  {name}: FAILED to start: {e}")
                    continue
            notify = "never" if t.to_notify is None else f"{t.to_notify * 1000:.0f} ms"
            what = "warm-up" if run == 0 else f"start {run}/{runs}"
            eprint(f"  {what} {name}: Version answered after {t.to_version * 1000:.0f} ms, "
                   f"READY=1 after {notify}")
            if run > 0:
                timings[name].append(t)
    result = {}
    for name, ts in timings.items():
        if ts:
            notified = [t.to_notify for t in ts if t.to_notify is not None]
            result[name] = {
                "start_to_version_s": median([t.to_version for t in ts]),
                "start_to_notify_s": median(notified) if len(notified) == len(ts) else None,
                "start_runs": [asdict(t) for t in ts],
            }
    return result


def measure_session(name: str, make_spec: SpecFactory, placement: Placement,
                    args: argparse.Namespace) -> dict:
    """One fresh daemon: memory after settling, unary load per method, memory after load."""
    with short_tempdir("bm") as tmp:
        spec = make_spec(tmp)
        with Daemon(spec, placement.daemon_cpus) as daemon:
            daemon.wait_ready(args.timeout)
            time.sleep(args.settle)
            daemon.check_alive()
            include_children = name == OURS
            idle = memory_of(daemon.pid, include_children)
            eprint(f"  {name}: idle RSS {idle.rss_kib / 1024:.1f} MiB, "
                   f"PSS {idle.pss_kib / 1024:.1f} MiB ({idle.processes} process(es))")
            loads = {}
            for label, (method, metadata) in LOADS.items():
                r = run_unary_load(spec.address, method, metadata=metadata,
                                   concurrency=args.concurrency, warmup=args.warmup,
                                   duration=args.duration, cpus=placement.client_cpus,
                                   observe_pid=daemon.pid)
                daemon.check_alive()
                loads[label] = {**asdict(r), "calls_per_s": r.calls_per_s,
                                "calls_per_daemon_cpu_s": per_daemon_cpu_s(r),
                                **bottleneck(r, placement)}
                eprint(f"  {name}: {label} {r.calls_per_s:,.0f} calls/s, "
                       f"{usage(loads[label])}, errors {r.errors}"
                       + (f" ({r.first_error})" if r.errors else ""))
            loaded = memory_of(daemon.pid, include_children)
        problems = log_problems(spec.log)
    return {
        "notes": spec.notes,
        "idle_rss_kib": idle.rss_kib,
        "idle_pss_kib": idle.pss_kib,
        "idle_processes": idle.processes,
        "loaded_rss_kib": loaded.rss_kib,
        "loaded_pss_kib": loaded.pss_kib,
        "loads": loads,
        "log_problems": problems,
    }


def per_daemon_cpu_s(r: LoadResult) -> float | None:
    return r.calls / (r.daemon_cpu * r.seconds) if r.daemon_cpu > 0 else None


def bottleneck(r: LoadResult, placement: Placement) -> dict:
    """What limited the calls/s: the daemon, the client, other processes, or latency.

    Pinned, a daemon at its limit uses ~all of its core; when it does not, the load
    generator's core or other people's work on either core is to blame.
    """
    if not placement.pinned:
        return {"limit": "unknown (unpinned)"}
    on_daemon_cpu = sum(r.cpu_busy[c] for c in placement.daemon_cpus)
    on_client_cpu = sum(r.cpu_busy[c] for c in placement.client_cpus)
    others_daemon_side = max(0.0, on_daemon_cpu - r.daemon_cpu)
    others_client_side = max(0.0, on_client_cpu - r.client_cpu)
    if r.daemon_cpu >= SATURATED:
        limit = "daemon"
    elif r.client_cpu >= SATURATED * len(placement.client_cpus):
        limit = "client"
    elif max(others_daemon_side, others_client_side) >= 1 - SATURATED:
        limit = "contended"
    else:
        limit = "latency"
    return {"limit": limit, "others_on_daemon_cpu": others_daemon_side,
            "others_on_client_cpu": others_client_side}


def usage(load: dict) -> str:
    text = f"daemon {load['daemon_cpu']:.0%} / client {load['client_cpu']:.0%} of a core"
    if "others_on_daemon_cpu" in load:
        text += (f", others {load['others_on_daemon_cpu']:.0%} on the daemon's core and "
                 f"{load['others_on_client_cpu']:.0%} on the client's")
    return f"{text}: {load['limit'].upper()}-bound"


def log_problems(log: Path, limit: int = 5) -> list[str]:
    """The first warning/error lines and tracebacks in a daemon's log."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    keys = ("level=warn", "level=error", "level=fatal", "Traceback", "Error:")
    return [line for line in lines if any(k in line for k in keys)][:limit]


# ---------------------------------------------------------------------------------------------
# Comparing and reporting


def metric(result: dict | None, key: str):
    """A daemon's value for `key`: a top-level one, or `<load field>.<load label>`."""
    if not result:
        return None
    field, _, label = key.partition(".")
    if label:
        return result.get("loads", {}).get(label, {}).get(field)
    return result.get(key)


def load_errors(result: dict | None, key: str) -> int:
    _, _, label = key.partition(".")
    return (result or {}).get("loads", {}).get(label, {}).get("errors", 0) if label else 0


def compare(results: dict) -> dict:
    """Ratios ours/containerd for every row, and the verdict on each target."""
    ours, theirs = results.get(OURS), results.get(THEIRS)
    ratios = {}
    for _, key, their_key, _, _ in ROWS:
        a, b = metric(ours, key), metric(theirs, their_key or key)
        ratios[key] = a / b if a is not None and b else None
    verdicts = {}
    for key, (op, bound) in TARGETS.items():
        ratio = ratios.get(key)
        if load_errors(ours, key):
            verdicts[key] = "ERROR"
        elif ratio is None:
            verdicts[key] = "n/a"
        else:
            verdicts[key] = "PASS" if (ratio <= bound if op == "<=" else ratio >= bound) else "MISS"
    return {"ratios": ratios, "verdicts": verdicts}


def cell(result: dict | None, key: str, scale: float, fmt: str) -> str:
    if key.startswith("calls_per_s.") and load_errors(result, key):
        return "ERRORS"
    value = metric(result, key)
    return "-" if value is None else fmt.format(value * scale)


def render(report: dict) -> str:
    results, comparison = report["results"], report["comparison"]
    header = ("metric", THEIRS, OURS, "ours/theirs", "target", "verdict")
    rows = []
    for label, key, their_key, scale, fmt in ROWS:
        ratio, target = comparison["ratios"].get(key), TARGETS.get(key)
        rows.append((label, cell(results.get(THEIRS), their_key or key, scale, fmt),
                     cell(results.get(OURS), key, scale, fmt),
                     "-" if ratio is None else f"{ratio:.2f}",
                     f"{target[0]} {target[1]:g}" if target else "",
                     comparison["verdicts"].get(key, "")))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    out = [line(header), line(["-" * w for w in widths]), *map(line, rows), ""]
    out += [f"note: {n}" for n in report["notes"]]
    return "\n".join(out)


def notes_for(report: dict, placement: Placement) -> list[str]:
    config = report["config"]
    notes = [f"placement: {placement.describe()}"
             + ("; containerd runs with GOMAXPROCS=1 (Go follows the affinity mask)"
                if placement.pinned else "")]
    notes.append("priority, the same for daemons, poller and load generator: "
                 + (", ".join(report["priority"]) or "unchanged"))
    notes.append("background load before the run (other people's work): " + ", ".join(
        f"CPU {cpu} {busy:.0%}" for cpu, busy in sorted(report["background_cpu_busy"].items())))
    notes.append(f"starts: median of {config['runs']} after one unmeasured warm-up start each")
    notes.append(f"load: {config['concurrency']} concurrent callers on one grpc.aio channel, "
                 f"{config['warmup']:g} s warm-up + {config['duration']:g} s measured")
    for name, r in report["results"].items():
        notes += [f"{name}: {n}" for n in r.get("notes", [])]
        for label, load in r.get("loads", {}).items():
            notes.append(f"{name} {label}: {usage(load)} {LIMITS.get(load['limit'], '')}")
            if load["errors"]:
                notes.append(f"{name} {label}: {load['errors']} failed calls, first: "
                             f"{load['first_error']}")
        for problem in r.get("log_problems", []):
            notes.append(f"{name} log: {problem[:200]}")
    for name, error in report["failures"].items():
        lines = error.splitlines() or ["unknown"]
        tail = f" (log ends: {lines[-1]})" if len(lines) > 1 else ""
        notes.append(f"{name} FAILED: {lines[0]}{tail}")
    return notes


# ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, priority: list[str]) -> int:
    placement = Placement.split(pin=not args.no_pin)
    background = background_load(1.0)
    eprint("background load (1 s, before starting anything): " + ", ".join(
        f"CPU {cpu} {busy:.0%}" for cpu, busy in sorted(background.items())))
    eprint(placement.describe())
    if placement.client_cpus is not None:
        os.sched_setaffinity(0, placement.client_cpus)   # threads made from now on inherit it
    warm_up_grpc()

    failures: dict[str, str] = {}
    for name, binary in ((THEIRS, args.containerd), (OURS, args.pycontainerd)):
        missing = missing_binary(binary)
        if missing:
            failures[name] = missing
            eprint(f"{name} NOT AVAILABLE: {missing}")

    with short_tempdir("bpyc") as pycache:
        theirs = functools.partial(containerd_spec, binary=args.containerd)
        ours_cached = functools.partial(pycontainerd_spec, pycache=pycache,
                                        binary=args.pycontainerd)
        variants = {THEIRS: theirs, OURS: ours_cached}
        if OURS not in failures:
            variants[f"{OURS} (no .pyc)"] = functools.partial(pycontainerd_spec,
                                                              binary=args.pycontainerd)
        eprint(f"start-to-ready, {args.runs} timed starts each:")
        starts = measure_starts(variants, args.runs, placement, args.timeout, failures)

        results: dict[str, dict] = {}
        for name, make_spec in ((THEIRS, theirs), (OURS, ours_cached)):
            if name in failures:
                continue
            results[name] = dict(starts.get(name, {}))
            eprint(f"memory and load, {name}:")
            try:
                results[name].update(measure_session(name, make_spec, placement, args))
            except (DaemonError, RuntimeError) as e:
                failures[name] = str(e)
                eprint(f"  {name}: FAILED: {e}")
    cold = starts.get(f"{OURS} (no .pyc)")
    if cold and OURS in results:
        results[OURS]["start_to_version_nopyc_s"] = cold["start_to_version_s"]

    report = {
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "strict")},
        "placement": {"daemon_cpus": sorted(placement.daemon_cpus or []),
                      "client_cpus": sorted(placement.client_cpus or [])},
        "priority": priority,
        "background_cpu_busy": background,
        "results": results,
        "failures": failures,
        "comparison": compare(results),
        "targets": {key: {"op": op, "bound": bound} for key, (op, bound) in TARGETS.items()},
    }
    report["notes"] = notes_for(report, placement)
    print(json.dumps(report, indent=2) if args.json else render(report), flush=True)

    ours = results.get(OURS, {})
    if OURS in failures or any(load["errors"] for load in ours.get("loads", {}).values()):
        eprint(f"{OURS} could not be fully measured: "
               + failures.get(OURS, "its calls failed (see above)"))
        return 1
    if THEIRS in failures:
        eprint(f"{THEIRS} could not be measured: no ratios")
        return 2
    if args.strict and "MISS" in report["comparison"]["verdicts"].values():
        return 3
    return 0


def main() -> int:
    args = parse_args()

    def terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)   # a kill runs the finally blocks too
    try:
        with raised_priority(args.nice) as priority:
            return run(args, priority)
    except KeyboardInterrupt:
        eprint("interrupted: daemons stopped, temp dirs removed")
        return 130


if __name__ == "__main__":
    sys.exit(main())
