"""Runs a program's entrypoint and records how it ended: ``python -m hpc_serverless.runtime.program_runner``
(started behind :data:`hpc_serverless.core.launch.GUARD`, as is the entrypoint).

Used by the local provider (a detached process per job). The exit record is what
``Job.status()`` reads, so a job that ends while nobody watches is still judged right.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hpc_serverless.core.fs import LOCAL
from hpc_serverless.core.jobs import ENVIRONMENT_NOTE_ENV
from hpc_serverless.core.launch import script_argv


def main(argv: list[str]) -> int:
    job_dir, entrypoint = Path(argv[0]), argv[1]
    started = time.time()
    note = os.environ.pop(ENVIRONMENT_NOTE_ENV, "")  # set where dependencies were asked for
    if note:
        print(f"[hpc-serverless] {note}", flush=True)
    print(f"[hpc-serverless] job {job_dir.name}: {sys.executable} {entrypoint}", flush=True)
    child: subprocess.Popen[bytes] | None = None
    early: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if child is None:
            early.append(signum)  # stopped before the program started: do not start it
        else:
            child.send_signal(signum)

    # the handler goes in before the child starts, so a stop at any moment is recorded
    signal.signal(signal.SIGTERM, forward)
    if not early and not (job_dir / "stop-requested").exists():
        # behind the guard: a folder called hpc_serverless in the working dir is not imported
        child = subprocess.Popen(script_argv(sys.executable, entrypoint))
    code = child.wait() if child is not None else -signal.SIGTERM
    stopped = (job_dir / "stop-requested").exists()
    if stopped:
        status, state, reason = "STOPPED", "CANCELLED", "stopped by the user"
    elif code == 0:
        status, state, reason = "SUCCEEDED", "COMPLETED", ""
    else:
        status, state = "FAILED", "FAILED"
        reason = (f"killed by signal {-code}" if code < 0 else f"exit code {code}")
        if code == -signal.SIGTERM and (os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID")):
            reason += " (SIGTERM from the scheduler: its time limit, a preemption, or a cancel)"
    record = {"status": status, "state": state, "reason": reason, "exit_code": code,
              "started": started, "ended": time.time()}
    LOCAL.write_atomic(str(job_dir / "exit.json"), json.dumps(record).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
