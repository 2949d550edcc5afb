"""The PBS Pro and Torque scheduler: pbs.py's argv and parsers, run through a transport.

Tasks go through submitit with our PBS executor plugin (adapters/submitit_executors.py);
programs through jobscripts/pbs.sh. Status: one qstat for all open jobs per poll. The batch
and pilot engines both drive this class.
"""

from __future__ import annotations

import re
import shlex
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from hpc_serverless.adapters.jobscript import job_preamble, render_program
from hpc_serverless.adapters.schedulers import common
from hpc_serverless.adapters.schedulers import pbs as P
from hpc_serverless.adapters.schedulers.base import QueuedTask, Scheduler
from hpc_serverless.adapters.schedulers.common import JobState
from hpc_serverless.adapters.schedulers.submit_once import new_token, submit_once
from hpc_serverless.core.errors import SchedulerError

if TYPE_CHECKING:
    from hpc_serverless.adapters.transport.base import CommandResult, Transport
    from hpc_serverless.config.site import Site
    from hpc_serverless.core.target import Target


def _job_name(name: str) -> str:
    # PBS job names: at most 15 characters on older servers
    return common.job_name(name, prefix="h", width=15)


class PBSScheduler(Scheduler):
    """qsub (through the submitit PBS plugin for tasks), qstat, qdel."""

    def __init__(self, site: Site, transport: Transport, store_root: str) -> None:
        self.site, self.transport, self.store_root = site, transport, store_root
        self.flavor = site.pbs_flavor
        self.name = "PBS Pro" if self.flavor == "pbspro" else "Torque"
        self.folder = site.storage_path / "jobs" / "%j"
        #: seconds between a submission that may have created its job and the lookup
        self.settle_s = 1.0

    def max_array_size(self) -> int:
        return self.site.max_array_size or 1000

    def check_target(self, target: Target) -> None:
        P.check_fits(target, self.flavor)
        P.qsub_options(target, self.flavor, directives=self.site.directives, qpus=self.site.qpu_section)

    def _run(self, argv: list[str]) -> CommandResult:
        return self.transport.run([self.site.command(argv[0]), *argv[1:]])

    def options(self, target: Target, name: str, after: Sequence[str] = (), *, job_name: str = "") -> list[str]:
        opts = P.qsub_options(target, self.flavor, directives=self.site.directives, qpus=self.site.qpu_section,
                              job_name=job_name or _job_name(name))
        if after:
            opts += ["-W", "depend=afterok:" + ":".join(self._native_ids(after))]
        return opts

    def _native_ids(self, job_ids: Sequence[str]) -> list[str]:
        """Our array element ids ('12_3') in the server's words ('12[3]')."""
        if self.flavor in ("pbspro", "torque") and not self.site.arrays:
            return list(job_ids)
        return [re.sub(r"^(\d+)_(\d+)$", r"\1[\2]", j) for j in job_ids]

    def submit(self, tasks: Sequence[QueuedTask], target: Target, after: Sequence[str]) -> list[str]:
        # submitit is an optional dependency, imported when a task is first submitted
        from hpc_serverless.adapters.submitit_executors import PBSExecutor, submit_calls

        name = tasks[0].name if len({t.name for t in tasks}) == 1 else "tasks"
        ex = PBSExecutor(self.folder_for(tasks[0].ref.task_id), shlex.quote(self.python_for(target)), self.transport,
                         root=self.site.storage_path)
        token = new_token()[:8]
        job_name = P.token_job_name(name, token)
        ex.guard = lambda submit: self._once(submit, job_name, token)
        ex.update_parameters(options=self.options(target, name, after, job_name=job_name),
                             setup=job_preamble(self.site, self.store_root),
                             flavor=self.flavor, qsub=self.site.command("qsub"))
        return submit_calls(ex, [t.ref.task_id for t in tasks], self.store_root)

    def submit_command(self, argv: Sequence[str], job_name: str) -> str:
        token = new_token()[:8]
        name = P.token_job_name(job_name, token)
        tagged = [argv[0], "-N", name, *argv[1:]]  # (the command line's name wins over the script's)
        return self._once(lambda: self._qsub(tagged), name, token)

    def _qsub(self, argv: list[str]) -> str:
        result = self._run(argv)
        if not result.ok:
            raise SchedulerError(f"PBS refused the job: {result.describe()}", transient=P.is_transient(result.stderr))
        return P.short_id(P.parse_qsub(result.stdout)).replace("[]", "")

    def _once(self, submit: Callable[[], str], job_name: str, token: str) -> str:
        """`submit` (a qsub of a job named `job_name`, which carries `token`), with one lookup
        of the name before it may be retried (submit_once.py)."""
        return submit_once(f"{self.site.name}: job {job_name}", token, submit,
                           lambda: self.find_submitted(job_name), settle_s=self.settle_s)

    def find_submitted(self, job_name: str) -> str | None:
        """The id of the server's job named `job_name` (an array's own id), or None; one qstat."""
        result = self._run(P.token_lookup_argv(self.flavor))
        if not result.ok and not result.stdout.strip():
            raise SchedulerError(f"cannot list jobs: {result.describe()}", transient=P.is_transient(result.stderr))
        return P.parse_token_lookup(result.stdout, self.flavor, job_name)

    def poll(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        native = self._native_ids(job_ids)
        result = self._run(P.qstat_argv(native, self.flavor))
        # qstat exits non-zero when some ids are unknown (finished and forgotten), yet
        # prints the others: parse what there is; missing ids count as vanished
        if not result.ok and not result.stdout.strip() and not re.search(r"Unknown Job Id", result.stderr, re.I):
            raise SchedulerError(result.describe(), transient=P.is_transient(result.stderr))
        states = P.parse_qstat_json(result.stdout) if self.flavor == "pbspro" else P.parse_qstat_text(result.stdout)
        back = dict(zip(native, job_ids, strict=True))
        return {back.get(k, k): v for k, v in states.items()}

    def cancel(self, job_ids: Sequence[str]) -> None:
        result = self._run(P.qdel_argv(self._native_ids(job_ids)))
        if not result.ok and "finished" not in result.stderr.lower() and "completed" not in result.stderr.lower():
            raise SchedulerError(f"could not cancel: {result.describe()}", transient=P.is_transient(result.stderr))

    # -- programs --------------------------------------------------------------------------------------
    def program_script(self, target: Target, *, job_name: str, job_id: str, job_dir: str,
                       env: Mapping[str, str], workdir: str, command: Sequence[str]) -> str:
        options = P.qsub_options(target, self.flavor, directives=self.site.directives, qpus=self.site.qpu_section,
                                 job_name=_job_name(job_name))
        return render_program("pbs.sh", directives=P.directive_lines(options), job_id=job_id, job_dir=job_dir,
                              setup=self.site.setup, env={**self.site.env, **env}, workdir=workdir,
                              command=command)

    def submit_script(self, path: str, target: Target, job_name: str) -> str:
        # the options again on the command line: Slurm's qsub wrapper ignores #PBS lines
        token = new_token()[:8]
        name = P.token_job_name(job_name, token)
        opts = P.qsub_options(target, self.flavor, directives=self.site.directives, qpus=self.site.qpu_section, job_name=name)
        return self._once(lambda: self._qsub(["qsub", *opts, "-o", "/dev/null", "-j", "oe", path]), name, token)
