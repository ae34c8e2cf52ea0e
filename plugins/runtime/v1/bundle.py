"""A v1 task's bundle: `<state>/<namespace>/<id>` (0700) with config.json and rootfs/, and its work
dir `<root>/<namespace>/<id>` (the shim's -workdir, where its log fifos live). containerd's
runtime/v1/linux/bundle.go. The runtime adds `address` and `shim.pid` when it starts the shim;
the shim (runc) adds init.pid, log.json and its own files.

Every function here blocks (mkdir, unmount, rmtree): run them in a worker thread. Deleting
unmounts whatever is still mounted under rootfs/ first — never rmtree through a live mount — then
removes both directories atomically (renamed to a hidden name, then removed).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pycontainerd.core import errdefs, identifiers
from pycontainerd.core import mount as mountlib

CONFIG_FILENAME = "config.json"
ADDRESS_FILE = "address"
SHIM_PID_FILE = "shim.pid"
INIT_PID_FILE = "init.pid"


@dataclass
class Bundle:
    id: str
    namespace: str
    path: Path
    work_dir: Path

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"

    def address(self) -> str:
        """The shim's address from the `address` file; the pre-1.4 abstract socket when there is
        none (containerd's decideShimAddress)."""
        try:
            return (self.path / ADDRESS_FILE).read_text().strip()
        except OSError:
            return f"@/containerd-shim/{self.namespace}/{self.id}/shim.sock"

    def read_pid(self, name: str) -> int:
        """The pid in file `name` (init.pid, shim.pid), 0 when absent or unreadable."""
        try:
            return int((self.path / name).read_text().strip())
        except (OSError, ValueError):
            return 0

    def delete(self) -> None:
        """Unmount rootfs, remove the shim's socket file, the bundle and the work dir."""
        try:
            address = (self.path / ADDRESS_FILE).read_text().strip()
        except OSError:
            address = ""
        if address.startswith("unix://"):
            try:
                os.unlink(address[len("unix://"):])
            except OSError:
                pass
        if mountlib.mounts_under(str(self.rootfs)):
            try:
                mountlib.unmount_recursive(str(self.rootfs))
            except OSError:
                mountlib.unmount_recursive(str(self.rootfs), lazy=True)
        if mountlib.mounts_under(str(self.rootfs)):
            raise errdefs.Unknown(f"failed to remove bundle {self.path}: rootfs is still mounted")
        first: Exception | None = None
        try:
            _atomic_delete(self.path)
        except OSError as err:
            first = err
        try:
            _atomic_delete(self.work_dir)
        except OSError as err:
            if first is None:
                raise errdefs.Unknown(f"failed to remove work dir {self.work_dir}: {err}") from None
            raise errdefs.Unknown(f"Failed to remove both bundle and workdir locations: {err}: {first}") from None
        if first is not None:
            raise errdefs.Unknown(f"failed to remove bundle {self.path}: {first}") from None


def load_bundle(state: Path, root: Path, namespace: str, id: str) -> Bundle:
    return Bundle(id=id, namespace=namespace, path=state / namespace / id, work_dir=root / namespace / id)


def new_bundle(state: Path, root: Path, namespace: str, id: str, spec: bytes) -> Bundle:
    """Create the bundle and work dir of task `id`; AlreadyExists when the bundle is there."""
    identifiers.validate(namespace)
    bundle = load_bundle(state, root, namespace, id)
    (state / namespace).mkdir(mode=0o711, parents=True, exist_ok=True)
    try:
        bundle.path.mkdir(mode=0o700)
    except FileExistsError:
        raise errdefs.AlreadyExists(f"bundle {bundle.path}") from None
    made_work = False
    try:
        _prepare_permissions(bundle.path, spec)
        if not bundle.work_dir.is_dir():
            bundle.work_dir.mkdir(mode=0o711, parents=True)
            made_work = True
        bundle.rootfs.mkdir(mode=0o711)
        fd = os.open(bundle.path / CONFIG_FILENAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(spec)
    except BaseException:
        shutil.rmtree(bundle.path, ignore_errors=True)
        if made_work:
            shutil.rmtree(bundle.work_dir, ignore_errors=True)
        raise
    return bundle


def write_file(path: Path, data: str) -> None:
    """Atomically (temp file, O_SYNC, rename), as the shim client's writeFile."""
    tmp = path.parent / f".{path.name}"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_SYNC | os.O_CLOEXEC, 0o666)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)
    os.rename(tmp, path)


def _prepare_permissions(path: Path, spec: bytes) -> None:
    """With user namespaces, let the remapped root group into the bundle (0710), as containerd does."""
    try:
        parsed = json.loads(spec or b"{}")
    except ValueError as err:
        raise errdefs.InvalidArgument(f"container spec is not valid JSON: {err}") from None
    linux = parsed.get("linux") if isinstance(parsed, dict) else None
    for mapping in (linux or {}).get("gidMappings") or []:
        if mapping.get("containerID", 0) == 0:
            gid = int(mapping.get("hostID", 0))
            if gid:
                os.chown(path, -1, gid)
                os.chmod(path, 0o710)
            return


def _atomic_delete(path: Path) -> None:
    hidden = path.parent / f".{path.name}"
    if os.path.lexists(hidden):
        shutil.rmtree(hidden, ignore_errors=True)
    try:
        os.rename(path, hidden)
    except FileNotFoundError:
        return
    shutil.rmtree(hidden)
