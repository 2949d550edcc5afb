"""`hpc-serverless sites check`: validate a site file and, where possible, reach its scheduler."""

from __future__ import annotations

from typing import Any, Iterator

from .errors import HPCServerlessError


def check_site(path: str, *, connect: bool = True) -> Iterator[str]:
    """Lines of a report; raises HPCServerlessError on the first problem."""
    from .site import load_site

    site = load_site(path)
    where = f"{site.username + '@' if site.username else ''}{site.host}:{site.port}" if site.host else "this machine"
    yield f"{path}: valid ({site.scheduler} site '{site.name}', commands on {where}, storage {site.storage})"
    if not connect:
        return
    from .providers.factory import provider_for_site

    provider: Any = provider_for_site(site)
    checks = (["sinfo", "-h", "-o", "%P %a %D %c %m"], ["squeue", "-h", "--me"]) if site.scheduler == "slurm" \
        else (["qstat"],)
    for argv in checks:
        result = provider.transport.run(argv, timeout=60)
        if not result.ok:
            raise HPCServerlessError(f"site '{site.name}': {result.describe()}")
        first = result.stdout.strip().splitlines()[:1]
        yield f"  {' '.join(argv)}: ok{(' - ' + first[0]) if first else ''}"
    provider.store.fs.makedirs(str(provider.store.root), 0o700)
    provider.store.put("probe", "probe/sites-check", overwrite=True)
    assert provider.store.get("probe/sites-check") == "probe"
    provider.store.delete("probe/sites-check")
    yield f"  storage {provider.store.root}: writable, 0700"
