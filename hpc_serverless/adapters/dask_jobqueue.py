"""dask-jobqueue and distributed, where the pilot engine needs more than their public API.

The one module that touches their private names, each listed here with its reason; the
contract test tests/unit/test_dask_contract.py checks that they still exist with the
expected signatures, and pyproject.toml pins ``dask-jobqueue<0.10`` because of them:

- ``Job._submit_job(self, script_filename)`` (a coroutine): overridden so that a pilot job
  is submitted through the site's transport, counted like every other scheduler command,
  from a script written to the site's storage (dask-jobqueue runs ``submit_command`` on a
  local temporary file, with no hook for the runner of the command).
- ``Job._call(cmd, **kwargs)`` (a static coroutine): overridden so that ``scancel``/``qdel``
  of a job (``Job.close``) runs through the same transport; dask-jobqueue has no public
  hook for how its commands run.
- ``Scheduler.tasks`` (distributed): a chunk's dask state (``processing``, ``memory``...)
  for :meth:`TaskRef.info`, read by :func:`task_states` on the scheduler's own event loop
  through the public ``Client.run_on_scheduler`` (never from another thread).

Not a private name, but a workaround kept here too: dask_jobqueue's import sets a SIGINT
handler; :func:`import_jobqueue` restores the previous one (and, outside the main thread,
where none can be set, keeps ``signal.signal`` from acting for the import's duration).

Everything else the engine uses is public: the cluster classes and their keywords,
``Cluster.scheduler_info`` (the connected workers, kept up to date by the cluster),
``Client.map``, futures and their ``status``, ``Client.subscribe_topic``.
"""

from __future__ import annotations

import asyncio
import secrets
import shlex
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any, Iterable, Protocol

from hpc_serverless.core.private import check_chain, open_private

if TYPE_CHECKING:
    from hpc_serverless.adapters.schedulers.base import Scheduler
    from hpc_serverless.adapters.transport.base import Transport
    from hpc_serverless.core.fs import LocalFS

__all__ = ["JobHooks", "SLURM_HEADER_OPTIONS", "import_jobqueue", "job_class", "task_states"]

#: sbatch options that dask-jobqueue's SLURMCluster writes in its own header (from its
#: cores, memory, walltime, queue, account and job_name keywords); ours would repeat them
SLURM_HEADER_OPTIONS = frozenset({"nodes", "ntasks-per-node", "cpus-per-task", "time", "mem",
                                  "partition", "account"})

_IMPORT_LOCK = threading.Lock()


def import_jobqueue() -> Any:
    """dask_jobqueue, imported without letting it keep its SIGINT handler.

    Its ``runner`` module sets one at import (SIGINT exits the process), which would replace
    the user's Ctrl-C handling, and which raises ValueError outside the main thread. In the
    main thread (the pilot engine imports it when it starts, in the caller's thread) the
    previous handler is put back right after. Elsewhere (an agent's request thread) no
    handler can be set at all: there, and only for the import, ``signal.signal`` leaves the
    handler as it is.
    """
    with _IMPORT_LOCK:
        if "dask_jobqueue" in sys.modules:
            return sys.modules["dask_jobqueue"]
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            try:
                import dask_jobqueue
            finally:
                if previous is not None:  # None: a handler not set from Python
                    signal.signal(signal.SIGINT, previous)
            return dask_jobqueue
        real = signal.signal

        def keep(signum: Any, handler: Any) -> Any:
            return signal.getsignal(signum)

        signal.signal = keep  # type: ignore[assignment]
        try:
            import dask_jobqueue
        finally:
            signal.signal = real
        return dask_jobqueue


class JobHooks(Protocol):
    """What a pilot job needs from the engine that starts it."""

    script_dir: str
    fs: LocalFS
    transport: Transport
    scheduler: Scheduler

    def job_started(self, job_id: str) -> None: ...

    def submit_failed(self, exc: BaseException) -> None: ...


def _write_script(fs: LocalFS, folder: str, path: str, text: str) -> None:
    """The pilot job's script, 0700 in its private folder, checked before the scheduler
    runs it by path: the folder's chain and the file itself ours, not writable by others."""
    fs.write_atomic(path, text.encode(), 0o700)
    check_chain(folder)
    open_private(path).close()


def job_class(base: type, hooks: JobHooks) -> type:
    """dask-jobqueue's Job for the site's scheduler, its commands run through our transport
    (counted like every other scheduler command, and over SSH if the site has a host)."""

    class PilotJob(base):  # type: ignore[misc,valid-type]
        async def _submit_job(self, script_filename: str) -> str:
            with open(script_filename) as f:
                text = f.read()
            path = f"{hooks.script_dir}/{self.name}-{secrets.token_hex(4)}.sh"
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, lambda: _write_script(hooks.fs, hooks.script_dir, path, text))
            argv = [*shlex.split(self.submit_command), path]
            try:
                # submitted once: with a token, looked up before any retry (submit_once.py);
                # the job id is what dask-jobqueue's job_id_regexp then finds
                out: str = await loop.run_in_executor(None, hooks.scheduler.submit_command, argv, self.job_name)
            except (RuntimeError, OSError) as exc:
                hooks.submit_failed(exc)
                raise
            finally:  # the scheduler keeps its own copy
                await loop.run_in_executor(None, hooks.fs.unlink, path)
            return out

        async def start(self) -> None:
            await super().start()
            hooks.job_started(str(self.job_id))

        @classmethod
        async def _call(cls, cmd: list[str], **kwargs: Any) -> str:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(None, lambda: hooks.transport.run(cmd))
            if not result.ok:
                raise RuntimeError(result.describe())
            return result.stdout

    return PilotJob


def _states_on_scheduler(keys: list[str], dask_scheduler: Any = None) -> dict[str, str]:
    """(Runs on the scheduler's event loop.) The dask state of each known key."""
    tasks = dask_scheduler.tasks
    return {k: tasks[k].state for k in keys if k in tasks}


def task_states(client: Any, keys: Iterable[str]) -> dict[str, str]:
    """The scheduler's state of each key it knows (``processing``, ``memory``, ...)."""
    return dict(client.run_on_scheduler(_states_on_scheduler, list(keys)))
