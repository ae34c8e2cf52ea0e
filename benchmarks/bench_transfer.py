#!/usr/bin/env python3
"""Side by side: importing and pulling a 100 MiB two-layer image, pyctr into our pycontainerd
against the stock ctr into the real containerd.

The image is `make-busybox-image.py --extra-mb 100 --layers 2` (../shared/conformance, or
--image TAR): busybox plus two layers of 50 MiB of random data. It is pushed once, with plain
HTTP requests, to a Debian docker-registry started on 127.0.0.1:<free port> with its storage in
the temp dir. Then, for each round and each side, on a freshly started daemon (so nothing is
deduplicated against an earlier round):

    import   pyctr images import --base-name bench/img IMAGE.tar   vs   ctr images import ...
    pull     pyctr images pull --plain-http 127.0.0.1:PORT/bench/img:v1  vs  ctr images pull ...

Both commands unpack into overlayfs, as ctr does by default; the time is the command's wall time
(client start-up included; pyctr's is also reported alone). The sides alternate which goes first
between rounds; one unmeasured warm-up round first; medians over --runs rounds. The ratio is
ours/containerd (target <= 1.0).

Usage:
    .venv/bin/python benchmarks/bench_transfer.py [--runs 3] [--json] [--image TAR]

Exit status: 0 when both were measured, 1 when ours failed, 2 when containerd (or the setup)
failed, 3 with --strict when a ratio is above 1.0, 130 on Ctrl-C. Daemons and the registry are
stopped and temp dirs removed in every case.
"""
from __future__ import annotations

import argparse
import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from _common import (CONTAINERD, PYCONTAINERD, REPO, Daemon, DaemonError, containerd_spec, eprint,
                     median, pycontainerd_spec, raised_priority, remove_tree, short_tempdir)

