"""`containerd-shim-pyrunc-v1`'s command line, as the Go `containerd-shim` (containerd 1.6) parses it.

containerd's v1 runtime starts the shim from the bundle directory (the shim takes its working
directory as the bundle path) with the listening socket as fd 3 and

    -namespace NS -workdir DIR -address GRPC -containerd-binary BIN
    [-criu PATH] [-runtime-root DIR] [-systemd-cgroup] [-debug]

`-socket PATH` makes the shim listen on PATH itself instead of using fd 3. `--address GRPC publish
--topic T --namespace NS` publishes one event (see publish.py): the v1 runtime gives this binary
to the Go shim as its -containerd-binary. containerd 1.6 spells
the criu flag `-criu-path`, which its own Go shim does not define; we accept both.
Flags are Go's: `-name value`, `-name=value`, `--name`, booleans without a value; parsing stops at
the first argument that is not a flag.
-runtime-root defaults to our /run/pycontainerd/runc (the v2 shim's launch.RUNC_ROOT), where the
Go shim's default is containerd's /run/containerd/runc.
"""
from __future__ import annotations

import sys

from . import runc

NAME = "containerd-shim-pyrunc-v1"
DEFAULT_RUNTIME_ROOT = runc("launch").RUNC_ROOT  # ours, /run/pycontainerd/runc (the Go shim's is /run/containerd/runc)


FlagError = runc("launch").FlagError


class Flags:
    __slots__ = ("debug", "namespace", "socket", "address", "workdir", "runtime_root", "criu",
                 "systemd_cgroup", "containerd_binary", "args")

    def __init__(self) -> None:
        self.debug = False
        self.namespace = ""
        self.socket = ""
        self.address = ""
        self.workdir = ""
        self.runtime_root = DEFAULT_RUNTIME_ROOT
        self.criu = ""
        self.systemd_cgroup = False
        self.containerd_binary = "containerd"
        self.args: list[str] = []


_BOOL = {"debug": "debug", "systemd-cgroup": "systemd_cgroup"}
_STRING = {"namespace": "namespace", "socket": "socket", "address": "address", "workdir": "workdir",
           "runtime-root": "runtime_root", "criu": "criu", "criu-path": "criu",
           "containerd-binary": "containerd_binary"}


def parse_flags(argv: list[str]) -> Flags:
    flags = Flags()
    flags.args = runc("launch").parse_go_flags(argv, flags, _BOOL, _STRING)
    return flags


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        flags = parse_flags(argv)
    except FlagError as err:
        sys.stderr.write(f"{err}\n")
        return 2
    if flags.args and flags.args[0] == "publish":  # used as the Go shim's -containerd-binary
        from . import publish
        return publish.main(flags.address, flags.args[1:])
    if not flags.namespace:
        sys.stderr.write(f"{NAME}: shim namespace cannot be empty\n")
        return 1
    from . import server
    return server.main(flags)
