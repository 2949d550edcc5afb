"""The process a LocalPool runs tasks in: ``python -m hpc_serverless.runtime.pool_worker``.

It reads ("run", ...) messages from its socket, runs each call with
:func:`hpc_serverless.core.calls.execute`, and answers ("done", ...).

A worker leads a process group of its own, so the signals a terminal or a Jupyter
kernel sends to the driver's process group (Ctrl-C, "interrupt kernel") stop the
driver's wait, not the tasks. It ends with the pool: on "exit", on its socket closing, or,
mid-task, when its lifeline (a pipe whose write end only the pool holds) reads EOF
because the driver died, however it died.
"""

from __future__ import annotations

import os
import signal
import threading
from multiprocessing.connection import Connection
from typing import Any, Callable

from hpc_serverless.core.calls import execute
from hpc_serverless.core.refs import register_backend
from hpc_serverless.core.serialization import loads, pack_exception
from hpc_serverless.runtime.pool_client import PoolClient, set_client


def main() -> None:
    key = os.environ.pop("HPC_SERVERLESS_POOL_KEY")
    fd = int(os.environ.pop("HPC_SERVERLESS_POOL_FD"))
    lifeline = os.environ.pop("HPC_SERVERLESS_POOL_LIFELINE", "")
    if lifeline.isdigit():
        threading.Thread(target=_end_with_driver, args=(int(lifeline),), name="hpc-serverless-lifeline",
                         daemon=True).start()
    conn = Connection(fd)
    client = PoolClient(conn, key)
    set_client(client)
    register_backend(client)
    functions: dict[str, Callable[..., Any]] = {}
    fn_raw: dict[str, bytes] = {}  # kept for MPI tasks, whose ranks load the function themselves
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "exit":
            return
        _, task_id, fn_key, fn_bytes, args_blob, deps_raw, env, mpi = msg
        try:
            fn = functions.get(fn_key)
            if fn is None:
                fn = functions[fn_key] = loads(fn_bytes)
                fn_raw[fn_key] = fn_bytes
            deps = {tid: loads(payload) for tid, (ok, payload, _name) in deps_raw.items() if ok}
        except BaseException as exc:  # noqa: BLE001 - reported as the task's failure
            conn.send(("done", task_id, False, pack_exception(exc)))
            continue
        if mpi > 1:
            from hpc_serverless.runtime.worker import run_mpi_here

            ok, payload = run_mpi_here(fn_raw[fn_key], args_blob, deps, env, mpi)
        else:
            ok, payload = execute(fn, args_blob, deps, env)
        conn.send(("done", task_id, ok, payload))
        del deps, args_blob, msg


def _end_with_driver(fd: int) -> None:
    """Block until the driver is gone, then end this worker and whatever its task started
    (its process group, when the worker leads one), quietly."""
    try:
        while os.read(fd, 64):
            pass
    except OSError:
        pass
    if os.getpgid(0) == os.getpid():
        os.killpg(0, signal.SIGKILL)
    os._exit(0)


if __name__ == "__main__":
    main()
