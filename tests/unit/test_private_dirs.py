"""Private directory chains (core/private.py) and where they are used: the object store's
re-checked chain, and submitit's job folders and pickles.

Runs on this machine's filesystem as whoever runs the suite (the unprivileged client under
scripts/test.sh). The one fake is sbatch (a MockTransport answering with a job id): the
files it would be handed are what these tests look at; tests/cluster/test_private_files.py
runs the same on the real cluster.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from hpc_serverless.core.errors import UnsafeStoreError
from hpc_serverless.core.private import CHECK_TTL_S, check_chain, make_private, open_private, write_private
from hpc_serverless.core.store import ObjectStore


@pytest.fixture
def group_dir(tmp_path: Path):
    """A setgid directory others of the group can write, as a project directory is, and
    umask 002 while the test runs."""
    d = tmp_path / "project"
    d.mkdir()
    os.chmod(d, 0o2775)
    old = os.umask(0o002)
    try:
        yield d
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_make_private_makes_every_level_0700_under_setgid_and_umask_002(group_dir: Path):
    root, leaf = group_dir / "storage", group_dir / "storage" / "a" / "b" / "jobs"
    make_private(root, leaf)
    for d in (root, root / "a", root / "a" / "b", leaf):
        assert _mode(d) == 0o700, f"{d}: {oct(_mode(d))}"  # no g+s from the parent, no umask bits
    check_chain(root, leaf)


def test_a_group_writable_level_is_refused_with_path_mode_and_fix(tmp_path: Path):
    root = tmp_path / "storage"
    make_private(root, root / "a" / "b")
    os.chmod(root / "a", 0o770)
    with pytest.raises(UnsafeStoreError) as err:
        check_chain(root, root / "a" / "b")
    text = str(err.value)
    assert str(root / "a") in text and "drwxrwx---" in text and f"chmod go-w {root / 'a'}" in text


def test_a_symlink_inside_the_chain_is_refused(tmp_path: Path):
    root = tmp_path / "storage"
    make_private(root, root / "real")
    (root / "link").symlink_to(root / "real")
    with pytest.raises(UnsafeStoreError, match="symbolic link"):
        check_chain(root, root / "link")
    with pytest.raises(UnsafeStoreError, match="symbolic link"):
        make_private(root, root / "link" / "deeper")


def test_a_root_symlinked_in_a_group_writable_directory_is_refused(group_dir: Path, tmp_path: Path):
    elsewhere = tmp_path / "elsewhere"
    make_private(elsewhere)
    (group_dir / "storage").symlink_to(elsewhere)
    with pytest.raises(UnsafeStoreError, match="symbolic link .* other users can write"):
        check_chain(group_dir / "storage")


def test_a_root_symlinked_in_a_private_directory_is_followed(tmp_path: Path):
    """$SCRATCH is often a link the user made: that one is fine."""
    make_private(tmp_path / "real")
    (tmp_path / "scratch").symlink_to(tmp_path / "real")
    make_private(tmp_path / "scratch", tmp_path / "scratch" / "store")
    assert _mode(tmp_path / "real" / "store") == 0o700


@pytest.mark.skipif(os.geteuid() == 0, reason="root owns / itself")
def test_a_directory_not_ours_is_refused():
    with pytest.raises(UnsafeStoreError, match="belongs to uid 0, not to you"):
        check_chain("/")


def test_open_private_refuses_links_and_files_others_can_write(tmp_path: Path):
    make_private(tmp_path / "d")
    good = tmp_path / "d" / "x.pkl"
    write_private(good, b"data")
    assert _mode(good) == 0o600
    with open_private(good) as f:
        assert f.read() == b"data"
    (tmp_path / "d" / "link.pkl").symlink_to(good)
    with pytest.raises(UnsafeStoreError, match="symbolic link"):
        open_private(tmp_path / "d" / "link.pkl")
    os.chmod(good, 0o620)
    with pytest.raises(UnsafeStoreError, match="writable by other users"):
        open_private(good)


def test_the_store_sees_a_root_swapped_for_a_symlink_after_it_checked_it(group_dir: Path, tmp_path: Path):
    """A long-lived process (a pilot worker, an agent) checked the store once; then the
    root, in a group-writable directory, is swapped for a link to a copy holding another
    object under the same key. Before: the first check was cached for ever, the swapped
    object loaded."""
    storage = group_dir / "storage"
    store = ObjectStore(storage / "store")
    store.put("ours", "objects/ab/x")
    assert store.get("objects/ab/x") == "ours"
    evil = tmp_path / "evil"
    ObjectStore(evil / "store").put("theirs", "objects/ab/x")
    os.rename(storage, group_dir / "old")
    storage.symlink_to(evil)  # the storage root, above the store's own root
    time.sleep(CHECK_TTL_S + 0.1)
    with pytest.raises(UnsafeStoreError, match="symbolic link"):
        store.get("objects/ab/x")


def test_the_store_sees_a_directory_opened_to_the_group_after_it_checked_it(tmp_path: Path):
    store = ObjectStore(tmp_path / "storage")
    store.put(1, "objects/ab/y")
    assert store.get("objects/ab/y") == 1
    os.chmod(tmp_path / "storage" / "objects", 0o775)
    time.sleep(CHECK_TTL_S + 0.1)
    with pytest.raises(UnsafeStoreError, match="writable by other users"):
        store.get("objects/ab/y")


def test_job_folders_and_pickles_are_private_under_setgid_and_umask_002(group_dir: Path):
    """submitit's files for one job and for an array (sbatch faked: it answers a job id)."""
    pytest.importorskip("submitit")
    from hpc_serverless.adapters.schedulers.slurm_runner import SlurmScheduler
    from hpc_serverless.adapters.transport import MockTransport
    from hpc_serverless.config.site import site_from_mapping
    from hpc_serverless.core.target import Target

    calls: list[tuple[str, ...]] = []

    def sbatch(argv, inp):
        calls.append(argv)
        return 0, f"{40 + len(calls)}\n", ""

    storage = group_dir / "storage"
    site = site_from_mapping({"scheduler": "slurm", "storage": str(storage), "python": "/opt/py"}, name="s")
    sched = SlurmScheduler(site, MockTransport(sbatch), str(storage / "store"))
    tasks = [SimpleNamespace(name="f", ref=SimpleNamespace(task_id=f"t{i}")) for i in range(3)]
    assert sched.submit(tasks[:1], Target(), []) == ["41"]
    assert sched.submit(tasks, Target(), []) == ["42_0", "42_1", "42_2"]
    seen = []
    for here, dirs, files in os.walk(storage):
        for name in [*dirs, *files]:
            p = Path(here) / name
            if p.is_symlink():
                continue
            seen.append(p.name)
            want = 0o700 if p.is_dir() else 0o600
            assert _mode(p) == want, f"{p}: {oct(_mode(p))}"
    assert {"41_submitted.pkl", "42_1_submitted.pkl", "41_submission.sh"} <= set(seen)


