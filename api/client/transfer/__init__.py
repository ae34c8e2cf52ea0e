"""Moving images in and out of a containerd-compatible daemon, all on the client side as ctr 1.6
does it, over the content, images, leases, snapshots and diff services:

- archive:  import OCI layout / `docker save` tars, export OCI tars with a docker manifest.json
- unpack:   layers -> snapshots through the Diff service, keyed and labelled as containerd does
- registry: pull and push over the OCI distribution protocol (httpx), hosts.toml, auth
- busybox:  build the embedded default image (an OCI archive) from the host's busybox

Every transfer runs under a lease of its own (see _services.Services.leased).
"""
from ._services import ImageRecord, Services
from .archive import ExportOptions, ImportOptions, export_archive, import_archive
from .mediatypes import Descriptor, Platform
from .unpack import DEFAULT_SNAPSHOTTER, unpack

__all__ = [
    "Services", "ImageRecord", "Descriptor", "Platform",
    "ImportOptions", "ExportOptions", "import_archive", "export_archive",
    "unpack", "DEFAULT_SNAPSHOTTER",
]
