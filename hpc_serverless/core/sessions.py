"""Sessions: what one client process leaves on a site, kept together so it can go as one.

Every file a `QuantumServerless` process makes on a batch site (its put objects, task
calls, results, notes, submitit's job files and logs) lives under one directory::

    <storage>/store/sessions/<session id>/
        session.json     who made it (host, pid, user), when, the heartbeat interval
        heartbeat        the time of the last beat, rewritten every `interval` seconds
        closed           written when the process ends cleanly (no need to wait out the beat)
        job-ids          the scheduler job ids submitted for it (gc asks the scheduler about them)
        environments     keys of the `pip` environments its tasks run in (gc keeps those while it stays)
        objects/ tasks/ results/ notes/   store objects (keys "sessions/<id>/...")
        jobs/            submitit's files and the tasks' logs

The session id is part of every task id (``<session id>.<16 hex>``), so a TaskRef from
any session still finds its call and result, and task ids of older versions (24 hex, no
session) keep their old keys. Functions are shared by all sessions, by content hash.

A session is *live* while its heartbeat is younger than STALE_AFTER intervals and it is
not closed: `gc` never touches a live session, whichever login node or laptop beats it.
Times are the site's clock (the login node or its agent writes the beat), read from the
file's content, not from modification times (which NFS may cache).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import secrets
import shutil
import stat as stat_mod
import threading
import time
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Iterator

from hpc_serverless.core.fs import LOCAL
from hpc_serverless.core.private import make_private

__all__ = ["HEARTBEAT_S", "KINDS", "STALE_AFTER", "Session", "SessionInfo", "new_session_id", "parse_duration",
           "read_session", "remove_tree", "scan_sessions", "session_of", "session_prefix", "session_task_id",
           "tree_usage"]

#: seconds between heartbeats; a session is stale after STALE_AFTER missed beats
HEARTBEAT_S = 60.0
STALE_AFTER = 3
SESSIONS = "sessions"
_ID_RE = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")
#: what each first-level directory of a session holds, as `du` names it
KINDS = {"objects": "objects", "tasks": "calls", "results": "results", "notes": "results",
         "jobs": "job files", "checkpoints": "checkpoints", "args": "arguments"}


def new_session_id(now: float | None = None) -> str:
    """Sortable by start time, unique without coordination between hosts."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now if now is not None else time.time()))
    return f"{stamp}-{secrets.token_hex(3)}"


def session_prefix(session_id: str) -> str:
    """The store key prefix of a session's objects."""
    return f"{SESSIONS}/{session_id}"


def session_of(task_id: str) -> str | None:
    """The session a task id belongs to (None for ids made before sessions existed)."""
    sid, sep, _ = task_id.rpartition(".")
    return sid if sep and _ID_RE.match(sid) else None


def session_task_id(session_id: str) -> str:
    """A new task id in a session: its keys follow from it (runtime/worker.py)."""
    return f"{session_id}.{secrets.token_hex(8)}"


