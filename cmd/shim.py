"""`containerd-shim-pyrunc-v2`: the Python runc shim's entry point (runtime io.containerd.pyrunc.v2).

The code lives in plugins/runtime/v2/runc (see its launch.py for the actions). containerd runs
this binary for every container (`start`) and after every shim exit (`delete`), each time in a
fresh interpreter, so the entry point loads that package *by path*, under the alias
`_pycontainerd_pyrunc`, instead of importing `pycontainerd.plugins.runtime.v2.runc`: importing it
by name would first run `pycontainerd.plugins` and `pycontainerd.plugins.runtime`, which bring in
pluggy, the plugin registry and the generated API (a few hundred milliseconds a container).
"""
from __future__ import annotations

import sys

ALIAS = "_pycontainerd_pyrunc"


def load_package():
    """The shim package, loaded without executing its parent packages."""
    module = sys.modules.get(ALIAS)
    if module is not None:
        return module
    import importlib.util
    import os

    spec = importlib.util.find_spec("pycontainerd.plugins")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("pycontainerd.plugins not found")
    directory = os.path.join(list(spec.submodule_search_locations)[0], "runtime", "v2", "runc")
    pkg_spec = importlib.util.spec_from_file_location(ALIAS, os.path.join(directory, "__init__.py"),
                                                      submodule_search_locations=[directory])
    module = importlib.util.module_from_spec(pkg_spec)
    sys.modules[ALIAS] = module
    pkg_spec.loader.exec_module(module)
    return module


def main() -> int:
    load_package()
    import importlib

    launch = importlib.import_module(ALIAS + ".launch")
    return launch.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
