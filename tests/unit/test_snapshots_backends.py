"""The snapshotter contract, run against both local backends (overlayfs and native), with real
mounts: containerd's snapshots/testsuite scenarios (basic, stat, transitivity, prepare/view
rules, update, remove, walk, lower-layer files, deletes, chown, root permission, view
read-only, 128 layers) plus nasty keys, usage, cleanup and the native copy's fidelity.

Fixtures unmount everything under their temp dirs and remove them even when a test fails.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from pycontainerd.core import errdefs
from pycontainerd.core import mount as mountmod
from pycontainerd.plugins.snapshots.base import Info, Kind, LABEL_UPPERDIR
from pycontainerd.plugins.snapshots.native import NativeSnapshotter
from pycontainerd.plugins.snapshots.overlay import OverlaySnapshotter, check_overlay_support

pytestmark = pytest.mark.root

GC = {"containerd.io/gc.root": "2024-01-01T00:00:00Z"}


def _cleanup_dir(path: str) -> None:
    mountmod.unmount_recursive(path, lazy=True)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tmp():
    d = tempfile.mkdtemp(prefix="snaptest-", dir="/tmp")
    try:
        yield d
    finally:
        _cleanup_dir(d)


def make(kind: str, root: str, **kw):
    if kind == "overlayfs":
        try:
            check_overlay_support(root)
        except OSError as e:
            pytest.skip(f"overlay not supported: {e}")
        return OverlaySnapshotter(root, **kw)
    return NativeSnapshotter(root)


@pytest.fixture(params=["overlayfs", "native"])
async def sn(request, tmp):
    s = make(request.param, os.path.join(tmp, "root"))
    s.kind_name = request.param
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def work(tmp):
    w = os.path.join(tmp, "work")
    os.makedirs(w)
    return w


class Mounted:
    """Mount the mounts on a fresh dir under `work`; always unmounted on exit."""

    def __init__(self, mounts, work: str):
        self.mounts, self.work = mounts, work

    def __enter__(self) -> str:
        self.target = tempfile.mkdtemp(dir=self.work)
        mountmod.mount_all(self.mounts, self.target)
        return self.target

    def __exit__(self, *exc) -> None:
        mountmod.unmount_recursive(self.target)
        os.rmdir(self.target)


def write(path: str, data: str, mode: int = 0o644) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(data)
    os.chmod(path, mode)


async def layer(sn, name: str, parent: str, files: dict[str, str], work: str, removes=()) -> None:
    key = f"{name}-active"
    with Mounted(await sn.prepare(key, parent, GC), work) as d:
        for rel in removes:
            p = os.path.join(d, rel)
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
        for rel, data in files.items():
            write(os.path.join(d, rel), data)
    await sn.commit(name, key, GC)


def tree(d: str) -> dict[str, str]:
    out = {}
    for root, dirs, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = Path(p).read_text()
        for x in dirs:
            out[os.path.relpath(os.path.join(root, x), d) + "/"] = ""
    return out


# -- basic lifecycle ---------------------------------------------------------------------------

async def test_basic(sn, work):
    mounts = await sn.prepare("preparing", "", GC)
    assert len(mounts) == 1 and mounts[0].type == "bind" and "rw" in mounts[0].options
    with Mounted(mounts, work) as d:
        write(f"{d}/foo", "foo\n")
        os.makedirs(f"{d}/a/b")
        write(f"{d}/a/b/c", "c\n")
    await sn.commit("committed", "preparing", GC)
    info = await sn.stat("committed")
    assert (info.name, info.kind, info.parent) == ("committed", Kind.COMMITTED, "")
    assert info.labels == GC
    with pytest.raises(errdefs.NotFound):
        await sn.stat("preparing")

    with Mounted(await sn.prepare("next", "committed", GC), work) as d:
        assert tree(d) == {"foo": "foo\n", "a/": "", "a/b/": "", "a/b/c": "c\n"}
        write(f"{d}/bar", "bar\n")
        os.unlink(f"{d}/foo")
    info = await sn.stat("next")
    assert (info.kind, info.parent) == (Kind.ACTIVE, "committed")
    await sn.commit("next-committed", "next", GC)
    with Mounted(await sn.view("view", "next-committed", GC), work) as d:
        assert tree(d) == {"bar": "bar\n", "a/": "", "a/b/": "", "a/b/c": "c\n"}
    assert (await sn.stat("view")).kind == Kind.VIEW
    names = [i.name for i in await sn.walk()]
    assert names == sorted(["committed", "next-committed", "view"])


async def test_stat_times_and_mounts_again(sn, work):
    await sn.prepare("a", "", GC)
    info = await sn.stat("a")
    assert info.created == info.updated and info.created is not None
    m1 = await sn.mounts("a")
    assert m1 == await sn.mounts("a")
    await sn.commit("c", "a", GC)
    with pytest.raises(errdefs.FailedPrecondition):
        await sn.mounts("c")  # committed snapshots have no mounts


async def test_transitivity(sn, work):
    await layer(sn, "A", "", {"foo": "A\n"}, work)
    await layer(sn, "B", "A", {"foo": "B\n"}, work)
    with Mounted(await sn.view("v", "B", GC), work) as d:
        assert Path(d, "foo").read_text() == "B\n"


async def test_prepare_view_errors(sn, work):
    await sn.prepare("a", "", GC)
    with pytest.raises(errdefs.AlreadyExists):
        await sn.prepare("a", "", GC)
    with pytest.raises(errdefs.AlreadyExists):
        await sn.view("a", "", GC)
    with pytest.raises(errdefs.NotFound):
        await sn.prepare("b", "missing", GC)
    with pytest.raises(errdefs.InvalidArgument):  # parent must be committed
        await sn.prepare("b", "a", GC)
    await sn.commit("A", "a", GC)
    await sn.view("v", "A", GC)
    with pytest.raises(errdefs.FailedPrecondition):  # a view cannot be committed
        await sn.commit("V", "v", GC)
    with pytest.raises(errdefs.InvalidArgument):
        await sn.prepare("c", "v", GC)
    with pytest.raises(errdefs.AlreadyExists):  # keys and names share one space
        await sn.prepare("A", "", GC)
    await sn.prepare("x", "", GC)
    with pytest.raises(errdefs.AlreadyExists):
        await sn.commit("A", "x", GC)
    with pytest.raises(errdefs.NotFound):
        await sn.commit("Y", "nope", GC)
    assert (await sn.stat("x")).kind == Kind.ACTIVE  # a failed commit leaves it active


async def test_nasty_keys(sn, work):
    with pytest.raises(errdefs.InvalidArgument):
        await sn.prepare("", "", GC)
    for key in ("../x", "/abs/../../etc", "a\nb", "k" * 4096, "ü/ñ spaces"):
        mounts = await sn.prepare(key, "", GC)
        for m in mounts:  # keys never become paths
            assert m.source.startswith(sn.root)
            assert "../" not in m.source
        with Mounted(mounts, work) as d:
            write(f"{d}/f", "x")
        await sn.commit(key + "-c", key, GC)
        assert (await sn.stat(key + "-c")).name == key + "-c"
        await sn.remove(key + "-c")
    assert await sn.walk() == []


async def test_remove(sn, work):
    await sn.prepare("committed-a", "", GC)
    await sn.commit("committed-1", "committed-a", GC)
    await sn.prepare("reuse-1", "committed-1", GC)
    with pytest.raises(errdefs.FailedPrecondition):
        await sn.remove("committed-1")  # has a child
    await sn.remove("reuse-1")
    await sn.view("reuse-1", "committed-1", GC)
    await sn.remove("reuse-1")
    await sn.prepare("reuse-1", "", GC)
    await sn.remove("committed-1")
    await sn.commit("committed-1", "reuse-1", GC)
    with pytest.raises(errdefs.NotFound):
        await sn.remove("nope")


async def test_remove_intermediate_and_dirs(sn, work):
    await layer(sn, "base", "", {"a": "1"}, work)
    await layer(sn, "inter", "base", {"b": "2"}, work)
    with pytest.raises(errdefs.FailedPrecondition):
        await sn.remove("base")
    await sn.remove("inter")
    await sn.remove("base")
    try:
        await sn.cleanup()
    except errdefs.Unimplemented:
        assert sn.kind_name == "native"
    assert os.listdir(os.path.join(sn.root, "snapshots")) == []


async def test_update(sn, work):
    await layer(sn, "c1", "", {}, work)
    await layer(sn, "c2", "c1", {}, work)
    await sn.prepare("a1", "c2", GC)
    await sn.view("v1", "c2", GC)
    for name, kind, parent in [("c1", Kind.COMMITTED, ""), ("c2", Kind.COMMITTED, "c1"),
                               ("a1", Kind.ACTIVE, "c2"), ("v1", Kind.VIEW, "c2")]:
        st = await sn.stat(name)
        created = st.created
        expected = {"l1": "v1", "l2": "v2", "l3": "v3", **GC}
        st.parent, st.labels = "doesnotexist", dict(expected)
        st = await sn.update(st)
        assert (st.kind, st.parent, st.name, st.created) == (kind, parent, name, created)
        assert st.updated > created
        assert _plain(st.labels) == expected
        st.labels = {"l1": "updated", "l4": "v4"}
        st = await sn.update(st, ["labels.l1", "labels.l2"])
        assert _plain(st.labels) == {"l1": "updated", "l3": "v3", **GC}
        st.labels = {"l4": "v4", **GC}
        st = await sn.update(st, ["labels"])
        assert _plain(st.labels) == {"l4": "v4", **GC}
        with pytest.raises(errdefs.InvalidArgument):
            await sn.update(st, ["parent"])
    with pytest.raises(errdefs.NotFound):
        await sn.update(Info(name="nope", labels={"a": "b"}))


def _plain(labels: dict) -> dict:
    return {k: v for k, v in labels.items() if k != LABEL_UPPERDIR}


async def test_walk_filters(sn, work):
    walk = {"containerd.io/gc.root": "check-walk"}
    await sn.prepare("a-np", "", walk)
    await sn.prepare("p-tmp", "", walk)
    await sn.commit("p", "p-tmp", walk)
    await sn.prepare("a", "p", walk)
    await sn.view("v", "p", walk)
    await sn.prepare("p-wl-tmp", "", walk)
    await sn.commit("p-wl", "p-wl-tmp", {"l": "1", **walk})
    await sn.prepare("a-wl", "p-wl", {"l": "2", **walk})
    await sn.view("v-wl", "p-wl", {"l": "3", **walk})
    await sn.prepare("a-np-wl", "", {"l": "2", **walk})
    cases = [
        (["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"], ['labels."containerd.io/gc.root"==check-walk']),
        (["a-np", "a", "a-wl", "a-np-wl"], ['kind==active,labels."containerd.io/gc.root"==check-walk']),
        (["v", "v-wl"], ['kind==view,labels."containerd.io/gc.root"==check-walk']),
        (["p", "p-wl"], ['kind==committed,labels."containerd.io/gc.root"==check-walk']),
        (["p", "a-np-wl"], ["name==p", "name==a-np-wl"]),
        (["a-wl"], ["name==a-wl,labels.l"]),
        (["a", "v"], ["parent==p"]),
        (["a", "v", "a-wl", "v-wl"], ['parent!="",labels."containerd.io/gc.root"==check-walk']),
        (["p-wl", "a-wl", "v-wl", "a-np-wl"], ["labels.l"]),
        (["a-wl", "a-np-wl"], ["labels.l==2"]),
    ]
    for expected, flt in cases:
        assert [i.name for i in await sn.walk(flt)] == sorted(expected), flt
    with pytest.raises(errdefs.InvalidArgument):
        await sn.walk(["labels.=="])


async def test_lower_layer_files_and_deletes(sn, work):
    await layer(sn, "l1", "", {"dir/file": "one\n", "keep": "k", "gone": "g"}, work)
    await layer(sn, "l2", "l1", {"dir/file": "two\n"}, work, removes=["gone"])
    await layer(sn, "l3", "l2", {}, work, removes=["dir"])
    with Mounted(await sn.view("v2", "l2", GC), work) as d:
        assert tree(d) == {"dir/": "", "dir/file": "two\n", "keep": "k"}
    with Mounted(await sn.view("v3", "l3", GC), work) as d:
        assert tree(d) == {"keep": "k"}
    # move a file from a lower layer
    with Mounted(await sn.prepare("mv", "l2", GC), work) as d:
        os.rename(f"{d}/dir/file", f"{d}/moved")
        assert tree(d) == {"dir/": "", "moved": "two\n", "keep": "k"}


async def test_chown_and_permissions(sn, work):
    with Mounted(await sn.prepare("p", "", GC), work) as d:
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o755  # containerd's RootPermission
        write(f"{d}/owned", "x")
        os.chown(f"{d}/owned", 1234, 5678)
        os.chown(d, 1000, 1001)
        os.mkdir(f"{d}/dir", 0o700)
        os.chmod(f"{d}/dir", 0o700)
    await sn.commit("c", "p", GC)
    with Mounted(await sn.prepare("child", "c", GC), work) as d:
        st = os.stat(d)
        assert (st.st_uid, st.st_gid) == (1000, 1001)  # the root takes the parent's owner
        st = os.stat(f"{d}/owned")
        assert (st.st_uid, st.st_gid) == (1234, 5678)
        assert stat.S_IMODE(os.stat(f"{d}/dir").st_mode) == 0o700


async def test_view_is_readonly(sn, work):
    await layer(sn, "c", "", {"f": "x"}, work)
    for key, parent in (("v", "c"), ("v-empty", "")):
        with Mounted(await sn.view(key, parent, GC), work) as d:
            with pytest.raises(OSError) as e:
                write(f"{d}/new", "no")
            assert e.value.errno == 30  # EROFS


async def test_usage(sn, work):
    with Mounted(await sn.prepare("u", "", GC), work) as d:
        with open(f"{d}/data", "wb") as f:
            f.write(os.urandom(100 * 1024))
        os.link(f"{d}/data", f"{d}/hardlink")  # counted once
    active = await sn.usage("u")
    assert active.inodes == 2
    assert 100 * 1024 <= active.size <= 100 * 1024 + 16 * 1024
    await sn.commit("uc", "u", GC)
    assert await sn.usage("uc") == active  # stored at commit
    await sn.view("uv", "uc", GC)
    assert (await sn.usage("uv")).size == 0
    with pytest.raises(errdefs.NotFound):
        await sn.usage("nope")


async def test_128_layers(sn, work):
    # native copies every layer in full (quadratic here): 128 layers matter for overlay's options
    layers = 128 if sn.kind_name == "overlayfs" else 24
    parent = ""
    for i in range(layers):
        key = f"{work}/prepare-layer-{i}"  # long keys like the Go suite's
        with Mounted(await sn.prepare(key, parent, GC), work) as d:
            write(f"{d}/overwriteme", f"{i} WAS HERE!\n")
            write(f"{d}/ADDHERE/file-{i}", "same\n")
        parent = f"{work}/committed-{i}"
        await sn.commit(parent, key, GC)
    mounts = await sn.view("fullview", parent, GC)
    if sn.kind_name == "overlayfs":
        assert len(mountmod.overlay_lowerdirs(mounts)) == 128
        assert sum(len(o) for o in mounts[0].options) > mountmod.PAGE_SIZE  # needs the compact mount
    with Mounted(mounts, work) as d:
        assert Path(d, "overwriteme").read_text() == f"{layers - 1} WAS HERE!\n"
        assert len(os.listdir(f"{d}/ADDHERE")) == layers


async def test_concurrent_prepares(sn, work):
    await layer(sn, "base", "", {"f": "x"}, work)
    results = await asyncio.gather(*[sn.prepare(f"k{i}", "base", GC) for i in range(10)],
                                   *[sn.prepare("same", "base", GC) for _ in range(3)], return_exceptions=True)
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(errors) == 2 and all(isinstance(e, errdefs.AlreadyExists) for e in errors)
    assert len(await sn.walk(["kind==active"])) == 11


# -- overlayfs specifics -----------------------------------------------------------------------

async def test_overlay_mounts_shape(tmp, work):
    sn = make("overlayfs", os.path.join(tmp, "o"), upperdir_label=True)
    try:
        m = await sn.prepare("a", "", GC)
        assert m[0].options == ["rw", "rbind"] and m[0].source.endswith("/fs")
        assert (await sn.view("va", "", GC))[0].options == ["ro", "rbind"]
        await sn.commit("A", "a", GC)
        m = await sn.view("v1", "A", GC)
        assert (m[0].type, m[0].options) == ("bind", ["ro", "rbind"])
        m = await sn.prepare("b", "A", GC)
        upper = mountmod.overlay_upperdir(m)
        assert upper and upper.endswith("/fs") and os.path.isdir(upper)
        assert mountmod.overlay_option(m, "workdir").endswith("/work")
        if os.path.exists("/sys/module/overlay/parameters/index"):
            assert m[0].options[0] == "index=off"
        info = await sn.stat("b")
        assert info.labels[LABEL_UPPERDIR] == upper
        assert all(LABEL_UPPERDIR in i.labels for i in await sn.walk())
        await sn.commit("B", "b", GC)
        m = await sn.view("v2", "B", GC)
        assert m[0].type == "overlay" and len(mountmod.overlay_lowerdirs(m)) == 2
        assert mountmod.overlay_upperdir(m) is None
        with Mounted(await sn.prepare("d", "B", GC), work) as d:
            write(f"{d}/new", "n")
        assert os.path.exists(os.path.join(mountmod.overlay_upperdir(await sn.mounts("d")), "new"))
    finally:
        await sn.close()


async def test_overlay_async_and_sync_remove(tmp):
    for sync in (False, True):
        sn = make("overlayfs", os.path.join(tmp, f"o{sync}"), sync_remove=sync)
        try:
            await sn.prepare("a", "", GC)
            await sn.remove("a")
            left = os.listdir(os.path.join(sn.root, "snapshots"))
            assert left == ([] if sync else ["1"])
            await sn.cleanup()
            assert os.listdir(os.path.join(sn.root, "snapshots")) == []
        finally:
            await sn.close()


async def test_overlay_reopen_keeps_state(tmp):
    root = os.path.join(tmp, "o")
    sn = make("overlayfs", root)
    await sn.prepare("a", "", GC)
    await sn.commit("A", "a", GC)
    await sn.close()
    sn = make("overlayfs", root)
    try:
        assert [i.name for i in await sn.walk()] == ["A"]
        m = await sn.prepare("b", "A", GC)
        assert "/snapshots/2/" in mountmod.overlay_upperdir(m)  # ids are never reused
    finally:
        await sn.close()


# -- native specifics --------------------------------------------------------------------------

async def test_native_copy_fidelity(tmp, work):
    sn = make("native", os.path.join(tmp, "n"))
    try:
        with Mounted(await sn.prepare("a", "", GC), work) as d:
            write(f"{d}/file", "data", 0o640)
            os.link(f"{d}/file", f"{d}/hard")
            os.symlink("file", f"{d}/sym")
            os.mknod(f"{d}/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
            os.mkfifo(f"{d}/fifo")
            os.chown(f"{d}/file", 42, 43)
            os.setxattr(f"{d}/file", "user.test", b"value")
            os.setxattr(f"{d}/file", "trusted.t", b"tv")
            os.utime(f"{d}/file", (1_000_000, 1_000_000))
        await sn.commit("A", "a", GC)
        with Mounted(await sn.prepare("b", "A", GC), work) as d:
            st = os.lstat(f"{d}/file")
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), int(st.st_mtime)) == (42, 43, 0o640, 1_000_000)
            assert st.st_ino == os.lstat(f"{d}/hard").st_ino and st.st_nlink == 2
            assert os.readlink(f"{d}/sym") == "file"
            nst = os.lstat(f"{d}/null")
            assert stat.S_ISCHR(nst.st_mode) and nst.st_rdev == os.makedev(1, 3)
            assert stat.S_ISFIFO(os.lstat(f"{d}/fifo").st_mode)
            assert os.getxattr(f"{d}/file", "user.test") == b"value"
            assert os.getxattr(f"{d}/file", "trusted.t") == b"tv"
            write(f"{d}/file", "changed")
        with Mounted(await sn.view("v", "A", GC), work) as d:
            assert Path(d, "file").read_text() == "data"  # the copy is independent
    finally:
        await sn.close()


async def test_native_sweeps_leftovers(tmp):
    root = os.path.join(tmp, "n")
    sn = make("native", root)
    await sn.prepare("a", "", GC)
    await sn.prepare("b", "", GC)
    await sn.close()
    os.makedirs(os.path.join(root, "snapshots", "new-123"))
    os.makedirs(os.path.join(root, "snapshots", "rm-9"))
    # a removal whose transaction never committed: the record is there, the dir was renamed
    os.rename(os.path.join(root, "snapshots", "2"), os.path.join(root, "snapshots", "rm-2"))
    sn = make("native", root)
    try:
        assert sorted(os.listdir(os.path.join(root, "snapshots"))) == ["1", "2"]
    finally:
        await sn.close()


def test_overlay_check_leaves_nothing(tmp):
    root = os.path.join(tmp, "chk")
    check_overlay_support(root)
    assert os.listdir(root) == []
    assert mountmod.mounts_under(root) == []


def test_du_matches_du_binary(tmp):
    from pycontainerd.plugins.snapshots.fsutil import disk_usage
    d = os.path.join(tmp, "du")
    os.makedirs(f"{d}/x/y")
    for i in range(5):
        Path(f"{d}/x/f{i}").write_bytes(os.urandom(5000 * (i + 1)))
    u = disk_usage(d)
    out = subprocess.run(["du", "-s", "-B1", d], capture_output=True, text=True, check=True).stdout
    assert u.size == int(out.split()[0])
    assert u.inodes == 8
