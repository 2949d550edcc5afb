"""QPUs as a site declares them, and what a task's `qpu` target asks of them.

A QPU is one schedulable device: the site's `qpus:` section names each one, says how a
task reaches it (`type`) and how the site's scheduler counts it (`counted_by`). A target's
`qpu` is 0 (none), a number N (any N of the site's QPUs) or a tuple of names (all of
those). :func:`qpu_ask` turns it into a :class:`QpuAsk` (how many, chosen from which
names) against a site's QPUs, so an unknown name fails at the call, with the known ones.

The ask travels to the job as one environment variable (:data:`PLAN_ENV`): the devices'
descriptions, never credentials (those the task reads from the variables the site names,
on the compute side). Which QPU the task got, the job learns from the scheduler
(runtime/qpus.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from hpc_serverless.core.errors import TargetError

__all__ = ["QPU_TYPES", "SLURM_COUNTERS", "PBS_COUNTERS", "LOCAL_COUNTER", "PLAN_ENV", "GRANTED_ENV", "PBS_QRMI_RESOURCE",
           "QpuDevice", "QpuSection", "QpuAsk", "qpu_ask", "plan_env", "parse_qpu_target", "NAME_RE"]

#: how a task reaches a QPU: an Aer simulator, a fake backend of qiskit-ibm-runtime (a
#: real device's noise, simulated), IBM's cloud service, or QRMI (IBM's scheduler plugins)
QPU_TYPES = ("aer", "fake", "qiskit-ibm-runtime", "qrmi")
#: how a Slurm site counts QPUs: cluster-wide licenses, typed gres per node (`qpu:<name>`),
#: or IBM's SPANK plugin (`--qpu=NAMES` with `--gres=qpu:N`)
SLURM_COUNTERS = ("gres", "licenses", "spank")
#: how a PBS site counts QPUs: a consumable custom resource per QPU (`-l <resource>=1`), or
#: the QRMI hook's string-array resource (`-l quantum_resources=NAMES`)
PBS_COUNTERS = ("resource", "qrmi")
#: the local provider counts QPUs itself, one task per QPU at a time
LOCAL_COUNTER = "slots"

#: the job's environment variable with its ask (JSON; see QpuAsk.plan)
PLAN_ENV = "HPC_SERVERLESS_QPU_PLAN"
#: where a scheduler of our own (the local pool) says which QPUs it granted (comma list)
GRANTED_ENV = "HPC_SERVERLESS_QPUS_GRANTED"

#: the string-array resource IBM's PBS QRMI hook reads (`qmgr -c "create resource
#: quantum_resources type=string_array"`)
PBS_QRMI_RESOURCE = "quantum_resources"

#: QPU names and scheduler resource names: what gres types, licenses, PBS resources and
#: environment-variable prefixes all accept
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")


@dataclass(frozen=True)
class QpuDevice:
    """One QPU of a site.

    ``resource`` is the scheduler's name for it (gres type, license, PBS resource, QRMI
    resource id; default: the QPU's name). ``backend`` names the device behind it: for
    `fake` a fake backend class of qiskit-ibm-runtime (``FakeManilaV2``), for
    `qiskit-ibm-runtime` the service's backend name. ``options`` go to the simulator
    (`aer`) or the service (`qiskit-ibm-runtime`: ``channel``, ``instance``, ``url``).
    ``token_env`` names the environment variable that holds the service's API key on the
    compute side.
    """

    name: str
    type: str
    resource: str = ""
    backend: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    token_env: str | None = None

    @property
    def scheduler_name(self) -> str:
        return self.resource or self.name

    def as_plan(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "resource": self.resource,
                "backend": self.backend, "options": dict(self.options), "token_env": self.token_env}

    @classmethod
    def from_plan(cls, d: Mapping[str, Any]) -> QpuDevice:
        return cls(d["name"], d["type"], d.get("resource") or "", d.get("backend"),
                   dict(d.get("options") or {}), d.get("token_env"))


@dataclass(frozen=True)
class QpuSection:
    """A site's QPUs and how its scheduler counts them."""

    counted_by: str
    devices: tuple[QpuDevice, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.devices)

    def device(self, name: str) -> QpuDevice:
        return next(d for d in self.devices if d.name == name)


