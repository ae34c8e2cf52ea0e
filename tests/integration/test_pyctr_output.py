"""pyctr's output helpers without a daemon: the Go tabwriter port, Go durations, label arguments,
and the client library's address parsing and lease-expiry label."""
from __future__ import annotations

import io
from datetime import datetime, timedelta, timezone

import pytest

from pycontainerd.api.client._base import parse_address
from pycontainerd.api.client.leases import expire_label_value
from pycontainerd.api.client.types import Platform, Plugin, PluginError, rfc3339
from pycontainerd.cmd.pyctr_output import TabWriter, go_duration, label_args, parse_duration


def render(minwidth, padding, text):
    w = TabWriter(io.StringIO(), minwidth=minwidth, tabwidth=8, padding=padding)
    w.write(text)
    return w.render()


def test_tabwriter_table_like_ctr_ns_ls():
    # `ctr ns ls` (minwidth 1, padding 1): every cell, the last one too, padded to its column.
    out = render(1, 1, "NAME\tLABELS\t\nbar\t\t\nfoo\ta=b,c=d\t\n")
    assert out == "NAME LABELS  \nbar          \nfoo  a=b,c=d \n"


def test_tabwriter_table_like_ctr_plugins_ls():
    out = render(4, 4, "TYPE\tID\tSTATUS\t\nio.containerd.content.v1\tcontent\tok\t\n")
    assert out.splitlines() == [
        "TYPE                        ID         STATUS    ",
        "io.containerd.content.v1    content    ok        ",
    ]


def test_tabwriter_column_blocks_like_plugins_detailed():
    # Lines with fewer cells end a column block; the text after the last tab is not a cell.
    text = ("Type:\t io.containerd.content.v1\n"
            "ID:\t content\n"
            "Exports:\t\n"
            "\t root \t /var/lib\n"
            "\t\t\t\n")
    out = render(4, 4, text)
    assert out.splitlines() == [
        "Type:        io.containerd.content.v1",
        "ID:          content",
        "Exports:    ",
        "             root      /var/lib",
        " " * 26,
    ]


def test_tabwriter_line_without_tabs_flushes_columns():
    out = render(1, 1, "a\tb\t\nplain line\nlonger-cell\tc\t\n")
    assert out == "a b \nplain line\nlonger-cell c \n"


@pytest.mark.parametrize("text,seconds", [
    ("0", 0), ("24h", 86400), ("1h30m", 5400), ("1.5s", 1.5), ("300ms", 0.3), ("2m3s", 123),
    ("10", 10), ("-1h", -3600), ("1us", 1e-6),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "1d", "h", "1h x"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_go_duration():
    assert go_duration(86400) == "24h0m0s"
    assert go_duration(90) == "1m30s"
    assert go_duration(0) == "0s"


def test_label_args():
    assert label_args(["a=b", "c", "d=e=f", "g="]) == {"a": "b", "c": "true", "d": "e=f", "g": ""}
    assert label_args(["c"], bare_value="") == {"c": ""}


def test_parse_address():
    assert parse_address("/run/x.sock") == {"path": "/run/x.sock"}
    assert parse_address("unix:///run/x.sock") == {"path": "/run/x.sock"}
    assert parse_address("tcp://127.0.0.1:1234") == {"host": "127.0.0.1", "port": 1234}
    assert parse_address("localhost:99") == {"host": "localhost", "port": 99}
    assert parse_address("relative.sock") == {"path": "relative.sock"}


def test_expire_label_value():
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert expire_label_value(3600, now) == "2026-01-02T04:04:05Z"
    assert expire_label_value(timedelta(days=1), now) == "2026-01-03T03:04:05Z"
    assert expire_label_value(0, now) is None
    assert expire_label_value(None, now) is None
    assert expire_label_value(datetime(2030, 1, 1, tzinfo=timezone.utc)) == "2030-01-01T00:00:00Z"


def test_plugin_status_and_platforms():
    ok = Plugin(type="t", id="a", platforms=(Platform("linux", "amd64"), Platform("linux", "amd64"),
                                            Platform("linux", "arm", "v7")))
    assert ok.status == "ok" and ok.platform_names == ["linux/amd64", "linux/arm/v7"]
    assert Plugin("t", "b", init_err=PluginError(2, "no zfs: skip plugin")).status == "skip"
    broken = Plugin("t", "c", init_err=PluginError(2, "devmapper not configured"))
    assert broken.status == "error" and broken.init_err.code_name == "Unknown"
    assert str(Platform("", "")) == "unknown"


def test_rfc3339_utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    import time
    time.tzset()
    try:
        assert rfc3339(datetime(2026, 11, 28, 0, 8, 4, 123456, tzinfo=timezone.utc)) == "2026-11-28T00:08:04Z"
    finally:
        monkeypatch.undo()
        time.tzset()
