"""qstat: PBS Pro's job status, rebuilt from sacct, squeue and the MoM's records.

Formats: the default table, ``-f`` (text) and ``-f -F json`` (Reference Guide "qstat";
the JSON layout of OpenPBS design PP-483: timestamp, pbs_version, pbs_server, Jobs),
with ``-x`` (finished jobs too) and ``-t`` (array subjobs). job_state letters (RG "Job
States"): Q queued, H held (a dependency not met yet), R running, E exiting, B an array
that has begun, F finished, X a finished subjob.
"""

from __future__ import annotations

import json
import time

from .common import (
    EXIT_UNKNOWN_JOB,
    PBS_VERSION,
    SERVER,
    Refused,
    die,
    hms,
    parse_id,
    pbs_id,
    read_json,
    slurm,
    slurm_id,
    spool,
)

FINAL = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
         "BOOT_FAIL", "DEADLINE"}
LETTER = {"PENDING": "Q", "REQUEUED": "Q", "REQUEUE_HOLD": "H", "REQUEUE_FED": "Q", "RESIZING": "R",
          "RUNNING": "R", "COMPLETING": "E", "SUSPENDED": "S", "STOPPED": "S", "SIGNALING": "E",
          "STAGE_OUT": "E"}
# when the MoM left no record (the job never ran, or Slurm itself ended it): RG/UG exit codes
NO_RECORD_EXIT = {"TIMEOUT": -29, "OUT_OF_MEMORY": -27, "NODE_FAIL": -3, "BOOT_FAIL": -3, "PREEMPTED": -3}


def sacct(seqs: list[str]) -> dict[str, dict[str, str]]:
    """Rows keyed by Slurm id ('12', '12_3'); a pending array range is expanded later."""
    if not seqs:
        return {}
    fields = ["JobID", "State", "ExitCode", "Reason", "Start", "End", "Elapsed", "NodeList"]
    out = slurm(["sacct", "-X", "-n", "-P", "-D", "-o", ",".join(fields), "-j", ",".join(seqs)])
    rows: dict[str, dict[str, str]] = {}
    for line in out.stdout.splitlines():
        row = dict(zip(fields, line.split("|")))
        row["State"] = row.get("State", "").split()[0]
        rows[row["JobID"]] = row  # -D: the last run of a requeued job wins
    return rows


def _expand(rows: dict[str, dict[str, str]], seq: str) -> dict[str, dict[str, str]]:
    """The elements of array `seq`: '12_[3-5,7%2]' rows become 12_3, 12_4, 12_5, 12_7."""
    out = {}
    for key, row in rows.items():
        if not key.startswith(f"{seq}_"):
            continue
        rest = key[len(seq) + 1:]
        if rest.startswith("["):
            for part in rest.strip("[]").split("%")[0].split(","):
                a, _, b = part.partition("-")
                for i in range(int(a), int(b or a) + 1):
                    out[str(i)] = row
        else:
            out[rest] = row
    return out


def _ctime(t: float | None) -> str:
    return time.ctime(t) if t else ""


