"""Slurm as data: targets to submitit parameters, the state map, argv builders, parsers.

Nothing here runs a command; the provider runs these argv through a transport.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from hpc_serverless.adapters.schedulers.common import JobState
from hpc_serverless.adapters.schedulers.qpu_requests import merge_option, sbatch_qpu_options
from hpc_serverless.core.errors import ResourceError
from hpc_serverless.core.qpus import QpuSection, qpu_ask
from hpc_serverless.core.target import Target, capacity_problems

# Slurm job states (squeue/sacct long names) -> our five statuses
STATE_MAP: Mapping[str, str] = {
    "PENDING": "PENDING", "CONFIGURING": "PENDING", "REQUEUED": "PENDING",
    "REQUEUE_FED": "PENDING", "REQUEUE_HOLD": "PENDING", "RESV_DEL_HOLD": "PENDING",
    "SUSPENDED": "PENDING", "STOPPED": "PENDING", "RESIZING": "RUNNING",
    "RUNNING": "RUNNING", "COMPLETING": "RUNNING", "SIGNALING": "RUNNING",
    "STAGE_OUT": "RUNNING", "POWER_UP_NODE": "PENDING", "UPDATE_DB": "RUNNING",
    "COMPLETED": "SUCCEEDED",
    "FAILED": "FAILED", "TIMEOUT": "FAILED", "OUT_OF_MEMORY": "FAILED", "NODE_FAIL": "FAILED",
    "BOOT_FAIL": "FAILED", "DEADLINE": "FAILED", "PREEMPTED": "FAILED", "SPECIAL_EXIT": "FAILED",
    "REVOKED": "STOPPED", "CANCELLED": "STOPPED",
}

# why a job ended without a value, in words a user can act on
FAILURE_TEXT: Mapping[str, str] = {
    "TIMEOUT": "it ran past its time limit (raise target 'time')",
    "OUT_OF_MEMORY": "it ran out of memory (raise target 'mem')",
    "NODE_FAIL": "the node it ran on failed",
    "BOOT_FAIL": "its node failed to boot",
    "DEADLINE": "it missed its deadline",
    "PREEMPTED": "it was preempted by a higher-priority job",
    "CANCELLED": "it was cancelled",
    "FAILED": "its batch script exited with an error",
}

# stderr fragments of a controller that is down or busy: retry, don't fail the user
TRANSIENT = ("Unable to contact slurm controller", "Socket timed out", "Connection refused",
             "Resource temporarily unavailable", "temporarily unable", "Zero Bytes were transmitted",
             "Slurm backup controller in standby mode", "Connection timed out", "Transport endpoint")

# stderr of sacct when there is no accounting (or slurmdbd is down): fall back to squeue
NO_ACCOUNTING = ("accounting storage is disabled", "slurmdbd", "Problem talking to the database",
                 "persistent connection", "accounting_storage")


def accounting_missing(stderr: str) -> bool:
    return any(t.lower() in stderr.lower() for t in NO_ACCOUNTING)

#: the umask of a submitted job: Slurm takes it from sbatch's SLURM_UMASK, so what the job
#: creates (submitit's result pickle, its log) is private even under a group's umask 002
JOB_UMASK = "0077"
JOB_UMASK_ENV = {"SLURM_UMASK": JOB_UMASK}

SACCT_FIELDS = ("JobID", "State", "ExitCode", "Reason", "NodeList")


def is_transient(stderr: str) -> bool:
    return any(t.lower() in stderr.lower() for t in TRANSIENT)


def status_of(state: str) -> str:
    return STATE_MAP.get(state, "RUNNING")


# -- targets --------------------------------------------------------------------------------------
def sbatch_options(target: Target, *, directives: Iterable[str] = (),
                   qpus: QpuSection | None = None) -> dict[str, Any]:
    """The sbatch long options (name -> value, True for a bare flag) for a target, site
    defaults already merged in, on a site with `qpus`. The one place the target-to-Slurm
    mapping lives."""
    per_node = max(1, math.ceil(target.mpi / target.nodes))
    opts: dict[str, Any] = {"nodes": target.nodes, "ntasks-per-node": per_node,
                            "cpus-per-task": target.cpu}
    if target.time_s:
        opts["time"] = max(1, math.ceil(target.time_s / 60))
    if target.mem_mib:
        opts["mem"] = f"{target.mem_mib}M"
    if target.gpu:
        opts["gpus-per-node"] = target.gpu
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(target, key)
        if value:
            opts[key] = value
    for line in [*directives, *target.directives]:
        key, value = parse_directive(line)
        opts[key] = value
    ask = qpu_ask(target.qpu, qpus, "this site")
    if ask is not None:
        for key, value in sbatch_qpu_options(ask).items():
            merge_option(opts, key, value)
    return opts


#: sbatch options submitit takes as its own parameters (with _ for -); the rest go to
#: its `additional_parameters`
_SUBMITIT_NATIVE = {"nodes", "ntasks-per-node", "cpus-per-task", "time", "mem", "gpus-per-node",
                    "partition", "account", "qos", "constraint"}


def submitit_parameters(target: Target, *, directives: Iterable[str] = (),
                        qpus: QpuSection | None = None) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for a target (site defaults already merged in)."""
    opts = sbatch_options(target, directives=directives, qpus=qpus)
    params: dict[str, Any] = {"use_srun": False,  # our worker starts MPI ranks itself
                              "stderr_to_stdout": True}
    extra: dict[str, Any] = {}
    for key, value in opts.items():
        if key in _SUBMITIT_NATIVE:
            params[key.replace("-", "_")] = value
        else:
            extra[key] = value
    if extra:
        params["additional_parameters"] = extra
    return params


