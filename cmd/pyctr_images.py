"""pyctr images|image|i: manage images, as ctr's command of that name (same aliases, flags and
output): list|ls, check, tag, delete|del|remove|rm, label. Lists also take --format json.

Import, export, pull, push and the like come from another module listed after this one in
COMMAND_MODULES: it adds its subcommands to the parsers `images_group(sub)` returns.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from pycontainerd.api.client import Client, errdefs
from pycontainerd.api.client.images import DEFAULT_SNAPSHOTTER, Image

from .pyctr_output import TabWriter, label_args, print_json
from .pyctr_snapshots import human_bytes


def _err(message: str) -> None:
    sys.stderr.write(f"pyctr: {message}\n")
    sys.stderr.flush()


def _labels_column(labels: dict[str, str]) -> str:
    return ",".join(sorted(f"{k}={v}" for k, v in labels.items())) or "-"


# -- commands ----------------------------------------------------------------------------------

async def _size_and_platforms(client: Client, image: Image) -> tuple[int, str]:
    """What `ctr images ls` shows in SIZE and PLATFORMS; failures are reported as ctr logs them
    (the size counted so far, "-" for platforms)."""
    size, err = await client.images.size_partial(image)
    if err is not None:
        _err(f"failed calculating size for image {image.name}: {err}")
    try:
        found = await client.images.platforms(image)
    except errdefs.ContainerdError as e:
        _err(f"failed resolving platform for image {image.name}: {e}")
        return size, "-"
    return size, ",".join(sorted({str(p) for p in found})) or "-"


async def cmd_list(client: Client, args: argparse.Namespace) -> None:
    try:
        images = await client.images.list(args.filters)
    except errdefs.Unavailable:
        raise
    except errdefs.ContainerdError as err:
        raise type(err)(f"failed to list images: {err}") from None
    if args.quiet:
        for image in images:
            print(image.name)
        return
    if args.format == "json":
        out = []
        for image in images:
            size, platforms = await _size_and_platforms(client, image)
            out.append({**image.to_dict(), "size": size,
                        "platforms": [] if platforms == "-" else platforms.split(",")})
        print_json(out)
        return
    w = TabWriter(minwidth=1, tabwidth=8, padding=1)
    w.row("REF", "TYPE", "DIGEST", "SIZE", "PLATFORMS", "LABELS")
    for image in images:
        size, platforms = await _size_and_platforms(client, image)
        w.row(image.name, image.target.media_type, image.target.digest, human_bytes(size), platforms,
              _labels_column(image.labels))
    w.flush()


async def cmd_check(client: Client, args: argparse.Namespace) -> None:
    try:
        images = await client.images.list(args.filters)
    except errdefs.Unavailable:
        raise
    except errdefs.ContainerdError as err:
        raise type(err)(f"failed listing images: {err}") from None
    if not images:
        if args.format == "json":
            print_json([])
        return  # ctr prints no header either
    failed = False
    rows = []
    for image in images:
        status, size, complete = "", "-", True
        try:
            result = await client.images.check(image)
        except errdefs.Unavailable:
            raise
        except errdefs.ContainerdError as err:
            _err(f"unable to check {image.name}: {err}")
            failed, status, complete, result = True, "error", False, None
        if result is not None:
            status, complete = result.status, result.complete
            present = human_bytes(sum(d.size for d in result.present))
            size = (f"{present}/{human_bytes(sum(d.size for d in result.required))}" if result.available
                    else f"{present}/?")
        try:
            unpacked = await client.images.unpacked(image, args.snapshotter)
        except errdefs.Unavailable:
            raise
        except errdefs.ContainerdError as err:
            _err(f"unable to check unpack for {image.name}: {err}")
            failed, unpacked = True, False
        rows.append((image, status, size, unpacked, complete))
    if args.quiet:
        for image, *_, complete in rows:
            if complete:
                print(image.name)
    elif args.format == "json":
        print_json([{"name": image.name, "media_type": image.target.media_type, "digest": image.target.digest,
                     "status": status, "size": size, "unpacked": unpacked, "complete": complete}
                    for image, status, size, unpacked, complete in rows])
    else:
        w = TabWriter(minwidth=1, tabwidth=8, padding=1)
        w.row("REF", "TYPE", "DIGEST", "STATUS", "SIZE", "UNPACKED")
        for image, status, size, unpacked, _ in rows:
            # ctr's rows end without a tab after UNPACKED
            w.write(f"{image.name}\t{image.target.media_type}\t{image.target.digest}\t{status}\t{size}\t"
                    f"{'true' if unpacked else 'false'}\n")
        w.flush()
    if failed:
        from .pyctr import CommandFailed
        raise CommandFailed()


async def cmd_tag(client: Client, args: argparse.Namespace) -> None:
    from .pyctr import UsageError
    if not args.source:
        raise UsageError("please provide an image reference to tag from")
    if not args.targets:
        raise UsageError("please provide an image reference to tag to")
    for target in args.targets:
        await client.images.tag(args.source, target, force=args.force)
        print(target, flush=True)


async def cmd_remove(client: Client, args: argparse.Namespace) -> None:
    first_error = None
    last = len(args.names) - 1
    for i, name in enumerate(args.names):
        try:
            # as ctr: --sync waits for the collection once, with the last image
            await client.images.delete(name, sync=args.sync and i == last)
        except errdefs.NotFound:
            _err(f"warning: {name}: image not found")
            continue
        except errdefs.Unavailable:
            raise
        except errdefs.ContainerdError as err:
            _err(f"unable to delete {name}: {err}")
            first_error = first_error or err
            continue
        print(name, flush=True)
    if first_error is not None:
        from .pyctr import CommandFailed
        raise CommandFailed()


async def cmd_label(client: Client, args: argparse.Namespace) -> None:
    from .pyctr import UsageError
    if not args.name:
        raise UsageError("please specify an image")
    image = await client.images.set_labels(args.name, label_args(args.labels), replace=args.replace_all)
    print(",".join(f"{k}={v}" for k, v in sorted(image.labels.items())))


# -- parser ------------------------------------------------------------------------------------

def images_group(sub) -> Any:
    """The subparsers of the `images` group, created unless some module already did. Other
    command modules add their images subcommands (import, export, pull, push, ...) to what this
    returns, in any order."""
    from .pyctr import _group

    parser = sub.choices.get("images")
    if parser is not None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                return action
    return _group(sub, "images", ["image", "i"], "manage images")


def register(sub) -> None:
    from .pyctr import _add_format, _command

    grp = images_group(sub)

    p = _command(grp, "check", cmd_check, "check existing images to ensure all content is available locally")
    _add_format(p, "print only the ready image refs (fully downloaded and unpacked)")
    p.add_argument("--snapshotter", default=os.environ.get("CONTAINERD_SNAPSHOTTER") or DEFAULT_SNAPSHOTTER,
                   help="snapshotter name (default: %(default)s) [$CONTAINERD_SNAPSHOTTER]")
    p.add_argument("filters", nargs="*", metavar="FILTER", help="filters, e.g. name==docker.io/library/busybox:latest")

    p = _command(grp, "list", cmd_list, "list images known to the daemon", ("ls",))
    _add_format(p, "print only the image refs")
    p.add_argument("filters", nargs="*", metavar="FILTER", help='filters, e.g. "labels.env==prod"')

    p = _command(grp, "delete", cmd_remove, "remove one or more images by reference", ("del", "remove", "rm"))
    p.add_argument("--sync", action="store_true", help="synchronously remove image and all associated resources")
    p.add_argument("names", nargs="+", metavar="REF")

    p = _command(grp, "tag", cmd_tag, "tag an image")
    p.add_argument("--force", action="store_true", help="force target_ref to be created, regardless if it already "
                   "exists")
    p.add_argument("source", metavar="SOURCE_REF", nargs="?", default="")
    p.add_argument("targets", metavar="TARGET_REF", nargs="*")

    p = _command(grp, "label", cmd_label, "set and clear labels for an image")
    p.add_argument("-r", "--replace-all", action="store_true", help="replace all labels")
    p.add_argument("name", metavar="NAME", nargs="?", default="")
    p.add_argument("labels", nargs="*", metavar="KEY=VALUE")
