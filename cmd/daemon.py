"""`pycontainerd`: run the daemon, or `pycontainerd config default|dump|check`.

Flags as containerd's: --config/-c, --root, --state, --address/-a, --log-level/-l.
"""
from __future__ import annotations

import argparse
import gc
import sys
from typing import Any

# Everything else is imported where it is used: `--version`, `config` and `publish` (which shims
# run for every event they send) need little of what serving needs, and the daemon imports its
# serving stack with the garbage collector held off (see run_daemon).

DEFAULT_CONFIG = "/etc/pycontainerd/config.toml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="pycontainerd", description="A containerd-compatible container daemon.")
    ap.add_argument("--config", "-c", help=f"path to the configuration file (default {DEFAULT_CONFIG})")
    ap.add_argument("--root", help="where persistent data lives")
    ap.add_argument("--state", help="where runtime state lives")
    ap.add_argument("--address", "-a", help="the gRPC socket path")
    ap.add_argument("--log-level", "-l", help="trace, debug, info, warn, error, fatal or panic")
    ap.add_argument("--version", "-v", action="store_true", help="print the version and exit")
    sub = ap.add_subparsers(dest="command")
    cfg = sub.add_parser("config", help="information on the daemon's configuration")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    cfg_sub.add_parser("default", help="print a complete default config")
    cfg_sub.add_parser("dump", help="print the effective merged config")
    cfg_sub.add_parser("check", help="report unknown keys and wrong types; exit 1 when there are any")
    pub = sub.add_parser("publish", help="publish an event (a protobuf Any on stdin) to the daemon; shims run this")
    pub.add_argument("--namespace", default="", help="namespace to publish to")
    pub.add_argument("--topic", default="", help="topic of the event")
    return ap.parse_args(argv)


def publish_command(args: argparse.Namespace) -> int:
    """`pycontainerd --address A publish --namespace NS --topic T < any.bin`, as `containerd publish`:
    the -publish-binary a shim runs to send an event through Events.Publish."""
    import asyncio

    from betterproto.lib.google.protobuf import Any as ProtoAny

    from pycontainerd import config as configmod
    from pycontainerd.api.client import Client
    from pycontainerd.core import errdefs

    if not args.topic:
        raise errdefs.InvalidArgument("topic required to publish event")
    try:
        payload = ProtoAny().parse(sys.stdin.buffer.read())
    except Exception as e:
        raise errdefs.InvalidArgument(f"reading the event from stdin: {e}") from None

    async def publish() -> None:
        client = Client(args.address or configmod.DEFAULT_ADDRESS, namespace=args.namespace, connect_timeout=2)
        try:
            await client.events.publish(args.topic, payload)
        finally:
            await client.close()

    asyncio.run(publish())
    return 0


def load(args: argparse.Namespace) -> tuple[Any, list]:
    """The loaded config (a config.LoadResult) with the flags applied, and every registration it
    may configure."""
    from pycontainerd import config as configmod
    from pycontainerd.core.initgraph import collect
    from pycontainerd.plugins import BUILTIN_MODULES
    from pycontainerd.plugins.snapshots.proxy import proxy_registrations as snapshot_proxy_registrations

    result = configmod.load(args.config or DEFAULT_CONFIG, explicit=args.config is not None)
    configmod.apply_overrides(result.config, root=args.root, state=args.state, address=args.address,
                              log_level=args.log_level)
    registrations = collect(BUILTIN_MODULES, result.config.plugin_modules).all()
    # [proxy_plugins.NAME] type = "snapshot": a snapshotter served by another process
    registrations += snapshot_proxy_registrations(result.config.proxy_plugins)
    return result, registrations


def config_command(args: argparse.Namespace) -> int:
    from pycontainerd import config as configmod
    from pycontainerd.core.initgraph import collect
    from pycontainerd.plugins import BUILTIN_MODULES

    if args.config_command == "default":
        sys.stdout.write(configmod.default_toml(collect(BUILTIN_MODULES).all()))
        return 0
    result, registrations = load(args)
    if args.config_command == "dump":
        sys.stdout.write(configmod.dump_toml(result.config, registrations))
        return 0
    warnings = configmod.check(result, registrations)
    for w in warnings:
        sys.stderr.write(f"{w}\n")
    if warnings:
        sys.stderr.write(f"{len(warnings)} problem(s) found\n")
        return 1
    sys.stdout.write("config ok\n")
    return 0


def _serving() -> None:
    """Startup is over: what it built lives as long as the daemon, so it is frozen out of the
    collector's generations (gc.freeze: never scanned again), and collection resumes."""
    gc.freeze()
    gc.enable()


def run_daemon(args: argparse.Namespace) -> int:
    # Startup creates some 80,000 long-lived objects (modules, classes, plugin state) and almost
    # no garbage, so collecting during it is wasted work (~3% of the CPU to ready). Held off
    # until the daemon serves (_serving); a failed start exits anyway.
    gc.disable()
    import asyncio

    import structlog

    from pycontainerd import config as configmod
    from pycontainerd.core import log as logmod
    from pycontainerd.core.daemon import Daemon
    from pycontainerd.core.initgraph import RequiredPluginError

    log = structlog.get_logger("pycontainerd")
    result, registrations = load(args)
    cfg = result.config
    logmod.configure(cfg.debug.level, cfg.debug.format)
    for w in configmod.check(result, registrations):
        log.warning("config problem", file=str(w.file or ""), table=w.table, key=w.key, problem=w.message)
    daemon = Daemon(cfg, registrations, lambda reg: configmod.plugin_config(cfg, reg))
    try:
        asyncio.run(daemon.run(on_ready=_serving))
    except RequiredPluginError as e:
        log.error("cannot start", error=str(e))
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.version:
        from pycontainerd.core.version import REVISION, VERSION
        sys.stdout.write(f"pycontainerd {VERSION} {REVISION}\n".replace(" \n", "\n"))
        sys.exit(0)
    from pycontainerd import config as configmod
    from pycontainerd.core import errdefs

    try:
        if args.command == "config":
            sys.exit(config_command(args))
        if args.command == "publish":
            sys.exit(publish_command(args))
        sys.exit(run_daemon(args))
    except configmod.ConfigError as e:
        sys.stderr.write(f"pycontainerd: {e}\n")
        sys.exit(1)
    except (ValueError, errdefs.ContainerdError) as e:
        sys.stderr.write(f"pycontainerd: {e}\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
