"""Inside a running program: its arguments and where its result goes (the job directory
named by HPC_SERVERLESS_JOB_DIR, set by whichever engine started it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hpc_serverless.core.jobs import ARGUMENTS_KEY, JOB_DIR_ENV, RESULT_KEY
from hpc_serverless.core.store import ObjectStore

__all__ = ["get_arguments", "save_result"]


def _job_dir() -> Path | None:
    d = os.environ.get(JOB_DIR_ENV)
    return Path(d) if d else None


def get_arguments() -> dict[str, Any]:
    """The arguments given to run_program ({} when not running as a program)."""
    d = _job_dir()
    if d is None or not (d / ARGUMENTS_KEY).exists():
        return {}
    return dict(ObjectStore(d).get(ARGUMENTS_KEY))


def save_result(result: Any) -> bool:
    """Store the program's result for job.result(); outside a program, print it."""
    d = _job_dir()
    if d is None:
        print(f"save_result (not running as a program): {result!r}")
        return False
    ObjectStore(d).put(result, RESULT_KEY, what="the program's result", overwrite=True)
    return True
