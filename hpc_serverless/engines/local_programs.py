"""Programs on the local provider: detached processes on this machine, one directory each
(record, copy of the working dir, arguments, output, result), found again by job id."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Protocol

from hpc_serverless.core.errors import HPCServerlessError, JobNotFoundError, ProgramError
from hpc_serverless.core.fs import LOCAL
from hpc_serverless.core.jobs import ARGUMENTS_KEY, JOB_DIR_ENV, RESULT_KEY, Job, Program, new_job_id
from hpc_serverless.core.launch import module_argv
from hpc_serverless.core.refs import TaskStatus
from hpc_serverless.core.store import ObjectStore
from hpc_serverless.core.target import Target

__all__ = ["LocalJobs"]


class JobSite(Protocol):
    """What LocalJobs needs of its provider."""

    name: str

    def check_target(self, target: Target) -> None: ...


class LocalJobs:
    """Programs as detached processes on this machine (develop without a cluster)."""

    def __init__(self, provider: JobSite, root: Path) -> None:
        self.provider = provider
        self.root = root

    def _dir(self, job_id: str) -> Path:
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise HPCServerlessError(f"invalid job id {job_id!r}")
        d = self.root / job_id
        if not (d / "record.json").exists():
            raise JobNotFoundError(f"no job {job_id!r} on provider '{self.provider.name}' "
                                   f"(looked in {self.root})", job_id=job_id, where=str(self.root))
        return d

    def run(self, program: Program, arguments: Mapping[str, Any] | None) -> Job:
        if not isinstance(program, Program):
            raise ProgramError(f"run_program() takes a Program, not {type(program).__name__}")
        wd = program.check()
        self.provider.check_target(program.resources)
        _check_dependencies(program)
        job_id = new_job_id(self.provider.name)
        d = self.root / job_id
        d.mkdir(mode=0o700, parents=True)
        store = ObjectStore(d)
        store.put(dict(arguments or {}), ARGUMENTS_KEY, what="the program's arguments")
        shutil.copytree(wd, d / "workdir", symlinks=True)
        record = {"job_id": job_id, "title": program.title, "description": program.description,
                  "entrypoint": program.entrypoint, "provider": self.provider.name,
                  "created": time.time(), "target": program.resources.as_dict()}
        env = dict(os.environ)
        env.update(program.env_vars or {})
        env.update(program.resources.env)
        env[JOB_DIR_ENV] = str(d)
        env["PYTHONUNBUFFERED"] = "1"
        if program.resources.cpu > 1 or "HPC_SERVERLESS_CPUS" in env:
            env["HPC_SERVERLESS_CPUS"] = str(program.resources.cpu)
        with open(d / "output.log", "wb") as log:
            proc = subprocess.Popen(
                module_argv(sys.executable, "hpc_serverless.runtime.program_runner", str(d), program.entrypoint),
                cwd=d / "workdir", env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        record["pid"] = proc.pid
        _write_json(d / "record.json", record)
        return Job(job_id, self, self.provider.name)

    def get(self, job_id: str) -> Job:
        self._dir(job_id)
        return Job(job_id, self, self.provider.name)

    def list(self) -> list[Job]:
        if not self.root.is_dir():
            return []
        ids = sorted((p.name for p in self.root.iterdir() if (p / "record.json").exists()), reverse=True)
        return [Job(i, self, self.provider.name) for i in ids]

    # JobBackend
    def job_info(self, job_id: str) -> dict[str, Any]:
        d = self._dir(job_id)
        record = json.loads((d / "record.json").read_text())
        info = {k: record.get(k) for k in ("job_id", "title", "entrypoint", "created", "pid")}
        exit_file = d / "exit.json"
        if exit_file.exists():
            ex = json.loads(exit_file.read_text())
            info.update(status=ex["status"], state=ex["state"], reason=ex.get("reason", ""),
                        ended=ex.get("ended"), exit_code=ex.get("exit_code"))
        elif _alive(record.get("pid")):
            info.update(status=TaskStatus.RUNNING, state="RUNNING", reason="")
        elif exit_file.exists():  # it finished between the two checks
            return self.job_info(job_id)
        elif (d / "stop-requested").exists():  # stopped before its runner could record it
            info.update(status=TaskStatus.STOPPED, state="CANCELLED", reason="stopped by the user")
        else:
            info.update(status=TaskStatus.FAILED, state="LOST",
                        reason="the job's process is gone without writing its exit status "
                               "(killed, or the machine restarted)")
        return info

    def job_logs(self, job_id: str) -> str:
        return (self._dir(job_id) / "output.log").read_text(errors="replace")

    def job_result(self, job_id: str) -> Any:
        d = self._dir(job_id)
        if not (d / RESULT_KEY).exists():
            return None
        return ObjectStore(d).get(RESULT_KEY)

    def job_stop(self, job_id: str) -> bool:
        d = self._dir(job_id)
        record = json.loads((d / "record.json").read_text())
        pid = record.get("pid")
        if (d / "exit.json").exists() or not _alive(pid):
            return False
        (d / "stop-requested").touch()
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


def _check_dependencies(program: Program) -> None:
    """On the local provider, dependencies must already be installed: say which are not."""
    if not program.dependencies:
        return
    import importlib.metadata as md
    import re

    missing = []
    for req in program.dependencies:
        name = re.split(r"[\s<>=!~\[;]", str(req).strip(), maxsplit=1)[0]
        try:
            md.version(name)
        except md.PackageNotFoundError:
            missing.append(str(req))
    if missing:
        raise ProgramError(f"Program {program.title!r} depends on {', '.join(missing)}, not installed "
                           f"for {sys.executable}; install with: pip install {' '.join(missing)}")
