"""A transport that answers with a function: for tests of what cannot run here.

    t = MockTransport(lambda argv, input: (0, "Submitted batch job 42\\n", ""))
"""

from __future__ import annotations

from typing import Callable

from hpc_serverless.adapters.transport.base import CommandResult, Transport

Handler = Callable[[tuple[str, ...], "str | None"], "tuple[int, str, str]"]


class MockTransport(Transport):
    def __init__(self, handler: Handler) -> None:
        super().__init__()
        self.handler = handler
        self.calls: list[tuple[str, ...]] = []

    def _run(self, argv: tuple[str, ...], *, input: str | None, timeout: float,
             env: dict[str, str] | None) -> CommandResult:
        self.calls.append(argv)
        code, out, err = self.handler(argv, input)
        return CommandResult(argv, code, out, err)
