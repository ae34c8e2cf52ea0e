"""Shared fixtures: real daemons on private temp paths (see tests/daemons.py)."""
from __future__ import annotations

import os

import pytest

from daemons import Daemon


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root")
        for item in items:
            if "root" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def daemon():
    """Our daemon, started with the default config, cleaned up afterwards."""
    d = Daemon("pycontainerd")
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


@pytest.fixture
def containerd():
    """The stock containerd 1.6 as a reference peer, cleaned up afterwards."""
    d = Daemon("containerd")
    try:
        d.start()
        yield d
    finally:
        d.cleanup()
