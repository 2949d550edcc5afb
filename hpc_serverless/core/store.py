"""The object store: immutable objects in a directory tree on a (shared) filesystem.

Designed for NFS and Lustre as much as for a laptop disk:

* every object is written once, to a temporary name in its final directory, then
  renamed into place: a reader sees a whole object or none (rename is atomic on NFS);
* no locks and no reliance on modification times;
* each file carries its sizes and a checksum of everything (XXH3-64; CRC-32 in files
  written before format 2, still read and checked), so a truncated or damaged object is
  reported as :class:`CorruptObjectError`, never loaded as a wrong value;
* a write that runs out of space or quota says so, with the store and the size, and
  leaves nothing behind;
* directories are 0700 and files 0600, and a store whose directories others can write,
  or that holds a symlink where a directory belongs, is refused
  (:class:`UnsafeStoreError`; core/private.py): pickles are code.

File layout (see docs/on-disk.md)::

    b"HPCSOBJ2" | u64 header length | header JSON | pickle stream | buffer 1 .. n
                | u64 xxh3_64 | b"HPCSEND2"
    (format 1, read only: b"HPCSOBJ1" ... | u32 crc32 | b"HPCSEND1")

Large contiguous buffers (numpy arrays) are pickled out of band (protocol 5) and written
straight from their memory. A big object on a local disk is read by mapping its file
copy-on-write: the checksum reads the page cache in place and the first buffer (aligned
to 64 bytes by spaces that end the header) becomes the array's memory, with no copy and
no fresh allocation; on network filesystems (where a mapped file removed from another
host faults when its pages are dropped) it is read into new memory instead.
The checksum runs at memory speed (XXH3 with SIMD, ~14 GiB/s here against zlib's CRC-32
at 2.6 GiB/s), beside the I/O on a second thread for big objects.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import queue
import re
import secrets
import struct
import sys
import threading
import time
import zlib
from pathlib import PurePosixPath
from typing import IO, Any, Callable, NamedTuple

import xxhash

from hpc_serverless.core.errors import (
    CorruptObjectError,
    ObjectNotFoundError,
    SerializationError,
    StoreError,
    UnsafeStoreError,
)
from hpc_serverless.core.fs import LOCAL
from hpc_serverless.core.private import CheckedDirs, check_chain, check_file, make_private
from hpc_serverless.core.serialization import dumps_oob, loads

__all__ = ["ObjectStore", "new_object_id"]



class _Format(NamedTuple):
    """One on-disk format version: its magics, its checksum and the trailer that holds it."""

    magic: bytes
    end: bytes
    trailer: struct.Struct
    checksum: Callable[[], Any]  # a new incremental hash: .update(bytes), .intdigest()


class _Crc32:
    """zlib's CRC-32 behind the hash interface of xxhash (format 1 objects still read)."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: Any) -> None:
        self.value = zlib.crc32(data, self.value)

    def intdigest(self) -> int:
        return self.value


#: what put writes: XXH3-64 (5x faster than CRC-32 here, so integrity costs no disk speed)
FORMAT = _Format(b"HPCSOBJ2", b"HPCSEND2", struct.Struct("<Q8s"), xxhash.xxh3_64)
#: every format get reads, by magic (objects written by earlier versions stay readable)
_FORMATS = {f.magic: f for f in (FORMAT, _Format(b"HPCSOBJ1", b"HPCSEND1", struct.Struct("<I8s"), _Crc32))}
#: bytes per read/write call: small enough that the checksum thread finds the chunk still
#: in the CPU cache, big enough that system calls cost nothing
_CHUNK = 4 * 1024 * 1024
#: errors of a full filesystem or of a quota (blocks or inodes): told as such, with what to do
_NO_SPACE = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)
#: below this size a write is fsync'ed before the rename (results and arguments: cheap,
#: and they must survive a node crash). Larger objects rely on the checksum to detect
#: damage instead of paying a full writeback on every put.
FSYNC_BELOW = 16 * 1024 * 1024
_KEY_RE = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")


def new_object_id() -> str:
    """A random id: no coordination needed between writers on different hosts."""
    return secrets.token_hex(16)


