"""What every command of the fake shares: the server name, the spool, ids, Slurm calls."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

SERVER = os.environ.get("PBSFAKE_SERVER", "pbsserver")
SPOOL = Path(os.environ.get("PBSFAKE_SPOOL", "/tmp/hpcs-pbspro-fake"))
PBS_VERSION = "2022.1.0 (fake over Slurm)"

# qstat/qdel exit status for an unknown job id: PBSE_UNKJOBID (15001) as a byte = 153
# (OpenPBS src/include/pbs_error.h; the commands exit with the error number modulo 256)
EXIT_UNKNOWN_JOB = 15001 % 256

# The fake's "server resources": server-level consumable custom resources, as a PBS admin
# makes them (``qmgr -c "create resource aer type=long, flag=q"``, then lists them on the
# scheduler's ``resources:`` line in sched_config) -> the Slurm license that counts them.
# The test cluster's slurm.conf has ``Licenses=aer:1,fake:1``: two QPUs, one job at a time
# on each, against fake-PBS jobs and plain ``sbatch -L`` jobs alike. The QRMI hook's
# ``quantum_resources`` names the same QPUs. Add a QPU here and in slurm.conf, nowhere else.
SERVER_RESOURCES: dict[str, str] = {"aer": "aer", "fake": "fake"}
QPU_TYPE = "simulator"  # QRMI_JOB_QPU_TYPES entry of every QPU above: both are simulators


class Refused(Exception):
    """Something PBS Pro would reject, or the fake cannot emulate: said, never ignored."""


def die(command: str, message: str, code: int = 2) -> int:
    print(f"{command}: {message}", file=sys.stderr)
    return code


def spool(kind: str) -> Path:
    """A spool folder; world-writable with the sticky bit, as jobs run as any user."""
    path = SPOOL / kind
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        try:
            os.chmod(SPOOL, 0o1777)
            os.chmod(path, 0o1777)
        except PermissionError:
            pass  # made by another user: already 1777
    return path


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


_ID = re.compile(r"^(?P<seq>\d+)(?P<arr>\[(?P<idx>\d*)\])?(?:\.(?P<server>[\w.-]+))?(?:@[\w.-]+)?$")


def parse_id(text: str) -> tuple[str, str | None]:
    """'123.server' -> ('123', None); '123[]' -> ('123', ''); '123[4]' -> ('123', '4')."""
    m = _ID.match(text.strip())
    if not m:
        raise Refused(f"illegally formed job identifier: {text}")
    if m.group("server") and m.group("server") != SERVER:
        raise Refused(f"Unknown Job Id {text} (this fake serves only '{SERVER}')")
    return m.group("seq"), (m.group("idx") if m.group("arr") else None)


def pbs_id(seq: str, idx: str | None) -> str:
    return f"{seq}{'' if idx is None else f'[{idx}]'}.{SERVER}"


def slurm_id(seq: str, idx: str | None) -> str:
    return seq if not idx else f"{seq}_{idx}"


def slurm(argv: list[str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, **kw)


def hms(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def seconds(text: str) -> int:
    """PBS walltime: [[HH:]MM:]SS or plain seconds; Slurm's [D-]HH:MM:SS too."""
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [float(p) for p in text.split(":")]
    total = 0.0
    for p in parts:
        total = total * 60 + p
    return int(days * 86400 + total)
