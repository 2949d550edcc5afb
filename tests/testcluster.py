"""What tests need to know about the test cluster that tests/cluster/up.sh starts.

The suite runs as the cluster's unprivileged test client (scripts/test.sh), so the ssh
files are the running user's copies in ~/.ssh, and the few root actions a test needs (stop
a daemon, bring the cluster back, drop ssh connections) go through
`sudo -n hpcsl-admin` (tests/cluster/admin.sh), or straight to it when we are root.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SSH_DIR = Path.home() / ".ssh"
KEY = str(SSH_DIR / "hpcsl_test_key")
KNOWN_HOSTS = str(SSH_DIR / "hpcsl_known_hosts")
SSH_CONFIG = str(SSH_DIR / "hpcsl_ssh_config")
ADMIN = "/usr/local/sbin/hpcsl-admin"


def need_sshd() -> None:
    """Skip the calling test where the test cluster's key or loopback sshd is missing."""
    import socket

    import pytest

    if not os.path.exists(KEY):
        pytest.skip("no test ssh key (tests/cluster/up.sh makes one)")
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 2222)):
            pytest.skip("no sshd on 127.0.0.1:2222 (tests/cluster/up.sh starts one)")


def admin(*args: str, timeout: float = 300) -> str:
    """Run `hpcsl-admin ARGS` as root; its output. Fails the test if it fails."""
    cmd = [ADMIN, *args] if os.geteuid() == 0 else ["sudo", "-n", ADMIN, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr[-2000:]}")
    return out.stdout


def drop_ssh(port: int = 2222, client_port: int | None = None) -> int:
    """Kill the sshd processes serving connections to `port` (from `client_port` only, if
    given): a dropped connection, as a network or a login node would drop it. How many."""
    return int(admin("drop-ssh", str(port), *([str(client_port)] if client_port else [])).strip() or 0)


def cluster_python() -> dict[str, object]:
    """Site keys that give the cluster account this test run's interpreter (readable by
    every account) as `~/hpcs-venv-<id>/bin/python`, linked by a setup line, so it builds no
    venv of its own. The link is named after this run's venv: runs from several checkouts
    at once must not relink each other's."""
    import hashlib
    import shlex
    import sys

    link = "hpcs-venv-" + hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    return {"python": f"~/{link}/bin/python",
            "setup": [f"ln -sfn {shlex.quote(sys.prefix)} \"$HOME/{link}\""]}