def _task(store: ObjectStore, task_id: str, fn) -> None:
    from hpc_serverless.core.serialization import dumps, function_bytes
    from hpc_serverless.runtime import worker

    store.put(function_bytes(fn), worker.function_key("f:" + task_id))
    store.put({"task_id": task_id, "name": "f", "fn_key": "f:" + task_id, "args": dumps(((), {})),
               "deps": [], "versions": worker.versions()}, worker.task_key(task_id))


def _refusal(store: ObjectStore, task_id: str) -> BaseException:
    from hpc_serverless.core.serialization import unpack_exception
    from hpc_serverless.runtime import worker

    with pytest.raises(worker.TaskFailed):
        worker.run(str(store.root), task_id)
    ok, payload, _ = store.get(worker.result_key(task_id))
    assert not ok
    return unpack_exception(payload)


def test_the_worker_refuses_a_call_swapped_for_a_symlink_and_says_so_in_the_result(tmp_path: Path):
    """Before: the worker loaded the object the link pointed to and ran it."""
    from hpc_serverless.runtime import worker

    store = ObjectStore(tmp_path / "storage" / "store")
    _task(store, "aa11", lambda: "ours")
    _task(store, "bb22", lambda: "theirs")
    mine = store.path_of(worker.task_key("aa11"))
    os.unlink(mine)
    os.symlink(store.path_of(worker.task_key("bb22")), mine)
    err = _refusal(store, "aa11")
    assert isinstance(err, UnsafeStoreError) and "symbolic link" in str(err) and str(mine) in str(err)


def test_the_worker_refuses_a_function_others_can_write(tmp_path: Path):
    from hpc_serverless.runtime import worker

    store = ObjectStore(tmp_path / "storage" / "store")
    _task(store, "cc33", lambda: 1)
    os.chmod(store.path_of(worker.function_key("f:cc33")), 0o660)
    err = _refusal(store, "cc33")
    assert isinstance(err, UnsafeStoreError) and "writable by other users" in str(err)
