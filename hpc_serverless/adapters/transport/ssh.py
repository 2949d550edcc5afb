"""One SSH connection to a site's login node (paramiko): commands, and the agent's channel.

    t = SSHTransport("login.example.org", username="alice")
    t.run(["squeue", "-h", "-u", "alice"])
    chan = t.open_stream("exec python3 -m hpc_serverless.agent")   # what a RemoteProvider does

It behaves as OpenSSH's ``ssh`` would, so a site that works from a terminal works here.
This module holds the connection's life (open every hop, reconnect, retry, close); the
parts live next to it:

* ssh_routes: ``~/.ssh/config`` (or ``ssh_config=``) and ProxyJump chains into a route
  of hops, each hop's ``direct-tcpip`` channel being the socket of the next;
* known_hosts: known_hosts files and the host-key policy (unknown keys refused unless
  ``trust_unknown_hosts``, changed keys always refused);
* ssh_auth: keys, ssh-agent, password, keyboard-interactive (one-time codes);
* ssh_channels: each command on its own channel (they may run concurrently), stdin fed,
  stdout and stderr read together, and the agent's long-lived channel;
* ssh_paramiko: the one import of paramiko and what the others share about it.

A dropped connection is reopened with exponential backoff and the interrupted step is
retried, unless a command had already started: that is reported (TransportError,
transient), never run twice. Every user value reaches the remote shell quoted
(``shlex.join``). Passwords and answers are never logged.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from hpc_serverless.adapters.transport.base import CommandResult, Transport
from hpc_serverless.adapters.transport.known_hosts import (
    check_host_key,
    fingerprint,
    prefer_known_key_types,
    read_known_hosts,
)
from hpc_serverless.adapters.transport.ssh_auth import InteractiveHandler, authenticate, terminal_prompt
from hpc_serverless.adapters.transport.ssh_channels import Channels, command_line
from hpc_serverless.adapters.transport.ssh_paramiko import (
    PARAMIKO_LOG,
    SSH_ERRORS,
    ChannelsBusy,
    ConnectionLost,
    local_port,
    paramiko,
    prefer,
    require_paramiko,
    settle,
    short,
)
from hpc_serverless.adapters.transport.ssh_routes import Hop, resolve_route
from hpc_serverless.core.errors import AuthenticationError, ConfigError, HostKeyError, TransportError

__all__ = ["InteractiveHandler", "SSHTransport", "fingerprint", "terminal_prompt"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: SSH flow-control window per channel (room for a put's bytes in flight over a long
#: round trip), and the largest packet we accept (big packets cost Python less per byte)
_WINDOW_BYTES = 8 * 1024 * 1024
_MAX_PACKET = 256 * 1024


def _backoff(first: float, attempt: int) -> None:
    """Sleep before the attempt-th retry: first, then twice as long each time."""
    time.sleep(first * 2 ** (attempt - 1))


class SSHTransport(Transport):
    """Runs commands on `host` over one SSH connection, reopened if it drops.

    It connects on first use (or :meth:`open`). `port=None` and `username=None` mean "from
    ~/.ssh/config, else 22 and the local user name". `key_filename` is one path or a list.
    """

    def __init__(self, host: str, *, port: int | None = None, username: str | None = None,
                 password: str | None = None, key_filename: str | Sequence[str] | None = None,
                 trust_unknown_hosts: bool = False, known_hosts: str | None = None,
                 ssh_config: str | None = None, interactive_handler: InteractiveHandler | None = None,
                 connect_timeout: float = 20.0, max_retries: int = 5, allow_agent: bool = True,
                 look_for_keys: bool = True) -> None:
        super().__init__()
        require_paramiko()
        if not host or not isinstance(host, str):
            raise ConfigError(f"SSH host must be a non-empty string, not {host!r}")
        self.host = host
        self.connect_timeout = float(connect_timeout)
        self.max_retries = max(1, int(max_retries))
        self.allow_agent = allow_agent
        self.look_for_keys = look_for_keys
        self.interactive_handler: InteractiveHandler = interactive_handler or terminal_prompt
        keys = [key_filename] if isinstance(key_filename, (str, os.PathLike)) else list(key_filename or ())
        self._route: list[Hop] = resolve_route(
            host, port=port, username=username, password=password,
            key_files=[os.path.expanduser(str(k)) for k in keys], known_hosts=known_hosts,
            trust=trust_unknown_hosts, ssh_config=ssh_config)
        target = self._route[-1]
        self.port, self.username = target.port, target.username
        self._lock = threading.RLock()          # (re)connection
        self._channels = Channels()
        self._transport: Any = None
        self._jumps: list[Any] = []
        self._ever_connected = False
        #: how many connections were opened (1 + reconnections), and how long the last took
        self.connections = 0
        self.connect_seconds: float | None = None
        #: the methods that logged us in to the site ("publickey", "password", ...)
        self.authenticated_with: list[str] = []

    @classmethod
    def from_site(cls, site: Any, password: str | None = None, **kwargs: Any) -> SSHTransport:
        """The transport for a :class:`~hpc_serverless.config.site.Site` with a host (port 22
        there means "the default", so ~/.ssh/config may still name another)."""
        if getattr(site, "host", None) is None:
            raise ConfigError(f"site '{getattr(site, 'name', '?')}' has no host to connect to")
        port = getattr(site, "port", 22)
        return cls(site.host, port=None if port in (None, 22) else port,
                   username=getattr(site, "username", None), password=password,
                   key_filename=getattr(site, "key_filename", None),
                   trust_unknown_hosts=bool(getattr(site, "trust_unknown_hosts", False)), **kwargs)

    @property
    def route(self) -> list[str]:
        """user@host:port of every connection on the way, jump hosts first."""
        return [hop.describe() for hop in self._route]

    @property
    def connection(self) -> Any:
        """The live paramiko.Transport to the site (None before the first use)."""
        return self._transport

    @property
    def jump_connections(self) -> list[Any]:
        """The paramiko.Transports to the ProxyJump hosts, in order."""
        return list(self._jumps)

    def describe(self) -> str:
        return f"{self.username}@{self.host}:{self.port}"

    def __repr__(self) -> str:
        via = f" via {', '.join(self.route[:-1])}" if len(self._route) > 1 else ""
        return f"<SSHTransport {self.describe()}{via}>"

    def __enter__(self) -> SSHTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connection ----------------------------------------------------------------------
    def open(self) -> SSHTransport:
        """Connect now (otherwise the first command does); returns self."""
        self._connection()
        return self

    def login_blocker(self) -> str | None:
        """Connect with keys, the agent or a configured password only; if the server wants
        a typed answer (password, one-time code), say so instead of asking for it."""
        t = self._transport
        if t is not None and t.is_active():
            return None
        asked: list[str] = []

        def refuse(title: str, instructions: str, prompts: list[tuple[str, bool]]) -> list[str]:
            asked.extend(text for text, _ in prompts)
            raise AuthenticationError("a typed answer is needed")

        with self._lock:
            handler, self.interactive_handler = self.interactive_handler, refuse
            try:
                self.open()
            except AuthenticationError as exc:
                if asked:
                    return (f"not connected, and logging in to {self.describe()} asks for "
                            f"{asked[0].strip().rstrip(':') or 'a password or code'}")
                return f"not connected: {str(exc).splitlines()[0]}"
            except TransportError as exc:
                return f"cannot connect: {str(exc).splitlines()[0]}"
            finally:
                self.interactive_handler = handler
        return None

    def _connection(self) -> Any:
        t = self._transport
        if t is not None and t.is_active():
            return t
        return self._reconnect(t)

    def _reconnect(self, dead: Any) -> Any:
        with self._lock:
            t = self._transport
            if t is not None and t is not dead and t.is_active():
                return t  # another thread reconnected already
            first = not self._ever_connected
            self._drop()
            attempts = 1 if first else self.max_retries
            start = time.monotonic()
            last: TransportError | None = None
            for i in range(attempts):
                if i:
                    _backoff(0.5, i)
                try:
                    self._open_route()
                except (HostKeyError, AuthenticationError):
                    raise
                except TransportError as exc:
                    last = exc
                    log.info("connecting to %s failed (attempt %d of %d): %s", self.describe(),
                             i + 1, attempts, exc)
                    continue
                if not first:
                    log.info("reconnected to %s after %.1f s", self.describe(), time.monotonic() - start)
                self._ever_connected = True
                return self._transport
            assert last is not None
            if first:
                raise last
            raise TransportError(
                f"lost the connection to {self.describe()} and could not reconnect "
                f"({attempts} attempts over {time.monotonic() - start:.1f} s): {last}") from last

    def _open_route(self) -> None:
        start = time.monotonic()
        opened: list[Any] = []
        try:
            for i, hop in enumerate(self._route):
                opened.append(self._open_hop(hop, opened[-1] if opened else None,
                                             self._route[i - 1].describe() if i else ""))
        except BaseException:
            for t in reversed(opened):
                t.close()
            raise
        self._jumps, self._transport = opened[:-1], opened[-1]
        self.connections += 1
        self.connect_seconds = time.monotonic() - start
        log.debug("connected to %s in %.2f s", " -> ".join(self.route), self.connect_seconds)

    def _open_hop(self, hop: Hop, via: Any, via_name: str) -> Any:
        """One logged-in paramiko.Transport to `hop`, through the connection `via` if any."""
        where = f"{hop.hostname} port {hop.port}"
        through = f" through the jump host {via_name}" if via is not None else ""
        try:
            if via is not None:
                sock = via.open_channel("direct-tcpip", (hop.hostname, hop.port), ("127.0.0.1", 0),
                                        timeout=self.connect_timeout)
            elif hop.proxy_command:
                sock = paramiko.ProxyCommand(hop.proxy_command)
            else:
                sock = socket.create_connection((hop.hostname, hop.port), timeout=self.connect_timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except socket.gaierror as exc:
            err = TransportError(f"cannot resolve the host name {hop.hostname!r}: {exc}")
            err.transient = False
            raise err from exc
        except (OSError, paramiko.SSHException) as exc:
            raise TransportError(f"cannot connect to {where}{through}: {exc}") from exc
        t = paramiko.Transport(sock, default_window_size=_WINDOW_BYTES, default_max_packet_size=_MAX_PACKET)
        try:
            _prefer_aead(t)
            t.set_log_channel(PARAMIKO_LOG)
            t.use_compression(hop.compression)
            known = read_known_hosts(hop.system_known_hosts + hop.known_hosts)
            prefer_known_key_types(t, hop, known)
            try:
                t.start_client(timeout=self.connect_timeout)
            except SSH_ERRORS as exc:
                raise TransportError(f"SSH handshake with {where}{through} failed: {exc}") from exc
            check_host_key(t, hop, known)
            used = authenticate(t, hop, self.interactive_handler, allow_agent=self.allow_agent,
                                look_for_keys=self.look_for_keys)
            if hop is self._route[-1]:
                self.authenticated_with = used
            t.set_keepalive(hop.keepalive)
        except BaseException:
            t.close()
            raise
        return t

    def _drop(self) -> None:
        """Close channels and every hop (under self._lock)."""
        channels = self._channels.close_all()
        conns = ([self._transport] if self._transport is not None else []) + self._jumps[::-1]
        self._transport, self._jumps = None, []
        for thing in [*channels, *conns]:
            try:
                thing.close()
            except SSH_ERRORS:
                pass

    def close(self) -> None:
        """Close channels and every connection; the next use connects afresh."""
        with self._lock:
            self._drop()
            self._ever_connected = False

    # -- retries -------------------------------------------------------------------------
    def _retrying(self, what: str, op: Callable[[Any], _T]) -> _T:
        """op(transport); after a drop (op raised ConnectionLost) reconnect and run it again;
        while the server refuses channels (ChannelsBusy), wait with backoff."""
        lost = busy = 0
        while True:
            t = self._connection()
            try:
                return op(t)
            except ChannelsBusy as exc:
                busy += 1
                if busy > self.max_retries:
                    raise TransportError(f"{what}: {self.describe()} refuses to open more channels "
                                         f"({exc.__cause__}); is its MaxSessions reached?") from exc.__cause__
                _backoff(0.1, busy)
            except ConnectionLost as exc:
                lost += 1
                cause = exc.__cause__ or exc
                if lost > self.max_retries:
                    raise TransportError(f"{what}: the connection to {self.describe()} keeps "
                                         f"dropping ({cause})") from cause
                log.info("%s: the connection to %s dropped (%s); reconnecting", what, self.describe(), cause)
                settle(t, 1.0 if t.is_active() else 0)

    # -- commands ------------------------------------------------------------------------
    def _run(self, argv: tuple[str, ...], *, input: str | None, timeout: float,
             env: dict[str, str] | None) -> CommandResult:
        command = command_line(argv, env)
        data = None if input is None else input.encode()
        code, out, err = self._retrying(
            f"running `{short(command)}`",
            lambda t: self._channels.run(t, command, data, timeout, resumable=False,
                                         where=self.describe(), open_timeout=self.connect_timeout))
        stderr = err.decode("utf-8", "replace")
        if code == 127 and argv[0] in stderr and re.search(r"not found|no such file", stderr, re.I):
            exc = TransportError(f"command {argv[0]!r} not found on {self.describe()}: {stderr.strip()}")
            exc.transient = False  # as LocalTransport says when a command cannot start
            raise exc
        return CommandResult(argv, code, out.decode("utf-8", "replace"), stderr)

    def open_stream(self, command: str, timeout: float = 60.0) -> Any:
        """Start `command` (a shell line the caller has quoted) on a channel of its own and
        return the paramiko Channel: its stdin, stdout and stderr stay open for a
        conversation (the agent's). Reconnects first if the connection dropped."""
        return self._retrying(
            f"starting `{short(command)}`",
            lambda t: self._channels.stream(t, command, timeout, where=self.describe(),
                                            open_timeout=self.connect_timeout))

    def client_port(self) -> int | None:
        """The local port of the connection to the site (None when not connected)."""
        return local_port(self._transport)


def _prefer_aead(t: Any) -> None:
    """Ask for AES-GCM first where the server offers it: one C pass per packet instead of
    AES-CTR plus a separate HMAC (measured: a quarter less CPU on both ends for a large put);
    paramiko lists it after the CTR and CBC ciphers. Other servers negotiate as before."""
    ciphers = t.get_security_options().ciphers
    prefer(t, "ciphers", [c for c in ciphers if c.startswith("aes") and c.endswith("-gcm@openssh.com")])
