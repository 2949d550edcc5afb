"""The Torque face of the test cluster (Slurm's qsub/qstat/qdel wrappers): Torque's dialect
only (-l nodes=N:ppn=M on the command line, text qstat -f, qdel), through PBSProvider with
pbs_flavor: torque. PBS Pro's path (arrays, dependencies, programs, MPI, walltime, qdel)
runs against the fake PBS Pro server in tests/cluster/test_pbspro.py."""

from __future__ import annotations

import os
import subprocess
import textwrap
import time

import pytest

from hpc_serverless import PBSProvider, Program, QuantumServerless, distribute_task, get
from hpc_serverless.core.errors import DependencyError

from ..traceback_checks import assert_user_frame
from .conftest import ROOT

pytestmark = pytest.mark.cluster

PBS_SITE = str(ROOT / os.environ.get("HPC_SERVERLESS_TEST_PBS_SITE", "site_configs/localhost-pbs.yaml"))


@pytest.fixture(scope="module")
def serverless():
    import shutil

    if not shutil.which("qsub"):
        pytest.skip("no qsub on this machine (tests/cluster/up.sh installs Slurm's PBS wrappers)")
    return QuantumServerless().add_provider(PBSProvider("pbs", site=PBS_SITE))


class SolverError(Exception):
    pass


@distribute_task
def cube(x):
    return x ** 3


@distribute_task
def fails(msg):
    raise SolverError(msg)


def test_tasks_and_exception(serverless):
    with serverless.context("pbs"):
        assert get([cube(i) for i in range(3)], timeout=180) == [0, 1, 8]
        with pytest.raises(SolverError, match="no SCF convergence") as e:
            get(fails("no SCF convergence"), timeout=180)
        assert_user_frame(str(e.value.__cause__), fails, "raise SolverError(msg)")
    counts = serverless.provider("pbs").transport.counts
    assert counts["qsub"] >= 4 and "sbatch" not in counts  # no arrays on the wrapper: one job per task


def test_failed_upstream_leaves_no_dependent_queued(serverless):
    """The wrapper keeps a dependent of a failed job queued forever
    (DependencyNeverSatisfied); the client cancels it when it learns the upstream failed."""
    with serverless.context("pbs"):
        up = fails("upstream")
        down = cube(up)
        downer = cube(down)
        with pytest.raises(DependencyError, match="fails"):
            get(down, timeout=180)
        with pytest.raises(DependencyError, match="cube"):
            get(downer, timeout=180)
    left = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ids = [r.job_id.split(".")[0] for r in (down, downer) if r.job_id]
        out = subprocess.run(["squeue", "-h", "-o", "%i %T %r", "-j", ",".join(ids)],
                             capture_output=True, text=True)
        left = [line for line in out.stdout.splitlines() if "PENDING" in line or "RUNNING" in line]
        if not left:
            break
        time.sleep(1)
    assert not left, f"dependents still queued: {left}"


def test_program_logs_and_result(serverless, tmp_path):
    wd = tmp_path / "src"
    wd.mkdir()
    (wd / "main.py").write_text(textwrap.dedent("""
        from hpc_serverless import get_arguments, save_result
        print("on PBS with", get_arguments(), flush=True)
        save_result(sum(range(10)))
    """))
    serverless.set_provider("pbs")
    job = serverless.run_program(Program("pbs prog", "main.py", working_dir=str(wd)), arguments={"k": 1})
    assert job.result(timeout=180) == 45
    assert job.status() == "SUCCEEDED" and "on PBS with {'k': 1}" in job.logs()


def test_requeue_is_refused_at_submission(serverless, tmp_path):
    """Issue 17 item 7: `requeue` does nothing on PBS yet, so it is refused at the call
    (no job is submitted), and in a PBS site's defaults at load (file and key named)."""
    from hpc_serverless.core.errors import ConfigError, TargetError

    provider = serverless.provider("pbs")
    before = provider.transport.counts.get("qsub", 0)
    with serverless.context("pbs"), pytest.raises(TargetError, match="'requeue' is not supported on PBS"):
        cube.options(requeue=1)(2)
    assert provider.transport.counts.get("qsub", 0) == before
    site = tmp_path / "pbs-requeue.yaml"
    site.write_text(open(PBS_SITE).read().replace("defaults:\n", "defaults:\n  requeue: 2\n"))
    with pytest.raises(ConfigError, match=r"pbs-requeue\.yaml:\d+, key 'defaults.requeue': target 'requeue'"):
        PBSProvider("pbs2", site=str(site))
