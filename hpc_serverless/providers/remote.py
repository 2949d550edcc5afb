"""A site reached over SSH: the login-node provider, run by an agent at the far end.

Nothing here reads or writes the cluster's files: puts, gets, calls, status and programs
are requests to the agent (hpc_serverless/agent.py) over the provider's one SSH channel,
and the site file's storage, python and setup mean what they mean in the cluster account.

Round trips: calls made in a loop are gathered (the site's ``array_linger``, at most
MAX_LINGER_S) and sent as one request, which the agent submits as arrays; waiting on many
tasks is one request per poll for all of them, which returns their results inline.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import secrets
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from hpc_serverless.core.calls import find_task_refs, pack_arguments
from hpc_serverless.core.deadline import Deadline, split_done
from hpc_serverless.core.errors import (
    HPCServerlessError,
    JobNotFoundError,
    TaskCancelledError,
)
from hpc_serverless.core.jobs import Job, Program
from hpc_serverless.core.live_refs import LiveRefs
from hpc_serverless.core.refs import ObjectRef, TaskRef, TaskStatus, register_backend, register_store
from hpc_serverless.core.serialization import loads, unpack_exception
from hpc_serverless.core.sessions import HEARTBEAT_S, new_session_id, session_prefix, session_task_id
from hpc_serverless.core.store import ObjectStore
from hpc_serverless.core.target import Target
from hpc_serverless.engines.batch import MAX_LINGER_S
from hpc_serverless.providers.base import Provider

if TYPE_CHECKING:
    from hpc_serverless.adapters.transport.agent_client import AgentClient
    from hpc_serverless.adapters.transport.ssh import SSHTransport
    from hpc_serverless.config.site import Site
    from hpc_serverless.core.calls import TaskFunction

log = logging.getLogger("hpc_serverless")

#: task results up to this many bytes in all come back inside a poll's answer
INLINE_RESULTS = 8 << 20
#: how long one poll may wait at the agent for a task to finish (a long poll)
POLL_WAIT_S = 2.0
#: released pilot tasks are named to the agent this many at a time (it holds a ref for each)
RELEASE_BATCH = 500


class RemoteStore(ObjectStore):
    """The site's object store, reached through the agent: one request per put or get."""

    def __init__(self, root: str, agent: AgentClient) -> None:
        super().__init__(root)
        self.root = PurePosixPath(root)
        self._agent = agent

    def write_parts(self, key: str, parts: list[memoryview], *, overwrite: bool = False,
                    type_name: str = "", meta: dict[str, Any] | None = None,
                    durable: bool | None = None, ready: Callable[[int, int], None] | None = None) -> int:
        self.path_of(key)  # a bad key is refused here (`ready` is for parts still arriving: not here)
        return int(self._agent.call("write_parts", key, [pickle.PickleBuffer(p) for p in parts],
                                    overwrite, type_name, meta, durable))

    def read_parts(self, key: str, *, to_run: bool = False) -> tuple[Any, list[Any], dict[str, Any]]:
        # (to_run is for a job's worker, which reads its own store on the cluster, never this)
        self.path_of(key)
        data, buffers, header = self._agent.call("read_parts", key)
        return data, list(buffers), header

    def header(self, key: str) -> dict[str, Any] | None:
        self.path_of(key)
        result: dict[str, Any] | None = self._agent.call("header", key)
        return result

    def exists(self, key: str) -> bool:
        return bool(self._agent.call("exists", self.path_of(key).relative_to(self.root).as_posix()))

    def delete(self, key: str) -> None:
        self._agent.call("delete", key)


@dataclass(eq=False)
class _Task:
    """A task as this client knows it (not its TaskRef: the task goes when its refs do)."""

    task_id: str
    function: str
    job_id: str | None = None
    status: str = TaskStatus.PENDING
    outcome: tuple[bool, bytes] | None = None
    error: BaseException | None = None
    sent: bool = False
    orphan: bool = False  # its refs went before it settled: dropped when it does
    #: refs to the tasks it depends on, until the agent has it (then the agent keeps those)
    upstream: tuple[TaskRef, ...] = ()

    @property
    def item(self) -> tuple[str, str, str | None]:
        """How the agent's ops name it."""
        return self.task_id, self.function, self.job_id

    @property
    def settled(self) -> bool:
        return self.outcome is not None or self.error is not None


