"""Environments for `dependencies` and `pip` (issue 15): requirement normalization, the
site's `environments:` settings, and a real build and reuse on this machine (a venv over
this interpreter, pip from a local find_links directory with a wheel made in the test: no
internet). The cluster side is tests/cluster/test_environments.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from hpc_serverless import LocalProvider, Program, QuantumServerless, Target, distribute_task, get
from hpc_serverless.config.site import EnvironmentSettings, load_site
from hpc_serverless.core.errors import (
    ConfigError,
    EnvironmentBuildError,
    HPCServerlessError,
    ProgramError,
    ResourceError,
    TargetError,
)
from hpc_serverless.core.requirements import normalize_requirements
from hpc_serverless.engines.environments import Environments, collect_environments, list_environments
from tests.wheels import make_wheel


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wheels")
    make_wheel(folder, "hpcs-tiny", "1.0", "VALUE = 42\n")
    make_wheel(folder, "hpcs-other", "2.0", "VALUE = 'other'\n")
    return folder


def _envs(root, wheels) -> Environments:
    return Environments(str(root), sys.executable, EnvironmentSettings(offline=True, find_links=(str(wheels),)))


# -- normalization ----------------------------------------------------------------------------------
def test_one_set_written_two_ways_is_one_set():
    a = normalize_requirements(["Humanize == 4.9.0", "numpy>=1.2 , <3", "qiskit[Visualization,aer]"])
    b = normalize_requirements(["qiskit[aer, visualization]", "numpy<3,>=1.2", "humanize==4.9.0", "humanize==4.9.0"])
    assert a == b == ("humanize==4.9.0", "numpy<3,>=1.2", "qiskit[aer,visualization]")
    assert normalize_requirements(["Foo_Bar.baz; python_version  < '3.12'"]) == ("foo-bar-baz; python_version < '3.12'",)
    assert normalize_requirements(["pkg @ https://example.org/p.whl"]) == ("pkg @ https://example.org/p.whl",)
    assert normalize_requirements(None) == normalize_requirements([]) == ()


@pytest.mark.parametrize("bad,match", [
    ("humanize", "a list of strings"),
    (["-e ."], "pip option"),
    (["--index-url=http://x"], "pip option"),
    (["ok\nrm -rf /"], "one non-empty line"),
    (["humanize=4.9"], "version clause '=4.9'"),
    ([""], "one non-empty line"),
    ([3], "must be a string"),
])
def test_bad_requirements_are_refused_with_the_reason(bad, match):
    with pytest.raises(ValueError, match=match):
        normalize_requirements(bad)
    with pytest.raises(TargetError, match="target 'pip': .*" + match):
        Target.of({"pip": bad})
    with pytest.raises(ProgramError, match="dependencies: .*" + match):
        Program("t", "x.py", dependencies=bad)


def test_target_pip_is_a_key_kept_normalized():
    t = Target.of({"pip": ["Humanize==4.9.0"], "cpu": 2})
    assert t.pip == ("humanize==4.9.0",) and "pip" in Target.KEYS
    assert Target.of(t.as_dict()) == t and hash(Target.of(t.as_dict())) == hash(t)
    assert hash(t) != hash(Target.of({"cpu": 2}))
    assert t.merged_over(Target.of({"mem": 1})).pip == t.pip
    assert Program("t", "x.py", dependencies=["b", "A"], target={"pip": ["c"]}).requirements == ("a", "b", "c")


# -- site settings ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text,match", [
    ("environments:\n  instaler: uv\n", r"site.yaml:4, key 'environments.instaler': unknown key.*installer, index_url"),
    ("environments:\n  installer: conda\n", r"key 'environments.installer': must be one of 'pip', 'uv' or 'auto'"),
    ("environments:\n  offline: maybe\n", r"key 'environments.offline'"),
    ("environments:\n  find_links: ['']\n", r"key 'environments.find_links'.*non-empty"),
])
def test_bad_environment_settings_name_file_and_key(tmp_path, text, match):
    p = tmp_path / "site.yaml"
    p.write_text("scheduler: slurm\nstorage: /x\n" + text)
    with pytest.raises(ConfigError, match=match):
        load_site(p)


def test_environment_settings_load_with_paths_beside_the_site_file(tmp_path):
    p = tmp_path / "site.yaml"
    p.write_text("scheduler: slurm\nstorage: /x\nenvironments:\n  installer: auto\n  offline: true\n"
                 "  find_links: wheels\n  extra_index_url: https://example.org/simple\n")
    env = load_site(p).environments
    assert env.installer == "auto" and env.offline
    assert env.find_links == (str(tmp_path / "wheels"),)
    assert env.extra_index_url == ("https://example.org/simple",)
    assert load_site(p.parent / "site.yaml").environments == env
    default = tmp_path / "plain.yaml"
    default.write_text("scheduler: slurm\nstorage: /x\n")
    assert load_site(default).environments.installer == "pip"


# -- build and reuse ------------------------------------------------------------------------------------
def test_built_once_then_reused_and_sees_the_site_pythons_packages(tmp_path, wheels):
    tmp_path = tmp_path / "storage with space; quo'te $HOME"  # a hostile storage path
    first = _envs(tmp_path / "envs", wheels).ensure(["hpcs-tiny==1.0"])
    assert first.built_s is not None and "built in" in first.note()
    # another client (a new Environments, as in another process) reuses it
    t0 = time.monotonic()
    again = _envs(tmp_path / "envs", wheels).ensure(["HPCS_tiny == 1.0"])
    reuse_s = time.monotonic() - t0
    assert again.key == first.key and again.built_s is None and again.note().endswith("reused (hpcs-tiny==1.0)")
    print(f"build {first.built_s:.2f} s, reuse {reuse_s:.3f} s")
    out = subprocess.run([again.python, "-c", "import hpcs_tiny, hpc_serverless, cloudpickle, sys; "
                          "print(hpcs_tiny.VALUE, hpc_serverless.__file__, sys.prefix, sep=chr(10))"],
                         capture_output=True, text=True, check=True)
    value, package, prefix = out.stdout.splitlines()
    assert value == "42" and prefix == again.path
    # hpc_serverless (an editable install in the test venv, through its own .pth) is the site's
    assert package.startswith(os.path.dirname(os.path.dirname(os.path.abspath(__import__("hpc_serverless").__file__))))
    assert os.path.islink(again.path) and "Successfully installed hpcs-tiny-1.0" in open(
        os.path.join(again.path, "install.log")).read()


def test_reused_through_a_storage_path_that_is_a_symlink(tmp_path, wheels):
    """$SCRATCH is often a link to the real filesystem: an environment built under it is
    reused under it (its check must not resolve the storage's own link)."""
    (tmp_path / "real").mkdir(mode=0o700)
    os.symlink(tmp_path / "real", tmp_path / "scratch")
    first = _envs(tmp_path / "scratch" / "envs", wheels).ensure(["hpcs-tiny==1.0"])
    again = _envs(tmp_path / "scratch" / "envs", wheels).ensure(["hpcs-tiny==1.0"])
    assert again.key == first.key and again.built_s is None


def test_environments_are_private_under_a_group_umask_and_a_changed_one_is_refused(tmp_path, wheels):
    """Every job of the user runs an environment's python: under a setgid group directory
    and umask 002 nothing in it is writable by others, and an environment someone opened to
    the group is refused before it is used."""
    from hpc_serverless.core.errors import UnsafeStoreError

    storage = tmp_path / "group"
    storage.mkdir()
    storage.chmod(0o2700)
    old = os.umask(0o002)
    try:
        env = _envs(storage / "envs", wheels).ensure(["hpcs-tiny==1.0"])
    finally:
        os.umask(old)
    loose = [p for p in Path(os.path.realpath(env.path)).rglob("*")
             if not p.is_symlink() and p.stat().st_mode & 0o022]
    assert not loose, loose[:5]
    assert (storage / "envs").stat().st_mode & 0o7777 == 0o700
    os.chmod(os.path.realpath(env.path), 0o770)
    with pytest.raises(UnsafeStoreError, match="writable by"):
        _envs(storage / "envs", wheels).ensure(["hpcs-tiny==1.0"])


def test_built_after_the_sites_setup_lines_and_with_its_env(tmp_path, wheels):
    """The site python may need the site's setup (`module load`): the build runs after it,
    as a job does. Here only the setup line and the site's env say where the wheel is."""
    envs = Environments(str(tmp_path / "envs"), sys.executable, EnvironmentSettings(),
                        setup=[f"export PIP_FIND_LINKS={str(wheels)!r}"], env={"PIP_NO_INDEX": "1"})
    env = envs.ensure(["hpcs-tiny==1.0"])
    log = open(os.path.join(env.path, "install.log")).read()
    assert "Successfully installed hpcs-tiny-1.0" in log and str(wheels) in log


def _uv() -> str | None:
    """uv for the installer test: on PATH, or named by HPC_SERVERLESS_TEST_UV (the locked
    test environment does not ship it)."""
    import shutil

    return os.environ.get("HPC_SERVERLESS_TEST_UV") or shutil.which("uv")


@pytest.mark.skipif(_uv() is None, reason="no uv on PATH and HPC_SERVERLESS_TEST_UV is not set")
def test_uv_installer_builds_and_quotes_its_own_error(tmp_path, wheels, monkeypatch):
    uv = _uv()
    assert uv is not None
    monkeypatch.setenv("PATH", os.path.dirname(uv) + os.pathsep + os.environ["PATH"])
    settings = EnvironmentSettings(installer="uv", offline=True, find_links=(str(wheels),))
    env = Environments(str(tmp_path / "envs"), sys.executable, settings).ensure(["hpcs-tiny==1.0"])
    assert "uv pip install" in open(os.path.join(env.path, "install.log")).read()
    out = subprocess.run([env.python, "-c", "import hpcs_tiny, hpc_serverless; print(hpcs_tiny.VALUE)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "42"
    print(f"uv built in {env.built_s:.2f} s")
    with pytest.raises(EnvironmentBuildError, match=r"with uv failed.*\n    error: .*\n .*hpcs-tiny==2\.0"):
        Environments(str(tmp_path / "envs"), sys.executable, settings).ensure(["hpcs-tiny==2.0"])


def test_uv_asked_for_but_missing_is_named(tmp_path, wheels, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    settings = EnvironmentSettings(installer="uv", offline=True, find_links=(str(wheels),))
    with pytest.raises(EnvironmentBuildError, match="installer is 'uv', but no `uv` is on the login node's PATH"):
        Environments(str(tmp_path / "envs"), sys.executable, settings).ensure(["hpcs-tiny==1.0"])
    assert [n for n in os.listdir(tmp_path / "envs") if not n.startswith(".")] == []


def test_a_requirement_that_cannot_be_installed_quotes_the_installer(tmp_path, wheels):
    envs = _envs(tmp_path / "envs", wheels)
    with pytest.raises(EnvironmentBuildError, match=r"ERROR: No matching distribution found for hpcs-tiny==9\.9") as e:
        envs.ensure(["hpcs-tiny==9.9"])
    assert "its whole output: " in str(e.value)
    log = str(e.value).rsplit("its whole output: ", 1)[1].rstrip(")")
    assert "hpcs-tiny==9.9" in open(log).read()
    assert [n for n in os.listdir(tmp_path / "envs") if not n.startswith(".")] == []  # nothing published


def test_two_clients_building_one_set_at_once_publish_one(tmp_path, wheels):
    results: list = []
    barrier = threading.Barrier(2)

    def build() -> None:
        envs = _envs(tmp_path / "envs", wheels)
        envs.facts()
        barrier.wait()
        results.append(envs.ensure(["hpcs-other==2.0"]))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0].path == results[1].path
    names = sorted(os.listdir(tmp_path / "envs"))
    key = results[0].key
    assert names.count(key) == 1 and len([n for n in names if n.startswith(key + "-")]) == 1, names
    assert subprocess.run([results[0].python, "-c", "import hpcs_other"]).returncode == 0


def test_gc_takes_unused_environments_and_keeps_used_ones(tmp_path, wheels):
    root = tmp_path / "envs"
    a = _envs(root, wheels).ensure(["hpcs-tiny==1.0"])
    b = _envs(root, wheels).ensure(["hpcs-other==2.0"])
    listed = {e["key"]: e for e in list_environments(str(root))}
    assert set(listed) == {a.key, b.key} and listed[a.key]["requirements"] == ["hpcs-tiny==1.0"]
    assert listed[a.key]["bytes"] > 0
    removed, kept = collect_environments(str(root), 3600, [])
    assert removed == [] and len(kept) == 2  # used just now
    removed, kept = collect_environments(str(root), 0, [b.key], dry_run=True)
    assert [r["id"] for r in removed] == [f"environment {a.key}"] and os.path.exists(a.python)
    removed, kept = collect_environments(str(root), 0, [b.key])
    assert not os.path.lexists(a.path) and os.path.exists(b.python)
    assert sorted(os.listdir(root)) == sorted([b.key, os.readlink(b.path)])
    # used again after gc: built again
    assert _envs(root, wheels).ensure(["hpcs-tiny==1.0"]).built_s is not None


# -- local provider ---------------------------------------------------------------------------------------
def test_local_program_runs_in_its_environment_then_reuses_it(tmp_path, wheels, monkeypatch):
    """The local provider has no site file: pip's own settings (here PIP_NO_INDEX and
    PIP_FIND_LINKS) say where packages come from."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    wd = tmp_path / "src"
    wd.mkdir()
    (wd / "main.py").write_text(textwrap.dedent("""
        import importlib.util
        print("has hpcs_tiny:", importlib.util.find_spec("hpcs_tiny") is not None)
        import hpcs_tiny
        from hpc_serverless import save_result
        save_result(hpcs_tiny.VALUE)
    """))
    s = QuantumServerless()
    program = Program("deps", "main.py", working_dir=str(wd), dependencies=["hpcs-tiny==1.0"])
    first = s.run_program(program)
    assert first.result(timeout=60) == 42
    assert "has hpcs_tiny: True" in first.logs() and "environment " in first.logs()
    assert "built in" in first.logs()
    second = s.run_program(program)
    assert second.result(timeout=60) == 42 and ": reused (hpcs-tiny==1.0)" in second.logs()
    local = LocalProvider()
    keys = [e["key"] for e in local.du()["environments"]]
    assert len(keys) == 1 and "environments" in local.du()["kinds"]
    report = local.gc(0)
    assert f"environment {keys[0]}" in {r["id"] for r in report["removed"]}
    assert local.du()["environments"] == []


def test_local_program_with_a_missing_dependency_fails_before_it_starts(tmp_path, wheels, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    wd = tmp_path / "src"
    wd.mkdir()
    (wd / "main.py").write_text("print(1)\n")
    s = QuantumServerless()
    with pytest.raises(EnvironmentBuildError, match="No matching distribution found for surely-not-installed-pkg>=1") as e:
        s.run_program(Program("t", "main.py", working_dir=str(wd), dependencies=["surely-not-installed-pkg>=1"]))
    # nothing ran; the refusal is a job whose logs are the installer's output
    job = s.get_job_by_id(e.value.job_id)
    assert job.status() == "FAILED" and job.info()["state"] == "REFUSED"
    assert "ERROR: No matching distribution found for surely-not-installed-pkg>=1" in job.logs()
    assert "dependencies could not be installed" in job.info()["reason"]


def test_local_task_with_pip_runs_in_workers_of_its_environment(tmp_path, wheels, monkeypatch):
    """The local pool's workers are long-lived: a task with `pip` runs in a pool of its own
    environment's workers (built once, then reused); a task of the main pool cannot wait for
    it (another interpreter); a requirement that cannot be installed fails at the call, in
    pip's words."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))

    @distribute_task(target={"pip": ["hpcs-tiny==1.0"]})
    def tiny(x):
        import sys

        import hpcs_tiny
        return hpcs_tiny.VALUE + x, sys.prefix

    value, prefix = tiny(1).result(timeout=120)
    assert value == 43 and f"{os.sep}envs{os.sep}" in prefix
    again, prefix2 = get(tiny(2), timeout=60)
    assert again == 44 and prefix2 == prefix  # the same environment's pool
    with pytest.raises(ModuleNotFoundError):  # not in this interpreter, nor the main pool's workers
        import hpcs_tiny  # noqa: F401

    @distribute_task
    def main_pool_import():
        import hpcs_tiny  # noqa: F401

    with pytest.raises(ModuleNotFoundError):
        get(main_pool_import(), timeout=60)

    @distribute_task
    def plus(v, k):
        return v[0] + k

    with pytest.raises(HPCServerlessError, match="same environment"):
        plus(tiny(3), 1)

    @distribute_task(target={"pip": ["hpcs-not-here==1.0"]})
    def f():
        return 1

    with pytest.raises(EnvironmentBuildError, match="No matching distribution found for hpcs-not-here==1.0"):
        f()


def test_pilot_mode_refuses_pip_naming_the_key(tmp_path, monkeypatch):
    """Pilot workers are long-lived dask workers of the site's python. The transport is a
    mock (no scheduler is asked: the refusal comes before anything is submitted)."""
    from hpc_serverless.adapters.transport.mock import MockTransport
    from hpc_serverless.providers.pilot import PilotProvider

    from .test_site import ROOT

    monkeypatch.setenv("HPC_SERVERLESS_HOME", str(tmp_path))
    transport = MockTransport(lambda argv, input: (1, "", "not asked"))
    pilot = PilotProvider("p", site=str(ROOT / "site_configs/localhost-slurm-pilot.yaml"), transport=transport)

    @distribute_task(target={"pip": ["hpcs-tiny==1.0"]})
    def f():
        return 1

    with QuantumServerless().add_provider(pilot).context("p"), pytest.raises(
            ResourceError, match=r"pip=\['hpcs-tiny==1.0'\]: the pilot workers are long-lived"):
        f()
    assert transport.calls == []


def test_site_default_pip_puts_every_program_job_in_its_environment(tmp_path, wheels):
    """A site whose `defaults:` has `pip` runs every Program in that environment; the job
    script starts the runner with the environment's python and says how it came. The
    transport is a mock (sbatch answers a job id; nothing runs): the script is the point."""
    from hpc_serverless import SlurmProvider
    from hpc_serverless.adapters.transport import MockTransport

    calls: list = []

    def answer(argv, inp):
        calls.append(argv)
        return (0, "4242\n", "") if argv[0] == "sbatch" else (0, "", "")

    site = {"scheduler": "slurm", "storage": str(tmp_path / "storage"), "python": sys.executable,
            "defaults": {"pip": ["hpcs-tiny==1.0"], "partition": "debug"},
            "environments": {"offline": True, "find_links": [str(wheels)]}}
    provider = SlurmProvider("mock", site=site, transport=MockTransport(answer))
    wd = tmp_path / "src"
    wd.mkdir()
    (wd / "main.py").write_text("print(1)\n")
    job = provider.run_program(Program("p", "main.py", working_dir=str(wd)))
    script = (tmp_path / "storage" / "programs" / job.job_id / "job.sh").read_text()
    key = provider.environments.key(("hpcs-tiny==1.0",))
    assert f"{tmp_path}/storage/envs/{key}/bin/python" in script
    # built once, by run_program for this job (not first for the target's pip alone)
    assert f"HPC_SERVERLESS_ENVIRONMENT='environment {key}: built in " in script
    assert [c[0] for c in calls].count("sbatch") == 1
    # a program with dependencies on that site: one environment for the whole set (and the first one)
    job = provider.run_program(Program("p", "main.py", working_dir=str(wd), dependencies=["hpcs-other==2.0"]))
    both = provider.environments.key(("hpcs-other==2.0", "hpcs-tiny==1.0"))
    assert both in (tmp_path / "storage" / "programs" / job.job_id / "job.sh").read_text()
    assert sorted(p.name for p in (tmp_path / "storage" / "envs").iterdir() if p.is_symlink()) == sorted([key, both])
    provider.backend.close()
