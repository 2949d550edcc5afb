"""PBS Pro and Torque as data: targets to qsub options, the state maps, argv, parsers.

Two dialects, chosen by the site's ``pbs_flavor``:

* ``pbspro`` (PBS Pro / OpenPBS, e.g. Polaris): ``-l select=N:ncpus=..:mem=..:ngpus=..:
  mpiprocs=..``, ``-l walltime``, ``-J`` arrays; status from ``qstat -f -F json -x``
  (finished jobs included).
* ``torque``: ``-l nodes=N:ppn=M[:gpus=G]``, ``-l mem``, ``-l walltime``, ``-t``
  arrays; status from text ``qstat -f``.

Resources go both into ``#PBS`` lines and onto the qsub command line (real PBS reads
both; Slurm's PBS wrappers on the test cluster read only the command line).
"""

from __future__ import annotations

import json
import math
import re
import shlex
from typing import Iterable, Mapping

from hpc_serverless.adapters.schedulers import common
from hpc_serverless.adapters.schedulers.common import JobState
from hpc_serverless.adapters.schedulers.qpu_requests import pbs_qpu_resources
from hpc_serverless.core.errors import ResourceError, TargetError
from hpc_serverless.core.qpus import QpuSection, qpu_ask
from hpc_serverless.core.target import PBS_REQUEUE_UNSUPPORTED, Target, format_hms

# job_state letters -> our status (final letters resolved by exit status below)
STATE_MAP: Mapping[str, str] = {
    "Q": "PENDING", "H": "PENDING", "W": "PENDING", "T": "PENDING", "M": "PENDING",
    "S": "PENDING", "U": "PENDING", "B": "RUNNING", "R": "RUNNING", "E": "RUNNING",
}
FINAL_LETTERS = frozenset({"F", "C", "X"})
STATE_WORDS: Mapping[str, str] = {
    "Q": "QUEUED", "H": "HELD", "W": "WAITING", "T": "TRANSIT", "M": "MOVED", "S": "SUSPENDED",
    "U": "SUSPENDED", "B": "RUNNING", "R": "RUNNING", "E": "EXITING",
}

# Torque/PBS negative exit codes: the job could not be started (pbs_mom's words)
EXEC_FAILURES: Mapping[int, str] = {
    -1: "job exec failed, before files, no retry", -2: "job exec failed, after files, no retry",
    -3: "job execution failed, retried", -4: "job aborted on MOM initialization",
    -5: "job aborted on MOM init, checkpoint, no migrate", -6: "job aborted on MOM init, checkpoint, ok migrate",
    -7: "job restart failed", -8: "exec() of the job script failed", -9: "could not create/open stdout/stderr",
    -10: "job exceeded a resource limit", -11: "job exceeded its walltime or another limit",
}

# PBS Pro / OpenPBS: the MoM's negative Exit_status values (JOB_EXEC_* in OpenPBS
# src/include/job.h; PBS Professional Administrator's Guide, "Job Exit Status Codes"). Since
# PBS Pro 19 a job killed over a resource limit ends with one of -24..-29, not 256+signal.
PBSPRO_EXEC_FAILURES: Mapping[int, str] = {
    -1: "job exec failed, before files, no retry", -2: "job exec failed, after files, no retry",
    -3: "job execution failed, do retry", -4: "job aborted on MoM initialization",
    -5: "job aborted on MoM init, checkpoint, no migrate", -6: "job aborted on MoM init, checkpoint, ok migrate",
    -7: "job restart failed", -21: "security breach in PBS directory",
    -22: "a hook failed or timed out", -23: "no kerberos credentials supplied",
    -24: "job killed: it exceeded its ncpus (burst)", -25: "job killed: it exceeded its ncpus (sum)",
    -26: "job killed: it exceeded its vmem", -27: "job killed: it exceeded its mem",
    -28: "job killed: it exceeded its cput", -29: "job killed: it exceeded its walltime",
    -30: "job exec failed: join job error",
}
PBSPRO_LIMIT_KILLS: Mapping[int, str] = {-29: "TIMEOUT", -28: "TIMEOUT", -27: "OUT_OF_MEMORY",
                                         -26: "OUT_OF_MEMORY"}

TRANSIENT = ("cannot connect to server", "Connection refused", "Pbs Server is currently too busy",
             "temporarily unavailable", "Communication failure", "timed out",
             "Unable to contact slurm controller")  # the last: Slurm's PBS wrappers


def is_transient(stderr: str) -> bool:
    return any(t.lower() in stderr.lower() for t in TRANSIENT)


