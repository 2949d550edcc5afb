"""Which tasks still have a TaskRef in this process, so an engine can drop a task's
result once the last one is garbage-collected (while one lives, `get` stays repeatable).

A ref is copied and unpickled into new objects with the same task id, so liveness is
counted per task id over every TaskRef object made for it: ``TaskRef.__init__`` hands each
new ref to its backend's ``watch_ref``, which calls :meth:`LiveRefs.watch`. An engine that
must keep a task's result for a call still to run holds a TaskRef of its own to it (a
"pin": dropping the ref is the release).

Weakref callbacks run in whichever thread triggers the collection, possibly one holding
the engine's lock, in the middle of its bookkeeping. So a callback only puts the event on a
``queue.SimpleQueue`` (whose ``put`` is safe there) and calls the engine's ``wake``; the
counting happens in :meth:`LiveRefs.collect`, which the engine calls from its own thread.
"""

from __future__ import annotations

import queue
import threading
import weakref
from typing import TYPE_CHECKING, Callable, Union

if TYPE_CHECKING:
    from hpc_serverless.core.refs import TaskRef

__all__ = ["LiveRefs"]


class _Watch(weakref.ref):  # type: ignore[type-arg]  # (weakref.ref is generic only in stubs)
    """A weak reference to one TaskRef object that remembers the task id it was made for."""

    __slots__ = ("task_id",)

    task_id: str

    def __new__(cls, ref: TaskRef, callback: Callable[[_Watch], None]) -> _Watch:
        self = super().__new__(cls, ref, callback)
        self.task_id = ref.task_id
        return self


#: a queued event: a watched ref died, or a task id to look at again (see `probe`)
_Event = Union[_Watch, str]


class LiveRefs:
    """The live TaskRef objects of an engine's tasks, counted per task id."""

    def __init__(self, wake: Callable[[], None] = lambda: None) -> None:
        #: called after each event; must be safe inside a weakref callback (no locks)
        self._wake = wake
        self._lock = threading.Lock()
        self._watches: dict[str, list[_Watch]] = {}
        self._events: queue.SimpleQueue[_Event] = queue.SimpleQueue()

    def watch(self, ref: TaskRef) -> None:
        """Count `ref` as live until it is garbage-collected."""
        w = _Watch(ref, self._lost)
        with self._lock:
            self._watches.setdefault(w.task_id, []).append(w)

    def _lost(self, w: _Watch) -> None:
        """(A weakref callback, any thread.) Queue the death; `collect` counts it."""
        self._events.put(w)
        self._wake()

    def probe(self, task_id: str) -> None:
        """Ask the next `collect` to report `task_id` again if it has no live ref (for a
        task the engine could not drop when its last ref went: it was still running)."""
        self._events.put(task_id)
        self._wake()

    def collect(self) -> list[str]:
        """The task ids, among those with events since the last call, that have no live
        ref left (in the order their last ref went)."""
        touched: dict[str, None] = {}
        with self._lock:
            while True:
                try:
                    event = self._events.get_nowait()
                except queue.Empty:
                    break
                if isinstance(event, str):
                    touched[event] = None
                    continue
                watches = self._watches.get(event.task_id)
                if watches is not None:
                    for i, w in enumerate(watches):
                        if w is event:
                            del watches[i]
                            break
                    if not watches:
                        del self._watches[event.task_id]
                touched[event.task_id] = None
            return [tid for tid in touched if tid not in self._watches]

    def refs(self, task_id: str) -> list[TaskRef]:
        """The live TaskRef objects of `task_id` (to update what they cache)."""
        with self._lock:
            found = [w() for w in self._watches.get(task_id, ())]
        return [r for r in found if r is not None]

    def __len__(self) -> int:
        """Task ids with at least one watched ref not yet counted as gone."""
        with self._lock:
            return len(self._watches)
