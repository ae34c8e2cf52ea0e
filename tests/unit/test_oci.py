"""OCI spec generation (api/client/oci.py) without a daemon: containerd's defaults, options,
users and groups read from a root filesystem, image configs, Go-style JSON."""
from __future__ import annotations

import json
import os

import pytest

from pycontainerd.api.client import oci
from pycontainerd.core import errdefs

# What `ctr containers create bb:latest c1 echo x` stores on containerd 1.6.20 for a busybox
# image whose config has Env ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"] and no User (captured from
# the real daemon; tests/integration/test_run_spec.py compares live).
CTR_CREATE_SPEC = {
    "ociVersion": "1.0.2-dev",
    "process": {
        "user": {"uid": 0, "gid": 0, "additionalGids": [0]},
        "args": ["echo", "x"],
        "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
        "cwd": "/",
        "capabilities": {k: list(oci.DEFAULT_CAPABILITIES) for k in ("bounding", "effective", "permitted")},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": True,
    },
    "root": {"path": "rootfs"},
    "mounts": oci.default_mounts(),
    "annotations": {"a": "b"},
    "linux": {
        "resources": {"devices": [
            {"allow": False, "access": "rwm"},
            *[{"allow": True, "type": "c", "major": ma, "minor": mi, "access": "rwm"}
              for ma, mi in [(1, 3), (1, 8), (1, 7), (5, 0), (1, 5), (1, 9), (5, 1)]],
            {"allow": True, "type": "c", "major": 136, "access": "rwm"},
            {"allow": True, "type": "c", "major": 5, "minor": 2, "access": "rwm"},
        ]},
        "cgroupsPath": "/default/c1",
        "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
        "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                        "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                        "/proc/scsi"],
        "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
    },
}

