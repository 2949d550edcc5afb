"""submitit, driven through our transport: the one module that touches submitit's internals.

submitit writes the batch script and the pickle that names our worker function, and inside
the job its runner (`python -m submitit.core._submit`) loads the pickle and writes the
result. We use its public surface for the rest: `update_parameters` (`setup`,
`additional_parameters`, ...), `submit`, `batch()`, `JobPaths`. Submission itself has no
public hook: submitit runs sbatch as a local subprocess, and we need it to go through our
transport (counted, rate-bounded, on the login node through a site's agent, a mock in
tests). So the executors here override or call these private names of
`submitit.core.core.PicklingExecutor` (tests/unit/test_submitit_contract.py checks they
still exist; pyproject.toml pins `submitit<1.6` naming them):

- `_submit_command(command)`: overridden by both executors: the script is written where
  submitit would write it, then sbatch/qsub runs through our transport;
- `_internal_process_submissions(delayed)`: overridden by both, for single jobs and arrays:
  submitit's own Slurm array path submits through a plain `SlurmExecutor` copy of itself (a
  local subprocess), the base class has no arrays at all, and both write the pickles and
  job folders with the umask's modes, where ours are private (0600 in 0700 folders, from
  the site's storage down: submitit's runner unpickles them on the compute node);
- `_make_submission_file_text(command, uid)`: called for the script's text; the PBS
  executor implements it (abstract in submitit);
- `_num_tasks()`: called for the task list of the Job we hand back; the PBS executor
  implements it (abstract in submitit);
- `_submitit_command_str`: overridden so the job's runner starts behind our import guard;
- the PBS executor also implements the other abstract hooks, `_make_submission_command`
  and `_get_job_id_from_submission_command` (unused: `_submit_command` is ours), and
  `_valid_parameters` / `_internal_update_parameters` (its parameter names).

No longer used: `_throttling` (each submission gets a fresh executor, whose throttle never
waits) and a regex rewrite of the `--output` line (`additional_parameters["output"]`, the
documented way to force an sbatch option, puts the log where we want it).

The PBS executor and job environment are a submitit plugin (entry points in pyproject.toml),
so inside a PBS job submitit's runner finds them here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from hpc_serverless.core.errors import ConfigError

try:
    import cloudpickle
    from submitit.core import core, job_environment, utils
    from submitit.slurm.slurm import SlurmExecutor
except ImportError:  # an optional dependency: say which extra brings it
    raise ConfigError("Slurm and PBS sites need submitit: pip install 'hpc-serverless[slurm]'") from None

from hpc_serverless.adapters.schedulers import pbs as P
from hpc_serverless.adapters.schedulers import slurm as S
from hpc_serverless.core.errors import SchedulerError
from hpc_serverless.core.launch import module_command
from hpc_serverless.core.private import make_private, write_private

if TYPE_CHECKING:
    from hpc_serverless.adapters.transport.base import Transport


def _runner_command(python: str, folder: Path) -> str:
    """submitit's in-job runner, behind our guard: the job's working directory cannot shadow
    our package."""
    return module_command(python, "submitit.core._submit", str(folder), unbuffered=True)


def _private(ex: core.PicklingExecutor, folder: Path) -> None:
    """Create `folder` and the levels above it, down from the executor's checked root, 0700,
    and check the chain: submitit's runner unpickles what is in it on the compute node, where
    we cannot check the file, so nobody else may be able to swap it (core/private.py)."""
    root = getattr(ex, "private_root", None) or utils.JobPaths.get_first_id_independent_folder(ex.folder)
    make_private(root, folder)


def _submit_through(ex: core.PicklingExecutor, command: str, submit: Callable[[Path], str]) -> core.Job[Any]:
    """What submitit's `_submit_command` does, with `submit(script) -> job id` in place of its
    local subprocess: the script where submitit would write it (0600, in a private folder),
    the Job it expects back."""
    uid = uuid.uuid4().hex
    folder = utils.JobPaths.get_first_id_independent_folder(ex.folder)
    _private(ex, folder)
    script = folder / f".submission_file_{uid}.sh"
    write_private(script, ex._make_submission_file_text(command, uid).encode())
    try:
        job_id = submit(script)
    except BaseException:
        script.unlink(missing_ok=True)
        raise
    job: core.Job[Any] = ex.job_class(folder=ex.folder, job_id=job_id, tasks=list(range(ex._num_tasks())))
    _private(ex, job.paths.folder)
    job.paths.move_temporary_file(script, "submission_file", keep_as_symlink=True)
    return job


def _submit_pickled(ex: core.PicklingExecutor, delayed: Sequence[utils.DelayedSubmission],
                    timeout_min: int) -> list[core.Job[Any]]:
    """One job for one pickled call, one array job for several (the executor's `map_count`
    parameter tells its script renderer to ask for an array of that size). Ours, not
    submitit's, for single jobs too: the pickles are written 0600 and moved into job folders
    created 0700, where submitit's would take the umask's modes."""
    folder = utils.JobPaths.get_first_id_independent_folder(ex.folder)
    _private(ex, folder)
    pickles = []
    for d in delayed:
        path = folder / f"{uuid.uuid4().hex}.pkl"
        d.set_timeout(timeout_min, ex.max_num_timeout)
        write_private(path, cloudpickle.dumps(d, protocol=cloudpickle.DEFAULT_PROTOCOL))
        pickles.append(path)
    try:
        if len(delayed) == 1:
            jobs = [ex._submit_command(ex._submitit_command_str)]
        else:
            ex.parameters["map_count"] = len(delayed)
            try:
                first = ex._submit_command(ex._submitit_command_str)
            finally:
                ex.parameters.pop("map_count", None)
            jobs = [ex.job_class(folder=ex.folder, job_id=f"{first.job_id}_{i}", tasks=[0])
                    for i in range(len(delayed))]
    except BaseException:
        for path in pickles:
            path.unlink(missing_ok=True)
        raise
    for job, path in zip(jobs, pickles, strict=True):
        _private(ex, job.paths.folder)
        job.paths.move_temporary_file(path, "submitted_pickle")
    return jobs


def submit_calls(executor: core.Executor, task_ids: Sequence[str], store_root: str) -> list[str]:
    """Submit our worker for `task_ids` (one job, or an array) through a submitit executor;
    their job ids. The executor's files are written where the jobs read them: we are on the
    login node (a remote client's calls arrive here through the agent)."""
    from hpc_serverless.runtime import worker

    if len(task_ids) == 1:
        return [executor.submit(worker.run, store_root, task_ids[0]).job_id]
    with executor.batch():
        jobs = [executor.submit(worker.run, store_root, t) for t in task_ids]
    return [j.job_id for j in jobs]


def remove_job_files(jobs_dir: Path, job_ids: Sequence[str]) -> int:
    """Remove submitit's files of finished jobs (their folders: the submitted and result
    pickles, an array's script; the script's link in `jobs_dir`), keeping their logs,
    which sit beside the folders. Returns how many files went. submitit's `JobPaths` says
    where each is; a job still writing its result pickle would fail, so the engine calls
    this only once the job is over."""
    removed = 0
    gone: set[str] = set()
    for job_id in job_ids:
        folder = utils.JobPaths(jobs_dir / "%j", job_id=job_id).folder
        if not folder.is_dir():
            continue
        for f in folder.iterdir():
            f.unlink(missing_ok=True)
            removed += 1
        folder.rmdir()
        gone.add(str(folder))
    if gone:  # the links submitit leaves at the scripts' first names
        for entry in jobs_dir.glob(".submission_file_*"):
            if entry.is_symlink() and os.path.dirname(os.readlink(entry)) in gone:
                entry.unlink(missing_ok=True)
                removed += 1
    return removed


def _plain(submit: Callable[[], str]) -> str:
    return submit()


# -- Slurm ----------------------------------------------------------------------------------------
class TransportSlurmExecutor(SlurmExecutor):
    """submitit's SlurmExecutor (its sbatch script, its parameters) whose sbatch runs through
    our transport."""

    def __init__(self, folder: Path, python: str, transport: Transport, root: Path | None = None) -> None:
        self._transport = transport
        #: runs the sbatch step: the scheduler adapter's submit_once (a lookup of the
        #: submission's token before any retry); plain by default
        self.guard: Callable[[Callable[[], str]], str] = _plain
        #: the checked root the job folders' chain starts from (the site's storage)
        self.private_root = root
        super().__init__(folder, python=python)

    @classmethod
    def affinity(cls) -> int:  # sbatch runs through our transport (a mock in tests)
        return 2

    def log_file(self, array: bool) -> str:
        """The `--output` of a job: straight in jobs/ (which exists), not in submitit's
        jobs/<id>/, which is made only after sbatch returns (Slurm fails a job whose output
        directory is missing when it starts). Named as submitit names it, so
        `JobPaths(...).stdout` with the folder's parent still finds it."""
        logs = utils.JobPaths.get_first_id_independent_folder(self.folder)
        return f"{logs}/{'%A_%a' if array else '%j'}_0_log.out"

    @property
    def _submitit_command_str(self) -> str:
        return _runner_command(self.python, self.folder)

    def _submit_command(self, command: str) -> core.Job[Any]:
        return _submit_through(self, command, self._sbatch)

    def _sbatch(self, script: Path) -> str:
        def once() -> str:
            result = self._transport.run(["sbatch", "--parsable", str(script)], env=S.JOB_UMASK_ENV)
            if not result.ok:
                raise SchedulerError(f"Slurm refused the job: {result.describe()}",
                                     transient=S.is_transient(result.stderr))
            return S.parse_sbatch(result.stdout)

        return self.guard(once)

    def _internal_process_submissions(self, delayed: list[utils.DelayedSubmission]) -> list[core.Job[Any]]:
        # one pickle per call; several: one sbatch --array for all of them
        return _submit_pickled(self, delayed, self.parameters.get("time", 5))


# -- PBS --------------------------------------------------------------------------------------------
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
    (script lines), `job_name`, `flavor`, `qsub` (the command)."""

    job_class = PBSJob

    def __init__(self, folder: str | Path, python: str = "python3", transport: Transport | None = None,
                 root: Path | None = None) -> None:
        super().__init__(folder)
        self.python = python
        self._transport = transport
        #: runs the qsub step (the scheduler adapter's submit_once; see TransportSlurmExecutor)
        self.guard: Callable[[Callable[[], str]], str] = _plain
        self.private_root = root
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
        return _runner_command(self.python, self.folder)

    def _make_submission_file_text(self, command: str, uid: str) -> str:
        logs = str(self.folder).replace("/%j", "")
        opts = list(self.parameters["options"])
        lines = ["#!/bin/bash", *P.directive_lines(opts), "",
                 "# what the job creates (its log, the result pickle) is private, whatever the umask",
                 f"umask {S.JOB_UMASK}",
                 "# the job's output, live on the shared filesystem (PBS copies -o files only at the end)",
                 'JOBID="${PBS_JOBID:-$SLURM_JOB_ID}"; JOBID="${JOBID%%.*}"; JOBID="${JOBID%%[*}"',
                 'IDX="${PBS_ARRAY_INDEX:-${PBS_ARRAYID:-$SLURM_ARRAY_TASK_ID}}"',
                 f'exec >> {shlex.quote(logs)}/"${{JOBID}}${{IDX:+_$IDX}}".log 2>&1',
                 "", "# PBS starts jobs in $HOME; tasks see the submitting directory, as on Slurm",
                 'cd "${PBS_O_WORKDIR:-.}" 2>/dev/null || true',
                 "", "# setup", *self.parameters["setup"], "", "export SUBMITIT_EXECUTOR=pbs", command, ""]
        return "\n".join(lines)

    def _submit_command(self, command: str) -> core.Job[Any]:
        return _submit_through(self, command, self._qsub)

    def _qsub(self, script: Path) -> str:
        assert self._transport is not None
        count = self.parameters.get("map_count")
        array = [] if not count else ["-J" if self.parameters["flavor"] == "pbspro" else "-t", f"0-{count - 1}"]
        argv = [self.parameters["qsub"], *self.parameters["options"], *array, "-o", "/dev/null", "-j", "oe",
                str(script)]
        transport = self._transport

        def once() -> str:
            result = transport.run(argv)
            if not result.ok:
                raise SchedulerError(f"PBS refused the job: {result.describe()}",
                                     transient=P.is_transient(result.stderr))
            return re.sub(r"\[\]", "", P.short_id(P.parse_qsub(result.stdout)))

        return self.guard(once)

    def _internal_process_submissions(self, delayed: list[utils.DelayedSubmission]) -> list[core.Job[Any]]:
        return _submit_pickled(self, delayed, 60)

    def _num_tasks(self) -> int:
        return 1

    def _make_submission_command(self, submission_file_path: Path) -> list[str]:
        return [self.parameters["qsub"], *self.parameters["options"], str(submission_file_path)]

    @staticmethod
    def _get_job_id_from_submission_command(string: bytes | str) -> str:
        text = string.decode() if isinstance(string, bytes) else string
        return re.sub(r"\[\]", "", P.short_id(P.parse_qsub(text)))


__all__ = ["PBSExecutor", "PBSJob", "PBSJobEnvironment", "TransportSlurmExecutor", "remove_job_files",
           "submit_calls"]