@dataclass(frozen=True)
class QpuAsk:
    """`count` QPUs out of `choices` (all of them when the two are equal), on a site whose
    scheduler counts them by `counted_by`."""

    count: int
    choices: tuple[str, ...]
    counted_by: str
    devices: tuple[QpuDevice, ...]

    @property
    def named(self) -> bool:
        """True when the task asked for these very QPUs (not any `count` of them)."""
        return self.count == len(self.choices)

    def plan(self) -> str:
        """The ask as the job's environment variable holds it."""
        return json.dumps({"count": self.count, "choices": list(self.choices), "counted_by": self.counted_by,
                           "devices": [d.as_plan() for d in self.devices]}, sort_keys=True)

    @classmethod
    def from_plan(cls, text: str) -> QpuAsk:
        d = json.loads(text)
        return cls(int(d["count"]), tuple(d["choices"]), d["counted_by"],
                   tuple(QpuDevice.from_plan(x) for x in d["devices"]))


def parse_qpu_target(value: Any) -> int | tuple[str, ...]:
    """A target's `qpu` value: 0/None (none), N (any N), 'name' or ['a', 'b'] (those)."""
    if value is None or value is False:
        return 0
    if isinstance(value, bool):
        return 1
    if isinstance(value, int):
        if value < 0:
            raise TargetError(f"target 'qpu' must be a number of QPUs >= 0 or QPU name(s), not {value!r}")
        return value
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise TargetError(f"target 'qpu' must be a number of QPUs, a QPU name or a list of names, not {value!r}")
    out: list[str] = []
    for n in names:
        n = n.strip()
        if not NAME_RE.match(n):
            raise TargetError(f"target 'qpu': {n!r} is not a QPU name (letters, digits and _, "
                              "starting with a letter)")
        if n not in out:
            out.append(n)
    return tuple(out)


def qpu_ask(value: int | tuple[str, ...], section: QpuSection | None, where: str) -> QpuAsk | None:
    """What a task's `qpu` asks of the QPUs of `where` (a provider, in words), or a
    TargetError that names the QPUs there are."""
    if isinstance(value, (str, list)):
        value = parse_qpu_target(value)
    if not value:
        return None
    if section is None or not section.devices:
        raise TargetError(f"target 'qpu' asks for a QPU but {where} has none (its site file has no "
                          "'qpus:' section)")
    known = section.names
    if isinstance(value, int):
        if value > len(known):
            raise TargetError(f"target 'qpu': {value} QPUs asked but {where} has {len(known)}: "
                              f"{', '.join(known)}")
        return QpuAsk(value, known, section.counted_by, section.devices)
    unknown = [n for n in value if n not in known]
    if unknown:
        raise TargetError(f"target 'qpu': {where} has no QPU {', '.join(map(repr, unknown))}; its QPUs are: "
                          f"{', '.join(known)}")
    return QpuAsk(len(value), tuple(value), section.counted_by, tuple(section.device(n) for n in value))


def plan_env(value: int | tuple[str, ...], section: QpuSection | None, where: str) -> dict[str, str]:
    """The environment a job of a target with this `qpu` gets: its plan (none without a QPU)."""
    ask = qpu_ask(value, section, where)
    return {PLAN_ENV: ask.plan()} if ask is not None else {}


def names_of_resources(resources: Sequence[str], devices: Sequence[QpuDevice]) -> list[str]:
    """QPU names for the scheduler's resource names (unknown ones are skipped)."""
    by_resource = {d.scheduler_name: d.name for d in devices}
    return [by_resource[r] for r in resources if r in by_resource]
