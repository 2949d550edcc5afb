"""What every scheduler module produces: a job's state, in the scheduler's words and ours."""

from __future__ import annotations

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
