"""Platform specifiers ("linux/amd64", "linux/arm/v7") as containerd's platforms package reads
them: parse, normalize, the host's default, and matchers (`only`, `all`, `ordered`).
"""
from __future__ import annotations

import os
import re
from typing import Iterable, Optional, Sequence

from pycontainerd.core import errdefs

from .mediatypes import Platform

_COMPONENT = re.compile(r"^[A-Za-z0-9_-]+$")
_KNOWN_OS = {"aix", "android", "darwin", "dragonfly", "freebsd", "hurd", "illumos", "ios", "js",
             "linux", "nacl", "netbsd", "openbsd", "plan9", "solaris", "windows", "zos"}


def _normalize_arch(arch: str, variant: str) -> tuple[str, str]:
    arch, variant = arch.lower(), variant.lower()
    if arch in ("i386",):
        return "386", ""
    if arch in ("x86_64", "x86-64", "amd64"):
        return "amd64", "" if variant == "v1" else variant
    if arch in ("aarch64", "arm64"):
        return "arm64", "" if variant in ("8", "v8") else variant
    if arch == "armhf":
        return "arm", "v7"
    if arch == "armel":
        return "arm", "v6"
    if arch == "arm":
        if variant in ("", "7"):
            variant = "v7"
        elif variant in ("5", "6", "8"):
            variant = "v" + variant
        return "arm", variant
    return arch, variant


def normalize(p: Platform) -> Platform:
    arch, variant = _normalize_arch(p.architecture, p.variant)
    return Platform(os=(p.os or "").lower(), architecture=arch, variant=variant,
                    os_version=p.os_version, os_features=list(p.os_features))


def default() -> Platform:
    """The host's platform, normalized (linux/amd64 on x86_64)."""
    arch, variant = _normalize_arch(os.uname().machine, "")
    return Platform(os="linux", architecture=arch, variant=variant)


def parse(spec: str) -> Platform:
    """Parse "os", "arch", "os/arch" or "os/arch/variant" (normalized)."""
    if not spec or "*" in spec:
        raise errdefs.InvalidArgument(f"{spec!r}: invalid platform specifier")
    parts = spec.split("/")
    for part in parts:
        if not _COMPONENT.match(part):
            raise errdefs.InvalidArgument(f"{spec!r}: invalid platform component {part!r}")
    host = default()
    if len(parts) == 1:
        if parts[0].lower() in _KNOWN_OS:
            arch = host.architecture if parts[0].lower() == host.os else ""
            return normalize(Platform(os=parts[0], architecture=arch,
                                      variant=host.variant if arch else ""))
        return normalize(Platform(os=host.os, architecture=parts[0]))
    if len(parts) == 2:
        return normalize(Platform(os=parts[0], architecture=parts[1]))
    if len(parts) == 3:
        return normalize(Platform(os=parts[0], architecture=parts[1], variant=parts[2]))
    raise errdefs.InvalidArgument(f"{spec!r}: cannot parse platform specifier")


def format(p: Platform) -> str:
    s = f"{p.os or 'unknown'}/{p.architecture or 'unknown'}"
    return f"{s}/{p.variant}" if p.variant else s


class Matcher:
    """Matches platforms and orders them (best first)."""

    def __init__(self, wanted: Sequence[Platform], *, match_all: bool = False):
        self.wanted = [normalize(p) for p in wanted]
        self.match_all = match_all

    def _accepts(self, w: Platform, p: Platform) -> bool:
        if w.os != p.os or w.architecture != p.architecture:
            return False
        if w.variant == p.variant:
            return True
        if not p.variant:
            return True  # an image without a variant runs on any variant of its arch
        # arm: a v7 host also runs v6 and v5 images.
        if w.architecture == "arm" and w.variant and p.variant:
            return p.variant <= w.variant
        return False

    def match(self, p: Optional[Platform]) -> bool:
        if self.match_all or p is None:
            return True
        p = normalize(p)
        return any(self._accepts(w, p) for w in self.wanted)

    def rank(self, p: Optional[Platform]) -> int:
        if p is None:
            return len(self.wanted) + 1
        p = normalize(p)
        for i, w in enumerate(self.wanted):
            if self._accepts(w, p):
                return i
        return len(self.wanted)

    def __str__(self) -> str:
        return "all" if self.match_all else ",".join(format(w) for w in self.wanted)


def only(p: Platform) -> Matcher:
    return Matcher([p])


def all_platforms() -> Matcher:
    return Matcher([], match_all=True)


def from_specs(specs: Iterable[str], all_: bool = False) -> Matcher:
    if all_:
        return all_platforms()
    parsed = [parse(s) for s in specs]
    return Matcher(parsed or [default()])
