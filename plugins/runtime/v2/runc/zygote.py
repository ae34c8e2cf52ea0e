"""The zygote: one pre-imported template process that forks the shim servers.

A Python shim pays ~0.3 s and ~30 MB to import asyncio, betterproto, the generated API and our
ttrpc before it can serve; containerd starts one shim per container (ours, a server per group of
containers: see launch.py). The zygote pays that once:
it imports and warms up everything a server uses, moves every object it made into the GC's
permanent generation (`gc.freeze()`, so no collection in a child ever writes to those pages),
then waits on a unix socket. `start` (launch.zygote_fork) connects, passes the shim's listening
socket (SCM_RIGHTS) with the server's argv, working directory and environment; the zygote forks
twice so the server is orphaned at once (reparented like containerd's Go shims, whose `start`
process exits) and answers with its pid. Children share the zygote's pages copy-on-write, so a
shim's own memory (PSS) is what it touches after the fork.

In the server process (the grandchild): a process group of its own, the requester's working
directory and environment, fd 3 the listening socket, 0-2 on /dev/null, every other fd closed,
the requester's cgroups joined (the Go shim inherits containerd's), default signal dispositions,
and /proc/PID/cmdline rewritten to the argv a Go shim would show (`containerd-shim-pyrunc-v2
-namespace NS -id ID -address ADDR`): the zygote is started with a padded argv so there is room.

Only the zygote's own user may use it (SO_PEERCRED). There is one per daemon address (its cmdline
names it: `containerd-shim-pyrunc-v2 zygote SOCKET ADDRESS`). It exits after PYRUNC_ZYGOTE_IDLE
seconds (default 600) without a request, or as soon as its socket file is removed or replaced
(our daemon removes it when it stops: launch.stop_zygote).
"""
from __future__ import annotations

import errno
import gc
import json
import os
import select
import signal
import socket
import struct
import sys
import time

from . import launch

DEFAULT_IDLE = 600.0
_HEADER = struct.Struct(">I")
_MAX_REQUEST = 1 << 20


# --------------------------------------------------------------------------------------------
# /proc/self/cmdline and comm


def set_cmdline(args: list[str]) -> None:
    """Rewrite the process's argument area (what ps and /proc/PID/cmdline show) in place; the
    text is cut to the area's size, the rest filled with NULs."""
    try:
        with open("/proc/self/stat") as f:
            stat = f.read()
        fields = stat[stat.rindex(")") + 2:].split()
        arg_start, arg_end = int(fields[45]), int(fields[46])
        size = arg_end - arg_start
        data = "\0".join(args).encode() + b"\0"
        data = data[:size - 1] + b"\0" if len(data) > size else data + b"\0" * (size - len(data))
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(arg_start)
            mem.write(data)
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/proc/self/comm", "w") as f:
            f.write("containerd-shim")
    except OSError:
        pass


# --------------------------------------------------------------------------------------------
# Preloading


def preload() -> None:
    """Import and warm up everything a server uses, so that children only fork."""
    from . import server  # noqa: F401 - pulls in service, process, runc, stdio, reaper, publisher, cgroups
    server.warm_up()
    server.rehearse()


_fillers: list = []


def _malloc_stats() -> tuple[dict[int, int], int]:
    """Free blocks per small-object size class and unused pools, from sys._debugmallocstats()."""
    import re
    import tempfile

    fd, path = tempfile.mkstemp()
    saved = os.dup(2)
    try:
        os.dup2(fd, 2)
        sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
    with open(path) as f:
        text = f.read()
    os.unlink(path)
    free: dict[int, int] = {}
    for m in re.finditer(r"^\s+\d+\s+(\d+)\s+\d+\s+\d+\s+(\d+)$", text, re.M):
        free[int(m.group(1))] = int(m.group(2))
    m = re.search(r"^(\d+) unused pools \* (\d+) bytes", text, re.M)
    return free, int(m.group(1)) * int(m.group(2)) if m else 0


