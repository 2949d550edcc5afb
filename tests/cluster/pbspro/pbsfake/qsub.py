"""qsub: PBS Pro's options (command line over #PBS lines) -> one sbatch running mom.py.

What PBS Pro accepts is from its Reference Guide, "qsub" (RG-214 ff. in 2022.1):
resources as ``-l select=N:chunk[+N:chunk]`` plus job-wide ``walltime``/``place``;
arrays ``-J X-Y[:Z][%N]``; ``-W depend=type:id[:id][,type:id]``; ``-j oe|eo|n``;
``-v var[=val],...`` and ``-V``. Options the fake cannot honour are refused.

QPUs (common.SERVER_RESOURCES) come two ways, both counted by Slurm licenses:
* ``-l aer=1``: a server-level consumable custom resource (type=long, flag=q), job-wide;
* ``-l quantum_resources=aer`` or ``-l 'quantum_resources="aer,fake"'``: the resource of
  the PBS QRMI hook (qrmi-community/pbs-integration), a string_array naming the QPUs. The
  real runjob hook acquires each QPU through QRMI and exports QRMI_JOB_QPU_RESOURCES,
  QRMI_JOB_QPU_TYPES and QRMI_LIST_DELIMITER to the job. The hook cannot run here, so the
  fake EMULATES it: each name holds its Slurm license, and mom.py exports the variables.
A list value is quoted with double quotes so that its commas stay in it (as PBS parses
``-l``); in a ``#PBS`` line, quote it as on the command line: ``-l 'quantum_resources="aer,fake"'``.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import socket
import sys
import time
import uuid
from pathlib import Path

from .common import SERVER, SERVER_RESOURCES, Refused, die, parse_id, slurm, slurm_id, spool, write_json

TAKES_VALUE = set("AacCeGJjklMmNoPpqrRSuvW")
FLAGS = set("fhIVXz")
NOT_EMULATED = {"a": "deferred start (-a)", "c": "checkpointing (-c)", "C": "another directive prefix (-C)",
                "f": "foreground qsub (-f)", "G": "GUI jobs (-G)", "h": "held jobs (-h)",
                "I": "interactive jobs (-I)", "k": "keeping output on the host (-k)",
                "M": "mail (-M)", "m": "mail (-m)", "P": "projects (-P)", "p": "priorities (-p)",
                "R": "output removal (-R)", "u": "another user (-u)", "X": "X11 forwarding (-X)",
                "z": "silent qsub (-z)"}
CHUNK_KEYS = {"ncpus", "mem", "ngpus", "mpiprocs", "ompthreads"}
JOB_WIDE = {"walltime", "place", "select", "ncpus", "mem", "ngpus"}
PLACE = {"free", "pack", "scatter", "vscatter", "excl", "exclhost", "shared"}
SIZE = re.compile(r"^(\d+)(b|kb|mb|gb|tb|pb|w|kw|mw|gw|tw|pw)?$", re.I)
ARRAY = re.compile(r"^(\d+)-(\d+)(?::(\d+))?(?:%(\d+))?$")
DEPEND_TYPES = {"after", "afterok", "afternotok", "afterany"}
QUANTUM = "quantum_resources"  # the PBS QRMI hook's string_array resource
KNOWN = JOB_WIDE | set(SERVER_RESOURCES) | {QUANTUM}  # what -l accepts, for the refusal's list


def mib(value: str) -> int:
    """PBS size (RG "Size" format: b, kb, mb, gb, tb, pb; w = words of 8 bytes) -> MiB."""
    m = SIZE.match(value.strip())
    if not m:
        raise Refused(f"Illegal attribute or resource value for mem: {value}")
    unit = (m.group(2) or "b").lower()
    scale = 8 if unit.endswith("w") else 1
    power = "bkmgtp".index(unit[0]) if unit not in ("b", "w") else 0
    return max(1, math.ceil(int(m.group(1)) * scale * 1024 ** power / 2 ** 20))


def split_options(argv: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """getopt the PBS way: '-lselect=1' and '-l select=1' alike; the rest are operands."""
    opts, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            raise Refused("the executable form 'qsub [options] -- cmd' is not emulated: give a script")
        if not arg.startswith("-") or arg == "-":
            return opts, argv[i:]
        flag = arg[1:2]
        if flag in FLAGS:
            opts.append((flag, ""))
            if len(arg) > 2:
                argv = argv[:i + 1] + ["-" + arg[2:]] + argv[i + 1:]
        elif flag in TAKES_VALUE:
            if len(arg) > 2:
                opts.append((flag, arg[2:]))
            elif i + 1 < len(argv):
                i += 1
                opts.append((flag, argv[i]))
            else:
                raise Refused(f"option -{flag} needs a value")
        else:
            raise Refused(f"invalid option -- '{flag}'")
        i += 1
    return opts, []


def resource_items(value: str) -> list[str]:
    """Split an -l value at commas outside double quotes, dropping the quotes:
    'walltime=60,quantum_resources="aer,fake"' -> ['walltime=60', 'quantum_resources=aer,fake']."""
    items, word, quoted = [], "", False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            items.append(word)
            word = ""
        else:
            word += ch
    if quoted:
        raise Refused(f"illegal -l value: {value} (unbalanced double quote)")
    return [w for w in [*items, word] if w]


def server_count(key: str, value: str) -> int:
    """A server resource's amount: type=long, and a count of QPUs, so a whole number >= 0."""
    if not re.fullmatch(r"\d+", value.strip()):
        raise Refused(f"Illegal attribute or resource value for {key}: {value}")
    return int(value)


