"""pyctr containers/tasks/run argument handling without a daemon: ctr's flags, the option list
`spec_builder` makes from them (checked against the spec it generates), signal parsing and the
usage errors."""
from __future__ import annotations

import socket

import pytest

from pycontainerd.api.client import oci
from pycontainerd.api.client.tasks import parse_signal
from pycontainerd.cmd import pyctr
from pycontainerd.cmd.pyctr_run import runtime_options, spec_builder
from pycontainerd.core import errdefs


def parse(*argv: str):
    return pyctr.build_parser().parse_args(list(argv))


def spec_for(args, image_config=None, root="/tmp") -> dict:
    ctx = oci.SpecContext("default", args.id or args.ref)
    opts = spec_builder(args, run=True)(image_config)
    return oci.marshal(oci.generate_spec(ctx, oci.with_rootfs_path(root), *opts))


def test_run_flags_stop_at_the_image():
    args = parse("run", "--rm", "-t", "--env", "A=1", "img", "c1", "sh", "-c", "echo --rm -t")
    assert (args.rm, args.tty, args.env, args.ref, args.id) == (True, True, ["A=1"], "img", "c1")
    assert args.args == ["sh", "-c", "echo --rm -t"]
    assert args.runtime == "io.containerd.pyrunc.v2" and args.cpu_shares == 1024
    args = parse("c", "create", "img", "c2")
    assert (args.ref, args.id, args.args) == ("img", "c2", [])
    assert not hasattr(args, "cpu_shares")  # run-only, as ctr's platformRunFlags


def test_spec_builder_follows_ctr():
    args = parse("run", "--env", "B=2", "--cwd", "/w", "--label", "l=v", "--memory-limit", "1000",
                 "--cpus", "0.5", "--net-host", "--read-only", "--mount", "type=bind,src=/a,dst=/b", "img", "c1",
                 "sh")
    cfg = oci.ImageConfig(env=["PATH=/bin", "B=1"], cmd=["default"], working_dir="/img")
    spec = spec_for(args, cfg)
    assert spec["process"]["args"] == ["sh"]
    assert spec["process"]["env"] == ["PATH=/bin", "B=2", f"HOSTNAME={socket.gethostname()}"]
    assert spec["process"]["cwd"] == "/w"
    assert spec["annotations"] == {"l": "v"}
    assert spec["root"]["readonly"] is True
    res = spec["linux"]["resources"]
    assert res["memory"] == {"limit": 1000}
    assert res["cpu"] == {"shares": 1024, "quota": 50000, "period": 100000}
    assert {"destination": "/b", "type": "bind", "source": "/a"} in spec["mounts"]
    assert len(res["devices"]) == 10  # deny all + ctr's default unix devices


def test_init_flag_wraps_the_command(monkeypatch):
    from pycontainerd.api.client import init as pyctr_init

    monkeypatch.setattr(pyctr_init, "binary_path", lambda: "/opt/pyctr-init")
    spec = spec_for(parse("run", "--init", "img", "c1", "sleep", "1"), oci.ImageConfig())
    assert spec["process"]["args"] == ["/sbin/pyctr-init", "--", "sleep", "1"]
    assert spec["mounts"][-1] == {"destination": "/sbin/pyctr-init", "type": "bind", "source": "/opt/pyctr-init",
                                  "options": ["rbind", "ro"]}


def test_init_without_a_compiler(monkeypatch):
    from pycontainerd.api.client import init as pyctr_init

    def unavailable():
        raise pyctr_init.InitUnavailable("no C compiler was found")
    monkeypatch.setattr(pyctr_init, "binary_path", unavailable)
    with pytest.raises(errdefs.FailedPrecondition, match="no C compiler"):
        spec_for(parse("run", "--init", "img", "c1"), oci.ImageConfig())


