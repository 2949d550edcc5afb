"""The batch engine (arrays, dependencies, polling bounds, vanished jobs) against a fake
scheduler that runs each job's real worker code in a thread: the parts of a Slurm site
that are ours, without Slurm. The real cluster tests cover the real scheduler."""

from __future__ import annotations

import threading
import time
from typing import Sequence

import pytest

from hpc_serverless import QuantumServerless, distribute_task, get
from hpc_serverless.adapters.schedulers.base import Scheduler
from hpc_serverless.adapters.schedulers.common import JobState
from hpc_serverless.adapters.transport import MockTransport
from hpc_serverless.config.site import site_from_mapping
from hpc_serverless.core.errors import DependencyError, SchedulerError, WorkerDiedError
from hpc_serverless.core.target import Target
from hpc_serverless.engines.batch import BatchTask
from hpc_serverless.providers.batch import BatchProvider
from hpc_serverless.runtime import worker


class FakeScheduler(Scheduler):
    """Jobs run hpc_serverless.runtime.worker.run in threads; states as a scheduler would report."""

    name = "Fake"

    def __init__(self, store_root: str, *, lose: set[str] | None = None, refuse: bool = False,
                 keep_orphans: bool = False, hold: bool = False, unlisted: set[str] | None = None) -> None:
        self.store_root = store_root
        self.hold = hold  # like sbatch --hold: jobs stay PENDING until cancelled
        self.unlisted = unlisted or set()  # task names whose jobs poll() omits (a lagging slurmdbd)
        self.names: dict[str, str] = {}
        self.cross_checks: list[tuple[str, ...]] = []
        self.keep_orphans = keep_orphans  # like Torque's wrapper: DependencyNeverSatisfied forever
        self.cancelled: list[str] = []
        self.states: dict[str, str] = {}
        self.submits: list[tuple[int, tuple[str, ...]]] = []
        self.poll_times: list[float] = []
        self.lose = lose or set()  # task names whose jobs die without a result
        self.refuse = refuse
        self._n = 0
        self._lock = threading.Lock()

    def submit(self, tasks: Sequence[BatchTask], target: Target, after: Sequence[str]) -> list[str]:
        if self.refuse:
            raise SchedulerError("Fake refused the job: invalid account")
        with self._lock:
            self._n += 1
            base = str(self._n)
        ids = [base if len(tasks) == 1 else f"{base}_{i}" for i in range(len(tasks))]
        self.submits.append((len(tasks), tuple(after)))
        for job_id, task in zip(ids, tasks):
            self.states[job_id] = "PENDING"
            self.names[job_id] = task.name
            if self.hold:
                continue
            threading.Thread(target=self._run, args=(job_id, task, list(after)), daemon=True).start()
        return ids

    def _run(self, job_id: str, task: BatchTask, after: list[str]) -> None:
        while any(self.states.get(a) not in ("COMPLETED",) for a in after):
            if self.states.get(job_id) == "CANCELLED":
                return
            if any(self.states.get(a) in ("FAILED", "CANCELLED") for a in after) and not self.keep_orphans:
                self.states[job_id] = "CANCELLED"
                return
            time.sleep(0.01)
        self.states[job_id] = "RUNNING"
        if task.name in self.lose:
            self.states[job_id] = "NODE_FAIL"
            return
        try:
            worker.run(self.store_root, task.ref.task_id)
            self.states[job_id] = "COMPLETED"
        except worker.TaskFailed:
            self.states[job_id] = "FAILED"

    def poll(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        from hpc_serverless.adapters.schedulers.slurm import status_of

        self.poll_times.append(time.monotonic())
        return {j: JobState(j, self.states[j], status_of(self.states[j])) for j in job_ids
                if j in self.states and self.names.get(j) not in self.unlisted}

    def confirm_gone(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        """The second opinion (squeue beside sacct): every job it really has."""
        from hpc_serverless.adapters.schedulers.slurm import status_of

        self.cross_checks.append(tuple(job_ids))
        return {j: JobState(j, self.states[j], status_of(self.states[j])) for j in job_ids if j in self.states}

    def cancel(self, job_ids: Sequence[str]) -> None:
        self.cancelled.extend(job_ids)
        for j in job_ids:
            self.states[j] = "CANCELLED"

    def max_array_size(self) -> int:
        return 8

    def program_script(self, *a, **k) -> str:  # programs are tested on the real cluster
        raise NotImplementedError

    def submit_script(self, path: str) -> str:
        raise NotImplementedError


def make_fake(tmp_path):
    """A factory of (provider, fake scheduler, QuantumServerless) on a private temporary site."""
    tmp_path.chmod(0o700)

    def make(site_extra=None, **kw):
        site = site_from_mapping({"scheduler": "slurm", "storage": str(tmp_path / "site"),
                                  "poll_interval": 0.05, "max_poll_interval": 0.2,
                                  "array_linger": 0.5, **(site_extra or {})}, name="fake")
        transport = MockTransport(lambda argv, inp: (0, "", ""))
        sched = FakeScheduler(str(site.storage_path / "store"), **kw)
        provider = BatchProvider("fake", site, transport, sched)
        s = QuantumServerless().add_provider(provider)
        return provider, sched, s

    return make


@pytest.fixture
def fake(tmp_path):
    return make_fake(tmp_path)


@distribute_task
def double(x):
    return 2 * x


@distribute_task
def explode(msg):
    raise OverflowError(msg)


@distribute_task
def lost():
    return 1


def test_loop_becomes_arrays_split_at_max_size(fake):
    provider, sched, s = fake()
    with s.context("fake"):
        refs = [double(i) for i in range(20)]
        assert get(refs, timeout=30) == [2 * i for i in range(20)]
    sizes = [n for n, _ in sched.submits]
    # arrays, split at the site's maximum (where a loop is cut also depends on timing)
    assert sum(sizes) == 20 and max(sizes) == 8 and len(sizes) <= 4, sizes
    assert refs[0].job_id == "1_0"


def test_dependencies_wait_and_failures_propagate(fake):
    provider, sched, s = fake()
    with s.context("fake"):
        a = double(1)
        b = double(a)
        c = double(b)
        assert get(c, timeout=30) == 8
        assert sched.submits[1][1] == (a.job_id,) and sched.submits[2][1] == (b.job_id,)
        up = explode("too big")
        down = double(up)
        with pytest.raises(DependencyError, match="explode") as e:
            get(down, timeout=30)
        assert isinstance(e.value.__cause__, OverflowError)
        with pytest.raises(OverflowError):
            get(up)


def test_a_failed_upstream_leaves_no_dependent_job_behind(fake):
    """Where the scheduler keeps dependents of a failed job queued forever, we cancel them."""
    provider, sched, s = fake(keep_orphans=True)
    with s.context("fake"):
        up = explode("diverged")
        down = double(up)
        downer = double(down)
        while downer.job_id is None:  # all three submitted: down and downer queued behind up
            time.sleep(0.05)
        with pytest.raises(DependencyError, match="explode"):
            get(down, timeout=30)
        with pytest.raises(DependencyError, match="double"):
            get(downer, timeout=30)
        assert sorted(sched.cancelled) == sorted([down.job_id, downer.job_id])
        assert {sched.states[down.job_id], sched.states[downer.job_id]} == {"CANCELLED"}
        # a cancelled upstream: the same for what waits on it
        slow = distribute_task(lambda t: time.sleep(t) or t)
        first = slow(30)
        after = double(first)
        while after.job_id is None:  # submitted (after the array linger)
            time.sleep(0.05)
        assert first.cancel()
        with pytest.raises(DependencyError):
            get(after, timeout=30)
        assert after.job_id in sched.cancelled


def test_job_lost_without_result_reports_scheduler_state(fake):
    provider, sched, s = fake({"result_grace": 0.2}, lose={"lost"})
    with s.context("fake"):
        with pytest.raises(WorkerDiedError, match="NODE_FAIL.*node it ran on failed"):
            get(lost(), timeout=30)


def test_refused_submission_fails_the_task_with_the_reason(fake):
    provider, sched, s = fake(refuse=True)
    with s.context("fake"):
        ref = double(1)
        with pytest.raises(SchedulerError, match="invalid account"):
            get(ref, timeout=10)
        assert ref.status() == "FAILED"


def test_polling_is_batched_and_rate_bounded(fake):
    provider, sched, s = fake()
    with s.context("fake"):
        slow = distribute_task(lambda t: time.sleep(t) or t)
        refs = [slow(0.6) for _ in range(6)]
        t0 = time.monotonic()
        get(refs, timeout=30)
        elapsed = time.monotonic() - t0
    # one poll covers all open jobs; never more often than poll_interval
    gaps = [b - a for a, b in zip(sched.poll_times, sched.poll_times[1:])]
    assert all(g >= 0.045 for g in gaps), gaps
    assert len(sched.poll_times) <= elapsed / 0.05 + 2


@pytest.mark.parametrize("scheduler_state,status,state", [
    ("TIMEOUT", "FAILED", "TIMEOUT"),          # the scheduler's reason, not "killed by signal 15"
    ("OUT_OF_MEMORY", "FAILED", "OUT_OF_MEMORY"),
    ("CANCELLED", "STOPPED", "CANCELLED"),     # scancel from outside job.stop()
    ("RUNNING", "RUNNING", "RUNNING"),         # killed, but not ended by the scheduler yet: not final
    ("COMPLETED", "FAILED", "FAILED"),         # nothing better known: the runner's record stands
])
def test_program_killed_by_a_signal_reads_the_schedulers_reason(fake, scheduler_state, status, state):
    """Issue 17 item 8: a program whose runner recorded "killed by signal 15" reads as the
    scheduler says (TIMEOUT at its time limit), once the scheduler has ended the job."""
    import json

    from hpc_serverless.engines.programs_batch import BatchJobs

    provider, sched, _s = fake()
    jobs = BatchJobs(provider)
    job_dir = provider.site.storage_path / "programs" / "cluster-20261124-120000-abcdef"
    job_dir.mkdir(parents=True)
    (job_dir / "record.json").write_text(json.dumps({"job_id": job_dir.name, "title": "t",
                                                      "scheduler_job_id": "77"}))
    (job_dir / "exit.json").write_text(json.dumps({
        "status": "FAILED", "state": "FAILED", "exit_code": -15, "ended": time.time(),
        "reason": "killed by signal 15 (SIGTERM from the scheduler: its time limit, a preemption, or a cancel)"}))
    sched.states["77"] = scheduler_state
    info = jobs.job_info(job_dir.name)
    assert (info["status"], info["state"]) == (status, state), info
    if state == "TIMEOUT":
        from hpc_serverless.programs import why_it_ended

        assert "time limit" in info["reason"] and "signal 15" not in info["reason"]
        assert why_it_ended(info).startswith("TIMEOUT: it ran past its time limit")  # job.result()'s and the CLI's words
