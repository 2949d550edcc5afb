"""Slurm sites: tasks become sbatch jobs (arrays where possible) through submitit.

submitit writes the batch script and the pickle that names our worker function; its
sbatch command goes through our transport, so it is counted, rate-bounded and (with
a `host`) runs on the login node through the site's agent. Status is ours: one sacct (or squeue) call per poll.
"""

from __future__ import annotations

import functools
import logging
import re
import shlex
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from hpc_serverless.adapters.schedulers import slurm as S
from hpc_serverless.adapters.schedulers.base import BatchTask, Scheduler
from hpc_serverless.adapters.schedulers.common import JobState
from hpc_serverless.adapters.submitit_glue import submit_array, submit_calls
from hpc_serverless.core.errors import ConfigError, SchedulerError
from hpc_serverless.core.launch import module_command
from hpc_serverless.core.target import Target
from hpc_serverless.providers.batch import SiteProvider

if TYPE_CHECKING:
    from hpc_serverless.adapters.transport.base import Transport
    from hpc_serverless.config.site import Site

log = logging.getLogger("hpc_serverless")


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise ConfigError("Slurm sites need submitit: pip install 'hpc-serverless[slurm]'") from None
    return submitit


@functools.cache
def _executor_class() -> type:
    """A submitit SlurmExecutor whose sbatch runs through our transport."""
    submitit = _submitit()
    from submitit.core import utils as su
    from submitit.slurm.slurm import SlurmJob

    class TransportSlurmExecutor(submitit.SlurmExecutor):  # type: ignore[misc,name-defined]
        def __init__(self, folder: Path, python: str, transport: Transport) -> None:
            self._transport = transport
            super().__init__(folder, python=python)
            self._throttling = 0.0  # our engine batches and bounds the rate itself

        @classmethod
        def affinity(cls) -> int:  # sbatch runs through our transport (a mock in tests)
            return 2

        @property
        def _submitit_command_str(self) -> str:
            # behind the guard: the job's working directory cannot shadow our package
            return module_command(self.python, "submitit.core._submit", str(self.folder), unbuffered=True)

        def _submit_command(self, command: str) -> Any:
            uid = uuid.uuid4().hex
            folder = su.JobPaths.get_first_id_independent_folder(self.folder)
            folder.mkdir(parents=True, exist_ok=True)
            script = folder / f".submission_file_{uid}.sh"
            # the job's log straight in jobs/ (which exists), not in jobs/<id>/: that folder
            # is made only after sbatch returns, and Slurm fails a job whose --output
            # directory is missing when it starts
            script.write_text(_LOG_DIR.sub(r"\1/", self._make_submission_file_text(command, uid)))
            result = self._transport.run(["sbatch", "--parsable", str(script)])
            if not result.ok:
                script.unlink(missing_ok=True)
                raise SchedulerError(f"Slurm refused the job: {result.describe()}",
                                     transient=S.is_transient(result.stderr))
            job_id = S.parse_sbatch(result.stdout)
            job: Any = SlurmJob(folder=self.folder, job_id=job_id, tasks=list(range(self._num_tasks())))
            job.paths.move_temporary_file(script, "submission_file", keep_as_symlink=True)
            return job

        def _internal_process_submissions(self, delayed: list[Any]) -> list[Any]:
            if len(delayed) == 1:
                return super()._internal_process_submissions(delayed)
            # an array: one pickle per element, one sbatch --array for all of them
            return submit_array(self, delayed, SlurmJob, self.parameters.get("time", 5))

    return TransportSlurmExecutor


