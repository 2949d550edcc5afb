"""The provider of a batch site (Slurm, PBS) on its login node: a composition of a `Site`,
a transport (commands here; a mock in tests), an object store on the site's shared
filesystem, a `Scheduler` adapter, and the batch engine (engines/batch.py) behind its
TaskRefs. `SlurmProvider`/`PBSProvider` build one from a site file; given a `host`, they
return the RemoteProvider that reaches the same provider through its agent."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from hpc_serverless.adapters.schedulers.base import Scheduler
from hpc_serverless.config.site import Site
from hpc_serverless.core.calls import find_task_refs, pack_arguments
from hpc_serverless.core.errors import ConfigError, HPCServerlessError
from hpc_serverless.core.fs import LOCAL
from hpc_serverless.core.qpus import plan_env
from hpc_serverless.core.refs import TaskRef, register_store
from hpc_serverless.core.sessions import Session, session_of, session_task_id
from hpc_serverless.core.store import ObjectStore
from hpc_serverless.core.target import Target
from hpc_serverless.engines.batch import BatchBackend, BatchTask
from hpc_serverless.providers.base import Provider
from hpc_serverless.runtime.worker import task_key, versions

if TYPE_CHECKING:
    from hpc_serverless.adapters.transport.base import Transport
    from hpc_serverless.core.calls import TaskFunction
    from hpc_serverless.core.jobs import Job, Program
    from hpc_serverless.engines.environments import Environments

__all__ = ["BatchProvider", "SiteProvider"]


class BatchProvider(Provider):
    """A provider whose tasks are batch jobs on a site (Slurm, PBS)."""

    site: Site
    transport: Transport
    scheduler: Scheduler
    session: Session

    @staticmethod
    def resolve_site(scheduler: str, name: str, site: Any, overrides: Mapping[str, Any]) -> Site:
        """A Site from a path, a Site or a mapping, with connection overrides applied
        (the arguments of SlurmProvider/PBSProvider, as in the seed's GatewayProvider)."""
        from hpc_serverless.config.site import site_from_mapping

        if site is None:
            raise ConfigError(f"provider {name!r} needs a site (a site_configs/*.yaml path)")
        changes = {k: v for k, v in overrides.items() if v is not None and not (k == "port" and v == 22)}
        if isinstance(site, Site):
            s = site.model_copy(update=changes) if changes else site
        else:
            # the overrides are validated with the file's keys: a `host` given here means the
            # cluster-side keys are the cluster's to expand (site.on_cluster), not ours
            from hpc_serverless.config.files import read_config_file

            raw = {"scheduler": scheduler, **site} if isinstance(site, Mapping) else read_config_file(site)
            source = None if isinstance(site, Mapping) else str(site)
            s = site_from_mapping({**raw, **changes}, source=source, name=name)
        if s.scheduler != scheduler:
            other = "SlurmProvider" if s.scheduler == "slurm" else "PBSProvider"
            raise ConfigError(f"site '{s.name}' is a {s.scheduler} site; use {other}",
                              file=s.source, key="scheduler")
        return s

    def __init__(self, name: str, site: Site, transport: Transport, scheduler: Scheduler) -> None:
        self.name = name
        self.site = site
        self.transport = transport
        self.scheduler = scheduler
        if site.remote:
            raise ConfigError(f"site '{site.name}' has a host ({site.host}): a site reached over SSH is "
                              f"served by its agent; build it without transport= "
                              f"(SlurmProvider(host=...) gives a RemoteProvider)", file=site.source, key="host")
        self.fs = LOCAL
        self._store = ObjectStore(site.storage_path / "store")
        register_store(self._store)
        self.backend = BatchBackend(self)
        #: this process's session on the site; an agent also holds its clients' sessions
        self.session = Session(str(self._store.root), client=f"provider {name}")
        self._sessions: dict[str, Session] = {self.session.id: self.session}

    @property
    def store(self) -> ObjectStore:
        return self._store

    @cached_property
    def environments(self) -> Environments:
        """The site's environments for `dependencies` and `pip` (built here, on the login node)."""
        from hpc_serverless.engines.environments import Environments

        return Environments(str(self.site.storage_path / "envs"), self.site.python, self.site.environments,
                            setup=self.site.setup, env=self.site.env)

    def session_for(self, session_id: str | None) -> Session | None:
        """An open session by id: this process's, or a remote client's seen through the agent
        (opened on its first call; the agent beats it while the client does)."""
        if session_id is None:
            return None
        s = self._sessions.get(session_id)
        if s is None:
            s = self._sessions.setdefault(session_id, Session(str(self._store.root), session_id,
                                                              client="remote client"))
        s.open(beating=s is self.session)
        return s

    def record_jobs(self, task_id: str, job_ids: list[str]) -> None:
        s = self.session_for(session_of(task_id))
        if s is not None:
            s.record_jobs(job_ids)

    def gc(self, older_than: float = 7 * 86400, *, dry_run: bool = False, programs: bool = False) -> Any:
        """Remove finished, unused sessions (and with `programs`, finished Programs);
        see engines/housekeeping.py. Returns the report."""
        from hpc_serverless.engines.housekeeping import batch_storage, collect

        return collect(batch_storage(self), older_than, dry_run=dry_run, programs=programs)

    def du(self) -> Any:
        """Sizes and file counts of the site's storage, by session and kind, and its quota."""
        from hpc_serverless.engines.housekeeping import batch_storage, usage

        return usage(batch_storage(self))

    def remove_program(self, job_id: str) -> Any:
        """Remove one finished Program's directory (`hpc-serverless rm JOB_ID`)."""
        from hpc_serverless.engines.housekeeping import batch_storage, remove_program

        return remove_program(batch_storage(self), job_id)

    def effective_target(self, target: Target) -> Target:
        return target.merged_over(self.site.defaults)

    def check_resources(self, target: Target) -> Target:
        """What the site can never give `target` (its QPUs, partitions, sizes), refused now;
        the target with the site's defaults. (Programs build their environment themselves.)"""
        effective = self.effective_target(target)
        self.qpu_env(effective)  # an unknown QPU: named with the site's QPUs
        self.scheduler.check_target(effective)
        return effective

    def check_target(self, target: Target) -> None:
        effective = self.check_resources(target)
        if effective.pip:
            # before the call is queued: a requirement that cannot be installed fails the call
            env = self.environments.ensure(effective.pip)
            self.scheduler.env_pythons[effective.pip] = env.python

    @property
    def tasks_key(self) -> str:
        """The key of the engine behind this provider's TaskRefs (a task may depend only on
        tasks of the same engine)."""
        return self.backend.key

    def submit(self, fn: TaskFunction, args: tuple[Any, ...], kwargs: Mapping[str, Any],
               target: Target) -> TaskRef:
        deps = find_task_refs(args, kwargs)
        for d in deps:
            if d.backend_key != self.tasks_key:
                raise HPCServerlessError(
                    f"{d!r} belongs to provider '{d.provider}'; a task on '{self.name}' can only "
                    "depend on tasks of the same provider (pass get(ref) instead)")
        blob = pack_arguments(fn.function, args, kwargs)
        self.session.open()
        return self.submit_packed(session_task_id(self.session.id), fn.name, fn.key, fn.function_bytes, blob,
                                  [(d.task_id, d.function, d._job_id) for d in deps], target)

    def submit_packed(self, task_id: str, name: str, fn_key: str, fn_bytes: bytes | None, blob: bytes,
                      deps: Sequence[tuple[str, str, str | None]], target: Target) -> TaskRef:
        """Queue a call whose arguments are pickled already (here, or by a remote client
        through the agent). `deps` are (task id, function, job id) of upstream tasks; ones
        this process does not know (a new agent) are tracked from their job id and result."""
        target = self.effective_target(target)
        with self.backend._lock:
            known = self.backend._tasks.get(task_id)
            if known is not None:  # the same call sent twice (a retried request): queued once
                return known.ref
            for dep_id, dep_fn, dep_job in deps:
                self.backend._task(TaskRef(dep_id, self.backend.key, self.name, dep_fn, job_id=dep_job))
        fn_key = self.backend.ensure_function(fn_key, fn_bytes)
        session = self.session_for(session_of(task_id))
        if target.pip:
            if target.pip not in self.scheduler.env_pythons:  # not checked by this process (an agent's client)
                self.check_target(target)
            if session is not None:  # gc keeps the environment while the session lives
                session.record_environment(self.environments.ensure(target.pip).key)
        spec = {"task_id": task_id, "name": name, "fn_key": fn_key, "args": blob,
                "deps": [(d[0], d[1]) for d in deps],
                "env": {**target.env, **self.qpu_env(target)} or None,
                "mpi": target.mpi, "requeue": target.requeue, "versions": versions(),
                **self.mpi_launch(target)}
        # not fsync'ed: if this process dies before submitting, the task is lost with it anyway
        self.store.put(spec, task_key(task_id), what=f"the call of {name}()", durable=False,
                       overwrite=True)
        ref = TaskRef(task_id, self.backend.key, self.name, name, backend=self.backend)
        self.backend.enqueue(BatchTask(ref, target, [d[0] for d in deps], name))
        return ref

    def qpu_env(self, target: Target) -> dict[str, str]:
        """What a job of `target` is told of its QPU ask (core/qpus.py); which QPU it got, it
        asks the scheduler."""
        return plan_env(target.qpu, self.site.qpu_section, f"site '{self.site.name}'")

    def mpi_launch(self, target: Target) -> dict[str, Any]:
        if target.mpi <= 1:
            return {}
        return {"launcher": self.site.mpi.argv(target.mpi), "launcher_env": dict(self.site.mpi.env)}

    def log_path_hint(self, job_id: str, task_id: str = "") -> str:
        """Where a task's job log is: in its session's jobs/ (older tasks: the site's jobs/)."""
        return str(self.scheduler.folder_for(task_id).parent / f"{job_id}_0_log.out")

    def render_program(self, program: Program, arguments: Mapping[str, Any] | None = None) -> str:
        """The batch script run_program would submit (for `hpc-serverless run --dry-run`)."""
        from hpc_serverless.engines.programs_batch import BatchJobs

        return BatchJobs(self).render(program, "DRY-RUN-JOB-ID")

    def stats(self) -> dict[str, int]:
        """Commands run on the site so far, by program name (sbatch, sacct, ...)."""
        return dict(self.transport.counts)

    # programs: see programs_batch (the Programs issue)
    def run_program(self, program: Program, arguments: Mapping[str, Any] | None = None) -> Job:
        from hpc_serverless.engines.programs_batch import BatchJobs

        return BatchJobs(self).run(program, arguments)

    def get_job_by_id(self, job_id: str) -> Job:
        from hpc_serverless.engines.programs_batch import BatchJobs

        return BatchJobs(self).get(job_id)

    def jobs(self) -> list[Job]:
        from hpc_serverless.engines.programs_batch import BatchJobs

        return BatchJobs(self).list()

    def search_blocker(self) -> str | None:
        return self.transport.login_blocker()

    def describe(self) -> str:
        return f"{self.name} ({self.scheduler.name} site '{self.site.name}' via {self.transport.describe()})"


class SiteProvider(BatchProvider):
    """A Slurm or PBS site built from its site file. On the login node (no `host`) it is
    this provider; with a `host` the site is served by its agent there, so the constructor
    returns a RemoteProvider instead. The site file is read once, in ``__new__``."""

    kind: str  # the site's scheduler: "slurm" or "pbs"
    _resolved: Site  # read by __new__, used by __init__

    def __new__(cls, name: str = "cluster", host: str | None = None, username: str | None = None,
                password: str | None = None, key_filename: str | None = None, port: int = 22,
                site: Any = None, python: str | None = None, transport: Transport | None = None) -> Any:
        s = BatchProvider.resolve_site(cls.kind, name, site, {"host": host, "username": username, "port": port,
                                                              "key_filename": key_filename, "python": python})
        if transport is None and s.remote:
            from hpc_serverless.providers.remote import RemoteProvider

            return RemoteProvider(name, s, password=password)
        obj = super().__new__(cls)
        obj._resolved = s
        return obj

    def __init__(self, name: str = "cluster", host: str | None = None, username: str | None = None,
                 password: str | None = None, key_filename: str | None = None, port: int = 22,
                 site: Any = None, python: str | None = None, transport: Transport | None = None) -> None:
        s: Site = self._resolved
        if transport is None:
            from hpc_serverless.adapters.transport import connect

            transport = connect(s, password=password)
        super().__init__(name, s, transport, self.make_scheduler(s, transport))

    def make_scheduler(self, site: Site, transport: Transport) -> Scheduler:
        """The scheduler adapter of this kind of site."""
        raise NotImplementedError
