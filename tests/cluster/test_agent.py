"""A laptop account reaching a different cluster account over SSH (issue 12).

The suite runs as the unprivileged client `hpcs-dev` (scripts/test.sh); the site file is
written like site_configs/example-slurm.yaml and logs in as the cluster account `hpcsl`,
whose home is 0700: the client can only reach the cluster's files through the connection.
`storage`, `python` and `setup` must mean what they mean in hpcsl's environment.
"""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

import pytest

from hpc_serverless import HPCServerlessError, QuantumServerless, distribute_task, get, put
from hpc_serverless.core.errors import StoreError

from ..testcluster import KEY, KNOWN_HOSTS, cluster_python, need_sshd

pytestmark = [pytest.mark.cluster, pytest.mark.ssh]

CLUSTER_USER = "hpcsl"


@pytest.fixture(autouse=True)
def _need_sshd():
    need_sshd()


def write_site(path: Path, **extra: object) -> Path:
    """A site file as a user writes it from example-slurm.yaml. The cluster account's
    python is this test run's interpreter, linked by a setup line
    (tests/testcluster.cluster_python) (readable by every account), so hpcsl does not build a venv of its own."""
    import yaml

    site = {
        "name": "agent-slurm", "scheduler": "slurm",
        "host": "127.0.0.1", "port": 2222, "username": CLUSTER_USER,
        "key_filename": KEY, "known_hosts": KNOWN_HOSTS,
        "storage": "${SCRATCH:-$HOME}/hpc_serverless/t-" + secrets.token_hex(4),
        **cluster_python(),
        "defaults": {"partition": "debug", "time": 10, "mem": "400M"},
        "poll_interval": 1, "max_poll_interval": 3, "agent_grace": 20,
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


def _provider(site_file: Path):
    s = QuantumServerless({"providers": [{"name": "remote", "site": str(site_file)}]})
    return s, s.provider("remote")


def test_calls_in_a_loop_cost_O1_round_trips(site_file):
    """20 calls: one request submits them all (one array, one sbatch), and getting all 20
    values costs a few polls, not 20."""
    s, provider = _provider(site_file)
    with s.context("remote"):
        table = put({"h": [1.0]})
        provider.agent.requests = 0
        refs = [energy(i, table) for i in range(20)]
        provider.backend.flush()
        assert provider.agent.requests <= 2  # check_target once per target, submit once
        assert get(refs, timeout=180) == [float(i) for i in range(20)]
    assert provider.agent.requests < 20, provider.agent.requests
    assert provider.stats()["sbatch"] == 1
    assert provider.agent.channels == 1 and provider.transport.connections == 1


def test_python_without_hpc_serverless_is_named(tmp_path):
    site = write_site(tmp_path / "s.yaml", python="/usr/bin/python3", setup=[])
    s, _ = _provider(site)
    with s.context("remote"), pytest.raises(HPCServerlessError, match=(
            r"hpc_serverless is not installed for the site's python '/usr/bin/python3' on "
            r"hpcsl@127\.0\.0\.1:2222: install it there with `/usr/bin/python3 -m pip install")):
        put(1)


def test_missing_python_is_named(tmp_path):
    site = write_site(tmp_path / "s.yaml", python="~/no/such/python", setup=[])
    s, _ = _provider(site)
    with s.context("remote"), pytest.raises(HPCServerlessError, match=r"python '~/no/such/python' was not found"):
        put(1)


def test_version_mismatch_names_both_sides(site_file, monkeypatch):
    from hpc_serverless.adapters import wire
    from hpc_serverless.adapters.transport import agent_client

    ours = wire.versions()
    monkeypatch.setattr(agent_client, "versions", lambda: {**ours, "hpc_serverless": "9.9.9"})
    s, _ = _provider(site_file)
    with s.context("remote"), pytest.raises(HPCServerlessError) as e:
        put(1)
    msg = str(e.value)
    assert "client has hpc_serverless 9.9.9" in msg and f"agent has hpc_serverless {ours['hpc_serverless']}" in msg
    assert "pip install" in msg


def test_storage_not_writable_names_the_resolved_path(tmp_path):
    site = write_site(tmp_path / "s.yaml", storage="${NO_SUCH_VAR:-/root}/hpcs-store")
    s, _ = _provider(site)
    with s.context("remote"), pytest.raises(StoreError, match=r"storage /root/hpcs-store \(resolved on the "
                                                              r"cluster side\) is not writable by hpcsl@"):
        put(1)


def test_channel_cut_mid_request_runs_it_once(site_file):
    """The connection drops after a submit went out and before its answer came: the
    request is sent again on a new connection and the agent answers it from the first run.
    (The cut is made at the client's socket, as a network would make it: the shared test
    cluster's drop-ssh helper may be another checkout's.)"""
    s, provider = _provider(site_file)
    with s.context("remote"):
        table = put({"h": [2.0]})
        cut = []

        def cut_once(op: str) -> None:
            if op == "submit" and not cut:
                conn = provider.transport.connection
                conn.sock.shutdown(socket.SHUT_RDWR)
                cut.append(conn)

        provider.agent.after_send = cut_once
        refs = [energy(i, table) for i in range(3)]
        provider.backend.flush()
        provider.agent.after_send = None
        assert cut and not cut[0].is_active()
        assert get(refs, timeout=180) == [0.0, 2.0, 4.0]
    assert provider.stats()["sbatch"] == 1  # executed once
    assert provider.agent.channels == 2 and provider.transport.connections == 2


def test_killed_agent_is_replaced_and_tasks_are_found_again(site_file):
    s, provider = _provider(site_file)
    with s.context("remote"):
        table = put({"h": [3.0]})
        refs = [energy(i, table) for i in range(3)]
        provider.backend.flush()
        first = provider.agent.info["pid"]
        assert provider.transport.run(["kill", "-9", str(first)]).ok
        assert get(refs, timeout=180) == [0.0, 3.0, 6.0]
        assert get(table) == {"h": [3.0]}
    assert provider.agent.info["pid"] != first


def test_sites_check_runs_on_the_login_node_through_the_agent(site_file):
    """`hpc-serverless sites check` of a site with a host: the scheduler's commands and the
    storage probe run in the cluster account (storage resolved there), not on the laptop."""
    from hpc_serverless.providers.checks import check_site

    lines = list(check_site(str(site_file)))
    assert f"agent: {CLUSTER_USER}@" in lines[1]
    assert any(line.startswith("  sinfo -h") and ": ok" in line for line in lines)
    assert lines[-1].startswith(f"  storage /home/{CLUSTER_USER}/hpc_serverless/t-") and "writable" in lines[-1]


def test_a_client_gone_for_a_while_reattaches_and_its_refs_still_get(site_file):
    """A laptop that sleeps: its connection is cut and it sends nothing for a while (less
    than agent_grace); it then reconnects to the same agent, and the refs (tasks and a put
    object) made before the drop still get."""
    import time

    s, provider = _provider(site_file)
    with s.context("remote"):
        table = put({"h": [5.0]})
        refs = [energy(i, table) for i in range(3)]
        provider.backend.flush()
        pid = provider.agent.info["pid"]
        provider.transport.connection.sock.shutdown(socket.SHUT_RDWR)
        time.sleep(8)  # the tasks run (and finish) meanwhile; agent_grace is 20 s
        assert get(refs, timeout=180) == [0.0, 5.0, 10.0]
        assert get(table) == {"h": [5.0]}
        assert [r.status() for r in refs] == ["SUCCEEDED"] * 3
    assert provider.agent.info["pid"] == pid  # the same agent, re-attached: not a new one
    assert provider.agent.channels == 2 and provider.transport.connections == 2
    assert provider.stats()["sbatch"] == 1
