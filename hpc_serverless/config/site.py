"""Site configurations: one YAML file per cluster, loaded once into a frozen, typed object.

A site says which scheduler runs there, how to reach it, where the shared storage is,
which python to use on the compute side, what to run before it (module loads, venv
activation), the defaults of every job, and how MPI programs are launched. Unknown keys
fail with the list of valid ones and the file and line they came from; units are
converted here; ``$VAR``, ``${VAR}`` and ``${VAR:-default}`` expand (``~`` too).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from hpc_serverless.config.files import key_line, read_config_file
from hpc_serverless.core.errors import ConfigError, TargetError
from hpc_serverless.core.qpus import (
    LOCAL_COUNTER,
    NAME_RE,
    PBS_COUNTERS,
    SLURM_COUNTERS,
    QpuDevice,
    QpuSection,
)
from hpc_serverless.core.target import PBS_REQUEUE_UNSUPPORTED, Target

__all__ = ["Site", "MpiLauncher", "PilotSettings", "EnvironmentSettings", "QpuSettings", "QpusSettings", "load_site",
           "site_from_mapping", "paths_beside", "expand", "on_cluster",
           "shell_word", "CLUSTER_SIDE_KEYS"]

#: keys of a site that name things on the cluster: over SSH they expand there, not here
CLUSTER_SIDE_KEYS = ("storage", "python", "commands_dir")

_VAR = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def expand(value: str) -> str:
    """Expand ~, $VAR, ${VAR} and ${VAR:-default} from this process's environment."""

    def sub(m: re.Match[str]) -> str:
        name = m.group("braced") or m.group("plain")
        got = os.environ.get(name)
        if got is None or (got == "" and m.group("default") is not None):
            if m.group("default") is not None:
                return expand(m.group("default"))
            return m.group(0)  # left for the remote shell (e.g. $SCRATCH on the cluster)
        return got

    return os.path.expanduser(_VAR.sub(sub, value))


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MpiLauncher(_Frozen):
    """How ranks are started: `command` plus `args`; the rank count follows `count_flag`."""

    command: str = "srun"
    args: tuple[str, ...] = ()
    count_flag: str = "-n"
    env: Mapping[str, str] = Field(default_factory=dict)

    def argv(self, ranks: int) -> list[str]:
        return [self.command, *self.args, self.count_flag, str(ranks)]


class PilotSettings(_Frozen):
    """Pilot-worker mode (many small tasks through a few long jobs; providers/pilot.py).

    ``workers`` jobs are kept running (or, with ``adaptive_max``, between ``adaptive_min``
    and ``adaptive_max`` as the load asks); each is sized by ``target`` (cpu, mem, time,
    partition, ... over the site's ``defaults``) and runs ``processes`` dask workers that
    split its cores. A worker retires ``walltime_margin`` seconds before its job's time
    limit (or after ``lifetime`` seconds, give or take ``lifetime_stagger``) and a new job
    replaces it. ``interface`` / ``scheduler_options`` choose the address the workers
    connect to; ``connect_timeout`` is how long a RUNNING worker job may take to connect
    before that is reported as an error. ``max_chunk`` small calls may share one dask task;
    arguments and results above ``inline_limit`` bytes travel through the store.
    """

    workers: int = Field(default=1, ge=0)
    target: Mapping[str, Any] = Field(default_factory=dict)
    adaptive_min: int = Field(default=0, ge=0)
    adaptive_max: int | None = Field(default=None, ge=1)
    processes: int = Field(default=1, ge=1)
    walltime_margin: float = Field(default=120.0, ge=0)
    lifetime: float | None = Field(default=None, gt=0)
    lifetime_stagger: float | None = Field(default=None, ge=0)
    interface: str | None = None
    scheduler_options: Mapping[str, Any] = Field(default_factory=dict)
    connect_timeout: float = Field(default=120.0, gt=0)
    tls: bool = True
    max_chunk: int = Field(default=32, ge=1)
    inline_limit: int = Field(default=1 << 20, ge=0)

    @field_validator("target", mode="before")
    @classmethod
    def _pilot_target(cls, v: Any) -> Any:
        try:
            target = Target.of(v)
        except TargetError as exc:
            raise ValueError(str(exc)) from None
        if target.qpu:
            raise ValueError("pilot workers cannot hold a QPU (each would keep it for its whole life); "
                             "run QPU tasks in mode: jobs")
        return v


