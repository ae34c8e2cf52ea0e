"""What the ctr-driven tests share: the team's helpers in ../shared (read-only: the stock-ctr
conformance script and the busybox OCI archive maker), found beside this checkout or at
/work/shared; the stock ctr run against a daemon; digests."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from daemons import Daemon

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" if (REPO.parent / "shared").is_dir() else Path("/work/shared")
CONFORMANCE = SHARED / "conformance" / "ctr-conformance.py"
MAKE_IMAGE = SHARED / "conformance" / "make-busybox-image.py"
CTR = shutil.which("ctr")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_busybox_tar(out: Path, *args: str) -> Path:
    """An OCI archive of busybox from ../shared's maker (extra `args`: --extra-mb, --layers, ...)."""
    subprocess.run([sys.executable, str(MAKE_IMAGE), *args, str(out)], check=True, capture_output=True)
    return out


def ctr(d: Daemon, *args: str, ns: str = "default", input: bytes | None = None, ok: bool = True
        ) -> subprocess.CompletedProcess:
    """The stock ctr against `d` in namespace `ns`; with `ok`, it must succeed."""
    p = subprocess.run([CTR, "-a", d.address, "-n", ns, *args], input=input, capture_output=True, timeout=120)
    if ok:
        assert p.returncode == 0, (args, p.stderr.decode(), d.log())
    return p
