"""The batch-job entry (hpc_serverless.runtime.worker) on a local store: what runs on a compute node."""

import os

import pytest

from hpc_serverless.core.errors import DependencyError, SerializationError
from hpc_serverless.core.serialization import dumps, function_bytes, loads, pack_exception, unpack_exception
from hpc_serverless.core.store import ObjectStore
from hpc_serverless.runtime import worker


@pytest.fixture
def store(tmp_path):
    os.chmod(tmp_path, 0o700)
    return ObjectStore(tmp_path / "s")


def _spec(store, task_id, fn, args=(), deps=(), **extra):
    store.put(function_bytes(fn), worker.function_key("f:" + task_id), overwrite=True)
    spec = {"task_id": task_id, "name": fn.__name__, "fn_key": "f:" + task_id,
            "args": dumps((args, {})), "deps": list(deps), "versions": worker.versions(), **extra}
    store.put(spec, worker.task_key(task_id))


def _result(store, task_id):
    ok, payload, info = store.get(worker.result_key(task_id))
    assert store.header(worker.result_key(task_id))["meta"] == {"ok": ok}
    return ok, (loads(payload) if ok else unpack_exception(payload)), info


def test_runs_and_stores_result(store):
    _spec(store, "aa11", lambda x: x + 1, (41,))
    assert worker.run(str(store.root), "aa11") is True
    ok, value, info = _result(store, "aa11")
    assert ok and value == 42 and info["host"]


def test_failure_stores_exception_and_raises(store):
    def bad():
        raise KeyError("missing")

    _spec(store, "bb22", bad)
    with pytest.raises(worker.TaskFailed):
        worker.run(str(store.root), "bb22")
    ok, exc, _ = _result(store, "bb22")
    assert not ok and isinstance(exc, KeyError)


def test_failed_dependency_is_not_run(store):
    store.put((False, pack_exception(ValueError("upstream broke")), {}), worker.result_key("cc33"),
              meta={"ok": False})
    _spec(store, "dd44", lambda v: v, deps=[("cc33", "prepare")])
    with pytest.raises(worker.TaskFailed):
        worker.run(str(store.root), "dd44")
    ok, exc, _ = _result(store, "dd44")
    assert isinstance(exc, DependencyError) and "prepare#cc33" in str(exc)
    assert isinstance(exc.__cause__, ValueError)


def test_version_mismatch_is_a_clear_error(store):
    _spec(store, "ee55", lambda: 1, versions={"python": "3.8.10", "cloudpickle": "1.0", "hpc_serverless": "0"})
    with pytest.raises(worker.TaskFailed):
        worker.run(str(store.root), "ee55")
    ok, exc, _ = _result(store, "ee55")
    assert isinstance(exc, SerializationError)
    assert "client runs Python 3.8.10" in str(exc) and "site's 'python'" in str(exc)


def test_main_usage():
    assert worker.main(["bogus"]) == 2
