"""pyctr images import|export|unpack|busybox against real daemons: ours and the stock containerd
(both by default; PYCTR_TEST_SERVER=pycontainerd or =containerd runs one). Archives come from
../shared/conformance/make-busybox-image.py or are built here (docker save layouts, nasty ones).

What is checked is what containerd's own client leaves behind: image names from the annotations,
the gc.ref labels on manifests and configs, snapshots named by chain id with the snapshot.ref
label, the uncompressed label on layers; and that a bad archive is refused with one error line
and leaves no image and no content behind.
"""
from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from daemons import Daemon
from sharedtools import MAKE_IMAGE
from pycontainerd.api.client import Client
from pycontainerd.api.client.transfer import Services
from pycontainerd.api.client.transfer.unpack import chain_ids

pytestmark = [pytest.mark.root]

VENV_BIN = Path(sys.executable).parent
PYCTR = str(VENV_BIN / "pyctr")
CTR = shutil.which("ctr")
KINDS = [os.environ["PYCTR_TEST_SERVER"]] if os.environ.get("PYCTR_TEST_SERVER") else ["pycontainerd", "containerd"]


# -- helpers -----------------------------------------------------------------------------------

def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def pyctr(d: Daemon, *args: str, ns: str = "default", ok: bool = True, input: bytes | None = None,
          timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
    r = subprocess.run([PYCTR, "--address", d.address, "--namespace", ns, *args], input=input,
                       capture_output=True, timeout=timeout, env=env)
    err = r.stderr.decode(errors="replace")
    assert "Traceback" not in err, err
    if ok:
        assert r.returncode == 0, f"pyctr {args} -> {r.returncode}\n{err}"
        assert err == "", err
    return r


def one_error(r: subprocess.CompletedProcess) -> str:
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 1, (r.returncode, r.stdout, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyctr: "), err
    return lines[0]


def ctr(d: Daemon, *args: str, ns: str = "default", ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([CTR, "--address", d.address, "--namespace", ns, *args],
                       capture_output=True, timeout=120)
    if ok:
        assert r.returncode == 0, r.stderr.decode(errors="replace")
    return r


def query(d: Daemon, ns: str, fn):
    """Run `fn(services)` (a coroutine function) against daemon `d` in namespace `ns`."""
    async def main():
        async with Client(d.address, namespace=ns) as c:
            async with Services(c) as svc:
                return await fn(svc)
    return asyncio.run(main())


def images(d: Daemon, ns: str) -> dict[str, str]:
    async def fn(svc):
        return {i.name: i.target.digest for i in await svc.image_list()}
    return query(d, ns, fn)


def content(d: Daemon, ns: str) -> dict[str, dict]:
    async def fn(svc):
        return {i.digest: i.labels for i in await svc.list_content()}
    return query(d, ns, fn)


def snapshots(d: Daemon, ns: str, snapshotter: str = "overlayfs") -> dict[str, dict]:
    from pycontainerd.api.gen.containerd.services.snapshots import v1 as sapi

    async def fn(svc):
        out = {}
        stub = await svc._stub(sapi.SnapshotsStub)
        async for resp in stub.list(sapi.ListSnapshotsRequest(snapshotter=snapshotter)):
            for info in resp.info:
                out[info.name] = {"parent": info.parent, "labels": dict(info.labels), "kind": info.kind}
        return out
    return query(d, ns, fn)


def make_image(out: Path, *args: str) -> str:
    if not MAKE_IMAGE.exists():
        pytest.skip("../shared/conformance/make-busybox-image.py is not there")
    if not os.path.exists("/usr/bin/busybox"):
        pytest.skip("busybox-static is not installed")
    r = subprocess.run([sys.executable, str(MAKE_IMAGE), str(out), *args], capture_output=True,
                       text=True, check=True)
    return r.stdout.strip()


def read_layout(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isreg()}


def write_tar(path: Path, files: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1700000000
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return path


def layout_parts(files: dict[str, bytes]) -> tuple[dict, dict, dict]:
    """(index, manifest, config) of a single-manifest layout."""
    index = json.loads(files["index.json"])
    mdesc = index["manifests"][0]
    manifest = json.loads(files["blobs/sha256/" + mdesc["digest"].split(":")[1]])
    config = json.loads(files["blobs/sha256/" + manifest["config"]["digest"].split(":")[1]])
    return index, manifest, config


def blob_name(digest: str) -> str:
    return "blobs/sha256/" + digest.split(":", 1)[1]


# -- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=KINDS)
def server(request):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if request.param == "containerd" and not shutil.which("containerd"):
        pytest.skip("containerd is not installed")
    d = Daemon(request.param)
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


@pytest.fixture(scope="module")
def reference():
    """The stock containerd, for comparisons (skipped when it is not installed)."""
    if os.geteuid() != 0 or not shutil.which("containerd") or CTR is None:
        pytest.skip("needs root, containerd and ctr")
    d = Daemon("containerd")
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("transfer")


@pytest.fixture(scope="module")
def busybox_tar(workdir) -> tuple[Path, str]:
    path = workdir / "busybox.tar"
    digest = make_image(path)
    return path, digest


# -- import --------------------------------------------------------------------------------------

def test_import_oci_records_image_labels_and_snapshots(server, busybox_tar):
    path, digest = busybox_tar
    ns = unique("imp")
    r = pyctr(server, "images", "import", "--base-name", "docker.io/library/bb", str(path), ns=ns)
    assert r.stdout.decode() == f"unpacking docker.io/library/bb:latest ({digest})...done\n"
    assert images(server, ns) == {"docker.io/library/bb:latest": digest}

    _, manifest, config = layout_parts(read_layout(path))
    blobs = content(server, ns)
    layer = manifest["layers"][0]["digest"]
    assert blobs[digest]["containerd.io/gc.ref.content.config"] == manifest["config"]["digest"]
    assert blobs[digest]["containerd.io/gc.ref.content.l.0"] == layer
    top = chain_ids(config["rootfs"]["diff_ids"])[-1]
    assert blobs[manifest["config"]["digest"]]["containerd.io/gc.ref.snapshot.overlayfs"] == top
    assert blobs[layer]["containerd.io/uncompressed"] == config["rootfs"]["diff_ids"][0]
    snaps = snapshots(server, ns)
    assert snaps[top]["labels"]["containerd.io/snapshot.ref"] == top
    assert not [k for k in snaps if k.startswith("extract-")]


def test_import_names_as_ctr(server, busybox_tar):
    path, digest = busybox_tar
    ns = unique("names")
    pyctr(server, "images", "import", "--no-unpack", "--digests", "--index-name", "my/index",
          "--base-name", "example.com/bb", str(path), ns=ns)
    got = images(server, ns)
    assert got["example.com/bb:latest"] == digest
    assert got["example.com/bb@" + digest] == digest
    assert "my/index" in got and got["my/index"] != digest
    assert snapshots(server, ns) == {}

    ns2 = unique("default-name")
    pyctr(server, "images", "import", "--no-unpack", str(path), ns=ns2)
    assert images(server, ns2) == {f"import-{time.strftime('%Y-%m-%d')}:latest": digest}

    # with --base-name only refs under that name are kept (a full other ref is dropped)
    files = read_layout(path)
    index = json.loads(files["index.json"])
    index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] = "other.io/x:1"
    files["index.json"] = json.dumps(index).encode()
    other = write_tar(path.with_name("other-ref.tar"), files)
    ns3 = unique("filter")
    pyctr(server, "images", "import", "--no-unpack", "--base-name", "example.com/bb", str(other), ns=ns3)
    assert images(server, ns3) == {}


def test_import_from_stdin_and_twice(server, busybox_tar):
    path, digest = busybox_tar
    ns = unique("stdin")
    pyctr(server, "images", "import", "--base-name", "x.io/bb", "-", ns=ns, input=path.read_bytes())
    assert images(server, ns) == {"x.io/bb:latest": digest}
    # again: everything is there already; same result
    pyctr(server, "images", "import", "--base-name", "x.io/bb", str(path), ns=ns)
    assert images(server, ns) == {"x.io/bb:latest": digest}


def _docker_save(path: Path, layer_raw: bytes, config: dict, tags: list[str]) -> Path:
    cfg = json.dumps(config).encode()
    cfg_id = hashlib.sha256(cfg).hexdigest()
    layer_id = hashlib.sha256(layer_raw).hexdigest()
    manifest = [{"Config": f"{cfg_id}.json", "RepoTags": tags, "Layers": [f"{layer_id}/layer.tar"]}]
    return write_tar(path, {
        f"{cfg_id}.json": cfg,
        f"{layer_id}/layer.tar": layer_raw,
        f"{layer_id}/VERSION": b"1.0",
        f"{layer_id}/json": b"{}",
        "manifest.json": json.dumps(manifest).encode(),
        "repositories": b"{}",
    })


def _docker_archive(workdir: Path, busybox_tar: tuple[Path, str]) -> Path:
    files = read_layout(busybox_tar[0])
    _, manifest, config = layout_parts(files)
    raw = gzip.decompress(files[blob_name(manifest["layers"][0]["digest"])])
    return _docker_save(workdir / "docker-save.tar", raw, config, ["foo/bar:1", "localhost:5000/x:y"])


def test_import_docker_save(server, workdir, busybox_tar):
    archive = _docker_archive(workdir, busybox_tar)
    ns = unique("docker")
    pyctr(server, "images", "import", str(archive), ns=ns)
    got = images(server, ns)
    assert set(got) == {"docker.io/foo/bar:1", "localhost:5000/x:y"}
    target = got["docker.io/foo/bar:1"]
    assert got["localhost:5000/x:y"] == target

    async def manifest(svc):
        return json.loads(await svc.read_all(target))
    m = query(server, ns, manifest)
    assert m["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert m["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    assert m["layers"][0]["mediaType"] == "application/vnd.docker.image.rootfs.diff.tar"
    assert snapshots(server, ns)


def test_import_docker_save_matches_ctr(workdir, busybox_tar, reference, server):
    """The manifest and index built for a docker archive are byte for byte containerd's."""
    archive = _docker_archive(workdir, busybox_tar)
    ns_ours, ns_ctr = unique("ours"), unique("ctr")
    pyctr(server, "images", "import", "--no-unpack", str(archive), ns=ns_ours)
    ctr(reference, "images", "import", "--no-unpack", str(archive), ns=ns_ctr)
    assert images(server, ns_ours) == images(reference, ns_ctr)


def test_import_docker_save_compress_blobs(server, workdir, busybox_tar):
    archive = _docker_archive(workdir, busybox_tar)
    ns = unique("compress")
    pyctr(server, "images", "import", "--compress-blobs", str(archive), ns=ns)
    target = images(server, ns)["docker.io/foo/bar:1"]

    async def manifest(svc):
        return json.loads(await svc.read_all(target))
    m = query(server, ns, manifest)
    layer = m["layers"][0]
    assert layer["mediaType"] == "application/vnd.docker.image.rootfs.diff.tar.gzip"
    blobs = content(server, ns)
    _, _, config = layout_parts(read_layout(busybox_tar[0]))
    assert blobs[layer["digest"]]["containerd.io/uncompressed"] == config["rootfs"]["diff_ids"][0]


def multi_platform_layout(src: Path, out: Path) -> tuple[str, str, str]:
    """An OCI layout whose index.json names (as "latest") a nested index of two manifests:
    the busybox one (linux/amd64) and a linux/arm64 twin (same layer, its own config).
    Returns (index digest, amd64 manifest digest, arm64 manifest digest)."""
    files = read_layout(src)
    index, manifest, config = layout_parts(files)
    amd = index["manifests"][0]
    arm_config = json.dumps({**config, "architecture": "arm64"}).encode()
    arm_manifest = json.dumps({**manifest, "config": {**manifest["config"], "digest": sha256(arm_config),
                                                      "size": len(arm_config)}}).encode()
    files[blob_name(sha256(arm_config))] = arm_config
    files[blob_name(sha256(arm_manifest))] = arm_manifest
    nested = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                         "manifests": [
        {"mediaType": amd["mediaType"], "digest": amd["digest"], "size": amd["size"],
         "platform": {"architecture": "amd64", "os": "linux"}},
        {"mediaType": amd["mediaType"], "digest": sha256(arm_manifest), "size": len(arm_manifest),
         "platform": {"architecture": "arm64", "os": "linux"}}]}).encode()
    files[blob_name(sha256(nested))] = nested
    files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": sha256(nested),
         "size": len(nested), "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}).encode()
    write_tar(out, files)
    return sha256(nested), amd["digest"], sha256(arm_manifest)


def test_import_platforms(server, workdir, busybox_tar):
    if os.uname().machine != "x86_64":
        pytest.skip("the layout below assumes an amd64 host")
    archive = workdir / "multi.tar"
    idx, amd, arm = multi_platform_layout(busybox_tar[0], archive)
    ns = unique("plat")
    pyctr(server, "images", "import", "--base-name", "x.io/multi", str(archive), ns=ns)
    assert images(server, ns) == {"x.io/multi:latest": idx}
    labels = content(server, ns)[idx]
    assert labels == {"containerd.io/gc.ref.content.m.0": amd}
    assert snapshots(server, ns)

    ns2 = unique("plat-all")
    pyctr(server, "images", "import", "--no-unpack", "--all-platforms", "--base-name", "x.io/multi",
          str(archive), ns=ns2)
    labels = content(server, ns2)[idx]
    assert labels == {"containerd.io/gc.ref.content.m.0": amd, "containerd.io/gc.ref.content.m.1": arm}
    assert "containerd.io/gc.ref.content.config" in content(server, ns2)[arm]

    ns3 = unique("plat-arm")
    pyctr(server, "images", "import", "--no-unpack", "--platform", "linux/arm64", "--base-name",
          "x.io/multi", str(archive), ns=ns3)
    assert content(server, ns3)[idx] == {"containerd.io/gc.ref.content.m.0": arm}
    # exporting for arm64 picks that manifest for manifest.json
    out = workdir / f"multi-arm-{server.kind}.tar"
    pyctr(server, "images", "export", "--platform", "linux/arm64", str(out), "x.io/multi:latest", ns=ns3)
    files = read_layout(out)
    dm = json.loads(files["manifest.json"])
    arm_manifest = json.loads(files[blob_name(arm)])
    assert dm[0]["Config"] == blob_name(arm_manifest["config"]["digest"])
    assert blob_name(amd) not in files


# -- refusals ------------------------------------------------------------------------------------

def _assert_nothing(server: Daemon, ns: str) -> None:
    assert images(server, ns) == {}
    assert content(server, ns) == {}
    assert snapshots(server, ns) == {}


def _nasty_cases(path: Path) -> dict[str, tuple[dict[str, bytes], list[tarfile.TarInfo], str]]:
    files = read_layout(path)
    index, manifest, config = layout_parts(files)
    mdigest = index["manifests"][0]["digest"]
    layer = manifest["layers"][0]["digest"]
    cases = {}

    def case(name, changes=None, extra=(), expect=""):
        f = dict(files)
        f.update(changes or {})
        for k in [k for k, v in f.items() if v is None]:
            del f[k]
        cases[name] = (f, list(extra), expect)

    case("dotdot", {"../evil": b"x"}, expect="escapes")
    case("absolute", {"/etc/evil": b"x"}, expect="absolute")
    sym = tarfile.TarInfo("blobs/sha256/link")
    sym.type, sym.linkname = tarfile.SYMTYPE, "/etc/passwd"
    case("symlink", extra=[sym], expect="link")
    hard = tarfile.TarInfo("blobs/sha256/hard")
    hard.type, hard.linkname = tarfile.LNKTYPE, "index.json"
    case("hardlink", extra=[hard], expect="link")
    bad = bytearray(files[blob_name(layer)])
    bad[len(bad) // 2] ^= 0xFF
    case("layer digest mismatch", {blob_name(layer): bytes(bad)}, expect="digest")
    case("manifest not json", {blob_name(mdigest): None,
                               "index.json": json.dumps({"schemaVersion": 2, "manifests": [
                                   {**index["manifests"][0], "digest": sha256(b"{nope"), "size": 5}]}).encode(),
                               blob_name(sha256(b"{nope")): b"{nope"}, expect="JSON")
    big = json.dumps({**manifest, "annotations": {"pad": "x" * (5 << 20)}}).encode()
    case("manifest over 4 MiB", {"index.json": json.dumps({"schemaVersion": 2, "manifests": [
        {**index["manifests"][0], "digest": sha256(big), "size": len(big)}]}).encode(),
        blob_name(sha256(big)): big}, expect="limit")
    case("unknown manifest type", {"index.json": json.dumps({"schemaVersion": 2, "manifests": [
        {**index["manifests"][0], "mediaType": "application/x-unknown"}]}).encode()}, expect="unknown manifest media type")
    case("missing layer", {blob_name(layer): None}, expect="neither in the archive")
    short = dict(manifest)
    short["layers"] = [{**manifest["layers"][0], "size": manifest["layers"][0]["size"] - 1}]
    sbytes = json.dumps(short).encode()
    case("layer size mismatch", {"index.json": json.dumps({"schemaVersion": 2, "manifests": [
        {**index["manifests"][0], "digest": sha256(sbytes), "size": len(sbytes)}]}).encode(),
        blob_name(sha256(sbytes)): sbytes}, expect="size")
    case("no layout", {"index.json": None, "oci-layout": None}, expect="unrecognized image format")
    case("layout version", {"oci-layout": b'{"imageLayoutVersion":"9.9.9"}'}, expect="unsupported OCI version")
    case("not a tar", expect="")
    return cases


NASTY = ["dotdot", "absolute", "symlink", "hardlink", "layer digest mismatch", "manifest not json",
         "manifest over 4 MiB", "unknown manifest type", "missing layer", "layer size mismatch",
         "no layout", "layout version", "not a tar"]


@pytest.fixture(scope="module")
def nasty_base(workdir) -> Path:
    """An image of its own (a random extra layer), so no other test's content is shared."""
    path = workdir / "nasty-base.tar"
    make_image(path, "--extra-mb", "1")
    return path


@pytest.mark.parametrize("case", NASTY)
def test_import_refuses_nasty_archives(server, workdir, nasty_base, case):
    files, extra, expect = _nasty_cases(nasty_base)[case]
    archive = workdir / f"nasty-{case.replace(' ', '-')}.tar"
    if case == "not a tar":
        archive.write_bytes(b"this is not a tar archive" * 100)
    else:
        write_tar(archive, files, extra)
    ns = unique("nasty")
    line = one_error(pyctr(server, "images", "import", "--base-name", "x.io/nasty", str(archive),
                           ns=ns, ok=False))
    assert expect.lower() in line.lower(), line
    _assert_nothing(server, ns)
    # from a pipe the members cannot be checked up front; the result is the same
    if case not in ("not a tar",):
        ns2 = unique("nasty-pipe")
        one_error(pyctr(server, "images", "import", "-", ns=ns2, ok=False, input=archive.read_bytes()))
        _assert_nothing(server, ns2)


# -- export --------------------------------------------------------------------------------------

def test_export_reimports_into_containerd(server, busybox_tar, reference, workdir):
    path, digest = busybox_tar
    ns = unique("exp")
    pyctr(server, "images", "import", "--no-unpack", "--base-name", "docker.io/library/bb", str(path), ns=ns)
    out = workdir / f"export-{server.kind}.tar"
    pyctr(server, "images", "export", str(out), "docker.io/library/bb:latest", ns=ns)
    members = {m.name for m in tarfile.open(out).getmembers()}
    assert {"oci-layout", "index.json", "manifest.json", "blobs", "blobs/sha256"} <= members
    dm = json.loads(tarfile.open(out).extractfile("manifest.json").read())
    assert dm[0]["RepoTags"] == ["bb:latest"]

    ns_ctr = unique("reimp")
    ctr(reference, "images", "import", str(out), ns=ns_ctr)
    assert images(reference, ns_ctr) == {"docker.io/library/bb:latest": digest}
    # containerd's own export of the same image has the same bytes
    theirs = workdir / f"ctr-export-{server.kind}.tar"
    ctr(reference, "images", "export", str(theirs), "docker.io/library/bb:latest", ns=ns_ctr)
    assert theirs.read_bytes() == out.read_bytes()


def test_export_to_stdout_and_missing_image(server, busybox_tar):
    path, _ = busybox_tar
    ns = unique("exp2")
    pyctr(server, "images", "import", "--no-unpack", "--base-name", "x.io/bb", str(path), ns=ns)
    r = pyctr(server, "images", "export", "-", "x.io/bb:latest", ns=ns)
    with tarfile.open(fileobj=io.BytesIO(r.stdout)) as tar:
        assert "index.json" in tar.getnames()
    line = one_error(pyctr(server, "images", "export", "/tmp/never.tar", "x.io/none:1", ns=ns, ok=False))
    assert "not found" in line
    assert not os.path.exists("/tmp/never.tar")


# -- unpack ----------------------------------------------------------------------------------------

def test_unpack_races_and_skips_existing(server, workdir):
    path = workdir / "race.tar"
    make_image(path, "--extra-mb", "4", "--layers", "2")
    ns = unique("race")
    pyctr(server, "images", "import", "--no-unpack", "--base-name", "x.io/race", str(path), ns=ns)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
    procs = [subprocess.Popen([PYCTR, "--address", server.address, "--namespace", ns, "images", "unpack",
                               "x.io/race:latest"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
             for _ in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    _, _, config = layout_parts(read_layout(path))
    chains = chain_ids(config["rootfs"]["diff_ids"])
    snaps = snapshots(server, ns)
    assert set(snaps) == set(chains), snaps
    for parent, child in zip(chains, chains[1:]):
        assert snaps[child]["parent"] == parent
    # a second unpack finds everything there
    r = pyctr(server, "images", "unpack", "x.io/race:latest", ns=ns)
    assert r.stdout.decode().endswith("...done\n")
    assert set(snapshots(server, ns)) == set(chains)


# -- the embedded busybox ----------------------------------------------------------------------------

def test_busybox_archive_is_deterministic_and_imports(server, workdir):
    if not os.path.exists("/usr/bin/busybox"):
        pytest.skip("busybox-static is not installed")
    a, b = workdir / "bb1.tar", workdir / "bb2.tar"
    d1 = pyctr(server, "images", "busybox", str(a)).stdout.decode().strip()
    d2 = pyctr(server, "images", "busybox", str(b)).stdout.decode().strip()
    assert d1 == d2 and a.read_bytes() == b.read_bytes()
    ns = unique("bb")
    pyctr(server, "images", "import", "--busybox", ns=ns)
    assert images(server, ns) == {"docker.io/library/busybox:latest": d1}
    with tarfile.open(a) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isreg()}
    _, manifest, config = layout_parts(files)
    assert config["config"]["Cmd"] == ["sh"] and config["os"] == "linux"
    layer = gzip.decompress(files[blob_name(manifest["layers"][0]["digest"])])
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["bin/sh"].issym() and members["bin/sh"].linkname == "busybox"
    assert members["bin/busybox"].isreg() and members["etc/passwd"].isreg()
    assert members["tmp"].mode == 0o1777
