"""What every provider offers: a name, an object store, tasks, and programs.

A provider is a composition (site config + scheduler + transport + store); this base
class holds what is the same for all of them: `put`, target checks and the hooks the
public API calls.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Mapping

from hpc_serverless.core.refs import ObjectRef, TaskRef
from hpc_serverless.core.sessions import Session, session_prefix
from hpc_serverless.core.store import ObjectStore, new_object_id
from hpc_serverless.core.target import Target

if TYPE_CHECKING:
    from hpc_serverless.core.calls import TaskFunction
    from hpc_serverless.core.jobs import Job, Program


class Provider(abc.ABC):
    """A place where tasks run and objects live."""

    name: str
    #: this process's session where the provider keeps one: its objects, calls and results
    #: live in the session's directory and go with it at `gc` (core/sessions.py)
    session: Session | None = None

    @property
    @abc.abstractmethod
    def store(self) -> ObjectStore:
        """The object store this provider's tasks can read."""

    def put(self, obj: Any) -> ObjectRef:
        """Store `obj` once; the ref can be passed to any number of tasks (and resolves from
        any process until its session is collected)."""
        prefix = "objects"
        if self.session is not None:
            self.session.open()  # a process that never puts leaves no session behind
            prefix = f"{session_prefix(self.session.id)}/objects"
        key = f"{prefix}/{(oid := new_object_id())[:2]}/{oid}"
        self.store.put(obj, key, what=f"the object given to put() ({type(obj).__name__})")
        return ObjectRef(key, str(self.store.root), self.name)

    def check_target(self, target: Target) -> None:
        """Raise ResourceError if `target` can never run here (called at submission)."""

    @abc.abstractmethod
    def submit(self, fn: TaskFunction, args: tuple[Any, ...], kwargs: Mapping[str, Any],
               target: Target) -> TaskRef:
        """Start one call of a decorated function; return its TaskRef at once."""

    @abc.abstractmethod
    def run_program(self, program: Program, arguments: Mapping[str, Any] | None = None) -> Job:
        """Start a Program as a detached job."""

    @abc.abstractmethod
    def get_job_by_id(self, job_id: str) -> Job:
        """A Job handle for a program run earlier, from any process."""

    @abc.abstractmethod
    def jobs(self) -> list[Job]:
        """The programs this user has run on this provider, newest first."""

    def search_blocker(self) -> str | None:
        """Why this provider cannot be searched for a job without asking someone for a
        password or one-time code (None: it can; a cluster may connect to find out)."""
        return None

    def describe(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
