"""The local provider's count of QPUs: each is held by one task at a time.

On a cluster the scheduler counts QPUs (core/qpus.py); on this machine the local pools
are the scheduler, so they share one count per process: a task that asks for a QPU waits
in its pool until enough of its choices are free, and a QPU given back wakes every pool.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable

__all__ = ["QpuSlots", "QPU_SLOTS"]


class QpuSlots:
    """Which of this process's local QPUs are held, and who to wake when one is freed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy: set[str] = set()
        self._wakers: list[weakref.WeakMethod[Callable[[], None]]] = []

    def subscribe(self, wake: Callable[[], None]) -> None:
        """Call `wake` (a bound method: cheap, non-blocking) whenever a QPU is given back;
        held weakly, so a pool that is gone is not kept."""
        with self._lock:
            self._wakers = [w for w in self._wakers if w() is not None]
            self._wakers.append(weakref.WeakMethod(wake))  # type: ignore[arg-type]

    def take(self, count: int, choices: tuple[str, ...]) -> tuple[str, ...] | None:
        """`count` free QPUs out of `choices` (in their order), now held; None if too few are free."""
        with self._lock:
            free = [n for n in choices if n not in self._busy]
            if len(free) < count:
                return None
            got = tuple(free[:count])
            self._busy.update(got)
            return got

    def give(self, names: tuple[str, ...]) -> None:
        with self._lock:
            self._busy.difference_update(names)
            wakers = [w() for w in self._wakers]
        for wake in wakers:
            if wake is not None:
                wake()

    def busy(self) -> set[str]:
        with self._lock:
            return set(self._busy)


#: the one count of this process (shared by the main pool and the environments' pools)
QPU_SLOTS = QpuSlots()
