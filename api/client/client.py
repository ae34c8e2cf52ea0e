"""`Client`: the async entry point of the client library, one object per daemon address.

    async with Client("/run/pycontainerd/pycontainerd.sock", namespace="default") as client:
        print((await client.version()).version)
        await client.namespaces.create("dev", {"team": "a"})
        async for event in client.events.subscribe():
            ...

Every call sends the `containerd-namespace` header with the client's namespace and raises a
core.errdefs error on failure. Each service hangs off the client as a small API object (see
`ServiceAPI`); content, images, snapshots, containers and tasks join the same way.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

from betterproto.lib.google.protobuf import Empty

from pycontainerd.api.gen.containerd.services.introspection import v1 as introspection_api
from pycontainerd.api.gen.containerd.services.version import v1 as version_api
from pycontainerd.core.context import DEFAULT_NAMESPACE

from ._base import DEFAULT, Connection, ServiceAPI
from .containers import ContainersAPI
from .content import ContentAPI
from .diff import DiffAPI
from .events import EventsAPI
from .images import ImagesAPI
from .leases import LeasesAPI
from .namespaces import NamespacesAPI
from .snapshots import SnapshotsAPI
from .tasks import TasksAPI
from .types import Plugin, ServerInfo, Version

DEFAULT_ADDRESS = "/run/pycontainerd/pycontainerd.sock"


class _VersionAPI(ServiceAPI):
    stub_class = version_api.VersionStub


class _IntrospectionAPI(ServiceAPI):
    stub_class = introspection_api.IntrospectionStub


class Client:
    """A connection to a containerd-compatible daemon.

    address:          unix socket path ("unix://" prefix allowed) or "tcp://host:port".
    namespace:        sent with every call; `with_namespace()` gives a copy for another one.
    timeout:          default deadline in seconds for each unary call (None: no deadline);
                      streams (events.subscribe) get none unless asked.
    connect_timeout:  how long to keep trying to reach the socket before failing (None: one try).

    The connection is opened on the first call and closed by `close()` / `async with`.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, namespace: str = DEFAULT_NAMESPACE,
                 timeout: Optional[float] = None, connect_timeout: Optional[float] = None,
                 *, _conn: Optional[Connection] = None):
        self.namespace = namespace
        self.timeout = timeout
        self._conn = _conn or Connection(address, connect_timeout)
        self._version = _VersionAPI(self)
        self._introspection = _IntrospectionAPI(self)
        self.namespaces = NamespacesAPI(self)
        self.leases = LeasesAPI(self)
        self.events = EventsAPI(self)
        self.snapshots = SnapshotsAPI(self)
        self.containers = ContainersAPI(self)
        self.tasks = TasksAPI(self)
        self.content = ContentAPI(self)
        self.diff = DiffAPI(self)
        self.images = ImagesAPI(self)

    @property
    def address(self) -> str:
        return self._conn.address

    @property
    def connect_timeout(self) -> Optional[float]:
        return self._conn.connect_timeout

    def __repr__(self) -> str:
        return f"Client(address={self.address!r}, namespace={self.namespace!r})"

    def with_namespace(self, namespace: str) -> "Client":
        """A client for `namespace` sharing this one's connection (closing either closes both)."""
        return Client(namespace=namespace, timeout=self.timeout, _conn=self._conn)

    async def connect(self) -> "Client":
        """Reach the socket now instead of on the first call (fails fast on a bad address)."""
        await self._conn.channel()
        return self

    async def close(self) -> None:
        self._conn.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # -- version and introspection -------------------------------------------------------------

    async def version(self, *, timeout: Any = DEFAULT) -> Version:
        """The daemon's version and revision."""
        return Version.from_proto(await self._version._unary("version", Empty(), timeout=timeout))

    async def server(self, *, timeout: Any = DEFAULT) -> ServerInfo:
        """Introspection.Server: the daemon's UUID (and pid/pidns where the server sends them)."""
        resp = await self._introspection._unary("server", Empty(), timeout=timeout)
        return ServerInfo.from_proto(resp)

    async def plugins(self, filters: Iterable[str] = (), *, timeout: Any = DEFAULT) -> list[Plugin]:
        """The daemon's plugins and their init status; filters like 'type==io.containerd.grpc.v1'
        or 'id==overlayfs' (several are OR-ed)."""
        req = introspection_api.PluginsRequest(filters=list(filters))
        resp = await self._introspection._unary("plugins", req, timeout=timeout)
        return [Plugin.from_proto(p) for p in resp.plugins]
