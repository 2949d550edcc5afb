"""The Slurm scheduler: slurm.py's argv and parsers, run through a transport.

Tasks go through submitit (adapters/submitit_executors.py), which writes the batch script
and the pickle that names our worker function; its sbatch goes through our transport, so
it is counted, rate-bounded and (with a `host`) runs on the login node through the site's
agent. Status is ours: one sacct (or squeue) call per poll. The batch and pilot engines
both drive this class.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from hpc_serverless.adapters.jobscript import job_preamble, render_program
from hpc_serverless.adapters.schedulers import common
from hpc_serverless.adapters.schedulers import slurm as S
from hpc_serverless.adapters.schedulers.base import QueuedTask, Scheduler
from hpc_serverless.adapters.schedulers.common import JobState
from hpc_serverless.adapters.schedulers.submit_once import new_token, submit_once
from hpc_serverless.core.errors import SchedulerError

if TYPE_CHECKING:
    from hpc_serverless.adapters.transport.base import Transport
    from hpc_serverless.config.site import Site
    from hpc_serverless.core.target import Target

log = logging.getLogger("hpc_serverless")


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
        #: seconds between a submission that may have created its job and the lookup
        self.settle_s = 1.0

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

    def sbatch_options(self, target: Target) -> dict[str, Any]:
        """The sbatch options of a target on this site (its directives and QPUs)."""
        return S.sbatch_options(target, directives=self.site.directives, qpus=self.site.qpu_section)

    def check_target(self, target: Target) -> None:
        self.sbatch_options(target)  # (an ask the site's QPU counting cannot express fails here)
        S.check_fits(target, self.partitions(), self.site.name)

    # -- submission -------------------------------------------------------------------------------
    def executor(self, target: Target, name: str, after: Sequence[str], *, array: bool = False,
                 folder: Path | None = None) -> Any:
        """A submitit executor for one submission (`array`: of several calls)."""
        # submitit is an optional dependency, imported when a task is first submitted
        from hpc_serverless.adapters.submitit_executors import TransportSlurmExecutor

        # exec: python replaces the batch shell, so the time-limit signal (B:, to the batch
        # shell) reaches our worker, which requeues tasks that ask for it
        ex = TransportSlurmExecutor(folder or self.folder, "exec " + shlex.quote(self.python_for(target)), self.transport,
                                    root=self.site.storage_path)
        params = S.submitit_parameters(target, directives=self.site.directives, qpus=self.site.qpu_section)
        extra = dict(params.pop("additional_parameters", {}))
        if after:
            params["dependency"] = "afterok:" + ":".join(after)
            extra["kill-on-invalid-dep"] = "yes"
        minutes = params.get("time", 60)
        delay = int(min(90, max(10, minutes * 60 // 4)))
        params["signal_delay_s"] = delay
        extra["signal"] = f"B:USR2@{delay}"
        extra["output"] = ex.log_file(array)
        job_name, token = common.job_name(name), new_token()
        extra["comment"] = S.tagged_comment(extra.get("comment"), token)
        ex.guard = lambda submit: self._once(submit, job_name, token)
        ex.update_parameters(job_name=job_name, setup=job_preamble(self.site, self.store_root),
                             additional_parameters=extra, **params)
        return ex

    def _once(self, submit: Callable[[], str], job_name: str, token: str) -> str:
        """`submit` (an sbatch of a job named `job_name` whose comment carries `token`), with
        one lookup of the token before it may be retried (submit_once.py)."""
        return submit_once(f"{self.site.name}: job {job_name}", token, submit,
                           lambda: self.find_submitted(job_name, token), settle_s=self.settle_s)

    def find_submitted(self, job_name: str, token: str) -> str | None:
        """The id of this user's job named `job_name` whose comment carries `token` (an
        array's own id), or None; one squeue."""
        result = self.transport.run(S.token_lookup_argv(job_name))
        if not result.ok:
            raise SchedulerError(f"cannot list jobs: {result.describe()}", transient=S.is_transient(result.stderr))
        return S.parse_token_lookup(result.stdout, token)

    def submit(self, tasks: Sequence[QueuedTask], target: Target, after: Sequence[str]) -> list[str]:
        from hpc_serverless.adapters.submitit_executors import submit_calls

        name = tasks[0].name if len({t.name for t in tasks}) == 1 else "tasks"
        ex = self.executor(target, name, after, array=len(tasks) > 1, folder=self.folder_for(tasks[0].ref.task_id))
        return submit_calls(ex, [t.ref.task_id for t in tasks], self.store_root)

    # -- programs ----------------------------------------------------------------------------------
    def program_script(self, target: Target, *, job_name: str, job_id: str, job_dir: str,
                       env: Mapping[str, str], workdir: str, command: Sequence[str]) -> str:
        options = {"job-name": common.job_name(job_name), "output": f"{job_dir}/output.log",
                   "open-mode": "append", **self.sbatch_options(target)}
        return render_program("slurm.sh", directives=S.directive_lines(options), job_id=job_id, job_dir=job_dir,
                              setup=self.site.setup, env={**self.site.env, **env}, workdir=workdir,
                              command=command)

    def submit_script(self, path: str, target: Target, job_name: str) -> str:
        name, token = common.job_name(job_name), new_token()
        comment = self.sbatch_options(target).get("comment")
        # (on the command line, which wins over the script's own --comment line)
        argv = ["sbatch", "--parsable", f"--comment={S.tagged_comment(comment, token)}", path]
        return self._once(lambda: self._sbatch(argv), name, token)

    def submit_command(self, argv: Sequence[str], job_name: str) -> str:
        token = new_token()
        tagged = [argv[0], f"--comment={S.tagged_comment(None, token)}", *argv[1:]]
        return self._once(lambda: self._sbatch(tagged), job_name, token)

    def _sbatch(self, argv: Sequence[str]) -> str:
        # the job's umask (its logs, what it writes): private, as its folder
        result = self.transport.run(argv, env=S.JOB_UMASK_ENV)
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
                return self._with_queue_reasons(S.parse_sacct(result.stdout))
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

    def _with_queue_reasons(self, states: dict[str, JobState]) -> dict[str, JobState]:
        """A lagging slurmdbd lists a new pending job with Reason "None": those arrays are
        asked of the controller once (only while there are such jobs), for why they wait."""
        lagging = sorted({j.split("_", 1)[0] for j, st in states.items() if st.state == "PENDING" and not st.reason})
        if not lagging:
            return states
        result = self.transport.run(S.squeue_argv(lagging))
        if result.ok:
            for j, st in S.parse_squeue(result.stdout).items():
                if j in states and not states[j].final and st.reason:
                    states[j] = st
        return states

    def confirm_gone(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        """Jobs the last poll did not list, asked both ways: squeue (slurmctld's queue) and
        sacct (slurmdbd, which may lag behind a new job or be down). Raises a transient
        SchedulerError if neither answers, so nothing is judged gone on no evidence."""
        ids = sorted({j.split("_", 1)[0] for j in job_ids}, key=lambda x: int(x) if x.isdigit() else 0)
        said: list[dict[str, JobState]] = []
        answers = []
        for argv, parse in ((S.squeue_argv(ids), S.parse_squeue), (S.sacct_argv(ids), S.parse_sacct)):
            result = self.transport.run(argv)
            if result.ok:
                said.append(parse(result.stdout))
            else:
                said.append({})
                answers.append(result.describe())
        if len(answers) == 2 and not any("Invalid job id" in a for a in answers):
            raise SchedulerError(f"neither squeue nor sacct answered: {'; '.join(answers)}", transient=True)
        queue, accounting = said
        found = {}
        for j in job_ids:
            # an ended job: sacct's word is the fuller (exit code, final state); one still
            # queued or running: the controller's (a lagging slurmdbd says Reason "None")
            st = accounting.get(j) if j in accounting and accounting[j].final else queue.get(j, accounting.get(j))
            if st is not None:
                found[j] = st
        return found

    def cancel(self, job_ids: Sequence[str]) -> None:
        result = self.transport.run(S.scancel_argv(job_ids))
        if not result.ok and "already completing or completed" not in result.stderr:
            raise SchedulerError(f"could not cancel: {result.describe()}",
                                 transient=S.is_transient(result.stderr))

