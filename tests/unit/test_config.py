"""pycontainerd.config: containerd 1.6 config.toml loading, merging, migration, plugin configs."""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pytest
import tomli

from pycontainerd import config as cfgmod
from pycontainerd.config import (Config, ConfigError, ConfigWarning, apply_overrides, check, default_toml,
                                 dump_toml, load, parse_duration, plugin_config, timeout, ttrpc_endpoint)
from pycontainerd.core.plugin import Registration


# ---- fake plugins ------------------------------------------------------------------------------

async def _init(ic):  # never called here
    return None


@dataclass
class Limits:
    max_items: int = 10
    ratio: float = 0.5


class Mode(enum.Enum):
    SHARED = "shared"
    ISOLATED = "isolated"


@dataclass
class Runtime:
    runtime_type: str = "io.containerd.runc.v2"
    options: dict[str, Any] = field(default_factory=dict)
    binary_name: str = field(default="", metadata={"toml": "BinaryName"})


@dataclass
class FancyConfig:
    name: str = "fancy"
    enabled: bool = True
    count: int = 3
    threshold: float = 0.02
    tags: list[str] = field(default_factory=lambda: ["a", "b"])
    labels: dict[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    runtimes: dict[str, Runtime] = field(default_factory=lambda: {"runc": Runtime()})
    socket: Optional[str] = None
    mode: Mode = Mode.SHARED
    policy: Literal["strict", "lax"] = "strict"


@dataclass
class GCConfig:
    pause_threshold: float = 0.02
    deletion_threshold: int = 0


FANCY = Registration(type="io.containerd.grpc.v1", id="fancy", init=_init, config=FancyConfig)
GC = Registration(type="io.containerd.gc.v1", id="scheduler", init=_init, config=GCConfig)
CRI = Registration(type="io.containerd.grpc.v1", id="cri", init=_init, config=FancyConfig)
PLAIN = Registration(type="io.containerd.grpc.v1", id="version", init=_init)
REGS = [FANCY, GC, CRI, PLAIN]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def keys(warnings: list[ConfigWarning]) -> set[tuple[str, str]]:
    return {(w.table, w.key) for w in warnings}


# ---- defaults and missing files ----------------------------------------------------------------

def test_defaults_are_ours_not_containerds():
    c = Config()
    assert c.version == 2
    assert c.root == "/var/lib/pycontainerd" and c.state == "/run/pycontainerd"
    assert c.grpc.address == "/run/pycontainerd/pycontainerd.sock"
    assert c.grpc.max_recv_message_size == c.grpc.max_send_message_size == 16 * 1024 * 1024
    assert c.ttrpc.address == ""
    assert (c.debug.level, c.debug.format) == ("info", "text")
    assert c.timeouts == {
        "io.containerd.timeout.bolt.open": "0s",
        "io.containerd.timeout.shim.cleanup": "5s",
        "io.containerd.timeout.shim.load": "5s",
        "io.containerd.timeout.shim.shutdown": "3s",
        "io.containerd.timeout.task.state": "2s",
    }
    text = default_toml(REGS)
    assert "/var/lib/containerd" not in text and "/run/containerd" not in text


def test_missing_file_at_default_path_means_defaults(tmp_path):
    result = load(tmp_path / "absent.toml", explicit=False)
    assert result.config == Config() and result.warnings == [] and result.files == []


def test_missing_file_given_explicitly_is_an_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        load(tmp_path / "absent.toml")
    assert str(e.value).startswith(str(tmp_path / "absent.toml"))
    assert "no such file" in str(e.value)


def test_a_minimal_file_overrides_only_what_it_sets(tmp_path):
    f = write(tmp_path / "c.toml", 'version = 2\nroot = "/srv/r"\n[grpc]\nuid = 7\n')
    result = load(f)
    assert result.warnings == []
    assert result.files == [f]
    assert result.config.root == "/srv/r" and result.config.grpc.uid == 7
    assert result.config.grpc.address == Config().grpc.address
    assert result.config.state == Config().state


# ---- unknown keys and wrong types --------------------------------------------------------------

def test_unknown_top_level_key_and_unknown_keys_in_known_tables(tmp_path):
    f = write(tmp_path / "c.toml", 'version = 2\nrooot = "/x"\nfoo = 1\n[grpc]\nadress = "/s"\n'
                                   '[debug]\nlevel = "debug"\nextra = true\n[bogus]\na = 1\n')
    result = load(f)
    assert keys(result.warnings) == {("", "rooot"), ("", "foo"), ("grpc", "adress"), ("debug", "extra"),
                                     ("", "bogus")}
    assert all(w.file == f for w in result.warnings)
    by_key = {w.key: w for w in result.warnings}
    assert 'did you mean "root"' in by_key["rooot"].message
    assert 'did you mean "address"' in by_key["adress"].message
    assert str(by_key["adress"]) == f'{f}: grpc.adress: unknown key, ignored; did you mean "address"?'
    assert result.config.debug.level == "debug"
    assert result.config.root == Config().root


def test_wrong_types_warn_and_keep_the_default(tmp_path):
    f = write(tmp_path / "c.toml", 'version = 2\noom_score = "high"\ndisabled_plugins = "x.y"\n'
                                   'grpc = 5\nrequired_plugins = ["a.b", 3]\n'
                                   '[metrics]\ngrpc_histogram = 1\naddress = ":1338"\n'
                                   '[ttrpc]\nuid = true\n[timeouts]\n"io.containerd.timeout.task.state" = 5\n')
    result = load(f)
    w = {(x.table, x.key): x.message for x in result.warnings}
    assert set(w) == {("", "oom_score"), ("", "disabled_plugins"), ("", "grpc"), ("", "required_plugins"),
                      ("metrics", "grpc_histogram"), ("ttrpc", "uid"),
                      ("timeouts", "io.containerd.timeout.task.state")}
    assert w[("", "oom_score")] == 'expected an integer, got a string ("high"); ignored, keeping 0'
    assert "expected a boolean, got an integer (1)" in w[("metrics", "grpc_histogram")]
    assert "expected an integer, got a boolean (true)" in w[("ttrpc", "uid")]
    assert "item 1" in w[("", "required_plugins")]
    c = result.config
    assert c.oom_score == 0 and c.disabled_plugins == [] and c.required_plugins == []
    assert c.grpc == Config().grpc and c.metrics.grpc_histogram is False and c.metrics.address == ":1338"
    assert c.timeouts["io.containerd.timeout.task.state"] == "2s"


def test_values_containerd_would_refuse_are_warned_and_dropped(tmp_path):
    f = write(tmp_path / "c.toml", 'version = 2\n[debug]\nlevel = "loud"\nformat = "xml"\n'
                                   '[timeouts]\n"io.containerd.timeout.shim.load" = "5"\n"my.timeout" = "1m"\n'
                                   '[proxy_plugins.stargz]\ntype = "snapshot"\naddress = "/run/s.sock"\n'
                                   '[proxy_plugins.odd]\ntype = "diff"\naddress = "/run/d.sock"\n')
    result = load(f)
    assert keys(result.warnings) == {("debug", "level"), ("debug", "format"),
                                     ("timeouts", "io.containerd.timeout.shim.load"), ("proxy_plugins.odd", "type")}
    c = result.config
    assert (c.debug.level, c.debug.format) == ("info", "text")
    assert c.timeouts["io.containerd.timeout.shim.load"] == "5s" and c.timeouts["my.timeout"] == "1m"
    assert c.proxy_plugins["stargz"] == cfgmod.ProxyPlugin(type="snapshot", address="/run/s.sock")


def test_unknown_key_in_a_proxy_plugin(tmp_path):
    f = write(tmp_path / "c.toml", 'version = 2\n[proxy_plugins.s]\ntype = "snapshot"\naddres = "x"\n')
    assert keys(load(f).warnings) == {("proxy_plugins.s", "addres")}


# ---- bad TOML ----------------------------------------------------------------------------------

def test_bad_toml_names_file_line_and_column(tmp_path):
    f = write(tmp_path / "c.toml", 'version = 2\n[grpc]\naddress = /no/quotes\n')
    with pytest.raises(ConfigError) as e:
        load(f)
    err = e.value
    assert (err.file, err.line, err.column) == (f, 3, 11)
    assert str(err) == f"{f}:3:11: {err.message}"
    assert "line" not in err.message  # position is in the prefix only


def test_bad_toml_in_an_import_names_the_imported_file(tmp_path):
    main = write(tmp_path / "c.toml", 'version = 2\nimports = ["d/x.toml"]\n')
    bad = write(tmp_path / "d" / "x.toml", 'version = 2\n\n[grpc\n')
    with pytest.raises(ConfigError) as e:
        load(main)
    assert str(e.value).startswith(f"{bad}:3:")


def test_invalid_utf8_is_a_positioned_error(tmp_path):
    f = tmp_path / "c.toml"
    f.write_bytes(b'version = 2\nroot = "\xff"\n')
    with pytest.raises(ConfigError) as e:
        load(f)
    assert (e.value.line, e.value.column) == (2, 9)


# ---- imports -----------------------------------------------------------------------------------

def test_imports_globs_nested_and_merge_order(tmp_path):
    main = write(tmp_path / "etc" / "config.toml", """
version = 2
root = "/main"
oom_score = -10
disabled_plugins = ["io.containerd.snapshotter.v1.aufs"]
imports = ["conf.d/*.toml", "extra.toml"]
[grpc]
address = "/main.sock"
uid = 1
[timeouts]
"io.containerd.timeout.shim.load" = "10s"
[plugins."io.containerd.grpc.v1.fancy"]
name = "from-main"
count = 5
[plugins."io.containerd.gc.v1.scheduler"]
pause_threshold = 0.1
""")
    a = write(tmp_path / "etc" / "conf.d" / "10-a.toml", """
version = 2
root = "/a"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.aufs"]
imports = ["../nested/n.toml"]
[grpc]
uid = 2
[plugins."io.containerd.grpc.v1.fancy"]
name = "from-a"
""")
    b = write(tmp_path / "etc" / "conf.d" / "20-b.toml", 'version = 2\nroot = "/b"\n[grpc]\ngid = 3\n')
    write(tmp_path / "etc" / "conf.d" / "ignored.conf", 'not = toml = at all')
    extra = write(tmp_path / "etc" / "extra.toml", 'version = 2\n[timeouts]\n"x.y" = "1s"\n')
    nested = write(tmp_path / "etc" / "nested" / "n.toml",
                   f'version = 2\nroot = "/nested"\nimports = ["{tmp_path}/no-match-*.toml", "../config.toml"]\n')
    result = load(main)
    assert result.warnings == []
    # breadth first, as containerd: the main file, its imports in order, then theirs; each once
    assert result.files == [main, a, b, extra, nested]
    c = result.config
    assert c.imports == [str(a), str(b), str(extra), str(nested)]
    assert c.root == "/nested"                       # the last file read wins
    assert c.oom_score == -10                        # nobody else set it
    assert (c.grpc.address, c.grpc.uid, c.grpc.gid) == ("/main.sock", 2, 3)  # section keys merge one by one
    assert c.disabled_plugins == ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs"]
    assert c.timeouts["io.containerd.timeout.shim.load"] == "10s" and c.timeouts["x.y"] == "1s"
    assert c.timeouts["io.containerd.timeout.shim.shutdown"] == "3s"
    # a plugin's table is replaced whole by a later file (containerd 1.6), other plugins untouched
    assert c.plugins["io.containerd.grpc.v1.fancy"] == {"name": "from-a"}
    assert c.plugin_files["io.containerd.grpc.v1.fancy"] == a
    fancy = plugin_config(c, FANCY)
    assert fancy.name == "from-a" and fancy.count == 3
    assert plugin_config(c, GC).pause_threshold == 0.1


def test_later_file_may_set_a_zero_value(tmp_path):
    main = write(tmp_path / "c.toml", 'version = 2\noom_score = -500\nimports = ["z.toml"]\n'
                                      '[metrics]\ngrpc_histogram = true\n')
    write(tmp_path / "z.toml", 'version = 2\noom_score = 0\n[metrics]\ngrpc_histogram = false\n')
    c = load(main).config
    assert c.oom_score == 0 and c.metrics.grpc_histogram is False


def test_missing_import_is_an_error_naming_the_importer(tmp_path):
    main = write(tmp_path / "c.toml", 'version = 2\nimports = ["gone.toml", "none-*.toml"]\n')
    with pytest.raises(ConfigError) as e:
        load(main)
    assert str(e.value) == f"{tmp_path / 'gone.toml'}: no such file (imported by {main})"


def test_absolute_import_and_relative_glob_from_another_cwd(tmp_path, monkeypatch):
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    abs_file = write(tmp_path / "abs" / "x.toml", 'version = 2\nstate = "/abs"\n')
    main = write(tmp_path / "cfg" / "c.toml", f'version = 2\nimports = ["{abs_file}", "d/*.toml"]\n')
    rel = write(tmp_path / "cfg" / "d" / "1.toml", 'version = 2\ntemp = "/t"\n')
    result = load(main)
    assert result.files == [main, abs_file, rel]
    assert (result.config.state, result.config.temp) == ("/abs", "/t")


# ---- versions and migration --------------------------------------------------------------------

def test_version_1_is_migrated_with_containerds_renames(tmp_path):
    f = write(tmp_path / "c.toml", """
version = 1
disabled_plugins = ["aufs", "io.containerd.snapshotter.v1.zfs", "tasks-service"]
required_plugins = ["cri"]
[plugins.cri]
name = "v1-cri"
[plugins.cri.limits]
max_items = 99
[plugins.linux]
shim = "containerd-shim"
[plugins.scheduler]
pause_threshold = 0.3
[plugins.mystery]
a = 1
""")
    result = load(f)
    c = result.config
    assert c.version == 2
    assert set(c.plugins) == {"io.containerd.grpc.v1.cri", "io.containerd.runtime.v1.linux",
                              "io.containerd.gc.v1.scheduler", "io.containerd.grpc.v1.mystery"}
    assert c.disabled_plugins == ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.zfs",
                                  "io.containerd.service.v1.tasks-service"]
    assert c.required_plugins == ["io.containerd.grpc.v1.cri"]
    assert plugin_config(c, CRI).limits.max_items == 99
    assert plugin_config(c, GC).pause_threshold == 0.3
    w = {(x.table, x.key): x.message for x in result.warnings}
    assert set(w) == {("", "version"), ("plugins", "mystery")}
    assert "deprecated" in w[("", "version")] and "cri -> io.containerd.grpc.v1.cri" in w[("", "version")]
    assert "linux -> io.containerd.runtime.v1.linux" in w[("", "version")]
    assert 'taken as "io.containerd.grpc.v1.mystery"' in w[("plugins", "mystery")]