class ObjectStore:
    """Objects under one root directory, addressed by relative keys ("objects/ab/abcd...")."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.fs = LOCAL
        self.root = PurePosixPath(os.path.abspath(os.path.expandvars(os.path.expanduser(str(root)))))
        self._checked = CheckedDirs()

    def __repr__(self) -> str:
        return f"ObjectStore({str(self.root)!r})"

    # -- paths and safety -------------------------------------------------------------
    def path_of(self, key: str) -> PurePosixPath:
        if not _KEY_RE.match(key) or ".." in key.split("/"):
            raise StoreError(f"invalid object key {key!r}")
        return self.root / key

    def _ensure_dir(self, directory: PurePosixPath) -> None:
        """Create `directory` private (each new level 0700, whatever the umask or a setgid
        parent says) and check the chain from the root down to it (core/private.py)."""
        try:
            self._checked.check(self.root, directory)
            return
        except FileNotFoundError:
            pass
        try:
            make_private(self.root, directory)
        except FileNotFoundError as exc:  # removed while we created it (a gc): say so
            raise StoreError(f"cannot create store directory {directory}: {exc}") from exc
        self._checked.check(self.root, directory)

    def _check_dir(self, directory: PurePosixPath) -> None:
        """Refuse a directory whose chain from the root (symlink-safe) others can write or
        we do not own. Re-checked after CHECK_TTL_S, so a long-lived process sees a root
        swapped for a symlink, or a directory opened to the group, within that time."""
        self._checked.check(self.root, directory)

    # -- write ------------------------------------------------------------------------
    def put(self, obj: Any, key: str, *, what: str = "object", overwrite: bool = False,
            meta: dict[str, Any] | None = None, durable: bool | None = None) -> int:
        """Serialize `obj` under `key`, atomically; returns the bytes written.

        `meta` (small, JSON) goes in the header, readable with :meth:`header` without
        loading the object (a task result's ok flag, say)."""
        data, buffers = dumps_oob(obj, what=what)
        raws = [memoryview(data)] + [b.raw() for b in buffers]
        return self.write_parts(key, raws, overwrite=overwrite, type_name=_type_name(obj), meta=meta,
                                durable=durable)

    def write_parts(self, key: str, parts: list[memoryview], *, overwrite: bool = False,
                    type_name: str = "", meta: dict[str, Any] | None = None,
                    durable: bool | None = None, ready: Callable[[int, int], None] | None = None) -> int:
        """Write an object from raw parts. `durable` fsyncs the file before the rename and
        the directory after it, so the object survives a crash of the writing node (by
        default only the file of an object under FSYNC_BELOW is fsynced). `ready(i, end)`,
        if given, returns once part i holds its bytes up to `end` (parts still arriving: the
        agent writes a put while it streams in); what it raises abandons the write."""
        path = self.path_of(key)
        self._ensure_dir(path.parent)
        header = json.dumps({
            "sizes": [p.nbytes for p in parts],
            "python": sys.version.split()[0],
            "type": type_name,
            "written": time.time(),
            "host": os.uname().nodename if hasattr(os, "uname") else "",
            "meta": meta or {},
        }, separators=(",", ":")).encode()
        if len(parts) > 1:  # spaces end the JSON so the first buffer starts 64-aligned (_read_mapped)
            header += b" " * (-(16 + len(header) + parts[0].nbytes) % _ALIGN)
        head = FORMAT.magic + struct.pack("<Q", len(header)) + header
        total = len(head) + sum(p.nbytes for p in parts) + FORMAT.trailer.size
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            f = self.fs.open_new(tmp, 0o600)
        except OSError as exc:
            raise self._write_error(exc, path, total) from exc
        try:
            with f:
                digest = _Checksum(FORMAT, total)
                try:
                    digest.add(memoryview(head))
                    _write_all(f, memoryview(head))
                    for index, part in enumerate(parts):
                        for off in range(0, part.nbytes, _CHUNK):
                            chunk = part[off:off + _CHUNK]
                            if ready is not None:
                                ready(index, off + chunk.nbytes)
                            digest.add(chunk)
                            _write_all(f, chunk)
                finally:
                    value = digest.result()
                _write_all(f, memoryview(FORMAT.trailer.pack(value, FORMAT.end)))
                sync = durable if durable is not None else total < FSYNC_BELOW
                if sync:
                    self.fs.sync(f)
            if overwrite:
                self.fs.replace(tmp, str(path))
            else:
                # objects are immutable: the first writer wins, a second is refused
                try:
                    self.fs.link_noreplace(tmp, str(path))
                except FileExistsError:
                    raise StoreError(f"object {key} already exists (objects are immutable)") from None
            if durable:  # asked for (results, checkpoints): the rename too, so the object
                self.fs.sync_dir(str(path.parent))  # outlives a crash of the node that wrote it
        except OSError as exc:
            self.fs.unlink(tmp)
            if exc.errno in _NO_SPACE:
                raise self._write_error(exc, path, total) from exc
            raise
        except BaseException:
            self.fs.unlink(tmp)
            raise
        return total

    def _write_error(self, exc: OSError, path: PurePosixPath, total: int) -> StoreError:
        """A failed write told in the store's terms; a full disk or quota says how to free space."""
        if exc.errno not in _NO_SPACE:
            return StoreError(f"cannot write to the object store at {path.parent}: {exc}")
        why = "over quota" if exc.errno == getattr(errno, "EDQUOT", None) else "no space left"
        return StoreError(
            f"cannot write a {_size(total)} object ({total} bytes) to the object store at {self.root} "
            f"(in {path.parent}): {why} on its filesystem ({exc.strerror or exc}). Nothing was "
            "kept. See what takes the space with `hpc-serverless du` and free it with "
            "`hpc-serverless gc`")

    # -- read -------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return self.fs.exists(str(self.path_of(key)))

    def header(self, key: str) -> dict[str, Any] | None:
        """The header of the object under `key` (None if there is none): cheap, no payload read."""
        path = self.path_of(key)
        try:
            with self.fs.open_read(str(path)) as f:
                head = f.read(16)
                if len(head) < 16 or head[:8] not in _FORMATS:
                    raise CorruptObjectError(f"{path} is not a stored object (bad magic): damaged")
                (hlen,) = struct.unpack("<Q", head[8:])
                header: dict[str, Any] = json.loads(f.read(min(hlen, 1 << 20)))
                return header
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as exc:
            raise CorruptObjectError(f"{path} has a damaged header: {exc}") from None

    def get(self, key: str, *, to_run: bool = False) -> Any:
        """Load the object under `key`, checking size and checksum first. `to_run`: an object
        this process will run (a task's call, its function, its upstream values): its chain is
        checked now, not from the cache, and the very file read must be a regular file of ours
        that others cannot write."""
        data, buffers, header = self.read_parts(key, to_run=to_run)
        try:
            return loads(data, buffers=buffers)
        except SerializationError as exc:
            written = str(header.get("python", "?"))
            raise SerializationError(
                f"cannot load object {key} (written by Python {written} on "
                f"{header.get('host', '?')}, read by Python {sys.version.split()[0]}): "
                f"{exc.__cause__ or exc}") from exc

    def read_parts(self, key: str, *, to_run: bool = False) -> tuple[Any, list[Any], dict[str, Any]]:
        path = self.path_of(key)
        try:
            f = self.fs.open_read(str(path))
        except FileNotFoundError:
            raise ObjectNotFoundError(
                f"object {key} is not in the store at {self.root} (deleted, never written, "
                "or the store is not the one it was written to)") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # (opened without following links: we wrote no link)
                raise UnsafeStoreError(f"{path} is a symbolic link (to {os.readlink(path)!r}); refusing to "
                                       "load it. Fix: remove the link") from None
            raise StoreError(f"cannot read {path}: {exc}") from exc
        with f:
            if to_run:
                check_chain(self.root, path.parent)
                check_file(str(path), os.fstat(f.fileno()))
            else:
                self._check_dir(path.parent)
            size = self.fs.stat(str(path)).size
            head = f.read(16)
            fmt = _FORMATS.get(head[:8]) if len(head) == 16 else None
            if fmt is None:
                raise CorruptObjectError(f"{path} is not a stored object (bad magic): damaged")
            (hlen,) = struct.unpack("<Q", head[8:])
            if hlen > min(size, 1 << 20):
                raise CorruptObjectError(f"{path} has a damaged header")
            header_raw = f.read(hlen)
            try:
                header = json.loads(header_raw)
                sizes = [int(s) for s in header["sizes"]]
            except (ValueError, KeyError, TypeError) as exc:
                raise CorruptObjectError(f"{path} has a damaged header: {exc}") from None
            expected = 16 + hlen + sum(sizes) + fmt.trailer.size
            if size != expected:
                raise CorruptObjectError(
                    f"{path} is {size} bytes but its header says {expected}: truncated or damaged")
            start = 16 + hlen
            mapped = self._read_mapped(f, path, fmt, size, start, sizes) if size >= _MAP_ABOVE else None
            if mapped is not None:
                return mapped[0], mapped[1:], header
            digest = _Checksum(fmt, size)
            digest.add(memoryview(head))
            digest.add(memoryview(header_raw))
            parts = []
            try:
                for n in sizes:
                    buf = _buffer(n)
                    view = memoryview(buf)
                    off = 0
                    while off < n:
                        got = f.readinto(view[off:off + _CHUNK])  # type: ignore[attr-defined]
                        if not got:
                            raise CorruptObjectError(f"{path} ended early: truncated")
                        digest.add(view[off:off + got])
                        off += got
                    parts.append(buf)
            finally:
                value = digest.result()
            trailer = f.read(fmt.trailer.size)
            if len(trailer) != fmt.trailer.size:
                raise CorruptObjectError(f"{path} ended early: truncated")
            stored, end = fmt.trailer.unpack(trailer)
            if end != fmt.end or stored != value:
                raise CorruptObjectError(f"{path} fails its checksum: the object is damaged")
        return parts[0], parts[1:], header

    def _read_mapped(self, f: IO[bytes], path: PurePosixPath, fmt: _Format, size: int, start: int,
                     sizes: list[int]) -> list[Any] | None:
        """The parts of a big object on a local disk, checked, without reading it into new
        memory: the file is mapped copy-on-write, hashed in place, and aligned buffers are
        handed out as views of the map (numpy arrays then live in the page cache, writable,
        private to this process). None where mapping is not safe: on network filesystems a
        file removed from another host would fault (SIGBUS) when its pages are dropped."""
        if not _maps_safely(f.fileno()):
            return None
        try:
            m = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError):
            return None
        if hasattr(mmap, "MADV_WILLNEED"):  # read ahead what is not cached yet
            m.madvise(mmap.MADV_WILLNEED)
        view = memoryview(m)
        digest = fmt.checksum()
        end = size - fmt.trailer.size
        for off in range(0, end, _CHUNK):
            digest.update(view[off:min(off + _CHUNK, end)])
        stored, magic = fmt.trailer.unpack(view[end:])
        if magic != fmt.end or stored != digest.intdigest():
            raise CorruptObjectError(f"{path} fails its checksum: the object is damaged")
        parts: list[Any] = []
        off = start
        for i, n in enumerate(sizes):
            piece = view[off:off + n]
            if i == 0:
                parts.append(bytes(piece))  # the pickle stream: small, and read once
            elif off % _ALIGN == 0:
                parts.append(piece)  # zero copy: arrays need their dtype's alignment
            else:
                buf = _buffer(n)
                memoryview(buf)[:] = piece
                parts.append(buf)
            off += n
        return parts

    def delete(self, key: str) -> None:
        self.fs.unlink(str(self.path_of(key)))


