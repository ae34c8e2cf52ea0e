"""Shared helpers for the side-by-side benchmarks: temp dirs, daemons, readiness, memory, load.

Owns: spawning and stopping the real containerd and our pycontainerd in throw-away root/state
dirs, waiting for them to answer, reading their memory from /proc, and generating unary gRPC
load from a separate process. Must not touch the project's code, /run/containerd,
/var/lib/containerd, or any daemon it did not start itself.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONTAINERD = shutil.which("containerd") or "/usr/bin/containerd"
PYCONTAINERD = REPO / ".venv" / "bin" / "pycontainerd"

VERSION_METHOD = "/containerd.services.version.v1.Version/Version"
NAMESPACES_LIST_METHOD = "/containerd.services.namespaces.v1.Namespaces/List"
NAMESPACE_HEADER = "containerd-namespace"

# ---------------------------------------------------------------------------------------------
# CPU placement


@dataclass(frozen=True)
class Placement:
    """Which CPUs the daemon and the client side (poller, load generator) run on.

    None means "not pinned": everything shares every CPU, as the scheduler pleases.
    """

    daemon_cpus: frozenset[int] | None
    client_cpus: frozenset[int] | None

    @classmethod
    def split(cls, pin: bool) -> "Placement":
        """Daemon on the first available CPU, clients on the others (when there are two+)."""
        cpus = sorted(os.sched_getaffinity(0))
        if not pin or len(cpus) < 2:
            return cls(None, None)
        return cls(frozenset(cpus[:1]), frozenset(cpus[1:]))

    @property
    def pinned(self) -> bool:
        return self.daemon_cpus is not None

    def describe(self) -> str:
        if not self.pinned:
            return "unpinned: daemon and clients share all CPUs"
        return (f"daemon pinned to CPU {fmt_cpus(self.daemon_cpus)}, poller and load generator "
                f"to CPU {fmt_cpus(self.client_cpus)}")


def fmt_cpus(cpus: frozenset[int] | None) -> str:
    return "all" if cpus is None else ",".join(map(str, sorted(cpus)))


@contextlib.contextmanager
def thread_affinity(cpus: frozenset[int] | None):
    """Run the block with the calling thread pinned to `cpus`; children forked in it inherit.

    Affinity on Linux is per thread, so this changes nothing for other threads, and it avoids
    subprocess's preexec_fn (unsafe once grpc has started its threads).
    """
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@contextlib.contextmanager
def raised_priority(nice: int):
    """Run the block (and every process it starts) at niceness `nice`; a list of notes.

    With kernel.sched_autogroup_enabled, CPU is first shared between sessions' autogroups and a
    process's nice only matters inside its own group, so the session's autogroup nice is set
    too and restored afterwards. Everything we start inherits both; other people's work on the
    machine then disturbs the measurement less, and both daemons get the same deal.
    """
    notes: list[str] = []
    autogroup = Path("/proc/self/autogroup")
    saved_group_nice = None
    if nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
            notes.append(f"niceness {nice}")
        except OSError as e:
            notes.append(f"could not set niceness {nice}: {e}")
        with contextlib.suppress(OSError):
            saved_group_nice = int(autogroup.read_text().split("nice")[1])
            autogroup.write_text(str(nice))
            notes.append(f"session autogroup niceness {nice} (was {saved_group_nice})")
    try:
        yield notes
    finally:
        if saved_group_nice is not None:
            with contextlib.suppress(OSError):
                autogroup.write_text(str(saved_group_nice))


# ---------------------------------------------------------------------------------------------
# Temp dirs


@contextlib.contextmanager
def short_tempdir(prefix: str):
    """A fresh dir under /tmp with a short name (unix socket paths must stay under 108 bytes).

    Removed afterwards, after lazily unmounting anything a daemon may have left mounted in it.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        remove_tree(path)


def mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mountpoint = line.split()[4].replace("\\040", " ")
            if mountpoint.startswith(prefix):
                found.append(mountpoint)
    return found


