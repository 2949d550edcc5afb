"""QPU asks as scheduler requests.

The one place that knows how each way of counting QPUs is written in a batch script:
Slurm gres, licenses, IBM's SPANK plugin; PBS custom resources, the QRMI hook's resource.
How a job reads back what it was granted is runtime/qpu_grants.py. Nothing here runs a
command.
"""

from __future__ import annotations

import re
from typing import Any

from hpc_serverless.core.errors import ResourceError
from hpc_serverless.core.qpus import PBS_QRMI_RESOURCE, QpuAsk, QpuSection

__all__ = ["sbatch_qpu_options", "merge_option", "pbs_qpu_resources", "SLURM_QPU_CHECKS", "missing_on_slurm"]


def _needs_names(ask: QpuAsk, how: str) -> None:
    """Counting schemes that cannot let the scheduler choose among several QPUs."""
    if not ask.named:
        raise ResourceError(
            f"target 'qpu': {ask.count} of the QPUs {', '.join(ask.choices)} asked, but this site counts "
            f"QPUs by {how}, which cannot leave the choice to the scheduler; name the QPU(s), e.g. "
            f"{{'qpu': {ask.choices[0]!r}}} (or count them by gres, where the scheduler picks)")


def sbatch_qpu_options(ask: QpuAsk) -> dict[str, str]:
    """The sbatch options of an ask (merged into a job's other options by :func:`merge_option`)."""
    resources = [d.scheduler_name for d in ask.devices]
    if ask.counted_by == "gres":
        if ask.named:
            return {"gres": ",".join(f"qpu:{r}:1" for r in resources)}
        return {"gres": f"qpu:{ask.count}"}  # any of the site's: Slurm picks among the typed qpu gres
    if ask.counted_by == "licenses":
        _needs_names(ask, "Slurm licenses")
        return {"licenses": ",".join(f"{r}:1" for r in resources)}
    if ask.counted_by == "spank":
        _needs_names(ask, "IBM's QPU plugin (--qpu=NAMES)")
        return {"qpu": ",".join(resources), "gres": f"qpu:{len(resources)}"}
    raise ResourceError(f"QPUs counted by {ask.counted_by!r} cannot be asked of Slurm")


def merge_option(options: dict[str, Any], key: str, value: str) -> None:
    """Add a comma-list option (gres, licenses) to sbatch options that may hold one already
    (from a site's or target's directives): both lists, one option."""
    have = options.get(key)
    options[key] = f"{have},{value}" if isinstance(have, str) and have else value


def pbs_qpu_resources(ask: QpuAsk) -> list[str]:
    """The `-l` resources (each `name=value`) of an ask on a PBS site."""
    resources = [d.scheduler_name for d in ask.devices]
    if ask.counted_by == "resource":
        _needs_names(ask, "PBS custom resources")
        return [f"{r}=1" for r in resources]
    if ask.counted_by == "qrmi":
        _needs_names(ask, "the PBS QRMI hook")
        # the hook's string_array: one name bare, several inside quotes (PBS splits the
        # -l list on commas otherwise)
        value = resources[0] if len(resources) == 1 else '"' + ",".join(resources) + '"'
        return [f"{PBS_QRMI_RESOURCE}={value}"]
    raise ResourceError(f"QPUs counted by {ask.counted_by!r} cannot be asked of PBS")


#: what `hpc-serverless sites check` asks Slurm about each way of counting QPUs
SLURM_QPU_CHECKS = {"gres": ["sinfo", "-h", "-o", "%G"], "licenses": ["scontrol", "show", "licenses", "-o"],
                    "spank": ["sbatch", "--help"]}


def missing_on_slurm(section: QpuSection, answer: str) -> list[str]:
    """The site's QPUs (resource names) that Slurm's answer to SLURM_QPU_CHECKS does not
    know: no node has the typed gres `qpu:<name>`, no license of that name, or (spank) an
    sbatch without IBM's `--qpu` option (then all of them)."""
    resources = [d.scheduler_name for d in section.devices]
    if section.counted_by == "gres":
        have = {m.group(1) for m in re.finditer(r"\bqpu:([A-Za-z0-9_]+)", answer)}
    elif section.counted_by == "licenses":
        have = set(re.findall(r"LicenseName=([^\s@]+)", answer))
    else:
        have = set(resources) if "--qpu" in answer else set()
    return [r for r in resources if r not in have]
