"""Logging in to one hop: keys (files, ssh-agent, ``~/.ssh/id_*``), then the password,
then keyboard-interactive (one-time codes) through an interactive handler.

Passwords and answers are never logged nor put in an error message. A refusal says what
was tried, what the server accepts and what might help.
"""

from __future__ import annotations

import base64
import functools
import getpass
import os
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from hpc_serverless.adapters.transport.known_hosts import fingerprint
from hpc_serverless.adapters.transport.ssh_paramiko import SSH_ERRORS, paramiko
from hpc_serverless.adapters.transport.ssh_routes import Hop
from hpc_serverless.core.errors import AuthenticationError, ConfigError, TransportError

__all__ = ["InteractiveHandler", "authenticate", "terminal_prompt"]

#: a handler for keyboard-interactive logins: (title, instructions, [(prompt, echo)]) -> answers
InteractiveHandler = Callable[[str, str, "list[tuple[str, bool]]"], "Sequence[str]"]

_DEFAULT_KEYS = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")


def terminal_prompt(title: str, instructions: str, prompts: list[tuple[str, bool]]) -> list[str]:
    """The default keyboard-interactive handler: ask on the terminal (hidden input for
    prompts that do not echo, such as passwords and one-time codes)."""
    if not (sys.stdin is not None and sys.stdin.isatty()):
        raise AuthenticationError(
            "the SSH server asks for keyboard-interactive answers (a password or a one-time "
            "code) and there is no terminal to ask on: log in with a key (ssh-agent), or "
            "pass interactive_handler= to answer from Python")
    for line in (title, instructions):
        if line:
            print(line, file=sys.stderr)
    return [getpass.getpass(text) if not echo else input(text) for text, echo in prompts]


class _Answers:
    """Wraps the user's handler: fills password prompts with the password we were given,
    asks the handler for the rest, and keeps its exception (paramiko calls this on its
    own thread, where an exception would only be logged)."""

    def __init__(self, handler: InteractiveHandler, password: str | None, where: str) -> None:
        self.handler, self.password, self.where = handler, password, where
        self.error: BaseException | None = None
        self.asked = 0

    def __call__(self, title: str, instructions: str, prompts: Sequence[Any]) -> list[str]:
        pairs = [(str(p[0]), bool(p[1])) for p in prompts]
        answers: list[str] = [""] * len(pairs)
        if self.error is not None:
            return answers
        try:
            ask = []
            for i, (text, echo) in enumerate(pairs):
                if self.password is not None and not echo and "password" in text.lower():
                    answers[i] = self.password
                else:
                    ask.append(i)
            if ask:
                self.asked += 1
                got = list(self.handler(title, instructions, [pairs[i] for i in ask]))
                if len(got) != len(ask):
                    raise AuthenticationError(
                        f"interactive_handler gave {len(got)} answers to {len(ask)} prompts")
                for i, answer in zip(ask, got, strict=True):
                    answers[i] = str(answer)
        except BaseException as exc:  # noqa: BLE001 - kept and re-raised on the caller's thread
            self.error = exc
        return answers


def _identities(hop: Hop, notes: list[str], *, allow_agent: bool,
                look_for_keys: bool) -> Iterator[tuple[str, Any]]:
    """(label, key) to offer: key files, then the agent's keys, then ~/.ssh/id_*."""
    offered: set[bytes] = set()
    file_blobs: set[bytes] = set()

    def load(path: str, explicit: bool) -> Any:
        if not os.path.exists(path):
            if explicit:
                raise ConfigError(f"key_filename {path} does not exist")
            return None
        try:
            key = paramiko.PKey.from_path(path, password=hop.password)
        except paramiko.PasswordRequiredException:
            notes.append(f"key {path} is encrypted: load it into ssh-agent (ssh-add {shlex.quote(path)})")
            pub = path + ".pub"
            if os.path.exists(pub):  # an agent key matching it counts as one of our files
                try:
                    with open(pub) as f:
                        file_blobs.add(base64.b64decode(f.read().split()[1]))
                except (OSError, IndexError, ValueError):
                    pass
            return None
        except (OSError, ValueError, paramiko.SSHException) as exc:
            notes.append(f"key {path} could not be read: {exc}")
            return None
        cert = path + "-cert.pub"
        if os.path.exists(cert):
            try:
                key.load_certificate(cert)
            except (OSError, ValueError, paramiko.SSHException) as exc:
                notes.append(f"certificate {cert} could not be read: {exc}")
        return key

    for path in hop.key_files:
        key = load(path, path in hop.explicit_keys)
        if key is not None:
            file_blobs.add(key.asbytes())
            if key.asbytes() not in offered:
                offered.add(key.asbytes())
                yield path, key
    if allow_agent:
        try:
            agent = paramiko.Agent()
        except (OSError, paramiko.SSHException) as exc:
            notes.append(f"ssh-agent could not be used: {exc}")
            agent = None
        try:
            for key in agent.get_keys() if agent is not None else ():
                blob = key.asbytes()
                if blob in offered or (hop.identities_only and blob not in file_blobs):
                    continue
                offered.add(blob)
                yield f"ssh-agent key {fingerprint(key)}", key
        finally:
            if agent is not None:
                agent.close()
    if look_for_keys and not hop.key_files:
        for path in _DEFAULT_KEYS:
            key = load(os.path.expanduser(path), False)
            if key is not None and key.asbytes() not in offered:
                offered.add(key.asbytes())
                yield path, key


