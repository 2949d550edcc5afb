"""Programs on the real test cluster: submit, forget, find again, stop; and the CLI. Every
test runs on the Slurm site and on the PBS face of the same cluster (Slurm's PBS wrappers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from hpc_serverless import Program, QuantumServerless
from hpc_serverless.core.errors import JobFailedError

from .conftest import ROOT

pytestmark = pytest.mark.cluster


@pytest.fixture(params=["slurm", "pbs"])
def scheduler(request):
    import shutil

    if request.param == "pbs" and not shutil.which("qsub"):
        pytest.skip("no qsub here (tests/cluster/up.sh installs Slurm's PBS wrappers)")
    return request.param


@pytest.fixture
def config(site_path, tmp_path, scheduler):
    site = site_path if scheduler == "slurm" else str(ROOT / "site_configs/localhost-pbs.yaml")
    cfg = tmp_path / "serverless.yaml"
    cfg.write_text(f"providers:\n  - name: local\n  - name: cluster\n    site: {site}\ndefault: cluster\n")
    return cfg


@pytest.fixture
def serverless(config):
    return QuantumServerless.load_configuration(config)


def _src(tmp_path, body, name="main.py"):
    wd = tmp_path / "source files"
    wd.mkdir(exist_ok=True)
    (wd / name).write_text(textwrap.dedent(body))
    return wd


def test_program_runs_and_is_found_from_another_process(serverless, config, tmp_path):
    wd = _src(tmp_path, """
        import os
        from hpc_serverless import QuantumServerless, distribute_task, get, get_arguments, save_result

        @distribute_task
        def square(x):
            return x * x

        args = get_arguments()
        print("allocation cores:", os.environ.get("SLURM_CPUS_ON_NODE") or os.environ.get("PBS_NCPUS"), flush=True)
        save_result({"squares": get([square(i) for i in range(args["n"])])})
    """)
    program = Program(title="squares $(whoami); 'quoted' \"title\"", entrypoint="main.py",
                      working_dir=str(wd), target={"cpu": 2})
    job = serverless.run_program(program, arguments={"n": 5})
    assert job.status() in ("PENDING", "RUNNING", "SUCCEEDED")
    code = textwrap.dedent(f"""
        from hpc_serverless import QuantumServerless
        s = QuantumServerless.load_configuration({str(config)!r})
        job = s.get_job_by_id({job.job_id!r})
        print(repr(job.result(timeout=180)))
        print(job.status())
        print(job.logs())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "{'squares': [0, 1, 4, 9, 16]}" and lines[1] == "SUCCEEDED"
    assert "allocation cores: 2" in out.stdout
    info = job.info()
    assert info["title"] == program.title and info["scheduler_job_id"]
    assert job.job_id in [j.job_id for j in serverless.jobs()]


def test_failing_program_says_why(serverless, tmp_path):
    wd = _src(tmp_path, "def solve():\n    raise ArithmeticError('matrix is singular')\nsolve()\n")
    job = serverless.run_program(Program("fails", "main.py", working_dir=str(wd)))
    with pytest.raises(JobFailedError, match=r"(?s)FAILED.*matrix is singular"):
        job.result(timeout=180)
    assert job.status() == "FAILED"
    assert "Traceback" in job.logs() and "ArithmeticError" in job.logs()


def test_stop_running_program(serverless, tmp_path):
    wd = _src(tmp_path, "import time\nprint('started', flush=True)\ntime.sleep(600)\n")
    job = serverless.run_program(Program("sleeper", "main.py", working_dir=str(wd)))
    deadline = time.time() + 120
    while "started" not in job.logs() and time.time() < deadline:
        time.sleep(0.5)
    assert job.status() == "RUNNING"
    assert job.stop() is True
    deadline = time.time() + 60
    while job.status() not in ("STOPPED", "FAILED") and time.time() < deadline:
        time.sleep(1)
    assert job.status() == "STOPPED"
    with pytest.raises(JobFailedError, match="STOPPED"):
        job.result(timeout=5)


