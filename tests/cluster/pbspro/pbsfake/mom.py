"""The MoM of the fake: runs inside the Slurm job that qsub made, as the job's user.

What a PBS Pro MoM does and this copies (Reference Guide, "PBS Environment Variables";
User's Guide, "Job Exit Status" and "Job Array Exit Status"):
* the job gets a fresh environment: the Variable_List (PBS_O_*, -v, -V) plus PBS_JOBID,
  PBS_JOBNAME, PBS_QUEUE, PBS_NODEFILE, PBS_ARRAY_INDEX/PBS_ARRAY_ID, PBS_ENVIRONMENT,
  NCPUS, OMP_NUM_THREADS, TMPDIR, HOME, ... and none of Slurm's variables;
* it starts in the user's home directory, in the user's login shell (or -S);
* $PBS_NODEFILE has one line per MPI process (mpiprocs per chunk) naming the host;
* over its walltime the job gets SIGTERM, then SIGKILL after kill_delay (10 s), with
  "=>> PBS: job killed: walltime X exceeded limit Y" in its stderr, and Exit_status
  -29 (JOB_EXEC_KILL_WALLTIME, OpenPBS src/include/job.h);
* a job killed by a signal has Exit_status 256 + signal; otherwise the shell's status;
* stdout/stderr are spooled and delivered to Output_Path/Error_Path when the job ends.

And what the PBS QRMI hook (qrmi-community/pbs-integration; a runjob hook, which cannot run
here) gives a job that asked ``-l quantum_resources=aer,fake``: QRMI_JOB_QPU_RESOURCES
(``aer:fake``), QRMI_JOB_QPU_TYPES (one type per QPU, ``simulator:simulator``) and
QRMI_LIST_DELIMITER (``:``). The fake's QPUs are held by Slurm licenses (qsub.py), not QRMI.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pbsfake.common import QPU_TYPE, pbs_id, read_json, slurm, spool, write_json  # noqa: E402

KILL_DELAY = 10  # seconds between SIGTERM and SIGKILL (PBS Pro queue attribute kill_delay)
JOB_EXEC_KILL_WALLTIME = -29


def hosts() -> list[tuple[str, str]]:
    """(vnode, host) of each node Slurm gave: vnode is Slurm's node name, host its NodeHostName."""
    names = slurm(["scontrol", "show", "hostnames", os.environ.get("SLURM_JOB_NODELIST", "")]).stdout.split()
    out = []
    for name in names:
        info = slurm(["scontrol", "show", "node", name, "-o"]).stdout
        host = next((w.split("=", 1)[1] for w in info.split() if w.startswith("NodeHostName=")), name)
        out.append((name, host))
    return out or [(os.uname().nodename, os.uname().nodename)]


def qrmi_environment(qpus: list[str]) -> dict[str, str]:
    """What the QRMI hook exports for the QPUs it acquired; nothing for a job without any."""
    if not qpus:
        return {}
    return {"QRMI_JOB_QPU_RESOURCES": ":".join(qpus), "QRMI_JOB_QPU_TYPES": ":".join(QPU_TYPE for _ in qpus),
            "QRMI_LIST_DELIMITER": ":"}


