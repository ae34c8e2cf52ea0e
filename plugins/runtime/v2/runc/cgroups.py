"""A container's cgroup: found from its init pid, read into containerd's metrics protobufs, and
watched for OOM kills (containerd's cgroups library, pkg/oom/v1 and v2).

Stats come back as the Any the Go shim returns: type URL `io.containerd.cgroups.v1.Metrics` on
cgroup v1 and hybrid hosts, `io.containerd.cgroups.v2.Metrics` on unified ones, the message
encoded by hand (proto.py) because the project does not generate those protos.

v1 (per controller, a missing file skips that controller, like cgroups.IgnoreNotExist):
  pids (current, limit; "max" is 0), cpu (cpuacct.usage, cpuacct.stat user/system ticks as ns,
  cpuacct.usage_percpu; cpu.stat throttling), memory (memory.stat, usage/memsw/kmem/kmem.tcp
  entries, memory.oom_control), blkio (the *_recursive files, or throttle.* when those are empty),
  hugetlb (per page size).
v2: cpu.stat and memory.stat keys, memory.current/max, memory.swap.current/max ("max" is
  2^64-1), pids.current/max, memory.events, io.stat, hugetlb.*.current/max.

OOM: v1 registers an eventfd on memory.oom_control through cgroup.event_control; v2 watches
memory.events with inotify and reports when oom_kill grows. A TaskOOM event names the container.
"""
from __future__ import annotations

import asyncio
import ctypes
import os
from typing import Callable

import structlog

from .proto import Msg

log = structlog.get_logger("pyrunc.cgroups")

V1_URL = "io.containerd.cgroups.v1.Metrics"
V2_URL = "io.containerd.cgroups.v2.Metrics"
MAX_UINT64 = (1 << 64) - 1
NANOS_PER_SECOND = 1_000_000_000
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
UNIFIED_MOUNTPOINT = "/sys/fs/cgroup"


