"""``python -m hpc_serverless.agent``: a site's login-node provider, serving remote clients.

A client that reaches a site over SSH starts this module on the login node the way a
batch script starts: the site's ``setup`` lines, then the site's ``python``. It runs the
same provider a user on the login node runs (SlurmProvider/PBSProvider with commands run
here), with everything in the site file resolved in this account's environment. Two roles:

* relay (what the SSH channel runs): reads the client's hello, checks versions, resolves
  the site, checks that its storage is writable, finds the daemon that serves this
  site's storage (a Unix socket in ``/tmp/hpcs-agent-<uid>/``) or starts one, and passes
  bytes both ways until the channel closes;
* daemon (``--serve SOCKET``, its code in agent_daemon.py): holds the provider and answers
  requests. It outlives its channels for ``agent_grace`` seconds, so a dropped connection
  or a sleeping laptop loses nothing, and a request sent again (same id) is answered from
  the first run. Where it runs is recorded in ``<storage>/agent.json``.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import pickle
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from hpc_serverless.adapters.wire import (
    FrameError,
    encode,
    exact_reader,
    read_frame,
    versions,
)

if TYPE_CHECKING:
    from hpc_serverless.config.site import Site

from hpc_serverless.agent_daemon import (
    _connect,
    _hello_error,
    _where,
    _write,
    serve,
    version_problem,
)

log = logging.getLogger("hpc_serverless.agent")


# -- relay ------------------------------------------------------------------------------------------
def socket_path(site: Site) -> Path:
    """The daemon's socket for this site's storage (short: Unix socket paths are limited)."""
    digest = hashlib.sha256(str(site.storage_path).encode()).hexdigest()[:20]
    return Path(tempfile.gettempdir()) / f"hpcs-agent-{os.getuid()}" / f"{digest}.sock"


def check_storage(site: Site) -> str | None:
    """A sentence if this account cannot create and write the site's storage, else None."""
    from hpc_serverless.core.fs import LOCAL

    path = str(site.storage_path)
    try:
        LOCAL.makedirs(path, 0o700)
        LOCAL.makedirs(os.path.join(path, "store"), 0o700)
        probe = os.path.join(path, f".probe-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.unlink(probe)
    except OSError as exc:
        return (f"the site's storage {path} (resolved on the cluster side) is not writable by "
                f"{_where()}: {exc.strerror or exc}. Set `storage` in the site file to a directory "
                "this account may write on the filesystem the compute nodes share")
    return None


def _private_dir(path: Path) -> None:
    """The agent's socket folder: anyone who can reach the socket can make the agent run
    code as this user, so it must be ours, private, and not a link planted in /tmp."""
    path.mkdir(mode=0o700, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"{path} must be a directory of uid {os.getuid()} with mode 0700")


def _daemon_socket(site: Site, site_bytes: bytes) -> socket.socket:
    """A connection to this site's daemon, starting one if none answers."""
    path = socket_path(site)
    _private_dir(path.parent)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one daemon per site, whoever comes first starts it
        conn = _connect(path)
        if conn is not None:
            return conn
        log_path = site.storage_path / "agent.log"
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen([sys.executable, "-m", "hpc_serverless.agent", "--serve", str(path)],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=logf,
                                    start_new_session=True, close_fds=True, cwd=str(site.storage_path))
        assert proc.stdin is not None
        proc.stdin.write(site_bytes)
        proc.stdin.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            conn = _connect(path)
            if conn is not None:
                return conn
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the agent daemon exited ({proc.returncode}) at start: {tail}")
            time.sleep(0.05)
        raise RuntimeError(f"the agent daemon did not open {path} within 60 s (log: {log_path})")


def relay() -> int:
    """What the SSH channel runs: hello, then bytes both ways between channel and daemon."""
    read_in = exact_reader(lambda n: os.read(0, n))
    try:
        hello = read_frame(read_in)
    except (EOFError, FrameError) as exc:
        print(f"hpc_serverless.agent: no hello from the client ({exc})", file=sys.stderr)
        return 2
    here = versions()
    problem = version_problem(hello.get("versions", {}), here)
    if problem:
        _write(1, _hello_error("version", problem))
        return 3
    from hpc_serverless.config.site import on_cluster

    try:
        site = on_cluster(pickle.loads(hello["site"]))
    except Exception as exc:  # noqa: BLE001 - reported to the client, which shows it
        _write(1, _hello_error("site", f"the agent cannot read the site: {type(exc).__name__}: {exc}"))
        return 3
    problem = check_storage(site)
    if problem:
        _write(1, _hello_error("storage", problem))
        return 3
    try:
        conn = _daemon_socket(site, pickle.dumps(site))
    except (OSError, RuntimeError) as exc:
        _write(1, _hello_error("start", f"the agent on {_where()} could not start: {exc}"))
        return 3
    # the daemon reads and writes the channel's own pipes (no copy through this process):
    # they travel with the first byte, the hello follows on the socket
    socket.send_fds(conn, [b"F"], [0, 1])
    for part in encode(hello):
        conn.sendall(part)
    os.close(0)
    os.close(1)
    try:  # until the daemon is done with this client (the channel stays open as long)
        conn.recv(1)
    except OSError:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "--serve":
        return serve(args[1])
    return relay()


if __name__ == "__main__":
    sys.exit(main())
