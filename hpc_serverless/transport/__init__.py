"""Transports run argv and move files on a site's host: here (subprocess) or over SSH.

Schedulers build argv and parse text; they never touch a process or a socket.
"""

from .base import CommandResult, Transport
from .local import LocalTransport
from .mock import MockTransport

__all__ = ["CommandResult", "LocalTransport", "MockTransport", "Transport", "connect"]


def connect(site: "object", *, password: str | None = None) -> Transport:
    """The transport for a site: local commands without a host, SSH with one."""
    host = getattr(site, "host", None)
    if host is None:
        return LocalTransport()
    from ..errors import ConfigError

    raise ConfigError(f"site '{getattr(site, 'name', '?')}' has host {host!r}, and remote sites "
                      "(SSH) are not supported in this version yet")
