"""pyctr: the ctr-like command line client, a thin shell over pycontainerd.api.client.

Commands, aliases, global flags and table layouts follow the stock ctr (containerd 1.6) so the two
read alike; every list also takes -q and --format json. Failures print one line,
`pyctr: <message>`, on stderr and exit 1 (Ctrl-C exits 130 quietly); never a traceback.
Owns argument parsing and output only; all daemon access goes through the client library.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import platform
import sys
from datetime import timezone
from typing import Any, Awaitable, Callable, Optional

from pycontainerd.api.client import DEFAULT_ADDRESS, Client, errdefs
from pycontainerd.api.client.types import rfc3339

from .pyctr_output import TabWriter, label_args, parse_duration, print_json

PROG = "pyctr"
log = logging.getLogger("pyctr")


class UsageError(Exception):
    """A bad command line: reported like any other error (one line, exit 1)."""


class CommandFailed(Exception):
    """The command already reported its errors on stderr; exit 1 without another line."""


def _err(message: str) -> None:
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.stderr.flush()


# -- commands ----------------------------------------------------------------------------------

def _client_version() -> str:
    try:
        from importlib.metadata import version
        return version("pycontainerd")
    except Exception:  # not installed as a distribution
        return "unknown"


async def cmd_version(client: Client, args: argparse.Namespace) -> None:
    client_info = {"version": _client_version(), "revision": "-",
                   "python_version": platform.python_version()}
    if args.format == "json":
        v, server = await client.version(), await client.server()
        print_json({"client": client_info,
                    "server": {**v.to_dict(), **server.to_dict()}})
        return
    print("Client:")
    print("  Version: ", client_info["version"])
    print("  Revision:", client_info["revision"])
    print("  Python version:", client_info["python_version"])
    print("")
    sys.stdout.flush()
    v = await client.version()
    print("Server:")
    print("  Version: ", v.version)
    print("  Revision:", v.revision)
    server = await client.server()
    print("  UUID:", server.uuid)


async def cmd_plugins_list(client: Client, args: argparse.Namespace) -> None:
    plugins = await client.plugins(args.filters)
    if args.format == "json":
        print_json([p.to_dict() for p in plugins])
        return
    if args.quiet:
        for p in plugins:
            print(p.id)
        return
    w = TabWriter(minwidth=4, tabwidth=8, padding=4)
    if args.detailed:
        for i, p in enumerate(plugins):
            if i:
                w.println("\t\t\t")
            w.println("Type:\t", p.type)
            w.println("ID:\t", p.id)
            if p.requires:
                w.println("Requires:\t")
                for r in p.requires:
                    w.println("\t", r)
            if p.platforms:
                w.println("Platforms:\t", ",".join(p.platform_names))
            if p.exports:
                w.println("Exports:\t")
                for k, v in p.exports.items():
                    w.println("\t", k, "\t", v)
            if p.capabilities:
                w.println("Capabilities:\t", ",".join(p.capabilities))
            if p.init_err is not None:
                w.println("Error:\t")
                w.println("\t Code:\t", p.init_err.code_name)
                w.println("\t Message:\t", p.init_err.message)
        w.flush()
        return
    w.row("TYPE", "ID", "PLATFORMS", "STATUS")
    for p in plugins:
        w.row(p.type, p.id, ",".join(p.platform_names) or "-", p.status)
    w.flush()


async def cmd_namespaces_create(client: Client, args: argparse.Namespace) -> None:
    await client.namespaces.create(args.name, label_args(args.labels))


async def cmd_namespaces_list(client: Client, args: argparse.Namespace) -> None:
    namespaces = await client.namespaces.list()
    if args.format == "json":
        print_json([ns.to_dict() for ns in namespaces])
        return
    if args.quiet:
        for ns in namespaces:
            print(ns.name)
        return
    w = TabWriter(minwidth=1, tabwidth=8, padding=1)
    w.row("NAME", "LABELS")
    for ns in namespaces:
        w.row(ns.name, ",".join(f"{k}={v}" for k, v in sorted(ns.labels.items())))
    w.flush()


async def cmd_namespaces_label(client: Client, args: argparse.Namespace) -> None:
    labels = label_args(args.labels)
    if labels:
        await client.namespaces.update(args.name, labels)


async def cmd_namespaces_remove(client: Client, args: argparse.Namespace) -> None:
    failed = False
    for name in args.names:
        try:
            await client.namespaces.delete(name)
        except errdefs.Unavailable:
            raise
        except errdefs.ContainerdError as err:
            _err(f"unable to delete {name}: {err}")
            failed = True
            continue
        print(name, flush=True)
    if failed:
        raise CommandFailed()


async def cmd_leases_list(client: Client, args: argparse.Namespace) -> None:
    leases = await client.leases.list(args.filters)
    if args.format == "json":
        print_json([lease.to_dict() for lease in leases])
        return
    if args.quiet:
        for lease in leases:
            print(lease.id)
        return
    w = TabWriter(minwidth=1, tabwidth=8, padding=1)
    w.row("ID", "CREATED AT", "LABELS")
    for lease in leases:
        labels = ",".join(f"{k}={v}" for k, v in sorted(lease.labels.items())) or "-"
        w.row(lease.id, rfc3339(lease.created_at), labels)
    w.flush()


async def cmd_leases_create(client: Client, args: argparse.Namespace) -> None:
    try:
        expires = parse_duration(args.expires)
    except ValueError as err:
        raise UsageError(f"invalid value for --expires: {err}") from None
    lease = await client.leases.create(id=args.id or None, labels=label_args(args.labels, ""),
                                       expire=expires if expires > 0 else None)
    print(lease.id)


async def cmd_leases_delete(client: Client, args: argparse.Namespace) -> None:
    last = len(args.ids) - 1
    for i, lease_id in enumerate(args.ids):
        # As ctr: --sync waits for the collection once, after the last lease is gone.
        await client.leases.delete(lease_id, sync=args.sync and i == last)
        print(lease_id, flush=True)


def _go_time(ts) -> str:
    """Go's time.Time.String() for a UTC timestamp: "2006-01-02 15:04:05.999999999 +0000 UTC"."""
    if ts is None:
        return "0001-01-01 00:00:00 +0000 UTC"
    ts = ts.astimezone(timezone.utc)
    frac = f"{ts.microsecond:06d}".rstrip("0")
    return ts.strftime("%Y-%m-%d %H:%M:%S") + (f".{frac}" if frac else "") + " +0000 UTC"


