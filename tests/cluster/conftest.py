"""Cluster tests: against the real test cluster (tests/cluster/up.sh) or the site named in
HPC_SERVERLESS_TEST_SITE. Without either they are skipped, with one line saying why."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SITE = os.environ.get("HPC_SERVERLESS_TEST_SITE")
REASON = ("no test cluster: run as root on a Debian-like machine (scripts/test.sh starts one) "
          "or set HPC_SERVERLESS_TEST_SITE to a site file")


def pytest_collection_modifyitems(config, items):
    if SITE:
        return
    skip = pytest.mark.skip(reason=REASON)
    for item in items:
        if "cluster" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def site_path() -> str:
    path = Path(SITE or "")
    return str(path if path.is_absolute() else ROOT / path)


@pytest.fixture(scope="session")
def slurm(site_path):
    from hpc_serverless import SlurmProvider

    provider = SlurmProvider("cluster", site=site_path)
    yield provider
    provider.backend.close()


@pytest.fixture
def on_slurm(slurm):
    from hpc_serverless import QuantumServerless

    s = QuantumServerless().add_provider(slurm)
    with s.context("cluster"):
        yield slurm


def is_test_cluster() -> bool:
    return bool(SITE) and "localhost" in SITE and shutil.which("slurmctld") is not None


def cluster_script(name: str) -> None:
    subprocess.run(["bash", str(ROOT / "tests/cluster" / name)], check=True, capture_output=True, timeout=300)