@pytest.mark.parametrize("argv, msg", [
    (("run", "--cap-add", "SYS_ADMIN", "img", "c"), "capabilities must be specified with 'CAP_' prefix"),
    (("run", "--cpus", "1", "--cpu-quota", "5", "img", "c"), "cpus and quota/period should be used separately"),
    (("run", "--with-ns", "net", "img", "c"), "requires the format 'nstype:path'"),
    (("run", "--with-ns", "bogus:/x", "img", "c"), "not valid: bogus"),
    (("run", "--annotation", "novalue", "img", "c"), "invalid key=value format annotation"),
])
def test_flag_errors(argv, msg):
    with pytest.raises(pyctr.UsageError, match=msg):
        spec_for(parse(*argv), oci.ImageConfig())


def test_runtime_options():
    opts = runtime_options(parse("run", "--runtime", "io.containerd.runc.v2", "img", "c"))
    assert opts.type_url == "containerd.runc.v1.Options" and opts.value == b""
    opts = runtime_options(parse("run", "--runtime", "io.containerd.runc.v2", "--runc-binary", "/x/runc", "img", "c"))
    assert opts.value == b"\x32\x07/x/runc"  # binary_name is field 6
    assert runtime_options(parse("run", "img", "c")) is None  # other runtimes: none, as ctr
    with pytest.raises(pyctr.UsageError, match="only supported for"):
        runtime_options(parse("run", "--runc-binary", "/x", "img", "c"))


@pytest.mark.parametrize("text, number", [("SIGTERM", 15), ("term", 15), ("KILL", 9), ("9", 9),
                                          ("SIGRTMIN+1", 35), ("SIGUSR1", 10)])
def test_parse_signal(text, number):
    assert parse_signal(text) == number


@pytest.mark.parametrize("bad", ["SIGNOPE", "0", "999", ""])
def test_parse_signal_errors(bad):
    with pytest.raises(errdefs.InvalidArgument):
        parse_signal(bad)


def test_cli_usage_errors(capsys):
    assert pyctr.main(["-a", "/nonexistent.sock", "run", "--rm", "-d", "img", "c"]) == 1
    assert capsys.readouterr().err == "pyctr: flags --detach and --rm cannot be specified together\n"
    assert pyctr.main(["-a", "/nonexistent.sock", "tasks", "exec", "c1", "true"]) == 1
    assert 'Required flag "exec-id" not set' in capsys.readouterr().err


def test_init_binary_sources(tmp_path, monkeypatch):
    from pycontainerd.api.client import init as pyctr_init

    fake = tmp_path / "myinit"
    fake.write_bytes(b"#!/bin/true\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PYCTR_INIT", str(fake))
    assert pyctr_init.binary_path() == str(fake)
    monkeypatch.setenv("PYCTR_INIT", str(tmp_path / "missing"))
    with pytest.raises(pyctr_init.InitUnavailable, match="not an executable"):
        pyctr_init.binary_path()
    monkeypatch.delenv("PYCTR_INIT")
    monkeypatch.setattr(pyctr_init, "BUNDLED", tmp_path / "none")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(pyctr_init, "_compiler", lambda: None)
    with pytest.raises(pyctr_init.InitUnavailable, match="no C compiler"):
        pyctr_init.binary_path()


def test_init_builds_a_static_binary(tmp_path, monkeypatch):
    import shutil
    import subprocess

    from pycontainerd.api.client import init as pyctr_init

    if pyctr_init._compiler() is None:
        pytest.skip("no C compiler")
    out = pyctr_init.build(tmp_path / "pyctr-init")
    assert "statically linked" in subprocess.run(["file", str(out)], capture_output=True, text=True).stdout \
        or shutil.which("file") is None
    # outside a container it still runs its child and passes the exit status on
    assert subprocess.run([str(out), "--", "sh", "-c", "exit 5"]).returncode == 5
    assert subprocess.run([str(out), "sh", "-c", "kill -TERM $$"]).returncode == 128 + 15
    assert subprocess.run([str(out), "/nonexistent"], capture_output=True).returncode == 127
    # signals sent to the init reach its child
    import signal
    import time

    proc = subprocess.Popen([str(out), "--", "sh", "-c", 'trap "exit 3" TERM; echo up; while :; do sleep 0.05; done'],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "up\n"
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 3