def subjob(rec: dict, seq: str, idx: str | None, row: dict[str, str] | None, parent: bool = False) -> dict:
    """The attributes of one job or subjob, in PBS Pro's names."""
    chunk = rec["chunk"]
    key = slurm_id(seq, idx)
    mom = read_json(spool("exit") / f"{key}.json") or {}
    state = (row or {}).get("State", "PENDING")
    reason = (row or {}).get("Reason", "")
    deleted = (spool("deleted") / key).exists() or (idx is not None and (spool("deleted") / seq).exists())
    select = f"{chunk['N']}:ncpus={chunk['ncpus']}" + (f":mem={chunk['mem']}mb" if "mem" in chunk else "") \
        + (f":ngpus={chunk['ngpus']}" if chunk.get("ngpus") else "") + f":mpiprocs={chunk['mpiprocs']}"
    resources = {"ncpus": chunk["ncpus"] * chunk["N"], "nodect": chunk["N"], "place": rec["place"],
                 "select": select, "mpiprocs": chunk["mpiprocs"] * chunk["N"]}
    if "mem" in chunk:
        resources["mem"] = f"{chunk['mem'] * chunk['N']}mb"
    if chunk.get("ngpus"):
        resources["ngpus"] = chunk["ngpus"] * chunk["N"]
    if rec["walltime"]:
        resources["walltime"] = hms(rec["walltime"])
    # QPUs (qsub.py): a type=long server resource is a number, the hook's string_array a list
    resources.update(rec.get("server_resources") or {})
    if rec.get("quantum_resources"):
        resources["quantum_resources"] = ",".join(rec["quantum_resources"])
    workdir = rec["env"]["PBS_O_WORKDIR"]
    suffix = seq + ("" if idx is None else f".{idx}")
    out_path = rec["output"] or f"{workdir}/{rec['name']}.o{suffix}"
    err_path = rec["error"] or f"{workdir}/{rec['name']}.e{suffix}"
    job = {
        "Job_Name": rec["name"], "Job_Owner": rec["owner"], "job_state": "Q", "queue": rec["queue"] or "workq",
        "server": SERVER, "Checkpoint": "u", "ctime": _ctime(rec["ctime"]),
        "Error_Path": f"{SERVER}:{err_path}", "Output_Path": f"{SERVER}:{out_path}",
        "Hold_Types": "n", "Join_Path": rec["join"], "Keep_Files": "n", "Mail_Points": "a",
        "mtime": _ctime(mom.get("end") or mom.get("start") or rec["ctime"]), "Priority": 0,
        "qtime": _ctime(rec["ctime"]), "Rerunable": rec["rerunable"], "Resource_List": resources,
        "substate": 10, "Variable_List": rec["env"], "euser": rec["owner"].split("@")[0],
        "etime": _ctime(rec["ctime"]), "Submit_arguments": rec["submit_args"],
        "project": "_pbs_project_default",
    }
    if rec["account"]:
        job["Account_Name"] = rec["account"]
    if rec["depend"]:
        job["depend"] = rec["depend"]
    if idx is not None:
        job["array_id"] = pbs_id(seq, "")
        job["array_index"] = int(idx)
    if parent:
        return job
    if mom.get("start"):
        used = int((mom.get("end") or time.time()) - mom["start"])
        job.update(exec_host=mom["exec_host"], exec_vnode=mom["exec_vnode"], stime=_ctime(mom["start"]),
                   run_count=mom.get("run_count", 1), jobdir=rec["env"].get("PBS_O_HOME", ""),
                   resources_used={"cpupercent": 0, "cput": "00:00:00", "mem": "0kb",
                                   "ncpus": resources["ncpus"], "vmem": "0kb", "walltime": hms(used)})
    if state in FINAL or ("Exit_status" in mom and (row is None or state not in ("PENDING", "REQUEUED"))):
        job["job_state"] = "X" if idx is not None else "F"
        job["substate"] = 92
        if "Exit_status" in mom:
            job["Exit_status"] = mom["Exit_status"]
        elif state in NO_RECORD_EXIT:
            job["Exit_status"] = NO_RECORD_EXIT[state]
        elif state == "CANCELLED" and "Depend" in reason and not deleted:
            job["comment"] = f"Job deleted as result of dependency on job {rec['depend'].split(':', 1)[-1]}"
        elif state in ("FAILED", "COMPLETED") and mom.get("start") is None:
            job["Exit_status"] = -1  # JOB_EXEC_FAIL1: the MoM could not start it
        if mom.get("start") and "comment" not in job:
            when = time.strftime("%a %b %d at %H:%M", time.localtime(mom["start"]))
            job["comment"] = f"Job run at {when} on {mom['exec_vnode']} and finished"
        return job
    job["job_state"] = LETTER.get(state, "Q")
    if job["job_state"] == "Q" and reason.startswith("Dependency"):
        job["job_state"], job["Hold_Types"], job["substate"] = "H", "s", 22
    elif job["job_state"] == "R":
        job["substate"] = 42
        when = time.strftime("%a %b %d at %H:%M", time.localtime(mom.get("start") or time.time()))
        job["comment"] = f"Job run at {when} on {mom.get('exec_vnode', '')}"
    elif job["job_state"] == "Q" and reason in ("Resources", "Priority"):
        job["comment"] = "Not Running: Insufficient amount of resource: ncpus"
    return job


def array_parent(rec: dict, seq: str, elements: dict[str, dict]) -> dict:
    """The '12[]' job: B once a subjob began, F when all are done (RG "Job States");
    Exit_status 0 all subjobs 0, 1 some non-zero, 2 some deleted or never run
    (User's Guide, "Job Array Exit Status")."""
    job = subjob(rec, seq, None, None, parent=True)
    letters = [e["job_state"] for e in elements.values()]
    counts = {"Queued": sum(x in "QH" for x in letters), "Running": letters.count("R"),
              "Exiting": letters.count("E"), "Expired": letters.count("X")}
    job["array"] = True
    job["array_indices_submitted"] = rec["array"].split("%")[0]
    remaining = [i for i, e in elements.items() if e["job_state"] in "QH"]
    job["array_indices_remaining"] = ",".join(remaining) or "-"
    job["array_state_count"] = " ".join(f"{k}:{v}" for k, v in counts.items()) + " "
    if counts["Expired"] == len(letters):
        job["job_state"], job["substate"] = "F", 92
        codes = [e.get("Exit_status") for e in elements.values()]
        job["Exit_status"] = 2 if any(c is None or c < 0 or c > 255 for c in codes) else int(any(codes))
    elif counts["Queued"] < len(letters):
        job["job_state"], job["substate"] = "B", 42
    return job


