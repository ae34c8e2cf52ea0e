"""pyctr snapshots|snapshot: manage snapshots, as ctr's command of that name (same subcommands,
aliases, flags and output): list|ls, tree, info, usage, prepare, view, mounts|m|mount, commit,
delete|del|remove|rm, label, diff. `--snapshotter` (default $CONTAINERD_SNAPSHOTTER or
"overlayfs") may be given before or after the subcommand. Lists also take -q and --format json.
"""
from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from datetime import datetime, timezone
from typing import Any

from pycontainerd.api.client import Client, errdefs
from pycontainerd.api.client.snapshots import DEFAULT_SNAPSHOTTER

from .pyctr_output import TabWriter, label_args, print_json

GC_ROOT = "containerd.io/gc.root"
MEDIA_TYPE_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def _now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def human_bytes(size: int) -> str:
    """go-units CustomSize("%02.1f %s", size, 1024, B..YiB), as ctr's progress.Bytes."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB"]
    value, i = float(size), 0
    while value >= 1024 and i < len(units) - 1:
        value /= 1024
        i += 1
    return "%02.1f %s" % (value, units[i])


def _go_json(value: Any) -> str:
    """json.MarshalIndent(x, "", "    ") as ctr's PrintAsJSON."""
    import json
    return json.dumps(value, indent=4, ensure_ascii=False)


def _print_mounts(target: str, mounts) -> None:
    for m in mounts:
        print(f"mount -t {m.type} {m.source} {target} -o {','.join(m.options)}")


def _mounts_json(mounts) -> str:
    out = []
    for m in mounts:
        d: dict = {"Type": m.type, "Source": m.source}
        if m.options:
            d["Options"] = list(m.options)
        out.append(d)
    return _go_json(out)


# -- commands ----------------------------------------------------------------------------------

async def cmd_list(client: Client, args: argparse.Namespace) -> None:
    infos = await client.snapshots.list(args.filters, snapshotter=args.snapshotter)
    if args.format == "json":
        print_json([i.to_dict() for i in infos])
        return
    if args.quiet:
        for i in infos:
            print(i.name)
        return
    w = TabWriter(minwidth=1, tabwidth=8, padding=1)
    w.row("KEY", "PARENT", "KIND")
    for i in infos:
        w.row(i.name, i.parent, i.kind)
    w.flush()


async def cmd_tree(client: Client, args: argparse.Namespace) -> None:
    infos = await client.snapshots.list(snapshotter=args.snapshotter)
    nodes: dict[str, dict] = {}
    order: list[str] = []

    def add(name: str, parent: str) -> dict:
        node = nodes.get(name)
        if node is None:
            node = {"parent": parent, "children": []}
            nodes[name] = node
            order.append(name)
        else:
            node["parent"] = parent
        if parent:
            pn = nodes.get(parent) or add(parent, "")
            pn["children"].append(name)
        return node

    for i in infos:
        add(i.name, i.parent)

    def show(name: str, level: int) -> None:
        prefix = "  " * level + ("\\_" if level else "")
        print(f"{prefix} {name}")
        for child in nodes[name]["children"]:
            show(child, level + 1)

    for name in order:
        if not nodes[name]["parent"]:
            show(name, 0)


async def cmd_info(client: Client, args: argparse.Namespace) -> None:
    info = await client.snapshots.stat(args.key, snapshotter=args.snapshotter)
    print(_go_json(info.to_dict()))


async def cmd_usage(client: Client, args: argparse.Namespace) -> None:
    show = (lambda s: str(s)) if args.b else human_bytes
    rows = []
    if not args.keys:
        for i in await client.snapshots.list(snapshotter=args.snapshotter):
            rows.append((i.name, await client.snapshots.usage(i.name, snapshotter=args.snapshotter)))
    else:
        for key in args.keys:
            rows.append((key, await client.snapshots.usage(key, snapshotter=args.snapshotter)))
    if args.format == "json":
        print_json([{"key": k, **u.to_dict()} for k, u in rows])
        return
    w = TabWriter(minwidth=1, tabwidth=8, padding=1)
    w.row("KEY", "SIZE", "INODES")
    for key, usage in rows:
        w.row(key, show(usage.size), usage.inodes)
    w.flush()


