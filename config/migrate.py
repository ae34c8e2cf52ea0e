"""Version 1 config files to version 2: plugin names become "type.id" URIs.

Version 1 names plugins by bare id ([plugins.cri], disabled_plugins = ["aufs"]); version 2 by
URI ([plugins."io.containerd.grpc.v1.cri"]). The renames are containerd's: its list of core plugin
ids, then "<id>-service" -> io.containerd.service.v1, then anything else taken as a gRPC plugin,
with a warning. Before that last guess, a registration with that id (when the caller has them)
names the plugin exactly.
"""
from __future__ import annotations

from typing import Any, Iterable

# The ids containerd 1.x configs used, and the plugin each names (containerd's own table).
V1_PLUGIN_URIS: dict[str, str] = {
    "cri": "io.containerd.grpc.v1.cri",
    "cgroups": "io.containerd.monitor.v1.cgroups",
    "linux": "io.containerd.runtime.v1.linux",
    "scheduler": "io.containerd.gc.v1.scheduler",
    "bolt": "io.containerd.metadata.v1.bolt",
    "task": "io.containerd.runtime.v2.task",
    "opt": "io.containerd.internal.v1.opt",
    "restart": "io.containerd.internal.v1.restart",
    "tracing": "io.containerd.internal.v1.tracing",
    "otlp": "io.containerd.tracing.processor.v1.otlp",
    "aufs": "io.containerd.snapshotter.v1.aufs",
    "btrfs": "io.containerd.snapshotter.v1.btrfs",
    "devmapper": "io.containerd.snapshotter.v1.devmapper",
    "native": "io.containerd.snapshotter.v1.native",
    "overlayfs": "io.containerd.snapshotter.v1.overlayfs",
    "zfs": "io.containerd.snapshotter.v1.zfs",
}


def v1_plugin_uri(name: str, registrations: Iterable[Any] = ()) -> tuple[str, bool]:
    """The version 2 URI for version 1 plugin name `name`, and whether it is only a guess.

    A name that already holds a dot is taken as a URI and kept.
    """
    if "." in name:
        return name, False
    if name in V1_PLUGIN_URIS:
        return V1_PLUGIN_URIS[name], False
    matches = [r for r in registrations if r.id == name]
    if len(matches) > 1:  # the same id under several types: the one that takes a config
        matches = [r for r in matches if r.config is not None]
    if len(matches) == 1:
        return matches[0].uri, False
    if name.endswith("-service"):
        return f"io.containerd.service.v1.{name}", False
    if name in ("windows", "windows-lcow"):
        return f"io.containerd.snapshotter.v1.{name}", True
    return f"io.containerd.grpc.v1.{name}", True