def authenticate(t: Any, hop: Hop, handler: InteractiveHandler, *, allow_agent: bool,
                 look_for_keys: bool) -> list[str]:
    """Log in on the paramiko.Transport `t`; the methods that did it ("publickey", ...).

    Raises AuthenticationError (not transient) when every way in was refused."""
    user = hop.username
    tried: list[str] = []
    notes: list[str] = []
    used: list[str] = []
    allowed: list[str] | None = None

    try:
        t.auth_none(user)
    except paramiko.BadAuthenticationType as exc:
        allowed = list(exc.allowed_types)
    except paramiko.AuthenticationException:
        allowed = None
    except SSH_ERRORS as exc:
        raise TransportError(f"{hop.describe()} closed the connection during login: {exc}") from exc
    if t.is_authenticated():
        used.append("none")

    def attempt(method: str, label: str, call: Callable[[], Any]) -> bool:
        """Try one way in; True when fully logged in."""
        nonlocal allowed
        if t.is_authenticated() or not t.is_active():
            return bool(t.is_authenticated())
        if allowed is not None and method not in allowed:
            return False
        tried.append(label)
        try:
            remaining = call()
        except paramiko.BadAuthenticationType as exc:
            allowed = list(exc.allowed_types)
            return False
        except paramiko.AuthenticationException:
            return False
        except SSH_ERRORS as exc:
            notes.append(f"{method} failed: {exc}")
            return False
        if t.is_authenticated():
            used.append(method)
            return True
        allowed = list(remaining or [])  # partial success: the server wants another factor
        used.append(method)
        return False

    if not t.is_authenticated():
        for label, key in _identities(hop, notes, allow_agent=allow_agent, look_for_keys=look_for_keys):
            if attempt("publickey", f"key {label}", functools.partial(t.auth_publickey, user, key)):
                break
    if not t.is_authenticated() and hop.password is not None:
        attempt("password", "password", lambda: t.auth_password(user, hop.password, fallback=False))
    if not t.is_authenticated():
        answers = _Answers(handler, hop.password, hop.describe())
        rounds = 3 if handler is terminal_prompt else 1
        for _ in range(rounds):
            if attempt("keyboard-interactive", "keyboard-interactive",
                       lambda: t.auth_interactive(user, answers)):
                break
            if answers.error is not None:
                err = answers.error
                if isinstance(err, AuthenticationError):
                    raise AuthenticationError(f"{hop.describe()}: {err}") from None
                raise AuthenticationError(
                    f"{hop.describe()}: keyboard-interactive login failed in "
                    f"interactive_handler: {err!r}") from err
            if answers.asked == 0:
                break  # nothing was asked of the handler: asking again will not help
    if t.is_authenticated():
        return used
    accepts = ", ".join(allowed) if allowed is not None else "(it did not say)"
    hints = []
    if allowed is not None and "password" in allowed and hop.password is None:
        hints.append("a password may be given with password=")
    if allowed is not None and "publickey" in allowed and not any(s.startswith("key ") for s in tried):
        hints.append("no key was found: set key_filename, IdentityFile in ~/.ssh/config, or load one "
                     "into ssh-agent")
    raise AuthenticationError(
        f"{hop.describe()} refused the login. Tried: {', '.join(tried) or 'nothing'}; the server "
        f"accepts: {accepts}." + "".join(f"\n  {s}" for s in notes + hints))
