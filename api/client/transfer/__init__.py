"""Moving images in and out of a containerd-compatible daemon, all on the client side as ctr 1.6
does it, over the content, images, leases, snapshots and diff services:

- archive:  import OCI layout / `docker save` tars, export OCI tars with a docker manifest.json
- unpack:   layers -> snapshots through the Diff service, keyed and labelled as containerd does
- pull/push over registry (the OCI distribution protocol, httpx), hosts (hosts.toml), auth
- busybox:  build the embedded default image (an OCI archive) from the host's static busybox

Every transfer runs under a lease of its own (`Services.leased`): what it writes is held until
images and gc.ref labels hold it, and a failed transfer's lease is deleted synchronously, so it
leaves nothing behind.

    async with Client(address, namespace="default") as client:
        async with Services(client) as svc:
            with open("image.tar", "rb") as f:
                images = await import_archive(svc, f, ImportOptions(base_name="example.com/app"))
            for img in images:
                await unpack(svc, img.target)
            # from pycontainerd.api.client.transfer.pull import pull
            img, chain_id = await pull(svc, "127.0.0.1:5000/app:v1", RemoteOptions())

The command line (cmd/pyctr_transfer.py), as ctr's:

    pyctr images import [--base-name N] [--digests] [--index-name N] [--all-platforms]
                        [--platform P] [--no-unpack] [--compress-blobs] [--snapshotter S] IN|-
    pyctr images import --busybox            # the embedded busybox as docker.io/library/busybox:latest
    pyctr images export [--platform P]... [--all-platforms] [--skip-manifest-json] OUT|- IMAGE...
    pyctr images pull [--plain-http] [-u USER[:PASS]] [--hosts-dir DIR] [--platform P]...
                      [--all-platforms] [--all-metadata] [--max-concurrent-downloads N]
                      [--print-chainid] [--no-unpack] [--http-timeout S] REF
    pyctr images push [--plain-http] [-u USER[:PASS]] [--hosts-dir DIR] [--platform P]
                      [--max-concurrent-uploaded-layers N] [--chunk-size BYTES] REMOTE [LOCAL]
    pyctr images unpack [--snapshotter S] [--platform P] IMAGE...
    pyctr images busybox OUT.tar|-           # write the embedded image; prints its manifest digest
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
# pull, fetch and push live in the modules of those names (importing them loads httpx).
