"""Commands on this machine (a login node): plain subprocess, no shell."""

from __future__ import annotations

import os
import subprocess

from hpc_serverless.adapters.transport.base import CommandResult, Transport
from hpc_serverless.core.errors import TransportError


class LocalTransport(Transport):
    def _run(self, argv: tuple[str, ...], *, input: str | None, timeout: float,
             env: dict[str, str] | None) -> CommandResult:
        full_env = None if env is None else {**os.environ, **env}
        try:
            proc = subprocess.run(argv, input=input, capture_output=True, text=True,
                                  timeout=timeout, env=full_env)
        except FileNotFoundError:
            raise TransportError(f"command {argv[0]!r} not found on this machine: is this a "
                                 "login node of the cluster (or should the site have a 'host')?") from None
        except subprocess.TimeoutExpired:
            raise TransportError(f"`{' '.join(argv)}` did not answer within {timeout:.0f} s") from None
        except OSError as exc:
            raise TransportError(f"cannot run {argv[0]!r}: {exc}") from exc
        return CommandResult(argv, proc.returncode, proc.stdout, proc.stderr)

    def describe(self) -> str:
        return "this machine"
