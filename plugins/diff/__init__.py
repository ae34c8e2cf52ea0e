"""Differs: the walking differ (`io.containerd.differ.v1.walking`), the diff service that tries
the configured differs in order (`io.containerd.service.v1.diff-service`, config
`default = ["walking"]` as containerd's), and its gRPC API (`io.containerd.grpc.v1.diff`,
containerd.services.diff.v1.Diff: Apply and Diff).

Modules:
    walking.py   WalkingDiff: Apply (mount, read the blob from the namespaced content store,
                 verify it, extract it with core/archive) and Compare (mount both sides, write
                 the diff tar through a content writer)
    service.py   DiffService (plain Python, used in-process) and DiffGRPC (the adapter)

What other plugins use: `ctx.get(PluginType.SERVICE, "diff-service")` -> DiffService, whose
`apply(desc, mounts)` and `compare(lower, upper, media_type, ref, labels)` work in the request's
namespace and lease (core/context), take core.mount.Mount (or generated/dict mounts) and
plugins.diff.walking.Descriptor, and return a Descriptor.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pycontainerd.core.plugin import InitContext, PluginType, Registration, hookimpl

CONTENT_SERVICE = f"{PluginType.SERVICE}.content-service"
SERVICE_ID = "diff-service"


@dataclass
class DiffServiceConfig:
    default: list[str] = field(default_factory=lambda: ["walking"])
    """The differs to try, in order; the next one is tried while a differ answers "not implemented"."""


def _platform() -> dict[str, str]:
    try:
        from pycontainerd.plugins.snapshots import default_platform
        return default_platform()
    except Exception:  # pragma: no cover - snapshots always ships with us
        import platform
        return {"os": "linux", "architecture": platform.machine()}


async def init_walking(ctx: InitContext):
    from .walking import WalkingDiff

    content = ctx.get(PluginType.SERVICE, "content-service")
    ctx.meta.platforms.append(_platform())
    return WalkingDiff(content, temp_root=str(ctx.state))


async def init_service(ctx: InitContext):
    from .service import DiffService

    differs = ctx.get_all(PluginType.DIFF)
    cfg: DiffServiceConfig = ctx.config or DiffServiceConfig()
    ordered = []
    for name in cfg.default:
        if name not in differs:
            raise RuntimeError(f"needed differ not loaded: {name}")
        ordered.append(differs[name])
    return DiffService(ordered)


async def init_grpc(ctx: InitContext):
    from .service import DiffGRPC

    service = ctx.get_all(PluginType.SERVICE).get(SERVICE_ID)
    if service is None:
        raise RuntimeError("diff service not found")
    return DiffGRPC(service)


@hookimpl
def pycontainerd_register(registry):
    registry.register(Registration(PluginType.DIFF, "walking", init_walking, requires=(CONTENT_SERVICE,)))
    registry.register(Registration(PluginType.SERVICE, SERVICE_ID, init_service, requires=(PluginType.DIFF,),
                                   config=DiffServiceConfig))
    registry.register(Registration(PluginType.GRPC, "diff", init_grpc,
                                   requires=(f"{PluginType.SERVICE}.{SERVICE_ID}",)))
