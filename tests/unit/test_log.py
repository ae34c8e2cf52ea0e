"""core/log: levels, formats, and stdlib logging routed through the same handler."""
import io
import json
import logging

import pytest
import structlog

from pycontainerd.core import log as logmod


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    config = structlog.get_config()
    yield
    if logmod._handler is not None:
        root.removeHandler(logmod._handler)
        logmod._handler = None
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)


def lines(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line]


@pytest.mark.parametrize("name,number", [
    ("trace", logging.DEBUG), ("debug", logging.DEBUG), ("info", logging.INFO),
    ("warn", logging.WARNING), ("warning", logging.WARNING), ("error", logging.ERROR),
    ("fatal", logging.CRITICAL), ("panic", logging.CRITICAL), ("INFO", logging.INFO),
    (" Debug ", logging.DEBUG), ("", logging.INFO), (logging.ERROR, logging.ERROR),
])
def test_levels(name, number):
    assert logmod.parse_level(name) == number


@pytest.mark.parametrize("bad", ["verbose", "critical", "infoo", "5", None, 1.5])
def test_invalid_level(bad):
    with pytest.raises(ValueError, match="invalid log level"):
        logmod.configure(bad, "text", io.StringIO())  # type: ignore[arg-type]


def test_invalid_level_message_lists_choices():
    with pytest.raises(ValueError) as info:
        logmod.parse_level("loud")
    assert str(info.value) == (
        "invalid log level 'loud': must be one of trace, debug, info, warn, error, fatal, panic")


def test_invalid_format_changes_nothing():
    root = logging.getLogger()
    before = list(root.handlers)
    with pytest.raises(ValueError, match="invalid log format 'xml'"):
        logmod.configure("info", "xml", io.StringIO())
    assert root.handlers == before


def test_json_one_object_per_line():
    out = io.StringIO()
    logmod.configure("info", "json", out)
    log = structlog.get_logger("pycontainerd.test")
    log.info("serving", address="/run/x.sock", n=3)
    log.debug("hidden")
    log.warning("multi\nline", obj=object())
    records = [json.loads(line) for line in lines(out)]
    assert len(records) == 2
    first = records[0]
    assert list(first)[:4] == ["time", "level", "msg", "logger"]
    assert first["msg"] == "serving" and first["level"] == "info"
    assert first["logger"] == "pycontainerd.test"
    assert first["address"] == "/run/x.sock" and first["n"] == 3
    assert first["time"].endswith("Z")
    assert records[1]["level"] == "warning" and records[1]["msg"] == "multi\nline"


def test_text_is_logfmt():
    out = io.StringIO()
    logmod.configure("debug", "text", out)
    structlog.get_logger("pycontainerd.test").info("plugin loaded", id="io.containerd.x", ok=True)
    (line,) = lines(out)
    assert line.startswith("time=")
    assert 'level=info msg="plugin loaded" logger=pycontainerd.test' in line
    assert "id=io.containerd.x" in line and "ok=true" in line


def test_stdlib_logging_routed_at_same_level():
    out = io.StringIO()
    logmod.configure("warn", "json", out)
    grpclib_log = logging.getLogger("grpclib.server")
    grpclib_log.info("not shown")
    grpclib_log.warning("connection %s lost", "x1")
    (record,) = [json.loads(line) for line in lines(out)]
    assert record == {**record, "level": "warning", "msg": "connection x1 lost", "logger": "grpclib.server"}


def test_trace_enables_debug_and_fatal_only_critical():
    out = io.StringIO()
    logmod.configure("trace", "json", out)
    structlog.get_logger("t").debug("d")
    assert len(lines(out)) == 1
    out2 = io.StringIO()
    logmod.configure("fatal", "json", out2)
    structlog.get_logger("t").error("e")
    logging.getLogger("t").critical("c")
    assert [json.loads(line)["msg"] for line in lines(out2)] == ["c"]


def test_reconfigure_replaces_handler():
    first, second = io.StringIO(), io.StringIO()
    logmod.configure("info", "text", first)
    logmod.configure("info", "json", second)
    structlog.get_logger("x").info("once")
    assert lines(first) == []
    assert json.loads(lines(second)[0])["msg"] == "once"
    ours = [h for h in logging.getLogger().handlers if h.get_name() == "pycontainerd"]
    assert len(ours) == 1


def test_module_level_loggers_created_before_configure_follow_it():
    early = structlog.get_logger("pycontainerd.early")  # as modules do at import time
    out = io.StringIO()
    logmod.configure("info", "json", out)
    early.info("late bound")
    assert json.loads(lines(out)[0])["logger"] == "pycontainerd.early"


def test_exceptions_rendered():
    out = io.StringIO()
    logmod.configure("info", "json", out)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        structlog.get_logger("x").exception("failed")
        logging.getLogger("y").exception("failed too")
    records = [json.loads(line) for line in lines(out)]
    assert all("RuntimeError: boom" in r["exception"] for r in records)
    assert len(records) == 2


def test_get_logger_binds():
    out = io.StringIO()
    logmod.configure("info", "json", out)
    logmod.get_logger("pycontainerd.x", plugin="p1").info("hi")
    record = json.loads(lines(out)[0])
    assert record["plugin"] == "p1" and record["logger"] == "pycontainerd.x"