def test_version_1_uses_registrations_to_name_plugins_exactly(tmp_path):
    f = write(tmp_path / "c.toml", 'version = 1\n[plugins.fancy]\ncount = 1\n')
    other = Registration(type="io.containerd.internal.v1", id="fancy", init=_init)  # same id, no config
    result = load(f, registrations=[FANCY, other])
    assert list(result.config.plugins) == ["io.containerd.grpc.v1.fancy"]
    assert keys(result.warnings) == {("", "version")}  # no guessing warning


def test_file_without_version_is_version_1_as_in_containerd(tmp_path):
    f = write(tmp_path / "c.toml", '[plugins.bolt]\ncontent_sharing_policy = "isolated"\n')
    result = load(f)
    assert list(result.config.plugins) == ["io.containerd.metadata.v1.bolt"]
    assert [w.key for w in result.warnings] == ["version"]
    assert "no version key" in result.warnings[0].message
    # without version-sensitive keys the version does not matter: no warning
    g = write(tmp_path / "g.toml", '[grpc]\naddress = "/s"\n')
    assert load(g).warnings == []


def test_version_1_import_into_version_2_main(tmp_path):
    main = write(tmp_path / "c.toml", 'version = 2\nimports = ["old.toml"]\n'
                                      '[plugins."io.containerd.gc.v1.scheduler"]\npause_threshold = 0.2\n')
    write(tmp_path / "old.toml", 'version = 1\n[plugins.scheduler]\ndeletion_threshold = 4\n')
    c = load(main).config
    assert c.version == 2
    assert c.plugins == {"io.containerd.gc.v1.scheduler": {"deletion_threshold": 4}}