def directive_lines(options: Mapping[str, Any]) -> list[str]:
    """'#SBATCH --name=value' lines, values quoted (they come from users)."""
    lines = []
    for key, value in options.items():
        if value is True:
            lines.append(f"#SBATCH --{key}")
        else:
            lines.append(f"#SBATCH --{key}={shlex.quote(str(value))}")
    return lines


def parse_directive(line: str) -> tuple[str, Any]:
    """'--exclusive' / '--gres=gpu:1' / '#SBATCH --x=y' -> ('exclusive', True) / ('gres', 'gpu:1')."""
    text = line.strip()
    if text.startswith("#SBATCH"):
        text = text[len("#SBATCH"):].strip()
    if not text.startswith("--") or " " in text.split("=", 1)[0]:
        raise ResourceError(f"Slurm directive {line!r} must look like '--name=value' or '--flag'")
    name, sep, value = text[2:].partition("=")
    return name, (value if sep else True)


# -- commands ---------------------------------------------------------------------------------------
def sacct_argv(job_ids: Iterable[str]) -> list[str]:
    return ["sacct", "-X", "-n", "-P", "-o", ",".join(SACCT_FIELDS), "-j", ",".join(job_ids)]


def squeue_argv(job_ids: Iterable[str]) -> list[str]:
    return ["squeue", "-h", "-t", "all", "-o", "%i|%T|%r|%N", "-j", ",".join(job_ids)]


def scancel_argv(job_ids: Iterable[str]) -> list[str]:
    return ["scancel", *job_ids]


def tagged_comment(comment: str | None, token: str) -> str:
    """A job's `--comment` carrying a submission's token (after the site's own comment, if any)."""
    return f"{comment},hpcs:{token}" if comment else f"hpcs:{token}"


def token_lookup_argv(job_name: str) -> list[str]:
    """One squeue for this user's jobs of that name, with their comments (the controller
    knows a job the moment it is created; sacct may lag behind)."""
    return ["squeue", "--me", "-h", "-t", "all", "--name", job_name, "-o", "%F|%k"]


def parse_token_lookup(text: str, token: str) -> str | None:
    """The job id (an array's own id) of the job whose comment carries `token`, from
    `token_lookup_argv`'s output ('123|hpcs:ab12...'; an array's elements share its id)."""
    tag = f"hpcs:{token}"
    found = {line.split("|", 1)[0].strip() for line in text.splitlines()
             if "|" in line and tag in re.split(r"[\s,]+", line.split("|", 1)[1])}
    # (one at most: a token goes with one sbatch; were there several, the first made is it)
    return min(found, key=lambda j: (len(j), j)) if found else None


SINFO_ARGV = ["sinfo", "-h", "-o", "%P|%c|%m|%G|%D|%l|%a"]
MAX_ARRAY_ARGV = ["scontrol", "show", "config"]


