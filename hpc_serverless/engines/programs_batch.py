"""Programs on batch sites: a rendered script, a staged working dir, a record on the site.

Everything about a job lives in ``<storage>/programs/<job id>/`` on the site's shared
filesystem (record.json, job.sh, workdir/, arguments, output.log, result, exit.json), so
any later process on any login node (or a laptop, through the site's agent) finds it
with the job id alone.
"""

from __future__ import annotations

import logging
import posixpath
import time
from typing import TYPE_CHECKING, Any, Mapping, Protocol

from hpc_serverless.core.errors import EnvironmentBuildError, HPCServerlessError, ProgramError, SchedulerError
from hpc_serverless.core.jobs import ENVIRONMENT_NOTE_ENV, JOB_DIR_ENV, Job, Program, new_job_id
from hpc_serverless.core.launch import module_argv
from hpc_serverless.core.private import check_chain, open_private
from hpc_serverless.core.refs import TaskStatus
from hpc_serverless.core.requirements import normalize_requirements
from hpc_serverless.core.store import ObjectStore
from hpc_serverless.engines.job_dirs import JobDirs, exit_info, new_record

if TYPE_CHECKING:
    from hpc_serverless.adapters.schedulers.base import Scheduler
    from hpc_serverless.config.site import Site
    from hpc_serverless.core.fs import LocalFS
    from hpc_serverless.core.target import Target
    from hpc_serverless.engines.batch import BatchBackend
    from hpc_serverless.engines.environments import Environment, Environments

log = logging.getLogger("hpc_serverless")


class ProgramSite(Protocol):
    """What program jobs need of their provider (providers/batch.py's BatchProvider)."""

    name: str
    site: Site
    fs: LocalFS
    scheduler: Scheduler
    backend: BatchBackend

    @property
    def store(self) -> ObjectStore: ...

    @property
    def environments(self) -> Environments: ...

    def effective_target(self, target: Target) -> Target: ...

    def check_resources(self, target: Target) -> Target: ...

    def qpu_env(self, target: Target) -> dict[str, str]: ...


#: submissions of one program: the first and up to three retries (after 1, 2, 4 s)
SUBMIT_ATTEMPTS = 4

#: scheduler states that say why a job's program was killed better than "signal 15" does
_SCHEDULER_KNOWS_BETTER = frozenset({"TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "DEADLINE",
                                     "BOOT_FAIL", "CANCELLED"})
#: how long after its program was killed a job may still be open in the scheduler
_SCHEDULER_GRACE_S = 90.0


def _killed_from_outside(exit_record: Mapping[str, Any]) -> bool:
    """The runner's record of a program killed by a signal (not a user's stop())."""
    code = exit_record.get("exit_code")
    return exit_record.get("status") == TaskStatus.FAILED and isinstance(code, int) and code < 0


