"""`make demo`: the main job on the embedded defaults, end to end, in a throwaway root.

Starts the daemon on temporary root/state/socket paths, imports the busybox image pyctr builds
from the machine's /usr/bin/busybox (busybox-static), runs containers in it with the Python shim,
and cleans up. Everything it starts is stopped and removed at the end, even on failure.
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


def wait_stopped(address: str, task: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run([str(BIN / "pyctr"), "-a", address, "tasks", "ls"], capture_output=True,
                             text=True).stdout
        if any(line.split()[:1] == [task] and "STOPPED" in line for line in out.splitlines()):
            return
        time.sleep(0.1)
    raise subprocess.CalledProcessError(1, ["tasks", "ls"], f"{task} did not stop")


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
        step("import the embedded busybox image and unpack it", "images", "import", "--busybox",
             address=address)
        step("images", "images", "ls", address=address)
        step("run a container with our Python shim (the default runtime)", "run", "--rm",
             "docker.io/library/busybox:latest", "demo-hello", "sh", "-c",
             "echo hello from $(hostname), pid $$ in its own namespace; uname -a", address=address)
        step("run one in the background", "run", "-d", "docker.io/library/busybox:latest", "demo-sleep",
             "sleep", "600", address=address)
        step("tasks", "tasks", "ls", address=address)
        step("exec into it", "tasks", "exec", "--exec-id", "demo-exec", "demo-sleep", "ps", address=address)
        step("stop it", "tasks", "kill", "--signal", "SIGKILL", "demo-sleep", address=address)
        wait_stopped(address, "demo-sleep")
        step("remove it", "tasks", "rm", "demo-sleep", address=address)
        step("and its container", "containers", "rm", "demo-sleep", address=address)
        step("remove the image, collecting its content and snapshots", "images", "rm", "--sync",
             "docker.io/library/busybox:latest", address=address)
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