BUSYBOX_CONFIG = oci.ImageConfig(env=["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], cmd=["/bin/sh"], working_dir="/")


@pytest.fixture
def rootfs(tmp_path):
    """A root filesystem with users and groups; /etc/group reached through a relative symlink and
    /etc/passwd through an absolute one (both must resolve inside the rootfs)."""
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "lib").mkdir()
    (root / "lib" / "passwd").write_text(
        "# comment\n\nroot:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n"
        "short:x:1002\nbad:x:notanumber:7::/:/bin/false\n")
    os.symlink("/lib/passwd", root / "etc" / "passwd")
    (root / "lib" / "group").write_text(
        "root:x:0:\nstaff:x:1001:\nwheel:x:10:app,other\naudio:x:29:other,app\napp:x:4242:app\n")
    os.symlink("../lib/group", root / "etc" / "group")
    return str(root)


def ctx_for(root: str = "", cid: str = "c1") -> oci.SpecContext:
    return oci.SpecContext(namespace="default", id=cid)


def gen(*opts, root: str = "", cid: str = "c1") -> dict:
    spec = oci.generate_spec(ctx_for(root, cid), *((oci.with_rootfs_path(root),) if root else ()), *opts)
    return oci.marshal(spec)


# -- the default spec and ctr's option order ---------------------------------------------------

def test_default_spec_matches_ctr_create(rootfs):
    # ctr's order: default devices, env, mounts, image config, args, annotations(labels)
    spec = oci.generate_spec(ctx_for(), oci.with_default_unix_devices, oci.with_env([]), oci.with_mounts([]),
                             oci.with_rootfs_path(rootfs), oci.with_image_config(BUSYBOX_CONFIG),
                             oci.with_process_args("echo", "x"), oci.with_annotations({"a": "b"}),
                             oci.with_rootfs_path("rootfs"))
    assert oci.marshal(spec) == CTR_CREATE_SPEC
    assert list(oci.marshal(spec)) == ["ociVersion", "process", "root", "mounts", "annotations", "linux"]


def test_default_spec_basics():
    spec = oci.marshal(oci.default_spec("ns1", "web"))
    assert spec["linux"]["cgroupsPath"] == "/ns1/web"
    assert "oomScoreAdj" not in spec["process"]  # never a (negative) oom score by default
    assert "args" not in spec["process"] and "env" not in spec["process"]
    assert spec["process"]["user"] == {"uid": 0, "gid": 0}
    with pytest.raises(errdefs.FailedPrecondition):
        oci.default_spec("", "x")


def test_spec_bytes_is_go_json():
    spec = oci.default_spec("default", "c1")
    oci.with_env(["A=<b>&c"])(ctx_for(), spec)
    raw = oci.spec_bytes(spec)
    assert b" " not in raw.split(b'"A=')[0]  # compact
    assert b'"A=\\u003cb\\u003e\\u0026c"' in raw
    assert json.loads(raw)["process"]["env"] == ["A=<b>&c"]


def test_marshal_omits_like_go():
    spec = oci.default_spec("default", "c1")
    spec["process"]["terminal"] = False
    spec["process"]["env"] = []
    spec["hostname"] = ""
    spec["linux"]["resources"]["memory"] = {"limit": 0}  # a pointer: kept even when 0
    spec["linux"]["maskedPaths"] = None
    spec["mounts"].append({"destination": "/x", "type": "", "source": "", "options": []})
    out = oci.marshal(spec)
    assert "terminal" not in out["process"] and "env" not in out["process"] and "hostname" not in out
    assert out["linux"]["resources"]["memory"] == {"limit": 0}
    assert "maskedPaths" not in out["linux"]
    assert out["mounts"][-1] == {"destination": "/x"}
    assert out["process"]["user"] == {"uid": 0, "gid": 0}


# -- env --------------------------------------------------------------------------------------

@pytest.mark.parametrize("defaults, overrides, expected", [
    (["A=1", "B=2"], ["B=3", "C=4"], ["A=1", "B=3", "C=4"]),
    (["A=1", "B=2"], ["A"], ["B=2"]),            # no "=": remove
    (["A=1"], ["Z"], ["A=1"]),                    # removing what is not there
    ([], ["X=1", "X=2"], ["X=1", "X=2"]),         # appended ones are not deduplicated (as Go)
    (["PATH=/bin"], ["PATH=/usr/bin"], ["PATH=/usr/bin"]),
])
def test_replace_or_append_env(defaults, overrides, expected):
    assert oci.replace_or_append_env(defaults, overrides) == expected


def test_image_config_env_and_args(rootfs):
    cfg = oci.ImageConfig(env=["PATH=/img", "LANG=C"], entrypoint=["/entry"], cmd=["a", "b"], working_dir="/w")
    spec = gen(oci.with_env(["LANG=fr", "X=1"]), oci.with_image_config(cfg), root=rootfs)
    assert spec["process"]["env"] == ["PATH=/img", "LANG=fr", "X=1"]
    assert spec["process"]["args"] == ["/entry", "a", "b"]
    assert spec["process"]["cwd"] == "/w"
    # no Env in the image: containerd's default PATH; args given replace Cmd, keep Entrypoint
    spec = gen(oci.with_image_config(oci.ImageConfig(entrypoint=["/e"], cmd=["c"]), args=["d"]), root=rootfs)
    assert spec["process"]["env"] == oci.DEFAULT_UNIX_ENV
    assert spec["process"]["args"] == ["/e", "d"] and spec["process"]["cwd"] == "/"
    # ctr's run replaces the whole command (entrypoint too)
    spec = gen(oci.with_image_config(cfg), oci.with_process_args("sh"), root=rootfs)
    assert spec["process"]["args"] == ["sh"]


def test_env_file(tmp_path):
    f = tmp_path / "env"
    f.write_text("A=1\nB=two words\n")
    spec = gen(oci.with_env_file(str(f)))
    assert spec["process"]["env"] == ["A=1", "B=two words"]


# -- users and groups -------------------------------------------------------------------------

def user_of(rootfs, *opts):
    return gen(*opts, root=rootfs)["process"]["user"]


@pytest.mark.parametrize("userstr, expected", [
    ("app", {"uid": 1000, "gid": 1001, "additionalGids": [1001]}),
    ("1000", {"uid": 1000, "gid": 1001, "additionalGids": [1001]}),
    ("4321", {"uid": 4321, "gid": 0, "additionalGids": [0]}),        # unknown uid: gid 0
    ("app:wheel", {"uid": 1000, "gid": 10, "additionalGids": [10]}),
    ("1000:29", {"uid": 1000, "gid": 29, "additionalGids": [29]}),   # numbers: no lookup
    ("0:audio", {"uid": 0, "gid": 29, "additionalGids": [29]}),
    ("short", {"uid": 1002, "gid": 0, "additionalGids": [0]}),
])
def test_with_user(rootfs, userstr, expected):
    assert user_of(rootfs, oci.with_user(userstr)) == expected


@pytest.mark.parametrize("userstr", ["nosuch", "app:nosuchgroup", "nosuch:0"])
def test_with_user_unknown_names(rootfs, userstr):
    with pytest.raises(errdefs.NotFound):
        gen(oci.with_user(userstr), root=rootfs)


def test_with_user_bad_and_relative_root(rootfs):
    with pytest.raises(errdefs.InvalidArgument, match="invalid USER value"):
        gen(oci.with_user("a:b:c"), root=rootfs)
    with pytest.raises(errdefs.InvalidArgument, match="rootfs absolute path is required"):
        gen(oci.with_user("app"))  # root.path "rootfs" is relative and there is no snapshot


def test_image_user_gets_supplementary_groups(rootfs):
    cfg = oci.ImageConfig(user="app")
    assert user_of(rootfs, oci.with_image_config(cfg)) == {"uid": 1000, "gid": 1001,
                                                           "additionalGids": [1001, 10, 29]}
    # without a User, root's groups: none listed, so just gid 0
    assert user_of(rootfs, oci.with_image_config(oci.ImageConfig())) == {"uid": 0, "gid": 0,
                                                                         "additionalGids": [0]}


def test_users_without_etc_files(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    assert user_of(str(root), oci.with_user("7")) == {"uid": 7, "gid": 0, "additionalGids": [0]}
    assert user_of(str(root), oci.with_image_config(oci.ImageConfig(user="7"))) == {
        "uid": 7, "gid": 0, "additionalGids": [0]}
    with pytest.raises(errdefs.NotFound):
        gen(oci.with_user("someone"), root=str(root))


def test_root_path_stays_inside(tmp_path):
    root = tmp_path / "r"
    (root / "etc").mkdir(parents=True)
    os.symlink("../../../../../../etc/shadow", root / "etc" / "passwd")
    assert oci.root_path(str(root), "/etc/passwd") == str(root / "etc" / "shadow")
    os.symlink("/etc/loop", root / "etc" / "loop")
    with pytest.raises(OSError):
        oci.root_path(str(root), "/etc/loop")


def test_passwd_and_group_parsing():
    users = oci.parse_passwd("a:x:1:2:gecos:/h:/s\n#c\nb\n")
    assert users[0] == oci.PasswdEntry("a", 1, 2, "/h", "/s")
    assert users[1].name == "b" and users[1].uid == 0
    groups = oci.parse_group("g:x:5:u1,u2\nh:x:6:\n")
    assert groups[0].members == ("u1", "u2") and groups[1].members == ()


# -- other options ----------------------------------------------------------------------------

def test_tty_net_host_readonly_cwd():
    spec = gen(oci.with_tty, oci.with_host_namespace("network"), oci.with_host_hosts_file,
               oci.with_host_resolvconf, oci.with_rootfs_readonly, oci.with_process_cwd("/tmp"))
    assert spec["process"]["terminal"] is True and spec["process"]["env"] == ["TERM=xterm"]
    assert [n["type"] for n in spec["linux"]["namespaces"]] == ["pid", "ipc", "uts", "mount"]
    assert spec["mounts"][-2:] == [
        {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts", "options": ["rbind", "ro"]},
        {"destination": "/etc/resolv.conf", "type": "bind", "source": "/etc/resolv.conf", "options": ["rbind", "ro"]}]
    assert spec["root"] == {"path": "rootfs", "readonly": True}
    assert spec["process"]["cwd"] == "/tmp"


def test_resources():
    spec = gen(oci.with_cpus(1.5), oci.with_cpu_shares(512), oci.with_memory_limit(10 << 20),
               oci.with_pids_limit(20))
    res = spec["linux"]["resources"]
    assert res["cpu"] == {"shares": 512, "quota": 150000, "period": 100000}
    assert res["memory"] == {"limit": 10 << 20}
    assert res["pids"] == {"limit": 20}


def test_capabilities():
    spec = gen(oci.with_added_capabilities(["CAP_SYS_ADMIN"]), oci.with_dropped_capabilities(["CAP_KILL"]))
    caps = spec["process"]["capabilities"]
    for key in ("bounding", "effective", "permitted"):
        assert caps[key][-1] == "CAP_SYS_ADMIN" and "CAP_KILL" not in caps[key]


def test_privileged():
    spec = gen(oci.with_privileged, oci.with_all_devices_allowed, oci.with_host_devices)
    assert spec["process"]["capabilities"]["bounding"] == oci.current_capabilities()
    assert "maskedPaths" not in spec["linux"] and "readonlyPaths" not in spec["linux"]
    sysfs = [m for m in spec["mounts"] if m["type"] == "sysfs"][0]
    assert "rw" in sysfs["options"] and "ro" not in sysfs["options"]
    assert spec["linux"]["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    paths = [d["path"] for d in spec["linux"]["devices"]]
    assert "/dev/null" in paths and not any(p.startswith("/dev/pts/") for p in paths)
    null = [d for d in spec["linux"]["devices"] if d["path"] == "/dev/null"][0]
    assert (null["type"], null["major"], null["minor"]) == ("c", 1, 3)


def test_linux_namespace_and_new_privileges():
    spec = gen(oci.with_linux_namespace("network", "/proc/1/ns/net"), oci.with_linux_namespace("user"),
               oci.with_new_privileges)
    assert {"type": "network", "path": "/proc/1/ns/net"} in spec["linux"]["namespaces"]
    assert spec["linux"]["namespaces"][-1] == {"type": "user"}
    assert "noNewPrivileges" not in spec["process"]


@pytest.mark.parametrize("flag, expected", [
    ("type=bind,src=/tmp,dst=/host,options=rbind:ro",
     {"destination": "/host", "type": "bind", "source": "/tmp", "options": ["rbind", "ro"]}),
    ("destination=/d,source=/s", {"destination": "/d", "source": "/s"}),
    ('type=bind,"src=/a,b",dst=/c', {"destination": "/c", "type": "bind", "source": "/a,b"}),
])
def test_parse_mount_flag(flag, expected):
    assert oci.parse_mount_flag(flag) == expected


@pytest.mark.parametrize("flag, msg", [("type", "expected key=val"), ("foo=bar", 'mount option "foo" not supported')])
def test_parse_mount_flag_errors(flag, msg):
    with pytest.raises(errdefs.InvalidArgument, match=msg):
        oci.parse_mount_flag(flag)


def test_image_config_from_document():
    cfg = oci.ImageConfig.from_document({"config": {"Env": ["A=1"], "Entrypoint": ["/e"], "Cmd": None,
                                                    "User": "u", "Labels": {"l": "v"}, "StopSignal": "SIGINT"}})
    assert (cfg.env, cfg.entrypoint, cfg.cmd, cfg.user, cfg.labels, cfg.stop_signal) == (
        ["A=1"], ["/e"], [], "u", {"l": "v"}, "SIGINT")
    assert oci.ImageConfig.from_document({}) == oci.ImageConfig()
