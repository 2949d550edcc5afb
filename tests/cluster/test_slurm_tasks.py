"""Tasks on the real Slurm test cluster. Each test needs few jobs (the cluster runs about
four a second); most work goes through job arrays."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc_serverless import distribute_task, get, put, wait
from hpc_serverless.core.errors import (
    DependencyError,
    ResourceError,
    TaskCancelledError,
    TaskTimeoutError,
    WorkerDiedError,
)

from ..testcluster import admin
from ..traceback_checks import assert_user_frame
from .conftest import ROOT, is_test_cluster

pytestmark = pytest.mark.cluster


class PhysicsError(Exception):
    """A user exception type defined in the test module (pickled by value)."""


@distribute_task(target={"cpu": 1})
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
def where():
    return os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_CPUS_PER_TASK")


def _counts(provider):
    return dict(provider.transport.counts)


def _delta(before, after):
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}


def test_array_of_100_values_one_sbatch(on_slurm):
    before = _counts(on_slurm)
    refs = [square(i) for i in range(100)]
    assert get(refs, timeout=300) == [i * i for i in range(100)]
    used = _delta(before, _counts(on_slurm))
    assert used.get("sbatch") == 1, used  # one array for the whole loop
    job_ids = {r.job_id for r in refs}
    assert len(job_ids) == 100 and len({j.split("_")[0] for j in job_ids}) == 1
    # status: one command per poll for all 100 jobs; polls bounded by elapsed time / interval
    assert used.get("sacct", 0) + used.get("squeue", 0) <= 60, used


def test_object_refs_and_resources(on_slurm):
    data = put({"weights": [1, 2, 3]})

    @distribute_task(target={"cpu": 2, "mem": "600M", "time": 5})
    def use(d):
        return sum(d["weights"]), os.environ.get("SLURM_CPUS_PER_TASK"), os.environ.get("SLURM_MEM_PER_NODE")

    total, cpus, mem = get(use(data), timeout=120)
    assert (total, cpus, mem) == (6, "2", "600")


def test_dependency_chain_runs_in_order(on_slurm):
    a = slow(1, 10)
    b = add(a, 5)
    c = add(b, 1)
    assert get(c, timeout=180) == 16
    info = c.info()
    assert info["status"] == "SUCCEEDED" and info["job_id"]


def test_failed_upstream_fails_dependents_naming_it(on_slurm):
    up = boom("no convergence")
    down = add(up, 1)
    with pytest.raises(DependencyError, match="boom") as e:
        get(down, timeout=180)
    assert isinstance(e.value.__cause__, PhysicsError)
    assert down.status() in ("FAILED", "STOPPED")


def test_exception_keeps_its_type_and_remote_traceback(on_slurm):
    with pytest.raises(PhysicsError, match="diverged") as e:
        get(boom("diverged"), timeout=120)
    assert_user_frame(str(e.value.__cause__), boom, "raise PhysicsError(msg)")


def test_cancel_running_task(on_slurm):
    ref = slow(300, 1)
    deadline = time.time() + 60
    while ref.status() != "RUNNING" and time.time() < deadline:
        time.sleep(0.5)
    assert ref.cancel() is True
    with pytest.raises(TaskCancelledError):
        get(ref, timeout=60)
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", ref.job_id],
                         capture_output=True, text=True)
    deadline = time.time() + 30
    while "CANCELLED" not in out.stdout and time.time() < deadline:
        time.sleep(1)
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", ref.job_id],
                             capture_output=True, text=True)
    assert "CANCELLED" in out.stdout


def test_request_too_big_for_any_node_fails_at_call(on_slurm):
    with pytest.raises(ResourceError, match="partition 'debug'.*cores per node but its nodes have 2"):
        square.options(cpu=64)(1)
    with pytest.raises(ResourceError, match="no partition 'nosuch'"):
        square.options(partition="nosuch")(1)
    with pytest.raises(ResourceError, match="mem="):
        square.options(mem="500G")(1)


def test_wait_and_status(on_slurm):
    fast = square(2)
    slow_ref = slow(60, 0)
    done, pending = wait([fast, slow_ref], num_returns=1, timeout=120)
    assert done == [fast] and pending == [slow_ref]
    assert slow_ref.status() in ("PENDING", "RUNNING")
    slow_ref.cancel()


def test_timeout_ends_as_timeout_with_reason(on_slurm):
    ref = slow.options(time=1)(600, "never")
    with pytest.raises(TaskTimeoutError, match="TIMEOUT"):
        get(ref, timeout=240)
    assert ref.info()["state"] == "TIMEOUT"


@pytest.mark.skipif(not is_test_cluster(), reason="restarts the local test cluster's daemons")
def test_slurmctld_restart_loses_nothing(on_slurm):
    refs = [slow(3, i) for i in range(6)]
    time.sleep(1.5)
    admin("stop", "slurmctld")
    time.sleep(2)
    admin("up")
    assert get(refs, timeout=240) == list(range(6))


@pytest.mark.skipif(not is_test_cluster(), reason="stops the local test cluster's slurmdbd")
def test_without_accounting_squeue_takes_over(on_slurm, caplog):
    @distribute_task
    def crash():
        os._exit(3)  # the job fails without a result: only the scheduler can say what happened

    admin("stop", "slurmdbd")
    try:
        time.sleep(1)
        before = _counts(on_slurm)
        ok = square(7)
        bad = boom("still typed")
        dead = crash()
        assert get(ok, timeout=120) == 49
        with pytest.raises(PhysicsError):
            get(bad, timeout=120)
        with pytest.raises(WorkerDiedError, match="FAILED"):
            get(dead, timeout=120)
        used = _delta(before, _counts(on_slurm))
        assert used.get("squeue", 0) >= 1, used
        assert "reading job states from squeue" in caplog.text
    finally:
        admin("up")


def test_seed_tutorial_on_slurm(site_path, tmp_path):
    pytest.importorskip("qiskit")
    config = tmp_path / "serverless.yaml"
    config.write_text(f"providers:\n  - name: local\n  - name: cluster\n    site: {site_path}\n")
    out = subprocess.run([sys.executable, str(ROOT / "examples/quickstart.py"), "--config", str(config),
                          "--provider", "cluster"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("serverless") == 3


def test_job_logs_land_in_storage(on_slurm):
    ref = where()
    job_id, cpus = get(ref, timeout=120)
    assert job_id == ref.job_id.split("_")[0] or job_id
    logs = list(Path(on_slurm.session.jobs_dir).glob(f"{ref.job_id}_0_log.out"))
    assert logs and "[hpc-serverless] task where#" in logs[0].read_text()


@distribute_task(target={"mpi": 2})
def mpi_ranks():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return comm.Get_size(), comm.allgather((comm.Get_rank(), os.environ.get("SLURMD_NODENAME")))


@pytest.mark.parametrize("nodes", [1, 2])
def test_mpi_task_on_nodes(on_slurm, nodes):
    pytest.importorskip("mpi4py")
    size, ranks = get(mpi_ranks.options(nodes=nodes)(), timeout=180)
    assert size == 2 and [r for r, _ in ranks] == [0, 1]
    assert len({node for _, node in ranks}) == nodes


def test_requeue_near_time_limit_resumes_from_checkpoint(on_slurm):
    from hpc_serverless import load_checkpoint, save_checkpoint

    @distribute_task(target={"time": 1, "requeue": 1})
    def long_sweep(n):
        state = load_checkpoint(default={"done": [], "runs": 0})
        state["runs"] += 1
        save_checkpoint(state)
        while len(state["done"]) < n:
            if state["runs"] == 1 and len(state["done"]) == 2:
                time.sleep(600)  # the first run is cut short by its time limit
            state["done"].append(len(state["done"]) ** 2)
            save_checkpoint(state)
        return state

    ref = long_sweep(4)
    # Slurm holds a requeued job for two minutes (BeginTime); let it start at once here
    deadline = time.time() + 200
    while time.time() < deadline and not ref.done():
        info = ref.info()
        if info.get("reason") == "BeginTime":
            subprocess.run(["scontrol", "update", f"JobId={ref.job_id}", "BeginTime=now"], check=False)
        time.sleep(2)
    result = get(ref, timeout=60)
    assert result == {"done": [0, 1, 4, 9], "runs": 2}


def test_explicit_cpu_1_beats_site_default_cpu_2(site_path, tmp_path):
    """Issue 17 item 1: a site's `defaults: {cpu: 2}` fills a gap, it does not override a
    task that says cpu=1 (two one-task jobs)."""
    import yaml

    from hpc_serverless import QuantumServerless, SlurmProvider

    data = yaml.safe_load(Path(site_path).read_text())
    data["name"] = "localhost-slurm-cpu2"
    data.setdefault("defaults", {})["cpu"] = 2
    site = tmp_path / "cpu2.yaml"
    site.write_text(yaml.safe_dump(data))
    provider = SlurmProvider("cpu2", site=str(site))
    try:
        with QuantumServerless().add_provider(provider).context("cpu2"):
            one, default = where.options(cpu=1)(), where()
            assert [cpus for _, cpus in get([one, default], timeout=180)] == ["1", "2"]
    finally:
        provider.backend.close()


def _shadow(folder: Path) -> None:
    """A folder called hpc_serverless that is not the package (a site's storage, a checkout)."""
    (folder / "hpc_serverless" / "store").mkdir(parents=True)
    (folder / "hpc_serverless" / "__init__.py").write_text("raise ImportError('the shadow was imported')\n")


def test_a_folder_in_the_submission_dir_cannot_shadow_the_package(on_slurm, tmp_path, monkeypatch):
    """Issue 17 item 5: the job starts in the submission directory, which holds a folder
    called hpc_serverless; the task still runs (one job), and relative paths still mean
    the submission directory."""
    _shadow(tmp_path)
    (tmp_path / "input.txt").write_text("relative ok")
    monkeypatch.chdir(tmp_path)

    @distribute_task
    def read_relative():
        import hpc_serverless

        return Path("input.txt").read_text(), os.getcwd(), hpc_serverless.__file__

    text, cwd, package = get(read_relative(), timeout=180)
    assert (text, cwd) == ("relative ok", str(tmp_path))
    assert not package.startswith(str(tmp_path))


@distribute_task(target={"requeue": 1, "directives": ["--no-requeue"]})
def marks_then_sleeps(marker, seconds):
    Path(marker).write_text("started")
    time.sleep(seconds)
    return "finished"


def _signal_when_started(ref, marker: Path) -> None:
    """Send the job the scheduler's time-limit warning (SIGUSR2 to the batch step) now."""
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.3)
    assert marker.exists(), "the task did not start"
    subprocess.run(["scancel", "--signal=USR2", "--batch", ref.job_id], check=True)


def test_failed_requeue_is_reported_and_the_task_runs_on(on_slurm, tmp_path):
    """Issue 17 item 7: `scontrol requeue` fails (the job was submitted --no-requeue); the
    task is not cut short as COMPLETED-without-result: it runs on, returns its value, and
    its log says why it was not requeued (one short job)."""
    marker = tmp_path / "started"
    ref = marks_then_sleeps(str(marker), 6)
    _signal_when_started(ref, marker)
    assert get(ref, timeout=120) == "finished"
    log = "".join(p.read_text() for p in Path(on_slurm.session.jobs_dir).glob(f"{ref.job_id}_0_log.*"))
    assert "could not requeue the job: `scontrol requeue" in log and "disabled" in log, log


@pytest.mark.slow
def test_failed_requeue_then_timeout_says_why(on_slurm):
    """Issue 17 item 7 (slow: ~1.5 min): the requeue fails and the task runs into its
    time limit; the TaskTimeoutError says TIMEOUT and why there was no requeue."""
    ref = slow.options(time=1, requeue=1, directives=["--no-requeue"])(600, "never")
    with pytest.raises(TaskTimeoutError, match=r"TIMEOUT.*could not be requeued.*scontrol requeue"):
        get(ref, timeout=300)
