"""What the Slurm and PBS schedulers share in driving submitit: where its files go when
the site is reached over SSH, and how a chunk of calls becomes one job or one array."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from ..transport.base import Transport
    from .batch import BatchTask


def place_script(transport: Transport, paths: tuple[str, str] | None, local_script: Path,
                 uid: str, text: str) -> str:
    """The path to hand to sbatch/qsub. Over SSH (`paths` = local staging root, site
    root) the script is written on the site, with its paths rewritten."""
    if paths is None:
        return str(local_script)
    local, remote = paths
    target = f"{remote}/.submission_file_{uid}.sh"
    fs = transport.filesystem()
    fs.makedirs(remote, 0o700)
    fs.write_atomic(target, text.replace(local, remote).encode(), mode=0o700)
    return target


def submit_array(ex: Any, delayed: Sequence[Any], job_class: type, timeout_min: int) -> list[Any]:
    """One array job for several pickled calls (submitit's executors submit one by one,
    or, for Slurm, through a plain copy of themselves that would bypass our transport).

    The executor's `map_count` parameter tells its script renderer to ask for an array."""
    import uuid

    from submitit.core import utils as su

    folder = su.JobPaths.get_first_id_independent_folder(ex.folder)
    folder.mkdir(parents=True, exist_ok=True)
    pickles = []
    for d in delayed:
        path = folder / f"{uuid.uuid4().hex}.pkl"
        d.set_timeout(timeout_min, ex.max_num_timeout)
        d.dump(path)
        pickles.append(path)
    ex.parameters["map_count"] = len(delayed)
    try:
        first = ex._submit_command(ex._submitit_command_str)
    finally:
        ex.parameters.pop("map_count", None)
    jobs = [job_class(folder=ex.folder, job_id=f"{first.job_id}_{i}", tasks=[0]) for i in range(len(delayed))]
    for job, path in zip(jobs, pickles, strict=True):
        job.paths.move_temporary_file(path, "submitted_pickle")
    return jobs


def submit_calls(transport: Transport, jobs_root: str, make_executor: Callable[[Path | None], Any],
                 tasks: Sequence[BatchTask], store_root: str) -> list[str]:
    """Submit `tasks` (one job, or an array) through an executor from `make_executor`.

    `make_executor(staging)` gets None on a login node; over SSH a local staging
    directory, whose files (the pickles the jobs wait for: submitit allows them 60 s)
    are uploaded to `jobs_root` in one tar stream right after submission."""
    from .. import worker

    staging = Path(tempfile.mkdtemp(prefix="hpcs-submitit-")) if transport.filesystem().remote else None
    try:
        ex = make_executor(staging)
        if len(tasks) == 1:
            job_ids = [ex.submit(worker.run, store_root, tasks[0].ref.task_id).job_id]
        else:
            with ex.batch():
                jobs = [ex.submit(worker.run, store_root, t.ref.task_id) for t in tasks]
            job_ids = [j.job_id for j in jobs]
        if staging is not None:
            for link in [p for p in (staging / "jobs").rglob("*") if p.is_symlink()]:
                link.unlink()  # submitit's local conveniences, meaningless on the site
            transport.upload_tree(str(staging / "jobs"), jobs_root)
        return job_ids
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
