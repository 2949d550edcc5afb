"""A task call as it travels: the function, its arguments, and how to resolve refs.

Both the local pool worker and the code that runs inside a batch job use
:func:`execute`, so a task behaves the same wherever it runs.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Iterator, Mapping, Protocol

from hpc_serverless.core.errors import SerializationError, upstream_failed
from hpc_serverless.core.refs import ObjectRef, TaskRef
from hpc_serverless.core.serialization import dumps, loads, pack_exception, unpack_exception

__all__ = ["TaskFunction", "pack_arguments", "find_task_refs", "resolve_arguments", "execute"]


class TaskFunction(Protocol):
    """What a provider needs of a remote function (the api's RemoteFunction): the function,
    its pickled bytes (made once), a key that names those bytes in the store, and a name
    for job names and messages."""

    function: Callable[..., Any]
    key: str
    name: str

    @property
    def function_bytes(self) -> bytes: ...


def _walk(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Iterator[Any]:
    """Top-level arguments and the items of top-level lists, tuples and dicts."""
    for value in (*args, *kwargs.values()):
        yield value
        if isinstance(value, (list, tuple)):
            yield from value
        elif isinstance(value, dict):
            yield from value.values()


def find_task_refs(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[TaskRef]:
    """The TaskRefs a call depends on (in order, without repeats)."""
    seen: dict[str, TaskRef] = {}
    for v in _walk(args, kwargs):
        if isinstance(v, TaskRef):
            seen.setdefault(v.task_id, v)
    return list(seen.values())


def pack_arguments(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bytes:
    """Pickle (args, kwargs); on failure, name the argument that cannot be pickled."""
    try:
        return dumps((args, dict(kwargs)), what="arguments")
    except SerializationError as whole:
        name = getattr(fn, "__qualname__", "task")
        try:
            bound = inspect.signature(fn).bind_partial(*args, **kwargs)
            items = list(bound.arguments.items())
        except (TypeError, ValueError):
            items = [(f"#{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
        for arg_name, value in items:
            try:
                dumps(value)
            except SerializationError as exc:
                raise SerializationError(
                    f"argument '{arg_name}' of {name}() cannot be sent to a task: "
                    f"{type(value).__name__} is not serializable ({exc.__cause__ or exc})") from exc
        raise whole


def _resolve(value: Any, deps: Mapping[str, Any], cache: dict[str, Any]) -> Any:
    if isinstance(value, TaskRef):
        return deps[value.task_id]
    if isinstance(value, ObjectRef):
        if value.key not in cache:
            cache[value.key] = value.get()
        return cache[value.key]
    return value


def resolve_arguments(args: tuple[Any, ...], kwargs: Mapping[str, Any],
                      deps: Mapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Replace ObjectRefs by their values and TaskRefs by their tasks' values (in `deps`)."""
    cache: dict[str, Any] = {}

    def one(v: Any) -> Any:
        if isinstance(v, (TaskRef, ObjectRef)):
            return _resolve(v, deps, cache)
        if type(v) is list and any(isinstance(x, (TaskRef, ObjectRef)) for x in v):
            return [_resolve(x, deps, cache) for x in v]
        if type(v) is tuple and any(isinstance(x, (TaskRef, ObjectRef)) for x in v):
            return tuple(_resolve(x, deps, cache) for x in v)
        if type(v) is dict and any(isinstance(x, (TaskRef, ObjectRef)) for x in v.values()):
            return {k: _resolve(x, deps, cache) for k, x in v.items()}
        return v

    return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}


def decode_dependencies(raw: Mapping[str, tuple[bool, bytes, str]]) -> dict[str, Any]:
    """Dependency results as shipped (ok, payload, name) to values; a failure raises."""
    out = {}
    for task_id, (ok, payload, name) in raw.items():
        if not ok:
            raise upstream_failed(name or task_id, unpack_exception(payload))
        out[task_id] = loads(payload)
    return out


def execute(fn: Callable[..., Any], args_blob: bytes, deps: Mapping[str, Any],
            env: Mapping[str, str] | None = None) -> tuple[bool, bytes]:
    """Run one call; (True, pickled value) or (False, pickled exception with traceback)."""
    saved: dict[str, str | None] = {}
    try:
        if env:
            for k, v in env.items():
                saved[k] = os.environ.get(k)
                os.environ[k] = v
        args, kwargs = loads(args_blob)
        args, kwargs = resolve_arguments(args, kwargs, deps)
        value = fn(*args, **kwargs)
        name = getattr(fn, "__qualname__", "task")
        return True, dumps(value, what=f"the return value of {name}()")
    except BaseException as exc:  # noqa: BLE001 - the task's own errors go back to the caller
        if isinstance(exc, (KeyboardInterrupt, SystemExit)) and not isinstance(exc, SystemExit):
            raise
        return False, pack_exception(exc)
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old