class EnvironmentSettings(_Frozen):
    """How the site builds the environments of Programs' `dependencies` and tasks' `pip`
    (engines/environments.py), on the login node, before a job is queued.

    ``installer``: ``pip`` (the site python's own), ``uv`` (much faster; must be on the
    login node's PATH) or ``auto`` (uv if found, else pip). ``index_url``,
    ``extra_index_url`` and ``find_links`` are passed to the installer; ``offline``
    installs from ``find_links`` only (for a login node without internet). Paths expand
    (``~``, ``$VAR``) where the environment is built (the cluster account's, over SSH).
    ``timeout``: seconds an install may take.
    """

    installer: Literal["pip", "uv", "auto"] = "pip"
    index_url: str | None = None
    extra_index_url: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    offline: bool = False
    timeout: float = Field(default=1800.0, gt=0)

    @field_validator("extra_index_url", "find_links", mode="before")
    @classmethod
    def _list(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, (list, tuple)):
            for item in v:
                if not isinstance(item, str) or not item.strip():
                    raise ValueError(f"each entry must be a non-empty string, not {item!r}")
        return v


class QpuSettings(_Frozen):
    """One QPU of a site (core/qpus.py, QpuDevice): how a task reaches it."""

    type: Literal["aer", "fake", "qiskit-ibm-runtime", "qrmi"]
    resource: str | None = None     # the scheduler's name for it (default: the QPU's name)
    backend: str | None = None      # fake: a class of qiskit_ibm_runtime.fake_provider; service: backend name
    options: Mapping[str, Any] = Field(default_factory=dict)
    token_env: str | None = None    # qiskit-ibm-runtime: the variable with the API key (compute side)

    @field_validator("resource")
    @classmethod
    def _resource(cls, v: str | None) -> str | None:
        if v is not None and not NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a scheduler resource name (letters, digits and _, starting "
                             "with a letter)")
        return v

    @field_validator("token_env")
    @classmethod
    def _variable(cls, v: str | None) -> str | None:
        if v is not None and not v.isidentifier():
            raise ValueError(f"{v!r} is not an environment variable name")
        return v


