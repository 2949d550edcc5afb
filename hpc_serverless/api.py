"""The programming model: QuantumServerless, providers in context, put/get/wait, tasks."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import secrets
import sys
import threading
import time
import warnings
from typing import Any, Callable, Generic, Iterator, Mapping, ParamSpec, Sequence, TypeVar, overload

from hpc_serverless.core.errors import GetTimeoutError, HPCServerlessError, TargetError, UnknownProviderError
from hpc_serverless.core.refs import ObjectRef, TaskRef
from hpc_serverless.core.serialization import function_bytes
from hpc_serverless.core.target import Target
from hpc_serverless.providers.base import Provider
from hpc_serverless.providers.local import LocalProvider

__all__ = ["QuantumServerless", "RemoteFunction", "distribute_task", "put", "get", "wait",
           "current_provider"]

P = ParamSpec("P")
R = TypeVar("R")

_context: contextvars.ContextVar[Provider | None] = contextvars.ContextVar(
    "hpc_serverless_provider", default=None)
_last_set: Provider | None = None
_last_serverless: QuantumServerless | None = None
_default_local: LocalProvider | None = None
_state_lock = threading.Lock()


def _local_default() -> LocalProvider:
    global _default_local
    with _state_lock:
        if _default_local is None:
            _default_local = LocalProvider()
        return _default_local


def current_provider() -> Provider:
    """The provider tasks and put() go to: the innermost `with context()`, else the one last
    given to set_provider, else the default of the last QuantumServerless, else local."""
    provider = _context.get()
    if provider is not None:
        return provider
    if _last_set is not None:
        return _last_set
    if _last_serverless is not None:
        return _last_serverless.default_provider
    return _local_default()


# -- QuantumServerless ------------------------------------------------------------------------
class QuantumServerless:
    """The entry point: a set of named providers, one of which is current.

    ``QuantumServerless()`` has one provider, ``local``. A configuration (dict, or a
    YAML/JSON file through :meth:`load_configuration`) lists more::

        {"providers": [{"name": "local"},
                       {"name": "cluster", "site": "site_configs/localhost-slurm.yaml"}],
         "default": "cluster"}
    """

    def __init__(self, config: Mapping[str, Any] | None = None, *, _source: str | None = None) -> None:
        global _last_serverless
        # (imported here: site parsing pulls in pydantic, and a plain QuantumServerless() needs none)
        from hpc_serverless.config.serverless import parse_serverless_config
        from hpc_serverless.providers.factory import provider_from_entry

        self._providers: dict[str, Provider] = {}
        entries, default = parse_serverless_config(config or {}, source=_source)
        for entry in entries:
            self._providers[entry.name] = provider_from_entry(entry)
        if "local" not in self._providers:
            self._providers = {"local": _local_default(), **self._providers}
        self._default = default or "local"
        if self._default not in self._providers:
            raise UnknownProviderError(
                f"the configuration's default provider '{self._default}' is not one of its "
                f"providers: {', '.join(self._providers)}")
        self._selected: Provider | None = None
        _last_serverless = self

    @classmethod
    def load_configuration(cls, path: str | os.PathLike[str]) -> QuantumServerless:
        """A QuantumServerless from a YAML or JSON file of the same shape as the dict."""
        from hpc_serverless.config.files import read_config_file

        return cls(read_config_file(path), _source=str(path))

    @property
    def providers(self) -> list[Provider]:
        return list(self._providers.values())

    @property
    def default_provider(self) -> Provider:
        return self._selected or self._providers[self._default]

    def provider(self, name: str | None = None) -> Provider:
        """The provider called `name` (None: the default)."""
        if name is None:
            return self.default_provider
        try:
            return self._providers[name]
        except KeyError:
            raise UnknownProviderError(
                f"unknown provider {name!r}; configured providers are: "
                f"{', '.join(self._providers)}") from None

    def add_provider(self, provider: Provider) -> QuantumServerless:
        if not isinstance(provider, Provider):
            raise HPCServerlessError(f"add_provider() takes a Provider, not {type(provider).__name__}")
        self._providers[provider.name] = provider
        return self

    def set_provider(self, provider: str | Provider) -> QuantumServerless:
        """Make `provider` (a name or a Provider) current outside `with` blocks; returns self."""
        global _last_set
        if isinstance(provider, Provider):
            self._providers.setdefault(provider.name, provider)
            chosen = provider
        else:
            chosen = self.provider(provider)
        self._selected = chosen
        _last_set = chosen
        return self

    @contextlib.contextmanager
    def context(self, provider: str | Provider | None = None) -> Iterator[Provider]:
        """Within the block, tasks and put() go to `provider` (default: the default one)."""
        chosen = provider if isinstance(provider, Provider) else self.provider(provider)
        token = _context.set(chosen)
        try:
            yield chosen
        finally:
            _context.reset(token)

    # programs ------------------------------------------------------------------------------
    def run_program(self, program: Any, arguments: Mapping[str, Any] | None = None) -> Any:
        """Start `program` on the current provider and return its Job at once."""
        return self._current().run_program(program, arguments)

    def get_job_by_id(self, job_id: str) -> Any:
        """The job `job_id` on whichever configured provider ran it (see programs.find_job)."""
        from hpc_serverless.programs import find_job

        return find_job(job_id, self.providers, self._current())

    def jobs(self) -> list[Any]:
        return self._current().jobs()

    # storage ---------------------------------------------------------------------------------
    def _site(self, provider: str | None, what: str) -> Any:
        p = self.provider(provider) if provider else self._current()
        if not hasattr(p, what):
            raise HPCServerlessError(f"provider '{p.name}' keeps no sessions; "
                                     f"{what} applies to local, Slurm and PBS providers")
        return p

    def gc(self, older_than: str | float = "7d", *, dry_run: bool = False, programs: bool = False,
           provider: str | None = None) -> dict[str, Any]:
        """Remove finished sessions not used for `older_than` ("7d", "12h", seconds) from a
        site's storage, never one a live process or a queued or running job still uses;
        `programs` also removes finished Programs. The report lists what went and what stayed."""
        from hpc_serverless.core.sessions import parse_duration

        seconds = parse_duration(older_than) if isinstance(older_than, str) else float(older_than)
        return dict(self._site(provider, "gc").gc(seconds, dry_run=dry_run, programs=programs))

    def du(self, provider: str | None = None) -> dict[str, Any]:
        """Bytes and files on a site's storage, per session and per kind, and its quota."""
        return dict(self._site(provider, "du").du())

    def remove_job(self, job_id: str, provider: str | None = None) -> dict[str, Any]:
        """Remove a finished Program's directory from a site (`hpc-serverless rm JOB_ID`):
        gc keeps Programs until this or `gc(programs=True)`."""
        return dict(self._site(provider, "remove_program").remove_program(job_id))

    def _current(self) -> Provider:
        inner = _context.get()
        if inner is not None and inner in self._providers.values():
            return inner
        return self.default_provider

    def __repr__(self) -> str:
        return f"<QuantumServerless: providers [{', '.join(self._providers)}]>"


