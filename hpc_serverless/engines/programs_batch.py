"""Programs on batch sites: a rendered script, a staged working dir, a record on the site.

Everything about a job lives in ``<storage>/programs/<job id>/`` on the site's shared
filesystem (record.json, job.sh, workdir/, arguments, output.log, result, exit.json), so
any later process on any login node (or a laptop, through the site's agent) finds it
with the job id alone.
"""

from __future__ import annotations

import json
import posixpath
import shutil
import time
from typing import TYPE_CHECKING, Any, Mapping, Protocol

from hpc_serverless.core.errors import HPCServerlessError, JobNotFoundError, ProgramError, SchedulerError
from hpc_serverless.core.jobs import ARGUMENTS_KEY, JOB_DIR_ENV, RESULT_KEY, Job, Program, new_job_id
from hpc_serverless.core.launch import module_argv
from hpc_serverless.core.refs import TaskStatus
from hpc_serverless.core.store import ObjectStore

if TYPE_CHECKING:
    from hpc_serverless.adapters.schedulers.base import Scheduler
    from hpc_serverless.config.site import Site
    from hpc_serverless.core.fs import LocalFS
    from hpc_serverless.core.target import Target
    from hpc_serverless.engines.batch import BatchBackend


class ProgramSite(Protocol):
    """What program jobs need of their provider (providers/batch.py's BatchProvider)."""

    name: str
    site: Site
    fs: LocalFS
    scheduler: Scheduler
    backend: BatchBackend

    @property
    def store(self) -> ObjectStore: ...

    def effective_target(self, target: Target) -> Target: ...

    def check_target(self, target: Target) -> None: ...


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

    def _dir(self, job_id: str) -> str:
        if not job_id or "/" in job_id or job_id.startswith(".") or "\n" in job_id:
            raise HPCServerlessError(f"invalid job id {job_id!r}")
        return posixpath.join(self.root, job_id)

    def _record(self, job_id: str) -> dict[str, Any]:
        try:
            return dict(json.loads(self.fs.read_bytes(posixpath.join(self._dir(job_id), "record.json"))))
        except FileNotFoundError:
            where = self.where()
            raise JobNotFoundError(f"no job {job_id!r} on provider '{self.provider.name}' "
                                   f"(looked in {where})", job_id=job_id, where=where) from None

    def where(self) -> str:
        """Where the job records are, as a user would look for them."""
        host = self.provider.site.host
        return f"{host}:{self.root}" if host else self.root

    def _write_record(self, job_dir: str, record: Mapping[str, Any]) -> None:
        self.fs.write_atomic(posixpath.join(job_dir, "record.json"), json.dumps(record, indent=1).encode())

    # -- submit -------------------------------------------------------------------------------
    def render(self, program: Program, job_id: str) -> str:
        provider = self.provider
        target = provider.effective_target(program.resources)
        job_dir = self._dir(job_id)
        env = {**dict(program.env_vars or {}), **dict(target.env), JOB_DIR_ENV: job_dir,
               "HPC_SERVERLESS_STORE": str(provider.store.root), "PYTHONUNBUFFERED": "1"}
        return provider.scheduler.program_script(
            target, job_name=program.title, job_id=job_id, job_dir=job_dir, env=env,
            workdir=posixpath.join(job_dir, "workdir"),
            command=module_argv(provider.site.python, "hpc_serverless.runtime.program_runner", job_dir,
                                program.entrypoint))

    def run(self, program: Program, arguments: Mapping[str, Any] | None, *, name: str | None = None) -> Job:
        """Stage and submit; the job id starts with `name` (the client's provider name, which
        an agent serving a remote client is told), else this provider's."""
        if not isinstance(program, Program):
            raise ProgramError(f"run_program() takes a Program, not {type(program).__name__}")
        wd = program.check()  # before anything is written or submitted
        self.provider.check_target(program.resources)
        job_id = new_job_id(name or self.provider.name)
        job_dir = self._dir(job_id)
        script = self.render(program, job_id)
        self.fs.makedirs(job_dir, 0o700)
        record: dict[str, Any] = {
            "job_id": job_id, "title": program.title, "description": program.description,
            "entrypoint": program.entrypoint, "provider": self.provider.name,
            "site": self.provider.site.name, "created": time.time(),
            "target": program.resources.as_dict(), "dependencies": list(program.dependencies or []),
            "scheduler": self.provider.scheduler.name, "scheduler_job_id": None}
        self._write_record(job_dir, record)
        ObjectStore(job_dir).put(dict(arguments or {}), ARGUMENTS_KEY, what="the program's arguments")
        shutil.copytree(wd, posixpath.join(job_dir, "workdir"), symlinks=True, dirs_exist_ok=True)
        script_path = posixpath.join(job_dir, "job.sh")
        self.fs.write_atomic(script_path, script.encode(), mode=0o700)
        try:
            record["scheduler_job_id"] = self.provider.scheduler.submit_script(
                script_path, self.provider.effective_target(program.resources), program.title)
        except SchedulerError as exc:
            record["refused"] = str(exc)
            self._write_record(job_dir, record)
            raise
        self._write_record(job_dir, record)
        return Job(job_id, self, self.provider.name)

    def get(self, job_id: str) -> Job:
        self._record(job_id)
        return Job(job_id, self, self.provider.name)

    def list(self) -> list[Job]:
        try:
            names = self.fs.listdir(self.root)
        except FileNotFoundError:
            return []
        return [Job(n, self, self.provider.name) for n in sorted(names, reverse=True) if not n.startswith(".")]

    # -- JobBackend ---------------------------------------------------------------------------------
    def job_info(self, job_id: str) -> dict[str, Any]:
        record = self._record(job_id)
        job_dir = self._dir(job_id)
        info: dict[str, Any] = {k: record.get(k) for k in ("job_id", "title", "entrypoint", "created",
                                                          "scheduler_job_id")}
        if record.get("refused"):
            info.update(status=TaskStatus.FAILED, state="REFUSED", reason=record["refused"])
            return info
        try:
            ex = json.loads(self.fs.read_bytes(posixpath.join(job_dir, "exit.json")))
        except FileNotFoundError:
            ex = None
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
            info.update(status=ex["status"], state=ex["state"], reason=ex.get("reason", ""),
                        exit_code=ex.get("exit_code"), ended=ex.get("ended"))
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

            try:  # the runner may have written it just now
                ex = json.loads(self.fs.read_bytes(posixpath.join(job_dir, "exit.json")))
                info.update(status=ex["status"], state=ex["state"], reason=ex.get("reason", ""))
                return info
            except FileNotFoundError:
                pass
            stopped = self.fs.exists(posixpath.join(job_dir, "stop-requested")) or state.state == "CANCELLED"
            info.update(status=TaskStatus.STOPPED if stopped else TaskStatus.FAILED, state=state.state,
                        reason=state.reason or FAILURE_TEXT.get(state.state, state.state.lower()),
                        exit_code=state.exit_code)
        return info

    def job_logs(self, job_id: str) -> str:
        try:
            return self.fs.read_bytes(posixpath.join(self._dir(job_id), "output.log")).decode(errors="replace")
        except FileNotFoundError:
            return ""

    def job_result(self, job_id: str) -> Any:
        store = ObjectStore(self._dir(job_id))
        return store.get(RESULT_KEY) if store.exists(RESULT_KEY) else None

    def job_stop(self, job_id: str) -> bool:
        record = self._record(job_id)
        info = self.job_info(job_id)
        if info["status"] in TaskStatus.FINAL or not record.get("scheduler_job_id"):
            return False
        job_dir = self._dir(job_id)
        self.fs.write_atomic(posixpath.join(job_dir, "stop-requested"), b"")
        self.provider.scheduler.cancel([record["scheduler_job_id"]])
        return True