def test_version_1_file_naming_a_plugin_both_ways(tmp_path):
    f = write(tmp_path / "c.toml", 'version = 1\n[plugins.cri]\nname = "old"\n'
                                   '[plugins."io.containerd.grpc.v1.cri"]\nname = "new"\n')
    result = load(f)
    assert result.config.plugins == {"io.containerd.grpc.v1.cri": {"name": "new"}}
    assert ("plugins", "cri") in keys(result.warnings)


@pytest.mark.parametrize("text, needle", [
    ("version = 3\n", "unsupported config version 3"),
    ("version = 0\n", "unsupported config version 0"),
    ("version = -1\n", "unsupported config version -1"),
    ('version = "2"\n', 'version must be an integer, got a string ("2")'),
])
def test_unsupported_versions_are_refused(tmp_path, text, needle):
    f = write(tmp_path / "c.toml", text)
    with pytest.raises(ConfigError) as e:
        load(f)
    assert str(e.value) .startswith(f"{f}: ") and needle in str(e.value)


def test_version_3_in_an_import_is_refused_too(tmp_path):
    main = write(tmp_path / "c.toml", 'version = 2\nimports = ["v3.toml"]\n')
    v3 = write(tmp_path / "v3.toml", "version = 3\n")
    with pytest.raises(ConfigError, match="unsupported config version 3") as e:
        load(main)
    assert e.value.file == v3


