"""The one error tree of hpc_serverless.

Every mistake a user can make raises a subclass of :class:`HPCServerlessError`, with a
message that names the cause (and, for configuration files, the file and key). Where a
builtin fits, the error also subclasses it, so generic handlers keep working::

    HPCServerlessError(Exception)
    ├── ConfigError(ValueError)          malformed or missing configuration / site file
    ├── TargetError(ValueError)          bad `target` key or value
    ├── ResourceError(ValueError)        a target bigger than the provider can give
    ├── UnknownProviderError(KeyError)   context("name") with a name not configured
    ├── SerializationError(TypeError)    an argument or result that cannot be pickled
    ├── StoreError(OSError)              object store problems
    │   ├── ObjectNotFoundError(KeyError)
    │   ├── CorruptObjectError           size or checksum mismatch: damaged object
    │   └── UnsafeStoreError(PermissionError)  store or job files others can write or swap
    ├── TaskError(RuntimeError)          a task could not produce a value
    │   ├── DependencyError              an upstream TaskRef failed
    │   ├── TaskCancelledError(concurrent.futures.CancelledError)
    │   ├── WorkerDiedError              the process running the task died
    │   └── TaskTimeoutError(TimeoutError)  the task exceeded its `time`
    ├── GetTimeoutError(TimeoutError)    get()/wait()/result() ran out of time
    ├── SchedulerError(RuntimeError)     the batch scheduler refused or failed a command
    ├── TransportError(ConnectionError)  running a command or moving a file failed
    │   ├── HostKeyError                 an SSH host key unknown or changed: refused
    │   ├── AuthenticationError          SSH login refused (key, password, one-time code)
    │   └── AgentError                   the agent on a site's login node cannot start or serve
    │                                        (python without hpc_serverless, versions differ,
    │                                        storage not writable by the cluster account)
    ├── ProgramError(ValueError)         a Program that cannot be run (missing entrypoint)
    ├── EnvironmentBuildError            `dependencies` / `pip` the site could not install (the installer's words)
    ├── JobNotFoundError(LookupError)    get_job_by_id() of an id no provider has (says where it looked)
    └── JobFailedError(RuntimeError)     job.result() of a program that failed or was stopped

An exception raised *inside* a task is not wrapped: `get` re-raises the original type,
with the remote traceback attached as its ``__cause__`` (as concurrent.futures does).
"""

from __future__ import annotations

import concurrent.futures

from hpc_serverless.core.tracebacks import Section, render


class HPCServerlessError(Exception):
    """Base of every error hpc_serverless raises on purpose.

    ``transient`` says whether retrying the same call may succeed (a dropped
    connection, a busy scheduler) or not (a typo in a config file).
    """

    transient: bool = False


class EnvironmentBuildError(HPCServerlessError):
    """An environment for `dependencies` or `pip` could not be built on the site; the
    message quotes the installer and says where its whole output is. ``output`` holds that
    output; ``job_id``, for a Program, the refused job whose logs() show it."""

    output: str = ""
    job_id: str | None = None


class ConfigError(HPCServerlessError, ValueError):
    """A configuration or site file is missing, malformed, or has a bad key."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None,
                 line: int | None = None) -> None:
        self.file, self.key, self.line = file, key, line
        where = []
        if file:
            where.append(f"{file}" + (f":{line}" if line else ""))
        if key:
            where.append(f"key '{key}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class TargetError(HPCServerlessError, ValueError):
    """A `target` has an unknown key or a value of the wrong kind."""


class ResourceError(HPCServerlessError, ValueError):
    """A task asks for more than the provider can ever give it."""


class QPUError(HPCServerlessError, RuntimeError):
    """A task's QPU cannot be used: it has none (or several, for `qpu()`), its credential
    is missing from the job's environment, or the package its type needs is not installed."""


