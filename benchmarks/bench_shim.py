"""Side-by-side: the Go shim (io.containerd.runc.v2) and our Python shim (io.containerd.pyrunc.v2),
each driven by the real containerd and by our daemon.

For every daemon (containerd, pycontainerd) and runtime (runc.v2, pyrunc.v2), with both daemons
running side by side and every combination measured in turns (a machine that slows down or
speeds up during the run weighs on all of them alike):

  run --rm     `ctr run --rm IMAGE ID /bin/true`, wall time from spawn to exit, `--runs` times
               after `--warmup` unmeasured runs, all combinations interleaved run by run (the order
               reversed every other round); median, p90
  fleet        `--fleets` (3) rounds, the combinations in turns; median time and the fleet of
               median PSS reported. Before each: the other daemons' shims have exited (a grouped
               pyrunc server lingers 10 s after its last container) and their pyrunc zygotes are
               stopped (same binaries share pages, lowering everyone's PSS), one unmeasured
               `run --rm` warms the daemon, then no shim of its own may still run. Then
               `--containers` (20) `ctr run -d IMAGE ID sleep 600` one after the other (or with
               `--parallel N` at once): time to start them all; then, after `--settle` s, PSS and
               RSS (/proc/PID/smaps_rollup) of the daemon, of every shim serving its containers
               and, for pyrunc, of the zygote the shims are forked from. PSS is the honest total
               (shared pages divided among the processes mapping them); RSS counts them in each.
               The containers are killed and removed afterwards.

pyrunc-single needs our daemon with another environment: it runs in a session of its own
afterwards (our daemon alone), against the same baseline.

The issue's targets compare our daemon with containerd: run --rm latency <= 1.0, and for 20
sleeping containers total PSS (daemon + shims) <= 1.0 and time to start them all <= 1.0. The
table gives every combination against containerd with its own Go shim as the baseline.

Fairness: both daemons get the same environment: PATH with the venv's bin/ first (where
containerd-shim-pyrunc-v2 lives), bytecode cached in a temp dir through PYTHONPYCACHEPREFIX
(as an installed package has it, filled by one unmeasured start of our daemon and one container
before anything is measured; this environment sets PYTHONDONTWRITEBYTECODE=1), the zygote's
socket in the daemon's temp dir; everything at niceness `--nice` with its session's autogroup.
The run prints the background load it found: this is a shared 2-vCPU machine.

    .venv/bin/python benchmarks/bench_shim.py [--runs 15] [--containers 20] [--json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    CONTAINERD, PYCONTAINERD, Daemon, DaemonSpec, containerd_spec, pycontainerd_spec,
    raised_priority, short_tempdir,
)

CTR = shutil.which("ctr") or "/usr/bin/ctr"
VENV_BIN = PYCONTAINERD.parent
RUNTIMES = {"runc": "io.containerd.runc.v2", "pyrunc": "io.containerd.pyrunc.v2",
            "pyrunc-single": "io.containerd.pyrunc.v2"}
# daemon environment per variant: pyrunc-single is pyrunc with a server per container
VARIANT_ENV = {"pyrunc-single": {"PYRUNC_SHIM_GROUP": "container"}}
IMAGE_SCRIPT = Path("/work/shared/conformance/make-busybox-image.py")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ctr(address: Path, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run([CTR, "--address", str(address), *args], capture_output=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"ctr {' '.join(args)}: {p.stderr.decode(errors='replace').strip()}")
    return p


def memory(pid: int) -> tuple[int, int]:
    """(PSS, RSS) in KiB."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except OSError:
        pass
    return pss, rss


def processes(needle: str) -> list[tuple[int, bytes]]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if needle.encode() in cmdline:
            out.append((int(entry), cmdline))
    return out


def spec_for(kind: str, tmp: Path, pycache: Path) -> DaemonSpec:
    spec = containerd_spec(tmp) if kind == "containerd" else pycontainerd_spec(tmp, pycache)
    spec.env.update({
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
        "PYTHONPYCACHEPREFIX": str(pycache),
        "PYTHONDONTWRITEBYTECODE": None,
        "PYRUNC_ZYGOTE_DIR": str(tmp / "zygote"),
    })
    return spec


