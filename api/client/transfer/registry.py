"""The OCI distribution protocol over httpx: one `Registry` per reference host, which tries the
hosts hosts.py configures in order, authorizes (anonymous, basic from `--user`, bearer tokens
fetched from the realm a WWW-Authenticate challenge names), retries as containerd's resolver does
(401 after adding a challenge, 405 on a manifest HEAD becomes GET, 408/429), and gives the
pieces pull and push are made of: resolve a reference, open a blob or manifest (optionally from
an offset, with Range), check, mount, upload (monolithic or chunked) and put manifests.

Owns the HTTP side only; it never talks to the daemon.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import re
import ssl
import sys
from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import urlencode, urljoin, urlsplit

if "httpx" not in sys.modules:
    # httpx's command-line module (`httpx._main`) pulls in click, rich and pygments when they are
    # installed; this library never uses it. A None entry makes that import fail fast, and httpx
    # then defines a stub `main` instead.
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
import httpx  # noqa: E402

from pycontainerd.core import digest as digests
from pycontainerd.core import errdefs

from . import mediatypes as mt
from .hosts import CAP_PULL, CAP_PUSH, CAP_RESOLVE, RegistryHost, configure_hosts
from .mediatypes import Descriptor
from .reference import Spec, parse_spec

log = logging.getLogger("pycontainerd.transfer.registry")

# httpcore reads an HTTP/1.1 body 64 KiB at a time; blobs move 16 times faster in CPU terms with
# 1 MiB reads (it is a buffer size: a smaller read still returns as soon as data is there).
try:
    from httpcore._async.http11 import AsyncHTTP11Connection as _H11
    if getattr(_H11, "READ_NUM_BYTES", 0) < (1 << 20):
        _H11.READ_NUM_BYTES = 1 << 20
except ImportError:  # pragma: no cover - a different httpcore layout: keep its default
    pass

USER_AGENT = "pycontainerd/0.1"
MANIFEST_ACCEPT = ", ".join([mt.DOCKER_MANIFEST, mt.DOCKER_MANIFEST_LIST, mt.OCI_MANIFEST,
                             mt.OCI_INDEX, "*/*"])


class RegistryError(errdefs.Unknown):
    """The registry answered something we cannot use."""


class AuthorizationFailed(errdefs.FailedPrecondition):
    pass


@dataclass
class RemoteOptions:
    """ctr's registry flags."""

    plain_http: bool = False
    hosts_dir: str = ""
    user: str = ""  # "user" or "user:password"
    refresh_token: str = ""
    skip_verify: bool = False
    tlscacert: str = ""
    tlscert: str = ""  # a client certificate (and its key) for every https host
    tlskey: str = ""
    connect_timeout: float = 30.0
    read_timeout: float = 60.0  # a registry silent this long mid-request is given up on
    headers: dict[str, str] = field(default_factory=dict)

    def credentials(self) -> tuple[str, str]:
        user, _, secret = self.user.partition(":")
        if not user and self.refresh_token:
            return "", self.refresh_token
        return user, secret


# -- WWW-Authenticate --------------------------------------------------------------------------

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PARAM = re.compile(rf'\s*({_TOKEN})\s*=\s*(?:"((?:[^"\\]|\\.)*)"|({_TOKEN}))\s*,?')


@dataclass
class Challenge:
    scheme: str
    params: dict[str, str]


def parse_challenges(values: list[str]) -> list[Challenge]:
    """The challenges of WWW-Authenticate headers (`Bearer realm="...",service="..."`)."""
    out = []
    for value in values:
        rest = value.strip()
        while rest:
            m = re.match(rf"\s*({_TOKEN})\s*", rest)
            if not m:
                break
            scheme = m.group(1).lower()
            rest = rest[m.end():]
            params: dict[str, str] = {}
            while True:
                pm = _PARAM.match(rest)
                if not pm:
                    break
                # a new scheme starts where a token is not followed by "="
                params[pm.group(1).lower()] = (pm.group(2) if pm.group(2) is not None else pm.group(3)
                                               ).replace('\\"', '"')
                rest = rest[pm.end():]
            out.append(Challenge(scheme, params))
            rest = rest.lstrip(", ")
    return out


class _AuthHandler:
    def __init__(self, scheme: str, user: str, secret: str, realm: str = "", service: str = "",
                 scopes: Optional[list[str]] = None):
        self.scheme = scheme
        self.user, self.secret = user, secret
        self.realm, self.service = realm, service
        self.scopes = list(scopes or [])
        self.tokens: dict[str, asyncio.Future] = {}