class QpusSettings(_Frozen):
    """A site's `qpus:` section: how its scheduler counts QPUs (``counted_by``: ``gres``,
    ``licenses`` or ``spank`` on Slurm; ``resource`` or ``qrmi`` on PBS; ``slots``: the
    local provider's own count) and the QPUs, by the name tasks ask for (``devices``)."""

    counted_by: Literal["gres", "licenses", "spank", "resource", "qrmi", "slots"]
    devices: Mapping[str, QpuSettings]

    @field_validator("devices", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        if isinstance(v, Mapping):
            if not v:
                raise ValueError("name at least one QPU (or leave out the 'qpus' section)")
            for name in v:
                if not isinstance(name, str) or not NAME_RE.match(name):
                    raise ValueError(f"{name!r} is not a QPU name (letters, digits and _, starting with a letter)")
        return v

    def section(self) -> QpuSection:
        return QpuSection(self.counted_by, tuple(
            QpuDevice(name, d.type, d.resource or "", d.backend, dict(d.options), d.token_env)
            for name, d in self.devices.items()))


def qpu_problem(settings: QpusSettings, scheduler: str, flavor: str = "") -> tuple[tuple[str, ...], str] | None:
    """(key path, sentence) of what in a valid-looking `qpus:` section cannot work on
    this scheduler (`slurm`, `pbs`, or `local` for the local provider) or with its
    devices' types, else None."""
    if scheduler == "pbs" and flavor != "pbspro":
        return (("counted_by",), f"QPUs need PBS Pro's custom resources (or its QRMI hook); this site's "
                f"pbs_flavor is {flavor!r}, which has neither")
    allowed = {"slurm": SLURM_COUNTERS, "pbs": PBS_COUNTERS}.get(scheduler, (LOCAL_COUNTER,))
    if settings.counted_by not in allowed:
        return (("counted_by",), f"a {scheduler} site counts QPUs by one of {', '.join(allowed)}, "
                f"not {settings.counted_by!r}")
    for name, d in settings.devices.items():
        if d.type == "fake" and not (d.backend and re.match(r"^Fake[A-Za-z0-9]+$", d.backend)):
            return (("devices", name, "backend"), "a 'fake' QPU names its fake backend class of "
                    "qiskit_ibm_runtime.fake_provider, e.g. backend: FakeManilaV2")
        secret = next((k for k in d.options if k.lower() in ("token", "apikey", "api_key", "password")), None)
        if secret is not None:
            return (("devices", name, "options", secret), "a credential does not belong in a site file (it "
                    "reaches batch scripts and job environments): name the environment variable that holds "
                    "it with token_env")
        if d.type != "qiskit-ibm-runtime" and d.token_env:
            return (("devices", name, "token_env"), f"only a 'qiskit-ibm-runtime' QPU takes a token "
                    f"(this one is {d.type!r})")
        if d.type == "qrmi" and settings.counted_by not in ("spank", "qrmi"):
            return (("devices", name, "type"), "a 'qrmi' QPU is acquired by IBM's scheduler plugin: "
                    "count it with counted_by: spank (Slurm) or qrmi (PBS)")
    return None


class Site(_Frozen):
    """A cluster as hpc_serverless sees it. Build with :func:`load_site`."""

    name: str
    scheduler: Literal["slurm", "pbs"]
    pbs_flavor: Literal["pbspro", "torque"] = "pbspro"
    description: str = ""
    host: str | None = None
    port: int = 22
    username: str | None = None
    key_filename: str | None = None
    trust_unknown_hosts: bool = False
    known_hosts: str | None = None     # default: ~/.ssh/known_hosts (and the ssh config's)
    ssh_config: str | None = None      # default: ~/.ssh/config
    storage: str
    python: str = Field(default_factory=lambda: sys.executable)
    commands_dir: str | None = None    # where the scheduler's commands are (default: PATH)
    setup: tuple[str, ...] = ()
    env: Mapping[str, str] = Field(default_factory=dict)
    defaults: Target = Field(default_factory=Target)
    directives: tuple[str, ...] = ()
    mpi: MpiLauncher = Field(default_factory=MpiLauncher)
    poll_interval: float = Field(default=5.0, gt=0)
    max_poll_interval: float = Field(default=60.0, gt=0)
    # seconds a job that ended may go without its result object showing before it is judged
    # by the scheduler's state (NFS and Lustre publish files late)
    result_grace: float = Field(default=5.0, ge=0)
    max_array_size: int | None = Field(default=None, ge=1)
    arrays: bool = True
    array_linger: float = Field(default=0.1, ge=0)
    accounting: Literal["auto", "sacct", "squeue"] = "auto"
    mode: Literal["jobs", "pilot"] = "jobs"
    agent_grace: float = Field(default=600.0, ge=0)   # seconds an agent outlives its last client
    pilot: PilotSettings = Field(default_factory=PilotSettings)
    environments: EnvironmentSettings = Field(default_factory=EnvironmentSettings)
    qpus: QpusSettings | None = None
    source: str | None = None

    @field_validator("defaults", mode="before")
    @classmethod
    def _target(cls, v: Any) -> Target:
        try:
            return Target.of(v)
        except TargetError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("storage", "python", "key_filename", "known_hosts", "ssh_config", "commands_dir")
    @classmethod
    def _expand(cls, v: str | None, info: ValidationInfo) -> str | None:
        # a site reached over SSH: what the cluster side uses means what it means in the
        # cluster account's environment, so the agent expands it there (on_cluster)
        if info.field_name in CLUSTER_SIDE_KEYS and info.data.get("host"):
            return v
        return expand(v) if isinstance(v, str) else v

    @field_validator("setup", "directives", mode="before")
    @classmethod
    def _lines(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, (list, tuple)):
            for line in v:
                if not isinstance(line, str):
                    raise ValueError(f"each line must be a string, not {line!r}")
                if "\n" in line:
                    raise ValueError(f"a line may not contain a newline: {line!r}")
        return v

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, v: Any) -> Any:
        if isinstance(v, Mapping):
            bad = [k for k in v if not isinstance(k, str) or not k.isidentifier()]
            if bad:
                raise ValueError(f"{bad[0]!r} is not an environment variable name")
            return {k: str(val) for k, val in v.items()}
        return v

    @property
    def qpu_section(self) -> QpuSection | None:
        """The site's QPUs (None: it has none)."""
        return self.qpus.section() if self.qpus is not None else None

    @property
    def remote(self) -> bool:
        return self.host is not None

    @property
    def storage_path(self) -> Path:
        return Path(self.storage)

    def command(self, name: str) -> str:
        """A scheduler command (qsub, sbatch, ...): from ``commands_dir`` if the site names
        one, else whatever PATH finds."""
        return f"{self.commands_dir.rstrip('/')}/{name}" if self.commands_dir else name


