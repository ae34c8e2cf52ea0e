"""Serve one of our snapshotter backends over the snapshots gRPC API on a unix socket, as a
separate process: what a `[proxy_plugins.NAME] type = "snapshot"` entry of pycontainerd (or of
containerd) points at.

    python -m pycontainerd.plugins.snapshots.serve --snapshotter native --root /var/lib/snap \
        --address /run/snap.sock

The backend is served as is (no namespaces: the daemon in front keeps those), whatever
`snapshotter` name the requests carry, like containerd's contrib/snapshotservice. Stops on
SIGTERM/SIGINT, removing its socket.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys

from pycontainerd.core import log as logmod
from pycontainerd.core.grpcserver import GRPCServer

from .base import Snapshotter
from .grpc import SnapshotsGRPC


def make_backend(kind: str, root: str, **options) -> Snapshotter:
    if kind == "native":
        from .native import NativeSnapshotter
        return NativeSnapshotter(root)
    if kind == "overlayfs":
        from .overlay import OverlaySnapshotter, check_overlay_support
        check_overlay_support(root)
        return OverlaySnapshotter(root, **options)
    raise SystemExit(f"unknown snapshotter {kind!r} (native or overlayfs)")


async def serve(kind: str, root: str, address: str, ready: asyncio.Event | None = None) -> None:
    backend = make_backend(kind, root)
    server = GRPCServer([SnapshotsGRPC(lambda name: backend)])
    await server.start_unix(address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        await server.close()
        await backend.close()
        with contextlib.suppress(OSError):
            os.unlink(address)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pycontainerd.plugins.snapshots.serve",
                                 description="Serve a snapshotter over the containerd snapshots gRPC API.")
    ap.add_argument("--snapshotter", default="native", choices=("native", "overlayfs"))
    ap.add_argument("--root", required=True, help="the snapshotter's root directory")
    ap.add_argument("--address", required=True, help="unix socket to listen on")
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    logmod.configure(args.log_level, "text")
    try:
        asyncio.run(serve(args.snapshotter, args.root, args.address))
    except OSError as e:
        sys.stderr.write(f"serve: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
