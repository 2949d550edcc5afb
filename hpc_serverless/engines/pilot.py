"""High-throughput mode: many small tasks through a few pilot jobs (dask-jobqueue).

The engine of pilot mode: the dask client and cluster, and the three threads below. A
site with ``mode: pilot`` gets a :class:`~hpc_serverless.providers.pilot.PilotProvider`,
which owns one :class:`PilotBackend`. Instead of one scheduler job
per task (or per array element), it keeps a handful of batch jobs running, each a dask
worker started by dask-jobqueue (``SLURMCluster`` or ``PBSCluster``) and connected to a
dask scheduler that lives in this process. Tasks go to those workers; the scheduler
(Slurm, PBS) only ever sees the pilot jobs. The public API is unchanged: the same
``@distribute_task``, ``put``, ``get``, ``wait`` and ``TaskRef`` methods, the same
exception types (the call runs through :func:`hpc_serverless.core.calls.execute`), ``put``
objects read from the site's store on the worker.

How a call travels::

    submit()           pack the arguments, queue the call, return a TaskRef   (user thread)
    flusher thread     after a 2 ms lull: calls without pending TaskRef arguments are cut
                       into chunks of up to `max_chunk` calls and sent with ONE
                       client.map per resource shape; calls that wait for other tasks
                       get the upstream dask futures as arguments (so dask orders them)
    dask worker        runtime.pilot_worker.run_calls(): each call through
                       calls.execute; (ok, payload)
    collector thread   done futures gathered in batches into this process; the futures
                       are then released, so a worker that dies later loses nothing
    keeper thread      replaces pilot jobs that ended (walltime retirement, scancel,
                       node failure) and reports workers that never connect
    last TaskRef gone  the collector drops the call and its result (a call still running
                       goes when it ends): while any ref to a task lives in this process
                       (copies and unpickled ones count, core/live_refs.py), `get` repeats;
                       a call holds refs to its upstream calls until it is final

Size: ~800 lines, of which ~100 are this docstring; the rest is one class whose three
threads share one lock and one set of calls (the job bookkeeping is in pilot_jobs.py). A
further cut (submission and collection apart) is the next step, not done yet.

Modules: the worker side is :mod:`hpc_serverless.runtime.pilot_worker`, the jobs' shape
and dask-jobqueue keywords :mod:`hpc_serverless.engines.pilot_cluster`, the private hooks
of dask-jobqueue :mod:`hpc_serverless.adapters.dask_jobqueue`.

Resources: each dask worker process is started with the resources
``{"cpu": cores, "mem": MiB}`` of its share of the job, and each dask task asks for the
``cpu`` (and ``mem``, if given) of its call, so a 2-core task never shares a 2-core
worker. ``gpu``, ``mpi`` and ``nodes`` need job mode (ResourceError at the call).

Walltime: a worker retires ``walltime_margin`` seconds before its job's time limit
(dask's ``--lifetime`` with ``--lifetime-stagger``, so the workers do not all leave at
once); dask moves its tasks to other workers and the keeper submits a replacement job.
A worker that dies (scancel, node failure) is the same story, except that the tasks it
was running count as one failure each (dask gives up after 3: WorkerDiedError).

Unreachable scheduler: if a pilot job is RUNNING for ``connect_timeout`` seconds, or
ends, and no worker ever connected, every pending task fails with an
HPCServerlessError that names the scheduler's address and the likely cause (compute
nodes that cannot open a connection to this machine) and how to change the address
(``pilot.interface``, ``pilot.scheduler_options.host``).

Security: the scheduler and the workers talk TLS with a temporary certificate by
default (``pilot.tls``; the key files go to the site's storage, mode 0600), because a
plain dask scheduler would run whatever any user of the cluster network sends it.

Measured on the test cluster (2 real cores shared by this process, Slurm's daemons and
the workers; 2 pilot jobs of 2 cores; TLS on; benchmarks/pilot_throughput.py)::

    no-op tasks/s, 2,000 / 5,000 tasks through a warm cluster
        one client.submit per call (plain dask, LocalCluster)     ~   450
        one client.map per flush, one call per dask task          ~ 1,500 / 1,800
        chunks of up to 32 calls per dask task (the default)      ~ 10,800 / 13,600
        the same without TLS                                      ~ 9,100 / 11,700 (noise)
    benchmark: 100 / 1,000 / 10,000 no-op tasks: 690 / 11,900 / 12,300 tasks/s, first
        result after 0.10 / 0.06 / 0.44 s; job arrays and one job per task: ~5 tasks/s
        (x2,300 for pilot mode); first pilot worker connected 2.6 s after the start
    one task moving a value of N bytes in and out: inside dask messages vs the store
        10 kB 21 vs 24 ms; 100 kB 16 vs 18 ms; 1 MB 23 vs 21 ms; 4 MB 56 vs 32 ms;
        16 MB 245 vs 109 ms; 64 MB 1,357 vs 637 ms

so arguments and results up to ``inline_limit`` (default 1 MiB, where the two meet)
travel inside dask messages and larger ones go through the store (results/<id>,
args/<id>), which also keeps them off the scheduler and out of this process's memory
until they are read.

Not supported in pilot mode: per-task ``time`` limits (a task longer than a worker's
lifetime is refused at the call; shorter ones are not cut off), task ``env`` is set
process-wide while the call runs (tasks with different ``env`` sharing one worker
process can see each other's), and nested tasks. A site reached over SSH runs all this in
its agent on the login node (the dask scheduler lives there, where the workers can reach
it); the laptop's client sends calls and polls results through the agent, and pilot tasks
live as long as that agent does, or until the client releases them (its refs went).
"""