#: objects from this size on are mapped rather than read where the disk is local
_MAP_ABOVE = 8 * 1024 * 1024
#: where an object's first out-of-band buffer starts in the file (cache line; any dtype)
_ALIGN = 64
#: filesystems whose files stay readable while mapped, even when removed meanwhile
_LOCAL_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "zfs", "f2fs", "overlay", "ramfs"})
_fs_types: dict[int, str] = {}


def _maps_safely(fd: int) -> bool:
    """Whether the file under `fd` is on a local filesystem (by /proc/self/mountinfo)."""
    dev = os.fstat(fd).st_dev
    if dev not in _fs_types:
        _fs_types[dev] = _fs_type(dev)
    return _fs_types[dev] in _LOCAL_FS


def _fs_type(dev: int) -> str:
    """The filesystem type of device `dev` ("" where /proc does not say: not mapped)."""
    if not hasattr(os, "major") or not hasattr(mmap, "MAP_PRIVATE"):
        return ""
    want = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[2] == want and " - " in line:
                    return line.split(" - ", 1)[1].split()[0]
    except OSError:
        pass
    return ""


def _buffer(n: int) -> Any:
    """A writable buffer of n bytes. Big ones are anonymous maps: bytearray(n) zeroes its
    memory first (0.45 s per GiB here), a map's pages arrive zeroed when first touched."""
    if n < 1024 * 1024:
        return bytearray(n)
    np = sys.modules.get("numpy")  # loaded already if the object holds arrays
    if np is not None:  # numpy's allocator gets huge pages: reads run twice as fast here
        return np.empty(n, dtype=np.uint8)
    m = mmap.mmap(-1, n)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # as numpy does for big arrays: far fewer page faults
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return m


