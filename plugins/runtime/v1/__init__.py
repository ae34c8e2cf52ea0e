"""Runtime v1 (`io.containerd.runtime.v1.linux`): the legacy linux runtime, one v1 shim per task
speaking containerd.runtime.linux.shim.v1.Shim over ttrpc (runtime.py, task.py, bundle.py,
shim_client.py). The `shim` subpackage is our Python v1 shim's own code (`containerd-shim-pyrunc-v1`),
not part of this plugin.

Config (`[plugins."io.containerd.runtime.v1.linux"]`), containerd's keys:
  shim          the shim binary, a name looked up on $PATH (and next to the daemon) or a path.
                Ours by default, "containerd-shim-pyrunc-v1"; "containerd-shim" runs containerd's Go shim.
                (containerd's own default is "containerd-shim".)
  runtime       the OCI runtime the shim runs, "runc" (a container's RuncOptions.runtime wins)
  runtime_root  where that runtime keeps its state ("" = the shim's default: /run/pycontainerd/runc for
                ours, /run/containerd/runc for containerd's Go containerd-shim)
  no_shim       run the shim inside the daemon: not supported here, the plugin fails to load
  shim_debug    start shims with -debug and copy their output to the daemon's stdout/stderr
"""
from __future__ import annotations

from dataclasses import dataclass

from pycontainerd import config as configmod
from pycontainerd.core.plugin import InitContext, PluginType, Registration

DEFAULT_SHIM = "containerd-shim-pyrunc-v1"
GO_SHIM = "containerd-shim"
LOAD_TIMEOUT = "io.containerd.timeout.shim.load"


@dataclass
class Config:
    shim: str = DEFAULT_SHIM
    runtime: str = "runc"
    runtime_root: str = ""
    no_shim: bool = False
    shim_debug: bool = False


def _container_options(ctx: InitContext):
    """(namespace, id) -> the container's runtime options, from the metadata store."""
    try:
        metadata = ctx.get(PluginType.METADATA)
    except Exception:  # noqa: BLE001
        return None

    def lookup(namespace: str, id: str):
        from pycontainerd.plugins.metadata.containers import ContainerStore

        return ContainerStore(metadata.db).get(namespace, id).runtime_options

    return lookup


def publish_binary() -> str:
    """What shims get as -containerd-binary (run as `BIN --address A publish --topic T --namespace
    NS`): our v1 shim's entry point, whose `publish` takes ~0.1 s, else `pycontainerd` (~0.6 s) — the
    Go shim sends its events one after the other and loses those still queued when it is killed."""
    from pycontainerd.plugins.runtime.v2.binary import publish_binary as daemon_binary

    from .runtime import resolve_shim

    try:
        return resolve_shim(DEFAULT_SHIM)
    except Exception:  # noqa: BLE001 - not installed: the daemon's own publish
        return daemon_binary()


async def init(ctx: InitContext):
    from pycontainerd.plugins.runtime.v2 import default_platform

    from .runtime import LinuxRuntime

    cfg: Config = ctx.config or Config()
    if cfg.no_shim:
        raise ValueError("no_shim = true (an in-process shim) is not supported; use a shim binary")
    os_, _, arch = default_platform().partition("/")
    ctx.meta.platforms = [{"os": os_, "architecture": arch}]
    load_timeout = 5.0
    if ctx.daemon_config is not None:
        try:
            load_timeout = configmod.timeout(ctx.daemon_config, LOAD_TIMEOUT)
        except Exception:  # noqa: BLE001 - an unknown key: the default
            pass
    runtime = LinuxRuntime(
        root=ctx.root, state=ctx.state, address=ctx.grpc_address, ttrpc_address=ctx.ttrpc_address,
        events=ctx.get(PluginType.EVENT, "exchange"), config=cfg, publish_binary=publish_binary(),
        container_options=_container_options(ctx), load_timeout=load_timeout)
    await runtime.load_existing()
    return runtime


async def close(runtime) -> None:
    await runtime.close()


def pycontainerd_register(registry) -> None:
    """Called from plugins/runtime's hook (nested packages are not discovered on their own)."""
    registry.register(Registration(PluginType.RUNTIME, "linux", init, requires=(
        PluginType.EVENT, PluginType.METADATA), config=Config, close=close))
