"""Every built-in capability, one subpackage per plugin. Each module listed in BUILTIN_MODULES
implements the `pycontainerd_register` hook; third-party packages add theirs through the
`pycontainerd.plugins` entry-point group, and config's `plugin_modules` names unpackaged ones."""

BUILTIN_MODULES = (
    "pycontainerd.plugins.metadata",
    "pycontainerd.plugins.events",
    "pycontainerd.plugins.leases",
    "pycontainerd.plugins.namespaces",
    "pycontainerd.plugins.version",
    "pycontainerd.plugins.introspection",
    "pycontainerd.plugins.health",
)
