"""The client's plumbing: one grpclib channel per address, the namespace header on every call, and
the translation of every failure into a core.errdefs error. Service APIs build on `ServiceAPI`.

Nothing above this module sees grpclib or h2 exceptions: a non-OK status becomes
`errdefs.from_status(...)`, a socket that cannot be reached becomes `errdefs.Unavailable`, and a
deadline becomes `errdefs.DeadlineExceeded`.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Optional

from grpclib.client import Channel
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from pycontainerd.core import errdefs
from pycontainerd.core.context import NAMESPACE_HEADER

if TYPE_CHECKING:  # pragma: no cover
    from .client import Client

# How often a connect is retried while a connect_timeout is running.
_CONNECT_RETRY = 0.1


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()  # "use the client's timeout", distinct from an explicit None


def parse_address(address: str) -> dict:
    """grpclib Channel kwargs for "unix:///path", "/path", "tcp://host:port" or "host:port"."""
    if address.startswith("unix://"):
        return {"path": address[len("unix://"):]}
    if address.startswith("tcp://"):
        address = address[len("tcp://"):]
    elif "/" in address or ":" not in address:
        return {"path": address}
    host, _, port = address.rpartition(":")
    try:
        return {"host": host.strip("[]") or "localhost", "port": int(port)}
    except ValueError:
        raise errdefs.InvalidArgument(f"invalid address {address!r}") from None


class Connection:
    """One lazily created, lazily connected grpclib Channel shared by a client and its
    `with_namespace` copies. Must be used from one event loop."""

    def __init__(self, address: str, connect_timeout: Optional[float] = None):
        self.address = address
        self.connect_timeout = connect_timeout
        self._channel: Optional[Channel] = None
        self._dialed = False

    async def channel(self) -> Channel:
        if self._channel is None:
            self._channel = Channel(**parse_address(self.address))
        if not self._dialed:
            await self._dial()
        return self._channel

    async def _dial(self) -> None:
        """Connect once up front so a bad address fails with a clear "failed to dial" error.

        Without a connect_timeout one attempt is made; with one, attempts repeat until it runs
        out (a daemon that is still starting gets the time to create its socket)."""
        assert self._channel is not None
        deadline = None if not self.connect_timeout else time.monotonic() + self.connect_timeout
        while True:
            try:
                if deadline is None:
                    await self._channel.__connect__()
                else:
                    remaining = max(deadline - time.monotonic(), 0.001)
                    await asyncio.wait_for(self._channel.__connect__(), remaining)
                self._dialed = True
                return
            except (OSError, asyncio.TimeoutError) as err:
                reason = _os_reason(err)
                if deadline is None:
                    raise errdefs.Unavailable(
                        f'failed to dial "{self.address}": {reason}') from None
                if time.monotonic() >= deadline:
                    raise errdefs.DeadlineExceeded(
                        f'failed to dial "{self.address}" ({reason}): context deadline exceeded') from None
                await asyncio.sleep(min(_CONNECT_RETRY, max(deadline - time.monotonic(), 0)))

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._dialed = False


def _os_reason(err: BaseException) -> str:
    if isinstance(err, asyncio.TimeoutError):
        return "timeout"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower()
    return str(err) or type(err).__name__


@contextlib.contextmanager
def translate_errors(address: str):
    """Re-raise whatever a call fails with as a core.errdefs error."""
    try:
        yield
    except errdefs.ContainerdError:
        raise
    except GRPCError as err:
        raise errdefs.from_status(err.status, err.message or "") from None
    except asyncio.TimeoutError:
        raise errdefs.DeadlineExceeded("context deadline exceeded") from None
    except (StreamTerminatedError, ProtocolError) as err:
        raise errdefs.Unavailable(f"connection error: {err or type(err).__name__}") from None
    except OSError as err:
        raise errdefs.Unavailable(f'connection to "{address}" failed: {_os_reason(err)}') from None


class ServiceAPI:
    """Base of the sub-APIs (`client.namespaces`, `client.leases`, ...): a view on a Client that
    calls one generated stub. Subclasses set `stub_class` and call `_unary` / `_stream`."""

    stub_class: Any = None

    def __init__(self, client: "Client"):
        self._client = client

    async def _stub(self, timeout: Any):
        client = self._client
        channel = await client._conn.channel()
        return self.stub_class(
            channel,
            timeout=client.timeout if timeout is DEFAULT else timeout,
            metadata={NAMESPACE_HEADER: client.namespace},
        )

    async def _unary(self, method: str, request: Any, *, timeout: Any = DEFAULT) -> Any:
        with translate_errors(self._client.address):
            stub = await self._stub(timeout)
            return await getattr(stub, method)(request)

    async def _stream(self, method: str, request: Any, *, timeout: Any = None) -> AsyncIterator[Any]:
        """Messages of a server stream; streams get no timeout unless one is passed."""
        with translate_errors(self._client.address):
            stub = await self._stub(timeout)
            stream = getattr(stub, method)(request)
            try:
                async for message in stream:
                    yield message
            finally:
                await stream.aclose()
