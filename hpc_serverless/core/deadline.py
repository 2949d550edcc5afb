"""Timeouts as one value: every wait loop (get, wait, job.wait, each engine's task_result
and task_wait) counts down the same way and says the same thing when time is up."""

from __future__ import annotations

import time
from typing import Sequence

from hpc_serverless.core.errors import GetTimeoutError
from hpc_serverless.core.refs import TaskRef

__all__ = ["Deadline", "split_done"]


class Deadline:
    """A timeout in seconds (None: wait forever) that started now."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self._at = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left (never negative); None for no deadline."""
        return None if self._at is None else max(0.0, self._at - time.monotonic())

    def expired(self) -> bool:
        return self._at is not None and time.monotonic() >= self._at

    def cap(self, delay: float | None) -> float | None:
        """How long the next sleep or condition wait may be: `delay`, but not past the deadline."""
        left = self.remaining()
        if left is None:
            return delay
        return left if delay is None else min(delay, left)

    def error(self, what: str, state: str | None = None) -> GetTimeoutError:
        """The timeout error of a wait on `what` (which is still in `state`)."""
        return GetTimeoutError(f"{what} did not finish within {self.timeout} s"
                               + (f" (it is {state})" if state else ""))


def split_done(refs: Sequence[TaskRef], done_ids: set[str]) -> tuple[list[TaskRef], list[TaskRef]]:
    """(done, pending) of refs by task id, each in the order given (what task_wait returns)."""
    return [r for r in refs if r.task_id in done_ids], [r for r in refs if r.task_id not in done_ids]
