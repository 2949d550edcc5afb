"""What every scheduler module shares: a job's state in the scheduler's words and ours, and
the job names we give."""

from __future__ import annotations

import re
from dataclasses import dataclass


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


def job_name(name: str, *, prefix: str = "hpcs-", width: int = 45) -> str:
    """A scheduler job name for `name`: `prefix` first (our jobs stand out in squeue and qstat),
    then `name` with anything but letters, digits, `_.-` folded to `_`, all cut to `width`
    characters (PBS servers may take 15). An empty name becomes "task"."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "task"
    return (prefix + clean)[:width]
