"""Inside a job: which QPUs the scheduler granted it, read from the scheduler's own words.

`scontrol show job -d` for Slurm gres and licenses, `qstat -f` for PBS resources, the
variables IBM's QPU plugin (SPANK) or hook (PBS) sets. Parsers only; runtime/qpus.py runs
the commands.
"""

from __future__ import annotations

import re
from typing import Mapping

from hpc_serverless.core.qpus import PBS_QRMI_RESOURCE

__all__ = ["granted_from_scontrol", "granted_from_qstat", "granted_from_plugin_env", "PLUGIN_RESOURCES_ENV"]

#: what IBM's SPANK plugin and PBS hook set in a job: the QPUs it acquired (the first name is
#: the current one, the second the plugin's older name), and their list separator
PLUGIN_RESOURCES_ENV = ("QRMI_JOB_QPU_RESOURCES", "SLURM_JOB_QPU_RESOURCES")
PLUGIN_DELIMITER_ENV = "QRMI_LIST_DELIMITER"

_JOB_GRES = re.compile(r"\bJOB_GRES=(\S+)")
_NODE_GRES = re.compile(r"\bqpu:([A-Za-z0-9_]+)(?::(\d+))?\((?:CNT:(\d+)|IDX:[^)]*)\)")
_LICENSES = re.compile(r"\bLicenses=(\S+)")


def granted_from_scontrol(text: str, counted_by: str) -> list[str]:
    """Resource names of the QPUs a job holds, from `scontrol show job -d JOBID`: its typed
    `qpu` gres (JOB_GRES=qpu:aer:1,qpu:fake:0, or the node line GRES=qpu:aer(CNT:1)), or its
    licenses (Licenses=aer:1)."""
    out: list[str] = []
    if counted_by == "licenses":
        m = _LICENSES.search(text)
        if m and m.group(1) != "(null)":
            for item in m.group(1).split(","):
                name, _, count = item.partition(":")
                if name and (not count or int(count or 0) > 0):
                    out.append(name.split("@")[0])
        return out
    m = _JOB_GRES.search(text)
    if m and m.group(1) != "(null)":
        for item in m.group(1).split(","):
            parts = item.split("(")[0].split(":")
            if len(parts) == 3 and parts[0] == "qpu" and parts[2].isdigit() and int(parts[2]) > 0:
                out.append(parts[1])
    if not out:
        for g in _NODE_GRES.finditer(text):
            count = g.group(3) or g.group(2) or "1"
            if int(count) > 0 and g.group(1) not in out:
                out.append(g.group(1))
    return out


def granted_from_qstat(text: str, resources: list[str], counted_by: str) -> list[str]:
    """Resource names of the QPUs a PBS job holds, from `qstat -f JOBID`
    (`Resource_List.<resource> = 1`, or `Resource_List.quantum_resources = a,b`)."""
    found: dict[str, str] = {}
    for m in re.finditer(r"^\s*Resource_List\.([A-Za-z0-9_]+)\s*=\s*(.*?)\s*$", text, re.M):
        found[m.group(1)] = m.group(2)
    if counted_by == "qrmi":
        return [n for n in re.split(r"[,\s]+", found.get(PBS_QRMI_RESOURCE, "").strip('"')) if n]
    return [r for r in resources if found.get(r, "0").strip().isdigit() and int(found[r]) > 0]


def granted_from_plugin_env(env: Mapping[str, str]) -> list[str] | None:
    """The QPUs IBM's plugin (SPANK) or hook (PBS) acquired for the job, from its
    environment variables (None: the plugin set none)."""
    value = next((env[k] for k in PLUGIN_RESOURCES_ENV if env.get(k)), None)
    if value is None:
        return None
    sep = env.get(PLUGIN_DELIMITER_ENV) or ("," if "," in value else ":")
    return [n.strip() for n in value.split(sep) if n.strip()]