async def cmd_prepare(client: Client, args: argparse.Namespace) -> None:
    mounts = await client.snapshots.prepare(args.key, args.parent or "", {GC_ROOT: _now_rfc3339()},
                                            snapshotter=args.snapshotter)
    if args.target:
        _print_mounts(args.target, mounts)
    if args.mounts:
        print(_mounts_json(mounts))


async def cmd_view(client: Client, args: argparse.Namespace) -> None:
    mounts = await client.snapshots.view(args.key, args.parent or "", snapshotter=args.snapshotter)
    if args.target:
        _print_mounts(args.target, mounts)
    if args.mounts:
        print(_mounts_json(mounts))


async def cmd_mounts(client: Client, args: argparse.Namespace) -> None:
    _print_mounts(args.target, await client.snapshots.mounts(args.key, snapshotter=args.snapshotter))


async def cmd_commit(client: Client, args: argparse.Namespace) -> None:
    await client.snapshots.commit(args.name, args.key, {GC_ROOT: _now_rfc3339()}, snapshotter=args.snapshotter)


async def cmd_remove(client: Client, args: argparse.Namespace) -> None:
    for key in args.keys:
        try:
            await client.snapshots.remove(key, snapshotter=args.snapshotter)
        except errdefs.Unavailable:
            raise
        except errdefs.ContainerdError as err:
            raise type(err)(f'failed to remove "{key}": {err}') from None


async def cmd_label(client: Client, args: argparse.Namespace) -> None:
    labels = label_args(args.labels)
    info = await client.snapshots.update(args.name, labels, snapshotter=args.snapshotter)
    print(",".join(f"{k}={v}" for k, v in sorted(info.labels.items())))


async def cmd_diff(client: Client, args: argparse.Namespace) -> None:
    """The diff between two snapshots (default: the first one's parent) as a layer, written to
    stdout; uses the daemon's Diff service and content store, under a temporary lease."""
    from pycontainerd.api.gen.containerd.services.content import v1 as content_api
    from pycontainerd.api.gen.containerd.services.diff import v1 as diff_api
    from pycontainerd.api.gen.containerd import types as pbtypes
    from pycontainerd.core.context import LEASE_HEADER, NAMESPACE_HEADER

    sn = args.snapshotter
    labels = label_args(args.label or [])
    if args.keep:
        labels[GC_ROOT] = _now_rfc3339()
    lease = await client.leases.create(labels={}, expire=24 * 3600)
    meta = {NAMESPACE_HEADER: client.namespace, LEASE_HEADER: lease.id}
    channel = await client._conn.channel()
    sapi = client.snapshots
    cleanup: list[str] = []

    async def call(stub_cls, method, req):
        from pycontainerd.api.client._base import translate_errors
        with translate_errors(client.address):
            return await getattr(stub_cls(channel, metadata=meta), method)(req)

    from pycontainerd.api.gen.containerd.services.snapshots import v1 as snap_api

    async def view(key: str, parent: str):
        resp = await call(snap_api.SnapshotsStub, "view",
                          snap_api.ViewSnapshotRequest(snapshotter=sn, key=key, parent=parent))
        cleanup.append(key)
        return resp.mounts

    async def mounts_of(key: str, view_key: str):
        info = await sapi.stat(key, snapshotter=sn)
        if info.kind == "Active":
            return (await call(snap_api.SnapshotsStub, "mounts", snap_api.MountsRequest(snapshotter=sn, key=key))).mounts
        return await view(view_key, key)

    def unique() -> str:
        return f"{int(time.time())}-{secrets.token_hex(4)}"

    try:
        if not args.idB:
            info = await sapi.stat(args.idA, snapshotter=sn)
            lower = await view(f"{info.parent}-parent-view-{unique()}", info.parent)
            upper = await mounts_of(args.idA, f"{args.idA}-view-{unique()}")
        else:
            lower = await mounts_of(args.idA, f"{args.idA}-view-key")
            upper = await mounts_of(args.idB, f"{args.idB}-view-key")
        req = diff_api.DiffRequest(left=[pbtypes.Mount(type=m.type, source=m.source, target=m.target,
                                                       options=list(m.options)) for m in lower],
                                   right=[pbtypes.Mount(type=m.type, source=m.source, target=m.target,
                                                        options=list(m.options)) for m in upper],
                                   media_type=args.media_type, ref=args.ref, labels=labels)
        desc = (await call(diff_api.DiffStub, "diff", req)).diff
        from pycontainerd.api.client._base import translate_errors
        out = sys.stdout.buffer
        with translate_errors(client.address):
            stub = content_api.ContentStub(channel, metadata=meta)
            async for chunk in stub.read(content_api.ReadContentRequest(digest=desc.digest)):
                out.write(chunk.data)
        out.flush()
    finally:
        for key in reversed(cleanup):
            try:
                await sapi.remove(key, snapshotter=sn)
            except errdefs.ContainerdError:
                pass
        try:
            await client.leases.delete(lease.id)
        except errdefs.ContainerdError:
            pass


