"""The shape of a site's pilot jobs and the dask-jobqueue keywords that start them.

Pure functions of a site file (no cluster is started here), so they can be checked
without a scheduler: :func:`worker_shape` validates ``pilot:`` against the job's target,
:func:`pilot_cluster_kwargs` renders the ``SLURMCluster``/``PBSCluster`` keywords. The
directives come from the schedulers' own target mapping
(:mod:`hpc_serverless.adapters.schedulers`), less what dask-jobqueue writes itself.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hpc_serverless.adapters.dask_jobqueue import SLURM_HEADER_OPTIONS
from hpc_serverless.adapters.jobscript import job_preamble
from hpc_serverless.adapters.schedulers import pbs as P
from hpc_serverless.adapters.schedulers import slurm as S
from hpc_serverless.adapters.schedulers.common import job_name
from hpc_serverless.core.errors import ConfigError
from hpc_serverless.core.launch import GUARD
from hpc_serverless.core.target import Target, format_hms

if TYPE_CHECKING:
    from hpc_serverless.config.site import Site

__all__ = ["WorkerShape", "pilot_cluster_kwargs", "worker_shape"]


@dataclass(frozen=True)
class WorkerShape:
    """What one pilot job is and what each of its dask worker processes offers."""

    target: Target          # the job's own target (site defaults merged in)
    processes: int
    cores: int              # per worker process
    mem_mib: int            # per worker process
    lifetime: float | None  # seconds, before --lifetime-stagger
    stagger: float


def worker_shape(site: Site) -> WorkerShape:
    """The pilot jobs' shape from the site's ``pilot:`` section (ConfigError if it cannot work)."""
    p = site.pilot
    target = Target.of(p.target).merged_over(site.defaults)
    if target.mpi > 1 or target.nodes > 1:
        raise ConfigError("pilot jobs are one dask worker job on one node: no 'mpi' or 'nodes'",
                          file=site.source, key="pilot.target")
    if not target.mem_mib:
        raise ConfigError("pilot jobs need a memory size: set pilot.target.mem (or defaults.mem)",
                          file=site.source, key="pilot.target")
    if target.cpu % p.processes:
        raise ConfigError(f"pilot.processes={p.processes} does not divide the job's cpu={target.cpu}",
                          file=site.source, key="pilot.processes")
    lifetime = p.lifetime
    stagger = p.lifetime_stagger
    if lifetime is None and target.time_s:
        budget = target.time_s - p.walltime_margin
        if budget <= 0:
            raise ConfigError(f"the pilot jobs' time ({target.time_s} s) leaves nothing after "
                              f"walltime_margin={p.walltime_margin:g} s", file=site.source,
                              key="pilot.walltime_margin")
        if stagger is None:
            stagger = min(60.0, 0.05 * budget)
        lifetime = budget - stagger  # the latest retirement is then time - margin
    return WorkerShape(target, p.processes, target.cpu // p.processes, target.mem_mib // p.processes,
                       lifetime, stagger or 0.0)


def pilot_cluster_kwargs(site: Site, store_root: str, shape: WorkerShape | None = None) -> dict[str, Any]:
    """The SLURMCluster / PBSCluster keywords for a site (pure: no cluster is started)."""
    shape = shape or worker_shape(site)
    p, t = site.pilot, shape.target
    logs = str(site.storage_path / "pilot" / "logs")
    extra_args = ["--resources", f"cpu={shape.cores},mem={shape.mem_mib}"]
    if shape.lifetime is not None:
        extra_args += ["--lifetime", f"{int(shape.lifetime)}s",
                       "--lifetime-stagger", f"{int(shape.stagger)}s"]
    kw: dict[str, Any] = {
        "cores": t.cpu, "processes": shape.processes, "memory": f"{t.mem_mib}MiB",
        # dask-jobqueue appends "-m distributed.cli.dask_worker": it runs behind our guard
        "python": f"{shlex.quote(site.python)} -c {shlex.quote(GUARD)}",
        "job_name": job_name(site.name, prefix="hpcs-pilot-", width=40),
        "job_script_prologue": job_preamble(site, store_root, env=t.env),
        "worker_extra_args": extra_args,
        "death_timeout": int(p.connect_timeout),
        "walltime": format_hms(t.time_s) if t.time_s else None,
        "queue": t.partition, "account": t.account,
        "interface": p.interface,
        # the dashboard has no login: on this host only, unless the site asks otherwise
        "scheduler_options": {"dashboard_address": "127.0.0.1:0", **p.scheduler_options},
    }
    if site.scheduler == "slurm":
        opts = S.sbatch_options(t, directives=site.directives)
        opts = {k: v for k, v in opts.items() if k not in SLURM_HEADER_OPTIONS}
        opts["output"] = f"{logs}/%x-%j.log"
        kw["job_extra_directives"] = [line.removeprefix("#SBATCH ") for line in S.directive_lines(opts)]
    else:
        # dask-jobqueue writes the walltime from its own keyword
        resources = [r for r in P.resource_list(t, site.pbs_flavor) if not r.startswith("walltime=")]
        more, others = P.split_directives([*site.directives, *t.directives])
        kw["resource_spec"] = ",".join(resources + more)
        kw["job_extra_directives"] = [*(shlex.join(parts) for parts in others), "-j oe",
                                      f"-o {shlex.quote(logs)}/"]
    return kw
