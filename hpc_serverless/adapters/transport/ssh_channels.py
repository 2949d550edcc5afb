"""Commands on the channels of one SSH connection: each command on a channel of its own
(several may run at once), its stdin fed and its stdout and stderr read together.

A step that fails because the connection went away before the command started raises
:class:`ConnectionLost` (the caller reconnects and runs it again); once a command has
started, a drop is reported as a TransportError and never run twice, unless the caller
says the step is resumable.
"""

from __future__ import annotations

import io
import re
import shlex
import threading
import time
from collections.abc import Sequence
from typing import Any

from hpc_serverless.adapters.transport.ssh_paramiko import (
    SSH_ERRORS,
    ChannelsBusy,
    ConnectionLost,
    exit_status_within,
    paramiko,
    settle,
    short,
)
from hpc_serverless.core.errors import ConfigError, TransportError

__all__ = ["MAX_CHANNELS", "Channels", "command_line"]

#: concurrent command channels per connection (OpenSSH's MaxSessions defaults to 10,
#: and the agent's channel takes one)
MAX_CHANNELS = 8
_CHUNK = 1 << 16
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def command_line(argv: Sequence[str], env: dict[str, str] | None) -> str:
    """The quoted shell line for argv, with `env` set through env(1)."""
    if not argv:
        raise ValueError("an empty command")
    if env:
        bad = [k for k in env if not _ENV_NAME.match(str(k))]
        if bad:
            raise ConfigError(f"{bad[0]!r} is not an environment variable name")
        argv = ["env", *(f"{k}={v}" for k, v in env.items()), *argv]
    return shlex.join(argv)


class Channels:
    """The channels open on a connection: at most MAX_CHANNELS commands at a time, and
    every channel remembered so that closing the connection closes them too."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_CHANNELS)
        self._open: set[Any] = set()

    def close_all(self) -> list[Any]:
        """Forget every channel; the caller closes them with the connection."""
        with self._lock:
            channels, self._open = list(self._open), set()
        return channels

    def run(self, t: Any, command: str, stdin: bytes | None, timeout: float, *, resumable: bool,
            where: str, open_timeout: float) -> tuple[int, bytes, bytes]:
        """Run one command on a new channel: (exit code, stdout, stderr)."""
        deadline = time.monotonic() + timeout
        if not self._slots.acquire(timeout=max(0.0, timeout)):
            raise TransportError(f"`{short(command)}` could not start within {timeout:.0f} s: "
                                 f"all {MAX_CHANNELS} channels to {where} are busy")
        try:
            chan = _open(t, deadline, open_timeout)
            with self._lock:
                self._open.add(chan)
            try:
                _start(t, chan, command, where, transient=False)
                return _exchange(t, chan, command, stdin, deadline, timeout, resumable, where)
            finally:
                chan.close()
                with self._lock:
                    self._open.discard(chan)
        finally:
            self._slots.release()

    def stream(self, t: Any, command: str, timeout: float, *, where: str, open_timeout: float) -> Any:
        """Start `command` on a channel left open for a conversation; the paramiko Channel."""
        chan = _open(t, time.monotonic() + timeout, open_timeout)
        try:
            _start(t, chan, command, where, transient=True)
        except BaseException:
            chan.close()
            raise
        with self._lock:
            self._open.add(chan)
        return chan


def _open(t: Any, deadline: float, open_timeout: float) -> Any:
    """A new session channel, or ChannelsBusy (live connection) / ConnectionLost."""
    try:
        return t.open_session(timeout=max(1.0, min(open_timeout, deadline - time.monotonic())))
    except paramiko.ChannelException as exc:
        if t.is_active():
            raise ChannelsBusy() from exc
        raise ConnectionLost() from exc
    except SSH_ERRORS as exc:
        if t.is_active() and "Timeout" in str(exc):
            t.close()  # an unresponsive connection: start a fresh one
        raise ConnectionLost() from exc


def _start(t: Any, chan: Any, command: str, where: str, *, transient: bool) -> None:
    """exec the command; ConnectionLost if the connection died, else the server's refusal."""
    try:
        chan.exec_command(command)
    except SSH_ERRORS as exc:
        settle(t, 0.2)
        if not t.is_active():
            raise ConnectionLost() from exc
        err = TransportError(f"{where} refused to run `{short(command)}`: {exc}")
        err.transient = transient
        raise err from exc


def _exchange(t: Any, chan: Any, command: str, stdin: bytes | None, deadline: float, timeout: float,
              resumable: bool, where: str) -> tuple[int, bytes, bytes]:
    """Feed stdin and read stdout and stderr of a started command until it exits."""
    out, err_buf = bytearray(), bytearray()
    stop = threading.Event()
    feed_error: list[BaseException] = []

    def drain_stderr() -> None:
        while True:
            try:
                data = chan.recv_stderr(_CHUNK)
            except TimeoutError:
                if stop.is_set():
                    return
                continue
            except SSH_ERRORS:
                return
            if not data:
                return
            err_buf.extend(data)

    def feed(data: bytes) -> None:
        sink = _ChannelWriter(chan)
        try:
            view = memoryview(data)
            for off in range(0, len(view), _CHUNK):
                sink.write(view[off:off + _CHUNK])
        except _ChannelGone:
            return  # the command exited without reading all of its input, like a broken pipe
        except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread
            feed_error.append(exc)
            chan.close()  # never let a half-fed command succeed
            return
        try:
            chan.shutdown_write()
        except SSH_ERRORS:
            pass

    chan.settimeout(max(0.01, deadline - time.monotonic()))
    helpers = [threading.Thread(target=drain_stderr, daemon=True, name="ssh-stderr")]
    if stdin is not None:
        helpers.append(threading.Thread(target=feed, args=(stdin,), daemon=True, name="ssh-stdin"))
    else:
        chan.shutdown_write()
    for th in helpers:
        th.start()
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError()
            chan.settimeout(remaining)
            data = chan.recv(_CHUNK)
            if not data:
                break
            out.extend(data)
        for th in helpers:
            th.join(max(0.0, deadline - time.monotonic()))
            if th.is_alive():
                raise TimeoutError()
        if not exit_status_within(chan, deadline - time.monotonic()):
            raise TimeoutError()
    except TimeoutError:
        stop.set()
        chan.close()
        raise TransportError(f"`{short(command)}` did not finish within {timeout:.0f} s on "
                             f"{where} (it may still be running there)") from None
    except SSH_ERRORS:
        pass  # the connection died: judged below
    finally:
        stop.set()
    if feed_error:
        raise feed_error[0]
    code = chan.exit_status
    if code == -1:  # no exit status: the command was killed, or the connection died
        settle(t, 0.5)
        if not t.is_active():
            if resumable:
                raise ConnectionLost()
            raise TransportError(
                f"the connection to {where} dropped while `{short(command)}` was "
                "running: it may or may not have completed (retry if that is safe)")
    return code, bytes(out), bytes(err_buf)


class _ChannelGone(Exception):
    """The channel closed under a writer: the command stopped reading its input."""


class _ChannelWriter(io.RawIOBase):
    """A write-only file object on a channel's stdin."""

    def __init__(self, chan: Any) -> None:
        super().__init__()
        self._chan = chan

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        try:
            self._chan.sendall(view)
        except TimeoutError:
            raise
        except SSH_ERRORS as exc:
            raise _ChannelGone() from exc
        return len(view)

    def __del__(self) -> None:
        """Nothing to release: the channel belongs to the command."""
