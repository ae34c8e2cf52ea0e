"""core/mount.py: option parsing, lowerdir compaction and overlay helpers (no root), and real
mounts (root): bind rw/ro, overlay, long overlay options, stacked and nested unmounts,
temp_mount cleanup, mountinfo escapes."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from pycontainerd.core import mount as m
from pycontainerd.core.mount import Mount, MountError


@pytest.fixture
def tmp():
    d = tempfile.mkdtemp(prefix="mnttest-", dir="/tmp")
    try:
        yield d
    finally:
        if os.geteuid() == 0:
            m.unmount_recursive(d, lazy=True)
        shutil.rmtree(d, ignore_errors=True)


def test_parse_options():
    assert m.parse_options(["rw", "rbind"]) == (m.MS_BIND | m.MS_REC, "", False)
    assert m.parse_options(["ro", "rbind"]) == (m.MS_RDONLY | m.MS_BIND | m.MS_REC, "", False)
    flags, data, loop = m.parse_options(["index=off", "nosuid", "workdir=/w", "upperdir=/u", "lowerdir=/l", "ro", "rw"])
    assert flags == m.MS_NOSUID and data == "index=off,workdir=/w,upperdir=/u,lowerdir=/l" and not loop
    assert m.parse_options(["defaults", "loop"]) == (0, "", True)
    assert m.parse_options(["rprivate"])[0] == m.MS_PRIVATE | m.MS_REC


def test_compact_lowerdirs():
    dirs = [f"/var/lib/x/snapshots/{i}/fs" for i in range(3, 0, -1)]
    chdir, opts = m._compact_lowerdirs(["index=off", "lowerdir=" + ":".join(dirs), "upperdir=/u"])
    assert chdir == "/var/lib/x/snapshots/"
    assert opts == ["index=off", "upperdir=/u", "lowerdir=3/fs:2/fs:1/fs"]
    assert m._compact_lowerdirs(["lowerdir=/a/fs"]) == ("", ["lowerdir=/a/fs"])
    assert m._compact_lowerdirs(["lowerdir=/a:/b"]) == ("", ["lowerdir=/a:/b"])  # common dir is "/"


def test_from_any_and_helpers():
    from pycontainerd.api.gen.containerd import types as pb
    mounts = [pb.Mount(type="overlay", source="overlay", options=["workdir=/w", "upperdir=/u", "lowerdir=/l2:/l1"])]
    assert m.overlay_upperdir(mounts) == "/u"
    assert m.overlay_lowerdirs(mounts) == ["/l2", "/l1"]
    assert m.overlay_upperdir([{"type": "bind", "source": "/s", "options": ["rw", "rbind"]}]) == "/s"
    assert m.overlay_upperdir([Mount("bind", "/s", options=["ro", "rbind"])]) is None
    assert m.overlay_upperdir([Mount("overlay", "overlay", options=["lowerdir=/a:/b"])]) is None
    assert Mount("bind", "/s", options=["ro"]).command("/t") == "mount -t bind /s /t -o ro"


def test_unescape_mountinfo():
    assert m._unescape(r"/tmp/with\040space\011tab") == "/tmp/with space\ttab"


root = pytest.mark.root


@root
def test_bind_rw_ro_and_stacked_unmount(tmp):
    src, dst = Path(tmp, "src"), Path(tmp, "dst")
    src.mkdir(), dst.mkdir()
    m.mount(Mount("bind", str(src), options=["rw", "rbind"]), str(dst))
    (dst / "f").write_text("x")
    assert (src / "f").read_text() == "x"
    m.mount(Mount("bind", str(src), options=["ro", "rbind"]), str(dst))  # stacked on top
    with pytest.raises(OSError) as e:
        (dst / "g").write_text("no")
    assert e.value.errno == errno.EROFS
    assert m.is_mountpoint(str(dst))
    m.unmount_all(str(dst))
    assert not m.is_mountpoint(str(dst))
    m.unmount(str(dst))  # not mounted: fine
    m.unmount_all(str(Path(tmp, "missing")))


@root
def test_overlay_and_errors(tmp):
    d = Path(tmp)
    for x in ("l1", "l2", "u", "w", "t"):
        (d / x).mkdir()
    (d / "l1" / "a").write_text("1")
    (d / "l2" / "a").write_text("2")
    opts = [f"workdir={d}/w", f"upperdir={d}/u", f"lowerdir={d}/l2:{d}/l1"]
    m.mount(Mount("overlay", "overlay", options=opts), str(d / "t"))
    assert (d / "t" / "a").read_text() == "2"
    (d / "t" / "b").write_text("new")
    assert (d / "u" / "b").exists()
    m.unmount_all(str(d / "t"))
    with pytest.raises(MountError) as e:
        m.mount(Mount("overlay", "overlay", options=[f"lowerdir={d}/missing"]), str(d / "t"))
    assert "mount -t overlay overlay" in str(e.value) and e.value.errno
    with pytest.raises(MountError):
        m.mount(Mount("bind", str(d / "l1"), options=["loop"]), str(d / "t"))


@root
def test_long_overlay_options_use_relative_lowerdirs(tmp):
    base = Path(tmp) / ("long-" + "x" * 60)
    lowers = []
    for i in range(80):
        p = base / "snapshots" / str(i) / "fs"
        p.mkdir(parents=True)
        (p / f"f{i}").write_text(str(i))
        lowers.append(str(p))
    target = Path(tmp) / "t"
    target.mkdir()
    opts = ["lowerdir=" + ":".join(reversed(lowers))]
    assert len(opts[0]) > m.PAGE_SIZE
    cwd = os.getcwd()
    m.mount(Mount("overlay", "overlay", options=opts), str(target))
    assert os.getcwd() == cwd
    assert len(os.listdir(target)) == 80
    m.unmount_all(str(target))


@root
def test_temp_mount_and_recursive_unmount(tmp):
    src = Path(tmp, "src")
    (src / "sub").mkdir(parents=True)
    with m.temp_mount([Mount("bind", str(src), options=["rw", "rbind"])], root=tmp) as d:
        assert os.path.isdir(os.path.join(d, "sub"))
        inner = os.path.join(d, "sub")
        m.mount(Mount("bind", str(src), options=["ro", "rbind"]), inner)  # nested below it
        assert len(m.mounts_under(d)) == 2
        kept = d
    assert not os.path.exists(kept)
    assert m.mounts_under(tmp) == []


@root
def test_mount_all_undoes_on_failure(tmp):
    src, dst = Path(tmp, "src"), Path(tmp, "dst")
    src.mkdir(), dst.mkdir()
    with pytest.raises(MountError):
        m.mount_all([Mount("bind", str(src), options=["rbind"]),
                     Mount("bind", str(Path(tmp, "nope")), options=["rbind"])], str(dst))
    assert m.mounts_under(str(dst)) == []
