"""Remote tracebacks as data, rendered on the client where the user's source is.

A task's traceback is captured where the task ran as plain frames (file, line, function
and a fingerprint of the code), not as text, because the text would be wrong twice over:

* a function that travelled by value (cloudpickle does that for ``__main__``, notebooks
  and scripts) lost its file name on the way: cloudpickle 3.1.3 renames every such code
  object's file to ``<dynamic-code>``, so the compute node cannot say where it came from;
* the compute node often has no copy of the user's source, so it cannot show the line.

So the client remembers, when it pickles a task function, which file each of its code
objects came from (:func:`remember`), keyed by a fingerprint that survives pickling
(name, first line, a hash of the bytecode). When the traceback comes back,
:func:`render` maps frames back to those files and fills in the failing line's text from
the client's copy of the file. Frames of code the compute node imported normally keep
the node's path and the line text the node read.

Runs on both sides and imports nothing else of the package (it sits in the core layer).
"""

from __future__ import annotations

import hashlib
import linecache
import os
import threading
import traceback
import types
from dataclasses import dataclass
from typing import Any, Iterator

__all__ = ["Frame", "Section", "capture", "remember", "render", "source_of"]

_CAUSE = "The above exception was the direct cause of the following exception:"
_CONTEXT = "During handling of the above exception, another exception occurred:"
_MAX_CHAIN = 8          # exceptions followed through __cause__ / __context__
_MAX_FRAMES = 200       # per exception: deep recursion keeps its innermost frames
_MAX_CODES = 5000       # code objects indexed per remembered function

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


@dataclass(frozen=True)
class Frame:
    """One frame of a remote traceback, as plain data."""

    filename: str           # as the running process saw it ("<dynamic-code>" for by-value code)
    lineno: int
    name: str               # the function's name
    line: str | None        # the line's text, where the running process could read its file
    code_key: str | None    # fingerprint of the code object (see code_key)


@dataclass(frozen=True)
class Section:
    """One exception of a chain: its frames, its ``Type: message`` lines, and the text
    that leads from it to the next exception (None for the last)."""

    frames: tuple[Frame, ...]
    exception: tuple[str, ...]
    link: str | None = None


def code_key(code: types.CodeType) -> str:
    """A fingerprint of a code object that survives pickling by value.

    cloudpickle keeps the name, the first line and the bytecode (it replaces the file
    name), so these three tell the code objects of one program apart.
    """
    digest = hashlib.blake2b(code.co_code, digest_size=8).hexdigest()
    return f"{code.co_name}:{code.co_firstlineno}:{digest}"


# -- capture: where the task ran --------------------------------------------------------------
def _ours(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_PACKAGE_DIR)


