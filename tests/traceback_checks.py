"""Checks that a remote traceback names the user's file, line and the line's text."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable


def line_of(fn: Callable[..., Any], marker: str) -> tuple[str, int, str]:
    """(file, line number, stripped text) of the first line of `fn`'s source holding `marker`."""
    fn = getattr(fn, "function", fn)  # a RemoteFunction wraps the user's function
    path = inspect.getsourcefile(fn)
    assert path is not None
    lines, first = inspect.getsourcelines(fn)
    for offset, text in enumerate(lines):
        if marker in text:
            return str(Path(path)), first + offset, text.strip()
    raise AssertionError(f"{marker!r} is not in the source of {fn.__qualname__}")


def assert_user_frame(traceback_text: str, fn: Callable[..., Any], marker: str) -> None:
    """The traceback has `File "<fn's file>", line N, in <fn's name>` and then line N's text."""
    path, lineno, text = line_of(fn, marker)
    name = getattr(fn, "function", fn).__name__
    expected = f'  File "{path}", line {lineno}, in {name}\n    {text}\n'
    assert expected in traceback_text, f"expected\n{expected}in the remote traceback:\n{traceback_text}"
    assert "<dynamic-code>" not in traceback_text, traceback_text