def test_missing_entrypoint_is_refused_before_submission(serverless, tmp_path):
    from hpc_serverless.core.errors import ProgramError

    provider = serverless.provider("cluster")
    before = dict(provider.transport.counts)
    with pytest.raises(ProgramError, match="not found"):
        serverless.run_program(Program("t", "nope.py", working_dir=str(tmp_path)))
    assert provider.transport.counts.get("sbatch", 0) == before.get("sbatch", 0)


def test_benchmark_example_as_a_program(serverless):
    pytest.importorskip("qiskit_aer")
    program = Program(title="benchmark_program", entrypoint="benchmark.py",
                      working_dir=str(ROOT / "examples"), description="Benchmark program",
                      target={"cpu": 2})
    job = serverless.run_program(program, arguments={"n_graphs": 2, "n_backends": 2})
    result = job.result(timeout=300)
    assert result["execution_time"] > 0
    assert "Execution time:" in job.logs()


def test_cli_end_to_end(config, tmp_path, scheduler):
    wd = _src(tmp_path, """
        import time
        from hpc_serverless import get_arguments, save_result
        for i in range(3):
            print("step", i, flush=True)
            time.sleep(0.5)
        save_result({"echo": get_arguments()})
    """, name="prog.py")
    cli = [sys.executable, "-m", "hpc_serverless.cli", "--config", str(config)]
    env = {**os.environ, "HPC_SERVERLESS_NO_PROGRESS": "1"}

    def run(*args, check=True):
        out = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=300, env=env)
        if check:
            assert out.returncode == 0, out.stderr
        return out

    dry = run("run", str(wd / "prog.py"), "--dry-run", "--target", '{"cpu": 2}')
    assert ("#SBATCH --cpus-per-task=2" if scheduler == "slurm" else "#PBS -l nodes=1:ppn=2") in dry.stdout
    job_id = run("run", str(wd / "prog.py"), "--arg", "n=3", "--arg", "name=H2 molecule").stdout.strip()
    follow = run("logs", "--follow", "--interval", "0.5", job_id)
    assert "step 2" in follow.stdout
    assert run("status", job_id).stdout.strip() == "SUCCEEDED"
    assert json.loads(run("result", job_id).stdout) == {"echo": {"n": 3, "name": "H2 molecule"}}
    assert job_id in run("jobs").stdout
    assert run("stop", job_id).stdout.startswith("not running")
    bad = run("status", "no-such-job", check=False)
    assert bad.returncode == 1 and bad.stderr.startswith("error: no job 'no-such-job'")
    assert len(bad.stderr.strip().splitlines()) == 1
    for sub in ("run", "status", "logs", "result", "stop", "jobs"):
        assert run(sub, "--help").stdout.startswith("usage:")