# -- parsers ---------------------------------------------------------------------------------------
def parse_sacct(text: str) -> dict[str, JobState]:
    """sacct -X -n -P -o JobID,State,ExitCode,Reason,NodeList -> states by job id.

    Array elements appear as '123_4'; a pending array as '123_[5-9]' (expanded here).
    """
    out: dict[str, JobState] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 3 or not parts[0]:
            continue
        job_id, state_text, exit_code = parts[0], parts[1], parts[2]
        reason = parts[3] if len(parts) > 3 else ""
        nodes = parts[4] if len(parts) > 4 else ""
        state = state_text.split()[0] if state_text else "UNKNOWN"  # "CANCELLED by 0"
        state = state.rstrip("+")
        reason = "" if reason in ("None", "(null)") else reason
        for jid in expand_array_ids(job_id):
            out[jid] = JobState(jid, state, status_of(state), reason, exit_code,
                                "" if nodes.startswith("None") else nodes)
    return out


def parse_squeue(text: str) -> dict[str, JobState]:
    out: dict[str, JobState] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2:
            continue
        job_id, state = parts[0], parts[1]
        reason = parts[2] if len(parts) > 2 and parts[2] not in ("None", "(null)") else ""
        for jid in expand_array_ids(job_id):
            out[jid] = JobState(jid, state, status_of(state), reason, "", parts[3] if len(parts) > 3 else "")
    return out


_ARRAY_RANGE = re.compile(r"^(\d+)_\[(.+?)(?:%\d+)?\]$")


def expand_array_ids(job_id: str) -> list[str]:
    """'12_[0-2,5]' -> ['12_0', '12_1', '12_2', '12_5']; other ids unchanged."""
    m = _ARRAY_RANGE.match(job_id)
    if not m:
        return [job_id]
    base, spec = m.groups()
    ids: list[str] = []
    for part in spec.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            ids.extend(f"{base}_{i}" for i in range(int(lo), int(hi) + 1))
        elif part:
            ids.append(f"{base}_{part}")
    return ids


def parse_sbatch(text: str) -> str:
    """The job id from `sbatch --parsable` ('123' or '123;cluster') or plain sbatch output."""
    text = text.strip()
    m = re.search(r"Submitted batch job (\d+)", text) or re.match(r"^(\d+)(?:;\S+)?$", text)
    if not m:
        raise ValueError(f"cannot find a job id in sbatch's output {text!r}")
    return m.group(1)


@dataclass(frozen=True)
class Partition:
    name: str
    cpus: int
    mem_mib: int
    gpus: int
    nodes: int
    default: bool


def parse_sinfo(text: str) -> dict[str, Partition]:
    """sinfo -h -o '%P|%c|%m|%G|%D|%l|%a' -> the largest node of each partition."""
    out: dict[str, Partition] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 5:
            continue
        raw, cpus, mem, gres, nodes = parts[:5]
        name = raw.rstrip("*")
        gpus = sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[^:,(]+)?:(\d+)", gres))
        cpu_n = int(re.sub(r"\D", "", cpus) or 0)
        mem_n = int(re.sub(r"\D", "", mem) or 0)
        node_n = int(re.sub(r"\D", "", nodes.split("/")[-1]) or 0)
        prev = out.get(name)
        if prev is not None:
            cpu_n, mem_n, gpus = max(cpu_n, prev.cpus), max(mem_n, prev.mem_mib), max(gpus, prev.gpus)
            node_n += prev.nodes
        out[name] = Partition(name, cpu_n, mem_n, gpus, node_n, raw.endswith("*") or bool(prev and prev.default))
    return out


def parse_max_array_size(text: str) -> int | None:
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", text, re.M)
    return int(m.group(1)) if m else None


def check_fits(target: Target, partitions: Mapping[str, Partition], site_name: str) -> None:
    """Refuse at once what no node of the partition can ever run (instead of pending forever)."""
    if not partitions:
        return
    if target.partition:
        part = partitions.get(target.partition)
        if part is None:
            raise ResourceError(f"site '{site_name}' has no partition {target.partition!r}; "
                                f"its partitions are: {', '.join(partitions)}")
    else:
        part = next((p for p in partitions.values() if p.default), None)
        if part is None:
            return
    per_node = math.ceil(target.mpi / target.nodes)
    cores = target.cpu * per_node
    problems = capacity_problems(target, has="its nodes have", cores=part.cpus, mem_mib=part.mem_mib,
                                 gpus=part.gpus, cores_asked=(cores, f"{cores} cores per node"))
    if target.nodes > part.nodes:
        problems.append(f"nodes={target.nodes} but it has {part.nodes}")
    if problems:
        raise ResourceError(f"partition {part.name!r} of site '{site_name}' can never run this task: "
                            + "; ".join(problems))
