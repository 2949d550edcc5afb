"""Durable records and checkpoints (issue 14): written aside, fsynced, renamed over; a torn
record is a clear error. fsync is counted by wrapping LocalFS.sync (the real call still runs)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from hpc_serverless.core.errors import CorruptRecordError
from hpc_serverless.core.fs import LOCAL, LocalFS
from hpc_serverless.engines.job_dirs import JobDirs
from hpc_serverless.runtime import checkpoint


@pytest.fixture
def syncs(monkeypatch):
    """Every fsync of a file and of a directory, in order."""
    seen: list[str] = []
    file_sync, dir_sync = LocalFS.sync, LocalFS.sync_dir

    def sync(self, f):
        seen.append("file")
        file_sync(self, f)

    def sync_dir(self, path):
        seen.append("dir")
        dir_sync(self, path)

    monkeypatch.setattr(LocalFS, "sync", sync)
    monkeypatch.setattr(LocalFS, "sync_dir", sync_dir)
    return seen


def test_a_large_checkpoint_is_fsynced_before_it_replaces_the_last(tmp_path, monkeypatch, syncs):
    monkeypatch.setenv(checkpoint.TASK_ENV, "ab12cd34")
    monkeypatch.setenv(checkpoint.STORE_ENV, str(tmp_path / "store"))
    assert checkpoint.save_checkpoint({"step": 1})
    syncs.clear()
    big = np.ones(3 * 1024 * 1024)  # 24 MiB: above the store's fsync-by-default size
    assert checkpoint.save_checkpoint({"step": 2, "x": big})
    assert syncs == ["file", "dir"]  # the new file, then its rename over the last one
    state = checkpoint.load_checkpoint()
    assert state["step"] == 2 and state["x"].nbytes == 24 * 1024 * 1024


def test_records_are_fsynced_and_leave_no_temporary_file(tmp_path, syncs):
    path = tmp_path / "record.json"
    LOCAL.write_atomic(str(path), b'{"a": 1}')
    assert syncs == ["file", "dir"] and path.read_bytes() == b'{"a": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]
    assert (path.stat().st_mode & 0o777) == 0o600


def test_a_failed_record_write_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "record.json"
    LOCAL.write_atomic(str(path), b'{"old": true}')

    def broken(self, f):
        raise OSError(5, "simulated I/O error at fsync")

    monkeypatch.setattr(LocalFS, "sync", broken)
    with pytest.raises(OSError, match="simulated"):
        LOCAL.write_atomic(str(path), b'{"new": true}')
    assert path.read_bytes() == b'{"old": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


@pytest.mark.parametrize("content", [b'{"job_id": "x", "title": "t', b"", b"[1, 2]", b"\xff\xfe"])
def test_a_torn_job_record_is_a_clear_error(tmp_path, content):
    dirs = JobDirs(str(tmp_path), "local")
    os.makedirs(dirs.path("j1"))
    Path(dirs.path("j1", "record.json")).write_bytes(content)
    with pytest.raises(CorruptRecordError, match=r"record\.json of job 'j1'"):
        dirs.record("j1")


def test_a_task_result_is_durable_at_any_size(tmp_path, syncs):
    """The worker's result: file fsynced before the rename, directory after it, even above
    the size where plain puts skip the fsync."""
    from hpc_serverless.core.store import FSYNC_BELOW, ObjectStore
    from hpc_serverless.runtime.worker import _write_result, result_key

    store = ObjectStore(tmp_path / "store")
    _write_result(store, "s1.00ff", True, b"x" * (FSYNC_BELOW + 1), 0.0)
    assert syncs == ["file", "dir"]
    assert store.header(result_key("s1.00ff"))["meta"] == {"ok": True}
    syncs.clear()
    store.put(b"y" * (FSYNC_BELOW + 1), "x/plain")  # a big plain put: checksummed, not fsynced
    assert syncs == []
