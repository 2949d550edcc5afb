"""The paramiko contract (issue 13): one module imports paramiko, and the two attributes
beyond its documented methods that it reads still exist in the installed paramiko."""

from __future__ import annotations

import ast
import socket
import threading
from pathlib import Path

import pytest

paramiko = pytest.importorskip("paramiko")

from hpc_serverless.adapters.transport import ssh_paramiko  # noqa: E402

PACKAGE = Path(__file__).resolve().parents[2] / "hpc_serverless"
BOUNDARY = PACKAGE / "adapters" / "transport" / "ssh_paramiko.py"


def test_only_the_boundary_module_imports_paramiko() -> None:
    importers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n == "paramiko" or n.startswith("paramiko.") for n in names):
                importers.append(str(path.relative_to(PACKAGE)))
    assert importers == [str(BOUNDARY.relative_to(PACKAGE))]


def test_no_private_paramiko_names() -> None:
    """paramiko's underscored names and SFTP internals are used nowhere in the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        for private in ("paramiko._", "paramiko.sftp", "paramiko.SFTP", "_async_request",
                        "_read_response", "CMD_"):
            assert private not in text, f"{private} in {path}"


def test_channel_status_event_exists() -> None:
    chan = paramiko.Channel(0)
    assert isinstance(chan.status_event, threading.Event)
    assert ssh_paramiko.exit_status_within(chan, 0) is False
    chan.status_event.set()
    assert ssh_paramiko.exit_status_within(chan, 0) is True


@pytest.fixture
def unstarted():
    """(a paramiko.Transport on a loopback socket, never started, that socket)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    t = paramiko.Transport(client)
    yield t, client
    t.close()
    client.close()
    listener.close()


def test_transport_sock_exists(unstarted) -> None:
    t, client = unstarted
    assert t.sock is client
    assert ssh_paramiko.local_port(t) == client.getsockname()[1]
    assert ssh_paramiko.local_port(None) is None


def test_prefer_reorders_without_restricting(unstarted) -> None:
    t, _ = unstarted
    before = list(t.get_security_options().ciphers)
    ssh_paramiko.prefer(t, "ciphers", ["no-such-cipher", before[-1]])
    assert list(t.get_security_options().ciphers) == [before[-1], *before[:-1]]