def quantum_names(value: str) -> list[str]:
    """The QRMI hook's QPU names, each one of this fake's server resources, each once."""
    names = [n.strip() for n in value.split(",")]
    bad = [n for n in names if n not in SERVER_RESOURCES]
    if bad or len(set(names)) != len(names):
        raise Refused(f"Illegal attribute or resource value for {QUANTUM}: {value} (the fake's QPUs: "
                      f"{', '.join(sorted(SERVER_RESOURCES))}, each named once)")
    return names


def licenses(job: Job) -> dict[str, int]:
    """Slurm license -> count for sbatch --licenses. A QPU asked both ways (-l aer=1 and
    quantum_resources=aer) is one QPU held once: the larger count, not the sum."""
    out: dict[str, int] = {}
    for key, count in job.server.items():
        if count:
            out[SERVER_RESOURCES[key]] = max(out.get(SERVER_RESOURCES[key], 0), count)
    for name in job.quantum:
        out[SERVER_RESOURCES[name]] = max(out.get(SERVER_RESOURCES[name], 0), 1)
    return out


def directives(script: str) -> list[str]:
    """'#PBS' lines up to the first executable line (RG "qsub": PBS stops reading there)."""
    words = []
    for line in script.splitlines()[1 if script.startswith("#!") else 0:]:
        text = line.strip()
        if not text or (text.startswith("#") and not text.startswith("#PBS")):
            continue
        if not text.startswith("#PBS"):
            break
        words += shlex.split(text[4:], comments=False)
    return words


class Job:
    """The job's attributes as qsub collects them; later options override earlier ones."""

    def __init__(self) -> None:
        self.name = self.queue = self.account = self.output = self.error = self.array = ""
        self.join, self.rerunable, self.shell, self.export_all = "n", "True", "", False
        self.resources: dict[str, str] = {}
        self.variables: dict[str, str] = {}
        self.depend = ""
        self.server: dict[str, int] = {}  # -l aer=1: common.SERVER_RESOURCES -> amount
        self.quantum: list[str] = []  # -l quantum_resources=...: the QRMI hook's QPUs

    def apply(self, flag: str, value: str) -> None:
        if flag in NOT_EMULATED:
            raise Refused(f"{NOT_EMULATED[flag]} is not emulated by this fake PBS Pro")
        if flag == "N":
            if not value or len(value) > 236 or re.search(r"[\s@:/]", value):
                raise Refused(f"illegal -N value: {value!r}")
            self.name = value
        elif flag == "q":
            self.queue = value.split("@")[0]
        elif flag == "A":
            self.account = value
        elif flag in "oe":
            setattr(self, "output" if flag == "o" else "error", value.split(":", 1)[-1])
        elif flag == "j":
            if value not in ("oe", "eo", "n"):
                raise Refused(f"illegal -j value: {value}")
            self.join = value
        elif flag == "r":
            if value not in ("y", "n"):
                raise Refused(f"illegal -r value: {value}")
            self.rerunable = "True" if value == "y" else "False"
        elif flag == "S":
            self.shell = value.split("@")[0]
        elif flag == "V":
            self.export_all = True
        elif flag == "v":
            for item in filter(None, value.split(",")):
                key, eq, val = item.partition("=")
                self.variables[key] = val if eq else os.environ.get(key, "")
        elif flag == "J":
            if not ARRAY.match(value):
                raise Refused(f"illegal -J value: {value} (X-Y[:Z][%N])")
            self.array = value
        elif flag == "W":
            key, _, val = value.partition("=")
            if key != "depend":
                raise Refused(f"-W {key} is not emulated by this fake PBS Pro (only -W depend=...)")
            self.depend = val
        elif flag == "l":
            for item in resource_items(value):
                key, _, val = item.partition("=")
                if key == "nodes":
                    raise Refused("nodes= is Torque's syntax; PBS Pro takes -l select=N:ncpus=...")
                if key not in KNOWN:
                    raise Refused(f"Unknown resource Resource_List.{key} (this fake knows "
                                  f"{', '.join(sorted(KNOWN))})")
                if key in SERVER_RESOURCES and "=" not in item:  # 'quantum_resources=aer,fake' unquoted
                    raise Refused(f"Illegal attribute or resource value for {key}: (no '='; a list value goes "
                                  f"in double quotes: -l '{QUANTUM}=\"aer,fake\"')")
                if key in SERVER_RESOURCES:
                    self.server[key] = server_count(key, val)
                elif key == QUANTUM:
                    self.quantum = quantum_names(val)
                else:
                    self.resources[key] = val


