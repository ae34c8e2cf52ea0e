"""Registry hosts for a reference's host name, as containerd's remotes/docker/config does:

- with a hosts directory (`--hosts-dir`, containerd's config_path), `<dir>/<host>/hosts.toml`
  (or `<dir>/<host>_<port>_/`, then `<dir>/_default/`) lists mirrors as `[host."url"]` tables,
  tried in file order, before the `server`; each has `capabilities` (pull, resolve, push), `ca`,
  `client`, `skip_verify`, `header` and `override_path`. A directory without hosts.toml supplies
  docker-style certs.d files (*.crt CAs, *.cert/*.key client pairs).
- without one, the host itself: https, except plain http for localhost/127.0.0.1/::1 (or for every
  host with --plain-http); docker.io means registry-1.docker.io.
"""
from __future__ import annotations

import ipaddress
import os
import ssl
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlsplit

from pycontainerd.core import errdefs

try:  # Python 3.11+
    import tomllib
except ImportError:  # pragma: no cover
    import tomli as tomllib  # type: ignore

CAP_PULL, CAP_RESOLVE, CAP_PUSH = 1, 2, 4
ALL_CAPS = CAP_PULL | CAP_RESOLVE | CAP_PUSH


@dataclass
class RegistryHost:
    scheme: str
    host: str
    path: str = "/v2"
    capabilities: int = ALL_CAPS
    ca_certs: list[str] = field(default_factory=list)
    client_pairs: list[tuple[str, str]] = field(default_factory=list)
    skip_verify: Optional[bool] = None
    header: dict[str, list[str]] = field(default_factory=dict)

    def has(self, caps: int) -> bool:
        return self.capabilities & caps == caps

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}{self.path}"

    def ssl_context(self, default_skip_verify: bool = False, default_ca: str = "",
                    default_client: tuple[str, str] = ("", "")) -> Optional[ssl.SSLContext]:
        """TLS for this host: the system CAs plus `ca` files, client pairs, skip_verify (the
        command line's --tlscacert, --tlscert/--tlskey and --skip-verify as defaults)."""
        if self.scheme != "https":
            return None
        ctx = ssl.create_default_context()
        try:
            if default_ca:
                ctx.load_verify_locations(cafile=default_ca)
            if default_client[0]:
                ctx.load_cert_chain(default_client[0], default_client[1] or None)
        except (OSError, ssl.SSLError) as err:
            raise errdefs.InvalidArgument(f"failed to load TLS files: {err}") from None
        for ca in self.ca_certs:
            try:
                ctx.load_verify_locations(cafile=ca)
            except (OSError, ssl.SSLError) as err:
                raise errdefs.InvalidArgument(f"unable to load CA cert {ca!r}: {err}") from None
        for cert, key in self.client_pairs:
            try:
                ctx.load_cert_chain(cert, key or None)
            except (OSError, ssl.SSLError) as err:
                raise errdefs.InvalidArgument(f"failed to load X509 key pair {cert!r}: {err}") from None
        skip = self.skip_verify if self.skip_verify is not None else default_skip_verify
        if skip:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


def is_localhost(host: str) -> bool:
    name = host
    if name.startswith("["):
        name = name[1:].split("]", 1)[0]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_directory(host: str) -> str:
    i = host.rfind(":")
    if i > 0:
        return f"{host[:i]}_{host[i + 1:]}_"
    return host


def find_host_dir(root: str, host: str) -> Optional[str]:
    candidates = []
    ch = host_directory(host)
    if ch != host:
        candidates.append(os.path.join(root, ch))
    candidates += [os.path.join(root, host), os.path.join(root, "_default")]
    for c in candidates:
        if os.path.exists(c):
            return c
    return None


def _abs(p: str, base: str) -> str:
    return p if os.path.isabs(p) else os.path.join(base, p)