def test_version_2_refuses_bare_plugin_ids(tmp_path):
    f = write(tmp_path / "c.toml", 'version = 2\n[plugins.cri]\nname = "x"\n')
    with pytest.raises(ConfigError, match='invalid plugin URI "cri".*io.containerd.grpc.v1.cri'):
        load(f)
    g = write(tmp_path / "g.toml", 'version = 2\n[plugins.io.containerd.grpc.v1.cri]\nname = "x"\n')
    with pytest.raises(ConfigError, match="quote names that hold dots"):
        load(g)
    h = write(tmp_path / "h.toml", 'version = 2\ndisabled_plugins = ["aufs"]\n')
    with pytest.raises(ConfigError, match='"aufs" in disabled_plugins'):
        load(h)


# ---- plugin configs ----------------------------------------------------------------------------

def test_plugin_config_defaults_when_absent_and_none_without_config():
    c = Config()
    assert plugin_config(c, FANCY) == FancyConfig()
    assert plugin_config(c, PLAIN) is None


def test_plugin_config_reads_every_supported_type(tmp_path):
    f = write(tmp_path / "c.toml", """
version = 2
[plugins."io.containerd.grpc.v1.fancy"]
name = "n"
enabled = false
count = 7
threshold = 1
tags = ["x"]
socket = "/run/f.sock"
mode = "isolated"
policy = "lax"
[plugins."io.containerd.grpc.v1.fancy".labels]
"a.b" = "c"
[plugins."io.containerd.grpc.v1.fancy".limits]
ratio = 0.9
[plugins."io.containerd.grpc.v1.fancy".runtimes.runc]
BinaryName = "/usr/bin/runc"
[plugins."io.containerd.grpc.v1.fancy".runtimes.kata]
runtime_type = "io.containerd.kata.v2"
[plugins."io.containerd.grpc.v1.fancy".runtimes.kata.options]
ConfigPath = "/etc/kata.toml"
""")
    warnings: list[ConfigWarning] = []
    fancy = plugin_config(load(f).config, FANCY, warnings)
    assert warnings == []
    assert fancy == FancyConfig(
        name="n", enabled=False, count=7, threshold=1.0, tags=["x"], labels={"a.b": "c"},
        limits=Limits(max_items=10, ratio=0.9),
        runtimes={"runc": Runtime(binary_name="/usr/bin/runc"),
                  "kata": Runtime(runtime_type="io.containerd.kata.v2", options={"ConfigPath": "/etc/kata.toml"})},
        socket="/run/f.sock", mode=Mode.ISOLATED, policy="lax")
    assert isinstance(fancy.threshold, float)


