"""The `local` provider: this machine, or inside a batch job the job's own allocation."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from hpc_serverless.core.calls import find_task_refs, pack_arguments
from hpc_serverless.core.errors import ConfigError, HPCServerlessError, ResourceError
from hpc_serverless.core.qpus import LOCAL_COUNTER, PLAN_ENV, QpuSection, qpu_ask
from hpc_serverless.core.refs import TaskRef, register_store
from hpc_serverless.core.sessions import Session
from hpc_serverless.core.store import ObjectStore
from hpc_serverless.core.target import Target, capacity_problems
from hpc_serverless.engines.local_pool import LocalPool, TaskSpec
from hpc_serverless.providers.base import Provider
from hpc_serverless.runtime.pool_client import current_client

if TYPE_CHECKING:
    from hpc_serverless.core.calls import TaskFunction
    from hpc_serverless.core.jobs import Job, Program
    from hpc_serverless.engines.environments import Environment, Environments
    from hpc_serverless.engines.housekeeping import Storage
    from hpc_serverless.engines.local_programs import LocalJobs

__all__ = ["LocalProvider", "local_resources", "default_home"]


def default_home() -> Path:
    """Where local state lives: $HPC_SERVERLESS_HOME, else ~/.hpc_serverless."""
    return Path(os.environ.get("HPC_SERVERLESS_HOME") or Path.home() / ".hpc_serverless")


def _int_env(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def local_resources() -> tuple[int, int, int]:
    """(cores, memory MiB, GPUs) this process may use: the batch allocation if inside one."""
    cores = _int_env("HPC_SERVERLESS_CPUS", "SLURM_CPUS_ON_NODE", "PBS_NCPUS", "NCPUS")
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
    mem = _int_env("HPC_SERVERLESS_MEM_MIB", "SLURM_MEM_PER_NODE")
    if mem is None and (per_cpu := _int_env("SLURM_MEM_PER_CPU")):
        mem = per_cpu * cores
    if mem is None:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemTotal:"):
                        mem = int(line.split()[1]) // 1024
                        break
        except OSError:
            pass
    gpus_env = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    gpus = len([g for g in gpus_env.split(",") if g.strip()]) if gpus_env else 0
    return cores, mem or 4096, gpus


_pool: LocalPool | None = None
_pool_lock = threading.Lock()


def shared_pool(cpus: int | None = None, mem_mib: int | None = None) -> LocalPool:
    """The one pool of this process (every LocalProvider instance shares it)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            cores, mem, gpus = local_resources()
            _pool = LocalPool(cpus or cores, mem_mib or mem, gpus)
        return _pool


_env_pools: dict[str, LocalPool] = {}
_environments: dict[str, Environments] = {}


def local_environments() -> Environments:
    """Environments of this machine (`~/.hpc_serverless/envs`; pip's own settings say where
    packages come from: pip.conf, PIP_INDEX_URL, PIP_FIND_LINKS, ...)."""
    from hpc_serverless.engines.environments import Environments

    root = str(default_home() / "envs")
    with _pool_lock:
        if root not in _environments:
            _environments[root] = Environments(root, sys.executable)
        return _environments[root]


def environment_pool(environment: Environment, cpus: int | None = None, mem_mib: int | None = None) -> LocalPool:
    """The pool whose workers run `environment`'s python: tasks with target `pip` run there
    (a worker cannot switch environment per task). Sized as the shared pool; started at its
    first task, one per environment, for the life of the process."""
    with _pool_lock:
        pool = _env_pools.get(environment.key)
        if pool is None:
            cores, mem, gpus = local_resources()
            pool = LocalPool(cpus or cores, mem_mib or mem, gpus, python=environment.python)
            _env_pools[environment.key] = pool
        return pool