# -- tasks ------------------------------------------------------------------------------------
class RemoteFunction(Generic[P, R]):
    """A function decorated with @distribute_task: calling it submits a task."""

    def __init__(self, fn: Callable[P, R], target: Target, name: str | None = None) -> None:
        self.function = fn
        self.target = target
        self.name: str = str(name or getattr(fn, "__qualname__", "task"))
        self.key = f"f:{secrets.token_hex(8)}"
        self._bytes: bytes | None = None
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    @property
    def function_bytes(self) -> bytes:
        """The function pickled once (by value for __main__ code), on first submission."""
        if self._bytes is None:
            self._bytes = function_bytes(self.function)
        return self._bytes

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> TaskRef:
        provider = current_provider()
        target = self.target
        provider.check_target(target)
        return provider.submit(self, args, kwargs, target)

    def options(self, target: Target | Mapping[str, Any] | None = None, **changes: Any) -> RemoteFunction[P, R]:
        """A copy with some target keys changed: ``f.options(cpu=4)(x)``."""
        new = Target.of({**self.target.as_dict(), **Target.of(target).as_dict(), **changes})
        clone = RemoteFunction(self.function, new, self.name)
        clone.key, clone._bytes = self.key, self._bytes
        return clone

    def local(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the function here, in this process (for debugging)."""
        return self.function(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<remote function {self.name} target={self.target.as_dict()}>"


@overload
def distribute_task(fn: Callable[P, R], /) -> RemoteFunction[P, R]: ...
@overload
def distribute_task(*, target: Target | Mapping[str, Any] | None = None,
                    name: str | None = None) -> Callable[[Callable[P, R]], RemoteFunction[P, R]]: ...


def distribute_task(fn: Any = None, /, *, target: Any = None, name: str | None = None) -> Any:
    """Decorator: calling the function submits it as a task and returns a TaskRef at once.

    ``target`` (a dict or Target) says what the task needs: cpu, mem, gpu, time, mpi,
    nodes, partition/queue, account, qos, constraint, env, directives.
    """
    if fn is not None and not callable(fn):
        raise TargetError("distribute_task takes target=... as a keyword: "
                          "@distribute_task(target={'cpu': 2})")
    checked = Target.of(target)

    def wrap(f: Callable[P, R]) -> RemoteFunction[P, R]:
        if not callable(f):
            raise TargetError(f"distribute_task decorates functions, not {type(f).__name__}")
        return RemoteFunction(f, checked, name)

    return wrap(fn) if fn is not None else wrap


# -- objects ------------------------------------------------------------------------------------
def put(obj: Any) -> ObjectRef:
    """Store `obj` in the current provider's object store; returns an ObjectRef."""
    return current_provider().put(obj)


def _in_jupyter_kernel() -> bool:
    """True inside a Jupyter kernel, where stderr is no terminal but a person watches."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
        return shell is not None and "IPKernelApp" in shell.config
    except Exception:  # noqa: BLE001 - an odd IPython only means: no notebook bar
        return False


def _progress(total: int) -> Any:
    """A progress bar for long gets where a person watches: a terminal, or a notebook
    (tqdm.auto: a widget, or text where ipywidgets is missing); None elsewhere, so logs
    and batch jobs stay clean."""
    if total < 20 or os.environ.get("HPC_SERVERLESS_NO_PROGRESS"):
        return None
    if not (sys.stderr.isatty() or _in_jupyter_kernel()):
        return None
    try:
        with warnings.catch_warnings():
            # without ipywidgets tqdm.auto warns "IProgress not found", then uses text
            warnings.simplefilter("ignore")
            from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="get", unit="task", leave=False, file=sys.stderr)


def _check_timeout(timeout: Any, where: str) -> None:
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or timeout < 0):
        raise HPCServerlessError(f"{where}: timeout must be a number of seconds >= 0 or None, "
                                 f"not {timeout!r}")


def get(refs: Any, timeout: float | None = None) -> Any:
    """The value of a ref, or the values of a list of refs in the same order.

    Works on ObjectRef and TaskRef alike. A task's exception is re-raised with its
    original type. `timeout` (seconds, for the whole call) raises TimeoutError.
    """
    _check_timeout(timeout, "get()")
    if isinstance(refs, (ObjectRef, TaskRef)):
        return _get_one(refs, None if timeout is None else time.monotonic() + timeout, timeout)
    if not isinstance(refs, (list, tuple)):
        raise HPCServerlessError(f"get() takes an ObjectRef, a TaskRef or a list of them, "
                                 f"not {type(refs).__name__}")
    deadline = None if timeout is None else time.monotonic() + timeout
    bar = _progress(len(refs))
    try:
        out = []
        for ref in refs:
            out.append(_get_one(ref, deadline, timeout))
            if bar is not None:
                bar.update(1)
        return out
    finally:
        if bar is not None:
            bar.close()


def _get_one(ref: Any, deadline: float | None, timeout: float | None) -> Any:
    if isinstance(ref, ObjectRef):
        return ref.get()
    if isinstance(ref, TaskRef):
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return ref.result(remaining)
        except GetTimeoutError:
            raise GetTimeoutError(f"get() timed out after {timeout} s waiting for {ref!r}") from None
        except Exception as exc:
            if not hasattr(exc, "remote_traceback"):
                raise
            # the task's own exception: its story is the remote traceback (its __cause__);
            # the frames of our engine between here and where it was unpacked are noise
            # (noqa: it re-raises the same exception, without those frames)
            raise exc.with_traceback(None)  # noqa: B904
    raise HPCServerlessError(f"get() takes ObjectRefs and TaskRefs, not {type(ref).__name__}")


def wait(refs: Sequence[Any], num_returns: int | None = None,
         timeout: float | None = None) -> tuple[list[Any], list[Any]]:
    """Wait until `num_returns` (default: all) refs are done; returns (done, pending).

    Like ``ray.wait``: it does not raise for failed tasks (a failed task is done).
    ObjectRefs are always done. The order of `refs` is kept within each list.
    """
    _check_timeout(timeout, "wait()")
    refs = list(refs)
    want = len(refs) if num_returns is None else num_returns
    if isinstance(want, bool) or not isinstance(want, int):
        raise HPCServerlessError(f"wait(): num_returns must be a whole number, not {num_returns!r}")
    if not 0 <= want <= len(refs):
        raise HPCServerlessError(f"num_returns={num_returns} but there are {len(refs)} refs")
    deadline = None if timeout is None else time.monotonic() + timeout
    groups: dict[str, list[TaskRef]] = {}
    for r in refs:
        if isinstance(r, TaskRef):
            groups.setdefault(r.backend_key, []).append(r)
        elif not isinstance(r, ObjectRef):
            raise HPCServerlessError(f"wait() takes ObjectRefs and TaskRefs, not {type(r).__name__}")
    n_objects = len(refs) - sum(len(g) for g in groups.values())
    done_ids: set[str] = set()
    while True:
        need = max(0, want - n_objects - len(done_ids))
        single = len(groups) == 1
        for group in groups.values():
            pending = [r for r in group if r.task_id not in done_ids]
            if not pending:
                continue
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            # one provider: let it block; several: look at each without blocking, then sleep
            if single:
                done, _ = pending[0]._b().task_wait(pending, min(need, len(pending)), remaining)
            else:
                done, _ = pending[0]._b().task_wait(pending, 0, 0.0)
            done_ids.update(r.task_id for r in done)
        if n_objects + len(done_ids) >= want or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(0.05)
    done_list = [r for r in refs if isinstance(r, ObjectRef) or r.task_id in done_ids]
    pending_list = [r for r in refs if isinstance(r, TaskRef) and r.task_id not in done_ids]
    return done_list, pending_list
