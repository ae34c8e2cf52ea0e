"""The daemon's version and revision as reported by the version service and `--version`."""
from importlib import metadata

PACKAGE = "pycontainerd"

try:
    VERSION = metadata.version(PACKAGE)
except metadata.PackageNotFoundError:
    VERSION = "0.0.0+unknown"

REVISION = ""