def on_cluster(site: Site) -> Site:
    """The site as its agent on the login node uses it: no host (commands run there), and
    storage, python and commands_dir expanded in this (the cluster account's) environment;
    python, if the file names none, is this interpreter (the agent's own)."""
    update: dict[str, Any] = {"host": None}
    for key in CLUSTER_SIDE_KEYS:
        value = getattr(site, key)
        if isinstance(value, str):
            update[key] = expand(value)
    if "python" not in site.model_fields_set:
        update["python"] = sys.executable
    return site.model_copy(update=update)


def shell_word(value: str) -> str:
    """`value` as one shell word that expands ~, $VAR, ${VAR} and ${VAR:-default} the way
    :func:`expand` does, in the shell's environment; everything else is quoted literally
    (names are checked by the pattern, so nothing typed runs as code)."""
    out: list[str] = []
    if value == "~" or value.startswith("~/"):
        out.append('"$HOME"')
        value = value[1:]
    pos = 0
    for m in _VAR.finditer(value):
        if m.start() > pos:
            out.append(shlex.quote(value[pos:m.start()]))
        name = m.group("braced") or m.group("plain")
        if m.group("default") is not None:
            out.append(f'"${{{name}:-$(printf %s {shell_word(m.group("default"))})}}"')
        else:
            out.append(f'"${{{name}}}"')
        pos = m.end()
    if pos < len(value) or not out:
        out.append(shlex.quote(value[pos:]))
    return "".join(out)


#: characters no site value that reaches a batch script or a shell may hold (a newline in
#: `storage` would end a comment line of a rendered script and run the rest as shell)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
#: keys whose text never reaches a script (free prose)
_PROSE_KEYS = frozenset({"description", "source"})


def _control_character(value: Any, where: tuple[Any, ...] = ()) -> tuple[tuple[Any, ...], str] | None:
    """The first (key path, character) of a control character in a site's values."""
    if isinstance(value, str):
        m = _CONTROL.search(value)
        return (where, m.group(0)) if m else None
    items = value.items() if isinstance(value, Mapping) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        if not where and key in _PROSE_KEYS:
            continue
        found = _control_character(key, (*where, key)) if isinstance(key, str) else None
        found = found or _control_character(item, (*where, key))
        if found:
            return found
    return None


def _valid_keys(model: type[BaseModel]) -> list[str]:
    return [k for k in model.model_fields if k != "source"]


