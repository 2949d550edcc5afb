"""A laptop account reaching a different cluster account over SSH (issue 12).

The suite runs as the unprivileged client `hpcs-dev` (scripts/test.sh); the site file is
written like site_configs/example-slurm.yaml and logs in as the cluster account `hpcsl`,
whose home is 0700: the client can only reach the cluster's files through the connection.
`storage`, `python` and `setup` must mean what they mean in hpcsl's environment.
"""

from __future__ import annotations

import os
import secrets
import shlex
import socket
import sys
from pathlib import Path

import pytest

from hpc_serverless import QuantumServerless, distribute_task, get, put

from ..testcluster import KEY, KNOWN_HOSTS

pytestmark = [pytest.mark.cluster, pytest.mark.ssh]

CLUSTER_USER = "hpcsl"


@pytest.fixture(autouse=True)
def _need_sshd():
    if not os.path.exists(KEY):
        pytest.skip("no test ssh key (tests/cluster/up.sh makes one)")
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 2222)):
            pytest.skip("no sshd on 127.0.0.1:2222 (tests/cluster/up.sh starts one)")


def write_site(path: Path, **extra: object) -> Path:
    """A site file as a user writes it from example-slurm.yaml. The cluster account's
    python is ~/hpcs-venv/bin/python, which the setup line links to this test run's
    interpreter (readable by every account), so hpcsl does not build a venv of its own."""
    import yaml

    site = {
        "name": "agent-slurm", "scheduler": "slurm",
        "host": "127.0.0.1", "port": 2222, "username": CLUSTER_USER,
        "key_filename": KEY, "known_hosts": KNOWN_HOSTS,
        "storage": "${SCRATCH:-$HOME}/hpc_serverless/t-" + secrets.token_hex(4),
        "python": "~/hpcs-venv/bin/python",
        "setup": [f"ln -sfn {shlex.quote(sys.prefix)} \"$HOME/hpcs-venv\""],
        "defaults": {"partition": "debug", "time": 10, "mem": "400M"},
        "poll_interval": 1, "max_poll_interval": 3,
        **extra,
    }
    path.write_text(yaml.safe_dump(site))
    return path


@pytest.fixture
def site_file(tmp_path) -> Path:
    return write_site(tmp_path / "example-like.yaml")


@distribute_task
def energy(scale, table):
    return scale * sum(table["h"])


def test_site_paths_resolve_in_the_cluster_account(site_file):
    """The Why of issue 12: ${SCRATCH:-$HOME}, ~ and python expanded with the laptop's
    environment gave StoreError: cannot create store directory /home/hpcs-dev/...:
    Permission denied."""
    s = QuantumServerless({"providers": [{"name": "remote", "site": str(site_file)}]})
    provider = s.provider("remote")
    with s.context("remote"):
        table = put({"h": [1.0, 2.0]})
        assert get(table) == {"h": [1.0, 2.0]}
        assert get([energy(i, table) for i in range(3)], timeout=180) == [0.0, 3.0, 6.0]
    assert str(provider.store.root).startswith(f"/home/{CLUSTER_USER}/hpc_serverless/t-")
