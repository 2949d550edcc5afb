"""Issue 14, done means: a site whose storage is in a group's setgid project directory,
used with umask 002, as the unprivileged client on the real test cluster.

The project directory is made in the test's tmp_path with the client's own group (the
test cluster's client is in no other group): it is setgid and group-writable as a
project directory is, so new directories inherit its group and g+s, and umask 002 makes
group-writable files. After tasks (one array), a Program and a pilot run, nothing under
the storage may be writable by group or others and no pickle readable by them; a task's
swapped call object, a directory opened to the group and a storage root swapped for a
symlink are refused with UnsafeStoreError.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from hpc_serverless import Program, QuantumServerless, distribute_task, get, put
from hpc_serverless.config.site import load_site
from hpc_serverless.core.errors import UnsafeStoreError
from hpc_serverless.core.private import CHECK_TTL_S
from hpc_serverless.providers.factory import provider_for_site
from hpc_serverless.runtime import worker

from .conftest import ROOT

pytestmark = pytest.mark.cluster

PILOT_SITE = os.environ.get("HPC_SERVERLESS_TEST_PILOT_SITE", "site_configs/localhost-slurm-pilot.yaml")
MAGIC = (b"HPCSOBJ", b"\x80")  # our stored objects, plain pickles


def modes(top: str) -> list[tuple[str, int, bool]]:
    """(path, mode, looks like a pickle) of everything under `top` but symlinks (a link's
    own mode means nothing); files that vanish while we look (a job's cleanup) are skipped."""
    found = []
    for here, dirs, files in os.walk(top):
        for name in [*dirs, *files]:
            p = os.path.join(here, name)
            try:
                st = os.lstat(p)
                pickle = False
                if stat.S_ISREG(st.st_mode):
                    if name.endswith(".pkl"):
                        pickle = True
                    elif st.st_mode & 0o400:
                        with open(p, "rb") as f:
                            pickle = f.read(8).startswith(MAGIC)
            except (FileNotFoundError, PermissionError):
                continue
            if not stat.S_ISLNK(st.st_mode):
                found.append((p, stat.S_IMODE(st.st_mode), pickle))
    return found


def problems(found: list[tuple[str, int, bool]]) -> list[str]:
    bad = [f"{p}: {oct(m)} writable by group/others" for p, m, _ in found if m & 0o022]
    bad += [f"{p}: {oct(m)} a pickle others can read" for p, m, pk in found if pk and m & 0o077]
    return bad


@distribute_task(target={"time": 5})
def look(top: str, i: int) -> list[tuple[str, int, bool]]:
    """From inside the job: the storage as the compute node sees it while the job runs
    (its own submitted pickle and script are still there)."""
    return modes(top)


@distribute_task(target={"time": 5, "directives": ["--hold"]})
def held(x: str) -> str:
    return x


@distribute_task(target={"time": 5, "directives": ["--hold"]})
def held_too(x: str) -> str:
    return x


@pytest.fixture
def project(tmp_path: Path):
    """A setgid, group-writable project directory and umask 002 while the test runs."""
    proj = tmp_path / "project"
    proj.mkdir()
    os.chmod(proj, 0o2775)
    old = os.umask(0o002)
    try:
        yield proj
    finally:
        os.umask(old)


def _provider(site_file: str, proj: Path, name: str, **update):
    path = Path(site_file)
    site = load_site(path if path.is_absolute() else ROOT / path)
    site = site.model_copy(update={"storage": str(proj / "storage"), **update})
    return provider_for_site(site, name)


@pytest.fixture
def group_site(site_path, project):
    provider = _provider(site_path, project, "grp")
    try:
        yield project, provider
    finally:
        provider.backend.close()


def test_tasks_and_a_program_leave_nothing_others_can_write(group_site, tmp_path):
    proj, provider = group_site
    storage = str(proj / "storage")
    src = tmp_path / "source files"
    src.mkdir()  # made under umask 002: 0775, its files 0664, as a user's would be
    (src / "main.py").write_text(textwrap.dedent("""
        from hpc_serverless import get_arguments, save_result
        save_result({"n": get_arguments()["n"] * 2})
    """))
    serverless = QuantumServerless().add_provider(provider)
    with serverless.context("grp"):
        refs = [look(storage, i) for i in range(3)]  # one array
        job = serverless.run_program(Program(title="private", entrypoint="main.py", working_dir=str(src)),
                                     arguments={"n": 21})
        inside = get(refs, timeout=240)
        assert job.result(timeout=240) == {"n": 42}
    seen_inside = [p for walk in inside for p, _, _ in walk]
    assert any(p.endswith("_submitted.pkl") for p in seen_inside), seen_inside  # the walk saw job files
    assert any(p.endswith("_log.out") for p in seen_inside), seen_inside
    after = modes(storage)
    assert any(pk for _, _, pk in after)  # store objects were looked at
    assert any(p.endswith("job.sh") for p, _, _ in after) and any(p.endswith("output.log") for p, _, _ in after)
    bad = problems([f for walk in inside for f in walk]) + problems(after)
    assert not bad, "\n".join(bad[:20])


def _wait_job_id(ref, within: float = 60) -> str:
    deadline = time.time() + within
    while ref.job_id is None and time.time() < deadline:
        time.sleep(0.2)
    assert ref.job_id, "the task was not submitted"
    return str(ref.job_id)


def test_a_swapped_call_a_group_writable_directory_and_a_symlinked_root_are_refused(group_site, tmp_path):
    proj, provider = group_site
    store = provider.store
    serverless = QuantumServerless().add_provider(provider)
    with serverless.context("grp"):
        swapped, opened = held("ours"), held_too("ours too")  # one held array: two elements
        job = _wait_job_id(swapped).split("_")[0]
        _wait_job_id(opened)
        # a group member swaps the first task's call for a link to a call of their own
        call = store.path_of(worker.task_key(swapped.task_id))
        theirs = tmp_path / "theirs.obj"
        shutil.copy(call, theirs)
        os.unlink(call)
        os.symlink(theirs, call)
        # and the directory of the second task's function is opened to the group
        fn_key = store.get(worker.task_key(opened.task_id))["fn_key"]
        functions = store.path_of(worker.function_key(fn_key)).parent
        os.chmod(functions, 0o2775)
        try:
            subprocess.run(["scontrol", "release", job], check=True, capture_output=True, timeout=30)
            with pytest.raises(UnsafeStoreError, match="symbolic link") as err:
                get(swapped, timeout=180)
            assert str(call) in str(err.value)
            with pytest.raises(UnsafeStoreError, match="writable by other users"):
                get(opened, timeout=180)
        finally:
            os.chmod(functions, 0o700)
        # the storage root, in the group's directory, swapped for a link (to a copy of it)
        ref = put({"secret": 1})
        assert get(ref) == {"secret": 1}
        storage = proj / "storage"
        os.rename(storage, proj / "elsewhere")
        storage.symlink_to(proj / "elsewhere")
        time.sleep(CHECK_TTL_S + 0.2)  # this process checked the chain already: it checks again
        try:
            with pytest.raises(UnsafeStoreError, match="symbolic link .* other users can write"):
                get(ref)
        finally:
            storage.unlink()
            os.rename(proj / "elsewhere", storage)


def test_a_pilot_run_leaves_nothing_others_can_write(project):
    """Pilot mode (one worker job of dask): its scripts, logs and results under the storage."""
    pytest.importorskip("dask_jobqueue")
    site_file = PILOT_SITE
    path = Path(site_file)
    base = load_site(path if path.is_absolute() else ROOT / path)
    provider = _provider(site_file, project, "grp-pilot",
                         pilot=base.pilot.model_copy(update={"workers": 1}))
    try:
        with QuantumServerless().add_provider(provider).context("grp-pilot"):
            refs = [square(i) for i in range(4)]
            assert get(refs, timeout=240) == [0, 1, 4, 9]
            big = square(b"x" * 2_000_000)  # argument and result big enough to go through the store
            assert get(big, timeout=120) == b"x" * 2_000_000
    finally:
        provider.close()
    storage = str(project / "storage")
    found = modes(storage)
    rel = [os.path.relpath(p, storage) for p, _, _ in found]
    assert any(r.startswith("pilot/logs/") for r in rel), rel  # the worker job's log was looked at
    bad = problems(found)
    assert not bad, "\n".join(bad[:20])


@distribute_task
def square(x):
    return x * x if isinstance(x, int) else x
