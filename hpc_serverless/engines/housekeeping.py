"""`gc` and `du` of a provider's storage: what it holds, and removing what no one uses.

Batch sites (Slurm, PBS) and the local provider alike: each describes its storage as a
:class:`Storage` (where its sessions, programs and older files are, how to ask whether a
session's jobs still run, the quota), and the same code collects and counts.

A session (core/sessions.py) goes when all of these hold:

* it is not live: closed, or its heartbeat missed STALE_AFTER intervals;
* it was last used longer ago than the cutoff (`--older-than`, a week by default);
* none of its jobs is queued or running: the scheduler is asked once for the job ids
  of every candidate, and this process's own unsettled tasks count too. If the
  scheduler cannot answer, sessions with jobs are kept.

Environments (`<storage>/envs/`, engines/environments.py) go when unused (their
`last-used`) for longer than the cutoff, unless a session that stays or a Program not yet
finished names them.

Programs (`<storage>/programs/<job id>/`; the local provider's `~/.hpc_serverless/jobs/`)
are kept until `rm JOB_ID` or `gc --programs`, which takes finished ones last touched
before the cutoff. Files of versions before sessions (`store/tasks`, `store/results`,
`jobs/`) are counted by `du`, never removed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

from hpc_serverless.adapters.quota import site_quota
from hpc_serverless.adapters.schedulers.base import Scheduler
from hpc_serverless.core.errors import HPCServerlessError, JobNotFoundError
from hpc_serverless.core.sessions import SessionInfo, remove_tree, scan_sessions, session_of, tree_usage
from hpc_serverless.engines.environments import collect_environments, list_environments

if TYPE_CHECKING:
    from hpc_serverless.adapters.transport.base import Transport
    from hpc_serverless.config.site import Site
    from hpc_serverless.core.jobs import Job
    from hpc_serverless.core.store import ObjectStore
    from hpc_serverless.engines.batch import BatchBackend

__all__ = ["Storage", "batch_storage", "collect", "remove_program", "usage"]

#: what `du` counts outside sessions on a batch site: (kind, path under <storage>)
SHARED = (("functions", "store/functions"), ("objects (no session)", "store/objects"),
          ("calls (no session)", "store/tasks"), ("results (no session)", "store/results"),
          ("results (no session)", "store/notes"), ("checkpoints (no session)", "store/checkpoints"),
          ("arguments (no session)", "store/args"),
          ("job files (no session)", "jobs"), ("programs", "programs"), ("environments", "envs"))


class HousekeepingSite(Protocol):
    """What gc and du need of a batch provider (providers/batch.py's BatchProvider)."""

    name: str
    site: Site
    scheduler: Scheduler
    transport: Transport
    backend: BatchBackend

    @property
    def store(self) -> ObjectStore: ...

    def get_job_by_id(self, job_id: str) -> Job: ...


@dataclass(frozen=True)
class Storage:
    """A provider's storage as gc and du see it."""

    name: str                 # the provider or site, for reports
    root: str                 # what `du` reports as the storage
    store_root: str           # the object store (sessions live in its sessions/)
    programs_dir: str         # one directory per Program's job id
    shared: tuple[tuple[str, str], ...]    # (kind, absolute path) counted outside sessions
    busy: Callable[[list[SessionInfo]], dict[str, str]]  # sessions whose jobs still run, and why
    program_status: Callable[[str], str]   # a Program's status by job id
    quota: Callable[[], Any]  # a sentence, or the quotas (adapters/quota.py)
    envs_dir: str = ""        # the environments (engines/environments.py); "" if none


def batch_storage(provider: HousekeepingSite) -> Storage:
    """The storage of a Slurm or PBS site: sessions' jobs are asked of its scheduler."""
    storage = str(provider.site.storage_path)
    return Storage(provider.site.name, storage, str(provider.store.root), os.path.join(storage, "programs"),
                   tuple((kind, os.path.join(storage, rel)) for kind, rel in SHARED),
                   lambda candidates: _busy_sessions(provider, candidates),
                   lambda job_id: provider.get_job_by_id(job_id).status(),
                   lambda: site_quota(provider.transport, storage), os.path.join(storage, "envs"))


def _busy_sessions(provider: HousekeepingSite, candidates: list[SessionInfo]) -> dict[str, str]:
    """Sessions that still have queued or running jobs, with why (one scheduler query)."""
    busy: dict[str, str] = {}
    with provider.backend._lock:  # this process's own tasks still out there
        for t in provider.backend._tasks.values():
            sid = session_of(t.ref.task_id)
            if sid and not t.settled:
                busy[sid] = f"task {t.name} of this process is not finished"
    owner = {j: s.id for s in candidates for j in s.job_ids}
    ids = [j for j in owner if owner[j] not in busy]
    if not ids:
        return busy
    try:
        states = provider.scheduler.poll(ids)
    except HPCServerlessError as exc:
        for s in candidates:
            if s.job_ids:
                busy.setdefault(s.id, f"the scheduler did not say whether its jobs ended ({exc})")
        return busy
    for job, st in states.items():
        sid = owner.get(job.split("_", 1)[0]) or owner.get(job)
        if sid and not st.final:
            busy.setdefault(sid, f"job {job} is {st.state}")
    return busy


def collect(storage: Storage, older_than: float, *, dry_run: bool = False,
            programs: bool = False) -> dict[str, Any]:
    """Remove (or with `dry_run`, list) finished sessions older than `older_than` seconds;
    with `programs`, finished Programs too. A report: what went or would go, what stayed
    and why, bytes and files."""
    now = time.time()
    sessions = list(scan_sessions(storage.store_root))
    kept: list[dict[str, Any]] = []
    candidates = []
    for s in sessions:
        if s.live(now):
            kept.append({**s.as_dict(), "why": "in use (its heartbeat is fresh)"})
        elif now - s.last_used < older_than:
            kept.append({**s.as_dict(), "why": f"used {_ago(now - s.last_used)} ago"})
        else:
            candidates.append(s)
    busy = storage.busy(candidates)
    removed: list[dict[str, Any]] = []
    for s in candidates:
        if s.id in busy:
            kept.append({**s.as_dict(), "why": busy[s.id]})
            continue
        if not dry_run:
            remove_tree(s.path)
        removed.append(s.as_dict())
    if programs:
        removed += _collect_programs(storage, now, older_than, dry_run, kept)
    if storage.envs_dir:
        staying = {s.id for s in sessions} - {s.id for s in candidates if s.id not in busy}
        in_use = {k for s in sessions if s.id in staying for k in s.environments}
        in_use |= _unfinished_programs_environments(storage)
        gone, stay = collect_environments(storage.envs_dir, older_than, in_use, dry_run=dry_run, now=now)
        removed += gone
        kept += stay
    return {"site": storage.name, "dry_run": dry_run, "removed": removed, "kept": kept,
            "bytes": sum(r["bytes"] for r in removed), "files": sum(r["files"] for r in removed)}


def _collect_programs(storage: Storage, now: float, older_than: float, dry_run: bool,
                      kept: list[dict[str, Any]]) -> list[dict[str, Any]]:
    root = storage.programs_dir
    out = []
    for job_id in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, job_id)
        try:
            status = storage.program_status(job_id)
        except HPCServerlessError as exc:
            kept.append({"id": job_id, "path": path, "why": f"status unknown: {exc}"})
            continue
        ended = _program_ended(path)
        if status not in ("SUCCEEDED", "FAILED", "STOPPED"):
            kept.append({"id": job_id, "path": path, "why": f"program is {status}"})
        elif ended is not None and now - ended < older_than:
            kept.append({"id": job_id, "path": path, "why": f"ended {_ago(now - ended)} ago"})
        else:
            size, files = tree_usage(path)
            if not dry_run:
                remove_tree(path)
            out.append({"id": job_id, "path": path, "bytes": size, "files": files})
    return out


