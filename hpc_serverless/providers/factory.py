"""Build a batch provider from a configuration entry (a site plus connection overrides)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpc_serverless.config.files import CONNECTION_KEYS
from hpc_serverless.core.errors import ConfigError
from hpc_serverless.providers.base import Provider

if TYPE_CHECKING:
    from hpc_serverless.config.site import Site


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


def provider_from_entry(entry: dict[str, Any], *, source: str | None = None,
                        where: tuple[Any, ...] = ()) -> Provider:
    """A provider entry: `site` (a path, relative to the config file) and/or inline site keys,
    plus connection overrides (host, port, username, password, key_filename, python)."""
    from hpc_serverless.config.files import read_config_file
    from hpc_serverless.config.site import site_from_mapping

    entry = dict(entry)
    name = entry.pop("name")
    password = entry.pop("password", None)
    site_ref = entry.pop("site", None)
    data: dict[str, Any] = {}
    site_source = source
    base: tuple[Any, ...] = where
    if site_ref is not None:
        if not isinstance(site_ref, str):
            raise ConfigError("'site' must be a path to a site file", file=source,
                              key=".".join(map(str, (*where, "site"))))
        path = Path(site_ref).expanduser()
        if not path.is_absolute() and source and not path.exists():
            path = Path(source).parent / path
        data = read_config_file(path)
        site_source, base = str(path), ()
    overrides = {k: entry.pop(k) for k in list(entry) if k in CONNECTION_KEYS}
    data.update(entry)  # inline site keys win over the file's
    data.update(overrides)
    data.setdefault("name", name)
    site = site_from_mapping(data, source=site_source if not entry else source, base=base)
    return provider_for_site(site, name, password)
