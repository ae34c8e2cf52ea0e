"""Content digests ("algorithm:hex") as the OCI image spec defines them: parse and validate."""
from __future__ import annotations

import re

from . import errdefs

ALGORITHMS = {"sha256": 64, "sha384": 96, "sha512": 128}
_FORM = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")


def parse(value: str) -> str:
    """Return `value` when it is a valid digest of a supported algorithm; InvalidArgument if not."""
    if not isinstance(value, str) or not _FORM.match(value):
        raise errdefs.InvalidArgument(f"invalid digest {value!r}: invalid checksum digest format")
    algorithm, _, encoded = value.partition(":")
    size = ALGORITHMS.get(algorithm)
    if size is None:
        raise errdefs.InvalidArgument(f"invalid digest {value!r}: unsupported digest algorithm")
    if len(encoded) != size or not re.fullmatch(r"[0-9a-f]+", encoded):
        raise errdefs.InvalidArgument(f"invalid digest {value!r}: invalid checksum digest length or characters")
    return value