class BatchJobs:
    """The JobBackend of a batch provider."""

    def __init__(self, provider: ProgramSite) -> None:
        self.provider = provider
        self.fs = provider.fs
        self.root = posixpath.join(str(provider.site.storage_path), "programs")
        host = provider.site.host
        self.dirs = JobDirs(self.root, provider.name, self.fs, where=f"{host}:{self.root}" if host else self.root,
                            private_root=str(provider.site.storage_path))

    def where(self) -> str:
        """Where the job records are, as a user would look for them."""
        return self.dirs.where

    # -- submit -------------------------------------------------------------------------------
    def render(self, program: Program, job_id: str, environment: Environment | None = None) -> str:
        """The job script; with `environment`, the runner starts with its python."""
        provider = self.provider
        target = provider.effective_target(program.resources)
        job_dir = self.dirs.path(job_id)
        env = {**dict(program.env_vars or {}), **dict(target.env),
               **provider.qpu_env(target), JOB_DIR_ENV: job_dir,
               "HPC_SERVERLESS_STORE": str(provider.store.root), "PYTHONUNBUFFERED": "1"}
        if environment is not None:
            env[ENVIRONMENT_NOTE_ENV] = environment.note()
        python = environment.python if environment is not None else provider.site.python
        return provider.scheduler.program_script(
            target, job_name=program.title, job_id=job_id, job_dir=job_dir, env=env,
            workdir=posixpath.join(job_dir, "workdir"),
            command=module_argv(python, "hpc_serverless.runtime.program_runner", job_dir,
                                program.entrypoint))

    def run(self, program: Program, arguments: Mapping[str, Any] | None, *, name: str | None = None) -> Job:
        """Stage and submit; the job id starts with `name` (the client's provider name, which
        an agent serving a remote client is told), else this provider's."""
        if not isinstance(program, Program):
            raise ProgramError(f"run_program() takes a Program, not {type(program).__name__}")
        wd = program.check()  # before anything is written or submitted
        target = self.provider.check_resources(program.resources)
        # built (or found) before anything is staged or queued: a requirement that cannot
        # be installed fails here, in the installer's words
        job_id = new_job_id(name or self.provider.name)
        try:
            # its dependencies, its target's pip, else a pip the site's defaults give every job
            reqs = normalize_requirements([*program.requirements, *target.pip])
            environment = self.provider.environments.ensure(reqs) if reqs else None
        except EnvironmentBuildError as exc:
            raise self.dirs.refuse_environment(exc, job_id, new_record(
                job_id, program, self.provider.name, time.time(), site=self.provider.site.name,
                dependencies=list(program.dependencies or []), scheduler=self.provider.scheduler.name,
                scheduler_job_id=None)) from None
        script = self.render(program, job_id, environment)
        record = new_record(job_id, program, self.provider.name, time.time(), site=self.provider.site.name,
                            dependencies=list(program.dependencies or []),
                            environment=environment.key if environment else None,
                            scheduler=self.provider.scheduler.name, scheduler_job_id=None)
        job_dir = self.dirs.stage(job_id, record, arguments, str(wd))
        script_path = posixpath.join(job_dir, "job.sh")
        self.fs.write_atomic(script_path, script.encode(), mode=0o700)
        # the scheduler runs job.sh by path: its folder chain private, the file ours and not
        # writable by others, or nothing is submitted
        check_chain(self.dirs.private_root, job_dir)
        open_private(script_path).close()
        try:
            record["scheduler_job_id"] = self._submit(script_path, program)
        except SchedulerError as exc:
            record["refused"] = str(exc)
            self.dirs.write_record(job_id, record)
            raise
        self.dirs.write_record(job_id, record)
        return Job(job_id, self, self.provider.name)

    def _submit(self, script_path: str, program: Program) -> str:
        """Submit the staged script; its scheduler job id. A transient failure is retried
        (with backoff) only when the scheduler said no job carries the submission's token
        (the scheduler adapter asks it: submit_once.py), so a program never runs twice."""
        target = self.provider.effective_target(program.resources)
        for attempt in range(SUBMIT_ATTEMPTS):
            try:
                return self.provider.scheduler.submit_script(script_path, target, program.title)
            except SchedulerError as exc:
                if not exc.transient or attempt == SUBMIT_ATTEMPTS - 1:
                    raise
                log.warning("%s: submitting program %s failed (%s); retrying in %.0f s",
                            self.provider.name, program.title, exc, 2.0 ** attempt)
                time.sleep(2.0 ** attempt)
        raise AssertionError("unreachable")

    def get(self, job_id: str) -> Job:
        self.dirs.record(job_id)
        return Job(job_id, self, self.provider.name)

    def list(self) -> list[Job]:
        """The jobs, newest first. The scheduler's states of the unfinished ones are asked for
        here, in one query, so each job's status() that follows is answered from the cache."""
        ids = self.dirs.ids()
        open_jobs = []
        for job_id in ids:
            try:
                sid = self.dirs.record(job_id).get("scheduler_job_id")
            except HPCServerlessError:  # a damaged or half-written record: its status() says why
                continue
            if sid and self.dirs.exit_record(job_id) is None:
                open_jobs.append(str(sid))
        if open_jobs:
            try:
                self.provider.backend.job_states(open_jobs)
            except HPCServerlessError as exc:  # each status() asks again, and says why if it fails
                log.info("%s: cannot read the states of %d jobs at once: %s", self.provider.name,
                         len(open_jobs), exc)
        return [Job(n, self, self.provider.name) for n in ids]

    # -- JobBackend ---------------------------------------------------------------------------------
    def job_info(self, job_id: str) -> dict[str, Any]:
        record = self.dirs.record(job_id)
        job_dir = self.dirs.path(job_id)
        info: dict[str, Any] = {k: record.get(k) for k in ("job_id", "title", "entrypoint", "created",
                                                          "scheduler_job_id")}
        if record.get("refused"):
            info.update(status=TaskStatus.FAILED, state="REFUSED", reason=record["refused"])
            return info
        ex = self.dirs.exit_record(job_id)
        sid = record.get("scheduler_job_id")
        if ex is not None and sid and _killed_from_outside(ex):
            # the runner saw its program killed by a signal nobody asked for through stop():
            # the scheduler knows why (TIMEOUT, OUT_OF_MEMORY, PREEMPTED...); ask it
            state = self.provider.backend.job_states([sid])[sid]
            if state is not None and state.final and state.state in _SCHEDULER_KNOWS_BETTER:
                from hpc_serverless.adapters.schedulers.slurm import FAILURE_TEXT

                cancelled = state.state == "CANCELLED"  # scancel/qdel from outside stop()
                info.update(status=TaskStatus.STOPPED if cancelled else TaskStatus.FAILED, state=state.state,
                            reason=state.reason or FAILURE_TEXT.get(state.state, state.state.lower()),
                            exit_code=ex.get("exit_code"), ended=ex.get("ended"))
                return info
            if (state is None or not state.final) and time.time() - float(ex.get("ended") or 0) < _SCHEDULER_GRACE_S:
                # the scheduler has not ended the job yet (it kills, then records): not final yet
                info.update(status=TaskStatus.RUNNING, state=state.state if state else "ENDING",
                            reason=f"its program was {ex.get('reason', 'killed')}; waiting for the "
                                   "scheduler's word on why")
                return info
        if ex is not None:
            info.update(exit_info(ex))
            return info
        state = self.provider.backend.job_states([sid])[sid] if sid else None
        if state is None:
            info.update(status=TaskStatus.PENDING, state="SUBMITTED", reason="not listed by the scheduler yet")
        elif not state.final:
            info.update(status=state.status, state=state.state, reason=state.reason, nodes=state.nodes)
            if state.status == TaskStatus.PENDING and self.fs.exists(posixpath.join(job_dir, "output.log")):
                # its log exists: it started since the (cached, rate-bounded) scheduler answer
                info.update(status=TaskStatus.RUNNING, state="RUNNING", reason="")
        else:
            # ended without the runner's exit record: time limit, memory, cancel, node failure
            from hpc_serverless.adapters.schedulers.slurm import FAILURE_TEXT

            ex = self.dirs.exit_record(job_id)  # the runner may have written it just now
            if ex is not None:
                info.update(exit_info(ex))
                return info
            stopped = self.dirs.stop_requested(job_id) or state.state == "CANCELLED"
            info.update(status=TaskStatus.STOPPED if stopped else TaskStatus.FAILED, state=state.state,
                        reason=state.reason or FAILURE_TEXT.get(state.state, state.state.lower()),
                        exit_code=state.exit_code)
        return info

    def job_logs(self, job_id: str) -> str:
        return self.dirs.logs(job_id)

    def job_result(self, job_id: str) -> Any:
        return self.dirs.result(job_id)

    def job_stop(self, job_id: str) -> bool:
        record = self.dirs.record(job_id)
        info = self.job_info(job_id)
        if info["status"] in TaskStatus.FINAL or not record.get("scheduler_job_id"):
            return False
        self.dirs.mark_stopped(job_id)
        self.provider.scheduler.cancel([record["scheduler_job_id"]])
        return True
