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
    lines += qpu_checks(provider)
    provider.store.fs.makedirs(str(provider.store.root), 0o700)
    provider.store.put("probe", "probe/sites-check", overwrite=True)
    if provider.store.get("probe/sites-check") != "probe":
        raise HPCServerlessError(f"site '{site.name}': the probe object read back differs from what was "
                                 f"written in {provider.store.root}")
    provider.store.delete("probe/sites-check")
    lines.append(f"  storage {provider.store.root}: writable, 0700")
    return lines


def qpu_checks(provider: BatchProvider) -> list[str]:
    """Does the scheduler know the QPUs the site file names, the way it says they are
    counted? (A gres or license missing would leave QPU tasks pending forever.)"""
    from hpc_serverless.adapters.schedulers.qpu_requests import SLURM_QPU_CHECKS, missing_on_slurm
    site = provider.site
    section = site.qpu_section
    if section is None:
        return []
    names = ", ".join(section.names)
    argv = SLURM_QPU_CHECKS.get(section.counted_by) if site.scheduler == "slurm" else None
    if argv is None:
        return [f"  qpus ({names}), counted by {section.counted_by}: not checked (ask the admins that "
                "the resources exist)"]
    result = provider.transport.run(argv, timeout=60)
    if not result.ok:
        raise HPCServerlessError(f"site '{site.name}': {result.describe()}")
    missing = missing_on_slurm(section, result.stdout)
    if missing:
        how = {"gres": "no node has the gres qpu:{r} (GresTypes=qpu, gres.conf)",
               "licenses": "Slurm has no license {r} (Licenses= in slurm.conf)",
               "spank": "sbatch has no --qpu option: IBM's QPU plugin is not installed ({r})"}[section.counted_by]
        raise HPCServerlessError(f"site '{site.name}' ({site.source}, key qpus): "
                                 + "; ".join(how.format(r=r) for r in missing)
                                 + ". QPU tasks would wait forever: fix the cluster or the site file")
    return [f"  qpus ({names}), counted by {section.counted_by}: `{' '.join(argv)}` knows them all"]
