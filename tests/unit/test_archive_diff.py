"""core/archive.py, the other half: applying into an overlayfs upperdir (checked through a real
overlay mount), the continuity double walk, Go-compatible tar headers, and diff round trips
(apply layers, change the tree, write the diff, apply it onto a copy of the lower tree: equal)."""
from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile

import pytest

from pycontainerd.core import archive
from pycontainerd.core import mount as mountmod
from pycontainerd.core.mount import Mount

from .test_archive import LOWER, LOWER_MEMBERS, make_tar, member, sha, tree

ROOT = os.geteuid() == 0
root_only = pytest.mark.skipif(not ROOT, reason="needs root")


@pytest.fixture
def tmp():
    d = tempfile.mkdtemp(prefix="archdiff-", dir="/tmp")
    try:
        yield d
    finally:
        if ROOT:
            mountmod.unmount_recursive(d, lazy=True)
        shutil.rmtree(d, ignore_errors=True)


def dirs(tmp, *names):
    out = []
    for n in names:
        p = os.path.join(tmp, n)
        os.makedirs(p, exist_ok=True)
        out.append(p)
    return out


def strip_times_of_dirs(t: dict) -> dict:
    """Directory mtimes change whenever something inside changes; compare everything else."""
    return {k: (v[:-1] + (None,) if stat.S_ISDIR(v[0]) else v) for k, v in t.items()}


# -- overlay upperdir ---------------------------------------------------------------------------

UPPER = make_tar(
    member(".wh.gone"),
    member(".wh.dir"),
    member("opq/new", data=b"n"),
    member("opq/.wh..wh..opq"),
    member("opq2/.wh..wh..opq"),
    member("opq2/mine", data=b"m"),
    member("keep", data=b"changed"),
    member("deep/implicit/file", data=b"i"),  # parents that exist below: attributes copied
)


@pytest.mark.root
@root_only
def test_overlay_upperdir_form_and_merged_view(tmp):
    lower, upper, work, merged, plain = dirs(tmp, "lower", "upper", "work", "merged", "plain")
    base = make_tar(
        member("deep", tarfile.DIRTYPE, mode=0o711, uid=7, gid=8, mtime=12345,
               pax={"SCHILY.xattr.user.mark": "lowerdir"}),
        member("deep/implicit", tarfile.DIRTYPE, mode=0o750, uid=9, gid=9, mtime=23456),
        *LOWER_MEMBERS)
    archive.apply_layer(lower, base)
    archive.apply_layer(upper, UPPER, overlay=True, parents=[lower])
    # overlay's own form in the upperdir
    st = os.lstat(f"{upper}/gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and stat.S_IMODE(st.st_mode) == 0
    assert stat.S_ISCHR(os.lstat(f"{upper}/dir").st_mode)
    assert os.getxattr(f"{upper}/opq", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(f"{upper}/opq2", "trusted.overlay.opaque") == b"y"
    assert not any(n.startswith(".wh.") for n in os.listdir(upper))
    assert os.listdir(f"{upper}/opq") == ["new"]  # nothing of the lower was touched
    # implicit parents took the lower directories' attributes (and user xattrs)
    st = os.lstat(f"{upper}/deep")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o711, 7, 8)
    assert os.getxattr(f"{upper}/deep", "user.mark") == b"lowerdir"
    st = os.lstat(f"{upper}/deep/implicit")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 9, 9)
    # the merged view equals both layers applied to one plain directory
    mountmod.mount(Mount("overlay", "overlay", options=[f"lowerdir={lower}", f"upperdir={upper}",
                                                        f"workdir={work}"]), merged)
    try:
        archive.apply_layer(plain, base)
        archive.apply_layer(plain, UPPER)
        got, want = strip_times_of_dirs(tree(merged)), strip_times_of_dirs(tree(plain))
        for t in (got, want):
            for k in list(t):
                t[k] = t[k][:8] + ({x: v for x, v in t[k][8].items() if not x.startswith("trusted.")},) + t[k][9:]
        assert got == want
        assert sorted(os.listdir(merged)) == ["deep", "keep", "link", "opq", "opq2"]
        assert os.listdir(f"{merged}/opq") == ["new"]
    finally:
        mountmod.unmount(merged)


@pytest.mark.root
@root_only
def test_overlay_whiteout_owner(tmp):
    (upper,) = dirs(tmp, "upper")
    archive.apply_layer(upper, make_tar(member("a/.wh.x", uid=1000, gid=1001)), overlay=True)
    st = os.lstat(f"{upper}/a/x")
    assert stat.S_ISCHR(st.st_mode) and (st.st_uid, st.st_gid) == (1000, 1001)


# -- the double walk ----------------------------------------------------------------------------