def test_plugin_config_warns_on_unknown_keys_and_wrong_types_at_every_depth(tmp_path):
    f = write(tmp_path / "c.toml", """
version = 2
[plugins."io.containerd.grpc.v1.fancy"]
nmae = "typo"
count = "three"
tags = ["ok", 2]
mode = "open"
policy = "whatever"
enabled = "yes"
[plugins."io.containerd.grpc.v1.fancy".limits]
max_items = 1.5
ratio = 0.7
bogus = 1
[plugins."io.containerd.grpc.v1.fancy".runtimes.runc]
runtime_typ = "x"
[plugins."io.containerd.grpc.v1.fancy".labels]
good = "yes"
bad = 3
""")
    warnings: list[ConfigWarning] = []
    fancy = plugin_config(load(f).config, FANCY, warnings)
    t = 'plugins."io.containerd.grpc.v1.fancy"'
    assert keys(warnings) == {(t, "nmae"), (t, "count"), (t, "tags"), (t, "mode"), (t, "policy"), (t, "enabled"),
                              (f"{t}.limits", "max_items"), (f"{t}.limits", "bogus"),
                              (f"{t}.runtimes.runc", "runtime_typ"), (f"{t}.labels", "bad")}
    assert all(w.file == f for w in warnings)
    msgs = {(w.table, w.key): w.message for w in warnings}
    assert msgs[(t, "count")] == 'expected an integer, got a string ("three"); ignored, keeping 3'
    assert 'did you mean "name"' in msgs[(t, "nmae")]
    assert "one of \"shared\", \"isolated\"" in msgs[(t, "mode")]
    assert str(next(w for w in warnings if w.key == "bogus")) == \
        f"{f}: {t}.limits.bogus: unknown key, ignored"
    # wrong values keep the defaults; good neighbours are kept
    assert fancy.count == 3 and fancy.tags == ["a", "b"] and fancy.mode is Mode.SHARED and fancy.enabled is True
    assert fancy.limits == Limits(max_items=10, ratio=0.7)
    assert fancy.labels == {"good": "yes"}
    assert fancy.runtimes == {"runc": Runtime()}


