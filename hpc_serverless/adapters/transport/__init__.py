"""Transports run argv and move files on a site's host: here (subprocess) or over SSH.

Schedulers build argv and parse text; they never touch a process or a socket.
"""

from hpc_serverless.adapters.transport.base import CommandResult, Transport
from hpc_serverless.adapters.transport.local import LocalTransport
from hpc_serverless.adapters.transport.mock import MockTransport

__all__ = ["CommandResult", "LocalTransport", "MockTransport", "Transport", "connect"]


def connect(site: "object", *, password: str | None = None) -> Transport:
    """The transport for a site: local commands without a host, SSH with one."""
    if getattr(site, "host", None) is None:
        return LocalTransport()
    from hpc_serverless.adapters.transport.ssh import (
        SSHTransport,  # paramiko is imported only for sites with a host
    )

    extra = {k: getattr(site, k) for k in ("known_hosts", "ssh_config") if getattr(site, k, None)}
    return SSHTransport.from_site(site, password=password, **extra)