def remove_tree(path: Path) -> None:
    for mountpoint in sorted(mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", mountpoint], check=False, capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Daemons


@dataclass
class DaemonSpec:
    """How to launch one daemon in a given temp dir: argv, environment, where it listens."""

    name: str
    argv: list[str]
    address: Path
    log: Path
    env: dict[str, str | None] = field(default_factory=dict)   # overrides; None unsets
    notes: list[str] = field(default_factory=list)


def containerd_spec(tmp: Path, disable_cri: bool = True, binary: str = CONTAINERD) -> DaemonSpec:
    """The real containerd with everything kept inside `tmp`.

    CRI is disabled by default: our daemon has no CRI yet, and CRI's start-up (CNI config
    watch, sandbox image, streaming server) would otherwise be charged to containerd.
    """
    address = tmp / "c.sock"
    disabled = '["io.containerd.grpc.v1.cri"]' if disable_cri else "[]"
    config = tmp / "config.toml"
    config.write_text(f"""\
version = 2
root = "{tmp}/root"
state = "{tmp}/state"
disabled_plugins = {disabled}

[grpc]
  address = "{address}"

[ttrpc]
  address = "{address}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{tmp}/opt"
""")
    notes = ["temp config.toml: root, state, sockets and the opt plugin's dir in a temp dir"]
    if disable_cri:
        notes.append('disabled_plugins = ["io.containerd.grpc.v1.cri"] (our daemon has no CRI yet)')
    return DaemonSpec("containerd", [binary, "--config", str(config)], address,
                      tmp / "daemon.log", notes=notes)


def pycontainerd_spec(tmp: Path, pycache: Path | None = None,
                      binary: str = str(PYCONTAINERD)) -> DaemonSpec:
    """Our daemon with everything kept inside `tmp` (an explicit config so /etc is not read).

    Bytecode: with `pycache`, .pyc files are read from and written to that dir
    (PYTHONPYCACHEPREFIX), as an installed package has them; that keeps the repo free of
    __pycache__ dirs. Without it, nothing is cached or written: every module, ours and the
    site-packages ones alike, is compiled from source at each start (the worst case).
    """
    address = tmp / "d.sock"
    config = tmp / "config.toml"
    config.write_text(f"""\
version = 2
root = "{tmp}/root"
state = "{tmp}/state"

[grpc]
  address = "{address}"

[ttrpc]
  address = "{address}.ttrpc"
""")
    argv = [binary, "--config", str(config), "--root", str(tmp / "root"),
            "--state", str(tmp / "state"), "--address", str(address)]
    if pycache is not None:
        env = {"PYTHONPYCACHEPREFIX": str(pycache), "PYTHONDONTWRITEBYTECODE": None}
        bytecode = f"bytecode cached in {pycache} (PYTHONPYCACHEPREFIX)"
    else:
        env = {"PYTHONPYCACHEPREFIX": str(tmp / "no-pyc"), "PYTHONDONTWRITEBYTECODE": "1"}
        bytecode = "no bytecode cache: every module compiled from source"
    return DaemonSpec("pycontainerd", argv, address, tmp / "daemon.log", env,
                      ["temp config.toml + --root/--state/--address: all in a temp dir",
                       bytecode])


class DaemonError(RuntimeError):
    """The daemon did not start, died, or never answered."""


class NotifyListener:
    """A bound $NOTIFY_SOCKET: records the monotonic time the first READY=1 datagram arrives."""

    def __init__(self, path: Path):
        self.path = path
        self.ready_at: float | None = None
        self.messages: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and self.ready_at is None:
            try:
                data = self._sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            now = time.monotonic()
            text = data.decode(errors="replace")
            self.messages.append(text)
            if "READY=1" in text.splitlines():
                self.ready_at = now

    def wait(self, timeout: float) -> float | None:
        self._thread.join(timeout)
        return self.ready_at

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()


class Daemon:
    """One running daemon process started from a DaemonSpec; a context manager that stops it.

    It runs in its own process group so a Ctrl-C on the terminal reaches only the benchmark,
    which then stops the daemon itself (SIGTERM, then SIGKILL after a grace period). It stays
    in the benchmark's session, hence in its scheduler autogroup (see raised_priority).
    """

    def __init__(self, spec: DaemonSpec, cpus: frozenset[int] | None = None,
                 notify_socket: Path | None = None):
        self.spec = spec
        self.cpus = cpus
        self.notify_socket = notify_socket
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0

    def start(self) -> "Daemon":
        env = dict(os.environ)
        notify = None if self.notify_socket is None else str(self.notify_socket)
        for key, value in {**self.spec.env, "NOTIFY_SOCKET": notify}.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        log = open(self.spec.log, "wb")
        try:
            with thread_affinity(self.cpus):
                self.started_at = time.monotonic()
                self.proc = subprocess.Popen(self.spec.argv, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, env=env,
                                             process_group=0)
        finally:
            log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.spec.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None:
            raise DaemonError(f"{self.spec.name} exited with status {code}\n{self.log_tail()}")

    def wait_ready(self, timeout: float = 30.0) -> float:
        """Poll Version until it answers; the monotonic time of the first answer."""
        deadline = time.monotonic() + timeout
        last_error = "socket never appeared"
        while time.monotonic() < deadline:
            self.check_alive()
            if self.spec.address.exists():
                error = version_probe(self.spec.address)
                if error is None:
                    return time.monotonic()
                last_error = error
            time.sleep(0.002)
        raise DaemonError(f"{self.spec.name} did not answer Version within {timeout:.0f} s "
                          f"({last_error})\n{self.log_tail()}")

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "Daemon":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


_probe_lock = threading.Lock()


def version_probe(address: Path, timeout: float = 2.0) -> str | None:
    """One Version call on a fresh channel: None when it answered, else the error text.

    A fresh channel each time sidesteps grpc's reconnect back-off (1 s after a refused
    connection), which would otherwise blur the start-to-ready time.
    """
    import grpc

    with _probe_lock, grpc.insecure_channel(f"unix://{address}") as channel:
        call = channel.unary_unary(VERSION_METHOD, request_serializer=None,
                                   response_deserializer=None)
        try:
            call(b"", timeout=timeout)
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"
    return None


def warm_up_grpc() -> None:
    """Load and initialise grpc in this process so the first probe does not pay for it."""
    with contextlib.suppress(Exception):
        version_probe(Path("/nonexistent/socket"), timeout=0.1)


@dataclass
class StartTiming:
    to_version: float          # seconds from spawn to the first answered Version call
    to_notify: float | None    # seconds from spawn to READY=1 on $NOTIFY_SOCKET, None if never


def time_start(spec: DaemonSpec, tmp: Path, cpus: frozenset[int] | None,
               timeout: float = 30.0) -> StartTiming:
    """Spawn the daemon, time it to Version answering and to READY=1, then stop it."""
    listener = NotifyListener(tmp / "n.sock")
    try:
        with Daemon(spec, cpus, listener.path) as daemon:
            ready_at = daemon.wait_ready(timeout)
            notified_at = listener.wait(timeout=max(0.0, 1.0 - (time.monotonic() - ready_at)))
            return StartTiming(
                ready_at - daemon.started_at,
                None if notified_at is None else notified_at - daemon.started_at)
    finally:
        listener.close()


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# ---------------------------------------------------------------------------------------------
# /proc: process tree, memory, CPU time


def children_of(pid: int) -> list[int]:
    """Every descendant of pid (via /proc/PID/task/*/children)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                kids = [int(k) for k in (task / "children").read_text().split()]
                found.extend(kids)
                todo.extend(kids)
    return found


def smaps_rollup(pid: int) -> dict[str, int]:
    """The /proc/PID/smaps_rollup counters, in KiB (Rss, Pss, Private_Dirty, ...)."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[-1] == "kB":
            values[key.strip()] = int(parts[0])
    return values


@dataclass
class Memory:
    rss_kib: int
    pss_kib: int
    processes: int     # how many processes were summed (1 = the daemon alone)


def memory_of(pid: int, include_children: bool = True) -> Memory:
    """RSS and PSS of pid, plus its descendants when asked and when there are any.

    PSS sums meaningfully across processes; summed RSS counts shared pages more than once.
    """
    pids = [pid] + (children_of(pid) if include_children else [])
    rss = pss = 0
    counted = 0
    for p in pids:
        try:
            roll = smaps_rollup(p)
        except OSError:
            continue
        rss += roll.get("Rss", 0)
        pss += roll.get("Pss", 0)
        counted += 1
    return Memory(rss, pss, counted)


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of pid (all its threads) so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK   # utime, stime (fields 14, 15)


def cpu_busy_ticks() -> dict[int, tuple[int, int]]:
    """Per CPU: (busy, total) jiffies since boot, from /proc/stat (idle and iowait not busy)."""
    ticks = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            # user nice system idle iowait irq softirq steal
            numbers = [int(v) for v in values[:8]]
            total = sum(numbers)
            ticks[int(name[3:])] = (total - numbers[3] - numbers[4], total)
    return ticks


def cpu_busy_between(before: dict, after: dict, cpus) -> float:
    """How many of `cpus` were busy between two cpu_busy_ticks() samples (1.0 = one CPU)."""
    busy = 0.0
    for cpu in cpus:
        (b0, t0), (b1, t1) = before[cpu], after[cpu]
        busy += (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
    return busy


def background_load(seconds: float = 1.0) -> dict[int, float]:
    """Per-CPU busy share over `seconds` while we do nothing: other people's work."""
    before = cpu_busy_ticks()
    time.sleep(seconds)
    after = cpu_busy_ticks()
    return {cpu: cpu_busy_between(before, after, [cpu]) for cpu in after}


# ---------------------------------------------------------------------------------------------
# Unary load generator (runs in its own process)


@dataclass
class LoadResult:
    method: str
    concurrency: int
    seconds: float
    calls: int             # successful calls completed inside the measured window
    errors: int            # failed calls in warm-up + window
    first_error: str
    client_cpu: float      # load generator CPU seconds in the window / window length (1.0 = a core)
    daemon_cpu: float      # same for the observed daemon process (all its threads)
    cpu_busy: dict         # per CPU: busy share over the window, whoever used it

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0


def run_unary_load(address: Path, method: str, *, metadata: tuple[tuple[str, str], ...] = (),
                   request: bytes = b"", concurrency: int = 32, warmup: float = 1.0,
                   duration: float = 5.0, cpus: frozenset[int] | None = None,
                   observe_pid: int | None = None) -> LoadResult:
    """Hammer one unary method with `concurrency` callers from a fresh, separate process.

    The process (multiprocessing "spawn", so no grpc state is inherited across fork) is pinned
    to `cpus` when given; it uses grpc's C-core asyncio client with raw-bytes generic calls on
    one channel (one HTTP/2 connection, as ctr uses). Only calls completing in the `duration`
    window after `warmup` are counted. CPU use of the client and of `observe_pid` over the
    window tells who the bottleneck was.
    """
    ctx = multiprocessing.get_context("spawn")
    parent_end, child_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_load_process, name="loadgen", args=(
        child_end, str(address), method, metadata, request, concurrency, warmup, duration,
        None if cpus is None else sorted(cpus), observe_pid))
    proc.start()
    child_end.close()
    try:
        if not parent_end.poll(warmup + duration + 60):
            raise RuntimeError(f"load generator for {method} did not report")
        outcome = parent_end.recv()
        proc.join(10)
    finally:
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        parent_end.close()
    if isinstance(outcome, str):
        raise RuntimeError(f"load generator failed: {outcome}")
    return LoadResult(method=method, concurrency=concurrency, **outcome)


def _load_process(conn, address, method, metadata, request, concurrency, warmup, duration,
                  cpus, observe_pid) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the parent handles Ctrl-C and stops us
    try:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        import asyncio
        outcome = asyncio.run(_load(address, method, tuple(metadata), request, concurrency,
                                    warmup, duration, observe_pid))
    except BaseException as e:  # report anything to the parent, which prints it
        outcome = f"{type(e).__name__}: {e}"
    conn.send(outcome)
    conn.close()


async def _load(address, method, metadata, request, concurrency, warmup, duration, observe_pid):
    import asyncio

    import grpc

    ok = errors = 0
    first_error = ""
    stop = False

    async with grpc.aio.insecure_channel(f"unix://{address}") as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)

        async def caller() -> None:
            nonlocal ok, errors, first_error
            while not stop:
                try:
                    await call(request, metadata=metadata, timeout=30)
                    ok += 1
                except grpc.aio.AioRpcError as e:
                    errors += 1
                    if not first_error:
                        first_error = f"{e.code().name}: {e.details()}"
                    if errors > 1000:      # a broken method: no point hammering it further
                        await asyncio.sleep(0.01)

        await asyncio.wait_for(channel.channel_ready(), timeout=10)
        callers = [asyncio.create_task(caller()) for _ in range(concurrency)]
        await asyncio.sleep(warmup)
        ok0, t0 = ok, time.monotonic()
        me0, ticks0 = time.process_time(), cpu_busy_ticks()
        daemon0 = cpu_seconds(observe_pid) if observe_pid else 0.0
        await asyncio.sleep(duration)
        ok1, t1 = ok, time.monotonic()
        me1, ticks1 = time.process_time(), cpu_busy_ticks()
        daemon1 = cpu_seconds(observe_pid) if observe_pid else 0.0
        stop = True
        await asyncio.gather(*callers, return_exceptions=True)

    window = t1 - t0
    return dict(seconds=window, calls=ok1 - ok0, errors=errors, first_error=first_error,
                client_cpu=(me1 - me0) / window, daemon_cpu=(daemon1 - daemon0) / window,
                cpu_busy={cpu: cpu_busy_between(ticks0, ticks1, [cpu]) for cpu in ticks1})


def missing_binary(binary: str) -> str | None:
    """Why a daemon binary cannot even be attempted (None when it is an executable file)."""
    path = shutil.which(binary)
    if path is None:
        return f"{binary} does not exist or is not executable (for ours: pip install -e . in .venv)"
    return None


def eprint(*args) -> None:
    print(*args, file=sys.stderr, flush=True)