class RemoteBackend:
    """TaskRef backend of a remote provider: batches calls out, polls all open tasks at once."""

    def __init__(self, provider: RemoteProvider, key: str) -> None:
        self.provider, self.key = provider, key
        self.agent = provider.agent
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._tasks: dict[str, _Task] = {}
        self._queue: list[dict[str, Any]] = []
        self._queued_since: float | None = None
        self._last_enqueue = 0.0
        self._flusher: threading.Thread | None = None
        self._send_lock = threading.Lock()
        self._poll_lock = threading.Lock()
        #: the live TaskRefs here: a settled task and its result go with the last one (an
        #: agent in pilot mode keeps its own until it ends; in job mode the store has them)
        self._live = LiveRefs()
        #: dropped tasks whose release the agent has not heard of yet (pilot mode)
        self._released: list[str] = []
        register_backend(self)

    def watch_ref(self, ref: TaskRef) -> None:
        """(TaskRef.__init__) Count `ref` among the live refs of its task."""
        self._live.watch(ref)

    def _release(self) -> None:
        """Drop the settled tasks whose last ref went (lock held); others when they settle."""
        for task_id in self._live.collect():
            t = self._tasks.get(task_id)
            if t is None:
                continue
            if t.settled:
                del self._tasks[task_id]
                self._released.append(task_id)
            else:
                t.orphan = True

    def _send_releases(self) -> None:
        """Tell a pilot agent, RELEASE_BATCH at a time, which tasks this client dropped, so
        that it drops its refs and their results (not under the lock: a round trip)."""
        with self._lock:
            if len(self._released) < RELEASE_BATCH:
                return
            ids, self._released = self._released, []
        if self.agent.info.get("mode") != "pilot":
            return  # (a batch agent keeps nothing per task: the store has the results)
        try:
            self.agent.call("release", ids)
        except Exception as exc:  # noqa: BLE001 - an agent without the op keeps them, as before
            log.debug("%s: the agent did not take released tasks: %s", self.provider.name, exc)

    # -- submission ------------------------------------------------------------------------
    def enqueue(self, ref: TaskRef, call: dict[str, Any], deps: Sequence[TaskRef] = ()) -> None:
        with self._lock:
            self._release()
            self._tasks[ref.task_id] = _Task(ref.task_id, ref.function, ref._job_id, upstream=tuple(deps))
            self._queue.append(call)
            self._last_enqueue = time.monotonic()
            if self._queued_since is None:
                self._queued_since = self._last_enqueue
            if self._flusher is None or not self._flusher.is_alive():
                self._flusher = threading.Thread(target=self._flush_loop, daemon=True,
                                                 name=f"hpc-serverless-{self.provider.name}-submit")
                self._flusher.start()
            self._cv.notify_all()
        self._send_releases()

    def _flush_loop(self) -> None:
        linger = self.provider.site.array_linger
        while True:
            with self._lock:
                if not self._queue:
                    self._flusher = None
                    return
                now = time.monotonic()
                due = min(self._last_enqueue + linger, (self._queued_since or now) + MAX_LINGER_S)
                if now < due:
                    self._cv.wait(due - now)
                    continue
            self.flush()

    def flush(self) -> None:
        """Send every queued call in one request; the agent submits them (as arrays)."""
        with self._send_lock:
            with self._lock:
                calls, self._queue, self._queued_since = self._queue, [], None
            if not calls:
                return
            seen: set[str] = set()
            for c in calls:  # each function's bytes once per request
                if c["fn_key"] in seen:
                    c["fn_bytes"] = None
                seen.add(c["fn_key"])
            try:
                answers = self.agent.call("submit", calls)
            except Exception as exc:  # noqa: BLE001 - every call of the batch must hear of it
                answers = [(None, exc)] * len(calls)
            with self._lock:
                for c, (job_id, error) in zip(calls, answers, strict=True):
                    t = self._tasks[c["task_id"]]
                    t.sent, t.upstream = True, ()
                    self._set_job_id(t, job_id)
                    if error is not None:
                        t.error, t.status = error, TaskStatus.FAILED
                        self._drop_if_orphan(t)
                self._cv.notify_all()

    # -- polling ---------------------------------------------------------------------------
    def _task(self, ref: TaskRef) -> _Task:
        t = self._tasks.get(ref.task_id)
        if t is None:  # a ref from another process or an earlier agent
            t = self._tasks[ref.task_id] = _Task(ref.task_id, ref.function, ref._job_id, sent=True)
        return t

    def _set_job_id(self, t: _Task, job_id: str | None) -> None:
        t.job_id = job_id
        for ref in self._live.refs(t.task_id):
            ref._job_id = job_id

    def _drop_if_orphan(self, t: _Task) -> None:
        if t.orphan and self._tasks.get(t.task_id) is t:
            del self._tasks[t.task_id]
            self._released.append(t.task_id)

    def _poll(self, wait: float) -> None:
        """One request for every open task this process knows: states, and results inline."""
        with self._poll_lock:
            with self._lock:
                self._release()
                open_tasks = [t for t in self._tasks.values() if t.sent and not t.settled]
            if not open_tasks:
                return
            items = [t.item for t in open_tasks]
            answer = self.agent.call("poll", items, wait, INLINE_RESULTS)
            with self._lock:
                for t in open_tasks:
                    entry = answer.get(t.task_id)
                    if entry is None:
                        continue
                    t.status = entry["status"]
                    if entry.get("job_id"):
                        self._set_job_id(t, entry["job_id"])
                    if entry.get("error") is not None:
                        t.error = entry["error"]
                    elif entry.get("outcome") is not None:
                        t.outcome = entry["outcome"]
                    if t.settled:
                        self._drop_if_orphan(t)
                self._cv.notify_all()
            self._send_releases()

    def _ensure_sent(self, t: _Task) -> None:
        if not t.sent:
            self.flush()

    def stats(self) -> dict[str, int]:
        """Tasks this client holds now (with their results, once they came back)."""
        with self._lock:
            return {"tracked": len(self._tasks)}

    # -- TaskBackend -----------------------------------------------------------------------
    def task_status(self, ref: TaskRef) -> str:
        with self._lock:
            t = self._task(ref)
        self._ensure_sent(t)
        if not t.settled:
            self._poll(0.0)
        return t.status

    def task_info(self, ref: TaskRef) -> dict[str, Any]:
        with self._lock:
            t = self._task(ref)
        self._ensure_sent(t)
        if t.error is not None and t.job_id is None:
            return {"status": t.status, "state": "FAILED", "reason": str(t.error), "job_id": None,
                    "nodes": "", "exit_code": ""}
        info: dict[str, Any] = self.agent.call("info", *t.item)
        return info

    def task_cancel(self, ref: TaskRef) -> bool:
        with self._lock:
            t = self._task(ref)
            if t.settled:
                return False
            queued = [c for c in self._queue if c["task_id"] == ref.task_id]
            if queued:
                self._queue.remove(queued[0])
                t.error, t.status, t.sent = TaskCancelledError(f"task {ref.function} was cancelled"), \
                    TaskStatus.STOPPED, True
                self._cv.notify_all()
                return True
        done = bool(self.agent.call("cancel", *t.item))
        self._poll(0.0)
        return done

    def _value(self, t: _Task) -> Any:
        if t.error is not None:
            raise t.error
        assert t.outcome is not None
        ok, payload = t.outcome
        if ok:
            return loads(payload)
        raise unpack_exception(payload)

    def task_result(self, ref: TaskRef, timeout: float | None) -> Any:
        deadline = Deadline(timeout)
        with self._lock:
            t = self._task(ref)
        self._ensure_sent(t)
        while True:
            if t.settled:
                return self._value(t)
            if t.status in TaskStatus.FINAL:  # finished, but its result did not fit inline
                outcome = self.agent.call("result", *t.item)
                if outcome is not None:
                    t.outcome = outcome
                    continue
            if deadline.expired():
                raise deadline.error(repr(ref), t.status)
            self._poll(deadline.cap(POLL_WAIT_S) or 0.0)

    def task_wait(self, refs: Sequence[TaskRef], num_returns: int,
                  timeout: float | None) -> tuple[list[TaskRef], list[TaskRef]]:
        deadline = Deadline(timeout)
        with self._lock:
            tasks = [self._task(r) for r in refs]
        if any(not t.sent for t in tasks):
            self.flush()
        first = True
        while True:
            done = {t.task_id for t in tasks if t.settled or t.status in TaskStatus.FINAL}
            if len(done) >= num_returns and not first or deadline.expired():
                return split_done(refs, done)
            if len(done) >= num_returns and first and all(t.settled for t in tasks):
                return split_done(refs, done)
            self._poll(0.0 if first else deadline.cap(POLL_WAIT_S) or 0.0)
            first = False


