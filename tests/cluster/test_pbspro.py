"""The PBS Pro face of the test cluster: a fake PBS Pro server (tests/cluster/pbspro/) over
the real Slurm, chosen by site_configs/localhost-pbspro.yaml (its `commands_dir`). Tasks,
arrays, dependencies, programs, MPI through $PBS_NODEFILE, walltime kills and qdel, all
through PBSProvider with pbs_flavor: pbspro. Site: HPC_SERVERLESS_TEST_PBSPRO_SITE."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from hpc_serverless import PBSProvider, Program, QuantumServerless, distribute_task, get
from hpc_serverless.core.errors import DependencyError, JobFailedError, TaskTimeoutError

from ..traceback_checks import assert_user_frame
from .conftest import ROOT

pytestmark = pytest.mark.cluster

SITE = str(ROOT / os.environ.get("HPC_SERVERLESS_TEST_PBSPRO_SITE", "site_configs/localhost-pbspro.yaml"))
FAKE = ROOT / "tests/cluster/pbspro"


@pytest.fixture(scope="module")
def serverless():
    import shutil

    if not shutil.which("sbatch"):
        pytest.skip("no Slurm under the fake PBS Pro (tests/cluster/up.sh starts one)")
    provider = PBSProvider("pbspro", site=SITE)
    yield QuantumServerless().add_provider(provider)
    provider.backend.close()


class SolverError(Exception):
    pass


@distribute_task
def cube(x):
    return x ** 3


@distribute_task
def fails(msg):
    raise SolverError(msg)


@distribute_task
def pbs_env():
    import os

    return {k: os.environ.get(k) for k in ("PBS_JOBID", "PBS_ARRAY_INDEX", "PBS_NODEFILE", "NCPUS",
                                           "OMP_NUM_THREADS", "SLURM_JOB_ID")}


def qstat(*ids: str) -> dict:
    out = subprocess.run([str(FAKE / "qstat"), "-f", "-F", "json", "-x", *ids], capture_output=True,
                         text=True, timeout=60)
    return json.loads(out.stdout)["Jobs"]


def test_fifty_calls_are_one_array_with_pbs_environment(serverless):
    provider = serverless.provider("pbspro")
    before = provider.transport.counts["qsub"]
    with serverless.context("pbspro"):
        refs = [cube(i) for i in range(50)]
        assert get(refs, timeout=240) == [i ** 3 for i in range(50)]
        envs = get([pbs_env() for _ in range(2)], timeout=120)
    assert provider.transport.counts["qsub"] - before == 2  # one -J array per loop
    seq = refs[0].job_id.split("_")[0]
    assert all(r.job_id == f"{seq}_{i}" for i, r in enumerate(refs))
    parent = qstat(f"{seq}[]")[f"{seq}[].pbsserver"]
    assert parent["array_indices_submitted"] == "0-49" and parent["Exit_status"] == 0
    assert [e["PBS_ARRAY_INDEX"] for e in envs] == ["0", "1"]
    assert envs[0]["PBS_JOBID"].endswith("[0].pbsserver") and envs[0]["SLURM_JOB_ID"] is None
    assert envs[0]["NCPUS"] == envs[0]["OMP_NUM_THREADS"] == "1" and envs[0]["PBS_NODEFILE"]


def test_dependencies_and_a_failed_upstream_leaves_nothing_behind(serverless):
    with serverless.context("pbspro"):
        assert get(cube(cube(2)), timeout=180) == 512
        with pytest.raises(SolverError, match="no SCF convergence") as e:
            get(fails("no SCF convergence"), timeout=180)
        assert_user_frame(str(e.value.__cause__), fails, "raise SolverError(msg)")
        up = fails("upstream")
        down = cube(up)
        downer = cube(down)
        with pytest.raises(DependencyError, match="fails"):
            get(down, timeout=180)
        with pytest.raises(DependencyError):
            get(downer, timeout=180)
    ids = [r.job_id for r in (down, downer) if r.job_id]
    assert ids, "the dependents were never submitted: nothing was tested"
    deadline = time.time() + 60
    while time.time() < deadline:  # PBS Pro deletes dependents that can never run
        states = qstat(*(f"{i}" for i in ids))
        if all(j["job_state"] == "F" for j in states.values()):
            break
        time.sleep(2)
    assert all(j["job_state"] == "F" for j in states.values()), states


def test_program_logs_result_and_stop(serverless, tmp_path):
    wd = tmp_path / "src"
    wd.mkdir()
    (wd / "main.py").write_text(textwrap.dedent("""
        import os, time
        from hpc_serverless import get_arguments, save_result
        print("on PBS Pro with", get_arguments(), os.environ["PBS_JOBID"], flush=True)
        if get_arguments().get("sleep"):
            time.sleep(int(get_arguments()["sleep"]))
        save_result(sum(range(10)))
    """))
    serverless.set_provider("pbspro")
    job = serverless.run_program(Program("pbs prog", "main.py", working_dir=str(wd)), arguments={"k": 1})
    assert job.result(timeout=180) == 45
    assert job.status() == "SUCCEEDED" and "on PBS Pro with {'k': 1}" in job.logs()
    assert ".pbsserver" in job.logs()
    sleeper = serverless.run_program(Program("pbs sleeper", "main.py", working_dir=str(wd)),
                                     arguments={"sleep": 600})
    deadline = time.time() + 120
    while "on PBS Pro" not in sleeper.logs() and time.time() < deadline:
        time.sleep(0.5)
    assert sleeper.stop() is True
    with pytest.raises(JobFailedError, match="STOPPED"):
        sleeper.result(timeout=120)


def test_program_over_its_walltime_fails_with_the_walltime_reason(serverless, tmp_path):
    wd = tmp_path / "src"
    wd.mkdir()
    (wd / "main.py").write_text("import time\nprint('working', flush=True)\ntime.sleep(300)\n")
    serverless.set_provider("pbspro")
    job = serverless.run_program(Program("overtime", "main.py", working_dir=str(wd),
                                         target={"time": "00:00:05"}))
    with pytest.raises(JobFailedError, match="walltime"):
        job.result(timeout=180)
    assert job.status() == "FAILED"
    info = job.info()
    assert info["state"] == "TIMEOUT" and "-29" in info["reason"], info


def test_task_over_its_walltime_is_a_timeout(serverless):
    @distribute_task(target={"time": "00:00:04"})
    def slow():
        import time

        time.sleep(300)

    with serverless.context("pbspro"), pytest.raises(TaskTimeoutError, match="walltime"):
        get(slow(), timeout=180)


def test_mpi_task_through_the_node_file(serverless):
    pytest.importorskip("mpi4py")

    @distribute_task(target={"mpi": 2})
    def ranks():
        from mpi4py import MPI

        return MPI.COMM_WORLD.allgather(MPI.COMM_WORLD.Get_rank())

    with serverless.context("pbspro"):
        assert get(ranks(), timeout=180) == [0, 1]


def test_seed_tutorial_equals_a_direct_run(tmp_path):
    pytest.importorskip("qiskit")
    cfg = tmp_path / "serverless.yaml"
    cfg.write_text(f"providers:\n  - name: local\n  - name: pbspro\n    site: {SITE}\n")

    def run(provider: str) -> str:
        out = subprocess.run([sys.executable, str(ROOT / "examples/quickstart.py"), "--config", str(cfg),
                              "--provider", provider], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    assert values(run("pbspro")) == values(run("local"))


def values(text: str) -> list[str]:
    """The expectation values the tutorial prints (each also checked there against a direct run)."""
    return [line for line in text.splitlines() if line.startswith("expectation values:")]
