"""The private names of dask-jobqueue and distributed that adapters/dask_jobqueue.py uses.

If one of these fails after an upgrade, the pilot jobs' submission (through our transport)
or TaskRef.info's dask state no longer works: adapt the adapter, then move the upper bound
of dask-jobqueue in pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import inspect

import pytest

from hpc_serverless.adapters.dask_jobqueue import import_jobqueue

if importlib.util.find_spec("dask_jobqueue") is None:
    pytest.skip("dask-jobqueue is not installed (the 'pilot' extra)", allow_module_level=True)
#: through the adapter: a plain import would leave dask_jobqueue's SIGINT handler in this process
jobqueue = import_jobqueue()


@pytest.mark.parametrize("cluster", ["SLURMCluster", "PBSCluster"])
def test_job_submit_hook(cluster):
    """Job._submit_job(self, script_filename) is a coroutine that returns the command's output."""
    job_cls = getattr(jobqueue, cluster).job_cls
    hook = job_cls._submit_job
    assert inspect.iscoroutinefunction(hook)
    assert list(inspect.signature(hook).parameters) == ["self", "script_filename"]
    assert isinstance(job_cls.submit_command, str) and job_cls.submit_command


@pytest.mark.parametrize("cluster", ["SLURMCluster", "PBSCluster"])
def test_job_call_hook(cluster):
    """Job._call(cmd, **kwargs) runs every scheduler command (submit and cancel) of a job."""
    job_cls = getattr(jobqueue, cluster).job_cls
    hook = inspect.getattr_static(job_cls, "_call")
    assert isinstance(hook, (staticmethod, classmethod))
    fn = hook.__func__
    assert inspect.iscoroutinefunction(fn)
    params = inspect.signature(fn).parameters
    assert next(iter(params)) == "cmd"
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    # Job.close cancels through it, with the job's cancel_command
    assert "_call" in inspect.getsource(job_cls._close_job)


def test_scheduler_tasks():
    """distributed's Scheduler keeps its task states in `tasks` (key -> TaskState.state)."""
    from distributed.scheduler import Scheduler, TaskState

    assert "tasks" in inspect.getsource(Scheduler.__init__)
    assert "state" in TaskState.__slots__ or hasattr(TaskState, "state")


def test_the_adapter_overrides_exactly_these():
    """The Job class our adapter builds overrides the checked hooks and nothing else private."""
    from hpc_serverless.adapters.dask_jobqueue import job_class

    cls = job_class(jobqueue.SLURMCluster.job_cls, hooks=None)  # type: ignore[arg-type]
    private = sorted(n for n in vars(cls) if n.startswith("_") and not n.startswith("__") and n != "_abc_impl")
    assert private == ["_call", "_submit_job"]
