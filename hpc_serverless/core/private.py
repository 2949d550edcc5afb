"""Private directory chains: where the compute side finds code (pickles, scripts) it runs.

A site's storage often sits in a group's project directory (setgid, umask 002), where
anything created with the user's umask is writable by the whole group, and a group member
who can swap a pickle or a job script runs code as the user. So every directory we create
under a site's storage is 0700 regardless of umask (chmod after mkdir: a setgid parent
passes on its group and g+s, the umask decides the rest), and before anything is loaded
from or submitted out of a directory, the chain from the storage's root down to it is
checked, symlink-safe: each level opened with O_NOFOLLOW | O_DIRECTORY relative to the
one above (openat), then fstat'ed: ours, and not writable by group or others.

The way to the root is walked too, from /: a symlink on it (``$SCRATCH`` often is one) is
followed only when it sits in a directory only we or root can change (or one with the
sticky bit), and a directory there that is not ours only in such a directory: a root
swapped for a symlink inside a group-writable project directory is refused.

Checks are cheap (one openat and one fstat per level) but not free on NFS, so callers may
keep a result for :data:`CHECK_TTL_S` (:class:`CheckedDirs`), never longer: a
long-lived process sees a swap within that time.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from typing import IO

from hpc_serverless.core.errors import StoreError, UnsafeStoreError

__all__ = ["CHECK_TTL_S", "CheckedDirs", "check_chain", "check_file", "make_private", "open_private",
           "write_private"]

#: how long a chain found safe is trusted before it is checked again
CHECK_TTL_S = 1.0
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


def _me() -> int | None:
    return os.geteuid() if hasattr(os, "geteuid") else None


def _judge(path: str, st: os.stat_result, what: str) -> None:
    """Refuse `path` (a directory or file, already fstat'ed) that others can write or that is not ours."""
    me = _me()
    if me is not None and st.st_uid != me:
        raise UnsafeStoreError(
            f"{what} {path} belongs to uid {st.st_uid}, not to you (uid {me}); refusing to run or "
            f"load code from it. Fix: use a storage directory of your own")
    if st.st_mode & _OTHERS_WRITE:
        raise UnsafeStoreError(
            f"{what} {path} is writable by other users (mode {stat.filemode(st.st_mode)}); refusing "
            f"to run or load code from it (a group member could swap a pickle or a script). "
            f"Fix with: chmod go-w {path}")


def _safe_parent(st: os.stat_result) -> bool:
    """Only we (or root) can add, remove or rename entries in this directory."""
    return st.st_uid in (0, _me()) and (not st.st_mode & _OTHERS_WRITE or bool(st.st_mode & stat.S_ISVTX))


def _lstat(path: str) -> os.stat_result:
    """lstat, a failure told in the store's terms (a missing level stays FileNotFoundError)."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StoreError(f"cannot look at {path}: {exc}") from exc


def _check_above(root: str) -> None:
    """Walk the path to `root` from /, following links as the kernel would: a link, or a
    directory not ours, inside a directory someone else can change, could have been put
    there by them (a root swapped for a link in a group's project directory): refused."""
    here, parent = "/", _lstat("/")
    todo = [n for n in root.split("/") if n]
    hops = 0
    while todo:
        name = todo.pop(0)
        if name == ".":
            continue
        if name == "..":
            here = os.path.dirname(here)
            parent = _lstat(here)
            continue
        path = f"{here.rstrip('/')}/{name}"
        st = _lstat(path)
        safe = _safe_parent(parent)
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(path)  # a link we just lstat'ed: readable
            if not safe or st.st_uid not in (0, _me()):
                raise UnsafeStoreError(
                    f"{path} (on the way to {root}) is a symbolic link (to {target!r}, owned by uid {st.st_uid}) "
                    f"in {here}, which other users can write (mode {stat.filemode(parent.st_mode)}): anyone "
                    f"there could have put it in place; refusing it. Fix: point the site's storage at the "
                    f"real directory")
            hops += 1
            if hops > 40:
                raise StoreError(f"too many symbolic links on the way to {root}")
            if target.startswith("/"):
                here, parent = "/", _lstat("/")
            todo = [n for n in target.split("/") if n] + todo
            continue
        if not safe and st.st_uid not in (0, _me()):
            raise UnsafeStoreError(
                f"{path} (on the way to {root}) belongs to uid {st.st_uid}, not to you, and sits in {here}, "
                f"which other users can write (mode {stat.filemode(parent.st_mode)}); refusing it. Fix: "
                f"use a storage directory of your own")
        here, parent = path, st


def _open_root(root: str) -> int:
    """An fd of the root directory, once the way to it is found safe."""
    _check_above(root)
    try:
        return os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StoreError(f"cannot open directory {root}: {exc}") from exc


def check_chain(root: str | os.PathLike[str], leaf: str | os.PathLike[str] | None = None) -> None:
    """Check `root` and every directory from it down to `leaf` (inside it): real directories,
    not symlinks, ours, not writable by others. Raises UnsafeStoreError naming the first
    bad one, its mode and the fix; FileNotFoundError if a level is missing."""
    root_s = os.path.abspath(os.fspath(root))
    parts = _below(root_s, leaf)
    fd = _open_root(root_s)
    here = root_s
    try:
        _judge(here, os.fstat(fd), "directory")
        for name in parts:
            here = f"{here.rstrip('/')}/{name}"
            try:
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(here):
                    raise UnsafeStoreError(
                        f"{here} is a symbolic link (to {os.readlink(here)!r}) where a private directory "
                        f"belongs; refusing to follow it. Fix: remove the link") from None
                if exc.errno == errno.ENOENT:
                    raise
                raise StoreError(f"cannot open directory {here}: {exc}") from exc
            os.close(fd)
            fd = nfd
            _judge(here, os.fstat(fd), "directory")
    finally:
        os.close(fd)


def _below(root: str, leaf: str | os.PathLike[str] | None) -> tuple[str, ...]:
    """The names from `root` down to `leaf`; an error if `leaf` is not inside `root`."""
    if leaf is None:
        return ()
    leaf_s = os.path.abspath(os.fspath(leaf))
    if leaf_s == root:
        return ()
    base = root.rstrip("/") + "/"
    if not leaf_s.startswith(base):
        raise StoreError(f"{leaf} is not inside {root}")
    return tuple(leaf_s[len(base):].split("/"))


def make_private(root: str | os.PathLike[str], leaf: str | os.PathLike[str] | None = None) -> None:
    """Create `root` (and its missing parents) and the directories from it down to `leaf`,
    each new one 0700 whatever the umask or a setgid parent says; then check the chain.
    Directories that exist already are checked, not changed."""
    root_s = os.path.abspath(os.fspath(root))
    missing = []
    p = root_s
    while not os.path.lexists(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    todo = list(reversed(missing))
    here = root_s
    for name in _below(root_s, leaf):
        here = f"{here.rstrip('/')}/{name}"
        todo.append(here)
    for d in todo:
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue
        except OSError as exc:
            raise StoreError(f"cannot create directory {d}: {exc}") from exc
        os.chmod(d, 0o700)  # clears the g+s a setgid parent passed on; the umask had its say
    check_chain(root_s, leaf)


def check_file(path: str, st: os.stat_result) -> None:
    """Refuse a file (fstat'ed through an fd we opened) that is not ours or others can write."""
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeStoreError(f"{path} is not a regular file (mode {stat.filemode(st.st_mode)}); refusing it")
    _judge(path, st, "file")


def open_private(path: str | os.PathLike[str]) -> IO[bytes]:
    """Open a file we will load or run, without following a symlink, and check it is a
    regular file of ours that others cannot write."""
    p = os.fspath(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeStoreError(f"{p} is a symbolic link (to {os.readlink(p)!r}); refusing to load it. "
                                   "Fix: remove the link") from None
        raise
    try:
        check_file(p, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def write_private(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Create a new file (never through a link, never over one) with `mode`, whatever the umask."""
    p = os.fspath(path)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view.nbytes:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


class CheckedDirs:
    """Chains found safe, each trusted for CHECK_TTL_S and then checked again."""

    def __init__(self, ttl: float = CHECK_TTL_S) -> None:
        self.ttl = ttl
        self._until: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def check(self, root: str | os.PathLike[str], leaf: str | os.PathLike[str]) -> None:
        key = (os.fspath(root), os.fspath(leaf))
        now = time.monotonic()
        if self._until.get(key, 0.0) > now:
            return
        check_chain(*key)
        with self._lock:
            self._until[key] = now + self.ttl