def indices(spec: str) -> list[str]:
    a, b, step = [int(x) if x else None for x in
                  (spec.split("%")[0].replace(":", "-").split("-") + [None])[:3]]
    return [str(i) for i in range(a, b + 1, step or 1)]


def collect(ids: list[str], history: bool, subjobs: bool) -> tuple[dict[str, dict], list[str]]:
    wanted: list[tuple[str, str | None]] = []
    unknown: list[str] = []
    for text in ids:
        try:
            wanted.append(parse_id(text))
        except Refused:
            unknown.append(text)
    if not ids:  # every job of this server
        wanted = [(p.stem, "" if (read_json(p) or {}).get("array") else None)
                  for p in spool("jobs").glob("*.json") if p.stem.isdigit()]
    rows = sacct(sorted({seq for seq, _ in wanted}))
    jobs: dict[str, dict] = {}
    for seq, idx in wanted:
        rec = read_json(spool("jobs") / f"{seq}.json")
        if rec is None or bool(rec["array"]) != (idx is not None):  # '12' for an array, '12[3]' for a job
            unknown.append(pbs_id(seq, idx))
            continue
        if rec["array"]:
            elements = _expand(rows, seq)
            subs = {i: subjob(rec, seq, i, elements.get(i)) for i in indices(rec["array"])}
            if idx:
                if idx not in subs:
                    unknown.append(pbs_id(seq, idx))
                    continue
                chosen = {pbs_id(seq, idx): subs[idx]}
            else:
                chosen = {pbs_id(seq, ""): array_parent(rec, seq, subs)}
                if subjobs:
                    chosen.update({pbs_id(seq, i): s for i, s in subs.items()})
        else:
            chosen = {pbs_id(seq, None): subjob(rec, seq, None, rows.get(seq))}
        for key, job in chosen.items():
            finished = job["job_state"] in "FX"
            if finished and not history and ids and job["job_state"] == "F":
                unknown.append(f"{key} Job has finished, use -x or -H to obtain historical job information")
            elif history or not finished:
                jobs[key] = job
    return jobs, unknown


def main(argv: list[str]) -> int:
    full = history = subjobs = False
    fmt = ""
    ids: list[str] = []
    args = list(argv)
    while args:
        a = args.pop(0)
        if a.startswith("-") and len(a) > 1:
            for i, flag in enumerate(a[1:]):
                if flag == "f":
                    full = True
                elif flag == "x":
                    history = True
                elif flag == "t":
                    subjobs = True
                elif flag == "F":
                    fmt = a[i + 2:] or (args.pop(0) if args else "")
                    break
                else:
                    return die("qstat", f"option -{flag} is not emulated by this fake PBS Pro (-f, -F json, -x, -t)")
        else:
            ids.append(a)
    if fmt and (fmt != "json" or not full):
        return die("qstat", "only -f -F json is emulated among the -F formats")
    jobs, unknown = collect(ids, history, subjobs)
    if fmt == "json":
        print(json.dumps({"timestamp": int(time.time()), "pbs_version": PBS_VERSION, "pbs_server": SERVER,
                          "Jobs": jobs}, indent=4))
    elif full:
        print(_text(jobs))
    elif jobs:
        print(_table(jobs))
    for text in unknown:
        msg = text if "Job has finished" in text else f"Unknown Job Id {text}"
        die("qstat", msg)
    return EXIT_UNKNOWN_JOB if unknown else 0


def _text(jobs: dict[str, dict]) -> str:
    lines = []
    for key, job in jobs.items():
        lines.append(f"Job Id: {key}")
        for name, value in job.items():
            if isinstance(value, dict):
                if name == "Variable_List":
                    lines.append(f"    {name} = " + ",".join(f"{k}={v}" for k, v in value.items()))
                else:
                    lines += [f"    {name}.{k} = {v}" for k, v in value.items()]
            else:
                lines.append(f"    {name} = {value}")
        lines.append("")
    return "\n".join(lines)


def _table(jobs: dict[str, dict]) -> str:
    """The default format (RG "qstat", "Job status in default format")."""
    rows = ["Job id            Name             User              Time Use S Queue",
            "----------------  ---------------- ----------------  -------- - -----"]
    for key, job in jobs.items():
        used = job.get("resources_used", {}).get("cput", "0")
        rows.append(f"{key[:16]:<17} {job['Job_Name'][:16]:<16} {job['euser'][:16]:<16}  {used:>8} "
                    f"{job['job_state']} {job['queue']}")
    return "\n".join(rows)


