"""What the batch engine needs of a scheduler adapter, and the task record it hands over.

The engine (engines/batch.py) queues, batches and polls; a `Scheduler` (Slurm, PBS)
turns a batch into a job or array and reads states back, through the site's transport.
Defined here, below both, so each side imports it and neither imports the other.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from hpc_serverless.adapters.schedulers.common import JobState
from hpc_serverless.core.refs import TaskRef, TaskStatus
from hpc_serverless.core.target import Target

__all__ = ["BatchTask", "Scheduler"]


@dataclass(eq=False)
class BatchTask:
    """A task as the backend tracks it."""

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


class Scheduler(abc.ABC):
    """What the backend needs from a scheduler: submit, poll, cancel (all batched)."""

    name: str

    @abc.abstractmethod
    def submit(self, tasks: Sequence[BatchTask], target: Target, after: Sequence[str]) -> list[str]:
        """Submit tasks that share a target (as an array if several); their job ids."""

    @abc.abstractmethod
    def poll(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        """States of these jobs, in as few commands as possible (one, normally)."""

    @abc.abstractmethod
    def cancel(self, job_ids: Sequence[str]) -> None: ...

    @abc.abstractmethod
    def max_array_size(self) -> int: ...

    def check_target(self, target: Target) -> None:
        """Raise ResourceError for what the site can never run."""

    @abc.abstractmethod
    def program_script(self, target: Target, *, job_name: str, job_id: str, job_dir: str,
                       env: Mapping[str, str], workdir: str, command: Sequence[str]) -> str:
        """The batch script of a Program (from the scheduler's template in jobscripts/)."""

    @abc.abstractmethod
    def submit_script(self, path: str, target: Target, job_name: str) -> str:
        """Submit a script already on the site's filesystem; its job id. (The target and
        name again, for schedulers whose options must also be on the command line.)"""
