"""Every built-in capability, one subpackage per plugin. Each subpackage implements the
`pycontainerd_register` hook in its __init__; BUILTIN_MODULES names them all, found by walking
this package, so adding a plugin is adding a subpackage. Third-party packages add theirs through
the `pycontainerd.plugins` entry-point group, and config's `plugin_modules` names unpackaged ones."""
import pkgutil

BUILTIN_MODULES = tuple(
    f"{__name__}.{info.name}" for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name)
    if info.ispkg and not info.name.startswith("_")
)