class UnknownProviderError(HPCServerlessError, KeyError):
    """A provider name that is not configured."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class SerializationError(HPCServerlessError, TypeError):
    """An argument, object or result that cannot be serialized."""


class StoreError(HPCServerlessError, OSError):
    """The object store could not read or write an object."""


class ObjectNotFoundError(StoreError, KeyError):
    """An ObjectRef whose object is not in the store."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CorruptObjectError(StoreError):
    """A stored object whose size or checksum does not match: it was damaged."""


class UnsafeStoreError(StoreError, PermissionError):
    """A store or job directory (or a file in it) that other users can write or swap (a
    symlink, not ours): loading pickles or running scripts from it is unsafe."""


class TaskError(HPCServerlessError, RuntimeError):
    """A task could not produce a value for a reason other than its own exception."""


class DependencyError(TaskError):
    """A task did not run because a TaskRef it depends on failed or was cancelled."""



def upstream_failed(upstream: str, cause: BaseException | None = None, *, downstream: str | None = None,
                    status: str | None = None) -> DependencyError:
    """The one message every engine gives for a task whose upstream task did not succeed:
    which upstream (name#id), why (its exception, else its status), and which task did not
    run. The upstream exception is the cause, so its traceback stays reachable."""
    why = f"{type(cause).__name__}: {cause}" if cause is not None else (status or "").lower()
    message = f"upstream task {upstream} did not succeed" + (f" ({why})" if why else "")
    if downstream:
        message += f", so {downstream} did not run"
    err = DependencyError(message)
    err.__cause__ = cause
    return err

class TaskCancelledError(TaskError, concurrent.futures.CancelledError):
    """The task was cancelled before it produced a value."""


class WorkerDiedError(TaskError):
    """The process (or batch job) running the task died without a result."""

    transient = True


class TaskTimeoutError(TaskError, TimeoutError):
    """The task ran past the wall time in its target."""


class GetTimeoutError(HPCServerlessError, TimeoutError):
    """get(), wait() or result() ran out of time before the value was ready."""

    transient = True


class SchedulerError(HPCServerlessError, RuntimeError):
    """The batch scheduler refused a request or a scheduler command failed."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class TransportError(HPCServerlessError, ConnectionError):
    """A command could not be run or a file moved on the provider's host."""

    transient = True


class HostKeyError(TransportError):
    """An SSH server whose host key is not known, or differs from the known one: refused."""

    transient = False


class AuthenticationError(TransportError):
    """The SSH server refused every way we had to log in."""

    transient = False


class AgentError(TransportError):
    """The agent that serves a site reached over SSH cannot start, or does not match us."""

    transient = False


class ProgramError(HPCServerlessError, ValueError):
    """A Program that cannot be submitted (missing entrypoint, bad working dir)."""


class CorruptRecordError(HPCServerlessError, ValueError):
    """A job's record or exit record is not whole JSON (a torn write, or damage)."""


class JobNotFoundError(HPCServerlessError, LookupError):
    """No job with this id where it was looked for; ``where`` names the place(s)."""

    def __init__(self, message: str, *, job_id: str = "", where: str = "") -> None:
        # keyword defaults: an exception is unpickled as cls(message), then its __dict__
        # (it travels from the agent on a login node)
        super().__init__(message)
        self.job_id, self.where = job_id, where


class RemoteTraceback(Exception):
    """The traceback of an exception raised in another process, attached as its ``__cause__``.

    It holds the frames as data and renders them when printed, in this process, so that
    frames of the user's by-value code name the user's file and show its line (see
    :mod:`hpc_serverless.core.tracebacks`).
    """

    def __init__(self, sections: tuple[Section, ...] | str) -> None:
        super().__init__(sections)
        self.sections: tuple[Section, ...] = () if isinstance(sections, str) else tuple(sections)
        self._text = sections if isinstance(sections, str) else None

    @property
    def tb(self) -> str:
        """The traceback text, as Python would print it."""
        return self._text if self._text is not None else render(self.sections)

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


class RemoteTaskError(HPCServerlessError, RuntimeError):
    """Stands in for a remote exception that could not be pickled back."""


class JobFailedError(HPCServerlessError, RuntimeError):
    """A program's job ended without a result (failed, stopped, or timed out)."""