def final_state(exit_status: int | None, comment: str = "", flavor: str = "torque") -> tuple[str, str, str]:
    """(state word, status, reason) of a finished job from its exit status and comment."""
    c = comment.lower()
    if flavor == "pbspro" and exit_status is not None and exit_status in PBSPRO_LIMIT_KILLS:
        why = PBSPRO_EXEC_FAILURES[exit_status]
        return PBSPRO_LIMIT_KILLS[exit_status], "FAILED", f"{why} (PBS Exit_status {exit_status})"
    if "walltime" in c and ("exceed" in c or "killed" in c):
        return "TIMEOUT", "FAILED", comment
    if ("mem" in c and "exceed" in c) or "out of memory" in c:
        return "OUT_OF_MEMORY", "FAILED", comment
    if "deleted" in c or "qdel" in c:
        return "CANCELLED", "STOPPED", comment
    if exit_status is None or exit_status == 0:
        return "COMPLETED", "SUCCEEDED", comment
    if exit_status < 0:
        table = PBSPRO_EXEC_FAILURES if flavor == "pbspro" else EXEC_FAILURES
        return "FAILED", "FAILED", table.get(exit_status, f"PBS exec failure {exit_status}")
    if exit_status > 256:  # PBS: 256 + the signal that killed the job's top process
        sig = exit_status - 256
        return "KILLED", "FAILED", comment or f"killed by signal {sig}" + (
            " (the walltime limit, or qdel)" if sig in (9, 15) else "")
    return "FAILED", "FAILED", comment or f"exit code {exit_status}"


# -- targets ----------------------------------------------------------------------------------------
REQUEUE_UNSUPPORTED = PBS_REQUEUE_UNSUPPORTED  # (defined in core: site files refuse it too)

def resource_list(target: Target, flavor: str) -> list[str]:
    """The `-l` resources of a target (site defaults merged), in the site's dialect."""
    if target.qos or target.constraint:
        raise TargetError("PBS has no 'qos' or 'constraint'; put the site's equivalent in "
                          "'directives' (e.g. '-l select=...:model=X' or '-l place=scatter')")
    if target.requeue:
        raise TargetError(REQUEUE_UNSUPPORTED)
    ranks_per_node = max(1, math.ceil(target.mpi / target.nodes))
    res: list[str] = []
    if flavor == "torque":
        chunk = f"nodes={target.nodes}:ppn={target.cpu * ranks_per_node}"
        if target.gpu:
            chunk += f":gpus={target.gpu}"
        res.append(chunk)
        if target.mem_mib:
            res.append(f"mem={target.mem_mib * target.nodes}mb")
    else:
        chunk = f"select={target.nodes}:ncpus={target.cpu * ranks_per_node}:mpiprocs={ranks_per_node}"
        if target.mem_mib:
            chunk += f":mem={target.mem_mib}mb"
        if target.gpu:
            chunk += f":ngpus={target.gpu}"
        res.append(chunk)
    if target.time_s:
        res.append(f"walltime={format_hms(target.time_s)}")
    return res


def parse_directive(line: str) -> list[str]:
    """'-l place=scatter' / '#PBS -l place=scatter' / '-W x=y' -> argv pieces."""
    text = line.strip()
    if text.startswith("#PBS"):
        text = text[4:].strip()
    parts = shlex.split(text)
    if not parts or not parts[0].startswith("-"):
        raise ResourceError(f"PBS directive {line!r} must look like '-l name=value' or '-W ...'")
    return parts


def split_directives(directives: Iterable[str]) -> tuple[list[str], list[list[str]]]:
    """The `-l` resources of site and target directives apart from the other directives
    (each as its argv pieces): resources join the target's into one `-l`."""
    resources: list[str] = []
    others: list[list[str]] = []
    for line in directives:
        parts = parse_directive(line)
        if parts[0] == "-l" and len(parts) == 2:
            resources.append(parts[1])
        else:
            others.append(parts)
    return resources, others


def qsub_options(target: Target, flavor: str, *, directives: Iterable[str] = (), job_name: str = "",
                 output: str = "", array: int | None = None, qpus: QpuSection | None = None) -> list[str]:
    """qsub argv options (without the script), on a site with `qpus`. Every `-l` resource is
    joined into one `-l a,b,c`, which PBS Pro, Torque and Slurm's qsub wrapper all read;
    a QPU's resource has an `-l` of its own (the QRMI hook's value may hold commas)."""
    opts: list[str] = []
    if job_name:
        opts += ["-N", job_name]
    if output:
        opts += ["-o", output, "-j", "oe"]
    if target.partition:
        opts += ["-q", target.partition]
    if target.account:
        opts += ["-A", target.account]
    more, others = split_directives(directives)
    resources = resource_list(target, flavor) + more
    extra = [piece for parts in others for piece in parts]
    opts += ["-l", ",".join(resources)]
    ask = qpu_ask(target.qpu, qpus, "this site")
    if ask is not None:
        if flavor != "pbspro":
            raise ResourceError("target 'qpu' needs PBS Pro's custom resources (or its QRMI hook); "
                                f"this site's pbs_flavor is {flavor!r}")
        for resource in pbs_qpu_resources(ask):
            opts += ["-l", resource]
    # (target env is exported inside the script, quoted; `-v` would break on commas)
    if array is not None:
        opts += ["-J" if flavor == "pbspro" else "-t", f"0-{array - 1}"]
    return opts + extra


