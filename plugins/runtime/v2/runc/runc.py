"""The runc command line, as containerd's go-runc drives it.

Every command gets the global flags `--root <root>/<namespace> --log <bundle>/log.json
--log-format json` (plus `--criu`, `--systemd-cgroup` from the runc options). Commands that are
given the process's stdio (create, exec, restore) fail with "runc did not terminate successfully:
exit status N"; the others capture stdout+stderr and fail with "exit status N: <output>".
`runtime_error` then prefers the last error-level message runc wrote to log.json, as the Go shim
reports "OCI runtime create failed: <that message>".
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from .launch import RUNC_ROOT
from .reaper import Reaper


class RuncError(Exception):
    """A runc command failed; str() is go-runc's error text."""

    def __init__(self, message: str, status: int = -1, *, not_started: bool = False):
        super().__init__(message)
        self.status = status
        self.not_started = not_started  # runc could not even be executed: log.json says nothing of it


@dataclass
class IOFds:
    """The stdio fds a runc command hands to the container process (None: /dev/null)."""

    stdin: int | None = None
    stdout: int | None = None
    stderr: int | None = None
    extra: dict[int, int] = field(default_factory=dict)


class Runc:
    def __init__(self, reaper: Reaper, *, command: str = "", root: str = "", namespace: str = "",
                 log: str = "", criu: str = "", systemd_cgroup: bool = False) -> None:
        self.reaper = reaper
        self.command = command or "runc"
        self.root = os.path.join(root or RUNC_ROOT, namespace)
        self.log = log
        self.criu = criu
        self.systemd_cgroup = systemd_cgroup

    def argv(self, *args: str) -> list[str]:
        argv = [self.command, "--root", self.root]
        if self.log:
            argv += ["--log", self.log, "--log-format", "json"]
        if self.criu:
            argv += ["--criu", self.criu]
        if self.systemd_cgroup:
            argv.append("--systemd-cgroup")
        argv.extend(args)
        return argv

    def _exec_error(self, err: OSError) -> RuncError:
        return RuncError(f'exec: "{self.command}": {err.strerror or err}', not_started=True)

    async def _run_or_error(self, *args: str, input: bytes | None = None) -> bytes:
        try:
            code, out = await self.reaper.run(self.argv(*args), input=input)
        except OSError as err:
            raise self._exec_error(err) from None
        if code != 0:
            raise RuncError(f"exit status {code}: {out.decode(errors='replace')}", code)
        return out

    async def _run_with_io(self, args: list[str], io: IOFds) -> None:
        try:
            code, _ = await self.reaper.run(self.argv(*args), stdin=io.stdin, stdout=io.stdout,
                                            stderr=io.stderr, fds=io.extra or None, combined=False)
        except OSError as err:
            raise self._exec_error(err) from None
        if code != 0:
            raise RuncError(f"{self.command} did not terminate successfully: exit status {code}", code)

    # ---------------------------------------------------------------------------- commands

    async def create(self, id: str, bundle: str, io: IOFds, *, pid_file: str, console_socket: str = "",
                     no_pivot: bool = False, no_new_keyring: bool = False) -> None:
        args = ["create", "--bundle", bundle, "--pid-file", os.path.abspath(pid_file)]
        if console_socket:
            args += ["--console-socket", console_socket]
        if no_pivot:
            args.append("--no-pivot")
        if no_new_keyring:
            args.append("--no-new-keyring")
        args.append(id)
        await self._run_with_io(args, io)

    async def start(self, id: str) -> None:
        await self._run_or_error("start", id)

    async def exec(self, id: str, process_file: str, io: IOFds, *, pid_file: str,
                   console_socket: str = "", detach: bool = True) -> None:
        args = ["exec", "--process", process_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        if detach:
            args.append("--detach")
        args += ["--pid-file", os.path.abspath(pid_file), id]
        await self._run_with_io(args, io)

    async def delete(self, id: str, force: bool = False) -> None:
        await self._run_or_error("delete", *(["--force"] if force else []), id)

    async def kill(self, id: str, sig: int, all: bool = False) -> None:
        await self._run_or_error("kill", *(["--all"] if all else []), id, str(sig))

    async def pause(self, id: str) -> None:
        await self._run_or_error("pause", id)

    async def resume(self, id: str) -> None:
        await self._run_or_error("resume", id)

    async def ps(self, id: str) -> list[int]:
        out = await self._run_or_error("ps", "--format", "json", id)
        pids = json.loads(out or b"null")
        return [int(p) for p in pids or []]

    async def state(self, id: str) -> dict[str, Any]:
        return json.loads(await self._run_or_error("state", id))

    async def update(self, id: str, resources_json: bytes) -> None:
        await self._run_or_error("update", "--resources", "-", id, input=resources_json)

    async def checkpoint(self, id: str, *, image_path: str, work_dir: str = "", parent_path: str = "",
                         allow_open_tcp: bool = False, allow_external_unix_sockets: bool = False,
                         allow_terminal: bool = False, file_locks: bool = False,
                         empty_namespaces: list[str] | None = None, cgroups_mode: str = "",
                         leave_running: bool = True) -> None:
        args = ["checkpoint", *_checkpoint_args(image_path, work_dir, parent_path, allow_open_tcp,
                                                 allow_external_unix_sockets, allow_terminal, file_locks,
                                                 empty_namespaces, cgroups_mode)]
        if leave_running:
            args.append("--leave-running")
        await self._run_or_error(*args, id)

    async def restore(self, id: str, bundle: str, io: IOFds, *, image_path: str, work_dir: str = "",
                      parent_path: str = "", pid_file: str, console_socket: str = "",
                      no_pivot: bool = False) -> None:
        args = ["restore", *_checkpoint_args(image_path, work_dir, parent_path), "--detach",
                "--pid-file", os.path.abspath(pid_file)]
        if console_socket:
            args += ["--console-socket", console_socket]
        if no_pivot:
            args.append("--no-pivot")
        args += ["-no-subreaper", "--bundle", bundle, id]
        await self._run_with_io(args, io)

    # ---------------------------------------------------------------------------- errors

    def last_error(self) -> str:
        """The message of the last error-level entry in runc's log.json ("" when none)."""
        if not self.log or not os.path.exists(self.log):
            return ""
        message = ""
        with open(self.log, "rb") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict) and entry.get("level") == "error":
                    message = str(entry.get("msg", "")).strip()
        return message

    def runtime_error(self, err: Exception, message: str) -> str:
        """containerd's runtimeError: "<message>: <last runc error>" or "<message>: <err>" (and
        always the latter when runc did not run: an older error in log.json is not this one's)."""
        if getattr(err, "not_started", False):
            return f"{message}: {err}"
        try:
            last = self.last_error()
        except OSError as read_err:
            return f"{message}: unable to retrieve OCI runtime error ({read_err}): {err}"
        if not last:
            return f"{message}: {err}"
        return f"{message}: {last}"


def _checkpoint_args(image_path: str, work_dir: str = "", parent_path: str = "", allow_open_tcp: bool = False,
                     allow_external_unix_sockets: bool = False, allow_terminal: bool = False,
                     file_locks: bool = False, empty_namespaces: list[str] | None = None,
                     cgroups_mode: str = "") -> list[str]:
    out: list[str] = []
    if image_path:
        out += ["--image-path", image_path]
    if work_dir:
        out += ["--work-path", work_dir]
    if parent_path:
        out += ["--parent-path", parent_path]
    if allow_open_tcp:
        out.append("--tcp-established")
    if allow_external_unix_sockets:
        out.append("--ext-unix-sk")
    if allow_terminal:
        out.append("--shell-job")
    if file_locks:
        out.append("--file-locks")
    if cgroups_mode:
        out += ["--manage-cgroups-mode", cgroups_mode]
    for ns in empty_namespaces or []:
        out += ["--empty-ns", ns]
    return out


def read_pid_file(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())
