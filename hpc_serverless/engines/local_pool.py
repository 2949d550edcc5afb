"""A persistent pool of worker processes for the local provider.

Why not ``concurrent.futures.ProcessPoolExecutor``: tasks here ask for several cores
and a memory budget, depend on each other's results, may themselves submit tasks and
wait for them (the seed's benchmark nests tasks), and may be cancelled or run past a
wall time. The pool accounts slots and memory, and when a running task blocks in
`get`, it gives back its slots and, if work is waiting, starts an extra worker, so
nested tasks never deadlock.

Workers are ``python -m hpc_serverless.runtime.pool_worker`` processes connected by a
socketpair (not ``multiprocessing.Process``, whose spawn mode re-runs the user's
script: the seed's tutorials have no ``if __name__ == "__main__"`` guard).

One dispatcher thread reads every worker's messages; submissions from the user's
threads go straight to an idle worker under the pool's lock.

Workers lead process groups of their own: Ctrl-C in a terminal, or "interrupt kernel"
in Jupyter (a SIGINT to the kernel's whole process group), interrupts the driver's
`get`/`wait` and leaves the tasks running, as in Ray and dask. A group, not a session
(as programs get): a batch system that tracks a job by its session (PBS) still counts
and ends the workers. Since no signal to the driver's group reaches them, each worker
also holds a lifeline pipe and ends when the driver dies, however it dies.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import hashlib
import itertools
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_connections
from typing import Any, Iterator, Sequence

from hpc_serverless.core.deadline import Deadline, split_done
from hpc_serverless.core.errors import (
    HPCServerlessError,
    TaskCancelledError,
    TaskTimeoutError,
    WorkerDiedError,
    upstream_failed,
)
from hpc_serverless.core.launch import module_argv
from hpc_serverless.core.live_refs import LiveRefs
from hpc_serverless.core.qpus import GRANTED_ENV
from hpc_serverless.core.refs import TaskRef, TaskStatus, register_backend
from hpc_serverless.core.serialization import loads, pack_exception, unpack_exception
from hpc_serverless.engines.qpu_slots import QPU_SLOTS

__all__ = ["LocalPool", "TaskSpec"]

#: extra workers the pool may start beyond its slots while tasks block in nested gets
MAX_EXTRA_WORKERS = 64


class TaskSpec:
    """One call as the pool needs it: function key, pickled arguments, resources."""

    __slots__ = ("fn_key", "fn_bytes", "args_blob", "deps", "cpu", "mem_mib", "env",
                 "time_s", "name", "mpi", "qpu_count", "qpu_choices")

    def __init__(self, fn_key: str, fn_bytes: bytes, args_blob: bytes, deps: Sequence[TaskRef],
                 cpu: int = 1, mem_mib: int = 0, env: dict[str, str] | None = None,
                 time_s: int | None = None, name: str = "", mpi: int = 1, qpu_count: int = 0,
                 qpu_choices: tuple[str, ...] = ()) -> None:
        self.fn_key, self.fn_bytes, self.args_blob = fn_key, fn_bytes, args_blob
        self.deps, self.cpu, self.mem_mib, self.env = list(deps), cpu, mem_mib, env or None
        self.time_s, self.name, self.mpi = time_s, name, mpi
        #: QPUs the task holds while it runs: `qpu_count` of `qpu_choices` (engines/qpu_slots.py)
        self.qpu_count, self.qpu_choices = qpu_count, qpu_choices

    @property
    def slots(self) -> int:
        """Cores the task holds: cpu per rank, times its ranks."""
        return self.cpu * self.mpi


class _Task:
    __slots__ = ("id", "spec", "waiting_on", "dependents", "status", "ok", "payload",
                 "worker", "deadline", "started", "ended", "reason", "qpus")

    def __init__(self, task_id: str, spec: TaskSpec) -> None:
        self.id, self.spec = task_id, spec
        self.waiting_on: set[str] = set()
        self.dependents: list[_Task] = []
        self.status = TaskStatus.PENDING
        self.ok = False
        self.payload: bytes | BaseException = b""
        self.worker: _Worker | None = None
        self.deadline: float | None = None
        self.started: float | None = None
        self.ended: float | None = None
        self.reason = ""
        self.qpus: tuple[str, ...] = ()  # the QPUs it holds while running


class _Worker:
    __slots__ = ("proc", "conn", "task", "fn_keys", "blocked", "waiter")

    def __init__(self, proc: subprocess.Popen[bytes], conn: Connection) -> None:
        self.proc, self.conn = proc, conn
        self.task: _Task | None = None
        self.fn_keys: set[str] = set()
        self.blocked = False
        self.waiter: tuple[str, list[str], int, float | None] | None = None


def _site_dirs() -> set[str]:
    """This interpreter's site-packages directories (its own and the user's)."""
    import site

    dirs = set(site.getsitepackages()) if hasattr(site, "getsitepackages") else set()
    user = site.getusersitepackages() if hasattr(site, "getusersitepackages") else None
    return dirs | ({user} if isinstance(user, str) else set())


class LocalPool:
    """Runs TaskSpecs on `slots` cores of this machine (or this batch job's allocation)."""

    def __init__(self, slots: int, mem_mib: int, gpus: int = 0, *, provider: str = "local",
                 python: str | None = None) -> None:
        self.slots, self.mem_mib, self.gpus, self.provider = slots, mem_mib, gpus, provider
        #: the workers' interpreter: this one, or a task environment's (target `pip`)
        self.python = python or sys.executable
        self.key = f"localpool:{os.getpid()}:{secrets.token_hex(4)}"
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._tasks: dict[str, _Task] = {}
        self._ready: collections.deque[_Task] = collections.deque()
        self._fns: dict[str, bytes] = {}
        self._workers: list[_Worker] = []
        self._idle: list[_Worker] = []
        self._free_slots = slots
        self._free_mem = mem_mib
        self._started = False
        self._closed = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        # never blocks: the pool's own thread wakes itself too (a ref dropped while it holds
        # the lock), and a full buffer already means a wake is pending
        self._wake_w.setblocking(False)
        self._thread: threading.Thread | None = None
        self._lifeline: tuple[int, int] | None = None  # (read, write): workers end at its EOF
        #: the TaskRefs of this pool's tasks here; a task goes once its last one has gone
        #: and it is final (a dependent's spec holds refs to its upstream tasks until it ends)
        self._live = LiveRefs(wake=self._wake)
        #: tasks whose refs all went before they were final: dropped when they end
        self._orphans: set[str] = set()
        QPU_SLOTS.subscribe(self._wake)  # a QPU freed by any pool may let a task here start
        register_backend(self)

    # -- lifecycle ----------------------------------------------------------------------
    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        self._lifeline = os.pipe()  # not inheritable: only the workers get the read end
        procs = [self._spawn_worker() for _ in range(self.slots)]
        self._workers.extend(procs)
        self._idle.extend(procs)
        self._thread = threading.Thread(target=self._dispatch_loop, name="hpc-serverless-pool",
                                        daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def _spawn_worker(self) -> _Worker:
        parent, child = socket.socketpair()
        env = dict(os.environ)
        env["HPC_SERVERLESS_POOL_KEY"] = self.key
        env["HPC_SERVERLESS_POOL_FD"] = str(child.fileno())
        assert self._lifeline is not None
        lifeline = self._lifeline[0]
        env["HPC_SERVERLESS_POOL_LIFELINE"] = str(lifeline)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # the user's script directory first, as for the driver (functions pickled by
        # reference to the user's own modules must import in the worker)
        paths = [p for p in sys.path if p]
        if self.python != sys.executable:
            # an environment's workers: its own packages must win over this interpreter's,
            # which it sees after them (its .pth), so this one's site-packages are left out
            paths = [p for p in paths if p not in _site_dirs()]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        proc = subprocess.Popen(
            module_argv(self.python, "hpc_serverless.runtime.pool_worker"),
            pass_fds=(child.fileno(), lifeline), env=env, stdin=subprocess.DEVNULL, close_fds=True,
            **_own_process_group())  # out of reach of the driver's Ctrl-C / kernel interrupt
        child.close()
        return _Worker(proc, Connection(parent.detach()))

    def close(self) -> None:
        """Stop the workers; tasks still running are lost (called at exit, e.g. when a
        Jupyter kernel shuts down). Idle workers exit, busy ones are killed at once with
        whatever their task started, so shutdown is quick and quiet."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers = list(self._workers)
            busy = [w for w in workers if w.task is not None]
        for w in workers:
            if w in busy:
                _kill_group(w.proc)
                continue
            try:
                w.conn.send(("exit",))
            except OSError:
                pass
        deadline = time.monotonic() + 2
        for w in workers:
            try:
                w.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_group(w.proc)
                w.proc.wait()
        if self._lifeline is not None:
            for fd in self._lifeline:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:  # BlockingIOError: full, the loop wakes anyway; or closed at exit
            pass

    # -- submission ---------------------------------------------------------------------
    def submit(self, spec: TaskSpec) -> str:
        """Queue a task; returns its id. Dependencies must be tasks of this pool."""
        if self._closed:
            raise HPCServerlessError("the local pool is closed (the interpreter is exiting)")
        task_id = f"{next(self._ids)}"
        task = _Task(task_id, spec)
        with _interrupts_deferred(), self._lock:
            self._start()
            if spec.fn_key not in self._fns:
                self._fns[spec.fn_key] = spec.fn_bytes
            spec.fn_bytes = b""
            self._tasks[task_id] = task
            failed: _Task | None = None
            for dep in spec.deps:
                up = self._tasks.get(dep.task_id)
                if up is None:
                    raise HPCServerlessError(
                        f"{dep!r} is not a task of this local pool (or its result was "
                        "already released); pass its value instead")
                if up.status in TaskStatus.FINAL:
                    if not up.ok and failed is None:
                        failed = up
                else:
                    task.waiting_on.add(up.id)
                    up.dependents.append(task)
            if failed is not None:
                self._fail_dependent(task, failed)
            elif not task.waiting_on:
                self._ready.append(task)
                self._schedule()
        return task_id

    def watch_ref(self, ref: TaskRef) -> None:
        """(TaskRef.__init__) Count `ref` among the live refs of its task."""
        self._live.watch(ref)

    def _release(self) -> None:
        """Drop the tasks whose last TaskRef has gone (lock held; the dispatcher's thread).
        A task sent from inside a task has no ref here and stays until close: the task that
        sent it may still ask for it."""
        for task_id in self._live.collect():
            task = self._tasks.get(task_id)
            if task is None:
                continue
            if task.status in TaskStatus.FINAL:
                del self._tasks[task_id]
                self._orphans.discard(task_id)
            else:
                self._orphans.add(task_id)

    # -- scheduling (lock held) ---------------------------------------------------------
    def _fits(self, spec: TaskSpec) -> bool:
        return spec.slots <= self._free_slots and spec.mem_mib <= self._free_mem

    def _schedule(self) -> None:
        """Start queued tasks on idle workers; a big task may be passed by smaller ones."""
        while self._ready and self._idle:
            for i, candidate in enumerate(itertools.islice(self._ready, 64)):
                if self._fits(candidate.spec):
                    spec = candidate.spec
                    if spec.qpu_count:
                        got = QPU_SLOTS.take(spec.qpu_count, spec.qpu_choices)
                        if got is None:
                            continue  # its QPU is busy: it waits, others may pass
                        candidate.qpus = got
                    del self._ready[i]
                    self._send(self._idle.pop(), candidate)
                    break
            else:
                return

    def _send(self, worker: _Worker, task: _Task) -> None:
        spec = task.spec
        deps = {}
        for dep in spec.deps:
            up = self._tasks[dep.task_id]
            deps[up.id] = (up.ok, up.payload, up.spec.name)
        fn_bytes = None if spec.fn_key in worker.fn_keys else self._fns[spec.fn_key]
        worker.fn_keys.add(spec.fn_key)
        task.status = TaskStatus.RUNNING
        task.worker = worker
        task.started = time.time()
        if spec.time_s:
            task.deadline = time.monotonic() + spec.time_s
            self._wake()
        worker.task = task
        self._free_slots -= spec.slots
        self._free_mem -= spec.mem_mib
        try:
            env = {**(spec.env or {}), GRANTED_ENV: ",".join(task.qpus)} if task.qpus else spec.env
            worker.conn.send(("run", task.id, spec.fn_key, fn_bytes, spec.args_blob, deps, env, spec.mpi))
        except OSError:
            pass  # the dispatcher sees the dead worker and fails the task

    def _finish(self, task: _Task, ok: bool, payload: bytes | BaseException, status: str,
                reason: str = "") -> None:
        """Record a task's end. `payload` is the pickled value or exception from a worker,
        or an exception object made here (kept live so its __cause__ survives)."""
        worker = task.worker
        if worker is not None and task.status == TaskStatus.RUNNING:
            self._free_slots += 0 if worker.blocked else task.spec.slots
            self._free_mem += task.spec.mem_mib
            worker.task = None
            worker.blocked = False
        task.worker = None
        if task.qpus:
            QPU_SLOTS.give(task.qpus)
            task.qpus = ()
        task.ok, task.payload, task.status, task.reason = ok, payload, status, reason
        task.ended = time.time()
        task.spec.args_blob = b""
        task.spec.deps = []  # its upstream tasks may go now (their refs here were the pin)
        if task.id in self._orphans:
            self._live.probe(task.id)
        for dep in task.dependents:
            dep.waiting_on.discard(task.id)
            if dep.status != TaskStatus.PENDING:
                continue
            if not ok:
                self._fail_dependent(dep, task)
            elif not dep.waiting_on:
                self._ready.append(dep)
        task.dependents = []
        self._check_waiters()
        self._cv.notify_all()

    def _fail_dependent(self, task: _Task, upstream: _Task) -> None:
        try:
            cause = _exception_of(upstream.payload) if upstream.payload else None
        except Exception:  # noqa: BLE001 - the message below still names the upstream task
            cause = None
        err = upstream_failed(f"{upstream.spec.name or 'task'}#{upstream.id}", cause,
                              downstream=task.spec.name or "this task", status=upstream.status)
        self._finish(task, False, err, TaskStatus.FAILED, "DependencyNeverSatisfied")

    # -- the dispatcher thread ------------------------------------------------------------
    def _dispatch_loop(self) -> None:
        while not self._closed:
            with self._lock:
                by_conn = {w.conn: w for w in self._workers}
                timeout = self._next_deadline()
            ready = wait_connections([*by_conn, self._wake_r], timeout)
            with self._lock:
                for conn in ready:
                    if conn is self._wake_r:
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except BlockingIOError:
                            pass
                        continue
                    worker = by_conn[conn]  # type: ignore[index]
                    if worker not in self._workers:
                        continue
                    try:
                        while True:
                            self._handle(worker, worker.conn.recv())
                            if not worker.conn.poll():
                                break
                    except (EOFError, OSError):
                        self._worker_died(worker)
                self._expire()
                self._release()
                self._schedule()

    def _next_deadline(self) -> float | None:
        deadlines = [w.task.deadline for w in self._workers if w.task and w.task.deadline]
        deadlines += [w.waiter[3] for w in self._workers if w.waiter and w.waiter[3]]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _handle(self, worker: _Worker, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "done":
            _, task_id, ok, payload = msg
            task = worker.task
            if task is not None and task.id == task_id:
                self._finish(task, ok, payload, TaskStatus.SUCCEEDED if ok else TaskStatus.FAILED)
                self._idle.append(worker)
        elif kind == "submit":  # a task submitting a task
            _, fn_bytes, args_blob, dep_ids, cpu, mem, env, time_s, name, mpi = msg
            fn_key = "n:" + hashlib.sha1(fn_bytes).hexdigest()
            deps = [TaskRef(d, self.key) for d in dep_ids]
            try:
                task_id = self.submit(TaskSpec(fn_key, fn_bytes, args_blob, deps, cpu, mem, env,
                                               time_s, name, mpi))
                reply: Any = (True, task_id)
            except HPCServerlessError as exc:
                reply = (False, pack_exception(exc))
            worker.conn.send(("reply", reply))
        elif kind == "wait":  # a task blocking until some of its sub-tasks finish
            _, ids, num_returns, timeout = msg
            deadline = None if timeout is None else time.monotonic() + timeout
            worker.waiter = ("wait", list(ids), num_returns, deadline)
            if worker.task is not None and not worker.blocked:
                worker.blocked = True
                self._free_slots += worker.task.spec.slots
                self._add_worker_if_starved()
            self._check_waiters()
        elif kind == "fetch":
            _, ids = msg
            out = []
            for tid in ids:
                t = self._tasks.get(tid)
                if t is None:
                    out.append((False, b"", "UNKNOWN"))
                elif isinstance(t.payload, BaseException):
                    out.append((False, pack_exception(t.payload), t.status))
                else:
                    out.append((t.ok, t.payload, t.status))
            worker.conn.send(("reply", out))
        elif kind == "status":
            t = self._tasks.get(msg[1])
            worker.conn.send(("reply", t.status if t else "UNKNOWN"))
        elif kind == "cancel":
            worker.conn.send(("reply", self._cancel(msg[1])))

    def _check_waiters(self) -> None:
        now = time.monotonic()
        for w in self._workers:
            if w.waiter is None:
                continue
            _, ids, num_returns, deadline = w.waiter
            done = [i for i in ids if (t := self._tasks.get(i)) is None or t.status in TaskStatus.FINAL]
            if len(done) >= num_returns or (deadline is not None and now >= deadline):
                w.waiter = None
                if w.blocked and w.task is not None:
                    w.blocked = False
                    self._free_slots -= w.task.spec.slots
                try:
                    w.conn.send(("reply", done))
                except OSError:
                    pass

    def _add_worker_if_starved(self) -> None:
        if self._ready and not self._idle and not self._closed:
            extra = len(self._workers) - self.slots
            if extra < MAX_EXTRA_WORKERS:
                w = self._spawn_worker()
                self._workers.append(w)
                self._idle.append(w)
                self._wake()

    def _expire(self) -> None:
        now = time.monotonic()
        for w in list(self._workers):
            t = w.task
            if t is not None and t.deadline is not None and now >= t.deadline:
                err = TaskTimeoutError(f"task {t.spec.name}#{t.id} ran past its time limit of "
                                       f"{t.spec.time_s} s and was killed")
                self._replace_worker(w, t, err, TaskStatus.FAILED, "TIMEOUT")
        self._check_waiters()

    def _replace_worker(self, worker: _Worker, task: _Task | None, payload: BaseException, status: str,
                        reason: str) -> None:
        _kill_group(worker.proc)
        if task is not None:
            self._finish(task, False, payload, status, reason)
        self._workers.remove(worker)
        if worker in self._idle:
            self._idle.remove(worker)
        try:
            worker.conn.close()
        except OSError:
            pass
        threading.Thread(target=worker.proc.wait, daemon=True).start()
        if not self._closed and len(self._workers) < self.slots:
            w = self._spawn_worker()
            self._workers.append(w)
            self._idle.append(w)
        self._wake()

    def _worker_died(self, worker: _Worker) -> None:
        if self._closed:
            return
        try:  # its socket closed: the exit status follows within moments
            code: int | None = worker.proc.wait(1.0)
        except subprocess.TimeoutExpired:
            code = None
        task = worker.task
        err = WorkerDiedError(
            f"the worker process running {task.spec.name if task else 'a task'} died "
            + (f"(killed by signal {-code}: the out-of-memory killer, or a crash in native code?)"
               if code is not None and code < 0 else f"(exit code {code})"))
        self._replace_worker(worker, task, err, TaskStatus.FAILED, "WorkerDied")

    def _cancel(self, task_id: str) -> bool:
        task = self._tasks.get(task_id)
        if task is None or task.status in TaskStatus.FINAL:
            return False
        err = TaskCancelledError(f"task {task.spec.name}#{task.id} was cancelled")
        if task.status == TaskStatus.RUNNING and task.worker is not None:
            self._replace_worker(task.worker, task, err, TaskStatus.STOPPED, "Cancelled")
        else:
            if task in self._ready:
                self._ready.remove(task)
            self._finish(task, False, err, TaskStatus.STOPPED, "Cancelled")
        self._schedule()
        return True

    # -- TaskBackend --------------------------------------------------------------------
    def _task(self, ref: TaskRef) -> _Task:
        task = self._tasks.get(ref.task_id)
        if task is None:
            raise HPCServerlessError(f"{ref!r} is not known to this local pool")
        return task

    def task_status(self, ref: TaskRef) -> str:
        with self._lock:
            return self._task(ref).status

    def task_info(self, ref: TaskRef) -> dict[str, Any]:
        with self._lock:
            t = self._task(ref)
            return {"status": t.status, "state": t.reason or t.status, "reason": t.reason,
                    "started": t.started, "ended": t.ended, "job_id": None}

    def task_cancel(self, ref: TaskRef) -> bool:
        with _interrupts_deferred(), self._lock:
            return self._cancel(ref.task_id)

    def task_result(self, ref: TaskRef, timeout: float | None) -> Any:
        deadline = Deadline(timeout)
        with self._cv:
            task = self._task(ref)
            while task.status not in TaskStatus.FINAL:
                if deadline.expired():
                    raise deadline.error(repr(ref), task.status)
                self._cv.wait(deadline.remaining())
            ok, payload = task.ok, task.payload
        if ok and isinstance(payload, bytes):
            return loads(payload)
        raise _exception_of(payload)

    def task_wait(self, refs: Sequence[TaskRef], num_returns: int,
                  timeout: float | None) -> tuple[list[TaskRef], list[TaskRef]]:
        deadline = Deadline(timeout)
        with self._cv:
            while True:
                done = {r.task_id for r in refs if self._task(r).status in TaskStatus.FINAL}
                if len(done) >= num_returns or deadline.expired():
                    return split_done(refs, done)
                self._cv.wait(deadline.remaining())

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"workers": len(self._workers), "free_slots": self._free_slots,
                    "queued": len(self._ready), "tracked": len(self._tasks)}


def _own_process_group() -> dict[str, Any]:
    """Popen arguments that start the child in a new process group of this session."""
    if sys.version_info >= (3, 11):
        return {"process_group": 0}
    return {"preexec_fn": os.setpgrp}  # 3.10 has no process_group=


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold back Ctrl-C / a kernel interrupt while the main thread changes the pool and
    writes to a worker's socket: a KeyboardInterrupt there would leave the books wrong
    and half a message on the socket. The signal goes to the previous handler right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # a handler not set from Python: it could not be put back
        yield
        return
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            signal.raise_signal(signal.SIGINT)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill a worker and what its task started (MPI ranks, subprocesses): the process
    group the worker leads. Only while the worker is not reaped: until
    then its pid cannot name another process group."""
    try:
        if proc.returncode is not None:
            return
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        try:
            proc.kill()
        except OSError:
            pass


def _exception_of(payload: bytes | BaseException) -> BaseException:
    return payload if isinstance(payload, BaseException) else unpack_exception(payload)
