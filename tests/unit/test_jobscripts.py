"""Rendered batch scripts against golden files, and the templates' packaging.

Regenerate the golden files after a deliberate change with:
    HPC_SERVERLESS_REGEN_GOLDEN=1 python -m pytest tests/unit/test_jobscripts.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from hpc_serverless import Program, Target
from hpc_serverless.adapters.transport import MockTransport
from hpc_serverless.config.site import site_from_mapping
from hpc_serverless.core.launch import module_argv
from hpc_serverless.providers.slurm import SlurmScheduler

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
REGEN = os.environ.get("HPC_SERVERLESS_REGEN_GOLDEN") == "1"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if REGEN:
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; create it with HPC_SERVERLESS_REGEN_GOLDEN=1"
    assert text == path.read_text(), (
        f"{name} differs from its golden file. If the change is deliberate, regenerate with:\n"
        f"  HPC_SERVERLESS_REGEN_GOLDEN=1 python -m pytest {Path(__file__).relative_to(ROOT)}")


def _slurm_site():
    return site_from_mapping({
        "scheduler": "slurm", "storage": "/shared/alice/hpcs", "python": "/opt/venv/bin/python",
        "setup": ["module load python/3.11", "source /opt/venv/bin/activate"],
        "env": {"OMP_PROC_BIND": "close"},
        "defaults": {"partition": "standard", "time": 30, "account": "proj1"},
        "directives": ["--mail-type=FAIL"],
    }, name="golden-slurm")


def test_slurm_program_script_golden():
    site = _slurm_site()
    sched = SlurmScheduler(site, MockTransport(lambda argv, inp: (0, "", "")), "/shared/alice/hpcs/store")
    target = Target.of({"cpu": 4, "mem": "8G", "gpu": 1, "mpi": 4, "nodes": 2, "qos": "high",
                        "env": {"MY_VAR": "a value; with $(danger) 'quotes'"}}).merged_over(site.defaults)
    job_dir = "/shared/alice/hpcs/programs/20260101-000000-abcdef"
    text = sched.program_script(target, job_name="bench; rm -rf ~", job_id="20260101-000000-abcdef",
                                job_dir=job_dir, env={"HPC_SERVERLESS_JOB_DIR": job_dir, **target.env},
                                workdir=f"{job_dir}/workdir",
                                command=module_argv("/opt/venv/bin/python", "hpc_serverless.runtime.program_runner",
                                                    job_dir, "my script.py"))
    check_golden("slurm_program.sh", text)
    assert "export MY_VAR='a value; with $(danger) '\"'\"'quotes'\"'\"''" in text
    # bash parses the script without error
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_program_rejects_hostile_entrypoints():
    from hpc_serverless.core.errors import ProgramError

    with pytest.raises(ProgramError):
        Program("t", "/etc/passwd")
    with pytest.raises(ProgramError):
        Program("t", "x.py", env_vars={"BAD NAME": "1"})


def test_templates_ship_in_the_wheel(tmp_path):
    # build from a copy: the build writes into its source tree, and the test client may not
    # write into the checkout
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.egg-info", "__pycache__", ".*_cache", "results"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path), str(src)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.fail(f"cannot build a wheel: {out.stdout[-2000:]} {out.stderr[-2000:]}")
    wheel = next(tmp_path.glob("hpc_serverless-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "hpc_serverless/jobscripts/slurm.sh" in names
    assert "hpc_serverless/py.typed" in names


@pytest.mark.parametrize("flavor", ["pbspro", "torque"])
def test_pbs_program_script_golden(flavor):
    from hpc_serverless.providers.pbs import PBSScheduler

    site = site_from_mapping({
        "scheduler": "pbs", "pbs_flavor": flavor, "storage": "/lus/eagle/projects/qc/hpcs",
        "python": "/opt/venv/bin/python", "setup": ["module use /soft/modulefiles", "module load conda"],
        "defaults": {"queue": "debug", "time": 60, "account": "QuantumSim"},
        "directives": ["-l place=scatter"] if flavor == "pbspro" else ["-m abe"],
    }, name=f"golden-{flavor}")
    sched = PBSScheduler(site, MockTransport(lambda argv, inp: (0, "", "")), "/lus/eagle/projects/qc/hpcs/store")
    target = Target.of({"cpu": 8, "mem": "16G", "mpi": 2, "nodes": 2}).merged_over(site.defaults)
    job_dir = "/lus/eagle/projects/qc/hpcs/programs/20260101-000000-abcdef"
    text = sched.program_script(target, job_name="vqe $(id)", job_id="20260101-000000-abcdef",
                                job_dir=job_dir, env={"HPC_SERVERLESS_JOB_DIR": job_dir},
                                workdir=f"{job_dir}/workdir",
                                command=module_argv("/opt/venv/bin/python", "hpc_serverless.runtime.program_runner",
                                                    job_dir, "main.py"))
    check_golden(f"pbs_{flavor}_program.sh", text)
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    assert "#PBS -l select=2:ncpus=8" in text if flavor == "pbspro" else "#PBS -l nodes=2:ppn=8" in text
