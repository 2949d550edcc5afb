"""Slurm sites: a site file, a transport and the Slurm scheduler (adapters/schedulers/slurm_runner.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpc_serverless.adapters.schedulers.slurm_runner import SlurmScheduler
from hpc_serverless.providers.batch import SiteProvider

if TYPE_CHECKING:
    from hpc_serverless.adapters.schedulers.base import Scheduler
    from hpc_serverless.adapters.transport.base import Transport
    from hpc_serverless.config.site import Site


class SlurmProvider(SiteProvider):
    """A Slurm site. With no `host`, scheduler commands run here (we are on the login node).

    ``SlurmProvider(name="cluster", site="site_configs/x.yaml")``, or with ``host=``,
    ``username=``, ``password=``, ``key_filename=``, ``port=`` to reach it over SSH.
    """

    kind = "slurm"

    def make_scheduler(self, site: Site, transport: Transport) -> Scheduler:
        return SlurmScheduler(site, transport, str(site.storage_path / "store"))


__all__ = ["SlurmProvider", "SlurmScheduler"]