def local_qpus(qpus: Mapping[str, Mapping[str, Any]] | None) -> QpuSection:
    """The local provider's QPUs, checked like a site file's (default: one Aer simulator)."""
    from pydantic import ValidationError

    from hpc_serverless.config.site import QpusSettings, qpu_problem

    devices = {"aer": {"type": "aer"}} if qpus is None else qpus
    try:
        settings = QpusSettings(counted_by=LOCAL_COUNTER, devices=devices)  # type: ignore[arg-type]
    except ValidationError as exc:
        err = exc.errors()[0]
        where, why = ".".join(map(str, err["loc"])), err["msg"].removeprefix("Value error, ")
    else:
        problem = qpu_problem(settings, "local")
        if problem is None:
            return settings.section()
        where, why = ".".join(problem[0]), problem[1]
    raise ConfigError(f"local provider's qpus: {where}: {why}")


class LocalProvider(Provider):
    """Tasks in a pool of worker processes on this machine; objects in a local directory.

    `cpus`/`mem` (GiB) cap what the pool may use (default: the machine, or inside a batch
    job its allocation). `store` is the object store directory. `qpus` names this
    machine's QPUs like a site file's `qpus.devices` (default: one Aer simulator, `aer`);
    the pool lets one task at a time hold each.
    """

    session: Session

    def __init__(self, name: str = "local", *, store: str | os.PathLike[str] | None = None,
                 cpus: int | None = None, mem: float | None = None,
                 qpus: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.name = name
        self.qpu_section = local_qpus(qpus)
        root = store or os.environ.get("HPC_SERVERLESS_STORE") or default_home() / "store"
        self._store = ObjectStore(root)
        register_store(self._store)
        self._cpus = cpus
        self._mem_mib = int(mem * 1024) if mem else None
        #: this process's objects, removable as one by `gc` once the process has ended
        self.session = Session(str(self._store.root), client=f"provider {name}")

    @property
    def store(self) -> ObjectStore:
        return self._store

    # -- storage -----------------------------------------------------------------------------
    def _storage(self) -> Storage:
        """This machine's storage as gc and du see it: no scheduler; a session is in use
        while its process beats its heartbeat."""
        from hpc_serverless.adapters.quota import site_quota
        from hpc_serverless.adapters.transport.local import LocalTransport
        from hpc_serverless.engines.housekeeping import Storage

        root = str(self.store.root)
        programs = str(default_home() / "jobs")
        envs = str(default_home() / "envs")
        return Storage(self.name, root, root, programs,
                       (("objects (no session)", os.path.join(root, "objects")), ("programs", programs),
                        ("environments", envs)),
                       lambda candidates: {}, lambda job_id: self.get_job_by_id(job_id).status(),
                       lambda: site_quota(LocalTransport(), root), envs)

    def gc(self, older_than: float = 7 * 86400, *, dry_run: bool = False, programs: bool = False) -> Any:
        """Remove sessions of ended processes unused for `older_than` seconds (and with
        `programs`, finished Programs); see engines/housekeeping.py."""
        from hpc_serverless.engines.housekeeping import collect

        return collect(self._storage(), older_than, dry_run=dry_run, programs=programs)

    def du(self) -> Any:
        """Sizes and file counts of the local store, by session and kind, and the quota."""
        from hpc_serverless.engines.housekeeping import usage

        return usage(self._storage())

    def remove_program(self, job_id: str) -> Any:
        """Remove one finished Program's directory (`hpc-serverless rm JOB_ID`)."""
        from hpc_serverless.engines.housekeeping import remove_program

        return remove_program(self._storage(), job_id)

    @property
    def pool(self) -> LocalPool:
        return shared_pool(self._cpus, self._mem_mib)

    def capacity(self) -> tuple[int, int, int]:
        """(cores, memory MiB, GPUs) tasks here can use."""
        if current_client() is None:
            p = self.pool
            return p.slots, p.mem_mib, p.gpus
        cores, mem, gpus = local_resources()
        return self._cpus or cores, self._mem_mib or mem, gpus

    def check_target(self, target: Target) -> None:
        if target.qpu:
            qpu_ask(target.qpu, self.qpu_section, f"provider '{self.name}'")
            if current_client() is not None:
                raise ResourceError("target 'qpu' on a task started inside a local task: start QPU tasks "
                                    "from the driver (its pool counts the QPUs)")
        if target.pip:
            if current_client() is not None:
                raise ResourceError(
                    f"target 'pip' ({', '.join(target.pip)}) on a task started inside a local task: such "
                    "tasks run in the driver's pool, in its environment. Start it from the driver, or "
                    "give the outer task the pip list")
            local_environments().ensure(target.pip)  # built (or found) now: the installer's words if not
        cores, mem, gpus = self.capacity()
        said = f"cpu={target.cpu}" + (f" x mpi={target.mpi}" if target.mpi > 1 else "")
        problems = capacity_problems(target, has="it has", cores=cores, mem_mib=mem, gpus=gpus,
                                     cores_asked=(target.cpu * target.mpi, said))
        if target.nodes > 1:
            problems.append(f"nodes={target.nodes} but it is one machine")
        if target.mpi > 1:
            from hpc_serverless.runtime.worker import local_mpi_launcher

            local_mpi_launcher(target.mpi)  # raises if there is no mpirun here
        if problems:
            raise ResourceError(f"task asks for more than provider '{self.name}' has: "
                                + "; ".join(problems))

    def submit(self, fn: TaskFunction, args: tuple[Any, ...], kwargs: Mapping[str, Any],
               target: Target) -> TaskRef:
        deps = find_task_refs(args, kwargs)
        blob = pack_arguments(fn.function, args, kwargs)
        client = current_client()
        env = dict(target.env) or None
        if client is not None:  # inside a task: the driver's pool runs it
            for d in deps:
                if d.backend_key != client.key:
                    raise HPCServerlessError(f"{d!r} belongs to provider '{d.provider}'; a local "
                                             "task can only wait for local tasks")
            task_id = client.submit_nested(fn.function_bytes, blob, deps, target.cpu,
                                           target.mem_mib or 0, env, target.time_s, fn.name, target.mpi)
            return TaskRef(task_id, client.key, self.name, fn.name)
        pool = self.pool
        if target.pip:
            pool = environment_pool(local_environments().ensure(target.pip), self._cpus, self._mem_mib)
        for d in deps:
            if d.backend_key != pool.key:
                owner, same = ((f"provider '{d.provider}'", "the same provider") if d.provider != self.name
                               else ("another pool", "the same environment ('pip' list)"))
                raise HPCServerlessError(f"{d!r} belongs to {owner}; a task on '{self.name}' can only depend "
                                         f"on tasks of {same} (pass get(ref) instead)")
        ask = qpu_ask(target.qpu, self.qpu_section, f"provider '{self.name}'")
        if ask is not None:
            env = {**(env or {}), PLAN_ENV: ask.plan()}
        task_id = pool.submit(TaskSpec(fn.key, fn.function_bytes, blob, deps, target.cpu,
                                       target.mem_mib or 0, env, target.time_s, fn.name, target.mpi,
                                       ask.count if ask else 0, ask.choices if ask else ()))
        return TaskRef(task_id, pool.key, self.name, fn.name)  # (the pool counts it: watch_ref)

    # -- programs -------------------------------------------------------------------------
    def run_program(self, program: Program, arguments: Mapping[str, Any] | None = None) -> Job:
        if program.resources.qpu:
            raise ResourceError(f"a Program on provider '{self.name}' cannot hold a QPU (local Programs run at "
                                "once, outside the pool that counts QPUs); have it run QPU tasks "
                                "(target={'qpu': ...}), or run it on a cluster site")
        return self._programs().run(program, arguments)

    def get_job_by_id(self, job_id: str) -> Job:
        return self._programs().get(job_id)

    def jobs(self) -> list[Job]:
        return self._programs().list()

    def _programs(self) -> LocalJobs:
        from hpc_serverless.engines.local_programs import LocalJobs

        return LocalJobs(self, default_home() / "jobs", local_environments())