OURS, THEIRS = "pycontainerd", "containerd"
CTR = shutil.which("ctr") or "/usr/bin/ctr"
PYCTR = REPO / ".venv" / "bin" / "pyctr"
REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
MAKE_IMAGE = REPO.parent / "shared" / "conformance" / "make-busybox-image.py"
TARGET = 1.0
NAME = "bench/img"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="measured rounds (median)")
    ap.add_argument("--extra-mb", type=int, default=100, help="random data in the image (MiB)")
    ap.add_argument("--layers", type=int, default=2, help="layers the random data is split over")
    ap.add_argument("--image", default="", help="an OCI archive to use instead of building one")
    ap.add_argument("--nice", type=int, default=-10, help="niceness for everything started (0 to keep)")
    ap.add_argument("--containerd", default=CONTAINERD, help="containerd binary")
    ap.add_argument("--pycontainerd", default=str(PYCONTAINERD), help="our daemon's entry point")
    ap.add_argument("--json", action="store_true", help="print JSON on stdout, not a table")
    ap.add_argument("--strict", action="store_true", help="exit 3 when a ratio is above 1.0")
    return ap.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    def __init__(self, tmp: Path):
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        cfg = tmp / "registry.yml"
        cfg.write_text("version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
                       f"storage:\n  filesystem:\n    rootdirectory: {tmp / 'registry'}\n"
                       f"http:\n  addr: {self.host}\n")
        self.log = open(tmp / "registry.log", "wb")
        self.proc = subprocess.Popen([REGISTRY, "serve", str(cfg)], stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DaemonError("docker-registry exited: " + (tmp / "registry.log").read_text()[-500:])
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise DaemonError("docker-registry did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

    def upload(self, repo: str, tag: str, layout: Path) -> str:
        """Push an OCI layout tar with plain HTTP requests; the manifest digest."""
        with tarfile.open(layout) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isreg()}
        mdesc = json.loads(files["index.json"])["manifests"][0]
        manifest_name = "blobs/sha256/" + mdesc["digest"].split(":")[1]
        conn = http.client.HTTPConnection(self.host, timeout=120)
        for name, data in files.items():
            if not name.startswith("blobs/sha256/") or name == manifest_name:
                continue
            conn.request("POST", f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"})
            r = conn.getresponse()
            r.read()
            loc = r.getheader("Location")
            loc = loc.split(self.host, 1)[1] if "://" in loc else loc
            sep = "&" if "?" in loc else "?"
            conn.request("PUT", f"{loc}{sep}digest=sha256:{name.rsplit('/', 1)[1]}", body=data,
                         headers={"Content-Type": "application/octet-stream"})
            r = conn.getresponse()
            r.read()
            if r.status != 201:
                raise DaemonError(f"registry refused {name}: {r.status}")
        conn.request("PUT", f"/v2/{repo}/manifests/{tag}", body=files[manifest_name],
                     headers={"Content-Type": mdesc["mediaType"]})
        r = conn.getresponse()
        r.read()
        if r.status != 201:
            raise DaemonError(f"registry refused the manifest: {r.status}")
        conn.close()
        return mdesc["digest"]


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, timeout=900)
    elapsed = time.perf_counter() - t0
    if p.returncode != 0:
        raise DaemonError(f"{' '.join(argv[:1] + argv[3:])}: {p.stderr.decode(errors='replace').strip()[-500:]}")
    return elapsed


def fresh(name: str, tmp: Path, args: argparse.Namespace) -> Daemon:
    if tmp.exists():
        remove_tree(tmp)
    tmp.mkdir(parents=True)
    if name == OURS:
        spec = pycontainerd_spec(tmp, pycache=tmp.parent / "pyc", binary=args.pycontainerd)
    else:
        spec = containerd_spec(tmp, binary=args.containerd)
    d = Daemon(spec)
    d.start().wait_ready()
    return d


def measure(name: str, op: str, tmp: Path, args: argparse.Namespace, image: Path, ref: str) -> float:
    d = fresh(name, tmp, args)
    try:
        client = [str(PYCTR)] if name == OURS else [CTR]
        base = client + ["-a", str(d.spec.address), "-n", "bench", "images"]
        if op == "import":
            return timed(base + ["import", "--base-name", NAME, str(image)])
        return timed(base + ["pull", "--plain-http", ref])
    finally:
        d.stop()
        remove_tree(tmp)


def run(args: argparse.Namespace, notes: list[str]) -> int:
    for tool in (CTR, REGISTRY, str(PYCTR)):
        if shutil.which(tool) is None and not Path(tool).exists():
            eprint(f"{tool} is not installed")
            return 2
    results: dict[str, dict[str, list[float]]] = {n: {"import": [], "pull": []} for n in (OURS, THEIRS)}
    with short_tempdir("bt") as tmp:
        image = Path(args.image) if args.image else tmp / "image.tar"
        if not args.image:
            if not MAKE_IMAGE.exists():
                eprint(f"{MAKE_IMAGE} is not there; give --image")
                return 2
            subprocess.run([sys.executable, str(MAKE_IMAGE), str(image), "--extra-mb", str(args.extra_mb),
                            "--layers", str(args.layers)], check=True, capture_output=True)
        size = image.stat().st_size
        registry = Registry(tmp)
        try:
            ref = f"{registry.host}/{NAME}:v1"
            digest = registry.upload(NAME, "v1", image)
            if not args.json:
                eprint(f"image: {size / 2**20:.1f} MiB archive, manifest {digest}, pushed to {ref}")
            startup = [timed([str(PYCTR), "--help"]) for _ in range(3)]
            for rnd in range(args.runs + 1):
                order = [OURS, THEIRS] if rnd % 2 else [THEIRS, OURS]
                for op in ("import", "pull"):
                    for name in order:
                        try:
                            t = measure(name, op, tmp / name[0], args, image, ref)
                        except DaemonError as e:
                            eprint(f"{name} {op}: {e}")
                            return 1 if name == OURS else 2
                        if rnd:
                            results[name][op].append(t)
                        if not args.json:
                            eprint(f"round {rnd}{' (warm-up)' if not rnd else ''}: {name:12} {op:6} {t:6.2f} s")
        finally:
            registry.stop()

    med = {n: {op: median(v) for op, v in r.items()} for n, r in results.items()}
    ratios = {op: med[OURS][op] / med[THEIRS][op] for op in ("import", "pull")}
    report = {"image_bytes": size, "runs": args.runs, "notes": notes, "median_s": med,
              "ratio_ours_over_containerd": ratios, "target_ratio": TARGET,
              "pyctr_startup_s": median(startup), "samples_s": results}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"import and pull of a {size / 2**20:.0f} MiB image ({args.layers} data layers), "
              f"unpacked into overlayfs; median of {args.runs} rounds, fresh daemon each time")
        print(f"{'':20}{'pyctr->ours':>14}{'ctr->containerd':>17}{'ours/theirs':>14}")
        for op in ("import", "pull"):
            o, t = med[OURS][op], med[THEIRS][op]
            print(f"{op + ' (s)':20}{o:14.2f}{t:17.2f}{o / t:14.2f}")
        print(f"(pyctr start-up alone: {median(startup):.2f} s, included above)")
        for op, r in ratios.items():
            print(f"{op} ratio ours/containerd: {r:.2f} ({'meets' if r <= TARGET else 'misses'} the target <= {TARGET})")
    if args.strict and any(r > TARGET for r in ratios.values()):
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
        eprint("interrupted: daemons and registry stopped, temp dirs removed")
        return 130


if __name__ == "__main__":
    sys.exit(main())
