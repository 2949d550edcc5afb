"""qdel and qrerun: scancel and scontrol requeue, with PBS Pro's messages and exit codes.

qdel of a finished job says "Job has finished" (PBSE_HISTJOBID 15139, exit 15139 % 256);
of an unknown id "Unknown Job Id" (PBSE_UNKJOBID); error numbers from OpenPBS
src/include/pbs_error.h. Only plain `qdel ID...` and `qrerun ID...` are emulated.
"""

from __future__ import annotations

from .common import EXIT_UNKNOWN_JOB, Refused, die, parse_id, pbs_id, read_json, slurm, slurm_id, spool

EXIT_HISTJOB = 15139 % 256


def _finished(seq: str, idx: str | None) -> bool:
    out = slurm(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", seq]).stdout
    target = slurm_id(seq, idx or None)
    states = [line.split("|")[1].split()[0] for line in out.splitlines()
              if line.split("|")[0] == target or (idx == "" and line.startswith(f"{seq}_"))]
    return bool(states) and all(s not in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED", "SUSPENDED")
                                for s in states)


def _run(command: str, argv: list[str], action: list[str]) -> int:
    if not argv or any(a.startswith("-") for a in argv):
        return die(command, f"only '{command} JOB_ID...' is emulated by this fake PBS Pro")
    code = 0
    for text in argv:
        try:
            seq, idx = parse_id(text)
        except Refused as exc:
            code = die(command, str(exc), EXIT_UNKNOWN_JOB)
            continue
        rec = read_json(spool("jobs") / f"{seq}.json")
        if rec is None or bool(rec["array"]) != (idx is not None):
            code = die(command, f"Unknown Job Id {text}", EXIT_UNKNOWN_JOB)
            continue
        if _finished(seq, idx):
            code = die(command, f"Job has finished {pbs_id(seq, idx)}", EXIT_HISTJOB)
            continue
        target = slurm_id(seq, idx or None)
        if command == "qdel":
            (spool("deleted") / target).touch()
        result = slurm([*action, target])
        if result.returncode != 0:
            code = die(command, f"{pbs_id(seq, idx)}: fake: Slurm said: {result.stderr.strip()}", 1)
    return code


def qdel(argv: list[str]) -> int:
    return _run("qdel", argv, ["scancel"])


def qrerun(argv: list[str]) -> int:
    return _run("qrerun", argv, ["scontrol", "requeue"])
