"""Programs: whole scripts run as detached jobs, found again later by their id.

A job has a directory (its record, a copy of the working dir, the arguments, the
output, the result). Everything a later process needs is in that directory, so
``get_job_by_id`` works from any process that can read it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

from hpc_serverless.core.errors import (
    GetTimeoutError,
    HPCServerlessError,
    JobFailedError,
    JobNotFoundError,
    ProgramError,
)
from hpc_serverless.core.launch import module_argv
from hpc_serverless.core.refs import TaskStatus
from hpc_serverless.core.store import ObjectStore
from hpc_serverless.core.target import Target

if TYPE_CHECKING:
    from hpc_serverless.providers.base import Provider
    from hpc_serverless.providers.local import LocalProvider

__all__ = ["Program", "Job", "get_arguments", "save_result", "LocalJobs", "find_job", "new_job_id"]

JOB_DIR_ENV = "HPC_SERVERLESS_JOB_DIR"
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
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = poll
        while True:
            status = self.status()
            if status in TaskStatus.FINAL:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise GetTimeoutError(f"job {self.job_id} did not finish within {timeout} s (it is {status})")
            time.sleep(delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic())))
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


# -- inside a program ---------------------------------------------------------------------------
def _job_dir() -> Path | None:
    d = os.environ.get(JOB_DIR_ENV)
    return Path(d) if d else None


def get_arguments() -> dict[str, Any]:
    """The arguments given to run_program ({} when not running as a program)."""
    d = _job_dir()
    if d is None or not (d / ARGUMENTS_KEY).exists():
        return {}
    return dict(ObjectStore(d).get(ARGUMENTS_KEY))


def save_result(result: Any) -> bool:
    """Store the program's result for job.result(); outside a program, print it."""
    d = _job_dir()
    if d is None:
        print(f"save_result (not running as a program): {result!r}")
        return False
    ObjectStore(d).put(result, RESULT_KEY, what="the program's result", overwrite=True)
    return True


# -- the local runner ------------------------------------------------------------------------------
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


def find_job(job_id: str, providers: Sequence[Provider], current: Provider) -> Job:
    """The job `job_id` on whichever provider has it: the one the id names first, then
    `current`, then the rest in configuration order. A provider that is not connected
    and would need a password or one-time code to log in is not searched (nobody should be
    asked for a code just to look), and the error says so, beside where it did look."""
    named = provider_of_job_id(job_id)
    order = [p for p in providers if p.name == named] + [current] + list(providers)
    seen: set[int] = set()
    looked: list[str] = []
    skipped: list[str] = []
    for provider in order:
        if id(provider) in seen:
            continue
        seen.add(id(provider))
        chosen = provider is current or provider.name == named
        if not chosen:
            blocker = provider.search_blocker()
            if blocker is not None:
                skipped.append(f"{provider.name} ({blocker})")
                continue
        try:
            return provider.get_job_by_id(job_id)
        except JobNotFoundError as exc:
            looked.append(f"{provider.name} ({exc.where})")
    where = "; ".join(looked)
    message = f"no job {job_id!r} on any configured provider; looked on: {where}"
    if skipped:
        message += (f"; not searched: {'; '.join(skipped)} (to look there, choose the provider: "
                    "--provider NAME, or set_provider(NAME))")
    raise JobNotFoundError(message, job_id=job_id, where=where)


class LocalJobs:
    """Programs as detached processes on this machine (develop without a cluster)."""

    def __init__(self, provider: LocalProvider) -> None:
        from hpc_serverless.providers.local import default_home

        self.provider = provider
        self.root = default_home() / "jobs"

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
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(3)}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


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
