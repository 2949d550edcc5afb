"""The transport interface: one method to run a command, plus a count of what ran."""

from __future__ import annotations

import abc
import collections
import shlex
import threading
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        """One line for error messages: the command and what it said."""
        said = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return f"`{shlex.join(self.argv)}` exited {self.returncode}: {' / '.join(said[-3:]) or '(no output)'}"


class Transport(abc.ABC):
    """Runs commands on a site's host. Counts them, so tests can bound scheduler load."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self._count_lock = threading.Lock()

    def run(self, argv: Sequence[str], *, input: str | None = None, timeout: float = 120.0,
            env: dict[str, str] | None = None) -> CommandResult:
        """Run argv (never through a shell); a failure to start raises TransportError."""
        argv = tuple(str(a) for a in argv)
        with self._count_lock:
            self.counts[argv[0].rsplit("/", 1)[-1]] += 1
        return self._run(argv, input=input, timeout=timeout, env=env)

    @abc.abstractmethod
    def _run(self, argv: tuple[str, ...], *, input: str | None, timeout: float,
             env: dict[str, str] | None) -> CommandResult: ...

    def login_blocker(self) -> str | None:
        """Connect now if that needs nobody at a keyboard; else say why not (None: ready).
        Local commands are always ready."""
        return None

    def close(self) -> None:
        """Release connections (nothing to do for local commands)."""

    def describe(self) -> str:
        return type(self).__name__
