"""core/archive.py, applying layers: every member type and attribute, whiteouts and opaque
directories, media types and compressions, confinement of every path inside the root, and the
errors of broken streams. Tars are built with Python's tarfile; files are real."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import struct
import subprocess
import tarfile
import tempfile
import zlib

import pytest
import zstandard

from pycontainerd.core import archive, errdefs
from pycontainerd.core.archive import ArchiveError

ROOT = os.geteuid() == 0
needs_root = [pytest.mark.root, pytest.mark.skipif(not ROOT, reason="needs root")]


# -- building tars -----------------------------------------------------------------------------

def member(name, kind=tarfile.REGTYPE, data=b"", *, mode=None, uid=0, gid=0, mtime=1_600_000_000,
           linkname="", devmajor=0, devminor=0, pax=None):
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode if mode is not None else (0o755 if kind == tarfile.DIRTYPE else 0o644)
    ti.uid, ti.gid, ti.mtime = uid, gid, mtime
    ti.linkname = linkname
    ti.devmajor, ti.devminor = devmajor, devminor
    if pax:
        ti.pax_headers = dict(pax)
    ti.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    return ti, data


def make_tar(*members, fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for ti, data in members:
            t.addfile(ti, io.BytesIO(data) if ti.size else None)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def sandbox():
    """A temp dir holding `root` (where layers go) and `outside` (must never change)."""
    d = tempfile.mkdtemp(prefix="archtest-", dir="/tmp")
    os.makedirs(os.path.join(d, "root"))
    os.makedirs(os.path.join(d, "outside"))
    with open(os.path.join(d, "outside", "passwd"), "w") as f:
        f.write("untouched\n")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def root(sandbox):
    return os.path.join(sandbox, "root")


def apply(root, raw: bytes, media_type=archive.MEDIA_TYPE_LAYER, **kw) -> archive.ApplyResult:
    return archive.apply_layer(root, raw, media_type, **kw)


def tree(root: str) -> dict:
    """path -> (kind, mode, uid, gid, size, content hash, link target, rdev, xattrs, mtime)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            content = link = None
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                link = os.readlink(p)
            xattrs = {}
            try:
                for k in os.listxattr(p, follow_symlinks=False):
                    xattrs[k] = os.getxattr(p, k, follow_symlinks=False)
            except OSError:
                pass
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                        st.st_size if not stat.S_ISDIR(st.st_mode) else 0, content, link,
                        st.st_rdev, xattrs, st.st_mtime_ns // 10**9)
    return out


def outside_untouched(sandbox):
    assert sorted(os.listdir(sandbox)) == ["outside", "root"]
    assert os.listdir(os.path.join(sandbox, "outside")) == ["passwd"]
    assert open(os.path.join(sandbox, "outside", "passwd")).read() == "untouched\n"


# -- member types and attributes ---------------------------------------------------------------

def test_files_dirs_modes_and_times(root):
    raw = make_tar(
        member("etc", tarfile.DIRTYPE, mode=0o750, mtime=1000),
        member("etc/conf", data=b"a=1\n", mode=0o640, mtime=2000),
        member("bin/su", data=b"x" * 5000, mode=0o4755),
        member("bin/sg", data=b"y", mode=0o2711),
        member("tmp/", tarfile.DIRTYPE, mode=0o1777, mtime=3000),
        member("tmp/later", data=b"", mtime=4000),
        member("legacy-dir/", tarfile.AREGTYPE),  # '\0' with a trailing slash is a directory
        member("empty", data=b""),
    )
    res = apply(root, raw)
    assert res.entries == 8 and res.diff_id == sha(raw) == res.digest
    assert res.uncompressed_size == len(raw) and res.compression == archive.UNCOMPRESSED
    st = os.lstat(f"{root}/etc")
    assert stat.S_IMODE(st.st_mode) == 0o750 and st.st_mtime == 1000
    assert open(f"{root}/etc/conf", "rb").read() == b"a=1\n"
    assert stat.S_IMODE(os.lstat(f"{root}/etc/conf").st_mode) == 0o640
    assert os.lstat(f"{root}/etc/conf").st_mtime == 2000
    assert stat.S_IMODE(os.lstat(f"{root}/bin/su").st_mode) == 0o4755
    assert stat.S_IMODE(os.lstat(f"{root}/bin/sg").st_mode) == 0o2711
    assert stat.S_IMODE(os.lstat(f"{root}/tmp").st_mode) == 0o1777
    assert os.lstat(f"{root}/tmp").st_mtime == 3000  # set after tmp/later was created in it
    assert stat.S_IMODE(os.lstat(f"{root}/bin").st_mode) == 0o755  # implicit parent
    assert stat.S_ISDIR(os.lstat(f"{root}/legacy-dir").st_mode)
    assert os.path.getsize(f"{root}/empty") == 0