class Authorizer:
    """containerd's dockerAuthorizer: one handler per host, set from that host's challenges."""

    def __init__(self, options: RemoteOptions):
        self.options = options
        self.handlers: dict[str, _AuthHandler] = {}

    async def authorize(self, http: httpx.AsyncClient, host: str, scopes: list[str]) -> Optional[str]:
        h = self.handlers.get(host)
        if h is None:
            return None
        if h.scheme == "basic":
            raw = f"{h.user}:{h.secret}".encode()
            return "Basic " + base64.b64encode(raw).decode()
        wanted = sorted(set(scopes) | set(h.scopes))
        key = " ".join(wanted)
        fut = h.tokens.get(key)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            h.tokens[key] = fut
            try:
                fut.set_result(await self._fetch_token(http, h, wanted))
            except BaseException as err:
                fut.set_exception(err)
                del h.tokens[key]
                fut.exception()
                raise
        return "Bearer " + await asyncio.shield(fut)

    async def _fetch_token(self, http: httpx.AsyncClient, h: _AuthHandler, scopes: list[str]) -> str:
        headers = {"User-Agent": USER_AGENT}
        if h.secret:
            form = {"scope": " ".join(scopes), "service": h.service, "client_id": "pycontainerd-client"}
            if h.user:
                form.update(grant_type="password", username=h.user, password=h.secret)
            else:
                form.update(grant_type="refresh_token", refresh_token=h.secret)
            resp = await http.post(h.realm, data=form, headers=headers)
            if resp.status_code < 400:
                token = _token_of(resp)
                if token:
                    return token
            elif not (resp.status_code in (404, 401, 400) or (resp.status_code == 405 and h.user)):
                raise AuthorizationFailed(f"failed to fetch oauth token: unexpected status from "
                                          f"POST request to {h.realm}: {resp.status_code}")
        params = [("service", h.service)] if h.service else []
        params += [("scope", s) for s in scopes]
        auth = (h.user, h.secret) if h.secret else None
        resp = await http.get(h.realm, params=params, headers=headers, auth=auth)
        if resp.status_code >= 400:
            what = "token" if h.secret else "anonymous token"
            raise AuthorizationFailed(f"failed to fetch {what}: unexpected status from GET request "
                                      f"to {h.realm}: {resp.status_code} {resp.reason_phrase}")
        token = _token_of(resp)
        if not token:
            raise AuthorizationFailed("authorization server did not include a token in the response")
        return token

    def add_response(self, host: str, resp: httpx.Response, repeated: bool) -> None:
        """Learn from a 401: set up a handler for the challenge (NotImplemented when none fits)."""
        user, secret = self.options.credentials()
        for c in parse_challenges(resp.headers.get_list("www-authenticate")):
            if c.scheme == "bearer":
                if c.params.get("error") and repeated:
                    self.handlers.pop(host, None)
                    raise AuthorizationFailed(f"server message: {c.params['error']}: authorization failed")
                if host in self.handlers and self.handlers[host].scheme == "bearer":
                    self.handlers[host].tokens.clear()  # expired, perhaps: fetch a fresh one
                    return
                realm = c.params.get("realm")
                if not realm:
                    raise AuthorizationFailed("no realm specified for token auth challenge")
                scopes = c.params["scope"].split(" ") if c.params.get("scope") else []
                self.handlers[host] = _AuthHandler("bearer", user, secret, realm,
                                                   c.params.get("service", ""), scopes)
                return
            if c.scheme == "basic" and user and secret:
                if repeated and host in self.handlers and self.handlers[host].scheme == "basic":
                    raise AuthorizationFailed("authorization failed: the registry refused the credentials")
                self.handlers[host] = _AuthHandler("basic", user, secret)
                return
        raise errdefs.Unimplemented("failed to find supported auth scheme")


def _reason(err: BaseException) -> str:
    """The most telling message in an exception chain ("connection refused", not httpx's
    "All connection attempts failed")."""
    seen = err
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"tls: failed to verify certificate: {seen.verify_message or seen.reason}"
        if isinstance(seen, ssl.SSLError):
            return f"tls: {seen.reason or seen}"
        if isinstance(seen, OSError) and (seen.errno or seen.strerror):
            return (os.strerror(seen.errno) if seen.errno else seen.strerror).lower()
        seen = seen.__cause__ or seen.__context__
    return str(err) or type(err).__name__


