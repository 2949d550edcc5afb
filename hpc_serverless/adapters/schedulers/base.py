"""What an engine needs from a scheduler: submit, poll, cancel, all batched.

The interface lives here, below the engines, so the batch and pilot engines can both drive
the Slurm and PBS runners (slurm_runner.py, pbs_runner.py) without importing providers.
"""

from __future__ import annotations

import abc
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Protocol, Sequence

from hpc_serverless.core.errors import HPCServerlessError
from hpc_serverless.core.sessions import session_of, session_prefix

if TYPE_CHECKING:
    from hpc_serverless.adapters.schedulers.common import JobState
    from hpc_serverless.config.site import Site
    from hpc_serverless.core.refs import TaskRef
    from hpc_serverless.core.target import Target


class QueuedTask(Protocol):
    """What a scheduler reads of a task it submits (the batch engine's BatchTask is one)."""

    @property
    def ref(self) -> TaskRef: ...

    @property
    def name(self) -> str: ...


class Scheduler(abc.ABC):
    """What the backend needs from a scheduler: submit, poll, cancel (all batched)."""

    name: str
    site: Site
    #: where job files go for tasks of no session ("<storage>/jobs/%j")
    folder: Path
    store_root: str

    @cached_property
    def env_pythons(self) -> dict[tuple[str, ...], str]:
        """The python of each `pip` requirement set's environment on the site; the provider
        builds them (engines/environments.py) before it queues a task that asks for one."""
        return {}

    def python_for(self, target: Target) -> str:
        """The interpreter of a task's job: its `pip` environment's, else the site's."""
        if not target.pip:
            return self.site.python
        try:
            return self.env_pythons[target.pip]
        except KeyError:
            raise HPCServerlessError(f"no environment was built for pip {list(target.pip)} before the task "
                                     "was queued (the provider's check_target builds it)") from None

    def folder_for(self, task_id: str) -> Path:
        """Where a task's job files (submitit's pickles and script, the log) go: in its
        session's directory, so they leave with the session."""
        sid = session_of(task_id)
        if sid is None:
            return self.folder
        return Path(self.store_root) / session_prefix(sid) / "jobs" / "%j"

    def release(self, task_id: str, job_ids: Sequence[str]) -> int:
        """Remove what submission left for these finished jobs (of `task_id`'s session),
        all but their logs; the number of files removed. Called once results are stored."""
        from hpc_serverless.adapters.submitit_executors import remove_job_files

        return remove_job_files(self.folder_for(task_id).parent, job_ids)

    @abc.abstractmethod
    def submit(self, tasks: Sequence[QueuedTask], target: Target, after: Sequence[str]) -> list[str]:
        """Submit tasks that share a target (as an array if several); their job ids."""

    @abc.abstractmethod
    def poll(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        """States of these jobs, in as few commands as possible (one, normally)."""

    def confirm_gone(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        """A second opinion on jobs a poll did not list, before they count as gone (a lagging
        accounting database, a purged queue): the states of those the scheduler still knows
        by other means. The default has no other means: every one is gone."""
        return {}

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

    def submit_command(self, argv: Sequence[str], job_name: str) -> str:
        """Run a submission command someone else built (dask-jobqueue's `sbatch SCRIPT` of a
        pilot job, whose script names the job `job_name`), submitted once; its job id."""
        raise NotImplementedError(f"{type(self).__name__} cannot run submission commands")
