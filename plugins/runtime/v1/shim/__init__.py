"""The Python v1 shim, `containerd-shim-pyrunc-v1`: containerd.runtime.linux.shim.v1.Shim over ttrpc,
started by the `io.containerd.runtime.v1.linux` runtime (ours or containerd's) the way containerd
starts its Go `containerd-shim`.

It drives runc through the v2 Python shim's code (plugins/runtime/v2/runc): its TaskService does
the work, and `service.ShimService` here only adapts the v1 API to it (one container per shim,
process ids instead of container id + exec id, runctypes options to runc.v1 options, only
/tasks/exit and /tasks/oom forwarded — the v1 runtime publishes the other task events itself).

Modules:
  main       flags (as the Go containerd-shim parses them) and the entry point
  server     one shim process: subreaper, ttrpc on the inherited socket (fd 3), signals
  service    the v1 Shim service over the runc TaskService
  publisher  events to the daemon: ttrpc Forward when TTRPC_ADDRESS is set (our daemon sets it),
             else `<containerd-binary> --address A publish --topic T --namespace NS` as the Go shim

Like the v2 shim package, this one must stay cheap to import and never import the daemon's
plugin machinery: cmd/shim_v1.py loads it by path under an alias, next to the runc package
(loaded by cmd/shim.py's `load_package`). `runc(name)` returns a module of the runc package under
whichever name it was loaded.
"""
from __future__ import annotations

import importlib
import sys

RUNC_ALIAS = "_pycontainerd_pyrunc"
RUNC_PACKAGE = "pycontainerd.plugins.runtime.v2.runc"


def runc(name: str):
    """Module `name` of the v2 shim's runc package (the aliased copy inside a shim process)."""
    package = RUNC_ALIAS if RUNC_ALIAS in sys.modules else RUNC_PACKAGE
    return importlib.import_module(f"{package}.{name}")
