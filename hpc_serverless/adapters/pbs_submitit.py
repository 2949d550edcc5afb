"""A submitit plugin for PBS Pro and Torque (entry points in the `submitit` group).

Registered in pyproject.toml, so inside a PBS job submitit's own runner
(`python -m submitit.core._submit`) finds :class:`PBSJobEnvironment` and the job's
pickle. The executor's qsub goes through our transport, like Slurm's sbatch.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import submitit
from submitit.core import core, job_environment, utils

from hpc_serverless.adapters.schedulers import pbs as P
from hpc_serverless.adapters.submitit_glue import submit_array
from hpc_serverless.core.errors import SchedulerError
from hpc_serverless.core.launch import module_command

if TYPE_CHECKING:
    from hpc_serverless.adapters.transport.base import Transport


def _first(*names: str) -> str | None:
    for n in names:
        v = os.environ.get(n)
        if v:
            return v
    return None


class PBSJobEnvironment(job_environment.JobEnvironment):
    """Who am I inside a PBS job. Slurm's PBS wrappers (the test cluster) set only Slurm's
    variables, so those are read as a fallback."""

    _env = {"job_id": "PBS_JOBID", "num_tasks": "PBS_TASKNUM", "num_nodes": "PBS_NUM_NODES",
            "node": "PBS_NODENUM", "global_rank": "PBS_TASKNUM", "local_rank": "PBS_TASKNUM"}

    @property
    def raw_job_id(self) -> str:
        jid = _first("PBS_JOBID", "SLURM_JOB_ID") or "unknown"
        return re.sub(r"\[\d*\]", "", P.short_id(jid))

    @property
    def array_task_id(self) -> str | None:
        return _first("PBS_ARRAY_INDEX", "PBS_ARRAYID", "SLURM_ARRAY_TASK_ID")

    @property
    def array_job_id(self) -> str | None:
        if self.array_task_id is None:
            return None
        parent = _first("PBS_ARRAY_ID", "SLURM_ARRAY_JOB_ID") or _first("PBS_JOBID") or ""
        return re.sub(r"\[\d*\]", "", P.short_id(parent))

    @property
    def num_tasks(self) -> int:
        return 1

    @property
    def global_rank(self) -> int:
        return 0

    @property
    def local_rank(self) -> int:
        return 0

    def _requeue(self, countdown: int) -> None:
        qrerun = os.path.join(os.environ.get("HPC_SERVERLESS_COMMANDS_DIR", ""), "qrerun")
        subprocess.check_call([qrerun, os.environ.get("PBS_JOBID", self.raw_job_id)], timeout=60)


class PBSJob(core.Job):  # type: ignore[type-arg]
    """A submitted PBS job as submitit sees it (paths only: we poll states ourselves)."""


class PBSExecutor(core.PicklingExecutor):
    """qsub submissions of pickled calls. Parameters: `options` (qsub argv), `setup`
    (script lines), `job_name`, `flavor`."""

    job_class = PBSJob

    def __init__(self, folder: str | Path, python: str = "python3", transport: Transport | None = None) -> None:
        super().__init__(folder)
        self.python = python
        self._transport = transport
        self._throttling = 0.0
        self.parameters: dict[str, Any] = {"options": [], "setup": [], "flavor": "pbspro", "qsub": "qsub"}

    @classmethod
    def _valid_parameters(cls) -> set[str]:
        return {"options", "setup", "flavor", "job_name", "qsub"}

    def _internal_update_parameters(self, **kwargs: Any) -> None:
        bad = set(kwargs) - self._valid_parameters()
        if bad:
            raise ValueError(f"unknown PBS executor parameter(s) {sorted(bad)}")
        self.parameters.update(kwargs)

    @property
    def _submitit_command_str(self) -> str:
        return module_command(self.python, "submitit.core._submit", str(self.folder), unbuffered=True)

    def _make_submission_file_text(self, command: str, uid: str) -> str:
        logs = str(self.folder).replace("/%j", "")
        opts = list(self.parameters["options"])
        lines = ["#!/bin/bash", *P.directive_lines(opts), "",
                 "# the job's output, live on the shared filesystem (PBS copies -o files only at the end)",
                 'JOBID="${PBS_JOBID:-$SLURM_JOB_ID}"; JOBID="${JOBID%%.*}"; JOBID="${JOBID%%[*}"',
                 'IDX="${PBS_ARRAY_INDEX:-${PBS_ARRAYID:-$SLURM_ARRAY_TASK_ID}}"',
                 f'exec >> {shlex.quote(logs)}/"${{JOBID}}${{IDX:+_$IDX}}".log 2>&1',
                 "", "# PBS starts jobs in $HOME; tasks see the submitting directory, as on Slurm",
                 'cd "${PBS_O_WORKDIR:-.}" 2>/dev/null || true',
                 "", "# setup", *self.parameters["setup"], "", "export SUBMITIT_EXECUTOR=pbs", command, ""]
        return "\n".join(lines)

    def _qsub(self, script: Path, extra: list[str]) -> str:
        assert self._transport is not None
        argv = [self.parameters["qsub"], *self.parameters["options"], *extra, "-o", "/dev/null", "-j", "oe",
                str(script)]
        result = self._transport.run(argv)
        if not result.ok:
            raise SchedulerError(f"PBS refused the job: {result.describe()}",
                                 transient=P.is_transient(result.stderr))
        return re.sub(r"\[\]", "", P.short_id(P.parse_qsub(result.stdout)))

    def _submit_command(self, command: str) -> core.Job[Any]:
        uid = uuid.uuid4().hex
        folder = utils.JobPaths.get_first_id_independent_folder(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        script = folder / f".submission_file_{uid}.sh"
        script.write_text(self._make_submission_file_text(command, uid))
        count = self.parameters.get("map_count")
        extra = [] if not count else ["-J" if self.parameters["flavor"] == "pbspro" else "-t", f"0-{count - 1}"]
        job_id = self._qsub(script, extra)
        job: core.Job[Any] = PBSJob(folder=self.folder, job_id=job_id, tasks=[0])
        job.paths.move_temporary_file(script, "submission_file", keep_as_symlink=True)
        return job

    def _internal_process_submissions(self, delayed: list[utils.DelayedSubmission]) -> list[core.Job[Any]]:
        if len(delayed) == 1:
            return super()._internal_process_submissions(delayed)
        return submit_array(self, delayed, PBSJob, 60)

    def _num_tasks(self) -> int:
        return 1

    def _make_submission_command(self, submission_file_path: Path) -> list[str]:
        return [self.parameters["qsub"], *self.parameters["options"], str(submission_file_path)]

    @staticmethod
    def _get_job_id_from_submission_command(string: bytes | str) -> str:
        text = string.decode() if isinstance(string, bytes) else string
        return re.sub(r"\[\]", "", P.short_id(P.parse_qsub(text)))


__all__ = ["PBSExecutor", "PBSJob", "PBSJobEnvironment", "submitit"]
