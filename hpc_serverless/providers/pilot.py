"""A Slurm or PBS site in pilot mode: tasks through a few dask-jobqueue pilot jobs.

The provider is the composition (the site's scheduler, transport and store, as for job
mode); the engine that runs the tasks is :class:`hpc_serverless.engines.pilot.PilotBackend`,
whose module's docstring tells how a call travels.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from hpc_serverless.adapters.schedulers.base import Scheduler
from hpc_serverless.adapters.schedulers.pbs_runner import PBSScheduler
from hpc_serverless.adapters.schedulers.slurm_runner import SlurmScheduler
from hpc_serverless.adapters.transport import connect
from hpc_serverless.config.site import Site, load_site, site_from_mapping
from hpc_serverless.core.errors import ConfigError, ResourceError
from hpc_serverless.core.refs import TaskRef
from hpc_serverless.core.target import Target, capacity_problems
from hpc_serverless.engines.pilot import PilotBackend
from hpc_serverless.providers.batch import BatchProvider

if TYPE_CHECKING:
    from hpc_serverless.adapters.transport.base import Transport

__all__ = ["PilotProvider"]


class PilotProvider(BatchProvider):
    """A Slurm or PBS site in pilot mode (``mode: pilot`` in its site file).

    Tasks run in dask workers that dask-jobqueue starts as a few long batch jobs (see the
    module's docstring); objects, the store and Programs are those of the site's
    :class:`~hpc_serverless.engines.batch.BatchProvider` (Programs stay batch jobs).
    ``provider.start(wait=True)`` starts the pilot jobs now and waits for the first worker.
    """

    def __init__(self, name: str = "cluster", site: str | os.PathLike[str] | Site | Mapping[str, Any] | None = None,
                 host: str | None = None, username: str | None = None, password: str | None = None,
                 key_filename: str | None = None, port: int = 22, python: str | None = None,
                 transport: Transport | None = None) -> None:
        if isinstance(site, (str, os.PathLike)):
            site = load_site(site)
        elif isinstance(site, Mapping):
            site = site_from_mapping(site, name=name)
        if not isinstance(site, Site):
            raise ConfigError(f"provider {name!r} needs a site (a site_configs/*.yaml path)")
        s = self.resolve_site(site.scheduler, name, site, {"host": host, "username": username, "port": port,
                                                            "key_filename": key_filename, "python": python})
        if importlib.util.find_spec("dask_jobqueue") is None:
            raise ConfigError("pilot mode needs dask-jobqueue: pip install 'hpc-serverless[pilot]'",
                              file=s.source, key="mode")
        if s.remote:
            raise ConfigError("pilot mode runs the dask scheduler in this process, which the compute nodes "
                              "must reach; a site with a 'host' runs it in its agent on the login node: "
                              "build the provider from the site (QuantumServerless configuration, "
                              "or SlurmProvider/PBSProvider(host=...)) rather than PilotProvider(host=...)",
                              file=s.source, key="mode")
        if transport is None:
            transport = connect(s, password=password)
        store_root = str(s.storage_path / "store")
        scheduler: Scheduler
        if s.scheduler == "slurm":
            scheduler = SlurmScheduler(s, transport, store_root)
        else:
            scheduler = PBSScheduler(s, transport, store_root)
        super().__init__(name, s, transport, scheduler)
        self.pilot = PilotBackend(self.site, self.store, self.transport, self.fs, self.scheduler)

    # -- tasks -------------------------------------------------------------------------------------
    def check_target(self, target: Target) -> None:
        shape = self.pilot.shape
        problems = capacity_problems(target, has="each pilot worker has", cores=shape.cores,
                                     mem_mib=shape.mem_mib, gpus=None)
        for key in ("gpu", "mpi", "nodes"):
            if getattr(target, key) > (0 if key == "gpu" else 1):
                problems.append(f"{key}={getattr(target, key)} needs its own batch job (mode: jobs)")
        if target.time_s and shape.lifetime and target.time_s > shape.lifetime:
            problems.append(f"time={target.time_s} s but a pilot worker lives {int(shape.lifetime)} s")
        for key in ("partition", "account", "qos", "constraint"):
            mine = getattr(target, key)
            if mine and mine != getattr(shape.target, key):
                problems.append(f"{key}={mine!r} but the pilot workers run with "
                                f"{key}={getattr(shape.target, key)!r}")
        if target.directives:
            problems.append("scheduler directives apply to batch jobs (mode: jobs)")
        if target.qpu:
            problems.append(f"qpu={target.qpu if isinstance(target.qpu, int) else list(target.qpu)}: the "
                            "scheduler counts QPUs per batch job, and a pilot worker's job cannot take one per "
                            "task; run QPU tasks on the site in mode: jobs (a second provider entry for the "
                            "same site file, with mode: jobs, shares its storage)")
        if target.pip:
            problems.append(f"pip={list(target.pip)}: the pilot workers are long-lived, started with the "
                            "site's python, and cannot switch environment per task; run it on the site in "
                            "mode: jobs (each job runs in an environment built for its set), or in a Program "
                            "with dependencies=[...]")
        if problems:
            raise ResourceError(f"task does not fit the pilot workers of '{self.name}' (site "
                                f"'{self.site.name}', mode: pilot): " + "; ".join(problems))

    @property
    def tasks_key(self) -> str:
        return self.pilot.key

    def submit_packed(self, task_id: str, name: str, fn_key: str, fn_bytes: bytes | None, blob: bytes,
                      deps: Sequence[tuple[str, str, str | None]], target: Target) -> TaskRef:
        """Queue a call whose arguments are pickled already (see PilotBackend.submit_packed)."""
        return self.pilot.submit_packed(task_id, name, fn_key, fn_bytes, blob, deps, target, self.name)

    def start(self, wait: bool = True, timeout: float | None = None) -> PilotProvider:
        """Start the pilot jobs now; with `wait`, until one worker is connected (a site whose
        workers cannot reach this process fails here, with the reason)."""
        self.pilot.start(wait=wait, timeout=timeout)
        return self

    def close(self) -> None:
        """Stop the pilot jobs (also done at exit)."""
        self.pilot.close()
        self.backend.close()

    def pilot_jobs(self) -> list[str]:
        """The scheduler job ids of every pilot job started so far."""
        return list(self.pilot.jobs)

    def describe(self) -> str:
        p = self.site.pilot
        size = (f"{p.adaptive_min}-{p.adaptive_max}" if p.adaptive_max is not None else str(p.workers))
        return (f"{self.name} ({self.scheduler.name} site '{self.site.name}', pilot mode: {size} worker "
                f"job(s) of {self.pilot.shape.target.cpu} cores)")
