"""Turning Python objects into bytes and back, in one place.

cloudpickle handles functions defined in ``__main__`` and notebooks; pickle protocol 5
moves large contiguous buffers (numpy arrays) out of band, so the store can write them
straight to disk without a copy.
"""

from __future__ import annotations

import pickle
import sys
from typing import Any, Callable

from hpc_serverless.core.errors import RemoteTaskError, RemoteTraceback, SerializationError
from hpc_serverless.core.tracebacks import capture, remember

PROTOCOL = 5


def _cloudpickle() -> Any:
    import cloudpickle  # core dependency; imported on first use to keep import light

    return cloudpickle


def dumps(obj: Any, *, what: str = "object") -> bytes:
    """Pickle `obj` (cloudpickle: __main__ classes travel by value); `what` names it in the error (e.g. "argument 'x' of f")."""
    try:
        return _cloudpickle().dumps(obj, protocol=PROTOCOL)
    except Exception as exc:
        raise SerializationError(f"cannot serialize {what} ({type(obj).__name__}): {exc}") from exc


def dumps_oob(obj: Any, *, what: str = "object") -> tuple[bytes, list[pickle.PickleBuffer]]:
    """Pickle `obj` keeping large contiguous buffers out of band (zero copy)."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        data = _cloudpickle().dumps(obj, protocol=PROTOCOL, buffer_callback=buffers.append)
    except Exception as exc:
        raise SerializationError(f"cannot serialize {what} ({type(obj).__name__}): {exc}") from exc
    return data, buffers


def loads(data: bytes | bytearray | memoryview, buffers: Any = None) -> Any:
    """Unpickle; a failure names the likely cause (version skew between the two sides)."""
    try:
        return pickle.loads(data, buffers=buffers)
    except Exception as exc:
        raise SerializationError(
            f"cannot deserialize a stored value: {type(exc).__name__}: {exc}. This usually "
            "means the Python or package versions differ between where it was written and "
            f"here (this side: Python {sys.version.split()[0]})") from exc


def function_bytes(fn: Callable[..., Any]) -> bytes:
    """Pickle a task function by value where needed (cloudpickle handles __main__)."""
    remember(fn)  # so this process can name the file of its frames in a remote traceback
    try:
        return _cloudpickle().dumps(fn, protocol=PROTOCOL)
    except Exception as exc:
        name = getattr(fn, "__qualname__", repr(fn))
        raise SerializationError(f"cannot serialize task function {name}: {exc}") from exc


def pack_exception(exc: BaseException, _depth: int = 0) -> bytes:
    """The exception with its traceback as data (and its cause), pickled for the other side.

    If the exception itself cannot be pickled (or unpickled), it is replaced by a
    RemoteTaskError that keeps its type name and message.
    """
    sections = capture(exc)
    cause = exc.__cause__
    cause_blob = None
    if cause is not None and not isinstance(cause, RemoteTraceback) and _depth < 3:
        cause_blob = pack_exception(cause, _depth + 1)
    exc.__traceback__ = None
    try:
        blob = _cloudpickle().dumps(exc, protocol=PROTOCOL)
        pickle.loads(blob)  # an exception whose __init__ takes other args fails here
    except Exception:  # noqa: BLE001 - any failure means: send a stand-in instead
        blob = _cloudpickle().dumps(
            RemoteTaskError(f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"), protocol=PROTOCOL)
    return pickle.dumps((blob, sections, cause_blob), protocol=PROTOCOL)


def unpack_exception(data: bytes) -> BaseException:
    """The original exception. Its ``__cause__`` is the remote traceback, or, if it was
    raised from another exception, that exception (whose cause is its own traceback).

    The traceback is rendered here, so frames of by-value code name the file this process
    pickled them from. The full text is also in the ``remote_traceback`` attribute.
    """
    blob, sections, cause_blob = pickle.loads(data)
    try:
        exc = pickle.loads(blob)
    except Exception as err:  # noqa: BLE001 - a class missing on this side, or a broken __init__
        exc = RemoteTaskError(f"a task raised an exception that cannot be loaded here ({err})")
    remote = RemoteTraceback(sections)
    exc.__cause__ = unpack_exception(cause_blob) if cause_blob is not None else remote
    for name, value in (("remote_sections", remote.sections), ("remote_traceback", remote.tb)):
        try:
            setattr(exc, name, value)
        except AttributeError:  # an exception type with __slots__
            pass
    return exc
