"""Runtime v2 (`io.containerd.runtime.v2.task`): tasks run by shim binaries over the shim v2 Task
API. The manager (manager.py) starts and tracks shims, binary.py resolves runtime names to shim
binaries and runs their start/delete actions, bundle.py owns bundles on disk, shim.py talks to
one shim. The `runc` subpackage is the Python shim's own code, not part of this plugin.

Config (`[plugins."io.containerd.runtime.v2.task"]`): `platforms`, `sched_core` as containerd's,
and our `runtime_paths`, a table mapping a runtime name to its shim binary, e.g.
`runtime_paths = {"io.containerd.pyrunc.v2" = "/opt/pycontainerd/bin/containerd-shim-pyrunc-v2"}`.
"""
from __future__ import annotations

import logging
import platform
from dataclasses import dataclass, field

from pycontainerd import config as configmod
from pycontainerd.core.plugin import InitContext, PluginType, Registration

from .manager import PLUGIN_ID, TaskManager

_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "i386": "386",
         "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


def default_platform() -> str:
    machine = platform.machine().lower()
    return f"linux/{_ARCH.get(machine, machine)}"


@dataclass
class Config:
    platforms: list[str] = field(default_factory=lambda: [default_platform()])
    sched_core: bool = False
    runtime_paths: dict[str, str] = field(default_factory=dict)


def _parse_platform(text: str) -> dict[str, str]:
    parts = text.split("/")
    out = {"os": parts[0], "architecture": parts[1] if len(parts) > 1 else ""}
    if len(parts) > 2:
        out["variant"] = parts[2]
    return out


def _container_runtime_lookup(ctx: InitContext):
    """(namespace, id) -> the container's runtime name from the metadata store (containerd reads
    it there too, for bundles written before `shim-binary-path` existed)."""
    try:
        metadata = ctx.get(PluginType.METADATA)
    except Exception:
        return None

    def lookup(namespace: str, id: str) -> str | None:
        from pycontainerd.plugins.metadata.containers import ContainerStore

        return ContainerStore(metadata.db).get(namespace, id).runtime_name

    return lookup


def _timeouts(ctx: InitContext):
    cfg = ctx.daemon_config
    if cfg is None:
        return None
    return lambda key: configmod.timeout(cfg, key)


async def init(ctx: InitContext) -> TaskManager:
    cfg: Config = ctx.config or Config()
    ctx.meta.platforms = [_parse_platform(p) for p in cfg.platforms]
    events = ctx.get(PluginType.EVENT, "exchange")
    manager = TaskManager(
        root=ctx.root, state=ctx.state, address=ctx.grpc_address, ttrpc_address=ctx.ttrpc_address,
        events=events, timeout=_timeouts(ctx),
        container_runtime=_container_runtime_lookup(ctx), sched_core=cfg.sched_core,
        runtime_paths=cfg.runtime_paths, debug=logging.getLogger().isEnabledFor(logging.DEBUG))
    await manager.load_existing()
    return manager


async def close(manager: TaskManager) -> None:
    await manager.close()


def pycontainerd_register(registry) -> None:
    """Called from plugins/runtime's hook (nested packages are not discovered on their own)."""
    registry.register(Registration(PluginType.RUNTIME_V2, "task", init, requires=(
        PluginType.EVENT, PluginType.METADATA), config=Config, close=close))


__all__ = ["PLUGIN_ID", "TaskManager", "Config"]
