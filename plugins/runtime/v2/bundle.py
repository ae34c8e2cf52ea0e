"""A task's bundle on disk: `<state>/<namespace>/<id>` with config.json, an empty rootfs/ the shim
mounts the Create request's mounts on, and `work` -> `<root>/<namespace>/<id>` (the shim's
persistent working directory). The shim adds its own files (address, runtime, options.json,
init.pid, the `log` fifo the daemon reads) and the manager adds `shim-binary-path`.

Owns creating, loading and deleting bundles. Every function here blocks (mkdir, unmount, rmtree):
callers run them in a worker thread. Deletion is atomic per directory (renamed to a hidden name,
then removed), so a half-deleted bundle is never mistaken for a live one after a crash.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pycontainerd.core import errdefs, identifiers

CONFIG_FILENAME = "config.json"
SHIM_BINARY_PATH_FILE = "shim-binary-path"
ADDRESS_FILE = "address"
LOG_FIFO = "log"


@dataclass
class Bundle:
    id: str
    path: Path
    namespace: str

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"

    def delete(self) -> None:
        """Unmount whatever is left on rootfs/, then remove the bundle and its work dir."""
        try:
            work: Path | None = Path(os.readlink(self.path / "work"))
        except OSError:
            work = None
        unmount_all(self.rootfs)
        try:
            os.rmdir(self.rootfs)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise errdefs.Unknown(f"failed to remove bundle rootfs: {err}") from None
        first: Exception | None = None
        try:
            _atomic_delete(self.path)
        except OSError as err:
            first = err
        if work is not None:
            try:
                _atomic_delete(work)
            except OSError as err:
                raise errdefs.Unknown(f"failed to remove both bundle and workdir locations: {err}: {first}") from None
        if first is not None:
            raise errdefs.Unknown(f"failed to remove bundle {self.path}: {first}") from None


def new_bundle(root: Path, state: Path, namespace: str, id: str, spec: bytes) -> Bundle:
    """Create the bundle for task `id`: state dir (0700), rootfs/, work dir under root, config.json."""
    try:
        identifiers.validate(id)
    except errdefs.InvalidArgument as err:
        raise errdefs.InvalidArgument(f"invalid task id {id}: {err.message}") from None
    identifiers.validate(namespace)
    work = root / namespace / id
    bundle = Bundle(id=id, path=state / namespace / id, namespace=namespace)
    made: list[Path] = []
    try:
        (state / namespace).mkdir(mode=0o711, parents=True, exist_ok=True)
        try:
            bundle.path.mkdir(mode=0o700)
        except FileExistsError:
            raise errdefs.AlreadyExists(f"bundle {bundle.path}") from None
        made.append(bundle.path)
        _prepare_permissions(bundle.path, spec)
        (root / namespace).mkdir(mode=0o711, parents=True, exist_ok=True)
        bundle.rootfs.mkdir(mode=0o711)
        try:
            work.mkdir(mode=0o711)
        except FileExistsError:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(mode=0o711)
        made.append(work)
        os.symlink(work, bundle.path / "work")
        with open(bundle.path / CONFIG_FILENAME, "wb") as f:
            f.write(spec)
        os.chmod(bundle.path / CONFIG_FILENAME, 0o666 & ~_umask())
    except BaseException:
        for d in made:
            shutil.rmtree(d, ignore_errors=True)
        raise
    return bundle


def load_bundle(state: Path, namespace: str, id: str) -> Bundle:
    return Bundle(id=id, path=state / namespace / id, namespace=namespace)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _prepare_permissions(path: Path, spec: bytes) -> None:
    """With user namespaces, let the remapped root group into the bundle (0710), as containerd does."""
    gid = _remapped_gid(spec)
    if gid:
        os.chown(path, -1, gid)
        os.chmod(path, 0o710)


def _remapped_gid(spec: bytes) -> int:
    try:
        parsed = json.loads(spec or b"{}")
    except ValueError as err:
        raise errdefs.InvalidArgument(f"container spec is not valid JSON: {err}") from None
    linux = parsed.get("linux") if isinstance(parsed, dict) else None
    for mapping in (linux or {}).get("gidMappings") or []:
        if mapping.get("containerID", 0) == 0:
            return int(mapping.get("hostID", 0))
    return 0


def _atomic_delete(path: Path) -> None:
    hidden = path.parent / f".{path.name}"
    try:
        os.rename(path, hidden)
    except FileNotFoundError:
        return
    shutil.rmtree(hidden)


def unmount_all(path: Path) -> None:
    """Unmount everything mounted on or below `path` (none is fine, and needs no privilege)."""
    from pycontainerd.core import mount

    if mount.mounts_under(str(path)):
        mount.unmount_recursive(str(path))