def test_plugin_config_table_that_is_not_a_table(tmp_path):
    f = write(tmp_path / "c.toml", 'version = 2\n[plugins."io.containerd.grpc.v1.fancy"]\nlimits = 4\n'
                                   '[plugins]\n"io.containerd.gc.v1.scheduler" = 5\n')
    result = load(f)
    assert keys(result.warnings) == {("plugins", "io.containerd.gc.v1.scheduler")}
    warnings: list[ConfigWarning] = []
    assert plugin_config(result.config, FANCY, warnings).limits == Limits()
    assert keys(warnings) == {('plugins."io.containerd.grpc.v1.fancy"', "limits")}


def test_plugin_defaults_are_not_shared_between_calls():
    a = plugin_config(Config(), FANCY)
    a.tags.append("mutated")
    a.runtimes["runc"].options["x"] = 1
    assert plugin_config(Config(), FANCY) == FancyConfig()


def test_check_gathers_everything(tmp_path):
    f = write(tmp_path / "c.toml", """
version = 2
bogus = 1
required_plugins = ["io.containerd.grpc.v1.missing"]
disabled_plugins = ["io.containerd.grpc.v1.fancyy"]
[plugins."io.containerd.grpc.v1.fancy"]
extra = 1
[plugins."io.containerd.grpc.v1.version"]
x = 1
[plugins."com.example.thirdparty.v1.thing"]
y = 2
[plugins."io.containerd.snapshotter.v1.stargz"]
z = 3
[proxy_plugins.stargz]
type = "snapshot"
address = "/run/stargz.sock"
""")
    result = load(f)
    warnings = check(result, REGS)
    assert keys(warnings) == {
        ("", "bogus"),
        ('plugins."io.containerd.grpc.v1.fancy"', "extra"),
        ("plugins", "io.containerd.grpc.v1.version"),             # takes no configuration
        ("plugins", "com.example.thirdparty.v1.thing"),           # no such plugin registered
        ("", "required_plugins"), ("", "disabled_plugins"),
    }
    by = {(w.table, w.key): w for w in warnings}
    assert by[("plugins", "com.example.thirdparty.v1.thing")].file == f
    assert "takes no configuration" in by[("plugins", "io.containerd.grpc.v1.version")].message
    assert "refuse to start" in by[("", "required_plugins")].message
    assert 'did you mean "io.containerd.grpc.v1.fancy"' in by[("", "disabled_plugins")].message
    assert check(load(write(tmp_path / "ok.toml", default_toml(REGS))), REGS) == []