class _Checksum:
    """The checksum of a byte stream, computed beside the I/O on a second thread for big data.

    xxhash and zlib release the GIL on large buffers, so hashing chunk i while chunk i+1
    is written or read costs little extra wall time on a machine with two cores; chunks are
    small, so the hashing thread reads them from the CPU cache, not from memory again.
    """

    _THREADED_ABOVE = 32 * 1024 * 1024

    def __init__(self, fmt: _Format, total: int = 0) -> None:
        self._hash = fmt.checksum()
        self._queue: queue.SimpleQueue[memoryview | None] | None = None
        self._thread: threading.Thread | None = None
        if total > self._THREADED_ABOVE:
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        assert self._queue is not None
        while (chunk := self._queue.get()) is not None:
            self._hash.update(chunk)

    def add(self, chunk: memoryview) -> None:
        if self._queue is None:
            self._hash.update(chunk)
        else:
            self._queue.put(chunk)

    def result(self) -> int:
        if self._thread is not None and self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        return int(self._hash.intdigest())


def _write_all(f: IO[bytes], view: memoryview) -> None:
    while view.nbytes:
        n = f.write(view)
        if n is None:
            continue
        view = view[n:]


def _size(n: int) -> str:
    """Bytes for a person: 1.5 GiB, 12.0 MiB."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _type_name(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"