def test_umask_does_not_apply(root):
    old = os.umask(0o077)
    try:
        apply(root, make_tar(member("d", tarfile.DIRTYPE, mode=0o775), member("d/f", data=b"1", mode=0o666),
                             member("p", tarfile.FIFOTYPE, mode=0o666), member("x/y/z", data=b"")))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(f"{root}/d").st_mode) == 0o775
    assert stat.S_IMODE(os.lstat(f"{root}/d/f").st_mode) == 0o666
    assert stat.S_IMODE(os.lstat(f"{root}/p").st_mode) == 0o666
    assert stat.S_IMODE(os.lstat(f"{root}/x/y").st_mode) == 0o755


def test_atime_is_the_later_of_atime_and_mtime(root):
    apply(root, make_tar(
        member("newer", data=b"1", mtime=1000, pax={"atime": "5000.5"}),
        member("older", data=b"1", mtime=1000, pax={"atime": "10"}),
        member("frac", data=b"1", pax={"mtime": "1234.123456789"}),
        member("negative", data=b"1", pax={"mtime": "-5"}),
    ))
    st = os.lstat(f"{root}/newer")
    assert st.st_mtime_ns == 1000 * 10**9 and st.st_atime_ns == 5000 * 10**9 + 500_000_000
    st = os.lstat(f"{root}/older")
    assert st.st_atime_ns == st.st_mtime_ns == 1000 * 10**9
    assert os.lstat(f"{root}/frac").st_mtime_ns == 1234_123456789
    assert os.lstat(f"{root}/negative").st_mtime_ns == 0  # before 1970: bound to 0


def test_symlinks_and_hardlinks(root):
    apply(root, make_tar(
        member("data/file", data=b"payload", mode=0o600, mtime=77),
        member("data/hard", tarfile.LNKTYPE, linkname="data/file", mode=0o600, mtime=77),
        member("abs", tarfile.SYMTYPE, linkname="/data/file", mtime=88),
        member("rel", tarfile.SYMTYPE, linkname="data/file"),
        member("dangling", tarfile.SYMTYPE, linkname="/nowhere"),
        member("hard-to-symlink", tarfile.LNKTYPE, linkname="abs", mtime=88),  # metadata of the inode
    ))
    a, b = os.lstat(f"{root}/data/file"), os.lstat(f"{root}/data/hard")
    assert (a.st_ino, a.st_nlink) == (b.st_ino, 2)
    assert os.readlink(f"{root}/abs") == "/data/file"
    assert os.lstat(f"{root}/abs").st_mtime == 88  # times set on the link itself
    assert os.readlink(f"{root}/dangling") == "/nowhere"
    # a hard link to a symlink links the symlink, never what it points to
    assert os.lstat(f"{root}/hard-to-symlink").st_ino == os.lstat(f"{root}/abs").st_ino
    assert stat.S_ISLNK(os.lstat(f"{root}/hard-to-symlink").st_mode)


