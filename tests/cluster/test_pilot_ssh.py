"""Pilot mode from a laptop (issue 12): the dask scheduler runs in the site's agent on the
login node, as the cluster account, and the pilot workers connect to it there; the laptop
sends calls and polls results through the agent. One pilot job of two cores."""

from __future__ import annotations

import gc
import subprocess
import time

import pytest

from hpc_serverless import distribute_task, get, put
from hpc_serverless.core.errors import DependencyError
from hpc_serverless.providers.remote import RELEASE_BATCH

from .test_agent import _need_sshd, _provider, energy, write_site  # noqa: F401 - _need_sshd: autouse

pytestmark = [pytest.mark.cluster, pytest.mark.ssh]


@distribute_task
def boom(msg):
    # (a builtin type: this test module is not importable on the cluster side, so a class
    # of its own would travel by reference and not load there)
    raise ArithmeticError(msg)


@distribute_task
def add(a, b):
    return a + b


@distribute_task
def make(n, tag):
    return bytes([tag % 256]) * n


@distribute_task
def size(blob):
    return len(blob)


def _queued(job_ids: list[str]) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], capture_output=True, text=True)
    return out.stdout.split()


def test_pilot_mode_from_a_laptop(tmp_path):
    site = write_site(tmp_path / "pilot.yaml", mode="pilot", agent_grace=3, pilot={
        "workers": 1, "target": {"cpu": 2, "mem": "3000M", "time": 10},
        "walltime_margin": 60, "connect_timeout": 90})
    s, provider = _provider(site)
    with s.context("remote"):
        table = put({"h": [1.0, 2.0]})
        refs = [energy(i, table) for i in range(300)]
        assert get(refs, timeout=300) == [3.0 * i for i in range(300)]
        bad = boom("diverged")
        down = add(bad, 1)
        with pytest.raises(ArithmeticError, match="diverged"):
            get(bad, timeout=60)
        with pytest.raises(DependencyError):
            get(down, timeout=60)
        assert refs[0].status() == "SUCCEEDED"
    assert provider.agent.info["mode"] == "pilot"
    jobs = sorted({r.job_id for r in refs if r.job_id})
    assert len(jobs) == 1 and provider.stats()["sbatch"] == 1  # one pilot job, not 300 jobs
    assert provider.agent.requests < 40, provider.agent.requests
    with s.context("remote"):
        # the agent keeps what its client's refs point to (their refs live on the laptop)
        assert refs[-1].info()["status"] == "SUCCEEDED"
        # and this client drops a result once its refs went (issue 14): 2,000 of 100 kB
        held = provider.backend.stats()["tracked"]
        agent_held = provider.agent.call("ping")["pilot_refs"]
        for start in range(0, 2000, 100):
            batch = [make(100_000, i) for i in range(start, start + 100)]
            assert get(batch, timeout=120)[-1] == bytes([(start + 99) % 256]) * 100_000
            del batch
        gc.collect()
        assert get(make(1, 0), timeout=60) == b"\x00"   # (its submission drops the released)
        assert provider.backend.stats()["tracked"] <= held + 1
        # the agent heard of them (RELEASE_BATCH at a time) and dropped its refs too
        assert provider.agent.call("ping")["pilot_refs"] - agent_held < RELEASE_BATCH
        # a task's upstream result stays while the task waits to be sent, though the refs to
        # it went (each up is dropped as its down is queued, and releases go out meanwhile)
        n = 2 * RELEASE_BATCH
        ups = [make(10 + i % 7, i) for i in range(n)]
        get(ups, timeout=120)
        ups.reverse()
        downs = [size(ups.pop()) for _ in range(n)]
        assert get(downs, timeout=120) == [10 + i % 7 for i in range(n)]
    provider.close()
    # the agent leaves after its grace period and takes its pilot job along
    deadline = time.time() + 60
    while _queued(jobs) and time.time() < deadline:
        time.sleep(1)
    assert not _queued(jobs)