def directive_lines(options: list[str]) -> list[str]:
    """The same options as '#PBS' lines, values quoted."""
    lines, i = [], 0
    while i < len(options):
        flag = options[i]
        if i + 1 < len(options) and not options[i + 1].startswith("-"):
            lines.append(f"#PBS {flag} {shlex.quote(options[i + 1])}")
            i += 2
        else:
            lines.append(f"#PBS {flag}")
            i += 1
    return lines


# -- commands and parsers ------------------------------------------------------------------------------
def qstat_argv(job_ids: Iterable[str], flavor: str) -> list[str]:
    if flavor == "pbspro":
        return ["qstat", "-f", "-F", "json", "-x", *job_ids]
    return ["qstat", "-f", *job_ids]


def qdel_argv(job_ids: Iterable[str]) -> list[str]:
    return ["qdel", *job_ids]


def token_job_name(name: str, token: str) -> str:
    """A job name carrying a submission's token, within the 15 characters older servers
    take: 'h', 6 of the name, '-', 8 of the token ('hsquare-1a2b3c4d')."""
    return f"{common.job_name(name, prefix='h', width=6)}-{token[:8]}"


def token_lookup_argv(flavor: str) -> list[str]:
    """One qstat of the server's jobs with their names (qselect is missing from some
    installations, Slurm's PBS wrappers among them)."""
    return ["qstat", "-f", "-F", "json"] if flavor == "pbspro" else ["qstat", "-f"]


def parse_token_lookup(text: str, flavor: str, job_name: str) -> str | None:
    """The short id (an array's own id, without '[]') of the job named `job_name`, or None."""
    if flavor == "pbspro":
        try:
            jobs = json.loads(text or "{}").get("Jobs") or {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"qstat printed something that is not JSON: {exc}") from None
        names = {k: str(v.get("Job_Name", "")) for k, v in jobs.items()}
    else:
        names = {}
        for block in re.split(r"^Job Id:\s*", text, flags=re.M)[1:]:
            m = re.search(r"^\s+Job_Name = (.*)$", block, re.M)
            names[block.splitlines()[0].strip()] = m.group(1).strip() if m else ""
    found = sorted({short_id(k).replace("[]", "") for k, v in names.items() if v == job_name and
                    not re.search(r"\[\d+\]", k)}, key=lambda j: (len(j), j))
    return found[0] if found else None


def parse_qsub(text: str) -> str:
    """'1234.server' (PBS), '1234[].server' (array), '829' (Slurm's wrapper)."""
    text = text.strip().splitlines()[-1].strip() if text.strip() else ""
    if not re.match(r"^\d+(\[\])?(\.[\w.-]+)?$", text):
        raise ValueError(f"cannot find a job id in qsub's output {text!r}")
    return text


def short_id(job_id: str) -> str:
    """'1234[5].pbs01.example' -> '1234[5]': servers print ids with and without the suffix."""
    return job_id.split(".", 1)[0]


def _state(job_id: str, letter: str, exit_status: int | None, comment: str, nodes: str,
           flavor: str = "torque") -> JobState:
    if letter in FINAL_LETTERS:
        word, status, reason = final_state(exit_status, comment, flavor)
    else:
        word, status, reason = STATE_WORDS.get(letter, letter), STATE_MAP.get(letter, "RUNNING"), comment
    return JobState(job_id, word, status, reason, "" if exit_status is None else str(exit_status), nodes)


def parse_qstat_json(text: str) -> dict[str, JobState]:
    """PBS Pro `qstat -f -F json -x`: states keyed by short id (no server suffix)."""
    try:
        data = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"qstat printed something that is not JSON: {exc}") from None
    out: dict[str, JobState] = {}
    for job_id, job in (data.get("Jobs") or {}).items():
        code = job.get("Exit_status")
        sid = short_id(job_id)
        out[sid] = _state(sid, str(job.get("job_state", "?")), int(code) if code is not None else None,
                          str(job.get("comment", "")), str(job.get("exec_host", "")), "pbspro")
    return out


def parse_qstat_text(text: str) -> dict[str, JobState]:
    """Torque `qstat -f` (and Slurm's wrapper): 'Job Id: X' blocks of 'key = value'."""
    out: dict[str, JobState] = {}
    blocks = re.split(r"^Job Id:\s*", text, flags=re.M)
    for block in blocks[1:]:
        lines = block.splitlines()
        sid = short_id(lines[0].strip())
        fields: dict[str, str] = {}
        key = None
        for line in lines[1:]:
            m = re.match(r"^\s+([\w.]+) = (.*)$", line)
            if m:
                key = m.group(1)
                fields[key] = m.group(2).strip()
            elif key and line.startswith("\t") or (key and line.startswith("  ")):
                fields[key] += line.strip()  # continuation line
        code = fields.get("exit_status") or fields.get("Exit_status")
        out[sid] = _state(sid, fields.get("job_state", "?"),
                          int(code) if code and re.match(r"^-?\d+$", code) else None,
                          fields.get("comment", ""), fields.get("exec_host", ""))
    return out


def check_fits(target: Target, flavor: str) -> None:
    """PBS has no cheap partition listing like sinfo; check what the dialect can express."""
    resource_list(target, flavor)
