"""ObjectRef and TaskRef: small, picklable handles to values that live elsewhere.

An ObjectRef names an object in a store (a directory any process of the site can read).
A TaskRef names a task; the process that submitted it holds the live "backend" that
knows its state. When a TaskRef travels to another process (as a task argument, or
pickled by the user) it carries the backend's key and rebinds on arrival.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from hpc_serverless.core.errors import HPCServerlessError

if TYPE_CHECKING:
    from hpc_serverless.core.store import ObjectStore

__all__ = ["ObjectRef", "TaskRef", "TaskBackend", "TaskStatus", "register_backend", "backend_for"]


class TaskStatus:
    """The five statuses of tasks and jobs (plain strings, as in Qiskit Serverless)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"
    FINAL = frozenset({SUCCEEDED, FAILED, STOPPED})


class TaskBackend(Protocol):
    """What a provider's task machinery offers to TaskRef (one per provider per process)."""

    key: str

    def task_status(self, ref: TaskRef) -> str: ...
    def task_info(self, ref: TaskRef) -> dict[str, Any]: ...
    def task_result(self, ref: TaskRef, timeout: float | None) -> Any: ...
    def task_cancel(self, ref: TaskRef) -> bool: ...
    def task_wait(self, refs: Sequence[TaskRef], num_returns: int,
                  timeout: float | None) -> tuple[list[TaskRef], list[TaskRef]]: ...

    # optional: ``watch_ref(ref)``, called with every TaskRef made for the backend's key in
    # this process (see TaskRef.__init__); a backend that has it may drop a task's result
    # once none of them is left


_BACKENDS: dict[str, TaskBackend] = {}
_BACKENDS_LOCK = threading.Lock()


def register_backend(backend: TaskBackend, *aliases: str) -> None:
    """Make `backend` the live handler for TaskRefs carrying its key (or an alias)."""
    with _BACKENDS_LOCK:
        for key in (backend.key, *aliases):
            _BACKENDS[key] = backend


def backend_for(key: str) -> TaskBackend:
    backend = _BACKENDS.get(key)
    if backend is None:
        raise HPCServerlessError(
            f"this TaskRef belongs to a provider that is not active in this process "
            f"({key}); results of local tasks can only be read in the process that "
            "submitted them (use put() to share values between processes)")
    return backend


_STORES: dict[str, ObjectStore] = {}


def register_store(store: ObjectStore) -> None:
    """Make refs to objects under `store.root` read through this store (a remote
    provider's store reads through its agent)."""
    _STORES[str(store.root)] = store


def store_at(root: str) -> ObjectStore:
    """The store for a ref's root: a provider's registered store, else a local one."""
    store = _STORES.get(root)
    if store is None:
        from hpc_serverless.core.store import ObjectStore

        store = _STORES.setdefault(root, ObjectStore(root))
    return store


@dataclass(frozen=True)
class ObjectRef:
    """A reference to an object in a provider's store: `get(ref)` returns the value."""

    key: str
    store_root: str
    provider: str = "local"

    @property
    def object_id(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    def get(self) -> Any:
        return store_at(self.store_root).get(self.key)

    def __repr__(self) -> str:
        return f"ObjectRef({self.object_id[:12]}, provider={self.provider!r})"


class TaskRef:
    """A handle to a submitted task: `get(ref)` (or `.result()`) returns its value."""

    __slots__ = ("task_id", "backend_key", "provider", "function", "_job_id", "_backend", "__weakref__")

    def __init__(self, task_id: str, backend_key: str, provider: str = "local", function: str = "",
                 job_id: str | None = None, backend: TaskBackend | None = None) -> None:
        self.task_id, self.backend_key, self.provider, self.function = task_id, backend_key, provider, function
        self._job_id = job_id
        self._backend = backend
        # a backend that drops results once no ref is left counts every ref made for its
        # key here, copies and unpickled ones too (core/live_refs.py)
        watch = getattr(backend if backend is not None else _BACKENDS.get(backend_key), "watch_ref", None)
        if watch is not None:
            watch(self)

    def _b(self) -> TaskBackend:
        if self._backend is None:
            self._backend = backend_for(self.backend_key)
        return self._backend

    @property
    def job_id(self) -> str | None:
        """The scheduler's job id (None for local tasks); submits a queued task first."""
        if self._job_id is None and self.backend_key.startswith("batch:"):
            self._job_id = self._b().task_info(self).get("job_id")
        return self._job_id

    def status(self) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
        return self._b().task_status(self)

    def info(self) -> dict[str, Any]:
        """Status plus the scheduler's own state and reason, where there is a scheduler."""
        return self._b().task_info(self)

    def done(self) -> bool:
        return self.status() in TaskStatus.FINAL

    def cancel(self) -> bool:
        """Cancel the task; True if it will not run to completion."""
        return self._b().task_cancel(self)

    def result(self, timeout: float | None = None) -> Any:
        """The task's value; re-raises the task's own exception."""
        return self._b().task_result(self, timeout)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskRef) and other.task_id == self.task_id

    def __hash__(self) -> int:
        return hash(self.task_id)

    def __reduce__(self) -> Any:
        return (TaskRef, (self.task_id, self.backend_key, self.provider, self.function, self._job_id))

    def __repr__(self) -> str:
        job = f", job_id={self._job_id!r}" if self._job_id else ""
        return f"TaskRef({self.function or 'task'}#{self.task_id}{job})"
