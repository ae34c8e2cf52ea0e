"""Mounting what snapshotters hand out: containerd's Mount {type, source, target, options},
mounted with the mount(2) syscall (through ctypes) and unmounted recursively or lazily.

Owns: `Mount` (with `from_any` for generated messages, dicts and Mount itself), `parse_options`
(mount(8) option words -> MS_* flags + filesystem data, as containerd's mount_linux.go),
`mount` / `mount_all`, `unmount` / `unmount_all` / `unmount_recursive`, `mounts_under`
(/proc/self/mountinfo), `temp_mount` (mount into a fresh temporary directory, always unmounted
and removed), and the overlay helpers `overlay_option`, `overlay_upperdir`, `overlay_lowerdirs`.
It must not know any snapshotter: callers pass the mounts they were given.

Every call here blocks (syscalls, retries on EBUSY): from the event loop, use
`asyncio.to_thread`. Failures raise `MountError` (an OSError carrying the errno) whose message
names the type, source, target and options, so a failing overlay explains itself.

Differences from containerd worth knowing:
- An overlay whose options exceed a page is mounted from the lowerdirs' common parent with
  relative lowerdirs (containerd's compactLowerdirOption); we fork a child that chdirs there and
  calls mount(2), as containerd does, so the daemon's cwd never changes.
- Propagation words (private, rprivate, shared, rshared, slave, rslave, unbindable,
  runbindable) are applied with a second mount(2) call, as containerd 1.7 does.
- `loop` and fuse helper types are not supported (no snapshotter of ours emits them):
  MountError(EINVAL).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

# mount(2) flags (linux/mount.h)
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SILENT = 0x8000
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24

# umount2(2) flags
MNT_FORCE = 0x1
MNT_DETACH = 0x2

_PROPAGATION = MS_SHARED | MS_PRIVATE | MS_SLAVE | MS_UNBINDABLE

# word -> (clear?, flag), containerd's table plus the propagation words
_FLAGS: dict[str, tuple[bool, int]] = {
    "async": (True, MS_SYNCHRONOUS),
    "atime": (True, MS_NOATIME),
    "bind": (False, MS_BIND),
    "defaults": (False, 0),
    "dev": (True, MS_NODEV),
    "diratime": (True, MS_NODIRATIME),
    "dirsync": (False, MS_DIRSYNC),
    "exec": (True, MS_NOEXEC),
    "mand": (False, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME),
    "nodev": (False, MS_NODEV),
    "nodiratime": (False, MS_NODIRATIME),
    "noexec": (False, MS_NOEXEC),
    "nomand": (True, MS_MANDLOCK),
    "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME),
    "nosuid": (False, MS_NOSUID),
    "rbind": (False, MS_BIND | MS_REC),
    "relatime": (False, MS_RELATIME),
    "remount": (False, MS_REMOUNT),
    "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY),
    "strictatime": (False, MS_STRICTATIME),
    "suid": (True, MS_NOSUID),
    "sync": (False, MS_SYNCHRONOUS),
    "private": (False, MS_PRIVATE),
    "rprivate": (False, MS_PRIVATE | MS_REC),
    "shared": (False, MS_SHARED),
    "rshared": (False, MS_SHARED | MS_REC),
    "slave": (False, MS_SLAVE),
    "rslave": (False, MS_SLAVE | MS_REC),
    "unbindable": (False, MS_UNBINDABLE),
    "runbindable": (False, MS_UNBINDABLE | MS_REC),
}

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

_libc: Any = None


def _lib() -> Any:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        lib.mount.restype = ctypes.c_int
        lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        lib.umount2.restype = ctypes.c_int
        _libc = lib
    return _libc


class MountError(OSError):
    """A mount or unmount failed; `errno` is the syscall's."""


@dataclass
class Mount:
    """One mount as containerd describes it: `mount -t TYPE SOURCE TARGET -o OPTIONS`.

    `target` is relative to the directory the mounts are applied to (usually empty)."""

    type: str
    source: str
    target: str = ""
    options: list[str] = field(default_factory=list)

    @classmethod
    def from_any(cls, m: Any) -> "Mount":
        """A Mount from a Mount, a generated containerd.types.Mount or a dict."""
        if isinstance(m, Mount):
            return m
        if isinstance(m, dict):
            return cls(m.get("type", ""), m.get("source", ""), m.get("target", ""), list(m.get("options") or []))
        return cls(getattr(m, "type", ""), getattr(m, "source", ""), getattr(m, "target", "") or "",
                   list(getattr(m, "options", None) or []))

    def to_dict(self) -> dict:
        return {"type": self.type, "source": self.source, "target": self.target, "options": list(self.options)}

    def command(self, target: str) -> str:
        """The mount(8) command line ctr prints for this mount."""
        return f"mount -t {self.type} {self.source} {target} -o {','.join(self.options)}"

    def mount(self, target: str) -> None:
        mount(self, target)


