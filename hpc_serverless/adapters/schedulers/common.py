"""What every scheduler module produces: a job's state, in the scheduler's words and ours."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["JobState", "job_name"]


@dataclass(frozen=True)
class JobState:
    """A scheduler's view of one job: its own state word, our status, and the reason."""

    job_id: str
    state: str          # the scheduler's word: PENDING, TIMEOUT, OUT_OF_MEMORY, F, ...
    status: str         # ours: PENDING RUNNING SUCCEEDED FAILED STOPPED
    reason: str = ""    # "Priority", "Resources", "DependencyNeverSatisfied", ...
    exit_code: str = ""
    nodes: str = ""

    @property
    def final(self) -> bool:
        return self.status in ("SUCCEEDED", "FAILED", "STOPPED")


def job_name(name: str, *, prefix: str = "hpcs-", limit: int = 45) -> str:
    """A job name every scheduler accepts: `prefix` and `name` with characters outside
    ``[A-Za-z0-9_.-]`` replaced by ``_``, at most `limit` characters (15 on older PBS
    servers, whose names must also start with a letter: pass such a prefix)."""
    return (prefix + (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "task"))[:limit]
