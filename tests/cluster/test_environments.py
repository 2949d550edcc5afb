"""Environments on the real Slurm test cluster (issue 15), as the unprivileged client: a
Program whose dependency the site python lacks sees it installed, a second one reuses the
environment, a task with `target={"pip": [...]}` imports it, a requirement that cannot be
installed is refused before anything is queued (in pip's words), and `du`/`gc` list and
collect environments. No internet: the test makes its wheels and the site installs
offline from a `find_links` folder. Four jobs in all.

The site is the test cluster's file with its own storage (under the test's temporary
folder, so `gc --older-than 0` touches only this test's files) and an `environments:`
section."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from hpc_serverless import Program, QuantumServerless, SlurmProvider, distribute_task, get
from hpc_serverless.core.errors import EnvironmentBuildError
from tests.wheels import make_wheel

from .conftest import ROOT

pytestmark = pytest.mark.cluster

PROGRAM = """
import importlib.util, sys
print("has hpcs_tiny:", importlib.util.find_spec("hpcs_tiny") is not None)
import hpcs_tiny
from hpc_serverless import save_result
save_result({"value": hpcs_tiny.VALUE, "prefix": sys.prefix})
"""


def _site_with_environments(site_file: str, base: Path, name: str) -> Path:
    """The site file with its own storage under `base` and offline environments from a
    folder of wheels made here."""
    make_wheel(base / "wheels", "hpcs-tiny", "1.0", "VALUE = 42\n")
    make_wheel(base / "wheels", "hpcs-other", "2.0", "VALUE = 'other'\n")
    raw = yaml.safe_load(Path(site_file).read_text())
    raw.update(name=name, storage=str(base / "storage"),
               environments={"offline": True, "find_links": [str(base / "wheels")]})
    path = base / "site.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def env_site(site_path, tmp_path_factory) -> Path:
    return _site_with_environments(site_path, tmp_path_factory.mktemp("envsite"), "envsite")


@pytest.fixture(scope="module")
def provider(env_site):
    p = SlurmProvider("envsite", site=str(env_site))
    yield p
    p.backend.close()


def _program(tmp_path: Path, deps: list[str]) -> Program:
    wd = tmp_path / "src"
    wd.mkdir(exist_ok=True)
    (wd / "main.py").write_text(PROGRAM)
    return Program("deps", "main.py", working_dir=str(wd), dependencies=deps)


def test_program_sees_its_dependency_and_a_second_one_reuses_it(provider, tmp_path):
    s = QuantumServerless().add_provider(provider)
    program = _program(tmp_path, ["hpcs-tiny==1.0"])
    t0 = time.monotonic()
    first = s.set_provider("envsite").run_program(program)
    first_s = time.monotonic() - t0
    t0 = time.monotonic()
    second = s.run_program(program)
    second_s = time.monotonic() - t0
    r1, r2 = first.result(timeout=300), second.result(timeout=300)
    assert r1["value"] == r2["value"] == 42
    logs1, logs2 = first.logs(), second.logs()
    assert "has hpcs_tiny: True" in logs1 and "has hpcs_tiny: True" in logs2
    key = Path(r1["prefix"]).name
    assert r1["prefix"] == r2["prefix"] == str(provider.site.storage_path / "envs" / key)
    assert f"environment {key}: built in" in logs1, logs1
    assert f"environment {key}: reused (hpcs-tiny==1.0)" in logs2, logs2
    assert json.loads((provider.site.storage_path / "programs" / second.job_id / "record.json").read_text())[
        "environment"] == key
    print(f"run_program: {first_s:.2f} s (built), {second_s:.2f} s (reused)")


def test_task_with_pip_imports_it(provider):
    @distribute_task(target={"pip": ["hpcs-tiny==1.0"], "time": 5})
    def tiny():
        import sys

        import hpcs_tiny
        return hpcs_tiny.VALUE, sys.prefix

    s = QuantumServerless().add_provider(provider)
    with s.context("envsite"):
        value, prefix = get(tiny(), timeout=300)
    assert value == 42 and prefix.startswith(str(provider.site.storage_path / "envs"))
    assert Path(str(provider.session.dir), "environments").read_text().split() == [Path(prefix).name]


def test_bad_requirement_is_refused_before_anything_is_queued(provider, tmp_path):
    s = QuantumServerless().add_provider(provider).set_provider("envsite")
    submitted = provider.stats().get("sbatch", 0)
    programs = provider.site.storage_path / "programs"
    before = sorted(os.listdir(programs)) if programs.exists() else []
    with pytest.raises(EnvironmentBuildError, match=r"ERROR: No matching distribution found for hpcs-tiny==9\.9") as e:
        s.run_program(_program(tmp_path, ["hpcs-tiny==9.9"]))
    refused = s.get_job_by_id(e.value.job_id)  # a record of the refusal; logs() are pip's output
    assert refused.status() == "FAILED" and refused.info()["state"] == "REFUSED"
    assert "No matching distribution found for hpcs-tiny==9.9" in refused.logs()
    assert not (programs / refused.job_id / "job.sh").exists()

    @distribute_task(target={"pip": ["hpcs-nowhere"], "time": 5})
    def never():
        return 0

    with s.context("envsite"), pytest.raises(EnvironmentBuildError, match="No matching distribution found for hpcs-nowhere"):
        never()
    assert provider.stats().get("sbatch", 0) == submitted  # nothing was queued
    assert sorted(os.listdir(programs)) == sorted([*before, refused.job_id])


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hpc_serverless.cli", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_du_lists_environments_and_gc_takes_unused_ones(provider, env_site, tmp_path):
    # another client process runs a task in a second environment and ends
    code = textwrap.dedent(f"""
        from hpc_serverless import QuantumServerless, SlurmProvider, distribute_task, get
        @distribute_task(target={{"pip": ["hpcs-other==2.0"], "time": 5}})
        def other():
            import hpcs_other
            return hpcs_other.VALUE
        s = QuantumServerless().add_provider(SlurmProvider("envsite", site={str(env_site)!r}))
        with s.context("envsite"):
            print(get(other(), timeout=300))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip().endswith("other"), out.stderr[-3000:]
    # (keys computed, not ensure()d: that would count as a use)
    mine = provider.environments.key(("hpcs-tiny==1.0",))  # this process's live session uses it
    other = provider.environments.key(("hpcs-other==2.0",))

    config = tmp_path / "serverless.yaml"
    config.write_text(f"providers:\n  - name: envsite\n    site: {env_site}\ndefault: envsite\n")
    du = _cli(config, "du")
    assert du.returncode == 0, du.stderr
    assert f"environment {mine}" in du.stdout and f"environment {other}" in du.stdout, du.stdout
    assert "hpcs-other==2.0" in du.stdout and "environments" in du.stdout

    time.sleep(1.5)  # `--older-than 1s`: both were last used more than a second ago
    gc = _cli(config, "gc", "--older-than", "1s", "--json")
    assert gc.returncode == 0, gc.stderr
    report = json.loads(gc.stdout)
    assert f"environment {other}" in {r["id"] for r in report["removed"]}, report
    assert mine in {k["id"] for k in report["kept"]}, report
    envs = provider.site.storage_path / "envs"
    assert not (envs / other).exists() and (envs / mine / "bin" / "python").exists()
    assert not any(n.startswith(other) for n in os.listdir(envs))