from __future__ import annotations

import atexit
import importlib.util
import logging
import queue
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any, Sequence

from hpc_serverless.adapters.dask_jobqueue import import_jobqueue, job_class, task_states
from hpc_serverless.core.deadline import Deadline, split_done
from hpc_serverless.core.errors import (
    ConfigError,
    DependencyError,
    GetTimeoutError,
    HPCServerlessError,
    TaskCancelledError,
    WorkerDiedError,
    upstream_failed,
)
from hpc_serverless.core.live_refs import LiveRefs
from hpc_serverless.core.private import make_private
from hpc_serverless.core.refs import TaskRef, TaskStatus, register_backend
from hpc_serverless.core.serialization import loads, unpack_exception
from hpc_serverless.core.target import Target
from hpc_serverless.engines.pilot_cluster import WorkerShape, pilot_cluster_kwargs, worker_shape
from hpc_serverless.engines.pilot_jobs import PilotJobs
from hpc_serverless.runtime.pilot_worker import STARTED_TOPIC, run_calls
from hpc_serverless.runtime.worker import args_key, result_key

if TYPE_CHECKING:
    from hpc_serverless.adapters.schedulers.base import Scheduler
    from hpc_serverless.adapters.transport.base import Transport
    from hpc_serverless.config.site import Site
    from hpc_serverless.core.fs import LocalFS
    from hpc_serverless.core.store import ObjectStore

__all__ = ["PilotBackend", "WorkerShape", "pilot_cluster_kwargs", "worker_shape"]

log = logging.getLogger("hpc_serverless")

#: a flush waits this long for the user's loop to add more calls (the lull), but never
#: holds a call back longer than FLUSH_MAX_S
FLUSH_LULL_S = 0.002
FLUSH_MAX_S = 0.05
#: each worker thread should get at least this many chunks of a big flush (load balance)
CHUNKS_PER_THREAD = 8
#: how often the keeper looks at the pilot jobs
KEEPER_INTERVAL_S = 1.0
#: put on the collector's queue when TaskRefs went: it drops their calls
_RELEASE = object()


# -- the client side ---------------------------------------------------------------------------------
class _Call:
    """One call as the backend tracks it (never its TaskRef: the call goes when they do)."""

    __slots__ = ("task_id", "job_id", "name", "fn_key", "fn_bytes", "args", "env", "deps", "resources",
                 "outcome", "error", "future", "pos", "submitted", "wire_deps", "upstream", "orphan")

    def __init__(self, task_id: str, name: str, fn_key: str, fn_bytes: bytes, args: bytes | str,
                 env: dict[str, str] | None, deps: list[str], resources: dict[str, int]) -> None:
        self.task_id, self.name, self.fn_key, self.fn_bytes, self.args = task_id, name, fn_key, fn_bytes, args
        self.job_id: str | None = None                # the pilot job that ran it
        self.env, self.deps, self.resources = env, deps, resources
        self.outcome: tuple[Any, ...] | None = None   # (ok, payload or None if stored, job id)
        self.error: BaseException | None = None       # a failure known without an outcome
        self.future: Any = None                       # the dask future of its chunk
        self.pos = 0
        self.submitted = False
        self.wire_deps: list[tuple[Any, ...]] = []   # deps as run_calls reads them
        #: refs to its upstream calls, held until it is final: they keep those results here
        self.upstream: tuple[TaskRef, ...] = ()
        self.orphan = False                          # its refs went before it was final

    @property
    def final(self) -> bool:
        return self.outcome is not None or self.error is not None


