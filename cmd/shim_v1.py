"""`containerd-shim-pyrunc-v1`: the Python v1 shim's entry point (the default `shim` of the
io.containerd.runtime.v1.linux runtime; containerd's own is the Go `containerd-shim`).

The code lives in plugins/runtime/v1/shim and drives runc through plugins/runtime/v2/runc. Both
packages are loaded *by path* under aliases (see cmd/shim.py), so a shim never imports the
daemon's plugin packages and their dependencies.
"""
from __future__ import annotations

import sys

from pycontainerd.cmd import shim as shim_v2

ALIAS = "_pycontainerd_pyrunc_v1"


def load_package():
    """The v1 shim package (and the runc package it uses), loaded without their parents."""
    module = sys.modules.get(ALIAS)
    if module is not None:
        return module
    import importlib.util
    import os

    runc = shim_v2.load_package()
    plugins_dir = os.path.dirname(os.path.dirname(os.path.dirname(list(runc.__path__)[0])))
    directory = os.path.join(plugins_dir, "runtime", "v1", "shim")
    spec = importlib.util.spec_from_file_location(ALIAS, os.path.join(directory, "__init__.py"),
                                                  submodule_search_locations=[directory])
    module = importlib.util.module_from_spec(spec)
    sys.modules[ALIAS] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    load_package()
    import importlib

    return importlib.import_module(ALIAS + ".main").main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
