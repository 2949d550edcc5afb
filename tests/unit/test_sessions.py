"""Sessions: their layout on the site, heartbeat staleness, gc's dry run and its rules, the
quota parser (on recorded sample outputs), and the removal of submitit's job files."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from hpc_serverless import distribute_task, get
from hpc_serverless.adapters.quota import parse_quota
from hpc_serverless.adapters.submitit_executors import remove_job_files
from hpc_serverless.core.sessions import Session, parse_duration, read_session, session_of
from hpc_serverless.runtime.worker import args_key, checkpoint_key, result_key, task_key

from .test_batch_engine import fake  # noqa: F401 - the fixture, shared

DATA = Path(__file__).resolve().parents[1] / "data" / "quota"


@distribute_task
def triple(x):
    return 3 * x


def test_old_task_ids_keep_their_keys_and_new_ones_name_their_session():
    old = "ab" * 12
    assert task_key(old) == f"tasks/ab/{old}" and result_key(old) == f"results/ab/{old}"
    assert session_of(old) is None
    new = "20260101-120000-abcdef.0123456789abcdef"
    assert session_of(new) == "20260101-120000-abcdef"
    assert result_key(new) == "sessions/20260101-120000-abcdef/results/01/0123456789abcdef"
    # checkpoints and a pilot call's big arguments go with their session too
    assert checkpoint_key(new) == "sessions/20260101-120000-abcdef/checkpoints/01/0123456789abcdef"
    assert args_key(new) == "sessions/20260101-120000-abcdef/args/01/0123456789abcdef"


def test_checkpoint_lives_in_the_session_and_one_saved_before_sessions_still_loads(tmp_path, monkeypatch):
    from hpc_serverless.core.store import ObjectStore
    from hpc_serverless.runtime import checkpoint

    task_id = "20260101-120000-abcdef.0123456789abcdef"
    monkeypatch.setenv(checkpoint.TASK_ENV, task_id)
    monkeypatch.setenv(checkpoint.STORE_ENV, str(tmp_path / "store"))
    ObjectStore(tmp_path / "store").put({"step": 7}, f"checkpoints/20/{task_id}")  # as 0.x kept it
    assert checkpoint.load_checkpoint() == {"step": 7}
    assert checkpoint.save_checkpoint({"step": 8})
    assert (tmp_path / "store" / checkpoint_key(task_id)).is_file()
    assert checkpoint.load_checkpoint() == {"step": 8}


def test_session_holds_objects_calls_results_and_job_ids(fake):  # noqa: F811
    provider, sched, s = fake()
    with s.context("fake"):
        from hpc_serverless import put

        ref = put(list(range(10)))
        refs = [triple(i) for i in range(5)]
        assert get(refs, timeout=30) == [0, 3, 6, 9, 12]
        again = distribute_task(triple.function)  # the same code, another RemoteFunction
        assert get(again(2), timeout=30) == 6
    session = provider.session
    root = Path(session.dir)
    assert ref.key.startswith(f"sessions/{session.id}/objects/") and ref.get() == list(range(10))
    assert all(session_of(r.task_id) == session.id for r in refs)
    assert (root / "session.json").stat().st_mode & 0o777 == 0o600
    assert root.stat().st_mode & 0o777 == 0o700
    info = read_session(str(root))
    assert info is not None and info.live(time.time()) and set(info.job_ids) >= {"1", "2"}
    assert len(list((root / "results").rglob("*"))) >= 6
    # one function file for both RemoteFunctions: stored by content
    functions = list((Path(provider.store.root) / "functions").iterdir())
    assert len(functions) == 1 and functions[0].name.startswith("h_")
    provider.backend.flush(at_exit=True)  # collected: the calls go, the results stay
    assert not list((root / "tasks").rglob("*.*")) and not [p for p in (root / "tasks").rglob("*") if p.is_file()]
    assert get(refs[0], timeout=5) == 0


def test_heartbeat_goes_stale_after_a_few_intervals(tmp_path):
    s = Session(tmp_path, interval=0.1)
    s.open()
    assert read_session(str(s.dir)).live(time.time())  # type: ignore[union-attr]
    s._stop.set()  # the process hangs or its host dies: no more beats, no close
    time.sleep(0.05)
    info = read_session(str(s.dir))
    assert info is not None
    assert info.live(info.last_beat + 0.25) and not info.live(info.last_beat + 0.35)
    s.close()
    assert not read_session(str(s.dir)).live(time.time())  # type: ignore[union-attr]


def test_gc_dry_run_lists_what_would_go_and_keeps_live_and_running(fake, tmp_path):  # noqa: F811
    provider, sched, s = fake()
    root = str(provider.store.root)
    done = Session(root, "20200101-000000-aaaaaa")
    done.open(beating=False)
    done.record_jobs(["900_0", "900_1"])
    Path(done.jobs_dir, "900_0_0_log.out").write_text("log")
    done.close()
    running = Session(root, "20200101-000000-bbbbbb")
    running.open(beating=False)
    running.record_jobs(["901"])
    running.close()
    live = Session(root, "20200101-000000-cccccc")
    live.open(beating=False)
    sched.states.update({"900_0": "COMPLETED", "900_1": "COMPLETED", "901": "RUNNING"})

    report = s.gc(0, dry_run=True, provider="fake")
    assert [r["id"] for r in report["removed"]] == [done.id]
    assert report["files"] == 5 and report["bytes"] > 0  # session.json, heartbeat, job-ids, closed, the log
    assert os.path.isdir(done.dir)
    why = {k["id"]: k["why"] for k in report["kept"]}
    assert "RUNNING" in why[running.id] and "heartbeat" in why[live.id]
    assert s.gc("1d", dry_run=True, provider="fake")["removed"] == []  # not old enough yet

    report = s.gc(0, provider="fake")
    assert not os.path.exists(done.dir) and os.path.isdir(running.dir) and os.path.isdir(live.dir)
    usage = s.du("fake")
    assert {x["id"] for x in usage["sessions"]} == {running.id, live.id}
    assert isinstance(usage["quota"], (str, list))


def test_parse_duration():
    assert parse_duration("7d") == 7 * 86400 and parse_duration("0") == 0 and parse_duration("90m") == 5400


def test_quota_parsers_on_recorded_samples():
    (lustre,) = parse_quota((DATA / "lfs-quota-sample.txt").read_text(), "lfs quota")
    assert lustre.filesystem == "/lustre/scratch"
    assert lustre.bytes_used == 123456789 * 1024 and lustre.bytes_limit == 1073741824 * 1024
    assert lustre.files_used == 250000 and lustre.files_limit == 1000000
    assert "25%" in lustre.describe()
    (home,) = parse_quota((DATA / "quota-linux-sample.txt").read_text(), "quota")
    assert home.filesystem == "/dev/mapper/home" and home.files_limit == 110000
    assert parse_quota((DATA / "quota-none-sample.txt").read_text(), "quota") == []


def test_job_files_go_but_logs_stay(tmp_path):
    jobs = tmp_path / "jobs"
    for job in ("7_0", "7_1", "7"):
        (jobs / job).mkdir(parents=True)
    for job in ("7_0", "7_1"):
        (jobs / job / f"{job}_submitted.pkl").write_bytes(b"x")
        (jobs / job / f"{job}_result.pkl").write_bytes(b"x")
        (jobs / f"{job}_0_log.out").write_text("log")
    (jobs / "7" / "7_submission.sh").write_text("#!/bin/sh")
    (jobs / ".submission_file_abc.sh").symlink_to(jobs / "7" / "7_submission.sh")
    assert remove_job_files(jobs, ["7_0"]) == 2
    assert remove_job_files(jobs, ["7_1", "7"]) == 4
    assert sorted(p.name for p in jobs.iterdir()) == ["7_0_0_log.out", "7_1_0_log.out"]
    assert json.dumps(remove_job_files(jobs, ["7"])) == "0"


def test_local_provider_keeps_puts_in_a_session_that_gc_removes_once_its_process_ended(tmp_path, monkeypatch):
    """On a laptop too: a process's objects are one session; `du` lists it, `gc` keeps it
    while the process lives and removes it (and nothing else) once it has ended."""
    import subprocess
    import sys

    monkeypatch.setenv("HPC_SERVERLESS_STORE", str(tmp_path / "store"))
    child = ("import hpc_serverless as hs, numpy as np\n"
             "refs = [hs.put(np.arange(1000)) for _ in range(3)]\n"
             "print(refs[0].key)\n")
    key = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True,
                         env={**os.environ}).stdout.strip()
    sid = key.split("/")[1]
    assert key.startswith(f"sessions/{sid}/objects/")

    from hpc_serverless.providers.local import LocalProvider

    here = LocalProvider(store=tmp_path / "store")
    mine = here.put({"still": "used"})  # this process's session: live, kept
    cli = [sys.executable, "-m", "hpc_serverless.cli"]
    du = json.loads(subprocess.run([*cli, "du", "--json"], capture_output=True, text=True, check=True).stdout)
    by_id = {s["id"]: s for s in du["sessions"]}
    assert by_id[sid]["files_by_kind"]["objects"] == 3 and not by_id[sid]["live"]
    assert by_id[here.session.id]["live"]
    report = json.loads(subprocess.run([*cli, "gc", "--older-than", "0", "--json"], capture_output=True,
                                       text=True, check=True).stdout)
    assert [r["id"] for r in report["removed"]] == [sid]
    assert {k["id"]: k["why"] for k in report["kept"]}[here.session.id].startswith("in use")
    assert not (tmp_path / "store" / "sessions" / sid).exists()
    assert mine.get() == {"still": "used"}