def test_a_class_with_an_unresolvable_annotation_still_checks_the_others(tmp_path):
    @dataclass
    class Local:
        count: int = 1
        other: "NoSuchType" = None  # noqa: F821

    reg = Registration(type="io.containerd.internal.v1", id="local", init=_init, config=Local)
    f = write(tmp_path / "c.toml", 'version = 2\n[plugins."io.containerd.internal.v1.local"]\n'
                                   'count = "x"\nother = [1]\n')
    warnings: list[ConfigWarning] = []
    got = plugin_config(load(f).config, reg, warnings)
    assert [w.key for w in warnings] == ["count"] and got.count == 1 and got.other == [1]


# ---- default and dump --------------------------------------------------------------------------

def test_default_toml_round_trips_without_warnings(tmp_path):
    text = default_toml(REGS)
    doc = tomli.loads(text)
    for key in (f.name for f in dataclasses.fields(Config) if f.name != "plugin_files"):
        assert key in doc, key
    assert set(doc["plugins"]) == {"io.containerd.grpc.v1.fancy", "io.containerd.gc.v1.scheduler",
                                   "io.containerd.grpc.v1.cri"}  # a plugin without config has no table
    assert doc["plugins"]["io.containerd.grpc.v1.fancy"]["runtimes"]["runc"]["BinaryName"] == ""
    assert "socket" not in doc["plugins"]["io.containerd.grpc.v1.fancy"]  # None cannot be written
    f = write(tmp_path / "config.toml", text)
    result = load(f)
    assert result.warnings == [] and check(result, REGS) == []
    assert dataclasses.replace(result.config, plugins={}) == Config()
    for reg in REGS:
        assert plugin_config(result.config, reg) == reg.default_config()
    assert default_toml(REGS) == dump_toml(result.config, REGS)


def test_dump_is_the_effective_merged_config(tmp_path):
    main = write(tmp_path / "c.toml", """
version = 2
root = "/r"
imports = ["more.toml"]
[plugins."io.containerd.grpc.v1.fancy"]
count = 9
unknown = "dropped"
[plugins."com.example.thirdparty.v1.thing"]
kept = "as written"
""")
    more = write(tmp_path / "more.toml", 'version = 1\n[grpc]\nuid = 4\n[plugins.scheduler]\ndeletion_threshold = 2\n')
    result = load(main)
    text = dump_toml(result.config, REGS)
    doc = tomli.loads(text)
    assert doc["version"] == 2 and doc["root"] == "/r" and doc["grpc"]["uid"] == 4
    assert doc["imports"] == [] and result.config.imports == [str(more)]  # merged in: self-contained
    fancy = doc["plugins"]["io.containerd.grpc.v1.fancy"]
    assert fancy["count"] == 9 and fancy["name"] == "fancy" and fancy["limits"] == {"max_items": 10, "ratio": 0.5}
    assert "unknown" not in fancy
    assert doc["plugins"]["io.containerd.gc.v1.scheduler"] == {"pause_threshold": 0.02, "deletion_threshold": 2}
    assert doc["plugins"]["io.containerd.grpc.v1.cri"] == tomli.loads(default_toml([CRI]))["plugins"][CRI.uri]
    assert doc["plugins"]["com.example.thirdparty.v1.thing"] == {"kept": "as written"}
    assert doc["timeouts"]["io.containerd.timeout.shim.cleanup"] == "5s"
    # the dump, loaded again, is the same effective config
    again = load(write(tmp_path / "dumped.toml", text))
    assert again.warnings == []
    assert dump_toml(again.config, REGS) == text
    for reg in REGS:
        assert plugin_config(again.config, reg) == plugin_config(result.config, reg)


