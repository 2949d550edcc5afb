"""`hpc-serverless sites check`: validate a site file and, where possible, reach its scheduler.

A site with a host is checked where it runs: its agent on the login node runs the same
checks (scheduler commands, storage) in the cluster account, after the site's setup lines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from hpc_serverless.core.errors import HPCServerlessError

if TYPE_CHECKING:
    from hpc_serverless.providers.batch import BatchProvider


def check_site(path: str, *, connect: bool = True) -> Iterator[str]:
    """Lines of a report; raises HPCServerlessError on the first problem."""
    from hpc_serverless.config.site import load_site

    site = load_site(path)
    where = f"{site.username + '@' if site.username else ''}{site.host}:{site.port}" if site.host else "this machine"
    yield f"{path}: valid ({site.scheduler} site '{site.name}', commands on {where}, storage {site.storage})"
    if not connect:
        return
    from hpc_serverless.providers.factory import provider_for_site

    provider: Any = provider_for_site(site)
    agent = getattr(provider, "agent", None)
    if agent is None:
        yield from login_node_checks(provider)
        return
    info = agent.connect()
    v = info["versions"]
    yield (f"  agent: {info['where']} (pid {info['pid']}), python {info['python']}, "
           f"hpc_serverless {v['hpc_serverless']} on Python {v['python']}")
    yield from agent.call("site_check")


def login_node_checks(provider: BatchProvider) -> list[str]:
    """Run the scheduler's read-only commands and write, read and delete a probe object."""
    site = provider.site
    checks = (["sinfo", "-h", "-o", "%P %a %D %c %m"], ["squeue", "-h", "--me"]) if site.scheduler == "slurm" \
        else ([site.command("qstat")],)
    lines = []
    for argv in checks:
        result = provider.transport.run(argv, timeout=60)
        if not result.ok:
            raise HPCServerlessError(f"site '{site.name}': {result.describe()}")
        first = result.stdout.strip().splitlines()[:1]
        lines.append(f"  {' '.join(argv)}: ok{(' - ' + first[0]) if first else ''}")
    provider.store.fs.makedirs(str(provider.store.root), 0o700)
    provider.store.put("probe", "probe/sites-check", overwrite=True)
    if provider.store.get("probe/sites-check") != "probe":
        raise HPCServerlessError(f"site '{site.name}': the probe object read back differs from what was "
                                 f"written in {provider.store.root}")
    provider.store.delete("probe/sites-check")
    lines.append(f"  storage {provider.store.root}: writable, 0700")
    return lines
