"""The agent's daemon: one per site storage and cluster account, behind a private Unix
socket. It holds the site's login-node provider and answers the requests of every client
whose channel a relay (agent.py) hands it; it outlives its channels for ``agent_grace``
seconds and answers a request it has seen before (same id) from the first run.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import io
import json
import logging
import os
import pickle
import shutil
import signal
import socket
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from hpc_serverless.adapters.streaming import Filling, read_request
from hpc_serverless.adapters.wire import (
    FrameError,
    encode,
    exact_reader,
    exact_reader_into,
    read_frame,
    versions,
)

if TYPE_CHECKING:
    from hpc_serverless.config.site import Site
    from hpc_serverless.engines.pilot import PilotBackend
    from hpc_serverless.providers.batch import BatchProvider


log = logging.getLogger("hpc_serverless.agent")

#: requests answered are remembered this many at a time (a retried request is answered again)
_REMEMBER = 20000


def version_problem(client: dict[str, Any], here: dict[str, Any]) -> str | None:
    """A sentence naming both sides if client and agent cannot work together, else None."""
    keys = ("protocol", "hpc_serverless", "python")
    if all(client.get(k) == here.get(k) for k in keys):
        return None
    return (f"the client has hpc_serverless {client.get('hpc_serverless')} on Python {client.get('python')} "
            f"(protocol {client.get('protocol')}), the agent has hpc_serverless {here.get('hpc_serverless')} "
            f"on Python {here.get('python')} (protocol {here.get('protocol')})")


def _hello_error(kind: str, message: str) -> dict[str, Any]:
    # builtins only: a client of another version can still read why it was refused
    return {"id": "hello", "ok": False, "kind": kind, "message": message, "versions": versions()}


def _write(fd: int, message: Any) -> None:
    for part in encode(message):
        view = part
        while view.nbytes:
            n = os.write(fd, view)
            view = view[n:]


def _readinto(fd: int, view: memoryview) -> int:
    return os.readv(fd, [view])


def _where() -> str:
    import getpass

    return f"{getpass.getuser()}@{socket.gethostname()}"


def _connect(path: Path) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return s
    except OSError:
        s.close()
        return None


# -- daemon ------------------------------------------------------------------------------------------
class Agent:
    """The provider of one site and the requests its clients send."""

    def __init__(self, site: Site) -> None:
        from hpc_serverless.providers.factory import provider_for_site

        self.site = site
        provider = provider_for_site(site, site.name)
        from hpc_serverless.providers.batch import BatchProvider

        if not isinstance(provider, BatchProvider):
            raise RuntimeError(f"site '{site.name}': mode {site.mode} is not served over SSH")
        self.provider: BatchProvider = provider
        self.backend = provider.backend  # programs' job states (and tasks in job mode)
        #: in pilot mode the dask scheduler runs here, where the workers can reach it
        self.pilot: PilotBackend | None = getattr(provider, "pilot", None)
        self._pool = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="agent")
        self._answers: collections.OrderedDict[str, concurrent.futures.Future[Any]] = collections.OrderedDict()
        #: pilot mode: one ref per task a client submitted, which keeps its result here
        self._pilot_refs: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.clients = 0
        self.last_left = time.monotonic()

    def info(self) -> dict[str, Any]:
        return {"id": "hello", "ok": True, "versions": versions(), "where": _where(), "pid": os.getpid(),
                "store_root": str(self.provider.store.root), "storage": str(self.site.storage_path),
                "python": self.site.python, "mode": self.site.mode,
                "backend_key": self.pilot.key if self.pilot is not None else self.backend.key}

    # -- connections ---------------------------------------------------------------------------
    def serve_connection(self, conn: socket.socket) -> None:
        """One client: its relay hands over the SSH channel's pipes (stdin, stdout) with the
        first byte, then the hello on the socket; requests and answers use the pipes."""
        write_lock = threading.Lock()
        fds: list[int] = []
        with self._lock:
            self.clients += 1
        try:
            _first, fds, _flags, _addr = socket.recv_fds(conn, 1, 2)
            if len(fds) != 2:
                raise EOFError("the relay sent no channel")
            rfd, wfd = fds

            def send(message: Any) -> None:
                with write_lock:
                    _write(wfd, message)

            hello = read_frame(exact_reader(conn.recv))
            read = exact_reader_into(functools.partial(_readinto, rfd))
            problem = version_problem(hello.get("versions", {}), versions())
            if problem:
                send(_hello_error("version", problem + f" (a running agent, pid {os.getpid()}: it "
                                  "leaves after its grace period, or end it with kill)"))
                return
            send(self.info())
            readinto = functools.partial(_readinto, rfd)

            def start(request: dict[str, Any], filling: Filling | None) -> None:
                future = self._submit(request, filling)
                future.add_done_callback(functools.partial(self._answer, send, request["id"]))

            while True:
                read_request(read, readinto, start)
        except (EOFError, OSError, FrameError):
            pass
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            conn.close()  # the relay leaves, and with it the channel
            with self._lock:
                self.clients -= 1
                self.last_left = time.monotonic()

    def _submit(self, request: dict[str, Any], filling: Filling | None = None) -> concurrent.futures.Future[Any]:
        """Run a request once: a request id seen before gets the first run's answer. A put
        still streaming in (`filling`) is written as it arrives; if its stream breaks, its
        id is forgotten, so that the client's retry runs it again."""
        rid = request["id"]
        with self._lock:
            known = self._answers.get(rid)
            broken = known is not None and known.done() and isinstance(known.exception(), EOFError)
            if known is not None and not broken:
                return known  # (a put's bytes are still read off the stream, and dropped)
            if filling is not None:
                key, parts, overwrite, type_name, meta, durable = request["args"]
                future = self._pool.submit(self.provider.store.write_parts, key, [memoryview(p) for p in parts],
                                           overwrite=overwrite, type_name=type_name, meta=meta, durable=durable,
                                           ready=filling.wait)
                future.add_done_callback(functools.partial(self._forget_broken, rid))
            else:
                future = self._pool.submit(self.handle, request["op"], request.get("args", ()))
            self._answers[rid] = future
            while len(self._answers) > _REMEMBER:
                self._answers.popitem(last=False)
            return future

    def _forget_broken(self, rid: str, future: concurrent.futures.Future[Any]) -> None:
        if isinstance(future.exception(), EOFError):
            with self._lock:
                self._answers.pop(rid, None)

    @staticmethod
    def _answer(send: Callable[[Any], None], rid: str, future: concurrent.futures.Future[Any]) -> None:
        exc = future.exception()
        reply = {"id": rid, "ok": exc is None}
        if exc is None:
            reply["value"] = future.result()
        else:
            reply["error"] = _portable(exc)
        try:
            send(reply)
        except OSError:
            pass  # that client is gone; a retry of the request on a new channel gets it again

    def handle(self, op: str, args: tuple[Any, ...]) -> Any:
        method = getattr(self, f"op_{op}", None)
        if method is None:
            raise RuntimeError(f"the agent does not know the operation {op!r}")
        return method(*args)

    # -- tasks ---------------------------------------------------------------------------------
    def _ref(self, task_id: str, function: str, job_id: str | None) -> Any:
        from hpc_serverless.core.refs import TaskRef

        ref = TaskRef(task_id, self.backend.key, self.provider.name, function, job_id=job_id,
                      backend=self.backend)
        with self.backend._lock:
            task = self.backend._task(ref)  # a task of an earlier agent: tracked from its job id
            if task.job_id is None and job_id:
                task.job_id = job_id
        return ref

    def op_submit(self, calls: list[dict[str, Any]]) -> list[tuple[str | None, BaseException | None]]:
        """Queue a batch of calls, submit them now (arrays by target), return their job ids."""
        refs = [self.provider.submit_packed(c["task_id"], c["name"], c["fn_key"], c["fn_bytes"], c["args"],
                                            c["deps"], c["target"]) for c in calls]
        if self.pilot is not None:  # the pilot's flusher sends them to the workers at once
            # the pilot keeps a result while a ref to it lives here; the client's refs live on
            # its machine, so the agent holds one for it (until the agent ends)
            with self._lock:
                self._pilot_refs.update((r.task_id, r) for r in refs)
            return [(None, None) for _ in refs]
        tasks = [self.backend._tasks[r.task_id] for r in refs]
        self.backend.flush()
        return [(t.job_id, _portable(t.error) if t.error else None) for t in tasks]

    # -- sessions and storage (protocol 2) --------------------------------------------------------
    def op_session_beat(self, session_id: str) -> None:
        """A remote client's session is in use: its beat, written here on the site's clock."""
        session = getattr(self.provider, "session_for", lambda _sid: None)(session_id)
        if session is not None:
            session.beat()

    def op_session_close(self, session_id: str) -> None:
        session = getattr(self.provider, "session_for", lambda _sid: None)(session_id)
        if session is not None:
            session.close()

    def _housekeeping(self, what: str) -> Any:
        method = getattr(self.provider, what, None)
        if method is None:
            raise RuntimeError(f"provider '{self.provider.name}' has no {what}")
        return method

    def op_gc(self, older_than: float, dry_run: bool, programs: bool) -> Any:
        return self._housekeeping("gc")(older_than, dry_run=dry_run, programs=programs)

    def op_du(self) -> Any:
        return self._housekeeping("du")()

    def op_remove_program(self, job_id: str) -> Any:
        return self._housekeeping("remove_program")(job_id)

    def op_check_target(self, target: Any) -> None:
        self.provider.check_target(target)

    def op_poll(self, items: list[tuple[str, str, str | None]], wait: float,
                inline_limit: int) -> dict[str, dict[str, Any]]:
        """States of tasks; the results of finished ones inline (up to `inline_limit`
        bytes in all). Waits up to `wait` s for one of them to finish: one round trip
        per poll whatever the number of tasks."""
        from hpc_serverless.core.refs import TaskStatus

        if self.pilot is not None:
            return self._poll_pilot(self.pilot, items, wait, inline_limit)
        refs = [self._ref(*item) for item in items]
        deadline = time.monotonic() + min(wait, 5.0)
        while True:
            states = {r.task_id: self.backend.task_status(r) for r in refs}
            if any(s in TaskStatus.FINAL for s in states.values()) or time.monotonic() >= deadline:
                break
            with self.backend._lock:
                self.backend._start()
            time.sleep(0.05)
        out: dict[str, dict[str, Any]] = {}
        budget = inline_limit
        for r in refs:
            with self.backend._lock:
                t = self.backend._task(r)
            entry: dict[str, Any] = {"status": states[r.task_id], "job_id": t.job_id}
            if t.error is not None:
                entry["error"] = _portable(t.error)
            elif states[r.task_id] in TaskStatus.FINAL and budget > 0:
                outcome = self._outcome(r.task_id)
                if outcome is not None:
                    entry["outcome"] = outcome
                    budget -= len(outcome[1])
            out[r.task_id] = entry
        return out

    def _poll_pilot(self, pilot: PilotBackend, items: list[tuple[str, str, str | None]], wait: float,
                    inline_limit: int) -> dict[str, dict[str, Any]]:
        """op_poll in pilot mode: the calls live in this process (in the pilot backend), and
        the wait ends as soon as one of them is final (the collector notifies)."""
        from hpc_serverless.core.errors import HPCServerlessError
        from hpc_serverless.core.refs import TaskStatus

        deadline = time.monotonic() + min(wait, 5.0)
        out: dict[str, dict[str, Any]] = {}
        with pilot._lock:
            calls = {tid: pilot._calls.get(tid) for tid, _f, _j in items}
            while not any(c is None or c.final for c in calls.values()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                pilot._cv.wait(remaining)
            budget = inline_limit
            for tid, c in calls.items():
                if c is None:
                    out[tid] = {"status": TaskStatus.FAILED, "job_id": None, "error": HPCServerlessError(
                        f"task {tid} is not known to the agent serving this pilot site (pilot tasks live "
                        "in the agent that ran them, which has been replaced since)")}
                    continue
                status = pilot.status_of(c)
                entry: dict[str, Any] = {"status": status, "job_id": c.job_id}
                if c.error is not None:
                    entry["error"] = _portable(c.error)
                elif c.outcome is not None and c.outcome[1] is not None and budget > 0:
                    entry["outcome"] = (bool(c.outcome[0]), c.outcome[1])
                    budget -= len(c.outcome[1])
                out[tid] = entry
        return out

    def _outcome(self, task_id: str) -> tuple[bool, bytes] | None:
        from hpc_serverless.core.errors import ObjectNotFoundError
        from hpc_serverless.runtime.worker import result_key

        if self.pilot is not None:
            with self.pilot._lock:
                c = self.pilot._calls.get(task_id)
                outcome = c.outcome if c is not None else None
            if outcome is None:
                return None
            if outcome[1] is not None:  # small results came back inside dask messages
                return bool(outcome[0]), outcome[1]
        try:
            ok, payload, _info = self.provider.store.get(result_key(task_id))
        except ObjectNotFoundError:
            return None
        return bool(ok), bytes(payload)

    def op_result(self, task_id: str, function: str, job_id: str | None) -> tuple[bool, bytes] | None:
        return self._outcome(task_id)

    def op_info(self, task_id: str, function: str, job_id: str | None) -> dict[str, Any]:
        if self.pilot is not None:
            return self.pilot.task_info(self._pilot_ref(task_id, function))
        return self.backend.task_info(self._ref(task_id, function, job_id))

    def op_cancel(self, task_id: str, function: str, job_id: str | None) -> bool:
        if self.pilot is not None:
            return self.pilot.task_cancel(self._pilot_ref(task_id, function))
        return self.backend.task_cancel(self._ref(task_id, function, job_id))

    def _pilot_ref(self, task_id: str, function: str) -> Any:
        from hpc_serverless.core.refs import TaskRef

        assert self.pilot is not None
        return TaskRef(task_id, self.pilot.key, self.provider.name, function, backend=self.pilot)

    # -- objects -------------------------------------------------------------------------------
    def op_write_parts(self, key: str, parts: list[Any], overwrite: bool, type_name: str,
                       meta: dict[str, Any] | None, durable: bool | None) -> int:
        return self.provider.store.write_parts(key, [memoryview(p) for p in parts], overwrite=overwrite,
                                               type_name=type_name, meta=meta, durable=durable)

    def op_read_parts(self, key: str) -> tuple[Any, list[Any], dict[str, Any]]:
        data, buffers, header = self.provider.store.read_parts(key)
        return (pickle.PickleBuffer(data), [pickle.PickleBuffer(b) for b in buffers], header)

    def op_header(self, key: str) -> dict[str, Any] | None:
        return self.provider.store.header(key)

    def op_exists(self, key: str) -> bool:
        return self.provider.store.exists(key)

    def op_delete(self, key: str) -> None:
        self.provider.store.delete(key)

    # -- programs ------------------------------------------------------------------------------
    def op_run_program(self, program: Any, arguments: Any, tar: bytes, name: str | None = None) -> str:
        """Unpack the client's working dir here, then run the program as on the login node
        (its job id starting with the client's provider `name`)."""
        import dataclasses

        tmp = tempfile.mkdtemp(prefix="hpcs-workdir-")
        try:
            with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
                _safe_extract(tf, tmp)
            return self._jobs().run(dataclasses.replace(program, working_dir=tmp), arguments, name=name).job_id
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def op_render_program(self, program: Any, arguments: Any) -> str:
        return self.provider.render_program(program, arguments)

    def op_get_job(self, job_id: str) -> str:
        return self.provider.get_job_by_id(job_id).job_id

    def op_jobs(self) -> list[str]:
        return [j.job_id for j in self.provider.jobs()]

    def _jobs(self) -> Any:
        from hpc_serverless.engines.programs_batch import BatchJobs

        return BatchJobs(self.provider)

    def op_job_info(self, job_id: str) -> dict[str, Any]:
        return dict(self._jobs().job_info(job_id))

    def op_job_logs(self, job_id: str) -> str:
        return str(self._jobs().job_logs(job_id))

    def op_job_stop(self, job_id: str) -> bool:
        return bool(self._jobs().job_stop(job_id))

    def op_job_result(self, job_id: str) -> tuple[Any, list[Any]]:
        from hpc_serverless.core.jobs import RESULT_KEY
        from hpc_serverless.core.store import ObjectStore

        jobs = self._jobs()
        jobs.job_info(job_id)  # names a job that does not exist
        data, buffers, _ = ObjectStore(jobs.dirs.path(job_id)).read_parts(RESULT_KEY)
        return pickle.PickleBuffer(data), [pickle.PickleBuffer(b) for b in buffers]

    # -- facts ---------------------------------------------------------------------------------
    def op_site_check(self) -> list[str]:
        """`hpc-serverless sites check` of a site with a host: the login node's checks, here."""
        from hpc_serverless.providers.checks import login_node_checks

        return login_node_checks(self.provider)

    def op_stats(self) -> dict[str, int]:
        return self.provider.stats()

    def op_ping(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "clients": self.clients, "pilot_refs": len(self._pilot_refs)}

    def op_release(self, task_ids: list[str]) -> int:
        """Pilot mode: the client's refs to these tasks went; the agent's go too, and with
        them the results. Returns how many it held."""
        with self._lock:
            return sum(self._pilot_refs.pop(t, None) is not None for t in task_ids)


def _safe_extract(tf: tarfile.TarFile, dest: str) -> None:
    """Extract regular files and directories that stay inside `dest` (tarfile's "data"
    filter where this Python has it)."""
    if hasattr(tarfile, "data_filter"):
        tf.extractall(dest, filter="data")
        return
    for m in tf.getmembers():
        name = os.path.normpath(m.name)
        if name.startswith(("/", "..")) or not (m.isfile() or m.isdir()):
            raise RuntimeError(f"refusing {m.name!r} in the working dir's archive")
    tf.extractall(dest)  # noqa: S202 - members checked above


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives a pickle round trip, else an HPCServerlessError that tells it."""
    from hpc_serverless.core.errors import HPCServerlessError

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any exception that cannot travel is described instead
        return HPCServerlessError(f"{type(exc).__name__}: {exc}")


def serve(path: str) -> int:
    """The daemon: read the site from stdin, listen on `path`, serve until idle."""
    site: Site = pickle.loads(sys.stdin.buffer.read())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s agent %(process)d %(levelname)s %(message)s")
    agent = Agent(site)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(path):
        os.unlink(path)  # a dead daemon's (the relay holds the site's lock while we start)
    sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(64)
    sock.settimeout(1.0)
    record = {"where": _where(), "pid": os.getpid(), "socket": path, "started": time.time(),
              "versions": versions()}
    from hpc_serverless.core.fs import LOCAL

    LOCAL.write_atomic(str(site.storage_path / "agent.json"), json.dumps(record).encode())
    log.info("serving %s on %s", site.name, path)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.is_set():
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            if agent.clients == 0 and time.monotonic() - agent.last_left > site.agent_grace:
                log.info("no client for %.0f s: leaving", site.agent_grace)
                break
            continue
        threading.Thread(target=agent.serve_connection, args=(conn,), daemon=True).start()
    try:
        os.unlink(path)
    except OSError:
        pass
    return 0