def test_dump_refuses_a_plugin_config_that_toml_cannot_hold():
    @dataclass
    class Odd:
        thing: object = field(default_factory=object)

    odd = Registration(type="io.containerd.internal.v1", id="odd", init=_init, config=Odd)
    with pytest.raises(ConfigError, match="io.containerd.internal.v1.odd"):
        default_toml([odd])


# ---- overrides, ttrpc, durations ---------------------------------------------------------------

def test_apply_overrides_like_containerd_flags():
    c = Config()
    out = apply_overrides(c, root="/r", state="", address="/a.sock", log_level="DEBUG")
    assert out is c
    assert (c.root, c.state, c.grpc.address, c.debug.level) == ("/r", Config().state, "/a.sock", "debug")
    apply_overrides(c)
    assert c.root == "/r"
    with pytest.raises(ConfigError, match="unknown log level"):
        apply_overrides(c, log_level="chatty")


def test_ttrpc_endpoint_defaults_to_grpc_address_and_owner():
    c = Config()
    c.grpc.uid, c.grpc.gid = 5, 6
    assert ttrpc_endpoint(c) == cfgmod.TTRPCConfig(address=c.grpc.address + ".ttrpc", uid=5, gid=6)
    c.ttrpc.address = "/t.sock"
    assert ttrpc_endpoint(c) == cfgmod.TTRPCConfig(address="/t.sock")


@pytest.mark.parametrize("text, seconds", [
    ("5s", 5.0), ("1m30s", 90.0), ("500ms", 0.5), ("2h", 7200.0), ("-1.5h", -5400.0), ("0", 0.0),
    ("1.5us", 1.5e-6), ("3\u00b5s", 3e-6), ("10ns", 1e-8), ("1h2m3.5s", 3723.5), (".5s", 0.5), ("+2s", 2.0),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "s", "1x", "1s 2s", "--1s", "1.s2", "-"])
def test_parse_duration_refuses(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_timeout_lookup_and_fallbacks():
    c = Config()
    assert timeout(c, "io.containerd.timeout.shim.cleanup") == 5.0
    c.timeouts["io.containerd.timeout.shim.cleanup"] = "1m30s"
    assert timeout(c, "io.containerd.timeout.shim.cleanup") == 90.0
    del c.timeouts["io.containerd.timeout.task.state"]
    assert timeout(c, "io.containerd.timeout.task.state") == 2.0   # containerd's default for it
    assert timeout(c, "never.heard.of") == 1.0                     # containerd's DefaultTimeout
    c.timeouts["my.bad"] = "soon"
    with pytest.raises(ConfigError, match='timeouts."my.bad": invalid duration "soon"'):
        timeout(c, "my.bad")


def test_errors_and_warnings_read_well():
    assert str(ConfigError("boom")) == "boom"
    assert str(ConfigError("boom", "/x.toml")) == "/x.toml: boom"
    assert str(ConfigError("boom", "/x.toml", 3, 4)) == "/x.toml:3:4: boom"
    assert str(ConfigWarning(None, "plugins", "io.a.b", "m")) == 'plugins."io.a.b": m'
    assert str(ConfigWarning(Path("/f"), "", "foo", "m")) == "/f: foo: m"
