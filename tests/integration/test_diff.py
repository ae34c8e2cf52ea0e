"""The Diff service over the wire, against our daemon and the real containerd alike: our client
(`client.diff`) applies gzip/zstd layers onto snapshots and compares them back, and the stock
`ctr snapshots diff` asks our daemon for a diff. Both daemons must give the same answers."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
import zstandard

from pycontainerd.api.client import Client
from pycontainerd.core import errdefs
from pycontainerd.core import mount as mountmod

from .test_pyctr import start_server, stop_server

pytestmark = [pytest.mark.root, pytest.mark.compat]

LAYER = "application/vnd.oci.image.layer.v1.tar"
ROOTED = {"containerd.io/gc.root": "test"}  # no lease here: keep everything from the collector


def sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def make_tar(entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, data, extra in entries:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mtime, ti.mode = kind, 1_700_000_000, 0o755 if kind == tarfile.DIRTYPE else 0o644
            for k, v in extra.items():
                setattr(ti, k, v)
            ti.size = len(data) if kind == tarfile.REGTYPE else 0
            t.addfile(ti, io.BytesIO(data) if ti.size else None)
    return buf.getvalue()


L1 = make_tar([
    ("etc", tarfile.DIRTYPE, b"", {}),
    ("etc/hosts", tarfile.REGTYPE, b"127.0.0.1 localhost\n", {}),
    ("etc/old", tarfile.REGTYPE, b"old", {}),
    ("var/lib/data/a", tarfile.REGTYPE, b"a" * 5000, {"uid": 1000, "gid": 1000}),
    ("bin/tool", tarfile.REGTYPE, os.urandom(20000), {"mode": 0o4755}),
    ("lib", tarfile.SYMTYPE, b"", {"linkname": "usr/lib"}),
])
L2 = make_tar([
    ("etc/.wh.old", tarfile.REGTYPE, b"", {}),
    ("var/lib/data/.wh..wh..opq", tarfile.REGTYPE, b"", {}),
    ("var/lib/data/b", tarfile.REGTYPE, b"b", {}),
    ("etc/hosts", tarfile.REGTYPE, b"changed\n", {}),
])


@pytest.fixture(scope="module", params=["pycontainerd", "containerd"])
def address(request):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    tmp = Path(tempfile.mkdtemp(prefix="dif-", dir="/tmp"))
    addr = None
    try:
        addr = start_server(request.param, tmp)
        yield addr
    finally:
        if addr is not None:
            stop_server(addr)
        shutil.rmtree(tmp, ignore_errors=True)


def ingest(address: str, ns: str, layers: list[tuple[str, bytes, bytes]]) -> list[str]:
    """Put layer blobs (media type, blob, uncompressed tar) into the daemon's content store with
    the stock ctr, as an image imported without unpacking (which keeps them from the GC)."""
    import json

    blobs: dict[str, bytes] = {}

    def put(data: bytes) -> dict:
        blobs[sha(data)] = data
        return {"digest": sha(data), "size": len(data)}

    config = put(json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": [sha(raw) for _, _, raw in layers]}}).encode())
    manifest = put(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                               "layers": [{"mediaType": mt, **put(b)} for mt, b, _ in layers]}).encode())
    index = {"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                                 **manifest, "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as t:
        for name, data in [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", json.dumps(index).encode()),
                           *[(f"blobs/sha256/{d[7:]}", b) for d, b in blobs.items()]]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
    r = subprocess.run(["ctr", "--address", address, "--namespace", ns, "images", "import", "--no-unpack",
                        "--base-name", "test/layers", "-"], input=archive.getvalue(), capture_output=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return [sha(b) for _, b, _ in layers]


def listing(root: str) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            data = open(p, "rb").read() if os.path.isfile(p) and not os.path.islink(p) else None
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_uid, data and hashlib.sha256(data).hexdigest(),
                                             os.readlink(p) if os.path.islink(p) else None)
    return out


async def test_apply_compare_round_trip(address):
    ns = "difftest"
    async with Client(address, namespace=ns) as client:
        blob1 = gzip.compress(L1, mtime=0)
        blob2 = zstandard.ZstdCompressor().compress(L2)
        d1, d2 = ingest(address, ns, [(LAYER + "+gzip", blob1, L1), (LAYER + "+zstd", blob2, L2)])
        m1 = await client.snapshots.prepare("k1", labels=ROOTED)
        a1 = await client.diff.apply({"media_type": LAYER + "+gzip", "digest": d1, "size": len(blob1)}, m1)
        assert (a1.media_type, a1.digest, a1.size) == (LAYER, sha(L1), len(L1))
        await client.snapshots.commit("s1", "k1", labels=ROOTED)
        m2 = await client.snapshots.prepare("k2", "s1", labels=ROOTED)
        a2 = await client.diff.apply({"media_type": LAYER + "+zstd", "digest": d2, "size": len(blob2)}, m2)
        assert a2.digest == sha(L2)
        with mountmod.temp_mount(m2) as root:
            got = listing(root)
        assert "etc/old" not in got and sorted(p for p in got if p.startswith("var/lib/data/")) == ["var/lib/data/b"]
        # Compare the active snapshot with its parent: the layer comes back (gzip + label)
        lower = await client.snapshots.view("v1", "s1", labels=ROOTED)
        desc = await client.diff.compare(lower, m2, labels={"x": "y", **ROOTED})
        assert desc.media_type == LAYER + "+gzip"
        info = await client.content.info(desc.digest)
        raw = gzip.decompress(await client.content.read_all(desc.digest))
        assert info.labels["containerd.io/uncompressed"] == sha(raw) and info.labels["x"] == "y"
        names = tarfile.open(fileobj=io.BytesIO(raw)).getnames()
        assert names == ["etc", "etc/hosts", "etc/.wh.old", "var", "var/lib", "var/lib/data",
                         "var/lib/data/.wh.a", "var/lib/data/b"]
        # errors as containerd gives them
        with pytest.raises(errdefs.Unimplemented, match="unsupported diff media type"):
            await client.diff.compare(lower, m2, media_type=LAYER + "+zstd")
        with pytest.raises(errdefs.NotFound):
            await client.diff.apply({"media_type": LAYER, "digest": sha(b"missing"), "size": 7}, m2)
        for key in ("v1", "k2", "s1"):
            await client.snapshots.remove(key)


def test_stock_ctr_snapshots_diff(address):
    """`ctr snapshots diff` (Diff over gRPC from the Go client) against the daemon."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
    ctr = ["ctr", "--address", address, "--namespace", "ctrdiff"]
    work = tempfile.mkdtemp(prefix="ctrdiff-", dir="/tmp")
    try:
        def run(*args, check=True):
            r = subprocess.run([*ctr, *args], capture_output=True, text=True, env=env, timeout=60)
            if check:
                assert r.returncode == 0, (args, r.stderr)
            return r

        run("snapshots", "prepare", "base", "")
        run("snapshots", "label", "base", "containerd.io/gc.root=x")
        out = run("snapshots", "mounts", work, "base").stdout.strip()
        subprocess.run(out, shell=True, check=True)
        try:
            with open(f"{work}/hello", "w") as f:
                f.write("hello\n")
        finally:
            mountmod.unmount_recursive(work)
        r = subprocess.run([*ctr, "snapshots", "diff", "--keep", "--label", "k=v", "base"],
                           capture_output=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        blob = r.stdout  # ctr writes the diff blob to stdout
        digest = sha(blob)
        raw = gzip.decompress(blob)
        assert tarfile.open(fileobj=io.BytesIO(raw)).getnames() == ["hello"]
        line = next(l for l in run("content", "ls").stdout.splitlines() if l.startswith(digest))
        assert f"containerd.io/uncompressed={sha(raw)}" in line and "k=v" in line
        r = run("snapshots", "diff", "--media-type", "application/x-nope", "base", check=False)
        assert r.returncode != 0 and "unsupported diff media type" in r.stderr, r.stderr
    finally:
        mountmod.unmount_recursive(work, lazy=True)
        shutil.rmtree(work, ignore_errors=True)
