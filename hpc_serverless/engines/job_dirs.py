"""A Program's job directory, the same on every provider: `record.json` (what was asked),
the arguments object, `workdir/` (a copy of the working dir), `output.log`, `exit.json`
(written by the runner), `stop-requested`, and the result object. The local and batch
program engines differ in how they start and judge a job, not in these files."""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import stat
from typing import Any, Mapping

from hpc_serverless.core.errors import (
    CorruptRecordError,
    EnvironmentBuildError,
    HPCServerlessError,
    JobNotFoundError,
)
from hpc_serverless.core.fs import LOCAL, LocalFS
from hpc_serverless.core.jobs import ARGUMENTS_KEY, RESULT_KEY, Program
from hpc_serverless.core.private import make_private
from hpc_serverless.core.store import ObjectStore

__all__ = ["JobDirs", "exit_info", "new_record"]


class JobDirs:
    """The job directories under `root` (one per job id) of provider `provider`."""

    def __init__(self, root: str, provider: str, fs: LocalFS = LOCAL, where: str | None = None,
                 private_root: str | None = None) -> None:
        self.root, self.provider, self.fs = root, provider, fs
        self.where = where or root  # as a user would look for them (host:path for a remote site)
        #: the checked root job directories are private from (a site's storage; else `root`)
        self.private_root = private_root or root

    def path(self, job_id: str, *name: str) -> str:
        """A job's directory (or a file in it); refuses ids that are not one plain name."""
        if not job_id or "/" in job_id or job_id.startswith(".") or "\n" in job_id:
            raise HPCServerlessError(f"invalid job id {job_id!r}")
        return posixpath.join(self.root, job_id, *name)

    def record(self, job_id: str) -> dict[str, Any]:
        try:
            return self._json(job_id, "record.json")
        except FileNotFoundError:
            raise JobNotFoundError(f"no job {job_id!r} on provider '{self.provider}' (looked in {self.where})",
                                   job_id=job_id, where=self.where) from None

    def _json(self, job_id: str, name: str) -> dict[str, Any]:
        path = self.path(job_id, name)
        raw = self.fs.read_bytes(path)
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
            raise CorruptRecordError(f"{path} of job {job_id!r} is damaged ({len(raw)} bytes, not whole "
                                     f"JSON: {exc}); the job's other files are in {self.path(job_id)}") from None
        if not isinstance(data, dict):
            raise CorruptRecordError(f"{path} of job {job_id!r} holds {type(data).__name__}, not a record")
        return data

    def write_record(self, job_id: str, record: Mapping[str, Any]) -> None:
        self.fs.write_atomic(self.path(job_id, "record.json"), json.dumps(record, indent=1).encode())

    def exit_record(self, job_id: str) -> dict[str, Any] | None:
        """What the runner wrote when the program ended (None while it has not)."""
        try:
            return self._json(job_id, "exit.json")
        except FileNotFoundError:
            return None

    def stage(self, job_id: str, record: Mapping[str, Any], arguments: Mapping[str, Any] | None,
              workdir: str) -> str:
        """Create the job's directory (private) with its record, arguments and a copy of the
        working dir; its path."""
        job_dir = self.path(job_id)
        make_private(self.private_root, job_dir)  # the job runs what is in it: 0700 from the root down
        self.write_record(job_id, record)
        ObjectStore(job_dir).put(dict(arguments or {}), ARGUMENTS_KEY, what="the program's arguments")
        copy = posixpath.join(job_dir, "workdir")
        shutil.copytree(workdir, copy, symlinks=True, dirs_exist_ok=True)
        _no_group_write(copy)
        return job_dir

    def refuse(self, job_id: str, record: Mapping[str, Any], output: str, reason: str) -> None:
        """A job refused before it ran (nothing staged, nothing queued): its record, the
        output that says why (logs()), and an exit record FAILED/REFUSED with `reason`."""
        self.fs.makedirs(self.path(job_id), 0o700)
        self.write_record(job_id, record)
        self.fs.write_atomic(self.path(job_id, "output.log"), output.encode())
        self.fs.write_atomic(self.path(job_id, "exit.json"), json.dumps(
            {"status": "FAILED", "state": "REFUSED", "reason": reason, "exit_code": None,
             "ended": record.get("created")}).encode())

    def refuse_environment(self, error: EnvironmentBuildError, job_id: str,
                           record: Mapping[str, Any]) -> EnvironmentBuildError:
        """Record a Program whose dependencies could not be installed (its logs() are the
        installer's output) and return the error to raise, naming the job."""
        reason = "its dependencies could not be installed (job.logs() shows the installer's output)"
        self.refuse(job_id, {**record, "refused": reason}, error.output or str(error), reason)
        out = EnvironmentBuildError(f"{error}\nNothing was queued; job {job_id} records the refusal "
                                    f"(`hpc-serverless logs {job_id}` shows the installer's whole output)")
        out.output, out.job_id = error.output, job_id
        return out

    def ids(self) -> list[str]:
        """Job ids, newest first."""
        try:
            names = self.fs.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted((n for n in names if not n.startswith(".")), reverse=True)

    def logs(self, job_id: str) -> str:
        try:
            return self.fs.read_bytes(self.path(job_id, "output.log")).decode(errors="replace")
        except FileNotFoundError:
            return ""

    def result(self, job_id: str) -> Any:
        store = ObjectStore(self.path(job_id))
        return store.get(RESULT_KEY) if store.exists(RESULT_KEY) else None

    def mark_stopped(self, job_id: str) -> None:
        self.fs.write_atomic(self.path(job_id, "stop-requested"), b"")

    def stop_requested(self, job_id: str) -> bool:
        return self.fs.exists(self.path(job_id, "stop-requested"))


def _no_group_write(top: str) -> None:
    """Take group and world write off a copied tree (copytree keeps the source's modes,
    0664/0775 under a group's umask): the job runs the code in it."""
    for here, _dirs, files in os.walk(top):  # each directory is a `here` in its turn
        for name in (*files, ""):
            p = posixpath.join(here, name) if name else here
            st = os.lstat(p)
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o022:
                os.chmod(p, stat.S_IMODE(st.st_mode) & ~0o022)


def new_record(job_id: str, program: Program, provider: str, created: float, **more: Any) -> dict[str, Any]:
    """What every job's record.json holds, plus the engine's own fields."""
    return {"job_id": job_id, "title": program.title, "description": program.description,
            "entrypoint": program.entrypoint, "provider": provider, "created": created,
            "target": program.resources.as_dict(), **more}


def exit_info(ex: Mapping[str, Any]) -> dict[str, Any]:
    """The status fields of job_info from a runner's exit record."""
    return {"status": ex["status"], "state": ex["state"], "reason": ex.get("reason", ""),
            "exit_code": ex.get("exit_code"), "ended": ex.get("ended")}