def main(record_path: str) -> int:
    rec = read_json(Path(record_path))
    if rec is None:
        print(f"fake PBS MoM: cannot read {record_path}", file=sys.stderr)
        return 1
    seq = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ["SLURM_JOB_ID"]
    idx = os.environ.get("SLURM_ARRAY_TASK_ID") if rec["array"] else None
    key = seq if idx is None else f"{seq}_{idx}"
    jobid = pbs_id(seq, idx)
    chunk = rec["chunk"]
    nodes = hosts()
    user = pwd.getpwuid(os.getuid())
    nodefile = spool("aux") / jobid
    nodefile.write_text("".join(f"{host}\n" * chunk["mpiprocs"] for _, host in nodes))
    tmpdir = tempfile.mkdtemp(prefix=f"pbs.{jobid}.")
    env = dict(rec["env"])
    env.update({
        "HOME": user.pw_dir, "LOGNAME": user.pw_name, "USER": user.pw_name, "SHELL": user.pw_shell,
        "PATH": "/usr/local/bin:/usr/bin:/bin", "PBS_ENVIRONMENT": "PBS_BATCH", "PBS_JOBID": jobid,
        "PBS_JOBNAME": rec["name"], "PBS_QUEUE": rec["queue"] or "workq", "PBS_NODEFILE": str(nodefile),
        "PBS_NODENUM": "0", "PBS_TASKNUM": "1", "PBS_MOMPORT": "15003", "PBS_JOBDIR": user.pw_dir,
        "NCPUS": str(chunk["ncpus"]), "OMP_NUM_THREADS": str(chunk["ompthreads"]), "TMPDIR": tmpdir,
    })
    env.update(qrmi_environment(rec.get("quantum_resources") or []))
    if idx is not None:
        env.update({"PBS_ARRAY_INDEX": idx, "PBS_ARRAY_ID": pbs_id(seq, "")})
    started = time.time()
    vnodes = "+".join(f"({v}:ncpus={chunk['ncpus']}" + (f":mem={chunk['mem'] * 1024}kb" if "mem" in chunk else "")
                      + ")" for v, _ in nodes)
    exec_host = "+".join(f"{h}/{i}*{chunk['ncpus']}" for i, (_, h) in enumerate(nodes))
    state = {"start": started, "exec_host": exec_host, "exec_vnode": vnodes, "run_count": 1}
    old = read_json(spool("exit") / f"{key}.json")
    if old:
        state["run_count"] = old.get("run_count", 1) + 1
    write_json(spool("exit") / f"{key}.json", state)

    script = Path(tmpdir) / "job.sh"
    script.write_text(rec["script"])
    out_spool, err_spool = Path(tmpdir) / "stdout", Path(tmpdir) / "stderr"
    shell = rec["shell"] or user.pw_shell or "/bin/sh"
    login = "-" + os.path.basename(shell)  # a login shell, as PBS starts jobs
    with open(out_spool, "wb") as out, open(err_spool if rec["join"] == "n" else out_spool, "ab") as err:
        proc = subprocess.Popen([login, str(script)], executable=shell, cwd=user.pw_dir, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
        killed = {"why": None}

        def on_term(signum: int, _frame: object) -> None:  # qdel / scancel: pass it on
            killed["why"] = killed["why"] or "deleted"
            _signal(proc, signum)

        signal.signal(signal.SIGTERM, on_term)
        code = _wait(proc, rec["walltime"], started, err, killed)
    status = code if code >= 0 else 256 - code  # killed by a signal: 256 + signal
    if killed["why"] == "walltime":
        status = JOB_EXEC_KILL_WALLTIME
    state.update(end=time.time(), Exit_status=status, killed=killed["why"])
    write_json(spool("exit") / f"{key}.json", state)
    _deliver(rec, seq, idx, out_spool, err_spool)
    shutil.rmtree(tmpdir, ignore_errors=True)
    nodefile.unlink(missing_ok=True)
    return 0 if status == 0 else 1


def _signal(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass


def _wait(proc: subprocess.Popen, walltime: int | None, started: float, err, killed: dict) -> int:
    while True:
        try:
            return proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
        used = int(time.time() - started)
        if walltime and used > walltime and killed["why"] is None:
            killed["why"] = "walltime"
            err.write(f"=>> PBS: job killed: walltime {used} exceeded limit {walltime}\n".encode())
            err.flush()
            _signal(proc, signal.SIGTERM)
            try:
                return proc.wait(timeout=KILL_DELAY)
            except subprocess.TimeoutExpired:
                _signal(proc, signal.SIGKILL)
                return proc.wait()


def _deliver(rec: dict, seq: str, idx: str | None, out_spool: Path, err_spool: Path) -> None:
    """Stage the spooled output out (RG "qsub -o": default <name>.o<seq>[.<index>] in PBS_O_WORKDIR)."""
    workdir = rec["env"]["PBS_O_WORKDIR"]
    suffix = seq + ("" if idx is None else f".{idx}")
    for kind, spooled, given in (("o", out_spool, rec["output"]), ("e", err_spool, rec["error"])):
        if (kind == "e" and rec["join"] == "oe") or (kind == "o" and rec["join"] == "eo"):
            continue
        if kind == "e" and rec["join"] == "eo":
            spooled = out_spool  # both streams went there
        dest = given.replace("^array_index^", idx or "") if given else ""
        if not dest or os.path.isdir(dest):
            dest = os.path.join(dest or workdir, f"{rec['name']}.{kind}{suffix}")
        if dest == "/dev/null":
            continue
        try:
            shutil.copyfile(spooled, dest)
        except OSError as exc:  # PBS mails the user; the fake says so in Slurm's log
            print(f"fake PBS MoM: could not deliver {spooled} to {dest}: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
