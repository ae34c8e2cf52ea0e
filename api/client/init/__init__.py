"""pyctr-init: the small init `pyctr run --init` puts in front of a container's command.

It is PID 1 of the container: it starts the command as its child, forwards every signal it gets
to that child and reaps zombies (what docker-init/tini do), then exits with the child's status.
It has to run inside any root filesystem, a busybox-static one without Python or a libc
included, so it is a C program (init.c, next to this file) linked statically. pyctr bind-mounts
the binary read-only at /sbin/pyctr-init and makes it the process's first argument:
`/sbin/pyctr-init -- CMD...`.

Where the binary comes from, first match wins:
1. $PYCTR_INIT, a path to a static init binary of your choosing;
2. `pyctr-init` next to this file (an install step may build it there:
   `python -m pycontainerd.api.client.init --output <that path>`);
3. a cached build `~/.cache/pycontainerd/pyctr-init-<hash of init.c>` ($XDG_CACHE_HOME
   respected), compiled on first use with `cc -static -Os` (gcc and a static libc, Debian's
   libc6-dev, are needed once). Without a compiler the error says so and how to get around it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

SOURCE = Path(__file__).with_name("init.c")
BUNDLED = Path(__file__).with_name("pyctr-init")
CONTAINER_PATH = "/sbin/pyctr-init"
"""Where the init appears inside the container."""


class InitUnavailable(RuntimeError):
    """No init binary and no way to build one; the message says what to do."""


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pycontainerd"


def _source_hash() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC") or "", "cc", "gcc", "musl-gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build(output: Path) -> Path:
    """Compile init.c into a static `output` (atomically: built aside, then renamed)."""
    if not SOURCE.is_file():
        raise InitUnavailable(f"--init needs pyctr-init and its source {SOURCE} is not installed "
                              "(set PYCTR_INIT to a static init binary)")
    cc = _compiler()
    if cc is None:
        raise InitUnavailable(
            "--init needs pyctr-init, a small static C program, and no C compiler was found to "
            "build it (install gcc and libc6-dev once, or set PYCTR_INIT to a static init binary)")
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".pyctr-init-", dir=output.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, "-static", "-Os", "-s", "-o", tmp, str(SOURCE)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise InitUnavailable(f"building pyctr-init with {cc} failed (a static libc, e.g. Debian's "
                                  f"libc6-dev, is needed): {proc.stderr.strip()[-600:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return output


def binary_path() -> str:
    """The host path of a static pyctr-init, building and caching it when needed."""
    explicit = os.environ.get("PYCTR_INIT")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise InitUnavailable(f"PYCTR_INIT={explicit} is not an executable file")
        return os.path.abspath(explicit)
    if BUNDLED.is_file() and os.access(BUNDLED, os.X_OK):
        return str(BUNDLED)
    cached = _cache_dir() / f"pyctr-init-{_source_hash() if SOURCE.is_file() else 'missing'}"
    if cached.is_file() and os.access(cached, os.X_OK):
        return str(cached)
    return str(build(cached))


def mount_spec(host_path: str) -> dict:
    """The OCI mount that puts the init at CONTAINER_PATH, read-only."""
    return {"destination": CONTAINER_PATH, "type": "bind", "source": host_path, "options": ["rbind", "ro"]}


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pycontainerd.api.client.init",
                                 description="build the static pyctr-init binary")
    ap.add_argument("--output", default=str(BUNDLED), help="where to write it (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        print(build(Path(args.output)))
    except InitUnavailable as err:
        print(f"pyctr-init: {err}", file=sys.stderr)
        return 1
    return 0