def fill_free_blocks() -> None:
    """Use up the free blocks of the zygote's partly used obmalloc pools (and its unused pools).

    Otherwise a child's first allocations land in those pools, all over pages it shares with
    the zygote, and each such allocation copies a page. With them full, children allocate in
    arenas of their own. Costs the zygote only memory it had mapped already."""
    try:
        free, unused_bytes = _malloc_stats()
    except (OSError, AttributeError):
        return
    for size, count in free.items():
        if not count:
            continue
        if size == 16:
            _fillers.append([object() for _ in range(count)])
        elif size == 32:
            _fillers.append([float(i) + 0.5 for i in range(count)])
        elif size > 33:
            _fillers.append([bytes(size - 33) for _ in range(count)])
    if unused_bytes:
        _fillers.append([bytes(512 - 33) for _ in range(unused_bytes // 512)])
    gc.freeze()


# --------------------------------------------------------------------------------------------
# The server side of a request, in the forked grandchild


def _close_fds_except(keep: set[int]) -> None:
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def join_cgroups_of(pid: int) -> None:
    """Move this process into every cgroup `pid` is in (v1 hierarchies and the unified one)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return
    mounts = launch._cgroup_mounts()
    me = str(os.getpid())
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _hid, controllers, path = parts
        wanted = set(controllers.split(",")) if controllers else set()
        for mountpoint, fstype, options in mounts:
            if not controllers:
                if fstype != "cgroup2":
                    continue
            elif fstype != "cgroup" or not wanted.issubset(options):
                continue
            try:
                with open(os.path.join(mountpoint, path.lstrip("/"), "cgroup.procs"), "w") as f:
                    f.write(me)
            except OSError:
                pass
            break


def _become_server(conn: socket.socket, listen_fd: int, request: dict, peer_pid: int, zygote_sock: int) -> None:
    code = 1
    try:
        # a SIGTERM before the server's handlers are up must wait for them, not kill it half-made
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        os.setpgid(0, 0)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        os.close(zygote_sock)
        if listen_fd != 3:
            os.dup2(listen_fd, 3, inheritable=False)
            os.close(listen_fd)
        _close_fds_except({0, 1, 2, 3, conn.fileno()})
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        argv = [str(a) for a in request["argv"]]
        flags = launch.parse_flags(argv[1:])
        conn.sendall(json.dumps({"pid": os.getpid()}).encode())
        conn.close()
        if peer_pid:  # after answering: `start` need not wait for it
            join_cgroups_of(peer_pid)
        sys.argv = argv
        set_cmdline(argv)
        from . import server
        code = server.main(flags, listen_fd=3)
    except BaseException as err:  # noqa: BLE001 - a forked child must never return into the zygote
        try:
            sys.stderr.write(f"pyrunc zygote child: {err!r}\n")
        except Exception:
            pass
    finally:
        os._exit(code if isinstance(code, int) else 1)


# --------------------------------------------------------------------------------------------
# The zygote's loop


def _recv_request(conn: socket.socket) -> tuple[dict, int]:
    """(request, the passed fd) from one connection."""
    fds: list[int] = []
    buf = b""
    need = _HEADER.size
    length = None
    while True:
        data, ancdata, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(struct.calcsize("i") * 4))
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(cdata) - len(cdata) % struct.calcsize("i")
                fds.extend(struct.unpack(f"{usable // 4}i", cdata[:usable]))
        if not data:
            raise ValueError("connection closed mid-request")
        buf += data
        if length is None and len(buf) >= need:
            (length,) = _HEADER.unpack(buf[:need])
            if length > _MAX_REQUEST:
                raise ValueError("request too large")
        if length is not None and len(buf) >= need + length:
            break
    for extra in fds[1:]:
        os.close(extra)
    if not fds:
        raise ValueError("no listening socket passed")
    return json.loads(buf[need:need + length]), fds[0]


def _serve_one(conn: socket.socket, zygote_sock: int) -> None:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    peer_pid, peer_uid, _gid = struct.unpack("3i", creds)
    if peer_uid != os.geteuid():
        conn.sendall(json.dumps({"error": "permission denied"}).encode())
        return
    conn.settimeout(10)
    request, listen_fd = _recv_request(conn)
    try:
        child = os.fork()
        if child == 0:
            try:
                grandchild = os.fork()
                if grandchild == 0:
                    _become_server(conn, listen_fd, request, peer_pid, zygote_sock)
            finally:
                os._exit(0)
        os.waitpid(child, 0)
    finally:
        os.close(listen_fd)


def _socket_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _listen(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as err:
        if err.errno != errno.EADDRINUSE:
            raise
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale
            else:
                raise  # a live zygote owns it
        sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def main(flags: launch.Flags) -> int:
    if not flags.args:
        sys.stderr.write("zygote: socket path required\n")
        return 2
    path = os.path.abspath(flags.args[0])
    owner = flags.args[1] if len(flags.args) > 1 and flags.args[1] != "-" else ""
    os.chdir("/")  # started from some bundle: nothing may be relative to it
    set_cmdline([os.path.basename(launch.self_executable()), "zygote", path, *([owner] if owner else [])])
    idle = launch.env_number(os.environ, "PYRUNC_ZYGOTE_IDLE", DEFAULT_IDLE)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        preload()
        sock = _listen(path)
    except BaseException as err:
        os.write(1, f"error: {err}\n".encode())
        return 1
    identity = _socket_identity(path)
    gc.collect()
    gc.freeze()
    fill_free_blocks()
    os.write(1, b"ready\n")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)
    os.close(devnull)
    last = time.monotonic()
    try:
        while True:
            ready, _, _ = select.select([sock], [], [], min(5.0, max(idle, 0.1)))
            while True:  # reap the intermediate children
                try:
                    pid, _ = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
            if ready:
                try:
                    conn, _ = sock.accept()
                except OSError:
                    continue
                last = time.monotonic()
                with conn:
                    try:
                        _serve_one(conn, sock.fileno())
                    except Exception as err:  # noqa: BLE001 - one bad request must not end the zygote
                        try:
                            conn.sendall(json.dumps({"error": str(err) or type(err).__name__}).encode())
                        except OSError:
                            pass
                continue
            if time.monotonic() - last > idle or _socket_identity(path) != identity:
                break
    finally:
        if _socket_identity(path) == identity:
            for leftover in (path, path + ".lock"):
                try:
                    os.unlink(leftover)
                except OSError:
                    pass
        sock.close()
    return 0