class CpuAccount:
    """CPU used by a daemon and everything it starts (shims, zygote, runc; not the containers,
    which runc puts in cgroups of their own), through a cgroup made for it: cpuacct on v1,
    cpu.stat on v2. Empty when cgroups cannot be written."""

    def __init__(self, name: str) -> None:
        self.path: Path | None = None
        self.v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
        base = Path("/sys/fs/cgroup") if self.v2 else Path("/sys/fs/cgroup/cpuacct")
        try:
            path = base / name
            path.mkdir()
            self.path = path
        except OSError:
            self.path = None

    def add(self, pid: int) -> bool:
        if self.path is None:
            return False
        try:
            (self.path / "cgroup.procs").write_text(str(pid))
            return True
        except OSError:
            return False

    def usage_s(self) -> float | None:
        if self.path is None:
            return None
        try:
            if self.v2:
                for line in (self.path / "cpu.stat").read_text().splitlines():
                    if line.startswith("usage_usec "):
                        return int(line.split()[1]) / 1e6
                return None
            return int((self.path / "cpuacct.usage").read_text()) / 1e9
        except OSError:
            return None

    def remove(self) -> None:
        if self.path is not None:
            try:
                self.path.rmdir()
            except OSError:
                pass


def kill_processes_under(path: Path) -> None:
    """End what we started there and left behind (a zygote, a lingering shim)."""
    end_processes([pid for pid, _cmd in processes(str(path)) if pid != os.getpid()])