def test_pbs_task_and_program_run_in_their_environment(tmp_path):
    """The same on the PBS (Torque wrapper) site: a task's job (through the submitit PBS
    plugin) and a program's script (jobscripts/pbs.sh) start the environment's python."""
    from hpc_serverless import PBSProvider

    from .test_pbs import PBS_SITE

    site = _site_with_environments(PBS_SITE, tmp_path, "envpbs")
    pbs = PBSProvider("envpbs", site=str(site))
    try:
        s = QuantumServerless().add_provider(pbs)

        @distribute_task(target={"pip": ["hpcs-tiny==1.0"], "time": 5})
        def tiny():
            import hpcs_tiny
            return hpcs_tiny.VALUE

        with s.context("envpbs"):
            ref = tiny()
            job = s.run_program(_program(tmp_path, ["hpcs-tiny==1.0"]))
            assert get(ref, timeout=300) == 42
        assert job.result(timeout=300)["value"] == 42
        assert ": reused (hpcs-tiny==1.0)" in job.logs() and "has hpcs_tiny: True" in job.logs()
    finally:
        pbs.backend.close()


@pytest.mark.ssh
def test_over_ssh_the_agent_builds_on_the_login_node(tmp_path):
    """A site with a `host`: the environment is built by the site's agent, in the cluster
    account (hpcsl), before the job is queued; the refusal of a bad requirement comes back
    to the laptop with pip's words. (The wheels are in a folder every account can read.)"""
    import shutil
    import stat
    import tempfile

    from ..testcluster import need_sshd
    from .test_agent import write_site

    need_sshd()
    wheels = Path(tempfile.mkdtemp(prefix="hpcs-wheels-", dir="/tmp"))
    try:
        wheels.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        wheel = make_wheel(wheels, "hpcs-tiny", "1.0", "VALUE = 42\n")
        wheel.chmod(0o644)
        site = write_site(tmp_path / "remote.yaml",
                          environments={"offline": True, "find_links": [str(wheels)]})
        s = QuantumServerless({"providers": [{"name": "remote", "site": str(site)}]})

        @distribute_task(target={"pip": ["hpcs-tiny==1.0"], "time": 5})
        def tiny():
            import getpass

            import hpcs_tiny
            return hpcs_tiny.VALUE, getpass.getuser()

        @distribute_task(target={"pip": ["hpcs-tiny==7"], "time": 5})
        def bad():
            return 0

        with s.context("remote"):
            job = s.run_program(_program(tmp_path, ["hpcs-tiny==1.0"]))
            assert get(tiny(), timeout=300) == (42, "hpcsl")
            with pytest.raises(EnvironmentBuildError, match=r"No matching distribution found for hpcs-tiny==7"):
                bad()
        assert job.result(timeout=300)["value"] == 42
        assert "environment " in job.logs() and "has hpcs_tiny: True" in job.logs()
        s.provider("remote").close()
    finally:
        shutil.rmtree(wheels, ignore_errors=True)