def test_changes_kinds_and_order(tmp):
    lower, upper = dirs(tmp, "lower", "upper")
    for d in (lower, upper):
        os.makedirs(f"{d}/a/b")
        os.makedirs(f"{d}/gone/sub")
        for name in ("a/b/same", "a/b/changed", "keep", "a.txt"):
            with open(f"{d}/{name}", "w") as f:
                f.write("same")
        os.utime(f"{d}/a/b/same", (100, 100))
        os.utime(f"{d}/keep", (100, 100))
        os.utime(f"{d}/a.txt", (100, 100))
    with open(f"{lower}/gone/sub/x", "w"):
        pass
    shutil.rmtree(f"{upper}/gone")
    with open(f"{upper}/a/b/changed", "w") as f:
        f.write("diff")
    os.utime(f"{lower}/a/b/changed", (100, 100))
    os.utime(f"{upper}/a/b/changed", (100, 100))  # same size and time: contents decide
    os.makedirs(f"{upper}/a0")
    os.link(f"{upper}/keep", f"{upper}/keep2")
    got = [(k, p.decode()) for k, p, _ in archive.changes(lower, upper)]
    assert got == [
        ("modify", "/a/b/changed"),
        ("add", "/a0"),
        ("delete", "/gone"),  # once, not its contents
        ("unmodified", "/keep"),  # hard-linked: reported so the link can be kept
        ("add", "/keep2"),
    ]
    assert [(k, p.decode()) for k, p, _ in archive.changes(None, lower)][:3] == [
        ("add", "/a"), ("add", "/a/b"), ("add", "/a/b/changed")]


def test_changes_type_changes(tmp):
    lower, upper = dirs(tmp, "lower", "upper")
    os.makedirs(f"{lower}/dir2file/child")
    open(f"{lower}/file2dir", "w").close()
    open(f"{upper}/dir2file", "w").close()
    os.makedirs(f"{upper}/file2dir/child")
    got = [(k, p.decode()) for k, p, _ in archive.changes(lower, upper)]
    assert got == [("modify", "/dir2file"), ("modify", "/file2dir"), ("add", "/file2dir/child")]


# -- headers ------------------------------------------------------------------------------------

def test_headers_match_go_layout():
    # USTAR for a device: byte-identical to Python's USTAR writer (which, like Go, writes devs)
    ti = tarfile.TarInfo("dev/null")
    ti.type, ti.mode, ti.devmajor, ti.devminor, ti.mtime = tarfile.CHRTYPE, 0o666, 1, 3, 1700000000
    assert archive.tar_header(b"dev/null", b"3", mode=0o666, mtime=1700000000, devmajor=1, devminor=3) == \
        ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
    # Go writes the device fields of every header as octal zeros
    h = archive.tar_header(b"f", b"0", mode=0o644, size=3, mtime=5)
    assert h[329:337] == b"0000000\0" and h[337:345] == b"0000000\0"
    assert h[257:265] == b"ustar\x0000" and h[148:156].endswith(b"\0 ")
    # long names split into prefix/name when possible, else a PAX header named like Go's
    deep = b"/".join([b"abcdefghij"] * 14) + b"/file"
    h = archive.tar_header(deep, b"0")
    assert len(h) == 512 and h[345:500].rstrip(b"\0") == deep.rsplit(b"/", 1)[0]
    h = archive.tar_header(b"dir/" + b"x" * 120, b"0", size=1)
    assert len(h) == 1536 and h[156:157] == b"x" and h[:24] == b"dir/PaxHeaders.0/xxxxxxx"
    m = tarfile.open(fileobj=io.BytesIO(h + bytes(512) + bytes(1024))).getmembers()[0]
    assert m.name == "dir/" + "x" * 120 and m.size == 1
    h = archive.tar_header("ü".encode(), b"0")
    assert h[156:157] == b"x" and tarfile.open(fileobj=io.BytesIO(h + bytes(1024))).getnames() == ["ü"]
    # big ids and a capability go to PAX records
    h = archive.tar_header(b"f", b"0", uid=3_000_000, pax_records={b"SCHILY.xattr.security.capability": b"\x01\xff"})
    m = tarfile.open(fileobj=io.BytesIO(h + bytes(1024))).getmembers()[0]
    assert m.uid == 3_000_000 and m.pax_headers["uid"] == "3000000"
    assert b"SCHILY.xattr.security.capability=\x01\xff\n" in h


# -- diff round trips ---------------------------------------------------------------------------

def round_trip(tmp, lower, upper, *, use_pigz=None, compression=archive.GZIP):
    out = io.BytesIO()
    res = archive.write_layer(lower, upper, out.write, compression, use_pigz=use_pigz)
    blob = out.getvalue()
    assert res.digest == sha(blob) and res.size == len(blob)
    copy = os.path.join(tmp, "copy")
    shutil.rmtree(copy, ignore_errors=True)
    subprocess.run(["cp", "-a", f"{lower}/.", copy + "/"] if os.path.exists(copy) else
                   ["cp", "-a", lower, copy], check=True)
    media = archive.MEDIA_TYPE_LAYER_GZIP if compression == archive.GZIP else archive.MEDIA_TYPE_LAYER
    applied = archive.apply_layer(copy, blob, media)
    assert applied.diff_id == res.diff_id
    return copy, blob