def parse_options(options: Iterable[str]) -> tuple[int, str, bool]:
    """(flags, data, loop) for mount(8) option words, as containerd's parseMountOptions:
    known words set or clear MS_* flags, "loop" asks for a loop device, the rest is data."""
    flags, data, loop = 0, [], False
    for o in options:
        known = _FLAGS.get(o)
        if known is not None and known[1]:
            clear, flag = known
            flags = flags & ~flag if clear else flags | flag
        elif known is not None:
            continue  # "defaults"
        elif o == "loop":
            loop = True
        else:
            data.append(o)
    return flags, ",".join(data), loop


def _describe(m: Mount, target: str) -> str:
    return f"mount -t {m.type} {m.source} {target} -o {','.join(m.options)}"


def _sys_mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    rc = _lib().mount(os.fsencode(source) if source else None, os.fsencode(target),
                      os.fsencode(fstype) if fstype else None, flags,
                      os.fsencode(data) if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _mount_at(chdir: str, source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """mount(2) from directory `chdir` (for relative lowerdirs), in a forked child so that the
    daemon's own working directory never changes."""
    if not chdir:
        _sys_mount(source, target, fstype, flags, data)
        return
    if not os.path.isdir(chdir):
        raise OSError(errno.ENOTDIR, f"failed to mountat: {chdir} is not a directory")
    lib = _lib()
    args = (os.fsencode(source) if source else None, os.fsencode(os.path.abspath(target)),
            os.fsencode(fstype) if fstype else None, flags, os.fsencode(data) if data else None)
    cdir = os.fsencode(chdir)
    pid = os.fork()
    if pid == 0:  # child: chdir, mount, report the errno as the exit status
        code = 0
        try:
            os.chdir(cdir)
            if lib.mount(*args) != 0:
                code = ctypes.get_errno() or errno.EIO
        except BaseException:
            code = errno.EIO
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        code = code if code > 0 else errno.EIO
        raise OSError(code, os.strerror(code))


def _compact_lowerdirs(options: Sequence[str]) -> tuple[str, list[str]]:
    """containerd's compactLowerdirOption: (common parent dir, options with relative lowerdirs),
    or ("", options) when nothing can be shortened."""
    idx = next((i for i, o in enumerate(options) if o.startswith("lowerdir=")), -1)
    if idx < 0:
        return "", list(options)
    dirs = options[idx][len("lowerdir="):].split(":")
    if len(dirs) == 1:
        return "", list(options)
    common = os.path.commonprefix(dirs)
    if not common:
        return "", list(options)
    common = os.path.dirname(common)
    if common in ("", "/"):
        return "", list(options)
    common += "/"
    rel = [d[len(common):] for d in dirs]
    out = [o for i, o in enumerate(options) if i != idx]
    out.append("lowerdir=" + ":".join(rel))
    return common, out


def mount(m: Mount | Any, target: str) -> None:
    """Mount `m` on `target` (a directory that exists). Raises MountError."""
    m = Mount.from_any(m)
    options = list(m.options)
    chdir = ""
    if m.type == "overlay" and sum(len(o) for o in options) >= PAGE_SIZE - 512:
        chdir, options = _compact_lowerdirs(options)
    flags, data, loop = parse_options(options)
    if loop:
        raise MountError(errno.EINVAL, f"{_describe(m, target)}: loop mounts are not supported")
    if m.type.startswith(("fuse.", "fuse3.")):
        raise MountError(errno.EINVAL, f"{_describe(m, target)}: fuse helper mounts are not supported")
    if len(data) > PAGE_SIZE:
        raise MountError(errno.EINVAL, f"{_describe(m, target)}: mount options is too long")
    oflags = flags & ~_PROPAGATION
    try:
        if not oflags & MS_REMOUNT or data:
            _mount_at(chdir, m.source, target, m.type, oflags, data)
        if flags & _PROPAGATION:
            _sys_mount("", target, "", flags & (_PROPAGATION | MS_REC | MS_SILENT), "")
        if oflags & (MS_BIND | MS_RDONLY) == MS_BIND | MS_RDONLY:
            # a bind mount ignores MS_RDONLY until it is remounted
            _sys_mount("", target, "", oflags | MS_REMOUNT, "")
    except OSError as e:
        raise MountError(e.errno, f"{_describe(m, target)}: {e.strerror}") from None


def mount_all(mounts: Iterable[Mount | Any], target: str) -> None:
    """Mount each of `mounts` on `target`, in order (containerd's mount.All). On failure the
    mounts already made are undone before MountError is raised."""
    done = 0
    try:
        for m in mounts:
            m = Mount.from_any(m)
            dest = os.path.join(target, m.target.lstrip("/")) if m.target else target
            mount(m, dest)
            done += 1
    except BaseException:
        if done:
            with contextlib.suppress(OSError):
                unmount_all(target, MNT_DETACH)
        raise


def _umount2(target: str, flags: int) -> int:
    """0, or the errno of umount2(2)."""
    if _lib().umount2(os.fsencode(target), flags) != 0:
        return ctypes.get_errno()
    return 0


def unmount(target: str, flags: int = 0) -> None:
    """Unmount the top mount on `target`, retrying on EBUSY for a while; not mounted (EINVAL) is
    fine. Raises MountError."""
    for _ in range(50):
        err = _umount2(target, flags)
        if err == errno.EBUSY:
            time.sleep(0.05)
            continue
        if err in (0, errno.EINVAL):
            return
        raise MountError(err, f"unmount {target}: {os.strerror(err)}")
    raise MountError(errno.EBUSY, f"failed to unmount target {target}: {os.strerror(errno.EBUSY)}")


def unmount_all(target: str, flags: int = 0) -> None:
    """Unmount every mount stacked on `target` (until it is not a mount point). A missing
    `target` is fine."""
    if not target or not os.path.lexists(target):
        return
    for _ in range(1000):
        err = _umount2(target, flags)
        if err == errno.EINVAL or err == errno.ENOENT:
            return
        if err == errno.EBUSY:
            time.sleep(0.05)
            continue
        if err:
            raise MountError(err, f"unmount {target}: {os.strerror(err)}")
    raise MountError(errno.EBUSY, f"{target}: too many stacked mounts")


_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field_: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field_)


def mounts_under(path: str) -> list[str]:
    """Mount points at or below `path` (from /proc/self/mountinfo), deepest last in mount order."""
    path = os.path.abspath(path).rstrip("/") or "/"
    prefix = path if path.endswith("/") else path + "/"
    found = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 5:
                    continue
                mp = _unescape(parts[4])
                if mp == path or mp.startswith(prefix):
                    found.append(mp)
    except FileNotFoundError:
        return []
    return found


def is_mountpoint(path: str) -> bool:
    return os.path.abspath(path).rstrip("/") in mounts_under(path)


def unmount_recursive(path: str, lazy: bool = False) -> None:
    """Unmount everything mounted at or below `path`, deepest first; with lazy=True use
    MNT_DETACH so busy mounts go as soon as they are no longer used."""
    flags = MNT_DETACH if lazy else 0
    for mp in sorted(set(mounts_under(path)), key=len, reverse=True):
        unmount_all(mp, flags)


@contextlib.contextmanager
def temp_mount(mounts: Iterable[Mount | Any], root: str | None = None,
               prefix: str = "pycontainerd-mount") -> Iterator[str]:
    """Mount `mounts` on a fresh temporary directory and yield its path; on exit everything
    below it is unmounted (lazily if needed) and the directory removed (containerd's
    WithTempMount)."""
    tmp = tempfile.mkdtemp(prefix=prefix + "-", dir=root)
    try:
        mount_all(mounts, tmp)
        yield tmp
    finally:
        try:
            unmount_recursive(tmp)
        except OSError:
            unmount_recursive(tmp, lazy=True)
        with contextlib.suppress(OSError):
            os.rmdir(tmp)
        if os.path.isdir(tmp) and not mounts_under(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def overlay_option(mounts: Iterable[Mount | Any], name: str) -> str | None:
    """The value of overlay option `name` (e.g. "upperdir") of the first overlay mount, or None."""
    for m in mounts:
        m = Mount.from_any(m)
        if m.type != "overlay":
            continue
        for o in m.options:
            if o.startswith(name + "="):
                return o[len(name) + 1:]
    return None


def overlay_upperdir(mounts: Iterable[Mount | Any]) -> str | None:
    """Where writes to these mounts land, for a differ that applies a layer in place:
    the overlay's `upperdir`, or the source of a single read-write bind mount (a snapshot without
    parents); None for read-only mounts and anything else."""
    mounts = [Mount.from_any(m) for m in mounts]
    upper = overlay_option(mounts, "upperdir")
    if upper is not None:
        return upper
    if len(mounts) == 1 and mounts[0].type == "bind" and "ro" not in mounts[0].options:
        return mounts[0].source
    return None


def overlay_lowerdirs(mounts: Iterable[Mount | Any]) -> list[str]:
    """The overlay's lowerdirs, topmost first ([] when there is no overlay mount)."""
    value = overlay_option(mounts, "lowerdir")
    return value.split(":") if value else []
