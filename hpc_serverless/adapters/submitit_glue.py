"""What the Slurm and PBS schedulers share in driving submitit: how a chunk of calls
becomes one job or one array."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from hpc_serverless.adapters.schedulers.base import BatchTask


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


def submit_calls(executor: Any, tasks: Sequence[BatchTask], store_root: str) -> list[str]:
    """Submit `tasks` (one job, or an array) through a submitit executor; their job ids.
    The executor's files are written where the jobs read them: we are on the login node
    (a remote client's calls arrive here through the agent)."""
    from hpc_serverless.runtime import worker

    if len(tasks) == 1:
        return [executor.submit(worker.run, store_root, tasks[0].ref.task_id).job_id]
    with executor.batch():
        jobs = [executor.submit(worker.run, store_root, t.ref.task_id) for t in tasks]
    return [j.job_id for j in jobs]
