"""The filesystem the object store and job records live on: this machine's, which on a
login node is its view of the cluster's shared filesystem. (A laptop never writes a
cluster's files: a site reached over SSH is served by its agent on the login node.)
"""

from __future__ import annotations

import os
import secrets
import stat as stat_mod
from typing import IO, NamedTuple


class StatResult(NamedTuple):
    mode: int
    uid: int
    size: int


class LocalFS:
    """This machine's filesystem (a login node's view of the shared filesystem), with
    the few operations the store and the job records need. Paths are absolute POSIX strings."""

    def open_new(self, path: str, mode: int = 0o600) -> IO[bytes]:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        return os.fdopen(fd, "wb", buffering=0)

    def open_read(self, path: str) -> IO[bytes]:
        # never through a link: what we read here (objects, records) we wrote ourselves
        return os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC), "rb",
                         buffering=0)

    def stat(self, path: str) -> StatResult:
        st = os.stat(path)
        return StatResult(st.st_mode, st.st_uid, st.st_size)

    def mkdir(self, path: str, mode: int = 0o700) -> None:
        os.mkdir(path, mode)

    def link_noreplace(self, src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except FileExistsError:
            raise
        except OSError:  # a filesystem without hard links: check, then rename
            if os.path.exists(dst):
                raise FileExistsError(dst) from None
            os.replace(src, dst)
            return
        os.unlink(src)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def unlink(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def sync(self, f: IO[bytes]) -> None:
        os.fsync(f.fileno())

    def owner_uid(self) -> int | None:
        """The uid files we write get (to check a store's directories are ours)."""
        return os.geteuid() if hasattr(os, "geteuid") else None

    def exists(self, path: str) -> bool:
        try:
            self.stat(path)
            return True
        except FileNotFoundError:
            return False

    def is_dir(self, path: str) -> bool:
        try:
            return stat_mod.S_ISDIR(self.stat(path).mode)
        except FileNotFoundError:
            return False

    def makedirs(self, path: str, mode: int = 0o700) -> None:
        """Create `path` and missing parents, each with `mode` (not the umask's choice)."""
        missing = []
        p = path.rstrip("/") or "/"
        while not self.exists(p):
            missing.append(p)
            parent = os.path.dirname(p)
            if parent == p:
                break
            p = parent
        for d in reversed(missing):
            try:
                self.mkdir(d, mode)
            except FileExistsError:
                pass

    def read_bytes(self, path: str, offset: int = 0) -> bytes:
        with self.open_read(path) as f:
            if offset:
                f.seek(offset)
            return f.read()

    def sync_dir(self, path: str) -> None:
        """Make a rename in directory `path` durable (where the filesystem allows it)."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:  # some filesystems refuse fsync on a directory: the rename stands
            pass
        finally:
            os.close(fd)

    def write_atomic(self, path: str, data: bytes, mode: int = 0o600, *, durable: bool = True) -> None:
        """Small files (job records, exit records, markers): written aside, fsynced, then
        renamed over, and the rename made durable: a reader sees the old file or the whole
        new one, also after a crash of the node. `durable=False` skips the fsyncs, for
        files rewritten often whose loss in a crash costs nothing (a heartbeat)."""
        folder = os.path.dirname(path) or "."
        tmp = f"{folder}/.{os.path.basename(path)}.{secrets.token_hex(4)}.tmp"
        try:
            with self.open_new(tmp, mode) as f:
                f.write(data)
                if durable:
                    self.sync(f)
            self.replace(tmp, path)
        except BaseException:
            self.unlink(tmp)
            raise
        if durable:
            self.sync_dir(folder)


LOCAL = LocalFS()
