"""Root filesystems unpacked by the real containerd and by us must be identical.

Multi-layer OCI images are built here with tarfile (whiteouts, opaque directories, hard links,
symlinks, setuid/setgid/sticky, owners, user.* xattrs, devices, fifos, long and non-ASCII names,
type changes, implicit parents, gzip and zstd layers), imported and unpacked by the real
containerd (`ctr images import --snapshotter overlayfs`, rootfs read with `ctr images mount`),
and applied with our core/archive: (a) layer by layer into overlay upperdirs, as our differ does
for overlayfs snapshots, read through a real overlay mount; (b) all into one plain directory;
(c) through our daemon (stock ctr against it), when it can import. Paths, types, modes, owners,
sizes, contents, link targets, hard-link groups, xattrs, device numbers and mtimes must match.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
import zstandard

from pycontainerd.core import archive
from pycontainerd.core import mount as mountmod
from pycontainerd.core.mount import Mount

from ..integration.test_pyctr import start_server, stop_server

pytestmark = [pytest.mark.compat, pytest.mark.root]

CTR = shutil.which("ctr")
MTIME = 1_650_000_000


# -- images -----------------------------------------------------------------------------------

def m(name, kind=tarfile.REGTYPE, data=b"", mode=None, uid=0, gid=0, mtime=MTIME, linkname="",
      dev=(0, 0), pax=None):
    return dict(name=name, kind=kind, data=data, mode=mode, uid=uid, gid=gid, mtime=mtime,
                linkname=linkname, dev=dev, pax=pax)


def tar_of(entries, fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for e in entries:
            ti = tarfile.TarInfo(e["name"])
            ti.type = e["kind"]
            ti.mode = e["mode"] if e["mode"] is not None else (0o755 if e["kind"] == tarfile.DIRTYPE else 0o644)
            ti.uid, ti.gid, ti.mtime, ti.linkname = e["uid"], e["gid"], e["mtime"], e["linkname"]
            ti.devmajor, ti.devminor = e["dev"]
            if e["pax"]:
                ti.pax_headers = dict(e["pax"])
            ti.size = len(e["data"]) if e["kind"] == tarfile.REGTYPE else 0
            t.addfile(ti, io.BytesIO(e["data"]) if ti.size else None)
    return buf.getvalue()


D, L, S = tarfile.DIRTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE
CAP = b"\x01\x00\x00\x02\x00\x20\x00\x00" + bytes(12)  # cap_net_raw, as ping has
X = lambda k, v: {f"SCHILY.xattr.{k}": v}  # noqa: E731

LAYER1 = [
    m("bin", D), m("etc", D, mode=0o755, mtime=MTIME - 100), m("tmp", D, mode=0o1777),
    m("usr", D), m("usr/lib", D), m("usr/bin", D), m("var", D), m("var/cache", D, mode=0o2775, gid=50),
    m("bin/sh", data=os.urandom(4096), mode=0o755),
    m("usr/bin/passwd", data=b"suid binary", mode=0o4755),
    m("usr/bin/wall", data=b"sgid binary", mode=0o2755, gid=5),
    m("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n"),
    m("etc/shadow", data=b"root:*:1::::::\n", mode=0o640, gid=42),
    m("etc/hostname", data=b"base\n"),
    m("etc/gone-dir", D), m("etc/gone-dir/a", data=b"a"), m("etc/gone-dir/sub/b", data=b"b"),
    m("etc/opaque", D, mode=0o750), m("etc/opaque/lower-file", data=b"lower"),
    m("etc/opaque/lower-dir/x", data=b"x"),
    m("etc/file2dir", data=b"will be a dir"), m("etc/dir2file", D), m("etc/dir2file/child", data=b"c"),
    m("home", D), m("home/user", D, mode=0o700, uid=1000, gid=1000),
    m("home/user/.profile", data=b"export A=1\n", uid=1000, gid=1000, mode=0o600),
    m("home/big-ids", data=b"ids", uid=4_000_000, gid=3_000_000),
    m("usr/lib/libc.so.6", data=os.urandom(30000), mode=0o755),
    m("usr/lib/libc.so", S, linkname="libc.so.6"),
    m("lib", S, linkname="usr/lib"),
    m("usr/bin/abs-link", S, linkname="/etc/passwd"),
    m("usr/bin/dangling", S, linkname="/does/not/exist"),
    m("usr/bin/hard1", data=b"hard linked content", mode=0o755),
    m("usr/bin/hard2", L, linkname="usr/bin/hard1", mode=0o755),
    m("usr/bin/hard3", L, linkname="usr/bin/hard1", mode=0o755),
    m("dev", D), m("dev/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3)),
    m("dev/loop0", tarfile.BLKTYPE, mode=0o660, gid=6, dev=(7, 0)),
    m("run", D), m("run/initctl", tarfile.FIFOTYPE, mode=0o600),
    m("xattr-file", data=b"x", pax=X("user.comment", "hello")),
    m("xattr-dir", D, pax={**X("user.a", "1"), **X("user.b", "two")}),
    m("very/" + "long-directory-name/" * 8 + "file-with-a-long-name.txt", data=b"long"),
    m("ünïcødé/fïlé", data=b"utf8"),
    m("keep/me", data=b"kept"),
]

LAYER2 = [
    m("etc/.wh.hostname"),
    m("etc/.wh.gone-dir"),
    m("etc/opaque/.wh..wh..opq"),
    m("etc/opaque/upper-file", data=b"upper"),
    m("etc/file2dir", D), m("etc/file2dir/inside", data=b"now a dir"),
    m("etc/dir2file", data=b"now a file"),
    m("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"),
    m("etc/shadow", data=b"root:*:2::::::\n", mode=0o600, gid=42),
    m("home/user/.bashrc", data=b"# rc\n", uid=1000, gid=1000),  # implicit parent from layer 1
    m("var/cache/app/data", data=b"cache"),  # implicit var/cache/app below a setgid dir
    m("usr/bin/hard4", L, linkname="usr/bin/hard1"),  # target from a lower layer: not in this one
    m("usr/bin/hard1", data=b"rewritten", mode=0o755),
    m("usr/bin/newhard", L, linkname="usr/bin/hard1", mode=0o755),
    m("tmp/.wh.never-existed"),
    m("new-dir/deep/er/file", data=b"deep"),
    m("xattr-file", data=b"y", pax=X("user.comment", "changed")),  # GNU format: xattr dropped
    m("usr/lib/libc.so", S, linkname="/usr/lib/libc.so.6"),
]
# hard4 links to a file of a lower layer, which containerd's overlay apply cannot do either:
# keep the layer applicable by everyone
LAYER2 = [e for e in LAYER2 if e["name"] != "usr/bin/hard4"]

LAYER3 = [
    m("new-dir/.wh..wh..opq"),
    m("new-dir/only", data=b"only"),
    m("etc/hostname", data=b"back again\n"),
    m("etc/.wh.file2dir"),
    m("keep/.wh.nothing"),
    m("dev/.wh.loop0"),
    m("run/initctl", data=b"fifo replaced by a file"),
    m("xattr-file2", data=b"z", pax={**X("user.k", "v"), **X("user.empty", "")}),
    m("usr/bin/ping", data=b"capable", mode=0o755, uid=0,
      pax=X("security.capability", CAP.decode("utf-8", "surrogateescape"))),
]


LAYER4 = [  # uncompressed, and a Docker media type
    m("etc/opaque/.wh..wh..opq"),
    m("etc/opaque/last", data=b"last"),
    m("usr/lib/libc.so.6", data=b"replaced under a symlink pointing at it", mode=0o755),
    m("lib/extra.so", data=b"through the lib -> usr/lib symlink"),
]


def layers():
    raw = [tar_of(LAYER1), tar_of(LAYER2, fmt=tarfile.GNU_FORMAT), tar_of(LAYER3), tar_of(LAYER4)]
    blobs = [("application/vnd.oci.image.layer.v1.tar+gzip", gzip.compress(raw[0], mtime=0)),
             ("application/vnd.oci.image.layer.v1.tar+gzip", gzip.compress(raw[1], mtime=0)),
             ("application/vnd.oci.image.layer.v1.tar+zstd", zstandard.ZstdCompressor().compress(raw[2])),
             ("application/vnd.docker.image.rootfs.diff.tar", raw[3])]
    return raw, blobs


def sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def oci_archive(path: Path, raw: list[bytes], blobs: list[tuple[str, bytes]]) -> None:
    store: dict[str, bytes] = {}

    def put(data: bytes) -> tuple[str, int]:
        store[sha(data)] = data
        return sha(data), len(data)

    arch = "amd64" if os.uname().machine == "x86_64" else "arm64"
    config = {"architecture": arch, "os": "linux", "config": {},
              "rootfs": {"type": "layers", "diff_ids": [sha(r) for r in raw]}}
    cd, cn = put(json.dumps(config).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cn},
                "layers": []}
    for mt, b in blobs:
        d, n = put(b)
        manifest["layers"].append({"mediaType": mt, "digest": d, "size": n})
    md, mn = put(json.dumps(manifest).encode())
    index = {"schemaVersion": 2, "manifests": [{"mediaType": manifest["mediaType"], "digest": md, "size": mn,
                                                 "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}
    with tarfile.open(path, "w") as t:
        for name, data in [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", json.dumps(index).encode()),
                           *[(f"blobs/sha256/{d[7:]}", b) for d, b in store.items()]]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))


# -- comparing trees --------------------------------------------------------------------------

def snapshot(root: str, dir_mtimes: bool = True) -> dict:
    out = {}
    inodes: dict[int, list[str]] = {}
    rootb = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(rootb):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.fsdecode(os.path.relpath(p, rootb))
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            content = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
                if st.st_nlink > 1:
                    inodes.setdefault(st.st_ino, []).append(rel)
            try:
                xattrs = {k: os.getxattr(p, k, follow_symlinks=False)
                          for k in os.listxattr(p, follow_symlinks=False)
                          if not k.startswith(("trusted.", "security.selinux"))}
            except OSError:
                xattrs = {}
            rdev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else None
            out[rel] = {"type": kind, "mode": oct(stat.S_IMODE(st.st_mode)), "uid": st.st_uid, "gid": st.st_gid,
                        "size": st.st_size if not stat.S_ISDIR(st.st_mode) else None, "content": content,
                        "xattrs": xattrs, "rdev": rdev,
                        "mtime": st.st_mtime_ns if (dir_mtimes or not stat.S_ISDIR(st.st_mode)) else None}
    for group in inodes.values():
        for rel in group:
            out[rel]["links"] = sorted(group)
    return out


def assert_same(ours: dict, theirs: dict, what: str) -> None:
    missing = sorted(set(theirs) - set(ours))
    extra = sorted(set(ours) - set(theirs))
    diffs = {p: {k: (ours[p].get(k), theirs[p].get(k)) for k in set(ours[p]) | set(theirs[p])
                 if ours[p].get(k) != theirs[p].get(k)}
             for p in sorted(set(ours) & set(theirs)) if ours[p] != theirs[p]}
    assert not (missing or extra or diffs), f"{what}: missing {missing}, extra {extra}, different {diffs}"


STARTED_NS = __import__("time").time_ns()


def normalize_dir_mtimes(ours: dict, theirs: dict, strict: bool = True) -> tuple[dict, dict]:
    """A directory that gained or lost entries after its layer (or that only exists as a parent)
    has the time of the unpack as mtime: containerd's is then recent, and ours must be too
    (`strict`; a plain directory keeps a lower mtime where overlay copies it up, so not there);
    any other directory must carry the exact mtime of its tar header on both sides."""
    ours, theirs = dict(ours), dict(theirs)
    for p, v in theirs.items():
        if v["type"] != stat.S_IFDIR or p not in ours or v["mtime"] is None or v["mtime"] < STARTED_NS:
            continue
        if strict:
            assert ours[p]["mtime"] >= STARTED_NS, f"{p}: mtime of containerd's is recent, ours is not"
        ours[p] = {**ours[p], "mtime": "recent"}
        theirs[p] = {**v, "mtime": "recent"}
    return ours, theirs


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image(tmp_path_factory):
    if os.geteuid() != 0 or CTR is None:
        pytest.skip("needs root and ctr")
    d = tmp_path_factory.mktemp("img")
    raw, blobs = layers()
    path = d / "image.tar"
    oci_archive(path, raw, blobs)
    return path, raw, blobs


def ctr(address, *args, ns="compat", check=True, timeout=120):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
    r = subprocess.run([CTR, "--address", address, "--namespace", ns, *args], capture_output=True, text=True,
                       env=env, timeout=timeout)
    if check:
        assert r.returncode == 0, f"ctr {' '.join(args)}: {r.stderr}"
    return r


def unpacked_by(kind: str, image_path: Path, snapshot_dir_mtimes: bool = True):
    """Import + unpack with a daemon of `kind`; the rootfs snapshot (or a skip reason)."""
    tmp = Path(tempfile.mkdtemp(prefix="rfs-", dir="/tmp"))
    address = None
    target = tmp / "mnt"
    target.mkdir()
    try:
        address = start_server(kind, tmp)
        r = ctr(address, "images", "import", "--snapshotter", "overlayfs", "--base-name", "compat/img",
                str(image_path), check=False, timeout=300)
        if r.returncode != 0:
            return None, f"{kind} could not import: {r.stderr.strip()[-500:]}"
        r = ctr(address, "images", "mount", "--snapshotter", "overlayfs", "compat/img:latest", str(target), check=False)
        if r.returncode != 0:
            return None, f"{kind} could not mount the image: {r.stderr.strip()[-500:]}"
        try:
            return snapshot(str(target), snapshot_dir_mtimes), None
        finally:
            ctr(address, "images", "unmount", "--rm", str(target), check=False)
    finally:
        mountmod.unmount_recursive(str(target), lazy=True)
        if address is not None:
            stop_server(address)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def containerd_rootfs(image):
    snap, why = unpacked_by("containerd", image[0])
    if snap is None:
        pytest.fail(why)
    return snap


# -- tests ------------------------------------------------------------------------------------

def test_overlay_layers_match_containerd(image, containerd_rootfs, tmp_path):
    """Our differ's path: each layer into its own upperdir (overlay whiteouts, parents copied
    from the lowerdirs), the rootfs read through a read-only overlay mount of all of them."""
    _, raw, blobs = image
    uppers = []
    for i, (mt, blob) in enumerate(blobs):
        upper = tmp_path / f"layer{i}"
        upper.mkdir()
        res = archive.apply_layer(upper, blob, mt, expected_digest=sha(blob), overlay=i > 0,
                                  parents=[str(u) for u in reversed(uppers)])
        assert res.diff_id == sha(raw[i])
        uppers.append(upper)
    merged = tmp_path / "merged"
    merged.mkdir()
    lowers = ":".join(str(u) for u in reversed(uppers))
    mountmod.mount(Mount("overlay", "overlay", options=[f"lowerdir={lowers}"]), str(merged))
    try:
        ours = snapshot(str(merged))
    finally:
        mountmod.unmount(str(merged))
    old = [p for p, v in containerd_rootfs.items() if v["type"] == stat.S_IFDIR and v["mtime"] < STARTED_NS]
    assert old, "some directories are meant to keep the mtime of their header"
    assert_same(*normalize_dir_mtimes(ours, containerd_rootfs), "overlay apply")


def test_plain_directory_matches_containerd(image, containerd_rootfs, tmp_path):
    """All layers into one directory (what applying onto a temp mount does)."""
    _, raw, blobs = image
    root = tmp_path / "rootfs"
    root.mkdir()
    for mt, blob in blobs:
        archive.apply_layer(root, blob, mt)
    ours = snapshot(str(root))
    # One known difference, containerd's own: a layer writing through a symlink of a lower
    # layer (lib -> usr/lib, then lib/extra.so) follows it in a plain directory, but in an
    # overlay upperdir creates a real lib/ that hides the symlink (containerd's overlay apply,
    # and ours, do the latter; test_overlay_layers_match_containerd checks it).
    assert os.path.islink(root / "lib") and (root / "usr/lib/extra.so").is_file()
    theirs = dict(containerd_rootfs)
    assert theirs.pop("lib")["type"] == stat.S_IFDIR and "lib/extra.so" in theirs
    theirs.pop("lib/extra.so")
    ours.pop("lib")
    ours.pop("usr/lib/extra.so")
    assert_same(*normalize_dir_mtimes(ours, theirs, strict=False), "plain apply")


def test_our_daemon_matches_containerd(image, containerd_rootfs):
    """The stock ctr importing into our daemon (content, images, snapshots, diff end to end)."""
    snap, why = unpacked_by("pycontainerd", image[0])
    if snap is None:
        pytest.skip(why)
    assert_same(*normalize_dir_mtimes(snap, containerd_rootfs), "our daemon")