class PilotBackend:
    """TaskRef backend of a pilot provider: the dask client, its cluster, three threads."""

    def __init__(self, site: Site, store: ObjectStore, transport: Transport, fs: LocalFS,
                 scheduler: Scheduler) -> None:
        self.site, self.store, self.transport, self.fs = site, store, transport, fs
        #: the site's scheduler commands (poll and cancel the pilot jobs)
        self.scheduler = scheduler
        self.shape = worker_shape(site)
        self.script_dir = str(self.site.storage_path / "pilot" / "scripts")
        self.key = f"pilot:{self.site.name}:{secrets.token_hex(6)}"
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._calls: dict[str, _Call] = {}
        #: each function's pickled bytes, by key (a remote client sends them once)
        self.function_bytes: dict[str, bytes] = {}
        self._queue: list[_Call] = []
        self._done: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._chunks: dict[str, list[_Call]] = {}
        self._running: dict[str, str] = {}      # chunk key -> pilot job, once it started
        self._running_on: dict[str, str] = {}   # chunk key -> the worker running it
        self._threads: list[threading.Thread] = []
        self._work = threading.Event()
        self._closed = False
        self._broken: BaseException | None = None
        self._started = threading.Event()
        self.cluster: Any = None
        self.client: Any = None
        self.pilot_jobs = PilotJobs(site, scheduler, fs)
        #: the live TaskRefs of the calls here: a call and its result go with the last one
        self._live = LiveRefs(wake=lambda: self._done.put(_RELEASE))
        register_backend(self)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, wait: bool = False, timeout: float | None = None) -> None:
        """Start the pilot cluster (idempotent); with `wait`, until a worker is connected
        (raises what the keeper found wrong, or GetTimeoutError)."""
        with self._lock:
            if not self._threads:
                import_jobqueue()  # in the caller's thread, usually the main one: see its docstring
                for target, name in ((self._flusher, "flush"), (self._collector, "collect"),
                                     (self._keeper, "keep")):
                    th = threading.Thread(target=target, name=f"hpcs-pilot-{name}-{self.site.name}", daemon=True)
                    th.start()
                    self._threads.append(th)
                atexit.register(self.close)
        if not wait:
            return
        deadline = Deadline(timeout)
        with self._lock:
            while not self.connected_once:
                if self._broken is not None:
                    raise self._broken
                if deadline.expired():
                    raise GetTimeoutError(f"no pilot worker of site '{self.site.name}' connected within "
                                          f"{timeout} s (jobs: {', '.join(self.jobs) or 'none yet'})")
                self._cv.wait(deadline.cap(0.2))

    def _start_cluster(self) -> None:
        import dask
        from distributed import Client

        jobqueue = import_jobqueue()
        Cluster = jobqueue.SLURMCluster if self.site.scheduler == "slurm" else jobqueue.PBSCluster
        # worker scripts and logs: 0700 from the site's storage down (the scripts are run by path)
        make_private(self.site.storage_path, self.script_dir)
        make_private(self.site.storage_path, self.site.storage_path / "pilot" / "logs")
        kw = pilot_cluster_kwargs(self.site, str(self.store.root), self.shape)
        if self.site.pilot.tls:
            if importlib.util.find_spec("cryptography") is None:
                raise ConfigError("pilot.tls needs the 'cryptography' package (pip install cryptography), "
                                  "or set pilot.tls: false on a trusted network", file=self.site.source,
                                  key="pilot.tls")
            kw["security"] = True
            kw["shared_temp_directory"] = str(self.site.storage_path / "pilot")
        else:
            warn_insecure(self.site)
        # a worker that left is replaced after this long (dask's default waits 15 s)
        dask.config.set({"distributed.deploy.lost-worker-timeout": "2s"})
        job_cls = job_class(Cluster.job_cls, self)
        cluster = Cluster(job_cls=job_cls, **kw)
        p = self.site.pilot
        if p.adaptive_max is not None:
            cluster.adapt(minimum_jobs=p.adaptive_min, maximum_jobs=p.adaptive_max, interval="1s")
        else:
            cluster.scale(jobs=p.workers)
        self.cluster = cluster
        self.client = Client(cluster, set_as_default=False)
        self.client.subscribe_topic(STARTED_TOPIC, self._on_started)
        log.info("%s: pilot scheduler at %s", self.site.name, cluster.scheduler_address)

    def _on_started(self, event: tuple[float, dict[str, str]]) -> None:
        """(The client's event loop.) A chunk started on a worker."""
        msg = event[1]  # (it may come before the flusher has filed the chunk's future)
        key = msg.get("key", "")
        self._running_on[key] = msg.get("worker", "")
        self._running[key] = msg.get("job", "")

    def close(self) -> None:
        """Stop the pilot jobs and the scheduler; pending tasks fail with TaskCancelledError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for c in self._calls.values():
                if not c.final:
                    self._settle(c, error=TaskCancelledError(f"task {c.name}: the pilot provider was closed"))
            self._queue.clear()
            self._cv.notify_all()
        self._done.put(None)
        self._work.set()
        client, cluster = self.client, self.cluster
        try:
            if client is not None:
                client.close(timeout=10)
        except Exception:  # noqa: BLE001 - closing is best effort
            log.debug("closing the dask client", exc_info=True)
        try:
            if cluster is not None:
                cluster.close(timeout=30)
        except Exception:  # noqa: BLE001 - then cancel the jobs ourselves
            log.warning("%s: closing the pilot cluster failed; cancelling its jobs", self.site.name,
                        exc_info=True)
            if self.jobs:
                self.scheduler.cancel(list(self.jobs))
        for attr in ("_job_ca_file", "_job_cert", "_job_key"):  # the TLS files for the workers
            f = getattr(cluster, attr, None)
            if f is not None:
                f.close()
        for th in self._threads:
            if th is not threading.current_thread():
                th.join(timeout=5)

    # -- submission ------------------------------------------------------------------------------
    def submit_packed(self, task_id: str, name: str, fn_key: str, fn_bytes: bytes | None, blob: bytes,
                      deps: Sequence[tuple[str, str, str | None]], target: Target, provider: str) -> TaskRef:
        """Queue a call whose arguments are pickled already (here, or by a laptop's client
        through the agent, in whose process the dask scheduler then runs). A call sent
        twice (a retried request) is queued once; `fn_bytes` may be None for a function
        sent before. `provider` is the name its TaskRef carries."""
        with self._lock:
            known = self._calls.get(task_id)
            if known is not None:
                return TaskRef(task_id, self.key, provider, name, job_id=known.job_id, backend=self)
            if fn_bytes is None:
                fn_bytes = self.function_bytes.get(fn_key)
            if fn_bytes is None:
                raise HPCServerlessError(f"the function of {name}() ({fn_key}) was never sent to this "
                                         "provider")
            self.function_bytes[fn_key] = fn_bytes
        resources = {"cpu": target.cpu}
        if target.mem_mib:
            resources["mem"] = target.mem_mib
        ref = TaskRef(task_id, self.key, provider, name, backend=self)  # (watched from here on)
        env = dict(target.env) or None
        self.submit(_Call(task_id, name, fn_key, fn_bytes, blob, env, [d[0] for d in deps], resources))
        return ref

    def submit(self, call: _Call) -> None:
        with self._lock:
            if self._closed:
                raise HPCServerlessError(f"the pilot provider of site '{self.site.name}' is closed")
            self._calls[call.task_id] = call
            if self._broken is not None:
                self._settle(call, error=self._broken)
                return
            # the upstream calls' results stay here until this one is final
            call.upstream = tuple(TaskRef(d, self.key, backend=self) for d in call.deps if d in self._calls)
            self._queue.append(call)
        self._work.set()
        if not self._threads:
            self.start()

    def _flusher(self) -> None:
        try:
            self._start_cluster()
        except BaseException as exc:  # noqa: BLE001 - every pending task must hear of it
            log.exception("%s: the pilot cluster did not start", self.site.name)
            self._break(exc if isinstance(exc, HPCServerlessError) else HPCServerlessError(
                f"the pilot cluster of site '{self.site.name}' did not start: {type(exc).__name__}: {exc}"))
            return
        finally:
            self._started.set()
        while True:
            self._work.wait()
            self._work.clear()
            if self._closed:
                return
            first, n = time.monotonic(), -1
            while time.monotonic() - first < FLUSH_MAX_S:  # while the user's loop adds calls
                with self._lock:
                    m = len(self._queue)
                if m == n:
                    break
                n = m
                time.sleep(FLUSH_LULL_S)
            with self._lock:
                batch, self._queue = self._queue, []
            if not batch:
                continue
            try:
                self._send(batch)
            except Exception as exc:  # noqa: BLE001 - the tasks must hear of it
                log.exception("%s: sending tasks to the pilot workers failed", self.site.name)
                with self._lock:
                    for c in batch:
                        if not c.final:
                            self._settle(c, error=HPCServerlessError(
                                f"sending task {c.name} to the pilot workers failed: {type(exc).__name__}: {exc}"))
                    self._cv.notify_all()

    def _threads_total(self) -> int:
        p = self.site.pilot
        jobs = p.adaptive_max if p.adaptive_max is not None else p.workers
        return max(1, jobs * self.shape.processes * self.shape.cores)

    def _send(self, batch: list[_Call]) -> None:
        """Send calls to dask: one map per resource shape for calls that need nothing,
        then level by level those whose upstream tasks are in flight."""
        client = self.client
        limit = self.site.pilot.inline_limit
        root = str(self.store.root)
        pending = [c for c in batch if not c.final]
        while pending:
            ready: dict[tuple[tuple[str, int], ...], list[tuple[list[_Call], list[Any]]]] = {}
            later: list[_Call] = []
            with self._lock:
                sent_now: set[str] = set()
                free: dict[tuple[tuple[str, int], ...], list[_Call]] = {}
                for c in pending:
                    if c.final:
                        continue
                    ups = [self._calls.get(d) for d in c.deps]
                    if any(u is not None and not u.final and not u.submitted for u in ups) or \
                            any(d in sent_now for d in c.deps):
                        later.append(c)  # upstream goes out in this round: wait for its future
                        continue
                    failed = next((u for u in ups if u is not None and (u.error is not None or
                                   (u.outcome is not None and not u.outcome[0]))), None)
                    if failed is not None:
                        self._settle(c, error=self._dependency_error(c, failed))
                        continue
                    res = tuple(sorted(c.resources.items()))
                    if not c.deps:
                        free.setdefault(res, []).append(c)
                    else:
                        futures: list[Any] = []
                        srcs = []
                        for d, u in zip(c.deps, ups, strict=True):
                            if u is None:
                                self._settle(c, error=DependencyError(
                                    f"task {c.name}: upstream task {d} is unknown here"))
                                break
                            if u.outcome is not None:
                                srcs.append((d, u.name, u.outcome))
                            else:
                                if u.future not in futures:
                                    futures.append(u.future)
                                srcs.append((d, u.name, (futures.index(u.future), u.pos)))
                        if c.error is not None:
                            continue
                        c.wire_deps = srcs
                        ready.setdefault(res, []).append(([c], futures))
                    sent_now.add(c.task_id)
                    c.submitted = True
                self._cv.notify_all()  # calls that failed here (upstream failed) are final
                for res, calls in free.items():
                    size = max(1, min(self.site.pilot.max_chunk,
                                      len(calls) // (self._threads_total() * CHUNKS_PER_THREAD)))
                    for i in range(0, len(calls), size):
                        ready.setdefault(res, []).append((calls[i:i + size], []))
            if not ready and later and len(later) == len(pending):
                with self._lock:  # cannot happen (calls are queued after their upstream): say so
                    for c in later:
                        self._settle(c, error=DependencyError(f"task {c.name}: its upstream tasks were never sent"))
                    self._cv.notify_all()
                return
            for res, groups in ready.items():
                payload = [[self._wire(c, limit) for c in calls] for calls, _ in groups]
                keys = [f"hpcs-{secrets.token_hex(8)}" for _ in groups]
                futures = client.map(run_calls, payload, [ups for _, ups in groups], key=keys,
                                     store_root=root, inline_limit=limit, resources=dict(res), pure=False)
                with self._lock:
                    for fut, (calls, _) in zip(futures, groups, strict=True):
                        self._chunks[fut.key] = calls
                        for i, c in enumerate(calls):
                            c.future, c.pos = fut, i
                            c.args, c.fn_bytes, c.wire_deps = b"", b"", []  # dask holds them now
                    self._cv.notify_all()
                for fut in futures:
                    fut.add_done_callback(self._done.put)
            pending = later

    def _wire(self, c: _Call, limit: int) -> tuple[Any, ...]:
        if isinstance(c.args, bytes) and len(c.args) > limit:
            key = args_key(c.task_id)
            self.store.write_parts(key, [memoryview(c.args)], type_name="arguments")
            c.args = key
        return (c.task_id, c.name, c.fn_key, c.fn_bytes, c.args, c.env, c.wire_deps)

    def _dependency_error(self, c: _Call, up: _Call) -> DependencyError:
        cause: BaseException | None = up.error
        if cause is None and up.outcome is not None:
            try:
                cause = self._exception_of(up)
            except HPCServerlessError as exc:
                cause = exc
        return upstream_failed(f"{up.name}#{up.task_id}", cause, downstream=c.name)

    def _exception_of(self, c: _Call) -> BaseException:
        assert c.outcome is not None
        ok, payload, _job = c.outcome
        if payload is None:
            ok, payload, _info = self.store.get(result_key(c.task_id))
        return unpack_exception(payload)

    # -- collection ----------------------------------------------------------------------------------
    def _collector(self) -> None:
        while True:
            fut = self._done.get()
            if fut is None:
                return
            batch = [fut]
            while True:
                try:
                    more = self._done.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._done.put(None)
                    break
                batch.append(more)
            try:
                futures = [f for f in batch if f is not _RELEASE]
                if futures:
                    self._collect(futures)
                self._release()
            except Exception:  # noqa: BLE001 - the collector must outlive one bad batch
                if not self._closed:
                    log.exception("%s: collecting pilot results failed", self.site.name)

    def watch_ref(self, ref: TaskRef) -> None:
        """(TaskRef.__init__) Count `ref` among the live refs of its call."""
        self._live.watch(ref)

    def _release(self) -> None:
        """Drop the calls whose last TaskRef went: their results, futures and records (a call
        not final yet goes when it is). Results a worker stored stay in the store, which
        `gc` of the session cleans: another process may read them."""
        gone = self._live.collect()
        if not gone:
            return
        with self._lock:
            for task_id in gone:
                c = self._calls.get(task_id)
                if c is None:
                    continue
                if c.final:
                    del self._calls[task_id]
                else:
                    c.orphan = True

    def _settle(self, c: _Call, *, outcome: tuple[Any, ...] | None = None,
                error: BaseException | None = None) -> None:
        """Make `c` final (lock held): the one place a call ends. Its upstream results may go
        now, and so may the call itself if its refs went while it ran."""
        c.outcome, c.error = outcome, error
        c.upstream = ()  # (dropping them queues their release; nothing is freed under the lock)
        if c.orphan:
            self._live.probe(c.task_id)

    def _collect(self, batch: list[Any]) -> None:
        finished = [f for f in batch if f.status == "finished"]
        values: list[Any] | None = None
        if finished:
            try:
                values = self.client.gather(finished)
            except Exception:  # noqa: BLE001 - one at a time below
                values = None
        results: list[tuple[Any, Any, BaseException | None]] = []
        if values is not None:
            results += [(f, v, None) for f, v in zip(finished, values, strict=True)]
            rest = [f for f in batch if f not in finished]
        else:
            rest = batch
        for f in rest:
            if f.status in ("pending", "lost"):  # its worker died after it finished: dask computes it again
                f.add_done_callback(self._done.put)
                continue
            try:
                results.append((f, f.result(timeout=0), None))
            except BaseException as err:  # noqa: BLE001 - mapped to the task's error below
                results.append((f, None, err))
        with self._lock:
            for f, value, failure in results:
                calls = self._chunks.pop(f.key, [])
                self._running.pop(f.key, None)
                self._running_on.pop(f.key, None)
                for i, c in enumerate(calls):
                    c.future = None
                    if c.final:
                        continue
                    if failure is None:
                        self._settle(c, outcome=value[i])
                        if value[i][2]:
                            c.job_id = value[i][2]
                            for ref in self._live.refs(c.task_id):
                                ref._job_id = c.job_id
                    else:
                        self._settle(c, error=self._error_from(c, failure))
                    if c.outcome is not None and not c.outcome[0]:
                        self._fail_dependents(c)
            self._cv.notify_all()

    def _error_from(self, c: _Call, exc: BaseException) -> BaseException:
        if self._closed:
            return TaskCancelledError(f"task {c.name}: the pilot provider was closed")
        for d in c.deps:
            up = self._calls.get(d)
            if up is not None and up.error is not None:
                return self._dependency_error(c, up)
        name = type(exc).__name__
        if name == "KilledWorker":
            return WorkerDiedError(f"task {c.name}: the pilot workers running it died or were stopped "
                                   f"too often ({exc}); logs: {self.site.storage_path / 'pilot' / 'logs'}")
        if "Cancelled" in name:
            return TaskCancelledError(f"task {c.name} was cancelled")
        err = WorkerDiedError(f"task {c.name}: the pilot workers could not run it: {name}: {exc}")
        err.__cause__ = exc
        return err

    def _fail_dependents(self, up: _Call) -> None:
        """Calls still waiting in the queue for a failed call fail now (lock held); those
        already sent see the failure on the worker (DependencyError, same message)."""
        for c in list(self._queue):
            if up.task_id in c.deps and not c.final:
                self._settle(c, error=self._dependency_error(c, up))
                self._queue.remove(c)
                self._fail_dependents(c)

    # -- the keeper: replace ended jobs, report workers that never connect ------------------------
    def _keeper(self) -> None:
        self._started.wait()
        while not self._closed:
            try:
                self._keep()
            except Exception:  # noqa: BLE001 - the keeper must outlive one bad look
                if not self._closed:
                    log.exception("%s: checking the pilot jobs failed", self.site.name)
            with self._lock:
                if self._closed:
                    return
                self._cv.wait(KEEPER_INTERVAL_S)

    def _keep(self) -> None:
        cluster = self.cluster
        if cluster is None or self._broken is not None:
            return
        if self.pilot_jobs.saw_workers(len(cluster.scheduler_info["workers"])):
            with self._lock:
                self._cv.notify_all()
        refused = self.pilot_jobs.refused()
        if refused is not None:
            self._break(refused)
            return
        # a job whose worker left (walltime retirement, scancel, node failure) was closed by
        # dask-jobqueue and dropped from cluster.workers; ask for the plan again
        cluster.loop.add_callback(self._replan)
        unreachable = self.pilot_jobs.unreachable(cluster.scheduler_address)
        if unreachable is not None:
            self._break(unreachable)

    def _replan(self) -> None:
        """(The cluster's event loop.) Start jobs for planned workers that have none."""
        cluster = self.cluster
        if cluster is None or self._closed or cluster.status.name != "running":
            return
        if set(cluster.worker_spec) - set(cluster.workers):
            cluster.scale(jobs=len(cluster.worker_spec))

    def _break(self, exc: BaseException) -> None:
        """The pilot cluster cannot work: every pending and future task fails with `exc`."""
        with self._lock:
            if self._broken is not None:
                return
            self._broken = exc
            log.error("%s", exc)
            for c in self._calls.values():
                if not c.final:
                    self._settle(c, error=exc)
            self._queue.clear()
            self._cv.notify_all()
        if self.cluster is not None:  # the jobs are of no use: give the allocation back
            threading.Thread(target=self._stop_jobs, daemon=True).start()

    def _stop_jobs(self) -> None:
        try:
            if self.site.pilot.adaptive_max is not None:
                self.cluster.adapt(minimum_jobs=0, maximum_jobs=0)
            self.cluster.scale(jobs=0)
        except Exception:  # noqa: BLE001 - best effort
            log.debug("scaling the broken pilot cluster down", exc_info=True)

    # -- hooks from the Job class (the cluster's event loop) --------------------------------------------
    def job_started(self, job_id: str) -> None:
        with self._lock:
            self.pilot_jobs.jobs.append(job_id)

    def submit_failed(self, exc: BaseException) -> None:
        self.pilot_jobs.submit_errors.append(exc)

    @property
    def jobs(self) -> list[str]:
        """Every pilot job submitted, in order."""
        return self.pilot_jobs.jobs

    @property
    def connected_once(self) -> bool:
        return self.pilot_jobs.connected_once

    def stats(self) -> dict[str, int]:
        """What the engine holds now: calls (with their results), queued calls, chunks in dask."""
        with self._lock:
            return {"tracked": len(self._calls), "queued": len(self._queue), "chunks": len(self._chunks)}

    # -- TaskBackend ------------------------------------------------------------------------------------
    def _call_of(self, ref: TaskRef) -> _Call:
        c = self._calls.get(ref.task_id)
        if c is None:
            raise HPCServerlessError(f"{ref!r} is not a task of this pilot provider (it was submitted "
                                     "by another process; pilot results live in the submitting process)")
        return c

    def task_status(self, ref: TaskRef) -> str:
        with self._lock:
            return self.status_of(self._call_of(ref))

    def status_of(self, c: _Call) -> str:
        """The status of one of this backend's calls."""
        with self._lock:
            if c.outcome is not None:
                return TaskStatus.SUCCEEDED if c.outcome[0] else TaskStatus.FAILED
            if c.error is not None:
                return TaskStatus.STOPPED if isinstance(c.error, TaskCancelledError) else TaskStatus.FAILED
            fut = c.future
            if fut is not None and self._runs(fut.key):
                return TaskStatus.RUNNING
            return TaskStatus.PENDING

    def _runs(self, key: str) -> bool:
        """A chunk runs from its start event until it is collected, unless the worker that
        started it has left (dask then runs it again elsewhere: pending until it starts)."""
        worker = self._running_on.get(key)
        if worker is None or self.cluster is None:
            return False
        return not worker or worker in self.cluster.scheduler_info["workers"]

    def _dask_state(self, key: str) -> str:
        """The chunk's state in the dask scheduler ('' if it has none, or it cannot say)."""
        client = self.client
        if client is None:
            return ""
        try:
            return task_states(client, [key]).get(key, "")
        except Exception:  # noqa: BLE001 - a diagnostic only
            log.debug("reading the dask state of %s", key, exc_info=True)
            return ""

    def task_info(self, ref: TaskRef) -> dict[str, Any]:
        status = self.task_status(ref)
        with self._lock:
            fut = self._call_of(ref).future
        state = self._dask_state(fut.key) if fut is not None else ""  # (a request: not under the lock)
        with self._lock:
            c = self._call_of(ref)
            if not state:
                state = "QUEUED" if not c.submitted else status
            reason = str(c.error) if c.error is not None else ""
            job = c.job_id or (self._running.get(fut.key) if fut is not None else None)
            return {"status": status, "state": state, "reason": reason, "job_id": job,
                    "nodes": "", "exit_code": "", "pilot_jobs": list(self.jobs)}

    def task_cancel(self, ref: TaskRef) -> bool:
        with self._lock:
            c = self._call_of(ref)
            if c.final:
                return False
            self._settle(c, error=TaskCancelledError(f"task {c.name} was cancelled"))
            if c in self._queue:
                self._queue.remove(c)
            fut = c.future
            siblings = self._chunks.get(fut.key, []) if fut is not None else []
            alone = all(s.final for s in siblings)
            self._fail_dependents(c)
            self._cv.notify_all()
        if fut is not None and alone:
            fut.cancel()
        return True

    def task_result(self, ref: TaskRef, timeout: float | None) -> Any:
        deadline = Deadline(timeout)
        with self._lock:
            c = self._call_of(ref)
            while not c.final:
                if deadline.expired():
                    raise deadline.error(repr(ref), self.task_status(ref))
                self._cv.wait(deadline.remaining())
            error, outcome = c.error, c.outcome
        if error is not None:
            raise error
        assert outcome is not None
        ok, payload, _job = outcome
        if payload is None:
            ok, payload, _info = self.store.get(result_key(ref.task_id))
        if ok:
            return loads(payload)
        raise unpack_exception(payload)

    def task_wait(self, refs: Sequence[TaskRef], num_returns: int,
                  timeout: float | None) -> tuple[list[TaskRef], list[TaskRef]]:
        deadline = Deadline(timeout)
        with self._lock:
            while True:
                done = {r.task_id for r in refs if self._call_of(r).final}
                if len(done) >= num_returns or deadline.expired():
                    return split_done(refs, done)
                self._cv.wait(deadline.remaining())


def warn_insecure(site: Site) -> None:
    """Said on every start of a pilot cluster without TLS: its scheduler accepts work from
    anyone who reaches its port, and that work runs as this user."""
    message = (f"site '{site.name}' runs its pilot scheduler without TLS (pilot.tls: false"
               + (f" in {site.source}" if site.source else "") + "): anyone who can reach its port can "
               "run code as you. Set pilot.tls: true (needs the 'cryptography' package) unless "
               "this network is yours alone.")
    log.warning(message)  # (a log record, not warnings.warn: that shows once per process)
