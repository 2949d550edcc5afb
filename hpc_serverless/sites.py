"""`hpc-serverless sites check`: validate a site file and, where possible, reach its scheduler."""

from __future__ import annotations

from typing import Iterator

from .errors import ConfigError


def check_site(path: str, *, connect: bool = True) -> Iterator[str]:
    try:
        from .site import load_site
    except ImportError:
        raise ConfigError("site configurations need the Slurm/PBS support, which this version "
                          "does not have yet", file=path) from None
    site = load_site(path)
    yield f"{path}: valid ({site.scheduler} site '{site.name}')"
    if connect:
        from .providers.factory import provider_for_site

        provider = provider_for_site(site)
        yield from provider.check()
