"""`make demo`: the main job on the embedded defaults, end to end, in a throwaway root.

Starts the daemon on temporary root/state/socket paths, waits until it serves, and drives it
with pyctr the way a user would. Everything it starts is stopped and removed at the end.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def step(title: str, *argv: str, address: str) -> None:
    sys.stdout.write(f"\n$ pyctr {' '.join(argv)}    # {title}\n")
    sys.stdout.flush()
    subprocess.run([str(BIN / "pyctr"), "-a", address, *argv], check=True)


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="pycd-demo-"))
    address = str(tmp / "d.sock")
    log = open(tmp / "daemon.log", "wb")
    daemon = subprocess.Popen([str(BIN / "pycontainerd"), "--root", str(tmp / "root"), "--state",
                               str(tmp / "state"), "--address", address], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(address):
            if daemon.poll() is not None or time.monotonic() > deadline:
                sys.stderr.write((tmp / "daemon.log").read_text())
                sys.stderr.write("demo: the daemon did not start\n")
                return 1
            time.sleep(0.05)
        sys.stdout.write(f"pycontainerd is serving on {address}\n")
        step("client and server versions", "version", address=address)
        step("every plugin and its status", "plugins", "ls", address=address)
        step("a namespace of our own", "namespaces", "create", "demo", "purpose=demo", address=address)
        step("namespaces", "namespaces", "ls", address=address)
        step("a lease that expires in an hour", "-n", "demo", "leases", "create", "--id", "demo-lease",
             "--expires", "1h", address=address)
        step("leases", "-n", "demo", "leases", "ls", address=address)
        step("clean up", "-n", "demo", "leases", "rm", "demo-lease", address=address)
        step("clean up", "namespaces", "rm", "demo", address=address)
        return 0
    except subprocess.CalledProcessError as e:
        sys.stderr.write(f"demo: step failed: {e}\n")
        return 1
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