def paths_beside(raw: Mapping[str, Any], directory: str) -> dict[str, Any]:
    """A site mapping with its relative `commands_dir` and `environments.find_links` made
    absolute in `directory` (the site file's): they name things beside the file. A site
    with a host keeps them (they are the cluster's paths, read there)."""
    out = dict(raw)
    if out.get("host"):
        return out

    def beside(value: Any) -> Any:
        if isinstance(value, str) and value.strip() and "://" not in value and not os.path.isabs(expand(value)):
            return os.path.join(directory, value)
        return value

    if "commands_dir" in out:
        out["commands_dir"] = beside(out["commands_dir"])
    envs = out.get("environments")
    if isinstance(envs, Mapping) and isinstance(envs.get("find_links"), (str, list, tuple)):
        links = envs["find_links"]
        out["environments"] = {**envs, "find_links": [beside(x) for x in ([links] if isinstance(links, str) else links)]}
    return out


def site_from_mapping(data: Mapping[str, Any], *, source: str | None = None,
                      base: tuple[Any, ...] = (), name: str | None = None) -> Site:
    """Validate a mapping as a Site; errors name the file, the key and the line."""
    raw = dict(data)
    if name and "name" not in raw:
        raw["name"] = name
    if source and "name" not in raw:
        raw["name"] = Path(source).stem
    raw["source"] = source
    if source:
        raw = paths_beside(raw, os.path.dirname(os.path.abspath(source)))
    bad = _control_character(raw)
    if bad is not None:
        keys, char = bad
        full = base + keys
        raise ConfigError(f"a control character ({char!r}) in a site value: site values reach batch scripts "
                          "and shell lines, so each must be one line of printable text",
                          file=source, key=".".join(map(str, full)), line=key_line(source, full))
    try:
        site = Site(**raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        model: type[BaseModel] = Site
        if loc and loc[0] == "mpi":
            model = MpiLauncher
        elif loc and loc[0] == "pilot":
            model = PilotSettings
        elif loc and loc[0] == "environments":
            model = EnvironmentSettings
        elif loc and loc[0] == "qpus":
            model = QpuSettings if len(loc) > 3 and loc[1] == "devices" else QpusSettings
        if err["type"] == "extra_forbidden":
            msg = (f"unknown key {loc[-1]!r}; valid keys are: {', '.join(_valid_keys(model))}")
        elif err["type"] == "missing":
            msg = f"required key {loc[-1]!r} is missing"
        elif err["type"] == "literal_error":
            msg = f"must be one of {err['ctx']['expected']}, not {err['input']!r}"
        else:
            msg = err["msg"].removeprefix("Value error, ")
        full = base + loc
        key = ".".join(map(str, full))
        if err["type"] == "missing":
            full = base
        raise ConfigError(msg, file=source, key=key, line=key_line(source, full)) from None
    if site.qpus is not None:
        problem = qpu_problem(site.qpus, site.scheduler, site.pbs_flavor)
        if problem is not None:
            full = (*base, "qpus", *problem[0])
            raise ConfigError(problem[1], file=source, key=".".join(map(str, full)), line=key_line(source, full))
    if site.defaults.qpu:
        full = (*base, "defaults", "qpu")
        raise ConfigError("a site's defaults cannot ask for a QPU (every task would hold one); give "
                          "'qpu' in the targets of the tasks that need it", file=source,
                          key=".".join(map(str, full)), line=key_line(source, full))
    if site.scheduler == "pbs" and site.defaults.requeue:
        full = (*base, "defaults", "requeue")
        raise ConfigError(PBS_REQUEUE_UNSUPPORTED, file=source, key=".".join(map(str, full)),
                          line=key_line(source, full))
    return site


def load_site(path: str | os.PathLike[str]) -> Site:
    """Read and validate a site file."""
    p = str(path)
    return site_from_mapping(read_config_file(p), source=p)