def parse_select(job: Job) -> dict[str, int]:
    """One kind of chunk, N of them: {'N', 'ncpus', 'mem', 'ngpus', 'mpiprocs', 'ompthreads'}."""
    res = job.resources
    spec = res.get("select") or "1"
    if "+" in spec:
        raise Refused("chunks of different kinds ('+' in select) are not emulated")
    parts = spec.split(":")
    chunk = {"N": int(parts[0]) if parts[0].isdigit() else 1}
    for part in parts[1:] if parts[0].isdigit() else parts:
        key, _, val = part.partition("=")
        if key in SERVER_RESOURCES or key == QUANTUM:
            raise Refused(f"{key} is a job-wide resource, not a chunk's: request it as -l {key}=...")
        if key not in CHUNK_KEYS:
            raise Refused(f"Unknown resource {key} in select (this fake knows {', '.join(sorted(CHUNK_KEYS))})")
        chunk[key] = mib(val) if key == "mem" else int(val)
    if "select" not in res:  # job-wide ncpus/mem/ngpus become the one chunk (RG "select")
        for key in ("ncpus", "ngpus"):
            if key in res:
                chunk[key] = int(res[key])
        if "mem" in res:
            chunk["mem"] = mib(res["mem"])
    elif any(k in res for k in ("ncpus", "mem", "ngpus")):
        raise Refused("job-wide ncpus/mem/ngpus together with select: PBS Pro rejects the mix")
    chunk.setdefault("ncpus", 1)
    chunk.setdefault("mpiprocs", 1)
    chunk.setdefault("ompthreads", chunk["ncpus"])
    return chunk


def sbatch_argv(job: Job, chunk: dict[str, int], wall: int | None) -> list[str]:
    argv = ["sbatch", "--parsable", f"--job-name={job.name}", f"--nodes={chunk['N']}",
            f"--ntasks-per-node={chunk['mpiprocs']}",
            f"--cpus-per-task={max(1, math.ceil(chunk['ncpus'] / chunk['mpiprocs']))}",
            "--kill-on-invalid-dep=yes", "--requeue" if job.rerunable == "True" else "--no-requeue",
            f"--output={spool('slurm')}/%A_%a.out", "--chdir=/"]
    place = set(job.resources.get("place", "free").split(":"))
    if place - PLACE:
        raise Refused(f"illegal place: {job.resources['place']}")
    if chunk["N"] > 1 and "pack" in place:
        raise Refused("place=pack of several chunks (one host) is not emulated: chunks go one per node")
    if place & {"excl", "exclhost"}:
        argv.append("--exclusive")
    if job.queue:
        argv.append(f"--partition={job.queue}")
    if "mem" in chunk:
        argv.append(f"--mem={chunk['mem']}M")
    if chunk.get("ngpus"):
        argv.append(f"--gpus-per-node={chunk['ngpus']}")
    if wall:  # the MoM (mom.py) kills at the second; Slurm's minute-granular limit is a backstop
        argv.append(f"--time={math.ceil(wall / 60) + 1}")
    if job.array:
        m = ARRAY.match(job.array)
        assert m
        if int(m.group(2)) < int(m.group(1)):
            raise Refused(f"illegal -J value: {job.array}")
        argv.append(f"--array={m.group(1)}-{m.group(2)}" + (f":{m.group(3)}" if m.group(3) else "")
                    + (f"%{m.group(4)}" if m.group(4) else ""))
    if job.depend:
        argv.append(f"--dependency={slurm_depend(job.depend)}")
    held = licenses(job)
    if held:  # Slurm counts them cluster-wide: one job per QPU at a time, sbatch -L jobs too
        argv.append("--licenses=" + ",".join(f"{name}:{count}" for name, count in held.items()))
    return argv


