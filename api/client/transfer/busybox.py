"""The embedded default image: an OCI image archive built from the host's static busybox, with
nothing but this project's code and the standard library.

One layer (tar.gz): /bin/busybox (a copy of the host binary) and a /bin/<applet> symlink for every
applet it lists, /etc/passwd, /etc/group, /etc/hostname, and the usual empty directories (/tmp
mode 1777). The config runs `sh` with a standard PATH on linux/<host arch>. Every timestamp is
fixed and every list sorted, so the same busybox binary always gives the same bytes and digests.

    pyctr images busybox OUT.tar                # write the archive
    pyctr images import --busybox               # import it as docker.io/library/busybox:latest
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, Optional

from pycontainerd.core import errdefs

from . import mediatypes as mt
from . import platforms as plat

DEFAULT_NAME = "docker.io/library/busybox:latest"
MTIME = 1700000000  # 2023-11-14T22:13:20Z
CREATED = "2023-11-14T22:13:20Z"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CANDIDATES = ("/usr/bin/busybox", "/bin/busybox", "/usr/sbin/busybox")
DIRS = [("bin", 0o755), ("dev", 0o755), ("etc", 0o755), ("home", 0o755), ("proc", 0o755),
        ("root", 0o700), ("sys", 0o755), ("tmp", 0o1777), ("usr", 0o755), ("usr/bin", 0o755),
        ("usr/sbin", 0o755), ("var", 0o755), ("var/tmp", 0o1777)]
PASSWD = (b"root:x:0:0:root:/root:/bin/sh\n"
          b"daemon:x:1:1:daemon:/usr/sbin:/bin/false\n"
          b"nobody:x:65534:65534:nobody:/home:/bin/false\n")
GROUP = b"root:x:0:\ndaemon:x:1:\ntty:x:5:\nnogroup:x:65534:\n"


@dataclass
class BusyboxImage:
    archive: bytes
    manifest_digest: str
    config_digest: str
    layer_digest: str
    diff_id: str
    name: str


def find_busybox(path: Optional[str] = None) -> str:
    for p in ([path] if path else []) + list(CANDIDATES) + [shutil.which("busybox") or ""]:
        if p and os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    raise errdefs.NotFound("no busybox binary found (install Debian's busybox-static)")


def is_static_elf(data: bytes) -> bool:
    """True for an ELF executable without a PT_INTERP program header (statically linked)."""
    if data[:4] != b"\x7fELF":
        return False
    is64, little = data[4] == 2, data[5] == 1
    e = "<" if little else ">"
    if is64:
        phoff, = struct.unpack_from(e + "Q", data, 0x20)
        phentsize, phnum = struct.unpack_from(e + "HH", data, 0x36)
    else:
        phoff, = struct.unpack_from(e + "I", data, 0x1C)
        phentsize, phnum = struct.unpack_from(e + "HH", data, 0x2A)
    for i in range(phnum):
        p_type, = struct.unpack_from(e + "I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def applets(binary: str) -> list[str]:
    out = subprocess.run([binary, "--list"], capture_output=True, text=True, check=True).stdout
    return sorted({a for a in out.split() if a and "/" not in a} - {"busybox"})


def _add(tar: tarfile.TarFile, name: str, data: Optional[bytes] = None, mode: int = 0o644,
         kind: bytes = tarfile.REGTYPE, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.mtime = MTIME
    info.mode = mode
    info.type = kind
    info.linkname = linkname
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    if data is not None:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


def build_layer(binary: bytes, names: list[str]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for d, mode in DIRS:
            _add(tar, d + "/", kind=tarfile.DIRTYPE, mode=mode)
        _add(tar, "bin/busybox", binary, mode=0o755)
        for a in names:
            _add(tar, f"bin/{a}", kind=tarfile.SYMTYPE, linkname="busybox", mode=0o777)
        _add(tar, "etc/group", GROUP)
        _add(tar, "etc/hostname", b"busybox\n")
        _add(tar, "etc/passwd", PASSWD)
    return raw.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def build(name: str = DEFAULT_NAME, busybox: Optional[str] = None,
          platform: Optional[mt.Platform] = None) -> BusyboxImage:
    """Build the archive in memory (about 1 MiB)."""
    path = find_busybox(busybox)
    with open(path, "rb") as f:
        binary = f.read()
    if not is_static_elf(binary):
        raise errdefs.FailedPrecondition(f"{path} is dynamically linked; a container needs a static "
                                         f"busybox (Debian's busybox-static)")
    p = platform or plat.default()
    raw = build_layer(binary, applets(path))
    diff_id = _digest(raw)
    layer = gzip.compress(raw, compresslevel=9, mtime=0)
    config = {
        "architecture": p.architecture,
        "config": {"Cmd": ["sh"], "Env": [PATH_ENV]},
        "created": CREATED,
        "history": [{"created": CREATED, "created_by": "pycontainerd images busybox"}],
        "os": p.os or "linux",
        "rootfs": {"diff_ids": [diff_id], "type": "layers"},
    }
    if p.variant:
        config["variant"] = p.variant
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": _digest(config_bytes), "size": len(config_bytes)},
        "layers": [{"mediaType": mt.OCI_LAYER_GZIP, "digest": _digest(layer), "size": len(layer)}],
    }
    manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
    platform_json = {"architecture": p.architecture, "os": p.os or "linux"}
    if p.variant:
        platform_json["variant"] = p.variant
    index = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [{
        "mediaType": mt.OCI_MANIFEST, "digest": _digest(manifest_bytes), "size": len(manifest_bytes),
        "annotations": {mt.ANNOTATION_IMAGE_NAME: name, mt.ANNOTATION_REF_NAME: tag},
        "platform": platform_json}]}
    blobs = {_digest(b): b for b in (config_bytes, layer, manifest_bytes)}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        _add(tar, "blobs/", kind=tarfile.DIRTYPE, mode=0o755)
        _add(tar, "blobs/sha256/", kind=tarfile.DIRTYPE, mode=0o755)
        for d in sorted(blobs):
            _add(tar, "blobs/sha256/" + d.split(":", 1)[1], blobs[d], mode=0o444)
        _add(tar, "index.json", json.dumps(index, separators=(",", ":")).encode())
        _add(tar, "oci-layout", json.dumps({"imageLayoutVersion": mt.OCI_LAYOUT_VERSION}).encode(), mode=0o444)
    return BusyboxImage(out.getvalue(), _digest(manifest_bytes), _digest(config_bytes), _digest(layer),
                        diff_id, name)


def write(out: BinaryIO, name: str = DEFAULT_NAME, busybox: Optional[str] = None) -> BusyboxImage:
    img = build(name, busybox)
    out.write(img.archive)
    return img