def parse_duration(text: str) -> float:
    """Seconds in "7d", "12h", "30m", "45s" or a plain number of seconds ("0")."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 7d, 12h, 30m, 0)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


class Session:
    """This process's session on one site: creates its directory, beats its heartbeat from
    a daemon thread, records its job ids, and marks it closed at the end."""

    def __init__(self, store_root: str | os.PathLike[str], session_id: str | None = None, *,
                 interval: float = HEARTBEAT_S, client: str = "") -> None:
        self.id = session_id or new_session_id()
        if not _ID_RE.match(self.id):
            raise ValueError(f"not a session id: {self.id!r}")
        self.store_root = str(store_root)
        self.dir = PurePosixPath(self.store_root) / SESSIONS / self.id
        self.interval = interval
        self.client = client
        self._job_ids: list[str] = []
        self._environments: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._opened = False

    @property
    def jobs_dir(self) -> PurePosixPath:
        return self.dir / "jobs"

    def open(self, *, beating: bool = True) -> None:
        """Create the directory and first beat (at the first submission or put, not before:
        a process that never uses the site leaves nothing there). `beating`: a thread beats
        it from now on and it is marked closed at exit (this process's session); an agent
        opens a remote client's session without one and beats it when the client does."""
        if self._opened:
            return
        with self._lock:
            if self._opened:
                return
            make_private(self.store_root, self.jobs_dir)  # job files go here: 0700 from the store root
            info = {"id": self.id, "host": os.uname().nodename, "pid": os.getpid(),
                    "user": os.environ.get("USER", ""), "created": time.time(),
                    "interval": self.interval, "client": self.client}
            LOCAL.write_atomic(str(self.dir / "session.json"), json.dumps(info).encode())
            self._opened = True
        self.beat()
        if beating:
            self._thread = threading.Thread(target=self._run, name=f"hpc-serverless-session-{self.id}",
                                            daemon=True)
            self._thread.start()
            atexit.register(self.close)

    def beat(self) -> None:
        """Say this session is still in use (the thread calls it; the agent calls it for a
        remote client's session each time the client beats)."""
        try:
            LOCAL.write_atomic(str(self.dir / "heartbeat"), repr(time.time()).encode(), durable=False)
        except OSError:  # gone (removed by hand) or the filesystem hiccups: the next beat retries
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def record_jobs(self, job_ids: list[str]) -> None:
        """Remember submitted jobs (arrays by their id), so gc can ask if any still run."""
        ids = list(dict.fromkeys(j.split("_", 1)[0] for j in job_ids))
        with self._lock:
            new = [j for j in ids if j not in self._job_ids]
            if not new:
                return
            self._job_ids.extend(new)
            # not fsynced: it is written on the engine's submit path (under its lock). A crash
            # of this node can lose the last ids; gc's age cutoff (a week by default) is then
            # the margin that keeps their files while such jobs could still run
            LOCAL.write_atomic(str(self.dir / "job-ids"), ("\n".join(self._job_ids) + "\n").encode(),
                               durable=False)

    def record_environment(self, key: str) -> None:
        """Remember an environment its tasks use (engines/environments.py): gc keeps it
        as long as it keeps this session."""
        with self._lock:
            if key in self._environments:
                return
            self._environments.append(key)
            LOCAL.write_atomic(str(self.dir / "environments"), ("\n".join(self._environments) + "\n").encode(),
                               durable=False)

    def close(self) -> None:
        """Stop beating and mark the session closed: gc may take it once it is old enough."""
        self._stop.set()
        if self._opened:
            try:
                LOCAL.write_atomic(str(self.dir / "closed"), repr(time.time()).encode())
            except OSError:
                pass


@dataclass
class SessionInfo:
    """What `du` and `gc` know of a session without asking the scheduler."""

    id: str
    path: str
    created: float
    last_beat: float
    interval: float
    closed: bool
    job_ids: list[str]
    host: str = ""
    environments: list[str] = field(default_factory=list)
    bytes_by_kind: dict[str, int] = field(default_factory=dict)
    files_by_kind: dict[str, int] = field(default_factory=dict)

    def live(self, now: float) -> bool:
        """Still used by a process: not closed and beaten within STALE_AFTER intervals."""
        return not self.closed and now - self.last_beat < STALE_AFTER * self.interval

    @property
    def last_used(self) -> float:
        return max(self.created, self.last_beat)

    @property
    def bytes(self) -> int:
        return sum(self.bytes_by_kind.values())

    @property
    def files(self) -> int:
        return sum(self.files_by_kind.values())

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "path": self.path, "created": self.created, "last_beat": self.last_beat,
                "closed": self.closed, "host": self.host, "jobs": len(self.job_ids), "bytes": self.bytes,
                "files": self.files, "bytes_by_kind": self.bytes_by_kind, "files_by_kind": self.files_by_kind}


def _read_float(path: str) -> float | None:
    try:
        return float(LOCAL.read_bytes(path).decode().strip())
    except (OSError, ValueError):
        return None


def tree_usage(path: str) -> tuple[int, int]:
    """(bytes, files) under `path`, not following symlinks (a symlink counts as a file)."""
    total = files = 0
    for root, dirs, names in os.walk(path):
        for n in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            try:
                st = os.lstat(os.path.join(root, n))
            except FileNotFoundError:
                continue
            files += 1
            if stat_mod.S_ISREG(st.st_mode):
                total += st.st_size
    return total, files


def read_session(path: str, *, sizes: bool = True) -> SessionInfo | None:
    """A session directory's record (None if it is not one)."""
    sid = os.path.basename(path)
    if not _ID_RE.match(sid):
        return None
    try:
        info = json.loads(LOCAL.read_bytes(f"{path}/session.json"))
    except (OSError, ValueError):
        info = {}
    created = float(info.get("created", 0.0))
    beat = _read_float(f"{path}/heartbeat") or created
    try:
        ids = [j for j in LOCAL.read_bytes(f"{path}/job-ids").decode().split() if j]
    except OSError:
        ids = []
    try:
        envs = [k for k in LOCAL.read_bytes(f"{path}/environments").decode().split() if k]
    except OSError:
        envs = []
    s = SessionInfo(sid, path, created, beat, float(info.get("interval", HEARTBEAT_S)),
                    LOCAL.exists(f"{path}/closed"), ids, str(info.get("host", "")), envs)
    if sizes:
        for name in sorted(os.listdir(path)):
            kind = KINDS.get(name, "session records")
            full = f"{path}/{name}"
            b, n = tree_usage(full) if os.path.isdir(full) and not os.path.islink(full) else (
                os.lstat(full).st_size, 1)
            s.bytes_by_kind[kind] = s.bytes_by_kind.get(kind, 0) + b
            s.files_by_kind[kind] = s.files_by_kind.get(kind, 0) + n
    return s


def scan_sessions(store_root: str, *, sizes: bool = True) -> Iterator[SessionInfo]:
    """Every session under a store root, oldest first."""
    base = f"{store_root}/{SESSIONS}"
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return
    for name in names:
        s = read_session(f"{base}/{name}", sizes=sizes)
        if s is not None:
            yield s


def remove_tree(path: str) -> None:
    """Remove a session (or a program's) directory; what vanished meanwhile is fine."""
    shutil.rmtree(path, ignore_errors=True)