class RemoteJobs:
    """The JobBackend of a remote provider: program operations as agent requests."""

    def __init__(self, provider: RemoteProvider) -> None:
        self.agent = provider.agent

    def job_info(self, job_id: str) -> dict[str, Any]:
        info: dict[str, Any] = self.agent.call("job_info", job_id)
        return info

    def job_logs(self, job_id: str) -> str:
        return str(self.agent.call("job_logs", job_id))

    def job_result(self, job_id: str) -> Any:
        data, buffers = self.agent.call("job_result", job_id)
        return loads(data, buffers=buffers)

    def job_stop(self, job_id: str) -> bool:
        return bool(self.agent.call("job_stop", job_id))


class RemoteProvider(Provider):
    """A Slurm or PBS site with a `host`: everything goes through the site's agent."""

    def __init__(self, name: str, site: Site, password: str | None = None,
                 transport: SSHTransport | None = None) -> None:
        from hpc_serverless.adapters.transport.agent_client import AgentClient

        if transport is None:
            from hpc_serverless.adapters.transport import connect

            transport = connect(site, password=password)  # type: ignore[assignment]
        assert transport is not None
        self.name, self.site, self.transport = name, site, transport
        self.agent = AgentClient(transport, site)
        self._store: RemoteStore | None = None
        self._backend: RemoteBackend | None = None
        self._checked: dict[Target, BaseException | None] = {}
        self._start_lock = threading.Lock()
        #: this client's session on the site; the agent writes its heartbeat when we beat
        self.session_id = new_session_id()
        self._beating: threading.Event | None = None

    def _session(self) -> str:
        """Start beating this client's session (at its first task or put)."""
        if self._beating is None:
            with self._start_lock:
                if self._beating is None:
                    self._beating = threading.Event()
                    self.agent.call("session_beat", self.session_id)
                    threading.Thread(target=self._beat, args=(self._beating,), daemon=True,
                                     name=f"hpc-serverless-session-{self.session_id}").start()
        return self.session_id

    def _beat(self, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                self.agent.call("session_beat", self.session_id)
            except HPCServerlessError as exc:  # a dropped connection: the next beat retries
                log.info("%s: session heartbeat failed: %s", self.name, exc)

    def put(self, obj: Any) -> ObjectRef:
        key = f"{session_prefix(self._session())}/objects/{(oid := secrets.token_hex(16))[:2]}/{oid}"
        self.store.put(obj, key, what=f"the object given to put() ({type(obj).__name__})")
        return ObjectRef(key, str(self.store.root), self.name)

    def gc(self, older_than: float = 7 * 86400, *, dry_run: bool = False, programs: bool = False) -> Any:
        """gc on the site, run by its agent (see BatchProvider.gc)."""
        return self.agent.call("gc", older_than, dry_run, programs)

    def du(self) -> Any:
        return self.agent.call("du")

    def remove_program(self, job_id: str) -> Any:
        return self.agent.call("remove_program", job_id)

    def _started(self) -> tuple[RemoteStore, RemoteBackend]:
        with self._start_lock:
            if self._store is None or self._backend is None:
                info = self.agent.connect()
                self._store = RemoteStore(info["store_root"], self.agent)
                register_store(self._store)
                self._backend = RemoteBackend(self, info["backend_key"])
            return self._store, self._backend

    @property
    def store(self) -> ObjectStore:
        return self._started()[0]

    @property
    def backend(self) -> RemoteBackend:
        return self._started()[1]

    def check_target(self, target: Target) -> None:
        if target not in self._checked:
            try:
                self.agent.call("check_target", target)
                self._checked[target] = None
            except HPCServerlessError as exc:
                self._checked[target] = exc
        refused = self._checked[target]
        if refused is not None:
            raise refused

    def submit(self, fn: TaskFunction, args: tuple[Any, ...], kwargs: Mapping[str, Any],
               target: Target) -> TaskRef:
        backend = self.backend
        deps = find_task_refs(args, kwargs)
        for d in deps:
            if d.backend_key != backend.key:
                raise HPCServerlessError(
                    f"{d!r} belongs to provider '{d.provider}'; a task on '{self.name}' can only "
                    "depend on tasks of the same provider (pass get(ref) instead)")
        blob = pack_arguments(fn.function, args, kwargs)
        task_id = session_task_id(self._session())
        ref = TaskRef(task_id, backend.key, self.name, fn.name, backend=backend)
        backend.enqueue(ref, {"task_id": task_id, "name": fn.name, "fn_key": fn.key,
                              "fn_bytes": fn.function_bytes, "args": blob, "target": target,
                              "deps": [(d.task_id, d.function, d._job_id) for d in deps]}, deps)
        return ref

    # -- programs ----------------------------------------------------------------------------
    def run_program(self, program: Program, arguments: Mapping[str, Any] | None = None) -> Job:
        from hpc_serverless.core.errors import ProgramError

        if not isinstance(program, Program):
            raise ProgramError(f"run_program() takes a Program, not {type(program).__name__}")
        wd = program.check()
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for entry in sorted(os.listdir(wd)):
                tf.add(os.path.join(wd, entry), arcname=entry, filter=_anonymous)
        job_id = self.agent.call("run_program", program, dict(arguments or {}), buf.getvalue(), self.name)
        return Job(str(job_id), RemoteJobs(self), self.name)

    def render_program(self, program: Program, arguments: Mapping[str, Any] | None = None) -> str:
        return str(self.agent.call("render_program", program, dict(arguments or {})))

    def get_job_by_id(self, job_id: str) -> Job:
        try:
            return Job(str(self.agent.call("get_job", job_id)), RemoteJobs(self), self.name)
        except JobNotFoundError as exc:  # the agent looked on the login node: say which one
            where = f"{self.site.host}:{exc.where}"
            raise JobNotFoundError(f"no job {job_id!r} on provider '{self.name}' (looked in {where})",
                                   job_id=job_id, where=where) from None

    def jobs(self) -> list[Job]:
        return [Job(j, RemoteJobs(self), self.name) for j in self.agent.call("jobs")]

    # -- facts -------------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Commands the agent ran on the site so far, by program name (sbatch, sacct, ...)."""
        return dict(self.agent.call("stats"))

    def close(self) -> None:
        if self._beating is not None:
            self._beating.set()
            try:
                self.agent.call("session_close", self.session_id)
            except HPCServerlessError as exc:  # gc then waits for the heartbeat to go stale
                log.info("%s: could not close session %s: %s", self.name, self.session_id, exc)
        self.agent.close()
        self.transport.close()

    def search_blocker(self) -> str | None:
        """Looking for a job here must not ask anyone for a password just to look."""
        return self.transport.login_blocker()

    def describe(self) -> str:
        return f"{self.name} ({self.site.scheduler} site '{self.site.name}' via an agent at {self.transport.describe()})"


def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info