def _mountinfo() -> list[tuple[str, str, str, list[str]]]:
    """(root, mount point, fstype, super options) of cgroup mounts."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields = pre.split()
            parts = post.split()
            if len(parts) >= 3 and parts[0] in ("cgroup", "cgroup2") and len(fields) >= 5:
                out.append((fields[3], fields[4], parts[0], parts[2].split(",")))
    return out


def mode() -> str:
    """"unified", "hybrid" or "legacy", as cgroups.Mode()."""
    mounts = {mp: fstype for _root, mp, fstype, _opts in _mountinfo()}
    if mounts.get(UNIFIED_MOUNTPOINT) == "cgroup2":
        return "unified"
    if mounts.get(UNIFIED_MOUNTPOINT + "/unified") == "cgroup2":
        return "hybrid"
    return "legacy"


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _read_uint(path: str) -> int:
    text = _read(path).strip()
    if text == "max":
        return MAX_UINT64
    return _parse_uint(text)


def _parse_uint(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        return 0
    if value < 0:  # Go's parseUint treats negative values (e.g. -1 "unlimited") as 0
        return 0
    return value & MAX_UINT64


def _kv(path: str) -> dict[str, int]:
    out = {}
    for line in _read(path).splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = _parse_uint(parts[1])
    return out


def load(pid: int) -> "Cgroup | None":
    """The cgroup of `pid`, or None when it cannot be found."""
    try:
        if mode() == "unified":
            return CgroupV2.load(pid)
        return CgroupV1.load(pid)
    except OSError as err:
        log.error("loading cgroup", pid=pid, error=str(err))
        return None


class Cgroup:
    url = ""

    def stat(self) -> bytes:
        raise NotImplementedError

    def memory_dir(self) -> str | None:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# v1


_V1_MEMORY_KEYS = ["cache", "rss", "rss_huge", "mapped_file", "dirty", "writeback", "pgpgin", "pgpgout",
                   "pgfault", "pgmajfault", "inactive_anon", "active_anon", "inactive_file", "active_file",
                   "unevictable", "hierarchical_memory_limit", "hierarchical_memsw_limit", "total_cache",
                   "total_rss", "total_rss_huge", "total_mapped_file", "total_dirty", "total_writeback",
                   "total_pgpgin", "total_pgpgout", "total_pgfault", "total_pgmajfault", "total_inactive_anon",
                   "total_active_anon", "total_inactive_file", "total_active_file", "total_unevictable"]
_BLKIO_RECURSIVE = [("sectors_recursive", 8), ("io_service_bytes_recursive", 1), ("io_serviced_recursive", 2),
                    ("io_queued_recursive", 3), ("io_service_time_recursive", 4), ("io_wait_time_recursive", 5),
                    ("io_merged_recursive", 6), ("time_recursive", 7)]


def _hugepage_sizes() -> list[str]:
    """Page sizes as the cgroup files name them ("2MB", "1GB")."""
    sizes = []
    try:
        names = os.listdir("/sys/kernel/mm/hugepages")
    except OSError:
        return sizes
    for name in names:
        if not name.startswith("hugepages-") or not name.endswith("kB"):
            continue
        kb = int(name[len("hugepages-"):-2])
        value, unit = kb * 1024, "B"
        for u in ("KB", "MB", "GB", "TB", "PB"):
            if value < 1024 or value % 1024:
                break
            value //= 1024
            unit = u
        sizes.append(f"{value}{unit}")
    return sorted(sizes)


def _devices() -> dict[tuple[int, int], str]:
    out = {}
    try:
        for line in _read("/proc/partitions").splitlines()[2:]:
            parts = line.split()
            if len(parts) == 4:
                out[(int(parts[0]), int(parts[1]))] = "/dev/" + parts[3]
    except (OSError, ValueError):
        pass
    return out


class CgroupV1(Cgroup):
    url = V1_URL

    def __init__(self, paths: dict[str, str]) -> None:
        self.paths = paths  # controller -> directory

    @classmethod
    def load(cls, pid: int) -> "CgroupV1":
        mounts = [m for m in _mountinfo() if m[2] == "cgroup"]
        paths: dict[str, str] = {}
        for line in _read(f"/proc/{pid}/cgroup").splitlines():
            parts = line.split(":", 2)
            if len(parts) != 3 or not parts[1]:
                continue
            controllers = parts[1].split(",")
            for root, mountpoint, _fstype, options in mounts:
                if not set(controllers).issubset(options):
                    continue
                rel = parts[2]
                if root != "/" and (rel == root or rel.startswith(root + "/")):
                    rel = rel[len(root):]
                directory = os.path.join(mountpoint, rel.lstrip("/"))
                for c in controllers:
                    paths[c] = directory
                break
        return cls(paths)

    def memory_dir(self) -> str | None:
        return self.paths.get("memory")

    def exists(self) -> bool:
        directory = self.paths.get("memory") or next(iter(self.paths.values()), None)
        return bool(directory) and os.path.isdir(directory)

    def stat(self) -> bytes:
        m = Msg()
        hugetlb = self._hugetlb()
        for entry in hugetlb:
            m.msg(1, entry)
        m.msg(2, self._guard(self._pids))
        m.msg(3, self._cpu())
        memory, oom = self._memory()
        m.msg(4, memory)
        m.msg(5, self._guard(self._blkio))
        m.msg(6, self._guard(self._rdma))
        m.msg(9, oom)
        return m.bytes()

    @staticmethod
    def _guard(fn: Callable[[], Msg | None]) -> Msg | None:
        try:
            return fn()
        except FileNotFoundError:
            return None

    def _hugetlb(self) -> list[Msg]:
        d = self.paths.get("hugetlb")
        out = []
        if not d:
            return out
        for size in _hugepage_sizes():
            try:
                e = Msg()
                e.u64(1, _read_uint(f"{d}/hugetlb.{size}.usage_in_bytes"))
                e.u64(2, _read_uint(f"{d}/hugetlb.{size}.max_usage_in_bytes"))
                e.u64(3, _read_uint(f"{d}/hugetlb.{size}.failcnt"))
                e.str(4, size)
            except FileNotFoundError:
                return []
            out.append(e)
        return out

    def _pids(self) -> Msg | None:
        d = self.paths.get("pids")
        if not d:
            return None
        p = Msg()
        p.u64(1, _read_uint(f"{d}/pids.current"))
        limit = _read(f"{d}/pids.max").strip()
        p.u64(2, 0 if limit == "max" else _parse_uint(limit))
        return p

    def _cpu(self) -> Msg:
        usage = Msg()
        throttle = Msg()
        d = self.paths.get("cpuacct")
        if d:
            try:
                fields = _read(f"{d}/cpuacct.stat").split()
                user = kernel = 0
                if len(fields) == 4 and fields[0] == "user" and fields[2] == "system":
                    user = int(fields[1]) * NANOS_PER_SECOND // CLOCK_TICKS
                    kernel = int(fields[3]) * NANOS_PER_SECOND // CLOCK_TICKS
                total = _read_uint(f"{d}/cpuacct.usage")
                percpu = [_parse_uint(v) for v in _read(f"{d}/cpuacct.usage_percpu").split()]
                usage.u64(1, total)
                usage.u64(2, kernel)
                usage.u64(3, user)
                usage.packed(4, percpu)
            except FileNotFoundError:
                pass
        d = self.paths.get("cpu")
        if d:
            try:
                stats = _kv(f"{d}/cpu.stat")
                throttle.u64(1, stats.get("nr_periods", 0))
                throttle.u64(2, stats.get("nr_throttled", 0))
                throttle.u64(3, stats.get("throttled_time", 0))
            except FileNotFoundError:
                pass
        cpu = Msg()
        cpu.msg(1, usage)
        cpu.msg(2, throttle)
        return cpu

    def _memory(self) -> tuple[Msg | None, Msg | None]:
        d = self.paths.get("memory")
        if not d:
            return None, None
        try:
            raw = _kv(f"{d}/memory.stat")
            mem = Msg()
            for num, key in enumerate(_V1_MEMORY_KEYS, 1):
                mem.u64(num, raw.get(key, 0))
            oom_raw = _kv(f"{d}/memory.oom_control")
            oom = Msg()
            oom.u64(1, oom_raw.get("oom_kill_disable", 0))
            oom.u64(2, oom_raw.get("under_oom", 0))
            oom.u64(3, oom_raw.get("oom_kill", 0))
            for num, module in ((33, ""), (34, "memsw."), (35, "kmem."), (36, "kmem.tcp.")):
                entry = Msg()
                try:
                    entry.u64(2, _read_uint(f"{d}/memory.{module}usage_in_bytes"))
                    entry.u64(3, _read_uint(f"{d}/memory.{module}max_usage_in_bytes"))
                    entry.u64(4, _read_uint(f"{d}/memory.{module}failcnt"))
                    entry.u64(1, _read_uint(f"{d}/memory.{module}limit_in_bytes"))
                except FileNotFoundError:
                    if not module:
                        raise
                mem.msg(num, entry)
            return mem, oom
        except FileNotFoundError:
            return None, None

    def _blkio(self) -> Msg | None:
        d = self.paths.get("blkio")
        if not d:
            return None
        devices = _devices()
        blkio = Msg()
        size = 0
        if os.path.lexists(f"{d}/blkio.io_serviced_recursive"):
            entries_by_field: dict[int, list[Msg]] = {}
            for name, num in _BLKIO_RECURSIVE:
                entries_by_field[num] = self._blkio_entries(f"{d}/blkio.{name}", devices)
                size += len(entries_by_field[num])
            if size:
                for num in sorted(entries_by_field):
                    for e in entries_by_field[num]:
                        blkio.msg(num, e)
                return blkio
        for name, num in (("throttle.io_service_bytes", 1), ("throttle.io_serviced", 2)):
            for e in self._blkio_entries(f"{d}/blkio.{name}", devices):
                blkio.msg(num, e)
        return blkio

    @staticmethod
    def _blkio_entries(path: str, devices: dict[tuple[int, int], str]) -> list[Msg]:
        out = []
        for line in _read(path).splitlines():
            fields = line.replace(":", " ").split()
            if len(fields) < 3:
                continue
            try:
                major, minor = int(fields[0]), int(fields[1])
            except ValueError:
                continue
            op = ""
            value_field = 2
            if len(fields) == 4:
                op = fields[2]
                value_field = 3
            e = Msg()
            e.str(1, op)
            e.str(2, devices.get((major, minor), ""))
            e.u64(3, major)
            e.u64(4, minor)
            e.u64(5, _parse_uint(fields[value_field]))
            out.append(e)
        return out

    def _rdma(self) -> Msg | None:
        d = self.paths.get("rdma")
        if not d:
            return None
        rdma = Msg()
        for num, name in ((1, "rdma.current"), (2, "rdma.max")):
            for e in _rdma_entries(f"{d}/{name}"):
                rdma.msg(num, e)
        return rdma


def _rdma_entries(path: str) -> list[Msg]:
    out = []
    try:
        text = _read(path)
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        e = Msg()
        e.str(1, parts[0])
        for kv in parts[1:]:
            key, _, value = kv.partition("=")
            number = 0xFFFFFFFF if value == "max" else (_parse_uint(value) & 0xFFFFFFFF)
            if key == "hca_handle":
                e.u64(2, number)
            elif key == "hca_object":
                e.u64(3, number)
        out.append(e)
    return out


# --------------------------------------------------------------------------------------------
# v2


_V2_MEMORY_KEYS = ["anon", "file", "kernel_stack", "slab", "sock", "shmem", "file_mapped", "file_dirty",
                   "file_writeback", "anon_thp", "inactive_anon", "active_anon", "inactive_file", "active_file",
                   "unevictable", "slab_reclaimable", "slab_unreclaimable", "pgfault", "pgmajfault",
                   "workingset_refault", "workingset_activate", "workingset_nodereclaim", "pgrefill", "pgscan",
                   "pgsteal", "pgactivate", "pgdeactivate", "pglazyfree", "pglazyfreed", "thp_fault_alloc",
                   "thp_collapse_alloc"]
_V2_CPU_KEYS = ["usage_usec", "user_usec", "system_usec", "nr_periods", "nr_throttled", "throttled_usec"]


class CgroupV2(Cgroup):
    url = V2_URL

    def __init__(self, path: str) -> None:
        self.path = path

    @classmethod
    def load(cls, pid: int) -> "CgroupV2":
        for line in _read(f"/proc/{pid}/cgroup").splitlines():
            if line.startswith("0::"):
                return cls(os.path.join(UNIFIED_MOUNTPOINT, line[3:].lstrip("/")))
        raise FileNotFoundError(f"no unified cgroup for pid {pid}")

    def memory_dir(self) -> str | None:
        return self.path

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def enable_controllers(self, mountpoint: str = UNIFIED_MOUNTPOINT) -> None:
        """Enable every controller the root offers in the subtree_control of each ancestor of
        this cgroup (not its own), as the Go shim does when an init process starts, so that
        nested cgroups get controllers too."""
        try:
            controllers = _read(os.path.join(mountpoint, "cgroup.controllers")).split()
        except OSError as err:
            log.error("failed to get root controllers", error=str(err))
            return
        if not controllers:
            return
        data = " ".join("+" + c for c in controllers)
        rel = os.path.relpath(self.path, mountpoint)
        parts = [] if rel == "." else rel.split(os.sep)
        last_error = None
        for i in range(len(parts)):
            directory = os.path.join(mountpoint, *parts[:i])
            try:
                with open(os.path.join(directory, "cgroup.subtree_control"), "w") as f:
                    f.write(data)
                last_error = None
            except OSError as err:
                last_error = err
        if last_error is not None:
            log.error("failed to enable controllers", controllers=controllers, error=str(last_error))

    def _file_uint(self, name: str) -> int:
        try:
            return _read_uint(os.path.join(self.path, name))
        except (OSError, ValueError):
            return 0

    def stat(self) -> bytes:
        if not os.path.isdir(self.path):
            raise FileNotFoundError(self.path)
        values: dict[str, int] = {}
        for name in ("cpu.stat", "memory.stat"):
            try:
                values.update(_kv(os.path.join(self.path, name)))
            except FileNotFoundError:
                pass
        m = Msg()
        pids = Msg()
        pids.u64(1, self._file_uint("pids.current"))
        pids.u64(2, self._file_uint("pids.max"))
        m.msg(1, pids)
        cpu = Msg()
        for num, key in enumerate(_V2_CPU_KEYS, 1):
            cpu.u64(num, values.get(key, 0))
        m.msg(2, cpu)
        mem = Msg()
        for num, key in enumerate(_V2_MEMORY_KEYS, 1):
            mem.u64(num, values.get(key, 0))
        mem.u64(32, self._file_uint("memory.current"))
        mem.u64(33, self._file_uint("memory.max"))
        mem.u64(34, self._file_uint("memory.swap.current"))
        mem.u64(35, self._file_uint("memory.swap.max"))
        m.msg(4, mem)
        rdma = Msg()
        for num, name in ((1, "rdma.current"), (2, "rdma.max")):
            for e in _rdma_entries(os.path.join(self.path, name)):
                rdma.msg(num, e)
        m.msg(5, rdma)
        io = Msg()
        for e in self._io_entries():
            io.msg(1, e)
        m.msg(6, io)
        for e in self._hugetlb():
            m.msg(7, e)
        try:
            events = _kv(os.path.join(self.path, "memory.events"))
        except FileNotFoundError:
            events = {}
        if events:
            me = Msg()
            for num, key in enumerate(("low", "high", "max", "oom", "oom_kill"), 1):
                me.u64(num, events.get(key, 0))
            m.msg(8, me)
        return m.bytes()

    def _io_entries(self) -> list[Msg]:
        out = []
        try:
            text = _read(os.path.join(self.path, "io.stat"))
        except OSError:
            return out
        for line in text.splitlines():
            parts = line.split(" ")
            if len(parts) < 2:
                continue
            majmin = parts[0].split(":")
            if len(majmin) != 2:
                continue
            try:
                major, minor = int(majmin[0]), int(majmin[1])
            except ValueError:
                return out
            e = Msg()
            e.u64(1, major)
            e.u64(2, minor)
            fields = {}
            for kv in parts[1:]:
                key, sep, value = kv.partition("=")
                if sep:
                    try:
                        fields[key] = int(value)
                    except ValueError:
                        pass
            for num, key in ((3, "rbytes"), (4, "wbytes"), (5, "rios"), (6, "wios")):
                e.u64(num, fields.get(key, 0))
            out.append(e)
        return out

    def _hugetlb(self) -> list[Msg]:
        found: dict[str, dict[str, int]] = {}
        try:
            names = os.listdir(self.path)
        except OSError:
            return []
        for name in names:
            if "hugetlb" in name and (name.endswith("max") or name.endswith("current")):
                parts = name.split(".")
                if len(parts) < 3:
                    continue
                try:
                    value = _read_uint(os.path.join(self.path, name))
                except (OSError, ValueError):
                    continue
                found.setdefault(parts[1], {})[parts[2]] = value
        out = []
        for size in sorted(found):
            e = Msg()
            e.u64(1, found[size].get("current", 0))
            e.u64(2, found[size].get("max", 0))
            e.str(3, size)
            out.append(e)
        return out


# --------------------------------------------------------------------------------------------
# OOM watching


_IN_MODIFY = 0x2
_libc = None


def _inotify():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


class OOMWatcher:
    """Calls `on_oom(container_id)` when a watched container's cgroup records an OOM kill."""

    def __init__(self, on_oom: Callable[[str], None]) -> None:
        self.on_oom = on_oom
        self._loop = asyncio.get_running_loop()
        self._watches: dict[str, Callable[[], None]] = {}

    def add(self, container_id: str, cgroup: Cgroup) -> None:
        self.remove(container_id)
        try:
            if isinstance(cgroup, CgroupV2):
                self._watches[container_id] = self._add_v2(container_id, cgroup)
            elif isinstance(cgroup, CgroupV1):
                self._watches[container_id] = self._add_v1(container_id, cgroup)
        except OSError as err:
            log.error("add cg to OOM monitor", id=container_id, error=str(err))

    def remove(self, container_id: str) -> None:
        stop = self._watches.pop(container_id, None)
        if stop is not None:
            stop()

    def close(self) -> None:
        for container_id in list(self._watches):
            self.remove(container_id)

    def _add_v1(self, container_id: str, cgroup: CgroupV1) -> Callable[[], None]:
        d = cgroup.memory_dir()
        if not d:
            raise OSError(f"no memory cgroup for {container_id}")
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            ofd = os.open(os.path.join(d, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            os.close(efd)
            raise
        try:
            with open(os.path.join(d, "cgroup.event_control"), "w") as f:
                f.write(f"{efd} {ofd}")
        except BaseException:
            os.close(efd)
            os.close(ofd)
            raise

        def readable() -> None:
            try:
                os.eventfd_read(efd)
            except BlockingIOError:
                return
            except OSError:
                stop()
                return
            if not cgroup.exists():  # the eventfd also fires when the cgroup is removed
                stop()
                return
            self.on_oom(container_id)

        closed = False

        def stop() -> None:
            nonlocal closed
            if closed:
                return
            closed = True
            self._loop.remove_reader(efd)
            os.close(efd)
            os.close(ofd)
            if self._watches.get(container_id) is stop:
                del self._watches[container_id]

        self._loop.add_reader(efd, readable)
        return stop

    def _add_v2(self, container_id: str, cgroup: CgroupV2) -> Callable[[], None]:
        libc = _inotify()
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        events = os.path.join(cgroup.path, "memory.events")
        if libc.inotify_add_watch(fd, os.fsencode(events), _IN_MODIFY) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch {events}: {os.strerror(err)}")
        last = 0
        try:
            last = _kv(events).get("oom_kill", 0)
        except OSError:
            pass

        def readable() -> None:
            nonlocal last
            try:
                os.read(fd, 4096)
            except BlockingIOError:
                return
            except OSError:
                stop()
                return
            try:
                current = _kv(events).get("oom_kill", 0)
            except OSError:  # the cgroup is gone
                stop()
                return
            if current > last:
                self.on_oom(container_id)
            if current > 0:
                last = current

        closed = False

        def stop() -> None:
            nonlocal closed
            if closed:
                return
            closed = True
            self._loop.remove_reader(fd)
            os.close(fd)
            if self._watches.get(container_id) is stop:
                del self._watches[container_id]

        self._loop.add_reader(fd, readable)
        return stop

