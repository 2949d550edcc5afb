"""known_hosts files and the host-key policy, as OpenSSH applies them.

Host keys are checked against the system's and the user's known_hosts (hashed entries,
patterns with ``*``, ``?`` and ``!``, ``@revoked`` markers). An unknown key is refused
(:class:`HostKeyError` with its SHA256 fingerprint and how to accept it) unless the hop
trusts new keys, which records it on first use; a changed key is always refused.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hpc_serverless.adapters.transport.ssh_paramiko import paramiko, prefer
from hpc_serverless.adapters.transport.ssh_routes import Hop
from hpc_serverless.core.errors import HostKeyError

__all__ = ["KnownKey", "check_host_key", "fingerprint", "prefer_known_key_types", "read_known_hosts"]

log = logging.getLogger(__name__)


@dataclass
class KnownKey:
    """One key line of a known_hosts file."""

    hosts: str
    key: Any
    marker: str | None
    where: str


def read_known_hosts(paths: Sequence[str]) -> list[KnownKey]:
    """Every key line of these files (missing files are fine; bad lines are skipped)."""
    known = []
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = f.readlines()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot read known hosts file %s: %s", path, exc)
            continue
        for n, line in enumerate(lines, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            marker = None
            if fields[0].startswith("@"):
                marker, fields = fields[0], fields[1:]
            if len(fields) < 3:
                continue
            try:
                key = paramiko.PKey.from_type_string(fields[1], base64.b64decode(fields[2]))
            except (ValueError, TypeError, paramiko.SSHException):
                continue  # a key type paramiko does not know, or a damaged line
            known.append(KnownKey(fields[0], key, marker, f"{path}:{n}"))
    return known


def _host_matches(hosts: str, name: str) -> bool:
    """known_hosts host field (hashed, or patterns with * ? and !negation) against a name."""
    if hosts.startswith("|1|"):
        try:
            return bool(paramiko.HostKeys.hash_host(name, hosts) == hosts)
        except (ValueError, TypeError, IndexError):
            return False
    hit = False
    for pattern in hosts.split(","):
        negated = pattern.startswith("!")
        if _glob(pattern.lstrip("!")).match(name):
            if negated:
                return False
            hit = True
    return hit


def _glob(pattern: str) -> re.Pattern[str]:
    """An OpenSSH host pattern: only * and ? are special (not [ ], as in fnmatch)."""
    parts = ("." if c == "?" else ".*" if c == "*" else re.escape(c) for c in pattern)
    return re.compile("".join(parts) + r"\Z", re.IGNORECASE)


def _keys_of(hop: Hop, known: list[KnownKey]) -> list[KnownKey]:
    """The unmarked keys known for this hop's name."""
    return [k for k in known if k.marker is None and _host_matches(k.hosts, hop.key_name)]


def fingerprint(key: Any) -> str:
    """OpenSSH's SHA256 fingerprint of a public key: "SHA256:..."."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _algorithms(key_type: str) -> list[str]:
    return ["rsa-sha2-512", "rsa-sha2-256"] if key_type == "ssh-rsa" else [key_type]


def prefer_known_key_types(t: Any, hop: Hop, known: list[KnownKey]) -> None:
    """Ask for a key of a type we already know for this host first, as OpenSSH does."""
    types: list[str] = []
    for k in _keys_of(hop, known):
        types += [a for a in _algorithms(k.key.get_name()) if a not in types]
    if types:
        prefer(t, "key_types", types)


def check_host_key(t: Any, hop: Hop, known: list[KnownKey]) -> None:
    """Accept the server's key if known_hosts has it (or record it, when the hop trusts
    new keys); otherwise raise HostKeyError saying what was found and what to do."""
    key = t.get_remote_server_key()
    blob, ktype, fp = key.asbytes(), key.get_name(), fingerprint(key)
    if any(k.marker == "@revoked" and k.key.asbytes() == blob for k in known):
        raise HostKeyError(f"the SSH host key of {hop.hostname} port {hop.port} ({ktype} {fp}) "
                           "is marked @revoked in known_hosts: refusing to connect")
    mine = _keys_of(hop, known)
    if any(k.key.asbytes() == blob for k in mine):
        return
    files = hop.system_known_hosts + hop.known_hosts
    if mine:
        same_type = [k for k in mine if k.key.get_name() == ktype]
        listed = "; ".join(f"{k.key.get_name()} {fingerprint(k.key)} ({k.where})" for k in mine)
        what = ("HAS CHANGED" if same_type else
                f"IS OF A TYPE ({ktype}) NOT KNOWN FOR IT, WHILE OTHER KEYS ARE")
        raise HostKeyError(
            f"@@@ WARNING: THE SSH HOST KEY OF {hop.hostname} PORT {hop.port} {what} @@@\n"
            "Someone could be intercepting the connection (a man-in-the-middle attack), or "
            "the host key was just replaced. Refusing to connect.\n"
            f"  the server presented: {ktype} {fp}\n"
            f"  known_hosts has: {listed}\n"
            "Only if the site's administrators confirm the change, remove the old key with\n"
            f"  ssh-keygen -R {shlex.quote(hop.key_name)} -f {shlex.quote(mine[0].where.rsplit(':', 1)[0])}\n"
            "and connect again.")
    if hop.trust_new:
        _remember(hop, key)
        log.warning("trusting the unknown SSH host key of %s port %d on first use: %s %s "
                    "(recorded in %s)", hop.hostname, hop.port, ktype, fp, hop.known_hosts[0])
        return
    port_opt = "" if hop.port == 22 else f"-p {hop.port} "
    raise HostKeyError(
        f"the SSH host key of {hop.hostname} port {hop.port} is not known "
        f"(looked in {', '.join(files)}): refusing to connect.\n"
        f"  the server presented: {ktype} {fp}\n"
        "Check that fingerprint against the site's documentation (or ask its "
        "administrators), then accept it once, either by connecting with OpenSSH:\n"
        f"  ssh {port_opt}{shlex.quote(hop.username)}@{shlex.quote(hop.hostname)}   (answer 'yes')\n"
        "or with:\n"
        f"  ssh-keyscan {port_opt}{shlex.quote(hop.hostname)} >> {shlex.quote(hop.known_hosts[0])}\n"
        "or set `trust_unknown_hosts: true` in the site config to record it on first use.")


def _remember(hop: Hop, key: Any) -> None:
    """Append the key to the hop's first known_hosts file (a failure is only logged)."""
    path = hop.known_hosts[0]
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            lead = b""
            if size:
                f.seek(size - 1)
                lead = b"" if f.read(1) == b"\n" else b"\n"
            f.write(lead + f"{hop.key_name} {key.get_name()} {key.get_base64()}\n".encode())
    except OSError as exc:
        log.warning("could not record the host key of %s in %s: %s", hop.key_name, path, exc)
