"""pyctr makes containers exactly as ctr does: for each set of flags, `ctr containers create`
(or `ctr run -d` for run-only flags) and the same with pyctr, against the stock containerd 1.6,
then the two `ctr containers info` documents compared field by field — spec, labels, image,
runtime and its options, snapshotter — with only the id and times told apart."""
from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_run_support import GO_SHIM, IMAGE, USER_IMAGE, module_env, requirements, strip_ids  # noqa: E402

pytestmark = requirements


env = module_env("containerd")


def diff(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += diff(a.get(k), b.get(k), f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += diff(x, y, f"{path}[{i}]")
        return out
    return [] if a == b else [f"{path}: ctr={json.dumps(a)[:300]} pyctr={json.dumps(b)[:300]}"]


def compare_create(env, n: int, flags: list[str], image: str, args: list[str]) -> dict:
    ours, theirs = f"py{n}", f"go{n}"
    env.ctr("containers", "create", "--runtime", GO_SHIM, *flags, image, theirs, *args)
    env.pyctr("containers", "create", "--runtime", GO_SHIM, *flags, image, ours, *args)
    try:
        a, b = strip_ids(env.info(theirs), theirs), strip_ids(env.info(ours), ours)
        assert not diff(a, b), "\n".join(diff(a, b))
        return b
    finally:
        env.ctr("containers", "rm", theirs, check=False)
        env.ctr("containers", "rm", ours, check=False)


CREATE_CASES = [
    ([], IMAGE, []),
    ([], IMAGE, ["echo", "x"]),
    (["--label", "a=b", "--label", "flag", "--annotation", "k=v", "--env", "A=1", "--env", "PATH=/x",
      "--cwd", "/tmp"], IMAGE, ["printenv", "A"]),
    (["--mount", "type=bind,src=/tmp,dst=/host,options=rbind:ro", "--mount", "type=tmpfs,dst=/scratch",
      "--read-only", "--memory-limit", "67108864"], IMAGE, []),
    (["--net-host"], IMAGE, []),
    (["-t"], IMAGE, ["sh"]),
    (["--cap-add", "CAP_SYS_ADMIN", "--cap-drop", "CAP_KILL", "--allow-new-privs"], IMAGE, []),
    (["--with-ns", "network:/proc/1/ns/net", "--rootfs-propagation", "shared", "--device", "/dev/null"], IMAGE, []),
    (["--privileged"], IMAGE, []),
    ([], USER_IMAGE, []),
    (["--snapshotter", "native", "--snapshotter-label", "x=y"], IMAGE, ["true"]),
    (["--cpu-quota", "20000", "--cpu-period", "100000"], IMAGE, []),
]


@pytest.mark.parametrize("n", range(len(CREATE_CASES)), ids=[" ".join(c[0]) or c[1] for c in CREATE_CASES])
def test_create_matches_ctr(env, n):
    flags, image, args = CREATE_CASES[n]
    info = compare_create(env, n, flags, image, args)
    spec = info["Spec"]
    assert info["Runtime"]["Name"] == GO_SHIM
    if image == USER_IMAGE:  # the image's user resolved in the image's own /etc/passwd and /etc/group
        assert spec["process"]["user"] == {"uid": 1000, "gid": 1001, "additionalGids": [1001, 10, 29]}
    if "--net-host" in flags:
        assert f"HOSTNAME={socket.gethostname()}" in spec["process"]["env"]


def test_env_file_and_config_file(env, tmp_path):
    env_file = tmp_path / "env"
    env_file.write_text("FROM_FILE=1\nPATH=/file\n")
    compare_create(env, 100, ["--env-file", str(env_file), "--env", "B=2"], IMAGE, [])
    spec = {"ociVersion": "1.0.2-dev", "process": {"user": {"uid": 0, "gid": 0}, "args": ["true"], "cwd": "/"},
            "root": {"path": "rootfs"}, "linux": {"namespaces": [{"type": "pid"}]}}
    config = tmp_path / "config.json"
    config.write_text(json.dumps(spec))
    # with --config, the one argument is the id
    env.ctr("containers", "create", "--runtime", GO_SHIM, "--label", "l=1", "--config", str(config), "gocfg")
    env.pyctr("containers", "create", "--runtime", GO_SHIM, "--label", "l=1", "--config", str(config), "pycfg")
    try:
        assert not diff(strip_ids(env.info("gocfg"), "gocfg"), strip_ids(env.info("pycfg"), "pycfg"))
    finally:
        env.ctr("containers", "rm", "gocfg", "pycfg", check=False)


def test_rootfs_matches_ctr(env, tmp_path):
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    compare_create(env, 101, ["--rootfs"], str(root), ["/bin/true"])


RUN_CASES = [
    [],
    ["--cpus", "1.5", "--cpu-shares", "512"],
    ["--cgroup", "/pyctrtest/custom", "--runc-binary", "/usr/sbin/runc"],
]


@pytest.mark.parametrize("n", range(len(RUN_CASES)), ids=[" ".join(c) or "defaults" for c in RUN_CASES])
def test_run_matches_ctr(env, n):
    """Run-only flags (--cpus, --cpu-shares with its default 1024, --cgroup, runc options) via
    `run -d` of a process that stays up."""
    flags = RUN_CASES[n]
    ours, theirs = f"pyrun{n}", f"gorun{n}"
    env.ctr("run", "-d", "--runtime", GO_SHIM, *flags, IMAGE, theirs, "sleep", "60")
    env.pyctr("run", "-d", "--runtime", GO_SHIM, "--fifo-dir", env.fifo_dir, *flags, IMAGE, ours, "sleep", "60")
    try:
        a, b = strip_ids(env.info(theirs), theirs), strip_ids(env.info(ours), ours)
        if "--cgroup" in flags:
            assert a["Spec"]["linux"]["cgroupsPath"] == "/pyctrtest/custom"
            a["Spec"]["linux"].pop("cgroupsPath")
            b["Spec"]["linux"].pop("cgroupsPath")
        assert not diff(a, b), "\n".join(diff(a, b))
        assert b["Spec"]["linux"]["resources"]["cpu"]["shares"] == (512 if "--cpu-shares" in flags else 1024)
    finally:
        for cid in (ours, theirs):
            env.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
        for cid in (ours, theirs):
            env.wait_status(cid, "STOPPED")
            env.ctr("tasks", "rm", cid, check=False)
            env.ctr("containers", "rm", cid, check=False)


def test_labels_and_runtime_options_stored_as_ctr(env):
    info = compare_create(env, 102, ["--label", "io.containerd.image.config.stop-signal=SIGINT"], IMAGE, [])
    # a --label overrides the image's stop signal? no: ctr sets the stop signal label last
    assert info["Labels"]["io.containerd.image.config.stop-signal"] == "SIGTERM"
    assert info["Runtime"]["Options"] == {"type_url": "containerd.runc.v1.Options"}
    assert info["Spec"]["annotations"] == {"io.containerd.image.config.stop-signal": "SIGINT"}
    assert not any(k.startswith("oomScoreAdj") for k in info["Spec"]["process"])