class SlurmScheduler(Scheduler):
    """Submit with submitit (arrays, dependencies), poll with sacct or squeue, cancel with scancel."""

    name = "Slurm"

    def __init__(self, site: Site, transport: Transport, store_root: str) -> None:
        self.site, self.transport, self.store_root = site, transport, store_root
        self.folder = site.storage_path / "jobs" / "%j"
        self._use_squeue = site.accounting == "squeue"
        self._sacct_retry_in = 0
        self._partitions: dict[str, S.Partition] | None = None
        self._max_array: int | None = site.max_array_size

    # -- facts about the site, asked once ---------------------------------------------------
    def partitions(self) -> dict[str, S.Partition]:
        if self._partitions is None:
            result = self.transport.run(S.SINFO_ARGV)
            self._partitions = S.parse_sinfo(result.stdout) if result.ok else {}
        return self._partitions

    def max_array_size(self) -> int:
        if self._max_array is None:
            result = self.transport.run(S.MAX_ARRAY_ARGV)
            found = S.parse_max_array_size(result.stdout) if result.ok else None
            # MaxArraySize bounds the index: indices 0..N-1 fit
            self._max_array = max(1, (found or 1001) - 1)
        return self._max_array

    def check_target(self, target: Target) -> None:
        S.check_fits(target, self.partitions(), self.site.name)

    # -- submission -------------------------------------------------------------------------------
    def setup_lines(self, target: Target) -> list[str]:
        from hpc_serverless.adapters.jobscript import export_lines

        env = {**self.site.env, "HPC_SERVERLESS_STORE": self.store_root}
        return [*self.site.setup, export_lines(env)]

    def executor(self, target: Target, name: str, after: Sequence[str]) -> Any:
        # exec: python replaces the batch shell, so the time-limit signal (B:, to the batch
        # shell) reaches our worker, which requeues tasks that ask for it
        ex = _executor_class()(self.folder, "exec " + shlex.quote(self.site.python), self.transport)
        params = S.submitit_parameters(target, directives=self.site.directives)
        extra = dict(params.pop("additional_parameters", {}))
        if after:
            params["dependency"] = "afterok:" + ":".join(after)
            extra["kill-on-invalid-dep"] = "yes"
        minutes = params.get("time", 60)
        delay = int(min(90, max(10, minutes * 60 // 4)))
        params["signal_delay_s"] = delay
        extra["signal"] = f"B:USR2@{delay}"
        ex.update_parameters(job_name=_job_name(name), setup=self.setup_lines(target),
                             additional_parameters=extra or None, **params)
        return ex

    def submit(self, tasks: Sequence[BatchTask], target: Target, after: Sequence[str]) -> list[str]:
        name = tasks[0].name if len({t.name for t in tasks}) == 1 else "tasks"
        return submit_calls(self.executor(target, name, after), tasks, self.store_root)

    # -- programs ----------------------------------------------------------------------------------
    def program_script(self, target: Target, *, job_name: str, job_id: str, job_dir: str,
                       env: Mapping[str, str], workdir: str, command: Sequence[str]) -> str:
        from hpc_serverless.adapters.jobscript import render_program

        options = {"job-name": _job_name(job_name), "output": f"{job_dir}/output.log",
                   "open-mode": "append", **S.sbatch_options(target, directives=self.site.directives)}
        return render_program("slurm.sh", directives=S.directive_lines(options), job_id=job_id, job_dir=job_dir,
                              setup=self.site.setup, env={**self.site.env, **env}, workdir=workdir,
                              command=command)

    def submit_script(self, path: str, target: Target, job_name: str) -> str:
        result = self.transport.run(["sbatch", "--parsable", path])
        if not result.ok:
            raise SchedulerError(f"Slurm refused the job: {result.describe()}",
                                 transient=S.is_transient(result.stderr))
        return S.parse_sbatch(result.stdout)

    # -- status -------------------------------------------------------------------------------------
    def poll(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        # array elements are asked for by their array's id: one entry covers all of them
        ids = sorted({j.split("_", 1)[0] for j in job_ids}, key=lambda x: int(x) if x.isdigit() else 0)
        if not self._use_squeue or self._sacct_retry_in <= 0:
            result = self.transport.run(S.sacct_argv(ids))
            if result.ok:
                self._use_squeue = False
                return S.parse_sacct(result.stdout)
            if not S.accounting_missing(result.stderr):
                raise SchedulerError(result.describe(), transient=S.is_transient(result.stderr))
            if not self._use_squeue:
                log.warning("%s: sacct does not answer (%s); reading job states from squeue",
                            self.site.name, result.describe())
            self._use_squeue, self._sacct_retry_in = True, 20
        self._sacct_retry_in -= 1
        result = self.transport.run(S.squeue_argv(ids))
        if not result.ok and "Invalid job id" not in result.stderr:
            raise SchedulerError(result.describe(), transient=S.is_transient(result.stderr))
        return S.parse_squeue(result.stdout)

    def cancel(self, job_ids: Sequence[str]) -> None:
        result = self.transport.run(S.scancel_argv(job_ids))
        if not result.ok and "already completing or completed" not in result.stderr:
            raise SchedulerError(f"could not cancel: {result.describe()}",
                                 transient=S.is_transient(result.stderr))


_LOG_DIR = re.compile(r"((?:--output|--error)=\S*?)/(?:%j|%A_%a)/")


def _job_name(name: str) -> str:
    return "hpcs-" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40] or "task")


class SlurmProvider(SiteProvider):
    """A Slurm site. With no `host`, scheduler commands run here (we are on the login node).

    ``SlurmProvider(name="cluster", site="site_configs/x.yaml")``, or with ``host=``,
    ``username=``, ``password=``, ``key_filename=``, ``port=`` to reach it over SSH.
    """

    kind = "slurm"

    def make_scheduler(self, site: Site, transport: Transport) -> Scheduler:
        return SlurmScheduler(site, transport, str(site.storage_path / "store"))
