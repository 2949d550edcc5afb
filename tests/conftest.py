"""Shared fixtures: every test session gets its own HPC_SERVERLESS_HOME (store, jobs)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_home = Path(tempfile.mkdtemp(prefix="hpcs-test-home-"))
os.chmod(_home, 0o700)
os.environ["HPC_SERVERLESS_HOME"] = str(_home)
os.environ["HPC_SERVERLESS_NO_PROGRESS"] = "1"

def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="also run tests marked slow (each takes minutes: real time limits, requeues)")


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` need minutes each (a real time limit runs out); CI stays short
    without them. Run them with --slow."""
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow (minutes): run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


#: paths with spaces, quotes, ';' and a newline: whatever we build must survive them
HOSTILE_NAMES = ["with space", "quo'te", 'dq"uote', "semi;colon", "dollar$HOME", "new\nline"]


@pytest.fixture
def home() -> Path:
    return _home


@pytest.fixture
def hostile_dir(tmp_path: Path) -> Path:
    d = tmp_path / "a dir; with 'quotes' $x"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture(autouse=True)
def _fresh_current_provider():
    """set_provider() and QuantumServerless() choose the provider for the whole process
    (as for a user's script); reset that between tests so none inherits another's."""
    import hpc_serverless.api as api

    api._last_set, api._last_serverless = None, None
    yield
    api._last_set, api._last_serverless = None, None
