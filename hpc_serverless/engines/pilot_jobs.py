"""The pilot jobs as the batch scheduler and dask see them, for the pilot engine's keeper.

Kept apart from the engine's task bookkeeping: this part only counts jobs and workers,
polls the scheduler while no worker has connected yet, and says (with the likely cause)
when the pilot jobs cannot work: the scheduler refused them, or they run or end and no
worker ever reaches the dask scheduler.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from hpc_serverless.core.errors import HPCServerlessError, SchedulerError
from hpc_serverless.core.refs import TaskStatus

if TYPE_CHECKING:
    from hpc_serverless.adapters.schedulers.base import Scheduler
    from hpc_serverless.config.site import Site
    from hpc_serverless.core.fs import LocalFS

__all__ = ["PilotJobs"]


class PilotJobs:
    """Every pilot job submitted, what the scheduler last said of each, and the workers seen."""

    def __init__(self, site: Site, scheduler: Scheduler, fs: LocalFS) -> None:
        self.site, self.scheduler, self.fs = site, scheduler, fs
        self.jobs: list[str] = []                # every pilot job submitted, in order
        self._seen: dict[str, tuple[str, float]] = {}  # job -> (status, since)
        self.submit_errors: list[BaseException] = []
        self.connected_once = False
        self.max_workers_seen = 0
        self._next_poll = 0.0

    def saw_workers(self, workers: int) -> bool:
        """Count the connected workers; True the first time there is one."""
        self.max_workers_seen = max(self.max_workers_seen, workers)
        if workers and not self.connected_once:
            self.connected_once = True
            return True
        return False

    def refused(self) -> SchedulerError | None:
        """The scheduler refused a pilot job before any worker connected: nothing can run."""
        if self.submit_errors and not self.connected_once:
            return SchedulerError(f"{self.scheduler.name} refused the pilot job of site "
                                  f"'{self.site.name}': {self.submit_errors[-1]}")
        return None

    def unreachable(self, address: str) -> HPCServerlessError | None:
        """(While no worker has connected.) Poll the jobs when due; the error if one has been
        RUNNING for connect_timeout, or ended, and still no worker connected."""
        now = time.monotonic()
        if self.connected_once or not self.jobs or now < self._next_poll:
            return None
        states = self.scheduler.poll(list(self.jobs))
        for job_id in self.jobs:
            st = states.get(job_id)
            status = st.status if st is not None else ""
            if status and self._seen.get(job_id, ("", 0.0))[0] != status:
                self._seen[job_id] = (status, now)
        self._next_poll = now + min(self.site.poll_interval, 5.0)
        timeout = self.site.pilot.connect_timeout
        running = [j for j, (s, since) in self._seen.items()
                   if s == TaskStatus.RUNNING and now - since >= timeout]
        ended = [j for j, (s, _) in self._seen.items() if s in TaskStatus.FINAL]
        if not running and not ended:
            return None
        logs = self.site.storage_path / "pilot" / "logs"
        tail = self._log_tail(ended[0]) if ended else ""
        what = (f"pilot job(s) {', '.join(running)} have been RUNNING for {timeout:g} s"
                if running else f"pilot job(s) {', '.join(ended)} ended")
        return HPCServerlessError(
            f"site '{self.site.name}': {what}, but no dask worker connected to the scheduler at "
            f"{address}. Most likely the compute nodes cannot open a connection to this machine "
            f"(a firewall, or an address on a network the nodes do not route). Set pilot.interface "
            f"(e.g. ib0) or pilot.scheduler_options.host to an address the nodes can reach, or use "
            f"mode: jobs. Worker logs: {logs}" + (f"\nlast lines of job {ended[0]}'s log:\n{tail}" if tail else ""))

    def _log_tail(self, job_id: str) -> str:
        logs = str(self.site.storage_path / "pilot" / "logs")
        try:
            name = next(n for n in self.fs.listdir(logs) if job_id in n)
            text = self.fs.read_bytes(f"{logs}/{name}").decode(errors="replace")
        except (StopIteration, OSError):
            return ""
        return "\n".join(text.strip().splitlines()[-8:])
