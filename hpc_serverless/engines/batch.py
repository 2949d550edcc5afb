"""Tasks as batch jobs: the part that is the same for every scheduler.

A batch provider is a composition: a :class:`~hpc_serverless.config.site.Site`, a transport
(commands on this login node; a mock in tests), an object store on the site's shared
filesystem, and a
:class:`Scheduler` (Slurm, PBS) that knows how to submit, poll and cancel.

:class:`BatchBackend` is the engine behind TaskRefs of such a provider. One thread per
provider does all scheduler traffic, so the scheduler sees a bounded rate whatever the
user does:

* submission: calls made less than ``array_linger`` seconds apart with the same target
  become one job array (split at the site's MaxArraySize; at most MAX_LINGER_S held); a task whose
  arguments hold TaskRefs is submitted with an ``afterok`` dependency on their jobs;
* status: one command per poll for all of the provider's unfinished jobs, at
  ``poll_interval``, backing off to ``max_poll_interval`` while nothing changes. The store
  is read only for the tasks that command reports finished (or missing), so a poll costs
  one command plus one read per task that ended, whatever the number of pending tasks.
  A task is finished when its result object is in the store; the scheduler's word is
  needed only for tasks that ended without one (time limit, out of memory, cancelled,
  node failure). A job missing from the scheduler's list is asked about again
  (:meth:`Scheduler.confirm_gone`: squeue beside sacct) before it counts as gone, and a
  job that ended without a visible result gets the site's ``result_grace`` (shared
  filesystems publish files late) before it is judged by the scheduler's state;
* waiting: ``wait()`` and ``result()`` sleep on a condition the engine notifies when a task
  settles; they read the store only to hand out a result, or for refs of other processes
  (no job of ours to poll: re-read at most once per ``poll_interval``). No store I/O
  happens under the engine's lock.

A judged failure (no result object) is not final until the user has seen it: while nobody
has called ``result()`` or ``status()`` on the task, a result object that shows up later
settles it as the result says. Settled tasks leave the engine once their result was handed
out or their TaskRef is gone (a later ``get`` on a live ref reads the store again); the
failures of forgotten tasks that left no result object are kept, compactly, for refs that
come back (an agent's client, a dependent).
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from hpc_serverless.adapters.schedulers.base import Scheduler
from hpc_serverless.adapters.schedulers.common import JobState
from hpc_serverless.core.deadline import Deadline, split_done
from hpc_serverless.core.errors import (
    DependencyError,
    HPCServerlessError,
    SchedulerError,
    TaskCancelledError,
    TaskTimeoutError,
    WorkerDiedError,
    upstream_failed,
)
from hpc_serverless.core.refs import TaskRef, TaskStatus, register_backend
from hpc_serverless.core.serialization import loads, unpack_exception
from hpc_serverless.core.sessions import session_of
from hpc_serverless.core.store import ObjectStore
from hpc_serverless.core.target import Target
from hpc_serverless.runtime.worker import function_key, result_key, task_key

if TYPE_CHECKING:
    from hpc_serverless.config.site import Site

log = logging.getLogger("hpc_serverless")

#: a loop of calls is gathered into one array while calls keep coming `array_linger`
#: apart, but never held back longer than this
MAX_LINGER_S = 2.0
#: a collected task's job files go this long after its result appeared: the job's own
#: runner (submitit) still writes its result pickle into them just after ours
RELEASE_AFTER_S = 2.0
#: failures of forgotten tasks kept for refs that come back (oldest dropped first)
KEEP_FAILURES = 10_000


class BatchTask:
    """A task as the engine tracks it (a scheduler reads only its ref and name).

    It holds its TaskRef weakly, so a user who drops the ref lets the engine forget the task
    once it is settled; ``ref`` then gives an equal, detached TaskRef."""

    def __init__(self, ref: TaskRef, target: Target, deps: list[str], name: str,
                 job_id: str | None = None, *, foreign: bool = False) -> None:
        self.task_id = ref.task_id
        self._ref = weakref.ref(ref)
        self._ref_args = (ref.backend_key, ref.provider, ref.function)
        self.target, self.deps, self.name, self.job_id = target, deps, name, job_id
        self.state: JobState | None = None
        self.status: str = TaskStatus.PENDING
        self.error: BaseException | None = None    # a failure known without a result object
        self.result_ok: bool | None = None         # set once the result object is seen
        self.failure: BaseException | None = None  # the task's own exception, once read
        self.final_seen: float | None = None       # when the scheduler first called it finished
        self.submitted = time.time()
        self.foreign = foreign      # a ref of another process: found from its result object
        self.next_read = 0.0        # (foreign) when its result object may be read again
        self.judged = False         # `error` is our judgement of a job without a result
        self.told = False           # a user has seen `error` (a late result no longer wins)

    @property
    def ref(self) -> TaskRef:
        ref = self._ref()
        if ref is None:
            key, provider, function = self._ref_args
            ref = TaskRef(self.task_id, key, provider, function, job_id=self.job_id)
        return ref

    @property
    def ref_alive(self) -> bool:
        return self._ref() is not None

    @property
    def settled(self) -> bool:
        return self.error is not None or self.result_ok is not None

    @property
    def late_result_may_win(self) -> bool:
        return self.error is not None and self.judged and not self.told

    def __repr__(self) -> str:
        return f"BatchTask({self.name}#{self.task_id}, job {self.job_id}, {self.status})"


class _Outcome:
    """What a read of the store found for one task (made without the lock, applied with it)."""

    __slots__ = ("task", "ok", "failure", "error")

    def __init__(self, task: BatchTask, ok: bool | None, failure: BaseException | None = None,
                 error: BaseException | None = None) -> None:
        self.task, self.ok, self.failure, self.error = task, ok, failure, error


class BatchSite(Protocol):
    """What the engine needs of its provider (providers/batch.py's BatchProvider)."""

    site: Site
    scheduler: Scheduler

    @property
    def store(self) -> ObjectStore: ...

    def log_path_hint(self, job_id: str, task_id: str = "") -> str: ...

    def record_jobs(self, task_id: str, job_ids: list[str]) -> None:
        """Note in the task's session which jobs it submitted (gc asks about them)."""


class BatchBackend:
    """TaskRef backend of one batch provider: queues, submits, polls, collects."""

    def __init__(self, provider: BatchSite) -> None:
        self.provider = provider
        self.site = provider.site
        self.store = provider.store
        self.scheduler = provider.scheduler
        self.key = f"batch:{self.site.name}:{self.store.root}"
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._tasks: dict[str, BatchTask] = {}
        self._failures: dict[str, tuple[BaseException, str, bool, bool]] = {}   # forgotten tasks'
        # failures without a result object: (error, status, judged, told)
        self._queue: list[BatchTask] = []
        self._queued_since: float | None = None   # first call in the queue
        self._last_enqueue = 0.0
        self._thread: threading.Thread | None = None
        self._interval = self.site.poll_interval
        self._next_poll = 0.0
        self._closed = False
        self._functions_written: dict[str, str] = {}   # a client's function key -> its stored key
        self._releasing: list[tuple[float, BatchTask]] = []   # collected, job files still there
        self._array_open: dict[str, int] = {}   # array id -> its tasks not yet collected
        self._job_cache: dict[str, tuple[float, JobState | None]] = {}
        self._next_prune = 0.0
        self._releases_running = 0   # batches taken from _releasing, their files not yet removed
        self.polls = 0
        self._waiting = 0   # callers blocked in result()/wait(): the poll does not back off
        register_backend(self)

    # -- submission side (user threads) ----------------------------------------------------
    def ensure_function(self, fn_key: str, fn_bytes: bytes | None) -> str:
        """The key to put in a call for this function: its content hash, so every process
        and session calling the same code shares one file (stored here the first time)."""
        known = self._functions_written.get(fn_key)
        if known is not None or fn_bytes is None:
            return known or fn_key  # not sent (a new agent): stored under the client's key before
        stored = "h:" + hashlib.sha256(fn_bytes).hexdigest()[:32]
        key = function_key(stored)
        if not self.store.exists(key):
            self.store.put(fn_bytes, key, what="the task function", overwrite=True)
        self._functions_written[fn_key] = stored
        return stored

    def enqueue(self, task: BatchTask) -> None:
        with self._lock:
            self._tasks[task.task_id] = task
            self._queue.append(task)
            self._last_enqueue = time.monotonic()
            if self._queued_since is None:
                self._queued_since = self._last_enqueue
            self._start()
            self._cv.notify_all()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"hpc-serverless-{self.site.name}",
                                            daemon=True)
            self._thread.start()
            atexit.register(self.flush, at_exit=True)

    def flush(self, at_exit: bool = False) -> None:
        """Submit everything queued now (also at exit: fire-and-forget tasks still go out,
        and collected tasks' job files are removed)."""
        with self._lock:
            self._submit_queue()
        if not at_exit:
            return
        until = time.monotonic() + 30.0  # collected tasks' files, and what the engine thread
        while True:                      # is removing now, go before the process ends
            with self._lock:
                now = time.monotonic()
                if (not self._releasing and not self._releases_running) or now >= until:
                    return
                due = []
                if self._releasing and now >= self._releasing[-1][0] + RELEASE_AFTER_S:
                    due = self._take_release_due(now)
                else:
                    later = self._releasing[-1][0] + RELEASE_AFTER_S - now if self._releasing else 0.5
                    self._cv.wait(max(0.01, min(later, until - now)))
                    continue
            self._release(due)

    # -- the engine thread ------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._closed:
            try:
                self._step()
            except Exception:  # noqa: BLE001 - the engine must outlive one bad poll
                log.exception("%s: error in the scheduler thread; going on", self.site.name)
                time.sleep(min(self._interval, 5.0))

    def _step(self) -> None:
        """One turn of the engine: submit what is due, or poll what is due, or sleep. The
        decision is taken under the lock; file and scheduler I/O of a poll happen outside."""
        with self._lock:
            now = time.monotonic()
            if self._queue and self._queued_since is not None and (
                    now - self._last_enqueue >= self.site.array_linger
                    or now - self._queued_since >= MAX_LINGER_S
                    or len(self._queue) >= self.scheduler.max_array_size()):
                self._submit_queue()
                return
            due: list[BatchTask] = []
            if self._releasing and now >= self._releasing[0][0] + RELEASE_AFTER_S:
                due = self._take_release_due(now)
            jobs, reads = self._poll_plan(now) if not due else ({}, [])
            if now < self._next_poll:
                jobs = {}
            if not due and not jobs and not reads:
                if now >= self._next_prune:
                    self._forget_settled()
                    self._next_prune = now + self.site.poll_interval
                waits = []
                if self._releasing:
                    waits.append(self._releasing[0][0] + RELEASE_AFTER_S - now)
                if self._queue and self._queued_since is not None:
                    waits.append(min(self._last_enqueue + self.site.array_linger,
                                     self._queued_since + MAX_LINGER_S) - now)
                wake = self._next_wake()
                if wake is not None:
                    waits.append(wake - now)
                if self._tasks:  # settled tasks whose refs may go meanwhile
                    waits.append(self._next_prune - now)
                self._cv.wait(max(0.01, min(waits)) if waits else None)
                return
        if due:
            self._release(due)
        else:
            self._poll(jobs, reads)

    def _next_wake(self) -> float | None:
        """When the next poll or read of a foreign ref is due (lock held); None: nothing open."""
        wake: float | None = None
        for t in self._tasks.values():
            if t.settled:
                continue
            at = self._next_poll if t.job_id else (t.next_read if t.foreign else None)
            if at is not None and (wake is None or at < wake):
                wake = at
        return wake

    def _submit_queue(self) -> None:
        """Submit queued tasks: arrays by target; dependent tasks one by one (lock held)."""
        queue, self._queue, self._queued_since = self._queue, [], None
        # an array holds calls of one target and one session (its files live in the session)
        groups: dict[tuple[Target, str | None], list[BatchTask]] = {}
        ordered: list[tuple[Target, list[BatchTask]]] = []
        for task in queue:
            if task.settled:
                continue
            if task.deps or not self.site.arrays:  # alone (after its upstream jobs, if any)
                ordered.append((task.target, [task]))
            else:
                group = (task.target, session_of(task.task_id))
                if group not in groups:
                    groups[group] = []
                    ordered.append((task.target, groups[group]))
                groups[group].append(task)
        limit = max(1, self.scheduler.max_array_size())
        for target, tasks in ordered:
            after: list[str] = []
            if tasks[0].deps:
                after, failed = self._upstream_jobs(tasks[0])
                if failed is not None:
                    tasks[0].error, tasks[0].status = failed, TaskStatus.FAILED
                    continue
            for i in range(0, len(tasks), limit):
                self._submit_chunk(tasks[i:i + limit], target, after)
        self._next_poll = min(self._next_poll, time.monotonic() + self.site.poll_interval)
        self._interval = self.site.poll_interval
        self._cv.notify_all()

    def _submit_chunk(self, chunk: list[BatchTask], target: Target, after: list[str]) -> None:
        delay = 1.0
        for attempt in range(6):
            try:
                job_ids = self.scheduler.submit(chunk, target, after)
                break
            except Exception as exc:  # noqa: BLE001 - whatever it is, the tasks must hear of it
                if not isinstance(exc, SchedulerError):
                    log.exception("%s: submission failed", self.site.name)
                    wrapped = SchedulerError(f"submitting to {self.site.name} failed: "
                                             f"{type(exc).__name__}: {exc}")
                    wrapped.__cause__ = exc
                    exc = wrapped
                # (safe: a transient error from the scheduler adapter means it asked for the
                # submission's token and no job had it; see adapters/schedulers/submit_once.py)
                if exc.transient and attempt < 5:
                    log.warning("%s: scheduler busy or down (%s); retrying in %.0f s",
                                self.site.name, exc, delay)
                    self._cv.wait(delay)
                    delay *= 2
                    continue
                for t in chunk:
                    t.error, t.status = exc, TaskStatus.FAILED
                self._cv.notify_all()
                return
        now = time.time()
        for t, job_id in zip(chunk, job_ids, strict=True):
            t.job_id, t.submitted = job_id, now
            t.ref._job_id = job_id
        array = job_ids[0].split("_", 1)[0]
        self._array_open[array] = self._array_open.get(array, 0) + len(chunk)
        try:
            self.provider.record_jobs(chunk[0].ref.task_id, job_ids)
        except OSError as exc:  # gc then judges the session by its heartbeat and age alone
            log.warning("%s: cannot record job %s in its session: %s", self.site.name, array, exc)

    def _upstream_jobs(self, task: BatchTask) -> tuple[list[str], BaseException | None]:
        """Job ids to wait for (afterok), or the failure that makes the task pointless. The
        store is read only for upstreams this engine does not track (rare: a new agent)."""
        after: list[str] = []
        for dep_id in task.deps:
            up = self._tasks.get(dep_id)
            if up is None and dep_id in self._failures:
                up = self._task(TaskRef(dep_id, self.key))
            if up is not None and up.error is not None:
                return [], self._dependency_error(task, up, up.error)
            if up is not None and up.result_ok is not None:
                ok: bool | None = up.result_ok
            elif up is None or up.job_id is None:
                ok = self._result_ok(dep_id)
            else:
                ok = None
            if ok is True:
                continue
            if ok is False:
                return [], self._dependency_error(task, up, up.failure if up else None, dep_id)
            if up is None or up.job_id is None:
                return [], DependencyError(f"{task.name}: upstream task {dep_id} is not known to this "
                                           "process and has no result yet")
            after.append(up.job_id)
        return after, None

    def _dependency_error(self, task: BatchTask, up: BatchTask | None, cause: BaseException | None,
                          dep_id: str = "") -> DependencyError:
        if cause is None:
            cause = self._read_failure(up.task_id if up else dep_id)
        name = f"{up.name}#{up.task_id}" if up else dep_id
        return upstream_failed(name, cause, downstream=task.name)

    def _read_failure(self, task_id: str) -> BaseException | None:
        """The exception a failed task stored as its result (None if it stored a value)."""
        try:
            ok, payload, _ = self.store.get(result_key(task_id))
            return unpack_exception(payload) if not ok else None
        except HPCServerlessError as exc:
            return exc

    def _settle(self, t: BatchTask, ok: bool, failure: BaseException | None = None) -> None:
        """Its result object is there (lock held): the result wins over a judgement made
        without it. A failure also settles the tasks waiting on it."""
        first = t.result_ok is None
        if t.error is not None and t.judged:  # a late result: what it says stands
            log.info("%s: task %s stored its result after it was judged failed (%s); the result stands",
                     self.site.name, t.name, t.state.state if t.state else "?")
            t.error, t.judged = None, False
        t.result_ok = ok
        t.status = TaskStatus.SUCCEEDED if ok else TaskStatus.FAILED
        if failure is not None:
            t.failure = failure
        if first and t.job_id and not t.foreign:  # ours: its job files go (a foreign or forgotten
            self._releasing.append((time.monotonic(), t))  # task's: with its session, by gc)
        if not ok and first:
            self._fail_dependents(t)
        self._cv.notify_all()

    def _judge(self, t: BatchTask, error: BaseException, status: str) -> None:
        """The job ended without a result object, past the grace (lock held)."""
        t.error, t.status, t.judged, t.told = error, status, True, False
        self._fail_dependents(t)
        self._cv.notify_all()

    def _take_release_due(self, now: float) -> list[BatchTask]:
        """Collected tasks whose job files may go now (lock held)."""
        due = [t for when, t in self._releasing if now >= when + RELEASE_AFTER_S]
        self._releasing = [(w, t) for w, t in self._releasing if now < w + RELEASE_AFTER_S]
        if due:
            self._releases_running += 1  # until _release(due) is through
        return due

    def _release(self, due: list[BatchTask]) -> None:
        """Remove what collected tasks no longer need on the site (without the lock): the call
        and submitit's files, so a task leaves its result and its log. An array's script goes
        with its last element."""
        if not due:
            return
        try:
            self._release_files(due)
        finally:
            with self._lock:
                self._releases_running -= 1
                self._cv.notify_all()

    def _release_files(self, due: list[BatchTask]) -> None:
        for t in due:
            job_id = t.job_id or ""
            array = job_id.split("_", 1)[0]
            with self._lock:
                left = self._array_open.get(array, 1) - 1
                if left <= 0:
                    self._array_open.pop(array, None)
                else:
                    self._array_open[array] = left
            jobs = [job_id] + ([array] if left <= 0 and array != job_id else [])
            try:
                self.store.delete(task_key(t.task_id))
                self.scheduler.release(t.task_id, jobs)
            except (OSError, HPCServerlessError) as exc:  # gc takes them with the session
                log.info("%s: cannot remove the files of job %s: %s", self.site.name, job_id, exc)

    def _fail_dependents(self, t: BatchTask) -> None:
        """`t` failed or was stopped: fail every task waiting on it, directly or not, and
        cancel their jobs (lock held). Slurm's kill-on-invalid-dep and PBS Pro remove such
        jobs themselves, but not every scheduler or wrapper does (Torque's wrapper leaves
        them queued forever as DependencyNeverSatisfied), so we never rely on it."""
        waiting = [o for o in self._tasks.values() if o.deps and not o.settled]
        if not waiting:
            return
        failed, to_cancel = [t], []
        while failed:
            up = failed.pop()
            for other in waiting:
                if up.task_id in other.deps and not other.settled:
                    cause = up.error if up.result_ok is None else up.failure
                    other.error = self._dependency_error(other, up, cause)
                    other.status = TaskStatus.FAILED
                    if other in self._queue:
                        self._queue.remove(other)
                    elif other.job_id:
                        to_cancel.append(other.job_id)
                    failed.append(other)
        if to_cancel:
            try:
                self.scheduler.cancel(to_cancel)
            except HPCServerlessError as exc:  # gone already (removed by the scheduler) is fine
                log.info("%s: cancelling dependents %s of failed task %s: %s",
                         self.site.name, to_cancel, t.name, exc)

    # -- forgetting settled tasks -------------------------------------------------------------
    def _forget(self, t: BatchTask) -> None:
        """Drop a settled task (lock held); a failure without a result object is kept."""
        if self._tasks.get(t.task_id) is t:
            del self._tasks[t.task_id]
        if t.error is not None and t.result_ok is None:
            self._failures[t.task_id] = (t.error, t.status, t.judged, t.told)
            while len(self._failures) > KEEP_FAILURES:
                del self._failures[next(iter(self._failures))]

    def _forget_settled(self) -> None:
        """Forget settled tasks whose TaskRef is gone (lock held), and refs of other processes
        nobody holds any more that we could only have read the store for (no job to poll)."""
        gone = [t for t in self._tasks.values()
                if not t.ref_alive and t not in self._queue and (t.settled or (t.foreign and not t.job_id))]
        for t in gone:
            self._forget(t)

    # -- reading the store (never under the lock) -------------------------------------------------
    def _result_ok(self, task_id: str) -> bool | None:
        header = self.store.header(result_key(task_id))
        if header is None:
            return None
        return bool(header.get("meta", {}).get("ok"))

    def _read(self, t: BatchTask, *, judge_after: float | None = None) -> _Outcome:
        """Look for `t`'s result object. `judge_after`: the job ended at that time (monotonic);
        past the grace without a result, the outcome carries the error to record."""
        ok = self._result_ok(t.task_id)
        if ok is None and judge_after is not None and time.monotonic() - judge_after >= self.site.result_grace:
            self.store.exists(result_key(t.task_id))  # refresh directory caches (NFS), then look again
            ok = self._result_ok(t.task_id)
            if ok is None and t.state is not None:
                return _Outcome(t, None, error=self._error_from_state(t, t.state))
        return _Outcome(t, ok, failure=self._read_failure(t.task_id) if ok is False else None)

    def _apply(self, outcomes: list[_Outcome]) -> bool:
        """Apply reads made without the lock (lock held); True if a task settled."""
        changed = False
        for o in outcomes:
            t = o.task
            if o.ok is not None and (not t.settled or t.late_result_may_win):
                self._settle(t, o.ok, o.failure)
                changed = True
            elif o.error is not None and not t.settled and t.state is not None:
                self._judge(t, o.error, TaskStatus.STOPPED if t.state.status == TaskStatus.STOPPED
                            else TaskStatus.FAILED)
                changed = True
        return changed

    def _refresh(self, tasks: Sequence[BatchTask]) -> None:
        """Read the result objects of these tasks (refs of other processes, or a failure about
        to be told), then apply what was found."""
        if not tasks:
            return
        now = time.monotonic()
        for t in tasks:
            t.next_read = now + self.site.poll_interval
        outcomes = [self._read(t) for t in tasks]
        with self._lock:
            if self._apply(outcomes):
                self._cv.notify_all()

    # -- polling ---------------------------------------------------------------------------------
    def _poll_plan(self, now: float) -> tuple[dict[str, list[BatchTask]], list[BatchTask]]:
        """What the next poll asks about (lock held): unfinished jobs by id, and refs of other
        processes without a job id whose result object is due a read."""
        jobs: dict[str, list[BatchTask]] = {}
        reads: list[BatchTask] = []
        for t in self._tasks.values():
            if t.settled:
                continue
            if t.job_id:
                jobs.setdefault(t.job_id, []).append(t)
            elif t.foreign and now >= t.next_read:
                reads.append(t)
        return jobs, reads

    def _poll(self, jobs: dict[str, list[BatchTask]], reads: list[BatchTask]) -> None:
        """One scheduler command for all unfinished jobs; a second opinion on jobs it does not
        list; then the store, only for tasks reported finished (all without the lock)."""
        states: dict[str, JobState] | None = None
        if jobs:
            try:
                self.polls += 1
                states = self.scheduler.poll(list(jobs))
            except SchedulerError as exc:
                log.warning("%s: cannot read job states (%s); retrying in %.0f s",
                            self.site.name, exc, self._interval)
        now = time.monotonic()
        finished: list[BatchTask] = list(reads)
        suspects: list[BatchTask] = []
        changed = False
        with self._lock:
            for job_id, tasks in jobs.items() if states is not None else ():
                for t in tasks:
                    verdict, moved = self._note_state(t, states.get(job_id) if states else None, now)
                    changed |= moved
                    if verdict == "finished":
                        finished.append(t)
                    elif verdict == "suspect":
                        suspects.append(t)
        if suspects:
            finished += self._cross_check(suspects, now)
        for t in reads:
            t.next_read = now + self.site.poll_interval
        outcomes = [self._read(t, judge_after=t.final_seen) for t in finished]
        with self._lock:
            changed |= self._apply(outcomes)
            unsettled_ended = any(not t.settled for t in finished)
            # while someone waits for a result, polls stay at poll_interval: the backoff is for
            # tasks nobody is blocked on (fire-and-forget, a notebook between cells)
            ceiling = self.site.poll_interval if self._waiting else self.site.max_poll_interval
            self._interval = self.site.poll_interval if changed else min(self._interval * 1.5, ceiling)
            self._next_poll = time.monotonic() + self._interval
            if unsettled_ended:  # ended without a result yet: look again within the grace
                self._next_poll = min(self._next_poll, time.monotonic() + max(
                    0.05, min(self.site.poll_interval, self.site.result_grace / 2)))
            self._forget_settled()
            if changed:
                self._cv.notify_all()

    def _note_state(self, t: BatchTask, st: JobState | None, now: float) -> tuple[str, bool]:
        """Record what the scheduler said of `t`'s job (lock held, no I/O). The verdict:
        "open", "finished" (read its result) or "suspect" (not listed: ask again)."""
        if t.settled:  # settled meanwhile (an upstream failed earlier in this poll)
            return "open", False
        before = (t.status, t.state)
        if st is None:
            if t.state is not None and t.state.state == "VANISHED":
                return "finished", False
            if time.time() - t.submitted < 2 * self.site.poll_interval + self.site.result_grace:
                return "open", False  # a brand-new job may not be listed yet
            return "suspect", False
        if not st.reason and t.state is not None and t.state.state == st.state and t.state.reason:
            st = dataclasses.replace(st, reason=t.state.reason)  # lagging accounting says "None": keep why
        t.state = st
        if st.final:
            t.final_seen = t.final_seen or now
            return "finished", (t.status, t.state) != before
        t.status = st.status
        return "open", (t.status, t.state) != before

    def _cross_check(self, suspects: list[BatchTask], now: float) -> list[BatchTask]:
        """Jobs the poll did not list, asked about the other way (without the lock). Those the
        scheduler still knows take the state it gives; the rest are VANISHED and, like any job
        that ended, judged by their result object after the grace. Returns the ended ones."""
        ids = sorted({t.job_id for t in suspects if t.job_id})
        try:
            found = self.scheduler.confirm_gone(ids)
        except SchedulerError as exc:  # no second opinion now: judge nothing, ask next poll
            log.warning("%s: cannot cross-check jobs %s (%s)", self.site.name, ids[:5], exc)
            return []
        ended = []
        with self._lock:
            for t in suspects:
                st = found.get(t.job_id or "")
                if st is None:
                    log.info("%s: job %s is listed neither by the scheduler nor its accounting",
                             self.site.name, t.job_id)
                    st = JobState(t.job_id or "", "VANISHED", TaskStatus.FAILED,
                                  "the job left the queue without a result")
                if self._note_state(t, st, now)[0] == "finished":
                    ended.append(t)
        return ended

    def _error_from_state(self, t: BatchTask, st: JobState) -> BaseException:
        """The error of a job that ended without a result object (reads the store: no lock)."""
        for dep_id in t.deps:
            up = self._tasks.get(dep_id)
            if (up is not None and (up.error is not None or up.result_ok is False)) or \
                    self._result_ok(dep_id) is False:
                return self._dependency_error(t, up, (up.error or up.failure) if up else None, dep_id)
        from hpc_serverless.adapters.schedulers.slurm import FAILURE_TEXT

        why = FAILURE_TEXT.get(st.state, st.reason or st.state.lower())
        where = f"{self.scheduler.name} job {t.job_id}"
        detail = f"{where} ended {st.state}" + (f" ({st.reason})" if st.reason else "") + f": {why}"
        note = self._note(t.task_id)
        if note:
            detail += f"; {note}"
        if st.state == "TIMEOUT":
            return TaskTimeoutError(f"task {t.name}: {detail}")
        if st.state in ("CANCELLED", "REVOKED"):
            return TaskCancelledError(f"task {t.name}: {detail}")
        return WorkerDiedError(f"task {t.name}: {detail}, without storing a result. Its log: "
                               f"{self.provider.log_path_hint(t.job_id or '', t.task_id)}")

    def _note(self, task_id: str) -> str | None:
        """What the worker left for us about its job (a failed requeue), if anything."""
        from hpc_serverless.runtime.worker import note_key

        try:
            key = note_key(task_id)
            return str(self.store.get(key)) if self.store.exists(key) else None
        except HPCServerlessError:  # a note is a courtesy; the error stands without it
            return None

    def job_states(self, job_ids: Sequence[str]) -> dict[str, JobState | None]:
        """States of program jobs, from a cache no older than poll_interval: however often
        job.status() is called, the scheduler sees at most one command per interval, and
        that command also covers every open task of the provider (`hpc-serverless jobs`
        asks for all the jobs it lists at once)."""
        now = time.monotonic()
        with self._lock:
            stale = [j for j in job_ids
                     if j not in self._job_cache or now - self._job_cache[j][0] >= self.site.poll_interval]
            if stale:
                active = [t for t in self._tasks.values() if t.job_id and not t.settled]
                ids = list(dict.fromkeys([*stale, *(t.job_id for t in active if t.job_id)]))
                self.polls += 1
                try:
                    states = self.scheduler.poll(ids)
                except HPCServerlessError as exc:  # a status query is safe to ask again, once
                    if not exc.transient:
                        raise
                    states = self.scheduler.poll(ids)
                for j in stale:
                    self._job_cache[j] = (now, states.get(j))
                for t in active:  # news for the engine thread, which reads results
                    if self._note_state(t, states.get(t.job_id or ""), now)[0] != "open":
                        self._next_poll = now
                self._cv.notify_all()
            return {j: self._job_cache[j][1] for j in job_ids}

    # -- TaskBackend ----------------------------------------------------------------------------
    def _task(self, ref: TaskRef) -> BatchTask:
        """The engine's record of `ref` (lock held): a task it does not track (another
        process's, or forgotten) is tracked again from its job id and result object."""
        t = self._tasks.get(ref.task_id)
        if t is None:
            t = BatchTask(ref, Target(), [], ref.function or "task", job_id=ref._job_id, foreign=True)
            known = self._failures.get(ref.task_id)
            if known is not None:
                t.error, t.status, t.judged, t.told = known
            self._tasks[ref.task_id] = t
        return t

    def _due_reads(self, tasks: Sequence[BatchTask]) -> list[BatchTask]:
        """Of these, the ones whose result object should be read now (lock held): refs of
        other processes, at most once per poll_interval each."""
        now = time.monotonic()
        return [t for t in tasks if t.foreign and not t.settled and now >= t.next_read]

    def task_status(self, ref: TaskRef) -> str:
        with self._lock:
            t = self._task(ref)
            reads = self._due_reads([t]) or ([t] if t.late_result_may_win else [])
        self._refresh(reads)  # a late result still wins, up to the moment the user is told
        with self._lock:
            if t.error is not None:
                t.told = True
            return t.status

    def task_info(self, ref: TaskRef) -> dict[str, Any]:
        with self._lock:
            t = self._task(ref)
            if t in self._queue:
                self._submit_queue()
        status = self.task_status(ref)
        with self._lock:
            st = t.state
            return {"status": status, "state": st.state if st else ("QUEUED" if not t.job_id else "SUBMITTED"),
                    "reason": (st.reason if st else "") or (str(t.error) if t.error else ""),
                    "job_id": t.job_id, "nodes": st.nodes if st else "",
                    "exit_code": st.exit_code if st else ""}

    def task_cancel(self, ref: TaskRef) -> bool:
        with self._lock:
            t = self._task(ref)
            if t.settled:
                return False
            if t in self._queue:
                self._queue.remove(t)
            elif t.job_id:
                self.scheduler.cancel([t.job_id])
            t.error = TaskCancelledError(f"task {t.name} was cancelled")
            t.status, t.told = TaskStatus.STOPPED, True
            self._fail_dependents(t)
            self._cv.notify_all()
            return True

    def task_result(self, ref: TaskRef, timeout: float | None) -> Any:
        with self._lock:
            self._begin_wait()
        try:
            return self._result(ref, Deadline(timeout))
        finally:
            with self._lock:
                self._waiting -= 1

    def _result(self, ref: TaskRef, deadline: Deadline) -> Any:
        while True:
            with self._lock:
                t = self._task(ref)
                reads = self._due_reads([t]) or ([t] if t.late_result_may_win else [])
            self._refresh(reads)
            with self._lock:
                if t.result_ok is not None:
                    break
                if t.error is not None:
                    t.told = True
                    raise t.error
                if deadline.expired():
                    raise deadline.error(repr(ref), t.status + (f", {t.state.state} {t.state.reason}"
                                                                if t.state else ""))
                if t in self._queue or t.job_id:
                    self._start()
                self._cv.wait(deadline.cap(self._wake_in([t])))
        ok, payload, _info = self.store.get(result_key(ref.task_id))
        with self._lock:
            if t.result_ok is None or t.result_ok != ok:  # (rewritten meanwhile: a requeued task)
                self._settle(t, ok)
            self._forget(t)  # handed out: a later get reads the store again
        if ok:
            return loads(payload)
        raise unpack_exception(payload)

    def _begin_wait(self) -> None:
        """A caller blocks on results (lock held): bring a backed-off poll forward."""
        self._waiting += 1
        soon = time.monotonic() + self.site.poll_interval
        if self._next_poll > soon:
            self._next_poll = soon
            self._interval = self.site.poll_interval
            self._cv.notify_all()

    def _wake_in(self, tasks: Sequence[BatchTask]) -> float:
        """How long a waiter may sleep (lock held): until the next read of a foreign ref is
        due; else a while (a settle notifies it at once)."""
        due = [t.next_read for t in tasks if t.foreign and not t.settled]
        return max(0.01, min(due) - time.monotonic()) if due else 5.0

    def task_wait(self, refs: Sequence[TaskRef], num_returns: int,
                  timeout: float | None) -> tuple[list[TaskRef], list[TaskRef]]:
        deadline = Deadline(timeout)
        with self._lock:
            tasks = [self._task(r) for r in refs]
            self._begin_wait()
        try:
            return self._wait(refs, tasks, num_returns, deadline)
        finally:
            with self._lock:
                self._waiting -= 1

    def _wait(self, refs: Sequence[TaskRef], tasks: list[BatchTask], num_returns: int,
              deadline: Deadline) -> tuple[list[TaskRef], list[TaskRef]]:
        while True:
            with self._lock:
                reads = self._due_reads(tasks)
            self._refresh(reads)
            with self._lock:
                done = {t.task_id for t in tasks if t.settled}
                if len(done) >= num_returns or deadline.expired():
                    return split_done(refs, done)
                if any(t in self._queue or (t.job_id and not t.settled) for t in tasks):
                    self._start()
                self._cv.wait(deadline.cap(self._wake_in(tasks)))

    def close(self) -> None:
        self._closed = True
        with self._lock:
            self._cv.notify_all()
