"""api: our .proto files, the code generated from them (gen/), and the client library (client/).

Importing any of it installs the cheaper betterproto message accessors (fastmessage.py)."""
from .fastmessage import install as _install_fast_accessors

_install_fast_accessors()