def end_processes(pids: list[int]) -> None:
    """SIGTERM first, so a shim removes its socket from /run/containerd/s, then SIGKILL what
    remains after 3 s."""
    for sig, wait in ((15, 3.0), (9, 0.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while wait and time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.05)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_rm(address: Path, runtime: str) -> float:
    cid = f"rm-{uuid.uuid4().hex[:10]}"
    t0 = time.monotonic()
    ctr(address, "run", "--rm", "--runtime", runtime, "bb:latest", cid, "/bin/true")
    return time.monotonic() - t0


def shim_processes(address: Path) -> list[tuple[int, bytes]]:
    return [(pid, cmd) for pid, cmd in processes(str(address)) if b"containerd-shim" in cmd and b"zygote" not in cmd]


def wait_no_shims(address: Path, timeout: float = 30.0) -> None:
    """Until no shim of this daemon runs: a grouped pyrunc server lingers (PYRUNC_SHIM_LINGER,
    10 s) after its last container, and must not be counted in the next fleet."""
    deadline = time.monotonic() + timeout
    while shim_processes(address) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = shim_processes(address)
    if left:
        raise RuntimeError(f"shims still running before the fleet: {[pid for pid, _ in left]}")


def fleet(address: Path, daemon_pid: int, runtime: str, count: int, parallel: int, settle: float,
          python_shim: bool) -> dict:
    wait_no_shims(address)
    ids = [f"fl-{uuid.uuid4().hex[:8]}" for _ in range(count)]
    t0 = time.monotonic()
    pending = list(ids)
    running: list[tuple[str, subprocess.Popen]] = []
    failures = []
    while pending or running:
        while pending and len(running) < parallel:
            cid = pending.pop(0)
            running.append((cid, subprocess.Popen(
                [CTR, "--address", str(address), "run", "-d", "--runtime", runtime, "bb:latest", cid, "sleep", "600"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
        cid, proc = running.pop(0)
        _, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            failures.append(f"{cid}: {err.decode(errors='replace').strip()}")
    elapsed = time.monotonic() - t0
    time.sleep(settle)
    shims = shim_processes(address)
    zygotes = zygotes_of(address.parent) if python_shim else []
    d_pss, d_rss = memory(daemon_pid)
    shim_mem = [memory(pid) for pid, _ in shims]
    z_mem = [memory(pid) for pid in zygotes]
    result = {
        "start_all_s": elapsed, "failures": failures, "shims": len(shims),
        "daemon_pss_kib": d_pss, "daemon_rss_kib": d_rss,
        "shims_pss_kib": sum(p for p, _ in shim_mem), "shims_rss_kib": sum(r for _, r in shim_mem),
        "shim_pss_avg_kib": statistics.mean(p for p, _ in shim_mem) if shim_mem else 0,
        "zygote_pss_kib": sum(p for p, _ in z_mem), "zygote_rss_kib": sum(r for _, r in z_mem),
    }
    result["total_pss_kib"] = d_pss + result["shims_pss_kib"] + result["zygote_pss_kib"]
    for cid in ids:
        ctr(address, "tasks", "kill", "--signal", "SIGKILL", cid, check=False)
    deadline = time.monotonic() + 30
    for cid in ids:
        while time.monotonic() < deadline:
            p = ctr(address, "tasks", "rm", cid, check=False)
            if p.returncode == 0 or b"not found" in p.stderr:
                break
            time.sleep(0.1)
        ctr(address, "containers", "rm", cid, check=False)
    return result


def zygotes_of(tmp: Path) -> list[int]:
    return [pid for pid, cmd in processes("zygote") if str(tmp).encode() in cmd]


@dataclass
class Member:
    """One daemon of a session: its temp dir, spec, process and CPU account."""
    kind: str
    tmp: Path
    spec: DaemonSpec
    daemon: Daemon
    account: CpuAccount
    accounted: bool

    def cpu_s(self) -> float | None:
        return self.account.usage_s() if self.accounted else None


def cpu_between(before: float | None, after: float | None) -> float | None:
    return after - before if before is not None and after is not None else None


def bench_session(kinds: list[str], args: argparse.Namespace, runtimes: list[str], extra_env: dict,
                  image: Path, pycache: Path) -> dict:
    """The daemons of `kinds` at once, every (daemon, runtime) measured in turns.

    `run --rm` goes round all combinations run by run (the order reversed every other round), and
    the fleets round by round (`--fleets`, medians reported), so a machine that gets slower or
    faster during the run weighs on every combination alike. A fleet has the machine to itself as
    far as memory goes: before it, the other daemons' shims must have exited and their pyrunc
    zygotes are stopped (processes of the same binaries share pages, which would lower PSS on both
    sides), then one unmeasured `run --rm` of its own warms its daemon and zygote as in steady use.
    """
    with contextlib.ExitStack() as stack:
        members: list[Member] = []
        for kind in kinds:
            tmp = stack.enter_context(short_tempdir("bsh-"))
            stack.callback(time.sleep, 0.2)
            stack.callback(kill_processes_under, tmp)
            spec = spec_for(kind, tmp, pycache)
            if kind == "pycontainerd":
                spec.env.update(extra_env)
            account = CpuAccount(f"bench-shim-{uuid.uuid4().hex[:8]}")
            stack.callback(account.remove)
            daemon = stack.enter_context(Daemon(spec))
            members.append(Member(kind, tmp, spec, daemon, account, account.add(daemon.pid)))
        for m in members:
            m.daemon.wait_ready(60)
            ctr(m.spec.address, "images", "import", "--base-name", "bb", str(image))
            for rt in runtimes:
                for _ in range(args.warmup):
                    run_rm(m.spec.address, RUNTIMES[rt])
        combos = [(m, rt) for m in members for rt in runtimes]
        times: dict[tuple[str, str], list[float]] = {(m.kind, rt): [] for m, rt in combos}
        cpu: dict[tuple[str, str], float] = {(m.kind, rt): 0.0 for m, rt in combos}
        for i in range(args.runs):
            for m, rt in (combos if i % 2 == 0 else list(reversed(combos))):
                before = m.cpu_s()
                times[(m.kind, rt)].append(run_rm(m.spec.address, RUNTIMES[rt]))
                spent = cpu_between(before, m.cpu_s())
                if spent is not None:
                    cpu[(m.kind, rt)] += spent
        out: dict[str, dict[str, dict]] = {m.kind: {} for m in members}
        for m, rt in combos:
            t = times[(m.kind, rt)]
            log(f"  {m.kind} + {rt}: run --rm median {statistics.median(t) * 1000:.0f} ms")
            out[m.kind][rt] = {"run_rm_median_s": statistics.median(t), "run_rm_p90_s": percentile(t, 0.9),
                               "run_rm_all_s": t, "run_rm_cpu_s": cpu[(m.kind, rt)] / args.runs if m.accounted else None}
        rounds: dict[tuple[str, str], list[dict]] = {(m.kind, rt): [] for m, rt in combos}
        for i in range(args.fleets):
            for m, rt in (combos if i % 2 == 0 else list(reversed(combos))):
                for other in members:
                    if other is not m:
                        end_processes(zygotes_of(other.tmp))   # the next pyrunc start makes a new one
                        wait_no_shims(other.spec.address)
                run_rm(m.spec.address, RUNTIMES[rt])
                before = m.cpu_s()
                r = fleet(m.spec.address, m.daemon.pid, RUNTIMES[rt], args.containers, args.parallel, args.settle,
                          rt.startswith("pyrunc"))
                r["fleet_cpu_s"] = cpu_between(before, m.cpu_s())
                log(f"  {m.kind} + {rt} (fleet {i + 1}/{args.fleets}): {args.containers} containers in "
                    f"{r['start_all_s']:.2f} s, PSS daemon {r['daemon_pss_kib'] / 1024:.1f} MiB + shims "
                    f"{r['shims_pss_kib'] / 1024:.1f} MiB + zygote {r['zygote_pss_kib'] / 1024:.1f} MiB")
                rounds[(m.kind, rt)].append(r)
        for m, rt in combos:
            rs = rounds[(m.kind, rt)]
            by_pss = sorted(rs, key=lambda r: r["total_pss_kib"])
            result = dict(by_pss[len(by_pss) // 2])   # memory figures: the fleet of median total PSS
            result["start_all_s"] = statistics.median(r["start_all_s"] for r in rs)
            result["start_all_rounds_s"] = [r["start_all_s"] for r in rs]
            result["total_pss_rounds_kib"] = [r["total_pss_kib"] for r in rs]
            result["failures"] = [f for r in rs for f in r["failures"]]
            out[m.kind][rt].update(result)
        return out


def warm_bytecode(image: Path, pycache: Path) -> None:
    """Fill the bytecode cache as an installed package has it: our daemon started once, one
    container run with our shim (the zygote imports what the shims need), then all stopped.
    Without it the first daemon to start compiles every module from source, and those compiles
    leave it some 10 MiB of heap that an installed package never costs."""
    with short_tempdir("bsh-warm-") as tmp:
        try:
            spec = spec_for("pycontainerd", tmp, pycache)
            with Daemon(spec) as daemon:
                daemon.wait_ready(60)
                ctr(spec.address, "images", "import", "--base-name", "bb", str(image))
                run_rm(spec.address, RUNTIMES["pyrunc"])
        finally:
            kill_processes_under(tmp)


def bench_all(kinds: list[str], args: argparse.Namespace, runtimes: list[str], image: Path,
              pycache: Path, notes: list[str]) -> dict:
    """One session with every daemon for the runtimes that need no special environment; a variant
    with one (pyrunc-single) gets a session of its own with our daemon alone."""
    results: dict[str, dict[str, dict]] = {kind: {} for kind in kinds}
    groups: dict[tuple, list[str]] = {}
    for rt in runtimes:
        groups.setdefault(tuple(sorted(VARIANT_ENV.get(rt, {}).items())), []).append(rt)
    for env, group in groups.items():
        session = kinds if not env else [k for k in kinds if k == "pycontainerd"]
        if not session:
            continue
        what = f"{' + '.join(session)}: {', '.join(group)}{' with ' + str(dict(env)) if env else ''}"
        log(f"{what} ...")
        try:
            for kind, per_rt in bench_session(session, args, group, dict(env), image, pycache).items():
                results[kind].update(per_rt)
        except Exception as err:  # noqa: BLE001 - report what ran
            notes.append(f"{what} failed: {err}")
            log(f"  failed: {err}")
    return {kind: {rt: per_rt[rt] for rt in runtimes if rt in per_rt} for kind, per_rt in results.items()}


def render(report: dict) -> str:
    base = report["results"].get("containerd", {}).get("runc")
    rows = [("daemon + shim", "run --rm med", "p90", "CPU/run", f"{report['containers']} up", "PSS total",
             "daemon", "shims", "per shim", "zygote", "ratio rm/PSS/up")]
    for kind, per_rt in report["results"].items():
        for rt, r in per_rt.items():
            ratio = ""
            if base:
                ratio = (f"{r['run_rm_median_s'] / base['run_rm_median_s']:.2f} / "
                         f"{r['total_pss_kib'] / base['total_pss_kib']:.2f} / "
                         f"{r['start_all_s'] / base['start_all_s']:.2f}")
            cpu = "-" if r.get("run_rm_cpu_s") is None else f"{r['run_rm_cpu_s'] * 1000:.0f} ms"
            rows.append((f"{kind} + {rt}", f"{r['run_rm_median_s'] * 1000:.0f} ms", f"{r['run_rm_p90_s'] * 1000:.0f} ms",
                         cpu, f"{r['start_all_s']:.2f} s", f"{r['total_pss_kib'] / 1024:.1f} MiB",
                         f"{r['daemon_pss_kib'] / 1024:.1f}", f"{r['shims_pss_kib'] / 1024:.1f}",
                         f"{r['shim_pss_avg_kib'] / 1024:.2f}", f"{r['zygote_pss_kib'] / 1024:.1f}", ratio))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"baseline: containerd + runc (the Go shim); ratios are (run --rm median, total PSS, time to "
             f"start {report['containers']}) against it; targets for our daemon: <= 1.0 each",
             "CPU/run: CPU the daemon and everything it started (shims, zygote, runc) used per run --rm, "
             "from a cgroup made for the daemon (the container itself and ctr not included); on a loaded "
             "machine it is steadier than wall time",
             f"load average before the run: {report['loadavg']}", *report["notes"]]
    return "\n".join(lines + [""] + notes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=15, help="measured `run --rm` per daemon and runtime")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured `run --rm` first (zygote, caches)")
    ap.add_argument("--containers", type=int, default=20)
    ap.add_argument("--fleets", type=int, default=3, help="fleets per daemon and runtime (medians)")
    ap.add_argument("--parallel", type=int, default=1, help="`ctr run -d` at once while starting the fleet")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds before reading memory")
    ap.add_argument("--daemons", default="containerd,pycontainerd")
    ap.add_argument("--runtimes", default="runc,pyrunc,pyrunc-single",
                    help="runc (Go shim), pyrunc (ours as configured by default: up to 8 containers per "
                         "server), pyrunc-single (ours, PYRUNC_SHIM_GROUP=container: a server per container)")
    ap.add_argument("--nice", type=int, default=-10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_shim.py needs root (runc, mounts)", file=sys.stderr)
        return 2
    runtimes = [r for r in args.runtimes.split(",") if r]
    report = {"containers": args.containers, "runs": args.runs, "loadavg": os.getloadavg(), "results": {},
              "notes": [f"containerd: {CONTAINERD}; our daemon: {PYCONTAINERD}; image: static busybox"]}
    with raised_priority(args.nice) as notes, short_tempdir("bsh-img-") as work:
        report["notes"] += notes
        image = work / "bb.tar"
        subprocess.run([sys.executable, str(IMAGE_SCRIPT), str(image)], check=True, capture_output=True)
        pycache = work / "pycache"
        warm_bytecode(image, pycache)
        report["results"] = bench_all([d for d in args.daemons.split(",") if d], args, runtimes, image, pycache,
                                      report["notes"])
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
