"""The Python client library for pycontainerd (and any containerd 1.6/1.7 daemon): what pyctr and
users import. `Client` is async; `SyncClient` wraps it for synchronous code.

    from pycontainerd.api.client import Client, SyncClient, errdefs

    with SyncClient("/run/pycontainerd/pycontainerd.sock", namespace="default") as client:
        print(client.version().version)
        for ns in client.namespaces.list():
            print(ns.name, ns.labels)

Failures are core.errdefs errors (NotFound, AlreadyExists, Unavailable, ...), never raw gRPC ones.
This package owns only the client side; it shares errdefs and the namespace header with core.
"""
from pycontainerd.core import errdefs

from .client import DEFAULT_ADDRESS, Client
from .sync import SyncClient
from .types import (Envelope, Lease, LeaseResource, Namespace, Platform, Plugin, PluginError,
                    ServerInfo, Version)

__all__ = [
    "Client", "SyncClient", "DEFAULT_ADDRESS", "errdefs",
    "Envelope", "Lease", "LeaseResource", "Namespace", "Platform", "Plugin", "PluginError",
    "ServerInfo", "Version",
]
