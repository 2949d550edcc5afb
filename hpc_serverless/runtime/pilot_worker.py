"""What runs inside a pilot worker: a chunk of calls sent by the pilot engine.

dask-jobqueue starts the pilot jobs' dask workers; the engine
(:mod:`hpc_serverless.engines.pilot`) sends them :func:`run_calls` with a chunk of calls.
Each call runs through :func:`hpc_serverless.core.calls.execute`, so a task fails with the
same exception types as in job mode. Kept apart from the engine so that a worker imports
only what it runs (no dask-jobqueue, no scheduler code).
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any

from hpc_serverless.core.calls import execute
from hpc_serverless.core.errors import upstream_failed
from hpc_serverless.core.serialization import loads, pack_exception, unpack_exception
from hpc_serverless.core.store import ObjectStore
from hpc_serverless.runtime.worker import result_key

__all__ = ["STARTED_TOPIC", "dep_value", "run_calls"]

#: the event a chunk sends when it starts (so a TaskRef says RUNNING only when it runs)
STARTED_TOPIC = "hpc-serverless-pilot-started"

#: functions unpickled once per worker process, by key
_FUNCTIONS: dict[str, Any] = {}
_JOB_ID = os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID") or ""
_HOST = platform.node()


def dep_value(store_root: str, dep_id: str, dep_name: str, outcome: tuple[Any, ...]) -> Any:
    """The value of an upstream task's outcome, or the DependencyError a failed one means."""
    ok, payload, _job = outcome
    if payload is None:  # stored: too big for a dask message
        ok, payload, _info = ObjectStore(store_root).get(result_key(dep_id))
    if not ok:
        raise upstream_failed(f"{dep_name}#{dep_id}", unpack_exception(payload))
    return loads(payload)


def _announce_start() -> None:
    """Tell the client that this chunk runs now, and on which worker (its RUNNING status
    lasts while that worker is connected)."""
    try:
        from distributed import get_worker

        w = get_worker()
        w.log_event(STARTED_TOPIC, {"key": w.get_current_task(), "job": _JOB_ID, "worker": w.address})
    except Exception:  # noqa: BLE001 - only the RUNNING status depends on it
        pass


def run_calls(calls: list[tuple[Any, ...]], upstream: list[list[tuple[Any, ...]]],
              store_root: str, inline_limit: int) -> list[tuple[Any, ...]]:
    """Run a chunk of calls on a dask worker; one (ok, payload or None, job id) per call.

    A call is (task_id, name, fn_key, fn_bytes, args, env, deps): `args` is the pickled
    (args, kwargs) or, if large, the store key holding them; each dep is
    (task_id, name, (i, pos)) for position `pos` of `upstream[i]`, or (task_id, name, outcome)
    when the client already had the upstream result. A payload of None means: in the store.
    """
    _announce_start()
    out: list[tuple[Any, ...]] = []
    for task_id, name, fn_key, fn_bytes, args, env, deps in calls:
        try:
            fn = _FUNCTIONS.get(fn_key)
            if fn is None:
                fn = _FUNCTIONS[fn_key] = loads(fn_bytes)
            if isinstance(args, str):
                args = ObjectStore(store_root).read_parts(args)[0]
            values = {}
            for dep_id, dep_name, src in deps:
                outcome = upstream[src[0]][src[1]] if len(src) == 2 else src
                values[dep_id] = dep_value(store_root, dep_id, dep_name, outcome)
        except BaseException as exc:  # noqa: BLE001 - the call's failure, reported to the caller
            ok, payload = False, pack_exception(exc)
        else:
            ok, payload = execute(fn, args, values, env)
        if len(payload) > inline_limit:
            info = {"host": _HOST, "job_id": _JOB_ID, "ended": time.time()}
            ObjectStore(store_root).put((ok, payload, info), result_key(task_id), what=f"the result of {name}",
                                        overwrite=True, meta={"ok": ok})
            out.append((ok, None, _JOB_ID))
        else:
            out.append((ok, payload, _JOB_ID))
    return out
