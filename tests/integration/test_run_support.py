"""Helpers for the containers/run tests (no tests here): a real daemon (ours or the stock
containerd) with busybox images imported by the stock ctr, pyctr and ctr runners, and a cleanup
that leaves nothing behind whatever a test did — tasks killed and deleted, containers and
snapshots removed, then runc state, shims, container processes (by cgroup), mounts, FIFOs and
the daemon's dirs.

Every environment works in namespaces of its own (cgroups /<ns>/<id>, runc state
<runc root>/<ns> under the Go shim's /run/containerd/runc or our shims' /run/pycontainerd/runc),
so nothing of other tests or other daemons is touched.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

import pytest

from daemons import RUNC_ROOTS, Daemon, kill_processes_under, unmount_under
from sharedtools import CTR, MAKE_IMAGE

RUNC = shutil.which("runc")
VENV_BIN = Path(sys.executable).parent
PYCTR = str(VENV_BIN / "pyctr")
CGROUP_ROOT = Path("/sys/fs/cgroup")
GO_SHIM = "io.containerd.runc.v2"
PY_SHIM = "io.containerd.pyrunc.v2"

requirements = [
    pytest.mark.root,
    pytest.mark.compat,
    pytest.mark.skipif(CTR is None, reason="the stock ctr is not installed"),
    pytest.mark.skipif(RUNC is None, reason="runc is not installed"),
    pytest.mark.skipif(not os.path.exists("/usr/bin/busybox"), reason="busybox-static is not installed"),
    pytest.mark.skipif(not MAKE_IMAGE.exists(), reason="the shared conformance tools are not there"),
]

IMAGE = "test/bb:latest"
USER_IMAGE = "test/bbuser:latest"
USER_PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\nnobody:x:65534:65534::/:/bin/false"
USER_GROUP = "root:x:0:\nstaff:x:1001:\nwheel:x:10:app,other\naudio:x:29:other,app\nnogroup:x:65534:"


def make_images(out: Path) -> dict[str, Path]:
    """The busybox image, and one whose config runs as user "app" with supplementary groups."""
    out.mkdir(parents=True, exist_ok=True)
    plain, user = out / "bb.tar", out / "bbuser.tar"
    subprocess.run([sys.executable, str(MAKE_IMAGE), str(plain)], check=True, capture_output=True)
    subprocess.run([sys.executable, str(MAKE_IMAGE), str(user), "--user", "app", "--cmd", "id",
                    "--file", f"etc/passwd={USER_PASSWD}", "--file", f"etc/group={USER_GROUP}"],
                   check=True, capture_output=True)
    return {IMAGE: plain, USER_IMAGE: user}


class RunEnv:
    """One daemon of `kind` in a namespace of this env's own, images imported."""

    def __init__(self, kind: str, images: dict[str, Path]):
        self.kind = kind
        self.daemon = Daemon(kind)
        self.ns = f"rt{uuid.uuid4().hex[:10]}"
        self.namespaces = {self.ns}
        self.fifo_dir = str(self.daemon.tmp / "fifo")
        self.images = images

    @property
    def address(self) -> str:
        return self.daemon.address

    def start(self) -> "RunEnv":
        self.daemon.start()
        for ref, tar in self.images.items():
            base = ref.rsplit(":", 1)[0]
            self.ctr("images", "import", "--base-name", base, str(tar), timeout=120)
        return self

    # -- running clients --------------------------------------------------------------------------
    def _run(self, argv: list[str], ns: Optional[str], check: bool, input, timeout: float,
             env: Optional[dict] = None) -> subprocess.CompletedProcess:
        ns = ns or self.ns
        self.namespaces.add(ns)
        text = not isinstance(input, bytes)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
        full_env.update(env or {})
        p = subprocess.run([argv[0], "-a", self.address, "-n", ns, *argv[1:]], capture_output=True,
                           text=text, input=input, timeout=timeout, env=full_env,
                           stdin=subprocess.DEVNULL if input is None else None)
        out = p.stdout + p.stderr if text else (p.stdout + p.stderr).decode(errors="replace")
        assert "Traceback" not in out, out
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {p.returncode}: {p.stderr}\n--- daemon log\n"
                                 f"{self.daemon.log()[-3000:]}")
        return p

    def pyctr(self, *args: str, ns: Optional[str] = None, check: bool = True, input=None,
              timeout: float = 90, env: Optional[dict] = None) -> subprocess.CompletedProcess:
        return self._run([PYCTR, *args], ns, check, input, timeout, env)

    def ctr(self, *args: str, ns: Optional[str] = None, check: bool = True, input=None,
            timeout: float = 90) -> subprocess.CompletedProcess:
        return self._run([CTR, *args], ns, check, input, timeout)

    def run(self, cid: str, *cmd: str, runtime: str, flags: tuple = (), **kw) -> subprocess.CompletedProcess:
        """`pyctr run --rm` (unless -d is among flags) with FIFOs under the env's dir."""
        extra = [] if "-d" in flags else ["--rm"]
        return self.pyctr("run", *extra, "--runtime", runtime, "--fifo-dir", self.fifo_dir, *flags, IMAGE,
                          cid, *cmd, **kw)

    def tasks(self, ns: Optional[str] = None) -> dict[str, tuple[int, str]]:
        rows = {}
        for line in self.ctr("tasks", "ls", ns=ns).stdout.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 3:
                rows[parts[0]] = (int(parts[1]), parts[2])
        return rows

    def wait_status(self, cid: str, status: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.tasks().get(cid, (0, ""))[1] == status:
                return
            time.sleep(0.1)
        raise AssertionError(f"task {cid} not {status}: {self.tasks()}")

    def container_ids(self, ns: Optional[str] = None) -> list[str]:
        return self.ctr("containers", "ls", "-q", ns=ns).stdout.split()

    def snapshot_keys(self, snapshotter: str = "overlayfs", ns: Optional[str] = None) -> list[str]:
        lines = self.ctr("snapshots", "--snapshotter", snapshotter, "ls", ns=ns).stdout.splitlines()[1:]
        return [line.split()[0] for line in lines if line.strip()]

    def info(self, cid: str, ns: Optional[str] = None) -> dict:
        return json.loads(self.ctr("containers", "info", cid, ns=ns).stdout)

    def fifos_left(self) -> list[str]:
        if not os.path.isdir(self.fifo_dir):
            return []
        return sorted(os.listdir(self.fifo_dir))

    # -- cleanup ----------------------------------------------------------------------------------
    def _api_cleanup(self) -> None:
        for ns in sorted(self.namespaces):
            with contextlib.suppress(Exception):
                for cid in self.ctr("tasks", "ls", "-q", ns=ns, check=False, timeout=30).stdout.split():
                    self.ctr("tasks", "kill", "-a", "-s", "SIGKILL", cid, ns=ns, check=False, timeout=30)
                    self.ctr("tasks", "rm", "-f", cid, ns=ns, check=False, timeout=30)
                for cid in self.ctr("containers", "ls", "-q", ns=ns, check=False, timeout=30).stdout.split():
                    self.ctr("containers", "rm", cid, ns=ns, check=False, timeout=30)

    def _kill_cgroups(self) -> None:
        """Kill whatever still runs in /<ns>/* cgroups of any hierarchy, then remove them."""
        if not CGROUP_ROOT.is_dir():
            return
        hierarchies = [h for h in CGROUP_ROOT.iterdir() if h.is_dir()] + [CGROUP_ROOT]
        for ns in self.namespaces:
            for h in hierarchies:
                base = h / ns
                if not base.is_dir():
                    continue
                for procs in base.rglob("cgroup.procs"):
                    with contextlib.suppress(OSError):
                        for pid in procs.read_text().split():
                            with contextlib.suppress(ProcessLookupError, ValueError):
                                os.kill(int(pid), signal.SIGKILL)
                for d in sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: len(str(p)), reverse=True):
                    with contextlib.suppress(OSError):
                        d.rmdir()
                with contextlib.suppress(OSError):
                    base.rmdir()

    def _shims(self) -> list[int]:
        needle = self.address.encode()
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                    if argv and b"shim" in argv[0] and needle in argv:
                        found.append(int(entry))
        return found

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            if self.daemon.proc is not None and self.daemon.proc.poll() is None:
                self._api_cleanup()
        self.daemon.stop()
        for ns, runc_root in itertools.product(self.namespaces, RUNC_ROOTS):
            root = runc_root / ns
            if root.is_dir():
                for state in root.iterdir():
                    subprocess.run([RUNC or "runc", "--root", str(root), "delete", "--force", state.name],
                                   capture_output=True, timeout=30)
                with contextlib.suppress(OSError):
                    shutil.rmtree(root)
        for pid in self._shims():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._kill_cgroups()
        kill_processes_under(self.daemon.tmp)
        unmount_under(self.daemon.tmp)
        self.daemon.cleanup()


@contextlib.contextmanager
def run_env(kind: str, images: dict[str, Path]):
    env = RunEnv(kind, images)
    try:
        env.start()
        yield env
    finally:
        env.cleanup()


def module_env(kind: str):
    """A module-scoped `env` fixture: a RunEnv on daemon `kind` with the test images imported."""
    @pytest.fixture(scope="module")
    def env(tmp_path_factory):
        with run_env(kind, make_images(tmp_path_factory.mktemp("images"))) as e:
            yield e
    return env


def spec_of(info: dict) -> dict:
    return info.get("Spec") or {}


def strip_ids(info: dict, cid: str) -> dict:
    """A `containers info` document with what depends on the id and the time taken out."""
    info = json.loads(json.dumps(info))
    for key in ("ID", "CreatedAt", "UpdatedAt"):
        info.pop(key, None)
    if info.get("SnapshotKey") == cid:
        info["SnapshotKey"] = "<id>"
    linux = (info.get("Spec") or {}).get("linux") or {}
    if "cgroupsPath" in linux:
        linux["cgroupsPath"] = re.sub(re.escape(cid) + "$", "<id>", linux["cgroupsPath"])
    return info
