"""Snapshotters: the backends (`io.containerd.snapshotter.v1.overlayfs` and `.native`), the
namespaced snapshots service (`io.containerd.service.v1.snapshots-service`) and its gRPC API
(`io.containerd.grpc.v1.snapshots`); proxy backends come from config (proxy.py).

Modules:
    base.py      the contract (Kind, Info, Usage, Snapshotter) and shared rules
    storage.py   the sqlite metastore of the local backends
    overlay.py   overlayfs backend          native.py   native (copying) backend
    fsutil.py    disk usage, tree copy      proxy.py    gRPC client backend + registrations
    service.py   namespaced + evented service (over plugins/metadata/snapshots.py)
    grpc.py      the gRPC adapter           serve.py    a backend as a standalone gRPC server

Backend API (what GC and the differ use; every method a coroutine, keys are backend keys):
    stat(key) -> Info            walk(filters=()) -> list[Info] (sorted by name)
    prepare/view(key, parent, labels) -> list[Mount]     mounts(key) -> list[Mount]
    commit(name, key, labels)    remove(key)  (FailedPrecondition while it has children)
    update(info, fieldpaths) -> Info          usage(key) -> Usage(size, inodes)
    cleanup()  (overlayfs: frees directories of removed snapshots; native: Unimplemented)
    gc_lock  the namespaced layer's lock: hold `async with backend.gc_lock.exclusive():` while
             sweeping, so no backend snapshot whose row is on its way gets removed
Get them with `ctx.get_all(PluginType.SNAPSHOT)` (name -> backend); the namespaced ones with
`ctx.get(PluginType.SERVICE, "snapshots-service").namespaced[name]` (see
plugins/metadata/snapshots.py for `backend_keys()`, `prune()` and `exclusive()`). Rows of the
`snapshots` table map (namespace, snapshotter, key) to `backend_key`; a backend snapshot no row
names is garbage (children before parents).

For a differ: the mounts of an active overlay snapshot are one overlay mount whose `upperdir=`
option is where the changes land (core.mount.overlay_upperdir(mounts)); a snapshot without a
parent is a single rw bind mount of that directory (overlay_upperdir returns its source too).
"""
from __future__ import annotations

import platform as _platform

from pycontainerd.core.plugin import InitContext, PluginSkip, PluginType, Registration, hookimpl

from .native import NativeConfig
from .overlay import OverlayConfig

SERVICE_ID = "snapshots-service"

_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "armv6l": "arm", "i686": "386",
         "i386": "386", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


def default_platform() -> dict[str, str]:
    """linux/<GOARCH> of this machine, as containerd's platforms.DefaultSpec()."""
    machine = _platform.machine()
    p = {"os": "linux", "architecture": _ARCH.get(machine, machine)}
    if machine == "aarch64":
        p["variant"] = "v8"
    elif machine.startswith("armv"):
        p["variant"] = machine[3:5].rstrip("l")
    return p


async def init_overlay(ctx: InitContext):
    from .overlay import OverlaySnapshotter, check_overlay_support
    ctx.meta.platforms.append(default_platform())
    cfg: OverlayConfig = ctx.config or OverlayConfig()
    root = cfg.root_path or str(ctx.root)
    ctx.meta.exports["root"] = root
    try:
        check_overlay_support(root)
    except OSError as e:
        raise PluginSkip(f"overlayfs is not supported on {root}: {e}") from None
    return OverlaySnapshotter(root, upperdir_label=cfg.upperdir_label, sync_remove=cfg.sync_remove,
                              mount_options=cfg.mount_options)


async def init_native(ctx: InitContext):
    from .native import NativeSnapshotter
    ctx.meta.platforms.append(default_platform())
    cfg: NativeConfig = ctx.config or NativeConfig()
    root = cfg.root_path or str(ctx.root)
    ctx.meta.exports["root"] = root
    return NativeSnapshotter(root)


async def close_backend(sn) -> None:
    await sn.close()


async def init_service(ctx: InitContext):
    from .service import SnapshotsService
    md = ctx.get(PluginType.METADATA)
    return SnapshotsService(md.db, ctx.get_all(PluginType.SNAPSHOT), ctx.events)


async def init_grpc(ctx: InitContext):
    from .grpc import SnapshotsGRPC
    svc = ctx.get(PluginType.SERVICE, SERVICE_ID)
    return SnapshotsGRPC(svc.get)


@hookimpl
def pycontainerd_register(registry):
    registry.register(Registration(PluginType.SNAPSHOT, "native", init_native, config=NativeConfig,
                                   close=close_backend))
    registry.register(Registration(PluginType.SNAPSHOT, "overlayfs", init_overlay, config=OverlayConfig,
                                   close=close_backend))
    registry.register(Registration(PluginType.SERVICE, SERVICE_ID, init_service,
                                   requires=(PluginType.METADATA, PluginType.SNAPSHOT)))
    registry.register(Registration(PluginType.GRPC, "snapshots", init_grpc,
                                   requires=(PluginType.SERVICE,)))
