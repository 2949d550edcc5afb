"""Build the provider a site or a configuration entry describes: remote (through an agent),
pilot, Slurm or PBS, or local."""

from __future__ import annotations

from hpc_serverless.config.serverless import ProviderEntry
from hpc_serverless.config.site import Site
from hpc_serverless.providers.base import Provider


def provider_for_site(site: Site, name: str | None = None, password: str | None = None) -> Provider:
    if site.remote:  # the login-node provider, run by an agent at the far end of one SSH channel
        from hpc_serverless.providers.remote import RemoteProvider

        return RemoteProvider(name or site.name, site, password=password)
    if site.mode == "pilot":  # many small tasks through a few dask worker jobs
        from hpc_serverless.providers.pilot import PilotProvider

        return PilotProvider(name or site.name, site=site, password=password)
    if site.scheduler == "slurm":
        from hpc_serverless.providers.slurm import SlurmProvider

        return SlurmProvider(name or site.name, site=site, password=password)
    from hpc_serverless.providers.pbs import PBSProvider

    return PBSProvider(name or site.name, site=site, password=password)


def provider_from_entry(entry: ProviderEntry) -> Provider:
    """The provider a configuration entry describes (parsed by config/serverless.py)."""
    if entry.site is None:
        from hpc_serverless.providers.local import LocalProvider

        return LocalProvider(entry.name, **entry.local)
    return provider_for_site(entry.site, entry.name, entry.password)
