"""Image references two ways, as containerd has them:

- `Spec` / `parse_spec`: containerd's own reference ("host/path:tag@digest" -> locator + object),
  what pull and push resolve against; no defaults are added (ctr wants a full reference).
- Docker's normalized names: `normalize` ("alpine" -> "docker.io/library/alpine:latest", what an
  imported `docker save` tag becomes) and `familiar` (the reverse, for manifest.json RepoTags).
"""
from __future__ import annotations

import re
from dataclasses import dataclass


from pycontainerd.core import errdefs

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]*)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_NAME = rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_REFERENCE = re.compile(rf"^({_NAME})(?::({_TAG}))?(?:@({_DIGEST}))?$")
_ANCHORED_ID = re.compile(r"^[a-f0-9]{64}$")
_NAME_MAX = 255

DEFAULT_DOMAIN = "docker.io"
LEGACY_DOMAIN = "index.docker.io"
OFFICIAL_PREFIX = "library/"


@dataclass
class Named:
    domain: str
    path: str
    tag: str = ""
    digest: str = ""

    @property
    def name(self) -> str:
        return f"{self.domain}/{self.path}"

    def __str__(self) -> str:
        s = self.name
        if self.tag:
            s += ":" + self.tag
        if self.digest:
            s += "@" + self.digest
        return s


def _split_domain(name: str) -> tuple[str, str]:
    i = name.find("/")
    if i == -1 or ("." not in name[:i] and ":" not in name[:i] and name[:i] != "localhost"
                   and name[:i].lower() == name[:i]):
        domain, rest = DEFAULT_DOMAIN, name
    else:
        domain, rest = name[:i], name[i + 1:]
    if domain == LEGACY_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in rest:
        rest = OFFICIAL_PREFIX + rest
    return domain, rest


def parse_normalized(ref: str) -> Named:
    """Docker's ParseNormalizedNamed: "alpine:3" -> docker.io/library/alpine:3."""
    if _ANCHORED_ID.match(ref):
        raise errdefs.InvalidArgument(
            f"invalid repository name ({ref}), cannot specify 64-byte hexadecimal strings")
    domain, rest = _split_domain(ref)
    name_part = rest.split("@", 1)[0].split(":", 1)[0]
    if name_part.lower() != name_part:
        raise errdefs.InvalidArgument(f"invalid reference format: repository name must be lowercase: {ref!r}")
    m = _REFERENCE.match(f"{domain}/{rest}")
    if not m:
        raise errdefs.InvalidArgument(f"invalid reference format: {ref!r}")
    name, tag, dg = m.group(1), m.group(2) or "", m.group(3) or ""
    if len(name) > _NAME_MAX:
        raise errdefs.InvalidArgument(f"repository name must not be more than {_NAME_MAX} characters")
    d, _, p = name.partition("/")
    return Named(d, p, tag, dg)


def normalize(ref: str) -> str:
    """Docker's ParseDockerRef: normalized, a digest wins over a tag, no tag means ":latest"."""
    n = parse_normalized(ref)
    if n.digest:
        n.tag = ""
    elif not n.tag:
        n.tag = "latest"
    return str(n)


def familiar(ref: str) -> str:
    """The short form docker prints ("docker.io/library/alpine:latest" -> "alpine:latest"),
    tagged ":latest" when it has neither tag nor digest."""
    n = parse_normalized(ref)
    if not n.tag and not n.digest:
        n.tag = "latest"
    path = n.path
    if n.domain == DEFAULT_DOMAIN:
        if path.startswith(OFFICIAL_PREFIX) and "/" not in path[len(OFFICIAL_PREFIX):]:
            path = path[len(OFFICIAL_PREFIX):]
        s = path
    else:
        s = f"{n.domain}/{path}"
    if n.tag:
        s += ":" + n.tag
    if n.digest:
        s += "@" + n.digest
    return s


@dataclass
class Spec:
    """containerd's reference.Spec: Locator "host/repo/path", Object "tag", "tag@digest" or "@digest"."""

    locator: str
    object: str = ""

    @property
    def hostname(self) -> str:
        return self.locator.split("/", 1)[0]

    @property
    def repository(self) -> str:
        return self.locator.split("/", 1)[1] if "/" in self.locator else ""

    @property
    def tag(self) -> str:
        return self.object.split("@", 1)[0]

    @property
    def digest(self) -> str:
        return self.object.split("@", 1)[1] if "@" in self.object else ""

    def __str__(self) -> str:
        if not self.object:
            return self.locator
        if self.object.startswith("@"):
            return self.locator + self.object
        return f"{self.locator}:{self.object}"


def parse_spec(ref: str) -> Spec:
    """containerd's reference.Parse."""
    if "://" in ref:
        raise errdefs.InvalidArgument(f"{ref}: invalid reference")
    host, _, path = ref.partition("/")
    if not host:
        raise errdefs.InvalidArgument(f"{ref}: hostname required")
    if ":" in host and not host.rsplit(":", 1)[1].isdigit():
        raise errdefs.InvalidArgument(f"{ref}: invalid port in host")
    obj = ""
    m = re.search(r"[:@]", path)
    if m:
        obj = path[m.start():]
        if obj.startswith(":"):
            obj = obj[1:]
        path = path[:m.start()]
    path = "/".join(p for p in path.split("/") if p)
    return Spec(locator=f"{host}/{path}" if path else host, object=obj)


def oci_ref_name(name: str) -> str:
    """The org.opencontainers.image.ref.name for an image name: its object (the tag)."""
    try:
        return parse_spec(name).object
    except errdefs.ContainerdError:
        return name


def is_image_prefix(s: str, prefix: str) -> bool:
    if not s.startswith(prefix):
        return False
    return len(s) == len(prefix) or s[len(prefix)] in "/:@"


def ref_translator(base: str, check_prefix: bool):
    """ctr import's name translation of an org.opencontainers.image.ref.name: a bare tag gets
    `base:` in front; a full reference is kept (with --base-name, only when it has that prefix)."""
    def translate(ref: str) -> str:
        if any(c in ref for c in "/:@"):
            if check_prefix and not is_image_prefix(ref, base):
                return ""
            return ref
        return f"{base}:{ref}"
    return translate
