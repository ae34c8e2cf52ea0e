#!/usr/bin/env python3
"""Unpacking image layers: our core/archive (and our daemon, when it imports) against the real
containerd's `ctr images import` into overlayfs, on the same machine, in the same run.

Images (built in a temp dir, removed afterwards):
  big    make-busybox-image.py --extra-mb 100 --layers 2: busybox + two 50 MiB layers of
         incompressible data (gzip)
  small  one gzip layer of 20,000 small files (100-3000 bytes) in 200 directories

Measures (median of --runs, fresh target dirs / fresh daemon root each run):
  ours.archive        core/archive.apply_layer of every layer, in order, each into its own
                      directory with the previous ones as overlay parents (what our differ does
                      for an overlayfs snapshot), digests verified, diff_ids computed
  containerd.import   `ctr images import --snapshotter overlayfs` (content + unpack), wall time
  containerd.unpack   import minus `ctr images import --no-unpack` (content only): the unpack part
  ours.import         `pyctr images import --snapshotter overlayfs` against our daemon, when it can
  *.diff_apply        the Diff service alone on each daemon: image imported with --no-unpack, then one
                      Diff.Apply RPC per layer onto overlayfs snapshots (summed; daemon CPU)

Ratios ours/containerd (target <= 1.0): archive/unpack (like for like), archive/import,
diff_apply/diff_apply (the service, like for like), and import/import when our daemon imported; wall time, and CPU seconds (daemon + its reaped children
such as unpigz + the client), which stay meaningful on a busy machine where wall times do not.
Page cache is warm for both sides (the blobs were just written); each run syncs first. The runs
interleave the measures, so background load hits them alike.

    .venv/bin/python benchmarks/bench_unpack.py [--runs 3] [--json] [--keep-going]
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPO, Daemon, DaemonError, containerd_spec, eprint, pycontainerd_spec,  # noqa: E402
                     remove_tree, short_tempdir)

from pycontainerd.core import archive  # noqa: E402

MAKE_IMAGE = Path("/work/shared/conformance/make-busybox-image.py")
if not MAKE_IMAGE.exists():
    MAKE_IMAGE = REPO.parent / "shared" / "conformance" / "make-busybox-image.py"
CTR = shutil.which("ctr") or "/usr/bin/ctr"
PYCTR = str(REPO / ".venv" / "bin" / "pyctr")
MTIME = 1_700_000_000


# -- images -----------------------------------------------------------------------------------

def _add(tar, name, data=None, kind=tarfile.REGTYPE, mode=0o644):
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.mtime = kind, mode, MTIME
    if data is not None:
        ti.size = len(data)
        tar.addfile(ti, io.BytesIO(data))
    else:
        tar.addfile(ti)


def write_oci_archive(out: Path, layer_tars: list[bytes], level: int = 6) -> None:
    """An OCI image layout tar (importable by `ctr images import`) with gzip layers."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> tuple[str, int]:
        d = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[d] = data
        return d, len(data)

    layers = []
    for raw in layer_tars:
        gz = gzip.compress(raw, compresslevel=level, mtime=0)
        d, n = blob(gz)
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": n})
    arch = "amd64" if os.uname().machine == "x86_64" else "arm64"
    config = {"architecture": arch, "os": "linux", "config": {"Cmd": ["/bin/sh"]},
              "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(r).hexdigest() for r in layer_tars]}}
    cd, cn = blob(json.dumps(config, sort_keys=True).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cn},
                "layers": layers}
    md, mn = blob(json.dumps(manifest, sort_keys=True).encode())
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": mn,
        "annotations": {"org.opencontainers.image.ref.name": "latest"},
        "platform": {"architecture": arch, "os": "linux"}}]}
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as t:
        _add(t, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        _add(t, "index.json", json.dumps(index).encode())
        _add(t, "blobs", kind=tarfile.DIRTYPE, mode=0o755)
        _add(t, "blobs/sha256", kind=tarfile.DIRTYPE, mode=0o755)
        for d, data in blobs.items():
            _add(t, "blobs/sha256/" + d.split(":", 1)[1], data)


def small_files_layer(count: int = 20_000, dirs: int = 200, seed: int = 1) -> bytes:
    rnd = random.Random(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        _add(t, "files", kind=tarfile.DIRTYPE, mode=0o755)
        for d in range(dirs):
            _add(t, f"files/d{d:03d}", kind=tarfile.DIRTYPE, mode=0o755)
        for i in range(count):
            size = rnd.randint(100, 3000)
            data = (b"line %d of a small text file\n" % i) * (size // 30 + 1)
            _add(t, f"files/d{i % dirs:03d}/f{i:05d}.txt", data[:size])
    return buf.getvalue()


def layers_of(oci_tar: Path) -> list[tuple[str, str, bytes]]:
    """(media type, digest, blob) of the first manifest's layers, in order."""
    with tarfile.open(oci_tar) as t:
        def read(name):
            return t.extractfile(name).read()
        index = json.loads(read("index.json"))
        man = json.loads(read("blobs/sha256/" + index["manifests"][0]["digest"].split(":")[1]))
        return [(l["mediaType"], l["digest"], read("blobs/sha256/" + l["digest"].split(":")[1]))
                for l in man["layers"]]


# -- measuring --------------------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int) -> float:
    """CPU seconds of pid and of its reaped children (unpigz, ...): utime+stime+cutime+cstime."""
    text = Path(f"/proc/{pid}/stat").read_text()
    f = text[text.rindex(")") + 2:].split()
    return sum(int(x) for x in f[11:15]) / _CLK_TCK


def own_cpu() -> float:
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def time_ours(blobs: list[tuple[str, str, bytes]], work: Path) -> tuple[float, float]:
    """Apply every layer in order, each into its own dir over the previous ones (overlay form)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    paths = []
    for i in range(len(blobs)):
        p = work / f"{i}"
        p.mkdir()
        paths.append(p)
    for i, (_, d, data) in enumerate(blobs):
        (work / f"{i}.blob").write_bytes(data)
    subprocess.run(["sync"], check=False)
    cpu0 = own_cpu()
    start = time.perf_counter()
    for i, (mt, d, data) in enumerate(blobs):
        archive.apply_layer(paths[i], work / f"{i}.blob", mt, expected_digest=d, expected_size=len(data),
                            overlay=i > 0, parents=[str(p) for p in reversed(paths[:i])])
    elapsed = time.perf_counter() - start
    cpu = own_cpu() - cpu0
    shutil.rmtree(work, ignore_errors=True)
    return elapsed, cpu


def ctr_import(ctr: str, address: Path, image: Path, unpack: bool, ns: str, daemon_pid: int) -> tuple[float, float]:
    args = [ctr, "--address", str(address), "--namespace", ns, "images", "import", "--base-name", "bench/img"]
    if ctr == CTR:
        args += ["--snapshotter", "overlayfs"]
    else:
        args += ["--snapshotter", "overlayfs"]
    if not unpack:
        args.append("--no-unpack")
    args.append(str(image))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
    subprocess.run(["sync"], check=False)
    cpu0, client0 = cpu_of(daemon_pid), own_cpu()
    start = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    elapsed = time.perf_counter() - start
    cpu = cpu_of(daemon_pid) - cpu0 + own_cpu() - client0  # the daemon's and the client's
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return elapsed, cpu


def time_daemon_import(kind: str, image: Path, unpack: bool) -> tuple[float, float]:
    with short_tempdir("bu-") as tmp:
        spec = containerd_spec(tmp) if kind == "containerd" else pycontainerd_spec(tmp, pycache=tmp / "pyc")
        with Daemon(spec) as d:
            d.wait_ready()
            return ctr_import(CTR if kind == "containerd" else PYCTR, spec.address, image, unpack, "bench", d.pid)


def time_diff_apply(kind: str, image: Path, blobs: list[tuple[str, str, bytes]]) -> tuple[float, float]:
    """The Diff service alone: the image imported without unpacking first (not timed), then one Apply RPC
    per layer onto a fresh overlayfs snapshot of the previous one; summed wall and daemon CPU."""
    import asyncio

    from pycontainerd.api.client import Client

    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
    rooted = {"containerd.io/gc.root": "bench"}

    async def run(address: Path, pid: int) -> tuple[float, float]:
        wall = cpu = 0.0
        async with Client(str(address), namespace="bench", timeout=900) as client:
            parent = ""
            for i, (mt, digest, data) in enumerate(blobs):
                mounts = await client.snapshots.prepare(f"active-{i}", parent, labels=rooted,
                                                        snapshotter="overlayfs")
                c0, t0 = cpu_of(pid), time.perf_counter()
                await client.diff.apply({"media_type": mt, "digest": digest, "size": len(data)}, mounts)
                wall += time.perf_counter() - t0
                cpu += cpu_of(pid) - c0
                parent = f"layer-{i}"
                await client.snapshots.commit(parent, f"active-{i}", labels=rooted, snapshotter="overlayfs")
        return wall, cpu

    with short_tempdir("bd-") as tmp:
        spec = containerd_spec(tmp) if kind == "containerd" else pycontainerd_spec(tmp, pycache=tmp / "pyc")
        with Daemon(spec) as d:
            d.wait_ready()
            # the image (not unpacked) keeps the blobs from the garbage collector
            r = subprocess.run([CTR, "--address", str(spec.address), "--namespace", "bench", "images", "import",
                                "--no-unpack", "--base-name", "bench/img", str(image)],
                               capture_output=True, env=env, timeout=600)
            if r.returncode != 0:
                raise RuntimeError(f"ctr images import --no-unpack failed: {r.stderr.decode(errors='replace')[-500:]}")
            subprocess.run(["sync"], check=False)
            return asyncio.run(run(spec.address, d.pid))


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--images", default="big,small", help="which images: big, small")
    ap.add_argument("--no-ours-daemon", action="store_true", help="skip the import through our daemon")
    args = ap.parse_args()
    if os.geteuid() != 0:
        eprint("bench_unpack: needs root (overlay mounts, containerd)")
        return 2
    eprint(f"unpigz: {shutil.which('unpigz') or 'absent (zlib)'}; containerd uses unpigz too when present")
    results = {}
    with short_tempdir("bunp-") as tmp:
        images = {}
        wanted = args.images.split(",")
        if "big" in wanted:
            eprint("building the 100 MiB two-layer image ...")
            subprocess.run([sys.executable, str(MAKE_IMAGE), str(tmp / "big.tar"), "--extra-mb", "100",
                            "--layers", "2"], check=True, capture_output=True)
            images["big (busybox + 2 x 50 MiB)"] = tmp / "big.tar"
        if "small" in wanted:
            eprint("building the 20,000-small-files image ...")
            write_oci_archive(tmp / "small.tar", [small_files_layer()])
            images["small (20,000 files)"] = tmp / "small.tar"
        for name, path in images.items():
            blobs = layers_of(path)
            eprint(f"{name}: {len(blobs)} layers, {sum(len(b) for _, _, b in blobs) / 2**20:.1f} MiB compressed")
            r: dict[str, list[float]] = {k: [] for k in (
                "ours.archive", "containerd.import", "containerd.content", "ours.import",
                "ours.diff_apply", "containerd.diff_apply")}
            c: dict[str, list[float]] = {k: [] for k in r}
            ours_error = None
            for i in range(args.runs):
                for key, fn in (("ours.archive", lambda: time_ours(blobs, tmp / "work")),
                                ("containerd.import", lambda: time_daemon_import("containerd", path, True)),
                                ("containerd.content", lambda: time_daemon_import("containerd", path, False)),
                                ("ours.import", lambda: time_daemon_import("pycontainerd", path, True)),
                                ("ours.diff_apply", lambda: time_diff_apply("pycontainerd", path, blobs)),
                                ("containerd.diff_apply", lambda: time_diff_apply("containerd", path, blobs))):
                    if key == "ours.import" and (args.no_ours_daemon or ours_error is not None):
                        continue
                    try:
                        wall, cpu = fn()
                    except (RuntimeError, DaemonError, subprocess.TimeoutExpired) as e:
                        if key != "ours.import":
                            raise
                        ours_error = (str(e).splitlines() or [type(e).__name__])[-1][:300]
                        continue
                    r[key].append(wall)
                    c[key].append(cpu)
                eprint(f"  run {i + 1}: " + ", ".join(f"{k} {v[-1]:.3f}s (cpu {c[k][-1]:.2f}s)"
                                                     for k, v in r.items() if v))
            m = {k: median(v) for k, v in r.items()}
            mc = {k: median(v) for k, v in c.items()}
            m["containerd.unpack"] = max(m["containerd.import"] - m["containerd.content"], 1e-9)
            mc["containerd.unpack"] = max(mc["containerd.import"] - mc["containerd.content"], 1e-9)
            res = {"median_seconds": m, "median_cpu_seconds": mc, "runs": r, "cpu_runs": c,
                   "ratio.archive_vs_unpack": m["ours.archive"] / m["containerd.unpack"],
                   "ratio.archive_vs_import": m["ours.archive"] / m["containerd.import"],
                   "cpu_ratio.archive_vs_unpack": mc["ours.archive"] / mc["containerd.unpack"]}
            res["ratio.diff_apply"] = m["ours.diff_apply"] / m["containerd.diff_apply"]
            res["cpu_ratio.diff_apply"] = mc["ours.diff_apply"] / mc["containerd.diff_apply"]
            if r["ours.import"]:
                res["ratio.import_vs_import"] = m["ours.import"] / m["containerd.import"]
                res["cpu_ratio.import_vs_import"] = mc["ours.import"] / mc["containerd.import"]
            if ours_error:
                res["ours.import_error"] = ours_error
            results[name] = res
        load = os.getloadavg()
        eprint(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'image':28} {'measure':22} {'wall s':>9} {'cpu s':>9}")
    for name, res in results.items():
        for k, v in res["median_seconds"].items():
            if v == v:  # not NaN
                print(f"{name:28} {k:22} {v:9.3f} {res['median_cpu_seconds'][k]:9.3f}")
        for k in ("ratio.archive_vs_unpack", "ratio.archive_vs_import", "ratio.diff_apply",
                  "ratio.import_vs_import", "cpu_ratio.archive_vs_unpack", "cpu_ratio.diff_apply",
                  "cpu_ratio.import_vs_import"):
            if k in res:
                ok = "ok" if res[k] <= 1.0 else "MISSED"
                print(f"{name:28} {k:22} {res[k]:9.2f}  (target <= 1.0: {ok})")
        if "ours.import_error" in res:
            print(f"{name:28} ours.import: not measured: {res['ours.import_error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
