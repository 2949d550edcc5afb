"""What runs inside a batch job (and inside local MPI tasks).

A task lives in the site's object store as three objects: its function
(``functions/<key>``, shared by every call), its spec (``tasks/<id>``: arguments,
dependencies, environment, MPI ranks, the client's versions) and, once it ran, its
result (``results/<id>``: ok flag and pickled value or exception). This module turns a
spec into a result. It is what you see in a job's log:

    python -m hpc_serverless.runtime.worker run  STORE TASK_ID     # one task (what submitit calls)
    python -m hpc_serverless.runtime.worker rank STORE TASK_ID     # one MPI rank of a task
"""

from __future__ import annotations

import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from hpc_serverless.core.calls import execute
from hpc_serverless.core.errors import SerializationError, UnsafeStoreError, WorkerDiedError, upstream_failed
from hpc_serverless.core.launch import module_argv
from hpc_serverless.core.serialization import loads, pack_exception, unpack_exception
from hpc_serverless.core.sessions import session_of, session_prefix
from hpc_serverless.core.store import ObjectStore

RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID", "MV2_COMM_WORLD_RANK")


def _keyed(kind: str, task_id: str) -> str:
    """A task's object of one kind: in its session's directory when its id names one (so a
    session goes as one), else where tasks lived before sessions (their results stay readable)."""
    sid = session_of(task_id)
    if sid is None:
        return f"{kind}/{task_id[:2]}/{task_id}"
    rest = task_id[len(sid) + 1:]
    return f"{session_prefix(sid)}/{kind}/{rest[:2]}/{rest}"


def task_key(task_id: str) -> str:
    return _keyed("tasks", task_id)


def result_key(task_id: str) -> str:
    return _keyed("results", task_id)


def note_key(task_id: str) -> str:
    """Where the worker leaves a line for the client about a job that may end without a
    result (a failed requeue), so the error at get() can say it."""
    return _keyed("notes", task_id)


def checkpoint_key(task_id: str) -> str:
    """A requeued task's saved progress: in its session, so it goes when the session does."""
    return _keyed("checkpoints", task_id)


def args_key(task_id: str) -> str:
    """Arguments too big to send inline to a pilot worker."""
    return _keyed("args", task_id)


def function_key(fn_key: str) -> str:
    return f"functions/{fn_key.replace(':', '_')}"


def versions() -> dict[str, str]:
    """What must match between the client and the compute side for pickles to load."""
    import cloudpickle

    from hpc_serverless.version import __version__

    return {"python": platform.python_version(), "cloudpickle": cloudpickle.__version__,
            "hpc_serverless": __version__}


def version_problem(client: dict[str, str]) -> str | None:
    """A sentence if the client's versions cannot work with ours, else None."""
    here = versions()
    py_c, py_h = client.get("python", ""), here["python"]
    if py_c.split(".")[:2] != py_h.split(".")[:2]:
        return (f"the client runs Python {py_c} but the compute side runs Python {py_h} "
                f"({sys.executable}); functions pickled by one cannot load in the other. Set the "
                "site's 'python' to an interpreter of the same version")
    for name in ("cloudpickle", "hpc_serverless"):
        if client.get(name) and client[name] != here[name]:
            print(f"[hpc-serverless] warning: client has {name} {client[name]}, compute side has "
                  f"{here[name]}", file=sys.stderr, flush=True)
    return None


class TaskFailed(Exception):
    """Raised after a failed task's result is stored, so the job itself ends FAILED."""