def slurm_depend(spec: str) -> str:
    """'afterok:12.s:13[].s,afterany:14' -> 'afterok:12:13,afterany:14' (RG "qsub -W depend")."""
    out = []
    for group in spec.split(","):
        kind, *ids = group.split(":")
        if kind not in DEPEND_TYPES or not ids:
            raise Refused(f"dependency type {kind!r} is not emulated (only {', '.join(sorted(DEPEND_TYPES))})")
        out.append(":".join([kind, *(slurm_id(*parse_id(j)) for j in ids)]))
    return ",".join(out)


def main(argv: list[str]) -> int:
    try:
        return _main(argv)
    except Refused as exc:
        return die("qsub", str(exc))


def _main(argv: list[str]) -> int:
    opts, operands = split_options(argv)
    if len(operands) > 1:
        raise Refused(f"too many operands: {' '.join(operands)}")
    script_name = operands[0] if operands else "STDIN"
    try:
        script = sys.stdin.read() if not operands else Path(operands[0]).read_text()
    except OSError as exc:
        raise Refused(f"script file:: {exc.strerror}") from None
    job = Job()
    dopts, rest = split_options(directives(script))
    if rest:
        raise Refused(f"directive with an operand: {' '.join(rest)}")
    for flag, value in [*dopts, *opts]:  # the command line wins (RG "qsub": options override directives)
        job.apply(flag, value)
    job.name = job.name or Path(script_name).name[:236]
    chunk = parse_select(job)
    wall = None
    if "walltime" in job.resources:
        from .common import seconds

        wall = seconds(job.resources["walltime"])
    cwd = os.getcwd()
    record = {
        "uuid": uuid.uuid4().hex, "name": job.name, "owner": f"{os.environ.get('USER') or _user()}@{socket.gethostname()}",
        "queue": job.queue, "account": job.account, "chunk": chunk, "walltime": wall,
        "place": job.resources.get("place", "free" if chunk["N"] == 1 else "free"),
        "output": _path(job.output, cwd), "error": _path(job.error, cwd), "join": job.join,
        "rerunable": job.rerunable, "shell": job.shell, "array": job.array, "depend": job.depend,
        "server_resources": job.server, "quantum_resources": job.quantum,
        "env": _environment(job, cwd), "submit_args": " ".join(shlex.quote(a) for a in argv),
        "ctime": time.time(), "script": script,
    }
    path = spool("jobs") / f"{record['uuid']}.json"
    write_json(path, record)
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    mom = Path(__file__).resolve().with_name("mom.py")
    wrapper = f"#!/bin/sh\nexec {shlex.quote(python)} {shlex.quote(str(mom))} {shlex.quote(str(path))}\n"
    result = slurm(sbatch_argv(job, chunk, wall), input=wrapper)
    if result.returncode != 0:
        path.unlink(missing_ok=True)
        said = result.stderr.strip().replace("sbatch: error: ", "")
        raise Refused(f"Job rejected by the server (fake: Slurm said: {said})")
    seq = result.stdout.strip().split(";")[0]
    os.symlink(path.name, spool("jobs") / f"{seq}.json")
    print(f"{seq}{'[]' if job.array else ''}.{SERVER}")
    return 0


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _path(value: str, cwd: str) -> str:
    return "" if not value else os.path.join(cwd, value)


def _environment(job: Job, cwd: str) -> dict[str, str]:
    """Variable_List: PBS_O_* from qsub's environment, then -v, or all of it with -V."""
    env = dict(os.environ) if job.export_all else {}
    home = os.environ.get("HOME", "/")
    env.update({
        "PBS_O_HOME": home, "PBS_O_LANG": os.environ.get("LANG", "C"), "PBS_O_LOGNAME": _user(),
        "PBS_O_PATH": os.environ.get("PATH", ""), "PBS_O_MAIL": os.environ.get("MAIL", f"/var/mail/{_user()}"),
        "PBS_O_SHELL": os.environ.get("SHELL", "/bin/sh"), "PBS_O_WORKDIR": cwd, "PBS_O_SYSTEM": os.uname().sysname,
        "PBS_O_HOST": socket.gethostname(), "PBS_O_QUEUE": job.queue or "workq",
    })
    env.update(job.variables)
    return env
