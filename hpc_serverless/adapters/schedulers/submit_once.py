"""Submitting once: a submission that may have created its job is never run again blind.

`sbatch`/`qsub` can fail after the scheduler took the job: "Socket timed out on send/recv
operation", a reply lost with an SSH connection, a command killed at its timeout. Each
submission carries a token the scheduler can be asked for (a Slurm comment, a PBS job
name, see slurm.py and pbs.py); on such a failure we ask once for a job carrying it. If one
does, its id is the answer; if none does, the error is raised as transient: a retry is
safe. If the scheduler cannot be asked either, the error is final: we do not know, so we do
not submit again.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Callable

from hpc_serverless.core.errors import SchedulerError, TransportError

log = logging.getLogger("hpc_serverless")


def new_token() -> str:
    """A submission's token: 12 hex digits (48 random bits)."""
    return secrets.token_hex(6)


def submit_once(where: str, token: str, submit: Callable[[], str], find: Callable[[], str | None], *,
                settle_s: float = 1.0) -> str:
    """`submit()` (the job id, or SchedulerError / TransportError); on a failure that may
    have created the job, one `find()` (the id of the job carrying `token`, or None) after
    `settle_s` seconds, so that a submission still landing in the scheduler is seen."""
    try:
        return submit()
    except (SchedulerError, TransportError) as exc:
        if not exc.transient:  # refused (bad option, command missing): no job was made
            raise
        failure: SchedulerError | TransportError = exc
    time.sleep(settle_s)
    try:
        found = find()
    except (SchedulerError, TransportError) as exc:
        raise SchedulerError(f"{where}: {failure}; the job may exist, and asking the scheduler for "
                             f"submission {token} failed too ({exc}): not submitting it again",
                             transient=False) from failure
    if found:
        log.warning("%s: the submission failed (%s) but job %s carries its token %s: taking that job, "
                    "not submitting again", where, failure, found, token)
        return found
    log.info("%s: the submission failed (%s) and no job carries its token %s: safe to retry",
             where, failure, token)
    raise SchedulerError(f"{where}: {failure} (no job carries its token: safe to retry)", transient=True) from failure
