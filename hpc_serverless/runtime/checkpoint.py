"""Checkpoints for long tasks that may be requeued.

A task whose target has ``requeue: N`` is put back in the queue (up to N times) when
its time limit is near or it is preempted, instead of ending as TIMEOUT. It starts
again from the top, so it should save its progress now and then and pick it up::

    @distribute_task(target={"time": 60, "requeue": 3})
    def optimise(theta0):
        state = load_checkpoint(default={"theta": theta0, "step": 0})
        while state["step"] < 1000:
            state = one_step(state)
            if state["step"] % 50 == 0:
                save_checkpoint(state)
        return state["theta"]

Checkpoints live in the site's store, in the task's session (``sessions/<id>/checkpoints/``;
they go with it at ``hpc-serverless gc``), and are written
atomically and durably: written aside, fsynced, then renamed over the previous one, so a
crash mid-save (of the task or of the node) leaves the previous one.
"""

from __future__ import annotations

import os
from typing import Any

TASK_ENV = "HPC_SERVERLESS_TASK_ID"
STORE_ENV = "HPC_SERVERLESS_STORE"


def _where() -> tuple[Any, str] | None:
    task_id, root = os.environ.get(TASK_ENV), os.environ.get(STORE_ENV)
    if not task_id or not root:
        return None
    from hpc_serverless.core.store import ObjectStore
    from hpc_serverless.runtime.worker import checkpoint_key

    return ObjectStore(root), checkpoint_key(task_id)


def save_checkpoint(state: Any) -> bool:
    """Store `state` for a requeued run of this task; False outside a batch task."""
    where = _where()
    if where is None:
        return False
    store, key = where
    # durable at any size: the new one is on disk before it replaces the previous one
    store.put(state, key, what="the checkpoint", overwrite=True, durable=True)
    return True


def load_checkpoint(default: Any = None) -> Any:
    """The state last saved by this task (in an earlier run), else `default`."""
    where = _where()
    if where is None:
        return default
    store, key = where
    if store.exists(key):
        return store.get(key)
    task_id = os.environ[TASK_ENV]
    before = f"checkpoints/{task_id[:2]}/{task_id}"  # where versions before sessions kept it
    return store.get(before) if before != key and store.exists(before) else default
