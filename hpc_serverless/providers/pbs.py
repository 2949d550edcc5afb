"""PBS Pro and Torque sites: a site file, a transport and the PBS scheduler
(adapters/schedulers/pbs_runner.py); the same task and program machinery as Slurm."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpc_serverless.adapters.schedulers.pbs_runner import PBSScheduler
from hpc_serverless.providers.batch import SiteProvider

if TYPE_CHECKING:
    from hpc_serverless.adapters.schedulers.base import Scheduler
    from hpc_serverless.adapters.transport.base import Transport
    from hpc_serverless.config.site import Site


class PBSProvider(SiteProvider):
    """A PBS Pro or Torque site (``pbs_flavor`` in the site file). Same arguments as
    :class:`~hpc_serverless.SlurmProvider`."""

    kind = "pbs"

    def make_scheduler(self, site: Site, transport: Transport) -> Scheduler:
        return PBSScheduler(site, transport, str(site.storage_path / "store"))


__all__ = ["PBSProvider", "PBSScheduler"]