async def _drain(resp: httpx.Response) -> None:
    try:
        await resp.aread()
    except httpx.HTTPError:
        pass
    finally:
        await resp.aclose()


def _token_of(resp: httpx.Response) -> str:
    try:
        doc = resp.json()
    except ValueError:
        return ""
    if not isinstance(doc, dict):
        return ""
    return str(doc.get("access_token") or doc.get("token") or "")


# -- requests ----------------------------------------------------------------------------------

class Registry:
    """The hosts of one reference host name, with their HTTP clients and authorizer."""

    def __init__(self, spec: Spec, options: Optional[RemoteOptions] = None):
        self.spec = spec
        self.options = options or RemoteOptions()
        self.hosts = configure_hosts(spec.hostname, self.options.hosts_dir, self.options.plain_http)
        self.authorizer = Authorizer(self.options)
        self._clients: dict[int, httpx.AsyncClient] = {}

    @property
    def repository(self) -> str:
        return self.spec.repository

    def client(self, host: RegistryHost) -> httpx.AsyncClient:
        key = id(host)
        c = self._clients.get(key)
        if c is None:
            timeout = httpx.Timeout(self.options.read_timeout, connect=self.options.connect_timeout)
            verify: Any = host.ssl_context(self.options.skip_verify, self.options.tlscacert,
                                           (self.options.tlscert, self.options.tlskey)) \
                if host.scheme == "https" else False
            c = httpx.AsyncClient(verify=verify if verify is not None else True, timeout=timeout,
                                  follow_redirects=False, trust_env=True,
                                  limits=httpx.Limits(max_connections=16, max_keepalive_connections=16))
            self._clients[key] = c
        return c

    async def aclose(self) -> None:
        for c in self._clients.values():
            await c.aclose()
        self._clients.clear()

    async def __aenter__(self) -> "Registry":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def hosts_with(self, caps: int) -> list[RegistryHost]:
        return [h for h in self.hosts if h.has(caps)]

    def url(self, host: RegistryHost, *parts: str, repository: Optional[str] = None) -> str:
        repo = self.repository if repository is None else repository
        path = "/".join(p.strip("/") for p in (host.path, repo, *parts) if p)
        return f"{host.scheme}://{host.host}/{path}"

    def scopes(self, push: bool = False, extra: tuple[str, ...] = ()) -> list[str]:
        s = [f"repository:{self.repository}:pull" + (",push" if push else "")]
        return s + list(extra)

    async def request(self, host: RegistryHost, method: str, url: str, *, scopes: list[str],
                      headers: Optional[dict[str, str]] = None, content: Any = None,
                      stream: bool = False) -> httpx.Response:
        """One request with containerd's retries (401 once a challenge is learnt, 405 on a
        manifest HEAD, 408/429); the caller closes a streamed response. `content` is bytes or a
        callable giving a fresh async iterator for each try. A final 401 is AuthorizationFailed."""
        http = self.client(host)
        hdrs = {"User-Agent": USER_AGENT, **self.options.headers}
        for k, v in host.header.items():
            hdrs[k] = ", ".join(v)
        hdrs.update(headers or {})
        sent_401 = 0
        tries = 0
        while True:
            tries += 1
            auth_host = urlsplit(url).netloc
            req_headers = dict(hdrs)
            token = await self.authorizer.authorize(http, auth_host, scopes)
            if token:
                req_headers["Authorization"] = token
            body = content() if callable(content) else content
            req = http.build_request(method, url, headers=req_headers, content=body)
            try:
                resp = await http.send(req, stream=True)
            except httpx.TimeoutException as err:
                raise errdefs.DeadlineExceeded(f"{method} {url}: registry timed out "
                                               f"({type(err).__name__})") from None
            except httpx.HTTPError as err:
                raise errdefs.Unavailable(f"failed to do request: {method} {url}: {_reason(err)}") from None
            if tries > 6:
                break
            if resp.status_code == 401:
                await _drain(resp)
                if sent_401 >= 2:
                    break
                try:
                    self.authorizer.add_response(auth_host, resp, repeated=sent_401 > 0)
                except errdefs.Unimplemented:
                    break
                sent_401 += 1
                continue
            if resp.status_code == 405 and method == "HEAD" and "/manifests/" in url:
                await resp.aclose()
                method = "GET"
                continue
            if resp.status_code in (408, 429) and tries < 4:
                await resp.aclose()
                await asyncio.sleep(0.2 * tries)
                continue
            break
        if resp.status_code == 401:
            await _drain(resp)
            raise AuthorizationFailed(f"{method} {url}: 401 Unauthorized: authorization failed "
                                      f"(no or wrong credentials; see --user)")
        if not stream:
            try:
                await resp.aread()
            except httpx.TimeoutException:
                raise errdefs.DeadlineExceeded(f"{method} {url}: registry timed out") from None
            except httpx.HTTPError as err:
                raise errdefs.Unavailable(f"{method} {url}: {err}") from None
            finally:
                await resp.aclose()
        return resp

    # -- resolve -------------------------------------------------------------------------------

    async def resolve(self) -> Descriptor:
        """The descriptor the reference names (containerd's Resolve: HEAD, GET when the
        registry does not say digest and size)."""
        obj = self.spec.object
        if not obj:
            raise errdefs.InvalidArgument("object required")
        dg = self.spec.digest
        if dg:
            digests.parse(dg)
            paths = [("manifests", dg), ("blobs", dg)]
            hosts = self.hosts_with(CAP_PULL)
        else:
            paths = [("manifests", self.spec.tag)]
            hosts = self.hosts_with(CAP_PULL | CAP_RESOLVE)
        if not hosts:
            raise errdefs.NotFound("no resolve hosts")
        first_err: Optional[Exception] = None
        for kind, obj in paths:
            for host in hosts:
                url = self.url(host, kind, obj)
                try:
                    resp = await self.request(host, "HEAD", url, scopes=self.scopes(),
                                              headers={"Accept": MANIFEST_ACCEPT})
                except (errdefs.Unavailable, errdefs.DeadlineExceeded, AuthorizationFailed) as err:
                    if isinstance(err, AuthorizationFailed):
                        err = AuthorizationFailed(f"pull access denied, repository does not exist or "
                                                  f"may require authorization: {err.message}")
                    first_err = first_err or err
                    continue
                if resp.status_code == 404:
                    continue
                if resp.status_code > 399:
                    first_err = first_err or RegistryError(
                        f"pulling from host {host.host} failed with status code {url}: "
                        f"{resp.status_code} {resp.reason_phrase}")
                    continue
                if resp.status_code > 299:
                    raise RegistryError(f"pulling from host {host.host} failed with unexpected "
                                        f"status code {url}: {resp.status_code}")
                media_type = resp.headers.get("content-type", "").split(";")[0].strip()
                size = int(resp.headers["content-length"]) if resp.headers.get("content-length") else -1
                got = dg or resp.headers.get("docker-content-digest", "")
                if not got or size < 0 or resp.request.method == "GET":
                    resp = await self.request(host, "GET", url, scopes=self.scopes(),
                                              headers={"Accept": MANIFEST_ACCEPT})
                    if resp.status_code >= 300:
                        first_err = first_err or RegistryError(f"GET {url}: {resp.status_code}")
                        continue
                    data = resp.content
                    media_type = resp.headers.get("content-type", "").split(";")[0].strip()
                    size = len(data)
                    if not got:
                        got = "sha256:" + hashlib.sha256(data).hexdigest()
                digests.parse(got)
                if media_type == "text/plain":
                    media_type = mt.DOCKER_SCHEMA1
                if size > mt.MAX_MANIFEST_SIZE:
                    first_err = first_err or errdefs.NotFound(
                        f"rejecting {size} byte manifest for {self.spec}")
                    continue
                return Descriptor(media_type, got, size)
        raise first_err or errdefs.NotFound(f"{self.spec}")

    # -- fetch ---------------------------------------------------------------------------------

    async def open(self, desc: Descriptor, offset: int = 0) -> httpx.Response:
        """A streamed GET of `desc` from `offset` (Range); the caller reads and closes it. A
        registry ignoring the Range gets its first `offset` bytes skipped by the caller:
        `response.extensions["skip"]` says how many."""
        kind = "manifests" if (mt.is_manifest(desc.media_type) or mt.is_index(desc.media_type)
                               or desc.media_type == mt.DOCKER_SCHEMA1) else "blobs"
        first_err: Optional[Exception] = None
        headers = {"Accept": f"{desc.media_type}, */*" if desc.media_type else "*/*"}
        if offset > 0:
            headers["Range"] = f"bytes={offset}-"
        for host in self.hosts_with(CAP_PULL):
            url = self.url(host, kind, desc.digest)
            try:
                resp = await self._open_following(host, url, headers)
            except errdefs.ContainerdError as err:
                first_err = first_err or err
                continue
            if resp.status_code > 299:
                await resp.aclose()
                if resp.status_code == 404:
                    first_err = first_err or errdefs.NotFound(f"content at {url} not found")
                else:
                    first_err = first_err or RegistryError(
                        f"unexpected status code {url}: {resp.status_code} {resp.reason_phrase}")
                continue
            skip = 0
            if offset > 0:
                cr = resp.headers.get("content-range", "")
                if cr:
                    if not cr.startswith(f"bytes {offset}-"):
                        await resp.aclose()
                        raise RegistryError(f"unhandled content range in response: {cr}")
                else:
                    skip = offset
            resp.extensions["skip"] = skip
            return resp
        if isinstance(first_err, errdefs.NotFound):
            raise errdefs.NotFound(f"could not fetch content descriptor {desc.digest} "
                                   f"({desc.media_type}) from remote")
        raise first_err or errdefs.NotFound("no pull hosts")

    async def _open_following(self, host: RegistryHost, url: str, headers: dict) -> httpx.Response:
        """GET with redirects followed by hand (a blob store URL gets no Authorization)."""
        resp = await self.request(host, "GET", url, scopes=self.scopes(), headers=headers, stream=True)
        hops = 0
        while resp.status_code in (301, 302, 303, 307, 308) and hops < 10:
            location = resp.headers.get("location", "")
            await resp.aclose()
            target = urljoin(url, location)
            hops += 1
            http = self.client(host)
            try:
                req = http.build_request("GET", target, headers={"User-Agent": USER_AGENT, **headers})
                resp = await http.send(req, stream=True)
            except httpx.TimeoutException:
                raise errdefs.DeadlineExceeded(f"GET {target}: registry timed out") from None
            except httpx.HTTPError as err:
                raise errdefs.Unavailable(f"GET {target}: {err}") from None
            url = target
        return resp

    async def fetch_bytes(self, desc: Descriptor, limit: int = mt.MAX_MANIFEST_SIZE) -> bytes:
        """A small blob or manifest, read whole and checked against its digest and size."""
        if desc.size > limit:
            raise errdefs.InvalidArgument(f"{desc.digest}: {desc.size} bytes is over the {limit} byte limit")
        resp = await self.open(desc)
        try:
            data = bytearray()
            async for chunk in resp.aiter_bytes():
                data += chunk
                if len(data) > limit or len(data) > desc.size:
                    raise errdefs.FailedPrecondition(
                        f"{desc.digest}: the registry sent more than the {desc.size} bytes expected")
        except httpx.TimeoutException:
            raise errdefs.DeadlineExceeded(f"fetching {desc.digest}: registry timed out") from None
        except httpx.HTTPError as err:
            raise errdefs.Unavailable(f"fetching {desc.digest}: {err}") from None
        finally:
            await resp.aclose()
        if len(data) != desc.size:
            raise errdefs.FailedPrecondition(f"{desc.digest}: the registry sent {len(data)} bytes, "
                                             f"expected {desc.size}")
        algorithm = desc.digest.split(":", 1)[0]
        actual = f"{algorithm}:" + hashlib.new(algorithm, bytes(data)).hexdigest()
        if actual != desc.digest:
            raise errdefs.FailedPrecondition(f"{desc.digest}: the registry sent content with digest {actual}")
        return bytes(data)

    # -- push ----------------------------------------------------------------------------------

    def push_host(self) -> RegistryHost:
        hosts = self.hosts_with(CAP_PUSH)
        if not hosts:
            raise errdefs.NotFound("no push hosts")
        return hosts[0]

    async def exists(self, desc: Descriptor, manifest_ref: str = "") -> bool:
        host = self.push_host()
        if manifest_ref:
            url = self.url(host, "manifests", manifest_ref)
        else:
            url = self.url(host, "blobs", desc.digest)
        try:
            resp = await self.request(host, "HEAD", url, scopes=self.scopes(push=True),
                                      headers={"Accept": f"{desc.media_type}, */*"})
        except AuthorizationFailed:
            return False
        if resp.status_code == 200:
            if manifest_ref and manifest_ref != desc.digest:
                return resp.headers.get("docker-content-digest", "") == desc.digest
            return True
        if resp.status_code != 404:
            raise RegistryError(f"HEAD {url}: unexpected status {resp.status_code} {resp.reason_phrase}")
        return False

    async def start_upload(self, desc: Descriptor, mount_from: str = "") -> Optional[str]:
        """POST an upload session; None when the registry mounted the blob from `mount_from`
        (201 Created), else the upload URL."""
        host = self.push_host()
        base = self.url(host, "blobs", "uploads") + "/"
        resp = None
        if mount_from:
            url = base + "?" + urlencode({"mount": desc.digest, "from": mount_from})
            try:
                resp = await self.request(host, "POST", url,
                                          scopes=self.scopes(True, (f"repository:{mount_from}:pull",)))
            except AuthorizationFailed:
                resp = None  # not allowed to read the source: upload instead
        if resp is None:
            resp = await self.request(host, "POST", base, scopes=self.scopes(push=True))
        if resp.status_code == 201:
            return None
        if resp.status_code not in (200, 202, 204):
            raise RegistryError(f"POST {base}: unexpected status {resp.status_code} {resp.reason_phrase}: "
                                f"{resp.text[:200]}")
        location = resp.headers.get("location", "")
        if not location:
            raise RegistryError(f"POST {base}: no upload location in the response")
        return urljoin(f"{host.scheme}://{host.host}/", location)

    async def upload(self, location: str, desc: Descriptor, body: Any, chunk_size: int = 0) -> None:
        """Upload the blob `desc` to session `location`: one PUT with the whole body, or (with
        chunk_size) PATCH requests of chunk_size bytes then a PUT that closes the session.
        `body` is a callable returning an async iterator of bytes."""
        host = self.push_host()
        scopes = self.scopes(push=True)
        if chunk_size > 0:
            offset = 0
            buf = bytearray()

            async def send(piece: bytes, location: str, offset: int) -> str:
                resp = await self.request(host, "PATCH", location, scopes=scopes, content=piece, headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{offset}-{offset + len(piece) - 1}",
                    "Content-Length": str(len(piece))})
                if resp.status_code not in (202, 204):
                    raise RegistryError(f"PATCH upload: unexpected status {resp.status_code} {resp.text[:200]}")
                return urljoin(location, resp.headers.get("location", location))

            async for chunk in body():
                buf += chunk
                while len(buf) >= chunk_size:
                    piece, buf = bytes(buf[:chunk_size]), buf[chunk_size:]
                    location = await send(piece, location, offset)
                    offset += len(piece)
            if buf:
                location = await send(bytes(buf), location, offset)
                offset += len(buf)
            if offset != desc.size:
                raise errdefs.FailedPrecondition(f"unexpected size {offset}, expected {desc.size}")
            content: Any = b""
            headers = {"Content-Length": "0"}
        else:
            content = body
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(desc.size)}
        sep = "&" if "?" in location else "?"
        url = location + sep + urlencode({"digest": desc.digest})
        resp = await self.request(host, "PUT", url, scopes=scopes, content=content, headers=headers)
        if resp.status_code not in (200, 201, 204):
            raise RegistryError(f"PUT upload of {desc.digest}: unexpected status {resp.status_code} "
                                f"{resp.reason_phrase}: {resp.text[:200]}")
        got = resp.headers.get("docker-content-digest", "")
        if got and got != desc.digest:
            raise errdefs.FailedPrecondition(f"got digest {got}, expected {desc.digest}")

    async def put_manifest(self, ref: str, desc: Descriptor, data: bytes) -> None:
        host = self.push_host()
        url = self.url(host, "manifests", ref)
        resp = await self.request(host, "PUT", url, scopes=self.scopes(push=True), content=data,
                                  headers={"Content-Type": desc.media_type})
        if resp.status_code not in (200, 201, 204):
            msg = f"PUT {url}: unexpected status {resp.status_code} {resp.reason_phrase}: {resp.text[:300]}"
            if mt.is_index(desc.media_type) and resp.status_code == 400:
                msg = "manifest list/index references to blobs and/or manifests are missing in your target registry: " + msg
            raise RegistryError(msg)
        got = resp.headers.get("docker-content-digest", "")
        if got and got != desc.digest:
            raise errdefs.FailedPrecondition(f"got digest {got}, expected {desc.digest}")


def registry_for(ref: str, options: Optional[RemoteOptions] = None) -> Registry:
    return Registry(parse_spec(ref), options)