def _frames(tb: types.TracebackType | None) -> tuple[Frame, ...]:
    frames = []
    for frame, lineno in traceback.walk_tb(tb):
        code = frame.f_code
        line = linecache.getline(code.co_filename, lineno, frame.f_globals).strip() or None
        frames.append(Frame(code.co_filename, lineno or 0, code.co_name, line, code_key(code)))
    # the frames of our own worker that called the task are noise to the user: start at
    # the first frame of the user's code (keep everything if there is none)
    first_user = next((i for i, f in enumerate(frames) if not _ours(f.filename)), 0)
    frames = frames[first_user:]
    if len(frames) > _MAX_FRAMES:
        frames = frames[:_MAX_FRAMES // 2] + frames[-_MAX_FRAMES // 2:]
    return tuple(frames)


def _exception_lines(exc: BaseException) -> tuple[str, ...]:
    try:
        return tuple(traceback.format_exception_only(type(exc), exc))
    except Exception:  # noqa: BLE001 - a broken __str__ must not lose the traceback
        return (f"{type(exc).__module__}.{type(exc).__qualname__}: <unprintable>\n",)


def capture(exc: BaseException) -> tuple[Section, ...]:
    """The exception and the ones chained to it (oldest first, as Python prints them).

    An exception that itself came back from another task (a nested task's, re-raised by
    ``get``) carries that task's sections; they are kept, followed by the frames here.
    """
    chain: list[tuple[BaseException, str | None]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    link: str | None = None
    while current is not None and id(current) not in seen and len(chain) < _MAX_CHAIN:
        seen.add(id(current))
        chain.append((current, link))
        if getattr(current, "remote_sections", None):
            break  # its cause is its remote traceback, already in remote_sections
        if current.__cause__ is not None:
            current, link = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, _CONTEXT
        else:
            current = None
    # each section carries the text printed after it: the link of the exception it caused
    sections: list[Section] = []
    for item, item_link in reversed(chain):
        remote = getattr(item, "remote_sections", None)
        if remote:
            sections.extend(remote[:-1])
            last = remote[-1]
            if item.__traceback__ is None:  # never raised here (a dependency's failure)
                sections.append(Section(last.frames, last.exception, item_link))
                continue
            sections.append(Section(last.frames, last.exception, _CAUSE))
        sections.append(Section(_frames(item.__traceback__), _exception_lines(item), item_link))
    return tuple(sections)


# -- the client's memory of where by-value code came from -------------------------------------
_sources: dict[str, str] = {}
_sources_lock = threading.Lock()


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _reachable_functions(fn: Any) -> Iterator[types.FunctionType]:
    """`fn` and the functions it reaches through globals, closures and classes of its own
    module (what cloudpickle sends along by value), without entering installed packages."""
    module = getattr(fn, "__module__", None)
    seen: set[int] = set()
    todo: list[Any] = [fn]
    while todo and len(seen) < _MAX_CODES:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, type):
            if obj.__module__ in (module, "__main__"):
                todo.extend(vars(obj).values())
            continue
        if isinstance(obj, (staticmethod, classmethod)):
            todo.append(obj.__func__)
            continue
        if isinstance(obj, property):
            todo.extend(f for f in (obj.fget, obj.fset, obj.fdel) if f is not None)
            continue
        func = getattr(obj, "__wrapped__", None) if not isinstance(obj, types.FunctionType) else obj
        if not isinstance(func, types.FunctionType):
            continue
        if func is not fn and func.__module__ not in (module, "__main__"):
            continue
        yield func
        names = {n for c in _codes(func.__code__) for n in c.co_names}
        todo.extend(func.__globals__[n] for n in names if n in func.__globals__)
        for cell in func.__closure__ or ():
            try:
                todo.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
        todo.extend(func.__defaults__ or ())


def remember(fn: Any) -> None:
    """Note which file each code object of `fn` (and what it sends along) came from.

    Called when a task function is pickled on the client; cheap (a walk over code
    objects), and bounded.
    """
    found: dict[str, str] = {}
    for func in _reachable_functions(fn):
        for code in _codes(func.__code__):
            name = code.co_filename
            if name and not (name.startswith("<") and name.endswith(">")):
                found[code_key(code)] = name
            elif name == "<dynamic-code>":
                # this process runs a task itself and got this code by value: pass on what
                # it was told, if anything
                known = _sources.get(code_key(code))
                if known:
                    found[code_key(code)] = known
            elif name:
                found[code_key(code)] = name  # a notebook cell ("<ipython-input-...>"): linecache knows it here
    with _sources_lock:
        _sources.update(found)


def source_of(frame: Frame) -> str:
    """The file a frame's code came from, as this process knows it."""
    if frame.code_key is not None:
        known = _sources.get(frame.code_key)
        if known:
            return known
    return frame.filename


# -- render: on the client ---------------------------------------------------------------------
def _line_here(filename: str, lineno: int) -> str | None:
    try:
        return linecache.getline(filename, lineno).strip() or None
    except Exception:  # noqa: BLE001 - an unreadable file: show the frame without its text
        return None


def render(sections: tuple[Section, ...]) -> str:
    """The traceback as Python would print it, with by-value frames named by the file they
    came from and the failing lines read from the client's copy where the task's side
    could not read them."""
    out: list[str] = []
    for section in sections:
        if section.frames:
            out.append("Traceback (most recent call last):\n")
        for frame in section.frames:
            filename = source_of(frame)
            out.append(f'  File "{filename}", line {frame.lineno}, in {frame.name}\n')
            mapped = filename != frame.filename
            line = (_line_here(filename, frame.lineno) if mapped or not frame.line else frame.line)
            if line:
                out.append(f"    {line}\n")
        out.extend(section.exception)
        if section.link:
            out.append(f"\n{section.link}\n\n")
    return "".join(out)
