"""Programs and their jobs as values: what a Program is, the Job handle a user holds, job
ids, and the names of the files every job directory has.

The handle asks its provider's engine through the `JobBackend` protocol, so this core
module knows no engine or provider; running programs is the engines' work (local:
engines/local_programs.py, batch sites: engines/programs_batch.py).
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from hpc_serverless.core.deadline import Deadline
from hpc_serverless.core.errors import JobFailedError, ProgramError
from hpc_serverless.core.refs import TaskStatus
from hpc_serverless.core.requirements import normalize_requirements
from hpc_serverless.core.target import Target

__all__ = ["ARGUMENTS_KEY", "ENVIRONMENT_NOTE_ENV", "JOB_DIR_ENV", "RESULT_KEY", "Job", "JobBackend", "Program", "new_job_id",
           "provider_of_job_id", "why_it_ended"]

#: where a running program finds its job directory, and the names of what it holds
JOB_DIR_ENV = "HPC_SERVERLESS_JOB_DIR"
#: how a program's job learns how its environment came to be (the runner prints it to its log)
ENVIRONMENT_NOTE_ENV = "HPC_SERVERLESS_ENVIRONMENT"
ARGUMENTS_KEY = "arguments"
RESULT_KEY = "result"


@dataclass(frozen=True)
class Program:
    """A script to run as a job: `entrypoint` inside `working_dir`, with arguments."""

    title: str
    entrypoint: str
    working_dir: str = "."
    description: str = ""
    dependencies: Sequence[str] | None = None
    env_vars: Mapping[str, str] | None = None
    target: Any = None
    _target: Target = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.title, str) or not self.title.strip():
            raise ProgramError("a Program needs a non-empty title")
        if not isinstance(self.entrypoint, str) or not self.entrypoint.strip():
            raise ProgramError(f"Program {self.title!r} needs an entrypoint (a .py file in its working_dir)")
        entry = Path(self.entrypoint)
        if entry.is_absolute() or ".." in entry.parts:
            raise ProgramError(f"Program {self.title!r}: entrypoint {self.entrypoint!r} must be a "
                               "path inside working_dir")
        for k in (self.env_vars or {}):
            if not isinstance(k, str) or not k.isidentifier():
                raise ProgramError(f"Program {self.title!r}: env_vars key {k!r} is not a variable name")
        object.__setattr__(self, "_target", Target.of(self.target))
        if self._target.requeue:
            raise ProgramError(f"Program {self.title!r}: target 'requeue' applies to tasks "
                               "(distribute_task), not to Programs: a program's job is not requeued")
        try:
            normalize_requirements(self.dependencies)
        except ValueError as exc:
            raise ProgramError(f"Program {self.title!r}: dependencies: {exc}") from None

    @property
    def requirements(self) -> tuple[str, ...]:
        """What the program's environment must have: its dependencies and its target's
        `pip`, normalized (engines/environments.py builds one per set)."""
        return normalize_requirements([*(self.dependencies or ()), *self._target.pip])

    @property
    def resources(self) -> Target:
        return self._target

    def check(self) -> Path:
        """The working dir, after checking the entrypoint is in it (before anything runs)."""
        wd = Path(self.working_dir).expanduser()
        if not wd.is_dir():
            raise ProgramError(f"Program {self.title!r}: working_dir {str(wd)!r} is not a directory")
        if not (wd / self.entrypoint).is_file():
            raise ProgramError(f"Program {self.title!r}: entrypoint {self.entrypoint!r} not found in "
                               f"working_dir {str(wd.resolve())!r}")
        return wd


class JobBackend(Protocol):
    def job_info(self, job_id: str) -> dict[str, Any]: ...
    def job_logs(self, job_id: str) -> str: ...
    def job_result(self, job_id: str) -> Any: ...
    def job_stop(self, job_id: str) -> bool: ...


class Job:
    """A running or finished program. `status()`, `logs()`, `result()`, `stop()`."""

    def __init__(self, job_id: str, backend: JobBackend, provider: str = "local") -> None:
        self.job_id, self._backend, self.provider = job_id, backend, provider

    def info(self) -> dict[str, Any]:
        """Status plus the scheduler's own state and reason, times and title."""
        return self._backend.job_info(self.job_id)

    def status(self) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
        return str(self.info()["status"])

    def logs(self) -> str:
        """Everything the program printed so far."""
        return self._backend.job_logs(self.job_id)

    def stop(self) -> bool:
        """Stop the job; True if it was still running."""
        return self._backend.job_stop(self.job_id)

    def wait(self, timeout: float | None = None, poll: float = 0.2) -> str:
        """Block until the job ends; returns its final status."""
        deadline = Deadline(timeout)
        delay = poll
        while True:
            status = self.status()
            if status in TaskStatus.FINAL:
                return status
            if deadline.expired():
                raise deadline.error(f"job {self.job_id}", status)
            time.sleep(deadline.cap(delay) or 0.0)
            delay = min(delay * 1.5, 5.0)

    def result(self, timeout: float | None = None) -> Any:
        """What the program passed to save_result (waits for the job to end)."""
        status = self.wait(timeout)
        if status != TaskStatus.SUCCEEDED:
            info = self.info()
            reason = why_it_ended(info) or status
            tail = "\n".join(self.logs().rstrip().splitlines()[-15:])
            raise JobFailedError(f"job {self.job_id} ({info.get('title', '')}) ended {status} ({reason}); "
                                 f"last lines of its log:\n{tail}")
        return self._backend.job_result(self.job_id)

    def __repr__(self) -> str:
        return f"<Job {self.job_id} on {self.provider}>"


def why_it_ended(info: Mapping[str, Any]) -> str:
    """The scheduler's state and the reason, as a user reads them: "TIMEOUT: it ran past its
    time limit" (the state only where it says more than the status)."""
    state, reason, status = info.get("state") or "", info.get("reason") or "", info.get("status")
    said = [s for s in (state if state not in ("", status, "FAILED", "RUNNING", "COMPLETED") else "",
                        reason) if s]
    return ": ".join(said)


#: a job id: "<provider>-YYYYmmdd-HHMMSS-xxxxxx" (older ids have no provider part)
_JOB_ID_RE = re.compile(r"^(?:(?P<provider>[A-Za-z0-9_][A-Za-z0-9_.-]{0,63})-)?\d{8}-\d{6}-[0-9a-f]{6}$")


def new_job_id(provider: str | None = None) -> str:
    """A fresh job id; it carries the provider's name (when that is a plain word), so a
    later process goes straight to the provider that ran it."""
    stamp = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
    if provider and _JOB_ID_RE.match(f"{provider}-{stamp}"):
        return f"{provider}-{stamp}"
    return stamp


def provider_of_job_id(job_id: str) -> str | None:
    """The provider name a job id carries (None for older ids and ids of other shapes)."""
    m = _JOB_ID_RE.match(job_id)
    return m.group("provider") if m else None