@pytest.mark.root
@pytest.mark.skipif(not ROOT, reason="needs root")
def test_devices_fifos_owners(root):
    apply(root, make_tar(
        member("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
        member("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660, gid=6),
        member("fifo", tarfile.FIFOTYPE, mode=0o620, uid=1000, gid=1000),
        member("home/u", tarfile.DIRTYPE, uid=1000, gid=1001, mode=0o700),
        member("home/u/f", data=b"x", uid=1000, gid=1001, mode=0o4750),
        member("lnk", tarfile.SYMTYPE, linkname="home", uid=1234, gid=4321),
        member("big-ids", data=b"", uid=3_000_000, gid=4_000_000),  # PAX uid/gid
    ))
    st = os.lstat(f"{root}/dev/null")
    assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
    assert stat.S_IMODE(st.st_mode) == 0o666
    st = os.lstat(f"{root}/dev/sda")
    assert stat.S_ISBLK(st.st_mode) and os.minor(st.st_rdev) == 0 and os.major(st.st_rdev) == 8
    assert st.st_gid == 6
    st = os.lstat(f"{root}/fifo")
    assert stat.S_ISFIFO(st.st_mode) and (st.st_uid, st.st_gid) == (1000, 1000)
    st = os.lstat(f"{root}/home/u/f")
    assert (st.st_uid, st.st_gid) == (1000, 1001)
    assert stat.S_IMODE(st.st_mode) == 0o4750  # chmod after chown keeps setuid
    st = os.lstat(f"{root}/lnk")
    assert (st.st_uid, st.st_gid) == (1234, 4321)
    st = os.lstat(f"{root}/big-ids")
    assert (st.st_uid, st.st_gid) == (3_000_000, 4_000_000)


@pytest.mark.root
@pytest.mark.skipif(not ROOT, reason="needs root")
def test_setgid_parent_does_not_leak_its_group(root):
    apply(root, make_tar(member("shared", tarfile.DIRTYPE, mode=0o2775, gid=50),
                         member("shared/own", data=b"1", gid=0), member("shared/sub/f", data=b"2"),
                         member("shared/grp", data=b"3", gid=50)))
    assert os.lstat(f"{root}/shared/own").st_gid == 0
    assert os.lstat(f"{root}/shared/sub/f").st_gid == 0
    assert os.lstat(f"{root}/shared/grp").st_gid == 50
    apply(root, make_tar(member("shared", tarfile.DIRTYPE, mode=0o755), member("shared/later", data=b"4")))
    assert os.lstat(f"{root}/shared/later").st_gid == 0


def test_xattrs(root):
    cap = b"\x01\x00\x00\x02\x00\x20\x00\x00" + bytes(12)
    pax = {"SCHILY.xattr.user.k": "v", "SCHILY.xattr.user.bin": b"\x00\xff\x01".decode("utf-8", "surrogateescape")}
    members = [
        member("f", data=b"1", pax=pax),
        member("d", tarfile.DIRTYPE, pax={"SCHILY.xattr.user.dir": "yes"}),
        member("s", tarfile.SYMTYPE, linkname="f", pax={"SCHILY.xattr.user.k": "v"}),  # EPERM: ignored
        member("t", data=b"1", pax={"SCHILY.xattr.trusted.overlay.opaque": "y"}),  # never set
    ]
    if ROOT:
        members.append(member("c", data=b"1", uid=5, pax={"SCHILY.xattr.security.capability":
                                                         cap.decode("utf-8", "surrogateescape")}))
    apply(root, make_tar(*members))
    assert os.getxattr(f"{root}/f", "user.k") == b"v"
    assert os.getxattr(f"{root}/f", "user.bin") == b"\x00\xff\x01"
    assert os.getxattr(f"{root}/d", "user.dir") == b"yes"
    assert os.listxattr(f"{root}/s", follow_symlinks=False) == []
    if ROOT:
        assert "trusted.overlay.opaque" not in os.listxattr(f"{root}/t")
        # set after chown (which would clear it)
        assert os.getxattr(f"{root}/c", "security.capability") == cap
        assert os.lstat(f"{root}/c").st_uid == 5


def test_replacing_entries(root):
    apply(root, make_tar(
        member("a", tarfile.DIRTYPE, mode=0o700),
        member("a/old", data=b"old"),
        member("b", data=b"file"),
        member("c", tarfile.SYMTYPE, linkname="/etc"),
        member("hl1", data=b"shared"),
        member("hl2", tarfile.LNKTYPE, linkname="hl1"),
    ))
    apply(root, make_tar(
        member("a", tarfile.DIRTYPE, mode=0o755),  # merged: metadata only
        member("a/new", data=b"new"),
        member("b", tarfile.DIRTYPE),  # file -> dir
        member("c", data=b"now a file"),  # symlink replaced, not followed
        member("hl2", data=b"replaced"),  # breaks the link instead of writing through it
    ))
    assert sorted(os.listdir(f"{root}/a")) == ["new", "old"]
    assert stat.S_IMODE(os.lstat(f"{root}/a").st_mode) == 0o755
    assert stat.S_ISDIR(os.lstat(f"{root}/b").st_mode)
    assert open(f"{root}/c", "rb").read() == b"now a file"
    assert open(f"{root}/hl1", "rb").read() == b"shared"
    apply(root, make_tar(member("a", data=b"dir -> file")))
    assert open(f"{root}/a", "rb").read() == b"dir -> file"


# -- whiteouts ---------------------------------------------------------------------------------

LOWER_MEMBERS = [
    member("keep", data=b"k"),
    member("gone", data=b"g"),
    member("dir/sub/deep", data=b"d"),
    member("dir/file", data=b"f"),
    member("opq/lower1", data=b"1"),
    member("opq/sub/lower2", data=b"2"),
    member("opq2/lower", data=b"3"),
    member("link", tarfile.SYMTYPE, linkname="keep"),
]
LOWER = make_tar(*LOWER_MEMBERS)


def test_whiteouts(root):
    apply(root, LOWER)
    apply(root, make_tar(
        member(".wh.gone"),
        member(".wh.dir"),  # a whole tree
        member(".wh.link"),
        member(".wh.never-existed"),
        member("opq/new", data=b"n"),
        member("opq/.wh..wh..opq"),  # after this layer's own entry: that one stays
        member("opq2/.wh..wh..opq"),  # before
        member("opq2/mine", data=b"m"),
        member("fresh/.wh..wh..opq"),  # an opaque marker in a directory that is new
    ))
    assert sorted(os.listdir(root)) == ["fresh", "keep", "opq", "opq2"]
    assert os.listdir(f"{root}/opq") == ["new"]
    assert os.listdir(f"{root}/opq2") == ["mine"]
    assert os.listdir(f"{root}/fresh") == []


def test_opaque_clears_lower_contents_of_merged_subdirs(root):
    apply(root, LOWER)
    apply(root, make_tar(member("opq/.wh..wh..opq"), member("opq/sub/", tarfile.DIRTYPE),
                         member("opq/sub/mine", data=b"1")))
    assert os.listdir(f"{root}/opq") == ["sub"]
    assert os.listdir(f"{root}/opq/sub") == ["mine"]  # lower2 was below the opaque dir too


@pytest.mark.parametrize("name", [".wh..", ".wh.", "dir/.wh.."])
def test_invalid_whiteouts(root, name):
    with pytest.raises(ArchiveError, match="invalid whiteout name"):
        apply(root, make_tar(member(name)))


def test_whiteout_meta_prefix_removes_the_dotted_name(root):
    apply(root, make_tar(member(".wh.plnk", data=b"x"), member(".wh..wh.plnk")))
    assert os.listdir(root) == []


# -- confinement -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../x", "../../../x", "/x", "//x", "a/../../x", "./../x", "a/b/../../../x"])
def test_dotdot_and_absolute_names_stay_inside(sandbox, root, name):
    apply(root, make_tar(member(name, data=b"1")))
    outside_untouched(sandbox)
    assert open(f"{root}/x", "rb").read() == b"1"


def test_symlink_to_outside_then_file_through_it(sandbox, root):
    out = os.path.join(sandbox, "outside")
    apply(root, make_tar(
        member("a", tarfile.SYMTYPE, linkname=out),  # absolute: means <root>/<out>
        member("a/passwd", data=b"owned"),
        member("e", tarfile.SYMTYPE, linkname="/etc"),  # means <root>/etc
        member("e/passwd", data=b"owned"),
        member("up", tarfile.SYMTYPE, linkname="../../../.."),
        member("up/x", data=b"owned"),
        member("mid", tarfile.SYMTYPE, linkname="sub/../../../../outside"),  # '..' inside a target
        member("mid/passwd", data=b"owned"),
    ))
    outside_untouched(sandbox)
    assert open(f"{root}{out}/passwd", "rb").read() == b"owned"
    assert open(f"{root}/etc/passwd", "rb").read() == b"owned"
    assert open(f"{root}/x", "rb").read() == b"owned"
    assert open(f"{root}/outside/passwd", "rb").read() == b"owned"
    with open("/etc/passwd", "rb") as f:
        assert b"owned" not in f.read(5)


def test_self_referencing_symlink_is_a_loop(root):
    # `etc -> /etc` inside a root points at itself: containerd's RootPath gives "too many links"
    with pytest.raises(ArchiveError, match="too many links"):
        apply(root, make_tar(member("etc", tarfile.SYMTYPE, linkname="/etc"), member("etc/passwd", data=b"x")))


def test_symlink_chains(sandbox, root):
    apply(root, make_tar(
        member("l1", tarfile.SYMTYPE, linkname="l2/deeper"),
        member("l2", tarfile.SYMTYPE, linkname="/l3"),
        member("l3", tarfile.SYMTYPE, linkname="../../" + os.path.join(sandbox, "outside").lstrip("/")),
        member("l1/file", data=b"1"),
    ))
    outside_untouched(sandbox)
    rel = os.path.join(sandbox, "outside").lstrip("/")
    assert open(os.path.join(root, rel, "deeper", "file"), "rb").read() == b"1"


def test_symlink_loop_is_an_error(sandbox, root):
    with pytest.raises(ArchiveError, match="too many links"):
        apply(root, make_tar(member("a", tarfile.SYMTYPE, linkname="b"),
                             member("b", tarfile.SYMTYPE, linkname="a"), member("a/x", data=b"1")))
    outside_untouched(sandbox)


def test_hardlinks_to_outside_stay_inside(sandbox, root):
    out = os.path.join(sandbox, "outside", "passwd")
    apply(root, make_tar(member("etc/passwd", data=b"inner"),
                         member(out.lstrip("/"), data=b"inner2")))
    apply(root, make_tar(
        member("h1", tarfile.LNKTYPE, linkname="../../../../etc/passwd"),
        member("h2", tarfile.LNKTYPE, linkname="/etc/passwd"),
        member("h3", tarfile.LNKTYPE, linkname=out),
        member("via", tarfile.SYMTYPE, linkname="/etc"),
        member("h4", tarfile.LNKTYPE, linkname="via/passwd"),
    ))
    inner = os.lstat(f"{root}/etc/passwd").st_ino
    assert {os.lstat(f"{root}/{h}").st_ino for h in ("h1", "h2", "h4")} == {inner}
    assert os.lstat(f"{root}/h3").st_ino == os.lstat(f"{root}{out}").st_ino
    assert os.lstat(out).st_nlink == 1
    outside_untouched(sandbox)


def test_hardlink_to_missing_target_fails(root):
    with pytest.raises(errdefs.ContainerdError, match="h"):
        apply(root, make_tar(member("h", tarfile.LNKTYPE, linkname="missing")))


def test_whiteouts_and_opaque_through_symlinks_stay_inside(sandbox, root):
    out = os.path.join(sandbox, "outside")
    apply(root, make_tar(member("d", tarfile.SYMTYPE, linkname=out),
                         member("d/.wh.passwd"), member("e", tarfile.SYMTYPE, linkname="../outside"),
                         member("e/.wh..wh..opq")))
    outside_untouched(sandbox)


def test_root_entries_are_ignored(root):
    os.chmod(root, 0o700)
    res = apply(root, make_tar(member(".", tarfile.DIRTYPE, mode=0o777), member("./", tarfile.DIRTYPE, mode=0o777),
                               member("..", tarfile.DIRTYPE, mode=0o777), member("/", tarfile.DIRTYPE, mode=0o777)))
    assert res.entries == 4
    assert stat.S_IMODE(os.lstat(root).st_mode) == 0o700


# -- formats and media types -------------------------------------------------------------------

def test_gnu_long_names_and_base256(root):
    long_dir = "d" * 120
    raw = make_tar(member(f"{long_dir}/{'f' * 150}", data=b"1"),
                   member("sl", tarfile.SYMTYPE, linkname="/" + "t" * 200),
                   member("bigmtime", data=b"", mtime=8**11 + 5),  # base-256 in GNU format
                   fmt=tarfile.GNU_FORMAT)
    apply(root, raw)
    assert open(f"{root}/{long_dir}/{'f' * 150}", "rb").read() == b"1"
    assert os.readlink(f"{root}/sl") == "/" + "t" * 200
    assert os.lstat(f"{root}/bigmtime").st_mtime == 8**11 + 5


def test_ustar_prefix_and_pax_paths(root):
    deep = "/".join(["abcdefghij"] * 14) + "/file"  # > 100: USTAR splits it into prefix/name
    raw = make_tar(member(deep, data=b"u"), fmt=tarfile.USTAR_FORMAT)
    apply(root, raw)
    assert open(f"{root}/{deep}", "rb").read() == b"u"
    apply(root, make_tar(member("ünïcödé/" + "x" * 200, data=b"p")))
    assert open(f"{root}/ünïcödé/{'x' * 200}", "rb").read() == b"p"


def test_non_utf8_names(root):
    ti, _ = member("placeholder", data=b"")
    raw = bytearray(make_tar((ti, b"")))
    raw[0:11] = b"caf\xe9-\xff.txt"
    struct.pack_into("8s", raw, 148, b" " * 8)
    raw[148:155] = b"%06o\0" % sum(raw[:512])
    apply(root, bytes(raw))
    assert os.listdir(os.fsencode(root)) == [b"caf\xe9-\xff.txt"]


def compressors():
    return {
        "gzip": lambda raw: gzip.compress(raw, mtime=0),
        "zstd": lambda raw: zstandard.ZstdCompressor().compress(raw),
        "none": lambda raw: raw,
    }


@pytest.mark.parametrize("media_type,comp", [
    (archive.MEDIA_TYPE_LAYER, "none"),
    (archive.MEDIA_TYPE_LAYER_GZIP, "gzip"),
    (archive.MEDIA_TYPE_LAYER_ZSTD, "zstd"),
    (archive.MEDIA_TYPE_LAYER_NONDISTRIBUTABLE + "+gzip", "gzip"),
    (archive.MEDIA_TYPE_DOCKER_LAYER, "none"),
    (archive.MEDIA_TYPE_DOCKER_LAYER, "gzip"),  # Docker's plain type, compressed all the same
    (archive.MEDIA_TYPE_DOCKER_LAYER_GZIP, "gzip"),
    (archive.MEDIA_TYPE_DOCKER_LAYER_FOREIGN_GZIP, "gzip"),
    (archive.MEDIA_TYPE_LAYER_GZIP, "zstd"),  # detected by magic, as containerd does
    (None, "zstd"),
])
def test_media_types(root, media_type, comp):
    raw = make_tar(member("f", data=os.urandom(3000)), member("d/g", data=b"x" * 100_000))
    blob = compressors()[comp](raw)
    res = archive.apply_layer(root, blob, media_type, expected_digest=sha(blob), expected_size=len(blob))
    assert res.diff_id == sha(raw) and res.digest == sha(blob) and res.size == len(blob)
    assert res.compression == {"none": "", "gzip": "gzip", "zstd": "zstd"}[comp]
    assert os.path.getsize(f"{root}/d/g") == 100_000


def test_plain_oci_type_is_not_decompressed(root):
    with pytest.raises(ArchiveError):
        apply(root, gzip.compress(make_tar(member("f", data=b"1"))), archive.MEDIA_TYPE_LAYER)


def test_unknown_media_type(root):
    with pytest.raises(errdefs.Unimplemented, match="unrecognised mediatype application/json"):
        apply(root, b"", "application/json")


@pytest.mark.parametrize("use_pigz", [False, None])
def test_gzip_paths_multimember_and_big_files(root, use_pigz):
    if use_pigz is None and not shutil.which("unpigz"):
        pytest.skip("unpigz not installed")
    big = os.urandom(3 << 20) + b"\0" * (5 << 20)
    raw = make_tar(member("big", data=big), *[member(f"small/{i}", data=b"%d" % i) for i in range(300)])
    half = len(raw) // 2
    blob = gzip.compress(raw[:half], mtime=0) + gzip.compress(raw[half:], mtime=0)  # two members
    res = apply(root, blob, archive.MEDIA_TYPE_LAYER_GZIP, use_pigz=use_pigz)
    assert res.diff_id == sha(raw)
    assert hashlib.sha256(open(f"{root}/big", "rb").read()).digest() == hashlib.sha256(big).digest()
    assert len(os.listdir(f"{root}/small")) == 300


def test_trailing_data_counts_in_diff_id(root):
    raw = make_tar(member("f", data=b"1")) + b"\0" * 10240 + b"junk after the end"
    res = apply(root, gzip.compress(raw), archive.MEDIA_TYPE_LAYER_GZIP)
    assert res.diff_id == sha(raw) and res.uncompressed_size == len(raw)


def test_empty_and_endless_streams(root):
    assert apply(root, b"").entries == 0
    assert apply(root, make_tar(member("f", data=b"1"))[:1024]).entries == 1  # no end blocks


# -- broken streams ----------------------------------------------------------------------------

@pytest.mark.parametrize("use_pigz", [False, None])
def test_truncated_gzip(root, use_pigz):
    if use_pigz is None and not shutil.which("unpigz"):
        pytest.skip("unpigz not installed")
    blob = gzip.compress(make_tar(member("f", data=os.urandom(200_000))))
    for cut in (len(blob) - 4, len(blob) // 2, 11):
        with pytest.raises(ArchiveError, match="gzip"):
            apply(root, blob[:cut], archive.MEDIA_TYPE_LAYER_GZIP, use_pigz=use_pigz)


def test_corrupt_gzip(root):
    blob = bytearray(gzip.compress(make_tar(member("f", data=b"abc" * 10000))))
    blob[30:40] = b"\xff" * 10
    with pytest.raises(ArchiveError):
        apply(root, bytes(blob), archive.MEDIA_TYPE_LAYER_GZIP, use_pigz=False)
    with pytest.raises(ArchiveError):
        apply(root, bytes(blob), archive.MEDIA_TYPE_LAYER_GZIP)


def test_truncated_zstd(root):
    blob = zstandard.ZstdCompressor().compress(make_tar(member("f", data=os.urandom(100_000))))
    with pytest.raises(ArchiveError, match="zstd"):
        apply(root, blob[:-10], archive.MEDIA_TYPE_LAYER_ZSTD)
    with pytest.raises(ArchiveError, match="zstd"):
        apply(root, blob[:4] + b"\xff" * 50, archive.MEDIA_TYPE_LAYER_ZSTD)


def test_member_larger_than_archive(root):
    raw = make_tar(member("f", data=b"x" * 10_000))
    for cut in (600, 512 + 10_000 - 1, 512 + 9_000):
        with pytest.raises(ArchiveError, match="larger than the archive"):
            apply(root, raw[:cut])
    with pytest.raises(ArchiveError, match="larger than the archive"):
        apply(root, gzip.compress(raw[:4000]), archive.MEDIA_TYPE_LAYER_GZIP)


def test_bad_headers(root):
    raw = bytearray(make_tar(member("f", data=b"1")))
    raw[0] ^= 0xFF
    with pytest.raises(ArchiveError, match="checksum"):
        apply(root, bytes(raw))
    with pytest.raises(ArchiveError, match="unexpected EOF in a header"):
        apply(root, make_tar(member("f", data=b"1"))[:100])
    with pytest.raises(ArchiveError, match="zero block followed by data"):
        apply(root, bytes(512) + make_tar(member("f", data=b"1")))
    with pytest.raises(ArchiveError):
        apply(root, b"this is not a tar archive at all" * 40)
    raw = bytearray(make_tar(member("f", data=b"1")))
    raw[124:136] = b"zzzzzzzzzzz\0"  # size field
    raw[148:156] = b" " * 8
    raw[148:155] = b"%06o\0" % sum(raw[:512])
    with pytest.raises(ArchiveError, match="bad number"):
        apply(root, bytes(raw))


def test_unsupported_member_types(root):
    ti, _ = member("cont")
    ti.type = tarfile.CONTTYPE
    with pytest.raises(ArchiveError, match="unhandled tar header type 55"):
        apply(root, make_tar((ti, b"")))
    sparse = make_tar(member("s", data=b"1", pax={"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}))
    with pytest.raises(ArchiveError, match="sparse"):
        apply(root, sparse)


def test_digest_and_size_mismatch(root):
    blob = gzip.compress(make_tar(member("f", data=b"1")))
    with pytest.raises(ArchiveError, match="digest mismatch"):
        apply(root, blob, archive.MEDIA_TYPE_LAYER_GZIP, expected_digest=sha(b"something else"))
    with pytest.raises(ArchiveError, match="size mismatch"):
        apply(root, blob, archive.MEDIA_TYPE_LAYER_GZIP, expected_size=len(blob) + 1)
    res = apply(root, blob, archive.MEDIA_TYPE_LAYER_GZIP,
                expected_digest="sha512:" + hashlib.sha512(blob).hexdigest())
    assert res.digest.startswith("sha512:")


def test_apply_error_stops_the_workers(root):
    import threading
    before = threading.active_count()
    blob = gzip.compress(bytes(512) + make_tar(member("f", data=os.urandom(5 << 20))))
    for _ in range(3):
        with pytest.raises(ArchiveError):
            apply(root, blob, archive.MEDIA_TYPE_LAYER_GZIP)
    assert threading.active_count() == before


def test_root_path():
    d = tempfile.mkdtemp()
    try:
        os.makedirs(f"{d}/usr/lib")
        os.symlink("usr/lib", f"{d}/lib")
        os.symlink("/usr", f"{d}/abs")
        os.symlink("../../../", f"{d}/usr/lib/up")
        os.symlink("x/../lib", f"{d}/lex")  # lexical '..' in a target, before x is looked at
        rp = lambda p: archive.root_path(d, p).decode()
        assert rp("lib/x") == f"{d}/usr/lib/x"
        assert rp("abs/lib") == f"{d}/usr/lib"
        assert rp("usr/lib/up/etc") == f"{d}/etc"
        assert rp("../../etc") == f"{d}/etc"
        assert rp("") == d and rp("/") == d
        assert rp("lex/y") == f"{d}/lib/y".replace(f"{d}/lib", f"{d}/usr/lib")
        assert rp("missing/../lib") == f"{d}/usr/lib"
    finally:
        shutil.rmtree(d)


def test_clean():
    c = archive.clean
    assert c(b"") == b"." and c(b"./a/") == b"a" and c(b"//a//b/../c") == b"/a/c"
    assert c(b"../a") == b"../a" and c(b"/../a") == b"/a" and c(b"a/..") == b"."


# -- the file writer threads keep the order of effects ------------------------------------------

@pytest.mark.parametrize("workers", [0, 4])
def test_order_of_effects_within_a_layer(root, workers):
    many = [member(f"d/f{i}", data=b"%d" % i) for i in range(200)]
    archive.apply_layer(root, make_tar(
        member("a", data=b"file first"), member("a/", tarfile.DIRTYPE),  # file, then a dir there
        member("x", data=b"target"), member("y", tarfile.LNKTYPE, linkname="x"),  # link to a queued file
        *many, member(".wh.d"),  # queued files, then their directory whited out
        member("o/keep", data=b"k"), member("o/.wh..wh..opq"),  # this layer's own files stay
        member("r", data=b"1"), member("r", data=b"2"),  # the same path twice
        member("big", data=b"B" * (1 << 20)),  # past the threaded size: written inline
    ), workers=workers)
    assert stat.S_ISDIR(os.lstat(f"{root}/a").st_mode)
    assert os.lstat(f"{root}/y").st_ino == os.lstat(f"{root}/x").st_ino
    assert not os.path.exists(f"{root}/d")
    assert os.listdir(f"{root}/o") == ["keep"]
    assert open(f"{root}/r", "rb").read() == b"2"
    assert os.path.getsize(f"{root}/big") == 1 << 20


@pytest.mark.parametrize("workers", [0, 4])
def test_file_then_child_fails_like_containerd(root, workers):
    with pytest.raises(errdefs.ContainerdError, match="not a directory|exists"):
        archive.apply_layer(root, make_tar(member("a", data=b"f"), member("a/b", data=b"c")), workers=workers)


def test_threaded_replacement_of_existing_files(root):
    layer = make_tar(*[member(f"d{i % 7}/f{i}", data=os.urandom(i % 300), mode=0o600 + i % 8) for i in range(500)])
    files_only = lambda t: {k: v for k, v in t.items() if not stat.S_ISDIR(v[0])}  # noqa: E731
    archive.apply_layer(root, layer, workers=0)
    first = files_only(tree(root))
    archive.apply_layer(root, layer, workers=4)  # every file exists: all handed back and redone
    assert files_only(tree(root)) == first
    other = tempfile.mkdtemp(dir="/tmp")
    try:
        archive.apply_layer(other, layer, workers=4)
        assert files_only(tree(other)) == first
    finally:
        shutil.rmtree(other)


def test_worker_errors_surface_with_the_member_name(root):
    with pytest.raises(errdefs.Unknown, match="failed to extract 'd/" + "n" * 10):
        archive.apply_layer(root, make_tar(member("d/ok", data=b"1"), member("d/" + "n" * 300, data=b"1")))


@pytest.mark.parametrize("use_pigz", [False, None])
def test_blob_files_read_by_unpigz_directly(sandbox, root, use_pigz):
    raw = make_tar(member("f", data=os.urandom(3 << 20)), member("g", data=b"g"))
    blob = gzip.compress(raw)
    path = os.path.join(sandbox, "outside", "blob")
    with open(path, "wb") as f:
        f.write(blob)
    res = apply(root, path, archive.MEDIA_TYPE_LAYER_GZIP, expected_digest=sha(blob), use_pigz=use_pigz)
    assert (res.digest, res.size, res.diff_id) == (sha(blob), len(blob), sha(raw))
    with open(path, "rb") as f:  # an open file works the same
        assert apply(root, f, archive.MEDIA_TYPE_LAYER_GZIP, use_pigz=use_pigz).digest == sha(blob)
    with open(path, "wb") as f:
        f.write(blob[:-100])
    with pytest.raises(ArchiveError, match="gzip"):
        apply(root, path, archive.MEDIA_TYPE_LAYER_GZIP, use_pigz=use_pigz)
    with open(path, "wb") as f:
        f.write(blob)
    with pytest.raises(ArchiveError, match="digest mismatch"):
        apply(root, path, archive.MEDIA_TYPE_LAYER_GZIP, expected_digest=sha(b"x"), use_pigz=use_pigz)
    os.unlink(path)