async def cmd_events(client: Client, args: argparse.Namespace) -> None:
    async for env in client.events.subscribe(args.filters):
        if args.format == "json":
            line = json.dumps(env.to_dict(), separators=(",", ":"), default=str)
        else:
            payload = env.payload_dict()
            if payload is None and env.type_url:
                payload = {"@type": env.type_url}
            text = json.dumps(payload, separators=(",", ":"), default=str) if payload is not None else ""
            line = f"{_go_time(env.timestamp)} {env.namespace} {env.topic} {text}"
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


# -- parser ------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage and exit 2
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _add_format(p: argparse.ArgumentParser, quiet_help: Optional[str] = None) -> None:
    if quiet_help:
        p.add_argument("-q", "--quiet", action="store_true", help=quiet_help)
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="output format (default: table)")


def _group(sub, name: str, aliases: list[str], help: str) -> argparse._SubParsersAction:
    p = sub.add_parser(name, aliases=aliases, help=help, description=help)
    p.set_defaults(func=None, group_parser=p)
    return p.add_subparsers(title="commands", metavar="COMMAND")


def _command(sub, name: str, func: Callable, help: str, aliases: tuple = ()) -> argparse.ArgumentParser:
    p = sub.add_parser(name, aliases=list(aliases), help=help, description=help)
    p.set_defaults(func=func)
    return p


COMMAND_MODULES: tuple[str, ...] = ("pycontainerd.cmd.pyctr_snapshots", "pycontainerd.cmd.pyctr_content",
                                     "pycontainerd.cmd.pyctr_images",
                                     "pycontainerd.cmd.pyctr_transfer",
                                     "pycontainerd.cmd.pyctr_containers", "pycontainerd.cmd.pyctr_tasks",
                                     "pycontainerd.cmd.pyctr_run")
