"""The one place the SSH modules import paramiko, and what they share about it.

paramiko stays optional: this module imports without it, and :func:`require_paramiko`
turns its absence into a ConfigError when a site with a host is first used.

Everything is paramiko's public surface except two attributes that its documentation
does not list (neither is underscored, and both have been stable for a decade); they are
read here and nowhere else, and tests/unit/test_ssh_paramiko.py checks they still exist:

* ``Channel.status_event``: waiting for a command's exit status with a timeout
  (``recv_exit_status()`` has none);
* ``Transport.sock``: the local port of a connection (the tests use it to find the sshd
  process that serves it).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from hpc_serverless.core.errors import ConfigError

try:  # imported only for sites with a host; paramiko stays optional
    import paramiko
except ImportError:  # pragma: no cover - exercised by monkeypatching in the tests
    paramiko = None  # type: ignore[assignment]  # ConfigError at the first SSHTransport

__all__ = ["PARAMIKO_LOG", "SSH_ERRORS", "ChannelsBusy", "ConnectionLost", "exit_status_within",
           "local_port", "paramiko", "prefer", "require_paramiko", "settle", "short"]

#: what a paramiko call on a connection or channel raises when the other end goes away
SSH_ERRORS: tuple[type[BaseException], ...] = (
    (EOFError, OSError) + ((paramiko.SSHException,) if paramiko is not None else ()))

# paramiko logs a dropped socket at ERROR; we handle drops, so its records go under our
# logger (visible to whoever configures logging) instead of Python's last-resort stderr.
PARAMIKO_LOG = "hpc_serverless.adapters.transport.ssh.paramiko"
logging.getLogger(PARAMIKO_LOG).addHandler(logging.NullHandler())


def require_paramiko() -> None:
    """Say how to install paramiko, at the first use of a site with a host."""
    if paramiko is None:
        raise ConfigError("sites with a 'host' are reached over SSH, which needs paramiko: "
                          "pip install 'hpc-serverless[ssh]'")


class ConnectionLost(Exception):
    """The connection went away before the step took effect: retry."""


class ChannelsBusy(Exception):
    """The server refused a new channel on a live connection (MaxSessions): wait, retry."""


def settle(t: Any, wait: float = 1.0) -> None:
    """After an error, give paramiko's thread a moment to notice a dead connection."""
    end = time.monotonic() + wait
    while t.is_active() and time.monotonic() < end:
        time.sleep(0.01)


def prefer(t: Any, option: str, wanted: list[str]) -> None:
    """Move `wanted` (those the Transport offers) to the front of one of its security
    options ("ciphers", "key_types"), keeping the order of the rest: a preference, never a
    restriction, so a server without them negotiates as before."""
    opts = t.get_security_options()
    offered = list(getattr(opts, option))
    first = [a for a in wanted if a in offered]
    setattr(opts, option, tuple(first + [a for a in offered if a not in first]))


def exit_status_within(chan: Any, timeout: float) -> bool:
    """Wait up to `timeout` for the channel's exit status; False when it did not come."""
    return bool(chan.status_event.wait(max(0.0, timeout)))


def local_port(t: Any) -> int | None:
    """The local TCP port of a paramiko.Transport (None when it has no socket)."""
    sock = getattr(t, "sock", None) if t is not None else None
    try:
        return int(sock.getsockname()[1]) if sock is not None else None
    except (OSError, AttributeError, TypeError, IndexError):
        return None


def short(command: str, limit: int = 200) -> str:
    """A command line cut for an error message."""
    return command if len(command) <= limit else command[:limit] + "..."
