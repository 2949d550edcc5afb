"""Programs on the local provider: detached processes on this machine, one directory each
(record, copy of the working dir, arguments, output, result), found again by job id."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Protocol

from hpc_serverless.core.errors import EnvironmentBuildError, ProgramError
from hpc_serverless.core.fs import LOCAL
from hpc_serverless.core.jobs import ENVIRONMENT_NOTE_ENV, JOB_DIR_ENV, Job, Program, new_job_id
from hpc_serverless.core.launch import module_argv
from hpc_serverless.core.refs import TaskStatus
from hpc_serverless.core.target import Target
from hpc_serverless.engines.environments import Environments
from hpc_serverless.engines.job_dirs import JobDirs, exit_info, new_record

__all__ = ["LocalJobs"]


class JobSite(Protocol):
    """What LocalJobs needs of its provider."""

    name: str

    def check_target(self, target: Target) -> None: ...


class LocalJobs:
    """Programs as detached processes on this machine (develop without a cluster)."""

    def __init__(self, provider: JobSite, root: Path, environments: Environments | None = None) -> None:
        self.provider = provider
        self.root = root
        self.dirs = JobDirs(str(root), provider.name)
        #: where `dependencies` are installed (default: beside the job directories, over this python)
        self.environments = environments or Environments(str(root.parent / "envs"), sys.executable)

    def run(self, program: Program, arguments: Mapping[str, Any] | None) -> Job:
        if not isinstance(program, Program):
            raise ProgramError(f"run_program() takes a Program, not {type(program).__name__}")
        wd = program.check()
        self.provider.check_target(program.resources)
        # built (or found) before the program starts; one that cannot be installed fails here
        job_id = new_job_id(self.provider.name)
        try:
            environment = self.environments.ensure(program.requirements) if program.requirements else None
        except EnvironmentBuildError as exc:
            raise self.dirs.refuse_environment(exc, job_id, new_record(job_id, program, self.provider.name,
                                                                       time.time())) from None
        record = new_record(job_id, program, self.provider.name, time.time(),
                            environment=environment.key if environment else None)
        d = Path(self.dirs.stage(job_id, record, arguments, str(wd)))
        env = dict(os.environ)
        env.update(program.env_vars or {})
        env.update(program.resources.env)
        env[JOB_DIR_ENV] = str(d)
        env["PYTHONUNBUFFERED"] = "1"
        if environment is not None:
            env[ENVIRONMENT_NOTE_ENV] = environment.note()
        if program.resources.cpu > 1 or "HPC_SERVERLESS_CPUS" in env:
            env["HPC_SERVERLESS_CPUS"] = str(program.resources.cpu)
        with open(d / "output.log", "wb") as log:
            proc = subprocess.Popen(
                module_argv(environment.python if environment else sys.executable,
                            "hpc_serverless.runtime.program_runner", str(d), program.entrypoint),
                cwd=d / "workdir", env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        record["pid"] = proc.pid
        self.dirs.write_record(job_id, record)
        return Job(job_id, self, self.provider.name)

    def get(self, job_id: str) -> Job:
        self.dirs.record(job_id)
        return Job(job_id, self, self.provider.name)

    def list(self) -> list[Job]:
        return [Job(i, self, self.provider.name) for i in self.dirs.ids()
                if self.dirs.fs.exists(self.dirs.path(i, "record.json"))]

    # JobBackend
    def job_info(self, job_id: str) -> dict[str, Any]:
        record = self.dirs.record(job_id)
        info = {k: record.get(k) for k in ("job_id", "title", "entrypoint", "created", "pid")}
        ex = self.dirs.exit_record(job_id)
        if ex is not None:
            info.update(exit_info(ex))
        elif _alive(record.get("pid")):
            info.update(status=TaskStatus.RUNNING, state="RUNNING", reason="")
        elif self.dirs.exit_record(job_id) is not None:  # it finished between the two checks
            return self.job_info(job_id)
        elif self.dirs.stop_requested(job_id):  # stopped before its runner could record it
            info.update(status=TaskStatus.STOPPED, state="CANCELLED", reason="stopped by the user")
        else:
            info.update(status=TaskStatus.FAILED, state="LOST",
                        reason="the job's process is gone without writing its exit status "
                               "(killed, or the machine restarted)")
        return info

    def job_logs(self, job_id: str) -> str:
        self.dirs.record(job_id)
        return self.dirs.logs(job_id)

    def job_result(self, job_id: str) -> Any:
        self.dirs.record(job_id)
        return self.dirs.result(job_id)

    def job_stop(self, job_id: str) -> bool:
        record = self.dirs.record(job_id)
        d = Path(self.dirs.path(job_id))
        pid = record.get("pid")
        if not isinstance(pid, int) or (d / "exit.json").exists() or not _alive(pid):
            return False
        self.dirs.mark_stopped(job_id)
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        for _ in range(50):
            if (d / "exit.json").exists() or not _alive(pid):
                break
            time.sleep(0.1)
        else:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _write_stopped(d, "stopped by the user (killed: it did not end within 5 s of SIGTERM)")
        if not (d / "exit.json").exists():  # the runner died before it could write its record
            _write_stopped(d, "stopped by the user")
        return True


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our own finished child not yet reaped) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _write_stopped(job_dir: Path, reason: str) -> None:
    """The exit record of a job the user stopped, written for a runner that could not."""
    if not (job_dir / "exit.json").exists():
        _write_json(job_dir / "exit.json", {"status": TaskStatus.STOPPED, "state": "CANCELLED",
                                            "reason": reason, "exit_code": None, "ended": time.time()})


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    LOCAL.write_atomic(str(path), json.dumps(data, indent=1).encode())
