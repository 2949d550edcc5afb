"""The pool as seen from inside a task (a pool worker process).

A task that submits tasks of its own, or waits for them, talks to the pool that runs
it through :class:`PoolClient`, over the worker's socket. While it waits, the pool
gives its cores to other tasks, so nested tasks never deadlock.
"""

from __future__ import annotations

import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Sequence

from hpc_serverless.core.errors import GetTimeoutError, HPCServerlessError
from hpc_serverless.core.refs import TaskRef
from hpc_serverless.core.serialization import loads, unpack_exception


class PoolClient:
    """The pool as seen from inside a task: submit, wait, fetch, over the worker's socket."""

    def __init__(self, conn: Connection, key: str) -> None:
        self.conn, self.key = conn, key
        self._lock = threading.Lock()

    def _ask(self, *msg: Any) -> Any:
        with self._lock:
            self.conn.send(msg)
            kind, reply = self.conn.recv()
        assert kind == "reply", kind
        return reply

    def submit_nested(self, fn_bytes: bytes, args_blob: bytes, deps: Sequence[TaskRef], cpu: int,
                      mem_mib: int, env: dict[str, str] | None, time_s: int | None, name: str,
                      mpi: int = 1) -> str:
        ok, value = self._ask("submit", fn_bytes, args_blob, [d.task_id for d in deps], cpu,
                              mem_mib, env, time_s, name, mpi)
        if not ok:
            raise unpack_exception(value)
        return str(value)

    def task_status(self, ref: TaskRef) -> str:
        return str(self._ask("status", ref.task_id))

    def task_info(self, ref: TaskRef) -> dict[str, Any]:
        status = self.task_status(ref)
        return {"status": status, "state": status, "reason": "", "job_id": None}

    def task_cancel(self, ref: TaskRef) -> bool:
        return bool(self._ask("cancel", ref.task_id))

    def task_wait(self, refs: Sequence[TaskRef], num_returns: int,
                  timeout: float | None) -> tuple[list[TaskRef], list[TaskRef]]:
        done_ids = set(self._ask("wait", [r.task_id for r in refs], num_returns, timeout))
        return ([r for r in refs if r.task_id in done_ids],
                [r for r in refs if r.task_id not in done_ids])

    def task_result(self, ref: TaskRef, timeout: float | None) -> Any:
        start = time.monotonic()
        done, _ = self.task_wait([ref], 1, timeout)
        if not done:
            raise GetTimeoutError(f"{ref!r} did not finish within {timeout} s "
                                  f"(waited {time.monotonic() - start:.1f} s)")
        [(ok, payload, status)] = self._ask("fetch", [ref.task_id])
        if status == "UNKNOWN":
            raise HPCServerlessError(f"{ref!r} is not known to the local pool")
        if ok:
            return loads(payload)
        raise unpack_exception(payload)


_client: PoolClient | None = None


def current_client() -> PoolClient | None:
    """The pool client when this process is a pool worker, else None."""
    return _client


def set_client(client: PoolClient) -> None:
    global _client
    _client = client
