"""Issue 14, the batch engine's polling and memory: store reads that do not grow with the
number of pending refs, settled tasks that leave memory, a late result that wins over a
recorded error, a job missing from the scheduler's list cross-checked before it is judged
gone, and one scheduler query for all the jobs `hpc-serverless jobs` lists.

The scheduler is tests/unit/test_batch_engine.py's FakeScheduler (jobs run our real worker
in threads; held jobs stay PENDING): a lagging slurmdbd and a result file that NFS shows
late cannot be made on the test cluster, and counting every store read needs one process.
"""

from __future__ import annotations

import gc
import json
import threading
import time

import pytest

from hpc_serverless import distribute_task, get, wait
from hpc_serverless.core.errors import WorkerDiedError
from hpc_serverless.runtime import worker

from .test_batch_engine import double, lost, make_fake

__all__ = ["CountingFS", "count_store_reads"]


@distribute_task
def nap(seconds):
    time.sleep(seconds)
    return "woke"


class CountingFS:
    """The store's filesystem with its reads counted (opens and stats)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.opens = 0
        self.stats = 0
        self._lock = threading.Lock()

    def open_read(self, path):
        with self._lock:
            self.opens += 1
        return self.inner.open_read(path)

    def stat(self, path):
        with self._lock:
            self.stats += 1
        return self.inner.stat(path)

    def exists(self, path):
        try:
            self.stat(path)
            return True
        except FileNotFoundError:
            return False

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture
def fake(tmp_path):
    return make_fake(tmp_path)


def count_store_reads(store) -> CountingFS:
    """Wrap `store`'s filesystem (its public `fs`) so its reads are counted."""
    counting = CountingFS(store.fs)
    store.fs = counting
    return counting


def _reads_per_second_in_wait(provider, refs, seconds: float) -> float:
    """Store reads (opens + stats) per second while `wait()` sits on `refs`, none finishing."""
    provider.backend.flush()
    counting = count_store_reads(provider.store)
    try:
        t0 = time.monotonic()
        done, pending = wait(refs, timeout=seconds)
        elapsed = time.monotonic() - t0
    finally:
        provider.store.fs = counting.inner
    assert done == [] and len(pending) == len(refs)
    return (counting.opens + counting.stats) / elapsed


def test_store_reads_in_wait_do_not_grow_with_pending_refs(fake):
    """1,000 held jobs in wait() cost the store no more reads per second than 10 do.
    Before the rewrite: 11,298 reads/s for 1,010 refs against 119/s for 10 (after: 0 and 0)."""
    provider, sched, s = fake(hold=True)
    with s.context("fake"):
        few = [double(i) for i in range(10)]
        few_rate = _reads_per_second_in_wait(provider, few, 1.5)
        many = [double(i) for i in range(1000)]
        polls = len(sched.poll_times)
        many_rate = _reads_per_second_in_wait(provider, many + few, 1.5)
        assert len(sched.poll_times) - polls >= 2  # the engine kept polling the scheduler meanwhile
    print(f"store reads per second in wait(): 10 refs {few_rate:.0f}, 1,010 refs {many_rate:.0f}")
    assert many_rate <= few_rate + 5, (few_rate, many_rate)


def test_settled_tasks_leave_memory_and_get_stays_repeatable(fake):
    """Before: every task stayed in the engine until the process ended (200 of 200 here)."""
    provider, sched, s = fake()
    with s.context("fake"):
        refs = [double(i) for i in range(200)]
        assert get(refs, timeout=60) == [2 * i for i in range(200)]
        assert get(refs[:3], timeout=10) == [0, 2, 4]  # again: read back from the store
        kept = refs[:3]
        del refs
        gc.collect()
        deadline = time.monotonic() + 5
        while len(provider.backend._tasks) > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(provider.backend._tasks) == 0, len(provider.backend._tasks)
        assert get(kept, timeout=10) == [0, 2, 4] and kept[1].status() == "SUCCEEDED"


def test_a_late_result_wins_over_a_recorded_error_until_the_user_is_told(fake):
    """A job ends without a visible result (NFS attribute caching); its result shows later.
    Before: the recorded WorkerDiedError was final, result or not."""
    provider, sched, s = fake({"result_grace": 0.1}, lose={"lost"})
    with s.context("fake"):
        quiet, told = lost(), lost()
        done, _ = wait([quiet, told], timeout=30)
        assert len(done) == 2  # both judged failed: wait() tells nobody about the error
        assert told.status() == "FAILED"  # this one's user has now seen it
        for ref in (quiet, told):  # the results appear late
            worker.run(str(provider.store.root), ref.task_id)
        assert get(quiet, timeout=10) == 1
        assert quiet.status() == "SUCCEEDED"
        with pytest.raises(WorkerDiedError, match="NODE_FAIL"):
            get(told, timeout=10)


def test_a_job_missing_from_the_schedulers_list_is_cross_checked(fake):
    """A job sacct does not list (a lagging slurmdbd) but squeue does is not VANISHED.
    Before: judged VANISHED 2 polls + the grace after submission, its result ignored."""
    provider, sched, s = fake({"result_grace": 0.1}, unlisted={"nap"})
    with s.context("fake"):
        assert get(nap(1.5), timeout=30) == "woke"
    assert sched.cross_checks, "the missing job was never cross-checked"