def _parse_host(server: str, base: str, cfg: dict) -> RegistryHost:
    result = RegistryHost(scheme="", host="", path="")
    if server:
        if not server.startswith("http"):
            server = "https://" + server
        u = urlsplit(server)
        result.scheme, result.host = u.scheme, u.netloc
        path = u.path
        override = bool(cfg.get("override_path", False))
        if path:
            path = os.path.normpath(path)
            if not path.endswith("/v2") and not override:
                path += "/v2"
        elif not override:
            path = "/v2"
        result.path = path
    caps = cfg.get("capabilities")
    if caps:
        result.capabilities = 0
        for c in caps:
            flag = {"pull": CAP_PULL, "resolve": CAP_RESOLVE, "push": CAP_PUSH}.get(str(c).lower())
            if flag is None:
                raise errdefs.InvalidArgument(f"unknown capability {c}")
            result.capabilities |= flag
    else:
        result.capabilities = ALL_CAPS
    if "skip_verify" in cfg:
        result.skip_verify = bool(cfg["skip_verify"])
    ca = cfg.get("ca")
    if isinstance(ca, str):
        result.ca_certs = [_abs(ca, base)]
    elif isinstance(ca, list):
        result.ca_certs = [_abs(str(c), base) for c in ca]
    elif ca is not None:
        raise errdefs.InvalidArgument(f'invalid type {type(ca).__name__} for "ca"')
    client = cfg.get("client")
    if isinstance(client, str):
        result.client_pairs = [(_abs(client, base), "")]
    elif isinstance(client, list):
        for item in client:
            if isinstance(item, str):
                result.client_pairs.append((_abs(item, base), ""))
            elif isinstance(item, list) and len(item) == 2:
                result.client_pairs.append((_abs(str(item[0]), base), _abs(str(item[1]), base)))
            else:
                raise errdefs.InvalidArgument(f'invalid pair {item!r} for "client"')
    header = cfg.get("header") or {}
    for k, v in header.items():
        result.header[k] = [str(x) for x in v] if isinstance(v, list) else [str(v)]
    return result


def parse_hosts_toml(text: str, base: str) -> list[RegistryHost]:
    """The hosts a hosts.toml lists: its [host."..."] tables in file order, then `server`."""
    try:
        tree = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise errdefs.InvalidArgument(f"failed to parse TOML: {err}") from None
    hosts = []
    for name, cfg in (tree.get("host") or {}).items():  # tomllib keeps file order
        hosts.append(_parse_host(name, base, cfg if isinstance(cfg, dict) else {}))
    hosts.append(_parse_host(str(tree.get("server", "")), base, tree))
    return hosts


def _cert_files(d: str) -> list[RegistryHost]:
    host = RegistryHost(scheme="", host="", path="")
    try:
        names = sorted(os.listdir(d))
    except OSError:
        return [host]
    for n in names:
        p = os.path.join(d, n)
        if n.endswith(".crt"):
            host.ca_certs.append(p)
        elif n.endswith(".cert"):
            key = p[:-5] + ".key"
            host.client_pairs.append((p, key if os.path.exists(key) else ""))
    return [host]


def configure_hosts(host: str, hosts_dir: str = "", plain_http: bool = False) -> list[RegistryHost]:
    """The registry hosts to try for reference host `host`, in order."""
    hosts: list[RegistryHost] = []
    if hosts_dir:
        d = find_host_dir(hosts_dir, host)
        if d:
            path = os.path.join(d, "hosts.toml")
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    hosts = parse_hosts_toml(f.read(), d)
            else:
                hosts = _cert_files(d)
    if not hosts:
        hosts = [RegistryHost(scheme="", host="", path="")]
    last = hosts[-1]
    if not last.host:
        if host == "docker.io":
            last.scheme, last.host = "https", "registry-1.docker.io"
        elif is_localhost(host):
            last.host = host
            last.scheme = "http"
            if last.skip_verify is None:
                last.skip_verify = True
        else:
            last.host = host
            last.scheme = "http" if plain_http else "https"
        last.path = "/v2"
        last.capabilities = ALL_CAPS
    return hosts
