"""Pilot mode on the real Slurm test cluster: tasks through a few dask worker jobs
(site_configs/localhost-slurm-pilot.yaml, or HPC_SERVERLESS_TEST_PILOT_SITE).

One pilot cluster (two jobs of two cores) serves most tests; it is shut down by the
last of them, which checks that no job is left. Walltime retirement and an unreachable
scheduler get small clusters of their own, after that."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc_serverless import QuantumServerless, distribute_task, get, put, wait
from hpc_serverless.config.site import load_site
from hpc_serverless.core.errors import DependencyError, HPCServerlessError, ResourceError, TaskCancelledError
from hpc_serverless.runtime.worker import args_key, result_key

from ..traceback_checks import assert_user_frame
from .conftest import ROOT

pytestmark = pytest.mark.cluster

PILOT_SITE = os.environ.get("HPC_SERVERLESS_TEST_PILOT_SITE", "site_configs/localhost-slurm-pilot.yaml")


class PhysicsError(Exception):
    """A user exception type defined in the test module."""


@distribute_task
def square(x):
    return x * x


@distribute_task
def add(a, b):
    return a + b


@distribute_task
def boom(msg):
    raise PhysicsError(msg)


@distribute_task
def slow(seconds, value):
    time.sleep(seconds)
    return value


@distribute_task
def span(seconds, tag):
    """(pid, start, end, tag): which worker process ran it, and when."""
    start = time.time()
    time.sleep(seconds)
    return os.getpid(), start, time.time(), tag


@distribute_task
def size_of(blob):
    return len(blob), bytes(blob[:4])


@distribute_task
def make(n):
    return b"z" * n


def _site(**pilot):
    path = Path(PILOT_SITE)
    site = load_site(path if path.is_absolute() else ROOT / path)
    return site.model_copy(update={"pilot": site.pilot.model_copy(update=pilot)}) if pilot else site


def _squeue(job_ids):
    if not job_ids:
        return []
    out = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(job_ids)],
                         capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if line.strip()]


def _gone(job_ids, within=30.0):
    deadline = time.time() + within
    while _squeue(job_ids) and time.time() < deadline:
        time.sleep(0.5)
    return _squeue(job_ids)


@pytest.fixture(scope="module")
def pilot():
    from hpc_serverless.providers.factory import provider_for_site

    provider = provider_for_site(_site(), "pilot")
    yield provider
    provider.close()  # (normally done already by test_shutdown_leaves_no_jobs)


@pytest.fixture
def on_pilot(pilot):
    with QuantumServerless().add_provider(pilot).context("pilot"):
        yield pilot


def test_factory_builds_a_pilot_provider_and_dask_stays_unimported():
    code = ("import sys, hpc_serverless\n"
            "from hpc_serverless.providers.factory import provider_for_site\n"
            "from hpc_serverless.config.site import load_site\n"
            f"p = provider_for_site(load_site({str(ROOT / PILOT_SITE)!r}), 'x')\n"
            "assert type(p).__name__ == 'PilotProvider', type(p)\n"
            "assert 'dask' not in sys.modules and 'distributed' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_2000_tasks_every_value_right_through_few_jobs(on_pilot):
    refs = [square(i) for i in range(2000)]
    assert get(refs, timeout=120) == [i * i for i in range(2000)]
    workers = on_pilot.site.pilot.workers
    # the scheduler saw the pilot jobs, not one job per task
    assert on_pilot.stats().get("sbatch", 0) == len(on_pilot.pilot_jobs()) <= workers
    assert {r.job_id for r in refs} <= set(on_pilot.pilot_jobs())
    assert refs[0].status() == "SUCCEEDED" and refs[0].done()


def test_dependencies_chain_and_fan_in(on_pilot):
    a = slow(0.3, 10)
    b = add(a, 5)
    c = add(b, 1)
    many = [square(i) for i in range(100)]      # chunked upstream tasks
    total = add(many[7], many[99])
    assert get([c, total], timeout=60) == [16, 49 + 99 * 99]
    late = add(a, 100)                         # upstream already finished and collected
    assert get(late, timeout=60) == 110


def test_exception_keeps_its_type_traceback_and_fails_dependents(on_pilot):
    bad = boom("diverged")
    down = add(bad, 1)
    with pytest.raises(PhysicsError, match="diverged") as e:
        get(bad, timeout=60)
    assert_user_frame(str(e.value.__cause__), boom, "raise PhysicsError(msg)")
    with pytest.raises(DependencyError, match="boom") as d:
        get(down, timeout=60)
    assert isinstance(d.value.__cause__, PhysicsError)
    assert bad.status() == "FAILED" and down.status() == "FAILED"
    after = add(bad, 2)  # submitted once the failure is known: fails without running
    with pytest.raises(DependencyError):
        get(after, timeout=10)


def test_put_objects_and_large_values_go_through_the_store(on_pilot):
    small = put({"weights": [1, 2, 3]})
    big = put(b"B" * (3 << 20))
    assert get(size_of(big), timeout=60) == (3 << 20, b"BBBB")

    @distribute_task
    def total(d):
        return sum(d["weights"])

    assert get(total(small), timeout=60) == 6
    limit = on_pilot.site.pilot.inline_limit
    arg = b"A" * (limit + 10)
    ref = size_of(arg)                      # argument above the limit: written to the store
    assert get(ref, timeout=60) == (limit + 10, b"AAAA")
    out = make(limit + 10)                  # result above the limit: the worker stores it
    assert len(get(out, timeout=60)) == limit + 10
    assert on_pilot.store.exists(result_key(out.task_id))  # (in the task's session)
    assert on_pilot.store.exists(args_key(ref.task_id))   # (in the task's session too)
    assert get(add(out, b"!"), timeout=60)[-1:] == b"!"   # a stored upstream value


def test_two_core_task_never_shares_a_worker(on_pilot):
    refs = [span(0.4, "one") for _ in range(6)]
    refs += [span.options(cpu=2)(0.4, "two") for _ in range(4)]
    refs += [span(0.4, "one") for _ in range(6)]
    runs = get(refs, timeout=120)
    for pid, start, end, tag in runs:
        if tag != "two":
            continue
        overlapping = [r for r in runs if r[0] == pid and r != (pid, start, end, tag)
                       and r[1] < end - 0.01 and r[2] > start + 0.01]
        assert not overlapping, (tag, overlapping)
    with pytest.raises(ResourceError, match="each pilot worker has 2 core"):
        square.options(cpu=4)(1)
    with pytest.raises(ResourceError, match="mode: jobs"):
        square.options(gpu=1)(1)


def test_status_wait_and_cancel(on_pilot):
    fast = square(3)
    long = slow(20, "never")
    done, pending = wait([fast, long], num_returns=1, timeout=60)
    assert done == [fast] and pending == [long]
    deadline = time.time() + 30
    while long.status() != "RUNNING" and time.time() < deadline:
        time.sleep(0.1)
    assert long.status() == "RUNNING"
    assert long.cancel() is True
    assert long.status() == "STOPPED"
    with pytest.raises(TaskCancelledError):
        get(long, timeout=10)
    assert long.cancel() is False


def test_worker_job_killed_mid_run_loses_nothing(on_pilot):
    first = [slow(0.05, i) for i in range(20)]
    assert get(first, timeout=60) == list(range(20))     # results already collected...
    jobs_before = on_pilot.pilot_jobs()
    refs = [slow(0.5, i) for i in range(40)]
    deadline = time.time() + 30
    while sum(r.status() == "RUNNING" for r in refs) < 2 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    victim = jobs_before[0]
    subprocess.run(["scancel", victim], check=True)
    assert get(refs, timeout=120) == list(range(40))     # ...and the rest rerun elsewhere
    assert get(first, timeout=5) == list(range(20))
    deadline = time.time() + 30                           # a new job replaces the killed one
    while len(on_pilot.pilot_jobs()) <= len(jobs_before) and time.time() < deadline:
        time.sleep(0.2)
    assert len(on_pilot.pilot_jobs()) == len(jobs_before) + 1
    assert get(square(12), timeout=60) == 144


def test_job_script_of_the_pilot_jobs(on_pilot):
    script = on_pilot.pilot.cluster.job_script()
    assert "#SBATCH -p debug" in script and "#SBATCH --cpus-per-task=2" in script
    assert "--resources cpu=2,mem=3000" in script
    assert "--lifetime" in script and "--tls-ca-file" in script
    assert "#SBATCH --output=" in script and "HPC_SERVERLESS_STORE=" in script


def test_shutdown_leaves_no_jobs(pilot):
    jobs = pilot.pilot_jobs()
    assert jobs
    pilot.close()
    assert _gone(jobs) == []
    with pytest.raises(HPCServerlessError, match="closed"):
        with QuantumServerless().add_provider(pilot).context("pilot"):
            square(1)


def test_workers_retire_before_walltime_and_tasks_still_complete():
    from hpc_serverless.providers.pilot import PilotProvider

    provider = PilotProvider("retiring", site=_site(lifetime=6, lifetime_stagger=2))
    try:
        with QuantumServerless().add_provider(provider).context("retiring"):
            refs = [slow(0.5, i) for i in range(60)]          # ~8 s of work on 4 threads
            assert get(refs, timeout=120) == list(range(60))
        # the first two workers retired (6 +- 2 s) and were replaced
        assert len(provider.pilot_jobs()) > 2, provider.pilot_jobs()
    finally:
        provider.close()
    assert _gone(provider.pilot_jobs()) == []


def test_workers_that_cannot_connect_are_reported_early():
    from hpc_serverless.providers.pilot import PilotProvider

    site = _site(workers=1, connect_timeout=4)
    site = site.model_copy(update={"setup": ("sleep 120",)})  # the job runs, no worker ever connects
    provider = PilotProvider("walled", site=site)
    try:
        t0 = time.time()
        with QuantumServerless().add_provider(provider).context("walled"):
            ref = square(2)
        with pytest.raises(HPCServerlessError, match="no dask worker connected to the scheduler at tls://") as e:
            provider.start(wait=True, timeout=60)
        assert time.time() - t0 < 40
        assert "pilot.interface" in str(e.value) and "RUNNING" in str(e.value)
        with pytest.raises(HPCServerlessError, match="no dask worker connected"):
            get(ref, timeout=10)
    finally:
        provider.close()
    assert _gone(provider.pilot_jobs()) == []
