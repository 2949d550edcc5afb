"""Transports run argv and move files on a site's host: here (subprocess) or over SSH.

Schedulers build argv and parse text; they never touch a process or a socket.
"""

from .base import CommandResult, Transport
from .local import LocalTransport
from .mock import MockTransport

__all__ = ["CommandResult", "LocalTransport", "MockTransport", "Transport", "connect"]


def connect(site: "object", *, password: str | None = None) -> Transport:
    """The transport for a site: local commands without a host, SSH with one."""
    if getattr(site, "host", None) is None:
        return LocalTransport()
    from .ssh import SSHTransport  # paramiko is imported only for sites with a host

    extra = {k: getattr(site, k) for k in ("known_hosts", "ssh_config") if getattr(site, k, None)}
    return SSHTransport.from_site(site, password=password, **extra)
