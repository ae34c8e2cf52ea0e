"""The committed modules in api/gen are exactly what api/generate.py makes from api/protos."""
from __future__ import annotations

import filecmp
import importlib
import pkgutil
from pathlib import Path

import betterproto
import pytest

import pycontainerd.api.gen as gen
from pycontainerd.api.generate import GEN_DIR, generate

REGENERATE = "run `.venv/bin/python -m pycontainerd.api.generate` and commit api/gen"


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_generated_modules_are_fresh(tmp_path):
    fresh = tmp_path / "gen"
    generate(fresh)
    committed, wanted = _files(GEN_DIR), _files(fresh)
    assert committed == wanted, (
        f"api/gen is stale: missing {sorted(wanted - committed)}, extra {sorted(committed - wanted)}; {REGENERATE}"
    )
    _, mismatch, errors = filecmp.cmpfiles(GEN_DIR, fresh, sorted(wanted), shallow=False)
    assert not mismatch and not errors, f"api/gen is stale: {sorted(mismatch + errors)} differ; {REGENERATE}"


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(gen.__path__, prefix=f"{gen.__name__}."))


@pytest.mark.parametrize("module", _modules())
def test_every_generated_module_imports(module):
    importlib.import_module(module)


def test_registry_names_every_message():
    from pycontainerd.api.gen.registry import MESSAGES, message_class

    assert "containerd.events.TaskOOM" in MESSAGES
    for name in MESSAGES:
        cls = message_class(name)
        assert issubclass(cls, betterproto.Message), name
    assert message_class("types.containerd.io/containerd.events.TaskOOM").__name__ == "TaskOom"