"""Modules adding command groups: each has `register(sub)`, building its parsers with
`_group`/`_command`/`_add_format` from this module and setting `func` to an async
`(client, args)` command."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="pycontainerd CLI: a ctr-like client for "
                     "pycontainerd and containerd-compatible daemons")
    parser.add_argument("-a", "--address", default=os.environ.get("CONTAINERD_ADDRESS") or DEFAULT_ADDRESS,
                        help="address of the daemon's gRPC socket (default: %(default)s) [$CONTAINERD_ADDRESS]")
    parser.add_argument("-n", "--namespace", default=os.environ.get("CONTAINERD_NAMESPACE") or "default",
                        help="namespace to use with commands (default: %(default)s) [$CONTAINERD_NAMESPACE]")
    parser.add_argument("--timeout", default="0s", help="total timeout for pyctr commands (default: 0s)")
    parser.add_argument("--connect-timeout", default="0s",
                        help="keep trying to reach the daemon this long (default: 0s, one try)")
    parser.add_argument("--debug", action="store_true", help="enable debug output in logs")
    parser.add_argument("-v", "--version", action="version", version=f"{PROG} {_client_version()}")
    parser.set_defaults(func=None, group_parser=parser)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = _command(sub, "version", cmd_version, "print the client and server versions")
    p.add_argument("--format", choices=("text", "json"), default="text")

    plugins = _group(sub, "plugins", ["plugin"], "provides information about the daemon's plugins")
    p = _command(plugins, "list", cmd_plugins_list, "lists the daemon's plugins", ("ls",))
    _add_format(p, "print only the plugin ids")
    p.add_argument("-d", "--detailed", action="store_true", help="print detailed information about each plugin")
    p.add_argument("filters", nargs="*", help="filters, e.g. type==io.containerd.grpc.v1")

    ns = _group(sub, "namespaces", ["namespace", "ns"], "manage namespaces")
    p = _command(ns, "create", cmd_namespaces_create, "create a new namespace. it must be unique", ("c",))
    p.add_argument("name", metavar="NAME")
    p.add_argument("labels", nargs="*", metavar="KEY=VALUE")
    p = _command(ns, "list", cmd_namespaces_list, "list namespaces", ("ls",))
    _add_format(p, "print only the namespace name")
    p = _command(ns, "remove", cmd_namespaces_remove,
                 "remove one or more namespaces. for now, the namespace must be empty", ("rm",))
    p.add_argument("names", nargs="+", metavar="NAME")
    p = _command(ns, "label", cmd_namespaces_label,
                 "set and clear labels for a namespace. empty value clears the label")
    p.add_argument("name", metavar="NAME")
    p.add_argument("labels", nargs="*", metavar="KEY=VALUE")

    leases = _group(sub, "leases", [], "manage leases")
    p = _command(leases, "list", cmd_leases_list, "list all active leases", ("ls",))
    _add_format(p, "print only the lease ids")
    p.add_argument("filters", nargs="*", help="filters, e.g. id==mylease")
    p = _command(leases, "create", cmd_leases_create, "create a new lease")
    p.add_argument("--id", default="", help="set the id for the lease, will be generated by default")
    p.add_argument("-x", "--expires", default="24h",
                   help="expiration of lease (0 value will not expire) (default: 24h0m0s)")
    p.add_argument("labels", nargs="*", metavar="KEY=VALUE")
    p = _command(leases, "delete", cmd_leases_delete, "delete a lease", ("del", "remove", "rm"))
    p.add_argument("--sync", action="store_true",
                   help="synchronously remove leases and all unreferenced resources")
    p.add_argument("ids", nargs="+", metavar="LEASE_ID")

    p = _command(sub, "events", cmd_events, "display events", ("event",))
    p.add_argument("--format", choices=("text", "json"), default="text",
                   help="text (ctr's layout) or json (one object per line)")
    p.add_argument("filters", nargs="*", help='filters, e.g. topic~="/namespaces/"')

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


# -- main --------------------------------------------------------------------------------------

def _duration_flag(name: str, value: str) -> Optional[float]:
    try:
        seconds = parse_duration(value)
    except ValueError as err:
        raise UsageError(f"invalid value for --{name}: {err}") from None
    return seconds if seconds > 0 else None


async def _run(args: argparse.Namespace, func: Callable[[Client, argparse.Namespace], Awaitable[None]],
               timeout: Optional[float], connect_timeout: Optional[float]) -> None:
    client = Client(address=args.address, namespace=args.namespace, connect_timeout=connect_timeout)
    try:
        if timeout is None:
            await func(client, args)
        else:
            try:
                async with asyncio.timeout(timeout):
                    await func(client, args)
            except TimeoutError:
                raise errdefs.DeadlineExceeded("context deadline exceeded") from None
    finally:
        await client.close()


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    debug = False
    try:
        args = parser.parse_args(argv)
        debug = args.debug
        logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if args.func is None:
            args.group_parser.print_help()
            return 0
        timeout = _duration_flag("timeout", args.timeout)
        connect_timeout = _duration_flag("connect-timeout", args.connect_timeout)
        asyncio.run(_run(args, args.func, timeout, connect_timeout))
        return 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`pyctr events | head -1`): leave quietly.
        # Point stdout at /dev/null so the interpreter's final flush does not complain.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    except CommandFailed:
        return 1
    except (errdefs.ContainerdError, UsageError) as err:
        if debug:
            log.debug("command failed", exc_info=True)
        _err(str(err))
        return 1
    except Exception as err:  # a bug in pyctr or the library: still one line
        if debug:
            log.debug("unexpected error", exc_info=True)
        _err(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)
        return 1


if __name__ == "__main__":
    sys.exit(main())