def test_sites_check(site_path, scheduler):
    site = site_path if scheduler == "slurm" else str(ROOT / "site_configs/localhost-pbs.yaml")
    out = subprocess.run([sys.executable, "-m", "hpc_serverless.cli", "sites", "check", site],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "valid" in out.stdout and ("sinfo" if scheduler == "slurm" else "qstat") in out.stdout
    if scheduler == "slurm":  # the test cluster's QPUs, as its site file says they are counted
        assert "qpus (aer, fake), counted by gres: `sinfo -h -o %G` knows them all" in out.stdout


def test_job_found_from_a_new_process_whichever_provider_ran_it(site_path, tmp_path):
    """Issue 17 item 2: the configuration's default is `local`; the job ran on `cluster`
    through set_provider. A new process (API and CLI, no --provider) finds it there, and an
    unknown id says where it was looked for."""
    cfg = tmp_path / "serverless.yaml"
    cfg.write_text(f"providers:\n  - name: local\n  - name: cluster\n    site: {site_path}\n")
    wd = _src(tmp_path, "from hpc_serverless import save_result\nsave_result(42)\n")
    s = QuantumServerless.load_configuration(cfg)
    job = s.set_provider("cluster").run_program(Program("found again", "main.py", working_dir=str(wd)))
    assert job.job_id.startswith("cluster-")
    code = textwrap.dedent(f"""
        from hpc_serverless import QuantumServerless
        job = QuantumServerless.load_configuration({str(cfg)!r}).get_job_by_id({job.job_id!r})
        print(job.provider, job.result(timeout=180))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cluster", "42"]
    cli = [sys.executable, "-m", "hpc_serverless.cli", "--config", str(cfg)]
    status = subprocess.run([*cli, "status", job.job_id], capture_output=True, text=True, timeout=120)
    assert (status.returncode, status.stdout.strip()) == (0, "SUCCEEDED"), status.stderr
    missing = subprocess.run([*cli, "status", "20000101-000000-abcdef"], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 1
    line = missing.stderr.strip()
    assert line.startswith("error: no job '20000101-000000-abcdef' on any configured provider"), line
    assert "local (" in line and "cluster (" in line and str(s.provider("cluster").site.storage_path) in line


def test_a_folder_in_the_working_dir_cannot_shadow_the_package(serverless, tmp_path):
    """Issue 17 item 5: a program's working_dir holds a folder called hpc_serverless; the
    runner and the program import the real package, and the program's relative paths and
    sibling modules still mean its working_dir."""
    wd = _src(tmp_path, """
        import os
        import hpc_serverless
        from hpc_serverless import save_result
        from helper import VALUE
        save_result({"value": VALUE, "data": open("data.txt").read(), "package": hpc_serverless.__file__})
    """)
    (wd / "helper.py").write_text("VALUE = 7\n")
    (wd / "data.txt").write_text("relative ok")
    (wd / "hpc_serverless").mkdir()
    (wd / "hpc_serverless" / "__init__.py").write_text("raise ImportError('the shadow was imported')\n")
    job = serverless.run_program(Program("shadowed", "main.py", working_dir=str(wd)))
    result = job.result(timeout=180)
    assert result["value"] == 7 and result["data"] == "relative ok"
    assert "/workdir/" not in result["package"]


@pytest.mark.slow
def test_program_killed_at_its_time_limit_reads_timeout(serverless, tmp_path, scheduler):
    """Issue 17 item 8 (slow: a one-minute time limit runs out): the program's job reads
    FAILED with the scheduler's TIMEOUT, not "killed by signal 15"."""
    wd = _src(tmp_path, "import time\nprint('started', flush=True)\ntime.sleep(600)\n")
    job = serverless.run_program(Program("overrun", "main.py", working_dir=str(wd), target={"time": 1}))
    assert job.wait(timeout=240) == "FAILED"
    info = job.info()
    if scheduler == "slurm":
        assert info["state"] == "TIMEOUT" and "signal 15" not in info["reason"], info
    else:  # Slurm's PBS wrappers say nothing of why a job ended: the runner's words, with the likely cause
        assert "time limit" in info["reason"], info
    with pytest.raises(JobFailedError, match="TIMEOUT" if scheduler == "slurm" else "FAILED"):
        job.result(timeout=5)


def test_gc_keeps_programs_and_rm_removes_a_finished_one(serverless, config, tmp_path):
    """Programs stay through gc until `hpc-serverless rm JOB_ID`, which refuses a running one."""
    wd = _src(tmp_path, "import time\nfrom hpc_serverless import save_result\ntime.sleep(20)\nsave_result(1)\n")
    job = serverless.run_program(Program("keep me", "main.py", working_dir=str(wd)))
    job_dir = os.path.join(str(serverless.default_provider.site.storage_path), "programs", job.job_id)
    cli = [sys.executable, "-m", "hpc_serverless.cli", "--config", str(config)]
    gc = subprocess.run([*cli, "gc", "--older-than", "0"], capture_output=True, text=True, timeout=300)
    assert gc.returncode == 0, gc.stderr
    assert os.path.isdir(job_dir)
    early = subprocess.run([*cli, "rm", job.job_id], capture_output=True, text=True, timeout=300)
    assert early.returncode == 1 and "stop it first" in early.stderr and os.path.isdir(job_dir)
    assert job.result(timeout=180) == 1
    rm = subprocess.run([*cli, "rm", job.job_id], capture_output=True, text=True, timeout=300)
    assert rm.returncode == 0, rm.stderr
    assert not os.path.exists(job_dir) and f"removed {job.job_id}" in rm.stdout
