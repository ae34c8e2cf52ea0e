"""pyctr content: manage the content store, as ctr's command of that name (same subcommands,
aliases, flags and table layouts): list|ls, get, ingest, delete|del|remove|rm, label, active.
Lists also take -q and --format json. Owns argument parsing and output only.
"""
from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime, timezone
from typing import Optional

from pycontainerd.api.client import Client, errdefs
from pycontainerd.api.client.content import validate_digest

from .pyctr_output import TabWriter, label_args, print_json

log = logging.getLogger("pyctr")


def human_size(size: float) -> str:
    """go-units HumanSize: decimal units, 4 significant digits ("200MB", "1.049kB", "6B")."""
    units = ["B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB"]
    i = 0
    while size >= 1000 and i < len(units) - 1:
        size /= 1000.0
        i += 1
    return f"{size:.4g}{units[i]}"


def human_duration(seconds: float) -> str:
    """go-units HumanDuration ("Less than a second", "3 seconds", "About an hour", ...)."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = int(seconds / 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = int(seconds / 3600 + 0.5)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds / 3600) // 24 // 365} years"


class TabPaddedWriter(TabWriter):
    """Go's tabwriter with padchar '\t' (what ctr's content tables use): a column is as wide
    as its widest cell plus padding, rounded up to a multiple of tabwidth, and cells are
    padded with as many tabs as it takes to reach it."""

    def __init__(self) -> None:
        super().__init__(minwidth=1, tabwidth=8, padding=1, padchar="\t")

    def _write_lines(self, out: list[str], lines: list[list[str]], widths: list[int],
                     line0: int, line1: int) -> None:
        tab = self.tabwidth
        for i in range(line0, line1):
            for j, cell in enumerate(lines[i]):
                out.append(cell)
                if j < len(widths) and j < len(lines[i]) - 1:
                    cellw = (widths[j] + tab - 1) // tab * tab
                    out.append("\t" * ((cellw - len(cell) + tab - 1) // tab))
            if i + 1 < len(lines):
                out.append("\n")


def _since(ts: Optional[datetime]) -> float:
    if ts is None:
        return 0.0
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    return (datetime.now(timezone.utc) - ts).total_seconds()


def _labels_text(labels: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def parse_digest(value: str) -> str:
    """The digest, or InvalidArgument with ctr's (go-digest's) text."""
    return validate_digest(value)


async def cmd_list(client: Client, args: argparse.Namespace) -> None:
    infos = await client.content.list(args.filters)
    if args.format == "json":
        print_json([i.to_dict() for i in infos])
        return
    if args.quiet:
        for info in infos:
            print(info.digest)
        return
    w = TabPaddedWriter()
    w.println("DIGEST\tSIZE\tAGE\tLABELS")
    for info in infos:
        w.println(f"{info.digest}\t{human_size(info.size)}\t{human_duration(_since(info.created_at))}\t"
                  f"{_labels_text(info.labels) or '-'}")
    w.flush()


async def cmd_get(client: Client, args: argparse.Namespace) -> None:
    dgst = parse_digest(args.digest)
    await client.content.info(dgst)  # as ctr: NotFound before any output
    out = sys.stdout.buffer
    async for chunk in client.content.read(dgst):
        out.write(chunk)
    out.flush()


async def cmd_ingest(client: Client, args: argparse.Namespace) -> None:
    expected = args.expected_digest or ""
    if expected:
        parse_digest(expected)
    if not args.ref:
        raise errdefs.InvalidArgument("must specify a transaction reference")
    stdin = sys.stdin.buffer
    try:
        seekable = stdin.seekable()
    except (OSError, ValueError):
        seekable = False
    data = stdin if seekable else _unseekable(stdin)
    await client.content.write_blob(args.ref, data, total=args.expected_size, expected=expected)


def _unseekable(f):
    """Chunks of a pipe (write_blob then starts an interrupted ingest over)."""
    while True:
        chunk = f.read(1 << 20)
        if not chunk:
            return
        yield chunk


async def cmd_delete(client: Client, args: argparse.Namespace) -> None:
    first_error: Optional[Exception] = None
    for arg in args.digests:
        try:
            dgst = parse_digest(arg)
            await client.content.delete(dgst)
        except errdefs.NotFound:
            continue  # as ctr: not an error, not printed
        except errdefs.Unavailable:
            raise
        except errdefs.ContainerdError as err:
            first_error = first_error or err
            sys.stderr.write(f"pyctr: could not delete {arg}: {err}\n")
            continue
        print(dgst, flush=True)
    if first_error is not None:
        raise first_error


async def cmd_label(client: Client, args: argparse.Namespace) -> None:
    dgst = parse_digest(args.digest)
    labels = label_args(args.labels)
    if labels:
        info = await client.content.update(dgst, labels)
    else:
        info = await client.content.info(dgst)
    print(_labels_text(info.labels))


async def cmd_active(client: Client, args: argparse.Namespace) -> None:
    statuses = await client.content.list_statuses([args.match] if args.match else [])
    if args.format == "json":
        print_json([s.to_dict() for s in statuses])
        return
    if args.quiet:
        for st in statuses:
            print(st.ref)
        return
    w = TabPaddedWriter()
    w.println("REF\tSIZE\tAGE\t")
    for st in statuses:
        w.println(f"{st.ref}\t{human_size(st.offset)}\t{human_duration(_since(st.started_at))}\t")
    w.flush()


def register(sub) -> None:
    from .pyctr import _add_format, _command, _group

    content = _group(sub, "content", [], "manage content")
    p = _command(content, "active", cmd_active, "display active transfers")
    _add_format(p, "print only the refs")
    p.add_argument("match", nargs="?", default="", metavar="REGEXP",
                   help="a filter on the ingests, e.g. 'ref~=layer'")
    p = _command(content, "delete", cmd_delete, "permanently delete one or more blobs",
                 ("del", "remove", "rm"))
    p.add_argument("digests", nargs="*", metavar="DIGEST")
    p = _command(content, "get", cmd_get, "get the data for an object")
    p.add_argument("digest", metavar="DIGEST")
    p = _command(content, "ingest", cmd_ingest, "accept content into the store (from stdin)")
    p.add_argument("--expected-size", type=int, default=0, help="validate against provided size")
    p.add_argument("--expected-digest", default="", help="verify content against expected digest")
    p.add_argument("ref", nargs="?", default="", metavar="REF")
    p = _command(content, "list", cmd_list, "list all blobs in the store", ("ls",))
    _add_format(p, "print only the blob digest")
    p.add_argument("filters", nargs="*", help="filters, e.g. labels.team==a")
    p = _command(content, "label", cmd_label, "add labels to content")
    p.add_argument("digest", metavar="DIGEST")
    p.add_argument("labels", nargs="*", metavar="KEY=VALUE")
