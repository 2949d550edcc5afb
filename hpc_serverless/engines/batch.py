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
  ``poll_interval``, backing off to ``max_poll_interval`` while nothing changes.
  A task is finished when its result object is in the store; the scheduler's word is
  needed only for tasks that ended without one (time limit, out of memory, cancelled,
  node failure), and a job that vanished from the queue is judged by its result file.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
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

#: how long a job the scheduler calls finished may go without its result file appearing
#: before we judge it by the scheduler's state (shared filesystems publish files late)
RESULT_GRACE_S = 5.0
#: a loop of calls is gathered into one array while calls keep coming `array_linger`
#: apart, but never held back longer than this
MAX_LINGER_S = 2.0
#: a collected task's job files go this long after its result appeared: the job's own
#: runner (submitit) still writes its result pickle into them just after ours
RELEASE_AFTER_S = 2.0


@dataclass(eq=False)
class BatchTask:
    """A task as the engine tracks it (a scheduler reads only its ref and name)."""

    ref: TaskRef
    target: Target
    deps: list[str]
    name: str
    job_id: str | None = None
    state: JobState | None = None
    status: str = TaskStatus.PENDING
    error: BaseException | None = None   # a failure known without a result object
    result_ok: bool | None = None        # set once the result object is seen
    final_seen: float | None = None      # when the scheduler first called it finished
    submitted: float = field(default_factory=time.time)

    @property
    def settled(self) -> bool:
        return self.error is not None or self.result_ok is not None


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
        self.polls = 0
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
            self._tasks[task.ref.task_id] = task
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
            if at_exit and self._releasing:
                self._cv.wait(max(0.0, self._releasing[-1][0] + RELEASE_AFTER_S - time.monotonic()))
                self._release_due(time.monotonic())

    # -- the engine thread ------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._closed:
            try:
                self._step()
            except Exception:  # noqa: BLE001 - the engine must outlive one bad poll
                log.exception("%s: error in the scheduler thread; going on", self.site.name)
                time.sleep(min(self._interval, 5.0))

    def _step(self) -> None:
        """One turn of the engine: submit what is due, or poll what is due, or sleep."""
        with self._lock:
            now = time.monotonic()
            if self._queue and self._queued_since is not None and (
                    now - self._last_enqueue >= self.site.array_linger
                    or now - self._queued_since >= MAX_LINGER_S
                    or len(self._queue) >= self.scheduler.max_array_size()):
                self._submit_queue()
                return
            if self._releasing and now >= self._releasing[0][0] + RELEASE_AFTER_S:
                self._release_due(now)
                return
            active = [t for t in self._tasks.values() if t.job_id and not t.settled]
            if active and now >= self._next_poll:
                self._poll(active)
                return
            waits = []
            if self._releasing:
                waits.append(self._releasing[0][0] + RELEASE_AFTER_S - now)
            if self._queue and self._queued_since is not None:
                waits.append(min(self._last_enqueue + self.site.array_linger,
                                 self._queued_since + MAX_LINGER_S) - now)
            if active:
                waits.append(self._next_poll - now)
            self._cv.wait(max(0.01, min(waits)) if waits else None)

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
                group = (task.target, session_of(task.ref.task_id))
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
        """Job ids to wait for (afterok), or the failure that makes the task pointless."""
        after: list[str] = []
        for dep_id in task.deps:
            up = self._tasks.get(dep_id)
            ok = self._result_ok(dep_id) if up is None or up.result_ok is None else up.result_ok
            if up is not None and up.error is not None:
                return [], self._dependency_error(task, up, up.error)
            if ok is True:
                continue
            if ok is False:
                return [], self._dependency_error(task, up, None, dep_id)
            if up is None or up.job_id is None:
                return [], DependencyError(f"{task.name}: upstream task {dep_id} is not known to this "
                                           "process and has no result yet")
            after.append(up.job_id)
        return after, None

    def _dependency_error(self, task: BatchTask, up: BatchTask | None, cause: BaseException | None,
                          dep_id: str = "") -> DependencyError:
        if cause is None:
            try:
                ok, payload, _ = self.store.get(result_key(up.ref.task_id if up else dep_id))
                cause = unpack_exception(payload) if not ok else None
            except HPCServerlessError as exc:
                cause = exc
        name = f"{up.name}#{up.ref.task_id}" if up else dep_id
        return upstream_failed(name, cause, downstream=task.name)

    def _settle(self, t: BatchTask, ok: bool) -> None:
        """Its result object is there. A failure also settles the tasks waiting on it."""
        first = t.result_ok is None
        t.result_ok = ok
        t.status = TaskStatus.SUCCEEDED if ok else TaskStatus.FAILED
        if first and t.job_id:
            self._releasing.append((time.monotonic(), t))
            self._cv.notify_all()
        if not ok:
            self._fail_dependents(t)

    def _release_due(self, now: float) -> None:
        """Remove what collected tasks no longer need on the site (lock held): the call and
        submitit's files, so a task leaves its result and its log. An array's script goes
        with its last element."""
        due = [t for when, t in self._releasing if now >= when + RELEASE_AFTER_S]
        self._releasing = [(w, t) for w, t in self._releasing if now < w + RELEASE_AFTER_S]
        for t in due:
            job_id = t.job_id or ""
            array = job_id.split("_", 1)[0]
            left = self._array_open.get(array, 1) - 1
            jobs = [job_id] + ([array] if left <= 0 and array != job_id else [])
            if left <= 0:
                self._array_open.pop(array, None)
            else:
                self._array_open[array] = left
            try:
                self.store.delete(task_key(t.ref.task_id))
                self.scheduler.release(t.ref.task_id, jobs)
            except (OSError, HPCServerlessError) as exc:  # gc takes them with the session
                log.info("%s: cannot remove the files of job %s: %s", self.site.name, job_id, exc)

    def _fail_dependents(self, t: BatchTask) -> None:
        """`t` failed or was stopped: fail every task waiting on it, directly or not, and
        cancel their jobs (lock held). Slurm's kill-on-invalid-dep and PBS Pro remove such
        jobs themselves, but not every scheduler or wrapper does (Torque's wrapper leaves
        them queued forever as DependencyNeverSatisfied), so we never rely on it."""
        failed, to_cancel = [t], []
        while failed:
            up = failed.pop()
            for other in self._tasks.values():
                if up.ref.task_id in other.deps and not other.settled:
                    cause = up.error if up.result_ok is None else None
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

    def _result_ok(self, task_id: str) -> bool | None:
        header = self.store.header(result_key(task_id))
        if header is None:
            return None
        return bool(header.get("meta", {}).get("ok"))

    def _poll(self, active: list[BatchTask]) -> None:
        """One look at the store, then one scheduler command for what is still open."""
        changed = False
        open_tasks = []
        for t in active:
            ok = self._result_ok(t.ref.task_id)
            if ok is None:
                open_tasks.append(t)
            else:
                self._settle(t, ok)
                changed = True
        if open_tasks:
            try:
                self.polls += 1
                states = self.scheduler.poll([t.job_id for t in open_tasks if t.job_id])
            except SchedulerError as exc:
                log.warning("%s: cannot read job states (%s); retrying in %.0f s",
                            self.site.name, exc, self._interval)
                states = None
            now = time.monotonic()
            for t in open_tasks:
                if states is not None:
                    changed |= self._apply_state(t, states.get(t.job_id or ""), now)
        self._interval = self.site.poll_interval if changed else min(
            self._interval * 1.5, self.site.max_poll_interval)
        self._next_poll = time.monotonic() + self._interval
        if changed:
            self._cv.notify_all()

    def _apply_state(self, t: BatchTask, st: JobState | None, now: float) -> bool:
        if t.settled:  # settled meanwhile (an upstream failed earlier in this poll)
            return True
        before = (t.status, t.state)
        if st is None:  # vanished from the queue (no accounting): the result file decides
            if time.time() - t.submitted < 2 * self.site.poll_interval + RESULT_GRACE_S:
                return False  # a brand-new job may not be listed yet
            st = JobState(t.job_id or "", "VANISHED", TaskStatus.FAILED,
                          "the job left the queue without a result")
        t.state = st
        if st.final:
            t.final_seen = t.final_seen or now
            if now - t.final_seen >= RESULT_GRACE_S:
                self.store.exists(result_key(t.ref.task_id))  # refresh directory caches
                ok = self._result_ok(t.ref.task_id)
                if ok is not None:
                    self._settle(t, ok)
                else:
                    t.error = self._error_from_state(t, st)
                    t.status = TaskStatus.STOPPED if st.status == TaskStatus.STOPPED else TaskStatus.FAILED
                    self._fail_dependents(t)
            else:
                self._next_poll = min(self._next_poll, now + RESULT_GRACE_S)
        else:
            t.status = st.status
        return (t.status, t.state) != before

    def _error_from_state(self, t: BatchTask, st: JobState) -> BaseException:
        for dep_id in t.deps:
            up = self._tasks.get(dep_id)
            if (up is not None and (up.error is not None or up.result_ok is False)) or \
                    self._result_ok(dep_id) is False:
                return self._dependency_error(t, up, up.error if up else None, dep_id)
        from hpc_serverless.adapters.schedulers.slurm import FAILURE_TEXT

        why = FAILURE_TEXT.get(st.state, st.reason or st.state.lower())
        where = f"{self.scheduler.name} job {t.job_id}"
        detail = f"{where} ended {st.state}" + (f" ({st.reason})" if st.reason else "") + f": {why}"
        note = self._note(t.ref.task_id)
        if note:
            detail += f"; {note}"
        if st.state == "TIMEOUT":
            return TaskTimeoutError(f"task {t.name}: {detail}")
        if st.state in ("CANCELLED", "REVOKED"):
            return TaskCancelledError(f"task {t.name}: {detail}")
        return WorkerDiedError(f"task {t.name}: {detail}, without storing a result. Its log: "
                               f"{self.provider.log_path_hint(t.job_id or '', t.ref.task_id)}")

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
        that command also covers every open task of the provider."""
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
                for t in active:
                    self._apply_state(t, states.get(t.job_id or ""), now)
                self._cv.notify_all()
            return {j: self._job_cache[j][1] for j in job_ids}

    # -- TaskBackend ----------------------------------------------------------------------------
    def _task(self, ref: TaskRef) -> BatchTask:
        t = self._tasks.get(ref.task_id)
        if t is None:  # a ref from another process: track it from its result object
            t = BatchTask(ref, Target(), [], ref.function or "task", job_id=ref._job_id)
            self._tasks[ref.task_id] = t
        return t

    def task_status(self, ref: TaskRef) -> str:
        with self._lock:
            t = self._task(ref)
            if not t.settled:
                ok = self._result_ok(ref.task_id)
                if ok is not None:
                    self._settle(t, ok)
            return t.status

    def task_info(self, ref: TaskRef) -> dict[str, Any]:
        with self._lock:
            t = self._task(ref)
            if t in self._queue:
                self._submit_queue()
            status = self.task_status(ref)
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
            t.status = TaskStatus.STOPPED
            self._fail_dependents(t)
            self._cv.notify_all()
            return True

    def task_result(self, ref: TaskRef, timeout: float | None) -> Any:
        deadline = Deadline(timeout)
        delay = 0.05
        while True:
            with self._lock:
                t = self._task(ref)
                error = t.error
            if error is not None:
                raise error
            header = self.store.header(result_key(ref.task_id))
            if header is not None:
                ok, payload, _info = self.store.get(result_key(ref.task_id))
                with self._lock:
                    self._settle(t, ok)
                    self._cv.notify_all()
                if ok:
                    return loads(payload)
                raise unpack_exception(payload)
            if deadline.expired():
                raise deadline.error(repr(ref), t.status + (f", {t.state.state} {t.state.reason}" if t.state else ""))
            with self._lock:
                if t in self._queue or (t.job_id and not t.settled):
                    self._start()
                self._cv.wait(deadline.cap(delay))
            delay = min(delay * 1.5, 0.5)

    def task_wait(self, refs: Sequence[TaskRef], num_returns: int,
                  timeout: float | None) -> tuple[list[TaskRef], list[TaskRef]]:
        deadline = Deadline(timeout)
        delay = 0.05
        while True:
            done = {r.task_id for r in refs if self.task_status(r) in TaskStatus.FINAL}
            if len(done) >= num_returns or deadline.expired():
                return split_done(refs, done)
            with self._lock:
                self._cv.wait(deadline.cap(delay))
            delay = min(delay * 1.5, 0.5)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            self._cv.notify_all()


