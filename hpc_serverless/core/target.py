"""`Target`: what a task or program asks of the machine, validated and in fixed units.

Validation happens once, when a function is decorated (or a Program built), so a typo
fails at import time of the user's script, not after an hour in the queue. Units are
converted here and nowhere else: memory in MiB, time in seconds.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from hpc_serverless.core.errors import TargetError
from hpc_serverless.core.qpus import parse_qpu_target
from hpc_serverless.core.requirements import normalize_requirements

__all__ = ["Target", "capacity_problems", "parse_mem_mib", "parse_time_seconds", "format_hms"]

_MEM_UNITS = {
    "": None, "k": 1 / 1024, "kb": 1 / 1024, "ki": 1 / 1024, "kib": 1 / 1024,
    "m": 1, "mb": 1, "mi": 1, "mib": 1,
    "g": 1024, "gb": 1024, "gi": 1024, "gib": 1024,
    "t": 1024**2, "tb": 1024**2, "ti": 1024**2, "tib": 1024**2,
}
_MEM_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_mem_mib(value: Any, *, key: str = "mem") -> int:
    """Memory as MiB: a number is GiB; a string carries a unit ("512M", "8G", "8GB")."""
    if isinstance(value, bool):
        raise TargetError(f"target '{key}' must be a number of GiB or a string like '8G', not {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value <= 0:
            raise TargetError(f"target '{key}' must be a positive number of GiB, not {value!r}")
        return max(1, math.ceil(value * 1024))
    if isinstance(value, str):
        m = _MEM_RE.match(value)
        if m:
            number, unit = float(m.group(1)), m.group(2).lower()
            if unit in _MEM_UNITS:
                factor = _MEM_UNITS[unit]
                if factor is None:  # a bare number in a string: GiB, like a number
                    factor = 1024
                if number <= 0:
                    raise TargetError(f"target '{key}' must be positive, not {value!r}")
                return max(1, math.ceil(number * factor))
            raise TargetError(
                f"target '{key}': unknown memory unit {m.group(2)!r} in {value!r}; "
                "use K, M, G or T (optionally with B or iB), e.g. '512M' or '8G'")
        raise TargetError(f"target '{key}': cannot read {value!r} as memory; use e.g. '512M' or '8G'")
    raise TargetError(f"target '{key}' must be a number of GiB or a string like '8G', not {type(value).__name__}")


def parse_time_seconds(value: Any, *, key: str = "time") -> int:
    """Wall time as seconds: a number is minutes; strings are "MM", "HH:MM:SS", "D-HH:MM:SS"."""
    if isinstance(value, bool):
        raise TargetError(f"target '{key}' must be minutes or 'HH:MM:SS', not {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value <= 0:
            raise TargetError(f"target '{key}' must be a positive number of minutes, not {value!r}")
        return max(1, math.ceil(value * 60))
    if isinstance(value, str):
        m = _TIME_RE.match(value.strip())
        if m:
            days, a, b, c = m.groups()
            if b is None:  # "MM" (minutes), Slurm's own reading of a bare number
                seconds = int(a) * 60
            elif c is None:  # "MM:SS"
                seconds = int(a) * 60 + int(b)
            else:
                seconds = int(a) * 3600 + int(b) * 60 + int(c)
            seconds += int(days or 0) * 86400
            if seconds <= 0:
                raise TargetError(f"target '{key}' must be positive, not {value!r}")
            return seconds
        raise TargetError(f"target '{key}': cannot read {value!r} as a wall time; "
                          "use minutes (30), 'HH:MM:SS' or 'D-HH:MM:SS'")
    raise TargetError(f"target '{key}' must be minutes or 'HH:MM:SS', not {type(value).__name__}")


def format_hms(seconds: int) -> str:
    """Seconds as HH:MM:SS (hours may exceed 24), the form both Slurm and PBS accept."""
    h, rest = divmod(int(seconds), 3600)
    m, s = divmod(rest, 60)
    return f"{h:02d}:{m:02d}:{s:02d}"


def _count(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise TargetError(f"target '{key}' must be a whole number >= {minimum}, not {value!r}")
    if value < minimum:
        raise TargetError(f"target '{key}' must be a whole number >= {minimum}, not {value!r}")
    return value


def _name(value: Any, key: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or "\n" in value:
        raise TargetError(f"target '{key}' must be a non-empty single-line string, not {value!r}")
    return value.strip()


#: why `requeue` is refused on PBS sites (rather than silently doing nothing); here because
#: both the PBS option mapping and the site-file check (config/site.py) refuse it
PBS_REQUEUE_UNSUPPORTED = (
    "target 'requeue' is not supported on PBS sites yet: the task would not be requeued near "
    "its walltime and would end as TIMEOUT; drop 'requeue' (save_checkpoint still works: "
    "submit the task again to resume), or run it on a Slurm site")


@dataclass(frozen=True)
class Target:
    """Resources for one task or program. Construct from a dict with :meth:`of`.

    ``mem_mib`` and ``time_s`` hold the converted values (None: the site's default).
    ``given`` names the fields the user said, so that ``cpu=1`` on a site whose defaults
    say ``cpu: 2`` stays 1: a value equal to the built-in default is still a choice.
    Built directly (``Target(cpu=4)``), the fields that differ from the defaults count
    as given.
    """

    cpu: int = 1
    mem_mib: int | None = None
    gpu: int = 0
    time_s: int | None = None
    mpi: int = 1
    nodes: int = 1
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    directives: tuple[str, ...] = ()
    requeue: int = 0
    #: pip requirements, normalized: the task runs in the site's environment of this set
    pip: tuple[str, ...] = ()
    #: QPUs: 0 none, N any N of the site's, or a tuple of names (all of those); see core/qpus.py
    qpu: int | tuple[str, ...] = 0
    given: frozenset[str] | None = field(default=None, repr=False)  # None: inferred (see above)

    #: the keys a target dict may have; `queue` is PBS's word for `partition`
    KEYS = ("cpu", "mem", "gpu", "time", "mpi", "nodes", "partition", "queue",
            "account", "qos", "constraint", "env", "directives", "requeue", "pip", "qpu")

    def __post_init__(self) -> None:
        if self.given is None:
            object.__setattr__(self, "given", _differing_fields(self))
        else:
            object.__setattr__(self, "given", frozenset(self.given))

    @classmethod
    def of(cls, value: Target | Mapping[str, Any] | None = None, /, **kwargs: Any) -> Target:
        """Validate a dict (or Target, or None) and return a Target."""
        if isinstance(value, Target):
            return value if not kwargs else cls.of({**value.as_dict(), **kwargs})
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise TargetError(f"target must be a dict or a Target, not {type(value).__name__}")
        raw = {**value, **kwargs}
        unknown = sorted(str(k) for k in raw if k not in cls.KEYS)
        if unknown:
            raise TargetError(f"unknown target key(s) {', '.join(map(repr, unknown))}; "
                              f"valid keys are: {', '.join(cls.KEYS)}")
        if "partition" in raw and "queue" in raw and raw["partition"] != raw["queue"]:
            raise TargetError("target has both 'partition' and 'queue' with different values; "
                              "they are the same setting (Slurm and PBS words): give one")
        env = raw.get("env") or {}
        if not isinstance(env, Mapping) or not all(isinstance(k, str) and k.isidentifier() for k in env):
            raise TargetError("target 'env' must be a dict of variable names to values, "
                              f"not {env!r}")
        directives = raw.get("directives") or ()
        if isinstance(directives, str):
            directives = [directives]
        if not isinstance(directives, (list, tuple)) or not all(
                isinstance(d, str) and "\n" not in d for d in directives):
            raise TargetError("target 'directives' must be a list of single-line strings, "
                              f"not {directives!r}")
        try:
            pip = normalize_requirements(raw.get("pip"))
        except ValueError as exc:
            raise TargetError(f"target 'pip': {exc}") from None
        return cls(
            cpu=_count(raw.get("cpu", 1), "cpu", 1),
            mem_mib=None if raw.get("mem") is None else parse_mem_mib(raw["mem"]),
            gpu=_count(raw.get("gpu", 0), "gpu", 0),
            time_s=None if raw.get("time") is None else parse_time_seconds(raw["time"]),
            mpi=_count(raw.get("mpi", 1), "mpi", 1),
            nodes=_count(raw.get("nodes", 1), "nodes", 1),
            partition=_name(raw.get("partition", raw.get("queue")), "partition"),
            account=_name(raw.get("account"), "account"),
            qos=_name(raw.get("qos"), "qos"),
            constraint=_name(raw.get("constraint"), "constraint"),
            env={str(k): str(v) for k, v in env.items()},
            directives=tuple(d.strip() for d in directives),
            requeue=_count(int(raw["requeue"]) if isinstance(raw.get("requeue"), bool) else raw.get("requeue", 0),
                           "requeue", 0),
            pip=pip,
            qpu=parse_qpu_target(raw.get("qpu")),
            given=frozenset(_KEY_FIELDS.get(k, k) for k, v in raw.items()
                            if v is not None and k not in ("env", "directives")),
        )

    @property
    def queue(self) -> str | None:
        """PBS's name for the partition."""
        return self.partition

    def merged_over(self, defaults: Target | None) -> Target:
        """This target with gaps filled from a site's defaults (explicit values win)."""
        if defaults is None:
            return self
        mine_given = self._given()
        kw: dict[str, Any] = {}
        for f in _VALUE_FIELDS:
            kw[f] = getattr(self if f in mine_given else defaults, f)
        kw["given"] = mine_given | defaults._given()
        kw["env"] = {**defaults.env, **self.env}
        kw["directives"] = tuple(defaults.directives) + tuple(
            d for d in self.directives if d not in defaults.directives)
        return Target(**kw)

    def as_dict(self) -> dict[str, Any]:
        """The target as a user would write it (memory in 'NM', time in seconds as 'HH:MM:SS')."""
        out: dict[str, Any] = {}
        given = self._given()
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "given" or (f.name not in given and v == _BUILTIN[f.name]):
                continue
            if f.name == "mem_mib":
                out["mem"] = f"{v}M"
            elif f.name == "time_s":
                out["time"] = format_hms(v)
            elif f.name == "env":
                out["env"] = dict(v)
            elif f.name in ("directives", "pip"):
                out[f.name] = list(v)
            elif f.name == "qpu":
                out["qpu"] = v if isinstance(v, int) else list(v)
            else:
                out[f.name] = v
        return out

    def _given(self) -> frozenset[str]:
        # a Target unpickled from before `given` existed has the class default, None
        return self.given if self.given is not None else _differing_fields(self)

    def __hash__(self) -> int:
        return hash((self.cpu, self.mem_mib, self.gpu, self.time_s, self.mpi, self.nodes,
                     self.partition, self.account, self.qos, self.constraint,
                     tuple(sorted(self.env.items())), self.directives, self.requeue, self.pip, self.qpu, self.given))


#: target-dict keys whose field has another name
_KEY_FIELDS = {"mem": "mem_mib", "time": "time_s", "queue": "partition"}
#: the fields a site default can fill (env and directives are merged, not replaced)
_VALUE_FIELDS = tuple(f.name for f in fields(Target) if f.name not in ("given", "env", "directives"))
_BUILTIN: dict[str, Any] = {f.name: getattr(Target(given=frozenset()), f.name) for f in fields(Target)}


def _differing_fields(t: Target) -> frozenset[str]:
    """The value fields of ``t`` that differ from the built-in defaults (a Target built directly)."""
    return frozenset(f for f in _VALUE_FIELDS if getattr(t, f) != _BUILTIN[f])


def capacity_problems(target: Target, *, has: str, cores: int, mem_mib: int, gpus: int | None,
                      cores_asked: tuple[int, str] | None = None) -> list[str]:
    """What a target asks beyond a machine, node or worker that `has` ("it has", "its nodes
    have") `cores`, `mem_mib` and `gpus` (None: not counted here), one phrase each; every
    provider's check_target words its refusal with these. `cores_asked` is (how many cores,
    how to say it) where that is not just `cpu`."""
    n, said = cores_asked or (target.cpu, f"cpu={target.cpu}")
    problems = []
    if n > cores:
        problems.append(f"{said} but {has} {cores} core(s)")
    if target.mem_mib and target.mem_mib > mem_mib:
        problems.append(f"mem={target.mem_mib} MiB but {has} {mem_mib} MiB")
    if gpus is not None and target.gpu > gpus:
        problems.append(f"gpu={target.gpu} but {has} {gpus} GPU(s)")
    return problems