def test_jobs_listing_asks_the_scheduler_once(fake):
    """`hpc-serverless jobs` with 6 unfinished programs: one scheduler query, not 6."""
    provider, sched, s = fake()
    root = provider.site.storage_path / "programs"
    for i in range(6):
        job_dir = root / f"fake-20261124-12000{i}-abcdef"
        job_dir.mkdir(parents=True)
        (job_dir / "record.json").write_text(json.dumps({"job_id": job_dir.name, "title": f"t{i}",
                                                         "created": time.time(),
                                                         "scheduler_job_id": str(100 + i)}))
        sched.states[str(100 + i)] = "RUNNING" if i % 2 else "PENDING"
    before = len(sched.poll_times)
    statuses = [job.info()["status"] for job in provider.jobs()]
    assert sorted(statuses) == ["PENDING"] * 3 + ["RUNNING"] * 3
    assert len(sched.poll_times) - before == 1, len(sched.poll_times) - before


def _slurm(handler):
    from hpc_serverless.adapters.schedulers.slurm_runner import SlurmScheduler
    from hpc_serverless.adapters.transport import MockTransport
    from hpc_serverless.config.site import site_from_mapping

    site = site_from_mapping({"scheduler": "slurm", "storage": "/nonexistent/site"}, name="mock")
    transport = MockTransport(handler)
    return SlurmScheduler(site, transport, "/nonexistent/site/store"), transport


def test_slurm_cross_check_asks_squeue_and_sacct():
    """A job a lagging slurmdbd does not list yet is found in slurmctld's queue."""
    from hpc_serverless.core.errors import SchedulerError

    def lagging_dbd(argv, _input):
        return (0, "123_4|RUNNING|None|n1\n", "") if argv[0] == "squeue" else (0, "", "")

    sched, transport = _slurm(lagging_dbd)
    found = sched.confirm_gone(["123_4", "123_5"])
    assert {j: s.state for j, s in found.items()} == {"123_4": "RUNNING"}
    assert [c[0] for c in transport.calls] == ["squeue", "sacct"] and "123" in transport.calls[0][-1]

    def purged(argv, _input):  # gone from both: the engine may judge it (after the grace)
        return (1, "", "slurm_load_jobs error: Invalid job id specified") if argv[0] == "squeue" else (0, "", "")

    assert _slurm(purged)[0].confirm_gone(["99"]) == {}

    def down(argv, _input):  # no evidence either way: nothing is judged gone
        return 1, "", "Unable to contact slurm controller"

    with pytest.raises(SchedulerError, match="neither squeue nor sacct") as e:
        _slurm(down)[0].confirm_gone(["99"])
    assert e.value.transient

    def both(argv, _input):  # a queued job: the controller's reason (sacct's lags: "None");
        if argv[0] == "squeue":  # an ended one: sacct's final state and exit code
            return 0, "7_0|PENDING|JobHeldUser|\n8|COMPLETING|None|n1\n", ""
        return 0, "7_0|PENDING|0:0|None|None assigned\n8|COMPLETED|0:0|None|n1\n", ""

    found = _slurm(both)[0].confirm_gone(["7_0", "8"])
    assert (found["7_0"].state, found["7_0"].reason) == ("PENDING", "JobHeldUser")
    assert (found["8"].state, found["8"].exit_code) == ("COMPLETED", "0:0")


def test_a_ref_from_another_process_is_answered_from_its_result_object(fake):
    """A TaskRef this engine did not submit (unpickled from another process, no job id) is
    answered from the store, which is read at most once per poll_interval while it waits."""
    from hpc_serverless.core.refs import TaskRef
    from hpc_serverless.core.sessions import session_task_id

    provider, sched, s = fake({"poll_interval": 0.2, "max_poll_interval": 0.2})
    with s.context("fake"):
        ref = double(21)
        assert get(ref, timeout=30) == 42
        theirs = TaskRef(ref.task_id, provider.backend.key, "fake", "double")  # no job id
        assert theirs.result(timeout=10) == 42 and theirs.status() == "SUCCEEDED"
        provider.session.open()
        never = TaskRef(session_task_id(provider.session.id), provider.backend.key, "fake", "double")
        counting = count_store_reads(provider.store)
        try:
            t0 = time.monotonic()
            done, pending = wait([never], timeout=1.0)
            elapsed = time.monotonic() - t0
        finally:
            provider.store.fs = counting.inner
        assert done == [] and pending == [never] and never.status() == "PENDING"
        assert 1 <= counting.opens <= elapsed / 0.2 + 2, counting.opens


def test_a_blocked_get_keeps_polls_at_poll_interval(fake):
    """The backoff (to max_poll_interval) is for tasks nobody waits on: a get() started after
    the engine backed off brings the next poll forward, and polls stay at poll_interval while
    it waits, so a result is seen within about one poll_interval."""
    provider, sched, s = fake({"poll_interval": 0.2, "max_poll_interval": 30})
    with s.context("fake"):
        ref = nap(4.0)  # runs 4 s: long enough for the engine's interval to back off past it
        provider.backend.flush()
        time.sleep(3.0)
        assert provider.backend._interval > 1.0  # backed off: nothing changed for 3 s
        t0 = time.monotonic()
        assert get(ref, timeout=20) == "woke"
        t_end = time.monotonic()
        assert t_end - t0 < 3.0  # the task ends ~1 s after get began; a poll follows
    # while get waited, polls came at poll_interval (0.2 s; 1 s allows a busy machine), not at
    # the backed-off interval (> 1 s, checked above)
    marks = [t0, *(t for t in sched.poll_times if t0 <= t <= t_end)]
    gaps = [b - a for a, b in zip(marks, marks[1:])]
    assert len(gaps) >= 2 and max(gaps) < 1.0, gaps
