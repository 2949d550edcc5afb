"""The PBS face of the test cluster (Slurm's qsub/qstat/qdel wrappers): tasks and programs
through PBSProvider. It proves our PBS command path, not PBS Pro's server (see
site_configs/localhost-pbs.yaml)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from hpc_serverless import PBSProvider, Program, QuantumServerless, distribute_task, get
from hpc_serverless.errors import DependencyError, JobFailedError

from .conftest import ROOT

pytestmark = pytest.mark.cluster

PBS_SITE = str(ROOT / "site_configs/localhost-pbs.yaml")


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


def test_tasks_dependency_and_exception(serverless):
    with serverless.context("pbs"):
        assert get([cube(i) for i in range(3)], timeout=180) == [0, 1, 8]
        assert get(cube(cube(2)), timeout=180) == 512
        with pytest.raises(SolverError, match="no SCF convergence"):
            get(fails("no SCF convergence"), timeout=180)
        with pytest.raises(DependencyError, match="fails"):
            get(cube(fails("upstream")), timeout=180)
    counts = serverless.provider("pbs").transport.counts
    assert counts["qsub"] >= 5 and "sbatch" not in counts


def test_seed_tutorial_on_pbs(tmp_path):
    pytest.importorskip("qiskit")
    cfg = tmp_path / "serverless.yaml"
    cfg.write_text(f"providers:\n  - name: local\n  - name: pbs\n    site: {PBS_SITE}\n")
    out = subprocess.run([sys.executable, str(ROOT / "examples/quickstart.py"), "--config", str(cfg),
                          "--provider", "pbs"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_program_logs_result_and_stop(serverless, tmp_path):
    wd = tmp_path / "src"
    wd.mkdir()
    (wd / "main.py").write_text(textwrap.dedent("""
        import sys, time
        from hpc_serverless import get_arguments, save_result
        print("on PBS with", get_arguments(), flush=True)
        if get_arguments().get("sleep"):
            time.sleep(600)
        save_result(sum(range(10)))
    """))
    serverless.set_provider("pbs")
    job = serverless.run_program(Program("pbs prog", "main.py", working_dir=str(wd)), arguments={"k": 1})
    assert job.result(timeout=180) == 45
    assert job.status() == "SUCCEEDED" and "on PBS with {'k': 1}" in job.logs()
    sleeper = serverless.run_program(Program("pbs sleeper", "main.py", working_dir=str(wd)),
                                     arguments={"sleep": True})
    deadline = time.time() + 120
    while "on PBS" not in sleeper.logs() and time.time() < deadline:
        time.sleep(0.5)
    assert sleeper.stop() is True
    with pytest.raises(JobFailedError, match="STOPPED"):
        sleeper.result(timeout=120)


def test_mpi_task_on_pbs(serverless):
    pytest.importorskip("mpi4py")

    @distribute_task(target={"mpi": 2})
    def ranks():
        from mpi4py import MPI

        return MPI.COMM_WORLD.allgather(MPI.COMM_WORLD.Get_rank())

    with serverless.context("pbs"):
        assert get(ranks(), timeout=180) == [0, 1]


def test_requeue_is_refused_at_submission(serverless, tmp_path):
    """Issue 17 item 7: `requeue` does nothing on PBS yet, so it is refused at the call
    (no job is submitted), and in a PBS site's defaults at load (file and key named)."""
    from hpc_serverless.errors import ConfigError, TargetError

    provider = serverless.provider("pbs")
    before = provider.transport.counts.get("qsub", 0)
    with serverless.context("pbs"), pytest.raises(TargetError, match="'requeue' is not supported on PBS"):
        cube.options(requeue=1)(2)
    assert provider.transport.counts.get("qsub", 0) == before
    site = tmp_path / "pbs-requeue.yaml"
    site.write_text(open(PBS_SITE).read().replace("defaults:\n", "defaults:\n  requeue: 2\n"))
    with pytest.raises(ConfigError, match=r"pbs-requeue\.yaml:\d+, key 'defaults.requeue': target 'requeue'"):
        PBSProvider("pbs2", site=str(site))