# -- parser ------------------------------------------------------------------------------------

def register(sub) -> None:
    from .pyctr import _add_format, _command, _group

    snapshotter_default = os.environ.get("CONTAINERD_SNAPSHOTTER") or DEFAULT_SNAPSHOTTER
    grp = _group(sub, "snapshots", ["snapshot"], "manage snapshots")
    sub.choices["snapshots"].add_argument(
        "--snapshotter", default=snapshotter_default,
        help="snapshotter name (default: %(default)s) [$CONTAINERD_SNAPSHOTTER]")

    def cmd(name: str, func, help: str, aliases: tuple = ()) -> argparse.ArgumentParser:
        p = _command(grp, name, func, help, aliases)
        p.add_argument("--snapshotter", default=argparse.SUPPRESS, help="snapshotter name")
        return p

    p = cmd("list", cmd_list, "list snapshots", ("ls",))
    _add_format(p, "print only the snapshot keys")
    p.add_argument("filters", nargs="*", help="filters, e.g. kind==committed (pyctr only)")

    p = cmd("diff", cmd_diff, "get the diff of two snapshots. the default second snapshot is the "
            "first snapshot's parent.")
    p.add_argument("--media-type", default=MEDIA_TYPE_LAYER_GZIP, help="media type to use for creating diff")
    p.add_argument("--ref", default="", help="content upload reference to use")
    p.add_argument("--keep", action="store_true", help="keep diff content. up to creator to delete it.")
    p.add_argument("--label", action="append", help="labels to attach to the diff content (k=v)")
    p.add_argument("idA", metavar="IDA")
    p.add_argument("idB", metavar="IDB", nargs="?", default="")

    p = cmd("info", cmd_info, "get info about a snapshot")
    p.add_argument("key", metavar="KEY")

    p = cmd("mounts", cmd_mounts, "mount gets mount commands for the snapshots", ("m", "mount"))
    p.add_argument("target", metavar="TARGET")
    p.add_argument("key", metavar="KEY")

    for name, func, help in (("prepare", cmd_prepare, "prepare a snapshot from a committed snapshot"),
                             ("view", cmd_view, "create a read-only snapshot from a committed snapshot")):
        p = cmd(name, func, help)
        p.add_argument("-t", "--target", default="", help="mount target path, will print mount, if provided")
        p.add_argument("--mounts", action="store_true", help="Print out snapshot mounts as JSON")
        p.add_argument("key", metavar="KEY")
        p.add_argument("parent", metavar="PARENT", nargs="?", default="")

    p = cmd("commit", cmd_commit, "commit an active snapshot into the provided name")
    p.add_argument("name", metavar="KEY")
    p.add_argument("key", metavar="ACTIVE")

    p = cmd("delete", cmd_remove, "remove snapshots", ("del", "remove", "rm"))
    p.add_argument("keys", nargs="+", metavar="KEY")

    p = cmd("label", cmd_label, "add labels to content")
    p.add_argument("name", metavar="NAME")
    p.add_argument("labels", nargs="*", metavar="LABEL=VALUE")

    p = cmd("tree", cmd_tree, "display tree view of snapshot branches")

    p = cmd("usage", cmd_usage, "usage snapshots")
    p.add_argument("-b", action="store_true", help="display size in bytes")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format (default: table)")
    p.add_argument("keys", nargs="*", metavar="KEY")
