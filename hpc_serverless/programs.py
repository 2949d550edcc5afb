"""Programs: whole scripts run as detached jobs, found again later by their id.

A job has a directory (its record, a copy of the working dir, the arguments, the
output, the result). Everything a later process needs is in that directory, so
``get_job_by_id`` works from any process that can read it. The values live in core
(core/jobs.py), the runners in the engines; here is what the api adds: finding a job
across the configured providers.
"""

from __future__ import annotations

from typing import Sequence

from hpc_serverless.core.errors import JobNotFoundError
from hpc_serverless.core.jobs import Job, Program, new_job_id, provider_of_job_id, why_it_ended
from hpc_serverless.providers.base import Provider
from hpc_serverless.runtime.program_io import get_arguments, save_result

__all__ = ["Job", "Program", "find_job", "get_arguments", "new_job_id", "save_result", "why_it_ended"]


def find_job(job_id: str, providers: Sequence[Provider], current: Provider) -> Job:
    """The job `job_id` on whichever provider has it: the one the id names first, then
    `current`, then the rest in configuration order. A provider that is not connected
    and would need a password or one-time code to log in is not searched (nobody should be
    asked for a code just to look), and the error says so, beside where it did look."""
    named = provider_of_job_id(job_id)
    order = [p for p in providers if p.name == named] + [current] + list(providers)
    seen: set[int] = set()
    looked: list[str] = []
    skipped: list[str] = []
    for provider in order:
        if id(provider) in seen:
            continue
        seen.add(id(provider))
        chosen = provider is current or provider.name == named
        if not chosen:
            blocker = provider.search_blocker()
            if blocker is not None:
                skipped.append(f"{provider.name} ({blocker})")
                continue
        try:
            return provider.get_job_by_id(job_id)
        except JobNotFoundError as exc:
            looked.append(f"{provider.name} ({exc.where})")
    where = "; ".join(looked)
    message = f"no job {job_id!r} on any configured provider; looked on: {where}"
    if skipped:
        message += (f"; not searched: {'; '.join(skipped)} (to look there, choose the provider: "
                    "--provider NAME, or set_provider(NAME))")
    raise JobNotFoundError(message, job_id=job_id, where=where)