def _write_result(store: ObjectStore, task_id: str, ok: bool, payload: bytes, started: float) -> None:
    info = {"host": platform.node(), "started": started, "ended": time.time(),
            "job_id": os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID") or ""}
    # durable at any size: a result must outlive a crash of the node that computed it
    store.put((ok, payload, info), result_key(task_id), what="the task's result", overwrite=True,
              meta={"ok": ok}, durable=True)


def _load_call(store: ObjectStore, spec: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The function and the values of the task's dependencies (DependencyError if one failed)."""
    fn = loads(_checked_get(store, function_key(spec["fn_key"])))
    deps: dict[str, Any] = {}
    for dep_id, dep_name in spec.get("deps", []):
        ok, payload, _info = _checked_get(store, result_key(dep_id))
        if not ok:
            raise upstream_failed(f"{dep_name}#{dep_id}", unpack_exception(payload))
        deps[dep_id] = loads(payload)
    return fn, deps


def _checked_get(store: ObjectStore, key: str) -> Any:
    """An object this worker runs (its call, function, upstream values): checked now, not
    from a cache (a long-lived process too), symlink-safe, then loaded."""
    return store.get(key, to_run=True)


def _load_spec(store: ObjectStore, task_id: str, started: float) -> dict[str, Any]:
    """The task's call; refused (UnsafeStoreError) if someone else could have swapped it,
    and the refusal stored as the task's result, so that the caller's get() says why."""
    try:
        spec: dict[str, Any] = _checked_get(store, task_key(task_id))
    except UnsafeStoreError as exc:
        print(f"[hpc-serverless] task {task_id} refused: {exc}", file=sys.stderr, flush=True)
        _write_result(store, task_id, False, pack_exception(exc), started)
        raise
    return spec


def run(store_root: str, task_id: str) -> bool:
    """Run one stored task and store its result; raises TaskFailed if the task failed."""
    started = time.time()
    store = ObjectStore(store_root)
    try:
        spec = _load_spec(store, task_id, started)
    except UnsafeStoreError as exc:
        raise TaskFailed(str(exc)) from exc
    name = spec.get("name", "task")
    print(f"[hpc-serverless] task {name}#{task_id} on {platform.node()} "
          f"(job {os.environ.get('SLURM_JOB_ID') or os.environ.get('PBS_JOBID') or '-'})", flush=True)
    os.environ["HPC_SERVERLESS_TASK_ID"] = task_id
    os.environ["HPC_SERVERLESS_STORE"] = store_root
    _on_time_limit_signal(store, task_id, spec)
    problem = version_problem(spec.get("versions", {}))
    if problem:
        ok, payload = False, pack_exception(SerializationError(problem))
    elif spec.get("mpi", 1) > 1:
        ok, payload = _run_ranks(store_root, task_id, spec)
    else:
        try:
            fn, deps = _load_call(store, spec)
        except BaseException as exc:  # noqa: BLE001 - reported as the task's failure
            ok, payload = False, pack_exception(exc)
        else:
            ok, payload = execute(fn, spec["args"], deps, spec.get("env"))
    _write_result(store, task_id, ok, payload, started)
    if not ok:
        err = unpack_exception(payload)
        print(f"[hpc-serverless] task {name}#{task_id} raised {type(err).__name__}: {err}\n"
              "(the exception goes back to the caller's get())", file=sys.stderr, flush=True)
        raise TaskFailed(f"{type(err).__name__}: {err}")
    print(f"[hpc-serverless] task {name}#{task_id} done in {time.time() - started:.2f} s", flush=True)
    return True


def _requeue_argv() -> list[str] | None:
    """The command that puts this very job back in its queue."""
    if os.environ.get("SLURM_JOB_ID"):
        array, index = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        job = f"{array}_{index}" if array and index else os.environ["SLURM_JOB_ID"]
        return ["scontrol", "requeue", job]
    if os.environ.get("PBS_JOBID"):
        return [os.path.join(os.environ.get("HPC_SERVERLESS_COMMANDS_DIR", ""), "qrerun"), os.environ["PBS_JOBID"]]
    return None


def _on_time_limit_signal(store: ObjectStore, task_id: str, spec: dict[str, Any]) -> None:
    """What to do when the scheduler says time is nearly up (SIGUSR2, set by submitit's
    --signal). A task with `requeue` left goes back in the queue, to resume from its
    checkpoint; any other task runs on and the scheduler ends it as TIMEOUT, with that
    reason (submitit's own handler would instead fail it with a generic error)."""
    if not hasattr(signal, "SIGUSR2") or threading.current_thread() is not threading.main_thread():
        return

    def handler(_signum: int, _frame: Any) -> None:
        done = int(spec.get("requeued", 0))
        argv = _requeue_argv()
        if done >= int(spec.get("requeue", 0)) or argv is None:
            print("[hpc-serverless] the job's time limit is near; no requeue left", file=sys.stderr, flush=True)
            return
        spec["requeued"] = done + 1  # written first: a requeue ends this run at once
        store.put(spec, task_key(task_id), what="the task's spec", overwrite=True)
        print(f"[hpc-serverless] time limit near: requeueing ({done + 1} of {spec['requeue']}); the task "
              "starts again and resumes from its last checkpoint", file=sys.stderr, flush=True)
        try:
            result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
            code, said = result.returncode, (result.stderr.strip() or result.stdout.strip() or "(no output)")
        except (OSError, subprocess.SubprocessError) as exc:
            code, said = -1, str(exc)
        if code == 0:
            os._exit(0)  # the scheduler ends this run; nothing of it is the task's result
        # not requeued: say so (log, and a note for the client's error), and run on; the
        # task may still finish in time, else the scheduler ends it as TIMEOUT
        why = f"`{shlex.join(argv)}` exited {code}: {' / '.join(said.splitlines()[-2:])}"
        spec["requeued"] = done
        store.put(spec, task_key(task_id), what="the task's spec", overwrite=True)
        store.put(f"the job could not be requeued near its time limit: {why}", note_key(task_id),
                  what="a note on the task's job", overwrite=True)
        print(f"[hpc-serverless] could not requeue the job: {why}; the task runs on and ends as "
              "TIMEOUT if its time runs out", file=sys.stderr, flush=True)

    signal.signal(signal.SIGUSR2, handler)


def _run_ranks(store_root: str, task_id: str, spec: dict[str, Any],
               verbose: bool = True) -> tuple[bool, bytes]:
    """Start the task's MPI ranks through the site's launcher and wait for them."""
    # $PBS_NODEFILE, $SLURM_NTASKS...: the launcher's words expand here, on the compute side
    launcher = [os.path.expandvars(a) for a in spec["launcher"]]
    argv = [*launcher, *module_argv(sys.executable, "hpc_serverless.runtime.worker", "rank", store_root, task_id)]
    env = {**os.environ, **spec.get("launcher_env", {})}
    if verbose:
        print(f"[hpc-serverless] launching {spec['mpi']} ranks: {shlex.join(argv)}", flush=True)
    proc = subprocess.run(argv, env=env)
    store = ObjectStore(store_root)
    key = result_key(task_id)
    if store.exists(key):  # rank 0 wrote it
        ok, payload, _info = store.get(key)
        return ok, payload
    return False, pack_exception(WorkerDiedError(
        f"the MPI launcher `{shlex.join(spec['launcher'])}` exited {proc.returncode} before rank 0 "
        "stored a result (see the job's log)"))


def local_mpi_launcher(ranks: int) -> list[str]:
    """mpirun on this machine (the local provider's MPI tasks)."""
    import shutil

    mpirun = shutil.which("mpirun") or shutil.which("mpiexec")
    if mpirun is None:
        from hpc_serverless.core.errors import ResourceError

        raise ResourceError("MPI tasks on the local provider need mpirun (install Open MPI or MPICH)")
    argv = [mpirun]
    if os.path.basename(mpirun) == "mpirun" and hasattr(os, "geteuid") and os.geteuid() == 0:
        argv.append("--allow-run-as-root")
    return [*argv, "--oversubscribe", "-np", str(ranks)]


def run_mpi_here(fn_bytes: bytes, args_blob: bytes, deps: dict[str, Any], env: dict[str, str] | None,
                 ranks: int) -> tuple[bool, bytes]:
    """Run a call on `ranks` MPI ranks on this machine (from a local pool worker)."""
    import secrets
    import shutil
    import tempfile

    from hpc_serverless.core.serialization import dumps

    tmp = tempfile.mkdtemp(prefix="hpcs-mpi-")
    try:
        store = ObjectStore(tmp)
        task_id = secrets.token_hex(12)
        store.put(fn_bytes, function_key("local"), what="the task function")
        for dep_id, value in deps.items():
            store.put((True, dumps(value), {}), result_key(dep_id), meta={"ok": True})
        store.put({"task_id": task_id, "name": "mpi task", "fn_key": "local", "args": args_blob,
                   "deps": [(d, d) for d in deps], "env": env, "mpi": ranks,
                   "launcher": local_mpi_launcher(ranks), "versions": versions()}, task_key(task_id))
        return _run_ranks(tmp, task_id, store.get(task_key(task_id)), verbose=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rank_main(store_root: str, task_id: str) -> int:
    """One MPI rank: every rank runs the function; rank 0 stores the value."""
    rank = next((int(os.environ[v]) for v in RANK_VARS if os.environ.get(v, "").isdigit()), 0)
    started = time.time()
    store = ObjectStore(store_root)
    spec = _checked_get(store, task_key(task_id))
    try:
        fn, deps = _load_call(store, spec)
    except BaseException as exc:  # noqa: BLE001
        ok, payload = False, pack_exception(exc)
    else:
        ok, payload = execute(fn, spec["args"], deps, spec.get("env"))
    if rank == 0:
        _write_result(store, task_id, ok, payload, started)
    elif not ok:
        print(f"[hpc-serverless] rank {rank} failed:\n{unpack_exception(payload)!r}", file=sys.stderr)
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("run", "rank"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "rank":
        return rank_main(argv[1], argv[2])
    try:
        run(argv[1], argv[2])
    except TaskFailed:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
