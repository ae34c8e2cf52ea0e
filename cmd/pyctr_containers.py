"""pyctr containers|container|c: manage containers, as ctr's command of that name: create,
list|ls (-q, --format json), info (--spec), delete|del|remove|rm (--keep-snapshot), label.

Output matches ctr's: the CONTAINER/IMAGE/RUNTIME table, `info` as ctr's indented JSON, `label`
printing the labels afterwards as k=v,... (in Go's random map order there; sorted here).
"""
from __future__ import annotations

import argparse
import json
import sys

from pycontainerd.api.client import Client, errdefs
from pycontainerd.api.client.containers import remove_container

from .pyctr_output import TabWriter, label_args, print_json


def _err(message: str) -> None:
    sys.stderr.write(f"pyctr: {message}\n")
    sys.stderr.flush()


def print_go_json(value) -> None:
    """ctr's PrintAsJSON: json.MarshalIndent with four spaces."""
    sys.stdout.write(json.dumps(value, indent=4, ensure_ascii=False) + "\n")
    sys.stdout.flush()


async def cmd_create(client: Client, args: argparse.Namespace) -> None:
    from .pyctr_run import container_from_args

    await container_from_args(client, args, run=False)


async def cmd_list(client: Client, args: argparse.Namespace) -> None:
    containers = await client.containers.list(args.filters)
    if args.format == "json":
        print_json([c.to_dict() for c in containers])
        return
    if args.quiet:
        for c in containers:
            print(c.id)
        return
    w = TabWriter(minwidth=4, tabwidth=8, padding=4)
    w.row("CONTAINER", "IMAGE", "RUNTIME")
    for c in containers:
        w.row(c.id, c.image or "-", c.runtime.name)
    w.flush()


async def cmd_info(client: Client, args: argparse.Namespace) -> None:
    if not args.id:
        raise errdefs.InvalidArgument("container id must be provided")
    c = await client.containers.get(args.id)
    info = c.to_dict()
    if args.spec:
        print_go_json(info.get("Spec"))
        return
    print_go_json(info)


async def cmd_delete(client: Client, args: argparse.Namespace) -> None:
    if not args.ids:
        raise errdefs.InvalidArgument("must specify at least one container to delete")
    first: errdefs.ContainerdError | None = None
    for cid in args.ids:
        try:
            await _delete_one(client, cid, not args.keep_snapshot)
        except errdefs.Unavailable:
            raise
        except errdefs.ContainerdError as err:
            if first is None:
                first = err
            _err(f"failed to delete container {json.dumps(cid)}: {err}")
    if first is not None:
        from .pyctr import CommandFailed

        raise CommandFailed()


async def _delete_one(client: Client, cid: str, snapshot_cleanup: bool) -> None:
    """ctr's deleteContainer: a created or stopped task goes first; a running one refuses."""
    await client.containers.get(cid)
    try:
        st = await client.tasks.get(cid)
    except (errdefs.NotFound, errdefs.Unimplemented):
        st = None
    if st is not None:
        if st.status not in ("stopped", "created"):
            raise errdefs.FailedPrecondition(f"cannot delete a non stopped container: {{{st.status} "
                                             f"{st.exit_status} {st.exited_at or '0001-01-01 00:00:00 +0000 UTC'}}}")
        await client.tasks.delete(cid)
        from pycontainerd.api.client import cio

        cio.remove_fifos(st.io_config)
    await remove_container(client, cid, snapshot_cleanup=snapshot_cleanup)


async def cmd_label(client: Client, args: argparse.Namespace) -> None:
    if not args.id:
        raise errdefs.InvalidArgument("container id must be provided")
    labels = await client.containers.set_labels(args.id, label_args(args.labels))
    print(",".join(f"{k}={v}" for k, v in sorted(labels.items())))


def register(sub) -> None:
    from .pyctr import _add_format, _command, _group
    from .pyctr_run import add_container_flags

    grp = _group(sub, "containers", ["c", "container"], "manage containers")
    p = _command(grp, "create", cmd_create, "create container")
    p.usage = "%(prog)s [flags] IMAGE|ROOTFS CONTAINER [COMMAND] [ARG...]"
    add_container_flags(p, run=False)

    p = _command(grp, "list", cmd_list, "list containers", ("ls",))
    _add_format(p, "print only the container id")
    p.add_argument("filters", nargs="*", help="filters, e.g. labels.tier==web or image==NAME")

    p = _command(grp, "info", cmd_info, "get info about a container")
    p.add_argument("--spec", action="store_true", help="only display the spec")
    p.add_argument("id", metavar="CONTAINER", nargs="?", default="")

    p = _command(grp, "delete", cmd_delete, "delete one or more existing containers", ("del", "remove", "rm"))
    p.add_argument("--keep-snapshot", action="store_true", help="do not clean up snapshot with container")
    p.add_argument("ids", metavar="CONTAINER", nargs="*")

    p = _command(grp, "label", cmd_label, "set and clear labels for a container")
    p.add_argument("id", metavar="CONTAINER", nargs="?", default="")
    p.add_argument("labels", nargs="*", metavar="KEY=VALUE")