def seconds_only(t: dict) -> dict:
    return t  # tree() already keeps whole seconds of mtimes


@pytest.mark.parametrize("use_pigz", [False, None])
def test_round_trip(tmp, use_pigz):
    if use_pigz is None and not shutil.which("pigz"):
        pytest.skip("pigz not installed")
    lower = os.path.join(tmp, "lower")
    os.makedirs(lower)
    archive.apply_layer(lower, LOWER)
    archive.apply_layer(lower, make_tar(
        member("hl/a", data=b"linked"), member("hl/b", tarfile.LNKTYPE, linkname="hl/a"),
        member("mod/f", data=b"mode", mode=0o644), member("f2d", data=b"file"),
        member("d2f/x", data=b"x"), member("sock-free/p", tarfile.FIFOTYPE),
    ))
    upper = os.path.join(tmp, "upper")
    subprocess.run(["cp", "-a", lower, upper], check=True)
    with open(f"{upper}/keep", "wb") as f:
        f.write(b"new contents")
    os.unlink(f"{upper}/gone")
    shutil.rmtree(f"{upper}/dir")
    shutil.rmtree(f"{upper}/opq/sub")
    os.chmod(f"{upper}/mod/f", 0o4711)
    os.unlink(f"{upper}/f2d")
    os.makedirs(f"{upper}/f2d/inner")
    shutil.rmtree(f"{upper}/d2f")
    with open(f"{upper}/d2f", "w") as f:
        f.write("now a file")
    os.symlink("../keep", f"{upper}/opq/newlink")
    os.link(f"{upper}/hl/a", f"{upper}/hl/c")  # a third link to an unmodified file
    os.makedirs(f"{upper}/brand/new/tree")
    with open(f"{upper}/brand/new/tree/big", "wb") as f:
        f.write(os.urandom(3 << 20))
    os.mkfifo(f"{upper}/fifo2")
    if ROOT:
        os.chown(f"{upper}/keep", 1000, 1000)
        os.mknod(f"{upper}/brand/dev", stat.S_IFCHR | 0o600, os.makedev(4, 5))
        os.setxattr(f"{upper}/brand/new/tree/big", "security.capability",
                    b"\x01\x00\x00\x02\x00\x20\x00\x00" + bytes(12))
    copy, blob = round_trip(tmp, lower, upper, use_pigz=use_pigz)
    assert strip_times_of_dirs(tree(copy)) == strip_times_of_dirs(tree(upper))
    a, c = os.lstat(f"{copy}/hl/a"), os.lstat(f"{copy}/hl/c")
    assert a.st_ino == c.st_ino == os.lstat(f"{copy}/hl/b").st_ino
    names = tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz").getnames()
    assert ".wh.gone" in names and ".wh.dir" in names and "opq/.wh.sub" in names
    assert not any(n.startswith("dir/") for n in names)  # a deleted tree is one whiteout


def test_round_trip_uncompressed_and_empty(tmp):
    lower, upper = dirs(tmp, "lower", "upper")
    copy, blob = round_trip(tmp, lower, upper, compression=archive.UNCOMPRESSED)
    assert blob == bytes(1024)  # nothing changed: just the end of the archive
    with open(f"{upper}/f", "w") as f:
        f.write("x")
    copy, blob = round_trip(tmp, lower, upper, compression=archive.UNCOMPRESSED)
    assert tree(copy) == tree(upper) or strip_times_of_dirs(tree(copy)) == strip_times_of_dirs(tree(upper))


def test_diff_headers_are_deterministic(tmp):
    lower, upper = dirs(tmp, "lower", "upper")
    with open(f"{lower}/gone", "w"):
        pass
    os.makedirs(f"{upper}/d")
    with open(f"{upper}/d/f", "w") as f:
        f.write("abc")
    os.utime(f"{upper}/d/f", ns=(5_000_000_000, 1_700_000_000_987_654_321))
    os.utime(f"{upper}/d", (1000, 1000))
    outs = []
    for _ in range(2):
        buf = io.BytesIO()
        archive.write_layer(lower, upper, buf.write, archive.UNCOMPRESSED, whiteout_time_ns=1_700_000_000_600_000_000)
        outs.append(buf.getvalue())
    assert outs[0] == outs[1]
    t = tarfile.open(fileobj=io.BytesIO(outs[0]))
    by = {m.name: m for m in t.getmembers()}
    assert list(by) == ["d", "d/f", ".wh.gone"]
    assert by["d/f"].mtime == 1_700_000_000  # truncated to seconds, no PAX time records
    assert by[".wh.gone"].mtime == 1_700_000_001 and by[".wh.gone"].mode == 0  # rounded, as Go does
    assert by["d"].uname == "" and by["d"].pax_headers == {}
    assert outs[0][:100].rstrip(b"\0") == b"d/"