def _unfinished_programs_environments(storage: Storage) -> set[str]:
    """Environment keys named by Programs that have not finished (asked only of those with one)."""
    root = storage.programs_dir
    keys: set[str] = set()
    for job_id in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        try:
            with open(os.path.join(root, job_id, "record.json"), "rb") as f:
                key = json.load(f).get("environment")
        except (OSError, ValueError, AttributeError):
            continue
        if not key or key in keys:
            continue
        try:
            if storage.program_status(job_id) in ("SUCCEEDED", "FAILED", "STOPPED"):
                continue
        except HPCServerlessError:
            pass  # status unknown: keep its environment
        keys.add(key)
    return keys


def _program_ended(path: str) -> float | None:
    try:
        with open(os.path.join(path, "exit.json"), "rb") as f:
            info = json.load(f)
        return float(info.get("ended") or info.get("time") or 0) or None
    except (OSError, ValueError, TypeError):
        return None


def remove_program(storage: Storage, job_id: str) -> dict[str, Any]:
    """Remove one Program's directory, once it has finished (`hpc-serverless rm`)."""
    status = storage.program_status(job_id)  # JobNotFoundError names where it looked
    if status not in ("SUCCEEDED", "FAILED", "STOPPED"):
        raise HPCServerlessError(f"job {job_id} is {status}; stop it first (hpc-serverless stop {job_id})")
    path = os.path.join(storage.programs_dir, job_id)
    if not os.path.isdir(path):
        raise JobNotFoundError(f"no job directory {path}", job_id=job_id, where=path)
    size, files = tree_usage(path)
    remove_tree(path)
    return {"id": job_id, "path": path, "bytes": size, "files": files}


def usage(storage: Storage) -> dict[str, Any]:
    """Bytes and files per session and per kind, and the quota where the site says it."""
    now = time.time()
    sessions = [{**info.as_dict(), "live": info.live(now)} for info in scan_sessions(storage.store_root)]
    kinds: dict[str, list[int]] = {}
    for s in sessions:
        for kind, n in s["bytes_by_kind"].items():
            kinds.setdefault(kind, [0, 0])[0] += n
            kinds[kind][1] += s["files_by_kind"][kind]
    for kind, path in storage.shared:
        size, files = tree_usage(path)
        if files:
            kinds.setdefault(kind, [0, 0])[0] += size
            kinds[kind][1] += files
    quota = storage.quota()
    return {"site": storage.name, "storage": storage.root, "sessions": sessions,
            "kinds": {k: {"bytes": v[0], "files": v[1]} for k, v in sorted(kinds.items())},
            "bytes": sum(v[0] for v in kinds.values()), "files": sum(v[1] for v in kinds.values()),
            "environments": list_environments(storage.envs_dir) if storage.envs_dir else [],
            "quota": quota if isinstance(quota, str) else [q.describe() for q in quota]}


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"
