"""Where to connect: a host alias resolved through ~/.ssh/config into a route of hops.

A route is the list of SSH connections to open, jump hosts first and the site last, each
with what OpenSSH would use for it: HostName, User, Port, IdentityFile, IdentitiesOnly,
ProxyJump (chains too), ProxyCommand, UserKnownHostsFile, GlobalKnownHostsFile,
HostKeyAlias, StrictHostKeyChecking=accept-new, ServerAliveInterval, Compression.
Arguments given to SSHTransport win over the file, for the site's hop only.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from typing import Any

from hpc_serverless.adapters.transport.ssh_paramiko import paramiko
from hpc_serverless.core.errors import ConfigError

__all__ = ["Hop", "resolve_route"]

_USER_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
_SYSTEM_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
#: the longest ProxyJump chain followed; a longer one is most likely a loop in the config
_MAX_HOPS = 10


@dataclass
class Hop:
    """One SSH connection of the route (jump hosts first, the site last)."""

    alias: str
    hostname: str
    port: int
    username: str
    key_files: list[str]
    explicit_keys: list[str]
    identities_only: bool
    known_hosts: list[str]
    system_known_hosts: list[str]
    hostkey_alias: str | None
    proxy_command: str | None
    trust_new: bool
    keepalive: int
    compression: bool
    password: str | None = None

    def describe(self) -> str:
        return f"{self.username}@{self.hostname}:{self.port}"

    @property
    def key_name(self) -> str:
        """The name of this host in known_hosts: `host`, or `[host]:port` off port 22."""
        name = self.hostkey_alias or self.hostname
        return name if self.port == 22 else f"[{name}]:{self.port}"


def _load_ssh_config(path: str | None) -> Any:
    """The ssh config named (which must exist), else ~/.ssh/config if there is one."""
    explicit = path is not None
    full = os.path.expanduser(path or "~/.ssh/config")
    if not os.path.exists(full):
        if explicit:
            raise ConfigError(f"ssh config file {full} does not exist")
        return paramiko.SSHConfig()
    try:
        return paramiko.SSHConfig.from_path(full)
    except (OSError, ValueError, paramiko.SSHException) as exc:
        raise ConfigError(f"cannot read the ssh config {full}: {exc}") from exc


def _parse_jumps(value: str | None, source: str) -> list[tuple[str, str | None, int | None]]:
    """ProxyJump `[user@]host[:port],...` (ssh:// URIs and [v6]:port too)."""
    if not value or value.strip().lower() == "none":
        return []
    jumps = []
    for raw in value.split(","):
        part = raw.strip().removeprefix("ssh://")
        user = None
        if "@" in part:
            user, part = part.rsplit("@", 1)
        port: int | None = None
        try:
            if part.startswith("["):
                host, _, rest = part[1:].partition("]")
                if rest.startswith(":"):
                    port = int(rest[1:])
            elif part.count(":") == 1:
                host, p = part.split(":")
                port = int(p)
            else:
                host = part
        except ValueError:
            raise ConfigError(f"ProxyJump {value!r} in {source}: bad port in {raw.strip()!r}") from None
        if not host:
            raise ConfigError(f"ProxyJump {value!r} in {source}: empty host in {raw.strip()!r}")
        jumps.append((host, user or None, port))
    return jumps


def _files(value: str | None) -> list[str]:
    return [os.path.expanduser(p) for p in (value or "").split()]


def resolve_route(host: str, *, port: int | None, username: str | None, password: str | None,
                  key_files: list[str], known_hosts: str | None, trust: bool,
                  ssh_config: str | None) -> list[Hop]:
    """The hops to `host` (an alias of the ssh config, or a host name), jump hosts first."""
    config = _load_ssh_config(ssh_config)
    source = ssh_config or "~/.ssh/config"

    def lookup(alias: str) -> Any:
        try:
            return config.lookup(alias)
        except (ValueError, KeyError, OSError, paramiko.SSHException) as exc:
            raise ConfigError(f"{source}: cannot resolve host {alias!r}: {exc}") from exc

    def route(alias: str, port: int | None, user: str | None, jumps: list[Any] | None,
              depth: int, target: bool) -> list[Hop]:
        if depth > _MAX_HOPS:
            raise ConfigError(f"{source}: ProxyJump chain of {host!r} is longer than {_MAX_HOPS} "
                              "hops (a loop?)")
        o = lookup(alias)
        try:
            resolved_port = port or int(o.get("port", 22))
        except ValueError:
            raise ConfigError(f"{source}: bad Port {o.get('port')!r} for host {alias!r}") from None
        files = list(o.get("identityfile", []))
        strict = str(o.get("stricthostkeychecking", "")).lower()
        try:
            keepalive = int(o.get("serveraliveinterval", 30)) or 30
        except ValueError:
            keepalive = 30
        hop = Hop(
            alias=alias,
            hostname=o.get("hostname", alias),
            port=resolved_port,
            username=user or o.get("user") or getpass.getuser(),
            key_files=(key_files if target else []) + [os.path.expanduser(f) for f in files],
            explicit_keys=key_files if target else [],
            identities_only=str(o.get("identitiesonly", "no")).lower() == "yes",
            known_hosts=([os.path.expanduser(known_hosts)] if known_hosts
                         else _files(o.get("userknownhostsfile")) or
                         [os.path.expanduser(p) for p in _USER_KNOWN_HOSTS]),
            system_known_hosts=_files(o.get("globalknownhostsfile")) or list(_SYSTEM_KNOWN_HOSTS),
            hostkey_alias=o.get("hostkeyalias"),
            proxy_command=None,
            trust_new=trust or strict in ("accept-new", "no", "off"),
            keepalive=keepalive,
            compression=str(o.get("compression", "no")).lower() == "yes",
            password=password if target else None,
        )
        hops = jumps if jumps is not None else _parse_jumps(o.get("proxyjump"), source)
        if not hops:
            command = o.get("proxycommand")
            if command and command.strip().lower() != "none":
                hop.proxy_command = command
            return [hop]
        *before, (jalias, juser, jport) = hops
        return route(jalias, jport, juser, before or None, depth + 1, False) + [hop]

    return route(host, port, username, None, 0, True)
